"""FashionScenes generator and Fashion-MNIST loading.

Most tests use a tiny synthetic Fashion-MNIST written in the official idx format (fast, and it
lets a test tell the train split from the test split); one test runs on the real files when the
Debian package is installed.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from diffuseg.data import fashion_mnist as fm
from diffuseg.data.fashion_scenes import (
    FASHION_SCENES_CLASSES,
    FashionScenesConfig,
    FashionScenesGenerator,
    colour_name,
    generate_fashion_scenes,
    make_caption,
)

EXPECTED_CLASSES = [
    "background", "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
    "bag", "ankle boot",
]  # fmt: skip


def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _fake_items(labels: np.ndarray, seed: int) -> np.ndarray:
    """28x28 items: a shaded blob per label (varied size), one with an interior hole."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    out = np.zeros((len(labels), 28, 28), np.uint8)
    for i, lab in enumerate(labels):
        ry, rx = rng.uniform(6, 12, size=2)
        blob = ((yy - 14) / ry) ** 2 + ((xx - 14) / rx) ** 2 <= 1
        img = np.where(blob, 120 + 10 * lab + (xx * 3) % 60, 0)
        if lab % 2 == 0:  # a hole the generator must fill
            img[12:16, 12:16] = 0
        out[i] = img
    return out


def write_fake_fmnist(folder: Path, train_labels: list[int], test_labels: list[int], gz: bool) -> Path:
    """Write the four idx files (gzipped or not) for tiny train/test splits."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, labs, seed in (("train", train_labels, 1), ("t10k", test_labels, 2)):
        labels = np.repeat(np.asarray(labs, np.uint8), 6)
        files = {
            f"{prefix}-images-idx3-ubyte": _idx_bytes(_fake_items(labels, seed), 0x803),
            f"{prefix}-labels-idx1-ubyte": _idx_bytes(labels, 0x801),
        }
        for name, data in files.items():
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
            else:
                (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_fake_fmnist(tmp_path_factory.mktemp("fm"), list(range(10)), list(range(10)), gz=True))


@pytest.fixture(scope="module")
def gen(fake_fmnist: str) -> FashionScenesGenerator:
    return FashionScenesGenerator(seed=0, fashion_mnist=fake_fmnist)


def _md5_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- Fashion-MNIST loading -----------------------------------------------------------------------
def test_missing_fashion_mnist_names_both_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "DEFAULT_FASHION_MNIST_DIR", tmp_path / "debian")
    fm._load_cached.cache_clear()
    with pytest.raises(FileNotFoundError) as e:
        fm.load_fashion_mnist("train", tmp_path / "mine")
    msg = str(e.value)
    assert str(tmp_path / "mine") in msg and str(tmp_path / "debian") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--fashion-mnist" in msg


def test_uncompressed_idx_and_bad_magic(tmp_path: Path) -> None:
    folder = write_fake_fmnist(tmp_path / "raw", [0, 1], [2], gz=False)
    data = fm.load_fashion_mnist("test", folder)
    assert data.images.shape == (6, 28, 28) and set(data.labels.tolist()) == {2}
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(6, np.uint8), 0x803))
    fm._load_cached.cache_clear()
    with pytest.raises(ValueError, match="magic"):
        fm.load_fashion_mnist("test", folder)


# --- scenes --------------------------------------------------------------------------------------
def test_determinism_md5_and_layout(tmp_path: Path, fake_fmnist: str) -> None:
    a = generate_fashion_scenes(tmp_path / "a", 5, 3, seed=3, fashion_mnist=fake_fmnist, progress=False)
    b = generate_fashion_scenes(tmp_path / "b", 5, 3, seed=3, fashion_mnist=fake_fmnist, progress=False)
    c = generate_fashion_scenes(tmp_path / "c", 5, 3, seed=4, fashion_mnist=fake_fmnist, progress=False)
    ma, mb, mc = _md5_tree(a), _md5_tree(b), _md5_tree(c)
    assert ma == mb
    assert ma["img_dir/train/000000.png"] != mc["img_dir/train/000000.png"]
    assert sorted(p for p in ma if p.startswith("img_dir/train")) == [
        f"img_dir/train/{i:06d}.png" for i in range(5)
    ]
    assert sorted(p for p in ma if p.startswith("ann_dir/val")) == [
        f"ann_dir/val/{i:06d}.png" for i in range(3)
    ]
    meta = json.loads((a / "meta.json").read_text())
    assert meta["name"] == "FashionScenes"
    assert meta["classes"] == EXPECTED_CLASSES
    assert meta["unseen"] == ["sandal", "coat"] and meta["ignore_index"] == 255
    assert len(meta["palette"]) == 11
    assert meta["generator"]["seed"] == 3 and meta["generator"]["config"]["style_probs"]
    caps = [json.loads(line) for line in (a / "captions" / "val.jsonl").read_text().splitlines()]
    assert [c["id"] for c in caps] == ["000000", "000001", "000002"]
    img = np.asarray(Image.open(a / "img_dir/train/000000.png"))
    ann = Image.open(a / "ann_dir/train/000000.png")
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and ann.mode == "L"


def test_scene_does_not_depend_on_dataset_size(tmp_path: Path, fake_fmnist: str) -> None:
    small = generate_fashion_scenes(tmp_path / "s", 2, 1, seed=0, fashion_mnist=fake_fmnist, progress=False)
    big = generate_fashion_scenes(tmp_path / "b", 4, 2, seed=0, fashion_mnist=fake_fmnist, progress=False)
    for rel in ("img_dir/train/000001.png", "ann_dir/val/000000.png"):
        assert (small / rel).read_bytes() == (big / rel).read_bytes()


def test_existing_output_refused_then_overwritten(tmp_path: Path, fake_fmnist: str) -> None:
    out = tmp_path / "d"
    generate_fashion_scenes(out, 1, 1, fashion_mnist=fake_fmnist, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_fashion_scenes(out, 2, 1, fashion_mnist=fake_fmnist, progress=False)
    generate_fashion_scenes(out, 2, 1, fashion_mnist=fake_fmnist, progress=False, overwrite=True)
    assert len(list((out / "img_dir" / "train").iterdir())) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def _full_item_mask(gen: FashionScenesGenerator, split: str, item: dict) -> tuple[np.ndarray, tuple]:
    data, _ = gen._items_for(split)
    x, y, side = item["box"]
    inten = np.asarray(
        Image.fromarray(data.images[item["fmnist_index"]]).resize((side, side), Image.BILINEAR)
    )
    return ndimage.binary_fill_holes(inten > gen.config.item_threshold), (
        slice(y, y + side),
        slice(x, x + side),
    )


def _check_scene_masks(gen: FashionScenesGenerator, split: str, index: int) -> None:
    """Masks are the items' own thresholded pixels, holes filled, later items on top."""
    sc = gen.scene(split, index)
    size = gen.config.size
    expected_inst = np.zeros((size, size), np.uint8)
    expected_label = np.zeros((size, size), np.uint8)
    for k, it in enumerate(sc.items, start=1):
        mask, win = _full_item_mask(gen, split, it)
        assert np.array_equal(ndimage.binary_fill_holes(mask), mask)
        assert it["area"] == int(mask.sum())
        expected_inst[win][mask] = k
        expected_label[win][mask] = it["id"]
    assert np.array_equal(sc.instances, expected_inst)
    assert np.array_equal(sc.label, expected_label)
    min_px = gen.config.min_visible_area * size * size
    for k, it in enumerate(sc.items, start=1):
        visible = int((sc.instances == k).sum())
        assert visible == it["visible"]
        assert visible >= max(min_px, gen.config.min_visible_frac * it["area"])


