"""Lineage: what the manifest records so that a model can be reproduced or audited.

The container image (digest, version, git commit baked in by the Dockerfile), the job's git commit
when run from a checkout, package versions, seed and effective configuration, the dataset
fingerprint and the sha256 of the split lists, and the champion the run was compared against.
"""

from __future__ import annotations

import os
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from pogona_job.run import cloud

PACKAGES = (
    "pogona-train",
    "torch",
    "torchvision",
    "ultralytics",
    "ultralytics-opencv-headless",
    "numpy",
    "onnx",
    "onnxruntime",
    "onnxslim",
    "boto3",
    "pydantic",
    "pydantic-settings",
    "pillow",
    "opencv-python-headless",
)


def git_commit() -> str:
    """IMAGE_VCS_REF baked into the image, else `git rev-parse HEAD` of the checkout this code runs from."""
    ref = os.environ.get("IMAGE_VCS_REF")
    if ref:
        return ref
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def versions() -> dict[str, str]:
    import ultralytics  # its distribution may be ultralytics-opencv-headless: name the code by its module

    found: dict[str, str] = {"ultralytics": str(ultralytics.__version__)}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def collect(
    *,
    config: dict[str, Any],
    seed: int,
    dataset: dict[str, Any],
    split_sha256: dict[str, str],
    champion: str | None,
) -> dict[str, Any]:
    return {
        "image": {
            "digest": cloud.image_digest(),
            "version": os.environ.get("IMAGE_VERSION", "unknown"),
            "vcs_ref": os.environ.get("IMAGE_VCS_REF", "unknown"),
            "build_date": os.environ.get("IMAGE_BUILD_DATE", "unknown"),
        },
        "git_commit": git_commit(),
        "packages": versions(),
        "seed": seed,
        "config": config,
        "dataset": {"uri": dataset.get("uri"), "fingerprint": dataset.get("fingerprint"), "splits": split_sha256},
        "compared_against_champion": champion,
    }
