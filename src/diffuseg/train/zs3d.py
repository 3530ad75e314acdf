"""Training ZS3D (a DDPM over [image ; semantic] stacks) and its SPNet-like regression baseline.

Both are :class:`~diffuseg.train.loop.TrainTask` s of the one shared loop. A run folder holds
every stage of the zero-shot recipe, each resumable and time-boxed::

    RUN/                      stage "main": the model, trained on seen classes only
      checkpoints/  log.jsonl  final/        <- the finished checkpoint (README.md model card)
    RUN/calibration/          stage "calibration": the same recipe, also without pseudo-unseen classes
    RUN/calibration.json      stage "calibrate": the margin γ chosen on held-out seen-only images
    RUN/cache/                the training split resized to the model resolution (npz)

:func:`train_zs3d` runs the stages in order and stops cleanly when its time box is spent; calling it
again continues where it stopped. Data protocol (ZS3Net): training images that contain an unseen
class are left out (``unseen_policy: exclude_images``) or keep their pixels with the unseen pixels
set to ignore (``ignore_pixels``); labels are resized with NEAREST, images to [-1, 1].
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from diffuseg.methods.zs3d import (
    IGNORE_INDEX,
    SemanticProjection,
    ZS3DConfig,
    ZS3DPipeline,
    build_scheduler,
    build_unet,
    pseudo_unseen_classes,
    sweep_margin,
)

logger = logging.getLogger(__name__)

__all__ = [
    "RegressionTask",
    "SplitArrays",
    "StackDataset",
    "ZS3DRunResult",
    "ZS3DTask",
    "calibrate_margin",
    "fit_projection",
    "load_split_arrays",
    "select_training_images",
    "train_zs3d",
    "write_model_card",
]

STAGES = ("all", "main", "calibration", "calibrate", "card")
UNSEEN_POLICIES = ("exclude_images", "ignore_pixels")
CALIBRATION_DIR = "calibration"
CALIBRATION_FILE = "calibration.json"


# -------------------------------------------------------------------------------------------- data
@dataclass
class SplitArrays:
    """A dataset split at model resolution, held in memory (20k scenes at 32 px: 82 MB)."""

    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N, S, S) uint8, 255 = ignore
    ids: list[str]

    def subset(self, index: Sequence[int] | np.ndarray) -> SplitArrays:
        index = np.asarray(index, dtype=np.int64)
        return SplitArrays(self.images[index], self.labels[index], [self.ids[i] for i in index])


def _resize_pair(image: np.ndarray, label: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image: PIL bilinear (antialiased). Label: NEAREST, never blending class ids (the original's bug)."""
    from PIL import Image

    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    if label.shape != (size, size):
        label = np.asarray(Image.fromarray(label.astype(np.uint8)).resize((size, size), Image.NEAREST))
    return image, label.astype(np.uint8)


def load_split_arrays(
    data_dir: str | Path,
    split: str,
    size: int,
    cache_dir: str | Path | None = None,
    limit: int | None = None,
    progress: bool = False,
) -> SplitArrays:
    """Read a split's images and labels resized to ``size`` (cached as ``cache_dir/<split>_<size>.npz``).

    Label ids above 255 cannot occur in uint8 storage; ids >= the class count are left for the
    caller to validate against its class list.
    """
    from diffuseg.eval.runner import load_split_samples

    cache = Path(cache_dir) / f"{split}_{size}.npz" if cache_dir is not None else None
    if cache is not None and cache.is_file() and limit is None:
        with np.load(cache) as z:
            return SplitArrays(z["images"], z["labels"], [str(i) for i in z["ids"]])
    images, labels, ids = [], [], []
    samples = load_split_samples(data_dir, split)
    for n, s in enumerate(tqdm(samples, desc=f"reading {split}", disable=not progress, leave=False)):
        if limit is not None and n >= limit:
            break
        if s["label"].max() > 255:
            raise ValueError(f"{s['id']}: label ids above 255 are not supported by ZS3D training")
        im, lab = _resize_pair(s["image"], s["label"], size)
        images.append(im)
        labels.append(lab)
        ids.append(str(s["id"]))
    arrays = SplitArrays(np.stack(images), np.stack(labels), ids)
    if cache is not None and limit is None:
        from diffuseg.io import atomic_write

        with atomic_write(cache) as f:
            np.savez(f, images=arrays.images, labels=arrays.labels, ids=np.array(ids))
    return arrays


