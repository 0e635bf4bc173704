"""Structural tests of the image and the cloud infrastructure (issues #6, #15, 24).

There is no Docker engine and no cloud here, so these tests read the Dockerfile, the
entrypoint, the CloudFormation template and the Kubernetes manifests and check the properties
the job's contract relies on: who runs the job, how signals and exit codes travel, which
variables reach it, which exit codes are retried. Every list of variables or exit codes is
derived from the code (`known_env_names()`, the `JobError` classes), never copied, so a new
knob or exit code that the infrastructure does not carry fails here.

The linters (hadolint, cfn-lint, kubernetes-validate, yamllint, checkov, shellcheck) run in
`infra/validate.sh`; the entrypoint is exercised for real against a stub job. What the job role's
IAM policy allows is put to a policy evaluator in tests/test_infra_iam.py. Facts about AWS
(which region offers which instance type) come from cfn-lint's own data, in the validators'
venv that `make tools` creates: these tests need it and say so when it is missing.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import ipaddress
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
import typing
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pogona_job import errors
from pogona_job.config import Settings, env_name, known_env_names

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
LOCK = ROOT / "docker" / "requirements.lock"
MAKE_LOCK = ROOT / "docker" / "make_lock.py"
TEMPLATE = ROOT / "infra" / "aws" / "template.yaml"
CRONJOB = ROOT / "infra" / "k8s" / "cronjob.yaml"
K8S_MANIFESTS = sorted((ROOT / "infra" / "k8s").glob("*.yaml"))

URI_VARS = {"POGONA_DATASET_URI", "POGONA_OUTPUT_URI"}
# Set by the infrastructure, not the user: what the platform knows (the instance and its price) and
# what it guarantees (a GPU: POGONA_DEVICE=0 instead of auto). Their parameters differ from the
# job's defaults on purpose; each has its own test below.
INFRA_SET = {"POGONA_DEVICE", "POGONA_HOURLY_COST", "POGONA_INSTANCE_TYPE"}
# The cost helper's settings (issue #14), agreed by name; until config.py has them, they are the only
# unknown POGONA_* names the templates may carry. Once merged, they are simply known.
COST_SETTINGS = {"POGONA_HOURLY_COST", "POGONA_INSTANCE_TYPE"}
PENDING = COST_SETTINGS - set(known_env_names())
TOOLS_VENV = Path(os.environ.get("TOOLS_VENV", ROOT / ".venv-tools"))
README = ROOT / "README.md"
AWS_README = ROOT / "infra" / "aws" / "README.md"
MAKEFILE = ROOT / "Makefile"
VALIDATE = ROOT / "infra" / "validate.sh"
# Exit codes, from the exception classes that produce them.
RETRYABLE_CODES = {errors.TransientFailure.exit_code, errors.Interrupted.exit_code}
# Every failure class of errors.py (not the subclasses other modules declare, such as budget.BudgetSpent, whose
# exit 0 is a partial success): the set must not depend on which modules other tests happened to import.
FATAL_CODES = {
    cls.exit_code
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, errors.JobError) and cls.exit_code not in RETRYABLE_CODES
}


def test_exit_code_sets_match_the_contract() -> None:
    assert {75, 143} == RETRYABLE_CODES
    assert {2, 3, 4, 5, 6} == FATAL_CODES


# ------------------------------------------------------------------------------------------------
# Dockerfile
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    parser = DockerfileParser(path=str(DOCKERFILE), cache_content=True)
    parser.content = DOCKERFILE.read_text(encoding="utf-8")
    return parser


def _final_stage(parser: DockerfileParser) -> list[dict[str, Any]]:
    """The instructions of the last stage (from its FROM on)."""
    structure = parser.structure
    last_from = max(i for i, ins in enumerate(structure) if ins["instruction"] == "FROM")
    return structure[last_from:]


def _stage_env(instructions: list[dict[str, Any]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in instructions:
        if ins["instruction"] == "ENV":
            for token in shlex.split(ins["value"]):
                if "=" in token:
                    key, _, value = token.partition("=")
                    env[key] = value
    return env


def _values(instructions: list[dict[str, Any]], name: str) -> list[str]:
    return [ins["value"] for ins in instructions if ins["instruction"] == name]


def test_final_user_is_numeric_and_not_root(dockerfile: DockerfileParser) -> None:
    users = _values(dockerfile.structure, "USER")
    assert users, "the Dockerfile never drops root"
    final_users = _values(_final_stage(dockerfile), "USER")
    assert final_users and final_users[-1] == users[-1], "the runtime stage must set the USER last"
    uid = users[-1].split(":")[0]
    # Kubernetes' runAsNonRoot can only verify a numeric UID.
    assert uid.isdigit() and int(uid) > 0, f"USER {users[-1]!r} must be a numeric non-root UID"


def test_entrypoint_is_exec_form_under_tini(dockerfile: DockerfileParser) -> None:
    entrypoints = _values(_final_stage(dockerfile), "ENTRYPOINT")
    assert len(entrypoints) == 1
    argv = json.loads(entrypoints[0])  # exec form is a JSON array; shell form would not parse
    assert isinstance(argv, list)
    assert Path(argv[0]).name == "tini" and argv[1] == "--", "tini must be PID 1 (signals, zombies)"
    assert argv[2] == "/app/docker/entrypoint.sh"
    # tini comes from the distribution and the entrypoint script from this repository.
    runs = " ".join(_values(_final_stage(dockerfile), "RUN"))
    assert re.search(r"apt-get install .*\btini=", runs), "tini must be installed (pinned)"
    copies = _values(_final_stage(dockerfile), "COPY")
    assert any(c.split()[-2:] == ["docker/entrypoint.sh", argv[2]] for c in copies)
    cmd = _values(_final_stage(dockerfile), "CMD")
    assert cmd and json.loads(cmd[-1]) == ["run"]


def _make_lock() -> Any:
    """docker/make_lock.py as a module: BASE_IMAGE, BASE_PROVIDES, BASE_CUDA, BASE_PYTHON."""
    spec = importlib.util.spec_from_file_location("make_lock", MAKE_LOCK)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _external_bases(parser: DockerfileParser) -> list[str]:
    stages: set[str] = set()
    external: list[str] = []
    for ins in parser.structure:
        if ins["instruction"] != "FROM":
            continue
        parts = ins["value"].split()
        image = parts[0]
        if image not in stages:
            external.append(image)
        if len(parts) == 3 and parts[1].upper() == "AS":
            stages.add(parts[2])
    return external


def test_base_images_are_pinned_by_tag_and_digest(dockerfile: DockerfileParser) -> None:
    external = _external_bases(dockerfile)
    assert external, "no base image"
    for image in external:
        name, _, digest = image.partition("@")
        repo, _, tag = name.rpartition(":")
        assert repo and tag and tag != "latest" and "$" not in image, f"{image}: needs an explicit tag"
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{image}: needs a digest"
    assert len(set(external)) == 1, "every stage must share one base (same Python, same torch)"
    labels = dockerfile.labels
    name, _, digest = external[0].partition("@")
    assert labels["org.opencontainers.image.base.name"].endswith(f"/{name}")
    assert labels.get("org.opencontainers.image.base.digest", digest) == digest


def test_base_is_the_pytorch_cuda_runtime_the_lock_was_made_for(dockerfile: DockerfileParser) -> None:
    lock = _make_lock()
    name = _external_bases(dockerfile)[0].partition("@")[0]
    assert name == lock.BASE_IMAGE, "docker/make_lock.py's BASE_IMAGE and the Dockerfile's FROM disagree"
    repo, _, tag = name.rpartition(":")
    assert repo == "pytorch/pytorch" and tag.endswith("-runtime"), "a PyTorch CUDA *runtime* image"
    torch_version = lock.BASE_PROVIDES["torch"]
    assert tag.startswith(f"{torch_version}-cuda{lock.BASE_CUDA}-"), tag
    # The build fails unless the base really carries that torch, CUDA, torchvision and Python.
    deps = " ".join(v for v in _values(dockerfile.structure, "RUN") if "requirements.lock" in v)
    assert f"torch.__version__.startswith('{torch_version}')" in deps
    assert f"torch.version.cuda == '{lock.BASE_CUDA}'" in deps
    assert f"torchvision.__version__.startswith('{lock.BASE_PROVIDES['torchvision']}')" in deps
    major, minor = lock.BASE_PYTHON.split(".")
    assert f"sys.version_info[:2] == ({major}, {minor})" in deps
    # The lock goes in with --no-deps (never a resolver that could replace the base's torch), into a
    # venv that sees the base's packages; its consistency is docker/check_env.py's (test below).
    assert re.search(r"pip install [^&]*--no-deps [^&]*-r docker/requirements\.lock", deps)
    assert "--system-site-packages" in deps
    # The driver requirement follows the base's CUDA: an older driver refuses to start the container.
    env = _stage_env(_final_stage(dockerfile))
    assert env["NVIDIA_REQUIRE_CUDA"] == f"cuda>={lock.BASE_CUDA}"
    assert "compute" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",")


def test_oci_labels(dockerfile: DockerfileParser) -> None:
    labels = dockerfile.labels
    for key in ("title", "description", "version", "revision", "created", "source", "licenses"):
        assert f"org.opencontainers.image.{key}" in labels, key


def test_runtime_environment(dockerfile: DockerfileParser) -> None:
    env = _stage_env(_final_stage(dockerfile))
    assert env["YOLO_OFFLINE"] == "true"
    assert env["YOLO_CONFIG_DIR"].startswith("/")
    assert env["MKL_THREADING_LAYER"] == "GNU"
    assert env["PYTHONUNBUFFERED"] == "1"
    pogona = {k for k in env if k.startswith("POGONA_")}
    assert pogona <= set(known_env_names()), f"the job rejects unknown variables: {pogona}"
    # The work dir is the working directory, created for the runtime user.
    workdirs = _values(_final_stage(dockerfile), "WORKDIR")
    assert env["POGONA_WORK_DIR"] == workdirs[-1]
    runs = " ".join(_values(_final_stage(dockerfile), "RUN"))
    uid = _values(dockerfile.structure, "USER")[-1].split(":")[0]
    assert re.search(rf"install -d -o {uid} -g \d+ -m 0?7[0-7]0 {re.escape(workdirs[-1])}\b", runs)


def test_default_weights_and_amp_model_are_baked(dockerfile: DockerfileParser) -> None:
    runs = [v for v in _values(dockerfile.structure, "RUN") if "fetch_assets.py" in v]
    assert len(runs) == 1
    baked = set(re.findall(r"\b[\w.-]+\.pt\b", runs[0]))
    default_model = Settings.model_fields["model"].default
    if str(default_model).endswith(".pt"):
        assert default_model in baked, "the default POGONA_MODEL must work offline"
    assert "yolo26n.pt" in baked, "ultralytics' CUDA AMP check loads yolo26n.pt"
    weights_dir = re.search(r"--weights-dir\s+(\S+)", runs[0])
    assert weights_dir, "weights must go to an absolute weights_dir"
    config_dir = _stage_env(_final_stage(dockerfile))["YOLO_CONFIG_DIR"]
    copied = " ".join(_values(_final_stage(dockerfile), "COPY"))
    assert weights_dir.group(1) in copied and f"{config_dir}/Ultralytics" in copied


def _dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_excludes_local_state() -> None:
    patterns = _dockerignore_patterns()
    for required in (".venv", ".git", "tests", ".env"):
        assert required in patterns, required


def test_dockerignore_keeps_what_the_build_copies(dockerfile: DockerfileParser) -> None:
    ignored = [p for p in _dockerignore_patterns() if not p.startswith("!")]
    sources: list[str] = []
    for value in _values(dockerfile.structure, "COPY"):
        parts = [p for p in value.split() if not p.startswith("--")]
        sources += parts[:-1]
    assert sources
    for source in sources:
        path = source.rstrip("/")
        prefixes = [path, *("/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1))]
        for pattern in ignored:
            hit = [p for p in prefixes if fnmatch.fnmatchcase(p, pattern.removeprefix("**/"))]
            assert not hit, f".dockerignore pattern {pattern!r} drops {source!r}, which the build copies"


def _lock_entries() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes), from the lock's requirement lines (continuations joined)."""
    text = LOCK.read_text(encoding="utf-8").replace("\\\n", " ")
    entries: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            spec, *options = shlex.split(line)
            name, sep, version = spec.partition("==")
            assert sep and version, f"lock line {line!r} is not an exact pin"
            hashes = [o.removeprefix("--hash=sha256:") for o in options if o.startswith("--hash=sha256:")]
            assert len(hashes) == len(options), f"lock line {line!r}: only --hash options are expected"
            entries[canonicalize_name(name)] = (version, hashes)
    return entries


