"""The whole job as a straight story: config, pull, stage, sanity, verdict, full training,
evaluate, push. `run()` maps every outcome to an exit code and a one-line reason.

Preemption: every phase can be interrupted by SIGTERM (exit 143 after saving what it can)
and a restart with the same run id resumes: a succeeded run is left alone (its latest.json and
clean-up completed), a passed gate is not re-run, training continues from the last verified
checkpoint set (checkpoint.py). Only the lease holder writes under the run (lease.py).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

from pogona_job.config import Settings, effective_config, require_writable, scheduler_attempt, scheduler_job
from pogona_job.errors import Interrupted, JobError, SanityFailed, TrainingFailed, TransientFailure
from pogona_job.logs import bind, get_logger
from pogona_job.run.report import RunRecord, render
from pogona_job.s3 import pointers, pull, storage
from pogona_job.s3.progress import transfer_progress
from pogona_job.s3.storage import S3Path

log = get_logger()
FINAL = ("succeeded", "partial")  # manifests that nothing rewrites
PLOTS = ("results.png", "BoxPR_curve.png", "confusion_matrix.png", "val_batch0_pred.jpg")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StopFlag:
    """SIGTERM/SIGINT ask for a stop at the next safe point; a second signal, or the budget
    running out, exits at once (AWS Batch sends SIGKILL 30 s after SIGTERM).

    The handler only sets a field: it may interrupt any code, even a logger holding its lock,
    so logging happens later in check(), and the budget is enforced by a watcher thread that
    polls without taking locks (it also fires while the main thread is stuck in C code).
    """

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.requested_at: float | None = None
        self._raise_now = False  # inside interruptible(): the handler raises at once
        self.signal_name = ""
        self._logged = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        threading.Thread(target=self._enforce_budget, name="stop-budget", daemon=True).start()

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested_at is not None:
            os._exit(143)
        self.signal_name = signal.Signals(signum).name
        self.requested_at = time.monotonic()
        if self._raise_now:
            self._raise_now = False
            raise _StopNow

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """Code with no safe points of its own (staging, evaluation) and nothing to save: a signal
        stops it at once, on the graceful path, instead of running into the hard exit."""
        self.check()
        self._raise_now = True
        try:
            yield
        except _StopNow:
            self.check()
        finally:
            self._raise_now = False

    def _enforce_budget(self) -> None:
        while True:
            time.sleep(0.25)
            if self.requested_at is not None and time.monotonic() - self.requested_at > self.budget_s:
                os._exit(143)

    def left(self) -> float:
        return self.budget_s if self.requested_at is None else self.budget_s - (time.monotonic() - self.requested_at)

    def check(self) -> None:
        if self.requested_at is None:
            return
        if not self._logged:
            self._logged = True
            log.warning("stop requested", signal=self.signal_name, budget_s=self.budget_s)
        raise Interrupted(
            "Stopped by a termination signal after saving progress: start the job again with the same "
            "POGONA_RUN_ID to resume."
        )


@dataclass
class Job:
    settings: Settings
    run_id: str
    attempt: int
    client: Any
    out: S3Path  # <output>/<run_id>
    work: Path
    record: RunRecord
    stop: StopFlag
    sums: dict[str, storage.Artifact]
    checkpoints: Any = None  # CheckpointSync once training starts
    lease: Any = None  # set only once acquired: a job without it writes nothing under the run
    final: bool = False  # a succeeded (or partial) manifest is published: nothing may rewrite it
    live: Any = None  # livestatus.LiveStatus: progress.json, accounting, budget (once the lease is held)
    extra_args: dict[str, Any] = field(default_factory=dict)  # the resource plan's ultralytics args

    @property
    def runs(self) -> Path:
        return self.work / "runs" / self.run_id

    def check(self) -> None:
        """Between batches and phases: stop on a signal, or when the run's lease was lost."""
        self.stop.check()
        if self.lease is not None:
            self.lease.check()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.check()
        bind(phase=name)
        if self.live is not None:
            self.live.set_phase(name)
        log.info("phase started")
        start = time.monotonic()
        try:
            yield
        except BaseException:
            self.record.failed_phase = self.record.failed_phase or name
            raise
        finally:
            self.record.timings[name] = round(time.monotonic() - start, 2)
        log.info("phase finished", seconds=self.record.timings[name])


