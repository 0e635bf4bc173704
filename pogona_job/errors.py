"""Every way the job can end, as an exception that knows its exit code.

The scheduler acts on the exit code (see the contract's table); the user reads the
sentence. `run.job.run()` (the job) and `cli.main()` (the other commands) are the only places that
turn these into a process exit.

The policy lives on the classes, so no other module compares exit codes:
- `retryable`: the scheduler should try again (the run's checkpoints are kept for the retry);
- `publishes_report`: the failure is written into the run (report.md, a failed manifest). Not when
  there is nothing or nowhere to write (configuration, storage refused), nor when the run is another
  job's (busy, lease lost);
- `reports_once_claimed`: written into the run all the same when it was found after this job claimed the
  run (its manifest then says an attempt is working on it, until the failure replaces that).
"""

from __future__ import annotations

from pogona_job.redact import redact


class JobError(Exception):
    """A failure with a documented exit code and one human sentence."""

    exit_code = 6
    status = "failed"
    retryable = False
    publishes_report = True
    reports_once_claimed = True

    def __init__(self, sentence: str) -> None:
        sentence = redact(sentence)  # a sentence reaches stderr, the log, the manifest and report.md
        super().__init__(sentence)
        self.sentence = sentence


class ConfigError(JobError):
    """Invalid, missing or misspelled configuration (also: weights we cannot obtain)."""

    exit_code = 2
    publishes_report = False


class DatasetError(JobError):
    """The dataset is empty, malformed or fails validation."""

    exit_code = 3


class StorageDenied(JobError):
    """The bucket refused us for good: access denied, no such bucket, bad credentials."""

    exit_code = 4
    publishes_report = False
    reports_once_claimed = False  # the bucket refuses the report too


class SanityFailed(JobError):
    """The model is not learning on this backend/data; full training must not start."""

    exit_code = 5


class TrainingFailed(JobError):
    """Training failed for any other reason."""

    exit_code = 6


class TransientFailure(JobError):
    """Network or storage kept failing after botocore's retries; a retry may succeed."""

    exit_code = 75
    retryable = True


class Stalled(TransientFailure):
    """No training batch finished for far longer than the batches so far took (a hung data loader or
    collective, a dead worker): the job reports and exits rather than idling until the scheduler's wall
    time. Retryable: a fresh container usually clears it, and the retry resumes from the checkpoint."""


class RunBusy(JobError):
    """Another live job holds this run id; retry later (the retry exits 0 once it succeeded)."""

    exit_code = 75
    retryable = True
    publishes_report = False
    reports_once_claimed = False


class Interrupted(JobError):
    """SIGTERM/SIGINT: we saved what we could; a restart with the same run id resumes."""

    exit_code = 143
    status = "interrupted"
    retryable = True


class LeaseLost(JobError):
    """Another job took this run's lease over: stop at once and publish nothing (the new holder owns the run)."""

    exit_code = 75
    retryable = True
    publishes_report = False
    reports_once_claimed = False
