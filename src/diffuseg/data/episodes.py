"""The episodic zero-shot protocol of ESDA (and PFENet/HSNet before it): binary masks of named novel classes.

A dataset's foreground classes are split into **folds**; in fold ``i`` the fold's classes are
*novel* (never trained on) and all others are *base*. Every class is novel in exactly one fold:

* PASCAL-5i: fold ``i`` = VOC classes ``5i+1 .. 5i+5`` (4 folds);
* COCO-20i: the interleaved split, fold ``i`` = classes ``{4k+i+1}`` (4 folds);
* FashionScenes: 5 folds of 2 consecutive ids — fold 2 is (coat, sandal), the default unseen pair.

**Test episodes** (ESDA's ``test.py``): the val images holding a novel class of at least
``min_pixels`` pixels (2·32·32 on the official data) are visited in file order, cycling until
``num_episodes`` (1000) episodes; each episode picks one novel class present in the image at random
(seed 456) and asks for its binary mask (object 1, background 0, ignore 255 kept). Scores:
**mIoU** = mean over the fold's novel classes of (foreground intersection / union summed over that
class's episodes), and **FB-IoU** = mean of background and foreground IoU summed over all episodes.

**Training images** (``filter_intersection=True`` in the original): train images whose labelled
classes are all base classes and at least one of them covers ``min_pixels``; each sample's target is
one base class present in it, drawn at training time.

Folders are the DESIGN.md layout (``ann_dir/<split>/<id>.png`` ids indexing ``meta.json`` classes),
which is what the converters write for VOC 2012 (→ PASCAL-5i) and what a COCO-20i conversion holds.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from diffuseg.data.specs import get_dataset_spec, normalize_dataset_name
from diffuseg.io import read_image, read_label, write_json

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MIN_PIXELS",
    "EPISODES_PER_FOLD",
    "EPISODE_SEED",
    "FASHION_SCENES_FOLDS",
    "Episode",
    "EpisodeMeter",
    "LabelIndex",
    "base_training_items",
    "binary_target",
    "build_episodes",
    "dataset_folds",
    "episode_dataset_name",
    "evaluate_episodes",
    "fold_classes",
    "scan_labels",
    "summarize_folds",
]

EPISODES_PER_FOLD = 1000
EPISODE_SEED = 456
IGNORE_INDEX = 255

FASHION_SCENES_FOLDS: tuple[tuple[str, ...], ...] = (
    ("t-shirt", "trouser"),
    ("pullover", "dress"),
    ("coat", "sandal"),
    ("shirt", "sneaker"),
    ("bag", "ankle boot"),
)
"""Five folds of two consecutive class ids; fold 2 equals FashionScenes' default unseen pair."""

DEFAULT_MIN_PIXELS: dict[str, int] = {
    "pascal-5i": 2 * 32 * 32,
    "coco-20i": 2 * 32 * 32,
    # 2048 px is 1.1 % of a 500x375 VOC image; the same fraction of a 64x64 scene is 45 px
    "fashion-scenes": 45,
}


# ------------------------------------------------------------------------------------------ folds


def episode_dataset_name(name: str) -> str:
    """The fold definition a dataset folder uses: VOC 2012 → ``pascal-5i``, COCO → ``coco-20i``."""
    key = normalize_dataset_name(name)
    if key in ("voc2012", "pascal-5i"):
        return "pascal-5i"
    if key.startswith("coco") and key != "coco-stuff-27":
        return "coco-20i"
    if key == "fashion-scenes":
        return key
    raise ValueError(
        f"no episodic folds are defined for dataset {name!r}; use a FashionScenes, VOC 2012 (PASCAL-5i) or "
        "COCO (COCO-20i) folder, or pass the novel classes explicitly"
    )


def dataset_folds(name: str) -> tuple[tuple[str, ...], ...]:
    """All folds of ``name`` (class names); each class is novel in exactly one of them."""
    key = episode_dataset_name(name)
    if key == "fashion-scenes":
        return FASHION_SCENES_FOLDS
    return get_dataset_spec(key).folds


