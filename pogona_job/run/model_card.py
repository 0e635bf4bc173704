"""model_card.md: what someone deploying this run's best.pt needs, on one page.

Data and splits with counts, classes, the deployment confidence, the metrics with their intervals
(overall, per modality, per class), the known limits the job can see for itself (modalities it
could not tell, modalities with few images, near-duplicates across the split), lineage, and how to
run the model. Everything comes from the RunRecord, the same as the report.
"""

from __future__ import annotations

from typing import Any

from pogona_job.run.state import RunRecord

FEW_IMAGES = 20  # a modality with fewer val images than this has an interval too wide to lean on


def _metric(m: dict[str, Any], key: str) -> str:
    ci = (m.get("ci") or {}).get(key)
    value = m.get(key)
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


def render(record: RunRecord, conf: float) -> str:
    ds = record.dataset
    base = f"{record.output_uri}/{record.run_id}"
    out = [
        f"# Model card - {record.run_id}",
        "",
        f"- **Status**: {record.status}" + (f" ({record.failure})" if record.failure else ""),
        f"- **Model**: {record.model}, weights `{base}/weights/best.pt`"
        + (" and `weights/best.onnx`" if record.export.get("verified") else ""),
        f"- **Classes** ({len(record.classes)}): {', '.join(record.classes)}",
        f"- **Deployment confidence**: {conf:.2f} (`POGONA_CONF`; `predict` and the report's error analysis use it)",
        "",
        "## Data",
        "",
        f"{ds.get('images', '?')} images, {ds.get('boxes', '?')} labelled boxes, "
        f"{ds.get('backgrounds', 0)} backgrounds, "
        f"from `{ds.get('uri', '?')}` (fingerprint `{ds.get('fingerprint', '?')}`).",
        "",
    ]
    counts: dict[str, dict[str, int]] = ds.get("counts") or {}
    if counts:
        modalities = sorted({m for per in counts.values() for m in per})
        out += ["| Split | " + " | ".join(modalities) + " | Total |", "|---" * (len(modalities) + 2) + "|"]
        out += [
            f"| {split} | " + " | ".join(str(per.get(m, 0)) for m in modalities) + f" | {sum(per.values())} |"
            for split, per in counts.items()
        ]
        out.append("")
    out += ["## Metrics (best.pt, 95% intervals)", ""]
    if not record.evaluation:
        out += ["Not evaluated (the run did not reach the evaluation).", ""]
    for split, ev in record.evaluation.items():
        out += [
            f"**{split}** ({ev['images']} images)",
            "",
            "| Scope | Images | Precision | Recall | mAP@0.5 | mAP@0.5-0.95 |",
            "|---|---|---|---|---|---|",
        ]
        scopes = [("overall", ev["overall"] | {"images": ev["images"]}), *ev.get("per_modality", {}).items()]
        scopes += [(f"class {n}", c) for n, c in (ev.get("per_class") or {}).items()]
        for name, m in scopes:
            p, r = m.get("precision"), m.get("recall")
            out.append(
                f"| {name} | {int(m.get('images', 0))} | {p if p is None else f'{p:.3f}'} | "
                f"{r if r is None else f'{r:.3f}'} | {_metric(m, 'map50')} | {_metric(m, 'map50_95')} |"
            )
        out.append("")
    out += ["## Known limits", "", *[f"- {x}" for x in limits(record)], ""]
    lineage = record.config
    out += [
        "## Lineage",
        "",
        f"- Run `{record.run_id}` (attempt {record.attempt}), started {record.started_at}",
        f"- Model `{lineage.get('POGONA_MODEL', record.model)}`, {lineage.get('POGONA_EPOCHS')} epochs, imgsz "
        f"{lineage.get('POGONA_IMGSZ')}, seed {lineage.get('POGONA_SEED')}",
        f"- Dataset `{ds.get('uri', '?')}`, fingerprint `{ds.get('fingerprint', '?')}`; "
        f"split lists in `{base}/dataset/`",
        f"- Report: `{base}/report.html`; manifest: `{base}/manifest.json`",
        "",
        "## How to run it",
        "",
        "```sh",
        f"pogona-job predict --model {record.run_id} photos/ predicted/        # POGONA_OUTPUT_URI={record.output_uri}",
        f"pogona-job predict --model {base}/weights/best.onnx photos/ out/  # onnxruntime only",
        "```",
        "",
        "```python",
        "import onnxruntime as ort  # input 1x3xHxW float RGB in [0, 1], letterboxed; output 1x(4+classes)xN",
        'session = ort.InferenceSession("best.onnx", providers=["CPUExecutionProvider"])',
        "```",
        "",
    ]
    return "\n".join(out)


def limits(record: RunRecord) -> list[str]:
    ds = record.dataset
    found: list[str] = []
    sources: dict[str, dict[str, int]] = ds.get("modality_sources") or {}
    unknown = sum(per.get("unknown", 0) for per in sources.values())
    inferred = sum(per.get("inferred", 0) for per in sources.values())
    if unknown:
        found.append(f"{unknown} images of unknown modality: they count overall but in no modality's row.")
    if inferred:
        found.append(f"{inferred} images had their modality inferred from pixels: per-modality rows are estimates.")
    val = (record.evaluation.get("val") or {}).get("per_modality") or {}
    for modality, m in val.items():
        if m.get("images", 0) < FEW_IMAGES:
            found.append(f"{modality}: only {int(m['images'])} val images, so its interval is wide.")
    for modality in record.lagging:
        found.append(f"{modality} images lag the others: expect more misses there.")
    leak = ds.get("leakage") or {}
    if leak.get("pairs"):
        found.append(
            f"{leak['pairs']} near-duplicate pairs across the split ({leak.get('share', 0):.1%} of val/test): "
            "the metrics may be optimistic."
        )
    if ds.get("dropped"):
        found.append(f"{len(ds['dropped'])} images were dropped by lenient validation (dataset/problems.txt).")
    return found or ["None detected by the job (it cannot see a shift between these images and deployment)."]
