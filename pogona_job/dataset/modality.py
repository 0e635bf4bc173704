"""Thermal or visible? Declared first, matched by name next, inferred from pixels only when sure.

Order of precedence (the first that answers wins; dataset/README.md documents it):
1. POGONA_MODALITY_RULES: globs per modality, e.g. `thermal=**/flir/**,**/IR_*;visible=**/rgb/**`;
2. a `modality` column in groups.csv, or a `modality.txt` sidecar (one word) in a folder;
3. folder and file names: `thermal`, `flir`, `IR_...` / `rgb`, `visible` ...;
4. the pixels, which may answer "unknown" and never guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import PurePosixPath

import numpy as np
import numpy.typing as npt
from PIL import Image

DEFAULT_THERMAL_PATTERN = r"therm|infra-?red|flir|lwir|(?<![a-z])ir(?![a-z])"
DEFAULT_VISIBLE_PATTERN = r"(?<![a-z])(rgb|visible|vis|daylight|colou?r)(?![a-z])"
SIDECAR = "modality.txt"
_SAMPLE_SIDE = 48  # modality is judged on 48x48 sampled pixels: plenty for colour statistics
_CLUSTERS = 12

Rgb = npt.NDArray[np.float32]


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
    for parent in PurePosixPath(rel).parents:
        if parent.as_posix() in sidecars:
            return sidecars[parent.as_posix()]
    return None


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
# Pixels
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evidence:
    """What the pixels show; `decide` turns it into an answer."""

    grey: bool  # equal channels (a few coloured overlay pixels allowed)
    coloured: float  # share of clearly coloured pixels (saturation and brightness high enough)
    curve: float  # 75th percentile distance of the colours to a 1-D curve, relative to their spread
    chroma: float  # between neighbouring pixels: change of chromaticity per change of brightness (median)


def pixel_modality(image: Image.Image) -> str:
    """ "thermal", "visible", or "unknown" when the pixels are not conclusive.

    A thermal frame is one temperature per pixel. Shown in grey, its channels are equal.
    Shown through a palette (ironbow, rainbow ...), its colours lie on one curve, and
    wherever the temperature changes, hue and brightness change together. In a photograph
    most change between neighbouring pixels is shading: brightness changes, the chromaticity
    (the colour without its brightness) stays. A photo of one or two dull materials, or a
    palette we cannot tell from shading, is "unknown": never a guess.
    """
    bands = [b for b in image.getbands() if b != "A"]
    if len(bands) == 1 and image.mode != "P":
        return "thermal"
    return decide(evidence(image.convert("RGB")))


def decide(e: Evidence) -> str:
    if e.grey:
        return "thermal"
    # A palette: colours on one thin curve whose hue moves with brightness (the thinner, the surer).
    palette = e.coloured >= 0.3 and ((e.curve <= 0.2 and e.chroma >= 0.75) or (e.curve <= 0.04 and e.chroma >= 0.4))
    photo = (e.chroma <= 0.5 and e.curve >= 0.05) or e.curve >= 0.3  # a perfect 1-D line may be a tinted palette
    if palette and not photo:
        return "thermal"
    if photo and not palette:
        return "visible"
    return "unknown"


def evidence(image: Image.Image) -> Evidence:
    # Nearest-neighbour samples for colour statistics (averaging would blend palette colours off
    # their curve); a smooth reduction for neighbour differences (so JPEG noise does not dominate).
    rgb = np.asarray(image.resize((_SAMPLE_SIDE, _SAMPLE_SIDE), Image.Resampling.NEAREST), np.float32).reshape(-1, 3)
    spread_px = rgb.max(axis=1) - rgb.min(axis=1)
    grey = float(np.median(spread_px)) <= 4.0 and float(np.mean(spread_px > 20)) < 0.05
    value = rgb.max(axis=1) / 255.0
    saturation = spread_px / np.maximum(rgb.max(axis=1), 1.0)
    smooth = np.asarray(image.resize((64, 64), Image.Resampling.BILINEAR), np.float32)
    return Evidence(
        grey=grey,
        coloured=float(((saturation >= 0.3) & (value >= 0.15)).mean()),
        curve=_curve_residual(rgb),
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
