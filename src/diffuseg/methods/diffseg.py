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
    Vectorised torch, batched over images, on the device of the input. The aggregated tensor is
    never materialised: rows are assembled per chunk of ``chunk_size`` queries from the head sums
    of the highest-resolution maps plus the lower resolutions, key-upsampled once (bilinear
    upsampling of keys is linear and queries are tiled, so a row is a scaled head sum plus one
    gathered row per distinct combination of nearest-tiling parents). The anchor-vs-query KL uses
    ``KL_sym(x, y) = 1/2 (H_x + H_y - x.log y - log x.y)`` with ``H = sum v log v``: one matrix
    product per chunk, ``[x | log x] @ [log y | y]^T``; logs of ``max(value, FAST_LOG_EPS)``, so
    zeros give a large finite KL (no merge) instead of NaN. An anchor always matches itself, as
    in the original. The means of the matched queries are float32 sums computed once per
    distinct match row and column of a chunk (anchors of one region match the same queries);
    later iterations test all pairs of proposals with one product; labels are bilinear
    upsampling + first-max argmax in bands of output rows. Memory above the input maps, per
    image: the lower-resolution rows (``4 B R^2`` per distinct parent combination, 16 MB for SD)
    and ~``16 B * chunk_size * R^2`` of reused chunk buffers (R=64, chunk 256: 16 MB).

    ``matmul_precision`` ("auto" by default, "float32", "bfloat16") is the dtype of the KL
    products. bfloat16 products run ~4x faster where the hardware has them (AVX512-BF16 or AMX
    CPUs through oneDNN, CUDA compute capability >= 8: "auto" picks bf16 there, float32
    elsewhere) and change no decision: every bf16 KL comes with a rigorous bound on its error
    (bf16 rounding of each factor, float32 accumulation, one bf16 rounding of the result; see
    ``_bf16_kl_bound``) times ``KL_BOUND_SAFETY``, and the pairs whose bf16 KL lies within that
    bound of the threshold (0.2-1 % of them on SD-like inputs) are recomputed in float32 with
    the float32 formula (by the dense float32 product when they exceed
    ``DENSE_RECOMPUTE_FRACTION`` of a block). The merge masks are therefore the float32 path's,
    up to pairs whose KL lies within float32 rounding (~1e-6) of the threshold, which float32
    itself decides only by summation order. Means, later-iteration decisions (same scheme) and
    labels are computed from the same float32 values in both precisions, so both give the same
    label maps up to such ties (tests: golden, random and near-threshold inputs).

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

import contextlib
import functools
import logging
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor
Fidelity = Literal["fast", "original"]
ThresholdMode = Literal["absolute", "relative"]
MatmulPrecision = Literal["auto", "float32", "bfloat16"]

FAST_LOG_EPS = 1e-12
"""Values are clamped to this before the log in fast mode (documented deviation from the original)."""
DEFAULT_CHUNK_SIZE = 256
"""Queries per chunk in fast mode: working memory ~4 * 4 bytes * B * chunk_size * R^2 (fits L3)."""
KL_BOUND_SAFETY = 2.0
"""Factor on the rigorous bf16 KL error bound: pairs within it of the threshold are redone in float32."""
DENSE_RECOMPUTE_FRACTION = 0.05
"""Above this fraction of undecided pairs a block is redone by the dense float32 product instead."""
DISTRIBUTION_TOLERANCE = 1e-2
"""Allowed |row sum - 1| of the head-averaged maps (loose enough for float16 captures)."""

_BF16_UNIT = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
_F32_UNIT = 2.0**-24  # unit roundoff of float32
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


def _check_matmul_precision(matmul_precision: str) -> None:
    if matmul_precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(
            f"matmul_precision must be 'auto', 'float32' or 'bfloat16', got {matmul_precision!r}"
        )


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
        return _FastRows.build(maps, spec).rows(slice(None))


