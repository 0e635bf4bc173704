"""Champion/challenger promotion: the rules, the compare-and-swap, and three real runs on SeaweedFS."""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pogona_job.evaluation import promotion
from pogona_job.evaluation.scoring import SplitRun
from pogona_job.evaluation.uncertainty import PerImage
from pogona_job.s3 import storage
from pogona_job.tools.demo import write_demo
from pogona_job.tools.locals3 import LocalS3
from tests.conftest import BUCKET, client_for, job_env, run_cli, run_here
from tests.ship_models import trained_model

# ---------------------------------------------------------------------------------------------
# The rules (pure)
# ---------------------------------------------------------------------------------------------

VERIFIED = {"verified": True, "max_abs_delta_map50": 0.001, "tolerance": 0.01}


def _decide(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "mode": "auto",
        "succeeded": True,
        "export": VERIFIED,
        "dropped": 0,
        "allow_lenient": False,
        "champion": {"run_id": "old"},
        "comparison": {"margin": 0.01, "splits": {"val": {"images": 100}}, "checks": []},
    }
    return promotion.decide(**(args | overrides))


def _check(scope: str, delta: float, low: float, high: float, verdict: str, metric: str = "map50") -> dict[str, Any]:
    return {
        "split": "val",
        "scope": scope,
        "metric": metric,
        "delta": delta,
        "low": low,
        "high": high,
        "challenger": 0.5 + delta,
        "champion": 0.5,
        "verdict": verdict,
    }


def test_the_first_run_becomes_champion() -> None:
    d = _decide(champion=None, comparison=None)
    assert d["decision"] == "promote" and "first" in d["reason"]


def test_never_and_always_override_and_always_is_recorded_as_forced() -> None:
    assert _decide(mode="never")["decision"] == "keep"
    forced = _decide(mode="always", export={"verified": False})
    assert forced["decision"] == "promote" and forced["forced"] is True and "force" in forced["reason"]


def test_an_unverified_export_blocks_promotion() -> None:
    d = _decide(export={"verified": False, "max_abs_delta_map50": 0.2, "tolerance": 0.01}, champion=None)
    assert d["decision"] == "keep" and "ONNX" in d["reason"] and "0.200" in d["reason"]


def test_lenient_drops_block_promotion_unless_allowed() -> None:
    assert _decide(dropped=3, champion=None)["decision"] == "keep"
    assert "3 images" in _decide(dropped=3, champion=None)["reason"]
    assert _decide(dropped=3, champion=None, allow_lenient=True)["decision"] == "promote"


def test_a_regressed_modality_blocks_and_the_reason_names_it_and_by_how_much() -> None:
    checks = [
        _check("visible", 0.01, -0.005, 0.02, "ok"),
        _check("thermal", -0.234, -0.3, -0.18, "regressed"),
        _check("overall", 0.0, -0.004, 0.004, "ok", "map50_95"),
    ]
    d = _decide(comparison={"margin": 0.01, "splits": {"val": {"images": 100}}, "checks": checks})
    assert d["decision"] == "keep"
    assert "thermal mAP@0.5 on val is 0.234 below the champion old" in d["reason"]


def test_too_small_to_tell_keeps_the_champion_and_says_so() -> None:
    checks = [_check("thermal", 0.0, -0.08, 0.07, "unsure")]
    d = _decide(comparison={"margin": 0.01, "splits": {"val": {"images": 12}}, "checks": checks})
    assert d["decision"] == "keep" and "too few images to tell (12 in val)" in d["reason"]


def test_not_worse_with_95_percent_confidence_is_promoted() -> None:
    checks = [_check("thermal", 0.02, -0.004, 0.05, "ok")]
    d = _decide(comparison={"margin": 0.01, "splits": {"val": {"images": 500}}, "checks": checks})
    assert d["decision"] == "promote" and "95% confidence" in d["reason"]


def _run(per_image_map: list[float], modality: list[str]) -> SplitRun:
    """A split where image i holds one label and one prediction, right with probability per_image_map[i]."""
    files = [f"/v/{i:03d}.jpg" for i in range(len(per_image_map))]
    tp = [np.array([[hit] * 10]) for hit in per_image_map]
    per = PerImage(
        files,
        [t.astype(bool) for t in tp],
        [np.array([0.9]) for _ in files],
        [np.zeros(1) for _ in files],
        [np.zeros(1) for _ in files],
        {0: "head"},
    )
    return SplitRun("val", per, dict(zip(files, modality, strict=True)), {})


