"""`make mutants`: mutation testing (mutmut 3) of the code whose rules the tests must pin down.

Each target mutates one module (or only its named functions) and runs only the test files that specify it, in a
scratch copy of the tree (mutmut writes a `mutants/` folder there and reads its settings from pyproject.toml,
which differ per target). Prints each target's count by status (killed, survived, no tests, timeout, ...),
every surviving mutant with the reason it may survive (SURVIVORS below: an equivalent mutant, say why) and a
summary line per target; exits 1 when a mutant survives that is not equivalent (no reason, or a known missing
test listed in GAPS). Not part of `make test`: minutes per target.

    python .ci/mutants.py [--show] [--keep DIR] [--write] [--max-children N] [gate|checkpoint|dataset|storage ...]
    python .ci/mutants.py --explain

--show prints each survivor's diff (`mutmut show` takes seconds per mutant); --keep DIR keeps each target's
scratch tree in DIR/<target> (for `mutmut show NAME` there); --write records the counts in BENCHMARKS.md's
`mutants.py` section (`make mutants` does), keeping the other targets' last counts; --explain only re-writes
that section's reasons from SURVIVORS (after a reason was given for a survivor), the counts as measured.
Run it under `nice` on a shared machine: 2 test processes at a time (--max-children).

How the tests run (what made the checkpoint target end every mutant in a timeout before):
- mutmut's fork server (`process_isolation = "forkserver"`): the default forks each mutant's test run from
  mutmut's own process after it ran the whole suite there, and obstore's Rust runtime (its threads) does not
  survive a fork: the first upload in the child hangs until mutmut's timeout. The fork server only imports and
  collects the tests before it forks; each mutant's run starts obstore (and torch's pools) itself.
- SeaweedFS: the targets whose tests need S3 get a few servers started here, once, shared by all the mutants'
  pytest sessions (tests/conftest.py's `s3` fixture takes one through TESTS_SHARED_S3, holds it for the
  session and empties its buckets first), instead of one started per mutant.
- The fork server passes a mutant's tests in no particular order; a small plugin written into the copy
  (ORDER_PLUGIN) runs them fastest first, as mutmut's plain fork runner does, so a killed mutant costs its
  fastest failing test rather than the slowest tests that cover it.
- A per-test timeout (pytest-timeout, per target): a mutant that deadlocks fails its test after seconds
  instead of running into mutmut's own limit, minutes per mutant.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
S3_BUCKETS = ["pogona-test", "pogona-other"]  # tests/helpers.py's BUCKET and the second one the tests use


@dataclass(frozen=True)
class Target:
    files: tuple[str, ...]  # the modules mutated (mutmut's only_mutate); the whole package is copied
    tests: tuple[str, ...]  # the test files that specify them (globs)
    functions: tuple[str, ...] = ()  # only these functions' mutants (names as in the module; () = all)
    s3: bool = False  # the tests need a SeaweedFS server
    # pytest-timeout per test: a mutant that deadlocks (the checkpoint worker thread) fails its test after this
    # long instead of running into mutmut's limit, (the covering tests' time + 2 s) * 15 per mutant
    test_timeout_s: int = 60
    # mutmut's max_stack_depth: a function's mutants run only against the tests that reach it through at most
    # this many of the package's frames (-1: every test that calls it, however deep)
    depth: int = -1


TARGETS = {
    # The watchdog, parity probe and verdict; test_gate_training (real training) is left out: minutes per mutant.
    "gate": Target(("pogona_job/training/gate.py",), ("tests/test_gate.py",)),
    # The checkpoint sets, pointer, restore and the interval rules; the end-to-end kills (test_crash,
    # test_preemption) run the job in child processes and take minutes each: left out.
    "checkpoint": Target(
        ("pogona_job/training/checkpoint.py",), ("tests/test_checkpoint.py",), s3=True, test_timeout_s=30
    ),
    # The dataset rules: what a label line, a label file, an image's size and the dataset as a whole must be
    # (validate.py), and how images are grouped and split and how near-duplicates across the split are counted
    # (split.py). Left out, so that the target can be measured in minutes: the plumbing that walks the folder
    # and joins the rules' answers into the inventory (inspect_dataset, _pair_labels, _class_names,
    # _groups_csv, _sidecars: 550 mutants, each test of them builds a dataset on disk), the image decoding
    # (_check_image: Pillow's draft and verify calls, whose mutants change hash bits, not rules), and the
    # pixel comparison of labelled regions (same_labelled_regions and its helpers, pair_sheet), which only the
    # cheque test reaches. test_dataset_e2e (real training) is left out.
    # And each rule's mutants run only against the tests that call it directly (depth 1): the tests that reach
    # the rules through inspect_dataset or stage_dataset build datasets of real images on disk, 1-12 s each and
    # 3 minutes together on an idle machine, which every surviving mutant of parse_line, check_label or
    # group_keys would otherwise pay (measured with depth 2, where the inspection's worker threads let every
    # pipeline test count as a close caller: 7 mutants a minute at load 10). The specification tests at the
    # rules' edges (milliseconds each) are the ones that pin them down; the pipeline tests run once, unmutated
    # (mutmut's stats run).
    "dataset": Target(
        ("pogona_job/dataset/validate.py", "pogona_job/dataset/split.py"),
        ("tests/test_dataset_validate.py", "tests/test_dataset_split.py", "tests/test_dataset_stage.py"),
        (
            "validate.parse_line",
            "validate.check_label",
            "validate.valid_ids",
            "validate._is_number",
            "validate._dataset_problems",
            "validate._pixels_problem",
            "validate._extension_problem",
            "validate._duplicate_stem_problem",
            "validate._looks_like_labels",
            "split.check_rules",
            "split.source_name",
            "split.group_keys",
            "split._sequences",
            "split._alike",
            "split.assign_splits",
            "split._share",
            "split._size",
            "split._take",
            "split.near_duplicates",
        ),
        test_timeout_s=120,
        depth=1,
    ),
    # The answer table: what S3 (botocore or obstore) answered after retries -> the job's exit code and
    # sentence, and the two helpers those sentences are made of. errors_for, the @contextmanager that calls
    # them, is not mutated by mutmut (decorated functions are left alone). test_faults runs the job in child
    # processes: left out.
    "storage": Target(
        ("pogona_job/s3/storage.py",),
        ("tests/test_storage.py",),
        ("storage._refusal", "storage._untrusted", "storage.obstore_error", "storage._at", "storage._where"),
        s3=True,
    ),
}

# Mutants that survive the tests on purpose: each is equivalent (no input the code can receive tells it apart
# from the original) or out of the tests' reach for a stated reason. mutmut numbers a function's mutants in
# order: a changed function renumbers them, and `make mutants` then lists a survivor without a reason.
_CK = "pogona_job.training.checkpoint."
_SYNC = _CK + "xǁCheckpointSyncǁ"
_FOLDER_EXISTS = (
    "equivalent: ignore_errors only matters for a folder that is not there, and a snapshot's staging folder is "
    "there until it is removed, once, by whoever drops or finishes it (under the condition's lock; the trainer "
    "offers each epoch of a phase once, and the stop path queues only an epoch that was skipped)"
)
_ZIP = (
    "equivalent: zip's strict only matters for unequal lengths, and the four names, four values and four "
    "fields after the class are always four (a line has exactly 5 fields by then)"
)
_CODEC = "equivalent: codec names are looked up case-insensitively ('UTF-8-SIG' is 'utf-8-sig')"
_SAME_NUMBER = (
    "equivalent: no step between frames means every frame has the same number, so no frame is ever further "
    "from the previous one than any gap (numpy warns about the median of nothing, the keys are the same)"
)
_FALSY = "equivalent: the flag is only ever read as a truth value, and None is false like False"
SURVIVORS: dict[str, str] = {
    # checkpoint
    _SYNC + "__post_init____mutmut_2": "equivalent: _queue sets the log context before any snapshot exists, and "
    "the worker reads it only for a snapshot",
    _SYNC + "__post_init____mutmut_5": "equivalent: -1e9 and -1e9-1 s are both long before any offer (the "
    "interval is measured from the last offer; no interval setting comes near 30 years)",
    _SYNC + "__post_init____mutmut_7": _FALSY,
    _SYNC + "__post_init____mutmut_9": _FALSY,
    _SYNC + "_worker__mutmut_36": _FALSY,
    _SYNC + "_queue__mutmut_38": _FOLDER_EXISTS,
    _SYNC + "_queue__mutmut_40": _FOLDER_EXISTS,
    _SYNC + "_queue__mutmut_41": _FOLDER_EXISTS,
    _SYNC + "_worker__mutmut_32": _FOLDER_EXISTS,
    _SYNC + "_worker__mutmut_34": _FOLDER_EXISTS,
    _SYNC + "_worker__mutmut_35": _FOLDER_EXISTS,
    _SYNC + "close__mutmut_5": _FOLDER_EXISTS,
    _SYNC + "close__mutmut_7": _FOLDER_EXISTS,
    _SYNC + "close__mutmut_8": _FOLDER_EXISTS,
    _SYNC + "_upload__mutmut_24": "equivalent in outcome: a set's three files upload 16 at once instead of 3 at "
    "once (the limit keeps the background upload from taking the training's bandwidth; no test can see it)",
    _SYNC + "_upload__mutmut_25": "equivalent in outcome: 4 uploads at once instead of 3 for a set of three files",
    _SYNC + "flush__mutmut_7": "equivalent: `left < 0` and `left <= 0` differ only when the time left is exactly "
    "0.0, and then a zero wait and the next check return False the same way",
    _SYNC + "offer__mutmut_8": "equivalent in practice: `<` and `<=` differ only when the time since the last "
    "offer equals min_interval_s to the nanosecond (with the default 0: two offers in the same nanosecond)",
    _CK + "x__sets__mutmut_10": "equivalent: the first part of a key is the same however many times it is split",
    _CK + "x__sets__mutmut_13": "equivalent: the first part of a key is the same however many times it is split",
    _CK + "x__sets__mutmut_11": "equivalent for every key the job writes: rsplit takes a different folder only for "
    "keys two levels below a set folder, and a set is flat (last.pt, best.pt, results.csv, set.json)",
    _CK + "x_restore__mutmut_19": "equivalent: without a pointer the list holds None instead of nothing, and None "
    "is skipped as an incomplete set (`if not entry: continue`)",
    _CK + "x__fetch__mutmut_16": "equivalent in outcome: the files download into the system's temporary folder "
    "instead of one inside save_dir, and are moved into save_dir the same (TemporaryDirectory removes it)",
    _CK + "x__fetch__mutmut_58": "equivalent: save_dir was created just above and weights/ is one level below "
    "it, so `parents` is never needed",
    _CK + "x__fetch__mutmut_60": "equivalent: save_dir was created just above and weights/ is one level below "
    "it, so `parents` is never needed",
    _CK + "x__fetch__mutmut_63": "equivalent: save_dir was created just above and weights/ is one level below "
    "it, so `parents` is never needed",
    # dataset
    "pogona_job.dataset.validate.x__is_number__mutmut_10": "equivalent: float() reads 'INF' as it reads 'inf'",
    "pogona_job.dataset.validate.x_parse_line__mutmut_86": _ZIP,
    "pogona_job.dataset.validate.x_parse_line__mutmut_90": _ZIP,
    "pogona_job.dataset.validate.x_parse_line__mutmut_92": _ZIP,
    "pogona_job.dataset.validate.x_check_label__mutmut_10": "equivalent: newline=None is open()'s default",
    "pogona_job.dataset.validate.x_check_label__mutmut_31": "equivalent: the loop ends at line max_lines + 1 "
    "whatever its bound past that (end of file, or the line-limit problem and break)",
    "pogona_job.dataset.validate.x_check_label__mutmut_12": _CODEC,
    "pogona_job.dataset.validate.x__looks_like_labels__mutmut_7": _CODEC,
    "pogona_job.dataset.split.x_assign_splits__mutmut_31": "equivalent: the inner dict's entries are assigned "
    "whole (`[key] = [...]`), so its default factory is never called",
    "pogona_job.dataset.split.x_near_duplicates__mutmut_25": "equivalent: with one side of a pair of splits empty "
    "there is nothing to compare whether the pair is skipped or not",
    "pogona_job.dataset.split.x__sequences__mutmut_42": _SAME_NUMBER,
    "pogona_job.dataset.split.x_group_keys__mutmut_7": "equivalent in outcome: the frame sequences are worked out "
    "even when no rule asks for them, and only the sequence rule reads them (time, not keys)",
    "pogona_job.dataset.split.x_group_keys__mutmut_19": "equivalent: an image no rule matched gets `key or "
    "img:<rel>`, and '' is as false as None",
    "pogona_job.dataset.split.x__sequences__mutmut_52": _SAME_NUMBER,
    # storage
    "pogona_job.s3.storage.x_obstore_error__mutmut_51": "equivalent: this branch has an S3 code whenever it has "
    "no status line, the sentence then names the code, and neither '' nor 'XXXX' matches a status rule "
    "(301/307, 401/403, 5xx, 408/429)",
}

# Survivors that are NOT equivalent: a test is missing, and what it must assert (by mutant name glob). They are
# listed with their reason and still fail `make mutants` until a test kills them. (The gate's were killed by
# tests/test_gate.py's specification tests: every cause sentence in full, the criteria at their edges.)
GAPS: dict[str, str] = {}


def reason(mutant: str) -> str:
    """Why a mutant may survive: equivalent (SURVIVORS), a known missing test (GAPS, 'GAP: ...'), or ''."""
    if mutant in SURVIVORS:
        return SURVIVORS[mutant]
    gap = next((why for glob, why in GAPS.items() if fnmatch.fnmatch(mutant, glob)), "")
    return f"GAP: {gap}" if gap else ""


ORDER_PLUGIN = '''"""Written by .ci/mutants.py into mutmut's copy: run a mutant's tests fastest first (by the
durations mutmut measured), so that a killed mutant costs its fastest failing test, not the slowest ones."""

import json
from pathlib import Path


def pytest_collection_modifyitems(items):  # type: ignore[no-untyped-def]
    try:
        durations = json.loads(Path("mutmut-stats.json").read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return
    items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))
'''


def _globs(target: Target) -> list[str]:
    """mutmut's names for the target's mutants: `pogona_job.dataset.split.x__share__mutmut_3`."""
    if not target.functions:
        return [f.removesuffix(".py").replace("/", ".") + ".*" for f in target.files]
    globs = []
    for function in target.functions:
        module, _, name = function.rpartition(".")
        (path,) = [f for f in target.files if f.removesuffix(".py").endswith("/" + module)]
        globs.append(f"{path.removesuffix('.py').replace('/', '.')}.x_{name}__mutmut_*")
    return globs


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

    pytest_args = ["-p", "no:randomly", "-p", "no:cacheprovider", "-p", "_mutants_order", "-q", "-x"]
    pytest_args.append(f"--timeout={target.test_timeout_s}")

    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["pogona_job/"]\n'
        f"only_mutate = {toml_list(target.files)}\n"
        'also_copy = ["tests/", "dataset/", "benchmarks/", "docs/", "README.md", "_mutants_order.py"]\n'
        f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n"
        f"pytest_add_cli_args = {toml_list(pytest_args)}\n"
        'process_isolation = "forkserver"\n'
        f"max_stack_depth = {target.depth}\n"
        # mutmut's wall limit per mutant is (the tests' measured time + this) * 15: room for pytest's start
        # in the forked process on a loaded machine
        "timeout_constant = 2.0\n"
    )


class SharedS3:
    """`n` SeaweedFS servers for all the mutants' test sessions (TESTS_SHARED_S3, see tests/conftest.py)."""

    def __init__(self, n: int) -> None:
        sys.path.insert(0, str(ROOT))
        from pogona_job.tools.locals3 import LocalS3

        self.servers = [LocalS3(buckets=list(S3_BUCKETS)) for _ in range(n)]

    def __enter__(self) -> str:
        for server in self.servers:
            server.start(timeout=120)
        specs = [{"port": s.port, "data_dir": str(s.data_dir), "buckets": s.buckets} for s in self.servers]
        return json.dumps(specs)

    def __exit__(self, *exc: object) -> None:
        for server in self.servers:
            server.stop()


