"""The manifest (`<run>/manifest.json`, written last): its schema as pydantic models.

`run.publish.manifest_of` builds a `Manifest` and writes its dump; `make schema` writes the JSON Schema
to docs/manifest.schema.json (a test fails when the two drift), and the tests validate every manifest
their runs publish against this model. Readers outside the job (a deployment, `pogona-job runs`) can
rely on the fields named here; the blocks other modules fill (evaluation, export, promotion,
accounting, lineage) name their stable fields and allow more (`extra="allow"`), so that a module can add
a figure without a schema change breaking a run. A field whose shape is another module's own
(ultralytics' numbers, the per-class tables) stays `dict[str, Any]`, with the reason at the field.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "manifest.schema.json"


class _Open(BaseModel):
    """A block whose named fields are stable and to which its module may add more."""

    model_config = ConfigDict(extra="allow")


class Artifact(_Open):
    sha256: str = Field(description="sha256 of the object's bytes, hex")
    size: int = Field(description="bytes")


class Criterion(_Open):
    name: str
    threshold: str
    observed: str
    passed: bool


class Verdict(_Open):
    """The sanity verdict (training.gate.verdict)."""

    passed: bool
    criteria: list[Criterion] = []


class Parity(_Open):
    """The one-batch CPU parity probe on an accelerator (training.gate.parity_probe)."""

    device: str
    cpu: dict[str, float]
    accelerator: dict[str, float]
    tolerance: float
    passed: bool
    reason: str


class SplitEvaluation(_Open):
    """One split's validation pass (evaluation.scoring.summarise)."""

    images: int | None = None
    # overall/per-modality/per-class hold ultralytics' metric names and the bootstrap intervals
    overall: dict[str, Any] = {}
    per_modality: dict[str, Any] = {}


class Export(_Open):
    """The verified export (evaluation.export.verify); empty when export is off or training did not finish."""

    verified: bool | None = None
    tolerance: float | None = None


class Promotion(_Open):
    """The champion decision (evaluation.promotion.decide); empty when the run never got that far."""

    decision: str | None = Field(None, description="promote or keep")
    forced: bool | None = None
    reason: str | None = Field(None, description="the decision in one sentence")
    compared_against: str | None = Field(None, description="the champion's run id the decision was made against")
    mode: str | None = Field(None, description="POGONA_PROMOTE: auto, never or always")
    comparison: dict[str, Any] | None = None  # promotion.compare(): per check and split, its own table


class Budget(_Open):
    limit_s: float | None = None
    set_by: str | None = None
    used_s: float | None = None
    stopped: str | None = None


class Accounting(_Open):
    """Time, cost and attempts across every attempt of the run (run.budget.Tracker.summary)."""

    attempts: list[dict[str, Any]] = []  # per attempt: outcome, wall_s, phases_s, epochs, resumed_from, ...
    wall_s: float | None = None
    gpu_hours: float | None = None
    preemptions: int | None = None
    epochs_recomputed: int | None = None
    estimated_cost_usd: float | None = None
    budget: Budget | None = None
    summary: str | None = Field(None, description="the report's one-line cost and time summary")


class Dataset(_Open):
    uri: str | None = None
    fingerprint: str | None = Field(None, description="sha256 over (key, size, etag): same data, same fingerprint")
    files: int | None = None
    bytes: int | None = None


class Versions(_Open):
    torch: str
    ultralytics: str
    cuda: str | None
    python: str


class Device(_Open):
    device: str | None = Field(None, description="what the job passed to ultralytics (cpu, 0, 0,1, ...)")


class Checkpoints(_Open):
    uploaded: list[Any] = []
    skipped_superseded: list[Any] = []


class Manifest(_Open):
    """`<run>/manifest.json`. Trust a run only when `status` is `succeeded`."""

    status: str = Field(description="succeeded, partial, failed or interrupted")
    exit_code: int = Field(description="the process's exit code (0 for succeeded and partial)")
    failure: str | None = Field(description="the one sentence the job ended with, when it did not succeed")
    failed_phase: str | None
    run_id: str
    attempt: int
    started_at: str
    finished_at: str
    timings_s: dict[str, float] = Field(description="seconds per phase")
    # The headline: best.pt's own evaluation on val (evaluation.headline.Headline.as_dict()): its metrics,
    # their intervals, the epoch it came from, the images and groups the interval rests on.
    metrics: dict[str, Any] = Field(description="the shipped best.pt's evaluation on val (the headline)")
    sanity_metrics: dict[str, float | None]
    verdict: Verdict | None
    parity: Parity | None
    watchdog: dict[str, Any]  # the batch watchdog's own counters and signature
    per_modality: dict[str, dict[str, Any]]  # modality -> images and metrics
    evaluation: dict[str, SplitEvaluation] = Field(description="per split (val, test)")
    export: Export
    promotion: Promotion
    classes: list[str]
    lineage: dict[str, Any]  # run.lineage.collect(): what to reproduce the model from, its own sections
    dataset: Dataset
    model: str
    versions: Versions
    device: Device
    settings_used: dict[str, Any]  # what the job picked (device, workers, batch, ...), one value per setting
    checkpoints: Checkpoints
    accounting: Accounting
    artifacts: dict[str, Artifact] = Field(description="every object of the run but the manifest, by relative key")

    def dump(self) -> dict[str, Any]:
        """The JSON the job writes: blocks the run never filled stay `{}` as they were given."""
        out: dict[str, Any] = self.model_dump(mode="json", exclude_unset=True)
        return out


def schema_text() -> str:
    return json.dumps(Manifest.model_json_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":  # pragma: no cover - used by `make schema`
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else SCHEMA_PATH
    target.write_text(schema_text())
    print(f"manifest schema written to {target}")
