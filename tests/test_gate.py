"""The sanity gate: a broken backend is stopped within batches, a healthy run passes every criterion."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from pogona_job.errors import ConfigError, SanityFailed
from pogona_job.training.gate import (
    BatchWatchdog,
    Context,
    Criterion,
    StallWatchdog,
    Trend,
    Verdict,
    ZeroMapWatch,
    backend_cause,
    batch_trends,
    frozen_layers,
    parity_probe,
    require_parity,
    require_trainable,
    verdict,
    watchdog_causes,
)

HEALTHY = {"box_loss": 1.4, "cls_loss": 1.3, "dfl_loss": 1.1}
SIGNATURE = {"box_loss": 0.0, "cls_loss": 27.0, "dfl_loss": 0.0}  # MPS: no foreground assigned


def test_watchdog_stops_at_the_first_nan_batch() -> None:
    dog = BatchWatchdog(zero_batches=6)
    dog.check(HEALTHY, boxes_in_batch=8)
    with pytest.raises(SanityFailed, match=r"non-finite loss.*batch 2"):
        dog.check({**HEALTHY, "cls_loss": math.nan}, boxes_in_batch=8)


def test_watchdog_stops_after_k_labelled_batches_with_the_no_foreground_signature() -> None:
    dog = BatchWatchdog(zero_batches=4, context=Context("mps"))
    for _ in range(3):
        dog.check(SIGNATURE, boxes_in_batch=5)
    with pytest.raises(SanityFailed, match=r"no-foreground signature.*batch 4") as err:
        dog.check(SIGNATURE, boxes_in_batch=5)
    assert "MPS" in err.value.sentence and "labelled boxes" in err.value.sentence and err.value.exit_code == 5


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


@pytest.mark.parametrize(
    "losses",
    [
        {"box_loss": 0.0, "cls_loss": 2.0, "dfl_loss": 1.1},  # box alone at 0: a batch of tiny, well-fit boxes
        {"box_loss": 0.9, "cls_loss": 2.0, "dfl_loss": 0.0},  # dfl alone at 0
    ],
    ids=["box-only", "dfl-only"],
)
def test_only_box_and_dfl_both_zero_is_the_signature(losses: dict[str, float]) -> None:
    """The signature needs both localisation losses at 0: one alone is a plausible batch, never a trip."""
    dog = BatchWatchdog(zero_batches=2)
    for _ in range(20):
        dog.check(losses, boxes_in_batch=4)
    assert dog.tripped is None and dog.zero_run == 0 and dog.batches == 20


def test_one_localisation_loss_at_zero_breaks_a_signature_run() -> None:
    dog = BatchWatchdog(zero_batches=3)
    for losses in (SIGNATURE, SIGNATURE, {**SIGNATURE, "dfl_loss": 0.4}, SIGNATURE, SIGNATURE):
        dog.check(losses, boxes_in_batch=3)
    assert dog.tripped is None and dog.zero_run == 2


def test_the_failure_report_keeps_the_last_five_batches_not_the_first() -> None:
    """`recent` feeds the manifest's watchdog.last_batches: bounded, newest last, whatever the run length."""
    dog = BatchWatchdog(zero_batches=1000)
    seen = [{"box_loss": 1.0 + i, "cls_loss": 2.0, "dfl_loss": 1.0} for i in range(500)]
    for losses in seen:
        dog.check(losses, boxes_in_batch=2)
    assert list(dog.recent) == seen[-5:]
    with pytest.raises(SanityFailed):
        dog.check({**HEALTHY, "box_loss": math.inf}, boxes_in_batch=2)
    assert list(dog.recent) == [*seen[-4:], {**HEALTHY, "box_loss": math.inf}]


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
    from pogona_job.tools.demo import write_demo

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


# --- the exact words and numbers the report shows (the verdict table, the failure sentences) ----------


def _row(epoch: int, box: float, cls: float, dfl: float, **extra: float) -> dict[str, float]:
    return {"epoch": epoch, "train/box_loss": box, "train/cls_loss": cls, "train/dfl_loss": dfl, **extra}


def test_the_verdict_table_compares_the_first_epoch_with_the_best_later_one_and_reads_the_last_map() -> None:
    rows = [
        _row(1, 4.0, 3.5, 2.5, **{"val/box_loss": 2.0, "metrics/mAP50(B)": 0.01}),  # total 10
        _row(2, 3.0, 3.0, 2.0, **{"val/box_loss": 1.9, "metrics/mAP50(B)": 0.30}),  # total 8: the best
        _row(3, 3.5, 3.0, 2.5, **{"val/box_loss": 1.8, "metrics/mAP50(B)": 0.12}),  # total 9
    ]
    v = verdict(rows, min_loss_drop=0.02, min_map50=0.05)
    assert v.as_dict() == {
        "passed": True,
        "criteria": [
            {"name": "losses finite", "threshold": "all finite", "observed": "yes", "passed": True},
            {
                "name": "train loss fell (first sanity epoch to the best later one)",
                "threshold": ">= 2%",
                "observed": "20.0% (10 -> 8)",
                "passed": True,
            },
            {"name": "no epoch with box_loss = dfl_loss = 0", "threshold": "none", "observed": "none", "passed": True},
            {"name": "mAP@0.5 after the sanity epochs", "threshold": ">= 0.05", "observed": "0.120", "passed": True},
        ],
    }


def test_no_sanity_epoch_at_all_fails_with_one_criterion() -> None:
    assert verdict([], min_loss_drop=0.02, min_map50=0.0).as_dict() == {
        "passed": False,
        "criteria": [{"name": "epochs completed", "threshold": ">= 1", "observed": "0", "passed": False}],
    }


def test_a_drop_exactly_at_the_threshold_passes_and_two_epochs_are_enough() -> None:
    v = verdict([_row(1, 4.0, 2.0, 2.0), _row(2, 3.0, 1.5, 1.5)], min_loss_drop=0.25, min_map50=0.0)
    assert v.criteria[1].observed == "25.0% (8 -> 6)" and v.criteria[1].passed
    single = verdict([_row(1, 4.0, 2.0, 2.0)], min_loss_drop=0.0, min_map50=0.0)
    assert single.criteria[1].observed == "0.0% (8 -> 8)" and not single.criteria[1].passed


