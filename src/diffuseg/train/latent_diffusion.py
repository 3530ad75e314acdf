"""Training the embedded mini-SD: the VAE stage, then the text-conditioned UNet stage.

Both stages are :class:`~diffuseg.train.loop.TrainTask` s run by the one shared loop.

* **VAE** (``AutoencoderKL``): L1 + MSE reconstruction + a small KL, on random crops of the
  training images (the VAE is fully convolutional, so crops cost 1/4 of full frames and see
  the same statistics). After training, the latent scaling factor is set to 1/std of the
  training latents, as Stable Diffusion did.
* **UNet** (``UNet2DConditionModel``): DDPM ε-prediction with min-SNR-γ loss weighting
  (Hang et al. 2023; faster convergence at no cost), 10 % caption drop-out so classifier-free
  guidance works, on **precomputed** latents (posterior mean and std, resampled every step)
  and MiniLM token embeddings, memory-mapped from disk so the data never has to fit in RAM.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from diffuseg.io import atomic_write, read_image

logger = logging.getLogger(__name__)

__all__ = [
    "ImageArrayDataset",
    "LatentCaptionDataset",
    "UNetTask",
    "VAETask",
    "attention_entropy",
    "precompute_latents",
    "psnr",
]


def _split_images(data_dir: Path, split: str) -> list[Path]:
    folder = data_dir / "img_dir" / split
    files = sorted(folder.glob("*.png")) + sorted(folder.glob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"{folder}: no images; generate data with `diffuseg data fashion-scenes`")
    return files


def load_image_array(
    data_dir: Path, split: str, limit: int | None = None, progress: bool = False
) -> np.ndarray:
    """All images of a split as one uint8 ``(N, H, W, 3)`` array (64-px sets: 20k scenes = 245 MB)."""
    files = _split_images(data_dir, split)[:limit]
    return np.stack(
        [read_image(f) for f in tqdm(files, desc=f"reading {split}", leave=False, disable=not progress)]
    )


class ImageArrayDataset(Dataset):
    """A uint8 ``(N, H, W, 3)`` image array served as float ``(3, H, W)`` tensors in [-1, 1]."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.images[i]).permute(2, 0, 1).float() / 127.5 - 1.0


def random_crop_flip(batch: torch.Tensor, crop: int | None, generator: torch.Generator) -> torch.Tensor:
    """One random ``crop``-pixel crop and horizontal flip per image, drawn from ``generator``.

    Drawing from the loop's per-step generator (not global RNG) keeps resumed runs identical.
    """
    if not crop or crop >= batch.shape[-1]:
        return batch
    n, _, h, w = batch.shape
    tops = torch.randint(0, h - crop + 1, (n,), generator=generator).tolist()
    lefts = torch.randint(0, w - crop + 1, (n,), generator=generator).tolist()
    flips = (torch.rand(n, generator=generator) < 0.5).tolist()
    out = [batch[i, :, t : t + crop, l : l + crop] for i, (t, l) in enumerate(zip(tops, lefts, strict=True))]
    return torch.stack([o.flip(-1) if f else o for o, f in zip(out, flips, strict=True)])


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), averaged over the batch."""
    mse = ((a.clamp(-1, 1) - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(4.0 / mse)).mean())


@torch.no_grad()
def reconstruction_psnr(vae: nn.Module, images: np.ndarray, batch: int = 64) -> float:
    """Mean PSNR (dB) of ``vae`` reconstructing uint8 ``(N, H, W, 3)`` images from the posterior mean."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    total = 0.0
    for chunk in x.split(batch):
        total += psnr(vae.decode(vae.encode(chunk).latent_dist.mean).sample, chunk) * len(chunk)
    return total / len(x)


