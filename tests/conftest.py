"""Shared fixtures: a real SeaweedFS server per session, ultralytics offline, tiny datasets.

Everything runs offline on loopback; servers are started on free ports and stopped at the end.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from pogona_job import logs
from pogona_job.tools.locals3 import LocalS3

# The shared helpers live in tests/helpers.py; these names stay importable from here for the files that
# import them from tests.conftest.
from tests.helpers import (  # noqa: F401
    BUCKET,
    ROOT,
    TINY,
    JobProcess,
    Result,
    client_for,
    job_env,
    out_key,
    output_uri,
    run_cli,
    run_here,
)

logs.CACHE_LOGGERS = False  # so structlog.testing.capture_logs() sees in-process runs


@pytest.fixture(scope="session", autouse=True)
def offline_ultralytics(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One ultralytics config dir for the session, prepared the way the job does it."""
    from pogona_job.training import offline

    for key in [k for k in os.environ if k.startswith(("POGONA_", "AWS_"))]:
        del os.environ[key]  # a developer's own settings must not leak into the tests
    os.environ["YOLO_CONFIG_DIR"] = str(tmp_path_factory.mktemp("yolo-config"))
    offline.prepare(Path(os.environ["YOLO_CONFIG_DIR"]))


@pytest.fixture(autouse=True)
def _reap_job_processes() -> Iterator[None]:
    """A JobProcess a test left running (an assertion failed before it ended) is killed with its group."""
    yield
    JobProcess.reap()


# Servers someone else started and stops: .ci/mutants.py runs hundreds of pytest sessions (one per mutant, some
# at once) against a few SeaweedFS servers instead of starting one per session. JSON, a list of
# {"port": N, "data_dir": "...", "buckets": [...]}.
SHARED_S3 = "TESTS_SHARED_S3"


@pytest.fixture(scope="session")
def s3() -> Iterator[LocalS3]:
    buckets = [BUCKET, "pogona-other"]
    with _shared_s3(buckets) if os.environ.get(SHARED_S3) else LocalS3(buckets=buckets) as server:
        yield server
        invalid = published_manifests_that_do_not_validate(server)
        assert not invalid, f"manifests that do not match docs/manifest.schema.json: {invalid}"


@contextlib.contextmanager
def _shared_s3(buckets: list[str]) -> Iterator[LocalS3]:
    """The first of the SHARED_S3 servers no other session holds (a lock for the session's lifetime, released
    however the process ends), its buckets emptied first: the session starts as on a server of its own."""
    import fcntl
    import json
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for spec in json.loads(os.environ[SHARED_S3]):
            assert set(buckets) <= set(spec["buckets"]), f"{SHARED_S3} serves {spec['buckets']}, not {buckets}"
            with open(Path(spec["data_dir"]) / "session.lock", "w") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                server = LocalS3(buckets=spec["buckets"], data_dir=Path(spec["data_dir"]), port=int(spec["port"]))
                client = client_for(server)
                for bucket in server.buckets:
                    while keys := [
                        {"Key": o["Key"]} for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])
                    ]:
                        client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
                yield server
                return
        time.sleep(0.5)
    raise RuntimeError(f"every server in {SHARED_S3} stayed held by another session for 60 s")


