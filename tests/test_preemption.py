"""Preemption: SIGTERM in any phase exits 143 within the budget, and a restart with the same
run id completes with every epoch exactly once; kill -9 loses at most one checkpoint interval;
two jobs with one run id never both publish."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pogona_job.locals3 import LocalS3
from tests.conftest import BUCKET, ROOT, FaultProxy, job_env, run_cli

EPOCHS, SANITY = 4, 3
Event = dict[str, Any]


class Job:
    """A job in a child process whose JSON log lines are read as they come."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pogona_job", "run"],
            env=env,
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        STARTED.append(self)
        self.events: queue.Queue[Event] = queue.Queue()
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr
        for line in self.proc.stderr:
            self.lines.append(line)
            if line.startswith("{"):
                self.events.put(json.loads(line))

    def wait_for(self, match: Callable[[Event], bool], timeout: float = 180) -> Event:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if match(event):
                return event
        raise AssertionError("event never came; log tail:\n" + "".join(self.lines[-20:]))

    def signal_and_wait(self, signum: int) -> tuple[int, float]:
        start = time.monotonic()
        os.kill(self.proc.pid, signum)
        code = self.proc.wait(60)
        return code, time.monotonic() - start


def _epochs(s3_client: Any, key: str) -> list[int]:
    body = s3_client.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
    return [int(row["epoch"]) for row in csv.DictReader(io.StringIO(body))]


def _assert_complete(s3_client: Any, run: str) -> dict[str, Any]:
    manifest = json.loads(s3_client.get_object(Bucket=BUCKET, Key=f"runs/{run}/manifest.json")["Body"].read())
    assert manifest["status"] == "succeeded"
    for key, meta in manifest["artifacts"].items():
        body = s3_client.get_object(Bucket=BUCKET, Key=f"runs/{run}/{key}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == meta["sha256"], key
    assert _epochs(s3_client, f"runs/{run}/results.csv") == list(range(1, EPOCHS + 1))
    assert _epochs(s3_client, f"runs/{run}/sanity/results.csv") == list(range(1, SANITY + 1))
    return manifest


@pytest.fixture()
def env_for(s3: LocalS3, demo_uri: str, tmp_path: Path) -> Callable[..., dict[str, str]]:
    def make(run: str, **extra: str) -> dict[str, str]:
        return job_env(s3, tmp_path, POGONA_DATASET_URI=demo_uri, POGONA_RUN_ID=run, POGONA_EPOCHS=str(EPOCHS), **extra)

    return make


def _is(event: str, **fields: Any) -> Callable[[Event], bool]:
    return lambda e: e.get("event") == event and all(e.get(k) == v for k, v in fields.items())


TRIGGERS: dict[str, Callable[[Event], bool]] = {
    "pull": _is("phase started", phase="pull"),
    "sanity": _is("epoch", phase="sanity", epoch=1),
    "full": _is("epoch", phase="full", epoch=2),  # then a moment later: mid-epoch 3
    "push": _is("phase started", phase="push"),
}


@pytest.mark.parametrize("phase", list(TRIGGERS))
def test_sigterm_in_each_phase_exits_143_in_budget_and_a_restart_completes(
    phase: str, env_for: Callable[..., dict[str, str]], s3: LocalS3, s3_client: Any, tmp_path: Path
) -> None:
    run = f"sigterm-{phase}"
    env = env_for(run)
    proxy = None
    if phase == "push":  # slow weight uploads, so the signal lands while the push is running
        proxy = FaultProxy(s3.endpoint, "slow:1.0", tmp_path, match=r"^PUT .*/weights/", slow_s=3)
        env["AWS_ENDPOINT_URL_S3"] = proxy.endpoint
    try:
        job = Job(env)
        job.wait_for(TRIGGERS[phase])
        if phase == "full":
            time.sleep(0.5)
        code, seconds = job.signal_and_wait(signal.SIGTERM)
    finally:
        if proxy:
            proxy.stop()
    assert code == 143, "".join(job.lines[-15:])
    assert seconds < 25, seconds
    print(f"SIGTERM during {phase}: exited 143 after {seconds:.2f}s")
    manifest = json.loads(s3_client.get_object(Bucket=BUCKET, Key=f"runs/{run}/manifest.json")["Body"].read())
    assert manifest["status"] == "interrupted"
    report = s3_client.get_object(Bucket=BUCKET, Key=f"runs/{run}/report.md")["Body"].read().decode()
    assert "Status: INTERRUPTED" in report

    again = run_cli(["run"], env_for(run))
    assert again.code == 0, again.stderr[-3000:]
    _assert_complete(s3_client, run)
    if phase == "full":
        assert '"resuming from checkpoint"' in again.stderr
        assert '"sanity gate already passed for this run; not repeated"' in again.stderr


def test_kill_9_mid_training_resumes_from_the_last_uploaded_checkpoint(
    env_for: Callable[..., dict[str, str]], s3_client: Any
) -> None:
    env = env_for("killed", POGONA_LEASE_TTL_S="6")
    job = Job(env)
    job.wait_for(_is("checkpoint uploaded", checkpoint_phase="full", epoch=2))
    os.killpg(job.proc.pid, signal.SIGKILL)
    job.proc.wait(30)
    # The dead holder's lease still stands: an immediate retry is told to come back later...
    busy = run_cli(["run"], env)
    assert busy.code == 75 and "being trained by another job" in busy.stderr
    time.sleep(7)  # ...and once it expires, the retry takes the run over and resumes it.
    again = run_cli(["run"], env)
    assert again.code == 0, again.stderr[-3000:]
    resumed = [json.loads(x) for x in again.stderr.splitlines() if '"resuming from checkpoint"' in x]
    assert resumed and resumed[0]["from_epoch"] == 3, "lost more than one checkpoint interval"
    _assert_complete(s3_client, "killed")


def test_two_jobs_with_one_run_id_only_one_publishes(env_for: Callable[..., dict[str, str]], s3_client: Any) -> None:
    env = env_for("twins")
    first, second = Job(env), Job(env)
    codes = sorted([first.proc.wait(300), second.proc.wait(300)])
    assert codes == [0, 75], codes
    loser = first if first.proc.returncode == 75 else second
    assert "being trained by another job" in "".join(loser.lines[-3:])
    _assert_complete(s3_client, "twins")
    assert "runs/twins/lease.json" not in {
        o["Key"] for o in s3_client.list_objects_v2(Bucket=BUCKET, Prefix="runs/twins/").get("Contents", [])
    }


STARTED: list[Job] = []


@pytest.fixture(autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    yield
    for job in STARTED:  # a failed test must not leave a job running
        if job.proc.poll() is None:
            os.killpg(job.proc.pid, signal.SIGKILL)
            job.proc.wait()
    STARTED.clear()
    leftover = subprocess.run(["pgrep", "-f", "pogona_job run"], capture_output=True, text=True).stdout.split()
    assert not leftover, f"job processes left behind: {leftover}"
