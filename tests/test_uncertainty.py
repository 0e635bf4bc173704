"""Bootstrap intervals from per-image matching results, checked against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pogona_job.evaluation import uncertainty
from pogona_job.evaluation.uncertainty import PerImage


def _synthetic(n: int, seed: int, skill: float = 0.6) -> PerImage:
    """n images with 1-2 labels each; each prediction is right at a share of IoU thresholds."""
    rng = np.random.default_rng(seed)
    files, tp, conf, pred_cls, target_cls = [], [], [], [], []
    for i in range(n):
        targets = int(rng.integers(1, 3))
        preds = int(rng.integers(1, 4))
        good = rng.random(preds) < skill
        depth = rng.integers(1, 11, size=preds)  # correct at the first `depth` thresholds
        tp.append(np.array([[bool(g) and t < d for t in range(10)] for g, d in zip(good, depth, strict=True)]))
        conf.append(np.where(good, rng.uniform(0.4, 1, preds), rng.uniform(0, 0.7, preds)))
        pred_cls.append(np.zeros(preds))
        target_cls.append(np.zeros(targets))
        files.append(f"/data/img{i:03d}.jpg")
    return PerImage(files, tp, conf, pred_cls, target_cls, {0: "head"})


def _exact_quantiles(per: PerImage, metric: str, qs: list[float]) -> list[float]:
    """Every one of the n^n equally likely resamples scored: the exact bootstrap distribution."""
    n = len(per)
    values = [uncertainty.score(per, list(idx))[metric] for idx in itertools.product(range(n), repeat=n)]
    return [float(v) for v in np.percentile(values, qs)]


@pytest.mark.parametrize("metric", ["map50", "map50_95"])
def test_the_bootstrap_interval_matches_the_exact_distribution_of_all_resamples(metric: str) -> None:
    per = _synthetic(5, seed=3)  # 5^5 = 3,125 resamples: small enough to enumerate
    lo, hi = uncertainty.bootstrap(per, count=1000, seed=11)[metric]
    # 1,000 draws estimate the 2.5th/97.5th percentiles to about +-1 percentile point (two standard errors).
    q_lo, q_lo2, q_hi, q_hi2 = _exact_quantiles(per, metric, [1.5, 3.5, 96.5, 98.5])
    assert q_lo <= lo <= q_lo2
    assert q_hi <= hi <= q_hi2
    point = uncertainty.score(per)[metric]
    assert lo <= point <= hi


def test_the_paired_interval_matches_the_exact_distribution_of_differences() -> None:
    a, b = _synthetic(5, seed=3, skill=0.8), _synthetic(5, seed=4, skill=0.4)
    b.files = list(a.files)  # the same images, two models
    d = uncertainty.paired_deltas(a, b, keys=("map50",), count=1000, seed=5)["map50"]
    n = len(a)
    exact = [
        uncertainty.score(a, list(idx))["map50"] - uncertainty.score(b, list(idx))["map50"]
        for idx in itertools.product(range(n), repeat=n)
    ]
    q_lo, q_lo2, q_hi, q_hi2 = np.percentile(exact, [1.5, 3.5, 96.5, 98.5])
    assert q_lo <= d["low"] <= q_lo2 and q_hi <= d["high"] <= q_hi2
    assert d["delta"] == pytest.approx(uncertainty.score(a)["map50"] - uncertainty.score(b)["map50"])


def test_the_same_model_on_the_same_images_differs_by_exactly_zero() -> None:
    a = _synthetic(30, seed=1)
    d = uncertainty.paired_deltas(a, a, count=200)
    assert all(x["delta"] == x["low"] == x["high"] == 0.0 for x in d.values())


def test_paired_comparison_aligns_images_by_file_not_by_position() -> None:
    a = _synthetic(8, seed=2)
    shuffled = a.subset([7, 6, 5, 4, 3, 2, 1, 0])
    d = uncertainty.paired_deltas(a, shuffled, count=100)
    assert all(x["low"] == x["high"] == 0.0 for x in d.values())


def test_score_of_a_subset_equals_scoring_that_subset_alone() -> None:
    a = _synthetic(12, seed=6)
    keep = [0, 3, 4, 9]
    assert uncertainty.score(a, keep) == uncertainty.score(a.subset(keep))


def test_more_images_give_a_narrower_interval() -> None:
    small, large = _synthetic(10, seed=8), _synthetic(200, seed=8)
    width = {k: v[1] - v[0] for k, v in uncertainty.bootstrap(small).items()}
    assert all(large_w < width[k] for k, large_w in ((k, v[1] - v[0]) for k, v in uncertainty.bootstrap(large).items()))


def test_values_print_with_their_interval() -> None:
    assert uncertainty.with_interval(0.8649, (0.8213, 0.9004)) == "0.865 (0.82-0.90)"
    assert uncertainty.with_interval(0.5, None) == "0.500"


def test_weighted_scoring_of_a_resample_equals_scoring_its_concatenated_images() -> None:
    """The fast path (one sort, images weighted by how often they were drawn) against ap_per_class itself."""
    per = _synthetic(25, seed=12)
    draws = uncertainty.resamples(len(per), count=40, seed=2)
    weights = np.stack([np.bincount(row, minlength=len(per)) for row in draws]).astype(float)
    fast = uncertainty.weighted_maps(per, weights)
    for row, idx in zip(fast, draws, strict=True):
        slow = uncertainty.score(per, idx)
        assert row[0] == pytest.approx(slow["map50"], abs=1e-12)
        assert row[1] == pytest.approx(slow["map50_95"], abs=1e-12)


def test_two_classes_average_over_the_classes_a_resample_has_labels_for() -> None:
    per = _synthetic(12, seed=13)
    per.target_cls[0] = np.array([1.0])  # the only label of class 1, and one prediction of it
    per.pred_cls[0] = np.array([1.0] * len(per.pred_cls[0]))
    per.names = {0: "head", 1: "tail"}
    draws = uncertainty.resamples(len(per), count=60, seed=1)
    weights = np.stack([np.bincount(row, minlength=len(per)) for row in draws]).astype(float)
    for row, idx in zip(uncertainty.weighted_maps(per, weights), draws, strict=True):
        assert row[0] == pytest.approx(uncertainty.score(per, idx)["map50"], abs=1e-12)


def _sequences(n_groups: int, frames: int, seed: int) -> tuple[PerImage, dict[str, str]]:
    """Frames of one scene repeat the scene's outcome: as consecutive video frames do."""
    base = _synthetic(n_groups, seed=seed)
    idx = [g for g in range(n_groups) for _ in range(frames)]
    per = base.subset(idx)
    per.files = [f"/data/seq{g:03d}_{k}.jpg" for g in range(n_groups) for k in range(frames)]
    return per, {f: f.split("_")[0] for f in per.files}


