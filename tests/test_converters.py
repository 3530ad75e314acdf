"""Converters from official download layouts, on tiny fixture trees built here (8x8 images)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffuseg.data.converters import convert_dataset
from diffuseg.data.segfolder import SegFolder
from diffuseg.io import default_palette, read_label


def _img(path: Path, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((8, 8, 3), value, np.uint8)
    Image.fromarray(arr).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(arr).save(path)


def _lab(path: Path, arr: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8), mode="L")
    if palette:
        im = im.convert("P")
        im.putpalette([v for c in default_palette(256) for v in c])
    im.save(path)


def _grid(*values: int) -> np.ndarray:
    """An 8x8 label whose four 4x4 quadrants take ``values``."""
    a = np.zeros((8, 8), np.uint8)
    a[:4, :4], a[:4, 4:], a[4:, :4], a[4:, 4:] = values
    return a


def _quadrants(label: np.ndarray) -> list[int]:
    return [int(label[0, 0]), int(label[0, 7]), int(label[7, 0]), int(label[7, 7])]


def test_voc2012(tmp_path: Path) -> None:
    voc = tmp_path / "dl" / "VOCdevkit" / "VOC2012"
    for sid, vals in {"2007_000001": (0, 15, 20, 255), "2007_000002": (1, 1, 0, 0)}.items():
        _img(voc / "JPEGImages" / f"{sid}.jpg")
        _lab(voc / "SegmentationClass" / f"{sid}.png", _grid(*vals), palette=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000002\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000001\n")
    out = convert_dataset("voc2012", tmp_path / "dl", tmp_path / "out", progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"][15] == "person" and meta["unseen"] == ["aeroplane", "cat", "cow", "motorbike"]
    assert meta["splits"] == {"train": 1, "val": 1}
    ann = out / "ann_dir" / "val" / "2007_000001.png"
    assert Image.open(ann).mode == "L" and _quadrants(read_label(ann)) == [0, 15, 20, 255]
    img = out / "img_dir" / "val" / "2007_000001.jpg"
    assert img.is_symlink() and img.resolve() == (voc / "JPEGImages" / "2007_000001.jpg").resolve()
    ds = SegFolder(out, "train")
    assert ds.ids == ["2007_000002"] and ds[0]["image"].shape == (8, 8, 3)


def test_voc_bad_label_is_named(tmp_path: Path) -> None:
    voc = tmp_path / "VOC2012"
    _img(voc / "JPEGImages" / "x.jpg")
    _lab(voc / "SegmentationClass" / "x.png", _grid(0, 1, 42, 0))
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("x\n")
    with pytest.raises(ValueError, match=r"x\.png.*42"):
        convert_dataset("voc", tmp_path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _cityscapes_tree(root: Path) -> None:
    for split, city, frame, vals in (
        ("train", "aachen", "aachen_000000_000019", (7, 26, 9, 0)),
        ("val", "frankfurt", "frankfurt_000000_000294", (33, 24, 8, 255)),
    ):
        _img(root / "leftImg8bit" / split / city / f"{frame}_leftImg8bit.png")
        gt = root / "gtFine" / split / city
        _lab(gt / f"{frame}_gtFine_labelIds.png", _grid(*vals))
        _lab(gt / f"{frame}_gtFine_color.png", _grid(0, 0, 0, 0))  # other official files are ignored


@pytest.mark.parametrize(
    ("name", "train", "val"),
    [
        ("cityscapes", [0, 13, 255, 255], [18, 11, 1, 255]),
        ("cityscapes-27", [0, 19, 2, 255], [26, 17, 1, 255]),
    ],
)
def test_cityscapes(tmp_path: Path, name: str, train: list[int], val: list[int]) -> None:
    _cityscapes_tree(tmp_path / "cs")
    out = convert_dataset(name, tmp_path / "cs", tmp_path / name, progress=False, link="copy")
    assert _quadrants(read_label(out / "ann_dir/train/aachen_000000_000019.png")) == train
    assert _quadrants(read_label(out / "ann_dir/val/frankfurt_000000_000294.png")) == val
    img = out / "img_dir/train/aachen_000000_000019.png"
    assert img.is_file() and not img.is_symlink()
    assert len(json.loads((out / "meta.json").read_text())["classes"]) == (19 if name == "cityscapes" else 27)


def test_cityscapes_missing_label(tmp_path: Path) -> None:
    _cityscapes_tree(tmp_path / "cs")
    next((tmp_path / "cs/gtFine/val/frankfurt").glob("*labelIds.png")).unlink()
    with pytest.raises(FileNotFoundError, match="no label"):
        convert_dataset("cityscapes", tmp_path / "cs", tmp_path / "out", progress=False)


def test_coco_stuff_27_with_curated_list(tmp_path: Path) -> None:
    root = tmp_path / "cocostuff"
    labels = {"000000000139": (0, 2, 156, 255), "000000000285": (177, 15, 91, 181)}
    for sid, vals in labels.items():
        _img(root / "images" / "val2017" / f"{sid}.jpg")
        _lab(root / "stuffthingmaps_trainval2017" / "val2017" / f"{sid}.png", _grid(*vals))
    _img(root / "images" / "train2017" / "000000000009.jpg")
    _lab(root / "stuffthingmaps_trainval2017" / "train2017" / "000000000009.png", _grid(0, 0, 0, 0))
    (tmp_path / "curated.txt").write_text("000000000285\n")
    out = convert_dataset(
        "coco-stuff-27",
        tmp_path,
        tmp_path / "out",
        progress=False,
        split_lists={"val": tmp_path / "curated.txt"},
    )
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"] == {"train": 1, "val": 1}
    lab = read_label(out / "ann_dir/val/000000000285.png")
    names = meta["classes"]
    assert [names[v] for v in _quadrants(lab)] == [
        "water",
        "animal",
        "textile",
        "solid",
    ]  # sea, cat, banner, wood
    assert not (out / "ann_dir/val/000000000139.png").exists()


def test_ade20k_reduces_zero(tmp_path: Path) -> None:
    root = tmp_path / "ADEChallengeData2016"
    for split, sid, vals in (
        ("training", "ADE_train_00000001", (0, 1, 150, 3)),
        ("validation", "ADE_val_00000001", (2, 2, 0, 0)),
    ):
        _img(root / "images" / split / f"{sid}.jpg")
        _lab(root / "annotations" / split / f"{sid}.png", _grid(*vals))
    out = convert_dataset("ade20k", tmp_path, tmp_path / "out", progress=False)
    assert _quadrants(read_label(out / "ann_dir/train/ADE_train_00000001.png")) == [255, 0, 149, 2]
    ds = SegFolder(out, "val")
    assert ds.num_classes == 150 and ds[0]["label"][0, 0] == 1


def test_pascal_context_59(tmp_path: Path) -> None:
    root = tmp_path / "VOCdevkit" / "VOC2010"
    _img(root / "JPEGImages" / "2008_000002.jpg")
    _lab(root / "SegmentationClassContext" / "2008_000002.png", _grid(0, 1, 59, 15))
    (root / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (root / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000002\n")
    out = convert_dataset("pascal-context-59", tmp_path, tmp_path / "out", progress=False)
    names = json.loads((out / "meta.json").read_text())["classes"]
    lab = _quadrants(read_label(out / "ann_dir/val/2008_000002.png"))
    assert lab[0] == 255 and [names[v] for v in lab[1:]] == ["aeroplane", "wood", "person"]


def test_refuses_unknown_and_existing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no converter"):
        convert_dataset("imagenet", tmp_path, tmp_path / "o")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_dataset("ade20k", tmp_path, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="annotations"):
        convert_dataset("ade20k", tmp_path / "o", tmp_path / "p")
