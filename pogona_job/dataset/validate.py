"""Inspect a dataset folder: every image decoded, every label line parsed, every problem listed.

`inspect_dataset` never raises on bad data: it returns the inventory (what can be used) and
the problems (what cannot, each with its file and line). It reads the layout (which tool
wrote the folder), the class names the export carries, each image's modality and group.
"""

from __future__ import annotations

import csv
import re
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import imagehash
import yaml
from PIL import Image

from pogona_job.dataset import layouts, modality, split
from pogona_job.dataset.layouts import IMG_FORMATS, SUPPORTED_EXTENSIONS, Layout, Scan
from pogona_job.dataset.model import DatasetInventory, ImageItem, Problem

DEFAULT_CLASS_NAMES = ["pogona_head"]
MIN_IMAGE_SIDE = 10  # ultralytics rejects images with a side of 9 px or less
MAX_IMAGE_PIXELS = 100_000_000
MAX_LABEL_LINES = 10_000
_MAX_LINE_CHARS = 4096  # a label line is ~50 characters; longer is garbage, not worth reading
_ANALYSIS_SIDE = 128  # JPEGs are decoded at reduced scale (DCT scaling) to about this size: a palette bar survives
_COORD_TOLERANCE = 1e-6  # annotation tools round; 1.0000001 is not an error
# Pillow's format name for each extension; a file whose content is another format gets a note.
_FORMAT_OF = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP", "tif": "TIFF"}
_FORMAT_OF |= {"tiff": "TIFF", "dng": "TIFF", "mpo": "MPO", "heic": "HEIF", "heif": "HEIF", "avif": "AVIF"}
_FORMAT_OF |= {"jp2": "JPEG2000"}
_SAME_FORMAT = {frozenset({"JPEG", "MPO"})}  # phones write MPO into .jpg files: the same thing to a decoder


@dataclass(frozen=True)
class Options:
    """How to read a dataset; `from_settings` maps the POGONA_* variables."""

    thermal_pattern: str = modality.DEFAULT_THERMAL_PATTERN
    visible_pattern: str = modality.DEFAULT_VISIBLE_PATTERN
    modality_rules: str = ""
    group_rules: str = split.DEFAULT_GROUP_RULES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_label_lines: int = MAX_LABEL_LINES
    min_val_images: int = 2

    @classmethod
    def from_settings(cls, settings: object) -> Options:
        names = ("modality_rules", "group_rules", "max_image_pixels", "max_label_lines")
        return cls(**{n: getattr(settings, n) for n in names if hasattr(settings, n)})


@dataclass
class _ImageResult:
    rel: str
    modality: str
    source: str
    boxes: int
    phash: int | None
    problems: list[Problem]
    notes: list[Problem] = field(default_factory=list)
    evidence: str = ""


