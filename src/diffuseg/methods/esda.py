"""ESDA: zero-shot segmentation with a frozen encoder, trainable blocks and a vision-language interactor.

"Embedding Semantic Space Distribution Adjustment" (Jiaguang-NEU/ESDA) segments the object a class
name refers to, for class names never seen in training. Everything pretrained stays frozen; what
trains is small and wired around it:

1. **Trainable blocks** — a low-rank adapter after every encoder stage,
   ``x ← stage(x) + (x·P1)·P2`` with ``P2 = 0`` at the start (so training starts from the
   pretrained features), and **text injection**: the projected text [CLS] embedding replaces the
   image CLS token before ViT layers 2–4 (for a CNN: FiLM of the stage-2–4 inputs by the same
   projected embedding, zero-initialised).
2. **Prior map** — cosine similarity between the last features and the projected text embedding,
   min-max normalised per image.
3. **Vision-language embedding interactor** — a 2-layer transformer over
   ``[text CLS, text tokens, fused CLS, patch tokens]`` (each layer: one block over everything,
   one over the patches, one over the text part), then a conv head on ``[patches ; prior]``
   (3 convs, 1×1 → 2 classes) upsampled to the input.
4. **Spatial distribution losses** — CE on the output + 0.2·CE on the text prior map + 0.1·CE on
   intermediate prior maps (cosine similarity of each stage's features to the ground-truth
   foreground prototype). The prior map is foreground evidence, so its logits are
   ``[1 - p, p]``; the original code passes ``[p, 1 - p]`` (background = high similarity), which
   trains the prior to mark the background. We fix the sign; see docs/methods.md.

:class:`ESDAModel` holds the trainable parts (saved as a diffusers-style folder: ``config.json`` +
safetensors) and refers to the frozen encoder by name. :class:`ESDAPipeline` adds the text encoder
and the two protocols: ``mode="binary"`` (a named class vs background, the episodic protocol) and
``mode="semantic"`` (all names at once, argmax over per-class log-odds with background at 0).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import Tensor, nn

from diffuseg.backbones.encoders import FrozenImageEncoder, build_image_encoder
from diffuseg.methods.base import check_images, parse_classes
from diffuseg.outputs import SegmentationOutput

logger = logging.getLogger(__name__)

__all__ = [
    "BACKGROUND_NAMES",
    "ESDAModel",
    "ESDAOutput",
    "ESDAPipeline",
    "TextFeatures",
    "VARIANTS",
    "encode_class_texts",
    "esda_loss",
]

IGNORE_INDEX = 255
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
BACKGROUND_NAMES = ("background", "_background_", "bg", "backdrop")
"""Class names that mean "no object": they take the background slot in semantic mode."""

VARIANTS: dict[str, dict[str, Any]] = {
    "esda": {},
    "no-adapters": {"use_adapters": False},
    "no-interactor": {"use_interactor": False},
    "no-text-injection": {"inject_text": False},
    "no-distribution-losses": {"loss_weights": [1.0, 0.0, 0.0]},
    "clsclip": {
        "use_adapters": False,
        "inject_text": False,
        "use_interactor": False,
        "loss_weights": [1.0, 0.0, 0.0],
    },
}
"""Model-config overrides of the ablations and the ClsCLIP-like baseline (frozen encoder, text-projected
similarity map + the conv head; nothing inside the encoder, no interactor, main loss only)."""


# ------------------------------------------------------------------------------------ text inputs


@dataclass
class TextFeatures:
    """Frozen text encodings of class names: pooled [CLS] ``(K, Dt)``, tokens ``(K, L, Dtok)``, mask."""

    cls: Tensor
    tokens: Tensor
    mask: Tensor

    def index(self, idx: Tensor) -> TextFeatures:
        return TextFeatures(self.cls[idx], self.tokens[idx], self.mask[idx])

    def to(self, device: torch.device | str) -> TextFeatures:
        return TextFeatures(self.cls.to(device), self.tokens.to(device), self.mask.to(device))


def encode_class_texts(
    text_encoder,
    names: Sequence[str],
    token_template: str = "a photo of a {}.",
    max_length: int = 16,
    class_templates: Sequence[str] | None = None,
) -> TextFeatures:
    """Encode class names the way ESDA consumes them.

    The pooled embedding is template-ensembled (:meth:`TextEncoder.encode_classes`, cached) because
    it carries the zero-shot transfer; the token states of one templated sentence feed the
    interactor. Underscores become spaces (``ankle_boot``).
    """
    if "{}" not in token_template:
        raise ValueError(f"token_template needs a '{{}}' for the class name, got {token_template!r}")
    clean = [n.replace("_", " ").strip() for n in names]
    cls = text_encoder.encode_classes(clean, templates=class_templates)
    tokens, mask = text_encoder.encode_tokens(
        [token_template.format(n) for n in clean], max_length=max_length
    )
    return TextFeatures(cls.float().cpu(), tokens.float().cpu(), mask.bool().cpu())


# -------------------------------------------------------------------------------- building blocks


class LowRankTokenAdapter(nn.Module):
    """ESDA's per-layer block ``(x·P1)·P2`` (rank 2 in the paper), added to the layer's output.

    ``P2`` starts at zero, so the encoder starts exactly pretrained. ``P1`` is drawn with std
    ``1/√dim`` (the original: std 1) so ``x·P1`` has unit scale and Adam's steps on ``P2`` are
    well conditioned.
    """

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.p1 = nn.Parameter(torch.randn(dim, rank) / math.sqrt(dim))
        self.p2 = nn.Parameter(torch.zeros(rank, dim))

    def forward(self, x_in: Tensor) -> Tensor:
        return (x_in @ self.p1) @ self.p2


class LowRankConvAdapter(nn.Module):
    """The CNN form: 1×1 convs ``C_in → rank → C_out`` on the stage input, pooled to the output size."""

    def __init__(self, c_in: int, c_out: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(c_in, rank, 1, bias=False)
        self.up = nn.Conv2d(rank, c_out, 1, bias=False)
        nn.init.normal_(self.down.weight, std=1.0 / math.sqrt(c_in))
        nn.init.zeros_(self.up.weight)

    def forward(self, x_in: Tensor, size: tuple[int, int]) -> Tensor:
        if tuple(x_in.shape[-2:]) != tuple(size):
            x_in = F.adaptive_avg_pool2d(x_in, size)
        return self.up(self.down(x_in))


class FiLM(nn.Module):
    """Text injection into a CNN stage: ``x·(1 + γ(t)) + β(t)``, zero-initialised (identity at start).

    A CNN has no CLS token to replace; modulating the stage input by the projected text embedding
    lets the text steer every later stage, which is what the replaced CLS token does through
    self-attention in the ViT.
    """

    def __init__(self, text_dim: int, channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(text_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        gamma, beta = self.proj(t)[..., None, None].chunk(2, dim=1)
        return x * (1.0 + gamma) + beta


class AttentionBlock(nn.Module):
    """Pre-LN transformer block (CLIP's ResidualAttentionBlock) with a key-padding mask."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, pad: Tensor | None = None) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class VLInteractor(nn.Module):
    """ESDA's vision-language embedding interactor over ``[text CLS, text tokens, fused CLS, patches]``.

    Each layer runs one block over the whole sequence (VL interaction), one over the patch tokens
    (IEE) and, except in the last layer, one over the text part (SSE). The original concatenates
    ``[patches, text]`` after a layer but keeps slicing "the last N tokens" as patches, which in
    its second layer mixes text tokens into the spatial map and shifts it; here the two parts keep
    fixed places. Padded text tokens are masked out of attention (the original attends to all 77).
    """

    def __init__(
        self, dim: int, text_dim: int, token_dim: int, global_dim: int, layers: int = 2, heads: int = 8
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"interactor width {dim} is not divisible by heads={heads}")
        self.cls_proj = nn.Linear(text_dim, dim)
        self.token_proj = nn.Linear(token_dim, dim)
        self.fused_cls_proj = nn.Linear(text_dim + global_dim, dim)
        self.vl = nn.ModuleList(AttentionBlock(dim, heads) for _ in range(layers))
        self.iee = nn.ModuleList(AttentionBlock(dim, heads) for _ in range(layers))
        self.sse = nn.ModuleList(AttentionBlock(dim, heads) for _ in range(layers - 1))

    def forward(self, patches: Tensor, text: TextFeatures, image_global: Tensor) -> Tensor:
        """``patches (B, N, D)`` → interacted patches ``(B, N, D)``."""
        b = patches.shape[0]
        fused = self.fused_cls_proj(torch.cat([text.cls, image_global], dim=-1))
        prefix = torch.cat(
            [self.cls_proj(text.cls)[:, None], self.token_proj(text.tokens), fused[:, None]], 1
        )
        n_text = prefix.shape[1]
        no = torch.zeros(b, 1, dtype=torch.bool, device=patches.device)
        pad_text = torch.cat([no, ~text.mask.bool(), no], dim=1)
        pad_all = torch.cat(
            [pad_text, torch.zeros(b, patches.shape[1], dtype=torch.bool, device=no.device)], 1
        )
        for i, block in enumerate(self.vl):
            x = block(torch.cat([prefix, patches], dim=1), pad_all)
            prefix, patches = x[:, :n_text], self.iee[i](x[:, n_text:])
            if i < len(self.sse):
                prefix = self.sse[i](prefix, pad_text)
        return patches


class SegmentationHead(nn.Module):
    """ESDA's conv head: ``[features ; prior]`` → 3×3 convs (C, C/2, C/4) → dropout → 1×1 → 2 classes."""

    def __init__(self, in_dim: int, width: int = 256) -> None:
        super().__init__()
        if width < 4:
            raise ValueError(f"head width must be >= 4, got {width}")
        self.body = nn.Sequential(
            nn.Conv2d(in_dim + 1, width, 3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width // 2, 3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(width // 2, width // 4, 3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Dropout2d(p=0.1),
            nn.Conv2d(width // 4, 2, 1),
        )

    def forward(self, features: Tensor, prior: Tensor) -> Tensor:
        return self.body(torch.cat([features, prior], dim=1))


def cosine_prior(features: Tensor, prototype: Tensor, eps: float = 1e-7) -> Tensor:
    """Cosine similarity of every position to ``prototype``, min-max normalised per image → ``(B,1,h,w)``."""
    sim = torch.einsum(
        "bchw,bc->bhw", F.normalize(features, dim=1, eps=eps), F.normalize(prototype, dim=1, eps=eps)
    )
    flat = sim.flatten(1)
    lo, hi = flat.min(1, keepdim=True)[0], flat.max(1, keepdim=True)[0]
    return ((flat - lo) / (hi - lo + eps)).view_as(sim)[:, None]


def masked_prototype(features: Tensor, mask: Tensor, eps: float = 5e-4) -> Tensor:
    """Mask-weighted average of ``features`` (ESDA's Weighted_GAP): the foreground prototype ``(B, C)``."""
    area = mask.sum(dim=(2, 3))
    return (features * mask).sum(dim=(2, 3)) / (area + eps)


def prior_logits(prior: Tensor) -> Tensor:
    """A prior map in [0, 1] as 2-class logits: background ``1 - p``, foreground ``p`` (sign fixed)."""
    return torch.cat([1.0 - prior, prior], dim=1)


# ------------------------------------------------------------------------------------------ model


@dataclass
class ESDAOutput:
    """Model outputs: ``logits (B, 2, S, S)`` at the input size, the text prior and the stage priors."""

    logits: Tensor
    text_prior: Tensor
    stage_priors: list[Tensor] = field(default_factory=list)


class ESDAModel(ModelMixin, ConfigMixin):
    """ESDA's trainable parts around a frozen image encoder (which is referenced by ``encoder``, not saved).

    Args:
        encoder: image encoder name or spec (:func:`~diffuseg.backbones.encoders.build_image_encoder`).
        text_encoder: text encoder name for the pipeline (``"minilm"``, ``"clip:<folder>"``).
        text_dim / text_token_dim: sizes of the pooled text vector and of text token states.
        image_size: side the images are resized to before the encoder.
        dim: width of the token map and interactor (``None``: the ViT width; CNNs need a value).
        heads / interactor_layers: interactor shape (ESDA: 2 layers).
        head_width: first conv width of the head (ESDA: 256).
        adapter_rank: rank of the per-stage adapters (ESDA: 2 per ViT layer).
        use_adapters / inject_text / use_interactor: switch the trainable blocks (ablations).
        adapter_stages / inject_stages: which stages get adapters (``None``: all) / injection (ESDA: 2, 3, 4).
        token_stride: CNN only: the stride of the token map, fused from the last stage of every
            stride ≥ it (multi-stage features, since the stride-32 map alone is too coarse).
        loss_weights: ``[main, text prior, intermediate priors]`` (ESDA: 1.0, 0.2, 0.1).
        token_template / text_max_length / class_templates: how class names become text inputs.
        class_names / unseen_classes: the vocabulary known at training (defaults for the pipeline)
            and the names held out from training.
        background_bias: semantic mode's background score (log-odds threshold, 0 = p 0.5).
        variant: the name of the configuration (``esda`` or an ablation), for reports.
        image_encoder: an already built encoder to use instead of building ``encoder`` (not saved).
    """

    config_name = "config.json"
    ignore_for_config = ["image_encoder"]

    @register_to_config
    def __init__(
        self,
        encoder: str | dict[str, Any] = "efficientnet-lite0",
        text_encoder: str = "minilm",
        text_dim: int = 384,
        text_token_dim: int = 384,
        image_size: int = 128,
        dim: int | None = 128,
        heads: int = 4,
        interactor_layers: int = 2,
        head_width: int = 128,
        adapter_rank: int = 8,
        use_adapters: bool = True,
        inject_text: bool = True,
        use_interactor: bool = True,
        adapter_stages: list[int] | None = None,
        inject_stages: list[int] | None = (2, 3, 4),
        token_stride: int = 8,
        loss_weights: list[float] = (1.0, 0.2, 0.1),
        token_template: str = "a photo of a {}.",
        text_max_length: int = 16,
        class_templates: list[str] | None = None,
        class_names: list[str] | None = None,
        unseen_classes: list[str] | None = None,
        background_bias: float = 0.0,
        variant: str = "esda",
        image_encoder: FrozenImageEncoder | None = None,
    ) -> None:
        super().__init__()
        enc = image_encoder if image_encoder is not None else build_image_encoder(encoder)
        self.__dict__["image_encoder"] = enc  # not a submodule: frozen, referenced by name, never saved
        n = enc.num_stages
        self._check_args(n, adapter_stages, inject_stages, loss_weights, adapter_rank)
        vit = enc.kind == "vit"
        feat_dim = enc.stage_channels[-1] if vit else int(dim or 0)
        if not vit and not dim:
            raise ValueError("a CNN encoder needs dim (the token map width), e.g. dim=128")
        self.adapter_ids = list(range(n)) if adapter_stages is None else [int(i) for i in adapter_stages]
        self.inject_ids = [int(i) for i in (inject_stages or ())] if inject_text else []
        self.adapters = self._make_adapters(enc, adapter_rank) if use_adapters else None
        self.text_proj = nn.Linear(text_dim, feat_dim)  # ESDA's text_cls_proj: injection and prior
        self.films = (
            nn.ModuleDict({str(i): FiLM(feat_dim, enc.stage_in_channels[i]) for i in self.inject_ids})
            if self.inject_ids and not vit
            else None
        )
        self.token_ids = [] if vit else self._token_stages(enc, token_stride)
        self.fuse = (
            None
            if vit
            else nn.ModuleDict(
                {str(i): nn.Conv2d(enc.stage_channels[i], feat_dim, 1) for i in self.token_ids}
            )
        )
        width = int(dim or feat_dim)
        self.token_proj = nn.Linear(feat_dim, width) if width != feat_dim else None
        self.interactor = (
            VLInteractor(width, text_dim, text_token_dim, enc.global_dim, interactor_layers, heads)
            if use_interactor
            else None
        )
        self.head = SegmentationHead(width, head_width)
        self.prior_ids = list(range(n - 1)) if vit else list(range(n))

    # -- construction helpers ----------------------------------------------------------------
    @staticmethod
    def _check_args(n, adapter_stages, inject_stages, loss_weights, rank) -> None:
        for name, ids in (("adapter_stages", adapter_stages), ("inject_stages", inject_stages)):
            bad = [i for i in (ids or ()) if not 0 <= int(i) < n]
            if bad:
                raise ValueError(f"{name} {bad} out of range: the encoder has stages 0..{n - 1}")
        if len(loss_weights) != 3 or any(w < 0 for w in loss_weights):
            raise ValueError(
                f"loss_weights is [main, text prior, stage priors] >= 0, got {list(loss_weights)}"
            )
        if rank < 1:
            raise ValueError(f"adapter_rank must be >= 1, got {rank}")

    def _make_adapters(self, enc: FrozenImageEncoder, rank: int) -> nn.ModuleDict:
        if enc.kind == "vit":
            return nn.ModuleDict(
                {str(i): LowRankTokenAdapter(enc.stage_channels[i], rank) for i in self.adapter_ids}
            )
        return nn.ModuleDict(
            {
                str(i): LowRankConvAdapter(enc.stage_in_channels[i], enc.stage_channels[i], rank)
                for i in self.adapter_ids
            }
        )

    @staticmethod
    def _token_stages(enc: FrozenImageEncoder, token_stride: int) -> list[int]:
        """The last stage of each output stride ≥ ``token_stride``."""
        last: dict[int, int] = {}
        for i, s in enumerate(enc.stage_strides):
            if s >= token_stride:
                last[s] = i
        if not last:
            raise ValueError(f"token_stride {token_stride} exceeds the encoder's strides {enc.stage_strides}")
        return sorted(last.values())

    def _apply(self, fn, recurse: bool = True):
        """Move/cast the unregistered frozen encoder along with the trainable parts."""
        super()._apply(fn, recurse)
        self.image_encoder._apply(fn, recurse)
        return self

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        image_encoder: FrozenImageEncoder | None = None,
        local_files_only: bool | None = None,
    ) -> ESDAModel:
        """Load a saved folder (or hub id): config → frozen encoder by name → trainable weights.

        Not diffusers' generic loader: that one disables ``torch.nn.init`` and may init on the meta
        device, which would corrupt the frozen encoder this model builds in ``__init__``.
        """
        import inspect

        from safetensors.torch import load_file

        folder = _resolve_folder(pretrained_model_name_or_path, local_files_only)
        config = json.loads((folder / cls.config_name).read_text())
        params = set(inspect.signature(cls.__init__).parameters) - {"self", "image_encoder"}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in params)
        if unknown:
            logger.warning("%s: ignoring config keys this version does not know: %s", folder, unknown)
        model = cls(**{k: v for k, v in config.items() if k in params}, image_encoder=image_encoder)
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            raise ValueError(f"{folder} has no {WEIGHTS_NAME}; it is not a saved ESDA model")
        missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{weights} does not match the model its config describes (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}); was it saved by another version or variant?"
            )
        return model.eval()

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """Write ``config.json`` + safetensors of the trainable parts, atomically (temp folder, rename)."""
        import shutil
        import tempfile

        from diffuseg.data.fashion_scenes import make_tree_readable

        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            super().save_pretrained(str(tmp), safe_serialization=True, **kwargs)
            make_tree_readable(tmp)
            if target.exists() and any(target.iterdir()):
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- forward -------------------------------------------------------------------------------
    @property
    def encoder_is_trained(self) -> bool:
        """Whether any trainable block sits inside the encoder (else it runs without autograd)."""
        return self.adapters is not None or bool(self.inject_ids)

    def preprocess(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in [0, 1] → normalised at ``image_size``."""
        return self.image_encoder.preprocess(images, self.config.image_size)

    def _hooks(self, t: Tensor):
        vit = self.image_encoder.kind == "vit"

        def pre(i: int, x: Tensor) -> Tensor:
            if i not in self.inject_ids:
                return x
            if vit:  # ESDA: the projected text [CLS] replaces the image CLS token
                return torch.cat([t[:, None].to(x.dtype), x[:, 1:]], dim=1)
            return self.films[str(i)](x, t)

        def post(i: int, x_in: Tensor, x_out: Tensor) -> Tensor:
            if self.adapters is None or str(i) not in self.adapters:
                return x_out
            if vit:
                return x_out + self.adapters[str(i)](x_in)
            return x_out + self.adapters[str(i)](x_in, x_out.shape[-2:])

        return pre, post

    def _prior_features(self, features: list[Tensor]) -> Tensor:
        if self.fuse is None:
            return features[-1]
        size = features[self.token_ids[0]].shape[-2:]
        out = 0
        for i in self.token_ids:
            f = self.fuse[str(i)](features[i])
            out = out + (f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear"))
        return out

    def forward(self, pixel_values: Tensor, text: TextFeatures, target: Tensor | None = None) -> ESDAOutput:
        """Segment ``pixel_values`` (normalised, ``(B, 3, S, S)``) for one class name per image.

        ``target`` (``(B, H, W)``: 1 object, 0 background, 255 ignore) is only needed for the
        intermediate prior maps, whose prototypes come from the ground-truth foreground.
        """
        t = self.text_proj(text.cls)
        pre, post = self._hooks(t)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.encoder_is_trained):
            enc = self.image_encoder(pixel_values, pre_stage=pre, post_stage=post)
        feats = self._prior_features(enc.features)
        prior = cosine_prior(feats, t)
        b, c, h, w = feats.shape
        tokens = feats.flatten(2).transpose(1, 2)
        if self.token_proj is not None:
            tokens = self.token_proj(tokens)
        if self.interactor is not None:
            tokens = self.interactor(tokens, text, enc.global_embedding)
        logits = self.head(tokens.transpose(1, 2).reshape(b, -1, h, w), prior)
        logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        stage_priors = self._stage_priors(enc.features, target) if target is not None else []
        return ESDAOutput(logits=logits, text_prior=prior, stage_priors=stage_priors)

    def _stage_priors(self, features: list[Tensor], target: Tensor) -> list[Tensor]:
        if self.config.loss_weights[2] == 0:
            return []
        fg = (target == 1).float()[:, None]
        out = []
        for i in self.prior_ids:
            f = features[i]
            mask = F.interpolate(fg, size=f.shape[-2:], mode="bilinear", align_corners=True)
            out.append(cosine_prior(f, masked_prototype(f, mask)))
        return out


def _resolve_folder(name_or_path: str | Path, local_files_only: bool | None) -> Path:
    """A local folder as is; a hub id through the hub cache (offline when asked or HF_HUB_OFFLINE)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    from diffuseg.backbones.latent import resolve_local_files_only

    try:
        return Path(
            snapshot_download(str(name_or_path), local_files_only=resolve_local_files_only(local_files_only))
        )
    except Exception as e:  # hub errors have many types; all mean "not loadable from here"
        raise ValueError(
            f"{name_or_path!r} is neither an ESDA model folder nor a reachable hub id: {e}"
        ) from e


def _ce(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy at the target's size, ignore pixels dropped; 0 (with grad) when none are valid."""
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    valid = target != IGNORE_INDEX
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


def esda_loss(
    out: ESDAOutput, target: Tensor, weights: Sequence[float] = (1.0, 0.2, 0.1)
) -> tuple[Tensor, dict[str, float]]:
    """ESDA's objective: ``w0·CE(output) + w1·CE(text prior) + w2·mean CE(stage priors)``.

    Prior maps are scored with foreground logit ``p`` (see :func:`prior_logits`). Images without
    any foreground (negative samples) are left out of the prior terms: a min-max normalised map
    always reaches 1 somewhere, so "no object" cannot be expressed by it.
    """
    main = _ce(out.logits, target)
    has_fg = (target == 1).flatten(1).any(1)
    prior_target = torch.where(has_fg[:, None, None], target, torch.full_like(target, IGNORE_INDEX))
    text = _ce(prior_logits(out.text_prior), prior_target) if weights[1] else main.new_zeros(())
    stage = main.new_zeros(())
    if weights[2] and out.stage_priors:
        stage = sum(_ce(prior_logits(p), prior_target) for p in out.stage_priors) / len(out.stage_priors)
    total = weights[0] * main + weights[1] * text + weights[2] * stage
    return total, {
        "loss_main": float(main.detach()),
        "loss_text_prior": float(text.detach()),
        "loss_stage_priors": float(stage.detach()),
    }


# --------------------------------------------------------------------------------------- pipeline


def _is_background(name: str) -> bool:
    return name.strip().lower() in BACKGROUND_NAMES


class ESDAPipeline:
    """Zero-shot segmentation with a trained :class:`ESDAModel` and its text encoder.

    Example::

        pipe = ESDAPipeline.from_pretrained()                   # shipped FashionScenes model
        out = pipe(image, class_names=["background", "bag", "sandal"])           # semantic
        out = pipe(image, class_names=["sandal"], mode="binary")                 # sandal vs background
    """

    def __init__(self, model: ESDAModel, text_encoder=None) -> None:
        self.model = model.eval()
        self._text_encoder = text_encoder
        self._text_cache: dict[tuple[str, ...], TextFeatures] = {}

    @classmethod
    def from_pretrained(
        cls, checkpoint: str | Path | None = None, text_encoder=None, **overrides: Any
    ) -> ESDAPipeline:
        """Load a trained model folder (``None``: the shipped ``checkpoints/esda``).

        ``text_encoder``: a :class:`~diffuseg.text.TextEncoder` or a name; default: the model's own.
        ``overrides``: ``background_bias`` (semantic threshold) or ``device``.
        """
        from diffuseg.backbones.latent import default_checkpoint_dir

        allowed = {"background_bias", "device"}
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise ValueError(f"unknown ESDA options {unknown}; allowed: {sorted(allowed)}")
        path = Path(checkpoint) if checkpoint is not None else default_checkpoint_dir("esda")
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} is not an ESDA model folder (no config.json); train one with `diffuseg train esda`"
            )
        model = ESDAModel.from_pretrained(str(path))
        if overrides.get("background_bias") is not None:
            model.register_to_config(background_bias=float(overrides["background_bias"]))
        pipe = cls(model, text_encoder)
        if overrides.get("device"):
            pipe.to(overrides["device"])
        return pipe

    @property
    def config(self):
        return self.model.config

    @property
    def unseen_classes(self) -> list[str]:
        return list(self.model.config.unseen_classes or [])

    @property
    def text_encoder(self):
        """The text encoder, built from the model's config on first use (MiniLM loads in seconds)."""
        if self._text_encoder is None or isinstance(self._text_encoder, str):
            from diffuseg.text import get_text_encoder

            self._text_encoder = get_text_encoder(self._text_encoder or self.model.config.text_encoder)
        return self._text_encoder

    def to(self, device: str | torch.device) -> ESDAPipeline:
        self.model.to(device)
        return self

    def save_pretrained(self, folder: str | Path) -> None:
        self.model.save_pretrained(str(folder))

    def encode_text(self, names: Sequence[str]) -> TextFeatures:
        """Text features of class names (cached per name list)."""
        key = tuple(names)
        if key not in self._text_cache:
            c = self.model.config
            feats = encode_class_texts(
                self.text_encoder, names, c.token_template, c.text_max_length, c.class_templates
            )
            if feats.cls.shape[-1] != c.text_dim or feats.tokens.shape[-1] != c.text_token_dim:
                raise ValueError(
                    f"the text encoder gives {feats.cls.shape[-1]}/{feats.tokens.shape[-1]}-d vectors but "
                    f"the model expects {c.text_dim}/{c.text_token_dim}: use the model's text "
                    f"encoder {c.text_encoder!r}"
                )
            self._text_cache[key] = feats
        return self._text_cache[key]

    def check_inputs(
        self, images: Any, class_names: Any, mode: str, output_size: Any, batch_size: int
    ) -> tuple[list[np.ndarray], list[str]]:
        """Validate a call; every error says what to pass instead."""
        imgs = check_images(images)
        if mode not in ("semantic", "binary"):
            raise ValueError(f"mode must be 'semantic' or 'binary', got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if output_size is not None:
            sizes = [output_size] if isinstance(output_size, int) else list(output_size)
            if len(sizes) not in (1, 2) or any(int(s) < 1 for s in sizes):
                raise ValueError(f"output_size is an int or (height, width) >= 1, got {output_size!r}")
        if mode == "binary":
            return imgs, _binary_names(class_names, len(imgs))
        names = parse_classes(class_names)
        if names is None:
            names = list(self.model.config.class_names or [])
            if not names:
                raise ValueError("class_names: this checkpoint stores no default classes; pass class_names")
        return imgs, names

    def _to_tensor(self, imgs: list[np.ndarray]) -> Tensor:
        """uint8 images (one size) → normalised ``(B, 3, S, S)`` at the model's ``image_size``."""
        x = torch.from_numpy(np.stack(imgs)).to(self.model.device).permute(0, 3, 1, 2).float() / 255.0
        return self.model.preprocess(x)

    @torch.no_grad()
    def log_odds(
        self,
        pixel_values: Tensor,
        text: TextFeatures,
        pairs: list[tuple[int, int]],
        batch_size: int,
        progress: bool = False,
    ) -> Tensor:
        """Foreground log-odds ``(P, S, S)`` for (image index, class index) pairs, in chunks."""
        from tqdm.auto import tqdm

        chunks = []
        starts = range(0, len(pairs), batch_size)
        for s in tqdm(starts, desc="esda", disable=not progress or len(starts) < 2, leave=False):
            part = pairs[s : s + batch_size]
            img_idx = torch.tensor([p[0] for p in part], device=pixel_values.device)
            cls_idx = torch.tensor([p[1] for p in part])
            out = self.model(pixel_values[img_idx], text.index(cls_idx).to(pixel_values.device))
            chunks.append((out.logits[:, 1] - out.logits[:, 0]).float())
        return torch.cat(chunks)

    def __call__(
        self,
        images: Any,
        class_names: Sequence[str] | str | None = None,
        output_size: int | Sequence[int] | None = None,
        mode: str = "semantic",
        background_bias: float | None = None,
        batch_size: int = 32,
        progress: bool = False,
        generator: torch.Generator | None = None,
    ) -> SegmentationOutput:
        """Segment images by class name.

        Args:
            images: uint8 ``(H, W, 3)`` array(s); any size (resized to the model's ``image_size``).
            class_names: semantic: every name to label (a background name such as ``"background"``
                takes the "no object" slot; one is added at index 0 when missing). Binary: one
                name for all images, or one per image. Default: the checkpoint's classes.
            output_size: label side (int) or ``(h, w)``; default: each input's size.
            mode: ``"semantic"`` (argmax over per-class log-odds, background at ``background_bias``)
                or ``"binary"`` (the named class vs background: labels 0/1).
            background_bias: semantic background log-odds (default: the checkpoint's, 0 = p 0.5).
            batch_size: (image, class) pairs per forward pass.
            progress: show a progress bar over forward chunks.
            generator: unused (ESDA is deterministic); accepted for the common pipeline signature.
        """
        # 1. check inputs
        imgs, names = self.check_inputs(images, class_names, mode, output_size, batch_size)
        if len({im.shape for im in imgs}) > 1:  # one input size per forward: run image by image
            per_image = mode == "binary" and len(names) == len(imgs)
            outs = [
                self(
                    im,
                    [names[i]] if per_image else names,
                    output_size,
                    mode,
                    background_bias,
                    batch_size,
                    progress,
                )
                for i, im in enumerate(imgs)
            ]
            return _stack_outputs(outs)
        h, w = imgs[0].shape[:2]
        size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size or (h, w))
        # 2. images to the encoder's input
        pixels = self._to_tensor(imgs)
        # 3. one forward per (image, class) pair: the text is injected inside the encoder
        if mode == "binary":
            return self._binary(pixels, names, size, batch_size, progress)
        return self._semantic(pixels, names, size, batch_size, background_bias, progress)

    def _binary(
        self, pixels: Tensor, names: list[str], size: tuple[int, int], batch_size: int, progress: bool
    ) -> SegmentationOutput:
        uniq = list(dict.fromkeys(names))
        text = self.encode_text(uniq)
        per_image = names if len(names) == len(pixels) else names * len(pixels)
        pairs = [(i, uniq.index(n)) for i, n in enumerate(per_image)]
        z = _resize(self.log_odds(pixels, text, pairs, batch_size, progress)[:, None], size)[:, 0]
        p = torch.sigmoid(z)
        scores = torch.stack([1 - p, p], dim=1).cpu().numpy().astype(np.float32)
        labels = (z > 0).long().cpu().numpy()
        class_list = ["background", per_image[0]] if len(set(per_image)) == 1 else ["background", "object"]
        return SegmentationOutput(
            labels=labels,
            scores=scores,
            uncertainty=(1 - np.abs(2 * scores[:, 1] - 1)).astype(np.float32),
            class_names=class_list,
            extras={"mode": "binary", "class_per_image": per_image},
        )

    def _semantic(
        self,
        pixels: Tensor,
        names: list[str],
        size: tuple[int, int],
        batch_size: int,
        bias: float | None,
        progress: bool,
    ) -> SegmentationOutput:
        if not any(_is_background(n) for n in names):
            names = ["background", *names]
            logger.info("no background class among the names: 'background' added as label 0")
        objects = [k for k, n in enumerate(names) if not _is_background(n)]
        text = self.encode_text([names[k] for k in objects])
        pairs = [(i, j) for i in range(len(pixels)) for j in range(len(objects))]
        z = self.log_odds(pixels, text, pairs, batch_size, progress).view(
            len(pixels), len(objects), *pixels.shape[-2:]
        )
        z = _resize(z, size)
        b = float(self.model.config.background_bias if bias is None else bias)
        scores = torch.full((len(pixels), len(names), *size), float("-inf"), device=z.device)
        for k, n in enumerate(names):
            if _is_background(n):
                scores[:, k] = b
        scores[:, objects] = z
        bg_slots = [k for k, n in enumerate(names) if _is_background(n)]
        labels = scores.argmax(1)
        labels[torch.isin(labels, torch.tensor(bg_slots, device=labels.device))] = bg_slots[0]
        probs = torch.softmax(scores, dim=1)
        return SegmentationOutput(
            labels=labels.cpu().numpy(),
            scores=probs.cpu().numpy().astype(np.float32),
            uncertainty=(1 - probs.max(1)[0]).cpu().numpy().astype(np.float32),
            class_names=list(names),
            extras={"mode": "semantic", "background_bias": b},
        )


