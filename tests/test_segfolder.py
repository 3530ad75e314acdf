"""SegFolder over the DESIGN.md layout and plain mmseg folders."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffuseg.data.segfolder import SegFolder, reduce_zero_label
from diffuseg.io import ImageReadError

CLASSES = ["background", "cat", "dog"]


def _make(
    root: Path,
    labels: dict[str, np.ndarray],
    split: str = "train",
    meta: dict | None = None,
    captions: dict[str, str] | None = None,
) -> Path:
    (root / "img_dir" / split).mkdir(parents=True, exist_ok=True)
    (root / "ann_dir" / split).mkdir(parents=True, exist_ok=True)
    for sid, lab in labels.items():
        h, w = lab.shape
        img = np.full((h, w, 3), 40 * len(sid), np.uint8)
        Image.fromarray(img).save(root / "img_dir" / split / f"{sid}.jpg")
        Image.fromarray(lab.astype(np.uint8), mode="L").save(root / "ann_dir" / split / f"{sid}.png")
    if meta is not None:
        (root / "meta.json").write_text(json.dumps(meta))
    if captions:
        (root / "captions").mkdir(exist_ok=True)
        lines = [json.dumps({"id": k, "caption": v}) for k, v in captions.items()]
        (root / "captions" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _lab(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.uint8).reshape(2, -1)


def test_reads_layout_with_meta_and_captions(tmp_path: Path) -> None:
    meta = {
        "name": "pets",
        "classes": CLASSES,
        "palette": [[0, 0, 0], [1, 1, 1], [2, 2, 2]],
        "unseen": ["dog"],
    }
    root = _make(
        tmp_path, {"b": _lab(0, 1, 2, 255), "a": _lab(1, 1, 0, 0)}, meta=meta, captions={"a": "a cat"}
    )
    ds = SegFolder(root, "train")
    assert len(ds) == 2 and ds.ids == ["a", "b"]
    assert ds.class_names == CLASSES and ds.unseen == ["dog"] and ds.palette[2] == [2, 2, 2]
    assert ds.meta["name"] == "pets" and ds.meta["ignore_index"] == 255
    s = ds[0]
    assert s["id"] == "a" and s["caption"] == "a cat"
    assert s["image"].dtype == np.uint8 and s["image"].shape == (2, 2, 3)
    assert s["label"].dtype == np.int64 and s["label"].tolist() == [[1, 1], [0, 0]]
    assert "caption" not in ds[1] and ds[1]["label"][1, 1] == 255
    assert isinstance(ds, torch.utils.data.Dataset)


def test_plain_mmseg_layout_needs_classes(tmp_path: Path) -> None:
    root = _make(tmp_path, {"x": _lab(0, 1, 1, 0)})
    with pytest.raises(ValueError, match="classes="):
        SegFolder(root)
    ds = SegFolder(root, classes=["bg", "fg"])
    assert ds.class_names == ["bg", "fg"] and len(ds.palette) == 2 and ds.unseen == []


def test_label_out_of_range_names_file_and_values(tmp_path: Path) -> None:
    root = _make(tmp_path, {"bad": _lab(0, 3, 7, 255)}, meta={"classes": CLASSES})
    ds = SegFolder(root)
    with pytest.raises(ValueError) as e:
        ds[0]
    assert "bad.png" in str(e.value) and "label values 3, 7 are outside" in str(e.value)
    with pytest.raises(ValueError, match="bad.png"):
        ds.check_labels()
    assert SegFolder(root, validate=False)[0]["label"].max() == 255


def test_reduce_zero_label_like_mmseg(tmp_path: Path) -> None:
    assert reduce_zero_label(np.array([0, 1, 2, 255])).tolist() == [255, 0, 1, 255]
    root = _make(tmp_path, {"x": _lab(0, 1, 3, 255)})
    ds = SegFolder(root, classes=["a", "b", "c"], reduce_zero_label=True)
    assert ds[0]["label"].tolist() == [[255, 0], [2, 255]]
    with pytest.raises(ValueError, match="reduce_zero_label"):
        SegFolder(root, classes=["a", "b", "c"])[0]


def test_images_without_labels_are_reported(tmp_path: Path) -> None:
    root = _make(tmp_path, {"a": _lab(0, 0, 0, 0), "b": _lab(0, 0, 0, 0)}, meta={"classes": CLASSES})
    (root / "ann_dir" / "train" / "b.png").unlink()
    with pytest.raises(ValueError, match=r"1 image\(s\).*no label.*: b"):
        SegFolder(root)


def test_orphan_labels_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _make(tmp_path, {"a": _lab(0, 0, 0, 0), "b": _lab(0, 0, 0, 0)}, meta={"classes": CLASSES})
    (root / "img_dir" / "train" / "b.jpg").unlink()
    with caplog.at_level(logging.WARNING):
        assert len(SegFolder(root)) == 1
    assert "no image" in caplog.text


def test_split_file_restricts_and_orders(tmp_path: Path) -> None:
    root = _make(tmp_path, {k: _lab(0, 1, 0, 1) for k in "abc"}, meta={"classes": CLASSES})
    (tmp_path / "list.txt").write_text("# curated\nc\n\na\n")
    assert SegFolder(root, split_file=tmp_path / "list.txt").ids == ["c", "a"]
    (tmp_path / "bad.txt").write_text("a\nzzz\n")
    with pytest.raises(ValueError, match="zzz"):
        SegFolder(root, split_file=tmp_path / "bad.txt")


def test_missing_split_and_bad_meta(tmp_path: Path) -> None:
    root = _make(tmp_path, {"a": _lab(0, 0, 0, 0)}, meta={"classes": CLASSES})
    with pytest.raises(FileNotFoundError, match="splits found: train"):
        SegFolder(root, "val")
    (root / "meta.json").write_text('{"classes": ["a", "b"], "unseen": ["zebra"]}')
    with pytest.raises(ValueError, match="zebra"):
        SegFolder(root)
    (root / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json"):
        SegFolder(root)


def test_corrupt_image_and_size_mismatch(tmp_path: Path) -> None:
    root = _make(tmp_path, {"a": _lab(0, 0, 0, 0), "b": _lab(0, 0, 0, 0)}, meta={"classes": CLASSES})
    (root / "img_dir" / "train" / "a.jpg").write_bytes(b"not an image")
    ds = SegFolder(root)
    with pytest.raises(ImageReadError, match="a.jpg"):
        ds[0]
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(root / "img_dir" / "train" / "b.jpg")
    with pytest.raises(ValueError, match="5x5"):
        ds[1]


def test_transform_and_suffixes(tmp_path: Path) -> None:
    split = tmp_path / "img_dir" / "val"
    ann = tmp_path / "ann_dir" / "val"
    split.mkdir(parents=True)
    ann.mkdir(parents=True)
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(split / "x_leftImg8bit.png")
    Image.fromarray(np.ones((2, 2), np.uint8), mode="L").save(ann / "x_gtFine_labelTrainIds.png")
    ds = SegFolder(
        tmp_path, "val", classes=["a", "b"], img_suffix="_leftImg8bit.png",
        seg_map_suffix="_gtFine_labelTrainIds.png", transform=lambda s: s["label"].sum(),
    )  # fmt: skip
    assert ds.ids == ["x"] and ds[0] == 4


def test_examples_sample_reads(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1] / "examples" / "fashion_scenes"
    if not (root / "meta.json").is_file():
        pytest.skip("examples/fashion_scenes not generated")
    for split in ("train", "val"):
        ds = SegFolder(root, split)
        ds.check_labels()
        assert ds.class_names[0] == "background" and "caption" in ds[0]