def fold_classes(name: str, fold: int) -> tuple[str, ...]:
    """Novel classes of fold ``fold`` of dataset ``name``."""
    folds = dataset_folds(name)
    if not 0 <= int(fold) < len(folds):
        raise ValueError(f"fold {fold} out of range: {name} has folds 0..{len(folds) - 1}")
    return folds[int(fold)]


def default_min_pixels(name: str) -> int:
    """Minimum novel-object area for an image to enter the episodes (2048 px on official data)."""
    try:
        return DEFAULT_MIN_PIXELS[episode_dataset_name(name)]
    except ValueError:
        return DEFAULT_MIN_PIXELS["pascal-5i"]


# ------------------------------------------------------------------------------------ label index


@dataclass
class LabelIndex:
    """Pixel count of every class in every label map of a split: ``counts[i, k]`` for ``ids[i]``."""

    ids: list[str]
    counts: np.ndarray
    class_names: list[str]

    def class_id(self, name: str) -> int:
        if name not in self.class_names:
            raise ValueError(f"class {name!r} is not in this dataset's classes {self.class_names}")
        return self.class_names.index(name)


def scan_labels(
    data_dir: str | os.PathLike, split: str, class_names: Sequence[str], progress: bool = False
) -> LabelIndex:
    """Read every label map of ``split`` once and count pixels per class (ignore pixels dropped).

    Results are memoised per process (keyed by folder, split, classes and the label folder's
    modification time), because a benchmark builds the same index for every fold and variant.
    """
    ann = Path(data_dir) / "ann_dir" / split
    if not ann.is_dir():
        raise FileNotFoundError(
            f"{ann}: no label maps; is {data_dir} a dataset folder with a {split!r} split?"
        )
    key = (str(ann.resolve()), tuple(class_names), ann.stat().st_mtime_ns)
    if key not in _INDEX_CACHE:
        if len(_INDEX_CACHE) >= 8:
            _INDEX_CACHE.pop(next(iter(_INDEX_CACHE)))
        _INDEX_CACHE[key] = _scan(ann, split, list(class_names), progress)
    return _INDEX_CACHE[key]


_INDEX_CACHE: dict[tuple, LabelIndex] = {}


def _scan(ann: Path, split: str, class_names: list[str], progress: bool) -> LabelIndex:
    files = sorted(ann.glob("*.png"))
    if not files:
        raise FileNotFoundError(f"{ann}: no label maps (*.png)")
    k = len(class_names)
    counts = np.zeros((len(files), k), dtype=np.int64)
    for i, f in enumerate(tqdm(files, desc=f"scan {split} labels", disable=not progress, leave=False)):
        label = read_label(f)
        valid = label[label != IGNORE_INDEX]
        if valid.size and (valid.min() < 0 or valid.max() >= k):
            raise ValueError(f"{f}: label ids {np.unique(valid)[-3:]} outside 0..{k - 1} (meta.json classes)")
        counts[i] = np.bincount(valid.ravel(), minlength=k)[:k]
    return LabelIndex([f.stem for f in files], counts, class_names)


# ---------------------------------------------------------------------------------------- episodes


@dataclass(frozen=True)
class Episode:
    """One test episode: segment ``class_name`` (label id ``class_id``) in image ``image_id``."""

    image_id: str
    class_name: str
    class_id: int


def build_episodes(
    index: LabelIndex,
    novel: Sequence[str],
    num_episodes: int = EPISODES_PER_FOLD,
    seed: int = EPISODE_SEED,
    min_pixels: int = 2 * 32 * 32,
) -> list[Episode]:
    """ESDA's test episodes: qualifying images in file order, cycled, one random present novel class each.

    An image qualifies when some novel class covers ``min_pixels``; the episode's class is then drawn
    among *all* novel classes present in it (as the original's dataset does).
    """
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
    ids = np.array([index.class_id(n) for n in novel])
    sub = index.counts[:, ids]
    rows = np.flatnonzero((sub >= min_pixels).any(1))
    if not len(rows):
        raise ValueError(
            f"no image holds a novel class {list(novel)} with >= {min_pixels} pixels; lower min_pixels or "
            "check the split"
        )
    rng = np.random.default_rng(seed)
    episodes = []
    for n in range(num_episodes):
        r = rows[n % len(rows)]
        present = ids[sub[r] > 0]
        c = int(present[rng.integers(len(present))])
        episodes.append(Episode(index.ids[r], index.class_names[c], c))
    return episodes


