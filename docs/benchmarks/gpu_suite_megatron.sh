#!/usr/bin/env bash
# The GPU runs behind issue #12's "must show" 2 (Megatron-core policy backend): on 2 H200s (device kind
# nvidia-h200-x2), from the repository root after the device install (../shared/device/README.md). Results go
# to $OUT. Modes (one or several per call; they share one deadline, BUDGET_S, default 540 s, so that a call
# stays inside the 10-minute bound; a step that would get less than a minute is skipped and says so):
#   bash docs/benchmarks/gpu_suite_megatron.sh test    # tests/policy/test_megatron_gpu.py: TP=2 fp32, PP=2 bf16 (~2 min)
#   bash docs/benchmarks/gpu_suite_megatron.sh check   # colocate.check --refit --policy megatron: TP=2, then PP=2
#   bash docs/benchmarks/gpu_suite_megatron.sh grpo    # 3 GRPO steps colocated, FSDP2 then Megatron TP=2; compare.json
#   bash docs/benchmarks/gpu_suite_megatron.sh grpopp  # 3 GRPO steps colocated, Megatron PP=2, each refit checked
#                                                      # against HF (VERIFY in gpu_common.sh)
#   bash docs/benchmarks/gpu_suite_megatron.sh grpo1   # one H200: 3 GRPO steps colocated, Megatron TP=1 PP=1, each
#                                                      # refit checked against HF (VERIFY)
#   bash docs/benchmarks/gpu_suite_megatron.sh grpo1buf  # the same through the buffers (refit.one_copy=false)
#   bash docs/benchmarks/gpu_suite_megatron.sh bench1  # one H200: the in-training refit bench, a one-rank Megatron
#                                                      # policy (one copy from its parameters; buffered) then FSDP2's
#                                                      # (BENCH_POLICIES=megatron: only the first)
#   bash docs/benchmarks/gpu_suite_megatron.sh test check   # both in one call
# Qwen2.5-1.5B shapes with random weights, drawn on the GPU when /tmp/qwen-random is absent (~30 s).
set -u
source /tmp/devenv.sh
OUT=${OUT:-/tmp/colocate-gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
DEADLINE=$((SECONDS + ${BUDGET_S:-540}))
MODEL=/tmp/qwen-random
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/device.txt"

source "$(dirname "$0")/gpu_common.sh"  # bounded, weights, step_metrics

[ $# -gt 0 ] || { echo "usage: $0 test|check|grpo|grpopp|grpo1|grpo1buf|bench1 [...]"; exit 2; }
for mode in "$@"; do
  case $mode in
  test)
    bounded 420 "$OUT/test_megatron_gpu.log" python -m pytest -m gpu -x -q -rs --tb=short \
      tests/policy/test_megatron_gpu.py
    tail -4 "$OUT/test_megatron_gpu.log"
    ;;
  check)
    # Policy ranks = engines (colocated, ZMQ + CUDA IPC): each rank streams the gathered HF tensors to the engine
    # on its GPU; HF transformers runs on rank 0's export. fp32 (exactness, not bf16 rounding, is checked).
    weights
    for layout in "--tp 2" "--pp 2"; do
      name=check_megatron_$(echo "$layout" | tr -d ' -')
      bounded 270 "$OUT/$name.log" python -m colocate.check $MODEL --refit --device cuda --transport zmq \
        --policy megatron $layout --workers 2 --timeout-s 60 --verbose --json "$OUT/$name.json"
      grep -E "^  (ok|MISMATCH|skipped)|^\[|cannot|Error" "$OUT/$name.log" | grep -v Warning | tail -8
    done
    ;;
  grpo)
    # The GPU recipe (64 -> 32 prompts per step, to fit both runs in one call), both backends on the same
    # model, placement and settings; a private Ray instance each.
    weights
    common=(+recipe=grpo_gpu model.path=$MODEL placement.policy_workers=2 placement.generation_workers=2
            placement.ray_address=local algorithm.steps=3 algorithm.prompts_per_step=32 logging.progress=false)
    # FSDP2 first (the known quantity, ~2-3 min), so Megatron gets whatever time is left.
    bounded 210 "$OUT/grpo_fsdp2.log" python -m colocate.run "${common[@]}" hydra.run.dir="$OUT/grpo_fsdp2"
    bounded 360 "$OUT/grpo_megatron_tp2.log" python -m colocate.run "${common[@]}" policy=megatron \
      policy.tensor_parallel_size=2 hydra.run.dir="$OUT/grpo_megatron_tp2"
    python - "$OUT" <<'EOF'
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
keys = ("step_s", "refit_ms", "refit_gather_ms", "refit_pack_ms", "refit_wait_ms", "refit_load_ms", "training_s",
        "generation_s", "sleep_wake_s", "refit_share")
