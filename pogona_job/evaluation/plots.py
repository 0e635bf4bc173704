"""The confusion matrix at the deployment confidence, drawn from the counts the report prints.

Ultralytics' own confusion_matrix.png is computed at validation's confidence (0.001): on 24 images it
showed 6,276 false positives and no misses beside a reported recall of 0.80. This one counts only the
detections at or above POGONA_CONF, from the validation pass's own matching (uncertainty.counts_at), so
its cells are exactly the TP/FP/FN behind the precision and recall printed under it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def matrix(at_conf: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    """(labels, (n+1)x(n+1) counts): rows predicted, columns true, the last row/column "background".

    Diagonal: true positives; last column: false alarms (a prediction with no label of its class);
    last row: misses. A wrong-class detection shows as a false alarm of one class and a miss of the other."""
    names = list(at_conf["per_class"])
    n = len(names)
    m = np.zeros((n + 1, n + 1), dtype=np.int64)
    for i, name in enumerate(names):
        c = at_conf["per_class"][name]
        m[i, i] = c["tp"]
        m[i, n] = c["fp"]
        m[n, i] = c["fn"]
    return [*names, "background"], m


def caption(at_conf: dict[str, Any]) -> str:
    """The sentence under the plot (and in the report): the confidence and the P/R the cells give."""
    return (
        f"Counted at confidence >= {at_conf['conf']:g} (POGONA_CONF), IoU 0.50: {at_conf['tp']} true positives, "
        f"{at_conf['fp']} false alarms, {at_conf['fn']} misses -> precision {at_conf['precision']:.3f}, "
        f"recall {at_conf['recall']:.3f}."
    )


def confusion_matrix(at_conf: dict[str, Any], dest: Path, *, conf: float) -> Path:
    """Write the matrix as a PNG at `dest` (replacing ultralytics' 0.001-confidence one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, m = matrix(at_conf)
    size = max(3.5, 0.9 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size + 0.6), dpi=110)
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        if i == len(labels) - 1 and j == len(labels) - 1:
            continue  # background-background is not counted by detection
        ax.text(j, i, str(v), ha="center", va="center", color="black", fontsize=10)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("True")
    ax.set_ylabel("Predicted")
    ax.set_title(f"Confusion matrix at confidence {conf:g}")
    fig.text(0.5, 0.01, caption(at_conf), ha="center", va="bottom", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest)
    plt.close(fig)
    return dest
