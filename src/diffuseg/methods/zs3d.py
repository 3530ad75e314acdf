"""ZS3D: zero-shot semantic segmentation with a DDPM over visual-semantic stacks.

A DDPM trained from scratch learns the joint distribution of ``[image ; semantic]`` stacks: three
RGB channels in [-1, 1] and ``k`` channels holding, at every pixel, the embedding of its
ground-truth class name (a sentence-encoder embedding reduced to ``k`` dimensions by a projection
fitted on class *names* only). Training uses seen classes only. At test time the image guides the
sampler (its forward-noised copy replaces the visual channels at every reverse step), so the
semantic channels end as a per-pixel class embedding; a cosine classifier over seen **and**
unseen class embeddings, with calibrated stacking, turns it into labels.

Parts, in the order a call uses them:

* :class:`SemanticProjection` - the fitted name-embedding projection (saved with the model);
* :func:`sampling_plan` - the reverse-process schedule with RS(N) RePaint resampling, in
  absolute timesteps;
* :func:`ddpm_step` / :func:`ddim_step` / :func:`renoise` - one transition each;
* :func:`guided_sample` - the guided (or partly guided, or unconditional) sampler;
* :func:`class_scores` / :func:`calibrate_scores` / :func:`sweep_margin` - the semantic
  classifier and the choice of its calibration margin;
* :class:`ZS3DPipeline` - ``from_pretrained`` / ``__call__`` / ``generate``; it also runs the
  SPNet-like baseline (a UNet regressing the embedding directly), so both share the classifier;
* :func:`augment_dataset` - image + mask pairs written in diffuseg's dataset layout.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from torch import Tensor
from tqdm.auto import tqdm

from diffuseg.methods.base import check_images, parse_classes
from diffuseg.outputs import SegmentationOutput

logger = logging.getLogger(__name__)

__all__ = [
    "GeneratedPairs",
    "SemanticProjection",
    "Step",
    "ZS3DConfig",
    "ZS3DPipeline",
    "augment_dataset",
    "build_scheduler",
    "build_unet",
    "calibrate_scores",
    "class_scores",
    "ddim_step",
    "ddpm_step",
    "evaluate_zs3d",
    "guidance_threshold",
    "guided_sample",
    "images_to_tensor",
    "normalize_name",
    "pseudo_unseen_classes",
    "renoise",
    "sampling_plan",
    "sweep_margin",
    "to_epsilon",
]

CONFIG_FILE = "zs3d_config.json"
MODEL_TYPES = ("ddpm", "regression")
SAMPLERS = ("ddim", "ddpm")
GUIDE_NOISE = ("matched", "clean")
IGNORE_INDEX = 255


# ----------------------------------------------------------------------------------------- config
@dataclass
class ZS3DConfig:
    """Pipeline defaults and provenance, stored as ``zs3d_config.json`` beside the weights.

    ``classes`` are the names the projection was fitted on (seen and unseen: inductive ZS3 knows
    the unseen *names*); ``unseen`` those the model was trained without. ``calibration`` is the
    calibrated-stacking margin subtracted from seen-class scores; ``training`` and
    ``calibration_info`` record exactly what data and procedure produced the weights and the margin.
    """

    classes: list[str]
    unseen: list[str]
    model_type: str = "ddpm"
    image_size: int = 32
    semantic_channels: int = 10
    text_encoder: str = "minilm"
    templates: list[str] | None = None
    sampler: str = "ddim"
    guide_noise: str = "matched"
    num_inference_steps: int = 25
    num_samples: int = 4
    resample: int = 0
    jump_length: int = 5
    eta: float = 0.0
    calibration: float = 0.0
    smoothing: float = 0.0
    batch_size: int = 16
    training: dict[str, Any] = field(default_factory=dict)
    calibration_info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [u for u in self.unseen if u not in self.classes]
        problems = [
            (self.model_type in MODEL_TYPES, f"model_type must be one of {MODEL_TYPES}"),
            (self.sampler in SAMPLERS, f"sampler must be one of {SAMPLERS}"),
            (self.guide_noise in GUIDE_NOISE, f"guide_noise must be one of {GUIDE_NOISE}"),
            (not unknown, f"unseen classes {unknown} are not among classes {self.classes}"),
            (self.image_size >= 8, "image_size must be >= 8"),
            (self.semantic_channels >= 1, "semantic_channels must be >= 1"),
        ]
        errors = [msg for ok, msg in problems if not ok]
        if errors:
            raise ValueError("Invalid ZS3DConfig: " + "; ".join(errors))

    @property
    def seen(self) -> list[str]:
        """Classes whose pixels the model was trained on (all fitted names but the unseen)."""
        return [c for c in self.classes if c not in self.unseen]

    def save(self, folder: str | os.PathLike) -> None:
        from diffuseg.io import write_json

        write_json(Path(folder) / CONFIG_FILE, asdict(self))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> ZS3DConfig:
        path = Path(folder) / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {folder} is not a ZS3D checkpoint")
        values = json.loads(path.read_text())
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            logger.warning("%s: ignoring unknown keys %s", path, unknown)
        return cls(**{k: v for k, v in values.items() if k in names})


def normalize_name(name: str) -> str:
    """Compare class names case- and separator-insensitively (``Ankle_Boot`` == ``ankle boot``)."""
    return re.sub(r"[\s_]+", " ", str(name)).strip().lower()


# ------------------------------------------------------------------------------- semantic space
class SemanticProjection(ModelMixin, ConfigMixin):
    """PCA of class-name embeddings: ``(N, text_dim)`` unit vectors -> ``(N, k)`` codes in [-1, 1].

    Fitted once, on the names of *all* classes (inductive zero-shot: unseen names are known, their
    pixels are not). Centering on the mean name removes what every prompt shares ("a photo of a"),
    which otherwise makes all names look alike; PCA keeps the directions in which names differ;
    one global scale maps the codes into [-1, 1], the range of the image channels, without
    whitening (whitening would make all classes equidistant and erase semantic similarity). The
    fitted tensors are buffers, so ``save_pretrained`` stores them as safetensors.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        text_dim: int = 384,
        num_channels: int = 10,
        text_encoder: str = "minilm",
        templates: list[str] | None = None,
        fitted_on: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(text_dim))
        self.register_buffer("components", torch.zeros(num_channels, text_dim))
        self.register_buffer("scale", torch.ones(1))

    @classmethod
    def fit(
        cls,
        embeddings: Tensor,
        names: Sequence[str],
        num_channels: int,
        text_encoder: str = "minilm",
        templates: Sequence[str] | None = None,
    ) -> SemanticProjection:
        """Fit on ``(C, D)`` name embeddings; ``num_channels`` must be below ``C`` (rank of centred data)."""
        emb = torch.as_tensor(embeddings, dtype=torch.float64)
        c, d = emb.shape
        if len(names) != c:
            raise ValueError(f"{len(names)} names for {c} embeddings")
        if not 1 <= num_channels <= min(c - 1, d):
            raise ValueError(
                f"semantic_channels={num_channels} but {c} class names span at most {min(c - 1, d)} "
                f"dimensions after centring: use semantic_channels <= {min(c - 1, d)}"
            )
        mean = emb.mean(0)
        _, _, vt = torch.linalg.svd(emb - mean, full_matrices=False)
        comps = vt[:num_channels]
        # SVD signs are arbitrary: make each component's largest-magnitude entry positive (reproducible)
        signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
        comps = comps * signs
        codes = (emb - mean) @ comps.T
        proj = cls(d, num_channels, text_encoder, list(templates) if templates else None, list(names))
        proj.mean.copy_(mean.float())
        proj.components.copy_(comps.float())
        proj.scale.fill_(float(codes.abs().max().clamp_min(1e-8)))
        return proj

    def forward(self, embeddings: Tensor) -> Tensor:
        """``(N, text_dim)`` name embeddings -> ``(N, k)`` codes."""
        emb = embeddings.to(self.mean)
        return (emb - self.mean) @ self.components.T / self.scale


