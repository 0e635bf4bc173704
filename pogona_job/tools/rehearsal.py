"""`make run-local`: the whole cloud job rehearsed on this machine, on the CPU.

Starts a SeaweedFS S3 server on loopback (unless AWS_ENDPOINT_URL_S3 is given), puts the
demo dataset in its bucket (unless POGONA_DATASET_URI is given), runs `pogona-job run`
with demo-sized settings, copies the outputs next to you, prints where everything is and
the commands to try next.

The server and its bucket are kept in `.run-local/s3/` and left running, so those commands work
and the next `make run-local` re-uses them (its champion decision then compares two runs).
`make run-local-stop` stops the server and removes `.run-local/`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

BUCKET = "pogona-demo"
# Demo-sized: a small model trained from scratch (no pretrained weights offline), small images.
DEMO_SETTINGS = {
    "POGONA_MODEL": "yolo11n.yaml",
    "POGONA_EPOCHS": "40",
    "POGONA_SANITY_EPOCHS": "3",
    "POGONA_IMGSZ": "160",
    "POGONA_BATCH": "16",
    "POGONA_DEVICE": "cpu",
    "POGONA_RUN_ID": "",
}


KEPT = ".run-local"  # under the folder `make` runs in: the repository root


def main(argv: list[str] | None = None) -> int:
    here = Path.cwd() / KEPT
    if (sys.argv[1:] if argv is None else argv) == ["--stop"]:
        return stop(here)
    env = dict(os.environ)
    own_server = False
    if not (env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")):
        from pogona_job.tools.locals3 import running, start_kept

        (here / "s3").mkdir(parents=True, exist_ok=True)
        s3 = running(here / "s3", [BUCKET])
        if s3 is None:
            print(f"Starting a local SeaweedFS S3 server on loopback (bucket kept in {here / 's3'}) ...", flush=True)
            s3 = start_kept(here / "s3", [BUCKET])
        else:
            print(f"Re-using the local S3 server left running on {here / 's3'} ...", flush=True)
        env.update(s3.env)
        own_server = True
        print(f"  S3 endpoint {s3.endpoint}, bucket {BUCKET} (credentials limited to it)", flush=True)
    for key, value in DEMO_SETTINGS.items():
        env.setdefault(key, value)
    if not env["POGONA_RUN_ID"]:
        env["POGONA_RUN_ID"] = "local-" + time.strftime("%Y%m%d-%H%M%S")
    env.setdefault("POGONA_OUTPUT_URI", f"s3://{BUCKET}/runs")
    env.setdefault("POGONA_WORK_DIR", str(here / "work"))
    env.setdefault("POGONA_LOG_FORMAT", "console")
    if "POGONA_DATASET_URI" not in env:
        env["POGONA_DATASET_URI"] = f"s3://{BUCKET}/datasets/demo"
        demo = here / "demo-dataset"
        print(f"Writing the synthetic demo dataset to {demo} and pushing it to the bucket ...", flush=True)
        _job(["dataset", "demo", str(demo)], env)
        _job(["dataset", "push", str(demo)], env)  # unchanged files are not uploaded again
    if env["POGONA_MODEL"].endswith(".yaml"):
        print(f"Training {env['POGONA_MODEL']} FROM SCRATCH (no pretrained weights offline) on the CPU.", flush=True)
    start = time.monotonic()
    code = _job(["run"], env, check=False)
    minutes = (time.monotonic() - start) / 60
    outputs = f"{env['POGONA_OUTPUT_URI']}/{env['POGONA_RUN_ID']}"
    local = here / "outputs" / env["POGONA_RUN_ID"]
    pulled = _job(["dataset", "pull", str(local)], {**env, "POGONA_DATASET_URI": outputs}, check=False)
    print()
    print(f"Job exited {code} after {minutes:.1f} min.")
    print(f"  Outputs in the bucket: {outputs}/")
    if pulled == 0:
        print(f"  Local copy:            {local}/  (open report.html there)")
        _summary(local)
    if own_server:
        _next_steps(here, env, local)
    return code


def stop(here: Path) -> int:
    from pogona_job.tools.locals3 import stop_kept

    stopped = stop_kept(here / "s3")
    shutil.rmtree(here, ignore_errors=True)
    print(f"{'Stopped the local S3 server' if stopped else 'No local S3 server was running'}; removed {here}/.")
    return 0


def _next_steps(here: Path, env: dict[str, str], local: Path) -> None:
    """The server stays up: its variables go to a file to source, then what to try."""
    keys = ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "POGONA_OUTPUT_URI")
    env_file = here / "env.sh"
    env_file.write_text("".join(f"export {k}={shlex.quote(env[k])}\n" for k in keys if k in env))
    job = f"{Path(sys.executable).parent}/pogona-job"
    run_id = env["POGONA_RUN_ID"]
    print()
    print(f"The local S3 server keeps running (its bucket is in {here / 's3'}). Next, try:")
    print(f"  source {env_file}")
    print(f"  {job} runs                       # every run here, the champion marked")
    print(f"  {job} runs show {run_id}")
    print(f"  {job} predict --model {run_id} {here / 'demo-dataset' / 'images'} {here / 'predicted'}")
    print(f"  open {local / 'report.html'}   # any browser: the page is self-contained")
    print("  make run-local                  # a second run: see its champion decision against this one")
    print("  make run-local-stop             # stop the server and remove .run-local/")


def _job(args: list[str], env: dict[str, str], *, check: bool = True) -> int:
    code = subprocess.call([sys.executable, "-m", "pogona_job", *args], env=env)
    if check and code != 0:
        # A job error has printed its sentence; a death by a signal (a negative code here) printed nothing,
        # and SystemExit(-6) would leave make showing a bare "Error 250".
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            print(f"`pogona-job {args[0]} {args[1]}` was killed by {name}; the rehearsal stops here.", file=sys.stderr)
        raise SystemExit(code if code > 0 else 128 - code)
    return code


def _summary(local: Path) -> None:
    import json

    manifest = local / "manifest.json"
    if not manifest.exists():
        return
    from pogona_job.evaluation.headline import Headline

    data = json.loads(manifest.read_text())
    head = Headline.from_dict(data.get("metrics") or {})
    print(f"  Status: {data.get('status')}", end="")
    print(f"; {head.line()}" if head else f"; {data.get('failure')}")
    if head and data.get("failure"):
        print(f"  {data['failure']}")


if __name__ == "__main__":
    raise SystemExit(main())
