"""The markdown training log, modelled on the project's origin log and filled from what happened.

Pure rendering: `render(record)` turns a `RunRecord` into markdown. A failed run gets a
report too, with the numbers seen so far and what to try next.
"""

from __future__ import annotations

import math
from typing import Any

from pogona_job.run.budget import report_lines
from pogona_job.run.state import RunRecord
from pogona_job.training.columns import LOSSES, METRICS, loss_column
from pogona_job.training.gate import train_total
from pogona_job.training.phase import PhaseResult


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}"


def _trend(rows: list[dict[str, float]]) -> str:
    if not rows:
        return "no epoch completed"
    if any(not math.isfinite(train_total(r)) for r in rows):
        return "NaN/inf"
    if all(r[loss_column("box_loss")] == 0 and r[loss_column("dfl_loss")] == 0 for r in rows):
        return "box/dfl all zeros"
    if len(rows) < 2:
        return "one epoch"
    first, last = train_total(rows[0]), train_total(rows[-1])
    return f"{'decreasing' if last < first else 'not decreasing'} ({first:.3f} -> {last:.3f})"


def _status(result: PhaseResult | None, passed: bool) -> str:
    if result is None:
        return "not run"
    return "✅ WORKING" if passed else "❌ BROKEN"


def _phase_section(title: str, result: PhaseResult, record: RunRecord) -> list[str]:
    rows = result.rows
    cfg = record.config
    out = [
        f"### {title}",
        f"- **Hardware**: {result.hardware.line()}",
        f"- **Duration**: {result.seconds / 60:.2f} minutes ({len(rows)} epoch{'s' if len(rows) != 1 else ''})",
        *[
            f"- **{label}**: {record.settings_used[key]}"
            for key, label in (("workers_reason", "Workers"), ("batch", "Batch"), ("cache", "Cache"), ("amp", "AMP"))
            if key in record.settings_used
        ],
        "",
        "**Configuration:**",
        "```yaml",
        f"epochs: {len(rows)}",
        f"batch: {cfg.get('POGONA_BATCH')}",
        f"device: {result.hardware.device}",
        f"imgsz: {cfg.get('POGONA_IMGSZ')}",
        f"optimizer: {cfg.get('POGONA_OPTIMIZER')}",
        f"lr0: {cfg.get('POGONA_LR0')}",
        f"workers: {record.settings_used.get('workers')}  # requested {cfg.get('POGONA_WORKERS')}",
        f"seed: {cfg.get('POGONA_SEED')}",
        "```",
        "",
    ]
    if rows:
        last = rows[-1]
        out += [
            f"**Final metrics (epoch {int(last['epoch'])}):**",
            f"- **mAP@0.5**: {_num(last.get(METRICS['map50']))}",
            f"- **Recall**: {_num(last.get(METRICS['recall']))}",
            f"- **Precision**: {_num(last.get(METRICS['precision']))}",
            f"- **mAP@0.5-0.95**: {_num(last.get(METRICS['map50_95']))}",
            "",
            "**Loss progression:**",
            "",
            "| Epoch | Box Loss | Cls Loss | DFL Loss | mAP@0.5 | Seconds |",
            "|-------|----------|----------|----------|---------|---------|",
        ]
        prev_time = 0.0
        for row in rows:
            seconds = row.get("time", 0.0) - prev_time
            prev_time = row.get("time", 0.0)
            losses = " | ".join(_num(row.get(loss_column(k))) for k in LOSSES)
            out.append(f"| {int(row['epoch'])} | {losses} | {_num(row.get(METRICS['map50']))} | {seconds:.1f} |")
        out.append("")
    else:
        out += ["No epoch completed.", ""]
    return out


def _recommendations(record: RunRecord) -> list[str]:
    """Derived from the numbers, not canned: each line cites what triggered it."""
    recs: list[str] = []
    if record.status == "failed" and record.failed_phase in ("sanity", "gate", "parity"):
        recs.append("Do not start a long run on this backend or data until the sanity check passes (see above).")
        if record.settings_used.get("device") not in (None, "cpu"):
            recs.append(
                "Re-run the sanity epochs with `POGONA_DEVICE=cpu` to separate a backend bug from a data problem."
            )
        recs.append(
            "Check the labels with `pogona-job dataset validate DIR` (empty or unfindable labels show the same zeros)."
        )
        return recs
    if record.status != "succeeded":
        recs.append(f"The run did not finish ({record.status}): {record.failure or 'see the log'}.")
        if record.status == "interrupted":
            recs.append("Start it again with the same POGONA_RUN_ID to resume from the last checkpoint.")
        return recs
    full = record.full.rows if record.full else []
    if full:
        map50 = full[-1].get(METRICS["map50"], 0.0)
        best_epoch = max(full, key=lambda r: r.get(METRICS["map50"], 0.0))
        gain_last5 = map50 - full[max(0, len(full) - 6)].get(METRICS["map50"], 0.0)
        if map50 < 0.5:
            recs.append(
                f"mAP@0.5 is {map50:.3f}: train longer (POGONA_EPOCHS, now {len(full)}), use pretrained weights, "
                "or check the labels."
            )
        elif len(full) >= 6 and gain_last5 > 0.02:
            recs.append(f"mAP@0.5 still rose by {gain_last5:.3f} over the last 5 epochs: more epochs should pay off.")
        elif int(best_epoch["epoch"]) < len(full) - 5:
            recs.append(
                f"The best mAP@0.5 came at epoch {int(best_epoch['epoch'])} of {len(full)}: fewer epochs (or "
                "early-stopping patience) would save GPU time."
            )
        else:
            recs.append(f"mAP@0.5 {map50:.3f} has levelled off: this model is ready to evaluate on held-out data.")
    for modality in record.lagging:
        recs.append(f"The {modality} images lag the others (table above): add or check {modality} labels.")
    if record.settings_used.get("workers_reason", "").startswith("0 (requested"):
        recs.append("Dataloader workers were disabled by a small /dev/shm: run with --ipc=host or --shm-size=8g.")
    return recs


