#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one go, for a machine lent with one GPU (a few minutes on an H100/H200):
#   bash benchmarks/gpu_checks.sh [output folder]
# Pre-training throughput of ResNet-50 at 224, batch 256, AMP bf16 + channels_last, on tensors already on the GPU
# and through the real data pipeline (synthetic scenes, two MoCo v2 views, 16 workers), and the DenseCL/MoCo v2
# step-time ratio on the GPU. Runs from the repository root without installing the package.
set -uo pipefail
out=${1:-benchmark_output}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
workers=$(( $(nproc) < 16 ? $(nproc) : 16 ))
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  echo "cpus $(nproc), data workers $workers"
} 2>&1 | tee "$out/machine.txt"
python3 benchmarks/pretrain_throughput.py --arch resnet50 --size 224 --batch 256 --amp bf16 --mode tensors \
  2>&1 | tee "$out/throughput_tensors.txt"
python3 benchmarks/pretrain_throughput.py --arch resnet50 --size 224 --batch 256 --amp bf16 --mode pipeline \
  --workers "$workers" 2>&1 | tee "$out/throughput_pipeline.txt"
python3 benchmarks/step_overhead.py --arch resnet50 --size 224 --batch 256 --amp bf16 --iters 10 \
  2>&1 | tee "$out/step_overhead.txt"
