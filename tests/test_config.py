"""Configuration: one settings class; bad input stops the job before any work, with exit 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pogona_job.config import Settings, check_unknown_env, load_settings, markdown_table, readme_with_table
from pogona_job.errors import ConfigError
from tests.conftest import ROOT, run_cli

BASE = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}


def test_defaults_match_the_contract() -> None:
    s = Settings()
    assert (s.model, s.epochs, s.sanity_epochs, s.imgsz, s.batch) == ("yolo11s.pt", 60, 3, 640, 8)
    assert (s.device, s.workers, s.seed, s.optimizer, s.lr0, s.log_format) == ("auto", 2, 42, "AdamW", 0.001, "auto")
    assert s.classes == ["pogona_head"]


def test_typo_is_refused_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match="Unknown variable POGONA_EPOCH - did you mean POGONA_EPOCHS"):
        check_unknown_env({"POGONA_EPOCH": "5"})


def test_invalid_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POGONA_EPOCHS", "many")
    with pytest.raises(ConfigError, match=r"POGONA_EPOCHS is invalid \(got 'many'\)"):
        load_settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("POGONA_DATASET_URI", "bucket/prefix"),
        ("POGONA_DEVICE", "gpu"),
        ("POGONA_LR0", "-1"),
        ("POGONA_SANITY_EPOCHS", "1"),
    ],
)
def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_settings()


def test_missing_variable_exits_2_before_any_work(tmp_path: Path) -> None:
    result = run_cli(["run"], {**BASE, "POGONA_WORK_DIR": str(tmp_path / "w")})
    assert result.code == 2
    assert "Required variables not set: POGONA_DATASET_URI and POGONA_OUTPUT_URI" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()  # no work was started


def test_typo_exits_2_naming_the_right_variable() -> None:
    result = run_cli(["run"], {**BASE, "POGONA_EPOHCS": "3"})
    assert result.code == 2
    assert result.stderr.strip() == "Unknown variable POGONA_EPOHCS - did you mean POGONA_EPOCHS?"


def test_sanity_epochs_not_below_the_epochs_exit_2_in_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    """POGONA_EPOCHS counts every epoch of the one training, the sanity epochs included."""
    result = run_cli(["run"], {**BASE, "POGONA_EPOCHS": "3", "POGONA_SANITY_EPOCHS": "3"})
    assert result.code == 2
    assert result.stderr.strip() == (
        "POGONA_SANITY_EPOCHS (3) must be below POGONA_EPOCHS (3), which counts every training epoch, the sanity "
        "epochs included: raise POGONA_EPOCHS or lower POGONA_SANITY_EPOCHS."
    )
    monkeypatch.setenv("POGONA_EPOCHS", "4")
    monkeypatch.setenv("POGONA_SANITY_EPOCHS", "3")
    assert (load_settings().epochs, load_settings().sanity_epochs) == (4, 3)


def test_config_prints_effective_settings_with_secrets_masked() -> None:
    env = {
        **BASE,
        "POGONA_EPOCHS": "7",
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY123",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
    }
    result = run_cli(["config"], env)
    assert result.code == 0
    shown = json.loads(result.stdout)
    assert shown["POGONA_EPOCHS"] == 7
    assert shown["aws"]["AWS_SECRET_ACCESS_KEY"] == "****"
    assert "s3cr3t-value" not in result.stdout and "AKIAEXAMPLEKEY123" not in result.stdout


def test_variable_table_is_generated_from_the_settings() -> None:
    doc = (ROOT / "docs" / "variables.md").read_text()
    assert readme_with_table(doc) == doc, "docs/variables.md drifted from config.py: run `make readme`"
    for name in Settings.model_fields:
        assert f"POGONA_{name.upper()}" in markdown_table()


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "1e9", "4"])
def test_lease_ttl_must_be_a_bounded_number(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """An infinite lease would never expire: a crashed holder would block its run forever."""
    monkeypatch.setenv("POGONA_LEASE_TTL_S", value)
    with pytest.raises(ConfigError, match="POGONA_LEASE_TTL_S is invalid"):
        load_settings()


@pytest.mark.parametrize(("value", "expected"), [("5", 5.0), ("3600", 3600.0)])
def test_lease_ttl_bounds_are_inclusive(monkeypatch: pytest.MonkeyPatch, value: str, expected: float) -> None:
    monkeypatch.setenv("POGONA_LEASE_TTL_S", value)
    assert load_settings().lease_ttl_s == expected


@pytest.mark.parametrize("name", ["POGONA_CHECKPOINT_MIN_INTERVAL_S", "POGONA_STOP_BUDGET_S"])
def test_other_durations_refuse_infinity(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "inf")
    with pytest.raises(ConfigError, match=name):
        load_settings()


def _run_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **BASE,
        "POGONA_DATASET_URI": "s3://bucket-a/data",
        "POGONA_OUTPUT_URI": "s3://bucket-a/runs",
        "POGONA_WORK_DIR": str(tmp_path / "w"),
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",  # nothing listens: the job must stop before any S3 call
        **extra,
    }


@pytest.mark.parametrize("attempt", ["two", "1.5", "-1", "0"])
def test_a_non_numeric_batch_attempt_exits_2_with_one_sentence(tmp_path: Path, attempt: str) -> None:
    result = run_cli(["run"], _run_env(tmp_path, AWS_BATCH_JOB_ATTEMPT=attempt))
    assert result.code == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"AWS_BATCH_JOB_ATTEMPT is invalid (got '{attempt}')")
    assert "Traceback" not in result.stderr


def test_an_unwritable_work_dir_exits_2_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli(["run"], _run_env(tmp_path, POGONA_WORK_DIR=str(blocker / "work")))
    assert result.code == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"POGONA_WORK_DIR={blocker / 'work'} is not writable") and "Traceback" not in result.stderr


def test_an_existing_read_only_work_dir_exits_2(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the missing-parent case above covers the path")
    work = tmp_path / "ro"
    work.mkdir()
    work.chmod(0o555)
    result = run_cli(["run"], _run_env(tmp_path, POGONA_WORK_DIR=str(work)))
    assert result.code == 2 and "is not writable" in result.stderr


def test_endpoint_credentials_are_masked_in_the_effective_config() -> None:
    env = {**BASE, "AWS_ENDPOINT_URL_S3": "https://alice:hunter2-pass@minio.example:9000/base"}
    result = run_cli(["config"], env)
    assert result.code == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["aws"]["AWS_ENDPOINT_URL_S3"] == "https://****@minio.example:9000/base"
    assert "hunter2-pass" not in result.stdout and "alice" not in result.stdout


def test_debug_tracebacks_never_show_local_variables(capsys: pytest.CaptureFixture[str]) -> None:
    """POGONA_DEBUG logs tracebacks; a frame's locals (a key, a client) must never be in them."""
    import structlog

    saved = structlog.get_config()
    try:
        _check_no_locals(capsys)
    finally:
        structlog.configure(**saved)  # other tests keep the logging set-up they had


