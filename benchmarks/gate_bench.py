"""How fast the batch watchdog stops a run with the MPS signature, against one healthy epoch (issue #3).

In one run, on this machine's CPU, against a real SeaweedFS bucket on loopback:

(a) the MPS no-foreground signature is injected the way tests/test_gate_training.py does it (the
    label assigner returns zeroed target scores and foreground mask, so box_loss = dfl_loss = 0
    while cls_loss stays large) and the whole job runs in-process (`job.run(load_settings())`);
    measured: time from ultralytics' training start (`on_train_start`) to the watchdog's abort,
    and the batches it saw (the manifest's `watchdog.batches`);
(b) the same job, healthy, is timed for one epoch (its training batches, from
    `on_train_epoch_start` to `on_train_epoch_end`) and then stopped.

The demo dataset is sized like the origin dataset (2,974 images) so an epoch has as many batches
as a real one; with the 120-image demo an epoch is only 6 batches and no abort can be "early".
Writes the `gate_bench.py` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BENCH_DIR, BENCHMARKS_MD, BUCKET, Row, base_env, markdown_table, stamp_line, update_section
from bench import in_process_env as environment

ORIGIN_IMAGES = 2974  # labelled images in the dataset the project grew out of (training-log-origin.md)


@dataclass
class Clock:
    """Timestamps from ultralytics callbacks, installed as defaults so every model the job builds gets them."""

    train_start: float | None = None
    batch_ends: list[float] = field(default_factory=list)
    epoch_start: float | None = None
    epoch_train_s: float | None = None  # training batches of the first epoch
    epoch_total_s: float | None = None  # ... plus its validation
    tripped_at: float | None = None
    stop_after_first_epoch: bool = False

    def on_train_start(self, trainer: Any) -> None:
        self.train_start = self.train_start or time.monotonic()

    def on_train_epoch_start(self, trainer: Any) -> None:
        self.epoch_start = self.epoch_start or time.monotonic()

    def on_train_batch_end(self, trainer: Any) -> None:
        self.batch_ends.append(time.monotonic())

    def on_train_epoch_end(self, trainer: Any) -> None:
        if self.epoch_train_s is None and self.epoch_start is not None:
            self.epoch_train_s = time.monotonic() - self.epoch_start

    def on_fit_epoch_end(self, trainer: Any) -> None:
        if self.epoch_total_s is None and self.epoch_start is not None:
            self.epoch_total_s = time.monotonic() - self.epoch_start
            if self.stop_after_first_epoch:
                raise StopBenchmark("one healthy epoch measured")


class StopBenchmark(Exception):
    """Raised from a callback to end the healthy run after its first epoch."""


@contextlib.contextmanager
def installed(clock: Clock) -> Iterator[None]:
    from ultralytics.utils.callbacks import base

    from pogona_job.training.gate import BatchWatchdog

    # Plain closures, not bound methods: ultralytics deep-copies the defaults, and a copied bound method
    # would record into a copy of the clock.
    hooks = {name: _hook(getattr(clock, name)) for name in base.default_callbacks if hasattr(clock, name)}
    for name, hook in hooks.items():
        base.default_callbacks[name].insert(0, hook)
    original_trip = BatchWatchdog._trip

    def trip(self: BatchWatchdog, signature: str, kind: str) -> None:
        clock.tripped_at = time.monotonic()
        original_trip(self, signature, kind)

    BatchWatchdog._trip = trip  # type: ignore[method-assign]
    try:
        yield
    finally:
        BatchWatchdog._trip = original_trip  # type: ignore[method-assign]
        for name, hook in hooks.items():
            base.default_callbacks[name].remove(hook)


def _hook(method: Callable[[Any], None]) -> Callable[[Any], None]:
    def hook(trainer: Any) -> None:
        method(trainer)

    return hook


@contextlib.contextmanager
def no_foreground() -> Iterator[None]:
    """What MPS does (see tests/test_gate_training.py): the assigner assigns no foreground at all."""
    import torch
    from ultralytics.utils.tal import TaskAlignedAssigner

    original = TaskAlignedAssigner.forward

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        labels, bboxes, scores, fg_mask, gt_idx = original(self, *args, **kwargs)
        return labels, bboxes, torch.zeros_like(scores), torch.zeros_like(fg_mask), gt_idx

    TaskAlignedAssigner.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        TaskAlignedAssigner.forward = original  # type: ignore[method-assign]


def demo_dataset(n_images: int, size: int) -> Path:
    from pogona_job.tools.demo import write_demo

    folder = BENCH_DIR / f"gate-demo-{n_images}-{size}"
    stamp = folder.with_name(folder.name + ".complete")
    if not stamp.exists():
        print(f"Writing the demo dataset ({n_images} images of {size} px) to {folder} ...", flush=True)
        write_demo(folder, n_images=n_images, size=size, seed=42)
        stamp.touch()
    return folder


@dataclass
class Outcome:
    code: int
    seconds: float
    clock: Clock
    manifest: dict[str, Any]


def run_job(env: dict[str, str], run_id: str, clock: Clock) -> Outcome:
    """The whole job in-process, in a fresh work dir (a reused one would keep another dataset's files)."""
    from pogona_job.config import load_settings
    from pogona_job.run import job
    from pogona_job.s3 import storage

    work = Path(env["POGONA_WORK_DIR"]) / run_id
    with environment({**env, "POGONA_RUN_ID": run_id, "POGONA_WORK_DIR": str(work)}), installed(clock):
        start = time.monotonic()
        code = job.run(load_settings())
        seconds = time.monotonic() - start
        manifest = storage.get_json(storage.make_client(), storage.S3Path(BUCKET, f"runs/{run_id}/manifest.json"))
    return Outcome(code, seconds, clock, manifest or {})


def job_env(s3_env: dict[str, str], work: Path, args: argparse.Namespace) -> dict[str, str]:
    from pogona_job.tools.rehearsal import DEMO_SETTINGS

    return {
        **base_env(),
        **s3_env,
        **DEMO_SETTINGS,
        "POGONA_IMGSZ": str(args.imgsz),
        "POGONA_BATCH": str(args.batch),
        "POGONA_WORKERS": "0",
        "POGONA_SANITY_EPOCHS": "2",
        "POGONA_EPOCHS": "3",  # in all: the 2 sanity epochs and one more
        "POGONA_LOG_FORMAT": "json",
        "POGONA_DATASET_URI": f"s3://{BUCKET}/datasets/gate",
        "POGONA_OUTPUT_URI": f"s3://{BUCKET}/runs",
        "POGONA_WORK_DIR": str(work),
        "YOLO_CONFIG_DIR": str(work / "ultralytics"),
    }


def measure(args: argparse.Namespace) -> tuple[Outcome, Outcome, int]:
    from pogona_job.s3 import storage
    from pogona_job.tools.locals3 import LocalS3

    dataset = demo_dataset(args.images, args.size)
    work = BENCH_DIR / "gate-work"
    shutil.rmtree(work, ignore_errors=True)
    with LocalS3(buckets=[BUCKET]) as s3:
        with environment({**base_env(), **s3.env}):
            storage.push_tree(storage.make_client(), dataset, storage.S3Path(BUCKET, "datasets/gate"))
        env = job_env(s3.env, work, args)
        print("(a) the MPS signature injected ...", flush=True)
        with no_foreground():
            signature = run_job(env, f"gate-mps-{os.getpid()}", Clock())
        print("(b) one healthy epoch ...", flush=True)
        healthy = run_job(env, f"gate-healthy-{os.getpid()}", Clock(stop_after_first_epoch=True))
    train_images = int(args.images * (1 - 0.2))  # the job's default val_fraction
    return signature, healthy, math.ceil(train_images / args.batch)


def table(signature: Outcome, healthy: Outcome, batches_per_epoch: int, args: argparse.Namespace) -> str:
    sig, ok = signature.clock, healthy.clock
    if signature.code != 5 or sig.tripped_at is None or sig.train_start is None:
        raise RuntimeError(f"the injected signature was not stopped by the watchdog (exit {signature.code})")
    if ok.epoch_train_s is None:
        raise RuntimeError(f"the healthy run did not finish an epoch (exit {healthy.code})")
    abort_s = sig.tripped_at - sig.train_start
    batches = int((signature.manifest.get("watchdog") or {}).get("batches", len(sig.batch_ends)))
    share = abort_s / ok.epoch_train_s
    from pogona_job.config import Settings

    k = Settings.model_fields["gate_zero_batches"].default
    rows = [
        Row(
            "MPS signature: training start -> abort (s)",
            f"{abort_s:.2f}",
            f"{ok.epoch_train_s:.1f} (one healthy epoch)",
            f"{share:.1%}",
            "< 10% of an epoch",
            "yes" if share < 0.10 else "**no**",
        ),
        Row(
            "MPS signature: batches seen before the abort",
            str(batches),
            f"{batches_per_epoch} per epoch",
            f"K = {k}",
            "<= 20",
            "yes" if batches <= 20 else "**no**",
        ),
        Row("MPS signature: whole job, start -> exit 5 with report (s)", f"{signature.seconds:.1f}"),
        Row("healthy epoch incl. validation (s)", f"{ok.epoch_total_s or float('nan'):.1f}"),
        Row(
            "healthy batch (s, median)",
            f"{median_gap(ok.batch_ends):.3f}",
            f"{median_gap(sig.batch_ends):.3f} (signature run)",
        ),
    ]
    origin = " (as many as the origin dataset)" if args.images == ORIGIN_IMAGES else ""
    setup = (
        f"{stamp_line()}. Demo dataset of {args.images} images at {args.size} px{origin}, yolo11n.yaml from "
        f"scratch, imgsz {args.imgsz}, batch {args.batch}, CPU, workers 0, POGONA_GATE_ZERO_BATCHES default; "
        "the job runs in-process against SeaweedFS on loopback."
    )
    notes = (
        "Training start = ultralytics' `on_train_start` (dataset scanned, model built); the abort = the "
        f"watchdog's trip. Job exit codes: signature run {signature.code} (5 = sanity failed), healthy run "
        f"{healthy.code} (stopped by the benchmark after its first epoch)."
    )
    title = "## Sanity gate: abort time (benchmarks/gate_bench.py, issue #3)"
    return "\n\n".join([title, setup, markdown_table(rows), notes]) + "\n"


def median_gap(stamps: Sequence[float]) -> float:
    gaps = sorted(b - a for a, b in itertools.pairwise(stamps))
    return gaps[len(gaps) // 2] if gaps else float("nan")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=ORIGIN_IMAGES, help=f"demo images; {ORIGIN_IMAGES}")
    parser.add_argument("--size", type=int, default=160, help="demo image size (px); 160")
    parser.add_argument("--imgsz", type=int, default=160, help="training image size; 160 (the demo's)")
    parser.add_argument("--batch", type=int, default=16, help="batch size; 16 (the demo's)")
    parser.add_argument("--output", type=Path, default=BENCHMARKS_MD, help="markdown file to update; BENCHMARKS.md")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from pogona_job import logs

    logs.configure("json")
    signature, healthy, per_epoch = measure(args)
    text = table(signature, healthy, per_epoch, args)
    print(text)
    update_section("gate_bench.py", text, args.output)
    print(f"Wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
