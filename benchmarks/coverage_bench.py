"""Do the evaluation's 95% intervals hold, and does the paired promotion test stay quiet between equals?

Coverage: a large pool of simulated per-image validation results (the PerImage the job records from
ultralytics' matching) whose mAP@0.5 is computed once; val sets of 20, 50 and 200 images are drawn from it,
with independent images and with frame sequences (5 near-identical frames per group, drawn whole, as the
split keeps them), the job's interval is built on each, and we count how often it covers the pool's value.
The old interval (percentile over single images) is run on the same sequence draws for contrast.

A/A: pairs of "models" of the same quality (the same generative process with different seeds, evaluated on
the same images: what two trainings with the same settings and different seeds give), compared with the
job's own promotion.compare() and decide(). Training hundreds of real models does not fit 10 minutes on 2
cores, so the models are simulated per-image results; BENCHMARKS.md says so.

    python benchmarks/coverage_bench.py [--write] [--reps N] [--resamples N]

Writes the `coverage_bench.py` section of BENCHMARKS.md with --write.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pogona_job.evaluation import promotion, uncertainty  # noqa: E402
from pogona_job.evaluation.scoring import SplitRun  # noqa: E402
from pogona_job.evaluation.uncertainty import PerImage  # noqa: E402

SIZES = (20, 50, 200)
FRAMES = 5  # images per sequence


def simulate(n_groups: int, frames: int, seed: int, scene_seed: int | None = None) -> tuple[PerImage, dict[str, str]]:
    """Per-image results of one model on `n_groups` scenes of `frames` near-identical frames.

    The scene (its labels and difficulty) comes from `scene_seed`; the model's outcomes from `seed`, so two
    seeds on one scene_seed are two equally good models on the same images. Frames of one scene share the
    model's outcome with probability 0.8 (consecutive video frames), else draw their own."""
    scenes = np.random.default_rng(seed if scene_seed is None else scene_seed)
    model = np.random.default_rng(seed + 1_000_003)
    files, tp, conf, pred_cls, target_cls, groups = [], [], [], [], [], {}
    for g in range(n_groups):
        difficulty = scenes.beta(2, 2)
        targets = 1 + scenes.poisson(0.5)

        def outcome(targets: int = targets, difficulty: float = difficulty) -> tuple[np.ndarray, np.ndarray]:
            found = model.random(targets) < 0.95 - 0.6 * difficulty
            depth = model.binomial(10, max(0.05, 1 - 0.7 * difficulty), size=targets)
            hits = [[j < d for j in range(10)] for f, d in zip(found, depth, strict=True) if f]
            hit_conf = model.uniform(0.2, 1.0, len(hits)) * (1 - 0.5 * difficulty)
            n_fp = model.poisson(0.2 + 1.2 * difficulty)
            rows = np.array(hits + [[False] * 10] * n_fp, bool).reshape(-1, 10)
            return rows, np.concatenate([hit_conf, model.uniform(0.0, 0.6, n_fp)])

        base = outcome()
        for f in range(frames):
            rows, c = base if f > 0 and model.random() < 0.8 else outcome()
            name = f"/pool/scene{g:05d}_{f:02d}.jpg"
            files.append(name)
            tp.append(rows)
            conf.append(c)
            pred_cls.append(np.zeros(len(c)))
            target_cls.append(np.zeros(targets))
            groups[name] = f"seq:{g}"
    return PerImage(files, tp, conf, pred_cls, target_cls, {0: "head"}), groups


