"""`policy=megatron` is refused before anything starts where it cannot run, and its parallel sizes are checked
against the placement and the model before Ray starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from colocate.config import ROOT, ConfigError, PolicyConfig, check_policy_parallel
from colocate.models.tiny import build_tiny_model
from colocate.policy.megatron.errors import MegatronLayoutError, MegatronModelError
from colocate.policy.megatron.preflight import check_model_layout, unavailable_reason

HAVE_MEGATRON_AND_CUDA = unavailable_reason("cuda") is None


@pytest.mark.skipif(HAVE_MEGATRON_AND_CUDA, reason="megatron-core and CUDA are both here: nothing to refuse")
def test_run_without_megatron_or_cuda_exits_fast_with_the_named_error(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HYDRA_FULL_ERROR="0")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "colocate.run", "+recipe=grpo", "policy=megatron", f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "MegatronUnavailableError" in proc.stderr, proc.stderr
    assert elapsed < 10.0  # the bound: refused before any model is built or Ray starts
    assert not (tmp_path / "tiny-model").exists()


@pytest.mark.parametrize(("backend", "tp", "pp", "workers", "match"), [
    ("fsdp2", 1, 1, 3, None),
    ("megatron", 2, 1, 4, None),
    ("megatron", 2, 2, 4, None),
    ("megatron", 2, 2, 2, "not a multiple"),
    ("megatron", 3, 1, 4, "not a multiple"),
    ("fsdp2", 2, 1, 2, "use policy=megatron"),
    ("deepspeed", 1, 1, 1, "policy.backend"),
])
def test_backend_and_parallel_sizes(backend: str, tp: int, pp: int, workers: int, match: str | None) -> None:
    pol = PolicyConfig(backend=backend, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    if match is None:
        check_policy_parallel(pol, workers)
        return
    with pytest.raises(ConfigError, match=match):
        check_policy_parallel(pol, workers)


def test_model_layout_is_checked_against_the_checkpoint(tmp_path: Path) -> None:
    # 4 heads, 2 kv heads, MLP 256, vocab 512, 2 layers
    path = str(build_tiny_model(tmp_path / "qwen2", arch="qwen2", tie_word_embeddings=True))
    check_model_layout(path, tp_size=2, pp_size=2, world_size=4)
    check_model_layout(path, tp_size=4, pp_size=1, world_size=4)  # 2 kv heads over 4 ranks: allowed
    with pytest.raises(MegatronLayoutError) as err:
        check_model_layout(path, tp_size=8, pp_size=1, world_size=8)
    assert err.value.field == "num_attention_heads"
    with pytest.raises(MegatronLayoutError) as err:
        check_model_layout(path, tp_size=1, pp_size=4, world_size=4)
    assert err.value.field == "num_hidden_layers"
    gemma = str(build_tiny_model(tmp_path / "gemma", arch="gemma"))
    with pytest.raises(MegatronModelError, match="model_type"):
        check_model_layout(gemma, tp_size=1, pp_size=1, world_size=1)
