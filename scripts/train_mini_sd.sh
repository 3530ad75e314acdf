#!/usr/bin/env bash
# The exact commands that train the shipped mini-SD (resumable: rerun to continue).
#   DATA=/work/data/fashion_scenes RUNS=/work/runs bash scripts/train_mini_sd.sh [VAE_MINUTES] [UNET_MINUTES]
set -euo pipefail
DATA=${DATA:-data/fashion_scenes}
RUNS=${RUNS:-runs}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one core for training, one for everything else
if [ ! -f "$DATA/meta.json" ]; then
  diffuseg data fashion-scenes --out "$DATA" --num-train 20000 --num-val 500 --seed 0
fi
if [ ! -f "$RUNS/mini-sd-vae/vae/config.json" ]; then
  diffuseg train vae --data "$DATA" --out "$RUNS/mini-sd-vae" --config configs/mini-sd.yaml --max-minutes "${1:-600}"
fi
if [ -f "$RUNS/mini-sd-vae/vae/config.json" ]; then
  diffuseg train mini-sd --data "$DATA" --vae "$RUNS/mini-sd-vae" --out "$RUNS/mini-sd-unet" \
    --config configs/mini-sd.yaml --max-minutes "${2:-600}" --export "$RUNS/mini-sd-export"
fi
