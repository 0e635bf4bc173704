"""Regenerate docker/requirements.lock: what the image installs on top of its PyTorch base.

The image's base, pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime, already holds torch,
torchvision and triton together with their own dependencies (the CUDA 12.8 / cuDNN 9
`nvidia-*` wheels, sympy, networkx, jinja2, ...), all in /opt/conda. The image keeps that
stack as PyTorch built and tested it, so this lock lists everything ELSE the job needs:

- the runtime closure of the `pogona-train` distribution (no extras, so dev tools stay out),
  walked in the installed metadata of the environment this script runs in, pinned to the
  versions installed there; the walk stops at the packages in BASE_PROVIDES (they are neither
  pinned nor followed, so e.g. the venv's CUDA wheels never reach the lock);
- the build backend from pyproject's [build-system] (setuptools), pinned the same way: the
  image builds the job's wheel with --no-build-isolation, from this lock, without a fetch.

Run it in an environment that holds the job's runtime dependencies and as little else as
possible. The project's venv works (`.venv/bin/python docker/make_lock.py > docker/requirements.lock`
after `make setup`), but its dev extra can hold versions down: mitmproxy caps h11 (<=0.14.0,
which has CVE-2025-43859) and pyparsing. The script names such caps on stderr; when it does,
regenerate from a runtime-only venv instead:

    python3.11 -m venv /tmp/lockenv && /tmp/lockenv/bin/pip install .   # or --no-deps -r the lock
    /tmp/lockenv/bin/python docker/make_lock.py > docker/requirements.lock

The venv may carry a different torch (the lock never names it): the Dockerfile's `pip check`
validates the lock against the base's torch/torchvision, and tests/test_infra.py does the same
offline from the installed metadata. The lock is resolved on linux/x86_64 with CPython 3.11,
the platform of the base image.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = "pogona-train"
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# The base image and what it provides (its torch stack); keep in step with the Dockerfile's FROM
# and its build-time assertion (tests/test_infra.py checks that they agree).
BASE_IMAGE = "pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime"
BASE_PYTHON = "3.11"
BASE_CUDA = "12.8"
BASE_PROVIDES = {"torch": "2.9.1", "torchvision": "0.24.1", "triton": "3.5.1"}

# CUDA libraries must come from the base only. nvidia-ml-py is not one (NVML's Python bindings,
# which ultralytics requires): it is pinned like any other package.
_CUDA_LIBRARY = re.compile(r"^(nvidia-(?!ml-py$)|cuda-)")


def _requirements(dist: metadata.Distribution, extras: frozenset[str]) -> list[Requirement]:
    out = []
    for line in dist.requires or []:
        req = Requirement(line)
        envs = [{"extra": e} for e in sorted(extras)] or [{"extra": ""}]
        if req.marker is None or any(req.marker.evaluate(env) for env in envs):
            out.append(req)
    return out


def closure(root: str = ROOT) -> dict[str, metadata.Distribution]:
    """The installed distributions `root` needs at run time, without the base's own stack."""
    seen: dict[str, tuple[metadata.Distribution, frozenset[str]]] = {}
    todo: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    while todo:
        name, extras = todo.pop()
        if canonicalize_name(name) in BASE_PROVIDES:
            continue
        dist = metadata.distribution(name)
        key = canonicalize_name(dist.metadata["Name"])
        known = seen.get(key, (dist, frozenset()))[1]
        if key in seen and extras <= known:
            continue
        seen[key] = (dist, known | extras)
        todo.extend((r.name, frozenset(r.extras)) for r in _requirements(dist, extras))
    seen.pop(canonicalize_name(root), None)
    return {key: dist for key, (dist, _) in seen.items()}


def build_requirements() -> dict[str, metadata.Distribution]:
    """pyproject's [build-system] requires, as installed here."""
    requires = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["build-system"]["requires"]
    dists = {}
    for line in requires:
        dist = metadata.distribution(Requirement(line).name)
        dists[canonicalize_name(dist.metadata["Name"])] = dist
    return dists


def _upper_bounded_by_others(locked: dict[str, metadata.Distribution]) -> list[str]:
    """Installed packages outside the lock (dev tools) that cap the version of a locked one."""
    notes = []
    for dist in metadata.distributions():
        owner = canonicalize_name(dist.metadata["Name"])
        if owner in locked or owner in BASE_PROVIDES or owner == canonicalize_name(ROOT):
            continue
        for req in _requirements(dist, frozenset()):
            key = canonicalize_name(req.name)
            if key in locked and any(s.operator in {"<", "<=", "==", "~=", "==="} for s in req.specifier):
                notes.append(f"{locked[key].metadata['Name']}=={locked[key].version} is capped by {owner}: {req}")
    return sorted(notes)


def main() -> int:
    dists = {**closure(), **build_requirements()}
    cuda = sorted(key for key in dists if _CUDA_LIBRARY.match(key))
    if cuda:
        print(f"make_lock: {cuda} would shadow the base image's CUDA libraries", file=sys.stderr)
        return 1
    for note in _upper_bounded_by_others(dists):
        print(f"make_lock: note: {note} (dev-only? see the module docstring)", file=sys.stderr)
    provided = " ".join(f"{name}=={version}" for name, version in BASE_PROVIDES.items())
    print(f"# Installed on top of {BASE_IMAGE} (linux/x86_64, CPython {BASE_PYTHON}).")
    print(f"# Provided by the base, NOT listed here: {provided} (CUDA {BASE_CUDA}) and their own dependencies.")
    print("# Runtime closure of pogona-train without that stack, plus the build backend (setuptools).")
    print("# Generated by docker/make_lock.py from a runtime-only venv (see its docstring); do not edit by hand.")
    print("# Installed with --no-deps: this file is the whole set, `pip check` verifies it against the base.")
    for key in sorted(dists):
        dist = dists[key]
        print(f"{dist.metadata['Name']}=={dist.version.split('+')[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
