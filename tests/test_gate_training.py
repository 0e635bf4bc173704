"""The gate on real (tiny) training: the MPS signature and NaN are stopped within batches.

The job runs in-process so ultralytics' loss machinery can be broken the way MPS breaks it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import torch

from pogona_job.config import load_settings
from pogona_job.run import job
from pogona_job.tools.locals3 import LocalS3
from tests.conftest import BUCKET, job_env, out_key
from tests.helpers import run_here

K = 4


@pytest.fixture()
def env(s3: LocalS3, demo_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    values = job_env(s3, tmp_path, POGONA_DATASET_URI=demo_uri, POGONA_GATE_ZERO_BATCHES=str(K))
    for key, value in values.items():
        if key.startswith(("POGONA_", "AWS_")):
            monkeypatch.setenv(key, value)
    yield values


def _run(run_id: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, list[dict[str, Any]]]:
    monkeypatch.setenv("POGONA_RUN_ID", run_id)
    with structlog.testing.capture_logs() as events:
        code = job.run(load_settings())
    return code, events


def _no_foreground(monkeypatch: pytest.MonkeyPatch) -> None:
    """What MPS does: the assigner gets NaN/misindexed boxes and assigns no foreground at all."""
    from ultralytics.utils.tal import TaskAlignedAssigner

    original = TaskAlignedAssigner.forward

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        labels, bboxes, scores, fg_mask, gt_idx = original(self, *args, **kwargs)
        return labels, bboxes, torch.zeros_like(scores), torch.zeros_like(fg_mask), gt_idx

    monkeypatch.setattr(TaskAlignedAssigner, "forward", forward)


def test_mps_signature_stops_within_k_batches_and_full_training_never_starts(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, s3_client: Any
) -> None:
    _no_foreground(monkeypatch)
    code, events = _run("gate-signature", monkeypatch)
    assert code == 5
    failed = next(e for e in events if e["event"] == "run failed")
    assert "no-foreground signature" in failed["reason"]
    assert "MPS" not in failed["reason"] and "backend" not in failed["reason"]  # a CPU run: never a backend
    manifest = json.loads(
        s3_client.get_object(Bucket=BUCKET, Key=out_key(env, "gate-signature", "manifest.json"))["Body"].read()
    )
    assert manifest["status"] == "failed" and manifest["exit_code"] == 5
    watchdog = manifest["watchdog"]
    assert watchdog["phase"] == "sanity" and K <= watchdog["batches"] <= K + 2
    # The report shows the batches that tripped it: the last (at most 5), ending in K signature batches.
    last = watchdog["last_batches"]
    assert len(last) == min(5, watchdog["batches"])
    assert all(b["box_loss"] == 0.0 and b["dfl_loss"] == 0.0 and b["cls_loss"] > 0 for b in last[-K:])
    assert not any(e["event"] == "phase started" and e.get("phase") == "full" for e in events)
    report = (
        s3_client.get_object(Bucket=BUCKET, Key=out_key(env, "gate-signature", "report.md"))["Body"].read().decode()
    )
    assert "Batch watchdog stopped the run" in report and "What went wrong" in report
    assert "| Full | cpu | no epoch completed | - | not run |" in report
    leftovers = s3_client.list_objects_v2(Bucket=BUCKET, Prefix=out_key(env, "gate-signature", "checkpoint/")).get(
        "KeyCount"
    )
    assert leftovers == 0, "a run nobody will resume keeps no checkpoint"


def test_nan_loss_stops_at_the_first_nan_batch(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, s3_client: Any
) -> None:
    from ultralytics.utils.loss import v8DetectionLoss

    original = v8DetectionLoss.loss
    calls = {"n": 0}

    def loss(self: Any, preds: Any, batch: Any) -> Any:
        total, items = original(self, preds, batch)
        calls["n"] += 1
        if calls["n"] >= 3:  # healthy for two batches, then the loss explodes
            items = {k: torch.tensor(float("nan")) for k in items}
        return total, items

    monkeypatch.setattr(v8DetectionLoss, "loss", loss)
    code, events = _run("gate-nan", monkeypatch)
    assert code == 5
    failed = next(e for e in events if e["event"] == "run failed")
    assert "non-finite loss" in failed["reason"] and "sanity batch 3" in failed["reason"]


def test_a_freeze_of_every_layer_is_refused_before_training_with_exit_2_and_our_sentence(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer argument freeze=24 (every layer of yolo11n) is a configuration mistake: exit 2 before the first
    batch, naming the argument; never ultralytics' RuntimeError (exit 6) from inside its trainer."""
    from pogona_job import training
    from pogona_job.training import trainer

    original = training.resource_plan

    def plan(*args: Any, **kwargs: Any) -> Any:
        p = original(*args, **kwargs)
        p.args["freeze"] = 24
        return p

    built: list[Any] = []
    monkeypatch.setattr(training, "resource_plan", plan)
    monkeypatch.setattr(trainer.PogonaTrainer, "__init__", lambda *a, **k: built.append(a))
    code, events = _run("gate-frozen", monkeypatch)
    assert code == 2 and not built  # refused before ultralytics' trainer was built
    failed = next(e for e in events if e["event"] == "run failed")
    assert failed["reason"].startswith("The trainer argument freeze=24 freezes every layer of yolo11n.yaml")
    assert "froze the entire model" not in failed["reason"]


