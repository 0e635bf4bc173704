"""Ultralytics' names for what it measures: the one copy of its results.csv / trainer.metrics keys.

Everything that reads a results row (the gate, the report, the evaluation) says `METRICS["map50"]`
or `loss_column("box_loss")` instead of spelling ultralytics' strings, so a rename upstream is one edit.
"""

from __future__ import annotations

METRICS = {
    "precision": "metrics/precision(B)",
    "recall": "metrics/recall(B)",
    "map50": "metrics/mAP50(B)",
    "map50_95": "metrics/mAP50-95(B)",
}
# The three detection losses, in ultralytics' order (trainer.loss_items, results.csv's train/* columns).
LOSSES = ("box_loss", "cls_loss", "dfl_loss")


def loss_column(name: str, split: str = "train") -> str:
    """results.csv's column for one loss: `train/box_loss`, `val/cls_loss`."""
    return f"{split}/{name}"
