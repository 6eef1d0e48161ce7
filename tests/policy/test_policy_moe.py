"""The FSDP2 policy on MoE models (Qwen3-MoE, Mixtral; one rank, gloo): HF's log-probabilities, a GRPO step that
trains the router and the experts, and a stream of weights in the checkpoint's own names and layout.

Shape legend: B = sequences, T = tokens per sequence.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from colocate.models.tiny import build_tiny_model
from colocate.policy.worker import PolicyWorker


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def moe(request, tmp_path_factory) -> Iterator[tuple[Path, PolicyWorker]]:
    torch.set_num_threads(1)
    path = build_tiny_model(tmp_path_factory.mktemp(request.param), arch=request.param, seed=0)
    worker = PolicyWorker(model_path=str(path), rank=0, world_size=1, master_addr="127.0.0.1",
                          master_port=_free_port(), device="cpu", param_dtype="float32", lr=1e-2,
                          micro_batch_size=4)
    yield path, worker
    worker.shutdown()


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    input_ids_BT = torch.randint(3, 512, (4, 12), generator=gen)
    mask_BT = torch.ones(4, 12, dtype=torch.long)
    return {"input_ids": input_ids_BT, "attention_mask": mask_BT, "response_mask": mask_BT,
            "old_logprobs": torch.zeros(4, 12), "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5])}


def test_moe_policy_matches_hf_trains_router_and_experts_and_streams_the_checkpoint(moe):
    path, worker = moe
    batch = _batch()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logits_BTV = hf(input_ids=batch["input_ids"]).logits
    want_BT = torch.log_softmax(logits_BTV[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    got_BT = worker.logprobs(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(got_BT[:, 1:], want_BT, atol=1e-5, rtol=1e-5)

    checkpoint = load_file(path / "model.safetensors")
    before = dict(worker.iter_weights(torch.float32))
    assert sorted(before) == sorted(checkpoint)  # per-expert names (Mixtral: block_sparse_moe.experts.E.w1)
    assert all(torch.equal(before[n], t) for n, t in checkpoint.items())

    batch["old_logprobs"] = got_BT
    metrics = worker.train_step(batch)
    assert metrics["skipped"] == 0.0 and metrics["grad_norm"] > 0
    after = dict(worker.iter_weights(torch.float32))
    changed = {n for n in checkpoint if not torch.equal(after[n], before[n])}
    router = [n for n in checkpoint if n.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight"))]
    experts = [n for n in checkpoint if ".experts." in n]
    assert router and set(router) <= changed  # routing is trained
    assert len(changed & set(experts)) > len(experts) // 2  # the experts the batch routed to
    assert [(n, tuple(t.shape), t.dtype) for n, t in after.items()] == worker.weights_manifest(torch.float32)