def run(settings: Settings) -> int:
    """Run the job; every outcome becomes an exit code and, on failure, one sentence on stderr."""
    job: Job | None = None
    try:
        job = _prepare(settings)
        _execute(job)
        return 0
    except _AlreadyDone:
        return 0
    except JobError as err:
        return _finish_failed(job, err)
    except Exception as err:  # a bug or an unforeseen library error: still one sentence, exit 6
        log.debug("unexpected error", exc_info=True)  # the traceback only when debugging; same exit code
        wrapped = TrainingFailed(
            f"Unexpected error: {type(err).__name__}: {err}. Re-run with POGONA_DEBUG=true for details."
        )
        return _finish_failed(job, wrapped)
    finally:
        if job is not None:
            if job.checkpoints is not None:
                job.checkpoints.close()
            if job.live is not None:
                job.live.close(job.record.status, job.record.exit_code)
            if job.lease is not None:
                job.lease.release()
            job.stop.uninstall()


class _AlreadyDone(Exception):
    pass


class _StopNow(BaseException):
    """Raised by the signal handler inside interruptible(); a BaseException so that library code's
    `except Exception` cannot swallow it."""


def _prepare(settings: Settings) -> Job:
    settings.require_uris()
    assert settings.output_uri
    run_id = settings.effective_run_id()
    attempt = scheduler_attempt()
    bind(run_id=run_id, attempt=attempt, phase="config")
    stop = StopFlag(settings.stop_budget_s)
    stop.install()
    work = require_writable(settings.work_dir.resolve())
    from pogona_job.training import offline

    offline.prepare(work / "ultralytics")
    record = RunRecord(
        run_id=run_id,
        attempt=attempt,
        output_uri=settings.output_uri,
        config=effective_config(settings),
        model=settings.model,
        classes=settings.classes,
        started_at=_now(),
    )
    client = storage.make_client(threads=settings.s3_threads, max_attempts=settings.s3_max_attempts)
    out = S3Path.parse(settings.output_uri) / run_id
    return Job(settings, run_id, attempt, client, out, work, record, stop, sums={})


