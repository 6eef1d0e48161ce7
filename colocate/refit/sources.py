"""What a policy backend hands a sender for one weight, besides a ready tensor. Pure: no transport, no Ray.

Two ways to save copies inside training (issue #15):
- `Fill`: a weight not yet materialised. `fill(out)` writes the full tensor, in the manifest's dtype and
  shape, into `out` (contiguous): an FSDP shard cast and all-gathered straight into the sender's buffer,
  where gathering into a fresh tensor (then cloning it, then packing it) would cost two more copies. A fill
  may be a collective: every rank calls its fills in the same order; a rank that sends nothing fills a
  scratch tensor (`materialize`).
- Resident weights: (name, tensor) of every weight where it already lives, whole, on the sender's device
  (one FSDP rank's shards, the benchmark's tensors). The engine reads them in place (one-copy refit): one
  device copy per byte. A resident tensor may hold a wider float dtype than the manifest's (fp32 master
  weights for a bf16 engine): the engine casts as it copies, the same round-to-nearest as a cast here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from colocate.refit.slices import Slice


class Fill:
    """A weight of `shape` and `dtype` that `fn(out)` writes into `out` (see the module docstring);
    `slice_fn(out, piece)`, where given, writes only `piece` of it (a shard-sliced refit) without the whole."""

    __slots__ = ("_fn", "_slice_fn", "device", "dtype", "shape")

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 fn: Callable[[torch.Tensor], None],
                 slice_fn: Callable[[torch.Tensor, Slice], None] | None = None) -> None:
        self.shape, self.dtype, self.device, self._fn, self._slice_fn = torch.Size(shape), dtype, device, fn, slice_fn

    def __call__(self, out: torch.Tensor) -> None:
        self._fn(out)

    def write_slice(self, out: torch.Tensor, piece: Slice) -> None:
        if self._slice_fn is not None:
            self._slice_fn(out, piece)
        else:  # the whole weight in a scratch tensor, then its slice (the collective in `fn` runs either way)
            out.copy_(piece.of(self.materialize()))

    def materialize(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self._fn(out)
        return out


Source = torch.Tensor | Fill


def write(out: torch.Tensor, source: Source, piece: Slice | None = None) -> None:
    """Put `source`, or only its `piece`, into `out` (a buffer's typed view): fill it, or copy it."""
    if isinstance(source, Fill):
        source(out) if piece is None else source.write_slice(out, piece)
    else:
        out.copy_(source if piece is None else piece.of(source), non_blocking=True)


def tensor_of(source: Source) -> torch.Tensor:
    return source.materialize() if isinstance(source, Fill) else source


def castable(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether the engine may take `src` for a `dst` weight, casting as it copies (floats only)."""
    return src == dst or (src.is_floating_point and dst.is_floating_point)
