"""DiffSeg post-processing: self-attention maps -> unsupervised segment label maps.

DiffSeg (Tian et al., CVPR 2024; google/diffseg) groups pixels whose self-attention maps are
close in symmetric KL divergence. This module holds the post-processing as pure functions of
the attention maps, in two implementations of the same algorithm:

``fidelity="original"``
    Reproduces the TensorFlow original step by step so that its label maps match it bit for
    bit: heads averaged with numpy, keys upsampled bilinearly in float32 with TF's half-pixel
    formula (``a + (b - a) * t``, the same sampling points as torch's ``align_corners=False``),
    per-map renormalisation, nearest tiling of queries, weights proportional to side length,
    accumulation in float64; iteration 0 compares anchors with every query in **float16**
    (elementwise float16 rounding of log, difference and products; the sums over the R^2 keys
    are accumulated in float32 and rounded to float16 -- TF's own reduction order cannot be
    reproduced, and the golden label maps do not depend on it); later iterations merge
    greedily in float64 in proposal order; proposals are upsampled bilinearly (float32) and the
    first maximum wins. No epsilon: a zero in a map gives a NaN KL, which never merges (NaN
    proposals of anchors that matched nothing are dropped before the output stage). It costs
    seconds per image (the float16 pass touches ``P^2 * R^2 * R^2`` values) and is the reference.

``fidelity="fast"`` (default)
    Vectorised torch in float32, batched over images, on the device of the input. The
    aggregated tensor is never materialised: rows are assembled per chunk of ``chunk_size``
    queries from the highest-resolution maps plus pre-upsampled lower-resolution rows (bilinear
    upsampling of keys is linear and queries are tiled, so a row is a gather and a sum). The
    anchor-vs-query KL uses ``KL_sym(x, y) = 1/2 (sum x log x + sum y log y - x.log y - y.log x)``:
    two matrix products per chunk; the log is taken of ``max(value, FAST_LOG_EPS)`` so zeros give
    a large finite KL (no merge) instead of NaN. An anchor always matches itself, as in the
    original. Memory above the input maps: the per-image rows, ``4 B R^4 (1 + sum_{s<R} (s/R)^2)``
    bytes, plus three chunk buffers of ``4 B * chunk_size * R^2`` bytes per image (R=64, 8 heads,
    chunk 1024: peak 0.93 GB of process RSS, of which 0.77 GB are the input maps and Python/torch).

Thresholds: ``kl_threshold`` is a list, one value per merging iteration. With
``threshold_mode="absolute"`` they are KL values (the original's 1.1 for SD on COCO). KL values
depend on the number of keys and the sharpness of the maps, so they do not transfer across
backbones; with ``threshold_mode="relative"`` each value is a quantile in (0, 1) of the image's
own distribution of pairwise KLs among the iteration-0 anchors (0.1: merge when the KL is below
the 10th percentile of anchor-anchor KLs) and is converted to an absolute threshold per image
before the unchanged algorithm runs (in both fidelity modes).

Layout: ``maps`` is ``{side: array (B, heads, side*side, side*side)}``, softmax over the last
(key) axis, queries and keys flattened row-major. Aggregated tensors and proposals use the same
flattened layout ``(..., R*R)`` where ``R`` is the highest resolution.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor
Fidelity = Literal["fast", "original"]
ThresholdMode = Literal["absolute", "relative"]

FAST_LOG_EPS = 1e-12
"""Values are clamped to this before the log in fast mode (documented deviation from the original)."""
DEFAULT_CHUNK_SIZE = 1024
"""Queries per chunk in fast mode: bounds the working memory to ~6 * 4 bytes * chunk_size * R^2."""
DISTRIBUTION_TOLERANCE = 1e-2
"""Allowed |row sum - 1| of the head-averaged maps (loose enough for float16 captures)."""

_F16_KL_ELEMENTS = 1 << 19  # per float16 KL block: small enough to stay in cache
_RESIZE_ELEMENTS = 1 << 22  # per block of the float32 TF-style resize in original mode
_LABEL_ELEMENTS = 1 << 24  # per band of upsampled proposals before the argmax


@dataclass(frozen=True)
class _MapSpec:
    """Validated geometry of an attention-map dict."""

    resolutions: tuple[int, ...]  # descending; the first is R
    batch: int
    device: torch.device

    @property
    def top(self) -> int:
        return self.resolutions[0]


@dataclass
class DiffSegInfo:
    """What happened for one image: thresholds used, proposals per iteration, final proposals.

    Attributes:
        thresholds: absolute KL threshold of each iteration (converted from quantiles in
            relative mode).
        proposal_counts: number of proposals after each iteration (before refinement).
        proposals: ``(M, R*R)`` float32 final proposal maps; label ``m`` is the argmax of
            proposal ``m`` upsampled.
    """

    thresholds: list[float]
    proposal_counts: list[int]
    proposals: np.ndarray


# ----------------------------------------------------------------------------- validation


def _side(n: int) -> int:
    side = math.isqrt(n)
    return side if side * side == n else -1


def _validate_maps(maps: Mapping[int, ArrayLike]) -> _MapSpec:
    """Check shapes before any heavy work, so a wrong capture fails with a useful message."""
    if not isinstance(maps, Mapping) or not maps:
        raise ValueError("maps must be a non-empty dict {resolution: array (B, heads, s*s, s*s)}")
    batch, device = None, None
    for res, value in maps.items():
        if not isinstance(value, (np.ndarray, torch.Tensor)):
            raise ValueError(f"maps[{res}] must be a numpy array or torch tensor, got {type(value).__name__}")
        if value.ndim != 4:
            raise ValueError(
                f"maps[{res}] has shape {tuple(value.shape)}; expected (B, heads, s*s, s*s) -- "
                "add a heads axis (x[:, None]) if heads are already averaged"
            )
        n_q, n_k = int(value.shape[-2]), int(value.shape[-1])
        if n_q != n_k or _side(n_k) < 0:
            raise ValueError(
                f"maps[{res}] is {n_q} queries x {n_k} keys; self-attention of a square map needs "
                "equal query and key counts that are a perfect square"
            )
        if _side(n_k) != res:
            raise ValueError(
                f"maps[{res}] has {n_k} keys, i.e. a {_side(n_k)}x{_side(n_k)} map: the dict key must be "
                "the side length"
            )
        if batch is None:
            batch = int(value.shape[0])
        elif int(value.shape[0]) != batch:
            raise ValueError(
                f"all maps need the same batch size; maps[{res}] has {value.shape[0]}, not {batch}"
            )
        if device is None and isinstance(value, torch.Tensor):
            device = value.device
    if batch == 0 or any(int(v.shape[1]) == 0 for v in maps.values()):
        raise ValueError("maps have an empty batch or heads axis")
    resolutions = tuple(sorted((int(r) for r in maps), reverse=True))
    return _MapSpec(resolutions, int(batch), device or torch.device("cpu"))


def _check_distribution(row_sums: ArrayLike, minimum: float, res: int) -> None:
    """Raise unless every head-averaged map is a distribution (non-negative, sums to 1)."""
    sums = row_sums.detach().cpu().double().numpy() if isinstance(row_sums, torch.Tensor) else row_sums
    if not np.all(np.isfinite(sums)):
        raise ValueError(f"maps[{res}] contains NaN or inf")
    worst = float(np.max(np.abs(sums - 1.0)))
    if minimum < 0 or worst > DISTRIBUTION_TOLERANCE:
        raise ValueError(
            f"maps[{res}] are not distributions over keys (min {minimum:.3g}, max |row sum - 1| "
            f"{worst:.3g}); pass softmax(QK^T/sqrt(d)) over the last axis, not logits"
        )


def _check_thresholds(kl_threshold: Sequence[float], mode: str) -> list[float]:
    if mode not in ("absolute", "relative"):
        raise ValueError(f"threshold_mode must be 'absolute' or 'relative', got {mode!r}")
    if isinstance(kl_threshold, (int, float)) or not isinstance(kl_threshold, Sequence):
        raise ValueError("kl_threshold must be a list, one value per iteration, e.g. [1.1] * 3")
    values = [float(t) for t in kl_threshold]
    if not values:
        raise ValueError("kl_threshold needs at least one value (one per merging iteration)")
    if mode == "absolute" and not all(math.isfinite(t) and t > 0 for t in values):
        raise ValueError(f"absolute KL thresholds must be finite and > 0, got {values}")
    if mode == "relative" and not all(0.0 < t < 1.0 for t in values):
        raise ValueError(f"relative thresholds are quantiles and must lie in (0, 1), got {values}")
    return values


def _check_fidelity(fidelity: str) -> None:
    if fidelity not in ("fast", "original"):
        raise ValueError(f"fidelity must be 'fast' or 'original', got {fidelity!r}")


def _check_output_size(output_size: int | None, top: int) -> int:
    if output_size is None:
        return top
    if isinstance(output_size, bool) or not isinstance(output_size, (int, np.integer)) or output_size < 1:
        raise ValueError(f"output_size must be a positive int or None (= {top}), got {output_size!r}")
    return int(output_size)


# ----------------------------------------------------------------------------- shared geometry


def resolution_weights(resolutions: Sequence[int]) -> np.ndarray:
    """Aggregation weight of each resolution, proportional to its side length (as the original)."""
    sides = np.asarray(resolutions, dtype=np.float64)
    return sides / sides.sum()


def anchor_grid(resolution: int, num_points: int) -> np.ndarray:
    """``(num_points**2, 2)`` (row, col) anchors: the original's 16-point grid generalised to any R.

    seg = (R-1)//(P-1) and start = ((R-1) - seg*(P-1))//2, so R=64, P=16 gives 1, 5, ..., 61;
    anchors are ordered row-major, which fixes the greedy merge order of later iterations.
    """
    if isinstance(num_points, bool) or not isinstance(num_points, (int, np.integer)):
        raise ValueError(f"num_points must be an int, got {num_points!r}")
    if not 1 <= num_points <= resolution:
        raise ValueError(
            f"num_points must be in [1, {resolution}] (the highest resolution), got {num_points}"
        )
    if num_points == 1:
        coords = np.array([(resolution - 1) // 2])
    else:
        seg = (resolution - 1) // (num_points - 1)
        start = ((resolution - 1) - seg * (num_points - 1)) // 2
        coords = start + seg * np.arange(num_points)
    rows, cols = np.meshgrid(coords, coords, indexing="ij")
    return np.stack([rows.reshape(-1), cols.reshape(-1)], axis=1).astype(np.int64)


def _anchor_indices(resolution: int, num_points: int) -> np.ndarray:
    grid = anchor_grid(resolution, num_points)
    return grid[:, 0] * resolution + grid[:, 1]


def _parent_index(top: int, side: int) -> np.ndarray:
    """Nearest-neighbour query tiling: the low-resolution query each top-resolution query copies."""
    coarse = (np.arange(top) * side) // top
    return (coarse[:, None] * side + coarse[None, :]).reshape(-1)


def _relative_thresholds(anchor_kl: np.ndarray, quantiles: Sequence[float]) -> list[float]:
    """Quantiles of the off-diagonal anchor-anchor KLs -> absolute thresholds for one image."""
    n = anchor_kl.shape[0]
    if n < 2:
        raise ValueError("relative thresholds need at least 2 anchors: use num_points >= 2")
    values = anchor_kl[np.triu_indices(n, 1)].astype(np.float64)
    if not np.any(np.isfinite(values)):
        raise ValueError("no finite anchor-anchor KL to take quantiles of (maps contain zeros)")
    return [float(np.nanquantile(values, q)) for q in quantiles]


# ----------------------------------------------------------------------------- public pieces


def symmetric_kl(x: ArrayLike, y: ArrayLike, *, eps: float | None = None) -> ArrayLike:
    """Symmetric KL ``(KL(x||y) + KL(y||x)) / 2`` over the last axis, broadcasting the rest.

    Computed like the original, ``sum(x q)/2 - sum(y q)/2`` with ``q = log x - log y``. With
    ``eps=None`` nothing is clamped: a zero gives NaN or inf, and a NaN KL never passes a
    threshold test (the original's behaviour). Works on numpy arrays and torch tensors.
    """
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        xt, yt = torch.as_tensor(x), torch.as_tensor(y)
        if eps is not None:
            xt, yt = xt.clamp_min(eps), yt.clamp_min(eps)
        q = torch.log(xt) - torch.log(yt)
        return (xt * q).sum(-1) / 2 - (yt * q).sum(-1) / 2
    xa, ya = np.asarray(x), np.asarray(y)
    if eps is not None:
        xa, ya = np.maximum(xa, eps), np.maximum(ya, eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.log(xa) - np.log(ya)
        return (xa * q).sum(-1) / 2 - (ya * q).sum(-1) / 2


def pairwise_symmetric_kl(x: torch.Tensor, y: torch.Tensor, *, eps: float = FAST_LOG_EPS) -> torch.Tensor:
    """All-pairs symmetric KL ``(..., n, m)`` between rows of ``x (..., n, K)`` and ``y (..., m, K)``.

    Two matrix products instead of an ``n x m x K`` tensor: KL_sym = (Hx + Hy - x.log y - y.log x)/2
    with H = sum v log v. Logs of ``max(v, eps)``.
    """
    lx, ly = x.clamp_min(eps).log(), y.clamp_min(eps).log()
    hx, hy = (x * lx).sum(-1), (y * ly).sum(-1)
    cross = x @ ly.transpose(-1, -2) + lx @ y.transpose(-1, -2)
    return 0.5 * (hx[..., :, None] + hy[..., None, :] - cross)


def aggregate_attention(maps: Mapping[int, ArrayLike], *, fidelity: Fidelity = "fast") -> ArrayLike:
    """The aggregated tensor ``(B, R*R, R*R)``: row = query (row-major), column = key.

    ``fidelity="original"`` returns float64 numpy exactly as the original builds it;
    ``"fast"`` returns float32 torch on the maps' device (``4 B R^4`` bytes per image).
    Each row is a distribution over the R*R keys.
    """
    _check_fidelity(fidelity)
    spec = _validate_maps(maps)
    if fidelity == "original":
        return np.stack([_aggregate_original(maps, spec, b) for b in range(spec.batch)])
    with torch.no_grad():
        rows = _FastRows.build(maps, spec)
        return rows.rows(torch.arange(spec.top**2, device=spec.device))


def merge_proposals(proposals: ArrayLike, kl_threshold: float, *, fidelity: Fidelity = "fast") -> ArrayLike:
    """One greedy merging iteration (the original's iterations >= 1) on ``(N, K)`` proposals.

    In proposal order, each not-yet-matched proposal takes the mean of **all** proposals within
    ``kl_threshold`` of it (already matched ones included) and marks them matched. Returns
    ``(M, K)``: float64 numpy (original) or float32 torch on the input's device (fast).
    """
    _check_fidelity(fidelity)
    if proposals.ndim != 2:
        raise ValueError(f"proposals must be (N, K), got shape {tuple(proposals.shape)}")
    if fidelity == "original":
        return _merge_original(_to_numpy(proposals, np.float64), float(kl_threshold))
    with torch.no_grad():
        return _merge_fast(torch.as_tensor(proposals).float(), float(kl_threshold))


def proposals_to_labels(
    proposals: ArrayLike, output_size: int | None = None, *, fidelity: Fidelity = "fast"
) -> np.ndarray:
    """``(H, W)`` int64 labels: proposals ``(M, R*R)`` or ``(M, R, R)`` upsampled bilinearly
    (half-pixel, no antialias) to ``output_size`` (None = R), then per-pixel argmax, first max wins.
    """
    _check_fidelity(fidelity)
    if proposals.ndim not in (2, 3) or proposals.shape[0] == 0:
        raise ValueError(f"proposals must be a non-empty (M, R*R) or (M, R, R), got {tuple(proposals.shape)}")
    side = int(proposals.shape[-1]) if proposals.ndim == 3 else _side(int(proposals.shape[-1]))
    if side < 0 or (proposals.ndim == 3 and proposals.shape[1] != proposals.shape[2]):
        raise ValueError(f"proposals must be square maps, got shape {tuple(proposals.shape)}")
    out = _check_output_size(output_size, side)
    if fidelity == "original":
        return _labels_original(_to_numpy(proposals, np.float64).reshape(-1, side * side), side, out)
    with torch.no_grad():
        flat = torch.as_tensor(proposals).float().reshape(-1, side * side)
        return _labels_fast(flat, side, out)


def kmeans_attention(
    aggregated: ArrayLike,
    num_clusters: int | Sequence[int],
    seed: int = 0,
    *,
    output_size: int | None = None,
) -> np.ndarray:
    """K-means baselines (K-means-C / K-means-S) on the same aggregated attention.

    Clusters the R*R query maps of each image ``(B, R*R, R*R)`` with k-means++ (scikit-learn),
    averages each cluster's maps and sends those means through the same output stage as DiffSeg
    (bilinear upsampling + argmax), so that only the grouping step differs from DiffSeg.
    ``num_clusters`` is one k for all images (K-means-C) or one per image (K-means-S).
    Returns ``(B, H, W)`` int64.
    """
    from sklearn.cluster import KMeans

    if aggregated.ndim != 3 or aggregated.shape[1] != aggregated.shape[2] or _side(aggregated.shape[2]) < 0:
        raise ValueError(f"aggregated must be (B, R*R, R*R), got shape {tuple(aggregated.shape)}")
    batch, side = int(aggregated.shape[0]), _side(int(aggregated.shape[2]))
    ks = [int(num_clusters)] * batch if isinstance(num_clusters, (int, np.integer)) else list(num_clusters)
    if len(ks) != batch or not all(1 <= k <= side * side for k in ks):
        raise ValueError(f"num_clusters must be an int or one int per image, each in [1, {side * side}]")
    out = _check_output_size(output_size, side)
    labels = []
    for b, k in enumerate(ks):
        data = _to_numpy(aggregated[b], np.float32)
        assign = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(data).labels_
        means = np.stack([data[assign == c].mean(0) for c in np.unique(assign)])
        labels.append(_labels_fast(torch.from_numpy(means), side, out))
    return np.stack(labels)


def segment_attention(
    maps: Mapping[int, ArrayLike],
    kl_threshold: Sequence[float] = (1.1, 1.1, 1.1),
    num_points: int = 16,
    refine: bool = False,
    fidelity: Fidelity = "fast",
    output_size: int | None = None,
    *,
    threshold_mode: ThresholdMode = "absolute",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_info: bool = False,
) -> np.ndarray | tuple[np.ndarray, list[DiffSegInfo]]:
    """Segment images from their self-attention maps (DiffSeg post-processing).

    Args:
        maps: ``{side: (B, heads, side*side, side*side)}`` softmax over keys, numpy or torch;
            the largest side R defines the working resolution.
        kl_threshold: one threshold per merging iteration (absolute KL, or quantiles in
            relative mode; see the module docstring).
        num_points: anchors per axis of the iteration-0 grid (<= R).
        refine: K-means refinement of the final proposals over all query maps, initialised at
            the proposals, as the original demo (scikit-learn in original mode; in fast mode a
            torch Lloyd with scikit-learn's stopping rules on the image's full aggregated tensor,
            ``4 B R^4`` extra); clusters that end up empty are dropped (the original indexed
            clusters by count, which breaks on an empty one).
        fidelity: "fast" (default) or "original" (bit-exact reference, seconds per image).
        output_size: side of the label map (None = R).
        threshold_mode: "absolute" or "relative".
        chunk_size: queries per chunk in fast mode (memory ~ 6 * 4 B * chunk_size * R^2).
        return_info: also return one :class:`DiffSegInfo` per image.

    Returns:
        ``(B, H, W)`` int64 numpy segment ids (0..M-1 by proposal order, some ids may be unused),
        and the infos when ``return_info``.
    """
    _check_fidelity(fidelity)
    thresholds = _check_thresholds(kl_threshold, threshold_mode)
    spec = _validate_maps(maps)
    anchors = _anchor_indices(spec.top, num_points)
    out = _check_output_size(output_size, spec.top)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    relative = threshold_mode == "relative"
    if fidelity == "original":
        results = [
            _segment_original(maps, spec, b, anchors, thresholds, relative, refine, out)
            for b in range(spec.batch)
        ]
    else:
        with torch.no_grad():
            results = _segment_fast(maps, spec, anchors, thresholds, relative, refine, out, int(chunk_size))
    labels = np.stack([r[0] for r in results])
    return (labels, [r[1] for r in results]) if return_info else labels


# ----------------------------------------------------------------------------- original mode


def _to_numpy(x: ArrayLike, dtype: type | None = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        x = x.numpy()
    return np.asarray(x) if dtype is None else np.asarray(x, dtype=dtype)


def _tf_bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TF ``resize_bilinear(half_pixel_centers=True)`` taps: float32 source coordinates."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(src)
    lower = np.maximum(floor.astype(np.int64), 0)
    upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
    return lower, upper, (src - floor).astype(np.float32)


def _tf_resize(images: np.ndarray, out_h: int, out_w: int, rows: slice | None = None) -> np.ndarray:
    """Float32 bilinear resize of ``(N, h, w)`` with TF's arithmetic (optionally a band of rows)."""
    y_lo, y_hi, y_t = _tf_bilinear_taps(images.shape[1], out_h)
    x_lo, x_hi, x_t = _tf_bilinear_taps(images.shape[2], out_w)
    if rows is not None:
        y_lo, y_hi, y_t = y_lo[rows], y_hi[rows], y_t[rows]
    top, bottom = images[:, y_lo], images[:, y_hi]
    top = top[..., x_lo] + (top[..., x_hi] - top[..., x_lo]) * x_t
    bottom = bottom[..., x_lo] + (bottom[..., x_hi] - bottom[..., x_lo]) * x_t
    return top + (bottom - top) * y_t[:, None]


def _aggregate_original(maps: Mapping[int, ArrayLike], spec: _MapSpec, b: int) -> np.ndarray:
    """One image's ``(R^2, R^2)`` float64 aggregate, operation for operation as the original."""
    top = spec.top
    total = np.zeros((top * top, top * top), dtype=np.float64)
    for res, weight in zip(spec.resolutions, resolution_weights(spec.resolutions), strict=True):
        mean = _to_numpy(maps[res][b]).mean(0)  # numpy head average in the input's dtype
        _check_distribution(mean.sum(-1), float(mean.min()), res)
        mean = mean.astype(np.float32).reshape(-1, res, res)  # Keras casts layer inputs to float32
        step = max(1, _RESIZE_ELEMENTS // (top * top))
        up = np.empty((res * res, top * top), dtype=np.float32)
        for q0 in range(0, res * res, step):
            block = _tf_resize(mean[q0 : q0 + step], top, top).reshape(-1, top * top)
            up[q0 : q0 + step] = block / block.sum(-1, keepdims=True, dtype=np.float32)
        up *= np.float32(weight)
        parent = _parent_index(top, res)
        for q0 in range(0, top * top, step):
            total[q0 : q0 + step] += up[parent[q0 : q0 + step]]
    return total


def _kl_float16(aggregated: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Anchor-vs-query symmetric KL in float16 as the original computes it: ``(P^2, N)`` float32.

    Elementwise float16 log, difference and products (torch rounds each to float16 like Eigen);
    sums accumulate in float32. Blocks stay small so the working set fits in cache.
    """
    a16 = torch.from_numpy(aggregated.astype(np.float32)).half()  # f64 -> f32 -> f16, as Eigen's cast
    l16 = torch.log(a16)
    n, k = a16.shape
    step = max(1, _F16_KL_ELEMENTS // k)
    out = torch.empty((len(anchors), n), dtype=torch.float16)
    for i, anchor in enumerate(anchors.tolist()):
        x, lx = a16[anchor], l16[anchor]
        for q0 in range(0, n, step):
            quotient = lx - l16[q0 : q0 + step]
            kl_1 = (x * quotient).sum(-1) / 2
            kl_2 = -(a16[q0 : q0 + step] * quotient).sum(-1) / 2
            out[i, q0 : q0 + step] = kl_1 + kl_2
    return out.float().numpy()


def _iteration0_original(aggregated: np.ndarray, kl16: np.ndarray, threshold: float) -> np.ndarray:
    """Mean of the queries within the threshold of each anchor; 0/0 -> NaN as the original.

    TF converts the Python threshold to the float16 dtype of the KL before comparing.
    """
    hits = (kl16 < float(np.float16(threshold))).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (hits @ aggregated) / hits.sum(1, keepdims=True)


def _merge_original(proposals: np.ndarray, threshold: float) -> np.ndarray:
    """The original's greedy pass in float64 (see :func:`merge_proposals`)."""
    matched = np.zeros(len(proposals), dtype=bool)
    merged = []
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(proposals)
        for i in range(len(proposals)):
            if matched[i]:
                continue
            matched[i] = True
            quotient = logs[i] - logs
            kl = (proposals[i] * quotient).sum(-1) / 2 + (-(proposals * quotient).sum(-1) / 2)
            hits = kl < threshold
            if hits.sum() > 0:
                matched |= hits
                merged.append(proposals[hits].mean(0))
    return np.stack(merged) if merged else np.empty((0, proposals.shape[1]))


def _refine_original(aggregated: np.ndarray, proposals: np.ndarray) -> np.ndarray:
    """K-means over all query maps initialised at the proposals (scikit-learn, as the demo)."""
    from sklearn.cluster import KMeans

    assign = (
        KMeans(n_clusters=len(proposals), init=proposals, n_init=1, random_state=0).fit(aggregated).labels_
    )
    return np.stack([aggregated[assign == c].mean(0) for c in np.unique(assign)])


def _labels_original(proposals: np.ndarray, side: int, out: int) -> np.ndarray:
    """Float32 TF-style bilinear upsampling and argmax, in bands of output rows."""
    maps = proposals.astype(np.float32).reshape(-1, side, side)
    band = max(1, _LABEL_ELEMENTS // (len(maps) * out))
    labels = np.empty((out, out), dtype=np.int64)
    for r0 in range(0, out, band):
        labels[r0 : r0 + band] = _tf_resize(maps, out, out, slice(r0, r0 + band)).argmax(0)
    return labels


def _drop_invalid(proposals: np.ndarray) -> np.ndarray:
    """Drop NaN proposals (anchors that matched nothing) and fail clearly if none is left."""
    kept = proposals[np.all(np.isfinite(proposals), axis=1)]
    if len(kept) == 0:
        raise ValueError(
            "no proposal survived: every anchor map has zeros after the float16 cast, so every KL is "
            "NaN (the original's behaviour); use fidelity='fast', which clamps before the log"
        )
    return kept


def _anchor_kl_float64(anchor_maps: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(anchor_maps)
        ent = (anchor_maps * logs).sum(-1)
        cross = anchor_maps @ logs.T
    return 0.5 * (ent[:, None] + ent[None, :] - cross - cross.T)


def _segment_original(
    maps: Mapping[int, ArrayLike],
    spec: _MapSpec,
    b: int,
    anchors: np.ndarray,
    thresholds: list[float],
    relative: bool,
    refine: bool,
    out: int,
) -> tuple[np.ndarray, DiffSegInfo]:
    aggregated = _aggregate_original(maps, spec, b)
    if relative:
        thresholds = _relative_thresholds(_anchor_kl_float64(aggregated[anchors]), thresholds)
    proposals = _iteration0_original(aggregated, _kl_float16(aggregated, anchors), thresholds[0])
    counts = [len(proposals)]
    for threshold in thresholds[1:]:
        proposals = _merge_original(proposals, threshold)
        counts.append(len(proposals))
    proposals = _drop_invalid(proposals)
    if refine:
        proposals = _refine_original(aggregated, proposals)
    logger.debug("diffseg original: image %d thresholds %s proposals %s", b, thresholds, counts)
    info = DiffSegInfo(list(thresholds), counts, proposals.astype(np.float32))
    return _labels_original(proposals, spec.top, out), info


# ----------------------------------------------------------------------------- fast mode


@dataclass
class _FastRows:
    """Rows of the aggregated tensor on demand, without materialising ``(R^2, R^2)`` per image.

    ``base`` holds the weighted, renormalised top-resolution maps; each lower resolution holds
    its key-upsampled, renormalised, weighted rows (one per low-resolution query) and the
    nearest-neighbour parent of every top-resolution query.
    """

    base: torch.Tensor  # (B, R^2, R^2)
    lower: list[tuple[torch.Tensor, torch.Tensor]]  # [(B, s^2, R^2), (R^2,) parent index]
    top: int

    @classmethod
    def build(cls, maps: Mapping[int, ArrayLike], spec: _MapSpec) -> _FastRows:
        top, keys = spec.top, spec.top**2
        base, lower = None, []
        for res, weight in zip(spec.resolutions, resolution_weights(spec.resolutions), strict=True):
            mean = _head_mean(maps[res], spec.device)
            sums = mean.sum(-1, keepdim=True)
            _check_distribution(sums, float(mean.amin()), res)
            if res == top:
                base = mean.mul_(float(weight) / sums)
                continue
            flat = mean.reshape(-1, 1, res, res)
            up = F.interpolate(flat, size=(top, top), mode="bilinear", align_corners=False, antialias=False)
            up = up.reshape(spec.batch, res * res, keys)
            up.mul_(float(weight) / up.sum(-1, keepdim=True))
            parent = torch.from_numpy(_parent_index(top, res)).to(spec.device)
            lower.append((up, parent))
        return cls(base, lower, top)

    def rows(self, queries: torch.Tensor, image: int | None = None) -> torch.Tensor:
        """``(B, len(queries), R^2)`` aggregated rows (or ``(len, R^2)`` for one image)."""
        pick = slice(None) if image is None else image
        out = self.base[pick].index_select(-2, queries)
        for up, parent in self.lower:
            out += up[pick].index_select(-2, parent[queries])
        return out

    def fill(self, start: int, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        """Write the rows of queries ``start:start+len`` into preallocated ``out`` ``(B, len, R^2)``.

        Reusing buffers matters on CPU: fresh multi-MB tensors per chunk cost page faults that
        rival the arithmetic.
        """
        stop = start + out.shape[1]
        out.copy_(self.base[:, start:stop])
        for up, parent in self.lower:
            index = parent[start:stop]
            for b in range(out.shape[0]):
                torch.index_select(up[b], 0, index, out=scratch[b])
            out += scratch
        return out


def _head_mean(x: ArrayLike, device: torch.device) -> torch.Tensor:
    """Float32 head average; half-precision inputs are accumulated head by head in float32."""
    t = torch.as_tensor(x).to(device)
    if t.dtype in (torch.float32, torch.float64):
        return t.mean(1).to(torch.float32)
    acc = t[:, 0].to(torch.float32, copy=True)
    for h in range(1, t.shape[1]):
        acc += t[:, h]
    return acc.div_(t.shape[1])


def _iteration0_fast(
    rows: _FastRows, anchors: torch.Tensor, anchor_maps: torch.Tensor, thresholds: torch.Tensor, chunk: int
) -> torch.Tensor:
    """``(B, P^2, R^2)`` iteration-0 proposals: KL by two matrix products per query chunk."""
    anchor_logs = anchor_maps.clamp_min(FAST_LOG_EPS).log_()
    anchor_ent = (anchor_maps * anchor_logs).sum(-1)
    batch, n_anchor, keys = anchor_maps.shape
    sums = torch.zeros_like(anchor_maps)
    counts = torch.zeros((batch, n_anchor), dtype=anchor_maps.dtype, device=anchor_maps.device)
    own = torch.arange(n_anchor, device=anchors.device)
    chunk = min(chunk, keys)
    buffers = [
        torch.empty((batch, chunk, keys), dtype=anchor_maps.dtype, device=anchor_maps.device)
        for _ in range(3)
    ]
    for q0 in range(0, keys, chunk):
        n = min(chunk, keys - q0)
        q, log_q, scratch = (buf[:, :n] for buf in buffers)
        rows.fill(q0, q, scratch)
        torch.clamp_min(q, FAST_LOG_EPS, out=log_q).log_()
        query_ent = torch.mul(q, log_q, out=scratch).sum(-1)
        kl = torch.baddbmm(anchor_ent[:, :, None] + query_ent[:, None, :], anchor_maps, log_q.mT, alpha=-1)
        kl = kl.baddbmm_(anchor_logs, q.mT, alpha=-1).mul_(0.5)
        hits = kl < thresholds[:, None, None]
        inside = (anchors >= q0) & (anchors < q0 + n)
        hits[:, own[inside], anchors[inside] - q0] = True  # KL(x, x) = 0 always matches, as in the original
        hits = hits.to(q.dtype)
        sums.baddbmm_(hits, q)
        counts += hits.sum(-1)
    return sums.div_(counts[..., None])


def _merge_fast(proposals: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy pass with all pairwise KLs from one matrix product; same order semantics as original."""
    hits = pairwise_symmetric_kl(proposals, proposals) < threshold
    hits.fill_diagonal_(True)
    hits_np = hits.cpu().numpy()
    matched = np.zeros(len(proposals), dtype=bool)
    groups = []
    for i in range(len(proposals)):
        if matched[i]:
            continue
        matched |= hits_np[i]
        groups.append(hits_np[i])
    weights = torch.from_numpy(np.stack(groups)).to(proposals)
    return (weights @ proposals) / weights.sum(1, keepdim=True)


def _refine_fast(
    data: torch.Tensor, centers: torch.Tensor, max_iter: int = 300, tol: float = 1e-4
) -> torch.Tensor:
    """Lloyd's K-means from the proposals (scikit-learn's stopping rules), then member means."""
    tol_abs = tol * float(data.var(0, unbiased=False).mean())
    sq_norm = (data * data).sum(1)
    assign = None
    for _ in range(max_iter):
        dist = (centers * centers).sum(1)[None, :] - 2 * data @ centers.T + sq_norm[:, None]
        new_assign = dist.argmin(1)
        onehot = F.one_hot(new_assign, len(centers)).to(data.dtype)
        count = onehot.sum(0)
        moved = (onehot.T @ data) / count.clamp_min(1)[:, None]
        new_centers = torch.where(count[:, None] > 0, moved, centers)  # empty cluster keeps its centre
        converged = assign is not None and bool((new_assign == assign).all())
        shift = float(((new_centers - centers) ** 2).sum())
        centers, assign = new_centers, new_assign
        if converged or shift <= tol_abs:
            break
    assign = ((centers * centers).sum(1)[None, :] - 2 * data @ centers.T).argmin(1)
    present = torch.unique(assign)
    onehot = F.one_hot(assign, len(centers)).to(data.dtype)[:, present]
    return (onehot.T @ data) / onehot.sum(0)[:, None]


def _bilinear_taps(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """torch ``align_corners=False`` bilinear taps (same sampling points as TF's half-pixel)."""
    src = (
        (torch.arange(out_size, device=device, dtype=torch.float32) + 0.5) * (in_size / out_size) - 0.5
    ).clamp_min(0)
    lower = src.floor().long().clamp_max(in_size - 1)
    upper = (lower + 1).clamp_max(in_size - 1)
    return lower, upper, src - lower


def _labels_fast(proposals: torch.Tensor, side: int, out: int) -> np.ndarray:
    """Bilinear upsampling + argmax in bands of output rows, so M x H x W is never held at once."""
    maps = proposals.reshape(-1, side, side)
    x_lo, x_hi, x_t = _bilinear_taps(side, out, maps.device)
    y_lo, y_hi, y_t = _bilinear_taps(side, out, maps.device)
    wide = maps[..., x_lo] * (1 - x_t) + maps[..., x_hi] * x_t  # (M, side, out)
    band = max(1, _LABEL_ELEMENTS // (len(maps) * out))
    labels = torch.empty((out, out), dtype=torch.int64, device=maps.device)
    for r0 in range(0, out, band):
        t = y_t[r0 : r0 + band, None]
        up = wide[:, y_lo[r0 : r0 + band]] * (1 - t) + wide[:, y_hi[r0 : r0 + band]] * t
        labels[r0 : r0 + band] = _first_argmax(up)
    return labels.cpu().numpy()


def _first_argmax(stack: torch.Tensor) -> torch.Tensor:
    """Argmax over the leading axis, first maximum wins, by a running maximum.

    Contiguous elementwise passes are several times faster on CPU than a strided argmax(0).
    """
    best = stack[0].clone()
    index = torch.zeros(stack.shape[1:], dtype=torch.int64, device=stack.device)
    for m in range(1, len(stack)):
        better = stack[m] > best
        best = torch.maximum(best, stack[m])
        index.masked_fill_(better, m)
    return index


def _segment_fast(
    maps: Mapping[int, ArrayLike],
    spec: _MapSpec,
    anchors: np.ndarray,
    thresholds: list[float],
    relative: bool,
    refine: bool,
    out: int,
    chunk: int,
) -> list[tuple[np.ndarray, DiffSegInfo]]:
    rows = _FastRows.build(maps, spec)
    anchor_idx = torch.from_numpy(anchors).to(spec.device)
    anchor_maps = rows.rows(anchor_idx)
    if relative:
        anchor_kl = pairwise_symmetric_kl(anchor_maps, anchor_maps).cpu().numpy()
        per_image = [_relative_thresholds(anchor_kl[b], thresholds) for b in range(spec.batch)]
    else:
        per_image = [list(thresholds) for _ in range(spec.batch)]
    first = torch.tensor([t[0] for t in per_image], dtype=torch.float32, device=spec.device)
    initial = _iteration0_fast(rows, anchor_idx, anchor_maps, first, chunk)
    results = []
    for b, image_thresholds in enumerate(per_image):
        proposals, counts = initial[b], [len(anchors)]
        for threshold in image_thresholds[1:]:
            proposals = _merge_fast(proposals, threshold)
            counts.append(len(proposals))
        if refine:
            everything = rows.rows(torch.arange(spec.top**2, device=spec.device), image=b)
            proposals = _refine_fast(everything, proposals)
            del everything
        logger.debug("diffseg fast: image %d thresholds %s proposals %s", b, image_thresholds, counts)
        info = DiffSegInfo(image_thresholds, counts, proposals.cpu().numpy().astype(np.float32))
        results.append((_labels_fast(proposals, spec.top, out), info))
    return results
