"""Stage a validated dataset: apply the policy, split, and write ultralytics' own layout.

The staged tree is `images/{split}` + `labels/{split}` with an explicit data.yaml (a `test:`
key when there is a test split), so ultralytics never has to guess where labels live and
never silently drops an image we did not know about. Only `val` picks best.pt; `test` is
read by the evaluation alone.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path, PurePosixPath

import yaml

from pogona_job.dataset.modality import CSV_NAME, ModalityRecord, modality_csv
from pogona_job.dataset.model import (
    MODALITY_SOURCES,
    SPLIT_ALIASES,
    SPLITS,
    DatasetInventory,
    ImageItem,
    Problem,
    StagedDataset,
)
from pogona_job.dataset.split import assign_splits, near_duplicates
from pogona_job.errors import DatasetError

LEAKAGE_WARN = 0.05  # share of held-out images with a near-duplicate on the train side


def stage_dataset(
    inv: DatasetInventory,
    out_dir: Path,
    class_names: list[str] | None = None,
    *,
    policy: str = "strict",
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 42,
    leakage_warn: float = LEAKAGE_WARN,
) -> StagedDataset:
    """Apply the validation policy, split, and write a clean YOLO tree with data.yaml under `out_dir`.

    `class_names` defaults to the names the inspection settled on (inv.class_names).
    """
    if policy not in ("strict", "lenient"):
        raise ValueError(f"policy must be 'strict' or 'lenient', not {policy!r}")
    names_list = class_names or inv.class_names
    out_dir = out_dir.resolve()
    _prepare_out_dir(inv.root, out_dir)
    problems_file = _write_problems(out_dir, inv.problems) if inv.problems else None
    _enforce_policy(inv.problems, policy, problems_file)

    splits, split_source = assign_splits(inv.items, val_fraction, test_fraction, seed)
    names = _staged_names(inv)
    for split in SPLITS:
        if any(s == split for s in splits.values()):
            (out_dir / "images" / split).mkdir(parents=True)
            (out_dir / "labels" / split).mkdir(parents=True)
    staged: dict[str, str] = {}
    for item in inv.items:
        split, name = splits[item.rel], names[item.rel]
        staged[item.rel] = f"images/{split}/{name}"
        _link_or_copy(item.image, out_dir / staged[item.rel])
        if item.label is not None:
            _link_or_copy(item.label, out_dir / "labels" / split / (PurePosixPath(name).stem + ".txt"))

    split_files = _write_split_lists(out_dir, splits)
    records = modality_records(inv.items)
    modality_file = out_dir / CSV_NAME
    modality_file.write_text(modality_csv(records), encoding="utf-8")
    data_yaml = _write_data_yaml(out_dir, names_list, set(splits.values()))
    leakage = near_duplicates(inv.items, splits)
    leakage["warn"] = leakage["share"] > leakage_warn
    leakage["warn_above"] = leakage_warn
    return StagedDataset(
        root=out_dir,
        data_yaml=data_yaml,
        counts=_count(inv.items, splits),
        images=len(inv.items),
        boxes=sum(it.boxes for it in inv.items),
        backgrounds=sum(1 for it in inv.items if it.boxes == 0),
        split_files=split_files,
        problems_file=problems_file,
        dropped=list(inv.dropped),
        modality_of={it.rel: it.modality for it in inv.items},
        staged=staged,
        layout=inv.layout,
        layout_label=inv.layout_label,
        class_names=list(names_list),
        names_source=inv.names_source,
        split_source=split_source,
        modality_sources=modality_sources(inv.items),
        leakage=leakage,
        notes=list(inv.notes),
        modality_records=records,
        modality_file=modality_file,
        group_of={it.rel: it.group or f"img:{it.rel}" for it in inv.items},
    )


def modality_records(items: list[ImageItem]) -> list[ModalityRecord]:
    """Per image: path, modality, source (declared / pattern / inferred / unknown) and evidence."""
    return [ModalityRecord(it.rel, it.modality, it.modality_source, it.modality_evidence) for it in items]


def modality_sources(items: list[ImageItem]) -> dict[str, dict[str, int]]:
    """{modality: {declared, pattern, inferred, unknown: count}}."""
    out: dict[str, dict[str, int]] = {}
    for it in items:
        per = out.setdefault(it.modality, dict.fromkeys(MODALITY_SOURCES, 0))
        per[it.modality_source] += 1
    return dict(sorted(out.items()))


def _prepare_out_dir(root: Path, out_dir: Path) -> None:
    # We delete out_dir before staging; it must never be (or hold, or sit inside) the dataset itself.
    if out_dir == root or root.is_relative_to(out_dir) or out_dir.is_relative_to(root):
        raise DatasetError(f"The staging folder {out_dir} overlaps the dataset at {root}; choose another.")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)


def _write_problems(out_dir: Path, problems: list[Problem]) -> Path:
    path = out_dir / "problems.txt"
    lines = [f"{'FATAL ' if p.fatal else ''}[{p.kind}] {p.message}" for p in problems]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _enforce_policy(problems: list[Problem], policy: str, problems_file: Path | None) -> None:
    fatal = [p for p in problems if p.fatal]
    if fatal:
        raise DatasetError(
            f"The dataset cannot be used: {fatal[0].message} ({_count_phrase(problems)}; full list: {problems_file})."
        )
    if problems and policy == "strict":
        raise DatasetError(
            f"The dataset has {_count_phrase(problems)}, first: {problems[0].message}; full list: {problems_file}. "
            "Fix them, or set POGONA_VALIDATION_POLICY=lenient to drop the affected images."
        )


def _count_phrase(problems: list[Problem]) -> str:
    files = len({p.path for p in problems})
    return f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {files} file{'s' if files != 1 else ''}"


def _staged_names(inv: DatasetInventory) -> dict[str, str]:
    """Flat, unique, layout-independent file names: the path without split and `images` folders, "/" -> "__"."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for it in sorted(inv.items, key=lambda i: i.rel):
        parts = list(PurePosixPath(it.rel).parts)
        if it.split is not None:  # the export's split folder is not part of the name
            parts = [p for i, p in enumerate(parts[:-1]) if not (i < 2 and p.lower() in SPLIT_ALIASES)] + parts[-1:]
        if "images" in parts[:-1]:
            parts.pop(len(parts) - 2 - parts[-2::-1].index("images"))
        name = "__".join(parts)
        stem = PurePosixPath(name).stem
        if stem.lower() in taken:  # labels are per stem: a.jpg + a.png would share one label
            digest = hashlib.sha256(it.rel.encode()).hexdigest()[:8]
            name = f"{stem}-{digest}{PurePosixPath(name).suffix}"
        taken.add(PurePosixPath(name).stem.lower())
        names[it.rel] = name
    return names


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not permitted
        shutil.copy2(src, dst)


