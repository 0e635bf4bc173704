"""The manifest's schema: published in docs/, generated from run/manifest.py, and binding.

Every manifest the tests' runs publish is validated against the model at the end of the session
(tests/conftest.py, the `s3` fixture's teardown); these tests pin the published file and the model's bite.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from pogona_job.run.manifest import SCHEMA_PATH, Manifest, schema_text


def _minimal() -> dict[str, Any]:
    return {
        "status": "succeeded",
        "exit_code": 0,
        "failure": None,
        "failed_phase": None,
        "run_id": "r1",
        "attempt": 1,
        "started_at": "2026-12-02T00:00:00Z",
        "finished_at": "2026-12-02T00:10:00Z",
        "timings_s": {"pull": 1.5},
        "metrics": {"map50": 0.9},
        "sanity_metrics": {},
        "verdict": {"passed": True, "criteria": [{"name": "n", "threshold": "t", "observed": "o", "passed": True}]},
        "parity": None,
        "watchdog": {},
        "per_modality": {},
        "evaluation": {},
        "export": {},
        "promotion": {},
        "classes": ["pogona_head"],
        "lineage": {},
        "dataset": {"uri": "s3://b/d", "fingerprint": "abc"},
        "model": "yolo11n.yaml",
        "versions": {"torch": "2", "ultralytics": "8", "cuda": None, "python": "3.11"},
        "device": {"device": "cpu"},
        "settings_used": {},
        "checkpoints": {"uploaded": [], "skipped_superseded": []},
        "accounting": {},
        "artifacts": {"report.md": {"sha256": "0" * 64, "size": 10}},
    }


def test_the_published_schema_is_generated_from_the_model() -> None:
    assert SCHEMA_PATH.read_text() == schema_text(), "docs/manifest.schema.json drifted: run `make schema`"
    schema = json.loads(SCHEMA_PATH.read_text())
    assert {"status", "run_id", "artifacts", "evaluation", "promotion", "accounting"} <= set(schema["required"])


def test_a_manifest_round_trips_and_blocks_the_run_never_filled_stay_empty() -> None:
    data = _minimal()
    assert Manifest.model_validate(data).dump() == data
    data["promotion"] = {"decision": "keep", "reason": "Not promoted.", "new_field_of_a_later_round": 1}
    assert Manifest.model_validate(data).dump()["promotion"] == data["promotion"]  # extra fields are kept


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("run_id", None),
        ("exit_code", "zero"),
        ("artifacts", {"report.md": {"sha256": "0" * 64}}),  # an artifact without its size
        ("versions", {"torch": "2"}),
        ("verdict", {"criteria": []}),  # a verdict that does not say whether it passed
    ],
)
def test_a_manifest_with_a_missing_or_mistyped_field_is_refused(field: str, value: Any) -> None:
    data = _minimal() | {field: value}
    with pytest.raises(ValidationError):
        Manifest.model_validate(data)
    del data[field]
    with pytest.raises(ValidationError):
        Manifest.model_validate(data)