def test_compare_flags_the_modality_that_got_worse_and_not_the_other() -> None:
    n = 60
    modality = ["thermal" if i % 2 else "visible" for i in range(n)]
    good = [1.0] * n
    thermal_broken = [0.0 if m == "thermal" and i % 3 else 1.0 for i, m in enumerate(modality)]
    c = promotion.compare({"val": _run(thermal_broken, modality)}, {"val": _run(good, modality)}, margin=0.01)
    verdicts = {(x["scope"], x["metric"]): x["verdict"] for x in c["checks"]}
    assert verdicts[("thermal", "map50")] == "regressed"
    assert verdicts[("visible", "map50")] == "ok"
    same = promotion.compare({"val": _run(good, modality)}, {"val": _run(good, modality)}, margin=0.01)
    assert {x["verdict"] for x in same["checks"]} == {"ok"}


# ---------------------------------------------------------------------------------------------
# Compare-and-swap on a real server
# ---------------------------------------------------------------------------------------------


def _manifest(run_id: str, against: str | None) -> dict[str, Any]:
    """The parts of a succeeded manifest that promotion reads."""
    return {
        "run_id": run_id,
        "status": "succeeded",
        "promotion": {"decision": "promote", "compared_against": against, "forced": False, "reason": "test"},
        "evaluation": {},
        "classes": ["pogona_head"],
        "artifacts": {},
    }


