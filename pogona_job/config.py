"""The job's configuration: one pydantic-settings class, read from `POGONA_*` variables.

This class is the single source of truth for every knob, its default and its doc; the
variable table in docs/variables.md is generated from it (`make readme`).
AWS credentials, region and endpoint are deliberately absent: boto3 reads its own
standard variables (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL_S3`, ...).
"""

from __future__ import annotations

import difflib
import os
import re
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pogona_job.errors import ConfigError

ENV_PREFIX = "POGONA_"
_S3_URI = re.compile(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda|cuda:\d+|\d+(,\d+)*)$")


def _check_s3_uri(value: str) -> str:
    if not _S3_URI.match(value):
        raise ValueError("must look like s3://bucket/prefix")
    if any(part in (".", "..") for part in value[5:].split("/")):
        raise ValueError("must not contain '.' or '..' parts")  # the same rule as storage.S3Path.parse
    return value.rstrip("/")


S3Uri = Annotated[str, AfterValidator(_check_s3_uri)]


# POGONA_EXPORT_FORMATS: what this job builds and verifies itself (evaluation/export.py), and where the rest is built.
BUILT_HERE = ("onnx",)
# Formats that need their vendor's toolchain or hardware to build and to verify.
_TENSORRT = (
    "TensorRT engines are tied to the GPU and TensorRT version that run them: build one on the deployment GPU "
    "from weights/best.onnx with `trtexec --onnx=best.onnx` (or `yolo export format=engine` there)"
)
_COREML = "Core ML models are built and verified on macOS: run `yolo export model=best.pt format=coreml` on a Mac"
ELSEWHERE = {"engine": _TENSORRT, "tensorrt": _TENSORRT, "coreml": _COREML, "mlpackage": _COREML}


def parse_formats(value: str) -> list[str]:
    """POGONA_EXPORT_FORMATS as a list ('' or `none` turns export off); a format not built here raises ValueError."""
    formats = [f.strip().lower() for f in value.split(",") if f.strip()]
    if formats == ["none"]:  # the spelling a template parameter can carry (its empty value means "default")
        return []
    for f in formats:
        if f in ELSEWHERE:
            raise ValueError(f"{f} is not built by this job. {ELSEWHERE[f]}")
        if f not in BUILT_HERE:
            raise ValueError(f"unknown export format {f!r}; this job builds: {', '.join(BUILT_HERE)}")
    return formats


