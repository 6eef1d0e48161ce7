"""The receiving side of a split-placement refit (each generation worker), and the protocol both sides run.

Split-placement refit: policy rank 0 broadcasts the model, bucket by bucket, to every generation worker.

The group is the sender (rank 0) and the N receivers (ranks 1..N, one per TP rank of every engine), and
nothing else. It is never the default process group: vLLM's workers and FSDP's policy ranks each have one
already, so the group is built from its own `TCPStore` (the sender is its master, on a port the OS picks)
and a backend constructed directly (`ProcessGroupGloo` on CPU, `ProcessGroupNCCL` on GPU, same code),
as vLLM's StatelessProcessGroup and verl do. `torch.distributed.init_process_group` is never called.

Setup, once per group: S's store listens on a port the OS picks, on this node's cluster address (loopback when
every rank is on one node), and the policy side publishes (host, port) with the job's rendezvous actor
(`rendezvous.publish_master`); each R's engine side looks it up, connects to the store, proves the job's
token (`group.py`) and joins. Forming the group waits up to `connect_timeout_s` for every rank (an
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
lockstep intact (a bad manifest, a failed load) leave the group usable for the next refit. While a receiver
waits for a refit's header it also asks the driver's `abort_fn` (the sender may have died before starting):
on True it aborts the group and raises RefitAbortedError.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

import torch
import torch.distributed as dist

from colocate.refit.errors import RefitAuthError, RefitError, RefitFrameError, RefitManifestError, RefitTimeoutError
from colocate.refit.nccl.frames import (
    ABORT,
    MAGIC,
    OK,
    Header,
    decode_manifest,
    frame_buffers,
    frame_bytes,
    read_trailer,
)
from colocate.refit.nccl.group import (
    CONNECT_TIMEOUT_S,
    Group,
    check_sender_and_prove,
    first_line,
    nccl_env,
    td,
)
from colocate.refit.plan import Bucket, CheckFn, Manifest, bucket_views, manifest_meta
from colocate.refit.schedule import AbortFn, LoadFn, ReceiveStats

log = logging.getLogger(__name__)


class BroadcastReceiver:
    """One generation worker: receives every refit the sender broadcasts and hands buckets to `load_fn`.

    `load_fn` may keep nothing it is given past its return (the buffer is refilled next); on GPU it may
    enqueue copies on the current stream, which the next broadcast into that buffer waits for.
    `check_fn(meta)` (why the engine cannot take these tensors, None if it can), if given, checks every new
    manifest; a refusal fails the refit on every rank before any bucket moves."""

    def __init__(self, *, master: tuple[str, int], rank: int, world_size: int, device: str, load_fn: LoadFn,
                 token: str, begin_fn: Callable[[], None] | None = None, finish_fn: Callable[[], None] | None = None,
                 timeout_s: float = 60.0, check_fn: CheckFn | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        if not 0 < rank < world_size:
            raise ValueError(f"receiver rank must be in 1..{world_size - 1}, got {rank}")
        self.master, self.rank, self.world_size = master, rank, world_size
        self.token = token
        self.device = torch.device(device)
        self.load_fn, self.begin_fn, self.finish_fn = load_fn, begin_fn, finish_fn
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.check_fn = check_fn
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
                                        timeout=td(self.connect_timeout_s), wait_for_workers=False)
            if self.device.type == "cuda":
                nccl_env(self._store.get("nccl_cumem").decode())
            check_sender_and_prove(self._store, self.token, self.rank)
        except RefitAuthError:
            raise
        except Exception as e:
            raise RefitTimeoutError(f"receiver rank {self.rank}: no sender's store at {host}:{port} within "
                                    f"{self.connect_timeout_s:.1f}s: {first_line(e)}",
                                    side="receiver") from e
        self._group = Group(store=self._store, rank=self.rank, world_size=self.world_size, device=self.device,
                            timeout_s=self.timeout_s, connect_timeout_s=self.connect_timeout_s)

    def receive(self, *, abort_fn: AbortFn | None = None) -> ReceiveStats:
        """Take part in one refit; see the state machine in the module docstring. `abort_fn` is asked while
        waiting for the refit's header (the sender may have died before starting it)."""
        self.connect()
        g = self._group
        assert g is not None
        if g.broken:
            raise RefitError(f"{g.name}: the group is broken by an earlier failure; close() and open a new "
                             "one", side="receiver")
        t = torch.empty(8, dtype=torch.int64, device=self.device)
        what = "the sender to start a refit (the header)"
        g.wait_abortable(g.broadcast(t, what), what, abort_fn)
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
        return ReceiveStats(h.refit_id, len(manifest.buckets), manifest.total_bytes,
                                     time.perf_counter() - t0, load_s, wait_s)

    def _accept(self, h: Header, blob: bytes) -> None:
        if blob:
            m = decode_manifest(blob)
            if m.digest() != h.digest:
                raise RefitManifestError(f"refit {h.refit_id}: the manifest received hashes to {m.digest()}, "
                                         f"the header says {h.digest}")
            why = self.check_fn(manifest_meta(m)) if self.check_fn is not None else None
            if why:
                raise RefitManifestError(f"refit {h.refit_id}: {why}")
            if self._manifest is None or self._manifest.digest() != m.digest():
                self._manifest, self._views = m, {}
        held = self._manifest.digest() if self._manifest is not None else None
        if held != h.digest:
            raise RefitManifestError(f"refit {h.refit_id}: the sender announced manifest {h.digest} but this "
                                     f"receiver holds {held}")
        assert self._manifest is not None
        if len(self._manifest.buckets) != h.buckets:
            raise RefitManifestError(f"refit {h.refit_id}: header says {h.buckets} buckets, manifest has "
                                     f"{len(self._manifest.buckets)}")

    def _receive_buckets(self, g: Group, h: Header, manifest: Manifest
                         ) -> tuple[BaseException | None, float, float]:
        buffers = frame_buffers(self._buffers, manifest, self.device)
        if buffers is not self._buffers:
            self._buffers, self._views = buffers, {}
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
            rid, index, status, magic = read_trailer(buf, b)
            if status == ABORT:
                aborted = True
            elif own is None and (rid, index, magic) != (h.refit_id, b.index, MAGIC):
                own = RefitFrameError(f"{g.name}: bucket {b.index} of refit {h.refit_id} arrived as bucket "
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
                    raise RefitManifestError(f"refit {h.refit_id}: {len(missing)} entries not received "
                                             f"exactly once: {missing[:5]}")
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
