"""Friction a new user hit (issue 23, item 7): each test failed before its fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tests.conftest import BUCKET, job_env, out_key, run_cli


def test_dataset_validate_prints_its_result_to_stdout_with_one_problem_singular_and_unlabelled_images(
    tmp_path: Path, demo_dir: Path
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(demo_dir, bad)
    labels = sorted((bad / "labels").glob("*.txt"))
    labels[0].write_text(labels[0].read_text() + "3 0.5 0.5 0.1 0.1\n")
    labels[1].unlink()  # an image without a label file: a background
    result = run_cli(["dataset", "validate", str(bad)], {"PATH": "/usr/bin:/bin"})
    assert result.code == 3
    assert ": 1 problem:" in result.stdout and "1 problems" not in result.stdout  # `> out.txt` keeps it
    assert f"labels/{labels[0].name}" in result.stdout and "class id 3" in result.stdout
    unlabelled = sum(1 for img in (bad / "images").iterdir() if not (bad / "labels" / f"{img.stem}.txt").exists())
    assert unlabelled >= 1 and f"background, {unlabelled} of them without a label file)" in result.stdout


def test_runs_lists_the_runs_by_date_not_by_name(s3: Any, s3_client: Any, tmp_path: Path) -> None:
    env = job_env(s3, tmp_path)
    for run_id, started in (("zeta", "2026-01-01T10:00:00+00:00"), ("alpha", "2026-01-02T10:00:00+00:00")):
        manifest = {"run_id": run_id, "status": "succeeded", "started_at": started, "finished_at": started}
        s3_client.put_object(Bucket=BUCKET, Key=out_key(env, run_id, "manifest.json"), Body=json.dumps(manifest))
    result = run_cli(["runs"], env)
    assert result.code == 0, result.stderr
    order = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert order == ["zeta", "alpha"]


def test_run_help_says_where_the_variables_are() -> None:
    result = run_cli(["run", "--help"], {"PATH": "/usr/bin:/bin"})
    assert result.code == 0
    text = " ".join(result.stdout.split())
    assert "POGONA_DATASET_URI" in text and "`pogona-job config`" in text and "README" in text


def test_an_empty_output_uri_is_reported_as_required_not_as_a_pattern(s3: Any, tmp_path: Path) -> None:
    result = run_cli(["runs"], job_env(s3, tmp_path, POGONA_OUTPUT_URI=""))
    assert result.code == 2
    assert "POGONA_OUTPUT_URI is required" in result.stderr and "pattern" not in result.stderr


def test_a_misspelled_model_name_exits_2_with_a_did_you_mean_and_the_run_says_it_failed(
    s3: Any, s3_client: Any, demo_uri: str, tmp_path: Path
) -> None:
    env = job_env(s3, tmp_path, POGONA_DATASET_URI=demo_uri, POGONA_MODEL="yolo11x-typo.pt", POGONA_RUN_ID="typo")
    result = run_cli(["run"], env)
    assert result.code == 2, result.stderr[-1500:]
    assert "POGONA_MODEL yolo11x-typo.pt is neither a file nor a known pretrained model - did you mean" in result.stderr
    assert "Traceback" not in result.stderr
    # Found after the run was claimed: its manifest no longer says an attempt is working on it.
    manifest = json.loads(s3_client.get_object(Bucket=BUCKET, Key=out_key(env, "typo", "manifest.json"))["Body"].read())
    assert (manifest["status"], manifest["exit_code"], manifest.get("in_progress")) == ("failed", 2, None)
    assert manifest["failure"] == result.sentence()


def test_an_s3_model_that_does_not_exist_exits_2_with_one_sentence(s3: Any, demo_uri: str, tmp_path: Path) -> None:
    missing = f"s3://{BUCKET}/nowhere/best.pt"
    result = run_cli(["run"], job_env(s3, tmp_path, POGONA_DATASET_URI=demo_uri, POGONA_MODEL=missing))
    assert result.code == 2, result.stderr[-1500:]
    assert f"POGONA_MODEL {missing} does not exist: check the URI" in result.stderr
    assert ".." not in result.stderr.replace("...", "")  # no double period


def test_a_dataset_uri_with_a_typo_says_nothing_is_there_and_writes_no_run_folder(
    s3: Any, s3_client: Any, demo_uri: str, tmp_path: Path
) -> None:
    typo = demo_uri.replace("demo", "dmeo")
    env = job_env(s3, tmp_path, POGONA_DATASET_URI=typo, POGONA_RUN_ID="typo-run")
    result = run_cli(["run"], env)
    assert result.code == 2, result.stderr[-1500:]
    assert f"Nothing under {typo}: check POGONA_DATASET_URI" in result.stderr
    assert "/cache/" not in result.stderr
    written = s3_client.list_objects_v2(Bucket=BUCKET, Prefix=out_key(env, ""))
    assert written.get("KeyCount", 0) == 0


def test_refused_access_names_the_dataset_uri(s3: Any, demo_uri: str, tmp_path: Path) -> None:
    env = job_env(s3, tmp_path, POGONA_DATASET_URI=demo_uri, AWS_SECRET_ACCESS_KEY="wrong-secret")
    result = run_cli(["run"], env)
    assert result.code == 4
    assert f"while reading the dataset from {demo_uri}: check the credentials" in result.stderr


def test_watch_latest_ends_with_the_final_status_headline_and_report_when_its_run_finishes(
    s3: Any, s3_client: Any, tmp_path: Path
) -> None:
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    env = job_env(s3, tmp_path)
    progress = {"run_id": "w1", "phase": "full", "epoch": 1, "epochs": 2, "heartbeat_ts": time.time(), "interval_s": 1}
    s3_client.put_object(Bucket=BUCKET, Key=out_key(env, "w1", "progress.json"), Body=json.dumps(progress))
    watch = subprocess.Popen(
        [sys.executable, "-m", "pogona_job", "runs", "watch", "--latest"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(6)  # it has seen the run running
    manifest = {
        "run_id": "w1",
        "status": "succeeded",
        "evaluation": {"val": {"overall": {"map50": 0.5123, "ci": {"map50": [0.41, 0.6]}}}},
        "artifacts": {"report.html": {}, "report.md": {}},
    }
    s3_client.put_object(Bucket=BUCKET, Key=out_key(env, "w1", "manifest.json"), Body=json.dumps(manifest))
    s3_client.delete_object(Bucket=BUCKET, Key=out_key(env, "w1", "progress.json"))
    try:
        out, err = watch.communicate(timeout=30)
    finally:
        watch.kill()
    assert watch.returncode == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    assert lines[0]["state"] == "running" and "waiting" not in [x["state"] for x in lines]
    assert lines[-1]["state"] == "succeeded" and lines[-1]["final"] is True
    assert lines[-1]["headline"] == "best.pt mAP@0.5 0.512 (95% 0.410-0.600)"
    assert lines[-1]["report"] == f"{env['POGONA_OUTPUT_URI']}/w1/report.html"


def test_mps_allowed_on_a_machine_without_it_is_refused_at_configuration(
    s3: Any, demo_uri: str, tmp_path: Path
) -> None:
    env = job_env(s3, tmp_path, POGONA_DATASET_URI=demo_uri, POGONA_DEVICE="mps", POGONA_ALLOW_MPS="true")
    result = run_cli(["run"], env)
    assert result.code == 2, result.stderr[-1500:]
    assert "POGONA_DEVICE=mps needs Apple's MPS backend, which this machine (linux) does not have" in result.stderr
    assert '"phase": "pull"' not in result.stderr and "dataset pulled" not in result.stderr


def test_a_users_ctrl_c_is_not_counted_as_a_preemption(s3: Any, s3_client: Any, demo_uri: str, tmp_path: Path) -> None:
    import signal

    from tests.test_preemption import Job, _is

    env = job_env(s3, tmp_path, POGONA_DATASET_URI=demo_uri, POGONA_RUN_ID="ctrl-c")
    job = Job(env)
    job.wait_for(_is("epoch", phase="sanity", epoch=1))
    code = job.signal_and_wait(signal.SIGINT)
    assert code == 143
    manifest = json.loads(
        s3_client.get_object(Bucket=BUCKET, Key=out_key(env, "ctrl-c", "manifest.json"))["Body"].read()
    )
    assert manifest["status"] == "interrupted"
    assert manifest["accounting"]["preemptions"] == 0, manifest["accounting"]
    attempts = json.loads(
        s3_client.get_object(Bucket=BUCKET, Key=out_key(env, "ctrl-c", "checkpoint", "accounting.json"))["Body"].read()
    )["attempts"]
    assert [a["outcome"] for a in attempts] == ["stopped by the user"]


def test_the_pulls_own_cache_index_is_not_counted_as_junk(tmp_path: Path, demo_dir: Path) -> None:
    from pogona_job.s3.storage import CACHE_INDEX

    pulled = tmp_path / "pulled"
    shutil.copytree(demo_dir, pulled)
    (pulled / CACHE_INDEX).write_text("{}")
    result = run_cli(["dataset", "validate", str(pulled)], {"PATH": "/usr/bin:/bin"})
    assert result.code == 0, result.stdout
    assert "0 junk files ignored" in result.stdout
