"""The whole job as a straight story: config, pull, stage, sanity, verdict, full training,
evaluate, push. `run()` maps every outcome to an exit code and a one-line reason.

Preemption: every phase can be interrupted by SIGTERM (exit 143 after saving what it can)
and a restart with the same run id resumes: a succeeded run is left alone (its latest.json and
clean-up completed), a passed gate is not re-run, training continues from the last verified
checkpoint set (checkpoint.py). Only the lease holder writes under the run (lease.py).
"""

from __future__ import annotations

import sys
import time
from contextlib import suppress
from pathlib import Path

from pogona_job.config import Settings, effective_config, require_writable, scheduler_attempt, scheduler_job
from pogona_job.errors import ConfigError, JobError, SanityFailed, TrainingFailed
from pogona_job.logs import bind, get_logger
from pogona_job.run.phases import decide_promotion, evaluate_model, fetch_model, flush_checkpoints, train
from pogona_job.run.publish import complete_finished, final_numbers, publish, publish_failure, push_outputs, upload
from pogona_job.run.signals import StopFlag
from pogona_job.run.state import FINAL, Job, RunRecord, now
from pogona_job.s3 import pull, storage
from pogona_job.s3.progress import transfer_progress
from pogona_job.s3.storage import S3Path

log = get_logger()


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
                job.live.close(job.outcome(), retryable=job.record.retryable)
            if job.lease is not None:
                job.lease.release()
            job.stop.uninstall()


class _AlreadyDone(Exception):
    pass


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
        started_at=now(),
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
        if not storage.check_bucket(job.client, S3Path.parse(s.dataset_uri), "reading the dataset from"):
            # A typo in the prefix: say so before any run folder (lease, report) is written.
            raise ConfigError(f"Nothing under {s.dataset_uri}: check POGONA_DATASET_URI (a typo in the prefix?).")
        storage.check_bucket(job.client, job.out, "checking the output prefix")
        previous = storage.get_json(job.client, job.out / "manifest.json")
        if previous and previous.get("status") in FINAL:  # partial: its budget is spent
            log.info(
                "run already finished; nothing redone",
                status=previous["status"],
                manifest=(job.out / "manifest.json").uri,
            )
            complete_finished(job, previous)  # a kill after the manifest left these undone
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
        model_source = fetch_model(job)
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
                upload(job, [(staged_root / "problems.txt", "dataset/problems.txt")])
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
        rec.sanity = train(job, "sanity", model_source, staged.data_yaml, device, workers, s.sanity_epochs)
        # The sanity checkpoint must land before full training's first one could supersede it.
        flush_checkpoints(job)
        # Uploaded by every attempt: the manifest lists it (with its hash) even on a resumed run.
        upload(job, [(rec.sanity.save_dir / "results.csv", "sanity/results.csv")])

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
            rec.full = train(job, "full", model_source, staged.data_yaml, device, workers, s.epochs)
        except BudgetSpent:  # a retry found the budget spent: the checkpoint's best-so-far becomes partial
            partial = training.partial_phase("full", job.runs / "full", device)
            if partial is None:
                raise
            rec.full = partial
        flush_checkpoints(job)  # the final set lands now, never after the clean-up below

    with job.phase("evaluate"), job.stop.interruptible():
        best = rec.full.save_dir / "weights" / "best.pt"
        runs = evaluate_model(job, best, staged, device)  # val/test metrics, intervals, ONNX export check
        rec.promotion = decide_promotion(job, staged, runs, device)

    with job.phase("push"):
        pushed = time.monotonic()
        push_outputs(job, rec.full.save_dir, staged.split_files)
        rec.timings["push"] = round(time.monotonic() - pushed, 2)  # the manifest must carry its own phase
        job.check()  # before the manifest: an interrupted push is redone on restart, never half-published
        rec.status, rec.finished_at = job.live.tracker.final_status(), now()
        rec.failure = job.live.tracker.stop_reason  # partial: why it stopped early
        publish(job)
        job.checkpoints.close()  # nothing in flight can land after the clean-up
        storage.delete_prefix(job.client, job.out / "checkpoint")  # only kept while the run is in progress
    log.info(f"run {rec.status}", outputs=job.out.uri, **final_numbers(rec))
    from pogona_job.run import notify

    notify.send(job)


def _finish_failed(job: Job | None, err: JobError) -> int:
    if job is not None:
        rec = job.record
        rec.status, rec.exit_code, rec.failure, rec.finished_at = err.status, err.exit_code, err.sentence, now()
        log.error("run failed", exit_code=err.exit_code, reason=err.sentence, failed_phase=rec.failed_phase)
        rec.retryable = err.retryable
        # Without the lease (refused, or lost to another job) the run is not ours; after the succeeded
        # manifest, nothing may rewrite it.
        if err.publishes_report and job.lease is not None and not job.lease.lost and not job.final:
            publish_failure(job)
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
