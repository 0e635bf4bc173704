"""Fencing that the storage enforces: a job that lost the run changes nothing, whatever request it
was paused at; a damaged small JSON read is a transient fault, never "absent".

In-process against SeaweedFS: two Lease objects play the paused job A and the taker B. "Paused
between its check and its request" is reproduced exactly: the hook runs B's whole takeover after
A's lease renewal succeeded and before A's conditional request goes out.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pogona_job.config import Settings
from pogona_job.errors import DatasetError, LeaseLost, TransientFailure
from pogona_job.run import job as jobmod
from pogona_job.run import livestatus, publish
from pogona_job.run.lease import Lease
from pogona_job.run.signals import StopFlag
from pogona_job.run.state import Job, RunRecord
from pogona_job.s3 import pointers, storage
from pogona_job.s3.storage import S3Path
from pogona_job.tools.locals3 import LocalS3
from pogona_job.training import checkpoint
from tests.conftest import BUCKET, ROOT, FaultProxy, job_env, out_key, output_uri
from tests.helpers import JobProcess, run_here

TTL = 1.0


@pytest.fixture()
def run(s3: LocalS3, monkeypatch: pytest.MonkeyPatch) -> S3Path:
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return S3Path(BUCKET, f"fencing-{secrets.token_hex(4)}") / "r"


class FrozenClock:
    """A's own clock, stopped: like a SIGSTOPped process, A does not know its validity ran out."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _paused_holder(s3_client: Any, run: S3Path) -> Lease:
    a = Lease(s3_client, run / "lease.json", TTL, clock=FrozenClock())
    a.acquire("r")
    a._stop.set()  # paused: no heartbeat either
    assert a._thread is not None
    a._thread.join(10)
    return a


def _take_over(s3_client: Any, run: S3Path) -> Lease:
    time.sleep(TTL + 1.2)  # the server's clock must see A's lease expire (1 s Last-Modified resolution)
    b = Lease(s3_client, run / "lease.json", 600)
    b.acquire("r")
    return b


def _pause_after_renewal(
    monkeypatch: pytest.MonkeyPatch, module: Any, name: str, meanwhile: Callable[[], None]
) -> None:
    """The next conditional write through `module.name` first lets `meanwhile` (B's takeover) run."""
    real = getattr(module, name)
    fired: list[bool] = []

    def paused(*args: Any, **kwargs: Any) -> Any:
        if not fired:
            fired.append(True)
            meanwhile()
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, paused)


def _body(s3_client: Any, path: S3Path) -> bytes:
    return bytes(s3_client.get_object(Bucket=path.bucket, Key=path.key)["Body"].read())


def _job(run: S3Path, tmp_path: Path, s3_client: Any, lease: Lease) -> Job:
    tmp_path.mkdir(parents=True, exist_ok=True)
    output = f"s3://{run.bucket}/{run.key.rsplit('/', 1)[0]}"
    settings = Settings(dataset_uri=f"s3://{BUCKET}/datasets/x", output_uri=output, work_dir=tmp_path)
    record = RunRecord(run_id="r", attempt=1, output_uri=output, config={}, model="m", classes=["c"])
    job = Job(settings, "r", 1, s3_client, run, tmp_path, record, StopFlag(25), sums={})
    job.lease = lease
    return job


# --- a paused job that lost the run changes nothing ---------------------------------------------


