"""The named exceptions of a refit: one root, `RefitError`; every failure a user can meet in a refit is one of
its subclasses, raised on the side where it happened, carried to the peer by the protocol (ipc: an Error or
Abort frame; nccl: the store, read after a status all-reduce) and to the driver by Ray.

Fields, not message prefixes, say where a failure came from:
- `side`: "sender" or "receiver" (the driver adds which rank or worker in its message);
- `remote_traceback`: what the side that raised first printed;
- `echo`: True where this side raised because the peer told it about its own failure (or because the driver
  aborted it after the peer failed): the driver reports the first failure that is not an echo.
"""

from __future__ import annotations


class RefitError(RuntimeError):
    """A refit failed (the root of every refit failure)."""

    def __init__(self, message: str, *, side: str = "", remote_traceback: str = "", echo: bool = False) -> None:
        self.side = side
        self.remote_traceback = remote_traceback
        self.echo = echo
        self.message = message
        if remote_traceback:
            message = f"{message}\n--- remote traceback ({side}) ---\n{remote_traceback.rstrip()}"
        super().__init__(message)

    def __reduce__(self):  # Ray pickles exceptions across processes: keep every field
        return (_rebuild, (type(self), self.message, self.side, self.remote_traceback, self.echo))


class RefitTimeoutError(RefitError, TimeoutError):
    """The peer sent nothing within the configured time: it is dead, stuck, or never started."""


class RefitPeerDiedError(RefitError):
    """A side's process died during the refit (killed, crashed, out of memory): reported as soon as Ray
    knows, not after the other side's timeout."""


class RefitAbortedError(RefitError):
    """The driver aborted this side because the other side had already failed (always an echo)."""


class RefitAuthError(RefitError):
    """A peer did not prove the job's token: someone else wrote to the group's rendezvous store."""


class RefitManifestError(RefitError, ValueError):
    """The tensors offered do not match the manifest or what the engine takes (missing, extra, duplicate,
    wrong shape or dtype, a parameter left unfilled), raised on both sides before any bucket moves."""


class RefitSliceError(RefitManifestError):
    """A shard-sliced refit does not fit the engine: a slice the engine did not ask for, or its loader using a
    sliced tensor other than by narrowing it to that slice (`refit/slices.py`)."""


class RefitFrameError(RefitError):
    """A bucket or message arrived out of order, for the wrong refit, or with a wrong checksum."""


class RefitRemoteError(RefitError):
    """A side raised an exception that is not a refit failure (a bug, a failed load): its class name is in
    the message and its traceback attached."""


_BY_NAME: dict[str, type[RefitError]] = {c.__name__: c for c in (
    RefitError, RefitTimeoutError, RefitPeerDiedError, RefitAbortedError, RefitAuthError, RefitManifestError,
    RefitSliceError, RefitFrameError)}


def remote_error(kind: str, message: str, *, side: str, traceback: str) -> RefitError:
    """The exception a peer's reported failure turns into on this side: the same named class where it is a
    refit failure (`kind` is its class name), else RefitRemoteError; always an echo."""
    cls = _BY_NAME.get(kind, RefitRemoteError)
    if cls is RefitAbortedError:  # the peer was aborted: to us it is a failure of the other side
        cls = RefitRemoteError
    return cls(f"{side} failed: {kind}: {message}", side=side, remote_traceback=traceback, echo=True)


def as_side(e: RefitError, side: str) -> RefitError:
    """`e` with its side set where the raiser could not know it (pure planning code raises side-less)."""
    if not e.side:
        e.side = side
    return e


def _rebuild(cls: type[RefitError], message: str, side: str, remote_traceback: str, echo: bool) -> RefitError:
    # Through the constructor: `cls.__new__(cls)` is refused for RefitTimeoutError, whose TimeoutError base
    # has an instance layout of its own.
    return cls(message, side=side, remote_traceback=remote_traceback, echo=echo)
