"""The phases of the story from training on: the one training (resumed from the run's checkpoint) whose
first POGONA_SANITY_EPOCHS epochs the sanity gate judges before it continues, the evaluation of best.pt,
its final verdict and the champion decision.

Each takes the job, the `Resources` the config phase decided and the `StagedDataset`, and records its
results in `job.record` (the report and the manifest read them there)."""

from __future__ import annotations

import difflib
import gc
import shutil
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
    Criterion,
    Evidence,
    StallWatchdog,
    Verdict,
    ZeroMapWatch,
    parity_probe,
    require_parity,
    require_trainable,
    verdict,
)
from pogona_job.training.phase import PhaseResult, read_results

log = get_logger()
OnStall = Callable[[Stalled], None]


TRAINING = "full"  # the one training's save dir and checkpoint phase (<run>/checkpoint/full/)


def train(job: Job, res: Resources, staged: StagedDataset, on_stall: OnStall | None = None) -> None:
    """The one training, resumed from this run's checkpoint when there is one: the sanity epochs are its
    first POGONA_SANITY_EPOCHS epochs, judged by the gate at their end (`Gate`) before it continues; a
    passed gate costs no epoch. Called inside the job's "sanity" phase: the gate moves the job on to
    "verdict" and "full". `on_stall` (from the no-progress thread) must report the failure and end the
    process. A retry that finds the budget spent publishes the checkpoint's best-so-far as partial."""
    from pogona_job import training
    from pogona_job.run.budget import BudgetSpent
    from pogona_job.training import checkpoint

    s, rec = job.settings, job.record
    epochs, gate_at = s.epochs, s.sanity_epochs
    save_dir = job.runs / TRAINING
    shutil.rmtree(job.runs / "sanity", ignore_errors=True)  # written from this training's rows only
    restored = checkpoint.restore(job.client, job.out, TRAINING, save_dir)
    done = restored.epoch if restored else 0
    watchdog = BatchWatchdog(
        zero_batches=s.gate_zero_batches,
        phase="sanity",
        between_batches=job.check,  # a SIGTERM is honoured between batches, never mid-step
        context=gate_context(job, res.device),
        keep=1_000_000,  # the verdict reads every sanity batch's losses (the gate freezes the list)
    )
    stall = (
        StallWatchdog(s.stall_factor, s.stall_min_s, s.stall_first_batch_s, on_stall, phase="sanity")
        if on_stall is not None
        else None
    )
    gate = Gate(job, res.device, watchdog, stall)
    refuse_frozen_model(job, res.model_source)
    gate.parity(res, staged)
    if done >= gate_at:  # the gate's epoch is behind this attempt: judged once, not repeated
        gate.behind(save_dir)
    zero_map = ZeroMapWatch(s.zero_map_epochs, from_scratch=s.from_scratch)

    def on_epoch(epoch: int, values: dict[str, float]) -> None:
        job.checkpoints.offer(TRAINING, epoch, epochs, save_dir, {"attempt": job.attempt})
        if epoch > gate_at:  # the stuck-at-zero count starts after the gate
            zero_map.check(epoch, values.get("map50", 0.0))

    try:
        if restored and done >= epochs:
            log.info("training already complete in the checkpoint; not repeated", epochs=done)
            rec.full = training.completed_phase(TRAINING, save_dir, res.device)
            return
        resume = restored is not None and restored.resumable
        if restored and not resume:
            log.warning("checkpoint is not resumable; starting the training again", epoch=done)
        if resume:
            log.info("resuming from checkpoint", from_epoch=done + 1, epochs=epochs)
        judged_here = not gate.judged
        rec.full = training.train_phase(
            TRAINING,
            model_source=res.model_source,
            data_yaml=staged.data_yaml,
            settings=s,
            device=res.device,
            workers=res.workers,
            epochs=epochs,
            save_dir=save_dir,
            watchdog=watchdog,
            on_epoch=on_epoch,
            resume=resume,
            extra=job.extra_args,
            # Multi-GPU: rank 0 of the DDP workers uploads the checkpoints itself (pogona_job/training/trainer.py)
            # and judges the gate with these thresholds; the job's gate then judges its evidence here.
            ddp_checkpoint={
                **job.checkpoints.spec(),  # one spec: keys, interval, lease guard, attempt limit
                "staging": str(job.work / "checkpoint-staging-rank0"),
                "epochs": epochs,
                "save_dir": str(save_dir),
                "phase": TRAINING,
                "state": {"attempt": job.attempt},
            },
            callbacks=job.live.callbacks(TRAINING, epochs, gate_at=gate_at),
            weigh_after=gate_at if judged_here else 0,
            stall=stall,
            gate_at=gate_at if judged_here else 0,
            on_gate=gate if judged_here else None,
            gate={"min_loss_drop": s.gate_min_loss_drop, "min_map50": s.min_map50},
        )
        if not gate.judged:  # the training ended before the gate's epoch (early stop): judge what it did
            resumed = watchdog.batches == 0 or resume
            rows = [r for r in rec.full.rows if r["epoch"] <= gate_at]
            batches, labelled = ([], None) if resumed else (list(watchdog.history), watchdog.labelled)
            gate(Evidence(gate_at, rows, batches, labelled, rec.full.weight_change))
        if rec.sanity is not None:
            rec.sanity.params, rec.sanity.hardware = rec.full.params, rec.full.hardware
    except BudgetSpent:
        partial = training.partial_phase(TRAINING, save_dir, res.device)
        if partial is None:
            raise
        rec.full = partial
    finally:
        gc.collect()  # the training's model and loaders are garbage now: free them before the evaluation
        rec.watchdog = {
            "phase": watchdog.phase,
            "batches": watchdog.batches,
            "tripped": watchdog.tripped,
            "last_batches": list(watchdog.recent),
        }
    flush_checkpoints(job)  # the final set lands now, never after the clean-up


