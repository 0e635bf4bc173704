"""Crash-consistent checkpoints for spot/preemptible machines.

Each checkpoint is an immutable SET of files under `<run>/checkpoint/<phase>/<epoch>-<holder>/`
(last.pt, best.pt, results.csv and set.json, which lists each file's sha256 and size). The holder
part (the lease token) makes the keys generation-scoped: a job that lost the run can never
overwrite a set of the job that holds it. Once the set is stored,
`<run>/checkpoint/<phase>/pointer.json` is written LAST to name it, by compare-and-swap on the
ETag read BEFORE the lease guard (a taker's pointer written since makes ours fail). Older sets are
deleted only after the pointer has moved, only this holder's own, only the versions listed before
a renewal of the lease, keeping one complete set behind the pointer as the fallback.

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
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from pogona_job.errors import JobError, LeaseLost, TransientFailure
from pogona_job.logs import get_logger
from pogona_job.s3 import pointers, storage
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
    tag: str = ""  # the lease holder's token: its sets live under `<epoch>-<tag>/`
    lease: S3Path | None = None  # the run's lease.json, for a process that holds no Lease (DDP rank 0)
    max_attempts: int = 5  # the S3 client's attempt limit, in every process that uploads
    uploaded: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, int]] = field(default_factory=list)
    error: JobError | None = None

    def __post_init__(self) -> None:
        self._pending: _Snapshot | None = None
        self._log_context: dict[str, Any] = {}
        self._last_offer = -1e9
        self._skipped_last: tuple[str, int, int, Path, dict[str, Any]] | None = None  # offered, not taken
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
            self._skipped_last = (phase, epoch, epochs, save_dir, state)
            return
        self._queue(phase, epoch, epochs, save_dir, state)

    def _queue(self, phase: str, epoch: int, epochs: int, save_dir: Path, state: dict[str, Any]) -> None:
        """Copy the epoch's files aside and hand them to the worker (replacing a snapshot still pending)."""
        self._skipped_last = None
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

    def offer_last_completed(self) -> int | None:
        """On a stop request (SIGTERM, the spot notice): queue the last completed epoch that the
        interval settings skipped; ultralytics rewrites its files only at the next epoch's end, which
        an interrupted epoch never reaches. Returns the epoch queued, None when nothing was skipped."""
        if self._skipped_last is None or self._closed:
            return None
        phase, epoch, epochs, save_dir, state = self._skipped_last
        self._raise_failure()
        self._queue(phase, epoch, epochs, save_dir, state)  # past both interval settings, not only the time
        return epoch

    def spec(self) -> dict[str, Any]:
        """What a DDP rank-0 process needs to build the same sync (from_spec): JSON, for the workers."""
        return {
            "out": self.run.uri,
            "every_epochs": self.every_epochs,
            "min_interval_s": self.min_interval_s,
            "tag": self.tag,
            "lease": self.lease.uri if self.lease else None,
            "max_attempts": self.max_attempts,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], staging: Path) -> CheckpointSync:
        """The DDP rank-0 sync: same keys, interval, attempt limit; the lease guard reads lease.json
        (this process holds no Lease), which the pointer's compare-and-swap makes enough (see _put_pointer)."""
        client = storage.make_client(threads=8, max_attempts=int(spec.get("max_attempts") or 5))
        lease = S3Path.parse(spec["lease"]) if spec.get("lease") else None
        tag = str(spec.get("tag") or "")
        return cls(
            client,
            S3Path.parse(spec["out"]),
            staging,
            every_epochs=int(spec["every_epochs"]),
            min_interval_s=float(spec["min_interval_s"]),
            guard=holder_guard(client, lease, tag) if lease is not None and tag else None,
            tag=tag,
            lease=lease,
            max_attempts=int(spec.get("max_attempts") or 5),
        )

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
        name = f"{snap.epoch}-{self.tag}" if self.tag else str(snap.epoch)
        set_dir = phase_dir / name
        files = [(snap.folder / name, set_dir / name) for _, name in FILES if (snap.folder / name).exists()]
        artifacts = storage.upload_many(self.client, files, threads=3)
        entry = {
            **snap.state,
            "set": name,
            "files": {a.key.rsplit("/", 1)[1]: {"sha256": a.sha256, "size": a.size} for a in artifacts},
        }
        storage.put_json(self.client, set_dir / SET, entry)
        self._put_pointer(phase_dir / POINTER, entry)  # LAST: only ever names a complete set
        self.uploaded.append((snap.phase, snap.epoch))
        removed = _prune(self.client, phase_dir, snap.epoch, self.tag, self.guard)
        log.info(
            "checkpoint uploaded",
            checkpoint_phase=snap.phase,
            epoch=snap.epoch,
            pruned_sets=removed,
            seconds=round(time.monotonic() - start, 2),
        )

    def _put_pointer(self, path: S3Path, entry: dict[str, Any]) -> None:
        """Compare-and-swap on the ETag read BEFORE the guard: a job paused after its guard passed
        finds the pointer changed by the taker and writes nothing (a stale pointer never lands on
        a newer one); a taker that has not moved it yet replaces ours with its next checkpoint."""
        for _ in range(10):
            current = pointers.read(self.client, path)
            if self.guard is not None:
                self.guard()
            if pointers.write(self.client, path, entry, expected=current.etag):
                return
        raise TransientFailure(f"{path.uri} kept changing under another writer; retry the job.")

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