def select_training_images(
    arrays: SplitArrays, class_names: Sequence[str], exclude: Sequence[str], policy: str
) -> tuple[SplitArrays, dict[str, Any]]:
    """Apply the zero-shot protocol: no pixel of an ``exclude`` class is ever trained on.

    ``exclude_images`` drops every image containing such a class (ZS3Net's default);
    ``ignore_pixels`` keeps the images and sets those pixels to ignore (the network still sees
    them in the image channels, so this is the weaker protocol). Returns the arrays and a record.
    """
    if policy not in UNSEEN_POLICIES:
        raise ValueError(f"unseen_policy must be one of {UNSEEN_POLICIES}, got {policy!r}")
    unknown = [c for c in exclude if c not in class_names]
    if unknown:
        raise ValueError(
            f"classes to exclude {unknown} are not among the dataset classes {list(class_names)}"
        )
    n_cls = len(class_names)
    bad = arrays.labels[(arrays.labels != IGNORE_INDEX) & (arrays.labels >= n_cls)]
    if bad.size:
        raise ValueError(f"label ids {sorted(set(bad.tolist()))[:10]} exceed the {n_cls} dataset classes")
    ids = np.array([class_names.index(c) for c in exclude], dtype=np.uint8)
    hit = np.isin(arrays.labels, ids) if len(ids) else np.zeros(arrays.labels.shape, bool)
    has = hit.reshape(len(arrays.ids), -1).any(1)
    if policy == "exclude_images":
        out = arrays.subset(np.flatnonzero(~has))
    else:
        labels = arrays.labels.copy()
        labels[hit] = IGNORE_INDEX
        out = SplitArrays(arrays.images, labels, arrays.ids)
    if not len(out.ids):
        raise ValueError(f"no training image is left after excluding {list(exclude)} ({policy})")
    record = {
        "excluded_classes": list(exclude),
        "unseen_policy": policy,
        "images_available": len(arrays.ids),
        "images_with_excluded_classes": int(has.sum()),
        "images_used": len(out.ids),
        "ids_sha256": hashlib.sha256("\n".join(out.ids).encode()).hexdigest()[:16],
    }
    return out, record


class StackDataset(Dataset):
    """Serves ``{"image": (3, S, S) float in [-1, 1], "label": (S, S) int64}`` from :class:`SplitArrays`."""

    def __init__(self, arrays: SplitArrays) -> None:
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        image = torch.from_numpy(np.ascontiguousarray(self.arrays.images[i])).permute(2, 0, 1).float()
        label = torch.from_numpy(self.arrays.labels[i].astype(np.int64))
        return {"image": image / 127.5 - 1.0, "label": label}


def fit_projection(
    class_names: Sequence[str], num_channels: int, text_encoder: str = "minilm", templates=None
) -> tuple[SemanticProjection, Tensor]:
    """Fit the name-embedding projection on all class names; returns it and the ``(C, k)`` codes."""
    from diffuseg.text import get_text_encoder

    enc = get_text_encoder(text_encoder)
    emb = enc.encode_classes(list(class_names), templates=templates).cpu()
    proj = SemanticProjection.fit(emb, class_names, num_channels, text_encoder, templates)
    with torch.no_grad():
        return proj, proj(emb).float()


