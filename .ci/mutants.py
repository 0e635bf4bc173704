"""`make mutants`: mutation testing (mutmut) of the code whose rules the tests must pin down.

Each target mutates one module (or only its named functions) and runs only the test files that
specify it, in a scratch copy of the tree (mutmut writes a `mutants/` folder and reads its
settings from pyproject.toml, which differ per target). Prints mutmut's final count
(N/total, 🎉 killed, 🫥 no tests, ⏰ timeout, 🤔 suspicious, 🙁 survived, 🔇 skipped), every surviving mutant
and a summary line per target; exits 1 when any survives. Not part of `make test`: minutes per module.

    python .ci/mutants.py [--show] [--keep DIR] [--write] [gate|checkpoint|dataset|storage ...]   (default: all)

--show prints each survivor's diff (`mutmut show` takes seconds per mutant); --keep DIR keeps each
target's scratch tree in DIR/<target> (for `mutmut show NAME` there); --write records the counts in
BENCHMARKS.md's `mutants.py` section (`make mutants` does).
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Target:
    paths: tuple[str, ...]  # files or folders to mutate (those that exist)
    tests: tuple[str, ...]  # the test files that specify them (globs)
    names: tuple[str, ...] = ()  # mutmut name globs: only these functions' mutants ("" = all)


TARGETS = {
    # The watchdog, parity probe and verdict; test_gate_training (real training) is left out: minutes per mutant.
    # Every target copies the whole package (mutmut runs the tests in its copy, where a module it did not copy
    # cannot be imported) and mutates only its own module's functions (the name globs).
    "gate": Target(("pogona_job",), ("tests/test_gate.py",), ("pogona_job.training.gate.*",)),
    # The checkpoint sets, pointer and restore; the end-to-end kills (test_crash, test_preemption) run the job in
    # child processes, where mutmut cannot see which mutant they cover, and take minutes: left out.
    "checkpoint": Target(("pogona_job",), ("tests/test_checkpoint.py",), ("pogona_job.training.checkpoint.*",)),
    # The validation rules (label lines, boxes, image sizes) and the split rules of the dataset package;
    # test_dataset_e2e (real training) is left out.
    "dataset": Target(
        ("pogona_job",),  # the whole package is copied (mutmut runs the tests in its copy) ...
        ("tests/test_dataset_validate.py", "tests/test_dataset_split.py", "tests/test_dataset_stage.py"),
        ("pogona_job.dataset.validate.*", "pogona_job.dataset.split.*"),  # ... and only these rules are mutated
    ),
    # Only the S3 error -> exit code mapping.
    "storage": Target(
        ("pogona_job",),
        ("tests/test_storage.py",),  # test_faults runs the job in child processes, outside mutmut's copy
        # mutmut leaves decorated functions alone (errors_for is a @contextmanager), so the mapping lives in
        # these undecorated functions; a target that yields no mutant fails loudly.
        (
            "pogona_job.s3.storage.x__refusal*",
            "pogona_job.s3.storage.x__untrusted*",
            "pogona_job.s3.storage.x_obstore_error*",
        ),
    ),
}


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in filter(None, files):
        rel = raw.decode()
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _config(target: Target, tests: list[str]) -> str:
    def toml_list(items: list[str] | tuple[str, ...]) -> str:
        return "[" + ", ".join(f'"{i}"' for i in items) + "]"

    paths = [p if p.endswith(".py") else p.rstrip("/") + "/" for p in target.paths]
    return (
        "\n[tool.mutmut]\n"
        f"paths_to_mutate = {toml_list(paths)}\n"
        'also_copy = ["tests/", "dataset/", "benchmarks/", "docs/", "README.md"]\n'
        f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n"
        'pytest_add_cli_args = ["-p", "no:randomly", "-p", "no:cacheprovider", "-q", "-x"]\n'
    )


@dataclass
class Outcome:
    paths: tuple[str, ...]
    tests: list[str]
    count: str  # mutmut's final count line
    survivors: list[str]


def run_target(name: str, target: Target, show: bool = False, keep: Path | None = None) -> Outcome:
    """Mutate, run, and return the surviving mutants' names (a missing module or test is an error)."""
    with tempfile.TemporaryDirectory(prefix=f"mutants-{name}-") as tmp:
        work = Path(tmp)
        if keep is not None:  # to `mutmut show NAME` there afterwards
            work = keep / name
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
        _copy_tree(work)
        tests = sorted({str(p.relative_to(work)) for pattern in target.tests for p in work.glob(pattern)})
        paths = tuple(p for p in target.paths if (work / p).exists())
        if not tests or not paths:
            raise SystemExit(f"{name}: nothing to mutate or no tests ({target.paths}, {target.tests})")
        target = Target(paths, target.tests, target.names)
        pyproject = work / "pyproject.toml"
        text = re.sub(r"\n\[tool\.mutmut\][^\[]*", "\n", pyproject.read_text())
        pyproject.write_text(text + _config(target, tests))
        mutmut = str(Path(sys.executable).parent / "mutmut")
        print(f"== {name}: mutating {', '.join(paths)}; tests {' '.join(tests)}", flush=True)
        # One thread per test process: mutmut forks its workers, and a forked torch thread pool deadlocks.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "YOLO_OFFLINE": "true"}
        run = subprocess.run(
            [mutmut, "run", *target.names], cwd=work, capture_output=True, text=True, check=False, env=env
        )
        # mutmut mutates the whole copied package; only the target's own mutants (its name globs) count.
        listing = subprocess.run(
            [mutmut, "results", "--all", "true"], cwd=work, capture_output=True, text=True, check=False
        ).stdout
        statuses: dict[str, str] = {}
        for line in listing.splitlines():
            mutant, sep, status = line.strip().rpartition(": ")
            if sep and (not target.names or any(fnmatch.fnmatch(mutant, g) for g in target.names)):
                statuses[mutant] = status.strip()
        tally = Counter(statuses.values())
        if not statuses or tally.get("not checked", 0) == len(statuses):
            # mutmut's clean run failed (e.g. a test that cannot run in its copy): no mutant was checked
            raise SystemExit(f"{name}: mutmut checked no mutant; its output ends:\n{(run.stdout + run.stderr)[-3000:]}")
        count = f"{len(statuses)} mutants: " + ", ".join(f"{n} {status}" for status, n in sorted(tally.items()))
        print(count, flush=True)
        survivors = sorted(m for m, status in statuses.items() if status == "survived")
        for mutant in survivors:
            diff = (
                subprocess.run([mutmut, "show", mutant], cwd=work, capture_output=True, text=True).stdout
                if show
                else ""
            )
            print(f"-- survived: {mutant}\n{diff}".rstrip(), flush=True)
        others = sorted(f"{m}: {st}" for m, st in statuses.items() if st not in ("killed", "survived"))
        print(f"== {name}: {len(survivors)} survived; not killed for another reason: {others or 'none'}")
        return Outcome(paths, tests, count, survivors)


