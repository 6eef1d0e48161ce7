"""`MegatronPolicyWorker` on 2 GPUs (megatron-core 0.19.2, NCCL), two ranks spawned without Ray or torchrun:
TP=2 in fp32, then PP=2 in bf16, on a tiny Qwen2 (tied embeddings, qkv biases, GQA) built here.

Checks: logits equal HF transformers' on the same weights (fp32: to rounding; bf16: loosely); `iter_weights`
gives back the checkpoint's tensors bit for bit before any step; one `train_step` runs and changes the weights;
offload / onload restore every bit; `export_hf` writes what HF loads. Run on the device machine:

    source /tmp/devenv.sh && python -m pytest -m gpu -x -q tests/policy/test_megatron_gpu.py

Shape legend: B = sequences, T = tokens per sequence, V = vocabulary.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from colocate.models.tiny import build_tiny_model
from colocate.policy.megatron.preflight import unavailable_reason

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(unavailable_reason("cuda") is not None, reason=str(unavailable_reason("cuda"))),
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]
B, T, PAD = 4, 16, 4  # the last row is left-padded by PAD tokens


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _batch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    input_ids_BT = torch.randint(3, 512, (B, T), generator=gen)
    attention_mask_BT = torch.ones(B, T, dtype=torch.long)
    attention_mask_BT[-1, :PAD] = 0
    return input_ids_BT.to(device), attention_mask_BT.to(device)


def _hf_logits(model_path: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    input_ids_BT, attention_mask_BT = _batch(device)
    position_ids_BT = (attention_mask_BT.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=input_ids_BT, attention_mask=attention_mask_BT,
                     position_ids=position_ids_BT).logits.float()


def _megatron_logits(worker) -> torch.Tensor:
    """Full-vocabulary logits [B, T, V] on the last stage (None elsewhere): each tensor rank's slice gathered."""
    import torch.distributed as dist

    input_ids_BT, attention_mask_BT = _batch(worker.device)
    worker.model.eval()
    if worker.pp > 1:  # run the real pipeline schedule and keep the last stage's logits
        collected = worker._run([{"input_ids": input_ids_BT, "attention_mask": attention_mask_BT}],
                                lambda batch, logits, non_loss_data=True: logits.float(), forward_only=True)
        return collected[0] if collected else None
    with torch.no_grad():
        local_BTV = worker._forward(worker.model, input_ids_BT, attention_mask_BT).float().contiguous()
    parts = [torch.empty_like(local_BTV) for _ in range(worker.tp)]
    dist.all_gather(parts, local_BTV, group=worker.tp_group)
    return torch.cat(parts, dim=-1)


def _run(rank: int, model_path: str, port: int, out_dir: str, tp: int, pp: int, param_dtype: str) -> None:
    from safetensors.torch import load_file

    from colocate.policy.megatron.worker import MegatronPolicyWorker

    worker = MegatronPolicyWorker(model_path=model_path, rank=rank, world_size=2, master_addr="127.0.0.1",
                                  master_port=port, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                  param_dtype=param_dtype, lr=1e-3, micro_batch_size=2)
    dtype = worker.param_dtype
    try:
        # 1. Weights out before any step: the checkpoint's tensors, in the checkpoint's names, bit for bit.
        want = {k: v.to(dtype) for k, v in load_file(f"{model_path}/model.safetensors").items()}
        got = {name: t.cpu() for name, t in worker.iter_weights(dtype)}
        assert set(got) == set(want), (sorted(set(got) ^ set(want)))
        assert [n for n, _, _ in worker.weights_manifest(dtype)] == list(got)
        diff = [n for n in want if not torch.equal(got[n], want[n])]
        assert not diff, f"rank {rank}: iter_weights differs from the checkpoint for {diff[:5]} (of {len(diff)})"

        # 2. Logits against HF on the same weights (compared where the query is a real token).
        logits_BTV = _megatron_logits(worker)
        if logits_BTV is not None:
            ref_BTV = _hf_logits(model_path, worker.device, dtype)
            _, mask_BT = _batch(worker.device)
            err = (logits_BTV - ref_BTV).abs()[mask_BT.bool()].max().item()
            scale = ref_BTV.abs().max().item()
            tol = 1e-3 * max(scale, 1.0) if dtype == torch.float32 else 0.05 * max(scale, 1.0)
            assert err <= tol, f"rank {rank} tp={tp} pp={pp} {param_dtype}: max |logit - HF| {err:.3g} > {tol:.3g}"

        # 3. One GRPO step runs and moves the weights.
        input_ids_BT, attention_mask_BT = (t.cpu() for t in _batch(worker.device))
        response_mask_BT = attention_mask_BT.clone()
        response_mask_BT[:, : T // 2] = 0
        old_BT = worker.logprobs(input_ids_BT, attention_mask_BT)
        assert old_BT.shape == (B, T) and torch.isfinite(old_BT).all()
        metrics = worker.train_step({"input_ids": input_ids_BT, "attention_mask": attention_mask_BT,
                                     "response_mask": response_mask_BT, "old_logprobs": old_BT,
                                     "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5])})
        assert metrics["skipped"] == 0.0 and metrics["grad_norm"] > 0, metrics
        assert metrics["tokens"] == float(response_mask_BT.sum()), metrics  # global count, every rank
        after = {name: t.cpu() for name, t in worker.iter_weights(dtype)}
        moved = [n for n in after if not torch.equal(after[n], got[n])]
        assert len(moved) >= len(after) // 2, f"rank {rank}: only {len(moved)} of {len(after)} tensors changed"

        # 4. Offload and onload keep every bit; the step after still runs.
        worker.offload(include_params=True)
        with pytest.raises(RuntimeError, match="onload"):
            next(iter(worker.iter_weights(dtype)))
        worker.onload()
        again = {name: t.cpu() for name, t in worker.iter_weights(dtype)}
        assert all(torch.equal(again[n], after[n]) for n in after), f"rank {rank}: onload changed weights"

        # 5. An HF export that transformers loads, with the streamed weights.
        worker.export_hf(f"{out_dir}/hf", dtype=dtype)
        if rank == 0:
            exported = load_file(f"{out_dir}/hf/model.safetensors")
            assert set(exported) == set(again) and all(torch.equal(exported[n], again[n]) for n in again)
    finally:
        worker.shutdown()


@pytest.mark.parametrize(("tp", "pp", "param_dtype"), [(2, 1, "float32"), (1, 2, "bfloat16")])
def test_megatron_policy_on_two_gpus(tmp_path: Path, tp: int, pp: int, param_dtype: str) -> None:
    path = build_tiny_model(tmp_path / "model", arch="qwen2", tie_word_embeddings=True, num_layers=2,
                            hidden_size=128, num_heads=4, num_kv_heads=2)
    torch.multiprocessing.spawn(_run, args=(str(path), _free_port(), str(tmp_path), tp, pp, param_dtype), nprocs=2)
