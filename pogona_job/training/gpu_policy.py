"""Was this process given a GPU? A job that holds one it cannot use must stop, not train on the CPU.

NVIDIA's container toolkit does not check `NVIDIA_REQUIRE_CUDA` in CDI mode
(nvidia-container-toolkit#1470), so on Kubernetes a node whose driver is too old for the
image's CUDA still starts the pod, with the GPU mounted and CUDA unusable. With
`POGONA_DEVICE=auto` that pod would train on the CPU until its deadline.

The evidence, from the environment the platform gives the container:
- `NVIDIA_VISIBLE_DEVICES` naming specific GPUs (indices or UUIDs): a scheduler assigned them
  (the ECS agent on Batch, the NVIDIA device plugin on Kubernetes, `docker run --gpus '"device=0"'`);
- `NVIDIA_VISIBLE_DEVICES=all` together with a GPU device node (`/dev/nvidia0`, ...): the runtime
  mounted GPUs (`docker run --gpus all`). `all` alone proves nothing: the PyTorch base image sets
  it for every container, including `docker run` on a laptop without a GPU;
- `void`, `none` or unset: no GPU was given.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

_NO_GPU = {"", "void", "none"}
_DEVICE_NODE = re.compile(r"nvidia\d+")


def gpu_assignment(env: Mapping[str, str] | None = None, dev: Path = Path("/dev")) -> str | None:
    """Why this process holds a GPU (for the error sentence), or None when it was given none."""
    environ = os.environ if env is None else env
    visible = environ.get("NVIDIA_VISIBLE_DEVICES", "").strip()
    if visible.lower() in _NO_GPU:
        return None
    if visible.lower() != "all":
        return f"NVIDIA_VISIBLE_DEVICES={visible}"
    try:
        nodes = sorted(p.name for p in dev.iterdir() if _DEVICE_NODE.fullmatch(p.name))
    except OSError:
        nodes = []
    return f"NVIDIA_VISIBLE_DEVICES=all and /dev/{nodes[0]}" if nodes else None


def unusable_gpu_sentence(given: str, cuda_build: str | None) -> str:
    """The one sentence for exit 2 when a GPU was given and torch cannot use it."""
    return (
        f"This container was given a GPU ({given}) but torch cannot use CUDA (built for CUDA {cuda_build}): "
        "the host driver is probably too old or the GPU was not mounted; refusing to train on the CPU. "
        "Check `nvidia-smi` on the node, or set POGONA_DEVICE=cpu to train on the CPU deliberately."
    )
