"""The whole job end to end: real training (tiny), a real S3 server, the objects users get.

The healthy run is a child process (its stderr must hold nothing but our JSON lines, and the image's
entrypoint must start the job); the refusals and the dataset commands run in this process
(`run_here`: the same `cli.main`, without a child's 10-13 s of imports)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from pogona_job.tools.locals3 import SECRET_KEY, LocalS3
from tests.helpers import BUCKET, ROOT, Result, job_env, out_key, run_cli, run_here
from tests.helpers import body as _body
from tests.helpers import objects as _objects
from tests.helpers import rows as _results

RUN = "e2e-healthy"


@pytest.fixture(scope="module")
def healthy_env(s3: LocalS3, demo_uri: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    # The default export (ONNX, verified with onnxruntime) on: this run is the one that shows the default path.
    return job_env(
        s3,
        tmp_path_factory.mktemp("healthy"),
        POGONA_DATASET_URI=demo_uri,
        POGONA_RUN_ID=RUN,
        POGONA_EXPORT_FORMATS="onnx",
    )


@pytest.fixture(scope="module")
def healthy(healthy_env: dict[str, str]) -> Result:
    """The one healthy run every test here reads (a child process: the console's stderr is under test)."""
    return run_cli(["run"], healthy_env)


@pytest.fixture(scope="module")
def prefix(healthy_env: dict[str, str]) -> str:
    """The healthy run's folder in the bucket, under that job's own output prefix."""
    return out_key(healthy_env, RUN) + "/"


def test_healthy_run_exits_0_and_writes_the_contract_layout(
    healthy: Result, healthy_env: dict[str, str], prefix: str, s3_client: Any
) -> None:
    assert healthy.code == 0, healthy.stderr[-3000:]
    keys = set(_objects(s3_client, prefix))
    expected = {"manifest.json", "report.md", "results.csv", "sanity/results.csv", "weights/best.pt", "weights/last.pt"}
    expected |= {"config.json", "plots/results.png", "plots/BoxPR_curve.png", "plots/confusion_matrix.png"}
    expected |= {"plots/val_batch0_pred.png", "dataset/train.txt", "dataset/val.txt"}
    assert {prefix + k for k in expected} <= keys
    latest = json.loads(_body(s3_client, out_key(healthy_env, "latest.json")))
    assert latest["run_id"] == RUN


def test_manifest_lists_every_artifact_with_matching_checksums(healthy: Result, prefix: str, s3_client: Any) -> None:
    manifest = json.loads(_body(s3_client, prefix + "manifest.json"))
    assert manifest["status"] == "succeeded" and manifest["run_id"] == RUN
    assert {"torch", "ultralytics", "cuda"} <= set(manifest["versions"])
    assert manifest["dataset"]["fingerprint"] and manifest["device"]["device"] == "cpu"
    assert {"pull", "sanity", "full", "push"} <= set(manifest["timings_s"])
    listed = set(manifest["artifacts"])
    assert listed == {k.removeprefix(prefix) for k in _objects(s3_client, prefix)} - {"manifest.json"}
    for key, meta in manifest["artifacts"].items():
        body = _body(s3_client, prefix + key)
        assert (len(body), hashlib.sha256(body).hexdigest()) == (meta["size"], meta["sha256"]), key


def test_results_csv_has_one_row_per_epoch(healthy: Result, prefix: str, s3_client: Any) -> None:
    # One training of POGONA_EPOCHS = 3; the sanity epochs are its first 2 rows, not epochs of their own.
    full = _results(s3_client, prefix + "results.csv")
    assert [int(r["epoch"]) for r in full] == [1, 2, 3]
    assert _results(s3_client, prefix + "sanity/results.csv") == full[:2]


def test_report_final_numbers_equal_results_csv_last_row(healthy: Result, prefix: str, s3_client: Any) -> None:
    report = _body(s3_client, prefix + "report.md").decode()
    last = {k.strip(): float(v) for k, v in _results(s3_client, prefix + "results.csv")[-1].items()}
    full = report[report.index("### Full training") :]
    for label, key in (
        ("mAP@0.5", "metrics/mAP50(B)"),
        ("Recall", "metrics/recall(B)"),
        ("Precision", "metrics/precision(B)"),
        ("mAP@0.5-0.95", "metrics/mAP50-95(B)"),
    ):
        shown = re.search(rf"\*\*{re.escape(label)}\*\*: ([0-9.]+)", full)
        assert shown and float(shown.group(1)) == pytest.approx(last[key], abs=5e-4), label
    row = re.search(r"^\| 3 \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|", full, re.M)
    assert row, full
    assert [float(x) for x in row.groups()] == pytest.approx(
        [last["train/box_loss"], last["train/cls_loss"], last["train/dfl_loss"]], abs=5e-4
    )
    for heading in (
        "## Project Overview",
        "### Sanity check",
        "### Sanity verdict: PASSED",
        "## Analysis",
        "### Full run against the sanity baseline",
        "## Recommendations",
        "## File Locations",
    ):
        assert heading in report
    assert "![results.png](plots/results.png)" in report


def test_healthy_run_passes_every_sanity_criterion_and_reports_the_table(
    healthy: Result, prefix: str, s3_client: Any
) -> None:
    report = _body(s3_client, prefix + "report.md").decode()
    table = report[report.index("| Criterion |") :].split("\n\n")[0]
    # finite, loss trend, no zero box/dfl epoch, mAP, the weights moved, labelled batches seen
    assert table.count("✅ pass") == 6 and "❌" not in table, table
    manifest = json.loads(_body(s3_client, prefix + "manifest.json"))
    assert manifest["verdict"]["passed"] and len(manifest["verdict"]["criteria"]) == 6
    assert re.search(r"^\| Sanity \| cpu \| decreasing .* ✅ WORKING \|$", report, re.M), report


def test_best_pt_loads_and_predicts_on_a_demo_image(
    healthy: Result, prefix: str, s3_client: Any, demo_dir: Path, tmp_path: Path
) -> None:
    from ultralytics import YOLO

    weights = tmp_path / "best.pt"
    weights.write_bytes(_body(s3_client, prefix + "weights/best.pt"))
    image = sorted((demo_dir / "images").glob("*.jpg"))[0]
    (prediction,) = YOLO(str(weights)).predict(str(image), imgsz=128, device="cpu", verbose=False)
    assert prediction.names == {0: "pogona_head"} and prediction.boxes is not None


def test_no_object_and_no_log_line_contains_the_secret(
    healthy: Result, healthy_env: dict[str, str], s3_client: Any
) -> None:
    for key in _objects(s3_client, out_key(healthy_env) + "/"):  # everything the job wrote
        assert SECRET_KEY.encode() not in _body(s3_client, key), key
    assert SECRET_KEY not in healthy.stdout + healthy.stderr


def test_json_logs_carry_run_id_and_phase_and_one_event_per_epoch(healthy: Result) -> None:
    lines = [line for line in healthy.stderr.splitlines() if line.startswith("{")]
    events = [json.loads(line) for line in lines]  # every line parses: ultralytics cannot break it
    assert all(e.get("run_id") == RUN and e.get("phase") for e in events)
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [(e["phase"], e["epoch"]) for e in epochs] == [
        ("sanity", 1),
        ("sanity", 2),
        ("full", 3),
    ]
    assert {"box_loss", "cls_loss", "dfl_loss", "precision", "recall", "map50", "map50_95", "seconds"} <= set(epochs[0])
    stray = [line for line in healthy.stderr.splitlines() if line and not line.startswith("{")]
    assert stray == [], stray


def test_a_finished_run_started_again_through_the_image_entrypoint_exits_0_and_rewrites_nothing(
    healthy: Result, healthy_env: dict[str, str], s3: LocalS3, demo_uri: str, s3_client: Any, tmp_path: Path
) -> None:
    """docker/entrypoint.sh outside a container starts the job (exit 0, its sentence), which finds the run
    already succeeded in the same bucket prefix and rewrites nothing."""
    import subprocess
    import sys

    output = healthy_env["POGONA_OUTPUT_URI"]  # the same bucket prefix: it must find the healthy run there
    everything = out_key(healthy_env) + "/"
    before = {k: (o["ETag"], o["LastModified"]) for k, o in _objects(s3_client, everything).items()}
    env = job_env(s3, tmp_path, POGONA_DATASET_URI=demo_uri, POGONA_RUN_ID=RUN, POGONA_OUTPUT_URI=output)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    proc = subprocess.run(
        ["sh", str(ROOT / "docker" / "entrypoint.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already succeeded" in proc.stderr
    assert {k: (o["ETag"], o["LastModified"]) for k, o in _objects(s3_client, everything).items()} == before


def test_empty_labels_are_caught_before_any_training_with_exit_3(
    s3: LocalS3, s3_client: Any, demo_dir: Path, tmp_path: Path
) -> None:
    """Every label file empty gives the zero-loss signature in training; validation stops it first."""
    for path in sorted(demo_dir.rglob("*")):
        if path.is_file():
            rel = path.relative_to(demo_dir).as_posix()
            body = b"" if path.suffix == ".txt" else path.read_bytes()
            s3_client.put_object(Bucket=BUCKET, Key=f"datasets/no-labels/{rel}", Body=body)
    env = job_env(s3, tmp_path, POGONA_DATASET_URI=f"s3://{BUCKET}/datasets/no-labels", POGONA_RUN_ID="e2e-zeros")
    result = run_here(["run"], env)
    assert result.code == 3, result.stderr[-2000:]
    assert "none of the 48 valid images has a box" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    phases = {json.loads(line).get("phase") for line in result.stderr.splitlines() if line.startswith("{")}
    assert not phases & {"sanity", "full"}
    manifest = json.loads(_body(s3_client, out_key(env, "e2e-zeros", "manifest.json")))
    assert manifest["status"] == "failed" and manifest["exit_code"] == 3
    assert out_key(env, "e2e-zeros", "dataset/problems.txt") in _objects(s3_client, out_key(env, "e2e-zeros") + "/")


def test_wrong_credentials_exit_4_naming_the_bucket(s3: LocalS3, demo_uri: str, tmp_path: Path) -> None:
    env = job_env(s3, tmp_path, POGONA_DATASET_URI=demo_uri, AWS_SECRET_ACCESS_KEY="wrong-secret")
    result = run_here(["run"], env)
    assert result.code == 4
    assert f"The bucket '{BUCKET}' refused access" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_mps_without_the_allow_flag_exits_2_with_the_reason(s3: LocalS3, demo_uri: str, tmp_path: Path) -> None:
    result = run_here(["run"], job_env(s3, tmp_path, POGONA_DATASET_URI=demo_uri, POGONA_DEVICE="mps"))
    assert result.code == 2
    assert "POGONA_DEVICE=mps is refused" in result.stderr and "POGONA_ALLOW_MPS=true" in result.stderr


def test_per_modality_metrics_are_in_the_report_and_the_manifest(healthy: Result, prefix: str, s3_client: Any) -> None:
    manifest = json.loads(_body(s3_client, prefix + "manifest.json"))
    # The demo's grey thermal frames are `unknown` (equal channels are evidence of grey, not of thermal): staged
    # and counted, but no per-modality row claims them.
    counts = manifest["dataset"]["counts"]
    assert {m for split in counts.values() for m in split} == {"thermal", "visible", "unknown"}
    assert counts["val"]["unknown"] > 0
    per = manifest["per_modality"]
    assert set(per) == {"thermal", "visible"}
    for modality, metrics in per.items():
        assert {"images", "precision", "recall", "map50", "map50_95"} <= set(metrics)
        assert metrics["images"] == counts["val"][modality]
    report = _body(s3_client, prefix + "report.md").decode()
    section = report[report.index("### Per-modality validation (best.pt)") :]
    table = section[section.index("| Modality | Images |") :].split("\n\n")[0]
    for modality, metrics in per.items():
        assert re.search(rf"^\| {modality} \| {int(metrics['images'])} \|", table, re.M), table
    assert "| unknown |" not in table
    assert f"{counts['val']['unknown']} val images of `unknown` modality count in the overall figures" in section


def test_modality_csv_and_thumbnails_let_the_user_check_each_call(healthy: Result, prefix: str, s3_client: Any) -> None:
    from collections import Counter

    from PIL import Image

    from pogona_job.dataset import GREY_SENTENCE

    rows = list(csv.DictReader(io.StringIO(_body(s3_client, prefix + "dataset/modality.csv").decode())))
    assert list(rows[0]) == ["path", "modality", "source", "evidence"]
    manifest = json.loads(_body(s3_client, prefix + "manifest.json"))
    counts = manifest["dataset"]["counts"]
    assert Counter(r["modality"] for r in rows) == Counter(
        {m: sum(split.get(m, 0) for split in counts.values()) for m in ("thermal", "visible", "unknown")}
    )
    assert all(r["source"] in ("inferred", "unknown") and r["evidence"] for r in rows)  # nothing declared
    report = _body(s3_client, prefix + "report.md").decode()
    dataset_section = report[report.index("## Project Overview") : report.index("## Training History")]
    assert GREY_SENTENCE in dataset_section
    for modality, n in Counter(r["modality"] for r in rows).items():
        key = f"plots/modality-{modality}.png"
        body = _body(s3_client, prefix + key)
        assert manifest["artifacts"][key]["sha256"] == hashlib.sha256(body).hexdigest()
        with Image.open(io.BytesIO(body)) as sheet:
            assert sheet.size == (96 * min(8, n), 96)  # up to 8 thumbnails of this answer's images
        assert f"- **{modality}**: ![{modality} images]({key})" in dataset_section
        assert report.count(f"]({key})") == 1  # beside the table, not again under Plots
    leak = manifest["dataset"]["leakage"]
    assert f"Compared: {leak['compared']}." in dataset_section
    assert "Alike as whole images but different where the labels are: 0 pairs" in dataset_section
    assert not [k for k in manifest["artifacts"] if k.startswith("plots/leakage-")]  # no pair to show


def test_pretrained_weights_that_cannot_be_downloaded_exit_2_with_what_to_do(
    s3: LocalS3, demo_uri: str, tmp_path: Path
) -> None:
    result = run_here(["run"], job_env(s3, tmp_path, POGONA_DATASET_URI=demo_uri, POGONA_MODEL="yolo11s.pt"))
    assert result.code == 2, result.stderr[-2000:]
    sentence = result.stderr.strip().splitlines()[-1]
    assert "'yolo11s.pt' are not present and could not be downloaded" in sentence
    assert "s3://" in sentence and ".yaml" in sentence and "Traceback" not in result.stderr


def test_dataset_push_then_pull_round_trips_and_a_second_push_uploads_nothing(
    s3: LocalS3, demo_dir: Path, tmp_path: Path
) -> None:
    env = job_env(s3, tmp_path, POGONA_DATASET_URI=f"s3://{BUCKET}/datasets/roundtrip")
    first = run_here(["dataset", "push", str(demo_dir)], env)
    assert first.code == 0 and " 0 unchanged" in first.stdout, first.stdout + first.stderr
    second = run_here(["dataset", "push", str(demo_dir)], env)
    assert second.code == 0 and ": 0 uploaded," in second.stdout, second.stdout
    pulled = run_here(["dataset", "pull", str(tmp_path / "copy")], env)
    assert pulled.code == 0, pulled.stderr

    def digests(root: Path) -> dict[str, str]:
        return {
            p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".pogona")
        }

    assert digests(tmp_path / "copy") == digests(demo_dir)


def test_dataset_validate_lists_problems_with_file_and_line_and_exits_3(tmp_path: Path, demo_dir: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(demo_dir, bad)
    label = sorted((bad / "labels").glob("*.txt"))[0]
    label.write_text(label.read_text() + "3 0.5 0.5 0.1 0.1\n")
    result = run_here(["dataset", "validate", str(bad)], {"PATH": "/usr/bin:/bin"})
    assert result.code == 3
    lines = len(label.read_text().splitlines())
    assert f"labels/{label.name} line {lines}" in result.stdout and "class id 3" in result.stdout