def test_a_small_first_loss_still_counts_and_a_zero_or_infinite_one_gives_no_drop() -> None:
    small = verdict([_row(1, 0.3, 0.3, 0.3), _row(2, 0.2, 0.2, 0.1)], min_loss_drop=0.02, min_map50=0)
    assert small.criteria[1].observed == "44.4% (0.9 -> 0.5)" and small.criteria[1].passed
    zeros = verdict([_row(1, 0.0, 0.0, 0.0), _row(2, 0.0, 0.0, 0.0)], min_loss_drop=0.02, min_map50=0)
    assert zeros.criteria[1].observed == "0.0% (0 -> 0)" and not zeros.criteria[1].passed
    inf = verdict([_row(1, math.inf, 1.0, 1.0), _row(2, 1.0, 1.0, 1.0)], min_loss_drop=0.02, min_map50=0)
    assert inf.criteria[1].observed == "0.0% (inf -> 3)" and not inf.passed
    assert inf.criteria[0].observed == "NaN/inf seen" and not inf.criteria[0].passed


def test_a_nan_validation_loss_is_not_finite_either() -> None:
    rows = [_row(1, 2.0, 2.0, 2.0, **{"val/dfl_loss": 1.0}), _row(2, 1.0, 1.0, 1.0, **{"val/dfl_loss": math.nan})]
    v = verdict(rows, min_loss_drop=0.02, min_map50=0)
    assert (v.criteria[0].observed, v.criteria[0].passed) == ("NaN/inf seen", False)


def test_only_epochs_with_box_and_dfl_both_zero_are_listed() -> None:
    rows = [_row(1, 0.0, 5.0, 0.0), _row(2, 0.0, 4.0, 0.7), _row(3, 0.6, 3.0, 0.0), _row(4, 0.0, 2.0, 0.0)]
    c = verdict(rows, min_loss_drop=0.02, min_map50=0).criteria[2]
    assert (c.observed, c.passed) == ("1, 4", False)


def test_a_results_file_without_map_reads_as_zero() -> None:
    v = verdict([_row(1, 2.0, 2.0, 2.0), _row(2, 1.0, 1.0, 1.0)], min_loss_drop=0.02, min_map50=0.0)
    assert (v.criteria[3].observed, v.criteria[3].passed) == ("0.000", True)


def test_the_failure_sentence_names_each_failed_criterion_with_its_numbers() -> None:
    v = verdict([_row(1, 0.0, 27.0, 0.0), _row(2, 0.0, 27.0, 0.0)], min_loss_drop=0.02, min_map50=0.05)
    assert v.failure_sentence() == (
        "The sanity epochs show the model is not learning (train loss fell (first sanity epoch to the best later "
        "one): observed 0.0% (27 -> 27), needed >= 2%; no epoch with box_loss = dfl_loss = 0: observed 1, 2, "
        "needed none; mAP@0.5 after the sanity epochs: observed 0.000, needed >= 0.05); likely causes: labels that "
        "do not match their images (), or a threshold too strict for this data; or labelled boxes no prediction is "
        "assigned to ()."
    )


def test_the_watchdog_sentences_carry_the_losses_and_the_batch() -> None:
    with pytest.raises(SanityFailed) as nan:
        BatchWatchdog().check({**HEALTHY, "cls_loss": math.nan}, boxes_in_batch=1)
    assert nan.value.sentence == (
        f"The model is not learning: a non-finite loss (box_loss 1.4, cls_loss nan, dfl_loss 1.1) at sanity batch 1; "
        f"{watchdog_causes('nan', Context())}."
    )
    assert "MPS" not in nan.value.sentence and "GPU" not in nan.value.sentence  # on the CPU, never a backend
    dog = BatchWatchdog(zero_batches=2, phase="full")
    dog.check(SIGNATURE, boxes_in_batch=1)  # a single labelled box is a labelled batch
    with pytest.raises(SanityFailed) as sig:
        dog.check({**SIGNATURE, "cls_loss": 0.0123456}, boxes_in_batch=1)
    assert sig.value.sentence == (
        "The model is not learning: box_loss and dfl_loss exactly 0 for 2 consecutive labelled batches "
        "(cls_loss 0.0123) - the no-foreground signature - by full batch 2; "
        f"{watchdog_causes('no-foreground', Context())}."
    )
    assert dog.tripped == sig.value.sentence.removeprefix("The model is not learning: ").split("; likely")[0]


def test_the_probe_names_the_first_disagreeing_loss_with_both_values() -> None:
    cases = [
        ({**HEALTHY, "cls_loss": math.nan}, "0", "cls_loss is nan on 0 but 1.3 on the CPU"),
        (SIGNATURE, "mps", "box_loss is 0 on mps but 1.4 on the CPU"),  # box first: dfl is 0 too
        ({**HEALTHY, "dfl_loss": 1.5, "box_loss": 2.0}, "0", "box_loss is 2 on 0 but 1.4 on the CPU (tolerance 5%)"),
        ({"box_loss": 1.4, "cls_loss": 1.3}, "cuda:1", "dfl_loss is nan on cuda:1 but 1.1 on the CPU"),  # missing
    ]
    for device_losses, device, reason in cases:
        result = parity_probe(lambda d, losses=device_losses: HEALTHY if d == "cpu" else losses, device)
        assert (result.passed, result.reason, result.device) == (False, reason, device)
        assert result.cpu == HEALTHY and result.tolerance == 0.05


def test_the_probe_tolerance_is_relative_with_a_floor_for_tiny_losses() -> None:
    def probe(cpu: dict[str, float], device: dict[str, float], **kw: float) -> bool:
        return parity_probe(lambda d: cpu if d == "cpu" else device, "0", **kw).passed

    assert probe({"box_loss": 1.0}, {"box_loss": 1.049}) and not probe({"box_loss": 1.0}, {"box_loss": 1.051})
    assert probe({"box_loss": 2.0}, {"box_loss": 2.5}, tolerance=0.25)
    assert not probe({"box_loss": 2.0}, {"box_loss": 2.51}, tolerance=0.25)
    # Below 1e-3 the allowed difference stays 5% of 1e-3, not 5% of a vanishing loss.
    assert probe({"box_loss": 1e-4}, {"box_loss": 1.2e-4}) and not probe({"box_loss": 1e-4}, {"box_loss": 1e-3})
    assert probe({"box_loss": 0.0}, {"box_loss": 0.0})


def test_the_probe_runs_the_cpu_then_the_named_device_and_keeps_both_losses() -> None:
    calls: list[str] = []

    def compute(device: str) -> dict[str, float]:
        calls.append(device)
        return HEALTHY if device == "cpu" else {**HEALTHY, "cls_loss": 1.31}

    result = parity_probe(compute, "cuda:1")
    assert calls == ["cpu", "cuda:1"]
    assert (result.passed, result.reason) == (True, "")
    assert result.cpu == HEALTHY and result.accelerator == {**HEALTHY, "cls_loss": 1.31}


