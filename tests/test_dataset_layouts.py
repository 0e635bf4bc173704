"""Each labelling tool's export, as the tool writes it, passes `dataset validate` in strict mode."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pogona_job.dataset import inspect_dataset, stage_dataset
from tests.fixtures import exports

ROOT = Path(__file__).resolve().parents[1]

TOOLS: list[tuple[str, Callable[[Path], dict[str, str | None]], str, str, list[str]]] = [
    ("roboflow", exports.roboflow, "Roboflow export (train/valid/test)", "data.yaml", ["pogona_head"]),
    ("ultralytics", exports.ultralytics, "Ultralytics (images/train/val)", "data.yaml", ["pogona_head"]),
    ("cvat", exports.cvat, "CVAT YOLO 1.1 export (train list)", "obj.names", ["pogona_head"]),
    ("label-studio", exports.label_studio, "Label Studio YOLO export (no split)", "classes.txt", ["Pogona Head"]),
]


def _validate(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pogona_job", "dataset", "validate", str(folder)],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


@pytest.mark.parametrize(("tool", "build", "label", "names_file", "names"), TOOLS, ids=[t[0] for t in TOOLS])
def test_each_tool_export_validates_strictly_and_is_named(
    tmp_path: Path,
    tool: str,
    build: Callable[[Path], dict[str, str | None]],
    label: str,
    names_file: str,
    names: list[str],
) -> None:
    truth = build(tmp_path / tool)
    result = _validate(tmp_path / tool)
    assert result.returncode == 0, result.stderr
    assert f"{tmp_path / tool}: {label};" in result.stdout and result.stdout.rstrip().endswith("OK.")
    assert f"classes {names} from {names_file}" in result.stdout
    inv = inspect_dataset(tmp_path / tool)
    assert sorted(it.rel for it in inv.items) == sorted(truth)
    assert {it.rel: it.split for it in inv.items} == truth


def test_roboflow_readmes_and_data_yaml_are_companions_not_labels(tmp_path: Path) -> None:
    exports.roboflow(tmp_path / "rf")
    inv = inspect_dataset(tmp_path / "rf")
    assert inv.problems == [] and inv.companions == 2
    assert any(" " in it.rel and ".rf." in it.rel for it in inv.items)
    empty = [it.rel for it in inv.items if it.label is not None and it.label.stat().st_size == 0]
    assert empty and inv.backgrounds == len(empty)


def test_label_studio_uploads_whose_extension_lies_are_notes(tmp_path: Path) -> None:
    exports.label_studio(tmp_path / "ls")
    result = _validate(tmp_path / "ls")
    assert result.returncode == 0
    assert "2 notes (not problems)" in result.stdout and "holds a WEBP image" in result.stdout
    inv = inspect_dataset(tmp_path / "ls")
    assert any(it.rel.endswith(".webp") for it in inv.items)


def test_cvat_subsets_are_the_split_and_list_entries_must_exist(tmp_path: Path) -> None:
    truth = exports.cvat(tmp_path / "cvat", {"train": 10, "valid": 4})
    inv = inspect_dataset(tmp_path / "cvat")
    assert inv.layout_label == "CVAT YOLO 1.1 export (train/val lists)" and inv.problems == []
    staged = stage_dataset(inv, tmp_path / "s")
    assert staged.split_source == "export"
    assert {rel for rel in truth if staged.split_of(rel) == "val"} == {r for r, s in truth.items() if s == "val"}
    listing = tmp_path / "cvat" / "valid.txt"
    listing.write_text(listing.read_text() + "data/obj_valid_data/gone.jpg\n")
    problems = inspect_dataset(tmp_path / "cvat").problems
    assert [(p.kind, p.path, p.line) for p in problems] == [("layout", "valid.txt", 5)]


def test_a_darknet_style_folder_is_named_as_such_and_unlisted_images_are_listed(tmp_path: Path) -> None:
    """obj.names + train.txt at the root, images beside it, no obj.data, no obj_train_data/: not CVAT."""
    root = tmp_path / "darknet"
    exports.cvat(root, {"train": 9})
    (root / "obj.data").unlink()
    for f in sorted((root / "obj_train_data").iterdir()):
        f.rename(root / f.name)
    (root / "obj_train_data").rmdir()
    listed = [line.replace("data/obj_train_data/", "") for line in (root / "train.txt").read_text().splitlines()]
    (root / "train.txt").write_text("\n".join(listed[:6]) + "\n")  # 3 images in no list
    inv = inspect_dataset(root)
    assert inv.layout == "darknet" and inv.problems == []
    assert inv.layout_label == "darknet-style folder (obj.names and train list; no obj.data)"
    assert len(inv.items) == 9  # trained on, and said so
    unlisted = [n for n in inv.notes if n.kind == "unlisted"]
    assert sorted(n.path for n in unlisted) == sorted(listed[6:])
    assert unlisted[0].message == f"{unlisted[0].path}: in no list file (train.txt); trained on all the same"


def test_an_image_outside_the_split_folders_of_a_split_export_is_reported(tmp_path: Path) -> None:
    exports.ultralytics(tmp_path / "ul", {"train": 3, "val": 2})
    src = next((tmp_path / "ul" / "images" / "train").iterdir())
    (tmp_path / "ul" / "images" / "stray.jpg").write_bytes(src.read_bytes())
    problems = inspect_dataset(tmp_path / "ul").problems
    assert [(p.kind, p.path) for p in problems] == [("layout", "images/stray.jpg")]


def test_valid_and_validation_both_mean_val(tmp_path: Path) -> None:
    for name in ("valid", "validation"):
        exports.ultralytics(tmp_path / name, {"train": 3, name: 2})
        staged = stage_dataset(inspect_dataset(tmp_path / name), tmp_path / f"s-{name}")
        assert {s: sum(m.values()) for s, m in staged.counts.items()} == {"train": 3, "val": 2}
