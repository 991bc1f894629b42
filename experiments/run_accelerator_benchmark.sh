#!/usr/bin/env bash
# The accelerator benchmark in one command, for the day a GPU (or TPU) is at hand:
#
#   bash experiments/run_accelerator_benchmark.sh                 # GPU: writes docs/benchmark_accelerator.md
#   PLATFORM=tpu bash experiments/run_accelerator_benchmark.sh    # a Cloud TPU VM
#   OUTPUT=/tmp/table.md TIME_BUDGET=1200 bash experiments/run_accelerator_benchmark.sh --torch=eager
#
# It runs `python -m experiments.benchmark_accelerator` (training img/s and MFU of ResNet-18 at batch 512 and
# WRN-28-10 at batch 128, bfloat16 and float32, on one device and on all local devices, against PyTorch eager and
# torch.compile; inference img/s; detector fit + score on CIFAR-sized features) from the repository root, so an
# uninstalled checkout works: it needs jax with the accelerator's plugin, flax, optax, chex, absl-py, NumPy, SciPy
# and scikit-learn, and torch (with CUDA) for the PyTorch rows. Rows that would start after TIME_BUDGET seconds
# (default 420, so that the run ends within ~10 minutes) are skipped, and OUTPUT is rewritten after every row.
# Arguments are passed on after the defaults (absl keeps the last value of a flag), e.g. --sections=train.
set -euo pipefail
cd "$(dirname "$0")/.."

platform="${PLATFORM:-gpu}"
output="${OUTPUT:-docs/benchmark_accelerator.md}"
budget="${TIME_BUDGET:-420}"
python="${PYTHON:-python3}"

if [[ "$platform" == gpu ]] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
fi
export PYTHONUNBUFFERED=1
exec "$python" -m experiments.benchmark_accelerator --platform="$platform" --devices=one,all \
  --time_budget="$budget" --output="$output" "$@"
