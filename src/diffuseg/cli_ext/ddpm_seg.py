"""CLI for DDPM-Segmentation: ``train ddpm-seg``, ``train unet-seg`` and ``dataset-ddpm``.

Heavy imports happen inside the commands so that ``diffuseg --help`` stays instant.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from diffuseg.cli_common import Quiet
from diffuseg.cli_common import fail as _fail
from diffuseg.cli_common import load_config as _load_config
from diffuseg.cli_common import setup_logging as _setup_logging

DEFAULT_CONFIG = Path("configs/ddpm-seg.yaml")

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Config override, dotted: --set ensemble.num_models=5 (repeatable)."),
]
ConfigOpt = Annotated[Path, typer.Option(help="Recipe (YAML), see configs/ddpm-seg.yaml.")]


def _csv(text: str | None, cast) -> list | None:
    if text is None:
        return None
    try:
        return [cast(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        _fail(f"expected a comma-separated list, got {text!r}")
    return None


def _feature_config(cfg: dict[str, Any], kind, backbone, layers, timesteps):
    from diffuseg.methods.ddpm_seg import FeatureConfig

    values = dict(cfg.get("features", {}))
    for key, val in (("kind", kind), ("backbone", backbone), ("layers", layers), ("timesteps", timesteps)):
        if val is not None:
            values[key] = val
    return FeatureConfig.from_dict(values)


def _ensemble_config(cfg: dict[str, Any], augment: bool, adamw_dropout: bool, num_models, seed: int):
    from diffuseg.train.ddpm_seg import EnsembleTrainConfig

    values = dict(cfg.get("ensemble", {}))
    improved = dict(cfg.get("improved", {}))
    if augment:
        values["augment"] = True
    if adamw_dropout:
        values.update({k: improved[k] for k in ("optimizer", "weight_decay", "dropout") if k in improved})
    if num_models is not None:
        values["num_models"] = num_models
    values["seed"] = seed
    return EnsembleTrainConfig.from_dict(values)


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    """Add the DDPM-Segmentation commands to the ``diffuseg`` app."""

    @train_app.command("ddpm-seg")
    def train_ddpm_seg(
        data: Annotated[Path, typer.Option(help="Dataset folder (mmseg layout, meta.json).")],
        num_labels: Annotated[int, typer.Option(help="Number of labelled training scenes to use.")],
        out: Annotated[Path, typer.Option(help="Checkpoint folder to write (config.json + ensemble/).")],
        backbone: Annotated[
            str | None,
            typer.Option(
                help="Feature backbone: folder / hub id, random:mini-sd (default: from the config)."
            ),
        ] = None,
        features: Annotated[
            str | None,
            typer.Option(help="diffusion | unet2d | efficientnet-lite0 | rgbxy (default: config)."),
        ] = None,
        layers: Annotated[
            str | None, typer.Option(help="Decoder blocks, e.g. 'up_blocks.1,up_blocks.2'.")
        ] = None,
        timesteps: Annotated[str | None, typer.Option(help="Timesteps, e.g. '50,150,250'.")] = None,
        augment: Annotated[
            bool, typer.Option("--augment", help="Augment labelled images (x5 data).")
        ] = False,
        adamw_dropout: Annotated[
            bool, typer.Option("--adamw-dropout", help="AdamW (wd 1e-4) + Dropout 0.4 in the MLPs.")
        ] = False,
        tta: Annotated[bool, typer.Option("--tta", help="Make test-time augmentation the default.")] = False,
        evaluate: Annotated[
            str | None, typer.Option(help="Score the model on this split of DATA (e.g. val) for the card.")
        ] = None,
        num_models: Annotated[int | None, typer.Option(help="Ensemble size (default 10).")] = None,
        seed: Annotated[
            int | None, typer.Option(help="Selects the labelled scenes and seeds training.")
        ] = None,
        work_dir: Annotated[
            Path | None,
            typer.Option(help="Keep the feature store + finished MLPs here to resume (default: a temp dir)."),
        ] = None,
        embed_backbone: Annotated[
            bool, typer.Option("--embed-backbone", help="Copy the backbone into the checkpoint.")
        ] = False,
        config: ConfigOpt = DEFAULT_CONFIG,
        set_: SetOpt = None,
        quiet: Quiet = False,
    ) -> None:
        """Train DDPM-Segmentation's MLP ensemble on N labelled scenes (features streamed from disk)."""
        _setup_logging(quiet)
        from diffuseg.train.ddpm_seg import train_ddpm_seg_folder

        cfg = _load_config(config, set_)
        s = int(seed if seed is not None else cfg.get("seed", 0))
        try:
            feat = _feature_config(cfg, features, backbone, _csv(layers, str), _csv(timesteps, int))
            ens = _ensemble_config(cfg, augment, adamw_dropout, num_models, s)
            train_ddpm_seg_folder(
                data, num_labels, out, feat, ens, seed=s, work_dir=work_dir,
                embed_backbone=embed_backbone, tta=tta, evaluate_split=evaluate, progress=not quiet,
                command=shlex.join(["diffuseg", *sys.argv[1:]]),
            )  # fmt: skip
        except (FileNotFoundError, ValueError) as e:
            _fail(str(e))
        typer.echo(f"wrote {out}")

    @train_app.command("unet-seg")
    def train_unet_seg(
        data: Annotated[Path, typer.Option(help="Training dataset folder (real or DatasetDDPM output).")],
        out: Annotated[Path, typer.Option(help="Run folder; the model is exported to OUT/final.")],
        num_labels: Annotated[
            int | None, typer.Option(help="Use N randomly drawn training scenes (default: all).")
        ] = None,
        val_data: Annotated[
            Path | None, typer.Option(help="Dataset whose val split is scored during training.")
        ] = None,
        seed: Annotated[int | None, typer.Option(help="Scene draw and training seed.")] = None,
        max_minutes: Annotated[
            float | None, typer.Option(help="Stop (resumably) after this many minutes.")
        ] = None,
        config: ConfigOpt = DEFAULT_CONFIG,
        set_: SetOpt = None,
        quiet: Quiet = False,
    ) -> None:
        """Train the small supervised UNet segmenter (from-scratch baseline / DatasetDDPM segmenter)."""
        _setup_logging(quiet)
        from diffuseg.eval.runner import load_meta
        from diffuseg.methods.dataset_ddpm import train_segmenter
        from diffuseg.train import TrainConfig
        from diffuseg.train.ddpm_seg import load_labelled, select_labelled

        cfg = _load_config(config, set_)
        s = int(seed if seed is not None else cfg.get("seed", 0))
        seg = dict(cfg.get("segmenter", {}))
        try:
            meta = load_meta(data)
            ids = select_labelled(data, num_labels or _count_train(data), s)
            images, labels = load_labelled(data, ids)
            val = None
            if val_data is not None:
                vids = sorted(p.stem for p in (Path(val_data) / "ann_dir" / "val").glob("*.png"))
                val = load_labelled(val_data, vids, split="val")
            tc = TrainConfig.from_dict(
                {**seg.get("train", {}), "output_dir": str(out), "seed": s, "max_minutes": max_minutes,
                 "progress": not quiet}
            )  # fmt: skip
            result = train_segmenter(
                images, labels, meta["classes"], tc, seg.get("size", 64), seg.get("widths", (16, 32, 64)),
                meta.get("palette"), val, {"data": str(data), "num_labels": len(ids), "seed": s},
            )  # fmt: skip
        except (FileNotFoundError, ValueError) as e:
            _fail(str(e))
        typer.echo(f"step {result.step}, finished={result.finished}, exported to {result.export_dir}")

    @app.command("dataset-ddpm")
    def dataset_ddpm(
        out: Annotated[Path, typer.Option(help="Dataset folder to write (img_dir/train, ann_dir/train).")],
        checkpoint: Annotated[
            Path | None, typer.Option(help="DDPM-Segmentation checkpoint (default: the shipped one).")
        ] = None,
        num_images: Annotated[
            int | None, typer.Option(help="Samples to generate (before filtering).")
        ] = None,
        captions: Annotated[
            Path | None,
            typer.Option(help="captions/*.jsonl whose captions prompt the sampler (default: none)."),
        ] = None,
        drop_fraction: Annotated[
            float | None, typer.Option(help="Share of most uncertain samples dropped.")
        ] = None,
        seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
        steps: Annotated[int | None, typer.Option(help="DDIM steps.")] = None,
        guidance: Annotated[
            float | None, typer.Option(help="Classifier-free guidance (with captions).")
        ] = None,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing dataset at OUT.")] = False,
        config: ConfigOpt = DEFAULT_CONFIG,
        set_: SetOpt = None,
        quiet: Quiet = False,
    ) -> None:
        """DatasetDDPM: sample images, label them with the ensemble, keep the most certain 90%."""
        _setup_logging(quiet)
        import json

        from diffuseg.methods.dataset_ddpm import generate_dataset_ddpm
        from diffuseg.methods.ddpm_seg import DDPMSegPipeline

        dd = dict(_load_config(config, set_).get("dataset_ddpm", {}))
        try:
            pipe = DDPMSegPipeline.from_pretrained(checkpoint)
            prompts = None
            if captions is not None:
                lines = Path(captions).read_text().splitlines()
                prompts = [json.loads(line)["caption"] for line in lines if line.strip()]
            path = generate_dataset_ddpm(
                pipe, out, num_images or dd.get("num_images", 1000), prompts,
                drop_fraction if drop_fraction is not None else dd.get("drop_fraction", 0.1), seed,
                dd.get("batch_size", 16), steps or dd.get("num_inference_steps", 50),
                guidance if guidance is not None else dd.get("guidance_scale", 3.0),
                progress=not quiet, overwrite=overwrite,
            )  # fmt: skip
        except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
            _fail(str(e))
        typer.echo(f"wrote {path}")


def _count_train(data: Path) -> int:
    n = len(list((Path(data) / "ann_dir" / "train").glob("*.png")))
    if n == 0:
        _fail(f"{data}/ann_dir/train holds no label maps")
    return n
