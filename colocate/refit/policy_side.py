"""The policy's half of a refit: `PolicyRefit`, owned by the policy worker from `open_refit` to `close_refit`.

Any backend feeds it (FSDP2, Megatron-core): `weights(dtype)` yields (HF name, full tensor or `Fill`) one at
a time in the order `manifest(dtype)` lists them. Every rank drives the iterator to the end (its gathers are
collectives; a rank that sends nothing fills scratch tensors); the rank that streams sends what it gathers:
- zmq (colocated): each rank with an engine on its device, to that engine's receiver, found through the
  job's rendezvous under the device's key;
- broadcast (split): rank 0, to every engine worker; it owns the group's store, published with the
  rendezvous.
The sender is made at `open` (so a bad buffer size or a missing receiver fails there, not at the first
refit) and kept until `close`: its buffers and the engine's opened handles are reused by every refit.
With `one_copy`, a backend whose `resident(dtype)` has every weight whole on this device (one FSDP2 rank, its
parameters kept there) is read in place by the engine over zmq (`ipc/sender.py`); else the buffers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import ray
import torch

from colocate.refit.ipc.sender import RefitSender
from colocate.refit.nccl.sender import BroadcastSender
from colocate.refit.plan import manifest_meta_of
from colocate.refit.sizing import buffer_bytes
from colocate.refit.sources import Fill, Source
from colocate.rendezvous import abort_check, device_key, get_rendezvous, publish_master

TRANSPORTS = ("zmq", "broadcast")
Weights = Callable[[torch.dtype], Iterator[tuple[str, Source]]]
Resident = Callable[[torch.dtype], "list[tuple[str, torch.Tensor]] | None"]
ManifestRows = Callable[[torch.dtype], list[tuple[str, tuple[int, ...], torch.dtype]]]


class PolicyRefit:
    def __init__(self, *, weights: Weights, manifest: ManifestRows, device: torch.device, transport: str, job: str,
                 token: str, dtype: str, streams: bool, buffer_size_mb: float | None, auto_fraction: float,
                 timeout_s: float, job_dir: str = "", device_slot: int = 0, world_size: int = 0,
                 resident: Resident | None = None, one_copy: bool = True, shard_slice: bool = True) -> None:
        """`streams`: this rank sends (zmq: an engine shares its device, `device_slot` naming it on CPU;
        broadcast: rank 0 of a group of `world_size` ranks, itself and every engine worker). `one_copy`: let
        the engine read `resident(dtype)` in place where it applies (only while the policy keeps its
        parameters on the device: the engine holds their memory open). `shard_slice`: over zmq, send only
        the slice of each weight the engine worker on this device keeps (its TP shard)."""
        if transport not in TRANSPORTS:
            raise ValueError(f"refit transport must be one of {TRANSPORTS}, got {transport!r}")
        self._weights, self._manifest = weights, manifest
        self._resident = resident if one_copy and transport == "zmq" else None
        self.transport, self.job, self.dtype = transport, job, getattr(torch, dtype)
        self.sender: RefitSender | BroadcastSender | None = None
        self._rendezvous: Any = None  # held: the rendezvous actor lives while someone holds a handle
        if not streams:
            return
        size = buffer_bytes(buffer_size_mb, device, auto_fraction=auto_fraction)
        self._rendezvous = get_rendezvous(job)
        if transport == "zmq":
            key = local_device_key(device, device_slot)
            address = ray.get(self._rendezvous.lookup.remote(key, timeout_s))
            self.sender = RefitSender(address=address, token=token, job_dir=job_dir, device=device.type,
                                      buffer_bytes=size, timeout_s=timeout_s, shard_slice=shard_slice)
        else:
            self.sender = BroadcastSender(host=store_host(), world_size=world_size, device=device.type,
                                          buffer_bytes=size, token=token, timeout_s=timeout_s)
            publish_master(job, self.sender.address)

    def stream(self, refit: int) -> dict[str, Any] | None:
        """Refit number `refit` from this rank: the sender's stats, or None on a rank that only gathers."""
        weights = self._weights(self.dtype)
        if self.sender is None:
            for _, source in weights:
                if isinstance(source, Fill):
                    source.materialize()  # its collective, into a scratch tensor
            return None
        meta = manifest_meta_of(self._manifest(self.dtype))
        abort_fn = abort_check(self._rendezvous, refit)
        if isinstance(self.sender, RefitSender):
            resident = self._resident(self.dtype) if self._resident is not None else None
            return asdict(self.sender.stream(weights, meta, abort_fn=abort_fn, resident=resident))
        return asdict(self.sender.stream(weights, meta, abort_fn=abort_fn))

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None
        self._rendezvous = None


class StreamsRefits:
    """The three refit methods of a policy worker (FSDP2 or Megatron): the worker provides `device`,
    `iter_weights(dtype)` and `weights_manifest(dtype)`, and may offer `refit_sources(dtype)` (fills in place
    of tensors) and `resident_weights(dtype)` (the one-copy path)."""

    device: torch.device
    _refit: PolicyRefit | None = None

    def open_refit(self, **kwargs: Any) -> None:
        """Make this rank's `PolicyRefit` (see its arguments); replaces an open one."""
        self.close_refit()
        self._refit = PolicyRefit(weights=self.refit_sources, manifest=self.weights_manifest,  # type: ignore[attr-defined]
                                  resident=self.resident_weights, device=self.device, **kwargs)

    def refit_sources(self, dtype: torch.dtype) -> Iterator[tuple[str, Source]]:
        """What a refit streams: `iter_weights` unless the backend can fill the sender's buffers itself."""
        return self.iter_weights(dtype)  # type: ignore[attr-defined]

    def resident_weights(self, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]] | None:
        """Every weight whole on this device, for the one-copy path; None: not so for this backend."""
        return None

    def stream_refit(self, refit: int) -> dict[str, Any] | None:
        """This rank's half of refit number `refit` (the driver launches it with the engines' half)."""
        if self._refit is None:
            raise RuntimeError("open_refit was not called on this policy worker")
        t0 = time.perf_counter()
        stats = self._refit.stream(refit)
        if stats is not None:
            stats["task_seconds"] = time.perf_counter() - t0  # the backend's weight lookup included
        return stats

    def close_refit(self) -> None:
        if self._refit is not None:
            self._refit.close()
            self._refit = None


def local_device_key(device: torch.device, slot: int) -> str:
    """This rank's device, named as the engine worker on it registers: by CUDA UUID, or CPU slot."""
    node = ray.get_runtime_context().get_node_id()
    if device.type == "cuda":
        return device_key(node, "cuda", str(torch.cuda.get_device_properties(device).uuid))
    return device_key(node, "cpu", slot)


def store_host() -> str:
    """Where the split transport's store listens: loopback when the cluster is this one node, else this
    node's cluster address (never every interface)."""
    if sum(1 for node in ray.nodes() if node.get("Alive")) <= 1:
        return "127.0.0.1"
    return ray.util.get_node_ip_address()
