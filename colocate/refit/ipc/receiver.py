"""The receiving end of a colocated refit: binds a private ZMQ socket and loads buckets into the engine.

Protocol state machine (receiver side). S = sender, R = receiver; every frame is [token, header] (wire.py).

    IDLE ──Offer(meta)────────▶ IDLE          (shard-sliced) Ack carrying the slice of each tensor the
                                              engine worker keeps (`slice_fn`; None: all whole)
    IDLE ──Prepare(manifest)──▶ IDLE          check it (`check_fn`: does the engine accept every tensor and
                                              is every parameter filled? are its slices exactly what
                                              `slice_fn` asks for?), else Error; store it by digest; Ack
    IDLE ──Release(ids)───────▶ IDLE          close the cached buffers S freed (no reply: S may be gone)
    IDLE ──Begin(digest)──────▶ RECEIVING     unknown digest -> Error; call begin_fn (no reply: S goes on
                                              at once; a failure reaches it as the Error to its next wait)
    RECEIVING ──Load(bucket)──▶ RECEIVING     check the bucket (entries not yet seen, buffer big enough),
                                              open the buffer (cached by id), take its views for this bucket
                                              (built from the manifest once, cached with the buffer),
                                              [verify checksums], load_fn(views), synchronise the device,
                                              (a sliced entry: a SlicedTensor standing for the whole one),
                                              close it if temporary; then Ack: only now may S refill that
                                              buffer, so load_fn must copy what it is given, never keep it
    RECEIVING ──Direct(share,  ▶ RECEIVING     (one-copy) no bucket arrived yet, one source per entry; open
                 sources)                     the shared storages (cached by id), view each entry in place
                                              (a strided source of another shape: a FoldedTensor; a wider
                                              float is cast by the engine as it copies), load_fn
                                              (all), synchronise; Ack: S may write those storages again
    RECEIVING ──Done(n)───────▶ IDLE          every manifest entry arrived exactly once, else Error;
                                              finish_fn; Ack; `receive()` returns (after a Direct, S sends
                                              Done without waiting for its ack: one round trip in all)
    any ──Abort(error)────────▶ IDLE          S failed: raise the same named error here
    any ──bad frame───────────▶ same state    wrong token or unparsable: counted in `rejected`, dropped;
                                              over `wire.MAX_FRAME_BYTES`: ZMQ drops the peer unread
    any ──nothing for timeout─▶ IDLE          raise RefitTimeoutError (S is dead or stuck)
    any ──abort_fn() true─────▶ IDLE          (asked while waiting) the driver saw S's side fail: raise
                                              RefitAbortedError
    any ──local exception─────▶ IDLE          send Error(kind, traceback) to S, drop cached buffers, raise

Messages with a refit id no newer than the last one that ended for that sender (refit ids count per
connection) are stale, left over from an aborted refit, and dropped. Several senders may use one receiver
in turn (the benchmark does), each with its own manifest.
S never has more than two Loads unacked (the ping-pong buffers), so R never waits on S while S waits on R.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import zmq

from colocate.refit.checksum import checksum
from colocate.refit.errors import (
    RefitAbortedError,
    RefitError,
    RefitFrameError,
    RefitManifestError,
    RefitSliceError,
    RefitTimeoutError,
    as_side,
    remote_error,
)
from colocate.refit.folded import FoldedTensor
from colocate.refit.ipc import wire
from colocate.refit.ipc.buffers import BufferCache
from colocate.refit.ipc.jobdir import ensure_private_dir, random_name
from colocate.refit.plan import CheckFn, Entry, Manifest, Meta, bucket_views, dtype_from_name, manifest_meta
from colocate.refit.schedule import ABORT_POLL_S, AbortFn, LoadFn, ReceiveStats, SameViews
from colocate.refit.slices import Slice, as_loaded
from colocate.refit.sources import castable

# The part of each tensor (name, dtype name, shape) an engine keeps (None: whole), or None: every one whole.
SliceFn = Callable[[Meta], "list[Slice | None] | None"]


class RefitReceiver:
    def __init__(
        self,
        *,
        job_dir: str,
        token: str,
        load_fn: LoadFn,
        timeout_s: float = 60.0,
        begin_fn: Callable[[], None] | None = None,
        finish_fn: Callable[[], None] | None = None,
        check_fn: CheckFn | None = None,
        slice_fn: SliceFn | None = None,
    ) -> None:
        """`check_fn(meta)`: why the engine cannot take a manifest's tensors (None: it can); it runs once per
        manifest, before any bucket moves (`plan.expect` checks against an exact list). `slice_fn(meta)`: the
        part of each tensor the engine keeps (None: every one whole; no `slice_fn`: nothing is sliced)."""
        ensure_private_dir(job_dir)
        self.job_dir = job_dir
        self.token = token.encode()
        self.load_fn = load_fn
        self.begin_fn = begin_fn
        self.finish_fn = finish_fn
        self.timeout_s = timeout_s
        self.check_fn = check_fn
        self.slice_fn = slice_fn
        self._abort_fn: AbortFn | None = None
        self.rejected = 0
        self.cache = BufferCache(job_dir)
        # One-copy refit: the last Direct's (digest, sources), and what to hand the engine for them (the named
        # views in place, and the dtype to cast them to as it copies, if any), reused while they are the same.
        self._direct: tuple[tuple[str, list[wire.Source]], list[tuple[str, torch.Tensor]],
                            torch.dtype | list[torch.dtype] | None] | None = None
        # A load_fn taking `dtype=` casts a wider source as it copies (one copy); else it is cast here first.
        self._load_casts = "dtype" in inspect.signature(load_fn).parameters
        self._manifests: dict[str, Manifest] = {}
        self._last_refit_id: dict[bytes, int] = {}  # per sender connection
        self._peer: bytes | None = None
        # The process-wide context, not one of our own: a private context dropped with a socket still open
        # (an object never closed, collected as part of a reference cycle) blocks the garbage collector
        # forever in its finalizer (measured: gc.collect() hangs), so nothing is ever terminated here.
        self._sock = zmq.Context.instance().socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
        self._path = os.path.join(job_dir, random_name("recv") + ".sock")
        self._sock.bind(f"ipc://{self._path}")
        os.chmod(self._path, 0o600)
        self.address = f"ipc://{self._path}"

    # -- socket ------------------------------------------------------------------------------------------
    def _recv(self, timeout_s: float) -> wire.ToReceiver:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RefitTimeoutError(
                    f"receiver: no message from the sender within {timeout_s:.1f}s (dead or stuck?)",
                    side="receiver")
            if not self._sock.poll(int(min(left, ABORT_POLL_S) * 1000)):
                if self._abort_fn is not None and self._abort_fn():
                    raise RefitAbortedError("receiver: refit aborted by the driver (the sender's side failed)",
                                            side="receiver", echo=True)
                continue
            frames = self._sock.recv_multipart()
            try:
                msg = wire.decode(self.token, frames[1:], to_receiver=True)
            except wire.BadFrame:
                self.rejected += 1
                continue
            self._peer = frames[0]
            return msg  # type: ignore[return-value]

    def _send(self, msg: wire.ToSender) -> None:
        if self._peer is None:
            return
        # The sender may be gone; our own raise reports the failure.
        with contextlib.suppress(zmq.ZMQError):
            self._sock.send_multipart([self._peer, *wire.encode(self.token, msg)], flags=zmq.NOBLOCK)

    # -- one refit ---------------------------------------------------------------------------------------
    def receive(self, timeout_s: float | None = None, *, abort_fn: AbortFn | None = None) -> ReceiveStats:
        """Serve messages until one refit completes (Done) or fails; see the state machine above."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        self._abort_fn = abort_fn
        manifest: Manifest | None = None
        seen: bytearray | None = None
        refit_id, seq, msg_refit_id, digest = 0, 0, 0, ""
        t0, load_s, nbytes, buckets = 0.0, 0.0, 0, 0
        try:
            while True:
                msg = self._recv(timeout_s)
                if msg.refit_id <= self._last_refit_id.get(self._peer, 0) and not isinstance(msg, wire.Release):
                    continue  # stale: belongs to a refit that already ended
                seq, msg_refit_id = msg.seq, msg.refit_id
                if isinstance(msg, wire.Offer):
                    self._send(wire.Ack(msg.refit_id, msg.seq, slices=self._slices_for(msg.meta)))
                elif isinstance(msg, wire.Prepare):
                    self._check_expected(msg.manifest)
                    self._manifests[msg.manifest.digest()] = msg.manifest
                    self._send(wire.Ack(msg.refit_id, msg.seq))
                elif isinstance(msg, wire.Release):
                    self._drop(msg.buffer_ids)
                elif isinstance(msg, wire.Begin):
                    manifest = self._manifests.get(msg.digest)
                    if manifest is None:
                        raise RefitManifestError(f"refit {msg.refit_id}: unknown manifest {msg.digest}; "
                                                 "prepare first")
                    refit_id, seen = msg.refit_id, bytearray(len(manifest.entries))
                    digest = msg.digest
                    t0 = time.perf_counter()
                    if self.begin_fn is not None:
                        self.begin_fn()
                elif isinstance(msg, wire.Abort):
                    raise remote_error(msg.kind, msg.message, side="sender", traceback=msg.traceback)
                elif manifest is None or seen is None or msg.refit_id != refit_id:
                    raise RefitFrameError(f"receiver: {type(msg).__name__} for refit {msg.refit_id} before Begin")
                elif isinstance(msg, wire.Load):
                    t = time.perf_counter()
                    sums = self._load(manifest, seen, msg, digest)
                    load_s += time.perf_counter() - t
                    nbytes += manifest.buckets[msg.bucket].nbytes
                    buckets += 1
                    self._send(wire.Ack(msg.refit_id, msg.seq, sums))
                elif isinstance(msg, wire.Direct):
                    t = time.perf_counter()
                    self._load_direct(manifest, seen, msg, digest)
                    load_s += time.perf_counter() - t
                    nbytes += manifest.total_bytes
                    buckets += len(manifest.buckets)
                    self._send(wire.Ack(msg.refit_id, msg.seq))
                elif isinstance(msg, wire.Done):
                    missing = [manifest.entries[i].name for i, s in enumerate(seen) if not s]
                    if missing:
                        raise RefitManifestError(f"refit {refit_id}: {len(missing)} entries never arrived: "
                                            f"{missing[:5]}{'...' if len(missing) > 5 else ''}")
                    if msg.buckets_sent != buckets:
                        raise RefitFrameError(f"sender sent {msg.buckets_sent} buckets, received {buckets}")
                    if self.finish_fn is not None:
                        self.finish_fn()
                    self._last_refit_id[self._peer] = refit_id
                    self._send(wire.Ack(msg.refit_id, msg.seq))
                    return ReceiveStats(refit_id, buckets, nbytes, time.perf_counter() - t0, load_s)
        except RefitError as e:
            if not e.echo and not isinstance(e, (RefitTimeoutError, RefitAbortedError)):
                # Our own finding (a mismatch, a bad frame): the sender must fail the same way.
                self._send(wire.Error(msg_refit_id, seq, type(e).__name__, e.message, traceback.format_exc()))
            # Otherwise the sender already knows (Abort) or is gone (timeout): nothing to tell it.
            self._fail(msg_refit_id)
            raise as_side(e, "receiver")  # noqa: B904 (the same exception, its side filled in)
        except Exception as e:
            self._send(wire.Error(msg_refit_id, seq, type(e).__name__, str(e), traceback.format_exc()))
            self._fail(msg_refit_id)
            raise

    def _fail(self, refit_id: int) -> None:
        if self._peer is not None:
            self._last_refit_id[self._peer] = max(self._last_refit_id.get(self._peer, 0), refit_id)
        self._drop()

    def drop_buffers(self) -> None:
        """Close every buffer and storage of the sender's that this receiver keeps open."""
        self._drop()

    def _drop(self, ids: list[str] | None = None) -> None:
        self._direct = None
        self.cache.drop(ids)

    def _load_direct(self, manifest: Manifest, seen: bytearray, msg: wire.Direct, digest: str) -> None:
        if any(seen) or len(msg.sources) != len(manifest.entries):
            raise RefitFrameError(f"direct refit: {len(msg.sources)} sources for {len(manifest.entries)} entries"
                                  " (or after a bucket)")
        for h in msg.share:
            if h.cuda is None or h.temporary:
                raise RefitFrameError(f"direct refit: {h.id} is not a shared CUDA storage")
            self.cache.get(h)
        key = (digest, msg.sources)
        if self._direct is None or self._direct[0] != key:
            self._direct = (key, *self._direct_views(manifest, msg.sources))
        _, named, cast = self._direct
        if isinstance(cast, list):  # mixed dtypes wanted, or a loader that cannot cast: a cast copy first
            self.load_fn([(n, v.to(w)) for (n, v), w in zip(named, cast, strict=True)])
        elif cast is not None:
            self.load_fn(named, dtype=cast)  # type: ignore[call-arg]
        else:
            self.load_fn(named)
        if named and named[0][1].is_cuda:
            torch.cuda.synchronize(named[0][1].device)  # nothing reads the sender's storages after the ack
        seen[:] = b"\x01" * len(seen)

    def _direct_views(self, manifest: Manifest, sources: list[wire.Source]
                      ) -> tuple[list[tuple[str, torch.Tensor]], torch.dtype | list[torch.dtype] | None]:
        """Each entry viewed in place in the sender's storages (handed to the engine again at every refit
        while the sources stay the same: `SameViews`), and how to cast them: None (each is already its
        entry's dtype), one dtype (the loader casts as it copies) or each entry's (cast here first)."""
        named = SameViews()
        for e, src in zip(manifest.entries, sources, strict=True):
            buf = self.cache.opened(src.buffer)
            dtype, want = dtype_from_name(src.dtype), dtype_from_name(e.dtype)
            if not castable(dtype, want):
                raise RefitFrameError(f"direct refit: {e.name} is {src.dtype}, expected {e.dtype}")
            view = _strided_view(buf, src, dtype, e)
            named.append((e.name, view if tuple(view.shape) == e.shape else FoldedTensor(e.shape, view)))
        wanted = [dtype_from_name(e.dtype) for e in manifest.entries]
        if all(v.dtype == w for (_, v), w in zip(named, wanted, strict=True)):
            return named, None
        if self._load_casts and len(set(wanted)) == 1:
            return named, wanted[0]
        return named, wanted

    def _slices_for(self, meta: Meta) -> list[Slice | None] | None:
        slices = self.slice_fn([(n, d, tuple(s)) for n, d, s in meta]) if self.slice_fn is not None else None
        return slices if slices is not None and any(slices) else None

    def _check_expected(self, manifest: Manifest) -> None:
        meta = manifest_meta(manifest)
        why = self.check_fn(meta) if self.check_fn is not None else None
        if why is not None:
            raise RefitManifestError(why)
        got = [e.sliced for e in manifest.entries]
        if any(got):
            want = self._slices_for(meta) or [None] * len(got)
            wrong = [f"{e.name}: {g} != {w}" for e, g, w in zip(manifest.entries, got, want, strict=True) if g != w]
            if wrong:
                raise RefitSliceError(f"manifest slices are not what the engine keeps: {wrong[:5]}")

    def _load(self, manifest: Manifest, seen: bytearray, msg: wire.Load, digest: str) -> list[int] | None:
        if not 0 <= msg.bucket < len(manifest.buckets):
            raise RefitFrameError(f"bucket {msg.bucket} not in manifest ({len(manifest.buckets)} buckets)")
        bucket = manifest.buckets[msg.bucket]
        if msg.buffer.nbytes < bucket.nbytes:
            raise RefitFrameError(f"bucket {msg.bucket} needs {bucket.nbytes} bytes, buffer has "
                                  f"{msg.buffer.nbytes}")
        dup = [manifest.entries[i].name for i in range(bucket.first, bucket.last) if seen[i]]
        if dup:
            raise RefitFrameError(f"bucket {msg.bucket}: entries arrived twice: {dup[:5]}")
        buf = self.cache.get(msg.buffer)
        try:
            entries = manifest.entries[bucket.first:bucket.last]
            # The bucket's (name, view) pairs, built once per buffer and bucket and handed over again at every
            # refit (`SameViews`: the engine's loader keeps its plan for them too).
            named = buf.views.get((digest, msg.bucket))
            if named is None:
                named = SameViews((e.name, as_loaded(e.name, e.shape, e.sliced, v))
                                  for e, v in zip(entries, bucket_views(buf.tensor, entries), strict=True))
                if not msg.buffer.temporary:
                    buf.views[(digest, msg.bucket)] = named
            if msg.checksums is not None:
                sums = [checksum(buf.tensor[e.offset:e.offset + e.nbytes]) for e in entries]
                if sums != msg.checksums:
                    bad = [e.name for e, a, b in zip(entries, sums, msg.checksums, strict=True) if a != b]
                    raise RefitFrameError(f"bucket {msg.bucket}: checksum mismatch in {bad[:5]}")
            else:
                sums = None
            self.load_fn(named)
            # Nothing may read the buffer after the ack (the sender refills it next): wait for the device.
            # The typed views stay cached with the buffer; the engine must copy, never keep, what it is given.
            if buf.tensor.is_cuda:
                torch.cuda.current_stream(buf.tensor.device).synchronize()
        finally:
            if msg.buffer.temporary:
                buf.close()
        for i in range(bucket.first, bucket.last):
            seen[i] = 1
        return sums

    def close(self) -> None:
        self._drop()
        self._sock.close(0)
        if os.path.exists(self._path):
            os.unlink(self._path)


