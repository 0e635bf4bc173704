"""`pogona-job predict [--model champion|RUN_ID|s3://...|PATH] SRC DEST`: try the trained model on new images.

SRC and DEST are local folders or s3:// prefixes. DEST gets one annotated image per input image (same
relative path), `predictions.jsonl` (one JSON object per image: file, width, height, boxes with class,
class id, confidence and xyxy pixels) and, with --txt, YOLO label files under `labels/` (class cx cy w h
confidence, normalised). Boxes below POGONA_CONF (default 0.25, the report's deployment confidence) are
dropped. A `.onnx` model runs through onnxruntime alone: torch is never imported for it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pogona_job.config import Settings
from pogona_job.errors import ConfigError, DatasetError
from pogona_job.evaluation.inference import IMAGE_SUFFIXES, images_in, load_predictor
from pogona_job.s3 import pointers, storage
from pogona_job.s3.storage import S3Path


@dataclass
class Outcome:
    images: int
    boxes: int
    failed: list[str]
    dest: str
    model: str


def resolve_model(model: str | None, settings: Settings, client: Any, cache: Path) -> tuple[Path, str]:
    """(local weights file, what it is in words) for --model champion | RUN_ID | s3://... | PATH."""
    name = model or "champion"
    local = Path(name).expanduser()
    if local.is_file():
        return local, str(local)
    if name.startswith("s3://"):
        return _download(client, S3Path.parse(name), cache), name
    if Path(name).suffix in (".pt", ".onnx") or "/" in name:
        raise ConfigError(
            f"--model {name}: no such file. Pass best.pt or best.onnx, an s3:// URI, a run id or champion."
        )
    if settings.output_uri is None:
        raise ConfigError(
            f"--model {name} names a run: set POGONA_OUTPUT_URI to the s3://bucket/prefix of the runs, "
            "or pass a local best.pt / best.onnx."
        )
    out = S3Path.parse(settings.output_uri)
    if name == "champion":
        champion = pointers.read(client, out / "champion.json").value
        if not champion or not champion.get("weights"):
            raise ConfigError(
                f"No champion under {out.uri} yet: pass --model RUN_ID (see `pogona-job runs`) or a best.pt."
            )
        return _download(client, S3Path.parse(str(champion["weights"])), cache), f"champion {champion.get('run_id')}"
    weights = out / name / "weights" / "best.pt"
    if storage.head(client, weights) is None:
        raise ConfigError(f"No run {name!r} with weights under {out.uri}: `pogona-job runs` lists the runs.")
    return _download(client, weights, cache), f"run {name}"


def _download(client: Any, src: S3Path, cache: Path) -> Path:
    if not src.key.endswith((".pt", ".onnx")):
        raise ConfigError(f"{src.uri} is not a .pt or .onnx file: point --model at weights/best.pt or best.onnx.")
    if storage.head(client, src) is None:
        raise ConfigError(f"{src.uri} does not exist: check the URI (`pogona-job runs show ID` lists a run's files).")
    dest = cache / hashlib.sha256(src.uri.encode()).hexdigest()[:16] / Path(src.key).name
    dest.parent.mkdir(parents=True, exist_ok=True)
    with storage.errors_for(src.bucket, f"downloading the model {src.uri}"):
        client.download_file(src.bucket, src.key, str(dest))
    return dest


def _source_images(src: str, client: Any, scratch: Path) -> tuple[Path, list[Path]]:
    if src.startswith("s3://"):
        prefix = S3Path.parse(src)
        root = scratch / "src"
        with storage.errors_for(prefix.bucket, f"listing the images under {prefix.uri}"):
            objects = [o for o in storage.list_objects(client, prefix) if o.key.lower().endswith(IMAGE_SUFFIXES)]
        for obj in objects:
            rel = storage.safe_relative(obj.key.removeprefix(prefix.key).lstrip("/"), obj.key)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            with storage.errors_for(prefix.bucket, f"downloading s3://{prefix.bucket}/{obj.key}"):
                client.download_file(prefix.bucket, obj.key, str(root / rel))
        if not objects:
            raise DatasetError(f"No images under {prefix.uri}: check SRC (jpg, png, bmp, webp or tif files).")
        return root, images_in(root)
    folder = Path(src).expanduser()
    if folder.is_file() and folder.suffix.lower() in IMAGE_SUFFIXES:
        return folder.parent, [folder]
    if not folder.is_dir():
        raise ConfigError(f"{src} is neither a folder, an image nor an s3:// prefix: check SRC.")
    images = images_in(folder)
    if not images:
        raise DatasetError(f"No images in {folder}: check SRC (jpg, png, bmp, webp or tif files).")
    return folder, images


