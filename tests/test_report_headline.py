"""One headline, the shipped best.pt's: checked on real runs against the objects users read.

Two real (tiny) runs, each asserted on from every surface:
- a fine-tune of a small trained detector at a high learning rate, so its later epochs get worse and
  best.pt's epoch is not the last; every headline place (report.md, the run-local summary, the manifest,
  `runs`, `runs show`, the notification) must quote best.pt's evaluation with its epoch;
- a from-scratch model at a learning rate of ~0, which cannot learn in 2 epochs: it must end `failed` at the
  final verdict with exit 5, its weights and report published, latest.json and champion.json untouched.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from pogona_job.config import load_settings
from pogona_job.run import job, notify
from pogona_job.s3.storage import S3Path
from pogona_job.tools import rehearsal, runs
from pogona_job.tools.locals3 import LocalS3
from tests.conftest import BUCKET, job_env, out_key
from tests.ship_models import NAMES, trained_model, two_class_demo


def _body(client: Any, key: str) -> bytes:
    data: bytes = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return data


def _json(client: Any, key: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(_body(client, key))
    return value


def _put(client: Any, key: str, value: dict[str, Any]) -> None:
    client.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(value).encode())


class Ran:
    def __init__(self, code: int, env: dict[str, str], messages: list[notify.Message | None]) -> None:
        self.code, self.env, self.messages = code, env, messages


def _run(env: dict[str, str], mp: pytest.MonkeyPatch) -> Ran:
    """The job in-process (its exit code is run()'s return), the notification captured as composed."""
    for key, value in env.items():
        if key.startswith(("POGONA_", "AWS_")):
            mp.setenv(key, value)
    messages: list[notify.Message | None] = []
    mp.setattr(notify, "send", lambda j: messages.append(notify.compose(j)) or True)
    return Ran(job.run(load_settings()), env, messages)


@pytest.fixture(scope="module")
def two_class_uri(s3: LocalS3, s3_client: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    from pogona_job.s3 import storage

    raw = two_class_demo(tmp_path_factory.mktemp("two-class"))
    uri = f"s3://{BUCKET}/datasets/two-class"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3.env.items():
            mp.setenv(key, value)
        storage.push_tree(storage.make_client(), raw, S3Path.parse(uri))
    return uri


OTHER_TASK = {"run_id": "cats-1", "classes": ["cat", "dog"], "weights": "s3://nowhere/cats/best.pt"}


@pytest.fixture(scope="module")
def finetune(s3: LocalS3, s3_client: Any, two_class_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Ran:
    weights, _raw = trained_model(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("finetune")
    env = job_env(
        s3,
        tmp,
        POGONA_DATASET_URI=two_class_uri,
        POGONA_RUN_ID="finetune",
        POGONA_MODEL=str(weights),
        POGONA_CLASS_NAMES=",".join(NAMES),
        POGONA_EPOCHS="4",
        POGONA_SANITY_EPOCHS="2",
        POGONA_OPTIMIZER="SGD",
        POGONA_LR0="0.05",  # high for a fine-tune: after warm-up (3 epochs) epoch 4 gets worse than an earlier one
        POGONA_GATE_MIN_MAP50="0.001",  # the gate is not under test: its sanity mAP is its evidence of learning
        POGONA_MIN_FINAL_MAP50="0.05",
        POGONA_GATE_MIN_LOSS_DROP="0",
        POGONA_EXPORT_FORMATS="none",
    )
    # Another task's champion under the same prefix: this run must say so, not "could not be evaluated".
    _put(s3_client, out_key(env, "champion.json"), OTHER_TASK)
    with pytest.MonkeyPatch.context() as mp:
        return _run(env, mp)


def test_every_headline_place_quotes_best_pt_with_its_epoch_not_the_last_epoch(
    finetune: Ran, s3_client: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert finetune.code == 0
    env = finetune.env
    manifest = _json(s3_client, out_key(env, "finetune", "manifest.json"))
    head, last = manifest["metrics"], manifest["last_epoch_metrics"]
    val = manifest["evaluation"]["val"]["overall"]
    # The headline is the job's evaluation of best.pt on val, with its interval, not results.csv's last row.
    assert head["map50"] == val["map50"] and head["map50_ci"] == list(val["ci"]["map50"])
    assert head["map50_ci"][0] <= head["map50"] <= head["map50_ci"][1]
    rows = _body(s3_client, out_key(env, "finetune", "results.csv")).decode().splitlines()
    assert len(rows) == 5
    assert head["epoch"] != 4, "precondition: this seed and learning rate must make best.pt an earlier epoch"
    assert head["last_epoch"]["epoch"] == 4 and last["map50"] == head["last_epoch"]["map50"]
    shown = f"{head['map50']:.3f} (95% CI {head['map50_ci'][0]:.2f}-{head['map50_ci'][1]:.2f})"
    epoch = f"epoch {head['epoch']} of 4"

    report = _body(s3_client, out_key(env, "finetune", "report.md")).decode()
    first_screen = report[: report.index("## Project Overview")]
    assert shown in first_screen and epoch in first_screen
    assert "Last epoch (4, not shipped)" in first_screen  # the last epoch only under its own label
    analysis = report[report.index("## Analysis") : report.index("## Recommendations")]
    assert f"best.pt, epoch {head['epoch']}" in analysis
    assert re.search(r"\*\*Last epoch \(4, not the shipped best.pt", report)
    recs = report[report.index("## Recommendations") :]
    assert "mAP@0.5-0.95" in recs.split("## ")[1]

    local = tmp_path / "outputs"
    local.mkdir()
    (local / "manifest.json").write_bytes(_body(s3_client, out_key(env, "finetune", "manifest.json")))
    rehearsal._summary(local)
    summary = capsys.readouterr().out
    assert shown in summary and epoch in summary

    out = S3Path.parse(env["POGONA_OUTPUT_URI"])
    line = next(r for r in runs.table(s3_client, out).splitlines() if r.startswith("finetune"))
    assert f"{head['map50']:.3f}" in line and f"ep {head['epoch']}" in line
    show = runs.show(s3_client, out, "finetune") or ""
    assert shown in show and epoch in show

    message = finetune.messages[-1]
    assert message is not None and shown in message.body and epoch in message.body


def test_a_run_on_another_task_under_the_same_prefix_is_told_so_and_the_champion_stays(
    finetune: Ran, s3_client: Any
) -> None:
    manifest = _json(s3_client, out_key(finetune.env, "finetune", "manifest.json"))
    reason = manifest["promotion"]["reason"]
    assert manifest["promotion"]["decision"] == "keep"
    assert "other classes (cat, dog; this run: pogona_head, other_head)" in reason
    assert "POGONA_OUTPUT_URI" in reason and "POGONA_PROMOTE=always" in reason
    assert _json(s3_client, out_key(finetune.env, "champion.json"))["run_id"] == "cats-1"


def test_the_confusion_matrix_and_the_reported_precision_recall_agree_at_pogona_conf(
    finetune: Ran, s3_client: Any
) -> None:
    manifest = _json(s3_client, out_key(finetune.env, "finetune", "manifest.json"))
    at = manifest["evaluation"]["val"]["at_conf"]
    assert at["conf"] == 0.25 == manifest["metrics"]["conf"]
    assert at["tp"] > 0, "precondition: a model that finds something"
    assert manifest["metrics"]["precision"] == pytest.approx(at["tp"] / (at["tp"] + at["fp"]))
    assert manifest["metrics"]["recall"] == pytest.approx(at["tp"] / (at["tp"] + at["fn"]))
    report = _body(s3_client, out_key(finetune.env, "finetune", "report.md")).decode()
    caption = report[report.index("![confusion_matrix.png]") :].split("\n")[2]
    assert "confidence >= 0.25" in caption
    assert f"{at['tp']} true positives, {at['fp']} false alarms, {at['fn']} misses" in caption
    assert f"precision {manifest['metrics']['precision']:.3f}" in caption
    assert "| ![labels](plots/val_batch0_labels.png) | ![predictions](plots/val_batch0_pred.png) |" in report
    assert "plots/confusion_matrix.png" in manifest["artifacts"]


@pytest.fixture(scope="module")
def cannot_learn(s3: LocalS3, s3_client: Any, demo_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Ran:
    env = job_env(
        s3,
        tmp_path_factory.mktemp("cannot-learn"),
        POGONA_DATASET_URI=demo_uri,
        POGONA_RUN_ID="cannot-learn",
        POGONA_LR0="1e-9",  # the settings refuse 0; this is 0 for 2 epochs
        POGONA_MIN_FINAL_MAP50="0.05",
        POGONA_GATE_MIN_LOSS_DROP="0",
        POGONA_EXPORT_FORMATS="onnx",  # a model that scores 0 has no meaningful export check: the manifest says so
    )
    _put(s3_client, out_key(env, "latest.json"), {"run_id": "earlier", "finished_at": "2026-01-01T00:00:00+00:00"})
    _put(s3_client, out_key(env, "champion.json"), {"run_id": "earlier", "classes": ["pogona_head"]})
    with pytest.MonkeyPatch.context() as mp:
        return _run(env, mp)


def test_a_model_that_cannot_learn_fails_the_final_verdict_with_exit_5_and_moves_no_pointer(
    cannot_learn: Ran, s3_client: Any
) -> None:
    env = cannot_learn.env
    assert cannot_learn.code == 5
    manifest = _json(s3_client, out_key(env, "cannot-learn", "manifest.json"))
    assert manifest["status"] == "failed" and manifest["failed_phase"] == "final verdict"
    assert manifest["exit_code"] == 5
    assert re.match(
        r"Final verdict: best\.pt scored mAP@0\.5 0\.000 on val .* below POGONA_MIN_FINAL_MAP50 0\.05: ",
        manifest["failure"],
    )
    assert "POGONA_LR0 is 1e-09, effectively 0" in manifest["failure"] and "from scratch" in manifest["failure"]
    assert {"weights/best.pt", "report.md", "results.csv", "dataset/val.txt"} <= set(manifest["artifacts"])
    assert _json(s3_client, out_key(env, "latest.json"))["run_id"] == "earlier"
    assert _json(s3_client, out_key(env, "champion.json"))["run_id"] == "earlier"
    report = _body(s3_client, out_key(env, "cannot-learn", "report.md")).decode()
    assert "working" not in report.lower()
    assert "Final verdict: FAILED" in report and manifest["failure"] in report
    assert manifest["export"]["meaningful"] is False and not manifest["export"]["verified"]
    assert "Export check **not meaningful**" in report  # 0 vs 0 proves nothing
    message = cannot_learn.messages[-1]
    assert message is not None and message.state == "final-verdict-failed"
