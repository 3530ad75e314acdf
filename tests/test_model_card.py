"""Shipping a backbone writes fp16 weights, a model card, curves and samples, and loads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffuseg.backbones.latent import LatentDiffusionBackbone
from diffuseg.backbones.presets import tiny_sd_backbone
from diffuseg.train.model_card import read_log, ship_backbone

REPO = Path(__file__).resolve().parents[1]


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


def _gate_inputs(ds: float, fine: list[float], export: str = "E") -> tuple[dict, dict]:
    diffseg = {
        "backbone": export,
        "num_val": 300,
        "date": "2026-12-03",
        "machine": "test",
        "defaults": {
            "kl_threshold": [0.4] * 3,
            "threshold_mode": "relative",
            "timestep": 100,
            "refine": False,
        },
        "results": {"DiffSeg": {"per_image_mIoU": ds}},
        "rgb": {"K-means-C (RGB)": {"per_image_mIoU": 27.8}, "K-means-S (RGB)": {"per_image_mIoU": 28.8}},
        "control": {"DiffSeg": {"per_image_mIoU": 7.0}},
    }
    cells = {
        "ddpm": {"50": {"mIoU": fine, "coarse_mIoU": [40.0, 42.0]}},
        "rgbxy": {"50": {"mIoU": [8.5, 8.7], "coarse_mIoU": [30.0, 31.0]}},
        "random": {"50": {"mIoU": [5.0, 5.5], "coarse_mIoU": [20.0, 21.0]}},
    }
    return diffseg, {"backbone": export, "cells": cells}


def test_backbone_gate_is_strict():
    from diffuseg.train.model_card import backbone_gate

    table, holds = backbone_gate(*_gate_inputs(29.4, [20.0, 22.0]))
    assert holds and "28.8 (K-means-S (RGB))" in table and "21.0 ± 1.0" in table and "**no**" not in table
    # beating K-means-C but not K-means-S is not enough
    table, holds = backbone_gate(*_gate_inputs(28.0, [20.0, 22.0]))
    assert not holds and table.count("**no**") == 1
    table, holds = backbone_gate(*_gate_inputs(29.4, [8.0, 8.2]))
    assert not holds and "| 8.1 ± 0.1 | 8.6 ± 0.1 (RGB+xy) | 5.2 | **no** |" in table
    diffseg, ddpm = _gate_inputs(29.4, [20.0])
    del ddpm["cells"]["rgbxy"]
    with pytest.raises(ValueError, match="no 'rgbxy' cells at N=50"):
        backbone_gate(diffseg, ddpm)


def test_ship_mini_sd_script(tmp_path):
    """Weights step, then the card step: defaults stored, gate in the card, weights unchanged, atomic."""
    import importlib.util

    from diffuseg.data.fashion_scenes import generate_fashion_scenes
    from diffuseg.io import weights_fingerprint

    spec = importlib.util.spec_from_file_location("ship_mini_sd", REPO / "scripts" / "ship_mini_sd.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = generate_fashion_scenes(tmp_path / "data", 4, 3, seed=0, size=64, progress=False)
    export = tmp_path / "export"
    tiny_sd_backbone(tmp_path).save_pretrained(export)
    out = tmp_path / "ckpt" / "mini-sd"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("old")
    mod.main(["--export", str(export), "--out", str(out)])  # step 1: fp16 weights only
    assert not (out / "stale.txt").exists() and not (out / "README.md").exists()
    weights = weights_fingerprint(out)
    assert weights != weights_fingerprint(export)  # fp32 -> fp16

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"kind": "train", "step": s, "loss": 1.0 / s, "time": 10.0 * s} for s in (1, 2)]
    rows.append(
        {"kind": "eval", "step": 2, "attn_entropy_16": 0.99, "attn_entropy_8": 0.9, "diffseg_mIoU_q0.2": 24.0}
    )
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    diffseg, ddpm = _gate_inputs(29.4, [20.0, 22.0], export=str(out))
    ddpm["backbone_weights"] = weights
    (tmp_path / "d.json").write_text(json.dumps(diffseg))
    (tmp_path / "p.json").write_text(json.dumps(ddpm))
    argv = ["--out", str(out), "--unet-run", str(run), "--data", str(data)]
    argv += ["--diffseg", str(tmp_path / "d.json"), "--ddpmseg", str(tmp_path / "p.json")]
    mod.main(argv)  # step 3: defaults + card
    card = (out / "README.md").read_text()
    assert "the quality gate holds" in card and "29.4" in card and "VAE reconstruction PSNR" in card
    assert weights_fingerprint(out) == weights and not out.with_name("mini-sd.partial").exists()
    loaded = LatentDiffusionBackbone.from_pretrained(out)
    assert loaded.config.method_defaults["diffseg"]["timestep"] == 100
    # results measured on other weights or another folder are refused, and the card step needs its inputs
    ddpm["backbone_weights"] = "sha256:0"
    (tmp_path / "p.json").write_text(json.dumps(ddpm))
    with pytest.raises(SystemExit, match="measured on weights"):
        mod.main(argv)
    diffseg["backbone"] = str(export)
    (tmp_path / "d.json").write_text(json.dumps(diffseg))
    with pytest.raises(SystemExit, match="not on"):
        mod.main(argv)
    with pytest.raises(SystemExit):
        mod.main(["--out", str(out)])
