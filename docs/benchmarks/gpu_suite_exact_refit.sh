#!/usr/bin/env bash
# The GPU runs behind docs/benchmarks/2026-11-30-exact-refit-h200x2 (issue #10's "must show" 3): on 2 H200s
# (device kind nvidia-h200-x2), from the repository root after the device install (../shared/device/README.md).
# Results go to $OUT; each part is one device call (at most 10 minutes).
#   bash docs/benchmarks/gpu_suite_exact_refit.sh check             # colocate.check --refit on cuda over zmq
#   bash docs/benchmarks/gpu_suite_exact_refit.sh check-broadcast   # the same over the NCCL broadcast (split)
#   bash docs/benchmarks/gpu_suite_exact_refit.sh bench   # colocated refit bench with an MoE row + GPU tests
# What ran on 2026-11-30 and what did not is in that folder's README.
set -u
source /tmp/devenv.sh
OUT=${OUT:-/tmp/colocate-gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/device.txt"
if [ "$1" = check ] || [ "$1" = check-broadcast ]; then
  # Qwen2.5-1.5B shapes (tied embeddings), random weights drawn on the GPU; a small Qwen3-MoE (16 experts).
  [ -f /tmp/qwen-random/config.json ] || python -m colocate.models.random_init --shapes qwen2.5-1.5b \
    --out /tmp/qwen-random --dtype float32 --device cuda > /dev/null 2>&1
  [ -f /tmp/moe-small/config.json ] || python -m colocate.models.tiny /tmp/moe-small --arch qwen3_moe \
    --hidden-size 512 --num-layers 4 --num-heads 8 --num-kv-heads 4 --intermediate-size 256 --num-experts 16 \
    > /dev/null 2>&1
  # One transport per call (each at most 10 minutes); rows are printed and the JSON written as each check
  # finishes; --verbose shows the actors' logs; a short refit timeout so that a stall is reported, not waited.
  t=zmq; [ "$1" = check-broadcast ] && t=broadcast && export NCCL_DEBUG=WARN
  timeout 540 python -m colocate.check /tmp/qwen-random /tmp/moe-small --refit --device cuda --transport $t \
    --timeout-s 45 --verbose --json "$OUT/check_cuda_$t.json" > "$OUT/check_cuda_$t.log" 2>&1
  echo "check exit code: $?" >> "$OUT/check_cuda_$t.log"
  grep -E "^  (ok|MISMATCH|skipped)|^/tmp|^\[|exit code|cannot" "$OUT/check_cuda_$t.log"
else
  timeout 360 python -m colocate.bench.refit --device cuda --model qwen3-30b-a3b-12l --repeats 10 \
    --json "$OUT/bench_moe.json" > "$OUT/bench_moe.log" 2>&1
  tail -12 "$OUT/bench_moe.log"
  timeout 200 python -m pytest -m gpu -q -rs --tb=short tests/test_refit_gpu.py > "$OUT/gpu_tests.log" 2>&1
  tail -5 "$OUT/gpu_tests.log"
fi
