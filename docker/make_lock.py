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

The venv may carry a different torch (the lock never names it): the image's build runs
docker/check_env.py, which checks the job's whole closure (the lock AND the base's
torch/torchvision) and nothing else, and tests/test_infra.py does the same offline from the
installed metadata. The lock is resolved on linux/x86_64 with CPython 3.11, the platform of the
base image.

Hashes: the image installs with `pip install --require-hashes`, so every pin carries the sha256
of the file pip will choose for the base's platform. Download those files from PyPI first and
name the folder with --wheels (WHEELS_FOR_BASE below is the exact command; pip then picks, as it
will in the image, the best wheel for glibc 2.35 / CPython 3.11 / x86_64):

    python3.11 -m pip download --no-deps --only-binary=:all: $(python3.11 docker/make_lock.py --platforms) \
        --python-version 3.11 --implementation cp --abi cp311 -d /tmp/lockwheels -r docker/requirements.lock
    /tmp/lockenv/bin/python docker/make_lock.py --wheels /tmp/lockwheels > docker/requirements.lock
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = "pogona-train"
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# The base image and what it provides (its torch stack); keep in step with the Dockerfile's FROM
# and its build-time assertion (tests/test_infra.py checks that they agree).
BASE_IMAGE = "pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime"
BASE_PYTHON = "3.11"
BASE_CUDA = "12.8"
BASE_PROVIDES = {"torch": "2.9.1", "torchvision": "0.24.1", "triton": "3.5.1"}

# The base is Ubuntu 22.04 (glibc 2.35), x86_64: the manylinux tags pip accepts there, best first.
BASE_GLIBC_MINOR = 35
_LEGACY = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}


def base_platforms() -> list[str]:
    out = []
    for minor in range(BASE_GLIBC_MINOR, 4, -1):
        out.append(f"manylinux_2_{minor}_x86_64")
        if minor in _LEGACY:
            out.append(f"{_LEGACY[minor]}_x86_64")
    return out


def hashes(name: str, version: str, wheels: Path) -> list[str]:
    """sha256 of each downloaded wheel of name==version (pip download picked it for the base)."""
    out = []
    for path in sorted(wheels.glob("*.whl")):
        wheel_name, wheel_version, _, _ = parse_wheel_filename(path.name)
        if canonicalize_name(wheel_name) == canonicalize_name(name) and str(wheel_version) == version:
            out.append(hashlib.sha256(path.read_bytes()).hexdigest())
    if not out:
        raise SystemExit(f"make_lock: no wheel of {name}=={version} in {wheels}")
    return out


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, help="folder of the downloaded wheels to hash (see the docstring)")
    parser.add_argument("--platforms", action="store_true", help="print pip download's --platform options")
    args = parser.parse_args()
    if args.platforms:
        print(" ".join(f"--platform {p}" for p in base_platforms()))
        return 0
    if args.wheels is None:
        parser.error("--wheels DIR is required: the image installs with --require-hashes")
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
    print("# Installed with --no-deps --require-hashes: this file is the whole set; docker/check_env.py verifies")
    print("# the job's closure (this lock plus the base's torch stack) once the job is installed.")
    for key in sorted(dists):
        dist = dists[key]
        name, version = dist.metadata["Name"], dist.version.split("+")[0]
        print(f"{name}=={version} \\")
        print(" \\\n".join(f"    --hash=sha256:{digest}" for digest in hashes(name, version, args.wheels)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
