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
import sys
import time
import urllib.request
import weakref
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import boto3
from botocore.awsrequest import AWSResponse, HTTPHeaders
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
from botocore.utils import parse_timestamp

from pogona_job.errors import ConfigError, DatasetError, JobError, StorageDenied, TransientFailure

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from obstore.store import S3Store

else:
    S3Client = Any

CACHE_INDEX = ".pogona-cache.json"
_REFUSED = {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccountProblem"}
_REFUSED |= {"InvalidToken", "ExpiredToken", "403"}
_TRANSIENT = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling"}
_TRANSIENT |= {"500", "502", "503", "504"}
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
    if endpoint is not None and (urlsplit(endpoint).scheme not in ("http", "https") or not urlsplit(endpoint).hostname):
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
        session = boto3.session.Session()
        parsers = session._session.get_component("response_parser_factory")
        parsers.set_parser_defaults(timestamp_parser=_timestamp)  # listings: dateutil took ~0.3 ms per object
        client: S3Client = session.client("s3", config=config)
    except ProfileNotFound as exc:
        raise ConfigError(f"{exc}: check the spelling of AWS_PROFILE against ~/.aws/config.") from None
    except ValueError as exc:  # botocore's "Invalid endpoint"
        raise ConfigError(f"The S3 endpoint is not usable ({exc}): check AWS_ENDPOINT_URL_S3.") from None
    _one_region_probe(client)
    from pogona_job.logs import route_botocore_retries

    route_botocore_retries()  # botocore's retries logged as "storage retry"
    return client


def _one_region_probe(client: S3Client) -> None:
    """At most one HeadBucket asking where a bucket lives: a 301 without a region ends as exit 2, not a RecursionError.

    botocore answers a redirect without `x-amz-bucket-region` by sending HeadBucket to learn the region
    (`get_bucket_region`); when that HeadBucket is redirected the same way it asks again, from inside itself,
    until the stack runs out. A probe sent from inside a probe is answered here with the 301 it would get,
    so the caller sees a plain 301 (`_refusal`). Read from the call stack: no state to leak between calls.
    """

    def before(**_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        frame, probes = sys._getframe(1), 0
        while frame is not None:
            probes += frame.f_code.co_name == "get_bucket_region"
            frame = frame.f_back  # type: ignore[assignment]
        if probes < 2:
            return None
        return AWSResponse("", 301, HTTPHeaders(), None), {
            "Error": {"Code": "301", "Message": "Moved Permanently"},
            "ResponseMetadata": {"HTTPStatusCode": 301, "HTTPHeaders": {}},
        }

    client.meta.events.register("before-call.s3.HeadBucket", before)  # type: ignore[arg-type]


def _timestamp(value: str) -> datetime:
    """S3's ISO 8601 times at C speed; anything else (HTTP dates in headers) the botocore way."""
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return parse_timestamp(value)


def _where() -> str:
    """The endpoint and region in words, for sentences about a server that sent us elsewhere."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "(unset)"
    return f"endpoint {_custom_endpoint() or 'AWS S3'}, region {region}"


def _at(bucket: str, doing: str) -> str:
    """What was being done, with where: `doing` names its s3:// URI itself or gets the bucket's."""
    return doing if "s3://" in doing else f"{doing} s3://{bucket}"


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
            f"Storage kept failing ({code or status}) while {_at(bucket, doing)} after retries: "
            "the scheduler should retry the job later."
        )
    return JobError(f"Storage error {code or status} while {_at(bucket, doing)}: {detail}.")


def _untrusted(bucket: str, doing: str) -> StorageDenied:
    return StorageDenied(
        f"The storage endpoint's TLS certificate is not trusted (while {_at(bucket, doing)}): set AWS_CA_BUNDLE "
        "(or ca_bundle in the AWS config) to the CA that signed it; the job will not connect unverified."
    )


def obstore_error(exc: Exception, bucket: str, doing: str) -> JobError:
    """obstore reports the S3 error document and the status inside its message."""
    text = str(exc)
    if "certificate" in text.lower() or "UnknownIssuer" in text:
        return _untrusted(bucket, doing)
    code = re.search(r"<Code>(\w+)</Code>", text)
    status = re.search(r"status code: (\d{3})", text)
    if code or status:
        return _refusal(bucket, doing, code.group(1) if code else "", status.group(1) if status else "", text[:200])
    return TransientFailure(
        f"Could not reach the storage endpoint while {_at(bucket, doing)} after retries "
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
            f"No AWS credentials were found while {_at(bucket, doing)}: set AWS_ACCESS_KEY_ID and "
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
            f"Could not reach the storage endpoint while {_at(bucket, doing)} ({type(exc).__name__}) "
            "after retries: check the network or AWS_ENDPOINT_URL_S3, or retry later."
        ) from None
    except BotoCoreError as exc:
        raise TransientFailure(f"Storage failed while {_at(bucket, doing)}: {exc}.") from None
    except ObstoreError as exc:
        raise obstore_error(exc, bucket, doing) from None


# --- the control plane (boto3): small objects, listings, deletes --------------------


@dataclass(frozen=True)
class JsonRead:
    """A small JSON object as read and verified: its value (None: absent) and the response."""

    value: dict[str, Any] | None
    etag: str | None
    response: dict[str, Any]


DIGEST_META = "sha256"  # x-amz-meta-sha256: our own digest of the body, on every JSON object we write
_READ_TRIES = 4


def read_json(client: S3Client, path: S3Path, *, tries: int = _READ_TRIES) -> JsonRead:
    """GET a small JSON object and verify it; a damaged body is a transient fault, never "absent".

    The body is checked against the sha256 we stored in its metadata (headers are not the body, so a
    flipped byte cannot fix both), else against the ETag when that is a plain MD5. A body that fails
    its digest, or does not parse as a JSON object, is read again; after `tries` reads it is a
    TransientFailure (exit 75): the caller neither trusts nor replaces nor deletes anything."""
    why = ""
    for attempt in range(tries):
        if attempt:
            time.sleep(min(0.2 * 2**attempt, 2.0))
        with errors_for(path.bucket, f"reading {path.uri}"):
            try:
                response: dict[str, Any] = dict(client.get_object(Bucket=path.bucket, Key=path.key))
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404", "NotFound"):
                    return JsonRead(None, None, {})
                raise
            body: bytes = response["Body"].read()
        etag = str(response.get("ETag", ""))
        digest = (response.get("Metadata") or {}).get(DIGEST_META)
        md5 = etag.strip('"')
        if digest is not None and hashlib.sha256(body).hexdigest() != digest:
            why = "its body does not match its sha256"
            continue
        plain_md5 = digest is None and _MD5.fullmatch(md5) is not None
        md5_mismatch = plain_md5 and hashlib.md5(body, usedforsecurity=False).hexdigest() != md5
        try:
            value = json.loads(body)
        except ValueError:
            why = "it does not parse as JSON"
            continue
        if not isinstance(value, dict):
            why = "it is not a JSON object"
            continue
        if md5_mismatch and attempt < tries - 1:  # an encrypted object's ETag is no MD5: accept it in the end
            why = "its body does not match its ETag"
            continue
        return JsonRead(value, etag, response)
    raise TransientFailure(f"{path.uri} came back damaged {tries} times ({why}): nothing was changed; retry the job.")


_MD5 = re.compile(r"[0-9a-f]{32}")


def get_json(client: S3Client, path: S3Path) -> dict[str, Any] | None:
    """The object parsed as JSON, or None when it does not exist (a damaged read: TransientFailure)."""
    return read_json(client, path).value


def json_body(obj: Any) -> tuple[bytes, dict[str, str]]:
    """The bytes we store for a JSON object and the metadata that lets a reader verify them."""
    body = json.dumps(obj, indent=2, sort_keys=True).encode()
    return body, {DIGEST_META: hashlib.sha256(body).hexdigest()}


def put_bytes(
    client: S3Client,
    path: S3Path,
    data: bytes,
    *,
    content_type: str = "application/octet-stream",
    metadata: dict[str, str] | None = None,
) -> None:
    with errors_for(path.bucket, f"writing {path.uri}"):
        client.put_object(
            Bucket=path.bucket, Key=path.key, Body=data, ContentType=content_type, Metadata=metadata or {}
        )


def put_json(client: S3Client, path: S3Path, obj: Any) -> None:
    body, meta = json_body(obj)
    put_bytes(client, path, body, content_type="application/json", metadata=meta)


def head(client: S3Client, path: S3Path) -> dict[str, Any] | None:
    with errors_for(path.bucket, f"checking {path.uri}"):
        try:
            return dict(client.head_object(Bucket=path.bucket, Key=path.key))
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise


def check_bucket(client: S3Client, path: S3Path, doing: str) -> bool:
    """Fail fast (exit 4) on a missing bucket or refused credentials, before any work; True when anything
    lies under the prefix. The sentence names the URI (`doing` ends with "from", "checking" ...)."""
    with errors_for(path.bucket, f"{doing} {path.uri}"):
        answer = client.list_objects_v2(Bucket=path.bucket, Prefix=path.key, MaxKeys=1)
    return bool(answer.get("KeyCount") or answer.get("Contents"))


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


# --- obstore: the bulk engine ---------------------------------------------------------

_T = TypeVar("_T")
_stores: weakref.WeakKeyDictionary[Any, dict[str, S3Store | None]] = weakref.WeakKeyDictionary()


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


def object_store(client: S3Client, bucket: str) -> S3Store | None:
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
    path_style = (getattr(client.meta.config, "s3", None) or {}).get("addressing_style") == "path"
    custom = path_style or not (url.hostname or "").endswith(".amazonaws.com")
    options: dict[str, Any] = {"allow_http": url.scheme == "http", "connect_timeout": "10s", "read_timeout": "60s"}
    options["timeout"] = "30min"  # a whole large GET or part; stalls are caught by read_timeout
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        options["proxy_url"] = proxy
        if no_proxy := os.environ.get("NO_PROXY") or os.environ.get("no_proxy"):
            options["proxy_excludes"] = no_proxy
    try:
        if bundle := _ca_bundle():
            options["root_certificate"] = Path(bundle).read_text()
        retries = getattr(client.meta.config, "retries", None) or {}
        attempts = int(retries.get("total_max_attempts", 6))  # botocore's: the first try + max_attempts retries
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
        from pogona_job.logs import get_logger

        get_logger().warning(
            "storage: obstore unavailable, botocore moves the bytes", bucket=bucket, reason=str(exc)[:300]
        )
        store = None
    cached[bucket] = store
    return store


def run_async(make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion, also from code that is itself inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


# --- the dataset pull -----------------------------------------------------------------

Progress = Callable[[int, int], None]  # (files_done, bytes_done) -> None


async def first_failure(watched: Sequence[asyncio.Future[None]], until: Sequence[asyncio.Future[None]]) -> None:
    """Wait until every task of `until` is done; the first exception of any watched task is raised."""
    pending = set(watched)
    while any(not t.done() for t in until):
        finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in finished:
            if (exc := task.exception()) is not None:
                raise exc


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
            await first_failure(tasks, until=tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    run_async(main)
    return [results[i] for i in range(len(items))]


# What a browser (a presigned URL, the S3 console) needs to show an object instead of downloading it.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
    ".json": "application/json",
    ".csv": "text/csv; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".png": "image/png",
    ".jpg": "image/jpeg",
}


def content_type(path: Path) -> str:
    return CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")


async def _upload(client: S3Client, path: Path, dest: S3Path) -> Artifact:
    import obstore

    size = path.stat().st_size
    kind = content_type(path)
    store = object_store(client, dest.bucket)
    started = datetime.now(UTC) - timedelta(minutes=10)  # clock skew; one run writes a key at a time
    with errors_for(dest.bucket, f"uploading {dest.uri}"):
        try:
            if store is None:  # botocore this run (see object_store); s3transfer aborts its own multipart uploads
                from boto3.s3.transfer import TransferConfig

                config = TransferConfig(multipart_threshold=_MULTIPART_THRESHOLD, multipart_chunksize=_PART_SIZE)
                await asyncio.to_thread(
                    client.upload_file,
                    str(path),
                    dest.bucket,
                    dest.key,
                    Config=config,
                    ExtraArgs={"ContentType": kind},
                )
            elif size < _MULTIPART_THRESHOLD:
                data = path.read_bytes()
                await obstore.put_async(store, dest.key, data, use_multipart=False, attributes={"Content-Type": kind})
                return Artifact(dest.key, size, hashlib.sha256(data).hexdigest())
            else:
                await obstore.put_async(
                    store, dest.key, path, chunk_size=_PART_SIZE, max_concurrency=4, attributes={"Content-Type": kind}
                )
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


def abort_multipart_uploads(client: S3Client, prefix: S3Path) -> int:
    """Abort every multipart upload open under `prefix`: a process killed with -9 mid-upload never
    ran its own abort, and the parts would be billed forever. Called by the lease holder at start."""
    base = f"{prefix.key}/" if prefix.key else ""
    aborted = 0
    with errors_for(prefix.bucket, f"listing the open uploads under {prefix.uri}"):
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=prefix.bucket, Prefix=base):
            for upload in page.get("Uploads", []):
                client.abort_multipart_upload(Bucket=prefix.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted += 1
    return aborted


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
    files = local_files(src)  # refused before anything is listed or uploaded
    abort_multipart_uploads(client, dest)  # a push killed mid-part left them open: billed, never listed
    remote = {o.rel: o for o in list_objects(client, dest)}
    todo: list[tuple[Path, S3Path]] = []
    local: set[str] = set()
    skipped = 0
    for rel, path in files:
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


def local_files(src: Path) -> list[tuple[str, Path]]:
    """(key relative to src, path) of every file a push uploads, in key order; junk left out.

    Symbolic links are followed only while they stay inside src: a link that leaves it (to a credentials
    file, a home folder) is refused with every such link named, before anything is uploaded, and so is a
    file name that is not UTF-8 (S3 keys are UTF-8). A link to a folder it is in (a loop) is not walked again.
    """
    root = src.resolve()
    found: dict[str, Path] = {}
    leaving: list[str] = []
    undecodable: list[str] = []

    def walk(folder: Path, rel_folder: str, above: frozenset[Path]) -> None:
        real = folder.resolve()
        if real in above:  # a link to a folder it is in: walking it again would never end
            return
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            raise DatasetError(f"Cannot read the folder {folder}: {exc.strerror}.") from None
        for entry in entries:
            rel = f"{rel_folder}{entry.name}"
            try:
                rel.encode()
            except UnicodeEncodeError:
                undecodable.append(os.fsencode(folder / entry.name).decode("utf-8", "backslashreplace"))
                continue
            if is_junk(rel):  # never pushed, wherever it points
                continue
            path = folder / entry.name
            if entry.is_symlink() and not path.resolve().is_relative_to(root):
                leaving.append(f"{rel} -> {os.readlink(path)}")
            elif entry.is_dir():
                walk(path, f"{rel}/", above | {real})
            elif entry.is_file():
                found[rel] = path

    walk(src, "", frozenset())
    if leaving:
        raise DatasetError(
            f"Refusing to push {src}: {len(leaving)} symbolic link(s) lead outside it ({'; '.join(leaving[:5])}"
            f"{' ...' if len(leaving) > 5 else ''}). Copy those files into {src} (e.g. `cp -L`) or remove the links."
        )
    if undecodable:
        raise DatasetError(
            f"Refusing to push {src}: {len(undecodable)} file name(s) are not UTF-8 and cannot be S3 keys "
            f"({'; '.join(undecodable[:5])}{' ...' if len(undecodable) > 5 else ''}). Rename them (e.g. `convmv`)."
        )
    return sorted(found.items())


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
