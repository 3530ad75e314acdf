"""Floors on FashionScenes val: the numbers every method in diffuseg must clear.

Baselines, all scored with :mod:`diffuseg.eval`:

* **all-background** — predicts class 0 everywhere (supervised protocol).
* **single segment** — one segment per image (unsupervised protocols).
* **K-means** on per-pixel RGB and RGB+xy features, per image, with k = the dataset's mean number
  of classes per image ("K-means-C", one k for all) or k = the image's true number of classes
  ("K-means-S", an oracle on the count). Clusters are renumbered by decreasing size in every
  image (largest = 0), so that dataset-level matching can tie "the largest segment" to background;
  scored with Hungarian matching per image (DiffSeg) and once over the dataset (STEGO).
* **global K-means** — one clustering of all val pixels, k = number of classes, so that cluster
  ids mean the same in every image: the natural floor for dataset-level matching.
* **per-pixel MLP** on RGB+xy trained on N labelled train scenes (N in {10, 50}, 3 seeds):
  fine mIoU, coarse-group mIoU and foreground IoU.

Run from the repository root (≈ 2–3 min on one thread)::

    python benchmarks/baselines_fashion.py --num-train 200 --num-val 300 --seed 0
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans, MiniBatchKMeans
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from _common import RESULTS_MD, markdown_table, mean_std, provenance, write_results_section
from diffuseg.eval import HungarianScorer, SegmentationEvaluator, load_meta, load_split_samples  # noqa: E402

logger = logging.getLogger("baselines_fashion")

SECTION_ID = "baselines-fashion"
SECTION_TITLE = "## Floors: trivial baselines on FashionScenes"
XY_WEIGHT = 1.0  # xy in [0, 1] next to RGB in [0, 1]: a position step across the image ≈ a full colour step
MLP_SIZES = (10, 50)
MLP_SEEDS = (0, 1, 2)


@dataclass
class Split:
    """A split held in memory: FashionScenes val at 64 px is ~4 MB, so this is fine here."""

    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N, H, W) int64


# ----------------------------------------------------------------------------- data
def prepare_data(args: argparse.Namespace) -> Path:
    """The dataset folder: ``--data`` as given, or FashionScenes generated into the cache dir.

    The cache is regenerated on every run (about 2 s): the numbers then always describe the
    current generator, never a stale copy made by an older version of it.
    """
    if args.data is not None:
        return Path(args.data)
    from diffuseg.data.fashion_scenes import generate_fashion_scenes

    cache = Path(args.cache_dir) / f"fashion-scenes-t{args.num_train}-v{args.num_val}-s{args.seed}"
    logger.info("generating FashionScenes into %s", cache)
    generate_fashion_scenes(
        cache, args.num_train, args.num_val, seed=args.seed, size=64, progress=False, overwrite=True
    )
    return cache


def load_split(data_dir: Path, split: str) -> Split:
    """Read all images and labels of one split."""
    samples = list(load_split_samples(data_dir, split))
    return Split(np.stack([s["image"] for s in samples]), np.stack([s["label"] for s in samples]))


def classes_per_image(labels: np.ndarray, ignore_index: int) -> np.ndarray:
    """Number of distinct classes (background included) in each label map."""
    return np.array([np.setdiff1d(np.unique(lab), [ignore_index]).size for lab in labels])


# ----------------------------------------------------------------------------- features
def pixel_features(image: np.ndarray, with_xy: bool) -> np.ndarray:
    """(H*W, 3 or 5) float32: RGB in [0, 1], optionally followed by weighted xy in [0, 1]."""
    h, w, _ = image.shape
    rgb = image.reshape(-1, 3).astype(np.float32) / 255.0
    if not with_xy:
        return rgb
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xy = np.stack([xx.ravel() / max(w - 1, 1), yy.ravel() / max(h - 1, 1)], axis=1) * XY_WEIGHT
    return np.concatenate([rgb, xy], axis=1)


def order_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber cluster ids by decreasing size (0 = largest); ties by old id."""
    ids, counts = np.unique(labels, return_counts=True)
    order = ids[np.lexsort((ids, -counts))]
    remap = np.empty(int(ids.max()) + 1, dtype=np.int64)
    remap[order] = np.arange(order.size)
    return remap[labels]


def kmeans_image(image: np.ndarray, k: int, with_xy: bool, seed: int) -> np.ndarray:
    """Per-image K-means segments, numbered by decreasing size."""
    feats = pixel_features(image, with_xy)
    k = max(1, min(k, len(np.unique(feats, axis=0))))
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(feats)
    return order_by_size(km.labels_.reshape(image.shape[:2]))


# ----------------------------------------------------------------------------- unsupervised rows
def score_unsupervised(
    preds: np.ndarray, labels: np.ndarray, num_classes: int, ignore: int
) -> dict[str, float]:
    """mIoU/ACC under both Hungarian protocols."""
    out = {}
    for matching in ("per_image", "dataset"):
        scorer = HungarianScorer(num_classes, matching, ignore_index=ignore)
        scorer.update(preds, labels)
        m = scorer.compute()["metrics"]
        out[f"{matching}_mIoU"], out[f"{matching}_ACC"] = m["mIoU"], m["aAcc"]
    out["segments"] = float(np.mean([np.unique(p).size for p in preds]))
    return out