def _hflip(image: Tensor, label: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random horizontal flips drawn from the loop's generator (resume stays exact)."""
    flip = (torch.rand(image.shape[0], generator=generator) < 0.5).to(image.device)
    image = torch.where(flip.view(-1, 1, 1, 1), image.flip(-1), image)
    label = torch.where(flip.view(-1, 1, 1), label.flip(-1), label)
    return image, label


# ------------------------------------------------------------------------------------------- tasks
class _SemanticTargets:
    """Maps label maps to code maps; ignore pixels get a zero code and a zero loss mask."""

    def __init__(self, codes: Tensor) -> None:
        self.table = torch.cat([codes.float(), torch.zeros(1, codes.shape[1])])  # last row: ignore
        self.num_classes = codes.shape[0]

    def __call__(self, label: Tensor) -> tuple[Tensor, Tensor]:
        valid = (label >= 0) & (label < self.num_classes)
        idx = torch.where(valid, label, torch.full_like(label, self.num_classes))
        sem = self.table.to(label.device)[idx].permute(0, 3, 1, 2)
        return sem, valid[:, None].float()


class _ZS3DTaskBase:
    """What the DDPM and the regression tasks share: data, targets, evaluation and export."""

    def __init__(
        self,
        pipeline: ZS3DPipeline,
        arrays: SplitArrays,
        codes: Tensor,
        val: SplitArrays | None = None,
        eval_settings: dict[str, Any] | None = None,
        hflip: bool = True,
    ) -> None:
        self.pipeline = pipeline
        self.arrays = arrays
        self.targets = _SemanticTargets(codes)
        self.val = val
        self.eval_settings = dict(eval_settings or {})
        self.hflip = hflip

    def model(self) -> nn.Module:
        return self.pipeline.unet.train()

    def train_dataset(self) -> Dataset:
        return StackDataset(self.arrays)

    def _batch(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        image, label = batch["image"], batch["label"]
        if self.hflip:
            image, label = _hflip(image, label, generator)
        sem, valid = self.targets(label)
        return image, sem.to(image), valid.to(image)

    def _with_model(self, model: nn.Module) -> ZS3DPipeline:
        p = self.pipeline
        return ZS3DPipeline(model, p.scheduler, p.projection, p.config, text_encoder=p._text_encoder)

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Quick zero-shot check on a few val images (γ = 0, cheap sampler settings)."""
        if self.val is None or not len(self.val.ids):
            return {}
        was = model.training
        try:
            metrics = quick_metrics(self._with_model(model), self.val, **self.eval_settings)
        finally:
            model.train(was)
        return {f"val_{k}": v for k, v in metrics.items() if v is not None}

    def save_pretrained(self, model: nn.Module, out_dir: Path) -> None:
        was = model.training
        try:
            self._with_model(model).save_pretrained(out_dir)
        finally:
            model.train(was)


class ZS3DTask(_ZS3DTaskBase):
    """DDPM ε- (or v-) prediction on [image ; semantic] stacks, semantic loss masked at ignore pixels.

    Loss = MSE over the image channels + ``semantic_weight`` × masked MSE over the semantic channels
    (each a mean over its own channels, so the two groups weigh equally whatever ``k`` is), each
    times the min-SNR-γ weight of its noise level.

    With a decoupled-noise UNet (``image_timestep``) the image channels get their own noise level,
    drawn per sample from ``image_noise`` = ``{"matched": p, "clean": q, "uniform": r}``: the same
    level as the semantic channels (the original joint diffusion, which unconditional generation and
    matched guidance need), level 0 (the clean image: what clean guidance feeds), or an independent
    uniform level. The image term is dropped for clean samples, whose target carries no information.

    ``semantic_snr_floor`` keeps the semantic term's x0 weight at least that value where min-SNR-γ
    would make it vanish (high noise), so the model also learns to read classes from the image alone.
    """

    def __init__(
        self,
        *args: Any,
        semantic_weight: float = 1.0,
        snr_gamma: float | None = 5.0,
        image_noise: dict[str, float] | None = None,
        semantic_snr_floor: float = 0.0,
        **kw: Any,
    ):
        super().__init__(*args, **kw)
        self.semantic_weight, self.snr_gamma = float(semantic_weight), snr_gamma
        self.semantic_snr_floor = float(semantic_snr_floor)
        self.decoupled = getattr(self.pipeline.unet.config, "class_embed_type", None) == "timestep"
        mix = {"matched": 0.5, "clean": 0.25, "uniform": 0.25, **(image_noise or {})}
        unknown = sorted(set(mix) - {"matched", "clean", "uniform"})
        total = sum(float(v) for v in mix.values())
        if unknown or total <= 0 or min(float(v) for v in mix.values()) < 0:
            raise ValueError(f"loss.image_noise must map matched/clean/uniform to weights >= 0, got {mix}")
        self.mix = [float(mix[k]) / total for k in ("matched", "clean", "uniform")]

    def _image_levels(self, t: Tensor, generator: torch.Generator) -> Tensor:
        """Per-sample noise level of the image channels (``t`` itself unless decoupled)."""
        if not self.decoupled:
            return t
        u = torch.rand(t.shape[0], generator=generator)
        other = torch.randint(
            0, self.pipeline.scheduler.config.num_train_timesteps, t.shape, generator=generator
        )
        p_matched, p_clean = self.mix[0], self.mix[0] + self.mix[1]
        return torch.where(u < p_matched, t, torch.where(u < p_clean, torch.zeros_like(t), other))

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[Tensor, dict]:
        from diffuseg.train.latent_diffusion import min_snr_weights

        sched = self.pipeline.scheduler
        image, sem, valid = self._batch(batch, generator)
        noise = torch.randn((image.shape[0], 3 + sem.shape[1], *image.shape[2:]), generator=generator)
        noise = noise.to(image)
        t = torch.randint(0, sched.config.num_train_timesteps, (image.shape[0],), generator=generator)
        t_img = self._image_levels(t, generator)
        t, t_img = t.to(image.device), t_img.to(image.device)
        x_t = torch.cat(
            [sched.add_noise(image, noise[:, :3], t_img), sched.add_noise(sem, noise[:, 3:], t)], 1
        )
        out = model(x_t, t, class_labels=t_img) if self.decoupled else model(x_t, t)
        target = noise
        if sched.config.prediction_type == "v_prediction":
            target = torch.cat(
                [sched.get_velocity(image, noise[:, :3], t_img), sched.get_velocity(sem, noise[:, 3:], t)], 1
            )
        err = (out.sample.float() - target.float()) ** 2
        img_mse = err[:, :3].mean((1, 2, 3))
        k = sem.shape[1]
        sem_mse = (err[:, 3:] * valid).sum((1, 2, 3)) / (valid.sum((1, 2, 3)) * k).clamp_min(1)
        w_img = min_snr_weights(sched, t_img, self.snr_gamma).to(img_mse) * (t_img > 0).to(img_mse)
        w_sem = min_snr_weights(sched, t, self.snr_gamma, self.semantic_snr_floor).to(sem_mse)
        loss = (w_img * img_mse + self.semantic_weight * w_sem * sem_mse).mean()
        return loss, {"mse_image": img_mse.mean().item(), "mse_semantic": sem_mse.mean().item()}


class RegressionTask(_ZS3DTaskBase):
    """The SPNet-like baseline: the same UNet maps the clean image to the code map in one pass.

    Masked MSE to the class code: the deterministic counterpart of what the DDPM learns (the
    conditional mean instead of the conditional distribution), in the same space, with the same
    classifier at test time.
    """

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[Tensor, dict]:
        image, sem, valid = self._batch(batch, generator)
        t0 = torch.zeros(image.shape[0], dtype=torch.long, device=image.device)
        pred = model(image, t0).sample.float()
        k = sem.shape[1]
        mse = (((pred - sem) ** 2) * valid).sum() / (valid.sum() * k).clamp_min(1)
        return mse, {"mse_semantic": mse.item()}


# ------------------------------------------------------------------------------------ construction
def _model_section(config: dict[str, Any]) -> dict[str, Any]:
    model = dict(config.get("model", {}))
    model.setdefault("type", "ddpm")
    model.setdefault("image_size", 32)
    model.setdefault("semantic_channels", 10)
    model.setdefault("text_encoder", "minilm")
    model.setdefault("templates", None)
    return model


def quick_metrics(pipe: ZS3DPipeline, val: SplitArrays, **settings: Any) -> dict[str, float | None]:
    """Seen / unseen / hIoU of ``pipe`` on ``val`` without calibration (γ = 0), seeded sampling.

    The in-training check and ``scripts/zs3d_probe.py`` both use it, so their numbers compare.
    """
    from diffuseg.eval import ConfusionMatrix

    names = pipe.config.classes
    cm = ConfusionMatrix(len(names), IGNORE_INDEX)
    gen = torch.Generator().manual_seed(0)
    settings = {"calibration": 0.0, **settings}
    with torch.no_grad():
        for start in range(0, len(val.ids), 16):
            out = pipe(list(val.images[start : start + 16]), class_names=names, generator=gen, **settings)
            cm.update(out.labels, val.labels[start : start + 16].astype(np.int64))
    return cm.compute(names, pipe.config.unseen)["metrics"]


def build_pipeline(
    config: dict[str, Any], class_names: Sequence[str], unseen: Sequence[str], training: dict[str, Any]
) -> tuple[ZS3DPipeline, Tensor]:
    """A fresh (randomly initialised) pipeline for ``class_names``, and the codes of those classes."""
    m = _model_section(config)
    k = int(m["semantic_channels"])
    proj, codes = fit_projection(class_names, k, m["text_encoder"], m["templates"])
    size = int(m["image_size"])
    ddpm = m["type"] == "ddpm"
    decoupled = ddpm and bool(m.get("decoupled_noise", False))
    unet = build_unet(
        size, 3 + k if ddpm else 3, 3 + k if ddpm else k, **m.get("unet", {}), image_timestep=decoupled
    )
    scheduler = build_scheduler(**m.get("scheduler", {}))
    defaults = dict(config.get("pipeline", {}))
    if ddpm and not decoupled and defaults.get("guide_noise") == "clean":
        raise ValueError("pipeline.guide_noise=clean needs model.decoupled_noise=true (or use 'matched')")
    cfg = ZS3DConfig(
        classes=list(class_names),
        unseen=list(unseen),
        model_type=m["type"],
        image_size=size,
        semantic_channels=k,
        text_encoder=m["text_encoder"],
        templates=list(m["templates"]) if m["templates"] else None,
        training=training,
        **defaults,
    )
    return ZS3DPipeline(unet, scheduler, proj, cfg), codes


def _loop_config(section: dict[str, Any], out: Path, seed: int, max_minutes: float | None, progress: bool):
    from diffuseg.train.loop import TrainConfig

    values = dict(section)
    values.update(output_dir=str(out), seed=seed, max_minutes=max_minutes, progress=progress)
    return TrainConfig.from_dict(values)


def _make_task(
    config: dict[str, Any],
    data_dir: Path,
    arrays: SplitArrays,
    exclude: Sequence[str],
    record: dict[str, Any],
    val: SplitArrays | None,
) -> _ZS3DTaskBase:
    from diffuseg.eval.runner import load_meta

    meta = load_meta(data_dir)
    training = {"data_dir": str(data_dir), "dataset": meta.get("name"), **record}
    pipe, codes = build_pipeline(config, meta["classes"], exclude, training)
    loss_cfg = dict(config.get("loss", {}))
    common = {
        "val": val,
        "eval_settings": dict(config.get("eval", {}).get("pipeline", {})),
        "hflip": bool(config.get("data", {}).get("hflip", True)),
    }
    if pipe.config.model_type == "ddpm":
        return ZS3DTask(
            pipe,
            arrays,
            codes,
            semantic_weight=float(loss_cfg.get("semantic_weight", 1.0)),
            snr_gamma=loss_cfg.get("snr_gamma", 5.0),
            image_noise=loss_cfg.get("image_noise"),
            semantic_snr_floor=float(loss_cfg.get("semantic_snr_floor") or 0.0),
            **common,
        )
    return RegressionTask(pipe, arrays, codes, **common)


# ------------------------------------------------------------------------------------- calibration
def _holdout_split(arrays: SplitArrays, num_holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (holdout, rest) of a seeded permutation; the holdout never trains the calibration model."""
    if not 0 < num_holdout < len(arrays.ids):
        raise ValueError(f"calibration.num_holdout must be in (0, {len(arrays.ids)}), got {num_holdout}")
    order = np.random.default_rng([seed, 7]).permutation(len(arrays.ids))
    return np.sort(order[:num_holdout]), np.sort(order[num_holdout:])


def calibrate_margin(
    pipe: ZS3DPipeline,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    pseudo_unseen: Sequence[str],
    gammas: Sequence[float],
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
    **call_kwargs: Any,
) -> dict[str, Any]:
    """Choose γ with a model trained without ``pseudo_unseen`` classes, on images it never saw.

    ``pipe`` must have been trained without the real unseen classes *and* ``pseudo_unseen``; the
    images may show pseudo-unseen classes (never real unseen ones). Scores are computed once with
    γ = 0 and the margin is swept over ``gammas`` for the best harmonic mean of pseudo-seen and
    pseudo-unseen mIoU. Returns :func:`~diffuseg.methods.zs3d.sweep_margin`'s record.
    """
    names = list(pipe.config.classes)
    missing = [c for c in pseudo_unseen if c not in pipe.config.unseen]
    if missing:
        raise ValueError(
            f"the calibration model was trained on {missing}: it cannot calibrate them as unseen"
        )
    gen = torch.Generator().manual_seed(seed)
    scores, labs = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="calibrating", disable=not progress):
        out = pipe(
            list(images[start : start + batch_size]),
            class_names=names,
            calibration=0.0,
            generator=gen,
            **call_kwargs,
        )
        scores += [s.astype(np.float16) for s in out.scores]
        labs += [np.asarray(lab) for lab in labels[start : start + batch_size]]
    seen_mask = pipe.seen_mask(names).numpy()
    seen_ids = [i for i, c in enumerate(names) if seen_mask[i] > 0]
    unseen_ids = [names.index(c) for c in pseudo_unseen]
    return sweep_margin(scores, labs, seen_mask, seen_ids, unseen_ids, gammas)


def _gamma_grid(spec: dict[str, Any]) -> list[float]:
    start, stop, num = float(spec.get("start", 0.0)), float(spec.get("stop", 1.0)), int(spec.get("num", 51))
    if num < 1 or stop < start:
        raise ValueError(f"calibration.gammas needs start <= stop and num >= 1, got {spec}")
    return [float(g) for g in np.linspace(start, stop, num)]


# -------------------------------------------------------------------------------------- model card
def _samples_figure(
    pipe: ZS3DPipeline, val: SplitArrays | None, palette: list[list[int]], seed: int
) -> np.ndarray:
    """Unconditional image/mask stacks (DDPM only) above image | GT | prediction rows on val scenes."""
    from diffuseg.viz import colorize, image_grid, side_by_side, upscale_nearest

    rows: list[np.ndarray] = []
    names = pipe.config.classes
    gen = torch.Generator().manual_seed(seed)
    if pipe.config.model_type == "ddpm":
        pairs = pipe.generate(8, rho=0.0, output_size=64, generator=gen)
        tiles = [
            upscale_nearest(t, 2)
            for im, lab in zip(pairs.images, pairs.labels, strict=True)
            for t in (im, colorize(lab, palette))
        ]
        rows.append(image_grid(tiles, nrow=8))
    if val is not None and len(val.ids):
        n = min(4, len(val.ids))
        out = pipe(list(val.images[:n]), class_names=names, generator=gen)
        panels = [
            side_by_side(
                val.images[i], val.labels[i].astype(np.int64), out.labels[i], palette, names, min_size=128
            )
            for i in range(n)
        ]
        rows.append(image_grid(panels, nrow=2))
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 8), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(padded, axis=0)


