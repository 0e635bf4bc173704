"""Signals: SIGTERM/SIGINT ask for a stop at the next safe point (see StopFlag)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from pogona_job.errors import Interrupted
from pogona_job.logs import get_logger

log = get_logger()


class StopFlag:
    """SIGTERM/SIGINT ask for a stop at the next safe point; a second signal, or the budget
    running out, exits at once (AWS Batch sends SIGKILL 30 s after SIGTERM).

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
            os._exit(143)
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


class _StopNow(BaseException):
    """Raised by the signal handler inside interruptible(); a BaseException so that library code's
    `except Exception` cannot swallow it."""