def test_resampling_whole_sequences_widens_the_interval_that_single_frames_make_too_narrow() -> None:
    per, groups = _sequences(12, 5, seed=2)
    by_image = uncertainty.bootstrap(per, count=400, seed=1, method="percentile")["map50"]
    by_group = uncertainty.bootstrap(per, count=400, seed=1, groups=groups)["map50"]
    assert by_group[1] - by_group[0] > 1.5 * (by_image[1] - by_image[0])
    assert uncertainty.n_groups(per.files, groups) == 12


def test_the_bca_interval_holds_its_point_estimate_even_when_resamples_sit_on_one_side() -> None:
    for seed in range(6):
        per = _synthetic(8, seed=seed, skill=0.9)
        point = uncertainty.score(per)
        for key, (lo, hi) in uncertainty.bootstrap(per, count=300, seed=seed).items():
            assert 0.0 <= lo <= point[key] <= hi <= 1.0


def test_precision_and_recall_at_a_confidence_are_the_confusion_counts() -> None:
    per = _synthetic(30, seed=9)
    at = uncertainty.at_conf(per, 0.5)
    kept = sum(int((c >= 0.5).sum()) for c in per.conf)
    hits = sum(int(t[c >= 0.5, 0].sum()) for t, c in zip(per.tp, per.conf, strict=True))
    labels = sum(len(t) for t in per.target_cls)
    assert (at["tp"], at["fp"], at["fn"]) == (hits, kept - hits, labels - hits)
    assert at["precision"] == hits / kept and at["recall"] == hits / labels
    from pogona_job.evaluation.plots import matrix

    names, m = matrix(at)
    assert names == ["head", "background"] and m.tolist() == [[hits, kept - hits], [labels - hits, 0]]
