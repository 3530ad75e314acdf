"""The ``diffuseg`` command line (Typer).

Commands stay thin: each parses arguments, calls one library function and reports. Heavy
imports (torch, diffusers) happen inside commands so ``diffuseg --help`` is instant.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from diffuseg.cli_common import Quiet
from diffuseg.cli_common import fail as _fail
from diffuseg.cli_common import load_config as _load_config
from diffuseg.cli_common import setup_logging as _setup_logging

app = typer.Typer(
    help="diffuseg: semantic segmentation with diffusion models (DiffSeg, DDPM-Segmentation, ZS3D, "
    "Seg-diffusion, ESDA) — datasets, training, segmentation and evaluation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Create and convert datasets (mmsegmentation layout).", no_args_is_help=True)
train_app = typer.Typer(help="Train models (resumable, time-boxed, Accelerate-ready).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")

logger = logging.getLogger("diffuseg")

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Config override, dotted: --set unet.train.lr=3e-4 (repeatable)."),
]


# ------------------------------------------------------------------------------------------- data
@data_app.command("fashion-scenes")
def data_fashion_scenes(
    out: Annotated[Path, typer.Option(help="Output dataset folder.")],
    num_train: Annotated[int, typer.Option(help="Number of training scenes.")] = 2000,
    num_val: Annotated[int, typer.Option(help="Number of validation scenes.")] = 500,
    seed: Annotated[int, typer.Option(help="Random seed (output is byte-identical per seed).")] = 0,
    size: Annotated[int, typer.Option(help="Scene side in pixels.")] = 64,
    fashion_mnist: Annotated[
        Path | None, typer.Option(help="Folder with the Fashion-MNIST idx .gz files (default: Debian path).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing dataset folder.")] = False,
    quiet: Quiet = False,
) -> None:
    """Generate the FashionScenes benchmark (Fashion-MNIST items on real photos, exact masks)."""
    _setup_logging(quiet)
    from diffuseg.data.fashion_scenes import generate_fashion_scenes

    try:
        path = generate_fashion_scenes(
            out,
            num_train=num_train,
            num_val=num_val,
            seed=seed,
            size=size,
            fashion_mnist=str(fashion_mnist) if fashion_mnist else None,
            progress=not quiet,
            overwrite=overwrite,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"wrote {path}")


@data_app.command("convert")
def data_convert(
    name: Annotated[
        str,
        typer.Argument(
            help="voc2012 | cityscapes | cityscapes-27 | coco-stuff-27 | ade20k | pascal-context-59"
        ),
    ],
    src: Annotated[Path, typer.Option(help="The dataset as downloaded (official layout).")],
    out: Annotated[Path, typer.Option(help="Output folder in diffuseg's layout.")],
    link: Annotated[str, typer.Option(help="How images are placed: symlink | hardlink | copy.")] = "symlink",
    split_list: Annotated[
        list[str] | None, typer.Option(help="Restrict a split to listed ids: SPLIT=FILE (repeatable).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    quiet: Quiet = False,
) -> None:
    """Convert an official dataset download to diffuseg's layout (img_dir/ann_dir/meta.json)."""
    _setup_logging(quiet)
    from diffuseg.data.converters import convert_dataset

    lists = {}
    for item in split_list or []:
        if "=" not in item:
            _fail(f"--split-list expects SPLIT=FILE, got {item!r}")
        split, path = item.split("=", 1)
        lists[split] = path
    try:
        path = convert_dataset(
            name, src, out, progress=not quiet, link=link, split_lists=lists or None, overwrite=overwrite
        )
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        _fail(str(e))
    typer.echo(f"wrote {path}")


# ------------------------------------------------------------------------------------------ train
@train_app.command("vae")
def train_vae(
    data: Annotated[Path, typer.Option(help="Dataset folder (img_dir/train, img_dir/val).")],
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints, logs, and the exported vae/.")],
    config: Annotated[Path, typer.Option(help="Training recipe (YAML).")] = Path("configs/mini-sd.yaml"),
    max_minutes: Annotated[
        float | None, typer.Option(help="Stop (resumably) after this many minutes.")
    ] = None,
    set_: SetOpt = None,
    quiet: Quiet = False,
) -> None:
    """Stage 1 of the mini-SD: train the VAE (resumes from the latest checkpoint in OUT)."""
    _setup_logging(quiet)
    from diffuseg.train.latent_diffusion import train_vae as run

    result = run(data, out, _load_config(config, set_), max_minutes=max_minutes, progress=not quiet)
    typer.echo(f"step {result.step}, finished={result.finished}, last loss {result.last_loss}")


