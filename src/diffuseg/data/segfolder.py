"""SegFolder: a torch Dataset over the mmsegmentation folder layout (DESIGN.md data contract).

::

    ROOT/img_dir/<split>/<id>.png|jpg
    ROOT/ann_dir/<split>/<id>.png        single-channel class ids, 255 = ignore
    ROOT/meta.json                       {"name", "classes", "palette", "unseen", "ignore_index"}
    ROOT/captions/<split>.jsonl          optional {"id", "caption"}

Plain mmseg folders without meta.json work when ``classes`` is given. Every problem a user can
cause (missing folder, image without label, label ids outside the class range, corrupt file) is
a ``ValueError``/``FileNotFoundError`` naming the file, because these datasets are usually
converted by hand and a silent mismatch would corrupt an evaluation instead of stopping it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from diffuseg.io import IMAGE_EXTENSIONS, default_palette, read_image, read_label

logger = logging.getLogger(__name__)

_MAX_LISTED = 5


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _MAX_LISTED else "")


def load_meta(root: str | os.PathLike) -> dict | None:
    """Read and check ``ROOT/meta.json``; ``None`` when there is none."""
    path = Path(root) / "meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{path}: 'classes' must be a non-empty list of class names")
    return meta


def read_split_file(path: str | os.PathLike) -> list[str]:
    """Ids from a split list (one per line; blank lines and ``#`` comments skipped; extensions dropped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    ids = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            ids.append(Path(line).stem if Path(line).suffix.lower() in IMAGE_EXTENSIONS else line)
    if not ids:
        raise ValueError(f"split file {path} lists no ids")
    return ids


def reduce_zero_label(label: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """mmseg's reduction: 0 -> ignore, every other id -> id - 1 (ignore stays ignore)."""
    out = label.astype(np.int64, copy=True)
    ignore = (out == 0) | (out == ignore_index)
    out -= 1
    out[ignore] = ignore_index
    return out


class SegFolder(Dataset):
    """Images and label maps of one split of a folder dataset.

    ``__getitem__`` returns ``{"image": (H, W, 3) uint8, "label": (H, W) int64, "id": str}`` plus
    ``"caption"`` when ``captions/<split>.jsonl`` has one, passed through ``transform`` if given.

    Args:
        root: dataset folder.
        split: sub-folder of ``img_dir``/``ann_dir`` (``"train"``, ``"val"``, ...).
        classes: class names; required without meta.json, otherwise overrides meta's list.
        reduce_zero_label: apply mmseg's zero reduction to the stored labels (ADE20K-style raw data).
        ignore_index: label id that is never a class.
        split_file: optional txt of ids restricting (and ordering) the split.
        transform: callable applied to each sample dict.
        validate: check label ids on every read (cheap; turn off only for trusted data).
        img_suffix: image file ending after the id (default: any image extension).
        seg_map_suffix: label file ending after the id (mmseg's ``seg_map_suffix``).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        classes: Sequence[str] | None = None,
        reduce_zero_label: bool = False,
        ignore_index: int = 255,
        split_file: str | os.PathLike | None = None,
        transform: Callable[[dict], Any] | None = None,
        validate: bool = True,
        img_suffix: str | None = None,
        seg_map_suffix: str = ".png",
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset folder {self.root} does not exist")
        self.split = split
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = int(ignore_index)
        self.transform = transform
        self.validate = validate
        self._meta = self._resolve_meta(classes)
        self._images, self._labels = self._pair(img_suffix, seg_map_suffix)
        if split_file is not None:
            self._restrict(read_split_file(split_file), Path(split_file))
        self._captions = self._load_captions()

    # -- construction ----------------------------------------------------------------------------
    def _resolve_meta(self, classes: Sequence[str] | None) -> dict:
        meta = load_meta(self.root)
        if meta is None and classes is None:
            raise ValueError(
                f"{self.root} has no meta.json: pass classes=[...] (the class names in label-id order) "
                "or add a meta.json with 'classes'"
            )
        meta = dict(meta or {"name": self.root.name})
        if classes is not None:
            classes = [str(c) for c in classes]
            if not classes:
                raise ValueError("classes must not be empty")
            if "classes" in meta and meta["classes"] != classes:
                logger.warning(
                    "%s: classes given override the %d in meta.json", self.root, len(meta["classes"])
                )
                meta.pop("palette", None)
            meta["classes"] = classes
        meta_ignore = meta.get("ignore_index", self.ignore_index)
        if int(meta_ignore) != self.ignore_index:
            raise ValueError(
                f"{self.root / 'meta.json'} declares ignore_index {meta_ignore} but ignore_index="
                f"{self.ignore_index} was requested; make them agree"
            )
        n = len(meta["classes"])
        if self.ignore_index < n:
            raise ValueError(f"ignore_index {self.ignore_index} collides with class ids 0..{n - 1}")
        palette = meta.get("palette")
        if not isinstance(palette, list) or len(palette) != n:
            meta["palette"] = default_palette(n)
        unseen = list(meta.get("unseen", []))
        unknown = [u for u in unseen if u not in meta["classes"]]
        if unknown:
            raise ValueError(f"{self.root / 'meta.json'}: unseen classes {unknown} are not in 'classes'")
        meta["unseen"] = unseen
        meta["ignore_index"] = self.ignore_index
        return meta

    def _pair(self, img_suffix: str | None, seg_suffix: str) -> tuple[dict[str, Path], dict[str, Path]]:
        img_dir = self.root / "img_dir" / self.split
        ann_dir = self.root / "ann_dir" / self.split
        if not img_dir.is_dir():
            have = sorted(p.name for p in (self.root / "img_dir").glob("*") if p.is_dir())
            raise FileNotFoundError(
                f"{img_dir} does not exist (splits found: {', '.join(have) or 'none'}); "
                "expected the layout ROOT/img_dir/<split>/<id>.png"
            )
        if not ann_dir.is_dir():
            raise FileNotFoundError(f"{ann_dir} does not exist; labels go in ROOT/ann_dir/<split>/<id>.png")
        images = self._scan(img_dir, img_suffix)
        labels = self._scan(ann_dir, seg_suffix)
        if not images:
            raise ValueError(f"{img_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        missing = sorted(set(images) - set(labels))
        if missing:
            raise ValueError(
                f"{len(missing)} image(s) in {img_dir} have no label '<id>{seg_suffix}' in {ann_dir}: "
                f"{_listing(missing)}"
            )
        orphans = sorted(set(labels) - set(images))
        if orphans:
            logger.warning("%d label(s) in %s have no image: %s", len(orphans), ann_dir, _listing(orphans))
        ids = sorted(images)
        return {i: images[i] for i in ids}, {i: labels[i] for i in ids}

    @staticmethod
    def _scan(folder: Path, suffix: str | None) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for p in folder.iterdir():
            if not p.is_file() or p.name.startswith("."):
                continue
            if suffix is None:
                if p.suffix.lower() in IMAGE_EXTENSIONS:
                    if p.stem in out:
                        raise ValueError(f"{folder}: two images share the id {p.stem!r}")
                    out[p.stem] = p
            elif p.name.endswith(suffix):
                out[p.name[: -len(suffix)]] = p
        return out

    def _restrict(self, ids: list[str], source: Path) -> None:
        missing = [i for i in ids if i not in self._images]
        if missing:
            raise ValueError(
                f"{source}: {len(missing)} id(s) have no image in {self.root / 'img_dir' / self.split}: "
                f"{_listing(missing)}"
            )
        self._images = {i: self._images[i] for i in dict.fromkeys(ids)}
        self._labels = {i: self._labels[i] for i in self._images}

    def _load_captions(self) -> dict[str, str]:
        path = self.root / "captions" / f"{self.split}.jsonl"
        if not path.is_file():
            return {}
        caps: dict[str, str] = {}
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                caps[str(rec["id"])] = str(rec["caption"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected {{'id': ..., 'caption': ...}} ({e})") from e
        return caps

    # -- access ----------------------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        """The resolved meta (a copy): name, classes, palette, unseen, ignore_index, extras."""
        return json.loads(json.dumps(self._meta))

    @property
    def class_names(self) -> list[str]:
        return list(self._meta["classes"])

    @property
    def num_classes(self) -> int:
        return len(self._meta["classes"])

    @property
    def palette(self) -> list[list[int]]:
        return [list(c) for c in self._meta["palette"]]

    @property
    def unseen(self) -> list[str]:
        return list(self._meta["unseen"])

    @property
    def name(self) -> str:
        return str(self._meta.get("name", self.root.name))

    @property
    def ids(self) -> list[str]:
        return list(self._images)

    def image_path(self, index: int) -> Path:
        return self._images[self.ids[index]]

    def label_path(self, index: int) -> Path:
        return self._labels[self.ids[index]]

    def __len__(self) -> int:
        return len(self._images)

    def load_label(self, sid: str, validate: bool | None = None) -> np.ndarray:
        """Read, reduce (if asked) and validate (default: ``self.validate``) the label map of ``sid``."""
        path = self._labels[sid]
        label = read_label(path)
        if self.reduce_zero_label:
            label = reduce_zero_label(label, self.ignore_index)
        if self.validate if validate is None else validate:
            self._check_label(label, path)
        return label

    def _check_label(self, label: np.ndarray, path: Path) -> None:
        bad = (label < 0) | (label >= self.num_classes)
        bad &= label != self.ignore_index
        if bad.any():
            values = np.unique(label[bad])
            shown = ", ".join(str(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")
            hint = (
                ""
                if self.reduce_zero_label
                else "; if id 0 means 'other' (ADE20K-style), use reduce_zero_label"
            )
            raise ValueError(
                f"{path}: label values {shown} are outside the {self.num_classes} classes "
                f"(0..{self.num_classes - 1}) and not ignore_index {self.ignore_index}{hint}"
            )

    def __getitem__(self, index: int) -> Any:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        sid = self.ids[index]
        image = read_image(self._images[sid])
        label = self.load_label(sid)
        if image.shape[:2] != label.shape:
            raise ValueError(
                f"{self._images[sid]} is {image.shape[1]}x{image.shape[0]} but its label "
                f"{self._labels[sid]} is {label.shape[1]}x{label.shape[0]}"
            )
        sample: dict[str, Any] = {"image": image, "label": label, "id": sid}
        if sid in self._captions:
            sample["caption"] = self._captions[sid]
        return self.transform(sample) if self.transform is not None else sample

    def check_labels(self, progress: bool = False) -> None:
        """Read and validate every label of the split (raises on the first bad file)."""
        for sid in tqdm(self.ids, desc=f"checking {self.name}/{self.split}", disable=not progress):
            self.load_label(sid, validate=True)

    def __repr__(self) -> str:
        return (
            f"SegFolder({str(self.root)!r}, split={self.split!r}, n={len(self)}, classes={self.num_classes})"
        )
