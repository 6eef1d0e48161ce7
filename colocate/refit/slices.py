"""Shard-sliced refit (issue #14), pure: which part of a weight travels, and how the engine's loader gets it.

A tensor-parallel engine's worker keeps only its shard of most weights: rows of a column-parallel linear
(q/k/v, gate/up, the vocabulary of an embedding or LM head), columns of a row-parallel one (o_proj,
down_proj). vLLM's loaders take the whole HF tensor and `narrow` it to that shard. Colocated, each TP worker
takes its refit from the policy rank on its device, so that rank need only pack the `Slice` the worker's
loader will narrow to: 1/k of the bytes of those weights. Which slice comes from the engine itself
(`engine/shards.py`: its loader run on meta tensors), never from a table of layer kinds.

On the engine side the loader still expects the whole tensor: `SlicedTensor` stands for it (its shape, dtype
and device are the whole tensor's) and holds only the slice. Its `narrow` to exactly the planned slice is
the slice; `clone` and a dtype `to` keep it a SlicedTensor; anything else a loader does with it raises
`RefitSliceError` naming the tensor and the operation, so a loader that reads outside the slice can never
load bytes that did not travel.
"""

from __future__ import annotations

from typing import Any

import msgspec
import torch

from colocate.refit.errors import RefitSliceError


class Slice(msgspec.Struct, frozen=True, array_like=True):
    """`tensor.narrow(dim, start, length)`: the part of a weight that travels."""

    dim: int
    start: int
    length: int

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.narrow(self.dim, self.start, self.length)

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        return (*full[:self.dim], self.length, *full[self.dim + 1:])

    def check(self, full: tuple[int, ...]) -> bool:
        """Whether this is a proper slice of a tensor of shape `full` (smaller than it, inside it)."""
        return (0 <= self.dim < len(full) and self.start >= 0 and self.length > 0
                and self.start + self.length <= full[self.dim] and self.length < full[self.dim])


# Queries that read only a tensor's metadata: a loader may ask them of a SlicedTensor or a probe.
_METADATA = {"size", "dim", "numel", "__len__", "element_size", "is_floating_point", "is_contiguous",
             "stride", "__get__", "__format__", "__repr__", "type", "get_device", "is_complex"}


def _name_of(func: Any) -> str:
    return getattr(func, "__name__", str(func))


def _narrow_args(args: tuple, kwargs: dict, ndim: int) -> tuple[int, int, int]:
    dim, start, length = (list(args[1:]) + [kwargs.get(k) for k in ("dim", "start", "length")][len(args) - 1:])[:3]
    start = int(start.item() if isinstance(start, torch.Tensor) else start)
    return (int(dim) % ndim, start, int(length))


class SlicedTensor(torch.Tensor):
    """The whole weight `name` as the loader sees it, holding only `data` = `slice` of it (module docstring)."""

    weight: str
    piece: Slice
    piece_data: torch.Tensor

    @staticmethod
    def __new__(cls, name: str, full_shape: tuple[int, ...], piece: Slice, data: torch.Tensor) -> SlicedTensor:
        self = torch.Tensor._make_wrapper_subclass(cls, full_shape, dtype=data.dtype, device=data.device)
        self.weight, self.piece, self.piece_data = name, piece, data
        return self

    def __repr__(self) -> str:
        return f"SlicedTensor({self.weight}, shape={tuple(self.shape)}, {self.piece})"

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = _name_of(func)
        self = args[0] if args and isinstance(args[0], SlicedTensor) else None
        if name in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if self is not None and name == "narrow":
            got = _narrow_args(args, kwargs, self.dim())
            if got == (self.piece.dim, self.piece.start, self.piece.length):
                return self.piece_data
            p = self.piece
            raise RefitSliceError(f"{self.weight}: the engine's loader narrowed it to (dim, start, length) = {got}, "
                                  f"but only {(p.dim, p.start, p.length)} was sent; set refit.shard_slice=false")
        if self is not None and name == "clone":
            return SlicedTensor(self.weight, tuple(self.shape), self.piece, self.piece_data.clone())
        if self is not None and name == "to" and len(args) == 2 and isinstance(args[1], torch.dtype) and not kwargs:
            return SlicedTensor(self.weight, tuple(self.shape), self.piece, self.piece_data.to(args[1]))
        culprit = self if self is not None else next((a for a in args if isinstance(a, SlicedTensor)), None)
        label = culprit.weight if culprit is not None else "a shard-sliced tensor"
        raise RefitSliceError(f"{label}: the engine's loader used it in {name}, but only a slice of it was sent "
                              "(a loader that reads outside its shard); set refit.shard_slice=false")

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        raise RefitSliceError(f"a shard-sliced tensor reached {func} below the loader's Python code; "
                              "set refit.shard_slice=false")


def as_loaded(name: str, full_shape: tuple[int, ...], piece: Slice | None, data: torch.Tensor) -> torch.Tensor:
    """What the engine's loader gets for a received tensor: the tensor itself, or a SlicedTensor for a slice."""
    return data if piece is None else SlicedTensor(name, tuple(full_shape), piece, data)


def slice_data(t: torch.Tensor) -> tuple[torch.Tensor, Slice | None]:
    """The bytes that arrived for `t` and which slice they are (None: the whole tensor)."""
    if isinstance(t, SlicedTensor):
        return t.piece_data, t.piece
    return t, None
