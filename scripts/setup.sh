#!/usr/bin/env bash
# Set up ssl_kit on a fresh machine: the built-in data set (Debian package) and the Python package.
# Usage: bash scripts/setup.sh        (idempotent; safe to run again)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
   && [ ! -f "${HOME}/.cache/ssl_kit/fashion-mnist/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dataset-fashion-mnist
  else
    echo "No apt-get: put the Fashion-MNIST IDX .gz files in ~/.cache/ssl_kit/fashion-mnist (see README)." >&2
  fi
fi
# torch and torchvision are resolved together from the registry (timm needs torchvision).
python3 -m pip install -q --disable-pip-version-check -e ".[dev]"
