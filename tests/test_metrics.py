"""Metrics: the DiffSeg oracle, mmsegmentation semantics, torchmetrics agreement, invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from diffuseg.eval.metrics import (
    ConfusionMatrix,
    ForegroundIoU,
    HungarianScorer,
    coarse_confusion,
    coarse_lut,
    foreground_iou,
    harmonic_iou,
    match_clusters,
)

# --- the oracle of ../shared/reference/diffseg_golden.md -------------------------------------------
ORACLE_GT = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, -1], [2, 2, 2, 1]])
ORACLE_PRED = np.array([[3, 3, 0, 0], [3, 1, 0, 0], [2, 2, 1, 1], [2, 2, 2, 0]])

FASHION_CLASSES = [
    "background",
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
FASHION_GROUPS = {
    "tops": ["t-shirt", "pullover", "coat", "shirt"],
    "trouser": ["trouser"],
    "dress": ["dress"],
    "footwear": ["sandal", "sneaker", "ankle boot"],
    "bag": ["bag"],
}

SETTINGS = settings(
    max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def _gt255(gt: np.ndarray) -> np.ndarray:
    return np.where(gt < 0, 255, gt)


@pytest.mark.parametrize("ignore", [-1, 255])
def test_oracle_single_image(ignore: int) -> None:
    gt = np.where(ORACLE_GT < 0, ignore, ORACLE_GT)
    scorer = HungarianScorer(3, "per_image", ignore_index=ignore)
    scorer.update(ORACLE_PRED, gt)
    res = scorer.compute()
    assert res["counts"] == {"TP": [3, 5, 5], "FP": [0, 0, 0], "FN": [1, 0, 1], "valid": 15}
    iou = [res["per_class"][str(c)]["IoU"] for c in range(3)]
    assert iou == pytest.approx([75.0, 100.0, 83.33333], abs=1e-3)
    assert res["metrics"]["mIoU"] == pytest.approx(86.11111, abs=1e-3)
    assert res["metrics"]["aAcc"] == pytest.approx(86.66667, abs=1e-3)
    assert res["protocol"]["matching"] == "per_image"


def test_oracle_batch_of_two() -> None:
    # The golden file calls the second label "mirrored left-right"; its numbers are those of the
    # label flipped along the first array axis of the (B, H, W) batch (np.fliplr on the batch),
    # i.e. gt[::-1], and they include a tie that the original breaks by the lower cluster id.
    gt = _gt255(ORACLE_GT)
    scorer = HungarianScorer(3)
    relabelled = scorer.update(np.stack([ORACLE_PRED, ORACLE_PRED]), np.stack([gt, gt[::-1]]))
    assert scorer.compute()["counts"] == {"TP": [7, 7, 8], "FP": [1, 2, 0], "FN": [1, 3, 4], "valid": 30}
    assert relabelled.shape == (2, 4, 4)
    # image 1: cluster 3 -> class 0, cluster 0 -> 1, cluster 2 -> 2, cluster 1 unmatched
    expected = np.array([1, 255, 2, 0])[ORACLE_PRED]
    np.testing.assert_array_equal(relabelled[0], expected)


def test_oracle_batch_equals_two_shards_merged() -> None:
    gt = _gt255(ORACLE_GT)
    a, b = HungarianScorer(3), HungarianScorer(3)
    a.update(ORACLE_PRED, gt)
    b.update(ORACLE_PRED, gt[::-1])
    assert (a + b).compute()["counts"] == {"TP": [7, 7, 8], "FP": [1, 2, 0], "FN": [1, 3, 4], "valid": 30}


def test_unmatched_clusters_are_false_negatives_never_false_positives() -> None:
    gt = np.array([[0, 0, 0, 1, 1, 1]])
    pred = np.array([[0, 0, 5, 1, 1, 7]])  # 4 clusters, 2 classes: 5 and 7 stay unmatched
    res = HungarianScorer(2).update(pred, gt)
    np.testing.assert_array_equal(res, [[0, 0, 255, 1, 1, 255]])
    scorer = HungarianScorer(2)
    scorer.update(pred, gt)
    assert scorer.compute()["counts"] == {"TP": [2, 2], "FP": [0, 0], "FN": [1, 1], "valid": 6}


def test_tie_break_modes() -> None:
    hist = np.array([[0, 2, 2], [0, 2, 1], [4, 1, 0], [0, 0, 3]])
    rows, cols = match_clusters(hist, "cluster_id")
    assert dict(zip(cols.tolist(), rows.tolist(), strict=True))[1] == 0  # lowest id wins the tie
    rows_c, cols_c = match_clusters(hist, "canonical")
    assert hist[rows, cols].sum() == hist[rows_c, cols_c].sum() == 9
    with pytest.raises(ValueError, match="tie_break"):
        match_clusters(hist, "random")  # type: ignore[arg-type]


def test_dataset_matching_one_assignment_and_extra_clusters() -> None:
    gt = np.array([[0, 0, 1, 1], [2, 2, 1, 1]])
    # the same cluster ids mean the same thing in both images; cluster 3 is an extra one
    pred1 = np.array([[5, 5, 1, 1], [2, 2, 1, 1]])
    pred2 = np.array([[5, 5, 1, 1], [2, 3, 1, 1]])
    scorer = HungarianScorer(3, "dataset")
    assert scorer.update(pred1, gt) is None
    scorer.update(pred2, gt)
    res = scorer.compute(["a", "b", "c"])
    assert res["protocol"]["assignment"] == {"1": "b", "2": "c", "5": "a"}
    assert res["counts"] == {"TP": [4, 8, 3], "FP": [0, 0, 0], "FN": [0, 0, 1], "valid": 16}
    np.testing.assert_array_equal(scorer.relabel(pred2), [[0, 0, 1, 1], [2, 255, 1, 1]])


def test_dataset_matching_per_image_ids_are_punished() -> None:
    gt = np.array([[0, 0, 1, 1]])
    per_image, dataset = HungarianScorer(2), HungarianScorer(2, "dataset")
    for pred in (np.array([[0, 0, 1, 1]]), np.array([[1, 1, 0, 0]])):  # ids swap between images
        per_image.update(pred, gt)
        dataset.update(pred, gt)
    assert per_image.compute()["metrics"]["mIoU"] == 100.0
    assert dataset.compute()["metrics"]["aAcc"] == 50.0


def test_hungarian_input_validation() -> None:
    with pytest.raises(ValueError, match="matching"):
        HungarianScorer(3, "global")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 0"):
        HungarianScorer(3).update(np.array([[-1, 0]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="outside"):
        HungarianScorer(2).update(np.array([[0, 1]]), np.array([[0, 7]]))
    with pytest.raises(ValueError, match="batch"):
        HungarianScorer(2).update(np.zeros((1, 1, 2, 2), int), np.zeros((1, 1, 2, 2), int))
    with pytest.raises(ValueError, match="per_image"):
        HungarianScorer(2, "dataset").update(np.array([[10**6, 0]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="compute"):
        HungarianScorer(2, "dataset").relabel(np.array([[0]]))


# --- confusion matrix ------------------------------------------------------------------------------
def test_confusion_matrix_mmseg_semantics() -> None:
    gt = np.array([[0, 0, 1, 1, 255, 0]])
    pred = np.array([[0, 2, 1, 255, 3, 0]])  # 255 is invalid; the 3 falls on an ignore pixel
    cm = ConfusionMatrix(4).update(pred, gt)
    res = cm.compute(["bg", "a", "b", "c"])
    pc = res["per_class"]
    # class 0: I=2, pred area=2, label area=3 -> 2/3. class 1: I=1, label 2 (one invalid pred) -> 1/2
    assert pc["bg"]["IoU"] == pytest.approx(200 / 3)
    assert pc["a"]["IoU"] == pytest.approx(50.0)
    assert pc["a"]["Acc"] == pytest.approx(50.0)
    # class 2: predicted once, never in GT -> IoU 0, Acc undefined
    assert pc["b"] == {"IoU": 0.0, "Acc": None}
    # class 3: predicted only at an ignore pixel -> absent from both -> excluded
    assert pc["c"] == {"IoU": None, "Acc": None}
    assert res["metrics"]["mIoU"] == pytest.approx((200 / 3 + 50 + 0) / 3)
    assert res["metrics"]["aAcc"] == pytest.approx(60.0)
    assert res["metrics"]["mAcc"] == pytest.approx((200 / 3 + 50) / 2)
    assert cm.total == 5 and cm.matrix[1, 4] == 1  # the invalid prediction sits in the extra column


def test_confusion_matrix_seen_unseen_hiou() -> None:
    gt = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 1, 1, 2, 0])
    res = ConfusionMatrix(3).update(pred, gt).compute(["bg", "cat", "cow"], unseen=["cow"])
    m = res["metrics"]
    assert m["mIoU_seen"] == pytest.approx((200 / 3 + 100) / 2)
    assert m["mIoU_unseen"] == pytest.approx(50.0)
    assert m["hIoU"] == pytest.approx(harmonic_iou(m["mIoU_seen"], 50.0))
    assert harmonic_iou(0.0, 0.0) == 0.0 and math.isnan(harmonic_iou(math.nan, 3.0))
    with pytest.raises(ValueError, match="unseen"):
        ConfusionMatrix(3).update(pred, gt).compute(["bg", "cat", "cow"], unseen=["dog"])


def test_confusion_matrix_validation_and_torch_input() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match=r"\[5\]"):
        cm.update(np.zeros((1, 2), int), np.array([[0, 5]]))
    with pytest.raises(ValueError, match="integer"):
        cm.update(np.array([0.5, 1.0]), np.array([0, 1]))
    with pytest.raises(ValueError, match="classes"):
        cm.merge(ConfusionMatrix(4))
    cm.update(torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0, 1], [2, 1]], dtype=torch.uint8))
    assert cm.compute()["metrics"]["aAcc"] == pytest.approx(75.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_torchmetrics_when_all_classes_present(seed: int) -> None:
    rng = np.random.default_rng(seed)
    c = 5
    gt = rng.integers(0, c, size=(3, 17, 19))
    pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, c, size=gt.shape))
    gt[rng.random(gt.shape) < 0.1] = 255
    cm = ConfusionMatrix(c).update(pred, gt)
    res = cm.compute()
    tp, tg = torch.from_numpy(pred), torch.from_numpy(gt)
    macro = MulticlassJaccardIndex(c, average="macro", ignore_index=255)(tp, tg).item() * 100
    per = MulticlassJaccardIndex(c, average="none", ignore_index=255)(tp, tg).numpy() * 100
    micro_acc = MulticlassAccuracy(c, average="micro", ignore_index=255)(tp, tg).item() * 100
    macro_acc = MulticlassAccuracy(c, average="macro", ignore_index=255)(tp, tg).item() * 100
    assert res["metrics"]["mIoU"] == pytest.approx(macro, abs=1e-4)
    np.testing.assert_allclose([res["per_class"][str(i)]["IoU"] for i in range(c)], per, atol=1e-4)
    assert res["metrics"]["aAcc"] == pytest.approx(micro_acc, abs=1e-4)
    assert res["metrics"]["mAcc"] == pytest.approx(macro_acc, abs=1e-4)


# --- coarse groups and foreground ------------------------------------------------------------------
def test_coarse_lut_fashion_groups() -> None:
    lut, names = coarse_lut(FASHION_CLASSES, FASHION_GROUPS)
    assert names == ["background", "tops", "trouser", "dress", "footwear", "bag"]
    assert lut.tolist() == [0, 1, 2, 1, 3, 1, 4, 1, 4, 5, 4]
    # a table that lists background explicitly gives the same result
    lut2, names2 = coarse_lut(FASHION_CLASSES, {"background": ["background"], **FASHION_GROUPS})
    assert lut2.tolist() == lut.tolist() and names2 == names


def test_coarse_lut_rejects_bad_tables() -> None:
    with pytest.raises(ValueError, match="unknown class"):
        coarse_lut(FASHION_CLASSES, {"tops": ["hat"]})
    with pytest.raises(ValueError, match="two coarse groups"):
        coarse_lut(FASHION_CLASSES, {"tops": ["shirt"], "other": ["shirt"]})
    with pytest.raises(ValueError, match="no classes"):
        coarse_lut(FASHION_CLASSES, {"tops": []})


def test_coarse_confusion_equals_rescoring_mapped_labels() -> None:
    rng = np.random.default_rng(3)
    gt = rng.integers(0, 11, size=(4, 9, 9))
    gt[0, 0, :3] = 255
    pred = rng.integers(0, 12, size=gt.shape)  # 11 is an invalid prediction
    fine = ConfusionMatrix(11).update(pred, gt)
    coarse, names = coarse_confusion(fine, FASHION_CLASSES, FASHION_GROUPS)
    lut, _ = coarse_lut(FASHION_CLASSES, FASHION_GROUPS)
    lut_ext = np.append(lut, [len(names)] * 245)  # invalid -> invalid, 255 -> 255 below
    lut_ext[255] = 255
    direct = ConfusionMatrix(len(names)).update(lut_ext[pred], lut_ext[gt])
    np.testing.assert_array_equal(coarse.matrix, direct.matrix)


def test_foreground_iou() -> None:
    gt = np.array([[0, 0, 3, 3], [0, 255, 4, 4]])
    pred = np.array([[0, 2, 3, 0], [0, 7, 1, 4]])
    # fg gt: 4 px; fg pred (valid): (0,1),(0,2),(1,2),(1,3) -> I=3, U=5
    assert foreground_iou(pred, gt) == pytest.approx(60.0)
    acc = ForegroundIoU().update(pred[:1], gt[:1]) + ForegroundIoU().update(pred[1:], gt[1:])
    assert acc.compute() == pytest.approx(60.0)
    assert math.isnan(foreground_iou(np.zeros((2, 2), int), np.zeros((2, 2), int)))


# --- property tests ---------------------------------------------------------------------------------
@st.composite
def labelled_pair(draw, num_classes: int = 4, max_side: int = 6):
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    gt = draw(arrays(np.int64, shape, elements=st.integers(0, num_classes - 1)))
    ignore = draw(arrays(np.bool_, shape))
    gt = np.where(ignore, 255, gt)
    pred = draw(arrays(np.int64, shape, elements=st.integers(0, num_classes + 1)))
    return pred, gt


@SETTINGS
@given(labelled_pair())
def test_perfect_prediction_scores_100(pair) -> None:
    _, gt = pair
    assume((gt != 255).any())
    perfect = np.where(gt == 255, 0, gt)
    m = ConfusionMatrix(4).update(perfect, gt).compute()["metrics"]
    assert m["mIoU"] == m["aAcc"] == m["mAcc"] == 100.0
    for matching in ("per_image", "dataset"):
        h = HungarianScorer(4, matching)
        h.update(perfect * 3 + 1, gt)  # renamed but perfectly consistent segments
        assert h.compute()["metrics"]["mIoU"] == 100.0


@SETTINGS
@given(labelled_pair(), st.permutations(range(6)), st.integers(0, 5))
def test_permuting_cluster_ids_leaves_hungarian_scores_unchanged(pair, perm, offset) -> None:
    pred, gt = pair
    renamed = np.asarray(perm)[pred] * 2 + offset
    for matching in ("per_image", "dataset"):
        a = HungarianScorer(4, matching, tie_break="canonical")
        b = HungarianScorer(4, matching, tie_break="canonical")
        a.update(pred, gt)
        b.update(renamed, gt)
        ra, rb = a.compute(), b.compute()
        assert ra["counts"] == rb["counts"] and ra["metrics"] == rb["metrics"]
        # with the original's tie-breaking the total overlap (ACC) is invariant too
        c = HungarianScorer(4, matching)
        c.update(renamed, gt)
        assert c.compute()["metrics"]["aAcc"] == ra["metrics"]["aAcc"]


@SETTINGS
@given(labelled_pair(), st.integers(0, 9))
def test_ignore_pixels_never_count(pair, value) -> None:
    pred, gt = pair
    changed = np.where(gt == 255, value, pred)
    assert np.array_equal(
        ConfusionMatrix(4).update(pred, gt).matrix, ConfusionMatrix(4).update(changed, gt).matrix
    )
    fa, fb = ForegroundIoU().update(pred, gt), ForegroundIoU().update(changed, gt)
    assert (fa.intersection, fa.union) == (fb.intersection, fb.union)
    for matching in ("per_image", "dataset"):
        a, b = HungarianScorer(4, matching), HungarianScorer(4, matching)
        a.update(pred, gt)
        b.update(changed, gt)
        assert a.compute()["counts"] == b.compute()["counts"]


@SETTINGS
@given(labelled_pair(), st.integers(1, 2))
def test_merge_of_shards_equals_whole(pair, cut) -> None:
    pred, gt = pair
    cut = min(cut, pred.shape[0])
    whole, s1, s2 = ConfusionMatrix(4), ConfusionMatrix(4), ConfusionMatrix(4)
    whole.update(pred, gt)
    s1.update(pred[:cut], gt[:cut])
    s2.update(pred[cut:], gt[cut:])
    np.testing.assert_array_equal((s1 + s2).matrix, whole.matrix)
    for matching in ("per_image", "dataset"):
        w, a, b = (HungarianScorer(4, matching) for _ in range(3))
        w.update(pred, gt)
        a.update(pred[:cut], gt[:cut])
        if cut < pred.shape[0]:
            b.update(pred[cut:], gt[cut:])
        assert (a + b).compute() == w.compute()
