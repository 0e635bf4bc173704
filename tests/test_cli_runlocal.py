"""`make run-local` keeps its bucket: the server outlives the command, a second call re-uses it, a restart
keeps the objects, and `make run-local-stop` (rehearsal --stop) stops it and removes the folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3

from pogona_job.tools.locals3 import running, start_kept
from tests.conftest import ROOT


def _client(env: dict[str, str]):  # type: ignore[no-untyped-def]
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


def test_the_kept_server_is_found_again_keeps_its_objects_across_a_restart_and_stops(tmp_path: Path) -> None:
    data = tmp_path / ".run-local" / "s3"
    data.mkdir(parents=True)
    first = last = start_kept(data, ["pogona-demo"])
    pid = first.proc.pid if first.proc else 0
    try:
        _client(first.env).put_object(Bucket="pogona-demo", Key="runs/r1/manifest.json", Body=b"{}")
        again = running(data, ["pogona-demo"])  # what the next `make run-local` does
        assert again is not None and again.endpoint == first.endpoint
        os.killpg(pid, 15)  # the machine rebooted, say
        first.proc.wait(10)  # type: ignore[union-attr]
        assert running(data, ["pogona-demo"]) is None
        restarted = last = start_kept(data, ["pogona-demo"])
        assert restarted.port == first.port  # the printed commands stay valid
        assert (
            _client(restarted.env).get_object(Bucket="pogona-demo", Key="runs/r1/manifest.json")["Body"].read() == b"{}"
        )
    finally:
        proc = subprocess.run(
            [sys.executable, "-m", "pogona_job.tools.rehearsal", "--stop"],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 0, proc.stderr
    assert "Stopped the local S3 server" in proc.stdout
    assert not (tmp_path / ".run-local").exists()
    # The server is this test's child here (a zombie until reaped): it has exited when wait() returns.
    assert last.proc is not None and last.proc.wait(timeout=10) is not None
