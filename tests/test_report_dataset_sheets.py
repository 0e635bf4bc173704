"""The thumbnails that let a user check the dataset's automatic calls, in-process against SeaweedFS:
a strip per modality inferred from pixels and the near-duplicate pairs land under the run's plots/, the
manifest lists them with their sha256, and report.md links exactly those keys beside the tables."""

from __future__ import annotations

import hashlib
import io
import json
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pogona_job.config import Settings
from pogona_job.dataset import GREY_SENTENCE, StagedDataset, inspect_dataset, stage_dataset
from pogona_job.run import publish
from pogona_job.run.report import render
from pogona_job.run.signals import StopFlag
from pogona_job.run.state import Job, RunRecord
from pogona_job.s3.storage import S3Path
from pogona_job.tools.locals3 import LocalS3
from tests.conftest import BUCKET
from tests.fixtures.realdata import CHEQUE_FIELDS, cheque

NAMES = ["payee", "amount", "signature"]


def _file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def cheques(tmp_path_factory: pytest.TempPathFactory) -> StagedDataset:
    """Cheques on one bank template (alike as whole images, different in the labelled fields) and one
    re-encoded copy of a train cheque in val: a real near-duplicate."""
    root = tmp_path_factory.mktemp("cheques")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for i in range(n):
            cheque(rng).save(_file(root / "images" / split / f"{split}_{i}.jpg"), quality=90)
            _file(root / "labels" / split / f"{split}_{i}.txt").write_text(CHEQUE_FIELDS)
    Image.open(root / "images" / "train" / "train_0.jpg").save(root / "images" / "val" / "copy.jpg", quality=70)
    (root / "labels" / "val" / "copy.txt").write_text(CHEQUE_FIELDS)
    staged = stage_dataset(inspect_dataset(root, NAMES), tmp_path_factory.mktemp("staged"), NAMES)
    assert staged.leakage["pairs"] == 1 and staged.leakage["alike_but_labels_differ"] > 0
    return staged


@pytest.fixture()
def job(s3: LocalS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, s3_client: Any) -> Job:
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    output = f"s3://{BUCKET}/sheets-{secrets.token_hex(4)}"
    settings = Settings(dataset_uri=f"s3://{BUCKET}/datasets/x", output_uri=output, work_dir=tmp_path)
    record = RunRecord(run_id="r", attempt=1, output_uri=output, config={}, model="m", classes=NAMES)
    return Job(settings, "r", 1, s3_client, S3Path.parse(output) / "r", tmp_path, record, StopFlag(25), sums={})


def _body(s3_client: Any, path: S3Path) -> bytes:
    data: bytes = s3_client.get_object(Bucket=path.bucket, Key=path.key)["Body"].read()
    return data


def test_the_sheets_land_under_plots_and_the_report_links_exactly_those(
    job: Job, cheques: StagedDataset, s3_client: Any
) -> None:
    publish.upload_dataset_sheets(job, cheques)
    job.record.dataset = {"images": cheques.images, "counts": cheques.counts, **cheques.summary()}
    job.record.status = "failed"  # any status: the dataset section is the same
    publish.publish(job)

    rec = job.record
    assert rec.leakage_sheets == {
        "examples": "plots/leakage-pairs.png",
        "alike_but_labels_differ_examples": "plots/leakage-alike-labels-differ.png",
    }
    inferred = {r.modality for r in cheques.modality_records if r.source in ("inferred", "unknown")}
    assert set(rec.modality_sheets) == inferred and inferred
    assert rec.modality_sheets == {m: f"plots/modality-{m}.png" for m in inferred}

    manifest = json.loads(_body(s3_client, job.out / "manifest.json"))
    report = _body(s3_client, job.out / "report.md").decode()
    for key in [*rec.modality_sheets.values(), *rec.leakage_sheets.values()]:
        body = _body(s3_client, job.out / key)
        assert manifest["artifacts"][key]["sha256"] == hashlib.sha256(body).hexdigest(), key
        assert f"]({key})" in report, key
        assert report.count(f"]({key})") == 1, key  # with the dataset, not again under Plots
    with Image.open(io.BytesIO(_body(s3_client, job.out / "plots/leakage-pairs.png"))) as im:
        assert im.size == (2 * 96 + 8, 96)  # the one real copy, beside its original
    with Image.open(io.BytesIO(_body(s3_client, job.out / "plots/leakage-alike-labels-differ.png"))) as im:
        shown = min(5, cheques.leakage["alike_but_labels_differ"])
        assert im.size == (2 * 96 + 8, shown * 96)

    leak = cheques.leakage
    assert f"Compared: {leak['compared']}." in report
    assert (
        f"Alike as whole images but different where the labels are: {leak['alike_but_labels_differ']} pairs, "
        "not counted as near-duplicates." in report
    )
    assert (
        "Near-duplicate pairs (1 of 1 shown, one pair a row):\n\n![Near-duplicate pairs](plots/leakage-pairs.png)"
        in (report)
    )
    assert f"Alike, but the labelled regions differ ({shown} of {leak['alike_but_labels_differ']} shown" in report
    page = _body(s3_client, job.out / "report.html").decode()  # the same sheets, embedded in the page
    assert "not available" not in page
    assert page.count("data:image/png;base64,") >= len(rec.modality_sheets) + len(rec.leakage_sheets)


def _record(**dataset: Any) -> RunRecord:
    rec = RunRecord("r1", 1, "s3://b/runs", {}, "yolo11n.yaml", ["head"], status="succeeded")
    rec.dataset = {"layout_label": "plain folders (flat)", "names_source": "default", **dataset}
    return rec


def test_the_grey_sentence_and_the_modality_strips_sit_beside_the_modality_table() -> None:
    sources = {
        "thermal": {"declared": 0, "pattern": 0, "inferred": 6, "unknown": 0},
        "unknown": {"declared": 0, "pattern": 0, "inferred": 0, "unknown": 18},
    }
    rec = _record(modality_sources=sources)
    rec.modality_sheets = {"thermal": "plots/modality-thermal.png", "unknown": "plots/modality-unknown.png"}
    rec.artifacts = ["plots/modality-thermal.png", "plots/modality-unknown.png", "plots/results.png"]
    report = render(rec)
    table = report.index("| unknown | 0 | 0 | 0 | 18 |")
    grey = report.index(GREY_SENTENCE)
    strips = report.index("- **thermal**: ![thermal images](plots/modality-thermal.png)")
    assert table < grey < strips < report.index("- **unknown**: ![unknown images](plots/modality-unknown.png)")
    assert "`dataset/modality.csv`" in report[grey:strips]
    plots = report[report.index("## Plots") :]
    assert "![results.png](plots/results.png)" in plots and "modality-" not in plots  # each picture once


def test_a_dataset_whose_modality_is_all_declared_gets_no_grey_sentence_and_no_strips() -> None:
    declared = {"thermal": {"declared": 10, "pattern": 0, "inferred": 0, "unknown": 0}}
    report = render(_record(modality_sources=declared))
    assert "| thermal | 10 | 0 | 0 | 0 |" in report
    assert GREY_SENTENCE not in report and "modality-" not in report
