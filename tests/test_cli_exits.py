"""Claims of the contract that only a whole run can show: exit 6 and POGONA_DEBUG tracebacks, the
manifest written after every other artifact, POGONA_MODEL=s3://..., and the parity probe's accelerator
branch refusing a device whose loss differs from the CPU's."""

from __future__ import annotations

import contextlib
import json
import os
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import structlog
import torch

from pogona_job.config import load_settings
from pogona_job.run import job
from pogona_job.s3 import pull
from pogona_job.tools.locals3 import LocalS3
from pogona_job.training import phase as training_phase
from tests.conftest import BUCKET, ROOT, FaultProxy, job_env, out_key, run_cli

# A GPU fault that is not "out of memory" (which ultralytics retries): the third training batch fails
# the way a broken CUDA kernel does. Loaded in the job's process at start-up through PYTHONPATH.
GPU_FAULT = textwrap.dedent(
    """
    from ultralytics.utils.loss import v8DetectionLoss

    _original, _calls = v8DetectionLoss.loss, [0]

    def _loss(self, preds, batch):
        _calls[0] += 1
        if _calls[0] == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return _original(self, preds, batch)

    v8DetectionLoss.loss = _loss
    """
)


def _events(stderr: str) -> list[dict[str, Any]]:
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def _faulty_env(s3: LocalS3, demo_uri: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(GPU_FAULT)
    env = job_env(s3, tmp_path, POGONA_DATASET_URI=demo_uri, POGONA_RUN_ID="gpu-fault", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    return env


def test_a_training_failure_exits_6_with_one_sentence_and_no_traceback(
    s3: LocalS3, demo_uri: str, tmp_path: Path, s3_client: Any
) -> None:
    env = _faulty_env(s3, demo_uri, tmp_path)
    result = run_cli(["run"], env)
    assert result.code == 6, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == "Training (sanity) failed: RuntimeError: CUDA error: an illegal memory access was encountered."
    assert "Traceback" not in result.stderr + result.stdout
    assert not any("exception" in e for e in _events(result.stderr))
    manifest = json.loads(
        s3_client.get_object(Bucket=BUCKET, Key=out_key(env, "gpu-fault", "manifest.json"))["Body"].read()
    )
    assert (manifest["status"], manifest["exit_code"], manifest["failed_phase"]) == ("failed", 6, "sanity")
    assert manifest["failure"] == last


def test_pogona_debug_adds_the_traceback_and_keeps_exit_6(s3: LocalS3, demo_uri: str, tmp_path: Path) -> None:
    result = run_cli(["run"], _faulty_env(s3, demo_uri, tmp_path, POGONA_DEBUG="true"))
    assert result.code == 6, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("Training (sanity) failed: RuntimeError: CUDA error")
    traced = [e for e in _events(result.stderr) if e.get("event") == "training exception"]
    assert traced, result.stderr[-3000:]
    (exc,) = traced[0]["exception"]  # structlog's dict_tracebacks: the traceback, frame by frame
    assert exc["exc_type"] == "RuntimeError" and "illegal memory access" in exc["exc_value"]
    assert any(frame["name"] == "_loss" for frame in exc["frames"])


def test_an_unexpected_error_exits_6_and_debug_logs_it_without_changing_the_exit(
    s3: LocalS3, demo_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug (here: KeyError while pulling) is exit 6 with one sentence, with or without POGONA_DEBUG."""
    for key, value in job_env(s3, tmp_path, POGONA_DATASET_URI=demo_uri).items():
        if key.startswith(("POGONA_", "AWS_")):
            monkeypatch.setenv(key, value)

    def broken_pull(*_args: Any, **_kwargs: Any) -> Any:
        raise KeyError("ETag")

    monkeypatch.setattr(pull, "pull_prefix", broken_pull)
    # structlog's own defaults, whatever an earlier in-process test configured (a level filter would drop
    # the debug event before capture_logs sees it); restored afterwards.
    saved = structlog.get_config()
    structlog.reset_defaults()
    try:
        _unexpected_error_runs(monkeypatch)
    finally:
        structlog.configure(**saved)


def _unexpected_error_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    for debug in ("false", "true"):
        monkeypatch.setenv("POGONA_DEBUG", debug)
        monkeypatch.setenv("POGONA_RUN_ID", f"bug-{debug}")
        with structlog.testing.capture_logs() as events:
            code = job.run(load_settings())
        assert code == 6
        failed = next(e for e in events if e["event"] == "run failed")
        assert failed["reason"] == "Unexpected error: KeyError: 'ETag'. Re-run with POGONA_DEBUG=true for details."
        assert [e["failed_phase"] for e in events if e["event"] == "run failed"] == ["pull"]
        logged = [e for e in events if e["event"] == "unexpected error"]
        assert logged and logged[0]["exc_info"] is True  # rendered as a traceback when debug lets it through


# --- the order of writes, seen by the storage: a recording proxy in front of it ---------------------


def _writes(proxy: FaultProxy) -> list[str]:
    """Keys in the order their objects came into existence (PUT, or the POST completing a multipart upload)."""
    keys = []
    for status, method, target in proxy.records():
        url = urlsplit(target)
        query = parse_qs(url.query, keep_blank_values=True)
        done = (method == "PUT" and "partNumber" not in query) or (method == "POST" and "uploadId" in query)
        if done and 200 <= status < 300:
            keys.append(url.path.removeprefix(f"/{BUCKET}/"))
    return keys


@pytest.fixture()
def v8_weights(s3_client: Any, tmp_path: Path) -> str:
    """Weights of another architecture than the tests' default (YOLOv8's C2f blocks, not YOLO11's C3k2)."""
    from ultralytics import YOLO

    path = tmp_path / "v8n.pt"
    YOLO("yolov8n.yaml").save(str(path))
    key = out_key({"POGONA_OUTPUT_URI": f"s3://{BUCKET}/models-{tmp_path.name}"}, "v8n.pt")
    s3_client.upload_file(str(path), BUCKET, key)
    return f"s3://{BUCKET}/{key}"


def test_manifest_is_written_after_every_artifact_and_s3_weights_are_the_ones_trained(
    s3: LocalS3, demo_uri: str, tmp_path: Path, s3_client: Any, v8_weights: str
) -> None:
    proxy = FaultProxy(s3.endpoint, "", tmp_path, addon="record_addon.py")
    try:
        env = job_env(
            s3,
            tmp_path,
            POGONA_DATASET_URI=demo_uri,
            POGONA_RUN_ID="ordered",
            POGONA_MODEL=v8_weights,
            POGONA_GATE_MIN_MAP50="0",  # random weights: mAP is 0 for the first epochs
            POGONA_EPOCHS="3",  # the 2 sanity epochs and one more
            AWS_ENDPOINT_URL_S3=proxy.endpoint,
        )
        result = run_cli(["run"], env)
    finally:
        proxy.stop()
    assert result.code == 0, result.stderr[-3000:]
    run = out_key(env, "ordered") + "/"
    writes = _writes(proxy)
    manifest = json.loads(s3_client.get_object(Bucket=BUCKET, Key=run + "manifest.json")["Body"].read())
    # Not artifacts: the checkpoints, the lease and the live progress.json (all removed when the run ends).
    transient = (run + "checkpoint/", run + "lease", run + "progress.json")
    artifacts = [k for k in writes if k.startswith(run) and not k.startswith(transient)]
    # Twice: the holder's claim when it took the run (fences a stale writer), then the result LAST.
    assert [i for i, k in enumerate(artifacts) if k == run + "manifest.json"] == [0, len(artifacts) - 1]
    assert {k.removeprefix(run) for k in artifacts[1:-1]} == set(manifest["artifacts"])
    latest = out_key(env, "latest.json")
    assert writes.count(latest) == 1 and writes.index(latest) > writes.index(run + "manifest.json")
    # POGONA_MODEL=s3://...: the object was fetched, and the published weights are of its architecture.
    model_key = v8_weights.removeprefix(f"s3://{BUCKET}/")
    assert any(m == "GET" and urlsplit(t).path == f"/{BUCKET}/{model_key}" for _, m, t in proxy.records())
    best = tmp_path / "best.pt"
    s3_client.download_file(BUCKET, run + "weights/best.pt", str(best))
    from ultralytics.utils.patches import torch_load

    blocks = {layer[2] for layer in torch_load(str(best), map_location="cpu")["model"].yaml["backbone"]}
    assert "C2f" in blocks and "C3k2" not in blocks


# --- the parity probe's accelerator branch, through the job ------------------------------------------


@pytest.fixture()
def fake_gpu(s3: LocalS3, demo_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """POGONA_DEVICE=0 on a machine with no GPU: torch is told CUDA exists, and the job's device "0" is
    run on the CPU (`training.torch_device`), so the probe's real CPU-vs-device comparison runs."""
    env = job_env(s3, tmp_path, POGONA_DATASET_URI=demo_uri, POGONA_DEVICE="0", POGONA_BATCH="8")
    for key, value in env.items():
        if key.startswith(("POGONA_", "AWS_")):
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return env


def _device_zero_runs_on_the_cpu(monkeypatch: pytest.MonkeyPatch, *, loses_foreground: bool) -> None:
    """The fake device: the CPU, optionally with MPS's bug (its assigner finds no foreground)."""
    from ultralytics.utils.tal import TaskAlignedAssigner

    on_device = {"now": False}
    real_device = training_phase.torch_device

    def torch_device(device: str) -> str:
        on_device["now"] = device != "cpu"
        return "cpu" if device == "0" else real_device(device)

    original = TaskAlignedAssigner.forward

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        labels, bboxes, scores, fg_mask, gt_idx = original(self, *args, **kwargs)
        if on_device["now"] and loses_foreground:
            return labels, bboxes, torch.zeros_like(scores), torch.zeros_like(fg_mask), gt_idx
        return labels, bboxes, scores, fg_mask, gt_idx

    monkeypatch.setattr(training_phase, "torch_device", torch_device)
    monkeypatch.setattr(TaskAlignedAssigner, "forward", forward)


def test_the_probe_refuses_a_device_whose_loss_differs_before_any_training(
    fake_gpu: dict[str, str], monkeypatch: pytest.MonkeyPatch, s3_client: Any
) -> None:
    _device_zero_runs_on_the_cpu(monkeypatch, loses_foreground=True)
    monkeypatch.setenv("POGONA_RUN_ID", "parity-broken")
    with structlog.testing.capture_logs() as events:
        code = job.run(load_settings())
    assert code == 5
    failed = next(e for e in events if e["event"] == "run failed")
    assert failed["reason"].startswith(
        "Refusing device 0: its training loss disagrees with the CPU's on the same batch"
    )
    assert "box_loss is 0 on 0 but" in failed["reason"]
    assert not any(e["event"] == "training started" for e in events)
    key = out_key(fake_gpu, "parity-broken", "manifest.json")
    parity = json.loads(s3_client.get_object(Bucket=BUCKET, Key=key)["Body"].read())["parity"]
    assert parity["device"] == "0" and not parity["passed"]
    assert parity["accelerator"]["box_loss"] == 0.0 and parity["accelerator"]["dfl_loss"] == 0.0
    assert parity["cpu"]["box_loss"] > 0 and parity["cpu"]["dfl_loss"] > 0


def test_the_probe_passes_an_honest_device(fake_gpu: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    _device_zero_runs_on_the_cpu(monkeypatch, loses_foreground=False)
    monkeypatch.setenv("POGONA_RUN_ID", "parity-honest")
    with structlog.testing.capture_logs() as events:
        code = job.run(load_settings())  # then torch finds no real GPU to train on: that end is not the point
    probe = next(e for e in events if e["event"] == "parity probe")
    assert probe["passed"] is True and probe["cpu"] == probe["device"] and all(v > 0 for v in probe["cpu"].values())
    assert code != 5 and not any("Refusing device" in e.get("reason", "") for e in events)


def test_the_console_script_ends_with_mains_code_after_the_exit_handlers_ran(tmp_path: Path) -> None:
    """`pogona-job` ends without the interpreter's teardown (where obstore's runtime threads can abort a
    finished process with SIGABRT), yet what a normal exit does still happens: exit handlers, flushed output."""
    import subprocess
    import sys

    script = (
        "import atexit, sys\n"
        "from pogona_job import cli\n"
        "atexit.register(lambda: print('exit handlers ran'))\n"
        "print('unflushed output', end='')\n"
        "cli.entry(['dataset', 'validate', sys.argv[1]])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "missing")], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout == "unflushed outputexit handlers ran\n"
    assert done.stderr.strip().endswith("is not a folder.")