def run_kmeans_rows(
    val: Split, k_mean: int, num_classes: int, ignore: int, seed: int, progress: bool
) -> dict[str, dict[str, float]]:
    """Per-image K-means-C / K-means-S on RGB and RGB+xy, plus global K-means."""
    rows: dict[str, dict[str, float]] = {}
    counts = classes_per_image(val.labels, ignore)
    n = len(val.images)
    rows["single segment"] = score_unsupervised(np.zeros_like(val.labels), val.labels, num_classes, ignore)
    for with_xy, feat in ((False, "RGB"), (True, "RGB+xy")):
        for tag, ks in (("C", np.full(n, k_mean)), ("S", counts)):
            t0 = time.perf_counter()
            desc = f"K-means-{tag} {feat}"
            preds = np.stack(
                [
                    kmeans_image(img, int(k), with_xy, seed)
                    for img, k in tqdm(
                        zip(val.images, ks, strict=True), total=n, desc=desc, disable=not progress
                    )
                ]
            )
            name = (
                f"K-means-{tag} ({feat}, k={k_mean})" if tag == "C" else f"K-means-S ({feat}, k=true count)"
            )
            rows[name] = score_unsupervised(preds, val.labels, num_classes, ignore)
            rows[name]["seconds"] = time.perf_counter() - t0
        rows[f"global K-means ({feat}, k={num_classes})"] = global_kmeans(
            val, num_classes, with_xy, ignore, seed
        )
    return rows


def global_kmeans(val: Split, k: int, with_xy: bool, ignore: int, seed: int) -> dict[str, float]:
    """One clustering shared by all val images (fit on a pixel sample, applied image by image)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    feats = [pixel_features(img, with_xy) for img in val.images]
    per_image = max(1, 60_000 // len(feats))
    sample = np.concatenate([f[rng.choice(len(f), per_image, replace=False)] for f in feats])
    km = MiniBatchKMeans(n_clusters=k, n_init=3, random_state=seed, batch_size=4096).fit(sample)
    preds = np.stack([km.predict(f).reshape(val.labels.shape[1:]) for f in feats])
    row = score_unsupervised(preds, val.labels, k, ignore)
    row["seconds"] = time.perf_counter() - t0
    return row


# ----------------------------------------------------------------------------- supervised rows
def evaluator(meta: dict) -> SegmentationEvaluator:
    return SegmentationEvaluator(
        meta["classes"], ignore_index=int(meta["ignore_index"]), coarse_groups=meta.get("coarse_groups")
    )


def supervised_scores(preds: np.ndarray, labels: np.ndarray, meta: dict) -> dict[str, float]:
    """Fine mIoU/aAcc/mAcc, coarse mIoU and foreground IoU of a set of label maps."""
    ev = evaluator(meta)
    ev.update(preds, labels)
    m = ev.report("baseline", meta["name"], "val")["metrics"]
    return {k: m[k] for k in ("mIoU", "aAcc", "mAcc", "coarse_mIoU", "foreground_IoU")}


class PixelMLP(torch.nn.Module):
    """A two-hidden-layer per-pixel classifier: the floor for "label-efficient" methods."""

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(in_dim, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_mlp(
    train: Split, idx: np.ndarray, num_classes: int, ignore: int, seed: int, steps: int
) -> tuple[PixelMLP, np.ndarray, np.ndarray]:
    """Fit the MLP on the pixels of the scenes ``idx``; returns it with the feature mean/std."""
    x = np.concatenate([pixel_features(train.images[i], True) for i in idx])
    y = np.concatenate([train.labels[i].ravel() for i in idx])
    keep = y != ignore
    x, y = x[keep], y[keep]
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt = torch.from_numpy((x - mu) / sd)
    yt = torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = PixelMLP(x.shape[1], num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        b = torch.randint(0, len(xt), (4096,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(xt[b]), yt[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, mu, sd


@torch.no_grad()
def predict_mlp(model: PixelMLP, images: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Per-pixel argmax over all images."""
    feats = np.stack([pixel_features(img, True) for img in images])
    logits = model(torch.from_numpy((feats - mu) / sd).float())
    return logits.argmax(-1).numpy().reshape(images.shape[:3])


