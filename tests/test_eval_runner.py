"""Evaluation runner: saved-prediction scoring, method runs, report JSON shape, text rendering."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from diffuseg.eval import (
    ConfusionMatrix,
    SegmentationEvaluator,
    coarse_confusion,
    evaluate_method,
    evaluate_predictions,
    foreground_iou,
    format_report,
    load_split_samples,
)
from diffuseg.io import write_image, write_json, write_label
from diffuseg.outputs import SegmentationOutput

CLASSES = ["background", "shirt", "shoe", "bag"]
GROUPS = {"clothes": ["shirt", "shoe"], "bag": ["bag"]}
TOP_KEYS = {"method", "dataset", "split", "num_images", "metrics", "per_class", "protocol", "timing"}


def _labels(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lab = np.zeros((8, 10), dtype=np.int64)
        for cls in rng.choice([1, 2, 3], size=2, replace=False):
            y, x = rng.integers(0, 5, size=2)
            lab[y : y + 3, x : x + 4] = cls
        lab[0, 0] = 255
        out.append(lab)
    return out


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    meta = {"name": "Tiny", "classes": CLASSES, "palette": [[0, 0, 0]] * 4, "unseen": ["bag"]}
    meta.update(ignore_index=255, coarse_groups=GROUPS)
    write_json(root / "meta.json", meta)
    for i, lab in enumerate(_labels(4)):
        write_label(root / "ann_dir" / "val" / f"{i:03d}.png", lab)
        write_image(
            root / "img_dir" / "val" / f"{i:03d}.png",
            (lab[..., None] * 40 % 256).repeat(3, 2).astype(np.uint8),
        )
    return root


def _write_preds(pred_dir: Path, preds: list[np.ndarray]) -> None:
    for i, p in enumerate(preds):
        write_label(pred_dir / f"{i:03d}.png", p)


def test_perfect_predictions_report_shape_and_json(dataset: Path, tmp_path: Path) -> None:
    preds = [np.where(lab == 255, 0, lab) for lab in _labels(4)]
    _write_preds(tmp_path / "pred", preds)
    out = tmp_path / "report.json"
    rep = evaluate_predictions(tmp_path / "pred", dataset, json_out=out, progress=False)
    assert set(rep) == TOP_KEYS | {"per_group"} and json.loads(out.read_text()) == rep
    assert (rep["method"], rep["dataset"], rep["split"], rep["num_images"]) == (
        "predictions",
        "Tiny",
        "val",
        4,
    )
    m = rep["metrics"]
    assert m["mIoU"] == m["aAcc"] == m["mAcc"] == m["foreground_IoU"] == m["coarse_mIoU"] == 100.0
    assert m["mIoU_unseen"] == 100.0 and rep["protocol"]["unseen"] == ["bag"]
    assert set(rep["per_class"]) == set(CLASSES)
    assert list(rep["per_group"]) == ["background", "clothes", "bag"]
    assert rep["timing"]["seconds_per_image"] is None


def test_imperfect_predictions_match_confusion_matrix(dataset: Path, tmp_path: Path) -> None:
    labels = _labels(4)
    rng = np.random.default_rng(5)
    preds = [
        np.where(rng.random(lab.shape) < 0.3, rng.integers(0, 4, lab.shape), np.where(lab == 255, 0, lab))
        for lab in labels
    ]
    _write_preds(tmp_path / "pred", preds)
    rep = evaluate_predictions(tmp_path / "pred", dataset, unseen=[], progress=False)
    cm = ConfusionMatrix(4)
    for p, g in zip(preds, labels, strict=True):
        cm.update(p, g)
    assert rep["metrics"]["mIoU"] == pytest.approx(cm.compute()["metrics"]["mIoU"])
    assert rep["metrics"]["mIoU"] < 100.0 and "hIoU" not in rep["metrics"]
    coarse, _ = coarse_confusion(cm, CLASSES, GROUPS)
    assert rep["metrics"]["coarse_mIoU"] == pytest.approx(coarse.compute()["metrics"]["mIoU"])
    assert rep["metrics"]["foreground_IoU"] == pytest.approx(
        foreground_iou(np.stack(preds), np.stack(labels))
    )


def test_missing_predictions_are_listed(dataset: Path, tmp_path: Path) -> None:
    _write_preds(tmp_path / "pred", _labels(4)[:1])
    with pytest.raises(ValueError, match=r"3 of 4 predictions are missing.*001, 002, 003"):
        evaluate_predictions(tmp_path / "pred", dataset, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_predictions(tmp_path / "nowhere", dataset, progress=False)
    with pytest.raises(FileNotFoundError, match="splits with labels here"):
        evaluate_predictions(tmp_path / "pred", dataset, split="test", progress=False)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        evaluate_predictions(tmp_path / "pred", tmp_path, progress=False)


def test_size_mismatch_names_the_file(dataset: Path, tmp_path: Path) -> None:
    _write_preds(tmp_path / "pred", [np.zeros((4, 4), np.int64)] * 4)
    with pytest.raises(ValueError, match=r"000\.png: size"):
        evaluate_predictions(tmp_path / "pred", dataset, progress=False)


@pytest.mark.parametrize("matching", ["per_image", "dataset"])
def test_unsupervised_predictions(dataset: Path, tmp_path: Path, matching: str) -> None:
    labels = _labels(4)
    # consistent renaming 0->5, 1->2, 2->7, 3->0: both protocols recover a perfect score
    rename = np.array([5, 2, 7, 0])
    _write_preds(tmp_path / "pred", [rename[np.where(lab == 255, 0, lab)] for lab in labels])
    rep = evaluate_predictions(
        tmp_path / "pred", dataset, unsupervised=True, matching=matching, progress=False
    )
    assert rep["metrics"]["mIoU"] == 100.0
    assert rep["protocol"]["matching"] == matching and rep["protocol"]["unsupervised"] is True
    assert "coarse_mIoU" not in rep["metrics"]


def test_evaluate_method_with_segmentation_output(dataset: Path, tmp_path: Path) -> None:
    calls: list[int] = []

    def predict(images: list[np.ndarray]) -> SegmentationOutput:
        calls.append(len(images))
        labels = np.stack([(img[..., 0].astype(np.int64) // 40) % 4 for img in images])
        return SegmentationOutput(labels=labels)

    samples = list(load_split_samples(dataset, "val"))
    rep = evaluate_method(
        predict, samples, 4, CLASSES, batch_size=3, method="toy", progress=False, coarse_groups=GROUPS
    )
    assert calls == [3, 1] and rep["num_images"] == 4
    assert rep["metrics"]["mIoU"] == 100.0
    assert rep["timing"]["seconds_per_image"] > 0 and rep["timing"]["num_batches"] == 2
    # the same predictions saved to disk give the same numbers
    _write_preds(tmp_path / "pred", list(predict([s["image"] for s in samples]).labels))
    disk = evaluate_predictions(tmp_path / "pred", dataset, unseen=[], progress=False)
    assert disk["metrics"] == rep["metrics"]


@dataclass
class _Obj:
    image: np.ndarray
    label: np.ndarray


def test_evaluate_method_sample_kinds_and_errors(tmp_path: Path) -> None:
    lab = np.array([[0, 1], [1, 255]])
    img = np.zeros((2, 2, 3), np.uint8)
    samples = [(img, lab), {"image": img, "label": lab}, _Obj(img, lab)]
    rep = evaluate_method(
        lambda ims: [np.array([[0, 1], [1, 0]])] * len(ims),
        samples,
        2,
        ["a", "b"],
        progress=False,
        json_out=tmp_path / "r.json",
    )
    assert rep["num_images"] == 3 and rep["metrics"]["aAcc"] == 100.0
    assert json.loads((tmp_path / "r.json").read_text())["num_images"] == 3
    with pytest.raises(ValueError, match="returned 1 label maps for a batch of 3"):
        evaluate_method(lambda ims: [lab], samples, 2, ["a", "b"], progress=False)
    with pytest.raises(ValueError, match="sample must be"):
        evaluate_method(lambda ims: ims, [img], 2, ["a", "b"], progress=False)
    with pytest.raises(ValueError, match="num_classes"):
        evaluate_method(lambda ims: ims, samples, 3, ["a", "b"], progress=False)
    with pytest.raises(ValueError, match="unseen"):
        evaluate_method(lambda ims: ims, samples, 2, ["a", "b"], unseen=["c"], progress=False)


def test_evaluator_shards_merge_to_the_whole() -> None:
    labels = _labels(6, seed=2)
    preds = [np.roll(lab, 1, axis=1) % 4 for lab in labels]
    kw = {"unseen": ["bag"], "coarse_groups": GROUPS}
    whole, a, b = (SegmentationEvaluator(CLASSES, **kw) for _ in range(3))
    for i, (p, g) in enumerate(zip(preds, labels, strict=True)):
        whole.update(p, g)
        (a if i < 2 else b).update(p, g)
    assert (a + b).report("m", "d", "val") == whole.report("m", "d", "val")
    with pytest.raises(ValueError, match="nothing was evaluated"):
        SegmentationEvaluator(CLASSES).report("m", "d", "val")


def test_format_report_is_readable(dataset: Path, tmp_path: Path) -> None:
    _write_preds(tmp_path / "pred", [np.where(lab == 255, 0, lab) for lab in _labels(4)])
    text = format_report(evaluate_predictions(tmp_path / "pred", dataset, progress=False))
    assert "predictions on Tiny/val (4 images)" in text
    assert "mIoU 100.00" in text and "coarse group" in text and "clothes" in text
    assert "unseen classes: bag" in text