def _binary_names(class_names: Any, num_images: int) -> list[str]:
    """Binary mode's names: one for all images or one per image (repeats allowed), never background."""
    if isinstance(class_names, str):
        class_names = [c.strip() for c in class_names.split(",")]
    names = [str(n).strip() for n in (class_names or [])]
    if not names or any(not n or _is_background(n) for n in names) or len(names) not in (1, num_images):
        raise ValueError(
            "binary mode segments one named class per image: pass one (non-background) name for all "
            f"images or one per image ({num_images}), got {class_names!r}"
        )
    return names


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _stack_outputs(outs: list[SegmentationOutput]) -> SegmentationOutput:
    """Join single-image outputs (same output size required, as a batch array needs)."""
    shapes = {o.labels.shape[1:] for o in outs}
    if len(shapes) > 1:
        raise ValueError(
            f"images of different sizes give label maps of sizes {sorted(shapes)}: pass output_size "
            "to get one batch array, or call the pipeline per image"
        )
    extras: dict[str, Any] = {"mode": outs[0].extras.get("mode")}
    names = outs[0].class_names
    if extras["mode"] == "binary":
        extras["class_per_image"] = [n for o in outs for n in o.extras["class_per_image"]]
        if len(set(extras["class_per_image"])) > 1:
            names = ["background", "object"]
    return SegmentationOutput(
        labels=np.concatenate([o.labels for o in outs]),
        scores=np.concatenate([o.scores for o in outs]),
        uncertainty=np.concatenate([o.uncertainty for o in outs]),
        class_names=names,
        extras=extras,
    )
