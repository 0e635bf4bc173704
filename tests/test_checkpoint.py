"""Checkpoint sets: a pointer written last names a set whose files restore verifies by hash;
a missing pointer or a damaged file falls back to the previous complete set; results.csv is cut
to the restored epoch; older sets go only after the pointer moved; the interval settings hold."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path
from typing import Any

import pytest

from pogona_job.errors import LeaseLost
from pogona_job.s3 import storage
from pogona_job.s3.storage import S3Path
from pogona_job.tools.locals3 import LocalS3
from pogona_job.training.checkpoint import CheckpointSync, cut_results, restore
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
