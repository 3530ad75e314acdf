"""ZS3D on FashionScenes val (unseen: sandal, coat): the zero-shot table of docs/results.md.

Rows, all scored with :mod:`diffuseg.eval` (mmseg semantics, seen/unseen/hIoU from meta.json):

* **ZS3D** with the checkpoint's calibrated margin γ (chosen without unseen labels), RS(N) for
  every N of ``--rs``; **ZS3D without calibration** (γ = 0); with the original's matched-noise
  guidance instead of clean guidance (decoupled-noise models);
* the **SPNet-like baseline** (same UNet regressing the class embedding in one pass, same
  classifier), with its own calibrated γ and without;
* a diagnostic, clearly marked: the best γ on val *with* unseen labels (an oracle, used for no
  choice), to show how much the label-free calibration leaves on the table.

Each cell (model, sampling setting, images) is one sampling pass with γ = 0 and the same seed;
calibration is a constant shift of the seen-class scores, so the pass yields the metrics at every
γ of the grid and every γ row reuses them exactly. Cells are recorded under
``benchmarks/records/zs3d-fashion/`` (reused only with the same weights, data and settings): the
table can be filled across sessions, or by processes in parallel (``--cells``), then tabulated
with ``--recorded-only``. ``--augment`` adds the data
augmentation experiment: a small supervised segmenter trained on ``--aug-real`` labelled scenes,
alone and with ``--aug-gen`` ZS3D pairs (guided, ρ = ``--aug-rho``; and unconditional).

Run from the repository root with the shipped models (or the ``final/`` folders of new runs;
docs/training.md)::

    python benchmarks/zs3d_fashion.py --data /work/data/fashion_scenes \\
        --zs3d checkpoints/zs3d --baseline checkpoints/zs3d-spnet --num-images 500 \\
        --rs 0,1,5,10 --rs-images 100 --augment
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import (
    RESULTS_MD,
    dataset_fingerprint,
    load_record,
    markdown_table,
    mean_std,
    model_fingerprint,
    provenance,
    save_record,
    write_results_section,
)
from diffuseg.eval import ConfusionMatrix, load_meta, load_split_samples  # noqa: E402
from diffuseg.methods.zs3d import ZS3DPipeline, build_unet, images_to_tensor  # noqa: E402

logger = logging.getLogger("zs3d_fashion")

SECTION_ID = "zs3d-fashion"
FIGURE = RESULTS_MD.parent / "figures" / "zs3d_fashion.png"


# ------------------------------------------------------------------------------------------ scoring
GAMMAS = [round(float(g), 4) for g in np.linspace(0.0, 2.0, 201)]  # the calibration grid (configs/zs3d.yaml)


@dataclass
class Cell:
    """One model setting over the evaluated images: its metrics at every margin γ of the grid, and speed.

    Calibration is a constant shift of the seen-class scores, so the (γ = 0) scores of one sampling
    pass give the labels at every γ. A cell keeps, per γ, mIoU, seen, unseen, hIoU and per-class IoU
    (not score maps): a record of ~20 kB that does not depend on the model's calibrated γ (a
    recalibration reuses it), and memory stays flat however many images.
    """

    names: list[str]
    points: dict[float, dict[str, Any]]  # γ -> {"metrics": {...}, "per_class": {name: {"IoU": v}}}
    seconds_per_image: float
    num_images: int

    def report(self, gamma: float) -> dict[str, Any]:
        hits = [g for g in self.points if abs(g - gamma) < 1e-6]
        if not hits:
            raise ValueError(
                f"γ = {gamma} is not on the grid this cell was scored on ({min(self.points)}.."
                f"{max(self.points)}, {len(self.points)} points): rerun it with --no-records, or calibrate "
                "on the same grid"
            )
        return self.points[hits[0]]

    def to_record(self) -> dict[str, Any]:
        def line(g: float) -> str:
            r = self.points[g]
            vals = [r["metrics"][k] for k in METRIC_KEYS] + [r["per_class"][n]["IoU"] for n in self.names]
            return " ".join([f"{g:g}"] + ["-" if v is None else f"{v:.3f}" for v in vals])

        return {
            "columns": ["gamma", *METRIC_KEYS, *self.names],
            "points": [line(g) for g in sorted(self.points)],
            "seconds_per_image": self.seconds_per_image,
            "num_images": self.num_images,
        }

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> Cell:
        names = r["columns"][1 + len(METRIC_KEYS) :]
        points = {}
        for text in r["points"]:
            g, *vals = [None if x == "-" else float(x) for x in text.split()]
            metrics = dict(zip(METRIC_KEYS, vals[: len(METRIC_KEYS)], strict=True))
            per_class = {n: {"IoU": v} for n, v in zip(names, vals[len(METRIC_KEYS) :], strict=True)}
            points[g] = {"metrics": metrics, "per_class": per_class}
        return cls(names, points, float(r["seconds_per_image"]), int(r["num_images"]))


METRIC_KEYS = ("mIoU", "mIoU_seen", "mIoU_unseen", "hIoU")


def collect(
    pipe: ZS3DPipeline,
    samples: list[dict],
    names: list[str],
    unseen: list[str],
    seed: int,
    progress: bool,
    **kw: Any,
) -> Cell:
    """Run ``pipe`` once (γ = 0) over ``samples``; seconds/image is the median over batches of 16."""
    from tqdm.auto import tqdm

    gammas = sorted({*GAMMAS, round(float(pipe.config.calibration), 6)})
    seen = pipe.seen_mask(names).numpy().astype(bool)
    gen = torch.Generator().manual_seed(seed)
    cms = [ConfusionMatrix(len(names), 255) for _ in gammas]
    per_image = []
    batch = 16
    for start in tqdm(range(0, len(samples), batch), desc=str(kw or "default"), disable=not progress):
        part = samples[start : start + batch]
        t0 = time.perf_counter()
        out = pipe([s["image"] for s in part], class_names=names, calibration=0.0, generator=gen, **kw)
        per_image.append((time.perf_counter() - t0) / len(part))
        for scores, s in zip(out.scores, part, strict=True):
            best_seen, best_unseen = _best_of(np.asarray(scores, np.float32), seen)
            for cm, g in zip(cms, gammas, strict=True):  # argmax(scores - γ·seen), without the argmax
                pred = np.where(best_seen[0] - g >= best_unseen[0], best_seen[1], best_unseen[1])
                cm.update(pred, s["label"])
    points = {}
    for g, cm in zip(gammas, cms, strict=True):
        rep = cm.compute(names, unseen)
        points[g] = {
            "metrics": {k: rep["metrics"].get(k) for k in METRIC_KEYS},
            "per_class": {n: {"IoU": rep["per_class"][n]["IoU"]} for n in names},
        }
    return Cell(list(names), points, float(np.median(per_image)), len(samples))


def _best_of(scores: np.ndarray, seen: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """(max score, class id) over the seen classes and over the others, per pixel of ``(C, H, W)``."""
    out = []
    for group in (seen, ~seen):
        ids = np.flatnonzero(group)
        if not len(ids):
            full = np.full(scores.shape[1:], -np.inf, np.float32)
            out.append((full, np.zeros(scores.shape[1:], np.int64)))
            continue
        sub = scores[ids]
        arg = np.argmax(sub, axis=0)
        out.append((np.take_along_axis(sub, arg[None], 0)[0], ids[arg]))
    return out[0], out[1]


def cell_signature(args, pipe: ZS3DPipeline, model_dir: Path, samples, **kw: Any) -> dict[str, Any]:
    """What a recorded cell must share to be reused: model weights, data, images, settings."""
    c = pipe.config
    return {
        "model": model_fingerprint(model_dir),
        "data": dataset_fingerprint(args.data),
        "split": args.split,
        "num_images": len(samples),
        "seed": args.seed,
        "settings": kw,
        "sampling": {
            k: getattr(c, k)
            for k in ("sampler", "guide_noise", "num_inference_steps", "num_samples", "jump_length", "eta")
        },
        "smoothing": c.smoothing,
        "gammas": [GAMMAS[0], GAMMAS[-1], len(GAMMAS)],
    }


def run_cell(args, key: str, pipe: ZS3DPipeline, model_dir: Path, samples, names, **kw: Any) -> Cell | None:
    """A recorded cell (same model weights, data, images, settings) or a fresh run, recorded."""
    signature = cell_signature(args, pipe, model_dir, samples, **kw)
    result = recorded(
        args,
        key,
        signature,
        lambda: collect(pipe, samples, names, args.unseen, args.seed, args.progress, **kw).to_record(),
    )
    return None if result is None else Cell.from_record(result)


def recorded(args, key: str, signature: dict, compute) -> dict | None:
    """The committed record of cell ``key`` under ``signature``, else ``compute()`` (recorded).

    ``None`` when the cell is not selected (``--cells``) or ``--recorded-only`` and not recorded yet.
    """
    if not args.no_records:
        result = load_record(SECTION_ID, key, signature)
        if result is not None:
            logger.info("%s: committed record (benchmarks/records/%s/%s.json)", key, SECTION_ID, key)
            return result
    if args.recorded_only or (args.cells and key not in args.cells):
        logger.info("%s: not recorded yet (skipped)", key)
        return None
    result = compute()
    if not args.no_records:
        save_record(SECTION_ID, key, signature, result)
    return result


def trajectory(pipe: ZS3DPipeline, samples, names, unseen, seed: int, progress: bool) -> dict[str, Any]:
    """Where along guided sampling ZS3D decides the classes: after every reverse step, the network's
    clean estimate x̂_0 of the semantic channels, classified exactly like the final sample.

    Why: the first estimate (pure-noise semantic channels, the image visible) is the model's
    regression of the class code from the image; if it were far better than the final sample, the
    sampler would be what loses quality, not the learned denoiser. One sample per image, the
    checkpoint's sampler and guidance; scored at γ = 0 and at the checkpoint's γ.
    """
    from tqdm.auto import tqdm

    c = pipe.config
    gammas = (0.0, float(c.calibration))
    gen = torch.Generator().manual_seed(seed)
    cms: dict[int, list[ConfusionMatrix]] = {}
    timesteps: dict[int, int] = {}

    def score(index: int, emb: torch.Tensor, labels: list[np.ndarray]) -> None:
        meters = cms.setdefault(index, [ConfusionMatrix(len(names), 255) for _ in gammas])
        for meter, g in zip(meters, gammas, strict=True):
            pred, _ = pipe.classify(emb, names, labels[0].shape, g, c.smoothing)
            for p, lab in zip(pred.numpy(), labels, strict=True):
                meter.update(p, lab)

    for start in tqdm(range(0, len(samples), 16), desc="trajectory", disable=not progress):
        part = samples[start : start + 16]
        estimates: dict[int, list[torch.Tensor]] = {}

        def keep(i: int, step, x0: torch.Tensor, estimates=estimates) -> None:
            estimates.setdefault(i, []).append(x0[:, 3:].float())
            timesteps[i] = step.t

        final, _ = pipe.embed(
            [s["image"] for s in part],
            num_samples=1,
            sampler=c.sampler,
            num_inference_steps=c.num_inference_steps,
            eta=c.eta,
            generator=gen,
            guide_noise=c.guide_noise,
            on_step=keep,
        )
        labels = [s["label"] for s in part]
        for i, chunks in estimates.items():
            score(i, torch.cat(chunks), labels)
        score(-1, final, labels)  # the sample itself

    def metrics(index: int) -> dict[str, Any]:
        reps = [m.compute(names, unseen)["metrics"] for m in cms[index]]
        return {
            "t": timesteps.get(index),
            "gamma0": {k: reps[0].get(k) for k in METRIC_KEYS},
            "calibrated": {k: reps[1].get(k) for k in METRIC_KEYS},
        }

    return {
        "gamma": gammas[1],
        "num_images": len(samples),
        "steps": [metrics(i) for i in sorted(i for i in cms if i >= 0)],
        "final": metrics(-1),
    }


def trajectory_section(traj: dict[str, Any], baseline: Cell | None, gamma_b: float) -> list[str]:
    """The x̂_0 estimates along the trajectory: every 5th step, the last, and the final sample."""
    steps = traj["steps"]
    picked = [i for i in range(len(steps)) if i % 5 == 0 or i == len(steps) - 1]

    def line(label: str, t: Any, r: dict[str, Any]) -> list[str]:
        g0, cal = r["gamma0"], r["calibrated"]
        return [
            label,
            str(t),
            fmt(g0["mIoU_seen"]),
            fmt(cal["mIoU_seen"]),
            fmt(cal["mIoU_unseen"]),
            fmt(cal["hIoU"]),
        ]

    rows = [line(f"x̂_0 after step {i + 1} of {len(steps)}", steps[i]["t"], steps[i]) for i in picked]
    rows.append(line("the sample (what ZS3D classifies)", "-", traj["final"]))
    if baseline is not None:
        b0, bg = baseline.report(0.0)["metrics"], baseline.report(gamma_b)["metrics"]
        rows.append(
            [
                "SPNet-like baseline, one pass (all images of the table)",
                "-",
                fmt(b0["mIoU_seen"]),
                fmt(bg["mIoU_seen"]),
                fmt(bg["mIoU_unseen"]),
                fmt(bg["hIoU"]),
            ]
        )
    return [
        f"Where ZS3D decides the classes (`--trajectory`): after each reverse step, the network's clean "
        f"estimate x̂_0 of the semantic channels, classified like the sample; first {traj['num_images']} "
        f"images, one sample each; calibrated columns at γ = {traj['gamma']:.2f}:",
        "",
        markdown_table(["estimate", "t", "mIoU seen (γ = 0)", "mIoU seen", "mIoU unseen", "hIoU"], rows),
        "",
    ]


def oracle(cell: Cell) -> dict[str, Any]:
    """Best γ of the grid on these images using their unseen labels: a diagnostic bound, never a setting."""
    best = max(GAMMAS, key=lambda g: (cell.report(g)["metrics"]["hIoU"] or 0.0, -g))  # ties: smallest γ
    return {"gamma": best, **cell.report(best)["metrics"]}


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def row(label: str, report: dict, gamma: float, sec: float | None, n: int) -> list[str]:
    m = report["metrics"]
    return [
        label,
        f"{gamma:.2f}",
        fmt(m.get("mIoU_seen")),
        fmt(m.get("mIoU_unseen")),
        fmt(m.get("mIoU")),
        fmt(m.get("hIoU")),
        "-" if sec is None else f"{sec:.2f}",
        str(n),
    ]


# ------------------------------------------------------------------------------------- augmentation
class _SegTask:
    """A small supervised segmenter (UNet, cross-entropy) for the augmentation experiment."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, size: int) -> None:
        self.x = images_to_tensor(list(images), size)
        from PIL import Image

        self.y = torch.from_numpy(
            np.stack(
                [np.asarray(Image.fromarray(lab.astype(np.uint8)).resize((size, size), 0)) for lab in labels]
            )
        ).long()
        self.net = build_unet(size, 3, num_classes, (32, 64, 64), 1, (2,), 16)

    def model(self):
        return self.net.train()

    def train_dataset(self):
        return torch.utils.data.TensorDataset(self.x, self.y)

    def loss(self, model, batch, generator):
        x, y = batch
        flip = torch.rand(x.shape[0], generator=generator) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        y = torch.where(flip.view(-1, 1, 1), y.flip(-1), y)
        logits = model(x, torch.zeros(x.shape[0], dtype=torch.long)).sample
        loss = torch.nn.functional.cross_entropy(logits, y, ignore_index=255)
        return loss, {}


