"""Validation: every problem with its kind, file and line; the rules at their boundaries; formats and limits."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image

from pogona_job.dataset import MIN_IMAGE_SIDE, Options, inspect_dataset, stage_dataset
from pogona_job.dataset.layouts import IMG_FORMATS, SUPPORTED_EXTENSIONS, Scan
from pogona_job.dataset.model import ImageItem, Problem
from pogona_job.dataset.validate import (
    _dataset_problems,
    _duplicate_stem_problem,
    _extension_problem,
    _is_number,
    _looks_like_labels,
    _pixels_problem,
    check_label,
    parse_line,
    valid_ids,
)
from pogona_job.errors import DatasetError
from tests.fixtures.files import BOX, CLASSES, flat_dataset, image, inspect, only_problem, pre_split_dataset, text

ROOT = Path(__file__).resolve().parents[1]


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


def _tiny(root: Path) -> None:
    image(root / "images" / "img0.jpg", size=8)


def _gif_named_jpg(root: Path) -> None:
    image(root / "images" / "img0.jpg", fmt="GIF")


def _orphan_label(root: Path) -> None:
    text(root / "labels" / "ghost.txt", BOX)


def _unsupported(name: str, content: bytes = b"whatever") -> Callable[[Path], object]:
    return lambda root: (root / "images" / name).write_bytes(content)


IMG0 = "images/img0.jpg"
CASES = [
    Case("fields", _bad_line("0 0.5 0.5 0.2\n"), "malformed-line", "labels/img0.txt", 3, "expected 5 values", IMG0),
    Case("nan-text", _bad_line("0 0.5 abc 0.2 0.2\n"), "malformed-line", "labels/img0.txt", 3, "'abc'", IMG0),
    Case("nan", _bad_line("0 0.5 nan 0.2 0.2\n"), "malformed-line", "labels/img0.txt", 3, "'nan'", IMG0),
    Case(
        "class-too-big",
        _bad_line("4 0.5 0.5 0.2 0.2\n"),
        "class-id",
        "labels/img0.txt",
        3,
        "labels/img0.txt line 3: class id 4 is not valid: the only valid id is 0 (name 'pogona_head')",
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
    Case("gif-content", _gif_named_jpg, "format", "images/img0.jpg", None, "GIF image", IMG0),
    Case("gif", _unsupported("extra.gif"), "extension", "images/extra.gif", None, "unsupported", "images/extra.gif"),
    Case("heic-garbage", _unsupported("extra.HEIC"), "corrupt-image", "images/extra.HEIC", None, "decoded", None),
    Case("odd", _unsupported("extra.jpg~"), "extension", "images/extra.jpg~", None, "odd", "images/extra.jpg~"),
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
    expected = [case.dropped] if case.dropped else []
    if case.name == "heic-garbage":
        expected = ["images/extra.HEIC"]  # an accepted extension that does not decode: dropped as corrupt
    assert staged.dropped == expected and staged.summary()["dropped"] == expected
    assert staged.images == 4 - case.drops_a_labelled_image
    assert (IMG0 in staged.staged) is not case.drops_a_labelled_image
    assert staged.problems_file is not None and case.says in staged.problems_file.read_text()


def test_duplicate_stems_in_one_folder_are_ambiguous_and_both_dropped(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds")
    image(root / "images" / "img0.png", fmt="PNG")
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


# --- the rules at their boundaries (property-based) -------------------------------------------


def _kind(line: str, nc: int = 1) -> str | None:
    values, problem = parse_line(line, "l.txt", 1, [f"c{i}" for i in range(nc)])
    assert (values is None) == (problem is not None)
    return problem.kind if problem else None


@given(nc=st.integers(1, 6), cls=st.integers(-3, 9))
@example(nc=1, cls=1).via("id = nc")
@example(nc=3, cls=3).via("id = nc, several classes")
@example(nc=3, cls=2).via("the last valid id")
def test_a_class_id_is_valid_exactly_when_it_is_below_the_number_of_classes(nc: int, cls: int) -> None:
    expected = None if 0 <= cls < nc else "class-id"
    assert _kind(f"{cls} 0.5 0.5 0.2 0.2", nc) == expected


@pytest.mark.parametrize(
    ("names", "cls", "sentence"),
    [
        ([str(i) for i in range(1, 9)], -1, "class id -1 is not valid: valid ids are 0-7 (names '1', '2' ... '8')"),
        ([str(i) for i in range(1, 9)], 8, "class id 8 is not valid: valid ids are 0-7 (names '1', '2' ... '8')"),
        (["cat", "dog"], 2, "class id 2 is not valid: valid ids are 0-1 (names 'cat', 'dog')"),
    ],
)
def test_a_bad_class_id_says_the_valid_ids_apart_from_the_names(names: list[str], cls: int, sentence: str) -> None:
    """With numeric class names ('1' ... '8'), ids and names must not read alike."""
    _, problem = parse_line(f"{cls} 0.5 0.5 0.2 0.2", "l.txt", 1, names)
    assert problem is not None and problem.message == f"l.txt line 1: {sentence}"


TOLERANCE = 1e-6  # documented: coordinates off by 1e-6 are rounding, not errors


@given(value=st.floats(-0.01, 1.01, allow_nan=False), which=st.integers(0, 1))
@example(value=-1e-9, which=0).via("x = -1e-9: rounding")
@example(value=-2e-6, which=0).via("x just below the tolerance")
@example(value=-0.001, which=1).via("a negative y")
@example(value=1 + 2e-6, which=0).via("x just above 1")
def test_a_centre_coordinate_is_valid_exactly_inside_0_1_with_rounding_tolerance(value: float, which: int) -> None:
    xy = [0.5, 0.5]
    xy[which] = value
    line = f"0 {xy[0]!r} {xy[1]!r} 0.1 0.1"
    expected = None if -TOLERANCE <= value <= 1 + TOLERANCE else "coords"
    assert _kind(line) == expected


@given(w=st.floats(-0.5, 1.0, allow_nan=False), h=st.floats(-0.5, 1.0, allow_nan=False))
@example(w=0.0, h=0.1)
@example(w=1e-12, h=1e-12)
def test_a_box_needs_a_positive_width_and_height(w: float, h: float) -> None:
    expected = None if w > 0 and h > 0 else "size"
    assert _kind(f"0 0.5 0.5 {w!r} {h!r}") == expected


@given(st.text(max_size=80))
def test_any_text_line_parses_or_gives_a_problem_never_an_exception(line: str) -> None:
    _kind(line)


@given(
    st.tuples(st.integers(0, 2), *[st.floats(0, 1, allow_nan=False, exclude_min=i >= 2) for i in range(4)]).filter(
        lambda t: t[3] > 0 and t[4] > 0
    )
)
def test_full_precision_floats_round_trip(box: tuple[int, float, float, float, float]) -> None:
    line = " ".join(repr(v) for v in box)  # what Roboflow writes: every digit
    values, problem = parse_line(line, "l.txt", 1, ["a", "b", "c"])
    assert problem is None and values == tuple(float(v) for v in box)


@pytest.mark.parametrize(
    ("size", "ok"),
    [((MIN_IMAGE_SIDE, MIN_IMAGE_SIDE), True), ((MIN_IMAGE_SIDE - 1, 40), False), ((40, MIN_IMAGE_SIDE - 1), False)],
)
def test_the_smaller_side_decides_whether_an_image_is_too_small(
    tmp_path: Path, size: tuple[int, int], ok: bool
) -> None:
    root = flat_dataset(tmp_path / "ds")
    image(root / "images" / "img0.jpg", size=size)
    kinds = [p.kind for p in inspect(root).problems]
    assert kinds == ([] if ok else ["image-size"])
    assert MIN_IMAGE_SIDE == 10  # ultralytics' own rule: a side of 9 px or less is refused


# --- what is not a problem ------------------------------------------------------------------


def test_missing_or_empty_label_files_are_counted_backgrounds_not_problems(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds")
    image(root / "images" / "empty_scene.jpg")
    image(root / "images" / "blank_label.jpg")
    text(root / "labels" / "blank_label.txt", "\n  \n")
    (root / "labels" / "zero_bytes.txt").touch()
    image(root / "images" / "zero_bytes.jpg")
    inv = inspect(root)
    assert inv.problems == [] and inv.backgrounds == 3 and len(inv.items) == 7
    staged = stage_dataset(inv, tmp_path / "staged", CLASSES)
    assert (staged.images, staged.boxes, staged.backgrounds) == (7, 4, 3)


def test_junk_files_are_ignored_and_counted(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds")
    for name in (".DS_Store", "Thumbs.db", "desktop.ini", "._img0.jpg", "README.md", "notes.json", "labels.cache"):
        text(root / "images" / name, "junk")
    text(root / "__MACOSX" / "images" / "._img1.jpg", "junk")
    text(root / ".git" / "config", "junk")
    inv = inspect(root)
    assert inv.problems == [] and inv.junk_ignored == 9 and len(inv.items) == 4


def test_companion_text_files_are_never_problems(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds")
    text(root / "README.dataset.txt", "Pogona heads - v3 2024-05-01 9:14am\n==============================\n")
    text(root / "README.roboflow.txt", "\nThis dataset was exported via roboflow.com on May 1, 2024\n")
    text(root / "images" / "list.txt", "images/img0.jpg\nimages/img1.jpg\n")
    text(root / "notes.txt", "1 2 3\nnot labels")
    text(root / "labels" / "lost.txt", BOX)  # reads like labels: an image is missing
    inv = inspect(root)
    assert [(p.kind, p.path) for p in inv.problems] == [("missing-image", "labels/lost.txt")]
    assert inv.companions == 4


def test_tolerances_accept_rounding_crlf_bom_no_final_newline_and_upper_case_extensions(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds")
    image(root / "images" / "upper.JPG")
    (root / "labels" / "upper.txt").write_bytes(b"\xef\xbb\xbf0 0.9 0.5 0.2 1.0000001\r\n0.0 0.1 0.1 0.1 0.1")
    inv = inspect(root)
    assert inv.problems == [] and next(i for i in inv.items if i.rel == "images/upper.JPG").boxes == 2


# --- formats ------------------------------------------------------------------------------------


def test_our_image_formats_are_ultralytics_own() -> None:
    from ultralytics.data.utils import IMG_FORMATS as ULTRALYTICS

    assert set(ULTRALYTICS) == IMG_FORMATS


@pytest.mark.parametrize(
    ("ext", "fmt"), [(".bmp", "BMP"), (".tif", "TIFF"), (".tiff", "TIFF"), (".webp", "WEBP"), (".PNG", "PNG")]
)
def test_each_common_format_is_validated_staged_and_read_by_ultralytics(tmp_path: Path, ext: str, fmt: str) -> None:
    from ultralytics.data.utils import verify_image_label

    root = flat_dataset(tmp_path / "ds")
    image(root / "images" / f"other{ext}", fmt=fmt, size=32)
    text(root / "labels" / "other.txt", BOX)
    inv = inspect(root)
    assert inv.problems == [] and inv.notes == []
    staged = stage_dataset(inv, tmp_path / "staged", CLASSES)
    path = staged.root / staged.staged[f"images/other{ext}"]
    label = staged.root / "labels" / path.parent.name / f"{path.stem}.txt"
    result = verify_image_label((str(path), str(label), "", False, 1, 0, 0, False))
    assert result[-1] == "" and result[0] is not None, result[-1]  # no warning message: ultralytics keeps it


def test_an_extension_that_lies_about_the_content_is_a_note_not_a_problem(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds")
    image(root / "images" / "really_webp.jpeg", fmt="WEBP")
    rgba = Image.fromarray(np.full((24, 24, 4), 120, np.uint8), "RGBA")
    (root / "images").mkdir(exist_ok=True)
    rgba.save(root / "images" / "really_png.jpg", "PNG")
    inv = inspect(root)
    assert inv.problems == []
    assert [(n.kind, n.path) for n in inv.notes] == [
        ("extension-mismatch", "images/really_png.jpg"),
        ("extension-mismatch", "images/really_webp.jpeg"),
    ]
    assert "named .jpeg but holds a WEBP image" in inv.notes[1].message
    staged = stage_dataset(inv, tmp_path / "staged", CLASSES)
    assert staged.images == 6 and len(staged.summary()["notes"]) == 2


# --- limits on what a hostile file can cost -------------------------------------------------------


def test_an_image_over_the_pixel_limit_is_a_problem_read_from_its_header(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds")
    image(root / "images" / "huge.png", fmt="PNG", size=(40, 30))
    inv = inspect_dataset(root, CLASSES, Options(max_image_pixels=1000))
    problems = [(p.kind, p.path) for p in inv.problems if p.path == "images/huge.png"]
    assert problems == [("image-pixels", "images/huge.png")]
    assert "40x30 px, over the limit of 1,000 pixels" in inv.problems[0].message
    assert not [p for p in inv.problems if p.path.startswith("images/img")]  # 24x24 = 576: under it


def test_a_label_file_over_the_line_limit_is_a_problem_at_the_first_line_too_many(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds")
    text(root / "labels" / "img0.txt", "".join(f"0 0.5 0.5 0.{i + 1} 0.1\n" for i in range(5)))
    inv = inspect_dataset(root, CLASSES, Options(max_label_lines=3))
    problem = only_problem(inv)
    assert (problem.kind, problem.path, problem.line) == ("label-lines", "labels/img0.txt", 4)
    assert inspect_dataset(root, CLASSES, Options(max_label_lines=5)).problems == []


def test_pillow_warnings_do_not_break_json_log_lines(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds")
    palette = Image.new("P", (24, 24))
    palette.putpalette([i % 256 for i in range(768)])
    palette.save(root / "images" / "palette.png", transparency=b"\x00" * 10)  # Pillow warns when converting it
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-m", "pogona_job", "dataset", "validate", str(root)],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "POGONA_LOG_FORMAT": "json"},
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr
    for line in proc.stderr.splitlines():
        json.loads(line)


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

    def no_train(root: Path) -> None:
        pre_split_dataset(root, {"train": 1, "val": 2})
        (root / "images" / "train" / "train0.jpg").write_bytes(b"")  # the only train image is unusable

    return [
        ("empty", empty, "empty-dataset", "no images found"),
        ("too-few", too_few, "too-few-images", "only 2 valid images: at least 3"),
        ("names-list", yaml_list, "class-names", "['lizard'] but POGONA_CLASS_NAMES is ['pogona_head']"),
        ("names-dict", yaml_dict, "class-names", "['pogona_head', 'tail']"),
        ("classes-txt", classes_txt, "class-names", "labels/classes.txt names the classes ['head']"),
        ("bad-yaml", unreadable_yaml, "class-names", "data.yaml: cannot be read"),
        ("no-labels", no_labels, "no-labels", "none of the 4 valid images has a box"),
        ("no-train", no_train, "too-few-images", "only 0 valid train and 2 valid val images"),
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


def test_a_missing_root_is_a_fatal_problem_not_an_exception(tmp_path: Path) -> None:
    assert [p.kind for p in inspect(tmp_path / "nowhere").problems] == ["empty-dataset"]


def test_too_few_val_images_in_a_pre_split_dataset_is_fatal(tmp_path: Path) -> None:
    inv = inspect(pre_split_dataset(tmp_path / "ds", {"train": 3, "val": 1}))
    assert inv.layout == "ultralytics" and [p.kind for p in inv.problems] == ["too-few-images"]


# --- class names --------------------------------------------------------------------------------


def test_class_names_come_from_the_export_when_not_configured(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds")
    text(root / "data.yaml", "names: ['pogona head', tail]")
    text(root / "labels" / "img1.txt", "1 0.5 0.5 0.2 0.2\n")
    inv = inspect_dataset(root)
    assert (inv.class_names, inv.names_source, inv.problems) == (["pogona head", "tail"], "data.yaml", [])
    staged = stage_dataset(inv, tmp_path / "s")
    assert staged.summary()["names_source"] == "data.yaml"
    assert "names:\n  0: pogona head\n  1: tail\n" in staged.data_yaml.read_text()


def test_configured_names_that_differ_from_the_export_name_both_lists(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds")
    text(root / "classes.txt", "Pogona Head\n")
    problem = only_problem(inspect_dataset(root, ["pogona_head"]))
    assert problem.fatal and "['Pogona Head']" in problem.message and "['pogona_head']" in problem.message


def test_without_configured_or_exported_names_the_default_is_used(tmp_path: Path) -> None:
    inv = inspect_dataset(flat_dataset(tmp_path / "ds"))
    assert (inv.class_names, inv.names_source) == (["pogona_head"], "default")
    configured = inspect_dataset(tmp_path / "ds", ["lizard"])
    assert (configured.class_names, configured.names_source) == (["lizard"], "POGONA_CLASS_NAMES")


def test_the_real_entry_point_takes_the_names_from_the_export_unless_the_variable_is_set(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds")
    text(root / "data.yaml", "names:\n  0: lizard\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}

    def validate(**extra: str) -> subprocess.CompletedProcess[str]:
        args = [sys.executable, "-m", "pogona_job", "dataset", "validate", str(root)]
        return subprocess.run(args, env=env | extra, capture_output=True, text=True, cwd=ROOT)

    ok = validate()
    assert ok.returncode == 0 and "classes ['lizard'] from data.yaml" in ok.stdout
    refused = validate(POGONA_CLASS_NAMES="pogona_head")
    assert refused.returncode == 3 and "['lizard'] but POGONA_CLASS_NAMES is ['pogona_head']" in refused.stdout


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG")
    return buf.getvalue()


# --- the rules' exact sentences and edges (no images decoded: milliseconds) ----------------------------------


def test_an_unsupported_extension_lists_every_supported_one_in_order() -> None:
    assert _extension_problem("images/extra.gif") == Problem(
        "images/extra.gif",
        None,
        "extension",
        "images/extra.gif: unsupported or odd image extension; use one of "
        ".avif .bmp .dng .heic .heif .jp2 .jpeg .jpg .mpo .png .tif .tiff .webp",
    )


def test_images_sharing_a_stem_name_each_other_and_the_label_they_would_share() -> None:
    assert _duplicate_stem_problem("cam/a.png", ["cam/a.png", "cam/a.jpg"]) == Problem(
        "cam/a.png",
        None,
        "duplicate-stem",
        "cam/a.png: images a.jpg, a.png share one stem, so a single a.txt would label both",
    )


def test_an_image_over_the_pixel_limit_says_its_size_or_that_pillow_refused_it() -> None:
    assert _pixels_problem("big.png", 20000, 6000, 100_000_000) == Problem(
        "big.png",
        None,
        "image-pixels",
        "big.png: image is 20000x6000 px, over the limit of 100,000,000 pixels (POGONA_MAX_IMAGE_PIXELS)",
    )
    bomb = _pixels_problem("bomb.png", 0, 0, 1000)
    assert bomb.message == (
        "bomb.png: image is over twice Pillow's pixel limit, over the limit of 1,000 pixels (POGONA_MAX_IMAGE_PIXELS)"
    )


@pytest.mark.parametrize(
    ("content", "looks"),
    [
        ("0 0.5 0.5 0.2 0.2\n1 0.1 0.1 0.05 0.05\n", True),
        ("\n\n0 0.5 0.5 0.2 0.2\n\n", True),  # blank lines are not evidence either way
        ("".join(f"0 0.5 0.5 0.{i % 9 + 1} 0.1\n" for i in range(20)) + "read me\n", True),  # 20 lines are read
        ("".join(f"0 0.5 0.5 0.{i % 9 + 1} 0.1\n" for i in range(19)) + "read me\n", False),
        ("", False),
        ("\n  \n", False),
        ("0 0.5 0.5 0.2\n", False),  # four numbers
        ("0 0.5 0.5 0.2 0.2 7\n", False),  # six
        ("0 0.5 0.5 0.2 nan\n", False),
        ("images/a.jpg\nimages/b.jpg\n", False),  # a list file
        ("A dataset exported by a tool, 2024.\n", False),  # a README
    ],
)
def test_an_unpaired_text_file_is_a_lost_label_only_when_it_reads_like_one(
    tmp_path: Path, content: str, looks: bool
) -> None:
    path = tmp_path / "x.txt"
    path.write_text(content)
    assert _looks_like_labels(path) is looks


def test_a_label_file_with_a_byte_order_mark_or_stray_bytes_is_still_read_as_labels_or_not(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_bytes(b"\xef\xbb\xbf0 0.5 0.5 0.2 0.2\r\n")  # Windows tools write a BOM
    assert _looks_like_labels(path) is True
    path.write_bytes(b"0 0.5 0.5 0.2 0.2\nnotes: caf\xe9\n")  # Latin-1: not UTF-8, and not labels either
    assert _looks_like_labels(path) is False


def test_an_unreadable_text_file_does_not_read_like_labels(tmp_path: Path) -> None:
    assert _looks_like_labels(tmp_path / "gone.txt") is False
    assert _looks_like_labels(tmp_path) is False  # a folder


def test_a_label_file_counts_its_boxes_and_lists_each_bad_line_with_its_number(tmp_path: Path) -> None:
    path = tmp_path / "l.txt"
    path.write_text(
        "0 0.5 0.5 0.2 0.2\n\n0 0.3 0.3 0.1 0.1\n0 0.5 0.5 0.2 0.2\n2 0.5 0.5 0.2 0.2\n0 0.5000000001 0.5 0.2 0.2\n"
    )
    boxes, problems = check_label(path, "labels/l.txt", ["a", "b"])
    assert boxes == 2
    assert problems == [
        Problem("labels/l.txt", 4, "duplicate-box", "labels/l.txt line 4: repeats the box on line 1"),
        Problem(
            "labels/l.txt",
            5,
            "class-id",
            "labels/l.txt line 5: class id 2 is not valid: valid ids are 0-1 (names 'a', 'b')",
        ),
        Problem("labels/l.txt", 6, "duplicate-box", "labels/l.txt line 6: repeats the box on line 1"),  # to 1e-6
    ]


def test_a_label_file_stops_at_the_line_limit_with_one_problem(tmp_path: Path) -> None:
    path = tmp_path / "l.txt"
    path.write_text("".join(f"0 0.5 0.5 0.{i + 1} 0.1\n" for i in range(4)))
    assert check_label(path, "l.txt", ["a"], max_lines=4) == (4, [])
    assert check_label(path, "l.txt", ["a"], max_lines=3) == (
        3,
        [Problem("l.txt", 4, "label-lines", "l.txt line 4: more than 3 lines (POGONA_MAX_LABEL_LINES); not read on")],
    )
    path.write_text("".join(f"0 0.5 0.5 0.{i + 1} 0.1\n" for i in range(4)) + "\n" * 2000)
    big = check_label(path, "l.txt", ["a"], max_lines=1500)[1]
    assert [(p.line, p.message) for p in big] == [
        (1501, "l.txt line 1501: more than 1,500 lines (POGONA_MAX_LABEL_LINES); not read on")
    ]


def test_an_overlong_label_line_is_one_problem_and_the_next_line_is_read(tmp_path: Path) -> None:
    path = tmp_path / "l.txt"
    path.write_text("0 0.5 0.5 0.2 0.2" + " 0" * 5000 + "\n0 0.3 0.3 0.1 0.1\n")
    boxes, problems = check_label(path, "l.txt", ["a"])
    assert boxes == 1 and [(p.line, p.kind) for p in problems] == [(1, "malformed-line")]
    path.write_text("0 0.5 0.5 0.2 0.2" + " " * 5000 + "\n0 0.3 0.3 0.1 0.1\n")  # a valid box, padded
    assert check_label(path, "l.txt", ["a"]) == (2, [])


def test_stray_bytes_in_a_label_file_are_a_problem_on_their_line_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "l.txt"
    path.write_bytes(b"\xef\xbb\xbf0 0.5 0.5 0.2 0.2\r\n0 0.5 0.5 0.2 0.2\xe9\n0 0.3 0.3 0.1 0.1\n")
    boxes, problems = check_label(path, "l.txt", ["a"])
    assert boxes == 2
    assert problems == [Problem("l.txt", 2, "malformed-line", "l.txt line 2: '0.2\ufffd' is not a number")]


def test_a_label_file_that_cannot_be_opened_is_one_problem_saying_why(tmp_path: Path) -> None:
    assert check_label(tmp_path / "missing.txt", "labels/missing.txt", ["a"]) == (
        0,
        [
            Problem(
                "labels/missing.txt",
                None,
                "unreadable",
                "labels/missing.txt: label file cannot be read (No such file or directory)",
            )
        ],
    )


@pytest.mark.parametrize(
    ("names", "says"),
    [
        ([], "no classes are configured"),
        (["a"], "the only valid id is 0 (name 'a')"),
        (["a", "b", "c", "d"], "valid ids are 0-3 (names 'a', 'b', 'c', 'd')"),
        (["a", "b", "c", "d", "e"], "valid ids are 0-4 (names 'a', 'b' ... 'e')"),
    ],
)
def test_the_valid_ids_are_said_in_full_up_to_four_names(names: list[str], says: str) -> None:
    assert valid_ids(names) == says


OUTSIDE = "is outside [0, 1] (coordinates are normalised to the image)"


@pytest.mark.parametrize(
    ("line", "kind", "says"),
    [
        ("0 0.5 0.5 0.2", "malformed-line", "expected 5 values (class x_center y_center width height), found 4"),
        ("0 0.5 x 0.2 0.2", "malformed-line", "'x' is not a number"),
        ("0 0.5 0.5 0.2 inf", "malformed-line", "'inf' is not a number"),
        ("0 0.5 0.5 0.2 -inf", "malformed-line", "'-inf' is not a number"),
        ("1.5 0.5 0.5 0.2 0.2", "class-id", "class id 1.5 is not a whole number"),
        ("2 0.5 0.5 0.2 0.2", "class-id", "class id 2 is not valid: valid ids are 0-1 (names 'a', 'b')"),
        ("0 0.5 0.5 0 0.2", "size", "box width and height must be positive, found width=0 height=0.2"),
        ("0 0.5 0.5 0.2 -1e-9", "size", "box width and height must be positive, found width=0.2 height=-1e-9"),
        ("0 -0.01 0.5 0.2 0.2", "coords", f"x_center=-0.01 {OUTSIDE}"),
        ("0 0.5 1.01 0.2 0.2", "coords", f"y_center=1.01 {OUTSIDE}"),
        ("0 0.5 0.5 1.5 0.2", "coords", f"width=1.5 {OUTSIDE}"),
        ("0 0.5 0.5 0.2 1.0000011", "coords", f"height=1.0000011 {OUTSIDE}"),
    ],
)
def test_each_bad_label_line_says_what_is_wrong_with_it(line: str, kind: str, says: str) -> None:
    values, problem = parse_line(line, "l.txt", 7, ["a", "b"])
    assert values is None and problem == Problem("l.txt", 7, kind, f"l.txt line 7: {says}")


def test_a_coordinate_exactly_at_the_rounding_tolerance_is_valid() -> None:
    for edge in (-1e-6, 1 + 1e-6):
        for i in range(1, 5):
            fields = ["0", "0.5", "0.5", "0.2", "0.2"]
            fields[i] = repr(edge) if edge > 0 or i < 3 else fields[i]  # a size is positive: only 1 + 1e-6 there
            assert parse_line(" ".join(fields), "l.txt", 1, ["a"])[1] is None, fields


def test_a_good_label_line_gives_its_five_values() -> None:
    assert parse_line("1 0.5 0.25 1.0000009 0.125\n", "l.txt", 1, ["a", "b"]) == (
        (1.0, 0.5, 0.25, 1.0000009, 0.125),
        None,
    )
    assert parse_line("0 0 1 1 1e-3", "l.txt", 1, ["a"]) == ((0.0, 0.0, 1.0, 1.0, 0.001), None)


def _items(*splits: str | None, boxes: int = 1) -> list[ImageItem]:
    return [ImageItem(Path(f"{i}.jpg"), None, f"{i}.jpg", "visible", boxes, s) for i, s in enumerate(splits)]


def test_an_export_split_needs_one_train_image_and_the_minimum_of_val_images(tmp_path: Path) -> None:
    found = Scan(images=["a.jpg"])
    assert _dataset_problems(tmp_path, found, _items("train", "val", "val"), 2) == []
    assert _dataset_problems(tmp_path, found, _items("train", "val", "val", "val"), 3) == []
    (short,) = _dataset_problems(tmp_path, found, _items("train", "train", "val"), 2)
    assert short == Problem(
        ".",
        None,
        "too-few-images",
        "only 2 valid train and 1 valid val images: at least 1 train and 2 val images are needed",
        fatal=True,
    )
    (no_train,) = _dataset_problems(tmp_path, found, _items("val", "val", "test"), 2)
    assert no_train.message.startswith("only 0 valid train and 2 valid val images")


def test_without_an_export_split_one_image_more_than_the_val_minimum_is_needed(tmp_path: Path) -> None:
    found = Scan(images=["a.jpg"])
    assert _dataset_problems(tmp_path, found, _items(None, None, "train"), 2) == []
    (short,) = _dataset_problems(tmp_path, found, _items(None, "train", "test", "test"), 2)
    assert short == Problem(
        ".",
        None,
        "too-few-images",
        "only 2 valid images: at least 3 are needed to hold out 2 for validation and train on the rest",
        fatal=True,
    )


def test_a_dataset_without_one_box_or_one_image_is_fatal(tmp_path: Path) -> None:
    (no_boxes,) = _dataset_problems(tmp_path, Scan(images=["a.jpg"]), _items(None, None, None, boxes=0), 2)
    assert no_boxes == Problem(
        ".",
        None,
        "no-labels",
        "none of the 3 valid images has a box: label files are missing or empty (labels go in labels/ mirroring "
        "images/, or beside each image, same stem, .txt)",
        fatal=True,
    )
    (empty,) = _dataset_problems(tmp_path, Scan(), [], 2)
    ok = " ".join(sorted(SUPPORTED_EXTENSIONS))
    assert empty == Problem(".", None, "empty-dataset", f"no images found under {tmp_path} ({ok})", fatal=True)
    refused_only = _dataset_problems(tmp_path, Scan(unsupported=["a.gif"]), [], 2)  # an image, if one it refuses
    assert [p.kind for p in refused_only] == ["too-few-images"]


@pytest.mark.parametrize(
    ("text", "number"),
    [
        *[("0", True), ("-0.5", True), ("1e-3", True), (".5", True), ("1_0", True)],
        *[("nan", False), ("NaN", False), ("inf", False), ("-inf", False), ("Infinity", False), ("1e999", False)],
        *[("0x1", False), ("", False), ("five", False)],
    ],
)
def test_a_number_in_a_label_line_is_a_finite_float(text: str, number: bool) -> None:
    assert _is_number(text) is number


def test_a_last_line_without_a_newline_is_read() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "l.txt"
        path.write_text("0 0.3 0.3 0.1 0.1\n0 0.5 0.5 0.2 0.2")
        assert check_label(path, "l.txt", ["a"]) == (2, [])


def test_a_line_of_exactly_the_read_size_is_one_line_and_the_next_is_read(tmp_path: Path) -> None:
    line = "0 0.5 0.5 0.2 0.2".ljust(4095) + "\n"  # 4,096 characters with its newline: read in one piece
    path = tmp_path / "l.txt"
    path.write_text(line + "0 0.3 0.3 0.1 0.1\n")
    assert check_label(path, "l.txt", ["a"]) == (2, [])


def test_boxes_equal_to_a_millionth_are_duplicates_and_finer_differences_do_not_count(tmp_path: Path) -> None:
    path = tmp_path / "l.txt"
    path.write_text("0 0.5 0.5 0.2 0.2\n0 0.5000004 0.5 0.2 0.2\n0 0.500001 0.5 0.2 0.2\n")
    boxes, problems = check_label(path, "l.txt", ["a"])
    assert boxes == 2 and [(p.line, p.kind) for p in problems] == [(2, "duplicate-box")]
