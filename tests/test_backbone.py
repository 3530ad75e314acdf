"""LatentDiffusionBackbone loading, encoding, attention capture and feature hooks on SD-shaped tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffuseg.backbones import (
    LatentDiffusionBackbone,
    UNetFeatureExtractor,
    attention_layer_names,
    capture_attention,
    preprocess_images,
    upsample_concat,
)
from diffuseg.backbones.attention import CaptureAttnProcessor
from diffuseg.backbones.presets import tiny_sd_backbone


@pytest.fixture(scope="module")
def saved_tiny_sd(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_sd")
    model = tiny_sd_backbone(d)
    model.save_pretrained(d / "model")
    return model, d / "model"


def test_save_load_roundtrip_is_exact(saved_tiny_sd):
    model, path = saved_tiny_sd
    for sub in ("vae", "unet", "scheduler", "text_encoder", "tokenizer"):
        assert (path / sub).is_dir()
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = LatentDiffusionBackbone.from_pretrained(path)
    for a, b in zip(model.unet.state_dict().values(), loaded.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert loaded.config.processing_res == 128
    assert torch.equal(model.encode_text(["a red bag"]), loaded.encode_text(["a red bag"]))


def test_from_pretrained_offline_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="must already be cached"):
        LatentDiffusionBackbone.from_pretrained("someone/not-cached-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="diffusers layout"):
        LatentDiffusionBackbone.from_pretrained(tmp_path / "empty")


def test_sd_layer_names_and_counts(saved_tiny_sd):
    model, _ = saved_tiny_sd
    names = attention_layer_names(model.unet, "attn1")
    assert len(names) == 16
    assert names[0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert "mid_block.attentions.0.transformer_blocks.0.attn1" in names
    assert "up_blocks.3.attentions.2.transformer_blocks.0.attn1" in names
    z = model.encode_image(np.zeros((128, 128, 3), np.uint8))
    with capture_attention(model.unet, cross_attention=True) as store:
        model.unet_forward(z, 300, model.encode_text(""))
    # SD 1.x at 512 px: 5/5/5/1 self-attention layers at 64/32/16/8; here latents are 16 -> 16/8/4/2
    assert store.layer_counts("attn1") == {16: 5, 8: 5, 4: 5, 2: 1}
    assert store.layer_counts("attn2") == {16: 5, 8: 5, 4: 5, 2: 1}


def test_capture_is_exact_distributions_and_restores(saved_tiny_sd):
    model, _ = saved_tiny_sd
    unet = model.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = model.encode_text(["", "a cat"])
    ref = model.unet_forward(z, 300, text)
    with capture_attention(unet) as store:
        out = model.unet_forward(z, 300, text)
        captured = {k for k, v in unet.attn_processors.items() if isinstance(v, CaptureAttnProcessor)}
    assert torch.allclose(out, ref, atol=1e-5)
    assert all(k.endswith("attn1.processor") for k in captured) and len(captured) == 16
    maps = store.by_resolution("attn1")
    assert list(maps) == [16, 8, 4, 2]
    assert maps[16].shape == (2, 256, 256)
    assert torch.allclose(maps[16].sum(-1), torch.ones(2, 256), atol=1e-5)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def test_capture_restores_on_error_and_filters_layers(saved_tiny_sd):
    model, _ = saved_tiny_sd
    before = dict(model.unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"), capture_attention(model.unet, layer_pattern="^up_blocks"):
        captured = [k for k, v in model.unet.attn_processors.items() if isinstance(v, CaptureAttnProcessor)]
        assert captured and all(k.startswith("up_blocks") for k in captured)
        raise RuntimeError("boom")
    assert dict(model.unet.attn_processors) == before
    with (
        pytest.raises(ValueError, match="no attention layers"),
        capture_attention(model.unet, layer_pattern="nope"),
    ):
        pass


def test_preprocess_crops_and_resizes_any_size():
    img = np.zeros((100, 60, 3), np.uint8)
    img[:, :30] = 255
    x = preprocess_images(img, 32)
    assert x.shape == (1, 3, 32, 32)
    assert x.min() >= -1 and x.max() <= 1
    assert preprocess_images([img, img], None).shape == (2, 3, 60, 60)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_images([np.zeros((8, 8), np.float32)], 8)
    with pytest.raises(ValueError, match="different sizes"):
        preprocess_images([img, np.zeros((40, 40, 3), np.uint8)], None)


def test_encode_image_uses_posterior_mean(saved_tiny_sd):
    model, _ = saved_tiny_sd
    img = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    a, b = model.encode_image(img), model.encode_image(img)
    assert torch.equal(a, b)  # deterministic: no posterior sampling
    with pytest.raises(ValueError, match="multiple of the VAE factor"):
        model.encode_image(img, processing_res=100)


def test_feature_extractor_shared_noise_and_shapes(saved_tiny_sd):
    model, _ = saved_tiny_sd
    fx = UNetFeatureExtractor(model.unet, model.scheduler, ["up_blocks.1", "up_blocks.3"], [50, 150])
    z = torch.randn(3, 4, 16, 16)
    text = model.encode_text([""] * 3)
    feats = fx(z, text)
    assert len(feats) == 4
    assert feats[0].shape == (3, 16, 8, 8) and feats[1].shape == (3, 8, 16, 16)
    # one shared noise: the same image gives the same features in any batch
    again = fx(z[1:2], text[:1])
    assert torch.allclose(again[1][0], feats[1][1], atol=1e-5)
    up = upsample_concat(feats, (32, 32))
    assert up.shape == (3, 16 + 8 + 16 + 8, 32, 32)
    with pytest.raises(ValueError, match="unknown UNet layers"):
        UNetFeatureExtractor(model.unet, model.scheduler, ["up_blocks.9"], [50])(z, text)
    with pytest.raises(ValueError, match="outside"):
        UNetFeatureExtractor(model.unet, model.scheduler, ["up_blocks.1"], [5000])


def test_feature_extractor_on_unconditional_unet():
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        layers_per_block=1,
    )
    fx = UNetFeatureExtractor(unet, DDPMScheduler(), ["up_blocks.0", "up_blocks.1"], [10])
    feats = fx(torch.randn(2, 3, 16, 16))
    assert [f.shape[1] for f in feats] == [16, 8]


def test_generate_shapes_and_seed(saved_tiny_sd):
    model, _ = saved_tiny_sd
    a = model.generate(["a bag"], num_inference_steps=2, generator=torch.Generator().manual_seed(1))
    b = model.generate(["a bag"], num_inference_steps=2, generator=torch.Generator().manual_seed(1))
    assert a.shape == (1, 3, 128, 128) and torch.equal(a, b)
    with pytest.raises(ValueError, match="at least one prompt"):
        model.generate([], num_inference_steps=2)


def test_fp16_weights_load_as_float32(tmp_path, saved_tiny_sd):
    model, _ = saved_tiny_sd
    model.save_pretrained(tmp_path / "half", fp16=True)
    assert next(model.unet.parameters()).dtype == torch.float32  # saving did not change the live model
    loaded = LatentDiffusionBackbone.from_pretrained(tmp_path / "half")
    assert loaded.dtype == torch.float32 and loaded.vae.dtype == torch.float32
    ref = model.unet_forward(torch.zeros(1, 4, 16, 16), 10, model.encode_text(""))
    out = loaded.unet_forward(torch.zeros(1, 4, 16, 16), 10, loaded.encode_text(""))
    assert torch.allclose(ref, out, atol=1e-2)
