"""The process group of a split-placement refit: its own TCP store and backend (never the default group),
bounded waits, and a failure on any rank raised on every rank. The protocol it carries is in `receiver.py`."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import time
import traceback

import torch
import torch.distributed as dist

from colocate.refit.errors import (
    RefitAbortedError,
    RefitAuthError,
    RefitError,
    RefitTimeoutError,
    as_side,
    remote_error,
)
from colocate.refit.schedule import ABORT_POLL_S, AbortFn

log = logging.getLogger(__name__)

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


def td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


# ---- the rendezvous store: bound to one address, joined only with the job's token ---------------------------
#
# The sender's TCPStore is the group's rendezvous. It listens on the address given (the node's cluster
# address, or loopback when every rank is on this node), never on all interfaces. A TCP store has no access
# control of its own, so every rank proves the job's token before the group forms: the sender writes a
# random nonce and HMAC(token, nonce|"sender"); a receiver checks that proof before joining and writes
# HMAC(token, nonce|"rank/<r>"), which the sender checks for every rank before forming the group. A store
# written by anyone without the token fails the join on the side that reads it, with RefitAuthError.

def listening_store(host: str, port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """The master TCPStore, listening on `host` alone (torch's own server would bind every interface)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(max(16, 2 * world_size))
        store = dist.TCPStore(host, sock.getsockname()[1], world_size, True, timeout=td(timeout_s),
                              wait_for_workers=False, master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store's server owns the descriptor now and closes it when the store goes
    return store


def _proof(token: str, nonce: bytes, who: str) -> bytes:
    return hmac.new(token.encode(), nonce + b"|" + who.encode(), hashlib.sha256).digest()


def publish_sender_proof(store: dist.Store, token: str) -> None:
    nonce = secrets.token_bytes(16)
    store.set("auth/nonce", nonce)
    store.set("auth/sender", _proof(token, nonce, "sender"))


def check_sender_and_prove(store: dist.Store, token: str, rank: int) -> None:
    """A receiver's half: the store must be this job's sender's; then prove the token for `rank`."""
    nonce = store.get("auth/nonce")
    if not hmac.compare_digest(store.get("auth/sender"), _proof(token, nonce, "sender")):
        raise RefitAuthError(f"receiver rank {rank}: the broadcast store was not set up by this job's sender "
                             "(its proof of the job token does not match)", side="receiver")
    store.set(f"auth/rank/{rank}", _proof(token, nonce, f"rank/{rank}"))


def check_receivers(store: dist.Store, token: str, world_size: int, timeout_s: float) -> None:
    """The sender's half: every receiver rank proved the job token (waits up to `timeout_s` for them)."""
    keys = [f"auth/rank/{r}" for r in range(1, world_size)]
    try:
        store.wait(keys, td(timeout_s))
    except Exception as e:
        raise RefitTimeoutError(f"sender: not every receiver joined within {timeout_s:.1f}s: {first_line(e)}",
                                side="sender") from e
    nonce = store.get("auth/nonce")
    bad = [r for r in range(1, world_size)
           if not hmac.compare_digest(store.get(f"auth/rank/{r}"), _proof(token, nonce, f"rank/{r}"))]
    if bad:
        raise RefitAuthError(f"sender: receiver ranks {bad} did not prove the job token (someone without it "
                             "wrote to the group's store)", side="sender")


def nccl_env(cumem: str) -> None:
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
                opts._timeout = td(2 * max(timeout_s, connect_timeout_s))
                self.pg = ProcessGroupNCCL(prefix, rank, world_size, opts)
            else:
                self.pg = dist.ProcessGroupGloo(prefix, rank, world_size, td(connect_timeout_s))
        except Exception as e:
            raise RefitTimeoutError(f"{self.name}: the broadcast group of {world_size} ranks did not form "
                                    f"within {connect_timeout_s:.1f}s: {first_line(e)}",
                                    side=self.side) from e
        # Every rank is in once this returns; on NCCL this also creates the communicator (it is lazy).
        self.statuses(0, "the other ranks to join the group", timeout_s=connect_timeout_s)
        if device.type != "cuda":  # gloo's own bound on each collective from now on
            set_timeout = getattr(self.pg, "set_timeout", None) or self.pg._set_default_timeout
            set_timeout(td(timeout_s))

    def _lost(self, what: str, e: BaseException, timeout_s: float | None = None) -> RefitTimeoutError:
        # Abort at once: work queued behind this collective is cancelled, and NCCL's watchdog never meets a
        # collective left hanging (it would take the process down). Peers still waiting on us are not
        # released by it (measured on gloo): they raise at their own timeout.
        self._abort()
        t = self.timeout_s if timeout_s is None else timeout_s
        return RefitTimeoutError(f"{self.name}: gave up waiting for {what} (timeout {t:.1f}s): a peer is "
                                 f"dead or stuck ({first_line(e)})", side=self.side)

    def broadcast(self, tensor: torch.Tensor, what: str) -> dist.Work:
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        try:
            return self.pg.broadcast([tensor], opts)
        except Exception as e:
            raise self._lost(what, e) from e

    def wait(self, work: dist.Work, what: str, timeout_s: float | None = None) -> None:
        try:
            work.wait(td(self.timeout_s if timeout_s is None else timeout_s))
        except Exception as e:
            raise self._lost(what, e, timeout_s) from e

    def wait_abortable(self, work: dist.Work, what: str, abort_fn: AbortFn | None) -> None:
        """`wait` for a collective that may take long to start (the next refit's header): asks `abort_fn`
        while waiting, and on True aborts the group (it is then broken) with RefitAbortedError."""
        if abort_fn is None:
            return self.wait(work, what)
        deadline = time.monotonic() + self.timeout_s
        pause = 1e-4
        while not work.is_completed():
            if time.monotonic() > deadline:
                raise self._lost(what, TimeoutError("no completion"))
            if pause >= ABORT_POLL_S and abort_fn():
                self._abort()
                raise RefitAbortedError(f"{self.name}: refit aborted by the driver while waiting for {what} "
                                        "(the other side failed)", side=self.side, echo=True)
            time.sleep(min(pause, ABORT_POLL_S))
            pause = min(2 * pause, ABORT_POLL_S)
        self.wait(work, what)  # raises the collective's own error, if it failed

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
            raise as_side(own, self.side) if isinstance(own, RefitError) else own
        origin = 0 if codes[0] else failed[0]  # the sender's failure explains the receivers' echoes
        try:
            info = json.loads(self.store.get(f"err/{refit_id}/{origin}"))
        except Exception as e:
            info = {"kind": "RefitError", "message": f"(details unavailable: {first_line(e)})",
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


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
