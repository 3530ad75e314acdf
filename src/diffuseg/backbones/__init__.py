"""Diffusion backbones and the hooks that read attention maps and features out of them."""

from diffuseg.backbones.attention import AttentionStore, attention_layer_names, capture_attention
from diffuseg.backbones.features import UNetFeatureExtractor, capture_outputs, upsample_concat
from diffuseg.backbones.latent import LatentDiffusionBackbone, preprocess_images

__all__ = [
    "AttentionStore",
    "LatentDiffusionBackbone",
    "UNetFeatureExtractor",
    "attention_layer_names",
    "capture_attention",
    "capture_outputs",
    "preprocess_images",
    "upsample_concat",
]
