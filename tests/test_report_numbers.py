"""report.md's numbers, rendered from recorded facts: recommendations from the metric that picks best.pt,
modality counts that add up, and a failed strict validation that still names the export's classes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pogona_job.evaluation.headline import Headline, best_epoch
from pogona_job.run.report import render
from pogona_job.run.state import RunRecord
from pogona_job.tools.locals3 import LocalS3
from pogona_job.training.columns import METRICS
from pogona_job.training.phase import Hardware, PhaseResult
from tests.conftest import BUCKET, job_env, out_key, run_here


def _rows(map50: list[float], map50_95: list[float]) -> list[dict[str, float]]:
    return [
        {"epoch": float(i + 1), "time": 10.0 * (i + 1), METRICS["map50"]: a, METRICS["map50_95"]: b}
        | {"train/box_loss": 1.0, "train/cls_loss": 1.0, "train/dfl_loss": 1.0}
        for i, (a, b) in enumerate(zip(map50, map50_95, strict=True))
    ]


def _record(rows: list[dict[str, float]], device: str = "cuda:0") -> RunRecord:
    val = {
        "images": 40,
        "groups": 12,
        "interval_unit": "groups",
        "overall": {"map50": 0.9, "map50_95": 0.6, "ci": {"map50": (0.85, 0.93), "map50_95": (0.55, 0.64)}},
        "at_conf": {"conf": 0.25, "precision": 0.9, "recall": 0.8, "tp": 8, "fp": 1, "fn": 2, "per_class": {}},
        "per_modality": {},
    }
    hw = Hardware(device, "GPU", "12.4", "2", "8")
    rec = RunRecord("r1", 1, "s3://b/runs", {"POGONA_IMGSZ": 640}, "yolo11s.pt", ["head"], status="succeeded")
    rec.full = PhaseResult("full", Path("/nonexistent"), rows, 10.0 * len(rows), hw, 9_000_000, None)
    rec.headline = Headline.build(val, rows, conf=0.25)
    rec.evaluation = {"val": val}
    return rec


def test_best_pt_is_the_last_epoch_of_the_highest_map50_95_not_of_map50() -> None:
    rows = _rows([0.9, 0.95, 0.9, 0.9], [0.5, 0.55, 0.6, 0.6])
    assert best_epoch(rows) == 4  # map50 peaked at 2; mAP@0.5-0.95 ties at 3 and 4: the trainer keeps the later


def test_no_fewer_epochs_advice_while_the_metric_that_picks_best_pt_still_rose_at_the_end() -> None:
    # mAP@0.5 peaks at epoch 34 of 40, mAP@0.5-0.95 still rises to epoch 39: the issue's counter-example.
    map50 = [0.5 + 0.01 * min(i, 33) - (0.002 * (i - 33) if i > 33 else 0) for i in range(40)]
    map50_95 = [0.3 + 0.005 * min(i, 38) for i in range(40)]
    report = render(_record(_rows(map50, map50_95)))
    recs = report[report.index("## Recommendations") :]
    assert "fewer epochs" not in recs and "patience" not in recs
    assert (
        "mAP@0.5-0.95 (the metric that picks best.pt) still rose in the last tenth of training (epochs 37-40)" in recs
    )


def test_patience_advice_only_when_the_metric_that_picks_best_pt_stopped_rising_long_before_the_end() -> None:
    map50_95 = [0.3 + 0.01 * min(i, 19) for i in range(40)]  # flat after epoch 20 (ties keep the later epoch)
    map50_95 = [v - 0.0001 * max(0, i - 19) for i, v in enumerate(map50_95)]
    report = render(_record(_rows([0.9] * 40, map50_95)))
    assert "peaked at epoch 20 of 40 and did not rise in the 20 epochs after" in report


def test_a_cpu_run_says_what_a_gpu_run_would_change() -> None:
    report = render(_record(_rows([0.9] * 10, [0.6] * 10), device="cpu"))
    assert "This run trained on the CPU (10 s per epoch at imgsz 640). A CUDA GPU" in report


def test_modality_counts_in_the_sentence_add_up_to_the_table() -> None:
    rec = _record(_rows([0.9] * 3, [0.6] * 3))
    rec.dataset = {
        "layout_label": "flat",
        "modality_sources": {
            "thermal": {"declared": 0, "pattern": 0, "inferred": 60, "unknown": 0},
            "visible": {"declared": 0, "pattern": 0, "inferred": 53, "unknown": 0},
            "unknown": {"declared": 0, "pattern": 0, "inferred": 0, "unknown": 7},
        },
    }
    report = render(rec)
    assert "Modality is mostly not declared (113 of 120 images inferred from pixels, 7 unknown)" in report


def test_the_first_screen_labels_the_last_epoch_and_says_which_validation_is_which() -> None:
    rows = _rows([0.5, 0.8, 0.467], [0.3, 0.6, 0.5])
    rec = _record(rows)
    report = render(rec)
    first = report[: report.index("## Project Overview")]
    assert "best.pt (epoch 2 of 3)" in first and "interval over 12 groups" in first
    assert "Last epoch (3, not shipped): mAP@0.5 0.467" in first
    assert "results.csv's epoch 2 shows mAP@0.5 0.800: that is ultralytics' validation during training" in first


def test_a_failed_strict_validation_on_a_multi_class_export_names_its_classes(
    s3: LocalS3, s3_client: Any, tmp_path: Path
) -> None:
    from pogona_job.tools.demo import write_demo

    raw = tmp_path / "export"
    write_demo(raw, n_images=12, size=64, seed=3)
    names = ["head", "tail", "leg"]
    (raw / "data.yaml").write_text(json.dumps({"names": names}))
    bad = sorted((raw / "labels").glob("*.txt"))[0]
    bad.write_text("7 0.5 0.5 0.2 0.2\n")  # class id past the export's 3 classes
    for f in raw.rglob("*"):
        if f.is_file():
            key = f"datasets/multi/{f.relative_to(raw)}"
            s3_client.put_object(Bucket=BUCKET, Key=key, Body=f.read_bytes())
    env = job_env(s3, tmp_path, POGONA_DATASET_URI=f"s3://{BUCKET}/datasets/multi", POGONA_RUN_ID="strict")
    env.pop("POGONA_CLASS_NAMES", None)
    result = run_here(["run"], env)
    assert result.code == 3, result.stderr[-2000:]
    report = s3_client.get_object(Bucket=BUCKET, Key=out_key(env, "strict", "report.md"))["Body"].read().decode()
    assert "- **Classes**: 3 (head, tail, leg)" in report
    # Counted from the export as read (the refused image is listed in problems.txt), never "?".
    assert "- **Dataset**: 11 images, 16 labelled boxes" in report


@pytest.mark.parametrize("value", [0.0, 0.05])
def test_the_headline_round_trips_through_the_manifest(value: float) -> None:
    rec = _record(_rows([value, value], [value, value]))
    assert rec.headline is not None
    again = Headline.from_dict(json.loads(json.dumps(rec.headline.as_dict())))
    assert again == rec.headline
