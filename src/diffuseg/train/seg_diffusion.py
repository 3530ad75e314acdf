"""Fine-tuning a latent diffusion model for Seg-diffusion, Marigold-style, on the shared loop.

What is trained: the UNet of a :class:`~diffuseg.backbones.latent.LatentDiffusionBackbone`,
its ``conv_in`` widened to ``[image latent ; noisy mask latent]`` with Marigold's
repeat-and-halve initialisation (the widened layer first computes exactly what the pretrained
one did, so fine-tuning starts from the pretrained function instead of from noise). VAE and text
encoder stay frozen, so everything they produce is computed once:

* a **cache** (memory-mapped ``.npy``) of image latents and of the latents of every
  (image, seen class) binary mask, rendered as an image in [-1, 1] (white = class) and
  VAE-encoded, plus the latent of the empty mask;
* the prompt embeddings of every (seen class, template) pair, recomputed at start (a few dozen
  prompts).

Each training sample is one (image, class) pair: the UNet is conditioned on the prompt of that
one class and denoises its mask. With probability ``negative_prob`` the prompt is swapped for a
seen class *absent* from the image and the target for the empty mask, so the model also learns
to answer "nothing here" — which is what makes a fixed background threshold work at inference.
Unseen classes never appear: images containing them are left out by default, and their names
are never encoded.

Recipe from Marigold v1.1: v-prediction on a zero-terminal-SNR schedule with trailing timesteps
(few-step DDIM works from t=999), multi-resolution (pyramid) noise annealed with t, plain MSE.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from diffuseg.io import atomic_write, read_image, read_label, write_json
from diffuseg.methods.seg_diffusion import METHOD, SegDiffusionConfig, SegDiffusionPipeline
from diffuseg.utils import dataclass_from_dict

logger = logging.getLogger(__name__)

__all__ = [
    "SegDiffusionSettings",
    "SegDiffusionTask",
    "SegPairDataset",
    "build_cache",
    "configure_scheduler",
    "load_base_backbone",
    "multires_noise",
    "render_mask",
    "sample_prompts",
    "train_seg_diffusion",
    "widen_conv_in",
    "write_model_card",
]

CACHE_FILES = ("image_latents.npy", "mask_latents.npy", "pairs.npy", "absent.npy", "empty_latent.npy")
PREDICTION_TYPES = ("v_prediction", "epsilon", "sample")
RANDOM_INIT = "random-init"


# ----------------------------------------------------------------------------------------- settings
@dataclass
class SegDiffusionSettings:
    """The ``data:`` and ``model:`` sections of ``configs/seg-diffusion.yaml``."""

    # data
    unseen: list[str] | None = None  # None: the dataset's meta.json "unseen"
    exclude_unseen_images: bool = True  # leave out images that contain an unseen class
    min_pixels: int = 16  # a class is a positive only with this many pixels in the image
    max_train_images: int | None = None
    processing_res: int | None = None  # None: the backbone's
    # model
    prompt_templates: list[str] = field(default_factory=lambda: ["a {}", "a photo of a {}", "{}"])
    negative_prob: float = 0.2  # P(prompt an absent seen class, target = empty mask)
    prediction_type: str = "v_prediction"
    zero_snr: bool = True
    multires_noise_strength: float | None = 0.9  # None: plain Gaussian noise
    multires_noise_annealed: bool = True  # strength × t / T (Marigold)
    num_val: int = 32  # val images scored during training (1 member, val_denoise_steps)
    val_denoise_steps: int = 1
    card_samples: int = 3  # val images shown in the model card's sample picture

    def __post_init__(self) -> None:
        checks = [
            (self.min_pixels >= 1, f"min_pixels must be >= 1, got {self.min_pixels}"),
            (
                self.max_train_images is None or self.max_train_images >= 1,
                "max_train_images must be >= 1 or null (all)",
            ),
            (
                bool(self.prompt_templates) and all(t.count("{}") == 1 for t in self.prompt_templates),
                f"prompt_templates must be a non-empty list of strings with one '{{}}', "
                f"got {self.prompt_templates!r}",
            ),
            (0.0 <= self.negative_prob < 1.0, f"negative_prob must be in [0, 1), got {self.negative_prob}"),
            (
                self.prediction_type in PREDICTION_TYPES,
                f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}",
            ),
            (
                not (self.zero_snr and self.prediction_type == "epsilon"),
                "zero_snr needs prediction_type v_prediction or sample (ε is undefined at SNR 0)",
            ),
            (
                self.multires_noise_strength is None or 0.0 <= self.multires_noise_strength < 1.0,
                "multires_noise_strength must be in [0, 1) or null",
            ),
            (self.num_val >= 0, f"num_val must be >= 0, got {self.num_val}"),
            (self.val_denoise_steps >= 1, f"val_denoise_steps must be >= 1, got {self.val_denoise_steps}"),
            (self.card_samples >= 0, f"card_samples must be >= 0, got {self.card_samples}"),
        ]
        errors = [msg for ok, msg in checks if not ok]
        if errors:
            raise ValueError("invalid seg-diffusion training settings: " + "; ".join(errors))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SegDiffusionSettings:
        """Merge the ``data`` and ``model`` sections; unknown keys are refused with the valid ones."""
        values = {**(config.get("data") or {}), **(config.get("model") or {})}
        return dataclass_from_dict(cls, values, "seg-diffusion")


# ----------------------------------------------------------------------------------------- model
def widen_conv_in(unet: nn.Module, in_channels: int | None = None) -> nn.Module:
    """Widen ``unet.conv_in`` to ``in_channels`` by repeating its weights and dividing.

    The default is ``2 × out_channels`` (image latent + mask latent), so a second call is a no-op.

    Marigold's initialisation: with the weights repeated k times and scaled by 1/k, the layer
    gives exactly its pretrained output when each of the k input blocks carries the same latent,
    so the fine-tuning starts from the pretrained function (the original Seg-diffusion used a
    random init through ``ignore_mismatched_sizes``). The bias is kept.
    """
    old = unet.conv_in
    target = int(in_channels or 2 * unet.config.out_channels)
    if target == old.in_channels:
        return unet
    if target % old.in_channels:
        raise ValueError(f"in_channels={target} is not a multiple of the current {old.in_channels}")
    k = target // old.in_channels
    new = nn.Conv2d(
        target,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(old.weight.repeat(1, k, 1, 1) / k)
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=target)
    logger.info("widened conv_in %d -> %d input channels (repeat-and-halve)", old.in_channels, target)
    return unet


def configure_scheduler(scheduler, prediction_type: str = "v_prediction", zero_snr: bool = True):
    """A DDPM scheduler with Marigold v1.1's settings, kept in the exported checkpoint.

    Zero terminal SNR makes t=999 pure noise, as it is at inference; with trailing spacing the
    first DDIM step then starts there, and v-prediction keeps the x0 estimate finite.
    """
    from diffusers import DDPMScheduler

    if zero_snr and prediction_type == "epsilon":
        raise ValueError("zero_snr needs prediction_type v_prediction or sample")
    return DDPMScheduler.from_config(
        scheduler.config,
        prediction_type=prediction_type,
        rescale_betas_zero_snr=zero_snr,
        timestep_spacing="trailing",
    )


def load_base_backbone(backbone: str | os.PathLike | None):
    """The backbone to fine-tune: a folder or hub id, ``None`` (shipped mini-SD) or ``"random-init"``.

    ``"random-init"`` is the mini-SD architecture with random weights: the control of the
    result tables, and a way to smoke-test the trainer before the mini-SD is trained.
    """
    from diffuseg.backbones.latent import LatentDiffusionBackbone

    if backbone is not None and str(backbone) == RANDOM_INIT:
        from diffuseg.backbones.presets import MINI_SD, build_backbone

        return build_backbone(MINI_SD).eval().requires_grad_(False)
    return LatentDiffusionBackbone.from_pretrained(backbone)


def multires_noise(
    shape: Sequence[int], strength: float | torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Multi-resolution (pyramid) noise as Marigold trains with, drawn on the CPU from ``generator``.

    Gaussian noise plus upsampled coarser Gaussian noise at random scale factors in [2, 4) per
    level, level i weighted by ``strength**i`` (per sample when ``strength`` is a ``(B,)``
    tensor), rescaled to unit standard deviation. Low frequencies get more noise than i.i.d.
    Gaussian noise gives them, so large structures (whole masks) are learnt earlier.
    """
    b, c, h, w = (int(v) for v in shape)
    s = torch.as_tensor(strength, dtype=torch.float32).reshape(-1, 1, 1, 1)
    noise = torch.randn((b, c, h, w), generator=generator)
    for i in range(10):
        r = float(torch.rand(1, generator=generator)) * 2 + 2
        hh, ww = max(1, int(h / r**i)), max(1, int(w / r**i))
        coarse = torch.randn((b, c, hh, ww), generator=generator)
        noise += F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * s**i
        if hh == 1 or ww == 1:
            break
    return noise / noise.std()


