"""Tests for diffuseg.io: tolerant image reading, strict label handling, atomic outputs."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffuseg import io as dio
from diffuseg.io import ImageReadError


def _save(path: Path, img: Image.Image, **kw: object) -> Path:
    img.save(path, **kw)
    return path


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# --- reading images --------------------------------------------------------------------------------


def test_read_rgb_png_and_jpeg(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    out = dio.read_image(_save(tmp_path / "a.png", Image.fromarray(arr)))
    assert out.dtype == np.uint8 and out.shape == (7, 5, 3) and np.array_equal(out, arr)
    flat = np.full((8, 8, 3), (200, 40, 10), dtype=np.uint8)
    jpg = dio.read_image(_save(tmp_path / "b.jpg", Image.fromarray(flat), quality=95))
    assert jpg.shape == (8, 8, 3) and np.abs(jpg.astype(int) - flat).max() <= 4


def test_read_rgba_composites_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, :, :3] = (200, 100, 50)
    rgba[0, :, 3] = (255, 0, 128)
    out = dio.read_image(_save(tmp_path / "a.png", Image.fromarray(rgba, "RGBA")))
    assert out.shape == (1, 3, 3)
    assert out[0, 0].tolist() == [200, 100, 50]
    assert out[0, 1].tolist() == [0, 0, 0]
    assert out[0, 2].tolist() == [100, 50, 25]


def test_read_greyscale_and_bilevel(tmp_path: Path) -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = dio.read_image(_save(tmp_path / "g.png", Image.fromarray(grey, "L")))
    assert out.shape == (3, 4, 3) and all(np.array_equal(out[..., c], grey) for c in range(3))
    bw = Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1")
    assert dio.read_image(_save(tmp_path / "b.png", bw))[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_read_palette_image_uses_colours(tmp_path: Path) -> None:
    img = Image.fromarray(np.array([[0, 1], [2, 1]], dtype=np.uint8), "P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    out = dio.read_image(_save(tmp_path / "p.png", img))
    assert out[0, 1].tolist() == [255, 0, 0] and out[1, 0].tolist() == [0, 0, 255]
    # A transparent palette entry is composited like alpha.
    out_t = dio.read_image(_save(tmp_path / "pt.png", img, transparency=1))
    assert out_t[0, 1].tolist() == [0, 0, 0] and out_t[1, 0].tolist() == [0, 0, 255]


def test_read_16bit_is_rescaled_not_clipped(tmp_path: Path) -> None:
    arr16 = np.array([[0, 257 * 64, 65535], [257 * 128, 100, 257 * 255]], dtype=np.uint16)
    out = dio.read_image(_save(tmp_path / "d.png", Image.fromarray(arr16)))
    assert out.shape == (2, 3, 3)
    assert out[..., 0].tolist() == [[0, 64, 255], [128, 0, 255]]
    # Dark 16-bit images (all values <= 255) must still be read on the 16-bit scale.
    dark = np.array([[0, 200]], dtype=np.uint16)
    assert dio.read_image(_save(tmp_path / "dark.png", Image.fromarray(dark)))[..., 0].tolist() == [[0, 1]]


def test_corrupt_truncated_empty_and_missing_files_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"this is not an image at all" * 10)
    good = _png_bytes(np.zeros((32, 32, 3), dtype=np.uint8) + 7)
    (tmp_path / "trunc.png").write_bytes(good[: len(good) // 2])
    cases = {"empty.png": "empty", "junk.png": "not a readable image", "trunc.png": "not a readable image"}
    for name, match in cases.items():
        with pytest.raises(ImageReadError, match=match):
            dio.read_image(tmp_path / name)
        with pytest.raises(ValueError, match=name):  # the error names the file
            dio.read_label(tmp_path / name)
    with pytest.raises(ImageReadError, match="no such file"):
        dio.read_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="no such file"):
        dio.read_image(tmp_path)  # a directory is not an image


# --- labels ----------------------------------------------------------------------------------------


def test_label_uint8_round_trip(tmp_path: Path) -> None:
    labels = np.array([[0, 1, 10], [255, 3, 0]], dtype=np.int64)
    dio.write_label(tmp_path / "l.png", labels)
    with Image.open(tmp_path / "l.png") as im:
        assert im.mode == "L"
    back = dio.read_label(tmp_path / "l.png")
    assert back.dtype == np.int64 and np.array_equal(back, labels)


def test_label_uint16_round_trip(tmp_path: Path) -> None:
    labels = np.array([[0, 300], [65535, 1000]], dtype=np.int64)
    dio.write_label(tmp_path / "l16.png", labels)
    with Image.open(tmp_path / "l16.png") as im:
        assert im.mode.startswith("I")
    assert np.array_equal(dio.read_label(tmp_path / "l16.png"), labels)


def test_write_label_rejects_bad_maps(tmp_path: Path) -> None:
    for bad, match in [
        (np.array([[-1, 0]]), "negative"),
        (np.array([[70000]]), "16-bit"),
        (np.zeros((2, 2, 3), dtype=np.int64), "2-D"),
    ]:
        with pytest.raises(ValueError, match=match):
            dio.write_label(tmp_path / "bad.png", bad)
    assert not list(tmp_path.iterdir())


def test_read_label_palette_by_index_and_rgb_rules(tmp_path: Path) -> None:
    ids = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    p = Image.fromarray(ids, "P")
    p.putpalette([v for c in dio.default_palette(256) for v in c])
    assert np.array_equal(dio.read_label(_save(tmp_path / "voc.png", p)), ids)
    grey_rgb = np.repeat(ids[..., None], 3, axis=2)
    assert np.array_equal(dio.read_label(_save(tmp_path / "g.png", Image.fromarray(grey_rgb))), ids)
    colour = grey_rgb.copy()
    colour[0, 0] = (10, 20, 30)
    with pytest.raises(ImageReadError, match="single-channel"):
        dio.read_label(_save(tmp_path / "c.png", Image.fromarray(colour)))


# --- writing ---------------------------------------------------------------------------------------


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    with pytest.raises(RuntimeError), dio.atomic_write(target, "w") as f:
        f.write("partial")
        raise RuntimeError("interrupted")
    assert not target.exists() and list(target.parent.iterdir()) == []
    dio.write_json(target, {"a": 1})
    with pytest.raises(KeyboardInterrupt), dio.atomic_write(target, "w") as f:
        f.write("{broken")
        raise KeyboardInterrupt
    assert target.read_text() == '{\n  "a": 1\n}\n'  # the previous complete file survives
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_write_image_and_json(tmp_path: Path) -> None:
    arr = np.random.default_rng(1).integers(0, 256, (6, 4, 3), dtype=np.uint8)
    dio.write_image(tmp_path / "x.png", arr)
    assert np.array_equal(dio.read_image(tmp_path / "x.png"), arr)
    dio.write_image(tmp_path / "x.jpg", arr)
    with Image.open(tmp_path / "x.jpg") as im:
        assert im.format == "JPEG"
    with pytest.raises(ValueError, match="uint8"):
        dio.write_image(tmp_path / "f.png", arr.astype(np.float32))
    dio.write_json(tmp_path / "m.json", {"classes": ["bag"], "ignore_index": 255})
    import json

    assert json.loads((tmp_path / "m.json").read_text()) == {"classes": ["bag"], "ignore_index": 255}


# --- listing and iterating -------------------------------------------------------------------------


def test_list_images(tmp_path: Path) -> None:
    for name in ("b.PNG", "a.jpg", "notes.txt", "c.webp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "d.png").mkdir()
    assert [p.name for p in dio.list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.webp"]
    assert dio.list_images(tmp_path / "a.jpg") == [tmp_path / "a.jpg"]
    with pytest.raises(FileNotFoundError, match="no images"):
        dio.list_images(tmp_path / "d.png")
    with pytest.raises(FileNotFoundError, match="no such"):
        dio.list_images(tmp_path / "nope")


def test_iter_images_skips_corrupt_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = np.full((4, 4, 3), 9, dtype=np.uint8)
    dio.write_image(tmp_path / "1.png", good)
    (tmp_path / "2.png").write_bytes(b"corrupt")
    (tmp_path / "3.png").write_bytes(b"")
    dio.write_image(tmp_path / "4.png", good)
    with caplog.at_level(logging.WARNING, logger="diffuseg.io"):
        got = list(dio.iter_images(dio.list_images(tmp_path)))
    assert [p.name for p, _ in got] == ["1.png", "4.png"]
    assert all(np.array_equal(a, good) for _, a in got)
    text = caplog.text
    assert "2.png" in text and "3.png" in text and "2 of 4 images" in text


def test_default_palette() -> None:
    pal = dio.default_palette(256)
    assert len(pal) == 256 and len({tuple(c) for c in pal}) == 256
    assert pal[:4] == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]  # PASCAL VOC colours
    assert dio.default_palette(3, seed=5) == pal[:3]


def test_replace_folder_swaps_whole_folders(tmp_path):
    from diffuseg.io import replace_folder

    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")
    new = tmp_path / ".tmp_ckpt"
    new.mkdir()
    (new / "weights.bin").write_text("new")
    assert replace_folder(new, dest) == dest
    assert sorted(p.name for p in dest.iterdir()) == ["weights.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing left aside
    other = tmp_path / "fresh"
    other.mkdir()
    replace_folder(other, tmp_path / "first")  # no previous folder
    assert (tmp_path / "first").is_dir() and not other.exists()
