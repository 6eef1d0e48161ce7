"""The policy's half of a split-placement refit, run inside each `PolicyWorker` (through `execute`).

Every rank drives `iter_weights` to the end (the FSDP gather is a collective); rank 0 broadcasts what it
gathers to the engines. Its `BroadcastSender` (and so the group) lives on the worker across refits; the
rendezvous handle is kept with it, since the rendezvous actor lives as long as someone holds a handle.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import ray
import torch

from colocate.refit.broadcast import BroadcastSender, publish_master
from colocate.refit.plan import manifest_meta_of
from colocate.refit.sizing import buffer_bytes

_SENDER = "_colocate_bcast_sender"


def broadcast_weights(worker: Any, *, job: str, token: str, rank: int, world_size: int,
                      buffer_size_mb: float | None, auto_fraction: float, timeout_s: float,
                      dtype: str) -> dict[str, Any] | None:
    torch_dtype = getattr(torch, dtype)
    weights = worker.iter_weights(torch_dtype)
    if rank != 0:
        for _ in weights:
            pass
        return None
    state = getattr(worker, _SENDER, None)
    if state is None:
        size = buffer_bytes(buffer_size_mb, worker.device, auto_fraction=auto_fraction)
        sender = BroadcastSender(host=store_host(), world_size=world_size, device=worker.device.type,
                                 buffer_bytes=size, token=token, timeout_s=timeout_s)
        state = (sender, publish_master(job, sender.address))
        setattr(worker, _SENDER, state)
    meta = manifest_meta_of(worker.weights_manifest(torch_dtype))
    return asdict(state[0].stream(weights, meta))


def store_host() -> str:
    """Where the group's rendezvous store listens: loopback when the cluster is this one node, else this
    node's cluster address (never every interface)."""
    if sum(1 for node in ray.nodes() if node.get("Alive")) <= 1:
        return "127.0.0.1"
    return ray.util.get_node_ip_address()


def close_broadcast_sender(worker: Any) -> None:
    state = getattr(worker, _SENDER, None)
    if state is not None:
        state[0].close()
        setattr(worker, _SENDER, None)
