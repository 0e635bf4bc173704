"""The split: the user's when there is one, else ours by group; near-duplicates across it measured."""

from __future__ import annotations

import io
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pogona_job.dataset import Options, inspect_dataset, stage_dataset
from pogona_job.dataset.model import ImageItem
from pogona_job.dataset.split import (
    LEAKAGE_COMPARED,
    SEQUENCE_DISTANCE,
    _alike,
    _sequences,
    _share,
    _size,
    _take,
    assign_splits,
    check_rules,
    group_keys,
    near_duplicates,
    source_name,
)
from pogona_job.errors import DatasetError
from pogona_job.tools.demo import write_demo
from tests.fixtures import exports
from tests.fixtures.files import CLASSES, flat_dataset, inspect
from tests.fixtures.realdata import CHEQUE_FIELDS, cheque

# --- groups -------------------------------------------------------------------------------------


def test_roboflow_siblings_share_their_source_name() -> None:
    stem = "IMG 0001 copy_jpg.rf.3f2a9c1e0b7d4a6f8e5c2b1a0d9e8f7c"
    assert source_name(stem) == "IMG 0001 copy"
    assert source_name("plain name") == "plain name"


def test_group_rules_in_their_documented_order() -> None:
    rels = [
        "a/IMG 1_jpg.rf.00000000000000000000000000000000.jpg",
        "a/IMG 1_jpg.rf.11111111111111111111111111111111.jpg",
        "a/clip_0001.jpg",
        "a/clip_0002.jpg",
        "a/clip_0003.jpg",
        "a/clip_0900.jpg",  # far from the others: another take
        "rec_3/x.jpg",
        "rec_3/y.jpg",
        "2024-05-01_1230/p.jpg",
        "2024-05-01_1230/q.jpg",
        "photos/x.jpg",
        "photos/y.jpg",
    ]
    keys = group_keys(rels, "csv;roboflow;sequence;folder", {"photos/y.jpg": "mine", "photos/x.jpg": "mine"})
    same = defaultdict(set)
    for rel, key in keys.items():
        same[key].add(rel)
    groups = sorted(sorted(g) for g in same.values())
    assert groups == sorted(
        [
            sorted(rels[0:2]),
            ["a/clip_0001.jpg", "a/clip_0002.jpg", "a/clip_0003.jpg"],
            ["a/clip_0900.jpg"],
            ["rec_3/x.jpg", "rec_3/y.jpg"],
            ["2024-05-01_1230/p.jpg", "2024-05-01_1230/q.jpg"],
            ["photos/x.jpg", "photos/y.jpg"],
        ]
    )
    alone = group_keys(rels, "none", {})
    assert len(set(alone.values())) == len(rels)
    custom = group_keys(["s1/a.jpg", "s1/b.jpg", "s2/c.jpg"], r"re:^(s\d)/", {})
    assert custom["s1/a.jpg"] == custom["s1/b.jpg"] != custom["s2/c.jpg"]


def test_bad_group_rules_are_refused() -> None:
    for bad in ("csv;frames", "re:no-group"):
        with pytest.raises(ValueError, match=r"use csv|capture group"):
            check_rules(bad)


def test_a_long_sequence_is_cut_into_blocks_so_that_it_can_be_split() -> None:
    rels = [f"v/frame_{i:04d}.jpg" for i in range(100)]
    keys = group_keys(rels, "sequence", {})
    assert len(set(keys.values())) == 10
    assert all(keys[rels[i]] == keys[rels[i + 1]] for i in range(9))  # a block is consecutive frames


# --- our split ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grouped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("grouped")
    return root, exports.flat_with_groups(root)


def _split_of_each_group(staged_splits: dict[str, str], truth: dict[str, str]) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = defaultdict(set)
    for rel, group in truth.items():
        seen[group].add(staged_splits[rel])
    return seen


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_no_group_crosses_our_split_and_nothing_leaks(
    tmp_path: Path, grouped: tuple[Path, dict[str, str]], seed: int
) -> None:
    root, truth = grouped
    staged = stage_dataset(inspect(root), tmp_path / "s", CLASSES, seed=seed, val_fraction=0.3)
    splits = {rel: staged.split_of(rel) for rel in staged.staged}
    assert set(splits) == set(truth) and set(splits.values()) == {"train", "val"}
    assert all(len(s) == 1 for s in _split_of_each_group(splits, truth).values())
    assert staged.split_source == "made by the job"
    assert staged.leakage["pairs"] == 0 and staged.leakage["warn"] is False


