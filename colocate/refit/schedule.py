"""What both transports share beyond the plan: the senders' two-buffer schedule, the stats each side returns,
and the callbacks a transport is driven by. Pure Python: no sockets, no process groups, no Ray.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

# Hands one bucket's (name, typed view) pairs to the engine; it must copy, never keep, what it is given: the
# buffer is refilled as soon as it returns.
LoadFn = Callable[[list[tuple[str, torch.Tensor]]], None]


class SameViews(list):
    """A LoadFn's argument that comes again, unchanged, at every refit: the one-copy refit's views into the
    sender's storages, the same while those stay where they are. The engine keeps what it works out from it
    (which parameter each tensor goes to) in `memo`, which goes with the list when the receiver drops it."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.memo: dict[object, object] = {}


# Whether the driver has aborted the refit this side is serving (the other side failed). Asked only while a
# side waits on its peer, at most every `ABORT_POLL_S`, never on the hot path.
AbortFn = Callable[[], bool]
ABORT_POLL_S = 0.25


@dataclass
class SendStats:
    refit_id: int
    buckets: int
    bytes: int
    seconds: float
    pack_seconds: float
    """Filling buffers, including `gather_seconds`."""
    wait_seconds: float
    """Waiting for the receivers to take a bucket before its buffer could be refilled."""
    gather_seconds: float = 0.0
    """Inside the tensor iterator (an FSDP policy's all-gather of each parameter)."""
    manifest_sent: bool = False
    """Whether this refit carried the manifest (the first one of a layout)."""
    one_copy: bool = False
    """Whether the engine read the weights in place (no buffers packed; `pack_seconds` is the set-up)."""
    sliced: int = 0
    """Tensors of which only the receiving engine worker's shard was sent (`bytes` counts what was sent)."""


@dataclass
class ReceiveStats:
    refit_id: int
    buckets: int
    bytes: int
    seconds: float
    load_seconds: float
    wait_seconds: float = 0.0
    """Waiting for buckets to arrive (nccl; ipc is told when a bucket is ready)."""


T = TypeVar("T")


class TwoSlots(Generic[T]):
    """The schedule both senders follow. Regular buckets alternate between two buffers (slots 0 and 1); an
    oversized bucket gets a buffer of its own (slot -1). At most two buckets are in flight, and a slot is
    refilled only once the bucket it held is finished (`finish(item)`: the receiver's ack over ipc, the
    broadcast's completion over nccl), so the sender packs bucket N+1 while bucket N is being loaded.
    `overlap=False` keeps one bucket in flight (the serial baseline)."""

    def __init__(self, finish: Callable[[T], None], *, overlap: bool = True) -> None:
        self._finish = finish
        self.overlap = overlap
        self._in_flight: deque[tuple[int, T]] = deque()
        self._regular = 0
        self.wait_seconds = 0.0

    def next_slot(self, oversized: bool) -> int:
        """The slot of the next bucket, once it is free (finishing the oldest buckets in flight as needed)."""
        slot = -1 if oversized else self._regular % 2
        self._regular += not oversized
        while self._in_flight and (not self.overlap or len(self._in_flight) >= 2
                                   or any(s == slot for s, _ in self._in_flight)):
            self.finish_oldest()
        return slot

    def sent(self, slot: int, item: T) -> None:
        self._in_flight.append((slot, item))

    def finish_oldest(self) -> None:
        t = time.perf_counter()
        _slot, item = self._in_flight.popleft()  # the item (and its buffer) stays referenced until here
        self._finish(item)
        self.wait_seconds += time.perf_counter() - t

    def drain(self) -> None:
        while self._in_flight:
            self.finish_oldest()

    def pending(self) -> list[T]:
        return [item for _, item in self._in_flight]

    def clear(self) -> None:
        self._in_flight.clear()


def timed(it: Iterator[T], total: list[float]) -> Iterator[T]:
    """Yield from `it`, adding the time spent producing each item to total[0] (the policy's gather)."""
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            total[0] += time.perf_counter() - t
            return
        total[0] += time.perf_counter() - t
        yield item
