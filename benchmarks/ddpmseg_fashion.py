"""DDPM-Segmentation on FashionScenes: N labelled scenes × 3 seeds, against every reference row.

Rows (all scored on FashionScenes val with :mod:`diffuseg.eval`: fine mIoU, coarse-group mIoU,
foreground IoU; mean ± std over seeds, each seed drawing its own N labelled train scenes):

* ``ddpm`` — the original recipe on mini-SD decoder features;
* ``ddpm+aug``, ``ddpm+aug+adamw``, ``ddpm+aug+adamw+tta`` — the coursework improvements, cumulative;
* ``ddpm+aug+adamw+bn`` — the ``ddpm+aug+adamw`` ensemble with its BatchNorm statistics re-estimated
  without Dropout (``recalibrate_bn``, the library's default; the coursework row keeps them as trained);
* ``effnet`` — ImageNet EfficientNet-Lite0 features, same ensemble (the paper's MAE/SwAV comparison);
* ``rgbxy`` — colour + position, same ensemble (the floor);
* ``random`` — features of a randomly initialised copy of the backbone (control);
* ``unet`` — the small UNet trained from scratch on the same N labels;
* ``datasetddpm`` — the same UNet trained on DatasetDDPM: samples of the backbone labelled by the
  ``ddpm`` ensemble, most uncertain 10% dropped (for the N in ``--dataset-ddpm-sizes``).

``--sweep`` instead measures decoder blocks × timesteps for the ``ddpm`` row (one seed, N=10) — the
evidence for the mini-SD defaults.

Every finished (row, N, seed) is committed as ``benchmarks/records/ddpmseg-fashion/<row>_n<N>_s<seed>.json``
with its signature (data fingerprint, recipe, and the sha256 of the backbone weights for the rows that
use it) and skipped on a rerun, so the run can be stopped (e.g. ``timeout``) and resumed by repeating
the command, on this machine or the next one; retraining the backbone reruns only its rows.
``--no-records`` keeps them in ``WORK/records`` instead; ``--recorded-only`` runs nothing and
tabulates the recorded cells (with the issue's targets judged on them). Full run (≈ 17 CPU-hours on
one thread, two thirds of it the two augmented rows: ×5 data and the original's ≥ 4 epochs)::

    python benchmarks/ddpmseg_fashion.py --data /work/data/fashion_scenes --backbone /work/runs/mini-sd-export

``--max-iterations 5000`` caps each MLP (a deviation from the stopping rule wherever its ≥ 4 epochs
of the labelled pixels exceed 5,000 batches of 64: from N ≈ 20, or N ≈ 5 with ×5 augmentation; stated
in the section). Measured with the cap (one thread per process, two processes sharing two cores):
25–30 min per (N, seed) group at N = 5, ≈ 60 min at N = 10 (with DatasetDDPM), 40–45 min at N = 20
and 50, ≈ 50 min at N = 100 — ≈ 12.5 hours in all; run ``--sizes``/``--seeds``/``--rows`` subsets in
parallel processes, each with its own ``--work-dir``.

Smoke test on a random-init mini-SD (≈ 2 min)::

    python benchmarks/ddpmseg_fashion.py --backbone random:mini-sd --sizes 2 --seeds 0 --num-val 8 \\
        --num-models 2 --max-iterations 30 --synthetic 4 --segmenter-steps 5 --no-write --no-records
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from diffuseg.train.loop import TrainResult

from _common import (
    RECORDS_DIR,
    RESULTS_MD,
    dataset_fingerprint,
    load_record,
    markdown_table,
    mean_std,
    model_fingerprint,
    provenance,
    record_key,
    save_record,
    write_json,
    write_results_section,
)

logger = logging.getLogger("ddpmseg_fashion")

SECTION_ID = "ddpmseg-fashion"
SWEEP_SECTION_ID = "ddpmseg-sweep"
ENSEMBLE_ROWS = ("ddpm", "ddpm+aug", "ddpm+aug+adamw", "effnet", "rgbxy", "random")
TTA_ROW = "ddpm+aug+adamw+tta"
BN_ROW = "ddpm+aug+adamw+bn"
ROWS = (*ENSEMBLE_ROWS[:3], TTA_ROW, BN_ROW, *ENSEMBLE_ROWS[3:], "unet", "datasetddpm")
ROW_LABELS = {
    "ddpm": "DDPM features (mini-SD), original recipe",
    "ddpm+aug": "+ augmentation (×5)",
    "ddpm+aug+adamw": "+ AdamW + Dropout 0.4",
    TTA_ROW: "+ TTA (5 views, majority vote)",
    BN_ROW: "+ AdamW + Dropout 0.4, BatchNorm re-estimated (our fix; no TTA)",
    "effnet": "EfficientNet-Lite0 (ImageNet) features, same ensemble",
    "rgbxy": "RGB+xy pixels, same ensemble (floor)",
    "random": "random-init mini-SD features (control)",
    "unet": "small UNet from scratch on the N labels",
    "datasetddpm": "small UNet on DatasetDDPM",
}
METRICS = ("mIoU", "coarse_mIoU", "foreground_IoU")
SWEEP_LAYERS = (
    ["up_blocks.0"], ["up_blocks.1"], ["up_blocks.2"], ["up_blocks.1", "up_blocks.2"],
    ["up_blocks.0", "up_blocks.1", "up_blocks.2"],
)  # fmt: skip
SWEEP_TIMESTEPS = ([10], [50], [150], [250], [500], [50, 150, 250], [10, 50, 150])
# --tta-views: each view of the TTA row alone; a vote without the grey view; the soft vote (argmax of
# the views' mean probabilities) of all five. (A vote of two views is always the first, the tie-break.)
TTA_DIAGNOSTICS: dict[str, tuple[str, tuple[str, ...]]] = {
    **{f"view-{v}": ("vote", (v,)) for v in ("identity", "hflip", "colour", "grey", "hflip+colour")},
    "vote-without-grey": ("vote", ("identity", "hflip", "colour", "hflip+colour")),
    "soft-all": ("soft", ("identity", "hflip", "colour", "grey", "hflip+colour")),
}


# ----------------------------------------------------------------------------- setup
def prepare_data(args: argparse.Namespace) -> Path:
    """``--data`` or a FashionScenes set generated into the cache dir."""
    if args.data is not None:
        return Path(args.data)
    from diffuseg.data.fashion_scenes import generate_fashion_scenes

    cache = Path(args.work_dir) / f"fashion-scenes-t{args.num_train}-v{args.num_val}"
    if not (cache / "meta.json").is_file():
        generate_fashion_scenes(cache, args.num_train, args.num_val, seed=0, size=64, progress=False)
    return cache


def _shipped_backbone() -> Path | None:
    from diffuseg.backbones.latent import default_checkpoint_dir

    try:
        return default_checkpoint_dir()
    except (FileNotFoundError, OSError):
        return None


def load_val(data_dir: Path, limit: int) -> tuple[list[np.ndarray], np.ndarray]:
    from diffuseg.eval import load_split_samples

    samples = []
    for s in load_split_samples(data_dir, "val"):
        samples.append(s)
        if len(samples) == limit:
            break
    return [s["image"] for s in samples], np.stack([s["label"] for s in samples])


class Bench:
    """Everything one run shares: data, feature sources, val feature stores, the results log."""

    def __init__(self, args: argparse.Namespace) -> None:
        from diffuseg.eval.runner import load_meta

        self.args = args
        self.work = Path(args.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.data = prepare_data(args)
        self.meta = load_meta(self.data)
        self.val_images, self.val_labels = load_val(self.data, args.num_val)
        self.records = self.work / "records" if args.no_records else Path(args.records_dir)
        self.data_fingerprint = dataset_fingerprint(self.data)
        self.backbone_fingerprint = model_fingerprint(args.backbone, _shipped_backbone())
        self._sources: dict[str, Any] = {}
        self._backbones: dict[str, Any] = {}
        self._val_stores: dict[str, Any] = {}

    # ------------------------------------------------------------------ records
    def signature(self, row: str, n: int, seed: int, features=None) -> dict[str, Any]:
        """Everything a cell's number depends on, with the backbone named by its weights' hash."""
        a = self.args
        sig: dict[str, Any] = {"row": row, "n": n, "seed": seed, "num_val": len(self.val_images)}
        sig["data"] = self.data_fingerprint
        if row != "unet":
            key = "ddpm" if row.startswith("ddpm") or row in ("sweep", "datasetddpm") else row
            feats = (features or self.feature_config(key)).to_dict()
            if feats.get("kind") == "diffusion" and key == "ddpm":
                feats["backbone"] = self.backbone_fingerprint
            recipe_row = {"sweep": "ddpm", "datasetddpm": "ddpm", "ddpm+aug+adamw+tta": "ddpm+aug+adamw"}
            sig["features"] = feats
            ens = vars(recipe(recipe_row.get(row, row), a, seed))
            if not (ens["dropout"] > 0 and ens["recalibrate_bn"]):  # no re-estimation: as recorded before it
                ens.pop("recalibrate_bn")
            sig["ensemble"] = ens
        if row in ("unet", "datasetddpm"):
            sig["segmenter"] = {"steps": a.segmenter_steps, "batch": a.segmenter_batch}
        if row == "datasetddpm":
            sig["synthetic"] = {"num": a.synthetic, "steps": a.sampling_steps, "prompts": a.prompts}
        return sig

    def get(self, row: str, n: int, seed: int, tag: str = "", features=None) -> dict | None:
        """The finished cell's metrics (``None`` if it has not run under this signature)."""
        sig = self.signature(row, n, seed, features)
        return load_record(SECTION_ID, record_key(row, f"n{n}", f"s{seed}", tag), sig, self.records)

    def record(
        self, row: str, n: int, seed: int, metrics: dict, seconds: float, tag: str = "", features=None
    ) -> None:
        rec = {"row": row, "n": n, "seed": seed, "tag": tag, "seconds": seconds, **metrics}
        key = record_key(row, f"n{n}", f"s{seed}", tag)
        save_record(SECTION_ID, key, self.signature(row, n, seed, features), rec, self.records)
        logger.info("%s N=%d seed=%d %s: mIoU %.1f (%.0f s)", row, n, seed, tag, metrics["mIoU"], seconds)

    # ------------------------------------------------------------------ features
    def feature_config(self, key: str, layers=None, timesteps=None):
        from diffuseg.methods.ddpm_seg import FeatureConfig

        a = self.args
        lay = layers or a.layers.split(",")
        ts = timesteps or [int(t) for t in a.timesteps.split(",")]
        if key == "ddpm":
            return FeatureConfig(backbone=a.backbone, layers=lay, timesteps=ts)
        if key == "random":
            return FeatureConfig(backbone="random:mini-sd", layers=lay, timesteps=ts, init_seed=0)
        if key == "effnet":
            return FeatureConfig(kind="efficientnet-lite0", resolution=64)
        return FeatureConfig(kind="rgbxy", resolution=64)

    def source(self, key: str, cfg=None):
        """Feature sources are built once per run; a backbone is loaded once and shared (sweep, variants)."""
        from diffuseg.methods.ddpm_seg import build_feature_source, load_feature_backbone

        cfg = cfg or self.feature_config(key)
        sk = json.dumps(cfg.to_dict(), sort_keys=True)
        if sk not in self._sources:
            bb = None
            if cfg.kind == "diffusion":
                bk = f"{cfg.backbone}|{cfg.init_seed}"
                if bk not in self._backbones:
                    self._backbones[bk] = load_feature_backbone(cfg.backbone, cfg.init_seed)
                bb = self._backbones[bk]
            self._sources[sk] = build_feature_source(cfg, backbone=bb)
        return self._sources[sk], cfg

    def val_store(self, source, cfg, view: str = "identity"):
        """Val features of one TTA view, computed once per feature config and memory-mapped from WORK.

        The views' stores do not depend on N or the seed, so the TTA row reuses them across cells
        (5 backbone passes over val once per run instead of once per cell)."""
        from diffuseg.train.ddpm_seg import FeatureStore, build_feature_store, config_fingerprint

        key = {
            "features": cfg.to_dict(),
            "weights": self.backbone_fingerprint if cfg.backbone == self.args.backbone else None,
            "num_val": len(self.val_images),
            "data": str(self.data),
        }
        fp = config_fingerprint(key if view == "identity" else {**key, "view": view})
        if fp not in self._val_stores:
            root = self.work / f"val_{fp}"
            src = source if view == "identity" else _ViewSource(source, view)
            store = FeatureStore.find(root, fp) or build_feature_store(
                src, self.val_images, None, root, fingerprint=fp, progress=not self.args.no_progress
            )
            self._val_stores[fp] = store
        return self._val_stores[fp]

    # ------------------------------------------------------------------ scoring
    def scores(self, preds: np.ndarray) -> dict[str, float]:
        from diffuseg.eval import SegmentationEvaluator

        ev = SegmentationEvaluator(
            self.meta["classes"], ignore_index=int(self.meta["ignore_index"]),
            coarse_groups=self.meta.get("coarse_groups"),
        )  # fmt: skip
        ev.update(preds, self.val_labels)
        m = ev.report("ddpm-seg", self.meta["name"], "val")["metrics"]
        return {k: float(m[k]) for k in METRICS}

    def view_predictions(self, pipe, stores: dict[str, Any]) -> dict[str, tuple[torch.Tensor, ...]]:
        """Per TTA view, the pipeline's ``(labels, js, probs)`` from cached val features, mapped back to
        the original geometry: ``predict_view`` per view as in ``pipe(images, tta=...)``."""
        from diffuseg.methods.ddpm_seg import invert_view

        size, out = self.val_labels.shape[-1], {}
        for view, store in stores.items():
            parts = []
            for i in range(0, len(self.val_images), 32):
                groups = [np.asarray(g[i : i + 32]) for g in store.groups]
                parts.append(tuple(invert_view(t, view) for t in pipe.classify_groups(groups, size)))
            out[view] = tuple(torch.cat(p) for p in zip(*parts, strict=True))
        return out

    def predict_store(self, pipe, stores: dict[str, Any]) -> np.ndarray:
        """The pipeline's labels from cached val features of one or more TTA views (``merge_views``)."""
        from diffuseg.methods.ddpm_seg import merge_views

        return merge_views(list(self.view_predictions(pipe, stores).values()))[0].numpy()


