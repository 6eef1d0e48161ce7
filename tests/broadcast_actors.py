"""Peers for the broadcast refit tests: Ray actors around a vLLM CPU engine and a policy-side sender, and a
plain spawned receiver process driven over a pipe (for the transport-only tests).

They stand in for the generation and policy workers, with the same refit calls those make.
"""

from __future__ import annotations

import os
import signal

import ray
import torch
from safetensors.torch import load_file

from colocate.refit.engine_side import RefitExtension
from colocate.refit.nccl.receiver import BroadcastReceiver
from colocate.refit.nccl.sender import BroadcastSender
from colocate.refit.plan import expect, tensor_meta
from colocate.rendezvous import publish_master

EXT = "tests.broadcast_actors.TestBroadcastExtension"
TOKEN = "the-test-job-token"
CONNECT_TIMEOUT_S = 120.0  # engines may still be starting when the sender forms the group


def checkpoint_tensors(checkpoint: str) -> list[tuple[str, torch.Tensor]]:
    return list(load_file(os.path.join(checkpoint, "model.safetensors")).items())


def expected_meta(checkpoint: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {n: (d, s) for n, d, s in tensor_meta(checkpoint_tensors(checkpoint))}


def to_bytes(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    flat = t.detach().contiguous().view(-1)
    data = flat.view(torch.uint8).cpu().numpy().tobytes() if flat.numel() else b""
    return str(t.dtype), tuple(t.shape), data


class TestBroadcastExtension(RefitExtension):
    """The production extension, plus a load counter and a way to die inside a given load."""

    __test__ = False  # not a pytest class
    _colocate_test_loads = 0
    _colocate_test_die_at: int | None = None

    def _colocate_load(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        self._colocate_test_loads += 1
        if self._colocate_test_loads == self._colocate_test_die_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash mid-broadcast: no cleanup, no goodbye
        super()._colocate_load(weights)

    def colocate_test_arm(self, die_at_load: int | None) -> None:
        self._colocate_test_loads, self._colocate_test_die_at = 0, die_at_load

    def colocate_test_loads(self) -> int:
        return self._colocate_test_loads


@ray.remote(num_cpus=0)
class EngineActor:
    def __init__(self, model: str) -> None:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        from colocate.engine.vllm_engine import make_llm

        self.llm = make_llm(model, dtype="float32", seed=0, worker_extension_cls=EXT)

    def open(self, job: str, rank: int, world_size: int, timeout_s: float, expected=None) -> dict:
        [info] = self.llm.collective_rpc("colocate_refit_open", args=("broadcast",), kwargs=dict(
            job=job, rank=rank, world_size=world_size, timeout_s=timeout_s, record=True, expected=expected,
            connect=True, connect_timeout_s=CONNECT_TIMEOUT_S, token=TOKEN))
        return info

    def receive(self) -> dict:
        [stats] = self.llm.collective_rpc("colocate_refit_receive")
        self.llm.reset_prefix_cache()
        return stats

    def arm(self, die_at_load: int | None = None) -> None:
        """Reset the load counter; with `die_at_load`, SIGKILL this process inside that load."""
        self.llm.collective_rpc("colocate_test_arm", args=(die_at_load,))

    def loads(self) -> int:
        [n] = self.llm.collective_rpc("colocate_test_loads")
        return n

    def greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        out = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        return [list(r.outputs[0].token_ids) for r in out]

    def fingerprints(self) -> tuple[dict[str, str], dict[str, str]]:
        [received] = self.llm.collective_rpc("colocate_received_fingerprints")
        [params] = self.llm.collective_rpc("colocate_param_fingerprints")
        return received, params

    def close(self) -> None:
        self.llm.collective_rpc("colocate_refit_close")


@ray.remote(num_cpus=0)
class SenderActor:
    """Policy rank 0: publishes its store address under the job, then broadcasts checkpoints."""

    def __init__(self, job: str, world_size: int, timeout_s: float, buffer_bytes: int) -> None:
        self.sender = BroadcastSender(host=ray.util.get_node_ip_address(), world_size=world_size,
                                      device="cpu", buffer_bytes=buffer_bytes, token=TOKEN,
                                      timeout_s=timeout_s, connect_timeout_s=CONNECT_TIMEOUT_S)
        self.rendezvous = publish_master(job, self.sender.address)  # keeps the rendezvous actor alive

    def connect(self) -> None:
        self.sender.connect()

    def stream(self, checkpoint: str, cast: str | None = None, die_at_tensor: int | None = None,
               drop: str | None = None, reshape: str | None = None) -> dict:
        tensors = [(n, t) for n, t in checkpoint_tensors(checkpoint) if n != drop]
        if cast is not None:  # a consistent manifest the engines do not expect: one tensor in bfloat16
            tensors = [(n, t.to(torch.bfloat16) if n == cast else t) for n, t in tensors]
        if reshape is not None:  # a consistent manifest with one tensor the engine cannot hold: rows halved
            tensors = [(n, t[: t.shape[0] // 2] if n == reshape else t) for n, t in tensors]

        def gen():
            for i, item in enumerate(tensors):
                if i == die_at_tensor:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield item

        stats = self.sender.stream(gen(), tensor_meta(tensors))
        return {"buckets": stats.buckets, "bytes": stats.bytes, "manifest_sent": stats.manifest_sent}

    def close(self) -> None:
        self.sender.close()


def receiver_process(conn, master: tuple[str, int], rank: int, world_size: int, timeout_s: float,
                     device: str = "cpu", token: str = TOKEN) -> None:
    """A bare receiver in a spawned process: serves ("receive",), ("expect", meta) and ("close",) requests.

    Results travel as raw bytes, never as shared tensors."""
    got: dict[str, tuple] = {}
    loads = [0]

    def load(weights):
        loads[0] += 1
        for name, t in weights:
            got[name] = to_bytes(t)

    r = BroadcastReceiver(master=master, rank=rank, world_size=world_size, device=device, load_fn=load,
                          token=token, timeout_s=timeout_s, connect_timeout_s=CONNECT_TIMEOUT_S)
    try:
        r.connect()
    except Exception as e:
        conn.send(("error", type(e).__name__, str(e), 0))
        return
    conn.send(("ready",))
    while True:
        cmd = conn.recv()
        if cmd[0] == "receive":
            got.clear()
            loads[0] = 0
            try:
                stats = r.receive()
                conn.send(("ok", dict(got), stats.buckets, loads[0]))
            except Exception as e:
                conn.send(("error", type(e).__name__, str(e), loads[0]))
        elif cmd[0] == "expect":
            r.check_fn = expect(cmd[1]) if cmd[1] is not None else None
            conn.send(("ok",))
        elif cmd[0] == "close":
            r.close()
            conn.send(("closed",))
            return