@dataclass
class Outcome:
    files: list[str]
    functions: list[str]
    tests: list[str]
    counts: dict[str, int]  # status -> mutants
    survivors: dict[str, str]  # mutant -> reason ("" when none is given)
    others: dict[str, str]  # mutant -> status, for statuses other than killed and survived
    minutes: float
    date: str
    load: str
    mutmut: str = ""
    commit: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def unexplained(self) -> list[str]:
        """Survivors without an equivalence reason: none given, or a known missing test (a gap)."""
        return sorted(m for m, why in self.survivors.items() if not why or why.startswith("GAP: "))


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def _mutmut_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mutmut")
    except PackageNotFoundError:
        return "?"


def run_target(name: str, target: Target, workers: int, show: bool = False, keep: Path | None = None) -> Outcome:
    """Mutate, run, and return the counts and the surviving mutants (a missing module or test is an error)."""
    started, load_start, commit = time.monotonic(), _load(), _commit()  # what is measured: the tree as it is now
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    with tempfile.TemporaryDirectory(prefix=f"mutants-{name}-") as tmp:
        work = Path(tmp)
        if keep is not None:  # to `mutmut show NAME` there afterwards
            work = keep / name
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
        _copy_tree(work)
        (work / "_mutants_order.py").write_text(ORDER_PLUGIN)
        tests = sorted({str(p.relative_to(work)) for pattern in target.tests for p in work.glob(pattern)})
        missing = [f for f in target.files if not (work / f).is_file()]
        if not tests or missing:
            raise SystemExit(f"{name}: no tests ({target.tests}) or no module {missing}")
        pyproject = work / "pyproject.toml"
        text = re.sub(r"\n\[tool\.mutmut\][^\[]*", "\n", pyproject.read_text())
        pyproject.write_text(text + _config(target, tests))
        mutmut = str(Path(sys.executable).parent / "mutmut")
        globs = _globs(target)
        print(f"== {name}: mutating {', '.join(target.functions or target.files)}; tests {' '.join(tests)}", flush=True)
        # One thread per test process: torch and numpy pools are sized for a machine, not for one mutant's tests.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "YOLO_OFFLINE": "true"}
        args = [mutmut, "run", "--max-children", str(workers), *(globs if target.functions else [])]
        if target.s3:
            with SharedS3(workers) as servers:
                run = subprocess.run(
                    args, cwd=work, capture_output=True, text=True, env={**env, "TESTS_SHARED_S3": servers}
                )
        else:
            run = subprocess.run(args, cwd=work, capture_output=True, text=True, check=False, env=env)
        listing = subprocess.run(
            [mutmut, "results", "--all", "true"], cwd=work, capture_output=True, text=True, check=False
        ).stdout
        statuses: dict[str, str] = {}
        for line in listing.splitlines():
            mutant, sep, status = line.strip().rpartition(": ")
            if sep and any(fnmatch.fnmatch(mutant, g) for g in globs):
                statuses[mutant] = status.strip()
        tally = Counter(statuses.values())
        if not statuses or tally.get("not checked", 0) == len(statuses):
            # mutmut's clean run failed (e.g. a test that cannot run in its copy): no mutant was checked
            raise SystemExit(f"{name}: mutmut checked no mutant; its output ends:\n{(run.stdout + run.stderr)[-3000:]}")
        survivors = {m: reason(m) for m, st in sorted(statuses.items()) if st in ("survived", "no tests")}
        others = {m: st for m, st in sorted(statuses.items()) if st not in ("killed", "survived", "no tests")}
        count = f"{len(statuses)} mutants: " + ", ".join(f"{n} {status}" for status, n in sorted(tally.items()))
        print(count, flush=True)
        for mutant, why in survivors.items():
            diff = ""
            if show:
                diff = subprocess.run([mutmut, "show", mutant], cwd=work, capture_output=True, text=True).stdout
            print(f"-- {statuses[mutant]}: {mutant}: {why or 'NO REASON GIVEN'}\n{diff}".rstrip(), flush=True)
        for mutant, status in others.items():
            print(f"-- {status}: {mutant}", flush=True)
        stale = sorted(m for m in SURVIVORS if any(fnmatch.fnmatch(m, g) for g in globs) and m not in survivors)
        notes = [f"a reason is given for {m}, which no longer survives" for m in stale]
        for note in notes:
            print(f"-- note: {note}")
        version = _mutmut_version()
    minutes = (time.monotonic() - started) / 60
    outcome = Outcome(
        files=list(target.files),
        functions=list(target.functions),
        tests=tests,
        counts=dict(sorted(tally.items())),
        survivors=survivors,
        others=others,
        minutes=round(minutes, 1),
        date=date,
        load=f"{load_start} at the start, {_load()} at the end",
        mutmut=version,
        commit=commit,
        notes=notes,
    )
    print(
        f"== {name}: {tally.get('killed', 0)}/{len(statuses)} killed, {len(survivors)} survived "
        f"({len(outcome.unexplained)} not shown equivalent), {len(others)} otherwise; {minutes:.1f} min",
        flush=True,
    )
    return outcome


