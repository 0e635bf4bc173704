"""The phases of the story from training on: the sanity epochs and their verdict, full training (each
resumed from the run's checkpoint), the evaluation of best.pt, its final verdict and the champion decision.

Each takes the job, the `Resources` the config phase decided and the `StagedDataset`, and records its
results in `job.record` (the report and the manifest read them there)."""

from __future__ import annotations

import difflib
import gc
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pogona_job.dataset import StagedDataset
from pogona_job.errors import ConfigError, SanityFailed, Stalled, TransientFailure
from pogona_job.evaluation import export, plots, scoring
from pogona_job.evaluation.headline import Headline
from pogona_job.evaluation.promotion import champion_path, compare, decide
from pogona_job.evaluation.scoring import SplitRun, evaluate, lagging_modalities, summarise
from pogona_job.logs import get_logger
from pogona_job.run.state import Job
from pogona_job.s3 import pointers, storage
from pogona_job.s3.storage import S3Path

if TYPE_CHECKING:
    from pogona_job.run.preparation import Resources
from pogona_job.training.gate import (
    BatchWatchdog,
    Context,
    StallWatchdog,
    ZeroMapWatch,
    parity_probe,
    require_parity,
    verdict,
)

log = get_logger()


def train(
    job: Job,
    phase: str,
    model_source: str,
    data_yaml: Path,
    device: str,
    workers: int,
    epochs: int,
    on_stall: Callable[[Stalled], None] | None = None,
) -> Any:
    """One training phase, resumed from this run's checkpoint when there is one.
    `on_stall` (from the no-progress thread) must report the failure and end the process."""
    from pogona_job import training
    from pogona_job.training import checkpoint

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
    sanity = phase == "sanity"
    watchdog = BatchWatchdog(
        zero_batches=job.settings.gate_zero_batches,
        phase=phase,
        between_batches=job.check,
        context=gate_context(job, device),
        keep=1_000_000 if sanity else 0,  # the verdict reads every sanity batch's losses
    )

    s = job.settings
    zero_map = ZeroMapWatch(0 if sanity else s.zero_map_epochs, from_scratch=s.from_scratch)

    def on_epoch(epoch: int, values: dict[str, float]) -> None:
        job.checkpoints.offer(phase, epoch, epochs, save_dir, {"attempt": job.attempt})
        zero_map.check(epoch, values.get("map50", 0.0))

    stall = (
        StallWatchdog(s.stall_factor, s.stall_min_s, s.stall_first_batch_s, on_stall, phase=phase)
        if on_stall is not None
        else None
    )

    try:
        result = training.train_phase(
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
                **job.checkpoints.spec(),  # one spec: keys, interval, lease guard, attempt limit
                "staging": str(job.work / "checkpoint-staging-rank0"),
                "epochs": epochs,
                "save_dir": str(save_dir),
                "state": {"attempt": job.attempt},
            },
            callbacks=job.live.callbacks(phase, epochs),
            weigh_after=epochs if sanity else 0,
            stall=stall,
        )
        if sanity and not resume:  # a resumed phase saw only its last batches: the verdict reads the epochs
            result.batches, result.labelled = list(watchdog.history), watchdog.labelled
        return result
    finally:
        gc.collect()  # the phase's model and loaders are garbage now: free them before the next phase
        job.record.watchdog = {
            "phase": phase,
            "batches": watchdog.batches,
            "tripped": watchdog.tripped,
            "last_batches": list(watchdog.recent),
        }


def gate_context(job: Job, device: str) -> Context:
    s = job.settings
    return Context(device=device, from_scratch=s.from_scratch, sanity_epochs=s.sanity_epochs)


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
    s, rec = job.settings, job.record
    batch = max(s.batch, 1)
    runs = evaluate(best, staged, imgsz=s.imgsz, batch=batch, device=device, work_dir=job.runs / "eval")
    rec.evaluation = {split: summarise(run, seed=s.seed, conf=s.conf) for split, run in runs.items()}
    rec.per_modality = rec.evaluation.get("val", {}).get("per_modality", {})
    rec.lagging = lagging_modalities(rec.per_modality, s.modality_lag_margin)
    for split, figures in rec.evaluation.items():
        log.info("evaluation", split=split, images=figures["images"], **figures["overall"])
    if "val" in rec.evaluation and rec.full is not None:
        rec.headline = Headline.build(rec.evaluation["val"], rec.full.rows, conf=s.conf)
        log.info("headline", line=rec.headline.line())
        # Ultralytics' own confusion_matrix.png counts every box above 0.001; the published one is at POGONA_CONF.
        plots.confusion_matrix(
            rec.evaluation["val"]["at_conf"], best.parent.parent / "confusion_matrix.png", conf=s.conf
        )
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


def final_verdict(job: Job, save_dir: Path, dataset_files: list[Path]) -> None:
    """After full training: best.pt below POGONA_MIN_FINAL_MAP50 on val is not a success.

    Its weights and report are still published for inspection (the failure path publishes a `failed`
    manifest: never latest.json, never champion.json); the run ends with exit 5 and one sentence."""
    from pogona_job.errors import SanityFailed
    from pogona_job.run.publish import push_outputs

    s, rec, head = job.settings, job.record, job.record.headline
    if head is None or head.map50 >= s.min_final_map50:
        rec.final_verdict = {"passed": True, "map50": head.map50 if head else None, "floor": s.min_final_map50}
        return
    device = str(rec.settings_used.get("device", "cpu"))
    causes = _likely_causes(s.model, device, head.epochs, float(rec.config.get("POGONA_LR0") or 0.0))
    sentence = (
        f"Final verdict: best.pt scored mAP@0.5 {head.map50:.3f} on val ({head.images} images, "
        f"{head.epoch_text()}), below POGONA_MIN_FINAL_MAP50 {s.min_final_map50:g}: {causes}; the weights and "
        "report are published for inspection, latest.json and champion.json were not moved."
    )
    rec.final_verdict = {"passed": False, "map50": head.map50, "floor": s.min_final_map50, "sentence": sentence}
    rec.failed_phase = "final verdict"
    push_outputs(job, save_dir, dataset_files)
    raise SanityFailed(sentence)


