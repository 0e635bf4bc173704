"""Publication: the run's outputs, then manifest.json LAST, then latest.json and the champion.

Readers trust the manifest: everything it lists is uploaded (with its sha256) before it is written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pogona_job.errors import JobError, LeaseLost, TransientFailure
from pogona_job.logs import get_logger
from pogona_job.run.manifest import Manifest
from pogona_job.run.report import render
from pogona_job.run.state import FINAL, Job, RunRecord, now
from pogona_job.s3 import pointers, storage
from pogona_job.s3.storage import S3Path

if TYPE_CHECKING:
    from pogona_job.dataset import StagedDataset

log = get_logger()
# val_batch0_labels beside val_batch0_pred: the same validation batch with its labels and best.pt's predictions.
PLOTS = ("results.png", "BoxPR_curve.png", "confusion_matrix.png", "val_batch0_labels.jpg", "val_batch0_pred.jpg")


FENCED_MAX = 64 << 20  # single PUTs up to here are fenced one by one (see Lease.fenced_put)


def upload(job: Job, items: list[tuple[Path, str]]) -> list[storage.Artifact]:
    """Upload the run's outputs, each one fenced by the lease: a job that lost the run raises
    LeaseLost before (or instead of) replacing what the new holder wrote."""
    pairs = [(path, job.out / key) for path, key in items if path.exists()]
    job.local_files.update({key: path for path, key in items if path.exists()})
    artifacts: list[storage.Artifact] = []
    bulky = [(p, d) for p, d in pairs if job.lease is None or p.stat().st_size >= FENCED_MAX]
    for path, dest in pairs:
        if (path, dest) in bulky:
            continue
        data = path.read_bytes()
        job.lease.fenced_put(dest, data, content_type=_content_type(path))
        artifacts.append(storage.Artifact(dest.key, len(data), hashlib.sha256(data).hexdigest()))
    if bulky:  # multipart: no conditional completion everywhere; the renewal right before is the fence
        if job.lease is not None:
            job.lease.confirm()
        artifacts += storage.upload_many(job.client, bulky, threads=job.settings.s3_threads)
    job.sums.update({a.key.removeprefix(job.out.key + "/"): a for a in artifacts})
    return artifacts


def _content_type(path: Path) -> str:
    return {
        ".md": "text/markdown",
        ".html": "text/html",
        ".json": "application/json",
        ".csv": "text/csv",
        ".png": "image/png",
    }.get(path.suffix, "application/octet-stream")


def claim_run(job: Job) -> None:
    """Right after taking the lease: stamp manifest.json with this holder's generation.

    A job that lost the run may have a manifest write in flight, conditional on the ETag it read
    before its last renewal; changing the manifest now makes that write fail, so the object readers
    trust can only ever be written by the holder. A final manifest found here: the run is done."""
    path = job.out / "manifest.json"
    for _ in range(10):
        current = pointers.read(job.client, path)
        if (current.value or {}).get("status") in FINAL:
            raise LeaseLost(f"Run {job.run_id} was finished by another job meanwhile: this job changes nothing.")
        stamp = {
            "run_id": job.run_id,
            "attempt": job.attempt,
            "started_at": job.record.started_at,
            **(current.value or {}),
            "status": "interrupted",  # will resume: this attempt is on it (an earlier `failed` is not the news)
            "failure": f"attempt {job.attempt} is working on this run; this manifest is replaced when it ends",
            "lease_generation": job.lease.generation,
            "in_progress": True,  # readers (`runs`, `runs watch`): an attempt holds the run; not a result
        }
        job.lease.confirm()
        if pointers.write(job.client, path, stamp, expected=current.etag):
            job.claimed = True
            return
    raise TransientFailure(f"{path.uri} kept changing while this job took the run over; retry the job.")


def upload_dataset_sheets(job: Job, staged: StagedDataset) -> None:
    """Thumbnails to check the dataset's automatic calls by: a strip per modality inferred from pixels
    (`plots/modality-<m>.png`) and the near-duplicate pairs (`plots/leakage-*.png`). Uploaded in the stage
    phase, so a run that fails later still shows them; the record keeps the keys the report links."""
    dest = job.work / "dataset-sheets"
    shutil.rmtree(dest, ignore_errors=True)  # an earlier attempt's sheets are not this staging's
    try:
        modality = staged.modality_thumbnails(dest / "modality")
        leakage = staged.leakage_thumbnails(dest / "leakage")
    except (OSError, ValueError) as exc:  # a picture for the report, never a reason to stop the run
        log.warning("dataset thumbnails not made", reason=str(exc))
        return
    items = [(path, f"plots/{path.name}") for path in [*modality.values(), *leakage.values()]]
    uploaded = {a.key.removeprefix(job.out.key + "/") for a in upload(job, items)}
    job.record.modality_sheets = {m: f"plots/{p.name}" for m, p in modality.items() if f"plots/{p.name}" in uploaded}
    job.record.leakage_sheets = {k: f"plots/{p.name}" for k, p in leakage.items() if f"plots/{p.name}" in uploaded}


def push_outputs(job: Job, save_dir: Path, dataset_files: list[Path]) -> None:
    items: list[tuple[Path, str]] = [
        (save_dir / "results.csv", "results.csv"),
        (save_dir / "weights" / "best.pt", "weights/best.pt"),
        (save_dir / "weights" / "last.pt", "weights/last.pt"),
        (save_dir / "weights" / "best.onnx", "weights/best.onnx"),  # when exported (export.py)
        *[(f, f"dataset/{f.name}") for f in dataset_files],  # split lists, modality.csv
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
        rec.accounting = job.live.tracker.summary(job.outcome())
    config_path = job.work / "config.json"
    config_path.write_text(json.dumps(rec.config, indent=2, sort_keys=True, default=str))
    rec.artifacts = sorted({*job.sums, "config.json", "report.md", "report.html", "model_card.md"})
    report_path = job.work / "report.md"
    report_path.write_text(render(rec))
    from pogona_job.run import html_report, model_card

    html_path, card_path = job.work / "report.html", job.work / "model_card.md"
    card_path.write_text(model_card.render(rec, job.settings.conf))
    html_path.write_text(html_report.to_html(report_path.read_text(), job.local_files, f"Training Log - {rec.run_id}"))
    upload(job, [(config_path, "config.json"), (report_path, "report.md"), (card_path, "model_card.md")])
    upload(job, [(html_path, "report.html")])
    manifest = manifest_of(job)
    if job.lease is not None:
        manifest["lease_generation"] = job.lease.generation

    def decide(current: dict[str, Any] | None) -> dict[str, Any]:
        if (current or {}).get("status") in FINAL:  # only a holder writes it: we are not the holder
            raise LeaseLost(f"Run {job.run_id} was finished by another job: this job publishes nothing.")
        return manifest

    pointers.update(
        job.client, job.out / "manifest.json", decide, guard=job.lease.confirm if job.lease is not None else None
    )
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
    for name in ("progress.json", "lease.json"):  # a dead attempt's, killed after the manifest
        etag = pointers.etag_of(job.client, job.out / name)
        if etag is not None:
            try:
                pointers.delete(job.client, job.out / name, expected=etag)
            except JobError as exc:  # `runs watch` trusts the final manifest anyway
                log.warning(f"could not remove {name}", reason=exc.sentence)


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
        # The headline (evaluation/headline.Headline): best.pt on val, with its interval and epoch; results.csv's
        # last row only under its own name.
        "metrics": rec.headline.as_dict() if rec.headline else {},
        "last_epoch_metrics": final_numbers(rec),
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


def _saved_sentence(job: Job) -> str:
    """The stop's sentence says which epoch the restart resumes from."""
    if job.checkpoints is not None and job.checkpoints.uploaded:
        _, epoch = job.checkpoints.uploaded[-1]  # one training: its first epochs are the sanity epochs
        phase = "sanity" if epoch <= job.settings.sanity_epochs else "full"
        saved = f"after saving the checkpoint of {phase} epoch {epoch}"
    else:
        saved = "with no new checkpoint (the restart resumes from the last one in the bucket, if any)"
    return f"Stopped by a termination signal {saved}: start the job again with the same POGONA_RUN_ID to resume."