def inspect_dataset(
    root: Path, class_names: list[str] | None = None, options: Options | None = None
) -> DatasetInventory:
    """Inventory and validate the dataset at `root`; every problem is listed, nothing raises.

    `class_names`: POGONA_CLASS_NAMES when the user set it; None takes the export's names
    (data.yaml, obj.names, classes.txt, notes.json), else the default.
    """
    opts = options or Options()
    root = root.resolve()
    if not root.is_dir():
        problem = Problem(".", None, "empty-dataset", f"{root} is not a directory", fatal=True)
        return DatasetInventory(root, "flat", [], [problem], 0, 0, [])
    found = layouts.scan(root)
    layout = layouts.read_layout(root, found)
    sidecars = _sidecars(root, found)
    names, names_source, name_problems = _class_names(root, layout, class_names)
    label_of, pairing_problems, companions = _pair_labels(root, found, layout)
    table = _groups_csv(root)
    rules = modality.parse_rules(opts.modality_rules)
    thermal = re.compile(opts.thermal_pattern, re.IGNORECASE)
    visible = re.compile(opts.visible_pattern, re.IGNORECASE)

    def modality_of(rel: str) -> tuple[str | None, str, str]:
        """(modality or None, source, evidence): declared, then named; None leaves it to the pixels."""
        ruled = modality.by_rules(rel, rules)
        if ruled:
            return ruled, "declared", f"POGONA_MODALITY_RULES: {ruled}"
        if rel in table.modality:
            return table.modality[rel], "declared", "groups.csv modality column"
        folder = modality.sidecar_folder(rel, sidecars)
        if folder is not None:
            return sidecars[folder], "declared", f"{(PurePosixPath(folder) / modality.SIDECAR).as_posix()}"
        named = modality.by_name(rel, thermal, visible)
        if named:
            return named, "pattern", f"the path matches the {named} name pattern"
        return None, "inferred", ""

    def check(rel: str) -> _ImageResult:
        label = label_of.get(rel)
        boxes, problems = (0, []) if label is None else check_label(root / label, label, names, opts.max_label_lines)
        known, source, why = modality_of(rel)
        res = _check_image(root / rel, rel, opts.max_image_pixels, known is None)
        modality_ = known or res.modality
        source = source if known else ("unknown" if modality_ == "unknown" else "inferred")
        return _ImageResult(
            rel, modality_, source, boxes, res.phash, res.problems + problems, res.notes, why or res.evidence
        )

    # Threads overlap file reads (network disks, cold caches); the decoding itself is mostly GIL-bound.
    # Pillow warns (palette transparency, EXIF, huge images) through `warnings`, which would print
    # free text into JSON log lines: every such case is a problem or note of ours instead.
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=4) as pool:
        warnings.simplefilter("ignore")
        results = list(pool.map(check, found.images))

    excluded = {p.path for p in pairing_problems if p.kind != "missing-image"} | set(found.unsupported)
    excluded |= {p.path for p in layout.problems} & set(found.images)
    excluded |= {res.rel for res in results if res.problems}
    kept = [r for r in results if r.rel not in excluded]
    groups = split.group_keys([r.rel for r in kept], opts.group_rules, table.groups, {r.rel: r.phash for r in kept})
    items = [
        ImageItem(
            image=root / res.rel,
            label=root / label_of[res.rel] if res.rel in label_of else None,
            rel=res.rel,
            modality=res.modality,
            boxes=res.boxes,
            split=layout.split_of.get(res.rel),
            modality_source=res.source,
            modality_evidence=res.evidence,
            group=groups[res.rel],  # a group is never cut, whatever modalities its images were judged
            phash=res.phash,
        )
        for res in results
        if res.rel not in excluded
    ]
    problems = name_problems + pairing_problems + layout.problems
    problems += [p for res in results for p in res.problems]
    problems += [_extension_problem(rel) for rel in found.unsupported]
    problems += _dataset_problems(root, found, items, opts.min_val_images)
    problems.sort(key=lambda p: (not p.fatal, p.path, p.line or 0, p.kind))
    notes = [n for res in results for n in res.notes] + table.notes + layout.notes
    notes.sort(key=lambda n: (n.path, n.line or 0))
    return DatasetInventory(
        root=root,
        layout=layout.key,
        items=items,
        problems=problems,
        junk_ignored=found.junk,
        backgrounds=sum(1 for it in items if it.boxes == 0),
        dropped=sorted(excluded),
        layout_label=layout.label,
        class_names=names,
        names_source=names_source,
        notes=notes,
        companions=companions,
    )


# --------------------------------------------------------------------------------------
# Class names
# --------------------------------------------------------------------------------------


def _class_names(root: Path, layout: Layout, configured: list[str] | None) -> tuple[list[str], str, list[Problem]]:
    """The names to train with, where they came from, and any disagreement (fatal)."""
    carried: list[tuple[str, list[str]]] = []
    problems = []
    for rel in layout.name_files:
        try:
            names = layouts.read_class_names(root / rel)
        except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as exc:
            problems.append(Problem(rel, None, "class-names", f"{rel}: cannot be read ({exc})", fatal=True))
            continue
        if names is not None:
            carried.append((rel, names))
    if configured is not None:
        names, source, against = configured, "POGONA_CLASS_NAMES", "POGONA_CLASS_NAMES is"
    elif carried:
        (source, names), against = carried[0], f"{carried[0][0]} names"
    else:
        names, source, against = list(DEFAULT_CLASS_NAMES), "default", "the default is"
    for rel, other in carried:
        if other != names:
            problems.append(
                Problem(
                    rel,
                    None,
                    "class-names",
                    f"{rel} names the classes {other} but {against} {names} (in class-id order); "
                    "make them equal, or unset POGONA_CLASS_NAMES to take the export's names",
                    fatal=True,
                )
            )
    return names, source, problems


# --------------------------------------------------------------------------------------
# Pairing labels with images; companion files
# --------------------------------------------------------------------------------------


