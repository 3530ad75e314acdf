"""A browser demo (gradio): upload an image, pick a method, name the classes, see the segmentation.

The demo is a thin shell over :class:`DemoSession`, which holds the logic and is usable (and tested)
without gradio: it loads each method's pipeline once, on first use, from the shipped checkpoint or
the folder given for it, and turns one call into an overlay with a legend, an uncertainty heat map
where the method gives one, and a short markdown report (classes found, pixel shares, seconds).

    diffuseg demo                                  # every method whose checkpoint ships
    diffuseg demo --checkpoint esda=runs/esda/final --checkpoint diffseg=/models/sd-v1-4
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffuseg.io import default_palette, list_images
from diffuseg.methods import METHODS, is_unsupervised, load_pipeline
from diffuseg.methods.base import check_images, parse_classes

__all__ = ["DemoResult", "DemoSession", "available_methods", "build_demo", "launch"]

logger = logging.getLogger(__name__)

# The shipped checkpoint each method loads by default (DiffSeg's "checkpoint" is its backbone).
DEFAULT_SOURCES = {"diffseg": "mini-sd", "ddpm-seg": "ddpm-seg", "zs3d": "zs3d",
                   "seg-diffusion": "seg-diffusion", "esda": "esda"}  # fmt: skip
# Methods that need class names at call time (open-vocabulary / zero-shot).
NEEDS_CLASSES = ("zs3d", "seg-diffusion", "esda")
FASHION_CLASSES = (
    "background, t-shirt, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot"
)
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples" / "fashion_scenes" / "img_dir" / "val"


def available_methods(sources: Mapping[str, str | None] | None = None) -> dict[str, str | None]:
    """Methods the demo can offer: those given a source, plus those whose default checkpoint ships.

    Returns ``{method: source}`` where ``None`` means "the shipped default".
    """
    from diffuseg.backbones.latent import default_checkpoint_dir

    out: dict[str, str | None] = {}
    for method in METHODS:
        if method not in DEFAULT_SOURCES:
            continue
        if sources and sources.get(method):
            out[method] = sources[method]
            continue
        try:
            default_checkpoint_dir(DEFAULT_SOURCES[method])
        except FileNotFoundError:
            continue
        out[method] = None
    return out


@dataclass
class DemoResult:
    """What one demo call shows: an overlay with legend, an optional uncertainty map, a report."""

    overlay: np.ndarray
    uncertainty: np.ndarray | None
    report: str
    labels: np.ndarray
    class_names: list[str]


class DemoSession:
    """Lazily loaded pipelines and the one ``run`` the UI calls.

    ``sources`` maps a method to its checkpoint folder / hub id (``None``: the shipped default);
    ``loader`` is :func:`diffuseg.load_pipeline` (tests pass their own tiny pipelines).
    """

    def __init__(
        self,
        sources: Mapping[str, str | None],
        loader: Callable[[str, str | None], Any] = load_pipeline,
    ) -> None:
        if not sources:
            raise ValueError(
                "no method to demo: no checkpoint ships yet and none was given; pass one with "
                "`diffuseg demo --checkpoint METHOD=FOLDER` (e.g. esda=runs/esda/final)"
            )
        unknown = sorted(set(sources) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown methods {unknown}; available: {', '.join(sorted(METHODS))}")
        self.sources = dict(sources)
        self._loader = loader
        self._pipes: dict[str, Any] = {}

    @property
    def methods(self) -> list[str]:
        return list(self.sources)

    def pipeline(self, method: str):
        """The method's pipeline, loaded on first use (loading a model takes seconds; calls don't)."""
        if method not in self.sources:
            raise ValueError(f"method {method!r} is not loaded in this demo; choose one of {self.methods}")
        if method not in self._pipes:
            logger.info("loading %s from %s", method, self.sources[method] or "the shipped checkpoint")
            self._pipes[method] = self._loader(method, self.sources[method])
        return self._pipes[method]

    def run(
        self, image: np.ndarray | None, method: str, classes: str | Sequence[str] | None = None
    ) -> DemoResult:
        """Segment one RGB image with ``method``; ``classes`` as ``"a, b, c"`` (needed by zero-shot methods).

        Raises ``ValueError`` with the fix for a missing image, missing class names or a bad image.
        """
        from diffuseg.viz import heatmap, overlay_with_legend

        if image is None:
            raise ValueError("upload an image first")
        [img] = check_images([_rgb(image)])
        names = parse_classes(classes) if classes and str(classes).strip() else None
        if names is None and method in NEEDS_CLASSES:
            raise ValueError(
                f"{method} segments named classes: type them, comma-separated (e.g. '{FASHION_CLASSES}')"
            )
        pipe = self.pipeline(method)
        kwargs = {"class_names": names} if names else {}
        started = time.perf_counter()
        out = pipe([img], **kwargs)
        seconds = time.perf_counter() - started
        labels = np.asarray(out.labels[0])
        count = int(labels.max()) + 1
        shown = list(out.class_names) if out.class_names else [f"segment {i}" for i in range(count)]
        palette = default_palette(max(len(shown), count))
        small = img if img.shape[:2] == labels.shape else _resize(img, labels.shape)
        picture = overlay_with_legend(small, labels, palette, shown)
        unc = heatmap(np.asarray(out.uncertainty[0]))[0] if out.uncertainty is not None else None
        return DemoResult(picture, unc, _report(method, labels, shown, seconds, names is None), labels, shown)


def _rgb(image: np.ndarray) -> np.ndarray:
    """Gradio hands over uint8 RGB, RGBA or greyscale arrays: make them (H, W, 3) uint8."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((shape[1], shape[0]), Image.BILINEAR))


