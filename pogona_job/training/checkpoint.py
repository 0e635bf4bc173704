"""Crash-consistent checkpoints for spot/preemptible machines.

Each checkpoint is an immutable SET of files under `<run>/checkpoint/<phase>/<epoch>/`
(last.pt, best.pt, results.csv and set.json, which lists each file's sha256 and size). Once the
set is stored, `<run>/checkpoint/<phase>/pointer.json` is written LAST to name it. Older sets are
deleted only after the pointer has moved, keeping one complete set behind it as the fallback.

Restore reads the pointer, downloads its set and verifies every hash; when the pointer is missing
or a file does not match, it falls back to the previous complete set. results.csv is cut to the
restored last.pt's epoch, so a resumed run never repeats a row. A kill at any moment therefore
costs at most the epochs since the last pointer.

Uploads run on ONE background thread so training never waits on the network; a newer snapshot
replaces a pending older one. A failed upload is an error raised at the next epoch (exit 75, the
retry resumes from the last good set), not a log line.
"""

from __future__ import annotations

import csv
import io
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from pogona_job.errors import JobError, TransientFailure
from pogona_job.logs import get_logger
from pogona_job.s3 import storage
from pogona_job.s3.storage import S3Path

log = get_logger()
FILES = (("weights/last.pt", "last.pt"), ("weights/best.pt", "best.pt"), ("results.csv", "results.csv"))
POINTER, SET = "pointer.json", "set.json"


@dataclass
class _Snapshot:
    phase: str
    epoch: int
    folder: Path
    state: dict[str, Any]


