"""The GPU proof in one command (`benchmarks/gpu_proof.sh`): offline, under 8 minutes on one GPU.

1. The whole job (in this process, `job.run`) against a local SeaweedFS on the demo dataset
   (3,000 images at 640 px, yolo11s.yaml from scratch, imgsz 640): POGONA_BATCH unset so the job
   picks AutoBatch, AMP on and the RAM/disk cache by its resource plan, and, since the device is not
   the CPU, the backend parity probe on the real device.
2. The same training as bare ultralytics (`YOLO(model).train(...)`, what `yolo train` runs) on the job's
   staged data.yaml, with the batch the job's AutoBatch chose and the job's plan (AMP, cache).
3. The MPS no-foreground signature simulated on CUDA (the assigner patched exactly as in
   tests/test_gate_training.py): the job must exit 5 within 20 training batches.

Printed and written to BENCHMARKS.md (section gpu_proof.py, with the device name): images/s for the
job's full training and for bare ultralytics and their ratio, the dataloader's share of step time,
GPU utilisation sampled with nvidia-smi, peak GPU memory, time to first batch, and the decisions
(batch, AMP, cache, parity, gate). Images/s counts the training steps of every epoch but the first
(warm-up, AutoBatch, cuDNN autotuning), validation excluded; the same clock serves both runs.

`--tiny` runs every step on the CPU in a few minutes (yolo11n.yaml, 32 images at 128 px, 3 epochs of
which the first 2 are the sanity epochs, the test suite's tiny settings): the test suite runs it.
GPU-only figures then read "n/a" and the parity probe "skipped (CPU)".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import BENCH_DIR, BENCHMARKS_MD, markdown_grid, scratch, stamp_line, update_section

BUCKET = "pogona-proof"
MAX_TRIP_BATCHES = 20


@dataclass(frozen=True)
class Config:
    images: int
    image_size: int  # demo images' side (px)
    imgsz: int
    model: str
    sanity_epochs: int
    epochs: int
    device: str


def config_for(args: argparse.Namespace) -> Config:
    if args.tiny:
        # The tests' TINY settings on 32 images: 4 batches an epoch, so the MPS simulation's watchdog (6 zero
        # batches) trips inside the 2 sanity epochs.
        return Config(args.images or 32, 128, 128, "yolo11n.yaml", 2, 3, args.device or "cpu")
    # Two sanity epochs at least: the verdict compares the first with a later one.
    return Config(args.images or 3000, 640, 640, args.model, 2, args.epochs, args.device or "0")


# --- measurement: one clock for the job's trainers and the bare one ----------------------------------


class Sampler:
    """nvidia-smi every 0.5 s: GPU utilisation (%) and memory used (MiB); empty without nvidia-smi."""

    def __init__(self, index: int) -> None:
        smi = shutil.which("nvidia-smi")
        self.cmd = (
            [smi, f"--id={index}", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
            if smi
            else None
        )
        self.util: list[float] = []
        self.memory: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.cmd is None or self._thread is not None:
            return
        self.util, self.memory = [], []
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        assert self.cmd is not None
        while not self._stop.is_set():
            with suppress(Exception):
                out = subprocess.run(self.cmd, capture_output=True, text=True, timeout=5).stdout
                util, memory = (float(v) for v in out.split(",")[:2])
                self.util.append(util)
                self.memory.append(memory)
            self._stop.wait(0.5)

    def stop(self) -> tuple[list[float], list[float]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return self.util, self.memory


@dataclass
class Phase:
    """One trainer's steps (all epochs but the first when there are several)."""

    started: float
    batch: int = 0
    first_batch: float | None = None
    images: int = 0
    step_s: float = 0.0
    wait_s: float = 0.0
    util: list[float] = field(default_factory=list)
    smi_memory: list[float] = field(default_factory=list)
    peak_reserved: float | None = None  # bytes, torch's allocator
    amp: bool | None = None
    _last_end: float | None = None
    _batch_images: int = 0

    @property
    def images_per_s(self) -> float:
        return self.images / self.step_s if self.step_s > 0 else 0.0


