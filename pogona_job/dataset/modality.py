"""Thermal or visible? Declared first, matched by name next, inferred from pixels only when sure.

Order of precedence (the first that answers wins; dataset/README.md documents it):
1. POGONA_MODALITY_RULES: globs per modality, e.g. `thermal=**/flir/**,**/IR_*;visible=**/rgb/**`;
2. a `modality` column in groups.csv, or a `modality.txt` sidecar (one word) in a folder;
3. folder and file names: `thermal`, `flir`, `IR_...` / `rgb`, `visible` ...;
4. the pixels, which may answer "unknown" and never guess.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath

import numpy as np
import numpy.typing as npt
from PIL import Image

DEFAULT_THERMAL_PATTERN = r"therm|infra-?red|flir|lwir|(?<![a-z])ir(?![a-z])"
DEFAULT_VISIBLE_PATTERN = r"(?<![a-z])(rgb|visible|vis|daylight|colou?r)(?![a-z])"
SIDECAR = "modality.txt"


# --------------------------------------------------------------------------------------
# Declared and named
# --------------------------------------------------------------------------------------


def parse_rules(text: str) -> list[tuple[str, re.Pattern[str]]]:
    """`thermal=**/flir/**,**/IR_*;visible=**/rgb/**` -> [(modality, compiled glob)], in order."""
    rules = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        modality, sep, globs = part.partition("=")
        modality = modality.strip().lower()
        if not sep or modality not in ("thermal", "visible") or not globs.strip():
            raise ValueError(f"{part!r}: write modality=glob[,glob...] with modality thermal or visible")
        rules += [(modality, glob_regex(g.strip())) for g in globs.split(",") if g.strip()]
    return rules


@lru_cache(maxsize=256)
def glob_regex(glob: str) -> re.Pattern[str]:
    """A path glob as a regex: `**/` any folders (or none), `*` within one name, `?` one character."""
    out, i = "", 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif glob.startswith("**", i):
            out, i = out + ".*", i + 2
        elif glob[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif glob[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(glob[i]), i + 1
    return re.compile(out + r"\Z", re.IGNORECASE)


def by_rules(rel: str, rules: list[tuple[str, re.Pattern[str]]]) -> str | None:
    return next((modality for modality, rx in rules if rx.match(rel)), None)


def by_sidecar(rel: str, sidecars: dict[str, str]) -> str | None:
    """The nearest `modality.txt` in the image's folder or above it."""
    folder = sidecar_folder(rel, sidecars)
    return None if folder is None else sidecars[folder]


def sidecar_folder(rel: str, sidecars: dict[str, str]) -> str | None:
    """The folder of the nearest `modality.txt` that applies to the image."""
    return next((p.as_posix() for p in PurePosixPath(rel).parents if p.as_posix() in sidecars), None)


def by_name(rel: str, thermal: re.Pattern[str], visible: re.Pattern[str]) -> str | None:
    """The file name first, then its folders from the nearest up: the closest hint wins."""
    for part in reversed(PurePosixPath(rel).parts):
        stem = PurePosixPath(part).stem
        if thermal.search(stem):
            return "thermal"
        if visible.search(stem):
            return "visible"
    return None


# --------------------------------------------------------------------------------------
# Per-image answers: modality.csv and thumbnails
# --------------------------------------------------------------------------------------

CSV_NAME = "modality.csv"
CSV_COLUMNS = ("path", "modality", "source", "evidence")
GREY_SENTENCE = (
    "The pixel rule cannot tell a greyscale visible image from a greyscale thermal one (equal channels "
    "are evidence of grey, not of thermal): such images are `unknown` unless declared with "
    "POGONA_MODALITY_RULES (e.g. `thermal=**/flir/**`), a `modality` column in groups.csv, or a "
    "`modality.txt` sidecar in their folder."
)


