"""The dataset pull: mirror an S3 prefix into a local folder, fetching only what changed.

The listing is boto3's (storage.list_objects); the GETs are obstore's, `threads` at once on one
event loop. What is job logic lives here: the cache index (what this pull wrote, with size, ETag
and mtime; journalled a line per file, so a pull killed with -9 goes on where it stopped), the
content checks (size always; MD5 or the multipart ETag), the temp part files renamed into place
only when checked, and ownership: a file is the pull's only while its size and mtime are what the
index recorded. Only those are pruned or replaced; the user's files are kept, and named.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from pogona_job.errors import ConfigError, DatasetError, TransientFailure
from pogona_job.s3 import storage
from pogona_job.s3.storage import CACHE_INDEX, Progress, RemoteObject, S3Path

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
else:
    S3Client = Any

_PARTS = ".pogona-parts"  # temp files of a pull in progress: short names, renamed into place when complete
# One JSON line per file placed, appended before its rename: a pull killed with -9 leaves an index that
# still names everything it wrote, so the same command goes on (and the index is O(1) per file to keep).
JOURNAL = CACHE_INDEX + ".journal"
Index = dict[str, list[Any]]  # rel -> [size, etag, mtime_ns] of each file a pull wrote and checked


def pulled_before(dest: Path) -> bool:
    """Whether a pull (finished or killed) wrote into dest: its index, its journal or its part files are there."""
    return any((dest / name).exists() for name in (CACHE_INDEX, JOURNAL, _PARTS))


@dataclass
class PullResult:
    files: int
    bytes: int
    fetched: int
    skipped: int
    fingerprint: str  # sha256 over (key, size, etag) in key order: same data, same fingerprint
    seconds: float
    notes: list[str] = field(default_factory=list)  # the user's files kept (not replaced, not pruned), one a line


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
    replace: bool = False,
) -> PullResult:
    """Mirror an S3 prefix into dest, fetching only what changed (same size, ETag and mtime = cached).

    Every download is checked (size, MD5 or multipart ETag) before it replaces anything; files
    appear only complete (written under dest/.pogona-parts, then renamed). A local file is the
    pull's own only while its size and mtime are what the index recorded when the pull wrote it;
    every other file is the user's: never pruned, and not replaced unless `replace` (the job's own
    cache, `dataset pull --force`); each one kept is named in `notes`.
    `threads` GETs run at once; `progress` is called often, also while nothing completes, so a
    stop check inside it interrupts the pull promptly.
    """
    start = time.monotonic()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{dest} exists and is not a folder: choose a folder to pull into.") from None
    except OSError as exc:
        raise ConfigError(f"Cannot create the folder {dest} to pull into: {exc.strerror}.") from None
    index = _read_index(dest)
    shutil.rmtree(dest / _PARTS, ignore_errors=True)  # left by a killed pull
    try:
        _save_index(dest, index)  # the journal of a killed pull folded in
    except OSError as exc:
        raise ConfigError(f"Cannot write into {dest} to pull into it: {exc.strerror}.") from None
    notes: list[str] = []
    try:
        for attempt in (1, 2):
            with storage.errors_for(src.bucket, f"listing {src.uri}"):
                listing = sorted(storage.list_objects(client, src), key=lambda o: o.key)
            _check_tree(listing)
            pruned_notes = _prune(dest, index, keep={o.rel for o in listing})
            try:
                fetched, kept = _fetch_all(client, src, dest, listing, index, threads, progress, verify, replace)
                notes = pruned_notes + kept
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
        _save_index(dest, index)
    digest = hashlib.sha256()
    for obj in listing:
        digest.update(f"{obj.rel}\t{obj.size}\t{obj.etag}\n".encode())
    total = sum(o.size for o in listing)
    return PullResult(
        len(listing),
        total,
        fetched,
        len(listing) - fetched - len(kept),
        digest.hexdigest(),
        time.monotonic() - start,
        notes,
    )


def _read_index(dest: Path) -> Index:
    """The index, with the journal of a pull that was killed before it saved the index replayed over it."""
    index: Index = {}
    try:
        data = json.loads((dest / CACHE_INDEX).read_text())
        if isinstance(data, dict):
            index = {k: v for k, v in data.items() if isinstance(v, list) and len(v) in (2, 3)}
    except (OSError, ValueError):
        pass
    try:
        lines = (dest / JOURNAL).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            rel, size, etag, mtime_ns = json.loads(line)
        except (ValueError, TypeError):
            continue  # the line a kill cut short
        index[str(rel)] = [size, etag, mtime_ns]
    return index


def _save_index(dest: Path, index: Index) -> None:
    _write_atomic(dest / CACHE_INDEX, json.dumps(index).encode())
    (dest / JOURNAL).unlink(missing_ok=True)  # after the index names all it held


def _ours(path: Path, entry: list[Any] | None) -> bool | None:
    """True: the file is as the pull wrote it; False: someone changed or created it; None: there is none."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if entry is None or st.st_size != entry[0]:
        return False
    return len(entry) == 2 or st.st_mtime_ns == entry[2]  # [size, etag]: an older index had no mtime


