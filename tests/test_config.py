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


def test_readme_variable_table_is_generated_from_the_settings() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme_with_table(readme) == readme, "README drifted from config.py: run `make readme`"
    for name in Settings.model_fields:
        assert f"POGONA_{name.upper()}" in markdown_table()
