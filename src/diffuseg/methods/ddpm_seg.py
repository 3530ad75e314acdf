"""DDPM-Segmentation (Baranchuk et al., ICLR 2022): pixel classifiers on diffusion-UNet features.

image → ``x_t = q(x_t | x_0)`` at a few timesteps with **one shared noise tensor** → decoder
activations of chosen UNet blocks → bilinear upsampling to the pixel grid → an ensemble of 10
MLPs per pixel → per-model argmax, mode over models; uncertainty = Jensen–Shannon divergence of
the ensemble per pixel (and the mean of its top 10% per image).

What differs from the original is *where the pixels' features live*. The original materialises
``num_pixels × channels`` float32 (≈ 210 GB for 50 images at 256²); here activations are kept
at the UNet's native resolutions (channel-last float16, on disk during training) and the
bilinear upsampling is applied per batch of pixels with four taps per map
(:class:`PixelGatherer`), which is exactly ``F.interpolate(..., "bilinear")`` at those pixels.
Training and inference share that code, so a pixel's feature vector is bit-identical in both.

Feature sources (all ``maps(x) -> list of (B, C, h, w)`` for images ``x`` in [-1, 1]):

* :class:`DiffusionFeatures` — a :class:`~diffuseg.backbones.latent.LatentDiffusionBackbone`
  (mini-SD, Stable Diffusion; empty-prompt conditioning) or a pixel-space diffusers
  ``UNet2DModel`` + scheduler;
* :class:`ImageNetFeatures` — EfficientNet-Lite0 (the paper's MAE/SwAV comparison);
* :class:`RGBXYFeatures` — the colour + position floor.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffuseg.io import atomic_write
from diffuseg.methods.base import check_images, parse_classes
from diffuseg.outputs import SegmentationOutput
from diffuseg.utils import dataclass_from_dict

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME",
    "DDPMSegPipeline",
    "DiffusionFeatures",
    "FeatureConfig",
    "FeatureSource",
    "ImageNetFeatures",
    "MINI_SD_FEATURES",
    "PixelEnsemble",
    "PixelGatherer",
    "PixelMLP",
    "RGBXYFeatures",
    "SD_FEATURES",
    "TTA_VIEWS",
    "apply_view",
    "build_feature_source",
    "combine_logits",
    "ensemble_predict",
    "group_maps",
    "image_uncertainty",
    "model_card",
    "invert_view",
    "load_feature_backbone",
    "merge_views",
]

CONFIG_NAME = "config.json"
ENSEMBLE_DIR = "ensemble"
ENSEMBLE_WEIGHTS = "model.safetensors"
EMBEDDED_BACKBONE = "backbone"
DEFAULT_CHECKPOINT = "ddpm-seg"
FEATURE_KINDS = ("diffusion", "unet2d", "efficientnet-lite0", "rgbxy")
RANDOM_PREFIX = "random:"
FP16_MAX = 65504.0
FEATURE_CHUNK_BYTES = 32 * 1024**2
"""Budget for the float32 features of one chunk of pixels at inference (``chunk_pixels=None``)."""

MINI_SD_FEATURES: dict[str, Any] = {
    "layers": ["up_blocks.0", "up_blocks.1", "up_blocks.2"],
    "timesteps": [50, 150, 250],
}
"""Defaults for the embedded mini-SD: every decoder block (192 ch at 8², 128 and 64 ch at 16² for 64-px
scenes) at the paper's first three timesteps → 1,152 channels. ``benchmarks/ddpmseg_fashion.py --sweep``
measures other block × timestep choices on FashionScenes."""

SD_FEATURES: dict[str, Any] = {
    "layers": ["up_blocks.1", "up_blocks.2"],
    "timesteps": [50, 150, 250],
    "resolution": 512,
}
"""Suggested defaults for Stable Diffusion 1.x/2.x at 512 px: the two middle decoder blocks (1280 ch at
32², 640 ch at 64² — the analogue of guided diffusion's middle output blocks 5–8 the paper reads) at the
paper's timesteps → 5,760 channels. Not measured here (no SD weights offline)."""


# ============================================================================ feature sources
class FeatureSource(Protocol):
    """Anything that turns images into a list of feature maps."""

    resolution: int  # side of the square pixel grid the images are preprocessed to

    def maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, R, R)`` in [-1, 1] → list of ``(B, C_i, h_i, w_i)``."""
        ...

    def to(self, device: str | torch.device) -> FeatureSource: ...


@dataclass
class FeatureConfig:
    """Which features a DDPM-Segmentation model reads; stored in the checkpoint's ``config.json``.

    ``kind``: ``diffusion`` (latent diffusion backbone: ``backbone`` is a folder / hub id, ``None`` for
    the shipped mini-SD, or ``random:mini-sd`` for a randomly initialised copy — the control),
    ``unet2d`` (a pixel-space diffusers DDPM folder with ``unet/`` and ``scheduler/``),
    ``efficientnet-lite0`` (ImageNet features; ``backbone="random:"`` gives a random-init encoder) or
    ``rgbxy`` (colour + position). ``resolution``: the pixel grid (``None``: the backbone's processing
    resolution, 64 for the non-diffusion kinds).
    """

    kind: str = "diffusion"
    backbone: str | None = None
    layers: list[str] = field(default_factory=lambda: list(MINI_SD_FEATURES["layers"]))
    timesteps: list[int] = field(default_factory=lambda: list(MINI_SD_FEATURES["timesteps"]))
    noise_seed: int = 0
    resolution: int | None = None
    prompt: str = ""
    init_seed: int = 0
    imagenet_blocks: list[int] | None = None
    imagenet_input_size: int | None = 224

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"features.kind must be one of {FEATURE_KINDS}, got {self.kind!r}")
        if self.kind in ("diffusion", "unet2d") and (not self.layers or not self.timesteps):
            raise ValueError("diffusion features need at least one layer and one timestep")
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"features.resolution must be ≥ 8 px, got {self.resolution}")
        self.layers = [str(x) for x in self.layers]
        self.timesteps = [int(t) for t in self.timesteps]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureConfig:
        return dataclass_from_dict(cls, d, "feature")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DiffusionFeatures:
    """Decoder activations of a diffusion UNet (DDPM-Segmentation's features).

    Give either ``backbone`` (latent diffusion: images are VAE-encoded, the UNet is conditioned on
    the embedding of ``prompt`` — the empty prompt by default, i.e. unconditional features) or
    ``unet`` + ``scheduler`` of a pixel-space ``UNet2DModel`` (images are the UNet's input).
    """

    def __init__(
        self,
        layers: Sequence[str],
        timesteps: Sequence[int],
        backbone=None,
        unet: nn.Module | None = None,
        scheduler=None,
        noise_seed: int = 0,
        resolution: int | None = None,
        prompt: str = "",
    ) -> None:
        from diffuseg.backbones.features import UNetFeatureExtractor

        if (backbone is None) == (unet is None):
            raise ValueError("DiffusionFeatures: give a latent diffusion backbone or a UNet2DModel, not both")
        if unet is not None and scheduler is None:
            raise ValueError("DiffusionFeatures: a pixel-space UNet needs its scheduler (q(x_t | x_0))")
        self.backbone, self.prompt = backbone, prompt
        net = backbone.unet if backbone is not None else unet
        sched = backbone.scheduler if backbone is not None else scheduler
        self.extractor = UNetFeatureExtractor(net, sched, layers, timesteps, noise_seed=noise_seed)
        if resolution is None:
            resolution = (
                int(backbone.config.processing_res) if backbone is not None else int(net.config.sample_size)
            )
        if backbone is not None and resolution % backbone.vae_scale_factor:
            raise ValueError(
                f"resolution {resolution} must be a multiple of the VAE factor {backbone.vae_scale_factor}"
            )
        self.resolution = int(resolution)
        self.unet = net

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: str | torch.device) -> DiffusionFeatures:
        (self.backbone if self.backbone is not None else self.unet).to(device)
        return self

    @torch.no_grad()
    def maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images.to(self.device, next(self.unet.parameters()).dtype)
        if self.backbone is None:
            return self.extractor(x)
        latents = self.backbone.encode_image(x, processing_res=self.resolution)
        text = self.backbone.encode_text([self.prompt] * x.shape[0])
        return self.extractor(latents, text)


class ImageNetFeatures:
    """EfficientNet-Lite0 stage outputs (:class:`diffuseg.backbones.imagenet.EfficientNetLite0Features`)."""

    def __init__(self, resolution: int, encoder: nn.Module) -> None:
        self.resolution, self.encoder = int(resolution), encoder

    def to(self, device: str | torch.device) -> ImageNetFeatures:
        self.encoder.to(device)
        return self

    @torch.no_grad()
    def maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder(images.to(next(self.encoder.parameters()).device))


class RGBXYFeatures:
    """Colour and position of each pixel (5 channels): the floor any learned feature must clear."""

    def __init__(self, resolution: int) -> None:
        self.resolution = int(resolution)

    def to(self, device: str | torch.device) -> RGBXYFeatures:
        return self

    def maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        b, _, h, w = images.shape
        ys = torch.linspace(-1, 1, h).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w).view(1, 1, 1, w).expand(b, 1, h, w)
        return [torch.cat([images.float().cpu(), xs, ys], dim=1)]


def load_feature_backbone(spec: str | None, init_seed: int = 0):
    """A latent diffusion backbone: shipped default, folder / hub id, or ``random:<preset>``."""
    from diffuseg.backbones.latent import LatentDiffusionBackbone

    if spec is not None and spec.startswith(RANDOM_PREFIX):
        from diffuseg.backbones.presets import MINI_SD, build_backbone

        preset = spec[len(RANDOM_PREFIX) :]
        if preset != "mini-sd":
            raise ValueError(f"unknown random backbone preset {preset!r}; use 'random:mini-sd'")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            return build_backbone(MINI_SD).eval().requires_grad_(False)
    return LatentDiffusionBackbone.from_pretrained(spec)


def _load_unet2d(spec: str | None):
    from diffusers import DDPMScheduler, UNet2DModel

    if spec is None:
        raise ValueError("features.kind='unet2d' needs features.backbone: a diffusers DDPM folder or hub id")
    try:
        unet = UNet2DModel.from_pretrained(spec, subfolder="unet")
        sched = DDPMScheduler.from_pretrained(spec, subfolder="scheduler")
    except OSError as e:
        raise FileNotFoundError(
            f"{spec}: expected a diffusers DDPM folder with unet/ and scheduler/ ({e})"
        ) from e
    return unet.eval().requires_grad_(False), sched


def build_feature_source(config: FeatureConfig, backbone=None) -> FeatureSource:
    """Instantiate the source a :class:`FeatureConfig` describes.

    ``backbone``: an already loaded latent diffusion backbone to use instead of loading
    ``config.backbone`` (kind ``diffusion`` only; lets several sources share one model).
    """
    if config.kind == "rgbxy":
        return RGBXYFeatures(config.resolution or 64)
    if config.kind == "efficientnet-lite0":
        from diffuseg.backbones.imagenet import EFFICIENTNET_LITE0_STAGE_ENDS, EfficientNetLite0Features

        enc = EfficientNetLite0Features(
            blocks=config.imagenet_blocks or EFFICIENTNET_LITE0_STAGE_ENDS,
            input_size=config.imagenet_input_size,
            pretrained=not (config.backbone or "").startswith(RANDOM_PREFIX),
        )
        return ImageNetFeatures(config.resolution or 64, enc)
    if config.kind == "unet2d":
        unet, sched = _load_unet2d(config.backbone)
        return DiffusionFeatures(
            config.layers, config.timesteps, unet=unet, scheduler=sched,
            noise_seed=config.noise_seed, resolution=config.resolution,
        )  # fmt: skip
    bb = backbone if backbone is not None else load_feature_backbone(config.backbone, config.init_seed)
    return DiffusionFeatures(
        config.layers, config.timesteps, backbone=bb, noise_seed=config.noise_seed,
        resolution=config.resolution, prompt=config.prompt,
    )  # fmt: skip


# ============================================================================ pixel features
def group_maps(maps: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Maps → one channel-last float16 array ``(B, h, w, C_g)`` per distinct resolution.

    Maps of equal size are concatenated (in their order) so that one fancy-index gathers them all;
    groups follow the order in which their resolution first appears. float16 halves storage and is
    applied at inference too, so training and prediction see the same numbers.
    """
    order: list[tuple[int, int]] = []
    by_size: dict[tuple[int, int], list[torch.Tensor]] = {}
    for m in maps:
        if m.ndim != 4:
            raise ValueError(f"feature maps must be (B, C, h, w), got {tuple(m.shape)}")
        key = (int(m.shape[-2]), int(m.shape[-1]))
        if key not in by_size:
            order.append(key)
            by_size[key] = []
        by_size[key].append(m)
    out = []
    for key in order:
        cat = torch.cat([m.detach().float().cpu() for m in by_size[key]], dim=1)
        if cat.abs().max() > FP16_MAX:  # e.g. SD 2.x activations: saturate rather than store inf
            logger.warning("feature values beyond the float16 range were clipped to ±%g", FP16_MAX)
            cat = cat.clamp(-FP16_MAX, FP16_MAX)
        out.append(cat.permute(0, 2, 3, 1).contiguous().to(torch.float16).numpy())
    return out


def _bilinear_taps(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weight of ``F.interpolate(mode="bilinear", align_corners=False)`` along one axis."""
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, w1


class PixelGatherer:
    """Upsampled feature vectors of chosen pixels, without upsampling whole maps.

    For group shapes ``[(h, w, C), ...]`` and an output grid of ``size × size``, :meth:`gather`
    returns the concatenated bilinear interpolation at pixels ``(n, y, x)`` — four taps per group.
    """

    def __init__(self, group_shapes: Sequence[tuple[int, int, int]], size: int) -> None:
        if size < 1:
            raise ValueError(f"output size must be ≥ 1, got {size}")
        self.size = int(size)
        self.shapes = [tuple(int(v) for v in s) for s in group_shapes]
        self.taps = [(_bilinear_taps(size, h), _bilinear_taps(size, w)) for h, w, _ in self.shapes]
        self.channels = sum(c for _, _, c in self.shapes)

    def gather(
        self, groups: Sequence[np.ndarray], n: np.ndarray, ys: np.ndarray, xs: np.ndarray
    ) -> torch.Tensor:
        """``(P, C)`` float32 features of pixels ``(n[i], ys[i], xs[i])`` (indices into the output grid).

        One fancy index per group reads the four taps as float16; the conversion to float32 and the
        weighted sum run in torch (numpy's float16 conversion is ~10× slower), one tap at a time so
        the temporaries stay at ``P × C``.
        """
        p = len(n)
        out = torch.empty(p, self.channels)
        col = 0
        nn4 = np.concatenate([n, n, n, n])
        for g, ((y0, y1, wy), (x0, x1, wx)) in zip(groups, self.taps, strict=True):
            yy0, yy1, ly = y0[ys], y1[ys], torch.from_numpy(wy[ys])[:, None]
            xx0, xx1, lx = x0[xs], x1[xs], torch.from_numpy(wx[xs])[:, None]
            rows = np.concatenate([yy0, yy0, yy1, yy1])
            cols = np.concatenate([xx0, xx1, xx0, xx1])
            v = torch.from_numpy(np.ascontiguousarray(g[nn4, rows, cols]))  # (4P, C_g) float16
            weights = ((1 - ly) * (1 - lx), (1 - ly) * lx, ly * (1 - lx), ly * lx)
            dst = out[:, col : col + v.shape[1]]
            dst.copy_(v[:p]).mul_(weights[0])
            for k in range(1, 4):
                dst.addcmul_(v[k * p : (k + 1) * p].float(), weights[k])
            col += v.shape[1]
        return out


# ============================================================================ classifier
def mlp_widths(num_classes: int) -> tuple[int, int]:
    """Hidden widths of the original pixel classifier: (128, 32), or (256, 128) from 30 classes on."""
    return (256, 128) if num_classes >= 30 else (128, 32)


class PixelMLP(nn.Module):
    """The original pixel classifier: Linear-ReLU-BN-Linear-ReLU-BN-Linear, N(0, 0.02) init.

    ``dropout > 0`` (the coursework improvement) inserts Dropout after each ReLU.
    """

    def __init__(self, in_dim: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        if in_dim < 1 or num_classes < 2:
            raise ValueError(f"PixelMLP needs in_dim ≥ 1 and ≥ 2 classes, got {in_dim}, {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        h1, h2 = mlp_widths(num_classes)
        drop = (lambda: [nn.Dropout(dropout)]) if dropout > 0 else (lambda: [])
        self.layers = nn.Sequential(
            nn.Linear(in_dim, h1), nn.ReLU(), *drop(), nn.BatchNorm1d(h1),
            nn.Linear(h1, h2), nn.ReLU(), *drop(), nn.BatchNorm1d(h2),
            nn.Linear(h2, num_classes),
        )  # fmt: skip

    def init_weights(self, generator: torch.Generator | None = None, gain: float = 0.02) -> PixelMLP:
        """N(0, gain) linear weights, zero biases; BatchNorm keeps its defaults, as in the original."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, gain, generator=generator)
                nn.init.zeros_(m.bias)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PixelEnsemble(nn.Module):
    """The ensemble of pixel MLPs (10 in the paper)."""

    def __init__(self, in_dim: int, num_classes: int, num_models: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        if num_models < 1:
            raise ValueError(f"num_models must be ≥ 1, got {num_models}")
        self.in_dim, self.num_classes, self.dropout = int(in_dim), int(num_classes), float(dropout)
        self.models = nn.ModuleList(PixelMLP(in_dim, num_classes, dropout) for _ in range(num_models))

    def config(self) -> dict[str, Any]:
        return {
            "in_dim": self.in_dim,
            "num_classes": self.num_classes,
            "num_models": len(self.models),
            "dropout": self.dropout,
        }

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return ensemble_predict(self.models, x)


def ensemble_predict(
    models: Sequence[nn.Module], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-model argmax → mode over models; JS divergence = H(mean p) − mean H(p_m).

    Returns ``(labels (P,), js (P,), mean_probs (P, K))``. Ties of the vote go to the smallest class id
    (``torch.mode``, as in the original).
    """
    return combine_logits([m(x) for m in models])


def combine_logits(logits: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ensemble's decision from each member's ``(P, K)`` logits (see :func:`ensemble_predict`)."""
    votes, probs_sum, ent_sum = [], None, None
    for lg in logits:
        logp = torch.log_softmax(lg.float(), dim=1)
        p = logp.exp()
        ent = -(p * logp).sum(1)
        votes.append(lg.argmax(1))
        probs_sum = p if probs_sum is None else probs_sum + p
        ent_sum = ent if ent_sum is None else ent_sum + ent
    mean_p = probs_sum / len(logits)
    mean_ent = -(mean_p * torch.log(mean_p.clamp_min(1e-30))).sum(1)
    js = (mean_ent - ent_sum / len(logits)).clamp_min(0.0)
    labels = torch.stack(votes, dim=1).mode(dim=1).values
    return labels, js, mean_p


def image_uncertainty(js: np.ndarray | torch.Tensor, top_fraction: float = 0.1) -> float:
    """Per-image uncertainty: the mean of the top ``top_fraction`` of per-pixel JS values (at least one)."""
    v = torch.as_tensor(js).flatten().float()
    k = max(1, int(v.numel() * top_fraction))
    return float(v.topk(k).values.mean())


# ============================================================================ test-time augmentation
TTA_VIEWS: tuple[str, ...] = ("identity", "hflip", "colour", "grey", "hflip+colour")
"""The five test-time views: the original, a flip, two photometric ones and a flip + photometric one."""


def apply_view(x: torch.Tensor, view: str) -> torch.Tensor:
    """Apply a deterministic TTA view to ``(B, 3, H, W)`` images in [-1, 1]."""
    if view not in TTA_VIEWS:
        raise ValueError(f"unknown TTA view {view!r}; views: {TTA_VIEWS}")
    if "colour" in view:  # +10% contrast around the image mean, +0.05 brightness
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * 1.1 + mean + 0.05).clamp(-1, 1)
    if view == "grey":
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x * w).sum(1, keepdim=True).expand_as(x).contiguous()
    if "hflip" in view:
        x = x.flip(-1)
    return x


def invert_view(t: torch.Tensor, view: str) -> torch.Tensor:
    """Map a prediction on a view back to the original geometry (only flips are geometric)."""
    return t.flip(-1) if "hflip" in view else t


# ============================================================================ pipeline
class DDPMSegPipeline:
    """DDPM-Segmentation: a feature source + a trained :class:`PixelEnsemble`.

    Example::

        pipe = DDPMSegPipeline.from_pretrained("runs/ddpm-seg-fashion")   # or None: shipped model
        out = pipe(images)                  # out.labels, out.uncertainty (JS per pixel)
        out.extras["image_uncertainty"]     # mean of the top-10% JS per image
        out = pipe(images, tta=True)        # 5-view majority vote

    Train one with :func:`diffuseg.train.ddpm_seg.fit_ddpm_seg` or ``diffuseg train ddpm-seg``.
    """

    def __init__(
        self,
        source: FeatureSource,
        ensemble: PixelEnsemble,
        class_names: Sequence[str],
        feature_config: FeatureConfig | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        tta: bool = False,
        batch_size: int = 8,
        chunk_pixels: int | None = None,
        training: dict[str, Any] | None = None,
    ) -> None:
        names = list(class_names)
        if len(names) != ensemble.num_classes:
            raise ValueError(f"{len(names)} class names for an ensemble of {ensemble.num_classes} classes")
        if batch_size < 1 or (chunk_pixels is not None and chunk_pixels < 1):
            raise ValueError("batch_size and chunk_pixels must be ≥ 1 (chunk_pixels=None: automatic)")
        self.source, self.ensemble = source, ensemble.eval().requires_grad_(False)
        self.class_names = names
        self.feature_config = feature_config
        self.palette = [list(map(int, c)) for c in palette] if palette is not None else None
        self.tta, self.batch_size, self.chunk_pixels = bool(tta), int(batch_size), chunk_pixels
        self.training = dict(training or {})
        self._gatherers: dict[tuple, PixelGatherer] = {}

    # ------------------------------------------------------------------ config / io
    @property
    def config(self) -> dict[str, Any]:
        """Pipeline defaults as stored in ``config.json`` (also recorded by ``diffuseg evaluate``)."""
        return {
            "_class_name": type(self).__name__,
            "features": self.feature_config.to_dict() if self.feature_config else None,
            "ensemble": self.ensemble.config(),
            "class_names": self.class_names,
            "palette": self.palette,
            "tta": self.tta,
            "batch_size": self.batch_size,
            "chunk_pixels": self.chunk_pixels,
            "resolution": self.source.resolution,
            "training": self.training,
        }

    def save_pretrained(
        self,
        out_dir: str | os.PathLike,
        embed_backbone: bool = False,
        evaluation: dict[str, Any] | None = None,
        sample: str | None = None,
    ) -> Path:
        """Write ``config.json`` + ``ensemble/model.safetensors`` + a model card ``README.md``.

        Without ``embed_backbone`` the checkpoint refers to its backbone by the path / hub id in
        ``features.backbone`` (``null``: the shipped mini-SD), so checkpoints stay a few MB.
        ``evaluation`` (a ``diffuseg evaluate`` report) is summarised in the card, and ``sample``
        (a picture's file name inside ``out_dir``) is shown in it.
        """
        from safetensors.torch import save_file

        if self.feature_config is None:
            raise ValueError(
                "save_pretrained needs the pipeline's feature_config (how to rebuild the features)"
            )
        out = Path(out_dir)
        (out / ENSEMBLE_DIR).mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.ensemble.state_dict().items()}
        tmp = out / ENSEMBLE_DIR / f".{ENSEMBLE_WEIGHTS}.tmp"
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / ENSEMBLE_DIR / ENSEMBLE_WEIGHTS)
        if embed_backbone:
            self._embed_backbone(out / EMBEDDED_BACKBONE)
        with atomic_write(out / CONFIG_NAME, "w") as f:
            json.dump(self.config, f, indent=2)
        with atomic_write(out / "README.md", "w") as f:
            f.write(model_card(self, evaluation, sample))
        return out

    def _embed_backbone(self, dest: Path) -> None:
        bb = getattr(self.source, "backbone", None)
        if bb is None:
            raise ValueError("embed_backbone: only latent diffusion features have a backbone to embed")
        if dest.exists():
            shutil.rmtree(dest)
        bb.save_pretrained(dest)

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | os.PathLike | None = None,
        backbone: str | None = None,
        device: str | torch.device | None = None,
        source: FeatureSource | None = None,
        **overrides: Any,
    ) -> DDPMSegPipeline:
        """Load a checkpoint folder (``None``: the shipped FashionScenes model).

        ``backbone`` overrides the feature backbone (a folder / hub id); ``source`` passes an already
        built feature source instead (e.g. to share a loaded backbone between checkpoints);
        ``overrides`` set pipeline defaults (``tta``, ``batch_size``, ``chunk_pixels``).
        """
        from safetensors.torch import load_file

        from diffuseg.backbones.latent import default_checkpoint_dir

        root = Path(checkpoint) if checkpoint is not None else default_checkpoint_dir(DEFAULT_CHECKPOINT)
        cfg_path = root / CONFIG_NAME
        if not cfg_path.is_file():
            raise FileNotFoundError(
                f"{root} is not a DDPM-Segmentation checkpoint (no {CONFIG_NAME}); train one with "
                "`diffuseg train ddpm-seg --data DIR --num-labels N --out CKPT`"
            )
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("_class_name") != cls.__name__:
            raise ValueError(f"{cfg_path} describes a {cfg.get('_class_name')!r}, not a {cls.__name__}")
        feat = FeatureConfig.from_dict(cfg["features"])
        if backbone is not None:
            feat.backbone = str(backbone)
        elif (root / EMBEDDED_BACKBONE).is_dir():
            feat.backbone = str(root / EMBEDDED_BACKBONE)
        ens_cfg = cfg["ensemble"]
        ensemble = PixelEnsemble(
            ens_cfg["in_dim"], ens_cfg["num_classes"], ens_cfg["num_models"], ens_cfg.get("dropout", 0.0)
        )
        ensemble.load_state_dict(load_file(str(root / ENSEMBLE_DIR / ENSEMBLE_WEIGHTS)))
        unknown = sorted(set(overrides) - {"tta", "batch_size", "chunk_pixels"})
        if unknown:
            raise ValueError(f"unknown DDPMSegPipeline settings {unknown}; use tta, batch_size, chunk_pixels")
        settings = {k: cfg[k] for k in ("tta", "batch_size", "chunk_pixels") if k in cfg}
        settings.update({k: v for k, v in overrides.items() if v is not None})
        src = source if source is not None else build_feature_source(feat)
        pipe = cls(
            src,
            ensemble,
            cfg["class_names"],
            feat,
            cfg.get("palette"),
            training=cfg.get("training"),
            **settings,
        )
        return pipe.to(device) if device is not None else pipe

    def to(self, device: str | torch.device) -> DDPMSegPipeline:
        self.source.to(device)
        self.ensemble.to(device)
        return self

    # ------------------------------------------------------------------ steps
    def check_inputs(self, images: Any, class_names: Any, output_size: int | None) -> list[np.ndarray]:
        """Validate a call; every error says what to pass instead."""
        imgs = check_images(images)
        names = parse_classes(class_names)
        if names is not None and names != self.class_names:
            raise ValueError(
                f"this DDPM-Segmentation model was trained for the classes {self.class_names}; "
                f"got {names}. Pass class_names=None (or exactly those), or train a model for your classes."
            )
        if output_size is not None and int(output_size) < 1:
            raise ValueError(f"output_size must be a positive side length, got {output_size}")
        return imgs

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 images → ``(B, 3, R, R)`` in [-1, 1] (centre crop, resize to the feature resolution)."""
        from diffuseg.backbones.latent import preprocess_images

        return preprocess_images(list(images), self.source.resolution)

    def _first_layer(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The members' first linear layers stacked: ``W (M·h1, C)``, ``b (M·h1,)``."""
        first = [m.layers[0] for m in self.ensemble.models]
        w = torch.cat([lin.weight for lin in first])
        if w.shape[1] != channels:
            raise ValueError(
                f"the features have {channels} channels but the ensemble expects {w.shape[1]}: "
                "the backbone or its layers/timesteps differ from the ones it was trained on"
            )
        return w, torch.cat([lin.bias for lin in first])

    @torch.no_grad()
    def _project(self, groups: Sequence[np.ndarray], w: torch.Tensor) -> list[np.ndarray]:
        """Apply every member's first layer to each group at its native resolution → float32 maps.

        Read-only (memory-mapped) groups are copied one group at a time: torch cannot wrap them.
        """
        out, col = [], 0
        for g in groups:
            b, h, wd, c = g.shape
            f = torch.from_numpy(np.require(g, requirements=("C", "W"))).reshape(-1, c).to(w.device).float()
            out.append((f @ w[:, col : col + c].T).reshape(b, h, wd, -1).cpu().numpy())
            col += c
        return out

    @torch.no_grad()
    def classify_groups(
        self, groups: Sequence[np.ndarray], size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Classify every pixel of a ``size × size`` grid from grouped maps, in memory-bounded chunks.

        The MLPs' first layer is linear and bilinear weights sum to one, so it commutes with the
        upsampling: the first layers of all members are applied to the *native-resolution* maps and
        only their ``M × 128`` outputs are upsampled — the same numbers (up to float rounding) as
        upsampling the features first, for a fraction of the work and memory at large output sizes.
        Returns ``labels (B, S, S)``, ``js (B, S, S)``, ``probs (B, K, S, S)``.
        """
        models = list(self.ensemble.models)
        w, bias = self._first_layer(sum(int(g.shape[-1]) for g in groups))
        projected = self._project(groups, w)
        key = (tuple(p.shape[1:] for p in projected), size)
        if key not in self._gatherers:
            self._gatherers[key] = PixelGatherer(key[0], size)
        gath = self._gatherers[key]
        b, total, ng, width = groups[0].shape[0], groups[0].shape[0] * size * size, len(groups), w.shape[0]
        h1 = width // len(models)
        labels, js = torch.empty(total, dtype=torch.long), torch.empty(total)
        probs = torch.empty(total, self.ensemble.num_classes)
        chunk = self.chunk_pixels or max(256, FEATURE_CHUNK_BYTES // (4 * gath.channels))
        for start in range(0, total, chunk):
            stop = min(total, start + chunk)
            n, rem = np.divmod(np.arange(start, stop), size * size)
            ys, xs = np.divmod(rem, size)
            z = gath.gather(projected, n, ys, xs).view(stop - start, ng, width).sum(1).to(w.device) + bias
            logits = [m.layers[1:](z[:, i * h1 : (i + 1) * h1]) for i, m in enumerate(models)]
            lab, j, p = combine_logits(logits)
            labels[start:stop], js[start:stop], probs[start:stop] = lab.cpu(), j.cpu(), p.cpu()
        k = self.ensemble.num_classes
        return (
            labels.view(b, size, size),
            js.view(b, size, size),
            probs.view(b, size, size, k).permute(0, 3, 1, 2),
        )

    def predict_view(self, x: torch.Tensor, view: str, size: int) -> tuple[torch.Tensor, ...]:
        """Features → ensemble for one TTA view, mapped back to the original geometry."""
        groups = group_maps(self.source.maps(apply_view(x, view)))
        labels, js, probs = self.classify_groups(groups, size)
        return invert_view(labels, view), invert_view(js, view), invert_view(probs, view)

    def __call__(
        self,
        images: Any,
        class_names: Sequence[str] | str | None = None,
        output_size: int | None = None,
        tta: bool | None = None,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> SegmentationOutput:
        """Segment images into the trained classes.

        Args:
            images: uint8 ``(H, W, 3)`` array(s); centre-cropped to a square.
            class_names: ``None`` or exactly the trained classes (a closed-set model).
            output_size: side of the returned maps (default: the feature resolution). Features are
                upsampled straight to this grid, as the original upsamples them to the image size.
            tta: majority vote over the 5 views of :data:`TTA_VIEWS` (default: the checkpoint's).
            generator: accepted for the common pipeline interface; prediction is deterministic (the
                shared noise is part of the trained model).
            batch_size: images per backbone pass.
        Returns:
            ``labels`` (B, S, S), ``scores`` = ensemble-mean probabilities (B, K, S, S),
            ``uncertainty`` = per-pixel JS divergence, ``extras["image_uncertainty"]`` per image.
        """
        from tqdm.auto import tqdm

        del generator  # deterministic: see docstring
        # 1. check inputs
        imgs = self.check_inputs(images, class_names, output_size)
        use_tta = self.tta if tta is None else bool(tta)
        views = TTA_VIEWS if use_tta else TTA_VIEWS[:1]
        size = int(output_size or self.source.resolution)
        bs = int(batch_size or self.batch_size)
        results: list[tuple[torch.Tensor, ...]] = []
        for start in tqdm(range(0, len(imgs), bs), desc="ddpm-seg", disable=not progress):
            # 2. preprocess (centre crop, resize to the feature resolution)
            x = self.preprocess(imgs[start : start + bs])
            # 3. features → ensemble, per view; 4. majority vote over views
            per_view = [self.predict_view(x, v, size) for v in views]
            results.append(merge_views(per_view))
        labels, js, probs, agree = (torch.cat([r[i] for r in results]) for i in range(4))
        extras: dict[str, Any] = {"image_uncertainty": [image_uncertainty(j) for j in js]}
        if use_tta:
            extras["tta_agreement"] = agree.numpy()
        return SegmentationOutput(
            labels=labels.numpy().astype(np.int64),
            scores=probs.numpy().astype(np.float32),
            uncertainty=js.numpy().astype(np.float32),
            class_names=list(self.class_names),
            extras=extras,
        )


def model_card(
    pipe: DDPMSegPipeline, evaluation: dict[str, Any] | None = None, sample: str | None = None
) -> str:
    """A short model card: what the checkpoint is, how it was trained, and (if given) how it scores."""
    t, f = pipe.training, pipe.feature_config
    recipe = t.get("recipe", {})
    lines = [
        "# DDPM-Segmentation checkpoint (diffuseg)",
        "",
        "Pixel-classifier ensemble on diffusion-UNet features (Baranchuk et al., ICLR 2022). Load with "
        "`DDPMSegPipeline.from_pretrained(<this folder>)` or `diffuseg segment --method ddpm-seg "
        "--checkpoint <this folder>`.",
        "",
        f"- classes ({len(pipe.class_names)}): {', '.join(pipe.class_names)}",
        f"- features: {f.kind if f else '?'}; backbone `{(f.backbone if f else None) or 'shipped mini-SD'}`; "
        f"blocks {f.layers if f else '?'}; timesteps {f.timesteps if f else '?'}; "
        f"{pipe.ensemble.in_dim} channels per pixel at {pipe.source.resolution}×{pipe.source.resolution}",
        f"- ensemble: {len(pipe.ensemble.models)} MLPs; optimizer {recipe.get('optimizer', '?')}, "
        f"dropout {pipe.ensemble.dropout}, augmentation {'on' if recipe.get('augment') else 'off'}; "
        f"TTA by default: {pipe.tta}",
        f"- training data: {t.get('num_labelled', '?')} labelled images from `{t.get('data', '?')}` "
        f"(selection seed {t.get('selection_seed', '?')}), {t.get('stored_images', '?')} after augmentation",
    ]
    if t.get("command"):
        lines.append(f"- command: `{t['command']}`")
    if evaluation:
        m = evaluation.get("metrics", {})
        shown = ", ".join(f"{k} {v:.1f}" for k, v in m.items() if isinstance(v, (int, float)))
        lines += ["", f"Evaluation on `{evaluation.get('dataset')}` / {evaluation.get('split')} "
                  f"({evaluation.get('num_images')} images): {shown}"]  # fmt: skip
    if sample:
        lines += ["", "Image | ground truth | prediction | ensemble disagreement (JS) on the first scenes "
                  "of the evaluated split:", "", f"![sample]({sample})"]  # fmt: skip
    return "\n".join(lines) + "\n"


def merge_views(per_view: Sequence[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Majority vote of the views' labels (ties: the first view, the un-augmented image, wins).

    Probabilities and JS are averaged over views; ``agreement`` is the share of views voting for
    the final label.
    """
    labels = torch.stack([v[0] for v in per_view])  # (V, B, S, S)
    if len(per_view) == 1:
        return labels[0], per_view[0][1], per_view[0][2], torch.ones(labels.shape[1:])
    k = per_view[0][2].shape[1]
    counts = F.one_hot(labels, k).sum(0).float()  # (B, S, S, K)
    counts += 0.5 * F.one_hot(labels[0], k).float()  # tie-break towards the identity view
    vote = counts.argmax(-1)
    agreement = (labels == vote[None]).float().mean(0)
    js = torch.stack([v[1] for v in per_view]).mean(0)
    probs = torch.stack([v[2] for v in per_view]).mean(0)
    return vote, js, probs, agreement
