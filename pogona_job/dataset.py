"""Inspect, validate, split and stage a YOLO detection dataset.

`inspect_dataset` reads a folder in either accepted layout (see dataset/README.md), decodes
every image cheaply, parses every label line and lists each problem with its file and line;
it never raises on bad data. `stage_dataset` applies the validation policy, splits a flat
dataset deterministically (stratified by modality) and writes a standard
`images/{split}` + `labels/{split}` tree with an explicit data.yaml, so ultralytics never
has to guess where labels live and never silently drops an image we did not know about.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import numpy.typing as npt
import yaml
from PIL import Image

from pogona_job.errors import DatasetError

SUPPORTED_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
# Image formats we refuse (ultralytics reads some, but not with every build, and OpenCV not at all).
_REFUSED = "gif webp heic heif avif jfif jp2 dng mpo tga ppm pgm pbm pfm ico svg psd raw cr2 nef arw"
UNSUPPORTED_IMAGE_EXTENSIONS = frozenset("." + ext for ext in _REFUSED.split())
# "a.jpg~", "a.jpg_large", "a.png.part", "a.jpg ": an image name with trailing debris.
_ODD_IMAGE_NAME = re.compile(
    r"\.(jpe?g|png|bmp|tiff?)(\S*\s+|[~_\-].*|\d+|\.(part|crdownload|download|tmp|bak|orig))$", re.IGNORECASE
)
_JUNK_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r"})
_DATA_YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml")
_CLASSES_TXT = "classes.txt"  # LabelImg writes one beside the labels
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
SPLITS = ("train", "val", "test")
DEFAULT_THERMAL_PATTERN = r"therm|infra-?red|flir|lwir|(?<![a-z])ir(?![a-z])"
MIN_IMAGE_SIDE = 10  # ultralytics rejects images with a side of 9 px or less
_ANALYSIS_SIDE = 64  # JPEGs are decoded at reduced scale (DCT scaling) to about this size: cheap
_SAMPLE_SIDE = 32  # modality is judged on 32x32 sampled pixels: plenty for colour statistics
_CLUSTERS = 12
_CURVE_TOLERANCE = 0.16  # measured: 22 OpenCV palettes score <= 0.12, demo photographs >= 0.22
_COORD_TOLERANCE = 1e-6  # annotation tools round; 1.0000001 is not an error

Rgb = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the dataset, tied to a file (and line) where it can be fixed."""

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
    modality: str
    boxes: int
    split: str | None


@dataclass
class DatasetInventory:
    root: Path
    layout: str
    items: list[ImageItem]
    problems: list[Problem]
    junk_ignored: int
    backgrounds: int
    dropped: list[str]


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

    def split_of(self, rel: str) -> str:
        return PurePosixPath(self.staged[rel]).parts[1]


# --------------------------------------------------------------------------------------
# Inspection
# --------------------------------------------------------------------------------------


@dataclass
class _Scan:
    """Files found under the root, sorted into roles."""

    images: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    labels: set[str] = field(default_factory=set)
    class_files: list[str] = field(default_factory=list)
    junk: int = 0


@dataclass
class _ImageResult:
    rel: str
    modality: str
    boxes: int
    problems: list[Problem]


def inspect_dataset(
    root: Path,
    class_names: list[str],
    *,
    thermal_pattern: str = DEFAULT_THERMAL_PATTERN,
    min_val_images: int = 2,
) -> DatasetInventory:
    """Inventory and validate the dataset at `root`; every problem is listed, nothing raises."""
    root = root.resolve()
    if not root.is_dir():
        problem = Problem(".", None, "empty-dataset", f"{root} is not a directory", fatal=True)
        return DatasetInventory(root, "flat", [], [problem], 0, 0, [])
    scan = _scan(root)
    layout = _detect_layout(root)
    label_of, pairing_problems = _pair_labels(scan)
    pattern = re.compile(thermal_pattern, re.IGNORECASE)
    results = _check_images(root, scan.images, label_of, class_names, pattern)
    if layout == "pre-split":
        for res in results:
            if _split_from_path(res.rel) is None:
                res.problems.append(_layout_problem(res.rel))

    excluded = {p.path for p in pairing_problems if p.kind != "missing-image"} | set(scan.unsupported)
    excluded |= {res.rel for res in results if res.problems}
    items = [
        ImageItem(
            image=root / res.rel,
            label=root / label_of[res.rel] if res.rel in label_of else None,
            rel=res.rel,
            modality=res.modality,
            boxes=res.boxes,
            split=_split_from_path(res.rel) if layout == "pre-split" else None,
        )
        for res in results
        if res.rel not in excluded
    ]
    problems = _check_class_files(root, scan.class_files, class_names) + pairing_problems
    problems += [p for res in results for p in res.problems]
    problems += [_extension_problem(rel) for rel in scan.unsupported]
    problems += _dataset_problems(root, layout, scan, items, min_val_images)
    problems.sort(key=lambda p: (not p.fatal, p.path, p.line or 0, p.kind))
    return DatasetInventory(
        root=root,
        layout=layout,
        items=items,
        problems=problems,
        junk_ignored=scan.junk,
        backgrounds=sum(1 for it in items if it.boxes == 0),
        dropped=sorted(excluded),
    )


