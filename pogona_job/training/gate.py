"""The sanity gate: stop a run that is not learning, within batches rather than hours.

Three layers, cheapest first:
- `BatchWatchdog` reads every training batch's losses (sanity and full training) and
  aborts on NaN/inf, or on the MPS no-foreground signature (box = dfl = 0 exactly while
  the batch has labelled boxes), or all-zero losses.
- `parity_probe` compares one batch's loss on the CPU and on the accelerator before
  any training, so a broken backend is refused in seconds.
- `verdict` judges the sanity epochs as a whole (falling loss, mAP threshold).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pogona_job.errors import SanityFailed
from pogona_job.training.columns import LOSSES, METRICS, loss_column

CAUSES = (
    "likely causes: a broken accelerator backend (Apple MPS is known to do this; try POGONA_DEVICE=cpu or a CUDA GPU), "
    "or labels that ultralytics cannot see (check `pogona-job dataset validate`)"
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

    def check(self, losses: Mapping[str, float], boxes_in_batch: int) -> None:
        if self.between_batches:
            self.between_batches()
        self.batches += 1
        values = {k: float(losses[k]) for k in LOSSES if k in losses}
        self.recent.append(values)
        if any(not math.isfinite(v) for v in values.values()):
            self._trip(f"a non-finite loss ({_fmt(values)}) at {self.phase} batch {self.batches}")
        if values and all(v == 0.0 for v in values.values()):
            self._trip(f"all losses exactly 0 at {self.phase} batch {self.batches}")
        if boxes_in_batch > 0 and values.get("box_loss") == 0.0 and values.get("dfl_loss") == 0.0:
            self.zero_run += 1
            if self.zero_run >= self.zero_batches:
                self._trip(
                    f"box_loss and dfl_loss exactly 0 for {self.zero_run} consecutive labelled batches "
                    f"(cls_loss {values['cls_loss']:.3g}) - the no-foreground signature - "  # not all 0: it is there
                    f"by {self.phase} batch {self.batches}"
                )
        else:
            self.zero_run = 0

    def _trip(self, signature: str) -> None:
        self.tripped = signature
        raise SanityFailed(f"The model is not learning: {signature}; {CAUSES}.")


def _fmt(values: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items())


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
            f"({result.reason}); {CAUSES}."
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

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.criteria)

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "criteria": [asdict(c) for c in self.criteria]}

    def failure_sentence(self) -> str:
        failed = "; ".join(
            f"{c.name}: observed {c.observed}, needed {c.threshold}" for c in self.criteria if not c.passed
        )
        return f"The sanity epochs show the model is not learning ({failed}); {CAUSES}."


def train_total(row: Mapping[str, float]) -> float:
    return sum(row[loss_column(k)] for k in LOSSES)


def verdict(rows: Sequence[Mapping[str, float]], *, min_loss_drop: float, min_map50: float) -> Verdict:
    """Judge the sanity epochs (results.csv rows). Grows by appending criteria."""
    if not rows:
        return Verdict([Criterion("epochs completed", ">= 1", "0", False)])
    loss_keys = [k for k in rows[0] if k.endswith("_loss")]  # train/*_loss and val/*_loss
    finite = all(math.isfinite(r[k]) for r in rows for k in loss_keys)
    # First epoch against the best later one: on small data one epoch's mean loss is noisy (a few
    # batches), and a from-scratch model's box loss can rise while the assigner finds its first
    # foreground; a model that learns shows some later epoch clearly below the first.
    first = train_total(rows[0])
    last = min((train_total(r) for r in rows[1:]), default=first)
    drop = (first - last) / first if first > 0 and math.isfinite(first) and math.isfinite(last) else 0.0
    zero_epochs = [
        int(r["epoch"]) for r in rows if r[loss_column("box_loss")] == 0.0 and r[loss_column("dfl_loss")] == 0.0
    ]
    map50 = rows[-1].get(METRICS["map50"], 0.0)
    return Verdict(
        [
            Criterion("losses finite", "all finite", "yes" if finite else "NaN/inf seen", finite),
            Criterion(
                "train loss fell (first sanity epoch to the best later one)",
                f">= {min_loss_drop:.0%}",
                f"{drop:.1%} ({first:.4g} -> {last:.4g})",
                finite and drop >= min_loss_drop and len(rows) >= 2,
            ),
            Criterion(
                "no epoch with box_loss = dfl_loss = 0",
                "none",
                ", ".join(map(str, zero_epochs)) or "none",
                not zero_epochs,
            ),
            Criterion("mAP@0.5 after the sanity epochs", f">= {min_map50:g}", f"{map50:.3f}", map50 >= min_map50),
        ]
    )
