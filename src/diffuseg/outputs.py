"""The one result type every pipeline returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class SegmentationOutput:
    """Result of a segmentation pipeline call.

    Attributes:
        labels: ``(B, H, W)`` int64 label ids. For semantic methods these index
            ``class_names``; for unsupervised ones (DiffSeg without class names) they are
            segment ids with no meaning across images.
        scores: optional ``(B, C, H, W)`` float32 per-class scores (probabilities or
            similarities, method-specific), useful for calibration and plots.
        uncertainty: optional ``(B, H, W)`` float32 per-pixel uncertainty (higher = less sure).
        class_names: the names the ids of ``labels`` refer to, or ``None`` for segment ids.
        extras: method-specific diagnostics (e.g. DiffSeg proposals, per-image uncertainty).
    """

    labels: np.ndarray
    scores: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    class_names: list[str] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])
