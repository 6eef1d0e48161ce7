"""Which weight version a request runs on, when the engine keeps serving while refits arrive.

Requests hold the gate shared, a weight update holds it exclusively:

    OPEN ── update() ──> DRAINING ── in_flight == 0 ──> UPDATING ──┬── success ──> OPEN, version + 1
      ^    (new requests wait;        (weights change;              └── failure ──> OPEN, stale
      |     admitted ones finish       nothing runs)
      |     on the old weights)
      └── requests enter only while OPEN; each is told the version it runs on, which cannot change until it
          leaves (so no response mixes two versions)

A failed update may have loaded some tensors and not others, so the gate turns stale: requests are refused
(`WeightsIncompleteError`) until an update succeeds. Everything runs on one asyncio loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from colocate.generation.errors import WeightsIncompleteError


class VersionGate:
    def __init__(self) -> None:
        self.version = 0
        self.in_flight = 0
        self.updating = False
        self.stale = False
        self._changed = asyncio.Condition()
        self._one_update = asyncio.Lock()

    @asynccontextmanager
    async def request(self) -> AsyncIterator[int]:
        """Hold the weights fixed for one request; yields their version."""
        async with self._changed:
            await self._changed.wait_for(lambda: not self.updating)
            if self.stale:
                raise WeightsIncompleteError(
                    f"the last refit failed part-way (weights were version {self.version}); refit again")
            self.in_flight += 1
            version = self.version
        try:
            yield version
        finally:
            async with self._changed:
                self.in_flight -= 1
                self._changed.notify_all()

    @asynccontextmanager
    async def update(self) -> AsyncIterator[None]:
        """Stop admitting requests, wait for the admitted ones, then hold the engine while weights change."""
        async with self._drained(changes_weights=True):
            yield

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Drain and hold the engine for work that leaves the weights as they are (sleep, wake up)."""
        async with self._drained(changes_weights=False):
            yield

    @asynccontextmanager
    async def _drained(self, *, changes_weights: bool) -> AsyncIterator[None]:
        async with self._one_update:
            async with self._changed:
                self.updating = True
                await self._changed.wait_for(lambda: self.in_flight == 0)
            ok = False
            try:
                yield
                ok = True
            finally:
                async with self._changed:
                    self.updating = False
                    if changes_weights:
                        self.stale = not ok
                        self.version += ok
                    self._changed.notify_all()
