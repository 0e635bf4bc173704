"""Build-time check of the image: every requirement of the job's closure is installed and satisfied.

    python docker/check_env.py pogona-train

Walks the requirements of the named distribution, recursively (extras and environment markers as
pip evaluates them), through what this interpreter can import - the venv's packages and, through
--system-site-packages, the base image's torch stack - and fails listing each requirement that is
missing or whose installed version is outside its specifier.

Why not `pip check`: it checks EVERY installed distribution, the base image's own conda packages
included (conda itself, its solver, their pins). Those are not part of the job, and the lock's newer
versions of shared packages (shadowing the base's older copies) would fail it for the base's tooling,
which the job never runs. This checks exactly what the job imports, and depends on nothing of the
base but its Python. tests/test_infra.py runs it against the project's venv and against made-up
installations.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version


def _installed(path: list[str] | None) -> dict[str, metadata.Distribution]:
    """The first distribution of each name on the path, as the import system would find it."""
    found: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions(**({"path": path} if path is not None else {})):
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonicalize_name(name), dist)
    return found


def _requirements(dist: metadata.Distribution, extras: Iterable[str]) -> list[Requirement]:
    out = []
    envs = [{"extra": e} for e in sorted(extras)] or [{"extra": ""}]
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate(env) for env in envs):
            out.append(req)
    return out


def unmet(root: str, path: list[str] | None = None) -> list[str]:
    """One line per requirement of `root`'s closure that the installation does not satisfy."""
    installed = _installed(path)
    problems: list[str] = []
    seen: set[tuple[str, frozenset[str]]] = set()
    todo: list[tuple[str, frozenset[str], str]] = [(root, frozenset(), "(root)")]
    while todo:
        name, extras, wanted_by = todo.pop()
        key = canonicalize_name(name)
        if (key, extras) in seen:
            continue
        seen.add((key, extras))
        dist = installed.get(key)
        if dist is None:
            problems.append(f"{name} (required by {wanted_by}) is not installed")
            continue
        for req in _requirements(dist, extras):
            have = installed.get(canonicalize_name(req.name))
            if have is not None and req.specifier:
                try:
                    ok = req.specifier.contains(Version(have.version), prereleases=True)
                except InvalidVersion:
                    ok = False
                if not ok:
                    problems.append(f"{dist.metadata['Name']} requires {req}, but {have.version} is installed")
            todo.append((req.name, frozenset(req.extras), dist.metadata["Name"]))
    return sorted(set(problems))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: check_env.py DISTRIBUTION", file=sys.stderr)
        return 2
    problems = unmet(argv[0])
    for line in problems:
        print(f"check_env: {line}", file=sys.stderr)
    if problems:
        return 1
    print(f"check_env: every requirement of {argv[0]} and its dependencies is satisfied")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
