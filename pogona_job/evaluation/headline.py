"""The headline: how good the SHIPPED model is, in one typed object every surface reads.

The job ships `weights/best.pt`, so every place that says how good "the model" is (report.md's first
screen, its analysis and recommendations, the manifest's top-level `metrics`, `runs`, `runs show`,
notifications, the `make run-local` summary, report.html) quotes best.pt's own evaluation on val, with
its 95% interval and the epoch it came from - never results.csv's last row, which is a different model
whenever the best epoch was not the last, and which ultralytics validated with its own batch size.

best.pt's epoch: ultralytics strips the epoch from best.pt (`epoch: -1`), so it is read from results.csv:
the trainer saves best.pt whenever an epoch's fitness is >= the best so far (ties: the later epoch), and
in ultralytics 8.4 fitness is mAP@0.5-0.95 alone (`Metric.fitness`, weights [P, R, mAP50, mAP50-95] =
[0, 0, 0, 1]; older releases used 0.1 * mAP50 + 0.9 * mAP50-95). FITNESS_WEIGHTS keeps that in one place.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pogona_job.training.columns import METRICS

FITNESS_WEIGHTS = {"precision": 0.0, "recall": 0.0, "map50": 0.0, "map50_95": 1.0}
FITNESS_LABEL = "mAP@0.5-0.95"  # what picks best.pt (FITNESS_WEIGHTS)
SOURCE = "best.pt evaluated by the job on val"


def fitness(row: dict[str, float]) -> float:
    """Ultralytics' fitness of one results.csv row (what picks best.pt)."""
    return sum(w * float(row.get(METRICS[k], 0.0)) for k, w in FITNESS_WEIGHTS.items())


def best_epoch(rows: list[dict[str, float]]) -> int | None:
    """The epoch best.pt was saved at: the last epoch with the highest fitness (the trainer's `>=`)."""
    if not rows:
        return None
    top = max(fitness(r) for r in rows)
    return int([r for r in rows if fitness(r) >= top - 1e-12][-1]["epoch"])


def _row_numbers(row: dict[str, float]) -> dict[str, float]:
    return {"epoch": float(row["epoch"])} | {k: float(row.get(col, 0.0)) for k, col in METRICS.items()}


@dataclass(frozen=True)
class Headline:
    """best.pt's figures on val. P/R are counted at the deployment confidence `conf` (the confusion matrix's
    counts); mAPs are threshold-free. `training_val` is ultralytics' own validation of the same epoch during
    training, `last_epoch` results.csv's last row: both only ever shown labelled as such."""

    map50: float
    map50_95: float
    map50_ci: tuple[float, float] | None
    map50_95_ci: tuple[float, float] | None
    precision: float
    recall: float
    conf: float
    epoch: int | None  # the epoch best.pt came from (None: unknown, e.g. no results.csv row)
    epochs: int  # epochs trained in the phase that produced best.pt
    images: int
    groups: int
    interval_unit: str = "images"  # what the bootstrap resampled: "groups" or "images"
    interval_method: str = "BCa bootstrap"
    split: str = "val"
    source: str = SOURCE
    fitness: str = FITNESS_LABEL
    training_val: dict[str, float] = field(default_factory=dict)
    last_epoch: dict[str, float] = field(default_factory=dict)

    @classmethod
    def build(cls, val: dict[str, Any], rows: list[dict[str, float]], *, conf: float, split: str = "val") -> Headline:
        """From scoring.summarise() of best.pt on val and the phase's results.csv rows."""
        overall, at = val["overall"], val.get("at_conf") or {}
        ci = overall.get("ci") or {}
        epoch = best_epoch(rows)
        by_epoch = {int(r["epoch"]): r for r in rows}
        return cls(
            map50=float(overall["map50"]),
            map50_95=float(overall["map50_95"]),
            map50_ci=_pair(ci.get("map50")),
            map50_95_ci=_pair(ci.get("map50_95")),
            precision=float(at.get("precision", 0.0)),
            recall=float(at.get("recall", 0.0)),
            conf=float(at.get("conf", conf)),
            epoch=epoch,
            epochs=len(rows),
            images=int(val["images"]),
            groups=int(val.get("groups", val["images"])),
            interval_unit=str(val.get("interval_unit", "images")),
            interval_method=str(val.get("interval_method", "BCa bootstrap")),
            split=split,
            training_val=_row_numbers(by_epoch[epoch]) if epoch is not None else {},
            last_epoch=_row_numbers(rows[-1]) if rows else {},
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Headline | None:
        """From the manifest's `metrics` (None for a manifest without a headline: an older or failed run)."""
        if not data or "map50_ci" not in data:
            return None
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}
        values["map50_ci"], values["map50_95_ci"] = _pair(data.get("map50_ci")), _pair(data.get("map50_95_ci"))
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def epoch_text(self) -> str:
        return f"epoch {self.epoch} of {self.epochs}" if self.epoch is not None else "epoch unknown"

    def interval_text(self) -> str:
        unit = f"{self.groups} groups" if self.interval_unit == "groups" else f"{self.images} images"
        return f"{self.split}, {self.images} images, interval over {unit}"

    def metric(self, name: str) -> str:
        """'0.522 (95% CI 0.47-0.57)'."""
        value, ci = (self.map50, self.map50_ci) if name == "map50" else (self.map50_95, self.map50_95_ci)
        return f"{value:.3f}" + (f" (95% CI {ci[0]:.2f}-{ci[1]:.2f})" if ci else "")

    def line(self) -> str:
        """The one sentence every surface prints."""
        return (
            f"mAP@0.5 {self.metric('map50')}, mAP@0.5-0.95 {self.metric('map50_95')}; "
            f"precision {self.precision:.3f}, recall {self.recall:.3f} at confidence {self.conf:g} - "
            f"best.pt ({self.epoch_text()}) on {self.interval_text()}"
        )

    def short(self) -> str:
        """For tables: '0.522 (0.47-0.57) ep 19'."""
        ci = self.map50_ci
        return (
            f"{self.map50:.3f}"
            + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")
            + (f" ep {self.epoch}" if self.epoch is not None else "")
        )

    def which_is_which(self) -> str | None:
        """One line when ultralytics' training-time validation of the same epoch printed other numbers."""
        if not self.training_val:
            return None
        theirs = self.training_val.get("map50", 0.0)
        if abs(theirs - self.map50) < 0.0005:
            return None
        return (
            f"results.csv's epoch {self.epoch} shows mAP@0.5 {theirs:.3f}: that is ultralytics' validation during "
            f"training (its own batch and letterboxing); {self.map50:.3f} is the job's evaluation of the shipped "
            "best.pt on the same val images, the number every headline uses."
        )

    def last_epoch_text(self) -> str | None:
        """The last epoch, labelled as such, when it is not best.pt's."""
        if not self.last_epoch or int(self.last_epoch["epoch"]) == self.epoch:
            return None
        e = self.last_epoch
        return (
            f"Last epoch ({int(e['epoch'])}, not shipped): mAP@0.5 {e['map50']:.3f}, "
            f"mAP@0.5-0.95 {e['map50_95']:.3f} (ultralytics' training-time validation)."
        )


def _pair(value: Any) -> tuple[float, float] | None:
    if not value:
        return None
    return float(value[0]), float(value[1])