def _lock_pins() -> dict[str, str]:
    return {name: version for name, (version, _) in _lock_entries().items()}


def _pip_install_args(run: str) -> list[list[str]]:
    """The arguments of each `pip install` in a RUN (shell words, && chains split)."""
    words = shlex.split(run.replace("\\\n", " "))
    out: list[list[str]] = []
    current: list[str] | None = None
    previous = ""
    for word in [*words, "&&"]:
        if word in ("&&", "||", ";"):
            if current is not None:
                out.append(current)
            current = None
        elif current is not None:
            current.append(word)
        elif word == "install" and previous == "pip":
            current = []
        previous = word
    return out


def test_the_lock_installs_with_verified_hashes(dockerfile: DockerfileParser) -> None:
    """Issue 24 item 8: pins without hashes trust whatever the index serves under that version."""
    for name, (_, hashes) in _lock_entries().items():
        assert hashes, f"{name}: no --hash in docker/requirements.lock (regenerate: docker/make_lock.py --wheels)"
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), name
    installs = [args for run in _values(dockerfile.structure, "RUN") for args in _pip_install_args(run)]
    lock_installs = [args for args in installs if "docker/requirements.lock" in args]
    assert lock_installs, "the Dockerfile no longer installs the lock"
    for args in lock_installs:
        assert "--require-hashes" in args and "--no-deps" in args, args
    # Nothing else is installed from an index: only the job's own wheel, built from this checkout.
    for args in installs:
        if args not in lock_installs:
            assert [a for a in args if not a.startswith("-")] == ["/tmp/dist/*.whl"], args


def test_the_build_checks_the_jobs_closure_not_the_bases_tooling(dockerfile: DockerfileParser) -> None:
    """Issue 24 item 8: `pip check` would also judge the base's conda packages (conda, its solver) against
    the lock's newer versions of shared packages; the image checks what the job needs instead."""
    runs = _values(_final_stage(dockerfile), "RUN")
    every_run = _values(dockerfile.structure, "RUN")
    assert not any(re.search(r"\bpip\s+check\b", run) for run in every_run), "pip check judges the base's own packages"
    (install,) = [run for run in runs if "/tmp/dist/*.whl" in run]
    assert re.search(r"--mount=type=bind,source=docker/check_env\.py,target=(\S+)", install)
    target = re.search(r"target=(/tmp/check_env\.py)", install)
    assert target and install.index("/tmp/dist/*.whl") < install.index(f"{target.group(1)} pogona-train")


def test_the_closure_check_passes_here_and_catches_conflicts(tmp_path: Path) -> None:
    """docker/check_env.py against this venv (consistent) and against made-up installations."""
    spec = importlib.util.spec_from_file_location("check_env", ROOT / "docker" / "check_env.py")
    assert spec and spec.loader
    check_env = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_env)
    assert check_env.unmet("pogona-train") == []

    def dist(name: str, version: str, *requires: str) -> None:
        info = tmp_path / f"{name}-{version}.dist-info"
        info.mkdir()
        lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
        lines += [f"Requires-Dist: {r}" for r in requires]
        (info / "METADATA").write_text("\n".join(lines) + "\n", encoding="utf-8")

    dist("job", "1.0", "lib>=2", "torch>=2.5", "extra-only; extra == 'dev'")
    dist("lib", "2.1", "leaf<3")
    dist("leaf", "3.0")  # too new for lib: a conflict inside the closure
    dist("torch", "2.9.1")
    dist("conda", "24.1", "leaf<1")  # the base's own tooling: outside the closure, not judged
    problems = check_env.unmet("job", path=[str(tmp_path)])
    assert problems == ["lib requires leaf<3, but 3.0 is installed"]
    dist("other", "1.0", "missing-lib")
    assert check_env.unmet("other", path=[str(tmp_path)]) == ["missing-lib (required by other) is not installed"]


def test_no_frontend_image_is_fetched_at_build_time() -> None:
    """Issue 24 item 8: a `# syntax=` directive makes BuildKit pull that frontend image from a registry."""
    first_lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    directives = []
    for line in first_lines:  # parser directives: leading `# key=value` comments only
        match = re.match(r"#\s*([A-Za-z]+)\s*=", line)
        if not match:
            break
        directives.append(match.group(1).lower())
    assert "syntax" not in directives


def test_lock_pins_every_runtime_dependency() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    provided = _make_lock().BASE_PROVIDES
    pins = _lock_pins()
    for dep in pyproject["project"]["dependencies"]:
        req = Requirement(dep)
        key = canonicalize_name(req.name)
        if key in provided:
            # The base image's torch stack must satisfy the project's own bounds.
            assert req.specifier.contains(provided[key], prereleases=True), (
                f"base {key}=={provided[key]} violates {dep}"
            )
            continue
        assert key in pins, f"{req.name} is missing from {LOCK.name}: run docker/make_lock.py"
        assert req.specifier.contains(pins[key], prereleases=True), f"{req.name}=={pins[key]} violates {dep}"
    # The wheel is built with --no-build-isolation: the build backend must be locked too.
    for dep in pyproject["build-system"]["requires"]:
        req = Requirement(dep)
        key = canonicalize_name(req.name)
        assert key in pins and req.specifier.contains(pins[key]), f"build requirement {dep} is not locked"


def test_lock_leaves_the_torch_stack_to_the_base() -> None:
    provided = _make_lock().BASE_PROVIDES
    assert {"torch", "torchvision", "triton"} <= set(provided)
    for key in _lock_pins():
        assert key not in provided, f"{key} comes from the base image; the lock must not replace it"
        # The CUDA runtime libraries (nvidia-cublas, nvidia-cudnn-cu12, cuda-bindings, ...) too;
        # nvidia-ml-py is NVML's Python binding, which ultralytics needs, not a CUDA library.
        assert not re.match(r"(nvidia-(?!ml-py$)|cuda-)", key), f"{key} would shadow the base's CUDA libraries"
    assert "ultralytics-opencv-headless" in _lock_pins() and "ultralytics" not in _lock_pins()


def test_lock_is_consistent_with_itself_and_the_base() -> None:
    """An offline `pip check`: each locked package's requirements, from its installed metadata."""
    provided = _make_lock().BASE_PROVIDES
    pins = _lock_pins()
    available = {**pins, **provided}
    checked = 0
    for key, version in pins.items():
        try:
            dist = metadata.distribution(key)
        except metadata.PackageNotFoundError:
            continue
        if dist.version.split("+")[0] != version:
            continue  # another version in this venv (e.g. held back by a dev tool): no metadata to check
        checked += 1
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            assert dep in available, f"{key}=={version} requires {req}, which neither the lock nor the base has"
            assert req.specifier.contains(available[dep], prereleases=True), (
                f"{key}=={version} requires {req}, but the image gets {dep}=={available[dep]}"
            )
    assert checked >= len(pins) // 2, "too few locked packages are installed here to check the lock"


# ------------------------------------------------------------------------------------------------
# docker/entrypoint.sh, run for real against a stub `pogona-job`
# ------------------------------------------------------------------------------------------------

_STUB = """#!/bin/sh
out=$STUB_OUT
echo "pid=$$" > "$out"
for a in "$@"; do echo "arg=$a" >> "$out"; done
env | grep -E '^(POGONA_|YOLO_|MKL_|PYTHONUNBUFFERED)' | sed 's/^/env:/' >> "$out"
if [ -n "${STUB_WAIT:-}" ]; then
    trap 'exit 143' TERM
    echo ready > "$STUB_WAIT"
    while :; do sleep 0.05; done
fi
exit "${STUB_EXIT:-0}"
"""


@pytest.fixture
def stub_job(tmp_path: Path) -> dict[str, str]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    stub = bindir / "pogona-job"
    stub.write_text(_STUB, encoding="utf-8")
    stub.chmod(0o755)
    return {
        "PATH": f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "STUB_OUT": str(tmp_path / "out.txt"),
        "HOME": str(tmp_path),
    }


