#!/usr/bin/env bash
# One-shot set-up of a fresh machine: CPU torch first (a plain `torch` requirement would pull a
# multi-GB CUDA build), the Fashion-MNIST Debian package, then diffuseg with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet torch==2.13.0
fi
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -q && apt-get install -y -q dataset-fashion-mnist) >/dev/null
  else
    sudo sh -c 'apt-get update -q && apt-get install -y -q dataset-fashion-mnist' >/dev/null
  fi
fi
"$PY" -m pip install --quiet -e ".[test,esda,glove]"
