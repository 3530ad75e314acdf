"""The one training loop all diffuseg trainers reuse (VAE, mini-SD, DDPM-seg, ZS3D, Seg-diffusion, ESDA).

A trainer supplies a :class:`TrainTask` (model, dataset, loss, optional evaluate/export); :func:`train`
does the rest on Hugging Face Accelerate, so the same code runs as one CPU process and under
``accelerate launch --num_processes N`` (DDP). On CPUs, several processes need
``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N`` (DDP over gloo): plain
``accelerate launch --cpu --num_processes N`` starts a single process unless it goes through mpirun.

Reproducibility is the design constraint: a run that is stopped (time box, SIGINT/SIGTERM, crash after
a checkpoint) and resumed ends with the same parameters as an uninterrupted run. That holds because
everything random is a pure function of saved state:

* data order: a permutation seeded by ``(seed, epoch)``, sharded across processes; a checkpoint only
  stores how many samples were consumed (no sampler object to pickle);
* loss noise: ``task.loss`` gets a generator seeded by ``(seed, micro_step, process_index)``;
* global RNG (dropout), model, optimizer: ``accelerator.save_state``; EMA: ``ema.safetensors``;
* learning rate: a function of the step (:func:`lr_factor`), so there is no scheduler state at all.

Resume needs the same number of processes and batch size to reproduce exactly; with a different
geometry it continues from the equivalent sample position and warns.

Output directory::

    output_dir/train_config.yaml                 resolved TrainConfig
    output_dir/log.jsonl                         {"kind": "train"|"eval"|"session", "step", ...} per line
    output_dir/checkpoints/step_000500/          accelerator state + ema.safetensors + trainer_state.json
    output_dir/final/                            task.save_pretrained(EMA weights) when finished
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import time
import typing
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import send_to_device, set_seed
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from diffuseg.io import replace_folder
from diffuseg.train.ema import EMA

__all__ = [
    "RunInUseError",
    "TrainConfig",
    "TrainResult",
    "TrainTask",
    "latest_checkpoint",
    "load_yaml_config",
    "lr_factor",
    "train",
]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
EXPORT_DIR = "final"
LOG_FILE = "log.jsonl"
CONFIG_FILE = "train_config.yaml"
LOCK_FILE = ".train.lock"


class RunInUseError(ValueError):
    """Another process is training into the same output folder."""


STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
LR_SCHEDULES = ("constant", "cosine")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
_CHECKPOINT_RE = re.compile(r"^step_(\d+)$")


# --------------------------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Everything the loop needs; trainers keep model/data settings in their own config section."""

    output_dir: str
    max_steps: int  # optimizer steps (each = grad_accum micro-batches per process)
    max_minutes: float | None = None  # time box for this call: checkpoint and return finished=False
    batch_size: int = 32  # per process and micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up, then lr_schedule
    lr_schedule: str = "constant"  # "constant" | "cosine" (to 0 at max_steps)
    max_grad_norm: float | None = 1.0
    ema_decay: float | None = None  # EMA of trainable params (CPU fp32); used for evaluate and export
    ema_warmup: bool = True  # effective decay min(ema_decay, (1+n)/(10+n))
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 50
    eval_every: int | None = None
    num_workers: int = 0
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    progress: bool = True  # tqdm bar on the main process
    resume: bool = True  # continue from the latest checkpoint in output_dir

    def __post_init__(self) -> None:
        checks = [
            (bool(str(self.output_dir)), "output_dir must be a non-empty path"),
            (self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.max_minutes is None or self.max_minutes > 0, "max_minutes must be > 0 or None (no limit)"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (
                self.lr_schedule in LR_SCHEDULES,
                f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}",
            ),
            (
                self.max_grad_norm is None or self.max_grad_norm > 0,
                "max_grad_norm must be > 0 or None (no clip)",
            ),
            (
                self.ema_decay is None or 0 < self.ema_decay < 1,
                "ema_decay must be in (0, 1) or None (no EMA)",
            ),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (
                self.eval_every is None or self.eval_every >= 1,
                "eval_every must be >= 1 or None (no evaluation)",
            ),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (
                self.mixed_precision in MIXED_PRECISIONS,
                f"mixed_precision must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}",
            ),
        ]
        errors = [message for ok, message in checks if not ok]
        if errors:
            raise ValueError("Invalid TrainConfig: " + "; ".join(errors) + ".")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a YAML/CLI mapping; strings such as ``"1e-4"`` or ``"null"`` are converted."""
        hints = typing.get_type_hints(cls)
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"Unknown TrainConfig keys {unknown}; valid keys are {names}.")
        return cls(**{key: _coerce(key, value, hints[key]) for key, value in values.items()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert ``value`` to the field type ``hint`` (``T`` or ``T | None``) or raise a ValueError."""
    options = typing.get_args(hint) or (hint,)
    kind = next(t for t in options if t is not type(None))
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
        if type(None) in options:
            return None
        raise ValueError(f"TrainConfig.{name} may not be null; give a {kind.__name__}.")
    try:
        if kind is bool:
            return _to_bool(value)
        if isinstance(value, bool):
            raise TypeError("booleans are not numbers")
        if kind is int:
            number = float(value)
            if not number.is_integer():
                raise ValueError(f"{value!r} is not an integer")
            return int(number)
        return kind(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"TrainConfig.{name}={value!r} is not a valid {kind.__name__}: {err}.") from err


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"{value!r} is not a boolean (use true/false)")


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 would make it a string)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def load_yaml_config(
    path: str | Path, overrides: Mapping[str, Any] | Sequence[str] | None = None
) -> dict[str, Any]:
    """Read a ``configs/*.yaml`` file and apply dotted overrides.

    ``overrides`` is ``{"train.lr": 1e-3}`` or CLI-style ``["train.lr=1e-3", "model.width=64"]``;
    string values are parsed as YAML (``1e-3`` -> float, ``null`` -> None, ``[1, 2]`` -> list).
    """
    config = yaml.load(Path(path).read_text(), Loader=_YamlLoader) or {}
    if not isinstance(config, dict):
        raise ValueError(
            f"{path}: a config file must hold a mapping at the top level, got {type(config).__name__}."
        )
    for key, value in _parse_overrides(overrides).items():
        _set_dotted(config, key, value)
    return config


