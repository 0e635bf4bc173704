"""Credentials in the endpoint URL (`http://user:password@host:port`) never reach a sentence, a log line, the
manifest or report.md, whatever library wrote the text: a real SeaweedFS behind a proxy that fails requests."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pogona_job import cli, logs
from pogona_job.tools.locals3 import LocalS3
from tests.conftest import BUCKET, FaultProxy, job_env, out_key, run_cli

PASSWORD = "S3cr3t-pw"


@pytest.fixture()
def proxy_factory(s3: LocalS3, tmp_path: Path) -> Iterator[Any]:
    started: list[FaultProxy] = []

    def start(faults: str, **kwargs: Any) -> FaultProxy:
        started.append(FaultProxy(s3.endpoint, faults, tmp_path, **kwargs))
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()


def _with_password(endpoint: str) -> str:
    return endpoint.replace("http://", f"http://alice:{PASSWORD}@")


def _files_with(root: Path, secret: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_a_400_on_a_dataset_get_names_no_password_in_the_sentence_or_the_log(
    s3: LocalS3,
    s3_client: Any,
    proxy_factory: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    prefix = f"secrets/{tmp_path.name}"
    s3_client.put_object(Bucket=BUCKET, Key=f"{prefix}/images/a.jpg", Body=b"jpeg")
    proxy = proxy_factory("400:1.0", match=rf"^GET /{BUCKET}/{prefix}/images/")
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", _with_password(proxy.endpoint))
    monkeypatch.setenv("POGONA_DATASET_URI", f"s3://{BUCKET}/{prefix}")
    monkeypatch.setenv("POGONA_S3_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("POGONA_LOG_FORMAT", "json")
    code = cli.main(["dataset", "pull", str(tmp_path / "dst")])
    assert proxy.faults(), "the proxy injected nothing: the test would prove nothing"
    logging.getLogger("urllib3.connectionpool").warning("Retrying %s", _with_password(proxy.endpoint))  # any library
    out, err = capsys.readouterr()
    sentences = [line for line in err.splitlines() if line and not line.startswith("{")]
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert code == 6 and len(sentences) == 1 and "Storage error InvalidRequest" in sentences[0], err
    assert PASSWORD not in out + err
    assert f"http://****@127.0.0.1:{proxy.port}" in sentences[0]  # masked, not dropped: the user still sees where
    assert [e for e in events if e["event"] == "library" and "****@" in e["message"]]


def test_connection_resets_on_dataset_gets_publish_no_password_in_manifest_report_or_log(
    s3: LocalS3, s3_client: Any, demo_uri: str, proxy_factory: Any, tmp_path: Path
) -> None:
    proxy = proxy_factory("reset:1.0", match=rf"^GET /{BUCKET}/datasets/demo/")
    env = job_env(
        s3,
        tmp_path,
        POGONA_DATASET_URI=demo_uri,
        POGONA_RUN_ID="leaky",
        POGONA_S3_MAX_ATTEMPTS="2",
        AWS_ENDPOINT_URL_S3=_with_password(proxy.endpoint),
    )
    result = run_cli(["run"], env)
    assert result.code == 75, result.stderr[-3000:]
    assert proxy.faults(), "the proxy injected nothing: the test would prove nothing"
    manifest = s3_client.get_object(Bucket=BUCKET, Key=out_key(env, "leaky", "manifest.json"))["Body"].read()
    report = s3_client.get_object(Bucket=BUCKET, Key=out_key(env, "leaky", "report.md"))["Body"].read()
    assert b"Could not reach the storage endpoint" in manifest and b"http://****@127.0.0.1" in manifest
    for text in (manifest, report, result.stderr.encode(), result.stdout.encode()):
        assert PASSWORD.encode() not in text
    listing = s3_client.list_objects_v2(Bucket=BUCKET, Prefix=out_key(env, "leaky"))["Contents"]
    for obj in listing:  # config.json, progress.json, problems.txt ...: nothing in the bucket has it
        assert PASSWORD.encode() not in s3_client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read(), obj
    assert _files_with(tmp_path / "work", PASSWORD.encode()) == []


def test_the_log_masks_userinfo_in_fields_and_in_rendered_tracebacks(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("json")
    try:
        raise ConnectionError(f"error sending request for url (http://bob:{PASSWORD}@10.0.0.1:9000/b/k)")
    except ConnectionError:
        logs.get_logger().error("storage", url=f"https://bob:{PASSWORD}@s3.example", exc_info=True)
    err = capsys.readouterr().err
    assert PASSWORD not in err and "https://****@s3.example" in err and "http://****@10.0.0.1:9000" in err