@dataclass(frozen=True)
class ModalityRecord:
    """One image's modality as the user can check it: what was decided, how, and on what evidence."""

    path: str  # relative to the dataset root, as in the split lists
    modality: str  # thermal | visible | unknown
    source: str  # declared | pattern | inferred | unknown
    evidence: str  # the rule, file, name or pixel evidence behind the answer


def modality_csv(records: Iterable[ModalityRecord]) -> str:
    """The text of modality.csv: a header, then one row per image, sorted by path."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in sorted(records, key=lambda r: r.path):
        writer.writerow([r.path, r.modality, r.source, r.evidence])
    return buf.getvalue()


def read_modality_csv(text: str) -> list[ModalityRecord]:
    rows = list(csv.DictReader(io.StringIO(text)))
    return [ModalityRecord(r["path"], r["modality"], r["source"], r["evidence"]) for r in rows]


def contact_sheets(
    records: Iterable[ModalityRecord],
    image_of: Mapping[str, Path],
    dest: Path,
    *,
    per_modality: int = 8,
    side: int = 96,
) -> dict[str, Path]:
    """One PNG strip per modality of images whose modality came from their pixels (inferred or unknown):
    `modality-thermal.png`, `modality-visible.png`, `modality-unknown.png` under dest, each with up to
    `per_modality` thumbnails, evenly spread over the sorted paths. {modality: path of its sheet}.
    """
    by_modality: dict[str, list[ModalityRecord]] = {}
    for r in sorted(records, key=lambda r: r.path):
        if r.source in ("inferred", "unknown") and r.path in image_of:
            by_modality.setdefault(r.modality, []).append(r)
    dest.mkdir(parents=True, exist_ok=True)
    sheets = {}
    for name, rows in sorted(by_modality.items()):
        step = max(1, len(rows) // per_modality)
        chosen = rows[::step][:per_modality]
        sheet = Image.new("RGB", (side * len(chosen), side), (255, 255, 255))
        for i, r in enumerate(chosen):
            with Image.open(image_of[r.path]) as im:
                im.draft("RGB", (side, side))
                thumb = im.convert("RGB")
                thumb.thumbnail((side, side))
                sheet.paste(thumb, (i * side + (side - thumb.width) // 2, (side - thumb.height) // 2))
        sheets[name] = dest / f"modality-{name}.png"
        sheet.save(sheets[name])
    return sheets


# --------------------------------------------------------------------------------------
# Pixels: thermal only on positive evidence
# --------------------------------------------------------------------------------------


def _points(text: str) -> list[tuple[int, int, int]]:
    """ "0 4 13, 1 1 40" -> [(0, 4, 13), (1, 1, 40)]."""
    rgb = [tuple(int(v) for v in part.split()) for part in text.split(",")]
    return [(r, g, b) for r, g, b in rgb]


# Colour maps thermal cameras and thermal software ship, cold to hot, as control points. Spectra is
# sampled from the palette bar of a Seek Compact XR export; ironbow ... arctic are approximations of
# the published swatches of FLIR / InfiRay / Hikmicro palettes; the rest are OpenCV's colour maps.
_CONTROL_POINTS: dict[str, list[tuple[int, int, int]]] = {
    "spectra": _points(
        "0 4 13, 1 1 40, 1 6 64, 0 10 92, 1 14 109, 4 33 144, 3 60 179, 6 77 205, 0 103 236, "
        "2 115 231, 0 121 202, 1 131 152, 1 143 101, 2 152 52, 4 162 6, 51 178 4, 104 195 10, "
        "150 207 2, 187 221 8, 223 235 4, 253 248 15, 250 213 3, 252 175 11, 248 142 3, 251 99 8, "
        "250 60 5, 246 38 7, 253 75 65, 253 118 115, 251 156 154, 253 194 192, 250 229 225, "
        "250 253 245"
    ),
    "ironbow": [(0, 0, 0), (20, 0, 80), (90, 0, 150), (170, 20, 120), (225, 70, 20), (250, 160, 0), (255, 240, 160)],
    "rainbow": [(0, 0, 40), (0, 0, 200), (0, 170, 230), (0, 200, 60), (230, 230, 0), (255, 120, 0), (230, 0, 0)],
    "rainbow_hc": _points("10 10 10, 90 0 160, 0 60 255, 0 220 255, 0 230 0, 255 255 0, 255 0 0, 255 255 255"),
    "lava": [(0, 0, 0), (0, 30, 120), (90, 0, 130), (200, 0, 40), (255, 120, 0), (255, 230, 60), (255, 255, 255)],
    "arctic": [(0, 0, 60), (0, 60, 180), (60, 160, 230), (180, 100, 200), (255, 150, 60), (255, 220, 120)],
}
_OPENCV_MAPS = ("jet", "turbo", "inferno", "magma", "plasma", "hot", "rainbow_cv", "parula", "viridis")
_LUT_SIZE = 128
_ON_PALETTE = 32.0  # RGB distance within which a pixel counts as a palette colour (JPEG noise, blending)
_PALETTE_FIT = 0.9  # share of pixels on one palette for "thermal" (overlays and blended edges are the rest)
_PALETTE_SPAN = 0.2  # ... spread over at least this share of the palette (its 5th to 95th percentile)
_PALETTE_BINS = 3  # ... and over at least 3 of its 8 stretches (2% of the pixels each)
_BAR_SPAN = 0.6  # a palette bar shows most of its palette, in order
_SAMPLE_SIDE = 64  # colour statistics on 64x64 sampled pixels
_CLUSTERS = 12


def _palette_luts() -> dict[str, npt.NDArray[np.float32]]:
    luts = {}
    x = np.linspace(0, 1, _LUT_SIZE)
    for name, points in _CONTROL_POINTS.items():
        p = np.array(points, np.float32)
        at = np.linspace(0, 1, len(p))
        luts[name] = np.stack([np.interp(x, at, p[:, c]) for c in range(3)], axis=1).astype(np.float32)
    try:
        import cv2
    except ImportError:  # pragma: no cover - ultralytics always brings OpenCV
        return luts
    ramp = np.linspace(0, 255, _LUT_SIZE).astype(np.uint8).reshape(-1, 1)
    for name in _OPENCV_MAPS:
        code = getattr(cv2, f"COLORMAP_{name.removesuffix('_cv').upper()}")
        luts[name] = np.asarray(cv2.applyColorMap(ramp, code)[:, 0, ::-1], np.float32)
    return luts


PALETTES = _palette_luts()

Rgb = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Verdict:
    """What the pixels say, and why: `evidence` is one phrase a person can check against the image."""

    modality: str  # "thermal" | "visible" | "unknown"
    evidence: str


def pixel_modality(image: Image.Image) -> str:
    """ "thermal", "visible", or "unknown" when the pixels hold no positive evidence either way."""
    return judge(image).modality


def judge(image: Image.Image) -> Verdict:
    """Thermal only on positive evidence; grey is not evidence; a photo needs shading-dominated colour.

    Thermal: a thermal camera's own metadata (`camera_evidence`), 16-bit single-channel data
    (radiometric), a palette bar along an edge whose colours run
    through a known thermal colour map in order, or a frame whose colours lie on one known colour map
    (most of it, and over a good part of the map). Three equal channels (or one 8-bit channel) is
    "grey": a white-hot thermal frame, a greyscale-converted photo, a document scan and a near-infrared
    camera look alike, so the answer is "unknown". Visible: colours that fill a volume, or change
    mostly by shading (brightness changes, chromaticity stays), and match no palette.
    """
    camera = camera_evidence(image)
    if camera:  # before the pixels: a white-hot frame from a FLIR is grey, and still thermal
        return Verdict("thermal", camera)
    bands = [b for b in image.getbands() if b != "A"]
    if len(bands) == 1 and image.mode != "P":
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            extrema = image.getextrema()
            hi = float(extrema[1]) if isinstance(extrema[1], int | float) else 0.0
            if hi > 255:
                return Verdict("thermal", f"16-bit single channel (values up to {hi:.0f}): radiometric data")
        return Verdict("unknown", "one grey channel: a grey thermal frame and a greyscale photo look alike")
    rgb_image = image.convert("RGB")
    sample = np.asarray(rgb_image.resize((_SAMPLE_SIDE, _SAMPLE_SIDE), Image.Resampling.NEAREST), np.float32)
    pixels = sample.reshape(-1, 3)
    spread_px = pixels.max(axis=1) - pixels.min(axis=1)
    if float(np.median(spread_px)) <= 4.0 and float(np.mean(spread_px > 20)) < 0.05:
        return Verdict("unknown", "equal channels (grey): a grey thermal frame and a greyscale photo look alike")
    bar = palette_bar(np.asarray(rgb_image, np.float32))
    if bar:
        return Verdict("thermal", bar)
    fits = on_palettes(pixels)
    fit = palette_fit(fits)
    if fit:
        return Verdict("thermal", fit)
    near = nearest_palette(fits)
    e = evidence_of(pixels, np.asarray(rgb_image.resize((64, 64), Image.Resampling.BILINEAR), np.float32))
    curve_like = e.coloured >= 0.3 and ((e.curve <= 0.2 and e.chroma >= 0.75) or (e.curve <= 0.04 and e.chroma >= 0.4))
    photo = (e.chroma <= 0.5 and e.curve >= 0.05) or e.curve >= 0.3
    numbers = f"curve residual {e.curve:.2f}, chroma change per brightness change {e.chroma:.2f}"
    if near[1] >= 0.8:
        return Verdict("unknown", f"{near[1]:.0%} of the pixels on the {near[0]} palette, but over too little of it")
    if photo and not curve_like:
        return Verdict("visible", f"colours of a photograph: on no palette, change mostly by shading ({numbers})")
    why = "colours on one curve like an unlisted palette" if curve_like else "no palette and no clear photograph"
    return Verdict("unknown", f"{why} ({numbers})")


# EXIF makers that build only thermal cameras. A maker of both kinds (DJI's H20T, a phone with a thermal
# add-on) proves nothing by its name, so it is not here.
THERMAL_MAKERS = ("flir", "seek thermal", "infiray", "hikmicro", "guide sensmart", "workswell", "optris")
_EXIF_MAKE, _EXIF_MODEL = 0x010F, 0x0110


def camera_evidence(image: Image.Image) -> str:
    """The camera's word that a frame is thermal, else "": FLIR's radiometric APP1 segment (every FLIR
    R-JPEG carries it), or an EXIF Make of a maker in THERMAL_MAKERS. Read from the file as opened,
    so the caller passes the image before any convert()."""
    for marker, payload in getattr(image, "applist", None) or []:
        if marker == "APP1" and payload.startswith(b"FLIR\x00"):
            return "FLIR radiometric metadata (the file's APP1 'FLIR' segment)"
    try:
        exif = image.getexif()
    except Exception:  # a broken EXIF block is no evidence either way; the pixels still answer
        return ""
    make, model = (str(exif.get(tag, "")).strip().strip("\x00") for tag in (_EXIF_MAKE, _EXIF_MODEL))
    if make and any(maker in make.lower() for maker in THERMAL_MAKERS):
        return f"camera metadata: EXIF Make {make!r} (model {model or 'not given'}) builds thermal cameras only"
    return ""


def _nearest_on(pixels: Rgb, lut: Rgb) -> tuple[Rgb, npt.NDArray[np.intp]]:
    """Each pixel's distance to the palette and its position on it (index into the LUT)."""
    d2 = (pixels**2).sum(axis=1)[:, None] - 2 * pixels @ lut.T + (lut**2).sum(axis=1)[None, :]
    at = np.argmin(d2, axis=1)
    distance: Rgb = np.sqrt(np.maximum(d2[np.arange(len(pixels)), at], 0.0))
    return distance, at


