"""The engine's half of a refit: one vLLM worker extension (`worker_extension_cls`) for both transports.

    llm = make_llm(path, worker_extension_cls="colocate.refit.engine_side.RefitExtension")
    [info] = llm.collective_rpc("colocate_refit_open", args=("zmq",),
                                kwargs=dict(job=job, token=token, job_dir=job_dir, timeout_s=60.0))
    ... zmq: register info["address"] under info["device_key"] with the job's rendezvous (the policy rank on
        that device looks it up); broadcast: the group is joined at the first receive ...
    llm.collective_rpc("colocate_refit_receive", kwargs=dict(refit=n))   # the update task of refit n
    llm.reset_prefix_cache()                                            # cached KV came from the old weights
    llm.collective_rpc("colocate_refit_close")

Every new manifest is checked against what the engine's loader accepts (`vllm_engine.offer_mismatch`)
before any bucket moves; buckets go through `vllm_engine.begin_weight_update / load_weights_into_worker /
finish_weight_update` (`model.load_weights` or the direct copy on GPU, the layerwise reload on CPU where
vLLM repacks Linear weights). Each worker of an engine (a TP rank) is one receiver: over broadcast, worker
`r` is group rank `rank + r`. Method names start with `colocate_`: the worker has its own `update_weights`
and friends, and vLLM refuses an extension whose names clash.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import ray
import torch

from colocate.engine import vllm_engine
from colocate.refit.checksum import fingerprint, received_fingerprint
from colocate.refit.ipc.receiver import RefitReceiver
from colocate.refit.nccl.group import CONNECT_TIMEOUT_S
from colocate.refit.nccl.receiver import BroadcastReceiver
from colocate.refit.plan import CheckFn, Meta, expect
from colocate.refit.schedule import AbortFn
from colocate.refit.slices import slice_data
from colocate.rendezvous import abort_check, get_rendezvous, lookup_master


class RefitExtension:
    """Mixed into the vLLM worker, so `self` is the worker."""

    _colocate_receiver: RefitReceiver | BroadcastReceiver | None = None
    _colocate_open: dict[str, Any] | None = None  # the last open's arguments
    _colocate_rendezvous: Any = None
    _colocate_record: bool = False
    _colocate_seen: dict[str, str]

    def colocate_refit_open(self, transport: str, *, job: str, token: str, timeout_s: float = 60.0,
                            job_dir: str = "", rank: int = 1, world_size: int = 0,
                            master: tuple[str, int] | None = None, connect: bool = False,
                            connect_timeout_s: float = CONNECT_TIMEOUT_S, record: bool = False,
                            expected: Meta | None = None) -> dict[str, Any]:
        """Make this worker a receiver of `transport` ("zmq" or "broadcast"); replaces an open one.

        zmq: binds a socket in the private `job_dir`; returns {"address", "device_key"}.
        broadcast: this worker is group rank `rank + <its vLLM rank>` of `world_size`; the group is joined at
        the first receive (the sender's store address looked up then, or `master`), or now with
        `connect=True` (blocks until every rank joined); returns {"rank", "device"}.
        `expected`: accept exactly these (name, dtype, shape) tensors instead of asking the engine's loader
        (tests). `record`: fingerprint every tensor handed to the engine (costs time: not for timing)."""
        self.colocate_refit_close()
        self._colocate_record, self._colocate_seen = record, {}
        # Where the driver marks a refit aborted: resolved once here, not per refit; none in an engine core's
        # child process, which is not connected to Ray (the transport's own timeouts still hold there).
        self._colocate_rendezvous = get_rendezvous(job) if ray.is_initialized() else None
        check: CheckFn = expect(expected) if expected is not None else (
            lambda meta: vllm_engine.offer_mismatch(self, meta))
        hooks = dict(load_fn=self._colocate_load, check_fn=check,
                     begin_fn=lambda: vllm_engine.begin_weight_update(self),
                     finish_fn=lambda: vllm_engine.finish_weight_update(self))
        if transport == "zmq":
            # A TP worker says which slice of each tensor its loader keeps (`engine/shards.py`); the sender
            # on its device then packs only that (`refit.shard_slice`).
            receiver = RefitReceiver(job_dir=job_dir, token=token, timeout_s=timeout_s,
                                     slice_fn=None if expected is not None else
                                     (lambda meta: vllm_engine.shard_slices(self, meta)), **hooks)
            self._colocate_receiver = receiver
            self._colocate_open = dict(transport=transport, job=job)
            return {"address": receiver.address, "device_key": self.colocate_device_key()}
        if transport != "broadcast":
            raise ValueError(f"refit transport must be 'zmq' or 'broadcast', got {transport!r}")
        my_rank = rank + int(getattr(self, "rank", 0))
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        self._colocate_open = dict(transport=transport, job=job, token=token, rank=my_rank,
                                   world_size=world_size, device=device, timeout_s=timeout_s, master=master,
                                   connect_timeout_s=connect_timeout_s, hooks=hooks)
        if connect:
            self._colocate_join()
        return {"rank": my_rank, "device": device}

    def _colocate_join(self) -> BroadcastReceiver:
        if isinstance(self._colocate_receiver, BroadcastReceiver):
            return self._colocate_receiver
        a = self._colocate_open
        assert a is not None
        master = a["master"] if a["master"] is not None else lookup_master(a["job"], a["connect_timeout_s"])
        receiver = BroadcastReceiver(
            master=(master[0], int(master[1])), rank=a["rank"], world_size=a["world_size"], device=a["device"],
            token=a["token"], timeout_s=a["timeout_s"], connect_timeout_s=a["connect_timeout_s"], **a["hooks"])
        receiver.connect()
        self._colocate_receiver = receiver
        return receiver

    def _colocate_load(self, weights: list[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None) -> None:
        """`dtype`: cast every tensor to it on the way in (a one-copy refit from fp32 master weights)."""
        if self._colocate_record:  # a shard-sliced tensor: its slice, which is what arrived
            for n, t in weights:
                self._colocate_seen[n] = received_fingerprint(*slice_data(t if dtype is None else t.to(dtype)))
        vllm_engine.load_weights_into_worker(self, weights, dtype=dtype)

    def colocate_refit_set_master(self, master: tuple[str, int]) -> None:
        """Where the split transport's store listens (the actor looks it up where the worker cannot)."""
        if self._colocate_open is not None:
            self._colocate_open["master"] = master

    def colocate_refit_receive(self, refit: int | None = None, timeout_s: float | None = None,
                               check_filled: bool = False) -> dict[str, Any]:
        """Serve refit number `refit` (the engine's update task); raises the transport's named errors.
        While waiting on the sender it asks the job's rendezvous whether the driver aborted the refit.
        `check_filled`: also return, under "unloaded", the parameters the refit left without all their
        tensors (after sleep(level=2) it must fill every one): asked here, not in a call of its own, since
        each call into an async engine's workers costs a round trip through its engine core."""
        if self._colocate_open is None:
            raise RuntimeError("colocate_refit_open was not called on this worker")
        t0 = time.perf_counter()
        self._colocate_seen = {}
        abort_fn: AbortFn | None = None
        if refit is not None and self._colocate_rendezvous is not None:
            abort_fn = abort_check(self._colocate_rendezvous, refit)
        with vllm_engine.finished_on_failure(self):  # the caller keeps its weight version on a failure
            if self._colocate_open["transport"] == "zmq":
                assert isinstance(self._colocate_receiver, RefitReceiver)
                stats = asdict(self._colocate_receiver.receive(timeout_s, abort_fn=abort_fn))
            else:
                stats = asdict(self._colocate_join().receive(abort_fn=abort_fn))
        if check_filled:
            stats["unloaded"] = vllm_engine.unloaded_params(self)
        # This call on the worker, beside the engine actor's whole task: the rest is the hop through the engine.
        stats["worker_seconds"] = time.perf_counter() - t0
        return stats

    def colocate_refit_close(self) -> None:
        """Close the receiver (zmq: unbind; broadcast: leave the group; a new open joins a new one)."""
        if self._colocate_receiver is not None:
            self._colocate_receiver.close()
            self._colocate_receiver = None
        self._colocate_open = None

    # -- inspection and modes (tests, benchmarks, checks) ----------------------------------------------
    def colocate_refit_set_record(self, record: bool) -> None:
        """Fingerprint every tensor handed to the engine in the next refits (costs time: not for timing)."""
        self._colocate_record = record

    def colocate_received_fingerprints(self) -> dict[str, str]:
        """What the last refit handed to the engine, per tensor (with `record=True`); of a shard-sliced
        tensor, its slice's fingerprint followed by "@dim:start:length"."""
        return dict(getattr(self, "_colocate_seen", {}))

    def colocate_refit_set_load_mode(self, mode: str) -> None:
        """"direct" (GPU fast path where it applies, the default) or "load_weights" (vLLM's own loader)."""
        vllm_engine.set_load_mode(self, mode)

    def colocate_refit_drop_buffers(self) -> None:
        """Close the sender's buffers this receiver keeps open (zmq; the sender is done with them)."""
        if isinstance(self._colocate_receiver, RefitReceiver):
            self._colocate_receiver.drop_buffers()

    def colocate_device_key(self) -> str:
        """Which device this worker runs on: "cuda:<uuid>", or "cpu:0"."""
        if torch.cuda.is_available():
            return "cuda:" + str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        return "cpu:0"

    def colocate_unloaded_params(self) -> list[str]:
        """Engine parameters the last refit left without all their tensors (after sleep(level=2) every
        parameter must be refilled)."""
        return vllm_engine.unloaded_params(self)

    def colocate_check_offer(self, offer: list[tuple[str, str, tuple[int, ...]]]) -> dict[str, Any]:
        """Whether a refit of these (name, dtype, shape) tensors fills this engine exactly (`accepts.py`)."""
        check = vllm_engine.check_offer(self, offer)
        return {"ok": check.ok, "summary": check.summary(), "tensors": len(offer), "params": len(check.needs)}

    def colocate_param_fingerprints(self) -> dict[str, str]:
        """The engine's parameters as it holds them (vLLM names; on CPU, repacked Linears are empty)."""
        return {n: fingerprint(p.data) for n, p in vllm_engine.engine_named_parameters(self).items()
                if p.numel() > 0}
