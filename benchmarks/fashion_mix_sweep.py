"""Sweep FashionScenes appearance mixes against colour-only baselines.

Why: FEASIBILITY.md found that with flat item tints, K-means on RGB pixels segments scenes as well
as a diffusion model. This script measures, for a few candidate style mixes, how far trivial
colour baselines get, so the default mix leaves headroom for methods that see shape.

Scoring (local, tiny): per-image Hungarian matching of predicted clusters to ground-truth classes
(``linear_sum_assignment`` maximising overlap, DiffSeg's per-image protocol); per image, the mean
IoU over the classes present in its ground truth (unmatched classes score 0); averaged over images.

Run: ``python benchmarks/fashion_mix_sweep.py --num 300`` (about a minute per mix on one core).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.ensemble import HistGradientBoostingClassifier

from diffuseg.data.fashion_scenes import FashionScenesConfig, FashionScenesGenerator

MIXES: dict[str, dict] = {
    "flat": {"style_probs": {"flat": 1.0}},
    "flat+palette": {"style_probs": {"palette": 0.5, "flat": 0.5}},
    "mix-default": {"style_probs": {"palette": 0.4, "texture": 0.4, "flat": 0.2}},
    "palette+texture": {"style_probs": {"palette": 0.5, "texture": 0.5}},
    "mix-camouflage": {
        "style_probs": {"palette": 0.4, "texture": 0.4, "flat": 0.2},
        "texture_from_background_prob": 0.3,
    },
}


def hungarian_image_miou(gt: np.ndarray, pred: np.ndarray, ignore_index: int = 255) -> float:
    """Mean IoU over the GT classes of one image after one-to-one cluster->class matching."""
    valid = gt != ignore_index
    g, p = gt[valid], pred[valid]
    classes, g_idx = np.unique(g, return_inverse=True)
    clusters, p_idx = np.unique(p, return_inverse=True)
    hist = np.zeros((len(classes), len(clusters)), np.int64)
    np.add.at(hist, (g_idx, p_idx), 1)
    rows, cols = linear_sum_assignment(hist, maximize=True)
    ious = np.zeros(len(classes))
    gt_area, pred_area = hist.sum(1), hist.sum(0)
    for r, c in zip(rows, cols, strict=True):
        tp = hist[r, c]
        ious[r] = tp / (gt_area[r] + pred_area[c] - tp)
    return float(ious.mean())


def kmeans_rgb(image: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """K-means on the image's RGB pixels (k clusters), returned as an (H, W) cluster map."""
    x = image.reshape(-1, 3).astype(np.float32)
    k = max(1, min(k, len(np.unique(x, axis=0))))
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(x)
    return km.labels_.reshape(image.shape[:2])


def kmeans_rgbxy(image: np.ndarray, k: int, xy_weight: float = 0.5, seed: int = 0) -> np.ndarray:
    """K-means on RGB + pixel coordinates (scaled to 0-255 times ``xy_weight``)."""
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xy = np.stack([yy / max(h - 1, 1), xx / max(w - 1, 1)], -1) * 255 * xy_weight
    x = np.concatenate([image.astype(np.float32), xy], -1).reshape(-1, 5)
    return KMeans(n_clusters=k, n_init=3, random_state=seed).fit(x).labels_.reshape(h, w)


def _rgbxy(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xy = np.stack([yy / max(h - 1, 1), xx / max(w - 1, 1)], -1) * 255
    return np.concatenate([image.astype(np.float32), xy], -1).reshape(-1, 5)


def pixel_classifier_fg_iou(gen: FashionScenesGenerator, num_train: int, num_val: int) -> float:
    """Foreground-vs-background IoU of a per-pixel classifier on RGB+xy with ``num_train`` labels.

    A supervised colour floor: how much of "where are the items" colour and position alone give.
    """
    train = [gen.scene("train", i) for i in range(num_train)]
    x = np.concatenate([_rgbxy(s.image) for s in train])
    y = np.concatenate([(s.label > 0).ravel() for s in train])
    clf = HistGradientBoostingClassifier(max_iter=100, random_state=0).fit(x, y)
    inter = union = 0
    for i in range(num_val):
        s = gen.scene("val", i)
        pred = clf.predict(_rgbxy(s.image)).astype(bool)
        gt = (s.label > 0).ravel()
        inter += int((pred & gt).sum())
        union += int((pred | gt).sum())
    return inter / max(union, 1)


def evaluate_mix(name: str, overrides: dict, num: int, seed: int) -> dict:
    """Score the trivial baselines on ``num`` val scenes generated with one mix."""
    cfg = dataclasses.replace(FashionScenesConfig(), **overrides)
    gen = FashionScenesGenerator(cfg, seed=seed)
    scores: dict[str, list[float]] = {
        "all-background": [],
        "kmeans-rgb-k3": [],
        "kmeans-rgb-true-k": [],
        "kmeans-rgbxy-true-k": [],
    }
    t0 = time.perf_counter()
    for i in range(num):
        sc = gen.scene("val", i)
        gt = sc.label.astype(np.int64)
        scores["all-background"].append(hungarian_image_miou(gt, np.zeros_like(gt)))
        scores["kmeans-rgb-k3"].append(hungarian_image_miou(gt, kmeans_rgb(sc.image, 3)))
        true_k = len(np.unique(gt))
        scores["kmeans-rgb-true-k"].append(hungarian_image_miou(gt, kmeans_rgb(sc.image, true_k)))
        scores["kmeans-rgbxy-true-k"].append(hungarian_image_miou(gt, kmeans_rgbxy(sc.image, true_k)))
    out = {k: round(100 * float(np.mean(v)), 1) for k, v in scores.items()}
    out["fg-iou-pixel-gbdt-rgbxy-50"] = round(100 * pixel_classifier_fg_iou(gen, 50, num), 1)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{name:18s} " + "  ".join(f"{k}={v}" for k, v in out.items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=300, help="val scenes per mix")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mixes", default=",".join(MIXES), help="comma-separated names from MIXES")
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    args = ap.parse_args()
    results = {m: evaluate_mix(m, MIXES[m], args.num, args.seed) for m in args.mixes.split(",")}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"num": args.num, "seed": args.seed, "results": results}, indent=2))


if __name__ == "__main__":
    main()
