"""Running ultralytics: device policy, one training phase with the watchdog attached, results.

`ultralytics` and `torch` are imported lazily so `pogona-job config` and `--help` stay instant.
"""

from __future__ import annotations

import csv
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pogona_job.config import Settings
from pogona_job.errors import ConfigError, JobError, TrainingFailed
from pogona_job.logs import get_logger
from pogona_job.training import gpu_policy
from pogona_job.training.columns import LOSSES, METRICS
from pogona_job.training.gate import BatchWatchdog, GateHook, StallWatchdog

if TYPE_CHECKING:
    from pogona_job.training.trainer import Hooks

log = get_logger()

_SMALL_SHM = 1 << 30  # below 1 GiB of /dev/shm, dataloader workers die with "bus error"


# --- device and resources -------------------------------------------------------------


def resolve_device(settings: Settings) -> str:
    """`auto` is CUDA when present, else the CPU - never MPS (it trains on zeros, see the origin log)."""
    import torch

    device = settings.device
    if device == "mps" and not settings.allow_mps:
        raise ConfigError(
            "POGONA_DEVICE=mps is refused: Apple's MPS backend is known to train YOLO silently on zero losses; "
            "use cpu or a CUDA GPU, or set POGONA_ALLOW_MPS=true to try it under the sanity gate."
        )
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"POGONA_DEVICE=mps needs Apple's MPS backend, which this machine ({sys.platform}) does not have: "
            "use cpu or a CUDA GPU."
        )
    # A GPU this process was given but cannot use: fail fast (exit 2), never fall back to the CPU.
    if device not in ("cpu", "mps") and not torch.cuda.is_available() and (given := gpu_policy.gpu_assignment()):
        raise ConfigError(gpu_policy.unusable_gpu_sentence(given, torch.version.cuda))
    if device == "auto":
        return "0" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "mps") and not torch.cuda.is_available():
        raise ConfigError(f"POGONA_DEVICE={device} asks for a CUDA GPU but torch sees none; use auto or cpu.")
    return device


def resolve_workers(requested: int, device: str = "0", shm: Path = Path("/dev/shm")) -> tuple[int, str]:
    """Workers capped by CPU count and /dev/shm (Docker's 64 MB default crashes workers)."""
    if device == "cpu":  # ultralytics itself loads batches in the training process on the CPU
        return 0, f"0 on the CPU (requested {requested}; ultralytics uses none there)"
    workers = min(requested, os.cpu_count() or 1)
    reason = f"{workers} (requested {requested}, {os.cpu_count()} CPUs)"
    try:
        shm_bytes = shutil.disk_usage(shm).total
    except OSError:
        shm_bytes = 0
    if workers > 0 and shm_bytes < _SMALL_SHM:
        reason = (
            f"0 (requested {requested}): /dev/shm is only {shm_bytes >> 20} MiB, which crashes dataloader "
            "workers; run the container with --ipc=host or --shm-size=8g"
        )
        workers = 0
    return workers, reason


@dataclass
class Hardware:
    device: str  # what we passed to ultralytics
    name: str  # GPU or CPU model
    cuda: str | None
    torch: str
    ultralytics: str
    amp: bool | None = None

    def line(self) -> str:
        cuda = f"CUDA {self.cuda}" if self.cuda and self.device not in ("cpu", "mps") else "no CUDA"
        amp = "AMP on" if self.amp else "AMP off"
        return (
            f"{self.name} (device `{self.device}`, {cuda}, {amp}; torch {self.torch}, ultralytics {self.ultralytics})"
        )


def describe_hardware(device: str) -> Hardware:
    import torch
    import ultralytics

    if device not in ("cpu", "mps") and torch.cuda.is_available():
        index = int(device.split(",")[0].removeprefix("cuda:")) if device[-1].isdigit() else 0
        name = (
            ", ".join(torch.cuda.get_device_name(int(i)) for i in device.split(","))
            if "," in device
            else (torch.cuda.get_device_name(index))
        )
    elif device == "mps":
        name = "Apple MPS"
    else:
        name = _cpu_name()
    return Hardware(device, name, torch.version.cuda, torch.__version__, ultralytics.__version__)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} x{os.cpu_count()}"


@dataclass
class Plan:
    """What the job picked for this hardware, and why (logged and written to the report)."""

    args: dict[str, Any]
    reasons: dict[str, str]


