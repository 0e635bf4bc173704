"""Progress a person reads: one short line per epoch on a console (JSON keeps every field), and
`runs watch` showing the epoch and the ETA the log just printed, not those of 30 s ago."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import structlog

from pogona_job import logs
from pogona_job.config import Settings
from pogona_job.run import livestatus
from pogona_job.run.budget import Tracker
from pogona_job.run.cloud import Instance
from pogona_job.s3.storage import S3Path
from tests.helpers import BUCKET

EPOCH = {
    "epoch": 14,
    "epochs": 40,
    "seconds": 3.38,
    "box_loss": 1.2301,
    "cls_loss": 0.88,
    "dfl_loss": 1.04987,
    "precision": 0.71,
    "recall": 0.64,
    "map50": 0.61234,
    "map50_95": 0.301,
    "images_per_s": 177.5,
    "epoch_seconds": 3.42,
    "eta_s": 136.0,
    "dataloader_share": 0.021,
}


@pytest.fixture
def log_to() -> Iterator[Any]:
    """Configure the job's logging onto a string buffer; the earlier set-up is restored afterwards."""
    saved = structlog.get_config()
    buffer = io.StringIO()

    def configure(fmt: str) -> io.StringIO:
        buffer.seek(0)
        buffer.truncate()
        logs.configure(fmt, stream=buffer)  # type: ignore[arg-type]
        return buffer

    try:
        yield configure
    finally:
        structlog.contextvars.unbind_contextvars("phase")
        structlog.configure(**saved)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0, "0s"), (44.6, "45s"), (136, "2m 16s"), (3600 + 4 * 60 + 59, "1h 04m"), (-3, "0s")],
)
def test_an_eta_reads_as_hours_minutes_seconds(seconds: float | None, text: str) -> None:
    assert logs.eta_text(seconds) == text


def test_a_console_shows_one_short_line_per_epoch(log_to: Any) -> None:
    out = log_to("console")
    logs.bind(phase="full")
    logs.get_logger().info("epoch", **EPOCH)
    line = out.getvalue().strip()
    assert line.endswith("full epoch 14/40  box 1.230 cls 0.880 dfl 1.050  mAP@0.5 0.612  3.4 s/epoch  ETA 2m 16s")
    assert len(line) < 140 and "=" not in line  # timestamp, level, the line; no key=value tail (300 characters)


def test_json_logs_keep_every_field_of_the_epoch(log_to: Any) -> None:
    out = log_to("json")
    logs.bind(phase="full")
    logs.get_logger().info("epoch", **EPOCH)
    event = json.loads(out.getvalue())
    assert {k: event[k] for k in EPOCH} == EPOCH and (event["event"], event["phase"]) == ("epoch", "full")


def test_other_console_events_are_left_as_they_were(log_to: Any) -> None:
    out = log_to("console")
    logs.get_logger().info("evaluation", split="val", epoch=3)
    assert "evaluation" in out.getvalue() and "split=val" in out.getvalue() and "epoch=3" in out.getvalue()


def test_an_epoch_end_writes_progress_json_at_once_with_the_logged_eta(s3_client: Any) -> None:
    """With the periodic writer an hour away, the bucket still shows the epoch that just ended."""
    run = S3Path(BUCKET, "progress-console/run-1")
    tracker = Tracker(s3_client, run, Settings(), Instance(), "cpu", 1, {})
    live = livestatus.LiveStatus(s3_client, run, tracker, "run-1", interval_s=3600).start()
    live.set_phase("full")  # the job's phase (Job.phase sets it), not the callbacks'
    callbacks = live.callbacks("full", 3)
    # What the callbacks read of ultralytics' trainer: two batches of eight images, three epochs.
    trainer = SimpleNamespace(start_epoch=0, train_loader=_Loader(), epoch=0, epochs=3, metrics={})
    callbacks["on_train_start"](trainer)
    for epoch in range(2):
        trainer.epoch = epoch
        trainer.metrics = {"val/box_loss": 1.0, "metrics/mAP50(B)": 0.1 * (epoch + 1)}
        callbacks["on_train_epoch_start"](trainer)
        callbacks["on_train_batch_start"](trainer)
        callbacks["on_train_batch_end"](trainer)
        callbacks["on_fit_epoch_end"](trainer)
        body = s3_client.get_object(Bucket=BUCKET, Key=f"{run.key}/progress.json")["Body"].read()
        written = json.loads(body)
        assert (written["phase"], written["epoch"], written["epochs"]) == ("full", epoch + 1, 3)
        assert written["eta_s"] == trainer.pogona_epoch_fields["eta_s"]  # the figure the epoch's log line prints
        assert written["metrics"]["map50"] == pytest.approx(0.1 * (epoch + 1))
    live.close("succeeded", retryable=False)


class _Loader(list[int]):
    dataset = [0] * 8

    def __init__(self) -> None:
        super().__init__([0, 0])


def test_the_watch_bar_shows_the_jobs_eta_not_its_own_guess() -> None:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=160, force_terminal=False, record=True)
    display = livestatus._RichDisplay(console=console)
    display.show({"state": "running", "run_id": "r1", "phase": "full", "epoch": 14, "epochs": 40, "eta_s": 136})
    display.bar.refresh()
    display.bar.stop()
    text = console.export_text()
    assert "ETA 2m 16s" in text and "14/40" in text and "-:--:--" not in text and "136s" not in text
