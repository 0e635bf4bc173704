"""Device policy and the resources the job picks (GPU logic checked with its inputs faked: no GPU here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pogona_job.config import Settings
from pogona_job.errors import ConfigError
from pogona_job.training import resolve_device, resolve_workers, resource_plan


def _meminfo(tmp_path: Path, gib: int) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal: {gib * 2 * 1024**2} kB\nMemAvailable: {gib * 1024**2} kB\n")
    return path


def test_auto_is_the_cpu_here_and_never_mps() -> None:
    assert resolve_device(Settings(device="auto")) == "cpu"


def test_mps_is_refused_unless_allowed() -> None:
    with pytest.raises(ConfigError, match=r"POGONA_DEVICE=mps is refused.*POGONA_ALLOW_MPS=true"):
        resolve_device(Settings(device="mps"))
    assert resolve_device(Settings(device="mps", allow_mps=True)) == "mps"


def test_a_gpu_index_without_cuda_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="POGONA_DEVICE=0,1 asks for a CUDA GPU"):
        resolve_device(Settings(device="0,1"))


def test_small_shm_turns_workers_off_with_the_reason(tmp_path: Path) -> None:
    # Mounting a 64 MB tmpfs like Docker's default /dev/shm needs privileges; a path with no space
    # behind it (missing) stands for it, and the root file system for a roomy one.
    workers, reason = resolve_workers(8, "0", shm=tmp_path / "missing")
    assert workers == 0 and "--shm-size" in reason and "--ipc=host" in reason
    workers, reason = resolve_workers(8, "0", shm=Path("/"))
    assert workers == min(8, os.cpu_count() or 1) and "requested 8" in reason
    assert resolve_workers(8, "cpu")[0] == 0


def test_on_a_gpu_amp_is_on_autobatch_fills_it_and_a_small_dataset_is_cached_in_ram(tmp_path: Path) -> None:
    plan = resource_plan(Settings(), "0", images=3000, meminfo=_meminfo(tmp_path, 64))
    assert plan.args == {"amp": True, "batch": -1, "cache": "ram"}
    assert "AutoBatch" in plan.reasons["batch"] and plan.reasons["cache"].startswith("ram (3.4 GiB")


def test_an_explicit_batch_is_kept_and_a_large_dataset_is_cached_on_disk(tmp_path: Path) -> None:
    settings = Settings(batch=32)
    plan = resource_plan(settings, "0", images=3000, meminfo=_meminfo(tmp_path, 4))
    assert plan.args == {"amp": True, "cache": "disk"}
    assert plan.reasons["batch"] == "32 (POGONA_BATCH)"


def test_on_the_cpu_nothing_gpu_specific_is_picked(tmp_path: Path) -> None:
    plan = resource_plan(Settings(), "cpu", images=3000, meminfo=_meminfo(tmp_path, 64))
    assert plan.args == {"amp": False} and plan.reasons["cache"] == "off (CPU)"
