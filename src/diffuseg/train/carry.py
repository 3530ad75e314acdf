"""Carrying an unfinished training run from one machine to the next, inside the repository.

The machines this project trains on are not kept between sessions: a run folder under ``/work/runs``
may be gone tomorrow, and a run's full checkpoint (fp32 weights, fp32 EMA, two fp32 Adam moments)
is four times the model, too big to commit at every chunk. :func:`pack_run` writes the latest
checkpoint of a run as a compact **carry pack** that is committed beside the code; :func:`unpack_run`
lays it back out as a normal run folder, and the trainer's ordinary resume takes it from there.

What a pack keeps, and how (about 2 bytes per number instead of 4 … 16):

* ``model.safetensors`` (the trained weights) and ``ema.safetensors``: float16. Rounding them once per
  hand-over moves each weight by at most 2⁻¹¹ of itself, far below one optimizer step's change;
* the optimizer's moment buffers (``exp_avg``, ``exp_avg_sq``, …): bfloat16, whose exponent range keeps
  the tiny second moments that float16 would flush to zero. The ``step`` counters stay exact;
  ``torch.optim.Optimizer.load_state_dict`` casts the moments back to the parameters' float32;
* everything else as it is: RNG states, ``trainer_state.json``, the run's ``log.jsonl`` and
  ``train_config.yaml`` and small side files (probe results, calibration json).

A resumed carried run is therefore *not* bit-identical to an uninterrupted one (a plain resume on the
same machine is); it continues from the same step, data position and schedule with weights equal up to
that rounding. Large, re-creatable side folders (latent caches) are left out.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffuseg.io import replace_folder
from diffuseg.train.loop import CHECKPOINT_DIR, CONFIG_FILE, EMA_FILE, LOG_FILE, STATE_FILE, latest_checkpoint

__all__ = ["PACK_FILE", "pack_run", "unpack_run"]

logger = logging.getLogger(__name__)

PACK_FILE = "carry.json"
_WEIGHT_FILES = ("model.safetensors", EMA_FILE)
_OPTIMIZER_PREFIX = "optimizer"
_EXACT_STATE_KEYS = frozenset({"step"})
_SIDE_FILE_LIMIT = 1 << 20  # top-level files of the run folder up to 1 MiB travel with the pack


def pack_run(run_dir: str | Path, dest: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Write ``run_dir``'s latest (or the given) checkpoint as a compact pack in ``dest``.

    ``dest`` is replaced atomically (temp folder + rename), so an interrupted pack leaves the previous
    one intact. Returns ``dest``.
    """
    run, out = Path(run_dir), Path(dest)
    ckpt = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run)
    if ckpt is None or not (ckpt / STATE_FILE).is_file():
        raise FileNotFoundError(f"{run}: no complete checkpoint to pack (looked in {run / CHECKPOINT_DIR})")
    tmp = out.parent / f".tmp_{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    target = tmp / CHECKPOINT_DIR / ckpt.name
    target.mkdir(parents=True)
    for src in sorted(ckpt.iterdir()):
        if src.is_dir():
            shutil.copytree(src, target / src.name)
        elif src.name in _WEIGHT_FILES:
            _save_half(src, target / src.name)
        elif src.name.startswith(_OPTIMIZER_PREFIX) and src.suffix == ".bin":
            _save_optimizer_bf16(src, target / src.name)
        else:
            shutil.copy2(src, target / src.name)
    for side in sorted(run.iterdir()):
        if side.name.startswith("."):  # the run's .train.lock
            continue
        if side.is_file() and (
            side.name in (LOG_FILE, CONFIG_FILE) or side.stat().st_size <= _SIDE_FILE_LIMIT
        ):
            shutil.copy2(side, tmp / side.name)
    step = json.loads((ckpt / STATE_FILE).read_text())["step"]
    (tmp / PACK_FILE).write_text(
        json.dumps({"checkpoint": ckpt.name, "step": step, "source": str(run)}, indent=1) + "\n"
    )
    replace_folder(tmp, out)
    logger.info("packed %s (step %d) into %s", ckpt, step, out)
    return out


def unpack_run(pack: str | Path, run_dir: str | Path, overwrite: bool = False) -> Path:
    """Lay a pack out as the run folder ``run_dir`` so that the trainer resumes from it.

    Refuses to replace a run folder whose own latest checkpoint is as new as the pack or newer (that
    work would be lost) unless ``overwrite``. Returns the unpacked checkpoint folder.
    """
    src, run = Path(pack), Path(run_dir)
    meta_file = src / PACK_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{src} is not a carry pack (no {PACK_FILE}); make one with `diffuseg train pack`"
        )
    meta = json.loads(meta_file.read_text())
    existing = latest_checkpoint(run)
    if existing is not None and not overwrite:
        have = json.loads((existing / STATE_FILE).read_text())["step"]
        if have >= meta["step"]:
            raise FileExistsError(
                f"{run} already has checkpoint {existing.name} (step {have}), not older than the pack "
                f"(step {meta['step']}): "
                "resume it directly, or pass overwrite=True / --overwrite to replace it with the pack."
            )
    run.mkdir(parents=True, exist_ok=True)
    for side in sorted(src.iterdir()):
        if side.is_file() and side.name != PACK_FILE:
            shutil.copy2(side, run / side.name)
    ckpt_root = run / CHECKPOINT_DIR
    ckpt_root.mkdir(exist_ok=True)
    final, tmp = ckpt_root / meta["checkpoint"], ckpt_root / f".tmp_{meta['checkpoint']}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src / CHECKPOINT_DIR / meta["checkpoint"], tmp)
    if overwrite:
        for old in ckpt_root.iterdir():
            if old.is_dir() and old.name.startswith("step_") and old.name != final.name:
                shutil.rmtree(old)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    logger.info("unpacked %s (step %d) into %s", src, meta["step"], run)
    return final


def _save_half(src: Path, dst: Path) -> None:
    """Floating tensors to float16 (keeping the file's metadata, e.g. the EMA update count)."""
    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
    tensors = {
        k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous()
        for k, v in load_file(str(src)).items()
    }
    save_file(tensors, str(dst), metadata=metadata)


def _save_optimizer_bf16(src: Path, dst: Path) -> None:
    state = torch.load(src, map_location="cpu", weights_only=False)
    for per_param in state.get("state", {}).values():
        for key, value in per_param.items():
            if key not in _EXACT_STATE_KEYS and torch.is_tensor(value) and value.is_floating_point():
                per_param[key] = value.to(torch.bfloat16)
    torch.save(state, dst)