def merge_proposals(
    proposals: ArrayLike,
    kl_threshold: float,
    *,
    fidelity: Fidelity = "fast",
    matmul_precision: MatmulPrecision = "auto",
) -> ArrayLike:
    """One greedy merging iteration (the original's iterations >= 1) on ``(N, K)`` proposals.

    In proposal order, each not-yet-matched proposal takes the mean of **all** proposals within
    ``kl_threshold`` of it (already matched ones included) and marks them matched. Returns
    ``(M, K)``: float64 numpy (original) or float32 torch on the input's device (fast);
    ``matmul_precision`` as in :func:`segment_attention` (fast mode only).
    """
    _check_fidelity(fidelity)
    _check_matmul_precision(matmul_precision)
    if proposals.ndim != 2:
        raise ValueError(f"proposals must be (N, K), got shape {tuple(proposals.shape)}")
    if fidelity == "original":
        return _merge_original(_to_numpy(proposals, np.float64), float(kl_threshold))
    with torch.no_grad():
        tensor = torch.as_tensor(proposals).float()
        bf16 = resolve_matmul_precision(matmul_precision, tensor.device) == torch.bfloat16
        return _merge_fast(tensor, float(kl_threshold), bf16)


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
    matmul_precision: MatmulPrecision = "auto",
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
        chunk_size: queries per chunk in fast mode (buffers ~ 16 B * chunk_size * R^2 per image).
        matmul_precision: dtype of fast mode's KL products: "auto" (bfloat16 where the hardware
            makes it fast, else float32), "float32" or "bfloat16". bf16 results come with an error
            bound and undecided pairs are redone in float32, so the decisions and label maps are
            those of float32 (module docstring); ignored in original mode.
        return_info: also return one :class:`DiffSegInfo` per image.

    Returns:
        ``(B, H, W)`` int64 numpy segment ids (0..M-1 by proposal order, some ids may be unused),
        and the infos when ``return_info``.
    """
    _check_fidelity(fidelity)
    _check_matmul_precision(matmul_precision)
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
        bf16 = resolve_matmul_precision(matmul_precision, spec.device) == torch.bfloat16
        with torch.no_grad():
            results = _segment_fast(
                maps, spec, anchors, thresholds, relative, refine, out, int(chunk_size), bf16
            )
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


# ----------------------------------------------------------------------------- fast mode: precision


@functools.cache
def _bf16_is_fast(device: torch.device) -> bool:
    """Whether bfloat16 matrix products beat float32 ones on ``device`` (cached per process).

    CUDA: compute capability >= 8 (bf16 tensor cores). CPU: AVX512-BF16 or AMX tiles, through
    oneDNN (the instructions behind torch's bf16 matmul; without them bf16 is emulated and
    slower than float32); when this torch build cannot report the CPU flags, a one-off timing of
    both dtypes decides. Other devices: no.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False
    names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    probes = [getattr(torch.cpu, name, None) for name in names]
    if all(callable(p) for p in probes):
        return torch.backends.mkldnn.is_available() and any(bool(p()) for p in probes)
    return _bf16_benchmark()


def _bf16_benchmark(size: int = 256, repeats: int = 3) -> bool:
    """Time one ``size x 4 size x size`` product in float32 and in bfloat16: bf16 must be 1.5x faster."""
    a, b = torch.rand(size, 4 * size), torch.rand(4 * size, size)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y  # warm-up: oneDNN builds its kernels on the first call
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        return min(times)

    return 1.5 * best(a.bfloat16(), b.bfloat16()) < best(a, b)


