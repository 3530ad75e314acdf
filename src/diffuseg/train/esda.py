"""Training ESDA on the shared loop: base classes only, one named class per image, binary targets.

Each training sample is an image free of novel classes (:func:`~diffuseg.data.episodes.base_training_items`);
the loss draws, from the loop's per-step generator, which base class present in it is the target
(ESDA's dataset draws it per ``__getitem__``), and with probability ``negative_prob`` a base class
that is *absent* (an all-background target). The original never shows absent names; the semantic
protocol asks about every class in every image, so the semantic recipe turns negatives on (the
episodic recipe keeps the original's 0). Augmentation: horizontal flip and a random scaled crop.

Novel classes are a FashionScenes/PASCAL-5i/COCO-20i fold (episodic protocol) or the dataset's
``meta.json["unseen"]`` (semantic zero-shot protocol). Only the adapters, projections, interactor
and head train; the exported folder holds just those weights and names the frozen encoder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from diffuseg.data.episodes import (
    EpisodeMeter,
    base_training_items,
    binary_target,
    build_episodes,
    default_min_pixels,
    fold_classes,
    scan_labels,
)
from diffuseg.io import read_image, read_label
from diffuseg.methods.esda import (
    BACKGROUND_NAMES,
    IGNORE_INDEX,
    VARIANTS,
    ESDAModel,
    TextFeatures,
    encode_class_texts,
    esda_loss,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ESDATask",
    "EpisodicTrainSet",
    "augment",
    "choose_targets",
    "resolve_novel",
    "train_esda",
    "write_model_card",
]


class EpisodicTrainSet(Dataset):
    """Base-class training images as ``{"image", "label", "eligible"}``.

    ``image`` uint8 ``(H, W, 3)``, ``label`` int64 ``(H, W)``, ``eligible`` bool ``(K,)``.

    ``eligible`` marks the base classes present (possible targets). ``size`` resizes images
    (bilinear) and labels (nearest) to a square so batches stack; FashionScenes needs none.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        items: Sequence[tuple[str, list[int]]],
        num_classes: int,
        size: int | None = None,
    ) -> None:
        self.root = Path(data_dir)
        self.split, self.items, self.num_classes, self.size = split, list(items), num_classes, size
        img_dir = self.root / "img_dir" / split
        self.paths = {p.stem: p for p in img_dir.iterdir() if p.is_file()} if img_dir.is_dir() else {}
        missing = [sid for sid, _ in self.items if sid not in self.paths]
        if missing:
            raise FileNotFoundError(f"{img_dir}: no image for label(s) {missing[:5]}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        sid, eligible = self.items[i]
        image = read_image(self.paths[sid])
        label = read_label(self.root / "ann_dir" / self.split / f"{sid}.png")
        if self.size is not None and image.shape[:2] != (self.size, self.size):
            image, label = _resize_pair(image, label, self.size)
        mask = torch.zeros(self.num_classes, dtype=torch.bool)
        mask[eligible] = True
        return {"image": torch.from_numpy(image), "label": torch.from_numpy(label), "eligible": mask}


def _resize_pair(image: np.ndarray, label: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    im = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    lb = np.asarray(Image.fromarray(label.astype(np.uint8)).resize((size, size), Image.NEAREST))
    return im, lb.astype(np.int64)


def choose_targets(
    labels: Tensor, eligible: Tensor, candidates: Tensor, negative_prob: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Per sample, the class to segment and its binary target (1 / 0 / 255).

    A present eligible class uniformly; with probability ``negative_prob`` a ``candidates`` class
    absent from the image instead (all-background target). Draws only from ``generator``.
    """
    b = labels.shape[0]
    u = torch.rand(b, generator=generator)
    neg = torch.rand(b, generator=generator) < negative_prob
    chosen = torch.empty(b, dtype=torch.long)
    for i in range(b):
        pos = torch.nonzero(eligible[i].cpu()).flatten()
        absent = candidates[~torch.isin(candidates, pos)]
        pool = absent if bool(neg[i]) and len(absent) else pos
        chosen[i] = pool[min(int(u[i] * len(pool)), len(pool) - 1)]
    target = (labels == chosen.to(labels.device)[:, None, None]).long()
    target[labels == IGNORE_INDEX] = IGNORE_INDEX
    return chosen, target


def augment(
    images: Tensor, target: Tensor, generator: torch.Generator, flip: bool = True, scale_min: float = 0.8
) -> tuple[Tensor, Tensor]:
    """Random horizontal flip and a random square crop of side ``s·H`` (``s ∈ [scale_min, 1]``) resized back.

    ``images`` ``(B, 3, H, W)`` float, ``target`` ``(B, H, W)``; nearest for the target.
    """
    b, _, h, w = images.shape
    flips = torch.rand(b, generator=generator) < (0.5 if flip else 0.0)
    scales = scale_min + (1 - scale_min) * torch.rand(b, generator=generator)
    offs = torch.rand(b, 2, generator=generator)
    out_i, out_t = [], []
    for i in range(b):
        x, t = images[i], target[i]
        if flips[i]:
            x, t = x.flip(-1), t.flip(-1)
        ch, cw = max(1, round(float(scales[i]) * h)), max(1, round(float(scales[i]) * w))
        top, left = int(offs[i, 0] * (h - ch + 1)), int(offs[i, 1] * (w - cw + 1))
        if (ch, cw) != (h, w):
            x = F.interpolate(x[None, :, top : top + ch, left : left + cw], size=(h, w), mode="bilinear")[0]
            t = t[top : top + ch, left : left + cw][None, None].float()
            t = F.interpolate(t, size=(h, w), mode="nearest-exact")[0, 0].long()
        out_i.append(x)
        out_t.append(t)
    return torch.stack(out_i), torch.stack(out_t)


def _unwrap(model: nn.Module) -> ESDAModel:
    return getattr(model, "module", model)


class ESDATask:
    """The :class:`~diffuseg.train.TrainTask` of ESDA.

    Args:
        data_dir: dataset folder (DESIGN.md layout).
        model_config: :class:`ESDAModel` arguments (text sizes and class lists are filled in here).
        novel: class names held out of training.
        negative_prob: chance of an absent base class as target (see module doc).
        min_pixels: base-object area an image needs to be used (``None``: the dataset's default).
        size: resize training images to this square (``None``: keep; sizes must then agree).
        flip / scale_min: augmentation.
        num_val_episodes: episodes of the novel classes on ``val_split`` for ``evaluate`` (0: none).
        text_encoder: a built text encoder (default: the one ``model_config["text_encoder"]`` names).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        model_config: dict[str, Any],
        novel: Sequence[str],
        *,
        split: str = "train",
        val_split: str = "val",
        negative_prob: float = 0.0,
        min_pixels: int | None = None,
        size: int | None = None,
        flip: bool = True,
        scale_min: float = 0.8,
        num_val_episodes: int = 200,
        text_noise: float = 0.0,
        text_encoder=None,
        progress: bool = True,
    ) -> None:
        from diffuseg.eval.runner import load_meta
        from diffuseg.text import get_text_encoder

        if not 0.0 <= negative_prob < 1.0:
            raise ValueError(f"negative_prob must be in [0, 1), got {negative_prob}")
        if not 0.0 < scale_min <= 1.0:
            raise ValueError(f"scale_min must be in (0, 1], got {scale_min}")
        if text_noise < 0.0:
            raise ValueError(f"text_noise must be >= 0 (a fraction of the embedding's RMS), got {text_noise}")
        self.text_noise = float(text_noise)
        self.data_dir = Path(data_dir)
        meta = load_meta(self.data_dir)
        self.class_names = list(meta["classes"])
        unknown = [n for n in novel if n not in self.class_names]
        if unknown or not novel:
            raise ValueError(f"novel classes {list(novel)} must be non-empty names from {self.class_names}")
        self.novel = list(novel)
        self.dataset_name = str(meta.get("name", self.data_dir.name))
        self.min_pixels = default_min_pixels(self.dataset_name) if min_pixels is None else int(min_pixels)
        self.negative_prob, self.flip, self.scale_min, self.size = negative_prob, flip, scale_min, size
        background = [n for n in self.class_names if n.lower() in BACKGROUND_NAMES]
        index = scan_labels(self.data_dir, split, self.class_names, progress=progress)
        self.items = base_training_items(index, self.novel, self.min_pixels, background)
        self.split = split
        base = [k for k, n in enumerate(self.class_names) if n not in self.novel and n not in background]
        self.candidates = torch.tensor(base)
        enc = text_encoder or get_text_encoder(model_config.get("text_encoder", "minilm"))
        self.text = encode_class_texts(
            enc,
            self.class_names,
            model_config.get("token_template", "a photo of a {}."),
            int(model_config.get("text_max_length", 16)),
            model_config.get("class_templates"),
        )
        self.model_config = {
            **model_config,
            "text_dim": int(self.text.cls.shape[-1]),
            "text_token_dim": int(self.text.tokens.shape[-1]),
            "class_names": self.class_names,
            "unseen_classes": self.novel,
        }
        self.val = self._val_episodes(val_split, num_val_episodes, progress)
        logger.info(
            "ESDA training: %d base images, novel %s, %d val episodes",
            len(self.items),
            self.novel,
            len(self.val),
        )

    def _val_episodes(self, split: str, num: int, progress: bool) -> list[tuple[np.ndarray, np.ndarray, int]]:
        if num <= 0 or not (self.data_dir / "ann_dir" / split).is_dir():
            return []
        index = scan_labels(self.data_dir, split, self.class_names, progress=progress)
        episodes = build_episodes(index, self.novel, num, seed=456, min_pixels=self.min_pixels)
        paths = {p.stem: p for p in (self.data_dir / "img_dir" / split).iterdir()}
        out = []
        for ep in episodes:
            label = read_label(self.data_dir / "ann_dir" / split / f"{ep.image_id}.png")
            out.append((read_image(paths[ep.image_id]), binary_target(label, ep.class_id), ep.class_id))
        return out

    # -- TrainTask --------------------------------------------------------------------------------
    def model(self) -> nn.Module:
        return ESDAModel(**self.model_config).train()

    def train_dataset(self) -> Dataset:
        return EpisodicTrainSet(self.data_dir, self.split, self.items, len(self.class_names), self.size)

    def loss(self, model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator):
        net = _unwrap(model)
        chosen, target = choose_targets(
            batch["label"], batch["eligible"], self.candidates, self.negative_prob, generator
        )
        images = batch["image"].permute(0, 3, 1, 2).float() / 255.0
        images, target = augment(images, target, generator, self.flip, self.scale_min)
        text = noisy_text(self.text.index(chosen), self.text_noise, generator).to(images.device)
        out = model(net.preprocess(images), text, target)
        loss, logs = esda_loss(out, target, net.config.loss_weights)
        logs["negatives"] = float((target == 1).flatten(1).any(1).logical_not().float().mean())
        return loss, logs

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Episodic mIoU / FB-IoU of the novel classes on the cached val episodes."""
        if not self.val:
            return {}
        net = _unwrap(model)
        meter = EpisodeMeter(self.novel)
        for s in range(0, len(self.val), 32):
            part = self.val[s : s + 32]
            shapes = {im.shape for im, _, _ in part}
            for shape in shapes:
                group = [p for p in part if p[0].shape == shape]
                x = torch.from_numpy(np.stack([g[0] for g in group])).permute(0, 3, 1, 2).float() / 255.0
                text = self.text.index(torch.tensor([g[2] for g in group]))
                logits = net(net.preprocess(x.to(net.device)), text.to(net.device)).logits
                logits = F.interpolate(logits, size=shape[:2], mode="bilinear", align_corners=False)
                for (_, target, cid), pred in zip(group, logits.argmax(1).cpu().numpy(), strict=True):
                    meter.update(pred, target, self.class_names[cid])
        metrics = meter.result()["metrics"]
        return {"val_mIoU": metrics["mIoU"], "val_FB-IoU": metrics["FB-IoU"]}

    def save_pretrained(self, model: nn.Module, out_dir: Path) -> None:
        _unwrap(model).save_pretrained(out_dir)


def noisy_text(text: TextFeatures, scale: float, generator: torch.Generator) -> TextFeatures:
    """Training-time text augmentation: Gaussian noise of ``scale`` × each embedding's RMS.

    With 8 base class names, every text-conditioned block (FiLM injection, interactor) can learn a
    lookup table of the training names, which a novel name falls between; jittering the embeddings
    asks those blocks to behave smoothly around each name instead. ``scale=0`` returns ``text`` as is.
    """
    if scale <= 0.0:
        return text

    def jitter(x: Tensor) -> Tensor:
        rms = x.pow(2).mean(dim=-1, keepdim=True).sqrt()
        noise = torch.randn(x.shape, generator=generator)  # the loop's generator lives on the CPU
        return x + scale * rms * noise.to(device=x.device, dtype=x.dtype)

    return TextFeatures(jitter(text.cls), jitter(text.tokens), text.mask)


def resolve_novel(
    data_dir: str | os.PathLike, fold: int | None, novel: Sequence[str] | None = None
) -> list[str]:
    """Novel classes: explicit names, else the fold of the dataset, else ``meta.json["unseen"]``."""
    from diffuseg.eval.runner import load_meta

    if novel:
        return list(novel)
    meta = load_meta(data_dir)
    if fold is not None:
        return list(fold_classes(str(meta.get("name", Path(data_dir).name)), fold))
    if not meta.get("unseen"):
        raise ValueError(f"{data_dir}/meta.json lists no unseen classes: pass a fold or novel class names")
    return list(meta["unseen"])


def train_esda(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: dict[str, Any],
    fold: int | None = None,
    variant: str | None = None,
    max_minutes: float | None = None,
    progress: bool = True,
    text_encoder=None,
):
    """Train one ESDA model (or an ablation ``variant``) with a ``configs/esda.yaml``-shaped config.

    ``fold`` (default: ``config["data"]["fold"]``) picks the episodic fold; without one the novel
    classes are the dataset's ``unseen``. Returns the loop's :class:`~diffuseg.train.TrainResult`;
    the exported model is ``out_dir/final`` once finished.
    """
    from diffuseg.train import TrainConfig, train

    data_cfg = dict(config.get("data") or {})
    fold = data_cfg.pop("fold", None) if fold is None else fold
    data_cfg.pop("fold", None)
    novel = resolve_novel(data_dir, fold, data_cfg.pop("novel", None))
    name = variant or config.get("variant", "esda")
    if name not in VARIANTS:
        raise ValueError(f"unknown ESDA variant {name!r}; choose one of {sorted(VARIANTS)}")
    model_cfg = {**(config.get("model") or {}), **VARIANTS[name], "variant": name}
    allowed = {
        "split",
        "val_split",
        "negative_prob",
        "min_pixels",
        "size",
        "flip",
        "scale_min",
        "num_val_episodes",
        "text_noise",
    }
    unknown = sorted(set(data_cfg) - allowed)
    if unknown:
        raise ValueError(f"unknown data options {unknown}; valid: fold, novel, {', '.join(sorted(allowed))}")
    task = ESDATask(data_dir, model_cfg, novel, text_encoder=text_encoder, progress=progress, **data_cfg)
    train_cfg = dict(config.get("train") or {})
    train_cfg.update({"output_dir": str(out_dir), "progress": progress})
    if max_minutes is not None:
        train_cfg["max_minutes"] = max_minutes
    return train(task, TrainConfig.from_dict(train_cfg))


def _card_sample(root: Path, data_dir: str | os.PathLike, class_names: Sequence[str]) -> str | None:
    from diffuseg.methods.esda import ESDAPipeline
    from diffuseg.train.model_card import sample_picture

    pipe = ESDAPipeline.from_pretrained(root)
    names = list(class_names)
    return sample_picture(root, lambda image: pipe(image, class_names=names), data_dir, names)


def write_model_card(
    checkpoint: str | os.PathLike,
    command: str,
    run_dir: str | os.PathLike | None = None,
    semantic_report: dict[str, Any] | None = None,
    episodic_reports: Sequence[dict[str, Any]] = (),
    data_dir: str | os.PathLike | None = None,
) -> Path:
    """Write ``README.md`` beside an ESDA model folder: what it is, how it was trained, what it scores.

    ``run_dir``'s ``log.jsonl`` gives steps, time and the last losses; the reports are the JSON of
    ``diffuseg evaluate`` (semantic) and ``diffuseg evaluate-episodes`` (one per fold). With
    ``data_dir``, ``sample.png`` shows the semantic protocol (all class names) on its first val scenes.
    """
    import json

    from diffuseg.io import atomic_write
    from diffuseg.train.model_card import history_section, read_log, training_history

    root = Path(checkpoint)
    cfg = json.loads((root / "config.json").read_text())
    enc = cfg["encoder"] if isinstance(cfg["encoder"], str) else json.dumps(cfg["encoder"])
    parts = [
        n
        for n, on in (
            ("adapters", cfg["use_adapters"]),
            ("text injection", cfg["inject_text"]),
            ("interactor", cfg["use_interactor"]),
        )
        if on
    ]
    lines = [
        "---",
        "library_name: diffuseg",
        "tags: [zero-shot-semantic-segmentation, esda]",
        "---",
        f"# ESDA ({cfg.get('variant', 'esda')})",
        "",
        "Zero-shot segmentation by class name with a frozen image encoder (`diffuseg.methods.esda`; "
        "docs/methods.md, section ESDA). Load with `ESDAPipeline.from_pretrained(<this folder>)`.",
        "",
        "## Model",
        f"- frozen image encoder `{enc}`, frozen text encoder `{cfg['text_encoder']}`; "
        f"{cfg['image_size']}-px input, token width {cfg['dim']}",
        f"- trained blocks: {', '.join(parts) or 'none inside the encoder'}, text projection, head; "
        f"loss weights {cfg['loss_weights']}",
        f"- classes: {', '.join(cfg.get('class_names') or [])}",
        f"- never trained on: {', '.join(cfg.get('unseen_classes') or [])}",
        "",
        "## Training",
        f"- command: `{command}`",
    ]
    train_rows = read_log(Path(run_dir), "train") if run_dir is not None else []
    if train_rows:
        last = train_rows[-1]
        lines.append(
            f"- {last['step']} steps, {last.get('samples', 0)} samples, {last.get('time', 0) / 3600:.2f} h; "
            f"last loss {last['loss']:.4f} (main {last.get('loss_main', float('nan')):.4f})"
        )
    lines += history_section(training_history({"train": Path(run_dir)}) if run_dir is not None else "")
    lines += ["", "## Results"]
    if semantic_report:
        m = semantic_report["metrics"]
        keys = [k for k in ("mIoU_seen", "mIoU_unseen", "hIoU", "mIoU", "aAcc") if m.get(k) is not None]
        lines += [
            f"Semantic protocol, {semantic_report.get('dataset')} {semantic_report.get('split')} "
            f"({semantic_report.get('num_images')} images):",
            "",
            "| " + " | ".join(keys) + " |",
            "|" + "---|" * len(keys),
            "| " + " | ".join(f"{m[k]:.1f}" for k in keys) + " |",
            "",
        ]
    for rep in episodic_reports:
        p, m = rep["protocol"], rep["metrics"]
        lines.append(
            f"- episodic, fold {p.get('fold')} ({', '.join(p['novel_classes'])}), {rep['num_episodes']} "
            f"episodes, seed {p['seed']}: mIoU {m['mIoU']:.1f}, FB-IoU {m['FB-IoU']:.1f}"
        )
    if not semantic_report and not episodic_reports:
        lines.append("Not evaluated yet.")
    sample = _card_sample(root, data_dir, cfg.get("class_names") or []) if data_dir is not None else None
    if sample:
        lines += ["", "## Sample", "", f"Semantic protocol on the first val scenes of `{data_dir}`:", "",
                  f"![sample]({sample})"]  # fmt: skip
    with atomic_write(root / "README.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return root / "README.md"
