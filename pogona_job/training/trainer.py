"""Our ultralytics trainer: the watchdog and the epoch hook belong to the trainer class itself.

With several GPUs ultralytics trains in worker processes that it starts from a generated script
(`ultralytics/utils/dist.py`): the script imports the trainer class by module and name and rebuilds
it from pickled arguments and callbacks. Closures added with `model.add_callback()` cannot carry a
job's stop flag or S3 client there, so our callbacks are module functions that `PogonaTrainer`
registers in `__init__`, on every rank, and what they need reaches the workers as `RANK_CONTEXT`
(an environment variable the launcher's children inherit):

- one process (CPU, one GPU): the job hands its live `Hooks` to the trainer (`trainer_for`);
- DDP worker: `Hooks` rebuilt from the context. Rank 0 checks every batch and broadcasts its verdict,
  so all ranks stop together; rank 0 alone offers checkpoints. Rank 0 writes the watchdog's state to
  a file that the launching process reads back: a tripped worker becomes SanityFailed (exit 5) there.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import DEFAULT_CFG, RANK

from pogona_job.errors import SanityFailed
from pogona_job.logs import get_logger
from pogona_job.training.columns import METRICS
from pogona_job.training.gate import BatchWatchdog, Context, StallWatchdog, watchdog_causes

log = get_logger()
RANK_CONTEXT = "POGONAJOB_RANK_CONTEXT"  # not POGONA_*: the settings refuse unknown variables of that prefix
EpochHook = Callable[[int, dict[str, float]], None]


@dataclass
class Hooks:
    """What our callbacks act on, one per training phase."""

    watchdog: BatchWatchdog
    on_epoch: EpochHook | None = None
    state_file: Path | None = None  # DDP: rank 0 writes the watchdog's state here for the launcher
    checkpoint: dict[str, Any] | None = None  # DDP: how rank 0 builds its own checkpoint sync
    boxes: int = 0  # labelled boxes in the current batch
    first_batch: float | None = None  # time.monotonic() when the first batch ended
    amp: bool | None = None
    weights_at: int = 0  # after this epoch, measure how far the weights moved since the start (0: never)
    weight_change: float | None = None  # relative L2 change of the weights: exactly 0 when nothing can learn
    stall: StallWatchdog | None = None  # this process's no-progress thread (not under DDP: see train_phase)
    _initial: Any = field(default=None, repr=False)  # the weights at the start, on the CPU, until measured
    _sync: Any = field(default=None, repr=False)

    def context(self) -> str:
        """The part the DDP workers need, as JSON."""
        return json.dumps(
            {
                "phase": self.watchdog.phase,
                "zero_batches": self.watchdog.zero_batches,
                "keep": self.watchdog.keep,
                "device": self.watchdog.context.device,
                "from_scratch": self.watchdog.context.from_scratch,
                "sanity_epochs": self.watchdog.context.sanity_epochs,
                "weights_at": self.weights_at,
                "state_file": str(self.state_file) if self.state_file else None,
                "checkpoint": self.checkpoint,
            }
        )

    @classmethod
    def from_context(cls, text: str) -> Hooks:
        ctx = json.loads(text)
        context = Context(
            str(ctx.get("device", "cpu")), bool(ctx.get("from_scratch")), int(ctx.get("sanity_epochs", 3))
        )
        watchdog = BatchWatchdog(
            zero_batches=int(ctx["zero_batches"]),
            phase=str(ctx["phase"]),
            context=context,
            keep=int(ctx.get("keep", 0)),
        )
        hooks = cls(
            watchdog,
            state_file=Path(ctx["state_file"]) if ctx.get("state_file") else None,
            checkpoint=ctx.get("checkpoint"),
            weights_at=int(ctx.get("weights_at", 0)),
        )
        if hooks.checkpoint and RANK in {-1, 0}:
            hooks.on_epoch = hooks._offer_checkpoint
        return hooks

    def _offer_checkpoint(self, epoch: int, _values: dict[str, float]) -> None:
        from pogona_job.training.checkpoint import CheckpointSync

        spec = self.checkpoint or {}
        if self._sync is None:  # the job's own spec (CheckpointSync.spec): same keys, guard and limits
            self._sync = CheckpointSync.from_spec(spec, Path(spec["staging"]))
        self._sync.offer(self.watchdog.phase, epoch, int(spec["epochs"]), Path(spec["save_dir"]), spec["state"])

    def finish(self) -> None:
        """Rank 0 (or the only process): flush our own checkpoint uploads, leave the state for the launcher."""
        if self._sync is not None:
            self._sync.flush(timeout=120)
            self._sync.close()
            self._sync = None
        if self.state_file is not None:
            state = {
                "batches": self.watchdog.batches,
                "tripped": self.watchdog.tripped,
                "kind": self.watchdog.kind,
                "last_batches": list(self.watchdog.recent),
                "history": self.watchdog.history,
                "labelled": self.watchdog.labelled,
                "weight_change": self.weight_change,
                "first_batch": self.first_batch,
                "amp": self.amp,
            }
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            self.state_file.write_text(json.dumps(state))


class PogonaTrainer(DetectionTrainer):  # type: ignore[misc]
    """ultralytics' detection trainer with our callbacks registered on construction, in every process."""

    def __init__(
        self,
        cfg: Any = DEFAULT_CFG,
        overrides: dict[str, Any] | None = None,
        _callbacks: Any = None,
        *,
        hooks: Hooks | None = None,
    ) -> None:
        super().__init__(cfg, overrides, _callbacks)
        context = os.environ.get(RANK_CONTEXT)
        if hooks is None and context is None:
            hooks = Hooks(BatchWatchdog(phase=Path(self.save_dir).name))  # e.g. a bare `yolo` run of this class
        self.pogona = hooks if hooks is not None else Hooks.from_context(context or "{}")
        for event, callback in CALLBACKS.items():
            if callback not in self.callbacks[event]:  # a DDP worker receives them pickled, already present
                self.callbacks[event].append(callback)

    def train(self) -> Any:
        if not self.ddp:
            return super().train()
        # ultralytics cloudpickles self.callbacks for its workers: closures over the job (S3 client, locks) stay here.
        for event, callbacks in self.callbacks.items():
            self.callbacks[event] = [c for c in callbacks if not getattr(c, "process_local", False)]
        # The launcher: the workers inherit the context; their fate comes back in the state file.
        hooks = self.pogona
        if hooks.state_file is None:
            hooks.state_file = Path(self.save_dir).parent / f"{hooks.watchdog.phase}-watchdog.json"
        hooks.state_file.unlink(missing_ok=True)
        previous = os.environ.get(RANK_CONTEXT)
        os.environ[RANK_CONTEXT] = hooks.context()
        try:
            return super().train()
        except subprocess.CalledProcessError:
            state = _read_state(hooks.state_file)
            if state.get("tripped"):
                causes = watchdog_causes(str(state.get("kind", "")), hooks.watchdog.context)
                raise SanityFailed(_sentence(state["tripped"], causes)) from None
            if hooks.watchdog.between_batches:  # the launcher forwards SIGTERM to the workers: honour it (143)
                hooks.watchdog.between_batches()
            raise
        finally:
            _restore_env(previous)
            state = _read_state(hooks.state_file)
            hooks.watchdog.batches = int(state.get("batches", hooks.watchdog.batches))
            hooks.watchdog.tripped = state.get("tripped", hooks.watchdog.tripped)
            hooks.watchdog.recent.extend(state.get("last_batches", []))
            hooks.watchdog.history = list(state.get("history", hooks.watchdog.history))
            hooks.watchdog.labelled = int(state.get("labelled", hooks.watchdog.labelled))
            hooks.weight_change = state.get("weight_change", hooks.weight_change)
            hooks.first_batch = state.get("first_batch", hooks.first_batch)
            hooks.amp = state.get("amp", hooks.amp)