def record(outcomes: dict[str, Outcome], output: Path) -> None:
    """The BENCHMARKS.md section `mutants.py`: date, commit, and each target's count and survivors."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench import markdown_grid, stamp_line, update_section

    rows = [
        [name, ", ".join(o.paths), " ".join(o.tests), o.count, str(len(o.survivors)), " ".join(o.survivors) or "-"]
        for name, o in outcomes.items()
    ]
    table = markdown_grid(["target", "mutated", "tests", "mutmut's count", "survived", "survivors"], rows)
    update_section("mutants.py", f"## Mutation testing (make mutants)\n\n{stamp_line()}\n\n{table}\n", output)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="mutation testing of the modules the tests must pin down")
    parser.add_argument("targets", nargs="*", help=f"some of {list(TARGETS)}; default all")
    parser.add_argument("--show", action="store_true", help="print each survivor's diff")
    parser.add_argument("--keep", type=Path, default=None, help="keep each target's scratch tree in KEEP/<target>")
    parser.add_argument("--write", action="store_true", help="record the counts in --output's mutants.py section")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    unknown = [n for n in args.targets if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; choose from {list(TARGETS)}")
    keep = args.keep.resolve() if args.keep else None
    outcomes = {name: run_target(name, TARGETS[name], args.show, keep) for name in args.targets or TARGETS}
    print("\nmutants surviving: " + ", ".join(f"{n} {len(o.survivors)}" for n, o in outcomes.items()))
    if args.write:
        record(outcomes, args.output)
        print(f"Wrote {args.output}")
    return 1 if any(o.survivors for o in outcomes.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