# --- the learning criterion on real batch losses ---------------------------------------------------------
# Measured: yolo11n.yaml from scratch, 48 demo images at 64 px, batch 8, AdamW, 3 epochs (15 batches).
# The box and dfl losses RISE while the assigner finds its first foreground; cls falls. With lr0 = 0 the
# batch losses look the same (ultralytics' warm-up still moves the biases): only the weights tell.
WARM_UP = [
    (0.009, 0.6525, 0.0056),
    (0.0002, 0.4822, 0.0001),
    (0.0107, 0.4954, 0.006),
    (0.0312, 0.4033, 0.016),
    (0.1227, 0.3508, 0.0647),
    (0.0127, 0.3935, 0.0074),
    (0.1901, 0.4848, 0.0997),
    (0.0012, 0.3856, 0.0006),
    (0.0022, 0.3864, 0.0011),
    (0.0104, 0.2942, 0.0054),
    (0.0088, 0.3756, 0.0046),
    (0.053, 0.4062, 0.0265),
    (0.0006, 0.3735, 0.0003),
    (0.0688, 0.4023, 0.0358),
    (0.0708, 0.3152, 0.036),
]
BATCHES = [{"box_loss": b, "cls_loss": c, "dfl_loss": d} for b, c, d in WARM_UP]
# Epoch means that rise (the 12.8 -> 14.7): the old criterion stopped such healthy runs.
RISING = [_row(1, 4.0, 5.0, 3.8), _row(2, 4.6, 5.2, 4.3), _row(3, 4.9, 5.3, 4.5)]
SCRATCH_CPU = Context("cpu", from_scratch=True, sanity_epochs=3)


def test_a_from_scratch_warm_up_with_rising_epoch_means_passes_on_the_falling_cls_batches() -> None:
    v = verdict(
        RISING, min_loss_drop=0.02, min_map50=0.0, batches=BATCHES, labelled=15, weight_change=0.01, context=SCRATCH_CPU
    )
    assert v.passed, v.as_dict()
    trend = v.criteria[1]
    assert trend.name == "a loss falls over the sanity batches (median of the last third vs the first third)"
    # A reader can check it: the medians of batches 1-5 and 11-15, per loss.
    assert trend.observed.startswith("box_loss 0.0107 -> 0.053 (+395%), cls_loss 0.4822 -> 0.3756 (-22%)")
    assert trend.observed.endswith("over 15 batches")


def test_lr0_zero_fails_on_weights_that_did_not_move_and_blames_the_learning_rate_not_a_backend() -> None:
    v = verdict(
        RISING, min_loss_drop=0.02, min_map50=0.0, batches=BATCHES, labelled=15, weight_change=0.0, context=SCRATCH_CPU
    )
    failed = [c for c in v.criteria if not c.passed]
    assert [c.name for c in failed] == ["the weights changed during the sanity epochs (relative L2 change)"]
    sentence = v.failure_sentence()
    assert "POGONA_LR0" in sentence and "frozen" in sentence
    assert "MPS" not in sentence and "backend" not in sentence and "SANITY_EPOCHS" not in sentence


def test_weights_not_yet_stepped_by_the_optimizer_are_not_judged_and_the_criterion_says_why() -> None:
    # A small export: fewer sanity batches than ultralytics accumulates for one optimizer step (64/batch), so
    # the trainer measured nothing (None). A healthy run, not "lr0 = 0 or frozen".
    v = verdict(
        RISING, min_loss_drop=0.02, min_map50=0.0, batches=BATCHES, labelled=15, weight_change=None, context=SCRATCH_CPU
    )
    assert v.passed, v.as_dict()
    weights = next(
        c for c in v.criteria if c.name == "the weights changed during the sanity epochs (relative L2 change)"
    )
    assert weights.passed and weights.observed.startswith("not judged: too few sanity batches for an optimizer step")
    # A resumed run saw no sanity batch: nothing to say about the weights at all.
    resumed = verdict(RISING, min_loss_drop=0.02, min_map50=0.0, weight_change=None, context=SCRATCH_CPU)
    assert all("weights" not in c.name for c in resumed.criteria)


def test_from_scratch_the_trend_is_shown_not_judged_because_every_loss_can_rise_in_warm_up() -> None:
    """Measured in the gate replay: a healthy demo run at 96 px, batch medians box 2.32 -> 4.68, cls 2.29 ->
    3.24, dfl 1.31 -> 2.60 over its 12 sanity batches (the assigner hands more anchors larger targets)."""
    rising = [{"box_loss": 2.32 + 0.2 * i, "cls_loss": 2.29 + 0.08 * i, "dfl_loss": 1.31 + 0.11 * i} for i in range(12)]
    v = verdict(
        RISING, min_loss_drop=0.02, min_map50=0.0, batches=rising, labelled=12, weight_change=0.02, context=SCRATCH_CPU
    )
    assert v.passed
    assert v.criteria[1].threshold == "shown, not judged: from scratch all losses can rise in warm-up"
    assert "box_loss 2.62 -> 4.22 (+61%)" in v.criteria[1].observed  # still there for a reader to check


def test_flat_batches_with_pretrained_weights_on_the_cpu_blame_the_labels_never_a_backend() -> None:
    flat = [{"box_loss": 1.0, "cls_loss": 3.0, "dfl_loss": 1.0}] * 12
    v = verdict(RISING, min_loss_drop=0.02, min_map50=0.0, batches=flat, labelled=12, weight_change=0.1)
    assert not v.passed
    sentence = v.failure_sentence()
    assert "labels that do not match their images (12 of 12 sanity batches carried labelled boxes)" in sentence
    assert "MPS" not in sentence and "GPU" not in sentence and "backend" not in sentence
    on_gpu = verdict(RISING, min_loss_drop=0.02, min_map50=0.0, batches=flat, labelled=12, context=Context("0"))
    assert "the GPU backend on device 0 (compare with POGONA_DEVICE=cpu" in on_gpu.failure_sentence()
    on_mps = verdict(RISING, min_loss_drop=0.02, min_map50=0.0, batches=flat, labelled=12, context=Context("mps"))
    assert "Apple's MPS backend" in on_mps.failure_sentence()


