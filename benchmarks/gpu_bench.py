"""Training throughput on a GPU: images/s, the dataloader's share of step time, GPU utilisation.

On a GPU machine: YOLOv11s (yolo11s.pt when present, else yolo11s.yaml from scratch - the same
compute) at imgsz 640 on the demo dataset at 640 px, staged the way the job stages it. Every
training step is timed from ultralytics' callbacks:

- wait = on_train_batch_start - the previous on_train_batch_end (the loop waiting for the next
  batch from the dataloader), step = on_train_batch_end - the previous one; the dataloader's
  share = sum(wait) / sum(step), over the last epoch (the first batch of an epoch excluded);
- images/s = images trained in the last epoch / the time of its steps;
- GPU utilisation: sampled every 0.5 s during the last epoch, with pynvml when installed,
  else `nvidia-smi --query-gpu=utilization.gpu`; "n/a" without a GPU.

On CUDA, the callbacks synchronise the device so a step's time is its compute, not its launch
(`--no-sync` to leave the pipeline alone). `--tiny` runs the same columns on a CPU in seconds:
yolo11n.yaml, imgsz 64, a few images, 1 epoch. `--write` records the table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BENCH_DIR, BENCHMARKS_MD, markdown_grid, scratch, stamp_line, update_section

COLUMNS = ("model", "imgsz", "batch", "device", "images/s", "dataloader share", "GPU util", "step (ms)")


@dataclass
class StepClock:
    """Per-step timestamps of the epoch being measured."""

    sync: Callable[[], None]
    epoch: int = -1
    waits: list[float] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)
    images: int = 0
    _last_end: float | None = None
    _batch_images: int = 0
    on_epoch_start: Callable[[], None] | None = None
    on_epoch_end: Callable[[], None] | None = None

    def train_start(self, trainer: Any) -> None:
        """Count each batch's images: the batch is a local of ultralytics' loop, so wrap preprocess_batch."""
        original = trainer.preprocess_batch

        def counting(batch: dict[str, Any]) -> dict[str, Any]:
            self._batch_images = int(batch["img"].shape[0])
            return original(batch)  # type: ignore[no-any-return]

        trainer.preprocess_batch = counting

    def train_epoch_start(self, trainer: Any) -> None:
        self.epoch, self._last_end = trainer.epoch, None
        self.waits.clear()
        self.steps.clear()
        self.images = 0
        if self.on_epoch_start:
            self.on_epoch_start()

    def batch_start(self, trainer: Any) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self.waits.append(now - self._last_end)

    def batch_end(self, trainer: Any) -> None:
        self.sync()
        now = time.perf_counter()
        if self._last_end is not None:  # the first step of an epoch has no previous end to measure from
            self.steps.append(now - self._last_end)
            self.images += self._batch_images
        self._last_end = now

    def train_epoch_end(self, trainer: Any) -> None:
        if self.on_epoch_end:
            self.on_epoch_end()


class UtilSampler:
    """GPU utilisation (%) sampled in a thread while running; empty without a GPU."""

    def __init__(self, index: int = 0, interval: float = 0.5) -> None:
        self.index, self.interval = index, interval
        self.samples: list[float] = []
        self._read = self._reader()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _reader(self) -> Callable[[], float] | None:
        with contextlib.suppress(Exception):
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return None
        cmd = [smi, f"--id={self.index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        return lambda: float(subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout.split()[0])

    @property
    def available(self) -> bool:
        return self._read is not None

    def start(self) -> None:
        if self._read is None or self._thread is not None:
            return
        self.samples.clear()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                assert self._read is not None
                self.samples.append(self._read())
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


@dataclass(frozen=True)
class Config:
    model: str
    imgsz: int
    batch: int
    epochs: int
    images: int
    image_size: int
    device: str
    workers: int
    sync: bool


def config_for(args: argparse.Namespace) -> Config:
    import torch

    cuda = torch.cuda.is_available()
    device = args.device or ("0" if cuda else "cpu")
    if args.tiny:
        return Config("yolo11n.yaml", 64, 8, 1, args.images or 40, 64, device, 0, False)
    weights = Path(args.weights)
    model = str(weights) if weights.exists() else "yolo11s.yaml"
    workers = min(8, os.cpu_count() or 1) if args.workers is None else args.workers
    return Config(
        model, 640, args.batch, args.epochs, args.images or 1024, 640, device, workers, cuda and not args.no_sync
    )


def staged_data(cfg: Config, work: Path) -> Path:
    """The demo dataset, staged with the job's own code (train/val split, data.yaml)."""
    from pogona_job.dataset import inspect_dataset, stage_dataset
    from pogona_job.tools.demo import CLASS_NAMES, write_demo

    raw = BENCH_DIR / f"gpu-demo-{cfg.images}-{cfg.image_size}"
    stamp = raw.with_name(raw.name + ".complete")
    if not stamp.exists():
        print(f"Writing the demo dataset ({cfg.images} images of {cfg.image_size} px) to {raw} ...", flush=True)
        write_demo(raw, n_images=cfg.images, size=cfg.image_size, seed=42)
        stamp.touch()
    inventory = inspect_dataset(raw, CLASS_NAMES)
    return stage_dataset(inventory, work / "staged", CLASS_NAMES, policy="lenient").data_yaml


