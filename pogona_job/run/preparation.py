"""The first three phases of the story: take the run (config), pull the dataset, stage it.

Each returns what the later phases need (`Resources`, the local copy, the `StagedDataset`) and
records what the report says about it in `job.record`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pogona_job import dataset, training
from pogona_job.config import scheduler_job
from pogona_job.errors import ConfigError
from pogona_job.logs import get_logger
from pogona_job.run.lease import Lease
from pogona_job.run.phases import fetch_model
from pogona_job.run.publish import claim_run, complete_finished, upload, upload_dataset_sheets
from pogona_job.run.state import FINAL, AlreadyFinished, Job
from pogona_job.s3 import pull, storage
from pogona_job.s3.progress import transfer_progress
from pogona_job.s3.storage import S3Path
from pogona_job.training.checkpoint import CheckpointSync

log = get_logger()


@dataclass(frozen=True)
class Resources:
    """What the config phase decided for every later phase."""

    device: str  # ultralytics' device string: "cpu", "0", "0,1"
    workers: int  # dataloader workers
    model_source: str  # a weights name, a .yaml, or the local copy of an s3:// model


def take_run(job: Job) -> Resources:
    """Refuse early what cannot work, take the run's lease, and set up everything that writes under it."""
    s, rec = job.settings, job.record
    assert s.dataset_uri
    if not storage.check_bucket(job.client, S3Path.parse(s.dataset_uri), "reading the dataset from"):
        # A typo in the prefix: say so before any run folder (lease, report) is written.
        raise ConfigError(f"Nothing under {s.dataset_uri}: check POGONA_DATASET_URI (a typo in the prefix?).")
    storage.check_bucket(job.client, job.out, "checking the output prefix")
    _stop_if_finished(job)
    lease = Lease(job.client, job.out / "lease.json", s.lease_ttl_s, attempt=job.attempt, scheduler_job=scheduler_job())
    lease.acquire(job.run_id)
    job.lease = lease  # only now: a refused job must not publish into a run another job owns
    job.stop.on_force = lease.force_release  # a forced exit (second signal) still frees the run
    claim_run(job)  # fences the manifest against a write in flight from the job that lost the run
    storage.abort_multipart_uploads(job.client, job.out)  # parts a killed attempt left open (billed)
    import ultralytics  # noqa: F401 - after offline.prepare(); the first import is the slow part

    from pogona_job import logs
    from pogona_job.training import offline

    offline.switch_off_outbound()
    logs.route_ultralytics(debug=s.debug)
    device = training.resolve_device(s)
    workers, workers_reason = training.resolve_workers(s.workers, device)
    rec.settings_used.update(device=device, workers=workers, workers_reason=workers_reason)
    log.info("resources", device=device, workers=workers_reason)
    from pogona_job.run import livestatus

    job.live = livestatus.start(job, device)
    model_source = fetch_model(job)
    job.checkpoints = CheckpointSync(
        job.client,
        job.out,
        job.work / "checkpoint-staging",
        every_epochs=s.checkpoint_every_epochs,
        min_interval_s=s.checkpoint_min_interval_s,
        guard=lease.confirm,
        tag=lease.token,
        lease=lease.path,
        max_attempts=s.s3_max_attempts,
    )
    return Resources(device, workers, model_source)


def _stop_if_finished(job: Job) -> None:
    """A finished run (succeeded, or partial: its budget is spent) is never redone; a retry only completes
    what a kill after its manifest left undone."""
    previous: dict[str, Any] | None = storage.get_json(job.client, job.out / "manifest.json")
    if not previous or previous.get("status") not in FINAL:
        return
    log.info(
        "run already finished; nothing redone", status=previous["status"], manifest=(job.out / "manifest.json").uri
    )
    complete_finished(job, previous)
    print(f"Run {job.run_id} already {previous['status']}: {job.out.uri}/ (nothing redone).", file=sys.stderr)
    raise AlreadyFinished


def pull_dataset(job: Job) -> Path:
    """Mirror POGONA_DATASET_URI into the work dir's cache; returns the local folder."""
    s, rec = job.settings, job.record
    assert s.dataset_uri
    src = S3Path.parse(s.dataset_uri)
    local = job.work / "cache" / src.bucket / src.key
    console = s.log_format == "console" or (s.log_format == "auto" and sys.stderr.isatty())
    with transfer_progress("pull", console=console, check=job.stop.check) as progress:
        # The job's own cache: a file changed there (bit rot, another process) is fetched again.
        result = pull.pull_prefix(job.client, src, local, threads=s.s3_threads, progress=progress, replace=True)
    log.info("dataset pulled", files=result.files, bytes=result.bytes, fetched=result.fetched, cached=result.skipped)
    for note in result.notes:  # files in the cache the pull did not write (or that changed): kept, said
        log.warning("dataset cache", note=note)
    rec.dataset.update(uri=s.dataset_uri, fingerprint=result.fingerprint, files=result.files, bytes=result.bytes)
    return local


def stage(job: Job, local: Path, resources: Resources) -> dataset.StagedDataset:
    """Validate, split and stage the pulled export; the split lists are published at once."""
    s, rec = job.settings, job.record
    inventory = dataset.inspect_dataset(local, s.configured_classes, dataset.Options.from_settings(s))
    staged_root = job.work / "staged"
    rec.dataset.update(problems=len(inventory.problems), junk_ignored=inventory.junk_ignored)
    # What the export said, kept even when staging refuses it (a failure report names its real classes).
    rec.classes = list(inventory.class_names) or rec.classes
    rec.dataset.update(images=len(inventory.items), boxes=sum(it.boxes for it in inventory.items))
    try:
        staged = dataset.stage_dataset(
            inventory,
            staged_root,
            policy=s.validation_policy,
            val_fraction=s.val_fraction,
            seed=s.seed,
            leakage_warn=s.leakage_warn,
        )
    finally:
        if (staged_root / "problems.txt").exists():
            upload(job, [(staged_root / "problems.txt", "dataset/problems.txt")])
    rec.classes = staged.class_names  # POGONA_CLASS_NAMES, else the export's own
    upload(job, [(f, f"dataset/{f.name}") for f in staged.published_files])  # a later failure still shows the split
    upload_dataset_sheets(job, staged)  # thumbnails per inferred modality, near-duplicate pairs (plots/)
    rec.dataset.update(images=staged.images, boxes=staged.boxes, backgrounds=staged.backgrounds, counts=staged.counts)
    rec.dataset.update(staged.summary())  # layout, names/split/modality sources, leakage, dropped
    if staged.leakage["warn"]:
        log.warning("near-duplicates across the split", **staged.leakage)
    log.info("dataset staged", images=staged.images, boxes=staged.boxes, counts=staged.counts)
    plan = training.resource_plan(s, resources.device, staged.images)
    job.extra_args = plan.args
    rec.settings_used.update(plan.reasons)
    log.info("training settings", **plan.reasons)
    return staged
