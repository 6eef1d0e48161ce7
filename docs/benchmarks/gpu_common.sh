# Sourced by the gpu_suite_*.sh scripts (after DEADLINE, OUT and MODEL are set): their shared helpers.

# bounded CAP LOG CMD...: CMD with a timeout of min(CAP, time left - 15 s), output to LOG, its exit code at the
# end of LOG and on stdout. After a timeout, the Ray processes it left (actors holding GPU memory) are stopped.
bounded() {
  local cap=$1 log=$2; shift 2
  local t=$((DEADLINE - SECONDS - 15)); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 60 ]; then echo "skipped: only $t s left for: $*" | tee "$log"; return 0; fi
  echo "[$(date +%T)] $* (bound $t s)"
  timeout -k 10 "$t" "$@" > "$log" 2>&1
  local rc=$?
  echo "exit code: $rc (bound $t s, $SECONDS s into the call)" | tee -a "$log"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then python -m ray.scripts.scripts stop --force > /dev/null 2>&1; fi
  return 0
}

# Qwen2.5-1.5B shapes with random weights in $MODEL, drawn on the GPU when absent (~30 s).
weights() {
  [ -f $MODEL/config.json ] && return 0
  bounded 150 "$OUT/random_init.log" python -m colocate.models.random_init --shapes qwen2.5-1.5b --out $MODEL \
    --dtype float32 --device cuda
}

# Llama-3-8B shapes with random bf16 weights in /tmp/llama-random, drawn on the GPU when absent.
llama_weights() {
  [ -f /tmp/llama-random/config.json ] && return 0
  bounded 240 "$OUT/random_init_llama.log" python -m colocate.models.random_init --shapes llama3-8b \
    --out /tmp/llama-random --dtype bfloat16 --device cuda
}

# step_metrics METRICS_JSONL [KEY...]: each GRPO step's KEYs (default: step, step_s and every refit_* key).
step_metrics() {
  python - "$@" <<'EOF'
import json, sys
path, keys = sys.argv[1], sys.argv[2:]
for line in open(path):
    r = json.loads(line)
    if r.get("step", 0) >= 1:
        print({k: round(v, 4) for k, v in r.items()
               if (k in keys if keys else k.startswith("refit") or k in ("step", "step_s"))})
EOF
}

# A GRPO run that checks itself: after every step's refit each engine decodes 4 held-out prompts greedily as HF
# transformers does on the policy's exported weights (refit.verify_every, RefitVerifyError otherwise). Random
# weights score 0 on the task, so a reward that varies between their samples and a learning rate whose steps
# show in bf16 make every refit carry changed weights.
VERIFY=(refit.verify_every=1 reward.fn=tests.reward_fns:text_length policy.lr=1e-3)