def pseudo_unseen_classes(codes: Tensor, names: Sequence[str], unseen: Sequence[str]) -> list[str]:
    """Per unseen class, the seen class (not the first, background) whose code is most similar.

    Used to simulate the zero-shot situation for calibration without unseen labels: the
    pseudo-unseen classes stand in the same relation to the rest as the real unseen ones do to
    the seen classes. Only class *names* are used. The first class (background by convention)
    is never held out, because every image contains it.
    """
    normed = F.normalize(codes.float(), dim=1)
    sim = normed @ normed.T
    chosen: list[str] = []
    for u in unseen:
        i = list(names).index(u)
        order = torch.argsort(sim[i], descending=True).tolist()
        for j in order:
            cand = names[j]
            if j != 0 and cand not in unseen and cand not in chosen:
                chosen.append(cand)
                break
    return chosen


# -------------------------------------------------------------------------------- model builders
def build_unet(
    image_size: int,
    in_channels: int,
    out_channels: int,
    block_out_channels: Sequence[int] = (64, 128, 128),
    layers_per_block: int = 1,
    attention_levels: Sequence[int] = (2,),
    attention_head_dim: int = 32,
    dropout: float = 0.0,
    norm_num_groups: int = 32,
    image_timestep: bool = False,
) -> UNet2DModel:
    """A diffusers ``UNet2DModel`` with self-attention at the given levels (0 = full resolution).

    ``image_timestep`` adds a second timestep embedding (``class_embed_type="timestep"``, fed through
    ``class_labels``) for the noise level of the image channels, so they can be noised independently
    of the semantic channels (ZS3D's decoupled-noise training, see :class:`~diffuseg.train.zs3d.ZS3DTask`).
    """
    n = len(block_out_channels)
    bad = [a for a in attention_levels if not 0 <= a < n]
    if bad:
        raise ValueError(f"attention_levels {bad} outside 0..{n - 1} for {n} blocks")
    if image_size % 2 ** (n - 1):
        raise ValueError(f"image_size {image_size} must be divisible by 2**{n - 1} for {n} blocks")
    down = tuple("AttnDownBlock2D" if i in attention_levels else "DownBlock2D" for i in range(n))
    up = tuple("AttnUpBlock2D" if n - 1 - i in attention_levels else "UpBlock2D" for i in range(n))
    return UNet2DModel(
        sample_size=image_size,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
        dropout=dropout,
        class_embed_type="timestep" if image_timestep else None,
    )


PREDICTION_TYPES = ("epsilon", "v_prediction")


def build_scheduler(**overrides: Any):
    """The original's noise schedule (T=1000, linear β 1e-4..0.02, ε-prediction), trailing grid.

    ``prediction_type="v_prediction"`` (Salimans & Ho 2022) is the one alternative the samplers
    support: the network then predicts v = √ᾱ ε − √(1−ᾱ) x₀, which stays informative at the
    noisiest steps, where an ε-model's x̂₀ is amplified noise.
    """
    from diffusers import DDPMScheduler

    values: dict[str, Any] = {
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "prediction_type": "epsilon",
        "clip_sample": True,
        "timestep_spacing": "trailing",
    }
    values.update(overrides)
    if values["prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type must be one of {PREDICTION_TYPES}, got {values['prediction_type']!r}"
        )
    return DDPMScheduler(**values)


def to_epsilon(output: Tensor, x: Tensor, t: int, alphas_cumprod: Tensor, prediction_type: str) -> Tensor:
    """The ε implied by a network output at absolute level ``t`` (identity for ε-models)."""
    if prediction_type == "epsilon":
        return output
    if prediction_type != "v_prediction":
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    a = _alpha_bar(alphas_cumprod, t).to(x)
    return a.sqrt() * output + (1 - a).sqrt() * x


# ------------------------------------------------------------------------------- reverse process
@dataclass(frozen=True)
class Step:
    """One transition of the reverse process between *absolute* timesteps (``-1`` = clean data).

    ``denoise``: ``t -> t_next`` with ``t_next < t``, one network evaluation. ``renoise``: RePaint's
    jump back, ``t -> t_next`` with ``t_next > t``, drawn from ``q(x_{t_next} | x_t)``.
    """

    kind: str
    t: int
    t_next: int


def inference_timesteps(scheduler, num_inference_steps: int) -> list[int]:
    """The descending timestep grid of ``num_inference_steps`` (the scheduler's configured spacing)."""
    n_train = int(scheduler.config.num_train_timesteps)
    if not 1 <= num_inference_steps <= n_train:
        raise ValueError(f"num_inference_steps must be in [1, {n_train}], got {num_inference_steps}")
    scheduler.set_timesteps(num_inference_steps)
    grid = [int(t) for t in scheduler.timesteps]
    if any(b >= a for a, b in zip(grid, grid[1:], strict=False)):
        raise ValueError(f"scheduler produced a non-decreasing timestep grid {grid[:5]}...")
    return grid


