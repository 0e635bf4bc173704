"""Pictures of what the model sees: annotated predictions (`predict`) and the report's error gallery.

The gallery puts the labels (left) beside the predictions (right) of the same image, each box
coloured by what went wrong, so a reader sees at a glance whether to fix labels, add images of a
modality, or train longer. The numbers come from evaluation/errors_gallery.py; this module draws
them and turns them into the report's markdown.
"""

from __future__ import annotations

from pathlib import Path

from pogona_job.evaluation.errors_gallery import KINDS, ErrorAnalysis, ImageErrors
from pogona_job.evaluation.inference import Box

COLOURS = {
    "label": (0, 200, 0),
    "correct": (0, 160, 255),
    "missed": (255, 0, 0),
    "false alarm": (255, 140, 0),
    "wrong class": (200, 0, 200),
    "poor localisation": (255, 220, 0),
}


def _font(size: int):  # type: ignore[no-untyped-def]
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_boxes(image_path: Path, boxes: list[Box], names: dict[int, str], dest: Path) -> None:
    """The image with each predicted box, its class and confidence."""
    from PIL import Image, ImageDraw

    with Image.open(image_path) as im:
        canvas = im.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    font = _font(max(10, canvas.height // 30))
    width = max(1, canvas.height // 150)
    for b in boxes:
        draw.rectangle(b.xyxy, outline=COLOURS["correct"], width=width)
        draw.text(
            (b.xyxy[0] + 2, b.xyxy[1] + 1), f"{names.get(b.cls, b.cls)} {b.conf:.2f}", fill=(255, 255, 255), font=font
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(dest)


def draw_side_by_side(image_path: Path, errors: ImageErrors, names: dict[int, str], dest: Path) -> None:
    """Labels on the left, predictions on the right; every box coloured by its outcome."""
    from PIL import Image, ImageDraw

    with Image.open(image_path) as im:
        base = im.convert("RGB")
    scale = max(1, 256 // max(base.width, base.height))  # tiny images stay readable in the report
    base = base.resize((base.width * scale, base.height * scale))
    gap = 8
    canvas = Image.new("RGB", (base.width * 2 + gap, base.height + 18), (255, 255, 255))
    canvas.paste(base, (0, 18))
    canvas.paste(base, (base.width + gap, 18))
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    draw.text((2, 2), "labels", fill=(0, 0, 0), font=font)
    draw.text((base.width + gap + 2, 2), f"predictions (conf >= {errors.conf:.2f})", fill=(0, 0, 0), font=font)
    width = max(1, base.height // 120)

    def box(xyxy: tuple[float, float, float, float], dx: int, colour: tuple[int, int, int], text: str) -> None:
        x0, y0, x1, y1 = (v * scale for v in xyxy)
        draw.rectangle((x0 + dx, y0 + 18, x1 + dx, y1 + 18), outline=colour, width=width)
        draw.text((x0 + dx + 2, y0 + 19), text, fill=colour, font=font)

    for lab, outcome in zip(errors.labels, errors.label_outcomes, strict=True):
        box(lab.xyxy, 0, COLOURS["missed" if outcome == "missed" else "label"], names.get(lab.cls, str(lab.cls)))
    for pred, outcome in zip(errors.predictions, errors.prediction_outcomes, strict=True):
        text = f"{names.get(pred.cls, str(pred.cls))} {pred.conf:.2f}"
        box(pred.xyxy, base.width + gap, COLOURS[outcome], text)
    dest.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(dest)


def error_section(
    analysis: ErrorAnalysis, images: dict[str, Path], work_dir: Path
) -> tuple[list[str], list[tuple[Path, str]]]:
    """The report's error-analysis markdown and the gallery images to upload as (local file, run-relative key)."""
    if not analysis.groups:
        return [], []
    out = [
        f"### Error analysis of best.pt on val (confidence >= {analysis.conf:.2f}, POGONA_CONF)",
        "",
        "Each picture: labels on the left, predictions on the right. Red: missed label; orange: false alarm; "
        "purple: wrong class; yellow: poor localisation (IoU below 0.5); blue: correct.",
        "",
        "| Scope | Images | Labels | " + " | ".join(k.capitalize() for k in KINDS) + " |",
        "|---" * (3 + len(KINDS)) + "|",
    ]
    for group in analysis.groups:
        counts = " | ".join(str(group.counts.get(k, 0)) for k in KINDS)
        out.append(f"| {group.scope} | {group.images} | {group.labels} | {counts} |")
    out.append("")
    files: list[tuple[Path, str]] = []
    for group in analysis.groups:
        for title, picks in (("worst misses", group.worst_misses), ("worst false alarms", group.worst_false_alarms)):
            if not picks:
                continue
            out += [f"**{group.scope}: {title}**", ""]
            for errors in picks:
                key = f"plots/errors/{group.slug}-{title.split()[1]}-{Path(errors.file).stem}.png"
                local = work_dir / key
                draw_side_by_side(images[errors.file], errors, analysis.names, local)
                files.append((local, key))
                out.append(f"![{Path(errors.file).name}: {errors.summary()}]({key})")
            out.append("")
    return out, files


def read_labels(label_file: Path, width: int, height: int) -> list[Box]:
    """A YOLO label file as pixel boxes (missing file: a background image)."""
    boxes: list[Box] = []
    if not label_file.exists():
        return boxes
    for line in label_file.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) < 5:
            continue
        c, cx, cy, w, h = int(float(parts[0])), *(float(v) for v in parts[1:5])
        xyxy = ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
        boxes.append(Box(xyxy, c, 1.0))
    return boxes


def label_path(image: str) -> Path:
    """ultralytics' rule: the last /images/ becomes /labels/, the suffix .txt."""
    head, sep, tail = image.rpartition("/images/")
    return Path((head + "/labels/" + tail) if sep else image).with_suffix(".txt")


def error_analysis(
    weights: Path, images: dict[str, str], *, conf: float, imgsz: int, device: str, work_dir: Path
) -> tuple[list[str], list[tuple[Path, str]]]:
    """THE call the run makes: best.pt on the val images {path: modality} at POGONA_CONF, matched to their
    labels; returns the report's markdown lines and the gallery images (local file, run-relative key)."""
    from pogona_job.evaluation import errors_gallery
    from pogona_job.evaluation.inference import load_predictor

    if not images:
        return [], []
    predictor = load_predictor(weights, conf=conf, imgsz=imgsz, device=device)
    items = []
    for path, modality in sorted(images.items()):
        pred = predictor(Path(path))
        labels = read_labels(label_path(path), pred.width, pred.height)
        items.append(errors_gallery.match(path, modality, labels, pred.boxes, conf))
    analysis = errors_gallery.analyse(items, predictor.names, conf)
    return error_section(analysis, {p: Path(p) for p in images}, work_dir)