def _check_no_locals(capsys: pytest.CaptureFixture[str]) -> None:
    from pogona_job import logs

    for fmt in ("json", "console"):
        logs.configure(fmt, debug=True)  # type: ignore[arg-type]

        def failing(secret: str = "AKIA-SECRET-IN-A-LOCAL") -> None:
            token = secret + "-2"  # noqa: F841 - a local that must not be rendered
            raise RuntimeError("boom")

        try:
            failing()
        except RuntimeError:
            logs.get_logger().debug("unexpected error", exc_info=True)
        err = capsys.readouterr().err
        assert "boom" in err and "failing" in err, err  # the traceback itself is there...
        assert "AKIA-SECRET-IN-A-LOCAL" not in err, err  # ...its locals are not


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("POGONA_SEED", "-1"),
        ("POGONA_SEED", str(10**23)),
        ("POGONA_EPOCHS", str(10**20)),
        ("POGONA_BATCH", "0"),
        ("POGONA_HOURLY_COST", "inf"),
        ("POGONA_MAX_COST", "nan"),
        ("POGONA_MAX_HOURS", "inf"),
    ],
)
def test_out_of_range_numbers_and_infinity_stop_the_job_at_configuration_with_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, value: str
) -> None:
    from pogona_job import cli

    monkeypatch.setenv(name, value)
    assert cli.main(["config"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"{name} is invalid (got {value!r})") and len(err.splitlines()) == 1


@pytest.mark.parametrize(("name", "value"), [("POGONA_SEED", "4294967295"), ("POGONA_BATCH", "-1")])
def test_the_largest_seed_and_autobatch_are_accepted(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    assert str(getattr(load_settings(), name.removeprefix("POGONA_").lower())) == value
