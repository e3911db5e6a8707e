#!/usr/bin/env bash
# Multi-GPU checks on one node (2 or 4 GPUs, NCCL), in well under 8 minutes:
#   1. the multi-process equality tests (tests/distributed) on NCCL/CUDA: a tensor-,
#      sequence- and data-parallel GPT equals the single-process model, dropout RNG rules;
#   2. `protoformer train` under torchrun on 2 GPUs with --tp 2 (NCCL), then resumed;
#   3. benchmarks/tp_scaling.py: tokens/s at TP = 1, 2, 4 for a 7B-like layer shape,
#      printed as a markdown table.
# The repository need not be installed: PYTHONPATH=src. Every step is time-bounded and any
# failure makes the script exit non-zero (the remaining steps still run, to report them).
set -uo pipefail
cd "$(dirname "$0")/.."

export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0                 # never NVLink multicast on shared hosts
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export NVSHMEM_DISABLE_NVLS=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a stuck collective aborts instead of hanging
export HF_HUB_OFFLINE=1
export PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"

started=$SECONDS
failed=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, record a failure
  local name="$1" limit="$2"; shift 2
  echo; echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "-- $name: exit $rc after $((SECONDS - t0))s"
  if [ "$rc" -ne 0 ]; then failed+=("$name (exit $rc)"); fi
}

gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version() if torch.cuda.is_available() else None)'
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || true
if [ "${gpus:-0}" -lt 2 ]; then
  echo "gpu_distributed.sh: needs at least 2 CUDA GPUs, found ${gpus:-0}" >&2
  exit 1
fi
max_tp=$(( gpus >= 4 ? 4 : 2 ))
echo "GPUs: $gpus; tensor-parallel sizes up to $max_tp"

# GPU_STEPS picks the steps (default all three), so the work can be split over calls that
# each have a time limit: GPU_STEPS="tests train" then GPU_STEPS=bench.
steps_wanted="${GPU_STEPS:-tests train bench}"
wants() { [[ " $steps_wanted " == *" $1 "* ]]; }

# 1. Equality tests on NCCL (each rank on its own GPU; 4-rank tests skip on 2 GPUs).
wants tests && step "equality tests (NCCL)" 200 env PROTOFORMER_TEST_DIST_BACKEND=nccl \
  "$PYTHON" -m pytest tests/distributed -q -p no:cacheprovider -rs

# 2. The trainer end to end on 2 GPUs: TP=2 for 30 steps, then resume to 40.
if wants train; then
run_dir=$(mktemp -d /tmp/protoformer-gpu-train-XXXXXX)
train_args=(-m protoformer.cli train --preset tiny --tp 2 --device cuda --batch-size 8
            --seq-len 128 --eval-every 10 --save-every 10 --log-every 10 --out "$run_dir")
step "train --tp 2 (NCCL)" 120 "$PYTHON" -m torch.distributed.run --standalone \
  --nproc-per-node=2 "${train_args[@]}" --steps 30
step "train --tp 2 --resume (NCCL)" 120 "$PYTHON" -m torch.distributed.run --standalone \
  --nproc-per-node=2 "${train_args[@]}" --steps 40 --resume
ls -la "$run_dir" "$run_dir/checkpoints" 2>/dev/null | head -20
fi

# 3. Scaling benchmark: one torchrun launch per TP size, with and without sequence parallel.
wants bench && step "tp_scaling benchmark" 290 "$PYTHON" benchmarks/tp_scaling.py --launch --max-tp "$max_tp" \
  --deadline 250 --launch-timeout 120

echo
echo "gpu_distributed.sh: finished in $((SECONDS - started))s"
if [ "${#failed[@]}" -ne 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "all steps passed"