def _execute(job: Job) -> None:
    s, rec = job.settings, job.record
    from pogona_job import dataset, training
    from pogona_job.run.lease import Lease
    from pogona_job.training.checkpoint import CheckpointSync
    from pogona_job.training.gate import parity_probe, require_parity, verdict

    with job.phase("config"):
        assert s.dataset_uri and s.output_uri
        storage.check_bucket(job.client, S3Path.parse(s.dataset_uri), "reading the dataset from")
        storage.check_bucket(job.client, job.out, "checking the output prefix")
        previous = storage.get_json(job.client, job.out / "manifest.json")
        if previous and previous.get("status") in FINAL:  # partial: its budget is spent
            log.info(
                "run already finished; nothing redone",
                status=previous["status"],
                manifest=(job.out / "manifest.json").uri,
            )
            _complete_finished(job, previous)  # a kill after the manifest left these undone
            print(f"Run {job.run_id} already {previous['status']}: {job.out.uri}/ (nothing redone).", file=sys.stderr)
            raise _AlreadyDone
        lease = Lease(
            job.client, job.out / "lease.json", s.lease_ttl_s, attempt=job.attempt, scheduler_job=scheduler_job()
        )
        lease.acquire(job.run_id)
        job.lease = lease  # only now: a refused job must not publish into a run another job owns
        import ultralytics  # noqa: F401 - after offline.prepare(); the first import is the slow part

        from pogona_job import logs
        from pogona_job.training import offline

        offline.switch_off_outbound()
        logs.route_ultralytics(debug=s.debug)
        device = training.resolve_device(s)
        workers, workers_reason = training.resolve_workers(s.workers, device)
        rec.settings_used.update(device=device, workers=workers, workers_reason=workers_reason)
        log.info("resources", device=device, workers=workers_reason)
        from pogona_job.run import livestatus

        job.live = livestatus.start(job, device)
        model_source = _model_source(job)
        job.checkpoints = CheckpointSync(
            job.client,
            job.out,
            job.work / "checkpoint-staging",
            every_epochs=s.checkpoint_every_epochs,
            min_interval_s=s.checkpoint_min_interval_s,
            guard=lease.confirm,
        )

    with job.phase("pull"):
        src = S3Path.parse(s.dataset_uri)
        local = job.work / "cache" / src.bucket / src.key
        console = s.log_format == "console" or (s.log_format == "auto" and sys.stderr.isatty())
        with transfer_progress("pull", console=console, check=job.stop.check) as progress:
            result = pull.pull_prefix(job.client, src, local, threads=s.s3_threads, progress=progress)
        log.info(
            "dataset pulled", files=result.files, bytes=result.bytes, fetched=result.fetched, cached=result.skipped
        )
        rec.dataset.update(uri=s.dataset_uri, fingerprint=result.fingerprint, files=result.files, bytes=result.bytes)

    with job.phase("stage"), job.stop.interruptible():
        inventory = dataset.inspect_dataset(local, s.configured_classes, dataset.Options.from_settings(s))
        staged_root = job.work / "staged"
        rec.dataset.update(problems=len(inventory.problems), junk_ignored=inventory.junk_ignored)
        try:
            staged = dataset.stage_dataset(
                inventory,
                staged_root,
                policy=s.validation_policy,
                val_fraction=s.val_fraction,
                seed=s.seed,
                leakage_warn=s.leakage_warn,
            )
        finally:
            if (staged_root / "problems.txt").exists():
                _upload(job, [(staged_root / "problems.txt", "dataset/problems.txt")])
        rec.classes = staged.class_names  # POGONA_CLASS_NAMES, else the export's own
        rec.dataset.update(
            images=staged.images, boxes=staged.boxes, backgrounds=staged.backgrounds, counts=staged.counts
        )
        rec.dataset.update(staged.summary())  # layout, names/split/modality sources, leakage, dropped
        if staged.leakage["warn"]:
            log.warning("near-duplicates across the split", **staged.leakage)
        log.info("dataset staged", images=staged.images, boxes=staged.boxes, counts=staged.counts)
        plan = training.resource_plan(s, device, staged.images)
        job.extra_args = plan.args
        rec.settings_used.update(plan.reasons)
        log.info("training settings", **plan.reasons)

    gate = storage.get_json(job.client, job.out / "checkpoint" / "gate.json") or {}
    with job.phase("sanity"):
        if gate.get("passed"):
            log.info("sanity gate already passed for this run; not repeated")
        elif device != "cpu":
            rec.parity = parity_probe(training.batch_loss_fn(model_source, staged.data_yaml, s.imgsz), device)
            log.info("parity probe", passed=rec.parity.passed, cpu=rec.parity.cpu, device=rec.parity.accelerator)
            require_parity(rec.parity)
        else:
            rec.parity_note = "skipped: training runs on the CPU, the reference itself"
            log.info("parity probe skipped", reason="device is the CPU")
        rec.sanity = _train(job, "sanity", model_source, staged.data_yaml, device, workers, s.sanity_epochs)
        # The sanity checkpoint must land before full training's first one could supersede it.
        _flush_checkpoints(job)
        # Uploaded by every attempt: the manifest lists it (with its hash) even on a resumed run.
        _upload(job, [(rec.sanity.save_dir / "results.csv", "sanity/results.csv")])

    if rec.sanity.first_batch_at is not None:
        from pogona_job import PROCESS_START

        startup = rec.sanity.first_batch_at - PROCESS_START - rec.timings.get("pull", 0.0)
        rec.timings["startup_to_first_batch"] = round(startup, 2)
        log.info("start-up", seconds_to_first_batch_excluding_pull=round(startup, 2))

    with job.phase("verdict"):
        rec.verdict = verdict(rec.sanity.rows, min_loss_drop=s.gate_min_loss_drop, min_map50=s.min_map50)
        for c in rec.verdict.criteria:
            log.info("sanity criterion", criterion=c.name, threshold=c.threshold, observed=c.observed, passed=c.passed)
        if not rec.verdict.passed:
            raise SanityFailed(rec.verdict.failure_sentence())
        storage.put_json(job.client, job.out / "checkpoint" / "gate.json", rec.verdict.as_dict())
    job.live.tracker.project(rec.sanity.rows, s.epochs)  # right after the verdict: will the budget cover it?

    with job.phase("full"):
        from pogona_job.run.budget import BudgetSpent

        try:
            rec.full = _train(job, "full", model_source, staged.data_yaml, device, workers, s.epochs)
        except BudgetSpent:  # a retry found the budget spent: the checkpoint's best-so-far becomes partial
            partial = training.partial_phase("full", job.runs / "full", device)
            if partial is None:
                raise
            rec.full = partial
        _flush_checkpoints(job)  # the final set lands now, never after the clean-up below

    with job.phase("evaluate"), job.stop.interruptible():
        from pogona_job.evaluation import promotion, scoring

        best = rec.full.save_dir / "weights" / "best.pt"
        runs = scoring.assess(job, best, staged, device)  # val/test metrics, intervals, ONNX export check
        rec.promotion = promotion.assess(job, staged, runs, device)

    with job.phase("push"):
        pushed = time.monotonic()
        _push_outputs(job, rec.full.save_dir, staged.split_files)
        rec.timings["push"] = round(time.monotonic() - pushed, 2)  # the manifest must carry its own phase
        job.check()  # before the manifest: an interrupted push is redone on restart, never half-published
        rec.status, rec.finished_at = job.live.tracker.final_status(), _now()
        rec.failure = job.live.tracker.stop_reason  # partial: why it stopped early
        _publish(job)
        job.checkpoints.close()  # nothing in flight can land after the clean-up
        storage.delete_prefix(job.client, job.out / "checkpoint")  # only kept while the run is in progress
    log.info(f"run {rec.status}", outputs=job.out.uri, **_final_numbers(rec))
    from pogona_job.run import notify

    notify.send(job)


