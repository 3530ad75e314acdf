"""DatasetDDPM: synthetic labelled data from a diffusion model, and the small segmenter trained on it.

Baranchuk et al. sample images from the DDPM, label them with the trained pixel-classifier
ensemble, drop the most uncertain 10% (per-image JS uncertainty) and train a segmentation network
(DeepLabV3 there) on the rest. Here the backbone's own sampler generates the images, the labelled
set is written in diffuseg's dataset layout (so every tool reads it), and the network is
:class:`SmallUNet` — small enough to train on this CPU, and the same network trained on the few
real labels is the "from-scratch UNet" baseline of the results table.

The original's filter ``idxs[30: -filter_out_num + 30]`` also drops the 30 *most certain* samples
and keeps 30 of the uncertain ones (and breaks when fewer than 30 are filtered); here exactly the
``drop_fraction`` most uncertain are dropped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from diffuseg.io import atomic_write, default_palette, write_image, write_json, write_label
from diffuseg.methods.base import check_images, parse_classes
from diffuseg.outputs import SegmentationOutput

logger = logging.getLogger(__name__)

__all__ = [
    "SegmenterTask",
    "SmallUNet",
    "UNetSegmenterPipeline",
    "generate_dataset_ddpm",
    "train_segmenter",
]

SEGMENTER_CONFIG = "config.json"
SEGMENTER_WEIGHTS = "model.safetensors"
IGNORE_INDEX = 255


# ============================================================================ the small UNet
class _ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )  # fmt: skip


class SmallUNet(nn.Module):
    """A plain UNet (Ronneberger et al.) with ``len(widths)`` levels: conv-BN-ReLU ×2 per level."""

    def __init__(self, num_classes: int, widths: Sequence[int] = (16, 32, 64), in_channels: int = 3) -> None:
        super().__init__()
        if num_classes < 2 or len(widths) < 2 or min(widths) < 1:
            raise ValueError(
                f"SmallUNet needs ≥ 2 classes and ≥ 2 positive widths, got {num_classes}, {widths}"
            )
        self.num_classes, self.widths = int(num_classes), [int(w) for w in widths]
        self.down = nn.ModuleList()
        cin = in_channels
        for w in self.widths:
            self.down.append(_ConvBlock(cin, w))
            cin = w
        self.up = nn.ModuleList(
            _ConvBlock(self.widths[i + 1] + self.widths[i], self.widths[i])
            for i in reversed(range(len(widths) - 1))
        )
        self.head = nn.Conv2d(self.widths[0], num_classes, 1)

    @property
    def divisor(self) -> int:
        """Input sides must be multiples of this."""
        return 2 ** (len(self.widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.divisor or x.shape[-2] % self.divisor:
            raise ValueError(
                f"SmallUNet input sides must be multiples of {self.divisor}, got {tuple(x.shape[-2:])}"
            )
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


class LabelledArrayDataset(Dataset):
    """Images + label maps in memory, served as ``((3, S, S) in [-1, 1], (S, S) int64)``."""

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], size: int) -> None:
        from diffuseg.backbones.latent import preprocess_images
        from diffuseg.train.ddpm_seg import prepare_label

        if len(images) != len(labels) or not len(images):
            raise ValueError(
                f"need the same non-zero number of images and labels, got {len(images)}, {len(labels)}"
            )
        self.x = preprocess_images(list(images), size)
        self.y = torch.from_numpy(np.stack([prepare_label(lab, size) for lab in labels]))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class SegmenterTask:
    """:class:`~diffuseg.train.TrainTask` for :class:`SmallUNet`: CE (ignore 255), random flips.

    ``val`` (images, labels) adds a val-mIoU to the training log every ``eval_every`` steps.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        class_names: Sequence[str],
        size: int = 64,
        widths: Sequence[int] = (16, 32, 64),
        palette: Sequence[Sequence[int]] | None = None,
        val: tuple[Sequence[np.ndarray], Sequence[np.ndarray]] | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> None:
        self.class_names, self.size, self.widths = list(class_names), int(size), list(widths)
        self.palette, self.provenance = palette, dict(provenance or {})
        self.data = LabelledArrayDataset(images, labels, self.size)
        self.val = LabelledArrayDataset(*val, self.size) if val is not None else None

    def model(self) -> nn.Module:
        return SmallUNet(len(self.class_names), self.widths).train()

    def train_dataset(self) -> Dataset:
        return self.data

    def loss(
        self, model: nn.Module, batch: Any, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = batch
        flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        y = torch.where(flip[:, None, None], y.flip(-1), y)
        logits = model(x)
        loss = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)
        return loss, {}

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        if self.val is None:
            return {}
        from diffuseg.eval import ConfusionMatrix

        cm = ConfusionMatrix(len(self.class_names), IGNORE_INDEX)
        device = next(model.parameters()).device
        for i in range(0, len(self.val), 64):
            x, y = self.val.x[i : i + 64].to(device), self.val.y[i : i + 64]
            cm.update(model(x).argmax(1).cpu().numpy(), y.numpy())
        return {"val_mIoU": float(cm.compute()["metrics"]["mIoU"])}

    def save_pretrained(self, model: nn.Module, out_dir: Path) -> None:
        UNetSegmenterPipeline(
            model, self.class_names, self.size, self.palette, self.provenance
        ).save_pretrained(out_dir)


