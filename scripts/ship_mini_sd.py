"""Ship the embedded mini-SD as ``checkpoints/mini-sd``: fp16 weights, the DiffSeg defaults chosen by
the sweep, and a model card with the quality gate measured on these very (fp16) weights. Three steps:

    # 1. the weights: the export's EMA weights in fp16, the folder every later number is measured on
    python scripts/ship_mini_sd.py --export RUNS/mini-sd-export --out checkpoints/mini-sd
    # 2. the gate, measured on the shipped folder
    python benchmarks/diffseg_fashion.py --backbone checkpoints/mini-sd --data D \\
        --json-out RUNS/gate/diffseg.json
    python benchmarks/ddpmseg_fashion.py --data D --backbone checkpoints/mini-sd --rows ddpm,rgbxy,random \\
        --sizes 50 --max-iterations 5000 --json-out RUNS/gate/ddpmseg.json
    # 3. the defaults and the card (the weights are re-saved bit for bit: fp16 -> fp32 -> fp16 is exact)
    python scripts/ship_mini_sd.py --out checkpoints/mini-sd --unet-run RUNS/mini-sd-unet --data D \\
        --diffseg RUNS/gate/diffseg.json --ddpmseg RUNS/gate/ddpmseg.json

Each step writes a temporary folder that replaces ``--out`` only when complete, so a failed or
interrupted shipment never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TRAIN_COMMAND = """diffuseg data fashion-scenes --out {data} --num-train 20000 --num-val 500 --seed 0
# stage 1 (finished; checkpoints/mini-sd-vae has its own card)
diffuseg train vae --data {data} --out RUNS/mini-sd-vae --config configs/mini-sd.yaml
# stage 2, resumable chunks on one CPU thread (carried between machines by scripts/carry.sh)
OMP_NUM_THREADS=1 diffuseg train mini-sd --data {data} --vae checkpoints/mini-sd-vae \\
    --out RUNS/mini-sd-unet --max-minutes 135 --export RUNS/mini-sd-export
# shipping: fp16 weights, the gate measured on them, then the defaults and this card
python scripts/ship_mini_sd.py --export RUNS/mini-sd-export --out checkpoints/mini-sd
python benchmarks/diffseg_fashion.py --backbone checkpoints/mini-sd --data {data} \\
    --json-out RUNS/gate/diffseg.json
python benchmarks/ddpmseg_fashion.py --data {data} --backbone checkpoints/mini-sd \\
    --rows ddpm,rgbxy,random --sizes 50 --max-iterations 5000 --json-out RUNS/gate/ddpmseg.json
python scripts/ship_mini_sd.py --out checkpoints/mini-sd --unet-run RUNS/mini-sd-unet --data {data} \\
    --diffseg RUNS/gate/diffseg.json --ddpmseg RUNS/gate/ddpmseg.json"""


def main(argv: list[str] | None = None) -> None:
    from diffuseg.backbones.latent import LatentDiffusionBackbone
    from diffuseg.io import replace_folder, weights_fingerprint
    from diffuseg.train.latent_diffusion import load_image_array, reconstruction_psnr
    from diffuseg.train.model_card import backbone_gate, read_log, ship_backbone

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "checkpoints" / "mini-sd")
    p.add_argument("--export", type=Path, help="step 1: write this export's weights in fp16 to --out")
    p.add_argument("--unet-run", type=Path, help="step 3: the UNet run folder (its log.jsonl)")
    p.add_argument("--data", type=Path, help="step 3: FashionScenes folder (VAE PSNR on val)")
    p.add_argument("--diffseg", type=Path, help="step 3: --json-out of benchmarks/diffseg_fashion.py")
    p.add_argument("--ddpmseg", type=Path, help="step 3: --json-out of benchmarks/ddpmseg_fashion.py")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    tmp = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)

    if args.export is not None:  # step 1
        LatentDiffusionBackbone.from_pretrained(args.export).save_pretrained(tmp, fp16=True)
        replace_folder(tmp, args.out)
        logging.info("wrote the fp16 weights of %s to %s; now measure the gate on it", args.export, args.out)
        return
    missing = [
        f"--{k.replace('_', '-')}" for k in ("unet_run", "data", "diffseg", "ddpmseg") if not getattr(args, k)
    ]
    if missing:
        p.error(f"the card step needs {', '.join(missing)} (or give --export for the weights step)")

    diffseg, ddpmseg = json.loads(args.diffseg.read_text()), json.loads(args.ddpmseg.read_text())
    for name, res in (("diffseg", diffseg), ("ddpmseg", ddpmseg)):
        if Path(res["backbone"]).resolve() != args.out.resolve():
            raise SystemExit(f"--{name} was measured on {res['backbone']}, not on {args.out}")
    weights = weights_fingerprint(args.out)
    if ddpmseg.get("backbone_weights") != weights:
        raise SystemExit(
            f"--ddpmseg was measured on weights {ddpmseg.get('backbone_weights')}, {args.out} has {weights}"
        )
    gate, holds = backbone_gate(diffseg, ddpmseg)
    backbone = LatentDiffusionBackbone.from_pretrained(args.out)
    backbone.config.method_defaults["diffseg"] = dict(diffseg["defaults"])
    steps = read_log(args.unet_run, "train")[-1]["step"]
    psnr_db = reconstruction_psnr(backbone.vae, load_image_array(args.data, "val", 256))
    metrics = {
        "VAE reconstruction PSNR, 256 FashionScenes val scenes (dB)": f"{psnr_db:.2f}",
        "UNet training steps (batch 32)": steps,
        "DiffSeg defaults (chosen on train scenes)": json.dumps(diffseg["defaults"]),
    }
    for r in read_log(args.unet_run, "eval"):
        metrics[f"probe at step {r['step']}: attention entropy 16² / 8², DiffSeg mIoU (q 0.2)"] = (
            f"{r['attn_entropy_16']:.3f} / {r['attn_entropy_8']:.3f}, {r['diffseg_mIoU_q0.2']:.1f}"
        )
    status = (
        f"shipped default backbone, step {steps}; the quality gate holds"
        if holds
        else f"step {steps}; the quality gate does NOT hold yet (see below)"
    )
    ship_backbone(
        backbone,
        tmp,
        command=TRAIN_COMMAND.format(data=args.data),
        data=f"FashionScenes `{args.data}` (20,000 train / 500 val scenes, seed 0)",
        runs={"UNet (stage 2)": args.unet_run},
        metrics=metrics,
        status=status,
        gate=gate
        + f"\n\nMeasured {diffseg['date']} ({diffseg['machine']}); the full tables are in docs/results.md.",
    )
    if weights_fingerprint(tmp) != weights:
        raise SystemExit(f"re-saving changed the weights of {args.out}; nothing replaced ({tmp} kept)")
    replace_folder(tmp, args.out)
    logging.info("shipped %s (gate %s)", args.out, "holds" if holds else "not met")


if __name__ == "__main__":
    main()
