"""Everything the job does with S3: boto3 for the control plane, obstore for the bulk bytes.

- boto3 (the `client` passed around): listings, heads, small JSON, conditional writes, deletes.
  Its errors carry S3's own codes, and botocore's Stubber and event hooks work on them.
- obstore (Apache Arrow's Rust `object_store`): the dataset pull's GETs and every file upload
  (multipart for large files), with its own connection pool, retries and backoff. Its store is
  derived from the boto3 client: the same refreshing credentials (every source boto3 knows),
  endpoint, region, addressing style, proxy, CA bundle and attempt limit.

What this module keeps for itself is the job's logic: the pull's cache index and content checks,
and the mapping of what is left after retries onto exit codes (refused 4, transient 75, wrong
endpoint 2, bad keys 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import urllib.request
import weakref
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
    SSLError,
)

from pogona_job.errors import ConfigError, DatasetError, JobError, StorageDenied, TransientFailure

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from obstore.store import S3Store
else:
    S3Client = Any

CACHE_INDEX = ".pogona-cache.json"
_PARTS = ".pogona-parts"  # temp files of a pull in progress: short names, renamed into place when complete
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
_REDIRECTED = {"PermanentRedirect", "TemporaryRedirect", "AuthorizationHeaderMalformed", "301", "307"}


@dataclass(frozen=True)
class S3Path:
    bucket: str
    key: str  # no leading or trailing slash; "" is the bucket root

    @classmethod
    def parse(cls, uri: str) -> S3Path:
        """`s3://bucket/prefix`; `.` and `..` segments are refused (exit 2): a prefix must not climb."""
        rest = uri.removeprefix("s3://")
        bucket, _, key = rest.partition("/")
        if not uri.startswith("s3://") or not bucket or any(p in (".", "..") for p in key.split("/")):
            raise ConfigError(f"Refusing the S3 URI {uri!r}: write it as s3://bucket/prefix with no '.' or '..' parts.")
        return cls(bucket, key.strip("/"))

    def __truediv__(self, part: str) -> S3Path:
        return S3Path(self.bucket, f"{self.key}/{part}".strip("/"))

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}".rstrip("/")


def _custom_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def make_client(*, threads: int = 32, max_attempts: int = 5) -> S3Client:
    """One client for all threads; its pool must hold a connection per thread."""
    endpoint = _custom_endpoint()
    if endpoint is not None:
        url = urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(f"AWS_ENDPOINT_URL_S3 {endpoint!r} is not a URL: write it like https://host:port.")
    config = Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=threads + 4,
        # S3-compatible servers on an IP or localhost have no per-bucket DNS names.
        s3={"addressing_style": "path" if endpoint else "auto"},
        # Checksums only where S3 requires them: the job hashes what it uploads itself.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    try:
        client: S3Client = boto3.session.Session().client("s3", config=config)
    except ProfileNotFound as exc:
        raise ConfigError(f"{exc}: check the spelling of AWS_PROFILE against ~/.aws/config.") from None
    except ValueError as exc:  # botocore's "Invalid endpoint"
        raise ConfigError(f"The S3 endpoint is not usable ({exc}): check AWS_ENDPOINT_URL_S3.") from None
    from pogona_job.logs import route_botocore_retries

    route_botocore_retries()
    return client


def _where() -> str:
    """The endpoint and region in words, for sentences about a server that sent us elsewhere."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "(unset)"
    return f"endpoint {_custom_endpoint() or 'AWS S3'}, region {region}"


def _refusal(bucket: str, doing: str, code: str, status: str, detail: str) -> JobError:
    """The exit for an S3 error code (or HTTP status) that is left after retries."""
    if code == "NoSuchBucket":
        return StorageDenied(
            f"The bucket '{bucket}' does not exist (while {doing}): check the s3:// URI and the endpoint."
        )
    if code in _REDIRECTED or status in ("301", "307"):
        return ConfigError(
            f"The bucket '{bucket}' is not served at {_where()} (the server answered {code or status} while "
            f"{doing}): set AWS_REGION to the bucket's region or AWS_ENDPOINT_URL_S3 to its endpoint."
        )
    if code in _REFUSED or status in ("401", "403"):
        return StorageDenied(
            f"The bucket '{bucket}' refused access ({code or status}) while {doing}: check the "
            "credentials and that they may read and write that bucket and prefix."
        )
    if code in _TRANSIENT or status.startswith("5") or status in ("408", "429"):
        return TransientFailure(
            f"Storage kept failing ({code or status}) while {doing} s3://{bucket} after retries: "
            "the scheduler should retry the job later."
        )
    return JobError(f"Storage error {code or status} while {doing} s3://{bucket}: {detail}.")


