"""Publication: the run's outputs, then manifest.json LAST, then latest.json and the champion.

Readers trust the manifest: everything it lists is uploaded (with its sha256) before it is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pogona_job.errors import JobError
from pogona_job.logs import get_logger
from pogona_job.run.manifest import Manifest
from pogona_job.run.report import render
from pogona_job.run.state import FINAL, Job, RunRecord, now
from pogona_job.s3 import pointers, storage
from pogona_job.s3.storage import S3Path

log = get_logger()
PLOTS = ("results.png", "BoxPR_curve.png", "confusion_matrix.png", "val_batch0_pred.jpg")


def upload(job: Job, items: list[tuple[Path, str]]) -> list[storage.Artifact]:
    pairs = [(path, job.out / key) for path, key in items if path.exists()]
    artifacts = storage.upload_many(job.client, pairs, threads=job.settings.s3_threads)
    job.sums.update({a.key.removeprefix(job.out.key + "/"): a for a in artifacts})
    return artifacts


def push_outputs(job: Job, save_dir: Path, split_files: list[Path]) -> None:
    items: list[tuple[Path, str]] = [
        (save_dir / "results.csv", "results.csv"),
        (save_dir / "weights" / "best.pt", "weights/best.pt"),
        (save_dir / "weights" / "last.pt", "weights/last.pt"),
        (save_dir / "weights" / "best.onnx", "weights/best.onnx"),  # when exported (export.py)
        *[(f, f"dataset/{f.name}") for f in split_files],
    ]
    for name in PLOTS:
        src = save_dir / name
        if src.suffix == ".jpg" and src.exists():  # the contract promises plots/*.png
            from PIL import Image

            png = src.with_suffix(".png")
            Image.open(src).save(png)
            src = png
        items.append((src, f"plots/{src.name}"))
    upload(job, items)


def publish(job: Job) -> None:
    """config.json and report.md, then manifest.json LAST, then latest.json: readers trust the manifest."""
    rec = job.record
    if job.lease is not None:  # prove we still hold the run right before writing its outputs
        job.lease.confirm()
    if job.live is not None:
        rec.accounting = job.live.tracker.summary(rec.status)
    config_path = job.work / "config.json"
    config_path.write_text(json.dumps(rec.config, indent=2, sort_keys=True, default=str))
    rec.artifacts = sorted({*job.sums, "config.json", "report.md"})
    report_path = job.work / "report.md"
    report_path.write_text(render(rec))
    upload(job, [(config_path, "config.json"), (report_path, "report.md")])
    manifest = manifest_of(job)
    written = pointers.update(
        job.client,
        job.out / "manifest.json",
        lambda current: None if (current or {}).get("status") in FINAL else manifest,
    )
    if written is None:
        log.warning("the run's manifest is already final; left as it is")
        return
    job.final = rec.status in FINAL
    if rec.status == "succeeded":
        advance_latest(job.client, S3Path.parse(job.settings.output_uri or ""), manifest)
        from pogona_job.evaluation import promotion

        promotion.promote(job.client, job.settings.output_uri or "", manifest, job.settings.imgsz)


def advance_latest(client: Any, output: S3Path, manifest: dict[str, Any]) -> None:
    """Point `<output>/latest.json` at this succeeded run unless it names one that finished later.

    A compare-and-swap on the ETag, retried on conflict: two runs finishing together never move
    it backwards, and an unreadable latest.json is replaced."""
    run = output / str(manifest["run_id"])
    pointer = {
        "run_id": manifest["run_id"],
        "manifest": (run / "manifest.json").uri,
        "finished_at": manifest["finished_at"],
    }

    def decide(current: dict[str, Any] | None) -> dict[str, Any] | None:
        if current is not None and str(current.get("finished_at", "")) >= pointer["finished_at"]:
            return None  # already this run, or a later one
        return pointer

    pointers.update(client, output / "latest.json", decide)


def complete_finished(job: Job, manifest: dict[str, Any]) -> None:
    """A retry of a finished run finishes what a kill after its manifest left undone (partial: never latest)."""
    if manifest.get("status") == "succeeded":
        from pogona_job.evaluation import promotion

        advance_latest(job.client, S3Path.parse(job.settings.output_uri or ""), manifest)
        promotion.promote(job.client, job.settings.output_uri or "", manifest, job.settings.imgsz)
    storage.delete_prefix(job.client, job.out / "checkpoint")
    lease = pointers.read(job.client, job.out / "lease.json")  # a dead attempt's, killed after the manifest
    if lease.etag is not None:
        pointers.delete(job.client, job.out / "lease.json", expected=lease.etag)


def manifest_of(job: Job) -> dict[str, Any]:
    """The run's manifest.json, checked against run/manifest.py's model (its schema is published)."""
    import torch
    import ultralytics

    rec = job.record
    trained = rec.full or rec.sanity
    manifest = {
        "status": rec.status,
        "exit_code": rec.exit_code or 0,
        "failure": rec.failure,
        "failed_phase": rec.failed_phase,
        "run_id": job.run_id,
        "attempt": job.attempt,
        "started_at": rec.started_at,
        "finished_at": rec.finished_at or now(),
        "timings_s": rec.timings,
        "metrics": final_numbers(rec),
        "sanity_metrics": final_of(rec.sanity.rows) if rec.sanity else {},
        "verdict": rec.verdict.as_dict() if rec.verdict else None,
        "parity": rec.parity.__dict__ if rec.parity else None,
        "watchdog": rec.watchdog,
        "per_modality": rec.per_modality,
        "evaluation": rec.evaluation,  # val and test: overall, per modality, per class, 95% intervals
        "export": rec.export,
        "promotion": rec.promotion,
        "classes": rec.classes,
        "lineage": lineage_of(job),
        "dataset": rec.dataset,
        "model": rec.model,
        "versions": {
            "torch": torch.__version__,
            "ultralytics": ultralytics.__version__,
            "cuda": torch.version.cuda,
            "python": sys.version.split()[0],
        },
        "device": trained.hardware.__dict__ if trained else {"device": rec.settings_used.get("device")},
        "settings_used": rec.settings_used,
        "checkpoints": {
            "uploaded": job.checkpoints.uploaded if job.checkpoints else [],
            "skipped_superseded": job.checkpoints.skipped if job.checkpoints else [],
        },
        "accounting": rec.accounting,
        "artifacts": {key: {"sha256": a.sha256, "size": a.size} for key, a in sorted(job.sums.items())},
    }
    return Manifest.model_validate(manifest).dump()  # typed: docs/manifest.schema.json


def lineage_of(job: Job) -> dict[str, Any]:
    from pogona_job.run import lineage

    splits = {k.removeprefix("dataset/"): a.sha256 for k, a in job.sums.items() if k.startswith("dataset/")}
    return lineage.collect(
        config=job.record.config,
        seed=job.settings.seed,
        dataset=job.record.dataset,
        split_sha256=splits,
        champion=job.record.promotion.get("compared_against"),
    )


def final_of(rows: list[dict[str, float]]) -> dict[str, float]:
    from pogona_job.training import final_metrics

    return final_metrics(rows)


def final_numbers(rec: RunRecord) -> dict[str, float]:
    return final_of(rec.full.rows) if rec.full else {}


def publish_failure(job: Job) -> None:
    """Best effort within the stop budget: newest checkpoint, then the report and a manifest that
    says `failed`/`interrupted` - never presented as complete."""
    from pogona_job.training import partial_phase

    rec = job.record
    try:
        if job.checkpoints is not None:
            try:
                if not job.checkpoints.flush(max(1.0, job.stop.left() - 5)):
                    log.warning("checkpoint upload did not finish within the stop budget")
            except JobError as exc:  # the previous complete set is still there to resume from
                log.warning("the newest checkpoint was not saved", reason=exc.sentence)
            job.checkpoints.close()
        # The epochs a failed phase did finish belong in its report.
        device = str(rec.settings_used.get("device", "cpu"))
        if rec.sanity is None:
            rec.sanity = partial_phase("sanity", job.runs / "sanity", device)
            upload(job, [(job.runs / "sanity" / "results.csv", "sanity/results.csv")])
        elif rec.full is None and rec.verdict is not None and rec.verdict.passed:
            rec.full = partial_phase("full", job.runs / "full", device)
        publish(job)
        if not rec.retryable and not job.final:  # nobody will resume
            storage.delete_prefix(job.client, job.out / "checkpoint")
        log.info("failure report pushed", report=(job.out / "report.md").uri)
    except JobError as exc:
        log.error("could not push the failure report", reason=exc.sentence)
