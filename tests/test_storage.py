"""Storage against a real SeaweedFS server: parallel pull with a cache, safe keys, clear refusals."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pogona_job import storage
from pogona_job.errors import DatasetError, StorageDenied, TransientFailure
from pogona_job.locals3 import LocalS3
from pogona_job.storage import S3Path
from tests.conftest import BUCKET


@pytest.fixture()
def client(s3: LocalS3, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return storage.make_client(threads=8, max_attempts=2)


def _tree(root: Path, n: int = 12) -> None:
    for i in range(n):
        path = root / ("images" if i % 2 else "labels") / f"sub{i % 3}" / f"f{i}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(hashlib.sha256(str(i).encode()).digest() * (i + 1))


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and p.name != storage.CACHE_INDEX
    }


def test_push_then_pull_round_trips_byte_for_byte(client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _tree(tmp_path / "src")
    dest = S3Path(BUCKET, "storage/roundtrip")
    assert storage.push_tree(client, tmp_path / "src", dest) == (12, 0)
    result = storage.pull_prefix(client, dest, tmp_path / "dst", threads=4)
    assert (result.files, result.fetched, result.skipped) == (12, 12, 0)
    assert _digests(tmp_path / "dst") == _digests(tmp_path / "src")


def test_second_push_uploads_nothing_and_second_pull_fetches_nothing(client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _tree(tmp_path / "src")
    dest = S3Path(BUCKET, "storage/cache")
    storage.push_tree(client, tmp_path / "src", dest)
    assert storage.push_tree(client, tmp_path / "src", dest) == (0, 12)
    first = storage.pull_prefix(client, dest, tmp_path / "dst")
    second = storage.pull_prefix(client, dest, tmp_path / "dst")
    assert second.fetched == 0 and second.skipped == 12
    assert first.fingerprint == second.fingerprint


def test_changed_object_is_fetched_again(client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _tree(tmp_path / "src", n=3)
    dest = S3Path(BUCKET, "storage/changed")
    storage.push_tree(client, tmp_path / "src", dest)
    first = storage.pull_prefix(client, dest, tmp_path / "dst")
    changed = tmp_path / "src" / "images" / "sub1" / "f1.bin"
    changed.write_bytes(b"x" * changed.stat().st_size)  # same size, other content: the ETag tells
    storage.push_tree(client, tmp_path / "src", dest)
    again = storage.pull_prefix(client, dest, tmp_path / "dst")
    assert again.fetched == 1
    assert (tmp_path / "dst" / "images" / "sub1" / "f1.bin").read_bytes() == changed.read_bytes()
    assert again.fingerprint != first.fingerprint


@pytest.mark.parametrize("key", ["ds/../../escape.txt", "ds//etc/passwd", "ds/a/./b", "ds/a\\..\\b"])
def test_key_escaping_the_destination_is_refused(key: str, tmp_path: Path) -> None:
    # SeaweedFS itself rejects such keys, but AWS S3 stores them: stub AWS's listing (it cannot run here).
    from botocore.stub import Stubber

    client = storage.make_client()
    with Stubber(client) as stub:
        stub.add_response("list_objects_v2", {"Contents": [{"Key": key, "Size": 1, "ETag": '"e"'}]})
        with pytest.raises(DatasetError, match="outside the destination"):
            storage.pull_prefix(client, S3Path(BUCKET, "ds"), tmp_path / "dst")
    assert not any((tmp_path / "dst").rglob("*.txt")) and not (tmp_path / "escape.txt").exists()


def test_wrong_secret_is_access_denied_naming_the_bucket(s3: LocalS3, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {**s3.env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(StorageDenied, match=f"bucket '{BUCKET}' refused access") as err:
        storage.check_bucket(storage.make_client(max_attempts=1), S3Path(BUCKET, "x"), "reading")
    assert err.value.exit_code == 4


def test_bucket_outside_the_key_policy_is_refused(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StorageDenied, match="nope-bucket") as err:
        storage.check_bucket(client, S3Path("nope-bucket", "x"), "reading")
    assert err.value.exit_code == 4


def test_unreachable_endpoint_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    from pogona_job.locals3 import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    with pytest.raises(TransientFailure) as err:
        storage.check_bucket(storage.make_client(max_attempts=2), S3Path(BUCKET, ""), "reading")
    assert err.value.exit_code == 75


def test_upload_records_size_and_sha256(client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "w.pt"
    path.write_bytes(b"weights" * 1000)
    (artifact,) = storage.upload_many(client, [(path, S3Path(BUCKET, "storage/w.pt"))])
    body = client.get_object(Bucket=BUCKET, Key="storage/w.pt")["Body"].read()
    assert artifact.size == len(body) and artifact.sha256 == hashlib.sha256(body).hexdigest()


def test_latest_pointer_never_moves_backwards(client) -> None:  # type: ignore[no-untyped-def]
    latest = S3Path(BUCKET, "storage/latest.json")
    assert storage.advance_pointer(client, latest, {"run_id": "b", "finished_at": "2026-11-25T10:00:00+00:00"})
    assert not storage.advance_pointer(client, latest, {"run_id": "a", "finished_at": "2026-11-25T09:00:00+00:00"})
    assert storage.get_json(client, latest) == {"run_id": "b", "finished_at": "2026-11-25T10:00:00+00:00"}
    assert storage.advance_pointer(client, latest, {"run_id": "c", "finished_at": "2026-11-25T11:00:00+00:00"})
    assert (storage.get_json(client, latest) or {})["run_id"] == "c"


def test_pull_mirrors_the_prefix_and_drops_files_gone_from_the_bucket(client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _tree(tmp_path / "src", n=6)
    dest = S3Path(BUCKET, "storage/mirror")
    storage.push_tree(client, tmp_path / "src", dest)
    storage.pull_prefix(client, dest, tmp_path / "dst")
    gone = "images/sub1/f1.bin"
    client.delete_object(Bucket=BUCKET, Key=f"{dest.key}/{gone}")
    (tmp_path / "dst" / "stray.txt").write_text("left by an earlier dataset")
    storage.pull_prefix(client, dest, tmp_path / "dst")
    assert not (tmp_path / "dst" / gone).exists() and not (tmp_path / "dst" / "stray.txt").exists()
    assert len(_digests(tmp_path / "dst")) == 5