def _train(job: Job, phase: str, model_source: str, data_yaml: Path, device: str, workers: int, epochs: int) -> Any:
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


def _model_source(job: Job) -> str:
    """Weights by name, .yaml, or an s3:// URI (downloaded once into the work dir)."""
    model = job.settings.model
    if not model.startswith("s3://"):
        return model
    src = S3Path.parse(model)
    dest = job.work / "weights" / Path(src.key).name
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with storage.errors_for(src.bucket, f"downloading the weights {model}"):
            job.client.download_file(src.bucket, src.key, str(dest))
    return str(dest)


def _upload(job: Job, items: list[tuple[Path, str]]) -> list[storage.Artifact]:
    pairs = [(path, job.out / key) for path, key in items if path.exists()]
    artifacts = storage.upload_many(job.client, pairs, threads=job.settings.s3_threads)
    job.sums.update({a.key.removeprefix(job.out.key + "/"): a for a in artifacts})
    return artifacts


def _push_outputs(job: Job, save_dir: Path, split_files: list[Path]) -> None:
    items: list[tuple[Path, str]] = [
        (save_dir / "results.csv", "results.csv"),
        (save_dir / "weights" / "best.pt", "weights/best.pt"),
        (save_dir / "weights" / "last.pt", "weights/last.pt"),
        (save_dir / "weights" / "best.onnx", "weights/best.onnx"),  # when exported (export.py)
        *[(f, f"dataset/{f.name}") for f in split_files],
    ]
    for name in PLOTS:
        src = save_dir / name
        if src.suffix == ".jpg" and src.exists():  # the contract promises plots/*.png
            from PIL import Image

            png = src.with_suffix(".png")
            Image.open(src).save(png)
            src = png
        items.append((src, f"plots/{src.name}"))
    _upload(job, items)


