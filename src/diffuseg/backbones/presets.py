"""Named model shapes (segment-anything style registry) for the latent diffusion backbone.

* ``mini-sd``: the embedded default, trained in this repo on FashionScenes (64 px images,
  f=4 VAE → 16² latents, self/cross-attention at 16² and 8², MiniLM conditioning).
* ``tiny-sd``: a few-hundred-kB model with *exactly SD 1.x's block structure*
  (CrossAttnDown ×3 + Down, mid, Up + CrossAttnUp ×3, 2 layers per down block, f=8 VAE,
  CLIP text encoder) for tests: same layer names, 5/5/5/1 self-attention layers at the four
  resolutions, built in code with random weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["MINI_SD", "build_backbone", "tiny_clip", "tiny_sd_backbone"]

MINI_SD: dict[str, Any] = {
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [32, 64, 128],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 16,
        "sample_size": 64,
        "scaling_factor": 1.0,
    },
    "unet": {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [64, 128, 192],
        "layers_per_block": 2,
        "cross_attention_dim": 384,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        "mid_block_type": "UNetMidBlock2D",
    },
    "scheduler": {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
        "steps_offset": 1,
    },
    "text_encoder": {"type": "minilm", "max_length": 24},
    "processing_res": 64,
}


def build_backbone(preset: dict[str, Any] = MINI_SD, text_conditioner=None):
    """A randomly initialised :class:`LatentDiffusionBackbone` of a preset's shape.

    Also the *random-init control* of every result table: same architecture, no training.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from diffuseg.backbones.latent import BackboneConfig, LatentDiffusionBackbone, MiniLMConditioner

    vae = AutoencoderKL(**preset["vae"])
    unet = UNet2DConditionModel(**preset["unet"])
    scheduler = DDPMScheduler(**preset["scheduler"])
    te = dict(preset["text_encoder"])
    if text_conditioner is None:
        text_conditioner = MiniLMConditioner(max_length=int(te.get("max_length", 32)))
    cfg = BackboneConfig(text_encoder=te, processing_res=int(preset["processing_res"]))
    return LatentDiffusionBackbone(vae, unet, scheduler, text_conditioner, cfg)


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by GPT-2/CLIP byte-level BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _write_char_level_clip_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer with only byte-level characters (no merges): valid and offline."""
    chars = _byte_level_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def tiny_clip(folder: str | os.PathLike, hidden_size: int = 32, max_length: int = 16, seed: int = 0):
    """Build a tiny random CLIP text encoder + char-level tokenizer; returns ``(tokenizer, model)``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    _write_char_level_clip_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": max_length, "pad_token": "<|endoftext|>"})
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, CLIPTextModel(config).eval()


def tiny_sd_backbone(tmp_dir: str | os.PathLike, seed: int = 0, sample_size: int = 16):
    """A tiny random model with SD 1.x's exact block structure and a CLIP text encoder.

    ``sample_size`` latents of side ``s`` give self-attention at s, s/2, s/4, s/8 — the same
    5/5/5/1 layer counts as SD at 64/32/16/8.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from diffuseg.backbones.latent import BackboneConfig, CLIPConditioner, LatentDiffusionBackbone

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size * 8,
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
    )
    tokenizer, text_model = tiny_clip(
        Path(tmp_dir) / "tiny_clip_tokenizer", hidden_size=32, max_length=77, seed=seed
    )
    cfg = BackboneConfig(text_encoder={"type": "clip"}, processing_res=sample_size * 8)
    return LatentDiffusionBackbone(vae, unet, scheduler, CLIPConditioner(tokenizer, text_model), cfg).eval()
