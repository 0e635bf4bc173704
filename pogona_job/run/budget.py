"""What a run costs and whether it may go on: per-attempt accounting and the budget.

Each attempt keeps one entry in `<run>/checkpoint/accounting.json` (read-modify-write on the
ETag with `pointers.update`): wall-clock, phases, epochs finished, where training resumed,
the instance and its price. A later attempt reads the earlier entries, so the budget
(`POGONA_MAX_HOURS`, or `POGONA_MAX_COST` at `POGONA_HOURLY_COST`) counts every attempt and a
preempted run cannot outspend it through retries. An attempt that vanished without a word
(kill -9, a lost spot machine) left its last periodic entry behind: it counts as a preemption.

The budget stops training at an epoch boundary when the next epoch would not fit; the job then
publishes best-so-far as `partial` (never latest, never champion).
"""

from __future__ import annotations

import itertools
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pogona_job import PROCESS_START
from pogona_job.config import Settings
from pogona_job.errors import ConfigError, JobError
from pogona_job.logs import get_logger
from pogona_job.run.cloud import Instance
from pogona_job.s3 import pointers
from pogona_job.s3.storage import S3Path

log = get_logger()
ACCOUNTING = "checkpoint/accounting.json"
PREEMPTED = ("interrupted", "running")  # "running": the attempt died without closing its entry
BOTTLENECK_SHARE = 0.10  # dataloader wait above this share of step time: the GPU is starved


class BudgetSpent(JobError):
    """A resumed attempt found the budget already spent: publish the checkpoint's best-so-far as partial."""

    exit_code = 0
    status = "partial"


def budget_limit(settings: Settings) -> tuple[float | None, str]:
    """The budget in seconds (the tighter of hours and cost) and how it was set, for sentences."""
    if settings.max_cost is not None and settings.hourly_cost is None:
        raise ConfigError(
            "POGONA_MAX_COST needs POGONA_HOURLY_COST (the machine's price in US$/hour) to turn money into time; "
            "set both, or use POGONA_MAX_HOURS."
        )
    limits: list[tuple[float, str]] = []
    if settings.max_hours is not None:
        limits.append((settings.max_hours * 3600, f"POGONA_MAX_HOURS={settings.max_hours:g}"))
    if settings.max_cost is not None and settings.hourly_cost:
        limits.append(
            (
                settings.max_cost / settings.hourly_cost * 3600,
                f"POGONA_MAX_COST=US${settings.max_cost:.2f} at US${settings.hourly_cost:.2f}/h",
            )
        )
    if not limits:
        return None, ""
    return min(limits)