def sample_prompts(
    classes: torch.Tensor, absent: torch.Tensor, negative_prob: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Swap some positive classes for absent ones: returns ``(classes, is_negative)`` (CPU tensors).

    Each sample becomes a negative with probability ``negative_prob``, taking a uniformly drawn
    class among those with no pixel in its image; an image with every class present stays positive.
    """
    classes, absent = classes.cpu().long(), absent.cpu().bool()
    b, s = absent.shape
    want = torch.rand(b, generator=generator) < negative_prob
    scores = torch.rand((b, s), generator=generator).masked_fill(~absent, -1.0)
    negative = want & absent.any(1)
    return torch.where(negative, scores.argmax(1), classes), negative


# ----------------------------------------------------------------------------------------- data
def render_mask(label: np.ndarray, class_id: int) -> np.ndarray:
    """One class of a label map as a uint8 RGB image: white where the class is, black elsewhere.

    Ignore pixels render as background (black): a latent target cannot leave pixels out.
    """
    m = (np.asarray(label) == class_id).astype(np.uint8) * 255
    return np.repeat(m[..., None], 3, axis=2)


def _split_ids(data_dir: Path, split: str) -> list[str]:
    folder = data_dir / "ann_dir" / split
    ids = sorted(p.stem for p in folder.glob("*.png"))
    if not ids:
        raise FileNotFoundError(f"{folder}: no label maps; is {data_dir} a dataset in the mmseg layout?")
    return ids


def _image_path(data_dir: Path, split: str, sid: str) -> Path:
    matches = sorted((data_dir / "img_dir" / split).glob(f"{sid}.*"))
    if not matches:
        raise FileNotFoundError(f"no image for label {sid} in {data_dir / 'img_dir' / split}")
    return matches[0]


@dataclass
class _Scan:
    """Pass 1 over the labels: which images are kept and which (image, class) pairs they give."""

    ids: list[str]
    pairs: np.ndarray  # (P, 3): kept-image row, seen-class index, dataset class id
    absent: np.ndarray  # (N, S) bool: seen class has no pixel in the image
    skipped_unseen: int


def _scan_labels(
    data_dir: Path, classes: list[str], seen: list[str], unseen: list[str], settings: SegDiffusionSettings
) -> _Scan:
    ids_all = _split_ids(data_dir, "train")
    seen_ids = np.array([classes.index(n) for n in seen])
    unseen_ids = [classes.index(n) for n in unseen]
    ids, pairs, absent, skipped = [], [], [], 0
    for sid in ids_all:
        label = read_label(data_dir / "ann_dir" / "train" / f"{sid}.png")
        counts = np.bincount(label[label < len(classes)].ravel(), minlength=len(classes))
        if settings.exclude_unseen_images and any(counts[u] > 0 for u in unseen_ids):
            skipped += 1
            continue
        row = len(ids)
        ids.append(sid)
        absent.append(counts[seen_ids] == 0)
        pairs += [(row, j, int(c)) for j, c in enumerate(seen_ids) if counts[c] >= settings.min_pixels]
        if settings.max_train_images and len(ids) >= settings.max_train_images:
            break
    if not pairs:
        raise ValueError(
            f"{data_dir}: no training pairs (no seen class with >= {settings.min_pixels} pixels)"
        )
    return _Scan(ids, np.array(pairs, dtype=np.int64), np.array(absent, dtype=bool), skipped)


def _fingerprint(module: nn.Module) -> str:
    """A hash of a module's weights: a cache built with another VAE is not reused."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def build_cache(
    backbone,
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    settings: SegDiffusionSettings,
    unseen: Sequence[str],
    progress: bool = True,
    chunk: int = 64,
) -> Path:
    """Encode the kept training images and their per-class masks once; later runs reuse the cache.

    Streams: labels are scanned first to size memory-mapped arrays, then images are read and
    encoded ``chunk`` at a time, so no split is ever held in memory. Files are written under
    temporary names and renamed; ``done.json`` (written last) records the settings and the VAE
    hash, and a cache whose record differs is rebuilt.
    """
    from diffuseg.eval.runner import load_meta

    data_dir, cache_dir = Path(data_dir).resolve(), Path(cache_dir)
    meta = load_meta(data_dir)
    classes = list(meta["classes"])
    seen = _seen_classes(classes, unseen)
    res = backbone.config.processing_res if settings.processing_res is None else settings.processing_res
    key = {
        "data_dir": str(data_dir),
        "classes": classes,
        "seen": seen,
        "unseen": list(unseen),
        "exclude_unseen_images": settings.exclude_unseen_images,
        "min_pixels": settings.min_pixels,
        "max_train_images": settings.max_train_images,
        "processing_res": res,
        "vae": _fingerprint(backbone.vae),
    }
    done = cache_dir / "done.json"
    if done.is_file() and json.loads(done.read_text()).get("key") == key:
        logger.info("reusing the cache in %s", cache_dir)
        return cache_dir
    if cache_dir.exists():
        logger.info("cache in %s was built with other settings: rebuilding", cache_dir)
        shutil.rmtree(cache_dir)
    cache_dir.mkdir(parents=True)
    scan = _scan_labels(data_dir, classes, seen, list(unseen), settings)
    logger.info(
        "seg-diffusion cache: %d images (%d left out for unseen classes), %d (image, class) pairs",
        len(scan.ids),
        scan.skipped_unseen,
        len(scan.pairs),
    )
    _encode_into_cache(backbone, data_dir, cache_dir, scan, res, progress, chunk)
    write_json(
        done,
        {
            "key": key,
            "num_images": len(scan.ids),
            "num_pairs": len(scan.pairs),
            "skipped_unseen_images": scan.skipped_unseen,
            "ids": scan.ids,
        },
    )
    return cache_dir