def test_the_same_images_split_one_by_one_leak(tmp_path: Path, grouped: tuple[Path, dict[str, str]]) -> None:
    """The control: without groups, neighbouring frames and siblings land on both sides, and are counted."""
    root, truth = grouped
    leaks = []
    for seed in range(4):
        inv = inspect_dataset(root, CLASSES, Options(group_rules="none"))
        staged = stage_dataset(inv, tmp_path / f"s{seed}", CLASSES, seed=seed, val_fraction=0.3)
        splits = {rel: staged.split_of(rel) for rel in staged.staged}
        crossing = sum(len(s) > 1 for s in _split_of_each_group(splits, truth).values())
        leaks.append((crossing, staged.leakage["pairs"]))
    assert all(pairs > 0 for crossing, pairs in leaks if crossing)
    assert any(crossing for crossing, _ in leaks)


def test_the_split_is_reproducible_for_a_seed_and_changes_with_it(tmp_path: Path) -> None:
    write_demo(tmp_path / "demo", n_images=60, size=64, seed=1)
    inv = inspect(tmp_path / "demo")

    def lists(seed: int, name: str) -> dict[str, str]:
        staged = stage_dataset(inv, tmp_path / name, CLASSES, seed=seed)
        return {p.name: p.read_text() for p in staged.split_files}

    first, again, other = lists(42, "a"), lists(42, "b"), lists(43, "c")
    assert first == again and first != other and set(first) == {"train.txt", "val.txt"}


@pytest.mark.parametrize("val_fraction", [0.1, 0.2, 0.35])
def test_the_split_is_stratified_by_modality_within_one_group(tmp_path: Path, val_fraction: float) -> None:
    write_demo(tmp_path / "demo", n_images=60, size=64, seed=1)
    inv = inspect(tmp_path / "demo")
    staged = stage_dataset(inv, tmp_path / "s", CLASSES, val_fraction=val_fraction)
    sizes: dict[str, int] = defaultdict(int)
    for it in inv.items:
        sizes[it.group] += 1
    largest = max(sizes.values())
    for modality, total in staged.counts["train"].items():
        total += staged.counts["val"][modality]
        assert abs(staged.counts["val"][modality] - val_fraction * total) <= largest


def test_too_few_groups_to_split_is_one_clear_sentence(tmp_path: Path) -> None:
    root = flat_dataset(tmp_path / "ds", n=4)
    (root / "groups.csv").write_text("".join(f"images/img{i}.jpg,one\n" for i in range(4)))
    with pytest.raises(DatasetError, match="too few groups") as err:
        stage_dataset(inspect(root), tmp_path / "s", CLASSES)
    assert err.value.exit_code == 3


# --- the user's split ---------------------------------------------------------------------------


def test_the_export_split_is_kept_and_test_images_are_never_trained_on(tmp_path: Path) -> None:
    truth = exports.roboflow(tmp_path / "rf", {"train": 8, "valid": 3, "test": 3})
    inv = inspect(tmp_path / "rf")
    assert inv.layout_label == "Roboflow export (train/valid/test)" and inv.problems == []
    staged = stage_dataset(inv, tmp_path / "s", CLASSES, test_fraction=0.5)  # ignored: the export decides
    assert staged.split_source == "export"
    listed = {s: set((staged.root / f"{s}.txt").read_text().splitlines()) for s in ("train", "val", "test")}
    assert listed["val"] == {rel for rel, s in truth.items() if s == "val"}
    assert listed["test"] == {rel for rel, s in truth.items() if s == "test"}
    assert not listed["test"] & (listed["train"] | listed["val"])
    data = (staged.root / "data.yaml").read_text()
    assert "val: images/val\ntest: images/test\n" in data