@train_app.command("mini-sd")
def train_mini_sd(
    data: Annotated[Path, typer.Option(help="Dataset folder with captions/ (FashionScenes).")],
    vae: Annotated[Path, typer.Option(help="Folder holding the trained vae/ (output of `train vae`).")],
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints, logs, latent cache, exported model.")],
    config: Annotated[Path, typer.Option(help="Training recipe (YAML).")] = Path("configs/mini-sd.yaml"),
    max_minutes: Annotated[
        float | None, typer.Option(help="Stop (resumably) after this many minutes.")
    ] = None,
    export: Annotated[
        Path | None, typer.Option(help="Also export the current (EMA) weights as a backbone folder here.")
    ] = None,
    export_only: Annotated[
        bool, typer.Option(help="Only export the latest checkpoint to --export (e.g. while training runs).")
    ] = False,
    set_: SetOpt = None,
    quiet: Quiet = False,
) -> None:
    """Stage 2 of the mini-SD: train the text-conditioned UNet on cached latents."""
    _setup_logging(quiet)
    from diffuseg.train.latent_diffusion import train_unet as run

    result = run(
        data,
        vae,
        out,
        _load_config(config, set_),
        max_minutes=max_minutes,
        progress=not quiet,
        export=export,
        export_only=export_only,
    )
    if result is None:
        typer.echo(f"exported the latest checkpoint of {out} to {export}")
    else:
        typer.echo(f"step {result.step}, finished={result.finished}, last loss {result.last_loss}")


