"""`dataset pull` against a real SeaweedFS server: the user's files in DEST are never lost, and a pull
killed with -9 is re-run as is."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from pogona_job import cli
from pogona_job.s3 import pull, storage
from pogona_job.s3.storage import S3Path
from pogona_job.tools.locals3 import LocalS3
from tests.conftest import BUCKET, ROOT


@pytest.fixture()
def client(s3: LocalS3, monkeypatch: pytest.MonkeyPatch) -> Any:
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return storage.make_client(threads=4, max_attempts=2)


def _put(client: Any, prefix: str, files: dict[str, bytes]) -> None:
    for rel, body in files.items():
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{rel}", Body=body)


def _cli_pull(monkeypatch: pytest.MonkeyPatch, prefix: str, dest: Path, *flags: str) -> int:
    monkeypatch.setenv("POGONA_DATASET_URI", f"s3://{BUCKET}/{prefix}")
    monkeypatch.setenv("POGONA_LOG_FORMAT", "json")
    return cli.main(["dataset", "pull", *flags, str(dest)])


def test_a_pulled_file_the_user_edited_is_kept_when_its_key_disappears(client: Any, tmp_path: Path) -> None:
    prefix = f"pull/{tmp_path.name}"
    _put(client, prefix, {"labels/a.txt": b"0 0.5 0.5 0.1 0.1\n", "labels/b.txt": b"b", "labels/c.txt": b"c"})
    dest = tmp_path / "dst"
    pull.pull_prefix(client, S3Path(BUCKET, prefix), dest)
    (dest / "labels" / "a.txt").write_text("0 0.5 0.5 0.1 0.1\n1 0.2 0.2 0.1 0.1\n")  # the user fixed a label
    client.delete_objects(
        Bucket=BUCKET, Delete={"Objects": [{"Key": f"{prefix}/labels/a.txt"}, {"Key": f"{prefix}/labels/b.txt"}]}
    )
    result = pull.pull_prefix(client, S3Path(BUCKET, prefix), dest)
    assert (dest / "labels" / "a.txt").read_text().count("\n") == 2  # kept
    assert not (dest / "labels" / "b.txt").exists()  # the pull's own, unchanged: pruned
    assert [n for n in result.notes if n.startswith("kept labels/a.txt")], result.notes
    again = pull.pull_prefix(client, S3Path(BUCKET, prefix), dest)  # no longer the pull's: never pruned later
    assert (dest / "labels" / "a.txt").exists() and not again.notes


def test_a_pulled_file_the_user_edited_is_not_overwritten_when_the_bucket_changes(client: Any, tmp_path: Path) -> None:
    prefix = f"pull/{tmp_path.name}"
    _put(client, prefix, {"a.txt": b"v1"})
    dest = tmp_path / "dst"
    pull.pull_prefix(client, S3Path(BUCKET, prefix), dest)
    (dest / "a.txt").write_text("the user's v1b")
    _put(client, prefix, {"a.txt": b"v2 from the bucket"})
    result = pull.pull_prefix(client, S3Path(BUCKET, prefix), dest)
    assert (dest / "a.txt").read_text() == "the user's v1b" and result.fetched == 0 and len(result.notes) == 1
    forced = pull.pull_prefix(client, S3Path(BUCKET, prefix), dest, replace=True)
    assert (dest / "a.txt").read_bytes() == b"v2 from the bucket" and forced.fetched == 1


def test_a_users_own_file_is_not_replaced_by_a_new_key_without_force(
    client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = f"pull/{tmp_path.name}"
    _put(client, prefix, {"data.yaml": b"names: [head]\n"})
    dest = tmp_path / "dst"
    assert _cli_pull(monkeypatch, prefix, dest) == 0
    (dest / "mine.txt").write_text("my notes")
    _put(client, prefix, {"mine.txt": b"the bucket's mine.txt"})
    assert _cli_pull(monkeypatch, prefix, dest) == 0
    out = capsys.readouterr().out
    assert (dest / "mine.txt").read_text() == "my notes"
    assert "note: kept mine.txt" in out and "--force" in out and "1 of your files kept" in out
    assert _cli_pull(monkeypatch, prefix, dest, "--force") == 0
    assert (dest / "mine.txt").read_bytes() == b"the bucket's mine.txt"


# A pull in a child process that SIGKILLs itself just before the 4th file is renamed into place.
_KILLED_PULL = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from pogona_job.s3 import pull, storage

    calls, real = [0], os.replace

    def replace(src, dst):
        calls[0] += "images" in str(dst)  # a dataset file, not the index
        if calls[0] == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)

    pull.os.replace = replace
    client = storage.make_client(threads=1, max_attempts=2)
    pull.pull_prefix(client, storage.S3Path.parse(sys.argv[1]), Path(sys.argv[2]), threads=1)
    """
)


def test_a_pull_killed_with_sigkill_is_run_again_as_is(
    s3: LocalS3, client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = f"pull/{tmp_path.name}"
    files = {f"images/f{i}.jpg": bytes([i]) * (100 + i) for i in range(8)}
    _put(client, prefix, files)
    dest = tmp_path / "dst"
    env = {**os.environ, **s3.env, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_PULL, f"s3://{BUCKET}/{prefix}", str(dest)], env=env, timeout=120
    )
    assert killed.returncode == -9
    assert len(list((dest / "images").iterdir())) == 3  # three files placed, then killed
    assert _cli_pull(monkeypatch, prefix, dest) == 0, capsys.readouterr().err  # not refused as a foreign folder
    assert "5 fetched, 3 already cached" in capsys.readouterr().out
    assert {p.relative_to(dest).as_posix(): p.read_bytes() for p in (dest / "images").iterdir()} == files
    assert not (dest / pull.JOURNAL).exists() and not (dest / ".pogona-parts").exists()


def test_pulling_into_a_regular_file_is_exit_2_with_one_sentence(
    client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "dst").write_text("a file, not a folder")
    assert _cli_pull(monkeypatch, f"pull/{tmp_path.name}", tmp_path / "dst") == 2
    err = capsys.readouterr().err
    assert "exists and is not a folder" in err and "Traceback" not in err
    assert (tmp_path / "dst").read_text() == "a file, not a folder"
