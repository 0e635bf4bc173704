"""Checkpoint sync for spot/preemptible machines, in the spirit of SageMaker's checkpoint dir.

After every N epochs the trainer's files are snapshotted locally and uploaded by ONE
background thread to `<run>/checkpoint/<phase>/`, so training never waits on the
network. If a newer snapshot is ready while an upload runs, the older pending one is
dropped, not queued. `state.json` is uploaded last: it only ever names complete files.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from pogona_job import storage
from pogona_job.errors import JobError
from pogona_job.logs import get_logger
from pogona_job.storage import S3Path

log = get_logger()
FILES = (("weights/last.pt", "last.pt"), ("weights/best.pt", "best.pt"), ("results.csv", "results.csv"))


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
    uploaded: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, int]] = field(default_factory=list)
    error: str | None = None

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
        """Called by the trainer after it saved epoch `epoch`; returns at once."""
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
                self._upload(snap)
            except JobError as exc:  # best effort: training goes on; the final push will tell
                self.error = exc.sentence
                log.warning("checkpoint upload failed", epoch=snap.epoch, reason=exc.sentence)
            finally:
                shutil.rmtree(snap.folder, ignore_errors=True)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _upload(self, snap: _Snapshot) -> None:
        start = time.monotonic()
        target = self.run / "checkpoint" / snap.phase
        files = [(snap.folder / name, target / name) for _, name in FILES if (snap.folder / name).exists()]
        storage.upload_many(self.client, files, threads=3)
        storage.put_json(self.client, target / "state.json", snap.state)
        self.uploaded.append((snap.phase, snap.epoch))
        log.info(
            "checkpoint uploaded",
            checkpoint_phase=snap.phase,
            epoch=snap.epoch,
            seconds=round(time.monotonic() - start, 2),
        )

    def flush(self, timeout: float) -> bool:
        """Wait until the newest snapshot is uploaded; False if that took longer than `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass
class Restored:
    epoch: int
    epochs: int
    resumable: bool  # last.pt still carries optimizer state (a finished one is stripped)


def restore(client: Any, run: S3Path, phase: str, save_dir: Path) -> Restored | None:
    """Bring `<run>/checkpoint/<phase>/` back into ultralytics' save dir; None when there is none."""
    target = run / "checkpoint" / phase
    state = storage.get_json(client, target / "state.json")
    if not state:
        return None
    (save_dir / "weights").mkdir(parents=True, exist_ok=True)
    for local, name in FILES:
        if storage.head(client, target / name) is not None:
            with storage.errors_for(run.bucket, f"restoring the checkpoint {name}"):
                client.download_file(run.bucket, (target / name).key, str(save_dir / local))
    return Restored(int(state["epoch"]), int(state["epochs"]), _has_optimizer(save_dir / "weights" / "last.pt"))


def _has_optimizer(path: Path) -> bool:
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        return False
    return bool(ckpt.get("optimizer")) and int(ckpt.get("epoch", -1)) >= 0
