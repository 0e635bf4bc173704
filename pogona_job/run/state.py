"""The run's state: what the report and the manifest say (RunRecord) and the job's handles (Job)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pogona_job.config import Settings
from pogona_job.evaluation.headline import Headline
from pogona_job.logs import bind, get_logger
from pogona_job.run.signals import StopFlag
from pogona_job.s3 import storage
from pogona_job.s3.storage import S3Path
from pogona_job.training.gate import ParityResult, Verdict
from pogona_job.training.phase import PhaseResult

log = get_logger()
FINAL = ("succeeded", "partial")  # manifests that nothing rewrites


class AlreadyFinished(Exception):
    """The run's manifest is already final: nothing is redone and the job exits 0."""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class RunRecord:
    """Everything the report and the manifest say about one run, gathered as phases finish."""

    run_id: str
    attempt: int
    output_uri: str
    config: dict[str, Any]
    model: str
    classes: list[str]
    status: str = "running"
    exit_code: int | None = None
    retryable: bool = False  # the failure is one the scheduler retries (errors.JobError.retryable)
    failure: str | None = None
    failed_phase: str | None = None
    started_at: str = ""
    finished_at: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    settings_used: dict[str, Any] = field(default_factory=dict)  # what the job picked (device, workers, ...)
    sanity: PhaseResult | None = None
    full: PhaseResult | None = None
    verdict: Verdict | None = None
    parity: ParityResult | None = None
    parity_note: str = ""
    watchdog: dict[str, Any] = field(default_factory=dict)
    per_modality: dict[str, dict[str, Any]] = field(default_factory=dict)
    lagging: list[str] = field(default_factory=list)
    evaluation: dict[str, Any] = field(default_factory=dict)  # scoring.summarise() per split (val, test)
    headline: Headline | None = None  # best.pt on val: what every surface quotes (evaluation/headline.py)
    final_verdict: dict[str, Any] = field(default_factory=dict)  # {"passed", "map50", "floor", "sentence"}
    export: dict[str, Any] = field(default_factory=dict)  # export.verify()
    promotion: dict[str, Any] = field(default_factory=dict)  # promotion.decide()
    artifacts: list[str] = field(default_factory=list)  # relative keys under the run prefix
    # Keys under the run (publish.upload_dataset_sheets): {modality: plots/modality-<m>.png} for images whose
    # modality came from pixels; {"examples" | "alike_but_labels_differ_examples": plots/leakage-*.png}.
    modality_sheets: dict[str, str] = field(default_factory=dict)
    leakage_sheets: dict[str, str] = field(default_factory=dict)
    accounting: dict[str, Any] = field(default_factory=dict)  # budget.Tracker.summary(): time, cost, attempts
    error_analysis: list[str] = field(default_factory=list)  # run/gallery.py: the report's error-analysis markdown


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
    claimed: bool = False  # its manifest says this attempt is working on the run (publish.claim_run)
    final: bool = False  # a succeeded (or partial) manifest is published: nothing may rewrite it
    live: Any = None  # livestatus.LiveStatus: progress.json, accounting, budget (once the lease is held)
    extra_args: dict[str, Any] = field(default_factory=dict)  # the resource plan's ultralytics args
    local_files: dict[str, Path] = field(default_factory=dict)  # uploaded key -> local file (report.html embeds them)
    _current: tuple[str, float] = ("config", 0.0)  # the phase in progress and its time.monotonic() start

    def outcome(self) -> str:
        """The attempt's outcome for the accounting: a user's Ctrl-C (SIGINT) is a stop, not a preemption."""
        if self.record.status == "interrupted" and self.stop.signal_name == "SIGINT":
            return "stopped by the user"
        return self.record.status

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
        try:
            self.check()
        except BaseException:  # a signal between two phases: the run stopped before this one began
            self.record.failed_phase = self.record.failed_phase or name
            raise
        self._begin(name)
        try:
            yield
        except BaseException:
            self.record.failed_phase = self.record.failed_phase or self._current[0]
            raise
        finally:
            self.record.timings[self._current[0]] = round(time.monotonic() - self._current[1], 2)
        log.info("phase finished", seconds=self.record.timings[self._current[0]])

    def next_phase(self, name: str) -> None:
        """Inside a phase: it ends here and `name` begins (the sanity gate inside the one training:
        sanity, then verdict, then full, in the logs, the timings, progress.json and failed_phase)."""
        current, started = self._current
        self.record.timings[current] = round(time.monotonic() - started, 2)
        log.info("phase finished", seconds=self.record.timings[current])
        self._begin(name)

    @property
    def current_phase(self) -> str:
        return self._current[0]

    def _begin(self, name: str) -> None:
        bind(phase=name)
        if self.live is not None:
            self.live.set_phase(name)
        log.info("phase started")
        self._current = (name, time.monotonic())
