"""Signals: SIGTERM/SIGINT ask for a stop at the next safe point (see StopFlag)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from types import FrameType
from typing import Any

from pogona_job.errors import Interrupted
from pogona_job.logs import get_logger

log = get_logger()


DUPLICATE_S = 1.0  # a wrapper (timeout, make, a shell trap, tini -g) forwards the same signal again


class StopFlag:
    """SIGTERM/SIGINT ask for a stop at the next safe point; a second signal a clear interval after
    the first (DUPLICATE_S: a forwarded copy of the same one counts once), or the budget running out,
    exits at once (AWS Batch sends SIGKILL 30 s after SIGTERM). A forced exit still releases the
    lease on a best-effort basis (`on_force`), so a restart on the same machine is not refused.

    The handler only sets a field: it may interrupt any code, even a logger holding its lock,
    so logging happens later in check(), and the budget is enforced by a watcher thread that
    polls without taking locks (it also fires while the main thread is stuck in C code).
    """

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.requested_at: float | None = None
        self._raise_now = False  # inside interruptible(): the handler raises at once
        self.signal_name = ""
        self._logged = False
        self._previous: dict[int, Any] = {}
        self.on_force: Callable[[], None] | None = None  # best effort before a forced exit (the lease)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        threading.Thread(target=self._enforce_budget, name="stop-budget", daemon=True).start()

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested_at is not None:
            if time.monotonic() - self.requested_at < DUPLICATE_S:
                return  # the same stop, delivered twice
            self._force_exit()
        self.signal_name = signal.Signals(signum).name
        self.requested_at = time.monotonic()
        if self._raise_now:
            self._raise_now = False
            raise _StopNow

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """Code with no safe points of its own (staging, evaluation) and nothing to save: a signal
        stops it at once, on the graceful path, instead of running into the hard exit."""
        self.check()
        self._raise_now = True
        try:
            yield
        except _StopNow:
            self.check()
        finally:
            self._raise_now = False

    def _enforce_budget(self) -> None:
        while True:
            time.sleep(0.25)
            if self.requested_at is not None and time.monotonic() - self.requested_at > self.budget_s:
                self._force_exit()

    def _force_exit(self) -> None:
        """Exit 143 now; first give the lease back on another thread, for at most a few seconds
        (the main thread may hold any lock, so nothing here may wait for it)."""
        hook = self.on_force
        if hook is not None:
            worker = threading.Thread(target=_quietly, args=(hook,), name="force-release", daemon=True)
            worker.start()
            worker.join(3.0)
        os._exit(143)

    def left(self) -> float:
        return self.budget_s if self.requested_at is None else self.budget_s - (time.monotonic() - self.requested_at)

    def check(self) -> None:
        if self.requested_at is None:
            return
        if not self._logged:
            self._logged = True
            log.warning("stop requested", signal=self.signal_name, budget_s=self.budget_s)
        raise Interrupted(
            "Stopped by a termination signal after saving progress: start the job again with the same "
            "POGONA_RUN_ID to resume."
        )


def _quietly(hook: Callable[[], None]) -> None:
    with suppress(BaseException):  # best effort on the way out; the exit code says it all
        hook()


class _StopNow(BaseException):
    """Raised by the signal handler inside interruptible(); a BaseException so that library code's
    `except Exception` cannot swallow it."""
