"""Modality: declared first, then names, then pixels that may say "unknown" and never guess."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pogona_job.dataset import Options, inspect_dataset, pixel_modality, stage_dataset
from pogona_job.dataset.modality import GREY_SENTENCE, Verdict, glob_regex, judge, parse_rules
from pogona_job.tools.demo import write_demo
from tests.fixtures.files import BOX, CLASSES, flat_dataset, image, inspect, text
from tests.fixtures.modality_set import measure, write_modality_set


def _modalities(root: Path, **options: str) -> dict[str, tuple[str, str]]:
    inv = inspect_dataset(root, CLASSES, Options(**options))  # type: ignore[arg-type]
    return {it.rel: (it.modality, it.modality_source) for it in inv.items}


# --- declared, named ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("glob", "path", "matches"),
    [
        ("**/flir/**", "flir/a.jpg", True),
        ("**/flir/**", "site/FLIR/day1/a.jpg", True),
        ("**/flir/**", "flirt/a.jpg", False),
        ("**/IR_*", "IR_0001.jpg", True),
        ("**/IR_*", "cam/IR_0001.jpg", True),
        ("**/IR_*", "cam/AIR_0001.jpg", False),
        ("images/*.png", "images/sub/a.png", False),
        ("images/?.png", "images/a.png", True),
    ],
)
def test_modality_globs_match_whole_path_segments(glob: str, path: str, matches: bool) -> None:
    assert bool(glob_regex(glob).match(path)) is matches


def test_rules_are_parsed_per_modality_and_bad_ones_refused() -> None:
    rules = parse_rules("thermal=**/flir/**,**/IR_*;visible=**/rgb/**")
    assert [m for m, _ in rules] == ["thermal", "thermal", "visible"]
    for bad in ("thermal", "sonar=**/x", "visible="):
        with pytest.raises(ValueError, match="modality=glob"):
            parse_rules(bad)


def test_declared_beats_named_beats_pixels(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds")  # colourful textured images: visible by their pixels
    for rel in ("flir/a.jpg", "IR_0001.jpg", "cam-thermal-2/b.jpg", "rgb/c.jpg", "fair_weather.jpg", "csv/d.jpg"):
        image(root / rel)
    image(root / "side" / "e.jpg")
    text(root / "side" / "modality.txt", "thermal\n")
    text(root / "groups.csv", "path,group,modality\ncsv/d.jpg,g1,thermal\n")
    found = _modalities(root, modality_rules="visible=**/flir/**")
    assert found["flir/a.jpg"] == ("visible", "declared")  # the rule beats the folder name
    assert found["csv/d.jpg"] == ("thermal", "declared")  # groups.csv column
    assert found["side/e.jpg"] == ("thermal", "declared")  # sidecar
    assert found["IR_0001.jpg"] == found["cam-thermal-2/b.jpg"] == ("thermal", "pattern")
    assert found["rgb/c.jpg"] == ("visible", "pattern")
    assert found["fair_weather.jpg"] == ("visible", "inferred")  # "ir" inside a word is not a hint
    assert _modalities(root)["flir/a.jpg"] == ("thermal", "pattern")


def test_the_staged_dataset_counts_how_each_modality_was_decided(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds", n=3)
    for i in range(3):
        image(root / "flir" / f"f{i}.jpg")
        text(root / "flir" / f"f{i}.txt", BOX)
    grey = np.full((24, 24), 90, np.uint8) + np.arange(24, dtype=np.uint8)[None, :]
    (root / "g").mkdir()
    Image.fromarray(grey, "L").save(root / "g" / "grey.png")
    staged = stage_dataset(inspect(root), tmp_path / "s", CLASSES)
    assert staged.modality_sources == {
        "thermal": {"declared": 0, "pattern": 3, "inferred": 0, "unknown": 0},
        "unknown": {"declared": 0, "pattern": 0, "inferred": 0, "unknown": 1},  # grey: no evidence either way
        "visible": {"declared": 0, "pattern": 0, "inferred": 3, "unknown": 0},
    }


# --- pixels -------------------------------------------------------------------------------------


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


COLORMAPS = ["INFERNO", "JET", "TURBO", "HOT", "MAGMA", "PLASMA", "VIRIDIS", "RAINBOW", "PARULA"]


@pytest.mark.parametrize("name", COLORMAPS)
def test_palette_coloured_thermal_images_are_recognised(name: str) -> None:
    bgr = cv2.applyColorMap(_thermal_scene(), getattr(cv2, f"COLORMAP_{name}"))
    assert pixel_modality(_jpeg_roundtrip(Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1])))) == "thermal"


@pytest.mark.parametrize("name", ["BONE", "OCEAN", "WINTER", "AUTUMN", "PINK"])
def test_a_palette_the_job_does_not_know_is_unknown_not_visible(name: str) -> None:
    bgr = cv2.applyColorMap(_thermal_scene(), getattr(cv2, f"COLORMAP_{name}"))
    assert pixel_modality(_jpeg_roundtrip(Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1])))) == "unknown"


def test_grey_is_unknown_in_any_8_bit_channel_layout_and_16_bit_data_is_thermal() -> None:
    """Equal channels are evidence of grey, not of thermal: a greyscale photo looks the same."""
    grey = _thermal_scene()
    for im in (Image.fromarray(grey, "L"), _jpeg_roundtrip(Image.fromarray(np.dstack([grey] * 3), "RGB"))):
        verdict = judge(im)
        assert verdict.modality == "unknown" and "grey" in verdict.evidence
    radiometric = judge(Image.fromarray(grey.astype(np.int32) * 200, "I"))
    top = int(grey.max()) * 200
    assert radiometric == Verdict("thermal", f"16-bit single channel (values up to {top}): radiometric data")
    assert pixel_modality(Image.fromarray(grey.astype(np.int32), "I")) == "unknown"  # 8-bit values in a 32-bit image


def _grey_jpeg(make: str | None = None, app1: bytes | None = None) -> Image.Image:
    """A grey frame as a JPEG file, with an EXIF Make or a raw APP1 segment as a camera writes them."""
    im, buf = Image.fromarray(np.dstack([_thermal_scene()] * 3), "RGB"), io.BytesIO()
    exif = Image.Exif()
    if make is not None:
        exif[0x010F], exif[0x0110] = make, "T540"
    im.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    data = buf.getvalue()
    if app1 is not None:  # right after the SOI marker, where FLIR's firmware puts it
        data = data[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + data[2:]
    return Image.open(io.BytesIO(data))


def test_a_thermal_cameras_own_metadata_makes_even_a_grey_frame_thermal() -> None:
    by_make = judge(_grey_jpeg("FLIR Systems AB"))
    assert by_make == Verdict(
        "thermal", "camera metadata: EXIF Make 'FLIR Systems AB' (model T540) builds thermal cameras only"
    )
    assert judge(_grey_jpeg(app1=b"FLIR\x00\x01\x01" + bytes(64))).evidence.startswith("FLIR radiometric metadata")
    assert judge(_grey_jpeg("Seek Thermal")).modality == "thermal"
    # A maker of ordinary cameras, or one that makes both kinds, proves nothing: grey stays unknown.
    for make in ("Canon", "DJI", None):
        assert judge(_grey_jpeg(make)).modality == "unknown", make
    assert judge(_grey_jpeg(app1=b"Exif\x00\x00" + bytes(16))).modality == "unknown"  # an APP1 that is not FLIR's


def test_the_dataset_scan_reads_the_camera_metadata_from_the_file(tmp_path: Path) -> None:
    """Through inspect_dataset, which decodes a JPEG at reduced scale: the metadata must survive that."""
    root = flat_dataset(tmp_path / "ds", n=2)
    _grey_jpeg("FLIR Systems AB").save(root / "images" / "img0.jpg", exif=_grey_jpeg("FLIR Systems AB").getexif())
    _grey_jpeg("Canon").save(root / "images" / "img1.jpg", exif=_grey_jpeg("Canon").getexif())
    assert _modalities(root) == {"images/img0.jpg": ("thermal", "inferred"), "images/img1.jpg": ("unknown", "unknown")}


def test_the_grey_sentence_says_what_the_pixels_cannot_tell_and_how_to_declare_it() -> None:
    assert "cannot tell a greyscale visible image from a greyscale thermal one" in GREY_SENTENCE
    for way in ("POGONA_MODALITY_RULES", "groups.csv", "modality.txt"):
        assert way in GREY_SENTENCE


def test_a_colourful_photograph_is_visible() -> None:
    rng = np.random.default_rng(0)
    scene = rng.integers(0, 255, (6, 6, 3)).astype(np.uint8)
    photo = Image.fromarray(scene, "RGB").resize((96, 96), Image.Resampling.BICUBIC)
    noisy = np.asarray(photo, np.float32) + rng.normal(0, 6, (96, 96, 3))
    assert pixel_modality(_jpeg_roundtrip(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))) == "visible"


def test_the_demo_images_are_never_misjudged_and_only_grey_ones_are_unknown(tmp_path: Path) -> None:
    truth = write_demo(tmp_path / "big", n_images=120, size=160, seed=0)
    found = {it.rel: it.modality for it in inspect(tmp_path / "big").items}
    wrong = {rel: (truth[rel], m) for rel, m in found.items() if m not in (truth[rel], "unknown")}
    assert wrong == {}
    assert all(m == "visible" for rel, m in found.items() if truth[rel] == "visible")
    palette = [rel for rel in truth if truth[rel] == "thermal" and not _is_grey(tmp_path / "big" / rel)]
    assert sum(found[rel] == "thermal" for rel in palette) >= 0.7 * len(palette)


def _is_grey(path: Path) -> bool:
    px = np.asarray(Image.open(path).convert("RGB"), dtype=int)
    return bool(np.abs(px - px.mean(axis=2, keepdims=True)).max() <= 6)


@pytest.fixture(scope="module")
def hard_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("modality-set")
    return root, write_modality_set(root, n=240, seed=0)


def test_the_hard_set_imitates_camera_output(hard_set: tuple[Path, dict[str, str]]) -> None:
    root, truth = hard_set
    styles = {name.split("_", 1)[1][:-4] for name in truth}
    assert len(truth) >= 200 and list(truth.values()).count("thermal") == len(truth) // 2
    assert {"ironbow", "rainbow", "grey", "grass", "straw", "sand_sky", "brown", "colourful"} <= styles
    with Image.open(root / next(iter(truth))) as im:
        assert im.format == "JPEG" and min(im.size) >= 192


def test_on_the_hard_set_answers_are_right_and_a_photo_is_never_called_thermal(
    hard_set: tuple[Path, dict[str, str]],
) -> None:
    result = measure(*hard_set)
    assert result["visible_called_thermal"] == 0
    assert result["accuracy_of_answers"] >= 0.98
    by_style: Counter[tuple[str, str]] = result["by_style"]  # type: ignore[assignment]
    grey = sum(n for (style, _), n in by_style.items() if style == "grey")
    assert by_style[("grey", "unknown")] == grey  # grey thermal frames: no evidence, so unknown
    assert result["answered"] >= 0.8 * (result["images"] - grey)  # "unknown" is allowed, not a way out
