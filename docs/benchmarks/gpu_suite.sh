#!/usr/bin/env bash
# The GPU runs behind docs/benchmarks/2026-11-21-*, on a 2-GPU H200 host, from the repository root after
# `source /tmp/devenv.sh` (see ../shared/device/README.md). Results go to $OUT.
set -u
OUT=${OUT:-/tmp/colocate-gpu}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/device.txt"
# GPU tests: split broadcast over NCCL (cuda:0 -> cuda:1), generation sleep/wake around a refit
timeout 400 python -m pytest -m gpu -q -rs -s tests/test_refit_broadcast.py tests/generation/test_gpu.py \
  > "$OUT/gpu_tests.log" 2>&1
# Split placement: Llama-3-8B shapes from GPU 0 into a vLLM engine on GPU 1
timeout 150 python -m colocate.bench.split --device cuda --model llama3-8b --receivers 1 --repeats 10 \
  --json "$OUT/split_llama3-8b.json" > "$OUT/split.log" 2>&1
# GRPO colocated on both GPUs: 2 FSDP2 ranks + 2 vLLM engines, Qwen2.5-1.5B shapes with random weights
# (the overrides restore the GPU recipe as it was for that run: 32-token rollouts, sleep level 1, eager decoding)
# The 170 s bound this suite first had on the tests was too short for the async engine's two start-ups (~40 s each).
python -m colocate.models.random_init --shapes qwen2.5-1.5b --out /tmp/qwen-random > /dev/null 2>&1
timeout 240 python -m colocate.run +recipe=grpo_gpu model.path=/tmp/qwen-random placement.policy_workers=2 \
  placement.generation_workers=2 algorithm.steps=4 logging.progress=false hydra.run.dir="$OUT/grpo_gpu" \
  algorithm.prompts_per_step=32 algorithm.max_new_tokens=32 generation.max_model_len=512 generation.sleep_level=1 \
  generation.enforce_eager=true policy.offload=true policy.micro_batch_size=16 algorithm.val_every=5 \
  > "$OUT/grpo_gpu.log" 2>&1
tail -5 "$OUT/gpu_tests.log"; grep -E "median|colocate|floor|vllm" "$OUT/split.log" | tail -8
tail -2 "$OUT/grpo_gpu/metrics.jsonl" 2>/dev/null; grep -E "Error|error" "$OUT/grpo_gpu.log" | tail -5
