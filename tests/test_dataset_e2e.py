"""Each tool's export, uploaded as it is, trains through `pogona-job run` against SeaweedFS.

Training is tiny (tests/helpers.py's TINY: a from-scratch nano model, 128 px, 2 sanity epochs and 1 more,
export off): these runs check what the data becomes (splits, names, layout, the manifest), not what the model
learns. They run in this process (`run_here`): nothing here is about the console process.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pogona_job.s3 import storage
from pogona_job.tools.locals3 import LocalS3
from tests.conftest import BUCKET, job_env, out_key
from tests.fixtures import exports
from tests.helpers import run_here

pytestmark = pytest.mark.slow


def _body(client: Any, key: str) -> bytes:
    data: bytes = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return data


def _push(s3: LocalS3, folder: Path, name: str) -> str:
    uri = f"s3://{BUCKET}/datasets/export-{name}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3.env.items():
            mp.setenv(key, value)
        storage.push_tree(storage.make_client(), folder, storage.S3Path.parse(uri))
    return uri


def _roboflow(dest: Path) -> dict[str, str | None]:
    return exports.roboflow(dest, {"train": 10, "valid": 4, "test": 4})


def _ultralytics(dest: Path) -> dict[str, str | None]:
    return exports.ultralytics(dest, {"train": 24, "val": 6})


def _label_studio_two_classes(dest: Path) -> dict[str, str | None]:
    return exports.label_studio(dest, 30, names=("Pogona Head", "tail"))


def _cvat_with_a_corrupt_image(dest: Path) -> dict[str, str | None]:
    truth = exports.cvat(dest, {"train": 30})
    (dest / "obj_train_data" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return truth


def _flat(dest: Path) -> dict[str, str | None]:
    return dict.fromkeys(exports.flat_with_groups(dest, singles=28))


RUNS: list[tuple[str, Callable[[Path], dict[str, str | None]], dict[str, str], str, str, list[str], str]] = [
    ("roboflow", _roboflow, {}, "Roboflow export (train/valid/test)", "data.yaml", ["pogona_head"], "export"),
    ("ultralytics", _ultralytics, {}, "Ultralytics (images/train/val)", "data.yaml", ["pogona_head"], "export"),
    (
        "cvat-lenient",
        _cvat_with_a_corrupt_image,
        {"POGONA_VALIDATION_POLICY": "lenient"},
        "CVAT YOLO 1.1 export (train list)",
        "obj.names",
        ["pogona_head"],
        "made by the job",
    ),
    (
        "label-studio-2-classes",
        _label_studio_two_classes,
        {},
        "Label Studio YOLO export (no split)",
        "classes.txt",
        ["Pogona Head", "tail"],
        "made by the job",
    ),
    ("flat", _flat, {}, "plain folders (flat)", "default", ["pogona_head"], "made by the job"),
]


@pytest.mark.parametrize(
    ("name", "build", "extra", "label", "names_source", "names", "split_source"), RUNS, ids=[r[0] for r in RUNS]
)
def test_an_export_uploaded_as_it_is_trains_and_the_manifest_says_how_it_was_read(
    s3: LocalS3,
    s3_client: Any,
    tmp_path: Path,
    name: str,
    build: Callable[[Path], dict[str, str | None]],
    extra: dict[str, str],
    label: str,
    names_source: str,
    names: list[str],
    split_source: str,
) -> None:
    truth = build(tmp_path / name)
    uri = _push(s3, tmp_path / name, name)
    run_id = f"export-{name}"
    env = job_env(s3, tmp_path, POGONA_DATASET_URI=uri, POGONA_RUN_ID=run_id, **extra)
    result = run_here(["run"], env)
    assert result.code == 0, result.stderr[-3000:]

    prefix = out_key(env, run_id) + "/"
    manifest = json.loads(_body(s3_client, prefix + "manifest.json"))
    ds = manifest["dataset"]
    assert (ds["layout_label"], ds["names_source"], ds["class_names"], ds["split_source"]) == (
        label,
        names_source,
        names,
        split_source,
    )
    assert manifest["status"] == "succeeded" and ds["images"] == len(truth)
    assert set(ds["leakage"]) >= {"pairs", "examples", "share", "warn"}
    assert sum(sum(per.values()) for per in ds["modality_sources"].values()) == len(truth)
    lists = {
        split: set(_body(s3_client, f"{prefix}dataset/{split}.txt").decode().splitlines())
        for split in ("train", "val", "test")
        if f"dataset/{split}.txt" in manifest["artifacts"]
    }
    assert set().union(*lists.values()) == set(truth)
    if split_source == "export":
        for split in lists:
            assert lists[split] == {rel for rel, s in truth.items() if s == split}
    if name == "roboflow":  # the user's test images are never trained on, nor used to pick best.pt
        assert not lists["test"] & (lists["train"] | lists["val"]) and len(lists["test"]) == 4
    if name == "cvat-lenient":  # lenient drops are in the manifest, not only in problems.txt
        assert ds["dropped"] == ["obj_train_data/broken.jpg"]
        assert "dataset/problems.txt" in manifest["artifacts"]
    else:
        assert ds["dropped"] == []
    report = _body(s3_client, prefix + "report.md").decode()
    assert label in report and f"from {names_source}" in report
