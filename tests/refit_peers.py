"""The far side of the two-process refit tests: run in a spawned process, driven over a multiprocessing Pipe.

Results come back as raw bytes (never as shared tensors, which would open segments of their own and spoil
the leak checks).
"""

from __future__ import annotations

import os
import signal

import torch


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def to_bytes(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    flat = t.detach().contiguous().view(-1)
    return str(t.dtype), tuple(t.shape), flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def half_of_rows(rank: int):
    """A `slice_fn` as a TP=2 worker `rank` answers for column-parallel weights: of every 2-D tensor with an
    even number of rows, its half of them; everything else whole."""
    from colocate.refit.slices import Slice

    def slices(meta):
        return [Slice(0, rank * s[0] // 2, s[0] // 2) if len(s) == 2 and s[0] % 2 == 0 else None
                for _, _, s in meta]

    return slices


def receiver_main(conn, job_dir: str, token: str, timeout_s: float, refits: int, record: bool = True,
                  expected=None, die_at_bucket: int | None = None, slice_rank: int | None = None,
                  loader: str = "narrow") -> None:
    """`slice_rank`: answer offers as TP rank `slice_rank` of 2 (`half_of_rows`); a sliced tensor is then
    read as a vLLM loader does (`loader="narrow"`: narrowed to its rank's rows) or wrongly ("whole": copied
    whole; "other_half": narrowed to the other rank's rows)."""
    from colocate.refit.ipc.receiver import RefitReceiver
    from colocate.refit.plan import expect
    from colocate.refit.slices import SlicedTensor

    received: dict[str, tuple] = {}
    loads = [0]

    def read(t):
        if not isinstance(t, SlicedTensor):
            return t
        rows = t.shape[0] // 2
        if loader == "whole":
            return torch.empty(t.shape, dtype=t.dtype).copy_(t)
        rank = slice_rank if loader == "narrow" else 1 - slice_rank
        return t.narrow(0, rank * rows, rows)

    def load(weights):
        loads[0] += 1
        if die_at_bucket is not None and loads[0] == die_at_bucket:
            os.kill(os.getpid(), signal.SIGKILL)
        for name, t in weights:
            if record:
                received[name] = to_bytes(read(t))

    r = RefitReceiver(job_dir=job_dir, token=token, load_fn=load, timeout_s=timeout_s,
                      check_fn=expect(expected) if expected is not None else None,
                      slice_fn=half_of_rows(slice_rank) if slice_rank is not None else None)
    conn.send(("address", r.address))
    for _ in range(refits):
        try:
            stats = r.receive()
            conn.send(("ok", dict(received), stats.buckets, fd_count(), r.rejected, len(r.cache)))
        except Exception as e:
            conn.send(("error", type(e).__name__, str(e)))
        received.clear()
    r.close()
    conn.send(("closed", fd_count(), sorted(os.listdir(job_dir))))


def sender_main(conn, address: str, job_dir: str, token: str, timeout_s: float, meta, tensors,
                die_at_tensor: int | None = None) -> None:
    from colocate.refit.ipc.sender import RefitSender

    s = RefitSender(address=address, token=token, job_dir=job_dir, device="cpu", buffer_bytes=4096,
                    timeout_s=timeout_s)

    def gen():
        for i, (name, t) in enumerate(tensors):
            if die_at_tensor is not None and i == die_at_tensor:
                os.kill(os.getpid(), signal.SIGKILL)
            yield name, t

    try:
        s.stream(gen(), meta)
        conn.send(("ok",))
    except Exception as e:
        conn.send(("error", type(e).__name__, str(e)))
    s.close()
