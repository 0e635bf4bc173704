"""`pogona-job runs compare A B` on two real runs under one output prefix (the second met the first as champion)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import BUCKET, job_env, out_key, run_here


@pytest.fixture(scope="module")
def env(s3: Any, demo_uri: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = job_env(s3, tmp_path_factory.mktemp("compare"), POGONA_DATASET_URI=demo_uri, POGONA_EPOCHS="3")
    for run_id, lr0 in (("cmp-a", "0.001"), ("cmp-b", "0.002")):
        result = run_here(["run"], {**env, "POGONA_RUN_ID": run_id, "POGONA_LR0": lr0})
        assert result.code == 0, result.stderr[-2000:]
    return env


def _manifest(s3_client: Any, env: dict[str, str], run_id: str) -> dict[str, Any]:
    body = s3_client.get_object(Bucket=BUCKET, Key=out_key(env, run_id, "manifest.json"))["Body"].read()
    manifest: dict[str, Any] = json.loads(body)
    return manifest


def test_compare_shows_both_runs_metrics_paired_difference_settings_and_curves(
    env: dict[str, str], s3_client: Any, tmp_path: Path
) -> None:
    plot = tmp_path / "curves.png"
    result = run_here(["runs", "compare", "cmp-a", "cmp-b", "--plot", str(plot)], env)
    assert result.code == 0, result.stderr
    out = result.stdout
    a, b = _manifest(s3_client, env, "cmp-a"), _manifest(s3_client, env, "cmp-b")
    va, vb = a["evaluation"]["val"]["overall"], b["evaluation"]["val"]["overall"]
    line = next(x for x in out.splitlines() if "overall" in x and "mAP@0.5 " in x)
    assert f"A {va['map50']:.3f}" in line and f"B {vb['map50']:.3f}" in line
    assert f"B-A {vb['map50'] - va['map50']:+.3f}" in line
    assert "same fingerprint" in out and "the same (dataset/val.txt identical)" in out
    # B's champion decision evaluated A on the same images: its paired interval is quoted, B - A.
    paired = b["promotion"]["comparison"]["splits"]["val"]["overall"]["map50"]
    assert b["promotion"]["compared_against"] == "cmp-a"
    found = re.search(r"Paired difference B-A on val \((\d+) images, same process\): mAP@0\.5 ([+-]\d\.\d{3})", out)
    assert found and found.group(2) == f"{paired['delta']:+.3f}"
    assert "POGONA_LR0: A 0.001, B 0.002" in out.replace("'", "")
    assert "POGONA_RUN_ID" not in out
    image = Image.open(plot)
    assert image.width > 800 and image.height > 200


def test_compare_with_a_run_that_does_not_exist_exits_2_naming_it(env: dict[str, str]) -> None:
    result = run_here(["runs", "compare", "cmp-a", "ghost"], env)
    assert result.code == 2
    assert "No manifest for run 'ghost'" in result.stderr and "Traceback" not in result.stderr
