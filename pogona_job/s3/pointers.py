"""Small JSON objects that several jobs may write at once: compare-and-swap on the ETag.

`latest.json`, `champion.json`, the lease and checkpoint pointers are read together with their
ETag and written with `If-Match` (replace exactly what was read) or `If-None-Match: *` (create only
when absent). S3 and SeaweedFS answer 412 (or 409 for a concurrent conditional write) when another
writer got there first; the caller re-reads and decides again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

from botocore.exceptions import ClientError

from pogona_job.errors import TransientFailure
from pogona_job.s3 import storage
from pogona_job.s3.storage import S3Path

_CONFLICT = (409, 412)


@dataclass(frozen=True)
class Versioned:
    """A JSON object as read, with the ETag that a conditional write must match (None: absent)."""

    value: dict[str, Any] | None
    etag: str | None
    last_modified: float | None = None  # the server's clock (epoch seconds), not ours
    server_now: float | None = None  # the server's Date header at the read: "now" on the same clock


def read(client: Any, path: S3Path) -> Versioned:
    """The object with its ETag; a body that fails its digest or does not parse is read again and,
    if it stays damaged, a TransientFailure (exit 75): never "absent", so never overwritten."""
    found = storage.read_json(client, path)
    if found.etag is None:
        return Versioned(None, None)
    modified = found.response.get("LastModified")
    date = found.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    return Versioned(
        found.value,
        found.etag,
        modified.timestamp() if modified else None,
        parsedate_to_datetime(date).timestamp() if date else None,
    )


def write(client: Any, path: S3Path, value: dict[str, Any], *, expected: str | None) -> bool:
    """Write `value` only if the object still has ETag `expected` (None: only if it is absent).

    Returns False when another writer changed it first; storage errors map to exits 4/75 as usual."""
    return put(client, path, value, expected=expected) is not None


def put(client: Any, path: S3Path, value: dict[str, Any], *, expected: str | None) -> str | None:
    """`write`, returning the new ETag (what the next conditional write must match), or None on conflict."""
    body, meta = storage.json_body(value)
    return put_bytes(client, path, body, expected=expected, content_type="application/json", metadata=meta)


def put_bytes(
    client: Any,
    path: S3Path,
    body: bytes,
    *,
    expected: str | None,
    content_type: str = "application/octet-stream",
    metadata: dict[str, str] | None = None,
) -> str | None:
    """PUT `body` only if the object still has ETag `expected` (None: only if absent); None on conflict."""
    condition = {"IfMatch": expected} if expected is not None else {"IfNoneMatch": "*"}
    with storage.errors_for(path.bucket, f"writing {path.uri}"):
        try:
            response = client.put_object(
                Bucket=path.bucket,
                Key=path.key,
                Body=body,
                ContentType=content_type,
                Metadata=metadata or {},
                **condition,
            )
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in _CONFLICT:
                return None
            raise
    return str(response["ETag"])


def etag_of(client: Any, path: S3Path) -> str | None:
    """The object's current ETag, None when absent: what a conditional replacement must match."""
    found = storage.head(client, path)
    return str(found["ETag"]) if found else None


def update(
    client: Any,
    path: S3Path,
    decide: Callable[[dict[str, Any] | None], dict[str, Any] | None],
    attempts: int = 20,
    *,
    guard: Callable[[], None] | None = None,
) -> dict[str, Any] | None:
    """Read, let `decide` return the new value (or None to leave it), write conditionally; retry on conflict.

    `guard` (the lease's renewal) runs between the read and the write: a writer that lost the run
    raises there, and one paused after it finds the object changed by the taker (412).
    Returns what was written, or None when `decide` chose to leave the object as it was."""
    for _ in range(attempts):
        current = read(client, path)
        new = decide(current.value)
        if new is None:
            return None
        if guard is not None:
            guard()
        if write(client, path, new, expected=current.etag):
            return new
    raise TransientFailure(
        f"{path.uri} kept changing under concurrent writers ({attempts} tries): retry the job later."
    )


def delete(client: Any, path: S3Path, *, expected: str) -> bool:
    """Delete the object only if it still has ETag `expected`; False when it changed (or is gone)."""
    with storage.errors_for(path.bucket, f"deleting {path.uri}"):
        try:
            client.delete_object(Bucket=path.bucket, Key=path.key, IfMatch=expected)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (*_CONFLICT, 404):
                return False
            raise
    return True