def predict(
    model: str | None,
    src: str,
    dest: str,
    settings: Settings,
    *,
    conf: float | None = None,
    txt: bool = False,
    console: bool = False,
    client: Any = None,
) -> Outcome:
    threshold = settings.conf if conf is None else conf
    if not 0 < threshold < 1:
        raise ConfigError(f"--conf {threshold} must lie between 0 and 1.")
    needs_s3 = any(x.startswith("s3://") for x in (src, dest)) or not Path(model or "champion").expanduser().is_file()
    if client is None and needs_s3:
        client = storage.make_client(threads=settings.s3_threads, max_attempts=settings.s3_max_attempts)
    scratch = Path(tempfile.mkdtemp(prefix="pogona-predict-"))
    try:
        weights, described = resolve_model(model, settings, client, settings.work_dir / "predict-models")
        root, images = _source_images(src, client, scratch)
        to_s3 = dest.startswith("s3://")
        out_dir = scratch / "out" if to_s3 else Path(dest).expanduser()
        if not to_s3 and out_dir.resolve() == root.resolve():
            raise ConfigError(f"DEST {dest} is SRC itself: write the predictions into another folder.")
        out_dir.mkdir(parents=True, exist_ok=True)
        if weights.suffix == ".pt":
            from pogona_job.training import offline

            offline.prepare(settings.work_dir / "ultralytics")
        predictor = load_predictor(weights, conf=threshold, device=_device(settings, weights))
        outcome = _run(predictor, root, images, out_dir, threshold, txt=txt, console=console)
        outcome.model, outcome.dest = described, dest
        if to_s3:
            prefix = S3Path.parse(dest)
            files = sorted(p for p in out_dir.rglob("*") if p.is_file())
            storage.upload_many(
                client, [(p, prefix / p.relative_to(out_dir).as_posix()) for p in files], threads=settings.s3_threads
            )
        return outcome
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _device(settings: Settings, weights: Path) -> str:
    if weights.suffix == ".onnx" or settings.device in ("auto", "mps"):
        if weights.suffix == ".pt" and settings.device == "auto":
            import torch

            return "0" if torch.cuda.is_available() else "cpu"
        return "cpu"
    return settings.device


def _run(
    predictor: Any, root: Path, images: list[Path], out_dir: Path, conf: float, *, txt: bool, console: bool
) -> Outcome:
    from pogona_job.run.gallery import draw_boxes

    total_boxes, failed = 0, []
    progress = _Progress(len(images), console)
    with open(out_dir / "predictions.jsonl", "w", encoding="utf-8") as jsonl:
        for i, path in enumerate(images, 1):
            rel = path.relative_to(root).as_posix()
            try:
                pred = predictor(path)
            except Exception as exc:  # one unreadable image must not lose the others
                failed.append(rel)
                jsonl.write(json.dumps({"file": rel, "error": f"could not be read ({type(exc).__name__})"}) + "\n")
                progress.step(i, rel, None)
                continue
            boxes = [
                {
                    "class": predictor.names.get(b.cls, str(b.cls)),
                    "class_id": b.cls,
                    "confidence": round(b.conf, 4),
                    "xyxy": [round(v, 2) for v in b.xyxy],
                }
                for b in pred.boxes
            ]
            jsonl.write(json.dumps({"file": rel, "width": pred.width, "height": pred.height, "boxes": boxes}) + "\n")
            draw_boxes(path, pred.boxes, predictor.names, out_dir / rel)
            if txt:
                lines = [_yolo_line(b.cls, b.xyxy, b.conf, pred.width, pred.height) for b in pred.boxes]
                label = (out_dir / "labels" / rel).with_suffix(".txt")
                label.parent.mkdir(parents=True, exist_ok=True)
                label.write_text("".join(lines), encoding="utf-8")
            total_boxes += len(boxes)
            progress.step(i, rel, len(boxes))
    progress.close()
    return Outcome(len(images) - len(failed), total_boxes, failed, "", "")


def _yolo_line(cls: int, xyxy: tuple[float, float, float, float], conf: float, width: int, height: int) -> str:
    x0, y0, x1, y1 = xyxy
    cx, cy, w, h = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height
    return f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f} {conf:.4f}\n"


class _Progress:
    """A rich bar on a terminal; one JSON line per image otherwise (for logs and schedulers)."""

    def __init__(self, total: int, console: bool) -> None:
        self.total = total
        self.bar: Any = None
        if console:
            from rich.progress import Progress

            self.bar = Progress(transient=True)
            self.bar.start()
            self.task = self.bar.add_task("predicting", total=total)

    def step(self, done: int, file: str, boxes: int | None) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done)
            return
        event = {"event": "predicted" if boxes is not None else "unreadable", "file": file, "boxes": boxes}
        print(json.dumps(event | {"done": done, "total": self.total}), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def command(model: str | None, src: str, dest: str, settings: Settings, *, conf: float | None, txt: bool) -> int:
    console = settings.log_format == "console" or (settings.log_format == "auto" and sys.stdout.isatty())
    outcome = predict(model, src, dest, settings, conf=conf, txt=txt, console=console)
    threshold = settings.conf if conf is None else conf
    if console:
        print(
            f"{outcome.images} images, {outcome.boxes} boxes at confidence >= {threshold:.2f} ({outcome.model}); "
            f"written to {dest} (predictions.jsonl)."
        )
        if outcome.failed:
            print(f"{len(outcome.failed)} images could not be read: {', '.join(outcome.failed[:5])}", file=sys.stderr)
    else:
        print(
            json.dumps(
                {
                    "event": "done",
                    "images": outcome.images,
                    "boxes": outcome.boxes,
                    "unreadable": outcome.failed,
                    "conf": threshold,
                    "model": outcome.model,
                    "dest": dest,
                }
            )
        )
    return 3 if outcome.failed and not outcome.images else 0
