"""One trainer per run id: a lease object fenced with conditional writes.

- Created with `If-None-Match: *`; renewed and taken over with `If-Match` on the ETag that was
  read, so two jobs can never both believe they hold it (the loser's write gets 412).
- Age is measured on the SERVER's clock (its `Date` at the read minus the lease's `Last-Modified`),
  never by comparing two machines' wall clocks.
- The holder counts its own validity from the moment it SENT its last successful renewal (a
  monotonic clock, injectable for tests): past `ttl_s` without one, it must assume a taker and stops.
- A lost lease is not a log line: `check()` raises LeaseLost (exit 75) at the next batch or phase,
  and the job then publishes nothing.
- A newer attempt of the same scheduler job (AWS Batch attempt N+1, or another pod of the same
  Kubernetes Job) takes over at once: the scheduler starts it only after the previous one ended.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from pogona_job.errors import JobError, LeaseLost, RunBusy
from pogona_job.logs import get_logger
from pogona_job.s3 import pointers
from pogona_job.s3.storage import S3Path

log = get_logger()


class Lease:
    def __init__(
        self,
        client: Any,
        path: S3Path,
        ttl_s: float,
        *,
        attempt: int = 1,
        scheduler_job: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client, self.path, self.ttl_s = client, path, ttl_s
        self.attempt, self.scheduler_job, self.clock = attempt, scheduler_job, clock
        self.token = secrets.token_hex(8)
        self.etag: str | None = None
        self.lost: str | None = None  # why, once lost
        self._beats = 0
        self._valid_until = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self, run_id: str) -> dict[str, Any]:
        self._beats += 1  # every write changes the ETag, so a stale If-Match can never succeed
        return {
            "holder": self.token,
            "run_id": run_id,
            "attempt": self.attempt,
            "scheduler_job": self.scheduler_job,
            "ttl_s": self.ttl_s,
            "beat": self._beats,
        }

    def acquire(self, run_id: str) -> None:
        """Take the lease or raise RunBusy (exit 75). Writes nothing but the lease itself."""
        self.run_id = run_id
        for _ in range(5):
            current = pointers.read(self.client, self.path)
            if current.etag is not None:
                reason = self._may_take(current)
                if reason is None:
                    holder = current.value or {}
                    left = float(holder.get("ttl_s", self.ttl_s)) - _age(current)
                    raise RunBusy(
                        f"Run {run_id} is being trained by another job right now (its lease expires in "
                        f"{max(left, 0):.0f}s unless renewed): this start does nothing; "
                        "retry later or use another POGONA_RUN_ID."
                    )
                log.warning("taking over the run lease", reason=reason, previous=(current.value or {}).get("holder"))
            sent = self.clock()
            etag = pointers.put(self.client, self.path, self._body(run_id), expected=current.etag)
            if etag is not None:
                self.etag, self._valid_until = etag, sent + self.ttl_s
                self._thread = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
                self._thread.start()
                return
        raise RunBusy(f"Run {run_id} was taken over by another job at the same moment; retry later.")

    def _may_take(self, current: pointers.Versioned) -> str | None:
        holder = current.value
        if holder is None:
            return "the lease object is unreadable"
        same_job = bool(self.scheduler_job) and holder.get("scheduler_job") == self.scheduler_job
        if same_job and (str(self.scheduler_job).startswith("k8s:") or self.attempt > int(holder.get("attempt") or 0)):
            return f"a newer attempt ({self.attempt}) of the same scheduler job"
        if _age(current) > float(holder.get("ttl_s", self.ttl_s)):
            return "expired"
        return None

    def renew(self) -> None:
        """One conditional renewal; a conflict means another job took the run over."""
        with self._lock:
            if self.lost or self.etag is None:
                return
            sent = self.clock()
            etag = pointers.put(self.client, self.path, self._body(self.run_id), expected=self.etag)
            if etag is None:
                self.lost = "another job took the run's lease over"
                log.error("lease lost", reason=self.lost)
            else:
                self.etag, self._valid_until = etag, sent + self.ttl_s

    def confirm(self) -> None:
        """Renew now, then check: called right before writing what only the holder may write (a
        checkpoint pointer, the outputs), so a lease taken since the last heartbeat is noticed first."""
        self.renew()
        self.check()

    def check(self) -> None:
        """Raise LeaseLost when the lease is (or may be) someone else's now."""
        if not self.lost and self.etag is not None and self.clock() > self._valid_until:
            self.lost = f"no renewal succeeded for {self.ttl_s:.0f}s, so another job may hold the run now"
            log.error("lease lost", reason=self.lost)
        if self.lost:
            raise LeaseLost(
                f"This job lost the lease of run {self.run_id} ({self.lost}): it stops and publishes nothing."
            )

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.renew()
            except JobError as exc:  # a missed beat is survivable until our validity runs out
                log.warning("lease heartbeat failed", reason=exc.sentence)
            if self.lost:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        with self._lock:
            if self.lost or self.etag is None:
                return
            try:
                pointers.delete(self.client, self.path, expected=self.etag)  # only if it is still ours
            except JobError as exc:  # expiry frees it anyway
                log.warning("could not release the lease", reason=exc.sentence)
            self.etag = None


def _age(current: pointers.Versioned) -> float:
    """Seconds since the lease was last written, both ends read from the server's clock."""
    now = current.server_now if current.server_now is not None else time.time()
    return now - (current.last_modified or 0.0)
