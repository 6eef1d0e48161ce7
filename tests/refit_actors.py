"""Ray actors for the end-to-end refit tests: a vLLM engine that receives, and a sender holding a checkpoint.

They stand in for the generation and policy workers, with the same refit calls those make.
"""

from __future__ import annotations

import os
import time

import ray
import torch
from safetensors.torch import load_file

from colocate.refit.ipc.sender import RefitSender
from colocate.refit.plan import tensor_meta
from colocate.rendezvous import abort_check, device_key, get_rendezvous

EXT = "colocate.refit.engine_side.RefitExtension"


def _key(device: str) -> str:
    return device_key(ray.get_runtime_context().get_node_id(), *device.split(":", 1))


@ray.remote(num_cpus=0)
class EngineActor:
    def __init__(self, model: str, job: str, job_dir: str, token: str, timeout_s: float) -> None:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        from colocate.engine.vllm_engine import make_llm

        self.llm = make_llm(model, dtype="float32", seed=0, worker_extension_cls=EXT)
        [info] = self.llm.collective_rpc("colocate_refit_open", args=("zmq",), kwargs=dict(
            job=job, token=token, job_dir=job_dir, timeout_s=timeout_s, record=True))
        self.address = info["address"]
        [device] = self.llm.collective_rpc("colocate_device_key")
        ray.get(get_rendezvous(job).register.remote(_key(device), self.address))

    def pid(self) -> int:
        return os.getpid()

    def receive(self, refit: int | None = None) -> dict:
        """`refit`: its number, under which the driver may abort it (`rendezvous.abort`)."""
        [stats] = self.llm.collective_rpc("colocate_refit_receive", kwargs={"refit": refit})
        self.llm.reset_prefix_cache()
        return stats

    def greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        out = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        return [list(r.outputs[0].token_ids) for r in out]

    def unloaded_params(self) -> list[str] | None:
        [names] = self.llm.collective_rpc("colocate_unloaded_params")
        return names

    def fingerprints(self) -> tuple[dict[str, str], dict[str, str]]:
        [received] = self.llm.collective_rpc("colocate_received_fingerprints")
        [params] = self.llm.collective_rpc("colocate_param_fingerprints")
        return received, params


@ray.remote(num_cpus=0)
class SenderActor:
    def __init__(self, job: str, job_dir: str, token: str, timeout_s: float, buffer_bytes: int) -> None:
        self.rendezvous = get_rendezvous(job)
        address = ray.get(self.rendezvous.lookup.remote(_key("cpu:0"), timeout_s))
        self.sender = RefitSender(address=address, token=token, job_dir=job_dir, device="cpu",
                                  buffer_bytes=buffer_bytes, timeout_s=timeout_s)

    def stream(self, checkpoint: str, corrupt: str | None = None, drop: str | None = None,
               reshape: str | None = None, delay_s: float = 0.0, refit: int | None = None) -> dict:
        tensors = [(n, t) for n, t in load_file(os.path.join(checkpoint, "model.safetensors")).items() if n != drop]
        if reshape is not None:  # a consistent manifest with one tensor the engine cannot hold: rows halved
            tensors = [(n, t[: t.shape[0] // 2] if n == reshape else t) for n, t in tensors]
        meta = tensor_meta(tensors)
        if corrupt is not None:  # the manifest promises one shape, the tensor has another
            tensors = [(n, t.reshape(-1) if n == corrupt else t) for n, t in tensors]
        def slowly():  # `delay_s` per tensor, as a slow gather would
            for item in tensors:
                time.sleep(delay_s)
                yield item

        abort_fn = abort_check(self.rendezvous, refit) if refit is not None else None
        stats = self.sender.stream(slowly(), meta, abort_fn=abort_fn)
        return {"buckets": stats.buckets, "bytes": stats.bytes}

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        self.sender.close()


def fingerprint_all(checkpoint: str) -> dict[str, str]:
    from colocate.refit.checksum import fingerprint

    return {n: fingerprint(t) for n, t in load_file(os.path.join(checkpoint, "model.safetensors")).items()}


def expected_params(checkpoint: str) -> dict[str, torch.Tensor]:
    """The engine parameters whose values vLLM keeps readable on CPU (not the repacked Linears)."""
    return {n: t for n, t in load_file(os.path.join(checkpoint, "model.safetensors")).items()
            if "norm" in n or "embed" in n}