def _untrusted(bucket: str, doing: str) -> StorageDenied:
    return StorageDenied(
        f"The storage endpoint's TLS certificate is not trusted (while {doing} s3://{bucket}): set AWS_CA_BUNDLE "
        "(or ca_bundle in the AWS config) to the CA that signed it; the job will not connect unverified."
    )


def _obstore_error(exc: Exception, bucket: str, doing: str) -> JobError:
    """obstore reports the S3 error document and the status inside its message."""
    text = str(exc)
    if "certificate" in text.lower() or "UnknownIssuer" in text:
        return _untrusted(bucket, doing)
    code = re.search(r"<Code>(\w+)</Code>", text)
    status = re.search(r"status code: (\d{3})", text)
    if code or status:
        return _refusal(bucket, doing, code.group(1) if code else "", status.group(1) if status else "", text[:200])
    return TransientFailure(
        f"Could not reach the storage endpoint while {doing} s3://{bucket} after retries "
        f"({text.splitlines()[0][:200]}): check the network or AWS_ENDPOINT_URL_S3, or retry later."
    )


@contextlib.contextmanager
def errors_for(bucket: str, doing: str) -> Iterator[None]:
    """Translate what botocore or obstore could not retry away into the job's exit codes."""
    from obstore.exceptions import BaseError as ObstoreError

    try:
        yield
    except JobError:
        raise
    except NoCredentialsError:
        raise StorageDenied(
            f"No AWS credentials were found while {doing} s3://{bucket}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or give the job an IAM role."
        ) from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        raise _refusal(bucket, doing, code, status, str(exc)) from None
    except SSLError:
        raise _untrusted(bucket, doing) from None
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError) as exc:
        raise TransientFailure(
            f"Could not reach the storage endpoint while {doing} s3://{bucket} ({type(exc).__name__}) "
            "after retries: check the network or AWS_ENDPOINT_URL_S3, or retry later."
        ) from None
    except BotoCoreError as exc:
        raise TransientFailure(f"Storage failed while {doing} s3://{bucket}: {exc}.") from None
    except ObstoreError as exc:
        raise _obstore_error(exc, bucket, doing) from None


# --- small objects (boto3) ------------------------------------------------------------


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


def delete_keys(client: S3Client, bucket: str, keys: list[str]) -> None:
    with errors_for(bucket, "deleting objects in"):
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True})


def delete_prefix(client: S3Client, prefix: S3Path) -> int:
    """Delete every object under the prefix (checkpoints of a finished run)."""
    keys = [o.key for o in list_objects(client, prefix)]
    delete_keys(client, prefix.bucket, keys)
    return len(keys)


# --- listing --------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteObject:
    key: str
    rel: str  # key relative to the listed prefix, posix
    size: int
    etag: str


def list_objects(client: S3Client, prefix: S3Path) -> Iterator[RemoteObject]:
    """Objects under the prefix in key order, streamed page by page; unsafe keys refused."""
    base = f"{prefix.key}/" if prefix.key else ""
    with errors_for(prefix.bucket, f"listing {prefix.uri}"):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=prefix.bucket, Prefix=base):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if not key.endswith("/"):  # "folder" markers written by consoles
                    yield RemoteObject(key, safe_relative(key[len(base) :], key), obj["Size"], obj["ETag"].strip('"'))


def safe_relative(rel: str, key: str) -> str:
    """A key must land inside the destination folder: no `..`, no absolute paths."""
    if "\\" in rel or any(part in ("", ".", "..") for part in rel.split("/")):
        raise DatasetError(f"Refusing object key {key!r}: it would be written outside the destination folder.")
    return rel


def _check_tree(objects: list[RemoteObject]) -> None:
    """A key that is also another key's folder (`a` and `a/b`) cannot both be files on disk."""
    files = {o.rel: o.key for o in objects}
    for obj in objects:
        parts = obj.rel.split("/")
        for depth in range(1, len(parts)):
            if (parent := "/".join(parts[:depth])) in files:
                raise DatasetError(
                    f"The keys {files[parent]!r} and {obj.key!r} cannot both be pulled: one is the other's folder. "
                    "Rename or delete one of them in the bucket."
                )


# --- obstore: the bulk engine ---------------------------------------------------------