def _publish(job: Job) -> None:
    """config.json and report.md, then manifest.json LAST, then latest.json: readers trust the manifest."""
    rec = job.record
    if job.lease is not None:  # prove we still hold the run right before writing its outputs
        job.lease.confirm()
    if job.live is not None:
        rec.accounting = job.live.tracker.summary(rec.status)
    config_path = job.work / "config.json"
    config_path.write_text(json.dumps(rec.config, indent=2, sort_keys=True, default=str))
    rec.artifacts = sorted({*job.sums, "config.json", "report.md"})
    report_path = job.work / "report.md"
    report_path.write_text(render(rec))
    _upload(job, [(config_path, "config.json"), (report_path, "report.md")])
    manifest = _manifest(job)
    written = pointers.update(
        job.client,
        job.out / "manifest.json",
        lambda current: None if (current or {}).get("status") in FINAL else manifest,
    )
    if written is None:
        log.warning("the run's manifest is already final; left as it is")
        return
    job.final = rec.status in FINAL
    if rec.status == "succeeded":
        advance_latest(job.client, S3Path.parse(job.settings.output_uri or ""), manifest)
        from pogona_job.evaluation import promotion

        promotion.promote(job.client, job.settings.output_uri or "", manifest, job.settings.imgsz)


def advance_latest(client: Any, output: S3Path, manifest: dict[str, Any]) -> None:
    """Point `<output>/latest.json` at this succeeded run unless it names one that finished later.

    A compare-and-swap on the ETag, retried on conflict: two runs finishing together never move
    it backwards, and an unreadable latest.json is replaced."""
    run = output / str(manifest["run_id"])
    pointer = {
        "run_id": manifest["run_id"],
        "manifest": (run / "manifest.json").uri,
        "finished_at": manifest["finished_at"],
    }

    def decide(current: dict[str, Any] | None) -> dict[str, Any] | None:
        if current is not None and str(current.get("finished_at", "")) >= pointer["finished_at"]:
            return None  # already this run, or a later one
        return pointer

    pointers.update(client, output / "latest.json", decide)


def _complete_finished(job: Job, manifest: dict[str, Any]) -> None:
    """A retry of a finished run finishes what a kill after its manifest left undone (partial: never latest)."""
    if manifest.get("status") == "succeeded":
        from pogona_job.evaluation import promotion

        advance_latest(job.client, S3Path.parse(job.settings.output_uri or ""), manifest)
        promotion.promote(job.client, job.settings.output_uri or "", manifest, job.settings.imgsz)
    storage.delete_prefix(job.client, job.out / "checkpoint")
    lease = pointers.read(job.client, job.out / "lease.json")  # a dead attempt's, killed after the manifest
    if lease.etag is not None:
        pointers.delete(job.client, job.out / "lease.json", expected=lease.etag)


def _flush_checkpoints(job: Job) -> None:
    if not job.checkpoints.flush(timeout=600):
        raise TransientFailure("The checkpoint upload did not finish within 10 minutes; retry the job.")


def _manifest(job: Job) -> dict[str, Any]:
    import torch
    import ultralytics

    rec = job.record
    trained = rec.full or rec.sanity
    return {
        "status": rec.status,
        "exit_code": rec.exit_code or 0,
        "failure": rec.failure,
        "failed_phase": rec.failed_phase,
        "run_id": job.run_id,
        "attempt": job.attempt,
        "started_at": rec.started_at,
        "finished_at": rec.finished_at or _now(),
        "timings_s": rec.timings,
        "metrics": _final_numbers(rec),
        "sanity_metrics": _final(rec.sanity.rows) if rec.sanity else {},
        "verdict": rec.verdict.as_dict() if rec.verdict else None,
        "parity": rec.parity.__dict__ if rec.parity else None,
        "watchdog": rec.watchdog,
        "per_modality": rec.per_modality,
        "evaluation": rec.evaluation,  # val and test: overall, per modality, per class, 95% intervals
        "export": rec.export,
        "promotion": rec.promotion,
        "classes": rec.classes,
        "lineage": _lineage(job),
        "dataset": rec.dataset,
        "model": rec.model,
        "versions": {
            "torch": torch.__version__,
            "ultralytics": ultralytics.__version__,
            "cuda": torch.version.cuda,
            "python": sys.version.split()[0],
        },
        "device": trained.hardware.__dict__ if trained else {"device": rec.settings_used.get("device")},
        "settings_used": rec.settings_used,
        "checkpoints": {
            "uploaded": job.checkpoints.uploaded if job.checkpoints else [],
            "skipped_superseded": job.checkpoints.skipped if job.checkpoints else [],
        },
        "accounting": rec.accounting,
        "artifacts": {key: {"sha256": a.sha256, "size": a.size} for key, a in sorted(job.sums.items())},
    }