def test_masks_exact_and_min_visible_area(gen: FashionScenesGenerator) -> None:
    for i in range(40):
        _check_scene_masks(gen, "train", i)


@pytest.mark.skipif(
    not (fm.DEFAULT_FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST Debian package not installed",
)
def test_masks_exact_on_real_fashion_mnist() -> None:
    real = FashionScenesGenerator(seed=1)
    for i in range(30):
        _check_scene_masks(real, "val", i)


def test_items_captions_and_class_coverage(gen: FashionScenesGenerator) -> None:
    seen: set[int] = set()
    for i in range(200):
        sc = gen.scene("train", i)
        assert 1 <= len(sc.items) <= 3
        ids = set(np.unique(sc.label).tolist()) - {0}
        assert ids == {it["id"] for it in sc.items}
        seen |= ids
        for it in sc.items:
            assert FASHION_SCENES_CLASSES[it["id"]] == it["class"]
            assert f"{it['colour']} {it['class']}" in sc.caption
            assert 18 <= it["box"][2] <= 48
        assert sc.caption.startswith(("a ", "an ")) and " on " in sc.caption
    assert seen == set(range(1, 11))


def test_val_uses_test_split_and_sizes_scale(tmp_path: Path) -> None:
    folder = write_fake_fmnist(tmp_path / "split", [0, 1, 2], [7, 8], gz=True)
    g = FashionScenesGenerator(dataclasses.replace(FashionScenesConfig(), size=32), fashion_mnist=str(folder))
    train_ids = {it["id"] for i in range(30) for it in g.scene("train", i).items}
    val_ids = {it["id"] for i in range(30) for it in g.scene("val", i).items}
    assert train_ids == {1, 2, 3} and val_ids == {8, 9}
    sides = [it["box"][2] for i in range(30) for it in g.scene("train", i).items]
    assert g.scene("train", 0).image.shape == (32, 32, 3)
    assert min(sides) >= 9 and max(sides) <= 24


def test_style_mix_is_respected(fake_fmnist: str) -> None:
    cfg = dataclasses.replace(FashionScenesConfig(), style_probs={"palette": 1.0})
    g = FashionScenesGenerator(cfg, fashion_mnist=fake_fmnist)
    assert {it["style"] for i in range(20) for it in g.scene("val", i).items} == {"palette"}
    with pytest.raises(ValueError, match="style_probs"):
        FashionScenesConfig(style_probs={"neon": 1.0})


def test_colour_names_and_caption_grammar() -> None:
    assert colour_name((220, 20, 20)) == "red"
    assert colour_name((30, 60, 210)) == "blue"
    assert colour_name((250, 250, 250)) == "white"
    assert colour_name((240, 130, 20)) == "orange"
    assert (
        make_caption([("red", "sandal"), ("blue", "bag")], "grass") == "a red sandal and a blue bag on grass"
    )
    assert (
        make_caption([("orange", "coat"), ("grey", "dress"), ("red", "bag")], "bricks")
        == "an orange coat, a grey dress and a red bag on bricks"
    )
    with pytest.raises(ValueError):
        make_caption([], "grass")


def test_bad_arguments(tmp_path: Path, fake_fmnist: str) -> None:
    with pytest.raises(ValueError, match="both 0"):
        generate_fashion_scenes(tmp_path / "x", 0, 0, fashion_mnist=fake_fmnist)
    with pytest.raises(ValueError, match="size"):
        generate_fashion_scenes(tmp_path / "x", 1, 0, size=8, fashion_mnist=fake_fmnist)
    with pytest.raises(ValueError, match="split"):
        FashionScenesGenerator(fashion_mnist=fake_fmnist).scene("test", 0)
