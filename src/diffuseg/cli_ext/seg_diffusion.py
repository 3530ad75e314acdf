"""``diffuseg train seg-diffusion``: fine-tune a latent diffusion model for open-vocabulary masks.

Segmenting and evaluating go through the shared ``diffuseg segment/evaluate --method
seg-diffusion`` commands; this module only adds the trainer. Heavy imports stay inside the
command so ``diffuseg --help`` remains instant.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from diffuseg.cli_common import fail as _fail

DEFAULT_CONFIG = Path("configs/seg-diffusion.yaml")


def _command_line(
    data: Path,
    out: Path,
    backbone: str | None,
    config: Path,
    max_minutes: float | None,
    export: Path | None,
    overrides: list[str] | None,
) -> str:
    """The command as a user would retype it (for the model card), rebuilt from the parsed options."""
    args = ["diffuseg", "train", "seg-diffusion", "--data", str(data), "--out", str(out)]
    if backbone is not None:
        args += ["--backbone", backbone]
    args += ["--config", str(config)]
    if max_minutes is not None:
        args += ["--max-minutes", f"{max_minutes:g}"]
    if export is not None:
        args += ["--export", str(export)]
    for item in overrides or []:
        args += ["--set", item]
    return shlex.join(args)


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    """Add ``train seg-diffusion`` to the ``diffuseg`` CLI."""

    @train_app.command("seg-diffusion")
    def train_seg_diffusion(
        data: Annotated[Path, typer.Option(help="Dataset folder (img_dir, ann_dir, meta.json: 'unseen').")],
        out: Annotated[Path, typer.Option(help="Run folder: cache, checkpoints, log; final/ when finished.")],
        backbone: Annotated[
            str | None,
            typer.Option(
                help="Latent diffusion model to fine-tune: a folder or hub id (SD 1.x/2.x or mini-SD); "
                "'random-init' for the untrained mini-SD architecture. Default: the shipped mini-SD."
            ),
        ] = None,
        config: Annotated[Path, typer.Option(help="Training recipe (YAML).")] = DEFAULT_CONFIG,
        max_minutes: Annotated[
            float | None, typer.Option(help="Stop (resumably) after this many minutes; rerun to continue.")
        ] = None,
        export: Annotated[
            Path | None,
            typer.Option(help="Also export the latest checkpoint's (EMA) weights here, finished or not."),
        ] = None,
        set_: Annotated[
            list[str] | None,
            typer.Option("--set", help="Config override, dotted: --set train.lr=3e-5 (repeatable)."),
        ] = None,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    ) -> None:
        """Fine-tune a latent diffusion UNet Marigold-style for Seg-diffusion (resumes from OUT)."""
        import logging

        logging.basicConfig(
            level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
        )
        from diffuseg.train.loop import load_yaml_config
        from diffuseg.train.seg_diffusion import train_seg_diffusion as run

        if not config.is_file():
            _fail(f"{config}: no such config file (see configs/seg-diffusion.yaml)")
        try:
            cfg = load_yaml_config(config, set_ or [])
            result = run(
                data,
                out,
                cfg,
                backbone=backbone,
                max_minutes=max_minutes,
                progress=not quiet,
                export=export,
                command=_command_line(data, out, backbone, config, max_minutes, export, set_),
            )
        except (FileNotFoundError, ValueError) as e:
            _fail(str(e))
            return
        where = f", exported to {result.export_dir}" if result.export_dir else ""
        typer.echo(f"step {result.step}, finished={result.finished}, last loss {result.last_loss}{where}")