def trainer_for(hooks: Hooks) -> Callable[..., PogonaTrainer]:
    """What `YOLO.train(trainer=...)` needs: it calls this with (overrides=, _callbacks=)."""
    return functools.partial(PogonaTrainer, hooks=hooks)


@contextmanager
def rank_context(hooks: Hooks) -> Iterator[None]:
    """Run code as a DDP worker would see it (tests, and the proof script)."""
    previous = os.environ.get(RANK_CONTEXT)
    os.environ[RANK_CONTEXT] = hooks.context()
    try:
        yield
    finally:
        _restore_env(previous)


def _restore_env(previous: str | None) -> None:
    if previous is None:
        os.environ.pop(RANK_CONTEXT, None)
    else:
        os.environ[RANK_CONTEXT] = previous


def _read_state(path: Path | None) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text())) if path else {}
    except (OSError, ValueError):
        return {}


def _sentence(signature: str, causes: str) -> str:
    return f"The model is not learning: {signature} (rank 0 of the multi-GPU run); {causes}."


def _distributed() -> bool:
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized())


# --- the callbacks (module functions: picklable by reference for the DDP workers) ---------------


def process_local(callback: Callable[[Any], None]) -> Callable[[Any], None]:
    """Mark a callback that holds this process's state (live status, budget): never sent to DDP workers."""
    callback.process_local = True  # type: ignore[attr-defined]
    return callback


