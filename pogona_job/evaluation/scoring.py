"""Evaluation of trained weights: one validation pass per split, every figure derived from it.

One overall mAP can hide a modality the model barely learned (the smaller or harder one), and a
difference of 0.01 mAP on 40 images is noise. So each split (val, and test when the user kept one)
is validated ONCE, keeping ultralytics' per-image matching results; the overall, per-modality and
per-class metrics and their bootstrap intervals are all computed from those (uncertainty.py). The
same function evaluates the exported ONNX model and the champion's weights on the same images.

Per-modality metrics cover only images whose modality is known ("unknown" is left out).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from pogona_job.dataset import StagedDataset
from pogona_job.evaluation import uncertainty
from pogona_job.evaluation.uncertainty import PerImage
from pogona_job.training.columns import METRICS

if TYPE_CHECKING:
    pass

SPLITS = ("val", "test")
# Ultralytics' drawings of a validation pass that the run publishes (its confusion matrix is redrawn at
# POGONA_CONF: evaluation/plots.py).
PLOTS = ("BoxPR_curve.png", "val_batch0_labels.jpg", "val_batch0_pred.jpg")


@dataclass
class SplitRun:
    """One model's validation pass over one split: per-image results, the modality of each image, and
    ultralytics' own summary of the same pass (a cross-check: uncertainty.score(per) must equal it)."""

    split: str
    per: PerImage
    modality: dict[str, str]  # image file -> modality
    ultralytics: dict[str, float]
    groups: dict[str, str] | None = None  # image file -> the split's group (None: every image its own)

    def by_modality(self) -> dict[str, PerImage]:
        groups: dict[str, list[int]] = {}
        for i, f in enumerate(self.per.files):
            m = self.modality.get(f, "unknown")
            if m != "unknown":
                groups.setdefault(m, []).append(i)
        return {m: self.per.subset(idx) for m, idx in sorted(groups.items())}


def validate(
    weights: Path,
    data_yaml: Path,
    *,
    imgsz: int,
    batch: int,
    device: str,
    work_dir: Path,
    name: str,
    plots: bool = False,
) -> tuple[PerImage, dict[str, float]]:
    """Run `YOLO.val()` once, keeping each image's matching results (tp, conf, classes) as it goes; with
    `plots`, ultralytics' drawings of the pass (PLOTS) land in work_dir/name/."""
    from ultralytics import YOLO
    from ultralytics.models.yolo.detect import DetectionValidator

    rows: list[tuple[str, Any, Any, Any, Any]] = []

    class Recording(DetectionValidator):  # type: ignore[misc]
        def update_metrics(self, preds: list[dict[str, Any]], batch: dict[str, Any]) -> None:
            before = len(self.metrics.stats["tp"])
            super().update_metrics(preds, batch)
            s = self.metrics.stats  # one entry per image, appended in batch order
            for j in range(len(preds)):
                k = before + j
                rows.append(
                    (
                        os.path.realpath(batch["im_file"][j]),
                        s["tp"][k],
                        s["conf"][k],
                        s["pred_cls"][k],
                        s["target_cls"][k],
                    )
                )

    metrics = YOLO(str(weights), task="detect").val(
        validator=Recording,
        data=str(data_yaml),
        imgsz=imgsz,
        batch=batch,
        device=device,
        plots=plots,
        verbose=False,
        project=str(work_dir),
        name=name,
        exist_ok=True,
    )
    rows.sort(key=lambda r: r[0])
    names = {int(k): str(v) for k, v in yaml.safe_load(data_yaml.read_text(encoding="utf-8"))["names"].items()}
    per = PerImage(
        [r[0] for r in rows],
        [np.asarray(r[1], bool) for r in rows],
        [np.asarray(r[2], float) for r in rows],
        [np.asarray(r[3], float) for r in rows],
        [np.asarray(r[4], float) for r in rows],
        names,
    )
    official = {k: float(metrics.results_dict[v]) for k, v in METRICS.items()}
    return per, official


def split_groups(staged: StagedDataset, split: str) -> dict[str, str]:
    """{absolute staged image path: group key} for one split (the groups the split kept together)."""
    return {
        os.path.realpath(staged.root / staged.staged[rel]): staged.group_of.get(rel, f"img:{rel}")
        for rel in sorted(staged.staged)
        if staged.split_of(rel) == split
    }