def _seen_classes(classes: list[str], unseen: Sequence[str]) -> list[str]:
    """Foreground classes minus the unseen ones; index 0 is the background and never prompted."""
    bad = [u for u in unseen if u not in classes]
    if bad:
        raise ValueError(f"unseen classes {bad} are not among the dataset's classes {classes}")
    return [c for i, c in enumerate(classes) if i != 0 and c not in set(unseen)]


def _encode_into_cache(
    backbone, data_dir: Path, cache_dir: Path, scan: _Scan, res: int | None, progress: bool, chunk: int
) -> None:
    """Pass 2: encode images and rendered masks into ``.tmp_*`` memmaps, then rename them into place."""
    first = read_image(_image_path(data_dir, "train", scan.ids[0]))
    probe = backbone.encode_image([first], processing_res=res)
    shape = tuple(probe.shape[1:])
    tmp = {name: cache_dir / f".tmp_{name}" for name in CACHE_FILES}
    images = np.lib.format.open_memmap(tmp["image_latents.npy"], "w+", np.float16, (len(scan.ids), *shape))
    masks = np.lib.format.open_memmap(tmp["mask_latents.npy"], "w+", np.float16, (len(scan.pairs), *shape))
    pair_rows = {}
    for p, (row, _, _) in enumerate(scan.pairs):
        pair_rows.setdefault(int(row), []).append(p)
    bar = tqdm(total=len(scan.ids), desc="encoding", disable=not progress)
    for s in range(0, len(scan.ids), chunk):
        rows = list(range(s, min(s + chunk, len(scan.ids))))
        imgs = [read_image(_image_path(data_dir, "train", scan.ids[r])) for r in rows]
        images[rows[0] : rows[-1] + 1] = backbone.encode_image(imgs, processing_res=res).float().cpu().numpy()
        todo = [(p, j) for j, r in enumerate(rows) for p in pair_rows.get(r, [])]
        if todo:
            labels = {r: read_label(data_dir / "ann_dir" / "train" / f"{scan.ids[r]}.png") for r in rows}
            rendered = [render_mask(labels[rows[j]], int(scan.pairs[p, 2])) for p, j in todo]
            for a in range(0, len(rendered), chunk):
                z = backbone.encode_image(rendered[a : a + chunk], processing_res=res).float().cpu().numpy()
                masks[[p for p, _ in todo[a : a + chunk]]] = z
        bar.update(len(rows))
    bar.close()
    images.flush()
    masks.flush()
    del images, masks
    empty = backbone.encode_image([np.zeros_like(first)], processing_res=res)[0].float().cpu().numpy()
    for name, arr in (("pairs.npy", scan.pairs), ("absent.npy", scan.absent), ("empty_latent.npy", empty)):
        with open(tmp[name], "wb") as f:
            np.save(f, arr)
    for name, path in tmp.items():
        os.replace(path, cache_dir / name)