def _coverage_task(args: tuple[int, int, int, int, float, int]) -> tuple[int, int, bool, bool, float, float]:
    size, frames, rep, resamples, truth, pool_groups = args
    rng = np.random.default_rng(10_000 * size + 100 * frames + rep)
    pool, groups = POOLS[frames]
    picked = rng.choice(pool_groups, size=size // frames, replace=False)
    idx = [i for g in picked for i in range(g * frames, (g + 1) * frames)]
    sample = pool.subset(idx)
    ours = uncertainty.bootstrap(sample, keys=("map50",), count=resamples, seed=rep, groups=groups)["map50"]
    naive = uncertainty.bootstrap(sample, keys=("map50",), count=resamples, seed=rep, method="percentile")["map50"]
    point = uncertainty.score(sample)["map50"]
    inside = ours[0] <= point <= ours[1]
    return size, frames, ours[0] <= truth <= ours[1], naive[0] <= truth <= naive[1], ours[1] - ours[0], float(inside)


def _aa_task(args: tuple[int, int, int]) -> dict[str, Any]:
    size, rep, resamples = args
    a, groups = simulate(size // FRAMES, FRAMES, seed=2 * rep + 1, scene_seed=50_000 + rep)
    b, _ = simulate(size // FRAMES, FRAMES, seed=2 * rep + 2, scene_seed=50_000 + rep)
    unknown = dict.fromkeys(a.files, "unknown")  # overall only: one check per pair
    run_a = SplitRun("val", a, unknown, {}, groups)
    run_b = SplitRun("val", b, unknown, {}, groups)
    comparison = promotion.compare({"val": run_a}, {"val": run_b}, margin=0.01, resamples=resamples)
    decision = promotion.decide(
        mode="auto",
        succeeded=True,
        export={},
        dropped=0,
        allow_lenient=False,
        champion={"run_id": "champion", "classes": ["head"]},
        comparison=comparison,
        classes=["head"],
    )
    d = comparison["splits"]["val"]["overall"]["map50_95"]
    return {
        "size": size,
        "decision": decision["decision"],
        "verdict": comparison["checks"][0]["verdict"],
        "differs": d["low"] > 0 or d["high"] < 0,
        "better": d["low"] > 0,
        "width": d["high"] - d["low"],
    }


POOLS: dict[int, tuple[PerImage, dict[str, str]]] = {}


def _init(pool_groups: int) -> None:
    for frames in (1, FRAMES):
        POOLS[frames] = simulate(pool_groups * FRAMES // frames, frames, seed=7)


def wilson(k: int, n: int) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    z, p = 1.96, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--aa-pairs", type=int, default=60)
    parser.add_argument("--resamples", type=int, default=400)
    parser.add_argument("--pool-groups", type=int, default=2000)
    parser.add_argument("--procs", type=int, default=2)
    args = parser.parse_args()
    start = time.time()
    _init(args.pool_groups)
    truths = {frames: uncertainty.score(POOLS[frames][0])["map50"] for frames in POOLS}
    tasks = [
        (size, frames, rep, args.resamples, truths[frames], args.pool_groups * FRAMES // frames)
        for size in SIZES
        for frames in (1, FRAMES)
        for rep in range(args.reps)
    ]
    aa = [(size, rep, args.resamples) for size in (50, 200) for rep in range(args.aa_pairs)]
    with Pool(args.procs, initializer=_init, initargs=(args.pool_groups,)) as workers:
        cov = workers.map(_coverage_task, tasks, chunksize=4)
        pairs = workers.map(_aa_task, aa, chunksize=2)
    minutes = (time.time() - start) / 60
    lines = [
        "## Interval coverage and A/A promotion test (benchmarks/coverage_bench.py, issue #21)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores; took {minutes:.1f} min; "
        f"{args.resamples} bootstrap resamples per interval (the job uses {uncertainty.RESAMPLES}); "
        "**simulated** per-image validation results (the PerImage the job records), not trained models: "
        "hundreds of trainings do not fit 10 minutes on 2 cores.",
        "",
        f"Coverage: a pool of {args.pool_groups * FRAMES:,} images (mAP@0.5 {truths[1]:.3f} independent, "
        f"{truths[FRAMES]:.3f} in sequences of {FRAMES} frames); {args.reps} val sets drawn per row; "
        "goal: a 95% interval covers the pool's mAP@0.5 93-97% of the time.",
        "",
        "| val images | data | job's interval (BCa over groups) covers | Wilson 95% of that | median width | "
        "old interval (percentile over images) covers | point inside |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in SIZES:
        for frames in (1, FRAMES):
            rows = [r for r in cov if r[0] == size and r[1] == frames]
            k = sum(r[2] for r in rows)
            lo, hi = wilson(k, len(rows))
            naive = sum(r[3] for r in rows) / len(rows)
            data = "independent images" if frames == 1 else f"{size // frames} sequences of {frames}"
            lines.append(
                f"| {size} | {data} | {k / len(rows):.1%} | {lo:.1%}-{hi:.1%} | "
                f"{float(np.median([r[4] for r in rows])):.3f} | {naive:.1%} | "
                f"{sum(r[5] for r in rows):.0f}/{len(rows)} |"
            )
    lines += [
        "",
        f"A/A: {args.aa_pairs} pairs of equally good simulated models per size, on the same images (sequences of "
        f'{FRAMES}), through promotion.compare() and decide() with margin 0.01. "Differs" = the paired 95% interval '
        'of Δ mAP@0.5-0.95 excludes 0 (should be <= 5%); "false promotion as better" = it lies above 0. The '
        "job's rule promotes a challenger that is *not worse* than the champion by the margin (non-inferiority), "
        "so `promote` between equals is the rule working, not a false claim of improvement. Smallest detectable "
        "difference: 2.8 x the paired standard error (80% power, two-sided 5%), from the median interval width.",
        "",
        "| val images | differs (false difference) | false promotion as better | decision promote / keep: regressed "
        "/ keep: too few images | smallest detectable Δ mAP@0.5-0.95 |",
        "|---|---|---|---|---|",
    ]
    for size in (50, 200):
        rows = [p for p in pairs if p["size"] == size]
        n = len(rows)
        differs = sum(p["differs"] for p in rows) / n
        better = sum(p["better"] for p in rows) / n
        counts = [
            sum(p["decision"] == "promote" for p in rows),
            sum(p["verdict"] == "regressed" for p in rows),
            sum(p["verdict"] == "unsure" for p in rows),
        ]
        mde = 2.8 * float(np.median([p["width"] for p in rows])) / (2 * 1.96)
        lines.append(f"| {size} | {differs:.1%} | {better:.1%} | {' / '.join(map(str, counts))} | {mde:.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        path = ROOT / "BENCHMARKS.md"
        doc = path.read_text()
        begin, end = "<!-- BEGIN coverage_bench.py -->", "<!-- END coverage_bench.py -->"
        block = f"{begin}\n{text}\n{end}"
        if begin in doc:
            doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end) :]
        else:
            doc = doc.rstrip("\n") + "\n\n" + block + "\n"
        path.write_text(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