def _scan(root: Path) -> _Scan:
    scan = _Scan()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        in_junk_dir = any(part.startswith(".") or part == "__MACOSX" for part in rel_dir.parts)
        for name in sorted(filenames):
            rel = (rel_dir / name).as_posix()
            if in_junk_dir or _is_junk_name(name):
                scan.junk += 1
            else:
                _classify(scan, rel, name, top_level=rel_dir == PurePosixPath("."))
    return scan


def _is_junk_name(name: str) -> bool:
    # Hidden files (.DS_Store, ._AppleDouble), Office locks, Windows thumbnails, ultralytics label caches.
    return name.startswith((".", "~$")) or name.lower() in _JUNK_NAMES or name.endswith(".cache")


def _classify(scan: _Scan, rel: str, name: str, *, top_level: bool) -> None:
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in SUPPORTED_EXTENSIONS and name == name.strip():
        scan.images.append(rel)
    elif name.lower() == _CLASSES_TXT or (top_level and name.lower() in _DATA_YAML_NAMES):
        scan.class_files.append(rel)
    elif suffix == ".txt":
        scan.labels.add(rel)
    elif suffix in UNSUPPORTED_IMAGE_EXTENSIONS or _ODD_IMAGE_NAME.search(name) or name != name.strip():
        scan.unsupported.append(rel)
    else:  # README, .json, .xml, stray yaml: not ours to judge
        scan.junk += 1


def _detect_layout(root: Path) -> str:
    images = root / "images"
    if not images.is_dir():
        return "flat"
    splits = {SPLIT_ALIASES.get(p.name.lower()) for p in images.iterdir() if p.is_dir()}
    return "pre-split" if {"train", "val"} <= splits else "flat"


def _split_from_path(rel: str) -> str | None:
    parts = PurePosixPath(rel).parts
    if len(parts) >= 3 and parts[0] == "images":
        return SPLIT_ALIASES.get(parts[1].lower())
    return None


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


def _pair_labels(scan: _Scan) -> tuple[dict[str, str], list[Problem]]:
    """Each image's label file; problems for shared stems and for labels without an image."""
    label_of: dict[str, str] = {}
    claimed: set[str] = set()
    problems = []
    for rel in scan.images + scan.unsupported:
        found = [c for c in _label_candidates(rel) if c in scan.labels]
        claimed.update(found)
        if len(found) == 1:
            label_of[rel] = found[0]
        elif found:
            problems.append(
                Problem(
                    rel, None, "duplicate-label", f"{rel}: has two label files, {found[0]} and {found[1]}; keep one"
                )
            )
    for rel in scan.unsupported:
        label_of.pop(rel, None)  # claimed (so not reported as orphaned), but never used
    by_stem: dict[tuple[str, str], list[str]] = defaultdict(list)
    for rel in scan.images + scan.unsupported:
        path = PurePosixPath(rel)
        by_stem[(str(path.parent), path.stem)].append(rel)
    problems += [
        _duplicate_stem_problem(rel, group) for group in by_stem.values() if len(group) > 1 for rel in sorted(group)
    ]
    problems += [
        Problem(
            label,
            None,
            "missing-image",
            f"{label}: label file has no matching image (same stem, in "
            "images/ mirroring labels/, or beside it); it is ignored",
        )
        for label in sorted(scan.labels - claimed)
    ]
    return label_of, problems


def _duplicate_stem_problem(rel: str, group: list[str]) -> Problem:
    names = ", ".join(sorted(PurePosixPath(g).name for g in group))
    label = PurePosixPath(rel).stem + ".txt"
    return Problem(
        rel, None, "duplicate-stem", f"{rel}: images {names} share one stem, so a single {label} would label both"
    )


def _extension_problem(rel: str) -> Problem:
    ok = ", ".join(sorted(SUPPORTED_EXTENSIONS))
    return Problem(rel, None, "extension", f"{rel}: unsupported or odd image extension; use one of {ok}")


