"""A small trained detector shared by the evaluation, export and promotion tests.

From scratch, yolo11n at 128 px scores mAP@0.5 ~0 for its first epochs; about 30 epochs on the
48-image demo (measured: ~30 s on 2 CPU cores) give a model with non-trivial, unequal metrics, so that
the equalities tested below are not 0 == 0. Two classes (each image's heads get one of two class ids by
file name), so the per-class table has something to show. Cached on disk for the session.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from pogona_job.dataset import StagedDataset, inspect_dataset, stage_dataset
from pogona_job.tools.demo import write_demo

NAMES = ["pogona_head", "other_head"]
EPOCHS = 30


def two_class_demo(dest: Path, n_images: int = 48) -> Path:
    write_demo(dest, n_images=n_images, size=128, seed=0)
    for label in sorted((dest / "labels").glob("*.txt")):
        cls = hashlib.sha256(label.stem.encode()).digest()[0] % 2
        lines = [f"{cls} {line.split(' ', 1)[1]}" for line in label.read_text().splitlines() if line.strip()]
        label.write_text("".join(f"{line}\n" for line in lines))
    return dest


def stage(raw: Path, dest: Path) -> StagedDataset:
    if dest.exists():
        shutil.rmtree(dest)
    return stage_dataset(inspect_dataset(raw, NAMES), dest, NAMES)


def trained_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(best.pt, raw dataset folder), trained once per session, whichever xdist worker asks first: the
    others wait on the lock and find it done. Each xdist worker has its own base temp folder
    (.../popen-gwN); their parent is the session's, which every worker sees."""
    temp = tmp_path_factory.getbasetemp()
    base = (temp.parent if os.environ.get("PYTEST_XDIST_WORKER") else temp) / "ship-model"
    base.mkdir(parents=True, exist_ok=True)
    with (base.parent / "ship-model.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when this process dies
        return _train_once(base)


def _train_once(base: Path) -> tuple[Path, Path]:
    raw = base / "raw"
    best = base / "train" / "weights" / "best.pt"
    done = base / "trained"  # written last: best.pt alone may be an interrupted training's
    if done.exists():
        return best, raw
    for folder in (raw, base / "train"):
        shutil.rmtree(folder, ignore_errors=True)
    two_class_demo(raw)
    staged = stage(raw, base / "staged-train")
    from ultralytics import YOLO

    YOLO("yolo11n.yaml").train(
        data=str(staged.data_yaml),
        epochs=EPOCHS,
        imgsz=128,
        batch=8,
        device="cpu",
        workers=0,
        plots=False,
        project=str(base),
        name="train",
        exist_ok=True,
        seed=0,
        optimizer="AdamW",
        lr0=0.002,
    )
    done.touch()
    return best, raw
