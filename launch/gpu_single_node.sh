#!/usr/bin/env bash
# One GPU node (e.g. 8 × H100): one process drives all local GPUs.
#
#   ./launch/gpu_single_node.sh --config configs/qwen2.5-7b-math.yaml --out runs/q7 \
#       mesh.data=1 mesh.fsdp=-1
#
# Rerunning the same command resumes from the newest complete checkpoint in --out.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/flowrl-jax ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[cuda]'
fi
# Let XLA use most of the GPU memory up front (the memory check reads the real limit).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec .venv/bin/flowrl-jax train "$@"