def _layout_problem(rel: str) -> Problem:
    return Problem(
        rel,
        None,
        "layout",
        f"{rel}: in a pre-split dataset every image must be under images/train, images/val or images/test",
    )


def _check_class_files(root: Path, rels: list[str], class_names: list[str]) -> list[Problem]:
    problems = []
    for rel in rels:
        try:
            names = _read_class_names(root / rel)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            problems.append(Problem(rel, None, "class-names", f"{rel}: cannot be read ({exc})", fatal=True))
            continue
        if names is not None and names != class_names:
            problems.append(
                Problem(
                    rel,
                    None,
                    "class-names",
                    f"{rel} names the classes {names} but the job is configured with {class_names} "
                    "(POGONA_CLASS_NAMES, in class-id order)",
                    fatal=True,
                )
            )
    return problems


def _read_class_names(path: Path) -> list[str] | None:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    data = yaml.safe_load(text)
    if not isinstance(data, dict) or "names" not in data:
        return None  # a data.yaml without names says nothing about classes
    names = data["names"]
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names, key=int)]
    if isinstance(names, list):
        return [str(n) for n in names]
    raise ValueError("`names` must be a list or a mapping of class id to name")


def _check_images(
    root: Path, rels: list[str], label_of: dict[str, str], class_names: list[str], pattern: re.Pattern[str]
) -> list[_ImageResult]:
    def check(rel: str) -> _ImageResult:
        label = label_of.get(rel)
        boxes, problems = (0, []) if label is None else _check_label(root / label, label, class_names)
        forced = "thermal" if pattern.search(rel) else None
        modality, image_problem = _check_image(root / rel, rel, forced)
        if image_problem:
            problems.insert(0, image_problem)
        return _ImageResult(rel, modality, boxes, problems)

    # Threads overlap file reads (network disks, cold caches); the decoding itself is mostly GIL-bound.
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(check, rels))


def _check_image(path: Path, rel: str, forced: str | None) -> tuple[str, Problem | None]:
    """Decode the image (cheaply) and judge its modality; a problem if it cannot be decoded."""
    try:
        if path.stat().st_size == 0:
            return "visible", Problem(rel, None, "corrupt-image", f"{rel}: image file is empty (0 bytes)")
        with Image.open(path) as im:
            if im.format != "JPEG":  # structure and checksums (PNG CRCs); for JPEG, load() below is stricter
                im.verify()
        with Image.open(path) as im:
            width, height = im.size
            im.draft("RGB", (_ANALYSIS_SIDE, _ANALYSIS_SIDE))  # JPEG: decode at 1/2..1/8 scale
            im.load()  # decodes all the data: a truncated file fails here
            modality = forced or pixel_modality(im)
    except Exception as exc:  # Pillow raises many types for bad files; all mean "cannot use it"
        reason = str(exc) or type(exc).__name__
        return "visible", Problem(rel, None, "corrupt-image", f"{rel}: image cannot be decoded ({reason})")
    if min(width, height) < MIN_IMAGE_SIDE:
        return modality, Problem(
            rel,
            None,
            "image-size",
            f"{rel}: image is {width}x{height} px; sides under {MIN_IMAGE_SIDE} px are rejected by ultralytics",
        )
    return modality, None


def _check_label(path: Path, rel: str, class_names: list[str]) -> tuple[int, list[Problem]]:
    try:
        text = path.read_bytes().decode("utf-8-sig", errors="replace")
    except OSError as exc:
        return 0, [Problem(rel, None, "unreadable", f"{rel}: label file cannot be read ({exc.strerror})")]
    problems: list[Problem] = []
    seen: dict[tuple[float, ...], int] = {}
    boxes = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        values, problem = _parse_line(line, rel, number, class_names)
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


