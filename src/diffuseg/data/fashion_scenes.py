"""FashionScenes: the embedded, offline segmentation benchmark.

Each scene pastes 1-3 Fashion-MNIST items (real product photos, scaled, possibly overlapping) on a
random crop of a photo or texture bundled with scikit-image / scikit-learn, with exact masks.

Why the appearance mix: with flat saturated tints, colour K-means segments the items as well as a
diffusion model does (``shared/reference/FEASIBILITY.md``), so the benchmark could not show what
shape understanding adds. Items therefore take their colour from one of three styles, drawn per
item with :attr:`FashionScenesConfig.style_probs`:

* ``palette``: a colour sampled from the scene's own background, so item and background colours
  overlap by construction;
* ``texture``: a patch of another photo, modulated by the item's Fashion-MNIST shading;
* ``flat``: a random flat colour (the easy case, kept so the set is not uniformly hard).

Every style is multiplied by the item's own (normalised) Fashion-MNIST intensity so its shape and
interior detail stay visible to a human and to a model that looks at structure.

Determinism: scene ``i`` of split ``s`` draws from ``SeedSequence([seed, split_code, i])``, so a
scene does not depend on how many others are generated, and files are byte-identical per seed.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from diffuseg.data.fashion_mnist import FASHION_MNIST_LABELS, FashionMNISTSplit, load_fashion_mnist
from diffuseg.io import default_palette, write_json

logger = logging.getLogger(__name__)

FASHION_SCENES_CLASSES: tuple[str, ...] = ("background", *FASHION_MNIST_LABELS)
"""Class names by id: 0 background, 1 t-shirt, ..., 10 ankle boot (id = Fashion-MNIST label + 1)."""

FASHION_SCENES_UNSEEN: tuple[str, ...] = ("sandal", "coat")
"""Default unseen classes for zero-shot protocols."""

FASHION_SCENES_COARSE_GROUPS: dict[str, tuple[str, ...]] = {
    "background": ("background",),
    "tops": ("t-shirt", "pullover", "coat", "shirt"),
    "trouser": ("trouser",),
    "dress": ("dress",),
    "footwear": ("sandal", "sneaker", "ankle boot"),
    "bag": ("bag",),
}
"""Coarse groups used for a shape-family mIoU next to the fine classes."""

IGNORE_INDEX = 255
SPLIT_CODES = {"train": 0, "val": 1}
_FMNIST_SPLIT = {"train": "train", "val": "test"}

# Background sources: loader name -> phrase used in captions ("... on <phrase>").
# Only the photos/textures that ship inside the wheels (some skimage loaders need pooch and a
# download, which must never happen here). Synthetic images (checkerboard, colorwheel, blobs) and
# duplicates (chelsea == cat) are left out.
SKIMAGE_BACKGROUNDS: dict[str, str] = {
    "astronaut": "a portrait",
    "brick": "bricks",
    "camera": "a lawn",
    "cat": "cat fur",
    "cell": "cells",
    "clock": "a clock",
    "coffee": "a coffee table",
    "coins": "coins",
    "grass": "grass",
    "gravel": "gravel",
    "hubble_deep_field": "a starfield",
    "immunohistochemistry": "stained tissue",
    "moon": "moon rock",
    "page": "paper",
    "rocket": "a launch pad",
    "stereo_motorcycle": "a motorcycle",
    "text": "text",
}
SKLEARN_BACKGROUNDS: dict[str, str] = {"china.jpg": "a temple", "flower.jpg": "flowers"}

# Small named-colour table for captions (sRGB). Nearest in CIELAB wins.
COLOUR_NAMES: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "grey": (128, 128, 128),
    "white": (240, 240, 240),
    "red": (200, 30, 35),
    "orange": (235, 130, 30),
    "yellow": (230, 210, 50),
    "olive": (120, 120, 40),
    "green": (50, 150, 60),
    "teal": (30, 135, 135),
    "blue": (45, 85, 200),
    "navy": (25, 35, 95),
    "purple": (120, 55, 160),
    "pink": (235, 150, 185),
    "brown": (115, 70, 35),
    "beige": (215, 195, 155),
}


@dataclass(frozen=True)
class FashionScenesConfig:
    """Generation parameters; recorded verbatim in meta.json so a dataset documents itself.

    Sizes are fractions of the scene side so nothing depends on 64 px.
    """

    size: int = 64
    min_items: int = 1
    max_items: int = 3
    item_scale: tuple[float, float] = (18 / 64, 48 / 64)
    """Item side (of its 28x28 frame) as a fraction of the scene side: 18-48 px at 64."""
    item_threshold: int = 10
    """Fashion-MNIST intensity (0-255, after resizing) above which a pixel belongs to the item."""
    max_frame_fill: float = 0.85
    """Fashion-MNIST frames whose filled mask covers more than this are photos, not items: skipped."""
    min_visible_frac: float = 0.5
    """Each item keeps at least this fraction of its own mask visible after occlusion..."""
    min_visible_area: float = 0.01
    """...and at least this fraction of the scene's pixels (41 px at 64)."""
    max_tries: int = 30
    style_probs: dict[str, float] = field(
        default_factory=lambda: {"palette": 0.4, "texture": 0.4, "flat": 0.2}
    )
    shading_floor: float = 0.35
    """Item brightness = colour * (floor + (1 - floor) * normalised FMNIST intensity)."""
    texture_from_background_prob: float = 0.0
    """Chance that a textured item takes its patch from the scene's own source photo."""
    bg_crop_scale: tuple[float, float] = (0.25, 1.0)
    """Crop side as a fraction of the (cached) source's short side."""
    bg_cache_side: int = 4
    """Sources are cached with their short side at this multiple of ``size`` (speed)."""
    jitter: float = 0.15
    """Brightness/contrast/saturation factors are drawn from 1 +- jitter."""
    grey_tint_prob: float = 0.7
    """Chance of tinting a greyscale photo (background or texture patch) with a random colour, so
    half the pool being greyscale does not make most items and captions grey."""
    grey_tint_min: float = 0.4
    """Tint channels are drawn from [grey_tint_min, 1] (lower = stronger colours)."""

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"size={self.size} is too small; FashionScenes needs at least 16 px")
        if not 1 <= self.min_items <= self.max_items:
            raise ValueError(f"need 1 <= min_items <= max_items, got {self.min_items}, {self.max_items}")
        lo, hi = self.item_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"item_scale must satisfy 0 < lo <= hi <= 1, got {self.item_scale}")
        unknown = set(self.style_probs) - {"palette", "texture", "flat"}
        if unknown or not self.style_probs or min(self.style_probs.values()) < 0:
            raise ValueError(
                f"style_probs {self.style_probs}: keys must be palette/texture/flat with weights >= 0"
            )
        if sum(self.style_probs.values()) <= 0:
            raise ValueError(f"style_probs {self.style_probs} sum to zero")

    def to_dict(self) -> dict:
        """JSON-friendly form (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclass
class Scene:
    """One generated scene.

    ``image`` (S,S,3) uint8; ``label`` (S,S) uint8 class ids; ``instances`` (S,S) uint8 with item
    ``k`` (1-based, paste order) where it is visible; ``items`` one dict per item (class, id, style,
    box [x, y, side], fmnist_index, area of its full mask, visible pixels, colour name).
    """

    image: np.ndarray
    label: np.ndarray
    caption: str
    items: list[dict]
    background: str
    instances: np.ndarray


@dataclass(frozen=True)
class _Source:
    name: str
    phrase: str
    pixels: np.ndarray  # (H, W, 3) uint8, short side ~ bg_cache_side * size
    grey: bool


def _load_skimage(name: str) -> np.ndarray:
    import skimage.data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle returns (left, right, disparity)
        img = img[0]
    return np.asarray(img)


def _as_rgb_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8:
        img = np.clip(img.astype(np.float64) * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


def _downscale(img: np.ndarray, short_side: int) -> np.ndarray:
    h, w = img.shape[:2]
    if min(h, w) <= short_side:
        return img
    f = short_side / min(h, w)
    size = (max(short_side, round(w * f)), max(short_side, round(h * f)))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR))


@functools.lru_cache(maxsize=4)
def load_background_sources(short_side: int) -> tuple[_Source, ...]:
    """Load and cache every bundled photo that works offline, downscaled for fast cropping.

    Loaders that fail (missing optional data, a pooch download) are skipped and logged, so a
    future scikit-image that drops an image changes the pool but never breaks generation.
    """
    raw: list[tuple[str, str, np.ndarray]] = []
    for name, phrase in SKIMAGE_BACKGROUNDS.items():
        try:
            raw.append((name, phrase, _load_skimage(name)))
        except Exception as e:  # any loader failure just removes one source
            logger.info("skipping skimage.data.%s as a background (%s)", name, e)
    try:
        from sklearn.datasets import load_sample_images

        samples = load_sample_images()
        for path, img in zip(samples.filenames, samples.images, strict=True):
            base = os.path.basename(path)
            if base in SKLEARN_BACKGROUNDS:
                raw.append((Path(base).stem, SKLEARN_BACKGROUNDS[base], img))
    except Exception as e:  # the pool simply lacks these two photos
        logger.info("skipping scikit-learn sample images as backgrounds (%s)", e)
    if not raw:
        raise RuntimeError("no background images could be loaded from scikit-image or scikit-learn")
    sources = []
    for name, phrase, img in raw:
        rgb = _downscale(_as_rgb_uint8(img), short_side)
        grey = bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))
        rgb.setflags(write=False)
        sources.append(_Source(name=name, phrase=phrase, pixels=rgb, grey=grey))
    return tuple(sources)


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (..., 3) in 0-255 to CIELAB (D65); enough for nearest-colour naming."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_COLOUR_LAB = _srgb_to_lab(np.array(list(COLOUR_NAMES.values()), dtype=np.float64))
_COLOUR_KEYS = tuple(COLOUR_NAMES)


def colour_name(rgb: np.ndarray | tuple[float, float, float]) -> str:
    """Name the colour nearest (in CIELAB) to ``rgb`` from :data:`COLOUR_NAMES`."""
    lab = _srgb_to_lab(np.asarray(rgb, dtype=np.float64))
    return _COLOUR_KEYS[int(np.argmin(((_COLOUR_LAB - lab) ** 2).sum(-1)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(items: list[tuple[str, str]], background: str) -> str:
    """``[("red", "sandal"), ("blue", "bag")], "grass"`` -> "a red sandal and a blue bag on grass"."""
    if not items:
        raise ValueError("a caption needs at least one (colour, class) item")
    parts = [f"{_article(c)} {c} {n}" for c, n in items]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{body} on {background}"


def _frame_fill(images: np.ndarray, threshold: int, limit: float) -> np.ndarray:
    """Fraction of each 28x28 frame covered by its hole-filled mask, exact where it can exceed ``limit``.

    A filled hole lies in a row and a column that both hold mask pixels, so (occupied rows x
    occupied columns) bounds the filled area; only frames whose bound passes ``limit`` (~14%) pay
    for ``binary_fill_holes``. This keeps start-up at a fraction of a second for 60k frames.
    """
    mask = images > threshold
    fill = mask.mean(axis=(1, 2))
    bound = mask.any(axis=2).sum(axis=1) * mask.any(axis=1).sum(axis=1) / mask[0].size
    for i in np.flatnonzero(bound > limit):
        fill[i] = ndimage.binary_fill_holes(mask[i]).mean()
    return fill


@functools.lru_cache(maxsize=8)
def _cached_frame_fill(fmnist_split: str, directory: str | None, threshold: int, limit: float) -> np.ndarray:
    """Frame fills are the same for every generator over the same files: compute them once."""
    fill = _frame_fill(load_fashion_mnist(fmnist_split, directory).images, threshold, limit)
    fill.setflags(write=False)
    return fill


class FashionScenesGenerator:
    """Renders scenes in memory; :func:`generate_fashion_scenes` writes them to disk.

    Sources (Fashion-MNIST splits and background photos) are loaded once and shared by all scenes.
    """

    def __init__(
        self, config: FashionScenesConfig | None = None, seed: int = 0, fashion_mnist: str | None = None
    ) -> None:
        self.config = config or FashionScenesConfig()
        self.seed = int(seed)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.fashion_mnist = fashion_mnist
        self.sources = load_background_sources(self.config.bg_cache_side * self.config.size)
        self._fmnist: dict[str, tuple[FashionMNISTSplit, list[np.ndarray]]] = {}
        self._frame_fill: dict[str, np.ndarray] = {}
        names = list(self.config.style_probs)
        weights = np.array([self.config.style_probs[n] for n in names], dtype=np.float64)
        self._styles = names
        self._style_p = weights / weights.sum()

    def _items_for(self, split: str) -> tuple[FashionMNISTSplit, list[np.ndarray]]:
        if split not in SPLIT_CODES:
            raise ValueError(f"unknown split {split!r}; FashionScenes has 'train' and 'val'")
        if split not in self._fmnist:
            data = load_fashion_mnist(_FMNIST_SPLIT[split], self.fashion_mnist)
            self._fmnist[split] = (data, data.indices_by_label())
            self._frame_fill[split] = _cached_frame_fill(
                _FMNIST_SPLIT[split],
                self.fashion_mnist,
                self.config.item_threshold,
                self.config.max_frame_fill,
            )
        return self._fmnist[split]

    def rng_for(self, split: str, index: int) -> np.random.Generator:
        """The scene's own RNG: a function of (seed, split, index) only."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, SPLIT_CODES[split], int(index)]))

    # -- background -------------------------------------------------------------------------------
    def _crop(self, rng: np.random.Generator, src: _Source, side: int) -> np.ndarray:
        """Random square crop (random scale, horizontal flip) resized to ``side``, float32 0-255."""
        h, w = src.pixels.shape[:2]
        lo, hi = self.config.bg_crop_scale
        c = max(4, int(round(rng.uniform(lo, hi) * min(h, w))))
        y = int(rng.integers(0, h - c + 1))
        x = int(rng.integers(0, w - c + 1))
        patch = Image.fromarray(src.pixels[y : y + c, x : x + c]).resize(
            (side, side), Image.Resampling.BILINEAR
        )
        arr = np.asarray(patch, dtype=np.float32)
        return arr[:, ::-1] if rng.random() < 0.5 else arr

    def _jitter(self, rng: np.random.Generator, img: np.ndarray, grey: bool) -> np.ndarray:
        """Mild brightness/contrast/saturation jitter; optional tint of greyscale photos."""
        j = self.config.jitter
        b, c, s = rng.uniform(1 - j, 1 + j, size=3)
        img = img * b
        img = (img - img.mean()) * c + img.mean()
        lum = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        img = (img - lum[..., None]) * s + lum[..., None]
        if grey and rng.random() < self.config.grey_tint_prob:
            img = self._tint(rng, img)
        return img

    def _tint(self, rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
        tint = rng.uniform(self.config.grey_tint_min, 1.0, size=3).astype(np.float32)
        return img * (tint / tint.mean())

    # -- items ------------------------------------------------------------------------------------
    def _item_shape(
        self, rng: np.random.Generator, split: str
    ) -> tuple[int, int, np.ndarray, np.ndarray] | None:
        """Draw a class (uniformly) and one of its images, resize it.

        Returns (label, fmnist index, mask, shading), or None for a frame that is a photo, not an item.
        """
        data, by_label = self._items_for(split)
        present = [k for k, ix in enumerate(by_label) if len(ix)]
        label = present[int(rng.integers(0, len(present)))]
        idx = int(by_label[label][rng.integers(0, len(by_label[label]))])
        if self._frame_fill[split][idx] > self.config.max_frame_fill:
            return None
        lo, hi = self.config.item_scale
        side = max(4, int(round(rng.uniform(lo, hi) * self.config.size)))
        inten = np.asarray(
            Image.fromarray(data.images[idx]).resize((side, side), Image.Resampling.BILINEAR),
            dtype=np.float32,
        )
        mask = ndimage.binary_fill_holes(inten > self.config.item_threshold)
        peak = float(inten[mask].max()) if mask.any() else 1.0
        floor = self.config.shading_floor
        shading = floor + (1 - floor) * np.clip(inten / peak, 0, 1)
        return label, idx, mask, shading

    def _item_colour(
        self, rng: np.random.Generator, style: str, bg: np.ndarray, bg_src: int, side: int
    ) -> np.ndarray:
        """Base appearance of an item (side, side, 3) before shading, per style."""
        if style == "palette":
            y, x = rng.integers(0, bg.shape[0], size=2)
            return np.broadcast_to(bg[y, x], (side, side, 3))
        if style == "texture":
            n = len(self.sources)
            same = n == 1 or rng.random() < self.config.texture_from_background_prob
            k = bg_src if same else int((bg_src + rng.integers(1, n)) % n)
            patch = self._crop(rng, self.sources[k], side)
            if self.sources[k].grey and rng.random() < self.config.grey_tint_prob:
                patch = self._tint(rng, patch)
            return patch
        hsv = np.array([rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.35, 1.0)])
        rgb = np.asarray(Image.fromarray((hsv * 255).astype(np.uint8)[None, None], "HSV").convert("RGB"))
        return np.broadcast_to(rgb[0, 0].astype(np.float32), (side, side, 3))

    def _visible_ok(self, inst: np.ndarray, areas: list[int]) -> bool:
        counts = np.bincount(inst.ravel(), minlength=len(areas) + 1)[1:]
        min_px = self.config.min_visible_area * inst.size
        return all(
            c >= max(min_px, self.config.min_visible_frac * a) for c, a in zip(counts, areas, strict=True)
        )

    def scene(self, split: str, index: int) -> Scene:
        """Render scene ``index`` of ``split`` (``"train"`` or ``"val"``) deterministically."""
        cfg = self.config
        self._items_for(split)
        rng = self.rng_for(split, index)
        size = cfg.size
        bg_src = int(rng.integers(0, len(self.sources)))
        src = self.sources[bg_src]
        bg = np.clip(self._jitter(rng, self._crop(rng, src, size), src.grey), 0, 255)
        canvas = bg.copy()
        label = np.zeros((size, size), np.uint8)
        inst = np.zeros((size, size), np.uint8)
        areas: list[int] = []
        items: list[dict] = []
        n_items = int(rng.integers(cfg.min_items, cfg.max_items + 1))
        for _ in range(n_items):
            placed = self._place_item(rng, split, bg, bg_src, canvas, label, inst, areas)
            if placed is not None:
                items.append(placed)
        if not items:
            raise ValueError(
                f"could not place any item in {cfg.max_tries} tries (scene {split}/{index}); "
                f"min_visible_area={cfg.min_visible_area} is too large for item_scale={cfg.item_scale}"
            )
        image = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
        named = []
        for k, it in enumerate(items, start=1):
            it["colour"] = colour_name(image[inst == k].mean(axis=0))
            it["visible"] = int((inst == k).sum())
            named.append((it["colour"], it["class"]))
        return Scene(image, label, make_caption(named, src.phrase), items, src.name, inst)

    def _place_item(
        self,
        rng: np.random.Generator,
        split: str,
        bg: np.ndarray,
        bg_src: int,
        canvas: np.ndarray,
        label: np.ndarray,
        inst: np.ndarray,
        areas: list[int],
    ) -> dict | None:
        """Try to paste one more item so every item keeps its minimum visible area."""
        cfg, size = self.config, self.config.size
        k = len(areas) + 1
        for _ in range(cfg.max_tries):
            shape = self._item_shape(rng, split)
            if shape is None:
                continue
            cls, idx, mask, shading = shape
            side = mask.shape[0]
            y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            trial = inst.copy()
            trial[y : y + side, x : x + side][mask] = k
            if not self._visible_ok(trial, [*areas, int(mask.sum())]):
                continue
            style = self._styles[int(rng.choice(len(self._styles), p=self._style_p))]
            base = self._item_colour(rng, style, bg, bg_src, side)
            appearance = base * (shading / shading[mask].mean())[..., None]
            canvas[y : y + side, x : x + side][mask] = appearance[mask]
            label[y : y + side, x : x + side][mask] = cls + 1
            inst[:] = trial
            areas.append(int(mask.sum()))
            return {
                "class": FASHION_SCENES_CLASSES[cls + 1],
                "id": cls + 1,
                "style": style,
                "box": [x, y, side],
                "fmnist_index": idx,
                "area": int(mask.sum()),
            }
        return None