def _label_candidates(rel: str) -> list[str]:
    """Where an image's label may live: the mirror under labels/ (as ultralytics looks), else beside it."""
    path = PurePosixPath(rel)
    stem_txt = path.stem + ".txt"
    candidates = []
    if "images" in path.parts[:-1]:
        i = len(path.parts) - 2 - path.parts[-2::-1].index("images")  # last "images" directory
        candidates.append(PurePosixPath(*path.parts[:i], "labels", *path.parts[i + 1 : -1], stem_txt).as_posix())
    candidates.append((path.parent / stem_txt).as_posix())
    return candidates


def _pair_labels(root: Path, found: Scan, layout: Layout) -> tuple[dict[str, str], list[Problem], int]:
    """Each image's label file; problems for shared stems and for labels without an image."""
    texts = found.texts - layout.list_files
    label_of: dict[str, str] = {}
    claimed: set[str] = set()
    problems = []
    for rel in found.images + found.unsupported:
        candidates = [c for c in _label_candidates(rel) if c in texts]
        claimed.update(candidates)
        if len(candidates) == 1:
            label_of[rel] = candidates[0]
        elif candidates:
            problems.append(
                Problem(
                    rel,
                    None,
                    "duplicate-label",
                    f"{rel}: has two label files, {candidates[0]} and {candidates[1]}; keep one",
                )
            )
    for rel in found.unsupported:
        label_of.pop(rel, None)  # claimed (so not reported as orphaned), but never used
    by_stem: dict[tuple[str, str], list[str]] = defaultdict(list)
    for rel in found.images + found.unsupported:
        path = PurePosixPath(rel)
        by_stem[(str(path.parent), path.stem)].append(rel)
    problems += [
        _duplicate_stem_problem(rel, group) for group in by_stem.values() if len(group) > 1 for rel in sorted(group)
    ]
    orphans = sorted(texts - claimed)
    # An unpaired .txt that reads like labels lost its image; anything else (README.dataset.txt,
    # a list of paths, notes) is a companion file of the export and none of our business.
    lost = [rel for rel in orphans if _looks_like_labels(root / rel)]
    problems += [
        Problem(
            label,
            None,
            "missing-image",
            f"{label}: label file has no matching image (same stem, in "
            "images/ mirroring labels/, or beside it); it is ignored",
        )
        for label in lost
    ]
    return label_of, problems, len(orphans) - len(lost) + len(layout.list_files)


def _looks_like_labels(path: Path, sample: int = 20) -> bool:
    try:
        with path.open(encoding="utf-8-sig", errors="replace") as f:
            lines = [line.split() for line in (f.readline(_MAX_LINE_CHARS) for _ in range(sample)) if line.strip()]
    except OSError:
        return False
    return bool(lines) and all(len(fields) == 5 and all(map(_is_number, fields)) for fields in lines)


def _duplicate_stem_problem(rel: str, group: list[str]) -> Problem:
    names = ", ".join(sorted(PurePosixPath(g).name for g in group))
    label = PurePosixPath(rel).stem + ".txt"
    return Problem(
        rel, None, "duplicate-stem", f"{rel}: images {names} share one stem, so a single {label} would label both"
    )


def _extension_problem(rel: str) -> Problem:
    ok = " ".join(sorted(SUPPORTED_EXTENSIONS))
    return Problem(rel, None, "extension", f"{rel}: unsupported or odd image extension; use one of {ok}")


# --------------------------------------------------------------------------------------
# groups.csv and modality sidecars
# --------------------------------------------------------------------------------------


@dataclass
class _Table:
    groups: dict[str, str] = field(default_factory=dict)
    modality: dict[str, str] = field(default_factory=dict)
    notes: list[Problem] = field(default_factory=list)


def _groups_csv(root: Path) -> _Table:
    """groups.csv at the root: `path,group[,modality]`, a header row optional."""
    table = _Table()
    path = root / "groups.csv"
    if not path.is_file():
        return table
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    columns = ["path", "group", "modality"]
    if rows and rows[0] and rows[0][0].strip().lower() == "path":
        columns = [c.strip().lower() for c in rows[0]]
        rows = rows[1:]
    for number, row in enumerate(rows, start=2 if columns != ["path", "group", "modality"] else 1):
        cells = dict(zip(columns, (c.strip() for c in row), strict=False))
        rel = cells.get("path", "").replace("\\", "/").removeprefix("./")
        if not rel:
            continue
        if not (root / rel).is_file():
            table.notes.append(Problem("groups.csv", number, "groups-csv", f"groups.csv line {number}: no file {rel}"))
        if cells.get("group"):
            table.groups[rel] = cells["group"]
        if cells.get("modality", "").lower() in ("thermal", "visible"):
            table.modality[rel] = cells["modality"].lower()
    return table


