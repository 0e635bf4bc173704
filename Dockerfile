# syntax=docker/dockerfile:1.7
#
# pogona-train: the YOLO training job image (linux/amd64; NVIDIA GPU, falls back to CPU).
#   docker build -t pogona-train:0.1.0 .
#   docker run --rm --gpus all --shm-size=8g --env-file job.env pogona-train:0.1.0
#
# Base: the official Python 3.11 image on Debian 12 (the interpreter and OS the lock file was
# resolved on). The CUDA runtime is NOT taken from an nvidia/cuda base: the PyPI torch wheel
# pinned in docker/requirements.lock ships it (nvidia-cuda-runtime, cublas, cudnn, nccl, ... for
# CUDA 13.0), so a CUDA base image would only add a second, possibly mismatching, copy of the
# same libraries (GBs). The host supplies the driver through the NVIDIA container toolkit;
# NVIDIA_REQUIRE_CUDA below makes a host whose driver is too old (< R580 for CUDA 13) refuse to
# start the container instead of silently training on the CPU.
#
# Pinning: exact tag + digest. The digest is the one several public Dockerfiles record for this
# tag; it was NOT verified against Docker Hub from the offline environment this file was written in.
# Verify (or refresh) it with `docker buildx imagetools inspect python:3.11.14-slim-bookworm`.
# A wrong digest cannot silently change the image: the pull fails. Both FROM lines below name
# the same image, spelled out so that scanners and update bots see the pin (tests check they match).

# ---------------------------------------------------------------------------------------------
# deps: the job's virtualenv from the exact lock (no resolver at build time); changes rarely
# ---------------------------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY docker/requirements.lock docker/requirements.lock
# --no-deps: the lock is the complete closure; `pip check` proves it is consistent.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps -r docker/requirements.lock \
 && /opt/venv/bin/pip check

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
# builder: the job itself, into the same venv
# ---------------------------------------------------------------------------------------------
FROM deps AS builder
COPY pyproject.toml README.md ./
COPY pogona_job ./pogona_job
# --no-build-isolation: build with the pinned setuptools already in the venv (no unpinned fetch).
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation . \
 && /opt/venv/bin/pogona-job --help > /dev/null

# ---------------------------------------------------------------------------------------------
# runtime
# ---------------------------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS runtime

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
      org.opencontainers.image.base.name="docker.io/library/python:3.11.14-slim-bookworm"

# tini as PID 1: forwards SIGTERM to the job (which checkpoints and exits 143) and reaps zombies
# left by dataloader workers. Pinned to the Debian 12 amd64 build.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
 && rm -rf /var/lib/apt/lists/*

# Unprivileged user with a fixed numeric UID/GID (Kubernetes runAsNonRoot can only verify a
# numeric USER) and the job's writable work dir.
RUN groupadd --system --gid 10001 pogona \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/pogona --create-home \
      --shell /usr/sbin/nologin pogona \
 && install -d -o 10001 -g 10001 -m 0750 /work

COPY --from=builder /opt/venv /opt/venv
# Weights stay root-owned (read-only to the job); the config dir is the job's (settings, DDP files).
COPY --from=assets /opt/ultralytics/weights /opt/ultralytics/weights
COPY --from=assets /opt/ultralytics/assets.json /opt/ultralytics/assets.json
COPY --from=assets --chown=10001:10001 /opt/ultralytics/Ultralytics /opt/ultralytics/Ultralytics
COPY --chmod=0755 docker/entrypoint.sh /app/docker/entrypoint.sh

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MKL_THREADING_LAYER=GNU \
    YOLO_OFFLINE=true \
    YOLO_CONFIG_DIR=/opt/ultralytics \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0" \
    POGONA_WORK_DIR=/work

WORKDIR /work
USER 10001:10001

# A batch job has no endpoint to probe: its liveness is its exit code (see the exit-code table).
HEALTHCHECK NONE

ENTRYPOINT ["/usr/bin/tini", "--", "/app/docker/entrypoint.sh"]
CMD ["run"]