def write_model_card(
    checkpoint: str | Path,
    report: dict[str, Any] | None,
    command: str,
    figure: np.ndarray | None = None,
    loop_info: dict[str, Any] | None = None,
    runs: dict[str, Path] | None = None,
) -> Path:
    """Write ``README.md`` (and ``samples.png``) beside a ZS3D checkpoint from its config and metrics.

    ``runs`` (stage name -> run folder) adds the training history of every session of those runs.
    """
    from diffuseg.io import atomic_write
    from diffuseg.train.model_card import history_section, training_history
    from diffuseg.viz import save_figure

    root = Path(checkpoint)
    cfg = ZS3DConfig.load(root)
    tr, cal = cfg.training, cfg.calibration_info
    kind = (
        "ZS3D (DDPM over [image ; semantic] stacks)"
        if cfg.model_type == "ddpm"
        else "SPNet-like regression baseline"
    )
    lines = [
        "---",
        "library_name: diffuseg",
        "tags: [zero-shot-semantic-segmentation, diffusion, zs3d]",
        "---",
        f"# {kind}",
        "",
        "Zero-shot semantic segmentation with a diffusion model trained from scratch "
        "(`diffuseg.methods.zs3d`; see docs/methods.md, section ZS3D).",
        "",
        "## Training",
        f"- command: `{command}`",
        f"- data: `{tr.get('data_dir')}` ({tr.get('dataset')}), {tr.get('images_used')} of "
        f"{tr.get('images_available')} training images used",
        f"- classes never trained on: {', '.join(cfg.unseen)} (policy `{tr.get('unseen_policy')}`: "
        f"{tr.get('images_with_excluded_classes')} images contained them)",
        f"- model: {cfg.image_size}x{cfg.image_size} px, {cfg.semantic_channels} semantic channels "
        f"({cfg.text_encoder} class-name embeddings, PCA fitted on all {len(cfg.classes)} class names)",
    ]
    if loop_info:
        lines.append(f"- optimisation: {json.dumps(loop_info)}")
    lines += history_section(training_history(runs or {}))
    lines += ["", "## Calibration"]
    if cal:
        pseudo = ", ".join(cal.get("pseudo_unseen", []))
        lines.append(
            f"- margin γ = {cfg.calibration:.3f}, chosen on {cal.get('num_holdout')} held-out seen-only "
            f"training images with a model trained without the pseudo-unseen classes {pseudo} "
            f"(pseudo hIoU {cal.get('hIoU', float('nan')):.1f}); no unseen label was used"
        )
    else:
        lines.append("- not calibrated (γ = 0)")
    lines += [
        "",
        "## Sampling defaults",
        f"- {cfg.sampler}, {cfg.num_inference_steps} steps, {cfg.num_samples} samples averaged, "
        f"RS({cfg.resample}) jump length {cfg.jump_length}, smoothing σ = {cfg.smoothing}",
        "",
        "## Results",
    ]
    if report:
        m = report["metrics"]
        keys = [
            k for k in ("mIoU_seen", "mIoU_unseen", "hIoU", "mIoU", "aAcc", "mAcc") if m.get(k) is not None
        ]
        lines += [
            f"{report.get('dataset')} {report.get('split')}, {report.get('num_images')} images, "
            f"{report['timing'].get('seconds_per_image', float('nan')):.2f} s/image:",
            "",
            "| " + " | ".join(keys) + " |",
            "|" + "---|" * len(keys),
            "| " + " | ".join(f"{m[k]:.1f}" for k in keys) + " |",
            "",
            "| class | IoU |",
            "|---|---|",
        ]
        for c, v in report["per_class"].items():
            iou = "-" if v["IoU"] is None else f"{v['IoU']:.1f}"
            lines.append(f"| {c}{' (unseen)' if c in cfg.unseen else ''} | {iou} |")
    else:
        lines.append("- not evaluated")
    if figure is not None:
        save_figure(root / "samples.png", figure)
        lines += ["", "## Samples", "", "![samples](samples.png)", ""]
        if cfg.model_type == "ddpm":
            lines.append(
                "Top: unconditional [image ; mask] samples. Below: image | ground truth | prediction."
            )
    lines += [
        "",
        "## Use",
        "```python",
        "from diffuseg.methods.zs3d import ZS3DPipeline",
        f"pipe = ZS3DPipeline.from_pretrained('{root}')",
        "out = pipe(image, class_names=[...])  # any class names",
        "```",
        "",
    ]
    with atomic_write(root / "README.md", "w") as f:
        f.write("\n".join(lines))
    return root / "README.md"


