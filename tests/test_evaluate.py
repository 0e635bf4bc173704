"""Evaluation of trained weights: each figure checked against an independent `YOLO.val()`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from pogona_job.dataset import StagedDataset, inspect_dataset, stage_dataset
from pogona_job.evaluation import scoring, uncertainty
from pogona_job.evaluation.scoring import lagging_modalities, val_images_by_modality
from pogona_job.tools.demo import CLASS_NAMES, write_demo
from tests.ship_models import NAMES, stage, trained_model

KEYS = {
    "precision": "metrics/precision(B)",
    "recall": "metrics/recall(B)",
    "map50": "metrics/mAP50(B)",
    "map50_95": "metrics/mAP50-95(B)",
}


@pytest.fixture(scope="module")
def demo_staged(tmp_path_factory: pytest.TempPathFactory) -> StagedDataset:
    raw = tmp_path_factory.mktemp("raw")
    write_demo(raw, n_images=40, size=96, seed=0)
    return stage_dataset(inspect_dataset(raw, CLASS_NAMES), tmp_path_factory.mktemp("staged"), CLASS_NAMES)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return trained_model(tmp_path_factory)


@pytest.fixture
def staged(model: tuple[Path, Path], tmp_path: Path) -> StagedDataset:
    return stage(model[1], tmp_path / "staged")


def _official(weights: Path, data_yaml: Path, tmp: Path) -> Any:
    """What a user gets from ultralytics itself: one plain YOLO.val() call."""
    from ultralytics import YOLO

    return YOLO(str(weights)).val(
        data=str(data_yaml), imgsz=128, batch=8, device="cpu", plots=False, verbose=False, project=str(tmp), name="o"
    )


def _yaml_listing(images: list[Path], staged: StagedDataset, tmp: Path, name: str) -> Path:
    listing = tmp / f"{name}.txt"
    listing.write_text("".join(f"{p}\n" for p in images))
    data = {"path": str(staged.root), "train": str(listing), "val": str(listing), "names": dict(enumerate(NAMES))}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_val_images_are_grouped_by_modality(demo_staged: StagedDataset) -> None:
    groups = val_images_by_modality(demo_staged)
    assert {m: len(paths) for m, paths in groups.items()} == demo_staged.counts["val"]
    assert all(
        p.is_file() and p.parent == demo_staged.root / "images" / "val" for paths in groups.values() for p in paths
    )


@pytest.mark.slow
def test_overall_figures_from_per_image_results_equal_ultralytics_own(
    model: tuple[Path, Path], staged: StagedDataset, tmp_path: Path
) -> None:
    runs = scoring.evaluate(model[0], staged, imgsz=128, batch=8, device="cpu", work_dir=tmp_path / "eval")
    assert set(runs) == {"val"}  # no test split in this dataset
    official = _official(model[0], staged.data_yaml, tmp_path).results_dict
    ours = uncertainty.score(runs["val"].per)
    assert ours["map50"] > 0.1  # a real model: the equalities below are not 0 == 0
    for key, name in KEYS.items():
        assert ours[key] == pytest.approx(official[name], abs=1e-9), key
    assert len(runs["val"].per) == sum(staged.counts["val"].values())
    assert scoring.summarise(runs["val"], resamples=0)["matches_ultralytics"] is True


@pytest.mark.slow
def test_thermal_metrics_equal_yolo_val_on_a_data_yaml_listing_only_the_thermal_images(
    model: tuple[Path, Path], staged: StagedDataset, tmp_path: Path
) -> None:
    figures = scoring.summarise(
        scoring.run_split(model[0], staged, "val", imgsz=128, batch=8, device="cpu", work_dir=tmp_path / "e"),
        resamples=50,
    )
    assert set(figures["per_modality"]) == {"thermal", "visible"}
    # The demo's grey thermal frames are `unknown` (equal channels are evidence of grey, not of thermal):
    # they count overall, but no per-modality row claims them.
    assert staged.counts["val"]["unknown"] > 0
    assert figures["images"] - staged.counts["val"]["unknown"] == sum(
        figures["per_modality"][m]["images"] for m in ("thermal", "visible")
    )
    for modality in ("thermal", "visible"):
        only = sorted(
            staged.root / staged.staged[rel]
            for rel, m in staged.modality_of.items()
            if m == modality and staged.split_of(rel) == "val"
        )
        official = _official(model[0], _yaml_listing(only, staged, tmp_path, modality), tmp_path / modality)
        ours = figures["per_modality"][modality]
        assert ours["images"] == len(only)
        for key, name in KEYS.items():
            assert ours[key] == pytest.approx(official.results_dict[name], abs=1e-9), (modality, key)
        lo, hi = ours["ci"]["map50"]
        assert lo <= ours["map50"] <= hi
    # The two modalities really differ, so a mix-up between them would show.
    assert figures["per_modality"]["thermal"]["map50"] != figures["per_modality"]["visible"]["map50"]


@pytest.mark.slow
def test_per_class_table_equals_ultralytics_per_class_results(
    model: tuple[Path, Path], staged: StagedDataset, tmp_path: Path
) -> None:
    run = scoring.run_split(model[0], staged, "val", imgsz=128, batch=8, device="cpu", work_dir=tmp_path / "e")
    table = scoring.summarise(run, resamples=0)["per_class"]
    official = _official(model[0], staged.data_yaml, tmp_path)
    assert set(table) == {NAMES[int(i)] for i in official.box.ap_class_index}
    for j, i in enumerate(official.box.ap_class_index):
        p, r, ap50, ap = official.box.class_result(j)
        row = table[NAMES[int(i)]]
        assert (row["precision"], row["recall"], row["map50"], row["map50_95"]) == pytest.approx((p, r, ap50, ap))
        assert row["instances"] == official.nt_per_class[int(i)]
    labels = [staged.root / staged.staged[rel] for rel in staged.staged if staged.split_of(rel) == "val"]
    lines = [
        line.split()[0]
        for img in labels
        for line in (img.parent.parent.parent / "labels" / "val" / f"{img.stem}.txt").read_text().splitlines()
        if line.strip()
    ]
    assert {name: int(row["instances"]) for name, row in table.items()} == {
        NAMES[int(c)]: lines.count(c) for c in set(lines)
    }


def _move_to_test(staged: StagedDataset, count: int) -> list[str]:
    """Turn `count` val images (and labels) into a test split, the way a user's export carries one."""
    moved = []
    for rel in sorted(staged.staged):
        if staged.split_of(rel) != "val" or len(moved) == count:
            continue
        src = staged.root / staged.staged[rel]
        dest = staged.root / "images" / "test" / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src, dest)
        label = staged.root / "labels" / "val" / f"{src.stem}.txt"
        if label.exists():
            (staged.root / "labels" / "test").mkdir(parents=True, exist_ok=True)
            shutil.move(label, staged.root / "labels" / "test" / label.name)
        staged.staged[rel] = f"images/test/{src.name}"
        moved.append(str(dest))
    return moved


