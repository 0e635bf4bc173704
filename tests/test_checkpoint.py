"""Checkpoint sets: a pointer written last names a set whose files restore verifies by hash;
a missing pointer or a damaged file falls back to the previous complete set; results.csv is cut
to the restored epoch; older sets go only after the pointer moved; the interval settings hold."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from pogona_job.errors import LeaseLost, StorageDenied, TransientFailure
from pogona_job.s3 import storage
from pogona_job.s3.storage import S3Path
from pogona_job.tools.locals3 import LocalS3
from pogona_job.training.checkpoint import CheckpointSync, Restored, cut_results, restore
from tests.conftest import BUCKET

HEADER = "                  epoch,  train/box_loss,  metrics/mAP50(B)\n"


@pytest.fixture()
def run(s3: LocalS3, monkeypatch: pytest.MonkeyPatch) -> S3Path:
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return S3Path(BUCKET, f"ckpt-tests/{secrets.token_hex(4)}")


def _train_dir(root: Path, epoch: int, rows_to: int | None = None) -> Path:
    """What ultralytics leaves after `epoch` epochs: weights and one results row per epoch."""
    (root / "weights").mkdir(parents=True, exist_ok=True)
    (root / "weights" / "last.pt").write_bytes(f"last-{epoch}-".encode() * 100)
    (root / "weights" / "best.pt").write_bytes(f"best-{epoch}-".encode() * 100)
    rows = "".join(f"{e:>23},{1 / e:>16.5f},{e / 10:>18.5f}\n" for e in range(1, (rows_to or epoch) + 1))
    (root / "results.csv").write_text(HEADER + rows)
    return root


def _sync(s3_client: Any, run: S3Path, tmp_path: Path, **kw: Any) -> CheckpointSync:
    return CheckpointSync(s3_client, run, tmp_path / "staging", **{"min_interval_s": 0.0, **kw})


def _offer_epochs(sync: CheckpointSync, tmp_path: Path, epochs: range, total: int) -> None:
    for epoch in epochs:
        sync.offer("full", epoch, total, _train_dir(tmp_path / "train", epoch), {"attempt": 1})
        assert sync.flush(60)


def _keys(s3_client: Any, run: S3Path) -> set[str]:
    return {o.rel for o in storage.list_objects(s3_client, run)}


def _epochs_in(path: Path) -> list[int]:
    return [int(line.split(",")[0]) for line in path.read_text().splitlines()[1:]]


def test_each_checkpoint_is_a_set_named_by_the_pointer_and_one_fallback_is_kept(
    s3_client: Any, run: S3Path, tmp_path: Path
) -> None:
    sync = _sync(s3_client, run, tmp_path)
    _offer_epochs(sync, tmp_path, range(1, 4), total=5)
    sync.close()
    sets = {f"checkpoint/full/{e}/{n}" for e in (2, 3) for n in ("last.pt", "best.pt", "results.csv", "set.json")}
    assert _keys(s3_client, run) == sets | {"checkpoint/full/pointer.json"}  # set 1 went once the pointer moved
    pointer = storage.get_json(s3_client, run / "checkpoint/full/pointer.json")
    assert pointer and pointer["set"] == "3" and pointer["epoch"] == 3
    for name, meta in pointer["files"].items():
        body = s3_client.get_object(Bucket=BUCKET, Key=f"{run.key}/checkpoint/full/3/{name}")["Body"].read()
        assert (len(body), hashlib.sha256(body).hexdigest()) == (meta["size"], meta["sha256"]), name


def test_restore_downloads_the_pointed_set_into_a_fresh_dir(s3_client: Any, run: S3Path, tmp_path: Path) -> None:
    sync = _sync(s3_client, run, tmp_path)
    _offer_epochs(sync, tmp_path, range(1, 4), total=5)
    sync.close()
    fresh = tmp_path / "new-machine" / "full"
    restored = restore(s3_client, run, "full", fresh)
    assert restored is not None and (restored.epoch, restored.epochs, restored.resumable) == (3, 5, True)
    assert (fresh / "weights" / "last.pt").read_bytes() == b"last-3-" * 100
    assert (fresh / "weights" / "best.pt").read_bytes() == b"best-3-" * 100
    assert _epochs_in(fresh / "results.csv") == [1, 2, 3]


def test_a_damaged_file_falls_back_to_the_previous_complete_set(s3_client: Any, run: S3Path, tmp_path: Path) -> None:
    sync = _sync(s3_client, run, tmp_path)
    _offer_epochs(sync, tmp_path, range(1, 4), total=5)
    sync.close()
    key = f"{run.key}/checkpoint/full/3/last.pt"
    body = bytearray(s3_client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[10] ^= 0xFF  # one flipped byte, same length
    s3_client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    fresh = tmp_path / "fresh"
    restored = restore(s3_client, run, "full", fresh)
    assert restored is not None and restored.epoch == 2
    assert (fresh / "weights" / "last.pt").read_bytes() == b"last-2-" * 100
    assert _epochs_in(fresh / "results.csv") == [1, 2]


def test_without_a_pointer_the_newest_complete_set_is_used_and_an_incomplete_one_is_not(
    s3_client: Any, run: S3Path, tmp_path: Path
) -> None:
    sync = _sync(s3_client, run, tmp_path)
    _offer_epochs(sync, tmp_path, range(1, 3), total=5)
    sync.close()
    s3_client.delete_object(Bucket=BUCKET, Key=f"{run.key}/checkpoint/full/pointer.json")
    # a kill in the middle of set 3: its last.pt is stored, its set.json never was
    s3_client.put_object(Bucket=BUCKET, Key=f"{run.key}/checkpoint/full/3/last.pt", Body=b"half")
    restored = restore(s3_client, run, "full", tmp_path / "fresh")
    assert restored is not None and restored.epoch == 2
    assert (tmp_path / "fresh" / "weights" / "last.pt").read_bytes() == b"last-2-" * 100


def test_no_checkpoint_restores_nothing_and_clears_what_a_dead_attempt_left_locally(
    s3_client: Any, run: S3Path, tmp_path: Path
) -> None:
    stale = _train_dir(tmp_path / "stale", 4)
    assert restore(s3_client, run, "full", stale) is None
    assert not (stale / "results.csv").exists()  # else ultralytics would append after its rows


def test_a_set_whose_results_csv_ran_ahead_of_its_last_pt_is_cut_on_restore(
    s3_client: Any, run: S3Path, tmp_path: Path
) -> None:
    """The review's 1,2,3,2,3: rows beyond the restored last.pt's epoch must not survive a resume."""
    sync = _sync(s3_client, run, tmp_path)
    sync.offer("full", 2, 5, _train_dir(tmp_path / "train", 2, rows_to=3), {})
    assert sync.flush(60)
    sync.close()
    restored = restore(s3_client, run, "full", tmp_path / "fresh")
    assert restored is not None and restored.epoch == 2
    assert _epochs_in(tmp_path / "fresh" / "results.csv") == [1, 2]


def test_results_csv_is_cut_to_the_restored_epoch(tmp_path: Path) -> None:
    path = _train_dir(tmp_path, 5) / "results.csv"
    cut_results(path, 3)
    assert _epochs_in(path) == [1, 2, 3]
    assert path.read_text().startswith(HEADER)


def test_every_n_epochs_and_the_final_one_are_uploaded(s3_client: Any, run: S3Path, tmp_path: Path) -> None:
    sync = _sync(s3_client, run, tmp_path, every_epochs=2)
    _offer_epochs(sync, tmp_path, range(1, 6), total=5)
    sync.close()
    assert sync.uploaded == [("full", 2), ("full", 4), ("full", 5)]


def test_min_interval_skips_epochs_but_never_the_final_one(s3_client: Any, run: S3Path, tmp_path: Path) -> None:
    sync = _sync(s3_client, run, tmp_path, min_interval_s=3600.0)
    _offer_epochs(sync, tmp_path, range(1, 5), total=4)
    sync.close()
    assert sync.uploaded == [("full", 1), ("full", 4)]


def test_a_pointer_that_may_not_be_written_is_an_error_not_a_log_line(
    s3_client: Any, run: S3Path, tmp_path: Path
) -> None:
    calls: list[int] = []

    def lost() -> None:  # held while the set uploads, lost by the time the pointer would be written
        calls.append(1)
        if len(calls) > 1:
            raise LeaseLost("lost the lease")

    sync = _sync(s3_client, run, tmp_path, guard=lost)
    sync.offer("full", 1, 3, _train_dir(tmp_path / "train", 1), {})
    with pytest.raises(LeaseLost):
        sync.flush(60)
    with pytest.raises(LeaseLost):  # and the trainer hears of it at its next epoch
        sync.offer("full", 2, 3, _train_dir(tmp_path / "train", 2), {})
    sync.close()
    assert "checkpoint/full/pointer.json" not in _keys(s3_client, run)
    assert restore(s3_client, run, "full", tmp_path / "fresh") is not None  # the stored set is complete


def test_close_waits_for_the_upload_in_flight_so_nothing_lands_after_it(
    s3_client: Any, run: S3Path, tmp_path: Path
) -> None:
    sync = _sync(s3_client, run, tmp_path)
    sync.offer("full", 1, 1, _train_dir(tmp_path / "train", 1), {})
    sync.close()  # the worker either uploaded set 1 whole or dropped it: nothing is still running
    assert not any(t.name == "checkpoint-sync" and t.is_alive() for t in __import__("threading").enumerate())
    expected = {f"checkpoint/full/1/{n}" for n in ("last.pt", "best.pt", "results.csv", "set.json")}
    expected |= {"checkpoint/full/pointer.json"}
    assert _keys(s3_client, run) == (expected if sync.uploaded else set())


# --- the rules at their edges ---------------------------------------------------------------------------------


def _upload_sets(s3_client: Any, run: S3Path, tmp_path: Path, epochs: range, total: int = 5, **kw: Any) -> None:
    sync = _sync(s3_client, run, tmp_path, **kw)
    _offer_epochs(sync, tmp_path, epochs, total)
    sync.close()


def _pointer(s3_client: Any, run: S3Path) -> dict[str, Any]:
    pointer = storage.get_json(s3_client, run / "checkpoint/full/pointer.json")
    assert pointer is not None
    return pointer


def _write_set(s3_client: Any, run: S3Path, tmp_path: Path, epoch: int) -> None:
    """A complete set (files and set.json) that no pointer names: a kill between its set.json and the pointer."""
    train = _train_dir(tmp_path / f"unpointed-{epoch}", epoch)
    files = {}
    for local, name in (("weights/last.pt", "last.pt"), ("weights/best.pt", "best.pt"), ("results.csv", "results.csv")):
        body = (train / local).read_bytes()
        s3_client.put_object(Bucket=BUCKET, Key=f"{run.key}/checkpoint/full/{epoch}/{name}", Body=body)
        files[name] = {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
    entry = {"phase": "full", "epoch": epoch, "epochs": 5, "set": str(epoch), "files": files}
    storage.put_json(s3_client, run / f"checkpoint/full/{epoch}/set.json", entry)


def _damage(s3_client: Any, key: str) -> None:
    body = bytearray(s3_client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[3] ^= 0xFF
    s3_client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))


def test_a_complete_set_newer_than_the_pointer_is_never_restored(s3_client: Any, run: S3Path, tmp_path: Path) -> None:
    """Its writer never named it (killed, or it lost the run): the pointer's set, else an older one, is the truth."""
    _upload_sets(s3_client, run, tmp_path, range(1, 3))
    _write_set(s3_client, run, tmp_path, 3)
    assert (restore(s3_client, run, "full", tmp_path / "a") or Restored(0, 0, False)).epoch == 2
    _damage(s3_client, f"{run.key}/checkpoint/full/2/last.pt")
    assert (restore(s3_client, run, "full", tmp_path / "b") or Restored(0, 0, False)).epoch == 1