def test_an_export_with_train_and_test_only_keeps_test_and_makes_val_from_train(tmp_path: Path) -> None:
    truth = exports.roboflow(tmp_path / "rf", {"train": 8, "test": 3}, siblings=1)
    staged = stage_dataset(inspect(tmp_path / "rf"), tmp_path / "s", CLASSES)
    assert staged.split_source == "made by the job"
    splits = {rel: staged.split_of(rel) for rel in truth}
    assert {rel for rel, s in splits.items() if s == "test"} == {rel for rel, s in truth.items() if s == "test"}
    assert {s for rel, s in splits.items() if truth[rel] == "train"} == {"train", "val"}


def test_near_duplicates_across_a_user_split_are_counted_with_examples(tmp_path: Path) -> None:
    root = tmp_path / "ul"
    exports.ultralytics(root, {"train": 10, "val": 4})
    planted = []
    for i in (0, 3, 7):  # re-encoded, slightly resized copies of train images placed in val
        src = root / "images" / "train" / f"train_{i:04d}.jpg"
        with Image.open(src) as im:
            copy = im.resize((im.width - 4, im.height - 4))
            buf = io.BytesIO()
            copy.save(buf, "JPEG", quality=70)
        dst = root / "images" / "val" / f"copy_{i}.jpg"
        dst.write_bytes(buf.getvalue())
        label = root / "labels" / "train" / f"train_{i:04d}.txt"
        if label.exists():
            shutil.copy(label, root / "labels" / "val" / f"copy_{i}.txt")
        planted.append((f"images/train/train_{i:04d}.jpg", f"images/val/copy_{i}.jpg"))
    staged = stage_dataset(inspect(root), tmp_path / "s", CLASSES)
    leak = staged.leakage
    assert leak["pairs"] == 3 and leak["held_out_images_with_a_near_duplicate"] == 3
    assert sorted((a, b) for a, b, _ in leak["examples"]) == sorted(planted)
    assert leak["share"] == round(3 / 7, 4) and leak["warn"] is True
    assert staged.summary()["leakage"] == leak


def test_a_photo_counter_is_not_a_recording_when_the_pictures_differ() -> None:
    rels = ["IMG_0001.jpg", "IMG_0002.jpg", "IMG_0003.jpg"]
    alike = {rels[0]: 0b1011, rels[1]: 0b1010, rels[2]: 0b1110}
    assert len(set(group_keys(rels, "sequence", {}, alike).values())) == 1
    different = {rels[0]: 0, rels[1]: (1 << 64) - 1, rels[2]: 0}
    assert len(set(group_keys(rels, "sequence", {}, different).values())) == 3


@pytest.mark.parametrize(
    ("field", "value", "ok"),
    [
        ("group_rules", "csv;re:^(site\\d+)/", True),
        ("group_rules", "csv;frames", False),
        ("group_rules", "re:no-group", False),
        ("group_rules", "re:(unclosed", False),
        ("modality_rules", "thermal=**/flir/**,**/IR_*;visible=**/rgb/**", True),
        ("modality_rules", "sonar=**/x", False),
        ("modality_rules", "thermal", False),
    ],
)
def test_the_group_and_modality_rule_variables_are_checked_at_start(field: str, value: str, ok: bool) -> None:
    from pydantic import ValidationError

    from pogona_job.config import Settings

    if ok:
        assert getattr(Settings(**{field: value}), field) == value
    else:
        with pytest.raises(ValidationError):
            Settings(**{field: value})


def test_filled_in_forms_on_one_template_are_not_leaks_but_a_real_copy_is(tmp_path: Path) -> None:
    """Cheques on one bank template hash alike (distance 0); their labelled fields differ, a copy's do not."""
    root = tmp_path / "cheques"
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for i in range(n):
            cheque(rng).save(root_file(root / "images" / split / f"{split}_{i}.jpg"), quality=90)
            (root_file(root / "labels" / split / f"{split}_{i}.txt")).write_text(CHEQUE_FIELDS)
    copy = root / "images" / "val" / "copy_of_train_0.jpg"
    Image.open(root / "images" / "train" / "train_0.jpg").save(copy, quality=70)  # re-encoded: a real leak
    (root / "labels" / "val" / "copy_of_train_0.txt").write_text(CHEQUE_FIELDS)
    names = ["payee", "amount", "signature"]
    staged = stage_dataset(inspect_dataset(root, names), tmp_path / "s", names)
    leak = staged.leakage
    assert [(a, b) for a, b, _ in leak["examples"]] == [("images/train/train_0.jpg", "images/val/copy_of_train_0.jpg")]
    assert leak["pairs"] == 1 and leak["share"] == round(1 / 5, 4)
    assert leak["alike_but_labels_differ"] >= 10  # every template twin was compared, and set aside
    assert "labelled regions" in leak["compared"] and "pHash" in leak["compared"]
    sheets = staged.leakage_thumbnails(tmp_path / "thumbs")
    assert set(sheets) == {"examples", "alike_but_labels_differ_examples"}
    with Image.open(sheets["examples"]) as im:
        assert im.size == (2 * 96 + 8, 96)  # one pair, side by side