_T = TypeVar("_T")
_stores: weakref.WeakKeyDictionary[Any, dict[str, S3Store | None]] = weakref.WeakKeyDictionary()
_fallback_logged: set[str] = set()


class _FrozenCredentials:
    """obstore's credential callback over the boto3 client's own (refreshing) credentials."""

    def __init__(self, credentials: Any) -> None:
        self.credentials = credentials

    def __call__(self) -> dict[str, Any]:
        frozen = self.credentials.get_frozen_credentials()  # refreshes role / SSO / IMDS credentials when due
        return {
            "access_key_id": frozen.access_key,
            "secret_access_key": frozen.secret_key,
            "token": frozen.token,
            "expires_at": datetime.now(UTC) + timedelta(minutes=5),  # asked again often: boto3 decides refreshes
        }


def _ca_bundle() -> str | None:
    from botocore.session import get_session

    try:
        found = get_session().get_config_variable("ca_bundle")  # AWS_CA_BUNDLE, else the config file's ca_bundle
    except ProfileNotFound:
        return None
    return str(found) if found else None


def _store(client: S3Client, bucket: str) -> S3Store | None:
    """The obstore store for this client and bucket, or None where botocore must move the bytes."""
    cached = _stores.setdefault(client, {})
    if bucket in cached:
        return cached[bucket]
    from obstore.store import S3Store

    credentials = client._request_signer._credentials  # type: ignore[attr-defined]
    if credentials is None:
        return None
    endpoint = client.meta.endpoint_url
    url = urlsplit(endpoint)
    path_style = (client.meta.config.s3 or {}).get("addressing_style") == "path"
    custom = path_style or not (url.hostname or "").endswith(".amazonaws.com")
    options: dict[str, Any] = {"allow_http": url.scheme == "http", "connect_timeout": "10s", "timeout": "30min"}
    options["read_timeout"] = "60s"
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        options["proxy_url"] = proxy
        if no_proxy := os.environ.get("NO_PROXY") or os.environ.get("no_proxy"):
            options["proxy_excludes"] = no_proxy
    try:
        if bundle := _ca_bundle():
            options["root_certificate"] = Path(bundle).read_text()
        attempts = int(client.meta.config.retries.get("max_attempts", 5))  # type: ignore[union-attr]
        config: dict[str, Any] = {"region": client.meta.region_name or "us-east-1"}
        if custom:
            config.update(endpoint=endpoint.rstrip("/"), virtual_hosted_style_request=False)
        else:  # AWS: virtual-hosted names, as botocore's "auto" does for DNS-safe bucket names
            config["virtual_hosted_style_request"] = "." not in bucket
        store = S3Store(
            bucket,
            config=config,  # type: ignore[arg-type]
            client_options=options,  # type: ignore[arg-type]
            retry_config={"max_retries": max(0, attempts - 1), "retry_timeout": timedelta(minutes=3)},
            credential_provider=_FrozenCredentials(credentials),  # type: ignore[arg-type]
        )
    except Exception as exc:  # a CA bundle it cannot read, a config it refuses: botocore does this run
        if "store" not in _fallback_logged:
            _fallback_logged.add("store")
            from pogona_job.logs import get_logger

            get_logger().warning("storage: obstore unavailable, using botocore for this run", reason=str(exc)[:300])
        store = None
    cached[bucket] = store
    return store