def test_a_set_whose_listed_file_is_gone_or_that_lists_no_last_pt_is_passed_over(
    s3_client: Any, run: S3Path, tmp_path: Path
) -> None:
    _upload_sets(s3_client, run, tmp_path, range(1, 4))
    s3_client.delete_object(Bucket=BUCKET, Key=f"{run.key}/checkpoint/full/3/best.pt")
    assert (restore(s3_client, run, "full", tmp_path / "a") or Restored(0, 0, False)).epoch == 2
    entry = storage.get_json(s3_client, run / "checkpoint/full/2/set.json")
    assert entry is not None
    del entry["files"]["last.pt"]  # nothing to resume from
    storage.put_json(s3_client, run / "checkpoint/full/2/set.json", entry)
    assert restore(s3_client, run, "full", tmp_path / "b") is None  # set 1 was pruned when 3 was named


def test_the_last_epochs_set_restores_as_not_resumable(s3_client: Any, run: S3Path, tmp_path: Path) -> None:
    _upload_sets(s3_client, run, tmp_path, range(1, 4), total=3)
    assert restore(s3_client, run, "full", tmp_path / "fresh") == Restored(3, 3, resumable=False)


def test_a_download_refused_after_the_listing_is_a_storage_error_naming_the_file(
    s3_client: Any, run: S3Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from botocore.exceptions import ClientError

    _upload_sets(s3_client, run, tmp_path, range(1, 2))

    def refused(*args: Any, **kwargs: Any) -> None:
        raise ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject")

    monkeypatch.setattr(s3_client, "download_file", refused)
    with pytest.raises(StorageDenied) as err:
        restore(s3_client, run, "full", tmp_path / "fresh")
    said = rf"The bucket '{BUCKET}' refused access \(AccessDenied\) while restoring the checkpoint (last|best)\.pt: "
    assert re.match(said, err.value.sentence), err.value.sentence


def test_uploads_and_restores_are_logged_with_their_set(s3_client: Any, run: S3Path, tmp_path: Path) -> None:
    with capture_logs() as logs:
        _upload_sets(s3_client, run, tmp_path, range(1, 4))
        _damage(s3_client, f"{run.key}/checkpoint/full/3/last.pt")
        restore(s3_client, run, "full", tmp_path / "fresh")
    uploaded = [e for e in logs if e["event"] == "checkpoint uploaded"]
    assert [(e["checkpoint_phase"], e["epoch"], e["pruned_sets"]) for e in uploaded] == [
        ("full", 1, 0),
        ("full", 2, 0),
        ("full", 3, 1),
    ]
    assert all(isinstance(e["seconds"], float) and 0 <= e["seconds"] < 60 for e in uploaded)
    assert all(e["seconds"] == round(e["seconds"], 2) for e in uploaded)
    said = [(e["event"], e.get("file"), e.get("set")) for e in logs if e["log_level"] != "info"]
    assert said == [
        ("checkpoint file does not match its recorded hash", f"{run.uri}/checkpoint/full/3/last.pt", None),
        ("checkpoint set failed verification; trying the previous one", None, "3"),
    ]
    (restored,) = [e for e in logs if e["event"] == "checkpoint restored"]
    assert restored == {
        "event": "checkpoint restored",
        "log_level": "info",
        "checkpoint_phase": "full",
        "epoch": 2,
        "set": f"{run.uri}/checkpoint/full/2",
    }


def test_a_holders_sets_carry_its_token_and_its_pruning_asks_the_guard_first(
    s3_client: Any, run: S3Path, tmp_path: Path
) -> None:
    calls: list[int] = []

    def guard() -> None:  # lost once the third set is named, before anything is deleted
        calls.append(1)
        if len(calls) > 2 * 2 + 2:  # sets 1 and 2: the upload and the pointer each ask once; set 3 the same
            raise LeaseLost("lost the lease")

    sync = _sync(s3_client, run, tmp_path, tag="t7", guard=guard)
    _offer_epochs(sync, tmp_path, range(1, 3), total=5)
    sync.offer("full", 3, 5, _train_dir(tmp_path / "train", 3), {})
    with pytest.raises(LeaseLost):
        sync.flush(60)
    sync.close()
    names = {"last.pt", "best.pt", "results.csv", "set.json"}
    expected = {f"checkpoint/full/{e}-t7/{n}" for e in (1, 2, 3) for n in names} | {"checkpoint/full/pointer.json"}
    assert _keys(s3_client, run) == expected  # set 1 is still there: the guard said no before the delete
    assert _pointer(s3_client, run)["set"] == "3-t7"


def test_a_pointer_that_keeps_changing_under_another_writer_is_given_up_after_ten_tries(
    s3_client: Any, run: S3Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pogona_job.s3 import pointers
    from pogona_job.training import checkpoint

    tries: list[int] = []

    def lost_race(*args: Any, **kwargs: Any) -> bool:
        tries.append(1)
        return False

    monkeypatch.setattr(checkpoint.pointers, "write", lost_race)
    assert checkpoint.pointers is pointers
    sync = _sync(s3_client, run, tmp_path)
    sync.offer("full", 1, 3, _train_dir(tmp_path / "train", 1), {})
    with pytest.raises(TransientFailure) as err:
        sync.flush(60)
    sync.close()
    assert len(tries) == 10
    assert err.value.sentence == (
        f"{run.uri}/checkpoint/full/pointer.json kept changing under another writer; retry the job."
    )


def test_flush_waits_for_the_upload_in_flight_until_its_timeout_and_no_longer(
    s3_client: Any, run: S3Path, tmp_path: Path
) -> None:
    release = threading.Event()
    sync = _sync(s3_client, run, tmp_path, guard=lambda: release.wait(5) and None)
    sync.offer("full", 1, 3, _train_dir(tmp_path / "train", 1), {})
    started = time.monotonic()
    assert sync.flush(0.5) is False
    waited = time.monotonic() - started
    release.set()
    assert 0.45 <= waited < 4
    assert sync.flush(60) is True
    sync.close()


def test_the_uploads_run_on_one_daemon_thread_named_for_them(s3_client: Any, run: S3Path, tmp_path: Path) -> None:
    """A daemon: an upload hung on the network never keeps the process from exiting."""
    before = set(threading.enumerate())
    sync = _sync(s3_client, run, tmp_path)
    started = [t for t in threading.enumerate() if t not in before]
    assert [(t.name, t.daemon) for t in started] == [("checkpoint-sync", True)]
    sync.close()


def test_a_staging_folder_a_dead_attempt_left_is_replaced(s3_client: Any, run: S3Path, tmp_path: Path) -> None:
    stale = tmp_path / "staging" / "full-1"
    stale.mkdir(parents=True)
    (stale / "last.pt").write_bytes(b"a dead attempt's weights")
    (stale / "other.bin").write_bytes(b"junk")
    sync = _sync(s3_client, run, tmp_path)
    sync.offer("full", 1, 3, _train_dir(tmp_path / "train", 1), {})
    assert sync.flush(60)
    sync.close()
    assert set(_pointer(s3_client, run)["files"]) == {"last.pt", "best.pt", "results.csv"}
    restored = tmp_path / "fresh"
    restore(s3_client, run, "full", restored)
    assert (restored / "weights" / "last.pt").read_bytes() == b"last-1-" * 100


def test_on_a_stop_the_last_epoch_the_interval_skipped_is_offered_once(
    s3_client: Any, run: S3Path, tmp_path: Path
) -> None:
    sync = _sync(s3_client, run, tmp_path, every_epochs=3)
    assert sync.offer_last_completed() is None  # nothing offered yet
    _offer_epochs(sync, tmp_path, range(1, 4), total=9)
    assert sync.offer_last_completed() is None  # epoch 3 was taken: nothing skipped since
    sync.offer("full", 4, 9, _train_dir(tmp_path / "train", 4), {"attempt": 2})
    sync.offer("full", 5, 9, _train_dir(tmp_path / "train", 5), {"attempt": 2})
    assert sync.offer_last_completed() == 5
    assert sync.flush(60) and sync.uploaded == [("full", 3), ("full", 5)]
    assert sync.offer_last_completed() is None  # once
    pointer = _pointer(s3_client, run)
    assert (pointer["epoch"], pointer["epochs"], pointer["attempt"]) == (5, 9, 2)
    sync.offer("full", 7, 9, _train_dir(tmp_path / "train", 7), {})  # skipped
    sync.close()
    assert sync.offer_last_completed() is None  # closed: nothing more is uploaded


def _client_config(max_attempts: int) -> tuple[Any, int]:
    config = storage.make_client(threads=8, max_attempts=max_attempts).meta.config
    return config.retries, config.max_pool_connections


def test_the_multi_gpu_process_builds_the_same_sync_from_its_spec(
    s3_client: Any, run: S3Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lease = run / "lease.json"
    sync = CheckpointSync(
        s3_client, run, tmp_path / "a", every_epochs=3, min_interval_s=7.5, tag="t9", lease=lease, max_attempts=2
    )
    spec = sync.spec()
    sync.close()
    assert spec == {
        "out": run.uri,
        "every_epochs": 3,
        "min_interval_s": 7.5,
        "tag": "t9",
        "lease": lease.uri,
        "max_attempts": 2,
    }
    twin = CheckpointSync.from_spec(json.loads(json.dumps(spec)), tmp_path / "b")
    twin.close()
    assert (twin.run, twin.staging, twin.every_epochs, twin.min_interval_s) == (run, tmp_path / "b", 3, 7.5)
    assert (twin.tag, twin.lease, twin.max_attempts) == ("t9", lease, 2)
    config = twin.client.meta.config
    assert (config.retries, config.max_pool_connections) == _client_config(2)  # the job's client, 8 threads
    assert twin.guard is not None
    storage.put_json(s3_client, lease, {"holder": "t9"})
    twin.guard()  # still ours
    storage.put_json(s3_client, lease, {"holder": "someone-else"})
    with pytest.raises(LeaseLost, match=f"lost the lease of {lease.uri}: it stops and writes no checkpoint"):
        twin.guard()
    s3_client.delete_object(Bucket=BUCKET, Key=lease.key)
    with pytest.raises(LeaseLost):  # no lease at all is no lease of ours
        twin.guard()


def test_a_spec_without_a_lease_or_attempt_limit_gives_an_unguarded_sync_with_five_attempts(
    s3_client: Any, run: S3Path, tmp_path: Path
) -> None:
    unleased = CheckpointSync(s3_client, run, tmp_path / "u")
    unleased.close()
    assert unleased.spec() == {
        "out": run.uri,
        "every_epochs": 1,
        "min_interval_s": 0.0,
        "tag": "",
        "lease": None,
        "max_attempts": 5,
    }
    base = {"out": run.uri, "every_epochs": 1, "min_interval_s": 0}
    for spec in (base, {**base, "tag": "t1", "lease": None}, {**base, "lease": (run / "lease.json").uri, "tag": ""}):
        twin = CheckpointSync.from_spec(spec, tmp_path / "s")
        twin.close()
        lease = S3Path.parse(spec["lease"]) if spec.get("lease") else None
        assert (twin.guard, twin.max_attempts, twin.lease) == (None, 5, lease)
        assert twin.client.meta.config.retries == _client_config(5)[0]
        assert twin.tag == str(spec.get("tag") or "")


def test_a_failed_upload_is_logged_and_raised_at_the_next_flush_whatever_failed(
    s3_client: Any, run: S3Path, tmp_path: Path
) -> None:
    def lost() -> None:
        raise LeaseLost("lost the lease")

    def broken() -> None:
        raise RuntimeError("disk on fire")

    with capture_logs() as logs:
        for n, guard in enumerate((lost, broken)):
            sync = _sync(s3_client, run / str(n), tmp_path / str(n), guard=guard)
            sync.offer("full", 4, 9, _train_dir(tmp_path / "train", 4), {})
            with pytest.raises((LeaseLost, TransientFailure)) as err:
                sync.flush(60)
            sync.close()
            if guard is broken:
                assert err.value.sentence == "Checkpoint upload failed: RuntimeError: disk on fire."
                assert err.value.exit_code == 75
    failed = [(e["event"], e["log_level"], e["epoch"], e["reason"]) for e in logs if e["log_level"] == "error"]
    assert failed == [
        ("checkpoint upload failed", "error", 4, "lost the lease"),
        ("checkpoint upload failed", "error", 4, "disk on fire"),
    ]


def test_a_newer_epoch_replaces_one_still_waiting_and_close_drops_the_one_waiting(
    s3_client: Any, run: S3Path, tmp_path: Path
) -> None:
    busy, release = threading.Event(), threading.Event()

    def slow() -> None:  # the first upload holds the worker until the test releases it
        busy.set()
        release.wait(10)

    sync = _sync(s3_client, run, tmp_path, guard=slow)
    sync.offer("full", 1, 9, _train_dir(tmp_path / "train", 1), {})
    assert busy.wait(10)
    sync.offer("full", 2, 9, _train_dir(tmp_path / "train", 2), {})
    sync.offer("full", 3, 9, _train_dir(tmp_path / "train", 3), {})  # replaces 2, which never uploads
    assert sync.skipped == [("full", 2)]
    assert sorted(p.name for p in (tmp_path / "staging").iterdir()) == ["full-1", "full-3"]
    release.set()
    assert sync.flush(60) and sync.uploaded == [("full", 1), ("full", 3)]
    assert list((tmp_path / "staging").iterdir()) == []  # each uploaded snapshot's copy is removed
    busy.clear()
    release.clear()
    sync.offer("full", 4, 9, _train_dir(tmp_path / "train", 4), {})
    assert busy.wait(10)
    sync.offer("full", 5, 9, _train_dir(tmp_path / "train", 5), {})
    threading.Timer(0.5, release.set).start()
    sync.close()  # 5 waits: dropped with its copy; 4 is finished first
    assert sync.uploaded == [("full", 1), ("full", 3), ("full", 4)] and sync.error is None
    assert list((tmp_path / "staging").iterdir()) == []
    assert _pointer(s3_client, run)["epoch"] == 4


def test_only_set_folders_are_pruned_and_a_pointer_names_its_phase(s3_client: Any, run: S3Path, tmp_path: Path) -> None:
    s3_client.put_object(Bucket=BUCKET, Key=f"{run.key}/checkpoint/full/9", Body=b"a file named like a set")
    _upload_sets(s3_client, run, tmp_path, range(1, 4))
    assert "checkpoint/full/9" in _keys(s3_client, run)
    assert {k for k in _keys(s3_client, run) if k.endswith("set.json")} == {
        "checkpoint/full/2/set.json",
        "checkpoint/full/3/set.json",
    }
    pointer = _pointer(s3_client, run)
    assert (pointer["phase"], pointer["epoch"], pointer["epochs"], pointer["attempt"]) == ("full", 3, 5, 1)
