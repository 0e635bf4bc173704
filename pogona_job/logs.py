"""structlog set-up: JSON lines for CloudWatch/Loki, readable lines for humans.

Every event carries `run_id` and `phase` (bound as context variables by the job).
Ultralytics' own logger is routed into the same stream so JSON mode stays one object
per line; its progress bars are off unless debugging (they are not line-oriented).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

import structlog

Format = Literal["auto", "json", "console"]
CACHE_LOGGERS = True  # tests turn this off so structlog.testing.capture_logs() sees every event


class _CurrentStderr:
    """Writes to whatever sys.stderr is now (pytest swaps it per test)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_NO_LOCALS = structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False))


def resolve_format(fmt: Format, stream: TextIO = sys.stderr) -> Literal["json", "console"]:
    if fmt == "auto":
        return "console" if stream.isatty() else "json"
    return fmt


def configure(fmt: Format = "auto", *, debug: bool = False, stream: TextIO | None = None) -> str:
    """Configure structlog once per process; returns the resolved format."""
    resolved = resolve_format(fmt, stream or sys.stderr)
    tty = (stream or sys.stderr).isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if resolved == "json"
        else structlog.dev.ConsoleRenderer(
            colors=tty, pad_event_to=28, exception_formatter=structlog.dev.plain_traceback
        )
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # Tracebacks never carry frames' local variables (a client, a URL, a key could sit in one):
            # by construction, not by scrubbing, so POGONA_DEBUG cannot leak credentials.
            _NO_LOCALS if resolved == "json" else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if debug else logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(stream or _CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=CACHE_LOGGERS,
    )
    return resolved


def get_logger(**initial: Any) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(**initial)
    return logger


def bind(**values: Any) -> None:
    """Attach values (run_id, phase, attempt) to every later event."""
    structlog.contextvars.bind_contextvars(**values)


class _ToStructlog(logging.Handler):
    """Forwards stdlib records (ultralytics') as structlog events."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().strip()
        if not message:
            return
        log = get_logger()
        if record.levelno >= logging.ERROR:
            log.error("ultralytics", message=message)
        elif record.levelno >= logging.WARNING:
            log.warning("ultralytics", message=message)
        else:
            log.info("ultralytics", message=message)


class _RetryToStructlog(logging.Handler):
    """botocore's standard retry mode logs each retry at DEBUG; surface them as events."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Retry needed"):
            get_logger().info("storage retry", message=message)


def route_botocore_retries() -> None:
    retries = logging.getLogger("botocore.retries.standard")
    if not any(isinstance(h, _RetryToStructlog) for h in retries.handlers):
        retries.addHandler(_RetryToStructlog())
    retries.setLevel(logging.DEBUG)
    retries.propagate = False


def route_ultralytics(*, debug: bool) -> None:
    """Send ultralytics' logger through structlog; keep warnings, drop chatter unless debugging.

    At WARNING level ultralytics also disables its tqdm bars (they rewrite one line with \\r,
    which would corrupt JSON output).
    """
    ul = logging.getLogger("ultralytics")
    for handler in list(ul.handlers):
        ul.removeHandler(handler)
    ul.addHandler(_ToStructlog())
    ul.setLevel(logging.INFO if debug else logging.WARNING)
    ul.propagate = False
