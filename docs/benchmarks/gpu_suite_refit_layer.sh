#!/usr/bin/env bash
# The GPU runs behind docs/benchmarks/2026-11-30-refit-layer-h200x2 (issue #11's "must show" 3: the benches
# no slower after the refit layer's move): on 2 H200s (device kind nvidia-h200-x2), from the repository root
# after the device install (../shared/device/README.md). Results go to $OUT; each mode is one device call.
#   bash docs/benchmarks/gpu_suite_refit_layer.sh bench   # colocated (Qwen2.5-1.5B, Llama-3-8B) + split bench
#   bash docs/benchmarks/gpu_suite_refit_layer.sh tests   # the GPU tests of the refit and the engines
set -u
source /tmp/devenv.sh
OUT=${OUT:-/tmp/colocate-gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/device.txt"
if [ "$1" = bench ]; then
  for m in qwen2.5-1.5b llama3-8b; do
    timeout 200 python -m colocate.bench.refit --device cuda --model $m --repeats 20 \
      --json "$OUT/refit_$m.json" > "$OUT/refit_$m.log" 2>&1; echo "refit $m exit $?" >> "$OUT/exits.txt"
    tail -8 "$OUT/refit_$m.log"
  done
  timeout 200 python -m colocate.bench.split --device cuda --model llama3-8b --receivers 1 --repeats 10 \
    --json "$OUT/split_llama3-8b.json" > "$OUT/split_llama3-8b.log" 2>&1; echo "split exit $?" >> "$OUT/exits.txt"
  tail -8 "$OUT/split_llama3-8b.log"; cat "$OUT/exits.txt"
else
  timeout 500 python -m pytest -m gpu -q -rs --tb=short tests/test_refit_gpu.py tests/generation/test_gpu.py \
    tests/policy/test_policy_gpu.py > "$OUT/gpu_tests.log" 2>&1
  tail -15 "$OUT/gpu_tests.log"
fi
