"""The sending side of a split-placement refit (policy rank 0); the protocol is in `receiver.py`."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable

import torch
import torch.distributed as dist

from colocate.refit.errors import RefitError, RefitManifestError
from colocate.refit.nccl.frames import (
    ABORT,
    OK,
    Header,
    encode_manifest,
    frame_buffers,
    frame_bytes,
    trailer_words,
    write_trailer,
)
from colocate.refit.nccl.group import (
    CONNECT_TIMEOUT_S,
    CUMEM_DEFAULT,
    Group,
    check_receivers,
    listening_store,
    nccl_env,
    publish_sender_proof,
)
from colocate.refit.plan import Manifest, Meta, bucket_views, next_matching, plan
from colocate.refit.schedule import AbortFn, SendStats, TwoSlots, timed
from colocate.refit.sources import write

log = logging.getLogger(__name__)


class BroadcastSender:
    """Policy rank 0: owns the TCP store (master) and broadcasts refits to `world_size - 1` receivers.

    The store listens at construction (`address`: publish it, e.g. `publish_master`); the group forms in
    `connect()` (or the first `stream()`), which waits for every receiver to join."""

    def __init__(self, *, host: str, world_size: int, device: str, buffer_bytes: int, token: str,
                 timeout_s: float = 60.0, overlap: bool = True, port: int = 0,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """`host`: the address the rendezvous store listens on (this node's cluster address, or loopback when
        every rank is here). `token`: the job's secret, proven by every rank before the group forms."""
        if world_size < 2:
            raise ValueError(f"world_size must count the sender and at least one receiver, got {world_size}")
        self.world_size = world_size
        self.device = torch.device(device)
        self.buffer_bytes = buffer_bytes
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.overlap = overlap
        self.token = token
        self._store = listening_store(host, port, world_size, connect_timeout_s)
        self.address = (host, self._store.port)
        publish_sender_proof(self._store, token)
        if self.device.type == "cuda":
            cumem = os.environ.get("NCCL_CUMEM_ENABLE", CUMEM_DEFAULT)
            nccl_env(cumem)
            self._store.set("nccl_cumem", cumem)
        self._group: Group | None = None
        self._refit_id = 0
        self._sent_digest: str | None = None
        self._buffers: list[torch.Tensor] = []
        self._views: dict[int, list[torch.Tensor]] = {}

    @property
    def group(self) -> Group | None:
        """The formed group (None before `connect`): for collectives of one's own, e.g. a benchmark floor."""
        return self._group

    def connect(self) -> None:
        if self._group is None:
            check_receivers(self._store, self.token, self.world_size, self.connect_timeout_s)
            self._group = Group(store=self._store, rank=0, world_size=self.world_size, device=self.device,
                                timeout_s=self.timeout_s, connect_timeout_s=self.connect_timeout_s)
            self._sent_digest = None

    def manifest(self, meta: Meta) -> Manifest:
        return plan(meta, self.buffer_bytes)

    def stream(self, named_tensors: Iterable[tuple[str, torch.Tensor]], meta: Meta, *,
               abort_fn: AbortFn | None = None) -> SendStats:
        """Broadcast one refit. `meta` lists (name, dtype name, shape) in the order `named_tensors` yields
        them; tensors may be produced lazily. Returns once every receiver has loaded everything.
        `abort_fn` is accepted for symmetry with the ipc sender: the sender starts every collective, so it
        never waits for a refit to begin, and a failed receiver is reported to it by the status all-reduce."""
        del abort_fn
        self.connect()
        g = self._group
        assert g is not None
        if g.broken:
            raise RefitError("sender: the group is broken by an earlier failure; close() and open a new one",
                             side="sender")
        self._refit_id += 1
        rid, t0 = self._refit_id, time.perf_counter()
        own: BaseException | None = None
        manifest: Manifest | None = None
        try:
            manifest = self.manifest(meta)
        except Exception as e:
            own = e
        digest = manifest.digest() if manifest is not None else "0" * 16
        blob = encode_manifest(manifest) if manifest is not None and digest != self._sent_digest else b""
        header = Header(rid, ABORT if own else OK, len(manifest.buckets) if manifest else 0, len(blob),
                        self.overlap, digest)
        try:
            g.broadcast_wait(torch.tensor(header.words(), dtype=torch.int64, device=self.device),
                             f"receivers to take the header of refit {rid}")
            if blob:
                data = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(self.device)
                g.broadcast_wait(data, f"receivers to take the manifest of refit {rid}")
            self._sent_digest = None  # until the receivers accept it
            g.settle(rid, own, f"the manifest check of refit {rid}")
            assert manifest is not None
            if blob:
                self._views.clear()
            self._sent_digest = digest
            gather = [0.0]
            own, pack_s, wait_s = self._send_buckets(g, rid, manifest, timed(iter(named_tensors), gather))
            g.settle(rid, own, f"the final status of refit {rid}")
        except BaseException:
            self._sent_digest = None  # resend the manifest next time: a receiver may have dropped it
            raise
        return SendStats(refit_id=rid, buckets=len(manifest.buckets), bytes=manifest.total_bytes,
                                  seconds=time.perf_counter() - t0, pack_seconds=pack_s, wait_seconds=wait_s,
                                  gather_seconds=gather[0], manifest_sent=bool(blob))

    def _send_buckets(self, g: Group, rid: int, manifest: Manifest, it
                      ) -> tuple[BaseException | None, float, float]:
        buffers = frame_buffers(self._buffers, manifest, self.device)
        if buffers is not self._buffers:
            self._buffers, self._views = buffers, {}
        # (work, what, buffer): the buffer stays referenced until its broadcast completed
        slots: TwoSlots[tuple[dist.Work, str, torch.Tensor]] = TwoSlots(lambda w: g.wait(w[0], w[1]),
                                                                         overlap=self.overlap)
        own: BaseException | None = None
        pack_s = 0.0
        index = 0
        entries = manifest.entries
        for b in manifest.buckets:
            slot = slots.next_slot(b.oversized)
            t = time.perf_counter()
            buf = (torch.empty(frame_bytes(b.nbytes), dtype=torch.uint8, device=self.device) if b.oversized
                   else self._buffers[slot][:frame_bytes(b.nbytes)])
            if own is None:
                try:
                    group = [next_matching(it, e, entries, index + k) for k, e in
                             enumerate(entries[b.first:b.last])]
                    index += len(group)
                    views = self._views.get(b.index) if not b.oversized else None
                    if views is None:
                        views = bucket_views(buf, entries[b.first:b.last])
                        if not b.oversized:
                            self._views[b.index] = views
                    for v, src in zip(views, group, strict=True):
                        if v.numel():
                            write(v, src)
                    del group
                except Exception as e:
                    own = e  # keep the lockstep: this and every later bucket go out marked ABORT
            write_trailer(buf, b, trailer_words(rid, b.index, ABORT if own else OK))
            pack_s += time.perf_counter() - t
            what = f"receivers to take bucket {b.index}/{len(manifest.buckets)} of refit {rid}"
            slots.sent(slot, (g.broadcast(buf, what), what, buf))
        if own is None:
            leftover = next(it, None)
            if leftover is not None:
                own = RefitManifestError(f"extra tensor {leftover[0]!r} not in the manifest", side="sender")
        slots.drain()
        return own, pack_s, slots.wait_seconds

    def close(self) -> None:
        """Tear the group down and stop the store. Receivers should close too; a new sender can follow."""
        if self._group is not None:
            self._group.close()
            self._group = None
        self._buffers, self._views = [], {}
        self._store = None  # type: ignore[assignment]  # the master's server stops with its last reference
