"""ZS3D on FashionScenes val (unseen: sandal, coat): the zero-shot table of docs/results.md.

Rows, all scored with :mod:`diffuseg.eval` (mmseg semantics, seen/unseen/hIoU from meta.json):

* **ZS3D** with the checkpoint's calibrated margin γ (chosen without unseen labels), RS(N) for
  every N of ``--rs``; **ZS3D without calibration** (γ = 0); with the original's matched-noise
  guidance instead of clean guidance (decoupled-noise models);
* the **SPNet-like baseline** (same UNet regressing the class embedding in one pass, same
  classifier), with its own calibrated γ and without;
* a diagnostic, clearly marked: the best γ on val *with* unseen labels (an oracle, used for no
  choice), to show how much the label-free calibration leaves on the table.

Scores are collected once per (model, N) with γ = 0 and the same seed; calibration is a constant
shift of the seen-class scores, so every γ row reuses them exactly. ``--augment`` adds the data
augmentation experiment: a small supervised segmenter trained on ``--aug-real`` labelled scenes,
alone and with ``--aug-gen`` ZS3D pairs (guided, ρ = ``--aug-rho``; and unconditional).

Run from the repository root after training both models (docs/methods.md, ZS3D)::

    python benchmarks/zs3d_fashion.py --data /work/data/fashion_scenes \\
        --zs3d runs/zs3d/final --baseline runs/zs3d-spnet/final --num-images 500 \\
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

from _common import RESULTS_MD, markdown_table, mean_std, provenance, write_results_section
from diffuseg.eval import ConfusionMatrix, load_meta, load_split_samples  # noqa: E402
from diffuseg.methods.zs3d import ZS3DPipeline, build_unet, images_to_tensor, sweep_margin  # noqa: E402

logger = logging.getLogger("zs3d_fashion")

SECTION_ID = "zs3d-fashion"
FIGURE = RESULTS_MD.parent / "figures" / "zs3d_fashion.png"


# ------------------------------------------------------------------------------------------ scoring
@dataclass
class Collected:
    """Raw (γ = 0) cosine scores of one model setting over the evaluated images."""

    scores: list[np.ndarray]  # (C, H, W) float16 per image
    labels: list[np.ndarray]  # (H, W) int64 per image
    seconds_per_image: float


def collect(pipe: ZS3DPipeline, samples: list[dict], names: list[str], seed: int, progress: bool, **kw: Any):
    """Run ``pipe`` once (γ = 0) and keep scores; seconds/image is the median over batches."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    scores, labels, per_image = [], [], []
    batch = 16
    for start in tqdm(range(0, len(samples), batch), desc=str(kw or "default"), disable=not progress):
        part = samples[start : start + batch]
        t0 = time.perf_counter()
        out = pipe([s["image"] for s in part], class_names=names, calibration=0.0, generator=gen, **kw)
        per_image.append((time.perf_counter() - t0) / len(part))
        scores += [s.astype(np.float16) for s in out.scores]
        labels += [s["label"] for s in part]
    return Collected(scores, labels, float(np.median(per_image)))


def metrics_at(col: Collected, gamma: float, seen_mask: np.ndarray, names: list[str], unseen: list[str]):
    """The shared report metrics of the labels obtained with margin ``gamma``."""
    cm = ConfusionMatrix(len(names), 255)
    preds = []
    for s, lab in zip(col.scores, col.labels, strict=True):
        pred = np.argmax(s.astype(np.float32) - gamma * seen_mask[:, None, None], axis=0)
        cm.update(pred, lab)
        preds.append(pred)
    return cm.compute(names, unseen), preds


