"""The run lease and latest.json against a real S3 server: conditional writes fence every race.

No sleeps racing timeouts: expiry is driven by a tiny TTL and polling for the state, and the
holder's own validity by an injected clock."""

from __future__ import annotations

import json
import secrets
import threading
import time
from typing import Any

import pytest

from pogona_job.errors import LeaseLost, RunBusy, TransientFailure
from pogona_job.run.lease import Lease
from pogona_job.run.publish import advance_latest
from pogona_job.s3 import pointers
from pogona_job.s3.storage import S3Path
from pogona_job.tools.locals3 import LocalS3
from tests.conftest import BUCKET


@pytest.fixture()
def prefix(s3: LocalS3) -> S3Path:
    return S3Path(BUCKET, f"lease-tests/{secrets.token_hex(4)}")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _stop_beating(lease: Lease) -> None:
    """As if the holder's machine vanished: no more renewals (the object stays)."""
    lease._stop.set()
    assert lease._thread is not None
    lease._thread.join(10)


def _holder(s3_client: Any, path: S3Path) -> str | None:
    value = pointers.read(s3_client, path).value
    return None if value is None else str(value["holder"])


def test_a_second_job_is_refused_while_the_holder_renews(s3_client: Any, prefix: S3Path) -> None:
    path = prefix / "lease.json"
    first, second = Lease(s3_client, path, 30), Lease(s3_client, path, 30)
    first.acquire("r")
    with pytest.raises(RunBusy, match="being trained by another job"):
        second.acquire("r")
    assert _holder(s3_client, path) == first.token
    first.release()
    assert pointers.read(s3_client, path).etag is None


def test_an_expired_lease_is_taken_over_and_the_old_holder_stops(s3_client: Any, prefix: S3Path) -> None:
    path = prefix / "lease.json"
    old = Lease(s3_client, path, 2)
    old.acquire("r")
    _stop_beating(old)
    new = Lease(s3_client, path, 2)
    deadline = time.monotonic() + 60
    while True:  # poll for the state: the server's clock says when it expired, not ours
        try:
            new.acquire("r")
            break
        except RunBusy:
            assert time.monotonic() < deadline, "the expired lease was never taken over"
            time.sleep(0.5)
    assert _holder(s3_client, path) == new.token
    old.renew()  # its If-Match no longer matches: it learns it lost
    with pytest.raises(LeaseLost, match="publishes nothing"):
        old.check()
    old.release()  # must not delete the new holder's lease
    assert _holder(s3_client, path) == new.token
    new.release()


def test_a_holder_that_could_not_renew_for_a_ttl_stops_even_if_nobody_took_over(s3_client: Any, prefix: S3Path) -> None:
    clock = FakeClock()
    lease = Lease(s3_client, prefix / "lease.json", 30, clock=clock)
    lease.acquire("r")
    _stop_beating(lease)  # e.g. every renewal delayed or failing
    clock.now += 29
    lease.check()  # still within its TTL: goes on
    clock.now += 2
    with pytest.raises(LeaseLost):
        lease.check()


def test_a_renewal_counts_from_when_it_was_sent_not_when_it_returned(s3_client: Any, prefix: S3Path) -> None:
    clock = FakeClock()
    lease = Lease(s3_client, prefix / "lease.json", 30, clock=clock)
    lease.acquire("r")
    _stop_beating(lease)
    real_put = pointers.put

    def slow_put(*args: Any, **kw: Any) -> str | None:
        clock.now += 20  # the PUT took 20 s
        return real_put(*args, **kw)

    pointers.put = slow_put  # type: ignore[assignment]
    try:
        lease.renew()
    finally:
        pointers.put = real_put  # type: ignore[assignment]
    clock.now += 15  # 35 s after the renewal was sent, 15 s after it returned
    with pytest.raises(LeaseLost):
        lease.check()


def test_a_newer_attempt_of_the_same_batch_job_takes_over_at_once(s3_client: Any, prefix: S3Path) -> None:
    path = prefix / "lease.json"
    dead = Lease(s3_client, path, 600, attempt=1, scheduler_job="batch:j-1")
    dead.acquire("r")
    _stop_beating(dead)
    with pytest.raises(RunBusy):  # another job entirely must wait
        Lease(s3_client, path, 600, attempt=5, scheduler_job="batch:j-2").acquire("r")
    retry = Lease(s3_client, path, 600, attempt=2, scheduler_job="batch:j-1")
    retry.acquire("r")
    assert _holder(s3_client, path) == retry.token
    dead.release()  # a stale holder that has not noticed yet: its conditional delete must miss
    assert _holder(s3_client, path) == retry.token
    with pytest.raises(RunBusy):  # and never backwards: an older attempt cannot take it from a newer one
        Lease(s3_client, path, 600, attempt=1, scheduler_job="batch:j-1").acquire("r")
    retry.release()