def _parse_line(
    line: str, rel: str, number: int, class_names: list[str]
) -> tuple[tuple[float, ...] | None, Problem | None]:
    where = f"{rel} line {number}"

    def problem(kind: str, text: str) -> tuple[None, Problem]:
        return None, Problem(rel, number, kind, f"{where}: {text}")

    fields = line.split()
    if len(fields) != 5:
        return problem(
            "malformed-line", f"expected 5 values (class x_center y_center width height), found {len(fields)}"
        )
    try:
        values = tuple(float(f) for f in fields)
    except ValueError:
        bad = next(f for f in fields if not _is_number(f))
        return problem("malformed-line", f"{bad!r} is not a number")
    cls, x, y, w, h = values
    nc = len(class_names)
    if not cls.is_integer():
        return problem("class-id", f"class id {fields[0]} is not a whole number")
    if not 0 <= cls < nc:
        configured = f"{nc} class{'es' if nc != 1 else ''} ({', '.join(class_names)}) "
        verb = "are" if nc != 1 else "is"
        return problem("class-id", f"class id {int(cls)} but only {configured}{verb} configured")
    if not (w > 0 and h > 0):
        return problem("size", f"box width and height must be positive, found width={fields[3]} height={fields[4]}")
    names = ("x_center", "y_center", "width", "height")
    for name, value, text in zip(names, (x, y, w, h), fields[1:], strict=True):
        if not -_COORD_TOLERANCE <= value <= 1 + _COORD_TOLERANCE:
            return problem("coords", f"{name}={text} is outside [0, 1] (coordinates are normalised to the image)")
    return values, None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _dataset_problems(
    root: Path, layout: str, scan: _Scan, items: list[ImageItem], min_val_images: int
) -> list[Problem]:
    """Problems no amount of dropping can fix."""
    if not scan.images and not scan.unsupported:
        ok = ", ".join(sorted(SUPPORTED_EXTENSIONS))
        return [Problem(".", None, "empty-dataset", f"no images found under {root} ({ok})", fatal=True)]
    problems = []
    if layout == "pre-split":
        val = sum(1 for it in items if it.split == "val")
        train = sum(1 for it in items if it.split == "train")
        if val < min_val_images or train == 0:
            problems.append(
                Problem(
                    "images",
                    None,
                    "too-few-images",
                    f"only {train} valid train and {val} valid val images: "
                    f"at least 1 train and {min_val_images} val images are needed",
                    fatal=True,
                )
            )
    elif len(items) < min_val_images + 1:
        problems.append(
            Problem(
                ".",
                None,
                "too-few-images",
                f"only {len(items)} valid images: at least {min_val_images + 1} are "
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


# --------------------------------------------------------------------------------------
# Modality
# --------------------------------------------------------------------------------------


def pixel_modality(image: Image.Image) -> str:
    """Return "thermal" for grey or palette-coloured (colormapped) images, else "visible".

    A thermal frame is one temperature per pixel. Shown in grey, its channels are equal; shown
    through a palette (inferno, jet, ironbow ...), its colours all lie on one curve in RGB
    space. A photograph's colours fill a volume: several materials, each textured and shaded.
    So we fit a skeleton to the colours (k-means centres joined by their minimum spanning
    tree) and call the image thermal when most pixels lie close to it, relative to the
    spread of the colours.
    """
    bands = [b for b in image.getbands() if b != "A"]
    if len(bands) == 1 and image.mode != "P":
        return "thermal"
    rgb = _sample_rgb(image)
    if _is_grey(rgb) or _is_one_dimensional(rgb):
        return "thermal"
    return "visible"


def _sample_rgb(image: Image.Image) -> Rgb:
    # Nearest-neighbour sampling: averaging pixels would blend palette colours into off-curve ones.
    small = image.convert("RGB").resize((_SAMPLE_SIDE, _SAMPLE_SIDE), Image.Resampling.NEAREST)
    return np.asarray(small, dtype=np.float32).reshape(-1, 3)


def _is_grey(rgb: Rgb) -> bool:
    r, g, b = rgb.T
    spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    return float(np.percentile(spread, 95)) <= 8.0  # JPEG chroma noise on a grey frame stays below ~4


def _is_one_dimensional(rgb: Rgb) -> bool:
    spread = float(np.sqrt(((rgb - rgb.mean(axis=0)) ** 2).sum(axis=1).mean()))
    if spread < 12.0:
        return False  # nearly one flat colour: no palette to recognise
    centres = _kmeans(rgb, _CLUSTERS)
    residual = _distance_to_segments(rgb, centres, _spanning_tree(centres))
    # The 75th percentile tolerates palette colours blended at sharp edges (JPEG chroma, resizing).
    return float(np.percentile(residual, 75)) < _CURVE_TOLERANCE * spread


def _kmeans(points: Rgb, k: int, iterations: int = 5) -> Rgb:
    # Squared distances are expanded into matrix products: numpy is slow at reducing 3-wide axes.
    norms = (points**2).sum(axis=1)
    # Farthest-point initialisation: deterministic, and spreads the centres along a curve's whole length.
    chosen = [int(np.argmax(norms - 2 * points @ points.mean(axis=0)))]
    nearest = norms - 2 * points @ points[chosen[0]] + norms[chosen[0]]
    for _ in range(k - 1):
        chosen.append(int(np.argmax(nearest)))
        nearest = np.minimum(nearest, norms - 2 * points @ points[chosen[-1]] + norms[chosen[-1]])
    centres = points[chosen]
    labels = np.arange(k)
    for _ in range(iterations):
        assign = np.argmin((centres**2).sum(axis=1) - 2 * points @ centres.T, axis=1)
        onehot = (assign[:, None] == labels).astype(np.float32)
        counts = onehot.sum(axis=0)[:, None]
        centres = np.where(counts > 0, onehot.T @ points / np.maximum(counts, 1), centres)
    return centres


def _spanning_tree(centres: Rgb) -> npt.NDArray[np.intp]:
    """Edges (i, j) of the centres' minimum spanning tree (Prim)."""
    n = len(centres)
    dist = np.sqrt(((centres[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2))
    in_tree = np.zeros(n, dtype=bool)
    in_tree[0] = True
    best, best_from = dist[0].copy(), np.zeros(n, dtype=np.intp)
    edges = []
    for _ in range(n - 1):
        j = int(np.argmin(np.where(in_tree, np.inf, best)))
        edges.append((best_from[j], j))
        in_tree[j] = True
        closer = dist[j] < best
        best, best_from = np.where(closer, dist[j], best), np.where(closer, j, best_from)
    return np.array(edges, dtype=np.intp).reshape(-1, 2)


def _distance_to_segments(points: Rgb, centres: Rgb, edges: npt.NDArray[np.intp]) -> Rgb:
    """Each point's distance to the nearest tree edge, all edges at once via matrix products."""
    a = centres[edges[:, 0]]
    ab = centres[edges[:, 1]] - a
    ab_len2 = np.maximum((ab**2).sum(axis=1), 1e-9)
    pa_dot_ab = points @ ab.T - (a * ab).sum(axis=1)  # (N, E)
    pa_len2 = (points**2).sum(axis=1)[:, None] - 2 * points @ a.T + (a**2).sum(axis=1)
    t = np.clip(pa_dot_ab / ab_len2, 0.0, 1.0)
    d2 = pa_len2 - 2 * t * pa_dot_ab + t**2 * ab_len2
    distance: Rgb = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
    return distance


# --------------------------------------------------------------------------------------
# Staging
# --------------------------------------------------------------------------------------


def stage_dataset(
    inv: DatasetInventory,
    out_dir: Path,
    class_names: list[str],
    *,
    policy: str = "strict",
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 42,
) -> StagedDataset:
    """Apply the validation policy, split, and write a clean YOLO tree with data.yaml under `out_dir`."""
    if policy not in ("strict", "lenient"):
        raise ValueError(f"policy must be 'strict' or 'lenient', not {policy!r}")
    out_dir = out_dir.resolve()
    _prepare_out_dir(inv.root, out_dir)
    problems_file = _write_problems(out_dir, inv.problems) if inv.problems else None
    _enforce_policy(inv.problems, policy, problems_file)

    splits = _assign_splits(inv, val_fraction, test_fraction, seed)
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
    data_yaml = _write_data_yaml(out_dir, class_names, set(splits.values()))
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
    )


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


def _assign_splits(inv: DatasetInventory, val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    if inv.layout == "pre-split":
        return {it.rel: it.split or "train" for it in inv.items}
    by_modality: dict[str, list[str]] = defaultdict(list)
    for it in inv.items:
        by_modality[it.modality].append(it.rel)
    splits: dict[str, str] = {}
    for rels in by_modality.values():
        order = sorted(rels, key=lambda rel: hashlib.sha256(f"{seed}:{rel}".encode()).hexdigest())
        n_val = _share(len(order), val_fraction)
        n_test = min(_share(len(order), test_fraction), max(0, len(order) - 1 - n_val))
        for i, rel in enumerate(order):
            splits[rel] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    counts = {s: sum(1 for v in splits.values() if v == s) for s in ("train", "val")}
    if not counts["train"] or not counts["val"]:
        raise DatasetError(f"Too few images to split into train and val ({counts['train']} / {counts['val']}).")
    return splits


def _share(n: int, fraction: float) -> int:
    """round(fraction * n), at least 1 when asked for any, never all: the train split keeps one."""
    if n < 2 or fraction <= 0:
        return 0
    return min(max(1, round(fraction * n)), n - 1)


def _staged_names(inv: DatasetInventory) -> dict[str, str]:
    """Flat, unique, layout-independent file names: the path below images/[split]/, "/" -> "__"."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for it in sorted(inv.items, key=lambda i: i.rel):
        parts = list(PurePosixPath(it.rel).parts)
        if inv.layout == "pre-split":
            parts = parts[2:]
        elif "images" in parts[:-1]:
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
