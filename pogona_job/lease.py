"""One trainer per run id: a lease object written with a conditional PUT (If-None-Match: *).

The holder renews it from a heartbeat thread; a crashed holder's lease expires, so a
retry can take the run over instead of being blocked forever.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from typing import Any

from botocore.exceptions import ClientError

from pogona_job import storage
from pogona_job.errors import RunBusy
from pogona_job.logs import get_logger
from pogona_job.storage import S3Path

log = get_logger()


class Lease:
    def __init__(self, client: Any, path: S3Path, ttl_s: float) -> None:
        self.client, self.path, self.ttl_s = client, path, ttl_s
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"holder": self.token, "expires_at": time.time() + self.ttl_s}).encode()

    def acquire(self, run_id: str) -> None:
        for _ in range(2):
            if self._put_if_absent():
                self._thread = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
                self._thread.start()
                return
            current = storage.get_json(self.client, self.path) or {}
            if float(current.get("expires_at", 0)) > time.time():
                raise RunBusy(
                    f"Run {run_id} is being trained by another job right now (its lease expires in "
                    f"{float(current['expires_at']) - time.time():.0f}s unless renewed): this start does nothing; "
                    "retry later or use another POGONA_RUN_ID."
                )
            log.warning("taking over an expired lease", previous=current.get("holder"))
            with storage.errors_for(self.path.bucket, "taking over the run lease"):
                self.client.delete_object(Bucket=self.path.bucket, Key=self.path.key)
        raise RunBusy(f"Run {run_id} was taken over by another job at the same moment; retry later.")

    def _put_if_absent(self) -> bool:
        with storage.errors_for(self.path.bucket, "taking the run lease"):
            try:
                self.client.put_object(Bucket=self.path.bucket, Key=self.path.key, Body=self._body(), IfNoneMatch="*")
                return True
            except ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                    return False
                raise

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                current = storage.get_json(self.client, self.path) or {}
                if current.get("holder") != self.token:
                    log.error("lease lost to another job")
                    return
                storage.put_bytes(self.client, self.path, self._body(), content_type="application/json")
            except Exception as exc:  # a missed beat is survivable until the TTL runs out
                log.warning("lease heartbeat failed", reason=str(exc))

    def release(self) -> None:
        self._stop.set()
        try:
            current = storage.get_json(self.client, self.path) or {}
            if current.get("holder") == self.token:
                self.client.delete_object(Bucket=self.path.bucket, Key=self.path.key)
        except Exception as exc:  # expiry frees it anyway
            log.warning("could not release the lease", reason=str(exc))
