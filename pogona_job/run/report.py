"""The markdown training log, modelled on the project's origin log and filled from what happened.

Pure rendering: `render(record)` turns a `RunRecord` into markdown. A failed run gets a
report too, with the numbers seen so far and what to try next.
"""

from __future__ import annotations

import math

from pogona_job.evaluation.headline import FITNESS_LABEL, fitness
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
        head = record.headline if result is record.full else None
        if head is not None and head.epoch == int(last["epoch"]):
            label = (
                f"Last epoch ({int(last['epoch'])}, also best.pt's epoch), as ultralytics validated it during training"
            )
        elif head is not None:
            label = (
                f"Last epoch ({int(last['epoch'])}, not the shipped best.pt of epoch {head.epoch}), "
                "as ultralytics validated it during training"
            )
        else:
            label = f"Last epoch ({int(last['epoch'])}), as ultralytics validated it during training"
        out += [
            f"**{label}:**",
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


def _training_advice(record: RunRecord) -> list[str]:
    """From the metric that picks best.pt (mAP@0.5-0.95, headline.FITNESS_WEIGHTS) and only what the rows show."""
    rows = record.full.rows if record.full else []
    head = record.headline
    if not rows or head is None:
        return []
    out: list[str] = []
    fit = [fitness(r) for r in rows]
    n = len(rows)
    tail = max(1, math.ceil(n / 10))  # the last tenth of training
    rose_late = n > tail and max(fit[-tail:]) > max(fit[:-tail]) + 1e-9
    if head.map50 < 0.5:
        out.append(
            f"best.pt's mAP@0.5 on val is {head.metric('map50')}: train longer (POGONA_EPOCHS, now {n}"
            + (f"; {FITNESS_LABEL}, which picks best.pt, still rose at the end" if rose_late else "")
            + f"; best.pt is epoch {head.epoch} by {FITNESS_LABEL}), use pretrained weights, or check the labels."
        )
    elif rose_late:
        out.append(
            f"{FITNESS_LABEL} (the metric that picks best.pt) still rose in the last tenth of training (epochs "
            f"{n - tail + 1}-{n}): more epochs should pay off."
        )
    elif head.epoch is not None and n - head.epoch >= max(5, 2 * tail):
        out.append(
            f"{FITNESS_LABEL} (the metric that picks best.pt) peaked at epoch {head.epoch} of {n} and did not rise "
            f"in the {n - head.epoch} epochs after: early-stopping patience (POGONA_PATIENCE) near "
            f"{max(5, n - head.epoch - 1)} would have saved that time with the same best.pt."
        )
    elif n < 5:
        out.append(f"Only {n} epochs: too few to tell whether more would pay off.")
    else:
        out.append(f"{FITNESS_LABEL} has levelled off at best.pt (epoch {head.epoch} of {n}).")
    if head.map50_ci and head.map50_ci[1] - head.map50_ci[0] > 0.2:
        unit = f"{head.groups} groups" if head.interval_unit == "groups" else f"{head.images} images"
        out.append(
            f"The 95% interval of mAP@0.5 is {head.map50_ci[1] - head.map50_ci[0]:.2f} wide because val holds only "
            f"{unit}: more independent val images (new recordings, not more frames of the same ones) narrow it."
        )
    full = record.full
    if full is not None and full.hardware.device == "cpu" and n:
        per_epoch = full.seconds / n
        cfg = record.config
        extra = " and pretrained weights instead of a from-scratch .yaml" if str(record.model).endswith(".yaml") else ""
        out.append(
            f"This run trained on the CPU ({per_epoch:.0f} s per epoch at imgsz {cfg.get('POGONA_IMGSZ')}). A CUDA "
            f"GPU runs the same epochs many times faster, which makes room for more epochs, imgsz 640{extra} in "
            "the same time; the numbers above are this CPU run's."
        )
    return out


def _recommendations(record: RunRecord) -> list[str]:
    """Derived from the numbers, not canned: each line cites what triggered it."""
    recs: list[str] = []
    if record.failed_phase == "final verdict":
        recs.append(
            "Do not deploy this best.pt: it scored below POGONA_MIN_FINAL_MAP50 on val (see above); latest.json and "
            "champion.json still name the previous runs."
        )
        recs += _training_advice(record)
        recs.append(
            "Check the labels with `pogona-job dataset validate DIR` and look at plots/val_batch0_labels.png beside "
            "plots/val_batch0_pred.png."
        )
        return recs
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
    recs += _training_advice(record)
    for modality in record.lagging:
        recs.append(f"The {modality} images lag the others (table above): add or check {modality} labels.")
    if record.settings_used.get("workers_reason", "").startswith("0 (requested"):
        recs.append("Dataloader workers were disabled by a small /dev/shm: run with --ipc=host or --shm-size=8g.")
    return recs


def _dataset_provenance(record: RunRecord) -> list[str]:
    """How the data was read: layout, where names and split came from, modality sources, leakage; with the
    thumbnails (uploaded under plots/) that let a user check the automatic modality and near-duplicate calls."""
    ds = record.dataset
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
        inferred = sum(per.get("inferred", 0) for per in sources.values())
        unknown = sum(per.get("unknown", 0) for per in sources.values())
        if total and inferred + unknown > total / 2:
            out += [
                "",
                (
                    f"Modality is mostly inferred from pixels ({inferred} of {total} images)"
                    if not unknown
                    else f"Modality is mostly not declared ({inferred} of {total} images inferred from pixels, "
                    f"{unknown} unknown)"
                )
                + ": per-modality numbers are estimates; declare it with POGONA_MODALITY_RULES "
                "or a groups.csv `modality` column.",
            ]
        if inferred + unknown:  # the pixel rule decided some images: say what it cannot tell apart
            from pogona_job.dataset import GREY_SENTENCE

            out += ["", GREY_SENTENCE]
    if record.modality_sheets:
        out += [
            "",
            "Images whose modality was judged from their pixels, a few per answer (every image's answer and its "
            "evidence: `dataset/modality.csv`):",
            "",
            *[f"- **{m}**: ![{m} images]({key})" for m, key in record.modality_sheets.items()],
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
        if leak.get("compared"):
            out += ["", f"Compared: {leak['compared']}."]
        if "alike_but_labels_differ" in leak:
            out += [
                "",
                f"Alike as whole images but different where the labels are: {leak['alike_but_labels_differ']} "
                "pairs, not counted as near-duplicates.",
            ]
        for kind, count_key, caption in (
            ("examples", "pairs", "Near-duplicate pairs"),
            ("alike_but_labels_differ_examples", "alike_but_labels_differ", "Alike, but the labelled regions differ"),
        ):
            if kind in record.leakage_sheets:
                shown = f"{len(leak.get(kind) or [])} of {leak.get(count_key, 0)} shown, one pair a row"
                out += ["", f"{caption} ({shown}):", "", f"![{caption}]({record.leakage_sheets[kind]})"]
    return out


def _headline_lines(record: RunRecord) -> list[str]:
    """The first screen: the shipped model's numbers, its epoch and interval, and which number is which."""
    head = record.headline
    if head is None:
        return []
    shipped = "best.pt, shipped" if record.status == "succeeded" else "best.pt, published for inspection only"
    out = ["", f"**Model ({shipped}):** {head.line()}."]
    if record.final_verdict and not record.final_verdict.get("passed", True):
        out += [
            "",
            f"**Final verdict: FAILED** - below the floor POGONA_MIN_FINAL_MAP50 "
            f"{record.final_verdict.get('floor')}: this model does not find what it was trained for.",
        ]
    elif record.final_verdict:
        out += [
            "",
            "**Final verdict: passed** (mAP@0.5 at or above POGONA_MIN_FINAL_MAP50 "
            f"{record.final_verdict.get('floor')}).",
        ]
    for extra in (head.last_epoch_text(), head.which_is_which()):
        if extra:
            out += ["", f"*{extra}*"]
    return out


def _plot_lines(record: RunRecord) -> list[str]:
    """Each plot once; the confusion matrix with its confidence and counts, the val batch labels beside predictions."""
    shown = {*record.modality_sheets.values(), *record.leakage_sheets.values()}  # with the dataset, above
    plots = [k for k in record.artifacts if k.startswith("plots/") and k not in shown]
    if not plots:
        return []
    out = ["## Plots", ""]
    pair = ("plots/val_batch0_labels.png", "plots/val_batch0_pred.png")
    at = (record.evaluation.get("val") or {}).get("at_conf")
    for k in plots:
        if k in pair and all(p in plots for p in pair):
            if k == pair[0]:
                out += [
                    "| Labels (val batch 0) | best.pt's predictions (same batch) |",
                    "|---|---|",
                    f"| ![labels]({pair[0]}) | ![predictions]({pair[1]}) |",
                    "",
                ]
            continue
        out.append(f"![{k.removeprefix('plots/')}]({k})")
        if k == "plots/confusion_matrix.png" and at:
            from pogona_job.evaluation.plots import caption

            out += ["", f"*{caption(at)}*", ""]
    out.append("")
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
    out += _headline_lines(record)
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
    out += _dataset_provenance(record)
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
        "| Phase | Backend | Losses | mAP@0.5 | Learning Status |",
        "|---|---|---|---|---|",
    ]
    sanity_ok = bool(record.verdict and record.verdict.passed) and not record.watchdog.get("tripped")
    verdict_ok = record.final_verdict.get("passed", True) if record.final_verdict else True
    head = record.headline
    for name, result, ok in (
        ("Sanity", record.sanity, sanity_ok),
        ("Full", record.full, record.status == "succeeded" and verdict_ok),
    ):
        rows = result.rows if result else []
        backend = result.hardware.device if result else record.settings_used.get("device", "-")
        if name == "Full" and head is not None:
            final = f"{head.metric('map50')} best.pt, epoch {head.epoch}"
        else:
            final = f"{_num(rows[-1].get(METRICS['map50']))} last epoch" if rows else "-"
        status = _status(result, ok)
        if not verdict_ok and result is not None:  # never "working" beside a model that failed the final verdict
            status = "❌ NOT LEARNING (final verdict)" if name == "Full" else "gate passed"
        out.append(f"| {name} | {backend} | {_trend(rows)} | {final} | {status} |")
    out.append("")
    best_row = next((r for r in full_rows if head is not None and int(r["epoch"]) == head.epoch), None)
    if sanity_rows and full_rows:
        s, f = sanity_rows[-1], best_row or full_rows[-1]
        which = f"epoch {int(f['epoch'])}" + (", best.pt" if best_row else ", last")
        out += [
            "### Full run against the sanity baseline",
            "",
            "Both as ultralytics validated them during training (the sanity run's last epoch; the full run's "
            f"{which}).",
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
            f"Precision and recall at confidence {record.headline.conf:g} (POGONA_CONF), as in the headline."
            if record.headline
            else "",
            "",
            "| Modality | Images | Precision | Recall | mAP@0.5 | mAP@0.5-0.95 | Flag |",
            "|---|---|---|---|---|---|---|",
        ]
        for modality, m in record.per_modality.items():
            flag = "⚠️ lags" if modality in record.lagging else ""
            ci = m.get("ci", {})
            out.append(
                f"| {modality} | {int(m.get('images', 0))} | {_num(m.get('precision_at_conf', m.get('precision')))} | "
                f"{_num(m.get('recall_at_conf', m.get('recall')))} | "
                f"{with_interval(m['map50'], ci.get('map50'))} | {with_interval(m['map50_95'], ci.get('map50_95'))} | "
                f"{flag} |"
            )
        unknown = int((record.dataset.get("counts") or {}).get("val", {}).get("unknown", 0))
        if unknown:  # scoring leaves them out of every row: say where they went
            out += [
                "",
                f"{unknown} val images of `unknown` modality count in the overall figures and in no row here "
                "(how each image's modality was read: the dataset section above).",
            ]
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
    out += _plot_lines(record)
    return "\n".join(out)
