"""Evaluation runner: scores a method (or its saved predictions) and writes the report JSON.

Every method's ``diffuseg evaluate`` and ``diffuseg evaluate-predictions`` go through
:class:`SegmentationEvaluator`, so all of them report the same numbers in the same JSON shape
(DESIGN.md, "Evaluation contract")::

    {"method", "dataset", "split", "num_images",
     "metrics": {"mIoU", "aAcc", "mAcc"[, "mIoU_seen", "mIoU_unseen", "hIoU"]
                 [, "foreground_IoU", "coarse_mIoU"]},
     "per_class": {name: {"IoU", "Acc"}}, ["per_group": {group: {"IoU", "Acc"}},]
     "protocol": {...}, "timing": {"seconds_per_image", ...}}
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from diffuseg.eval.metrics import (
    ConfusionMatrix,
    ForegroundIoU,
    HungarianScorer,
    Matching,
    coarse_confusion,
    coarse_lut,
    json_float,
    to_numpy,
)
from diffuseg.io import read_image, read_label, write_json

logger = logging.getLogger(__name__)

PredictFn = Callable[[list[np.ndarray]], Any]
"""Maps a batch of ``(H, W, 3)`` uint8 images to label maps: an array ``(B, H, W)``, a list of
``(H, W)`` arrays, a torch tensor, or anything with a ``.labels`` attribute (SegmentationOutput)."""

_MISSING_SHOWN = 5


# ----------------------------------------------------------------------------- accumulator
class SegmentationEvaluator:
    """All the scorers one evaluation needs, updated together and reported as one JSON dict.

    Supervised: a :class:`ConfusionMatrix` (fine classes, seen/unseen when ``unseen``), plus
    foreground IoU and coarse-group mIoU when ``coarse_groups`` is given. Unsupervised: a
    :class:`HungarianScorer`; coarse and foreground numbers are skipped there because segment
    ids carry no class meaning before matching.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        *,
        ignore_index: int = 255,
        unseen: Sequence[str] | None = None,
        unsupervised: bool = False,
        matching: Matching = "per_image",
        coarse_groups: Mapping[str, Sequence[str]] | None = None,
        background_index: int = 0,
    ) -> None:
        self.class_names = [str(c) for c in class_names]
        self.ignore_index = int(ignore_index)
        self.unseen = list(unseen or [])
        self.unsupervised = bool(unsupervised)
        self.matching = matching
        self.coarse_groups = {k: list(v) for k, v in (coarse_groups or {}).items()}
        self.background_index = int(background_index)
        n = len(self.class_names)
        if self.coarse_groups:
            coarse_lut(self.class_names, self.coarse_groups)  # validate the table up front
        bad_unseen = [u for u in self.unseen if u not in self.class_names]
        if bad_unseen:
            raise ValueError(f"unseen classes {bad_unseen} are not among the classes {self.class_names}")
        self.num_images = 0
        self.hungarian = HungarianScorer(n, matching, self.ignore_index) if self.unsupervised else None
        self.confusion = None if self.unsupervised else ConfusionMatrix(n, self.ignore_index)
        self.foreground = (
            None if self.unsupervised else ForegroundIoU(self.background_index, self.ignore_index)
        )

    def update(self, pred: Any, gt: Any) -> np.ndarray | None:
        """Score one ``(H, W)`` label map (or a ``(B, H, W)`` batch) against its ground truth.

        Returns the Hungarian-relabelled prediction in unsupervised per-image mode, else ``None``.
        """
        pred, gt = to_numpy(pred, "prediction"), to_numpy(gt, "ground truth")
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
        self.num_images += 1 if gt.ndim == 2 else int(gt.shape[0])
        if self.hungarian is not None:
            return self.hungarian.update(pred, gt)
        self.confusion.update(pred, gt)
        self.foreground.update(pred, gt)
        return None

    def merge(self, other: SegmentationEvaluator) -> SegmentationEvaluator:
        """Combine two shards (e.g. one per process) into a new evaluator."""
        if (other.class_names, other.unsupervised, other.matching) != (
            self.class_names,
            self.unsupervised,
            self.matching,
        ):
            raise ValueError("cannot merge evaluators with different classes or protocols")
        out = SegmentationEvaluator(
            self.class_names,
            ignore_index=self.ignore_index,
            unseen=self.unseen,
            unsupervised=self.unsupervised,
            matching=self.matching,
            coarse_groups=self.coarse_groups,
            background_index=self.background_index,
        )
        out.num_images = self.num_images + other.num_images
        if self.hungarian is not None:
            out.hungarian = self.hungarian.merge(other.hungarian)
        else:
            out.confusion = self.confusion.merge(other.confusion)
            out.foreground = self.foreground.merge(other.foreground)
        return out

    __add__ = merge

    def report(
        self,
        method: str,
        dataset: str,
        split: str,
        timing: Mapping[str, Any] | None = None,
        protocol: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The evaluation-contract dict (see the module docstring)."""
        if self.num_images == 0:
            raise ValueError("nothing was evaluated: no images were scored")
        out: dict[str, Any] = {"method": method, "dataset": dataset, "split": split}
        out["num_images"] = self.num_images
        proto: dict[str, Any] = {"ignore_index": self.ignore_index, "unsupervised": self.unsupervised}
        if self.hungarian is not None:
            res = self.hungarian.compute(self.class_names)
            out["metrics"], out["per_class"] = res["metrics"], res["per_class"]
            proto.update(res["protocol"])
        else:
            res = self.confusion.compute(self.class_names, self.unseen or None)
            out["metrics"], out["per_class"] = res["metrics"], res["per_class"]
            proto.update(self._supervised_protocol())
            self._add_extras(out)
        proto.update(protocol or {})
        out["protocol"] = proto
        out["timing"] = {"seconds_per_image": None, **(timing or {})}
        return out

    def _supervised_protocol(self) -> dict[str, Any]:
        proto: dict[str, Any] = {
            "matching": None,
            "aggregation": "intersections and unions summed over the dataset (mmsegmentation)",
            "invalid_predictions": "ids outside [0, num_classes) count as wrong, never as another class",
        }
        if self.unseen:
            proto["unseen"] = self.unseen
        if self.coarse_groups:
            proto["coarse_groups"] = self.coarse_groups
            proto["background_index"] = self.background_index
        return proto

    def _add_extras(self, out: dict[str, Any]) -> None:
        """foreground_IoU and coarse_mIoU (+ per_group), when the dataset defines coarse groups."""
        if not self.coarse_groups:
            return
        out["metrics"]["foreground_IoU"] = json_float(self.foreground.compute())
        coarse, group_names = coarse_confusion(self.confusion, self.class_names, self.coarse_groups)
        res = coarse.compute(group_names)
        out["metrics"]["coarse_mIoU"] = res["metrics"]["mIoU"]
        out["per_group"] = res["per_class"]


# ----------------------------------------------------------------------------- datasets on disk
def load_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``<data_dir>/meta.json`` (DESIGN.md data contract)."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a dataset folder needs meta.json with its class names "
            "(create one with `diffuseg data fashion-scenes --out DIR ...`)"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("classes"), list) or not meta["classes"]:
        raise ValueError(f"{path}: needs a non-empty 'classes' list")
    meta.setdefault("name", Path(data_dir).name)
    meta.setdefault("ignore_index", 255)
    meta.setdefault("unseen", [])
    return meta


def _split_ids(data_dir: Path, split: str) -> list[str]:
    ann = data_dir / "ann_dir" / split
    if not ann.is_dir():
        have = sorted(p.name for p in (data_dir / "ann_dir").glob("*") if p.is_dir())
        raise FileNotFoundError(f"{ann} not found; splits with labels here: {have or 'none'}")
    ids = sorted(p.stem for p in ann.glob("*.png"))
    if not ids:
        raise FileNotFoundError(f"{ann} holds no .png label maps")
    return ids


def _check_predictions(pred_dir: Path, ids: Sequence[str]) -> None:
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder {pred_dir} does not exist")
    missing = [i for i in ids if not (pred_dir / f"{i}.png").is_file()]
    if missing:
        shown = ", ".join(missing[:_MISSING_SHOWN]) + (", ..." if len(missing) > _MISSING_SHOWN else "")
        raise ValueError(
            f"{len(missing)} of {len(ids)} predictions are missing in {pred_dir} (e.g. {shown}); "
            f"expected <pred_dir>/<id>.png for every label in ann_dir"
        )


def evaluate_predictions(
    pred_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    split: str = "val",
    method: str = "predictions",
    unsupervised: bool = False,
    matching: Matching = "per_image",
    json_out: str | os.PathLike | None = None,
    unseen: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score saved label PNGs ``<pred_dir>/<id>.png`` against ``<data_dir>/ann_dir/<split>/<id>.png``.

    ``unseen`` defaults to the dataset's meta.json (pass ``[]`` to leave seen/unseen out);
    coarse-group and foreground IoU are added when meta.json has ``coarse_groups``. Inference
    time is unknown for saved files, so ``timing.seconds_per_image`` is ``None``.
    """
    data_dir, pred_dir = Path(data_dir), Path(pred_dir)
    meta = load_meta(data_dir)
    ids = _split_ids(data_dir, split)
    _check_predictions(pred_dir, ids)
    ev = SegmentationEvaluator(
        meta["classes"],
        ignore_index=int(meta["ignore_index"]),
        unseen=meta["unseen"] if unseen is None else unseen,
        unsupervised=unsupervised,
        matching=matching,
        coarse_groups=meta.get("coarse_groups"),
    )
    t0 = time.perf_counter()
    for sid in tqdm(ids, desc=f"scoring {split}", disable=not progress, unit="img"):
        pred = read_label(pred_dir / f"{sid}.png")
        gt = read_label(data_dir / "ann_dir" / split / f"{sid}.png")
        if pred.shape != gt.shape:
            raise ValueError(
                f"{pred_dir / (sid + '.png')}: size {pred.shape} differs from its label {gt.shape}"
            )
        ev.update(pred, gt)
    timing = {"seconds_per_image": None, "scoring_seconds": time.perf_counter() - t0}
    report = ev.report(method, meta["name"], split, timing, {"pred_dir": str(pred_dir)})
    if json_out is not None:
        write_json(json_out, report)
    return report


# ----------------------------------------------------------------------------- running a method
def _unpack_sample(sample: Any) -> tuple[np.ndarray, np.ndarray]:
    """(image, label) from a tuple, a dict with image/label keys, or an object with those attributes."""
    if isinstance(sample, Mapping):
        if "image" in sample and "label" in sample:
            return np.asarray(sample["image"]), np.asarray(sample["label"])
    elif isinstance(sample, tuple | list) and len(sample) >= 2:
        return np.asarray(sample[0]), np.asarray(sample[1])
    elif hasattr(sample, "image") and hasattr(sample, "label"):
        return np.asarray(sample.image), np.asarray(sample.label)
    raise ValueError(
        f"a sample must be (image, label), a dict with 'image' and 'label', or an object with "
        f".image/.label; got {type(sample).__name__}"
    )


def _batches(samples: Iterable[Any], batch_size: int) -> Iterable[list[tuple[np.ndarray, np.ndarray]]]:
    batch: list[tuple[np.ndarray, np.ndarray]] = []
    for s in samples:
        batch.append(_unpack_sample(s))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _as_label_list(out: Any, n: int) -> list[np.ndarray]:
    """Normalise whatever ``predict_fn`` returned to ``n`` label maps."""
    if hasattr(out, "labels"):
        out = out.labels
    if isinstance(out, list | tuple):
        maps = [to_numpy(o, "prediction") for o in out]
    else:
        arr = to_numpy(out, "prediction")
        maps = list(arr) if arr.ndim == 3 else [arr] if arr.ndim == 2 else []
    if len(maps) != n:
        raise ValueError(f"predict_fn returned {len(maps)} label maps for a batch of {n} images")
    return maps


def evaluate_method(
    predict_fn: PredictFn,
    samples: Iterable[Any],
    num_classes: int,
    class_names: Sequence[str],
    unseen: Sequence[str] | None = None,
    unsupervised: bool = False,
    matching: Matching = "per_image",
    progress: bool = True,
    *,
    batch_size: int = 8,
    method: str = "method",
    dataset: str = "dataset",
    split: str = "val",
    ignore_index: int = 255,
    coarse_groups: Mapping[str, Sequence[str]] | None = None,
    background_index: int = 0,
    protocol: Mapping[str, Any] | None = None,
    json_out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run ``predict_fn`` over ``samples`` in batches, score it, and return the report dict.

    ``seconds_per_image`` is the median over batches of (batch time / batch size): the median
    keeps a first-batch warm-up (lazy init, caches) out of the number.
    """
    if len(class_names) != num_classes:
        raise ValueError(f"num_classes={num_classes} but {len(class_names)} class names were given")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ev = SegmentationEvaluator(
        class_names,
        ignore_index=ignore_index,
        unseen=unseen,
        unsupervised=unsupervised,
        matching=matching,
        coarse_groups=coarse_groups,
        background_index=background_index,
    )
    per_image: list[float] = []
    total = 0.0
    rank, world = _process_rank()
    if world > 1:  # under `accelerate launch`: each process scores every world-th sample
        samples = itertools.islice(samples, rank, None, world)
    bar = tqdm(desc=f"evaluating {method}", disable=not progress or rank > 0, unit="img")
    for batch in _batches(samples, batch_size):
        images = [img for img, _ in batch]
        t0 = time.perf_counter()
        labels = _as_label_list(predict_fn(images), len(batch))
        dt = time.perf_counter() - t0
        total += dt
        per_image.append(dt / len(batch))
        for pred, (_, gt) in zip(labels, batch, strict=True):
            ev.update(pred, gt)
        bar.update(len(batch))
    bar.close()
    if world > 1:
        ev, per_image, total = _gather_shards(ev, per_image, total)
    timing = {
        "seconds_per_image": statistics.median(per_image) if per_image else None,
        "batch_size": batch_size,
        "num_batches": len(per_image),
        "total_predict_seconds": total,
    }
    report = ev.report(method, dataset, split, timing, protocol)
    if world > 1:
        report["protocol"] = {**report.get("protocol", {}), "processes": world}
    if json_out is not None and rank == 0:
        write_json(json_out, report)
    if world > 1:
        _wait_for_everyone()  # no rank returns (and maybe exits) before the report is written
    return report


def _wait_for_everyone() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def _process_rank() -> tuple[int, int]:
    """(rank, world size) of a distributed run started by Accelerate/torchrun; (0, 1) otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator() reads it
    return state.process_index, state.num_processes


def _gather_shards(
    ev: SegmentationEvaluator, per_image: list[float], total: float
) -> tuple[SegmentationEvaluator, list[float], float]:
    """Merge every process's evaluator and timings so that all ranks report the whole split."""
    from accelerate.utils import gather_object

    parts = gather_object([(ev, per_image, total)])
    merged = parts[0][0]
    for other, _, _ in parts[1:]:
        merged = merged.merge(other)
    return merged, [t for _, p, _ in parts for t in p], sum(t for _, _, t in parts)


def load_split_samples(data_dir: str | os.PathLike, split: str = "val") -> Iterable[dict[str, Any]]:
    """Stream ``{"id", "image", "label"}`` of a DESIGN.md dataset folder (for :func:`evaluate_method`)."""
    data_dir = Path(data_dir)
    img_dir = data_dir / "img_dir" / split
    ids = _split_ids(data_dir, split)
    # one directory listing, not one glob per id: globbing is O(N) per call, O(N^2) on a 20k split
    images: dict[str, Path] = {}
    for p in sorted(img_dir.iterdir()) if img_dir.is_dir() else []:
        if p.is_file() and not p.name.startswith("."):
            images.setdefault(p.stem, p)
    for sid in ids:
        if sid not in images:
            raise FileNotFoundError(f"no image for label {sid} in {img_dir}")
        yield {
            "id": sid,
            "image": read_image(images[sid]),
            "label": read_label(data_dir / "ann_dir" / split / f"{sid}.png"),
        }


# ----------------------------------------------------------------------------- text report
def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def _table(title: str, rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    width = max([len(title), *(len(k) for k in rows)])
    lines = [f"{title:<{width}}  {'IoU':>7}  {'Acc':>7}", "-" * (width + 18)]
    lines += [f"{k:<{width}}  {_fmt(v.get('IoU')):>7}  {_fmt(v.get('Acc')):>7}" for k, v in rows.items()]
    return lines


def format_report(report: Mapping[str, Any]) -> str:
    """A plain-text rendering of a report dict: headline metrics, per-class table, protocol, timing."""
    proto = report.get("protocol", {})
    match = proto.get("matching")
    head = f"{report['method']} on {report['dataset']}/{report['split']} ({report['num_images']} images)" + (
        f", unsupervised, Hungarian matching: {match}" if proto.get("unsupervised") else ""
    )
    lines = [head, "=" * len(head)]
    items = [f"{k} {_fmt(v)}" for k, v in report["metrics"].items()]
    lines += ["  ".join(items[i : i + 3]) for i in range(0, len(items), 3)]
    lines.append("")
    lines += _table("class", report.get("per_class", {}))
    if report.get("per_group"):
        lines.append("")
        lines += _table("coarse group", report["per_group"])
    if proto.get("unseen"):
        lines.append(f"\nunseen classes: {', '.join(proto['unseen'])}")
    spi = report.get("timing", {}).get("seconds_per_image")
    lines.append(f"\nseconds per image: {_fmt(spi) if spi is None else f'{spi:.4f}'}")
    lines.append("(percentages; '-' = class absent from ground truth and prediction)")
    return "\n".join(lines)