def _race(s3: LocalS3, output_uri: str, runs: list[str], against: str | None) -> dict[str, bool]:
    barrier = threading.Barrier(len(runs))
    won: dict[str, bool] = {}

    def go(run_id: str) -> None:
        client = client_for(s3)
        manifest = _manifest(run_id, against)
        barrier.wait()
        won[run_id] = promotion.promote(client, output_uri, manifest, 128)

    threads = [threading.Thread(target=go, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won


@pytest.mark.parametrize("round_", range(4))
def test_runs_finishing_together_leave_exactly_one_champion(s3: LocalS3, s3_client: Any, round_: int) -> None:
    output_uri = f"s3://{BUCKET}/ship-race-{round_}"
    key = f"ship-race-{round_}/champion.json"
    # Two first runs at once: both were compared with "no champion".
    won = _race(s3, output_uri, ["a", "b"], against=None)
    assert sorted(won.values()) == [False, True]
    champion = json.loads(s3_client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    winner = next(r for r, w in won.items() if w)
    assert champion["run_id"] == winner and champion["manifest"].endswith(f"/{winner}/manifest.json")
    # Three challengers of that champion at once: one moves it, the others find a champion they never saw.
    won = _race(s3, output_uri, ["c", "d", "e"], against=winner)
    assert sorted(won.values()) == [False, False, True]
    champion = json.loads(s3_client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    assert champion["run_id"] == next(r for r, w in won.items() if w) and champion["previous"] == winner


# ---------------------------------------------------------------------------------------------
# Three runs in sequence (done-when of issue 13)
# ---------------------------------------------------------------------------------------------

# Each run fine-tunes the session's shared trained model (tests/ship_models.py: trained once, also used by the
# evaluation, export and predict tests) for 3 epochs: good data gives mAP@0.5 ~0.4 overall (thermal ~0.9), the
# damaged thermal boxes pull thermal down to ~0.1 (measured: -0.8 with the interval far below the margin).
EPOCHS = "3"
SLOW = pytest.mark.timeout(2700)


def _user_split_demo(dest: Path, n_images: int = 48) -> dict[str, str]:
    """The demo as a user's export with its own split (images/{train,val}); {stem: modality}."""
    raw = dest.parent / f"{dest.name}-raw"
    truth = write_demo(raw, n_images=n_images, size=128, seed=1)
    modality = {}
    for i, (rel, m) in enumerate(sorted(truth.items())):
        split = "val" if i % 4 == 0 else "train"
        stem = Path(rel).stem
        name = f"{'thermal' if m == 'thermal' else 'rgb'}_{stem}"
        (dest / "images" / split).mkdir(parents=True, exist_ok=True)
        (dest / "labels" / split).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(raw / rel, dest / "images" / split / f"{name}.jpg")
        label = raw / "labels" / f"{stem}.txt"
        if label.exists():
            shutil.copyfile(label, dest / "labels" / split / f"{name}.txt")
        modality[name] = m
    shutil.rmtree(raw)
    return modality


def _shift_thermal_train_boxes(root: Path, dx: float = 0.3) -> int:
    """The broken label batch: every thermal training box moved sideways (val labels untouched)."""
    shifted = 0
    for label in (root / "labels" / "train").glob("thermal_*.txt"):
        lines = []
        for line in label.read_text().splitlines():
            c, x, y, w, h = line.split()
            new_x = float(x) + dx if float(x) + dx + float(w) / 2 <= 1 else float(x) - dx
            lines.append(f"{c} {new_x:.6f} {y} {w} {h}")
            shifted += 1
        label.write_text("".join(f"{line}\n" for line in lines))
    return shifted


def _push(s3: LocalS3, src: Path, uri: str) -> None:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3.env.items():
            mp.setenv(k, v)
        storage.push_tree(storage.make_client(), src, storage.S3Path.parse(uri))


def _get(client: Any, key: str) -> Any:
    body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return json.loads(body) if key.endswith(".json") else body.decode()


@pytest.fixture(scope="module")
def three_runs(s3: LocalS3, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    weights, _ = trained_model(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("ship-three")
    good, damaged = tmp / "good", tmp / "damaged"
    _user_split_demo(good)
    shutil.copytree(good, damaged)
    shifted = _shift_thermal_train_boxes(damaged)
    _push(s3, good, f"s3://{BUCKET}/ship-datasets/good")
    _push(s3, damaged, f"s3://{BUCKET}/ship-datasets/damaged")
    results = {}
    for run_id, data, epochs in (
        ("good-1", "good", EPOCHS),
        ("damaged-2", "damaged", EPOCHS),
        ("good-3", "good", EPOCHS),
    ):
        env = job_env(
            s3,
            tmp / run_id,
            POGONA_DATASET_URI=f"s3://{BUCKET}/ship-datasets/{data}",
            POGONA_OUTPUT_URI=f"s3://{BUCKET}/ship-three/runs",
            POGONA_RUN_ID=run_id,
            POGONA_EPOCHS=epochs,
            POGONA_CHECKPOINT_EVERY_EPOCHS="100",
            POGONA_LR0="0.003",
            POGONA_MODEL=str(weights),
            # The damaged data is bad enough for the sanity gate to stop it (its sanity mAP falls to ~0.02 from
            # these weights): the gate is not what these runs are about, the promotion decision is.
            POGONA_GATE_MIN_MAP50="0",
            POGONA_EXPORT_FORMATS="onnx",  # an unverified export blocks promotion: the rules need it
        )
        results[run_id] = run_here(["run"], env)
    listing = run_cli(["runs"], env, timeout=120)
    shown = run_cli(["runs", "show", "good-1"], env, timeout=120)
    return {"results": results, "shifted": shifted, "runs": listing, "show": shown}


@pytest.mark.slow
@SLOW
def test_a_good_first_run_becomes_champion_with_a_verified_onnx(three_runs: dict[str, Any], s3_client: Any) -> None:
    assert three_runs["results"]["good-1"].code == 0, three_runs["results"]["good-1"].stderr[-3000:]
    manifest = _get(s3_client, "ship-three/runs/good-1/manifest.json")
    assert manifest["promotion"]["decision"] == "promote" and manifest["promotion"]["compared_against"] is None
    assert manifest["export"]["verified"] is True
    assert "weights/best.onnx" in manifest["artifacts"]
    assert manifest["export"]["splits"]["val"]["metrics"]["overall"]["map50"] > 0.1
    lineage = manifest["lineage"]
    assert lineage["seed"] == 42 and lineage["dataset"]["fingerprint"] == manifest["dataset"]["fingerprint"]
    assert lineage["dataset"]["splits"]["val.txt"] == manifest["artifacts"]["dataset/val.txt"]["sha256"]
    assert lineage["packages"]["ultralytics"] and lineage["git_commit"] != ""
    assert "## Promotion" in _get(s3_client, "ship-three/runs/good-1/report.md")


@pytest.mark.slow
@SLOW
def test_a_run_on_damaged_thermal_labels_is_not_promoted_and_the_report_says_which_modality(
    three_runs: dict[str, Any], s3_client: Any
) -> None:
    assert three_runs["shifted"] > 10
    assert three_runs["results"]["damaged-2"].code == 0, three_runs["results"]["damaged-2"].stderr[-3000:]
    manifest = _get(s3_client, "ship-three/runs/damaged-2/manifest.json")
    decision = manifest["promotion"]
    assert decision["decision"] == "keep" and decision["compared_against"] == "good-1"
    thermal = next(c for c in decision["comparison"]["checks"] if c["scope"] == "thermal")
    assert thermal["verdict"] == "regressed" and thermal["delta"] < -0.01
    report = _get(s3_client, "ship-three/runs/damaged-2/report.md")
    assert f"thermal mAP@0.5 on val is {-thermal['delta']:.3f} below the champion good-1" in report
    # Same images, same process: the champion's numbers in this report are its numbers on this run's val.
    assert re.search(r"\| val \| thermal \| mAP@0.5 \| \d\.\d{3} \| \d\.\d{3} \| -\d\.\d{3} ", report)


@pytest.mark.slow
@SLOW
def test_a_third_good_run_is_promoted_or_not_according_to_its_interval(
    three_runs: dict[str, Any], s3_client: Any
) -> None:
    assert three_runs["results"]["good-3"].code == 0, three_runs["results"]["good-3"].stderr[-3000:]
    decision = _get(s3_client, "ship-three/runs/good-3/manifest.json")["promotion"]
    assert decision["compared_against"] == "good-1"  # the damaged run never became champion
    checks = decision["comparison"]["checks"]
    margin = decision["comparison"]["margin"]
    champion = _get(s3_client, "ship-three/runs/champion.json")
    report = _get(s3_client, "ship-three/runs/good-3/report.md")
    if all(c["low"] >= -margin and c["delta"] >= (-margin if c["metric"] == "map50" else 0) for c in checks):
        assert decision["decision"] == "promote" and champion["run_id"] == "good-3"
        assert "95% confidence" in report
    else:
        assert decision["decision"] == "keep" and champion["run_id"] == "good-1"
        assert "too few images to tell" in report or "below the champion" in report
    assert decision["reason"] in report


@pytest.mark.slow
@SLOW
def test_runs_lists_every_run_with_its_interval_and_marks_the_champion(
    three_runs: dict[str, Any], s3_client: Any
) -> None:
    assert three_runs["runs"].code == 0, three_runs["runs"].stderr
    champion = _get(s3_client, "ship-three/runs/champion.json")["run_id"]
    rows = {line.split()[0]: line for line in three_runs["runs"].stdout.splitlines()[1:]}
    assert set(rows) == {"good-1", "damaged-2", "good-3"}
    assert [r for r, line in rows.items() if "★" in line] == [champion]
    for run_id, line in rows.items():
        overall = _get(s3_client, f"ship-three/runs/{run_id}/manifest.json")["evaluation"]["val"]["overall"]
        lo, hi = overall["ci"]["map50"]
        assert f"{overall['map50']:.3f} ({lo:.2f}-{hi:.2f})" in line and "succeeded" in line
    assert three_runs["show"].code == 0
    assert "Run good-1: succeeded" in three_runs["show"].stdout and "thermal" in three_runs["show"].stdout


def test_a_champion_of_other_classes_is_another_task_and_the_reason_says_what_to_do() -> None:
    d = promotion.decide(
        mode="auto",
        succeeded=True,
        export={},
        dropped=0,
        allow_lenient=False,
        champion={"run_id": "cats-1", "classes": ["cat", "dog"]},
        comparison=None,
        classes=["pogona_head"],
    )
    assert d["decision"] == "keep" and d["other_task"]
    assert d["reason"] == (
        "Not promoted: the champion cats-1 detects other classes (cat, dog; this run: pogona_head), so it is "
        "another task: give this task its own POGONA_OUTPUT_URI, or POGONA_PROMOTE=always to replace that champion."
    )


def test_a_champion_trained_on_another_dataset_version_is_compared_and_the_reason_says_so() -> None:
    comparison = {
        "margin": 0.01,
        "splits": {"val": {"images": 40}},
        "checks": [
            {
                "split": "val",
                "scope": "overall",
                "metric": "map50_95",
                "delta": 0.0,
                "low": -0.001,
                "high": 0.001,
                "challenger": 0.5,
                "champion": 0.5,
                "verdict": "ok",
            }
        ],
    }
    d = promotion.decide(
        mode="auto",
        succeeded=True,
        export={},
        dropped=0,
        allow_lenient=False,
        champion={"run_id": "c1", "classes": ["head"], "dataset_fingerprint": "aaaaaaaaaaaaaaaa"},
        comparison=comparison,
        classes=["head"],
        dataset_fingerprint="bbbbbbbbbbbbbbbb",
    )
    assert d["decision"] == "promote"
    assert "another version of the dataset (fingerprint aaaaaaaaaaaa, this run bbbbbbbbbbbb)" in d["reason"]


def test_an_export_check_that_is_not_meaningful_neither_verifies_nor_blocks() -> None:
    d = promotion.decide(
        mode="auto",
        succeeded=True,
        export={"verified": False, "meaningful": False, "max_abs_delta_map50": 0.0, "tolerance": 0.01},
        dropped=0,
        allow_lenient=False,
        champion=None,
        comparison=None,
    )
    assert d["decision"] == "promote" and "export" not in d["reason"]  # the final verdict is what stops it
