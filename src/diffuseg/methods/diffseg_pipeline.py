"""``DiffSegPipeline``: unsupervised segmentation from a latent diffusion model's self-attention.

image → latent (VAE posterior mean, no noise) → one UNet pass at ``timestep`` with the empty
prompt → head- and layer-averaged self-attention per resolution → DiffSeg post-processing
(:func:`~diffuseg.methods.diffseg.segment_attention`). Optionally a second pass with a prompt
naming the classes turns segments into a semantic map by cross-attention (beyond the
original's BLIP-noun step), and K-means on the same aggregated attention gives the paper's
K-means-C / K-means-S baselines through the same code.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffuseg.methods.base import check_images, parse_classes
from diffuseg.outputs import SegmentationOutput
from diffuseg.utils import dataclass_from_dict

logger = logging.getLogger(__name__)

__all__ = [
    "DiffSegConfig",
    "DiffSegPipeline",
    "class_cross_maps",
    "class_prompt",
    "class_prompts",
    "label_segments_by_class_maps",
    "label_segments_by_cross_attention",
]

SD_DEFAULTS: dict[str, Any] = {
    "kl_threshold": [1.1, 1.1, 1.1],
    "threshold_mode": "absolute",
    "num_points": 16,
    "timestep": 300,
    "output_size": 512,
    "refine": False,
}
"""The original's COCO-Stuff-27 settings for Stable Diffusion 1.x (512-px inputs, 64² maps)."""


@dataclass
class DiffSegConfig:
    """DiffSeg settings; a backbone's ``method_defaults["diffseg"]`` overrides the SD defaults."""

    kl_threshold: Sequence[float] = (1.1, 1.1, 1.1)
    threshold_mode: str = "absolute"
    num_points: int = 16
    timestep: int = 300
    output_size: int | None = 512
    refine: bool = False
    fidelity: str = "fast"

    @classmethod
    def for_backbone(cls, backbone, **overrides: Any) -> DiffSegConfig:
        values = dict(SD_DEFAULTS)
        values.update(backbone.config.method_defaults.get("diffseg", {}))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return dataclass_from_dict(cls, values, "DiffSeg")


