"""The named exceptions of generation. The group raises these, with the remote traceback in the message."""

from __future__ import annotations


class GenerationError(RuntimeError):
    """Base class. `worker_index` says which worker failed (None: raised before reaching any)."""

    def __init__(self, message: str, *, worker_index: int | None = None) -> None:
        super().__init__(message)
        self.worker_index = worker_index

    # Ray pickles exceptions across processes; keep the keyword argument.
    def __reduce__(self):  # type: ignore[override]
        return (_rebuild, (type(self), str(self), self.worker_index))


def _rebuild(cls: type[GenerationError], message: str, worker_index: int | None) -> GenerationError:
    return cls(message, worker_index=worker_index)


class EngineStartError(GenerationError):
    """A worker's vLLM engine failed to start (bad model path, out of memory, bad engine option)."""


class PromptTooLongError(GenerationError, ValueError):
    """A prompt leaves no room for one generated token within `max_model_len`; checked before submitting."""


class SamplingOptionError(GenerationError, ValueError):
    """A sampling option this package does not know (a typo would otherwise be silently ignored)."""


class GenerationWorkerDiedError(GenerationError):
    """A worker's actor died (killed, crashed, out of memory) while the group was using it."""


class WeightsIncompleteError(GenerationError):
    """The engine's weights are not whole: a refit failed part-way (a mix of two versions), or sleep(level=2)
    dropped them. Refit before generating."""


class PrefixCacheError(GenerationError):
    """vLLM refused to reset its prefix cache after new weights (blocks still held): the engine would serve
    KV computed by the old weights, so the refit fails instead."""


class GenerationWorkerError(GenerationError):
    """Any other exception a worker raised (the remote traceback is in the message)."""
