"""`pogona-job runs` and `runs show`: where the models stand, read from the bucket."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pogona_job.tools.locals3 import LocalS3
from tests.conftest import BUCKET, job_env, run_cli

PREFIX = "ship-runs-cli"


def _put(client: Any, key: str, value: dict[str, Any]) -> None:
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}", Body=json.dumps(value).encode())


def _manifest(run_id: str, status: str, map50: float, ci: list[float]) -> dict[str, Any]:
    overall = {"precision": 0.9, "recall": 0.8, "map50": map50, "map50_95": 0.5, "ci": {"map50": ci}}
    return {
        "status": status,
        "run_id": run_id,
        "started_at": "2026-01-02T03:00:00+00:00",
        "finished_at": "2026-01-02T04:05:06+00:00",
        "model": "yolo11s.pt",
        "dataset": {"uri": "s3://x/y", "fingerprint": "abc"},
        "evaluation": {
            "val": {
                "images": 40,
                "overall": overall,
                "per_modality": {"thermal": overall | {"images": 20.0, "map50": 0.7, "ci": {"map50": [0.6, 0.8]}}},
            }
        },
        "promotion": {"decision": "keep", "reason": "Not promoted: POGONA_PROMOTE=never."},
        "lineage": {"git_commit": "deadbeef", "image": {"digest": "sha256:1"}, "seed": 7, "dataset": {}},
        "artifacts": {"weights/best.pt": {"sha256": "f" * 64, "size": 123}},
    }


def test_runs_table_and_show(s3: LocalS3, s3_client: Any, tmp_path: Path) -> None:
    _put(s3_client, "r-old/manifest.json", _manifest("r-old", "succeeded", 0.8649, [0.8213, 0.9004]))
    _put(s3_client, "r-new/manifest.json", _manifest("r-new", "failed", 0.5, [0.4, 0.6]))
    _put(s3_client, "r-live/progress.json", {"phase": "full"})
    _put(s3_client, "champion.json", {"run_id": "r-old", "forced": False})
    env = job_env(s3, tmp_path, POGONA_OUTPUT_URI=f"s3://{BUCKET}/{PREFIX}")

    listing = run_cli(["runs"], env, timeout=120)
    assert listing.code == 0, listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert set(rows) == {"r-old", "r-new", "r-live"}
    assert "0.865 (0.82-0.90)" in rows["r-old"] and "succeeded" in rows["r-old"] and "★" in rows["r-old"]
    assert "2026-01-02 04:05:06" in rows["r-old"]
    assert "failed" in rows["r-new"] and "★" not in rows["r-new"]
    assert "in progress" in rows["r-live"]

    shown = run_cli(["runs", "show", "r-old"], env, timeout=120)
    assert shown.code == 0, shown.stderr
    assert "Run r-old: succeeded" in shown.stdout and "current champion" in shown.stdout
    assert "thermal" in shown.stdout and "0.700 (0.60-0.80)" in shown.stdout
    assert "commit deadbeef" in shown.stdout and "weights/best.pt" in shown.stdout

    missing = run_cli(["runs", "show", "nope"], env, timeout=120)
    assert missing.code == 2 and "No manifest for run 'nope'" in missing.stderr and "Traceback" not in missing.stderr
