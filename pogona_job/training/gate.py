"""The sanity gate: stop a run that is not learning, within batches rather than hours.

Layers, cheapest first:
- `BatchWatchdog` reads every training batch's losses (sanity and full training) and
  aborts on NaN/inf, or on the MPS no-foreground signature (box = dfl = 0 exactly while
  the batch has labelled boxes), or all-zero losses. It keeps the sanity batches' losses
  for the verdict.
- `StallWatchdog` (a thread) notices when no batch finishes for far longer than the
  batches so far took: a stalled data loader, a hung collective, a dead worker.
- `parity_probe` compares one batch's loss on the CPU and on the accelerator before
  any training, so a broken backend is refused in seconds; `require_trainable` refuses
  a `freeze` argument that leaves nothing to train (a configuration mistake, exit 2).
- `verdict` judges the sanity epochs as a whole. Its learning criterion reads the
  batch-level trend of each loss (robust to ultralytics' warm-up, where a from-scratch
  model's epoch-mean loss can rise while it learns) and the sanity mAP where it exists.
- `ZeroMapWatch` stops full training whose val mAP stays exactly 0 for K epochs.

The sanity epochs are the first epochs of the one training: the trainer hands the gate its `Evidence`
at the end of epoch POGONA_SANITY_EPOCHS, and training continues only when the verdict passed.

Every failure sentence names causes that fit the run (`Context`): on the CPU never a backend.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pogona_job.errors import ConfigError, SanityFailed, Stalled
from pogona_job.training.columns import LOSSES, METRICS, loss_column


@dataclass(frozen=True)
class Context:
    """What the failure sentences may blame: only causes that fit this run."""

    device: str = "cpu"  # as passed to ultralytics: cpu, mps, 0, 0,1
    from_scratch: bool = False  # a .yaml model: zero mAP and a rising box loss are normal for epochs
    sanity_epochs: int = 3

    @property
    def on_cpu(self) -> bool:
        return self.device == "cpu"


def backend_cause(ctx: Context) -> str | None:
    """The backend as a cause; never on the CPU, which is the reference itself."""
    if ctx.on_cpu:
        return None
    if ctx.device == "mps":
        return "Apple's MPS backend (known to train YOLO on zero or NaN losses; use POGONA_DEVICE=cpu or a CUDA GPU)"
    return f"the GPU backend on device {ctx.device} (compare with POGONA_DEVICE=cpu on the same data)"


def _likely(causes: Sequence[str | None]) -> str:
    named = [c for c in causes if c]
    return "likely causes: " + "; or ".join(named) if named else "no likely cause is known for this run"


def watchdog_causes(kind: str, ctx: Context) -> str:
    """Causes for one batch-level trip (`nan`, `zero`, `no-foreground`)."""
    if kind == "nan":
        return _likely(
            [
                backend_cause(ctx),
                "a learning rate too high for this model and batch (lower POGONA_LR0)",
                None if ctx.on_cpu else "mixed precision overflowing (AMP)",
            ]
        )
    if kind == "zero":
        return _likely([backend_cause(ctx), "a loss function that was replaced or patched"])
    return _likely(
        [
            backend_cause(ctx),
            "labelled boxes that reach the loss but that no prediction is assigned to: boxes far smaller than "
            "the model's 8-pixel grid at this image size (raise POGONA_IMGSZ) or lying outside their image "
            "(check `pogona-job dataset validate`)",
        ]
    )


@dataclass
class BatchWatchdog:
    """Per-batch loss checks; `check()` raises SanityFailed at the first damning batch."""

    zero_batches: int = 6  # K: consecutive labelled batches with box = dfl = 0
    phase: str = "sanity"
    batches: int = 0
    zero_run: int = 0
    recent: deque[dict[str, float]] = field(default_factory=lambda: deque(maxlen=5))  # for the failure report
    tripped: str | None = None
    between_batches: Callable[[], None] | None = None  # e.g. honour a pending SIGTERM
    context: Context = field(default_factory=Context)
    keep: int = 0  # keep the first `keep` batches' losses (the sanity batches) for the verdict
    history: list[dict[str, float]] = field(default_factory=list)
    labelled: int = 0  # of the kept batches, those with at least one labelled box
    kind: str = ""  # the last trip's kind (nan, zero, no-foreground): it picks the causes

    def check(self, losses: Mapping[str, float], boxes_in_batch: int) -> None:
        if self.between_batches:
            self.between_batches()
        self.batches += 1
        values = {k: float(losses[k]) for k in LOSSES if k in losses}
        self.recent.append(values)
        if len(self.history) < self.keep:
            self.history.append(values)
            self.labelled += boxes_in_batch > 0
        if any(not math.isfinite(v) for v in values.values()):
            self._trip(f"a non-finite loss ({_fmt(values)}) at {self.phase} batch {self.batches}", "nan")
        if values and all(v == 0.0 for v in values.values()):
            self._trip(f"all losses exactly 0 at {self.phase} batch {self.batches}", "zero")
        if boxes_in_batch > 0 and values.get("box_loss") == 0.0 and values.get("dfl_loss") == 0.0:
            self.zero_run += 1
            if self.zero_run >= self.zero_batches:
                self._trip(
                    f"box_loss and dfl_loss exactly 0 for {self.zero_run} consecutive labelled batches "
                    f"(cls_loss {values['cls_loss']:.3g}) - the no-foreground signature - "  # not all 0: it is there
                    f"by {self.phase} batch {self.batches}",
                    "no-foreground",
                )
        else:
            self.zero_run = 0

    def _trip(self, signature: str, kind: str) -> None:
        self.tripped = signature
        self.kind = kind
        raise SanityFailed(f"The model is not learning: {signature}; {watchdog_causes(kind, self.context)}.")


def _fmt(values: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items())


# --- no progress ------------------------------------------------------------------------


@dataclass
class StallWatchdog:
    """A thread that calls `on_stall(sentence)` when no batch finishes for far longer than any gap so far.

    Every finished train or val batch (and epoch) is a `beat()`. The limit is `factor` times the longest
    gap between beats seen so far, never under `min_s`; before the first beat it is `first_s` (model
    build, label scan, caching). The main thread may be stuck in C (a hung collective, a data loader
    waiting on a dead worker), so it cannot be interrupted: `on_stall` must report and end the process.
    """

    factor: float
    min_s: float
    first_s: float
    on_stall: Callable[[Stalled], None]
    phase: str = "full"
    poll_s: float = 1.0
    clock: Callable[[], float] = time.monotonic
    beats: int = 0
    longest: float = 0.0
    last: float = field(default_factory=time.monotonic)
    fired: Stalled | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> StallWatchdog:
        self.last = self.clock()
        self._thread = threading.Thread(target=self._watch, name="pogona-stall-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def beat(self) -> None:
        now = self.clock()
        if self.beats:
            self.longest = max(self.longest, now - self.last)
        self.last, self.beats = now, self.beats + 1

    def limit(self) -> float:
        return self.first_s if self.beats == 0 else max(self.min_s, self.factor * self.longest)

    def overdue(self) -> Stalled | None:
        """The failure when the wait since the last beat is past the limit (checked by the thread)."""
        waited, limit = self.clock() - self.last, self.limit()
        if waited <= limit:
            return None
        if self.beats == 0:
            what = f"the first {self.phase} batch has not finished after {waited:.0f} s (limit {limit:.0f} s)"
        else:
            what = (
                f"no {self.phase} batch finished for {waited:.0f} s after {self.beats} finished train/val "
                f"batches whose longest gap was {self.longest:.1f} s "
                f"(limit {limit:.0f} s: {self.factor:g}x that, at least {self.min_s:g} s)"
            )
        return Stalled(
            f"Training made no progress: {what} - a stalled data loader, a hung multi-GPU collective or a dead "
            "worker; the run is stopped and may be retried (it resumes from its last checkpoint). If the data "
            "loader is the cause, try POGONA_WORKERS=0; raise POGONA_STALL_FACTOR or POGONA_STALL_MIN_S if "
            "some batches are legitimately that slow."
        )

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            err = self.overdue()
            if err is not None:
                self.fired = err
                self.on_stall(err)
                return


# --- backend parity probe -------------------------------------------------------------

LossFn = Callable[[str], Mapping[str, float]]  # device -> loss items for the fixed batch


@dataclass
class ParityResult:
    device: str
    cpu: dict[str, float]
    accelerator: dict[str, float]
    tolerance: float
    passed: bool
    reason: str


def parity_probe(compute: LossFn, device: str, *, tolerance: float = 0.05) -> ParityResult:
    """Same weights, same batch, CPU vs device: the losses must agree within `tolerance` (relative)."""
    cpu = {k: float(v) for k, v in compute("cpu").items()}
    acc = {k: float(v) for k, v in compute(device).items()}
    reason = ""
    for name, ref in cpu.items():
        got = acc.get(name, math.nan)
        if not math.isfinite(got) and math.isfinite(ref):
            reason = f"{name} is {got} on {device} but {ref:.4g} on the CPU"
        elif got == 0.0 and ref != 0.0:
            reason = f"{name} is 0 on {device} but {ref:.4g} on the CPU"
        elif abs(got - ref) > tolerance * max(abs(ref), 1e-3):
            reason = f"{name} is {got:.4g} on {device} but {ref:.4g} on the CPU (tolerance {tolerance:.0%})"
        if reason:
            break
    return ParityResult(device, cpu, acc, tolerance, not reason, reason)


def require_parity(result: ParityResult) -> None:
    if not result.passed:
        raise SanityFailed(
            f"Refusing device {result.device}: its training loss disagrees with the CPU's on the same batch "
            f"({result.reason}); {_likely([backend_cause(Context(result.device))])}."
        )


# --- a model with nothing left to train ---------------------------------------------------


def frozen_layers(freeze: object) -> list[str]:
    """The parameter-name fragments ultralytics freezes for its `freeze` argument (its trainer's own rule): an
    int N freezes layers 0..N-1, a list those layer indices; the DFL layer is always frozen."""
    chosen: Sequence[object] = freeze if isinstance(freeze, list) else range(freeze) if isinstance(freeze, int) else []
    return [f"model.{x}." for x in chosen] + [".dfl"]


def require_trainable(freeze: object, parameters: Sequence[str], model: str) -> None:
    """Refuse, before any training, a `freeze` that leaves no parameter of the model trainable.

    Ultralytics refuses it itself only once the trainer is built (exit 6 with its own sentence); this is a
    configuration mistake (exit 2) that names the argument and what would train. `parameters`: the model's
    parameter names (`model.named_parameters()`)."""
    frozen = frozen_layers(freeze)
    if not parameters or any(not any(f in name for f in frozen) for name in parameters):
        return
    layers = sorted({int(n.split(".")[1]) for n in parameters if n.startswith("model.") and n.split(".")[1].isdigit()})
    last = layers[-1] if layers else 0
    raise ConfigError(
        f"The trainer argument freeze={freeze!r} freezes every layer of {model} (layers 0-{last} hold its "
        f"{len(parameters)} parameter tensors; the DFL is always frozen): nothing is left to train, so the run "
        f"is refused before training. Freeze fewer layers (freeze={last} trains the detection head only) or "
        "remove the argument."
    )


# --- verdict after the sanity epochs -------------------------------------------------


@dataclass
class Criterion:
    name: str
    threshold: str
    observed: str
    passed: bool


@dataclass
class Verdict:
    criteria: list[Criterion]
    context: Context = field(default_factory=Context)
    seen: str = ""  # what the labels looked like in the sanity batches, for the sentence

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.criteria)

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "criteria": [asdict(c) for c in self.criteria]}

    def failure_sentence(self) -> str:
        failed = [c for c in self.criteria if not c.passed]
        listed = "; ".join(f"{c.name}: observed {c.observed}, needed {c.threshold}" for c in failed)
        return f"The sanity epochs show the model is not learning ({listed}); {self.causes(failed)}."

    def causes(self, failed: Sequence[Criterion]) -> str:
        names = {c.name for c in failed}
        ctx = self.context
        weights_still = WEIGHTS in names
        trend_failed = TREND in names or EPOCH_TREND in names
        causes: list[str | None] = []
        if weights_still:
            causes.append("a learning rate of 0 (POGONA_LR0) or every layer frozen: the weights did not change")
        if NO_LABELS in names:
            causes.append(f"labels that ultralytics cannot see ({self.seen}; check `pogona-job dataset validate`)")
        # No labelled box explains zero box and dfl losses, and no backend makes labels (they are counted on the
        # CPU side, from the batch): the backend is a cause only where labels reached the loss.
        if NO_LABELS not in names and (ZERO_EPOCHS in names or (not weights_still and (trend_failed or MAP in names))):
            causes.append(backend_cause(ctx))
        if MAP in names and ctx.from_scratch:
            causes.append(
                f"too few sanity epochs for a from-scratch model to score ({ctx.sanity_epochs}; raise "
                "POGONA_SANITY_EPOCHS, lower POGONA_GATE_MIN_MAP50, or start from pretrained weights)"
            )
        if (MAP in names or trend_failed) and not ctx.from_scratch and NO_LABELS not in names:
            causes.append(
                f"labels that do not match their images ({self.seen}), or a threshold too strict for this data"
            )
        if ZERO_EPOCHS in names and ctx.on_cpu and NO_LABELS not in names:  # no boxes: zero box loss is expected
            causes.append(f"labelled boxes no prediction is assigned to ({self.seen})")
        return _likely(causes)


TREND = "a loss falls over the sanity batches (median of the last third vs the first third)"
EPOCH_TREND = "train loss fell (first sanity epoch to the best later one)"
ZERO_EPOCHS = "no epoch with box_loss = dfl_loss = 0"
MAP = "mAP@0.5 after the sanity epochs"
WEIGHTS = "the weights changed during the sanity epochs (relative L2 change)"
NO_LABELS = "sanity batches with at least one labelled box"
WEIGHTS_UNMEASURED = (
    "not judged: too few sanity batches for an optimizer step with a learning rate (ultralytics accumulates "
    "64/POGONA_BATCH batches a step); more sanity epochs judge it"
)
SHOWN = "shown, not judged: from scratch all losses can rise in warm-up"


def train_total(row: Mapping[str, float]) -> float:
    return sum(row[loss_column(k)] for k in LOSSES)


@dataclass(frozen=True)
class Trend:
    """One loss over the sanity batches: medians of the first and the last third (robust to single batches)."""

    loss: str
    first: float
    last: float

    @property
    def change(self) -> float:
        return (self.last - self.first) / self.first if self.first > 0 else 0.0

    def text(self) -> str:
        return f"{self.loss} {self.first:.4g} -> {self.last:.4g} ({self.change:+.0%})"


def batch_trends(batches: Sequence[Mapping[str, float]]) -> list[Trend]:
    """Per-loss trend; a third of the batches each side (at least one)."""
    third = max(1, len(batches) // 3)
    out = []
    for name in LOSSES:
        values = [b[name] for b in batches if name in b and math.isfinite(b[name])]
        if len(values) >= 2:
            out.append(Trend(name, statistics.median(values[:third]), statistics.median(values[-third:])))
    return out


def verdict(
    rows: Sequence[Mapping[str, float]],
    *,
    min_loss_drop: float,
    min_map50: float,
    batches: Sequence[Mapping[str, float]] = (),
    labelled: int | None = None,
    weight_change: float | None = None,
    context: Context | None = None,
) -> Verdict:
    """Judge the sanity epochs: results.csv rows, and what the trainer saw on the way.

    `batches`: every sanity batch's losses. A model learns when some loss falls over them (median
    of the last third below the first third's by `min_loss_drop`): in ultralytics' warm-up a
    from-scratch model's box and dfl losses rise while the assigner finds its first foreground, so
    the epoch means can rise; its cls loss falls. Pretrained weights that already fit show a flat
    loss: their sanity mAP is the evidence then. Without batches (a resumed run), the epoch means.
    `labelled`: sanity batches with a labelled box. `weight_change`: the weights' relative L2 change
    (lr0 = 0 or everything frozen gives exactly 0, however the losses wander with the batches); None with
    `batches` when the trainer did not measure it (fewer than two optimizer steps in the sanity epochs).
    """
    ctx = context or Context()
    seen = f"{labelled} of {len(batches)} sanity batches carried labelled boxes" if labelled is not None else ""
    if not rows:
        return Verdict([Criterion("epochs completed", ">= 1", "0", False)], ctx, seen)
    loss_keys = [k for k in rows[0] if k.endswith("_loss")]  # train/*_loss and val/*_loss
    finite = all(math.isfinite(r[k]) for r in rows for k in loss_keys) and all(
        math.isfinite(v) for b in batches for v in b.values()
    )
    map50 = rows[-1].get(METRICS["map50"], 0.0)
    map_evidence = min_map50 > 0 and map50 >= min_map50  # pretrained weights: the mAP shows learning
    criteria = [Criterion("losses finite", "all finite", "yes" if finite else "NaN/inf seen", finite)]
    trends = batch_trends(batches) if len(batches) >= 3 else []
    # Measured (BENCHMARKS.md, gate replay): from scratch, ultralytics' task-aligned assigner gives more
    # anchors ever larger targets as the model learns, so all three losses can RISE over healthy sanity
    # epochs (demo at 96 px: box +102%, cls +41%, dfl +98%). No loss trend tells learning from not
    # learning there: it is shown, not judged; the weights criterion and the zero-mAP stop do the judging.
    judged = not ctx.from_scratch
    if trends:
        fell = any(t.change <= -min_loss_drop for t in trends)
        observed = ", ".join(t.text() for t in trends) + f" over {len(batches)} batches"
        if map_evidence and not fell:
            observed += f"; mAP@0.5 {map50:.3f} shows learning"
        criteria.append(
            Criterion(
                TREND,
                f"one loss <= -{min_loss_drop:.0%}, or mAP@0.5 >= {min_map50:g}" if judged else SHOWN,
                observed,
                finite and (fell or map_evidence or not judged),
            )
        )
    else:
        # First epoch against the best later one: on small data one epoch's mean is noisy.
        first = train_total(rows[0])
        last = min((train_total(r) for r in rows[1:]), default=first)
        drop = (first - last) / first if first > 0 and math.isfinite(first) and math.isfinite(last) else 0.0
        criteria.append(
            Criterion(
                EPOCH_TREND,
                f">= {min_loss_drop:.0%}" if judged else SHOWN,
                f"{drop:.1%} ({first:.4g} -> {last:.4g})",
                finite and (not judged or (len(rows) >= 2 and (drop >= min_loss_drop or map_evidence))),
            )
        )
    zero_epochs = [
        int(r["epoch"]) for r in rows if r[loss_column("box_loss")] == 0.0 and r[loss_column("dfl_loss")] == 0.0
    ]
    criteria.append(Criterion(ZERO_EPOCHS, "none", ", ".join(map(str, zero_epochs)) or "none", not zero_epochs))
    criteria.append(Criterion(MAP, f">= {min_map50:g}", f"{map50:.3f}", map50 >= min_map50))
    if weight_change is not None:
        criteria.append(Criterion(WEIGHTS, "> 0", f"{weight_change:.3g}", weight_change > 0))
    elif batches:  # seen from the start, yet not measured: the optimizer had not stepped with a learning rate
        criteria.append(Criterion(WEIGHTS, "> 0", WEIGHTS_UNMEASURED, True))
    if labelled is not None and batches:
        criteria.append(Criterion(NO_LABELS, ">= 1", f"{labelled} of {len(batches)}", labelled > 0))
    return Verdict(criteria, ctx, seen)


@dataclass
class Evidence:
    """What the trainer hands the gate at the end of sanity epoch `epoch`, inside the one training."""

    epoch: int
    rows: list[dict[str, float]]  # results.csv, epochs 1..epoch
    batches: list[dict[str, float]]  # the sanity batches' losses; empty when training resumed mid-sanity
    labelled: int | None  # of those, batches with a labelled box (None: not seen, a resumed run)
    weight_change: float | None  # relative L2 change of the weights by this epoch
    first_batch: float | None = None  # time.monotonic() when the first training batch of this process ended


GateHook = Callable[[Evidence], None]  # raises SanityFailed to stop the training at the gate


# --- full training that stays at zero ----------------------------------------------------


@dataclass
class ZeroMapWatch:
    """Stops full training whose val mAP@0.5 is exactly 0 for `epochs` epochs after the gate passed.

    Labels that do not belong to their images give a loss that falls while the mAP stays 0: the
    sanity gate cannot tell that from a from-scratch model still in its first epochs (nor could a
    label-permutation probe on the replay's tiny runs: BENCHMARKS.md, gate replay), so the count
    starts after it. `epochs` 0 switches it off.
    """

    epochs: int
    from_scratch: bool = False
    zeros: int = 0

    def check(self, epoch: int, map50: float) -> None:
        self.zeros = self.zeros + 1 if map50 == 0.0 else 0
        if self.epochs and self.zeros >= self.epochs:
            hint = (
                "labels that do not belong to their images (a shuffled or mismatched export: compare a few label "
                "files with their images), boxes in the wrong coordinate format, or val labels from another "
                "dataset"
            )
            if self.from_scratch:
                hint += "; a from-scratch model can also need longer: raise POGONA_GATE_ZERO_MAP_EPOCHS"
            raise SanityFailed(
                f"The model is not learning: val mAP@0.5 stayed exactly 0 for {self.zeros} full-training epochs "
                f"(to epoch {epoch}) although the training loss passed the gate; likely causes: {hint}."
            )
