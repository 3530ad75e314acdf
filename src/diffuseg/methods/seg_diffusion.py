"""``SegDiffusionPipeline``: open-vocabulary masks from a fine-tuned latent diffusion model.

Seg-diffusion (QuantumScriptHub/Seg-diffusion) is Marigold applied to segmentation: the UNet of a
latent diffusion model takes ``[image latent ; noisy mask latent]`` (8 channels) and denoises the
latent of a mask, conditioned by its cross-attention on a text prompt. Inference follows
Marigold's protocol, with the open-vocabulary protocol the original lacks:

1. each prompted class gets its own binary mask ("a {name}" → the mask of that class);
2. per class, ``ensemble_size`` passes from independent noise, each ``denoise_steps`` DDIM steps
   with *trailing* timestep spacing (few-step inference, Marigold v1.1);
3. each pass is decoded by the VAE, averaged over the 3 channels and mapped to [0, 1];
4. the passes are combined by the median (uncertainty: median absolute deviation) or the mean
   (uncertainty: standard deviation);
5. classes are combined by argmax; a pixel whose best class stays below ``background_threshold``
   is background.

Classes, ensemble members and images are denoised together in batches. The original's bugs
are not reproduced (see docs/methods.md, "Seg-diffusion").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffuseg.methods.base import check_images, parse_classes
from diffuseg.outputs import SegmentationOutput
from diffuseg.utils import dataclass_from_dict

logger = logging.getLogger(__name__)

__all__ = [
    "BACKGROUND",
    "METHOD",
    "SegDiffusionConfig",
    "SegDiffusionPipeline",
    "combine_classes",
    "ensemble_masks",
    "half_dtype",
    "split_background",
]

METHOD = "seg-diffusion"
BACKGROUND = "background"
REDUCTIONS = ("median", "mean")
AUTO_BATCH_LATENT_PIXELS = {"cpu": 64 * 16 * 16, "accelerator": 512 * 16 * 16}
"""Latent pixels per UNet batch when ``batch_size=0``: 64 samples of 16² latents on a CPU (the
measured per-sample optimum of the mini-SD on one thread), 8× that on a GPU (32 at SD's 64²)."""


@dataclass
class SegDiffusionConfig:
    """Inference settings; a checkpoint's ``method_defaults["seg-diffusion"]`` overrides these.

    The defaults are what the mini-SD checkpoint reaches within 5 s per 64×64 image for 10
    prompted classes on one CPU thread (see docs/results.md); Marigold's own defaults (10
    members × 50 steps, later 1–4 trailing steps) target a GPU.
    """

    ensemble_size: int = 4
    denoise_steps: int = 2
    processing_res: int | None = None  # None: the backbone's; 0: native (no resize, only padding)
    output_processing_res: bool = False  # True: output at the processing size, not the input size
    ensemble_reduction: str = "median"  # "median" (MAD uncertainty) | "mean" (std uncertainty)
    background_threshold: float = 0.5  # on the [0, 1] mask scale
    prompt_template: str = "a {}"
    half_precision: bool = False  # bf16 on CPU, fp16 on GPUs (weights and compute)
    batch_size: int = 0  # UNet/VAE samples per batch; 0 = auto
    seed: int | None = 0  # None: nondeterministic noise
    progress: bool = False
    class_names: list[str] | None = None  # default vocabulary (the training dataset's classes)

    def __post_init__(self) -> None:
        checks = [
            (int(self.ensemble_size) >= 1, f"ensemble_size must be >= 1, got {self.ensemble_size}"),
            (int(self.denoise_steps) >= 1, f"denoise_steps must be >= 1, got {self.denoise_steps}"),
            (
                self.processing_res is None or int(self.processing_res) >= 0,
                f"processing_res must be >= 0 (0 = native) or None, got {self.processing_res}",
            ),
            (
                self.ensemble_reduction in REDUCTIONS,
                f"ensemble_reduction must be one of {REDUCTIONS}, got {self.ensemble_reduction!r}",
            ),
            (
                0.0 <= float(self.background_threshold) <= 1.0,
                f"background_threshold must be in [0, 1], got {self.background_threshold}",
            ),
            (
                isinstance(self.prompt_template, str) and self.prompt_template.count("{}") == 1,
                f"prompt_template must contain one '{{}}' for the class name, got {self.prompt_template!r}",
            ),
            (int(self.batch_size) >= 0, f"batch_size must be >= 0 (0 = auto), got {self.batch_size}"),
        ]
        errors = [msg for ok, msg in checks if not ok]
        if errors:
            raise ValueError("invalid Seg-diffusion settings: " + "; ".join(errors))

    @classmethod
    def for_backbone(cls, backbone, **overrides: Any) -> SegDiffusionConfig:
        """Defaults, then the checkpoint's ``method_defaults["seg-diffusion"]``, then ``overrides``."""
        values: dict[str, Any] = dict(backbone.config.method_defaults.get(METHOD, {}))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SegDiffusionConfig:
        return dataclass_from_dict(cls, values, "Seg-diffusion")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- pure helpers
def half_dtype(device: torch.device | str) -> torch.dtype:
    """The 16-bit type to run in: bfloat16 on CPUs (fast fp16 kernels are missing there), else float16."""
    return torch.bfloat16 if torch.device(device).type == "cpu" else torch.float16


def ensemble_masks(
    masks: torch.Tensor, reduction: str = "median"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Combine ``(..., E, H, W)`` ensemble members into ``(..., H, W)`` prediction and uncertainty.

    Marigold's rules for predictions without an affine ambiguity (a mask needs no alignment):
    median with the median absolute deviation, or mean with the standard deviation. One member
    has no spread: the uncertainty is ``None``, as in Marigold.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    e = masks.shape[-3]
    if reduction == "mean":
        pred = masks.mean(-3)
        unc = masks.std(-3) if e > 1 else None
    else:
        pred = masks.median(-3).values
        unc = (masks - pred.unsqueeze(-3)).abs().median(-3).values if e > 1 else None
    return pred, unc


def split_background(names: Sequence[str]) -> tuple[list[str], list[str], int, list[int]]:
    """Split class names into the prompted ones and the background fallback.

    A name equal to ``"background"`` (any case) is never prompted: it is the label of pixels no
    prompted class claims. Without one, ``"background"`` is prepended to the output names.
    Returns ``(output_names, prompted_names, background_index, prompted_output_indices)``.
    """
    names = list(names)
    bg = [i for i, n in enumerate(names) if n.strip().lower() == BACKGROUND]
    if len(bg) > 1:
        raise ValueError(f"class_names name the background more than once: {names}")
    out = names if bg else [BACKGROUND, *names]
    bg_index = bg[0] if bg else 0
    prompted_idx = [i for i in range(len(out)) if i != bg_index]
    if not prompted_idx:
        raise ValueError("class_names: give at least one class besides 'background', e.g. ['bag', 'sandal']")
    return out, [out[i] for i in prompted_idx], bg_index, prompted_idx


def combine_classes(
    probs: torch.Tensor, threshold: float, background_index: int, prompted_index: Sequence[int], num_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mask probabilities ``(B, K, H, W)`` → ``(labels (B, H, W), scores (B, C, H, W))``.

    Argmax over the prompted classes; pixels whose best probability is not above ``threshold``
    become background. ``scores`` holds the class probabilities with the constant ``threshold``
    in the background channel, so ``labels`` is its argmax (ties go to the background).
    """
    best, arg = probs.max(1)
    lut = torch.as_tensor(list(prompted_index), dtype=torch.long)
    labels = torch.where(best > threshold, lut[arg], torch.full_like(arg, background_index))
    scores = torch.full((probs.shape[0], num_out, *probs.shape[2:]), float(threshold), dtype=probs.dtype)
    scores[:, lut] = probs
    return labels, scores


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(N, C, H, W)``, antialiased when shrinking (as Marigold's processor)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def _processing_size(h: int, w: int, processing_res: int) -> tuple[int, int]:
    """Longer edge → ``processing_res`` keeping the aspect ratio (Marigold); 0 keeps the size."""
    if not processing_res:
        return h, w
    scale = processing_res / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _output_size(h: int, w: int, output_size: int | Sequence[int] | None) -> tuple[int, int]:
    """An int sets the longer edge (a square input → ``size × size``); a pair sets (H, W)."""
    if output_size is None:
        return h, w
    if isinstance(output_size, (int, np.integer)):
        if output_size < 1:
            raise ValueError(f"output_size must be >= 1, got {output_size}")
        return _processing_size(h, w, int(output_size))
    oh, ow = (int(v) for v in output_size)
    if oh < 1 or ow < 1:
        raise ValueError(f"output_size must be positive, got {output_size}")
    return oh, ow


@dataclass
class _Prepared:
    """One image after resizing and padding: what the UNet sees and how to undo it."""

    pixels: torch.Tensor  # (3, Hp, Wp) in [-1, 1], padded
    valid: tuple[int, int]  # (h, w) of the resized image inside the padding
    out_size: tuple[int, int]  # size of the returned maps


# ----------------------------------------------------------------------------- pipeline
class SegDiffusionPipeline:
    """Seg-diffusion on a fine-tuned :class:`~diffuseg.backbones.latent.LatentDiffusionBackbone`.

    Example::

        pipe = SegDiffusionPipeline.from_pretrained()                 # shipped checkpoint
        out = pipe(image, class_names=["bag", "sandal"])               # + "background" at index 0
        out.labels, out.uncertainty, out.class_names
    """

    def __init__(self, backbone, config: SegDiffusionConfig | None = None) -> None:
        latent = int(backbone.vae.config.latent_channels)
        in_ch = int(backbone.unet.config.in_channels)
        if in_ch != 2 * latent:
            raise ValueError(
                f"the UNet takes {in_ch} input channels, Seg-diffusion needs {2 * latent} "
                "([image latent ; mask latent]): this is a plain latent diffusion backbone. Fine-tune it "
                "first: `diffuseg train seg-diffusion --backbone <folder> --data <dataset> --out <run>`"
            )
        self.backbone = backbone
        self.config = config or SegDiffusionConfig.for_backbone(backbone)
        self._apply_precision(self.config.half_precision)

    # ------------------------------------------------------------------ loading / devices
    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | None = None,
        device: str | torch.device | None = None,
        local_files_only: bool | None = None,
        **overrides: Any,
    ) -> SegDiffusionPipeline:
        """Load a Seg-diffusion checkpoint (folder or hub id; ``None``: the shipped one) with its defaults.

        ``overrides`` are :class:`SegDiffusionConfig` fields (``ensemble_size=10``,
        ``half_precision=True``, ...); half precision loads the weights directly in 16 bits.
        """
        from diffuseg.backbones.latent import LatentDiffusionBackbone, default_checkpoint_dir

        src = checkpoint if checkpoint is not None else str(default_checkpoint_dir(METHOD))
        half = bool(overrides.get("half_precision"))
        dtype = half_dtype(device or "cpu") if half else None
        backbone = LatentDiffusionBackbone.from_pretrained(
            src, torch_dtype=dtype, device=device, local_files_only=local_files_only
        )
        return cls(backbone, SegDiffusionConfig.for_backbone(backbone, **overrides))

    def to(self, device: str | torch.device) -> SegDiffusionPipeline:
        """Move to ``device``; with half precision the 16-bit type follows the device (bf16 CPU, fp16 GPU)."""
        self.backbone.to(device)
        self._apply_precision(self.config.half_precision)
        return self

    def _apply_precision(self, half: bool) -> None:
        """Cast UNet and VAE weights to the compute dtype: half precision really runs in 16 bits."""
        dtype = half_dtype(self.backbone.device) if half else torch.float32
        if self.backbone.unet.dtype != dtype:
            self.backbone.unet.to(dtype=dtype)
        if self.backbone.vae.dtype != dtype:
            self.backbone.vae.to(dtype=dtype)

    @property
    def seen_classes(self) -> list[str]:
        """Classes the checkpoint was fine-tuned on (empty when unknown)."""
        return list(self.backbone.config.info.get(METHOD, {}).get("seen_classes", []))

    @property
    def unseen_classes(self) -> list[str]:
        """Classes held out of fine-tuning (zero-shot evaluation uses them as 'unseen')."""
        return list(self.backbone.config.info.get(METHOD, {}).get("unseen_classes", []))

    # ------------------------------------------------------------------ steps
    def check_inputs(
        self, images: Any, class_names: Any, config: SegDiffusionConfig
    ) -> tuple[list[np.ndarray], list[str]]:
        """Validate a call's inputs; every error says what to pass instead."""
        imgs = check_images(images)
        names = parse_classes(class_names) if class_names is not None else config.class_names
        if not names:
            raise ValueError(
                "class_names: this checkpoint stores no default classes; pass the names to segment, "
                "e.g. pipe(image, class_names=['bag', 'sandal'])"
            )
        if config.processing_res:
            multiple = self.size_multiple
            if config.processing_res < multiple:
                raise ValueError(f"processing_res={config.processing_res} is below the minimum {multiple}")
        return imgs, list(names)

    @property
    def size_multiple(self) -> int:
        """Inputs are padded to a multiple of VAE factor × UNet downsampling (16 for the mini-SD)."""
        down = 2 ** (len(self.backbone.unet.config.block_out_channels) - 1)
        return self.backbone.vae_scale_factor * down

    def prepare_images(
        self,
        images: list[np.ndarray],
        processing_res: int,
        output_size: int | Sequence[int] | None,
        output_processing_res: bool,
    ) -> list[_Prepared]:
        """Resize (longer edge → ``processing_res``) and replicate-pad to the size multiple, per image."""
        out = []
        m = self.size_multiple
        for im in images:
            x = torch.from_numpy(im).permute(2, 0, 1).float()[None] / 127.5 - 1.0
            h, w = _processing_size(im.shape[0], im.shape[1], processing_res)
            x = _resize(x, (h, w)).clamp(-1, 1)
            ph, pw = math.ceil(h / m) * m, math.ceil(w / m) * m
            if (ph, pw) != (h, w):
                x = F.pad(x, (0, pw - w, 0, ph - h), mode="replicate")
            base = (h, w) if output_processing_res else im.shape[:2]
            out.append(_Prepared(x[0], (h, w), _output_size(base[0], base[1], output_size)))
        return out

    def encode_prompts(self, names: Sequence[str], template: str) -> torch.Tensor:
        """One prompt per class name → ``(K, L, D)`` token embeddings (names are a list, never characters)."""
        return self.backbone.encode_text([template.format(n) for n in names])

    def _batch_size(self, batch_size: int, latent_hw: tuple[int, int]) -> int:
        if batch_size:
            return int(batch_size)
        kind = "cpu" if self.backbone.device.type == "cpu" else "accelerator"
        return max(1, AUTO_BATCH_LATENT_PIXELS[kind] // (latent_hw[0] * latent_hw[1]))

    @torch.no_grad()
    def denoise(
        self,
        image_latents: torch.Tensor,
        text: torch.Tensor,
        noise: torch.Tensor,
        denoise_steps: int,
        batch_size: int,
        progress: bool = False,
    ) -> torch.Tensor:
        """DDIM (trailing spacing, η=0) on ``[image latent ; mask latent]``, batch by batch.

        ``image_latents``, ``text`` and ``noise`` are aligned along dim 0 (one row per image ×
        class × member). The mask latents stay float32 between steps; only the UNet runs in the
        model's dtype. With η=0 the result depends on the initial noise alone, not on batching.
        """
        from diffusers import DDIMScheduler
        from tqdm.auto import tqdm

        bb = self.backbone
        sched = DDIMScheduler.from_config(bb.scheduler.config, timestep_spacing="trailing")
        sched.set_timesteps(denoise_steps, device=bb.device)
        outs = []
        starts = range(0, noise.shape[0], batch_size)
        bar = tqdm(total=len(starts) * denoise_steps, desc="denoising", disable=not progress, leave=False)
        for s in starts:
            img = image_latents[s : s + batch_size].to(bb.device, bb.dtype)
            txt = text[s : s + batch_size].to(bb.device, bb.dtype)
            x = noise[s : s + batch_size].to(bb.device, torch.float32)
            for t in sched.timesteps:
                inp = torch.cat([img, x.to(bb.dtype)], dim=1)
                out = bb.unet(inp, t.expand(inp.shape[0]), encoder_hidden_states=txt).sample
                x = sched.step(out.float(), t, x).prev_sample
                bar.update(1)
            outs.append(x)
        bar.close()
        return torch.cat(outs)

    @torch.no_grad()
    def decode_masks(self, latents: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Mask latents → ``(N, H, W)`` in [0, 1]: decode, mean of the 3 channels, clip (Marigold)."""
        outs = []
        for s in range(0, latents.shape[0], batch_size):
            img = self.backbone.decode_latents(latents[s : s + batch_size])
            outs.append(((img.float().mean(1) + 1.0) / 2.0).clamp(0, 1).cpu())
        return torch.cat(outs)

    def _draw_noise(
        self, prepared: list[_Prepared], per_image: int, generator: torch.Generator | None
    ) -> list[torch.Tensor]:
        """Initial noise per image, drawn in input order on the CPU: independent of batching and device."""
        f = self.backbone.vae_scale_factor
        c = int(self.backbone.vae.config.latent_channels)
        shapes = [(per_image, c, p.pixels.shape[1] // f, p.pixels.shape[2] // f) for p in prepared]
        return [torch.randn(s, generator=generator) for s in shapes]

    def _generator(self, seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
        if generator is not None:
            if generator.device.type != "cpu":
                raise ValueError("generator must be a CPU torch.Generator (noise is drawn on the CPU)")
            return generator
        return torch.Generator().manual_seed(int(seed)) if seed is not None else None

    # ------------------------------------------------------------------ call
    def __call__(
        self,
        images: Any,
        class_names: Sequence[str] | str | None = None,
        output_size: int | Sequence[int] | None = None,
        ensemble_size: int | None = None,
        denoise_steps: int | None = None,
        processing_res: int | None = None,
        output_processing_res: bool | None = None,
        ensemble_reduction: str | None = None,
        background_threshold: float | None = None,
        prompt_template: str | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        progress: bool | None = None,
    ) -> SegmentationOutput:
        """Segment images into the prompted classes.

        Args:
            images: uint8 ``(H, W, 3)`` array(s); sizes may differ when ``output_size`` makes the
                outputs equal.
            class_names: names to segment (``"bag, sandal"`` or a list). ``"background"`` is the
                fallback label and is not prompted; without it, it is prepended at index 0.
                Default: the checkpoint's classes.
            output_size: side of the returned maps (int: longer edge; pair: (H, W)); default the
                input size, or the processing size with ``output_processing_res``.
            ensemble_size / denoise_steps / processing_res / output_processing_res /
            ensemble_reduction / background_threshold / prompt_template / batch_size / seed /
            progress: override the configured :class:`SegDiffusionConfig` for this call.
            generator: a CPU generator for the initial noise (overrides ``seed``).

        Returns:
            :class:`SegmentationOutput` with ``labels`` indexing ``class_names``, ``scores``
            (per-class mask probability; the background channel holds the threshold) and
            ``uncertainty`` (ensemble spread of the best class; ``None`` with one member).
        """
        cfg = SegDiffusionConfig.from_dict(
            {
                **self.config.to_dict(),
                **{
                    k: v
                    for k, v in {
                        "ensemble_size": ensemble_size,
                        "denoise_steps": denoise_steps,
                        "processing_res": processing_res,
                        "output_processing_res": output_processing_res,
                        "ensemble_reduction": ensemble_reduction,
                        "background_threshold": background_threshold,
                        "prompt_template": prompt_template,
                        "batch_size": batch_size,
                        "seed": seed,
                        "progress": progress,
                    }.items()
                    if v is not None
                },
            }
        )
        # 1. check inputs, split off the background
        imgs, names = self.check_inputs(images, class_names, cfg)
        out_names, prompted, bg_index, prompted_index = split_background(names)
        k, e = len(prompted), int(cfg.ensemble_size)
        res = self.backbone.config.processing_res if cfg.processing_res is None else int(cfg.processing_res)
        # 2. resize and pad the images; all outputs must share one size
        prepared = self.prepare_images(imgs, res, output_size, cfg.output_processing_res)
        sizes = {p.out_size for p in prepared}
        if len(sizes) > 1:
            raise ValueError(
                f"the images give outputs of different sizes {sorted(sizes)}: pass output_size, or "
                "call the pipeline once per image size"
            )
        # 3. prompts (one per class) and initial noise (per image, in input order)
        text = self.encode_prompts(prompted, cfg.prompt_template)
        noise = self._draw_noise(prepared, k * e, self._generator(cfg.seed, generator))
        # 4-6. per group of equally padded images: encode, denoise, decode, ensemble
        probs: list[torch.Tensor | None] = [None] * len(prepared)
        uncs: list[torch.Tensor | None] = [None] * len(prepared)
        for shape in dict.fromkeys(tuple(p.pixels.shape) for p in prepared):
            idx = [i for i, p in enumerate(prepared) if tuple(p.pixels.shape) == shape]
            group_probs, group_unc = self._segment_group(
                [prepared[i] for i in idx], [noise[i] for i in idx], text, e, cfg
            )
            for j, i in enumerate(idx):
                probs[i] = group_probs[j]
                uncs[i] = None if group_unc is None else group_unc[j]
        # 7. combine classes: argmax with a background threshold
        prob = torch.stack(probs)  # (B, K, H, W)
        labels, scores = combine_classes(
            prob, cfg.background_threshold, bg_index, prompted_index, len(out_names)
        )
        uncertainty, class_unc = None, None
        if uncs[0] is not None:
            class_unc = torch.stack(uncs)  # (B, K, H, W)
            uncertainty = class_unc.gather(1, prob.argmax(1, keepdim=True))[:, 0]
        extras: dict[str, Any] = {
            "prompted_classes": prompted,
            "prompts": [cfg.prompt_template.format(n) for n in prompted],
            "ensemble_size": e,
            "denoise_steps": int(cfg.denoise_steps),
            "processing_res": res,
        }
        if class_unc is not None:
            extras["class_uncertainty"] = class_unc.numpy().astype(np.float32)
        return SegmentationOutput(
            labels=labels.numpy().astype(np.int64),
            scores=scores.numpy().astype(np.float32),
            uncertainty=None if uncertainty is None else uncertainty.numpy().astype(np.float32),
            class_names=out_names,
            extras=extras,
        )

    def _segment_group(
        self,
        group: list[_Prepared],
        noise: list[torch.Tensor],
        text: torch.Tensor,
        ensemble_size: int,
        cfg: SegDiffusionConfig,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images of one padded size → per-class probabilities and uncertainties ``(n, K, H, W)``.

        Images are taken a few at a time, so that one pass holds about one UNet batch of rows
        (image × class × member): memory stays bounded by the batch, not by the number of images.
        """
        bb = self.backbone
        k = text.shape[0]
        f = bb.vae_scale_factor
        latent_hw = (group[0].pixels.shape[1] // f, group[0].pixels.shape[2] // f)
        bs = self._batch_size(cfg.batch_size, latent_hw)
        per_pass = max(1, bs // (k * ensemble_size))
        probs: list[torch.Tensor] = []
        uncs: list[torch.Tensor | None] = []
        for s in range(0, len(group), per_pass):
            part = group[s : s + per_pass]
            pixels = torch.stack([p.pixels for p in part]).to(bb.device, bb.vae.dtype)
            with torch.no_grad():
                latents = bb.vae.encode(pixels).latent_dist.mean.float() * bb.scaling_factor
            n = latents.shape[0]
            # rows ordered (image, class, member): each image latent K·E times, each prompt E times
            img_rows = latents.repeat_interleave(k * ensemble_size, dim=0)
            txt_rows = text.repeat_interleave(ensemble_size, dim=0).repeat(n, 1, 1)
            x0 = torch.cat(noise[s : s + per_pass])
            x = self.denoise(img_rows, txt_rows, x0, int(cfg.denoise_steps), bs, cfg.progress)
            masks = self.decode_masks(x, bs)  # (n·K·E, Hp, Wp)
            masks = masks.view(n, k, ensemble_size, *masks.shape[-2:])
            for j, p in enumerate(part):  # images of one padded size may differ in valid size
                h, w = p.valid
                prob, unc = ensemble_masks(masks[j, ..., :h, :w], cfg.ensemble_reduction)
                probs.append(_resize(prob[None], p.out_size)[0].clamp(0, 1))
                uncs.append(None if unc is None else _resize(unc[None], p.out_size)[0].clamp_min(0))
        return torch.stack(probs), (None if uncs[0] is None else torch.stack(uncs))  # type: ignore[arg-type]