def _run(make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion, also from code that is itself inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


# --- the dataset pull -----------------------------------------------------------------

Progress = Callable[[int, int], None]  # (files_done, bytes_done) -> None


@dataclass
class PullResult:
    files: int
    bytes: int
    fetched: int
    skipped: int
    fingerprint: str  # sha256 over (key, size, etag) in key order: same data, same fingerprint
    seconds: float


class _Stale(Exception):
    """The listing no longer matches the bucket (an object gone or replaced): list again."""


def pull_prefix(
    client: S3Client,
    src: S3Path,
    dest: Path,
    *,
    threads: int = 32,
    progress: Progress | None = None,
    verify: bool = True,
) -> PullResult:
    """Mirror an S3 prefix into dest, fetching only what changed (same size, ETag and mtime = cached).

    Every download is checked (size, MD5 or multipart ETag) before it replaces anything; files
    appear only complete (written under dest/.pogona-parts, then renamed). Local files the
    index does not name are never touched: only what an earlier pull fetched is pruned.
    `threads` GETs run at once; `progress` is called often, also while nothing completes, so a
    stop check inside it interrupts the pull promptly.
    """
    start = time.monotonic()
    dest.mkdir(parents=True, exist_ok=True)
    index_file = dest / CACHE_INDEX
    index = _read_index(index_file)
    shutil.rmtree(dest / _PARTS, ignore_errors=True)  # left by a killed pull
    try:
        for attempt in (1, 2):
            with errors_for(src.bucket, f"listing {src.uri}"):
                listing = sorted(list_objects(client, src), key=lambda o: o.key)
            _check_tree(listing)
            _prune(dest, index, keep={o.rel for o in listing})
            try:
                fetched = _fetch_all(client, src, dest, listing, index, threads, progress, verify)
                break
            except _Stale as exc:
                if attempt == 2:
                    raise TransientFailure(
                        f"Objects under {src.uri} kept changing during the pull ({exc}): retry when the dataset "
                        "upload has finished."
                    ) from None
                from pogona_job.logs import get_logger

                get_logger().info("storage retry", message=f"{exc}; listing {src.uri} again")
    finally:
        shutil.rmtree(dest / _PARTS, ignore_errors=True)
        _write_atomic(index_file, json.dumps(index).encode())
    digest = hashlib.sha256()
    for obj in listing:
        digest.update(f"{obj.rel}\t{obj.size}\t{obj.etag}\n".encode())
    total = sum(o.size for o in listing)
    return PullResult(len(listing), total, fetched, len(listing) - fetched, digest.hexdigest(), time.monotonic() - start)


def _read_index(path: Path) -> dict[str, list[Any]]:
    """rel -> [size, etag, mtime_ns] of files this pull wrote and checked."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, list) and len(v) == 3} if isinstance(data, dict) else {}


def _cached(dest: Path, obj: RemoteObject, index: dict[str, list[Any]]) -> bool:
    entry = index.get(obj.rel)
    if entry is None or entry[:2] != [obj.size, obj.etag]:
        return False
    try:
        st = os.stat(dest / obj.rel)
    except OSError:
        return False
    return st.st_size == obj.size and st.st_mtime_ns == entry[2]  # changed on disk since: fetched again


def _prune(dest: Path, index: dict[str, list[Any]], keep: set[str]) -> None:
    """Delete files an earlier pull fetched that the bucket no longer has; nothing else."""
    root = dest.resolve()
    for rel in [r for r in index if r not in keep]:
        del index[rel]
        path = (dest / rel).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            continue
        path.unlink()
        for folder in path.parents:
            if folder == root or any(folder.iterdir()):
                break
            folder.rmdir()


def _fetch_all(
    client: S3Client,
    src: S3Path,
    dest: Path,
    listing: list[RemoteObject],
    index: dict[str, list[Any]],
    threads: int,
    progress: Progress | None,
    verify: bool,
) -> int:
    todo = [o for o in listing if not _cached(dest, o, index)]
    done = {"files": len(listing) - len(todo), "bytes": sum(o.size for o in listing) - sum(o.size for o in todo)}
    if progress:
        progress(done["files"], done["bytes"])
    if not todo:
        return 0
    parts = dest / _PARTS
    parts.mkdir(exist_ok=True)
    store = _store(client, src.bucket)
    doing = f"downloading {src.uri}"

    def place(obj: RemoteObject, tmp: Path) -> None:
        target = dest / obj.rel
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
        except OSError as exc:
            raise DatasetError(f"Cannot write the object {obj.key!r} to {target}: {exc.strerror}.") from None
        index[obj.rel] = [obj.size, obj.etag, target.stat().st_mtime_ns]
        done["files"] += 1
        done["bytes"] += obj.size

    async def get(obj: RemoteObject, tmp: Path) -> tuple[str, Any]:
        """Write the object to tmp; (ETag served, md5 of the bytes)."""
        md5 = hashlib.md5(usedforsecurity=False)
        if store is None:  # botocore does this run (see _store)
            response = await asyncio.to_thread(client.get_object, Bucket=src.bucket, Key=obj.key)
            data = await asyncio.to_thread(response["Body"].read)
            md5.update(data)
            tmp.write_bytes(data)
            return str(response["ETag"]).strip('"'), md5
        import obstore

        result = await obstore.get_async(store, obj.key)
        served = str(result.meta["e_tag"] or "").strip('"')
        with open(tmp, "wb") as fh:
            if obj.size <= 8 << 20:
                data = await result.bytes_async()
                md5.update(data)
                fh.write(data)
            else:
                async for chunk in result.stream(min_chunk_size=4 << 20):
                    md5.update(chunk)
                    fh.write(chunk)
        return served, md5

    async def fetch(obj: RemoteObject, slot: int) -> None:
        tmp = parts / str(slot)
        for attempt in (1, 2):
            try:
                served, md5 = await get(obj, tmp)
            except FileNotFoundError as exc:
                if "NoSuchBucket" in str(exc):
                    raise _obstore_error(exc, src.bucket, doing) from None
                raise _Stale(f"{obj.key} is gone") from None
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    raise _Stale(f"{obj.key} is gone") from None
                raise
            if served and served != obj.etag:
                raise _Stale(f"{obj.key} was replaced")
            problem = _check(client, src.bucket, obj, tmp, md5) if verify else None
            if problem is None:
                place(obj, tmp)
                return
            from pogona_job.logs import get_logger

            get_logger().warning("storage: download failed its check", key=obj.key, problem=problem, attempt=attempt)
        raise TransientFailure(f"The object {obj.key!r} failed its content check twice ({problem}): retry later.")

    async def main() -> None:
        queue: asyncio.Queue[RemoteObject] = asyncio.Queue()
        for obj in todo:
            queue.put_nowait(obj)

        async def worker(slot: int) -> None:
            while not queue.empty():
                await fetch(queue.get_nowait(), slot)

        async def ticker() -> None:  # progress (and so the stop check) also while every GET is waiting
            while True:
                await asyncio.sleep(0.2)
                if progress:
                    progress(done["files"], done["bytes"])

        tasks = [asyncio.ensure_future(worker(i)) for i in range(min(threads, len(todo)))]
        tick = asyncio.ensure_future(ticker())
        try:
            await _first_failure([*tasks, tick], until=tasks)
        finally:
            for task in [*tasks, tick]:
                task.cancel()
            await asyncio.gather(*tasks, tick, return_exceptions=True)

    with errors_for(src.bucket, doing):
        _run(main)
    if progress:
        progress(done["files"], done["bytes"])
    return len(todo)


async def _first_failure(watched: list[asyncio.Future[None]], until: list[asyncio.Future[None]]) -> None:
    """Wait until every task of `until` is done; the first exception of any watched task is raised."""
    pending = set(watched)
    while any(not t.done() for t in until):
        finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in finished:
            if (exc := task.exception()) is not None:
                raise exc


def _check(client: S3Client, bucket: str, obj: RemoteObject, tmp: Path, md5: Any) -> str | None:
    """Why the downloaded bytes are not the listed object, or None when they are."""
    size = tmp.stat().st_size
    if size != obj.size:
        return f"{size} bytes, listed {obj.size}"
    if re.fullmatch(r"[0-9a-f]{32}", obj.etag):
        if md5.hexdigest() == obj.etag:
            return None
    elif m := re.fullmatch(r"([0-9a-f]{32})-(\d+)", obj.etag):
        part = client.head_object(Bucket=bucket, Key=obj.key, PartNumber=1).get("ContentLength", 0)
        if part and multipart_etag(tmp, int(part)) == obj.etag:
            return None
        if not part:
            return None  # the server does not say the part size: the size check is what we have
    else:
        return None  # not an MD5 ETag (SSE-C, other stores): the size check is what we have
    meta = client.head_object(Bucket=bucket, Key=obj.key)
    if meta.get("ServerSideEncryption") == "aws:kms" or meta.get("SSECustomerAlgorithm"):
        return None  # S3 documents that these ETags are not an MD5 of the content
    return f"content does not match the ETag {obj.etag}"


def multipart_etag(path: Path, part_size: int) -> str:
    """S3's ETag of a multipart upload: MD5 of the parts' MD5s, then `-<parts>`."""
    digests = []
    with open(path, "rb") as fh:
        while chunk := fh.read(part_size):
            digests.append(hashlib.md5(chunk, usedforsecurity=False).digest())
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


# --- uploads --------------------------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    key: str
    size: int
    sha256: str


_MULTIPART_THRESHOLD = 64 << 20
_PART_SIZE = 16 << 20


def upload_file(client: S3Client, path: Path, dest: S3Path) -> Artifact:
    """Upload one file; small files in one PUT, large ones multipart (aborted on failure)."""
    return upload_many(client, [(path, dest)], threads=1)[0]


def upload_many(
    client: S3Client, items: list[tuple[Path, S3Path]], *, threads: int = 16, progress: Progress | None = None
) -> list[Artifact]:
    """Upload files concurrently through obstore; returns their sizes and checksums."""
    if not items:
        return []
    results: dict[int, Artifact] = {}

    async def one(i: int, path: Path, dest: S3Path, slots: asyncio.Semaphore) -> None:
        async with slots:
            results[i] = await _upload(client, path, dest)
            if progress:
                progress(len(results), sum(a.size for a in results.values()))

    async def main() -> None:
        slots = asyncio.Semaphore(max(1, threads))
        tasks = [asyncio.ensure_future(one(i, p, d, slots)) for i, (p, d) in enumerate(items)]
        try:
            await _first_failure(tasks, until=tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    _run(main)
    return [results[i] for i in range(len(items))]


async def _upload(client: S3Client, path: Path, dest: S3Path) -> Artifact:
    size = path.stat().st_size
    store = _store(client, dest.bucket)
    started = datetime.now(UTC) - timedelta(minutes=10)  # clock skew; one run writes a key at a time
    with errors_for(dest.bucket, f"uploading {dest.key}"):
        try:
            if size < _MULTIPART_THRESHOLD:
                data = path.read_bytes()
                if store is None:
                    await asyncio.to_thread(client.put_object, Bucket=dest.bucket, Key=dest.key, Body=data)
                else:
                    import obstore

                    await obstore.put_async(store, dest.key, data, use_multipart=False)
                return Artifact(dest.key, size, hashlib.sha256(data).hexdigest())
            if store is None:
                from boto3.s3.transfer import TransferConfig

                await asyncio.to_thread(
                    client.upload_file, str(path), dest.bucket, dest.key, Config=TransferConfig(multipart_chunksize=_PART_SIZE)
                )
            else:
                import obstore

                await obstore.put_async(store, dest.key, path, use_multipart=True, chunk_size=_PART_SIZE, max_concurrency=4)
        except BaseException:
            if size >= _MULTIPART_THRESHOLD:
                await asyncio.to_thread(_abort_uploads, client, dest, started)
            raise
    return Artifact(dest.key, size, await asyncio.to_thread(sha256_file, path))


def _abort_uploads(client: S3Client, dest: S3Path, since: datetime) -> None:
    """Abort the multipart uploads of this key that a failed upload left open: no hidden parts billed."""
    with contextlib.suppress(ClientError, BotoCoreError):
        found = client.list_multipart_uploads(Bucket=dest.bucket, Prefix=dest.key).get("Uploads", [])
        for upload in found:
            if upload["Key"] == dest.key and upload["Initiated"] >= since:
                client.abort_multipart_upload(Bucket=dest.bucket, Key=dest.key, UploadId=upload["UploadId"])


# Never pushed: secrets, version control, editor and OS droppings, caches.
_JUNK_NAMES = {"__pycache__", "Thumbs.db", "desktop.ini", "node_modules"}


def is_junk(rel: str) -> bool:
    """Hidden files and folders (.env, .git/, .DS_Store), caches and editor backups."""
    parts = rel.split("/")
    name = parts[-1]
    return (
        any(p.startswith(".") or p in _JUNK_NAMES for p in parts)
        or name.endswith(("~", ".pyc", ".swp", ".tmp"))
        or name.startswith("~$")
    )


def push_tree(
    client: S3Client,
    src: Path,
    dest: S3Path,
    *,
    threads: int = 32,
    progress: Progress | None = None,
    delete: bool = False,
    on_delete: Callable[[str], None] | None = None,
) -> tuple[int, int]:
    """Upload a local folder, skipping junk and objects already there unchanged (size and ETag).

    With `delete`, objects under dest that the folder does not have are removed (each named to
    `on_delete` first). Returns (uploaded, skipped).
    """
    remote = {o.rel: o for o in list_objects(client, dest)}
    todo: list[tuple[Path, S3Path]] = []
    local: set[str] = set()
    skipped = 0
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src).as_posix()
        if is_junk(rel):
            continue
        local.add(rel)
        have = remote.get(rel)
        if have and have.size == path.stat().st_size and have.etag == _local_etag(path, have.etag):
            skipped += 1
            continue
        todo.append((path, dest / rel))
    upload_many(client, todo, threads=threads, progress=progress)
    if delete:
        gone = [o for rel, o in sorted(remote.items()) if rel not in local]
        for obj in gone:
            if on_delete:
                on_delete(obj.key)
        delete_keys(client, dest.bucket, [o.key for o in gone])
    return len(todo), skipped


def _local_etag(path: Path, remote_etag: str) -> str:
    if "-" in remote_etag:
        return multipart_etag(path, _PART_SIZE)
    return md5_file(path)


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
