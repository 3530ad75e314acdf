#!/usr/bin/env bash
# Run the embedded models' trainings in resumable chunks on machines that are not kept.
#
#   bash scripts/carry.sh start MINUTES NAME [NAME ...]   # data if missing, unpack, launch in background
#   bash scripts/carry.sh pack NAME [NAME ...]            # latest checkpoints -> training-state/NAME (commit them)
#                                                         # (a stage with its own loop, RUN/STAGE -> NAME.STAGE)
#   bash scripts/carry.sh unpack NAME [NAME ...]          # only lay the packs out (start does it too)
#   bash scripts/carry.sh status                          # last log line of every run
#
# NAME is one of the runs below; each is the exact command of docs/training.md. NAME.calibration
# trains a ZS3D run's calibration model on its own (in parallel with the main stage). One torch thread per
# run (this machine has 2 cores); logs go to $RUNS/NAME.log. RUNS defaults to /work/runs, the data to
# /work/data/fashion_scenes (generated here, byte-identical per seed, when missing), the packs to
# STATE=training-state.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-/work/runs}
DATA=${DATA:-/work/data/fashion_scenes}
STATE=${STATE:-training-state}

# The SPNet-like baseline converges in fewer steps (one regression pass): half of ZS3D's budget.
SPNET_STEPS="--set train.max_steps=4000 --set calibration.train.max_steps=1500"

command_for() {  # NAME MINUTES -> the training command
  local m=$2
  case "$1" in
    mini-sd-unet) echo "diffuseg train mini-sd --data $DATA --vae checkpoints/mini-sd-vae --out $RUNS/mini-sd-unet --max-minutes $m --export $RUNS/mini-sd-export" ;;
    esda) echo "diffuseg train esda --data $DATA --out $RUNS/esda --threads 1 --max-minutes $m --set train.max_steps=4500" ;;
    zs3d) echo "diffuseg train zs3d --data $DATA --out $RUNS/zs3d --max-minutes $m" ;;
    zs3d-spnet) echo "diffuseg train zs3d --baseline $SPNET_STEPS --data $DATA --out $RUNS/zs3d-spnet --max-minutes $m" ;;
    zs3d.calibration|zs3d-spnet.calibration)  # the calibration model alone, beside the main stage
      local base=${1%.calibration} extra=""
      [ "$base" = zs3d-spnet ] && extra="--baseline $SPNET_STEPS"
      echo "diffuseg train zs3d $extra --stage calibration --data $DATA --out $RUNS/$base --max-minutes $m" ;;
    seg-diffusion) echo "diffuseg train seg-diffusion --data $DATA --backbone checkpoints/mini-sd --out $RUNS/seg-diffusion --max-minutes $m --export $RUNS/seg-diffusion-export" ;;
    *) echo "unknown run '$1' (mini-sd-unet, esda, zs3d, zs3d-spnet, NAME.calibration, seg-diffusion)" >&2; return 2 ;;
  esac
}

unpack_one() {  # NAME: lay out $STATE/NAME (and NAME.STAGE packs) where the run folder has no checkpoint
  local name=$1 sub stage
  if [ ! -d "$RUNS/$name/checkpoints" ] && [ -f "$STATE/$name/carry.json" ]; then
    diffuseg train unpack "$STATE/$name" --out "$RUNS/$name" -q
  fi
  for sub in "$STATE/$name".*/; do  # stages with their own loop (ZS3D's calibration model)
    [ -f "$sub/carry.json" ] || continue
    stage=$(basename "$sub"); stage=${stage#"$name".}
    if [ ! -d "$RUNS/$name/$stage/checkpoints" ]; then
      diffuseg train unpack "$sub" --out "$RUNS/$name/$stage" -q
    fi
  done
}

ensure_data() {
  if [ ! -f "$DATA/meta.json" ]; then
    diffuseg data fashion-scenes --out "$DATA" --num-train 20000 --num-val 500 --seed 0 -q
  fi
}

case "${1:-}" in
  start)
    minutes=${2:?minutes}; shift 2
    ensure_data
    mkdir -p "$RUNS"
    for name in "$@"; do
      cmd=$(command_for "$name" "$minutes")
      unpack_one "${name%.calibration}"
      OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nohup $cmd >> "$RUNS/$name.log" 2>&1 &
      echo "started $name (pid $!): $cmd"
    done
    ;;
  pack)
    shift
    for name in "$@"; do
      diffuseg train pack "$RUNS/$name" --out "$STATE/$name" -q
      for sub in "$RUNS/$name"/*/checkpoints; do  # a stage's own loop -> $STATE/NAME.STAGE
        [ -d "$sub" ] || continue
        stage=$(basename "$(dirname "$sub")")
        diffuseg train pack "$RUNS/$name/$stage" --out "$STATE/$name.$stage" -q
      done
    done
    ;;
  unpack)
    shift
    for name in "$@"; do unpack_one "$name"; done
    ;;
  status)
    for log in "$RUNS"/*.log; do
      [ -f "$log" ] || continue
      printf '%s: %s\n' "$(basename "$log" .log)" "$(tail -c 2000 "$log" | tr '\r' '\n' | grep -v '^\s*$' | tail -1 | cut -c1-160)"
    done
    ;;
  *)
    sed -n 2,13p "$0"; exit 2 ;;
esac
