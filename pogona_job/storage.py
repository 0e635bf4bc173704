"""Everything the job does with S3, over one shared boto3 client.

Credentials, region and endpoint come from boto3's own variables. Retries are
botocore's (standard mode, bounded attempts and timeouts); this module only maps what
is left after them onto the job's exit codes: refused -> 4, still failing -> 75.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import http.client
import itertools
import json
import os
import queue
import re
import ssl
import stat
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, quote, unquote_plus, urlsplit
from xml.etree import ElementTree

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


def advance_pointer(client: S3Client, path: S3Path, pointer: dict[str, Any]) -> bool:
    """Write `latest.json` unless it already points at a run that finished later: never backwards."""
    current = get_json(client, path)
    if current is not None and str(current.get("finished_at", "")) > str(pointer["finished_at"]):
        return False
    put_json(client, path, pointer)
    return True


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
    raw = _RawS3.for_client(client, prefix.bucket)
    try:
        yield from _list_objects(client, prefix, raw)
    finally:
        if raw is not None:
            raw.close()


def _list_objects(client: S3Client, prefix: S3Path, raw: _RawS3 | None) -> Iterator[RemoteObject]:
    base = f"{prefix.key}/" if prefix.key else ""
    last = ""  # the last key seen: botocore's paginator takes over after it when the fast path gives up
    with errors_for(prefix.bucket, f"listing {prefix.uri}"):
        if raw is not None and raw.enabled:
            try:
                token: str | None = None
                while True:
                    entries, token = raw.list_page(base, token)
                    for key, size, etag in entries:
                        last = key
                        if not key.endswith("/"):  # "folder" markers written by consoles
                            yield RemoteObject(key, safe_relative(key[len(base) :], key), size, etag)
                    if token is None:
                        return
            except _NotPlain as exc:
                raw.give_up(exc, f"listing {prefix.uri}")
        paginator = client.get_paginator("list_objects_v2")
        after: dict[str, Any] = {"StartAfter": last} if last else {}
        for page in paginator.paginate(Bucket=prefix.bucket, Prefix=base, **after):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith("/"):
                    continue
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
    """Like pool.map, but keeps at most `limit` tasks in flight so memory stays flat.

    A semaphore and a done-queue, not concurrent.futures.wait(): wait() installs a waiter on every
    pending future on each call, which costs more CPU than a small file's whole download.
    """
    slots = threading.Semaphore(limit)
    finished: queue.SimpleQueue[Future[int]] = queue.SimpleQueue()

    def on_done(fut: Future[int]) -> None:
        slots.release()
        finished.put(fut)

    submitted = 0
    for item in items:
        slots.acquire()
        pool.submit(fn, item).add_done_callback(on_done)
        submitted += 1
        while not finished.empty():
            submitted -= 1
            yield finished.get().result()
    for _ in range(submitted):
        yield finished.get().result()


def pull_prefix(
    client: S3Client, src: S3Path, dest: Path, *, threads: int = 32, progress: Progress | None = None
) -> PullResult:
    """Mirror an S3 prefix into dest, fetching only what changed (same size and ETag = cached).

    `threads` transfers run at once: on the fast path (see _RawS3) as that many keep-alive
    connections driven by one event loop, otherwise as a pool of threads over the shared client.
    """
    start = time.monotonic()
    dest.mkdir(parents=True, exist_ok=True)
    index_file = dest / CACHE_INDEX
    cache: dict[str, list[Any]] = json.loads(index_file.read_text()) if index_file.exists() else {}
    fresh: dict[str, list[Any]] = {}
    verified: set[str] = set()  # on disk with the listed size and ETag: what the index may record
    digest = hashlib.sha256()
    counts = {"files": 0, "bytes": 0, "fetched": 0}
    folders: set[str] = set()
    raw = _RawS3.for_client(client, src.bucket)

    def part_file(obj: RemoteObject, worker: int) -> tuple[str, str]:
        target = os.path.join(dest, obj.rel)
        folder, name = os.path.split(target)
        if folder not in folders:
            os.makedirs(folder, exist_ok=True)
            folders.add(folder)
        return target, os.path.join(folder, f".{name}.part-{os.getpid()}-{worker}")

    def get_with_botocore(obj: RemoteObject, tmp: str) -> None:
        body = client.get_object(Bucket=src.bucket, Key=obj.key)["Body"]
        with open(tmp, "wb") as fh:
            for chunk in body.iter_chunks(1 << 20):
                fh.write(chunk)

    def fetched(obj: RemoteObject, tmp: str, target: str) -> None:
        os.replace(tmp, target)
        verified.add(obj.rel)
        counts["fetched"] += 1
        if progress:
            progress(counts["files"], counts["bytes"])

    def fetch(obj: RemoteObject) -> int:  # the thread-pool path
        target, tmp = part_file(obj, threading.get_ident())
        get_with_botocore(obj, tmp)
        fetched(obj, tmp, target)
        return 1

    def to_fetch() -> Iterator[RemoteObject]:
        """Listed objects not already cached; the cache check is a stat, done here, not per transfer."""
        for obj in _list_objects(client, src, raw):
            digest.update(f"{obj.rel}\t{obj.size}\t{obj.etag}\n".encode())
            fresh[obj.rel] = [obj.size, obj.etag]
            counts["files"] += 1
            counts["bytes"] += obj.size
            if cache.get(obj.rel) == [obj.size, obj.etag] and _is_file_of_size(os.path.join(dest, obj.rel), obj.size):
                verified.add(obj.rel)
                if progress:
                    progress(counts["files"], counts["bytes"])
                continue
            yield obj

    async def fetch_fast(obj: RemoteObject, worker: _Worker) -> None:
        assert raw is not None
        target, tmp = part_file(obj, worker.index)
        if not await raw.download(worker, obj, tmp, f"downloading {src.uri}"):
            await asyncio.get_running_loop().run_in_executor(worker.pool, get_with_botocore, obj, tmp)
        fetched(obj, tmp, target)

    try:
        with errors_for(src.bucket, f"downloading {src.uri}"), ThreadPoolExecutor(threads) as pool:
            if raw is not None and not _in_event_loop():
                asyncio.run(_drive(pool, to_fetch(), fetch_fast, workers=threads, limit=threads * 4))
            else:
                for _ in _bounded_map(pool, fetch, to_fetch(), limit=threads * 4):
                    pass
    except BaseException:
        # Record what is on disk and verified even when interrupted, so a retry skips it.
        _write_atomic(index_file, json.dumps({**cache, **{rel: fresh[rel] for rel in verified}}).encode())
        raise
    finally:
        if raw is not None:
            raw.close()
    _prune(dest, keep=set(fresh))  # a mirror: files gone from the bucket must not be trained on
    _write_atomic(index_file, json.dumps({rel: fresh[rel] for rel in verified}).encode())
    return PullResult(
        files=counts["files"],
        bytes=counts["bytes"],
        fetched=counts["fetched"],
        skipped=counts["files"] - counts["fetched"],
        fingerprint=digest.hexdigest(),
        seconds=time.monotonic() - start,
    )


def _prune(dest: Path, keep: set[str]) -> int:
    """Delete local files (and emptied folders) that the completed listing no longer has."""
    removed = 0
    for path in sorted(dest.rglob("*"), reverse=True):
        rel = path.relative_to(dest).as_posix()
        if path.is_file() and rel not in keep and rel != CACHE_INDEX:
            path.unlink()
            removed += 1
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return removed


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@dataclass
class _Worker:
    index: int
    pool: ThreadPoolExecutor
    conn: _HttpGet | None = None


async def _drive(
    pool: ThreadPoolExecutor,
    objects: Iterator[RemoteObject],
    fetch: Callable[[RemoteObject, _Worker], Awaitable[None]],
    *,
    workers: int,
    limit: int,
) -> None:
    """`workers` coroutines take objects from a bounded queue; the listing is read in a pool thread."""
    loop = asyncio.get_running_loop()
    todo: asyncio.Queue[RemoteObject | None] = asyncio.Queue(maxsize=limit)

    async def produce() -> None:
        while batch := await loop.run_in_executor(pool, _take, objects, 256):
            for obj in batch:
                await todo.put(obj)
        for _ in range(workers):
            await todo.put(None)

    async def work(worker: _Worker) -> None:
        try:
            while (obj := await todo.get()) is not None:
                await fetch(obj, worker)
        finally:
            if worker.conn is not None:
                worker.conn.close()

    tasks = [asyncio.ensure_future(produce())]
    tasks += [asyncio.ensure_future(work(_Worker(i, pool))) for i in range(workers)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _take(objects: Iterator[RemoteObject], n: int) -> list[RemoteObject]:
    return list(itertools.islice(objects, n))


def _is_file_of_size(path: str, size: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size


# --- the fast path for many small objects ----------------------------------------------
# botocore spends about a millisecond of Python on every request (parameter validation, endpoint
# rules, event hooks, signing through urllib, XML and timestamp parsing): with thousands of small
# dataset files that, not the network, bounds a pull (and 32 threads mostly queue for the GIL).
# So the pull sends its requests itself, signed here (SigV4): the GETs as `threads` keep-alive
# connections on one asyncio event loop, each body written straight to its file; the listing over
# http.client with the XML parsed by ElementTree. For the plain case only: any other answer goes
# to botocore, which redoes the request with its own retries, redirects, error codes and logs; a
# refusal (3xx/4xx) switches the fast path off for the rest of the pull.

_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_CHUNK = 1 << 20


class _NotPlain(Exception):
    """An answer the fast path leaves to botocore."""

    def __init__(self, reason: str, *, refused: bool) -> None:
        super().__init__(reason)
        self.refused = refused  # the same would happen to every request: stop using the fast path


class _RawS3:
    """GETs and listings of one bucket, signed here (SigV4) with the client's own credentials."""

    def __init__(self, credentials: Any, url: SplitResult, region: str, timeout: float, connect_timeout: float) -> None:
        self._credentials = credentials
        self.https = url.scheme == "https"
        self.host, self.port = url.hostname or "", url.port
        # The Host header exactly as botocore signs it: no default port; IPv6 literals in brackets.
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.netloc = host if self.port in (None, 443 if self.https else 80) else f"{host}:{self.port}"
        self.object_base = url.path[: -len(_PROBE_KEY)]  # "/bucket/" (path style) or "/" (virtual host)
        self.list_path = self.object_base.rstrip("/") or "/"
        self.region = region
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.enabled = True
        self._signing_key: tuple[str, str, bytes] = ("", "", b"")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[http.client.HTTPConnection] = []
        self._ssl = _ssl_context() if self.https else None

    @classmethod
    def for_client(cls, client: S3Client, bucket: str) -> _RawS3 | None:
        """The fast path for this client and bucket, or None where botocore must do everything."""
        try:
            credentials = client._request_signer._credentials  # type: ignore[attr-defined]
            if credentials is None or _intercepted(client):
                return None
            # botocore's own endpoint resolution (path or virtual-host style, FIPS, ...) gives the URL.
            presigned = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": _PROBE_KEY})
            url = urlsplit(presigned)
            if url.scheme not in ("http", "https") or not url.path.endswith("/" + _PROBE_KEY) or _proxied(client, url):
                return None
            timeout = float(getattr(client.meta.config, "read_timeout", None) or 60)
            connect_timeout = float(getattr(client.meta.config, "connect_timeout", None) or 60)
            return cls(credentials, url, client.meta.region_name or "us-east-1", timeout, connect_timeout)
        except Exception:  # anything unexpected: botocore does it all, as before
            return None

    # --- requests ---

    async def download(self, worker: _Worker, obj: RemoteObject, tmp: str, doing: str) -> bool:
        """GET the object into tmp over the worker's connection; False when botocore must fetch it."""
        if not self.enabled:
            return False
        path = self.object_base + quote(obj.key, safe="/~")
        head = "".join(f"{k}: {v}\r\n" for k, v in self._headers(path, "").items())
        request = f"GET {path} HTTP/1.1\r\n{head}\r\n".encode()
        try:
            for attempt in (1, 2):
                reused = worker.conn is not None and not worker.conn.closed
                if not reused:
                    worker.conn = await self._connect()
                assert worker.conn is not None
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
                try:
                    await worker.conn.get(request, fd, obj.size, self.timeout)
                    return True
                except _NotPlain as exc:
                    # A kept-alive connection the server had closed before answering: once more, anew.
                    if not (reused and attempt == 1 and worker.conn.received == 0 and worker.conn.closed):
                        raise exc from None
                finally:
                    os.close(fd)
        except _NotPlain as exc:
            self.give_up(exc, f"{doing}: {obj.key}")
        return False

    async def _connect(self) -> _HttpGet:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    _HttpGet,
                    self.host,
                    self.port or (443 if self.https else 80),
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                ),
                self.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise _NotPlain(f"cannot connect: {type(exc).__name__}: {exc}", refused=False) from None
        return conn

    def list_page(self, prefix: str, token: str | None) -> tuple[list[tuple[str, int, str]], str | None]:
        """One page of ListObjectsV2: [(key, size, etag)] and the next continuation token."""
        params = {"list-type": "2", "prefix": prefix, "encoding-type": "url"}
        if token:
            params["continuation-token"] = token
        query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params.items()))
        response = self._get(self.list_path, query)
        body = self._read(response, None)
        try:
            return _parse_listing(body)
        except (ElementTree.ParseError, ValueError, TypeError) as exc:
            raise _NotPlain(f"unexpected listing: {exc}", refused=True) from None

    def give_up(self, exc: _NotPlain, doing: str) -> None:
        from pogona_job.logs import get_logger

        if exc.refused and self.enabled:
            self.enabled = False
            get_logger().info("storage fast path off", reason=str(exc), doing=doing)
        elif not exc.refused:
            get_logger().info("storage retry", message=f"{exc} while {doing}; retrying through botocore")

    def _get(self, path: str, query: str = "") -> http.client.HTTPResponse:
        for attempt in (1, 2):
            conn = self._connection()
            reused = conn.sock is not None
            try:
                conn.request("GET", f"{path}?{query}" if query else path, headers=self._headers(path, query))
                response = conn.getresponse()
                break
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                if not (reused and attempt == 1):  # a kept-alive connection the server closed: once more
                    raise _NotPlain(f"{type(exc).__name__}: {exc}", refused=False) from None
        if response.status != 200:
            self._read(response, None)
            refused = 300 <= response.status < 500 and response.status not in (408, 429)
            raise _NotPlain(f"HTTP {response.status}", refused=refused)
        return response

    def _read(self, response: http.client.HTTPResponse, amount: int | None) -> bytes:
        try:
            return response.read(amount)
        except (OSError, http.client.HTTPException) as exc:
            self._drop()
            raise _NotPlain(f"{type(exc).__name__}: {exc}", refused=False) from None

    def _headers(self, path: str, query: str) -> dict[str, str]:
        """SigV4 header auth for a bodiless GET (the payload hash is that of the empty string)."""
        creds = self._credentials.get_frozen_credentials()  # refreshes role credentials when due
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        day = amz_date[:8]
        if self._signing_key[:2] != (day, creds.secret_key):
            key = f"AWS4{creds.secret_key}".encode()
            for part in (day, self.region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._signing_key = (day, creds.secret_key, key)
        headers = {"host": self.netloc, "x-amz-content-sha256": _EMPTY_SHA256, "x-amz-date": amz_date}
        if creds.token:
            headers["x-amz-security-token"] = creds.token
        names = ";".join(headers)  # already in sorted order
        canonical = "\n".join(["GET", path, query, *(f"{k}:{v}" for k, v in headers.items()), "", names, _EMPTY_SHA256])
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        signature = hmac.new(self._signing_key[2], to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, SignedHeaders={names}, Signature={signature}"
        )
        return headers

    # --- connections ---

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._ssl is not None:
                conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()


class _HttpGet(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; a GET's body goes straight into a file descriptor.

    Only the plain answer is handled here: 200 with a Content-Length equal to the listed size.
    Anything else fails the request with _NotPlain and closes the connection.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.keep_alive = True
        self.received = 0  # response bytes seen for the current request
        self._future: asyncio.Future[None] | None = None
        self._head = bytearray()
        self._remaining = -1  # body bytes still expected; -1 while reading the head
        self._expected = 0
        self._fd = -1
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    async def get(self, request: bytes, fd: int, expected: int, timeout: float) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._future = loop.create_future()
        self._head.clear()
        self._remaining, self._expected, self._fd, self.received = -1, expected, fd, 0
        self._last_data = loop.time()
        self._timer = loop.call_later(timeout, self._check_timeout, timeout)
        self.transport.write(request)
        try:
            await self._future
        finally:
            self._timer.cancel()
            self._fd = -1

    def _check_timeout(self, timeout: float) -> None:
        """A read timeout like botocore's: no byte for `timeout` seconds."""
        loop = asyncio.get_running_loop()
        idle = loop.time() - self._last_data
        if idle < timeout:
            self._timer = loop.call_later(timeout - idle, self._check_timeout, timeout)
        else:
            self._fail(_NotPlain(f"no data for {timeout:.0f} s", refused=False))

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self._future is None or self._future.done():
            self._fail(_NotPlain("bytes outside a response", refused=False))
            return
        self._last_data = asyncio.get_running_loop().time()
        if self._remaining < 0:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > 65536:
                    self._fail(_NotPlain("response head too long", refused=True))
                return
            try:
                self._parse_head(bytes(self._head[:end]))
            except _NotPlain as exc:
                self._fail(exc)
                return
            data = bytes(self._head[end + 4 :])
        if len(data) > self._remaining:
            self._fail(_NotPlain("more bytes than Content-Length", refused=True))
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:  # the local disk: a real error, not one for botocore to retry
            self._fail(exc)
            return
        self._remaining -= len(data)
        if self._remaining == 0:
            self._future.set_result(None)
            if not self.keep_alive:
                self.close()

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        status = rest[:3]
        if not version.startswith(b"HTTP/1.") or not status.isdigit():
            raise _NotPlain("not an HTTP/1.x response", refused=True)
        if int(status) != 200:
            code = int(status)
            raise _NotPlain(f"HTTP {code}", refused=300 <= code < 500 and code not in (408, 429))
        self.keep_alive = version == b"HTTP/1.1"
        length = -1
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length" and value.strip().isdigit():
                length = int(value)
            elif name == b"transfer-encoding":
                raise _NotPlain("a chunked response", refused=True)
            elif name == b"connection":
                self.keep_alive = value.strip().lower() == b"keep-alive"
        if length != self._expected:
            raise _NotPlain(f"Content-Length {length}, listed size {self._expected}", refused=False)
        self._remaining = length

    def _fail(self, exc: BaseException) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._future is not None and not self._future.done():
            self._future.set_exception(_NotPlain(f"connection lost ({exc})", refused=False))


_PROBE_KEY = "pogona-probe"


def _parse_listing(body: bytes) -> tuple[list[tuple[str, int, str]], str | None]:
    root = ElementTree.fromstring(body)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    if root.tag != f"{ns}ListBucketResult":
        raise ValueError(f"root element {root.tag}")
    decode = unquote_plus if root.findtext(f"{ns}EncodingType") == "url" else str
    items = []
    for element in root.iter(f"{ns}Contents"):
        key, size, etag = (element.findtext(f"{ns}{name}") for name in ("Key", "Size", "ETag"))
        if key is None or size is None or etag is None:
            raise ValueError("an entry without Key, Size or ETag")
        items.append((decode(key), int(size), etag.strip('"')))
    token = root.findtext(f"{ns}NextContinuationToken") if root.findtext(f"{ns}IsTruncated") == "true" else None
    if root.findtext(f"{ns}IsTruncated") == "true" and not token:
        raise ValueError("a truncated listing without a continuation token")
    return items, token


def _intercepted(client: S3Client) -> bool:
    """Handlers put on the client (botocore's Stubber, fault injection) would be bypassed: not ours to do."""
    from botocore.stub import Stubber

    handlers = client.meta.events._emitter._handlers  # type: ignore[attr-defined]
    for operation in ("GetObject", "ListObjectsV2"):
        if list(handlers.prefix_search(f"before-send.s3.{operation}")):
            return True
        if any(
            isinstance(getattr(h, "__self__", None), Stubber)
            for h in handlers.prefix_search(f"before-call.s3.{operation}")
        ):
            return True
    return False


def _proxied(client: S3Client, url: SplitResult) -> bool:
    """botocore honours proxies; the fast path does not speak to them, so it stands aside."""
    if getattr(client.meta.config, "proxies", None):
        return True
    return url.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(url.hostname or "")


def _ssl_context() -> ssl.SSLContext:
    """Verify like botocore: AWS_CA_BUNDLE, else the bundle botocore ships with."""
    from botocore.httpsession import get_cert_path

    return ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True))


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
