"""Build-time step of the image: bake everything ultralytics would otherwise fetch at run time.

Run by the Dockerfile with network access and YOLO_CONFIG_DIR set (e.g. /opt/ultralytics):

    python docker/fetch_assets.py --weights-dir /opt/ultralytics/weights --work-dir /work \
        yolo11s.pt yolo26n.pt

1. writes ultralytics' settings.json under $YOLO_CONFIG_DIR/Ultralytics/ with sync and every
   integration off and ABSOLUTE weights/datasets/runs dirs (the defaults follow the CWD);
2. downloads the named weights into that weights_dir with ultralytics' own downloader (so the
   release URL always matches the installed ultralytics version) and checks each one loads;
3. places the fonts Arial.ttf and Arial.Unicode.ttf in $YOLO_CONFIG_DIR/Ultralytics/ (check_font
   looks there; the job's offline.prepare() would otherwise write them into that dir at run time,
   which a read-only root filesystem forbids);
4. writes assets.json (name, size, sha256 of each baked file) for provenance;
5. proves, in a fresh interpreter with YOLO_OFFLINE=true and network lookups disabled, that a bare
   name such as `yolo11s.pt` resolves to the baked file from an unrelated working directory.

Any failure exits non-zero, which fails the image build: an image that would try to download at
run time is never produced.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS_OFF = {
    "sync": False,
    "clearml": False,
    "comet": False,
    "dvc": False,
    "mlflow": False,
    "raytune": False,
    "tensorboard": False,
    "wandb": False,
    "vscode_msg": False,
    "openvino_msg": False,
    "api_key": "",
}

# Executed in a fresh interpreter: no network, bare names must resolve to the baked files.
_VERIFY = r"""
import socket, sys
def _no_network(*args, **kwargs):
    raise OSError("network disabled during the offline self-check")
socket.getaddrinfo = _no_network
socket.create_connection = _no_network
from pathlib import Path
from ultralytics.utils import SETTINGS, USER_CONFIG_DIR, WEIGHTS_DIR
from ultralytics.utils.checks import check_font
from ultralytics.utils.downloads import attempt_download_asset
for name in sys.argv[1:]:
    if name.startswith("font:"):
        font = check_font(name[5:])
        assert font is not None and Path(font).parent == USER_CONFIG_DIR, (name, font)
        print(f"offline: {name[5:]} -> {font}")
        continue
    path = attempt_download_asset(name)
    assert Path(path) == WEIGHTS_DIR / name and Path(path).is_file(), (name, path)
    print(f"offline: {name} -> {path}")
assert SETTINGS["sync"] is False, "settings sync is on"
"""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights-dir", type=Path, required=True, help="absolute dir for the weights")
    parser.add_argument(
        "--work-dir", type=Path, default=Path("/work"), help="absolute job work dir (datasets_dir, runs_dir)"
    )
    parser.add_argument(
        "--font",
        action="append",
        dest="fonts",
        help="font ultralytics' checks and plots ask for (repeatable; default Arial.ttf and Arial.Unicode.ttf)",
    )
    parser.add_argument("weights", nargs="+", help="weights names, e.g. yolo11s.pt yolo26n.pt")
    args = parser.parse_args(argv)
    args.fonts = args.fonts or ["Arial.ttf", "Arial.Unicode.ttf"]

    if not os.environ.get("YOLO_CONFIG_DIR"):
        parser.error("YOLO_CONFIG_DIR must be set (the image's ultralytics config root)")
    if not (args.weights_dir.is_absolute() and args.work_dir.is_absolute()):
        parser.error("--weights-dir and --work-dir must be absolute (ultralytics' defaults follow the CWD)")
    os.environ["YOLO_OFFLINE"] = "false"  # this step is the one that is allowed to download
    args.weights_dir.mkdir(parents=True, exist_ok=True)

    from ultralytics import YOLO
    from ultralytics.utils import SETTINGS, USER_CONFIG_DIR
    from ultralytics.utils.checks import check_font
    from ultralytics.utils.downloads import attempt_download_asset

    SETTINGS.update(
        weights_dir=str(args.weights_dir),
        datasets_dir=str(args.work_dir / "datasets"),
        runs_dir=str(args.work_dir / "runs"),
        **SETTINGS_OFF,
    )

    baked: list[Path] = []
    for name in args.weights:
        path = Path(attempt_download_asset(args.weights_dir / name))
        if not path.is_file():
            print(f"error: could not download {name}", file=sys.stderr)
            return 1
        YOLO(str(path))  # a truncated or foreign file fails here, not at run time
        baked.append(path)

    for name in args.fonts:
        font = check_font(name)
        if font is None or not Path(font).is_file() or Path(font).parent != USER_CONFIG_DIR:
            print(f"error: could not place {name} in {USER_CONFIG_DIR} (got {font})", file=sys.stderr)
            return 1
        baked.append(Path(font))

    manifest = [{"path": str(p), "bytes": p.stat().st_size, "sha256": sha256(p)} for p in baked]
    manifest_path = Path(os.environ["YOLO_CONFIG_DIR"]) / "assets.json"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    for entry in manifest:
        print(f"baked {entry['path']} {entry['bytes']} bytes sha256={entry['sha256']}")

    env = {**os.environ, "YOLO_OFFLINE": "true"}
    with tempfile.TemporaryDirectory() as cwd:  # a CWD without the weights: must use weights_dir
        verify_args = [*args.weights, *(f"font:{name}" for name in args.fonts)]
        subprocess.run([sys.executable, "-c", _VERIFY, *verify_args], cwd=cwd, env=env, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