def publish_failure(job: Job) -> None:
    """Best effort within the stop budget: newest checkpoint, then the report and a manifest that
    says `failed`/`interrupted` - never presented as complete."""
    from pogona_job.training import first_epochs, partial_phase

    rec = job.record
    try:
        if job.checkpoints is not None:
            if rec.status == "interrupted":  # the spot notice: the last completed epoch must be saved now
                job.checkpoints.offer_last_completed()
            try:
                if not job.checkpoints.flush(max(1.0, job.stop.left() - 5)):
                    log.warning("checkpoint upload did not finish within the stop budget")
            except LeaseLost:
                raise
            except JobError as exc:  # the previous complete set is still there to resume from
                log.warning("the newest checkpoint was not saved", reason=exc.sentence)
            job.checkpoints.close()
            if rec.status == "interrupted":
                rec.failure = _saved_sentence(job)
        # The epochs a failed phase did finish belong in its report.
        device = str(rec.settings_used.get("device", "cpu"))
        if rec.sanity is None:  # stopped before the gate: the sanity epochs are the training's first rows
            first_epochs(
                job.runs / "full" / "results.csv", job.runs / "sanity" / "results.csv", job.settings.sanity_epochs
            )
            rec.sanity = partial_phase("sanity", job.runs / "sanity", device)
            upload(job, [(job.runs / "sanity" / "results.csv", "sanity/results.csv")])
        elif rec.full is None and rec.verdict is not None and rec.verdict.passed:
            rec.full = partial_phase("full", job.runs / "full", device)
        publish(job)
        if not rec.retryable and not job.final:  # nobody will resume
            job.lease.fenced_delete(job.out / "checkpoint")
        log.info("failure report pushed", report=(job.out / "report.md").uri)
    except LeaseLost:
        raise  # the run is another job's: its exit is 75 and it changed nothing
    except JobError as exc:
        log.error("could not push the failure report", reason=exc.sentence)


def finish(job: Job, dataset_files: list[Path]) -> None:
    """The push phase: outputs, then the manifest (succeeded or partial), then the checkpoints go."""
    import time

    rec = job.record
    assert rec.full is not None and job.live is not None and job.checkpoints is not None and job.lease is not None
    pushed = time.monotonic()
    push_outputs(job, rec.full.save_dir, dataset_files)
    rec.timings["push"] = round(time.monotonic() - pushed, 2)  # the manifest must carry its own phase
    job.check()  # before the manifest: an interrupted push is redone on restart, never half-published
    rec.status, rec.finished_at = job.live.tracker.final_status(), now()
    rec.failure = job.live.tracker.stop_reason  # partial: why it stopped early
    publish(job)
    job.checkpoints.close()  # nothing in flight can land after the clean-up
    job.lease.fenced_delete(job.out / "checkpoint")  # only kept while the run is in progress
