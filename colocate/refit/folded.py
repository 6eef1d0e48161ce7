"""A weight that lives inside a parameter of another layout, read in place by a one-copy refit. Pure.

Megatron-core keeps q, k and v interleaved per query group in one `linear_qkv` parameter ([q heads of group g;
k head g; v head g] for each group g), so HF's q_proj [N*D, H] is the strided view
`qkv.view(G, (N/G + 2) * D, H)[:, :N/G * D]`: shape [G, N/G * D, H], whose elements in row-major order are
q_proj's, but which no view of shape [N*D, H] can express (the rows of one group are not evenly spaced from
those of the next). A one-copy refit sends such a view as it is (`wire.Source.shape` / `.stride`), and the
engine hands its loader a `FoldedTensor` for it: its shape, dtype and device are the weight's; `folded` is the
view. The direct loader copies `folded` into its destination viewed in `folded`'s shape (one copy, as for any
other weight: `fold_into`); anything else done with it (vLLM's own loader, a fingerprint) gets
`folded.reshape(shape)`, a contiguous copy, so no loader can read it wrongly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils._pytree import tree_map

from colocate.refit.slices import _METADATA, _name_of


class FoldedTensor(torch.Tensor):
    """The weight of shape `full_shape` whose elements in row-major order are `folded`'s (module docstring)."""

    folded: torch.Tensor
    full_shape: tuple[int, ...]

    @staticmethod
    def __new__(cls, full_shape: tuple[int, ...], folded: torch.Tensor) -> FoldedTensor:
        if math.prod(full_shape) != folded.numel():
            raise ValueError(f"a view of {tuple(folded.shape)} cannot stand for a tensor of {tuple(full_shape)}")
        self = torch.Tensor._make_wrapper_subclass(cls, full_shape, dtype=folded.dtype, device=folded.device)
        self.folded, self.full_shape = folded, tuple(full_shape)
        return self

    def __repr__(self) -> str:
        return f"FoldedTensor(shape={self.full_shape}, folded={tuple(self.folded.shape)})"

    def unfolded(self) -> torch.Tensor:
        return self.folded.reshape(self.full_shape)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if _name_of(func) in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        self = args[0] if args and isinstance(args[0], FoldedTensor) else None
        if (self is not None and _name_of(func) == "to" and len(args) == 2 and isinstance(args[1], torch.dtype)
                and not kwargs):  # a cast keeps it folded: the direct loader still copies it once
            return FoldedTensor(self.full_shape, self.folded.to(args[1]))
        args, kwargs = tree_map(unfold, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        args, kwargs = tree_map(unfold, (args, kwargs or {}))
        return func(*args, **kwargs)


def unfold(x: Any) -> Any:
    """A FoldedTensor as a plain tensor of its shape (a copy); anything else as it is."""
    return x.unfolded() if isinstance(x, FoldedTensor) else x


def fold_into(dst: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(destination, source) of one copy that puts `t` into `dst` (of `t`'s shape): `dst` viewed in the folded
    shape for a FoldedTensor (None where `dst` has no such view: the caller unfolds), else as they are."""
    if not isinstance(t, FoldedTensor):
        return dst, t
    if not dst.is_contiguous():
        return None
    return dst.view(t.folded.shape), t.folded