def fashion_scenes_meta(config: FashionScenesConfig, extra: dict | None = None) -> dict:
    """meta.json content of a FashionScenes folder (DESIGN.md data contract + generation record)."""
    meta = {
        "name": "FashionScenes",
        "classes": list(FASHION_SCENES_CLASSES),
        "palette": default_palette(len(FASHION_SCENES_CLASSES)),
        "unseen": list(FASHION_SCENES_UNSEEN),
        "ignore_index": IGNORE_INDEX,
        "coarse_groups": {k: list(v) for k, v in FASHION_SCENES_COARSE_GROUPS.items()},
        "generator": {"config": config.to_dict()},
    }
    if extra:
        meta["generator"].update(extra)
    return meta


def _png_bytes(arr: np.ndarray) -> bytes:
    """Encode a PNG in memory. Level 1: at 64 px the files are as small as at level 6, 3x faster."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _write_split(
    gen: FashionScenesGenerator, root: Path, split: str, count: int, progress: bool
) -> list[dict]:
    img_dir, ann_dir = root / "img_dir" / split, root / "ann_dir" / split
    img_dir.mkdir(parents=True)
    ann_dir.mkdir(parents=True)
    captions = []
    for i in tqdm(range(count), desc=f"FashionScenes {split}", disable=not progress, unit="scene"):
        sc = gen.scene(split, i)
        sid = f"{i:06d}"
        (img_dir / f"{sid}.png").write_bytes(_png_bytes(sc.image))
        (ann_dir / f"{sid}.png").write_bytes(_png_bytes(sc.label))
        captions.append({"id": sid, "caption": sc.caption, "background": sc.background, "items": sc.items})
    cap_dir = root / "captions"
    cap_dir.mkdir(exist_ok=True)
    with open(cap_dir / f"{split}.jsonl", "w") as f:
        for c in captions:
            f.write(json.dumps(c) + "\n")
    return captions


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_tree_readable(root: Path) -> None:
    """Give a finished temp tree the permissions of a normal ``mkdir``/``open``.

    ``mkdtemp``/``mkstemp`` create 0700/0600 entries; a dataset shared on a cluster must not stay
    private to its creator.
    """
    mask = _current_umask()
    os.chmod(root, 0o777 & ~mask)
    for p in root.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished temp folder into place; the old one is removed only afterwards."""
    if out.exists():
        if not overwrite:
            shutil.rmtree(tmp)
            raise FileExistsError(f"{out} already exists and is not empty; pass overwrite=True (--overwrite)")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def generate_fashion_scenes(
    out_dir: str | os.PathLike,
    num_train: int,
    num_val: int,
    seed: int = 0,
    size: int = 64,
    fashion_mnist: str | None = None,
    progress: bool = True,
    config: FashionScenesConfig | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a FashionScenes dataset to ``out_dir`` in the DESIGN.md layout and return its path.

    The dataset is built in a temporary sibling folder and renamed into place at the end: an
    interrupted run never leaves a half-written dataset that looks complete (per-file fsync would
    cost more than generating the scenes). An existing non-empty ``out_dir`` is refused unless
    ``overwrite``; an existing empty folder is replaced.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train}, {num_val}")
    if num_train + num_val == 0:
        raise ValueError("nothing to generate: num_train and num_val are both 0")
    cfg = dataclasses.replace(config or FashionScenesConfig(), size=size)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass overwrite=True (--overwrite)")
    gen = FashionScenesGenerator(cfg, seed=seed, fashion_mnist=fashion_mnist)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        t0 = time.perf_counter()
        for split, n in (("train", num_train), ("val", num_val)):
            _write_split(gen, tmp, split, n, progress)
        elapsed = time.perf_counter() - t0
        extra = {
            "seed": int(seed),
            "num_train": int(num_train),
            "num_val": int(num_val),
            "fashion_mnist_splits": dict(_FMNIST_SPLIT),
            "backgrounds": {s.name: s.phrase for s in gen.sources},
        }
        write_json(tmp / "meta.json", fashion_scenes_meta(cfg, extra))
        make_tree_readable(tmp)
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "wrote %d+%d FashionScenes to %s in %.1f s (%.0f scenes/s)",
        num_train,
        num_val,
        out,
        elapsed,
        (num_train + num_val) / max(elapsed, 1e-9),
    )
    return out