def root_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# --- the split rules at their edges (synthetic images: no files, milliseconds) ---------------------------------


def _item(rel: str, group: str = "", modality: str = "visible", split: str | None = None, phash: int = 0) -> ImageItem:
    return ImageItem(Path(rel), None, rel, modality, 1, split, group=group, phash=phash)


def _groups(n_images_per_group: list[int], modality: str = "visible") -> list[ImageItem]:
    """Groups g0, g1 ... of the given sizes; image `g<i>/<j>.jpg`."""
    return [_item(f"g{i}/{j}.jpg", f"g{i}", modality) for i, n in enumerate(n_images_per_group) for j in range(n)]


def _count(splits: dict[str, str]) -> dict[str, int]:
    return {s: sum(1 for v in splits.values() if v == s) for s in ("train", "val", "test")}


def test_an_export_with_a_val_split_is_kept_as_it_is_and_its_unsplit_images_train() -> None:
    items = [_item("a.jpg", split="val"), _item("b.jpg", split="test"), _item("c.jpg"), _item("d.jpg", split="train")]
    assert assign_splits(items, 0.5, 0.5, seed=0) == (
        {"a.jpg": "val", "b.jpg": "test", "c.jpg": "train", "d.jpg": "train"},
        "export",
    )


def test_one_image_of_two_is_held_out_however_small_the_fraction() -> None:
    splits, source = assign_splits(_groups([1, 1]), 0.01, 0.0, seed=0)
    assert _count(splits) == {"train": 1, "val": 1, "test": 0} and source == "made by the job"


def test_the_train_split_keeps_one_image_however_large_the_fraction() -> None:
    assert _count(assign_splits(_groups([1, 1, 1]), 0.99, 0.0, seed=0)[0]) == {"train": 1, "val": 2, "test": 0}


def test_the_held_out_share_is_the_rounded_fraction_of_each_modality() -> None:
    items = _groups([1] * 10) + [_item(f"t{i}.jpg", f"t{i}", "thermal") for i in range(20)]
    splits, _ = assign_splits(items, 0.3, 0.0, seed=5)
    val = [rel for rel, s in splits.items() if s == "val"]
    assert sum(rel.startswith("g") for rel in val) == 3 and sum(rel.startswith("t") for rel in val) == 6


def test_a_modality_with_a_single_image_holds_nothing_out() -> None:
    items = [*_groups([1, 1, 1, 1]), _item("lonely.jpg", "lonely", "thermal")]
    splits, _ = assign_splits(items, 0.5, 0.0, seed=0)
    assert splits["lonely.jpg"] == "train" and _count(splits) == {"train": 3, "val": 2, "test": 0}


def test_a_test_fraction_makes_a_test_split_from_the_rest_unless_the_export_has_one() -> None:
    splits, _ = assign_splits(_groups([1] * 10), 0.2, 0.3, seed=1)
    assert _count(splits) == {"train": 5, "val": 2, "test": 3}
    exported_test = [*_groups([1] * 10), _item("given.jpg", split="test")]
    splits, _ = assign_splits(exported_test, 0.2, 0.3, seed=1)
    assert _count(splits) == {"train": 8, "val": 2, "test": 1} and splits["given.jpg"] == "test"


def test_the_test_split_never_takes_the_last_training_image() -> None:
    splits, _ = assign_splits(_groups([1, 1, 1]), 0.34, 0.9, seed=0)
    assert _count(splits) == {"train": 1, "val": 1, "test": 1}
    splits, _ = assign_splits(_groups([1, 1]), 0.5, 0.5, seed=0)
    assert _count(splits) == {"train": 1, "val": 1, "test": 0}


