"""The fork server the signal and kill tests start their jobs from (tests/forkserver.py): a child is a
process of its own session with exactly the environment it was given, and its exit code and the signal
that ended it come back as `subprocess` reports them."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from tests import forkserver

pytestmark = pytest.mark.slow  # each test starts job processes


def test_a_forked_child_runs_the_command_with_its_own_environment_and_session(tmp_path: Path) -> None:
    out, err = tmp_path / "out", tmp_path / "err"
    env = {"PATH": os.environ["PATH"], "POGONA_EPOCHS": "7", "POGONA_LOG_FORMAT": "json"}
    child = forkserver.server().start(["config"], env, stderr=err, stdout=out)
    assert child.wait(60) == 0, err.read_text()
    assert json.loads(out.read_text())["POGONA_EPOCHS"] == 7  # what it was given, nothing of this process's
    assert os.getsid(0) != child.pid  # it led a session of its own (a killpg reaches it and its workers only)


def test_exit_codes_and_signals_come_back_as_subprocess_reports_them(tmp_path: Path) -> None:
    server, path = forkserver.server(), {"PATH": os.environ["PATH"]}
    bad = server.start(["dataset", "validate", str(tmp_path / "missing")], path, tmp_path / "e1")
    assert bad.wait(60) == 3 and "is not a folder" in (tmp_path / "e1").read_text()
    with socket.socket() as silent:  # an endpoint that takes the connection and never answers: the pull waits
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        env = {
            **path,
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{silent.getsockname()[1]}",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "POGONA_DATASET_URI": "s3://bucket/data",
        }
        waiting = server.start(["dataset", "pull", str(tmp_path / "dst")], env, tmp_path / "e2")
        time.sleep(1)
        assert waiting.poll() is None, (tmp_path / "e2").read_text()
        os.killpg(waiting.pid, signal.SIGKILL)
        assert waiting.wait(30) == -signal.SIGKILL