def _parse_overrides(overrides: Mapping[str, Any] | Sequence[str] | None) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            key, sep, value = str(item).partition("=")
            if not sep or not key.strip():
                raise ValueError(f"Override {item!r} must look like 'section.key=value'.")
            items.append((key.strip(), value))
    return {key: yaml.load(v, Loader=_YamlLoader) if isinstance(v, str) else v for key, v in items}


def _set_dotted(config: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parents[: i + 1])
            raise ValueError(f"Cannot set {dotted!r}: {where!r} is a {type(child).__name__}, not a section.")
        node = child
    node[leaf] = value


# ------------------------------------------------------------------------------------------ interface


class TrainTask(Protocol):
    """What a trainer supplies to :func:`train`.

    Required: ``model``, ``train_dataset``, ``loss``. Optional (looked up with ``getattr``):

    * ``evaluate(model, step) -> dict[str, float]`` every ``eval_every`` steps and at the end, on the
      main process, with EMA weights swapped in, in eval mode and under ``torch.no_grad``;
    * ``save_pretrained(model, out_dir: Path) -> None`` once training finished, main process only,
      EMA weights swapped in (e.g. a diffusers folder);
    * ``collate_fn(samples) -> batch`` for the DataLoader (default: torch's default collate).
    """

    def model(self) -> nn.Module:
        """The module to train (called once per :func:`train`, after seeding).

        Only parameters with ``requires_grad`` are optimised and averaged by the EMA. The loop never calls
        ``.train()``: return the module in the mode it should train in (frozen BatchNorm encoders in eval).
        """
        ...

    def train_dataset(self) -> Dataset:
        """A map-style dataset; the loop builds the seeded, sharded, endless DataLoader."""
        ...

    def loss(
        self, model: nn.Module, batch: Any, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss of one micro-batch (already on the device) and extra values to log.

        ``model`` may be DDP-wrapped: call it (its ``forward``) so gradients are synchronised.
        ``generator`` is a CPU generator seeded from ``(seed, micro_step, process_index)``: draw all
        training noise from it (then move it to the device) and resume reproduces the run.
        The extra keys must be the same on every process.
        """
        ...


@dataclass
class TrainResult:
    step: int  # optimizer steps done in total (across resumes)
    finished: bool  # reached max_steps (False: stopped by the time box or a signal; call again to resume)
    output_dir: Path
    last_loss: float | None  # mean loss of the last logged window (averaged over processes)
    elapsed_s: float  # wall seconds of this call
    checkpoint: Path | None = None  # the latest checkpoint
    export_dir: Path | None = None  # where save_pretrained wrote (when finished and the task has one)


@dataclass
class _TrainerState:
    """The loop's own part of a checkpoint (trainer_state.json)."""

    step: int = 0
    samples_seen: int = 0  # over all processes; the data position to resume from
    train_seconds: float = 0.0  # cumulated over resumes
    num_processes: int = 1
    batch_size: int = 0


# --------------------------------------------------------------------------------------------- train


def train(
    task: TrainTask,
    config: TrainConfig,
    accelerator: Accelerator | None = None,
    resume_from: str | Path | None = None,
) -> TrainResult:
    """Train ``task`` for ``config.max_steps`` optimizer steps, resuming from the latest checkpoint.

    Pass ``accelerator`` to control Accelerate (kwargs handlers, logging); its gradient accumulation is
    set to ``config.grad_accum``, and :meth:`Accelerator.free_memory` is called on return so the same
    accelerator can run the next training. ``resume_from`` picks a checkpoint folder explicitly.
    """
    started = time.monotonic()
    out = Path(config.output_dir)
    acc = _accelerator(accelerator, config)
    with _run_lock(out, acc.is_main_process):
        return _train(task, config, acc, resume_from, started)


@contextmanager
def _run_lock(out: Path, enabled: bool) -> Iterator[None]:
    """Hold ``out/.train.lock`` while training: refuse a second training into the same folder.

    Two trainings in one folder would resume from the same checkpoint and overwrite each other's
    checkpoints and log, silently. The lock is advisory (``flock``), released when the process ends
    however it ends, so a crash never leaves a stale lock. No check where ``fcntl`` is missing (Windows).
    """
    try:
        import fcntl
    except ImportError:
        enabled = False
    if not enabled:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise RunInUseError(
                f"{out} is being trained by {holder}: wait for it to stop (or stop it with SIGTERM, which "
                "checkpoints), or train into another --out folder"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _train(
    task: TrainTask, config: TrainConfig, acc: Accelerator, resume_from: str | Path | None, started: float
) -> TrainResult:
    out = Path(config.output_dir)
    resume_path = _checkpoint_to_resume(out, config, resume_from)
    main = acc.is_main_process

    set_seed(config.seed)  # identical initialisation on every process
    module = task.model()
    model, optimizer = acc.prepare(module, _make_optimizer(module, config))
    set_seed(config.seed, device_specific=True)  # different dropout masks per process
    params = [p for p in model.parameters() if p.requires_grad]

    state = _TrainerState(num_processes=acc.num_processes, batch_size=config.batch_size)
    if resume_path is not None:
        state = _load_checkpoint(acc, resume_path)
    ema = _make_ema(acc, model, config, resume_path)
    if main:
        changed = _prepare_output_dir(out, config, state.step)
        _log_session(out, state, acc.num_processes, changed)
    acc.wait_for_everyone()

    micro_step = _data_position(state, config, acc)
    batches = _batches(task, config, acc, micro_step)
    window = _LogWindow()
    last_loss: float | None = None
    lr = config.lr
    saved_at = state.step if resume_path is not None else None
    last_checkpoint = resume_path
    deadline = started + 60.0 * config.max_minutes if config.max_minutes else math.inf
    bar = tqdm(
        total=config.max_steps, initial=state.step, disable=not (main and config.progress), desc="train"
    )
    if main:
        logger.info(
            "training %s: step %d -> %d, %d process(es)", out, state.step, config.max_steps, acc.num_processes
        )

    stop = _StopRequest()
    seconds_before, loop_started = state.train_seconds, time.monotonic()
    with stop.installed():
        while state.step < config.max_steps:
            lr = config.lr * lr_factor(state.step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, extras = _optimizer_step(task, acc, model, optimizer, params, batches, config, micro_step)
            micro_step += config.grad_accum
            state.step += 1
            state.samples_seen += config.grad_accum * config.batch_size * acc.num_processes
            state.train_seconds = seconds_before + time.monotonic() - loop_started
            if ema is not None:
                ema.update(acc.unwrap_model(model))
            window.add(loss, extras)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

            if state.step % config.log_every == 0:
                last_loss = _write_train_log(acc, out, window, state, lr)
            if config.eval_every and state.step % config.eval_every == 0:
                _evaluate(task, acc, model, ema, out, state)
            if state.step % config.checkpoint_every == 0:
                last_checkpoint, saved_at = _save_checkpoint(acc, out, state, ema, config), state.step
            reason = _stop_reason(acc, stop, deadline) if state.step < config.max_steps else None
            if reason is not None:
                logger.info("stopping at step %d (%s); call train again to resume", state.step, reason)
                break
    bar.close()

    if window.count:
        last_loss = _write_train_log(acc, out, window, state, lr)
    if saved_at != state.step:
        last_checkpoint = _save_checkpoint(acc, out, state, ema, config)
    finished = state.step >= config.max_steps
    export_dir = _finish(task, acc, model, ema, out, state, config) if finished else None
    acc.free_memory()
    return TrainResult(
        step=state.step,
        finished=finished,
        output_dir=out,
        last_loss=last_loss,
        elapsed_s=time.monotonic() - started,
        checkpoint=last_checkpoint,
        export_dir=export_dir,
    )


def _accelerator(accelerator: Accelerator | None, config: TrainConfig) -> Accelerator:
    if accelerator is None:
        return Accelerator(
            mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum
        )
    if accelerator.mixed_precision != config.mixed_precision:
        logger.warning(
            "the Accelerator given uses mixed_precision=%r, not the config's %r: the Accelerator wins",
            accelerator.mixed_precision,
            config.mixed_precision,
        )
    accelerator.gradient_accumulation_steps = config.grad_accum
    return accelerator


def _optimizer_step(
    task: TrainTask,
    acc: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    batches: Iterator[Any],
    config: TrainConfig,
    micro_step: int,
) -> tuple[float, dict[str, float]]:
    """One optimizer step = ``grad_accum`` micro-batches; returns their mean loss and mean extras."""
    losses: list[float] = []
    extras: dict[str, float] = {}
    for i in range(config.grad_accum):
        batch = send_to_device(next(batches), acc.device)
        generator = _step_generator(config.seed, micro_step + i, acc.process_index)
        with acc.accumulate(model):
            loss, logs = task.loss(model, batch, generator)
            acc.backward(loss)
            if acc.sync_gradients and config.max_grad_norm is not None:
                extras["grad_norm"] = float(acc.clip_grad_norm_(params, config.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        for key, value in logs.items():
            extras[key] = extras.get(key, 0.0) + float(value) / config.grad_accum
    mean_loss = sum(losses) / len(losses)
    if not math.isfinite(mean_loss):
        raise FloatingPointError(
            f"loss is {mean_loss} at micro-step {micro_step}: lower lr, enable max_grad_norm or use "
            "mixed_precision='no'; the last checkpoint can be resumed."
        )
    return mean_loss, extras


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of ``config.lr`` for optimizer step ``step`` (0-based): linear warm-up, then schedule."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _make_optimizer(module: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("task.model() has no parameters with requires_grad=True: there is nothing to train.")
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _make_ema(
    acc: Accelerator, model: nn.Module, config: TrainConfig, resume_path: Path | None
) -> EMA | None:
    if config.ema_decay is None:
        return None
    ema = EMA(acc.unwrap_model(model), config.ema_decay, warmup=config.ema_warmup)
    if resume_path is not None:
        if (resume_path / EMA_FILE).is_file():
            ema.load(resume_path / EMA_FILE)
        else:
            logger.warning("%s holds no EMA weights: the EMA restarts from the resumed weights", resume_path)
    return ema


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (SeedSequence hashing: nearby inputs give unrelated streams)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _step_generator(seed: int, micro_step: int, process_index: int) -> torch.Generator:
    """CPU generator for one micro-batch's noise: same on every resume, different per process and step."""
    return torch.Generator().manual_seed(_mix(seed, micro_step, process_index))


# ----------------------------------------------------------------------------------------------- data


class _ShardedBatchSampler:
    """Endless stream of this process's index batches.

    Epoch ``e`` is a permutation seeded by ``(seed, e)``; each global batch of ``batch_size x
    num_processes`` indices is split between the processes, and the incomplete tail of an epoch is
    dropped so every process takes the same number of steps. Batch ``b`` is a pure function of ``b``, so
    resuming needs only the counter, and no batch is repeated or skipped across a resume.
    """

    def __init__(
        self, num_samples: int, batch_size: int, num_processes: int, rank: int, seed: int, start: int
    ) -> None:
        self.per_epoch = num_samples // (batch_size * num_processes)
        if self.per_epoch == 0:
            raise ValueError(
                f"The training set has {num_samples} samples, fewer than one global batch (batch_size "
                f"{batch_size} x {num_processes} process(es)): lower batch_size or use more data."
            )
        self.num_samples, self.batch_size, self.num_processes = num_samples, batch_size, num_processes
        self.rank, self.seed, self.start = rank, seed, start

    def __iter__(self) -> Iterator[list[int]]:
        batch, epoch_of_perm, perm = self.start, -1, np.empty(0, dtype=np.int64)
        while True:
            epoch, i = divmod(batch, self.per_epoch)
            if epoch != epoch_of_perm:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
                epoch_of_perm = epoch
            lo = (i * self.num_processes + self.rank) * self.batch_size
            yield perm[lo : lo + self.batch_size].tolist()
            batch += 1


def _data_position(state: _TrainerState, config: TrainConfig, acc: Accelerator) -> int:
    """Per-process micro-batch index at which the data stream (and the noise seeds) continue."""
    geometry = (acc.num_processes, config.batch_size)
    if state.samples_seen and (state.num_processes, state.batch_size) != geometry:
        logger.warning(
            "checkpoint was written with %d process(es) x batch %d, now %d x %d: training continues from "
            "the nearest sample position but will not reproduce an uninterrupted run",
            state.num_processes,
            state.batch_size,
            *geometry,
        )
    state.num_processes, state.batch_size = geometry
    return state.samples_seen // (config.batch_size * acc.num_processes)


def _batches(task: TrainTask, config: TrainConfig, acc: Accelerator, start: int) -> Iterator[Any]:
    dataset = task.train_dataset()
    num_samples = len(dataset)  # type: ignore[arg-type]
    rank, world = acc.process_index, acc.num_processes
    sampler = _ShardedBatchSampler(num_samples, config.batch_size, world, rank, config.seed, start)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,  # type: ignore[arg-type]
        num_workers=config.num_workers,
        collate_fn=getattr(task, "collate_fn", None),
        pin_memory=acc.device.type == "cuda",
        # An explicit generator keeps DataLoader from drawing its worker seed from the global RNG,
        # which would shift the dropout stream differently in a resumed run.
        generator=torch.Generator().manual_seed(_mix(config.seed, start, rank)),
    )
    return iter(loader)


# ------------------------------------------------------------------------------------ logging and eval


class _LogWindow:
    """Sums of the loss and extra values since the last log line."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, loss: float, extras: Mapping[str, float]) -> None:
        self.count += 1
        for key, value in {"loss": loss, **extras}.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def pop_means(self, acc: Accelerator) -> dict[str, float]:
        """Means over the window and over all processes (a collective: every process must call it)."""
        keys = sorted(self.sums)
        totals = torch.tensor(
            [self.sums[k] for k in keys] + [self.count], dtype=torch.float64, device=acc.device
        )
        if acc.num_processes > 1:
            totals = acc.reduce(totals, reduction="sum")
        self.sums, self.count = {}, 0
        return {key: (totals[i] / totals[-1]).item() for i, key in enumerate(keys)}


def _write_train_log(
    acc: Accelerator, out: Path, window: _LogWindow, state: _TrainerState, lr: float
) -> float:
    means = window.pop_means(acc)
    if acc.is_main_process:
        record = {"kind": "train", "step": state.step, "lr": lr, "time": round(state.train_seconds, 3)}
        _append_log(out, {**record, "samples": state.samples_seen, **means})
        logger.info("step %d  loss %.5g  lr %.3g", state.step, means["loss"], lr)
    return means["loss"]


def _log_session(out: Path, state: _TrainerState, num_processes: int, changed: dict[str, list[Any]]) -> None:
    """One ``session`` record per call of :func:`train`: the run's history, for its model card.

    A run trained in chunks over days (time boxes, recipe changes, other machines) is otherwise only
    described by its last command; these records keep every invocation, its start step and date,
    and the config keys that changed at that point (e.g. ``max_steps`` cut to fit a budget).
    """
    record = {
        "kind": "session",
        "step": state.step,
        "time": round(state.train_seconds, 3),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "",
        "processes": num_processes,
    }
    if changed:
        record["changed"] = changed
    _append_log(out, record)


def _append_log(out: Path, record: Mapping[str, Any]) -> None:
    with open(out / LOG_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _evaluate(
    task: TrainTask, acc: Accelerator, model: nn.Module, ema: EMA | None, out: Path, state: _TrainerState
) -> None:
    """``task.evaluate`` on the main process with EMA weights; the others wait for it."""
    evaluate = getattr(task, "evaluate", None)
    if evaluate is not None and acc.is_main_process:
        net = acc.unwrap_model(model)
        with _ema_weights(ema, net), _eval_mode(net), torch.no_grad():
            metrics = {key: _jsonable(value) for key, value in evaluate(net, state.step).items()}
        _append_log(
            out, {"kind": "eval", "step": state.step, "time": round(state.train_seconds, 3), **metrics}
        )
        logger.info("eval at step %d: %s", state.step, metrics)
    acc.wait_for_everyone()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor | np.generic):
        return value.item()
    return value if isinstance(value, str | int | float | bool | list | dict | None) else str(value)


def _ema_weights(ema: EMA | None, net: nn.Module) -> AbstractContextManager[nn.Module]:
    return ema.swapped_in(net) if ema is not None else nullcontext(net)


@contextmanager
def _eval_mode(net: nn.Module) -> Iterator[None]:
    """Put ``net`` in eval mode and give every submodule back its own mode afterwards.

    Restoring per module (rather than calling ``.train()``) keeps frozen parts that a task holds in eval
    mode, such as a frozen encoder with BatchNorm, from silently switching to training mode.
    """
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _finish(
    task: TrainTask,
    acc: Accelerator,
    model: nn.Module,
    ema: EMA | None,
    out: Path,
    state: _TrainerState,
    config: TrainConfig,
) -> Path | None:
    """Final evaluation (unless one just ran) and ``task.save_pretrained`` with the EMA weights."""
    if config.eval_every and state.step % config.eval_every:
        _evaluate(task, acc, model, ema, out, state)
    net = acc.unwrap_model(model, keep_fp32_wrapper=False)  # also undoes the mixed-precision forward patch
    save_pretrained = getattr(task, "save_pretrained", None)
    if save_pretrained is None:
        return None
    export_dir = out / EXPORT_DIR
    if acc.is_main_process:
        tmp = out / f".tmp_{EXPORT_DIR}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with _ema_weights(ema, net):
            save_pretrained(net, tmp)
        replace_folder(tmp, export_dir)
        logger.info("exported %s weights to %s", "EMA" if ema is not None else "final", export_dir)
    acc.wait_for_everyone()
    return export_dir


# ------------------------------------------------------------------------------------------- stopping


class _StopRequest:
    """Turns SIGINT/SIGTERM into "checkpoint after this step, then return" (a second Ctrl-C aborts)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("received %s: will checkpoint and stop after this step", signal.Signals(signum).name)

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Handle SIGINT/SIGTERM inside the block, then restore the previous handlers (main thread only)."""
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _stop_reason(acc: Accelerator, stop: _StopRequest, deadline: float) -> str | None:
    """Whether to stop now, agreed by all processes: one process's signal or clock stops them all."""
    flags = torch.tensor(
        [float(stop.signum is not None), float(time.monotonic() > deadline)],
        dtype=torch.float32,
        device=acc.device,
    )
    if acc.num_processes > 1:
        flags = acc.reduce(flags, reduction="sum")
    if flags[0] > 0:
        return "signal"
    if flags[1] > 0:
        return "time box"
    return None


# ---------------------------------------------------------------------------------------- checkpoints


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``output_dir/checkpoints`` (None if there is none)."""
    found = _list_checkpoints(Path(output_dir) / CHECKPOINT_DIR)
    return found[-1] if found else None


def _list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    complete = [p for p in root.iterdir() if _CHECKPOINT_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(complete, key=lambda p: int(_CHECKPOINT_RE.match(p.name).group(1)))  # type: ignore[union-attr]


def _checkpoint_to_resume(out: Path, config: TrainConfig, resume_from: str | Path | None) -> Path | None:
    if resume_from is not None:
        path = Path(resume_from)
        if not (path / STATE_FILE).is_file():
            raise ValueError(
                f"{path} is not a diffuseg checkpoint (no {STATE_FILE}); "
                f"pick a folder under {out / CHECKPOINT_DIR}."
            )
        return path
    latest = latest_checkpoint(out)
    if latest is not None and not config.resume:
        raise ValueError(
            f"{out} already holds checkpoints (latest {latest.name}) and resume=False: use a new output_dir, "
            f"delete {out / CHECKPOINT_DIR}, or set resume=True."
        )
    return latest


def _load_checkpoint(acc: Accelerator, path: Path) -> _TrainerState:
    acc.load_state(str(path))
    saved = json.loads((path / STATE_FILE).read_text())
    state = _TrainerState(**{f.name: saved[f.name] for f in fields(_TrainerState) if f.name in saved})
    if acc.is_main_process:
        logger.info("resumed from %s (step %d)", path, state.step)
    return state


def _save_checkpoint(
    acc: Accelerator, out: Path, state: _TrainerState, ema: EMA | None, config: TrainConfig
) -> Path:
    """Write ``checkpoints/step_XXXXXX`` atomically: into a temp folder, then one rename, then prune.

    Every process takes part (``save_state`` writes each process's RNG state); only the main process
    writes the shared files, renames and prunes, so a checkpoint exists once and is never half-written.
    """
    root = out / CHECKPOINT_DIR
    final, tmp = root / f"step_{state.step:06d}", root / f".tmp_step_{state.step:06d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        if ema is not None:
            ema.save(tmp / EMA_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _list_checkpoints(root)[: -config.keep_checkpoints]:
            shutil.rmtree(old)
        logger.info("saved checkpoint %s", final)
    acc.wait_for_everyone()
    return final


def _prepare_output_dir(out: Path, config: TrainConfig, step: int) -> dict[str, list[Any]]:
    """Create ``out``, drop half-written checkpoints, save the config, cut the log back to ``step``.

    Returns the config keys that changed since the last call, as ``{key: [old, new]}``.
    """
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / CHECKPOINT_DIR).glob(".tmp_*"):
        shutil.rmtree(stale)
    changed = _write_config(out / CONFIG_FILE, config)
    _truncate_log(out / LOG_FILE, step)
    return changed


# Keys that say where and how a chunk ran, not how the model is trained: not worth a history line.
_SESSION_KEYS = frozenset({"max_minutes", "progress", "resume", "output_dir"})


def _write_config(path: Path, config: TrainConfig) -> dict[str, list[Any]]:
    new = config.to_dict()
    changed: dict[str, list[Any]] = {}
    if path.is_file():
        old = yaml.safe_load(path.read_text()) or {}
        changed = {
            k: [old[k], new[k]]
            for k in sorted(new)
            if k in old and old[k] != new[k] and k not in _SESSION_KEYS
        }
        if changed:
            logger.warning("training config changed since the last run: %s", changed)
    path.write_text(yaml.safe_dump(new, sort_keys=False))
    return changed


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step (they will be written again), and any torn last line."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def export_checkpoint(
    task: TrainTask, output_dir: str | Path, export_dir: str | Path, checkpoint: str | Path | None = None
) -> Path:
    """Export a checkpoint's weights (EMA when saved) with ``task.save_pretrained``, mid-training.

    Long trainings run in time-boxed chunks; this makes the model of any chunk usable (probes,
    a provisional shipped model) without finishing the run. Written to a temp folder, then renamed.
    """
    from safetensors.torch import load_file

    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(output_dir)
    if ckpt is None or not (ckpt / "model.safetensors").is_file():
        raise FileNotFoundError(f"{output_dir}: no checkpoint with model.safetensors to export")
    net = task.model()
    net.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    if (ckpt / EMA_FILE).is_file():
        ema = EMA(net, 0.999)
        ema.load(ckpt / EMA_FILE)
        ema.copy_to(net)
    out = Path(export_dir)
    tmp = out.parent / f".tmp_{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    task.save_pretrained(net, tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    logger.info("exported %s to %s", ckpt.name, out)
    return out
