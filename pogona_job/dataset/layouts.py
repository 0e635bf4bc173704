"""Which tool wrote this folder? One small reader per labelling-tool export.

Every reader answers the same questions: a human name for the layout, the export's own
split (image -> train/val/test, empty when it has none), the class names it carries and
the file they came from, and which `.txt` files are lists rather than labels. Pairing
labels with images is the same for all of them (see `validate`), so readers stay small.
See dataset/README.md for what each export looks like.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from pogona_job.dataset.model import SPLIT_ALIASES, Problem

# ultralytics.data.utils.IMG_FORMATS, copied so that `dataset validate` needs no ultralytics import
# (a test compares them). Each is accepted when Pillow decodes it to a format ultralytics reads.
IMG_FORMATS = frozenset(
    {"bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "heic", "heif", "avif", "jp2"}
)
SUPPORTED_EXTENSIONS = frozenset("." + ext for ext in IMG_FORMATS)
# Image formats nobody trains on from a plain folder (ultralytics cannot read them).
_REFUSED = "gif jfif tga ppm pgm pbm pfm ico svg psd raw cr2 nef arw"
UNSUPPORTED_IMAGE_EXTENSIONS = frozenset("." + ext for ext in _REFUSED.split())
_IMAGE_EXT = "|".join(sorted(IMG_FORMATS))
# "a.jpg~", "a.jpg_large", "a.png.part": an image name with trailing debris.
_ODD_IMAGE_NAME = re.compile(
    rf"\.({_IMAGE_EXT})([~_\-].*|\d+|\.(part|crdownload|download|tmp|bak|orig))$", re.IGNORECASE
)
_JUNK_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r"})
DATA_YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml")
NAME_FILES = ("classes.txt", "obj.names")  # LabelImg / Label Studio, CVAT


@dataclass
class Scan:
    """Files found under the root, sorted into roles."""

    images: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    texts: set[str] = field(default_factory=set)  # .txt: labels, or companions (READMEs, lists)
    class_files: list[str] = field(default_factory=list)
    junk: int = 0
    dirs: set[str] = field(default_factory=set)


@dataclass
class Layout:
    key: str
    label: str
    split_of: dict[str, str] = field(default_factory=dict)  # image rel -> train/val/test
    list_files: set[str] = field(default_factory=set)  # .txt files that list images (companions)
    problems: list[Problem] = field(default_factory=list)
    # Where the names may come from, in the order they are believed.
    name_files: list[str] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)  # worth knowing, never a reason to stop


PULL_INDEX = ".pogona-cache.json"  # s3.storage.CACHE_INDEX (a sibling layer: not imported), written by every pull


def scan(root: Path) -> Scan:
    found = Scan()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        in_junk_dir = any(part.startswith(".") or part == "__MACOSX" for part in rel_dir.parts)
        if not in_junk_dir and rel_dir != PurePosixPath("."):
            found.dirs.add(rel_dir.as_posix())
        for name in sorted(filenames):
            rel = (rel_dir / name).as_posix()
            if rel == PULL_INDEX:  # the job's own bookkeeping, not the user's junk
                continue
            if in_junk_dir or _is_junk_name(name):
                found.junk += 1
            else:
                _classify(found, rel, name, top_level=rel_dir == PurePosixPath("."))
    return found


def _is_junk_name(name: str) -> bool:
    # Hidden files (.DS_Store, ._AppleDouble), Office locks, Windows thumbnails, ultralytics label caches.
    return name.startswith((".", "~$")) or name.lower() in _JUNK_NAMES or name.endswith(".cache")


def _classify(found: Scan, rel: str, name: str, *, top_level: bool) -> None:
    suffix = PurePosixPath(name).suffix.lower()
    lower = name.lower()
    if suffix in SUPPORTED_EXTENSIONS and name == name.strip():
        found.images.append(rel)
    elif lower in NAME_FILES or (top_level and lower in DATA_YAML_NAMES):
        found.class_files.append(rel)
    elif suffix == ".txt":
        found.texts.add(rel)
    elif suffix in UNSUPPORTED_IMAGE_EXTENSIONS or _ODD_IMAGE_NAME.search(name) or name != name.strip():
        found.unsupported.append(rel)
    else:  # README.md, notes.json, obj.data, stray yaml: not ours to judge
        found.junk += 1


# --------------------------------------------------------------------------------------
# Readers, tried in this order; the first that recognises the folder wins.
# --------------------------------------------------------------------------------------


def read_layout(root: Path, found: Scan) -> Layout:
    readers: list[Callable[[Path, Scan], Layout | None]] = [_cvat, _roboflow, _ultralytics, _label_studio]
    for reader in readers:
        layout = reader(root, found)
        if layout is not None:
            return layout
    return Layout("flat", "plain folders (flat)", name_files=_top_yaml(found) + _name_files(found))


def _split_dirs(found: Scan, parent: str) -> dict[str, str]:
    """{folder name: split} for the split-named folders directly under `parent` ("" = root)."""
    out = {}
    for d in found.dirs:
        path = PurePosixPath(d)
        if str(path.parent) == (parent or ".") and path.name.lower() in SPLIT_ALIASES:
            out[path.name] = SPLIT_ALIASES[path.name.lower()]
    return out


def _split_label(dirs: dict[str, str]) -> str:
    order = {"train": 0, "val": 1, "test": 2}
    return "/".join(sorted(dirs, key=lambda d: (order[dirs[d]], d)))


def _by_folder(found: Scan, key: str, label: str, position: int, dirs: dict[str, str], where: str) -> Layout:
    """Split from the folder at `position` in each image path; images elsewhere are a layout problem."""
    layout = Layout(key, label, name_files=_top_yaml(found) + _name_files(found))
    for rel in found.images:
        parts = PurePosixPath(rel).parts
        split = dirs.get(parts[position]) if len(parts) > position + 1 else None
        if split is None or (key == "roboflow" and parts[1] != "images"):
            layout.problems.append(
                Problem(rel, None, "layout", f"{rel}: in this {label} every image must be under {where}")
            )
        else:
            layout.split_of[rel] = split
    return layout


def _roboflow(root: Path, found: Scan) -> Layout | None:
    # {train,valid,test}/images + labels; data.yaml paths start with ../ (ignored: the folders decide).
    dirs = {d: s for d, s in _split_dirs(found, "").items() if f"{d}/images" in found.dirs}
    if not dirs:
        return None
    label = f"Roboflow export ({_split_label(dirs)})"
    return _by_folder(found, "roboflow", label, 0, dirs, "/".join(f"{d}/images" for d in sorted(dirs)))


def _ultralytics(root: Path, found: Scan) -> Layout | None:
    dirs = _split_dirs(found, "images")
    if not dirs:
        return None
    label = f"Ultralytics (images/{_split_label(dirs)})"
    return _by_folder(found, "ultralytics", label, 1, dirs, "images/" + "|".join(sorted(dirs)))


def _label_studio(root: Path, found: Scan) -> Layout | None:
    # classes.txt + notes.json + images/ + labels/, no split; file names carry an 8-hex prefix.
    if "images" not in found.dirs or not ({"classes.txt", "notes.json"} & set(os.listdir(root))):
        return None
    notes = ["notes.json"] if (root / "notes.json").is_file() else []
    return Layout("label-studio", "Label Studio YOLO export (no split)", name_files=_name_files(found) + notes)


def _cvat(root: Path, found: Scan) -> Layout | None:
    # obj.data (classes, train = data/train.txt, names = data/obj.names), obj_<subset>_data/, <subset>.txt.
    if not (root / "obj.data").is_file() and not (root / "obj.names").is_file():
        return None
    keys = _obj_data(root / "obj.data")
    lists: dict[str, str] = {}
    for key in ("train", "valid", "val", "validation", "test"):
        rel = _strip_data_prefix(keys[key]) if key in keys else f"{key}.txt"
        if rel in found.texts:
            lists[rel] = SPLIT_ALIASES[key]
    # CVAT writes obj.data and obj_<subset>_data/; obj.names and list files alone are darknet's own layout.
    is_cvat = (root / "obj.data").is_file() or any(re.fullmatch(r"obj_\w+_data", d) for d in found.dirs)
    key = "cvat" if is_cvat else "darknet"
    layout = Layout(key, "", list_files=set(lists), name_files=["obj.names", *_name_files(found)])
    images = set(found.images)
    by_name = {PurePosixPath(rel).name: rel for rel in found.images}
    for list_rel, split in lists.items():
        lines = (root / list_rel).read_text(encoding="utf-8-sig", errors="replace").splitlines()
        for number, line in enumerate(lines, start=1):
            entry = line.strip()
            if not entry:
                continue
            rel = _strip_data_prefix(entry)
            rel = rel if rel in images else by_name.get(PurePosixPath(entry).name, "")
            if rel:
                layout.split_of[rel] = split
            else:
                layout.problems.append(
                    Problem(list_rel, number, "layout", f"{list_rel} line {number}: lists {entry}, which is not there")
                )
    has_val = "val" in layout.split_of.values()
    if has_val:
        for rel in sorted(images - set(layout.split_of)):
            layout.problems.append(
                Problem(rel, None, "layout", f"{rel}: not listed in any of {', '.join(sorted(lists))}")
            )
    else:  # CVAT always writes train.txt; one list alone is no split
        unlisted = sorted(images - set(layout.split_of)) if lists else []
        named = ", ".join(sorted(lists))
        layout.notes += [
            Problem(rel, None, "unlisted", f"{rel}: in no list file ({named}); trained on all the same")
            for rel in unlisted
        ]
        layout.split_of = {rel: s for rel, s in layout.split_of.items() if s == "test"}
    subsets = sorted({s for s in lists.values()}, key=["train", "val", "test"].index)
    listed = f"{'/'.join(subsets) or 'no'} list{'s' if len(subsets) != 1 else ''}"
    if is_cvat:
        layout.label = f"CVAT YOLO 1.1 export ({listed})"
    else:
        layout.label = f"darknet-style folder (obj.names and {listed}; no obj.data)"
    return layout


def _obj_data(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    keys = {}
    for line in path.read_text(encoding="utf-8-sig", errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            keys[key.strip().lower()] = value.strip()
    return keys


def _strip_data_prefix(entry: str) -> str:
    """CVAT lists paths as `data/obj_train_data/x.jpg`: relative to the folder that held the export."""
    entry = entry.replace("\\", "/").lstrip("./")
    return entry[len("data/") :] if entry.startswith("data/") else entry


def _top_yaml(found: Scan) -> list[str]:
    return sorted(rel for rel in found.class_files if "/" not in rel and rel.lower() in DATA_YAML_NAMES)


def _name_files(found: Scan) -> list[str]:
    # A root-level file first (the export's own), then any deeper classes.txt (LabelImg writes one per folder).
    files = [rel for rel in found.class_files if PurePosixPath(rel).name.lower() in NAME_FILES]
    return sorted(files, key=lambda rel: (rel.count("/"), rel))


# --------------------------------------------------------------------------------------
# Class names carried by the export
# --------------------------------------------------------------------------------------


def read_class_names(path: Path) -> list[str] | None:
    """Names in class-id order; None when the file says nothing about classes."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() in (".txt", ".names"):
        return [line.strip() for line in text.splitlines() if line.strip()] or None
    if path.suffix.lower() == ".json":  # Label Studio notes.json: {"categories": [{"id", "name"}]}
        categories = json.loads(text).get("categories") or []
        return [str(c["name"]) for c in sorted(categories, key=lambda c: int(c["id"]))] or None
    data = yaml.safe_load(text)
    if not isinstance(data, dict) or "names" not in data:
        return None  # a data.yaml without names says nothing about classes
    names = data["names"]
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names, key=int)]
    if isinstance(names, list):
        return [str(n) for n in names]
    raise ValueError("`names` must be a list or a mapping of class id to name")
