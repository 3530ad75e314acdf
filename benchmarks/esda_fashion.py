"""ESDA on FashionScenes, episodic protocol: per fold and mean, against a ClsCLIP-like baseline and ablations.

For every fold (the fold's two classes are novel: never trained on) and every variant, one model is
trained with ``configs/esda.yaml`` (the same recipe and step budget for all variants) and evaluated
on the fold's test episodes (1000 per fold, seed 456; binary mask of the named novel class):

* **esda** — adapters + text injection + interactor + spatial distribution losses;
* **clsclip** — ClsCLIP-like baseline: the same frozen encoder, a text-projected similarity map and
  the conv head; nothing inside the encoder, no interactor, main loss only;
* **no-adapters**, **no-interactor**, **no-text-injection**, **no-distribution-losses** — ESDA minus one part.

Scores: mIoU over the fold's novel classes and FB-IoU (ESDA/PFENet protocol), in percent. Runs are
resumable: a variant whose ``final/`` model exists is only re-evaluated, and every finished cell's
report is committed under ``benchmarks/records/esda-fashion/`` so that the benchmark can be run in
chunks on machines that are not kept (a cell whose config or data differ is rerun). CPU cost per training step
(batch 16, one thread, free core): ESDA 1.06 s, − adapters 0.93 s, − distribution losses 0.89 s,
− interactor 0.46 s, ClsCLIP-like 0.18 s — about 60 min per fold at 1000 steps, 5 h for all folds::

    python benchmarks/esda_fashion.py --data /work/data/fashion_scenes --steps 1000 --runs-dir runs/esda-bench

Beside the table: a name-blind floor (every object's true pixels, whatever the name: what ignoring
the class name can earn on these episodes), ESDA vs the baseline per novel class next to its nearest
training name, and two diagnostics of the ESDA and baseline models found in ``--runs-dir`` (recorded
too): ``--name-dependence`` (masks for the novel name vs for its nearest base name) and
``--semantic`` (all class names at once, the fold's classes unseen: seen/unseen/hIoU).

Seeds: ``--seeds 0,1,2`` trains one model per seed for every cell (``train.seed``; seed 0 is the
table's original cell, other seeds are kept as ``VARIANT-seedS``); the table shows the mean over
seeds per fold and the spread of the five-fold mean across seeds, since single models per fold
swing by several points.

An experiment on the recipe is kept apart from the table's cells: ``--tag NAME --set KEY=VALUE``
trains and records ``VARIANT@NAME`` (e.g. ``--variants esda --tag text-noise-0.1 --set
data.text_noise=0.1``).

Smoke test (minutes): ``--tiny`` trains a few steps per variant on a small generated set.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import (
    RESULTS_MD,
    dataset_fingerprint,
    load_record,
    markdown_table,
    provenance,
    record_key,
    save_record,
    write_results_section,
)
from diffuseg.data.episodes import FASHION_SCENES_FOLDS, evaluate_episodes  # noqa: E402
from diffuseg.eval.runner import load_meta  # noqa: E402
from diffuseg.io import write_json  # noqa: E402
from diffuseg.train import load_yaml_config  # noqa: E402

logger = logging.getLogger("esda_fashion")

SECTION_ID = "esda-fashion"
SECTION_TITLE = "## ESDA: episodic zero-shot segmentation on FashionScenes"
VARIANT_ORDER = (
    "esda",
    "clsclip",
    "no-adapters",
    "no-interactor",
    "no-text-injection",
    "no-distribution-losses",
)
VARIANT_LABELS = {
    "esda": "ESDA",
    "clsclip": "ClsCLIP-like baseline",
    "no-adapters": "ESDA − adapters",
    "no-interactor": "ESDA − interactor",
    "no-text-injection": "ESDA − text injection",
    "no-distribution-losses": "ESDA − distribution losses",
}
REPO = Path(__file__).resolve().parents[1]


def prepare_data(args: argparse.Namespace) -> Path:
    """``--data`` as given, or a small FashionScenes set generated into the cache (``--tiny``)."""
    if args.data is not None:
        return Path(args.data)
    from diffuseg.data.fashion_scenes import generate_fashion_scenes

    cache = Path(args.cache_dir) / f"fashion-scenes-t{args.num_train}-v{args.num_val}-s{args.seed}"
    if not (cache / "meta.json").is_file():
        generate_fashion_scenes(cache, args.num_train, args.num_val, seed=args.seed, progress=False)
    return cache


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe shared by every variant: the config file plus the benchmark's overrides."""
    overrides = [
        f"data.negative_prob={args.negative_prob}",
        f"data.num_val_episodes={args.val_episodes}",
        "train.eval_every=null",
    ]
    if args.steps is not None:
        overrides += [
            f"train.max_steps={args.steps}",
            f"train.warmup_steps={min(200, max(1, args.steps // 10))}",
        ]
    if args.tiny:
        overrides += ["train.batch_size=8", "train.checkpoint_every=1000", "train.log_every=5"]
    overrides += list(args.set or [])
    return load_yaml_config(args.config, overrides)


