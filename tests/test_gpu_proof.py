"""The GPU proof script, run the way CI can: `--tiny`, every step on the CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def test_gpu_proof_tiny_runs_the_job_bare_ultralytics_and_the_mps_simulation(tmp_path: Path) -> None:
    out, figures = tmp_path / "B.md", tmp_path / "proof.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POGONA_", "AWS_"))}
    env["PY"] = sys.executable
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_proof.sh"), "--tiny", "--output", str(out), "--json", str(figures)],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(figures.read_text())
    rows = result["rows"]
    assert result["passed"] is True and result["device"] == "CPU (no GPU)"
    job, bare = (float(v) for v in rows["images/s (training steps)"])
    assert job > 0 and bare > 0
    assert float(rows["job / bare"][0]) > 0
    assert rows["GPU utilisation (mean, nvidia-smi)"] == ["n/a", "n/a"]
    assert rows["parity probe on the device"] == ["skipped (CPU)"]
    assert rows["batch (trainers)"] == ["8", "8"] and rows["batch"] == ["8"]  # bare ran the job's batch
    assert rows["AMP (trainers)"] == ["False", "False"] and rows["cache"] == ["off (CPU)"]
    trip = re.fullmatch(
        r"yes: exit 5 after (\d+) batches", rows["MPS signature simulated: gate trips within 20 batches"][0]
    )
    assert trip and 1 <= int(trip.group(1)) <= 20
    assert rows["job status"][0].startswith("succeeded")
    section = out.read_text()
    assert "<!-- BEGIN gpu_proof.py -->" in section and "**CPU (no GPU)**" in section and "proof PASSED" in section
