"""`pogona-job runs compare A B`: two runs side by side, as a reviewer deciding between them needs.

Each run's metrics with their 95% intervals; the paired difference when one run's champion decision
evaluated the other on the same images in the same process (the only honest way to tell a small
difference from noise: the intervals of two separate evaluations overlap even when one model is
better on every image); the settings and dataset fingerprint that differ; and both runs' per-epoch
curves in one PNG.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from pogona_job.errors import ConfigError
from pogona_job.s3 import storage
from pogona_job.s3.storage import S3Path

IGNORED_SETTINGS = {"POGONA_RUN_ID", "POGONA_WORK_DIR"}  # differ between any two runs by design
_LABEL = {"map50": "mAP@0.5", "map50_95": "mAP@0.5-0.95", "precision": "Precision", "recall": "Recall"}


def _manifest(client: Any, out: S3Path, run_id: str) -> dict[str, Any]:
    manifest = storage.get_json(client, out / run_id / "manifest.json")
    if manifest is None:
        raise ConfigError(f"No manifest for run {run_id!r} under {out.uri}: `pogona-job runs` lists them.")
    return manifest


def _fmt(m: dict[str, Any] | None, key: str) -> str:
    if not m or m.get(key) is None:
        return "-"
    ci = (m.get("ci") or {}).get(key)
    return f"{m[key]:.3f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")


def _paired(a_id: str, b_id: str, a: dict[str, Any], b: dict[str, Any]) -> tuple[dict[str, Any], int] | None:
    """(B - A paired deltas per split, sign) from whichever run's promotion evaluated the other."""
    for run, other, sign in ((b, a_id, 1), (a, b_id, -1)):
        promotion = run.get("promotion") or {}
        if promotion.get("compared_against") == other and promotion.get("comparison"):
            return promotion["comparison"]["splits"], sign
    return None


def _results(client: Any, out: S3Path, run_id: str) -> list[dict[str, float]]:
    path = out / run_id / "results.csv"
    if storage.head(client, path) is None:
        return []
    body = client.get_object(Bucket=path.bucket, Key=path.key)["Body"].read().decode()
    rows = []
    for row in csv.DictReader(io.StringIO(body)):
        rows.append({k.strip(): float(v) for k, v in row.items() if k and v not in (None, "")})
    return rows


def plot_curves(curves: dict[str, list[dict[str, float]]], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("metrics/mAP50(B)", "mAP@0.5 (val)"),
        ("metrics/mAP50-95(B)", "mAP@0.5-0.95 (val)"),
        ("train/box_loss", "train box loss"),
        ("val/box_loss", "val box loss"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (column, title) in zip(axes, panels, strict=True):
        for run_id, rows in curves.items():
            points = [(r["epoch"], r[column]) for r in rows if column in r]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", label=run_id)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=100)
    plt.close(fig)


def compare(client: Any, out: S3Path, a_id: str, b_id: str, plot: Path) -> str:
    a, b = _manifest(client, out, a_id), _manifest(client, out, b_id)
    lines = [f"Runs {a_id} (A) and {b_id} (B) under {out.uri}", ""]
    lines.append(f"  status      A {a.get('status')}, B {b.get('status')}")
    fa, fb = (a.get("dataset") or {}).get("fingerprint"), (b.get("dataset") or {}).get("fingerprint")
    lines.append(f"  dataset     {'same fingerprint ' + str(fa) if fa == fb else f'DIFFERENT: A {fa}, B {fb}'}")
    val_a, val_b = ((m.get("artifacts") or {}).get("dataset/val.txt", {}).get("sha256") for m in (a, b))
    same_val = val_a is not None and val_a == val_b
    lines.append(f"  val images  {'the same (dataset/val.txt identical)' if same_val else 'not the same list'}")
    lines.append("")
    ev_a, ev_b = a.get("evaluation") or {}, b.get("evaluation") or {}
    for split in [s for s in ("val", "test") if s in ev_a or s in ev_b]:
        sa, sb = ev_a.get(split) or {}, ev_b.get(split) or {}
        lines.append(f"  {split}: A {sa.get('images', '-')} images, B {sb.get('images', '-')} images (95% intervals)")
        scopes = ["overall", *sorted({*(sa.get("per_modality") or {}), *(sb.get("per_modality") or {})})]
        for scope in scopes:
            ma = sa.get("overall") if scope == "overall" else (sa.get("per_modality") or {}).get(scope)
            mb = sb.get("overall") if scope == "overall" else (sb.get("per_modality") or {}).get(scope)
            for key in ("map50", "map50_95") if scope == "overall" else ("map50",):
                diff = f"{mb[key] - ma[key]:+.3f}" if ma and mb and key in ma and key in mb else "-"
                lines.append(
                    f"    {scope:<10} {_LABEL[key]:<13} A {_fmt(ma, key):<20} B {_fmt(mb, key):<20} B-A {diff}"
                )
    paired = _paired(a_id, b_id, a, b)
    lines.append("")
    if paired is None:
        lines.append(
            "  Paired difference: none recorded (neither run's champion decision evaluated the other on the same "
            "images); the two intervals above come from separate evaluations, so overlapping intervals do not "
            "mean 'no difference'."
        )
    else:
        splits, sign = paired
        for split, d in splits.items():
            for key in ("map50", "map50_95"):
                x = d["overall"].get(key)
                if x:
                    lo, hi = sorted((sign * x["low"], sign * x["high"]))
                    lines.append(
                        f"  Paired difference B-A on {split} ({d['images']} images, same process): {_LABEL[key]} "
                        f"{sign * x['delta']:+.3f} (95% interval {lo:+.3f} to {hi:+.3f})"
                    )
    lines.append("")
    ca, cb = (
        storage.get_json(client, out / a_id / "config.json") or {},
        storage.get_json(client, out / b_id / "config.json") or {},
    )
    differing = sorted(k for k in {*ca, *cb} - IGNORED_SETTINGS if ca.get(k) != cb.get(k))
    lines.append("  Settings that differ:" + ("" if differing else " none"))
    lines += [f"    {k}: A {ca.get(k)!r}, B {cb.get(k)!r}" for k in differing]
    curves = {a_id: _results(client, out, a_id), b_id: _results(client, out, b_id)}
    if any(curves.values()):
        plot_curves(curves, plot)
        lines += ["", f"  Per-epoch curves of both: {plot}"]
    return "\n".join(lines)
