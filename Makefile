# pogona-train - every command sets up what it needs (see README).
VENV       ?= .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
# This machine's pip serves torch 2.14.1 from local disk; elsewhere override (TORCH_SPEC=) to take pyproject's range.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
export YOLO_OFFLINE := true

.PHONY: setup tools chromium run-local run-local-stop test unit lint format readme schema infra-validate bench bench-stats mutants gpu-proof docker-build docker-run docker-push clean

setup: $(STAMP)

# torch with pip (this machine's pip serves it from local disk; uv would download a 3 GB CUDA build); everything
# else with uv, whose parallel downloads and installs take seconds where pip took 40 s. uv keeps the installed
# torch, which satisfies the range. Both compile .pyc at install: where PYTHONDONTWRITEBYTECODE is set (as
# on this machine) no process writes them later, and every interpreter the tests start would compile
# ultralytics again (measured: 50 s more of the suite's wall time).
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q $(TORCH_SPEC); fi
	$(PY) -m pip install -q uv
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -e '.[dev]'
	@touch $(STAMP)

# Leaves its SeaweedFS server running on .run-local/s3 (the bucket survives; the next call re-uses it) and
# prints the commands to try next; `make run-local-stop` stops the server and removes the folder.
run-local: setup
	$(PY) -m pogona_job.tools.rehearsal

run-local-stop:  # stdlib only: works without the venv too
	@$(if $(wildcard $(PY)),$(PY),python3) -m pogona_job.tools.rehearsal --stop

# Headless Chromium (Debian's package) for the report.html browser test; CI fails without it.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	  { echo "Could not install chromium (apt-get as root): the report.html browser test needs it." >&2; exit 1; }

# Tests run in random order (pytest-randomly; `-p randomly` fails loudly if it is missing). pytest prints
# "Using --randomly-seed=N" first: reproduce an order with  make test PYTEST_ARGS="-p randomly --randomly-seed=N".
# TEST_WORKERS=N spreads the test files over N pytest-xdist workers (a whole file per worker, so its module
# fixtures run once; 0: one process). Two by default, one per core: in a fresh clone on this 2-core machine
# the 841 tests took 413-458 s with two workers and 441 s with three (the suite is CPU-bound: no gain).
TEST_WORKERS ?= 2
test: setup tools
	@$(PY) -m pytest -p randomly -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS) || { code=$$?; [ $$code -ne 5 ] || echo "pytest ran no tests: that is a failure." >&2; exit $$code; }
	$(MAKE) --no-print-directory infra-validate

# The fast loop (< 2 min): every test that neither trains nor starts the job or a script as a process
# (the `slow` marker; tests/conftest.py derives it from what each test calls). A test that takes over
# 10 s here fails, named, so the loop stays fast. `make test` runs everything, these included.
unit: setup tools
	@$(PY) -m pytest -p randomly -m "not slow" -q $(PYTEST_ARGS) || { code=$$?; [ $$code -ne 5 ] || echo "pytest ran no tests: that is a failure." >&2; exit $$code; }

# The GPU proof (benchmarks/README.md): the job vs bare ultralytics on this machine's GPU, the parity
# probe on the device, the gate against the MPS signature; writes BENCHMARKS.md's GPU section.
#   make gpu-proof GPU_PROOF_ARGS=--tiny   (every step on the CPU, as the tests run it)
GPU_PROOF_ARGS ?=
gpu-proof: setup
	PY=$(PY) bash benchmarks/gpu_proof.sh $(GPU_PROOF_ARGS)

# Mutation testing (mutmut) of gate.py, checkpoint.py, the dataset rules and storage's error mapping, each
# against only the tests that specify it; prints every survivor and records the counts in BENCHMARKS.md
# (section mutants.py). Minutes per module: not part of `make test`.
#   make mutants MUTANTS="gate storage"   (default: all four)   MUTANTS_ARGS=--show prints each diff
MUTANTS ?=
MUTANTS_ARGS ?=
mutants: setup
	@$(PY) -c "import mutmut" 2>/dev/null || $(PY) -m pip install -q -e '.[dev,mutants]'
	$(PY) .ci/mutants.py --write $(MUTANTS_ARGS) $(MUTANTS)

lint: setup
	$(VENV)/bin/ruff check pogona_job tests benchmarks
	$(VENV)/bin/ruff format --check pogona_job tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: setup
	$(VENV)/bin/ruff format pogona_job tests benchmarks
	$(VENV)/bin/ruff check --fix pogona_job tests benchmarks

# Regenerate docs/variables.md's table from the settings class (a test fails when they drift).
readme: setup
	$(PY) -m pogona_job.config --update-readme docs/variables.md

# Regenerate docs/manifest.schema.json from pogona_job/run/manifest.py (a test fails when they drift).
schema: setup
	$(PY) -m pogona_job.run.manifest docs/manifest.schema.json

# The validators' own venv (.venv-tools): the one step that needs the package index, done before
# the tests so that neither pytest nor infra/validate.sh reaches PyPI mid-run.
tools:
	bash infra/validate.sh --install

infra-validate: tools
	bash infra/validate.sh

bench: setup
	$(PY) benchmarks/bench.py

# Interval coverage and the A/A promotion test (issue #21): simulated per-image results, ~10 min on 2 cores;
# rewrites the coverage_bench.py section of BENCHMARKS.md.
bench-stats: setup
	$(PY) benchmarks/coverage_bench.py --write

IMAGE    ?= pogona-train
TAG      ?= 0.1.0-$(shell git rev-parse --short HEAD 2>/dev/null || echo dev)$(shell git diff --quiet HEAD 2>/dev/null || echo -dirty)
ENV_FILE ?= pogona.env
DOCKER_OK = @docker info >/dev/null 2>&1 || { echo "No Docker engine is running here: start Docker (or use a machine with one) to $@." >&2; exit 1; }

docker-build:
	$(DOCKER_OK)
	docker build --pull --platform linux/amd64 \
	  --build-arg VERSION="$(TAG)" --build-arg VCS_REF="$$(git rev-parse HEAD)" \
	  --build-arg BUILD_DATE="$$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
	  --build-arg SOURCE_URL="$$(git remote get-url origin 2>/dev/null || echo unknown)" \
	  -t $(IMAGE):$(TAG) .

docker-run:
	$(DOCKER_OK)
	@test -f "$(ENV_FILE)" || { echo "No $(ENV_FILE): write POGONA_* and AWS_* variables there (or ENV_FILE=...)." >&2; exit 1; }
	docker run --rm --gpus all --shm-size=8g --env-file $(ENV_FILE) $(IMAGE):$(TAG)

docker-push:
	$(DOCKER_OK)
	@test -n "$(REGISTRY)" || { echo "Set REGISTRY=<account>.dkr.ecr.<region>.amazonaws.com (or another registry)." >&2; exit 1; }
	@case "$(TAG)" in *-dirty) echo "Refusing to push a -dirty tag: ECR tags are immutable; commit first." >&2; exit 1;; esac
	docker tag $(IMAGE):$(TAG) $(REGISTRY)/$(IMAGE):$(TAG)
	docker push $(REGISTRY)/$(IMAGE):$(TAG)

clean:
	rm -rf .run-local .bench .pytest_cache .mypy_cache .ruff_cache mutants
