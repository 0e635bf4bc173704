"""Boxes from trained weights on single images: best.pt through ultralytics, best.onnx through onnxruntime.

`pogona-job predict` and the report's error gallery both call `load_predictor`. The ONNX route
needs neither torch nor ultralytics (a deployment image may carry only onnxruntime and numpy):
it reads the class names and input size from the metadata ultralytics writes into the export,
letterboxes like ultralytics, and decodes the raw (1, 4 + classes, anchors) output with a
per-class non-maximum suppression at ultralytics' default IoU (0.7).
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pogona_job.errors import ConfigError

NMS_IOU = 0.7  # ultralytics' predict default
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Box:
    xyxy: tuple[float, float, float, float]  # pixels of the original image
    cls: int
    conf: float


@dataclass(frozen=True)
class Prediction:
    width: int
    height: int
    boxes: list[Box]


@dataclass
class Predictor:
    """`predictor(path)` -> Prediction; `names` maps class ids to names; `backend` is "pt" or "onnx"."""

    names: dict[int, str]
    imgsz: int
    backend: str
    run: Callable[[Path], Prediction]

    def __call__(self, path: Path) -> Prediction:
        return self.run(path)


def load_predictor(weights: Path, *, conf: float, imgsz: int | None = None, device: str = "cpu") -> Predictor:
    """A predictor for best.pt or best.onnx; `imgsz` defaults to the size the model was trained (exported) at."""
    if weights.suffix == ".onnx":
        return _onnx(weights, conf=conf, imgsz=imgsz)
    if weights.suffix == ".pt":
        return _torch(weights, conf=conf, imgsz=imgsz, device=device)
    raise ConfigError(f"{weights} is neither a .pt nor an .onnx model: pass best.pt or best.onnx.")


def _torch(weights: Path, *, conf: float, imgsz: int | None, device: str) -> Predictor:
    from ultralytics import YOLO

    try:
        model = YOLO(str(weights), task="detect")
    except Exception as exc:  # a truncated or foreign file: ultralytics' own message is a traceback
        raise ConfigError(f"{weights} could not be loaded as YOLO weights ({type(exc).__name__}).") from exc
    trained = (getattr(model, "ckpt", None) or {}).get("train_args", {}).get("imgsz", 640)
    size = int(imgsz or (trained[0] if isinstance(trained, (list, tuple)) else trained))
    names = {int(k): str(v) for k, v in model.names.items()}

    def run(path: Path) -> Prediction:
        result = model.predict(str(path), conf=conf, iou=NMS_IOU, imgsz=size, device=device, verbose=False)[0]
        height, width = result.orig_shape
        b = result.boxes
        boxes = [
            Box(tuple(float(v) for v in xyxy), int(c), float(p))  # type: ignore[arg-type]
            for xyxy, c, p in zip(b.xyxy.tolist(), b.cls.tolist(), b.conf.tolist(), strict=True)
        ]
        return Prediction(int(width), int(height), boxes)

    return Predictor(names, size, "pt", run)


def _onnx(weights: Path, *, conf: float, imgsz: int | None) -> Predictor:
    import onnxruntime as ort  # type: ignore[import-untyped]

    try:
        session = ort.InferenceSession(str(weights), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ConfigError(f"{weights} could not be loaded by onnxruntime ({type(exc).__name__}).") from exc
    meta = session.get_modelmeta().custom_metadata_map
    names = {int(k): str(v) for k, v in _literal(meta.get("names"), {0: "object"}).items()}
    exported = _literal(meta.get("imgsz"), [imgsz or 640, imgsz or 640])
    inp = session.get_inputs()[0]
    shape = inp.shape  # [1, 3, H, W]; strings where the export is dynamic
    height = shape[2] if isinstance(shape[2], int) else int(imgsz or exported[0])
    width = shape[3] if isinstance(shape[3], int) else int(imgsz or exported[1])

    def run(path: Path) -> Prediction:
        image = _rgb(path)
        tensor, gain, pad = letterbox(image, height, width)
        out = session.run(None, {inp.name: tensor})[0]
        boxes = decode(np.asarray(out)[0], conf=conf, gain=gain, pad=pad, size=(image.shape[1], image.shape[0]))
        return Prediction(int(image.shape[1]), int(image.shape[0]), boxes)

    return Predictor(names, int(height), "onnx", run)


def _literal(text: str | None, default: Any) -> Any:
    try:
        return ast.literal_eval(text) if text else default
    except (ValueError, SyntaxError):
        return default


def _rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def letterbox(image: np.ndarray, height: int, width: int) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Resize keeping the aspect ratio, pad with grey 114 centred (as ultralytics does for a fixed-size export)."""
    from PIL import Image

    h0, w0 = image.shape[:2]
    gain = min(height / h0, width / w0)
    nw, nh = round(w0 * gain), round(h0 * gain)
    dw, dh = (width - nw) / 2, (height - nh) / 2
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
    canvas = np.full((height, width, 3), 114, np.uint8)
    top, left = round(dh - 0.1), round(dw - 0.1)
    canvas[top : top + nh, left : left + nw] = resized
    tensor = canvas.transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    return np.ascontiguousarray(tensor), gain, (left, top)


def decode(raw: np.ndarray, *, conf: float, gain: float, pad: tuple[float, float], size: tuple[int, int]) -> list[Box]:
    """(4 + classes, anchors) of centre-size boxes and class scores -> boxes in original pixels, NMS per class."""
    scores = raw[4:].T
    cls = scores.argmax(1)
    best = scores[np.arange(len(cls)), cls]
    keep = best >= conf
    xywh, cls, best = raw[:4].T[keep], cls[keep], best[keep]
    xyxy = np.stack(
        [
            xywh[:, 0] - xywh[:, 2] / 2,
            xywh[:, 1] - xywh[:, 3] / 2,
            xywh[:, 0] + xywh[:, 2] / 2,
            xywh[:, 1] + xywh[:, 3] / 2,
        ],
        1,
    )
    xyxy = (xyxy - np.array([pad[0], pad[1], pad[0], pad[1]])) / gain
    xyxy = np.clip(xyxy, 0, [size[0], size[1], size[0], size[1]])
    boxes: list[Box] = []
    for c in np.unique(cls):
        idx = np.flatnonzero(cls == c)
        for i in nms(xyxy[idx], best[idx], NMS_IOU):
            j = idx[i]
            boxes.append(Box(tuple(float(v) for v in xyxy[j]), int(c), float(best[j])))  # type: ignore[arg-type]
    return sorted(boxes, key=lambda b: -b.conf)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a (N, 4 xyxy) with every box in b (M, 4)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(1)
    return np.asarray(inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9))


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    order = list(np.argsort(-scores))
    kept: list[int] = []
    while order:
        i = order.pop(0)
        kept.append(int(i))
        if order:
            overlaps = iou_matrix(boxes[[i]], boxes[order])[0]
            order = [j for j, o in zip(order, overlaps, strict=True) if o <= iou]
    return kept


def images_in(folder: Path) -> list[Path]:
    """Image files under a folder (recursively, hidden files skipped), sorted."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
