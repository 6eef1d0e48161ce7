"""A named Ray actor where receivers publish their addresses and senders look them up.

Keys name a device on a node: `device_key(node_id, "cuda", uuid)` or `device_key(node_id, "cpu", slot)`, so
the policy rank and the generation worker that share a GPU find each other without knowing ranks or
CUDA_VISIBLE_DEVICES. The NCCL master address for split placement goes through the same actor.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray

NAMESPACE = "colocate"


class RendezvousTimeoutError(TimeoutError):
    """Nobody registered the key within the time asked for."""


def device_key(node_id: str, kind: str, ident: str | int) -> str:
    return f"{node_id}/{kind}:{ident}"


@ray.remote(num_cpus=0)
class Rendezvous:
    def __init__(self) -> None:
        self._values: dict[str, Any] = {}
        self._changed = asyncio.Condition()

    async def register(self, key: str, value: Any) -> None:
        async with self._changed:
            self._values[key] = value
            self._changed.notify_all()

    async def unregister(self, key: str) -> None:
        async with self._changed:
            self._values.pop(key, None)

    async def lookup(self, key: str, timeout_s: float) -> Any:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: key in self._values), timeout_s)
            except TimeoutError:
                have = sorted(self._values)[:10]
                raise RendezvousTimeoutError(
                    f"no {key!r} registered within {timeout_s:.1f}s (have: {have})") from None
            return self._values[key]

    async def keys(self) -> list[str]:
        return sorted(self._values)


def get_rendezvous(job: str) -> ray.actor.ActorHandle:
    """The job's rendezvous actor, created by whoever asks first (a detached name would outlive the job).

    Ray ends a non-detached actor when its creator drops its last handle: the driver should create it first
    and hold it for the job's lifetime (`cluster.build` does)."""
    return Rendezvous.options(name=f"rendezvous-{job}", namespace=NAMESPACE, get_if_exists=True).remote()
