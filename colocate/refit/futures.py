"""Await the two halves of a refit together: the policy's stream task and the engines' update tasks.

Both sides are launched before either is awaited (the sender's first bucket waits on the receiver's loop).
If one side fails, the other usually fails within moments (the protocol carries the error across, with its
traceback), so after the first failure we wait `ABORT_GRACE_S` more for the rest, then raise one `RefitError`
naming the side where it started: `RefitPeerDiedError` when that side's process died (a peer waiting on a
dead process would otherwise only give up at its own timeout). A task still running then ends at its own
timeout, with the error the protocol gives it.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import ray

from colocate.refit.errors import RefitError, RefitPeerDiedError, RefitTimeoutError

# After the first failure, how long the other side's outcome is awaited (for its traceback) before raising.
ABORT_GRACE_S = 3.0


def _origin(failures: list[tuple[str, BaseException]]) -> tuple[str, BaseException]:
    """The first failure (in arrival order) that is not an echo of the peer's error ("sender failed: ...")."""
    for side, e in failures:
        cause = getattr(e, "cause", None) or e
        if not str(cause).startswith(("sender failed:", "receiver failed:")):
            return side, e
    return failures[0]


def await_refit(futures: dict[str, list[ray.ObjectRef]], timeout_s: float) -> dict[str, list[Any]]:
    """Wait for every future of every side ("sender", "receiver", ...); raise one RefitError on any failure.

    `timeout_s` bounds the whole wait: a side still running then is reported as stuck.
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
                failures.append((side_of[ref], e))
    if failures:
        side, e = _origin(failures)
        others = ", ".join(sorted({s for s, _ in failures if s != side}))
        msg = f"refit failed on the {side} side" + (f" (and then on: {others})" if others else "")
        if pending:
            msg += f" (still running: {', '.join(sorted({side_of[r] for r in pending}))})"
        cause = getattr(e, "cause", None)
        # The origin's own named class (a timeout stays a RefitTimeoutError), or RefitPeerDiedError.
        if isinstance(e, ray.exceptions.RayActorError):
            cls: type[RefitError] = RefitPeerDiedError
        else:
            cls = type(cause) if isinstance(cause, RefitError) else RefitError
        raise cls(f"{msg}: {e}", side=side) from (cause or e)
    if pending:
        stuck = sorted({side_of[r] for r in pending})
        for r in pending:
            # Best effort: an actor task cannot be force-cancelled, and one blocked in a socket wait ends at
            # its own timeout anyway.
            with contextlib.suppress(Exception):
                ray.cancel(r)
        raise RefitTimeoutError(f"refit did not finish within {timeout_s:.1f}s; still running: {stuck}",
                                side=",".join(stuck))
    return {side: [results[r] for r in refs] for side, refs in futures.items()}
