# pogona-train: the YOLO training job image (linux/amd64; NVIDIA GPU; the CPU only where no GPU was given).
#   docker build -t pogona-train:0.1.0 .
#   docker run --rm --gpus all --shm-size=8g --env-file job.env pogona-train:0.1.0
#   read-only, with the work dir in memory: the tmpfs must belong to the job's user (USER below), else
#   the job stops with exit 2 (podman's and docker's tmpfs are root-owned by default):
#   podman run --rm --device nvidia.com/gpu=all --shm-size=8g --read-only \
#     --tmpfs /work:rw,uid=10001,gid=10001,mode=0750 --env-file job.env pogona-train:0.1.0
#
# Base: the official PyTorch CUDA runtime image, pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
# (Ubuntu 22.04; conda's CPython 3.11 in /opt/conda, which holds torch 2.9.1 + torchvision 0.24.1
# built for CUDA 12.8 with the CUDA 12.8 / cuDNN 9 runtime libraries as nvidia-* wheels). The image
# keeps that torch stack as PyTorch built and tested it: docker/requirements.lock lists everything
# else, and a build-time assertion fails the build if the base ever carries another torch/CUDA.
# The host supplies the driver through the NVIDIA container toolkit; NVIDIA_REQUIRE_CUDA below
# makes a host whose driver is too old for CUDA 12.8 (< R570) refuse to start the container
# instead of silently training on the CPU. The toolkit's CDI mode does not check it
# (nvidia-container-toolkit#1470): there the job itself refuses a GPU it cannot use (exit 2).
#
# Builders: no `# syntax=` line, so BuildKit uses the Dockerfile frontend built into it and fetches no
# frontend image at build time (mirror-only and offline builders work). What this file uses beyond
# plain Dockerfile - `RUN --mount=type=bind` and `COPY --chmod` - is in that built-in frontend since
# Docker Engine 23 / BuildKit 0.11 (the default builder there), and in buildah/podman >= 4.
#
# Pinning: exact tag + digest. The digest is the one several public Dockerfiles record for this
# tag; it was NOT verified against Docker Hub from the offline environment this file was written
# in. Verify (or refresh) it with
#   docker buildx imagetools inspect pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
# A wrong digest cannot silently change the image: the pull fails. Only the first stage names the
# base; every later stage builds on it, so there is one pin to keep current.
#
# Stages: deps (base + the job's locked dependencies) <- assets (weights, fonts, settings) and
# builder (the job's wheel) <- runtime. The runtime is FROM deps, not a fresh base plus a copied
# environment: it needs the base's /opt/conda (torch, CUDA: most of the image) anyway, and deps
# leaves nothing worth dropping (no pip cache, no compiler), so copying would only duplicate
# layers. The side stages exist for the build cache (a code change neither re-downloads the
# weights nor reinstalls the lock) and to keep downloader and build leftovers out of the runtime.

# ---------------------------------------------------------------------------------------------
# deps: the job's dependencies from the exact lock, on top of the base's torch; changes rarely
# ---------------------------------------------------------------------------------------------
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime@sha256:7b324d212a4450795b49edba9949b7cdc72429148a64e974334bfe5774d51385 AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY docker/requirements.lock docker/requirements.lock
# /opt/venv: a venv of the base's Python with --system-site-packages, so torch/torchvision (and
# the CUDA wheels) come from /opt/conda while the lock's packages land in the venv, shadowing any
# older copy there. Installing into /opt/conda itself would make pip replace conda-installed
# packages (numpy, pyyaml, requests, ...), which fails on those without a RECORD file and would
# change the base's own tooling. --without-pip: the venv runs the base's pip (visible through the
# system site-packages) and needs no ensurepip.
# --no-deps: the lock plus the base is the complete closure. --require-hashes: each file must have
# the sha256 the lock records, so a re-uploaded or substituted artifact fails the build. Whether
# the closure is consistent (every requirement of the job and its dependencies, torch/torchvision
# from the base included) is checked once the job is installed (runtime stage, docker/check_env.py);
# `pip check` is not used: it also judges the base's own conda packages, which the job never runs,
# against the lock's newer versions of shared packages.
RUN /opt/conda/bin/python -m venv --system-site-packages --without-pip /opt/venv \
 && /opt/venv/bin/python -m pip install --no-cache-dir --no-deps --require-hashes -r docker/requirements.lock \
 && /opt/venv/bin/python -c "import sys, torch, torchvision; \
assert sys.version_info[:2] == (3, 11), sys.version; \
assert torch.__version__.startswith('2.9.1') and torch.version.cuda == '12.8', (torch.__version__, torch.version.cuda); \
assert torchvision.__version__.startswith('0.24.1'), torchvision.__version__; \
assert torch.__file__.startswith('/opt/conda/'), torch.__file__"

