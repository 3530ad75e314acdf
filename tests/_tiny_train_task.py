"""A tiny regression task for the training-loop tests, and a script to run it under ``accelerate launch``.

As a script it trains, then writes ``OUT/rank_<i>.json`` (step, finished, parameters) for every
process, so a test can check that all processes stepped together and ended with the same weights::

    ACCELERATE_USE_CPU=1 python -m accelerate.commands.launch --multi_gpu --num_processes 2 \\
        tests/_tiny_train_task.py OUT --max-steps 10
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from diffuseg.train import TrainConfig, train


class TinyDataset(Dataset):
    """``y = x @ w + 0.5`` on fixed random inputs: learnable in a few dozen steps."""

    def __init__(self, n: int = 64, dim: int = 4) -> None:
        rng = np.random.default_rng(123)
        self.x = torch.from_numpy(rng.standard_normal((n, dim)).astype(np.float32))
        w = torch.from_numpy(rng.standard_normal((dim, 1)).astype(np.float32))
        self.y = self.x @ w + 0.5

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class TinyTask:
    """An MLP with dropout (exercises the global RNG) and input noise from the loop's generator.

    ``interrupt_after`` sends SIGTERM to this process after that many ``loss`` calls (on process
    ``interrupt_rank`` only), which is how the tests interrupt a run mid-step.
    """

    def __init__(self, n: int = 64, interrupt_after: int | None = None, interrupt_rank: int = 0) -> None:
        self.n = n
        self.interrupt_after = interrupt_after
        self.interrupt_rank = interrupt_rank
        self.calls = 0
        self.net: nn.Module | None = None

    def model(self) -> nn.Module:
        self.net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))
        return self.net

    def train_dataset(self) -> Dataset:
        return TinyDataset(self.n)

    def loss(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = batch
        noise = 0.01 * torch.randn(x.shape, generator=generator)
        loss = F.mse_loss(model(x + noise.to(x.device)), y)
        self.calls += 1
        if self.calls == self.interrupt_after and _rank() == self.interrupt_rank:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss, {"noise_abs": float(noise.abs().mean())}

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        data = TinyDataset(self.n)
        device = next(model.parameters()).device
        return {"val_mse": float(F.mse_loss(model(data.x.to(device)), data.y.to(device)))}

    def save_pretrained(self, model: nn.Module, out_dir: Path) -> None:
        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(out_dir / "model.safetensors"))
        with open(out_dir.parent / "exports.txt", "a") as f:
            f.write(f"rank {_rank()}\n")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output_dir")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--interrupt-after", type=int, default=None)
    parser.add_argument("--interrupt-rank", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"[rank {_rank()}] %(name)s: %(message)s")
    torch.set_num_threads(1)

    task = TinyTask(interrupt_after=args.interrupt_after, interrupt_rank=args.interrupt_rank)
    config = TrainConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        batch_size=8,
        lr=1e-2,
        ema_decay=0.9,
        checkpoint_every=args.checkpoint_every,
        log_every=2,
        progress=False,
    )
    result = train(task, config)
    assert task.net is not None
    params = [p.detach().flatten().tolist() for p in task.net.parameters()]
    record = {"step": result.step, "finished": result.finished, "params": params, "world": _world()}
    Path(args.output_dir, f"rank_{_rank()}.json").write_text(json.dumps(record))


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _shutdown() -> None:
    """Leave the process group together: a rank exiting while another still uses the store aborts it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    _shutdown()
