"""Reading and writing images, label maps and JSON, safely.

Everything that touches the file system for user data goes through here so that
bad input fails the same way everywhere (:class:`ImageReadError`, a ``ValueError``
naming the file and what is wrong with it) and so that outputs are never left
half-written (:func:`atomic_write`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


class ImageReadError(ValueError):
    """An image or label file is missing, empty, corrupt or of an unsupported kind."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path`` and move it into place only on success.

    An interrupted run therefore never leaves a truncated PNG or JSON that a later
    run would mistake for a finished output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def replace_folder(finished: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Move the complete folder ``finished`` to ``dest``, replacing whatever was there.

    The old ``dest`` is renamed aside and deleted only once the new one is in place, so an
    interruption leaves either the old folder or the new one (or the old one beside it), never a
    half-written mix. Returns ``dest``.
    """
    new, out = Path(finished), Path(dest)
    old = out.parent / f".old_{out.name}"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    new.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def _open(path: str | os.PathLike) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageReadError(f"{path}: not a readable image ({e})") from e
    if img.width == 0 or img.height == 0:
        raise ImageReadError(f"{path}: image has zero size")
    return img


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Convert any PIL mode (RGB, RGBA, L, LA, P, 1, I;16, I, F, CMYK) to uint8 RGB.

    16-bit and float images are rescaled by their type's range rather than clipped,
    so a 16-bit PNG looks like its 8-bit counterpart. Alpha is composited on black,
    which is what a model trained on opaque images expects to see at transparent pixels.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F" and arr.max() <= 1.0:
            hi = 1.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        rgb = rgba[..., :3] * (rgba[..., 3:4] / 255.0)
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as an ``(H, W, 3)`` uint8 RGB array."""
    return to_rgb_array(_open(path))


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read a single-channel label map (uint8 or uint16 PNG) as an ``(H, W)`` int64 array.

    Palette ("P") PNGs, as PASCAL VOC ships them, are read by index, not colour.
    A colour (RGB) label file is refused: its ids are ambiguous.
    """
    img = _open(path)
    if img.mode in ("L", "P", "I;16", "I;16B", "I;16L", "I", "1"):
        return np.asarray(img).astype(np.int64)
    if img.mode in ("RGB", "RGBA"):
        arr = np.asarray(img)
        if np.all(arr[..., 0] == arr[..., 1]) and np.all(arr[..., 1] == arr[..., 2]):
            return arr[..., 0].astype(np.int64)
        raise ImageReadError(
            f"{path}: label maps must be single-channel class ids (mode L/P/I;16), got a colour "
            f"{img.mode} image; convert it with a palette mapping first"
        )
    raise ImageReadError(f"{path}: unsupported label image mode {img.mode!r}")


def write_label(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Write class ids as a single-channel PNG: uint8 when every id fits, else uint16."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"label map must be 2-D (H, W), got shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"label map has negative ids (min {labels.min()}); use 255 for ignore")
    if labels.size and labels.max() > 255:
        if labels.max() > 65535:
            raise ValueError(f"label ids up to {labels.max()} do not fit a 16-bit PNG")
        img = Image.fromarray(labels.astype(np.uint16))
    else:
        img = Image.fromarray(labels.astype(np.uint8), mode="L")
    with atomic_write(path) as f:
        img.save(f, format="PNG")


def write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an ``(H, W, 3)`` uint8 image; the format follows the suffix (PNG by default)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 image, got {image.dtype}")
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(Path(path).suffix.lower(), "PNG")
    with atomic_write(path) as f:
        Image.fromarray(image).save(f, format=fmt)


def list_images(path: str | os.PathLike) -> list[Path]:
    """Image files under a directory (sorted, non-recursive), or the single file given."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return files


def iter_images(paths: Sequence[str | os.PathLike]) -> Iterator[tuple[Path, np.ndarray]]:
    """Yield ``(path, rgb)`` for each readable image; log and skip the unreadable ones.

    One corrupt file in a folder of a thousand must not cost the other 999 results.
    """
    bad = 0
    for p in paths:
        try:
            yield Path(p), read_image(p)
        except ImageReadError as e:
            bad += 1
            logger.warning("skipping %s", e)
    if bad:
        logger.warning("%d of %d images could not be read and were skipped", bad, len(paths))


def default_palette(n: int, seed: int = 0) -> list[list[int]]:
    """A deterministic, well-spread palette of ``n`` RGB colours (PASCAL-VOC bit scheme)."""
    pal = []
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal.append([r, g, b])
    return pal


def weights_fingerprint(folder: str | os.PathLike) -> str | None:
    """``sha256:<16 hex>`` of a model folder's weight files (``*.safetensors``/``*.bin``, sorted by
    relative path), or ``None`` when it holds none. What identifies a model across machines and
    copies, where a path does not: benchmark records and model cards are keyed by it.
    """
    import hashlib

    path = Path(folder)
    files = sorted(f for f in path.rglob("*") if f.suffix in (".safetensors", ".bin") and f.is_file())
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(path).as_posix().encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()[:16]}"
