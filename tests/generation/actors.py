"""A stand-in for a policy rank in the refit tests: streams a checkpoint to the engine registered under a key."""

from __future__ import annotations

import os

import ray
from safetensors.torch import load_file

from colocate.refit.ipc.sender import RefitSender
from colocate.refit.plan import tensor_meta
from colocate.rendezvous import get_rendezvous


@ray.remote(num_cpus=0)
class CheckpointSender:
    def __init__(self, *, job: str, job_dir: str, token: str, key: str, timeout_s: float,
                 buffer_bytes: int = 64 << 10, device: str = "cpu") -> None:
        address = ray.get(get_rendezvous(job).lookup.remote(key, timeout_s))
        self.device = device
        self.sender = RefitSender(address=address, token=token, job_dir=job_dir, device=device,
                                  buffer_bytes=buffer_bytes, timeout_s=timeout_s)

    def stream(self, checkpoint: str, corrupt: str | None = None) -> dict:
        """One refit with `checkpoint`'s tensors; `corrupt` names one whose shape disagrees with the manifest."""
        tensors = list(load_file(os.path.join(checkpoint, "model.safetensors"), device=self.device).items())
        meta = tensor_meta(tensors)
        if corrupt is not None:
            tensors = [(n, t.reshape(-1) if n == corrupt else t) for n, t in tensors]
        stats = self.sender.stream(iter(tensors), meta)
        return {"buckets": stats.buckets, "bytes": stats.bytes, "seconds": stats.seconds}

    def close(self) -> None:
        self.sender.close()


@ray.remote(num_cpus=0)
class CheckpointBroadcaster:
    """Policy rank 0 of a split placement: publishes its address under the job, then broadcasts checkpoints
    to every engine at once (the group forms inside the first `stream`)."""

    def __init__(self, *, job: str, token: str, world_size: int, timeout_s: float, buffer_bytes: int = 64 << 10,
                 device: str = "cpu") -> None:
        from colocate.refit.nccl.sender import BroadcastSender
        from colocate.rendezvous import publish_master

        self.device = device
        self.sender = BroadcastSender(host=ray.util.get_node_ip_address(), world_size=world_size, device=device,
                                      buffer_bytes=buffer_bytes, token=token, timeout_s=timeout_s,
                                      connect_timeout_s=timeout_s)
        publish_master(job, self.sender.address)

    def stream(self, checkpoint: str) -> dict:
        tensors = list(load_file(os.path.join(checkpoint, "model.safetensors"), device=self.device).items())
        stats = self.sender.stream(iter(tensors), tensor_meta(tensors))
        return {"buckets": stats.buckets, "bytes": stats.bytes}

    def close(self) -> None:
        self.sender.close()