def test_a_from_scratch_model_below_a_user_map_threshold_is_told_to_run_more_sanity_epochs() -> None:
    v = verdict(
        RISING,
        min_loss_drop=0.02,
        min_map50=0.05,
        batches=BATCHES,
        labelled=15,
        weight_change=0.01,
        context=SCRATCH_CPU,
    )
    sentence = v.failure_sentence()
    assert "too few sanity epochs for a from-scratch model to score (3; raise POGONA_SANITY_EPOCHS" in sentence
    assert "backend" not in sentence


def test_pretrained_weights_with_flat_losses_pass_on_their_sanity_map() -> None:
    flat = [{"box_loss": 0.5, "cls_loss": 0.4, "dfl_loss": 0.9}] * 12
    rows = [_row(1, 0.5, 0.4, 0.9, **{"metrics/mAP50(B)": 0.8}), _row(2, 0.5, 0.4, 0.9, **{"metrics/mAP50(B)": 0.85})]
    v = verdict(rows, min_loss_drop=0.02, min_map50=0.05, batches=flat, labelled=12, weight_change=0.002)
    assert v.passed and "mAP@0.5 0.850 shows learning" in v.criteria[1].observed


def test_all_background_batches_fail_and_the_sentence_says_what_was_seen() -> None:
    empty = [{"box_loss": 0.0, "cls_loss": 0.5 - i * 0.03, "dfl_loss": 0.0} for i in range(9)]
    rows = [_row(1, 0.0, 0.5, 0.0), _row(2, 0.0, 0.3, 0.0)]
    v = verdict(rows, min_loss_drop=0.02, min_map50=0.0, batches=empty, labelled=0, weight_change=0.05)
    failed = {c.name: c.observed for c in v.criteria if not c.passed}
    assert failed["sanity batches with at least one labelled box"] == "0 of 9"
    assert "labels that ultralytics cannot see (0 of 9 sanity batches carried labelled boxes" in v.failure_sentence()
    assert "backend" not in v.failure_sentence() and "no prediction is assigned" not in v.failure_sentence()


# --- a model with nothing left to train ------------------------------------------------------------------

# yolo11n's parameter names, as `named_parameters()` lists them: layers 0-23, the detection head last, its DFL
# (never trained) inside it. Layers 11-13 (upsample, concat) hold no parameters.
YOLO11N = [f"model.{i}.conv.weight" for i in range(11)] + [f"model.{i}.cv1.conv.weight" for i in range(14, 23)]
YOLO11N += ["model.23.cv2.0.0.conv.weight", "model.23.cv3.0.0.0.conv.weight", "model.23.dfl.conv.weight"]


@pytest.mark.parametrize("freeze", [24, 100, list(range(24)), [*range(23), 23, 99]], ids=["24", "100", "list", "extra"])
def test_a_freeze_that_leaves_nothing_to_train_is_a_configuration_mistake_named_before_training(freeze: object) -> None:
    """Ultralytics refuses it only once its trainer is built (exit 6, its own sentence); we refuse it first."""
    with pytest.raises(ConfigError) as err:
        require_trainable(freeze, YOLO11N, "yolo11n.yaml")
    assert err.value.exit_code == 2
    sentence = err.value.sentence
    assert sentence.startswith(f"The trainer argument freeze={freeze!r} freezes every layer of yolo11n.yaml")
    assert "layers 0-23 hold its 23 parameter tensors" in sentence
    assert "freeze=23 trains the detection head only" in sentence


@pytest.mark.parametrize("freeze", [0, 23, [0, 5], [23], -1, None, "backbone"], ids=str)
def test_a_freeze_that_leaves_a_layer_to_train_is_left_to_the_weights_criterion(freeze: object) -> None:
    require_trainable(freeze, YOLO11N, "yolo11n.yaml")  # no exception: the head (or more) still trains


def test_the_frozen_names_follow_ultralytics_rule_and_the_dfl_is_always_frozen() -> None:
    assert frozen_layers(3) == ["model.0.", "model.1.", "model.2.", ".dfl"]
    assert frozen_layers([4, 10]) == ["model.4.", "model.10.", ".dfl"]
    assert frozen_layers(None) == frozen_layers(0) == frozen_layers(-2) == [".dfl"]
    require_trainable(24, [], "yolo11n.yaml")  # no parameter names known: nothing to judge
    with pytest.raises(ConfigError):  # only the DFL left: frozen by ultralytics whatever freeze says
        require_trainable(1, ["model.0.conv.weight", "model.1.dfl.conv.weight"], "tiny.yaml")


# --- no progress, and a model that stays at zero ---------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_stall_limit_is_a_multiple_of_the_longest_gap_so_far_with_a_floor() -> None:
    from pogona_job.training.gate import StallWatchdog

    clock = _Clock()
    dog = StallWatchdog(factor=10, min_s=30, first_s=600, on_stall=lambda e: None, clock=clock)
    dog.last = clock()
    clock.now += 599
    assert dog.overdue() is None and dog.limit() == 600  # the first batch may take long (model build, scan)
    dog.beat()
    for gap in (1.0, 5.0, 2.0):  # the longest gap so far: 5 s
        clock.now += gap
        dog.beat()
    assert dog.limit() == 50
    clock.now += 50
    assert dog.overdue() is None
    clock.now += 1
    err = dog.overdue()
    assert err is not None and err.exit_code == 75 and err.retryable
    assert err.sentence.startswith(
        "Training made no progress: no full batch finished for 51 s after 4 finished train/val batches whose longest "
        "gap was 5.0 s "
        "(limit 50 s: 10x that, at least 30 s)"
    )
    fast = StallWatchdog(factor=10, min_s=30, first_s=600, on_stall=lambda e: None, clock=clock)
    fast.beat()
    clock.now += 0.1
    fast.beat()
    assert fast.limit() == 30  # 10 x 0.1 s, floored


def test_the_stall_thread_calls_back_once_with_the_sentence() -> None:
    import threading

    from pogona_job.errors import Stalled
    from pogona_job.training.gate import StallWatchdog

    fired: list[Stalled] = []
    done = threading.Event()

    def on_stall(err: Stalled) -> None:
        fired.append(err)
        done.set()

    dog = StallWatchdog(factor=2, min_s=0.2, first_s=0.3, on_stall=on_stall, poll_s=0.05).start()
    assert done.wait(5)
    dog.stop()
    assert len(fired) == 1 and "the first full batch has not finished" in fired[0].sentence