def _sidecars(root: Path, found: Scan) -> dict[str, str]:
    """{folder: modality} from `modality.txt` files holding one word, thermal or visible."""
    out = {}
    for rel in sorted(found.texts):
        path = PurePosixPath(rel)
        if path.name.lower() == modality.SIDECAR:
            word = (root / rel).read_text(encoding="utf-8-sig", errors="replace").strip().lower()
            if word in ("thermal", "visible"):
                out[path.parent.as_posix()] = word
    return out


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------


@dataclass
class _Decoded:
    modality: str
    phash: int | None
    problems: list[Problem]
    notes: list[Problem]
    evidence: str = ""


def _check_image(path: Path, rel: str, max_pixels: int, infer: bool) -> _Decoded:
    """Decode the image (cheaply), judge its modality, hash it; problems if it cannot be used."""
    out = _Decoded("unknown", None, [], [])
    try:
        if path.stat().st_size == 0:
            out.problems.append(Problem(rel, None, "corrupt-image", f"{rel}: image file is empty (0 bytes)"))
            return out
        with Image.open(path) as im:
            fmt, (width, height) = im.format or "?", im.size
            if width * height > max_pixels:  # checked on the header, before anything is decoded
                out.problems.append(_pixels_problem(rel, width, height, max_pixels))
                return out
            if fmt != "JPEG":  # structure and checksums (PNG CRCs); for JPEG, load() below is stricter
                im.verify()
        with Image.open(path) as im:
            im.draft("RGB", (_ANALYSIS_SIDE, _ANALYSIS_SIDE))  # JPEG: decode at 1/2..1/8 scale
            im.load()  # decodes all the data: a truncated file fails here
            if infer:
                verdict = modality.judge(im)
                out.modality, out.evidence = verdict.modality, verdict.evidence
            out.phash = int(str(imagehash.phash(im)), 16)
    except Image.DecompressionBombError:
        out.problems.append(_pixels_problem(rel, 0, 0, max_pixels))
        return out
    except Exception as exc:  # Pillow raises many types for bad files; all mean "cannot use it"
        reason = str(exc) or type(exc).__name__
        out.problems.append(Problem(rel, None, "corrupt-image", f"{rel}: image cannot be decoded ({reason})"))
        return out
    ext = PurePosixPath(rel).suffix.lower().lstrip(".")
    if fmt.lower() not in IMG_FORMATS:
        out.problems.append(
            Problem(rel, None, "format", f"{rel}: the file is a {fmt} image, which ultralytics does not train on")
        )
    elif _FORMAT_OF.get(ext) != fmt and frozenset({_FORMAT_OF.get(ext), fmt}) not in _SAME_FORMAT:
        out.notes.append(
            Problem(rel, None, "extension-mismatch", f"{rel}: named .{ext} but holds a {fmt} image (decoded as {fmt})")
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        out.problems.append(
            Problem(
                rel,
                None,
                "image-size",
                f"{rel}: image is {width}x{height} px; sides under {MIN_IMAGE_SIDE} px are rejected by ultralytics",
            )
        )
    return out


def _pixels_problem(rel: str, width: int, height: int, limit: int) -> Problem:
    size = f"{width}x{height} px" if width else "over twice Pillow's pixel limit"
    return Problem(
        rel,
        None,
        "image-pixels",
        f"{rel}: image is {size}, over the limit of {limit:,} pixels (POGONA_MAX_IMAGE_PIXELS)",
    )


# --------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------


def check_label(
    path: Path, rel: str, class_names: list[str], max_lines: int = MAX_LABEL_LINES
) -> tuple[int, list[Problem]]:
    problems: list[Problem] = []
    seen: dict[tuple[float, ...], int] = {}
    boxes = 0
    try:
        f = path.open(encoding="utf-8-sig", errors="replace", newline=None)
    except OSError as exc:
        return 0, [Problem(rel, None, "unreadable", f"{rel}: label file cannot be read ({exc.strerror})")]
    with f:
        for number in range(1, max_lines + 2):
            line = f.readline(_MAX_LINE_CHARS)
            if not line:
                break
            rest = line
            while not rest.endswith("\n") and len(rest) >= _MAX_LINE_CHARS:
                rest = f.readline(_MAX_LINE_CHARS)  # skip the rest of an overlong line: one line, one verdict
            if number > max_lines:
                problems.append(
                    Problem(
                        rel,
                        number,
                        "label-lines",
                        f"{rel} line {number}: more than {max_lines:,} lines (POGONA_MAX_LABEL_LINES); not read on",
                    )
                )
                break
            if not line.strip():
                continue
            values, problem = parse_line(line, rel, number, class_names)
            if problem:
                problems.append(problem)
                continue
            assert values is not None
            key = tuple(round(v, 6) for v in values)
            if key in seen:
                problems.append(
                    Problem(rel, number, "duplicate-box", f"{rel} line {number}: repeats the box on line {seen[key]}")
                )
                continue
            seen[key] = number
            boxes += 1
    return boxes, problems


def parse_line(
    line: str, rel: str, number: int, class_names: list[str]
) -> tuple[tuple[float, ...] | None, Problem | None]:
    """One label line -> (class, x, y, w, h), or the problem with it."""
    where = f"{rel} line {number}"

    def problem(kind: str, text: str) -> tuple[None, Problem]:
        return None, Problem(rel, number, kind, f"{where}: {text}")

    fields = line.split()
    if len(fields) != 5:
        return problem(
            "malformed-line", f"expected 5 values (class x_center y_center width height), found {len(fields)}"
        )
    if not all(map(_is_number, fields)):
        bad = next(f for f in fields if not _is_number(f))
        return problem("malformed-line", f"{bad!r} is not a number")
    values = tuple(float(f) for f in fields)
    cls, x, y, w, h = values
    nc = len(class_names)
    if not cls.is_integer():
        return problem("class-id", f"class id {fields[0]} is not a whole number")
    if not 0 <= cls < nc:
        return problem("class-id", f"class id {int(cls)} is not valid: {valid_ids(class_names)}")
    if not (w > 0 and h > 0):
        return problem("size", f"box width and height must be positive, found width={fields[3]} height={fields[4]}")
    names = ("x_center", "y_center", "width", "height")
    for name, value, text in zip(names, (x, y, w, h), fields[1:], strict=True):
        if not -_COORD_TOLERANCE <= value <= 1 + _COORD_TOLERANCE:
            return problem("coords", f"{name}={text} is outside [0, 1] (coordinates are normalised to the image)")
    return values, None


def valid_ids(class_names: list[str]) -> str:
    """ "valid ids are 0-7 (names '1' ... '8')": ids and names apart, so numeric names cannot mislead."""
    if not class_names:
        return "no classes are configured"
    if len(class_names) == 1:
        return f"the only valid id is 0 (name {class_names[0]!r})"
    shown = [repr(n) for n in class_names]
    names = ", ".join(shown) if len(shown) <= 4 else f"{shown[0]}, {shown[1]} ... {shown[-1]}"
    return f"valid ids are 0-{len(class_names) - 1} (names {names})"


def _is_number(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return value == value and abs(value) != float("inf")  # nan and inf are not coordinates


# --------------------------------------------------------------------------------------
# The dataset as a whole
# --------------------------------------------------------------------------------------


def _dataset_problems(root: Path, found: Scan, items: list[ImageItem], min_val_images: int) -> list[Problem]:
    """Problems no amount of dropping can fix."""
    if not found.images and not found.unsupported:
        ok = " ".join(sorted(SUPPORTED_EXTENSIONS))
        return [Problem(".", None, "empty-dataset", f"no images found under {root} ({ok})", fatal=True)]
    problems = []
    train = sum(1 for it in items if it.split == "train")
    val = sum(1 for it in items if it.split == "val")
    if val:  # the export's split is used as it is
        if val < min_val_images or train == 0:
            problems.append(
                Problem(
                    ".",
                    None,
                    "too-few-images",
                    f"only {train} valid train and {val} valid val images: "
                    f"at least 1 train and {min_val_images} val images are needed",
                    fatal=True,
                )
            )
    else:  # the job makes val out of everything that is not the export's test split
        pool = sum(1 for it in items if it.split != "test")
        if pool < min_val_images + 1:
            problems.append(
                Problem(
                    ".",
                    None,
                    "too-few-images",
                    f"only {pool} valid images: at least {min_val_images + 1} are "
                    f"needed to hold out {min_val_images} for validation and train on the rest",
                    fatal=True,
                )
            )
    if items and not any(it.boxes for it in items):
        problems.append(
            Problem(
                ".",
                None,
                "no-labels",
                f"none of the {len(items)} valid images has a box: label files are missing "
                "or empty (labels go in labels/ mirroring images/, or beside each image, same stem, .txt)",
                fatal=True,
            )
        )
    return problems
