"""Quick zero-shot probe of a ZS3D training checkpoint (raw or EMA weights) on the first N val scenes.

    python scripts/zs3d_probe.py RUN STEP [--num-images 32] [--weights model|ema] [--set KEY=VALUE]
    python scripts/zs3d_probe.py RUN STEP --save DIR   # that checkpoint as a pipeline folder

``--set model.type=regression`` reads a run of the SPNet-like baseline. The recipe (model section) is
``--config``, not the run's: give the same overrides the run was trained with.

Prints seen / unseen mIoU (γ = 0) for the cheap samplers used to compare recipe variants of one run at
the same step: 1 step (the x0 prediction from pure noise: semantics read from the image alone) and
10 DDIM steps with 1 sample. A development tool, not a benchmark: docs/results.md comes from
benchmarks/zs3d_fashion.py on the finished model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffuseg.eval.runner import load_meta
from diffuseg.train import load_yaml_config
from diffuseg.train.zs3d import _exclusions, _val_at_data_size, build_pipeline, quick_metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("step", type=int)
    ap.add_argument("--num-images", type=int, default=32)
    ap.add_argument("--weights", choices=["model", "ema"], default="model")
    ap.add_argument("--data", type=Path, default=Path("/work/data/fashion_scenes"))
    ap.add_argument("--config", type=Path, default=Path(__file__).parents[1] / "configs" / "zs3d.yaml")
    ap.add_argument("--set", action="append", default=[], help="config override, dotted (repeatable)")
    ap.add_argument("--save", type=Path, default=None, help="write the pipeline folder, no probe")
    args = ap.parse_args()
    torch.set_num_threads(1)
    config = load_yaml_config(args.config, args.set)
    meta = load_meta(args.data)
    pipe, _ = build_pipeline(config, meta["classes"], _exclusions(config, meta), {})
    ckpt = args.run / "checkpoints" / f"step_{args.step:06d}" / f"{args.weights}.safetensors"
    state = load_file(str(ckpt))
    pipe.unet.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    pipe.unet.eval()
    if args.save is not None:
        print(f"wrote {pipe.save_pretrained(args.save)}")
        return
    val = _val_at_data_size(args.data, args.num_images)
    for label, steps in {"1 step": 1, "10 steps": 10}.items():
        m = quick_metrics(pipe, val, num_inference_steps=steps, num_samples=1)
        print(
            f"{args.run.name} step {args.step} {args.weights} {label}: "
            + "  ".join(f"{k} {v:.1f}" for k, v in m.items() if isinstance(v, float))
        )


if __name__ == "__main__":
    main()
