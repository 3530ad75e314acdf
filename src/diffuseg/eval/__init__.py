"""Evaluation: mmsegmentation-style metrics, Hungarian scoring for unsupervised output, runners.

The same scorers serve every method, so numbers are comparable across the table in
docs/results.md. See :mod:`diffuseg.eval.metrics` for the exact semantics.
"""

from __future__ import annotations

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
from diffuseg.eval.runner import (
    SegmentationEvaluator,
    evaluate_method,
    evaluate_predictions,
    format_report,
    load_meta,
    load_split_samples,
)

__all__ = [
    "ConfusionMatrix",
    "ForegroundIoU",
    "HungarianScorer",
    "SegmentationEvaluator",
    "coarse_confusion",
    "coarse_lut",
    "evaluate_method",
    "evaluate_predictions",
    "foreground_iou",
    "format_report",
    "harmonic_iou",
    "load_meta",
    "load_split_samples",
    "match_clusters",
]