_SET_NAME = re.compile(r"(\d+)(?:-([0-9a-z]+))?")


def _sets(client: Any, phase_dir: S3Path) -> dict[str, tuple[int, str, list[storage.RemoteObject]]]:
    """Set folder name -> (epoch, holder tag, its objects as listed)."""
    sets: dict[str, tuple[int, str, list[storage.RemoteObject]]] = {}
    for obj in storage.list_objects(client, phase_dir):
        head = obj.rel.split("/", 1)[0]
        match = _SET_NAME.fullmatch(head)
        if "/" in obj.rel and match:
            sets.setdefault(head, (int(match.group(1)), match.group(2) or "", []))[2].append(obj)
    return sets


def _prune(client: Any, phase_dir: S3Path, current: int, tag: str, guard: Callable[[], None] | None) -> int:
    """Delete this holder's sets but the pointer's and the newest one before it (the fallback).

    Only our own (a taker's sets are never ours to delete), only the versions listed before the
    guard (If-Match), so a job paused here deletes nothing that was written after it lost the run."""
    mine = {name: found for name, found in _sets(client, phase_dir).items() if found[1] == tag}
    older = [epoch for epoch, _, _ in mine.values() if epoch < current]
    keep = {current, max(older)} if older else {current}
    stale = sorted(name for name, (epoch, _, _) in mine.items() if epoch not in keep)
    if stale and guard is not None:
        guard()
    for name in stale:
        for obj in mine[name][2]:
            pointers.delete(client, S3Path(phase_dir.bucket, obj.key), expected=f'"{obj.etag}"')
    return len(stale)


def holder_guard(client: Any, lease: S3Path, tag: str) -> Callable[[], None]:
    """For a process that holds no Lease object: raise LeaseLost unless lease.json still names `tag`.

    Called between reading a pointer's ETag and writing it conditionally, it fences like a renewal:
    a taker changes lease.json before it can write anything, so either we see the taker here, or
    our write lands before the taker's first one and is replaced by it."""

    def guard() -> None:
        holder = pointers.read(client, lease).value or {}
        if holder.get("holder") != tag:
            raise LeaseLost(f"This job lost the lease of {lease.uri}: it stops and writes no checkpoint.")

    return guard


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
    candidates: list[dict[str, Any] | str] = [pointer] if pointer else []
    below = int(pointer["epoch"]) if pointer else None
    listed = _sets(client, phase_dir)
    older = [(epoch, name) for name, (epoch, _, _) in listed.items() if below is None or epoch < below]
    candidates += [name for _, name in sorted(older, reverse=True)]
    for candidate in candidates:
        entry = candidate if isinstance(candidate, dict) else storage.get_json(client, phase_dir / candidate / SET)
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
