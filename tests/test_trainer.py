"""Multi-GPU: our callbacks travel with the trainer into ultralytics' DDP workers.

No machine here has two GPUs, so what can run on one CPU runs for real: the DDP script
ultralytics generates (ultralytics/utils/dist.py) is generated from our trainer and run under
`torch.distributed.run` with one process (rank 0), the way the launcher runs each worker.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from pogona_job.config import load_settings
from pogona_job.run import job
from pogona_job.tools.locals3 import LocalS3
from pogona_job.training.gate import BatchWatchdog
from pogona_job.training.trainer import CALLBACKS, RANK_CONTEXT, Hooks, PogonaTrainer, rank_context, trainer_for
from tests.conftest import BUCKET, ROOT, job_env, out_key

EPOCHS, BATCH, K = 2, 8, 3

# What MPS does (tests/test_gate_training.py): the assigner finds no foreground at all. Loaded in the
# worker at interpreter start-up through PYTHONPATH, since the test's monkeypatches stay in this process.
NO_FOREGROUND = textwrap.dedent(
    """
    import torch
    from ultralytics.utils.tal import TaskAlignedAssigner

    _original = TaskAlignedAssigner.forward

    def _forward(self, *args, **kwargs):
        labels, bboxes, scores, fg_mask, gt_idx = _original(self, *args, **kwargs)
        return labels, bboxes, torch.zeros_like(scores), torch.zeros_like(fg_mask), gt_idx

    TaskAlignedAssigner.forward = _forward
    """
)


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from pogona_job.dataset import inspect_dataset, stage_dataset
    from pogona_job.tools.demo import write_demo

    root = tmp_path_factory.mktemp("ddp-data")
    write_demo(root / "raw", n_images=20, size=64, seed=0)
    return stage_dataset(inspect_dataset(root / "raw", ["pogona_head"]), root / "staged", ["pogona_head"])


def _overrides(staged: Any, project: Path) -> dict[str, Any]:
    return {
        "model": "yolo11n.yaml",
        "data": str(staged.data_yaml),
        "epochs": EPOCHS,
        "imgsz": 64,
        "batch": BATCH,
        "device": "cpu",
        "workers": 0,
        "project": str(project),
        "name": "sanity",
        "exist_ok": True,
        "plots": False,
        "val": False,
        "verbose": False,
    }


@pytest.fixture(scope="module")
def ddp_file(staged: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The script ultralytics' launcher would run on every GPU, generated from the job's trainer."""
    from ultralytics.utils.dist import ddp_cleanup, generate_ddp_file
    from ultralytics.utils.torch_utils import unset_deterministic

    project = tmp_path_factory.mktemp("ddp-runs")
    hooks = Hooks(BatchWatchdog(zero_batches=K, phase="sanity"))
    trainer = trainer_for(hooks)(overrides=_overrides(staged, project))
    unset_deterministic()  # the trainer's __init__ turned torch's deterministic mode on; train() would undo it
    path = generate_ddp_file(trainer)
    yield Path(path)
    ddp_cleanup(trainer, path)


def test_the_generated_ddp_file_rebuilds_our_trainer_with_our_callbacks(ddp_file: Path) -> None:
    from ultralytics.utils.patches import torch_load

    state = torch_load(str(ddp_file.with_suffix(".pt")), map_location="cpu")
    assert state["trainer"] is PogonaTrainer  # pickled by reference: the worker imports pogona_job.training.trainer
    for event, callback in CALLBACKS.items():
        assert state["callbacks"][event].count(callback) == 1, event
    assert 'trainer = state["trainer"](cfg=cfg, overrides=state["args"], _callbacks=state["callbacks"])' in (
        ddp_file.read_text()
    )


def _worker(ddp_file: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """One DDP worker (rank 0 of 1) started the way ultralytics' launcher starts them."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "0", str(ddp_file)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_a_ddp_worker_trains_with_the_watchdog_judging_every_batch(ddp_file: Path, staged: Any, tmp_path: Path) -> None:
    state_file = tmp_path / "sanity-watchdog.json"
    hooks = Hooks(BatchWatchdog(zero_batches=K, phase="sanity"), state_file=state_file)
    with rank_context(hooks):
        env = dict(os.environ)
    result = _worker(ddp_file, env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    state = json.loads(state_file.read_text())
    assert state["batches"] == EPOCHS * math.ceil(_train_images(staged) / BATCH)
    assert state["tripped"] is None and len(state["last_batches"]) == min(5, state["batches"])
    assert all(b["box_loss"] > 0 and b["dfl_loss"] > 0 for b in state["last_batches"])


def _train_images(staged: Any) -> int:
    import yaml

    data = yaml.safe_load(staged.data_yaml.read_text())
    train = Path(data["path"]) / data["train"]
    if train.is_file():
        return sum(1 for line in train.read_text().splitlines() if line.strip())
    return sum(1 for p in train.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})


@pytest.fixture()
def broken_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_FOREGROUND)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]))


def test_a_watchdog_tripped_on_rank_0_ends_the_job_with_exit_5(
    s3: LocalS3, demo_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_client: Any, broken_backend: None
) -> None:
    """The whole job, its training launched as DDP (one CPU worker): the worker's watchdog trips, the job exits 5."""
    env = job_env(s3, tmp_path, POGONA_DATASET_URI=demo_uri, POGONA_GATE_ZERO_BATCHES=str(K), POGONA_RUN_ID="ddp")
    for key, value in env.items():
        if key.startswith(("POGONA_", "AWS_")):
            monkeypatch.setenv(key, value)
    original = PogonaTrainer.__init__

    def as_ddp_launcher(self: PogonaTrainer, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.ddp, self.world_size = True, 1  # what "0,1" makes of it on a GPU machine

    monkeypatch.setattr(PogonaTrainer, "__init__", as_ddp_launcher)
    with structlog.testing.capture_logs() as events:
        code = job.run(load_settings())
    assert code == 5, [e for e in events if e.get("log_level") == "error"]
    failed = next(e for e in events if e["event"] == "run failed")
    assert "no-foreground signature" in failed["reason"] and "rank 0" in failed["reason"]
    manifest = json.loads(s3_client.get_object(Bucket=BUCKET, Key=out_key(env, "ddp", "manifest.json"))["Body"].read())
    assert manifest["exit_code"] == 5 and manifest["failed_phase"] == "sanity"
    watchdog = manifest["watchdog"]
    assert K <= watchdog["batches"] <= K + 2 and "no-foreground signature" in watchdog["tripped"]
    assert all(b["box_loss"] == 0.0 and b["dfl_loss"] == 0.0 for b in watchdog["last_batches"][-K:])
    assert not any(e["event"] == "phase started" and e.get("phase") == "full" for e in events)
    assert RANK_CONTEXT not in os.environ
