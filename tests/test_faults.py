"""Fault tolerance: botocore's retries ride out a flaky store; a store that stays down is exit 75."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pogona_job import storage
from pogona_job.errors import TransientFailure
from pogona_job.locals3 import LocalS3
from pogona_job.storage import S3Path
from tests.conftest import BUCKET, FaultProxy, job_env, run_cli


@pytest.fixture()
def proxy_factory(s3: LocalS3, tmp_path: Path) -> Iterator[Any]:
    started: list[FaultProxy] = []

    def start(faults: str, **kwargs: Any) -> FaultProxy:
        started.append(FaultProxy(s3.endpoint, faults, tmp_path, **kwargs))
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()


def _client(s3: LocalS3, endpoint: str, monkeypatch: pytest.MonkeyPatch, attempts: int = 8) -> Any:
    for key, value in {**s3.env, "AWS_ENDPOINT_URL_S3": endpoint}.items():
        monkeypatch.setenv(key, value)
    return storage.make_client(threads=4, max_attempts=attempts)


def test_multipart_upload_survives_503_500_resets_and_slow_parts(
    s3: LocalS3, s3_client: Any, proxy_factory: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(storage, "_MULTIPART_THRESHOLD", 5 << 20)
    proxy = proxy_factory("503:0.15,500:0.1,reset:0.1,slow:0.05", match="^(PUT|POST) ", slow_s=1)
    client = _client(s3, proxy.endpoint, monkeypatch)
    files = []
    for i in range(3):
        path = tmp_path / f"big{i}.bin"
        path.write_bytes(hashlib.sha256(str(i).encode()).digest() * (12 << 15))  # 12 MiB: 1 part + 16 MiB chunks
        files.append((path, S3Path(BUCKET, f"faults/big{i}.bin")))
    artifacts = storage.upload_many(client, files)
    for (path, dest), artifact in zip(files, artifacts, strict=True):
        body = s3_client.get_object(Bucket=BUCKET, Key=dest.key)["Body"].read()
        assert body == path.read_bytes() and artifact.sha256 == hashlib.sha256(body).hexdigest()
    assert proxy.faults(), "the proxy injected nothing: the test would prove nothing"
    assert not s3_client.list_multipart_uploads(Bucket=BUCKET).get("Uploads")
    print(f"multipart through faults: {len(proxy.faults())} faults injected, 3 of 3 uploads intact")


def test_persistent_503_is_transient_exit_75_and_leaves_no_multipart_upload(
    s3: LocalS3, s3_client: Any, proxy_factory: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(storage, "_MULTIPART_THRESHOLD", 5 << 20)
    proxy = proxy_factory("503:1.0", match=r"^PUT .*partNumber=2")
    client = _client(s3, proxy.endpoint, monkeypatch, attempts=3)
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * (40 << 20))
    with pytest.raises(TransientFailure) as err:
        storage.upload_many(client, [(path, S3Path(BUCKET, "faults/never.bin"))])
    assert err.value.exit_code == 75
    assert not s3_client.list_multipart_uploads(Bucket=BUCKET).get("Uploads")
    print(f"persistent 503 on part 2: {len(proxy.faults())} faults injected, upload aborted, exit 75")
    assert "faults/never.bin" not in {o["Key"] for o in s3_client.list_objects_v2(Bucket=BUCKET).get("Contents", [])}


def _artifact_set(s3_client: Any, run: str) -> set[str]:
    manifest = json.loads(s3_client.get_object(Bucket=BUCKET, Key=f"runs/{run}/manifest.json")["Body"].read())
    assert manifest["status"] == "succeeded"
    return set(manifest["artifacts"])


def test_job_completes_through_a_flaky_store_with_the_same_artifacts(
    s3: LocalS3, s3_client: Any, demo_uri: str, proxy_factory: Any, tmp_path: Path
) -> None:
    proxy = proxy_factory("503:0.08,500:0.04,reset:0.04,slow:0.02", slow_s=1)
    env = job_env(
        s3,
        tmp_path,
        POGONA_DATASET_URI=demo_uri,
        POGONA_RUN_ID="faulty",
        POGONA_EPOCHS="1",
        POGONA_S3_MAX_ATTEMPTS="10",
        AWS_ENDPOINT_URL_S3=proxy.endpoint,
    )
    flaky = run_cli(["run"], env)
    assert flaky.code == 0, flaky.stderr[-3000:]
    clean = run_cli(["run"], {**env, "POGONA_RUN_ID": "clean", "AWS_ENDPOINT_URL_S3": s3.endpoint})
    assert clean.code == 0, clean.stderr[-3000:]
    assert _artifact_set(s3_client, "faulty") == _artifact_set(s3_client, "clean")
    injected = proxy.faults()
    retries = [line for line in flaky.stderr.splitlines() if '"storage retry"' in line]
    assert len(injected) >= 5 and retries, (len(injected), len(retries))
    kinds = {k: sum(line.split()[1] == k for line in injected) for k in ("503", "500", "reset", "slow")}
    print(f"faults injected {len(injected)} {kinds}, retries logged {len(retries)}, run completed")


def test_job_exits_75_when_the_store_keeps_refusing_writes(
    s3: LocalS3, demo_uri: str, proxy_factory: Any, tmp_path: Path
) -> None:
    proxy = proxy_factory("503:1.0", match=r"^PUT .*/runs/stuck/")
    env = job_env(
        s3,
        tmp_path,
        POGONA_DATASET_URI=demo_uri,
        POGONA_RUN_ID="stuck",
        POGONA_S3_MAX_ATTEMPTS="2",
        AWS_ENDPOINT_URL_S3=proxy.endpoint,
    )
    result = run_cli(["run"], env)
    assert result.code == 75, result.stderr[-3000:]
    assert "Storage kept failing (SlowDown)" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
