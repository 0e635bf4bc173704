"""The layers are a contract, not a picture: import-linter checks them (pyproject's [tool.importlinter]),
and no module reaches into another package's private names."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "pogona_job"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    # --no-cache: the copy below must be analysed afresh, never answered from the real tree's cache.
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120, check=False
    )


def test_every_import_goes_down_the_layers() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    """The contract bites: s3/ importing the run layer (as the old pull<->storage circle did) fails it."""
    shutil.copytree(PACKAGE, tmp_path / "pogona_job", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    pointers = tmp_path / "pogona_job" / "s3" / "pointers.py"
    pointers.write_text(pointers.read_text() + "\nfrom pogona_job.run import state  # noqa: E402,F401\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "pogona_job.s3.pointers -> pogona_job.run.state" in result.stdout


def _package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else module


def test_no_private_name_crosses_a_package_boundary() -> None:
    crossings = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        aliases: dict[str, str] = {}  # local name -> imported pogona_job module
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pogona_job"):
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    if alias.name.startswith("_") and _package_of(node.module) != _package_of(module):
                        crossings.append(f"{module} imports {target}")
                    aliases[alias.asname or alias.name] = target
            elif (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
            ):
                target = aliases[node.value.id]
                if _package_of(target) != _package_of(module):
                    crossings.append(f"{module} uses {target}.{node.attr}")
    assert crossings == []
