"""Fashion-MNIST loading from the four official idx files.

FashionScenes is built from Fashion-MNIST items, which this package never downloads: the files
come from the Debian package ``dataset-fashion-mnist`` (installed under
:data:`DEFAULT_FASHION_MNIST_DIR`) or from any folder holding the official idx files, gzipped or
not. A missing file raises a :class:`FileNotFoundError` that says where we looked and how to get
the data, because that is the first thing a user on a fresh machine runs into.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the idx files."""

FASHION_MNIST_LABELS = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
"""Fashion-MNIST label names in label order (label ``k`` is FashionScenes class ``k + 1``)."""

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IDX_MAGIC_IMAGES = 0x00000803
_IDX_MAGIC_LABELS = 0x00000801


@dataclass(frozen=True)
class FashionMNISTSplit:
    """One split of Fashion-MNIST: ``images`` (N, 28, 28) uint8 and ``labels`` (N,) uint8."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def indices_by_label(self) -> list[np.ndarray]:
        """Indices of each label 0..9, so scenes can sample classes uniformly."""
        return [np.flatnonzero(self.labels == k) for k in range(len(FASHION_MNIST_LABELS))]


def _candidates(directory: Path, split: str, kind: str) -> list[Path]:
    """The file names the official archive and common unpackers use for one idx file."""
    prefix = _SPLIT_PREFIX[split]
    dims = "idx3" if kind == "images" else "idx1"
    stems = [f"{prefix}-{kind}-{dims}-ubyte", f"{prefix}-{kind}.{dims}-ubyte"]
    return [directory / (s + ext) for s in stems for ext in (".gz", "")]


def _missing_message(split: str, kind: str, searched: list[Path]) -> str:
    places = ", ".join(str(p) for p in dict.fromkeys(searched))
    return (
        f"Fashion-MNIST {split} {kind} not found (looked for {places}). Install it with "
        f"`apt-get install dataset-fashion-mnist` (files go to {DEFAULT_FASHION_MNIST_DIR}) or pass "
        "`--fashion-mnist DIR` pointing at a folder with the four official idx files "
        "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz; gzipped or not)."
    )


def find_fashion_mnist_file(split: str, kind: str, directory: str | os.PathLike | None = None) -> Path:
    """Locate one idx file in ``directory`` (if given) or the Debian install path."""
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    if kind not in ("images", "labels"):
        raise ValueError(f"unknown Fashion-MNIST file kind {kind!r}; use 'images' or 'labels'")
    dirs = [Path(directory)] if directory is not None else []
    dirs.append(DEFAULT_FASHION_MNIST_DIR)
    for d in dirs:
        for cand in _candidates(d, split, kind):
            if cand.is_file():
                return cand
    raise FileNotFoundError(_missing_message(split, kind, [_candidates(d, split, kind)[0] for d in dirs]))


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an idx file (big-endian header: magic, then one uint32 per dimension)."""
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read idx file ({e})") from e
    if len(data) < 8:
        raise ValueError(f"{path}: too short to be an idx file ({len(data)} bytes)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: idx magic {found:#010x}, expected {magic:#010x}; wrong or corrupt file")
    ndim = found & 0xFF
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) + header
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} bytes but header {shape} implies {expected}; truncated?")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


@functools.lru_cache(maxsize=4)
def _load_cached(split: str, directory: str | None) -> FashionMNISTSplit:
    img_path = find_fashion_mnist_file(split, "images", directory)
    lab_path = find_fashion_mnist_file(split, "labels", directory)
    images = _read_idx(img_path, _IDX_MAGIC_IMAGES)
    labels = _read_idx(lab_path, _IDX_MAGIC_LABELS)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{img_path} has {images.shape[0]} images but {lab_path} has {labels.shape[0]} labels"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_LABELS):
        raise ValueError(f"{lab_path}: label {labels.max()} outside 0..9")
    logger.debug("loaded Fashion-MNIST %s: %d images from %s", split, len(labels), img_path)
    images.setflags(write=False)
    labels.setflags(write=False)
    return FashionMNISTSplit(images=images, labels=labels)


def load_fashion_mnist(split: str = "train", directory: str | os.PathLike | None = None) -> FashionMNISTSplit:
    """Load a Fashion-MNIST split (``"train"``: 60k, ``"test"``: 10k) as read-only arrays.

    Cached per (split, directory): the generator and tests call this repeatedly and parsing the
    60k-image file costs a few hundred milliseconds.
    """
    key = str(Path(directory).resolve()) if directory is not None else None
    return _load_cached(split, key)
