"""``diffuseg evaluate``: run any method's pipeline over a dataset split and score it.

Unsupervised methods (DiffSeg without class names) are scored with Hungarian matching;
semantic output with the confusion matrix, seen/unseen/hIoU from the dataset's ``unseen``.
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from typing import Any

from diffuseg.eval.runner import evaluate_method, load_meta, load_split_samples

logger = logging.getLogger(__name__)

__all__ = ["evaluate_pipeline"]


def evaluate_pipeline(
    pipe,
    method: str,
    data_dir: str | os.PathLike,
    split: str = "val",
    matching: str = "per_image",
    semantic: bool = False,
    limit: int | None = None,
    batch_size: int = 16,
    json_out: str | os.PathLike | None = None,
    progress: bool = True,
    unseen: list[str] | None = None,
) -> dict[str, Any]:
    """Evaluate ``pipe`` on ``data_dir/<split>`` and return (and optionally write) the report JSON.

    ``unseen`` replaces the dataset's unseen classes for seen/unseen/hIoU, e.g. with the novel
    classes of an episodic fold, so that a model trained without a fold's classes is scored on them.
    """
    from diffuseg.methods import is_unsupervised

    meta = load_meta(data_dir)
    if unseen is not None:
        bad = [u for u in unseen if u not in meta["classes"]]
        if bad:
            raise ValueError(f"unseen classes {bad} are not among the dataset's classes {meta['classes']}")
        meta = {**meta, "unseen": list(unseen)}
    check_meta = getattr(pipe, "check_dataset_meta", None)
    if callable(check_meta):  # zero-shot pipelines warn when the dataset's unseen list differs from theirs
        check_meta(meta)
    names = list(meta["classes"])
    unsupervised = is_unsupervised(method) and not semantic
    samples = (_centre_crop(x) for x in load_split_samples(data_dir, split))
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be ≥ 1, got {limit}")
        samples = itertools.islice(samples, limit)
    call = {} if unsupervised else {"class_names": names}
    trained_without = getattr(pipe, "unseen_classes", None)
    if trained_without is not None and sorted(trained_without) != sorted(meta.get("unseen", [])):
        logger.warning(
            "the checkpoint was trained without %s but %s are scored as unseen (the dataset's "
            "meta.json or `unseen`): seen/unseen/hIoU follow the latter",
            sorted(trained_without),
            sorted(meta.get("unseen", [])),
        )

    def predict(images):
        # predictions at the (cropped) label size: the method resizes internally as it needs
        if len({im.shape for im in images}) == 1:
            return pipe(images, output_size=images[0].shape[0], **call).labels
        return [pipe(im, output_size=im.shape[0], **call).labels[0] for im in images]

    protocol: dict[str, Any] = {
        "method_config": _config_dict(pipe),
        "crop": "centre square (image and label)",
    }
    if unsupervised:
        protocol["output"] = "segment ids (no class names given to the method)"
    return evaluate_method(
        predict,
        samples,
        num_classes=len(names),
        class_names=names,
        unseen=None if unsupervised else meta.get("unseen"),
        unsupervised=unsupervised,
        matching=matching,
        progress=progress,
        batch_size=batch_size,
        method=method,
        dataset=str(meta.get("name", Path(data_dir).name)),
        split=split,
        ignore_index=int(meta.get("ignore_index", 255)),
        coarse_groups=None if unsupervised else meta.get("coarse_groups"),
        protocol=protocol,
        json_out=json_out,
    )


def _centre_crop(sample: dict[str, Any]) -> dict[str, Any]:
    """Centre-crop image and label to the same square (DiffSeg's protocol; a no-op on square data)."""
    h, w = sample["label"].shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    if sample["image"].shape[:2] != (h, w):
        raise ValueError(
            f"{sample.get('id')}: image {sample['image'].shape[:2]} and label {(h, w)} sizes differ"
        )
    crop = (slice(top, top + s), slice(left, left + s))
    return {**sample, "image": sample["image"][crop], "label": sample["label"][crop]}


def _config_dict(pipe) -> dict[str, Any]:
    cfg = getattr(pipe, "config", None)
    if cfg is None:
        return {}
    if hasattr(cfg, "__dataclass_fields__"):
        from dataclasses import asdict

        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    return dict(cfg) if isinstance(cfg, dict) else {}
