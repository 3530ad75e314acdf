"""Exponential moving average (EMA) of a module's trainable parameters.

Diffusion models sample markedly better from EMA weights than from the raw weights of the last
step, so every trainer in diffuseg keeps one. The shadow copy lives on the CPU in fp32: it never
competes with training for accelerator memory, it accumulates tiny per-step updates without bf16/fp16
round-off, and it is bit-identical on every process (all processes see the same synchronised
parameters), which is what makes checkpoint/resume reproducible.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["EMA"]


class EMA:
    """EMA of the parameters of ``model`` that have ``requires_grad=True``.

    ``decay`` is the long-run decay. With ``warmup`` the effective decay after ``n`` updates is
    ``min(decay, (1 + n) / (10 + n))`` (the schedule diffusers' ``EMAModel`` uses by default): early
    on the average follows the fast-moving weights instead of remembering the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}; typical values are 0.999-0.9999.")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().to("cpu", torch.float32, copy=True) for name, p in _trainable(model)
        }

    def current_decay(self) -> float:
        """Decay applied by the next :meth:`update` (after warm-up, simply ``decay``)."""
        if not self.warmup:
            return self.decay
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * param, for every trainable parameter."""
        weight = 1.0 - self.current_decay()
        for name, p in _trainable(model):
            self.shadow[name].lerp_(p.detach().to("cpu", torch.float32), weight)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the trainable parameters of ``model`` with the EMA weights."""
        for name, p in _trainable(model):
            p.copy_(self.shadow[name].to(p.device, p.dtype))

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily put the EMA weights into ``model`` (for evaluation or export), then restore."""
        backup = {name: p.detach().clone() for name, p in _trainable(model)}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in _trainable(model):
                    p.copy_(backup[name])

    def state_dict(self) -> dict[str, object]:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": self.shadow,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        shadow = state["shadow"]
        if not isinstance(shadow, dict):
            raise ValueError(f"EMA state 'shadow' must be a dict of tensors, got {type(shadow).__name__}.")
        if set(shadow) != set(self.shadow):
            missing, extra = set(self.shadow) - set(shadow), set(shadow) - set(self.shadow)
            raise ValueError(
                f"EMA state does not match the model: missing {sorted(missing)[:5]}, unexpected "
                f"{sorted(extra)[:5]}. Was the checkpoint written for a different model or set of trainable "
                "parameters?"
            )
        self.num_updates = int(state["num_updates"])  # type: ignore[arg-type]
        self.shadow = {name: t.to("cpu", torch.float32, copy=True) for name, t in shadow.items()}

    def save(self, path: str | Path) -> None:
        """Write the shadow weights as safetensors (the update count goes into the metadata)."""
        metadata = {
            "decay": str(self.decay),
            "warmup": str(self.warmup),
            "num_updates": str(self.num_updates),
        }
        save_file({k: v.contiguous() for k, v in self.shadow.items()}, str(path), metadata=metadata)

    def load(self, path: str | Path) -> None:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        self.load_state_dict(
            {"shadow": load_file(str(path)), "num_updates": int(metadata.get("num_updates", 0))}
        )


def _trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((name, p) for name, p in model.named_parameters() if p.requires_grad)