def _lineage(job: Job) -> dict[str, Any]:
    from pogona_job.run import lineage

    splits = {k.removeprefix("dataset/"): a.sha256 for k, a in job.sums.items() if k.startswith("dataset/")}
    return lineage.collect(
        config=job.record.config,
        seed=job.settings.seed,
        dataset=job.record.dataset,
        split_sha256=splits,
        champion=job.record.promotion.get("compared_against"),
    )


def _final(rows: list[dict[str, float]]) -> dict[str, float]:
    from pogona_job.training import final_metrics

    return final_metrics(rows)


def _final_numbers(rec: RunRecord) -> dict[str, float]:
    return _final(rec.full.rows) if rec.full else {}


def _finish_failed(job: Job | None, err: JobError) -> int:
    if job is not None:
        rec = job.record
        rec.status, rec.exit_code, rec.failure, rec.finished_at = err.status, err.exit_code, err.sentence, _now()
        log.error("run failed", exit_code=err.exit_code, reason=err.sentence, failed_phase=rec.failed_phase)
        # 2/4: nothing, or nowhere, to write. Without the lease (refused, or lost to another job) the
        # run is not ours; after the succeeded manifest, nothing may rewrite it.
        if err.exit_code not in (2, 4) and job.lease is not None and not job.lease.lost and not job.final:
            _publish_failure(job)
        from pogona_job.run import notify

        notify.send(job)
    _write_failure_file(err.sentence)
    print(err.sentence, file=sys.stderr)
    return err.exit_code


def _write_failure_file(sentence: str, output_dir: Path = Path("/opt/ml/output")) -> None:
    """SageMaker's convention: the first 1024 chars of this file become the job's failure reason."""
    if output_dir.is_dir():
        with suppress(OSError):
            (output_dir / "failure").write_text(sentence[:1024])


def _publish_failure(job: Job) -> None:
    """Best effort within the stop budget: newest checkpoint, then the report and a manifest that
    says `failed`/`interrupted` - never presented as complete."""
    from pogona_job.training import partial_phase

    rec = job.record
    try:
        if job.checkpoints is not None:
            try:
                if not job.checkpoints.flush(max(1.0, job.stop.left() - 5)):
                    log.warning("checkpoint upload did not finish within the stop budget")
            except JobError as exc:  # the previous complete set is still there to resume from
                log.warning("the newest checkpoint was not saved", reason=exc.sentence)
            job.checkpoints.close()
        # The epochs a failed phase did finish belong in its report.
        device = str(rec.settings_used.get("device", "cpu"))
        if rec.sanity is None:
            rec.sanity = partial_phase("sanity", job.runs / "sanity", device)
            _upload(job, [(job.runs / "sanity" / "results.csv", "sanity/results.csv")])
        elif rec.full is None and rec.verdict is not None and rec.verdict.passed:
            rec.full = partial_phase("full", job.runs / "full", device)
        _publish(job)
        if rec.exit_code not in (75, 143) and not job.final:  # not retryable: nobody will resume
            storage.delete_prefix(job.client, job.out / "checkpoint")
        log.info("failure report pushed", report=(job.out / "report.md").uri)
    except JobError as exc:
        log.error("could not push the failure report", reason=exc.sentence)