def sampling_plan(timesteps: Sequence[int], resample: int = 0, jump_length: int = 1) -> list[Step]:
    """The reverse process over the grid ``timesteps`` (descending), with RS(N) RePaint resampling.

    Positions ``p = 0..S`` index the grid, position ``S`` being clean data (``t = -1``). Without
    resampling the plan is ``S`` denoising steps. With ``resample = N``: every time the sampler
    reaches a position ``p`` with ``0 < p < S`` and ``p % jump_length == 0``, it jumps back
    ``jump_length`` grid positions (re-noising with ``q(x_{t_{p-j}} | x_{t_p})``) and denoises them
    again, ``N`` times per such position. Every step carries the absolute timesteps it connects, so
    the jump noise and the guidance noise always use the right noise level, whatever the grid's
    stride (the bug this avoids: computing the jump target as a relative offset in units of
    training steps when the grid is strided). Cost: ``S + N * jump_length * floor((S - 1) / j)``
    network evaluations.
    """
    grid = [int(t) for t in timesteps]
    if not grid:
        raise ValueError("timesteps is empty")
    if resample < 0:
        raise ValueError(f"resample must be >= 0, got {resample}")
    if jump_length < 1:
        raise ValueError(f"jump_length must be >= 1, got {jump_length}")
    s = len(grid)

    def at(p: int) -> int:
        return grid[p] if p < s else -1

    plan: list[Step] = []
    jumps: dict[int, int] = {}
    p = 0
    while p < s:
        plan.append(Step("denoise", at(p), at(p + 1)))
        p += 1
        if resample and p < s and p % jump_length == 0 and jumps.get(p, 0) < resample:
            jumps[p] = jumps.get(p, 0) + 1
            plan.append(Step("renoise", at(p), at(p - jump_length)))
            p -= jump_length
    return plan


def _alpha_bar(alphas_cumprod: Tensor, t: int) -> Tensor:
    return alphas_cumprod[t] if t >= 0 else torch.ones((), dtype=alphas_cumprod.dtype)


def _predict_x0(x: Tensor, eps: Tensor, a_t: Tensor, clip: bool) -> Tensor:
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return x0.clamp(-1, 1) if clip else x0


def ddpm_step(
    eps: Tensor, t: int, t_next: int, x: Tensor, alphas_cumprod: Tensor, noise: Tensor, clip: bool = True
) -> Tensor:
    """Ancestral DDPM step ``t -> t_next`` (any stride): the posterior ``q(x_{t_next} | x_t, x̂_0)``.

    Same maths as diffusers' ``DDPMScheduler.step`` (``fixed_small`` variance, clipped x̂_0) but with
    the previous timestep given explicitly instead of inferred from the scheduler's state.
    """
    a_t, a_n = _alpha_bar(alphas_cumprod, t).to(x), _alpha_bar(alphas_cumprod, t_next).to(x)
    beta = 1 - a_t / a_n
    x0 = _predict_x0(x, eps, a_t, clip)
    mean = (a_n.sqrt() * beta / (1 - a_t)) * x0 + ((1 - beta).sqrt() * (1 - a_n) / (1 - a_t)) * x
    var = ((1 - a_n) / (1 - a_t) * beta).clamp_min(1e-20)
    return mean + var.sqrt() * noise if t_next >= 0 else mean


def ddim_step(
    eps: Tensor,
    t: int,
    t_next: int,
    x: Tensor,
    alphas_cumprod: Tensor,
    eta: float = 0.0,
    noise: Tensor | None = None,
    clip: bool = True,
) -> Tensor:
    """DDIM step ``t -> t_next`` (Song et al. 2021, eq. 12) with clipped x̂_0 and ε re-derived from it.

    Equals diffusers' ``DDIMScheduler.step(..., use_clipped_model_output=True)`` when ``t_next`` is the
    scheduler's own previous timestep; here any ``t_next`` works.
    """
    a_t, a_n = _alpha_bar(alphas_cumprod, t).to(x), _alpha_bar(alphas_cumprod, t_next).to(x)
    x0 = _predict_x0(x, eps, a_t, clip)
    eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    sigma = eta * ((1 - a_n) / (1 - a_t) * (1 - a_t / a_n)).clamp_min(0).sqrt()
    out = a_n.sqrt() * x0 + (1 - a_n - sigma**2).clamp_min(0).sqrt() * eps
    if eta > 0 and t_next >= 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        out = out + sigma * noise
    return out


def renoise(x: Tensor, t: int, t_next: int, alphas_cumprod: Tensor, noise: Tensor) -> Tensor:
    """Jump forward ``t -> t_next > t`` with ``q(x_{t_next} | x_t)`` (RePaint's resampling jump)."""
    if t_next <= t:
        raise ValueError(f"renoise goes to a noisier level: t_next={t_next} must exceed t={t}")
    a = _alpha_bar(alphas_cumprod, t_next) / _alpha_bar(alphas_cumprod, t)
    a = a.to(x)
    return a.sqrt() * x + (1 - a).sqrt() * noise


