"""Metrics from per-image matching results, and bootstrap 95% intervals over images.

A validation pass gives, per image, ultralytics' own matching of predictions to labels (a true-positive
row per prediction at IoU 0.50:0.95, its confidence and class, and the labels' classes). Any subset or
resample of images is then scored with ultralytics' `ap_per_class`, exactly as `YOLO.val()` scores the
whole set, without running the model again. So 1,000 bootstrap resamples cost seconds, not 1,000
validations.

Resampling unit: the GROUPS the split used (groups.csv, Roboflow siblings, frame sequences, recording
folders: dataset/split.py), whenever a group holds more than one image. Consecutive frames are not
independent; resampling them one by one makes the interval too narrow. Each resample draws whole groups
with replacement, every image of a drawn group counted as often as its group was drawn.

Interval: BCa (bias-corrected and accelerated, Efron 1987) by default. AP is bounded in [0, 1], skewed
near its bounds, and biased on small sets (a resample with duplicated images is not distributed around
the full set's AP): the plain percentile interval then sits beside the point estimate (a real export
printed 0.167 (0.16-0.21)). BCa shifts the percentiles by the bootstrap's median bias (z0) and by the
skewness of the jackknife-over-groups (a), so it stays transformation-respecting and within [0, 1].
The point estimate is finally kept inside its interval (a stated guarantee of the report: with very few
groups z0 is itself noisy). `method="percentile"` keeps the plain percentile interval (tests, benchmarks).
The paired version draws the same groups for two models evaluated on the same set, so the interval is on
their difference (the image-to-image noise they share cancels out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

RESAMPLES = 1000
LEVEL = 0.95
KEYS = ("precision", "recall", "map50", "map50_95")
JACKKNIFE_MAX_GROUPS = (
    1500  # above: the acceleration is left at 0 (bias-corrected only); its cost is one score per group
)
Method = Literal["bca", "percentile"]

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


def group_index(files: Sequence[str], groups: dict[str, str] | None) -> IntArray:
    """Each image's group number (images without a group are their own group)."""
    keys: dict[str, int] = {}
    return np.array([keys.setdefault((groups or {}).get(f, f"img:{f}"), len(keys)) for f in files], np.int64)


def n_groups(files: Sequence[str], groups: dict[str, str] | None) -> int:
    return int(group_index(files, groups).max()) + 1 if len(files) else 0


def _weights(n: int, count: int, seed: int, groups: IntArray | None = None) -> npt.NDArray[np.float64]:
    """(count, n) image weights: how often each image is in each resample. With `groups`, whole groups are
    drawn (as many draws as there are groups) and every image weighs what its group drew."""
    if groups is None:
        groups = np.arange(n, dtype=np.int64)
    g = int(groups.max()) + 1 if n else 0
    draws = resamples(g, count, seed)
    per_group = np.stack([np.bincount(row, minlength=g) for row in draws]).astype(float)
    return per_group[:, groups]


def _jackknife(per: PerImage, groups: IntArray) -> npt.NDArray[np.float64] | None:
    """(groups, 2) mAPs with one group left out at a time; None when there are too many groups to afford it."""
    g = int(groups.max()) + 1
    if g < 3 or g > JACKKNIFE_MAX_GROUPS:
        return None
    w = np.ones((g, len(per)))
    w[groups, np.arange(len(per))] = 0.0  # row k leaves out group k
    return weighted_maps(per, w)


def _bounds(
    values: npt.NDArray[np.float64],
    point: float,
    jack: npt.NDArray[np.float64] | None,
    method: Method,
    level: float = LEVEL,
) -> tuple[float, float]:
    """The interval of one statistic from its bootstrap values; BCa unless `method="percentile"`."""
    if method == "percentile":
        return interval(values, level)
    values = np.asarray(values, float)
    if np.ptp(values) < 1e-12:  # every resample scored the same: nothing varies at this sample size
        return point, point
    norm = NormalDist()
    # Median bias: share of resamples below the point (ties count half), clipped away from 0 and 1.
    below = float(np.sum(values < point) + 0.5 * np.sum(np.isclose(values, point, atol=1e-12)))
    share = float(np.clip(below / len(values), 1 / len(values), 1 - 1 / len(values)))
    z0 = norm.inv_cdf(share)
    a = 0.0
    if jack is not None:
        d = jack.mean() - jack
        denom = 6.0 * float(np.sum(d**2)) ** 1.5
        a = float(np.sum(d**3)) / denom if denom > 0 else 0.0
    qs = []
    for alpha in ((1 - level) / 2, 1 - (1 - level) / 2):
        z = z0 + norm.inv_cdf(alpha)
        qs.append(norm.cdf(z0 + z / (1 - a * z)) * 100)
    lo, hi = (float(v) for v in np.percentile(values, qs))
    # The report promises the point estimate inside its interval; with very few groups z0 itself is noisy.
    return min(lo, point), max(hi, point)