def published_manifests_that_do_not_validate(server: LocalS3) -> dict[str, str]:
    """Every manifest.json the session's runs published (the job's, not the ones tests write by hand to
    read back: those lack `versions` and `lineage`, which the job always writes), checked against the model
    the published schema is generated from. Key -> the first error."""
    import json

    from pydantic import ValidationError

    from pogona_job.run.manifest import Manifest

    client = client_for(server)
    invalid: dict[str, str] = {}
    for bucket in server.buckets:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/manifest.json") or "/checkpoint/" in obj["Key"]:
                    continue
                try:
                    data = json.loads(client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
                except ValueError as err:
                    invalid[obj["Key"]] = f"not JSON: {err}"
                    continue
                if not isinstance(data, dict) or not {"versions", "lineage"} <= set(data):
                    continue
                try:
                    Manifest.model_validate(data)
                except ValidationError as err:
                    invalid[obj["Key"]] = str(err).splitlines()[0] + " " + str(err.errors()[0])
    return invalid


@pytest.fixture(scope="session")
def s3_client(s3: LocalS3):  # type: ignore[no-untyped-def]
    return client_for(s3)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pogona_job.tools.demo import write_demo

    dest = tmp_path_factory.mktemp("demo")
    write_demo(dest, n_images=48, size=128, seed=0)
    return dest


@pytest.fixture(scope="session")
def demo_uri(s3: LocalS3, s3_client, demo_dir: Path) -> str:  # type: ignore[no-untyped-def]
    """The demo dataset in the bucket, pushed the way users push theirs."""
    from pogona_job.s3 import storage

    uri = f"s3://{BUCKET}/datasets/demo"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3.env.items():
            mp.setenv(key, value)
        storage.push_tree(storage.make_client(), demo_dir, storage.S3Path.parse(uri))
    return uri


class FaultProxy:
    """mitmproxy (reverse mode) in front of the S3 server, failing a share of requests (tests/fault_addon.py),
    or running another addon of tests/ configured by `env` (record_addon.py, pause_addon.py)."""

    def __init__(
        self,
        upstream: str,
        faults: str,
        tmp: Path,
        match: str = ".*",
        seed: int = 1,
        slow_s: float = 2,
        addon: str = "fault_addon.py",
        env: Mapping[str, str] | None = None,
    ) -> None:
        from pogona_job.tools.locals3 import free_port

        self.port = free_port()
        self.log = tmp / f"mitm-{self.port}.log"
        environ = {
            **os.environ,
            **(env or {}),
            "FAULTS": faults,
            "FAULTS_MATCH": match,
            "FAULTS_SEED": str(seed),
            "FAULTS_SLOW_S": str(slow_s),
        }
        mitmdump = Path(sys.executable).parent / "mitmdump"
        args = [
            str(mitmdump),
            "--mode",
            f"reverse:{upstream}",
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(self.port),
            "--set",
            "keep_host_header=true",
            "--set",
            f"confdir={tmp / 'mitm-conf'}",
            "--set",
            "flow_detail=0",
            "--set",
            "termlog_verbosity=warn",
            "-s",
            str(ROOT / "tests" / addon),
        ]
        self.proc = subprocess.Popen(args, env=environ, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        import socket
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mitmdump did not start: {self.log.read_text()[-2000:]}")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def faults(self) -> list[str]:
        return [line for line in self.log.read_text(errors="replace").splitlines() if line.startswith("FAULT ")]

    def records(self) -> list[tuple[int, str, str]]:
        """(status, method, path?query) of every request, in order (with addon="record_addon.py")."""
        lines = [line.split(" ", 3) for line in self.log.read_text(errors="replace").splitlines()]
        return [(int(p[1]), p[2], p[3]) for p in lines if p[0] == "RECORD" and len(p) == 4]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Servers and jobs started by the tests must be gone when they end. Under pytest-xdist each worker checks
    its own children; the controller's children are the workers themselves."""
    if session.config.getoption("numprocesses", None) and not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    from tests import forkserver

    forkserver.close()
    left = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True).stdout.split()
    alive = [pid for pid in left if Path(f"/proc/{pid}").exists()]
    if alive:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nprocesses left behind by the tests: {alive}", file=sys.stderr)


# --- markers: `slow` means the test trains a model or starts the job (or a script) as a process --------
# A test is marked slow when it says so (@pytest.mark.slow) or when its code, or the code of a fixture it
# uses, does one of these. `make unit` runs the rest (`-m "not slow"`) and holds each of them to
# UNIT_LIMIT_S, so a test that became slow without saying so fails there, named, instead of quietly
# making the fast loop slow.
SLOW_CALLS = (
    "run_cli(",
    "JobProcess(",
    "Job(",
    "Leg(",
    "Popen(",
    "subprocess.run(",
    "job.run(",
    'run_here(["run"]',  # the job in this process: it trains, unless the test is about a refusal
    ".train(",
    "train_phase(",
    "batch_loss_fn(",  # a real model's loss on a real batch
    "ship_models",
    "trained_model(",  # the session's shared trained model: whichever test asks first trains it
)
UNIT_LIMIT_S = 10.0


def _source(obj: object) -> str:
    import inspect

    try:
        return inspect.getsource(obj)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""


def _is_slow(item: pytest.Item) -> bool:
    function = getattr(item, "function", None)
    sources = [_source(function)] if function else []
    info = getattr(item, "_fixtureinfo", None)
    for defs in info.name2fixturedefs.values() if info else []:
        sources += [_source(d.func) for d in defs if d.baseid]  # the project's fixtures, not pytest's own
    module = getattr(item, "module", None)
    for name, obj in vars(module).items() if module else []:  # one level into the module's own helpers
        if callable(obj) and getattr(obj, "__module__", None) == module.__name__ and f"{name}(" in "".join(sources):
            sources.append(_source(obj))
    return any(call in text for text in sources for call in SLOW_CALLS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the slow tests; then the longest files first (after pytest-randomly's shuffle, which it does
    before this hook runs: the stable sort keeps its order within each rank)."""
    for item in items:
        if item.get_closest_marker("slow") is None and _is_slow(item):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# --- order: the longest files first ----------------------------------------------------------------
# `make test` hands whole files to two pytest-xdist workers in the order collected (--no-loadscope-reorder;
# xdist's own default puts the files with the most tests first, which left the longest single runs to
# start last and run alone). Longest first (measured: `.ci/run` prints the slowest tests), everything else
# after them in pytest-randomly's order. A file missing here costs only a worse schedule.
LONGEST_FIRST = (
    "test_promotion.py",
    "test_crash.py",
    "test_preemption.py",
    "test_fencing.py",
    "test_faults.py",
    "test_cost.py",
    "test_compare.py",
    "test_gpu_proof.py",
    "test_cli_exits.py",
    "test_report_headline.py",
    "test_job.py",
    "test_gate_training.py",
    "test_dataset_e2e.py",
    "test_benchmarks.py",
    "test_trainer.py",
)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    unit = "not slow" in (item.config.getoption("markexpr", "") or "")
    if unit and report.when == "call" and report.passed and call.duration > UNIT_LIMIT_S:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} took {call.duration:.1f} s, over the fast loop's {UNIT_LIMIT_S:.0f} s per test: "
            "mark it @pytest.mark.slow (or make it faster)."
        )
    return report
