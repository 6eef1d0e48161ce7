"""The sending end of a colocated refit: packs a model's tensors into two alternating buffers (ping-pong).

While the receiver loads bucket N from one buffer, the sender packs bucket N+1 into the other; a buffer is
refilled only after the receiver's ack for the bucket it held (`schedule.TwoSlots`). `overlap=False` waits
for every ack before packing the next bucket (the serial baseline). The protocol is documented in
`receiver.py`.

The buffers live as long as the sender (the receiver keeps them opened across refits, which is what makes a
refit cheap); oversized tensors go through temporary buffers freed at the end of their bucket. On any error
every buffer is freed and the receiver told to drop its handles; `close()` frees everything.

Shard-sliced refit (`shard_slice=True`): before planning a new layout the sender offers the tensors' (name,
dtype, shape) and the receiver answers with the slice of each that its engine worker keeps (a TP worker's
shard; none for an engine of one worker); the manifest is planned with those slices and only they are
packed. The answer is kept until the tensors offered change.

One-copy refit (`stream(..., resident=...)`, CUDA): when every weight already sits whole in this device's
memory, no buffer is packed: the storages holding them are shared once (cached by address: a storage the
engine has opened cannot be freed and reused while it is open, CUDA IPC keeps it alive), and one `Direct`
message names where each entry lives (offset, and shape and strides for a view that is not contiguous in
the entry's shape: a weight inside a fused parameter, `refit/folded.py`); the engine copies straight from
there.
"""

from __future__ import annotations

import contextlib
import math
import time
import traceback
from collections.abc import Iterable

import torch
import zmq

from colocate.refit.checksum import checksum
from colocate.refit.errors import (
    RefitAbortedError,
    RefitError,
    RefitFrameError,
    RefitManifestError,
    RefitTimeoutError,
    as_side,
    remote_error,
)
from colocate.refit.ipc import wire
from colocate.refit.ipc.buffers import SendBuffer
from colocate.refit.ipc.jobdir import ensure_private_dir
from colocate.refit.plan import Entry, Manifest, Meta, bucket_views, dtype_from_name, dtype_name, next_matching, plan
from colocate.refit.schedule import ABORT_POLL_S, AbortFn, SendStats, TwoSlots, timed
from colocate.refit.slices import Slice
from colocate.refit.sources import Fill, Source, castable, write

# (seq, temporary buffer, checksums sent): a Load not yet acked
InFlight = tuple[int, "SendBuffer | None", "list[int] | None"]


