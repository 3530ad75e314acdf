"""Convert official dataset downloads into the DESIGN.md folder layout.

Every converter produces the same thing: ``OUT/img_dir/<split>/<id>.<ext>`` (symlinks to the
original images by default, or copies), ``OUT/ann_dir/<split>/<id>.png`` (single-channel ids that
index ``meta.json["classes"]`` directly, 255 = ignore) and ``OUT/meta.json``. Label remapping
(Cityscapes labelIds -> trainIds, COCO-Stuff 182 -> 27, ADE20K/Pascal-Context zero reduction)
happens once here, so readers never need dataset-specific flags.

Official layouts understood (``src`` may be the dataset folder itself or its parent):

* ``voc2012``: ``VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation/{train,val}.txt}``
* ``cityscapes`` / ``cityscapes-27``: ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` and
  ``gtFine/{train,val}/<city>/*_gtFine_labelIds.png``
* ``coco-stuff-27``: ``images/{train2017,val2017}/*.jpg`` and
  ``stuffthingmaps_trainval2017/{train2017,val2017}/*.png`` (or ``annotations/...``); an optional
  curated id list per split (e.g. STEGO's ``Coco164kFull_Stuff_Coarse_7.txt`` for val)
* ``ade20k``: ``ADEChallengeData2016/{images,annotations}/{training,validation}``
* ``pascal-context-59``: mmsegmentation's converted ``VOCdevkit/VOC2010/{JPEGImages,
  SegmentationClassContext, ImageSets/SegmentationContext/{train,val}.txt}``

The output is assembled in a temporary sibling folder and renamed into place, so an interrupted
conversion never leaves a folder that looks complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from diffuseg.data.fashion_scenes import make_tree_readable
from diffuseg.data.segfolder import read_split_file
from diffuseg.data.specs import DatasetSpec, get_dataset_spec, normalize_dataset_name
from diffuseg.io import read_label, write_json

logger = logging.getLogger(__name__)

LINK_MODES = ("symlink", "copy", "hardlink")
_INVALID = -1


@dataclass(frozen=True)
class _Pair:
    sid: str
    image: Path
    label: Path


def build_lut(mapping: dict[int, int], ignore_index: int = 255, unmapped: str = "ignore") -> np.ndarray:
    """A lookup table raw id -> class id for every uint16 value.

    ``unmapped="ignore"`` sends ids not in ``mapping`` to ``ignore_index`` (Cityscapes, COCO-Stuff:
    the protocol ignores them); ``"error"`` marks them invalid so conversion stops and names the file.
    """
    lut = np.full(65536, ignore_index if unmapped == "ignore" else _INVALID, dtype=np.int32)
    lut[ignore_index] = ignore_index
    for raw, cls in mapping.items():
        lut[raw] = cls
    return lut


def apply_lut(label: np.ndarray, lut: np.ndarray, path: Path | str = "<array>") -> np.ndarray:
    """Map a raw label map through ``lut``; ValueError naming ``path`` and any invalid raw ids."""
    if label.size and (label.min() < 0 or label.max() >= len(lut)):
        raise ValueError(f"{path}: label ids {label.min()}..{label.max()} outside 0..{len(lut) - 1}")
    out = lut[label]
    bad = out == _INVALID
    if bad.any():
        values = ", ".join(str(v) for v in np.unique(label[bad])[:10])
        raise ValueError(f"{path}: unexpected label ids {values} for this dataset")
    return out.astype(np.uint8)


def _first_dir(src: Path, candidates: list[str], must_have: str) -> Path:
    """The first of ``src/<candidate>`` that contains ``must_have`` (lets users pass either level)."""
    for c in candidates:
        d = src / c if c else src
        if (d / must_have).exists():
            return d
    tried = ", ".join(str((src / c) if c else src) for c in candidates)
    raise FileNotFoundError(f"could not find {must_have!r} under any of: {tried}")


def _pairs_from_list(
    ids: list[str], img_dir: Path, img_ext: str, ann_dir: Path, list_file: Path
) -> list[_Pair]:
    pairs, missing = [], []
    for sid in ids:
        img, ann = img_dir / f"{sid}{img_ext}", ann_dir / f"{sid}.png"
        if img.is_file() and ann.is_file():
            pairs.append(_Pair(sid, img, ann))
        else:
            missing.append(sid)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} id(s) of {list_file} lack an image in {img_dir} or a label in {ann_dir}: "
            f"{', '.join(missing[:5])}"
        )
    return pairs


def _pairs_by_stem(
    img_dir: Path, img_glob: str, ann_dir: Path, ann_for: Callable[[Path], Path]
) -> list[_Pair]:
    pairs, missing = [], []
    for img in sorted(img_dir.glob(img_glob)):
        ann = ann_for(img)
        if ann.is_file():
            pairs.append(_Pair(img.name.split(".")[0], img, ann))
        else:
            missing.append(str(ann))
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) in {img_dir} have no label, e.g. {missing[0]}")
    return pairs


# -- per-dataset discovery --------------------------------------------------------------------------
def _voc_like(src: Path, year_dir: str, ann: str, sets: str, lists: dict[str, Path] | None) -> dict:
    root = _first_dir(src, ["", year_dir, f"VOCdevkit/{year_dir}"], "JPEGImages")
    out = {}
    for split in ("train", "val"):
        list_file = (lists or {}).get(split, root / "ImageSets" / sets / f"{split}.txt")
        if Path(list_file).is_file():
            ids = read_split_file(list_file)
            out[split] = _pairs_from_list(ids, root / "JPEGImages", ".jpg", root / ann, Path(list_file))
    return out


def _cityscapes(src: Path, lists: dict[str, Path] | None) -> dict:
    root = _first_dir(src, ["", "cityscapes"], "leftImg8bit")
    out = {}
    for split in ("train", "val"):
        img_dir, gt_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        if not img_dir.is_dir():
            continue
        pairs = []
        for city in sorted(p for p in img_dir.iterdir() if p.is_dir()):
            pairs += _pairs_by_stem(
                city,
                "*_leftImg8bit.png",
                gt_dir / city.name,
                lambda p, d=gt_dir / city.name: (
                    d / p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
                ),
            )
        out[split] = [_Pair(p.sid.removesuffix("_leftImg8bit"), p.image, p.label) for p in pairs]
    return _restrict(out, lists)


def _coco_stuff(src: Path, lists: dict[str, Path] | None) -> dict:
    root = _first_dir(src, ["", "cocostuff", "coco"], "images")
    ann_root = next(
        (root / d for d in ("stuffthingmaps_trainval2017", "annotations") if (root / d).is_dir()), None
    )
    if ann_root is None:
        raise FileNotFoundError(f"{root}: no stuffthingmaps_trainval2017/ (or annotations/) label folder")
    out = {}
    for split, official in (("train", "train2017"), ("val", "val2017")):
        img_dir, ann_dir = root / "images" / official, ann_root / official
        if img_dir.is_dir() and ann_dir.is_dir():
            out[split] = _pairs_by_stem(img_dir, "*.jpg", ann_dir, lambda p, d=ann_dir: d / f"{p.stem}.png")
    return _restrict(out, lists)


def _ade20k(src: Path, lists: dict[str, Path] | None) -> dict:
    root = _first_dir(src, ["", "ADEChallengeData2016"], "annotations")
    out = {}
    for split, official in (("train", "training"), ("val", "validation")):
        img_dir, ann_dir = root / "images" / official, root / "annotations" / official
        if img_dir.is_dir():
            out[split] = _pairs_by_stem(img_dir, "*.jpg", ann_dir, lambda p, d=ann_dir: d / f"{p.stem}.png")
    return _restrict(out, lists)


def _restrict(pairs: dict[str, list[_Pair]], lists: dict[str, Path] | None) -> dict[str, list[_Pair]]:
    """Keep only (and order by) the ids of a split list, e.g. the curated COCO-Stuff val set."""
    for split, list_file in (lists or {}).items():
        if split not in pairs:
            raise ValueError(f"split list given for {split!r} but the source has no such split")
        by_id = {p.sid: p for p in pairs[split]}
        ids = read_split_file(list_file)
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise FileNotFoundError(
                f"{list_file}: {len(missing)} id(s) not in the {split} split: {missing[:5]}"
            )
        pairs[split] = [by_id[i] for i in ids]
    return pairs


@dataclass(frozen=True)
class _Converter:
    discover: Callable[[Path, dict[str, Path] | None], dict[str, list[_Pair]]]
    lut: Callable[[DatasetSpec], np.ndarray]


def _identity_lut(spec: DatasetSpec) -> np.ndarray:
    return build_lut({i: i for i in range(spec.num_classes)}, spec.ignore_index, unmapped="error")


def _reduce_zero_lut(spec: DatasetSpec) -> np.ndarray:
    lut = build_lut({i + 1: i for i in range(spec.num_classes)}, spec.ignore_index, unmapped="error")
    lut[0] = spec.ignore_index
    return lut


def _mapped_lut(spec: DatasetSpec) -> np.ndarray:
    return build_lut(spec.label_map or {}, spec.ignore_index, unmapped="ignore")


CONVERTERS: dict[str, _Converter] = {
    "voc2012": _Converter(
        lambda s, lists: _voc_like(s, "VOC2012", "SegmentationClass", "Segmentation", lists), _identity_lut
    ),
    "cityscapes": _Converter(_cityscapes, _mapped_lut),
    "cityscapes-27": _Converter(_cityscapes, _mapped_lut),
    "coco-stuff-27": _Converter(_coco_stuff, _mapped_lut),
    "ade20k": _Converter(_ade20k, _reduce_zero_lut),
    "pascal-context-59": _Converter(
        lambda s, lists: _voc_like(s, "VOC2010", "SegmentationClassContext", "SegmentationContext", lists),
        _reduce_zero_lut,
    ),
}


def _place_image(src: Path, dst: Path, link: str) -> None:
    if link == "symlink":
        os.symlink(src.resolve(), dst)
    elif link == "hardlink":
        os.link(src, dst)
    else:
        shutil.copyfile(src, dst)


def _write(tmp: Path, split: str, pairs: list[_Pair], lut: np.ndarray, link: str, progress: bool) -> None:
    img_out, ann_out = tmp / "img_dir" / split, tmp / "ann_dir" / split
    img_out.mkdir(parents=True)
    ann_out.mkdir(parents=True)
    for p in tqdm(pairs, desc=f"converting {split}", disable=not progress, unit="img"):
        _place_image(p.image, img_out / f"{p.sid}{p.image.suffix.lower()}", link)
        mapped = apply_lut(read_label(p.label), lut, p.label)
        # No per-file fsync: the whole folder is renamed into place only after every file exists.
        Image.fromarray(mapped, mode="L").save(ann_out / f"{p.sid}.png", format="PNG")


def convert_dataset(
    name: str,
    src: str | os.PathLike,
    out: str | os.PathLike,
    progress: bool = True,
    link: str = "symlink",
    split_lists: dict[str, str | os.PathLike] | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert the official download of dataset ``name`` at ``src`` into our layout at ``out``.

    Args:
        name: one of :data:`CONVERTERS` (aliases of :func:`get_dataset_spec` accepted).
        src: the downloaded dataset (its own folder or the parent holding it).
        out: destination folder; refused if it exists and is not empty, unless ``overwrite``.
        progress: show a progress bar per split.
        link: how images are placed: ``"symlink"`` (default, no extra space), ``"hardlink"``, ``"copy"``.
        split_lists: optional ``{split: ids.txt}`` restricting splits (e.g. COCO-Stuff's curated val).
        overwrite: replace an existing ``out``.
    """
    key = normalize_dataset_name(name)
    if key not in CONVERTERS:
        raise ValueError(f"no converter for {name!r}; available: {', '.join(sorted(CONVERTERS))}")
    if link not in LINK_MODES:
        raise ValueError(f"link={link!r}; use one of {', '.join(LINK_MODES)}")
    src_path, out_path = Path(src), Path(out)
    if not src_path.is_dir():
        raise FileNotFoundError(f"source folder {src_path} does not exist")
    if out_path.exists() and any(out_path.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_path} exists and is not empty; pass overwrite=True (--overwrite)")
    spec = get_dataset_spec(key)
    conv = CONVERTERS[key]
    lists = {k: Path(v) for k, v in (split_lists or {}).items()}
    splits = conv.discover(src_path, lists or None)
    splits = {k: v for k, v in splits.items() if v}
    if not splits:
        raise FileNotFoundError(f"{src_path}: found no train or val images in the official {key} layout")
    lut = conv.lut(spec)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent))
    try:
        for split, pairs in splits.items():
            _write(tmp, split, pairs, lut, link, progress)
        meta = spec.meta()
        meta["source"] = {"dataset": key, "path": str(src_path.resolve()), "link": link}
        meta["splits"] = {k: len(v) for k, v in splits.items()}
        write_json(tmp / "meta.json", meta)
        make_tree_readable(tmp)
        if out_path.exists():
            shutil.rmtree(out_path)
        os.replace(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s from %s to %s: %s", key, src_path, out_path, meta["splits"])
    return out_path
