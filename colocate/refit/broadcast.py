"""Split-placement refit: policy rank 0 broadcasts the model, bucket by bucket, to every generation worker.

The group is the sender (rank 0) and the N receivers (ranks 1..N, one per TP rank of every engine), and
nothing else. It is never the default process group: vLLM's workers and FSDP's policy ranks each have one
already, so the group is built from its own `TCPStore` (the sender is its master, on a port the OS picks)
and a backend constructed directly (`ProcessGroupGloo` on CPU, `ProcessGroupNCCL` on GPU, same code),
as vLLM's StatelessProcessGroup and verl do. `torch.distributed.init_process_group` is never called.

Setup, once per group: S's store listens on a port the OS picks and S publishes (host, port) under
`bcast/<job>` with the job's rendezvous actor (`publish_master`); each R looks it up (`lookup_master`),
connects to the store and joins. Forming the group waits up to `connect_timeout_s` for every rank (an
engine may still be starting), then one all-reduce proves everyone is in (on NCCL it also creates the
communicator, which is lazy).

Protocol state machine, one refit, every rank in lockstep (each step is one collective over the group):

    HEADER    S broadcasts int64[8] (`Header`): refit id, status (OK | ABORT: S failed before any bucket),
              bucket count, manifest length (0: the manifest the receivers hold), overlap, manifest digest
    MANIFEST  only when the length is > 0 (once per model or layout): S broadcasts the msgspec-JSON manifest
    CHECK     all-reduce MAX of int64[world], each rank writing 0/1 in its own slot. R fails if the digest
              is not the one of the manifest it holds or the manifest is not what the engine expects; S
              fails if it could not plan. Any 1: every rank raises now, before any bucket moves, the same
              named error (RefitManifestError for a mismatch); the failing rank's kind, message and
              traceback are read from the TCP store, where it put them before the all-reduce.
    BUCKETS   for each bucket: S broadcasts uint8[nbytes | pad | trailer]; the trailer (int64[4]: refit id,
              bucket, status, magic) is checked before R loads the bucket. Two buffers alternate on both
              sides: S packs bucket N+1 while bucket N is on the wire, R has bucket N+1 arriving while it
              loads bucket N (overlap off: one bucket at a time on both sides). Oversized buckets use a
              buffer of their own size. The bucket count is fixed by the header, so a rank that fails here
              keeps going through the remaining buckets: S sends them with status ABORT and packs nothing,
              R receives them without loading. Nobody leaves the lockstep early.
    STATUS    R checks every manifest entry arrived exactly once and calls `finish_fn`; all-reduce as in
              CHECK, so a failure anywhere is raised everywhere; S's `stream()` returns only now.

Every wait of a formed group is bounded by `timeout_s`: a dead or stuck rank makes every live one raise
`RefitTimeoutError` within about `timeout_s` (a closed connection is reported at once, a silent peer after
the timeout), and marks the group broken: `close()` it and build a new one. Failures that leave the
lockstep intact (a bad manifest, a failed load) leave the group usable for the next refit.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from colocate.refit.broadcast_frames import (  # noqa: F401  (re-exported: the wire format of this transport)
    ABORT,
    MAGIC,
    OK,
    TRAILER_BYTES,
    TRAILER_WORDS,
    Header,
    bucket_views,
    decode_manifest,
    digest_words,
    encode_manifest,
    frame_bytes,
    trailer_offset,
    trailer_words,
    words_digest,
)
from colocate.refit.errors import RefitError, RefitManifestError, RefitTimeoutError, remote_error
from colocate.refit.plan import Bucket, Expected, Manifest, ManifestError, manifest_mismatch, next_matching, plan

log = logging.getLogger(__name__)

Meta = Sequence[tuple[str, str, tuple[int, ...]]]
LoadFn = Callable[[list[tuple[str, torch.Tensor]]], None]

# NCCL exchanges buffer handles between ranks for its P2P/NVLink transports: cuMem handles where
# NCCL_CUMEM_ENABLE is on, legacy cudaIpc handles where it is off. Ranks that disagree cannot open each
# other's buffers and the communicator's setup or first collective fails or hangs (vLLM and verl pin it for
# this reason). NCCL reads it once per process, at its first communicator, so the sender's value is carried
# to the receivers through the store and set before their first NCCL call; set it in the launch environment
# of every process where the policy's own NCCL groups exist before this one.
CUMEM_DEFAULT = "0"
# Forming the group waits for every rank to arrive, and receivers join when their engine is up: minutes on a
# cold start, while a collective of a formed group is bounded by the much shorter `timeout_s`.
CONNECT_TIMEOUT_S = 300.0



# ---- the group ------------------------------------------------------------------------------------------

def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def _nccl_env(cumem: str) -> None:
    old = os.environ.get("NCCL_CUMEM_ENABLE")
    if old is not None and old != cumem:
        log.warning("NCCL_CUMEM_ENABLE=%s here, %s on the sender: using the sender's (effective only if no "
                    "NCCL communicator exists yet in this process)", old, cumem)
    os.environ["NCCL_CUMEM_ENABLE"] = cumem
    # NVLink multicast (NVLS) buys nothing for a broadcast of large buckets, reserves device memory, and on
    # shared hosts can take the GPUs out of service: never on.
    os.environ["NCCL_NVLS_ENABLE"] = "0"


class Group:
    """A process group of its own over `store`, with bounded waits and a side channel for error details."""

    def __init__(self, *, store: dist.Store, rank: int, world_size: int, device: torch.device,
                 timeout_s: float, connect_timeout_s: float) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.device, self.timeout_s = device, timeout_s
        self.name = "sender" if rank == 0 else f"receiver rank {rank}"
        self.side = "sender" if rank == 0 else "receiver"
        self.broken = False
        prefix = dist.PrefixStore("colocate-bcast", store)
        try:
            if device.type == "cuda":
                from torch.distributed import ProcessGroupNCCL

                opts = ProcessGroupNCCL.Options()
                # NCCL's watchdog tears the process down when a collective outlives the group's timeout;
                # our own bounded waits must fire first and abort the group instead.
                opts._timeout = _td(2 * max(timeout_s, connect_timeout_s))
                self.pg = ProcessGroupNCCL(prefix, rank, world_size, opts)
            else:
                self.pg = dist.ProcessGroupGloo(prefix, rank, world_size, _td(connect_timeout_s))
        except Exception as e:
            raise RefitTimeoutError(f"{self.name}: the broadcast group of {world_size} ranks did not form "
                                    f"within {connect_timeout_s:.1f}s: {_first_line(e)}",
                                    side=self.side) from e
        # Every rank is in once this returns; on NCCL this also creates the communicator (it is lazy).
        self.statuses(0, "the other ranks to join the group", timeout_s=connect_timeout_s)
        if device.type != "cuda":  # gloo's own bound on each collective from now on
            set_timeout = getattr(self.pg, "set_timeout", None) or self.pg._set_default_timeout
            set_timeout(_td(timeout_s))

    def _lost(self, what: str, e: BaseException, timeout_s: float | None = None) -> RefitTimeoutError:
        # Abort at once: work queued behind this collective is cancelled, and NCCL's watchdog never meets a
        # collective left hanging (it would take the process down). Peers still waiting on us are not
        # released by it (measured on gloo): they raise at their own timeout.
        self._abort()
        t = self.timeout_s if timeout_s is None else timeout_s
        return RefitTimeoutError(f"{self.name}: gave up waiting for {what} (timeout {t:.1f}s): a peer is "
                                 f"dead or stuck ({_first_line(e)})", side=self.side)

    def broadcast(self, tensor: torch.Tensor, what: str) -> dist.Work:
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        try:
            return self.pg.broadcast([tensor], opts)
        except Exception as e:
            raise self._lost(what, e) from e

    def wait(self, work: dist.Work, what: str, timeout_s: float | None = None) -> None:
        try:
            work.wait(_td(self.timeout_s if timeout_s is None else timeout_s))
        except Exception as e:
            raise self._lost(what, e, timeout_s) from e

    def broadcast_wait(self, tensor: torch.Tensor, what: str) -> None:
        self.wait(self.broadcast(tensor, what), what)

    def statuses(self, code: int, what: str, timeout_s: float | None = None) -> list[int]:
        """Everyone's code (0: fine), after an all-reduce MAX of a vector where each rank fills its slot.

        A vector rather than one MIN'd flag: every rank learns which rank failed, and reads its details."""
        t = torch.zeros(self.world_size, dtype=torch.int64, device=self.device)
        t[self.rank] = code
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        try:
            work = self.pg.allreduce([t], opts)
        except Exception as e:
            raise self._lost(what, e, timeout_s) from e
        self.wait(work, what, timeout_s)
        return t.tolist()

    def settle(self, refit_id: int, own: BaseException | None, what: str) -> None:
        """One all-reduce of status codes; raise the same failure on every rank if any rank has one."""
        if own is not None:
            try:
                info = {"kind": type(own).__name__, "message": str(own),
                        "traceback": "".join(traceback.format_exception(own))}
                self.store.set(f"err/{refit_id}/{self.rank}", json.dumps(info))
            except Exception:
                log.exception("%s: could not publish the error of refit %d", self.name, refit_id)
        codes = self.statuses(int(own is not None), what)
        failed = [r for r, c in enumerate(codes) if c]
        if not failed:
            return
        if own is not None:
            if isinstance(own, ManifestError) and not isinstance(own, RefitError):
                raise RefitManifestError(f"{self.name}: {own}", side=self.side) from own
            raise own
        origin = 0 if codes[0] else failed[0]  # the sender's failure explains the receivers' echoes
        try:
            info = json.loads(self.store.get(f"err/{refit_id}/{origin}"))
        except Exception as e:
            info = {"kind": "RefitError", "message": f"(details unavailable: {_first_line(e)})",
                    "traceback": ""}
        side = "sender" if origin == 0 else "receiver"
        others = f" (failed ranks: {failed})" if len(failed) > 1 else ""
        raise remote_error(info["kind"], f"[rank {origin}, refit {refit_id}] {info['message']}{others}",
                           side=side, traceback=info["traceback"])

    def _abort(self) -> None:
        if not self.broken:
            self.broken = True
            try:
                self.pg.abort()
            except Exception:
                log.debug("%s: aborting the group", self.name, exc_info=True)

    def close(self) -> None:
        if not self.broken:
            try:
                self.pg.shutdown()
            except Exception:
                log.debug("%s: shutting the group down", self.name, exc_info=True)
        self.broken = True
        self.pg = None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


