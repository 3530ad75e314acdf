"""Shipping a backbone writes fp16 weights, a model card, curves and samples, and loads back."""

from __future__ import annotations

import json

import torch

from diffuseg.backbones.latent import LatentDiffusionBackbone
from diffuseg.backbones.presets import tiny_sd_backbone
from diffuseg.train.model_card import read_log, ship_backbone


def test_ship_backbone(tmp_path):
    model = tiny_sd_backbone(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"kind": "train", "step": s, "loss": 1.0 / s, "time": 10.0 * s} for s in (1, 2, 3)]
    rows.append({"kind": "eval", "step": 3, "val_psnr": 20.0})
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert len(read_log(run, "train")) == 3 and read_log(run, "eval")[0]["val_psnr"] == 20.0
    out = ship_backbone(
        model,
        tmp_path / "ship",
        command="bash train.sh",
        data="toy",
        runs={"unet": run},
        metrics={"VAE PSNR (dB)": 20.0},
        status="test",
        prompts=("a bag",),
        sample_steps=2,
    )
    card = (out / "README.md").read_text()
    assert "bash train.sh" in card and "VAE PSNR (dB) | 20.0" in card and "3 steps" in card
    assert "Not measured yet" in card
    for name in ("loss.png", "samples.png", "unet/diffusion_pytorch_model.safetensors"):
        assert (out / name).is_file()
    loaded = LatentDiffusionBackbone.from_pretrained(out)
    assert loaded.dtype == torch.float32
