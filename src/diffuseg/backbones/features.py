"""Pixel features from a diffusion UNet's decoder, DDPM-Segmentation style.

Baranchuk et al. noise the input to a few timesteps with *one shared noise tensor*,
run the UNet once per timestep, and read activations of chosen decoder blocks. This
module does that for any diffusers UNet (``UNet2DConditionModel`` or ``UNet2DModel``)
via forward hooks, so the same code serves the mini-SD, real Stable Diffusion, and a
pixel-space DDPM. Upsampling to pixels is left to the caller (``upsample_concat``) so
that training code can stream features in chunks instead of holding every pixel of
every image in memory — the original's 210 GB problem.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNetFeatureExtractor", "capture_outputs", "upsample_concat"]


@contextlib.contextmanager
def capture_outputs(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Register forward hooks on the named submodules; yield a dict filled on each forward."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        blocks = [n for n in modules if n.count(".") <= 1 and n.startswith(("up_blocks", "mid_block"))]
        raise ValueError(f"unknown UNet layers {missing}; decoder blocks available: {blocks}")
    out: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_module, _inputs, output):
            out[name] = (output[0] if isinstance(output, tuple) else output).detach()

        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def upsample_concat(features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly upsample ``(B, C_i, h_i, w_i)`` maps to ``size`` and concatenate channels."""
    ups = [F.interpolate(f.float(), size=size, mode="bilinear", align_corners=False) for f in features]
    return torch.cat(ups, dim=1)


class UNetFeatureExtractor:
    """Decoder activations of a UNet at several timesteps, with one shared noise tensor.

    Args:
        unet: a diffusers UNet.
        scheduler: a diffusers scheduler with ``add_noise`` (defines q(x_t | x_0)).
        layers: module names to read, e.g. ``["up_blocks.1", "up_blocks.2"]``.
        timesteps: diffusion steps, e.g. ``[50, 150, 250]``.
        noise_seed: seed of the shared noise (the original uses 0).
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler,
        layers: Sequence[str],
        timesteps: Sequence[int],
        noise_seed: int = 0,
    ) -> None:
        if not layers or not timesteps:
            raise ValueError("UNetFeatureExtractor needs at least one layer and one timestep")
        num_train = int(scheduler.config.num_train_timesteps)
        bad = [t for t in timesteps if not 0 <= int(t) < num_train]
        if bad:
            raise ValueError(f"timesteps {bad} outside [0, {num_train}) of the scheduler")
        self.unet, self.scheduler = unet, scheduler
        self.layers, self.timesteps = list(layers), [int(t) for t in timesteps]
        self.noise_seed = noise_seed
        self._noise: torch.Tensor | None = None

    def shared_noise(self, shape: torch.Size, device, dtype) -> torch.Tensor:
        """The one noise tensor (per sample shape) reused for every image and timestep."""
        if self._noise is None or self._noise.shape != shape:
            g = torch.Generator().manual_seed(self.noise_seed)
            self._noise = torch.randn(shape, generator=g)
        return self._noise.to(device=device, dtype=dtype)

    @torch.no_grad()
    def __call__(
        self, x0: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Features for a batch ``x0`` (clean latents or images, model input scale).

        Returns one ``(B, C, h, w)`` tensor per (timestep, layer), timestep-major.
        """
        noise = self.shared_noise(x0.shape[1:], x0.device, x0.dtype).expand_as(x0)
        feats: list[torch.Tensor] = []
        with capture_outputs(self.unet, self.layers) as out:
            for t in self.timesteps:
                tt = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
                xt = self.scheduler.add_noise(x0, noise, tt)
                kwargs = (
                    {} if encoder_hidden_states is None else {"encoder_hidden_states": encoder_hidden_states}
                )
                self.unet(xt, tt, **kwargs)
                feats.extend(out[name] for name in self.layers)
        return feats

    def num_channels(self, sample: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> int:
        """Total channels per pixel (runs one forward on ``sample[:1]``)."""
        ehs = None if encoder_hidden_states is None else encoder_hidden_states[:1]
        return sum(f.shape[1] for f in self(sample[:1], ehs))
