"""Streaming the full (unsharded) weights of an FSDP2 model, one tensor at a time, in HF checkpoint names.

This is what the refit path feeds to the inference engine. Each parameter is gathered with
`DTensor.full_tensor()` only when the consumer asks for it and dropped before the next one, so the peak
extra memory is one full tensor, never a second copy of the model.

Every rank must drive the generator to the end, in the same order: `full_tensor()` is a collective.

Names are the module's `state_dict()` names. For the dense HF models this framework targets (Qwen2, Llama)
they are the checkpoint names; models that transformers renames or fuses on load (some MoE experts) would
need the reverse mapping here.

A weight shared by two modules (tied input/output embeddings) is yielded once, under its first name
(`model.embed_tokens.weight`); inference engines re-tie `lm_head` from the config.
"""

from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

# (HF name, full shape, dtype) of one streamed weight.
ManifestEntry = tuple[str, tuple[int, ...], torch.dtype]


def _unique_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    # keep_vars keeps the sharded DTensor parameters themselves: nothing is copied or gathered here.
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        yield name, tensor


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module back in the sharded state (the root stays unsharded after a no-grad forward)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def iter_full_weights(
    model: nn.Module, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, full_tensor)` for each unique weight, gathered across ranks and cast to `dtype`."""
    reshard(model)
    for name, tensor in _unique_state(model):
        tensor = tensor.detach()
        # Cast the local shard before gathering: half the traffic for bf16, and the same bits, since a cast
        # is elementwise.
        if dtype is not None:
            tensor = tensor.to(dtype)
        yield name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def weights_manifest(model: nn.Module, dtype: torch.dtype | None = None) -> list[ManifestEntry]:
    """`(name, shape, dtype)` of exactly what `iter_full_weights` yields, without gathering anything."""
    # A DTensor's .shape is the global shape, so no communication is needed.
    return [
        (name, tuple(tensor.shape), dtype if dtype is not None else tensor.dtype)
        for name, tensor in _unique_state(model)
    ]