def save_preview(
    dataset_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    split: str = "train",
    num: int = 8,
    per_row: int = 4,
    scale: int = 3,
) -> Path:
    """Save a grid of (image | coloured ground truth) pairs of a FashionScenes folder, for docs.

    Reads through :class:`~diffuseg.data.segfolder.SegFolder`, so the preview also checks that the
    folder is readable in the standard layout.
    """
    from diffuseg.data.segfolder import SegFolder
    from diffuseg.viz import colorize, image_grid, save_figure, upscale_nearest

    ds = SegFolder(dataset_dir, split)
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    tiles = []
    for i in range(min(num, len(ds))):
        sample = ds[i]
        tiles.append(upscale_nearest(sample["image"], scale))
        tiles.append(upscale_nearest(colorize(sample["label"], ds.palette), scale))
    path = save_figure(out_path, image_grid(tiles, nrow=2 * per_row, pad=2))
    os.chmod(path, 0o666 & ~_current_umask())  # atomic_write's mkstemp leaves 0600
    return path


def render_scenes(
    split: str, count: int, seed: int = 0, config: FashionScenesConfig | None = None, **kwargs
) -> list[Scene]:
    """Render ``count`` scenes in memory (benchmarks and tests; nothing is written)."""
    gen = FashionScenesGenerator(config, seed=seed, **kwargs)
    return [gen.scene(split, i) for i in range(count)]


__all__ = [
    "FASHION_SCENES_CLASSES",
    "FASHION_SCENES_COARSE_GROUPS",
    "FASHION_SCENES_UNSEEN",
    "FashionScenesConfig",
    "FashionScenesGenerator",
    "Scene",
    "colour_name",
    "fashion_scenes_meta",
    "generate_fashion_scenes",
    "load_background_sources",
    "make_caption",
    "render_scenes",
    "save_preview",
]
