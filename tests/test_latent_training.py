"""The mini-SD's two training stages end to end on the committed sample scenes (a few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffuseg.backbones.latent import LatentDiffusionBackbone
from diffuseg.train.latent_diffusion import min_snr_weights, psnr, random_crop_flip, train_unet, train_vae
from diffuseg.train.loop import load_yaml_config

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "fashion_scenes"


def _config(**over):
    cfg = load_yaml_config(REPO / "configs" / "mini-sd.yaml")
    for stage in ("vae", "unet"):
        cfg[stage]["train"].update(
            batch_size=2, checkpoint_every=1, log_every=1, eval_every=2, warmup_steps=1
        )
        cfg[stage]["num_val"] = 4
    cfg["vae"]["train"]["max_steps"] = over.get("vae_steps", 2)
    cfg["unet"]["train"]["max_steps"] = over.get("unet_steps", 2)
    return cfg


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    result = train_vae(DATA, out, _config(), progress=False)
    assert result.finished and result.step == 2
    return out


def test_vae_stage_exports_with_scaling_factor(vae_run):
    cfg = json.loads((vae_run / "vae" / "config.json").read_text())
    assert cfg["latent_channels"] == 4 and cfg["scaling_factor"] != 1.0
    evals = [json.loads(x) for x in (vae_run / "log.jsonl").read_text().splitlines()]
    assert any("val_psnr" in r for r in evals)


def test_unet_stage_trains_resumes_and_exports(vae_run, tmp_path):
    out = tmp_path / "unet"
    first = train_unet(DATA, vae_run, out, _config(unet_steps=2), progress=False)
    assert first.finished and (out / "latent_cache" / "done.json").is_file()
    second = train_unet(DATA, vae_run, out, _config(unet_steps=3), progress=False, export=tmp_path / "exp")
    assert second.step == 3  # resumed from step 2, not restarted
    model = LatentDiffusionBackbone.from_pretrained(tmp_path / "exp")
    assert model.config.text_encoder["type"] == "minilm" and model.config.processing_res == 64
    assert model.encode_image(torch.zeros(1, 3, 64, 64)).shape == (1, 4, 16, 16)
    probe = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"eval"' in x]
    assert "attn_entropy_16" in probe[0] and any(k.startswith("diffseg_mIoU") for k in probe[0])
    assert train_unet(DATA, vae_run, out, _config(), export=tmp_path / "exp2", export_only=True) is None
    assert (tmp_path / "exp2" / "unet" / "config.json").is_file()


def test_helpers():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 8, 8)
    y = random_crop_flip(x, 4, g)
    assert y.shape == (3, 3, 4, 4)
    assert torch.equal(random_crop_flip(x, 4, torch.Generator().manual_seed(0)), y)  # generator-driven
    assert psnr(x, x) > 90
    from diffusers import DDPMScheduler

    w = min_snr_weights(DDPMScheduler(), torch.tensor([1, 500, 999]), 5.0)
    assert w[0] < 1 and torch.isclose(
        w[2], torch.tensor(1.0)
    )  # high-SNR steps down-weighted, low-SNR untouched


def test_min_snr_floor_keeps_an_x0_weight_at_high_noise():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(prediction_type="v_prediction")
    t = torch.tensor([1, 500, 999])
    ac = sched.alphas_cumprod[t]
    snr = ac / (1 - ac)
    plain, floored = min_snr_weights(sched, t, 5.0), min_snr_weights(sched, t, 5.0, floor=1.0)
    x0_plain, x0_floored = plain * (snr + 1), floored * (snr + 1)  # v-MSE = (SNR+1) x0-MSE
    assert x0_plain[2] < 1e-3 and torch.isclose(x0_floored[2], torch.tensor(1.0))  # t = T: 0 -> 1
    assert torch.isclose(x0_floored[0], torch.tensor(5.0))  # low noise: the γ cap is unchanged
    assert torch.equal(min_snr_weights(sched, t, 5.0, floor=0.0), plain)