def resource_plan(settings: Settings, device: str, images: int, meminfo: Path = Path("/proc/meminfo")) -> Plan:
    """GPU-ready defaults: AMP on, AutoBatch when no batch was given, RAM cache when it fits."""
    if device in ("cpu", "mps"):
        return Plan({"amp": False}, {"amp": f"off ({device})", "batch": str(settings.batch), "cache": "off (CPU)"})
    args: dict[str, Any] = {"amp": True}
    reasons = {"amp": "on (ultralytics' AMP check model is baked into the image; offline it is skipped, AMP stays on)"}
    if "batch" in settings.model_fields_set or "," in device:
        reasons["batch"] = (
            f"{settings.batch} (POGONA_BATCH)"
            if "batch" in settings.model_fields_set
            else (f"{settings.batch} (AutoBatch does not support multi-GPU)")
        )
    else:
        args["batch"] = -1
        reasons["batch"] = "AutoBatch: ultralytics sizes the batch to ~60% of GPU memory (POGONA_BATCH not set)"
    need = images * settings.imgsz * settings.imgsz * 3  # decoded, resized uint8 images
    available = _mem_available(meminfo)
    if available and need < 0.5 * available:
        args["cache"] = "ram"
        reasons["cache"] = f"ram ({need / 2**30:.1f} GiB decoded < half of {available / 2**30:.1f} GiB available)"
    else:
        args["cache"] = "disk"
        reasons["cache"] = f"disk ({need / 2**30:.1f} GiB decoded would not fit comfortably in RAM)"
    return Plan(args, reasons)


def _mem_available(meminfo: Path) -> int:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


# --- model ------------------------------------------------------------------------------


def load_model(source: str) -> Any:
    """A YOLO model from weights or a .yaml; a failed download becomes one sentence, exit 2."""
    from ultralytics import YOLO

    try:
        return YOLO(source)
    except (ConnectionError, OSError) as exc:
        if "Download failure" in str(exc) or "offline" in str(exc).lower() or isinstance(exc, ConnectionError):
            raise ConfigError(
                f"The weights {source!r} are not present and could not be downloaded (no internet): bake them "
                "into the image, give an s3:// URI in POGONA_MODEL, or name a .yaml (e.g. yolo11s.yaml) "
                "to train from scratch."
            ) from None
        raise
    except FileNotFoundError:
        raise ConfigError(f"POGONA_MODEL={source!r} does not exist: name weights, a .yaml, or an s3:// URI.") from None


# --- one training phase -------------------------------------------------------------------

EpochHook = Callable[[int, dict[str, float]], None]


@dataclass
class PhaseResult:
    phase: str
    save_dir: Path
    rows: list[dict[str, float]]
    seconds: float
    hardware: Hardware
    params: int
    first_batch_at: float | None  # time.monotonic() when the first training batch finished
    weight_change: float | None = None  # relative L2 change of the weights by `weigh_after` (the gate's evidence)
    batches: list[dict[str, float]] = field(default_factory=list)  # the sanity batches' losses, for the verdict
    labelled: int | None = None  # of those, batches with a labelled box


def train_phase(
    phase: str,
    *,
    model_source: str,
    data_yaml: Path,
    settings: Settings,
    device: str,
    workers: int,
    epochs: int,
    save_dir: Path,
    watchdog: BatchWatchdog,
    on_epoch: EpochHook | None = None,
    resume: bool = False,
    extra: Mapping[str, Any] | None = None,
    ddp_checkpoint: Mapping[str, Any] | None = None,
    callbacks: Mapping[str, Callable[[Any], None]] | None = None,
    weigh_after: int = 0,
    stall: StallWatchdog | None = None,
    gate_at: int = 0,
    on_gate: GateHook | None = None,
    gate: Mapping[str, Any] | None = None,
) -> PhaseResult:
    """Train `epochs` epochs into save_dir (or resume its last.pt); the watchdog sees every batch.
    `callbacks` (livestatus: meter, budget) run before the job's own, so the epoch event carries their fields.
    Under DDP they do not reach ultralytics' worker processes (only the trainer class's own hooks do), so
    progress and budget are single-process features for now. `stall` (the no-progress thread) watches
    from before the model is built until training returns. `on_gate` judges the end of epoch `gate_at`
    (the sanity gate inside this one training; `gate`: its thresholds, for DDP rank 0)."""

    # Multi-GPU: the batches run in ultralytics' worker processes, which this process cannot watch.
    if stall is not None and "," not in device:
        stall.start()
    try:
        return _train_phase(
            phase,
            model_source,
            data_yaml,
            settings,
            device,
            workers,
            epochs,
            save_dir,
            watchdog,
            on_epoch,
            resume,
            extra,
            ddp_checkpoint,
            callbacks,
            weigh_after,
            stall if "," not in device else None,
            gate_at,
            on_gate,
            gate,
        )
    finally:
        if stall is not None:
            stall.stop()