def _strided_view(buf: Any, src: wire.Source, dtype: torch.dtype, e: Entry) -> torch.Tensor:
    """`src`'s view of entry `e` in the opened storage `buf` (contiguous in the entry's shape, or the strided view
    the source names), every element it reaches inside it."""
    if src.shape is None:
        shape, stride = e.shape, torch.empty(e.shape, device="meta").stride()
    else:
        shape, stride = tuple(src.shape), tuple(src.stride or ())
    item = dtype.itemsize
    reach = 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=False)) if all(shape) else 0
    whole = buf.handle.nbytes // item if buf is not None else 0
    if (buf is None or len(shape) != len(stride) or min(stride, default=0) < 0 or src.byte_offset < 0
            or src.byte_offset % item or src.byte_offset // item + reach > whole):
        raise RefitFrameError(f"direct refit: {e.name} lies outside storage {src.buffer} "
                              f"(shape {shape}, stride {stride}, byte offset {src.byte_offset})")
    if math.prod(shape) != math.prod(e.shape):
        raise RefitFrameError(f"direct refit: {e.name} is viewed as {shape}, not {e.shape}'s {math.prod(e.shape)} "
                              "elements")
    return buf.tensor[:whole * item].view(dtype)[src.byte_offset // item:].as_strided(shape, stride)

