"""Cheap quality probes run while a backbone trains.

Loss alone says little about whether attention has learned objects (FEASIBILITY.md: the loss
kept falling while only one attention level carried structure). The probe tracks what the
segmentation methods consume: normalised self-attention entropy per level, and the DiffSeg
score (per-image Hungarian mIoU) on a few hundred validation scenes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["diffseg_probe"]


@torch.no_grad()
def diffseg_probe(
    backbone,
    data_dir: str | Path,
    num_images: int = 200,
    timestep: int = 300,
    thresholds: tuple[float, ...] = (0.05, 0.1, 0.2),
    batch_size: int = 50,
) -> dict[str, float]:
    """Attention entropy per level and DiffSeg mIoU (relative thresholds) on ``num_images`` val scenes."""
    from diffuseg.backbones.attention import capture_attention
    from diffuseg.eval.metrics import HungarianScorer
    from diffuseg.eval.runner import load_meta
    from diffuseg.io import read_image, read_label
    from diffuseg.methods.diffseg import segment_attention
    from diffuseg.train.latent_diffusion import attention_entropy

    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    files = sorted((data_dir / "img_dir" / "val").glob("*.png"))[:num_images]
    scorers = {q: HungarianScorer(len(meta["classes"]), matching="per_image") for q in thresholds}
    entropies: dict[int, list[float]] = {}
    text = None
    for i in range(0, len(files), batch_size):
        chunk = files[i : i + batch_size]
        images = [read_image(f) for f in chunk]
        gts = np.stack([read_label(data_dir / "ann_dir" / "val" / f.name) for f in chunk])
        latents = backbone.encode_image(images)
        text = backbone.encode_text([""] * len(chunk))
        with capture_attention(backbone.unet) as store:
            backbone.unet_forward(latents, timestep, text)
        maps = store.by_resolution("attn1")
        for side, h in attention_entropy(maps).items():
            entropies.setdefault(side, []).append(h)
        four_d = {s: m[:, None] for s, m in maps.items()}
        for q, scorer in scorers.items():
            labels = segment_attention(
                four_d,
                kl_threshold=[q] * 3,
                num_points=min(16, max(maps)),
                threshold_mode="relative",
                output_size=gts.shape[-1],
            )
            scorer.update(np.asarray(labels), gts)
    out = {f"attn_entropy_{s}": float(np.mean(v)) for s, v in entropies.items()}
    for q, scorer in scorers.items():
        out[f"diffseg_mIoU_q{q}"] = float(scorer.compute()["metrics"]["mIoU"])
    logger.info("probe: %s", out)
    return out