def _stub_output(env: dict[str, str]) -> tuple[list[str], dict[str, str], int]:
    lines = Path(env["STUB_OUT"]).read_text(encoding="utf-8").splitlines()
    args = [line[4:] for line in lines if line.startswith("arg=")]
    seen = dict(line[4:].split("=", 1) for line in lines if line.startswith("env:"))
    pid = int(next(line[4:] for line in lines if line.startswith("pid=")))
    return args, seen, pid


def test_entrypoint_defaults_to_run_and_execs(stub_job: dict[str, str]) -> None:
    proc = subprocess.Popen(["sh", str(ENTRYPOINT)], env=stub_job)
    assert proc.wait(timeout=30) == 0
    args, env, pid = _stub_output(stub_job)
    assert args == ["run"]
    assert pid == proc.pid, "the job must replace the shell (exec), or SIGTERM stops at the shell"
    assert env["YOLO_OFFLINE"] == "true" and env["MKL_THREADING_LAYER"] == "GNU"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert not any(k.startswith("POGONA_") for k in env), "the entrypoint must not invent POGONA_* values"


def test_entrypoint_passes_arguments_and_keeps_caller_env(stub_job: dict[str, str]) -> None:
    env = {**stub_job, "YOLO_OFFLINE": "false", "POGONA_EPOCHS": "7"}
    result = subprocess.run(["sh", str(ENTRYPOINT), "dataset", "pull", "/tmp/x y"], env=env, timeout=30)
    assert result.returncode == 0
    args, seen, _ = _stub_output(env)
    assert args == ["dataset", "pull", "/tmp/x y"]
    assert seen["YOLO_OFFLINE"] == "false" and seen["POGONA_EPOCHS"] == "7"


@pytest.mark.parametrize("code", sorted(FATAL_CODES | RETRYABLE_CODES))
def test_entrypoint_returns_the_job_exit_code(stub_job: dict[str, str], code: int) -> None:
    result = subprocess.run(["sh", str(ENTRYPOINT)], env={**stub_job, "STUB_EXIT": str(code)}, timeout=30)
    assert result.returncode == code


