"""The sending end of a colocated refit: packs a model's tensors into two alternating buffers (ping-pong).

While the receiver loads bucket N from one buffer, the sender packs bucket N+1 into the other; a buffer is
refilled only after the receiver's ack for the bucket it held. `overlap=False` waits for every ack before
packing the next bucket (the serial baseline). The protocol is documented in `receiver.py`.

The buffers live as long as the sender (the receiver keeps them opened across refits, which is what makes a
refit cheap); oversized tensors go through temporary buffers freed at the end of their bucket. On any error
every buffer is freed and the receiver told to drop its handles; `close()` frees everything.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import zmq

from colocate.refit import wire
from colocate.refit.buffers import SendBuffer
from colocate.refit.checksum import checksum
from colocate.refit.errors import RefitError, RefitManifestError, RefitTimeoutError, remote_error
from colocate.refit.plan import Entry, Manifest, ManifestError, Meta, dtype_from_name, next_matching, plan


@dataclass
class StreamStats:
    refit_id: int
    buckets: int
    bytes: int
    seconds: float
    pack_seconds: float
    """Filling buffers, including `gather_seconds`."""
    wait_seconds: float
    gather_seconds: float = 0.0
    """Inside the tensor iterator (an FSDP policy's all-gather of each parameter)."""


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
    ) -> None:
        """`per_tensor` is the naive path kept for comparison: one fresh buffer (GPU: the tensor itself,
        shared in place) and one handle to open per tensor."""
        self.token = token.encode()
        self.job_dir = job_dir
        self.device = torch.device(device)
        self.buffer_bytes = buffer_bytes
        self.timeout_s = timeout_s
        self.overlap = overlap
        self.verify = verify
        self.per_tensor = per_tensor
        self._refit_id = 0
        self._seq = 0
        self._prepared: str | None = None
        self._buffers: list[SendBuffer] = []
        self._temporaries: list[SendBuffer] = []  # oversized buckets in flight
        # (seq, slot, temporary buffer, checksums sent): the Loads not yet acked
        self._in_flight: deque[tuple[int, int, SendBuffer | None, list[int] | None]] = deque()
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
            if left <= 0 or not self._sock.poll(int(left * 1000)):
                raise RefitTimeoutError(
                    f"sender: no ack for message {seq} of refit {self._refit_id} within {self.timeout_s:.1f}s "
                    "(receiver dead or stuck?)", side="sender")
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
                raise RefitError(f"sender: ack {msg.seq} arrived before ack {seq}")

    # -- streaming ---------------------------------------------------------------------------------------
    def manifest(self, meta: Meta) -> Manifest:
        return plan(meta, self.buffer_bytes, one_per_bucket=self.per_tensor)

    def stream(self, named_tensors: Iterable[tuple[str, torch.Tensor]], meta: Meta) -> StreamStats:
        """Send one refit. `meta` lists (name, dtype name, shape) in the order `named_tensors` yields them;
        the iterator may produce tensors lazily (gathered one at a time)."""
        self._refit_id += 1
        t0 = time.perf_counter()
        try:
            return self._stream(named_tensors, self.manifest(meta), t0)
        except RefitError as e:
            if e.side != "receiver":
                self._abort(e)  # our own protocol failure: tell the receiver, which may still be waiting
            self._release_all(tell_receiver=False)
            raise
        except Exception as e:
            # Our own failure (bad tensor, bad iterator): the receiver must fail the same way, not time out.
            # Let it finish the buckets already handed over first: their buffers must outlive its reads.
            self._drain()
            self._abort(e)
            self._release_all(tell_receiver=False)
            if isinstance(e, ManifestError):
                raise RefitManifestError(f"sender: {e}", side="sender") from e
            raise

    def _drain(self) -> None:
        try:
            while self._in_flight:
                self._wait_ack(self._in_flight.popleft()[0])
        except RefitError:
            pass  # the receiver failed too, or is gone: we report our own error
        self._in_flight.clear()

    def _abort(self, e: Exception) -> None:
        # Never blocks: a dead receiver must not cost a second timeout.
        msg = wire.Abort(self._refit_id, self._next_seq(), type(e).__name__, str(e), traceback.format_exc())
        with contextlib.suppress(zmq.ZMQError):
            self._sock.send_multipart(wire.encode(self.token, msg), flags=zmq.NOBLOCK)

    def _stream(self, named_tensors: Iterable[tuple[str, torch.Tensor]], manifest: Manifest,
                t0: float) -> StreamStats:
        rid = self._refit_id
        digest = manifest.digest()
        if digest != self._prepared:
            self._release_all(tell_receiver=True)
            self._views.clear()
            seq = self._next_seq()
            self._send(wire.Prepare(rid, seq, manifest))
            self._wait_ack(seq)
            self._prepared = digest
        self._send(wire.Begin(rid, self._next_seq(), digest, self.verify))
        if not self.per_tensor and not self._buffers:
            self._buffers = [SendBuffer(self.buffer_bytes, device=self.device, job_dir=self.job_dir)
                             for _ in range(2)]
        in_flight = self._in_flight
        in_flight.clear()
        pack_s = wait_s = 0.0
        index = 0  # next manifest entry expected
        entries = manifest.entries

        def wait_oldest() -> None:
            nonlocal wait_s
            t = time.perf_counter()
            seq, _slot, tmp, sums = in_flight.popleft()
            ack = self._wait_ack(seq)
            wait_s += time.perf_counter() - t
            if tmp is not None:
                tmp.close()
                self._temporaries.remove(tmp)
            if self.verify and ack.checksums != sums:  # the receiver's own sums, checked on this side too
                raise RefitError(f"sender: receiver's checksums for message {seq} differ from the sent ones")

        gather = [0.0]
        it = timed(iter(named_tensors), gather)
        regular = 0  # the two buffers alternate over the buckets that use them
        for bucket in manifest.buckets:
            own = bucket.oversized or self.per_tensor
            slot = -1 if own else regular % 2
            regular += not own
            # A buffer is refilled only after its ack; at most two buckets are ever in flight.
            while in_flight and (not self.overlap or len(in_flight) >= 2
                                 or any(s == slot for _, s, _, _ in in_flight)):
                wait_oldest()
            t = time.perf_counter()
            group = []
            for e in entries[bucket.first:bucket.last]:
                group.append((e, next_matching(it, e, entries, index)))
                index += 1
            buf, tmp = self._buffer_for(own, slot, group)
            if tmp is None and bucket.index not in self._views:
                self._views[bucket.index] = _views(buf, group)
            sums = _pack(buf, group, self.verify, self._views.get(bucket.index) if tmp is None else None)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            del group
            pack_s += time.perf_counter() - t
            seq = self._next_seq()
            self._send(wire.Load(rid, seq, bucket.index, buf.handle, sums))
            in_flight.append((seq, slot, tmp, sums))
        leftover = next(it, None)
        if leftover is not None:
            raise ManifestError(f"extra tensor {leftover[0]!r} not in the manifest")
        while in_flight:
            wait_oldest()
        seq = self._next_seq()
        self._send(wire.Done(rid, seq, len(manifest.buckets)))
        self._wait_ack(seq)
        return StreamStats(rid, len(manifest.buckets), manifest.total_bytes, time.perf_counter() - t0,
                           pack_s, wait_s, gather[0])

    def _buffer_for(self, own: bool, slot: int, group: list[tuple[Entry, torch.Tensor]]
                    ) -> tuple[SendBuffer, SendBuffer | None]:
        if not own:
            return self._buffers[slot], None
        (e, t), = group
        share = None
        if self.device.type == "cuda" and t.is_cuda and t.is_contiguous():
            share = t.view(-1).view(torch.uint8) if t.numel() else None
        tmp = SendBuffer(e.nbytes, device=self.device, job_dir=self.job_dir, temporary=True, share=share)
        self._temporaries.append(tmp)
        return tmp, tmp

    def _release_all(self, *, tell_receiver: bool) -> None:
        ids = [b.handle.id for b in self._buffers]
        for b in self._buffers + self._temporaries:
            b.close()
        self._buffers, self._temporaries = [], []
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


def timed(it, total: list[float]):
    """Yield from `it`, adding the time spent producing each item to total[0]."""
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            total[0] += time.perf_counter() - t
            return
        total[0] += time.perf_counter() - t
        yield item


def _views(buf: SendBuffer, group: list[tuple[Entry, torch.Tensor]]) -> list[torch.Tensor]:
    return [buf.tensor[e.offset:e.offset + e.nbytes].view(dtype_from_name(e.dtype)).view(e.shape)
            for e, _ in group]


def _pack(buf: SendBuffer, group: list[tuple[Entry, torch.Tensor]], verify: bool,
          views: list[torch.Tensor] | None) -> list[int] | None:
    # A tensor shared in place (GPU, oversized or per-tensor) is its own buffer: nothing to copy.
    shared = buf.handle.temporary and buf.tensor.data_ptr() == group[0][1].data_ptr()
    if not shared:
        for v, (e, t) in zip(views if views is not None else _views(buf, group), group, strict=True):
            if e.nbytes:
                v.copy_(t, non_blocking=True)
    if not verify:
        return None
    return [checksum(buf.tensor[e.offset:e.offset + e.nbytes]) for e, _ in group]