def test_zero_map_stops_after_k_consecutive_zero_epochs_and_a_nonzero_one_resets() -> None:
    from pogona_job.training.gate import ZeroMapWatch

    watch = ZeroMapWatch(3)
    for epoch, map50 in enumerate((0.0, 0.0, 0.01, 0.0, 0.0), start=1):
        watch.check(epoch, map50)
    with pytest.raises(SanityFailed) as err:
        watch.check(6, 0.0)
    assert err.value.exit_code == 5
    assert "val mAP@0.5 stayed exactly 0 for 3 full-training epochs (to epoch 6)" in err.value.sentence
    assert "labels that do not belong to their images" in err.value.sentence
    off = ZeroMapWatch(0)
    for epoch in range(1, 100):
        off.check(epoch, 0.0)


# --- every cause in full: the words a user acts on ------------------------------------------------------
# Spelled out here (not imported from gate.py): a changed word is a changed sentence and should fail a test.

MPS_CAUSE = "Apple's MPS backend (known to train YOLO on zero or NaN losses; use POGONA_DEVICE=cpu or a CUDA GPU)"
GPU0_CAUSE = "the GPU backend on device 0 (compare with POGONA_DEVICE=cpu on the same data)"
HIGH_LR = "a learning rate too high for this model and batch (lower POGONA_LR0)"
AMP = "mixed precision overflowing (AMP)"
PATCHED_LOSS = "a loss function that was replaced or patched"
UNASSIGNED_BOXES = (
    "labelled boxes that reach the loss but that no prediction is assigned to: boxes far smaller than the model's "
    "8-pixel grid at this image size (raise POGONA_IMGSZ) or lying outside their image (check `pogona-job dataset "
    "validate`)"
)
NO_CAUSE = "no likely cause is known for this run"


def test_a_backend_is_named_as_a_cause_only_off_the_cpu_and_the_mps_one_says_what_to_use_instead() -> None:
    assert backend_cause(Context("cpu")) is None
    assert backend_cause(Context("mps")) == MPS_CAUSE
    assert backend_cause(Context("0")) == GPU0_CAUSE
    assert backend_cause(Context("0,1")) == (
        "the GPU backend on device 0,1 (compare with POGONA_DEVICE=cpu on the same data)"
    )


@pytest.mark.parametrize(
    ("kind", "device", "causes"),
    [
        ("nan", "cpu", f"likely causes: {HIGH_LR}"),  # the CPU is the reference: no backend, no AMP
        ("nan", "mps", f"likely causes: {MPS_CAUSE}; or {HIGH_LR}; or {AMP}"),
        ("nan", "0", f"likely causes: {GPU0_CAUSE}; or {HIGH_LR}; or {AMP}"),
        ("zero", "cpu", f"likely causes: {PATCHED_LOSS}"),
        ("zero", "0", f"likely causes: {GPU0_CAUSE}; or {PATCHED_LOSS}"),
        ("no-foreground", "cpu", f"likely causes: {UNASSIGNED_BOXES}"),
        ("no-foreground", "mps", f"likely causes: {MPS_CAUSE}; or {UNASSIGNED_BOXES}"),
    ],
)
def test_each_kind_of_watchdog_trip_names_its_own_likely_causes_in_full(kind: str, device: str, causes: str) -> None:
    assert watchdog_causes(kind, Context(device)) == causes


def test_a_refused_device_names_its_own_backend_as_the_likely_cause() -> None:
    """The refusal's cause is the probed device's backend, whichever device the run's context says."""

    def refusal(device: str) -> str:
        result = parity_probe(lambda d: HEALTHY if d == "cpu" else SIGNATURE, device)
        with pytest.raises(SanityFailed) as err:
            require_parity(result)
        return err.value.sentence

    assert refusal("0") == (
        "Refusing device 0: its training loss disagrees with the CPU's on the same batch (box_loss is 0 on 0 but "
        f"1.4 on the CPU); likely causes: {GPU0_CAUSE}."
    )
    assert refusal("mps").endswith(f"(box_loss is 0 on mps but 1.4 on the CPU); likely causes: {MPS_CAUSE}.")
    require_parity(parity_probe(lambda d: HEALTHY, "0"))  # agreement: no refusal


# --- the batch watchdog's state: what the trip and the verdict read -------------------------------------


@pytest.mark.parametrize(
    ("losses", "boxes", "kind"),
    [
        ({**HEALTHY, "box_loss": math.inf}, 3, "nan"),
        (dict.fromkeys(HEALTHY, 0.0), 3, "zero"),
        (SIGNATURE, 3, "no-foreground"),
    ],
)
def test_a_tripped_watchdog_keeps_the_kind_of_its_trip_and_its_signature(
    losses: dict[str, float], boxes: int, kind: str
) -> None:
    dog = BatchWatchdog(zero_batches=1)
    assert (dog.kind, dog.tripped) == ("", None)
    with pytest.raises(SanityFailed) as err:
        dog.check(losses, boxes_in_batch=boxes)
    assert dog.kind == kind
    assert err.value.sentence == f"The model is not learning: {dog.tripped}; {watchdog_causes(kind, Context())}."


def test_the_zero_trip_names_the_batch_and_the_patched_loss() -> None:
    dog = BatchWatchdog(phase="full", context=Context("0"))
    dog.check(HEALTHY, boxes_in_batch=0)
    with pytest.raises(SanityFailed) as err:
        dog.check(dict.fromkeys(HEALTHY, 0.0), boxes_in_batch=0)
    assert err.value.sentence == (
        f"The model is not learning: all losses exactly 0 at full batch 2; likely causes: {GPU0_CAUSE}; or "
        f"{PATCHED_LOSS}."
    )


def test_the_watchdog_keeps_the_first_sanity_batches_losses_and_counts_those_with_a_labelled_box() -> None:
    """`keep` batches for the verdict (the sanity batches): only the three losses, as floats; a batch with one
    box is labelled, one with none is not; later batches are neither kept nor counted."""
    dog = BatchWatchdog(keep=3)
    sent = [{"box_loss": 1 + i, "cls_loss": 2, "dfl_loss": 3, "lr": 0.01} for i in range(5)]
    for losses, boxes in zip(sent, (0, 1, 5, 7, 9), strict=True):
        dog.check(losses, boxes_in_batch=boxes)
    assert dog.history == [{"box_loss": 1.0 + i, "cls_loss": 2.0, "dfl_loss": 3.0} for i in range(3)]
    assert dog.labelled == 2 and dog.batches == 5
    nothing_kept = BatchWatchdog()
    nothing_kept.check(HEALTHY, boxes_in_batch=4)
    assert (nothing_kept.history, nothing_kept.labelled) == ([], 0)