def oracle(col: Collected, seen_mask: np.ndarray, names: list[str], unseen: list[str]) -> dict[str, Any]:
    """Best γ on these images using their unseen labels: a diagnostic upper bound, never a setting."""
    seen_ids = [i for i, c in enumerate(names) if c not in unseen]
    unseen_ids = [names.index(u) for u in unseen]
    return sweep_margin(col.scores, col.labels, seen_mask, seen_ids, unseen_ids, np.linspace(0, 1, 101))


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
        str(work), steps, batch_size=16, lr=1e-3, seed=seed, checkpoint_every=10**9, progress=False
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
def figure(samples, zs3d_preds, base_preds, names, palette, gamma_z, gamma_b, unseen) -> np.ndarray:
    """Image | GT | prediction, ZS3D and baseline side by side, on val scenes that show unseen classes."""
    from diffuseg.viz import image_grid, side_by_side

    ids = [names.index(u) for u in unseen]
    pick = [i for i, s in enumerate(samples) if np.isin(s["label"], ids).any()][:4] or list(
        range(min(4, len(samples)))
    )
    panels = []
    for i in pick:
        img, gt = samples[i]["image"], samples[i]["label"]
        panels.append(
            side_by_side(
                img,
                gt,
                zs3d_preds[i],
                palette,
                names,
                titles=("image", "ground truth", f"ZS3D γ={gamma_z:.2f}"),
                min_size=128,
            )
        )
        if base_preds is not None:
            panels.append(
                side_by_side(
                    img,
                    gt,
                    base_preds[i],
                    palette,
                    names,
                    titles=("image", "ground truth", f"baseline γ={gamma_b:.2f}"),
                    min_size=128,
                )
            )
    return image_grid(panels, nrow=2 if base_preds is not None else 1)


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
    p.add_argument("--augment", action="store_true", help="also run the data augmentation experiment")
    p.add_argument("--aug-real", type=int, default=50)
    p.add_argument("--aug-gen", type=int, default=500)
    p.add_argument("--aug-rho", type=float, default=0.6)
    p.add_argument("--aug-steps", type=int, default=1500)
    p.add_argument("--aug-seeds", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS_MD, help="results markdown to update")
    p.add_argument("--figure", type=Path, default=FIGURE)
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("accelerate", "diffuseg.train.loop"):  # the segmenter trainings' checkpoint chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    progress = not args.no_progress
    meta = load_meta(args.data)
    names, unseen, palette = list(meta["classes"]), list(meta["unseen"]), meta["palette"]
    samples = [
        s for _, s in zip(range(args.num_images), load_split_samples(args.data, args.split), strict=False)
    ]
    zs3d = ZS3DPipeline.from_pretrained(args.zs3d)
    zs3d.check_dataset_meta(meta)
    seen_mask = zs3d.seen_mask(names).numpy()
    rs_values = [int(v) for v in args.rs.split(",") if v.strip()]
    n_rs = min(args.rs_images or len(samples), len(samples))

    table, per_class = [], {}
    g = zs3d.config.calibration
    base_col = collect(zs3d, samples, names, args.seed, progress, resample=0)
    rep, zs3d_preds = metrics_at(base_col, g, seen_mask, names, unseen)
    per_class["ZS3D"] = rep["per_class"]
    table.append(row("ZS3D", rep, g, base_col.seconds_per_image, len(samples)))
    table.append(
        row(
            "ZS3D without calibration",
            metrics_at(base_col, 0.0, seen_mask, names, unseen)[0],
            0.0,
            base_col.seconds_per_image,
            len(samples),
        )
    )
    orc = oracle(base_col, seen_mask, names, unseen)
    if zs3d.image_timestep and zs3d.config.guide_noise == "clean":  # the original's guidance, same model
        col_m = collect(zs3d, samples, names, args.seed, progress, guide_noise="matched")
        rep_m = metrics_at(col_m, g, seen_mask, names, unseen)[0]
        table.append(
            row(
                "ZS3D, matched-noise guidance (the original's)",
                rep_m,
                g,
                col_m.seconds_per_image,
                len(samples),
            )
        )
    positive = [v for v in rs_values if v > 0]
    if positive and n_rs < len(samples):  # the RS(0) reference on exactly the images of the RS rows
        short = Collected(base_col.scores[:n_rs], base_col.labels[:n_rs], base_col.seconds_per_image)
        ref = metrics_at(short, g, seen_mask, names, unseen)[0]
        table.append(row("ZS3D, first images only (RS(0) reference)", ref, g, None, n_rs))
    for n in positive:
        col = collect(zs3d, samples[:n_rs], names, args.seed, progress, resample=n)
        rep_n = metrics_at(col, g, seen_mask, names, unseen)[0]
        table.append(row(f"ZS3D + RS({n})", rep_n, g, col.seconds_per_image, n_rs))

    base_preds, gb = None, 0.0
    if args.baseline is not None:
        base = ZS3DPipeline.from_pretrained(args.baseline)
        gb = base.config.calibration
        bcol = collect(base, samples, names, args.seed, progress)
        rep_b, base_preds = metrics_at(bcol, gb, seen_mask, names, unseen)
        per_class["SPNet-like baseline"] = rep_b["per_class"]
        table.append(
            row(
                "SPNet-like baseline (same UNet, same classifier)",
                rep_b,
                gb,
                bcol.seconds_per_image,
                len(samples),
            )
        )
        table.append(
            row(
                "SPNet-like baseline without calibration",
                metrics_at(bcol, 0.0, seen_mask, names, unseen)[0],
                0.0,
                bcol.seconds_per_image,
                len(samples),
            )
        )
    table.append(
        [
            "*oracle γ for ZS3D (uses unseen val labels; diagnostic only)*",
            f"{orc['gamma']:.2f}",
            fmt(orc["mIoU_seen"]),
            fmt(orc["mIoU_unseen"]),
            "-",
            fmt(orc["hIoU"]),
            "-",
            str(len(samples)),
        ]
    )

    aug_rows = augmentation_rows(args, zs3d, args.data, names, unseen, samples) if args.augment else None
    fig = figure(samples, zs3d_preds, base_preds, names, palette, g, gb, unseen)
    if not args.no_write:
        from diffuseg.viz import save_figure

        save_figure(args.figure, fig)
    body = render(args, zs3d, table, per_class, names, unseen, aug_rows, time.perf_counter() - t_start)
    if args.no_write:
        sys.stdout.write(body + "\n")
    else:
        logger.info("wrote %s", write_results_section(SECTION_ID, body, args.out))


