"""Modality on real camera files and on hard cases made from real images: no photo is ever called thermal.

The real images are vendored under tests/fixtures/realdata/ (SOURCES.md: two Roboflow thermal exports,
scikit-image's sample photos) or ship inside installed packages; the hard cases are made from them.
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import pytest
from PIL import Image

from pogona_job.dataset import inspect_dataset, stage_dataset
from pogona_job.dataset.modality import CSV_COLUMNS, ModalityRecord, judge, modality_csv, read_modality_csv
from tests.fixtures.realdata import HERE, all_sources, measure

Table = dict[str, dict[str, int]]


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Table:
    return measure(all_sources(tmp_path_factory.mktemp("hard-cases")))


def test_the_sources_are_real_files_and_hard_cases_made_from_them(table: Table) -> None:
    assert table["thermal-dogs-people (real)"]["images"] == 25
    assert table["thermal-cheetah (real)"]["images"] == 12
    assert table["colour photos (real)"]["images"] >= 8
    assert table["greyscale-converted photos"]["images"] >= 40
    assert table["false-colour frames (palette bar, readouts)"]["images"] == 24


def test_no_visible_image_in_any_source_is_called_thermal(table: Table) -> None:
    assert {source: row["visible_called_thermal"] for source, row in table.items()} == dict.fromkeys(table, 0)


def test_known_answers_are_right_and_false_colour_thermal_is_rarely_unknown(table: Table) -> None:
    answered = sum(row["thermal"] + row["visible"] for row in table.values())
    assert sum(row["right"] for row in table.values()) >= 0.98 * answered
    for source in ("thermal-dogs-people (real)", "false-colour frames (palette bar, readouts)"):
        row = table[source]
        assert row["unknown"] < 0.15 * row["images"] and row["right"] >= 0.98 * row["images"], source


def test_grey_images_are_unknown_whether_thermal_or_visible(table: Table) -> None:
    for source in ("thermal-cheetah (real)", "greyscale-converted photos", "grey photos (real)"):
        assert table[source]["unknown"] == table[source]["images"], source


def test_white_animals_on_green_and_colour_photos_are_visible_or_unknown_never_thermal(table: Table) -> None:
    for source in ("white animals on green", "colour photos (real)", "document scans"):
        assert table[source]["thermal"] == 0
    assert table["white animals on green"]["visible"] >= 0.8 * table["white animals on green"]["images"]


def test_a_seek_frame_is_thermal_by_its_palette_bar() -> None:
    frame = sorted((HERE / "thermal-dogs-people").glob("*.jpg"))[0]
    with Image.open(frame) as im:
        im.draft("RGB", (128, 128))
        verdict = judge(im)
    assert verdict.modality == "thermal" and "palette bar" in verdict.evidence and "spectra" in verdict.evidence


# --- modality.csv: the per-image answers, published beside the split lists ---------------------------


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real files in a flat export: Seek frames, grey cheetah frames (one folder declared), a photo."""
    root = tmp_path_factory.mktemp("mixed")
    for i, src in enumerate(sorted((HERE / "thermal-dogs-people").glob("*.jpg"))[:4]):
        shutil.copyfile(src, root / f"seek_{i}.jpg")
        (root / f"seek_{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    for i, src in enumerate(sorted((HERE / "thermal-cheetah").glob("*.jpg"))[:4]):
        folder = root / ("zoo" if i < 2 else "misc")
        folder.mkdir(exist_ok=True)
        shutil.copyfile(src, folder / f"cheetah_{i}.jpg")
        (folder / f"cheetah_{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "zoo" / "modality.txt").write_text("thermal\n")
    for i, src in enumerate(sorted((HERE / "visible").glob("skimage-c*.jpg"))[:2]):
        Image.open(src).convert("RGB").save(root / f"photo_{i}.jpg")
        (root / f"photo_{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    return root


def test_modality_csv_lists_every_image_with_its_source_and_evidence(mixed: Path, tmp_path: Path) -> None:
    staged = stage_dataset(inspect_dataset(mixed, ["a"]), tmp_path / "s", ["a"])
    assert staged.modality_file == tmp_path / "s" / "modality.csv"
    assert staged.published_files == [*staged.split_files, staged.modality_file]
    rows = {r["path"]: r for r in csv.DictReader(io.StringIO(staged.modality_file.read_text()))}
    assert set(rows) == set(staged.staged)
    assert list(next(iter(csv.reader(io.StringIO(staged.modality_file.read_text()))))) == list(CSV_COLUMNS)
    assert rows["zoo/cheetah_0.jpg"] == {
        "path": "zoo/cheetah_0.jpg",
        "modality": "thermal",
        "source": "declared",
        "evidence": "zoo/modality.txt",
    }
    grey = rows["misc/cheetah_2.jpg"]
    assert (grey["modality"], grey["source"]) == ("unknown", "unknown") and "grey" in grey["evidence"]
    seek = rows["seek_0.jpg"]
    assert (seek["modality"], seek["source"]) == ("thermal", "inferred") and "palette" in seek["evidence"]
    assert rows["photo_0.jpg"]["modality"] in ("visible", "unknown")


def test_thumbnails_show_each_modality_inferred_from_pixels(mixed: Path, tmp_path: Path) -> None:
    staged = stage_dataset(inspect_dataset(mixed, ["a"]), tmp_path / "s", ["a"])
    sheets = staged.modality_thumbnails(tmp_path / "thumbs", per_modality=3)
    assert set(sheets) >= {"thermal", "unknown"}
    for modality, path in sheets.items():
        assert path.name == f"modality-{modality}.png"
        with Image.open(path) as im:
            assert im.height == 96 and im.width in (96, 192, 288)
    # Declared images are not shown: the user already said what they are.
    assert len(read_modality_csv(staged.modality_file.read_text())) == len(staged.staged)  # type: ignore[union-attr]


def test_modality_csv_round_trips_commas_and_quotes() -> None:
    records = [ModalityRecord("b/x, y.jpg", "visible", "pattern", 'the path matches "rgb"')]
    text = modality_csv(records)
    assert text.splitlines()[0] == "path,modality,source,evidence"
    assert read_modality_csv(text) == records
