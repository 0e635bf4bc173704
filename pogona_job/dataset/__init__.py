"""Read, validate, split and stage a YOLO detection dataset, whichever tool exported it.

The steps, one module each:
- `layouts`: which tool wrote the folder (Ultralytics, Roboflow, CVAT, darknet-style, Label Studio, flat);
  its split, class names and companion files;
- `validate`: every image decoded, every label line parsed, every problem with file and line;
- `modality`: thermal or visible - declared, matched by name, or inferred only on positive
  evidence (grey is `unknown`); per-image records for `modality.csv` and thumbnails;
- `split`: by group (no leakage), stratified by modality; near-duplicates measured (whole image,
  then the labelled regions);
- `stage`: the policy applied and ultralytics' layout written with an explicit data.yaml.
"""

from pogona_job.dataset.layouts import SUPPORTED_EXTENSIONS, UNSUPPORTED_IMAGE_EXTENSIONS
from pogona_job.dataset.modality import (
    DEFAULT_THERMAL_PATTERN,
    GREY_SENTENCE,
    ModalityRecord,
    Verdict,
    judge,
    modality_csv,
    pixel_modality,
)
from pogona_job.dataset.model import SPLIT_ALIASES, SPLITS, DatasetInventory, ImageItem, Problem, StagedDataset
from pogona_job.dataset.stage import format_problems, stage_dataset
from pogona_job.dataset.validate import MIN_IMAGE_SIDE, Options, inspect_dataset

__all__ = [
    "DEFAULT_THERMAL_PATTERN",
    "GREY_SENTENCE",
    "MIN_IMAGE_SIDE",
    "SPLITS",
    "SPLIT_ALIASES",
    "SUPPORTED_EXTENSIONS",
    "UNSUPPORTED_IMAGE_EXTENSIONS",
    "DatasetInventory",
    "ImageItem",
    "ModalityRecord",
    "Options",
    "Problem",
    "StagedDataset",
    "Verdict",
    "format_problems",
    "inspect_dataset",
    "judge",
    "modality_csv",
    "pixel_modality",
    "stage_dataset",
]