# --- the stall watchdog: its thread, its stop, its sentence ---------------------------------------------


def _stall_dog(on_stall: Any, **kw: Any) -> StallWatchdog:
    """A watchdog that fires at its first poll (10 ms) unless told otherwise."""
    return StallWatchdog(**{"factor": 2, "min_s": 0.2, "first_s": 0.0, "on_stall": on_stall, "poll_s": 0.01, **kw})


def test_the_stall_callback_runs_on_a_daemon_thread_named_for_it_and_may_stop_its_own_watchdog() -> None:
    """A daemon never keeps the process alive; the name is what a thread dump shows. The job's callback reports
    and stops the watchdog from that very thread: stop() must not try to join the thread it runs on."""
    import threading

    seen: dict[str, Any] = {}
    done = threading.Event()

    def on_stall(err: Any) -> None:
        me = threading.current_thread()
        seen.update(name=me.name, daemon=me.daemon, err=err, fired=dog.fired)
        try:
            dog.stop()
        except Exception as exc:  # reported to the test, not lost in the thread
            seen["stop"] = exc
        done.set()

    dog = _stall_dog(on_stall).start()
    assert done.wait(5)
    dog.stop()
    assert (seen["name"], seen["daemon"], seen.get("stop")) == ("pogona-stall-watchdog", True, None)
    assert seen["fired"] is seen["err"] and dog.fired is seen["err"]  # `fired` is the failure reported


def test_stop_before_start_is_harmless_and_the_watchdog_then_never_fires() -> None:
    fired: list[Any] = []
    dog = _stall_dog(fired.append)
    dog.stop()  # nothing started yet: nothing to join
    dog.start()
    dog.stop()
    assert fired == [] and dog.fired is None


def test_stop_waits_for_the_watchdog_thread_at_most_five_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A callback stuck in C must not hold the job's own exit path for ever: the join is bounded."""
    import threading

    joins: list[float | None] = []

    class Recorded(threading.Thread):
        def join(self, timeout: float | None = None) -> None:
            joins.append(timeout)
            super().join(timeout)

    monkeypatch.setattr(threading, "Thread", Recorded)
    dog = _stall_dog(lambda err: None, first_s=60.0).start()
    dog.stop()
    assert joins == [5] and not dog._thread.is_alive()


def test_the_stall_sentences_say_what_waited_how_long_and_what_to_try() -> None:
    clock = _Clock()
    advice = (
        " - a stalled data loader, a hung multi-GPU collective or a dead worker; the run is stopped and may be "
        "retried (it resumes from its last checkpoint). If the data loader is the cause, try POGONA_WORKERS=0; "
        "raise POGONA_STALL_FACTOR or POGONA_STALL_MIN_S if some batches are legitimately that slow."
    )
    first = _stall_dog(None, clock=clock, phase="sanity", first_s=600)
    first.last = clock()
    clock.now += 601
    err = first.overdue()
    assert err is not None and err.sentence == (
        "Training made no progress: the first sanity batch has not finished after 601 s (limit 600 s)" + advice
    )
    later = _stall_dog(None, clock=clock, factor=2.5, min_s=12.5)
    for gap in (0.0, 20.0, 8.0):
        clock.now += gap
        later.beat()
    clock.now += 51
    err = later.overdue()
    assert err is not None and err.sentence == (
        "Training made no progress: no full batch finished for 51 s after 3 finished train/val batches whose longest "
        "gap was 20.0 s (limit 50 s: 2.5x that, at least 12.5 s)" + advice
    )


# --- the zero-mAP stop ----------------------------------------------------------------------------------

ZERO_MAP_HINT = (
    "labels that do not belong to their images (a shuffled or mismatched export: compare a few label files with "
    "their images), boxes in the wrong coordinate format, or val labels from another dataset"
)


@pytest.mark.parametrize(
    ("from_scratch", "hint"),
    [
        (False, ZERO_MAP_HINT),
        (True, ZERO_MAP_HINT + "; a from-scratch model can also need longer: raise POGONA_GATE_ZERO_MAP_EPOCHS"),
    ],
    ids=["pretrained", "from-scratch"],
)
def test_the_zero_map_stop_names_the_labels_and_tells_a_from_scratch_run_to_wait_longer(
    from_scratch: bool, hint: str
) -> None:
    watch = ZeroMapWatch(2, from_scratch=from_scratch)
    watch.check(4, 0.0)
    with pytest.raises(SanityFailed) as err:
        watch.check(5, 0.0)
    assert err.value.sentence == (
        "The model is not learning: val mAP@0.5 stayed exactly 0 for 2 full-training epochs (to epoch 5) although "
        f"the training loss passed the gate; likely causes: {hint}."
    )


# --- a model with nothing left to train: the refusal in full ---------------------------------------------


def test_the_refusal_names_the_argument_the_layers_and_what_would_train() -> None:
    with pytest.raises(ConfigError) as err:
        require_trainable(24, YOLO11N, "yolo11n.yaml")
    assert err.value.sentence == (
        "The trainer argument freeze=24 freezes every layer of yolo11n.yaml (layers 0-23 hold its 23 parameter "
        "tensors; the DFL is always frozen): nothing is left to train, so the run is refused before training. "
        "Freeze fewer layers (freeze=23 trains the detection head only) or remove the argument."
    )


def test_only_parameters_in_numbered_layers_count_as_layers() -> None:
    """`model.<index>.` is a layer; a name outside the numbered layers is counted as a tensor, not as a layer."""
    with pytest.raises(ConfigError) as err:
        require_trainable(2, ["model.0.conv.weight", "model.1.conv.weight", "model.dfl.conv.weight"], "odd.yaml")
    assert "(layers 0-1 hold its 3 parameter tensors;" in err.value.sentence
    assert "(freeze=1 trains the detection head only)" in err.value.sentence
    # No numbered layer at all (only the always-frozen DFL): the sentence counts from layer 0.
    with pytest.raises(ConfigError) as err:
        require_trainable(3, ["head.dfl.weight"], "dfl-only.yaml")
    assert "(layers 0-0 hold its 1 parameter tensors;" in err.value.sentence
    assert "(freeze=0 trains the detection head only)" in err.value.sentence


# --- batch trends at their edges --------------------------------------------------------------------------


