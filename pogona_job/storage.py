"""Everything the job does with S3, over one shared boto3 client.

Credentials, region and endpoint come from boto3's own variables. Retries are
botocore's (standard mode, bounded attempts and timeouts); this module only maps what
is left after them onto the job's exit codes: refused -> 4, still failing -> 75.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from pogona_job.errors import DatasetError, JobError, StorageDenied, TransientFailure

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
else:
    S3Client = Any

CACHE_INDEX = ".pogona-cache.json"
_REFUSED = {
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccountProblem",
    "InvalidToken",
    "ExpiredToken",
    "403",
}
_TRANSIENT = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "Throttling",
    "500",
    "502",
    "503",
    "504",
}


@dataclass(frozen=True)
class S3Path:
    bucket: str
    key: str  # no leading or trailing slash; "" is the bucket root

    @classmethod
    def parse(cls, uri: str) -> S3Path:
        rest = uri.removeprefix("s3://")
        bucket, _, key = rest.partition("/")
        return cls(bucket, key.strip("/"))

    def __truediv__(self, part: str) -> S3Path:
        return S3Path(self.bucket, f"{self.key}/{part}".strip("/"))

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}".rstrip("/")


def make_client(*, threads: int = 32, max_attempts: int = 5) -> S3Client:
    """One client for all threads; its pool must hold a connection per thread."""
    custom_endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=threads + 4,
        # S3-compatible servers on an IP or localhost have no per-bucket DNS names.
        s3={"addressing_style": "path" if custom_endpoint else "auto"},
        # Checksums only where S3 requires them: the job hashes what it uploads itself.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    client: S3Client = boto3.session.Session().client("s3", config=config)
    from pogona_job.logs import route_botocore_retries

    route_botocore_retries()
    return client


@contextlib.contextmanager
def errors_for(bucket: str, doing: str) -> Iterator[None]:
    """Translate what botocore could not retry away into the job's exit codes."""
    try:
        yield
    except JobError:
        raise
    except NoCredentialsError:
        raise StorageDenied(
            f"No AWS credentials were found while {doing} s3://{bucket}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or give the job an IAM role."
        ) from None
    except (ClientError, S3UploadFailedError) as exc:
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        else:  # boto3's transfer manager wraps the ClientError in a message; the code is in brackets
            found = re.search(r"An error occurred \((\w+)\)", str(exc))
            code, status = (found.group(1) if found else ""), ""
        if code == "NoSuchBucket":
            raise StorageDenied(
                f"The bucket '{bucket}' does not exist (while {doing}): check the s3:// URI and the endpoint."
            ) from None
        if code in _REFUSED or status == "403":
            raise StorageDenied(
                f"The bucket '{bucket}' refused access ({code or status}) while {doing}: check the "
                "credentials and that they may read and write that bucket and prefix."
            ) from None
        if code in _TRANSIENT or status.startswith("5"):
            raise TransientFailure(
                f"Storage kept failing ({code or status}) while {doing} s3://{bucket} after retries: "
                "the scheduler should retry the job later."
            ) from None
        raise JobError(f"Storage error {code or status} while {doing} s3://{bucket}: {exc}.") from None
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError) as exc:
        raise TransientFailure(
            f"Could not reach the storage endpoint while {doing} s3://{bucket} ({type(exc).__name__}) "
            "after retries: check the network or AWS_ENDPOINT_URL_S3, or retry later."
        ) from None
    except BotoCoreError as exc:
        raise TransientFailure(f"Storage failed while {doing} s3://{bucket}: {exc}.") from None


# --- small objects --------------------------------------------------------------------


