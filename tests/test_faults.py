"""Fault tolerance: botocore's retries ride out a flaky store; a store that stays down is exit 75."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pogona_job.errors import ConfigError, StorageDenied, TransientFailure
from pogona_job.s3 import pull, storage
from pogona_job.s3.storage import S3Path
from pogona_job.tools.locals3 import LocalS3
from tests.conftest import BUCKET, ROOT, FaultProxy, job_env, out_key, run_here


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
    prefix = f"faults/{tmp_path.name}"  # this test's own: other tests' uploads never count here
    proxy = proxy_factory("503:0.15,500:0.1,reset:0.1,slow:0.05", match="^(PUT|POST) ", slow_s=1)
    client = _client(s3, proxy.endpoint, monkeypatch)
    files = []
    for i in range(3):
        path = tmp_path / f"big{i}.bin"
        path.write_bytes(hashlib.sha256(str(i).encode()).digest() * (12 << 15))  # 12 MiB: 1 part + 16 MiB chunks
        files.append((path, S3Path(BUCKET, f"{prefix}/big{i}.bin")))
    artifacts = storage.upload_many(client, files)
    for (path, dest), artifact in zip(files, artifacts, strict=True):
        body = s3_client.get_object(Bucket=BUCKET, Key=dest.key)["Body"].read()
        assert body == path.read_bytes() and artifact.sha256 == hashlib.sha256(body).hexdigest()
    assert proxy.faults(), "the proxy injected nothing: the test would prove nothing"
    assert not s3_client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads")
    print(f"multipart through faults: {len(proxy.faults())} faults injected, 3 of 3 uploads intact")


def test_persistent_503_is_transient_exit_75_and_leaves_no_multipart_upload(
    s3: LocalS3, s3_client: Any, proxy_factory: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(storage, "_MULTIPART_THRESHOLD", 5 << 20)
    prefix = f"faults/{tmp_path.name}"
    proxy = proxy_factory("503:1.0", match=r"^PUT .*partNumber=2")
    client = _client(s3, proxy.endpoint, monkeypatch, attempts=3)
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * (40 << 20))
    with pytest.raises(TransientFailure) as err:
        storage.upload_many(client, [(path, S3Path(BUCKET, f"{prefix}/never.bin"))])
    assert err.value.exit_code == 75
    assert not s3_client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads")
    print(f"persistent 503 on part 2: {len(proxy.faults())} faults injected, upload aborted, exit 75")
    assert not s3_client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/never.bin").get("KeyCount")


def _artifact_set(s3_client: Any, env: dict[str, str], run: str) -> set[str]:
    manifest = json.loads(s3_client.get_object(Bucket=BUCKET, Key=out_key(env, run, "manifest.json"))["Body"].read())
    assert manifest["status"] == "succeeded"
    return set(manifest["artifacts"])


def test_job_completes_through_a_flaky_store_with_the_same_artifacts(
    s3: LocalS3, s3_client: Any, demo_uri: str, proxy_factory: Any, tmp_path: Path
) -> None:
    proxy = proxy_factory("503:0.025,500:0.01,reset:0.01,slow:0.01", slow_s=1)
    env = job_env(
        s3,
        tmp_path,
        POGONA_DATASET_URI=demo_uri,
        POGONA_RUN_ID="faulty",
        POGONA_EPOCHS="3",  # the 2 sanity epochs and one more
        POGONA_S3_MAX_ATTEMPTS="10",
        AWS_ENDPOINT_URL_S3=proxy.endpoint,
    )
    flaky = run_here(["run"], env)
    assert flaky.code == 0, flaky.stderr[-3000:]
    clean = run_here(["run"], {**env, "POGONA_RUN_ID": "clean", "AWS_ENDPOINT_URL_S3": s3.endpoint})
    assert clean.code == 0, clean.stderr[-3000:]
    assert _artifact_set(s3_client, env, "faulty") == _artifact_set(s3_client, env, "clean")
    injected = proxy.faults()
    retries = [line for line in flaky.stderr.splitlines() if '"storage retry"' in line]
    assert len(injected) >= 5 and retries, (len(injected), len(retries))
    kinds = {k: sum(line.split()[1] == k for line in injected) for k in ("503", "500", "reset", "slow")}
    print(f"faults injected {len(injected)} {kinds}, retries logged {len(retries)}, run completed")


def test_job_exits_75_when_the_store_keeps_refusing_writes(
    s3: LocalS3, demo_uri: str, proxy_factory: Any, tmp_path: Path
) -> None:
    proxy = proxy_factory("503:1.0", match=r"^PUT .*/stuck/")
    env = job_env(
        s3,
        tmp_path,
        POGONA_DATASET_URI=demo_uri,
        POGONA_RUN_ID="stuck",
        POGONA_S3_MAX_ATTEMPTS="2",
        AWS_ENDPOINT_URL_S3=proxy.endpoint,
    )
    result = run_here(["run"], env)
    assert result.code == 75, result.stderr[-3000:]
    assert "Storage kept failing (SlowDown)" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


def _dataset(s3_client: Any, prefix: str, n: int = 6) -> dict[str, bytes]:
    files = {f"images/f{i}.jpg": hashlib.sha256(f"{prefix}{i}".encode()).digest() * 64 for i in range(n)}
    for rel, body in files.items():
        s3_client.put_object(Bucket=BUCKET, Key=f"{prefix}/{rel}", Body=body)
    return files


def test_a_byte_flipped_in_transit_is_never_cached_and_ends_75(
    s3: LocalS3, s3_client: Any, proxy_factory: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _dataset(s3_client, "faults/flip")
    proxy = proxy_factory("flip:1.0", match=r"^GET /pogona-test/faults/flip/images/f3\.jpg")
    client = _client(s3, proxy.endpoint, monkeypatch)
    with pytest.raises(TransientFailure, match="failed its content check") as err:
        pull.pull_prefix(client, S3Path(BUCKET, "faults/flip"), tmp_path / "dst")
    assert err.value.exit_code == 75 and proxy.faults()
    assert not (tmp_path / "dst" / "images" / "f3.jpg").exists()
    assert "images/f3.jpg" not in json.loads((tmp_path / "dst" / storage.CACHE_INDEX).read_text())
    assert not (tmp_path / "dst" / ".pogona-parts").exists()


def test_a_flip_on_the_first_try_is_fetched_again(
    s3: LocalS3, s3_client: Any, proxy_factory: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    files = _dataset(s3_client, "faults/flip1")
    monkeypatch.setenv("FAULTS_MAX", "1")  # the first GET of f3 only
    proxy = proxy_factory("flip:1.0", match=r"^GET /pogona-test/faults/flip1/images/f3\.jpg")
    client = _client(s3, proxy.endpoint, monkeypatch)
    result = pull.pull_prefix(client, S3Path(BUCKET, "faults/flip1"), tmp_path / "dst")
    assert len(proxy.faults()) == 1 and result.fetched == len(files)
    assert {
        p.relative_to(tmp_path / "dst").as_posix(): p.read_bytes() for p in (tmp_path / "dst").rglob("*.jpg")
    } == files


@pytest.mark.parametrize("status", ["301", "307"])
def test_a_redirect_to_another_region_is_a_config_error_naming_region_and_endpoint(
    s3: LocalS3, proxy_factory: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, status: str
) -> None:
    proxy = proxy_factory(f"{status}:1.0")
    client = _client(s3, proxy.endpoint, monkeypatch, attempts=2)
    with pytest.raises(ConfigError, match=f"endpoint {proxy.endpoint}, region us-east-1") as err:
        pull.pull_prefix(client, S3Path(BUCKET, "faults/any"), tmp_path / "dst")
    assert err.value.exit_code == 2


def test_dataset_pull_cli_redirect_is_one_sentence_exit_2(s3: LocalS3, proxy_factory: Any, tmp_path: Path) -> None:
    proxy = proxy_factory("301:1.0")
    env = job_env(s3, tmp_path, POGONA_DATASET_URI=f"s3://{BUCKET}/faults/any", AWS_ENDPOINT_URL_S3=proxy.endpoint)
    result = run_here(["dataset", "pull", str(tmp_path / "dst")], env)
    assert result.code == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "AWS_REGION" in result.stderr.strip().splitlines()[-1]


def test_untrusted_tls_is_refused_for_good_and_a_ca_bundle_is_honoured(
    s3: LocalS3, s3_client: Any, proxy_factory: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    files = _dataset(s3_client, "faults/tls", n=3)
    proxy = proxy_factory("")  # mitmproxy answers TLS with a certificate from its own CA
    endpoint = proxy.endpoint.replace("http://", "https://")
    client = _client(s3, endpoint, monkeypatch, attempts=2)
    with pytest.raises(StorageDenied, match="TLS certificate is not trusted") as err:
        storage.check_bucket(client, S3Path(BUCKET, "faults/tls"), "reading")
    assert err.value.exit_code == 4
    (tmp_path / "x").write_bytes(b"x")
    with pytest.raises(StorageDenied, match="TLS certificate is not trusted"):  # obstore's path refuses too
        storage.upload_many(client, [(tmp_path / "x", S3Path(BUCKET, "faults/tls/x"))])
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "mitm-conf" / "mitmproxy-ca-cert.pem"))
    client = storage.make_client(threads=4, max_attempts=2)
    pull.pull_prefix(client, S3Path(BUCKET, "faults/tls"), tmp_path / "dst")
    assert {
        p.relative_to(tmp_path / "dst").as_posix(): p.read_bytes() for p in (tmp_path / "dst").rglob("*.jpg")
    } == files


def test_sigterm_stops_a_dataset_pull_at_once_with_no_partial_file(
    s3: LocalS3, s3_client: Any, proxy_factory: Any, tmp_path: Path
) -> None:
    _dataset(s3_client, "faults/sigterm", n=8)
    proxy = proxy_factory("slow:1.0", match=r"^GET /pogona-test/faults/sigterm/images/", slow_s=120)
    env = job_env(s3, tmp_path, POGONA_DATASET_URI=f"s3://{BUCKET}/faults/sigterm", AWS_ENDPOINT_URL_S3=proxy.endpoint)
    env["POGONA_S3_THREADS"] = "4"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pogona_job", "dataset", "pull", str(tmp_path / "dst")],
        env=env,
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(600):  # until the GETs are held by the proxy
            if proxy.faults() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert proxy.faults(), "no GET reached the proxy"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)  # far below the proxy's 120 s hold: the GETs were dropped
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr and "again" in stderr.strip().splitlines()[-1]
    assert not list((tmp_path / "dst").rglob("*.jpg")) and not (tmp_path / "dst" / ".pogona-parts").exists()


@pytest.fixture()
def forward_proxy(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """mitmproxy as a plain forward proxy (HTTP_PROXY), logging every request it carries."""
    from pogona_job.tools.locals3 import free_port

    port, log = free_port(), tmp_path / "forward.log"
    env = {**os.environ, "FAULTS": "slow:1.0", "FAULTS_SLOW_S": "0"}  # "slow" by 0 s: only logs the request
    args = [str(Path(sys.executable).parent / "mitmdump"), "--listen-host", "127.0.0.1", "--listen-port", str(port)]
    args += ["--set", f"confdir={tmp_path / 'fwd-conf'}", "--set", "termlog_verbosity=warn"]
    args += ["-s", str(ROOT / "tests" / "fault_addon.py")]
    proc = subprocess.Popen(args, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        for _ in range(300):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("bypass", [False, True])
def test_bulk_transfers_honour_http_proxy_and_no_proxy(
    s3: LocalS3,
    s3_client: Any,
    forward_proxy: tuple[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    bypass: bool,
) -> None:
    files = _dataset(s3_client, "faults/proxy", n=3)
    proxy, log = forward_proxy
    for key in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy)
    if bypass:
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    client = _client(s3, s3.endpoint, monkeypatch)
    pull.pull_prefix(client, S3Path(BUCKET, "faults/proxy"), tmp_path / "dst")
    assert {
        p.relative_to(tmp_path / "dst").as_posix(): p.read_bytes() for p in (tmp_path / "dst").rglob("*.jpg")
    } == files
    lines = log.read_text(errors="replace").splitlines()
    carried = [line for line in lines if line.startswith("FAULT slow GET /pogona-test/faults/proxy/images/")]
    assert len(carried) == (0 if bypass else 3), carried  # the GETs are obstore's


def test_dataset_pull_cli_a_key_that_is_another_keys_folder_is_exit_3_naming_both(
    s3: LocalS3, proxy_factory: Any, tmp_path: Path
) -> None:
    proxy = proxy_factory("conflict:1.0", match=r"list-type=2")  # AWS S3 holds `a` and `a/b`; SeaweedFS cannot
    env = job_env(s3, tmp_path, POGONA_DATASET_URI=f"s3://{BUCKET}/faults/aab", AWS_ENDPOINT_URL_S3=proxy.endpoint)
    result = run_here(["dataset", "pull", str(tmp_path / "dst")], env)
    assert result.code == 3, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "'faults/aab/a' and 'faults/aab/a/b'" in last and "Traceback" not in result.stderr


def test_dataset_pull_cli_handles_a_250_character_key(s3: LocalS3, s3_client: Any, tmp_path: Path) -> None:
    name = "k" * 246 + ".jpg"
    s3_client.put_object(Bucket=BUCKET, Key=f"faults/long/{name}", Body=b"long")
    env = job_env(s3, tmp_path, POGONA_DATASET_URI=f"s3://{BUCKET}/faults/long")
    result = run_here(["dataset", "pull", str(tmp_path / "dst")], env)
    assert result.code == 0, result.stderr[-2000:]
    assert (tmp_path / "dst" / name).read_bytes() == b"long"
