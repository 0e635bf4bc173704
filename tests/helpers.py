"""What many test files need, in one place: the job's environment, the job run in this process or in a
child process, and readers of what it left in the bucket.

In this process (`run_here`) is the default: the same `cli.main` the console script calls, with the
same environment, without a child's seconds of `import torch, ultralytics`. A child process is for what
only a process shows: `JobProcess` (forked from a pre-imported fork server, tests/forkserver.py) for a
signal, a kill -9, a pause; `run_cli` (a new interpreter, `python -m pogona_job`) for the exit code the
console script itself returns and stderr that nothing but our JSON lines may reach.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pogona_job.tools.locals3 import LocalS3

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "pogona-test"
# A tiny but honest training setup: a real model from scratch, small images, few epochs.
TINY = {
    "POGONA_MODEL": "yolo11n.yaml",
    "POGONA_EPOCHS": "3",  # in all: the 2 sanity epochs are the first of the one training
    "POGONA_SANITY_EPOCHS": "2",
    "POGONA_IMGSZ": "128",
    "POGONA_BATCH": "8",
    "POGONA_DEVICE": "cpu",
    "POGONA_WORKERS": "0",
    "POGONA_LOG_FORMAT": "json",
    "POGONA_CHECKPOINT_MIN_INTERVAL_S": "0",
    # A from-scratch model scores 0 for its first ~10 epochs: tiny test runs would all fail the final verdict.
    # Tests of the verdict set it themselves (tests/test_report_headline.py).
    "POGONA_MIN_FINAL_MAP50": "0",
    # The ONNX export and its onnxruntime check cost seconds a run; the runs that test them turn them on
    # (tests/test_job.py's healthy run, the promotion runs, tests/test_export.py).
    "POGONA_EXPORT_FORMATS": "none",
}
Event = dict[str, Any]


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def sentence(self) -> str:
        """The last line on stderr: the one sentence a failure ends with."""
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""

    def events(self) -> list[Event]:
        return events(self.stderr)


# --- the job's environment -----------------------------------------------------------------------


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


# --- the job, here or in a child ------------------------------------------------------------------


def run_here(args: list[str], env: Mapping[str, str]) -> Result:
    """`pogona-job ARGS` in this process with exactly `env` as its environment: the code the console
    script runs (`cli.main`), its return value the exit code, its stdout and stderr (our JSON log lines
    and the closing sentence) captured. The environment and the signal handlers (`dataset pull` installs
    its own) are restored afterwards."""
    from pogona_job import cli

    saved = dict(os.environ)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    out, err = io.StringIO(), io.StringIO()
    os.environ.clear()
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(args)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return Result(code, out.getvalue(), err.getvalue())


def run_cli(args: list[str], env: dict[str, str], timeout: float = 600) -> Result:
    """The real console entry point in a child process: real exit codes, real stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "pogona_job", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


class JobProcess:
    """`pogona-job ARGS` (default: run) in a child process of its own session, for signals and kills, forked
    from the test process's fork server (tests/forkserver.py: a real process without the imports' seconds);
    its stderr lines are collected as they come, from `log` (a file of the test's own when not given)."""

    started: list[JobProcess] = []  # noqa: RUF012 - every one, so that a fixture can reap them

    def __init__(self, env: Mapping[str, str], args: list[str] | None = None, log: Path | None = None) -> None:
        from tests import forkserver

        self._own_log = log is None
        if log is None:
            fd, name = tempfile.mkstemp(prefix="pogona-job-", suffix=".log")
            os.close(fd)
            log = Path(name)
        self.log = log
        self.proc = forkserver.server().start(args or ["run"], env, stderr=log)
        JobProcess.started.append(self)
        self.lines: list[str] = []
        self._events: queue.Queue[Event] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        """Follow the log file as the job writes it, until the job has ended and every line is read."""
        with open(self.log, encoding="utf-8", errors="replace") as source:
            partial = ""
            while True:
                ended = self.proc.poll() is not None  # before reading: what it wrote before ending is read below
                chunk = source.read()
                partial += chunk
                *complete, partial = partial.split("\n")
                for line in complete:
                    self.lines.append(line + "\n")
                    if line.startswith("{"):
                        with contextlib.suppress(ValueError):
                            self._events.put(json.loads(line))
                if ended and not chunk:
                    if partial:
                        self.lines.append(partial)
                    return
                if not chunk:
                    time.sleep(0.05)

    def wait_for(self, match: Callable[[Event], bool], timeout: float = 180) -> Event:
        """The first log event that matches (events already consumed by an earlier wait_for are not seen again)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self._events.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None and not self._reader.is_alive():
                    break
                continue
            if match(event):
                return event
        raise AssertionError("event never came; log tail:\n" + self.tail())

    def signal_and_wait(self, signum: int, timeout: float = 120) -> int:
        os.kill(self.proc.pid, signum)
        return self.wait(timeout)

    def wait(self, timeout: float = 600) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def kill(self) -> None:
        """SIGKILL to the whole process group (the job and any dataloader or DDP workers)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._reader.join(10)

    def events(self) -> list[Event]:
        return events("".join(self.lines))

    def tail(self, n: int = 25) -> str:
        return "".join(self.lines[-n:])

    @classmethod
    def reap(cls) -> None:
        while cls.started:
            job = cls.started.pop()
            job.kill()
            if job._own_log:
                job.log.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    """The process is running: neither gone nor a zombie its parent has not reaped yet (a process that is
    not this one's child cannot be waited for)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


# --- what the job left in the bucket ----------------------------------------------------------------


def client_for(server: LocalS3) -> Any:
    """A boto3 client of the test server with its credentials (a reader independent of the job's own client)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=server.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=server.env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


def objects(client: Any, prefix: str, *, relative: bool = False) -> dict[str, dict[str, Any]]:
    """Every object under `prefix`, by key (by the key after `prefix` when `relative`)."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    found = {o["Key"]: o for page in pages for o in page.get("Contents", [])}
    return {k.removeprefix(prefix): o for k, o in found.items()} if relative else found


def keys(client: Any, prefix: str) -> set[str]:
    return set(objects(client, prefix))


def body(client: Any, key: str) -> bytes:
    data: bytes = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return data


def get_json(client: Any, key: str) -> Any:
    return json.loads(body(client, key))


def maybe_json(client: Any, key: str) -> Any:
    """The JSON object at `key`, or None when there is none."""
    return get_json(client, key) if key in keys(client, key) else None


def rows(client: Any, key: str) -> list[dict[str, str]]:
    """A CSV object (results.csv) as rows."""
    return list(csv.DictReader(io.StringIO(body(client, key).decode())))


def epochs(client: Any, key: str) -> list[int]:
    """The epoch column of a results.csv in the bucket."""
    return [int(r["epoch"]) for r in rows(client, key)]


def events(text: str) -> list[Event]:
    """Our JSON log lines in `text` (a line that does not parse, e.g. cut by a kill, is skipped)."""
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def is_event(name: str, **fields: Any) -> Callable[[Event], bool]:
    """A matcher for JobProcess.wait_for: the log event `name` with these fields."""
    return lambda e: e.get("event") == name and all(e.get(k) == v for k, v in fields.items())
