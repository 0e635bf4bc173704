"""The whole job as a straight story: config, pull, stage, then one training whose first epochs are the
sanity epochs (sanity, verdict, full), evaluate, push. `run()` maps every outcome to an exit code and a one-line reason.

Preemption: every phase can be interrupted by SIGTERM (exit 143 after saving what it can)
and a restart with the same run id resumes: a succeeded run is left alone (its latest.json and
clean-up completed), a passed gate is not judged again, training continues from the last verified
checkpoint set (checkpoint.py). Only the lease holder writes under the run (lease.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from pogona_job.config import Settings, effective_config, require_writable, scheduler_attempt
from pogona_job.errors import JobError, LeaseLost, Stalled, TrainingFailed
from pogona_job.logs import bind, get_logger
from pogona_job.run import phases, preparation, publish
from pogona_job.run.publish import publish_failure
from pogona_job.run.signals import StopFlag
from pogona_job.run.state import AlreadyFinished, Job, RunRecord, now
from pogona_job.s3 import storage
from pogona_job.s3.storage import S3Path

log = get_logger()


def run(settings: Settings) -> int:
    """Run the job; every outcome becomes an exit code and, on failure, one sentence on stderr."""
    job: Job | None = None
    try:
        job = _prepare(settings)
        _execute(job)
        return 0
    except AlreadyFinished:
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
    """The story: one call per phase, each with what it needs and what it gives."""
    on_stall = stalled(job)
    with job.phase("config"):
        resources = preparation.take_run(job)
    with job.phase("pull"):
        local = preparation.pull_dataset(job)
    with job.phase("stage"), job.stop.interruptible():
        staged = preparation.stage(job, local, resources)
    with job.phase("sanity"):  # one training: its gate moves the job on to "verdict", then "full"
        phases.train(job, resources, staged, on_stall)
    with job.phase("evaluate"), job.stop.interruptible():
        phases.assess(job, resources, staged)
    with job.phase("push"):
        publish.finish(job, staged.published_files)
    headline = job.record.headline.line() if job.record.headline else None
    log.info(f"run {job.record.status}", outputs=job.out.uri, headline=headline)
    from pogona_job.run import notify

    notify.send(job)


def stalled(job: Job) -> Callable[[Stalled], None]:
    """What the no-progress thread does: the main thread is stuck (maybe in C, where no exception reaches
    it), so this thread writes the failure report itself and ends the process with the error's exit code."""

    def report_and_exit(err: Stalled) -> None:
        code = 6
        try:
            code = _finish_failed(job, err)
            if job.live is not None:
                job.live.close(job.outcome(), retryable=job.record.retryable)
            if job.lease is not None:
                job.lease.release()  # the retry must not wait for the lease to expire
        except Exception:  # a report that cannot be written must not keep a stuck process alive
            log.debug("stall report failed", exc_info=True)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    return report_and_exit


def _finish_failed(job: Job | None, err: JobError) -> int:
    if job is not None:
        rec = job.record
        rec.status, rec.exit_code, rec.failure, rec.finished_at = err.status, err.exit_code, err.sentence, now()
        log.error("run failed", exit_code=err.exit_code, reason=err.sentence, failed_phase=rec.failed_phase)
        rec.retryable = err.retryable
        # Without the lease (refused, or lost to another job) the run is not ours; after the succeeded
        # manifest, nothing may rewrite it.
        reports = err.publishes_report or (err.reports_once_claimed and job.claimed)
        if reports and job.lease is not None and not job.lease.lost and not job.final:
            try:
                publish_failure(job)
            except LeaseLost as lost:  # lost the run while reporting: the new holder's, untouched
                err = lost
                rec.status, rec.exit_code, rec.failure = err.status, err.exit_code, err.sentence
                log.error("run failed", exit_code=err.exit_code, reason=err.sentence)
        from pogona_job.run import notify

        notify.send(job)
    sentence = job.record.failure if job is not None and job.record.failure else err.sentence
    _write_failure_file(sentence)
    print(sentence, file=sys.stderr)
    return err.exit_code


def _write_failure_file(sentence: str, output_dir: Path = Path("/opt/ml/output")) -> None:
    """SageMaker's convention: the first 1024 chars of this file become the job's failure reason."""
    if output_dir.is_dir():
        with suppress(OSError):
            (output_dir / "failure").write_text(sentence[:1024])