class Gate:
    """The sanity gate inside the one training: called by the trainer at the end of epoch
    POGONA_SANITY_EPOCHS with its `Evidence` (or, for an attempt that starts past that epoch, from the
    checkpoint's rows). It writes sanity/results.csv, judges, logs every criterion, raises SanityFailed
    (exit 5: the training stops there) or writes checkpoint/gate.json and projects the budget."""

    def __init__(self, job: Job, device: str, watchdog: BatchWatchdog, stall: StallWatchdog | None) -> None:
        self.job, self.device, self.watchdog, self.stall = job, device, watchdog, stall
        self.file = job.out / "checkpoint" / "gate.json"
        self.before: dict[str, Any] = storage.get_json(job.client, self.file) or {}
        if not self.before.get("passed"):
            self.before = {}
        self.judged = False

    def parity(self, res: Resources, staged: StagedDataset) -> None:
        """The backend parity probe on an accelerator, before any training (not repeated once the gate passed)."""
        rec, s = self.job.record, self.job.settings
        if self.before:
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

    def __call__(self, evidence: Evidence) -> None:
        """At the end of the sanity epochs, inside the training. A gate that passed in an earlier attempt
        (gate.json) is not judged again: its epochs' rows are written, its verdict read back."""
        job, s, rec = self.job, self.job.settings, self.job.record
        if self.before:
            self._passed_before(job.runs / TRAINING)
            return
        self.judged = True
        job.next_phase("verdict")
        rec.sanity = self._sanity_result(job.runs / TRAINING, evidence.batches, evidence.labelled)
        rec.sanity.weight_change = evidence.weight_change
        self._startup(evidence.first_batch)
        rec.verdict = verdict(
            rec.sanity.rows,
            min_loss_drop=s.gate_min_loss_drop,
            min_map50=s.min_map50,
            batches=evidence.batches,
            labelled=evidence.labelled,
            weight_change=evidence.weight_change,
            context=gate_context(job, self.device),
        )
        for c in rec.verdict.criteria:
            log.info("sanity criterion", criterion=c.name, threshold=c.threshold, observed=c.observed, passed=c.passed)
        if not rec.verdict.passed:
            raise SanityFailed(rec.verdict.failure_sentence())
        assert job.lease is not None and job.live is not None
        job.lease.fenced_json(self.file, rec.verdict.as_dict())
        job.live.tracker.project(rec.sanity.rows, s.epochs)  # right after the verdict: will the budget cover it?
        self._on_to_full()

    def behind(self, save_dir: Path) -> None:
        """An attempt that starts past the gate's epoch: the verdict of gate.json, not judged again; without
        one (a multi-GPU run stopped before its launcher judged), judged now from the checkpoint's epochs."""
        if not self.before:
            rows = [r for r in read_results(save_dir / "results.csv") if r["epoch"] <= self.job.settings.sanity_epochs]
            self(Evidence(self.job.settings.sanity_epochs, rows, [], None, None))
            return
        self._passed_before(save_dir)

    def _passed_before(self, save_dir: Path) -> None:
        rec = self.job.record
        self.judged = True
        rec.sanity = self._sanity_result(save_dir, [], None)
        rec.verdict = Verdict(
            [Criterion(**c) for c in self.before.get("criteria", [])], gate_context(self.job, self.device)
        )
        self.job.next_phase("full")
        self.watchdog.phase = "full"
        self.watchdog.keep = 0
        if self.stall is not None:
            self.stall.phase = "full"

    def _on_to_full(self) -> None:
        self.job.next_phase("full")
        self.watchdog.phase = "full"
        if self.stall is not None:
            self.stall.phase = "full"

    def _sanity_result(self, save_dir: Path, batches: list[dict[str, float]], labelled: int | None) -> PhaseResult:
        """The sanity epochs as their own result: sanity/results.csv is the first rows of the training's,
        uploaded by every attempt (the manifest lists it, with its hash, even on a resumed run)."""
        from pogona_job import training
        from pogona_job.run.publish import upload

        job = self.job
        sanity_dir = job.runs / "sanity"
        rows = training.first_epochs(save_dir / "results.csv", sanity_dir / "results.csv", job.settings.sanity_epochs)
        upload(job, [(sanity_dir / "results.csv", "sanity/results.csv")])
        seconds = rows[-1].get("time", 0.0) if rows else 0.0
        hardware = training.describe_hardware(self.device)
        return PhaseResult("sanity", sanity_dir, rows, seconds, hardware, 0, None, None, batches, labelled)

    def _startup(self, first_batch: float | None) -> None:
        if first_batch is None:
            return
        from pogona_job import PROCESS_START

        rec = self.job.record
        startup = first_batch - PROCESS_START - rec.timings.get("pull", 0.0)
        rec.timings["startup_to_first_batch"] = round(startup, 2)
        log.info("start-up", seconds_to_first_batch_excluding_pull=round(startup, 2))


def refuse_frozen_model(job: Job, model_source: str) -> None:
    """A `freeze` trainer argument that leaves nothing to train is a configuration mistake: exit 2 with our
    sentence before any training (ultralytics would refuse it only after building its trainer, exit 6).
    Costs a model build only when the argument is there."""
    freeze = job.extra_args.get("freeze")
    if not freeze:
        return
    from pogona_job import training

    names = [name for name, _ in training.load_model(model_source).model.named_parameters()]
    require_trainable(freeze, names, job.settings.model)


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
    # The one validation of best.pt after training (ultralytics' own is skipped: trainer.py); its drawings are
    # the published validation plots, beside best.pt's training folder.
    runs = evaluate(
        best, staged, imgsz=s.imgsz, batch=batch, device=device, work_dir=job.runs / "eval", plots_to=best.parent.parent
    )
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