@pytest.mark.slow
def test_the_test_split_is_evaluated_beside_val_and_unknown_modality_is_left_out(
    model: tuple[Path, Path], staged: StagedDataset, tmp_path: Path
) -> None:
    moved = _move_to_test(staged, 4)
    unknown = next(rel for rel in sorted(staged.staged) if staged.split_of(rel) == "val")
    staged.modality_of[unknown] = "unknown"
    runs = scoring.evaluate(model[0], staged, imgsz=128, batch=8, device="cpu", work_dir=tmp_path / "e")
    assert set(runs) == {"val", "test"}
    assert sorted(runs["test"].per.files) == sorted(str(Path(p).resolve()) for p in moved)
    assert not set(runs["test"].per.files) & set(runs["val"].per.files)
    official = _official(model[0], _yaml_listing([Path(p) for p in moved], staged, tmp_path, "t"), tmp_path / "t")
    assert uncertainty.score(runs["test"].per)["map50"] == pytest.approx(official.results_dict[KEYS["map50"]])
    val = scoring.summarise(runs["val"], resamples=10)
    assert "unknown" not in val["per_modality"]
    # Counted overall, in no per-modality row: the one marked here and the demo's grey frames (unknown by design).
    unknowns = sum(1 for f in runs["val"].per.files if runs["val"].modality.get(f) == "unknown")
    assert unknowns >= 1
    assert sum(m["images"] for m in val["per_modality"].values()) == val["images"] - unknowns