# ---------------------------------------------------------------------------------------------
# assets: what ultralytics would download at run time, fetched once, at build time
# (FROM deps, not builder: a code change does not re-download the weights)
# ---------------------------------------------------------------------------------------------
FROM deps AS assets
ENV YOLO_CONFIG_DIR=/opt/ultralytics
COPY docker/fetch_assets.py docker/fetch_assets.py
# yolo11s.pt: the default POGONA_MODEL; yolo26n.pt: the model ultralytics' AMP check loads on CUDA;
# Arial.ttf + Arial.Unicode.ttf: the fonts its dataset checks and plots ask for. Settings: sync and
# integrations off, absolute weights/datasets/runs dirs. The script proves offline resolution.
RUN /opt/venv/bin/python docker/fetch_assets.py \
      --weights-dir /opt/ultralytics/weights --work-dir /work yolo11s.pt yolo26n.pt

# ---------------------------------------------------------------------------------------------
# builder: the job's wheel (its sources and build tree stay in this stage)
# ---------------------------------------------------------------------------------------------
FROM deps AS builder
COPY pyproject.toml README.md ./
COPY pogona_job ./pogona_job
# --no-build-isolation: build with the setuptools pinned in the lock (no unpinned fetch).
RUN /opt/venv/bin/python -m pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /dist .

# ---------------------------------------------------------------------------------------------
# runtime
# ---------------------------------------------------------------------------------------------
FROM deps AS runtime

# Build info (ARG/LABEL/ENV) comes LAST in this stage: BUILD_DATE changes on every build, and every
# RUN after an ARG depends on its value, so declaring these earlier would re-run apt, the user
# creation and the wheel install each time (tests/test_infra.py checks the order).
# tini as PID 1: forwards SIGTERM to the job (which checkpoints and exits 143) and reaps zombies
# left by dataloader workers. Pinned to Ubuntu 22.04's (jammy, universe) package version.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini=0.19.0-1 \
 && rm -rf /var/lib/apt/lists/*

# Unprivileged user with a fixed numeric UID/GID (Kubernetes runAsNonRoot can only verify a
# numeric USER) and the job's writable work dir.
RUN groupadd --system --gid 10001 pogona \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/pogona --create-home \
      --shell /usr/sbin/nologin pogona \
 && install -d -o 10001 -g 10001 -m 0750 /work

# Everything baked stays root-owned and read-only to the job, as under a read-only root filesystem:
# the entrypoint gives ultralytics a writable copy of its config dir in the work dir (settings.json,
# and the DDP scratch files of multi-GPU training, Ultralytics/DDP).
COPY --from=assets /opt/ultralytics/weights /opt/ultralytics/weights
COPY --from=assets /opt/ultralytics/assets.json /opt/ultralytics/assets.json
COPY --from=assets /opt/ultralytics/Ultralytics /opt/ultralytics/Ultralytics

# The job itself, into the same venv (the wheel is mounted from builder, not copied into a layer),
# then the check that its whole closure is installed at versions that satisfy every requirement.
RUN --mount=type=bind,from=builder,source=/dist,target=/tmp/dist \
    --mount=type=bind,source=docker/check_env.py,target=/tmp/check_env.py \
    /opt/venv/bin/python -m pip install --no-cache-dir --no-deps /tmp/dist/*.whl \
 && /opt/venv/bin/python /tmp/check_env.py pogona-train \
 && /opt/venv/bin/pogona-job --help > /dev/null
COPY --chmod=0755 docker/entrypoint.sh /app/docker/entrypoint.sh

# OMP_NUM_THREADS=1, as ultralytics' own image (and its __init__ when unset): one OpenMP thread per
# process, so N dataloader workers (processes, sized from the CPU count) do not oversubscribe the
# CPUs; ultralytics resets torch's thread count itself when it trains on the CPU.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MKL_THREADING_LAYER=GNU \
    YOLO_OFFLINE=true \
    YOLO_CONFIG_DIR=/opt/ultralytics \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    OMP_NUM_THREADS=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=12.8" \
    POGONA_WORK_DIR=/work

WORKDIR /work
USER 10001:10001

# A batch job has no endpoint to probe: its liveness is its exit code (see the exit-code table).
HEALTHCHECK NONE

ENTRYPOINT ["/usr/bin/tini", "--", "/app/docker/entrypoint.sh"]
CMD ["run"]

# --- build info: last, so that a new BUILD_DATE or commit invalidates only these metadata layers ---
ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
ARG SOURCE_URL=unknown
LABEL org.opencontainers.image.title="pogona-train" \
      org.opencontainers.image.description="YOLO training job with a sanity gate: pull from S3, prove the model learns, train, publish." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.base.name="docker.io/pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime" \
      org.opencontainers.image.base.digest="sha256:7b324d212a4450795b49edba9949b7cdc72429148a64e974334bfe5774d51385"
# The same facts for the job itself (manifest/report): not POGONA_*, which the job would reject as unknown.
ENV IMAGE_VERSION="${VERSION}" \
    IMAGE_VCS_REF="${VCS_REF}" \
    IMAGE_BUILD_DATE="${BUILD_DATE}"