@dataclass
class CheckpointSync:
    client: Any
    run: S3Path  # <output>/<run_id>
    staging: Path
    every_epochs: int = 1
    min_interval_s: float = 0.0
    guard: Callable[[], None] | None = None  # raises when this job may no longer write the run (lease)
    uploaded: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, int]] = field(default_factory=list)
    error: JobError | None = None

    def __post_init__(self) -> None:
        self._pending: _Snapshot | None = None
        self._log_context: dict[str, Any] = {}
        self._last_offer = -1e9
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._worker, name="checkpoint-sync", daemon=True)
        self._thread.start()

    def offer(self, phase: str, epoch: int, epochs: int, save_dir: Path, state: dict[str, Any]) -> None:
        """Called by the trainer after it saved epoch `epoch`; returns at once (or raises an earlier failure)."""
        self._raise_failure()
        final = epoch == epochs
        if not final and (epoch % self.every_epochs or time.monotonic() - self._last_offer < self.min_interval_s):
            return
        self._last_offer = time.monotonic()
        folder = self.staging / f"{phase}-{epoch}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for src, name in FILES:
            if (save_dir / src).exists():
                shutil.copy2(save_dir / src, folder / name)  # ultralytics overwrites these next epoch
        snapshot = _Snapshot(phase, epoch, folder, {**state, "phase": phase, "epoch": epoch, "epochs": epochs})
        self._log_context = structlog.contextvars.get_contextvars()  # the worker thread has none of its own
        with self._cond:
            if self._pending is not None:
                self.skipped.append((self._pending.phase, self._pending.epoch))
                shutil.rmtree(self._pending.folder, ignore_errors=True)
            self._pending = snapshot
            self._cond.notify_all()

    def _raise_failure(self) -> None:
        if self.error is not None:
            raise self.error

    def _worker(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                snap, self._pending, self._busy = self._pending, None, True
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(**self._log_context)
            try:
                if self.error is None:
                    self._upload(snap)
            except JobError as exc:
                self.error = exc
                log.error("checkpoint upload failed", epoch=snap.epoch, reason=exc.sentence)
            except Exception as exc:  # never let the worker die silently: the job must hear of it
                self.error = TransientFailure(f"Checkpoint upload failed: {type(exc).__name__}: {exc}.")
                log.error("checkpoint upload failed", epoch=snap.epoch, reason=str(exc))
            finally:
                shutil.rmtree(snap.folder, ignore_errors=True)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _upload(self, snap: _Snapshot) -> None:
        start = time.monotonic()
        if self.guard is not None:
            self.guard()  # a job that lost the run writes nothing into it
        phase_dir = self.run / "checkpoint" / snap.phase
        set_dir = phase_dir / str(snap.epoch)
        files = [(snap.folder / name, set_dir / name) for _, name in FILES if (snap.folder / name).exists()]
        artifacts = storage.upload_many(self.client, files, threads=3)
        entry = {
            **snap.state,
            "set": str(snap.epoch),
            "files": {a.key.rsplit("/", 1)[1]: {"sha256": a.sha256, "size": a.size} for a in artifacts},
        }
        storage.put_json(self.client, set_dir / SET, entry)
        if self.guard is not None:
            self.guard()  # and must not move its pointer (renewed now: a taker since is noticed)
        storage.put_json(self.client, phase_dir / POINTER, entry)  # LAST: only ever names a complete set
        self.uploaded.append((snap.phase, snap.epoch))
        removed = _prune(self.client, phase_dir, snap.epoch)
        log.info(
            "checkpoint uploaded",
            checkpoint_phase=snap.phase,
            epoch=snap.epoch,
            pruned_sets=removed,
            seconds=round(time.monotonic() - start, 2),
        )

    def flush(self, timeout: float) -> bool:
        """Wait until the newest snapshot is uploaded; False if that took longer than `timeout`.

        Raises the upload's failure, if any: a checkpoint that did not land is an error."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        self._raise_failure()
        return True

    def close(self) -> None:
        """Stop the worker and wait for it: no upload may land after this returns (no orphans)."""
        with self._cond:
            self._closed = True
            if self._pending is not None:  # not uploaded: whoever closes has given up on it
                shutil.rmtree(self._pending.folder, ignore_errors=True)
                self._pending = None
            self._cond.notify_all()
        self._thread.join()


def _set_epochs(client: Any, phase_dir: S3Path) -> set[int]:
    epochs = set()
    for obj in storage.list_objects(client, phase_dir):
        head = obj.rel.split("/", 1)[0]
        if "/" in obj.rel and head.isdigit():
            epochs.add(int(head))
    return epochs


def _prune(client: Any, phase_dir: S3Path, current: int) -> int:
    """Delete every set but the pointer's and the newest one before it (the fallback)."""
    epochs = _set_epochs(client, phase_dir)
    older = [e for e in epochs if e < current]
    keep = {current, max(older)} if older else {current}
    stale = sorted(epochs - keep)
    for epoch in stale:
        storage.delete_prefix(client, phase_dir / str(epoch))
    return len(stale)


@dataclass
class Restored:
    epoch: int
    epochs: int
    resumable: bool  # a set taken before the phase's last epoch: last.pt carries the optimizer state


def restore(client: Any, run: S3Path, phase: str, save_dir: Path) -> Restored | None:
    """Bring the newest VERIFIED set of `<run>/checkpoint/<phase>/` into ultralytics' save dir.

    The bucket is the truth: whatever a dead attempt left in save_dir is removed first. None when
    there is no complete set."""
    phase_dir = run / "checkpoint" / phase
    shutil.rmtree(save_dir, ignore_errors=True)
    pointer = storage.get_json(client, phase_dir / POINTER)
    candidates: list[dict[str, Any] | int] = [pointer] if pointer else []
    below = int(pointer["epoch"]) if pointer else None
    candidates += sorted((e for e in _set_epochs(client, phase_dir) if below is None or e < below), reverse=True)
    for candidate in candidates:
        entry = candidate if isinstance(candidate, dict) else storage.get_json(client, phase_dir / str(candidate) / SET)
        if not entry:
            continue  # a set whose set.json never landed is incomplete
        if _fetch(client, phase_dir / str(entry["set"]), entry, save_dir):
            epoch, epochs = int(entry["epoch"]), int(entry["epochs"])
            cut_results(save_dir / "results.csv", epoch)
            where = (phase_dir / str(entry["set"])).uri
            log.info("checkpoint restored", checkpoint_phase=phase, epoch=epoch, set=where)
            return Restored(epoch, epochs, resumable=epoch < epochs)
        log.warning("checkpoint set failed verification; trying the previous one", set=entry.get("set"))
    return None


def _fetch(client: Any, set_dir: S3Path, entry: dict[str, Any], save_dir: Path) -> bool:
    """Download the set's files and check each against its recorded sha256 and size."""
    files: dict[str, dict[str, Any]] = entry.get("files") or {}
    if "last.pt" not in files:
        return False
    save_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=save_dir) as tmp:
        for name, meta in files.items():
            dest = Path(tmp) / name
            if storage.head(client, set_dir / name) is None:
                return False
            with storage.errors_for(set_dir.bucket, f"restoring the checkpoint {name}"):
                client.download_file(set_dir.bucket, (set_dir / name).key, str(dest))
            if dest.stat().st_size != int(meta["size"]) or storage.sha256_file(dest) != meta["sha256"]:
                log.warning("checkpoint file does not match its recorded hash", file=(set_dir / name).uri)
                return False
        for local, name in FILES:
            if (Path(tmp) / name).exists():
                (save_dir / local).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(Path(tmp) / name, save_dir / local)
    return True


def cut_results(path: Path, epoch: int) -> None:
    """Keep results.csv's header and its rows up to `epoch`: a resumed phase appends the rest once."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    if not lines:
        return
    header = next(csv.reader(io.StringIO(lines[0])))
    column = [h.strip() for h in header].index("epoch")
    kept = [lines[0]] + [
        line for line in lines[1:] if line.strip() and int(float(next(csv.reader([line]))[column])) <= epoch
    ]
    path.write_text("".join(kept))