def test_sigterm_reaches_the_job(stub_job: dict[str, str], tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    proc = subprocess.Popen(["sh", str(ENTRYPOINT)], env={**stub_job, "STUB_WAIT": str(ready)})
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert time.monotonic() < deadline, "stub job never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == errors.Interrupted.exit_code
    finally:
        if proc.poll() is None:
            proc.kill()


def test_entrypoint_falls_back_to_the_module(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake_python = bindir / "python3"
    fake_python.write_text('#!/bin/sh\necho "$@" > "$STUB_OUT"\n', encoding="utf-8")
    fake_python.chmod(0o755)
    out = tmp_path / "out.txt"
    env = {"PATH": f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin", "STUB_OUT": str(out)}
    assert subprocess.run(["sh", str(ENTRYPOINT), "config"], env=env, timeout=30).returncode == 0
    assert out.read_text(encoding="utf-8").split() == ["-m", "pogona_job", "config"]


def test_entrypoint_with_the_real_job_and_no_variables(tmp_path: Path) -> None:
    """Outside any container, with the project's venv on PATH: the job itself says what is missing."""
    bindir = Path(sys.executable).parent
    if not (bindir / "pogona-job").exists():
        pytest.skip("pogona-job is not installed next to this interpreter")
    env = {"PATH": f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    result = subprocess.run(["sh", str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == errors.ConfigError.exit_code, result.stderr
    assert "POGONA_DATASET_URI" in result.stderr


# ------------------------------------------------------------------------------------------------
# CloudFormation (infra/aws/template.yaml)
# ------------------------------------------------------------------------------------------------


class _CfnLoader(yaml.SafeLoader):
    """SafeLoader that turns CloudFormation short forms (!Ref, !Sub, !If ...) into long forms."""


def _cfn_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _cfn_tag)


@pytest.fixture(scope="module")
def cfn() -> dict[str, Any]:
    return yaml.load(TEMPLATE.read_text(encoding="utf-8"), Loader=_CfnLoader)


def _param_name(env: str) -> str:
    """POGONA_SANITY_EPOCHS -> PogonaSanityEpochs."""
    return "".join(part.capitalize() for part in env.lower().split("_"))


def _expected_default(field: str) -> str:
    """The parameter default that means "the job's default": the config default as a string."""
    default = Settings.model_fields[field].default
    if default is None or isinstance(default, Path):  # computed at run time, or the image's /work
        return ""
    if isinstance(default, bool):
        return str(default).lower()
    return str(default)


def _paste_hint(missing: list[str]) -> str:
    """What to add to the template for new knobs (the test failure tells the lead)."""
    out = []
    for env in missing:
        field = env.removeprefix("POGONA_").lower()
        p = _param_name(env)
        out.append(
            f"Parameters:\n  {p}:\n    Type: String\n    Default: '{_expected_default(field)}'\n"
            f"    Description: '{env} - ... Empty: the job default.'\n"
            f"Conditions:\n  Set{p}: !Not [!Equals [!Ref {p}, '']]\n"
            f"JobDefinition Environment:\n  - !If [Set{p}, {{Name: {env}, Value: !Ref {p}}}, !Ref AWS::NoValue]\n"
        )
    return "\n".join(out)


def _job_container(cfn: dict[str, Any]) -> dict[str, Any]:
    return cfn["Resources"]["JobDefinition"]["Properties"]["ContainerProperties"]


def _env_entries(cfn: dict[str, Any]) -> dict[str, tuple[dict[str, Any], str | None]]:
    """Name -> (entry, outermost condition or None) for the job definition's Environment.

    An entry is a literal, or an Fn::If whose branches are entries, AWS::NoValue or nested Fn::Ifs
    (the instance type and price choose between a parameter and the region mapping)."""
    out: dict[str, tuple[dict[str, Any], str | None]] = {}

    def leaves(item: dict[str, Any]) -> list[dict[str, Any]]:
        if "Fn::If" not in item:
            return [] if item == {"Ref": "AWS::NoValue"} else [item]
        _, yes, no = item["Fn::If"]
        return leaves(yes) + leaves(no)

    for item in _job_container(cfn)["Environment"]:
        found = leaves(item)
        assert found and len({e["Name"] for e in found}) == 1, item
        out[found[0]["Name"]] = (found[0], item["Fn::If"][0] if "Fn::If" in item else None)
    return out


def test_every_job_variable_reaches_the_container(cfn: dict[str, Any]) -> None:
    entries = _env_entries(cfn)
    missing = [name for name in known_env_names() if name not in entries]
    assert not missing, f"infra/aws/template.yaml lacks {missing}; add:\n{_paste_hint(missing)}"
    unknown = {n for n in entries if n.startswith("POGONA_")} - set(known_env_names()) - PENDING
    assert not unknown, f"the job would stop with exit 2 on unknown variables {unknown}"


def test_every_knob_is_a_parameter_with_the_job_default(cfn: dict[str, Any]) -> None:
    params = cfn["Parameters"]
    entries = _env_entries(cfn)
    missing = [n for n in known_env_names() if n not in URI_VARS | INFRA_SET and _param_name(n) not in params]
    assert not missing, f"missing parameters; add:\n{_paste_hint(missing)}"
    for field in Settings.model_fields:
        env = env_name(field)
        if env in URI_VARS | INFRA_SET:
            continue
        param = params[_param_name(env)]
        assert param["Type"] == "String"
        assert str(param["Default"]) == _expected_default(field), f"{env}: default drifted from config.py"
        entry, condition = entries[env]
        assert entry["Value"] == {"Ref": _param_name(env)}
        # An empty parameter leaves the variable unset (the job's own default applies).
        assert condition is not None, f"{env} must be omitted when its parameter is empty"
        assert cfn["Conditions"][condition] == {"Fn::Not": [{"Fn::Equals": [{"Ref": _param_name(env)}, ""]}]}
        annotation = Settings.model_fields[field].annotation
        literal = [a for a in (annotation, *typing.get_args(annotation)) if typing.get_origin(a) is typing.Literal]
        if literal:
            assert param["AllowedValues"] == ["", *typing.get_args(literal[0])], f"{env}: allowed values drifted"


def test_run_id_is_left_to_aws_batch(cfn: dict[str, Any]) -> None:
    """A fixed POGONA_RUN_ID would make every scheduled run "already succeeded"."""
    assert cfn["Parameters"][_param_name("POGONA_RUN_ID")]["Default"] == ""


def test_uris_are_built_from_the_scoped_bucket_parameters(cfn: dict[str, Any]) -> None:
    entries = _env_entries(cfn)
    assert entries["POGONA_DATASET_URI"][0]["Value"] == {"Fn::Sub": "s3://${DatasetBucket}/${DatasetPrefix}"}
    assert entries["POGONA_OUTPUT_URI"][0]["Value"] == {"Fn::Sub": "s3://${OutputBucket}/${OutputPrefix}"}
    for name in ("DatasetBucket", "DatasetPrefix", "OutputBucket", "OutputPrefix"):
        assert "Default" not in cfn["Parameters"][name], f"{name} is required"


def _batch_decision(
    rules: list[dict[str, str]], exit_code: int | None, status_reason: str | None = None, reason: str | None = None
) -> str:
    """AWS Batch semantics: the first rule whose every given pattern matches wins; none: RETRY.

    A fact Batch did not report (no exit code, no reason) matches no pattern, not even "*"."""
    facts = {
        "OnExitCode": None if exit_code is None else str(exit_code),
        "OnStatusReason": status_reason,
        "OnReason": reason,
    }
    for rule in rules:
        conditions = {k: v for k, v in rule.items() if k != "Action"}
        if all(facts[k] is not None and fnmatch.fnmatchcase(facts[k] or "", v) for k, v in conditions.items()):
            return rule["Action"].upper()
    return "RETRY"


def test_retry_strategy(cfn: dict[str, Any]) -> None:
    props = cfn["Resources"]["JobDefinition"]["Properties"]
    strategy = props["RetryStrategy"]
    rules = strategy["EvaluateOnExit"]
    assert 1 <= len(rules) <= 5, "AWS Batch allows at most 5 EvaluateOnExit rules"
    for rule in rules:
        # OnExitCode: digits with an optional trailing *; reasons: letters, digits, . : and blanks.
        if "OnExitCode" in rule:
            assert re.fullmatch(r"[0-9]*\*?", rule["OnExitCode"]), rule
        for key in ("OnReason", "OnStatusReason"):
            if key in rule:
                assert re.fullmatch(r"[A-Za-z0-9.: \t]*\*?", rule[key]), rule
    attempts = cfn["Parameters"][strategy["Attempts"]["Ref"]]
    assert 2 <= int(attempts["Default"]) <= 10 and int(attempts["MaxValue"]) <= 10
    exited = "Essential container in task exited"
    assert _batch_decision(rules, errors.TransientFailure.exit_code, status_reason=exited) == "RETRY"
    # Final: the job's verdicts, a crash, out of memory, a segfault, SIGTERM (timeout / terminate:
    # Batch never retries those anyway, so a 143 rule would be a wasted slot).
    for code in (*FATAL_CODES, 1, 137, 139, errors.Interrupted.exit_code):
        assert _batch_decision(rules, code, status_reason=exited) == "EXIT", code
    # A Spot reclaim or a lost instance, whatever the container's exit: retry, the run resumes.
    reclaimed = "Host EC2 (instance i-0123456789abcdef0) terminated."
    for code in (None, 137, errors.Interrupted.exit_code):
        assert _batch_decision(rules, code, status_reason=reclaimed) == "RETRY", code


def test_gpu_memory_shm_and_timeout(cfn: dict[str, Any]) -> None:
    container = _job_container(cfn)
    requirements = {r["Type"]: r["Value"] for r in container["ResourceRequirements"]}
    assert requirements["GPU"] == {"Ref": "GpuCount"}
    assert cfn["Parameters"]["GpuCount"]["Default"] == 1
    assert "VCPU" in requirements and "MEMORY" in requirements
    shm = container["LinuxParameters"]["SharedMemorySize"]
    assert int(cfn["Parameters"][shm["Ref"]]["Default"]) >= 1024, "/dev/shm for dataloader workers"
    timeout = cfn["Resources"]["JobDefinition"]["Properties"]["Timeout"]["AttemptDurationSeconds"]
    assert int(cfn["Parameters"][timeout["Ref"]]["Default"]) >= 3600
    assert container["Command"] == ["run"]
    assert container["LogConfiguration"]["LogDriver"] == "awslogs"


def test_start_up_failures_without_an_exit_code_are_retried_and_bad_images_are_not(cfn: dict[str, Any]) -> None:
    """Issue #15 item 5: AWS's own examples retry the agent's transient start-up failures.

    Issue 24 item 4: CannotPullContainerError is one reason for a missing tag and for transient pull
    failures alike (throttling, a cancelled context, a full disk), so no rule may end the job on it:
    the attempt count bounds a tag that really is missing."""
    rules = cfn["Resources"]["JobDefinition"]["Properties"]["RetryStrategy"]["EvaluateOnExit"]
    transient = [
        ("CannotInspectContainerError: Could not transition to inspecting; timed out after waiting 30s", None),
        ("DockerTimeoutError: Could not transition to started; timed out after waiting 3m0s", None),
        (None, "Task failed to start"),
        ("AGENT", None),
        # The ECS agent's wording for registry throttling, a cancelled pull and a full disk.
        ("CannotPullContainerError: toomanyrequests: Rate exceeded", None),
        ("CannotPullContainerError: context canceled", None),
        ("CannotPullContainerError: failed to register layer: write /var/lib/docker: no space left on device", None),
        ("CannotPullContainerError: pull image manifest has been retried 5 time(s): not found", None),
    ]
    for reason, status_reason in transient:
        assert _batch_decision(rules, None, status_reason=status_reason, reason=reason) == "RETRY", reason
        assert _batch_decision(rules, None, status_reason="Task failed to start", reason=reason) == "RETRY", reason
    attempts = cfn["Parameters"][cfn["Resources"]["JobDefinition"]["Properties"]["RetryStrategy"]["Attempts"]["Ref"]]
    assert int(attempts["Default"]) <= 5, "a missing tag is retried: keep the attempts (and the cost) bounded"
    # Deterministic: the same AMI fails the same way on every attempt.
    reason = "CannotStartContainerError: Error response from daemon: unsatisfied condition: cuda>=12.8"
    assert _batch_decision(rules, None, status_reason="Task failed to start", reason=reason) == "EXIT", reason


def _compute(cfn: dict[str, Any], queue: str) -> list[dict[str, Any]]:
    res = cfn["Resources"]
    order = sorted(res[queue]["Properties"]["ComputeEnvironmentOrder"], key=lambda o: o["Order"])
    return [res[o["ComputeEnvironment"]["Ref"]]["Properties"] for o in order]


def test_spot_capacity_shortage_falls_back_to_on_demand(cfn: dict[str, Any]) -> None:
    """Issue #15 item 6: Batch does not leave a Spot environment for lack of capacity; the template does.

    Batch uses a queue's next environment only when the first is INVALID or offers no suitable type,
    so the Spot queue holds Spot alone, cancels a job that waited too long for capacity, and an
    EventBridge rule submits the job definition to an On-Demand-only queue."""
    res = cfn["Resources"]
    assert [ce["ComputeResources"]["Type"] for ce in _compute(cfn, "JobQueue")] == ["SPOT"]
    assert [ce["ComputeResources"]["Type"] for ce in _compute(cfn, "OnDemandJobQueue")] == ["EC2"]
    for queue in ("JobQueue", "OnDemandJobQueue"):
        for ce in _compute(cfn, queue):
            assert ce["ComputeResources"]["MinvCpus"] == 0, "no idle GPU instances between runs"
    limits = res["JobQueue"]["Properties"]["JobStateTimeLimitActions"]
    capacity = [a for a in limits if a["Reason"] == "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY"]
    assert len(capacity) == 1 and capacity[0]["Action"] == "CANCEL" and capacity[0]["State"] == "RUNNABLE"
    wait = cfn["Parameters"][capacity[0]["MaxTimeSeconds"]["Ref"]]
    assert 600 <= int(wait["Default"]) <= 3600, "wait for Spot, but not for hours"
    # The rule: exactly that cancellation, of a job of the Spot queue, resubmitted On-Demand.
    rule = res["SpotFallbackRule"]["Properties"]
    pattern = rule["EventPattern"]
    assert pattern["source"] == ["aws.batch"] and pattern["detail-type"] == ["Batch Job State Change"]
    assert pattern["detail"]["status"] == ["FAILED"]
    assert pattern["detail"]["jobQueue"] == [{"Ref": "JobQueue"}]
    # Batch's documented statusReason after a jobStateTimeLimitActions cancel.
    assert pattern["detail"]["statusReason"] == [
        "Canceled by JobStateTimeLimit action due to reason: CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY"
    ]
    (target,) = rule["Targets"]
    assert target["Arn"] == {"Ref": "OnDemandJobQueue"}
    assert target["BatchParameters"]["JobDefinition"] == {"Ref": "JobDefinition"}
    assert target["DeadLetterConfig"]["Arn"] == {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]}
    role = res[target["RoleArn"]["Fn::GetAtt"][0]]
    assert role["Properties"]["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {
        "Service": "events.amazonaws.com"
    }
    (statement,) = _statements(role)
    assert _as_list(statement["Action"]) == ["batch:SubmitJob"]
    assert statement["Resource"] == [{"Ref": "OnDemandJobQueue"}, {"Ref": "JobDefinition"}]
    # The schedule still submits to the Spot queue: Spot first.
    submit = json.loads(res["Schedule"]["Properties"]["Target"]["Input"]["Fn::Sub"])
    assert submit["JobQueue"] == "${JobQueue}"


def test_the_on_demand_resubmission_resumes_the_same_run(cfn: dict[str, Any]) -> None:
    """Issue 24 item 3: a Spot job retried after a reclaim can be cancelled while it waits for capacity;
    the resubmitted job has a new AWS_BATCH_JOB_ID, so unless POGONA_RUN_ID names the old one, the run
    restarts at epoch 0 and its checkpoints are orphaned."""
    target = cfn["Resources"]["SpotFallbackRule"]["Properties"]["Targets"][0]
    transformer = target["InputTransformer"]
    paths = transformer["InputPathsMap"]
    # The template as EventBridge fills it for one event (an unquoted placeholder becomes a JSON value).
    event = {"detail": {"jobId": "5d6a8c1e-old-job", "status": "FAILED", "statusReason": SPOT_CAPACITY_CANCEL}}

    def lookup(path: str) -> Any:
        value: Any = event
        for part in path.removeprefix("$.").split("."):
            value = value[part]
        return value

    filled = re.sub(
        r"<([A-Za-z0-9_.-]+)>", lambda m: json.dumps(lookup(paths[m.group(1)])), transformer["InputTemplate"]
    )
    submitted = json.loads(filled)
    # SubmitJob's containerOverrides, with the capitalised member names a Batch target takes.
    assert submitted == {
        "ContainerOverrides": {"Environment": [{"Name": "POGONA_RUN_ID", "Value": "5d6a8c1e-old-job"}]}
    }
    assert env_name("run_id") == "POGONA_RUN_ID", "the job must read the variable the fallback sets"
    # The job definition leaves POGONA_RUN_ID unset by default, so the override is the only value.
    assert cfn["Parameters"]["PogonaRunId"]["Default"] == ""


def test_ecr_repository(cfn: dict[str, Any]) -> None:
    repo = cfn["Resources"]["Repository"]["Properties"]
    assert repo["ImageTagMutability"] == "IMMUTABLE"
    assert repo["ImageScanningConfiguration"]["ScanOnPush"] is True


# A physical name of each type, as the resource's property.
_NAME_PROPERTIES = {"AWS::ECR::Repository": "RepositoryName", "AWS::Logs::LogGroup": "LogGroupName"}


def test_kept_resources_do_not_block_a_redeploy(cfn: dict[str, Any]) -> None:
    """Issue 24 item 9: a Retain resource outlives its stack; if its name is fixed, the next deploy of the
    stack after a teardown fails with "already exists". By default such a name must be left to CloudFormation."""
    for name, resource in cfn["Resources"].items():
        if resource.get("DeletionPolicy") != "Retain":
            continue
        prop = _NAME_PROPERTIES.get(resource["Type"])
        value = resource["Properties"].get(prop) if prop else None
        if value is None:
            continue
        # Only a name a parameter gives, and omitted (AWS::NoValue) while that parameter is empty.
        assert isinstance(value, dict) and "Fn::If" in value, f"{name}: a fixed {prop} breaks the next deploy"
        condition, given, otherwise = value["Fn::If"]
        assert otherwise == {"Ref": "AWS::NoValue"}, name
        param = given["Ref"]
        assert cfn["Conditions"][condition] == {"Fn::Not": [{"Fn::Equals": [{"Ref": param}, ""]}]}, name
        assert cfn["Parameters"][param]["Default"] == "", f"{name}: a fixed default name breaks the next deploy"


def _statements(role: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for policy in role["Properties"].get("Policies", []):
        for st in policy["PolicyDocument"]["Statement"]:
            if "Fn::If" in st:
                out.append(st["Fn::If"][1])
            else:
                out.append(st)
    return out


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def test_job_role_is_scoped_to_the_two_prefixes(cfn: dict[str, Any]) -> None:
    statements = _statements(cfn["Resources"]["JobRole"])
    actions = {a for st in statements for a in _as_list(st["Action"])}
    assert not any("*" in a for a in actions), actions
    assert actions <= {
        "s3:ListBucket",
        "s3:GetObject",
        "s3:PutObject",
        "s3:AbortMultipartUpload",
        "s3:ListMultipartUploadParts",
        "s3:DeleteObject",
        "kms:Decrypt",
        "kms:GenerateDataKey",
    }
    for st in statements:
        resources = [r["Fn::Sub"] if isinstance(r, dict) and "Fn::Sub" in r else r for r in _as_list(st["Resource"])]
        # Which requests these statements allow - listing, existence reads (404 vs 403), deletes - is
        # put to an IAM policy evaluator in tests/test_infra_iam.py (issue 24 items 1 and 2).
        if "s3:ListBucket" in _as_list(st["Action"]):
            assert resources in (
                ["arn:${AWS::Partition}:s3:::${DatasetBucket}"],
                ["arn:${AWS::Partition}:s3:::${OutputBucket}"],
            ), resources
        if "s3:PutObject" in _as_list(st["Action"]):
            assert resources == ["arn:${AWS::Partition}:s3:::${OutputBucket}/${OutputPrefix}/*"]
        if _as_list(st["Action"]) == ["s3:GetObject"]:
            assert resources == ["arn:${AWS::Partition}:s3:::${DatasetBucket}/${DatasetPrefix}/*"]


def test_schedule_submits_this_job_only(cfn: dict[str, Any]) -> None:
    schedule = cfn["Resources"]["Schedule"]["Properties"]
    assert schedule["Target"]["Arn"]["Fn::Sub"].endswith(":scheduler:::aws-sdk:batch:submitJob")
    assert schedule["ScheduleExpression"] == {"Ref": "ScheduleExpression"}
    statements = {a: st for st in _statements(cfn["Resources"]["SchedulerRole"]) for a in _as_list(st["Action"])}
    assert set(statements) == {"batch:SubmitJob", "sqs:SendMessage"}
    assert statements["batch:SubmitJob"]["Resource"] == [{"Ref": "JobQueue"}, {"Ref": "JobDefinition"}]
    assert statements["sqs:SendMessage"]["Resource"] == {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]}


def test_outputs(cfn: dict[str, Any]) -> None:
    for name in ("RepositoryUri", "JobQueueArn", "JobDefinitionArn", "LogGroupName", "DatasetUri", "OutputUri"):
        assert name in cfn["Outputs"], name
    assert int(cfn["Parameters"]["LogRetentionDays"]["Default"]) > 0


# ------------------------------------------------------------------------------------------------
# Kubernetes (infra/k8s/*.yaml)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in K8S_MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


@pytest.fixture(scope="module")
def cronjob(k8s: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return k8s["CronJob/pogona-train"]


def _pod(cronjob: dict[str, Any]) -> dict[str, Any]:
    return cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def _container(cronjob: dict[str, Any]) -> dict[str, Any]:
    containers = _pod(cronjob)["containers"]
    assert len(containers) == 1
    return containers[0]


def test_cronjob_never_overlaps(cronjob: dict[str, Any]) -> None:
    assert cronjob["apiVersion"] == "batch/v1"
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"


def test_cronjob_requests_one_gpu(cronjob: dict[str, Any]) -> None:
    resources = _container(cronjob)["resources"]
    assert str(resources["limits"]["nvidia.com/gpu"]) == "1"
    assert {"cpu", "memory"} <= set(resources["limits"]) and {"cpu", "memory"} <= set(resources["requests"])


def _gib(quantity: str) -> float:
    """A Kubernetes quantity in GiB (the suffixes these manifests use)."""
    units = {"Gi": 1.0, "Mi": 1 / 1024, "G": 1e9 / 2**30, "M": 1e6 / 2**30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    return float(quantity) / 2**30


# Issue 24 item 5. EKS managed node groups create a 20 GiB root volume unless told otherwise (the
# node group's diskSize default), and so does Karpenter's default AL2023 EC2NodeClass; the kubelet
# counts that whole disk, less its 10 % hard-eviction margin and a system reserve, as allocatable
# ephemeral storage, and the scheduler does not subtract images. The image is ~7 GiB unpacked
# (infra/aws/template.yaml's RootVolumeGiB says 6.5; the PyTorch CUDA base is most of it).
DEFAULT_NODE_DISK_GIB = 20.0
IMAGE_GIB = 7.0
NODE_RESERVE_GIB = 0.1 * DEFAULT_NODE_DISK_GIB + 1.0  # eviction margin + kubelet/system reserve
# What the job writes: the reference dataset (~3,000 images, 0.2 GiB, field notes) twice, plus runs,
# weights, ONNX export and checkpoint copies.
JOB_WRITES_GIB = 2 * 0.2 + 3.0


def test_the_pod_fits_a_default_eks_node(cronjob: dict[str, Any]) -> None:
    """A request above what a default node can offer leaves the pod Pending until activeDeadlineSeconds."""
    resources = _container(cronjob)["resources"]
    request = _gib(resources["requests"]["ephemeral-storage"])
    assert request + IMAGE_GIB + NODE_RESERVE_GIB <= DEFAULT_NODE_DISK_GIB, f"{request} GiB never schedules"
    assert request >= JOB_WRITES_GIB, "the request must cover what the job writes (or the node fills up)"
    limit = _gib(resources["limits"]["ephemeral-storage"])
    volumes = {v["name"]: v for v in _pod(cronjob)["volumes"]}
    disk_volumes = sum(_gib(v["emptyDir"]["sizeLimit"]) for v in volumes.values() if "medium" not in v["emptyDir"])
    assert request <= disk_volumes <= limit, "the emptyDirs on disk must fit the container's limit"
    readme = (ROOT / "infra" / "k8s" / "README.md").read_text(encoding="utf-8")
    assert "diskSize" in readme and "ephemeral-storage" in readme, "document the node disk the job needs"


def test_gpu_count_and_device_list_agree(cfn: dict[str, Any], k8s: dict[str, dict[str, Any]]) -> None:
    """Issue 24 item 7: the GPUs the platform gives and the devices the job trains on are one setting."""
    # AWS: GpuCount is the Batch GPU requirement and, unless PogonaDevice overrides it, the device list.
    container = _job_container(cfn)
    assert {"Type": "GPU", "Value": {"Ref": "GpuCount"}} in container["ResourceRequirements"]
    entry = next(e for e in container["Environment"] if "Fn::If" in e and e["Fn::If"][0] == "SetPogonaDevice")
    assert entry["Fn::If"][1] == {"Name": "POGONA_DEVICE", "Value": {"Ref": "PogonaDevice"}}
    fallback = entry["Fn::If"][2]
    assert fallback["Name"] == "POGONA_DEVICE"
    mapping, key, attribute = fallback["Value"]["Fn::FindInMap"]
    assert key == {"Ref": "GpuCount"}
    for count in cfn["Parameters"]["GpuCount"]["AllowedValues"]:
        devices = cfn["Mappings"][mapping][str(count)][attribute]
        assert devices == ",".join(str(i) for i in range(int(count))), count
        assert Settings(device=devices).device == devices, "the job must accept the list"
    # Kubernetes: one index per requested GPU.
    cronjob = k8s["CronJob/pogona-train"]
    gpus = int(_container(cronjob)["resources"]["limits"]["nvidia.com/gpu"])
    devices = _config_map(k8s, cronjob)["POGONA_DEVICE"].split(",")
    assert devices == [str(i) for i in range(gpus)]


def test_podman_tmpfs_is_documented_for_the_job_user(dockerfile: DockerfileParser) -> None:
    """Issue 24 item 9: podman's `--tmpfs /work` is root-owned; the job (USER 10001) then exits 2."""
    uid, _, gid = _values(dockerfile.structure, "USER")[-1].partition(":")
    work = _stage_env(_final_stage(dockerfile))["POGONA_WORK_DIR"]
    for doc in (ROOT / "infra" / "k8s" / "README.md", DOCKERFILE):
        text = doc.read_text(encoding="utf-8")
        mounts = re.findall(rf"--tmpfs\s+{re.escape(work)}:([^\s`]+)", text)
        assert mounts, f"{doc.name}: no --tmpfs {work} example"
        for options in mounts:
            opts = dict(o.partition("=")[::2] for o in options.split(","))
            assert (opts.get("uid"), opts.get("gid")) == (uid, gid or uid), f"{doc.name}: {options}"


def test_ultralytics_writes_its_state_under_the_work_dir(tmp_path: Path, cronjob: dict[str, Any]) -> None:
    """Issue 24 item 7: with a read-only root filesystem, ultralytics' DDP launcher cannot create
    $YOLO_CONFIG_DIR/Ultralytics/DDP in the image's /opt/ultralytics; the entrypoint moves that state
    into the work dir, which is a writable volume on every platform."""
    python = Path(sys.executable)
    if not importlib.util.find_spec("ultralytics"):
        pytest.skip("ultralytics is not installed next to this interpreter")
    # A baked config dir as docker/fetch_assets.py leaves it: real settings, a font.
    baked = tmp_path / "opt-ultralytics"
    setup_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "YOLO_CONFIG_DIR": str(baked)}
    setup_env["YOLO_OFFLINE"] = "true"
    setup = "from ultralytics.utils import SETTINGS; SETTINGS.update(weights_dir='/opt/ultralytics/weights')"
    subprocess.run([str(python), "-c", setup], env=setup_env, check=True, capture_output=True, timeout=120)
    (baked / "Ultralytics" / "Arial.ttf").write_bytes(b"font")
    before = sorted(p.relative_to(baked) for p in baked.rglob("*"))
    # The job, replaced by what ultralytics' dist.generate_ddp_file does first.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    stub = bindir / "pogona-job"
    stub.write_text(
        f"#!{python}\n"
        "import json, os\n"
        "from ultralytics.utils import SETTINGS, USER_CONFIG_DIR\n"
        "(USER_CONFIG_DIR / 'DDP').mkdir(exist_ok=True)\n"
        "print(json.dumps({'config': str(USER_CONFIG_DIR), 'weights': SETTINGS['weights_dir'],"
        " 'font': os.path.realpath(USER_CONFIG_DIR / 'Arial.ttf')}))\n",
        encoding="utf-8",
    )
    stub.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = {
        "PATH": f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(tmp_path),
        "IMAGE_ULTRALYTICS_DIR": str(baked),  # the image's /opt/ultralytics
        "YOLO_CONFIG_DIR": str(baked),  # as the Dockerfile's ENV sets it
        "POGONA_WORK_DIR": str(work),
    }
    done = subprocess.run(["sh", str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(seen["config"]).is_relative_to(work), seen
    assert (Path(seen["config"]) / "DDP").is_dir()
    assert seen["weights"] == "/opt/ultralytics/weights", "the baked settings (weights dir) must carry over"
    assert seen["font"] == str(baked / "Ultralytics" / "Arial.ttf")
    assert sorted(p.relative_to(baked) for p in baked.rglob("*")) == before, "nothing may be written to the image"
    # In the image: the entrypoint's baked dir is the one the Dockerfile bakes and names, and it stays
    # root-owned (read-only to the job, as a read-only root filesystem makes it anyway).
    parser = DockerfileParser(path=str(DOCKERFILE), cache_content=True)
    parser.content = DOCKERFILE.read_text(encoding="utf-8")
    final = _final_stage(parser)
    default = re.search(r"IMAGE_ULTRALYTICS_DIR:-([^}]+)\}", ENTRYPOINT.read_text(encoding="utf-8"))
    assert default and _stage_env(final)["YOLO_CONFIG_DIR"] == default.group(1)
    baked_copies = [c for c in _values(final, "COPY") if f"{default.group(1)}/Ultralytics" in c]
    assert baked_copies and not any("--chown" in c for c in baked_copies)
    # On Kubernetes the root filesystem is read-only and the work dir is a volume.
    container = _container(cronjob)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/work" in {m["mountPath"] for m in container["volumeMounts"]}


def _k8s_decision(rules: list[dict[str, Any]], container: str, exit_code: int, disrupted: bool = False) -> str:
    """Kubernetes' podFailurePolicy: the first matching rule wins; none: Count (retry under backoffLimit).

    onExitCodes never matches exit 0; a rule without containerName applies to every container."""
    for rule in rules:
        if "onExitCodes" in rule:
            spec = rule["onExitCodes"]
            if spec.get("containerName", container) != container or exit_code == 0:
                continue
            inside = exit_code in spec["values"]
            if inside == (spec["operator"] == "In"):
                return str(rule["action"])
        for cond in rule.get("onPodConditions", []):
            if disrupted and cond["type"] == "DisruptionTarget" and cond.get("status", "True") == "True":
                return str(rule["action"])
    return "Count"


def test_pod_failure_policy_retries_only_75_and_143(cronjob: dict[str, Any]) -> None:
    """Issue #15 item 4: 1, 137 (OOM) and 139 fail at once, as on Batch; not backoffLimit x hours of GPU."""
    job = cronjob["spec"]["jobTemplate"]["spec"]
    assert _pod(cronjob)["restartPolicy"] == "Never", "podFailurePolicy requires restartPolicy Never"
    rules = job["podFailurePolicy"]["rules"]
    name = _container(cronjob)["name"]
    for code in RETRYABLE_CODES:
        assert _k8s_decision(rules, name, code) == "Count", code
    for code in (*FATAL_CODES, 1, 126, 127, 137, 139, 255):
        assert _k8s_decision(rules, name, code) == "FailJob", code
    # Evicted, preempted, drained: a new pod without counting, whatever the exit code the kill left.
    for code in (137, errors.Interrupted.exit_code):
        assert _k8s_decision(rules, name, code, disrupted=True) == "Ignore", code
    assert job["backoffLimit"] >= 1, "exit 75 / 143 must get another pod"
    assert job.get("podReplacementPolicy", "Failed") == "Failed", "one pod per run id at a time"


def test_run_id_comes_from_the_job_name(cronjob: dict[str, Any]) -> None:
    env = {e["name"]: e for e in _container(cronjob)["env"]}
    ref = env["KUBERNETES_JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert ref == "metadata.labels['batch.kubernetes.io/job-name']"


def test_shm_is_a_memory_volume(cronjob: dict[str, Any]) -> None:
    volumes = {v["name"]: v for v in _pod(cronjob)["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in _container(cronjob)["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"]


def test_pod_runs_unprivileged(cronjob: dict[str, Any], dockerfile: DockerfileParser) -> None:
    pod = _pod(cronjob)
    container = _container(cronjob)
    sc = container["securityContext"]
    image_uid = int(_values(dockerfile.structure, "USER")[-1].split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_uid == sc.get("runAsUser", image_uid)
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["terminationGracePeriodSeconds"] >= 30, "time to checkpoint after SIGTERM"
    assert pod.get("automountServiceAccountToken") is False
    if sc.get("readOnlyRootFilesystem"):
        # Everything the job writes must then be a volume: its work dir and /tmp.
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        work_dir = _stage_env(_final_stage(dockerfile))["POGONA_WORK_DIR"]
        assert {work_dir, "/tmp"} <= mounts


def test_image_is_pinned(cronjob: dict[str, Any]) -> None:
    image = _container(cronjob)["image"]
    name, _, digest = image.partition("@")
    tag = name.rpartition(":")[2] if ":" in name.rpartition("/")[2] else ""
    assert digest or (tag and tag != "latest"), f"{image}: pin a tag (not latest) or a digest"


def test_configuration_and_credentials(k8s: dict[str, dict[str, Any]], cronjob: dict[str, Any]) -> None:
    container = _container(cronjob)
    config_maps = [k8s[f"ConfigMap/{s['configMapRef']['name']}"] for s in container["envFrom"] if "configMapRef" in s]
    keys = {k for cm in config_maps for k in cm["data"]} | {e["name"] for e in container["env"]}
    pogona = {k for k in keys if k.startswith("POGONA_")}
    assert pogona <= set(known_env_names()) | PENDING, (
        f"the job would stop on unknown variables {pogona - set(known_env_names())}"
    )
    assert pogona >= URI_VARS
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & {k for cm in config_maps for k in cm["data"]}
    env = {e["name"]: e for e in container["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        ref = env[key]["valueFrom"]["secretKeyRef"]
        # Issue #15 item 12: with Pod Identity or IRSA there is no Secret; a required reference would
        # hold the pod in CreateContainerConfigError until the deadline.
        assert ref["optional"] is True, f"{key} must come from an optional Secret reference"


def _config_map(k8s: dict[str, dict[str, Any]], cronjob: dict[str, Any]) -> dict[str, str]:
    refs = [s["configMapRef"]["name"] for s in _container(cronjob)["envFrom"] if "configMapRef" in s]
    return {k: str(v) for name in refs for k, v in k8s[f"ConfigMap/{name}"]["data"].items()}


def test_stop_budget_matches_each_platform(
    k8s: dict[str, dict[str, Any]], cronjob: dict[str, Any], cfn: dict[str, Any]
) -> None:
    """Issue #15 item 12: the job uses the time each platform gives after SIGTERM, minus a margin."""
    # Batch: SIGKILL 30 s after SIGTERM (timeouts, terminations).
    batch_budget = float(
        cfn["Parameters"]["PogonaStopBudgetS"]["Default"] or Settings.model_fields["stop_budget_s"].default
    )
    assert 15 <= batch_budget <= 30 - 5
    # Kubernetes: terminationGracePeriodSeconds, and the budget close to it (not 25 s of 120).
    grace = _pod(cronjob)["terminationGracePeriodSeconds"]
    budget = float(_config_map(k8s, cronjob)["POGONA_STOP_BUDGET_S"])
    assert budget + 10 <= grace <= budget + 30, (budget, grace)
    Settings(stop_budget_s=budget)  # a value the job accepts


# ------------------------------------------------------------------------------------------------
# Issue #15: the stack deploys as written (items 1-12), and #14's instance type and price
# ------------------------------------------------------------------------------------------------


def _cfn_lint_instance_types() -> dict[str, set[str]]:
    """cfn-lint's EC2 instance types per region (from AWS's pricing data), from the validators' venv."""
    found = sorted(TOOLS_VENV.glob("lib/python3*/site-packages/cfnlint/data/schemas/extensions/aws_ec2_instance"))
    if not found:
        pytest.fail(
            f"cfn-lint's region data is not in {TOOLS_VENV}: run `make tools` (TOOLS_VENV=... to point elsewhere)"
        )
    data = json.loads((found[-1] / "instancetype_enum.json").read_text(encoding="utf-8"))
    return {region: set(v["enum"]) for region, v in data.items() if isinstance(v, dict) and region != "all"}


def _regions_named_in(*docs: Path) -> set[str]:
    text = " ".join(doc.read_text(encoding="utf-8") for doc in docs)
    return set(re.findall(r"\b(?:us|eu|ap|sa|ca|me|af|il|mx|cn)(?:-gov)?-[a-z]+-\d\b", text))


def test_default_instance_types_are_offered_in_each_region(cfn: dict[str, Any]) -> None:
    """Item 1: Batch rejects a type the region does not offer, and cfn-lint does not check InstanceTypes."""
    offered = _cfn_lint_instance_types()
    mapping = cfn["Mappings"]["RegionDefaults"]
    named = _regions_named_in(README, AWS_README, TEMPLATE, CRONJOB)
    assert {"eu-west-1", "us-east-1"} <= named, "the READMEs' deploy and cost regions"
    missing = named - set(mapping)
    assert not missing, f"regions the docs name have no default instance type: {sorted(missing)}"
    for region, row in mapping.items():
        assert region in offered, f"{region}: not a region cfn-lint knows"
        assert row["InstanceType"] in offered[region], f"{row['InstanceType']} is not offered in {region}"
        price = float(row["OnDemandUsdPerHour"])
        assert price == 0 or 0.2 < price < 5, f"{region}: implausible price {price}"
    # The parameter's default means "the mapping": no literal list that could name a missing type.
    param = cfn["Parameters"]["InstanceTypes"]
    assert param["Type"] == "CommaDelimitedList" and param["Default"] == ""
    for name in ("SpotComputeEnvironment", "OnDemandComputeEnvironment"):
        types = cfn["Resources"][name]["Properties"]["ComputeResources"]["InstanceTypes"]
        condition, default, given = types["Fn::If"]
        assert cfn["Conditions"][condition] == {"Fn::Equals": [{"Fn::Join": ["", {"Ref": "InstanceTypes"}]}, ""]}
        assert default == [{"Fn::FindInMap": ["RegionDefaults", {"Ref": "AWS::Region"}, "InstanceType"]}]
        assert given == {"Ref": "InstanceTypes"}


def test_cfn_lint_checks_the_regions_the_docs_name() -> None:
    """validate.sh lints the template for the regions of the READMEs, not others."""
    match = re.search(r"cfn-lint\" --regions ([a-z0-9 -]+?) --", VALIDATE.read_text(encoding="utf-8"))
    assert match, "validate.sh no longer passes --regions to cfn-lint"
    assert {"eu-west-1", "us-east-1"} <= set(match.group(1).split())


def test_the_job_is_told_its_instance_type_and_price(cfn: dict[str, Any], k8s: dict[str, dict[str, Any]]) -> None:
    """Issue #14: the platform, not a guess, says what the instance is and costs."""
    env = _job_container(cfn)["Environment"]
    by_name: dict[str, Any] = {}
    for item in env:
        if "Fn::If" in item:
            _, first, _ = item["Fn::If"]
            if isinstance(first, dict) and "Name" in first:
                by_name[first["Name"]] = item
    itype = by_name["POGONA_INSTANCE_TYPE"]["Fn::If"]
    assert itype[0] == "UseRegionInstanceType"
    assert itype[1]["Value"] == {"Fn::FindInMap": ["RegionDefaults", {"Ref": "AWS::Region"}, "InstanceType"]}
    # A user's list passes on its type only when it names exactly one.
    assert itype[2]["Fn::If"][0] == "SingleInstanceType"
    assert itype[2]["Fn::If"][1]["Value"] == {"Fn::Select": [0, {"Ref": "InstanceTypes"}]}
    assert itype[2]["Fn::If"][2] == {"Ref": "AWS::NoValue"}
    price = by_name["POGONA_HOURLY_COST"]["Fn::If"]
    assert price[0] == "SetPogonaHourlyCost" and price[1]["Value"] == {"Ref": "PogonaHourlyCost"}
    assert price[2]["Fn::If"][0] == "UseRegionPrice"
    assert price[2]["Fn::If"][1]["Value"] == {
        "Fn::FindInMap": ["RegionDefaults", {"Ref": "AWS::Region"}, "OnDemandUsdPerHour"]
    }
    assert cfn["Parameters"]["PogonaHourlyCost"]["Default"] == ""
    # Kubernetes: no node label reaches a pod, so the pod is pinned to the type it is told.
    cronjob = k8s["CronJob/pogona-train"]
    pinned = _pod(cronjob)["nodeSelector"]["node.kubernetes.io/instance-type"]
    config = _config_map(k8s, cronjob)
    assert config["POGONA_INSTANCE_TYPE"] == pinned
    # ...and a type the example's region offers (a pod pinned to a missing type stays Pending).
    assert pinned in _cfn_lint_instance_types()[config["AWS_REGION"]], (pinned, config["AWS_REGION"])


def test_a_gpu_platform_pins_the_device(cfn: dict[str, Any], k8s: dict[str, dict[str, Any]]) -> None:
    """Item 2: with POGONA_DEVICE=0 an unusable GPU is exit 2 (tests/test_device_policy.py), not CPU training."""
    # An empty PogonaDevice means "the GpuCount GPUs" (issue 24 item 7): 0 by default, never auto.
    assert cfn["Parameters"]["PogonaDevice"]["Default"] == ""
    entry = next(e for e in _job_container(cfn)["Environment"] if "Fn::If" in e and e["Fn::If"][0] == "SetPogonaDevice")
    fallback = entry["Fn::If"][2]["Value"]["Fn::FindInMap"]
    default_gpus = str(cfn["Parameters"]["GpuCount"]["Default"])
    assert cfn["Mappings"][fallback[0]][default_gpus][fallback[2]] == "0"
    assert _config_map(k8s, k8s["CronJob/pogona-train"])["POGONA_DEVICE"] == "0"
    assert Settings(device="0").device == "0"


def _egress_allows(policy: dict[str, Any], ip: str, port: int, protocol: str = "TCP") -> bool:
    """NetworkPolicy egress semantics: any rule whose `to` (absent: anywhere) and `ports` (absent: all) match."""
    address = ipaddress.ip_address(ip)
    for rule in policy["spec"].get("egress", []):
        peers = rule.get("to")
        if peers is not None:
            hit = False
            for peer in peers:
                block = peer.get("ipBlock")
                if block is None:
                    continue  # pod/namespace selectors never match an external address
                net = ipaddress.ip_network(block["cidr"])
                excluded = any(
                    address in ipaddress.ip_network(e)
                    for e in block.get("except", [])
                    if ipaddress.ip_network(e).version == address.version
                )
                if net.version == address.version and address in net and not excluded:
                    hit = True
            if not hit:
                continue
        ports = rule.get("ports")
        if ports is None or any(p.get("protocol", "TCP") == protocol and p.get("port") == port for p in ports):
            return True
    return False


def test_network_policy_admits_each_documented_credential_method(k8s: dict[str, dict[str, Any]]) -> None:
    """Item 3: static keys and IRSA need HTTPS (S3, STS); EKS Pod Identity its agent on the node."""
    policy = k8s["NetworkPolicy/pogona-train"]
    assert "Egress" in policy["spec"]["policyTypes"]
    s3, sts = "52.216.0.10", "54.239.29.25"
    assert _egress_allows(policy, s3, 443) and _egress_allows(policy, sts, 443)
    assert _egress_allows(policy, "10.100.0.10", 53, "UDP") and _egress_allows(policy, "10.100.0.10", 53, "TCP")
    assert _egress_allows(policy, "169.254.170.23", 80), "EKS Pod Identity agent (IPv4)"
    assert _egress_allows(policy, "fd00:ec2::23", 80), "EKS Pod Identity agent (IPv6)"
    # ...and nothing else: not the instance metadata service (the node's role), not plain HTTP out.
    assert not _egress_allows(policy, "169.254.169.254", 80)
    assert not _egress_allows(policy, s3, 80)
    assert policy["spec"]["ingress"] == []
    # The manifest recommends Pod Identity: the comment and the policy agree.
    assert "Pod Identity" in CRONJOB.read_text(encoding="utf-8")


def _per_build_args() -> set[str]:
    """The build args the Makefile changes on every build (dates, commits)."""
    return set(re.findall(r"--build-arg (\w+)=", MAKEFILE.read_text(encoding="utf-8")))


def test_no_per_build_argument_before_the_last_run(dockerfile: DockerfileParser) -> None:
    """Item 7: every RUN after an ARG depends on its value; BUILD_DATE changes every second."""
    per_build = _per_build_args()
    assert {"BUILD_DATE", "VCS_REF", "VERSION"} <= per_build
    stage: list[dict[str, Any]] = []
    stages: list[list[dict[str, Any]]] = []
    for ins in dockerfile.structure:
        if ins["instruction"] == "FROM":
            stage = []
            stages.append(stage)
        elif not stages:
            assert not (ins["instruction"] == "ARG" and ins["value"].split("=")[0] in per_build), ins
            continue
        stage.append(ins)
    for instructions in stages:
        runs = [i for i, ins in enumerate(instructions) if ins["instruction"] == "RUN"]
        last_run = runs[-1] if runs else -1
        for ins in instructions[: last_run + 1]:
            if ins["instruction"] == "ARG":
                name = ins["value"].split("=")[0].strip()
                assert name not in per_build, f"ARG {name} (line {ins['startline'] + 1}) comes before a RUN"


def test_build_info_is_in_the_environment_last(dockerfile: DockerfileParser) -> None:
    """The job reads its image's version, commit and date (names agreed with the other helpers)."""
    final = _final_stage(dockerfile)
    env_at = [i for i, ins in enumerate(final) if ins["instruction"] == "ENV" and "IMAGE_VERSION" in ins["value"]]
    assert env_at, "no ENV IMAGE_VERSION"
    assert all(ins["instruction"] in ("ARG", "LABEL", "ENV") for ins in final[env_at[0] :])
    env = _stage_env(final)
    assert env["IMAGE_VERSION"] == "${VERSION}"
    assert env["IMAGE_VCS_REF"] == "${VCS_REF}"
    assert env["IMAGE_BUILD_DATE"] == "${BUILD_DATE}"
    assert not any(k.startswith("POGONA_") and k != "POGONA_WORK_DIR" for k in env)


def test_omp_threads_are_pinned_and_workers_still_scale(dockerfile: DockerfileParser, tmp_path: Path) -> None:
    """Item 12: OMP_NUM_THREADS=1 as ultralytics' image; dataloader workers still follow the CPU count."""
    assert _stage_env(_final_stage(dockerfile))["OMP_NUM_THREADS"] == "1"
    probe = (
        "import json, os, torch; from pathlib import Path\n"
        "from pogona_job.training import resolve_workers\n"
        "from ultralytics.utils import NUM_THREADS\n"
        "from ultralytics.utils.torch_utils import select_device\n"
        "intra = torch.get_num_threads()\n"
        "workers, _ = resolve_workers(64, '0', shm=Path('/'))\n"
        "select_device('cpu', verbose=False)\n"
        "print(json.dumps({'intra': intra, 'workers': workers, 'cpus': os.cpu_count(),"
        " 'cpu_training': torch.get_num_threads(), 'yolo': NUM_THREADS}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "YOLO_OFFLINE": "true", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["intra"] == 1, "the variable binds torch's intra-op threads"
    assert seen["workers"] == seen["cpus"], "dataloader workers are processes: the CPU count, not OMP, caps them"
    assert seen["cpu_training"] == seen["yolo"], "ultralytics resets the threads for CPU training"


def test_only_the_al2023_gpu_ami(cfn: dict[str, Any]) -> None:
    """Item 8: the AL2 GPU AMI's driver (CUDA 12.4) fails the image's cuda>=12.8."""
    assert "ECS_AL2_NVIDIA" not in TEMPLATE.read_text(encoding="utf-8")
    for name in ("SpotComputeEnvironment", "OnDemandComputeEnvironment"):
        configs = cfn["Resources"][name]["Properties"]["ComputeResources"]["Ec2Configuration"]
        assert [c["ImageType"] for c in configs] == ["ECS_AL2023_NVIDIA"]


def test_amis_follow_the_latest_batch_gpu_ami(cfn: dict[str, Any]) -> None:
    """Item 9: Batch never refreshes an AMI on its own; infrastructure updates take the newest one."""
    for name in ("SpotComputeEnvironment", "OnDemandComputeEnvironment"):
        props = cfn["Resources"][name]["Properties"]
        resources = props["ComputeResources"]
        assert resources["UpdateToLatestImageVersion"] is True
        assert props["ReplaceComputeEnvironment"] is False, "in-place infrastructure updates"
        assert props["UpdatePolicy"]["TerminateJobsOnUpdate"] is False
        assert 1 <= props["UpdatePolicy"]["JobExecutionTimeoutMinutes"] <= 360
        # An AMI named anywhere makes Batch ignore UpdateToLatestImageVersion.
        assert "ImageId" not in resources and all("ImageIdOverride" not in c for c in resources["Ec2Configuration"])
    template = cfn["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]
    assert "ImageId" not in template
    assert "updateToLatestImageVersion=true" in AWS_README.read_text(encoding="utf-8")


def test_readme_lists_the_deploy_prerequisites() -> None:
    """Item 10: ECS endpoints for private subnets without NAT, and the Spot service-linked role."""
    text = AWS_README.read_text(encoding="utf-8")
    prereqs = text[text.index("Prerequisites") : text.index("```sh")]
    for endpoint in ("`ecs`", "`ecs-agent`", "`ecs-telemetry`", "ecr.api", "ecr.dkr", "`s3`", "`logs`"):
        assert endpoint in prereqs, endpoint
    assert "AWSServiceRoleForEC2Spot" in prereqs and "spot.amazonaws.com" in prereqs


def _event_matches(pattern: dict[str, Any], event: dict[str, Any]) -> bool:
    """EventBridge pattern semantics, the parts the template uses: a list of values (any matches),
    nested objects, `anything-but`, and `$or` (any of the alternatives, each ANDed with the rest)."""

    def value_matches(rule: Any, value: Any) -> bool:
        if isinstance(rule, dict) and "anything-but" in rule:
            excluded = rule["anything-but"]
            if isinstance(excluded, dict):  # {"anything-but": {"prefix": ...}}
                return isinstance(value, str) and not value.startswith(excluded["prefix"])
            return value is not None and value not in _as_list(excluded)
        return bool(rule == value)

    for key, want in pattern.items():
        if key == "$or":
            if not any(_event_matches(alternative, event) for alternative in want):
                return False
        elif isinstance(want, dict):
            if not isinstance(event.get(key), dict) or not _event_matches(want, event[key]):
                return False
        elif not any(value_matches(rule, event.get(key)) for rule in want):
            return False
    return True


SPOT_CAPACITY_CANCEL = "Canceled by JobStateTimeLimit action due to reason: CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY"


def _batch_event(detail_type: str, queue: str, status: str, reason: str) -> dict[str, Any]:
    """A Batch event as EventBridge delivers it (jobQueue stands for the queue's ARN, i.e. its Ref)."""
    return {
        "source": "aws.batch",
        "detail-type": detail_type,
        "detail": {"jobId": "4c7599ae", "jobQueue": {"Ref": queue}, "status": status, "statusReason": reason},
    }


def test_alerts_fire_for_failures_and_blocked_queues_but_not_for_the_spot_fallback(cfn: dict[str, Any]) -> None:
    """Issue 24 items 6 and 9: a RUNNABLE job Batch cannot place alerts (it never FAILs unless a time-limit
    action names its reason), and the Spot cancellation that SpotFallbackRule resubmits does not."""
    res = cfn["Resources"]
    alert = res["JobFailedRule"]["Properties"]["EventPattern"]
    fallback = res["SpotFallbackRule"]["Properties"]["EventPattern"]
    change, blocked = "Batch Job State Change", "Batch Job Queue Blocked"
    cases = [  # event, alerts?, resubmitted On-Demand?
        (_batch_event(change, "JobQueue", "FAILED", SPOT_CAPACITY_CANCEL), False, True),
        (_batch_event(change, "JobQueue", "FAILED", "Essential container in task exited"), True, False),
        (
            _batch_event(
                change,
                "JobQueue",
                "FAILED",
                "Canceled by JobStateTimeLimit action due to reason: "
                "MISCONFIGURATION:EC2_INSTANCE_CONFIGURATION_UNSUPPORTED",
            ),
            True,
            False,
        ),
        (_batch_event(change, "OnDemandJobQueue", "FAILED", SPOT_CAPACITY_CANCEL), True, False),
        (_batch_event(change, "OnDemandJobQueue", "FAILED", "Essential container in task exited"), True, False),
        (_batch_event(change, "JobQueue", "SUCCEEDED", "Essential container in task exited"), False, False),
        (_batch_event(blocked, "JobQueue", "RUNNABLE", "MISCONFIGURATION:SOMETHING_NEW"), True, False),
        # Waiting for Spot capacity is the expected way into the fallback, not an alert.
        (_batch_event(blocked, "JobQueue", "RUNNABLE", "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY"), False, False),
        (_batch_event(blocked, "OnDemandJobQueue", "RUNNABLE", "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY"), True, False),
        (_batch_event(change, "SomeOtherQueue", "FAILED", "Essential container in task exited"), False, False),
    ]
    for event, alerts, resubmitted in cases:
        assert _event_matches(alert, event) is alerts, event
        assert _event_matches(fallback, event) is resubmitted, event
    # Every blocked reason Batch documents is cancelled after a while on both queues, so such a job ends
    # FAILED (and alerts) instead of waiting forever; the blocked-queue event alerts the first time.
    documented = {
        "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY",
        "MISCONFIGURATION:COMPUTE_ENVIRONMENT_MAX_RESOURCE",
        "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT",
        "MISCONFIGURATION:EC2_INSTANCE_CONFIGURATION_UNSUPPORTED",
    }
    for queue in ("JobQueue", "OnDemandJobQueue"):
        actions = res[queue]["Properties"]["JobStateTimeLimitActions"]
        assert {a["Reason"] for a in actions} == documented, queue
        assert all(a["State"] == "RUNNABLE" and a["Action"] == "CANCEL" for a in actions)


def test_failures_the_job_cannot_report_reach_an_alert_topic(cfn: dict[str, Any]) -> None:
    """Item 11: a dead-letter queue on the schedule, Batch FAILED events to SNS, optional e-mail."""
    res = cfn["Resources"]
    target = res["Schedule"]["Properties"]["Target"]
    assert target["DeadLetterConfig"]["Arn"] == {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]}
    assert res["DeadLetterQueue"]["Type"] == "AWS::SQS::Queue"
    # Which events alert: test_alerts_fire_for_failures_and_blocked_queues_but_not_for_the_spot_fallback.
    rule = res["JobFailedRule"]["Properties"]
    assert rule["State"] == "ENABLED"
    (alert,) = rule["Targets"]
    assert alert["Arn"] == {"Ref": "AlertTopic"}
    paths = alert["InputTransformer"]["InputPathsMap"]
    assert paths["reason"] == "$.detail.statusReason" and paths["id"] == "$.detail.jobId"
    # The topic accepts exactly that rule's events, and the dead-letter alarm.
    statements = res["AlertTopicPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    principals = {st["Principal"]["Service"]: st for st in statements}
    assert principals["events.amazonaws.com"]["Condition"]["ArnEquals"]["aws:SourceArn"] == {
        "Fn::GetAtt": ["JobFailedRule", "Arn"]
    }
    assert "cloudwatch.amazonaws.com" in principals
    alarm = res["DeadLetterAlarm"]["Properties"]
    assert alarm["AlarmActions"] == [{"Ref": "AlertTopic"}]
    assert alarm["Dimensions"] == [{"Name": "QueueName", "Value": {"Fn::GetAtt": ["DeadLetterQueue", "QueueName"]}}]
    assert alarm["Threshold"] == 0 and alarm["ComparisonOperator"] == "GreaterThanThreshold"
    # Issue 24 item 9: an alarm notifies on a change of state only. On the queue's depth it would stay in
    # ALARM while a dead letter sits there (14 days), and later dead letters would pass in silence; on
    # the messages sent in each period it breaches for each new one and returns to OK in between.
    assert alarm["Namespace"] == "AWS/SQS"
    assert (alarm["MetricName"], alarm["Statistic"]) == ("NumberOfMessagesSent", "Sum")
    assert alarm["TreatMissingData"] == "notBreaching" and alarm["EvaluationPeriods"] == 1
    # Optional e-mail.
    assert cfn["Parameters"]["AlertEmail"]["Default"] == ""
    sub = res["AlertEmailSubscription"]
    assert sub["Condition"] == "HasAlertEmail" and sub["Properties"]["Protocol"] == "email"
    assert cfn["Conditions"]["HasAlertEmail"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "AlertEmail"}, ""]}]}
    assert "AlertTopicArn" in cfn["Outputs"]


def test_tools_are_a_set_up_step_and_the_checks_never_install(tmp_path: Path) -> None:
    """Issue #16: `make tools` before the tests; validate.sh without its venv stops, it does not fetch."""
    makefile = MAKEFILE.read_text(encoding="utf-8")
    assert re.search(r"^test: .*\btools\b", makefile, re.M), "make test must create the tools first"
    assert re.search(r"^infra-validate: .*\btools\b", makefile, re.M)
    assert re.search(r"^tools:\n\tbash infra/validate\.sh --install$", makefile, re.M)
    venv = tmp_path / "no-tools"
    env = {"PATH": os.environ["PATH"], "TOOLS_VENV": str(venv), "HOME": str(tmp_path)}
    result = subprocess.run(["bash", str(VALIDATE)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "make tools" in result.stderr
    assert not venv.exists(), "the checks must not create (or download into) the venv"