def train_segmenter(images, labels, names, size, steps, seed, work: Path):
    from diffuseg.train import TrainConfig, train

    task = _SegTask(images, labels, len(names), size)
    cfg = TrainConfig(
        str(work),
        steps,
        batch_size=min(16, len(images)),
        lr=1e-3,
        seed=seed,
        checkpoint_every=10**9,
        progress=False,
    )
    train(task, cfg)
    return task.net.eval()


@torch.no_grad()
def segmenter_report(net, samples, names, unseen, size) -> dict:
    cm = ConfusionMatrix(len(names), 255)
    for start in range(0, len(samples), 32):
        part = samples[start : start + 32]
        x = images_to_tensor([s["image"] for s in part], size)
        logits = net(x, torch.zeros(x.shape[0], dtype=torch.long)).sample
        hw = part[0]["label"].shape
        pred = torch.nn.functional.interpolate(logits, size=hw, mode="bilinear", align_corners=False).argmax(
            1
        )
        cm.update(pred.numpy(), np.stack([s["label"] for s in part]))
    return cm.compute(names, unseen)


def augmentation_rows(args, pipe: ZS3DPipeline, data_dir: Path, names, unseen, val) -> list[list[str]]:
    """Segmenter on N real labels, alone / + guided ZS3D pairs / + unconditional ZS3D pairs."""
    train_samples = list(load_split_samples(data_dir, "train"))
    rows = []
    results: dict[str, list[dict]] = {}
    for seed in range(args.aug_seeds):
        rng = np.random.default_rng([args.seed, seed])
        order = rng.permutation(len(train_samples))
        real = [train_samples[i] for i in order[: args.aug_real]]
        guides = [train_samples[i]["image"] for i in order[args.aug_real : args.aug_real + args.aug_gen]]
        real_x = np.stack([s["image"] for s in real])
        real_y = np.stack([s["label"] for s in real])
        reps = max(1, args.aug_gen // max(1, len(real)))  # half of every epoch stays real
        settings = {"real only": (real_x, real_y)}
        for label, rho in (
            (f"+ ZS3D guided (ρ={args.aug_rho})", args.aug_rho),
            ("+ ZS3D unconditional", 0.0),
        ):
            gx, gy = generate(pipe, guides, rho, names, args, seed)
            settings[label] = (
                np.concatenate([np.repeat(real_x, reps, 0), gx]),
                np.concatenate([np.repeat(real_y, reps, 0), gy]),
            )
        for label, (x, y) in settings.items():
            with tempfile.TemporaryDirectory() as tmp:
                net = train_segmenter(x, y, names, pipe.config.image_size, args.aug_steps, seed, Path(tmp))
            results.setdefault(label, []).append(
                segmenter_report(net, val, names, unseen, pipe.config.image_size)
            )
    for label, reports in results.items():
        vals = {
            k: [r["metrics"][k] for r in reports if r["metrics"].get(k) is not None]
            for k in ("mIoU", "mIoU_seen", "mIoU_unseen", "hIoU")
        }
        rows.append(
            [f"{args.aug_real} real {label}" if label != "real only" else f"{args.aug_real} real only"]
            + [mean_std(vals[k]) for k in vals]
        )
    return rows


def augmentation(args, pipe: ZS3DPipeline, names, unseen, val) -> list[list[str]] | None:
    """The augmentation rows, recorded like a cell (``None``: not selected / not recorded yet)."""
    signature = {
        "model": model_fingerprint(args.zs3d),
        "data": dataset_fingerprint(args.data),
        "val_images": len(val),
        "seed": args.seed,
        **{k: getattr(args, k) for k in ("aug_real", "aug_gen", "aug_rho", "aug_steps", "aug_seeds")},
    }
    result = recorded(
        args,
        "augment",
        signature,
        lambda: {"rows": augmentation_rows(args, pipe, args.data, names, unseen, val)},
    )
    return None if result is None else result["rows"]


def generate(pipe: ZS3DPipeline, guides: list[np.ndarray], rho: float, names, args, seed: int):
    xs, ys = [], []
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, len(guides), 32):
        part = guides[start : start + 32]
        pairs = pipe.generate(
            len(part),
            guide_images=part if rho > 0 else None,
            rho=rho,
            class_names=names,
            output_size=guides[0].shape[0],
            generator=gen,
        )
        xs.append(pairs.images)
        ys.append(pairs.labels)
    return np.concatenate(xs), np.concatenate(ys)


