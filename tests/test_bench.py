"""The benchmarks run end to end on CPU and every method they time delivers the right weights.

Timings are printed by the benchmarks, never asserted; what is asserted is `correct` (the engine's
parameters equal what was sent) for each method that runs here (vLLM's own transfers need CUDA).
"""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("bench, extra", [("refit", []), ("split", ["--receivers", "1"])])
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
