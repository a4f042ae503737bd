#!/usr/bin/env bash
# The GPU check of issue 23 (benchmarks/gpu_check.py) on a bare CUDA machine: torch is there, nothing can be
# downloaded. diffusers (the reference pipeline) and open-clip-torch (latentup's text tower) travel beside the repo
# as wheels in .whl/. Prepare them once, on a machine with pip and the network, in the repo root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl diffusers==0.42.1 open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 importlib-metadata==10.2.0
#
# (the machine's image already has transformers, timm, safetensors, huggingface-hub, regex, lightning, torchmetrics;
# ftfy and wcwidth are open-clip's, importlib-metadata diffusers'). Then, on the GPU machine, in the repo root:
#
#   bash benchmarks/gpu_check.sh [gpu_check.py options]        # one call, at most 9 minutes
#
# It prints one table (and appends JSON lines to $OUT/gpu_check.jsonl, or ./gpu_check.jsonl without OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
exec python3 benchmarks/gpu_check.py "$@"
