#!/usr/bin/env bash
# The single-GPU runs behind docs/benchmarks/2026-11-21-grpo-gpu-h200 and 2026-11-21-generation-h200, on one
# H200 (device kind nvidia-h200), from the repository root after the device install (../shared/device/README.md).
# Results go to $OUT. About 12 minutes; vLLM engines take ~20-40 s each to start on these machines.
set -u
source /tmp/devenv.sh
OUT=${OUT:-/tmp/colocate-gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/device.txt"
# 1. vLLM engine start-up in a child process (AsyncLLM's engine core; LLM with multiprocessing on), 5 at once
python docs/benchmarks/2026-11-21-generation-h200/probe/async_hang.py 45 80 > "$OUT/engine_start_probe.txt" 2>&1
# 2. GPU tests: colocated refit over CUDA IPC, sleep/wake around a refit for both engines and both levels, policy
timeout 300 python -m pytest -m gpu -q -rs -s --tb=short tests/test_refit_gpu.py tests/policy/test_policy_gpu.py \
  tests/generation/test_gpu.py > "$OUT/gpu_tests.log" 2>&1
# 3. GRPO colocated on this one GPU: Qwen2.5-1.5B shapes, random weights, 64 prompts x 8 samples x 512 tokens
python -m colocate.models.random_init --shapes qwen2.5-1.5b --out /tmp/qwen-random > /dev/null 2>&1
timeout 400 python -m colocate.run +recipe=grpo_gpu model.path=/tmp/qwen-random algorithm.steps=4 \
  logging.progress=false hydra.run.dir="$OUT/grpo_gpu" > "$OUT/grpo_gpu.log" 2>&1
timeout 300 python -m colocate.run +recipe=grpo_gpu model.path=/tmp/qwen-random algorithm.steps=2 \
  generation.engine=async logging.progress=false hydra.run.dir="$OUT/grpo_gpu_async" > "$OUT/grpo_gpu_async.log" 2>&1
tail -3 "$OUT/gpu_tests.log"; grep -h refit_share "$OUT"/grpo_gpu*/metrics.jsonl | cut -c1-200
