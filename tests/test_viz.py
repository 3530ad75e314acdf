"""Tests for diffuseg.viz: colour maps, overlays, legends, figures, grids and plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffuseg import viz
from diffuseg.io import read_image

# Distinctive colours that neither the test images nor anti-aliased grey text can produce by accident.
PALETTE = [(10, 20, 30), (200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0)]
NAMES = ["background", "t-shirt", "trouser", "bag", "sandal"]


def _has_colour(img: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return bool(np.all(img == np.asarray(colour, dtype=np.uint8), axis=-1).any())


def _scene(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A mid-grey image and a label map with classes 0, 1, 3 and an ignore strip."""
    image = np.full((size, size, 3), 128, dtype=np.uint8)
    labels = np.zeros((size, size), dtype=np.int64)
    labels[10:30, 10:30] = 1
    labels[40:60, 5:50] = 3
    labels[:, -4:] = 255
    return image, labels


def test_colorize_colours_and_ignore() -> None:
    labels = np.array([[0, 1], [4, 255]])
    out = viz.colorize(labels, PALETTE)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [200, 0, 0]
    assert out[1, 0].tolist() == [200, 200, 0] and out[1, 1].tolist() == list(viz.IGNORE_COLOR)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.array([[0, 5]]), "no colour"),
        (np.array([[0, -1]]), "no colour"),
        (np.zeros((2, 2), dtype=np.float32), "integer"),
        (np.zeros((2, 2, 2), dtype=np.int64), "2-D"),
    ],
)
def test_colorize_rejects_bad_labels(labels: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        viz.colorize(labels, PALETTE)


def test_overlay_blends_and_keeps_ignore_pixels() -> None:
    image, labels = _scene()
    out = viz.overlay(image, labels, PALETTE, alpha=0.5, boundaries=False)
    assert out.shape == image.shape and out.dtype == np.uint8
    ignore = labels == 255
    assert np.array_equal(out[ignore], image[ignore])
    # Interior of the t-shirt square: halfway between grey 128 and (200, 0, 0).
    assert out[20, 20].tolist() == [164, 64, 64]
    assert np.array_equal(viz.overlay(image, labels, PALETTE, alpha=0.0, boundaries=False), image)
    full = viz.overlay(image, labels, PALETTE, alpha=1.0, boundaries=False)
    assert np.array_equal(full[~ignore], viz.colorize(labels, PALETTE)[~ignore])


def test_overlay_boundaries_are_solid_and_skip_ignore() -> None:
    image, labels = _scene()
    out = viz.overlay(image, labels, PALETTE, alpha=0.5, boundaries=True)
    assert out[10, 20].tolist() == [200, 0, 0]  # top edge of the t-shirt square: solid colour
    assert out[20, 20].tolist() == [164, 64, 64]  # interior: blended
    ignore = labels == 255
    assert np.array_equal(out[ignore], image[ignore])
    edges = viz.label_boundaries(labels)
    assert edges[10, 20] and not edges[20, 20] and not edges[ignore].any()
    assert edges[20, 9]  # background side of the square's edge is an edge too


def test_overlay_validates_input() -> None:
    image, labels = _scene()
    with pytest.raises(ValueError, match="resize"):
        viz.overlay(image[:32], labels, PALETTE)
    with pytest.raises(ValueError, match="alpha"):
        viz.overlay(image, labels, PALETTE, alpha=1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        viz.overlay(image.astype(np.float32), labels, PALETTE)
    as_float = viz.overlay(image.astype(np.float32) / 255.0, labels, PALETTE)
    assert np.array_equal(as_float, viz.overlay(image, labels, PALETTE))


def test_legend_lists_requested_classes_only() -> None:
    two = viz.draw_legend(NAMES, PALETTE, class_ids=[1, 3])
    four = viz.draw_legend(NAMES, PALETTE, class_ids=[0, 1, 3, 4])
    assert two.dtype == np.uint8 and two.shape[2] == 3
    assert four.shape[0] > two.shape[0]  # one row per entry
    assert _has_colour(two, PALETTE[1]) and _has_colour(two, PALETTE[3])
    assert not _has_colour(two, PALETTE[2]) and not _has_colour(two, PALETTE[4])
    assert not _has_colour(two, viz.IGNORE_COLOR)
    assert _has_colour(viz.draw_legend(NAMES, PALETTE, [1], include_ignore=True), viz.IGNORE_COLOR)
    with pytest.raises(ValueError, match="no name or colour"):
        viz.draw_legend(NAMES, PALETTE, class_ids=[7])


def test_legend_wraps_into_columns_under_max_height() -> None:
    tall = viz.draw_legend(NAMES, PALETTE)
    wrapped = viz.draw_legend(NAMES, PALETTE, max_height=tall.shape[0] // 2)
    assert wrapped.shape[0] <= tall.shape[0] // 2 and wrapped.shape[1] > tall.shape[1]
    assert all(_has_colour(wrapped, c) for c in PALETTE)


def test_overlay_with_legend_upscales_and_lists_present_classes() -> None:
    image, labels = _scene()
    fig = viz.overlay_with_legend(image, labels, PALETTE, NAMES, min_size=256)
    assert fig.shape[0] == 256 and fig.shape[1] > 256  # 64 px shown at 4x, legend to the right
    big = fig[:, :256]
    assert np.array_equal(
        big, viz.overlay(viz.upscale_nearest(image, 4), viz.upscale_nearest(labels, 4), PALETTE)
    )
    legend = fig[:, 256:]
    present = [0, 1, 3]
    assert all(_has_colour(legend, PALETTE[i]) for i in present)
    assert not _has_colour(legend, PALETTE[2]) and not _has_colour(legend, PALETTE[4])
    only_one = viz.overlay_with_legend(image, np.full_like(labels, 2), PALETTE, NAMES)
    assert _has_colour(only_one[:, 256:], PALETTE[2]) and not _has_colour(only_one[:, 256:], PALETTE[0])


def test_side_by_side_panels_and_legend() -> None:
    image, gt = _scene()
    pred = gt.copy()
    pred[10:30, 10:30] = 4
    fig = viz.side_by_side(image, gt, pred, PALETTE, NAMES, min_size=192)
    assert fig.dtype == np.uint8 and fig.ndim == 3
    assert fig.shape[0] > 192 and fig.shape[1] > 3 * 192  # three 192-px panels + title bar + legend
    for c in (PALETTE[0], PALETTE[1], PALETTE[3], PALETTE[4], viz.IGNORE_COLOR):
        assert _has_colour(fig, c)
    assert not _has_colour(fig, PALETTE[2])  # trouser is in neither map
    no_legend = viz.side_by_side(image, gt, pred, PALETTE, None, min_size=192)
    assert no_legend.shape[1] == 3 * 192 + 2 * 8
    no_gt = viz.side_by_side(image, None, pred, PALETTE, None, min_size=192)
    assert no_gt.shape[1] == 2 * 192 + 8
    unc = np.linspace(0, 2, 64 * 64).reshape(64, 64)
    with_unc = viz.side_by_side(image, gt, pred, PALETTE, None, uncertainty=unc, min_size=192)
    assert with_unc.shape[1] == 4 * 192 + 3 * 8
    with pytest.raises(ValueError, match="titles"):
        viz.side_by_side(image, gt, pred, PALETTE, NAMES, titles=("a", "b"))
    with pytest.raises(ValueError, match="pred"):
        viz.side_by_side(image, gt, pred[:10], PALETTE, NAMES)


def test_image_grid_layout() -> None:
    tiles = [np.full((4, 6, 3), i * 40, dtype=np.uint8) for i in range(5)]
    grid = viz.image_grid(tiles, nrow=3, pad=1, pad_value=255)
    assert grid.shape == (1 + 2 * 5, 1 + 3 * 7, 3)
    assert grid[1, 1].tolist() == [0, 0, 0] and grid[6, 8].tolist() == [160, 160, 160]  # tiles 0 and 4
    assert grid[0, 0].tolist() == [255, 255, 255] and grid[6, 15].tolist() == [255, 255, 255]
    mixed = viz.image_grid([np.zeros((2, 2), np.uint8), np.zeros((5, 3, 3), np.uint8)], nrow=2, pad=0)
    assert mixed.shape == (5, 6, 3)
    with pytest.raises(ValueError, match="at least one"):
        viz.image_grid([])


def test_save_figure_round_trip(tmp_path: Path) -> None:
    image, labels = _scene()
    fig = viz.overlay_with_legend(image, labels, PALETTE, NAMES)
    path = viz.save_figure(tmp_path / "figs" / "overlay.png", fig)
    assert np.array_equal(read_image(path), fig)
    assert [p.name for p in path.parent.iterdir()] == ["overlay.png"]
    with pytest.raises(ValueError, match="uint8"):
        viz.save_figure(tmp_path / "bad.png", fig.astype(np.float32))


def test_plot_curves_writes_readable_files(tmp_path: Path) -> None:
    steps = list(range(50))
    path = viz.plot_curves(
        steps,
        {"train": [1 / (s + 1) for s in steps], "val": [1.2 / (s + 1) for s in steps]},
        tmp_path / "loss.png",
        xlabel="step",
        ylabel="loss",
        title="loss",
        logy=True,
    )
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
        pixels = np.asarray(im.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # something was drawn
    svg = viz.plot_curves(
        {"ours": [0.1, 1.0, 3.0], "kmeans": [0.01]},
        {"ours": [40.0, 55.0, 60.0], "kmeans": [20.0]},
        tmp_path / "tradeoff.svg",
        "s / image",
        "mIoU",
        "trade-off",
        logx=True,
    )
    assert svg.read_text().lstrip().startswith("<?xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "tradeoff.svg"]
    with pytest.raises(ValueError, match="x positions"):
        viz.plot_curves([1, 2], {"a": [1.0]}, tmp_path / "x.png")
