"""One `PolicyWorker` on a GPU (world size 1, NCCL, bf16 compute): offload really frees the GPU and onload
restores every bit. Skipped without CUDA; run on the device machine with `pytest -m gpu tests/policy`.

Shape legend: B = sequences, T = tokens per sequence.
"""

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from colocate.models.tiny import build_tiny_model
from colocate.policy.worker import PolicyWorker

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyWorker]:
    path: Path = build_tiny_model(tmp_path_factory.mktemp("tiny_gpu"), tie_word_embeddings=True)
    w = PolicyWorker(
        model_path=str(path),
        rank=0,
        world_size=1,
        master_addr="127.0.0.1",
        master_port=_free_port(),
        device="cuda",
        param_dtype="bfloat16",
        lr=1e-5,
        micro_batch_size=2,
    )
    yield w
    w.shutdown()


def _batch(worker: PolicyWorker) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    input_ids_BT = torch.randint(3, 512, (4, 16), generator=gen)
    attention_mask_BT = torch.ones(4, 16, dtype=torch.long)
    response_mask_BT = attention_mask_BT.clone()
    response_mask_BT[:, :8] = 0
    return {
        "input_ids": input_ids_BT,
        "attention_mask": attention_mask_BT,
        "response_mask": response_mask_BT,
        "old_logprobs": worker.logprobs(input_ids_BT, attention_mask_BT),
        "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5]),
    }


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _optimizer_state(worker: PolicyWorker) -> list[torch.Tensor]:
    return [
        _local(value).cpu().clone()
        for state in worker.optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    ]


def _device_bytes(worker: PolicyWorker) -> int:
    """Bytes of this rank's parameter shards and optimizer state that sit on the GPU."""
    tensors = [_local(p) for p in worker.model.parameters()] + [
        _local(v) for s in worker.optimizer.state.values() for v in s.values() if torch.is_tensor(v)
    ]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cuda")


def test_offload_frees_the_gpu_and_onload_restores_every_bit(worker: PolicyWorker) -> None:
    batch = _batch(worker)
    metrics = worker.train_step(batch)
    assert metrics["skipped"] == 0.0 and metrics["grad_norm"] > 0
    weights = {name: tensor.cpu() for name, tensor in worker.iter_weights()}
    optim = _optimizer_state(worker)
    torch.cuda.synchronize()
    held, owned = torch.cuda.memory_allocated(), _device_bytes(worker)
    assert owned > 0

    worker.offload(include_params=True)
    # The rest of the allocation (cuBLAS workspaces, ~32 MiB a stream on Hopper) is not the policy's.
    assert _device_bytes(worker) == 0
    assert held - torch.cuda.memory_allocated() >= owned, (held, owned, torch.cuda.memory_allocated())
    with pytest.raises(RuntimeError, match="onload"):
        worker.train_step(batch)

    worker.onload()
    assert _device_bytes(worker) == owned
    after = {name: tensor.cpu() for name, tensor in worker.iter_weights()}
    assert list(after) == list(weights)
    assert all(torch.equal(after[name], weights[name]) for name in weights)
    assert all(torch.equal(a, b) for a, b in zip(_optimizer_state(worker), optim, strict=True))
    # AdamW keeps its step counters on CPU; onload must leave them there.
    steps = [s["step"] for s in worker.optimizer.state.values()]
    assert all(s.device.type == "cpu" for s in steps)
    assert worker.train_step(batch)["skipped"] == 0.0


def test_resident_weights_are_kept_while_the_parameters_stay_put(worker: PolicyWorker) -> None:
    """The one-copy refit's list of weights in place is worked out once and kept while every parameter
    stays where it was: an optimizer step (in place) shows through it; an offload drops it (it would hold
    the GPU memory), and after the onload it is found again at the parameters' new addresses."""
    first = worker.resident_weights(torch.float32)
    assert first is not None and worker.resident_weights(torch.float32) is first
    before = {n: t.clone() for n, t in first}
    worker.train_step(_batch(worker))
    assert worker.resident_weights(torch.float32) is first
    assert any(not torch.equal(t, before[n]) for n, t in first)  # the step shows through the kept views
    assert all(torch.equal(t, w.float()) for (n, t), (m, w) in zip(first, worker.iter_weights(), strict=True)
               if n == m)
    worker.offload(include_params=True)
    assert "_colocate_resident" not in worker.model.__dict__
    worker.onload()
    again = worker.resident_weights(torch.float32)
    assert again is not None and again is not first
    assert [n for n, _ in again] == [n for n, _ in first]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(again, first, strict=True))


def test_bf16_streaming_and_free_memory(worker: PolicyWorker) -> None:
    streamed = list(worker.iter_weights(torch.bfloat16))
    assert {t.dtype for _, t in streamed} == {torch.bfloat16}
    assert all(t.device.type == "cuda" for _, t in streamed)
    assert "lm_head.weight" not in dict(streamed)
    free, _ = torch.cuda.mem_get_info()
    assert worker.free_device_memory_bytes() == pytest.approx(free, rel=0.05)


def _two_rank_run(rank: int, model_path: str, port: int, out_dir: str) -> None:
    worker = PolicyWorker(
        model_path=model_path,
        rank=rank,
        world_size=2,
        master_addr="127.0.0.1",
        master_port=port,
        device="cuda",
        param_dtype="bfloat16",
        lr=1e-5,
        micro_batch_size=1,
    )
    try:
        full = _batch(worker)  # every rank builds the same batch and keeps its half
        share = {key: value[2 * rank : 2 * rank + 2] for key, value in full.items()}
        share["old_logprobs"] = worker.logprobs(share["input_ids"], share["attention_mask"])
        worker.train_step(share)
        worker.offload(include_params=True)
        worker.onload()
        worker.save_checkpoint(f"{out_dir}/ckpt")
        want = worker.train_step(share)
        worker.load_checkpoint(f"{out_dir}/ckpt")
        got = worker.train_step(share)
        for key, value in want.items():
            # bf16 kernels on GPU need not be bit-reproducible (atomics in attention backward).
            assert got[key] == pytest.approx(value, rel=1e-3, abs=1e-6), key
        names = [name for name, _ in worker.iter_weights(torch.bfloat16)]
        assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
        worker.export_hf(f"{out_dir}/hf", dtype=torch.bfloat16)
    finally:
        worker.shutdown()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_ranks_over_nccl(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path / "model", tie_word_embeddings=True)
    torch.multiprocessing.spawn(_two_rank_run, args=(str(path), _free_port(), str(tmp_path)), nprocs=2)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.architectures == ["Qwen2ForCausalLM"]