def test_when_no_group_fits_the_held_out_share_the_smallest_group_is_held_out() -> None:
    for seed in range(5):  # whatever the seeded order
        splits, _ = assign_splits(_groups([3, 2, 4]), 0.1, 0.0, seed=seed)
        assert {rel for rel, s in splits.items() if s == "val"} == {"g1/0.jpg", "g1/1.jpg"}


def test_whole_groups_fill_the_held_out_share_up_to_exactly_its_size() -> None:
    for seed in range(8):
        splits, _ = assign_splits(_groups([2, 1, 2, 1, 2, 2]), 0.4, 0.0, seed=seed)
        assert _count(splits)["val"] == 4  # round(0.4 * 10): groups that exactly fill it are taken


def test_groups_are_taken_in_the_seeded_order_until_none_fits() -> None:
    groups = {"a": ["a1", "a2"], "b": ["b1"], "c": ["c1", "c2"]}
    assert _take(["a", "b", "c"], groups, 3) == {"a", "b"}
    assert _take(["c", "b", "a"], groups, 3) == {"c", "b"}
    assert _take(["a", "c", "b"], groups, 3) == {"a", "b"}  # c passes the target; b still fits
    assert _take(["a", "b"], {"a": ["a1", "a2", "a3"], "b": ["b1", "b2"]}, 1) == {"b"}  # the smallest
    assert _take(["a"], {"a": ["a1", "a2"]}, 1) == set()  # never everything
    assert _take(["a", "b"], groups, 0) == set()


def test_the_share_held_out_at_its_edges() -> None:
    assert [_share(n, 0.5) for n in (0, 1, 2, 3)] == [0, 0, 1, 2]
    assert [_share(10, f) for f in (-0.1, 0.0, 0.01, 0.26, 0.99, 1.0)] == [0, 0, 1, 3, 9, 9]


def test_a_group_goes_with_the_modality_most_of_its_images_have_and_a_known_one_wins_a_tie() -> None:
    mixed = [_item("m/1.jpg", "m", "unknown"), _item("m/2.jpg", "m", "thermal")]
    items = mixed + [_item(f"t{i}.jpg", f"t{i}", "thermal") for i in range(3)] + _groups([1] * 4)
    for seed in range(6):  # the mixed group is thermal: 5 thermal images, 2 held out; 4 visible, 2 held out
        splits, _ = assign_splits(items, 0.5, 0.0, seed=seed)
        assert splits["m/1.jpg"] == splits["m/2.jpg"]
        thermal = [rel for rel in ("m/1.jpg", "m/2.jpg", "t0.jpg", "t1.jpg", "t2.jpg") if splits[rel] == "val"]
        assert len(thermal) == 2 and _count(splits)["val"] == 4


def test_an_image_without_a_group_is_a_group_of_its_own() -> None:
    items = [_item(f"{i}.jpg") for i in range(4)]  # group ""
    assert _count(assign_splits(items, 0.5, 0.0, seed=0)[0]) == {"train": 2, "val": 2, "test": 0}


def test_a_dataset_that_cannot_be_split_names_its_counts() -> None:
    with pytest.raises(DatasetError) as err:
        assign_splits(_groups([3]), 0.2, 0.0, seed=0)
    assert err.value.sentence == (
        "The dataset cannot be split into train and val without leakage (3 / 0 images): its images form too few "
        "groups (POGONA_GROUP_RULES). Give a split or a groups.csv."
    )