# ============================================================================ its pipeline
class UNetSegmenterPipeline:
    """A trained :class:`SmallUNet` behind the common pipeline interface (method name ``unet-seg``)."""

    def __init__(
        self,
        model: SmallUNet,
        class_names: Sequence[str],
        resolution: int = 64,
        palette: Sequence[Sequence[int]] | None = None,
        training: dict[str, Any] | None = None,
        batch_size: int = 32,
    ) -> None:
        if len(class_names) != model.num_classes:
            raise ValueError(f"{len(class_names)} class names for a model of {model.num_classes} classes")
        if resolution % model.divisor:
            raise ValueError(f"resolution {resolution} must be a multiple of {model.divisor}")
        self.model, self.class_names = model.eval(), list(class_names)
        self.resolution, self.batch_size = int(resolution), int(batch_size)
        self.palette = [list(map(int, c)) for c in palette] if palette is not None else None
        self.training = dict(training or {})

    @property
    def config(self) -> dict[str, Any]:
        return {
            "_class_name": type(self).__name__,
            "num_classes": self.model.num_classes,
            "widths": self.model.widths,
            "class_names": self.class_names,
            "palette": self.palette,
            "resolution": self.resolution,
            "batch_size": self.batch_size,
            "training": self.training,
        }

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """``config.json`` + ``model.safetensors`` (atomic)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{SEGMENTER_WEIGHTS}.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}, str(tmp))
        os.replace(tmp, out / SEGMENTER_WEIGHTS)
        with atomic_write(out / SEGMENTER_CONFIG, "w") as f:
            json.dump(self.config, f, indent=2)
        return out

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        **overrides: Any,
    ) -> UNetSegmenterPipeline:
        """Load a folder written by :meth:`save_pretrained` (or ``diffuseg train unet-seg``)."""
        from safetensors.torch import load_file

        if checkpoint is None:
            raise ValueError(
                "unet-seg has no shipped model: pass --checkpoint (train one with `diffuseg train unet-seg`)"
            )
        root = Path(checkpoint)
        if not (root / SEGMENTER_CONFIG).is_file():
            raise FileNotFoundError(f"{root} is not a unet-seg checkpoint (no {SEGMENTER_CONFIG})")
        cfg = json.loads((root / SEGMENTER_CONFIG).read_text())
        if cfg.get("_class_name") != cls.__name__:
            raise ValueError(
                f"{root / SEGMENTER_CONFIG} describes a {cfg.get('_class_name')!r}, not a {cls.__name__}"
            )
        model = SmallUNet(cfg["num_classes"], cfg["widths"])
        model.load_state_dict(load_file(str(root / SEGMENTER_WEIGHTS)))
        unknown = sorted(set(overrides) - {"batch_size"})
        if unknown:
            raise ValueError(f"unknown unet-seg settings {unknown}; use batch_size")
        bs = overrides.get("batch_size") or cfg.get("batch_size", 32)
        pipe = cls(model, cfg["class_names"], cfg["resolution"], cfg.get("palette"), cfg.get("training"), bs)
        return pipe.to(device) if device is not None else pipe

    def to(self, device: str | torch.device) -> UNetSegmenterPipeline:
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(
        self,
        images: Any,
        class_names: Sequence[str] | str | None = None,
        output_size: int | None = None,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
    ) -> SegmentationOutput:
        """Segment images (centre-cropped, resized to the training resolution) into the trained classes.

        ``generator`` is accepted for the common interface; prediction is deterministic.
        """
        from diffuseg.backbones.latent import preprocess_images

        del generator
        imgs = check_images(images)
        names = parse_classes(class_names)
        if names is not None and names != self.class_names:
            raise ValueError(
                f"this segmenter was trained for {self.class_names}; got {names}. Pass None or exactly those."
            )
        size = int(output_size or self.resolution)
        device = next(self.model.parameters()).device
        probs = []
        for i in range(0, len(imgs), int(batch_size or self.batch_size)):
            x = preprocess_images(imgs[i : i + (batch_size or self.batch_size)], self.resolution).to(device)
            logits = self.model(x).float()
            if size != self.resolution:
                logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
            probs.append(logits.softmax(1).cpu())
        p = torch.cat(probs)
        return SegmentationOutput(
            labels=p.argmax(1).numpy().astype(np.int64),
            scores=p.numpy().astype(np.float32),
            class_names=list(self.class_names),
        )


def train_segmenter(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    class_names: Sequence[str],
    train_config,
    size: int = 64,
    widths: Sequence[int] = (16, 32, 64),
    palette: Sequence[Sequence[int]] | None = None,
    val: tuple[Sequence[np.ndarray], Sequence[np.ndarray]] | None = None,
    provenance: dict[str, Any] | None = None,
):
    """Train :class:`SmallUNet` with the shared loop (:func:`diffuseg.train.train`; resumable, time-boxed).

    The exported pipeline lands in ``train_config.output_dir/final``. Returns the ``TrainResult``.
    """
    from diffuseg.train import train

    task = SegmenterTask(images, labels, class_names, size, widths, palette, val, provenance)
    return train(task, train_config)


# ============================================================================ DatasetDDPM
def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _batch_prompts(prompts: Sequence[str], start: int, n: int) -> list[str]:
    return [prompts[(start + j) % len(prompts)] for j in range(n)]


def _generate_batch(
    pipe, backbone, prompts: list[str], seed: int, steps: int, guidance: float
) -> dict[str, Any]:
    """Sample one batch and label it with the ensemble."""
    gen = torch.Generator().manual_seed(seed)
    scale = 1.0 if all(p == "" for p in prompts) else guidance  # CFG of "" against "" is a no-op
    images = _to_uint8(backbone.generate(prompts, steps, scale, generator=gen))
    out = pipe(list(images), output_size=images.shape[1])
    return {
        "images": images,
        "labels": out.labels.astype(np.uint8),
        "uncertainty": np.asarray(out.extras["image_uncertainty"], np.float64),
        "prompts": prompts,
    }


def generate_dataset_ddpm(
    pipe,
    out_dir: str | os.PathLike,
    num_images: int,
    prompts: Sequence[str] | None = None,
    drop_fraction: float = 0.1,
    seed: int = 0,
    batch_size: int = 16,
    num_inference_steps: int = 50,
    guidance_scale: float = 3.0,
    backbone=None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Sample ``num_images`` images, label them with ``pipe`` (a DDPMSegPipeline), keep the most certain.

    Writes ``out_dir/img_dir/train``, ``ann_dir/train``, ``meta.json`` (the pipeline's classes) and
    ``uncertainty.jsonl`` (every sample's score and whether it was kept). ``prompts`` are cycled over the
    samples (``None``: the empty prompt, i.e. unconditional sampling as in the paper). Batches are staged
    under ``out_dir/.staging`` with per-batch seeds, so an interrupted run resumes where it stopped.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images and batch_size must be ≥ 1, got {num_images}, {batch_size}")
    if not 0.0 <= drop_fraction < 1.0:
        raise ValueError(f"drop_fraction must be in [0, 1), got {drop_fraction}")
    if (out / "meta.json").exists():
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds a dataset; pass overwrite=True (--overwrite) to replace it"
            )
        for sub in ("img_dir", "ann_dir", "meta.json", "uncertainty.jsonl"):
            p = out / sub
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    backbone = backbone if backbone is not None else getattr(pipe.source, "backbone", None)
    if backbone is None or not hasattr(backbone, "generate"):
        raise ValueError("DatasetDDPM needs a backbone that can sample images (a LatentDiffusionBackbone)")
    plist = list(prompts) if prompts else [""]
    staging = out / ".staging"
    staging.mkdir(parents=True, exist_ok=True)
    num_batches = -(-num_images // batch_size)
    for k in tqdm(range(num_batches), desc="DatasetDDPM", disable=not progress):
        path = staging / f"batch_{k:05d}.npz"
        if path.is_file():
            continue
        n = min(batch_size, num_images - k * batch_size)
        seed_k = int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
        batch = _generate_batch(pipe, backbone, _batch_prompts(plist, k * batch_size, n), seed_k,
                                num_inference_steps, guidance_scale)  # fmt: skip
        with atomic_write(path, "wb") as f:
            np.savez(f, **batch)
    _write_filtered(out, staging, num_batches, drop_fraction, pipe, provenance={
        "num_generated": num_images, "drop_fraction": drop_fraction, "seed": seed,
        "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
        "prompts": "empty (unconditional)" if plist == [""] else f"{len(plist)} prompts, cycled",
        "labeller": pipe.config.get("training", {}).get("data"),
    })  # fmt: skip
    shutil.rmtree(staging)
    return out


def _write_filtered(
    out: Path, staging: Path, num_batches: int, drop_fraction: float, pipe, provenance: dict[str, Any]
) -> None:
    """Drop the ``drop_fraction`` most uncertain samples and write the rest in the dataset layout."""
    batches = [np.load(staging / f"batch_{k:05d}.npz") for k in range(num_batches)]
    unc = np.concatenate([b["uncertainty"] for b in batches])
    prompts = [str(p) for b in batches for p in b["prompts"]]
    n_drop = int(len(unc) * drop_fraction)
    order = np.argsort(unc, kind="stable")
    keep = np.zeros(len(unc), bool)
    keep[order[: len(unc) - n_drop]] = True
    i = 0
    records = []
    for b in batches:
        for img, lab in zip(b["images"], b["labels"], strict=True):
            sid = f"{i:06d}"
            if keep[i]:
                write_image(out / "img_dir" / "train" / f"{sid}.png", img)
                write_label(out / "ann_dir" / "train" / f"{sid}.png", lab)
            records.append(
                {"id": sid, "uncertainty": float(unc[i]), "kept": bool(keep[i]), "prompt": prompts[i]}
            )
            i += 1
    with atomic_write(out / "uncertainty.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    meta = {
        "name": "DatasetDDPM",
        "classes": list(pipe.class_names),
        "palette": pipe.palette or default_palette(len(pipe.class_names)),
        "unseen": [],
        "ignore_index": IGNORE_INDEX,
        "generator": {**provenance, "num_kept": int(keep.sum())},
    }
    write_json(out / "meta.json", meta)
    logger.info("DatasetDDPM: kept %d of %d samples in %s", int(keep.sum()), len(unc), out)
