"""The sanity gate: a broken backend is stopped within batches, a healthy run passes every criterion."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from pogona_job.errors import SanityFailed
from pogona_job.gate import BatchWatchdog, parity_probe, require_parity, verdict

HEALTHY = {"box_loss": 1.4, "cls_loss": 1.3, "dfl_loss": 1.1}
SIGNATURE = {"box_loss": 0.0, "cls_loss": 27.0, "dfl_loss": 0.0}  # MPS: no foreground assigned


def test_watchdog_stops_at_the_first_nan_batch() -> None:
    dog = BatchWatchdog(zero_batches=6)
    dog.check(HEALTHY, boxes_in_batch=8)
    with pytest.raises(SanityFailed, match=r"non-finite loss.*batch 2"):
        dog.check({**HEALTHY, "cls_loss": math.nan}, boxes_in_batch=8)


def test_watchdog_stops_after_k_labelled_batches_with_the_no_foreground_signature() -> None:
    dog = BatchWatchdog(zero_batches=4)
    for _ in range(3):
        dog.check(SIGNATURE, boxes_in_batch=5)
    with pytest.raises(SanityFailed, match=r"no-foreground signature.*batch 4") as err:
        dog.check(SIGNATURE, boxes_in_batch=5)
    assert "MPS" in err.value.sentence and "labels" in err.value.sentence and err.value.exit_code == 5


def test_background_batches_do_not_count_towards_the_signature() -> None:
    dog = BatchWatchdog(zero_batches=2)
    for _ in range(10):
        dog.check(SIGNATURE, boxes_in_batch=0)  # no boxes: zero box loss is expected
    assert dog.tripped is None


def test_a_healthy_batch_resets_the_count() -> None:
    dog = BatchWatchdog(zero_batches=3)
    for losses in (SIGNATURE, SIGNATURE, HEALTHY, SIGNATURE, SIGNATURE):
        dog.check(losses, boxes_in_batch=3)
    assert dog.tripped is None


def test_all_zero_losses_stop_at_once() -> None:
    with pytest.raises(SanityFailed, match="all losses exactly 0 at sanity batch 1"):
        BatchWatchdog().check(dict.fromkeys(HEALTHY, 0.0), boxes_in_batch=3)


def test_parity_probe_rejects_a_device_that_loses_the_foreground() -> None:
    def faulty(device: str) -> dict[str, float]:
        return HEALTHY if device == "cpu" else SIGNATURE

    result = parity_probe(faulty, "mps")
    assert not result.passed and "box_loss is 0 on mps" in result.reason
    with pytest.raises(SanityFailed, match="Refusing device mps"):
        require_parity(result)


def test_parity_probe_rejects_nan_and_drift_and_accepts_agreement() -> None:
    assert not parity_probe(lambda d: HEALTHY if d == "cpu" else {**HEALTHY, "cls_loss": math.nan}, "0").passed
    assert not parity_probe(lambda d: HEALTHY if d == "cpu" else {**HEALTHY, "dfl_loss": 1.5}, "0").passed
    assert parity_probe(lambda d: HEALTHY if d == "cpu" else {**HEALTHY, "dfl_loss": 1.1001}, "0").passed


def test_parity_probe_on_a_real_batch_accepts_an_honest_device_and_rejects_a_faulty_one(tmp_path: Path) -> None:
    """The real loss computation, CPU against "another device" that is also the CPU (honest) or broken."""
    from pogona_job import dataset, training
    from pogona_job.demo import write_demo

    write_demo(tmp_path / "raw", n_images=16, size=96)
    staged = dataset.stage_dataset(
        dataset.inspect_dataset(tmp_path / "raw", ["pogona_head"]), tmp_path / "st", ["pogona_head"]
    )
    compute = training.batch_loss_fn("yolo11n.yaml", staged.data_yaml, imgsz=96)
    honest = parity_probe(lambda d: compute("cpu"), "0")
    assert honest.passed and all(v > 0 for v in honest.cpu.values()), honest

    def broken(device: str) -> dict[str, Any]:
        losses = compute("cpu")
        return losses if device == "cpu" else {**losses, "box_loss": 0.0, "dfl_loss": 0.0}

    assert not parity_probe(broken, "0").passed


def _rows(*totals: tuple[float, float, float], map50: float = 0.0) -> list[dict[str, float]]:
    return [
        {
            "epoch": i + 1,
            "train/box_loss": b,
            "train/cls_loss": c,
            "train/dfl_loss": d,
            "val/box_loss": 1.0,
            "metrics/mAP50(B)": map50,
        }
        for i, (b, c, d) in enumerate(totals)
    ]


def test_verdict_passes_a_from_scratch_run_with_falling_loss_and_zero_map() -> None:
    v = verdict(_rows((4.2, 3.0, 2.3), (4.0, 2.8, 2.2), (3.8, 2.6, 2.1)), min_loss_drop=0.02, min_map50=0.0)
    assert v.passed and [c.passed for c in v.criteria] == [True] * 4


def test_verdict_fails_the_origin_log_mps_run() -> None:
    v = verdict(_rows((0.0, 27.0, 0.0), (0.0, 27.0, 0.0)), min_loss_drop=0.02, min_map50=0.05)
    failed = {c.name for c in v.criteria if not c.passed}
    assert {"no epoch with box_loss = dfl_loss = 0", "mAP@0.5 after the sanity epochs"} <= failed
    assert "not learning" in v.failure_sentence()


def test_verdict_fails_a_flat_loss_and_nan() -> None:
    assert not verdict(_rows((1.0, 1.0, 1.0), (1.0, 1.0, 0.99)), min_loss_drop=0.02, min_map50=0).passed
    assert not verdict(_rows((1.0, 1.0, 1.0), (math.nan, 1.0, 1.0)), min_loss_drop=0.02, min_map50=0).passed