def run_supervised_rows(train: Split, val: Split, meta: dict, steps: int, progress: bool) -> dict[str, dict]:
    """All-background and the MLP for each N and seed (values kept per seed for mean ± std)."""
    ignore, c = int(meta["ignore_index"]), len(meta["classes"])
    rows: dict[str, dict] = {
        "all-background": {
            k: [v] for k, v in supervised_scores(np.zeros_like(val.labels), val.labels, meta).items()
        }
    }
    for n in MLP_SIZES:
        if n > len(train.images):
            raise ValueError(f"need at least {n} train scenes for the MLP baseline, have {len(train.images)}")
        per_seed: dict[str, list[float]] = {}
        for seed in tqdm(MLP_SEEDS, desc=f"MLP N={n}", disable=not progress):
            idx = np.random.default_rng(seed).choice(len(train.images), n, replace=False)
            model, mu, sd = train_mlp(train, idx, c, ignore, seed, steps)
            for k, v in supervised_scores(predict_mlp(model, val.images, mu, sd), val.labels, meta).items():
                per_seed.setdefault(k, []).append(v)
        rows[f"pixel MLP on RGB+xy, N={n}"] = per_seed
    return rows


# ----------------------------------------------------------------------------- report
def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def render(
    args: argparse.Namespace,
    data_dir: Path,
    val: Split,
    meta: dict,
    k_mean: int,
    unsup: dict,
    sup: dict,
    elapsed: float,
) -> str:
    """The markdown body of the results section."""
    ignore = int(meta["ignore_index"])
    counts = classes_per_image(val.labels, ignore)
    bg_share = 100.0 * np.mean(val.labels[val.labels != ignore] == 0)
    gen = meta.get("generator", {})
    source = f"generated with seed {gen.get('seed', args.seed)}" if args.data is None else f"`{data_dir}`"
    unsup_rows = [
        [
            name,
            f"{r['segments']:.2f}",
            _f(r["per_image_mIoU"]),
            _f(r["per_image_ACC"]),
            _f(r["dataset_mIoU"]),
            _f(r["dataset_ACC"]),
        ]
        for name, r in unsup.items()
    ]
    sup_rows = [
        [name, *(mean_std(r[k]) for k in ("mIoU", "aAcc", "mAcc", "coarse_mIoU", "foreground_IoU"))]
        for name, r in sup.items()
    ]
    return "\n".join(
        [
            SECTION_TITLE,
            "",
            provenance(threads=1),
            f"- data: FashionScenes val, {len(val.images)} scenes of "
            f"{val.images.shape[1]}×{val.images.shape[2]} ({source}); {counts.mean():.2f} classes per "
            f"image on average (background included), so K-means-C uses k = {k_mean}; background is "
            f"{bg_share:.1f}% of the labelled pixels",
            f"- total run time: {elapsed:.0f} s",
            "",
            "**Unsupervised protocols** (segments matched to the 11 classes by the Hungarian algorithm; "
            "percent). Per-image K-means clusters are numbered by decreasing size in every image; "
            "global K-means clusters one pixel sample of all val images, so its ids are shared.",
            "",
            markdown_table(
                [
                    "method",
                    "segments/img",
                    "mIoU (per image)",
                    "ACC (per image)",
                    "mIoU (dataset)",
                    "ACC (dataset)",
                ],
                unsup_rows,
            ),
            "",
            "**Supervised protocol** (fine classes; coarse groups and foreground IoU as in "
            "`meta.json`'s `coarse_groups`; MLP: mean ± std over seeds "
            f"{', '.join(map(str, MLP_SEEDS))}, each seed drawing its own N train scenes; "
            f"{args.mlp_steps} Adam steps of 4096 pixels).",
            "",
            markdown_table(["method", "mIoU", "aAcc", "mAcc", "coarse mIoU", "foreground IoU"], sup_rows),
            "",
            "Reading: per-image matching flatters any segmenter (each image gets its own best "
            "assignment), and K-means-S is told the true number of classes. ACC and aAcc are "
            "dominated by the background (a single segment or all-background scores its pixel "
            "share), so compare mIoU. A method that sees shape should clear the per-image K-means "
            "rows, and a supervised method trained on N scenes should clear the MLP with the same N.",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="existing FashionScenes folder (else one is generated)")
    p.add_argument(
        "--cache-dir", default="data", help="where to generate FashionScenes when --data is not given"
    )
    p.add_argument("--num-train", type=int, default=200)
    p.add_argument("--num-val", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mlp-steps", type=int, default=1500)
    p.add_argument("--out", default=str(RESULTS_MD), help="markdown file whose section is replaced")
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with threadpool_limits(1):
        data_dir = prepare_data(args)
        meta = load_meta(data_dir)
        val, train = load_split(data_dir, "val"), load_split(data_dir, "train")
        ignore, c = int(meta["ignore_index"]), len(meta["classes"])
        k_mean = int(round(classes_per_image(val.labels, ignore).mean()))
        progress = not args.no_progress
        unsup = run_kmeans_rows(val, k_mean, c, ignore, args.seed, progress)
        sup = run_supervised_rows(train, val, meta, args.mlp_steps, progress)
    body = render(args, data_dir, val, meta, k_mean, unsup, sup, time.perf_counter() - t0)
    if args.no_write:
        sys.stdout.write(body + "\n")
    else:
        logger.info("wrote %s", write_results_section(SECTION_ID, body, args.out))


if __name__ == "__main__":
    main()
