"""A job given a GPU it cannot use fails fast with exit 2; it never trains on the CPU (issue #15 item 2).

CUDA is made unusable on purpose in each test (torch's own check patched; the whole job runs in this
process), so the tests mean the same on a GPU machine.
The GPU "assignment" is the environment a platform gives the container, and a fake /dev.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pogona_job.config import Settings
from pogona_job.errors import ConfigError
from pogona_job.training import gpu_policy, resolve_device
from tests.helpers import job_env, run_here

UUID = "GPU-3f2a6c1e-9b7d-4c1a-8e55-0d2b6f7a9c10"


def _dev(tmp_path: Path, *nodes: str) -> Path:
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in nodes:
        (dev / name).touch()
    return dev


@pytest.mark.parametrize(
    ("visible", "nodes", "given"),
    [
        (None, ("nvidia0", "nvidiactl"), False),  # no variable: nothing was assigned
        ("void", ("nvidia0",), False),  # the toolkit's "no GPU" values
        ("none", ("nvidia0",), False),
        ("", ("nvidia0",), False),
        ("all", (), False),  # the PyTorch base image's own default, on a machine without GPUs
        ("all", ("nvidiactl", "nvidia-uvm"), False),  # control nodes only: no GPU device
        ("all", ("nvidia0", "nvidiactl"), True),  # docker run --gpus all: a device node is mounted
        (UUID, (), True),  # the ECS agent / the k8s device plugin name the GPU they assigned
        ("0", (), True),  # docker run --gpus '"device=0"'
    ],
)
def test_gpu_assignment_reads_what_the_platform_gave(
    tmp_path: Path, visible: str | None, nodes: tuple[str, ...], given: bool
) -> None:
    env = {} if visible is None else {"NVIDIA_VISIBLE_DEVICES": visible}
    reason = gpu_policy.gpu_assignment(env, dev=_dev(tmp_path, *nodes))
    assert (reason is not None) is given
    if given:
        assert f"NVIDIA_VISIBLE_DEVICES={visible}" in str(reason)


@pytest.fixture
def cuda_unusable(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.usefixtures("cuda_unusable")
@pytest.mark.parametrize("device", ["auto", "0"])
def test_a_gpu_that_cannot_be_used_is_a_config_error(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", UUID)
    with pytest.raises(ConfigError, match=r"given a GPU \(NVIDIA_VISIBLE_DEVICES=GPU-.*refusing to train on the CPU"):
        resolve_device(Settings(device=device))


@pytest.mark.usefixtures("cuda_unusable")
def test_without_a_gpu_auto_is_the_cpu_and_cpu_stays_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    assert resolve_device(Settings(device="auto")) == "cpu"
    # A GPU given but the CPU chosen on purpose: the user asked for it.
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", UUID)
    assert resolve_device(Settings(device="cpu")) == "cpu"


@pytest.mark.usefixtures("cuda_unusable")
def test_the_job_exits_2_with_one_sentence_when_its_gpu_is_unusable(
    s3,
    demo_uri: str,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    """The whole job, as Batch or Kubernetes start it: a GPU assigned, CUDA unusable, POGONA_DEVICE=auto."""
    env = job_env(
        s3,
        tmp_path,
        POGONA_DATASET_URI=demo_uri,
        POGONA_RUN_ID="device-policy-unusable-gpu",
        POGONA_DEVICE="auto",
        NVIDIA_VISIBLE_DEVICES=UUID,
    )
    result = run_here(["run"], env)
    assert result.code == 2, result.stderr[-2000:]
    assert "refusing to train on the CPU" in result.stderr and UUID in result.stderr
    assert "Traceback" not in result.stderr
    # Nothing trained: no epoch was logged before the refusal.
    events = [json.loads(line) for line in result.stdout.splitlines() + result.stderr.splitlines() if line[:1] == "{"]
    assert not any(e.get("event") == "epoch" for e in events)