# -------------------------------------------------------------------------------------- entry point
@dataclass
class ZS3DRunResult:
    """Where :func:`train_zs3d` stopped: ``stage`` is the last stage it worked on."""

    stage: str
    finished: bool
    step: int | None = None
    checkpoint: Path | None = None
    calibration: float | None = None
    report: dict[str, Any] | None = None


def _exclusions(config: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    unseen = config.get("data", {}).get("unseen")
    unseen = list(meta.get("unseen", [])) if unseen is None else list(unseen)
    if not unseen:
        logger.warning("no unseen classes: training on every class (not a zero-shot setting)")
    return unseen


def train_zs3d(
    data_dir: str | Path,
    out_dir: str | Path,
    config: dict[str, Any],
    max_minutes: float | None = None,
    progress: bool = True,
    stage: str = "all",
    command: str | None = None,
) -> ZS3DRunResult:
    """Run (or continue) the ZS3D recipe in ``out_dir``: main model, calibration model, γ, model card.

    ``stage="all"`` goes through every stage that is not done yet, within ``max_minutes`` in total
    (each training stage checkpoints and returns ``finished=False`` when the time is up; call again).
    A single stage can be forced: ``main``, ``calibration``, ``calibrate`` (recompute γ), ``card``.
    """
    from diffuseg.eval.runner import load_meta
    from diffuseg.train.loop import train

    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    deadline = time.monotonic() + 60 * max_minutes if max_minutes else None
    data_dir, out = Path(data_dir), Path(out_dir)
    command = command or shlex.join(["diffuseg", *sys.argv[1:]])
    seed = int(config.get("seed", 0))
    meta = load_meta(data_dir)
    names, unseen = list(meta["classes"]), _exclusions(config, meta)
    m = _model_section(config)
    size = int(m["image_size"])
    policy = config.get("data", {}).get("unseen_policy", "exclude_images")

    def minutes_left() -> float | None:
        return None if deadline is None else (deadline - time.monotonic()) / 60

    def out_of_time() -> bool:
        left = minutes_left()
        return left is not None and left < 0.5

    cache = out / "cache"
    train_arrays = None

    def arrays() -> SplitArrays:
        nonlocal train_arrays
        if train_arrays is None:
            train_arrays = load_split_arrays(data_dir, "train", size, cache, progress=progress)
        return train_arrays

    eval_cfg = dict(config.get("eval", {}))
    val = _val_at_data_size(data_dir, int(eval_cfg.get("num_images", 32)))
    torch.manual_seed(seed)
    result = ZS3DRunResult(stage="main", finished=False)

    # 1. main model: seen classes only
    final = out / "final"
    main_cfg = _loop_config(config.get("train", {}), out, seed, None, progress)
    if stage in ("all", "main") and not _loop_done(out, main_cfg.max_steps):
        if out_of_time():
            return result
        selected, record = select_training_images(arrays(), names, unseen, policy)
        task = _make_task(config, data_dir, selected, unseen, {**record, "seed": seed}, val)
        main_cfg.max_minutes = minutes_left()
        run = train(task, main_cfg)
        result = ZS3DRunResult("main", run.finished, run.step, run.export_dir)
        if not run.finished:
            return result
    if stage == "main":
        return ZS3DRunResult("main", True, _loop_step(out), final)

    # 2. calibration model: also without the pseudo-unseen classes, holding out images for γ
    cal_cfg = dict(config.get("calibration", {}))
    pseudo = _pseudo_unseen(cal_cfg, config, names, unseen)
    cal_loop = _loop_config(
        {**config.get("train", {}), **cal_cfg.get("train", {})}, out / CALIBRATION_DIR, seed, None, progress
    )
    recalibrate = stage == "calibrate"
    if stage in ("all", "calibration") and not _loop_done(out / CALIBRATION_DIR, cal_loop.max_steps):
        if out_of_time():
            return ZS3DRunResult("calibration", False)
        seen_only, hold_idx, rest_idx = _calibration_split(arrays(), names, unseen, cal_cfg, seed)
        selected, record = select_training_images(
            seen_only.subset(rest_idx), names, [*unseen, *pseudo], policy
        )
        record["held_out_for_calibration"] = len(hold_idx)
        task = _make_task(config, data_dir, selected, [*unseen, *pseudo], {**record, "seed": seed}, None)
        cal_loop.max_minutes = minutes_left()
        run = train(task, cal_loop)
        if not run.finished:
            return ZS3DRunResult("calibration", False, run.step, run.export_dir)
        (out / CALIBRATION_FILE).unlink(missing_ok=True)  # a (re)trained calibration model: new margin
    if stage == "calibration":
        return ZS3DRunResult(
            "calibration", True, _loop_step(out / CALIBRATION_DIR), out / CALIBRATION_DIR / "final"
        )

    # 3. the margin γ (a property of the calibration model), stored in the main checkpoint's config
    if stage in ("all", "calibrate"):
        if recalibrate or not (out / CALIBRATION_FILE).is_file():
            if out_of_time():
                return ZS3DRunResult("calibrate", False)
            seen_only, hold_idx, _ = _calibration_split(arrays(), names, unseen, cal_cfg, seed)
            cal = _run_calibration(out, data_dir, seen_only.subset(hold_idx), pseudo, cal_cfg, seed, progress)
        else:
            cal = json.loads((out / CALIBRATION_FILE).read_text())
        if ZS3DConfig.load(final).calibration_info != _without_curve(cal):
            _store_calibration(final, cal)  # new margin, or final/ re-exported by a longer main run
            (final / "README.md").unlink(missing_ok=True)
        if stage == "calibrate":
            return ZS3DRunResult("calibrate", True, calibration=ZS3DConfig.load(final).calibration)

    # 4. model card: val metrics and samples
    gamma = ZS3DConfig.load(final).calibration
    if stage == "card" or not (final / "README.md").is_file():
        report = _card(final, data_dir, config, command, val, seed, progress)
        return ZS3DRunResult("card", True, _loop_step(out), final, gamma, report)
    return ZS3DRunResult("card", True, _loop_step(out), final, gamma)


def _loop_step(loop_dir: Path) -> int:
    """Optimizer steps of the latest checkpoint in a loop output folder (0 without one)."""
    from diffuseg.train.loop import STATE_FILE, latest_checkpoint

    ckpt = latest_checkpoint(loop_dir)
    return 0 if ckpt is None else int(json.loads((ckpt / STATE_FILE).read_text())["step"])


def _loop_done(loop_dir: Path, max_steps: int) -> bool:
    """A training stage is done when its export exists and its checkpoint reached ``max_steps``.

    Checked before calling the loop because the loop re-exports a finished run, which would
    overwrite the calibrated config and the model card in ``final/``.
    """
    return (loop_dir / "final" / "model_index.json").is_file() and _loop_step(loop_dir) >= max_steps


def _calibration_split(
    arrays: SplitArrays, names: list[str], unseen: list[str], cal_cfg: dict[str, Any], seed: int
) -> tuple[SplitArrays, np.ndarray, np.ndarray]:
    """Seen-only training images and the (holdout, rest) indices of the calibration protocol."""
    seen_only, _ = select_training_images(arrays, names, unseen, "exclude_images")
    hold, rest = _holdout_split(seen_only, int(cal_cfg.get("num_holdout", 200)), seed)
    return seen_only, hold, rest


def _val_at_data_size(data_dir: Path, limit: int) -> SplitArrays:
    """The first ``limit`` val scenes at their own size (the pipeline resizes internally)."""
    from diffuseg.eval.runner import load_split_samples

    images, labels, ids = [], [], []
    for n, s in enumerate(load_split_samples(data_dir, "val")):
        if n >= limit:
            break
        images.append(s["image"])
        labels.append(s["label"].astype(np.uint8))
        ids.append(str(s["id"]))
    if not ids:
        raise FileNotFoundError(f"{data_dir}: the val split is empty")
    return SplitArrays(np.stack(images), np.stack(labels), ids)


def _pseudo_unseen(
    cal_cfg: dict[str, Any], config: dict[str, Any], names: list[str], unseen: list[str]
) -> list[str]:
    given = cal_cfg.get("pseudo_unseen")
    if given:
        bad = [c for c in given if c not in names or c in unseen]
        if bad:
            raise ValueError(f"calibration.pseudo_unseen {bad} must be seen dataset classes")
        return list(given)
    m = _model_section(config)
    _, codes = fit_projection(names, int(m["semantic_channels"]), m["text_encoder"], m["templates"])
    chosen = pseudo_unseen_classes(codes, names, unseen)
    logger.info("pseudo-unseen classes for calibration (nearest names of %s): %s", unseen, chosen)
    return chosen


def _run_calibration(
    out: Path,
    data_dir: Path,
    holdout: SplitArrays,
    pseudo: list[str],
    cal_cfg: dict[str, Any],
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    """γ from the calibration model on the held-out images, at the images' own resolution."""
    from diffuseg.eval.runner import load_split_samples

    pipe = ZS3DPipeline.from_pretrained(out / CALIBRATION_DIR / "final")
    wanted = set(holdout.ids)
    full = [s for s in load_split_samples(data_dir, "train") if str(s["id"]) in wanted]
    images = [s["image"] for s in full]
    labels = [s["label"] for s in full]
    gammas = _gamma_grid(cal_cfg.get("gammas", {}))
    record = calibrate_margin(pipe, images, labels, pseudo, gammas, seed=seed, progress=progress)
    record.update(
        pseudo_unseen=pseudo,
        num_holdout=len(images),
        holdout_ids_sha256=hashlib.sha256("\n".join(sorted(wanted)).encode()).hexdigest()[:16],
        calibration_model=str(out / CALIBRATION_DIR / "final"),
        calibration_training=pipe.config.training,
        sampling={
            k: getattr(pipe.config, k)
            for k in ("sampler", "num_inference_steps", "num_samples", "resample", "smoothing")
        },
        procedure="calibrated stacking; gamma maximises the harmonic mean of pseudo-seen and pseudo-unseen "
        "mIoU of a model trained without the pseudo-unseen classes, on held-out seen-only training images",
    )
    from diffuseg.io import write_json

    write_json(out / CALIBRATION_FILE, record)
    logger.info("calibration: gamma=%.3f (pseudo hIoU %.1f)", record["gamma"], record["hIoU"])
    return record


def _without_curve(record: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({k: v for k, v in record.items() if k != "curve"}))


def _store_calibration(final: Path, record: dict[str, Any]) -> None:
    cfg = ZS3DConfig.load(final)
    cfg.calibration = float(record["gamma"])
    cfg.calibration_info = _without_curve(record)
    cfg.save(final)


def _card(
    final: Path,
    data_dir: Path,
    config: dict[str, Any],
    command: str,
    val: SplitArrays,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    from diffuseg.eval.runner import load_meta
    from diffuseg.methods.zs3d import evaluate_zs3d

    card = dict(config.get("model_card", {}))
    pipe = ZS3DPipeline.from_pretrained(final)
    report = evaluate_zs3d(pipe, data_dir, "val", limit=int(card.get("num_val", 100)), progress=progress)
    palette = load_meta(data_dir)["palette"]
    figure = _samples_figure(pipe, val, palette, seed)
    runs = {"main": final.parent, "calibration": final.parent / CALIBRATION_DIR}
    write_model_card(final, report, command, figure, loop_info=dict(config.get("train", {})), runs=runs)
    return report
