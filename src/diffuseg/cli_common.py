"""Option types and helpers shared by ``diffuseg.cli`` and the per-method ``diffuseg.cli_ext`` modules.

Kept free of heavy imports: it is imported by ``diffuseg --help``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["Quiet", "SetOpt", "Threads", "fail", "load_config", "set_threads", "setup_logging"]

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; warnings only.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Config override, dotted: --set train.lr=3e-4 (repeatable).")
]
Threads = Annotated[
    int | None,
    typer.Option(help="torch CPU threads (default: torch's choice; use 1 on a shared machine)."),
]


def setup_logging(quiet: bool) -> None:
    """INFO logs (and progress bars) by default; warnings only with ``--quiet``.

    ``--quiet`` also silences the weight-loading bars of transformers / diffusers / huggingface_hub,
    which print on their own switch, not through ``logging``.
    """
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        for module in ("transformers.utils.logging", "diffusers.utils.logging"):
            with contextlib.suppress(ImportError):  # an optional dependency missing: nothing to silence
                importlib.import_module(module).disable_progress_bar()


def fail(msg: str) -> None:
    """Print an actionable error and exit with status 2 (no traceback)."""
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads: on a busy machine extra threads spin and slow everything down."""
    if threads is None:
        return
    if threads < 1:
        fail(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def load_config(path: Path, overrides: list[str] | None) -> dict[str, Any]:
    """A YAML recipe with dotted ``--set`` overrides; a missing file is a clear error.

    A relative path that does not exist here is looked up in the repository (so the default
    ``configs/<method>.yaml`` works from any working directory of an editable install).
    """
    from diffuseg.train.loop import load_yaml_config

    path = Path(path)
    if not path.is_file() and not path.is_absolute():
        in_repo = Path(__file__).resolve().parents[2] / path
        path = in_repo if in_repo.is_file() else path
    if not path.is_file():
        fail(f"{path}: no such config file (run from the repository root or pass --config)")
    return load_yaml_config(path, overrides or [])