def test_two_jobs_taking_an_expired_lease_at_once_yield_one_holder(s3_client: Any, prefix: S3Path) -> None:
    path = prefix / "lease.json"
    pointers.write(s3_client, path, {"holder": "dead", "ttl_s": 5, "beat": 1}, expected=None)
    leases = [Lease(s3_client, path, 30, attempt=2, scheduler_job="batch:x") for _ in range(6)]
    pointers.write(
        s3_client,
        path,
        {"holder": "dead", "ttl_s": 5, "beat": 2, "scheduler_job": "batch:x", "attempt": 1},
        expected=pointers.read(s3_client, path).etag,
    )
    won: list[Lease] = []

    def take(lease: Lease) -> None:
        try:
            lease.acquire("r")
            won.append(lease)
        except RunBusy:
            pass

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Same-attempt takers may each replace the one before: whoever wrote last holds it, and every
    # earlier winner finds out at its next renewal.
    assert won and _holder(s3_client, path) in {lease.token for lease in won}
    for lease in won:
        lease.renew()
    assert sum(1 for lease in won if not lease.lost) == 1
    for lease in won:
        lease.release()


def _latest(s3_client: Any, output: S3Path) -> dict[str, Any]:
    return json.loads(s3_client.get_object(Bucket=BUCKET, Key=f"{output.key}/latest.json")["Body"].read())


def test_latest_json_never_goes_backwards_when_a_writer_slips_in_between_read_and_write(
    s3_client: Any, prefix: S3Path
) -> None:
    """The exact interleaving of the review: B reads, A (newer) writes, B writes."""
    newer = {"run_id": "newer", "finished_at": "2026-01-01T00:00:02+00:00"}
    older = {"run_id": "older", "finished_at": "2026-01-01T00:00:01+00:00"}
    real_read = pointers.read
    slipped = []

    def read_then_slip(client: Any, path: S3Path) -> pointers.Versioned:
        got = real_read(client, path)
        if not slipped:
            slipped.append(True)
            advance_latest(client, prefix, newer)  # lands after B's read, before B's write
        return got

    pointers.read = read_then_slip  # type: ignore[assignment]
    try:
        advance_latest(s3_client, prefix, older)
    finally:
        pointers.read = real_read  # type: ignore[assignment]
    assert _latest(s3_client, prefix)["run_id"] == "newer"


def test_latest_json_names_the_last_finished_of_many_concurrent_runs(s3_client: Any, prefix: S3Path) -> None:
    runs = [{"run_id": f"r{i}", "finished_at": f"2026-01-01T00:00:{i:02d}+00:00"} for i in range(10)]
    threads = [threading.Thread(target=advance_latest, args=(s3_client, prefix, m)) for m in reversed(runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _latest(s3_client, prefix)["run_id"] == "r9"


def test_an_unreadable_latest_json_is_never_taken_as_absent(s3_client: Any, prefix: S3Path) -> None:
    """It may be a newer run's pointer damaged in transit: retried, then exit 75, never overwritten."""
    s3_client.put_object(Bucket=BUCKET, Key=f"{prefix.key}/latest.json", Body=b"{not json")
    with pytest.raises(TransientFailure):
        advance_latest(s3_client, prefix, {"run_id": "r", "finished_at": "2026-01-01T00:00:00+00:00"})
    assert s3_client.get_object(Bucket=BUCKET, Key=f"{prefix.key}/latest.json")["Body"].read() == b"{not json"


def test_every_renewal_changes_the_etag_so_a_takeover_read_before_it_fails(s3_client: Any, prefix: S3Path) -> None:
    """A taker that read the lease just before the holder renewed must not replace the renewed lease."""
    path = prefix / "lease.json"
    holder = Lease(s3_client, path, 600)
    holder.acquire("r")
    _stop_beating(holder)
    seen = pointers.read(s3_client, path)
    holder.renew()
    assert not pointers.write(s3_client, path, {"holder": "taker"}, expected=seen.etag)
    assert _holder(s3_client, path) == holder.token
    holder.release()
