"""Which slice of each HF tensor a tensor-parallel engine worker's loader keeps: the plan of a shard-sliced
refit (`refit/slices.py`), worked out from the engine itself without moving a weight.

`loader_slices(model, offer)` runs the model's own `load_weights` over the offer on meta probes (against the
meta twins `accepts.py` builds, so nothing of the live model changes) and watches what the loader does with
each probe: a tensor it only ever narrows once, along one dimension, to a proper part of it, travels as that
part (`Slice`); a tensor it uses any other way (copied whole, narrowed twice as a fused checkpoint tensor is,
reshaped, indexed) travels whole. So the plan is exactly what vLLM's loaders do for this model, this TP rank
and this vLLM version (column- and row-parallel linears, fused q/k/v and gate/up, replicated KV heads, the
padded vocabulary of embeddings and LM heads), with nothing listed by hand; and when a loader does something
the probe did not see, the receiver's `SlicedTensor` raises instead of loading bytes that never came.
"""

from __future__ import annotations

from typing import Any

import torch

from colocate.engine.accepts import Offer, _meta_twins
from colocate.refit.plan import dtype_from_name
from colocate.refit.slices import _METADATA, Slice, _name_of, _narrow_args


class _Probe(torch.Tensor):
    """A meta tensor of a checkpoint tensor's shape that records how the loader reads it."""

    narrows: list[tuple[int, int, int]]
    other: list[str]

    @staticmethod
    def __new__(cls, shape: tuple[int, ...], dtype: torch.dtype) -> _Probe:
        self = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device="meta")
        self.narrows, self.other = [], []
        return self

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = _name_of(func)
        if name in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        probes = [a for a in args if isinstance(a, _Probe)]
        if name == "narrow" and args and isinstance(args[0], _Probe):
            probe = args[0]
            dim, start, length = _narrow_args(args, kwargs, probe.dim())
            probe.narrows.append((dim, start, length))
            shape = list(probe.shape)
            shape[dim] = length
            return torch.empty(shape, dtype=probe.dtype, device="meta")
        for p in probes:
            p.other.append(name)
        plain = [torch.empty(a.shape, dtype=a.dtype, device="meta") if isinstance(a, _Probe) else a for a in args]
        with torch._C.DisableTorchFunctionSubclass():
            return func(*plain, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        raise NotImplementedError(f"probe reached {func}")  # makes the tensor go whole (see loader_slices)


def loader_slices(model: torch.nn.Module, offer: Offer, *, use_reload_metadata: bool) -> list[Slice | None]:
    """Per offered (name, dtype, shape): the one slice this worker's loader keeps, or None (it goes whole)."""
    out: list[Slice | None] = []
    with torch.no_grad(), _meta_twins(model, use_reload_metadata, []):
        for name, dtype, shape in offer:
            probe = _Probe(tuple(shape), dtype_from_name(dtype))
            try:
                model.load_weights(weights=[(name, probe)])
            except Exception:
                out.append(None)
                continue
            piece = Slice(*probe.narrows[0]) if len(set(probe.narrows)) == 1 and not probe.other else None
            out.append(piece if piece is not None and piece.check(tuple(shape)) else None)
    return out