def test_a_job_paused_at_its_report_put_leaves_the_new_holders_report(
    s3_client: Any, run: S3Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = _paused_holder(s3_client, run)
    report = run / "report.md"
    holder: list[Lease] = []

    def b_takes_over_and_publishes() -> None:
        holder.append(_take_over(s3_client, run))
        holder[0].fenced_put(report, b"B's report")

    _pause_after_renewal(monkeypatch, pointers, "put_bytes", b_takes_over_and_publishes)
    with pytest.raises(LeaseLost):
        a.fenced_put(report, b"A's report")
    assert _body(s3_client, report) == b"B's report"


def test_a_stale_write_that_lands_first_is_replaced_by_the_new_holder(s3_client: Any, run: S3Path) -> None:
    """The one request A had in flight may land before B writes that object: B's write replaces it."""
    a = _paused_holder(s3_client, run)
    a.fenced_put(run / "report.md", b"A's report")  # its renewal went out before B took over
    b = _take_over(s3_client, run)
    b.fenced_put(run / "report.md", b"B's report")
    assert _body(s3_client, run / "report.md") == b"B's report"
    with pytest.raises(LeaseLost):
        a.fenced_put(run / "report.md", b"A again")
    assert _body(s3_client, run / "report.md") == b"B's report"


def test_a_job_paused_at_its_manifest_put_cannot_publish_over_a_takeover(
    s3_client: Any, run: S3Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even when B has published nothing yet: B's claim at the takeover changed the manifest."""
    a = _paused_holder(s3_client, run)
    job_a = _job(run, tmp_path / "a", s3_client, a)
    job_a.record.status = "succeeded"

    def b_takes_over() -> None:
        b = _take_over(s3_client, run)
        publish.claim_run(_job(run, tmp_path / "b", s3_client, b))

    monkeypatch.setattr(publish, "manifest_of", lambda job: {"status": "succeeded", "run_id": "r", "by": "A"})
    monkeypatch.setattr(publish, "render", lambda rec: "A's report")
    monkeypatch.setattr(publish, "advance_latest", lambda *a: pytest.fail("A moved latest.json"))
    _pause_after_renewal(monkeypatch, pointers, "write", b_takes_over)
    with pytest.raises(LeaseLost):
        publish.publish(job_a)
    manifest = json.loads(_body(s3_client, run / "manifest.json"))
    assert manifest["status"] == "interrupted" and manifest["lease_generation"] == 2 and "by" not in manifest


def test_a_failing_job_that_lost_the_run_deletes_nothing_and_exits_75(
    s3_client: Any, run: S3Path, tmp_path: Path
) -> None:
    """A fails for good and is paused while reporting it; B took over and trains: B's gate, sets and
    manifest survive A's failure path, and A exits 75 (not its own failure's code)."""
    a = _paused_holder(s3_client, run)
    job_a = _job(run, tmp_path / "a", s3_client, a)
    b = _take_over(s3_client, run)
    publish.claim_run(_job(run, tmp_path / "b", s3_client, b))
    b.fenced_json(run / "checkpoint" / "gate.json", {"passed": True})
    b.fenced_put(run / "checkpoint/sanity/3-b/last.pt", b"weights")
    before = {o.key: o.etag for o in storage.list_objects(s3_client, run)}
    code = jobmod._finish_failed(job_a, DatasetError("The dataset has no labels."))
    assert code == 75
    after = {o.key: o.etag for o in storage.list_objects(s3_client, run) if not o.key.endswith("lease.json")}
    assert after == {k: v for k, v in before.items() if not k.endswith("lease.json")}


def test_a_stale_checkpoint_pointer_never_replaces_the_new_holders(
    s3_client: Any, run: S3Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A is paused at its pointer PUT (epoch 1) after its guard passed; B trains to epoch 3. A's
    pointer must not land over B's, and A's prune must not touch B's sets."""
    a = _paused_holder(s3_client, run)
    pointer = run / "checkpoint" / "full" / checkpoint.POINTER
    b_sets: list[str] = []

    def b_trains_to_epoch_3() -> None:
        b = _take_over(s3_client, run)
        sync = checkpoint.CheckpointSync(s3_client, run, tmp_path / "b", guard=b.confirm, tag=b.token)
        for epoch in (1, 2, 3):
            sync.offer("full", epoch, 5, _weights(tmp_path / "b-save", epoch), {})
            assert sync.flush(30)
        sync.close()
        b_sets.extend(f"{e}-{b.token}" for e in (2, 3))

    sync_a = checkpoint.CheckpointSync(s3_client, run, tmp_path / "a", guard=a.confirm, tag=a.token)
    _pause_after_renewal(monkeypatch, checkpoint.pointers, "write", b_trains_to_epoch_3)
    sync_a.offer("full", 1, 5, _weights(tmp_path / "a-save", 1), {})
    with pytest.raises(LeaseLost):
        sync_a.flush(60)
    sync_a.close()
    assert json.loads(_body(s3_client, pointer))["set"] == b_sets[-1]
    restored = checkpoint.restore(s3_client, run, "full", tmp_path / "restored")
    assert restored is not None and restored.epoch == 3
    names = {o.rel.split("/")[0] for o in storage.list_objects(s3_client, run / "checkpoint" / "full")}
    assert set(b_sets) <= names


def _weights(save_dir: Path, epoch: int) -> Path:
    (save_dir / "weights").mkdir(parents=True, exist_ok=True)
    (save_dir / "weights" / "last.pt").write_bytes(f"last {epoch}".encode())
    (save_dir / "weights" / "best.pt").write_bytes(f"best {epoch}".encode())
    (save_dir / "results.csv").write_text("epoch,loss\n" + "".join(f"{e},0.{e}\n" for e in range(1, epoch + 1)))
    return save_dir


def test_live_status_of_a_job_that_lost_the_run_is_not_rewritten(s3_client: Any, run: S3Path) -> None:
    """progress.json is fenced too: after B's clean-up, A's stale heartbeat does not bring it back."""
    a = _paused_holder(s3_client, run)
    b = _take_over(s3_client, run)
    b.fenced_json(run / livestatus.PROGRESS, {"by": "B"})
    b.fenced_delete_key(run / livestatus.PROGRESS)
    with pytest.raises(LeaseLost):
        a.fenced_json(run / livestatus.PROGRESS, {"by": "A"})
    assert storage.head(s3_client, run / livestatus.PROGRESS) is None


# --- a damaged read is a transient fault ---------------------------------------------------------


SMALL = ("lease.json", "checkpoint/full/pointer.json", "checkpoint/gate.json", "checkpoint/accounting.json")
SMALL += ("manifest.json", "../latest.json", "../champion.json")


@pytest.fixture()
def flipper(s3: LocalS3, tmp_path: Path) -> Iterator[Callable[..., FaultProxy]]:
    started: list[FaultProxy] = []

    def start(match: str, **env: str) -> FaultProxy:
        started.append(FaultProxy(s3.endpoint, "flip:1.0", tmp_path, match=match, env=env))
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()


def _client_via(s3: LocalS3, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
    return storage.make_client(threads=2, max_attempts=2)


def test_one_flipped_byte_in_each_small_json_is_read_again_not_taken_as_absent(
    s3: LocalS3, s3_client: Any, run: S3Path, flipper: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = {}
    for i, name in enumerate(SMALL):
        path = S3Path(run.bucket, os.path.normpath(f"{run.key}/{name}"))
        values[path] = {"name": name, "finished_at": f"2026-01-0{i + 1}"}
        if i % 2:
            storage.put_json(s3_client, path, values[path])  # with our sha256
        else:  # as an older version wrote it: only the ETag (the body's MD5) to check against
            s3_client.put_object(Bucket=path.bucket, Key=path.key, Body=json.dumps(values[path]).encode())
    proxy = flipper(r"^GET .*\.json", FAULTS_ONCE="1")
    client = _client_via(s3, proxy, monkeypatch)
    for path, value in values.items():
        assert pointers.read(client, path).value == value
    assert len(proxy.faults()) == len(SMALL)


def test_a_latest_json_that_keeps_coming_back_damaged_is_left_alone_and_ends_75(
    s3: LocalS3, s3_client: Any, run: S3Path, flipper: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry of an older run must not move latest.json backwards over a read it could not trust."""
    output = S3Path(run.bucket, run.key.rsplit("/", 1)[0])
    newest = {"run_id": "newest", "finished_at": "2026-12-01T00:00:00+00:00"}
    storage.put_json(s3_client, output / "latest.json", newest)
    before = _body(s3_client, output / "latest.json")
    client = _client_via(s3, flipper(r"^GET .*/latest\.json"), monkeypatch)
    with pytest.raises(TransientFailure):
        publish.advance_latest(client, output, {"run_id": "older", "finished_at": "2026-01-01T00:00:00+00:00"})
    assert _body(s3_client, output / "latest.json") == before


def test_a_damaged_checkpoint_pointer_is_75_and_deletes_nothing(
    s3: LocalS3, s3_client: Any, run: S3Path, tmp_path: Path, flipper: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync = checkpoint.CheckpointSync(s3_client, run, tmp_path / "stage", tag="t1")
    sync.offer("full", 1, 3, _weights(tmp_path / "save", 1), {})
    assert sync.flush(30)
    sync.close()
    before = {o.key for o in storage.list_objects(s3_client, run)}
    client = _client_via(s3, flipper(r"^GET .*/pointer\.json"), monkeypatch)
    with pytest.raises(TransientFailure):
        checkpoint.restore(client, run, "full", tmp_path / "restored")
    assert {o.key for o in storage.list_objects(s3_client, run)} == before


def test_a_damaged_lease_read_is_not_a_reason_to_take_the_run_over(
    s3: LocalS3, s3_client: Any, run: S3Path, flipper: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = Lease(s3_client, run / "lease.json", 600)
    holder.acquire("r")
    client = _client_via(s3, flipper(r"^GET .*/lease\.json"), monkeypatch)
    with pytest.raises(TransientFailure):
        Lease(client, run / "lease.json", 600).acquire("r")
    assert json.loads(_body(s3_client, run / "lease.json"))["holder"] == holder.token
    holder.release()


# --- the rest of the run's life ------------------------------------------------------------------


def test_runs_watch_trusts_a_final_manifest_over_a_leftover_progress_json() -> None:
    stale_progress = {"heartbeat_ts": 1.0, "interval_s": 1, "phase": "push"}
    line = livestatus.status_of(stale_progress, {"status": "succeeded"}, now=time.time())
    assert line["state"] == "succeeded" and line["final"]
    resumed = livestatus.status_of(
        {"heartbeat_ts": time.time(), "interval_s": 5}, {"status": "interrupted"}, time.time()
    )
    assert resumed["state"] == "running"  # an earlier attempt's manifest: this attempt's progress counts


def test_multipart_uploads_left_by_a_killed_upload_are_aborted_at_start(s3_client: Any, run: S3Path) -> None:
    key = f"{run.key}/weights/best.pt"
    upload = s3_client.create_multipart_upload(Bucket=run.bucket, Key=key)
    s3_client.upload_part(Bucket=run.bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1024)
    assert storage.abort_multipart_uploads(s3_client, run) == 1
    left = s3_client.list_multipart_uploads(Bucket=run.bucket, Prefix=f"{run.key}/").get("Uploads", [])
    assert left == []


def test_a_re_push_after_a_killed_push_leaves_no_open_multipart_upload(
    s3_client: Any, run: S3Path, tmp_path: Path
) -> None:
    key = f"{run.key}/data/images/big.jpg"
    upload = s3_client.create_multipart_upload(Bucket=run.bucket, Key=key)
    s3_client.upload_part(Bucket=run.bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1024)
    (tmp_path / "src" / "images").mkdir(parents=True)
    (tmp_path / "src" / "images" / "big.jpg").write_bytes(b"y" * 2048)
    storage.push_tree(s3_client, tmp_path / "src", run / "data", threads=2)
    left = s3_client.list_multipart_uploads(Bucket=run.bucket, Prefix=f"{run.key}/").get("Uploads", [])
    assert left == []


def test_a_sigterm_checkpoints_the_last_completed_epoch_despite_the_minimum_interval(
    s3_client: Any, run: S3Path, tmp_path: Path
) -> None:
    sync = checkpoint.CheckpointSync(s3_client, run, tmp_path / "stage", min_interval_s=3600, tag="t1")
    save = tmp_path / "save"
    for epoch in (1, 2, 3):
        sync.offer("full", epoch, 10, _weights(save, epoch), {})
    assert sync.flush(30) and sync.uploaded == [("full", 1)]  # 2 and 3 fell inside the interval
    assert sync.offer_last_completed() == 3
    assert sync.flush(30) and sync.uploaded[-1] == ("full", 3)
    sync.close()
    pointer = json.loads(_body(s3_client, run / "checkpoint/full/pointer.json"))
    assert pointer["epoch"] == 3
    job = _job(run, tmp_path, s3_client, None)  # type: ignore[arg-type]
    job.checkpoints = sync
    # The default POGONA_SANITY_EPOCHS is 3: epoch 3 of the one training is its last sanity epoch.
    assert "the checkpoint of sanity epoch 3:" in publish._saved_sentence(job)


_SIGNALS = """
import os, signal, sys, time
from pogona_job.run.signals import StopFlag
flag = StopFlag(60)
flag.on_force = lambda: open(sys.argv[1], "w").write("released")
flag.install()
os.kill(os.getpid(), signal.SIGTERM); os.kill(os.getpid(), signal.SIGTERM)  # forwarded by a wrapper
time.sleep(0.3)
print("alive", flag.requested_at is not None, flush=True)
time.sleep(1.2)
os.kill(os.getpid(), signal.SIGTERM)  # a real second signal
time.sleep(5)
print("not exited", flush=True)
"""


def test_a_signal_delivered_twice_at_once_counts_once_and_a_forced_exit_releases_the_lease(tmp_path: Path) -> None:
    marker = tmp_path / "released"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _SIGNALS, str(marker)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.splitlines()[0] == "alive True", done.stderr
    assert done.returncode == 143 and "not exited" not in done.stdout
    assert marker.read_text() == "released"


# --- the harness with real jobs: pause one at a chosen request, take over, continue it ------------


def _objects(s3_client: Any, prefix: str) -> dict[str, str]:
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


# A's own settings: publishing its success, or reporting a failure nobody resumes (the gate
# cannot pass: exit 5 and its failure path deletes the checkpoints).
PAUSED_AT = {"its success": {}, "its failure report": {"POGONA_GATE_MIN_MAP50": "1.0"}}


@pytest.mark.parametrize("publishing", list(PAUSED_AT))
def test_a_job_paused_at_its_report_and_continued_after_a_takeover_exits_75_having_changed_nothing(
    publishing: str, s3: LocalS3, s3_client: Any, demo_uri: str, tmp_path: Path
) -> None:
    """Job A is held at its PUT of report.md and SIGSTOPped past its lease TTL; job B takes the run
    over and succeeds; A is continued and its held request released. Before the fix A logged
    `run succeeded`, exited 0 and its report.md replaced B's; a failing A deleted B's checkpoints
    and published `failed`."""
    release = tmp_path / "release"
    pause = {"PAUSE_MATCH": r"^PUT .*/paused/report\.md", "PAUSE_RELEASE": str(release)}
    proxy = FaultProxy(s3.endpoint, "", tmp_path, addon="pause_addon.py", env=pause)
    output = output_uri(tmp_path)
    common = {"POGONA_DATASET_URI": demo_uri, "POGONA_RUN_ID": "paused", "POGONA_OUTPUT_URI": output}
    own = {**PAUSED_AT[publishing], "POGONA_LEASE_TTL_S": "8", "AWS_ENDPOINT_URL_S3": proxy.endpoint}
    env_a = job_env(s3, tmp_path / "a", **common, **own)
    a = JobProcess(env_a, log=tmp_path / "a.log").proc
    try:
        deadline = time.monotonic() + 600
        while "PAUSED " not in proxy.log.read_text(errors="replace"):
            assert a.poll() is None and time.monotonic() < deadline, (tmp_path / "a.log").read_text()[-3000:]
            time.sleep(0.5)
        os.killpg(a.pid, signal.SIGSTOP)
        time.sleep(9)  # past A's TTL on the server's clock
        b = run_here(["run"], job_env(s3, tmp_path / "b", **common))
        assert b.code == 0, b.stderr[-3000:]
        run = out_key(common | {"POGONA_OUTPUT_URI": output}, "paused") + "/"
        after_b = _objects(s3_client, run)
        latest = _body(s3_client, S3Path(BUCKET, out_key({"POGONA_OUTPUT_URI": output}, "latest.json")))
        os.killpg(a.pid, signal.SIGCONT)
        release.touch()
        assert a.wait(180) == 75, (tmp_path / "a.log").read_text()[-3000:]
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
            a.wait()
        proxy.stop()
    a_log = (tmp_path / "a.log").read_text()
    assert "run succeeded" not in a_log and "lost the lease" in a_log.strip().splitlines()[-1]
    if PAUSED_AT[publishing]:  # it was reporting its own failure (the gate) when it was paused
        assert '"exit_code": 5' in a_log and "failure report pushed" not in a_log
    assert _objects(s3_client, run) == after_b  # not one object written or deleted by A
    assert _body(s3_client, S3Path(BUCKET, out_key({"POGONA_OUTPUT_URI": output}, "latest.json"))) == latest
    manifest = json.loads(_body(s3_client, S3Path(BUCKET, run + "manifest.json")))
    assert manifest["status"] == "succeeded"
    for key, meta in manifest["artifacts"].items():
        assert hashlib.sha256(_body(s3_client, S3Path(BUCKET, run + key))).hexdigest() == meta["sha256"], key


def test_the_ddp_rank_0_checkpoints_follow_the_jobs_spec_and_stop_when_the_lease_is_taken(
    s3_client: Any, run: S3Path, tmp_path: Path
) -> None:
    """Rank 0 once built its own sync from a hand-copied dict: default attempt limit, no lease guard,
    plain `<epoch>/` keys. Now it is the job's own spec, sent to the workers as JSON."""
    holder = Lease(s3_client, run / "lease.json", 600)
    holder.acquire("r")
    job_sync = checkpoint.CheckpointSync(
        s3_client, run, tmp_path / "job", every_epochs=2, min_interval_s=7, guard=holder.confirm,
        tag=holder.token, lease=holder.path, max_attempts=3,
    )  # fmt: skip
    rank0 = checkpoint.CheckpointSync.from_spec(json.loads(json.dumps(job_sync.spec())), tmp_path / "rank0")
    job_sync.close()
    assert (rank0.run, rank0.every_epochs, rank0.min_interval_s) == (run, 2, 7)
    assert (rank0.tag, rank0.lease, rank0.max_attempts) == (holder.token, holder.path, 3)
    assert rank0.client.meta.config.retries["total_max_attempts"] == 4  # botocore counts the first try too
    rank0.offer("full", 2, 4, _weights(tmp_path / "save", 2), {})
    assert rank0.flush(30)
    assert storage.head(s3_client, run / f"checkpoint/full/2-{holder.token}/last.pt") is not None
    taker = {"holder": "taker", "run_id": "r", "ttl_s": 600, "beat": 1}
    assert pointers.write(s3_client, run / "lease.json", taker, expected=holder.etag)
    rank0.offer("full", 4, 4, _weights(tmp_path / "save", 4), {})
    with pytest.raises(LeaseLost):
        rank0.flush(30)
    rank0.close()
    assert json.loads(_body(s3_client, run / "checkpoint/full/pointer.json"))["epoch"] == 2


def test_a_job_whose_every_small_json_read_comes_back_damaged_once_completes_and_its_retry_changes_nothing(
    s3: LocalS3, s3_client: Any, demo_uri: str, tmp_path: Path
) -> None:
    """Before: a flipped byte in the pointer was exit 6 and the failure path deleted every checkpoint;
    in latest.json or champion.json it was read as absent and overwritten."""
    proxy = FaultProxy(s3.endpoint, "flip:1.0", tmp_path, match=r"^GET [^?]*\.json(\?|$)", env={"FAULTS_ONCE": "1"})
    output = output_uri(tmp_path)
    common = {"POGONA_DATASET_URI": demo_uri, "POGONA_RUN_ID": "flipped", "POGONA_OUTPUT_URI": output}
    # The live status rewrites accounting.json (a read, then a CAS) every interval: short, so that a fast
    # run still reads it back at least once and the flip can land on it.
    common["POGONA_PROGRESS_INTERVAL_S"] = "0.5"
    try:
        first = run_here(["run"], job_env(s3, tmp_path / "m1", **common, AWS_ENDPOINT_URL_S3=proxy.endpoint))
        assert first.code == 0, first.stderr[-3000:]
        base = {"POGONA_OUTPUT_URI": output}
        pointers_after = {k: _body(s3_client, S3Path(BUCKET, out_key(base, k))) for k in ("latest.json",)}
        run = out_key(base, "flipped") + "/"
        objects = _objects(s3_client, run)
        again = run_here(["run"], job_env(s3, tmp_path / "m2", **common, AWS_ENDPOINT_URL_S3=proxy.endpoint))
        assert again.code == 0 and "already succeeded" in again.stderr, again.stderr[-3000:]
    finally:
        proxy.stop()
    flipped = {line.split()[-1].rsplit("/", 1)[-1] for line in proxy.faults()}
    assert {"manifest.json", "pointer.json", "accounting.json", "latest.json"} <= flipped, flipped
    assert _objects(s3_client, run) == objects
    assert {k: _body(s3_client, S3Path(BUCKET, out_key(base, k))) for k in pointers_after} == pointers_after
    manifest = json.loads(_body(s3_client, S3Path(BUCKET, run + "manifest.json")))
    assert manifest["status"] == "succeeded"
    for key, meta in manifest["artifacts"].items():
        assert hashlib.sha256(_body(s3_client, S3Path(BUCKET, run + key))).hexdigest() == meta["sha256"], key