def _write_split_lists(out_dir: Path, splits: dict[str, str]) -> list[Path]:
    files = []
    for split in SPLITS:
        rels = sorted(rel for rel, s in splits.items() if s == split)
        if rels:
            path = out_dir / f"{split}.txt"
            path.write_text("\n".join(rels) + "\n", encoding="utf-8")
            files.append(path)
    return files


def _write_data_yaml(out_dir: Path, class_names: list[str], splits: set[str]) -> Path:
    data: dict[str, object] = {"path": str(out_dir)}
    for split in SPLITS:
        if split in splits:
            data[split] = f"images/{split}"
    data["names"] = dict(enumerate(class_names))
    path = out_dir / "data.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _count(items: list[ImageItem], splits: dict[str, str]) -> dict[str, dict[str, int]]:
    modalities = sorted({it.modality for it in items})
    counts = {s: dict.fromkeys(modalities, 0) for s in SPLITS if s in splits.values()}
    for it in items:
        counts[splits[it.rel]][it.modality] += 1
    return counts


def format_problems(problems: list[Problem], limit: int = 20) -> str:
    """One indented line per problem, fatal ones first, at most `limit` of them (the caller adds a summary)."""
    shown = sorted(problems, key=lambda p: not p.fatal)[:limit]
    lines = [f"  {'FATAL ' if p.fatal else ''}[{p.kind}] {p.message}" for p in shown]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)
