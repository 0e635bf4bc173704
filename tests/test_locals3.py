"""The local S3 server never outlives the process that started it (issue #19: `make mutants` left 107
SeaweedFS servers behind, one per mutant run whose session fixture never got to stop its server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT

STARTER = """
import sys, time
from pathlib import Path
from pogona_job.tools.locals3 import LocalS3
server = LocalS3(buckets=["pdeath-test"], data_dir=Path(sys.argv[1])).start(timeout=120)
print(server.proc.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_the_server_dies_when_the_process_that_started_it_is_killed(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    assert starter.stdout is not None
    server = int(starter.stdout.readline())
    assert _alive(server)
    starter.send_signal(signal.SIGKILL)  # no finaliser, no atexit: only the kernel can tell the server
    starter.wait(30)
    deadline = time.monotonic() + 30
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(server):
        os.kill(server, signal.SIGKILL)
        pytest.fail(f"SeaweedFS (pid {server}) outlived the process that started it")
