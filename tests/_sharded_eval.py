"""Run by tests/test_eval_runner_distributed.py under `accelerate launch` (and alone, as the reference)."""

import sys
from pathlib import Path

import numpy as np

from diffuseg.eval.runner import evaluate_method, load_meta, load_split_samples

data, out = Path(sys.argv[1]), Path(sys.argv[2])
meta = load_meta(data)


def predict(images):
    # deterministic, imperfect: bright pixels -> class 1 (t-shirt), the rest background
    return [np.where(im.mean(-1) > 128, 1, 0) for im in images]


evaluate_method(
    predict,
    load_split_samples(data, "val"),
    len(meta["classes"]),
    meta["classes"],
    unseen=meta["unseen"],
    batch_size=1,
    progress=False,
    json_out=out,
)

# shut the process group down on every rank: a rank leaving while another still talks to the
# rendezvous store makes gloo abort that rank
import torch.distributed as dist  # noqa: E402

if dist.is_available() and dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