HANG = """
import time
from ultralytics.models.yolo.detect import DetectionTrainer
original = DetectionTrainer.preprocess_batch
calls = {"n": 0}
def preprocess_batch(self, batch):
    calls["n"] += 1
    if calls["n"] > 4:  # four healthy batches, then the loader never delivers again
        time.sleep(3600)
    return original(self, batch)
DetectionTrainer.preprocess_batch = preprocess_batch
from pogona_job.cli import main
raise SystemExit(main(["run"]))
"""


def test_a_hung_batch_is_reported_and_exits_75_within_seconds_of_the_stall_limit(
    env: dict[str, str], s3_client: Any, tmp_path: Path
) -> None:
    """A real child process (os._exit from the watchdog thread): the report lands, the exit code is 75."""
    import subprocess
    import sys
    import time

    child = {**env, "POGONA_RUN_ID": "gate-stall", "POGONA_STALL_MIN_S": "8", "POGONA_STALL_FACTOR": "4"}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", HANG], env=child, capture_output=True, text=True, timeout=300, cwd=Path.cwd()
    )
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert "Training made no progress: no sanity batch finished for" in proc.stderr
    manifest = json.loads(
        s3_client.get_object(Bucket=BUCKET, Key=out_key(env, "gate-stall", "manifest.json"))["Body"].read()
    )
    assert manifest["status"] == "failed" and manifest["exit_code"] == 75
    assert "made no progress" in manifest["failure"]
    assert time.monotonic() - started < 120  # not the hour the batch would have slept


def test_full_training_whose_map_stays_zero_stops_after_k_epochs(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, s3_client: Any
) -> None:
    """A from-scratch tiny model scores 0: with K = 2 the training stops 2 epochs after the gate (epoch 2 of 5),
    however many of the sanity epochs also scored 0."""
    monkeypatch.setenv("POGONA_GATE_ZERO_MAP_EPOCHS", "2")
    monkeypatch.setenv("POGONA_EPOCHS", "5")
    code, events = _run("gate-zero-map", monkeypatch)
    assert code == 5
    failed = next(e for e in events if e["event"] == "run failed")
    assert "val mAP@0.5 stayed exactly 0 for 2 full-training epochs (to epoch 4)" in failed["reason"]
    epochs = [e for e in events if e["event"] == "epoch" and e.get("epochs") == 5]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]


def test_the_sanity_epochs_are_the_first_epochs_of_the_one_training(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, s3_client: Any
) -> None:
    """EPOCHS=3, SANITY=2: one model build and one ultralytics training; results.csv has epochs 1..3 and
    sanity/results.csv is its first 2 rows (the same epochs, not repeated); the gate judged at epoch 2."""
    from pogona_job.training import trainer

    assert (env["POGONA_EPOCHS"], env["POGONA_SANITY_EPOCHS"]) == ("3", "2")
    trainers = []
    original_init = trainer.PogonaTrainer.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        trainers.append(self)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(trainer.PogonaTrainer, "__init__", init)
    result = run_here(["run"], {**env, "POGONA_RUN_ID": "gate-once"})  # JSON lines: each carries its phase
    events = result.events()
    assert result.code == 0, result.stderr[-3000:]
    assert len(trainers) == 1 and [e["epochs"] for e in events if e["event"] == "training started"] == [3]

    def rows(key: str) -> list[str]:
        body = s3_client.get_object(Bucket=BUCKET, Key=out_key(env, "gate-once", key))["Body"].read().decode()
        return body.splitlines()

    full, sanity = rows("results.csv"), rows("sanity/results.csv")
    assert [int(float(line.split(",")[0])) for line in full[1:]] == [1, 2, 3]
    assert sanity == full[:3]  # the header and the first two rows, byte for byte
    epochs = [(e["epoch"], e["phase"]) for e in events if e["event"] == "epoch"]
    assert epochs == [(1, "sanity"), (2, "sanity"), (3, "full")]
    phases = [e["phase"] for e in events if e["event"] == "phase started"]
    assert phases[phases.index("sanity") :][:3] == ["sanity", "verdict", "full"]
    names = [e["event"] for e in events]
    assert names.index("sanity criterion") < max(i for i, e in enumerate(events) if e["event"] == "epoch")