class Clock:
    """Installed into ultralytics' default callbacks, so every model built afterwards carries it."""

    def __init__(self, sampler: Sampler, cuda: bool) -> None:
        self.sampler, self.cuda = sampler, cuda
        self.phases: dict[str, Phase] = {}
        self.current: Phase | None = None

    def install(self) -> None:
        from ultralytics.utils.callbacks import base

        global _CLOCK
        _CLOCK = self
        for event, fn in _HOOKS.items():
            if fn not in base.default_callbacks[event]:
                base.default_callbacks[event].append(fn)

    def train_start(self, trainer: Any) -> None:
        import torch

        phase = Phase(time.monotonic(), batch=int(trainer.batch_size), amp=bool(getattr(trainer, "amp", False)))
        self.phases[Path(trainer.save_dir).name] = self.current = phase
        original = trainer.preprocess_batch

        def counting(batch: dict[str, Any]) -> dict[str, Any]:
            phase._batch_images = int(batch["img"].shape[0])
            return original(batch)  # type: ignore[no-any-return]

        trainer.preprocess_batch = counting
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.sampler.start()

    def epoch_start(self, trainer: Any) -> None:
        if self.current is not None:
            self.current._last_end = None

    def batch_start(self, trainer: Any) -> None:
        phase = self.current
        if phase is not None and phase._last_end is not None and self._measured(trainer):
            phase.wait_s += time.perf_counter() - phase._last_end

    def batch_end(self, trainer: Any) -> None:
        import torch

        phase = self.current
        if phase is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if phase.first_batch is None:
            phase.first_batch = time.monotonic()
        if phase._last_end is not None and self._measured(trainer):
            phase.step_s += now - phase._last_end
            phase.images += phase._batch_images
        phase._last_end = now

    def train_end(self, trainer: Any) -> None:
        self.finish()

    def finish(self) -> None:
        """The end of a trainer's run, also when it raised (the watchdog)."""
        import torch

        phase, self.current = self.current, None
        if phase is None:
            return
        phase.util, phase.smi_memory = (list(v) for v in self.sampler.stop())
        if self.cuda:
            phase.peak_reserved = float(torch.cuda.max_memory_reserved())

    @staticmethod
    def _measured(trainer: Any) -> bool:
        return bool(trainer.epochs <= 1 or trainer.epoch > trainer.start_epoch)


_CLOCK: Clock | None = None


def _hook(name: str) -> Any:
    def call(trainer: Any) -> None:
        if _CLOCK is not None:
            getattr(_CLOCK, name)(trainer)

    call.__name__ = f"proof_{name}"
    return call


_HOOKS = {
    "on_train_start": _hook("train_start"),
    "on_train_epoch_start": _hook("epoch_start"),
    "on_train_batch_start": _hook("batch_start"),
    "on_train_batch_end": _hook("batch_end"),
    "on_train_end": _hook("train_end"),
}


# --- the three runs ---------------------------------------------------------------------------------


