"""`make run-local` keeps its bucket: the server outlives the command, a second call re-uses it, a restart
keeps the objects, and `make run-local-stop` (rehearsal --stop) stops it and removes the folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pogona_job.tools.locals3 import running, start_kept
from tests.conftest import ROOT
from tests.helpers import alive, client_for


def _start_kept_and_exit(data: Path) -> None:
    """What `make run-local` does: a process starts the kept server, then ends."""
    start = (
        "from pathlib import Path; from pogona_job.tools.locals3 import start_kept; "
        f"start_kept(Path({str(data)!r}), ['pogona-demo'])"
    )
    subprocess.run([sys.executable, "-c", start], env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, timeout=60)


def test_the_kept_server_outlives_its_command_keeps_its_objects_across_a_restart_and_stops(tmp_path: Path) -> None:
    """Before: the server died with the `make run-local` that started it (the die-with-parent signal every
    test server gets), and the commands it printed to try next found nothing listening."""
    data = tmp_path / ".run-local" / "s3"
    data.mkdir(parents=True)
    _start_kept_and_exit(data)
    first = running(data, ["pogona-demo"])  # what the user's next command, or the next `make run-local`, finds
    last = None
    assert first is not None, "the kept server ended with the process that started it"
    pid = int(json.loads((data / "server.json").read_text())["pid"])
    try:
        client_for(first).put_object(Bucket="pogona-demo", Key="runs/r1/manifest.json", Body=b"{}")
        os.killpg(pid, 15)  # the machine rebooted, say
        deadline = time.monotonic() + 20
        while alive(pid) and time.monotonic() < deadline:  # not our child: no wait(); its whole exit
            time.sleep(0.2)
        assert running(data, ["pogona-demo"]) is None
        restarted = last = start_kept(data, ["pogona-demo"])
        assert restarted.port == first.port  # the printed commands stay valid
        assert (
            client_for(restarted).get_object(Bucket="pogona-demo", Key="runs/r1/manifest.json")["Body"].read() == b"{}"
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
    # The restarted server is this test's child (a zombie until reaped): it has exited when wait() returns.
    assert last is not None and last.proc is not None and last.proc.wait(timeout=10) is not None
