"""Recording attention probabilities from diffusers UNets.

DiffSeg needs softmax(QKᵀ/√d) of the self-attention (``attn1``) layers and semantic
labelling needs the cross-attention (``attn2``) maps. Fused SDPA never materialises them,
so :func:`capture_attention` swaps in :class:`CaptureAttnProcessor` on exactly the layers
asked for — the rest keep their fused kernels — and restores the original processors on
exit, even when the forward pass raises.

Maps are averaged over heads as they are captured (one ``(B, Q, K)`` tensor per layer
instead of ``(B·heads, Q, K)``), which is what every consumer wants and keeps memory at
1/heads of the naive approach: SD's 64² layers alone are 8 × 4096² floats per head set.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "AttentionStore",
    "CaptureAttnProcessor",
    "attention_layer_names",
    "capture_attention",
]


@dataclass
class AttentionStore:
    """Head-averaged attention maps of one or more forward passes, by layer.

    ``maps[name]`` is a list (one entry per forward call) of ``(B, Q, K)`` float32 tensors
    on the device they were computed on; ``sides[name]`` is the query grid side.
    """

    maps: dict[str, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    sides: dict[str, int] = field(default_factory=dict)

    def clear(self) -> None:
        self.maps.clear()
        self.sides.clear()

    def by_resolution(self, kind: str = "attn1", call: int = -1) -> dict[int, torch.Tensor]:
        """Average the maps of one call over the layers of each query resolution.

        Returns ``{side: (B, side², K)}``: DiffSeg's per-resolution input. ``kind`` selects
        self- (``attn1``) or cross- (``attn2``) attention layers.
        """
        groups: dict[int, list[torch.Tensor]] = defaultdict(list)
        for name, calls in self.maps.items():
            if name.endswith(kind) and calls:
                groups[self.sides[name]].append(calls[call])
        return {s: torch.stack(ts).mean(0) for s, ts in sorted(groups.items(), reverse=True)}

    def layer_counts(self, kind: str = "attn1") -> dict[int, int]:
        """Number of captured layers per query resolution, e.g. ``{64: 5, 32: 5, 16: 5, 8: 1}``."""
        counts: dict[int, int] = defaultdict(int)
        for name in self.maps:
            if name.endswith(kind):
                counts[self.sides[name]] += 1
        return dict(sorted(counts.items(), reverse=True))


class CaptureAttnProcessor:
    """An attention processor that computes attention explicitly and records it.

    Numerically the same as diffusers' ``AttnProcessor`` (baddbmm + softmax, honouring
    ``upcast_attention``/``upcast_softmax``), so the UNet output does not change while
    capturing.
    """

    def __init__(self, store: AttentionStore, name: str, grid: tuple[int, int] | None = None) -> None:
        self.store = store
        self.name = name
        self.grid = grid

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch_size, query_len, _ = hidden_states.shape
        key_len = query_len if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)
        self._record(probs, batch_size, query_len)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _record(self, probs: torch.Tensor, batch_size: int, query_len: int) -> None:
        heads = probs.shape[0] // batch_size
        avg = probs.detach().float().view(batch_size, heads, query_len, -1).mean(1)
        self.store.maps[self.name].append(avg)
        side = math.isqrt(query_len)
        if side * side != query_len:
            raise ValueError(
                f"attention layer {self.name} has {query_len} query tokens, not a square grid; "
                "only square latents are supported for attention capture"
            )
        self.store.sides[self.name] = side


def attention_layer_names(unet: nn.Module, kind: str | None = None) -> list[str]:
    """Names of the attention layers (``...attn1``/``...attn2``) of a diffusers model, in order."""
    names = [n.removesuffix(".processor") for n in unet.attn_processors]
    return [n for n in names if kind is None or n.endswith(kind)]


def _select(names: Iterable[str], kinds: tuple[str, ...], pattern: str | None) -> list[str]:
    rx = re.compile(pattern) if pattern else None
    return [n for n in names if n.rsplit(".", 1)[-1] in kinds and (rx is None or rx.search(n))]


@contextlib.contextmanager
def capture_attention(
    unet: nn.Module,
    self_attention: bool = True,
    cross_attention: bool = False,
    layer_pattern: str | None = None,
) -> Iterator[AttentionStore]:
    """Record the attention probabilities of chosen layers while the context is open.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (or any model with ``attn_processors``).
        self_attention: capture ``attn1`` layers.
        cross_attention: capture ``attn2`` layers.
        layer_pattern: optional regex on layer names (e.g. ``"up_blocks"``) to narrow further.

    Yields the :class:`AttentionStore` that fills up on each forward pass.
    """
    kinds = tuple(k for k, on in (("attn1", self_attention), ("attn2", cross_attention)) if on)
    if not kinds:
        raise ValueError("capture_attention: ask for self_attention and/or cross_attention")
    original = dict(unet.attn_processors)
    chosen = _select((k.removesuffix(".processor") for k in original), kinds, layer_pattern)
    if not chosen:
        raise ValueError(
            f"no attention layers of kind {kinds} match pattern {layer_pattern!r}; "
            f"available: {attention_layer_names(unet)[:6]}..."
        )
    store = AttentionStore()
    new = dict(original)
    for name in chosen:
        new[f"{name}.processor"] = CaptureAttnProcessor(store, name)
    unet.set_attn_processor(new)
    try:
        yield store
    finally:
        unet.set_attn_processor(original)