def class_prompt(class_names: Sequence[str]) -> str:
    """One prompt naming every class, e.g. ``"a sandal, a bag and a background"``."""
    items = [f"a {c}" for c in class_names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _token_positions(tokens: list[str], class_names: Sequence[str], tokenize) -> list[list[int]]:
    """Sequence positions of each class name's word pieces inside the prompt's tokens."""
    positions: list[list[int]] = []
    start = 0
    for name in class_names:
        pieces = [t for t in tokenize([name])[0] if t not in _SPECIAL and not t.startswith("<|")]
        found: list[int] = []
        for i in range(start, len(tokens) - len(pieces) + 1):
            if tokens[i : i + len(pieces)] == pieces:
                found = list(range(i, i + len(pieces)))
                start = i + len(pieces)
                break
        if not found:
            raise ValueError(f"class name {name!r} was cut from the prompt (too long for the text encoder)")
        positions.append(found)
    return positions


_SPECIAL = {"[CLS]", "[SEP]", "[PAD]", "<|startoftext|>", "<|endoftext|>"}


def class_prompts(class_names: Sequence[str], tokenize) -> list[tuple[str, list[list[int]]]]:
    """The fewest prompts that name every class in order, with each name's token positions.

    Why several: one prompt listing every name is the natural reading, but it overflows the text
    encoder (CLIP's 77 tokens hold about 20 names, the mini-SD's 24 about 6). Rather than failing,
    names are packed greedily into consecutive prompts, one cross-attention pass each. Names in
    different prompts do not compete in one softmax over tokens; the per-class normalisation of
    :func:`label_segments_by_class_maps` keeps their maps comparable.
    """

    def fit(names: list[str]) -> tuple[str, list[list[int]]] | None:
        prompt = class_prompt(names)
        try:
            return prompt, _token_positions(tokenize([prompt])[0], names, tokenize)
        except ValueError:  # a name was cut off
            return None

    prompts: list[tuple[str, list[list[int]]]] = []
    current: list[str] = []
    for name in class_names:
        if fit([*current, name]) is not None:
            current.append(name)
            continue
        if fit([name]) is None:
            raise ValueError(
                f"class name {name!r} does not fit in one prompt of the text encoder: shorten it"
            )
        prompts.append(fit(current))  # type: ignore[arg-type]
        current = [name]
    if current:
        prompts.append(fit(current))  # type: ignore[arg-type]
    return prompts


def class_cross_maps(
    cross_maps: dict[int, torch.Tensor], positions: list[list[int]], size: tuple[int, int]
) -> torch.Tensor:
    """Per-class cross-attention ``(B, C, H, W)``: token maps averaged over each name's word pieces
    and over resolutions (upsampled to ``size``, weighted by side like DiffSeg)."""
    total = sum(cross_maps)
    b = next(iter(cross_maps.values())).shape[0]
    per_class = torch.zeros(b, len(positions), *size)
    for side, a in cross_maps.items():
        a = a.float().cpu().view(b, side, side, -1)
        cls_maps = torch.stack([a[..., p].mean(-1) for p in positions], dim=1)
        per_class += (side / total) * F.interpolate(cls_maps, size=size, mode="bilinear", align_corners=False)
    return per_class


def label_segments_by_class_maps(
    segments: np.ndarray, per_class: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Name each segment by the class whose map is highest on average inside it.

    Each class map is first normalised to max 1 per image, so that a token that attends
    everywhere does not win everywhere. Returns ``(labels (B, H, W), scores (B, C, H, W))``.
    """
    per_class = per_class / per_class.flatten(2).amax(-1).clamp_min(1e-12)[..., None, None]
    labels = np.zeros_like(segments)
    for i in range(segments.shape[0]):
        seg = torch.from_numpy(segments[i])
        ids = torch.unique(seg)
        onehot = (seg[None] == ids[:, None, None]).float()  # (S, H, W)
        mean = torch.einsum("shw,chw->sc", onehot, per_class[i]) / onehot.sum((1, 2))[:, None]
        best = mean.argmax(1)
        labels[i] = best[torch.searchsorted(ids, seg)].numpy()
    return labels, per_class.numpy()


def label_segments_by_cross_attention(
    segments: np.ndarray, cross_maps: dict[int, torch.Tensor], positions: list[list[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Name each segment by the class whose tokens attend to it most (one prompt's cross-attention).

    ``cross_maps``: ``{side: (B, side², L)}``; ``positions``: each class's token positions.
    Returns ``(labels (B, H, W), scores (B, C, H, W))``.
    """
    return label_segments_by_class_maps(segments, class_cross_maps(cross_maps, positions, segments.shape[1:]))


class DiffSegPipeline:
    """DiffSeg on a :class:`~diffuseg.backbones.latent.LatentDiffusionBackbone`.

    Example::

        pipe = DiffSegPipeline.from_pretrained()          # shipped mini-SD
        out = pipe(image)                                  # out.labels: segment ids
        out = pipe(image, class_names=["background", "bag", "sandal"])   # semantic map
    """

    def __init__(self, backbone, config: DiffSegConfig | None = None) -> None:
        self.backbone = backbone
        self.config = config or DiffSegConfig.for_backbone(backbone)

    @classmethod
    def from_pretrained(cls, backbone: str | None = None, **overrides: Any) -> DiffSegPipeline:
        """Load a backbone (folder, hub id, or ``None`` for the shipped mini-SD) with its DiffSeg defaults."""
        from diffuseg.backbones.latent import LatentDiffusionBackbone

        bb = LatentDiffusionBackbone.from_pretrained(backbone)
        return cls(bb, DiffSegConfig.for_backbone(bb, **overrides))

    def to(self, device: str | torch.device) -> DiffSegPipeline:
        self.backbone.to(device)
        return self

    def check_inputs(
        self, images: Any, class_names: Any, kl_threshold: Sequence[float], num_points: int, timestep: int
    ) -> tuple[list[np.ndarray], list[str] | None, list[float]]:
        """Validate a call's inputs; every error says what to pass instead."""
        imgs = check_images(images)
        names = parse_classes(class_names)
        n_train = int(self.backbone.scheduler.config.num_train_timesteps)
        if not 0 <= int(timestep) < n_train:
            raise ValueError(f"timestep must be in [0, {n_train}), got {timestep}")
        if isinstance(kl_threshold, (int, float, str)) or not len(kl_threshold):
            raise ValueError(
                "kl_threshold is a list (one value per merging iteration, e.g. [1.1, 1.1, 1.1]), "
                f"got {kl_threshold!r}"
            )
        if num_points < 2:
            raise ValueError(f"num_points must be ≥ 2, got {num_points}")
        return imgs, names, [float(v) for v in kl_threshold]

    @torch.no_grad()
    def attention(
        self, images: list[np.ndarray], timestep: int, prompt: str = "", cross: bool = False
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Head- and layer-averaged self- (and cross-) attention per resolution for a batch."""
        from diffuseg.backbones.attention import capture_attention

        latents = self.backbone.encode_image(images)
        text = self.backbone.encode_text([prompt] * len(images))
        with capture_attention(self.backbone.unet, self_attention=True, cross_attention=cross) as store:
            self.backbone.unet_forward(latents, timestep, text)
        return store.by_resolution("attn1"), (store.by_resolution("attn2") if cross else {})

    def __call__(
        self,
        images: Any,
        class_names: Sequence[str] | str | None = None,
        kl_threshold: Sequence[float] | None = None,
        threshold_mode: str | None = None,
        num_points: int | None = None,
        timestep: int | None = None,
        output_size: int | None = None,
        refine: bool | None = None,
        num_clusters: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> SegmentationOutput:
        """Segment images.

        Args:
            images: uint8 ``(H, W, 3)`` array(s).
            class_names: optional names; when given, segments are named by cross-attention and
                ``labels`` index ``class_names``.
            kl_threshold / threshold_mode / num_points / timestep / output_size / refine:
                override the configured DiffSeg settings for this call.
            num_clusters: replace the KL merging by K-means on the same aggregated attention
                (an int: K-means-C; one int per image: K-means-S).
            generator: seeds K-means (the UNet pass itself is deterministic).
        """
        from diffuseg.methods.diffseg import aggregate_attention, kmeans_attention, segment_attention

        c = self.config
        kl = kl_threshold if kl_threshold is not None else c.kl_threshold
        mode = threshold_mode or c.threshold_mode
        t = int(timestep if timestep is not None else c.timestep)
        points = int(num_points if num_points is not None else c.num_points)
        # 1. check inputs
        imgs, names, kl = self.check_inputs(images, class_names, kl, points, t)
        # 2. one UNet pass with the empty prompt: self-attention maps
        self_maps, _ = self.attention(imgs, t)
        top = max(self_maps)
        out_size = output_size or c.output_size or top
        maps = {s: m[:, None] for s, m in self_maps.items()}  # (B, 1 head, Q, K): heads already averaged
        # 3. group queries: DiffSeg's KL merging, or K-means on the same aggregated attention
        if num_clusters is not None:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) if generator is not None else 0
            segments = kmeans_attention(aggregate_attention(maps), num_clusters, seed, output_size=out_size)
        else:
            segments = segment_attention(
                maps,
                kl_threshold=kl,
                num_points=min(points, top),
                refine=c.refine if refine is None else refine,
                fidelity=c.fidelity,
                output_size=out_size,
                threshold_mode=mode,
            )
        segments = _compact_ids(np.asarray(segments))
        if names is None:
            return SegmentationOutput(labels=segments, extras={"num_segments": _count(segments)})
        # 4. name the segments by the cross-attention of the class tokens (one more pass per prompt)
        per_class = []
        for prompt, positions in class_prompts(names, self.backbone.tokenize):
            _, cross = self.attention(imgs, t, prompt=prompt, cross=True)
            per_class.append(class_cross_maps(cross, positions, segments.shape[1:]))
        labels, scores = label_segments_by_class_maps(segments, torch.cat(per_class, dim=1))
        return SegmentationOutput(
            labels=labels,
            scores=scores,
            class_names=names,
            extras={"segments": segments, "num_segments": _count(segments)},
        )


def _compact_ids(seg: np.ndarray) -> np.ndarray:
    """Renumber each image's segment ids to 0..M-1 (the post-processing may skip ids)."""
    out = np.empty_like(seg)
    for i, s in enumerate(seg):
        _, inv = np.unique(s, return_inverse=True)
        out[i] = inv.reshape(s.shape)
    return out


def _count(seg: np.ndarray) -> list[int]:
    return [int(s.max()) + 1 for s in seg]