_COLUMNS = {"map50": 0, "map50_95": 1}


def bootstrap(
    per: PerImage,
    keys: Sequence[str] = ("map50", "map50_95"),
    count: int = RESAMPLES,
    seed: int = 0,
    *,
    groups: dict[str, str] | None = None,
    method: Method = "bca",
) -> dict[str, tuple[float, float]]:
    """95% interval of mAP@0.5 and mAP@0.5-0.95, resampling `groups` ({file: group}) or single images."""
    if len(per) == 0 or count == 0:
        return {}
    gi = group_index(per.files, groups)
    maps = weighted_maps(per, _weights(len(per), count, seed, gi))
    point = weighted_maps(per, np.ones((1, len(per))))[0]
    jack = _jackknife(per, gi) if method == "bca" else None
    return {
        k: _bounds(
            maps[:, _COLUMNS[k]], float(point[_COLUMNS[k]]), None if jack is None else jack[:, _COLUMNS[k]], method
        )
        for k in keys
    }


def paired_deltas(
    challenger: PerImage,
    champion: PerImage,
    keys: Sequence[str] = ("map50", "map50_95"),
    count: int = RESAMPLES,
    seed: int = 0,
    *,
    groups: dict[str, str] | None = None,
    method: Method = "bca",
) -> dict[str, dict[str, float]]:
    """challenger - champion on the same images: the point delta and its paired-bootstrap 95% interval
    (the same groups drawn for both models)."""
    champion = champion.aligned(challenger.files)
    if len(challenger) == 0:
        return {}
    a, b = score(challenger), score(champion)
    gi = group_index(challenger.files, groups)
    w = _weights(len(challenger), count, seed, gi)  # the same draws for both models
    diff = weighted_maps(challenger, w) - weighted_maps(champion, w)
    jack = None
    if method == "bca":
        ja, jb = _jackknife(challenger, gi), _jackknife(champion, gi)
        jack = None if ja is None or jb is None else ja - jb
    out: dict[str, dict[str, float]] = {}
    for k in keys:
        c = _COLUMNS[k]
        delta = a[k] - b[k]
        lo, hi = _bounds(diff[:, c], delta, None if jack is None else jack[:, c], method)
        out[k] = {"challenger": a[k], "champion": b[k], "delta": delta, "low": lo, "high": hi}
    return out


def counts_at(per: PerImage, conf: float) -> dict[str, dict[str, int]]:
    """{class name: tp, fp, fn} at IoU 0.50 counting only predictions with confidence >= `conf`.

    The matching is ultralytics' own (the validation pass's true-positive rows: a prediction matches a
    label of the same class), so a wrong-class detection counts as a false alarm of the predicted class
    and a miss of the true one."""
    out: dict[str, dict[str, int]] = {}
    classes = sorted({int(c) for t in per.target_cls for c in t} | {int(c) for p in per.pred_cls for c in p})
    for c in classes:
        tp = fp = n = 0
        for i in range(len(per)):
            keep = (per.conf[i] >= conf) & (per.pred_cls[i] == c)
            hits = int(per.tp[i][keep, 0].sum()) if keep.any() else 0
            tp += hits
            fp += int(keep.sum()) - hits
            n += int((per.target_cls[i] == c).sum())
        out[per.names.get(c, str(c))] = {"tp": tp, "fp": fp, "fn": n - tp}
    return out


def at_conf(per: PerImage, conf: float) -> dict[str, Any]:
    """Precision and recall at the deployment confidence, from the same counts as the confusion matrix:
    all classes pooled (micro average), so the matrix and the numbers printed beside it agree exactly."""
    per_class = counts_at(per, conf)
    tp = sum(c["tp"] for c in per_class.values())
    fp = sum(c["fp"] for c in per_class.values())
    fn = sum(c["fn"] for c in per_class.values())
    return {
        "conf": conf,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "per_class": per_class,
    }


def with_interval(value: float, bounds: tuple[float, float] | list[float] | None) -> str:
    """'0.865 (0.82-0.90)', as the report prints a value with its interval."""
    if not bounds:
        return f"{value:.3f}"
    return f"{value:.3f} ({bounds[0]:.2f}-{bounds[1]:.2f})"