def _dataset_provenance(ds: dict[str, Any]) -> list[str]:
    """How the data was read: layout, where names and split came from, modality sources, leakage."""
    if not ds.get("layout_label"):
        return []
    out = [
        "",
        f"Read as **{ds['layout_label']}**; class names from {ds.get('names_source')}; "
        f"split {'from the export' if ds.get('split_source') == 'export' else 'made by the job (by group)'}.",
    ]
    sources: dict[str, dict[str, int]] = ds.get("modality_sources", {})
    if sources:
        kinds = ["declared", "pattern", "inferred", "unknown"]
        out += ["", "| Modality | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
        out += [f"| {m} | " + " | ".join(str(per.get(k, 0)) for k in kinds) + " |" for m, per in sources.items()]
        total = sum(sum(per.values()) for per in sources.values())
        guessed = sum(per.get("inferred", 0) + per.get("unknown", 0) for per in sources.values())
        if total and guessed > total / 2:
            out += [
                "",
                f"Modality is mostly inferred from pixels ({guessed} of {total} images): per-modality numbers "
                "are estimates; declare it with POGONA_MODALITY_RULES or a groups.csv `modality` column.",
            ]
    leak = ds.get("leakage") or {}
    if leak:
        line = (
            f"Near-duplicates across the split: {leak.get('pairs', 0)} pairs; "
            f"{leak.get('share', 0):.1%} of val/test images have one in another split"
        )
        examples = leak.get("examples") or []
        if examples:
            line += " (e.g. " + "; ".join(f"`{a}` ~ `{b}`" for a, b, _ in examples[:3]) + ")"
        out += ["", ("**Warning:** " if leak.get("warn") else "") + line + "."]
    return out


def render(record: RunRecord) -> str:
    ds = record.dataset
    sanity_rows = record.sanity.rows if record.sanity else []
    full_rows = record.full.rows if record.full else []
    trained = record.full or record.sanity
    params = trained.params if trained else None
    out = [
        f"# Training Log - {record.run_id}",
        "",
        f"**Status: {record.status.upper()}**" + (f" (exit {record.exit_code})" if record.exit_code else ""),
    ]
    if record.failure:
        out += ["", f"> **What went wrong:** {record.failure}"]
    if "model_card.md" in record.artifacts:
        out += ["", "[Model card](model_card.md) · [report.html](report.html) · [manifest.json](manifest.json)"]
    if record.accounting:
        out += ["", f"**Cost and time:** {record.accounting['summary']}"]
    out += [
        "",
        "## Project Overview",
        f"- **Model**: {record.model}" + (f" ({params / 1e6:.2f}M parameters)" if params else ""),
        f"- **Dataset**: {ds.get('images', '?')} images, {ds.get('boxes', '?')} labelled boxes, "
        f"{ds.get('backgrounds', 0)} background images ({ds.get('uri', '')})",
        f"- **Classes**: {len(record.classes)} ({', '.join(record.classes)})",
        f"- **Run**: `{record.run_id}`, attempt {record.attempt}, started {record.started_at}",
    ]
    counts: dict[str, dict[str, int]] = ds.get("counts", {})
    if counts:
        modalities = sorted({m for split in counts.values() for m in split})
        out += ["", "| Split | " + " | ".join(modalities) + " | Total |", "|---" * (len(modalities) + 2) + "|"]
        for split, per in counts.items():
            cells = " | ".join(str(per.get(m, 0)) for m in modalities)
            out.append(f"| {split} | {cells} | {sum(per.values())} |")
    out += _dataset_provenance(ds)
    if ds.get("dropped"):
        out += [
            "",
            f"Dropped by the lenient validation policy: {len(ds['dropped'])} images (see dataset/problems.txt).",
        ]
    out += ["", "## Training History", ""]
    if record.parity is not None:
        p = record.parity
        out += [
            "### Backend parity probe",
            f"{'✅ passed' if p.passed else '❌ FAILED'}: one batch, same weights, CPU vs `{p.device}` "
            f"(tolerance {p.tolerance:.0%}). {p.reason}",
            "",
            "| Loss | CPU | Device |",
            "|---|---|---|",
            *[f"| {k} | {_num(v, 4)} | {_num(p.accelerator.get(k), 4)} |" for k, v in p.cpu.items()],
            "",
        ]
    elif record.parity_note:
        out += [f"*Backend parity probe: {record.parity_note}.*", ""]
    if record.sanity:
        out += _phase_section("Sanity check", record.sanity, record)
    if record.watchdog.get("tripped"):
        out += [
            f"**Batch watchdog stopped the run** after {record.watchdog.get('batches')} batches: "
            f"{record.watchdog['tripped']}.",
            "",
            "| Batch (last seen) | Box Loss | Cls Loss | DFL Loss |",
            "|---|---|---|---|",
            *[
                f"| {record.watchdog['batches'] - len(record.watchdog.get('last_batches', [])) + i + 1} | "
                + " | ".join(_num(b.get(k), 4) for k in LOSSES)
                + " |"
                for i, b in enumerate(record.watchdog.get("last_batches", []))
            ],
            "",
        ]
    if record.verdict:
        out += [
            f"### Sanity verdict: {'PASSED' if record.verdict.passed else 'FAILED'}",
            "",
            "| Criterion | Threshold | Observed | Result |",
            "|---|---|---|---|",
            *[
                f"| {c.name} | {c.threshold} | {c.observed} | {'✅ pass' if c.passed else '❌ fail'} |"
                for c in record.verdict.criteria
            ],
            "",
        ]
    if record.full:
        out += _phase_section("Full training", record.full, record)
    out += [
        "## Analysis",
        "",
        "| Phase | Backend | Losses | Final mAP@0.5 | Learning Status |",
        "|---|---|---|---|---|",
    ]
    sanity_ok = bool(record.verdict and record.verdict.passed) and not record.watchdog.get("tripped")
    for name, result, ok in (
        ("Sanity", record.sanity, sanity_ok),
        ("Full", record.full, record.status == "succeeded"),
    ):
        rows = result.rows if result else []
        backend = result.hardware.device if result else record.settings_used.get("device", "-")
        final = _num(rows[-1].get(METRICS["map50"])) if rows else "-"
        out.append(f"| {name} | {backend} | {_trend(rows)} | {final} | {_status(result, ok)} |")
    out.append("")
    if sanity_rows and full_rows:
        s, f = sanity_rows[-1], full_rows[-1]
        out += [
            "### Full run against the sanity baseline",
            "",
            "| Metric | Sanity | Full | Change |",
            "|---|---|---|---|",
        ]
        for label, key in (
            ("mAP@0.5", "map50"),
            ("mAP@0.5-0.95", "map50_95"),
            ("Precision", "precision"),
            ("Recall", "recall"),
        ):
            a, b = s.get(METRICS[key], 0.0), f.get(METRICS[key], 0.0)
            out.append(f"| {label} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
        out.append("")
    if record.per_modality:
        from pogona_job.evaluation.uncertainty import with_interval

        out += [
            "### Per-modality validation (best.pt)",
            "",
            "| Modality | Images | Precision | Recall | mAP@0.5 | mAP@0.5-0.95 | Flag |",
            "|---|---|---|---|---|---|---|",
        ]
        for modality, m in record.per_modality.items():
            flag = "⚠️ lags" if modality in record.lagging else ""
            ci = m.get("ci", {})
            out.append(
                f"| {modality} | {int(m.get('images', 0))} | {_num(m.get('precision'))} | {_num(m.get('recall'))} | "
                f"{with_interval(m['map50'], ci.get('map50'))} | {with_interval(m['map50_95'], ci.get('map50_95'))} | "
                f"{flag} |"
            )
        out.append("")
    if record.evaluation:
        from pogona_job.evaluation import export, promotion, scoring

        out += scoring.report_lines(record.evaluation) + export.report_lines(record.export)
        out += promotion.report_lines(record.promotion)
    out += record.error_analysis
    out += ["## Recommendations", "", *[f"{i}. {r}" for i, r in enumerate(_recommendations(record), 1)], ""]
    out += report_lines(record.accounting)
    if record.timings:
        out += ["## Timings", "", "| Phase | Seconds |", "|---|---|"]
        out += [f"| {k} | {v:.1f} |" for k, v in record.timings.items()]
        out.append("")
    if record.artifacts:
        base = f"{record.output_uri}/{record.run_id}"
        out += ["## File Locations", ""]
        out += [f"- `{base}/{key}`" for key in record.artifacts]
        out.append("")
    plots = [k for k in record.artifacts if k.startswith("plots/")]
    if plots:
        out += ["## Plots", ""]
        out += [f"![{k.removeprefix('plots/')}]({k})" for k in plots]
        out.append("")
    return "\n".join(out)