def _report(method: str, labels: np.ndarray, names: list[str], seconds: float, unnamed: bool) -> str:
    ids, counts = np.unique(labels, return_counts=True)
    order = np.argsort(-counts)
    rows = [f"| {names[ids[i]] if ids[i] < len(names) else ids[i]} | {100 * counts[i] / labels.size:.1f} % |"
            for i in order]  # fmt: skip
    kind = "segments (unsupervised ids)" if unnamed and is_unsupervised(method) else "classes"
    head = f"**{method}**: {len(ids)} {kind} at {labels.shape[1]}×{labels.shape[0]} px in {seconds:.2f} s"
    return "\n".join([head, "", "| label | pixels |", "|---|---|", *rows])


def build_demo(session: DemoSession, examples: Sequence[str | Path] | None = None):
    """The gradio ``Blocks`` UI over ``session`` (not launched). Needs the ``demo`` extra (gradio)."""
    import os

    # No calls home: this toolkit runs offline (gradio otherwise reports usage analytics).
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("the demo needs gradio: pip install 'diffuseg[demo]'") from e

    if examples is None:
        examples = list_images(EXAMPLES_DIR)[:6] if EXAMPLES_DIR.is_dir() else []

    def segment(image, method, classes):
        try:
            r = session.run(image, method, classes)
        except (ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e)) from e
        return r.overlay, r.uncertainty, r.report

    first = session.methods[0]
    with gr.Blocks(title="diffuseg") as demo:
        gr.Markdown(
            "# diffuseg\nSemantic segmentation with diffusion models. Pick a method; zero-shot and "
            "open-vocabulary methods segment the class names you type (any names, also unseen ones)."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="numpy", label="image")
                method = gr.Dropdown(session.methods, value=first, label="method")
                classes = gr.Textbox(
                    value=FASHION_CLASSES if first in NEEDS_CLASSES else "",
                    label="class names, comma-separated (empty: segment ids, or the checkpoint's classes)",
                )
                button = gr.Button("Segment", variant="primary")
            with gr.Column():
                result = gr.Image(type="numpy", label="segmentation")
                uncertainty = gr.Image(type="numpy", label="uncertainty (where the method gives one)")
                report = gr.Markdown()
        if examples:
            gr.Examples([[str(p)] for p in examples], inputs=[image])
        button.click(segment, inputs=[image, method, classes], outputs=[result, uncertainty, report])
    return demo


def launch(session: DemoSession, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    """Build and serve the UI (blocks until interrupted)."""
    build_demo(session).launch(server_name=host, server_port=port, share=share)
