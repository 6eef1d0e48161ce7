"""The receiving end of a split-placement refit inside a vLLM worker: a mixin for `worker_extension_cls`.

`ColocateRefitExtension` (vllm_ext.py) inherits it, so one extension serves both transports:

    llm = make_llm(path, worker_extension_cls="colocate.refit.vllm_ext.ColocateRefitExtension")
    llm.collective_rpc("colocate_bcast_open", args=(job, first_rank, world_size, timeout_s),
                       kwargs={"token": token})
    llm.collective_rpc("colocate_bcast_receive")      # the update task, paired with the sender's stream();
                                                      # the first one also joins the group
    llm.reset_prefix_cache()                          # cached KV came from the old weights
    llm.collective_rpc("colocate_bcast_close")

Each worker of the engine is one receiver: worker `r` (its vLLM rank, the TP rank) takes group rank
`first_rank + r`. The master address comes from the job's rendezvous actor (`broadcast.lookup_master`: the
worker runs in a Ray actor's process, where Ray is initialised), or from `master` where there is no Ray.
Buckets load through `vllm_engine.begin_weight_update / load_weights_into_worker / finish_weight_update`.
Method names start with `colocate_bcast_`: the worker has its own `update_weights` and friends, and vLLM
refuses an extension whose names clash.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from colocate.engine import vllm_engine
from colocate.refit.broadcast import CONNECT_TIMEOUT_S, BroadcastReceiver, lookup_master
from colocate.refit.plan import Expected


class BroadcastRefitExtension:
    """Mixed into the vLLM worker, so `self` is the worker."""

    _colocate_bcast: BroadcastReceiver | None = None
    _colocate_bcast_record: bool = False
    _colocate_bcast_seen: dict[str, str]
    _colocate_bcast_args: dict[str, Any] | None = None

    def colocate_bcast_open(self, job: str, rank: int, world_size: int, timeout_s: float = 60.0,
                            record: bool = False, expected: Expected | None = None,
                            master: tuple[str, int] | None = None, connect: bool = False,
                            connect_timeout_s: float = CONNECT_TIMEOUT_S, *, token: str) -> dict[str, Any]:
        """Set this worker up as group rank `rank + <its vLLM rank>`; returns that rank and its device.

        The group is joined at the first `colocate_bcast_receive` (the master address looked up then, so
        the sender may publish it later than this call), or now with `connect=True`: that blocks until
        the sender and every other receiver have joined, so call it alongside the sender's `connect()`."""
        self.colocate_bcast_close()
        self._colocate_bcast_record = record
        self._colocate_bcast_seen = {}
        my_rank = rank + int(getattr(self, "rank", 0))
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        self._colocate_bcast_args = dict(job=job, token=token, rank=my_rank, world_size=world_size,
                                         timeout_s=timeout_s,
                                         expected=expected, master=master, device=device,
                                         connect_timeout_s=connect_timeout_s)
        if connect:
            self._colocate_bcast_join()
        return {"rank": my_rank, "device": device}

    def _colocate_bcast_join(self) -> BroadcastReceiver:
        if self._colocate_bcast is not None:
            return self._colocate_bcast
        a = getattr(self, "_colocate_bcast_args", None)
        if a is None:
            raise RuntimeError("colocate_bcast_open was not called on this worker")
        master = a["master"] if a["master"] is not None else lookup_master(a["job"], a["connect_timeout_s"])
        receiver = BroadcastReceiver(
            master=(master[0], int(master[1])), rank=a["rank"], world_size=a["world_size"],
            device=a["device"], token=a["token"],
            load_fn=self._colocate_bcast_load, timeout_s=a["timeout_s"], expected=a["expected"],
            connect_timeout_s=a["connect_timeout_s"],
            check_fn=lambda meta: vllm_engine.offer_mismatch(self, meta),
            begin_fn=lambda: vllm_engine.begin_weight_update(self),
            finish_fn=lambda: vllm_engine.finish_weight_update(self),
        )
        receiver.connect()
        self._colocate_bcast = receiver
        return receiver

    def _colocate_bcast_load(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        if self._colocate_bcast_record:
            from colocate.refit.checksum import fingerprint

            self._colocate_bcast_seen.update((n, fingerprint(t)) for n, t in weights)
        vllm_engine.load_weights_into_worker(self, weights)

    def colocate_bcast_receive(self) -> dict[str, Any]:
        """Take part in one refit (the engine's update task). Raises the protocol's named errors."""
        self._colocate_bcast_seen = {}
        with vllm_engine.finished_on_failure(self):  # the caller keeps its weight version on a failure
            return asdict(self._colocate_bcast_join().receive())

    def colocate_bcast_set_record(self, record: bool) -> None:
        """Fingerprint every tensor handed to the engine in the next refits (costs time: not for timing)."""
        self._colocate_bcast_record = record

    def colocate_bcast_fingerprints(self) -> dict[str, str]:
        """What the last refit handed to the engine, per tensor (with `record=True`)."""
        return dict(getattr(self, "_colocate_bcast_seen", {}))

    def colocate_bcast_close(self) -> None:
        """Leave the group (the next receive after a new `colocate_bcast_open` joins a new one)."""
        if self._colocate_bcast is not None:
            self._colocate_bcast.close()
            self._colocate_bcast = None
