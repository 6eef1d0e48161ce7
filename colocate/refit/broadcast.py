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

from typing import Any

# The transport's public names, importable from here (the module that documents the protocol).
from colocate.refit.broadcast_group import CONNECT_TIMEOUT_S  # noqa: F401
from colocate.refit.broadcast_receiver import BroadcastReceiver, BroadcastReceiveStats  # noqa: F401
from colocate.refit.broadcast_sender import BroadcastSender, BroadcastSendStats  # noqa: F401

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