def base_training_items(
    index: LabelIndex, novel: Sequence[str], min_pixels: int = 2 * 32 * 32, background: Sequence[str] = ()
) -> list[tuple[str, list[int]]]:
    """Training images without any novel pixel and with a base object of ``min_pixels``.

    Returns ``(image_id, eligible class ids)``: the base classes present, any one of which may be
    the training target (the original draws it per sample).
    """
    novel_ids = [index.class_id(n) for n in novel]
    skip = set(novel_ids) | {index.class_names.index(b) for b in background if b in index.class_names}
    base = np.array([k for k in range(len(index.class_names)) if k not in skip])
    clean = (index.counts[:, novel_ids] == 0).all(1) if novel_ids else np.ones(len(index.ids), bool)
    big = (index.counts[:, base] >= min_pixels).any(1)
    items = []
    for r in np.flatnonzero(clean & big):
        items.append((index.ids[r], [int(k) for k in base[index.counts[r, base] > 0]]))
    if not items:
        raise ValueError(
            f"no training image is free of {list(novel)} with a base object of >= {min_pixels} px"
        )
    return items


def binary_target(label: np.ndarray, class_id: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """``1`` where ``label == class_id``, ``ignore_index`` kept, ``0`` elsewhere (int64)."""
    out = (label == class_id).astype(np.int64)
    out[label == ignore_index] = ignore_index
    return out


# ----------------------------------------------------------------------------------------- metrics


class EpisodeMeter:
    """Accumulates ESDA's episodic scores: per-novel-class foreground IoU and FB-IoU."""

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)
        self.inter = dict.fromkeys(self.class_names, 0)
        self.union = dict.fromkeys(self.class_names, 0)
        self.count = dict.fromkeys(self.class_names, 0)
        self.fb_inter = np.zeros(2, dtype=np.int64)
        self.fb_union = np.zeros(2, dtype=np.int64)

    def update(self, pred: np.ndarray, target: np.ndarray, class_name: str) -> None:
        """Add one episode: ``pred`` 0/1, ``target`` 0/1/255, same shape."""
        if class_name not in self.inter:
            raise ValueError(f"{class_name!r} is not a novel class of this fold ({self.class_names})")
        if pred.shape != target.shape:
            raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
        valid = target != IGNORE_INDEX
        p, t = pred[valid].astype(bool), target[valid] == 1
        for k, (pk, tk) in enumerate(((~p, ~t), (p, t))):
            self.fb_inter[k] += int((pk & tk).sum())
            self.fb_union[k] += int((pk | tk).sum())
        self.inter[class_name] += int((p & t).sum())
        self.union[class_name] += int((p | t).sum())
        self.count[class_name] += 1

    def result(self) -> dict[str, Any]:
        """mIoU over novel classes and FB-IoU, in percent; classes without episodes are left out."""
        per_class = {
            n: {"IoU": 100.0 * self.inter[n] / max(self.union[n], 1), "episodes": self.count[n]}
            for n in self.class_names
            if self.count[n]
        }
        fb = 100.0 * self.fb_inter / np.maximum(self.fb_union, 1)
        return {
            "metrics": {
                "mIoU": float(np.mean([v["IoU"] for v in per_class.values()])) if per_class else float("nan"),
                "FB-IoU": float(fb.mean()),
                "IoU_background": float(fb[0]),
                "IoU_foreground": float(fb[1]),
            },
            "per_class": per_class,
        }


# -------------------------------------------------------------------------------------- evaluation

PredictFn = Callable[[list[np.ndarray], list[str]], Any]


def _image_path(data_dir: Path, split: str, sid: str) -> Path:
    matches = sorted((data_dir / "img_dir" / split).glob(f"{sid}.*"))
    if not matches:
        raise FileNotFoundError(f"no image for label {sid} in {data_dir / 'img_dir' / split}")
    return matches[0]


