"""Transfer progress: a rich bar on a terminal, a periodic structured event otherwise.

Both honour a stop check between files, so a SIGTERM during a long pull is not held up.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pogona_job.logs import get_logger
from pogona_job.s3.storage import Progress

log = get_logger()


@contextmanager
def transfer_progress(
    what: str, *, console: bool, interval_s: float = 5.0, check: Callable[[], None] | None = None
) -> Iterator[Progress]:
    """Yields the callback that storage calls with (files_done, bytes_done)."""
    if console and sys.stderr.isatty():
        from rich.progress import Progress as Bar
        from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

        with Bar(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True) as bar:
            task = bar.add_task(what)

            def update(files: int, nbytes: int) -> None:
                if check:
                    check()
                bar.update(task, description=f"{what}: {files} files, {nbytes / 1e6:.1f} MB")

            yield update
        return
    last = [time.monotonic()]

    def report(files: int, nbytes: int) -> None:
        if check:
            check()
        now = time.monotonic()
        if now - last[0] >= interval_s:
            last[0] = now
            log.info(f"{what} progress", files=files, mbytes=round(nbytes / 1e6, 1))

    yield report
