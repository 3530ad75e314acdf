"""Datasets: the FashionScenes generator, SegFolder, dataset specs and converters.

Everything here reads or writes the one folder layout of DESIGN.md, so methods and evaluation
never see dataset-specific formats.
"""

from __future__ import annotations

from diffuseg.data.converters import CONVERTERS, convert_dataset
from diffuseg.data.fashion_mnist import DEFAULT_FASHION_MNIST_DIR, load_fashion_mnist
from diffuseg.data.fashion_scenes import (
    FASHION_SCENES_CLASSES,
    FASHION_SCENES_COARSE_GROUPS,
    FASHION_SCENES_UNSEEN,
    FashionScenesConfig,
    FashionScenesGenerator,
    generate_fashion_scenes,
    render_scenes,
)
from diffuseg.data.segfolder import SegFolder, load_meta, read_split_file, reduce_zero_label
from diffuseg.data.specs import DATASET_SPECS, DatasetSpec, get_dataset_spec

__all__ = [
    "CONVERTERS",
    "DATASET_SPECS",
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_SCENES_CLASSES",
    "FASHION_SCENES_COARSE_GROUPS",
    "FASHION_SCENES_UNSEEN",
    "DatasetSpec",
    "FashionScenesConfig",
    "FashionScenesGenerator",
    "SegFolder",
    "convert_dataset",
    "generate_fashion_scenes",
    "get_dataset_spec",
    "load_fashion_mnist",
    "load_meta",
    "read_split_file",
    "reduce_zero_label",
    "render_scenes",
]
