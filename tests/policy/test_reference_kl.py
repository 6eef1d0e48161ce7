"""The KL term's reference policy: two FSDP2 ranks (gloo, Ray actors) built with `reference=True` hold the
initial weights frozen; after the policy moves, `kl` is non-zero and the loss is pg_loss + kl_coef * kl.

Shape legend: B = sequences, T = tokens per sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from colocate.models.tiny import build_tiny_model
from colocate.policy.group import PolicyGroup

pytestmark = pytest.mark.slow

B, T, PROMPT, KL_COEF = 4, 12, 6, 0.5


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=3)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def param_dtype(request: pytest.FixtureRequest) -> str:
    """The policy's compute dtype (its master weights are fp32 either way); the reference is kept in it."""
    return request.param


@pytest.fixture(scope="module")
def group(param_dtype: str, model_path: Path) -> Iterator[PolicyGroup]:
    # A private instance, never a Ray cluster already running on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    g = PolicyGroup(num_workers=2, num_cpus_per_worker=0.5, env_vars={"OMP_NUM_THREADS": "1"}, call_timeout_s=120,
                    model_path=str(model_path), device="cpu", param_dtype=param_dtype, lr=1e-3,
                    micro_batch_size=2, kl_coef=KL_COEF, reference=True, seed=0)
    yield g
    g.shutdown()
    ray.shutdown()


def test_reference_is_frozen_and_kl_enters_the_loss(group: PolicyGroup, model_path: Path, param_dtype: str) -> None:
    gen = torch.Generator().manual_seed(0)
    ids_BT = torch.randint(3, 512, (B, T), generator=gen)
    attn_BT = torch.ones(B, T, dtype=torch.long)
    resp_BT = attn_BT.clone()
    resp_BT[:, :PROMPT] = 0
    initial_BT = group.logprobs(ids_BT, attn_BT)
    ref_BT = group.reference_logprobs(ids_BT, attn_BT)
    assert torch.equal(ref_BT, initial_BT)  # the reference is the initial weights

    def step() -> dict[str, float]:
        old_BT = group.logprobs(ids_BT, attn_BT)
        return group.train_step({"input_ids": ids_BT, "attention_mask": attn_BT, "response_mask": resp_BT,
                                 "old_logprobs": old_BT, "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5]),
                                 "ref_logprobs": group.reference_logprobs(ids_BT, attn_BT)})

    first = step()
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)  # policy == reference before any update
    second = step()
    assert second["kl"] > 1e-6
    assert second["loss"] == pytest.approx(second["pg_loss"] + KL_COEF * second["kl"], rel=1e-4)
    # Its memory: this rank's shards of the frozen weights in the compute dtype: half the model per rank.
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_path).parameters())
    assert second["reference_gb"] == pytest.approx(n_params * getattr(torch, param_dtype).itemsize / 2 / 1e9, rel=0.02)
    assert not torch.equal(group.logprobs(ids_BT, attn_BT), initial_BT)  # the policy moved ...
    assert torch.equal(group.reference_logprobs(ids_BT, attn_BT), ref_BT)  # ... the reference did not