class VAETask:
    """Train an ``AutoencoderKL`` from scratch on the images of a dataset folder."""

    def __init__(
        self,
        vae: nn.Module,
        data_dir: str | Path,
        crop: int | None = 32,
        kl_weight: float = 1e-6,
        num_val: int = 256,
    ) -> None:
        self.vae, self.kl_weight = vae, kl_weight
        self.data_dir = Path(data_dir)
        self.train_images = load_image_array(self.data_dir, "train")
        self.val_images = load_image_array(self.data_dir, "val", num_val)
        self.crop = crop

    def model(self) -> nn.Module:
        return self.vae

    def train_dataset(self) -> Dataset:
        return ImageArrayDataset(self.train_images)

    def loss(
        self, model: nn.Module, batch: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict]:
        batch = random_crop_flip(batch, self.crop, generator)
        post = model.encode(batch).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator).to(post.mean)
        rec = model.decode(z).sample
        l1, mse = (rec - batch).abs().mean(), F.mse_loss(rec, batch)
        kl = post.kl().mean() / batch[0].numel()
        loss = l1 + mse + self.kl_weight * kl
        return loss, {"l1": l1.item(), "mse": mse.item(), "kl": kl.item()}

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        return {"val_psnr": reconstruction_psnr(model, self.val_images)}

    def save_pretrained(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(Path(out_dir) / "vae", safe_serialization=True)


@torch.no_grad()
def precompute_latents(
    vae: nn.Module, images: np.ndarray, batch_size: int = 128, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and std of every image, float16 ``(N, C, h, w)`` each."""
    means, stds = [], []
    starts = range(0, len(images), batch_size)
    for i in tqdm(starts, desc="encoding latents", leave=False, disable=not progress):
        x = torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        post = vae.encode(x).latent_dist
        means.append(post.mean.half().numpy())
        stds.append(post.std.half().numpy())
    return np.concatenate(means), np.concatenate(stds)


def read_captions(data_dir: Path, split: str) -> dict[str, str]:
    path = data_dir / "captions" / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: captions are needed to train a text-conditioned model")
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[str(rec["id"])] = rec["caption"]
    return out


class LatentCaptionDataset(Dataset):
    """Memory-mapped (latent mean, latent std, caption-embedding index) triples."""

    def __init__(self, cache_dir: Path) -> None:
        self.mean = np.load(cache_dir / "latent_mean.npy", mmap_mode="r")
        self.std = np.load(cache_dir / "latent_std.npy", mmap_mode="r")
        self.text = np.load(cache_dir / "text.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "mean": torch.from_numpy(np.array(self.mean[i], dtype=np.float32)),
            "std": torch.from_numpy(np.array(self.std[i], dtype=np.float32)),
            "text": torch.from_numpy(np.array(self.text[i], dtype=np.float32)),
        }


def build_latent_cache(
    backbone, data_dir: Path, cache_dir: Path, split: str = "train", progress: bool = False
) -> Path:
    """Encode every image and caption of a split once; later epochs read the cache.

    Written atomically per file; an existing complete cache (``done.json``) is reused.
    """
    cache_dir = Path(cache_dir)
    if (cache_dir / "done.json").is_file():
        return cache_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    files = _split_images(data_dir, split)
    captions = read_captions(data_dir, split)
    images = load_image_array(data_dir, split, progress=progress)
    mean, std = precompute_latents(backbone.vae, images, progress=progress)
    texts = [captions.get(f.stem, "") for f in files]
    emb = []
    for i in range(0, len(texts), 256):
        emb.append(backbone.text_conditioner(texts[i : i + 256]).half().numpy())
    for name, arr in (("latent_mean", mean), ("latent_std", std), ("text", np.concatenate(emb))):
        with atomic_write(cache_dir / f"{name}.npy") as f:
            np.save(f, arr)
    with atomic_write(cache_dir / "done.json", "w") as f:
        json.dump({"num": len(files), "split": split, "data_dir": str(data_dir)}, f)
    return cache_dir


def min_snr_weights(scheduler, t: torch.Tensor, gamma: float | None, floor: float = 0.0) -> torch.Tensor:
    """Per-sample loss weights min(SNR, γ)/SNR (ε-target) or min(SNR, γ)/(SNR+1) (v-target).

    Either way the implied weight on the x0 error is min(SNR, γ), which vanishes at high noise. A
    ``floor`` > 0 keeps it at least ``floor`` there: for ZS3D's semantic channels the high-noise
    steps are where the model must read the class from the (clean) image alone.
    """
    if gamma is None:
        return torch.ones_like(t, dtype=torch.float32)
    ac = scheduler.alphas_cumprod.to(t.device)[t]
    snr = ac / (1 - ac)
    w = snr.clamp(max=gamma).clamp(min=floor)
    return w / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else w / snr


class UNetTask:
    """Train the text-conditioned UNet of a :class:`LatentDiffusionBackbone` on cached latents."""

    def __init__(
        self,
        backbone,
        cache_dir: Path,
        val_data_dir: Path | None = None,
        snr_gamma: float | None = 5.0,
        caption_dropout: float = 0.1,
        num_val: int = 200,
    ) -> None:
        self.backbone, self.cache_dir = backbone, Path(cache_dir)
        self.snr_gamma, self.caption_dropout = snr_gamma, caption_dropout
        self.val_data_dir, self.num_val = val_data_dir, num_val
        self.empty = backbone.encode_text("")[0].float()
        self._val_images: np.ndarray | None = None

    def model(self) -> nn.Module:
        return self.backbone.unet

    def train_dataset(self) -> Dataset:
        return LatentCaptionDataset(self.cache_dir)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        sched, sf = self.backbone.scheduler, self.backbone.scaling_factor
        mean, std, text = batch["mean"], batch["std"], batch["text"]
        b = mean.shape[0]
        x0 = (mean + std * torch.randn(mean.shape, generator=generator).to(mean)) * sf
        drop = torch.rand(b, generator=generator) < self.caption_dropout
        text = torch.where(drop.view(-1, 1, 1).to(text.device), self.empty.to(text), text)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator).to(x0.device)
        xt = sched.add_noise(x0, noise, t)
        target = sched.get_velocity(x0, noise, t) if sched.config.prediction_type == "v_prediction" else noise
        pred = model(xt, t, encoder_hidden_states=text).sample
        per = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        loss = (per * min_snr_weights(sched, t, self.snr_gamma)).mean()
        return loss, {"mse": per.mean().item()}

    def val_images(self) -> np.ndarray:
        if self._val_images is None:
            self._val_images = load_image_array(Path(self.val_data_dir), "val", self.num_val)
        return self._val_images

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Attention entropy per level and the DiffSeg score on val scenes, tracked during training."""
        if self.val_data_dir is None:
            return {}
        from diffuseg.train.probes import diffseg_probe

        was = model.training
        model.eval()
        try:
            return diffseg_probe(self.backbone, self.val_data_dir, num_images=self.num_val)
        finally:
            model.train(was)

    def save_pretrained(self, model: nn.Module, out_dir: Path) -> None:
        self.backbone.save_pretrained(out_dir)


def attention_entropy(maps: dict[int, torch.Tensor]) -> dict[int, float]:
    """Mean normalised entropy H/log(K) of attention maps per query resolution (1 = uniform)."""
    out = {}
    for side, a in maps.items():
        h = -(a.clamp_min(1e-12) * a.clamp_min(1e-12).log()).sum(-1).mean()
        out[side] = float(h / math.log(a.shape[-1]))
    return out


def set_scaling_factor(vae: nn.Module, images: np.ndarray, limit: int = 2000) -> float:
    """Set ``vae.config.scaling_factor`` to 1/std of the latents (SD's recipe) and return it."""
    mean, _ = precompute_latents(vae, images[:limit])
    factor = float(1.0 / np.asarray(mean, dtype=np.float32).std())
    vae.register_to_config(scaling_factor=factor)
    return factor


def describe(cfg: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in cfg.items())


# ----------------------------------------------------------------------------------- entry points
def _loop_config(section: dict[str, Any], out: Path, seed: int, max_minutes: float | None, progress: bool):
    from diffuseg.train.loop import TrainConfig

    values = dict(section.get("train", {}))
    values.update(output_dir=str(out), seed=seed, max_minutes=max_minutes, progress=progress)
    return TrainConfig.from_dict(values)


def train_vae(
    data_dir: str | Path,
    out_dir: str | Path,
    config: dict[str, Any],
    max_minutes: float | None = None,
    progress: bool = True,
):
    """Stage 1: train the mini-SD's VAE; on completion ``out_dir/vae`` holds it with its scaling factor.

    ``out_dir/final/vae`` is the loop's raw export; ``out_dir/vae`` adds the latent scaling factor.
    """
    from diffusers import AutoencoderKL

    from diffuseg.backbones.presets import MINI_SD
    from diffuseg.train.loop import train

    cfg, out = config.get("vae", {}), Path(out_dir)
    torch.manual_seed(int(config.get("seed", 0)))
    task = VAETask(
        AutoencoderKL(**MINI_SD["vae"]),
        data_dir,
        crop=cfg.get("crop", 32),
        kl_weight=float(cfg.get("kl_weight", 1e-6)),
        num_val=int(cfg.get("num_val", 256)),
    )
    result = train(task, _loop_config(cfg, out, int(config.get("seed", 0)), max_minutes, progress))
    if result.finished:
        vae = AutoencoderKL.from_pretrained(result.export_dir / "vae")
        factor = set_scaling_factor(vae, task.train_images)
        vae.save_pretrained(out / "vae", safe_serialization=True)
        logger.info("VAE done: scaling factor %.4f, %s", factor, task.evaluate(vae, result.step))
    return result


def _mini_sd_backbone(vae_dir: Path):
    from diffusers import AutoencoderKL

    from diffuseg.backbones.presets import MINI_SD, build_backbone

    vae_path = vae_dir / "vae" if (vae_dir / "vae").is_dir() else vae_dir
    backbone = build_backbone(MINI_SD)
    # the committed stage artifact is fp16; train and encode in fp32
    vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=torch.float32)
    backbone.vae = vae.eval().requires_grad_(False)
    return backbone


def train_unet(
    data_dir: str | Path,
    vae_dir: str | Path,
    out_dir: str | Path,
    config: dict[str, Any],
    max_minutes: float | None = None,
    progress: bool = True,
    export: str | Path | None = None,
    export_only: bool = False,
):
    """Stage 2: train the mini-SD UNet on cached latents; ``out_dir/final`` is the exported backbone.

    ``export`` additionally writes the latest checkpoint's (EMA) weights there, finished or not;
    with ``export_only`` nothing is trained (export a run that is still going, from another process).
    Returns the loop's ``TrainResult`` (``None`` with ``export_only``).
    """
    from diffuseg.train.loop import export_checkpoint, train

    cfg, out, data_dir = config.get("unet", {}), Path(out_dir), Path(data_dir)
    seed = int(config.get("seed", 0))
    torch.manual_seed(seed)
    backbone = _mini_sd_backbone(Path(vae_dir))
    backbone.config.info.update({"trained_on": str(data_dir), "recipe": cfg})
    cache = build_latent_cache(backbone, data_dir, out / "latent_cache", progress=progress)
    task = UNetTask(
        backbone,
        cache,
        val_data_dir=data_dir,
        snr_gamma=cfg.get("snr_gamma", 5.0),
        caption_dropout=float(cfg.get("caption_dropout", 0.1)),
        num_val=int(cfg.get("num_val", 200)),
    )
    if export_only:
        if export is None:
            raise ValueError("export_only needs an export folder")
        export_checkpoint(task, out, Path(export))
        return None
    backbone.unet.train().requires_grad_(True)
    result = train(task, _loop_config(cfg, out, seed, max_minutes, progress))
    if export is not None:
        export_checkpoint(task, out, Path(export))
    return result
