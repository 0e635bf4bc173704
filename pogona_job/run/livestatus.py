"""Live progress: `<run>/progress.json` written from a background thread, the epoch meter that
feeds it (images/s, epoch seconds, ETA, the dataloader's share of step time), and
`pogona-job runs watch` that follows it from any machine.

Training never waits on the bucket: callbacks only update an in-memory dict; one daemon thread
writes it at most every POGONA_PROGRESS_INTERVAL_S (and the attempt's accounting with it). The
file only exists while an attempt runs: it is removed when the attempt ends, after the manifest,
so a heartbeat that stops moving while the file stays means the job died ("stalled").

Dataloader share: ultralytics 8.4 exposes no dataloader timing, so the meter times the wait for
the next batch - from one `on_train_batch_end` (or the epoch start) to the next
`on_train_batch_start` - against the whole step.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pogona_job.errors import JobError
from pogona_job.logs import eta_text, get_logger
from pogona_job.run.budget import Tracker
from pogona_job.s3 import storage
from pogona_job.s3.storage import S3Path
from pogona_job.training.columns import METRICS

log = get_logger()
PROGRESS = "progress.json"
_FINAL = ("succeeded", "partial", "failed")  # what no attempt continues: `interrupted` resumes
STALL_INTERVALS = 3  # a heartbeat older than this many intervals: the run is stalled
Callback = Callable[[Any], None]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


class LiveStatus:
    """progress.json + the accounting heartbeat for one attempt."""

    def __init__(
        self,
        client: Any,
        run: S3Path,
        tracker: Tracker,
        run_id: str,
        interval_s: float,
        holds_run: Callable[[], bool] = lambda: True,
        lease: Any = None,
    ) -> None:
        self.client, self.run, self.tracker, self.interval_s = client, run, tracker, interval_s
        self.holds_run = holds_run  # False once the lease is lost: then nothing more is written under the run
        self.lease = lease  # run.lease.Lease: every write and delete here is fenced by it
        self.state: dict[str, Any] = {
            "run_id": run_id,
            "attempt": len(tracker.prior) + 1,
            "phase": "config",
            "epoch": 0,
            "epochs": None,
            "batch": 0,
            "batches": None,
            "metrics": {},
            "eta_s": None,
            "interval_s": interval_s,
        }
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="live-status", daemon=True)

    # --- the writer ------------------------------------------------------------------------
    def start(self) -> LiveStatus:
        self._thread.start()
        return self

    def set(self, **values: Any) -> None:
        with self._lock:
            self.state.update(values)

    def set_phase(self, phase: str) -> None:
        self.set(phase=phase)

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        with self._lock:
            state = dict(self.state)
        state.update(
            heartbeat=_iso(now),
            heartbeat_ts=round(now, 3),
            elapsed_s=round(self.tracker.elapsed(), 1),
            budget_used_s=round(self.tracker.used_s(), 1),
            budget_limit_s=self.tracker.limit_s,
        )
        projection = self.tracker.projection or {}
        if projection.get("warning"):
            state["budget_warning"] = projection["warning"]
        return state

    def write(self) -> None:
        """One progress.json from the current state; the writer thread and the epoch end both call it."""
        if not self.holds_run():
            return
        with self._write_lock:  # serialised, so an older snapshot never lands after a newer one
            self._write()

    def _write(self) -> None:
        try:
            if self.lease is not None:
                self.lease.fenced_json(self.run / PROGRESS, self.snapshot())
            else:
                storage.put_json(self.client, self.run / PROGRESS, self.snapshot())
        except JobError as exc:  # live status is a courtesy: never a reason to fail training
            log.warning("could not write progress.json", reason=exc.sentence)
        self.tracker.flush("running")

    def _loop(self) -> None:
        while True:
            self.write()
            if self._stop.wait(self.interval_s):
                return

    def close(self, status: str, *, retryable: bool) -> None:
        """End of the attempt: stop the writer; keep the accounting only for an attempt that will resume."""
        self._stop.set()
        self._thread.join(timeout=10)
        if not self.holds_run():  # the run is another job's now: leave its objects alone
            return
        try:
            if retryable:
                self.tracker.flush(status)
            else:  # terminal: the manifest holds the accounting; nothing of the attempt lingers
                self._delete(self.tracker.path)
            self._delete(self.run / PROGRESS)
        except Exception as exc:  # the bucket may be the reason the job is ending
            log.warning("could not tidy the live status", reason=str(exc)[:200])

    def _delete(self, path: S3Path) -> None:
        if self.lease is not None:  # only the version read before a renewal: never a taker's
            self.lease.fenced_delete_key(path)
        else:
            self.client.delete_object(Bucket=path.bucket, Key=path.key)

    # --- the epoch meter -------------------------------------------------------------------
    def callbacks(self, phase: str, epochs: int, gate_at: int = 0) -> dict[str, Callback]:
        """The ultralytics callbacks of this module (register them before the job's own, so the
        epoch's log event carries `trainer.pogona_epoch_fields`). `phase` names the training in the
        accounting; progress.json's phase is the job's (Job.phase). The budget stops the training only
        after the gate's epoch `gate_at`: the sanity epochs are always judged."""
        t: dict[str, float] = {"epoch_start": 0.0, "last": 0.0, "wait": 0.0, "step": 0.0}
        self.set(epochs=epochs, epoch=0, batch=0, eta_s=None)

        def on_train_start(trainer: Any) -> None:
            start = int(getattr(trainer, "start_epoch", 0))
            self.tracker.training_started(phase, start)
            self.set(epoch=start, batches=len(trainer.train_loader))
            if start >= gate_at:  # past the gate: raises BudgetSpent, the job publishes partial
                self.tracker.refuse_if_spent(phase, start, epochs)

        def on_train_epoch_start(trainer: Any) -> None:
            now = time.monotonic()
            t.update(epoch_start=now, last=now, wait=0.0, step=0.0)
            self.set(batch=0)

        def on_train_batch_start(trainer: Any) -> None:
            t["wait"] += time.monotonic() - t["last"]

        def on_train_batch_end(trainer: Any) -> None:
            now = time.monotonic()
            t["step"] += now - t["last"]
            t["last"] = now
            with self._lock:
                self.state["batch"] += 1
                done_epochs, batch, batches = self.state["epoch"], self.state["batch"], self.state["batches"]
            self.set(eta_s=self._eta(phase, epochs, done_epochs, batch, batches, now - t["epoch_start"]))

        def on_fit_epoch_end(trainer: Any) -> None:
            metrics = dict(trainer.metrics)
            if trainer.epoch >= trainer.epochs or not any(k.startswith("val/") for k in metrics):
                return  # the extra call after final validation
            now = time.monotonic()
            epoch = int(trainer.epoch) + 1
            epoch_s = now - t["epoch_start"]
            train_s = max(t["last"] - t["epoch_start"], 1e-9)
            images = len(trainer.train_loader.dataset)
            share = t["wait"] / t["step"] if t["step"] > 0 else None
            self.tracker.epoch_done(phase, epoch, epoch_s, share)
            eta = self._eta(phase, epochs, epoch, 0, None, 0.0)
            fields = {
                "images_per_s": round(images / train_s, 2),
                "epoch_seconds": round(epoch_s, 2),
                "eta_s": round(eta, 1) if eta is not None else None,
                "dataloader_share": round(share, 3) if share is not None else None,
            }
            trainer.pogona_epoch_fields = fields
            values = {name: round(float(metrics[key]), 5) for name, key in METRICS.items() if key in metrics}
            self.set(epoch=epoch, batch=0, metrics=values, **fields)
            # Written now, not at the writer's next tick (POGONA_PROGRESS_INTERVAL_S): `runs watch` shows
            # the epoch the log just printed, with the same ETA.
            self.write()
            if epoch >= gate_at and self.tracker.should_stop(phase, epoch, epochs, epoch_s):
                trainer.stop = True

        return {
            "on_train_start": on_train_start,
            "on_train_epoch_start": on_train_epoch_start,
            "on_train_batch_start": on_train_batch_start,
            "on_train_batch_end": on_train_batch_end,
            "on_fit_epoch_end": on_fit_epoch_end,
        }

    def _eta(
        self, phase: str, epochs: int, done: int, batch: int, batches: int | None, in_epoch_s: float
    ) -> float | None:
        """Seconds left in this phase: the mean epoch so far, or the batch rate in the first epoch."""
        seen = self.tracker.epoch_seconds.get(phase) or []
        if seen:
            per_epoch = sum(seen) / len(seen)
        elif batch and batches:
            per_epoch = in_epoch_s / batch * batches
        else:
            return None
        return max(0.0, (epochs - done) * per_epoch - in_epoch_s)


def start(job: Any, device: str) -> LiveStatus:
    """After the lease is taken: detect the instance, read the earlier attempts, start the writer."""
    from pogona_job.run import cloud

    s = job.settings
    instance = cloud.instance(override=s.instance_type)
    tracker = Tracker(job.client, job.out, s, instance, device, job.attempt, job.record.timings)
    tracker.guard = job.lease.confirm if job.lease is not None else None
    tracker.load()
    log.info("instance", type=instance.type, lifecycle=instance.lifecycle, source=instance.source)

    def holds_run() -> bool:
        return job.lease is not None and not job.lease.lost

    return LiveStatus(job.client, job.out, tracker, job.run_id, s.progress_interval_s, holds_run, job.lease).start()


# --- runs watch --------------------------------------------------------------------------------


def _read(client: Any, path: S3Path) -> tuple[dict[str, Any] | None, float | None]:
    from pogona_job.s3 import pointers

    found = pointers.read(client, path)
    return found.value, found.last_modified


def latest_live_run(client: Any, output: S3Path) -> str | None:
    """The run whose progress.json was written last (latest.json only knows finished runs)."""
    newest: tuple[float, str] | None = None
    for obj in storage.list_objects(client, output):
        if obj.rel.count("/") == 1 and obj.rel.endswith("/" + PROGRESS):
            _, modified = _read(client, output / obj.rel)
            if modified is not None and (newest is None or modified > newest[0]):
                newest = (modified, obj.rel.split("/")[0])
    return newest[1] if newest else None


def status_of(progress: dict[str, Any] | None, manifest: dict[str, Any] | None, now: float) -> dict[str, Any]:
    """One line of `runs watch`: the live state, "stalled", or the run's final status."""
    if manifest is not None and manifest.get("in_progress"):  # the holder's claim at its start: not a result
        manifest = None
    if manifest is not None and manifest.get("status") in _FINAL:  # never progress.json over a final manifest
        return {"state": manifest["status"], "final": True, "manifest": manifest}
    if progress is None:
        if manifest is not None:
            return {"state": manifest.get("status", "unknown"), "final": True, "manifest": manifest}
        return {"state": "waiting", "final": False}
    age = now - float(progress.get("heartbeat_ts", 0))
    interval = float(progress.get("interval_s", 30))
    stalled = age > STALL_INTERVALS * max(interval, 1.0)
    return {**progress, "state": "stalled" if stalled else "running", "heartbeat_age_s": round(age, 1), "final": False}


def final_words(run: S3Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """What a finished watch ends with: the headline metric (best.pt on val, with its interval) and the report."""
    overall = ((manifest.get("evaluation") or {}).get("val") or {}).get("overall") or {}
    headline = "no evaluation"
    if "map50" in overall:
        ci = (overall.get("ci") or {}).get("map50")
        headline = f"best.pt mAP@0.5 {overall['map50']:.3f}" + (f" (95% {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
    artifacts = manifest.get("artifacts") or {}
    report = "report.html" if "report.html" in artifacts or not artifacts else "report.md"
    return {"headline": headline, "report": (run / report).uri, "failure": manifest.get("failure")}


def watch(client: Any, output: S3Path, run_id: str | None, *, once: bool = False, poll_s: float = 2.0) -> int:
    """Follow a run: a rich display on a terminal, one JSON object per change otherwise."""
    tty = sys.stdout.isatty()
    last: str | None = None
    display = _RichDisplay() if tty and not once else None
    try:
        while True:
            rid = run_id or latest_live_run(client, output)
            run_id = rid  # --latest follows the run it found to its end, never back to "waiting"
            if rid is None:
                line: dict[str, Any] = {"state": "waiting", "final": False, "reason": "no live run under the prefix"}
            else:
                progress, _ = _read(client, output / rid / PROGRESS)
                manifest = storage.get_json(client, output / rid / "manifest.json")
                line = {"run_id": rid, **status_of(progress, manifest, time.time())}
                if line.get("final"):
                    line.update(final_words(output / rid, line.get("manifest") or {}))
            text = json.dumps({k: v for k, v in line.items() if k not in ("manifest", "heartbeat_age_s")}, default=str)
            if display is not None:
                display.show(line)
            elif text != last:
                print(json.dumps({k: v for k, v in line.items() if k != "manifest"}, default=str), flush=True)
            last = text
            if once or line.get("final"):
                if display is not None:
                    display.close(line)
                return 0 if line.get("state") not in ("failed", "stalled") else 1
            time.sleep(min(poll_s, float(line.get("interval_s") or poll_s)))  # no slower than the writer
    except KeyboardInterrupt:
        if display is not None:
            display.close(None)
        return 130


class _RichDisplay:
    """The terminal's bar. Its ETA is the job's own (progress.json's eta_s, the figure the log prints),
    not rich's estimate from the bar's speed, which knows nothing of epochs and showed -:--:-- beside it."""

    def __init__(self, console: Any = None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            transient=False,
            console=console,  # None: the terminal
        )
        self.bar.start()
        self.task = self.bar.add_task("waiting", total=None, eta="-")

    def show(self, line: dict[str, Any]) -> None:
        metrics = " ".join(f"{k} {v:.3f}" for k, v in (line.get("metrics") or {}).items())
        state = line.get("state", "")
        colour = "red" if state == "stalled" else "green"
        label = f"[{colour}]{state}[/] {line.get('run_id', '')} {line.get('phase', '')}"
        self.bar.update(
            self.task,
            description=f"{label} attempt {line.get('attempt', '-')} {metrics}",
            completed=line.get("epoch") or 0,
            total=line.get("epochs"),
            eta=eta_text(line.get("eta_s")),
        )

    def close(self, line: dict[str, Any] | None) -> None:
        self.bar.stop()
        if line and line.get("final"):
            manifest = line.get("manifest") or {}
            summary = (manifest.get("accounting") or {}).get("summary", "")
            extra = [f"{line['headline']}." if line.get("headline") else ""]
            extra.append(f"Report: {line['report']}" if line.get("report") else "")
            print(" ".join(x for x in [f"Run finished: {line.get('state')}.", summary, *extra] if x))


def watch_command(args: Any, settings: Any) -> int:
    """`pogona-job runs watch ID|--latest [--once]`."""
    from pogona_job.errors import ConfigError

    if settings.output_uri is None:
        raise ConfigError("POGONA_OUTPUT_URI is required: set it to the s3://bucket/prefix the runs are written under.")
    if bool(args.run_id) == bool(args.latest):
        raise ConfigError("runs watch needs a run id or --latest (one of them).")
    client = storage.make_client(threads=4, max_attempts=settings.s3_max_attempts)
    return watch(client, S3Path.parse(settings.output_uri), args.run_id, once=args.once)
