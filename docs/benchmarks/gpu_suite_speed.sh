#!/usr/bin/env bash
# The GPU runs behind issue #15 (refit speed in training), #11's same-host A/B and #13's GPU recipe run: on one
# H200 (device kind nvidia-h200), from the repository root after the device install (../shared/device/README.md).
# Results go to $OUT. Modes (several per call share one deadline, BUDGET_S, default 540 s; a step that would get
# less than a minute is skipped and says so):
#   tests   the GPU tests of the refit (one-copy included) and of the in-training benchmark
#   bench   colocated bench, Qwen2.5-1.5B then Llama-3-8B shapes (one-copy default, buffered, vLLM's, floors;
#           BENCH_MODELS="qwen2.5-1.5b" runs one)
#   train   the in-training bench: a one-rank FSDP2 policy on Qwen2.5-1.5B shapes (random weights)
#   ab      #11: the same colocated (and, on 2 GPUs, split) rows from the code before the refit layer's move
#           (.ab/old = e9aebc6: mkdir -p .ab/old && git archive e9aebc6 colocate | tar -x -C .ab/old)
#   grpo    3 steps of +recipe=grpo_gpu on Qwen2.5-1.5B shapes (the in-training refit from the run's metrics)
#   verify  3 steps of +recipe=grpo_gpu on Qwen2.5-1.5B shapes that check themselves (VERIFY in gpu_common.sh):
#           every refit's engine against HF transformers on the policy's weights
#   train2  2 GPUs, #15: the in-training bench over 2 ranks: FSDP2 over 2 GPUs (Llama-3-8B shapes) into 2 colocated
#           engines, beside one all-gather + copy (colocate.bench.refit_ranks --engines 2 --engine-tp 1)
#   grpo8b  2 GPUs: 3 steps of +recipe=grpo_gpu on Llama-3-8B shapes, FSDP2 over 2 ranks with 2 colocated engines
#           (#15's 2-GPU in-training refit, goal <= 40 ms); random bf16 weights drawn on the GPU first
#   tp      2 GPUs, #14: FSDP2 over 2 GPUs with one TP=2 vLLM engine colocated: colocate.check (greedy vs HF
#           after a refit of perturbed weights), then the TP refit bench on Llama-3-8B shapes (shard-sliced,
#           whole, in place, floors: colocate.bench.refit_ranks)
#   tptrain 2 GPUs, #14/#15: the TP refit bench in training, an FSDP2 policy over 2 GPUs (Qwen2.5-1.5B shapes)
#           into one TP=2 engine: shard-sliced, whole, floor (one all-gather + the slices copied out)
#   tpgrpo  2 GPUs, #14: 3 GRPO steps with one TP=2 engine beside FSDP2 over 2 GPUs, shard-sliced then whole
#   math    3 steps of +recipe=grpo_math on the GSM8K fixture (#13); needs math-verify: carry .devpkgs/extra
#           (wheels from `pip download --no-deps -d .devpkgs/extra math-verify latex2sympy2_extended`;
#           the bundle's antlr4 4.9.3 serves both it and omegaconf; .devpkgs/ is not in git), installed when present
#   kl      #13's reference KL cost: 3 steps of +recipe=grpo_gpu with policy.kl_coef=0.05 (reference_gb,
#           policy_peak_gb, reference_s in its metrics) beside the same run without it
set -u
source /tmp/devenv.sh
OUT=${OUT:-/tmp/colocate-gpu}; mkdir -p "$OUT"
DEADLINE=$((SECONDS + ${BUDGET_S:-540}))
MODEL=/tmp/qwen-random
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/device.txt"

source "$(dirname "$0")/gpu_common.sh"  # bounded, weights, step_metrics

