#!/bin/sh
# Entrypoint of the pogona-train image: `docker run IMAGE [SUBCOMMAND ARGS...]`.
#
# Runs under tini (PID 1) in the image, and just as well directly on a dev machine
# (`PATH=.venv/bin:$PATH docker/entrypoint.sh config`): nothing here needs the container.
#
# - defaults the environment ultralytics needs to stay offline and quiet about DDP threading,
#   without overriding anything the caller set;
# - `exec`s the job, so the job (not a shell) receives SIGTERM and its exit code is the
#   container's: 0 ok, 2 config, 3 dataset, 4 storage, 5 sanity gate, 6 training,
#   75 transient (retry), 143 stopped after a checkpoint (retry resumes).
# It sets no POGONA_* variable: the job rejects unknown ones, and defaults belong to the job.
set -eu

: "${YOLO_OFFLINE:=true}"        # no DNS probe, update check, analytics or Sentry at run time
: "${MKL_THREADING_LAYER:=GNU}"  # avoids the MKL/libgomp clash in multi-process (DDP) training
: "${PYTHONUNBUFFERED:=1}"       # log lines reach `docker logs` / CloudWatch immediately
export YOLO_OFFLINE MKL_THREADING_LAYER PYTHONUNBUFFERED

# The image bakes ultralytics' settings, font and weights under /opt/ultralytics and sets
# YOLO_CONFIG_DIR to it. Elsewhere, use that dir only if it exists; otherwise leave the choice
# of a job-owned config dir to the job.
baked_config=/opt/ultralytics
if [ -z "${YOLO_CONFIG_DIR:-}" ] && [ -f "$baked_config/Ultralytics/settings.json" ]; then
    YOLO_CONFIG_DIR=$baked_config
    export YOLO_CONFIG_DIR
fi

# No arguments: run the whole job (the contract's default subcommand).
if [ "$#" -eq 0 ]; then
    set -- run
fi

if command -v pogona-job >/dev/null 2>&1; then
    exec pogona-job "$@"
fi
# A checkout without the console script on PATH: the module form is equivalent.
exec python3 -m pogona_job "$@"
