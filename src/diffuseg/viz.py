"""Pictures of segmentations: colour maps, overlays with legends, comparison figures and plots.

Everything returns plain ``(H, W, 3)`` uint8 RGB arrays (save them with :func:`save_figure`), so
figures can be tested, tiled with :func:`image_grid` and written atomically like any other output.
Our benchmark images are 64 px, too small to read, so the display helpers upscale them with
nearest-neighbour (never blurring labels) to at least ``min_size`` pixels before drawing text.
Curves (loss, trade-offs) go through matplotlib's Agg backend without touching pyplot state.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from diffuseg.io import atomic_write, write_image

logger = logging.getLogger(__name__)

#: Colour of ``ignore_index`` pixels in colour maps: PASCAL VOC's cream "void" colour, so that
#: ignored pixels never look like the (often black) background class.
IGNORE_COLOR: tuple[int, int, int] = (224, 224, 192)
_WHITE = (255, 255, 255)
_TEXT = (20, 20, 20)

Palette = Sequence[Sequence[int]] | np.ndarray


# --- array helpers ---------------------------------------------------------------------------------


def _palette_array(palette: Palette) -> np.ndarray:
    pal = np.asarray(palette)
    if pal.ndim != 2 or pal.shape[1] != 3 or len(pal) == 0:
        raise ValueError(f"palette must be a non-empty list of [r, g, b] colours, got shape {pal.shape}")
    if pal.min() < 0 or pal.max() > 255:
        raise ValueError("palette colours must be in 0..255")
    return pal.astype(np.uint8)


def _as_labels(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) map of class ids, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class ids, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """Accept uint8 RGB/RGBA/greyscale or float images in [0, 1]; return uint8 RGB."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB or (H, W) greyscale, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (np.nanmin(arr) < 0 or np.nanmax(arr) > 1):
            raise ValueError("float images must be in [0, 1]; convert to uint8 0..255 otherwise")
        return np.clip(np.nan_to_num(arr) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    raise ValueError(f"image must be uint8 or float in [0, 1], got dtype {arr.dtype}")


def _same_size(image: np.ndarray, labels: np.ndarray, what: str = "labels") -> None:
    if image.shape[:2] != labels.shape[:2]:
        raise ValueError(
            f"image is {image.shape[0]}x{image.shape[1]} but {what} is {labels.shape[0]}x{labels.shape[1]}; "
            "resize the label map with nearest-neighbour first"
        )


def present_classes(*label_maps: np.ndarray, ignore_index: int | None = 255) -> list[int]:
    """Sorted class ids occurring in any of the label maps, ``ignore_index`` excluded."""
    ids: set[int] = set()
    for lab in label_maps:
        if lab is not None:
            ids.update(int(v) for v in np.unique(np.asarray(lab)))
    if ignore_index is not None:
        ids.discard(ignore_index)
    return sorted(ids)


def upscale_nearest(array: np.ndarray, factor: int) -> np.ndarray:
    """Enlarge an image or label map by an integer factor, repeating pixels (no interpolation)."""
    if factor < 1:
        raise ValueError(f"upscale factor must be >= 1, got {factor}")
    if factor == 1:
        return np.asarray(array)
    return np.repeat(np.repeat(np.asarray(array), factor, axis=0), factor, axis=1)


def display_factor(height: int, width: int, min_size: int = 256) -> int:
    """Smallest integer zoom that makes the shorter side at least ``min_size`` pixels."""
    return max(1, math.ceil(min_size / max(1, min(height, width))))


# --- colour maps and overlays ----------------------------------------------------------------------


def colorize(
    labels: np.ndarray,
    palette: Palette,
    ignore_index: int | None = 255,
    ignore_color: Sequence[int] = IGNORE_COLOR,
) -> np.ndarray:
    """Map class ids to palette colours: ``(H, W)`` ids → ``(H, W, 3)`` uint8 RGB.

    ``ignore_index`` pixels get ``ignore_color``. Ids without a palette colour raise
    ``ValueError`` rather than wrapping around, which would silently give two classes one colour.
    """
    lab = _as_labels(labels)
    pal = _palette_array(palette)
    ignore = lab == ignore_index if ignore_index is not None else np.zeros(lab.shape, bool)
    valid = lab[~ignore]
    if valid.size and (valid.min() < 0 or valid.max() >= len(pal)):
        bad = sorted({int(v) for v in np.unique(valid) if v < 0 or v >= len(pal)})
        raise ValueError(
            f"label ids {bad[:10]} have no colour in a palette of {len(pal)}; "
            "pass a longer palette, e.g. diffuseg.io.default_palette(n)"
        )
    out = pal[np.where(ignore, 0, lab)]
    out[ignore] = np.asarray(ignore_color, dtype=np.uint8)
    return out


def label_boundaries(labels: np.ndarray, ignore_index: int | None = 255) -> np.ndarray:
    """Boolean mask of labelled pixels whose 4-neighbourhood contains a different id (inner edges)."""
    lab = _as_labels(labels)
    edge = np.zeros(lab.shape, dtype=bool)
    diff_v = lab[1:, :] != lab[:-1, :]
    diff_h = lab[:, 1:] != lab[:, :-1]
    edge[1:, :] |= diff_v
    edge[:-1, :] |= diff_v
    edge[:, 1:] |= diff_h
    edge[:, :-1] |= diff_h
    if ignore_index is not None:
        edge &= lab != ignore_index
    return edge


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    palette: Palette,
    alpha: float = 0.5,
    ignore_index: int | None = 255,
    boundaries: bool = True,
) -> np.ndarray:
    """Blend class colours over an image; ``ignore_index`` pixels keep the image's own colour.

    With ``boundaries`` the inner edge pixels of each segment are drawn in the solid class colour,
    so segments stay distinguishable where the blended colours are similar to the image.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = _as_rgb(image)
    lab = _as_labels(labels)
    _same_size(img, lab)
    colours = colorize(lab, palette, ignore_index=ignore_index).astype(np.float32)
    keep = (lab == ignore_index) if ignore_index is not None else np.zeros(lab.shape, bool)
    blended = img.astype(np.float32) * (1.0 - alpha) + colours * alpha
    out = np.where(keep[..., None], img, np.clip(blended + 0.5, 0, 255).astype(np.uint8))
    if boundaries:
        edge = label_boundaries(lab, ignore_index)
        out[edge] = colours[edge].astype(np.uint8)
    return out


# --- text and legends ------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled scalable font; the bitmap fallback when FreeType is unavailable."""
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ImportError, TypeError):
        logger.debug("scalable default font unavailable; using Pillow's bitmap font")
        return ImageFont.load_default()


