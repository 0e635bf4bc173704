"""A deterministic synthetic dataset of lizard heads, thermal and visible, for rehearsals and tests.

Written as a flat labelled folder (`images/` + `labels/`). File names never reveal the
modality, so the dataset inspector's pixel heuristic is exercised; the ground truth is returned.
Objects are large and high-contrast so that a tiny model trained from scratch learns them quickly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASS_NAMES = ["pogona_head"]
JPEG_QUALITY = 92
# Thermal cameras show temperatures either as grey levels or through a palette.
_COLORMAPS = (cv2.COLORMAP_INFERNO, cv2.COLORMAP_JET, cv2.COLORMAP_TURBO, cv2.COLORMAP_HOT)
_THERMAL_STYLES = ("gray-1ch", "gray-3ch", "colormap")
# Visible scenes mix one cool material (foliage, slate, moss) with two warm ones (sand, bark, terracotta):
# real photographs span several hues, and a single-hue scene would look like a thermal palette.
_COOL_COLOURS = np.array([[70, 120, 50], [90, 100, 130], [120, 150, 80]], dtype=np.float32)
_WARM_COLOURS = np.array([[196, 170, 120], [110, 80, 55], [170, 90, 60]], dtype=np.float32)
_HEAD_COLOURS = np.array([[215, 170, 100], [150, 95, 50], [230, 130, 50], [140, 140, 60]], dtype=np.float32)


@dataclass(frozen=True)
class _Head:
    polygon: list[tuple[float, float]]
    eyes: list[tuple[float, float, float]]  # centre x, centre y, radius

    def bbox(self) -> tuple[float, float, float, float]:
        xs = [p[0] for p in self.polygon]
        ys = [p[1] for p in self.polygon]
        return min(xs), min(ys), max(xs), max(ys)


def write_demo(dest: Path, *, n_images: int = 120, size: int = 160, seed: int = 0) -> dict[str, str]:
    """Write the demo dataset under `dest`; return {relative image path: "thermal" | "visible"}."""
    rng = np.random.default_rng(seed)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    (dest / "labels").mkdir(parents=True, exist_ok=True)
    modalities = rng.permutation(["thermal" if i % 2 == 0 else "visible" for i in range(n_images)])
    n_backgrounds = max(1, round(n_images * 0.05)) if n_images >= 10 else 0
    background_ids = set(rng.choice(n_images, size=n_backgrounds, replace=False).tolist())
    truth: dict[str, str] = {}
    thermal_count = backgrounds = 0
    for i, modality in enumerate(modalities):
        stem = f"frame_{i + 1:04d}"
        heads = [] if i in background_ids else _place_heads(rng, size, n=int(rng.integers(1, 3)))
        if modality == "thermal":
            style = _THERMAL_STYLES[thermal_count % len(_THERMAL_STYLES)]
            colormap = _COLORMAPS[(thermal_count // len(_THERMAL_STYLES)) % len(_COLORMAPS)]
            thermal_count += 1
            image = _thermal_image(rng, size, heads, style, colormap)
        else:
            image = _visible_image(rng, size, heads)
        # Full-resolution chroma (4:4:4): halved chroma would smear palette colours off their curve.
        image.save(dest / "images" / f"{stem}.jpg", quality=JPEG_QUALITY, subsampling=0)
        # Backgrounds alternate between "no label file" and "empty label file": both are valid YOLO.
        if heads or backgrounds % 2 == 0:
            _write_label(dest / "labels" / f"{stem}.txt", heads, size)
        backgrounds += not heads
        truth[f"images/{stem}.jpg"] = str(modality)
    return truth


def _write_label(path: Path, heads: list[_Head], size: int) -> None:
    lines = []
    for head in heads:
        x0, y0, x1, y1 = head.bbox()
        cx, cy, w, h = (x0 + x1) / 2 / size, (y0 + y1) / 2 / size, (x1 - x0) / size, (y1 - y0) / size
        lines.append(f"0 {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
    path.write_text("".join(lines))


def _place_heads(rng: np.random.Generator, size: int, n: int) -> list[_Head]:
    heads: list[_Head] = []
    for _ in range(50):  # rejection sampling: keep heads apart and inside the frame
        if len(heads) == n:
            break
        head = _head_shape(rng, size)
        x0, y0, x1, y1 = head.bbox()
        if x0 < 1 or y0 < 1 or x1 > size - 1 or y1 > size - 1:
            continue
        if any(_overlaps(head.bbox(), other.bbox()) for other in heads):
            continue
        heads.append(head)
    return heads


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return not (a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1])


def _head_shape(rng: np.random.Generator, size: int) -> _Head:
    """An egg-shaped head with a narrower snout, rotated; eyes set back from the snout."""
    length = size * rng.uniform(0.2, 0.35)
    width = length * rng.uniform(0.55, 0.7)
    angle = rng.uniform(0, 2 * math.pi)
    cx, cy = rng.uniform(0.2, 0.8) * size, rng.uniform(0.2, 0.8) * size
    cos_a, sin_a = math.cos(angle), math.sin(angle)

    def place(u: float, v: float) -> tuple[float, float]:
        return cx + u * cos_a - v * sin_a, cy + u * sin_a + v * cos_a

    polygon = []
    for k in range(36):
        t = 2 * math.pi * k / 36
        taper = 0.8 - 0.2 * math.cos(t)  # narrow at the snout (t = 0), broad at the back
        polygon.append(place(length / 2 * math.cos(t), width / 2 * math.sin(t) * taper))
    eye_r = max(1.5, width * 0.1)
    eyes = [(*place(length * 0.08, side * width * 0.26), eye_r) for side in (-1, 1)]
    return _Head(polygon=polygon, eyes=eyes)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bicubically."""
    grid = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0


