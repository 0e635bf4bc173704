"""The run's state in memory: which phase a stopped run names (the manifest's `failed_phase`)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from pogona_job.errors import Interrupted
from pogona_job.run.signals import StopFlag
from pogona_job.run.state import Job, RunRecord
from pogona_job.s3.storage import S3Path


def _job(tmp_path: Path) -> Job:
    record = RunRecord(run_id="r", attempt=1, output_uri="s3://b/runs", config={}, model="m", classes=["c"])
    return Job(None, "r", 1, None, S3Path("b", "runs/r"), tmp_path, record, StopFlag(budget_s=60), sums={})  # type: ignore[arg-type]


def test_a_signal_inside_a_phase_names_that_phase(tmp_path: Path) -> None:
    job = _job(tmp_path)
    with pytest.raises(Interrupted), job.phase("stage"):
        job.stop._handle(signal.SIGTERM, None)
        job.check()
    assert job.record.failed_phase == "stage"


def test_a_signal_between_two_phases_names_the_phase_that_did_not_begin(tmp_path: Path) -> None:
    # Before: the check at the start of a phase raised outside it, and the interrupted manifest named no phase.
    job = _job(tmp_path)
    with job.phase("sanity"):
        pass
    job.stop._handle(signal.SIGTERM, None)
    with pytest.raises(Interrupted), job.phase("evaluate"):
        pytest.fail("a stopped run must not begin a phase")
    assert job.record.failed_phase == "evaluate"
    assert "evaluate" not in job.record.timings  # it never began