class RefitSender:
    def __init__(
        self,
        *,
        address: str,
        token: str,
        job_dir: str,
        device: str,
        buffer_bytes: int,
        timeout_s: float = 60.0,
        overlap: bool = True,
        verify: bool = False,
        per_tensor: bool = False,
        shard_slice: bool = True,
    ) -> None:
        """`per_tensor` is the naive path kept for comparison: one fresh buffer (GPU: the tensor itself,
        shared in place) and one handle to open per tensor. `shard_slice`: send only the part of each tensor
        the receiving engine worker keeps, as it says (see the module docstring)."""
        self.token = token.encode()
        # The driver made the job's directory on its own node; on another node of the job the first of its
        # receivers or senders to come makes it there (private, like the driver's).
        ensure_private_dir(job_dir)
        self.job_dir = job_dir
        self.device = torch.device(device)
        self.buffer_bytes = buffer_bytes
        self.timeout_s = timeout_s
        self.overlap = overlap
        self.verify = verify
        self.per_tensor = per_tensor
        self.shard_slice = shard_slice
        self._offered: tuple[list, list[Slice | None] | None] | None = None  # (meta, the receiver's answer)
        self._abort_fn: AbortFn | None = None
        self._refit_id = 0
        self._seq = 0
        self._prepared: str | None = None
        # The last layout planned: ((meta, slices), manifest, digest). Planning ~340 tensors and hashing the
        # result costs ~0.5 ms of Python, as much as the engine's copy of a small model; the meta repeats.
        self._planned: tuple[tuple[list, list[Slice | None] | None], Manifest, str] | None = None
        # One-copy refit: what the last Direct sent, while the resident tensors stay where they were:
        # ((digest, each tensor's (name, address, dtype, shape, contiguous)), its sources).
        self._direct_sent: tuple[tuple[str, list], list[wire.Source]] | None = None
        self._buffers: list[SendBuffer] = []
        self._temporaries: list[SendBuffer] = []  # oversized buckets in flight
        # One-copy refit: storage address -> the handle it was shared under (see the module docstring).
        self._shared: dict[int, SendBuffer] = {}
        self._slots: TwoSlots[InFlight] = TwoSlots(self._finish, overlap=overlap)
        # Typed views into the ping-pong buffers per bucket, made once: building ~300 views costs more
        # Python time per refit than the copies themselves on a small model.
        self._views: dict[int, list[torch.Tensor]] = {}
        # The process-wide context, not one of our own: a private context dropped with a socket still open
        # (an object never closed, collected as part of a reference cycle) blocks the garbage collector
        # forever in its finalizer (measured: gc.collect() hangs), so nothing is ever terminated here.
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
        self._sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        self._sock.connect(address)
        self.address = address

    # -- socket ------------------------------------------------------------------------------------------
    def _send(self, msg: wire.ToReceiver) -> None:
        try:
            self._sock.send_multipart(wire.encode(self.token, msg))
        except zmq.Again:
            raise RefitTimeoutError(f"sender: receiver took no message within {self.timeout_s:.1f}s",
                                    side="sender") from None

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _wait_ack(self, seq: int) -> wire.Ack:
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RefitTimeoutError(
                    f"sender: no ack for message {seq} of refit {self._refit_id} from {self.address} within "
                    f"{self.timeout_s:.1f}s (receiver dead or stuck?)", side="sender")
            if not self._sock.poll(int(min(left, ABORT_POLL_S) * 1000)):
                if self._abort_fn is not None and self._abort_fn():
                    raise RefitAbortedError(f"sender: refit {self._refit_id} aborted by the driver (the "
                                            "receiver's side failed)", side="sender", echo=True)
                continue
            try:
                msg = wire.decode(self.token, self._sock.recv_multipart(), to_receiver=False)
            except wire.BadFrame:
                continue
            if msg.refit_id != self._refit_id:
                continue  # stale reply from an earlier, aborted refit
            if isinstance(msg, wire.Error):
                raise remote_error(msg.kind, msg.message, side="receiver", traceback=msg.traceback)
            if msg.seq == seq:
                return msg
            if msg.seq > seq:
                raise RefitFrameError(f"sender: ack {msg.seq} arrived before ack {seq}", side="sender")

    # -- streaming ---------------------------------------------------------------------------------------
    def manifest(self, meta: Meta, slices: list[Slice | None] | None = None) -> Manifest:
        return plan(meta, self.buffer_bytes, one_per_bucket=self.per_tensor, slices=slices)

    def _plan(self, meta: Meta, slices: list[Slice | None] | None) -> tuple[Manifest, str]:
        """The manifest for (meta, slices) and its digest, planned again only when they change."""
        key = (list(meta), slices)
        if self._planned is None or self._planned[0] != key:
            manifest = self.manifest(meta, slices)
            self._planned = (key, manifest, manifest.digest())
        return self._planned[1], self._planned[2]

    @property
    def slices(self) -> list[Slice | None] | None:
        """The receiver's last answer: the part of each offered tensor it keeps (None: every one whole)."""
        return self._offered[1] if self._offered is not None else None

    def _slices(self, meta: Meta) -> list[Slice | None] | None:
        """What the receiver's engine worker keeps of each tensor (None: all of every one), asked once per
        offer."""
        if not self.shard_slice:
            return None
        meta = [(n, d, tuple(s)) for n, d, s in meta]
        if self._offered is None or self._offered[0] != meta:
            seq = self._next_seq()
            self._send(wire.Offer(self._refit_id, seq, meta))
            slices = self._wait_ack(seq).slices
            if slices is not None and len(slices) != len(meta):
                raise RefitFrameError(f"sender: {len(slices)} slices for an offer of {len(meta)} tensors",
                                      side="sender")
            self._offered = (meta, slices if slices is not None and any(slices) else None)
        return self._offered[1]

    def stream(self, named_tensors: Iterable[tuple[str, Source]], meta: Meta, *,
               abort_fn: AbortFn | None = None, resident: list[tuple[str, torch.Tensor]] | None = None
               ) -> SendStats:
        """Send one refit. `meta` lists (name, dtype name, shape) in the order `named_tensors` yields them;
        the iterator may produce tensors lazily (gathered one at a time) or as `Fill`s written straight into
        the buffers. `resident`: every weight, in `meta` order, already whole on this device: sent by the
        one-copy path where it applies (then `named_tensors` is not read; see `one_copy`). `abort_fn`: asked
        while waiting for an ack; True ends the refit with RefitAbortedError (the driver saw the receiver's
        side fail)."""
        self._abort_fn = abort_fn
        self._refit_id += 1
        t0 = time.perf_counter()
        try:
            if resident is not None:
                # In place, the engine reads only the slice it keeps anyway: nothing to slice here.
                manifest, digest = self._plan(meta, None)
                # Where every tensor is still where the last Direct found it, nothing needs checking again.
                placed = (digest, [(n, t.data_ptr(), t.dtype, t.shape, t.stride()) for n, t in resident])
                if (self._direct_sent is not None and self._direct_sent[0] == placed) or self.one_copy(resident):
                    return self._stream_direct(resident, manifest, digest, placed, t0)
            manifest, digest = self._plan(meta, self._slices(meta))
            return self._stream(named_tensors, manifest, digest, t0)
        except RefitError as e:
            if not e.echo and not isinstance(e, RefitManifestError):
                self._abort(e)  # our own protocol failure: tell the receiver, which may still be waiting
            elif isinstance(e, RefitManifestError) and not e.echo:
                # Our own mismatch (a tensor not as planned): let the receiver finish the buckets already
                # handed over first (their buffers must outlive its reads), then make it fail the same way.
                self._drain()
                self._abort(as_side(e, "sender"))
            self._release_all(tell_receiver=False)
            raise
        except Exception as e:
            # Our own failure (bad iterator, a bug): the receiver must fail the same way, not time out.
            self._drain()
            self._abort(e)
            self._release_all(tell_receiver=False)
            raise

    def _finish(self, item: InFlight) -> None:
        seq, tmp, sums = item
        ack = self._wait_ack(seq)
        if tmp is not None:
            tmp.close()
            self._temporaries.remove(tmp)
        if self.verify and ack.checksums != sums:  # the receiver's own sums, checked on this side too
            raise RefitFrameError(f"sender: receiver's checksums for message {seq} differ from the sent ones",
                                  side="sender")

    def _drain(self) -> None:
        try:
            for seq, _tmp, _sums in self._slots.pending():
                self._wait_ack(seq)
        except RefitError:
            pass  # the receiver failed too, or is gone: we report our own error
        self._slots.clear()

    def _abort(self, e: Exception) -> None:
        # Never blocks: a dead receiver must not cost a second timeout.
        msg = wire.Abort(self._refit_id, self._next_seq(), type(e).__name__, str(e), traceback.format_exc())
        with contextlib.suppress(zmq.ZMQError):
            self._sock.send_multipart(wire.encode(self.token, msg), flags=zmq.NOBLOCK)

    def one_copy(self, resident: list[tuple[str, torch.Tensor]]) -> bool:
        """Whether these tensors can be read in place by the engine: CUDA, on this device (and not the naive
        per-tensor or verify modes, kept for comparison). Any strides: a view that is not contiguous, or
        not of its entry's shape (q inside Megatron's fused qkv), goes with its shape and strides."""
        if self.device.type != "cuda" or self.per_tensor or self.verify:
            return False
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        return all(t.is_cuda and t.device.index == index for _, t in resident)

    def _begin(self, manifest: Manifest, digest: str) -> bool:
        """Prepare (when the layout is new) and Begin; returns whether the manifest was sent."""
        rid = self._refit_id
        prepared = digest != self._prepared
        if prepared:
            self._release_all(tell_receiver=True)
            self._views.clear()
            seq = self._next_seq()
            self._send(wire.Prepare(rid, seq, manifest))
            self._wait_ack(seq)
            self._prepared = digest
        self._send(wire.Begin(rid, self._next_seq(), digest, self.verify))
        return prepared

    def _stream_direct(self, resident: list[tuple[str, torch.Tensor]], manifest: Manifest, digest: str,
                       placed: tuple[str, list], t0: float) -> SendStats:
        rid = self._refit_id
        prepared = self._begin(manifest, digest)
        t = time.perf_counter()
        if self._direct_sent is not None and self._direct_sent[0] == placed:
            # The same tensors at the same addresses, in storages still shared (this sender holds them, so
            # their memory cannot have been handed to other tensors): the same sources, nothing new to share.
            share, sources = [], self._direct_sent[1]
        else:
            share, sources = self._share_resident(resident, manifest, rid)
        # The engine reads these storages from its own stream: whatever wrote them must have finished.
        torch.cuda.synchronize(self.device)
        pack_s = time.perf_counter() - t
        seq = self._next_seq()
        self._send(wire.Direct(rid, seq, share, sources))
        # Done goes right behind: the receiver takes it only after the Direct is loaded (and drops it as
        # stale if that failed), so one round trip ends the refit.
        done_seq = self._next_seq()
        self._send(wire.Done(rid, done_seq, len(manifest.buckets)))
        t = time.perf_counter()
        self._wait_ack(seq)
        wait_s = time.perf_counter() - t
        self._wait_ack(done_seq)
        self._direct_sent = (placed, sources)
        return SendStats(rid, len(manifest.buckets), manifest.total_bytes, time.perf_counter() - t0,
                         pack_s, wait_s, 0.0, manifest_sent=prepared, one_copy=True)

    def _share_resident(self, resident: list[tuple[str, torch.Tensor]], manifest: Manifest, rid: int
                        ) -> tuple[list[wire.Handle], list[wire.Source]]:
        """Where each resident tensor lives (a shared storage and an offset into it), sharing the storages
        not shared yet and releasing those that no longer hold a weight."""
        self._direct_sent = None
        if len(resident) != len(manifest.entries):
            raise RefitManifestError(f"{len(resident)} resident tensors for a manifest of "
                                     f"{len(manifest.entries)}", side="sender")
        share: list[wire.Handle] = []
        sources: list[wire.Source] = []
        used: set[int] = set()
        replaced: list[SendBuffer] = []
        for e, (name, tensor) in zip(manifest.entries, resident, strict=True):
            # A view of another shape stands for the entry when its elements in row-major order are the
            # entry's (`refit/folded.py`): the backend that hands it over vouches for that; the count must match.
            same_shape = tuple(tensor.shape) == e.shape
            if (name != e.name or (not same_shape and tensor.numel() != math.prod(e.shape))
                    or not castable(tensor.dtype, dtype_from_name(e.dtype))):
                raise RefitManifestError(f"resident {name!r} {tuple(tensor.shape)} {tensor.dtype} is not "
                                         f"manifest entry {e.name!r} {e.shape} {e.dtype}", side="sender")
            storage = tensor.untyped_storage()
            base = storage.data_ptr()
            buf = self._shared.get(base)
            if buf is None or buf.nbytes != storage.nbytes():
                if buf is not None:
                    replaced.append(buf)
                whole = torch.empty(0, dtype=torch.uint8, device=self.device).set_(storage, 0, (storage.nbytes(),))
                buf = self._shared[base] = SendBuffer(storage.nbytes(), device=self.device, job_dir=self.job_dir,
                                                      share=whole)
                share.append(buf.handle)
            used.add(base)
            strided = not (same_shape and tensor.is_contiguous())
            sources.append(wire.Source(buf.handle.id, tensor.data_ptr() - base, dtype_name(tensor.dtype),
                                       tuple(tensor.shape) if strided else None,
                                       tuple(tensor.stride()) if strided else None))
        # Storages no longer holding a weight (the policy reallocated): the engine lets go of them, so CUDA
        # IPC can free them.
        stale = replaced + [self._shared.pop(b) for b in list(self._shared) if b not in used]
        if stale:
            self._send(wire.Release(rid, self._next_seq(), [b.handle.id for b in stale]))
            for b in stale:
                b.close()
        return share, sources

    def _stream(self, named_tensors: Iterable[tuple[str, Source]], manifest: Manifest, digest: str,
                t0: float) -> SendStats:
        rid = self._refit_id
        prepared = self._begin(manifest, digest)
        if not self.per_tensor and not self._buffers:
            self._buffers = [SendBuffer(self.buffer_bytes, device=self.device, job_dir=self.job_dir)
                             for _ in range(2)]
        slots = self._slots = TwoSlots(self._finish, overlap=self.overlap)
        pack_s = 0.0
        index = 0  # next manifest entry expected
        entries = manifest.entries
        gather = [0.0]
        it = timed(iter(named_tensors), gather)
        for bucket in manifest.buckets:
            own = bucket.oversized or self.per_tensor
            slot = slots.next_slot(own)
            t = time.perf_counter()
            group = []
            for e in entries[bucket.first:bucket.last]:
                group.append((e, next_matching(it, e, entries, index)))
                index += 1
            buf, tmp = self._buffer_for(own, slot, group)
            if tmp is None and bucket.index not in self._views:
                self._views[bucket.index] = bucket_views(buf.tensor, [e for e, _ in group])
            sums = _pack(buf, group, self.verify, self._views.get(bucket.index) if tmp is None else None)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            del group
            pack_s += time.perf_counter() - t
            seq = self._next_seq()
            self._send(wire.Load(rid, seq, bucket.index, buf.handle, sums))
            slots.sent(slot, (seq, tmp, sums))
        leftover = next(it, None)
        if leftover is not None:
            raise RefitManifestError(f"extra tensor {leftover[0]!r} not in the manifest", side="sender")
        slots.drain()
        seq = self._next_seq()
        self._send(wire.Done(rid, seq, len(manifest.buckets)))
        self._wait_ack(seq)
        return SendStats(rid, len(manifest.buckets), manifest.total_bytes, time.perf_counter() - t0,
                         pack_s, slots.wait_seconds, gather[0], manifest_sent=prepared,
                         sliced=sum(e.sliced is not None for e in entries))

    def _buffer_for(self, own: bool, slot: int, group: list[tuple[Entry, Source]]
                    ) -> tuple[SendBuffer, SendBuffer | None]:
        if not own:
            return self._buffers[slot], None
        (e, t), = group
        share = None
        if self.device.type == "cuda" and isinstance(t, torch.Tensor) and t.is_cuda and t.is_contiguous():
            share = t.view(-1).view(torch.uint8) if t.numel() else None
        tmp = SendBuffer(e.nbytes, device=self.device, job_dir=self.job_dir, temporary=True, share=share)
        self._temporaries.append(tmp)
        return tmp, tmp

    def _release_all(self, *, tell_receiver: bool) -> None:
        shared = list(self._shared.values())
        ids = [b.handle.id for b in self._buffers + shared]
        for b in self._buffers + self._temporaries + shared:
            b.close()
        self._buffers, self._temporaries, self._shared = [], [], {}
        self._direct_sent = None
        self._views.clear()
        self._prepared = None if not tell_receiver else self._prepared
        if tell_receiver and ids:
            # Fire and forget: the receiver may not be serving now (it drops them when it next serves).
            with contextlib.suppress(zmq.ZMQError):
                self._sock.send_multipart(wire.encode(self.token, wire.Release(self._refit_id, self._next_seq(), ids)),
                                          flags=zmq.NOBLOCK)

    def close(self) -> None:
        """Free the buffers and tell the receiver to drop them (best effort: it may be gone)."""
        self._release_all(tell_receiver=True)
        self._sock.close(linger=200)  # long enough to hand the Release over, bounded if the peer is gone


def _pack(buf: SendBuffer, group: list[tuple[Entry, Source]], verify: bool,
          views: list[torch.Tensor] | None) -> list[int] | None:
    # A tensor shared in place (GPU, oversized or per-tensor) is its own buffer: nothing to copy.
    first = group[0][1]
    shared = (buf.handle.temporary and not isinstance(first, Fill)
              and buf.tensor.data_ptr() == first.data_ptr())
    if not shared:
        if views is None:
            views = bucket_views(buf.tensor, [e for e, _ in group])
        for v, (e, t) in zip(views, group, strict=True):
            if e.nbytes:
                write(v, t, e.sliced)
    if not verify:
        return None
    return [checksum(buf.tensor[e.offset:e.offset + e.nbytes]) for e, _ in group]
