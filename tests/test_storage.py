"""Storage against a real SeaweedFS server: parallel pull with a cache, safe keys, clear refusals."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from pogona_job.errors import ConfigError, DatasetError, StorageDenied, TransientFailure
from pogona_job.s3 import pull, storage
from pogona_job.s3.storage import S3Path
from pogona_job.tools.locals3 import LocalS3
from tests.conftest import BUCKET, run_cli


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
    result = pull.pull_prefix(client, dest, tmp_path / "dst", threads=4)
    assert (result.files, result.fetched, result.skipped) == (12, 12, 0)
    assert _digests(tmp_path / "dst") == _digests(tmp_path / "src")


def test_second_push_uploads_nothing_and_second_pull_fetches_nothing(client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _tree(tmp_path / "src")
    dest = S3Path(BUCKET, "storage/cache")
    storage.push_tree(client, tmp_path / "src", dest)
    assert storage.push_tree(client, tmp_path / "src", dest) == (0, 12)
    first = pull.pull_prefix(client, dest, tmp_path / "dst")
    second = pull.pull_prefix(client, dest, tmp_path / "dst")
    assert second.fetched == 0 and second.skipped == 12
    assert first.fingerprint == second.fingerprint


def test_changed_object_is_fetched_again(client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _tree(tmp_path / "src", n=3)
    dest = S3Path(BUCKET, "storage/changed")
    storage.push_tree(client, tmp_path / "src", dest)
    first = pull.pull_prefix(client, dest, tmp_path / "dst")
    changed = tmp_path / "src" / "images" / "sub1" / "f1.bin"
    changed.write_bytes(b"x" * changed.stat().st_size)  # same size, other content: the ETag tells
    storage.push_tree(client, tmp_path / "src", dest)
    again = pull.pull_prefix(client, dest, tmp_path / "dst")
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
            pull.pull_prefix(client, S3Path(BUCKET, "ds"), tmp_path / "dst")
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
    from pogona_job.tools.locals3 import free_port

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


def test_pull_prunes_only_files_it_fetched_itself(client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _tree(tmp_path / "src", n=6)
    dest = S3Path(BUCKET, "storage/mirror")
    storage.push_tree(client, tmp_path / "src", dest)
    pull.pull_prefix(client, dest, tmp_path / "dst")
    gone = "images/sub1/f1.bin"
    client.delete_object(Bucket=BUCKET, Key=f"{dest.key}/{gone}")
    (tmp_path / "dst" / "thesis.tex").write_text("the user's own file")
    (tmp_path / "dst" / "photos").mkdir()
    (tmp_path / "dst" / "photos" / "cat.jpg").write_bytes(b"cat")
    pull.pull_prefix(client, dest, tmp_path / "dst")
    assert not (tmp_path / "dst" / gone).exists()
    assert (tmp_path / "dst" / "thesis.tex").read_text() == "the user's own file"
    assert (tmp_path / "dst" / "photos" / "cat.jpg").read_bytes() == b"cat"
    assert len(_digests(tmp_path / "dst")) == 5 + 2


def test_an_empty_prefix_deletes_nothing_local(client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "thesis.tex").write_text("mine")
    result = pull.pull_prefix(client, S3Path(BUCKET, "storage/nothing-here"), tmp_path / "dst")
    assert result.files == 0 and (tmp_path / "dst" / "thesis.tex").read_text() == "mine"


@pytest.mark.parametrize("uri", ["s3://b-bucket/../../../victim", "s3://b-bucket/a/./b", "s3://b-bucket/a/.."])
def test_dot_segments_in_an_s3_uri_are_a_config_error(uri: str) -> None:
    with pytest.raises(ConfigError, match=r"no '\.' or '\.\.' parts") as err:
        S3Path.parse(uri)
    assert err.value.exit_code == 2


def test_dot_segments_in_the_dataset_uri_stop_the_cli_with_exit_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POGONA_", "AWS_"))}
    env.update(POGONA_DATASET_URI=f"s3://{BUCKET}/../../victim", POGONA_OUTPUT_URI=f"s3://{BUCKET}/runs")
    result = run_cli(["dataset", "pull", str(tmp_path / "dst")], env)
    assert result.code == 2 and "POGONA_DATASET_URI" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "dst").exists()


def test_the_jobs_cached_file_changed_on_disk_is_fetched_again(client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _tree(tmp_path / "src", n=3)
    dest = S3Path(BUCKET, "storage/bitflip")
    storage.push_tree(client, tmp_path / "src", dest)
    pull.pull_prefix(client, dest, tmp_path / "dst")
    local = tmp_path / "dst" / "images" / "sub1" / "f1.bin"
    data = bytearray(local.read_bytes())
    data[0] ^= 0xFF  # one flipped byte, same length
    local.write_bytes(bytes(data))
    again = pull.pull_prefix(client, dest, tmp_path / "dst", replace=True)  # as the job pulls into its cache
    assert again.fetched == 1
    assert _digests(tmp_path / "dst") == _digests(tmp_path / "src")


def test_multipart_object_is_verified_and_pulled(client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(storage, "_MULTIPART_THRESHOLD", 5 << 20)
    monkeypatch.setattr(storage, "_PART_SIZE", 5 << 20)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "big.bin").write_bytes(hashlib.sha256(b"big").digest() * (12 << 15))  # 12 MiB: 3 parts
    dest = S3Path(BUCKET, "storage/multipart")
    storage.push_tree(client, tmp_path / "src", dest)
    listed = next(storage.list_objects(client, dest))
    assert listed.etag.endswith("-3")
    assert storage.multipart_etag(tmp_path / "src" / "big.bin", 5 << 20) == listed.etag
    assert pull.pull_prefix(client, dest, tmp_path / "dst").fetched == 1
    assert _digests(tmp_path / "dst") == _digests(tmp_path / "src")
    assert storage.push_tree(client, tmp_path / "src", dest) == (0, 1)  # the multipart ETag matched locally


def _phantom_listing(monkeypatch: pytest.MonkeyPatch, times: int) -> None:
    """The listing names an object that is gone by the time it is fetched (deleted mid-pull)."""
    real = storage.list_objects
    calls = {"n": 0}

    def listing(client, prefix):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        yield from real(client, prefix)
        if calls["n"] <= times:
            yield storage.RemoteObject(f"{prefix.key}/zz-deleted.bin", "zz-deleted.bin", 3, "0" * 32)

    monkeypatch.setattr(storage, "list_objects", listing)


def test_object_deleted_mid_pull_lists_again_and_completes(
    client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    _tree(tmp_path / "src", n=4)
    dest = S3Path(BUCKET, "storage/midpull")
    storage.push_tree(client, tmp_path / "src", dest)
    _phantom_listing(monkeypatch, times=1)
    result = pull.pull_prefix(client, dest, tmp_path / "dst")
    assert result.files == 4 and _digests(tmp_path / "dst") == _digests(tmp_path / "src")


def test_objects_that_keep_vanishing_are_transient_75(client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    _tree(tmp_path / "src", n=2)
    dest = S3Path(BUCKET, "storage/vanish")
    storage.push_tree(client, tmp_path / "src", dest)
    _phantom_listing(monkeypatch, times=99)
    with pytest.raises(TransientFailure, match="kept changing") as err:
        pull.pull_prefix(client, dest, tmp_path / "dst")
    assert err.value.exit_code == 75
    assert not (tmp_path / "dst" / "zz-deleted.bin").exists()


def test_key_that_is_another_keys_folder_is_exit_3_naming_both(tmp_path: Path) -> None:
    # SeaweedFS (a filer) cannot hold both `a` and `a/b`; AWS S3 can: stub its listing.
    from botocore.stub import Stubber

    client = storage.make_client()
    objects = [{"Key": "ds/a", "Size": 1, "ETag": '"e"'}, {"Key": "ds/a/b", "Size": 1, "ETag": '"e"'}]
    with Stubber(client) as stub:
        stub.add_response("list_objects_v2", {"Contents": objects})
        with pytest.raises(DatasetError, match="'ds/a' and 'ds/a/b'") as err:
            pull.pull_prefix(client, S3Path(BUCKET, "ds"), tmp_path / "dst")
    assert err.value.exit_code == 3


def test_250_character_key_round_trips(client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    name = "k" * 246 + ".jpg"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / name).write_bytes(b"long name")
    dest = S3Path(BUCKET, "storage/longkey")
    storage.push_tree(client, tmp_path / "src", dest)
    assert pull.pull_prefix(client, dest, tmp_path / "dst").fetched == 1
    assert (tmp_path / "dst" / name).read_bytes() == b"long name"


class _RightsOnAMissingBucket(LocalS3):
    """A real server whose key may also List/Read/Write a bucket that was never created."""

    def _identities(self) -> dict[str, Any]:
        identities = super()._identities()
        identities["identities"][0]["actions"] += ["List:pogona-gone", "Read:pogona-gone", "Write:pogona-gone"]
        return identities


def test_missing_bucket_is_refused_with_exit_4(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _RightsOnAMissingBucket(buckets=["pogona-here"]) as server:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        client = storage.make_client(max_attempts=2)
        with pytest.raises(StorageDenied, match="'pogona-gone' does not exist") as err:
            storage.check_bucket(client, S3Path("pogona-gone", "ds"), "reading")
        assert err.value.exit_code == 4
        with pytest.raises(StorageDenied, match="does not exist"):
            pull.pull_prefix(client, S3Path("pogona-gone", "ds"), tmp_path / "dst")


def test_misspelled_profile_and_malformed_endpoint_are_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile-pogona")
    with pytest.raises(ConfigError, match="AWS_PROFILE") as err:
        storage.make_client()
    assert err.value.exit_code == 2
    monkeypatch.delenv("AWS_PROFILE")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "localhost:9000")
    with pytest.raises(ConfigError, match="AWS_ENDPOINT_URL_S3"):
        storage.make_client()


def test_push_skips_hidden_and_junk_files_and_delete_is_opt_in(client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    _tree(src, n=2)
    for junk in [".env", ".git/config", "images/.DS_Store", "__pycache__/x.pyc", "labels/f0.bin~"]:
        (src / junk).parent.mkdir(parents=True, exist_ok=True)
        (src / junk).write_text("SECRET=1")
    dest = S3Path(BUCKET, "storage/junk")
    assert storage.push_tree(client, src, dest) == (2, 0)
    keys = {o.rel for o in storage.list_objects(client, dest)}
    assert keys == {"labels/sub0/f0.bin", "images/sub1/f1.bin"}
    (src / "images" / "sub1" / "f1.bin").unlink()
    storage.push_tree(client, src, dest)
    assert len(list(storage.list_objects(client, dest))) == 2  # without --delete nothing is removed
    removed: list[str] = []
    storage.push_tree(client, src, dest, delete=True, on_delete=removed.append)
    assert removed == [f"{dest.key}/images/sub1/f1.bin"]
    assert {o.rel for o in storage.list_objects(client, dest)} == {"labels/sub0/f0.bin"}


def _cli_env(s3: LocalS3, uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POGONA_", "AWS_"))}
    return {**env, **s3.env, "POGONA_DATASET_URI": uri, "POGONA_OUTPUT_URI": f"s3://{BUCKET}/runs"}


def test_dataset_pull_cli_refuses_a_foreign_non_empty_folder_unless_forced(
    s3: LocalS3,
    client,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    _tree(tmp_path / "src", n=2)
    storage.push_tree(client, tmp_path / "src", S3Path(BUCKET, "storage/cli"))
    env = _cli_env(s3, f"s3://{BUCKET}/storage/cli")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "thesis.tex").write_text("mine")
    refused = run_cli(["dataset", "pull", str(tmp_path / "dst")], env)
    assert refused.code == 2 and "--force" in refused.stderr and "Traceback" not in refused.stderr
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["thesis.tex"]
    forced = run_cli(["dataset", "pull", "--force", str(tmp_path / "dst")], env)
    assert forced.code == 0, forced.stderr
    assert (tmp_path / "dst" / "thesis.tex").read_text() == "mine" and len(_digests(tmp_path / "dst")) == 3
    again = run_cli(["dataset", "pull", str(tmp_path / "dst")], env)  # its own index: no flag needed
    assert again.code == 0 and "0 fetched, 2 already cached" in again.stdout


def test_dataset_push_cli_delete_names_what_it_removes(s3: LocalS3, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pogona_job.tools.demo import write_demo

    write_demo(tmp_path / "demo", n_images=12, size=64, seed=1)
    env = _cli_env(s3, f"s3://{BUCKET}/storage/pushcli")
    (tmp_path / "demo" / ".env").write_text("AWS_SECRET_ACCESS_KEY=x")
    assert run_cli(["dataset", "push", str(tmp_path / "demo")], env).code == 0
    client.put_object(Bucket=BUCKET, Key="storage/pushcli/old/stale.jpg", Body=b"stale")
    result = run_cli(["dataset", "push", "--delete", str(tmp_path / "demo")], env)
    assert result.code == 0, result.stderr
    assert f"deleting s3://{BUCKET}/storage/pushcli/old/stale.jpg" in result.stdout
    keys = {o.rel for o in storage.list_objects(client, S3Path(BUCKET, "storage/pushcli"))}
    assert "old/stale.jpg" not in keys and ".env" not in keys and keys


def test_a_folder_linked_outside_dest_is_not_written_through(client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _tree(tmp_path / "src", n=2)
    dest = S3Path(BUCKET, "storage/symlink")
    storage.push_tree(client, tmp_path / "src", dest)
    (tmp_path / "outside").mkdir()
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "images").symlink_to(tmp_path / "outside")
    with pytest.raises(DatasetError, match="leads outside") as err:
        pull.pull_prefix(client, dest, tmp_path / "dst")
    assert err.value.exit_code == 3 and not any((tmp_path / "outside").rglob("*"))


def test_an_index_naming_paths_outside_dest_prunes_nothing_there(client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "dst").mkdir()
    (tmp_path / "victim.txt").write_text("keep me")
    (tmp_path / "dst" / storage.CACHE_INDEX).write_text('{"../victim.txt": [7, "e", 1]}')
    pull.pull_prefix(client, S3Path(BUCKET, "storage/nothing-here"), tmp_path / "dst")
    assert (tmp_path / "victim.txt").read_text() == "keep me"


def test_obstore_is_fed_boto3s_refreshing_credentials() -> None:
    # A role's credentials (IRSA, ECS, IMDS, SSO) are RefreshableCredentials; AWS itself cannot run here,
    # so the refresh function stands in for STS: each call hands out the next key.
    from datetime import UTC, datetime, timedelta

    from botocore.credentials import RefreshableCredentials

    issued = iter(range(1, 10))

    def refresh() -> dict[str, str]:
        n = next(issued)
        expiry = datetime.now(UTC) + timedelta(seconds=1 if n == 1 else 3600)  # the first expires at once
        return {"access_key": f"AK{n}", "secret_key": "s", "token": f"t{n}", "expiry_time": expiry.isoformat()}

    credentials = RefreshableCredentials.create_from_metadata(refresh(), refresh, "test")
    provider = storage._FrozenCredentials(credentials)
    first = provider()
    assert first["access_key_id"] == "AK2" and first["token"] == "t2"  # already within the refresh window
    assert first["expires_at"] > datetime.now(UTC)
    assert provider()["access_key_id"] == "AK2"  # not refreshed again while valid


def test_a_ca_bundle_obstore_cannot_use_sends_the_bytes_through_botocore_logged_once(
    client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    from structlog.testing import capture_logs

    _tree(tmp_path / "src", n=4)
    dest = S3Path(BUCKET, "storage/cafallback")
    storage.push_tree(client, tmp_path / "src", dest)
    (tmp_path / "bundle.pem").write_text("not a certificate")  # botocore reads it only for https: http works
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "bundle.pem"))
    fallback = storage.make_client(threads=4, max_attempts=2)
    with capture_logs() as logs:
        assert pull.pull_prefix(fallback, dest, tmp_path / "dst").fetched == 4
        storage.upload_many(fallback, [(tmp_path / "src" / "labels" / "sub0" / "f0.bin", dest / "again.bin")])
    assert _digests(tmp_path / "dst") == _digests(tmp_path / "src")
    assert [e["event"] for e in logs].count("storage: obstore unavailable, botocore moves the bytes") == 1


# The mapping of what S3 answers after retries to the job's exit codes, as a table (the contract's codes).
REFUSAL_TABLE = [
    ("NoSuchBucket", "404", 4, "does not exist"),
    ("PermanentRedirect", "301", 2, "AWS_REGION"),
    ("TemporaryRedirect", "", 2, "AWS_REGION"),
    ("AuthorizationHeaderMalformed", "400", 2, "AWS_ENDPOINT_URL_S3"),
    ("", "301", 2, "the server answered 301 while"),
    ("", "307", 2, "not served at"),
    (
        "AccessDenied",
        "403",
        4,
        "refused access (AccessDenied) while reading the dataset from: check the credentials and that they may "
        "read and write that bucket and prefix.",
    ),
    ("InvalidAccessKeyId", "", 4, "credentials"),
    ("ExpiredToken", "400", 4, "refused access"),
    ("", "401", 4, "refused access (401)"),
    ("", "403", 4, "refused access (403)"),
    (
        "SlowDown",
        "503",
        75,
        "kept failing (SlowDown) while reading the dataset from s3://data-bkt after retries: the scheduler should "
        "retry the job later.",
    ),
    ("InternalError", "", 75, "retry the job later"),
    ("", "500", 75, "kept failing (500)"),
    ("", "502", 75, "kept failing"),
    ("", "408", 75, "kept failing (408)"),
    ("", "429", 75, "kept failing (429)"),
    ("InvalidObjectState", "400", 6, "Storage error InvalidObjectState"),
    ("", "400", 6, "Storage error 400"),
]


@pytest.mark.parametrize(("code", "status", "exit_code", "says"), REFUSAL_TABLE)
def test_each_storage_answer_maps_to_its_documented_exit_code_and_sentence(
    code: str, status: str, exit_code: int, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    err = storage._refusal("data-bkt", "reading the dataset from", code, status, "the detail")
    assert err.exit_code == exit_code and says in err.sentence, err.sentence
    assert "data-bkt" in err.sentence and "reading the dataset from" in err.sentence
    if exit_code == 2:  # a redirect names where the job looked, so the user can see what to change
        assert "http://127.0.0.1:9" in err.sentence and "eu-west-1" in err.sentence
    if exit_code == 6:
        assert "the detail" in err.sentence


def test_a_sentence_names_the_uri_once_whether_the_action_carries_it_or_only_the_bucket() -> None:
    with_uri = storage._refusal("data-bkt", "listing the open uploads under s3://data-bkt/runs/r1", "", "503", "")
    assert "while listing the open uploads under s3://data-bkt/runs/r1 after retries" in with_uri.sentence
    assert with_uri.sentence.count("s3://") == 1
    bucket_only = storage._refusal("data-bkt", "deleting objects in", "", "503", "")
    assert "while deleting objects in s3://data-bkt after retries" in bucket_only.sentence


def test_obstore_errors_are_read_for_their_s3_code_status_or_certificate() -> None:
    def read(text: str) -> Any:
        err = storage.obstore_error(Exception(text), "data-bkt", "pulling")
        assert "data-bkt" in err.sentence and "pulling" in err.sentence, err.sentence
        return err

    denied = read("<Code>AccessDenied</Code> status code: 403")
    assert denied.exit_code == 4 and "(AccessDenied)" in denied.sentence
    assert "(403)" in read("Client error with status code: 403 Forbidden").sentence  # the status when no code
    throttled = read("<Code>SlowDown</Code> and no status line")
    assert throttled.exit_code == 75 and "(SlowDown)" in throttled.sentence
    assert read("Client error with status code: 301 Moved").exit_code == 2
    for tls in ("invalid peer certificate: BadSignature", "tls handshake: UnknownIssuer"):
        err = read(tls)
        assert err.exit_code == 4 and err.sentence == (
            "The storage endpoint's TLS certificate is not trusted (while pulling s3://data-bkt): set AWS_CA_BUNDLE "
            "(or ca_bundle in the AWS config) to the CA that signed it; the job will not connect unverified."
        )
    long_text = "<Code>Weird</Code> status code: 400 " + "x" * 300
    odd = read(long_text)  # an unknown code: its message is the detail, cut at 200 characters
    assert odd.exit_code == 6 and odd.sentence.endswith(f": {long_text[:200]}.")
    first_line = "error sending request " + "y" * 300
    network = read(first_line + "\nconnection refused")
    assert network.exit_code == 75 and f"({first_line[:200]})" in network.sentence
    assert "connection refused" not in network.sentence


def test_push_refuses_a_symlink_leading_outside_src_and_uploads_nothing(client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    _tree(src, n=2)
    (tmp_path / "credentials").write_text("aws_secret_access_key = hunter2")
    (src / "images" / "notes.txt").symlink_to(tmp_path / "credentials")
    dest = S3Path(BUCKET, f"storage/links-{tmp_path.name}")
    with pytest.raises(DatasetError, match=r"1 symbolic link\(s\) lead outside it \(images/notes.txt -> ") as err:
        storage.push_tree(client, src, dest)
    assert err.value.exit_code == 3 and list(storage.list_objects(client, dest)) == []
    (src / "images" / "notes.txt").unlink()
    (tmp_path / "elsewhere").mkdir()
    (src / "labels" / "linked").symlink_to(tmp_path / "elsewhere")  # a linked folder leaves SRC the same way
    with pytest.raises(DatasetError, match="labels/linked -> "):
        storage.push_tree(client, src, dest)
    (src / "labels" / "linked").unlink()
    (src / "images" / "again.bin").symlink_to(src / "labels" / "sub0" / "f0.bin")  # inside SRC: pushed
    (src / "images" / "loop").symlink_to(src / "images")  # a loop inside SRC: walked once
    assert storage.push_tree(client, src, dest) == (3, 0)
    assert {o.rel for o in storage.list_objects(client, dest)} == {
        "labels/sub0/f0.bin",
        "images/sub1/f1.bin",
        "images/again.bin",
    }


def test_push_of_a_non_utf8_file_name_is_exit_3_with_one_sentence(
    s3: LocalS3,
    client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],  # type: ignore[no-untyped-def]
) -> None:
    from pogona_job import cli
    from pogona_job.tools.demo import write_demo

    write_demo(tmp_path / "demo", n_images=12, size=64, seed=1)
    with open(os.fsencode(tmp_path / "demo") + b"/caf\xe9.txt", "wb") as fh:  # a Latin-1 name, as old tools write
        fh.write(b"latin-1 name")
    monkeypatch.setenv("POGONA_DATASET_URI", f"s3://{BUCKET}/storage/latin1-{tmp_path.name}")
    monkeypatch.setenv("POGONA_LOG_FORMAT", "json")
    assert cli.main(["dataset", "push", str(tmp_path / "demo")]) == 3
    err = capsys.readouterr().err
    assert "caf\\xe9.txt" in err and "Traceback" not in err
    dest = S3Path(BUCKET, f"storage/latin1-{tmp_path.name}")
    assert list(storage.list_objects(client, dest)) == []
    with pytest.raises(DatasetError, match=r"1 file name\(s\) are not UTF-8"):  # whatever validate makes of it
        storage.push_tree(client, tmp_path / "demo", dest)


def test_a_redirect_without_a_region_is_exit_2_not_a_recursion_error(
    s3: LocalS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import FaultProxy

    proxy = FaultProxy(s3.endpoint, "301bare:1.0", tmp_path)
    try:
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        client = storage.make_client(threads=2, max_attempts=2)
        with pytest.raises(ConfigError, match="the server answered 301 while listing") as err:
            pull.pull_prefix(client, S3Path(BUCKET, "storage/anything"), tmp_path / "dst")
        assert err.value.exit_code == 2 and proxy.faults()
        with pytest.raises(ConfigError, match="answered 301"):  # the bucket probe itself, redirected the same way
            storage.check_bucket(client, S3Path(BUCKET, "x"), "checking the bucket")
    finally:
        proxy.stop()


@pytest.mark.parametrize(
    ("env", "where"),
    [
        ({}, "endpoint AWS S3, region (unset)"),
        ({"AWS_DEFAULT_REGION": "ap-south-1"}, "endpoint AWS S3, region ap-south-1"),
        ({"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "ap-south-1"}, "endpoint AWS S3, region eu-west-1"),
        ({"AWS_ENDPOINT_URL": "https://minio.lab:9000"}, "endpoint https://minio.lab:9000, region (unset)"),
    ],
)
def test_a_redirect_says_which_endpoint_and_region_the_job_used_whichever_variables_set_them(
    env: dict[str, str], where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    err = storage._refusal("data-bkt", "reading the dataset from", "PermanentRedirect", "301", "")
    assert err.sentence == (
        f"The bucket 'data-bkt' is not served at {where} (the server answered PermanentRedirect while reading the "
        "dataset from): set AWS_REGION to the bucket's region or AWS_ENDPOINT_URL_S3 to its endpoint."
    )
