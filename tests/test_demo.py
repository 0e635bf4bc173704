"""The synthetic demo dataset: deterministic, valid, both modalities, learnable objects."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pogona_job.dataset import inspect_dataset
from pogona_job.tools.demo import CLASS_NAMES, write_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("demo")
    return root, write_demo(root)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_same_seed_writes_byte_identical_files(tmp_path: Path, demo: tuple[Path, dict[str, str]]) -> None:
    assert write_demo(tmp_path / "again") == demo[1]
    assert _files(tmp_path / "again") == _files(demo[0])


def test_another_seed_writes_another_dataset(tmp_path: Path) -> None:
    write_demo(tmp_path / "a", n_images=10, size=64, seed=1)
    write_demo(tmp_path / "b", n_images=10, size=64, seed=2)
    assert _files(tmp_path / "a") != _files(tmp_path / "b")


def test_the_demo_passes_validation_with_zero_problems(demo: tuple[Path, dict[str, str]]) -> None:
    inv = inspect_dataset(demo[0], CLASS_NAMES)
    assert inv.problems == [] and inv.layout == "flat" and inv.junk_ignored == 0
    assert len(inv.items) == 120 and inv.backgrounds == 6  # about 5% backgrounds


def test_file_names_do_not_reveal_the_modality(demo: tuple[Path, dict[str, str]]) -> None:
    assert all(re.fullmatch(r"images/frame_\d{4}\.jpg", rel) for rel in demo[1])


def test_half_are_thermal_in_grey_and_in_palette_colours(demo: tuple[Path, dict[str, str]]) -> None:
    root, truth = demo
    assert sorted(truth.values()).count("thermal") == 60
    styles = set()
    for rel, modality in truth.items():
        if modality == "thermal":
            im = Image.open(root / rel)
            pixels = np.asarray(im, dtype=int)
            if im.mode == "L":
                styles.add("grey, one channel")
            elif np.abs(pixels - pixels.mean(axis=2, keepdims=True)).max() <= 6:
                styles.add("grey, three channels")
            else:
                styles.add("palette")
    assert styles == {"grey, one channel", "grey, three channels", "palette"}


def test_objects_are_large_whole_and_one_or_two_per_image(demo: tuple[Path, dict[str, str]]) -> None:
    root, truth = demo
    counts = []
    for rel in truth:
        label = root / "labels" / (Path(rel).stem + ".txt")
        rows = [list(map(float, line.split())) for line in label.read_text().splitlines()] if label.exists() else []
        counts.append(len(rows))
        for cls, x, y, w, h in rows:
            assert cls == 0 and 0.1 <= max(w, h) <= 0.4
            assert 0 <= x - w / 2 <= x + w / 2 <= 1 and 0 <= y - h / 2 <= y + h / 2 <= 1
    assert set(counts) == {0, 1, 2}