def _prune(dest: Path, index: Index, keep: set[str]) -> list[str]:
    """Delete files an earlier pull wrote that the bucket no longer has, when still as written; notes on the rest."""
    root = dest.resolve()
    notes = []
    for rel in [r for r in index if r not in keep]:
        entry = index.pop(rel)
        path = (dest / rel).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            continue
        if not _ours(path, entry):
            notes.append(f"kept {rel}: it changed since the pull wrote it, and the bucket no longer has it")
            continue
        path.unlink()
        for folder in path.parents:
            if folder == root or any(folder.iterdir()):
                break
            folder.rmdir()
    return notes


def _fetch_all(
    client: S3Client,
    src: S3Path,
    dest: Path,
    listing: list[RemoteObject],
    index: Index,
    threads: int,
    progress: Progress | None,
    verify: bool,
    replace: bool,
) -> tuple[int, list[str]]:
    """Fetch what is not cached; (files fetched, notes on the user's files kept in place of an object)."""
    todo, notes, kept = [], [], set()
    for obj in listing:
        entry = index.get(obj.rel)
        ours = _ours(dest / obj.rel, entry)
        if ours and entry is not None and entry[:2] == [obj.size, obj.etag]:
            continue  # cached
        if ours is False and not replace:
            index.pop(obj.rel, None)  # the user's file now: neither cached nor pruned later
            kept.add(obj.rel)
            notes.append(
                f"kept {obj.rel}: not as a pull wrote it (your file, or changed since); the bucket's "
                f"{obj.key!r} was not pulled: move it away or pass --force to replace it"
            )
            continue
        todo.append(obj)
    left = [o for o in listing if o.rel not in kept]
    done = {"files": len(left) - len(todo), "bytes": sum(o.size for o in left) - sum(o.size for o in todo)}
    if progress:
        progress(done["files"], done["bytes"])
    if not todo:
        return 0, notes
    parts = dest / _PARTS
    parts.mkdir(exist_ok=True)
    store = storage.object_store(client, src.bucket)
    doing = f"downloading {src.uri}"

    root, inside = dest.resolve(), set()

    def place(obj: RemoteObject, tmp: Path) -> None:
        target = dest / obj.rel
        try:
            if target.parent not in inside:  # a folder linked elsewhere must not carry a file out of dest
                if not target.parent.resolve().is_relative_to(root):  # before mkdir: resolves what exists
                    raise DatasetError(
                        f"Refusing to write {obj.key!r} through {target.parent}: it leads outside {dest}."
                    )
                target.parent.mkdir(parents=True, exist_ok=True)
                inside.add(target.parent)
            entry = [obj.size, obj.etag, tmp.stat().st_mtime_ns]  # a rename keeps the mtime
            journal.write(json.dumps([obj.rel, *entry]) + "\n")
            journal.flush()  # in the kernel before the rename: a kill -9 after it cannot orphan the file
            os.replace(tmp, target)
        except OSError as exc:
            raise DatasetError(f"Cannot write the object {obj.key!r} to {target}: {exc.strerror}.") from None
        index[obj.rel] = entry
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
                body = await result.bytes_async()
                md5.update(body)
                fh.write(body)
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
                    raise storage.obstore_error(exc, src.bucket, doing) from None
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
            await storage.first_failure([*tasks, tick], until=tasks)
        finally:
            for task in [*tasks, tick]:
                task.cancel()
            await asyncio.gather(*tasks, tick, return_exceptions=True)

    with storage.errors_for(src.bucket, doing), open(dest / JOURNAL, "a") as journal:
        storage.run_async(main)
    if progress:
        progress(done["files"], done["bytes"])
    return len(todo), notes


def _check(client: S3Client, bucket: str, obj: RemoteObject, tmp: Path, md5: Any) -> str | None:
    """Why the downloaded bytes are not the listed object, or None when they are."""
    size = tmp.stat().st_size
    if size != obj.size:
        return f"{size} bytes, listed {obj.size}"
    if re.fullmatch(r"[0-9a-f]{32}", obj.etag):
        if md5.hexdigest() == obj.etag:
            return None
    elif re.fullmatch(r"([0-9a-f]{32})-(\d+)", obj.etag):
        part = client.head_object(Bucket=bucket, Key=obj.key, PartNumber=1).get("ContentLength", 0)
        if part and storage.multipart_etag(tmp, int(part)) == obj.etag:
            return None
        if not part:
            return None  # the server does not say the part size: the size check is what we have
    else:
        return None  # not an MD5 ETag (SSE-C, other stores): the size check is what we have
    meta = client.head_object(Bucket=bucket, Key=obj.key)
    if meta.get("ServerSideEncryption") == "aws:kms" or meta.get("SSECustomerAlgorithm"):
        return None  # S3 documents that these ETags are not an MD5 of the content
    return f"content does not match the ETag {obj.etag}"


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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