def test_near_duplicates_are_pairs_within_the_distance_across_each_pair_of_splits() -> None:
    base = 0b1111 << 60  # a high bit set: hashes are unsigned 64-bit
    items = [
        _item("tr/a.jpg", phash=base),
        _item("tr/b.jpg", phash=base ^ 0b1),
        _item("va/a.jpg", phash=base ^ 0b111111),  # 6 bits from tr/a: a near-duplicate at the limit
        _item("va/far.jpg", phash=base ^ 0b1111111 << 8),  # 7 bits from tr/a, 8 from tr/b
        _item("te/a.jpg", phash=base ^ 0b11),  # 2 from tr/a, 1 from tr/b, 4 from va/a
        _item("te/z.jpg", phash=base ^ 0b111111 << 16),  # 6 from tr/a only
    ]
    splits = {"tr/a.jpg": "train", "tr/b.jpg": "train", "va/a.jpg": "val", "va/far.jpg": "val", "te/a.jpg": "test"}
    splits["te/z.jpg"] = "test"
    assert near_duplicates(items, splits) == {
        "compared": LEAKAGE_COMPARED.format(distance=6),
        "pairs": 6,
        "held_out_images_with_a_near_duplicate": 3,
        "share": round(3 / 4, 4),
        "max_hash_distance": 6,
        "examples": [
            ["tr/b.jpg", "te/a.jpg", 1],
            ["tr/a.jpg", "te/a.jpg", 2],
            ["va/a.jpg", "te/a.jpg", 4],
            ["tr/b.jpg", "va/a.jpg", 5],
            ["tr/a.jpg", "te/z.jpg", 6],  # five examples of the six pairs, closest first
        ],
        "alike_but_labels_differ": 0,
        "alike_but_labels_differ_examples": [],
    }
    tight = near_duplicates(items, splits, distance=1, examples=1)
    assert (tight["pairs"], tight["examples"], tight["max_hash_distance"]) == (1, [["tr/b.jpg", "te/a.jpg", 1]], 1)


def test_near_duplicates_are_looked_for_between_train_and_test_when_there_is_no_val() -> None:
    items = [_item("a.jpg", phash=1), _item("b.jpg", phash=1), _item("c.jpg", phash=None)]  # type: ignore[arg-type]
    found = near_duplicates(items, {"a.jpg": "train", "b.jpg": "test", "c.jpg": "val"})
    assert (found["pairs"], found["share"], found["examples"]) == (1, 1.0, [["a.jpg", "b.jpg", 0]])
    alone = near_duplicates(items[:1], {"a.jpg": "train"})
    assert (alone["pairs"], alone["share"], alone["examples"]) == (0, 0.0, [])


def test_neighbouring_frames_are_alike_within_twenty_bits_and_an_unknown_hash_is_alike() -> None:
    assert SEQUENCE_DISTANCE == 20
    assert _alike(0, (1 << 20) - 1) and not _alike(0, (1 << 21) - 1)
    assert _alike(1 << 63, (1 << 63) | 0b111) and not _alike(1 << 63, (1 << 21) - 1)
    assert _alike(None, 5) and _alike(5, None) and _alike(None, None)


def _sequence_keys(numbers: list[int], hashes: dict[str, int | None] | None = None, name: str = "v/f_") -> list[str]:
    rels = [f"{name}{n:04d}.jpg" for n in numbers]
    keys = _sequences(rels, hashes or {})
    assert keys == {rel: key for rel, key in group_keys(rels, "sequence", {}, hashes).items() if rel in keys}
    return [keys.get(rel, "none") for rel in rels]


def test_a_frame_sequence_is_keyed_by_its_folder_prefix_and_run() -> None:
    assert _sequence_keys([1, 2, 3]) == ["seq:v/f_#0"] * 3
    keys = group_keys(
        ["a/clip_1.jpg", "a/clip_2.jpg", "a/take_1.jpg", "a/take_2.jpg", "b/clip_3.jpg", "b/clip_4.jpg"], "sequence", {}
    )
    assert keys == {
        "a/clip_1.jpg": "seq:a/clip_#0",
        "a/clip_2.jpg": "seq:a/clip_#0",
        "a/take_1.jpg": "seq:a/take_#0",
        "a/take_2.jpg": "seq:a/take_#0",
        "b/clip_3.jpg": "seq:b/clip_#0",  # another folder: another recording
        "b/clip_4.jpg": "seq:b/clip_#0",
    }
    assert group_keys(["v/0001.jpg", "v/0002.jpg"], "sequence", {}) == {
        "v/0001.jpg": "seq:v/#0",
        "v/0002.jpg": "seq:v/#0",
    }


def test_a_single_numbered_frame_is_no_sequence_and_two_are_one() -> None:
    rels = ["a/lone_7.jpg", "b/pair_1.jpg", "b/pair_2.jpg", "c/notes.jpg"]
    assert _sequences(rels, {}) == {"b/pair_1.jpg": "seq:b/pair_#0", "b/pair_2.jpg": "seq:b/pair_#0"}
    assert group_keys(rels, "sequence", {})["a/lone_7.jpg"] == "img:a/lone_7.jpg"


