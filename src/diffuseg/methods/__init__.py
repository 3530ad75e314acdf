"""Segmentation methods built on diffusion models: one pipeline class per method.

A small registry maps method names to their pipeline classes so the CLI and
:func:`diffuseg.load_pipeline` load any of them the same way.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["METHODS", "load_pipeline"]

METHODS: dict[str, tuple[str, str, bool]] = {
    # name: (module, class, unsupervised)
    "diffseg": ("diffuseg.methods.diffseg_pipeline", "DiffSegPipeline", True),
    "ddpm-seg": ("diffuseg.methods.ddpm_seg", "DDPMSegPipeline", False),
    "unet-seg": ("diffuseg.methods.dataset_ddpm", "UNetSegmenterPipeline", False),
    "zs3d": ("diffuseg.methods.zs3d", "ZS3DPipeline", False),
    "seg-diffusion": ("diffuseg.methods.seg_diffusion", "SegDiffusionPipeline", False),
    "esda": ("diffuseg.methods.esda", "ESDAPipeline", False),
}


def _entry(method: str) -> tuple[str, str, bool]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[method]


def pipeline_class(method: str) -> type:
    module, cls, _ = _entry(method)
    return getattr(importlib.import_module(module), cls)


def is_unsupervised(method: str) -> bool:
    """True when the method outputs segment ids (scored with Hungarian matching) without class names."""
    return _entry(method)[2]


def load_pipeline(method: str, checkpoint: str | None = None, **kwargs: Any):
    """Load ``method``'s pipeline from ``checkpoint`` (a folder or hub id; ``None``: the shipped default)."""
    return pipeline_class(method).from_pretrained(checkpoint, **kwargs)
