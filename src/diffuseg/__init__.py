"""diffuseg: semantic segmentation with diffusion models.

Public API::

    from diffuseg import load_pipeline, SegmentationOutput
    pipe = load_pipeline("diffseg")            # the embedded default backbone
    out = pipe(images)                          # SegmentationOutput
"""

from __future__ import annotations

from diffuseg.outputs import SegmentationOutput

__version__ = "0.1.0"
__all__ = ["SegmentationOutput", "__version__", "load_pipeline"]


def load_pipeline(method: str, checkpoint: str | None = None, **kwargs):
    """Load the pipeline of ``method`` from ``checkpoint`` (or the method's shipped default).

    Imported lazily so that ``import diffuseg`` stays cheap for the CLI and data tools.
    """
    from diffuseg.methods import load_pipeline as _load

    return _load(method, checkpoint, **kwargs)
