"""One `PolicyWorker` in this process (world size 1, gloo): log-probabilities, weight streaming, offload.

The multi-rank behaviour is in test_policy_group.py; these are the single-rank facts that are cheaper to check
without Ray. Shape legend: B = sequences, T = tokens per sequence.
"""

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from colocate.models.tiny import build_tiny_model
from colocate.policy.worker import PolicyWorker


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_untied"), tie_word_embeddings=False, seed=1)


@pytest.fixture(scope="module")
def worker(model_path: Path) -> Iterator[PolicyWorker]:
    torch.set_num_threads(1)
    w = PolicyWorker(
        model_path=str(model_path),
        rank=0,
        world_size=1,
        master_addr="127.0.0.1",
        master_port=_free_port(),
        device="cpu",
        param_dtype="float32",
        lr=1e-3,
        micro_batch_size=2,
    )
    yield w
    w.shutdown()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, 512, (3, 10), generator=gen), torch.ones(3, 10, dtype=torch.long)


def test_logprobs_match_plain_hf_model(worker: PolicyWorker, model_path: Path) -> None:
    input_ids_BT, attention_mask_BT = _batch()
    got_BT = worker.logprobs(input_ids_BT, attention_mask_BT)
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.no_grad():
        logits_BTV = hf(input_ids=input_ids_BT).logits
    want_BT = torch.log_softmax(logits_BTV[:, :-1], -1).gather(-1, input_ids_BT[:, 1:, None]).squeeze(-1)
    assert got_BT.shape == (3, 10)
    assert (got_BT[:, 0] == 0).all()
    torch.testing.assert_close(got_BT[:, 1:], want_BT, atol=1e-5, rtol=1e-5)


def test_left_and_right_padding_agree(worker: PolicyWorker) -> None:
    input_ids_BT, _ = _batch()
    pad, n = 4, 6  # the first n tokens of each row, padded by `pad` on either side
    real_BT = input_ids_BT[:, :n]
    pads_BT = torch.full((3, pad), 2)
    ones_BT, zeros_BT = torch.ones(3, n, dtype=torch.long), torch.zeros(3, pad, dtype=torch.long)
    left_BT = worker.logprobs(torch.cat([pads_BT, real_BT], 1), torch.cat([zeros_BT, ones_BT], 1))
    right_BT = worker.logprobs(torch.cat([real_BT, pads_BT], 1), torch.cat([ones_BT, zeros_BT], 1))
    assert torch.isfinite(left_BT).all() and torch.isfinite(right_BT).all()
    # Column 0 of each real span has no prefix in the right-padded row; compare from the second token on.
    torch.testing.assert_close(left_BT[:, pad + 1 :], right_BT[:, 1:n], atol=1e-5, rtol=1e-5)


def test_iter_weights_equal_checkpoint_before_training(worker: PolicyWorker, model_path: Path) -> None:
    want = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).state_dict()
    got = dict(worker.iter_weights())
    assert list(got) == list(want)  # untied: lm_head is streamed too
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    manifest = worker.weights_manifest(torch.bfloat16)
    streamed = [(n, tuple(t.shape), t.dtype) for n, t in worker.iter_weights(torch.bfloat16)]
    assert manifest == streamed
    assert {d for _, _, d in manifest} == {torch.bfloat16}


def test_offload_state_is_tracked_on_cpu(worker: PolicyWorker) -> None:
    input_ids_BT, attention_mask_BT = _batch()
    batch = {
        "input_ids": input_ids_BT,
        "attention_mask": attention_mask_BT,
        "response_mask": attention_mask_BT,
        "old_logprobs": torch.zeros(3, 10),
        "advantages": torch.tensor([1.0, -1.0, 0.5]),
    }
    worker.offload(include_params=False)
    assert worker.is_offloaded() == {"params": False, "optimizer": True}
    worker.logprobs(input_ids_BT, attention_mask_BT)  # parameters are still here
    with pytest.raises(RuntimeError, match="onload"):
        worker.train_step(batch)
    worker.offload(include_params=True)
    with pytest.raises(RuntimeError, match="onload"):
        worker.logprobs(input_ids_BT, attention_mask_BT)
    worker.onload()
    assert worker.is_offloaded() == {"params": False, "optimizer": False}
    assert worker.train_step(batch)["step"] == 1.0


def test_export_hf_in_bfloat16(worker: PolicyWorker, tmp_path: Path) -> None:
    worker.export_hf(str(tmp_path / "hf"), dtype=torch.bfloat16)
    config = AutoConfig.from_pretrained(tmp_path / "hf")
    assert config.architectures == ["Qwen2ForCausalLM"]
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).state_dict()
    for name, tensor in worker.iter_weights(torch.bfloat16):
        assert torch.equal(loaded[name], tensor), name
