"""Verified ONNX export: onnxruntime's metrics against best.pt's on the same images."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pogona_job.config import Settings
from pogona_job.evaluation import export, scoring
from tests.conftest import BUCKET, run_cli
from tests.ship_models import stage, trained_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return trained_model(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """best.pt evaluated, exported to ONNX with pip forbidden, and the export verified."""
    work = tmp_path_factory.mktemp("export")
    weights = work / "best.pt"
    weights.write_bytes(model[0].read_bytes())
    staged = stage(model[1], work / "staged")
    reference = scoring.evaluate(weights, staged, imgsz=128, batch=8, device="cpu", work_dir=work / "eval")
    commands: list[str] = []

    def record(args: Any, *a: Any, **k: Any) -> str:
        commands.append(" ".join(map(str, args)))
        raise subprocess.CalledProcessError(1, args)

    import ultralytics.utils.checks as checks

    real_version = checks.metadata.version

    def version(name: str) -> str:
        if name == "onnxslim":  # as if the pinned package were missing: ultralytics would reach for pip
            raise checks.metadata.PackageNotFoundError(name)
        return real_version(name)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checks, "ONLINE", True)  # a container with internet access
        mp.setattr(checks.metadata, "version", version)
        mp.setattr(subprocess, "check_output", record)
        onnx_path = export.export_onnx(weights, imgsz=128, device="cpu")
    result = export.verify(
        onnx_path, staged, reference, imgsz=128, batch=8, device="cpu", work_dir=work / "v", tolerance=0.01
    )
    return {"onnx": onnx_path, "staged": staged, "reference": reference, "result": result, "commands": commands}


@pytest.mark.slow
def test_the_onnx_export_matches_best_pt_within_the_tolerance(exported: dict[str, Any]) -> None:
    result = exported["result"]
    assert exported["onnx"].name == "best.onnx" and exported["onnx"].stat().st_size > 1_000_000
    assert result["verified"] is True
    val = result["splits"]["val"]
    ref = exported["reference"]["val"]
    assert val["metrics"]["overall"]["map50"] > 0.1
    assert abs(val["metrics"]["overall"]["map50"] - ref.ultralytics["map50"]) <= 0.01
    assert set(val["deltas"]["per_modality"]) == {"thermal", "visible"}
    assert set(val["deltas"]["per_class"]) == {"pogona_head", "other_head"}


@pytest.mark.slow
def test_the_exporter_never_runs_pip(exported: dict[str, Any]) -> None:
    assert not [c for c in exported["commands"] if "pip" in c], exported["commands"]


@pytest.mark.slow
def test_an_onnx_file_with_perturbed_weights_fails_verification(exported: dict[str, Any], tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(exported["onnx"]))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.size > 1000:  # the convolution weights, not shapes or constants
            noisy = w + rng.normal(0, 0.5 * (float(w.std()) or 1.0), w.shape).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    corrupted = tmp_path / "best.onnx"
    onnx.save(model, str(corrupted))
    result = export.verify(
        corrupted,
        exported["staged"],
        exported["reference"],
        imgsz=128,
        batch=8,
        device="cpu",
        work_dir=tmp_path / "v",
        tolerance=0.01,
    )
    assert result["verified"] is False
    assert result["max_abs_delta_map50"] > 0.01
    lines = "\n".join(export.report_lines(result))
    assert "NOT VERIFIED" in lines and "blocks promotion" in lines


def test_formats_default_to_onnx_and_empty_or_none_turns_export_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().exports == ["onnx"]
    for off in ("", "none", " NONE "):  # `none`: what a template parameter (empty = default) can say
        monkeypatch.setenv("POGONA_EXPORT_FORMATS", off)
        assert Settings().exports == []


@pytest.mark.parametrize(("fmt", "where"), [("engine", "deployment GPU"), ("coreml", "on a Mac")])
def test_formats_that_cannot_be_built_here_are_refused_with_where_to_build_them(
    fmt: str, where: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POGONA_", "AWS_"))}
    env.update(POGONA_EXPORT_FORMATS=f"onnx,{fmt}", POGONA_OUTPUT_URI=f"s3://{BUCKET}/x")
    result = run_cli(["config"], env, timeout=120)
    assert result.code == 2
    assert "POGONA_EXPORT_FORMATS" in result.stderr and where in result.stderr
    assert "Traceback" not in result.stderr
