"""`pogona-job predict`: a trained model on new images, from and to local folders or S3 prefixes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pogona_job.evaluation.inference import iou_matrix
from tests.conftest import BUCKET, ROOT, job_env, out_key, run_here
from tests.ship_models import trained_model

LOW = 0.02  # the shared test model (tests/ship_models.py) is weak: its boxes score below 0.25


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return trained_model(tmp_path_factory)


@pytest.fixture(scope="module")
def onnx_model(model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pogona_job.evaluation import export

    work = tmp_path_factory.mktemp("predict-onnx")
    weights = work / "best.pt"
    shutil.copy(model[0], weights)
    return export.export_onnx(weights, imgsz=128, device="cpu")


@pytest.fixture(scope="module")
def images(model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight demo images in a folder of their own (one in a subfolder), as a user's new photos would be."""
    folder = tmp_path_factory.mktemp("new-photos")
    for i, src in enumerate(sorted((model[1] / "images").glob("*"))[:8]):
        dest = folder / ("site-b" if i == 7 else "") / src.name
        dest.parent.mkdir(exist_ok=True)
        shutil.copy(src, dest)
    return folder


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _labels_xyxy(raw: Path, name: str, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    rows = [
        list(map(float, line.split()[1:5]))
        for line in (raw / "labels" / f"{Path(name).stem}.txt").read_text().splitlines()
    ]
    return np.array(
        [[(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h] for cx, cy, bw, bh in rows]
    )


def test_predict_with_a_local_best_pt_writes_annotated_images_and_ultralytics_boxes(
    s3: Any, model: tuple[Path, Path], images: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "out"
    result = run_here(
        ["predict", "--model", str(model[0]), "--conf", str(LOW), str(images), str(dest)], job_env(s3, tmp_path)
    )
    assert result.code == 0, result.stderr
    progress = [json.loads(line) for line in result.stdout.splitlines()]
    assert [p["done"] for p in progress if p["event"] == "predicted"] == list(range(1, 9))  # JSON lines off a TTY
    assert progress[-1]["event"] == "done" and progress[-1]["images"] == 8
    rows = _jsonl(dest / "predictions.jsonl")
    inputs = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.*"))
    assert sorted(r["file"] for r in rows) == inputs
    from ultralytics import YOLO

    reference = YOLO(str(model[0]))
    boxes = 0
    for row in rows:
        annotated, original = Image.open(dest / row["file"]), Image.open(images / row["file"])
        assert annotated.size == original.size == (row["width"], row["height"])
        assert all(b["confidence"] >= LOW for b in row["boxes"])
        if row["boxes"]:
            assert np.asarray(annotated.convert("RGB")).tolist() != np.asarray(original.convert("RGB")).tolist()
        # The same boxes as ultralytics' own predict at the same confidence.
        theirs = reference.predict(str(images / row["file"]), conf=LOW, imgsz=128, verbose=False)[0].boxes
        ours = np.array([b["xyxy"] for b in row["boxes"]]).reshape(-1, 4)
        assert np.allclose(ours, theirs.xyxy.numpy().reshape(-1, 4), atol=0.01)
        assert [b["class"] for b in row["boxes"]] == [reference.names[int(c)] for c in theirs.cls]
        boxes += len(ours)
    assert boxes >= 3, "the test model predicts something on these images"


def test_predict_defaults_to_pogona_conf(s3: Any, model: tuple[Path, Path], images: Path, tmp_path: Path) -> None:
    """The shared test model is weak: at 0.25 it keeps nothing; at POGONA_CONF=0.02 what --conf 0.02 keeps."""
    env = job_env(s3, tmp_path)
    default = run_here(["predict", "--model", str(model[0]), str(images), str(tmp_path / "a")], env)
    lowered = run_here(
        ["predict", "--model", str(model[0]), str(images), str(tmp_path / "b")], {**env, "POGONA_CONF": str(LOW)}
    )
    assert json.loads(default.stdout.splitlines()[-1])["conf"] == 0.25
    assert json.loads(lowered.stdout.splitlines()[-1])["conf"] == LOW
    assert all(b["confidence"] >= 0.25 for r in _jsonl(tmp_path / "a" / "predictions.jsonl") for b in r["boxes"])
    assert sum(len(r["boxes"]) for r in _jsonl(tmp_path / "b" / "predictions.jsonl")) > sum(
        len(r["boxes"]) for r in _jsonl(tmp_path / "a" / "predictions.jsonl")
    )


def test_predict_with_best_onnx_never_imports_torch_and_agrees_with_best_pt(
    s3: Any, model: tuple[Path, Path], onnx_model: Path, images: Path, tmp_path: Path
) -> None:
    env = job_env(s3, tmp_path)
    # torch and ultralytics made unimportable: the ONNX route must not need them.
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'ultralytics'): raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from pogona_job.cli import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    out_onnx, out_pt = tmp_path / "onnx", tmp_path / "pt"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            blocker,
            "predict",
            "--model",
            str(onnx_model),
            "--conf",
            str(LOW),
            "--txt",
            str(images),
            str(out_onnx),
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert run_here(["predict", "--model", str(model[0]), "--conf", str(LOW), str(images), str(out_pt)], env).code == 0
    onnx_rows = {r["file"]: r for r in _jsonl(out_onnx / "predictions.jsonl")}
    pt_rows = {r["file"]: r for r in _jsonl(out_pt / "predictions.jsonl")}
    assert onnx_rows.keys() == pt_rows.keys()
    confident = 0
    for name, row in pt_rows.items():
        ours = np.array([b["xyxy"] for b in onnx_rows[name]["boxes"]]).reshape(-1, 4)
        for box in row["boxes"]:
            if box["confidence"] < 0.05:  # near the threshold a resize difference may tip a box either way
                continue
            confident += 1
            assert len(ours) and iou_matrix(np.array([box["xyxy"]]), ours).max() > 0.85, (name, box)
        label = (out_onnx / "labels" / name).with_suffix(".txt")
        lines = label.read_text().splitlines()
        assert len(lines) == len(onnx_rows[name]["boxes"])
        assert all(len(line.split()) == 6 and 0 <= float(line.split()[1]) <= 1 for line in lines)
    assert confident >= 2


def test_predict_champion_from_an_s3_prefix_into_an_s3_prefix(
    s3: Any, s3_client: Any, model: tuple[Path, Path], images: Path, tmp_path: Path
) -> None:
    env = job_env(s3, tmp_path)
    weights_key = out_key(env, "run-a", "weights", "best.pt")
    s3_client.upload_file(str(model[0]), BUCKET, weights_key)
    champion = {"run_id": "run-a", "weights": f"s3://{BUCKET}/{weights_key}"}
    s3_client.put_object(Bucket=BUCKET, Key=out_key(env, "champion.json"), Body=json.dumps(champion).encode())
    src_prefix = out_key(env, "photos")
    for p in images.rglob("*.*"):
        s3_client.upload_file(str(p), BUCKET, f"{src_prefix}/{p.relative_to(images).as_posix()}")
    dest = f"s3://{BUCKET}/{src_prefix}-predicted"
    result = run_here(["predict", "--txt", f"s3://{BUCKET}/{src_prefix}", dest], env)
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["model"] == "champion run-a"
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=BUCKET, Prefix=f"{src_prefix}-predicted/")["Contents"]}
    rel = {k.removeprefix(f"{src_prefix}-predicted/") for k in keys}
    names = {p.relative_to(images).as_posix() for p in images.rglob("*.*")}
    assert names <= rel and "predictions.jsonl" in rel
    assert {f"labels/{Path(n).with_suffix('.txt').as_posix()}" for n in names} <= rel
    body = s3_client.get_object(Bucket=BUCKET, Key=f"{src_prefix}-predicted/predictions.jsonl")["Body"].read()
    assert len(body.decode().splitlines()) == len(names)
    # The same model by run id.
    by_id = run_here(["predict", "--model", "run-a", str(images), str(tmp_path / "by-id")], env)
    assert by_id.code == 0, by_id.stderr
    assert json.loads(by_id.stdout.splitlines()[-1])["model"] == "run run-a"


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--model", "nope/best.pt", "{images}", "{out}"], 2, "no such file"),
        (["--model", "{model}", "{tmp}/not-there", "{out}"], 2, "neither a folder"),
        (["--model", "{model}", "{tmp}/empty", "{out}"], 3, "No images in"),
        (["--model", "ghost-run", "{images}", "{out}"], 2, "No run 'ghost-run'"),
        (["{images}", "{out}"], 2, "No champion under"),
        (["--model", "s3://pogona-test/missing/best.pt", "{images}", "{out}"], 2, "does not exist"),
        (["--model", "{model}", "--conf", "1.5", "{images}", "{out}"], 2, "between 0 and 1"),
    ],
)
def test_predict_bad_input_gets_one_sentence_and_the_documented_exit_code(
    s3: Any, model: tuple[Path, Path], images: Path, tmp_path: Path, args: list[str], code: int, words: str
) -> None:
    (tmp_path / "empty").mkdir()
    subs = {"{images}": str(images), "{out}": str(tmp_path / "out"), "{model}": str(model[0]), "{tmp}": str(tmp_path)}
    argv = [a for arg in args for a in [_sub(arg, subs)]]
    result = run_here(["predict", *argv], job_env(s3, tmp_path))
    assert result.code == code, result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _sub(arg: str, subs: dict[str, str]) -> str:
    for key, value in subs.items():
        arg = arg.replace(key, value)
    return arg
