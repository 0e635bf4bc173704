"""The phases of the story that need more than a few lines: training (resumed from the run's
checkpoint), the evaluation of best.pt and the champion decision."""

from __future__ import annotations

import difflib
import gc
from pathlib import Path
from typing import Any

from pogona_job.dataset import StagedDataset
from pogona_job.errors import ConfigError, TransientFailure
from pogona_job.evaluation import export, scoring
from pogona_job.evaluation.promotion import champion_path, compare, decide
from pogona_job.evaluation.scoring import SplitRun, evaluate, lagging_modalities, summarise
from pogona_job.logs import get_logger
from pogona_job.run.state import Job
from pogona_job.s3 import pointers, storage
from pogona_job.s3.storage import S3Path

log = get_logger()


def train(job: Job, phase: str, model_source: str, data_yaml: Path, device: str, workers: int, epochs: int) -> Any:
    """One training phase, resumed from this run's checkpoint when there is one."""
    from pogona_job import training
    from pogona_job.training import checkpoint
    from pogona_job.training.gate import BatchWatchdog

    save_dir = job.runs / phase
    restored = checkpoint.restore(job.client, job.out, phase, save_dir)
    if restored and restored.epoch >= epochs:
        log.info("phase already complete in the checkpoint; not repeated", epochs=restored.epoch)
        return training.completed_phase(phase, save_dir, device, data_yaml, job.settings, workers)
    resume = restored is not None and restored.resumable
    if restored and not resume:
        log.warning("checkpoint is not resumable; starting the phase again", epoch=restored.epoch)
    if resume:
        assert restored
        log.info("resuming from checkpoint", from_epoch=restored.epoch + 1, epochs=epochs)
    # A SIGTERM is honoured between batches, never mid-step.
    watchdog = BatchWatchdog(zero_batches=job.settings.gate_zero_batches, phase=phase, between_batches=job.check)

    def on_epoch(epoch: int, _values: dict[str, float]) -> None:
        job.checkpoints.offer(phase, epoch, epochs, save_dir, {"attempt": job.attempt})

    try:
        return training.train_phase(
            phase,
            model_source=model_source,
            data_yaml=data_yaml,
            settings=job.settings,
            device=device,
            workers=workers,
            epochs=epochs,
            save_dir=save_dir,
            watchdog=watchdog,
            on_epoch=on_epoch,
            resume=resume,
            extra=job.extra_args,
            # Multi-GPU: rank 0 of the DDP workers uploads the checkpoints itself (pogona_job/training/trainer.py).
            ddp_checkpoint={
                "out": job.out.uri,
                "staging": str(job.work / "checkpoint-staging-rank0"),
                "every_epochs": job.settings.checkpoint_every_epochs,
                "min_interval_s": job.settings.checkpoint_min_interval_s,
                "epochs": epochs,
                "save_dir": str(save_dir),
                "state": {"attempt": job.attempt},
            },
            callbacks=job.live.callbacks(phase, epochs),
        )
    finally:
        gc.collect()  # the phase's model and loaders are garbage now: free them before the next phase
        job.record.watchdog = {
            "phase": phase,
            "batches": watchdog.batches,
            "tripped": watchdog.tripped,
            "last_batches": list(watchdog.recent),
        }


def fetch_model(job: Job) -> str:
    """Weights by name, .yaml, or an s3:// URI (downloaded once into the work dir)."""
    model = job.settings.model
    if not model.startswith("s3://"):
        _check_weights_name(model)
        return model
    src = S3Path.parse(model)
    dest = job.work / "weights" / Path(src.key).name
    if not dest.exists() and storage.head(job.client, src) is None:
        raise ConfigError(
            f"POGONA_MODEL {model} does not exist: check the URI (a run's weights are at <run>/weights/best.pt)."
        )
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with storage.errors_for(src.bucket, f"downloading the weights {model}"):
            job.client.download_file(src.bucket, src.key, str(dest))
    return str(dest)


def _check_weights_name(model: str) -> None:
    """A misspelled pretrained name is a configuration mistake, not a failed download (exit 2, did-you-mean)."""
    if not model.endswith(".pt") or Path(model).exists():
        return
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES

    if Path(model).name in GITHUB_ASSETS_NAMES:
        return
    close = difflib.get_close_matches(Path(model).name, sorted(GITHUB_ASSETS_NAMES), n=1, cutoff=0.6)
    hint = (
        f" - did you mean {close[0]}?" if close else ": use a pretrained name such as yolo11s.pt, a .yaml or s3://..."
    )
    raise ConfigError(f"POGONA_MODEL {model} is neither a file nor a known pretrained model{hint}")


