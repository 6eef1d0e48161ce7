"""The named exceptions of a refit. Every failure a user can meet in a refit is one of these."""

from __future__ import annotations

from colocate.refit.plan import ManifestError


class RefitError(RuntimeError):
    """A refit failed. `side` says where ("sender", "receiver"), `remote_traceback` what the peer printed."""

    def __init__(self, message: str, *, side: str = "", remote_traceback: str = "") -> None:
        self.side = side
        self.remote_traceback = remote_traceback
        if remote_traceback:
            message = f"{message}\n--- remote traceback ({side}) ---\n{remote_traceback.rstrip()}"
        super().__init__(message)


class RefitTimeoutError(RefitError, TimeoutError):
    """The peer sent nothing within the configured time: it is dead, stuck, or never started."""


class RefitPeerDiedError(RefitError):
    """A side's process died during the refit (killed, crashed, out of memory): reported as soon as Ray
    knows, not after the other side's timeout."""


class RefitAuthError(RefitError):
    """A peer did not prove the job's token: someone else wrote to the group's rendezvous store."""


class RefitRemoteError(RefitError):
    """The peer raised; its traceback is attached."""


class RefitManifestError(RefitError, ManifestError):
    """A manifest mismatch (missing, extra, duplicate, wrong shape or dtype), raised on both sides."""


def remote_error(kind: str, message: str, *, side: str, traceback: str) -> RefitError:
    """The exception the peer's error message turns into here: the same named class where one matches."""
    cls: type[RefitError] = {
        "ManifestError": RefitManifestError,
        "RefitManifestError": RefitManifestError,
        "RefitTimeoutError": RefitTimeoutError,
    }.get(kind, RefitRemoteError)
    # The message starts with "<peer side> failed:": futures.py tells an echo from the origin by it.
    return cls(f"{side} failed: {kind}: {message}", side=side, remote_traceback=traceback)


def _rebuild(cls: type[RefitError], message: str, side: str) -> RefitError:
    # Through the constructor: `cls.__new__(cls)` is refused for RefitTimeoutError, whose TimeoutError base
    # has an instance layout of its own. The message already holds any remote traceback.
    return cls(message, side=side)


# Ray pickles exceptions across processes; keep `side` (the remote traceback is already in the message).
RefitError.__reduce__ = lambda self: (_rebuild, (type(self), str(self), self.side))  # type: ignore[method-assign]
