"""The staged tree: what ultralytics reads, and nothing it has to guess."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from pogona_job.dataset import Problem, format_problems, stage_dataset
from pogona_job.errors import DatasetError
from pogona_job.tools.demo import write_demo
from tests.fixtures.files import BOX, CLASSES, flat_dataset, image, inspect, pre_split_dataset, text


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("demo")
    return root, write_demo(root, n_images=60, size=64, seed=1)


def _staged_files(root: Path) -> dict[str, str]:
    """Staged images and labels: relative path -> content hash."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for sub in ("images", "labels")
        for p in sorted((root / sub).rglob("*"))
        if p.is_file() and p.suffix != ".cache"
    }


def test_pre_split_and_flat_layouts_stage_the_same_dataset(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    write_demo(flat, n_images=30, size=64, seed=3)
    flat_staged = stage_dataset(inspect(flat), tmp_path / "staged-flat", CLASSES, seed=7)
    assert flat_staged.split_source == "made by the job"

    pre = tmp_path / "pre"  # the same images, placed where the flat split put them
    text(pre / "data.yaml", "names: [pogona_head]\n")
    for split_file in flat_staged.split_files:
        split = split_file.stem
        for rel in split_file.read_text().split():
            label = flat / "labels" / f"{Path(rel).stem}.txt"
            (pre / "images" / split).mkdir(parents=True, exist_ok=True)
            shutil.copy(flat / rel, pre / "images" / split)
            if label.exists():
                (pre / "labels" / split).mkdir(parents=True, exist_ok=True)
                shutil.copy(label, pre / "labels" / split)
    pre_inv = inspect(pre)
    assert pre_inv.layout_label == "Ultralytics (images/train/val)" and pre_inv.problems == []
    pre_staged = stage_dataset(pre_inv, tmp_path / "staged-pre", CLASSES, seed=999)  # seed unused: pre-split
    assert pre_staged.split_source == "export"
    assert _staged_files(pre_staged.root) == _staged_files(flat_staged.root)
    assert pre_staged.counts == flat_staged.counts and pre_staged.boxes == flat_staged.boxes


def test_staging_writes_a_self_contained_yolo_tree(tmp_path: Path, demo: tuple[Path, dict[str, str]]) -> None:
    staged = stage_dataset(inspect(demo[0]), tmp_path / "s", CLASSES)
    data = yaml.safe_load(staged.data_yaml.read_text())
    assert data == {
        "path": str(staged.root),
        "train": "images/train",
        "val": "images/val",
        "names": {0: "pogona_head"},
    }
    assert Path(data["path"]).is_absolute() and staged.problems_file is None and staged.dropped == []
    on_disk = sorted(p.relative_to(demo[0]).as_posix() for p in (demo[0] / "images").iterdir())
    assert sorted(staged.staged) == on_disk == sorted(staged.modality_of)
    for rel, staged_rel in staged.staged.items():
        assert (staged.root / staged_rel).read_bytes() == (demo[0] / rel).read_bytes()


def test_a_test_split_gets_its_own_folder_list_and_data_yaml_key(
    tmp_path: Path, demo: tuple[Path, dict[str, str]]
) -> None:
    staged = stage_dataset(inspect(demo[0]), tmp_path / "s", CLASSES, test_fraction=0.1)
    data = yaml.safe_load(staged.data_yaml.read_text())
    assert data["test"] == "images/test" and data["val"] == "images/val"
    assert [p.name for p in staged.split_files] == ["train.txt", "val.txt", "test.txt"]
    listed = set((staged.root / "test.txt").read_text().split())
    assert listed == {rel for rel in staged.staged if staged.split_of(rel) == "test"} and listed
    assert {p.name for p in (staged.root / "images" / "test").iterdir()} == {
        Path(staged.staged[rel]).name for rel in listed
    }


def test_ultralytics_finds_every_staged_label_where_it_looks(tmp_path: Path, demo: tuple[Path, dict[str, str]]) -> None:
    from ultralytics.data.utils import img2label_paths

    staged = stage_dataset(inspect(demo[0]), tmp_path / "s", CLASSES)
    images = [str(staged.root / s) for s in staged.staged.values()]
    found = sum(Path(p).exists() for p in img2label_paths(images))
    assert found == len(list((demo[0] / "labels").glob("*.txt")))


def test_staged_names_are_flat_and_unique(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for rel in ("a/x.jpg", "b/x.jpg", "a__x.jpg"):
        image(root / rel)
        text((root / rel).with_suffix(".txt"), BOX)
    image(root / "images" / "c" / "x.jpg")
    text(root / "labels" / "c" / "x.txt", BOX)
    staged = stage_dataset(inspect(root), tmp_path / "s", CLASSES)
    names = [Path(s).name for s in staged.staged.values()]
    assert len(set(names)) == 4 and {"a__x.jpg", "b__x.jpg", "c__x.jpg"} <= set(names)


def test_restaging_starts_from_a_clean_folder(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds")
    out = tmp_path / "s"
    text(out / "images" / "train" / "stale.jpg", "left over")
    stage_dataset(inspect(root), out, CLASSES)
    assert not (out / "images" / "train" / "stale.jpg").exists()


def test_staging_refuses_a_folder_that_overlaps_the_dataset(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds")
    for out in (root, root / "staged", tmp_path):
        with pytest.raises(DatasetError, match="overlaps"):
            stage_dataset(inspect(root), out, CLASSES)
    assert len(list((root / "images").iterdir())) == 4


def test_format_problems_lists_fatal_first_and_truncates() -> None:
    problems = [Problem(f"labels/{i}.txt", 1, "coords", f"labels/{i}.txt line 1: bad") for i in range(25)]
    problems.append(Problem(".", None, "too-few-images", "only 0 valid images", fatal=True))
    out = format_problems(problems, limit=3).splitlines()
    assert out == [
        "  FATAL [too-few-images] only 0 valid images",
        "  [coords] labels/0.txt line 1: bad",
        "  [coords] labels/1.txt line 1: bad",
        "  ... and 23 more",
    ]


def test_the_report_says_how_the_data_was_read_split_and_labelled(tmp_path: Path) -> None:
    from pogona_job.run.report import render
    from pogona_job.run.state import RunRecord

    root = pre_split_dataset(tmp_path / "ds", {"train": 4, "val": 2})
    shutil.copy(root / "images" / "train" / "train0.jpg", root / "images" / "val" / "copy.jpg")  # a near-duplicate
    staged = stage_dataset(inspect(root), tmp_path / "s", CLASSES)
    record = RunRecord("r1", 1, "s3://b/runs/r1", {}, "yolo11n.yaml", staged.class_names)
    record.dataset = {"images": staged.images, "counts": staged.counts, **staged.summary()}
    report = render(record)
    assert (
        "Read as **Ultralytics (images/train/val)**; class names from POGONA_CLASS_NAMES; split from the export"
        in report
    )
    assert "| visible | 0 | 0 | 7 | 0 |" in report
    assert "Modality is mostly inferred from pixels (7 of 7 images)" in report
    assert "**Warning:** Near-duplicates across the split: 1 pairs; 33.3% of val/test images" in report
    assert "(e.g. `images/train/train0.jpg` ~ `images/val/copy.jpg`)" in report
