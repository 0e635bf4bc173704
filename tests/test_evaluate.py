"""Per-modality evaluation of trained weights on the staged val split."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pogona_job.dataset import StagedDataset, inspect_dataset, stage_dataset
from pogona_job.demo import CLASS_NAMES, write_demo
from pogona_job.evaluate import evaluate_per_modality, lagging_modalities, val_images_by_modality


@pytest.fixture(scope="session")
def ultralytics_offline(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Ultralytics with no network: offline mode, a local font, quiet (fills only what is not set yet)."""
    import matplotlib

    os.environ.setdefault("YOLO_OFFLINE", "true")
    os.environ.setdefault("YOLO_VERBOSE", "false")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("yolo-config")))
    font = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics" / "Arial.ttf"
    if not font.exists():
        font.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", font)


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> StagedDataset:
    raw = tmp_path_factory.mktemp("raw")
    write_demo(raw, n_images=40, size=96, seed=0)
    return stage_dataset(inspect_dataset(raw, CLASS_NAMES), tmp_path_factory.mktemp("staged"), CLASS_NAMES)


def test_val_images_are_grouped_by_modality(staged: StagedDataset) -> None:
    groups = val_images_by_modality(staged)
    assert {m: len(paths) for m, paths in groups.items()} == staged.counts["val"]
    assert all(p.is_file() and p.parent == staged.root / "images" / "val" for paths in groups.values() for p in paths)


@pytest.mark.slow
def test_each_modality_is_evaluated_on_its_own_val_images(
    ultralytics_offline: None, staged: StagedDataset, tmp_path: Path
) -> None:
    from ultralytics import YOLO

    YOLO("yolo11n.yaml").train(
        data=str(staged.data_yaml),
        epochs=1,
        imgsz=64,
        batch=8,
        device="cpu",
        workers=0,
        plots=False,
        val=False,
        project=str(tmp_path),
        name="t",
    )
    results = evaluate_per_modality(
        tmp_path / "t" / "weights" / "last.pt", staged, imgsz=64, batch=8, device="cpu", work_dir=tmp_path / "eval"
    )
    assert set(results) == {"thermal", "visible"}
    for modality, metrics in results.items():
        assert metrics["images"] == staged.counts["val"][modality]
        assert set(metrics) == {"images", "precision", "recall", "map50", "map50_95"}
        assert all(isinstance(v, float) and 0 <= v <= 1 for k, v in metrics.items() if k != "images")


def test_a_modality_lags_when_its_map50_is_more_than_the_margin_below_the_best() -> None:
    results = {
        "thermal": {"map50": 0.95},
        "visible": {"map50": 0.80},
        "uv": {"map50": 0.90},
    }
    assert lagging_modalities(results, margin=0.1) == ["visible"]
    assert lagging_modalities(results, margin=0.2) == []
    assert lagging_modalities({}, margin=0.1) == []
