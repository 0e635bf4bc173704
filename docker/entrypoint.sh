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

# The image bakes ultralytics' settings, fonts and weights under /opt/ultralytics and sets
# YOLO_CONFIG_DIR to it. But ultralytics also WRITES under $YOLO_CONFIG_DIR/Ultralytics while it
# runs - the DDP launcher's script and state for multi-GPU training (Ultralytics/DDP), settings.json
# when it changes - and with a read-only root filesystem (Kubernetes readOnlyRootFilesystem) that
# fails. So ultralytics gets a config dir in the job's work dir (a writable volume everywhere the job
# runs): the baked settings.json copied (its weights_dir still names the baked weights), the fonts
# linked (only ever read). The baked dir itself stays read-only. A YOLO_CONFIG_DIR the caller chose
# is left alone; outside the image (no baked settings) the job picks its own dir.
baked_config=${IMAGE_ULTRALYTICS_DIR:-/opt/ultralytics}
if [ "${YOLO_CONFIG_DIR:-$baked_config}" = "$baked_config" ] && [ -f "$baked_config/Ultralytics/settings.json" ]; then
    state=${POGONA_WORK_DIR:-/work}/.ultralytics
    YOLO_CONFIG_DIR=$baked_config
    if mkdir -p "$state/Ultralytics" 2>/dev/null &&
        cp "$baked_config/Ultralytics/settings.json" "$state/Ultralytics/settings.json" 2>/dev/null; then
        for font in "$baked_config"/Ultralytics/*.ttf; do
            if [ -f "$font" ]; then ln -sf "$font" "$state/Ultralytics/"; fi
        done
        YOLO_CONFIG_DIR=$state
    fi  # else the work dir is not writable: the job itself stops on that with a clear exit 2
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