def _text_size(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> tuple[int, int]:
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom - top)


def draw_legend(
    class_names: Sequence[str],
    palette: Palette,
    class_ids: Sequence[int] | None = None,
    font_size: int = 14,
    max_height: int | None = None,
    include_ignore: bool = False,
) -> np.ndarray:
    """Draw a legend (colour swatch + name per row) as a uint8 RGB image.

    Lists ``class_ids`` (default: all classes) in the given order, plus an "ignore" entry when
    ``include_ignore``. Rows flow into further columns when ``max_height`` would be exceeded, so
    a legend never gets taller than the picture it sits beside.
    """
    pal = _palette_array(palette)
    ids = list(range(len(class_names))) if class_ids is None else [int(i) for i in class_ids]
    bad = [i for i in ids if not 0 <= i < min(len(class_names), len(pal))]
    if bad:
        raise ValueError(
            f"class ids {bad} have no name or colour ({len(class_names)} names, {len(pal)} colours)"
        )
    entries = [(tuple(int(c) for c in pal[i]), str(class_names[i])) for i in ids]
    if include_ignore:
        entries.append((IGNORE_COLOR, "ignore"))
    font = _font(font_size)
    pad, gap, swatch = 6, 6, font_size
    row_h = max(swatch, _text_size("Ag", font)[1]) + 6
    if not entries:
        return np.full((row_h + 2 * pad, 2 * pad, 3), 255, dtype=np.uint8)
    per_col = len(entries)
    if max_height is not None:
        per_col = max(1, min(per_col, (max_height - 2 * pad) // row_h))
    columns = [entries[i : i + per_col] for i in range(0, len(entries), per_col)]
    col_w = [swatch + gap + max(_text_size(t, font)[0] for _, t in col) for col in columns]
    width = 2 * pad + sum(col_w) + 2 * pad * (len(columns) - 1)
    height = 2 * pad + row_h * per_col
    canvas = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(canvas)
    x = pad
    for col, w in zip(columns, col_w, strict=True):
        for r, (colour, text) in enumerate(col):
            y = pad + r * row_h + (row_h - swatch) // 2
            draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=colour, outline=(90, 90, 90))
            draw.text(
                (x + swatch + gap, pad + r * row_h + row_h // 2), text, fill=_TEXT, font=font, anchor="lm"
            )
        x += w + 2 * pad
    return np.asarray(canvas)


def _hstack(parts: Sequence[np.ndarray], gap: int = 8) -> np.ndarray:
    """Place images left to right, top-aligned, on white."""
    height = max(p.shape[0] for p in parts)
    width = sum(p.shape[1] for p in parts) + gap * (len(parts) - 1)
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    x = 0
    for p in parts:
        out[: p.shape[0], x : x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out


def overlay_with_legend(
    image: np.ndarray,
    labels: np.ndarray,
    palette: Palette,
    class_names: Sequence[str],
    alpha: float = 0.5,
    ignore_index: int | None = 255,
    boundaries: bool = True,
    min_size: int = 256,
    font_size: int = 14,
) -> np.ndarray:
    """An overlay, upscaled for display, with a legend of the classes present in ``labels`` only."""
    img, lab = _as_rgb(image), _as_labels(labels)
    _same_size(img, lab)
    k = display_factor(*lab.shape, min_size=min_size)
    big = overlay(upscale_nearest(img, k), upscale_nearest(lab, k), palette, alpha, ignore_index, boundaries)
    legend = draw_legend(
        class_names, palette, present_classes(lab, ignore_index=ignore_index), font_size, big.shape[0]
    )
    return _hstack([big, legend])


# --- comparison figure -----------------------------------------------------------------------------


def _titled(panel: np.ndarray, title: str, font_size: int) -> np.ndarray:
    font = _font(font_size)
    bar_h = _text_size("Ag", font)[1] + 10
    canvas = Image.new("RGB", (panel.shape[1], panel.shape[0] + bar_h), _WHITE)
    canvas.paste(Image.fromarray(panel), (0, bar_h))
    ImageDraw.Draw(canvas).text((panel.shape[1] // 2, bar_h // 2), title, fill=_TEXT, font=font, anchor="mm")
    return np.asarray(canvas)


def heatmap(values: np.ndarray, cmap: str = "viridis") -> tuple[np.ndarray, float, float]:
    """Colour a float map with a matplotlib colormap, min-max scaled; returns (rgb, vmin, vmax)."""
    from matplotlib import colormaps

    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"uncertainty must be a 2-D (H, W) map, got shape {v.shape}")
    finite = v[np.isfinite(v)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    scaled = np.nan_to_num((v - lo) / (hi - lo) if hi > lo else np.zeros_like(v))
    rgb = (colormaps[cmap](scaled)[..., :3] * 255.0 + 0.5).astype(np.uint8)
    return rgb, lo, hi


def side_by_side(
    image: np.ndarray,
    gt: np.ndarray | None,
    pred: np.ndarray,
    palette: Palette,
    class_names: Sequence[str] | None = None,
    titles: Sequence[str] = ("image", "ground truth", "prediction"),
    uncertainty: np.ndarray | None = None,
    ignore_index: int | None = 255,
    min_size: int = 192,
    font_size: int = 14,
) -> np.ndarray:
    """The image | ground truth | prediction [| uncertainty] figure, as uint8 RGB.

    Label maps are shown as flat colour maps (ignore pixels in :data:`IGNORE_COLOR`), upscaled to
    at least ``min_size`` px. ``gt=None`` drops that panel (and its title). The legend lists the
    classes present in ground truth or prediction; it is omitted when ``class_names`` is None
    (e.g. unsupervised segment ids). The uncertainty panel is min-max scaled; its title gives the range.
    """
    if len(titles) != 3:
        raise ValueError(f"titles must name the 3 panels (image, ground truth, prediction), got {titles!r}")
    img, pr = _as_rgb(image), _as_labels(pred, "pred")
    _same_size(img, pr, "pred")
    k = display_factor(*pr.shape, min_size=min_size)
    panels = [(upscale_nearest(img, k), titles[0])]
    maps = [pr]
    if gt is not None:
        g = _as_labels(gt, "gt")
        _same_size(img, g, "gt")
        panels.append((upscale_nearest(colorize(g, palette, ignore_index), k), titles[1]))
        maps.insert(0, g)
    panels.append((upscale_nearest(colorize(pr, palette, ignore_index), k), titles[2]))
    if uncertainty is not None:
        u = np.asarray(uncertainty)
        _same_size(img, u, "uncertainty")
        rgb, lo, hi = heatmap(u)
        panels.append((upscale_nearest(rgb, k), f"uncertainty [{lo:.2g}, {hi:.2g}]"))
    parts = [_titled(p, t, font_size) for p, t in panels]
    if class_names is not None:
        ids = present_classes(*maps, ignore_index=ignore_index)
        has_ignore = ignore_index is not None and any(bool((m == ignore_index).any()) for m in maps)
        parts.append(draw_legend(class_names, palette, ids, font_size, parts[0].shape[0], has_ignore))
    return _hstack(parts)


def image_grid(images: Sequence[np.ndarray], nrow: int = 8, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile images into a grid with ``nrow`` images per row (torchvision's convention).

    Images may differ in size: each cell is as large as the largest image, which sits top-left.
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    if nrow < 1 or pad < 0:
        raise ValueError(f"nrow must be >= 1 and pad >= 0, got nrow={nrow}, pad={pad}")
    rgb = [_as_rgb(im) for im in images]
    ch = max(im.shape[0] for im in rgb)
    cw = max(im.shape[1] for im in rgb)
    cols = min(nrow, len(rgb))
    rows = math.ceil(len(rgb) / cols)
    out = np.full((pad + rows * (ch + pad), pad + cols * (cw + pad), 3), pad_value, dtype=np.uint8)
    for i, im in enumerate(rgb):
        y = pad + (i // cols) * (ch + pad)
        x = pad + (i % cols) * (cw + pad)
        out[y : y + im.shape[0], x : x + im.shape[1]] = im
    return out


# --- files -----------------------------------------------------------------------------------------


def save_figure(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a uint8 RGB figure (PNG, or JPEG by suffix) atomically; returns the path."""
    arr = np.asarray(array)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"a figure must be an (H, W, 3) uint8 array, got {arr.dtype} {arr.shape}")
    write_image(path, arr)
    return Path(path)


def plot_curves(
    xs: Sequence[float] | Mapping[str, Sequence[float]],
    ys_dict: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    logx: bool = False,
    logy: bool = False,
) -> Path:
    """Plot named series (loss curves, accuracy-vs-cost trade-offs) and save them atomically.

    ``xs`` is shared by all series or given per series name. Series of up to 30 points get markers,
    since such plots are usually trade-off points rather than dense curves. The file format follows
    the suffix (png, pdf, svg). Uses a bare ``Figure`` + Agg canvas: no pyplot global state, so it is
    safe in worker processes and never opens a window.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not ys_dict:
        raise ValueError("plot_curves needs at least one series in ys_dict")
    fig = Figure(figsize=(6.0, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, ys in ys_dict.items():
        x = xs[name] if isinstance(xs, Mapping) else xs
        if len(x) != len(ys):
            raise ValueError(f"series {name!r} has {len(ys)} values but {len(x)} x positions")
        ax.plot(list(x), list(ys), marker="o" if len(ys) <= 30 else None, markersize=4, label=str(name))
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(ys_dict) > 1:
        ax.legend()
    fig.tight_layout()
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    with atomic_write(path) as f:
        f.write(buf.getvalue())
    return Path(path)
