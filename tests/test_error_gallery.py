"""The error kinds of the report's gallery, on boxes whose right answer is known by construction."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from pogona_job.evaluation.errors_gallery import analyse, match
from pogona_job.evaluation.inference import Box
from pogona_job.run.gallery import error_section

A = (10.0, 10.0, 50.0, 50.0)
B = (60.0, 60.0, 100.0, 100.0)


def _pred(xyxy: tuple[float, float, float, float], cls: int = 0, conf: float = 0.9) -> Box:
    return Box(xyxy, cls, conf)


def test_each_prediction_and_label_gets_the_kind_it_is() -> None:
    labels = [Box(A, 0, 1.0), Box(B, 0, 1.0), Box((10.0, 60.0, 50.0, 100.0), 1, 1.0), Box((120, 10, 150, 40), 0, 1.0)]
    preds = [
        _pred(A),  # correct
        _pred((72.0, 72.0, 112.0, 112.0)),  # same class, IoU ~0.3 with B: poor localisation
        _pred((10.0, 60.0, 50.0, 100.0), cls=0),  # right place, label says class 1: wrong class
        _pred((200.0, 200.0, 220.0, 220.0), conf=0.8),  # nothing there: false alarm
        _pred((120, 10, 150, 40), conf=0.1),  # below the confidence: ignored, so the label is missed
    ]
    e = match("x.jpg", "thermal", labels, preds, conf=0.25)
    assert e.prediction_outcomes == ["correct", "poor localisation", "wrong class", "false alarm"]
    assert e.label_outcomes == ["found", "poor localisation", "wrong class", "missed"]
    assert e.summary() == "1 missed, 1 false alarm, 1 wrong class, 1 poor localisation"
    two = match("y.jpg", "thermal", [], [_pred(A), _pred(B)], conf=0.25)
    assert two.summary() == "2 false alarms"


def test_a_prediction_matches_at_most_one_label_and_the_most_confident_wins() -> None:
    e = match("x.jpg", "visible", [Box(A, 0, 1.0)], [_pred(A, conf=0.5), _pred(A, conf=0.7)], conf=0.25)
    assert e.prediction_outcomes == ["correct", "false alarm"]
    assert e.predictions[0].conf == 0.7


def test_worst_misses_and_false_alarms_per_modality_and_class_with_pictures(tmp_path: Path) -> None:
    names = {0: "head", 1: "tail"}
    items = []
    images: dict[str, Path] = {}
    for i in range(6):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (128, 128), (40 * i, 90, 90)).save(path)
        images[str(path)] = path
        labels = [Box(A, 0, 1.0)] * (i % 3) + [Box(B, 1, 1.0)]
        preds = [_pred((100.0, 0.0, 120.0, 20.0), conf=0.3 + i / 10)] if i % 2 else []
        items.append(match(str(path), "thermal" if i < 3 else "visible", labels, preds, conf=0.25))
    analysis = analyse(items, names, conf=0.25, handful=2)
    scopes = [g.scope for g in analysis.groups]
    assert scopes == ["all", "thermal", "visible", "class head", "class tail"]
    everything = analysis.groups[0]
    assert everything.counts == {"missed": 12, "false alarm": 3, "wrong class": 0, "poor localisation": 0}
    assert [e.file for e in everything.worst_misses] == [str(tmp_path / "img2.png"), str(tmp_path / "img5.png")]
    assert [e.file for e in everything.worst_false_alarms] == [str(tmp_path / "img5.png"), str(tmp_path / "img3.png")]
    tail = analysis.groups[-1]
    assert tail.counts["missed"] == 6 and tail.counts["false alarm"] == 0  # the false alarms were class 0
    assert analysis.groups[3].counts["false alarm"] == 3 and analysis.groups[-1].worst_false_alarms == []
    lines, files = error_section(analysis, images, tmp_path / "out")
    assert "| all | 6 | 12 | 12 | 3 | 0 | 0 |" in lines
    assert len(files) == len({key for _, key in files}) and all(p.exists() for p, _ in files)
    side_by_side = Image.open(files[0][0])
    assert side_by_side.width > 2 * 128 and side_by_side.height > 128  # labels beside predictions
    assert all(f"]({key})" in "\n".join(lines) for _, key in files)
