"""Training DDPM-Segmentation's pixel-classifier ensemble, streaming features from disk.

The original puts every labelled pixel's upsampled feature vector in RAM (8,448 float32 × 3.3 M
pixels ≈ 110 GB for 50 images at 256², ~210 GB peak with its copies). Here a
:class:`FeatureStore` keeps each image's activations at the UNet's *native* resolutions
(channel-last float16 ``.npy`` files, memory-mapped; 64–165× smaller than per-pixel features),
and every batch of 64 pixels is upsampled on the fly by :class:`~diffuseg.methods.ddpm_seg.PixelGatherer`.

The MLPs are trained by their own small loop rather than :func:`diffuseg.train.train`: the
original's stopping rule is epoch-based (after epoch 3, stop once the batch loss has not improved
for 50 iterations), the models are a few hundred kB and train in seconds to minutes, and each
finished model is saved so an interrupted run resumes at the next model — the shared loop's
step-count schedule, checkpoints and Accelerate wrapping would not express the rule and buy nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffuseg.io import atomic_write
from diffuseg.methods.ddpm_seg import (
    DDPMSegPipeline,
    FeatureConfig,
    FeatureSource,
    PixelEnsemble,
    PixelGatherer,
    PixelMLP,
    build_feature_source,
    group_maps,
)
from diffuseg.utils import dataclass_from_dict

logger = logging.getLogger(__name__)

__all__ = [
    "AUGMENT_OPS",
    "EnsembleTrainConfig",
    "FeatureStore",
    "augment_labelled",
    "build_feature_store",
    "config_fingerprint",
    "drop_small_classes",
    "fit_ddpm_seg",
    "prepare_label",
    "StackedMLPs",
    "select_labelled",
    "train_ddpm_seg_folder",
    "train_ensemble",
    "train_ensemble_lockstep",
    "train_pixel_classifier",
    "warp_pair",
]

STORE_META = "store.json"
IGNORE_INDEX = 255


# ============================================================================ config
@dataclass
class EnsembleTrainConfig:
    """The ensemble recipe. Defaults are the original's; the coursework options are off.

    ``augment``: ``augment_copies`` augmented copies per labelled image (colour jitter, grey, flip,
    random resized crop, rotation, elastic, coarse dropout; each with probability ``augment_p``).
    ``optimizer="adamw"`` + ``weight_decay=1e-4`` + ``dropout=0.4``: the coursework's regulariser.
    ``recalibrate_bn`` (with ``dropout > 0``): re-estimate the BatchNorm statistics with Dropout off
    after training (:func:`recalibrate_batchnorm`, our fix of the recipe's variance shift; ``False``
    keeps the coursework's models as published).
    ``max_iterations`` caps the iterations per model (``None``: the original's stopping rule only).
    ``lockstep`` trains the members together as one stacked module (same per-member recipe, several
    times faster on a CPU); ``False`` trains them one after the other, saving each as it finishes.
    """

    num_models: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    dropout: float = 0.0
    max_epochs: int = 100
    stop_after_epoch: int = 3
    patience: int = 50
    min_class_pixels: int = 20
    augment: bool = False
    augment_copies: int = 4
    augment_p: float = 0.4
    max_iterations: int | None = None
    lockstep: bool = True
    recalibrate_bn: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.num_models >= 1, f"num_models must be ≥ 1, got {self.num_models}"),
            (self.batch_size >= 2, f"batch_size must be ≥ 2 (BatchNorm), got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (
                self.optimizer in ("adam", "adamw"),
                f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}",
            ),
            (self.weight_decay >= 0, f"weight_decay must be ≥ 0, got {self.weight_decay}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.max_epochs >= 1, f"max_epochs must be ≥ 1, got {self.max_epochs}"),
            (self.patience >= 0, f"patience must be ≥ 0, got {self.patience}"),
            (self.augment_copies >= 1, f"augment_copies must be ≥ 1, got {self.augment_copies}"),
            (0 <= self.augment_p <= 1, f"augment_p must be in [0, 1], got {self.augment_p}"),
            (self.max_iterations is None or self.max_iterations >= 1, "max_iterations must be ≥ 1 or None"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EnsembleTrainConfig:
        return dataclass_from_dict(cls, d, "ensemble")

    @classmethod
    def improved(cls, **overrides: Any) -> EnsembleTrainConfig:
        """The coursework recipe: augmentation ×5 and AdamW(wd 1e-4) + Dropout 0.4."""
        values: dict[str, Any] = {"augment": True, "optimizer": "adamw", "weight_decay": 1e-4, "dropout": 0.4}
        values.update(overrides)
        return cls(**values)


def config_fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ============================================================================ labels & augmentation
def prepare_label(label: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop a label map to a square and resize it (nearest) to ``size`` — like the images."""
    lab = np.asarray(label)
    if lab.ndim != 2:
        raise ValueError(f"label maps must be (H, W), got {lab.shape}")
    h, w = lab.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    lab = lab[top : top + s, left : left + s]
    if s != size:
        t = torch.from_numpy(lab.astype(np.int64))[None, None].float()
        lab = F.interpolate(t, size=(size, size), mode="nearest")[0, 0].long().numpy()
    return lab.astype(np.int64)


def drop_small_classes(
    label: np.ndarray, min_pixels: int = 20, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Set classes with fewer than ``min_pixels`` pixels in this image to ``ignore_index`` (original rule)."""
    out = np.array(label, copy=True)
    ids, counts = np.unique(out, return_counts=True)
    for c, n in zip(ids, counts, strict=True):
        if c != ignore_index and n < min_pixels:
            out[out == c] = ignore_index
    return out


def _u(generator: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _colour_jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation ×[0.8, 1.2], hue ±0.05 turn (a YIQ rotation), in [0, 1] space."""
    x = (x + 1.0) / 2.0 * _u(g, 0.8, 1.2)
    mean = x.mean()
    x = (x - mean) * _u(g, 0.8, 1.2) + mean
    grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
    x = (x - grey) * _u(g, 0.8, 1.2) + grey
    theta = _u(g, -0.05, 0.05) * 2 * math.pi
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    c, s = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    m = torch.linalg.inv(to_yiq) @ rot @ to_yiq
    return torch.einsum("ij,jhw->ihw", m, x).clamp(0, 1) * 2.0 - 1.0


AUGMENT_OPS: tuple[str, ...] = ("colour", "grey", "flip", "crop", "rotate", "elastic", "dropout")
"""The coursework's augmentations (colour jitter, greyscale, horizontal flip, random resized crop,
rotation, elastic deformation, coarse dropout), applied in this order, each with probability ``p``."""


def _draw(op: str, ops: Sequence[str], g: torch.Generator, p: float) -> bool:
    """Whether ``op`` fires; the coin is always drawn so the random stream does not depend on ``ops``."""
    return float(torch.rand((), generator=g)) < p and op in ops


def _geometric_grid(size: int, g: torch.Generator, p: float, ops: Sequence[str]) -> torch.Tensor | None:
    """Sampling grid ``(1, S, S, 2)`` of flip / resized crop / rotation / elastic; ``None`` if none fired."""
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    grid = torch.stack([xx, yy], dim=-1)
    touched = False
    if _draw("flip", ops, g, p):
        grid[..., 0] = -grid[..., 0]
        touched = True
    if _draw("crop", ops, g, p):  # random resized crop: area 50–100%, aspect 3/4–4/3
        area, logr = _u(g, 0.5, 1.0), _u(g, math.log(3 / 4), math.log(4 / 3))
        w, h = min(1.0, math.sqrt(area * math.exp(logr))), min(1.0, math.sqrt(area / math.exp(logr)))
        cx, cy = _u(g, -(1 - w), 1 - w), _u(g, -(1 - h), 1 - h)
        grid = grid * torch.tensor([w, h]) + torch.tensor([cx, cy])
        touched = True
    if _draw("rotate", ops, g, p):  # ±20°
        a = math.radians(_u(g, -20.0, 20.0))
        rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        grid = grid @ rot.T
        touched = True
    if _draw("elastic", ops, g, p):  # smooth random displacement field, ~2 px amplitude
        coarse = torch.randn(1, 2, 4, 4, generator=g) * (2.0 * 2 / size)
        field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        grid = grid + field[0].permute(1, 2, 0)
        touched = True
    return grid[None] if touched else None


def warp_pair(
    image: torch.Tensor, label: torch.Tensor, grid: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample an image (bilinear) and its label map (nearest) on the same grid.

    Label pixels whose source lies outside the image become ``ignore_index``.
    """
    x = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    lab_valid = torch.stack([label.float(), torch.ones_like(label, dtype=torch.float32)])[None]
    warped = F.grid_sample(lab_valid, grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
    y = torch.where(warped[1] > 0.5, warped[0].round().long(), torch.full_like(label, ignore_index))
    return x, y


def augment_labelled(
    image: torch.Tensor,
    label: torch.Tensor,
    generator: torch.Generator,
    p: float = 0.4,
    ignore_index: int = IGNORE_INDEX,
    ops: Sequence[str] = AUGMENT_OPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random augmentation of a labelled image (the coursework's set, each op with probability ``p``).

    ``image``: ``(3, S, S)`` in [-1, 1]; ``label``: ``(S, S)`` int64. Geometric ops move the label
    with the image (nearest neighbour); pixels that come from outside the image and coarse-dropout
    rectangles become ``ignore_index`` — they carry no label to learn from. ``ops`` restricts the
    set (names from :data:`AUGMENT_OPS`).
    """
    if image.ndim != 3 or label.shape != image.shape[1:]:
        raise ValueError(
            f"augment_labelled: image (3, S, S) and label (S, S), "
            f"got {tuple(image.shape)}, {tuple(label.shape)}"
        )
    unknown = sorted(set(ops) - set(AUGMENT_OPS))
    if unknown:
        raise ValueError(f"unknown augmentations {unknown}; choose from {AUGMENT_OPS}")
    x, y = image.float().clone(), label.clone()
    size = x.shape[-1]
    if _draw("colour", ops, generator, p):
        x = _colour_jitter(x, generator)
    if _draw("grey", ops, generator, p):
        grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
        x = grey.expand(3, -1, -1).clone()
    grid = _geometric_grid(size, generator, p, ops)
    if grid is not None:
        x, y = warp_pair(x, y, grid, ignore_index)
    if _draw("dropout", ops, generator, p):  # coarse dropout: 1–3 holes of 1/8–1/4 of the side
        for _ in range(int(torch.randint(1, 4, (), generator=generator))):
            hh, ww = (int(torch.randint(size // 8, size // 4 + 1, (), generator=generator)) for _ in range(2))
            top = int(torch.randint(0, size - hh + 1, (), generator=generator))
            left = int(torch.randint(0, size - ww + 1, (), generator=generator))
            x[:, top : top + hh, left : left + ww] = 0.0
            y[top : top + hh, left : left + ww] = ignore_index
    return x.clamp(-1, 1), y


# ============================================================================ feature store
class FeatureStore:
    """Native-resolution features (float16, channel-last) + labels of N images, on disk or in RAM.

    ``root=None`` keeps everything in memory (tests, small sets); otherwise ``group_<k>.npy`` and
    ``labels.npy`` are memory-mapped ``.npy`` files and ``store.json`` records shapes and a
    fingerprint of what was stored, so a later run reuses a complete store instead of recomputing it.
    """

    def __init__(
        self,
        groups: list[np.ndarray],
        labels: np.ndarray,
        size: int,
        root: Path | None = None,
        fingerprint: str = "",
    ) -> None:
        self.groups, self.labels, self.size = groups, labels, int(size)
        self.root, self.fingerprint = root, fingerprint
        self.gatherer = PixelGatherer([g.shape[1:] for g in groups], size)

    @property
    def num_images(self) -> int:
        return int(self.labels.shape[0])

    @property
    def channels(self) -> int:
        return self.gatherer.channels

    @property
    def nbytes(self) -> int:
        return sum(int(g.nbytes) for g in self.groups) + int(self.labels.nbytes)

    @classmethod
    def create(
        cls,
        group_shapes: Sequence[tuple[int, int, int]],
        num_images: int,
        size: int,
        root: str | os.PathLike | None = None,
        fingerprint: str = "",
    ) -> FeatureStore:
        """Allocate an empty store (files are written under ``root/.partial`` until :meth:`finalize`)."""
        if root is None:
            groups = [np.zeros((num_images, *s), np.float16) for s in group_shapes]
            return cls(
                groups, np.full((num_images, size, size), IGNORE_INDEX, np.uint8), size, None, fingerprint
            )
        tmp = Path(root) / ".partial"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        groups = [
            np.lib.format.open_memmap(
                tmp / f"group_{k}.npy", mode="w+", dtype=np.float16, shape=(num_images, *s)
            )
            for k, s in enumerate(group_shapes)
        ]
        labels = np.lib.format.open_memmap(
            tmp / "labels.npy", mode="w+", dtype=np.uint8, shape=(num_images, size, size)
        )
        labels[:] = IGNORE_INDEX
        return cls(groups, labels, size, Path(root), fingerprint)

    def finalize(self) -> FeatureStore:
        """Flush and move a disk store into place (atomic from the reader's view); reopen read-only."""
        if self.root is None:
            return self
        for a in (*self.groups, self.labels):
            a.flush()
        tmp = self.root / ".partial"
        for f in tmp.iterdir():
            os.replace(f, self.root / f.name)
        tmp.rmdir()
        meta = {
            "size": self.size,
            "num_images": self.num_images,
            "groups": len(self.groups),
            "fingerprint": self.fingerprint,
        }
        with atomic_write(self.root / STORE_META, "w") as fh:
            json.dump(meta, fh, indent=2)
        return FeatureStore.open(self.root)

    @classmethod
    def open(cls, root: str | os.PathLike) -> FeatureStore:
        """Memory-map a finished store read-only."""
        root = Path(root)
        meta = json.loads((root / STORE_META).read_text())
        groups = [np.load(root / f"group_{k}.npy", mmap_mode="r") for k in range(meta["groups"])]
        labels = np.load(root / "labels.npy", mmap_mode="r")
        return cls(groups, labels, meta["size"], root, meta.get("fingerprint", ""))

    @classmethod
    def find(cls, root: str | os.PathLike | None, fingerprint: str) -> FeatureStore | None:
        """A complete store at ``root`` with this fingerprint, or ``None``."""
        if root is None or not (Path(root) / STORE_META).is_file():
            return None
        meta = json.loads((Path(root) / STORE_META).read_text())
        return cls.open(root) if meta.get("fingerprint") == fingerprint else None

    def write(self, start: int, groups: Sequence[np.ndarray], labels: np.ndarray | None) -> None:
        """Store the grouped maps (and labels) of images ``start .. start + B - 1``."""
        b = groups[0].shape[0]
        for dst, src in zip(self.groups, groups, strict=True):
            if dst.shape[1:] != src.shape[1:]:
                raise ValueError(
                    f"feature group shape {src.shape[1:]} differs from the store's {dst.shape[1:]}"
                )
            dst[start : start + b] = src
        if labels is not None:
            self.labels[start : start + b] = labels

    def valid_pixels(self, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
        """Flat indices ``n·S² + y·S + x`` of the labelled pixels."""
        flat = np.asarray(self.labels).reshape(-1)
        return np.flatnonzero(flat != ignore_index)

    def batch(self, flat: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``(P, C)`` and labels ``(P,)`` of pixels given by flat indices."""
        n, rem = np.divmod(flat, self.size * self.size)
        ys, xs = np.divmod(rem, self.size)
        x = self.gatherer.gather(self.groups, n, ys, xs)
        y = torch.from_numpy(np.asarray(self.labels[n, ys, xs], dtype=np.int64))
        return x, y


def _as_source(
    features: FeatureConfig | FeatureSource, config: FeatureConfig | None
) -> tuple[FeatureSource, FeatureConfig | None]:
    if isinstance(features, FeatureConfig):
        return build_feature_source(features), features
    return features, config


def _preprocess(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    from diffuseg.backbones.latent import preprocess_images

    return preprocess_images(list(images), size)


def build_feature_store(
    source: FeatureSource,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray] | None,
    root: str | os.PathLike | None = None,
    *,
    augment: bool = False,
    augment_copies: int = 4,
    augment_p: float = 0.4,
    min_class_pixels: int = 20,
    seed: int = 0,
    batch_size: int = 8,
    fingerprint: str = "",
    progress: bool = True,
) -> FeatureStore:
    """Compute features of (optionally augmented) labelled images once and store them.

    Each image contributes itself plus ``augment_copies`` augmented copies when ``augment``; labels
    are cropped/resized like the images and classes under ``min_class_pixels`` pixels per image are
    ignored. ``labels=None`` stores features only (evaluation sets: labels left as ignore).
    A complete store with the same ``fingerprint`` at ``root`` is reused.
    """
    from tqdm.auto import tqdm

    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} label maps")
    if not len(images):
        raise ValueError("build_feature_store: no images")
    found = FeatureStore.find(root, fingerprint) if fingerprint else None
    if found is not None:
        logger.info("reusing the feature store at %s", root)
        return found
    size = source.resolution
    copies = 1 + (augment_copies if augment else 0)
    gen = torch.Generator().manual_seed(seed)
    store: FeatureStore | None = None
    total = len(images) * copies
    bar = tqdm(total=total, desc="features", disable=not progress, unit="img")
    for start in range(0, len(images), batch_size):
        x, y = _expand_batch(images[start : start + batch_size], labels, start, size, copies, gen, augment_p)
        groups = group_maps(source.maps(x))
        if store is None:
            store = FeatureStore.create([g.shape[1:] for g in groups], total, size, root, fingerprint)
        lab = None
        if y is not None:
            lab = np.stack([drop_small_classes(v.numpy(), min_class_pixels) for v in y]).astype(np.uint8)
        store.write(start * copies, groups, lab)
        bar.update(x.shape[0])
    bar.close()
    assert store is not None
    return store.finalize()


def _expand_batch(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray] | None,
    offset: int,
    size: int,
    copies: int,
    gen: torch.Generator,
    p: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch of images (each followed by its augmented copies) and labels at the feature grid."""
    x = _preprocess(images, size)
    if labels is None:
        return x, None
    y = torch.stack([torch.from_numpy(prepare_label(labels[offset + i], size)) for i in range(len(images))])
    if copies == 1:
        return x, y
    xs, ys = [], []
    for img, lab in zip(x, y, strict=True):
        xs.append(img)
        ys.append(lab)
        for _ in range(copies - 1):
            a, b = augment_labelled(img, lab, gen, p)
            xs.append(a)
            ys.append(b)
    return torch.stack(xs), torch.stack(ys)


# ============================================================================ training
def _model_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _optimizer(model: PixelMLP, cfg: EnsembleTrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_pixel_classifier(
    store: FeatureStore,
    num_classes: int,
    cfg: EnsembleTrainConfig,
    index: int = 0,
    progress: bool = False,
) -> tuple[PixelMLP, dict[str, Any]]:
    """Train one MLP exactly as the original: shuffled batches of 64, CE, early stop after epoch 3.

    The stopping rule compares each batch loss with the best batch loss seen since epoch
    ``stop_after_epoch`` ended and stops after ``patience`` (+1) iterations without improvement.
    Returns the model (eval mode) and stats (iterations, epochs, last loss, seconds).
    """
    from tqdm.auto import tqdm

    valid = store.valid_pixels()
    if valid.size < 2:
        raise ValueError("the feature store has fewer than 2 labelled pixels: nothing to train on")
    seed = _model_seed(cfg.seed, index)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout masks
        model = PixelMLP(store.channels, num_classes, cfg.dropout).init_weights(gen).train()
        opt = _optimizer(model, cfg)
        best, bad, it, t0, epoch, loss_v = math.inf, 0, 0, time.perf_counter(), 0, math.nan
        bar = tqdm(desc=f"mlp {index}", disable=not progress, unit="it", leave=False)
        stop = False
        for epoch in range(cfg.max_epochs):
            order = valid[torch.randperm(valid.size, generator=gen).numpy()]
            for b in range(0, order.size, cfg.batch_size):
                sel = order[b : b + cfg.batch_size]
                if sel.size < 2:  # a 1-pixel last batch would break BatchNorm (the original crashes)
                    continue
                x, y = store.batch(sel)
                if int(y.max()) >= num_classes:
                    raise ValueError(
                        f"label {int(y.max())} ≥ num_classes={num_classes}: check the dataset's classes"
                    )
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                it += 1
                loss_v = loss.item()
                bar.update(1)
                if epoch > cfg.stop_after_epoch:
                    best, bad = (loss_v, 0) if loss_v < best else (best, bad + 1)
                    stop = bad > cfg.patience
                if stop or (cfg.max_iterations is not None and it >= cfg.max_iterations):
                    stop = True
                    break
            if stop:
                break
        bar.close()
    stats = {"iterations": it, "epochs": epoch + 1, "last_loss": loss_v, "seconds": time.perf_counter() - t0}
    return model.eval(), stats


class StackedMLPs(nn.Module):
    """``M`` pixel MLPs run as one module on ``M`` different batches: ``(M, B, C) → (M, B, K)``.

    Linear layers become batched matrix products and each member's BatchNorm is a slice of one wider
    BatchNorm1d (BatchNorm is per channel, and a member's channels only ever see its own batch), so
    every member computes exactly what it would alone. Adam/AdamW are elementwise, so one optimizer
    over the stacked tensors equals one optimizer per member. This removes the per-model Python and
    dispatch overhead that dominates 64-pixel batches on a CPU.
    """

    def __init__(self, members: Sequence[PixelMLP]) -> None:
        super().__init__()
        lins = [[m for m in mlp.layers if isinstance(m, nn.Linear)] for mlp in members]
        bns = [[m for m in mlp.layers if isinstance(m, nn.BatchNorm1d)] for mlp in members]
        self.num, self.dropout = len(members), _dropout_of(members[0])
        self.weights = nn.ParameterList(
            nn.Parameter(torch.stack([lin[j].weight.detach().t() for lin in lins])) for j in range(3)
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.stack([lin[j].bias.detach()[None] for lin in lins])) for j in range(3)
        )
        self.norms = nn.ModuleList()
        for j in range(2):
            bn = nn.BatchNorm1d(self.num * bns[0][j].num_features)
            with torch.no_grad():
                bn.weight.copy_(torch.cat([b[j].weight for b in bns]))
                bn.bias.copy_(torch.cat([b[j].bias for b in bns]))
            self.norms.append(bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, b, _ = x.shape
        h = x
        for j in range(2):
            h = torch.baddbmm(self.biases[j], h, self.weights[j]).relu()
            if self.dropout > 0:
                h = F.dropout(h, self.dropout, self.training)
            h = self.norms[j](h.transpose(0, 1).reshape(b, -1)).view(b, m, -1).transpose(0, 1)
        return torch.baddbmm(self.biases[2], h, self.weights[2])

    @torch.no_grad()
    def member_state(self, i: int, template: PixelMLP) -> dict[str, torch.Tensor]:
        """The state dict of member ``i`` as a stand-alone :class:`PixelMLP` (``template`` gives the keys)."""
        lins = [m for m in template.layers if isinstance(m, nn.Linear)]
        bns = [m for m in template.layers if isinstance(m, nn.BatchNorm1d)]
        for j, lin in enumerate(lins):
            lin.weight.copy_(self.weights[j][i].t())
            lin.bias.copy_(self.biases[j][i, 0])
        for j, bn in enumerate(bns):
            n = bn.num_features
            src = self.norms[j]
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).copy_(getattr(src, name)[i * n : (i + 1) * n])
            bn.num_batches_tracked.copy_(src.num_batches_tracked)
        return {k: v.detach().clone() for k, v in template.state_dict().items()}


def _dropout_of(mlp: PixelMLP) -> float:
    drops = [m.p for m in mlp.layers if isinstance(m, nn.Dropout)]
    return float(drops[0]) if drops else 0.0


def train_ensemble_lockstep(
    store: FeatureStore,
    num_classes: int,
    cfg: EnsembleTrainConfig,
    progress: bool = False,
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, Any]]]:
    """Train all members at once (:class:`StackedMLPs`), each with its own init, data order and stopping.

    Member ``i`` gets the same seed, initialisation and pixel order as :func:`train_pixel_classifier`
    with ``index=i``; its weights are snapshotted at the iteration its own stopping rule fires (the
    stacked copy keeps moving, unused). Only dropout masks are drawn differently.
    Returns the members' state dicts and stats.
    """
    from tqdm.auto import tqdm

    valid = store.valid_pixels()
    if valid.size < 2:
        raise ValueError("the feature store has fewer than 2 labelled pixels: nothing to train on")
    m = cfg.num_models
    gens = [torch.Generator().manual_seed(_model_seed(cfg.seed, i)) for i in range(m)]
    members = [PixelMLP(store.channels, num_classes, cfg.dropout).init_weights(g) for g in gens]
    template = PixelMLP(store.channels, num_classes, cfg.dropout)
    states: list[dict[str, torch.Tensor] | None] = [None] * m
    stats: list[dict[str, Any]] = [{} for _ in range(m)]
    best, bad = [math.inf] * m, [0] * m
    t0, it = time.perf_counter(), 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_model_seed(cfg.seed, 10_000))  # dropout masks
        net = StackedMLPs(members).train()
        opt = _optimizer(net, cfg)
        bar = tqdm(desc="ensemble (lockstep)", disable=not progress, unit="it", leave=False)
        for epoch in range(cfg.max_epochs):
            orders = [valid[torch.randperm(valid.size, generator=g).numpy()] for g in gens]
            for b in range(0, valid.size, cfg.batch_size):
                sel = [o[b : b + cfg.batch_size] for o in orders]
                if sel[0].size < 2:  # a 1-pixel last batch would break BatchNorm (the original crashes)
                    continue
                x, y = store.batch(np.concatenate(sel))
                if int(y.max()) >= num_classes:
                    raise ValueError(
                        f"label {int(y.max())} ≥ num_classes={num_classes}: check the dataset's classes"
                    )
                logits = net(x.view(m, sel[0].size, -1))
                losses = F.cross_entropy(logits.flatten(0, 1), y, reduction="none").view(m, -1).mean(1)
                opt.zero_grad(set_to_none=True)
                losses.sum().backward()
                opt.step()
                it += 1
                bar.update(1)
                values = losses.detach().tolist()
                for i in range(m):
                    if states[i] is not None:
                        continue
                    stop = False
                    if epoch > cfg.stop_after_epoch:
                        best[i], bad[i] = (values[i], 0) if values[i] < best[i] else (best[i], bad[i] + 1)
                        stop = bad[i] > cfg.patience
                    if stop or (cfg.max_iterations is not None and it >= cfg.max_iterations):
                        states[i] = net.member_state(i, template)
                        stats[i] = {"iterations": it, "epochs": epoch + 1, "last_loss": values[i]}
                if all(s is not None for s in states):
                    break
            if all(s is not None for s in states):
                break
        bar.close()
    for i in range(m):  # members whose rule never fired within max_epochs
        if states[i] is None:
            states[i] = net.member_state(i, template)
            stats[i] = {"iterations": it, "epochs": cfg.max_epochs, "last_loss": values[i]}
    seconds = time.perf_counter() - t0
    for st in stats:
        st["seconds"] = seconds
        st["lockstep"] = True
    return [s for s in states if s is not None], stats


def train_ensemble(
    store: FeatureStore,
    num_classes: int,
    cfg: EnsembleTrainConfig,
    work_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[PixelEnsemble, list[dict[str, Any]]]:
    """Train ``cfg.num_models`` MLPs; with ``work_dir`` finished models are saved and reused on rerun.

    Lockstep training saves the members together when all have stopped; sequential training saves
    each member as it finishes. With Dropout and ``cfg.recalibrate_bn`` the BatchNorm statistics are
    then re-estimated (:func:`recalibrate_batchnorm`); the cached files keep the trained weights.
    """
    ensemble = PixelEnsemble(store.channels, num_classes, cfg.num_models, cfg.dropout)
    # the cached MLPs are the trained weights, before any BatchNorm re-estimation: valid for both settings
    recipe = {k: v for k, v in asdict(cfg).items() if k != "recalibrate_bn"}
    tag = config_fingerprint({"cfg": recipe, "store": store.fingerprint, "classes": num_classes})
    stats: list[dict[str, Any]] = []
    paths = [
        Path(work_dir) / f"mlp_{tag}_{i}.safetensors" if work_dir is not None else None
        for i in range(cfg.num_models)
    ]
    reusable = store.fingerprint and all(p is not None and p.is_file() for p in paths)
    if cfg.lockstep and not reusable:
        states, stats = train_ensemble_lockstep(store, num_classes, cfg, progress)
        for i, state in enumerate(states):
            ensemble.models[i].load_state_dict(state)
            if paths[i] is not None and store.fingerprint:
                _save_state(state, paths[i])
        logger.info(
            "trained %d MLPs in lockstep: %s iterations", cfg.num_models, [s["iterations"] for s in stats]
        )
    else:
        _train_members_one_by_one(ensemble, store, num_classes, cfg, paths, stats, progress)
    if cfg.dropout > 0 and cfg.recalibrate_bn:
        used = recalibrate_batchnorm(ensemble.models, store, seed=cfg.seed)
        logger.info("re-estimated the MLPs' BatchNorm statistics without Dropout on %d pixels", used)
    return ensemble.eval(), stats


def _train_members_one_by_one(
    ensemble: PixelEnsemble,
    store: FeatureStore,
    num_classes: int,
    cfg: EnsembleTrainConfig,
    paths: list[Path | None],
    stats: list[dict[str, Any]],
    progress: bool,
) -> None:
    """Sequential training: each member is saved as it finishes and reused from ``paths`` on rerun."""
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    for i in tqdm(range(cfg.num_models), desc="ensemble", disable=not progress):
        path = paths[i]
        if path is not None and path.is_file() and store.fingerprint:
            ensemble.models[i].load_state_dict(load_file(str(path)))
            stats.append({"reused": True})
            continue
        model, st = train_pixel_classifier(store, num_classes, cfg, i, progress)
        ensemble.models[i].load_state_dict(model.state_dict())
        stats.append(st)
        logger.info(
            "MLP %d: %d iterations, %d epochs, loss %.4f, %.1f s",
            i,
            st["iterations"],
            st["epochs"],
            st["last_loss"],
            st["seconds"],
        )
        if path is not None and store.fingerprint:
            _save_state(model.state_dict(), path)


@torch.no_grad()
def recalibrate_batchnorm(
    models: Sequence[nn.Module],
    store: FeatureStore,
    num_pixels: int = 65_536,
    batch_size: int = 1024,
    seed: int = 0,
) -> int:
    """Re-estimate the models' BatchNorm running statistics on training pixels, with Dropout off.

    Why: the original MLP is Linear-ReLU-BatchNorm, so the coursework's Dropout after each ReLU sits
    right before a BatchNorm, whose running variance is then learnt on dropped-out activations
    (inflated by the 1/(1-p) rescaling) and no longer matches the activations at test time, when
    Dropout is off: the "variance shift" of Li et al. (CVPR 2019). On the mini-SD it costs the
    regularised ensemble up to 1.6 mIoU points and most of its foreground (docs/results.md). Re-estimating the
    statistics (as SWA's ``update_bn`` does) fixes that without touching a weight. Pixels are drawn
    with ``seed`` from the store's labelled ones; returns how many were used.
    """
    valid = store.valid_pixels()
    if valid.size < 2:
        raise ValueError("the feature store has fewer than 2 labelled pixels: nothing to re-estimate on")
    pixels = valid[np.random.default_rng(seed).permutation(valid.size)[:num_pixels]]
    norms = [m for model in models for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    momenta = [m.momentum for m in norms]
    for model in models:
        model.eval()  # Dropout off
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
        m.train()
    try:
        for b in range(0, pixels.size, batch_size):
            sel = np.sort(pixels[b : b + batch_size])
            if sel.size < 2:
                continue
            x, _ = store.batch(sel)
            for model in models:
                model(x)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        for model in models:
            model.eval()
    return int(pixels.size)


def _save_state(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


def fit_ddpm_seg(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    class_names: Sequence[str],
    features: FeatureConfig | FeatureSource,
    cfg: EnsembleTrainConfig | None = None,
    work_dir: str | os.PathLike | None = None,
    palette: Sequence[Sequence[int]] | None = None,
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
    feature_config: FeatureConfig | None = None,
) -> DDPMSegPipeline:
    """Features of the labelled images → store → ensemble → a ready :class:`DDPMSegPipeline`.

    ``features``: a :class:`FeatureConfig`, or an already built source (then pass its
    ``feature_config`` too so the pipeline can be saved and the store reused). ``work_dir`` holds the
    feature store and finished MLPs (a rerun resumes); ``None`` keeps them in RAM.
    """
    cfg = cfg or EnsembleTrainConfig()
    source, feat_cfg = _as_source(features, feature_config)
    if len(images) != len(labels) or not len(images):
        raise ValueError(
            f"need the same non-zero number of images and labels, got {len(images)} and {len(labels)}"
        )
    store = labelled_feature_store(images, labels, source, feat_cfg, cfg, work_dir, progress)
    cache = work_dir if store.fingerprint else None
    ensemble, stats = train_ensemble(store, len(class_names), cfg, cache, progress)
    training = {"recipe": asdict(cfg), "num_labelled": len(images), "stored_images": store.num_images,
                "feature_channels": store.channels, "models": stats, **(provenance or {})}  # fmt: skip
    return DDPMSegPipeline(source, ensemble, list(class_names), feat_cfg, palette, training=training)


def labelled_feature_store(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    source: FeatureSource,
    feature_config: FeatureConfig | None,
    cfg: EnsembleTrainConfig,
    work_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> FeatureStore:
    """The features of the labelled images (augmented copies per ``cfg``) as :func:`fit_ddpm_seg`
    stores them: under ``work_dir``, named by the features, the images and the augmentation, so a
    rerun (or a later step on the same ensemble, e.g. :func:`recalibrate_batchnorm`) finds them."""
    fp = ""
    if feature_config is not None:
        fp = config_fingerprint(
            {
                "features": feature_config.to_dict(),
                "images": [_digest(a) for a in images],
                "labels": [_digest(a) for a in labels],
                "augment": [cfg.augment, cfg.augment_copies, cfg.augment_p, cfg.seed],
                "min_px": cfg.min_class_pixels,
            }
        )
    root = Path(work_dir) / f"store_{fp}" if work_dir is not None and fp else None
    return build_feature_store(
        source, images, labels, root, augment=cfg.augment, augment_copies=cfg.augment_copies,
        augment_p=cfg.augment_p, min_class_pixels=cfg.min_class_pixels, seed=cfg.seed,
        fingerprint=fp, progress=progress,
    )  # fmt: skip


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()[:12]


# ============================================================================ datasets on disk
def select_labelled(
    data_dir: str | os.PathLike, num_labels: int, seed: int = 0, split: str = "train"
) -> list[str]:
    """Ids of ``num_labels`` training scenes drawn with ``seed`` (the draw of the baselines benchmark)."""
    ann = Path(data_dir) / "ann_dir" / split
    ids = sorted(p.stem for p in ann.glob("*.png"))  # the order diffuseg.eval.load_split_samples uses
    if not ids:
        raise FileNotFoundError(
            f"{ann} holds no .png label maps: is {data_dir} a dataset in the mmseg layout?"
        )
    if num_labels < 1 or num_labels > len(ids):
        raise ValueError(f"num_labels must be in [1, {len(ids)}] for {data_dir}/{split}, got {num_labels}")
    idx = np.random.default_rng(seed).choice(len(ids), num_labels, replace=False)
    return [ids[i] for i in idx]


def load_labelled(
    data_dir: str | os.PathLike, ids: Sequence[str], split: str = "train"
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Images and label maps of the given ids from a dataset folder (mmseg layout)."""
    from diffuseg.io import list_images, read_image, read_label

    root = Path(data_dir)
    by_stem = {p.stem: p for p in list_images(root / "img_dir" / split)}
    missing = [i for i in ids if i not in by_stem]
    if missing:
        raise FileNotFoundError(f"{root}/img_dir/{split}: no image for ids {missing[:5]}")
    images = [read_image(by_stem[i]) for i in ids]
    labels = [read_label(root / "ann_dir" / split / f"{i}.png") for i in ids]
    return images, labels


def _fit_and_save(
    images: list[np.ndarray],
    labels: list[np.ndarray],
    meta: dict[str, Any],
    features: FeatureConfig | None,
    cfg: EnsembleTrainConfig,
    work: Path,
    prov: dict[str, Any],
    out: str | os.PathLike,
    embed_backbone: bool,
    tta: bool,
    progress: bool,
) -> DDPMSegPipeline:
    """Train and write the checkpoint while the work dir (feature store) still exists."""
    pipe = fit_ddpm_seg(
        images,
        labels,
        meta["classes"],
        features or FeatureConfig(),
        cfg,
        work,
        meta.get("palette"),
        prov,
        progress,
    )
    pipe.tta = tta
    pipe.save_pretrained(out, embed_backbone=embed_backbone)
    return pipe


def train_ddpm_seg_folder(
    data_dir: str | os.PathLike,
    num_labels: int,
    out: str | os.PathLike,
    features: FeatureConfig | None = None,
    cfg: EnsembleTrainConfig | None = None,
    seed: int = 0,
    work_dir: str | os.PathLike | None = None,
    embed_backbone: bool = False,
    tta: bool = False,
    evaluate_split: str | None = None,
    progress: bool = True,
    command: str | None = None,
) -> DDPMSegPipeline:
    """``diffuseg train ddpm-seg``: pick labelled scenes, train, save the pipeline to ``out``.

    ``command`` (the command line that ran this) is recorded in the config and the model card.
    ``tta`` stores test-time augmentation as the checkpoint's default. ``evaluate_split`` (e.g.
    ``"val"``) scores the result on that split of ``data_dir`` and writes ``OUT/eval_<split>.json``
    and the numbers into the model card (needs ``ddpm-seg`` in the methods registry).
    """
    from diffuseg.eval.runner import load_meta

    meta = load_meta(data_dir)
    cfg = cfg or EnsembleTrainConfig(seed=seed)
    ids = select_labelled(data_dir, num_labels, seed)
    images, labels = load_labelled(data_dir, ids)
    prov = {"data": str(data_dir), "labelled_ids": ids, "selection_seed": seed, "dataset": meta.get("name")}
    if command:
        prov["command"] = command
    with tempfile.TemporaryDirectory(prefix="ddpm-seg-") as tmp:  # never inside the checkpoint folder
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        pipe = _fit_and_save(
            images, labels, meta, features, cfg, work, prov, out, embed_backbone, tta, progress
        )
    if evaluate_split:
        from diffuseg.methods.evaluate import evaluate_pipeline

        report = evaluate_pipeline(
            pipe, "ddpm-seg", data_dir, evaluate_split, json_out=Path(out) / f"eval_{evaluate_split}.json",
            progress=progress,
        )  # fmt: skip
        from diffuseg.train.model_card import sample_picture

        sample = sample_picture(out, pipe, data_dir, pipe.class_names, split=evaluate_split)
        pipe.save_pretrained(out, evaluation=report, sample=sample)
    return pipe