def split_images(staged: StagedDataset, split: str) -> dict[str, str]:
    """{absolute staged image path: modality} for one split."""
    return {
        os.path.realpath(staged.root / staged.staged[rel]): staged.modality_of.get(rel, "unknown")
        for rel in sorted(staged.staged)
        if staged.split_of(rel) == split
    }


def run_split(
    weights: Path,
    staged: StagedDataset,
    split: str,
    *,
    imgsz: int,
    batch: int,
    device: str,
    work_dir: Path,
    tag: str = "pt",
    plots_to: Path | None = None,
) -> SplitRun | None:
    """Validate `weights` on one split of the staged dataset (None when the split has no images); with
    `plots_to`, ultralytics' drawings of this pass (PLOTS) are copied there."""
    images = split_images(staged, split)
    if not images:
        return None
    name = f"{split}-{tag}"
    data_yaml = write_listing_yaml(staged.data_yaml, sorted(images), work_dir, name)
    per, official = validate(
        weights,
        data_yaml,
        imgsz=imgsz,
        batch=batch,
        device=device,
        work_dir=work_dir,
        name=name,
        plots=plots_to is not None,
    )
    if plots_to is not None:
        for plot in PLOTS:
            if (work_dir / name / plot).exists():
                shutil.copyfile(work_dir / name / plot, plots_to / plot)
    return SplitRun(split, per, images, official, split_groups(staged, split))


def write_listing_yaml(source_yaml: Path, images: list[str], work_dir: Path, name: str) -> Path:
    """A data.yaml whose val (and test) is a list file of these images; labels found by /images/ -> /labels/."""
    work_dir.mkdir(parents=True, exist_ok=True)
    listing = work_dir / f"{name}.txt"
    listing.write_text("".join(f"{p}\n" for p in images), encoding="utf-8")
    names = yaml.safe_load(source_yaml.read_text(encoding="utf-8"))["names"]
    # `train` is required by ultralytics' dataset check even for val; point it at the same list.
    data = {"path": str(source_yaml.parent), "train": str(listing), "val": str(listing), "names": names}
    path = work_dir / f"data-{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def summarise(
    run: SplitRun, *, resamples: int = uncertainty.RESAMPLES, seed: int = 0, conf: float = 0.25
) -> dict[str, Any]:
    """The figures the report and the manifest show for one split, each mAP with its 95% interval over the
    split's groups, and precision/recall counted at the deployment confidence `conf`."""
    overall = uncertainty.score(run.per)
    groups = uncertainty.n_groups(run.per.files, run.groups)
    out: dict[str, Any] = {
        "images": len(run.per),
        "groups": groups,
        # Resample groups only when some group holds more than one image (else they are the images).
        "interval_unit": "groups" if groups < len(run.per) else "images",
        "interval_method": "BCa bootstrap",
        "overall": overall | {"ci": uncertainty.bootstrap(run.per, count=resamples, seed=seed, groups=run.groups)},
        "at_conf": uncertainty.at_conf(run.per, conf),
        "per_modality": {},
        "ultralytics": run.ultralytics,
        # The per-image route must reproduce ultralytics' own figures for the same pass.
        "matches_ultralytics": all(abs(overall[k] - v) < 1e-6 for k, v in run.ultralytics.items()),
    }
    for modality, per in run.by_modality().items():
        point = uncertainty.at_conf(per, conf)
        out["per_modality"][modality] = (
            {"images": float(len(per)), "groups": float(uncertainty.n_groups(per.files, run.groups))}
            | uncertainty.score(per)
            | {"ci": uncertainty.bootstrap(per, count=resamples, seed=seed, groups=run.groups)}
            | {"precision_at_conf": point["precision"], "recall_at_conf": point["recall"]}
        )
    if len(run.per.names) > 1:
        out["per_class"] = uncertainty.per_class(run.per)
    return out


