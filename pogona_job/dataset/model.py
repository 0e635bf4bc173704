"""The records the dataset steps pass along: problems, images, the inventory, the staged tree."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pogona_job.dataset.modality import ModalityRecord, contact_sheets

SPLITS = ("train", "val", "test")
# Folder names tools use for a split: Roboflow writes `valid`, some people `validation`.
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MODALITIES = ("thermal", "visible", "unknown")
# How an image's modality was decided, strongest first.
MODALITY_SOURCES = ("declared", "pattern", "inferred", "unknown")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the dataset (or, in `notes`, worth knowing), tied to a file and line."""

    path: str
    line: int | None
    kind: str
    message: str
    fatal: bool = False


@dataclass
class ImageItem:
    image: Path
    label: Path | None
    rel: str
    modality: str  # "thermal" | "visible" | "unknown"
    boxes: int
    split: str | None  # the export's own split, None when it carries none
    modality_source: str = "inferred"
    modality_evidence: str = ""  # the rule, file or pixel evidence behind the modality
    group: str = ""  # images of one group always land in the same split
    phash: int | None = None  # 64-bit perceptual hash, for near-duplicate leakage


@dataclass
class DatasetInventory:
    root: Path
    layout: str  # short key: ultralytics, roboflow, cvat, darknet, label-studio, flat
    items: list[ImageItem]
    problems: list[Problem]
    junk_ignored: int
    backgrounds: int
    dropped: list[str]
    layout_label: str = "plain folders (flat)"
    class_names: list[str] = field(default_factory=list)
    names_source: str = "default"  # POGONA_CLASS_NAMES, an export file (data.yaml ...), or default
    notes: list[Problem] = field(default_factory=list)  # listed, never a reason to stop
    companions: int = 0  # READMEs, notes, list files: part of the export, not labels

    @property
    def has_split(self) -> bool:
        """The export says which images are for validation."""
        return any(it.split == "val" for it in self.items)


@dataclass
class StagedDataset:
    root: Path
    data_yaml: Path
    counts: dict[str, dict[str, int]]
    images: int
    boxes: int
    backgrounds: int
    split_files: list[Path]
    problems_file: Path | None
    dropped: list[str]
    modality_of: dict[str, str]
    # rel path -> staged image path relative to `root` (e.g. "images/val/cam1__a.jpg").
    staged: dict[str, str] = field(default_factory=dict)
    layout: str = "flat"
    layout_label: str = "plain folders (flat)"
    class_names: list[str] = field(default_factory=list)
    names_source: str = "default"
    split_source: str = "made by the job"  # or "export"
    # {modality: {declared, pattern, inferred, unknown}}: how each image's modality was decided.
    modality_sources: dict[str, dict[str, int]] = field(default_factory=dict)
    leakage: dict[str, Any] = field(default_factory=dict)
    notes: list[Problem] = field(default_factory=list)
    # rel path -> the group the split kept together (groups.csv, Roboflow siblings, frame sequence, folder);
    # the evaluation's bootstrap resamples these groups, not single images.
    group_of: dict[str, str] = field(default_factory=dict)
    # Per image: modality, how it was decided and on what evidence; written to `modality_file`.
    modality_records: list[ModalityRecord] = field(default_factory=list)
    modality_file: Path | None = None  # <root>/modality.csv, beside the split lists

    @property
    def published_files(self) -> list[Path]:
        """What a run publishes under `dataset/`: the split lists, then modality.csv."""
        return [*self.split_files, *([self.modality_file] if self.modality_file else [])]

    def modality_thumbnails(self, dest: Path, per_modality: int = 8) -> dict[str, Path]:
        """A strip of thumbnails per modality inferred from pixels (`modality-<m>.png` under dest)."""
        image_of = {rel: self.root / staged for rel, staged in self.staged.items()}
        return contact_sheets(self.modality_records, image_of, dest, per_modality=per_modality)

    def leakage_thumbnails(self, dest: Path) -> dict[str, Path]:
        """Near-duplicate pairs side by side: `leakage-pairs.png` (counted as leaks) and
        `leakage-alike-labels-differ.png` (alike as whole images, not where the labels are), when any."""
        from pogona_job.dataset.split import pair_sheet

        image_of = {rel: self.root / staged for rel, staged in self.staged.items()}
        out = {}
        for key, name in (
            ("examples", "leakage-pairs.png"),
            ("alike_but_labels_differ_examples", "leakage-alike-labels-differ.png"),
        ):
            sheet = pair_sheet(self.leakage.get(key) or [], image_of, dest / name)
            if sheet is not None:
                out[key] = sheet
        return out

    def split_of(self, rel: str) -> str:
        """ "train", "val" or "test"."""
        return PurePosixPath(self.staged[rel]).parts[1]

    def summary(self) -> dict[str, Any]:
        """What the manifest records about how the data was read, split and labelled."""
        return {
            "layout": self.layout,
            "layout_label": self.layout_label,
            "class_names": self.class_names,
            "names_source": self.names_source,
            "split_source": self.split_source,
            "modality_sources": self.modality_sources,
            "leakage": self.leakage,
            "notes": [n.message for n in self.notes],
            "dropped": list(self.dropped),
        }
