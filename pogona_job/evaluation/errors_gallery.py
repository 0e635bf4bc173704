"""What the model gets wrong, image by image, at the deployment confidence (POGONA_CONF).

mAP summarises every confidence at once; a user fixing their data needs to see, at the
confidence they will deploy at, which labels the model missed and which boxes it invented.
Each image's predictions are matched to its labels greedily by confidence:

1. a prediction overlapping an unmatched label of its class at IoU >= 0.5 is correct;
2. else one overlapping an unmatched label of another class at IoU >= 0.5 is a *wrong class*;
3. else one overlapping an unmatched label of its class at 0.1 <= IoU < 0.5 is *poor localisation*;
4. every other prediction is a *false alarm*, every label left unmatched is *missed*.

Pure numbers: drawing and markdown are run/gallery.py's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from pogona_job.evaluation.inference import Box, iou_matrix

KINDS = ("missed", "false alarm", "wrong class", "poor localisation")
MATCH_IOU = 0.5
LOCALISATION_IOU = 0.1
HANDFUL = 4


@dataclass
class ImageErrors:
    file: str
    modality: str
    conf: float
    labels: list[Box]
    predictions: list[Box]
    label_outcomes: list[str]  # "found" or a kind
    prediction_outcomes: list[str]  # "correct" or a kind

    def count(self, kind: str, cls: int | None = None) -> int:
        """Errors of one kind (optionally of one class: the label's class, the prediction's for false alarms)."""
        if kind == "false alarm":
            return sum(
                o == kind and (cls is None or p.cls == cls)
                for p, o in zip(self.predictions, self.prediction_outcomes, strict=True)
            )
        return sum(
            o == kind and (cls is None or lab.cls == cls)
            for lab, o in zip(self.labels, self.label_outcomes, strict=True)
        )

    def false_alarm_weight(self, cls: int | None = None) -> float:
        """Worst false alarms first: the most confident wrong boxes."""
        return sum(
            p.conf
            for p, o in zip(self.predictions, self.prediction_outcomes, strict=True)
            if o == "false alarm" and (cls is None or p.cls == cls)
        )

    def summary(self) -> str:
        parts = [f"{n} {k}{'s' if n > 1 and k == 'false alarm' else ''}" for k in KINDS if (n := self.count(k))]
        return ", ".join(parts) or "no errors"


def match(file: str, modality: str, labels: list[Box], predictions: list[Box], conf: float) -> ImageErrors:
    preds = sorted((p for p in predictions if p.conf >= conf), key=lambda p: -p.conf)
    iou = iou_matrix(
        np.array([p.xyxy for p in preds], float).reshape(-1, 4),
        np.array([b.xyxy for b in labels], float).reshape(-1, 4),
    )
    label_out = ["missed"] * len(labels)
    pred_out = ["false alarm"] * len(preds)
    rules = (
        ("correct", "found", MATCH_IOU, True),
        ("wrong class", "wrong class", MATCH_IOU, False),
        ("poor localisation", "poor localisation", LOCALISATION_IOU, True),
    )
    for pred_kind, label_kind, threshold, same_class in rules:
        for i, p in enumerate(preds):
            if pred_out[i] != "false alarm":
                continue
            best, best_iou = -1, threshold
            for j, lab in enumerate(labels):
                if label_out[j] != "missed" or (lab.cls == p.cls) != same_class:
                    continue
                if iou[i, j] >= best_iou:
                    best, best_iou = j, float(iou[i, j])
            if best >= 0:
                pred_out[i], label_out[best] = pred_kind, label_kind
    return ImageErrors(file, modality, conf, list(labels), preds, label_out, pred_out)


@dataclass
class GroupErrors:
    scope: str  # "all", a modality, or "class <name>"
    images: int
    labels: int
    counts: dict[str, int]
    worst_misses: list[ImageErrors] = field(default_factory=list)
    worst_false_alarms: list[ImageErrors] = field(default_factory=list)

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.scope.lower()).strip("-") or "all"


@dataclass
class ErrorAnalysis:
    conf: float
    names: dict[int, str]
    groups: list[GroupErrors]


def _group(scope: str, items: list[ImageErrors], cls: int | None, handful: int) -> GroupErrors:
    counts = {k: sum(e.count(k, cls) for e in items) for k in KINDS}
    labels = sum(sum(cls is None or b.cls == cls for b in e.labels) for e in items)
    misses = sorted((e for e in items if e.count("missed", cls)), key=lambda e: (-e.count("missed", cls), e.file))[
        :handful
    ]
    alarms = sorted(
        (e for e in items if e.count("false alarm", cls)), key=lambda e: (-e.false_alarm_weight(cls), e.file)
    )[:handful]
    return GroupErrors(scope, len(items), labels, counts, misses, alarms)


def analyse(items: list[ImageErrors], names: dict[int, str], conf: float, handful: int = HANDFUL) -> ErrorAnalysis:
    """Counts and the worst images overall, per known modality, and per class when there are several."""
    if not items:
        return ErrorAnalysis(conf, names, [])
    groups = [_group("all", items, None, handful)]
    modalities = sorted({e.modality for e in items} - {"unknown"})
    if len(modalities) > 1:
        groups += [_group(m, [e for e in items if e.modality == m], None, handful) for m in modalities]
    if len(names) > 1:
        groups += [_group(f"class {name}", items, cls, handful) for cls, name in sorted(names.items())]
    return ErrorAnalysis(conf, names, groups)
