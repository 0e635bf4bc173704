"""One trainer per run id: a lease object fenced with conditional writes.

- Created with `If-None-Match: *`; renewed and taken over with `If-Match` on the ETag that was
  read, so two jobs can never both believe they hold it (the loser's write gets 412).
- Age is measured on the SERVER's clock (its `Date` at the read minus the lease's `Last-Modified`),
  never by comparing two machines' wall clocks.
- The holder counts its own validity from the moment it SENT its last successful renewal (a
  monotonic clock, injectable for tests): past `ttl_s` without one, it must assume a taker and stops.
- A lost lease is not a log line: `check()` raises LeaseLost (exit 75) at the next batch or phase,
  and the job then publishes nothing.
- Fencing that the storage enforces (see README, Reliability): every write under the run goes
  through `fenced_put`/`fenced_delete`: read the target's ETag, renew the lease by compare-and-swap,
  then write with If-Match on that ETag (If-None-Match: * when absent). A job paused anywhere in
  between finds either its renewal refused (the taker changed the lease) or its write refused (the
  taker wrote the object since): it raises LeaseLost (exit 75). At most the one request already in
  flight can land, and only on an object the taker has not written yet; the taker's own later
  write replaces it. `generation` counts takeovers; `token` names this holder in generation-scoped keys.
- A newer attempt of the same scheduler job (AWS Batch attempt N+1, or another pod of the same
  Kubernetes Job) takes over at once: the scheduler starts it only after the previous one ended.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from pogona_job.errors import JobError, LeaseLost, RunBusy, TransientFailure
from pogona_job.logs import get_logger
from pogona_job.s3 import pointers, storage
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
        self.generation = 0  # 1 + the generation of the lease this job took over (or created)
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
            "generation": self.generation,
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
            self.generation = int((current.value or {}).get("generation") or 0) + 1
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
        if self.etag is None:  # never acquired, or released: this job holds nothing
            run = getattr(self, "run_id", "?")
            raise LeaseLost(f"This job does not hold the lease of run {run}: it writes nothing into it.")

    def check(self) -> None:
        """Raise LeaseLost when the lease is (or may be) someone else's now."""
        if not self.lost and self.etag is not None and self.clock() > self._valid_until:
            self.lost = f"no renewal succeeded for {self.ttl_s:.0f}s, so another job may hold the run now"
            log.error("lease lost", reason=self.lost)
        if self.lost:
            raise LeaseLost(
                f"This job lost the lease of run {self.run_id} ({self.lost}): it stops and publishes nothing."
            )

    def fenced_put(
        self,
        path: S3Path,
        body: bytes,
        *,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
        attempts: int = 10,
    ) -> str:
        """Write `path` only while holding the run; returns the new ETag, raises LeaseLost otherwise.

        The ETag is read BEFORE the renewal: a taker that wrote the object after our renewal changed
        it, so our If-Match is refused; one that takes over after our write replaces it later."""
        for _ in range(attempts):
            expected = pointers.etag_of(self.client, path)
            self.confirm()
            etag = pointers.put_bytes(
                self.client, path, body, expected=expected, content_type=content_type, metadata=metadata
            )
            if etag is not None:
                return etag
        self.confirm()  # kept changing under us: a stale writer, or ours is not the run any more
        raise TransientFailure(f"{path.uri} kept changing under another writer ({attempts} tries); retry the job.")

    def fenced_json(self, path: S3Path, value: Any) -> str:
        body, meta = storage.json_body(value)
        return self.fenced_put(path, body, content_type="application/json", metadata=meta)

    def fenced_delete(self, prefix: S3Path) -> int:
        """Delete what is under `prefix` as LISTED before a renewal, each key only if unchanged since
        (If-Match): a taker's objects written after our listing, or rewritten since, are never touched."""
        found = [(o.key, o.etag) for o in storage.list_objects(self.client, prefix)]
        self.confirm()
        removed = 0
        for key, etag in found:
            removed += pointers.delete(self.client, S3Path(prefix.bucket, key), expected=f'"{etag}"')
        return removed

    def fenced_delete_key(self, path: S3Path) -> bool:
        """Delete one object only while holding the run and only the version read before the renewal."""
        expected = pointers.etag_of(self.client, path)
        self.confirm()
        return expected is not None and pointers.delete(self.client, path, expected=expected)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.renew()
            except JobError as exc:  # a missed beat is survivable until our validity runs out
                log.warning("lease heartbeat failed", reason=exc.sentence)
            if self.lost:
                return

    def force_release(self) -> None:
        """On a forced exit: delete the lease if it is still ours, without the lock (the main thread
        may hold it) and without waiting for the heartbeat. Best effort: expiry frees it anyway."""
        self._stop.set()
        etag = self.etag
        if etag is not None and not self.lost:
            pointers.delete(self.client, self.path, expected=etag)

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
