"""Metrics from per-image matching results, and bootstrap 95% intervals over images.

A validation pass gives, per image, ultralytics' own matching of predictions to labels (a true-positive
row per prediction at IoU 0.50:0.95, its confidence and class, and the labels' classes). Any subset or
resample of images is then scored with ultralytics' `ap_per_class`, exactly as `YOLO.val()` scores the
whole set, without running the model again. So 1,000 bootstrap resamples cost seconds, not 1,000
validations.

Percentile bootstrap: resample the images with replacement, score each resample, and take the 2.5th
and 97.5th percentiles. The paired version draws the same images for two models evaluated on the same
set, so the interval is on their difference (the image-to-image noise they share cancels out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

RESAMPLES = 1000
LEVEL = 0.95
KEYS = ("precision", "recall", "map50", "map50_95")

IntArray = npt.NDArray[np.int64]


@dataclass
class PerImage:
    """One validation pass, image by image (order: sorted by file)."""

    files: list[str]
    tp: list[npt.NDArray[np.bool_]]  # (predictions, 10 IoU thresholds)
    conf: list[npt.NDArray[np.float64]]
    pred_cls: list[npt.NDArray[np.float64]]
    target_cls: list[npt.NDArray[np.float64]]
    names: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, keep: Sequence[int]) -> PerImage:
        return PerImage(
            [self.files[i] for i in keep],
            [self.tp[i] for i in keep],
            [self.conf[i] for i in keep],
            [self.pred_cls[i] for i in keep],
            [self.target_cls[i] for i in keep],
            self.names,
        )

    def aligned(self, files: list[str]) -> PerImage:
        """The same images in the order of `files` (for paired comparisons); KeyError if one is missing."""
        where = {f: i for i, f in enumerate(self.files)}
        return self.subset([where[f] for f in files])


def _ap(per: PerImage, idx: Sequence[int] | IntArray) -> tuple[Any, ...]:
    from ultralytics.utils.metrics import ap_per_class

    idx = list(idx)
    tp = np.concatenate([per.tp[i] for i in idx]) if idx else np.zeros((0, 10), bool)
    conf = np.concatenate([per.conf[i] for i in idx]) if idx else np.zeros(0)
    pred_cls = np.concatenate([per.pred_cls[i] for i in idx]) if idx else np.zeros(0)
    target_cls = np.concatenate([per.target_cls[i] for i in idx]) if idx else np.zeros(0)
    return tuple(ap_per_class(tp, conf, pred_cls, target_cls)[2:])  # p, r, f1, ap, classes, ...


def score(per: PerImage, idx: Sequence[int] | IntArray | None = None) -> dict[str, float]:
    """precision, recall, mAP@0.5, mAP@0.5-0.95 of these images, computed as `YOLO.val()` computes them."""
    idx = range(len(per)) if idx is None else idx
    p, r, _f1, ap, _classes, *_ = _ap(per, idx)
    if not len(ap):
        return dict.fromkeys(KEYS, 0.0)
    return {
        "precision": float(p.mean()),
        "recall": float(r.mean()),
        "map50": float(ap[:, 0].mean()),
        "map50_95": float(ap.mean()),
    }


def per_class(per: PerImage) -> dict[str, dict[str, float]]:
    """{class name: precision, recall, map50, map50_95, images, instances} for classes with labels."""
    p, r, _f1, ap, classes, *_ = _ap(per, range(len(per)))
    out: dict[str, dict[str, float]] = {}
    for i, c in enumerate(classes):
        c = int(c)
        out[per.names.get(c, str(c))] = {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "map50": float(ap[i, 0]),
            "map50_95": float(ap[i].mean()),
            "images": float(sum(1 for t in per.target_cls if (t == c).any())),
            "instances": float(sum(int((t == c).sum()) for t in per.target_cls)),
        }
    return out


def resamples(n: int, count: int = RESAMPLES, seed: int = 0) -> IntArray:
    """`count` bootstrap resamples of `n` image indices (with replacement), reproducible by seed."""
    return np.random.default_rng(seed).integers(0, n, size=(count, n))


def interval(values: npt.ArrayLike, level: float = LEVEL) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(np.asarray(values, dtype=float), [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap(
    per: PerImage, keys: Sequence[str] = ("map50", "map50_95"), count: int = RESAMPLES, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap 95% interval of each metric over images."""
    if len(per) == 0 or count == 0:
        return {}
    draws = [score(per, idx) for idx in resamples(len(per), count, seed)]
    return {k: interval([d[k] for d in draws]) for k in keys}


def paired_deltas(
    challenger: PerImage,
    champion: PerImage,
    keys: Sequence[str] = ("map50", "map50_95"),
    count: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """challenger - champion on the same images: the point delta and its paired-bootstrap 95% interval."""
    champion = champion.aligned(challenger.files)
    if len(challenger) == 0:
        return {}
    a, b = score(challenger), score(champion)
    draws = [(score(challenger, idx), score(champion, idx)) for idx in resamples(len(challenger), count, seed)]
    out: dict[str, dict[str, float]] = {}
    for k in keys:
        lo, hi = interval([x[k] - y[k] for x, y in draws])
        out[k] = {"challenger": a[k], "champion": b[k], "delta": a[k] - b[k], "low": lo, "high": hi}
    return out


def with_interval(value: float, bounds: tuple[float, float] | list[float] | None) -> str:
    """'0.865 (0.82-0.90)', as the report prints a value with its interval."""
    if not bounds:
        return f"{value:.3f}"
    return f"{value:.3f} ({bounds[0]:.2f}-{bounds[1]:.2f})"