def on_train_start(trainer: Any) -> None:
    hooks: Hooks = trainer.pogona
    original = trainer.preprocess_batch  # the batch is a local of ultralytics' loop: count its boxes here

    def counting(batch: dict[str, Any]) -> dict[str, Any]:
        hooks.boxes = int(batch["cls"].shape[0]) if "cls" in batch else 0
        return original(batch)  # type: ignore[no-any-return]

    trainer.preprocess_batch = counting
    hooks.amp = bool(getattr(trainer, "amp", False))
    if getattr(trainer, "validator", None) is not None:
        trainer.validator.pogona = hooks  # its val batches are progress too (on_val_batch_end)
    if hooks.weights_at > trainer.start_epoch and RANK in {-1, 0}:
        hooks._initial = _weights(trainer.model)


def _weights(model: Any) -> dict[str, Any]:
    """The weight tensors (not biases: ultralytics' warm-up moves those even at lr0 = 0), copied to the CPU."""
    return {n: p.detach().to("cpu", copy=True).float() for n, p in model.named_parameters() if n.endswith("weight")}


def weight_change(initial: Mapping[str, Any], model: Any) -> float:
    """Relative L2 distance of the weights from `initial`: exactly 0 when no weight could move."""
    import torch

    now = _weights(model)
    moved = sum(float(torch.sum((now[n] - w) ** 2)) for n, w in initial.items() if n in now)
    size = sum(float(torch.sum(w**2)) for w in initial.values())
    return (moved / size) ** 0.5 if size > 0 else 0.0


def on_train_batch_end(trainer: Any) -> None:
    """Rank 0 judges the batch; with DDP every rank learns the verdict, so all stop at the same batch."""
    hooks: Hooks = trainer.pogona
    if hooks.stall is not None:
        hooks.stall.beat()
    if hooks.first_batch is None:
        hooks.first_batch = time.monotonic()
    tripped: SanityFailed | None = None
    if RANK in {-1, 0}:
        try:
            hooks.watchdog.check(trainer.loss_items, hooks.boxes)
        except SanityFailed as err:
            tripped = err
    if _distributed():
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0 if tripped is None else 1], device=trainer.device)
        dist.broadcast(flag, src=0)
        if tripped is None and int(flag.item()):
            raise SanityFailed("Stopped with rank 0, whose sanity watchdog tripped.")
    if tripped is not None:
        hooks.finish()
        raise tripped


def on_fit_epoch_end(trainer: Any) -> None:
    if RANK not in {-1, 0}:
        return
    if trainer.pogona.stall is not None:
        trainer.pogona.stall.beat()
    metrics = dict(trainer.metrics)
    if trainer.epoch >= trainer.epochs or not any(k.startswith("val/") for k in metrics):
        return  # the extra call after final validation (field notes)
    losses = {k: round(float(v), 5) for k, v in trainer.tloss.items()} if trainer.tloss else {}

    values = {**losses, **{name: round(float(metrics[key]), 5) for name, key in METRICS.items()}}
    log.info(
        "epoch",
        epoch=trainer.epoch + 1,
        epochs=trainer.epochs,
        seconds=round(float(trainer.epoch_time or 0.0), 2),
        **values,
        **getattr(trainer, "pogona_epoch_fields", {}),  # images/s, ETA, dataloader share (livestatus)
    )
    hooks: Hooks = trainer.pogona
    if hooks._initial is not None and trainer.epoch + 1 >= hooks.weights_at:
        hooks.weight_change = weight_change(hooks._initial, trainer.model)
        hooks._initial = None
    if hooks.on_epoch:
        hooks.on_epoch(trainer.epoch + 1, values)


def on_val_batch_end(validator: Any) -> None:
    """Called with the validator (ultralytics hands it the trainer's callbacks): a finished val batch."""
    hooks: Hooks | None = getattr(validator, "pogona", None)
    if hooks is not None and hooks.stall is not None:
        hooks.stall.beat()


def on_train_end(trainer: Any) -> None:
    if RANK in {-1, 0}:
        trainer.pogona.finish()


CALLBACKS: Mapping[str, Callable[[Any], None]] = {
    "on_train_start": on_train_start,
    "on_train_batch_end": on_train_batch_end,
    "on_fit_epoch_end": on_fit_epoch_end,
    "on_val_batch_end": on_val_batch_end,
    "on_train_end": on_train_end,
}
