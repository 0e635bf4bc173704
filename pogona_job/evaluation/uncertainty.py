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


_AP_X = np.linspace(0, 1, 101)  # ultralytics' 101-point (COCO) interpolation
_EPS = 1e-16


def weighted_maps(per: PerImage, weights: npt.NDArray[np.float64], chunk: int = 50) -> npt.NDArray[np.float64]:
    """mAP@0.5 and mAP@0.5-0.95 (columns) for each row of image weights (how often a resample drew each image).

    The arithmetic of ultralytics' ap_per_class and compute_ap, with each prediction counted as often as
    its image was drawn: one sort for all resamples instead of one per resample. With every weight 1 it is
    `score()` exactly; a resample differs from scoring its concatenated images only in the order of
    exactly tied confidences (an image drawn twice)."""
    n_pred = [len(c) for c in per.conf]
    conf = np.concatenate(per.conf) if per.conf else np.zeros(0)
    order = np.argsort(-conf)  # as ap_per_class sorts the concatenated predictions
    tp = (np.concatenate(per.tp) if per.tp else np.zeros((0, 10), bool))[order].astype(float)
    img = np.repeat(np.arange(len(per)), n_pred)[order]
    pred_cls = (np.concatenate(per.pred_cls) if per.pred_cls else np.zeros(0))[order]
    targets = np.concatenate(per.target_cls) if per.target_cls else np.zeros(0)
    classes = np.unique(targets)
    labels = np.array([[(t == c).sum() for c in classes] for t in per.target_cls], float).reshape(len(per), -1)
    out = np.zeros((len(weights), 2))
    for start in range(0, len(weights), chunk):
        w = np.asarray(weights[start : start + chunk], float)
        rows = len(w)
        n_l = w @ labels  # (resamples, classes): labels drawn per class
        ap = np.zeros((rows, len(classes), tp.shape[1]))
        for ci, c in enumerate(classes):
            sel = np.flatnonzero(pred_cls == c)
            if not len(sel):
                continue
            wp = w[:, img[sel]]  # (resamples, predictions of this class, by falling confidence)
            drawn = np.flatnonzero(wp.sum(1) > 0)
            total = np.cumsum(wp, axis=1)
            for j in range(tp.shape[1]):
                hits = np.flatnonzero(tp[sel, j])
                if not len(hits):
                    continue  # no true positive at this IoU: AP 0, as ultralytics computes it
                # Predictions after the last true positive only lower the precision at the final recall,
                # below the envelope: leaving them out changes no AP and saves most of the work.
                end = hits[-1] + 1
                tpc = np.cumsum(wp[:, :end] * tp[sel[:end], j], axis=1)
                mrec = np.empty((rows, end + 3))
                mpre = np.empty((rows, end + 3))
                mrec[:, 0], mpre[:, 0] = 0.0, 1.0
                mrec[:, 1 : end + 1] = tpc / (n_l[:, ci : ci + 1] + _EPS)
                with np.errstate(invalid="ignore", divide="ignore"):
                    mpre[:, 1 : end + 1] = tpc / total[:, :end]
                mpre[:, 1 : end + 1][total[:, :end] == 0] = 1.0  # not yet drawn: recall 0, a no-op point
                mrec[:, end + 1], mrec[:, end + 2] = mrec[:, end], 1.0
                mpre[:, end + 1 :] = 0.0
                mpre = np.flip(np.maximum.accumulate(np.flip(mpre, 1), axis=1), 1)
                for r in drawn:
                    ap[r, ci, j] = np.trapezoid(np.interp(_AP_X, mrec[r], mpre[r]), _AP_X)
        present = n_l > 0  # ultralytics averages over the classes that have labels
        count = np.maximum(present.sum(1), 1)
        out[start : start + rows, 0] = (ap[:, :, 0] * present).sum(1) / count
        out[start : start + rows, 1] = (ap.mean(2) * present).sum(1) / count
    return out


def _weights(n: int, count: int, seed: int) -> npt.NDArray[np.float64]:
    draws = resamples(n, count, seed)
    return np.stack([np.bincount(row, minlength=n) for row in draws]).astype(float)


def bootstrap(
    per: PerImage, keys: Sequence[str] = ("map50", "map50_95"), count: int = RESAMPLES, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap 95% interval of mAP@0.5 and mAP@0.5-0.95 over images."""
    if len(per) == 0 or count == 0:
        return {}
    maps = weighted_maps(per, _weights(len(per), count, seed))
    columns = {"map50": 0, "map50_95": 1}
    return {k: interval(maps[:, columns[k]]) for k in keys}


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
    w = _weights(len(challenger), count, seed)  # the same draws for both models
    diff = weighted_maps(challenger, w) - weighted_maps(champion, w)
    columns = {"map50": 0, "map50_95": 1}
    out: dict[str, dict[str, float]] = {}
    for k in keys:
        lo, hi = interval(diff[:, columns[k]])
        out[k] = {"challenger": a[k], "champion": b[k], "delta": a[k] - b[k], "low": lo, "high": hi}
    return out


def with_interval(value: float, bounds: tuple[float, float] | list[float] | None) -> str:
    """'0.865 (0.82-0.90)', as the report prints a value with its interval."""
    if not bounds:
        return f"{value:.3f}"
    return f"{value:.3f} ({bounds[0]:.2f}-{bounds[1]:.2f})"