def evaluate(
    weights: Path,
    staged: StagedDataset,
    *,
    imgsz: int,
    batch: int,
    device: str,
    work_dir: Path,
    tag: str = "pt",
    plots_to: Path | None = None,
) -> dict[str, SplitRun]:
    """One validation pass per split that has images: {"val": ..., "test": ...}; the val pass's drawings
    copied to `plots_to` when given."""
    runs: dict[str, SplitRun] = {}
    for split in SPLITS:
        run = run_split(
            weights,
            staged,
            split,
            imgsz=imgsz,
            batch=batch,
            device=device,
            work_dir=work_dir,
            tag=tag,
            plots_to=plots_to if split == "val" else None,
        )
        if run is not None:
            runs[split] = run
    return runs


def evaluate_per_modality(
    weights: Path, staged: StagedDataset, *, imgsz: int, batch: int, device: str, work_dir: Path
) -> dict[str, dict[str, float]]:
    """{modality: {"images", "precision", "recall", "map50", "map50_95"}} on the val split (known modalities)."""
    run = run_split(weights, staged, "val", imgsz=imgsz, batch=batch, device=device, work_dir=work_dir)
    if run is None:
        return {}
    return {m: {"images": float(len(per))} | uncertainty.score(per) for m, per in run.by_modality().items()}


def val_images_by_modality(staged: StagedDataset) -> dict[str, list[Path]]:
    """Absolute paths of the staged val images, grouped by modality (modalities without val images omitted)."""
    groups: dict[str, list[Path]] = {}
    for rel, modality in sorted(staged.modality_of.items()):
        if staged.split_of(rel) == "val":
            groups.setdefault(modality, []).append(staged.root / staged.staged[rel])
    return groups


def lagging_modalities(results: dict[str, dict[str, Any]], margin: float) -> list[str]:
    """Modalities whose mAP@0.5 is more than `margin` below the best modality's."""
    if not results:
        return []
    best = max(r["map50"] for r in results.values())
    return sorted(m for m, r in results.items() if r["map50"] < best - margin)


def report_lines(evaluation: dict[str, Any]) -> list[str]:
    """Val and test side by side (overall and per modality), then the per-class tables; mAPs with 95% intervals."""
    if not evaluation:
        return []
    ci = uncertainty.with_interval
    splits = list(evaluation)
    scopes = ["overall", *sorted({m for ev in evaluation.values() for m in ev["per_modality"]})]
    units = ", ".join(
        f"{s}: {evaluation[s].get('groups', evaluation[s]['images'])} {evaluation[s].get('interval_unit', 'images')}"
        for s in splits
    )
    out = [
        f"### Evaluation of best.pt on {' and '.join(splits)}",
        "",
        f"95% intervals: BCa bootstrap resampling whole groups of the split ({units}); consecutive frames "
        "and siblings of one source image are drawn together, so the interval reflects how many independent "
        "samples there are.",
        "",
        "| Scope | " + " | ".join(f"{s} images | {s} mAP@0.5 | {s} mAP@0.5-0.95" for s in splits) + " |",
        "|---" * (1 + 3 * len(splits)) + "|",
    ]
    for scope in scopes:
        cells = []
        for split in splits:
            ev = evaluation[split]
            m = ev["overall"] | {"images": ev["images"]} if scope == "overall" else ev["per_modality"].get(scope)
            if m is None:
                cells += ["0", "-", "-"]
                continue
            cells += [
                str(int(m["images"])),
                ci(m["map50"], m["ci"].get("map50")),
                ci(m["map50_95"], m["ci"].get("map50_95")),
            ]
        out.append(f"| {scope} | " + " | ".join(cells) + " |")
    out += ["", "Per-modality rows cover only images whose modality is known.", ""]
    for split, ev in evaluation.items():
        if ev.get("per_class"):
            out += [
                f"**Per class ({split}):**",
                "",
                "| Class | Images | Instances | Precision | Recall | mAP@0.5 | mAP@0.5-0.95 |",
                "|---|---|---|---|---|---|---|",
            ]
            out += [
                f"| {name} | {int(c['images'])} | {int(c['instances'])} | {c['precision']:.3f} | {c['recall']:.3f} | "
                f"{c['map50']:.3f} | {c['map50_95']:.3f} |"
                for name, c in ev["per_class"].items()
            ]
            out.append("")
    return out
