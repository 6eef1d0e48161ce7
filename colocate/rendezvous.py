"""A named Ray actor per job where the two sides of a refit find each other, and where the driver marks a
refit aborted.

Keys name a device on a node: `device_key(node_id, "cuda", uuid)` or `device_key(node_id, "cpu", slot)`, so
the policy rank and the generation worker that share a GPU find each other without knowing ranks or
CUDA_VISIBLE_DEVICES. The split transport's store address goes through the same actor (`publish_master`).
A refit the driver aborted (the other side failed) is marked here; a side still waiting on its peer asks
`abort_check(rendezvous, refit)()` every `schedule.ABORT_POLL_S` and gives up at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
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
        self._aborted: set[int] = set()
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

    async def abort(self, refit: int) -> None:
        self._aborted.add(refit)

    async def aborted(self, refit: int) -> bool:
        return refit in self._aborted


def get_rendezvous(job: str) -> ray.actor.ActorHandle:
    """The job's rendezvous actor, created by whoever asks first (a detached name would outlive the job).

    Ray ends a non-detached actor when its creator drops its last handle: the driver should create it first
    and hold it for the job's lifetime (`cluster.build` does)."""
    return Rendezvous.options(name=f"rendezvous-{job}", namespace=NAMESPACE, get_if_exists=True).remote()


def abort_check(rendezvous: ray.actor.ActorHandle, refit: int) -> Callable[[], bool]:
    """Whether the driver has aborted refit number `refit` of the job whose `rendezvous` this is (a
    transport's `AbortFn`; the handle is resolved once, at open, not per refit). A rendezvous that does not
    answer within a second counts as not aborted: the transport's own timeout still holds."""

    def aborted() -> bool:
        try:
            return bool(ray.get(rendezvous.aborted.remote(refit), timeout=1.0))
        except Exception:
            return False

    return aborted


def master_key(job: str) -> str:
    return f"bcast/{job}"


def publish_master(job: str, address: tuple[str, int]) -> Any:
    """Register the split transport's store address with the job's rendezvous actor.

    Keep the returned actor handle as long as receivers may look the address up: the rendezvous actor is
    not detached, and Ray ends it once its creator drops its last handle (measured: a handle dropped at
    the end of an actor's `__init__` took the registered address with it)."""
    rendezvous = get_rendezvous(job)
    ray.get(rendezvous.register.remote(master_key(job), list(address)))
    return rendezvous


def lookup_master(job: str, timeout_s: float) -> tuple[str, int]:
    host, port = ray.get(get_rendezvous(job).lookup.remote(master_key(job), timeout_s))
    return host, int(port)