@train_app.command("pack")
def train_pack(
    run: Annotated[Path, typer.Argument(help="Run folder of an unfinished training (with checkpoints/).")],
    out: Annotated[Path, typer.Option(help="Where to write the carry pack (e.g. training-state/NAME).")],
    checkpoint: Annotated[
        Path | None, typer.Option(help="A checkpoint folder of RUN (default: the latest).")
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Write a run's latest checkpoint as a compact pack (fp16 weights, bf16 Adam moments) to commit.

    Machines are not kept between sessions: commit the pack, and on the next machine `train unpack`
    it and rerun the same training command to continue.
    """
    _setup_logging(quiet)
    from diffuseg.train.carry import pack_run

    try:
        path = pack_run(run, out, checkpoint)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    typer.echo(f"packed {run} into {path} ({size / 2**20:.1f} MiB)")


@train_app.command("unpack")
def train_unpack(
    pack: Annotated[Path, typer.Argument(help="A carry pack written by `diffuseg train pack`.")],
    out: Annotated[Path, typer.Option(help="Run folder to lay it out in (then rerun the training command).")],
    overwrite: Annotated[
        bool, typer.Option(help="Replace a run folder whose own checkpoint is as new or newer.")
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Lay a carry pack out as a run folder, so that the training command resumes from it."""
    _setup_logging(quiet)
    from diffuseg.train.carry import unpack_run

    try:
        ckpt = unpack_run(pack, out, overwrite=overwrite)
    except (FileNotFoundError, FileExistsError) as e:
        _fail(str(e))
    typer.echo(f"unpacked {pack} into {ckpt}; rerun the training command with --out {out} to continue")


# --------------------------------------------------------------------------------------- generate
@app.command()
def generate(
    prompt: Annotated[list[str], typer.Option(help="Text prompt (repeatable: one image each).")],
    out: Annotated[Path, typer.Option(help="Output PNG (a grid when several prompts/samples).")],
    backbone: Annotated[
        str | None, typer.Option(help="Model folder or hub id (default: shipped mini-SD).")
    ] = None,
    steps: Annotated[int, typer.Option(help="DDIM steps.")] = 50,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 3.0,
    num_samples: Annotated[int, typer.Option(help="Samples per prompt.")] = 1,
    seed: Annotated[int, typer.Option()] = 0,
    quiet: Quiet = False,
) -> None:
    """Sample images from a latent diffusion backbone."""
    _setup_logging(quiet)
    import numpy as np
    import torch

    from diffuseg.backbones.latent import LatentDiffusionBackbone
    from diffuseg.io import write_image
    from diffuseg.viz import image_grid

    try:
        model = LatentDiffusionBackbone.from_pretrained(backbone)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    prompts = [p for p in prompt for _ in range(num_samples)]
    g = torch.Generator().manual_seed(seed)
    imgs = model.generate(
        prompts, num_inference_steps=steps, guidance_scale=guidance, generator=g, progress=not quiet
    )
    arr = ((imgs.permute(0, 2, 3, 1).float().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    write_image(out, arr[0] if len(arr) == 1 else image_grid(list(arr), nrow=num_samples))
    typer.echo(f"wrote {out}")


# ----------------------------------------------------------------------------------------- segment
def _floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        _fail(f"expected comma-separated numbers, got {text!r}")
    return None


def _method_kwargs(method: str, kl_threshold: str | None, threshold_mode: str | None) -> dict:
    if method != "diffseg":
        if kl_threshold is not None or threshold_mode is not None:
            _fail("--kl-threshold/--threshold-mode only apply to --method diffseg")
        return {}
    return {"kl_threshold": _floats(kl_threshold), "threshold_mode": threshold_mode}


def _load(method: str, checkpoint: str | None, backbone: str | None, call_kwargs: dict):
    """Load a pipeline: DiffSeg's checkpoint *is* a backbone; other methods may take one beside theirs."""
    import inspect

    from diffuseg.methods import load_pipeline, pipeline_class

    kwargs = {k: v for k, v in call_kwargs.items() if v is not None}
    try:
        cls = pipeline_class(method)
    except ValueError as e:
        _fail(str(e))
    if method == "diffseg":
        source = checkpoint or backbone
    else:
        source = checkpoint
        if backbone is not None:
            if "backbone" not in inspect.signature(cls.from_pretrained).parameters:
                _fail(f"--backbone does not apply to --method {method}; its checkpoint names its own model")
            kwargs["backbone"] = backbone
    try:
        return load_pipeline(method, source, **kwargs)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))


Method = Annotated[str, typer.Option(help="A method: diffseg | ddpm-seg | zs3d | seg-diffusion | esda.")]
Checkpoint = Annotated[
    str | None, typer.Option(help="Method checkpoint folder or hub id (default: shipped).")
]
Backbone = Annotated[
    str | None, typer.Option(help="Latent diffusion backbone folder or hub id (SD 1.x/2.x).")
]
KLOpt = Annotated[str | None, typer.Option(help="DiffSeg merging thresholds, one per iteration: 1.1,1.1,1.1")]
ModeOpt = Annotated[str | None, typer.Option(help="DiffSeg threshold mode: absolute | relative (quantiles).")]


@app.command()
def segment(
    inputs: Annotated[Path, typer.Argument(help="An image file or a folder of images.")],
    out: Annotated[Path, typer.Option(help="Output folder: <stem>.png (ids) and <stem>_overlay.png.")],
    method: Method = "diffseg",
    classes: Annotated[
        str | None, typer.Option(help="Class names, comma-separated: 'background,bag,sandal'.")
    ] = None,
    checkpoint: Checkpoint = None,
    backbone: Backbone = None,
    kl_threshold: KLOpt = None,
    threshold_mode: ModeOpt = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 8,
    quiet: Quiet = False,
) -> None:
    """Segment images; unreadable files are reported and skipped."""
    _setup_logging(quiet)
    from diffuseg.methods.base import parse_classes, segment_files

    pipe = _load(method, checkpoint, backbone, _method_kwargs(method, kl_threshold, threshold_mode))
    try:
        names = parse_classes(classes)
        kwargs = {"class_names": names} if names else {}
        written = segment_files(pipe, inputs, out, batch_size=batch_size, progress=not quiet, **kwargs)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"wrote {len(written)} label maps to {out}")


@app.command()
def evaluate(
    data: Annotated[Path, typer.Option(help="Dataset folder (img_dir, ann_dir, meta.json).")],
    method: Method = "diffseg",
    split: Annotated[str, typer.Option()] = "val",
    checkpoint: Checkpoint = None,
    backbone: Backbone = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report JSON here.")] = None,
    matching: Annotated[
        str, typer.Option(help="Unsupervised: per_image (DiffSeg) | dataset (STEGO).")
    ] = "per_image",
    semantic: Annotated[
        bool, typer.Option(help="DiffSeg: name segments with the dataset's class names (supervised scoring).")
    ] = False,
    limit: Annotated[int | None, typer.Option(help="Evaluate the first N images only.")] = None,
    batch_size: Annotated[int, typer.Option()] = 16,
    kl_threshold: KLOpt = None,
    threshold_mode: ModeOpt = None,
    unseen: Annotated[
        str | None,
        typer.Option(help="Comma-separated unseen classes for seen/unseen/hIoU (default: meta.json's)."),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Run a method on a dataset split and score it (mIoU, aAcc, mAcc; seen/unseen/hIoU; Hungarian)."""
    _setup_logging(quiet)
    from diffuseg.eval.runner import format_report
    from diffuseg.methods.evaluate import evaluate_pipeline

    pipe = _load(method, checkpoint, backbone, _method_kwargs(method, kl_threshold, threshold_mode))
    try:
        report = evaluate_pipeline(
            pipe,
            method,
            data,
            split=split,
            matching=matching,
            semantic=semantic,
            limit=limit,
            batch_size=batch_size,
            json_out=json_out,
            progress=not quiet,
            unseen=None if unseen is None else [c.strip() for c in unseen.split(",") if c.strip()],
        )
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    typer.echo(format_report(report))


# ---------------------------------------------------------------------------------------- evaluate
@app.command("evaluate-predictions")
def evaluate_predictions(
    pred_dir: Annotated[Path, typer.Option(help="Folder of predicted label PNGs named <id>.png.")],
    data: Annotated[Path, typer.Option(help="Dataset folder (ann_dir/<split>, meta.json).")],
    split: Annotated[str, typer.Option()] = "val",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report JSON here.")] = None,
    unsupervised: Annotated[
        bool, typer.Option(help="Predictions are segment ids: Hungarian matching.")
    ] = False,
    matching: Annotated[str, typer.Option(help="per_image (DiffSeg) | dataset (STEGO).")] = "per_image",
    quiet: Quiet = False,
) -> None:
    """Score saved label maps against a dataset split (mIoU, aAcc, mAcc, seen/unseen/hIoU)."""
    _setup_logging(quiet)
    from diffuseg.eval.runner import evaluate_predictions as run
    from diffuseg.eval.runner import format_report

    try:
        report = run(
            pred_dir, data, split=split, unsupervised=unsupervised, matching=matching, json_out=json_out
        )
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    typer.echo(format_report(report))


@app.command()
def info() -> None:
    """Show versions, the registered methods and the shipped checkpoints (and where they are looked for)."""
    import os
    from importlib.metadata import PackageNotFoundError, version

    import diffuseg
    from diffuseg.methods import METHODS

    versions = {}
    for pkg in ("torch", "diffusers", "transformers", "accelerate"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    root = Path(
        os.environ.get("DIFFUSEG_CHECKPOINTS") or Path(diffuseg.__file__).resolve().parents[2] / "checkpoints"
    )
    shipped = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    report = {
        "diffuseg": diffuseg.__version__,
        **versions,
        "methods": sorted(METHODS),
        "checkpoints_dir": str(root),
        "shipped_checkpoints": shipped,
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
    }
    typer.echo(json.dumps(report, indent=2))


@app.command()
def demo(
    checkpoint: Annotated[
        list[str] | None,
        typer.Option(
            help="METHOD=FOLDER_OR_HUB_ID (repeatable); DiffSeg takes a backbone: diffseg=/models/sd-v1-4."
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to serve on (127.0.0.1: this machine only).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 7860,
    share: Annotated[bool, typer.Option(help="Ask gradio for a public share link (needs internet).")] = False,
    quiet: Quiet = False,
) -> None:
    """A browser demo: every method whose checkpoint ships, plus those given with --checkpoint."""
    _setup_logging(quiet)
    from diffuseg.demo import DemoSession, available_methods, launch

    given: dict[str, str | None] = {}
    for item in checkpoint or []:
        method, sep, source = item.partition("=")
        if not sep or not method.strip() or not source.strip():
            _fail(f"--checkpoint takes METHOD=FOLDER, got {item!r}")
        given[method.strip()] = source.strip()
    try:
        session = DemoSession(available_methods(given))
    except ValueError as e:
        _fail(str(e))
    try:
        launch(session, host=host, port=port, share=share)
    except ImportError as e:
        _fail(str(e))


def _register_extensions() -> None:
    from diffuseg.cli_ext import register_all

    register_all(app, train_app)


_register_extensions()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