result = {}
for run in ("grpo_megatron_tp2", "grpo_fsdp2"):
    path = out / run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    steps = [r for r in rows if r.get("step", 0) >= 1 and "step_s" in r]
    later = steps[1:]  # step 1 carries the first refit's buffer set-up and IPC opening
    result[run] = {
        "steps": [{"step": r["step"], **{k: round(r[k], 4) for k in keys if k in r}} for r in steps],
        "median_steps_2_on": {k: round(statistics.median(r[k] for r in later), 4) for k in keys
                              if later and all(k in r for r in later)},
    }
(out / "compare.json").write_text(json.dumps(result, indent=1))
print(f"{'':20s}" + "".join(f"{k:>16s}" for k in ("refit_ms", "step_s", "training_s", "generation_s")))
for run, r in result.items():
    for s in r["steps"]:
        print(f"{run[5:]:13s} step {s['step']}" + "".join(
            f"{s.get(k, float('nan')):16.1f}" for k in ("refit_ms", "step_s", "training_s", "generation_s")))
EOF
    grep -hE "Error|error:" "$OUT"/grpo_*.log | grep -v -i warn | tail -6
    ;;
  grpo1|grpo1buf)
    # grpo1buf: the same with refit.one_copy=false (the buffered path: what tp > 1, pp > 1 or offload take)
    weights
    name=grpo_megatron_1gpu; extra=()
    [ "$mode" = grpo1buf ] && { name=grpo_megatron_1gpu_buffered; extra=(refit.one_copy=false); }
    bounded 330 "$OUT/$name.log" python -m colocate.run +recipe=grpo_gpu model.path=$MODEL \
      placement.ray_address=local algorithm.steps=3 algorithm.prompts_per_step=16 algorithm.max_new_tokens=256 \
      logging.progress=false policy=megatron "${VERIFY[@]}" "${extra[@]}" hydra.run.dir="$OUT/$name"
    grep -hE "Error|error:" "$OUT/$name.log" | tail -4
    step_metrics "$OUT/$name/metrics.jsonl"
    step_metrics "$OUT/$name/metrics.jsonl" step reward_std grad_norm verify_prompts \
      verify_greedy_equal verify_near_ties verify_max_logprob_diff verify_s
    ;;
  bench1)
    weights
    for policy in ${BENCH_POLICIES:-megatron fsdp2}; do
      bounded 240 "$OUT/training_$policy.log" python -m colocate.bench.refit --device cuda --model $MODEL \
        --policy $policy --repeats 20 --json "$OUT/training_$policy.json"
      grep -A8 "median of" "$OUT/training_$policy.log"
    done
    ;;
  grpopp)
    weights
    bounded 400 "$OUT/grpo_megatron_pp2.log" python -m colocate.run +recipe=grpo_gpu model.path=$MODEL \
      placement.policy_workers=2 placement.generation_workers=2 placement.ray_address=local algorithm.steps=3 \
      algorithm.prompts_per_step=32 logging.progress=false policy=megatron policy.pipeline_parallel_size=2 \
      "${VERIFY[@]}" hydra.run.dir="$OUT/grpo_megatron_pp2"
    grep -hE "Error|error:" "$OUT/grpo_megatron_pp2.log" | tail -4
    step_metrics "$OUT/grpo_megatron_pp2/metrics.jsonl" step step_s training_s generation_s refit_ms \
      refit_gather_ms refit_load_ms weight_version reward_std verify_prompts verify_greedy_equal verify_near_ties \
      verify_max_logprob_diff
    ;;
  *) echo "unknown mode $mode (test | check | grpo | grpopp | grpo1 | grpo1buf | bench1)"; exit 2 ;;
  esac
done
echo "done in $SECONDS s"
# The device tool brings back only a few files per call: PACK=1 sends everything as one archive.
if [ "${PACK:-0}" = 1 ]; then
  (cd "$OUT" && tar czf /tmp/results.tgz --exclude=results.tgz . && find . -mindepth 1 -delete && mv /tmp/results.tgz .)
fi
