"""Verified export: best.pt to ONNX with ultralytics' exporter, then the ONNX model is validated with
onnxruntime on the same splits and compared with best.pt.

An export is trusted only when its mAP@0.5 (overall, per modality, per class) stays within
POGONA_EXPORT_TOLERANCE of best.pt's on the same images. One outside the tolerance is still
published, but flagged, and it blocks promotion. onnx, onnxslim and onnxruntime are pinned in the
project: the exporter's run-time pip install is switched off, so a missing package fails loudly.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pogona_job.dataset import StagedDataset
    from pogona_job.evaluation.scoring import SplitRun


def export_onnx(weights: Path, *, imgsz: int, device: str) -> Path:
    """best.pt -> best.onnx beside it (dynamic shapes, so validation batches and letterboxes like best.pt)."""
    import ultralytics.utils.checks as checks
    from ultralytics import YOLO

    checks.AUTOINSTALL = False  # never pip-install at run time: the onnx stack is pinned in the project
    out = YOLO(str(weights)).export(format="onnx", imgsz=imgsz, dynamic=True, simplify=True, device="cpu")
    del device  # exported on the CPU: the graph is the same, and no accelerator is needed to build it
    return Path(out)


def deltas(reference: SplitRun, candidate: SplitRun) -> dict[str, Any]:
    """candidate - reference mAP@0.5 and mAP@0.5-0.95, overall, per modality and per class, same images."""
    from pogona_job.evaluation import uncertainty

    cand = candidate.per.aligned(reference.per.files)

    def diff(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        return {k: b[k] - a[k] for k in ("map50", "map50_95")}

    out: dict[str, Any] = {"overall": diff(uncertainty.score(reference.per), uncertainty.score(cand))}
    cand_run = type(candidate)(candidate.split, cand, reference.modality, candidate.ultralytics)
    ref_mod, cand_mod = reference.by_modality(), cand_run.by_modality()
    out["per_modality"] = {
        m: diff(uncertainty.score(ref_mod[m]), uncertainty.score(cand_mod[m])) for m in ref_mod if m in cand_mod
    }
    if len(reference.per.names) > 1:
        ref_cls, cand_cls = uncertainty.per_class(reference.per), uncertainty.per_class(cand)
        out["per_class"] = {c: diff(ref_cls[c], cand_cls.get(c, {"map50": 0.0, "map50_95": 0.0})) for c in ref_cls}
    return out


def verify(
    onnx_path: Path,
    staged: StagedDataset,
    reference: dict[str, SplitRun],
    *,
    imgsz: int,
    batch: int,
    device: str,
    work_dir: Path,
    tolerance: float,
) -> dict[str, Any]:
    """Validate the ONNX model on the splits best.pt was evaluated on; verified when every mAP@0.5 delta is
    within the tolerance."""
    from pogona_job.evaluation import scoring

    result: dict[str, Any] = {"format": "onnx", "file": "weights/best.onnx", "tolerance": tolerance, "splits": {}}
    worst = 0.0
    for split, ref in reference.items():
        run = scoring.run_split(
            onnx_path, staged, split, imgsz=imgsz, batch=batch, device=device, work_dir=work_dir, tag="onnx"
        )
        if run is None:
            continue
        d = deltas(ref, run)
        result["splits"][split] = {"metrics": scoring.summarise(run, resamples=0), "deltas": d}
        groups = [d["overall"], *d["per_modality"].values(), *d.get("per_class", {}).values()]
        worst = max([worst, *(abs(g["map50"]) for g in groups)])
    result["max_abs_delta_map50"] = worst
    # A model that finds nothing agrees with its export trivially (0 vs 0): that proves nothing.
    result["meaningful"] = any(uncertainty_map50(ref) > 0 for ref in reference.values())
    result["verified"] = bool(result["splits"]) and worst <= tolerance and result["meaningful"]
    return result


def uncertainty_map50(run: SplitRun) -> float:
    from pogona_job.evaluation import uncertainty

    return uncertainty.score(run.per)["map50"]


def export_and_verify(
    weights: Path,
    staged: StagedDataset,
    reference: dict[str, SplitRun],
    *,
    formats: list[str],
    imgsz: int,
    batch: int,
    device: str,
    work_dir: Path,
    tolerance: float,
) -> dict[str, Any]:
    """{} when export is off; else the verification record (the .onnx lies beside best.pt)."""
    if "onnx" not in formats:
        return {}
    onnx_path = export_onnx(weights, imgsz=imgsz, device=device)
    return verify(
        onnx_path, staged, reference, imgsz=imgsz, batch=batch, device=device, work_dir=work_dir, tolerance=tolerance
    )


def report_lines(export: dict[str, Any]) -> list[str]:
    if not export:
        return []
    ok = export.get("verified")
    if export.get("meaningful") is False:
        return [
            "### Export (ONNX, onnxruntime)",
            "",
            "Export check **not meaningful**: best.pt scores mAP@0.5 0 on these images, so the ONNX model agreeing "
            "with it (0 vs 0) proves nothing. Published, not verified.",
            "",
        ]
    out = [
        "### Export (ONNX, onnxruntime)",
        "",
        f"{'✅ verified' if ok else '⚠️ NOT VERIFIED (published, flagged; blocks promotion)'}: largest mAP@0.5 "
        f"difference from best.pt {export.get('max_abs_delta_map50', 0.0):.4f} (tolerance "
        f"{export.get('tolerance', 0.0):.3f}), `weights/best.onnx`.",
        "",
        "| Split | Scope | ONNX mAP@0.5 | Δ mAP@0.5 | Δ mAP@0.5-0.95 |",
        "|---|---|---|---|---|",
    ]
    for split, s in export.get("splits", {}).items():
        m, d = s["metrics"], s["deltas"]
        out.append(
            f"| {split} | overall | {m['overall']['map50']:.3f} | {d['overall']['map50']:+.4f} | "
            f"{d['overall']['map50_95']:+.4f} |"
        )
        for mod, dm in d["per_modality"].items():
            out.append(
                f"| {split} | {mod} | {m['per_modality'][mod]['map50']:.3f} | {dm['map50']:+.4f} | "
                f"{dm['map50_95']:+.4f} |"
            )
    out.append("")
    return out