def gpu_count(device: str) -> int:
    if device in ("cpu", "mps"):
        return 0
    return len(device.split(","))


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Tracker:
    """This attempt's accounting, the earlier attempts', and the budget decisions."""

    client: Any
    run: S3Path  # <output>/<run_id>
    settings: Settings
    instance: Instance
    device: str
    scheduler_attempt: int
    timings: dict[str, float]  # the job's per-phase seconds (RunRecord.timings), live
    started: float = PROCESS_START  # the machine is paid from the process start, imports included
    started_at: str = field(default_factory=_now)
    prior: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None
    guard: Callable[[], None] | None = None  # the lease's renewal, between the read and the write
    projection: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.id = secrets.token_hex(6)
        self.limit_s, self.limit_source = budget_limit(self.settings)
        self.epochs: dict[str, int] = {}  # phase -> last epoch finished in this attempt
        self.resumed_from: dict[str, int] = {}  # phase -> epochs already done when training started here
        self.epoch_seconds: dict[str, list[float]] = {}
        self.data_share: dict[str, list[float]] = {}
        self.last_epoch_end: float | None = None
        self._lock = threading.Lock()

    # --- reading the earlier attempts --------------------------------------------------
    @property
    def path(self) -> S3Path:
        return self.run / ACCOUNTING

    def load(self) -> None:
        value = pointers.read(self.client, self.path).value or {}
        self.prior = [a for a in value.get("attempts", []) if a.get("id") != self.id]
        if self.prior:
            log.info(
                "earlier attempts of this run",
                attempts=len(self.prior),
                seconds=round(sum(float(a.get("wall_s", 0)) for a in self.prior), 1),
                preemptions=sum(a.get("outcome") in PREEMPTED for a in self.prior),
            )

    # --- what training reports -----------------------------------------------------------
    def training_started(self, phase: str, start_epoch: int) -> None:
        with self._lock:
            self.resumed_from.setdefault(phase, start_epoch)

    def epoch_done(self, phase: str, epoch: int, seconds: float, share: float | None) -> None:
        with self._lock:
            self.epochs[phase] = epoch
            self.epoch_seconds.setdefault(phase, []).append(seconds)
            if share is not None:
                self.data_share.setdefault(phase, []).append(share)
            self.last_epoch_end = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def used_s(self) -> float:
        """Wall-clock of every attempt so far, this one included: what the budget counts."""
        return sum(float(a.get("wall_s", 0)) for a in self.prior) + self.elapsed()

    def epochs_done(self, phase: str) -> int:
        done = [int(a.get("epochs", {}).get(phase, 0)) for a in self.prior]
        return max([*done, self.epochs.get(phase, 0)])

    # --- the budget -----------------------------------------------------------------------
    def project(self, sanity_rows: list[dict[str, float]], epochs: int) -> dict[str, Any] | None:
        """After the sanity epochs: will the full run fit? Logged at once, kept for the report."""
        if not sanity_rows:
            return None
        epoch_s = float(sanity_rows[-1].get("time", 0.0)) / len(sanity_rows)
        remaining = max(0, epochs - self.epochs_done("full"))
        used = self.used_s()
        projected = used + remaining * epoch_s
        self.projection = {
            "epoch_s": round(epoch_s, 2),
            "epochs": epochs,
            "projected_s": round(projected, 1),
            "projected_cost": self._cost_of(projected),
            "limit_s": self.limit_s,
        }
        if self.limit_s is None:
            log.info("full run projection", projected_s=round(projected, 1), epoch_s=round(epoch_s, 2), epochs=epochs)
            return self.projection
        fits = max(0, math.floor((self.limit_s - used) / epoch_s)) if epoch_s > 0 else remaining
        self.projection.update(over_budget=projected > self.limit_s, epochs_that_fit=min(fits, remaining))
        if projected > self.limit_s:
            fit = min(fits, remaining)
            self.projection["warning"] = (
                f"The full run ({remaining} epochs of ~{duration(epoch_s)}) is projected at {duration(projected)} "
                f"in all, over the budget {self.limit_source} ({duration(self.limit_s)}): "
                + (f"about {fit} epoch{'s' if fit != 1 else ''} fit" if fit else "no more epochs fit")
                + "; training stops at the budget (after at least one epoch) and publishes best-so-far as partial."
            )
            log.warning(
                "budget will not cover the full run",
                projected_s=round(projected, 1),
                limit_s=round(self.limit_s, 1),
                epochs=remaining,
                epochs_that_fit=min(fits, remaining),
                budget=self.limit_source,
            )
        else:
            log.info("full run fits the budget", projected_s=round(projected, 1), limit_s=round(self.limit_s, 1))
        return self.projection

    def should_stop(self, phase: str, epoch: int, epochs: int, epoch_s: float) -> bool:
        """At an epoch boundary of full training: stop when the next epoch would not fit."""
        if phase != "full" or self.limit_s is None or epoch >= epochs or self.stop_reason:
            return bool(self.stop_reason)
        used = self.used_s()
        if used + epoch_s <= self.limit_s:
            return False
        attempts = len(self.prior) + 1
        self.stop_reason = (
            f"Stopped by its budget after epoch {epoch} of {epochs}: {duration(used)} used across {attempts} "
            f"attempt{'s' if attempts > 1 else ''} of {self.limit_source} ({duration(self.limit_s)}), and another "
            f"epoch takes ~{duration(epoch_s)}; best-so-far weights published as partial."
        )
        log.warning("budget reached: stopping at this epoch boundary", epoch=epoch, epochs=epochs, used_s=round(used))
        return True

    def refuse_if_spent(self, phase: str, start_epoch: int, epochs: int) -> None:
        """Before a resumed full training: with the budget spent by earlier attempts, train no further."""
        if phase != "full" or self.limit_s is None or start_epoch <= 0 or start_epoch >= epochs:
            return
        used = self.used_s()
        if used < self.limit_s:
            return
        attempts = len(self.prior) + 1
        self.stop_reason = (
            f"Stopped by its budget after epoch {start_epoch} of {epochs}: the earlier attempts already used "
            f"{duration(used)} of {self.limit_source} ({duration(self.limit_s)}) across {attempts} attempts; "
            "best-so-far weights from the last checkpoint published as partial."
        )
        log.warning("budget already spent by earlier attempts: not training further", epoch=start_epoch)
        raise BudgetSpent(self.stop_reason)

    def final_status(self) -> str:
        return "partial" if self.stop_reason else "succeeded"

    # --- the accounting -------------------------------------------------------------------
    def _cost_of(self, seconds: float) -> float | None:
        rate = self.settings.hourly_cost
        return None if rate is None else round(seconds / 3600 * rate, 4)

    def entry(self, outcome: str) -> dict[str, Any]:
        with self._lock:
            lost = time.monotonic() - self.last_epoch_end if self.last_epoch_end and outcome in PREEMPTED else 0.0
            return {
                "id": self.id,
                "attempt": len(self.prior) + 1,
                "scheduler_attempt": self.scheduler_attempt,
                "started_at": self.started_at,
                "updated_at": _now(),
                "wall_s": round(self.elapsed(), 2),
                "phases_s": {k: v for k, v in self.timings.items() if not k.startswith("startup")},
                "epochs": dict(self.epochs),
                "resumed_from": dict(self.resumed_from),
                "outcome": outcome,
                "seconds_since_last_epoch": round(lost, 1),
                "instance": self.instance.as_dict(),
                "gpus": gpu_count(self.device),
                "hourly_cost": self.settings.hourly_cost,
            }

    def flush(self, outcome: str = "running") -> None:
        """Write this attempt's entry; best effort (the budget then errs on the generous side)."""
        mine = self.entry(outcome)

        def decide(current: dict[str, Any] | None) -> dict[str, Any]:
            attempts = [a for a in (current or {}).get("attempts", []) if a.get("id") != self.id]
            return {"attempts": [*attempts, mine]}

        try:
            pointers.update(self.client, self.path, decide, guard=self.guard)
        except JobError as exc:
            log.warning("could not record the accounting", reason=exc.sentence)

    def summary(self, outcome: str) -> dict[str, Any]:
        """Everything the manifest and the report say about time and money, all attempts included."""
        attempts = [*self.prior, self.entry(outcome)]
        preemptions = []
        for before, after in itertools.pairwise(attempts):
            if before.get("outcome") not in PREEMPTED:
                continue
            done: dict[str, int] = before.get("epochs", {})
            restarted = after.get("resumed_from", {})
            lost = {p: max(0, int(n) - int(restarted.get(p, n))) for p, n in done.items()}
            preemptions.append(
                {
                    "attempt": before.get("attempt"),
                    "outcome": before.get("outcome"),
                    "epochs_recomputed": sum(lost.values()),
                    "by_phase": {p: n for p, n in lost.items() if n},
                    "seconds_lost_mid_epoch": before.get("seconds_since_last_epoch", 0.0),
                }
            )
        if outcome in PREEMPTED:  # this attempt: the next one will show what it recomputes
            preemptions.append(
                {
                    "attempt": len(attempts),
                    "outcome": outcome,
                    "epochs_recomputed": None,
                    "by_phase": {},
                    "seconds_lost_mid_epoch": attempts[-1]["seconds_since_last_epoch"],
                }
            )
        wall = sum(float(a.get("wall_s", 0)) for a in attempts)
        gpu_hours = sum(float(a.get("wall_s", 0)) * int(a.get("gpus", 0)) for a in attempts) / 3600
        priced = [(float(a.get("wall_s", 0)), a.get("hourly_cost")) for a in attempts]
        cost: float | None = None
        if all(rate is not None for _, rate in priced):  # an unpriced attempt makes the total unknown
            cost = round(sum(seconds / 3600 * float(rate or 0) for seconds, rate in priced), 4)
        shares = {p: round(sum(v) / len(v), 3) for p, v in self.data_share.items() if v}
        out: dict[str, Any] = {
            "attempts": attempts,
            "wall_s": round(wall, 1),
            "gpu_hours": round(gpu_hours, 4),
            "preemptions": len(preemptions),
            "preemption_details": preemptions,
            "epochs_recomputed": sum(int(p["epochs_recomputed"] or 0) for p in preemptions),
            "instance": self.instance.as_dict(),
            "hourly_cost": self.settings.hourly_cost,
            "estimated_cost_usd": cost,
            "dataloader_share": shares,
            "input_bottleneck": any(v > BOTTLENECK_SHARE for v in shares.values()),
            "budget": {
                "limit_s": None if self.limit_s is None else round(self.limit_s, 1),
                "set_by": self.limit_source or None,
                "used_s": round(wall, 1),
                "projection": self.projection,
                "stopped": self.stop_reason,
            },
        }
        out["summary"] = summary_line(self.epochs_done("full"), out)
        return out


