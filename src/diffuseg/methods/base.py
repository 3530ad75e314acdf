"""What every method pipeline shares: input checks, file-level segmentation, evaluation.

Pipelines follow diffusers' Marigold pipeline: ``from_pretrained``, ``.to(device)``, one
``__call__`` with numbered steps returning :class:`~diffuseg.outputs.SegmentationOutput`.
The helpers here turn a pipeline into the CLI's ``segment`` (folders in, label PNGs and
overlays out, corrupt files skipped) and ``evaluate`` (the shared report JSON).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffuseg.io import default_palette, iter_images, list_images, write_image, write_label

logger = logging.getLogger(__name__)

__all__ = ["check_images", "parse_classes", "segment_files"]


def check_images(images: Any) -> list[np.ndarray]:
    """Normalise pipeline input to a list of uint8 ``(H, W, 3)`` arrays; ``ValueError`` says the fix."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError(
            "images: pass a uint8 (H, W, 3) array or a non-empty list of them "
            "(read files with diffuseg.io.read_image)"
        )
    out = []
    for i, im in enumerate(images):
        arr = np.asarray(im)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"images[{i}]: expected uint8 RGB (H, W, 3), got {arr.dtype} {arr.shape}")
        if min(arr.shape[:2]) < 8:
            raise ValueError(f"images[{i}]: {arr.shape[:2]} is too small to segment (min side 8 px)")
        out.append(arr)
    return out


def parse_classes(classes: str | Sequence[str] | None) -> list[str] | None:
    """``"a, b,c"`` or ``["a", "b"]`` → ``["a", "b", "c"]``; never iterates a string by character."""
    if classes is None:
        return None
    names = (
        [c.strip() for c in classes.split(",")]
        if isinstance(classes, str)
        else [str(c).strip() for c in classes]
    )
    names = [n for n in names if n]
    if not names:
        raise ValueError("classes: give at least one class name, e.g. --classes 'background,bag,sandal'")
    if len(set(names)) != len(names):
        raise ValueError(f"classes: duplicate names in {names}")
    return names


def segment_files(
    pipe,
    inputs: str | Path,
    out_dir: str | Path,
    batch_size: int = 8,
    palette: list[list[int]] | None = None,
    progress: bool = True,
    **call_kwargs: Any,
) -> list[Path]:
    """Segment an image file or folder: ``<stem>.png`` (ids) and ``<stem>_overlay.png`` per image.

    Unreadable images are logged and skipped; each output file is written atomically, so an
    interrupted run leaves only complete results. Also writes ``<stem>_uncertainty.png`` when
    the pipeline returns an uncertainty map.
    """
    from tqdm.auto import tqdm

    from diffuseg.viz import heatmap, overlay_with_legend

    out_dir = Path(out_dir)
    files = list_images(inputs)
    written: list[Path] = []
    batch: list[tuple[Path, np.ndarray]] = []
    bar = tqdm(total=len(files), desc="segment", disable=not progress)

    def flush() -> None:
        result = pipe([im for _, im in batch], **call_kwargs)
        names = result.class_names or [f"segment {i}" for i in range(int(result.labels.max()) + 1)]
        pal = palette or default_palette(max(len(names), int(result.labels.max()) + 1))
        for k, (path, image) in enumerate(batch):
            labels = result.labels[k]
            write_label(out_dir / f"{path.stem}.png", labels)
            small = _resize_nearest(image, labels.shape) if image.shape[:2] != labels.shape else image
            write_image(out_dir / f"{path.stem}_overlay.png", overlay_with_legend(small, labels, pal, names))
            if result.uncertainty is not None:
                write_image(out_dir / f"{path.stem}_uncertainty.png", heatmap(result.uncertainty[k])[0])
            written.append(out_dir / f"{path.stem}.png")
        bar.update(len(batch))
        batch.clear()

    for path, image in iter_images(files):
        if batch and (len(batch) == batch_size or batch[0][1].shape != image.shape):
            flush()  # a batch holds images of one size
        batch.append((path, image))
    if batch:
        flush()
    bar.close()
    return written


def _resize_nearest(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The input image at the label map's size, for overlays (crops/resizes of the pipeline aside)."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((shape[1], shape[0]), Image.BILINEAR))