def _masks(heads: list[_Head], size: int, blur: float) -> tuple[np.ndarray, np.ndarray]:
    """Head and eye coverage in [0, 1], drawn at 2x and downsampled for soft edges."""
    scale = 2
    head_img = Image.new("L", (size * scale, size * scale), 0)
    eye_img = Image.new("L", (size * scale, size * scale), 0)
    head_draw, eye_draw = ImageDraw.Draw(head_img), ImageDraw.Draw(eye_img)
    for head in heads:
        head_draw.polygon([(x * scale, y * scale) for x, y in head.polygon], fill=255)
        for ex, ey, r in head.eyes:
            eye_draw.ellipse([(ex - r) * scale, (ey - r) * scale, (ex + r) * scale, (ey + r) * scale], fill=255)
    out = []
    for img in (head_img, eye_img):
        img = img.resize((size, size), Image.Resampling.BOX)
        if blur:
            img = img.filter(ImageFilter.GaussianBlur(blur))
        out.append(np.asarray(img, dtype=np.float32) / 255.0)
    return out[0], out[1]


def _thermal_image(rng: np.random.Generator, size: int, heads: list[_Head], style: str, colormap: int) -> Image.Image:
    # Cool, smoothly varying substrate; the head is warm, the eyes slightly cooler than the head.
    background = 40 + 60 * _smooth_noise(rng, size, 4) + 15 * _smooth_noise(rng, size, 12)
    head_mask, eye_mask = _masks(heads, size, blur=1.0)
    warmth = rng.uniform(170, 220) + 25 * _smooth_noise(rng, size, 6)
    temp = background * (1 - head_mask) + warmth * head_mask
    temp = temp * (1 - eye_mask) + (warmth - 60) * eye_mask
    temp = np.clip(temp + rng.normal(0, 2.5, temp.shape), 0, 255).astype(np.uint8)
    if style == "gray-1ch":
        return Image.fromarray(temp, mode="L")
    if style == "gray-3ch":
        return Image.fromarray(np.repeat(temp[:, :, None], 3, axis=2), mode="RGB")
    bgr = cv2.applyColorMap(temp, colormap)
    return Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]), mode="RGB")


def _visible_image(rng: np.random.Generator, size: int, heads: list[_Head]) -> Image.Image:
    # A scene mixing a few materials, each with its own colour texture and shading.
    colours = np.concatenate(
        [_COOL_COLOURS[rng.integers(len(_COOL_COLOURS))][None], _WARM_COLOURS[rng.permutation(3)[:2]]]
    )
    weights = np.stack([_smooth_noise(rng, size, int(rng.integers(3, 7))) + 0.15 for _ in colours]) ** 2
    weights /= weights.sum(axis=0, keepdims=True)
    scene = np.einsum("khw,kc->hwc", weights, colours)
    texture = rng.normal(0, 14, (size, size, 3)).astype(np.float32)
    shading = 0.7 + 0.5 * _smooth_noise(rng, size, 3)
    scene = (scene + texture) * shading[:, :, None]

    head_mask, eye_mask = _masks(heads, size, blur=0.0)
    skin = _HEAD_COLOURS[rng.integers(len(_HEAD_COLOURS))]
    scales = 0.85 + 0.3 * _smooth_noise(rng, size, 24)
    head = skin[None, None, :] * scales[:, :, None] + rng.normal(0, 6, (size, size, 3))
    outline = np.clip(head_mask * 4, 0, 1) - np.clip((head_mask - 0.75) * 4, 0, 1)  # darker rim
    image = scene * (1 - head_mask[:, :, None]) + head * head_mask[:, :, None]
    image *= 1 - 0.5 * np.clip(outline, 0, 1)[:, :, None]
    image = image * (1 - eye_mask[:, :, None]) + 15 * eye_mask[:, :, None]
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="RGB")
