"""The receiving side of a split-placement refit (each generation worker); the protocol is in `broadcast.py`."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from colocate.refit.broadcast_frames import (
    ABORT,
    MAGIC,
    OK,
    Header,
    bucket_views,
    decode_manifest,
    frame_bytes,
    read_trailer,
)
from colocate.refit.broadcast_group import (
    CONNECT_TIMEOUT_S,
    Group,
    check_sender_and_prove,
    first_line,
    nccl_env,
    td,
)
from colocate.refit.errors import RefitAuthError, RefitError, RefitTimeoutError
from colocate.refit.plan import (
    Bucket,
    CheckFn,
    Expected,
    Manifest,
    ManifestError,
    manifest_meta,
    manifest_mismatch,
)

log = logging.getLogger(__name__)

LoadFn = Callable[[list[tuple[str, torch.Tensor]]], None]


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
    `expected` (name -> (dtype name, shape)) and `check_fn(meta)` (why the engine cannot take these tensors,
    None if it can), if given, check every new manifest; a refusal fails the refit on every rank before any
    bucket moves."""

    def __init__(self, *, master: tuple[str, int], rank: int, world_size: int, device: str, load_fn: LoadFn,
                 token: str, begin_fn: Callable[[], None] | None = None, finish_fn: Callable[[], None] | None = None,
                 timeout_s: float = 60.0, expected: Expected | None = None, check_fn: CheckFn | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        if not 0 < rank < world_size:
            raise ValueError(f"receiver rank must be in 1..{world_size - 1}, got {rank}")
        self.master, self.rank, self.world_size = master, rank, world_size
        self.token = token
        self.device = torch.device(device)
        self.load_fn, self.begin_fn, self.finish_fn = load_fn, begin_fn, finish_fn
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.expected = expected
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
            if why is None and self.check_fn is not None:
                why = self.check_fn(manifest_meta(m))
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
            rid, index, status, magic = read_trailer(buf, b)
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
