"""Shared fixtures: a real SeaweedFS server per session, ultralytics offline, tiny datasets.

Everything runs offline on loopback; servers are started on free ports and stopped at the end.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from pogona_job import logs
from pogona_job.tools.locals3 import LocalS3

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "pogona-test"
# A tiny but honest training setup: a real model from scratch, small images, few epochs.
TINY = {
    "POGONA_MODEL": "yolo11n.yaml",
    "POGONA_EPOCHS": "2",
    "POGONA_SANITY_EPOCHS": "3",
    "POGONA_IMGSZ": "128",
    "POGONA_BATCH": "8",
    "POGONA_DEVICE": "cpu",
    "POGONA_WORKERS": "0",
    "POGONA_LOG_FORMAT": "json",
    "POGONA_CHECKPOINT_MIN_INTERVAL_S": "0",
    # A from-scratch model scores 0 for its first ~10 epochs: tiny test runs would all fail the final verdict.
    # Tests of the verdict set it themselves (tests/test_report_headline.py).
    "POGONA_MIN_FINAL_MAP50": "0",
}

logs.CACHE_LOGGERS = False  # so structlog.testing.capture_logs() sees in-process runs


@pytest.fixture(scope="session", autouse=True)
def offline_ultralytics(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One ultralytics config dir for the session, prepared the way the job does it."""
    from pogona_job.training import offline

    for key in [k for k in os.environ if k.startswith(("POGONA_", "AWS_"))]:
        del os.environ[key]  # a developer's own settings must not leak into the tests
    os.environ["YOLO_CONFIG_DIR"] = str(tmp_path_factory.mktemp("yolo-config"))
    offline.prepare(Path(os.environ["YOLO_CONFIG_DIR"]))


@pytest.fixture(scope="session")
def s3() -> Iterator[LocalS3]:
    with LocalS3(buckets=[BUCKET, "pogona-other"]) as server:
        yield server


@pytest.fixture(scope="session")
def s3_client(s3: LocalS3):  # type: ignore[no-untyped-def]
    return boto3.client(
        "s3",
        endpoint_url=s3.endpoint,
        aws_access_key_id=s3.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3.env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pogona_job.tools.demo import write_demo

    dest = tmp_path_factory.mktemp("demo")
    write_demo(dest, n_images=48, size=128, seed=0)
    return dest


@pytest.fixture(scope="session")
def demo_uri(s3: LocalS3, s3_client, demo_dir: Path) -> str:  # type: ignore[no-untyped-def]
    """The demo dataset in the bucket, pushed the way users push theirs."""
    from pogona_job.s3 import storage

    uri = f"s3://{BUCKET}/datasets/demo"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3.env.items():
            mp.setenv(key, value)
        storage.push_tree(storage.make_client(), demo_dir, storage.S3Path.parse(uri))
    return uri


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def output_uri(tmp_path: Path) -> str:
    """A bucket prefix of the test's own (named after its tmp_path, which pytest makes unique per
    test), so no test sees another's runs, latest.json or uploads, whatever the order."""
    digest = hashlib.sha1(str(tmp_path).encode()).hexdigest()[:8]
    return f"s3://{BUCKET}/t/{tmp_path.name}-{digest}/runs"


def out_key(env: Mapping[str, str], *parts: str) -> str:
    """The bucket key of `parts` under this env's POGONA_OUTPUT_URI, e.g. out_key(env, run, "manifest.json")."""
    prefix = env["POGONA_OUTPUT_URI"].removeprefix(f"s3://{BUCKET}/")
    return "/".join([prefix, *parts])


def job_env(s3: LocalS3, tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POGONA_", "AWS_"))}
    env.update(s3.env)
    env.update(TINY)
    env.update(POGONA_OUTPUT_URI=output_uri(tmp_path), POGONA_WORK_DIR=str(tmp_path / "work"))
    env.update(overrides)
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 600) -> Result:
    """The real console entry point in a child process: real exit codes, real stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "pogona_job", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


class FaultProxy:
    """mitmproxy (reverse mode) in front of the S3 server, failing a share of requests (tests/fault_addon.py),
    or running another addon of tests/ configured by `env` (record_addon.py, pause_addon.py)."""

    def __init__(
        self,
        upstream: str,
        faults: str,
        tmp: Path,
        match: str = ".*",
        seed: int = 1,
        slow_s: float = 2,
        addon: str = "fault_addon.py",
        env: Mapping[str, str] | None = None,
    ) -> None:
        from pogona_job.tools.locals3 import free_port

        self.port = free_port()
        self.log = tmp / f"mitm-{self.port}.log"
        environ = {
            **os.environ,
            **(env or {}),
            "FAULTS": faults,
            "FAULTS_MATCH": match,
            "FAULTS_SEED": str(seed),
            "FAULTS_SLOW_S": str(slow_s),
        }
        mitmdump = Path(sys.executable).parent / "mitmdump"
        args = [
            str(mitmdump),
            "--mode",
            f"reverse:{upstream}",
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(self.port),
            "--set",
            "keep_host_header=true",
            "--set",
            f"confdir={tmp / 'mitm-conf'}",
            "--set",
            "flow_detail=0",
            "--set",
            "termlog_verbosity=warn",
            "-s",
            str(ROOT / "tests" / addon),
        ]
        self.proc = subprocess.Popen(args, env=environ, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        import socket
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mitmdump did not start: {self.log.read_text()[-2000:]}")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def faults(self) -> list[str]:
        return [line for line in self.log.read_text(errors="replace").splitlines() if line.startswith("FAULT ")]

    def records(self) -> list[tuple[int, str, str]]:
        """(status, method, path?query) of every request, in order (with addon="record_addon.py")."""
        lines = [line.split(" ", 3) for line in self.log.read_text(errors="replace").splitlines()]
        return [(int(p[1]), p[2], p[3]) for p in lines if p[0] == "RECORD" and len(p) == 4]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Servers and jobs started by the tests must be gone when they end."""
    left = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True).stdout.split()
    alive = [pid for pid in left if Path(f"/proc/{pid}").exists()]
    if alive:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nprocesses left behind by the tests: {alive}", file=sys.stderr)