def test_a_batch_trend_compares_the_medians_of_the_first_and_last_third_at_least_one_batch_each() -> None:
    three = [{"box_loss": 3.0}, {"box_loss": 2.0}, {"box_loss": 1.0}]
    assert batch_trends(three) == [Trend("box_loss", 3.0, 1.0)]  # a third of 3 is one batch each side
    six = [{"box_loss": v} for v in (6.0, 4.0, 9.0, 9.0, 2.0, 1.0)]
    assert batch_trends(six) == [Trend("box_loss", 5.0, 1.5)]
    assert batch_trends([{"box_loss": 2.0}, {"box_loss": 1.0}]) == [Trend("box_loss", 2.0, 1.0)]  # 2 is enough
    assert batch_trends([{"box_loss": 2.0}]) == [] and batch_trends([]) == []


def test_a_batch_trend_leaves_out_non_finite_and_missing_values_and_needs_two_finite_ones() -> None:
    batches = [
        {"box_loss": 4.0, "cls_loss": math.nan, "dfl_loss": 1.0},
        {"box_loss": math.inf, "cls_loss": 2.0},
        {"box_loss": 3.0, "cls_loss": math.nan, "dfl_loss": 1.0},
        {"box_loss": 2.0, "cls_loss": 1.0, "dfl_loss": 1.0},
    ]
    # box: 4, 3, 2 (inf left out); cls: 2, 1 (two NaN left out); dfl: 1, 1, 1 (one batch without it)
    assert batch_trends(batches) == [Trend("box_loss", 4.0, 2.0), Trend("cls_loss", 2.0, 1.0), Trend("dfl_loss", 1, 1)]
    one_finite = [{"cls_loss": 1.0}, {"cls_loss": math.nan}, {"cls_loss": -math.inf}]
    assert batch_trends(one_finite) == []


# --- the verdict's criteria at their edges ------------------------------------------------------------------

TREND_NAME = "a loss falls over the sanity batches (median of the last third vs the first third)"
EPOCH_TREND_NAME = "train loss fell (first sanity epoch to the best later one)"
WEIGHTS_NAME = "the weights changed during the sanity epochs (relative L2 change)"
LABELLED_NAME = "sanity batches with at least one labelled box"
FLAT = [{"box_loss": 0.5, "cls_loss": 0.4, "dfl_loss": 0.9}] * 12


def _criterion(v: Verdict, name: str) -> Criterion:
    (found,) = [c for c in v.criteria if c.name == name]
    return found


def test_without_an_epoch_the_verdict_keeps_the_context_and_what_was_seen_and_names_no_cause() -> None:
    gpu = Context("0", from_scratch=True, sanity_epochs=2)
    v = verdict([], min_loss_drop=0.02, min_map50=0.0, batches=[HEALTHY] * 3, labelled=2, context=gpu)
    assert (v.context, v.seen) == (gpu, "2 of 3 sanity batches carried labelled boxes")
    assert v.failure_sentence() == (
        f"The sanity epochs show the model is not learning (epochs completed: observed 0, needed >= 1); {NO_CAUSE}."
    )


def test_a_pretrained_run_whose_batch_loss_fell_by_exactly_the_minimum_passes_and_one_short_of_it_fails() -> None:
    def trend(last_box: float) -> Criterion:
        batches = [{"box_loss": 1.0, "cls_loss": 1.0, "dfl_loss": 1.0}, HEALTHY, {"box_loss": last_box}]
        v = verdict(_rows((1, 1, 1), (1, 1, 1)), min_loss_drop=0.25, min_map50=0.0, batches=batches, labelled=3)
        return _criterion(v, TREND_NAME)  # three batches are enough for a batch trend

    assert trend(0.75) == Criterion(
        TREND_NAME,
        "one loss <= -25%, or mAP@0.5 >= 0",
        "box_loss 1 -> 0.75 (-25%), cls_loss 1 -> 1.3 (+30%), dfl_loss 1 -> 1.1 (+10%) over 3 batches",
        True,
    )
    assert not trend(0.76).passed


def test_two_sanity_batches_are_too_few_for_a_batch_trend_and_the_epoch_means_judge() -> None:
    v = verdict(RISING, min_loss_drop=0.02, min_map50=0.0, batches=BATCHES[:2], labelled=2, weight_change=0.1)
    assert [c.name for c in v.criteria][1] == EPOCH_TREND_NAME and not v.passed


def test_a_sanity_map_exactly_at_the_minimum_shows_learning_where_the_loss_is_flat() -> None:
    rows = [_row(1, 0.5, 0.4, 0.9, **{"metrics/mAP50(B)": 0.05}), _row(2, 0.5, 0.4, 0.9, **{"metrics/mAP50(B)": 0.05})]
    v = verdict(rows, min_loss_drop=0.02, min_map50=0.05, batches=FLAT, labelled=12, weight_change=0.002)
    assert v.passed
    assert _criterion(v, TREND_NAME) == Criterion(
        TREND_NAME,
        "one loss <= -2%, or mAP@0.5 >= 0.05",
        "box_loss 0.5 -> 0.5 (+0%), cls_loss 0.4 -> 0.4 (+0%), dfl_loss 0.9 -> 0.9 (+0%) over 12 batches; "
        "mAP@0.5 0.050 shows learning",
        True,
    )


def test_the_map_is_named_as_evidence_only_where_the_loss_did_not_fall() -> None:
    falling = [{"box_loss": 2.0 - 0.1 * i, "cls_loss": 1.0, "dfl_loss": 1.0} for i in range(6)]
    rows = _rows((1, 1, 1), (1, 1, 1), map50=0.5)
    fell = verdict(rows, min_loss_drop=0.02, min_map50=0.05, batches=falling, labelled=6, weight_change=0.1)
    assert _criterion(fell, TREND_NAME).observed == (
        "box_loss 1.95 -> 1.55 (-21%), cls_loss 1 -> 1 (+0%), dfl_loss 1 -> 1 (+0%) over 6 batches"
    )
    flat = verdict(_rows((1, 1, 1), (1, 1, 1)), min_loss_drop=0.02, min_map50=0.0, batches=FLAT, labelled=12)
    assert _criterion(flat, TREND_NAME).observed == (
        "box_loss 0.5 -> 0.5 (+0%), cls_loss 0.4 -> 0.4 (+0%), dfl_loss 0.9 -> 0.9 (+0%) over 12 batches"
    )


def test_from_scratch_without_batches_the_epoch_trend_is_shown_not_judged() -> None:
    """A resumed from-scratch run: only the epoch means, which can rise in warm-up."""
    v = verdict(RISING, min_loss_drop=0.02, min_map50=0.0, context=SCRATCH_CPU)
    assert v.passed
    assert _criterion(v, EPOCH_TREND_NAME) == Criterion(
        EPOCH_TREND_NAME,
        "shown, not judged: from scratch all losses can rise in warm-up",
        "-10.2% (12.8 -> 14.1)",
        True,
    )


