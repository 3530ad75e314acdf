"""Segmentation metrics: confusion matrix (mmsegmentation semantics) and Hungarian scoring.

Every scorer here is an *accumulator*: ``update`` adds one image (or a batch), ``merge`` / ``+``
combines shards (one per process in a sharded evaluation), ``compute`` turns the sums into
percentages. Sums are kept as integer counts so that merging shards gives bit-identical results
to scoring the whole dataset in one process.

Semantics (see DESIGN.md, "Evaluation contract"):

* Intersections and unions are summed over the dataset before dividing (mmsegmentation), not
  averaged per image.
* Ground-truth pixels equal to ``ignore_index`` are dropped before anything is counted.
* A prediction outside ``[0, num_classes)`` (e.g. 255 "unsure" or -1) is always wrong: it is
  counted in an extra "invalid" column, so it lowers the recall/IoU of the ground-truth class at
  that pixel but is not a false positive of any class.
* A class absent from both ground truth and prediction has IoU NaN and is left out of the means
  (``nanmean``); NaN becomes ``null`` in JSON.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from scipy.optimize import linear_sum_assignment

logger = logging.getLogger(__name__)

Matching = Literal["per_image", "dataset"]
MATCHINGS: tuple[str, ...] = ("per_image", "dataset")
MAX_DATASET_CLUSTERS = 65536
TieBreak = Literal["cluster_id", "canonical"]
TIE_BREAKS: tuple[str, ...] = ("cluster_id", "canonical")
_MATCHING_TEXT = {
    "per_image": "Hungarian matching per image (DiffSeg's protocol)",
    "dataset": "Hungarian matching once over the dataset (STEGO's protocol)",
}


# ----------------------------------------------------------------------------- helpers
def to_numpy(x: Any, name: str = "array") -> np.ndarray:
    """Return ``x`` (numpy array, torch tensor or nested list) as an integer numpy array.

    Accepting torch tensors here keeps GPU/accelerate callers free of conversion boilerplate.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        is_float = np.issubdtype(arr.dtype, np.floating)
        if is_float and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            return arr.astype(np.int64)
        raise ValueError(f"{name} must hold integer label ids, got dtype {arr.dtype}")
    return arr


