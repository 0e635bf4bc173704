"""Preemption: SIGTERM in any phase takes the graceful path (exit 143, an interrupted report, the
checkpoint kept), and a restart with the same run id ON A NEW MACHINE (a fresh POGONA_WORK_DIR:
everything comes back from the bucket) completes with every epoch exactly once; kill -9 loses at
most one checkpoint interval; two jobs with one run id never both publish; a job that lost or was
refused the lease writes nothing."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pogona_job.tools.locals3 import LocalS3
from tests.conftest import BUCKET, FaultProxy, job_env, out_key, output_uri
from tests.helpers import JobProcess as Job
from tests.helpers import body as _body
from tests.helpers import run_here

EPOCHS, SANITY = 4, 2  # one training: epochs 1-2 are the sanity epochs, 3-4 full
Event = dict[str, Any]


def _epochs(s3_client: Any, key: str) -> list[int]:
    body = s3_client.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
    return [int(row["epoch"]) for row in csv.DictReader(io.StringIO(body))]


def _assert_complete(s3_client: Any, env: dict[str, str], run: str) -> dict[str, Any]:
    manifest = json.loads(s3_client.get_object(Bucket=BUCKET, Key=out_key(env, run, "manifest.json"))["Body"].read())
    assert manifest["status"] == "succeeded"
    assert {"results.csv", "sanity/results.csv", "weights/best.pt"} <= set(
        manifest["artifacts"]
    )  # whoever uploaded them
    for key, meta in manifest["artifacts"].items():
        body = s3_client.get_object(Bucket=BUCKET, Key=out_key(env, run, key))["Body"].read()
        assert hashlib.sha256(body).hexdigest() == meta["sha256"], key
    assert _epochs(s3_client, out_key(env, run, "results.csv")) == list(range(1, EPOCHS + 1))
    assert _epochs(s3_client, out_key(env, run, "sanity/results.csv")) == list(range(1, SANITY + 1))
    return manifest


@pytest.fixture()
def env_for(s3: LocalS3, demo_uri: str, tmp_path: Path) -> Callable[..., dict[str, str]]:
    machines = iter(range(1000))
    output = output_uri(tmp_path)  # one bucket prefix per test, shared by all its machines

    def make(run: str, **extra: str) -> dict[str, str]:
        """Each call is a new machine: its own empty POGONA_WORK_DIR, so a resume can only come from the bucket."""
        machine = tmp_path / f"machine-{next(machines)}"
        values = {"POGONA_DATASET_URI": demo_uri, "POGONA_RUN_ID": run, "POGONA_EPOCHS": str(EPOCHS)}
        return job_env(s3, machine, **{**values, "POGONA_OUTPUT_URI": output, **extra})

    return make


def _keys(s3_client: Any, prefix: str) -> dict[str, str]:
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def _is(event: str, **fields: Any) -> Callable[[Event], bool]:
    return lambda e: e.get("event") == event and all(e.get(k) == v for k, v in fields.items())


# One run, stopped by SIGTERM once in each phase, in the order a run goes through them: each restart (a new
# machine, the next scheduler attempt) goes further than the one before, so one training serves every phase.
TRIGGERS: dict[str, Callable[[Event], bool]] = {
    "pull": _is("phase started", phase="pull"),
    "stage": _is("phase started", phase="stage"),
    "sanity": _is("epoch", phase="sanity", epoch=1),
    "full": _is("epoch", phase="full", epoch=3),  # the signal then lands early in epoch 4
    "evaluate": _is("phase started", phase="evaluate"),
    "push": _is("phase started", phase="push"),
}
# Where the signal may land: stage is short, so it may already be over when the signal arrives.
LANDS_IN = {"stage": {"stage", "sanity"}}


def test_sigterm_in_each_phase_takes_the_graceful_path_and_each_restart_goes_on_from_there(
    env_for: Callable[..., dict[str, str]], s3: LocalS3, s3_client: Any, tmp_path: Path
) -> None:
    run = "sigterm"
    checkpoint = out_key(env_for(run), run, "checkpoint/full/pointer.json")
    saved_at: int | None = None  # the full epoch the SIGTERM in full saved
    for attempt, (phase, trigger) in enumerate(TRIGGERS.items(), start=1):
        # full: epochs 2-3 fall inside the checkpoint interval; the SIGTERM must save epoch 3 all the same
        extra = {"POGONA_CHECKPOINT_MIN_INTERVAL_S": "3600"} if phase == "full" else {}
        env = env_for(run, AWS_BATCH_JOB_ID="sigterm", AWS_BATCH_JOB_ATTEMPT=str(attempt), **extra)
        proxy = None
        if phase == "push":  # slow weight uploads, so the signal lands while the push is running
            proxy = FaultProxy(s3.endpoint, "slow:1.0", tmp_path, match=r"^PUT .*/weights/", slow_s=3)
            env["AWS_ENDPOINT_URL_S3"] = proxy.endpoint
        try:
            job = Job(env)
            job.wait_for(trigger)
            code = job.signal_and_wait(signal.SIGTERM)
        finally:
            if proxy:
                proxy.stop()
        assert code == 143, f"{phase}: " + job.tail(15)
        # The graceful path, not the forced os._exit(143): it wrote the interrupted report and kept the checkpoint.
        assert any(e.get("event") == "failure report pushed" for e in job.events()), f"{phase}: " + job.tail(15)
        manifest = json.loads(
            s3_client.get_object(Bucket=BUCKET, Key=out_key(env, run, "manifest.json"))["Body"].read()
        )
        assert manifest["status"] == "interrupted"
        assert manifest["failed_phase"] in LANDS_IN.get(phase, {phase}), (phase, manifest["failed_phase"])
        assert "Status: INTERRUPTED" in _body(s3_client, out_key(env, run, "report.md")).decode()
        if phase in ("sanity", "full", "evaluate", "push"):  # one training, one checkpoint phase
            assert checkpoint in _keys(s3_client, out_key(env, run) + "/"), phase
        if phase == "full":
            # The signal lands after epoch 3: the sentence names the last completed epoch, saved despite the
            # interval...
            saved = re.search(r"after saving the checkpoint of full epoch (\d+)", job.lines[-1])
            assert saved and int(saved.group(1)) >= 3, job.lines[-1]
            saved_at = int(saved.group(1))
        if phase == "evaluate" and saved_at is not None and saved_at < EPOCHS:
            # ...and the next attempt resumed right after it, without judging the gate again.
            resumed = [e for e in job.events() if e.get("event") == "resuming from checkpoint"]
            assert resumed and resumed[0]["from_epoch"] == saved_at + 1, job.tail(30)
            assert any(e.get("event") == "sanity gate already passed for this run; not repeated" for e in job.events())

    again = run_here(["run"], env_for(run, AWS_BATCH_JOB_ID="sigterm", AWS_BATCH_JOB_ATTEMPT=str(len(TRIGGERS) + 1)))
    assert again.code == 0, again.stderr[-3000:]
    _assert_complete(s3_client, env_for(run), run)


def test_kill_9_mid_training_resumes_from_the_bucket_on_a_new_machine(
    env_for: Callable[..., dict[str, str]], s3_client: Any
) -> None:
    batch = {"AWS_BATCH_JOB_ID": "killed-job"}
    env = env_for("killed", AWS_BATCH_JOB_ATTEMPT="1", **batch)
    run = out_key(env, "killed") + "/"
    job = Job(env)
    job.wait_for(_is("checkpoint uploaded", checkpoint_phase="full", epoch=3))  # past the gate (epoch 2)
    os.killpg(job.proc.pid, signal.SIGKILL)
    job.wait(30)
    # The dead holder's lease still stands: an unrelated job with the run id is refused, writing nothing...
    before = _keys(s3_client, run)
    busy = run_here(["run"], env_for("killed"))
    assert busy.code == 75 and "being trained by another job" in busy.stderr
    assert _keys(s3_client, run) == before
    # ...while the scheduler's next attempt of the same job takes the dead attempt's lease over at once.
    again = run_here(["run"], env_for("killed", AWS_BATCH_JOB_ATTEMPT="2", **batch))
    assert again.code == 0, again.stderr[-3000:]
    resumed = [json.loads(x) for x in again.stderr.splitlines() if '"resuming from checkpoint"' in x]
    assert resumed and resumed[0]["from_epoch"] == 4, "lost more than one checkpoint interval"
    _assert_complete(s3_client, env, "killed")


def test_a_job_refused_the_lease_writes_nothing_under_the_run(
    env_for: Callable[..., dict[str, str]], s3_client: Any
) -> None:
    from pogona_job.run.lease import Lease
    from pogona_job.s3.storage import S3Path

    env = env_for("held")
    holder = Lease(s3_client, S3Path(BUCKET, out_key(env, "held", "lease.json")), 30)
    holder.acquire("held")  # a live holder, renewing from this process
    try:
        refused = run_here(["run"], env)
        keys = set(_keys(s3_client, out_key(env, "held") + "/"))
    finally:
        holder.release()
    assert refused.code == 75 and "being trained by another job" in refused.stderr.strip().splitlines()[-1]
    # no failed manifest, report or config in a run it does not own
    assert keys == {out_key(env, "held", "lease.json")}, keys


def test_a_holder_whose_lease_is_taken_stops_with_75_and_publishes_nothing(
    env_for: Callable[..., dict[str, str]], s3_client: Any
) -> None:
    from pogona_job.s3 import pointers
    from pogona_job.s3.storage import S3Path

    env = env_for("stolen", POGONA_LEASE_TTL_S="8")
    run = out_key(env, "stolen") + "/"
    job = Job(env)
    job.wait_for(_is("training started", phase="sanity"))
    path = S3Path(BUCKET, run + "lease.json")
    current = pointers.read(s3_client, path)
    thief = {"holder": "thief", "run_id": "stolen", "attempt": 9, "ttl_s": 600, "beat": 1}
    assert pointers.write(s3_client, path, thief, expected=current.etag)  # another job took the run over
    at_theft = _keys(s3_client, run)
    assert job.wait(120) == 75, "".join(job.lines[-15:])
    assert "lost the lease" in job.lines[-1]
    keys = _keys(s3_client, run)
    assert not {run + "report.md", run + "config.json"} & set(keys)
    manifest = pointers.read(s3_client, S3Path(BUCKET, run + "manifest.json")).value or {}
    assert manifest["status"] == "interrupted"  # only the holder's claim at its start: never a result
    assert keys == at_theft  # no checkpoint, no pointer, no progress: no object changed after the theft
    assert pointers.read(s3_client, path).value == thief  # and it did not delete the new holder's lease


def test_two_jobs_with_one_run_id_only_one_publishes(env_for: Callable[..., dict[str, str]], s3_client: Any) -> None:
    env = env_for("twins")
    first, second = Job(env), Job(env_for("twins"))  # two machines, one output prefix
    codes = sorted([first.wait(300), second.wait(300)])
    assert codes == [0, 75], codes
    loser = first if first.proc.returncode == 75 else second
    assert "being trained by another job" in "".join(loser.lines[-3:])
    _assert_complete(s3_client, env, "twins")
    assert out_key(env, "twins", "lease.json") not in _keys(s3_client, out_key(env, "twins") + "/")


@pytest.fixture(autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    """Every job this test started has ended, with its whole process group, when the test ends."""
    yield
    jobs = list(Job.started)
    Job.reap()
    for job in jobs:  # only the jobs this test started (each leads its own process group)
        with pytest.raises(ProcessLookupError):
            os.killpg(job.proc.pid, 0)
