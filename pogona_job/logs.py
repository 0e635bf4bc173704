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

from pogona_job.redact import redact

Format = Literal["auto", "json", "console"]
CACHE_LOGGERS = True  # tests turn this off so structlog.testing.capture_logs() sees every event


class _CurrentStderr:
    """Writes to whatever sys.stderr is now (pytest swaps it per test)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_NO_LOCALS = structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False))


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redacted(v) for v in value)
    return value


def _redact_fields(_logger: Any, _method: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """Every string field masked (URL userinfo, known secrets), whichever library's text it carries."""
    return {k: _redacted(v) for k, v in event.items()}


def _redact_line(_logger: Any, _method: str, line: Any) -> Any:
    """The rendered line masked once more: tracebacks and reprs are rendered only by the renderer."""
    return redact(line) if isinstance(line, str) else line


def eta_text(seconds: float | None) -> str:
    """A remaining time as people read it: '45s', '2m 16s', '1h 04m'; '-' while unknown."""
    if seconds is None:
        return "-"
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _number(event: structlog.typing.EventDict, key: str, fmt: str) -> str | None:
    value = event.get(key)
    return format(value, fmt) if isinstance(value, int | float) else None


def epoch_line(event: structlog.typing.EventDict) -> str:
    """The console's one line per epoch, e.g.
    `full epoch 14/40  box 1.230 cls 0.880 dfl 1.050  mAP@0.5 0.612  3.4 s/epoch  ETA 2m 16s`."""
    losses = " ".join(
        f"{short} {text}"
        for short, key in (("box", "box_loss"), ("cls", "cls_loss"), ("dfl", "dfl_loss"))
        if (text := _number(event, key, ".3f")) is not None
    )
    seconds = event.get("epoch_seconds", event.get("seconds"))
    parts = [
        f"{event.get('phase', '')} epoch {event.get('epoch')}/{event.get('epochs')}".strip(),
        losses,
        f"mAP@0.5 {text}" if (text := _number(event, "map50", ".3f")) is not None else "",
        f"{seconds:.1f} s/epoch" if isinstance(seconds, int | float) else "",
        f"ETA {eta_text(event.get('eta_s'))}" if "eta_s" in event else "",
    ]
    return "  ".join(part for part in parts if part)


_KEPT_ON_CONSOLE = ("timestamp", "level")


def _epoch_console(_logger: Any, _method: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """Console only: an epoch event becomes one short line a person reads; JSON mode keeps every field."""
    if event.get("event") != "epoch" or "epoch" not in event:
        return event
    return {**{k: event[k] for k in _KEPT_ON_CONSOLE if k in event}, "event": epoch_line(event)}


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
            _redact_fields,
            *([] if resolved == "json" else [_epoch_console]),
            renderer,
            _redact_line,  # after the renderer on purpose: it sees the final text
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if debug else logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(stream or _CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=CACHE_LOGGERS,
    )
    root = logging.getLogger()
    if not any(isinstance(h, _LibraryToStructlog) for h in root.handlers):
        root.addHandler(_LibraryToStructlog(logging.WARNING))  # else logging's last resort prints them unmasked
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


class _LibraryToStructlog(logging.Handler):
    """Warnings of any other library (botocore, urllib3, ...) as structlog events: masked, one JSON object a line."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().strip()
        if message:
            log = get_logger()
            (log.error if record.levelno >= logging.ERROR else log.warning)(
                "library", logger=record.name, message=message
            )


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
