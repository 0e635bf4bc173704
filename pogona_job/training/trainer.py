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

The sanity gate sits inside the one training: at the end of epoch `gate_at` (POGONA_SANITY_EPOCHS) the
trainer hands `on_gate` the `Evidence` (the first rows of results.csv, the sanity batches, the weights'
change), before that epoch's checkpoint is offered. In one process the job's gate judges there and its
SanityFailed ends `train()`. Under DDP, rank 0 judges the same evidence with the thresholds of the
context and, on a failure, stops every rank through ultralytics' own stop broadcast (raising in one rank
would leave the others waiting in a collective); the launching process then hands the evidence from
rank 0's state file to the job's gate, which gives the same verdict (and writes gate.json, the report's
table). Under DDP the phases sanity/verdict/full therefore switch in the logs only when training returns.
The DDP path is not exercised by the test suite (no machine with several GPUs runs it); keep it simple.
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
from pogona_job.training.gate import (
    BatchWatchdog,
    Context,
    Evidence,
    GateHook,
    StallWatchdog,
    verdict,
    watchdog_causes,
)

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
    optimizer_steps: int = 0  # optimizer steps this process took (ultralytics accumulates nbs/batch batches a step)
    stall: StallWatchdog | None = None  # this process's no-progress thread (not under DDP: see train_phase)
    gate_at: int = 0  # the epoch whose end the gate judges (POGONA_SANITY_EPOCHS; 0: no gate in this training)
    on_gate: GateHook | None = None  # the job's gate (one process, or the DDP launcher after training)
    gate: dict[str, Any] | None = None  # DDP rank 0: the verdict's thresholds {"min_loss_drop", "min_map50"}
    gated: bool = False  # the gate has judged in this process
    worker: bool = False  # a DDP worker (rebuilt from the context)
    start_epoch: int = 0  # where this process's training began (0: from the start; else resumed)
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
                "gate_at": self.gate_at,
                "gate": self.gate,
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
            gate_at=int(ctx.get("gate_at", 0)),
            gate=ctx.get("gate"),
            worker=True,
        )
        if hooks.checkpoint and RANK in {-1, 0}:
            hooks.on_epoch = hooks._offer_checkpoint
        if hooks.gate and hooks.gate_at and RANK in {-1, 0}:
            hooks.on_gate = hooks._judge_as_rank0
        return hooks

    def _offer_checkpoint(self, epoch: int, _values: dict[str, float]) -> None:
        from pogona_job.training.checkpoint import CheckpointSync

        spec = self.checkpoint or {}
        if self._sync is None:  # the job's own spec (CheckpointSync.spec): same keys, guard and limits
            self._sync = CheckpointSync.from_spec(spec, Path(spec["staging"]))
        phase = str(spec.get("phase") or self.watchdog.phase)
        self._sync.offer(phase, epoch, int(spec["epochs"]), Path(spec["save_dir"]), spec["state"])

    def _judge_as_rank0(self, evidence: Evidence) -> None:
        """DDP rank 0: the same verdict as the job's gate, to stop every rank at a failed gate."""
        spec = self.gate or {}
        judged = verdict(
            evidence.rows,
            min_loss_drop=float(spec.get("min_loss_drop", 0.0)),
            min_map50=float(spec.get("min_map50", 0.0)),
            batches=evidence.batches,
            labelled=evidence.labelled,
            weight_change=evidence.weight_change,
            context=self.watchdog.context,
        )
        if not judged.passed:
            raise SanityFailed(judged.failure_sentence())

    def evidence(self, save_dir: Path, epoch: int) -> Evidence:
        """What the gate judges at the end of `epoch`; a resumed training saw only its last sanity batches,
        so the verdict reads the epochs then."""
        from pogona_job.training.phase import read_results

        rows = [r for r in read_results(save_dir / "results.csv") if int(r["epoch"]) <= epoch]
        resumed = self.start_epoch > 0
        return Evidence(
            epoch,
            rows,
            [] if resumed else list(self.watchdog.history),
            None if resumed else self.watchdog.labelled,
            self.weight_change,
            self.first_batch,
        )

    def judge(self, trainer: Any, epoch: int) -> bool:
        """The gate at the end of epoch `gate_at`, True when it passed; afterwards the watchdog keeps no
        more batches."""
        self.gated = True
        evidence = self.evidence(Path(trainer.save_dir), epoch)
        self.watchdog.keep = len(self.watchdog.history)  # the verdict's batches: the sanity epochs' only
        try:
            assert self.on_gate is not None
            self.on_gate(evidence)
        except SanityFailed:
            if not self.worker:
                raise  # one process: out of train(), exit 5
            trainer.stop = True  # DDP: every rank stops with rank 0 (ultralytics broadcasts `stop`)
            return False
        self.watchdog.phase = "full"  # the watchdog's sentences name the phase its batches belong to
        return True

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
                "start_epoch": self.start_epoch,
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
            result = super().train()
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
            hooks.start_epoch = int(state.get("start_epoch", hooks.start_epoch))
        # The job's gate judges rank 0's evidence now (a failed gate stopped the workers at its epoch).
        done = max((int(r["epoch"]) for r in _rows(Path(self.save_dir))), default=0)
        if hooks.on_gate is not None and hooks.gate_at and not hooks.gated and done >= hooks.gate_at:
            hooks.gated = True
            hooks.on_gate(hooks.evidence(Path(self.save_dir), hooks.gate_at))
        return result

    def final_eval(self) -> None:
        """Ultralytics validates best.pt once more after the last epoch; the job's evaluate phase validates it
        anyway (with intervals, per modality, and the plots), so that second pass is skipped here. What stays:
        the optimizer stripped from the weight files, as ultralytics ships them."""
        from ultralytics.utils.torch_utils import strip_optimizer

        if RANK in {-1, 0}:
            train_results = strip_optimizer(self.last).get("train_results") if self.last.exists() else None
            if self.best.exists():
                strip_optimizer(self.best, updates={"train_results": train_results})


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


def _rows(save_dir: Path) -> list[dict[str, float]]:
    from pogona_job.training.phase import read_results

    return read_results(save_dir / "results.csv")


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
    step = trainer.optimizer_step

    def counting_step() -> None:
        hooks.optimizer_steps += 1
        step()

    trainer.optimizer_step = counting_step
    hooks.amp = bool(getattr(trainer, "amp", False))
    if getattr(trainer, "validator", None) is not None:
        trainer.validator.pogona = hooks  # its val batches are progress too (on_val_batch_end)
    hooks.start_epoch = int(trainer.start_epoch)
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
        # Ultralytics' first optimizer step comes at the start of its warm-up, where the weights' learning rate
        # is 0, and the next only after up to nbs/batch batches (64/8 = 8 at batch 8): a sanity span of fewer
        # batches has not yet given the weights a chance to move. Not measured then (None): the gate says so.
        if hooks.optimizer_steps >= 2:
            hooks.weight_change = weight_change(hooks._initial, trainer.model)
        hooks._initial = None
    # The gate before this epoch's checkpoint: a set past the gate implies the gate passed.
    at_gate = hooks.on_gate is not None and trainer.epoch + 1 == hooks.gate_at and not hooks.gated
    if at_gate and not hooks.judge(trainer, trainer.epoch + 1):
        return  # DDP rank 0: the gate failed, every rank stops; no checkpoint of it
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