def _train_phase(
    phase: str,
    model_source: str,
    data_yaml: Path,
    settings: Settings,
    device: str,
    workers: int,
    epochs: int,
    save_dir: Path,
    watchdog: BatchWatchdog,
    on_epoch: EpochHook | None,
    resume: bool,
    extra: Mapping[str, Any] | None,
    ddp_checkpoint: Mapping[str, Any] | None,
    callbacks: Mapping[str, Callable[[Any], None]] | None,
    weigh_after: int,
    stall: StallWatchdog | None,
    gate_at: int,
    on_gate: GateHook | None,
    gate: Mapping[str, Any] | None,
) -> PhaseResult:
    from pogona_job.training.trainer import Hooks, process_local

    start = time.monotonic()
    last = save_dir / "weights" / "last.pt"
    model = load_model(str(last) if resume else model_source)
    hardware = describe_hardware(device)
    # Our callbacks live on the trainer class (pogona_job/training/trainer.py), so multi-GPU workers run them too.
    hooks = Hooks(
        watchdog,
        on_epoch=on_epoch,
        checkpoint=dict(ddp_checkpoint) if ddp_checkpoint else None,
        weights_at=weigh_after,
        stall=stall,
        gate_at=gate_at if on_gate is not None else 0,
        on_gate=on_gate,
        gate=dict(gate) if gate else None,
    )
    for event, callback in (callbacks or {}).items():  # registered on the model: they run before the trainer's
        model.add_callback(event, process_local(callback))
    if resume:
        # Only a whitelist of args may change on resume; `data` must be given (the stored path is gone
        # in a new container) and save_dir keeps results.csv appending in place (field notes).
        args: dict[str, Any] = {
            "resume": True,
            "data": str(data_yaml),
            "save_dir": str(save_dir),
            "device": device,
            "workers": workers,
            "plots": False,  # see below
        }
        log.info("training resumed", epochs=epochs, checkpoint=str(last), device=device)
        return _fit(model, phase, args, start, hardware, hooks)
    args = {
        "data": str(data_yaml),
        "epochs": epochs,
        "imgsz": settings.imgsz,
        "batch": settings.batch,
        "device": device,
        "workers": workers,
        "seed": settings.seed,
        "deterministic": True,
        "optimizer": settings.optimizer,
        "lr0": settings.lr0,
        "patience": settings.patience,
        "project": str(save_dir.parent),
        "name": save_dir.name,
        "exist_ok": True,
        # No drawing during training (label histograms, train batches, the last epoch's validation plots, all
        # redrawn or unpublished): results.png is drawn after it (`_fit`), and the validation plots by the
        # evaluate phase's one pass over best.pt (which the published plots describe).
        "plots": False,
        "verbose": settings.debug,
        **(extra or {}),
    }
    log.info("training started", epochs=epochs, model=model_source, device=device, imgsz=settings.imgsz)
    return _fit(model, phase, args, start, hardware, hooks)


def _fit(model: Any, phase: str, args: dict[str, Any], start: float, hardware: Hardware, hooks: Hooks) -> PhaseResult:
    from pogona_job.training.trainer import trainer_for

    try:
        model.train(trainer=trainer_for(hooks), **args)
    except JobError:
        raise
    except Exception as exc:  # ultralytics raises anything from anywhere; keep the cause for --debug
        log.debug("training exception", exc_info=True)
        first_line = (str(exc).splitlines() or [""])[0][:300]
        # The phase the failure happened in: the watchdog's (sanity until the gate passed, then full).
        failed_in = hooks.watchdog.phase or phase
        raise TrainingFailed(f"Training ({failed_in}) failed: {type(exc).__name__}: {first_line}.") from None
    hardware.amp = hooks.amp
    save_dir = Path(model.trainer.save_dir)
    plot_results(save_dir)
    params = sum(p.numel() for p in model.model.parameters())
    return PhaseResult(
        phase=phase,
        save_dir=save_dir,
        rows=read_results(save_dir / "results.csv"),
        seconds=time.monotonic() - start,
        hardware=hardware,
        params=params,
        first_batch_at=hooks.first_batch,
        weight_change=hooks.weight_change,
    )