def test_the_weights_criterion_shows_the_measured_change_or_why_it_was_not_judged() -> None:
    def weights(change: float | None) -> Criterion:
        v = verdict(RISING, min_loss_drop=0.02, min_map50=0.0, batches=BATCHES, labelled=15, weight_change=change)
        return _criterion(v, WEIGHTS_NAME)

    assert weights(0.0123456) == Criterion(WEIGHTS_NAME, "> 0", "0.0123", True)
    assert weights(0.0) == Criterion(WEIGHTS_NAME, "> 0", "0", False)
    assert weights(None) == Criterion(
        WEIGHTS_NAME,
        "> 0",
        "not judged: too few sanity batches for an optimizer step with a learning rate (ultralytics accumulates "
        "64/POGONA_BATCH batches a step); more sanity epochs judge it",
        True,
    )


def test_one_labelled_batch_is_enough_and_the_count_needs_the_batches_it_counts() -> None:
    def labelled(n: int | None, batches: list[dict[str, float]]) -> list[Criterion]:
        v = verdict(RISING, min_loss_drop=0.02, min_map50=0.0, batches=batches, labelled=n, context=SCRATCH_CPU)
        return [c for c in v.criteria if c.name == LABELLED_NAME]

    assert labelled(1, BATCHES) == [Criterion(LABELLED_NAME, ">= 1", "1 of 15", True)]
    assert labelled(0, BATCHES) == [Criterion(LABELLED_NAME, ">= 1", "0 of 15", False)]
    assert labelled(None, BATCHES) == []  # the trainer did not count them
    assert labelled(4, []) == []  # a resumed run: no sanity batch seen


# --- which causes a failed verdict names ----------------------------------------------------------------

STILL_WEIGHTS = "a learning rate of 0 (POGONA_LR0) or every layer frozen: the weights did not change"
FALLING = [{"box_loss": 2.0 - 0.1 * i, "cls_loss": 1.0, "dfl_loss": 1.0} for i in range(9)]
EMPTY = [{"box_loss": 0.0, "cls_loss": 0.5 - i * 0.03, "dfl_loss": 0.0} for i in range(9)]  # no labelled box


@pytest.mark.parametrize(
    ("rows", "kwargs", "failed", "causes"),
    [
        pytest.param(
            RISING,
            {"batches": FALLING, "labelled": 9, "weight_change": 0.0, "context": Context("0")},
            [WEIGHTS_NAME],
            f"likely causes: {STILL_WEIGHTS}",
            id="still-weights-on-a-gpu-blame-the-learning-rate-alone",
        ),
        pytest.param(
            RISING,
            {"batches": FLAT, "labelled": 12, "weight_change": 0.0, "context": Context("0")},
            [TREND_NAME, WEIGHTS_NAME],
            f"likely causes: {STILL_WEIGHTS}; or labels that do not match their images (12 of 12 sanity batches "
            "carried labelled boxes), or a threshold too strict for this data",
            id="flat-loss-and-still-weights-on-a-gpu-never-blame-the-backend",
        ),
        pytest.param(
            [_row(1, 0.0, 0.5, 0.0), _row(2, 0.0, 0.5, 0.0)],
            {"batches": EMPTY, "labelled": 0, "weight_change": 0.05, "context": Context("0")},
            ["no epoch with box_loss = dfl_loss = 0", LABELLED_NAME],
            "likely causes: labels that ultralytics cannot see (0 of 9 sanity batches carried labelled boxes; check "
            "`pogona-job dataset validate`)",
            id="no-labelled-box-on-a-gpu-blames-the-labels-not-the-backend",
        ),
        pytest.param(
            RISING,
            {"batches": FALLING, "labelled": 9, "weight_change": 0.0, "context": Context("0", from_scratch=True)},
            [WEIGHTS_NAME],
            f"likely causes: {STILL_WEIGHTS}",
            id="still-weights-from-scratch",
        ),
        pytest.param(
            _rows((1, 1, 1), (1, 1, 1)),
            {"min_map50": 0.05, "batches": FALLING, "labelled": 9, "weight_change": 0.1, "context": SCRATCH_CPU},
            ["mAP@0.5 after the sanity epochs"],
            "likely causes: too few sanity epochs for a from-scratch model to score (3; raise POGONA_SANITY_EPOCHS, "
            "lower POGONA_GATE_MIN_MAP50, or start from pretrained weights)",
            id="from-scratch-below-the-map-minimum-on-the-cpu",
        ),
        pytest.param(
            _rows((1, 1, 1), (1, 1, 1)),
            {"min_map50": 0.05, "batches": FALLING, "labelled": 9, "weight_change": 0.1, "context": Context("mps")},
            ["mAP@0.5 after the sanity epochs"],
            f"likely causes: {MPS_CAUSE}; or labels that do not match their images (9 of 9 sanity batches carried "
            "labelled boxes), or a threshold too strict for this data",
            id="pretrained-below-the-map-minimum-on-mps",
        ),
        pytest.param(
            [_row(1, 0.0, 27.0, 0.0), _row(2, 0.0, 26.0, 0.0)],
            {"batches": FALLING, "labelled": 9, "weight_change": 0.1, "context": Context("mps", from_scratch=True)},
            ["no epoch with box_loss = dfl_loss = 0"],
            f"likely causes: {MPS_CAUSE}",
            id="zero-epochs-on-mps-from-scratch-blame-the-backend",
        ),
        pytest.param(
            [_row(1, 0.0, 27.0, 0.0), _row(2, 0.0, 26.0, 0.0)],
            {"batches": FALLING, "labelled": 9, "weight_change": 0.1, "context": Context("cpu", from_scratch=True)},
            ["no epoch with box_loss = dfl_loss = 0"],
            "likely causes: labelled boxes no prediction is assigned to (9 of 9 sanity batches carried labelled boxes)",
            id="zero-epochs-on-the-cpu-blame-the-boxes",
        ),
    ],
)
def test_a_failed_verdict_names_the_causes_that_fit_its_failed_criteria(
    rows: list[dict[str, float]], kwargs: dict[str, Any], failed: list[str], causes: str
) -> None:
    v = verdict(rows, **{"min_loss_drop": 0.02, "min_map50": 0.0, **kwargs})
    assert [c.name for c in v.criteria if not c.passed] == failed
    assert v.failure_sentence().endswith(f"); {causes}.")
