"""A fork server for the job processes the tests start: one interpreter that has imported torch,
ultralytics and the job once, and forks a child for each job.

A job started as `python -m pogona_job` spends seconds of CPU importing torch, ultralytics, matplotlib
and the job before its first line of work, and the suite starts about a hundred such processes on two
cores. A child forked from this server is still a real process of its own session: real signals, a real
kill -9 of its group, its own exit code and stderr, and the same `cli.main` the console script runs.
What it does not show is the interpreter's own start and the `python -m pogona_job` entry point, so the
tests of those (the console script's exit code, stderr holding nothing but our JSON lines, the image's
entrypoint) start a real interpreter (`helpers.run_cli`).

Fork safety: the server is one thread that only imports (no torch operation, no S3 client, no
onnxruntime session is created before a fork), and each child resets the signal handlers and the
environment the way a new process starts.

Protocol, one JSON object per line: the client writes {"args", "env", "cwd", "stdout", "stderr"}; the
server answers {"pid"} for each, in order, and {"exited": pid, "code": returncode} when a child ends
(the code as subprocess reports it: negative for a signal). End of input ends the server, and any child
still running is killed with its process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


# --- the server (python -m tests.forkserver) ----------------------------------------------------------


def _preload() -> None:
    """What every job imports, imported once. Nothing here may start a thread that a child would need."""
    import matplotlib

    matplotlib.use("Agg")
    import markdown
    import matplotlib.pyplot
    import requests
    import scipy.fft
    import scipy.special
    import thop
    import torch
    import torch._dynamo
    import torchvision
    import ultralytics.models.yolo.detect  # noqa: F401

    # What a job's first training imports besides (measured: a child's first run took 1.1 s longer than its
    # second without these, 0.3 s with them). Not polars: its import starts a thread pool that a forked
    # child would find without its threads.
    del markdown, requests, scipy, thop, torchvision

    import pogona_job.cli
    import pogona_job.evaluation.export
    import pogona_job.run.job
    import pogona_job.run.phases
    import pogona_job.tools.predict  # noqa: F401

    del torch


def _child(request: dict[str, Any]) -> None:
    """In the forked child: become a new process in a new session, then run the job's command. Never returns."""
    code: int | str | None = 1
    try:
        os.setsid()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for signum in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        os.chdir(request["cwd"])
        null = os.open(os.devnull, os.O_RDWR)
        out = os.open(request["stdout"], os.O_WRONLY | os.O_APPEND) if request["stdout"] else null
        err = os.open(request["stderr"], os.O_WRONLY | os.O_APPEND)
        for fd, target in ((0, null), (1, out), (2, err)):
            os.dup2(target, fd)
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["pogona-job", *request["args"]]
        from pogona_job.cli import entry

        entry(request["args"])  # as the console script ends: exit handlers, then the process exits
    except SystemExit as done:
        code = done.code
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
    # Only when the command raised before it could end the process itself: the interpreter's own exit.
    raise SystemExit(code)


def serve() -> None:
    _preload()
    children: set[int] = set()
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.05)
        while children:  # reap every child that ended, so no zombie outlives its report
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            print(json.dumps({"exited": pid, "code": os.waitstatus_to_exitcode(status)}), flush=True)
        if not readable:
            continue
        chunk = os.read(0, 1 << 16)
        if not chunk:
            break
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            pid = os.fork()
            if pid == 0:
                _child(json.loads(line))
            children.add(pid)
            print(json.dumps({"pid": pid}), flush=True)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    for pid in children:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


# --- the client (in the test process) -------------------------------------------------------------------


class ForkServer:
    """The server as a child of this test process, and the children it forked for this process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.forkserver"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._lock = threading.Lock()  # one request at a time: answers come in order
        self._answers: list[int] = []
        self._exits: dict[int, int] = {}
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            message = json.loads(line)
            with self._changed:
                if "pid" in message:
                    self._answers.append(message["pid"])
                else:
                    self._exits[message["exited"]] = message["code"]
                self._changed.notify_all()
        with self._changed:  # the server is gone: nothing will come any more
            self._changed.notify_all()

    def start(
        self, args: list[str], env: Mapping[str, str], stderr: Path, stdout: Path | None = None, cwd: Path = ROOT
    ) -> Forked:
        for path in (stderr, stdout):  # made here, empty, so that a reader can open them before the child writes
            if path is not None:
                path.write_bytes(b"")
        request = {"args": args, "env": dict(env), "cwd": str(cwd), "stderr": str(stderr), "stdout": str(stdout or "")}
        with self._lock:
            assert self.proc.stdin
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            with self._changed:
                if not self._changed.wait_for(lambda: self._answers or self.proc.poll() is not None, timeout=120):
                    raise RuntimeError("the fork server did not answer in 120 s")
                if not self._answers:
                    raise RuntimeError(f"the fork server ended (exit {self.proc.returncode})")
                pid = self._answers.pop(0)
        return Forked(self, pid, args)

    def returncode(self, pid: int, timeout: float | None) -> int | None:
        """The child's exit code once the server reaped it; None while it runs (after waiting up to `timeout`)."""
        with self._changed:
            self._changed.wait_for(lambda: pid in self._exits or self.proc.poll() is not None, timeout=timeout)
            return self._exits.get(pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Forked:
    """A job forked by the server, with the part of `subprocess.Popen`'s interface the tests use."""

    def __init__(self, server: ForkServer, pid: int, args: list[str]) -> None:
        self.server, self.pid, self.args = server, pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.returncode(self.pid, timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            self.returncode = self.server.returncode(self.pid, timeout=min(left, 1) if left is not None else 1)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


_server: ForkServer | None = None


def server() -> ForkServer:
    """This test process's fork server, started on first use (tests/conftest.py closes it at the end)."""
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = ForkServer()
    return _server


def close() -> None:
    global _server
    if _server is not None:
        _server.close()
        _server = None


if __name__ == "__main__":
    serve()