def _likely_causes(model: str, device: str, epochs: int, lr0: float) -> str:
    """What usually makes a finished training score nothing, for this model and device."""
    causes = []
    if lr0 < 1e-6:
        causes.append(f"POGONA_LR0 is {lr0:g}, effectively 0, so the weights barely moved")
    if model.endswith(".yaml"):
        causes.append(
            f"{model} trains from scratch and scores 0 for its first ~10 epochs (this run had {epochs}): "
            "use pretrained weights or many more epochs"
        )
    if device == "mps":
        causes.append("Apple MPS is known to train on silent zeros: run on the CPU or a CUDA GPU")
    causes.append("or the labels do not match the images (check with `pogona-job dataset validate`)")
    return "; ".join(causes)


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
        classes=rec.classes,
        dataset_fingerprint=rec.dataset.get("fingerprint"),
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


OnStall = Callable[[Stalled], None]


def sanity(job: Job, res: Resources, staged: StagedDataset, on_stall: OnStall) -> None:
    """The parity probe on an accelerator, then the sanity epochs (not repeated once the gate passed)."""
    s, rec = job.settings, job.record
    gate = storage.get_json(job.client, job.out / "checkpoint" / "gate.json") or {}
    if gate.get("passed"):
        log.info("sanity gate already passed for this run; not repeated")
    elif res.device != "cpu":
        from pogona_job import training

        loss_fn = training.batch_loss_fn(res.model_source, staged.data_yaml, s.imgsz)
        rec.parity = parity_probe(loss_fn, res.device)
        log.info("parity probe", passed=rec.parity.passed, cpu=rec.parity.cpu, device=rec.parity.accelerator)
        require_parity(rec.parity)
    else:
        rec.parity_note = "skipped: training runs on the CPU, the reference itself"
        log.info("parity probe skipped", reason="device is the CPU")
    rec.sanity = train(
        job, "sanity", res.model_source, staged.data_yaml, res.device, res.workers, s.sanity_epochs, on_stall=on_stall
    )
    # The sanity checkpoint must land before full training's first one could supersede it.
    flush_checkpoints(job)
    # Uploaded by every attempt: the manifest lists it (with its hash) even on a resumed run.
    from pogona_job.run.publish import upload

    upload(job, [(rec.sanity.save_dir / "results.csv", "sanity/results.csv")])
    if rec.sanity.first_batch_at is not None:
        from pogona_job import PROCESS_START

        startup = rec.sanity.first_batch_at - PROCESS_START - rec.timings.get("pull", 0.0)
        rec.timings["startup_to_first_batch"] = round(startup, 2)
        log.info("start-up", seconds_to_first_batch_excluding_pull=round(startup, 2))


def judge_sanity(job: Job, res: Resources) -> None:
    """The gate: full training starts only when the sanity epochs show the model learning."""
    s, rec = job.settings, job.record
    assert rec.sanity is not None and job.lease is not None and job.live is not None
    rec.verdict = verdict(
        rec.sanity.rows,
        min_loss_drop=s.gate_min_loss_drop,
        min_map50=s.min_map50,
        batches=rec.sanity.batches,
        labelled=rec.sanity.labelled,
        weight_change=rec.sanity.weight_change,
        context=gate_context(job, res.device),
    )
    for c in rec.verdict.criteria:
        log.info("sanity criterion", criterion=c.name, threshold=c.threshold, observed=c.observed, passed=c.passed)
    if not rec.verdict.passed:
        raise SanityFailed(rec.verdict.failure_sentence())
    job.lease.fenced_json(job.out / "checkpoint" / "gate.json", rec.verdict.as_dict())
    job.live.tracker.project(rec.sanity.rows, s.epochs)  # right after the verdict: will the budget cover it?


def full(job: Job, res: Resources, staged: StagedDataset, on_stall: OnStall) -> None:
    """Full training; a retry that finds the budget spent publishes the checkpoint's best-so-far as partial."""
    from pogona_job import training
    from pogona_job.run.budget import BudgetSpent

    rec = job.record
    try:
        rec.full = train(
            job,
            "full",
            res.model_source,
            staged.data_yaml,
            res.device,
            res.workers,
            job.settings.epochs,
            on_stall=on_stall,
        )
    except BudgetSpent:
        partial = training.partial_phase("full", job.runs / "full", res.device)
        if partial is None:
            raise
        rec.full = partial
    flush_checkpoints(job)  # the final set lands now, never after the clean-up


def assess(job: Job, res: Resources, staged: StagedDataset) -> None:
    """best.pt on val and test with intervals and the export check, its final verdict, the champion decision."""
    rec = job.record
    assert rec.full is not None
    runs = evaluate_model(job, rec.full.save_dir / "weights" / "best.pt", staged, res.device)
    final_verdict(job, rec.full.save_dir, staged.published_files)  # below POGONA_MIN_FINAL_MAP50: exit 5
    rec.promotion = decide_promotion(job, staged, runs, res.device)


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
