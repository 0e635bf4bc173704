"""Per-modality evaluation: does the model see lizards as well in thermal as in visible light?

One overall mAP can hide a modality the model barely learned (the smaller or harder one).
We validate the weights once per modality on that modality's share of the val split.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from pogona_job.dataset import StagedDataset

_METRIC_KEYS = {
    "precision": "metrics/precision(B)",
    "recall": "metrics/recall(B)",
    "map50": "metrics/mAP50(B)",
    "map50_95": "metrics/mAP50-95(B)",
}


def evaluate_per_modality(
    weights: Path, staged: StagedDataset, *, imgsz: int, batch: int, device: str, work_dir: Path
) -> dict[str, dict[str, float]]:
    """{modality: {"images", "precision", "recall", "map50", "map50_95"}} on the staged val split."""
    from ultralytics import YOLO  # heavy import, only when evaluating

    results: dict[str, dict[str, float]] = {}
    for modality, images in sorted(val_images_by_modality(staged).items()):
        data_yaml = _write_modality_yaml(staged, modality, images, work_dir)
        metrics = YOLO(str(weights)).val(
            data=str(data_yaml),
            imgsz=imgsz,
            batch=batch,
            device=device,
            plots=False,
            verbose=False,
            project=str(work_dir),
            name=f"val-{modality}",
            exist_ok=True,
        )
        values = metrics.results_dict
        results[modality] = {"images": float(len(images))} | {k: float(values[v]) for k, v in _METRIC_KEYS.items()}
    return results


def val_images_by_modality(staged: StagedDataset) -> dict[str, list[Path]]:
    """Absolute paths of the staged val images, grouped by modality (modalities without val images omitted)."""
    groups: dict[str, list[Path]] = {}
    for rel, modality in sorted(staged.modality_of.items()):
        if staged.split_of(rel) == "val":
            groups.setdefault(modality, []).append(staged.root / staged.staged[rel])
    return groups


def _write_modality_yaml(staged: StagedDataset, modality: str, images: list[Path], work_dir: Path) -> Path:
    # A list file of absolute image paths: ultralytics derives each label path from /images/ -> /labels/.
    work_dir.mkdir(parents=True, exist_ok=True)
    listing = work_dir / f"val-{modality}.txt"
    listing.write_text("".join(f"{p}\n" for p in images), encoding="utf-8")
    names = yaml.safe_load(staged.data_yaml.read_text(encoding="utf-8"))["names"]
    # `train` is required by ultralytics' dataset check even for val; point it at the same list.
    data = {"path": str(staged.root), "train": str(listing), "val": str(listing), "names": names}
    path = work_dir / f"data-{modality}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def lagging_modalities(results: dict[str, dict[str, float]], margin: float) -> list[str]:
    """Modalities whose mAP@0.5 is more than `margin` below the best modality's."""
    if not results:
        return []
    best = max(r["map50"] for r in results.values())
    return sorted(m for m, r in results.items() if r["map50"] < best - margin)