def test_a_sequence_is_cut_where_the_numbers_jump_past_twice_the_usual_step() -> None:
    assert _sequence_keys([10, 20, 30, 40, 60]) == ["seq:v/f_#0"] * 5  # a jump of exactly twice the step: kept
    assert _sequence_keys([10, 20, 30, 40, 65]) == ["seq:v/f_#0"] * 4 + ["seq:v/f_#1"]
    assert _sequence_keys([10, 20, 30, 40, 90]) == ["seq:v/f_#0"] * 4 + ["seq:v/f_#1"]
    assert _sequence_keys([1, 2, 3, 4, 7]) == ["seq:v/f_#0"] * 4 + ["seq:v/f_#1"]  # a step of 1: a gap of 2
    assert _sequence_keys([0, 2, 4, 6]) == ["seq:v/f_#0"] * 4  # every second frame kept: still one recording
    assert _sequence_keys([1, 2, 3, 10, 11, 30]) == ["seq:v/f_#0"] * 3 + ["seq:v/f_#1"] * 2 + ["seq:v/f_#2"]


def test_frames_with_the_same_number_do_not_shrink_the_usual_step() -> None:
    rels = ["v/f_5.jpg", "v/f_05.jpg", "v/f_005.jpg", "v/f_10.jpg", "v/f_20.jpg"]  # steps 5 and 10: gap 15
    assert set(_sequences(rels, {}).values()) == {"seq:v/f_#0"}
    assert set(_sequences(rels[:3], {}).values()) == {"seq:v/f_#0"}  # no step at all: one number, one run


def test_a_group_set_counts_its_images() -> None:
    assert _size({"a", "c"}, {"a": ["1", "2"], "b": ["3"], "c": ["4", "5", "6"]}) == 5
    assert _size(set(), {"a": ["1"]}) == 0


def test_a_recording_longer_than_a_tenth_of_the_dataset_or_eight_frames_is_cut_into_blocks() -> None:
    assert _sequence_keys(list(range(16))) == ["seq:v/f_#0"] * 8 + ["seq:v/f_#1"] * 8  # 16 images: blocks of 8
    keys = _sequence_keys(list(range(120)))  # 120 images: blocks of 12
    assert keys == [f"seq:v/f_#{i // 12}" for i in range(120)]


def test_each_picture_unlike_the_previous_one_starts_a_new_run() -> None:
    far = (1 << 64) - 1
    hashes = {"v/f_0001.jpg": 0, "v/f_0002.jpg": far, "v/f_0003.jpg": far, "v/f_0004.jpg": 0}
    assert _sequence_keys([1, 2, 3, 4], hashes) == ["seq:v/f_#0", "seq:v/f_#1", "seq:v/f_#1", "seq:v/f_#2"]


def test_the_rule_list_keeps_its_order_and_a_regex_needs_a_capture_group() -> None:
    assert check_rules(" csv; re:(site)/ ;;sequence ") == ["csv", "re:(site)/", "sequence"]
    with pytest.raises(ValueError) as err:
        check_rules("csv;frames")
    assert str(err.value) == "'frames': use csv, roboflow, sequence, folder, none or re:<regex>, separated by ;"
    with pytest.raises(ValueError) as err:
        check_rules("re:site")
    assert str(err.value) == "'re:site': the regex needs a capture group (the group key)"


def test_a_group_is_split_with_the_images_of_its_majority_modality() -> None:
    majority = [_item("n/1.jpg", "n", "thermal"), _item("n/2.jpg", "n", "thermal"), _item("n/3.jpg", "n", "visible")]
    thermal = [_item(f"t{i}.jpg", f"t{i}", "thermal") for i in range(3)]
    for seed in range(6):
        for known in ("thermal", "visible"):  # a known modality wins a tie with unknown
            tie = [_item("m/1.jpg", "m", "unknown"), _item("m/2.jpg", "m", known)]
            others = [_item(f"k{i}.jpg", f"k{i}", known) for i in range(3)]
            # with the known images: 5 of them, 2 held out; alone, 2 unknown images could hold out none
            assert _count(assign_splits(tie + others, 0.4, 0.0, seed=seed)[0])["val"] == 2
        # 6 thermal images, 2 held out (the 3-image group is too big for round(0.4 * 6) = 2)
        splits, _ = assign_splits(majority + thermal, 0.4, 0.0, seed=seed)
        assert _count(splits)["val"] == 2 and {splits[f"n/{i}.jpg"] for i in (1, 2, 3)} == {"train"}


