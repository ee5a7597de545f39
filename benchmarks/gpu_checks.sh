#!/usr/bin/env bash
# Every check that needs a GPU, in one go (about 7 minutes on one H100/H200):
#   bash benchmarks/gpu_checks.sh [OUT_DIR]
# GPU-marked tests (NCCL run, Triton kernels vs torch, grouped expert GEMM in bf16), the
# expert GEMM benchmark, the dispatch-kernel benchmark, the step anatomy (issue 12: ops and
# host reads per step on the GPU), predicted vs measured step time and memory on this GPU
# (benchmarks/gpu_step.py; bf16 runs use Megatron-style mixed precision since issue 12) and a
# quick `foldplan profile` of this GPU.
# Logs and JSON land in OUT_DIR (default ./gpu_checks).
set -uo pipefail
OUT_DIR=${1:-./gpu_checks}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
step() { echo; echo "=== $1 ($(date +%T))"; }
step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
step "GPU tests"
$PY -m pytest -q -p no:cacheprovider -m gpu tests/executor 2>&1 | tail -15
step "expert GEMM: grouped vs padded"
$PY benchmarks/expert_gemm.py --repeat 10
step "dispatch kernels"
$PY benchmarks/dispatch_kernels.py --backend triton --tokens 32768 2>&1 | tail -7
$PY benchmarks/dispatch_kernels.py --backend triton --tokens 32768 --backward 2>&1 | tail -7
step "step anatomy on this GPU (ep 1: ops, host reads incl. device-to-host copies, shapes)"
timeout 300 $PY benchmarks/step_anatomy.py --config ep1-dropless ep1-cap1 --out "$OUT_DIR/step_anatomy_gpu.json" 2>&1 | grep -v '^step '
step "predicted vs measured on this GPU"
$PY benchmarks/gpu_step.py --steps 6 --out "$OUT_DIR/gpu_step"
cp "$OUT_DIR/gpu_step/gpu_step.json" "$OUT_DIR/" 2>/dev/null
step "profile"
timeout 120 $PY -m executor.profile --out "$OUT_DIR/profile.json" --nproc 1 --quick 2>&1 | tail -15
step "done"