def completed_phase(phase: str, save_dir: Path, device: str) -> PhaseResult:
    """A phase whose every epoch is already in the checkpoint: its results.png drawn again, nothing trained.
    (Its validation plots come from the evaluate phase, as for any training.)"""
    start = time.monotonic()
    model = load_model(str(save_dir / "weights" / "best.pt"))
    plot_results(save_dir)
    return PhaseResult(
        phase=phase,
        save_dir=save_dir,
        rows=read_results(save_dir / "results.csv"),
        seconds=time.monotonic() - start,
        hardware=describe_hardware(device),
        params=sum(p.numel() for p in model.model.parameters()),
        first_batch_at=None,
    )


def plot_results(save_dir: Path) -> None:
    """results.png: ultralytics' drawing of results.csv (every epoch's losses and metrics)."""
    from ultralytics.utils.plotting import plot_results as draw

    if (save_dir / "results.csv").exists():
        draw(file=save_dir / "results.csv")


def partial_phase(phase: str, save_dir: Path, device: str) -> PhaseResult | None:
    """What a phase that stopped early left behind: its finished epochs, for the failure report."""
    rows = read_results(save_dir / "results.csv")
    if not rows:
        return None
    seconds = rows[-1].get("time", 0.0)
    return PhaseResult(phase, save_dir, rows, seconds, describe_hardware(device), 0, None)


def first_epochs(results: Path, dest: Path, epochs: int) -> list[dict[str, float]]:
    """Copy results.csv's header and its rows up to `epochs` to `dest` (the sanity epochs' own
    results.csv, cut from the one training's); their rows."""
    lines = results.read_text().splitlines(keepends=True) if results.exists() else []
    if not lines:
        return []
    dest.parent.mkdir(parents=True, exist_ok=True)
    header = next(csv.reader([lines[0]]))
    column = [h.strip() for h in header].index("epoch")
    kept = [line for line in lines[1:] if line.strip() and int(float(next(csv.reader([line]))[column])) <= epochs]
    dest.write_text("".join([lines[0], *kept]))
    return read_results(dest)


def read_results(path: Path) -> list[dict[str, float]]:
    """ultralytics' results.csv as floats (its headers may carry padding spaces)."""
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [{k.strip(): float(v) for k, v in row.items() if k} for row in csv.DictReader(fh)]


def final_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    if not rows:
        return {}
    last = rows[-1]
    out = {name: last.get(key, 0.0) for name, key in METRICS.items()}
    out.update({k.removeprefix("train/"): last[k] for k in last if k.startswith("train/")})
    return out


# --- parity probe's loss computation ------------------------------------------------------


def batch_loss_fn(
    model_source: str, data_yaml: Path, imgsz: int, n_images: int = 4
) -> Callable[[str], dict[str, float]]:
    """Loss of one fixed batch from the real train split, for the CPU-vs-device parity probe."""
    import copy

    import torch
    import yaml
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset

    cfg = get_cfg(overrides={"imgsz": imgsz, "mosaic": 0.0, "augment": False})
    data = yaml.safe_load(data_yaml.read_text())
    data["nc"] = len(data["names"])
    img_path = str(Path(data["path"]) / data["train"])
    dataset = build_yolo_dataset(cfg, img_path, n_images, data, mode="val", rect=False, stride=32)
    batch = dataset.collate_fn([dataset[i] for i in range(min(n_images, len(dataset)))])
    base = load_model(model_source).model

    def compute(device: str) -> dict[str, float]:
        target = torch_device(device)
        model = copy.deepcopy(base).to(target).float().train()
        model.args = cfg
        model.criterion = None
        moved = {k: (v.to(target) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        moved["img"] = moved["img"].float() / 255
        with torch.no_grad():
            _, items = model.loss(moved)
        if isinstance(items, dict):
            return {k: float(v) for k, v in items.items()}
        return dict(zip(LOSSES, (float(v) for v in items), strict=False))

    return compute


def torch_device(device: str) -> str:
    """The job's device ("cpu", "mps", "0", "0,1", "cuda:1") as torch names it: torch refuses a bare "0"."""
    first = device.split(",")[0].strip()
    return f"cuda:{first}" if first.isdigit() else first
