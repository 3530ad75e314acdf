"""CLI for ZS3D: ``diffuseg train zs3d`` and ``diffuseg augment --method zs3d``.

Heavy imports happen inside the commands so that ``diffuseg --help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffuseg.cli_common import Quiet
from diffuseg.cli_common import fail as _fail
from diffuseg.cli_common import load_config as _load_config
from diffuseg.cli_common import setup_logging as _setup_logging

DEFAULT_CONFIG = Path("configs/zs3d.yaml")

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Config override, dotted: --set train.max_steps=2000 (repeatable)."),
]


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    """Add the ZS3D commands to the ``diffuseg`` app."""

    @train_app.command("zs3d")
    def train_zs3d_cmd(
        data: Annotated[
            Path, typer.Option(help="Dataset folder (img_dir, ann_dir, meta.json with 'unseen').")
        ],
        out: Annotated[Path, typer.Option(help="Run folder: checkpoints, logs, calibration, final/ model.")],
        config: Annotated[Path, typer.Option(help="Recipe (YAML), see configs/zs3d.yaml.")] = DEFAULT_CONFIG,
        max_minutes: Annotated[
            float | None, typer.Option(help="Stop (resumably) after this many minutes; rerun to continue.")
        ] = None,
        stage: Annotated[
            str, typer.Option(help="all (every stage not done yet) | main | calibration | calibrate | card.")
        ] = "all",
        baseline: Annotated[
            bool, typer.Option(help="Train the SPNet-like regression baseline (model.type=regression).")
        ] = False,
        set_: SetOpt = None,
        quiet: Quiet = False,
    ) -> None:
        """Train ZS3D on seen classes, calibrate its margin on pseudo-unseen classes, write the model card."""
        _setup_logging(quiet)
        from diffuseg.train.zs3d import train_zs3d

        overrides = list(set_ or [])
        if baseline:
            overrides.append("model.type=regression")
        cfg = _load_config(config, overrides)
        try:
            result = train_zs3d(data, out, cfg, max_minutes=max_minutes, progress=not quiet, stage=stage)
        except (FileNotFoundError, ValueError) as e:
            _fail(str(e))
            return
        state = "finished" if result.finished else "stopped (run the same command again to continue)"
        typer.echo(f"stage {result.stage}: {state}; step {result.step}; gamma {result.calibration}")
        if result.checkpoint is not None and result.finished:
            typer.echo(f"model: {result.checkpoint}")

    @app.command("augment")
    def augment_cmd(
        data: Annotated[Path, typer.Option(help="Source dataset folder (its images guide the sampler).")],
        out: Annotated[Path, typer.Option(help="Output dataset folder (img_dir/, ann_dir/, meta.json).")],
        rho: Annotated[
            float,
            typer.Option(
                help="Strength: fraction of reverse steps (from t=T) fed the guide; 0 = unconditional."
            ),
        ] = 0.6,
        num: Annotated[int, typer.Option(help="Number of image + mask pairs to generate.")] = 100,
        method: Annotated[str, typer.Option(help="Generator method (zs3d).")] = "zs3d",
        checkpoint: Annotated[
            str | None, typer.Option(help="ZS3D checkpoint folder (default: the shipped one).")
        ] = None,
        split: Annotated[
            str, typer.Option(help="Split of --data to take guides from; also the output split.")
        ] = "train",
        seed: Annotated[int, typer.Option(help="Seed (guide order and sampling noise).")] = 0,
        steps: Annotated[int | None, typer.Option(help="Reverse steps (default: the checkpoint's).")] = None,
        batch_size: Annotated[int, typer.Option(help="Pairs generated per batch.")] = 16,
        quiet: Quiet = False,
    ) -> None:
        """Generate image + mask pairs with a ZS3D model, written in diffuseg's dataset layout."""
        _setup_logging(quiet)
        if method != "zs3d":
            _fail(f"--method {method!r} cannot generate training pairs; only zs3d can")
        from diffuseg.methods.zs3d import ZS3DPipeline, augment_dataset

        try:
            pipe = ZS3DPipeline.from_pretrained(checkpoint)
            path = augment_dataset(
                pipe,
                data,
                out,
                rho=rho,
                num=num,
                split=split,
                seed=seed,
                batch_size=batch_size,
                num_inference_steps=steps,
                progress=not quiet,
            )
        except (FileNotFoundError, ValueError) as e:
            _fail(str(e))
            return
        typer.echo(f"wrote {num} pairs to {path}")