@dataclass
class Result:
    cfg: Config
    images_per_s: float
    loader_share: float
    util: list[float]
    util_available: bool
    step_ms: float

    def cells(self) -> list[str]:
        util = f"{statistics.mean(self.util):.0f}%" if self.util else "n/a"
        cfg = self.cfg
        return [
            Path(cfg.model).name,
            str(cfg.imgsz),
            str(cfg.batch),
            cfg.device,
            f"{self.images_per_s:.1f}",
            f"{self.loader_share:.1%}",
            util,
            f"{self.step_ms:.0f}",
        ]


def train(cfg: Config, work: Path) -> Result:
    from pogona_job.training import offline

    offline.prepare(work / "ultralytics")
    import torch
    from ultralytics import YOLO

    cuda = cfg.device not in ("cpu", "mps") and torch.cuda.is_available()
    index = int(cfg.device.split(",")[0]) if cuda and cfg.device[0].isdigit() else 0
    sampler = UtilSampler(index) if cuda else None
    sync: Callable[[], None] = torch.cuda.synchronize if cuda and cfg.sync else (lambda: None)
    clock = StepClock(sync)
    if sampler is not None:
        clock.on_epoch_start, clock.on_epoch_end = sampler.start, sampler.stop
    data_yaml = staged_data(cfg, work)
    model = YOLO(cfg.model)
    for event, hook in (
        ("on_train_start", clock.train_start),
        ("on_train_epoch_start", clock.train_epoch_start),
        ("on_train_batch_start", clock.batch_start),
        ("on_train_batch_end", clock.batch_end),
        ("on_train_epoch_end", clock.train_epoch_end),
    ):
        model.add_callback(event, hook)
    model.train(
        data=str(data_yaml),
        epochs=cfg.epochs,
        imgsz=cfg.imgsz,
        batch=cfg.batch,
        device=cfg.device,
        workers=cfg.workers,
        seed=42,
        project=str(work / "runs"),
        name="gpu-bench",
        exist_ok=True,
        plots=False,
        val=True,
        verbose=False,
    )
    if sampler is not None:
        sampler.stop()
    return summarise(cfg, clock, sampler)


def summarise(cfg: Config, clock: StepClock, sampler: UtilSampler | None) -> Result:
    total = sum(clock.steps)
    if not clock.steps or total <= 0:
        raise RuntimeError("no training steps were timed: too few images for two batches?")
    return Result(
        cfg=cfg,
        images_per_s=clock.images / total,
        loader_share=sum(clock.waits) / total,
        util=list(sampler.samples) if sampler else [],
        util_available=bool(sampler and sampler.available),
        step_ms=statistics.median(clock.steps) * 1000,
    )


def render(result: Result, elapsed: float) -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    cfg = result.cfg
    header = (
        f"{stamp_line()}; {gpu}; torch {torch.__version__}; {cfg.images} demo images at {cfg.image_size} px, "
        f"{cfg.epochs} epoch(s) (the last one measured), workers {cfg.workers}, CUDA sync in callbacks "
        f"{'on' if cfg.sync else 'off'}; took {elapsed:.0f} s."
    )
    table = markdown_grid(COLUMNS, [result.cells()])
    return "\n\n".join(["## Training throughput (benchmarks/gpu_bench.py)", header, table]) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke: yolo11n.yaml, imgsz 64, few images, 1 epoch")
    parser.add_argument("--weights", default="yolo11s.pt", help="weights to start from; yolo11s.yaml when absent")
    parser.add_argument("--images", type=int, default=0, help="demo images; 1024 (40 with --tiny)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs; the last is measured; 2")
    parser.add_argument("--batch", type=int, default=16, help="batch size; 16")
    parser.add_argument("--workers", type=int, default=None, help="dataloader workers; min(8, CPUs)")
    parser.add_argument("--device", default="", help="ultralytics device; 0 with CUDA, else cpu")
    parser.add_argument("--no-sync", action="store_true", help="do not synchronise CUDA in the step callbacks")
    parser.add_argument("--write", action="store_true", help="update the gpu_bench.py section of --output")
    parser.add_argument("--output", type=Path, default=BENCHMARKS_MD, help="markdown file; BENCHMARKS.md")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder to keep; a temporary one")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    cfg = config_for(args)
    with scratch(args.work, prefix="gpu-") as work:
        result = train(cfg, work)
    text = render(result, time.monotonic() - start)
    print(text)
    if args.write:
        update_section("gpu_bench.py", text, args.output)
        print(f"Wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