# ---- sender ---------------------------------------------------------------------------------------------

@dataclass
class BroadcastSendStats:
    refit_id: int
    buckets: int
    bytes: int
    seconds: float
    pack_seconds: float
    wait_seconds: float
    manifest_sent: bool


class BroadcastSender:
    """Policy rank 0: owns the TCP store (master) and broadcasts refits to `world_size - 1` receivers.

    The store listens at construction (`address`: publish it, e.g. `publish_master`); the group forms in
    `connect()` (or the first `stream()`), which waits for every receiver to join."""

    def __init__(self, *, host: str, world_size: int, device: str, buffer_bytes: int, timeout_s: float = 60.0,
                 overlap: bool = True, port: int = 0, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        if world_size < 2:
            raise ValueError(f"world_size must count the sender and at least one receiver, got {world_size}")
        self.world_size = world_size
        self.device = torch.device(device)
        self.buffer_bytes = buffer_bytes
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.overlap = overlap
        self._store = dist.TCPStore(host, port, world_size, True, timeout=_td(connect_timeout_s),
                                    wait_for_workers=False)
        self.address = (host, self._store.port)
        if self.device.type == "cuda":
            cumem = os.environ.get("NCCL_CUMEM_ENABLE", CUMEM_DEFAULT)
            _nccl_env(cumem)
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
            self._group = Group(store=self._store, rank=0, world_size=self.world_size, device=self.device,
                                timeout_s=self.timeout_s, connect_timeout_s=self.connect_timeout_s)
            self._sent_digest = None

    def manifest(self, meta: Meta) -> Manifest:
        return plan(meta, self.buffer_bytes)

    def stream(self, named_tensors: Iterable[tuple[str, torch.Tensor]], meta: Meta) -> BroadcastSendStats:
        """Broadcast one refit. `meta` lists (name, dtype name, shape) in the order `named_tensors` yields
        them; tensors may be produced lazily. Returns once every receiver has loaded everything."""
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
            own, pack_s, wait_s = self._send_buckets(g, rid, manifest, iter(named_tensors))
            g.settle(rid, own, f"the final status of refit {rid}")
        except BaseException:
            self._sent_digest = None  # resend the manifest next time: a receiver may have dropped it
            raise
        return BroadcastSendStats(rid, len(manifest.buckets), manifest.total_bytes, time.perf_counter() - t0,
                                  pack_s, wait_s, bool(blob))

    def _ensure_buffers(self, manifest: Manifest) -> None:
        need = frame_bytes(max((b.nbytes for b in manifest.buckets if not b.oversized), default=0))
        if not self._buffers or self._buffers[0].numel() < need:
            self._buffers = [torch.empty(need, dtype=torch.uint8, device=self.device) for _ in range(2)]
            self._views.clear()

    def _send_buckets(self, g: Group, rid: int, manifest: Manifest, it
                      ) -> tuple[BaseException | None, float, float]:
        self._ensure_buffers(manifest)
        in_flight: deque[tuple[dist.Work, int, str, torch.Tensor]] = deque()  # (work, slot, what, buffer)
        own: BaseException | None = None
        pack_s = wait_s = 0.0
        index, regular = 0, 0
        entries = manifest.entries

        def wait_oldest() -> None:
            nonlocal wait_s
            t = time.perf_counter()
            work, _slot, what, _buf = in_flight.popleft()  # the buffer stays referenced until here
            g.wait(work, what)
            wait_s += time.perf_counter() - t

        for b in manifest.buckets:
            slot = -1 if b.oversized else regular % 2
            regular += not b.oversized
            # At most two buckets on the wire, and a buffer is refilled only once its broadcast completed.
            while in_flight and (not self.overlap or len(in_flight) >= 2
                                 or any(s == slot for _, s, _, _ in in_flight)):
                wait_oldest()
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
                            v.copy_(src, non_blocking=True)
                    del group
                except Exception as e:
                    own = e  # keep the lockstep: this and every later bucket go out marked ABORT
            _write_trailer(buf, b, trailer_words(rid, b.index, ABORT if own else OK))
            pack_s += time.perf_counter() - t
            what = f"receivers to take bucket {b.index}/{len(manifest.buckets)} of refit {rid}"
            in_flight.append((g.broadcast(buf, what), slot, what, buf))
        if own is None:
            leftover = next(it, None)
            if leftover is not None:
                own = ManifestError(f"extra tensor {leftover[0]!r} not in the manifest")
        while in_flight:
            wait_oldest()
        return own, pack_s, wait_s

    def close(self) -> None:
        """Tear the group down and stop the store. Receivers should close too; a new sender can follow."""
        if self._group is not None:
            self._group.close()
            self._group = None
        self._buffers, self._views = [], {}
        self._store = None  # type: ignore[assignment]  # the master's server stops with its last reference


def _write_trailer(buf: torch.Tensor, b: Bucket, words: list[int]) -> None:
    off = trailer_offset(b.nbytes)
    buf[off:off + TRAILER_BYTES].view(torch.int64).copy_(torch.tensor(words, dtype=torch.int64))


def _read_trailer(buf: torch.Tensor, b: Bucket) -> list[int]:
    off = trailer_offset(b.nbytes)
    return buf[off:off + TRAILER_BYTES].view(torch.int64).tolist()


# ---- receiver -------------------------------------------------------------------------------------------

@dataclass
class BroadcastReceiveStats:
    refit_id: int
    buckets: int
    bytes: int
    seconds: float
    load_seconds: float
    wait_seconds: float


class BroadcastReceiver:
    """One generation worker: receives every refit the sender broadcasts and hands buckets to `load_fn`.

    `load_fn` may keep nothing it is given past its return (the buffer is refilled next); on GPU it may
    enqueue copies on the current stream, which the next broadcast into that buffer waits for.
    `expected` (name -> (dtype name, shape)), if given, is checked against every new manifest."""

    def __init__(self, *, master: tuple[str, int], rank: int, world_size: int, device: str, load_fn: LoadFn,
                 begin_fn: Callable[[], None] | None = None, finish_fn: Callable[[], None] | None = None,
                 timeout_s: float = 60.0, expected: Expected | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        if not 0 < rank < world_size:
            raise ValueError(f"receiver rank must be in 1..{world_size - 1}, got {rank}")
        self.master, self.rank, self.world_size = master, rank, world_size
        self.device = torch.device(device)
        self.load_fn, self.begin_fn, self.finish_fn = load_fn, begin_fn, finish_fn
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.expected = expected
        self._store: dist.Store | None = None
        self._group: Group | None = None
        self._manifest: Manifest | None = None
        self._buffers: list[torch.Tensor] = []
        self._views: dict[int, list[torch.Tensor]] = {}

    @property
    def group(self) -> Group | None:
        return self._group

    def connect(self) -> None:
        """Join the group: blocks until the sender and every other receiver are in (`connect_timeout_s`)."""
        if self._group is not None:
            return
        host, port = self.master
        try:
            self._store = dist.TCPStore(host, port, self.world_size, False,
                                        timeout=_td(self.connect_timeout_s), wait_for_workers=False)
            if self.device.type == "cuda":
                _nccl_env(self._store.get("nccl_cumem").decode())
        except Exception as e:
            raise RefitTimeoutError(f"receiver rank {self.rank}: no sender's store at {host}:{port} within "
                                    f"{self.connect_timeout_s:.1f}s: {_first_line(e)}",
                                    side="receiver") from e
        self._group = Group(store=self._store, rank=self.rank, world_size=self.world_size, device=self.device,
                            timeout_s=self.timeout_s, connect_timeout_s=self.connect_timeout_s)

    def receive(self) -> BroadcastReceiveStats:
        """Take part in one refit; see the state machine in the module docstring."""
        self.connect()
        g = self._group
        assert g is not None
        if g.broken:
            raise RefitError(f"{g.name}: the group is broken by an earlier failure; close() and open a new "
                             "one", side="receiver")
        t = torch.empty(8, dtype=torch.int64, device=self.device)
        g.broadcast_wait(t, "the sender to start a refit (the header)")
        t0 = time.perf_counter()
        h = Header.from_words(t.tolist())
        blob = b""
        if h.manifest_bytes:
            data = torch.empty(h.manifest_bytes, dtype=torch.uint8, device=self.device)
            g.broadcast_wait(data, f"the manifest of refit {h.refit_id}")
            blob = data.cpu().numpy().tobytes()
        own: BaseException | None = None
        if h.status == OK:
            try:
                self._accept(h, blob)
            except Exception as e:
                own = e
        g.settle(h.refit_id, own, f"the manifest check of refit {h.refit_id}")
        manifest = self._manifest
        assert manifest is not None
        own, load_s, wait_s = self._receive_buckets(g, h, manifest)
        g.settle(h.refit_id, own, f"the final status of refit {h.refit_id}")
        return BroadcastReceiveStats(h.refit_id, len(manifest.buckets), manifest.total_bytes,
                                     time.perf_counter() - t0, load_s, wait_s)

    def _accept(self, h: Header, blob: bytes) -> None:
        if blob:
            m = decode_manifest(blob)
            if m.digest() != h.digest:
                raise ManifestError(f"refit {h.refit_id}: the manifest received hashes to {m.digest()}, the "
                                    f"header says {h.digest}")
            why = manifest_mismatch(m, self.expected)
            if why:
                raise ManifestError(f"refit {h.refit_id}: {why}")
            if self._manifest is None or self._manifest.digest() != m.digest():
                self._manifest, self._views = m, {}
        held = self._manifest.digest() if self._manifest is not None else None
        if held != h.digest:
            raise ManifestError(f"refit {h.refit_id}: the sender announced manifest {h.digest} but this "
                                f"receiver holds {held}")
        assert self._manifest is not None
        if len(self._manifest.buckets) != h.buckets:
            raise ManifestError(f"refit {h.refit_id}: header says {h.buckets} buckets, manifest has "
                                f"{len(self._manifest.buckets)}")

    def _ensure_buffers(self, manifest: Manifest) -> None:
        need = frame_bytes(max((b.nbytes for b in manifest.buckets if not b.oversized), default=0))
        if not self._buffers or self._buffers[0].numel() < need:
            self._buffers = [torch.empty(need, dtype=torch.uint8, device=self.device) for _ in range(2)]
            self._views.clear()

    def _receive_buckets(self, g: Group, h: Header, manifest: Manifest
                         ) -> tuple[BaseException | None, float, float]:
        self._ensure_buffers(manifest)
        own: BaseException | None = None
        aborted = False  # the sender failed mid-refit: receive the rest, load nothing
        if self.begin_fn is not None:
            try:
                self.begin_fn()
            except Exception as e:
                own = e
        seen = bytearray(len(manifest.entries))
        posted: deque[tuple[Bucket, torch.Tensor, dist.Work, str]] = deque()
        buckets, n = manifest.buckets, len(manifest.buckets)
        depth = 2 if h.overlap else 1
        nxt, regular = 0, 0
        load_s = wait_s = 0.0

        def post() -> None:
            nonlocal nxt, regular
            b = buckets[nxt]
            nxt += 1
            if b.oversized:
                buf = torch.empty(frame_bytes(b.nbytes), dtype=torch.uint8, device=self.device)
            else:
                buf = self._buffers[regular % 2][:frame_bytes(b.nbytes)]
                regular += 1
            what = f"bucket {b.index}/{n} of refit {h.refit_id} from the sender"
            posted.append((b, buf, g.broadcast(buf, what), what))

        while nxt < n and len(posted) < depth:
            post()
        while posted:
            b, buf, work, what = posted.popleft()
            t = time.perf_counter()
            g.wait(work, what)
            wait_s += time.perf_counter() - t
            rid, index, status, magic = _read_trailer(buf, b)
            if status == ABORT:
                aborted = True
            elif own is None and (rid, index, magic) != (h.refit_id, b.index, MAGIC):
                own = RefitError(f"{g.name}: bucket {b.index} of refit {h.refit_id} arrived as bucket "
                                 f"{index} of refit {rid}")
            if own is None and not aborted:
                t = time.perf_counter()
                try:
                    self._load(buf, b, manifest, seen)
                except Exception as e:
                    own = e  # keep receiving (the sender is mid-broadcast), load nothing more
                load_s += time.perf_counter() - t
            # Posted after the load: on GPU the broadcast into this buffer then waits for the load's copies.
            if nxt < n:
                post()
        if own is None and not aborted:
            try:
                missing = [manifest.entries[i].name for i, s in enumerate(seen) if s != 1]
                if missing:
                    raise ManifestError(f"refit {h.refit_id}: {len(missing)} entries not received exactly "
                                        f"once: {missing[:5]}")
                if self.finish_fn is not None:
                    self.finish_fn()
            except Exception as e:
                own = e
        return own, load_s, wait_s

    def _load(self, buf: torch.Tensor, b: Bucket, manifest: Manifest, seen: bytearray) -> None:
        entries = manifest.entries[b.first:b.last]
        views = self._views.get(b.index) if not b.oversized else None
        if views is None:
            views = bucket_views(buf, entries)
            if not b.oversized:  # regular buckets land in the same buffer every refit
                self._views[b.index] = views
        self.load_fn([(e.name, v) for e, v in zip(entries, views, strict=True)])
        for i in range(b.first, b.last):
            seen[i] += 1

    def close(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None
        self._store = None
        self._buffers, self._views = [], {}


# ---- rendezvous through the job's Ray actor -------------------------------------------------------------

def master_key(job: str) -> str:
    return f"bcast/{job}"


def publish_master(job: str, address: tuple[str, int]) -> Any:
    """Register the sender's store address with the job's rendezvous actor (in a Ray process).

    Keep the returned actor handle as long as receivers may look the address up: the rendezvous actor is
    not detached, and Ray ends it once its creator drops its last handle (measured: a handle dropped at
    the end of an actor's `__init__` took the registered address with it)."""
    import ray

    from colocate.rendezvous import get_rendezvous

    rendezvous = get_rendezvous(job)
    ray.get(rendezvous.register.remote(master_key(job), list(address)))
    return rendezvous


def lookup_master(job: str, timeout_s: float) -> tuple[str, int]:
    import ray

    from colocate.rendezvous import get_rendezvous

    host, port = ray.get(get_rendezvous(job).lookup.remote(master_key(job), timeout_s))
    return host, int(port)


def unpublish_master(job: str) -> None:
    import ray

    from colocate.rendezvous import get_rendezvous

    ray.get(get_rendezvous(job).unregister.remote(master_key(job)))