@pytest.mark.slow
def test_a_resample_scored_from_stats_equals_re_validating_the_resampled_images(
    model: tuple[Path, Path], staged: StagedDataset, tmp_path: Path
) -> None:
    """Brute force for one bootstrap draw: duplicate images materialised as copies and validated again."""
    run = scoring.run_split(model[0], staged, "val", imgsz=128, batch=8, device="cpu", work_dir=tmp_path / "e")
    idx = uncertainty.resamples(len(run.per), count=1, seed=4)[0]
    assert len(set(idx.tolist())) < len(idx)  # a real resample: some images twice, some not at all
    copies = tmp_path / "resample"
    for j, i in enumerate(idx):
        img = Path(run.per.files[i])
        label = img.parent.parent.parent / "labels" / "val" / f"{img.stem}.txt"
        (copies / "images").mkdir(parents=True, exist_ok=True)
        (copies / "labels").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(img, copies / "images" / f"{j:03d}_{img.name}")
        if label.exists():
            shutil.copyfile(label, copies / "labels" / f"{j:03d}_{img.stem}.txt")
    data = copies / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(copies), "train": "images", "val": "images", "names": NAMES}))
    official = _official(model[0], data, tmp_path / "r").results_dict
    ours = uncertainty.score(run.per, idx)
    for key, name in KEYS.items():
        assert ours[key] == pytest.approx(official[name], abs=1e-6), key


def test_a_modality_lags_when_its_map50_is_more_than_the_margin_below_the_best() -> None:
    results = {
        "thermal": {"map50": 0.95},
        "visible": {"map50": 0.80},
        "uv": {"map50": 0.90},
    }
    assert lagging_modalities(results, margin=0.1) == ["visible"]
    assert lagging_modalities(results, margin=0.2) == []
    assert lagging_modalities({}, margin=0.1) == []


def test_the_report_shows_test_beside_val_with_intervals_and_a_per_class_table() -> None:
    def figures(map50: float, modalities: dict[str, float]) -> dict[str, Any]:
        row = {"precision": 0.9, "recall": 0.8, "map50": map50, "map50_95": 0.5, "ci": {"map50": [0.8, 0.9]}}
        return {
            "images": 40,
            "overall": row,
            "per_modality": {m: row | {"images": 20.0, "map50": v} for m, v in modalities.items()},
            "per_class": {"a": row | {"images": 30.0, "instances": 45.0}, "b": row | {"images": 9.0, "instances": 9.0}},
        }

    lines = scoring.report_lines({"val": figures(0.8649, {"thermal": 0.7}), "test": figures(0.5, {"visible": 0.6})})
    text = "\n".join(lines)
    assert "| Scope | val images | val mAP@0.5 | val mAP@0.5-0.95 | test images | test mAP@0.5 |" in text
    assert "| overall | 40 | 0.865 (0.80-0.90) | 0.500 | 40 | 0.500 (0.80-0.90) | 0.500 |" in text
    assert "| thermal | 20 | 0.700 (0.80-0.90) | 0.500 | 0 | - | - |" in text
    assert "**Per class (test):**" in text and "| b | 9 | 9 | 0.900 | 0.800 | 0.500 | 0.500 |" in text