def q_sample(x0: Tensor, t: int, alphas_cumprod: Tensor, noise: Tensor) -> Tensor:
    """Forward-noise clean data to absolute level ``t`` (``t = -1``: unchanged)."""
    a = _alpha_bar(alphas_cumprod, t).to(x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def guidance_threshold(timesteps: Sequence[int], rho: float) -> int | None:
    """Lowest timestep still guided at strength ``rho``: the first ``ceil(rho * S)`` grid steps are.

    ``rho = 1`` guides every step (segmentation); ``rho = 0`` none (``None``: unconditional).
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    n = math.ceil(rho * len(timesteps) - 1e-9)
    return None if n == 0 else int(timesteps[n - 1])


def _randn(shape: Sequence[int], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Noise drawn on the generator's device (CPU by default), then moved: reproducible on any device."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32).to(like)


@torch.no_grad()
def guided_sample(
    unet: Callable[..., Any],
    alphas_cumprod: Tensor,
    plan: Sequence[Step],
    shape: Sequence[int],
    guide: Tensor | None = None,
    guide_until: int | None = -1,
    sampler: str = "ddim",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    guide_noise: str = "matched",
    image_timestep: bool = False,
    prediction_type: str = "epsilon",
    on_step: Callable[[int, Step, Tensor], None] | None = None,
) -> Tensor:
    """Run ``plan`` from pure noise; the first ``guide.shape[1]`` channels follow the guide image.

    Before every denoising step at a timestep ``t >= guide_until`` the visual channels are replaced
    by the guide forward-noised to ``t`` with fresh noise (RePaint), so the network sees the true
    image at the noise level it expects while the semantic channels evolve freely. ``guide_until``:
    ``-1`` guides every step (segmentation), ``None`` none (unconditional generation), anything in
    between guides only the noisiest steps (augmentation strength ρ). When the final step was
    guided, the clean guide is put back in the visual channels.

    ``guide_noise="clean"`` (models with ``image_timestep`` only) feeds the guide at noise level 0
    (with image timestep 0) at every guided step instead: the semantic channels are then denoised
    with the whole image visible from the first step. With ``image_timestep`` the network always
    receives the image channels' noise level as ``class_labels`` (= ``t`` on unguided steps).

    ``on_step(i, step, x0)`` is called after every denoising step (``i`` counts them, RS(N) jumps
    excluded) with the network's clipped clean estimate x̂_0 of the whole stack: where along the
    trajectory the semantic channels settle (``benchmarks/zs3d_fashion.py --trajectory``).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if guide_noise not in GUIDE_NOISE:
        raise ValueError(f"guide_noise must be one of {GUIDE_NOISE}, got {guide_noise!r}")
    if guide_noise == "clean" and not image_timestep:
        raise ValueError(
            "guide_noise='clean' needs a model trained with decoupled noise levels "
            "(model.decoupled_noise: true); use guide_noise='matched'"
        )
    acp = alphas_cumprod.to(torch.float64)
    ref = torch.empty((), device=device)
    x = _randn(shape, generator, ref)
    vis = 0 if guide is None else guide.shape[1]
    if guide is not None:
        guide = guide.to(ref.device, torch.float32)
        if guide.shape[0] != shape[0] or guide.shape[2:] != tuple(shape[2:]):
            raise ValueError(f"guide shape {tuple(guide.shape)} does not fit the sample shape {tuple(shape)}")

    def guided(t: int) -> bool:
        return guide is not None and guide_until is not None and t >= guide_until

    denoised = 0
    for step in tqdm(plan, desc="ZS3D sampling", disable=not progress, leave=False):
        if step.kind == "renoise":
            x = renoise(x, step.t, step.t_next, acp, _randn(x.shape, generator, x))
            continue
        t_img = step.t
        if guided(step.t):
            t_img = 0 if guide_noise == "clean" else step.t
            x = torch.cat([q_sample(guide, t_img, acp, _randn(guide.shape, generator, x)), x[:, vis:]], 1)
        t_in = torch.full((x.shape[0],), step.t, device=x.device, dtype=torch.long)
        if image_timestep:
            out = unet(x, t_in, class_labels=torch.full_like(t_in, t_img)).sample
        else:
            out = unet(x, t_in).sample
        eps = to_epsilon(out, x, step.t, acp, prediction_type)
        if on_step is not None:
            on_step(denoised, step, _predict_x0(x, eps, _alpha_bar(acp, step.t).to(x), True))
        denoised += 1
        if sampler == "ddpm":
            x = ddpm_step(eps, step.t, step.t_next, x, acp, _randn(x.shape, generator, x))
        else:
            noise = _randn(x.shape, generator, x) if eta > 0 else None
            x = ddim_step(eps, step.t, step.t_next, x, acp, eta, noise)
    if plan and guided(plan[-1].t):
        x = torch.cat([guide, x[:, vis:]], 1)
    return x


# ------------------------------------------------------------------------------------ classifier
def class_scores(embeddings: Tensor, codes: Tensor) -> Tensor:
    """Cosine similarity of embeddings ``(B, k, H, W)`` to class codes ``(C, k)``: ``(B, C, H, W)``."""
    e = F.normalize(embeddings.float(), dim=1, eps=1e-6)
    c = F.normalize(codes.float().to(e.device), dim=1, eps=1e-6)
    return torch.einsum("bkhw,ck->bchw", e, c)


def calibrate_scores(scores: Tensor, seen_mask: Tensor, gamma: float) -> Tensor:
    """Calibrated stacking (Chao et al. 2016): subtract ``gamma`` from every seen class's score.

    A generator trained on seen classes is biased toward them: an unseen object's embedding lands
    near a seen class. Lowering seen scores by a constant lets an unseen class win where the
    evidence for every seen class is weak, while confident seen pixels keep their class.
    """
    mask = seen_mask.to(scores.device, scores.dtype).view(1, -1, 1, 1)
    return scores - float(gamma) * mask


def gaussian_smooth(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` score maps (reflect padding); ``sigma`` in pixels."""
    if sigma <= 0:
        return maps
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    b, c, h, w = maps.shape
    out = maps.reshape(b * c, 1, h, w)
    pad = min(radius, h - 1, w - 1)
    if pad < radius:  # tiny maps: crop the kernel so reflect padding stays valid
        k = k[radius - pad : radius + pad + 1]
        k = k / k.sum()
    out = F.conv2d(F.pad(out, (pad, pad, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, pad, pad), mode="reflect"), k.view(1, 1, -1, 1))
    return out.reshape(b, c, h, w)


def _miou(hist: np.ndarray, ids: Sequence[int]) -> float:
    """mmseg-style mean IoU (%) over ``ids`` of a ``(C, C)`` GT x prediction histogram."""
    vals = []
    for i in ids:
        inter = hist[i, i]
        union = hist[i, :].sum() + hist[:, i].sum() - inter
        if union > 0:
            vals.append(100.0 * inter / union)
    return float(np.mean(vals)) if vals else float("nan")


def sweep_margin(
    scores: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    seen_mask: np.ndarray,
    seen_ids: Sequence[int],
    unseen_ids: Sequence[int],
    gammas: Sequence[float],
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, Any]:
    """Score every margin ``gamma`` (harmonic mean of seen/unseen mIoU) and return the best.

    ``scores``: raw cosine scores ``(C, H, W)`` per image; ``labels``: ``(H, W)`` ground truth. Only
    ``seen_ids`` and ``unseen_ids`` enter the means (other candidate classes count as errors where
    predicted). Ties go to the smallest margin (the least intervention). Returns ``{"gamma",
    "hIoU", "mIoU_seen", "mIoU_unseen", "curve": [{gamma, hIoU, mIoU_seen, mIoU_unseen}, ...]}``.
    """
    if len(scores) != len(labels) or not len(scores):
        raise ValueError(f"need as many score maps as label maps (got {len(scores)} and {len(labels)})")
    if not len(gammas):
        raise ValueError("gammas is empty")
    mask = np.asarray(seen_mask, dtype=np.float32)
    c = int(mask.shape[0])
    flat = np.concatenate([np.asarray(s, np.float32).reshape(c, -1) for s in scores], axis=1)
    gt = np.concatenate([np.asarray(lab).reshape(-1) for lab in labels])
    keep = (gt != ignore_index) & (gt >= 0) & (gt < c)
    flat, gt = flat[:, keep], gt[keep].astype(np.int64)
    curve = []
    for g in gammas:
        pred = np.argmax(flat - float(g) * mask[:, None], axis=0)
        hist = np.bincount(gt * c + pred, minlength=c * c).reshape(c, c)
        s, u = _miou(hist, seen_ids), _miou(hist, unseen_ids)
        h = 2 * s * u / (s + u) if s + u > 0 else 0.0
        curve.append({"gamma": float(g), "hIoU": h, "mIoU_seen": s, "mIoU_unseen": u})
    best = max(curve, key=lambda r: (np.nan_to_num(r["hIoU"], nan=-1.0), -r["gamma"]))
    return {**best, "curve": curve}


# -------------------------------------------------------------------------------------- images
def images_to_tensor(images: Sequence[np.ndarray], size: int) -> Tensor:
    """uint8 ``(H, W, 3)`` images -> ``(B, 3, size, size)`` floats in [-1, 1] (PIL bilinear, antialiased).

    The one image range of ZS3D, in training and at sampling (the original trained on [0, 1] and
    sampled with [-1, 1]).
    """
    from PIL import Image

    out = []
    for im in images:
        if im.shape[:2] != (size, size):
            im = np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
        out.append(torch.from_numpy(np.require(im, np.uint8, ["C", "W"])).permute(2, 0, 1))
    return torch.stack(out).float() / 127.5 - 1.0


def tensor_to_images(x: Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` in [-1, 1] -> uint8 ``(B, H, W, 3)``."""
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return arr.permute(0, 2, 3, 1).numpy().astype(np.uint8)


def _output_hw(images: Sequence[np.ndarray], output_size: int | None) -> tuple[int, int]:
    """The label-map size of a batch: the images' own size, or ``output_size`` on the shorter side."""
    sizes = {im.shape[:2] for im in images}
    if output_size is None:
        if len(sizes) > 1:
            raise ValueError(
                f"images of different sizes {sorted(sizes)} in one batch: pass output_size=N "
                "or segment them in separate calls"
            )
        h, w = sizes.pop()
        return int(h), int(w)
    if output_size < 1:
        raise ValueError(f"output_size must be >= 1, got {output_size}")
    h, w = images[0].shape[:2]
    if h == w:
        return int(output_size), int(output_size)
    scale = output_size / min(h, w)
    return round(h * scale), round(w * scale)


@dataclass
class GeneratedPairs:
    """Output of :meth:`ZS3DPipeline.generate`: synthetic images and their label maps."""

    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N, H, W) int64, indexing class_names
    class_names: list[str]
    embeddings: np.ndarray  # (N, k, h, w) float32 at model resolution


# -------------------------------------------------------------------------------------- pipeline
class ZS3DPipeline:
    """ZS3D zero-shot segmentation (and the SPNet-like baseline) behind diffuseg's pipeline interface.

    Example::

        pipe = ZS3DPipeline.from_pretrained("runs/zs3d/final")
        out = pipe(image)                                   # the checkpoint's classes
        out = pipe(image, class_names=["background", "sandal", "sneaker"], resample=5)
        pairs = pipe.generate(8, guide_images=images, rho=0.6)   # augmentation

    ``model_type == "regression"`` (the baseline) predicts the embedding in one forward pass of
    the same-size UNet; the sampling arguments are then ignored.
    """

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: Any,
        projection: SemanticProjection,
        config: ZS3DConfig,
        text_encoder: Any = None,
    ) -> None:
        self.unet = unet.eval()
        self.scheduler = scheduler
        self.projection = projection.eval()
        self.config = config
        self._text_encoder = text_encoder
        self._codes: dict[tuple[str, ...], Tensor] = {}
        self._check_shapes()

    def _check_shapes(self) -> None:
        k, c = self.config.semantic_channels, self.unet.config.in_channels
        expected = (3, k) if self.config.model_type == "regression" else (3 + k, 3 + k)
        got = (c, self.unet.config.out_channels)
        if got != expected or self.projection.config.num_channels != k:
            raise ValueError(
                f"inconsistent ZS3D checkpoint: UNet in/out channels {got}, projection "
                f"{self.projection.config.num_channels} channels, config {k} semantic channels "
                f"({self.config.model_type})"
            )

    # -- loading / saving ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, checkpoint: str | os.PathLike | None = None, **overrides: Any) -> ZS3DPipeline:
        """Load a ZS3D folder (``None``: the shipped ``checkpoints/zs3d``); ``overrides`` set defaults."""
        from diffusers import DDPMScheduler

        if checkpoint is None:
            from diffuseg.backbones.latent import default_checkpoint_dir

            checkpoint = default_checkpoint_dir("zs3d")
        root = Path(checkpoint)
        if not (root / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"{root} is not a ZS3D checkpoint (no {CONFIG_FILE}); train one with `diffuseg train zs3d`"
            )
        config = ZS3DConfig.load(root)
        names = {f.name for f in fields(ZS3DConfig)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise ValueError(f"unknown ZS3D settings {bad}; valid: {sorted(names)}")
        for key, value in overrides.items():
            if value is not None:
                setattr(config, key, value)
        config.__post_init__()
        unet = UNet2DModel.from_pretrained(root / "unet")
        scheduler = DDPMScheduler.from_pretrained(root / "scheduler")
        projection = SemanticProjection.from_pretrained(root / "semantic_projection")
        return cls(unet, scheduler, projection, config)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the diffusers-style folder: unet/, scheduler/, semantic_projection/, zs3d_config.json."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(out / "unet", safe_serialization=True)
        self.scheduler.save_pretrained(out / "scheduler")
        self.projection.save_pretrained(out / "semantic_projection", safe_serialization=True)
        self.config.save(out)
        index = {
            "_class_name": "ZS3DPipeline",
            "_diffuseg_module": "diffuseg.methods.zs3d",
            "unet": ["diffusers", "UNet2DModel"],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            "semantic_projection": ["diffuseg.methods.zs3d", "SemanticProjection"],
        }
        from diffuseg.io import write_json

        write_json(out / "model_index.json", index)
        return out

    def to(self, device: str | torch.device) -> ZS3DPipeline:
        self.unet.to(device)
        self.projection.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def image_timestep(self) -> bool:
        """Whether the UNet takes the image channels' own noise level (decoupled-noise training)."""
        return getattr(self.unet.config, "class_embed_type", None) == "timestep"

    # -- class embeddings ------------------------------------------------------------------------
    @property
    def text_encoder(self):
        if self._text_encoder is None:
            from diffuseg.text import get_text_encoder

            self._text_encoder = get_text_encoder(self.config.text_encoder)
        return self._text_encoder

    def class_codes(self, class_names: Sequence[str]) -> Tensor:
        """``(C, k)`` codes of any class names: text encoder + the stored projection (cached)."""
        key = tuple(class_names)
        if key not in self._codes:
            emb = self.text_encoder.encode_classes(list(class_names), templates=self.config.templates)
            with torch.no_grad():
                self._codes[key] = self.projection(emb.cpu()).float().cpu()
        return self._codes[key]

    def seen_mask(self, class_names: Sequence[str]) -> Tensor:
        """1 for names the model was trained on (get the calibration margin), 0 for the rest."""
        seen = {normalize_name(c) for c in self.config.seen}
        return torch.tensor([float(normalize_name(c) in seen) for c in class_names])

    def check_dataset_meta(self, meta: dict[str, Any]) -> None:
        """Warn when a dataset's unseen list differs from the classes this model was trained without."""
        data_unseen = {normalize_name(u) for u in meta.get("unseen", [])}
        model_unseen = {normalize_name(u) for u in self.config.unseen}
        if data_unseen != model_unseen:
            logger.warning(
                "the dataset's meta.json lists unseen classes %s but this ZS3D model was trained without "
                "%s: seen/unseen metrics follow the dataset, calibration follows the model",
                sorted(data_unseen),
                sorted(model_unseen),
            )

    # -- inputs ----------------------------------------------------------------------------------
    def check_inputs(
        self,
        images: Any,
        class_names: Any,
        sampler: str,
        num_inference_steps: int,
        num_samples: int,
        resample: int,
        jump_length: int,
        smoothing: float,
        guide_noise: str = "matched",
    ) -> tuple[list[np.ndarray], list[str]]:
        """Validate a call; every error names the fix."""
        imgs = check_images(images)
        names = parse_classes(class_names) or list(self.config.classes)
        if len(names) < 2:
            raise ValueError("class_names: give at least two classes to choose between")
        checks = [
            (sampler in SAMPLERS, f"sampler must be one of {SAMPLERS}, got {sampler!r}"),
            (num_inference_steps >= 1, f"num_inference_steps must be >= 1, got {num_inference_steps}"),
            (num_samples >= 1, f"num_samples must be >= 1, got {num_samples}"),
            (resample >= 0, f"resample (RS(N)) must be >= 0, got {resample}"),
            (jump_length >= 1, f"jump_length must be >= 1, got {jump_length}"),
            (smoothing >= 0, f"smoothing (Gaussian sigma in pixels) must be >= 0, got {smoothing}"),
            (guide_noise in GUIDE_NOISE, f"guide_noise must be one of {GUIDE_NOISE}, got {guide_noise!r}"),
            (
                guide_noise != "clean" or self.image_timestep or self.config.model_type == "regression",
                "guide_noise='clean' needs a model trained with decoupled noise levels; use 'matched'",
            ),
        ]
        errors = [msg for ok, msg in checks if not ok]
        if errors:
            raise ValueError("; ".join(errors))
        return imgs, names

    # -- embeddings ------------------------------------------------------------------------------
    def plan(self, num_inference_steps: int, resample: int = 0, jump_length: int = 1) -> list[Step]:
        return sampling_plan(inference_timesteps(self.scheduler, num_inference_steps), resample, jump_length)

    @torch.no_grad()
    def embed(
        self,
        images: Sequence[np.ndarray],
        num_samples: int = 1,
        sampler: str = "ddim",
        num_inference_steps: int = 25,
        resample: int = 0,
        jump_length: int = 5,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        progress: bool = False,
        guide_noise: str = "matched",
        on_step: Callable[[int, Step, Tensor], None] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Per-pixel embeddings at model resolution: ``(mean (B, k, s, s), sample std (B, s, s) | None)``.

        DDPM models: guided sampling, ``num_samples`` samples per image averaged (their spread is the
        uncertainty); the batch is processed in chunks of ``config.batch_size`` stacks, and
        ``on_step`` (see :func:`guided_sample`) sees each chunk's x̂_0 in order.
        """
        x = images_to_tensor(images, self.config.image_size).to(self.device)
        if self.config.model_type == "regression":
            t0 = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            return self.unet(x, t0).sample.float(), None
        plan = self.plan(num_inference_steps, resample, jump_length)
        acp = self.scheduler.alphas_cumprod
        k = self.config.semantic_channels
        stacked = x.repeat_interleave(num_samples, dim=0)
        chunks = []
        for part in torch.split(stacked, max(1, self.config.batch_size)):
            shape = (part.shape[0], 3 + k, *part.shape[2:])
            out = guided_sample(
                self.unet,
                acp,
                plan,
                shape,
                part,
                -1,
                sampler,
                eta,
                generator,
                self.device,
                progress,
                guide_noise=guide_noise,
                image_timestep=self.image_timestep,
                prediction_type=self.scheduler.config.prediction_type,
                on_step=on_step,
            )
            chunks.append(out[:, 3:].float())
        sem = torch.cat(chunks).view(x.shape[0], num_samples, k, *x.shape[2:])
        std = sem.std(1).mean(1) if num_samples > 1 else None
        return sem.mean(1), std

    def classify(
        self,
        embeddings: Tensor,
        class_names: Sequence[str],
        output_hw: tuple[int, int],
        calibration: float,
        smoothing: float,
    ) -> tuple[Tensor, Tensor]:
        """Embeddings ``(B, k, h, w)`` -> ``(labels (B, H, W), calibrated scores (B, C, H, W))``.

        The embedding map is upsampled (bilinear) before classification, so label edges fall between
        model pixels instead of following the model's pixel grid.
        """
        emb = F.interpolate(embeddings.float(), size=output_hw, mode="bilinear", align_corners=False)
        scores = class_scores(emb, self.class_codes(class_names))
        scores = calibrate_scores(scores, self.seen_mask(class_names), calibration)
        scores = gaussian_smooth(scores, smoothing)
        return scores.argmax(1), scores

    # -- segmentation ----------------------------------------------------------------------------
    def __call__(
        self,
        images: Any,
        class_names: Sequence[str] | str | None = None,
        output_size: int | None = None,
        num_samples: int | None = None,
        sampler: str | None = None,
        num_inference_steps: int | None = None,
        resample: int | None = None,
        jump_length: int | None = None,
        eta: float | None = None,
        calibration: float | None = None,
        smoothing: float | None = None,
        guide_noise: str | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> SegmentationOutput:
        """Segment images into ``class_names`` (any names; default: the checkpoint's classes).

        Args:
            images: uint8 ``(H, W, 3)`` array(s); resized to the model's resolution internally.
            class_names: names embedded on the fly (text encoder + stored projection); names the
                model was trained on are "seen" and receive the calibration margin.
            output_size: label side (default: the input size; non-square inputs keep their aspect).
            num_samples: guided samples averaged per image.
            sampler / num_inference_steps / eta: ``"ddim"`` (``eta`` = stochasticity) or ``"ddpm"``.
            resample / jump_length: RS(N) RePaint resampling (see :func:`sampling_plan`).
            calibration: calibrated-stacking margin γ (default: the checkpoint's; 0 disables).
            smoothing: Gaussian sigma (output pixels) applied to the score maps (0 = off).
            guide_noise: ``"matched"`` (the original: the guide noised to each step's level) or
                ``"clean"`` (the clean guide at every step; decoupled-noise models only).
            generator: a torch generator for reproducible sampling.
        Returns:
            ``SegmentationOutput`` with ``labels`` indexing ``class_names``, calibrated cosine
            ``scores``, ``uncertainty`` (spread of the samples, when ``num_samples > 1``) and
            ``extras["embeddings"]`` (the mean generated embedding at model resolution).
        """
        c = self.config
        sampler = sampler or c.sampler
        steps = int(num_inference_steps if num_inference_steps is not None else c.num_inference_steps)
        samples = int(num_samples if num_samples is not None else c.num_samples)
        rs = int(resample if resample is not None else c.resample)
        jump = int(jump_length if jump_length is not None else c.jump_length)
        gamma = float(calibration if calibration is not None else c.calibration)
        sigma = float(smoothing if smoothing is not None else c.smoothing)
        noise = guide_noise or c.guide_noise
        # 1. check inputs
        imgs, names = self.check_inputs(images, class_names, sampler, steps, samples, rs, jump, sigma, noise)
        hw = _output_hw(imgs, output_size)
        # 2. guided sampling (or one regression pass): per-pixel embeddings at model resolution
        emb, spread = self.embed(
            imgs,
            samples,
            sampler,
            steps,
            rs,
            jump,
            float(eta if eta is not None else c.eta),
            generator,
            progress,
            noise,
        )
        # 3. semantic classifier: cosine to all class codes, calibrated stacking, optional smoothing
        labels, scores = self.classify(emb, names, hw, gamma, sigma)
        uncertainty = None
        if spread is not None:
            uncertainty = F.interpolate(spread[:, None], size=hw, mode="bilinear", align_corners=False)[:, 0]
            uncertainty = uncertainty.cpu().numpy().astype(np.float32)
        return SegmentationOutput(
            labels=labels.cpu().numpy().astype(np.int64),
            scores=scores.cpu().numpy().astype(np.float32),
            uncertainty=uncertainty,
            class_names=names,
            extras={
                "embeddings": emb.cpu().numpy(),
                "calibration": gamma,
                "seen": [n for n, s in zip(names, self.seen_mask(names).tolist(), strict=True) if s],
            },
        )

    # -- generation (data augmentation) ------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        num_images: int,
        guide_images: Sequence[np.ndarray] | None = None,
        rho: float = 0.0,
        class_names: Sequence[str] | None = None,
        output_size: int | None = None,
        sampler: str | None = None,
        num_inference_steps: int | None = None,
        eta: float | None = None,
        calibration: float | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> GeneratedPairs:
        """Sample new (image, label map) pairs, guided by ``guide_images`` with strength ``rho``.

        ``rho`` is the fraction of the reverse steps, counted from ``t = T`` down, whose visual
        channels are replaced by the forward-noised guide: 0 = unconditional generation, 0.4 = the
        guide fixes the layout over the noisiest 40 % of the trajectory and the model invents the
        rest, 1 = the guide image itself with its predicted segmentation. Guided steps always use
        matched noise levels (the original's guidance), so the free steps continue a consistent
        trajectory. Labels come from the same calibrated classifier as segmentation (default
        classes: the checkpoint's).
        """
        if self.config.model_type != "ddpm":
            raise ValueError("generate needs a ZS3D DDPM checkpoint; the regression baseline cannot sample")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        c = self.config
        names = parse_classes(class_names) or list(c.classes)
        steps = int(num_inference_steps if num_inference_steps is not None else c.num_inference_steps)
        sampler = sampler or c.sampler
        timesteps = inference_timesteps(self.scheduler, steps)
        until = guidance_threshold(timesteps, rho)
        guides = None
        if until is not None:
            if not guide_images:
                raise ValueError(f"rho={rho} > 0 needs guide_images (or use rho=0 for unconditional samples)")
            imgs = check_images(guide_images)
            if len(imgs) != num_images:
                raise ValueError(f"{len(imgs)} guide images for num_images={num_images}: give one per image")
            guides = images_to_tensor(imgs, c.image_size).to(self.device)
        size = c.image_size
        plan = sampling_plan(timesteps)
        shape = (num_images, 3 + c.semantic_channels, size, size)
        x = guided_sample(
            self.unet,
            self.scheduler.alphas_cumprod,
            plan,
            shape,
            guides,
            until,
            sampler,
            float(eta if eta is not None else c.eta),
            generator,
            self.device,
            progress,
            guide_noise="matched",
            image_timestep=self.image_timestep,
            prediction_type=self.scheduler.config.prediction_type,
        )
        out = int(output_size or size)
        images = F.interpolate(x[:, :3].float(), size=(out, out), mode="bilinear", align_corners=False)
        gamma = float(calibration if calibration is not None else c.calibration)
        labels, _ = self.classify(x[:, 3:], names, (out, out), gamma, c.smoothing)
        return GeneratedPairs(
            images=tensor_to_images(images),
            labels=labels.cpu().numpy().astype(np.int64),
            class_names=names,
            embeddings=x[:, 3:].float().cpu().numpy(),
        )


# -------------------------------------------------------------------------------------- evaluation
def evaluate_zs3d(
    pipe: ZS3DPipeline,
    data_dir: str | os.PathLike,
    split: str = "val",
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    json_out: str | os.PathLike | None = None,
    progress: bool = True,
    method: str = "zs3d",
    **call_kwargs: Any,
) -> dict[str, Any]:
    """Score ``pipe`` on a dataset split with the shared runner (seen/unseen/hIoU from meta.json).

    The same protocol as ``diffuseg evaluate --method zs3d`` (dataset class names, labels at the
    label size), plus sampling overrides (``call_kwargs``: ``resample``, ``calibration``, ...) and a
    seeded generator, for benchmarks and the model card.
    """
    import itertools

    from diffuseg.eval.runner import evaluate_method, load_meta, load_split_samples

    meta = load_meta(data_dir)
    pipe.check_dataset_meta(meta)
    names = list(meta["classes"])
    samples = load_split_samples(data_dir, split)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        samples = itertools.islice(samples, limit)
    gen = torch.Generator().manual_seed(seed)

    def predict(images: list[np.ndarray]) -> np.ndarray:
        return pipe(images, class_names=names, generator=gen, **call_kwargs).labels

    settings = {**asdict(pipe.config), **call_kwargs}
    settings.pop("training", None)
    return evaluate_method(
        predict,
        samples,
        num_classes=len(names),
        class_names=names,
        unseen=meta.get("unseen"),
        progress=progress,
        batch_size=batch_size,
        method=method,
        dataset=str(meta.get("name", Path(data_dir).name)),
        split=split,
        ignore_index=int(meta.get("ignore_index", IGNORE_INDEX)),
        coarse_groups=meta.get("coarse_groups"),
        protocol={"method_config": settings, "seed": seed, "model_unseen": pipe.config.unseen},
        json_out=json_out,
    )


# ------------------------------------------------------------------------------------ augmentation
def augment_dataset(
    pipe: ZS3DPipeline,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    rho: float,
    num: int,
    split: str = "train",
    seed: int = 0,
    batch_size: int = 16,
    num_inference_steps: int | None = None,
    progress: bool = True,
) -> Path:
    """Write ``num`` generated image + mask pairs as ``out_dir/{img_dir,ann_dir}/<split>/``.

    Guides are the images of ``data_dir``'s ``split`` in a seeded random order (cycled when
    ``num`` exceeds them); ``rho = 0`` ignores them (unconditional). Batch ``b`` is seeded by
    ``(seed, b)`` and files that already exist are kept, so an interrupted run resumes and
    produces the same files. Every file is written atomically; ``meta.json`` (the source's, with
    an ``augmentation`` record) and ``augment.jsonl`` (one line per pair: id, guide, rho, seed) are
    written last.
    """
    from diffuseg.eval.runner import load_meta
    from diffuseg.io import read_image, write_image, write_json, write_label

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if out_dir.resolve() == data_dir.resolve():
        raise ValueError("out_dir must differ from data_dir: augmentation never writes into its source")
    if num < 1 or batch_size < 1:
        raise ValueError(f"num and batch_size must be >= 1, got {num} and {batch_size}")
    meta = load_meta(data_dir)
    files = sorted((data_dir / "img_dir" / split).glob("*.png")) + sorted(
        (data_dir / "img_dir" / split).glob("*.jpg")
    )
    if not files:
        raise FileNotFoundError(f"{data_dir / 'img_dir' / split}: no guide images")
    order = np.random.default_rng(seed).permutation(len(files))
    size = read_image(files[0]).shape[0]
    tag = f"zs3d_r{int(round(rho * 100)):03d}_s{seed}"
    records = []
    bar = tqdm(total=num, desc=f"augment rho={rho}", disable=not progress)
    for b, start in enumerate(range(0, num, batch_size)):
        idx = list(range(start, min(num, start + batch_size)))
        ids = [f"{tag}_{i:06d}" for i in idx]
        guides = [files[order[i % len(files)]] for i in idx]
        records += [
            {"id": i, "guide": g.stem if rho > 0 else None, "rho": rho, "seed": seed}
            for i, g in zip(ids, guides, strict=True)
        ]
        img_paths = [out_dir / "img_dir" / split / f"{i}.png" for i in ids]
        lab_paths = [out_dir / "ann_dir" / split / f"{i}.png" for i in ids]
        if all(p.is_file() for p in img_paths + lab_paths):
            bar.update(len(idx))
            continue
        gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, b]).integers(2**62)))
        pairs = pipe.generate(
            len(idx),
            guide_images=[read_image(g) for g in guides] if rho > 0 else None,
            rho=rho,
            class_names=meta["classes"],
            output_size=size,
            num_inference_steps=num_inference_steps,
            generator=gen,
        )
        for k in range(len(idx)):
            write_image(img_paths[k], pairs.images[k])
            write_label(lab_paths[k], pairs.labels[k])
        bar.update(len(idx))
    bar.close()
    from diffuseg.io import atomic_write

    with atomic_write(out_dir / "augment.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    out_meta = {k: v for k, v in meta.items() if k != "generator"}
    out_meta["augmentation"] = {
        "method": "zs3d",
        "source": str(data_dir),
        "split": split,
        "rho": rho,
        "num": num,
        "seed": seed,
        "num_inference_steps": num_inference_steps or pipe.config.num_inference_steps,
        "sampler": pipe.config.sampler,
        "calibration": pipe.config.calibration,
        "rho_definition": "fraction of reverse steps, from t=T down, whose visual channels are the "
        "forward-noised guide image (0 = unconditional)",
    }
    write_json(out_dir / "meta.json", out_meta)
    return out_dir