def test_the_groups_are_taken_in_an_order_the_seed_decides() -> None:
    items = _groups([1] * 20)

    def held_out(seed: int) -> set[str]:
        return {rel for rel, s in assign_splits(items, 0.25, 0.0, seed=seed)[0].items() if s == "val"}

    assert held_out(3) == held_out(3)
    assert len({frozenset(held_out(seed)) for seed in range(4)}) > 1
    assert held_out(0) != {f"g{i}/0.jpg" for i in range(5)}  # not simply the first names


def test_the_leaked_share_is_rounded_to_four_places() -> None:
    items = [
        _item("a.jpg", phash=1),
        _item("b.jpg", phash=1),
        _item("c.jpg", phash=(1 << 40) - 1),
        _item("d.jpg", phash=(1 << 64) - 1),
    ]
    found = near_duplicates(items, {"a.jpg": "train", "b.jpg": "test", "c.jpg": "test", "d.jpg": "val"})
    assert (found["held_out_images_with_a_near_duplicate"], found["share"]) == (1, 0.3333)


def test_images_alike_as_a_whole_but_not_where_they_are_labelled_are_set_apart(tmp_path: Path) -> None:
    """Two forms on one template: the same hash, different contents inside the labelled box."""
    paths = {}
    for name, inside in (("a", 0), ("b", 255)):
        pixels = np.full((64, 64), 128, np.uint8)
        pixels[24:40, 24:40] = inside
        paths[name] = tmp_path / f"{name}.png"
        Image.fromarray(pixels, "L").save(paths[name])
        (tmp_path / f"{name}.txt").write_text("0 0.5 0.5 0.25 0.25\n")
    items = [ImageItem(paths[n], tmp_path / f"{n}.txt", f"{n}.png", "visible", 1, None, phash=7) for n in ("a", "b")]
    found = near_duplicates(items, {"a.png": "train", "b.png": "val"})
    assert (found["pairs"], found["examples"]) == (0, [])
    assert (found["alike_but_labels_differ"], found["alike_but_labels_differ_examples"]) == (1, [["a.png", "b.png", 0]])


def test_each_group_rule_names_its_group_and_an_image_no_rule_matches_is_alone() -> None:
    rf = ["a/lizard_jpg.rf.0123456789abcdef.jpg", "a/lizard_jpg.rf.fedcba9876543210.jpg", "a/plain.jpg"]
    assert group_keys(rf, "roboflow", {}) == {
        "a/lizard_jpg.rf.0123456789abcdef.jpg": "rf:a/lizard",
        "a/lizard_jpg.rf.fedcba9876543210.jpg": "rf:a/lizard",
        "a/plain.jpg": "img:a/plain.jpg",
    }
    folders = ["rec_3/x.jpg", "rec_3/y.jpg", "photos/x.jpg", "photos/y.jpg"]
    assert group_keys(folders, "folder", {}) == {
        "rec_3/x.jpg": "dir:rec_3",
        "rec_3/y.jpg": "dir:rec_3",
        "photos/x.jpg": "img:photos/x.jpg",  # a folder named like no recording groups nothing
        "photos/y.jpg": "img:photos/y.jpg",
    }
    mine = ["site1/a.jpg", "site1/b.jpg", "other/c.jpg"]
    assert group_keys(mine, r"re:(site\d+)/", {}) == {
        "site1/a.jpg": "re:site1",
        "site1/b.jpg": "re:site1",
        "other/c.jpg": "img:other/c.jpg",
    }
    assert group_keys(["v/f_1.jpg", "v/f_2.jpg"], "csv;roboflow;folder", {}) == {
        "v/f_1.jpg": "img:v/f_1.jpg",  # frames, but the sequence rule is not asked for
        "v/f_2.jpg": "img:v/f_2.jpg",
    }