def get_json(client: S3Client, path: S3Path) -> dict[str, Any] | None:
    """The object parsed as JSON, or None when it does not exist."""
    with errors_for(path.bucket, f"reading {path.key}"):
        try:
            body = client.get_object(Bucket=path.bucket, Key=path.key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
    data: dict[str, Any] = json.loads(body)
    return data


def put_bytes(client: S3Client, path: S3Path, data: bytes, *, content_type: str = "application/octet-stream") -> None:
    with errors_for(path.bucket, f"writing {path.key}"):
        client.put_object(Bucket=path.bucket, Key=path.key, Body=data, ContentType=content_type)


def put_json(client: S3Client, path: S3Path, obj: Any) -> None:
    put_bytes(client, path, json.dumps(obj, indent=2, sort_keys=True).encode(), content_type="application/json")


def head(client: S3Client, path: S3Path) -> dict[str, Any] | None:
    with errors_for(path.bucket, f"checking {path.key}"):
        try:
            return dict(client.head_object(Bucket=path.bucket, Key=path.key))
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise


def check_bucket(client: S3Client, path: S3Path, doing: str) -> None:
    """Fail fast (exit 4) on a missing bucket or refused credentials, before any work."""
    with errors_for(path.bucket, doing):
        client.list_objects_v2(Bucket=path.bucket, Prefix=path.key, MaxKeys=1)


def delete_prefix(client: S3Client, prefix: S3Path) -> int:
    """Delete every object under the prefix (checkpoints of a finished run)."""
    keys = [o.key for o in list_objects(client, prefix)]
    with errors_for(prefix.bucket, f"deleting {prefix.uri}"):
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            client.delete_objects(Bucket=prefix.bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True})
    return len(keys)


# --- listing and transfers --------------------------------------------------------------


@dataclass(frozen=True)
class RemoteObject:
    key: str
    rel: str  # key relative to the listed prefix, posix
    size: int
    etag: str


def list_objects(client: S3Client, prefix: S3Path) -> Iterator[RemoteObject]:
    """Objects under the prefix in key order, streamed page by page; unsafe keys refused."""
    base = f"{prefix.key}/" if prefix.key else ""
    paginator = client.get_paginator("list_objects_v2")
    with errors_for(prefix.bucket, f"listing {prefix.uri}"):
        for page in paginator.paginate(Bucket=prefix.bucket, Prefix=base):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith("/"):
                    continue  # "folder" markers written by consoles
                yield RemoteObject(key, safe_relative(key[len(base) :], key), obj["Size"], obj["ETag"].strip('"'))


def safe_relative(rel: str, key: str) -> str:
    """A key must land inside the destination folder: no `..`, no absolute paths."""
    if "\\" in rel or any(part in ("", ".", "..") for part in rel.split("/")):
        raise DatasetError(f"Refusing object key {key!r}: it would be written outside the destination folder.")
    return rel


Progress = Callable[[int, int], None]  # (files_done, bytes_done) -> None


@dataclass
class PullResult:
    files: int
    bytes: int
    fetched: int
    skipped: int
    fingerprint: str  # sha256 over (key, size, etag) in key order: same data, same fingerprint
    seconds: float


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable[[Any], int], items: Iterable[Any], limit: int) -> Iterator[int]:
    """Like pool.map, but keeps at most `limit` tasks in flight so memory stays flat."""
    pending: set[Future[int]] = set()
    for item in items:
        pending.add(pool.submit(fn, item))
        if len(pending) >= limit:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()
    for fut in pending:
        yield fut.result()


