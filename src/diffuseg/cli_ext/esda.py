"""CLI of ESDA: ``diffuseg train esda`` and ``diffuseg evaluate-episodes`` (the episodic protocol).

``diffuseg evaluate --method esda`` (semantic protocol) and ``diffuseg segment --method esda`` go
through the shared commands once ``esda`` is in the methods registry.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated

import typer

from diffuseg.cli_common import Quiet, Threads
from diffuseg.cli_common import fail as _fail
from diffuseg.cli_common import set_threads as _set_threads
from diffuseg.cli_common import setup_logging as _setup_logging

__all__ = ["register"]


def _load_binary_pipeline(method: str, checkpoint: str | None):
    """A pipeline whose ``__call__`` has ``mode="binary"`` (ESDA; others once they support it)."""
    from diffuseg.methods import METHODS, load_pipeline

    if method == "esda" and method not in METHODS:  # usable before the registry lists it
        from diffuseg.methods.esda import ESDAPipeline

        pipe = ESDAPipeline.from_pretrained(checkpoint)
    else:
        pipe = load_pipeline(method, checkpoint)
    if "mode" not in inspect.signature(pipe.__call__).parameters:
        raise ValueError(f"method {method!r} has no binary mode; the episodic protocol needs one (e.g. esda)")
    return pipe


def train_esda_command(
    data: Annotated[Path, typer.Option(help="Dataset folder (img_dir, ann_dir, meta.json).")],
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints, log.jsonl and the exported final/.")],
    config: Annotated[Path, typer.Option(help="Training recipe (YAML).")] = Path("configs/esda.yaml"),
    fold: Annotated[
        int | None,
        typer.Option(
            help="Episodic fold whose classes are held out (default: the config's; none: meta unseen)."
        ),
    ] = None,
    variant: Annotated[
        str | None,
        typer.Option(
            help="esda | no-adapters | no-interactor | no-text-injection | no-distribution-losses | clsclip."
        ),
    ] = None,
    max_minutes: Annotated[
        float | None, typer.Option(help="Stop (resumably) after this many minutes.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Config override, dotted: --set train.lr=1e-3 (repeatable)."),
    ] = None,
    threads: Threads = None,
    quiet: Quiet = False,
) -> None:
    """Train ESDA (adapters, text injection, interactor, head) on base classes; resumes from OUT."""
    _setup_logging(quiet)
    _set_threads(threads)
    from diffuseg.train import load_yaml_config
    from diffuseg.train.esda import train_esda, write_model_card

    if not config.is_file():
        _fail(f"{config}: no such config file (see configs/esda.yaml)")
    try:
        cfg = load_yaml_config(config, set_ or [])
        result = train_esda(
            data, out, cfg, fold=fold, variant=variant, max_minutes=max_minutes, progress=not quiet
        )
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if result.export_dir is not None:
        import shlex
        import sys

        write_model_card(
            result.export_dir, shlex.join(["diffuseg", *sys.argv[1:]]), run_dir=out, data_dir=data
        )
    typer.echo(
        f"step {result.step}, finished={result.finished}, last loss {result.last_loss}"
        + (f", model in {result.export_dir}" if result.export_dir else "")
    )


def evaluate_episodes_command(
    data: Annotated[Path, typer.Option(help="Dataset folder (img_dir, ann_dir, meta.json).")],
    method: Annotated[str, typer.Option(help="A method with a binary mode (esda).")] = "esda",
    checkpoint: Annotated[str | None, typer.Option(help="Model folder (default: shipped).")] = None,
    fold: Annotated[int | None, typer.Option(help="Fold whose novel classes are tested.")] = 0,
    novel: Annotated[
        str | None, typer.Option(help="Novel class names instead of a fold, comma-separated.")
    ] = None,
    folds_from: Annotated[
        str | None, typer.Option(help="Fold definition when meta.json's name has none: pascal-5i | coco-20i.")
    ] = None,
    split: Annotated[str, typer.Option()] = "val",
    episodes: Annotated[int, typer.Option(help="Episodes per fold (ESDA: 1000).")] = 1000,
    seed: Annotated[int, typer.Option(help="Episode seed (ESDA: 456).")] = 456,
    min_pixels: Annotated[
        int | None, typer.Option(help="Min novel-object area for an image to be used (default per dataset).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Episodes per forward pass.")] = 16,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report JSON here.")] = None,
    threads: Threads = None,
    quiet: Quiet = False,
) -> None:
    """Episodic zero-shot evaluation: binary masks of named novel classes; mIoU over classes and FB-IoU."""
    _setup_logging(quiet)
    _set_threads(threads)
    from diffuseg.data.episodes import evaluate_episodes
    from diffuseg.methods.base import parse_classes

    try:
        pipe = _load_binary_pipeline(method, checkpoint)

        def predict(images, names):
            return pipe(images, class_names=names, mode="binary").labels

        report = evaluate_episodes(
            predict,
            data,
            split,
            fold,
            novel=parse_classes(novel),
            dataset=folds_from,
            num_episodes=episodes,
            seed=seed,
            min_pixels=min_pixels,
            batch_size=batch_size,
            progress=not quiet,
            method=method,
            protocol={"checkpoint": checkpoint or "shipped"},
            json_out=json_out,
        )
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    m = report["metrics"]
    lines = [f"{method} on {report['dataset']}/{split}, novel {report['protocol']['novel_classes']}"]
    lines += [
        f"  {name:<16} IoU {v['IoU']:6.2f}  ({v['episodes']} episodes)"
        for name, v in report["per_class"].items()
    ]
    lines.append(f"  mIoU {m['mIoU']:.2f}   FB-IoU {m['FB-IoU']:.2f}   ({report['num_episodes']} episodes)")
    typer.echo("\n".join(lines))


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    """Add ``train esda`` and ``evaluate-episodes``."""
    train_app.command("esda")(train_esda_command)
    app.command("evaluate-episodes")(evaluate_episodes_command)