def cell_name(variant: str, tag: str = "", seed: int = 0) -> str:
    """Run folder / record name of one model: ``esda``, ``esda@TAG``, ``esda-seed1`` (seed 0: plain)."""
    name = f"{variant}@{tag}" if tag else variant
    return f"{name}-seed{seed}" if seed else name


def seed_config(config: dict, seed: int) -> dict:
    """The recipe with ``train.seed`` set (seed 0, the config's default, keeps the records' signature)."""
    return {**config, "train": {**config["train"], "seed": seed}}


def train_and_evaluate(
    args: argparse.Namespace,
    data_dir: Path,
    fold: int,
    variant: str,
    config: dict,
    text_encoder,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Train (or resume) one variant on one fold, then score its exported model on the fold's episodes.

    ``None`` when ``--recorded-only`` and the cell has neither a record nor a finished run.
    """
    from diffuseg.methods.esda import ESDAModel, ESDAPipeline
    from diffuseg.train.esda import train_esda

    config = seed_config(config, seed)
    name = cell_name(variant, args.tag, seed)
    run = Path(args.runs_dir) / f"fold{fold}" / name
    report_path = run / "episodes.json"
    key = record_key(f"fold{fold}", name)
    signature = {"config": config, "data": dataset_fingerprint(data_dir), "episodes": args.episodes}
    if not args.reevaluate and not args.no_records:
        recorded = load_record(SECTION_ID, key, signature)
        if recorded is not None:
            logger.info(
                "fold %d %s: committed record (benchmarks/records/%s/%s.json)", fold, variant, SECTION_ID, key
            )
            return recorded
    if report_path.is_file() and (run / "final" / "config.json").is_file() and not args.reevaluate:
        return json.loads(report_path.read_text())
    if args.recorded_only:
        return None
    started = time.perf_counter()
    if not (run / "final" / "config.json").is_file():
        result = train_esda(
            data_dir,
            run,
            config,
            fold=fold,
            variant=variant,
            progress=args.progress,
            text_encoder=text_encoder,
        )
        if not result.finished:
            raise RuntimeError(f"{run}: training stopped at step {result.step}; rerun to resume")
    train_s = time.perf_counter() - started
    pipe = ESDAPipeline(ESDAModel.from_pretrained(run / "final"), text_encoder)

    def predict(images, names):
        return pipe(images, class_names=names, mode="binary").labels

    report = evaluate_episodes(
        predict,
        data_dir,
        "val",
        fold,
        num_episodes=args.episodes,
        batch_size=32,
        progress=args.progress,
        method=f"esda:{variant}",
        protocol={"variant": variant, "steps": config["train"]["max_steps"]},
    )
    report["train_seconds"] = train_s
    write_json(report_path, report)
    if not args.no_records:
        save_record(SECTION_ID, key, signature, report)
    return report


def nearest_base_names(text_encoder, templates: list[str] | None) -> dict[str, tuple[str, float]]:
    """For every novel class: its fold's training (base) name with the closest pooled text embedding.

    Why: a text-conditioned model can only transfer to a novel name through the names it was trained
    on; this is what it has to fall back on (same template ensemble as the model's class embedding).
    """
    names = [n for fold in FASHION_SCENES_FOLDS for n in fold]
    emb = torch.nn.functional.normalize(text_encoder.encode_classes(names, templates=templates), dim=-1)
    sim = emb @ emb.T
    out = {}
    for fold in FASHION_SCENES_FOLDS:
        base = [j for j, n in enumerate(names) if n not in fold]
        for c in fold:
            i = names.index(c)
            j = max(base, key=lambda j: float(sim[i, j]))
            out[c] = (names[j], float(sim[i, j]))
    return out


def seed_mean(per_seed: dict[int, dict], get: Callable[[dict], float]) -> float:
    """Mean of one number over the seeds recorded for a cell."""
    return float(np.mean([get(r) for r in per_seed.values()]))


def per_class_rows(results: dict, nearest: dict[str, tuple[str, float]]) -> tuple[list[list[str]], str]:
    """ESDA vs the baseline per novel class (mean over seeds), beside its nearest base name; with a
    rank correlation.

    ``results[variant][fold][seed]`` is one model's episode report.
    """
    esda, base = results.get("esda", {}), results.get("clsclip", {})
    rows, pairs = [], []
    for fold in sorted(set(esda) & set(base)):
        for c in FASHION_SCENES_FOLDS[fold]:
            a, b = (seed_mean(per[fold], lambda r, c=c: r["per_class"][c]["IoU"]) for per in (esda, base))
            name, cos = nearest[c]
            rows.append([c, str(fold), f"{name} ({cos:.2f})", f"{a:.1f}", f"{b:.1f}", f"{a - b:+.1f}"])
            pairs.append((cos, a - b))
    if len(pairs) < 3:
        return rows, ""
    from scipy.stats import spearmanr

    rho = spearmanr([c for c, _ in pairs], [d for _, d in pairs]).statistic
    return (
        rows,
        f"Spearman correlation of the cosine with ESDA − baseline over {len(pairs)} classes: {rho:.2f}.",
    )


def name_blind_floor(data_dir: Path, fold: int, num_episodes: int) -> dict[str, Any]:
    """The score of a perfect name-blind segmenter: every object's true pixels, whatever the name.

    Why: an episode's image holds 1-3 items, so a model that segments objects without reading the
    class name already scores; this is the most such a model can score on the fold's episodes.
    """
    from diffuseg.data.episodes import (
        EpisodeMeter,
        binary_target,
        build_episodes,
        default_min_pixels,
        scan_labels,
    )
    from diffuseg.io import read_label

    meta = load_meta(data_dir)
    novel = FASHION_SCENES_FOLDS[fold]
    index = scan_labels(data_dir, "val", meta["classes"])
    meter = EpisodeMeter(novel)
    for ep in build_episodes(
        index, novel, num_episodes, min_pixels=default_min_pixels(str(meta.get("name")))
    ):
        label = read_label(data_dir / "ann_dir" / "val" / f"{ep.image_id}.png")
        objects = ((label != 0) & (label != 255)).astype(np.int64)
        meter.update(objects, binary_target(label, ep.class_id), ep.class_name)
    return meter.result()


def name_dependence_counts(
    label: np.ndarray, pred_novel: np.ndarray, pred_nearest: np.ndarray, novel_id: int, nearest_id: int
) -> np.ndarray:
    """Pixel counts for one episode: where the novel name's mask lands, and its overlap with the other.

    Returns ``[on novel, on nearest base class, on other objects, on background, |A ∩ B|, |A ∪ B|]``
    with A the mask predicted for the novel name and B the one for its nearest base name.
    """
    a, b = pred_novel.astype(bool), pred_nearest.astype(bool)
    valid = label != 255
    objects = valid & (label != 0) & (label != novel_id) & (label != nearest_id)
    return np.array(
        [
            (a & (label == novel_id)).sum(),
            (a & (label == nearest_id)).sum(),
            (a & objects).sum(),
            (a & valid & (label == 0)).sum(),
            (a & b).sum(),
            (a | b).sum(),
        ],
        dtype=np.int64,
    )


def name_dependence(
    pipe, data_dir: Path, fold: int, nearest: dict[str, tuple[str, float]], num_episodes: int
) -> dict[str, dict[str, float]]:
    """Does the model read the class name? Masks for the novel name vs for its nearest base name.

    On the fold's first ``num_episodes`` test episodes (same seed as the scores), per novel class:
    the shares of the novel name's predicted foreground on the novel class, on the nearest base
    class, on other objects and on background, and the IoU between the two masks. A model that
    ignores the name gives IoU ≈ 1; one that reads a novel name as its nearest training name puts
    its mask on that class.
    """
    from diffuseg.io import read_label

    masks: list[tuple[np.ndarray, np.ndarray]] = []

    def predict(images, names):
        a = pipe(images, class_names=names, mode="binary").labels
        b = pipe(images, class_names=[nearest[n][0] for n in names], mode="binary").labels
        masks.extend(zip(np.asarray(a), np.asarray(b), strict=True))
        return a

    report = evaluate_episodes(predict, data_dir, "val", fold, num_episodes=num_episodes, progress=False)
    meta = load_meta(data_dir)
    totals: dict[str, np.ndarray] = {}
    for (image_id, name), (a, b) in zip(report["protocol"]["episodes"], masks, strict=True):
        label = read_label(data_dir / "ann_dir" / "val" / f"{image_id}.png")
        ids = meta["classes"].index(name), meta["classes"].index(nearest[name][0])
        totals[name] = totals.get(name, 0) + name_dependence_counts(label, a, b, *ids)
    out = {}
    for name, t in totals.items():
        fg = max(int(t[:4].sum()), 1)
        out[name] = {
            "on_novel": t[0] / fg,
            "on_nearest": t[1] / fg,
            "on_other_objects": t[2] / fg,
            "on_background": t[3] / fg,
            "iou_novel_vs_nearest_name": t[4] / max(int(t[5]), 1),
        }
    return out


CALIBRATION_BIASES: tuple[float, ...] = (-1.0, 0.0, 1.0, 2.0, 3.0)
"""Shifts of the foreground log-odds for ``--calibration`` (0 = the protocol's argmax)."""


def bias_sweep(
    pipe, data_dir: Path, fold: int, biases: Sequence[float], num_episodes: int
) -> dict[str, dict[str, float]]:
    """Episodic scores with the foreground log-odds shifted by each bias before thresholding.

    Why: both models may be under-confident on a name they never trained on, and a fixed 0.5
    threshold would then hide how well each one separates the class. The model runs once; the
    episodes are replayed per bias (same seed, so the same order). The best bias is picked with
    the novel labels: an oracle, for diagnosis only.
    """
    probs: list[np.ndarray] = []

    def first(images, names):
        p = np.asarray(pipe(images, class_names=names, mode="binary").scores)[:, 1]
        probs.extend(p)
        return (p > 0.5).astype(np.int64)

    evaluate_episodes(first, data_dir, "val", fold, num_episodes=num_episodes, batch_size=32, progress=False)
    out = {}
    for b in biases:
        replay = iter(probs)
        threshold = 1.0 / (1.0 + np.exp(b))  # sigmoid(z + b) > 0.5  <=>  sigmoid(z) > sigmoid(-b)

        def shifted(images, names, replay=replay, threshold=threshold):
            return np.stack([next(replay) > threshold for _ in range(len(images))]).astype(np.int64)

        report = evaluate_episodes(
            shifted, data_dir, "val", fold, num_episodes=num_episodes, batch_size=32, progress=False
        )
        out[f"{b:+g}"] = {k: report["metrics"][k] for k in ("mIoU", "FB-IoU")}
    return out


def calibration_section(found: dict, episodes: int) -> list[str]:
    """Per model: mIoU at each bias and the best; then ESDA vs baseline over the shared (fold, seed) pairs."""
    if not found:
        return []
    biases = sorted({b for r in found.values() for b in r}, key=float)

    def best(r: dict) -> tuple[str, float]:
        b = max(r, key=lambda k: r[k]["mIoU"])
        return b, r[b]["mIoU"]

    rows = [
        [str(fold), model_label(variant, seed), *(f"{r[b]['mIoU']:.1f}" if b in r else "–" for b in biases)]
        + [f"{best(r)[1]:.1f} (b = {best(r)[0]})"]
        for (fold, variant, seed), r in sorted(found.items())
    ]
    pairs = sorted({(f, s) for f, v, s in found if (f, "esda", s) in found and (f, "clsclip", s) in found})
    summary = []
    for variant in ("esda", "clsclip"):
        if not pairs:
            break
        per = [found[(f, variant, s)] for f, s in pairs]
        summary.append(
            [
                VARIANT_LABELS[variant],
                *(f"{np.mean([r[b]['mIoU'] for r in per]):.1f}" for b in biases),
                f"{np.mean([best(r)[1] for r in per]):.1f}",
            ]
        )
    return [
        "",
        f"**Is the gap a threshold artefact?** (`--calibration`) All {episodes} episodes of each fold "
        "with a model in `--runs-dir`, the foreground log-odds shifted by b before thresholding "
        "(b > 0: more foreground; b = 0 is the protocol). The best b is chosen with the novel labels, "
        "so that column is an oracle, a diagnosis only:",
        "",
        markdown_table(["fold", "model", *(f"b = {b}" for b in biases), "best"], rows),
        *(
            [
                "",
                f"Mean over the {len(pairs)} (fold, seed) pairs that have both models:",
                "",
                markdown_table(["variant", *(f"b = {b}" for b in biases), "best per model"], summary),
            ]
            if summary
            else []
        ),
    ]


def model_diagnostic(
    args: argparse.Namespace,
    data_dir: Path,
    folds: list[int],
    config: dict,
    te,
    kind: str,
    measure: Callable[[Any, int], dict] | None,
    signature_extra: dict,
) -> dict[tuple[int, str], dict]:
    """One diagnostic of the trained ESDA and baseline models, per fold: recorded cells, and with
    ``measure`` (its flag given) new ones for every fold whose models are in ``--runs-dir``.

    Why records: the models live in ``--runs-dir`` on machines that are not kept, the scores in git.
    """
    from diffuseg.methods.esda import ESDAModel, ESDAPipeline

    found = {}
    for fold in folds:
        for variant in ("esda", "clsclip"):
            for seed in args.seed_list:
                name = cell_name(variant, seed=seed)
                signature = {
                    "config": seed_config(config, seed),
                    "data": dataset_fingerprint(data_dir),
                    **signature_extra,
                }
                key = record_key(f"fold{fold}", name, kind)
                result = None if args.no_records else load_record(SECTION_ID, key, signature)
                model_dir = Path(args.runs_dir) / f"fold{fold}" / name / "final"
                if result is None and measure is not None and (model_dir / "config.json").is_file():
                    result = measure(ESDAPipeline(ESDAModel.from_pretrained(model_dir), te), fold)
                    if not args.no_records:
                        save_record(SECTION_ID, key, signature, result)
                if result is not None:
                    found[(fold, variant, seed)] = result
    return found


def model_label(variant: str, seed: int) -> str:
    return f"{VARIANT_LABELS[variant]}, seed {seed}" if seed else VARIANT_LABELS[variant]


def semantic_scores(pipe, data_dir: Path, fold: int) -> dict[str, float]:
    """All class names at once (argmax with background), the fold's classes as unseen: seen/unseen/hIoU."""
    from diffuseg.methods.evaluate import evaluate_pipeline

    report = evaluate_pipeline(
        pipe, "esda", data_dir, "val", unseen=list(FASHION_SCENES_FOLDS[fold]), progress=False
    )
    keys = ("mIoU", "mIoU_seen", "mIoU_unseen", "hIoU")
    return {
        **{k: report["metrics"][k] for k in keys},
        "seconds_per_image": report["timing"]["seconds_per_image"],
    }


def semantic_section(found: dict) -> list[str]:
    if not found:
        return []
    rows = [
        [
            str(fold),
            model_label(variant, seed),
            *(f"{r[k]:.1f}" for k in ("mIoU", "mIoU_seen", "mIoU_unseen", "hIoU")),
        ]
        for (fold, variant, seed), r in sorted(found.items())
    ]
    return [
        "",
        "**Semantic protocol** (`--semantic`): every val scene labelled with all class names at once "
        "(argmax over per-class scores with background), the fold's two classes as unseen; each fold "
        "whose models are in `--runs-dir`:",
        "",
        markdown_table(["fold", "model", "mIoU", "seen mIoU", "unseen mIoU", "hIoU"], rows),
    ]


def name_dependence_section(found: dict, episodes: int) -> list[str]:
    if not found:
        return []
    rows = [
        [
            c,
            str(fold),
            model_label(variant, seed),
            *(f"{100 * r[k]:.0f}" for k in ("on_novel", "on_nearest", "on_other_objects", "on_background")),
            f"{r['iou_novel_vs_nearest_name']:.2f}",
        ]
        for (fold, variant, seed), res in sorted(found.items())
        for c, r in res.items()
    ]
    header = ["novel class", "fold", "model", "% on novel", "% on nearest base", "% on other objects",
              "% on background", "IoU(novel name, nearest name)"]  # fmt: skip
    return [
        "",
        f"**Does the model read the name?** First {episodes} episodes of each fold with a model in "
        "`--runs-dir` (`--name-dependence`): where the mask predicted for the novel name lands "
        "(% of its pixels), and the IoU between it and the mask predicted for the nearest base name "
        "instead (1 = the name makes no difference):",
        "",
        markdown_table(header, rows),
    ]


def render(
    args: argparse.Namespace,
    data_dir: Path,
    results: dict,
    config: dict,
    elapsed: float,
    nearest: dict[str, tuple[str, float]] | None = None,
    found: dict | None = None,
    floor: dict[int, dict] | None = None,
    semantic: dict | None = None,
    calibration: dict | None = None,
) -> str:
    """Markdown: mIoU per variant (per fold and mean), FB-IoU means, then ESDA vs baseline per class.

    ``results[variant][fold][seed]`` is one model's report; a fold's cell is its mean over seeds.
    """
    folds = sorted({f for per in results.values() for f in per})
    rows, fb_rows, seed_rows = [], [], []

    def label(variant: str) -> str:
        return f"{VARIANT_LABELS[variant]} ({args.tag})" if args.tag else VARIANT_LABELS[variant]

    def miou(r: dict) -> float:
        return r["metrics"]["mIoU"]

    for variant in [v for v in VARIANT_ORDER if v in results]:
        per = results[variant]
        cells = {f: seed_mean(per[f], miou) for f in folds if f in per}
        complete = len(cells) == len(folds)  # a mean over all folds or none
        # seeds recorded on every fold: the spread of the five-fold mean across them
        common = sorted(set.intersection(*(set(per[f]) for f in folds))) if complete else []
        fold_means = [np.mean([miou(per[f][s]) for f in folds]) for s in common]
        spread = f" ± {np.std(fold_means, ddof=1):.1f}" if len(common) > 1 else ""
        n_seeds = sorted({len(per[f]) for f in per})
        rows.append(
            [label(variant), *(f"{cells[f]:.1f}" if f in cells else "–" for f in folds)]
            + [f"{np.mean(list(cells.values())):.1f}{spread}" if complete else "–"]
            + ["–".join(str(n) for n in (n_seeds[0], n_seeds[-1])) if len(n_seeds) > 1 else str(n_seeds[0])]
        )
        if len(common) > 1:
            seed_rows.append((label(variant), dict(zip(common, fold_means, strict=True))))
        fb = [seed_mean(per[f], lambda r: r["metrics"]["FB-IoU"]) for f in folds if f in per]
        fb_rows.append(
            [
                label(variant),
                f"{np.mean(fb):.1f}" if complete else "–",
                f"{np.mean([r['train_seconds'] for f in per for r in per[f].values()]) / 60:.0f}",
            ]
        )
    if floor and all(f in floor for f in folds):
        label_floor = "floor: every object, name ignored (true masks)"
        floor_miou = [floor[f]["metrics"]["mIoU"] for f in folds]
        rows.append([label_floor, *(f"{v:.1f}" for v in floor_miou), f"{np.mean(floor_miou):.1f}", "-"])
        fb_rows.append([label_floor, f"{np.mean([floor[f]['metrics']['FB-IoU'] for f in folds]):.1f}", "-"])
    fold_names = [f"fold {f} ({', '.join(FASHION_SCENES_FOLDS[f])})" for f in folds]
    cells = [rep for per in results.values() for by_seed in per.values() for rep in by_seed.values()]
    seed_cols = sorted({s for _, by_seed in seed_rows for s in by_seed})
    seed_section = (
        [
            "",
            "**Five-fold mean mIoU per seed** (seeds recorded on every fold; a model's seed sets its "
            "initialisation, data order and augmentation; the episodes are the same):",
            "",
            markdown_table(
                ["variant", *(f"seed {s}" for s in seed_cols)],
                [[name, *(f"{m[s]:.1f}" if s in m else "–" for s in seed_cols)] for name, m in seed_rows],
            ),
        ]
        if seed_rows
        else []
    )
    train_total, n_models = sum(rep.get("train_seconds", 0.0) for rep in cells), len(cells)
    m, t = config["model"], config["train"]
    return "\n".join(
        [
            SECTION_TITLE,
            "",
            provenance(threads=1),
            f"- data: `{data_dir}`; episodes: {args.episodes} per fold on val, seed 456, binary mask of a "
            "named novel class (images need ≥ 45 px of a novel class; ESDA's 2·32·32 px scaled to 64² px)",
            f"- model: frozen `{m['encoder']}` + `{m['text_encoder']}` text, {m['image_size']}-px input, "
            f"width {m['dim']}; every variant trains {t['max_steps']} steps of batch {t['batch_size']} "
            f"(AdamW, lr {t['lr']}, {t['lr_schedule']}), negative_prob {config['data']['negative_prob']}",
            f"- compute: {train_total / 3600:.1f} h of training over {n_models} models (one thread each, "
            f"cells run in chunks across sessions, each kept in benchmarks/records/); this invocation "
            f"{elapsed / 60:.0f} min",
            "",
            "**mIoU over the fold's novel classes** (percent; a cell is the mean over its seeds; mean over "
            "folds, ± the standard deviation of that mean across the seeds that cover every fold):",
            "",
            markdown_table(["variant", *fold_names, "mean", "seeds"], rows),
            "",
            "**FB-IoU** (mean over folds) and training time per model:",
            "",
            markdown_table(["variant", "FB-IoU", "train min/model"], fb_rows),
            "",
            "Reference (paper, PASCAL-5i mIoU): ESDA 58.9 vs ClsCLIP 56.4; COCO-20i 37.1 vs 37.0.",
        ]
        + seed_section
        + per_class_section(results, nearest, m["text_encoder"])
        + name_dependence_section(found or {}, args.diag_episodes)
        + semantic_section(semantic or {})
        + calibration_section(calibration or {}, args.episodes)
    )


def per_class_section(
    results: dict, nearest: dict[str, tuple[str, float]] | None, text_encoder: str
) -> list[str]:
    rows, corr = per_class_rows(results, nearest) if nearest else ([], "")
    if not rows:
        return []
    header = [
        "novel class",
        "fold",
        f"nearest base name ({text_encoder} cos)",
        "ESDA IoU",
        "baseline IoU",
        "Δ",
    ]
    return [
        "",
        "**Per novel class**, ESDA vs the ClsCLIP-like baseline, beside the training name whose text "
        "embedding is closest (what a text-conditioned model falls back on):",
        "",
        markdown_table(header, rows),
        *(["", corr] if corr else []),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="FashionScenes folder (default: generate a small one)")
    p.add_argument("--cache-dir", default="data", help="where to generate data when --data is not given")
    p.add_argument("--num-train", type=int, default=400, help="generated train scenes (no --data)")
    p.add_argument("--num-val", type=int, default=100, help="generated val scenes (no --data)")
    p.add_argument("--seed", type=int, default=0, help="generation seed (no --data)")
    p.add_argument("--config", default=str(REPO / "configs" / "esda.yaml"))
    p.add_argument("--folds", default="0,1,2,3,4")
    p.add_argument("--variants", default=",".join(VARIANT_ORDER))
    p.add_argument("--seeds", default="0", help="training seeds per cell, e.g. 0,1,2 (train.seed)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default: config's)")
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--val-episodes", type=int, default=0, help="episodes for in-training evaluation")
    p.add_argument("--negative-prob", type=float, default=0.0, help="ESDA's episodic training: 0")
    p.add_argument("--set", action="append", help="extra config override, dotted (repeatable)")
    p.add_argument("--runs-dir", default="runs/esda-bench")
    p.add_argument(
        "--tag",
        default="",
        help="name of an experiment made with --set: its runs and records are kept apart (VARIANT@TAG)",
    )
    p.add_argument(
        "--name-dependence",
        action="store_true",
        help="diagnostic: masks for each novel name vs for its nearest base name (ESDA and baseline)",
    )
    p.add_argument(
        "--semantic",
        action="store_true",
        help="diagnostic: ESDA and baseline on the semantic protocol (fold classes unseen, seen/unseen/hIoU)",
    )
    p.add_argument(
        "--calibration",
        action="store_true",
        help="diagnostic: episodic mIoU with the foreground log-odds shifted (oracle threshold per model)",
    )
    p.add_argument("--diag-episodes", type=int, default=300, help="episodes per fold for --name-dependence")
    p.add_argument("--tiny", action="store_true", help="smoke test: small generated data, few steps")
    p.add_argument("--reevaluate", action="store_true", help="score existing models again")
    p.add_argument(
        "--recorded-only",
        action="store_true",
        help="train nothing: tabulate the cells already recorded (or finished in --runs-dir)",
    )
    p.add_argument(
        "--no-records",
        action="store_true",
        help="neither reuse nor write the committed per-cell results in benchmarks/records/",
    )
    p.add_argument("--out", default=str(RESULTS_MD), help="markdown file whose section is replaced")
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.progress = not args.no_progress
    try:
        args.seed_list = sorted({int(x) for x in args.seeds.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    if not args.seed_list or min(args.seed_list) < 0:
        raise SystemExit(f"--seeds needs at least one seed >= 0, got {args.seeds!r}")
    if args.tag and not args.set:
        raise SystemExit("--tag names an experiment: give its config changes with --set")
    if any(s.replace(" ", "").startswith("train.seed=") for s in args.set or []):
        raise SystemExit(
            "--seeds sets train.seed for every model: use --seeds S instead of --set train.seed=S"
        )
    if args.tiny:
        args.no_records = True
        args.steps = args.steps or 10
        args.episodes = min(args.episodes, 40)
        args.no_write = True
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    from diffuseg.text import get_text_encoder

    folds = [int(f) for f in args.folds.split(",") if f.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANT_ORDER]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANT_ORDER)}")
    t0 = time.perf_counter()
    data_dir = prepare_data(args)
    config = run_config(args)
    text_encoder = get_text_encoder(config["model"].get("text_encoder", "minilm"))
    results: dict[str, dict[int, dict[int, dict]]] = {}
    for seed in args.seed_list:  # seed-major: a run over several seeds fills every fold once first
        for fold in folds:
            for variant in variants:
                report = train_and_evaluate(args, data_dir, fold, variant, config, text_encoder, seed)
                if report is None:
                    logger.info("fold %d %s seed %d: not run yet (--recorded-only)", fold, variant, seed)
                    continue
                results.setdefault(variant, {}).setdefault(fold, {})[seed] = report
                logger.info(
                    "fold %d %-24s seed %d  mIoU %.1f  FB-IoU %.1f",
                    fold,
                    variant,
                    seed,
                    report["metrics"]["mIoU"],
                    report["metrics"]["FB-IoU"],
                )
    nearest = nearest_base_names(text_encoder, config["model"].get("class_templates"))
    # diagnostics score trained models (no training): allowed with --recorded-only
    found = model_diagnostic(
        args, data_dir, folds, config, text_encoder, "names",
        (lambda pipe, f: name_dependence(pipe, data_dir, f, nearest, args.diag_episodes))
        if args.name_dependence else None,
        {"episodes": args.diag_episodes},
    )  # fmt: skip
    semantic = model_diagnostic(
        args, data_dir, folds, config, text_encoder, "semantic",
        (lambda pipe, f: semantic_scores(pipe, data_dir, f)) if args.semantic else None,
        {"protocol": "semantic, fold classes unseen"},
    )  # fmt: skip
    calibration = model_diagnostic(
        args, data_dir, folds, config, text_encoder, "calibration",
        (lambda pipe, f: bias_sweep(pipe, data_dir, f, CALIBRATION_BIASES, args.episodes))
        if args.calibration else None,
        {"episodes": args.episodes, "biases": list(CALIBRATION_BIASES)},
    )  # fmt: skip
    floor = {f: name_blind_floor(data_dir, f, args.episodes) for f in folds if f < len(FASHION_SCENES_FOLDS)}
    elapsed = time.perf_counter() - t0
    body = render(args, data_dir, results, config, elapsed, nearest, found, floor, semantic, calibration)
    if args.no_write:
        sys.stdout.write(body + "\n")
    else:
        logger.info("wrote %s", write_results_section(SECTION_ID, body, args.out))


if __name__ == "__main__":
    main()
