"""Split without leakage: by group, stratified by modality; then measure near-duplicates.

Images that are near-copies of each other (augmentation siblings, neighbouring video
frames, one recording) must stay on one side of a split, or val metrics measure memory.
Groups come from the rules in POGONA_GROUP_RULES, tried in order (first match wins):

- `csv`: groups.csv at the dataset root (`path,group`);
- `roboflow`: Roboflow augmentation siblings, the same source name before `.rf.<hash>`;
- `sequence`: frame sequences, the same name with only a trailing frame number differing
  (consecutive numbers, and neighbouring pictures alike by perceptual hash, so a camera's
  photo counter is not a recording; a sequence longer than a tenth of the dataset, or 8
  frames in a small one, is cut into blocks of consecutive frames, so that one long
  recording cannot make a split impossible);
- `folder`: the image's folder, when its name looks like one recording (rec_3, clip-12,
  session 2, 2024-05-01_1230 ...);
- `re:<regex>`: your own rule: images whose paths give the same first capture group.

An image no rule matches is its own group. Whatever the split (the export's or ours), the
near-duplicates across train/val/test are then counted with a perceptual hash (imagehash).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from pogona_job.dataset.model import ImageItem
from pogona_job.errors import DatasetError

DEFAULT_GROUP_RULES = "csv;roboflow;sequence;folder"
RULE_NAMES = ("csv", "roboflow", "sequence", "folder", "none")
SEQUENCE_DISTANCE = 20  # pHash bits: neighbouring frames of one recording differ by fewer
NEAR_DUPLICATE_DISTANCE = 6  # pHash bits (of 64): re-encoded, resized or neighbouring frames differ by fewer
_ROBOFLOW = re.compile(r"^(?P<source>.+?)(?:_(?:jpe?g|png|bmp|tiff?|webp))?\.rf\.[0-9a-f]{16,}$", re.IGNORECASE)
_FRAME = re.compile(r"^(?P<prefix>.*?\D)?(?P<number>\d+)$")
_RECORDING = re.compile(
    r"^((rec(ording)?|clip|video|vid|seq(uence)?|session|take|burst|flight|run|trial)[-_ ]?\d+"
    r"|.*\d{4}-?\d{2}-?\d{2}([-_ T]?\d{4,6})?)$",
    re.IGNORECASE,
)


def check_rules(text: str) -> list[str]:
    """The rule list, validated: names from RULE_NAMES or `re:<regex>` with a capture group."""
    rules = [r.strip() for r in text.split(";") if r.strip()]
    for rule in rules:
        if rule.startswith("re:"):
            if re.compile(rule[3:]).groups < 1:
                raise ValueError(f"{rule!r}: the regex needs a capture group (the group key)")
        elif rule not in RULE_NAMES:
            raise ValueError(f"{rule!r}: use {', '.join(RULE_NAMES)} or re:<regex>, separated by ;")
    return rules


def source_name(stem: str) -> str:
    """`IMG 0001_jpg.rf.3f2a...` -> `IMG 0001`: the name the image had before Roboflow."""
    m = _ROBOFLOW.match(stem)
    return m.group("source") if m else stem


def group_keys(
    rels: Iterable[str], rules_text: str, table: dict[str, str], hashes: dict[str, int | None] | None = None
) -> dict[str, str]:
    """{image rel: group key}; images with equal keys are one group.

    `hashes` (perceptual, per image) confirm frame sequences: consecutive numbers whose
    pictures differ completely (a camera's photo counter) are not one recording.
    """
    rels = sorted(rels)
    rules = check_rules(rules_text)
    sequences = _sequences(rels, hashes or {}) if "sequence" in rules else {}
    keys = {}
    for rel in rels:
        path = PurePosixPath(rel)
        key = None
        for rule in rules:
            if rule == "csv":
                key = f"csv:{table[rel]}" if rel in table else None
            elif rule == "roboflow":
                source = source_name(path.stem)
                key = f"rf:{path.parent}/{source}" if source != path.stem else None
            elif rule == "sequence":
                key = sequences.get(rel)
            elif rule == "folder":
                key = f"dir:{path.parent}" if _RECORDING.match(path.parent.name) else None
            elif rule.startswith("re:"):
                m = re.search(rule[3:], rel)
                key = f"re:{m.group(1)}" if m else None
            if key:
                break
        keys[rel] = key or f"img:{rel}"
    return keys


def _sequences(rels: list[str], hashes: dict[str, int | None]) -> dict[str, str]:
    """Frame-sequence keys: same folder and prefix, consecutive trailing numbers, pictures alike."""
    by_prefix: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
    for rel in rels:
        path = PurePosixPath(rel)
        m = _FRAME.match(source_name(path.stem))
        if m:
            by_prefix[(str(path.parent), m.group("prefix") or "")].append((int(m.group("number")), rel))
    block = max(8, math.ceil(len(rels) / 10))
    keys = {}
    for (folder, prefix), frames in by_prefix.items():
        if len(frames) < 2:
            continue
        frames.sort()
        steps = [b[0] - a[0] for a, b in itertools.pairwise(frames) if b[0] > a[0]]
        gap = 2 * max(1.0, float(np.median(steps))) if steps else 1.0
        run, size, (previous, last) = 0, 0, frames[0]
        for number, rel in frames:
            if number - previous > gap or size >= block or not _alike(hashes.get(last), hashes.get(rel)):
                run, size = run + 1, 0
            keys[rel] = f"seq:{folder}/{prefix}#{run}"
            size, previous, last = size + 1, number, rel
    return keys


def _alike(a: int | None, b: int | None) -> bool:
    return a is None or b is None or (a ^ b).bit_count() <= SEQUENCE_DISTANCE


def assign_splits(
    items: list[ImageItem], val_fraction: float, test_fraction: float, seed: int
) -> tuple[dict[str, str], str]:
    """({rel: split}, "export" | "made by the job"). The export's split is used as it is."""
    if any(it.split == "val" for it in items):
        return {it.rel: it.split or "train" for it in items}, "export"
    splits = {it.rel: "test" for it in items if it.split == "test"}  # an export's test split stays test
    pool = [it for it in items if it.split != "test"]
    test_share = 0.0 if splits else test_fraction
    # Stratified by modality, but a group is never cut: it goes with the modality most of its images
    # have (siblings judged apart, one "visible" and one "unknown", still stay on one side).
    members: dict[str, list[ImageItem]] = defaultdict(list)
    for it in pool:
        members[it.group or it.rel].append(it)
    by_modality: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for key, its in members.items():
        votes = Counter(it.modality for it in its)
        main = max(sorted(votes), key=lambda m: (votes[m], m != "unknown"))
        by_modality[main][key] = [it.rel for it in its]
    for groups in by_modality.values():
        order = sorted(groups, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
        total = sum(len(rels) for rels in groups.values())
        val = _take(order, groups, _share(total, val_fraction))
        rest = [g for g in order if g not in val]
        test = _take(rest, groups, min(_share(total, test_share), max(0, total - 1 - _size(val, groups))))
        for g in order:
            for rel in groups[g]:
                splits[rel] = "val" if g in val else "test" if g in test else "train"
    counts = {s: sum(1 for v in splits.values() if v == s) for s in ("train", "val")}
    if not counts["train"] or not counts["val"]:
        raise DatasetError(
            f"The dataset cannot be split into train and val without leakage ({counts['train']} / {counts['val']} "
            "images): its images form too few groups (POGONA_GROUP_RULES). Give a split or a groups.csv."
        )
    return splits, "made by the job"


def _share(n: int, fraction: float) -> int:
    """round(fraction * n), at least 1 when asked for any, never all: the train split keeps one."""
    if n < 2 or fraction <= 0:
        return 0
    return min(max(1, round(fraction * n)), n - 1)


def _size(chosen: set[str], groups: dict[str, list[str]]) -> int:
    return sum(len(groups[g]) for g in chosen)


def _take(order: list[str], groups: dict[str, list[str]], target: int) -> set[str]:
    """Whole groups, in seeded order, filling `target` images without passing it (at least one group)."""
    if target <= 0:
        return set()
    chosen: set[str] = set()
    for g in order:
        if _size(chosen, groups) + len(groups[g]) <= target:
            chosen.add(g)
    if not chosen:
        smallest = min(order, key=lambda g: len(groups[g]))
        if len(groups[smallest]) < sum(len(v) for v in groups.values()):
            chosen.add(smallest)
    return chosen


LEAKAGE_COMPARED = (
    "the perceptual hash (pHash, 64 bits) of each whole image, pairs within {distance} bits on different "
    "sides of the split; then the labelled regions of each such pair (same boxes, alike inside), so that "
    "filled-in forms on one template are not called copies"
)


def near_duplicates(
    items: list[ImageItem], splits: dict[str, str], *, distance: int = NEAR_DUPLICATE_DISTANCE, examples: int = 5
) -> dict[str, Any]:
    """Pairs of images on different sides of the split that are near-copies: whole-image perceptual hashes
    within `distance` bits, and, where both have labelled boxes, the same boxes with alike contents.
    Pairs alike by hash whose labelled regions differ (forms on one template) are counted apart."""
    hashed = [(it.rel, it.phash) for it in items if it.phash is not None]
    by_split = {s: [(rel, h) for rel, h in hashed if splits[rel] == s] for s in ("train", "val", "test")}
    candidates: list[tuple[int, str, str]] = []
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        if not by_split[a] or not by_split[b]:
            continue
        left = np.array([h for _, h in by_split[a]], dtype=np.uint64)
        for rel, h in by_split[b]:
            bits = np.bitwise_count(left ^ np.uint64(h))
            for i in np.flatnonzero(bits <= distance):
                candidates.append((int(bits[i]), by_split[a][i][0], rel))
    item_of = {it.rel: it for it in items}
    pairs: list[tuple[int, str, str]] = []
    dismissed: list[tuple[int, str, str]] = []
    for d, a, b in candidates:
        (pairs if same_labelled_regions(item_of[a], item_of[b]) else dismissed).append((d, a, b))
    held_out = sum(len(by_split[s]) for s in ("val", "test"))
    leaked = len({b for _, _, b in pairs})
    return {
        "compared": LEAKAGE_COMPARED.format(distance=distance),
        "pairs": len(pairs),
        "held_out_images_with_a_near_duplicate": leaked,
        "share": round(leaked / held_out, 4) if held_out else 0.0,
        "max_hash_distance": distance,
        "examples": [[a, b, d] for d, a, b in sorted(pairs)[:examples]],
        # Alike as whole images, different where the labels are: not counted as leaks, shown to check.
        "alike_but_labels_differ": len(dismissed),
        "alike_but_labels_differ_examples": [[a, b, d] for d, a, b in sorted(dismissed)[:examples]],
    }


_REGION_SIDE = 16
_REGION_ALIKE = 0.93  # correlation of the normalised grey contents of two matching boxes


def same_labelled_regions(a: ImageItem, b: ImageItem) -> bool:
    """Whether two images alike as a whole are alike where it matters: the labelled boxes.

    True when either has no boxes (nothing else to compare) or when every box of one has a box of the
    same class at about the same place in the other (IoU >= 0.5) whose contents are alike. Two cheques
    filled in on one template differ exactly there: the payee, the amount, the signature.
    """
    boxes_a, boxes_b = _boxes(a), _boxes(b)
    if not boxes_a or not boxes_b:
        return True
    if len(boxes_a) != len(boxes_b):
        return False
    try:
        with Image.open(a.image) as im_a, Image.open(b.image) as im_b:
            grey_a, grey_b = im_a.convert("L"), im_b.convert("L")
            for box in boxes_a:
                match = max(boxes_b, key=lambda other: _iou(box, other) if other[0] == box[0] else -1.0)
                if match[0] != box[0] or _iou(box, match) < 0.5:
                    return False
                if not _alike_regions(_crop(grey_a, box), _crop(grey_b, match)):
                    return False
    except OSError:
        return True  # cannot look closer: keep the hash's verdict
    return True


def _boxes(item: ImageItem) -> list[tuple[float, float, float, float, float]]:
    if item.label is None:
        return []
    out = []
    try:
        lines = item.label.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) == 5:
            try:
                c, x, y, w, h = (float(f) for f in fields)
            except ValueError:
                continue
            out.append((c, x, y, w, h))
    return out


def _iou(p: tuple[float, ...], q: tuple[float, ...]) -> float:
    ax0, ay0, ax1, ay1 = p[1] - p[3] / 2, p[2] - p[4] / 2, p[1] + p[3] / 2, p[2] + p[4] / 2
    bx0, by0, bx1, by1 = q[1] - q[3] / 2, q[2] - q[4] / 2, q[1] + q[3] / 2, q[2] + q[4] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = p[3] * p[4] + q[3] * q[4] - inter
    return inter / union if union > 0 else 0.0


def _crop(grey: Image.Image, box: tuple[float, ...]) -> npt.NDArray[np.float32]:
    w, h = grey.size
    x0, y0 = int((box[1] - box[3] / 2) * w), int((box[2] - box[4] / 2) * h)
    x1, y1 = max(x0 + 1, int((box[1] + box[3] / 2) * w)), max(y0 + 1, int((box[2] + box[4] / 2) * h))
    region = grey.crop((x0, y0, x1, y1)).resize((_REGION_SIDE, _REGION_SIDE), Image.Resampling.BILINEAR)
    return np.asarray(region, np.float32)


def _alike_regions(p: npt.NDArray[np.float32], q: npt.NDArray[np.float32]) -> bool:
    sp, sq = float(p.std()), float(q.std())
    if sp < 4 or sq < 4:  # flat regions: alike when equally bright
        return abs(float(p.mean()) - float(q.mean())) < 12 and abs(sp - sq) < 4
    return float(((p - p.mean()) * (q - q.mean())).mean() / (sp * sq)) >= _REGION_ALIKE


def pair_sheet(pairs: list[list[Any]], image_of: dict[str, Path], dest: Path, *, side: int = 96) -> Path | None:
    """A PNG with one row per pair (left: the train-side image, right: the held-out one), or None."""
    rows = [(a, b) for a, b, *_ in pairs if a in image_of and b in image_of]
    if not rows:
        return None
    sheet = Image.new("RGB", (2 * side + 8, len(rows) * side), (255, 255, 255))
    for r, pair in enumerate(rows):
        for c, rel in enumerate(pair):
            with Image.open(image_of[rel]) as im:
                thumb = im.convert("RGB")
                thumb.thumbnail((side, side))
                sheet.paste(thumb, (c * (side + 8), r * side))
    dest.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(dest)
    return dest
