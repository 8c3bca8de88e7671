#!/usr/bin/env bash
# The GPU checks, as one script for a machine with a GPU (the device tool's H200): configure with
# CUDA and NCCL required, build, show the device, run the GPU-labelled tests, and print the
# figures. Run from the repository root; writes its report to ${OUT:-.}/gpu-check.txt as well.
set -uo pipefail
start=$(date +%s)
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${MOEFOLD_GPU_BUILD:-$root/build-gpu}
report=${OUT:-$root}/gpu-check.txt
exec > >(tee "$report") 2>&1

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi not available"
export PATH=/usr/local/cuda/bin:$PATH

echo "== configure and build (CUDA and NCCL required)"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DMOEFOLD_ENABLE_CUDA=ON -DMOEFOLD_ENABLE_NCCL=ON -DMOEFOLD_BUILD_BENCHMARKS=ON >/dev/null || exit 1
cmake --build "$build" -j "$(nproc)" || exit 1

echo "== GPU tests"
status=0
(cd "$build" && ctest -L gpu --output-on-failure) || status=$?
"$build/bin/test_gpu_device" || true

echo "== elapsed $(( $(date +%s) - start )) s, status $status"
exit $status