class _ViewSource:
    """A feature source that sees one TTA view of its (preprocessed) input."""

    def __init__(self, source, view: str) -> None:
        self.source, self.view, self.resolution = source, view, source.resolution

    def maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        from diffuseg.methods.ddpm_seg import apply_view

        return self.source.maps(apply_view(x, self.view))


# ----------------------------------------------------------------------------- rows
def recipe(row: str, args: argparse.Namespace, seed: int):
    from diffuseg.train.ddpm_seg import EnsembleTrainConfig

    base = {"num_models": args.num_models, "max_iterations": args.max_iterations, "seed": seed}
    if row in ("ddpm+aug", "ddpm+aug+adamw", BN_ROW):
        base["augment"] = True
    if row in ("ddpm+aug+adamw", BN_ROW):
        base.update(optimizer="adamw", weight_decay=args.adamw_weight_decay, dropout=args.adamw_dropout)
        base["recalibrate_bn"] = row == BN_ROW  # the coursework row keeps its models as published
    return EnsembleTrainConfig(**base)


def labelled(b: Bench, n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    from diffuseg.train.ddpm_seg import load_labelled, select_labelled

    ids = select_labelled(b.data, n, seed)
    images, labels = load_labelled(b.data, ids)
    return images, labels, ids


def ensemble_pipe(b: Bench, row: str, n: int, seed: int, cfg_override=None, tag: str = ""):
    """Train (or reload) the ensemble of a row; checkpoints live in WORK/ckpt/<row>_n<N>_s<seed><tag>."""
    from diffuseg.methods.ddpm_seg import DDPMSegPipeline
    from diffuseg.train.ddpm_seg import config_fingerprint, fit_ddpm_seg

    key = "ddpm" if row.startswith("ddpm") else row
    source, cfg = b.source(key, cfg_override)
    # named by the cell's signature: a retrained backbone at the same path never reuses stale models
    sig = config_fingerprint(b.signature(row, n, seed, cfg_override))
    ckpt = b.work / "ckpt" / f"{row}_n{n}_s{seed}{tag}_{sig}"
    if (ckpt / "config.json").is_file():
        return DDPMSegPipeline.from_pretrained(ckpt, source=source), source, cfg
    images, labels, ids = labelled(b, n, seed)
    pipe = fit_ddpm_seg(
        images, labels, b.meta["classes"], source, recipe(row, b.args, seed), b.work / "train",
        b.meta.get("palette"), {"labelled_ids": ids}, progress=not b.args.no_progress, feature_config=cfg,
    )  # fmt: skip
    pipe.save_pretrained(ckpt)
    return pipe, source, cfg


def run_ensemble_row(b: Bench, row: str, n: int, seed: int) -> dict[str, float]:
    pipe, source, cfg = ensemble_pipe(b, row, n, seed)
    return b.scores(b.predict_store(pipe, {"identity": b.val_store(source, cfg)}))


def run_bn_row(b: Bench, n: int, seed: int) -> dict[str, float]:
    """The coursework row's ensemble, BatchNorm statistics re-estimated without Dropout: the same models
    as training with ``recalibrate_bn=True`` (the re-estimation comes after training), without retraining."""
    from diffuseg.train.ddpm_seg import labelled_feature_store, recalibrate_batchnorm

    pipe, source, cfg = ensemble_pipe(b, "ddpm+aug+adamw", n, seed)
    images, labels, _ = labelled(b, n, seed)
    rc = recipe(BN_ROW, b.args, seed)
    store = labelled_feature_store(images, labels, source, cfg, rc, b.work / "train", not b.args.no_progress)
    recalibrate_batchnorm(pipe.ensemble.models, store, seed=rc.seed)
    return b.scores(b.predict_store(pipe, {"identity": b.val_store(source, cfg)}))


def run_tta_row(b: Bench, n: int, seed: int) -> dict[str, float]:
    from diffuseg.methods.ddpm_seg import TTA_VIEWS

    pipe, source, cfg = ensemble_pipe(b, "ddpm+aug+adamw", n, seed)
    return b.scores(b.predict_store(pipe, {v: b.val_store(source, cfg, v) for v in TTA_VIEWS}))


def run_tta_views(b: Bench, n: int, seed: int) -> None:
    """Score the TTA row's ensemble on each view alone and on other merges of its views.

    Why: the 5-view vote scores below the un-augmented prediction; this says whether one view (e.g. a
    strong photometric one) drags the vote down, or whether voting itself does. Each view is predicted
    once; recorded as the TTA row's cells tagged as in :data:`TTA_DIAGNOSTICS`, with the seconds of the
    views they read."""
    from diffuseg.methods.ddpm_seg import TTA_VIEWS, merge_views

    todo = [t for t in TTA_DIAGNOSTICS if b.get(TTA_ROW, n, seed, t) is None]
    if not todo:
        return
    pipe, source, cfg = ensemble_pipe(b, "ddpm+aug+adamw", n, seed)
    preds, secs = {}, {}
    for v in TTA_VIEWS:
        t0 = time.perf_counter()
        preds |= b.view_predictions(pipe, {v: b.val_store(source, cfg, v)})
        secs[v] = time.perf_counter() - t0
    for tag in todo:
        rule, views = TTA_DIAGNOSTICS[tag]
        _, _, probs, _ = merged = merge_views([preds[v] for v in views])
        m = b.scores((probs.argmax(1) if rule == "soft" else merged[0]).numpy())
        b.record(TTA_ROW, n, seed, m, sum(secs[v] for v in views), tag=tag)


def segmenter_config(b: Bench, out: Path, seed: int, num_images: int):
    from diffuseg.train import TrainConfig

    return TrainConfig(
        output_dir=str(out), max_steps=b.args.segmenter_steps,
        batch_size=min(num_images, b.args.segmenter_batch),
        lr=1e-3, weight_decay=1e-4, warmup_steps=min(100, b.args.segmenter_steps // 10),
        lr_schedule="cosine", seed=seed, checkpoint_every=max(1, b.args.segmenter_steps // 4),
        log_every=max(1, b.args.segmenter_steps // 20), progress=not b.args.no_progress,
    )  # fmt: skip


def score_segmenter(b: Bench, res: TrainResult) -> dict[str, float]:
    """Score a finished segmenter training; an interrupted one (SIGTERM, time box) stops the run."""
    from diffuseg.methods.dataset_ddpm import UNetSegmenterPipeline

    if not res.finished or res.export_dir is None:
        raise SystemExit(f"segmenter training in {res.output_dir} stopped at step {res.step}: rerun")
    seg = UNetSegmenterPipeline.from_pretrained(res.export_dir)
    return b.scores(seg(b.val_images, output_size=b.val_labels.shape[-1]).labels)


def run_unet_row(b: Bench, n: int, seed: int) -> dict[str, float]:
    from diffuseg.methods.dataset_ddpm import train_segmenter

    images, labels, ids = labelled(b, n, seed)
    out = b.work / "unet" / f"n{n}_s{seed}"
    cfg = segmenter_config(b, out, seed, len(images))
    res = train_segmenter(images, labels, b.meta["classes"], cfg, palette=b.meta.get("palette"))
    return score_segmenter(b, res)


def run_datasetddpm_row(b: Bench, n: int, seed: int) -> dict[str, float]:
    from diffuseg.methods.dataset_ddpm import generate_dataset_ddpm, train_segmenter
    from diffuseg.train.ddpm_seg import load_labelled, select_labelled

    pipe, _, _ = ensemble_pipe(b, "ddpm", n, seed)
    syn = b.work / "datasetddpm" / f"n{n}_s{seed}"
    if not (syn / "meta.json").is_file():
        prompts = _captions(b.data) if b.args.prompts == "captions" else None
        generate_dataset_ddpm(
            pipe, syn, b.args.synthetic, prompts, drop_fraction=0.1, seed=seed, batch_size=16,
            num_inference_steps=b.args.sampling_steps, progress=not b.args.no_progress,
        )  # fmt: skip
    kept = len(list((syn / "ann_dir" / "train").glob("*.png")))
    images, labels = load_labelled(syn, select_labelled(syn, kept, 0))
    cfg = segmenter_config(b, b.work / "datasetddpm_unet" / f"n{n}_s{seed}", seed, len(images))
    res = train_segmenter(images, labels, b.meta["classes"], cfg, palette=b.meta.get("palette"))
    return score_segmenter(b, res)


def _captions(data: Path) -> list[str]:
    lines = (data / "captions" / "train.jsonl").read_text().splitlines()
    return [json.loads(line)["caption"] for line in lines if line.strip()]


def run_table(b: Bench) -> None:
    a = b.args
    sizes = [int(x) for x in a.sizes.split(",")]
    seeds = [int(x) for x in a.seeds.split(",")]
    rows = [r for r in ROWS if r in a.rows.split(",")] if a.rows != "all" else list(ROWS)
    dd_sizes = {int(x) for x in a.dataset_ddpm_sizes.split(",")} if a.dataset_ddpm_sizes else set(sizes)
    for n in sizes:
        for seed in seeds:
            for row in rows:
                if (row == "datasetddpm" and n not in dd_sizes) or b.get(row, n, seed) is not None:
                    continue
                t0 = time.perf_counter()
                if row in ENSEMBLE_ROWS:
                    m = run_ensemble_row(b, row, n, seed)
                elif row == TTA_ROW:
                    m = run_tta_row(b, n, seed)
                elif row == BN_ROW:
                    m = run_bn_row(b, n, seed)
                elif row == "unet":
                    m = run_unet_row(b, n, seed)
                else:
                    m = run_datasetddpm_row(b, n, seed)
                b.record(row, n, seed, m, time.perf_counter() - t0)


def run_sweep(b: Bench) -> list[tuple[list[str], list[int]]]:
    """Blocks (at the default timesteps) and timesteps (with the default blocks) at N=sweep-n, seed 0."""
    a = b.args
    default_layers, default_ts = a.layers.split(","), [int(t) for t in a.timesteps.split(",")]
    configs = [(lay, default_ts) for lay in SWEEP_LAYERS] + [(default_layers, ts) for ts in SWEEP_TIMESTEPS]
    configs = [c for i, c in enumerate(configs) if c not in configs[:i]]  # the default appears in both lists
    for lay, ts in configs:
        tag = f"{'+'.join(x.split('.')[-1] for x in lay)}@{','.join(map(str, ts))}"
        cfg = b.feature_config("ddpm", lay, ts)
        if b.get("sweep", a.sweep_n, 0, tag, features=cfg) is not None:
            continue
        t0 = time.perf_counter()
        pipe, source, cfg = ensemble_pipe(b, "ddpm", a.sweep_n, 0, cfg_override=cfg, tag=f"_sweep_{tag}")
        m = b.scores(b.predict_store(pipe, {"identity": b.val_store(source, cfg)}))
        b.record("sweep", a.sweep_n, 0, m, time.perf_counter() - t0, tag=tag, features=cfg)
    return configs


# ----------------------------------------------------------------------------- report
def seed_cell(values: list[float], num_seeds: int) -> str:
    """'m ± s' over the finished seeds, marked '(k/n seeds)' while some are missing; '-' when none are."""
    if not values:
        return "-"
    part = f" ({len(values)}/{num_seeds} seeds)" if len(values) < num_seeds else ""
    return mean_std(values) + part


def render_table(b: Bench, elapsed: float) -> str:
    a = b.args
    sizes = [int(x) for x in a.sizes.split(",")]
    seeds = [int(x) for x in a.seeds.split(",")]
    tables = []
    done = {(row, n, s): b.get(row, n, s) for row in ROWS for n in sizes for s in seeds}
    for metric, title in zip(METRICS, ("fine mIoU", "coarse-group mIoU", "foreground IoU"), strict=True):
        body = []
        for row in ROWS:
            cells = []
            for n in sizes:
                vals = [done[row, n, s][metric] for s in seeds if done[row, n, s] is not None]
                cells.append(seed_cell(vals, len(seeds)))
            if any(c != "-" for c in cells):
                body.append([ROW_LABELS[row], *cells])
        tables += [f"**{title}** (percent; mean ± std over seeds {', '.join(map(str, seeds))}; "
                   "a cell marked (k/n seeds) averages the seeds finished so far)", "",
                   markdown_table(["method", *[f"N={n}" for n in sizes]], body), ""]  # fmt: skip
    secs = [r["seconds"] for r in done.values() if r is not None]
    views = {(t, n, s): b.get(TTA_ROW, n, s, t) for t in TTA_DIAGNOSTICS for n in sizes for s in seeds}
    ceil = grid_ceiling(b, (4, 8, 16, 32))
    return "\n".join(
        [
            "## DDPM-Segmentation on FashionScenes",
            "",
            provenance(threads=1),
            f"- data: `{b.data}`, val: first {len(b.val_images)} scenes; N labelled train scenes drawn "
            "per seed (`numpy.random.default_rng(seed).choice`, as the baselines)",
            f"- backbone: `{a.backbone or 'shipped mini-SD'}` (weights {b.backbone_fingerprint}); "
            f"blocks {a.layers}; timesteps {a.timesteps}; "
            f"ensemble of {a.num_models} MLPs"
            + (
                f", capped at {a.max_iterations} iterations each"
                if a.max_iterations
                else ", original stopping rule"
            ),
            f"- small UNet: {a.segmenter_steps} steps; DatasetDDPM: {a.synthetic} samples "
            f"({a.sampling_steps} DDIM steps, prompts: {a.prompts}), 10% most uncertain dropped",
            f"- compute: {sum(secs) / 3600:.1f} h over all units (this invocation: {elapsed / 60:.0f} min)",
            "",
            *tables,
            "**Targets** (fine mIoU; each comparison averages the seeds both rows finished):",
            "",
            *(f"- {line}" for line in target_lines(done, sizes, seeds)),
            "",
            "**Feature-grid ceiling** (what resolution alone allows: val labels one-hot, area-averaged to "
            "g×g, upsampled bilinearly like the features, argmax; fine mIoU): "
            + ", ".join(f"g = {g}: {v:.1f}" for g, v in ceil.items())
            + f". The DDPM features' grids: {' and '.join(f'{g}²' for g in ddpm_grids(b))} "
            f"(blocks {a.layers}, {b.val_labels.shape[-1]}-px labels).",
            *tta_view_tables(done, views, sizes, seeds),
        ]
    )


def tta_view_tables(done: dict, views: dict, sizes: list[int], seeds: list[int]) -> list[str]:
    """Fine mIoU and foreground IoU of the TTA row's ensembles per view and per vote (``--tta-views``
    cells, keyed ``(tag, N, seed)``); nothing when none is recorded. The identity view alone is the
    '+ AdamW + Dropout' row, the vote of all five the TTA row (read on the seeds that have views)."""
    if not any(v is not None for v in views.values()):
        return []
    cells = {**views, **{("vote-all", n, s): done.get((TTA_ROW, n, s)) for n in sizes for s in seeds}}
    # every row averages the same seeds: those with view cells at that N
    viewed = {n: [s for s in seeds if any(views.get((t, n, s)) for t in TTA_DIAGNOSTICS)] for n in sizes}
    labels = {t: f"view '{t.removeprefix('view-')}' alone" for t in TTA_DIAGNOSTICS if t.startswith("view-")}
    labels["vote-without-grey"] = "vote of the 4 views other than 'grey'"
    labels["soft-all"] = "all 5, mean probabilities (soft vote)"
    labels["vote-all"] = f"vote of all 5 ({ROW_LABELS[TTA_ROW]})"
    out = ["", "**TTA, view by view** (`--tta-views`: the '+ AdamW + Dropout 0.4' ensembles scored on each "
           "view alone, geometric views inverted, and on other merges of the views):", ""]  # fmt: skip
    for metric, title in (("mIoU", "fine mIoU"), ("foreground_IoU", "foreground IoU")):
        body = []
        for tag, label in labels.items():
            recs = [[cells.get((tag, n, s)) for s in viewed[n]] for n in sizes]
            body.append([label, *(seed_cell([r[metric] for r in rs if r], len(seeds)) for rs in recs)])
        out += [markdown_table([title, *[f"N={n}" for n in sizes]], body), ""]
    return out[:-1]


def _seed_values(done: dict, row: str, n: int, seeds: list[int]) -> list[float]:
    return [done[row, n, s]["mIoU"] for s in seeds if done.get((row, n, s)) is not None]


def target_lines(done: dict, sizes: list[int], seeds: list[int]) -> list[str]:
    """The issue's targets, each judged on the means over the seeds both rows finished; "not run" when
    they share none, and a margin smaller than the larger of the two seed spreads is flagged as such."""

    def verdict(row: str, ref: str, n: int, strict: bool) -> str:
        both = [s for s in seeds if done.get((row, n, s)) is not None and done.get((ref, n, s)) is not None]
        if not both:
            return "not run"
        a, b = _seed_values(done, row, n, both), _seed_values(done, ref, n, both)
        ma, mb = statistics.mean(a), statistics.mean(b)
        ok = ma > mb if strict else ma >= mb
        if len(both) == 1:
            note = f" (seed {both[0]} only)"
        else:
            spread = max(statistics.stdev(v) for v in (a, b))
            note = " (within the seeds' spread)" if abs(ma - mb) < spread else ""
        return f"{ma:.1f} vs {mb:.1f}: {'holds' if ok else 'missed'}{note}"

    lines = []
    for ref in ("rgbxy", "random"):
        per_n = ", ".join(f"N={n} {verdict('ddpm', ref, n, True)}" for n in sizes)
        lines.append(f"DDPM features above {ROW_LABELS[ref]}: {per_n}")
    if 10 in sizes:
        for ref in ("effnet", "unet"):
            lines.append(f"N=10, DDPM features ≥ {ROW_LABELS[ref]}: {verdict('ddpm', ref, 10, False)}")
    steps = ("ddpm", "ddpm+aug", "ddpm+aug+adamw", "ddpm+aug+adamw+tta")
    for prev, row in [*zip(steps, steps[1:], strict=False), ("ddpm+aug", BN_ROW)]:
        per_n = ", ".join(f"N={n} {verdict(row, prev, n, False)}" for n in sizes)
        lines.append(f"'{ROW_LABELS[row]}' does not lower mIoU (vs '{ROW_LABELS[prev]}'): {per_n}")
    return lines


def ddpm_grids(b: Bench) -> list[int]:
    """Sides of the ``ddpm`` row's feature maps (one backbone pass on a blank image)."""
    source, _ = b.source("ddpm")
    r = source.resolution
    return sorted({int(m.shape[-1]) for m in source.maps(torch.zeros(1, 3, r, r))})


def grid_ceiling(b: Bench, grids: tuple[int, ...]) -> dict[int, float]:
    """Fine mIoU of the val labels after a round trip through a g×g grid: the best any classifier on
    features of that resolution could do if the features knew each cell's class fractions exactly."""
    import torch.nn.functional as F

    from diffuseg.eval import SegmentationEvaluator

    classes, ignore = b.meta["classes"], int(b.meta["ignore_index"])
    lab = torch.from_numpy(b.val_labels.astype(np.int64))
    onehot = F.one_hot(lab.clamp(0, len(classes) - 1), len(classes)).permute(0, 3, 1, 2).float()
    onehot = onehot * (lab != ignore)[:, None]
    out = {}
    for g in grids:
        up = F.interpolate(F.adaptive_avg_pool2d(onehot, g), size=lab.shape[-1], mode="bilinear")
        ev = SegmentationEvaluator(classes, ignore_index=ignore)
        ev.update(up.argmax(1).numpy(), b.val_labels)
        out[g] = float(ev.report("ceiling", b.meta["name"], "val")["metrics"]["mIoU"])
    return out


def table_json(b: Bench) -> dict:
    """``{row: {N: {metric: [per-seed values]}}}`` of the finished cells, with the backbone's weights hash."""
    cells: dict[str, dict[str, dict[str, list[float]]]] = {}
    for row in ROWS:
        for n in (int(x) for x in b.args.sizes.split(",")):
            done = [r for s in b.args.seeds.split(",") if (r := b.get(row, n, int(s))) is not None]
            if done:
                cells.setdefault(row, {})[str(n)] = {m: [float(r[m]) for r in done] for m in METRICS}
    return {"backbone": b.args.backbone, "backbone_weights": b.backbone_fingerprint, "cells": cells}


def render_sweep(b: Bench, configs) -> str:
    rows, best = [], None
    for lay, ts in configs:
        tag = f"{'+'.join(x.split('.')[-1] for x in lay)}@{','.join(map(str, ts))}"
        r = b.get("sweep", b.args.sweep_n, 0, tag, features=b.feature_config("ddpm", lay, ts))
        if r:
            rows.append([", ".join(lay), ", ".join(map(str, ts)), *(f"{r[m]:.1f}" for m in METRICS)])
            best = max(best or (r["mIoU"], lay, ts), (r["mIoU"], lay, ts), key=lambda v: v[0])
    return "\n".join(
        [
            "## DDPM-Segmentation: decoder blocks × timesteps on the mini-SD",
            "",
            provenance(threads=1),
            f"- N = {b.args.sweep_n} labelled scenes (seed 0), val: first {len(b.val_images)} scenes; "
            f"ensemble of {b.args.num_models} MLPs",
            "",
            markdown_table(["blocks", "timesteps", "mIoU", "coarse mIoU", "foreground IoU"], rows),
            "",
            f"Best fine mIoU: blocks {', '.join(best[1])} at t = {', '.join(map(str, best[2]))} "
            f"({best[0]:.1f}); one seed, so differences below ~1 point are noise."
            if best
            else "No configuration finished.",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="FashionScenes folder (default: generate one into WORK)")
    p.add_argument("--num-train", type=int, default=200, help="scenes to generate when --data is not given")
    p.add_argument("--num-val", type=int, default=500, help="val scenes scored (the first ones)")
    p.add_argument("--backbone", default=None, help="mini-SD folder (default: shipped), or random:mini-sd")
    p.add_argument("--layers", default="up_blocks.0,up_blocks.1,up_blocks.2")
    p.add_argument("--timesteps", default="50,150,250")
    p.add_argument("--sizes", default="5,10,20,50,100")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rows", default="all", help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--num-models", type=int, default=10)
    p.add_argument("--max-iterations", type=int, default=None, help="cap per MLP (default: original rule)")
    p.add_argument("--adamw-dropout", type=float, default=0.4, help="Dropout of the '+ AdamW + Dropout' row")
    p.add_argument(
        "--adamw-weight-decay", type=float, default=1e-4, help="AdamW weight decay of that row (0: Adam)"
    )
    p.add_argument("--segmenter-steps", type=int, default=2000)
    p.add_argument("--segmenter-batch", type=int, default=16)
    p.add_argument("--synthetic", type=int, default=500, help="DatasetDDPM samples before filtering")
    p.add_argument("--sampling-steps", type=int, default=25, help="DDIM steps for DatasetDDPM")
    p.add_argument("--prompts", choices=("empty", "captions"), default="captions")
    p.add_argument(
        "--dataset-ddpm-sizes", default="10", help="N values that get a DatasetDDPM row ('' = all)"
    )
    p.add_argument("--sweep", action="store_true", help="measure blocks × timesteps instead of the table")
    p.add_argument("--sweep-n", type=int, default=10)
    p.add_argument(
        "--tta-views", action="store_true", help="also score the TTA row's ensembles view by view (cheap)"
    )
    p.add_argument("--work-dir", default="runs/ddpmseg-fashion")
    p.add_argument("--records-dir", default=str(RECORDS_DIR), help="finished cells (commit them)")
    p.add_argument("--no-records", action="store_true", help="keep the cell records in WORK/records instead")
    p.add_argument("--out", default=str(RESULTS_MD))
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--recorded-only", action="store_true", help="run nothing: tabulate the recorded cells")
    p.add_argument("--json-out", type=Path, help="also write the finished cells as JSON (for model cards)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    b = Bench(args)
    if args.sweep:
        body, section = render_sweep(b, run_sweep(b)), SWEEP_SECTION_ID
    else:
        if not args.recorded_only:
            run_table(b)
            if args.tta_views:
                for n in (int(x) for x in args.sizes.split(",")):
                    for seed in (int(x) for x in args.seeds.split(",")):
                        run_tta_views(b, n, seed)
        body, section = render_table(b, time.perf_counter() - t0), SECTION_ID
        if args.json_out:
            write_json(args.json_out, table_json(b))
    if args.no_write:
        sys.stdout.write(body + "\n")
    else:
        logger.info("wrote %s", write_results_section(section, body, args.out))


if __name__ == "__main__":
    main()