def pull_prefix(
    client: S3Client, src: S3Path, dest: Path, *, threads: int = 32, progress: Progress | None = None
) -> PullResult:
    """Mirror an S3 prefix into dest, fetching only what changed (same size and ETag = cached)."""
    start = time.monotonic()
    dest.mkdir(parents=True, exist_ok=True)
    index_file = dest / CACHE_INDEX
    cache: dict[str, list[Any]] = json.loads(index_file.read_text()) if index_file.exists() else {}
    fresh: dict[str, list[Any]] = {}
    digest = hashlib.sha256()
    lock = threading.Lock()
    counts = {"files": 0, "bytes": 0, "fetched": 0}

    def fetch(obj: RemoteObject) -> int:
        target = dest / obj.rel
        cached = cache.get(obj.rel)
        if cached == [obj.size, obj.etag] and target.is_file() and target.stat().st_size == obj.size:
            return 0
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part-{threading.get_ident()}")
        body = client.get_object(Bucket=src.bucket, Key=obj.key)["Body"]
        with open(tmp, "wb") as fh:
            for chunk in body.iter_chunks(1 << 20):
                fh.write(chunk)
        os.replace(tmp, target)
        return 1

    def objects() -> Iterator[RemoteObject]:
        for obj in list_objects(client, src):
            digest.update(f"{obj.rel}\t{obj.size}\t{obj.etag}\n".encode())
            fresh[obj.rel] = [obj.size, obj.etag]
            with lock:
                counts["files"] += 1
                counts["bytes"] += obj.size
            yield obj

    try:
        with errors_for(src.bucket, f"downloading {src.uri}"), ThreadPoolExecutor(threads) as pool:
            for fetched in _bounded_map(pool, fetch, objects(), limit=threads * 4):
                counts["fetched"] += fetched
                if progress:
                    progress(counts["files"], counts["bytes"])
    finally:
        # Record what is on disk and verified even when interrupted, so a retry skips it.
        done = {rel: meta for rel, meta in fresh.items() if (dest / rel).is_file()}
        _write_atomic(index_file, json.dumps({**cache, **done}).encode())
    return PullResult(
        files=counts["files"],
        bytes=counts["bytes"],
        fetched=counts["fetched"],
        skipped=counts["files"] - counts["fetched"],
        fingerprint=digest.hexdigest(),
        seconds=time.monotonic() - start,
    )


@dataclass(frozen=True)
class Artifact:
    key: str
    size: int
    sha256: str


_MULTIPART_THRESHOLD = 64 << 20


def upload_file(client: S3Client, path: Path, dest: S3Path) -> Artifact:
    """Upload one file; small files in one PUT, large ones multipart (aborted on failure by s3transfer)."""
    size = path.stat().st_size
    with errors_for(dest.bucket, f"uploading {dest.key}"):
        if size < _MULTIPART_THRESHOLD:
            data = path.read_bytes()
            client.put_object(Bucket=dest.bucket, Key=dest.key, Body=data)
            return Artifact(dest.key, size, hashlib.sha256(data).hexdigest())
        from boto3.s3.transfer import TransferConfig

        client.upload_file(str(path), dest.bucket, dest.key, Config=TransferConfig(multipart_chunksize=16 << 20))
    return Artifact(dest.key, size, sha256_file(path))


def upload_many(
    client: S3Client, items: list[tuple[Path, S3Path]], *, threads: int = 16, progress: Progress | None = None
) -> list[Artifact]:
    """Upload files in parallel over the shared client; returns their sizes and checksums."""
    results: list[Artifact] = []
    with ThreadPoolExecutor(max(1, min(threads, len(items)))) as pool:
        futures = [pool.submit(upload_file, client, path, dest) for path, dest in items]
        for fut in futures:
            results.append(fut.result())
            if progress:
                progress(len(results), sum(a.size for a in results))
    return results


def push_tree(
    client: S3Client, src: Path, dest: S3Path, *, threads: int = 32, progress: Progress | None = None
) -> tuple[int, int]:
    """Upload a local folder, skipping objects already there unchanged (size and MD5 ETag).

    Returns (uploaded, skipped).
    """
    remote = {o.rel: o for o in list_objects(client, dest)}
    todo: list[tuple[Path, S3Path]] = []
    skipped = 0
    for path in sorted(p for p in src.rglob("*") if p.is_file() and p.name != CACHE_INDEX):
        rel = path.relative_to(src).as_posix()
        have = remote.get(rel)
        if have and have.size == path.stat().st_size and have.etag == md5_file(path):
            skipped += 1
            continue
        todo.append((path, dest / rel))
    upload_many(client, todo, threads=threads, progress=progress)
    return len(todo), skipped


# --- local helpers --------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def md5_file(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