def _commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT, check=False).returncode != 0
    return head.strip() + (" + uncommitted changes" if dirty else "")


HISTORY = (
    "Before these measurements (2026-12-02): gate 248 of 248 killed (gate.py has grown since); checkpoint not "
    "measurable (each mutant started SeaweedFS and obstore hung in mutmut's forked process: every mutant checked "
    "ended in mutmut's timeout); the dataset rules 242 of 1,520 checked in 13 minutes (44 survivors); storage never "
    "measured. The mutants found three bugs, fixed on the way: an overlong label line was reported as several "
    "lines, with line numbers past the file's (53c96eb); with POGONA_CHECKPOINT_EVERY_EPOCHS > 1 a stop "
    "request queued no checkpoint of the skipped epoch it named (eb110ef); on a GPU, sanity batches without one "
    "labelled box named the backend as a likely cause (aeb2d12)."
)
DATA = re.compile(r"<!-- mutants.json (.*?) -->", re.DOTALL)
STATUSES = ("killed", "survived", "no tests", "timeout", "suspicious", "segfault", "not checked")


def record(outcomes: dict[str, Outcome], output: Path) -> None:
    """The BENCHMARKS.md section `mutants.py`: every target's last count (this run's and earlier ones', kept in
    the section as JSON), its survivors with their reasons, when and how long."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench import machine_line, markdown_grid, update_section

    text = output.read_text() if output.exists() else ""
    found = DATA.search(text)
    known = {k: Outcome(**v) for k, v in json.loads(found.group(1)).items()} if found else {}
    known.update(outcomes)
    known = {name: known[name] for name in TARGETS if name in known}
    for o in known.values():  # the reasons as they are now (a reason given after the run); counts as measured
        o.survivors = {m: reason(m) for m in o.survivors}
        o.mutmut = o.mutmut if o.mutmut not in ("", "?") else _mutmut_version()
    rows = []
    for name, o in known.items():
        mutated = ", ".join(f"`{f}`" for f in o.files)
        mutated = f"{len(o.functions)} functions of {mutated}" if o.functions else mutated
        counts = [str(o.counts.get(s, 0)) for s in STATUSES]
        total = str(sum(o.counts.values()))
        rows.append([name, mutated, " ".join(o.tests), total, *counts, f"{o.minutes:g}", o.date])
    headers = ["target", "mutated", "tests", "mutants", *STATUSES, "minutes", "measured"]
    lines = [
        "## Mutation testing (make mutants)",
        "",
        f"mutmut {', '.join(sorted({o.mutmut for o in known.values()}))} on {machine_line()}, with the fork server "
        "(`.ci/mutants.py` says why), 2 workers under `nice`; each target mutates only its module (or the "
        "functions named) and runs only its test files; a mutant's tests run fastest first and stop at the "
        "first failure. The counts are mutmut's (`mutmut results --all true`). What each target leaves out, "
        "and why, is written beside it in `.ci/mutants.py`; each survivor's reason is there too (SURVIVORS), "
        "and `make mutants` prints it. The machine is shared: the load average is given per target.",
        "",
        markdown_grid(headers, rows),
        "",
        HISTORY,
        "",
    ]
    for name, o in known.items():
        lines.append(
            f"- **{name}** ({o.date}, commit {o.commit}, {o.minutes:g} min, load average {o.load}): "
            f"{o.counts.get('killed', 0)} of {sum(o.counts.values())} killed"
            + (f"; {len(o.survivors)} survive:" if o.survivors else "; none survives.")
        )
        if o.functions:
            lines.append(f"  - mutated: {', '.join(f'`{f}`' for f in o.functions)}")
        gaps: dict[str, list[str]] = {}
        for m, why in o.survivors.items():
            if why.startswith("GAP: "):
                gaps.setdefault(why.removeprefix("GAP: "), []).append(m.rpartition(".")[2])
            else:
                lines.append(f"  - `{m}`: {why or '**no reason given**'}")
        for why, mutants in gaps.items():
            lines.append(f"  - **not killed, not equivalent** ({len(mutants)}: {', '.join(mutants)}): {why}")
        lines += [f"  - `{m}`: {status}" for m, status in o.others.items()]
        lines += [f"  - note: {n}" for n in o.notes]
    data = json.dumps({k: asdict(v) for k, v in known.items()}, ensure_ascii=False)
    lines += ["", f"<!-- mutants.json {data} -->"]
    update_section("mutants.py", "\n".join(lines) + "\n", output)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="mutation testing of the modules the tests must pin down")
    parser.add_argument("targets", nargs="*", help=f"some of {list(TARGETS)}; default all")
    parser.add_argument("--show", action="store_true", help="print each survivor's diff")
    parser.add_argument("--keep", type=Path, default=None, help="keep each target's scratch tree in KEEP/<target>")
    parser.add_argument("--write", action="store_true", help="record the counts in --output's mutants.py section")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument(
        "--explain", action="store_true", help="only re-write the section's reasons from SURVIVORS (nothing runs)"
    )
    args = parser.parse_args(argv)
    if args.explain:
        record({}, args.output)
        return 0
    unknown = [n for n in args.targets if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; choose from {list(TARGETS)}")
    keep = args.keep.resolve() if args.keep else None
    outcomes = {}
    for name in args.targets or TARGETS:
        outcomes[name] = run_target(name, TARGETS[name], args.max_children, args.show, keep)
    print("\nmutants surviving: " + ", ".join(f"{n} {len(o.survivors)}" for n, o in outcomes.items()))
    unexplained = [m for o in outcomes.values() for m in o.unexplained]
    if unexplained:
        print(f"not shown equivalent (SURVIVORS, GAPS in {Path(__file__).relative_to(ROOT)}): {' '.join(unexplained)}")
    if args.write:
        record(outcomes, args.output)
        print(f"Wrote {args.output}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