def flush_checkpoints(job: Job) -> None:
    if not job.checkpoints.flush(timeout=600):
        raise TransientFailure("The checkpoint upload did not finish within 10 minutes; retry the job.")


def evaluate_model(job: Job, best: Path, staged: StagedDataset, device: str) -> dict[str, SplitRun]:
    """The evaluate phase: best.pt on val and test, the figures into the record, then the export check."""
    from pogona_job.logs import get_logger

    s, rec = job.settings, job.record
    batch = max(s.batch, 1)
    runs = evaluate(best, staged, imgsz=s.imgsz, batch=batch, device=device, work_dir=job.runs / "eval")
    rec.evaluation = {split: summarise(run, seed=s.seed) for split, run in runs.items()}
    rec.per_modality = rec.evaluation.get("val", {}).get("per_modality", {})
    rec.lagging = lagging_modalities(rec.per_modality, s.modality_lag_margin)
    for split, figures in rec.evaluation.items():
        get_logger().info("evaluation", split=split, images=figures["images"], **figures["overall"])
    rec.error_analysis = _error_gallery(job, best, runs, device)
    rec.export = export.export_and_verify(
        best,
        staged,
        runs,
        formats=s.exports,
        imgsz=s.imgsz,
        batch=batch,
        device=device,
        work_dir=job.runs / "export",
        tolerance=s.export_tolerance,
    )
    return runs


def decide_promotion(job: Job, staged: StagedDataset, runs: dict[str, SplitRun], device: str) -> dict[str, Any]:
    """Evaluate the current champion's best.pt on this run's splits (same process, same settings) and decide."""

    s, rec = job.settings, job.record
    champion = pointers.read(job.client, champion_path(s.output_uri or "")).value
    comparison = None
    if champion is not None and s.promote == "auto":
        weights = _champion_weights(job, champion) if champion.get("classes") == rec.classes else None
        if weights is not None:
            theirs = scoring.evaluate(
                weights,
                staged,
                imgsz=s.imgsz,
                batch=max(s.batch, 1),
                device=device,
                work_dir=job.runs / "eval-champion",
                tag="champion",
            )
            if set(theirs) == set(runs):
                comparison = compare(runs, theirs, margin=s.promotion_margin)
    decision = decide(
        mode=s.promote,
        succeeded=True,  # assessed at the end of a run whose training and evaluation finished
        export=rec.export,
        dropped=len(rec.dataset.get("dropped") or []),
        allow_lenient=s.promote_lenient,
        champion=champion,
        comparison=comparison,
    )
    log.info("promotion decision", decision=decision["decision"], reason=decision["reason"])
    return decision


def _champion_weights(job: Job, champion: dict[str, Any]) -> Path | None:
    uri = champion.get("weights")
    if not uri:
        return None
    src = S3Path.parse(uri)
    dest = job.work / "champion" / str(champion.get("run_id", "champion")) / "best.pt"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        if storage.head(job.client, src) is None:
            log.warning("champion weights missing", uri=uri)
            return None
        with storage.errors_for(src.bucket, f"downloading the champion's weights {uri}"):
            job.client.download_file(src.bucket, src.key, str(dest))
    return dest


def _error_gallery(job: Job, best: Path, runs: dict[str, SplitRun], device: str) -> list[str]:
    """The report's error analysis on val at POGONA_CONF; its pictures uploaded under plots/errors/. Never
    fails the run: a model that trained and scored is not lost to a drawing problem."""
    from pogona_job.run import gallery
    from pogona_job.run.publish import upload

    val = runs.get("val")
    if val is None:
        return []
    try:
        lines, files = gallery.error_analysis(
            best, val.modality, conf=job.settings.conf, imgsz=job.settings.imgsz, device=device, work_dir=job.runs
        )
    except Exception as exc:  # reported in the report, never a failed run
        log.warning("error analysis failed", error=f"{type(exc).__name__}: {exc}")
        return ["", f"*Error analysis unavailable: {type(exc).__name__}.*", ""]
    upload(job, files)
    return lines