def render(args, zs3d: ZS3DPipeline, table, per_class, names, unseen, aug_rows, seconds) -> str:
    c = zs3d.config
    cal = c.calibration_info
    lines = [
        "## ZS3D: zero-shot segmentation on FashionScenes",
        "",
        provenance(threads=1),
        f"- data: `{args.data}` {args.split}, unseen = {', '.join(unseen)}; checkpoints `{args.zs3d}`"
        + (f", `{args.baseline}`" if args.baseline else ""),
        f"- ZS3D sampling: {c.sampler}, {c.num_inference_steps} steps, {c.guide_noise} guidance, "
        f"{c.num_samples} samples averaged, RS jump length {c.jump_length}, seed {args.seed}; "
        "seconds/image: median over batches of 16",
        f"- γ: calibrated stacking margin chosen without unseen labels (pseudo-unseen "
        f"{', '.join(cal.get('pseudo_unseen', [])) or '-'}, {cal.get('num_holdout', '-')} held-out seen-only "
        "training images, see docs/methods.md)",
        f"- total run time {seconds / 60:.1f} min",
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
    if aug_rows is not None:
        lines += [
            f"Data augmentation: a small UNet segmenter ({args.aug_steps} steps) trained on "
            f"{args.aug_real} labelled training scenes, alone or with {args.aug_gen} ZS3D pairs (real "
            f"scenes repeated so half of every epoch is real); {args.aug_seeds} seed(s):",
            "",
            markdown_table(["training data", "mIoU", "mIoU seen", "mIoU unseen", "hIoU"], aug_rows),
            "",
        ]
    lines.append(f"Examples: ![zs3d](figures/{args.figure.name})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
