"""Seg-diffusion on FashionScenes: zero-shot quality, accuracy–speed grid, uncertainty vs error.

Three measurements, all on the val split with the dataset's 11 class names prompted (background
is the threshold fallback, not a prompt), unseen = meta.json's ``unseen`` (sandal, coat):

* **quality** at the checkpoint's default settings: mIoU, seen / unseen mIoU and hIoU beside the
  floors (all-background here; K-means and pixel-MLP floors in the "Floors" section), optionally
  beside the random-init control (same architecture, widened, untrained);
* **grid** of ``ensemble_size`` × ``denoise_steps``: seconds per image (process CPU time, which a
  shared CPU distorts less than wall time; wall time also reported) and mIoU / hIoU, plus one
  half-precision (bf16) row at the default settings; saved as a plot;
* **uncertainty**: AUROC of the per-pixel uncertainty map for predicting the pixels that are
  wrong, beside the AUROC of a single-pass confidence (distance of the best class probability to
  the background threshold): does the ensemble spread know where the prediction fails?

Full run (after training; about an hour on one thread)::

    python benchmarks/segdiffusion_fashion.py --data /work/data/fashion_scenes \\
        --checkpoint checkpoints/seg-diffusion --num-val 200 --grid-num-val 40 --with-control --update-card

Smoke run (tiny model, nothing written to docs/)::

    python benchmarks/segdiffusion_fashion.py --data examples/fashion_scenes --checkpoint RUN/final \\
        --num-val 4 --grid 1x1,2x1 --grid-num-val 2 --out /tmp/results.md --figure /tmp/grid.png
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from _common import RESULTS_MD, markdown_table, provenance, write_results_section
from diffuseg.eval import ConfusionMatrix, load_meta, load_split_samples  # noqa: E402
from diffuseg.methods.seg_diffusion import SegDiffusionConfig, SegDiffusionPipeline  # noqa: E402

logger = logging.getLogger("segdiffusion_fashion")

SECTION_ID = "segdiffusion-fashion"
SECTION_TITLE = "## Seg-diffusion on FashionScenes (open vocabulary, unseen = sandal, coat)"
FIGURE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "segdiffusion_fashion_grid.png"
DEFAULT_GRID = "1x1,1x2,2x2,4x1,4x2,4x4,8x2"


@dataclass
class RunResult:
    """Scores, timing and (optionally) pixel-level uncertainty data of one pipeline setting."""

    metrics: dict[str, Any]
    cpu_s_per_image: float
    wall_s_per_image: float
    num_images: int
    uncertainty: list[np.ndarray] = field(default_factory=list)
    confidence_unc: list[np.ndarray] = field(default_factory=list)
    errors: list[np.ndarray] = field(default_factory=list)


# ----------------------------------------------------------------------------- pipelines
def random_init_pipeline(config: SegDiffusionConfig | None = None) -> SegDiffusionPipeline:
    """The random-init control: the mini-SD architecture, widened and configured, no training."""
    from diffuseg.backbones.presets import MINI_SD, build_backbone
    from diffuseg.train.seg_diffusion import configure_scheduler, widen_conv_in

    torch.manual_seed(0)
    bb = build_backbone(MINI_SD).eval().requires_grad_(False)
    widen_conv_in(bb.unet)
    bb.scheduler = configure_scheduler(bb.scheduler)
    return SegDiffusionPipeline(bb, config)


def load_pipeline(args: argparse.Namespace) -> SegDiffusionPipeline:
    if args.random_init:
        return random_init_pipeline()
    return SegDiffusionPipeline.from_pretrained(args.checkpoint)


# ----------------------------------------------------------------------------- evaluation
def run(
    pipe: SegDiffusionPipeline,
    samples: list[dict[str, Any]],
    classes: list[str],
    unseen: list[str],
    keep_pixels: bool = False,
    batch: int = 8,
    progress: bool = True,
    **settings: Any,
) -> RunResult:
    """Segment ``samples`` with ``settings``; score and time it (median per-image time over batches)."""
    cm = ConfusionMatrix(len(classes))
    cpu, wall = [], []
    result = RunResult({}, 0.0, 0.0, len(samples))
    desc = ", ".join(f"{k}={v}" for k, v in settings.items()) or "defaults"
    for i in tqdm(range(0, len(samples), batch), desc=desc, disable=not progress, leave=False):
        part = samples[i : i + batch]
        c0, w0 = time.process_time(), time.perf_counter()
        out = pipe(
            [s["image"] for s in part], class_names=classes, output_size=part[0]["label"].shape, **settings
        )
        cpu.append((time.process_time() - c0) / len(part))
        wall.append((time.perf_counter() - w0) / len(part))
        for k, s in enumerate(part):
            gt = s["label"]
            cm.update(out.labels[k], gt)
            if keep_pixels and out.uncertainty is not None:
                valid = gt != 255
                result.errors.append((out.labels[k] != gt)[valid])
                result.uncertainty.append(out.uncertainty[k][valid])
                fg = [j for j, n in enumerate(out.class_names) if n.lower() != "background"]
                best = out.scores[k][fg].max(0)  # the background channel only holds the threshold
                thr = float(settings.get("background_threshold", pipe.config.background_threshold))
                result.confidence_unc.append(-np.abs(best - thr)[valid])
    result.metrics = cm.compute(classes, unseen or None)["metrics"]
    result.cpu_s_per_image, result.wall_s_per_image = statistics.median(cpu), statistics.median(wall)
    return result


def all_background(samples: list[dict[str, Any]], classes: list[str], unseen: list[str]) -> dict[str, Any]:
    cm = ConfusionMatrix(len(classes))
    for s in samples:
        cm.update(np.zeros_like(s["label"]), s["label"])
    return cm.compute(classes, unseen or None)["metrics"]


def auroc(result: RunResult) -> dict[str, float | None]:
    """AUROC of uncertainty (ensemble spread) and of single-pass confidence for 'this pixel is wrong'."""
    from sklearn.metrics import roc_auc_score

    if not result.errors:
        return {"auroc_ensemble": None, "auroc_confidence": None, "error_rate": None}
    err = np.concatenate(result.errors)
    out: dict[str, float | None] = {"error_rate": float(err.mean()) * 100}
    if err.all() or not err.any():
        return {**out, "auroc_ensemble": None, "auroc_confidence": None}
    unc = np.concatenate(result.uncertainty)
    conf = np.concatenate(result.confidence_unc)
    out["auroc_ensemble"] = float(roc_auc_score(err, unc))
    out["auroc_confidence"] = float(roc_auc_score(err, conf))
    out["mean_unc_correct"] = float(unc[~err].mean())
    out["mean_unc_wrong"] = float(unc[err].mean())
    return out


def parse_grid(text: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item.strip()]
    except ValueError as e:
        raise SystemExit(f"--grid: expected EnsemblexSteps items such as 4x2,8x1, got {text!r} ({e})") from e
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise SystemExit(f"--grid: expected EnsemblexSteps items such as 4x2,8x1, got {text!r}")
    return [(p[0], p[1]) for p in pairs]


# ----------------------------------------------------------------------------- report
def _f(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def quality_table(rows: list[tuple[str, dict[str, Any], float | None]]) -> str:
    body = [
        [name, _f(m.get("mIoU")), _f(m.get("mIoU_seen")), _f(m.get("mIoU_unseen")), _f(m.get("hIoU")),
         _f(m.get("aAcc")), "-" if spi is None else f"{spi:.2f}"]
        for name, m, spi in rows
    ]  # fmt: skip
    return markdown_table(["method", "mIoU", "mIoU seen", "mIoU unseen", "hIoU", "aAcc", "CPU s/image"], body)


def grid_table(grid: list[tuple[str, RunResult]]) -> str:
    body = [
        [name, f"{r.cpu_s_per_image:.2f}", f"{r.wall_s_per_image:.2f}", _f(r.metrics.get("mIoU")),
         _f(r.metrics.get("mIoU_seen")), _f(r.metrics.get("mIoU_unseen")), _f(r.metrics.get("hIoU"))]
        for name, r in grid
    ]  # fmt: skip
    return markdown_table(
        ["setting", "CPU s/image", "wall s/image", "mIoU", "mIoU seen", "mIoU unseen", "hIoU"], body
    )


def plot_grid(grid: list[tuple[int, int, RunResult]], path: Path) -> Path:
    from diffuseg.viz import plot_curves

    xs: dict[str, list[float]] = {}
    ys: dict[str, list[float]] = {}
    for e, _s, r in sorted(grid, key=lambda g: (g[0], g[1])):
        name = f"ensemble {e}"
        xs.setdefault(name, []).append(r.cpu_s_per_image)
        ys.setdefault(name, []).append(r.metrics.get("mIoU") or 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    return plot_curves(
        xs, ys, path, xlabel="CPU seconds per image (1 thread)", ylabel="mIoU (%)",
        title="Seg-diffusion: ensemble size x DDIM steps",
    )  # fmt: skip


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="FashionScenes folder (val split, meta.json with unseen)")
    p.add_argument("--checkpoint", default=None, help="Seg-diffusion checkpoint (default: the shipped one)")
    p.add_argument("--random-init", action="store_true", help="evaluate the random-init control only")
    p.add_argument("--with-control", action="store_true", help="also score the random-init control")
    p.add_argument("--split", default="val")
    p.add_argument("--num-val", type=int, default=200, help="images for quality and uncertainty")
    p.add_argument("--grid", default=DEFAULT_GRID, help="ensemble_size x denoise_steps settings")
    p.add_argument("--grid-num-val", type=int, default=40, help="images per grid setting")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS_MD), help="markdown file whose section is replaced")
    p.add_argument("--figure", default=str(FIGURE), help="where the grid plot goes")
    p.add_argument("--json", default=None, help="also write every number here")
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    p.add_argument("--update-card", action="store_true", help="put the quality numbers in the model card")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    meta = load_meta(args.data)
    classes, unseen = list(meta["classes"]), list(meta.get("unseen", []))
    samples = list(itertools.islice(load_split_samples(args.data, args.split), args.num_val))
    grid_samples = samples[: args.grid_num_val]
    pipe = load_pipeline(args)
    if pipe.unseen_classes and sorted(pipe.unseen_classes) != sorted(unseen):
        logger.warning("checkpoint unseen %s != dataset unseen %s", pipe.unseen_classes, unseen)
    defaults = pipe.config
    name = "random-init control" if args.random_init else "Seg-diffusion"
    logger.info(
        "quality run: %d images at E=%d, S=%d", len(samples), defaults.ensemble_size, defaults.denoise_steps
    )
    bar = not args.no_progress
    main_run = run(pipe, samples, classes, unseen, keep_pixels=True, progress=bar)
    quality = [
        ("all-background floor", all_background(samples, classes, unseen), None),
        (f"{name} (E={defaults.ensemble_size}, S={defaults.denoise_steps})", main_run.metrics,
         main_run.cpu_s_per_image),
    ]  # fmt: skip
    if args.with_control and not args.random_init:
        ctrl = run(random_init_pipeline(replace(defaults)), samples, classes, unseen, progress=bar)
        quality.append(("random-init control (same settings)", ctrl.metrics, ctrl.cpu_s_per_image))
    unc = auroc(main_run)
    grid: list[tuple[int, int, RunResult]] = []
    for e, s in parse_grid(args.grid):
        logger.info("grid: E=%d S=%d on %d images", e, s, len(grid_samples))
        grid.append(
            (e, s, run(pipe, grid_samples, classes, unseen, progress=bar, ensemble_size=e, denoise_steps=s))
        )
    # last: the half-precision pipeline rounds the shared weights to bf16 in place
    half = SegDiffusionPipeline(pipe.backbone, replace(pipe.config, half_precision=True))
    half_run = run(half, grid_samples, classes, unseen, progress=bar)
    figure = plot_grid(grid, Path(args.figure))
    rows = [(f"E={e}, S={s}", r) for e, s, r in grid]
    rows.append((f"E={defaults.ensemble_size}, S={defaults.denoise_steps}, half precision (bf16)", half_run))
    model_name = args.checkpoint or ("random-init" if args.random_init else "shipped")
    header = "\n".join(
        [
            provenance(threads=args.threads),
            f"- model: `{model_name}`; data: {args.data} {args.split}, first {len(samples)} scenes (grid: "
            f"first {len(grid_samples)}); {len(classes)} classes named, background = threshold "
            f"{defaults.background_threshold}; unseen = {', '.join(unseen)}; seed {defaults.seed}",
            f"- total run time: {time.perf_counter() - started:.0f} s",
        ]
    )
    body = "\n\n".join(
        [
            SECTION_TITLE,
            header,
            "**Quality at the default settings** (percent; the K-means and pixel-MLP floors are in the "
            "Floors section above):",
            quality_table(quality),
            "**Accuracy–speed grid** (E = ensemble_size, S = denoise_steps; median over batches of 8 "
            f"images; plot: `{_rel(figure)}`):",
            grid_table(rows),
            "**Uncertainty vs error** (pixels of the quality run; AUROC of the score for 'this pixel is "
            "mislabelled', 0.5 = uninformative):",
            markdown_table(
                ["score", "AUROC", "error rate (%)", "mean unc. correct", "mean unc. wrong"],
                [
                    [
                        "ensemble spread (uncertainty map)",
                        _f(unc.get("auroc_ensemble"), 3),
                        _f(unc.get("error_rate")),
                        _f(unc.get("mean_unc_correct"), 3),
                        _f(unc.get("mean_unc_wrong"), 3),
                    ],
                    [
                        "single-pass margin to the threshold",
                        _f(unc.get("auroc_confidence"), 3),
                        "-",
                        "-",
                        "-",
                    ],
                ],
            ),  # fmt: skip
        ]
    )
    record = {
        "quality": {n: m for n, m, _ in quality},
        "grid": {f"{e}x{s}": vars(r) | {"uncertainty": None, "confidence_unc": None, "errors": None}
                 for e, s, r in grid},
        "half": {"metrics": half_run.metrics, "cpu_s_per_image": half_run.cpu_s_per_image},
        "uncertainty": unc,
    }  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2, default=float))
    if args.update_card and args.checkpoint and not args.random_init:
        from diffuseg.train.seg_diffusion import write_model_card

        note = f"FashionScenes {args.split}, first {len(samples)} scenes, default settings (`{SECTION_ID}`)."
        write_model_card(args.checkpoint, metrics=main_run.metrics, metrics_note=note)
    if args.no_write:
        print(body)
    else:
        logger.info("wrote %s", write_results_section(SECTION_ID, body, args.out))


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(RESULTS_MD.parents[1]))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    main()