PaletteFits = dict[str, tuple[Rgb, npt.NDArray[np.intp]]]


def on_palettes(pixels: Rgb) -> PaletteFits:
    """Every pixel's distance to each known palette and its position on it, computed once per image for both
    questions asked of them (does one palette fit, which palette is nearest)."""
    return {name: _nearest_on(pixels, lut) for name, lut in PALETTES.items()}


def palette_fit(fits: PaletteFits) -> str:
    """The evidence when the colours lie on one known palette over a good part of it, else ""."""
    best = ("", 0.0, 0.0)
    for name, (distance, at) in fits.items():
        on = distance <= _ON_PALETTE
        share = float(on.mean())
        if share < _PALETTE_FIT:
            continue
        lo, hi = np.percentile(at[on], [5, 95]) / (_LUT_SIZE - 1)
        # Several stretches of the map in use, not one end (a white subject on black fits many maps' ends).
        used = np.bincount(at[on] * 8 // _LUT_SIZE, minlength=8) >= 0.02 * on.sum()
        if hi - lo >= _PALETTE_SPAN and used.sum() >= _PALETTE_BINS and share > best[1]:
            best = (name, share, hi - lo)
    name, share, span = best
    if not name:
        return ""
    return f"{share:.0%} of the pixels on the {name} palette, over {span:.0%} of its range"


def nearest_palette(fits: PaletteFits) -> tuple[str, float]:
    """The palette most pixels lie on, and their share."""
    shares = {name: float((distance <= _ON_PALETTE).mean()) for name, (distance, _) in fits.items()}
    name = max(shares, key=lambda n: shares[n])
    return name, shares[name]


def palette_bar(rgb: Rgb) -> str:
    """The evidence when a thin strip along an edge runs through a known palette in order, else ""."""
    h, w = rgb.shape[:2]
    if min(h, w) < 48:
        return ""
    strips = []
    for edge in ("left", "right", "top", "bottom"):
        along = rgb if edge in ("left", "right") else rgb.transpose(1, 0, 2)
        n = along.shape[1]
        inner = max(3, n // 25)  # the scene just inside the bar: a bar differs from it
        for depth in range(3):
            col = depth if edge in ("left", "top") else n - 1 - depth
            ref = col + inner if edge in ("left", "top") else col - inner
            strips.append((edge, along[:, col], along[:, ref]))
    for edge, line, inside in strips:
        m = len(line)
        line, inside = line[m // 40 : m - m // 40], inside[m // 40 : m - m // 40]
        if float(np.sqrt(((line - inside) ** 2).sum(axis=1)).mean()) < 40:
            continue  # the edge continues the scene (a sky, a wall): no bar
        for name, lut in PALETTES.items():
            distance, at = _nearest_on(line, lut)
            if float((distance <= _ON_PALETTE).mean()) < 0.85:
                continue
            position = at.astype(np.float32)
            span = float(np.ptp(position)) / (_LUT_SIZE - 1)
            if span < _BAR_SPAN:
                continue
            rho = np.corrcoef(np.argsort(np.argsort(position)), np.arange(len(position)))[0, 1]
            if abs(rho) >= 0.95:
                return f"a palette bar along the {edge} edge running through the {name} palette"
    return ""


@dataclass(frozen=True)
class Evidence:
    """Colour statistics of a frame that matched no palette: whether it reads as a photograph."""

    coloured: float  # share of clearly coloured pixels (saturation and brightness high enough)
    curve: float  # 75th percentile distance of the colours to a 1-D curve, relative to their spread
    chroma: float  # between neighbouring pixels: change of chromaticity per change of brightness (median)


def evidence_of(pixels: Rgb, smooth: Rgb) -> Evidence:
    spread_px = pixels.max(axis=1) - pixels.min(axis=1)
    value = pixels.max(axis=1) / 255.0
    saturation = spread_px / np.maximum(pixels.max(axis=1), 1.0)
    return Evidence(
        coloured=float(((saturation >= 0.3) & (value >= 0.15)).mean()),
        curve=_curve_residual(pixels),
        chroma=_chroma_per_brightness(smooth),
    )


def _chroma_per_brightness(rgb: Rgb) -> float:
    total = rgb.sum(axis=2) + 1e-3
    chroma = rgb[:, :, :2] / total[:, :, None]  # (r, g) / (r + g + b): brightness divided out
    ratios = []
    for axis in (0, 1):
        d_chroma = np.linalg.norm(np.diff(chroma, axis=axis), axis=2).ravel()
        d_bright = np.abs(np.diff(total, axis=axis)).ravel() / 765.0
        changed = d_bright > 0.01
        ratios.append(d_chroma[changed] / d_bright[changed])
    joined = np.concatenate(ratios)
    return float(np.median(joined)) if len(joined) >= 20 else 0.0


def _curve_residual(rgb: Rgb) -> float:
    spread = float(np.sqrt(((rgb - rgb.mean(axis=0)) ** 2).sum(axis=1).mean()))
    if spread < 12.0:
        return 1.0  # nearly one flat colour: no palette to recognise
    centres = _kmeans(rgb, _CLUSTERS)
    residual = _distance_to_segments(rgb, centres, _spanning_tree(centres))
    # The 75th percentile tolerates overlays and palette colours blended at sharp edges.
    return float(np.percentile(residual, 75)) / spread


def _kmeans(points: Rgb, k: int, iterations: int = 5) -> Rgb:
    # Squared distances are expanded into matrix products: numpy is slow at reducing 3-wide axes.
    norms = (points**2).sum(axis=1)
    # Farthest-point initialisation: deterministic, and spreads the centres along a curve's whole length.
    chosen = [int(np.argmax(norms - 2 * points @ points.mean(axis=0)))]
    nearest = norms - 2 * points @ points[chosen[0]] + norms[chosen[0]]
    for _ in range(k - 1):
        chosen.append(int(np.argmax(nearest)))
        nearest = np.minimum(nearest, norms - 2 * points @ points[chosen[-1]] + norms[chosen[-1]])
    centres = points[chosen]
    labels = np.arange(k)
    for _ in range(iterations):
        assign = np.argmin((centres**2).sum(axis=1) - 2 * points @ centres.T, axis=1)
        onehot = (assign[:, None] == labels).astype(np.float32)
        counts = onehot.sum(axis=0)[:, None]
        centres = np.where(counts > 0, onehot.T @ points / np.maximum(counts, 1), centres)
    return centres


def _spanning_tree(centres: Rgb) -> npt.NDArray[np.intp]:
    """Edges (i, j) of the centres' minimum spanning tree (Prim)."""
    n = len(centres)
    dist = np.sqrt(((centres[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2))
    in_tree = np.zeros(n, dtype=bool)
    in_tree[0] = True
    best, best_from = dist[0].copy(), np.zeros(n, dtype=np.intp)
    edges = []
    for _ in range(n - 1):
        j = int(np.argmin(np.where(in_tree, np.inf, best)))
        edges.append((best_from[j], j))
        in_tree[j] = True
        closer = dist[j] < best
        best, best_from = np.where(closer, dist[j], best), np.where(closer, j, best_from)
    return np.array(edges, dtype=np.intp).reshape(-1, 2)


def _distance_to_segments(points: Rgb, centres: Rgb, edges: npt.NDArray[np.intp]) -> Rgb:
    """Each point's distance to the nearest tree edge, all edges at once via matrix products."""
    a = centres[edges[:, 0]]
    ab = centres[edges[:, 1]] - a
    ab_len2 = np.maximum((ab**2).sum(axis=1), 1e-9)
    pa_dot_ab = points @ ab.T - (a * ab).sum(axis=1)  # (N, E)
    pa_len2 = (points**2).sum(axis=1)[:, None] - 2 * points @ a.T + (a**2).sum(axis=1)
    t = np.clip(pa_dot_ab / ab_len2, 0.0, 1.0)
    d2 = pa_len2 - 2 * t * pa_dot_ab + t**2 * ab_len2
    distance: Rgb = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
    return distance
