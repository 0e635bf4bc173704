"""Device policy and the resources the job picks.

Whether torch sees CUDA is forced in each test (`cuda` fixture), so the same assertions hold on a
laptop, in CI and on a GPU machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pogona_job.config import Settings
from pogona_job.errors import ConfigError
from pogona_job.training import resolve_device, resolve_workers, resource_plan


def _meminfo(tmp_path: Path, gib: int) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal: {gib * 2 * 1024**2} kB\nMemAvailable: {gib * 1024**2} kB\n")
    return path


@pytest.fixture()
def cuda(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Set whether torch sees a CUDA GPU; a GPU the container was handed but cannot use is a separate case."""
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)

    def set_cuda(available: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)

    return set_cuda


def test_auto_is_cuda_when_torch_sees_it_else_the_cpu_and_never_mps(cuda) -> None:  # type: ignore[no-untyped-def]
    cuda(False)
    assert resolve_device(Settings(device="auto")) == "cpu"
    cuda(True)
    assert resolve_device(Settings(device="auto")) == "0"


def test_mps_is_refused_unless_allowed(cuda, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import torch

    cuda(False)
    with pytest.raises(ConfigError, match=r"POGONA_DEVICE=mps is refused.*POGONA_ALLOW_MPS=true"):
        resolve_device(Settings(device="mps"))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)  # Linux: allowed, but not there
    with pytest.raises(ConfigError, match=r"needs Apple's MPS backend"):
        resolve_device(Settings(device="mps", allow_mps=True))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)  # a Mac
    assert resolve_device(Settings(device="mps", allow_mps=True)) == "mps"


def test_a_gpu_index_without_cuda_is_a_config_error_and_kept_with_it(cuda) -> None:  # type: ignore[no-untyped-def]
    cuda(False)
    with pytest.raises(ConfigError, match="POGONA_DEVICE=0,1 asks for a CUDA GPU"):
        resolve_device(Settings(device="0,1"))
    cuda(True)
    assert resolve_device(Settings(device="0,1")) == "0,1"


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