def summary_line(epochs: int, acc: dict[str, Any]) -> str:
    """`60 epochs in 48 min on g6.2xlarge (spot), 1 preemption, 2 epochs recomputed, ≈ US$0.42`."""
    inst = acc["instance"]
    where = Instance(**inst).label() if inst else "unknown instance"
    n = acc["preemptions"]
    parts = [
        f"{epochs} epoch{'s' if epochs != 1 else ''} in {duration(acc['wall_s'])} on {where}",
        f"{n} preemption{'s' if n != 1 else ''}",
    ]
    if n:
        r = acc["epochs_recomputed"]
        parts.append(f"{r} epoch{'s' if r != 1 else ''} recomputed")
    if acc["estimated_cost_usd"] is not None:
        parts.append(f"≈ US${acc['estimated_cost_usd']:.2f}")
    return ", ".join(parts)


def report_lines(acc: dict[str, Any]) -> list[str]:
    """The report's cost-and-time section."""
    if not acc:
        return []
    budget = acc["budget"]
    out = ["## Cost and time", "", f"**{acc['summary']}**", ""]
    if budget.get("stopped"):
        out += [f"> **Budget:** {budget['stopped']}", ""]
    projection = budget.get("projection") or {}
    if projection.get("warning"):
        out += [f"> **Projection after the sanity epochs:** {projection['warning']}", ""]
    out += [
        f"- **Instance**: {Instance(**acc['instance']).label()} (from {acc['instance']['source']}; "
        f"launch type {acc['instance']['launch_type']})",
        f"- **Wall-clock, all attempts**: {acc['wall_s']:.1f} s; **GPU-hours**: {acc['gpu_hours']:.4f}",
        "- **Estimated cost**: "
        + (
            f"US${acc['estimated_cost_usd']:.4f} at US${acc['hourly_cost']:.2f}/h"
            if acc["estimated_cost_usd"] is not None
            else "unknown (set POGONA_HOURLY_COST)"
        ),
        "- **Budget**: "
        + (
            f"{budget['set_by']} = {budget['limit_s']:.0f} s; used {budget['used_s']:.0f} s"
            if budget.get("limit_s") is not None
            else "none set"
        ),
        "",
        "| Attempt | Started | Outcome | Wall-clock s | Instance | Epochs reached | Resumed from | Phases (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in acc["attempts"]:
        epochs = ", ".join(f"{p}: {n}" for p, n in a.get("epochs", {}).items()) or "-"
        resumed = ", ".join(f"{p}: {n}" for p, n in a.get("resumed_from", {}).items()) or "-"
        phases = ", ".join(f"{p} {s:.0f}" for p, s in a.get("phases_s", {}).items()) or "-"
        out.append(
            f"| {a.get('attempt')} | {a.get('started_at')} | {a.get('outcome')} | {float(a.get('wall_s', 0)):.1f} | "
            f"{Instance(**a['instance']).label() if a.get('instance') else '-'} | {epochs} | {resumed} | {phases} |"
        )
    out.append("")
    if acc["preemption_details"]:
        out += ["| Preempted attempt | Epochs recomputed after it | Seconds lost mid-epoch |", "|---|---|---|"]
        for p in acc["preemption_details"]:
            recomputed = "-" if p["epochs_recomputed"] is None else str(p["epochs_recomputed"])
            out.append(f"| {p['attempt']} ({p['outcome']}) | {recomputed} | {p['seconds_lost_mid_epoch']:.1f} |")
        out.append("")
    for phase, share in acc["dataloader_share"].items():
        if share > BOTTLENECK_SHARE:
            out += [
                f"> **Input-pipeline bottleneck ({phase})**: waiting for the next batch took {share:.0%} of step "
                "time (over 10%). Raise POGONA_WORKERS (ultralytics uses none on the CPU), let the images be "
                "cached (RAM or disk), and give the container shared memory (`--shm-size=8g` or `--ipc=host`; "
                "AWS Batch: `linuxParameters.sharedMemorySize`).",
                "",
            ]
        else:
            out.append(f"- Dataloader share of step time ({phase}): {share:.0%} (no input-pipeline bottleneck)")
    out.append("")
    return out
