"""Streaming the full (unsharded) weights of an FSDP2 model, one tensor at a time, in HF checkpoint names.

This is what the refit path feeds to the inference engine. Each parameter is gathered with
`DTensor.full_tensor()` only when the consumer asks for it and dropped before the next one, so the peak
extra memory is one full tensor, never a second copy of the model.

Every rank must drive the generator to the end, in the same order: `full_tensor()` is a collective.

Names and layouts are the checkpoint's: `models.checkpoint_format.CheckpointFormat` reverts what transformers
converted on load (fused MoE experts, renamed modules) tensor by tensor; for dense models that is the
identity and the names are the module's `state_dict()` names.

A weight shared by two modules (tied input/output embeddings) is yielded once, under its first name
(`model.embed_tokens.weight`); inference engines re-tie `lm_head` from the config.
"""

from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from colocate.models.checkpoint_format import CheckpointFormat

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


def gather_groups(model: nn.Module, names: list[str]) -> dict[str, tuple[FSDPModule, str]]:
    """State-dict name -> (the FSDP module whose all-gather holds it, its name inside that module)."""
    fsdp = [(name, m) for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    out = {}
    for name in names:
        # The innermost FSDP module containing the tensor owns it ("" is the root).
        prefix, module = max(((p, m) for p, m in fsdp if p == "" or name.startswith(p + ".")),
                             key=lambda pm: len(pm[0]), default=("", None))
        if module is not None:
            out[name] = (module, name[len(prefix) + 1:] if prefix else name)
    return out


def checkpoint_format(model: nn.Module) -> CheckpointFormat:
    """The model's checkpoint layout, worked out once (on meta tensors) and kept on the model."""
    fmt = getattr(model, "_colocate_checkpoint_format", None)
    if fmt is None:
        fmt = CheckpointFormat(model, {n: tuple(t.shape) for n, t in _unique_state(model)})
        model._colocate_checkpoint_format = fmt
    return fmt


def iter_full_weights(
    model: nn.Module, dtype: torch.dtype | None = None, *, fsdp_param_dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(checkpoint name, full tensor)` for each unique weight, in checkpoint layout: see
    `_iter_model_weights` for the gather and `CheckpointFormat` for the layout."""
    fmt = checkpoint_format(model)
    weights = _iter_model_weights(model, dtype, fsdp_param_dtype=fsdp_param_dtype)
    try:
        for name, tensor in weights:
            yield from fmt.convert(name, tensor)
    finally:
        weights.close()  # reshards at once if the consumer stops early


def _iter_model_weights(
    model: nn.Module, dtype: torch.dtype | None = None, *, fsdp_param_dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, full_tensor)` for each unique weight, gathered across ranks and cast to `dtype`.

    `fsdp_param_dtype`: the FSDP2 `MixedPrecisionPolicy.param_dtype` the model was sharded with. When it is
    `dtype` (the refit case: bf16 compute, bf16 engine), each FSDP module is gathered with its own `unshard()`:
    one all-gather per transformer block in that dtype, instead of one per parameter (Qwen2.5-1.5B: 29
    collectives, not 338). The bits are the same: FSDP casts the local shard before gathering, as below.
    Otherwise (e.g. an fp32 checkpoint of a bf16-compute model) each parameter is cast and gathered alone.
    """
    reshard(model)
    state = list(_unique_state(model))
    groups = gather_groups(model, [n for n, _ in state]) if dtype is not None and dtype == fsdp_param_dtype else {}
    current: FSDPModule | None = None
    try:
        for name, tensor in state:
            if name in groups:
                owner, local_name = groups[name]
                if owner is not current:
                    # Keep the root gathered until the end: its tensors (embeddings, final norm) come both
                    # first and last in state-dict order.
                    if current is not None and current is not model:
                        current.reshard()
                    owner.unshard()
                    current = owner
                # A copy: the consumer may hold several tensors (a bucket) past this module's reshard. One
                # device copy per tensor is far cheaper than a collective per tensor.
                yield name, owner.get_parameter(local_name).detach().clone()
                continue
            tensor = tensor.detach()
            # Cast the local shard before gathering: half the traffic for bf16, and the same bits, since a
            # cast is elementwise.
            if dtype is not None:
                tensor = tensor.to(dtype)
            yield name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    finally:
        reshard(model)


def weights_manifest(model: nn.Module, dtype: torch.dtype | None = None) -> list[ManifestEntry]:
    """`(name, shape, dtype)` of exactly what `iter_full_weights` yields, without gathering anything."""
    fmt = checkpoint_format(model)
    out = []
    # A DTensor's .shape is the global shape, so no communication is needed.
    for name, tensor in _unique_state(model):
        dt = dtype if dtype is not None else tensor.dtype
        out += [(n, shape, dt) for n, shape in fmt.meta(name, tuple(tensor.shape), dt)]
    return out
