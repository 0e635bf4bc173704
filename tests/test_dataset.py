"""Dataset inspection, validation policies, the split and the staged tree (issue #4)."""

from __future__ import annotations

import hashlib
import io
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

from pogona_job.dataset import (
    DatasetInventory,
    Problem,
    format_problems,
    inspect_dataset,
    pixel_modality,
    stage_dataset,
)
from pogona_job.demo import write_demo
from pogona_job.errors import DatasetError

CLASSES = ["pogona_head"]
BOX = "0 0.5 0.5 0.25 0.25\n"


# --- helpers: tiny real files -------------------------------------------------------------


def image(path: Path, *, colour: tuple[int, int, int] = (90, 140, 60), size: int = 24, fmt: str = "JPEG") -> Path:
    """A small real image with some texture (so it is clearly 'visible' unless made grey)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, "RGB").save(path, fmt)
    return path


def text(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


def flat_dataset(root: Path, n: int = 4) -> Path:
    """n labelled images in images/ + labels/: valid on its own."""
    for i in range(n):
        image(root / "images" / f"img{i}.jpg")
        text(root / "labels" / f"img{i}.txt", BOX)
    return root


def copy(src: Path, dest_dir: Path) -> None:
    dest_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dest_dir)


def pre_split_dataset(root: Path, counts: dict[str, int]) -> Path:
    """counts[split] labelled images under images/<split>/ and labels/<split>/."""
    for split, n in counts.items():
        for i in range(n):
            image(root / "images" / split / f"{split}{i}.jpg")
            text(root / "labels" / split / f"{split}{i}.txt", BOX)
    return root


def inspect(root: Path) -> DatasetInventory:
    return inspect_dataset(root, CLASSES)


def only_problem(inv: DatasetInventory) -> Problem:
    assert len(inv.problems) == 1, format_problems(inv.problems)
    return inv.problems[0]


# --- each problem, with its file and line ---------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    setup: Callable[[Path], object]
    kind: str
    path: str
    line: int | None
    says: str  # a fragment the message must contain
    dropped: str | None  # the image lenient staging drops (None: nothing to drop)

    @property
    def drops_a_labelled_image(self) -> bool:
        return self.dropped == IMG0


def _bad_line(line: str) -> Callable[[Path], object]:
    return lambda root: text(root / "labels" / "img0.txt", BOX + BOX.replace("0.5 0.5", "0.3 0.3") + line)


def _corrupt(content: bytes) -> Callable[[Path], object]:
    return lambda root: (root / "images" / "img0.jpg").write_bytes(content)


def _truncate(root: Path) -> None:
    path = image(root / "images" / "img0.jpg", size=96)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


def _duplicate_stem(root: Path) -> None:
    image(root / "images" / "img0.png", fmt="PNG")


def _tiny(root: Path) -> None:
    image(root / "images" / "img0.jpg", size=8)


def _orphan_label(root: Path) -> None:
    text(root / "labels" / "ghost.txt", BOX)


def _unsupported(ext: str) -> Callable[[Path], object]:
    return lambda root: (root / "images" / f"extra{ext}").write_bytes(b"whatever")


IMG0 = "images/img0.jpg"
CASES = [
    Case("fields", _bad_line("0 0.5 0.5 0.2\n"), "malformed-line", "labels/img0.txt", 3, "expected 5 values", IMG0),
    Case("nan-text", _bad_line("0 0.5 abc 0.2 0.2\n"), "malformed-line", "labels/img0.txt", 3, "'abc'", IMG0),
    Case(
        "class-too-big",
        _bad_line("4 0.5 0.5 0.2 0.2\n"),
        "class-id",
        "labels/img0.txt",
        3,
        "labels/img0.txt line 3: class id 4 but only 1 class (pogona_head) is configured",
        IMG0,
    ),
    Case("class-negative", _bad_line("-1 0.5 0.5 0.2 0.2\n"), "class-id", "labels/img0.txt", 3, "id -1", IMG0),
    Case("class-fraction", _bad_line("0.5 0.5 0.5 0.2 0.2\n"), "class-id", "labels/img0.txt", 3, "whole", IMG0),
    Case("coords", _bad_line("0 1.2 0.5 0.2 0.2\n"), "coords", "labels/img0.txt", 3, "x_center=1.2", IMG0),
    Case("zero-width", _bad_line("0 0.5 0.5 0 0.2\n"), "size", "labels/img0.txt", 3, "width=0", IMG0),
    Case("negative-height", _bad_line("0 0.5 0.5 0.2 -0.1\n"), "size", "labels/img0.txt", 3, "height=-0.1", IMG0),
    Case("duplicate-box", _bad_line(BOX), "duplicate-box", "labels/img0.txt", 3, "repeats the box on line 1", IMG0),
    Case("zero-bytes", _corrupt(b""), "corrupt-image", "images/img0.jpg", None, "0 bytes", IMG0),
    Case("garbage", _corrupt(b"not an image at all"), "corrupt-image", "images/img0.jpg", None, "decoded", IMG0),
    Case("truncated", _truncate, "corrupt-image", "images/img0.jpg", None, "truncated", IMG0),
    Case("tiny", _tiny, "image-size", "images/img0.jpg", None, "8x8 px", IMG0),
    Case("gif", _unsupported(".gif"), "extension", "images/extra.gif", None, "unsupported", "images/extra.gif"),
    Case("webp", _unsupported(".webp"), "extension", "images/extra.webp", None, ".jpg", "images/extra.webp"),
    Case("heic", _unsupported(".HEIC"), "extension", "images/extra.HEIC", None, ".png", "images/extra.HEIC"),
    Case("odd", _unsupported(".jpg~"), "extension", "images/extra.jpg~", None, "odd", "images/extra.jpg~"),
    Case("orphan-label", _orphan_label, "missing-image", "labels/ghost.txt", None, "no matching image", None),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_problem_is_reported_with_its_kind_file_and_line(tmp_path: Path, case: Case) -> None:
    root = flat_dataset(tmp_path / "ds")
    case.setup(root)
    problem = only_problem(inspect(root))
    assert (problem.kind, problem.path, problem.line, problem.fatal) == (case.kind, case.path, case.line, False)
    assert case.says in problem.message and case.path in problem.message
    if case.line is not None:
        assert f"line {case.line}" in problem.message


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_strict_policy_stops_with_a_sentence_and_the_full_list(tmp_path: Path, case: Case) -> None:
    root = flat_dataset(tmp_path / "ds")
    case.setup(root)
    with pytest.raises(DatasetError) as err:
        stage_dataset(inspect(root), tmp_path / "staged", CLASSES)
    problems_file = tmp_path / "staged" / "problems.txt"
    assert err.value.exit_code == 3
    assert "1 problem in 1 file" in err.value.sentence and case.says in err.value.sentence
    assert str(problems_file) in err.value.sentence and case.says in problems_file.read_text()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_lenient_policy_drops_exactly_the_bad_image_and_records_it(tmp_path: Path, case: Case) -> None:
    root = flat_dataset(tmp_path / "ds")
    case.setup(root)
    staged = stage_dataset(inspect(root), tmp_path / "staged", CLASSES, policy="lenient")
    assert staged.dropped == ([case.dropped] if case.dropped else [])
    assert staged.images == 4 - case.drops_a_labelled_image
    assert (IMG0 in staged.staged) is not case.drops_a_labelled_image
    assert staged.problems_file is not None and case.says in staged.problems_file.read_text()


def test_duplicate_stems_in_one_folder_are_ambiguous_and_both_dropped(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds")
    _duplicate_stem(root)
    inv = inspect(root)
    assert [(p.kind, p.path) for p in inv.problems] == [
        ("duplicate-stem", "images/img0.jpg"),
        ("duplicate-stem", "images/img0.png"),
    ]
    assert "img0.jpg, img0.png share one stem" in inv.problems[0].message
    assert inv.dropped == ["images/img0.jpg", "images/img0.png"]
    with pytest.raises(DatasetError, match="2 problems in 2 files"):
        stage_dataset(inv, tmp_path / "staged", CLASSES)


def test_an_image_with_both_a_mirrored_and_a_beside_label_is_ambiguous(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds")
    text(root / "images" / "img0.txt", BOX)
    problem = only_problem(inspect(root))
    assert (problem.kind, problem.path) == ("duplicate-label", IMG0)
    assert "labels/img0.txt and images/img0.txt" in problem.message


def test_every_problem_in_a_file_is_listed_not_only_the_first(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds")
    text(root / "labels" / "img1.txt", "0 0.5 0.5 0.2\n\n7 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2 \n0 0.5 0.5 0.2 0.2\n")
    assert [(p.kind, p.line) for p in inspect(root).problems] == [
        ("malformed-line", 1),
        ("class-id", 3),
        ("duplicate-box", 5),
    ]


# --- what is not a problem ------------------------------------------------------------------


def test_missing_or_empty_label_files_are_counted_backgrounds_not_problems(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds")
    image(root / "images" / "empty_scene.jpg")
    image(root / "images" / "blank_label.jpg")
    text(root / "labels" / "blank_label.txt", "\n  \n")
    inv = inspect(root)
    assert inv.problems == [] and inv.backgrounds == 2 and len(inv.items) == 6
    staged = stage_dataset(inv, tmp_path / "staged", CLASSES)
    assert (staged.images, staged.boxes, staged.backgrounds) == (6, 4, 2)


def test_junk_files_are_ignored_and_counted(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds")
    for name in (".DS_Store", "Thumbs.db", "desktop.ini", "._img0.jpg", "README.md", "notes.json", "labels.cache"):
        text(root / "images" / name, "junk")
    text(root / "__MACOSX" / "images" / "._img1.jpg", "junk")
    text(root / ".git" / "config", "junk")
    inv = inspect(root)
    assert inv.problems == [] and inv.junk_ignored == 9 and len(inv.items) == 4


def test_tolerances_accept_rounding_crlf_bom_and_upper_case_extensions(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds")
    image(root / "images" / "upper.JPG")
    (root / "labels" / "upper.txt").write_bytes(b"\xef\xbb\xbf0 0.9 0.5 0.2 1.0000001\r\n0.0 0.1 0.1 0.1 0.1\r\n")
    inv = inspect(root)
    assert inv.problems == [] and next(i for i in inv.items if i.rel == "images/upper.JPG").boxes == 2


# --- dataset-level (fatal) problems ---------------------------------------------------------


def _fatal_cases() -> list[tuple[str, Callable[[Path], None], str, str]]:
    def empty(root: Path) -> None:
        text(root / "README.md", "no images here")

    def too_few(root: Path) -> None:
        flat_dataset(root, n=2)

    def yaml_list(root: Path) -> None:
        flat_dataset(root)
        text(root / "data.yaml", "names: [lizard]\n")

    def yaml_dict(root: Path) -> None:
        flat_dataset(root)
        text(root / "data.yaml", "nc: 2\nnames: {0: pogona_head, 1: tail}\n")

    def classes_txt(root: Path) -> None:
        flat_dataset(root)
        text(root / "labels" / "classes.txt", "head\n")

    def unreadable_yaml(root: Path) -> None:
        flat_dataset(root)
        text(root / "data.yaml", "names: [unclosed\n")

    def no_labels(root: Path) -> None:
        for i in range(4):
            image(root / "images" / f"img{i}.jpg")
        text(root / "annotations" / "img0.txt", BOX)  # in the wrong place: no image mirrors it

    return [
        ("empty", empty, "empty-dataset", "no images found"),
        ("too-few", too_few, "too-few-images", "only 2 valid images: at least 3"),
        ("names-list", yaml_list, "class-names", "['lizard'] but the job is configured with ['pogona_head']"),
        ("names-dict", yaml_dict, "class-names", "['pogona_head', 'tail']"),
        ("classes-txt", classes_txt, "class-names", "labels/classes.txt names the classes ['head']"),
        ("bad-yaml", unreadable_yaml, "class-names", "data.yaml: cannot be read"),
        ("no-labels", no_labels, "no-labels", "none of the 4 valid images has a box"),
    ]


@pytest.mark.parametrize(("setup", "kind", "says"), [c[1:] for c in _fatal_cases()], ids=[c[0] for c in _fatal_cases()])
def test_fatal_problems_stop_staging_even_when_lenient(
    tmp_path: Path, setup: Callable[[Path], None], kind: str, says: str
) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    setup(root)
    inv = inspect(root)
    fatal = [p for p in inv.problems if p.fatal]
    assert [p.kind for p in fatal] == [kind] and says in fatal[0].message
    assert inv.problems[0] == fatal[0]  # fatal problems come first
    with pytest.raises(DatasetError, match="cannot be used") as err:
        stage_dataset(inv, tmp_path / "staged", CLASSES, policy="lenient")
    assert err.value.exit_code == 3 and says in err.value.sentence


def test_matching_class_names_in_data_yaml_are_accepted(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds")
    text(root / "data.yaml", "path: .\ntrain: images\nval: images\nnames:\n  0: pogona_head\n")
    assert inspect(root).problems == []


def test_a_missing_root_is_a_fatal_problem_not_an_exception(tmp_path: Path) -> None:
    assert [p.kind for p in inspect(tmp_path / "nowhere").problems] == ["empty-dataset"]


def test_too_few_val_images_in_a_pre_split_dataset_is_fatal(tmp_path: Path) -> None:
    inv = inspect(pre_split_dataset(tmp_path / "ds", {"train": 3, "val": 1}))
    assert inv.layout == "pre-split" and [p.kind for p in inv.problems] == ["too-few-images"]


# --- layouts ----------------------------------------------------------------------------------


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

    pre = tmp_path / "pre"  # the same images, placed where the flat split put them
    text(pre / "data.yaml", "names: [pogona_head]\n")
    for split_file in flat_staged.split_files:
        split = split_file.stem
        for rel in split_file.read_text().split():
            label = flat / "labels" / f"{Path(rel).stem}.txt"
            copy(flat / rel, pre / "images" / split)
            if label.exists():
                copy(label, pre / "labels" / split)
    pre_inv = inspect(pre)
    assert pre_inv.layout == "pre-split" and pre_inv.problems == []
    pre_staged = stage_dataset(pre_inv, tmp_path / "staged-pre", CLASSES, seed=999)  # seed unused: pre-split

    assert _staged_files(pre_staged.root) == _staged_files(flat_staged.root)
    assert pre_staged.counts == flat_staged.counts and pre_staged.boxes == flat_staged.boxes


def test_valid_is_accepted_as_the_name_of_the_val_split(tmp_path: Path) -> None:
    root = pre_split_dataset(tmp_path / "ds", {"train": 2, "valid": 2})
    staged = stage_dataset(inspect(root), tmp_path / "staged", CLASSES)
    assert {s: sum(m.values()) for s, m in staged.counts.items()} == {"train": 2, "val": 2}


def test_images_outside_the_split_folders_of_a_pre_split_dataset_are_reported(tmp_path: Path) -> None:
    root = pre_split_dataset(tmp_path / "ds", {"train": 2, "val": 2})
    image(root / "images" / "stray.jpg")
    assert [(p.kind, p.path) for p in inspect(root).problems] == [("layout", "images/stray.jpg")]


def test_flat_folders_pair_labels_beside_images_or_in_a_mirrored_labels_tree(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    image(root / "site_a" / "day1" / "x.jpg")
    text(root / "site_a" / "day1" / "x.txt", BOX)  # beside the image
    image(root / "site_b" / "images" / "cam1" / "x.jpg")
    text(root / "site_b" / "labels" / "cam1" / "x.txt", BOX + "0 0.2 0.2 0.1 0.1\n")  # mirrored
    image(root / "site_c" / "x.png", fmt="PNG")  # no label: background
    inv = inspect(root)
    assert inv.layout == "flat" and inv.problems == []
    boxes = {it.rel: it.boxes for it in inv.items}
    assert boxes == {"site_a/day1/x.jpg": 1, "site_b/images/cam1/x.jpg": 2, "site_c/x.png": 0}


# --- the split ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("demo")
    return root, write_demo(root, n_images=60, size=64, seed=1)


def _lists(staged_root: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(staged_root.glob("*.txt")) if p.name != "problems.txt"}


def test_the_split_is_reproducible_for_a_seed_and_changes_with_it(
    tmp_path: Path, demo: tuple[Path, dict[str, str]]
) -> None:
    inv = inspect(demo[0])
    first = _lists(stage_dataset(inv, tmp_path / "a", CLASSES, seed=42).root)
    again = _lists(stage_dataset(inspect(demo[0]), tmp_path / "b", CLASSES, seed=42).root)
    other = _lists(stage_dataset(inv, tmp_path / "c", CLASSES, seed=43).root)
    assert first == again and first != other and set(first) == {"train.txt", "val.txt"}


@pytest.mark.parametrize("val_fraction", [0.1, 0.2, 0.35])
def test_the_split_is_stratified_by_modality(
    tmp_path: Path, demo: tuple[Path, dict[str, str]], val_fraction: float
) -> None:
    truth = demo[1]
    staged = stage_dataset(inspect(demo[0]), tmp_path / "s", CLASSES, val_fraction=val_fraction)
    for modality in ("thermal", "visible"):
        total = sum(1 for m in truth.values() if m == modality)
        assert abs(staged.counts["val"][modality] - val_fraction * total) <= 1
        assert staged.counts["train"][modality] + staged.counts["val"][modality] == total


def test_a_test_split_is_carved_out_when_asked(tmp_path: Path, demo: tuple[Path, dict[str, str]]) -> None:
    staged = stage_dataset(inspect(demo[0]), tmp_path / "s", CLASSES, test_fraction=0.1)
    data = yaml.safe_load(staged.data_yaml.read_text())
    assert data["test"] == "images/test" and [p.name for p in staged.split_files] == [
        "train.txt",
        "val.txt",
        "test.txt",
    ]
    assert sum(staged.counts["test"].values()) == 6


# --- the staged tree --------------------------------------------------------------------------


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
    assert staged.images == 60 == len(staged.modality_of) == len(staged.staged)
    for rel, staged_rel in staged.staged.items():
        assert (staged.root / staged_rel).read_bytes() == (demo[0] / rel).read_bytes()


def test_ultralytics_finds_every_staged_label_where_it_looks(tmp_path: Path, demo: tuple[Path, dict[str, str]]) -> None:
    from ultralytics.data.utils import img2label_paths

    staged = stage_dataset(inspect(demo[0]), tmp_path / "s", CLASSES)
    images = [str(staged.root / s) for s in staged.staged.values()]
    found = sum(Path(p).exists() for p in img2label_paths(images))
    assert found == staged.images - staged.backgrounds + _empty_label_files(demo[0])


def _empty_label_files(root: Path) -> int:
    return sum(1 for p in (root / "labels").glob("*.txt") if not p.read_text().strip())


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


def test_format_problems_lists_fatal_first_and_truncates(tmp_path: Path) -> None:
    problems = [Problem(f"labels/{i}.txt", 1, "coords", f"labels/{i}.txt line 1: bad") for i in range(25)]
    problems.append(Problem(".", None, "too-few-images", "only 0 valid images", fatal=True))
    out = format_problems(problems, limit=3).splitlines()
    assert out == [
        "  FATAL [too-few-images] only 0 valid images",
        "  [coords] labels/0.txt line 1: bad",
        "  [coords] labels/1.txt line 1: bad",
        "  ... and 23 more",
    ]


# --- modality -----------------------------------------------------------------------------------


def test_the_pixel_heuristic_is_right_on_every_demo_image(demo: tuple[Path, dict[str, str]]) -> None:
    root, truth = demo
    found = {it.rel: it.modality for it in inspect(root).items}
    assert found == truth


def test_the_thermal_pattern_takes_precedence_over_pixels(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds")  # colourful images: visible by their pixels
    for rel in ("images/FLIR/a.jpg", "images/IR_0001.jpg", "images/cam-thermal-2.jpg"):
        image(root / rel)
    image(root / "images" / "fair_weather.jpg")  # "ir" inside a word is not a hint
    modality = {it.rel: it.modality for it in inspect(root).items}
    assert modality["images/FLIR/a.jpg"] == modality["images/IR_0001.jpg"] == "thermal"
    assert modality["images/cam-thermal-2.jpg"] == "thermal"
    assert modality["images/fair_weather.jpg"] == modality["images/img0.jpg"] == "visible"
    custom = inspect_dataset(root, CLASSES, thermal_pattern=r"img[01]")
    assert {it.rel for it in custom.items if it.modality == "thermal"} >= {"images/img0.jpg", "images/img1.jpg"}


def _thermal_scene(size: int = 96) -> np.ndarray:
    """A smooth temperature field with two warm blobs, as a thermal camera would see it."""
    y, x = np.mgrid[0:size, 0:size] / size
    temp = 60 + 40 * np.sin(3 * x + 1) * np.cos(2 * y)
    for cx, cy in ((0.3, 0.4), (0.7, 0.65)):
        temp += 140 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.01)
    noise = np.random.default_rng(0).normal(0, 2, temp.shape)
    return np.asarray(np.clip(temp + noise, 0, 255), dtype=np.uint8)


def _jpeg_roundtrip(im: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    buf.seek(0)
    return Image.open(buf)


COLORMAPS = ["INFERNO", "JET", "TURBO", "HOT", "MAGMA", "PLASMA", "VIRIDIS", "RAINBOW", "BONE", "PARULA", "OCEAN"]


@pytest.mark.parametrize("name", COLORMAPS)
def test_palette_coloured_thermal_images_are_recognised(name: str) -> None:
    bgr = cv2.applyColorMap(_thermal_scene(), getattr(cv2, f"COLORMAP_{name}"))
    assert pixel_modality(_jpeg_roundtrip(Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1])))) == "thermal"


def test_grey_images_are_thermal_in_any_channel_layout() -> None:
    grey = _thermal_scene()
    assert pixel_modality(Image.fromarray(grey, "L")) == "thermal"
    assert pixel_modality(Image.fromarray(grey.astype(np.int32) * 200, "I")) == "thermal"  # 16-bit radiometric
    assert pixel_modality(_jpeg_roundtrip(Image.fromarray(np.dstack([grey] * 3), "RGB"))) == "thermal"


def test_a_colourful_photograph_is_visible() -> None:
    rng = np.random.default_rng(0)
    scene = rng.integers(0, 255, (6, 6, 3)).astype(np.uint8)
    photo = Image.fromarray(scene, "RGB").resize((96, 96), Image.Resampling.BICUBIC)
    assert pixel_modality(_jpeg_roundtrip(photo)) == "visible"