def _check_shapes(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(
            f"prediction shape {pred.shape} != ground-truth shape {gt.shape}; resize the prediction "
            "to the label size (nearest neighbour) before scoring"
        )


def _valid_gt(gt: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """Mask of pixels that count; raise on ground-truth ids that are neither a class nor ignore."""
    valid = gt != ignore_index
    bad = valid & ((gt < 0) | (gt >= num_classes))
    if bad.any():
        values = np.unique(gt[bad])[:10].tolist()
        raise ValueError(
            f"ground truth holds ids {values} outside [0, {num_classes}) that are not ignore_index "
            f"({ignore_index}); check num_classes or the dataset's label encoding"
        )
    return valid


def _pct(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """100 * num / den with NaN where den == 0 (a class with nothing to score)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out * 100.0


def nanmean(values: np.ndarray) -> float:
    """Mean over the finite entries; NaN when there are none (without numpy's warning)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def json_float(value: float) -> float | None:
    """A float for JSON: NaN/inf become ``None`` (``null``), which every JSON reader accepts."""
    value = float(value)
    return value if math.isfinite(value) else None


def harmonic_iou(seen: float, unseen: float) -> float:
    """hIoU = 2·S·U/(S+U), the zero-shot summary that punishes neglecting either side."""
    if math.isnan(seen) or math.isnan(unseen):
        return math.nan
    if seen + unseen == 0:
        return 0.0
    return 2.0 * seen * unseen / (seen + unseen)


def _names(class_names: Sequence[str] | None, n: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(n)]
    names = [str(c) for c in class_names]
    if len(names) != n:
        raise ValueError(f"got {len(names)} class names for {n} classes")
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be unique, got {names}")
    return names


def _per_class(names: list[str], iou: np.ndarray, acc: np.ndarray) -> dict[str, dict[str, float | None]]:
    return {n: {"IoU": json_float(i), "Acc": json_float(a)} for n, i, a in zip(names, iou, acc, strict=True)}


def _seen_unseen(names: list[str], iou: np.ndarray, unseen: Sequence[str]) -> dict[str, float | None]:
    """mIoU over seen and unseen classes and their harmonic mean.

    "Seen" is every class not listed as unseen, background included (ZS3Net / ZS3D convention).
    """
    missing = [u for u in unseen if u not in names]
    if missing:
        raise ValueError(f"unseen classes {missing} are not among the class names {names}")
    is_unseen = np.array([n in set(unseen) for n in names])
    seen_m = nanmean(iou[~is_unseen])
    unseen_m = nanmean(iou[is_unseen])
    return {
        "mIoU_seen": json_float(seen_m),
        "mIoU_unseen": json_float(unseen_m),
        "hIoU": json_float(harmonic_iou(seen_m, unseen_m)),
    }


# ----------------------------------------------------------------------------- confusion matrix
class ConfusionMatrix:
    """Dataset-level confusion matrix with mmsegmentation's mIoU semantics.

    ``matrix[g, p]`` counts pixels of ground-truth class ``g`` predicted as ``p``; the extra last
    column ``p == num_classes`` counts predictions outside ``[0, num_classes)``, which are always
    wrong but belong to no class (so they are false negatives, never false positives).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)

    def update(self, pred: Any, gt: Any) -> ConfusionMatrix:
        """Add the pixels of ``pred`` vs ``gt`` (same shape, any number of dims); returns self."""
        pred, gt = to_numpy(pred, "prediction"), to_numpy(gt, "ground truth")
        _check_shapes(pred, gt)
        c = self.num_classes
        valid = _valid_gt(gt, c, self.ignore_index)
        g = gt[valid].astype(np.int64)
        p = pred[valid].astype(np.int64)
        p[(p < 0) | (p >= c)] = c
        counts = np.bincount(g * (c + 1) + p, minlength=c * (c + 1))
        self.matrix += counts.reshape(c, c + 1)
        return self

    def _check_compatible(self, other: ConfusionMatrix) -> None:
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"cannot merge ConfusionMatrix with {type(other).__name__}")
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge confusion matrices of {self.num_classes} / {other.num_classes} classes "
                f"(ignore {self.ignore_index} / {other.ignore_index})"
            )

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """A new matrix holding the counts of both shards."""
        self._check_compatible(other)
        out = ConfusionMatrix(self.num_classes, self.ignore_index)
        out.matrix = self.matrix + other.matrix
        return out

    __add__ = merge

    @property
    def total(self) -> int:
        """Number of scored (non-ignored) pixels."""
        return int(self.matrix.sum())

    def counts(self) -> dict[str, np.ndarray]:
        """Per-class intersection, union, predicted-area and label-area, as mmsegmentation names them."""
        c = self.num_classes
        intersect = np.diag(self.matrix[:, :c]).copy()
        area_label = self.matrix.sum(axis=1)
        area_pred = self.matrix[:, :c].sum(axis=0)
        return {
            "intersect": intersect,
            "union": area_pred + area_label - intersect,
            "area_pred": area_pred,
            "area_label": area_label,
        }

    def iou(self) -> np.ndarray:
        """Per-class IoU in percent; NaN for classes absent from both ground truth and prediction."""
        k = self.counts()
        return _pct(k["intersect"], k["union"])

    def compute(
        self, class_names: Sequence[str] | None = None, unseen: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """``{"metrics": {aAcc, mAcc, mIoU[, mIoU_seen, mIoU_unseen, hIoU]}, "per_class": {...}}``.

        Percentages in 0..100. NaN (nothing to score) is reported as ``None``.
        """
        names = _names(class_names, self.num_classes)
        k = self.counts()
        iou = _pct(k["intersect"], k["union"])
        acc = _pct(k["intersect"], k["area_label"])
        metrics: dict[str, float | None] = {
            "mIoU": json_float(nanmean(iou)),
            "aAcc": json_float(_pct(k["intersect"].sum(), k["area_label"].sum())),
            "mAcc": json_float(nanmean(acc)),
        }
        if unseen:
            metrics.update(_seen_unseen(names, iou, list(unseen)))
        return {"metrics": metrics, "per_class": _per_class(names, iou, acc)}

    def grouped(self, lut: Sequence[int] | np.ndarray, num_groups: int) -> ConfusionMatrix:
        """The confusion matrix of the coarse classes ``lut[fine_id]``, by summing blocks.

        Equal to re-scoring ``lut[pred]`` against ``lut[gt]`` but free: no second pass over pixels.
        """
        lut = np.asarray(lut, dtype=np.int64)
        if lut.shape != (self.num_classes,):
            raise ValueError(f"lut must map each of the {self.num_classes} classes, got shape {lut.shape}")
        if lut.min() < 0 or lut.max() >= num_groups:
            raise ValueError(f"lut values must lie in [0, {num_groups})")
        cols = np.append(lut, num_groups)  # invalid predictions stay invalid
        rows_summed = np.zeros((num_groups, self.num_classes + 1), dtype=np.int64)
        np.add.at(rows_summed, lut, self.matrix)
        out = ConfusionMatrix(num_groups, self.ignore_index)
        out.matrix = np.zeros((num_groups, num_groups + 1), dtype=np.int64)
        np.add.at(out.matrix.T, cols, rows_summed.T)
        return out


# ----------------------------------------------------------------------------- coarse groups
def coarse_lut(
    class_names: Sequence[str], groups: Mapping[str, Sequence[str]]
) -> tuple[np.ndarray, list[str]]:
    """Map fine class ids to coarse group ids: ``(lut, group_names)``.

    ``groups`` maps a group name to its fine class names. Classes not listed (e.g. background)
    become a group of their own under their own name, so the table only needs the real merges.
    Group ids follow the order in which the fine ids first reach each group, which keeps
    background (id 0) at coarse id 0.
    """
    names = _names(class_names, len(class_names))
    owner: dict[str, str] = {}
    for group, members in groups.items():
        if not members:
            raise ValueError(f"coarse group {group!r} lists no classes")
        for m in members:
            if m not in names:
                raise ValueError(f"coarse group {group!r} names unknown class {m!r}; classes are {names}")
            if m in owner and owner[m] != group:
                raise ValueError(f"class {m!r} is in two coarse groups: {owner[m]!r} and {group!r}")
            owner[m] = group
    for n in names:
        if n not in owner:
            if n in groups:
                raise ValueError(f"class {n!r} is in no group but a group of that name exists; list it")
            owner[n] = n
    group_names: list[str] = []
    lut = np.empty(len(names), dtype=np.int64)
    for i, n in enumerate(names):
        if owner[n] not in group_names:
            group_names.append(owner[n])
        lut[i] = group_names.index(owner[n])
    return lut, group_names


def coarse_confusion(
    cm: ConfusionMatrix, class_names: Sequence[str], groups: Mapping[str, Sequence[str]]
) -> tuple[ConfusionMatrix, list[str]]:
    """The coarse-group confusion matrix of ``cm`` and the group names (see :func:`coarse_lut`)."""
    lut, group_names = coarse_lut(class_names, groups)
    return cm.grouped(lut, len(group_names)), group_names


# ----------------------------------------------------------------------------- foreground IoU
class ForegroundIoU:
    """Class-agnostic foreground-vs-background IoU, summed over the dataset.

    Foreground is every pixel whose id is not ``background`` (a prediction of an invalid id, e.g.
    255, therefore counts as foreground: the model claimed *something* is there). It tells whether
    a model finds the objects at all, independently of naming them right.
    """

    def __init__(self, background: int = 0, ignore_index: int = 255) -> None:
        self.background = int(background)
        self.ignore_index = int(ignore_index)
        self.intersection = 0
        self.union = 0

    def update(self, pred: Any, gt: Any) -> ForegroundIoU:
        """Add one image or batch (same shapes); returns self."""
        pred, gt = to_numpy(pred, "prediction"), to_numpy(gt, "ground truth")
        _check_shapes(pred, gt)
        valid = gt != self.ignore_index
        pf = (pred != self.background) & valid
        gf = (gt != self.background) & valid
        self.intersection += int(np.count_nonzero(pf & gf))
        self.union += int(np.count_nonzero(pf | gf))
        return self

    def merge(self, other: ForegroundIoU) -> ForegroundIoU:
        """A new accumulator holding both shards."""
        if (other.background, other.ignore_index) != (self.background, self.ignore_index):
            raise ValueError("cannot merge ForegroundIoU accumulators with different settings")
        out = ForegroundIoU(self.background, self.ignore_index)
        out.intersection = self.intersection + other.intersection
        out.union = self.union + other.union
        return out

    __add__ = merge

    def compute(self) -> float:
        """Foreground IoU in percent; NaN when neither side has any foreground."""
        return float(_pct(self.intersection, self.union))


def foreground_iou(pred: Any, gt: Any, background: int = 0, ignore_index: int = 255) -> float:
    """Foreground IoU (percent) of one image or batch; see :class:`ForegroundIoU`."""
    return ForegroundIoU(background, ignore_index).update(pred, gt).compute()


# ----------------------------------------------------------------------------- Hungarian scoring
def match_clusters(hist: np.ndarray, tie_break: TieBreak = "cluster_id") -> tuple[np.ndarray, np.ndarray]:
    """Maximum-overlap assignment ``(rows, cols)`` of clusters (rows) to classes (columns).

    ``tie_break="cluster_id"`` solves the histogram in cluster-id order, as DiffSeg's original
    does: among equally good assignments scipy keeps the lowest cluster ids. ``"canonical"``
    first sorts the rows by their content, so ties are broken the same way whatever ids the
    clusters carry and every score is exactly invariant to renaming clusters. The two differ
    only under exact ties, and never in the total overlap (ACC).
    """
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")
    if hist.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    order = np.arange(hist.shape[0])
    if tie_break == "canonical":
        order = np.lexsort(hist.T[::-1])
    rows, cols = linear_sum_assignment(hist[order], maximize=True)
    return order[rows], cols


class HungarianScorer:
    """Scores unsupervised segments by matching them to classes with the Hungarian algorithm.

    ``matching="per_image"`` is DiffSeg's protocol: per image, a (clusters × classes) overlap
    histogram is matched with ``linear_sum_assignment(hist, maximize=True)``; a matched cluster's
    pixels are TP for its class where the ground truth agrees and FP elsewhere; pixels of
    unmatched clusters (more clusters than classes) count as FN of their true class, never as
    FP. TP/FP/FN are summed over images; ACC = ΣTP/#valid, mIoU = nanmean(TP/(TP+FP+FN)).

    ``matching="dataset"`` is STEGO's: one histogram over the whole dataset, one assignment, so
    cluster ids must mean the same in every image. More clusters than classes are allowed: the
    extra ones stay unmatched and are treated as in DiffSeg's protocol (FN, never FP) rather than
    STEGO's extra zero-IoU row.

    ``tie_break`` decides between equally good assignments (see :func:`match_clusters`); the
    default reproduces the original exactly.
    """

    def __init__(
        self,
        num_classes: int,
        matching: Matching = "per_image",
        ignore_index: int = 255,
        tie_break: TieBreak = "cluster_id",
    ) -> None:
        if tie_break not in TIE_BREAKS:
            raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")
        self.tie_break = tie_break
        if matching not in MATCHINGS:
            raise ValueError(f"matching must be one of {MATCHINGS}, got {matching!r}")
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.matching = matching
        self.ignore_index = int(ignore_index)
        self.num_images = 0
        self.num_segments = 0  # summed over images: mean segments per image in the report
        self.tp = np.zeros(self.num_classes, dtype=np.int64)
        self.fp = np.zeros(self.num_classes, dtype=np.int64)
        self.fn = np.zeros(self.num_classes, dtype=np.int64)
        self.hist = np.zeros((0, self.num_classes), dtype=np.int64)  # dataset mode
        self.assignment: dict[int, int] | None = None  # dataset mode, set by compute()

    # -- accumulation
    def update(self, pred_segments: Any, gt: Any) -> np.ndarray | None:
        """Add one image ``(H, W)`` or a batch ``(B, H, W)``.

        Returns, in per-image mode, the prediction relabelled to matched class ids (unmatched
        segments → ``ignore_index``) for visualisation; in dataset mode ``None`` (the matching
        is known only after :meth:`compute`; then use :meth:`relabel`).
        """
        pred, g = to_numpy(pred_segments, "prediction"), to_numpy(gt, "ground truth")
        _check_shapes(pred, g)
        if pred.ndim not in (2, 3):
            raise ValueError(f"expected one (H, W) segment map or a batch (B, H, W), got shape {pred.shape}")
        if pred.size and pred.min() < 0:
            raise ValueError(f"segment ids must be >= 0, got {int(pred.min())}")
        if pred.ndim == 2:
            return self._update_one(pred, g)
        outs = [self._update_one(p, t) for p, t in zip(pred, g, strict=True)]
        return None if self.matching == "dataset" else np.stack(outs)

    def _update_one(self, pred: np.ndarray, gt: np.ndarray) -> np.ndarray | None:
        c = self.num_classes
        valid = _valid_gt(gt, c, self.ignore_index)
        self.num_images += 1
        self.num_segments += int(np.unique(pred).size)
        p, t = pred[valid].astype(np.int64), gt[valid].astype(np.int64)
        if self.matching == "dataset":
            self._add_hist(p, t)
            return None
        clusters, inv = np.unique(p, return_inverse=True)
        hist = np.bincount(inv * c + t, minlength=clusters.size * c).reshape(clusters.size, c)
        rows, cols = match_clusters(hist, self.tie_break)
        self._accumulate(hist, rows, cols)
        # relabel through the unique ids, so arbitrary large segment ids cost nothing
        all_ids, all_inv = np.unique(pred, return_inverse=True)
        lab = np.full(all_ids.size, self.ignore_index, dtype=np.int64)
        lab[np.searchsorted(all_ids, clusters[rows])] = cols
        return lab[all_inv].reshape(pred.shape)

    def _add_hist(self, p: np.ndarray, t: np.ndarray) -> None:
        """Add to the dataset histogram, growing it to the largest segment id seen."""
        if not p.size:
            return
        k = int(p.max()) + 1
        if k > MAX_DATASET_CLUSTERS:
            raise ValueError(
                f"dataset matching needs cluster ids that mean the same in every image, in "
                f"[0, {MAX_DATASET_CLUSTERS}); got id {k - 1}. Use matching='per_image' for "
                "per-image segments"
            )
        if k > self.hist.shape[0]:
            self.hist = np.vstack([self.hist, np.zeros((k - self.hist.shape[0], self.num_classes), np.int64)])
        k = self.hist.shape[0]
        self.hist += np.bincount(p * self.num_classes + t, minlength=k * self.num_classes).reshape(k, -1)

    def _accumulate(self, hist: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
        """Add TP/FP/FN of one matched histogram (rows = clusters, columns = classes)."""
        tp = hist[rows, cols]
        self.tp[cols] += tp
        self.fp[cols] += hist[rows].sum(axis=1) - tp
        self.fn += hist.sum(axis=0)
        self.fn[cols] -= tp

    def _settings(self) -> tuple[int, str, int, str]:
        return (self.num_classes, self.matching, self.ignore_index, self.tie_break)

    def merge(self, other: HungarianScorer) -> HungarianScorer:
        """A new scorer holding both shards (dataset mode: histograms are padded and summed)."""
        if self._settings() != other._settings():
            raise ValueError(
                f"cannot merge Hungarian scorers with different settings: {self._settings()} vs "
                f"{other._settings()}"
            )
        out = HungarianScorer(self.num_classes, self.matching, self.ignore_index, self.tie_break)
        out.num_images = self.num_images + other.num_images
        out.num_segments = self.num_segments + other.num_segments
        out.tp, out.fp, out.fn = self.tp + other.tp, self.fp + other.fp, self.fn + other.fn
        k = max(self.hist.shape[0], other.hist.shape[0])
        out.hist = np.zeros((k, self.num_classes), dtype=np.int64)
        out.hist[: self.hist.shape[0]] += self.hist
        out.hist[: other.hist.shape[0]] += other.hist
        return out

    __add__ = merge

    # -- results
    def _totals(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.matching == "per_image":
            return self.tp, self.fp, self.fn
        out = HungarianScorer(self.num_classes, "per_image", self.ignore_index)
        # clusters never seen at a scored pixel take no part, as in per-image matching
        seen = np.flatnonzero(self.hist.sum(axis=1) > 0)
        rows, cols = match_clusters(self.hist[seen], self.tie_break)
        rows = seen[rows]
        out._accumulate(self.hist, rows, cols)
        self.assignment = {int(r): int(c) for r, c in zip(rows, cols, strict=True)}
        return out.tp, out.fp, out.fn

    def relabel(self, pred_segments: Any) -> np.ndarray:
        """Map segment ids to classes with the dataset-level assignment (after :meth:`compute`)."""
        if self.matching != "dataset" or self.assignment is None:
            raise ValueError("relabel() needs matching='dataset' and a prior compute()")
        pred = to_numpy(pred_segments, "prediction")
        if pred.size and pred.min() < 0:
            raise ValueError(f"segment ids must be >= 0, got {int(pred.min())}")
        size = max(int(pred.max()) + 1 if pred.size else 1, self.hist.shape[0])
        mapping = np.full(size, self.ignore_index, dtype=np.int64)
        for r, c in self.assignment.items():
            mapping[r] = c
        return mapping[pred]

    def compute(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Metrics (percent), per-class IoU/Acc, raw counts and the protocol used."""
        names = _names(class_names, self.num_classes)
        tp, fp, fn = self._totals()
        valid = int(tp.sum() + fn.sum())  # every valid pixel is either TP or FN of its class
        iou = _pct(tp, tp + fp + fn)
        acc = _pct(tp, tp + fn)
        protocol: dict[str, Any] = {
            "unsupervised": True,
            "matching": self.matching,
            "matching_description": _MATCHING_TEXT[self.matching],
            "tie_break": self.tie_break,
            "unmatched_segments": "false negatives, never false positives",
            "mean_segments_per_image": json_float(self.num_segments / self.num_images)
            if self.num_images
            else None,
        }
        if self.assignment is not None:
            protocol["assignment"] = {str(r): names[c] for r, c in sorted(self.assignment.items())}
        return {
            "metrics": {
                "mIoU": json_float(nanmean(iou)),
                "aAcc": json_float(_pct(tp.sum(), valid)),
                "mAcc": json_float(nanmean(acc)),
            },
            "per_class": _per_class(names, iou, acc),
            "counts": {"TP": tp.tolist(), "FP": fp.tolist(), "FN": fn.tolist(), "valid": valid},
            "protocol": protocol,
        }
