"""`make run-local`: the whole cloud job rehearsed on this machine, on the CPU.

Starts a SeaweedFS S3 server on loopback (unless AWS_ENDPOINT_URL_S3 is given), puts the
demo dataset in its bucket (unless POGONA_DATASET_URI is given), runs `pogona-job run`
with demo-sized settings, copies the outputs next to you, prints where everything is,
and stops what it started.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import ExitStack
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


def main() -> int:
    here = Path.cwd() / ".run-local"
    env = dict(os.environ)
    started_server = False
    with ExitStack() as stack:
        if not (env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")):
            from pogona_job.tools.locals3 import LocalS3

            print("Starting a local SeaweedFS S3 server on loopback ...", flush=True)
            s3 = stack.enter_context(LocalS3(buckets=[BUCKET]))
            env.update(s3.env)
            started_server = True
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
            _job(["dataset", "push", str(demo)], env)
        if env["POGONA_MODEL"].endswith(".yaml"):
            print(
                f"Training {env['POGONA_MODEL']} FROM SCRATCH (no pretrained weights offline) on the CPU.", flush=True
            )
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
            print(f"  Local copy:            {local}/  (read report.md there)")
            _summary(local)
    if started_server:
        print("Stopped the local S3 server.")
    return code


def _job(args: list[str], env: dict[str, str], *, check: bool = True) -> int:
    code = subprocess.call([sys.executable, "-m", "pogona_job", *args], env=env)
    if check and code != 0:
        raise SystemExit(code)
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