def evaluate_episodes(
    predict: PredictFn,
    data_dir: str | os.PathLike,
    split: str = "val",
    fold: int | None = 0,
    *,
    novel: Sequence[str] | None = None,
    dataset: str | None = None,
    num_episodes: int = EPISODES_PER_FOLD,
    seed: int = EPISODE_SEED,
    min_pixels: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
    method: str = "",
    protocol: dict[str, Any] | None = None,
    json_out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run ``predict(images, class_names) -> binary masks`` over a fold's episodes and score them.

    ``novel`` overrides the fold's classes; ``dataset`` names the fold definition when the folder's
    ``meta.json`` name is not one (e.g. ``"pascal-5i"``). Masks must be at each label's size.
    Returns (and writes to ``json_out``) ``{"method", "dataset", "split", "num_episodes", "metrics":
    {"mIoU", "FB-IoU", ...}, "per_class", "protocol", "timing"}``.
    """
    from diffuseg.eval.runner import load_meta

    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    name = dataset or str(meta.get("name", data_dir.name))
    custom = novel is not None
    if novel is None:
        if fold is None:
            raise ValueError("give a fold or the novel class names")
        novel = fold_classes(name, fold)
    pixels = default_min_pixels(name) if min_pixels is None else int(min_pixels)
    index = scan_labels(data_dir, split, meta["classes"], progress=progress)
    episodes = build_episodes(index, novel, num_episodes, seed, pixels)
    meter = EpisodeMeter(novel)
    started = time.perf_counter()
    bar = tqdm(total=len(episodes), desc="episodes", disable=not progress)
    for batch in _batches(episodes, data_dir, split, batch_size):
        images = [b[1] for b in batch]
        masks = predict(images, [e.class_name for e, _, _ in batch])
        for (ep, _, label), mask in zip(batch, masks, strict=True):
            meter.update(np.asarray(mask), binary_target(label, ep.class_id), ep.class_name)
        bar.update(len(batch))
    bar.close()
    elapsed = time.perf_counter() - started
    report = {
        "method": method,
        "dataset": str(meta.get("name", data_dir.name)),
        "split": split,
        "num_episodes": len(episodes),
        **meter.result(),
        "protocol": {
            "episodic": True,
            "folds": "custom" if custom else episode_dataset_name(name),
            "fold": None if custom else fold,
            "novel_classes": list(novel),
            "seed": seed,
            "min_pixels": pixels,
            "episodes": [[e.image_id, e.class_name] for e in episodes],
            **(protocol or {}),
        },
        "timing": {"seconds_per_episode": elapsed / len(episodes)},
    }
    if json_out is not None:
        write_json(json_out, report)
    return report


def _batches(episodes: list[Episode], data_dir: Path, split: str, batch_size: int):
    """Consecutive episodes with images of one size, loaded lazily (an image is read once per run)."""
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    batch: list[tuple[Episode, np.ndarray, np.ndarray]] = []
    for ep in episodes:
        if ep.image_id not in cache:
            if len(cache) > 4 * batch_size:
                cache.clear()
            cache[ep.image_id] = (
                read_image(_image_path(data_dir, split, ep.image_id)),
                read_label(data_dir / "ann_dir" / split / f"{ep.image_id}.png"),
            )
        image, label = cache[ep.image_id]
        if batch and (len(batch) == batch_size or batch[0][1].shape != image.shape):
            yield batch
            batch = []
        batch.append((ep, image, label))
    if batch:
        yield batch


def summarize_folds(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-fold and mean mIoU / FB-IoU of several :func:`evaluate_episodes` reports."""
    rows = [
        {"fold": r["protocol"].get("fold"), "mIoU": r["metrics"]["mIoU"], "FB-IoU": r["metrics"]["FB-IoU"]}
        for r in reports
    ]
    return {
        "folds": rows,
        "mean": {
            "mIoU": float(np.mean([r["mIoU"] for r in rows])),
            "FB-IoU": float(np.mean([r["FB-IoU"] for r in rows])),
        },
    }