def demo_dataset(cfg: Config) -> Path:
    """The demo dataset, written in parallel shards (one core makes ~4 images of 640 px a second) and
    merged into one flat images/ + labels/ folder; cached in .bench/ between runs."""
    from concurrent.futures import ProcessPoolExecutor

    raw = BENCH_DIR / f"proof-demo-{cfg.images}-{cfg.image_size}"
    stamp = raw.with_name(raw.name + ".complete")
    if stamp.exists():
        return raw
    print(f"Writing the demo dataset ({cfg.images} images of {cfg.image_size} px) to {raw} ...", flush=True)
    shutil.rmtree(raw, ignore_errors=True)
    shards = max(1, min(os.cpu_count() or 1, cfg.images // 24))
    sizes = [cfg.images // shards + (k < cfg.images % shards) for k in range(shards)]
    parts = raw / "parts"
    with ProcessPoolExecutor(shards) as pool:
        list(pool.map(_write_shard, [parts / f"p{k:02d}" for k in range(shards)], sizes, [cfg.image_size] * shards))
    for sub in ("images", "labels"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
        for part in sorted(parts.iterdir()):
            for f in sorted((part / sub).iterdir()):
                f.rename(raw / sub / f"{part.name}_{f.name}")
    shutil.rmtree(parts)
    stamp.touch()
    return raw


def _write_shard(dest: Path, n_images: int, size: int) -> None:
    from pogona_job.tools.demo import write_demo

    write_demo(dest, n_images=n_images, size=size, seed=42 + int(dest.name[1:]))


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_job(env: dict[str, str], run_id: str, clock: Clock) -> tuple[int, dict[str, Any], float]:
    """The whole job in this process; returns its exit code, its manifest and its start (monotonic)."""
    from pogona_job.config import load_settings
    from pogona_job.run import job
    from pogona_job.s3 import storage

    with environment({**env, "POGONA_RUN_ID": run_id}):
        settings = load_settings()
        start = time.monotonic()
        try:
            code = job.run(settings)
        finally:
            clock.finish()
        client = storage.make_client()
        manifest = storage.get_json(client, storage.S3Path.parse(env["POGONA_OUTPUT_URI"]) / run_id / "manifest.json")
    return code, manifest or {}, start


@contextmanager
def no_foreground() -> Iterator[None]:
    """MPS's failure, on any device: the assigner assigns no foreground (box = dfl = 0)."""
    import torch
    from ultralytics.utils.tal import TaskAlignedAssigner

    original = TaskAlignedAssigner.forward

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        labels, bboxes, scores, fg_mask, gt_idx = original(self, *args, **kwargs)
        return labels, bboxes, torch.zeros_like(scores), torch.zeros_like(fg_mask), gt_idx

    TaskAlignedAssigner.forward = forward
    try:
        yield
    finally:
        TaskAlignedAssigner.forward = original


def bare_train(cfg: Config, data_yaml: Path, batch: int, plan_args: dict[str, Any], work: Path) -> None:
    """What `yolo train model=... data=... epochs=... imgsz=... batch=... device=...` runs."""
    from ultralytics import YOLO

    YOLO(cfg.model).train(
        data=str(data_yaml),
        epochs=cfg.epochs,
        imgsz=cfg.imgsz,
        batch=batch,
        device=cfg.device,
        workers=min(8, os.cpu_count() or 1) if cfg.device != "cpu" else 0,
        seed=42,
        deterministic=True,
        optimizer="AdamW",
        lr0=0.001,
        project=str(work / "bare"),
        name="bare",
        exist_ok=True,
        plots=True,
        verbose=False,
        **{k: v for k, v in plan_args.items() if k != "batch"},
    )


@dataclass
class Proof:
    cfg: Config
    device_name: str
    job: Phase
    bare: Phase
    job_first_batch_s: float | None
    bare_first_batch_s: float | None
    manifest: dict[str, Any]
    mps_code: int
    mps_batches: int | None
    mps_reason: str
    seconds: float

    def throughput_rows(self) -> list[list[str]]:
        def pct(v: float) -> str:
            return f"{v:.1%}"

        def util(p: Phase) -> str:
            return f"{statistics.mean(p.util):.0f}% ({len(p.util)} samples)" if p.util else "n/a"

        def memory(p: Phase) -> str:
            torch_peak = f"{p.peak_reserved / 2**30:.2f} GiB reserved" if p.peak_reserved else "n/a"
            smi = f", nvidia-smi {max(p.smi_memory) / 1024:.2f} GiB" if p.smi_memory else ""
            return torch_peak + smi

        def first(v: float | None) -> str:
            return f"{v:.1f} s" if v is not None else "n/a"

        ratio = self.job.images_per_s / self.bare.images_per_s if self.bare.images_per_s else 0.0
        return [
            ["images/s (training steps)", f"{self.job.images_per_s:.1f}", f"{self.bare.images_per_s:.1f}"],
            ["job / bare", f"{ratio:.2f}", "1"],
            [
                "dataloader share of step time",
                pct(self.job.wait_s / self.job.step_s if self.job.step_s else 0),
                pct(self.bare.wait_s / self.bare.step_s if self.bare.step_s else 0),
            ],
            ["GPU utilisation (mean, nvidia-smi)", util(self.job), util(self.bare)],
            ["peak GPU memory", memory(self.job), memory(self.bare)],
            ["time to first batch", first(self.job_first_batch_s), first(self.bare_first_batch_s)],
            ["batch (trainers)", str(self.job.batch), str(self.bare.batch)],
            ["AMP (trainers)", str(self.job.amp), str(self.bare.amp)],
        ]

    def decision_rows(self) -> list[list[str]]:
        used = self.manifest.get("settings_used", {})
        parity = self.manifest.get("parity")
        parity_cell = (
            f"{'passed' if parity['passed'] else 'FAILED'}: CPU {_losses(parity['cpu'])} vs device "
            f"{_losses(parity['accelerator'])}"
            if parity
            else "skipped (CPU)"
        )
        within = self.mps_code == 5 and self.mps_batches is not None and self.mps_batches <= MAX_TRIP_BATCHES
        return [
            [
                "job status",
                f"{self.manifest.get('status')} (mAP@0.5 {self.manifest.get('metrics', {}).get('map50', 0):.3f})",
            ],
            ["batch", str(used.get("batch", "?"))],
            ["AMP", str(used.get("amp", "?"))],
            ["cache", str(used.get("cache", "?"))],
            ["parity probe on the device", parity_cell],
            [
                f"MPS signature simulated: gate trips within {MAX_TRIP_BATCHES} batches",
                f"{'yes' if within else 'NO'}: exit {self.mps_code} after {self.mps_batches} batches",
            ],
        ]

    @property
    def passed(self) -> bool:
        parity = self.manifest.get("parity")
        return (
            self.manifest.get("status") == "succeeded"
            and self.mps_code == 5
            and self.mps_batches is not None
            and self.mps_batches <= MAX_TRIP_BATCHES
            and (parity is None or bool(parity["passed"]))
        )

    def render(self) -> str:
        import torch

        cfg = self.cfg
        header = (
            f"{stamp_line()}; **{self.device_name}**; torch {torch.__version__}; {cfg.images} demo images at "
            f"{cfg.image_size} px, {cfg.model}, imgsz {cfg.imgsz}, {cfg.epochs} epochs (job: the first "
            f"{cfg.sanity_epochs} its sanity epochs, one training) vs {cfg.epochs} (bare); "
            f"took {self.seconds:.0f} s; proof "
            f"{'PASSED' if self.passed else 'FAILED'}."
        )
        return "\n\n".join(
            [
                "## GPU proof (benchmarks/gpu_proof.sh)",
                header,
                markdown_grid(["measure", "job (full training)", "bare ultralytics"], self.throughput_rows()),
                markdown_grid(["job decision", "observed"], self.decision_rows()),
            ]
        )


def _losses(values: dict[str, float]) -> str:
    return "/".join(f"{v:.3f}" for v in values.values())


def prove(cfg: Config, work: Path) -> Proof:
    import torch

    from pogona_job import logs
    from pogona_job.s3 import storage
    from pogona_job.tools.locals3 import LocalS3

    began = time.monotonic()
    cuda = cfg.device not in ("cpu", "mps") and torch.cuda.is_available()
    device_name = torch.cuda.get_device_name(int(cfg.device.split(",")[0])) if cuda else "CPU (no GPU)"
    logs.configure("json", stream=sys.stderr)
    clock = Clock(Sampler(int(cfg.device.split(",")[0]) if cuda else 0), cuda)
    raw = demo_dataset(cfg)
    with LocalS3(buckets=[BUCKET], data_dir=work / "s3") as s3:
        env = {
            **s3.env,
            "POGONA_DATASET_URI": f"s3://{BUCKET}/datasets/demo",
            "POGONA_OUTPUT_URI": f"s3://{BUCKET}/runs",
            "POGONA_WORK_DIR": str(work / "job"),
            "POGONA_MODEL": cfg.model,
            "POGONA_IMGSZ": str(cfg.imgsz),
            "POGONA_SANITY_EPOCHS": str(cfg.sanity_epochs),
            "POGONA_EPOCHS": str(cfg.epochs),
            "POGONA_DEVICE": cfg.device,
            "POGONA_WORKERS": str(min(8, os.cpu_count() or 1)),
            "POGONA_LOG_FORMAT": "json",
            "POGONA_CHECKPOINT_MIN_INTERVAL_S": "30",
        }
        if not cuda:
            env["POGONA_BATCH"] = "8"  # AutoBatch is a GPU feature; on the CPU the job keeps POGONA_BATCH
        if cfg.model.endswith(".yaml"):  # a few epochs from scratch score 0: the final verdict would end the proof
            env["POGONA_MIN_FINAL_MAP50"] = "0"
        with environment(s3.env):
            storage.push_tree(storage.make_client(), raw, storage.S3Path.parse(env["POGONA_DATASET_URI"]))
        clock.install()
        print("1/3 the whole job ...", flush=True)
        code, manifest, job_start = run_job(env, "proof", clock)
        if code != 0:
            raise SystemExit(f"the job exited {code}: {manifest.get('failure')}")
        job_phase = clock.phases["full"]  # the one training (its save dir): the sanity epochs are its first
        pull = float(manifest.get("timings_s", {}).get("pull", 0.0))
        job_first = job_phase.first_batch - job_start - pull if job_phase.first_batch else None
        from pogona_job import training
        from pogona_job.config import load_settings

        with environment(env):
            settings = load_settings()
        plan = training.resource_plan(settings, cfg.device, int(manifest.get("dataset", {}).get("images", 0)))
        data_yaml = work / "job" / "staged" / "data.yaml"
        print("2/3 the same training, bare ultralytics ...", flush=True)
        bare_start = time.monotonic()
        try:
            bare_train(cfg, data_yaml, job_phase.batch, plan.args, work)
        finally:
            clock.finish()
        bare = clock.phases["bare"]
        bare_first = bare.first_batch - bare_start if bare.first_batch else None
        print("3/3 the MPS signature, simulated on this device ...", flush=True)
        with no_foreground():
            mps_code, mps_manifest, _ = run_job(env, "proof-mps", clock)
        watchdog = mps_manifest.get("watchdog") or {}
    return Proof(
        cfg,
        device_name,
        job_phase,
        bare,
        job_first,
        bare_first,
        manifest,
        mps_code,
        watchdog.get("batches"),
        str(mps_manifest.get("failure")),
        time.monotonic() - began,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="every step on the CPU in minutes (tests)")
    parser.add_argument("--images", type=int, default=0, help="demo images; 3000 (32 with --tiny)")
    parser.add_argument(
        "--epochs",
        type=int,
        default=3,
        help="training epochs in all, job and bare (the job's first 2 are its sanity epochs); 3",
    )
    parser.add_argument("--model", default="yolo11s.yaml", help="model; yolo11s.yaml (no download needed)")
    parser.add_argument("--device", default="", help="device; 0 (cpu with --tiny)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave --output alone")
    parser.add_argument("--output", type=Path, default=BENCHMARKS_MD, help="markdown file; BENCHMARKS.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder to keep; a temporary one")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("YOLO_OFFLINE", "true")
    cfg = config_for(args)
    with scratch(args.work, prefix="proof-") as work:
        proof = prove(cfg, work)
    text = proof.render()
    print(text)
    if args.json:
        rows = {r[0]: r[1:] for r in proof.throughput_rows() + proof.decision_rows()}
        args.json.write_text(json.dumps({"device": proof.device_name, "passed": proof.passed, "rows": rows}, indent=2))
    if not args.no_write:
        update_section("gpu_proof.py", text, args.output)
        print(f"Wrote {args.output}")
    return 0 if proof.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
