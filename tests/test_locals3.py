"""The local S3 server starts even when another process takes one of its ports in between, and never
outlives the process that started it (issue #19: `make mutants` left 107 SeaweedFS servers behind, one
per mutant run whose session fixture never got to stop its server)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pogona_job.tools import locals3
from pogona_job.tools.locals3 import LocalS3
from tests.helpers import ROOT, alive, client_for

STARTER = """
import sys, time
from pathlib import Path
from pogona_job.tools.locals3 import LocalS3
server = LocalS3(buckets=["pdeath-test"], data_dir=Path(sys.argv[1])).start(timeout=120)
print(server.proc.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_the_server_dies_when_the_process_that_started_it_is_killed(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    assert starter.stdout is not None
    server = int(starter.stdout.readline())
    assert alive(server)
    starter.send_signal(signal.SIGKILL)  # no finaliser, no atexit: only the kernel can tell the server
    starter.wait(30)
    deadline = time.monotonic() + 30
    while alive(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(server):
        os.kill(server, signal.SIGKILL)
        pytest.fail(f"SeaweedFS (pid {server}) outlived the process that started it")


def test_a_port_taken_between_picking_and_binding_is_picked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: two test workers starting servers at once could pick the same free port; the second server
    exited ("bind: address already in use") and every test of that worker errored."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        picks = iter([busy])  # the first port the start picks (the master's) is someone else's by then
        pick_free = locals3.free_port
        server = LocalS3(buckets=["pogona-ports"])
        monkeypatch.setattr(locals3, "free_port", lambda: next(picks, None) or pick_free())
        try:
            server.start()
            assert client_for(server).head_bucket(Bucket="pogona-ports")["ResponseMetadata"]["HTTPStatusCode"] == 200
            assert f"port {busy} " in (server.data_dir / "weed.log").read_text(errors="replace")  # refused once
        finally:
            server.stop()
