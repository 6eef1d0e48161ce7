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


def receiver_main(conn, job_dir: str, token: str, timeout_s: float, refits: int, record: bool = True,
                  expected=None, die_at_bucket: int | None = None) -> None:
    from colocate.refit.ipc.receiver import RefitReceiver
    from colocate.refit.plan import expect

    received: dict[str, tuple] = {}
    loads = [0]

    def load(weights):
        loads[0] += 1
        if die_at_bucket is not None and loads[0] == die_at_bucket:
            os.kill(os.getpid(), signal.SIGKILL)
        for name, t in weights:
            if record:
                received[name] = to_bytes(t)

    r = RefitReceiver(job_dir=job_dir, token=token, load_fn=load, timeout_s=timeout_s,
                      check_fn=expect(expected) if expected is not None else None)
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
