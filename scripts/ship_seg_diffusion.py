"""Ship a Seg-diffusion export as ``checkpoints/seg-diffusion``: fp16 weights, sample picture, model card.

    python scripts/ship_seg_diffusion.py --export RUNS/seg-diffusion-export --out checkpoints/seg-diffusion
    # then measure on these very weights and put the numbers into the card:
    python benchmarks/segdiffusion_fashion.py --data D --checkpoint checkpoints/seg-diffusion --update-card

The weights are halved to keep the repository small (the pipeline computes in fp32 unless asked for
half precision), the export's ``sample.png`` travels with them, and the card is rewritten so that it
names the shipped folder. The folder is built beside ``--out`` and swapped in at the end, so an
interrupted run never leaves a half-written checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from diffuseg.backbones.latent import LatentDiffusionBackbone
from diffuseg.io import replace_folder
from diffuseg.train.seg_diffusion import write_model_card


def ship(export: Path, out: Path) -> Path:
    """Write ``export``'s weights in fp16, its sample picture and a fresh card to ``out``."""
    if not (export / "unet").is_dir():
        raise SystemExit(f"{export}: not a Seg-diffusion export (no unet/ folder)")
    tmp = out.parent / f".tmp_{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    LatentDiffusionBackbone.from_pretrained(export).save_pretrained(tmp, fp16=True)
    sample = None
    if (export / "sample.png").is_file():
        shutil.copy2(export / "sample.png", tmp / "sample.png")
        sample = "sample.png"
    write_model_card(tmp, sample_image=sample)
    return replace_folder(tmp, out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", type=Path, required=True, help="the training run's --export folder")
    p.add_argument("--out", type=Path, default=Path("checkpoints/seg-diffusion"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.info("shipped %s", ship(args.export, args.out))


if __name__ == "__main__":
    main()
