"""`python -m colocate.check` with `--policy megatron --tp --pp --workers`, on CPU: what it can decide without
megatron-core or a GPU (the end-to-end refit with Megatron runs on the device: docs/benchmarks/gpu_suite_megatron.sh).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from colocate.check import main, policy_offer
from colocate.models.tiny import build_tiny_model
from colocate.policy.megatron.preflight import unavailable_reason

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"llama": dict(arch="llama", tie_word_embeddings=False), "llama-tied": dict(arch="llama"),
          "qwen2-tied": dict(arch="qwen2", tie_word_embeddings=True), "qwen3": dict(arch="qwen3")}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("check_policy")
    return {name: build_tiny_model(root / name, num_layers=2, **kw) for name, kw in MODELS.items()}


def _check(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "colocate.check", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_megatron_offer_is_the_fsdp2_offer(models: dict[str, Path], name: str) -> None:
    """What the Megatron worker's manifest promises is, name for name with shapes and dtypes, what FSDP2 streams
    (and so what the static check and `cluster.check_refit_exact` dry-run through vLLM's loader). The orders
    differ (FSDP2: the module's state_dict; Megatron: the conversion's walk); each worker's stream follows its
    own manifest, and the engines load by name."""
    for dtype in (torch.float32, torch.bfloat16):
        megatron, fsdp2 = policy_offer(str(models[name]), dtype, "megatron"), policy_offer(str(models[name]), dtype)
        assert sorted(megatron) == sorted(fsdp2) and len(megatron) == len(fsdp2)


@pytest.mark.parametrize(("args", "message"), [
    (["--tp", "2", "--workers", "2"], "use policy=megatron"),
    (["--policy", "megatron", "--tp", "2", "--workers", "3"], "--workers=3 is not a multiple"),
    (["--policy", "megatron", "--pp", "2"], "--workers=1 is not a multiple"),
    (["--policy", "megatron", "--dtype", "float16"], "float32 or bfloat16"),
    (["--workers", "0"], ">= 1"),
])
def test_policy_options_are_judged_before_anything_runs(models: dict[str, Path], args: list[str], message: str,
                                                        capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([str(models["qwen2-tied"]), "--refit", *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(unavailable_reason("cuda") is None, reason="megatron-core and CUDA are both here")
def test_a_megatron_refit_without_megatron_or_cuda_exits_2_before_ray(models: dict[str, Path]) -> None:
    start = time.monotonic()
    out = _check(str(models["qwen2-tied"]), "--refit", "--policy", "megatron", "--tp", "2", "--workers", "2",
                 timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().count("\n") == 0 and "MegatronUnavailableError" in out.stderr, out.stderr
    assert "Ray instance" not in out.stdout + out.stderr
    assert time.monotonic() - start < 60


def test_the_static_check_of_the_megatron_offer_passes(models: dict[str, Path], tmp_path: Path) -> None:
    report = tmp_path / "static.json"
    out = _check(str(models["qwen2-tied"]), str(models["llama"]), "--policy", "megatron", "--tp", "2",
                 "--workers", "2", "--json", str(report), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(report.read_text())[str(models[n])]["rows"] for n in ("qwen2-tied", "llama")]
    assert all(len(r) == 1 and r[0]["ok"] and "every one of" in r[0]["detail"] for r in rows), rows
