set -u
bash .devpkgs/p06/install.sh > /tmp/inst.log 2>&1; tail -1 /tmp/inst.log
source /tmp/devenv.sh
export BUDGET_S=${BUDGET_S:-560} BENCH_MODELS=llama3-8b
bash docs/benchmarks/gpu_suite_speed.sh grpo train
(timeout 150 python -m pytest -m gpu -q -rs --tb=short tests/policy/test_policy_gpu.py -k "resident or offload or bf16" > $OUT/policy_gpu_tests.log 2>&1; echo "exit $?" >> $OUT/policy_gpu_tests.log); tail -3 $OUT/policy_gpu_tests.log
BUDGET_S=$((BUDGET_S - SECONDS)) bash docs/benchmarks/gpu_suite_speed.sh bench
cd $OUT && for d in grpo_gpu; do [ -d $d ] && tar czf $d.tgz $d && rm -rf $d; done; ls $OUT