def resolve_matmul_precision(matmul_precision: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype of fast mode's large matrix products: ``"float32"``, ``"bfloat16"``, or ``"auto"``
    (bfloat16 where it is fast on ``device``, see :func:`_bf16_is_fast`; float32 elsewhere).

    Either way the merge decisions are those of float32 (see the module docstring).
    """
    _check_matmul_precision(matmul_precision)
    if matmul_precision == "float32":
        return torch.float32
    if matmul_precision == "bfloat16" or _bf16_is_fast(torch.device(device)):
        return torch.bfloat16
    return torch.float32


@contextlib.contextmanager
def _float32_accumulation(device: torch.device) -> Iterator[None]:
    """bf16 products accumulate in float32 and round once (what the error bound assumes).

    oneDNN on CPU always does; cuBLAS may reduce split-K partial sums in bf16 unless told not to.
    """
    matmul = torch.backends.cuda.matmul
    if device.type != "cuda" or not hasattr(matmul, "allow_bf16_reduced_precision_reduction"):
        yield
        return
    previous = matmul.allow_bf16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction = previous


def _gamma(n: int, unit: float = _F32_UNIT) -> float:
    """Higham's gamma_n = n u / (1 - n u): relative error bound of an n-term floating-point sum."""
    return n * unit / (1 - n * unit)


# ----------------------------------------------------------------------------- fast mode: KL tests


@dataclass
class _KLOperand:
    """One side of a batch of symmetric KLs, laid out for one matrix product per batch.

    ``cat`` is float32 ``[v | log v]`` on the left (anchors) and ``[log v | v]`` on the right
    (queries), so ``left.cat @ right.cat^T = x.log y + log x.y``. The bfloat16 copy ``cat16`` holds
    ``log v - max(log v)`` instead of ``log v`` (every entry <= 0), with that maximum ``log_max``
    and the row sums ``total`` (two-level float32 sums) to undo the shift exactly.
    """

    cat: torch.Tensor  # (B, N, 2K) float32
    entropy: torch.Tensor  # (B, N): sum v log v
    cat16: torch.Tensor | None = None  # (B, N, 2K) bfloat16
    log_max: torch.Tensor | None = None  # (B, N)
    total: torch.Tensor | None = None  # (B, N)

    @classmethod
    def prepare(
        cls,
        cat: torch.Tensor,
        *,
        left: bool,
        bf16: bool,
        cat16: torch.Tensor | None = None,
        scratch: torch.Tensor | None = None,
    ) -> _KLOperand:
        """Fill the log half of ``cat`` (whose value half already holds the rows) and derive the rest;
        ``cat16`` and ``scratch`` ``(B, N, K)`` are optional reusable buffers."""
        keys = cat.shape[-1] // 2
        values, logs = (cat[..., :keys], cat[..., keys:]) if left else (cat[..., keys:], cat[..., :keys])
        torch.clamp_min(values, FAST_LOG_EPS, out=logs).log_()
        entropy = torch.mul(values, logs, out=scratch if scratch is not None else None).sum(-1)
        if not bf16:
            return cls(cat, entropy)
        if cat16 is None:
            cat16 = torch.empty(cat.shape, dtype=torch.bfloat16, device=cat.device)
        v16, y16 = (cat16[..., :keys], cat16[..., keys:]) if left else (cat16[..., keys:], cat16[..., :keys])
        log_max = logs.amax(-1)
        v16.copy_(values)
        shifted = torch.sub(logs, log_max[..., None], out=scratch)  # float32 difference, then
        y16.copy_(shifted)  # one rounding to bf16 (a strided bf16 ``out=`` is 3x slower)
        return cls(cat, entropy, cat16, log_max, _two_level_sum(values))

    @classmethod
    def of(cls, values: torch.Tensor, *, left: bool, bf16: bool) -> _KLOperand:
        """Operand from ``(B, N, K)`` rows (copied into a new ``cat``)."""
        keys = values.shape[-1]
        cat = torch.empty((*values.shape[:-1], 2 * keys), dtype=torch.float32, device=values.device)
        (cat[..., :keys] if left else cat[..., keys:]).copy_(values)
        return cls.prepare(cat, left=left, bf16=bf16)


def _two_level_sum(values: torch.Tensor) -> torch.Tensor:
    """Row sums as sums of ``a`` partial sums of ``K/a`` terms (``a = isqrt(K)``).

    Any float32 summation order of ``n`` terms is within ``gamma_{n-1}`` (relative, non-negative
    terms); two levels bring that from ``gamma_{K-1}`` (2.4e-4 for K=4096) to
    ``(1 + gamma_{a-1})(1 + gamma_{K/a-1}) - 1`` (7.5e-6), see :func:`_sum_error`.
    """
    keys = values.shape[-1]
    inner = _sum_split(keys)
    return values.unflatten(-1, (keys // inner, inner)).sum(-1).sum(-1)


def _sum_split(keys: int) -> int:
    inner = math.isqrt(keys)
    while keys % inner:
        inner -= 1
    return inner


def _sum_error(keys: int) -> float:
    inner = _sum_split(keys)
    return (1 + _gamma(inner - 1)) * (1 + _gamma(keys // inner - 1)) - 1


def _kl_below(left: _KLOperand, right: _KLOperand, thresholds: torch.Tensor, bf16: bool) -> torch.Tensor:
    """``(B, P, N)`` bool: symmetric KL of every (left row, right row) pair < the image's threshold.

    float32: ``KL = (H_x + H_y - [x | log x].[log y | y]) / 2``, one batched product (the reference).
    bfloat16: the same decisions as float32, from a 4x cheaper product plus a float32 recompute of
    the few pairs the bf16 value cannot decide (see :func:`_bf16_kl_bound` for the bound).
    """
    return _kl_test(left, right, thresholds, bf16)[0]


def _kl_test(
    left: _KLOperand, right: _KLOperand, thresholds: torch.Tensor, bf16: bool
) -> tuple[torch.Tensor, bool]:
    """:func:`_kl_below`, and whether a bf16 attempt fell back to the dense float32 product (more
    than ``DENSE_RECOMPUTE_FRACTION`` undecided pairs, e.g. a threshold among many tiny KLs)."""
    limit = thresholds[:, None, None]
    if not bf16:
        entropies = left.entropy[..., :, None] + right.entropy[..., None, :]
        kl = torch.baddbmm(entropies, left.cat, right.cat.mT, alpha=-1).mul_(0.5)
        return kl < limit, False
    kl, bound = _bf16_kl(left, right)
    hits = kl < limit
    undecided = kl.sub_(limit).abs_() <= bound
    if int(undecided.sum()) > DENSE_RECOMPUTE_FRACTION * undecided.numel():
        return _kl_test(left, right, thresholds, bf16=False)[0], True
    _recompute_float32(left, right, limit, undecided, hits)
    return hits, False


def _bf16_kl(left: _KLOperand, right: _KLOperand) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, P, N)`` symmetric KLs from one bf16 product, and a bound on their error."""
    with _float32_accumulation(left.cat.device):
        product = torch.bmm(left.cat16, right.cat16.mT).float()
    entropies = left.entropy[..., :, None] + right.entropy[..., None, :]
    shift = torch.mul(left.total[..., :, None], right.log_max[..., None, :])
    shift.addcmul_(left.log_max[..., :, None], right.total[..., None, :])
    kl = (entropies - product).sub_(shift).mul_(0.5)
    return kl, _bf16_kl_bound(product, left, right, entropies)


def _bf16_kl_bound(
    product: torch.Tensor, left: _KLOperand, right: _KLOperand, entropies: torch.Tensor
) -> torch.Tensor:
    """Per-pair bound on |bf16 KL - exact KL of the float32 rows| (``KL_BOUND_SAFETY`` included).

    Let ``C = x.log y + log x.y`` (exact, of the float32 rows). With ``m_x = max log x`` and
    ``s_x = sum x``, ``C = D + m_y s_x + m_x s_y`` where ``D = x.(log y - m_y) + (log x - m_x).y``:
    every term of D is <= 0 (x, y >= 0, log - max <= 0), so ``sum |terms| = |D|``. The bf16
    product returns ``D~`` with
      * each factor rounded to bf16 (relative error <= u = 2^-8), the shifted log first rounded in
        float32 (<= u32 = 2^-24), products of two bf16 exact in float32 (8 + 8 significant bits),
      * a float32 sum of the 2K products in any order: <= gamma_{2K} relative per term,
      * the result rounded once to bf16 (<= u; torch's bf16 matmul has a bf16 output),
    so ``|D~ - D| <= rho |D| <= rho/(1 - rho) |D~|`` with ``rho = (1+u)^3 (1+u32)(1+gamma_2K) - 1``
    (0.0122 for K = 4096), plus 2K * 2^-126 * 32 for flushed subnormals (oneDNN's DAZ/FTZ).
    The row sums ``s`` are two-level float32 sums (relative error ``gamma_s``, 7.5e-6), which costs
    ``gamma_s/(1-gamma_s) (|m_y| s_x + |m_x| s_y)``; assembling ``(H_x + H_y - D~ - shift) / 2`` in
    float32 adds at most ``6 u32 (|H_x| + |H_y| + |D~| + |shift terms|)``. The entropies H are
    the float32 values the float32 path uses too, so their own rounding cancels in the comparison.
    The bound is the half-sum of these terms times ``KL_BOUND_SAFETY``.
    """
    keys2 = left.cat.shape[-1]  # 2K terms per product
    u = _BF16_UNIT
    rho = (1 + u) ** 3 * (1 + _F32_UNIT) * (1 + _gamma(keys2)) - 1
    gamma_s = _sum_error(keys2 // 2)
    shifts = torch.mul(left.total[..., :, None], right.log_max.abs()[..., None, :])
    shifts.addcmul_(left.log_max.abs()[..., :, None], right.total[..., None, :])
    magnitude = product.abs()
    bound = magnitude * (rho / (1 - rho) + 6 * _F32_UNIT)
    bound.add_(shifts, alpha=gamma_s / (1 - gamma_s) + 6 * _F32_UNIT)
    bound.add_(entropies.abs(), alpha=6 * _F32_UNIT)
    return bound.add_(keys2 * 2.0**-121).mul_(0.5 * KL_BOUND_SAFETY)


def _recompute_float32(
    left: _KLOperand, right: _KLOperand, limit: torch.Tensor, undecided: torch.Tensor, hits: torch.Tensor
) -> None:
    """Decide the ``undecided`` pairs in float32, in place in ``hits``: only those dot products
    (a sampled dense-dense product), with the float32 path's formula ``(H_x + H_y - C) / 2``."""
    for b in range(hits.shape[0]):
        pairs = undecided[b].nonzero()
        if len(pairs) == 0:
            continue
        rows, cols = pairs[:, 0], pairs[:, 1]
        crow = torch.zeros(hits.shape[1] + 1, dtype=torch.int64, device=hits.device)
        crow[1:] = torch.bincount(rows, minlength=hits.shape[1]).cumsum(0)
        ones = torch.ones(len(rows), dtype=torch.float32, device=hits.device)
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(crow, cols, ones, hits.shape[1:], check_invariants=False)
            cross = torch.sparse.sampled_addmm(pattern, left.cat[b], right.cat[b].mT, beta=0.0).values()
        kl = (left.entropy[b, rows] + right.entropy[b, cols] - cross).mul_(0.5)
        hits[b, rows, cols] = kl < limit[b, 0, 0]


# ----------------------------------------------------------------------------- fast mode: rows


@dataclass
class _FastRows:
    """Rows of the aggregated tensor on demand, without materialising ``(R^2, R^2)`` per image.

    A top-resolution row is the sum of its heads (input maps, any dtype, summed in float32) scaled
    to the resolution weight; the lower resolutions are key-upsampled, renormalised and weighted
    once, and summed per distinct combination of nearest-tiling parents (``lower``), so a row is
    ``head sum * scale + lower[combo[query]]``.
    """

    top_maps: torch.Tensor  # (B, heads, R^2, R^2), the input's dtype, on the device
    top_weight: float
    lower: torch.Tensor | None  # (B, C, R^2) float32
    combo: torch.Tensor | None  # (R^2,) int64 index into lower
    top: int

    @classmethod
    def build(cls, maps: Mapping[int, ArrayLike], spec: _MapSpec) -> _FastRows:
        top = spec.top
        weights = resolution_weights(spec.resolutions)
        ups, parents = [], []
        for res, weight in zip(spec.resolutions[1:], weights[1:], strict=True):
            mean = _head_mean(maps[res], spec.device)
            _check_distribution(mean.sum(-1), float(mean.amin()), res)
            up = _upsample_keys(mean, top)
            ups.append(up.mul_(float(weight) / up.sum(-1, keepdim=True)))
            parents.append(_parent_index(top, res))
        lower = combo = None
        if ups:
            combos, inverse = np.unique(np.stack(parents, axis=1), axis=0, return_inverse=True)
            lower = _sum_gathered(ups, combos)
            combo = torch.from_numpy(inverse.reshape(-1)).to(spec.device)
        top_maps = torch.as_tensor(maps[top]).to(spec.device)
        return cls(top_maps, float(weights[0]), lower, combo, top)

    @property
    def batch(self) -> int:
        return int(self.top_maps.shape[0])

    def fill(self, queries: slice | torch.Tensor, out: torch.Tensor, scratch: torch.Tensor | None) -> None:
        """Write the rows of ``queries`` into ``out`` ``(B, n, R^2)`` (a view is fine).

        Buffers are reused across chunks: on CPU, fresh multi-MB tensors cost page faults that
        rival the arithmetic. ``scratch`` is ``(B, n, R^2)`` when there are lower resolutions.
        """
        n_heads = self.top_maps.shape[1]

        def head(h: int) -> torch.Tensor:  # gathers go head by head, never all heads at once
            if isinstance(queries, torch.Tensor):
                return self.top_maps[:, h].index_select(1, queries)
            return self.top_maps[:, h, queries]

        # head by head, in the same order for gathers and chunks: pairwise adds stream faster than
        # a strided reduction over the heads axis; other dtypes accumulate into float32
        pairwise = n_heads > 1 and self.top_maps.dtype == torch.float32
        if pairwise:
            torch.add(head(0), head(1), out=out)
        else:
            out.copy_(head(0))
        for h in range(2 if pairwise else 1, n_heads):
            out += head(h)
        sums = out.sum(-1)
        _check_distribution(sums / n_heads, float(out.amin()), self.top)
        scale = (self.top_weight / sums)[..., None]
        if self.lower is None:
            out.mul_(scale)
            return
        index = self.combo[queries]
        for b in range(out.shape[0]):
            torch.index_select(self.lower[b], 0, index, out=scratch[b])
        torch.addcmul(scratch, out, scale, out=out)

    def rows(self, queries: torch.Tensor | slice, image: int | None = None) -> torch.Tensor:
        """``(B, len(queries), R^2)`` float32 aggregated rows (fresh), or ``(len, R^2)`` for one image."""
        if image is not None:
            lower = None if self.lower is None else self.lower[image : image + 1]
            single = _FastRows(self.top_maps[image : image + 1], self.top_weight, lower, self.combo, self.top)
            return single.rows(queries)[0]
        n = len(range(self.top**2)[queries]) if isinstance(queries, slice) else len(queries)
        out = torch.empty((self.batch, n, self.top**2), dtype=torch.float32, device=self.top_maps.device)
        scratch = None if self.lower is None else torch.empty_like(out)
        self.fill(queries, out, scratch)
        return out


def _sum_gathered(ups: list[torch.Tensor], combos: np.ndarray) -> torch.Tensor:
    """``sum_l ups[l][:, combos[:, l]]`` for ``(B, n_l, K)`` tensors, by contiguous row copies.

    The finest level is usually gathered by the identity (no copy); the others go through one
    reused buffer (fresh multi-MB temporaries cost page faults on CPU).
    """
    first = combos[:, 0]
    if len(first) == ups[0].shape[1] and np.array_equal(first, np.arange(len(first))):
        total = ups[0]
    else:
        total = torch.stack([u.index_select(0, torch.from_numpy(first).to(u.device)) for u in ups[0]])
    buffer = torch.empty_like(total[0])
    for level, up in enumerate(ups[1:], start=1):
        where = torch.from_numpy(combos[:, level]).to(up.device)
        for b in range(up.shape[0]):
            total[b] += torch.index_select(up[b], 0, where, out=buffer)
    return total


def _head_mean(x: ArrayLike, device: torch.device) -> torch.Tensor:
    """Float32 head average; half-precision inputs are accumulated head by head in float32."""
    t = torch.as_tensor(x).to(device)
    if t.dtype in (torch.float32, torch.float64):
        return t.mean(1).to(torch.float32)
    acc = t[:, 0].to(torch.float32, copy=True)
    for h in range(1, t.shape[1]):
        acc += t[:, h]
    return acc.div_(t.shape[1])


def _interpolation_matrix(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """``(out, in)`` float32 weights of torch's ``align_corners=False`` bilinear resize along one axis."""
    lower, upper, frac = _bilinear_taps(in_size, out_size, device)
    weights = torch.zeros((out_size, in_size), dtype=torch.float32, device=device)
    rows = torch.arange(out_size, device=device)
    weights.index_put_((rows, lower), 1 - frac, accumulate=True)
    weights.index_put_((rows, upper), frac, accumulate=True)
    return weights


def _upsample_keys(mean: torch.Tensor, top: int) -> torch.Tensor:
    """Bilinear key upsampling ``(B, s^2, s^2) -> (B, s^2, top^2)`` as two small matrix products.

    Same sampling as ``F.interpolate(..., mode="bilinear", align_corners=False)`` (and TF's
    half-pixel resize), several times faster than it on ``s^2`` one-channel images.
    """
    batch, n, keys = mean.shape
    side = math.isqrt(keys)
    weights = _interpolation_matrix(side, top, mean.device)  # (top, side)
    across = mean.reshape(batch * n, side, side) @ weights.T  # (B n, side, top)
    up = torch.bmm(weights.expand(batch * n, top, side), across)  # (B n, top, top)
    return up.reshape(batch, n, top * top)


# ----------------------------------------------------------------------------- fast mode: algorithm


def _iteration0_fast(
    rows: _FastRows,
    anchors: torch.Tensor,
    anchor_maps: torch.Tensor,
    thresholds: torch.Tensor,
    chunk: int,
    bf16: bool,
) -> torch.Tensor:
    """``(B, P^2, R^2)`` iteration-0 proposals, query chunk by query chunk: KL tests by one product
    per chunk (:func:`_kl_below`), then the means of the matched queries."""
    batch, n_anchor, keys = anchor_maps.shape
    device = anchor_maps.device
    left = _KLOperand.of(anchor_maps, left=True, bf16=bf16)
    sums = torch.zeros_like(anchor_maps)
    counts = torch.zeros((batch, n_anchor), dtype=torch.float32, device=device)
    own = torch.arange(n_anchor, device=device)
    chunk = min(chunk, keys)
    cat = torch.empty((batch, chunk, 2 * keys), dtype=torch.float32, device=device)
    cat16 = torch.empty(cat.shape, dtype=torch.bfloat16, device=device) if bf16 else None
    scratch = torch.empty((batch, chunk, keys), dtype=torch.float32, device=device)
    dense_blocks = 0  # after two chunks that bf16 could not decide, the rest go straight to float32
    for q0 in range(0, keys, chunk):
        n = min(chunk, keys - q0)
        buf, queries = cat[:, :n], cat[:, :n, keys:]
        part16, part = None if cat16 is None else cat16[:, :n], scratch[:, :n]
        rows.fill(slice(q0, q0 + n), queries, part)
        use16 = bf16 and dense_blocks < 2
        right = _KLOperand.prepare(buf, left=False, bf16=use16, cat16=part16, scratch=part)
        hits, dense = _kl_test(left, right, thresholds, use16)
        dense_blocks += dense
        inside = (anchors >= q0) & (anchors < q0 + n)
        hits[:, own[inside], anchors[inside] - q0] = True  # KL(x, x) = 0 always matches, as in the original
        counts += hits.sum(-1, dtype=torch.float32)
        _add_matched_sums(sums, hits, queries)
    return sums.div_(counts[..., None])


def _add_matched_sums(sums: torch.Tensor, hits: torch.Tensor, queries: torch.Tensor) -> None:
    """``sums += hits @ queries`` in float32, over the distinct rows and columns of ``hits`` only.

    Anchors of one region match the same queries, and queries of one region are matched by the
    same anchors: on the benchmark input a chunk of 256 queries x 256 anchors has 20-100
    distinct match rows and 20-100 distinct match columns. Queries with equal columns are summed
    first (``pooled``), so the product shrinks from ``P x n x K`` to ``U x C x K`` plus one pass
    over the queries; every term is non-negative, so this reordering of a float32 sum keeps its
    float32 accuracy. On other devices, or when little repeats, one plain product.
    """
    for b in range(hits.shape[0]):
        h = hits[b]
        if h.device.type == "cpu":
            mask = h.numpy()
            row_first, row_inverse = _distinct_rows(mask)
            col_first, col_inverse = _distinct_rows(mask.T)
            if 2 * len(row_first) * len(col_first) < mask.size:
                pooled = torch.zeros((len(col_first), queries.shape[-1]), dtype=torch.float32)
                pooled.index_add_(0, torch.from_numpy(col_inverse), queries[b].contiguous())  # 3x faster
                table = torch.from_numpy(mask[np.ix_(row_first, col_first)]).to(torch.float32)
                sums[b] += (table @ pooled).index_select(0, torch.from_numpy(row_inverse))
                continue
        sums[b].addmm_(h.to(torch.float32), queries[b])


def _distinct_rows(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One index per distinct row of a 2-D bool array, and each row's group (``np.unique``'s
    ``return_index``/``return_inverse``, by a lexicographic sort of the bit-packed rows)."""
    packed = np.packbits(mask, axis=1)
    pad = -packed.shape[1] % 8
    words = np.ascontiguousarray(np.pad(packed, ((0, 0), (0, pad)))).view(np.uint64)
    order = np.lexsort(words.T[::-1])
    ordered = words[order]
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = np.any(ordered[1:] != ordered[:-1], axis=1)
    inverse = np.empty(len(order), dtype=np.int64)
    inverse[order] = np.cumsum(starts) - 1
    return order[starts], inverse


def _merge_fast(proposals: torch.Tensor, threshold: float, bf16: bool = False) -> torch.Tensor:
    """Greedy pass with all pairwise KL tests from one product; same order semantics as original."""
    batch = proposals[None]
    left = _KLOperand.of(batch, left=True, bf16=bf16)
    right = _KLOperand.of(batch, left=False, bf16=bf16)
    limit = torch.tensor([threshold], dtype=torch.float32, device=proposals.device)
    hits = _kl_below(left, right, limit, bf16)[0]
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
    bf16: bool,
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
    initial = _iteration0_fast(rows, anchor_idx, anchor_maps, first, chunk, bf16)
    results = []
    for b, image_thresholds in enumerate(per_image):
        proposals, counts = initial[b], [len(anchors)]
        for threshold in image_thresholds[1:]:
            proposals = _merge_fast(proposals, threshold, bf16)
            counts.append(len(proposals))
        if refine:
            everything = rows.rows(slice(None), image=b)
            proposals = _refine_fast(everything, proposals)
            del everything
        logger.debug("diffseg fast: image %d thresholds %s proposals %s", b, image_thresholds, counts)
        info = DiffSegInfo(image_thresholds, counts, proposals.cpu().numpy().astype(np.float32))
        results.append((_labels_fast(proposals, spec.top, out), info))
    return results