# ------------------------------------------------------------------------------------------- figure
def figure(
    samples, zs3d: ZS3DPipeline, base: ZS3DPipeline | None, names, palette, unseen, seed: int
) -> np.ndarray:
    """Image | GT | prediction, ZS3D and baseline side by side, on val scenes that show unseen classes."""
    from diffuseg.viz import image_grid, side_by_side

    ids = [names.index(u) for u in unseen]
    pick = [i for i, s in enumerate(samples) if np.isin(s["label"], ids).any()][:4] or list(
        range(min(4, len(samples)))
    )
    images = [samples[i]["image"] for i in pick]
    preds = {}
    for label, pipe in (("ZS3D", zs3d), ("SPNet", base)):
        if pipe is not None:
            out = pipe(images, class_names=names, generator=torch.Generator().manual_seed(seed))
            preds[label] = (out.labels, pipe.config.calibration)
    panels = []
    for j, i in enumerate(pick):
        for label, (labels, gamma) in preds.items():
            titles = ("image", "ground truth", f"{label} g={gamma:.2f}")  # a 128-px panel; the font has no γ
            panels.append(
                side_by_side(
                    images[j], samples[i]["label"], labels[j], palette, names, titles=titles, min_size=128
                )
            )
    return image_grid(panels, nrow=len(preds))


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("/work/data/fashion_scenes"))
    p.add_argument("--zs3d", type=Path, required=True, help="ZS3D checkpoint folder (train zs3d .../final)")
    p.add_argument("--baseline", type=Path, default=None, help="SPNet-like baseline checkpoint folder")
    p.add_argument("--split", default="val")
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--rs", default="0,1,5,10", help="RS(N) values for ZS3D rows")
    p.add_argument(
        "--rs-images", type=int, default=None, help="images for RS(N>0) rows (default: --num-images)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--trajectory",
        type=int,
        default=0,
        help="diagnostic on the first N images: x̂_0 of the semantic channels after every reverse step",
    )
    p.add_argument("--augment", action="store_true", help="also run the data augmentation experiment")
    p.add_argument("--aug-real", type=int, default=50)
    p.add_argument("--aug-gen", type=int, default=500)
    p.add_argument("--aug-rho", type=float, default=0.6)
    p.add_argument("--aug-steps", type=int, default=1500)
    p.add_argument("--aug-seeds", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS_MD, help="results markdown to update")
    p.add_argument("--figure", type=Path, default=FIGURE)
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (seconds/image are per thread count)"
    )
    p.add_argument(
        "--cells",
        default="",
        help="run only these cells (list of zs3d, zs3d-matched, zs3d-firstN, zs3d-rsK-firstN, baseline, "
        "zs3d-trajectory-firstN, augment), e.g. to split the work over processes; the others are read "
        "from their records",
    )
    p.add_argument("--recorded-only", action="store_true", help="run nothing: tabulate the recorded cells")
    p.add_argument(
        "--no-records",
        action="store_true",
        help="neither reuse nor write the committed per-cell results in benchmarks/records/",
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.progress = not args.no_progress
    args.cells = {c.strip() for c in args.cells.split(",") if c.strip()}
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("accelerate", "diffuseg.train.loop"):  # the segmenter trainings' checkpoint chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    meta = load_meta(args.data)
    names, unseen, palette = list(meta["classes"]), list(meta["unseen"]), meta["palette"]
    args.unseen = unseen
    samples = [
        s for _, s in zip(range(args.num_images), load_split_samples(args.data, args.split), strict=False)
    ]
    zs3d = ZS3DPipeline.from_pretrained(args.zs3d)
    zs3d.check_dataset_meta(meta)
    rs_values = [int(v) for v in args.rs.split(",") if v.strip()]
    n_rs = min(args.rs_images or len(samples), len(samples))
    g = zs3d.config.calibration

    # 1. the cells: one sampling pass each (recorded), every γ row reads the same pass
    cells: dict[str, Cell | None] = {
        "zs3d": run_cell(args, "zs3d", zs3d, args.zs3d, samples, names, resample=0)
    }
    if zs3d.image_timestep and zs3d.config.guide_noise == "clean":  # the original's guidance, same model
        cells["zs3d-matched"] = run_cell(
            args, "zs3d-matched", zs3d, args.zs3d, samples, names, guide_noise="matched"
        )
    positive = [v for v in rs_values if v > 0]
    ref_key = f"zs3d-first{n_rs}"
    if positive and n_rs < len(samples):  # the RS(0) reference on exactly the images of the RS rows
        cells[ref_key] = run_cell(args, ref_key, zs3d, args.zs3d, samples[:n_rs], names, resample=0)
    for n in positive:
        key = f"zs3d-rs{n}-first{n_rs}"
        cells[key] = run_cell(args, key, zs3d, args.zs3d, samples[:n_rs], names, resample=n)
    base, gb = None, 0.0
    if args.baseline is not None:
        base = ZS3DPipeline.from_pretrained(args.baseline)
        gb = base.config.calibration
        cells["baseline"] = run_cell(args, "baseline", base, args.baseline, samples, names)
    aug_rows = augmentation(args, zs3d, names, unseen, samples) if args.augment else None
    traj, traj_key = None, f"zs3d-trajectory-first{min(args.trajectory, len(samples))}"
    if args.trajectory > 0:
        part = samples[: args.trajectory]
        traj = recorded(
            args,
            traj_key,
            {**cell_signature(args, zs3d, args.zs3d, part), "diagnostic": "trajectory"},
            lambda: trajectory(zs3d, part, names, unseen, args.seed, args.progress),
        )
    missing = (
        [k for k, c in cells.items() if c is None]
        + (["augment"] if args.augment and aug_rows is None else [])
        + ([traj_key] if args.trajectory > 0 and traj is None else [])
    )
    if missing:
        logger.info(
            "not tabulated: %s still to run (%s); recorded cells are kept", ", ".join(missing), args.out
        )
        return

    # 2. the table: calibrated and uncalibrated rows, the oracle as a diagnostic
    table, per_class = [], {}
    z = cells["zs3d"]
    assert z is not None
    rep = z.report(g)
    per_class["ZS3D"] = rep["per_class"]
    table.append(row("ZS3D", rep, g, z.seconds_per_image, z.num_images))
    table.append(
        row(
            "ZS3D without calibration",
            z.report(0.0),
            0.0,
            z.seconds_per_image,
            z.num_images,
        )
    )
    if (m := cells.get("zs3d-matched")) is not None:
        label = "ZS3D, matched-noise guidance (the original's)"
        table.append(row(label, m.report(g), g, m.seconds_per_image, m.num_images))
    if (ref := cells.get(ref_key)) is not None:
        table.append(row("ZS3D, first images only (RS(0) reference)", ref.report(g), g, None, n_rs))
    for n in positive:
        c = cells[f"zs3d-rs{n}-first{n_rs}"]
        assert c is not None
        table.append(row(f"ZS3D + RS({n})", c.report(g), g, c.seconds_per_image, n_rs))
    if (b := cells.get("baseline")) is not None:
        rep_b = b.report(gb)
        per_class["SPNet-like baseline"] = rep_b["per_class"]
        label = "SPNet-like baseline (same UNet, same classifier)"
        table.append(row(label, rep_b, gb, b.seconds_per_image, b.num_images))
        label = "SPNet-like baseline without calibration"
        table.append(row(label, b.report(0.0), 0.0, b.seconds_per_image, b.num_images))
    orc = oracle(z)
    table.append(
        [
            "*oracle γ for ZS3D (uses unseen val labels; diagnostic only)*",
            f"{orc['gamma']:.2f}",
            fmt(orc["mIoU_seen"]),
            fmt(orc["mIoU_unseen"]),
            "-",
            fmt(orc["hIoU"]),
            "-",
            str(z.num_images),
        ]
    )

    # 3. figure (a fresh pass over the few example scenes) and the section
    fig = figure(samples, zs3d, base, names, palette, unseen, args.seed)
    if not args.no_write:
        from diffuseg.viz import save_figure

        save_figure(args.figure, fig)
    extra = trajectory_section(traj, cells.get("baseline"), gb) if traj is not None else []
    body = render(args, zs3d, table, per_class, names, unseen, aug_rows, time.perf_counter() - t_start, extra)
    if args.no_write:
        sys.stdout.write(body + "\n")
    else:
        logger.info("wrote %s", write_results_section(SECTION_ID, body, args.out))


def render(
    args,
    zs3d: ZS3DPipeline,
    table,
    per_class,
    names,
    unseen,
    aug_rows,
    seconds,
    extra: list[str] | None = None,
) -> str:
    c = zs3d.config
    cal = c.calibration_info
    lines = [
        "## ZS3D: zero-shot segmentation on FashionScenes",
        "",
        provenance(threads=args.threads),
        f"- each cell (one sampling pass; every γ row reads it) is recorded in "
        f"`benchmarks/records/{SECTION_ID}/` with its date and machine, so the table can be filled in "
        "chunks across sessions",
        f"- data: `{args.data}` {args.split}, unseen = {', '.join(unseen)}; checkpoints `{args.zs3d}`"
        + (f", `{args.baseline}`" if args.baseline else ""),
        f"- ZS3D sampling: {c.sampler}, {c.num_inference_steps} steps, {c.guide_noise} guidance, "
        f"{c.num_samples} samples averaged, RS jump length {c.jump_length}, seed {args.seed}; "
        "seconds/image: median over batches of 16",
        f"- γ: calibrated stacking margin chosen without unseen labels (pseudo-unseen "
        f"{', '.join(cal.get('pseudo_unseen', [])) or '-'}, {cal.get('num_holdout', '-')} held-out seen-only "
        "training images, see docs/methods.md)",
        f"- this invocation: {seconds / 60:.1f} min",
        "",
        markdown_table(
            ["setting", "γ", "mIoU seen", "mIoU unseen", "mIoU", "hIoU", "s/image", "images"], table
        ),
        "",
        "Per-class IoU (%):",
        "",
    ]
    heads = list(per_class)
    pc_rows = [
        [n + (" *(unseen)*" if n in unseen else "")] + [fmt(per_class[h][n]["IoU"]) for h in heads]
        for n in names
    ]
    lines += [markdown_table(["class", *heads], pc_rows), ""]
    lines += extra or []
    if aug_rows is not None:
        lines += [
            f"Data augmentation: a small UNet segmenter ({args.aug_steps} steps) trained on "
            f"{args.aug_real} labelled training scenes, alone or with {args.aug_gen} ZS3D pairs (real "
            f"scenes repeated so half of every epoch is real); {args.aug_seeds} seed(s):",
            "",
            markdown_table(["training data", "mIoU", "mIoU seen", "mIoU unseen", "hIoU"], aug_rows),
            "",
        ]
    lines.append(
        "Examples (val scenes with an unseen class; ZS3D left, the SPNet-like baseline right; g = the "
        f"margin γ): ![zs3d](figures/{args.figure.name})"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
