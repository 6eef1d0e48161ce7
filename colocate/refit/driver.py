"""The driver's part of a refit: launch the policy's stream tasks and the engines' update tasks together,
await both, merge their stats; on a failure, abort the side still running and raise one named error.

Both sides are launched before either is awaited (the sender's first bucket waits on the receiver's loop).
If one side fails, the other usually fails within moments (the protocol carries the error across, with its
traceback). At the first failure the driver marks the refit aborted with the job's rendezvous, which a side
still waiting on its peer reads within `schedule.ABORT_POLL_S` (a peer that died would otherwise be waited
for until the transport's timeout); it waits `ABORT_GRACE_S` more for the rest, then raises the origin's
named class (the first failure that is not an echo of the other side's), or `RefitPeerDiedError` when that
side's process died, with the side and the remote traceback as fields.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray

from colocate.refit.errors import RefitError, RefitPeerDiedError, RefitRemoteError, RefitTimeoutError

# After the first failure, how long the other side's outcome is awaited (for its traceback) before raising.
ABORT_GRACE_S = 3.0


def run_refit(policy_workers: Sequence[Any], generation: Any, *, rendezvous: Any, refit: int, timeout_s: float
              ) -> dict[str, float]:
    """Refit number `refit`: every policy rank's `stream_refit` and every engine's update task, launched
    together and awaited (bounded by 3 x the transport's `timeout_s`); `rendezvous`: the job's, where a
    failed refit is marked aborted. Returns the time it took and its parts (the slowest sender's gather /
    pack / wait for the engines, the slowest engine's load), in ms; the most any sender sent, in MiB, and of
    how many tensors it sent only a slice (shard-sliced, tensor-parallel engines); the slowest sender's and
    engine's whole task."""
    t = time.perf_counter()
    senders = [w.stream_refit.remote(refit) for w in policy_workers]
    receivers = generation.receive_refit_futures(refit)
    out = await_refit({"sender": senders, "receiver": receivers}, timeout_s=3 * timeout_s,
                      abort=lambda: rendezvous.abort.remote(refit))
    parts = {"refit_ms": (time.perf_counter() - t) * 1e3}
    sent = [s for s in out["sender"] if s]
    for key in ("gather_seconds", "pack_seconds", "wait_seconds"):
        if sent:
            parts[f"refit_{key.split('_')[0]}_ms"] = max(s[key] for s in sent) * 1e3
    if sent:
        parts["refit_sent_mb"] = max(s["bytes"] for s in sent) / 2**20
        parts["refit_sliced"] = max(s.get("sliced", 0) for s in sent)
    got = [s for s in out["receiver"] if s]
    if got:
        parts["refit_load_ms"] = max(s["load_seconds"] for s in got) * 1e3
    # Each side's whole task: what refit_ms holds beyond them is Ray's launch and return of the tasks; of the
    # engine's task, the receive call on its worker (the rest: the hop through the engine to its worker).
    for side, done in (("sender", sent), ("receiver", got)):
        if done:
            parts[f"refit_{side}_task_ms"] = max(s["task_seconds"] for s in done) * 1e3
    if got and all("worker_seconds" in s for s in got):
        parts["refit_receiver_worker_ms"] = max(s["worker_seconds"] for s in got) * 1e3
    return parts


def _origin(failures: list[tuple[str, BaseException]]) -> tuple[str, BaseException]:
    """Where a failed refit began: a side whose process died, if one did (the survivors' errors follow from it:
    a reset connection can reach a survivor before Ray reports the death); else the first failure (in arrival
    order) that is not an echo of the other side's (`RefitError.echo`)."""
    died = [(side, e) for side, e in failures if isinstance(e, ray.exceptions.RayActorError)]
    if died:
        return died[0]
    for side, e in failures:
        cause = getattr(e, "cause", None) or e
        if not getattr(cause, "echo", False):
            return side, e
    return failures[0]


def await_refit(futures: dict[str, list[ray.ObjectRef]], timeout_s: float,
                abort: Callable[[], Any] | None = None) -> dict[str, list[Any]]:
    """Wait for every future of every side ("sender", "receiver", ...); raise one RefitError on any failure.

    `timeout_s` bounds the whole wait: a side still running then is reported as stuck. `abort()` is called
    once, at the first failure (to stop the other side), or when the wait times out.
    """
    side_of = {ref: side for side, refs in futures.items() for ref in refs}
    results: dict[ray.ObjectRef, Any] = {}
    failures: list[tuple[str, BaseException]] = []
    deadline = time.monotonic() + timeout_s
    pending = list(side_of)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, pending = ray.wait(pending, num_returns=1, timeout=left)
        for ref in ready:
            try:
                results[ref] = ray.get(ref)
            except (ray.exceptions.RayError, RefitError) as e:
                if not failures:
                    deadline = min(deadline, time.monotonic() + ABORT_GRACE_S)
                    if abort is not None:
                        with contextlib.suppress(Exception):
                            abort()
                failures.append((side_of[ref], e))
    if failures:
        side, e = _origin(failures)
        # What each other side said, in a line: the first error alone can hide where a failure began.
        said = {s: _one_line(x) for s, x in reversed(failures) if s != side}
        others = "; ".join(f"{s}: {said[s]}" for s in sorted(said))
        msg = f"refit failed on the {side} side" + (f" (and then on the {others})" if others else "")
        if pending:
            msg += f" (still running: {', '.join(sorted({side_of[r] for r in pending}))})"
        cause = getattr(e, "cause", None)
        # The origin's own named class (a timeout stays a RefitTimeoutError), or RefitPeerDiedError.
        if isinstance(e, ray.exceptions.RayActorError):
            raise RefitPeerDiedError(f"{msg}: the {side}'s process died: {e}", side=side) from e
        if isinstance(cause, RefitError):
            raise type(cause)(f"{msg}: {cause.message}", side=side,
                              remote_traceback=cause.remote_traceback or _traceback_of(e)) from cause
        what = f"{type(cause).__name__}: {cause}" if cause is not None else str(e).split("\n", 1)[0]
        raise RefitRemoteError(f"{msg}: {what}", side=side, remote_traceback=_traceback_of(e)) from (cause or e)
    if pending:
        stuck = sorted({side_of[r] for r in pending})
        if abort is not None:
            with contextlib.suppress(Exception):
                abort()
        for r in pending:
            # Best effort: an actor task cannot be force-cancelled, and one blocked in a socket wait ends at
            # its own timeout anyway.
            with contextlib.suppress(Exception):
                ray.cancel(r)
        raise RefitTimeoutError(f"refit did not finish within {timeout_s:.1f}s; still running: {stuck}",
                                side=",".join(stuck))
    return {side: [results[r] for r in refs] for side, refs in futures.items()}


def _one_line(e: BaseException, limit: int = 300) -> str:
    cause = getattr(e, "cause", None) or e
    text = getattr(cause, "message", None) or str(cause).split("\n", 1)[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _traceback_of(e: BaseException) -> str:
    """The remote traceback Ray attached to a task's error (its text after the first line)."""
    text = str(e)
    return text.split("\n", 1)[1] if "\n" in text else ""
