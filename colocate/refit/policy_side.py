"""The policy's half of a refit, run inside each `PolicyWorker` (through `PolicyWorker.execute`).

Every rank drives `iter_weights` to the end (it gathers FSDP shards: a collective); a rank with an engine on
its device streams what it gathers to that engine's receiver, found through the rendezvous actor under the
device's key. The sender is kept on the worker between refits, so its buffers and the engine's opened
handles are reused.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import ray
import torch

from colocate.refit.plan import manifest_meta_of
from colocate.refit.sender import RefitSender
from colocate.refit.sizing import buffer_bytes
from colocate.rendezvous import device_key, get_rendezvous

_SENDER = "_colocate_refit_sender"


def local_device_key(worker: Any, slot: int) -> str:
    """This worker's device, named as the generation worker on it registers: by CUDA UUID, or CPU slot."""
    node = ray.get_runtime_context().get_node_id()
    if worker.device.type == "cuda":
        return device_key(node, "cuda", str(torch.cuda.get_device_properties(worker.device).uuid))
    return device_key(node, "cpu", slot)


def stream_weights(worker: Any, *, job: str, job_dir: str, token: str, slot: int | None,
                   buffer_size_mb: float | None, auto_fraction: float, timeout_s: float,
                   dtype: str) -> dict[str, Any] | None:
    """One refit from this rank. `slot=None`: no engine shares this device; only take part in the gather."""
    torch_dtype = getattr(torch, dtype)
    weights = worker.iter_weights(torch_dtype)
    if slot is None:
        for _ in weights:
            pass
        return None
    sender = getattr(worker, _SENDER, None)
    if sender is None:
        key = local_device_key(worker, slot)
        address = ray.get(get_rendezvous(job).lookup.remote(key, timeout_s))
        size = buffer_bytes(buffer_size_mb, worker.device, auto_fraction=auto_fraction)
        sender = RefitSender(address=address, token=token, job_dir=job_dir, device=worker.device.type,
                             buffer_bytes=size, timeout_s=timeout_s)
        setattr(worker, _SENDER, sender)
    meta = manifest_meta_of(worker.weights_manifest(torch_dtype))
    return asdict(sender.stream(weights, meta))


def close_sender(worker: Any) -> None:
    sender = getattr(worker, _SENDER, None)
    if sender is not None:
        sender.close()
        setattr(worker, _SENDER, None)