[ $# -gt 0 ] || { echo "usage: $0 tests|bench|train|train2|ab|grpo|verify|grpo8b|tp|tptrain|tpgrpo|math|kl [...]"; exit 2; }
for mode in "$@"; do
  case $mode in
  tests)
    bounded 400 "$OUT/gpu_tests.log" python -m pytest -m gpu -q -rs --tb=short tests/test_refit_gpu.py
    tail -6 "$OUT/gpu_tests.log"
    ;;
  bench)
    for m in ${BENCH_MODELS:-qwen2.5-1.5b llama3-8b}; do
      bounded 220 "$OUT/refit_$m.log" python -m colocate.bench.refit --device cuda --model $m --repeats 20 \
        --json "$OUT/refit_$m.json"
      grep -A14 "median of" "$OUT/refit_$m.log"
    done
    ;;
  train)
    weights
    bounded 300 "$OUT/training_qwen2.5-1.5b.log" python -m colocate.bench.refit --device cuda --model $MODEL \
      --policy fsdp2 --repeats 20 --json "$OUT/training_qwen2.5-1.5b.json"
    grep -A8 "median of" "$OUT/training_qwen2.5-1.5b.log"
    ;;
  ab)
    for m in qwen2.5-1.5b llama3-8b; do
      # old `colocate` is today's `colocate_buffered` (the path the move kept). `python -m` puts the working
      # directory first on sys.path: the old side runs from inside .ab/old, or it would run this code.
      for side in old new; do
        dir=$PWD; methods=colocate_buffered,colocate,floor,floor_pack_unpack
        [ $side = old ] && dir=$PWD/.ab/old && methods=colocate,floor,floor_pack_unpack
        (cd "$dir" && bounded 150 "$OUT/ab_${side}_$m.log" python -m colocate.bench.refit --device cuda \
          --model $m --repeats 20 --methods $methods --json "$OUT/ab_${side}_$m.json")
        grep -A5 "median of" "$OUT/ab_${side}_$m.log"
      done
    done
    if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then  # the split bench, one receiver GPU
      for side in old new; do
        dir=$PWD; [ $side = old ] && dir=$PWD/.ab/old
        (cd "$dir" && bounded 150 "$OUT/ab_${side}_split.log" python -m colocate.bench.split --device cuda \
          --model llama3-8b --receivers 1 --repeats 10 --json "$OUT/ab_${side}_split.json")
        grep -A6 "median of" "$OUT/ab_${side}_split.log"
      done
    fi
    ;;
  grpo)
    weights
    bounded 300 "$OUT/grpo_gpu.log" python -m colocate.run +recipe=grpo_gpu model.path=$MODEL \
      placement.ray_address=local algorithm.steps=3 algorithm.prompts_per_step=16 algorithm.max_new_tokens=256 \
      logging.progress=false hydra.run.dir="$OUT/grpo_gpu"
    grep -hE "Error|error:" "$OUT/grpo_gpu.log" | tail -4
    step_metrics "$OUT/grpo_gpu/metrics.jsonl"
    ;;
  verify)
    weights
    bounded 300 "$OUT/grpo_verify.log" python -m colocate.run +recipe=grpo_gpu model.path=$MODEL "${VERIFY[@]}" \
      placement.ray_address=local algorithm.steps=3 algorithm.prompts_per_step=16 algorithm.max_new_tokens=256 \
      logging.progress=false hydra.run.dir="$OUT/grpo_verify"
    grep -hE "Error|error:" "$OUT/grpo_verify.log" | tail -4
    step_metrics "$OUT/grpo_verify/metrics.jsonl"  # step, step_s and every refit_* part
    step_metrics "$OUT/grpo_verify/metrics.jsonl" step reward_std grad_norm verify_prompts verify_greedy_equal \
      verify_near_ties verify_max_logprob_diff verify_s
    ;;
  tp)
    weights
    bounded 320 "$OUT/check_engine_tp2.log" python -m colocate.check $MODEL --refit --device cuda --transport zmq \
      --workers 2 --engine-tp 2 --dtype bfloat16 --timeout-s 60 --verbose --json "$OUT/check_engine_tp2.json"
    grep -E "^  (ok|MISMATCH|skipped)|^\[|cannot|Error" "$OUT/check_engine_tp2.log" | grep -v Warning | tail -8
    bounded 300 "$OUT/refit_tp2_llama3-8b.log" python -m colocate.bench.refit_ranks --device cuda --model llama3-8b \
      --engine-tp 2 --repeats 20 --json "$OUT/refit_tp2_llama3-8b.json"
    grep -A8 "median of" "$OUT/refit_tp2_llama3-8b.log"
    ;;
  tptrain)
    weights
    bounded 300 "$OUT/training_tp2_qwen2.5-1.5b.log" python -m colocate.bench.refit_ranks --device cuda --model $MODEL \
      --engine-tp 2 --policy fsdp2 --repeats 20 --json "$OUT/training_tp2_qwen2.5-1.5b.json"
    grep -A6 "median of" "$OUT/training_tp2_qwen2.5-1.5b.log"
    ;;
  tpgrpo)
    weights
    for sliced in true false; do
      bounded 260 "$OUT/grpo_engine_tp2_$sliced.log" python -m colocate.run +recipe=grpo_gpu model.path=$MODEL \
        placement.ray_address=local placement.policy_workers=2 placement.generation_workers=1 \
        generation.tensor_parallel_size=2 refit.shard_slice=$sliced "${VERIFY[@]}" algorithm.steps=3 algorithm.prompts_per_step=16 \
        algorithm.max_new_tokens=256 logging.progress=false hydra.run.dir="$OUT/grpo_engine_tp2_$sliced"
      grep -hE "Error|error:" "$OUT/grpo_engine_tp2_$sliced.log" | tail -4
      step_metrics "$OUT/grpo_engine_tp2_$sliced/metrics.jsonl" step reward_std refit_ms refit_sent_mb refit_sliced \
        verify_prompts verify_greedy_equal verify_near_ties verify_max_logprob_diff
    done
    ;;
  train2)
    llama_weights
    bounded 420 "$OUT/training_2gpu_llama3-8b.log" python -m colocate.bench.refit_ranks --device cuda \
      --model /tmp/llama-random --engines 2 --engine-tp 1 --policy fsdp2 --methods policy,floor_gather \
      --repeats 10 --json "$OUT/training_2gpu_llama3-8b.json"
    grep -A5 "median of" "$OUT/training_2gpu_llama3-8b.log"
    ;;
  grpo8b)
    L=/tmp/llama-random
    llama_weights
    bounded 420 "$OUT/grpo_llama_2gpu.log" python -m colocate.run +recipe=grpo_gpu model.path=$L \
      placement.ray_address=local placement.policy_workers=2 placement.generation_workers=2 algorithm.steps=3 \
      algorithm.prompts_per_step=32 algorithm.max_new_tokens=256 generation.gpu_memory_utilization=0.25 \
      logging.progress=false hydra.run.dir="$OUT/grpo_llama_2gpu"
    grep -hE "Error|error:" "$OUT/grpo_llama_2gpu.log" | tail -4
    step_metrics "$OUT/grpo_llama_2gpu/metrics.jsonl"
    ;;
  math)
    weights
    if ! python -c "import math_verify" 2> /dev/null && ls .devpkgs/extra/*.whl > /dev/null 2>&1; then
      python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devpkgs/extra/*.whl
    fi
    bounded 300 "$OUT/grpo_math.log" python -m colocate.run +recipe=grpo_math model.path=$MODEL \
      data.path=$PWD/tests/fixtures/gsm8k_mini.jsonl data.val_fraction=0.2 placement.ray_address=local algorithm.steps=3 \
      algorithm.prompts_per_step=8 algorithm.max_new_tokens=256 algorithm.val_every=0 \
      algorithm.checkpoint_every=0 logging.progress=false hydra.run.dir="$OUT/grpo_math"
    grep -hE "Error|error:" "$OUT/grpo_math.log" | tail -4; tail -3 "$OUT/grpo_math/metrics.jsonl"
    ;;
  kl)
    weights
    for kl in 0.0 0.05; do
      bounded 240 "$OUT/grpo_kl$kl.log" python -m colocate.run +recipe=grpo_gpu model.path=$MODEL \
        placement.ray_address=local algorithm.steps=3 algorithm.prompts_per_step=16 algorithm.max_new_tokens=256 \
        policy.kl_coef=$kl logging.progress=false hydra.run.dir="$OUT/grpo_kl$kl"
      step_metrics "$OUT/grpo_kl$kl/metrics.jsonl" step step_s training_s reference_s reference_gb policy_peak_gb kl
    done
    ;;
  *) echo "unknown mode $mode"; exit 2 ;;
  esac
done
echo "done in $SECONDS s"
# The device tool brings back only a few files per call (8 in session 8): PACK=1 sends everything as one archive.
if [ "${PACK:-0}" = 1 ]; then
  (cd "$OUT" && tar czf /tmp/results.tgz --exclude=results.tgz . && find . -mindepth 1 -delete && mv /tmp/results.tgz .)
fi