class Settings(BaseSettings):
    """Every knob of the job. Field docs become the table in docs/variables.md."""

    # No knob means anything at infinity or NaN (and `Infinity` is not JSON: it would break the manifest).
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True, allow_inf_nan=False)

    # --- where things are ---------------------------------------------------------------
    dataset_uri: S3Uri | None = Field(
        None, description="`s3://bucket/prefix` of the labelled dataset (required by `run`, `dataset pull/push`)"
    )
    output_uri: S3Uri | None = Field(
        None, description="`s3://bucket/prefix` under which runs are written (required by `run`)"
    )
    run_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$",
        description="names the run; default `AWS_BATCH_JOB_ID`, then `KUBERNETES_JOB_NAME`, else generated. "
        "The same id on a retry resumes that run",
    )
    work_dir: Path = Field(
        Path(os.environ.get("TMPDIR", "/tmp")) / "pogona-job",
        description="local scratch: dataset cache, staged dataset, ultralytics runs",
    )

    # --- training -----------------------------------------------------------------------
    model: str = Field("yolo11s.pt", description="pretrained weights name, a `.yaml` (from scratch), or an `s3://` URI")
    class_names: str = Field("pogona_head", description="comma-separated class names, in class-id order")
    epochs: int = Field(
        60, ge=1, le=100_000, description="training epochs in all, the sanity epochs included (one training)"
    )
    sanity_epochs: int = Field(
        3, ge=2, le=1000, description="the first epochs of the training, judged by the gate before it continues"
    )
    imgsz: int = Field(640, ge=32, le=4096, description="training image size (pixels)")
    batch: int = Field(8, ge=-1, le=65_536, description="batch size; `-1` lets ultralytics' AutoBatch fill the GPU")
    device: str = Field(
        "auto",
        description="`auto` (CUDA if present, else CPU - never MPS), `cpu`, `0`, `0,1`, `mps`",
    )
    allow_mps: bool = Field(False, description="permit `POGONA_DEVICE=mps` (known to train silently on zeros)")
    workers: int = Field(2, ge=0, description="dataloader workers (capped by CPU count and /dev/shm)")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="seed for training and the train/val split (0 to 2^32-1)")
    optimizer: Literal["SGD", "Adam", "Adamax", "AdamW", "NAdam", "RAdam", "RMSProp", "auto"] = Field(
        "AdamW", description="optimizer"
    )
    lr0: float = Field(0.001, gt=0, le=1, description="initial learning rate")
    patience: int = Field(100, ge=0, description="early-stopping patience (epochs without improvement)")

    # --- dataset ------------------------------------------------------------------------
    val_fraction: float = Field(0.2, gt=0, lt=1, description="share of a flat dataset put in the val split")
    validation_policy: Literal["strict", "lenient"] = Field(
        "strict", description="`strict`: any dataset problem stops the job; `lenient`: drop bad items"
    )
    modality_rules: str = Field(
        "",
        description="declared modalities, before any name pattern or pixel inference: globs per modality, "
        "e.g. `thermal=**/flir/**,**/IR_*;visible=**/rgb/**`",
    )
    group_rules: str = Field(
        "csv;roboflow;sequence;folder",
        description="how the job groups images before making a split (a group never crosses it), tried in "
        "order: `csv`, `roboflow`, `sequence`, `folder`, `none`, `re:<regex with a capture group>` "
        "(dataset/README.md)",
    )
    max_image_pixels: int = Field(100_000_000, ge=1, description="an image with more pixels is a dataset problem")
    max_label_lines: int = Field(10_000, ge=1, description="a label file with more lines is a dataset problem")
    leakage_warn: float = Field(
        0.05, ge=0, le=1, description="warn when more than this share of val/test images has a near-duplicate in train"
    )

    # --- sanity gate --------------------------------------------------------------------
    gate_min_loss_drop: float = Field(
        0.02,
        ge=0,
        lt=1,
        description="sanity, pretrained weights: some loss must fall by at least this fraction over the sanity "
        "batches (median of the last third vs the first third), unless the sanity mAP meets its threshold "
        "(from scratch the trend is shown, not judged: every loss can rise in warm-up)",
    )
    gate_min_map50: float | None = Field(
        None,
        ge=0,
        le=1,
        description="sanity: minimum mAP@0.5; default 0.05 for pretrained weights, 0 for a `.yaml` "
        "(a from-scratch model scores 0 for its first epochs)",
    )

    gate_zero_batches: int = Field(
        6, ge=1, le=1000, description="watchdog: abort after this many consecutive labelled batches with box = dfl = 0"
    )
    gate_zero_map_epochs: int | None = Field(
        None,
        ge=0,
        description="stop full training whose val mAP@0.5 is exactly 0 for this many epochs after the gate; "
        "default 3 for pretrained weights; for a `.yaml` (from scratch scores 0 for its first epochs, longer on small "
        "images and datasets) half of POGONA_EPOCHS, at least 15; 0: never",
    )
    stall_factor: float = Field(
        20.0,
        gt=1,
        description="no progress: stop when no batch finishes for this many times the longest gap between "
        "batches so far",
    )
    stall_min_s: float = Field(
        300.0, gt=0, description="no progress: never stop before this many seconds without a finished batch"
    )
    stall_first_batch_s: float = Field(
        1800.0, gt=0, description="no progress: the wait for the first batch (model build, label scan, caching)"
    )
    modality_lag_margin: float = Field(
        0.1, ge=0, le=1, description="report: flag a modality whose mAP@0.5 trails the best one by more than this"
    )
    min_final_map50: float = Field(
        0.05,
        ge=0,
        le=1,
        description="final verdict: best.pt's mAP@0.5 on val below this fails the run (exit 5; weights and "
        "report still published, latest.json and champion.json untouched); 0 turns the verdict off",
    )
    conf: float = Field(
        0.25,
        gt=0,
        lt=1,
        description="deployment confidence: the confusion matrix, precision/recall in the report, the error "
        "gallery and `predict` count only detections at or above it",
    )

    # --- export and promotion -----------------------------------------------------------
    export_formats: str = Field(
        "onnx", description="exported and verified formats, comma-separated (`onnx`); empty or `none` turns export off"
    )
    export_tolerance: float = Field(
        0.01, ge=0, le=1, description="largest mAP@0.5 difference from best.pt for an export to count as verified"
    )
    promotion_margin: float = Field(
        0.01, ge=0, le=1, description="champion: a modality may trail the champion's mAP@0.5 by at most this"
    )
    promote: Literal["auto", "never", "always"] = Field(
        "auto", description="champion: `auto` (the rules), `never`, or `always` (recorded as forced)"
    )
    promote_lenient: bool = Field(
        False, description="champion: allow promoting a run whose dataset lost images to lenient validation"
    )

    # --- preemption ---------------------------------------------------------------------
    checkpoint_every_epochs: int = Field(
        1, ge=1, description="upload last.pt, results and gate state to `<run>/checkpoint/` every N epochs"
    )
    checkpoint_min_interval_s: float = Field(
        30.0,
        ge=0,
        le=86400,
        allow_inf_nan=False,
        description="...but not more often than this (short demo epochs would spend their time uploading)",
    )
    stop_budget_s: float = Field(
        25.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="after SIGTERM: seconds to save a checkpoint and report, then exit 143",
    )
    lease_ttl_s: float = Field(
        120.0,
        ge=5,
        le=3600,
        allow_inf_nan=False,
        description="a run's lease expires this long after its holder's last heartbeat",
    )

    # --- budget, cost, live status, notifications ----------------------------------------
    max_hours: float | None = Field(
        None,
        gt=0,
        description="budget: wall-clock hours across all attempts of the run; at the budget training stops at an "
        "epoch boundary and best-so-far is published as `partial`",
    )
    max_cost: float | None = Field(
        None, gt=0, description="budget in US$ (needs POGONA_HOURLY_COST): stops like POGONA_MAX_HOURS"
    )
    hourly_cost: float | None = Field(
        None, ge=0, description="price of the machine in US$/hour (set by the infra template) for cost estimates"
    )
    instance_type: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$",
        description="instance type shown in the accounting; default detected (ECS/EC2 metadata), else `unknown`",
    )
    progress_interval_s: float = Field(
        30.0,
        ge=0.2,
        le=3600,
        description="rewrite `<run>/progress.json` this often while the run trains (and at every epoch's end)",
    )
    notify: str | None = Field(
        None,
        description="apprise URLs (space- or comma-separated) told once per terminal state: succeeded, failed, "
        "partial, gate failure, interrupted after the second preemption",
    )

    # --- logging, storage ---------------------------------------------------------------
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="`json` (one object a line), `console`, or `auto` (console on a TTY)"
    )
    s3_threads: int = Field(32, ge=1, le=256, description="parallel S3 transfers (one shared client)")
    s3_max_attempts: int = Field(5, ge=1, le=20, description="botocore attempts per S3 call (standard retry mode)")
    debug: bool = Field(False, description="show tracebacks and ultralytics' own output")

    @field_validator("batch")
    @classmethod
    def _batch(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be a whole number from 1, or -1 for AutoBatch")
        return value

    @model_validator(mode="after")
    def _sanity_within_epochs(self) -> Settings:
        """The sanity epochs are the first epochs of the one training: some must follow the gate."""
        if self.sanity_epochs >= self.epochs:
            raise ConfigError(
                f"POGONA_SANITY_EPOCHS ({self.sanity_epochs}) must be below POGONA_EPOCHS ({self.epochs}), which "
                "counts every training epoch, the sanity epochs included: raise POGONA_EPOCHS or lower "
                "POGONA_SANITY_EPOCHS."
            )
        return self

    @field_validator("dataset_uri", "output_uri", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """`POGONA_OUTPUT_URI=` (set but empty, as templates leave it) means not set: "is required", not a regex."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE.match(value):
            raise ValueError("must be auto, cpu, mps, cuda, a GPU index like 0, or a list like 0,1")
        return value

    @field_validator("export_formats")
    @classmethod
    def _export_formats(cls, value: str) -> str:
        return ",".join(parse_formats(value))

    @property
    def exports(self) -> list[str]:
        return [f for f in self.export_formats.split(",") if f]

    @field_validator("modality_rules")
    @classmethod
    def _modality_rules(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(";"))):
            modality, sep, globs = part.partition("=")
            if not sep or modality.strip().lower() not in ("thermal", "visible") or not globs.strip(" ,"):
                raise ValueError(f"{part!r}: write thermal=glob[,glob...];visible=glob[,glob...]")
        return value

    @field_validator("group_rules")
    @classmethod
    def _group_rules(cls, value: str) -> str:
        for rule in filter(None, (r.strip() for r in value.split(";"))):
            if rule.startswith("re:"):
                try:
                    groups = re.compile(rule[3:]).groups
                except re.error as exc:
                    raise ValueError(f"{rule!r}: {exc}") from None
                if groups < 1:
                    raise ValueError(f"{rule!r}: the regex needs a capture group (the group key)")
            elif rule not in ("csv", "roboflow", "sequence", "folder", "none"):
                raise ValueError(f"{rule!r}: use csv, roboflow, sequence, folder, none or re:<regex>, separated by ;")
        return value

    @field_validator("class_names")
    @classmethod
    def _class_names(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",")]
        if not all(names) or len(set(names)) != len(names):
            raise ValueError("must be distinct, non-empty, comma-separated names")
        return ",".join(names)

    # --- derived values -----------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return self.class_names.split(",")

    @property
    def configured_classes(self) -> list[str] | None:
        """POGONA_CLASS_NAMES when the user set it; None lets the dataset's export name the classes."""
        return self.classes if "class_names" in self.model_fields_set else None

    @property
    def from_scratch(self) -> bool:
        return self.model.endswith((".yaml", ".yml"))

    @property
    def zero_map_epochs(self) -> int:
        if self.gate_zero_map_epochs is not None:
            return self.gate_zero_map_epochs
        # From scratch, a healthy model can score exactly 0 for a third of a short run (measured: 15+ of 30
        # epochs at 128 px on the demo); stopping it would be a false stop, the one thing the gate must not do.
        return max(15, self.epochs // 2) if self.from_scratch else 3

    @property
    def min_map50(self) -> float:
        if self.gate_min_map50 is not None:
            return self.gate_min_map50
        return 0.0 if self.from_scratch else 0.05

    def effective_run_id(self) -> str:
        """The run id: explicit, else the scheduler's stable job id, else a new one."""
        for candidate in (self.run_id, os.environ.get("AWS_BATCH_JOB_ID"), os.environ.get("KUBERNETES_JOB_NAME")):
            if candidate:
                return candidate
        return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)

    def require_uris(self) -> None:
        missing = [env_name(n) for n in ("dataset_uri", "output_uri") if getattr(self, n) is None]
        if missing:
            raise ConfigError(
                f"Required variable{'s' if len(missing) > 1 else ''} not set: {' and '.join(missing)} "
                "(POGONA_DATASET_URI = s3://bucket/prefix of the labelled dataset, POGONA_OUTPUT_URI = "
                "s3://bucket/prefix for the runs); `pogona-job config` lists every variable."
            )


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def known_env_names() -> list[str]:
    return [env_name(f) for f in Settings.model_fields]


def check_unknown_env(environ: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """A misspelled POGONA_* variable would be silently ignored; stop instead."""
    known = set(known_env_names())
    for name in sorted(environ):
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known:
            close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.6)
            hint = f" - did you mean {close[0]}?" if close else f"; known variables: {', '.join(sorted(known))}."
            raise ConfigError(f"Unknown variable {name}{hint}")


def load_settings() -> Settings:
    """Read and validate the environment, or raise ConfigError naming the variable."""
    check_unknown_env()
    try:
        return Settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        raw = os.environ.get(env_name(field), "")
        shown = f" (got {raw!r})" if raw else ""
        raise ConfigError(f"{env_name(field)} is invalid{shown}: {err['msg']}.") from None


def scheduler_attempt(environ: dict[str, str] | os._Environ[str] = os.environ) -> int:
    """AWS Batch's attempt number (1 when not under Batch); the lease lets a newer attempt take over."""
    raw = (environ.get("AWS_BATCH_JOB_ATTEMPT") or "1").strip()
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"AWS_BATCH_JOB_ATTEMPT is invalid (got {raw!r}): it must be a whole number from 1.")
    return int(raw)


def scheduler_job(environ: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    """The scheduler's id of this job, stable across its attempts (None outside a scheduler)."""
    if environ.get("AWS_BATCH_JOB_ID"):
        return f"batch:{environ['AWS_BATCH_JOB_ID']}"
    if environ.get("KUBERNETES_JOB_NAME"):
        return f"k8s:{environ['KUBERNETES_JOB_NAME']}"
    return None


def require_writable(work: Path) -> Path:
    """The work dir must be creatable and writable: one sentence and exit 2 otherwise, not a traceback."""
    try:
        work.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=work, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"POGONA_WORK_DIR={work} is not writable ({exc.strerror or exc}): point it at a writable "
            "folder with room for the dataset and the runs."
        ) from None
    return work


def mask_url(url: str | None) -> str | None:
    """An endpoint URL with `user:password@` keeps its host, never its credentials."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"****@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def notify_urls(value: str | None) -> list[str]:
    """POGONA_NOTIFY's apprise URLs, separated by spaces or commas."""
    return [u for u in re.split(r"[\s,]+", value or "") if u]


def mask(value: str | None) -> str:
    if not value:
        return "(unset)"
    return value[:4] + "*" * max(4, len(value) - 4) if len(value) > 8 else "****"


def effective_config(settings: Settings) -> dict[str, Any]:
    """Everything the job will use, for `pogona-job config` and config.json; secrets masked."""
    out: dict[str, Any] = {
        env_name(k): (str(v) if isinstance(v, Path) else v) for k, v in settings.model_dump().items()
    }
    if settings.notify:  # webhook URLs carry their tokens: keep only the schemes
        out[env_name("notify")] = " ".join(u.split("://")[0] + "://****" for u in notify_urls(settings.notify))
    out["aws"] = {
        "AWS_ENDPOINT_URL_S3": mask_url(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")),
        "AWS_REGION": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        "AWS_PROFILE": os.environ.get("AWS_PROFILE"),
        "AWS_ACCESS_KEY_ID": mask(os.environ.get("AWS_ACCESS_KEY_ID")),
        "AWS_SECRET_ACCESS_KEY": "****" if os.environ.get("AWS_SECRET_ACCESS_KEY") else "(unset)",
        "AWS_SESSION_TOKEN": "****" if os.environ.get("AWS_SESSION_TOKEN") else "(unset)",
    }
    return out


def markdown_table() -> str:
    """The variable table of docs/variables.md, generated so that it cannot drift from the class."""
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        if name in ("dataset_uri", "output_uri"):
            default = "required"
        elif name == "work_dir":
            default = "`$TMPDIR/pogona-job`"
        elif field.default is None:
            default = "see meaning"
        else:
            default = f"`{field.default}`"
        lines.append(f"| {env_name(name)} | {default} | {field.description} |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- BEGIN VARIABLES (make readme) -->", "<!-- END VARIABLES -->"


def readme_with_table(text: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{markdown_table()}{END}{tail}"


VARIABLES_DOC = Path(__file__).resolve().parent.parent / "docs" / "variables.md"


def update_table(path: Path = VARIABLES_DOC) -> Path:
    """Rewrite the table between the markers; a file without them (README.md of old) means docs/variables.md."""
    if BEGIN not in path.read_text():
        path = VARIABLES_DOC
    path.write_text(readme_with_table(path.read_text()))
    return path


if __name__ == "__main__":  # pragma: no cover - used by `make readme`
    if sys.argv[1:2] == ["--update-readme"]:
        written = update_table(Path(sys.argv[2]) if len(sys.argv) > 2 else VARIABLES_DOC)
        print(f"variable table written to {written}")
    else:
        print(markdown_table(), end="")