class SegPairDataset(Dataset):
    """Memory-mapped (image latent, mask latent, seen-class index, absent classes) samples."""

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        cache_dir = Path(cache_dir)
        missing = [n for n in CACHE_FILES if not (cache_dir / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{cache_dir}: incomplete cache (missing {missing}); rebuild it")
        self.images = np.load(cache_dir / "image_latents.npy", mmap_mode="r")
        self.masks = np.load(cache_dir / "mask_latents.npy", mmap_mode="r")
        self.pairs = np.load(cache_dir / "pairs.npy")
        self.absent = np.load(cache_dir / "absent.npy")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row, cls, _ = (int(v) for v in self.pairs[i])
        return {
            "image": torch.from_numpy(np.array(self.images[row], dtype=np.float32)),
            "mask": torch.from_numpy(np.array(self.masks[i], dtype=np.float32)),
            "cls": torch.tensor(cls, dtype=torch.long),
            "absent": torch.from_numpy(self.absent[row].copy()),
        }


# ----------------------------------------------------------------------------------------- task
class SegDiffusionTask:
    """Seg-diffusion fine-tuning as a :class:`~diffuseg.train.loop.TrainTask`."""

    def __init__(
        self,
        backbone,
        cache_dir: str | os.PathLike,
        settings: SegDiffusionSettings,
        pipeline_defaults: dict[str, Any] | None = None,
        val_data_dir: str | os.PathLike | None = None,
        info: dict[str, Any] | None = None,
        run_dir: str | os.PathLike | None = None,
    ) -> None:
        self.backbone, self.settings = backbone, settings
        self.run_dir = Path(run_dir) if run_dir is not None else None  # its log gives the card's history
        self.cache_dir = Path(cache_dir)
        record = json.loads((self.cache_dir / "done.json").read_text())["key"]
        self.classes, self.seen, self.unseen = record["classes"], record["seen"], record["unseen"]
        if record["processing_res"] != backbone.config.processing_res:
            backbone.config.processing_res = int(record["processing_res"])
        widen_conv_in(backbone.unet)
        backbone.scheduler = configure_scheduler(
            backbone.scheduler, settings.prediction_type, settings.zero_snr
        )
        self.prompts = self._encode_prompts()  # (S, T, L, D)
        self.empty = torch.from_numpy(np.load(self.cache_dir / "empty_latent.npy")).float()
        self.pipeline_defaults = SegDiffusionConfig.from_dict(
            {"prompt_template": settings.prompt_templates[0], "class_names": self.classes}
            | dict(pipeline_defaults or {})
        ).to_dict()
        self.val_data_dir = Path(val_data_dir) if val_data_dir is not None else None
        self.info = dict(info or {})
        self.last_metrics: dict[str, Any] = {}
        self._val: list[dict[str, Any]] | None = None
        self._device_cache: dict[str, torch.Tensor] = {}

    def _encode_prompts(self) -> torch.Tensor:
        """Every (seen class, template) prompt → ``(S, T, L, D)``; unseen names are never encoded."""
        templates = self.settings.prompt_templates
        prompts = [t.format(c) for c in self.seen for t in templates]
        emb = self.backbone.text_conditioner(prompts).float().cpu()
        return emb.view(len(self.seen), len(templates), *emb.shape[1:])

    # -------------------------------------------------------------- TrainTask protocol
    def model(self) -> nn.Module:
        return self.backbone.unet.float().train().requires_grad_(True)

    def train_dataset(self) -> Dataset:
        return SegPairDataset(self.cache_dir)

    def _on(self, name: str, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        key = f"{name}:{device}"
        if key not in self._device_cache:
            self._device_cache[key] = tensor.to(device)
        return self._device_cache[key]

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """MSE between the UNet's prediction and the target of the noised mask latent (Marigold)."""
        sched, s = self.backbone.scheduler, self.settings
        image, mask = batch["image"], batch["mask"]
        device, b = image.device, image.shape[0]
        cls, negative = sample_prompts(batch["cls"], batch["absent"], s.negative_prob, generator)
        template = torch.randint(0, self.prompts.shape[1], (b,), generator=generator)
        text = self._on("prompts", self.prompts, device)[cls.to(device), template.to(device)]
        x0 = torch.where(negative.to(device).view(-1, 1, 1, 1), self._on("empty", self.empty, device), mask)
        n_train = int(sched.config.num_train_timesteps)
        t = torch.randint(0, n_train, (b,), generator=generator)
        if s.multires_noise_strength is not None:
            strength = s.multires_noise_strength * (t.float() / n_train if s.multires_noise_annealed else 1.0)
            noise = multires_noise(x0.shape, strength, generator)
        else:
            noise = torch.randn(x0.shape, generator=generator)
        noise, t = noise.to(device), t.to(device)
        xt = sched.add_noise(x0, noise, t)
        if s.prediction_type == "v_prediction":
            target = sched.get_velocity(x0, noise, t)
        else:
            target = noise if s.prediction_type == "epsilon" else x0
        pred = model(torch.cat([image, xt], dim=1), t, encoder_hidden_states=text).sample
        loss = F.mse_loss(pred.float(), target.float())
        return loss, {"negative_frac": float(negative.float().mean())}

    # -------------------------------------------------------------- evaluation and export
    def _val_samples(self) -> list[dict[str, Any]]:
        if self._val is None:
            from diffuseg.eval.runner import load_split_samples

            self._val = []
            if self.val_data_dir is not None and self.settings.num_val:
                for sample in load_split_samples(self.val_data_dir, "val"):
                    self._val.append(sample)
                    if len(self._val) >= self.settings.num_val:
                        break
        return self._val

    def pipeline(self, **overrides: Any) -> SegDiffusionPipeline:
        """The inference pipeline on the model being trained (VAE moved to the UNet's device)."""
        self.backbone.vae.to(self.backbone.unet.device)
        cfg = SegDiffusionConfig.from_dict({**self.pipeline_defaults, **overrides})
        return SegDiffusionPipeline(self.backbone, cfg)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """mIoU / seen / unseen / hIoU on ``num_val`` val images, one member and few steps (cheap)."""
        from diffuseg.eval import ConfusionMatrix

        samples = self._val_samples()
        if not samples:
            return {}
        pipe = self.pipeline(ensemble_size=1, denoise_steps=self.settings.val_denoise_steps, seed=0)
        cm = ConfusionMatrix(len(self.classes))
        for part in _same_shape_batches(samples, 8):
            labels = [smp["label"] for smp in part]
            out = pipe([smp["image"] for smp in part], class_names=self.classes, output_size=labels[0].shape)
            for pred, gt in zip(out.labels, labels, strict=True):
                cm.update(pred, gt)
        metrics = cm.compute(self.classes, self.unseen or None)["metrics"]
        self.last_metrics = {"step": step, "num_images": len(samples), **metrics}
        return {f"val_{k}": v for k, v in metrics.items() if v is not None}

    def save_pretrained(self, model: nn.Module, out_dir: Path) -> None:
        """The fine-tuned backbone (diffusers layout), its pipeline defaults and a model card.

        The training history is stored in the config, so a card rewritten later (benchmarks do, after
        a full evaluation) keeps it when the run folder is gone.
        """
        from diffuseg.train.model_card import training_history

        bb = self.backbone
        bb.config.method_defaults[METHOD] = dict(self.pipeline_defaults)
        bb.config.info[METHOD] = {
            **self.info,
            "seen_classes": self.seen,
            "unseen_classes": self.unseen,
            "classes": self.classes,
            "prompt_templates": self.settings.prompt_templates,
            "settings": asdict(self.settings),
            "val_metrics": self.last_metrics,
            "history": training_history({"train": self.run_dir}) if self.run_dir is not None else "",
        }
        bb.save_pretrained(out_dir)
        sample = self._card_sample(Path(out_dir))
        write_model_card(out_dir, sample_image=sample)

    def _card_sample(self, out_dir: Path) -> str | None:
        """``sample.png``: image | ground truth | prediction | uncertainty for a few val scenes."""
        from diffuseg.train.model_card import sample_picture

        if self.val_data_dir is None or not self.settings.card_samples:
            return None
        unet = self.backbone.unet
        was_training = unet.training
        unet.eval()
        try:
            pipe = self.pipeline()
            return sample_picture(
                out_dir,
                lambda image: pipe(image, class_names=self.classes, output_size=image.shape[:2]),
                self.val_data_dir,
                self.classes,
                num=self.settings.card_samples,
            )
        finally:
            unet.train(was_training)


def _same_shape_batches(samples: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    """Consecutive samples in batches of at most ``size`` whose images and labels share one shape."""
    batches: list[list[dict[str, Any]]] = []
    for smp in samples:
        last = batches[-1] if batches else None
        key = (smp["image"].shape, smp["label"].shape)
        if last and len(last) < size and (last[0]["image"].shape, last[0]["label"].shape) == key:
            last.append(smp)
        else:
            batches.append([smp])
    return batches


# ----------------------------------------------------------------------------------------- model card
def write_model_card(
    checkpoint_dir: str | os.PathLike,
    metrics: dict[str, Any] | None = None,
    sample_image: str | None = None,
    metrics_note: str | None = None,
) -> Path:
    """Write ``README.md`` beside a Seg-diffusion checkpoint from its ``diffuseg_config.json``.

    The card states how the model was made (command, base backbone, data, recipe) and how well
    it does: ``metrics`` (e.g. a full evaluation's report metrics) replace the quick validation
    numbers recorded at export. Benchmarks call this again after evaluating.
    """
    from diffuseg.backbones.latent import DIFFUSEG_CONFIG
    from diffuseg.train.model_card import history_section

    root = Path(checkpoint_dir)
    shown = root.parent / root.name.removeprefix(".tmp_")  # the training loop exports via a temp folder
    cfg = json.loads((root / DIFFUSEG_CONFIG).read_text())
    info = cfg.get("info", {}).get(METHOD, {})
    defaults = cfg.get("method_defaults", {}).get(METHOD, {})
    metrics = metrics if metrics is not None else info.get("val_metrics") or {}
    if sample_image is None and (root / "sample.png").is_file():
        sample_image = "sample.png"
    lines = [
        "---",
        "library_name: diffusers",
        "tags: [diffuseg, seg-diffusion, open-vocabulary-segmentation, marigold]",
        "---",
        "",
        "# Seg-diffusion checkpoint (diffuseg)",
        "",
        "A latent diffusion model fine-tuned Marigold-style for open-vocabulary segmentation: the UNet",
        "takes `[image latent ; noisy mask latent]` and denoises the mask of the class named in the prompt.",
        "",
        "```python",
        "from diffuseg.methods.seg_diffusion import SegDiffusionPipeline",
        f'pipe = SegDiffusionPipeline.from_pretrained("{shown}")',
        'out = pipe(image, class_names=["bag", "sandal"])  # out.labels, out.uncertainty',
        "```",
        "",
        f"CLI: `diffuseg segment IMAGES --method seg-diffusion --checkpoint {shown} --classes 'bag,sandal' "
        "--out OUT`",
        "",
        "## Training",
        "",
        f"- command: `{info.get('command', 'unknown')}`",
        f"- base backbone: `{info.get('base_backbone', 'unknown')}`",
        f"- data: `{info.get('trained_on', 'unknown')}` — {info.get('num_images', '?')} training images, "
        f"{info.get('num_pairs', '?')} (image, class) pairs; images with unseen classes left out: "
        f"{info.get('settings', {}).get('exclude_unseen_images', '?')}",
        f"- seen classes: {', '.join(info.get('seen_classes', [])) or '?'}",
        f"- unseen (held-out) classes: {', '.join(info.get('unseen_classes', [])) or 'none'}",
        f"- max_steps: {info.get('steps', '?')} (an export of an unfinished run is at the step of its "
        f"checkpoint; quick validation at step {info.get('val_metrics', {}).get('step', '?')}); "
        f"recipe: `{json.dumps(info.get('recipe', {}))}`",
        f"- settings: `{json.dumps(info.get('settings', {}))}`",
        *history_section(info.get("history", "")),
        "",
        '## Inference defaults (`method_defaults["seg-diffusion"]`)',
        "",
        f"`{json.dumps(defaults)}`",
        "",
        "## Metrics",
        "",
    ]
    if metrics:
        if metrics_note or "num_images" in metrics:
            lines.append(
                metrics_note
                or f"Quick validation at export: {metrics.get('num_images')} val images, one ensemble member."
            )
            lines.append("")
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in metrics.items() if isinstance(v, float)]
    else:
        lines.append("Not evaluated yet: run `benchmarks/segdiffusion_fashion.py`.")
    if sample_image:
        lines += ["", "## Sample", "", f"![image | ground truth | prediction | uncertainty]({sample_image})"]
    lines += [
        "",
        "## Limitations",
        "",
        "Trained on small synthetic scenes (FashionScenes, 64 px) on a CPU budget: it knows the",
        "vocabulary of its training data and generalises to new names only as far as the text encoder's",
        "embedding space does. Uncertainty is the ensemble spread of the best class (uncalibrated).",
        "",
    ]
    path = root / "README.md"
    with atomic_write(path, "w") as f:
        f.write("\n".join(lines))
    return path


# ----------------------------------------------------------------------------------------- entry point
def train_seg_diffusion(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: dict[str, Any],
    backbone: str | os.PathLike | None = None,
    max_minutes: float | None = None,
    progress: bool = True,
    export: str | os.PathLike | None = None,
    command: str | None = None,
):
    """Fine-tune ``backbone`` for Seg-diffusion on ``data_dir``; resumes from ``out_dir``'s checkpoints.

    ``out_dir/final`` receives the checkpoint (with model card) when ``train.max_steps`` is
    reached; ``export`` additionally exports the latest checkpoint's (EMA) weights, finished or not.
    """
    from diffuseg.eval.runner import load_meta
    from diffuseg.train.loop import TrainConfig, export_checkpoint, train

    data_dir, out = Path(data_dir), Path(out_dir)
    seed = int(config.get("seed", 0))
    settings = SegDiffusionSettings.from_config(config)
    meta = load_meta(data_dir)
    unseen = list(meta.get("unseen", [])) if settings.unseen is None else list(settings.unseen)
    torch.manual_seed(seed)
    bb = load_base_backbone(backbone)
    cache = build_cache(bb, data_dir, out / "cache", settings, unseen, progress=progress)
    record = json.loads((cache / "done.json").read_text())
    train_values = dict(config.get("train") or {})
    train_values.update(output_dir=str(out), seed=seed, max_minutes=max_minutes, progress=progress)
    loop_cfg = TrainConfig.from_dict(train_values)
    info = {
        "command": command,
        "base_backbone": str(backbone) if backbone is not None else "shipped mini-sd",
        "trained_on": str(data_dir),
        "num_images": record["num_images"],
        "num_pairs": record["num_pairs"],
        "recipe": {k: v for k, v in train_values.items() if k not in ("output_dir", "progress")},
        "steps": loop_cfg.max_steps,
    }
    task = SegDiffusionTask(
        bb, cache, settings, config.get("pipeline"), val_data_dir=data_dir, info=info, run_dir=out
    )
    result = train(task, loop_cfg)
    if export is not None:
        export_checkpoint(task, out, Path(export))
    return result
