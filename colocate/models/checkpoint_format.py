"""From a transformers model's own tensors to the checkpoint's names and layouts, one tensor at a time.

transformers 5 converts some checkpoints on load: MoE experts are fused (Qwen3-MoE's per-expert
`mlp.experts.{e}.gate_proj.weight` / `up_proj.weight` become one 3-D `mlp.experts.gate_up_proj`) and modules
are renamed (Mixtral's `block_sparse_moe.experts.{e}.w1` becomes `mlp.experts.gate_up_proj`). Inference
engines load checkpoint names, so what a policy streams must be converted back. transformers keeps the
conversions it applied (`model._weight_conversions`) and reverts them in `save_pretrained` with
`revert_weight_conversion`; this module applies that same reversal tensor by tensor, so a refit still
streams one gathered tensor at a time (never the whole state dict).

Per tensor is only right where each model tensor reverts on its own (a fused tensor splits into its parts).
A conversion that would need several model tensors at once (a checkpoint tensor split on load) is detected
by `CheckpointFormat.__init__`, which compares the per-tensor reversal with transformers' whole-dict one on
meta tensors, and refused there with `UnsupportedModelError`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from colocate.models.errors import UnsupportedModelError  # re-exported: where callers have always found it


def _revert(model: nn.Module, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, named)


class CheckpointFormat:
    """Maps a model's state-dict tensors to the checkpoint tensors they were loaded from.

    `shapes` holds the model's (state-dict name -> shape); names whose reversal is the identity take a fast
    path (no call into transformers per refit: a dense model has no conversion at all).
    """

    def __init__(self, model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
        self.model = model
        self._identity: set[str] = set()
        meta = {n: torch.empty(s, device="meta") for n, s in shapes.items()}
        per_tensor: dict[str, tuple[int, ...]] = {}
        for name, t in meta.items():
            out = _revert(model, {name: t})
            if list(out) == [name] and tuple(out[name].shape) == tuple(t.shape):
                self._identity.add(name)
            for k, v in out.items():
                if k in per_tensor:
                    raise UnsupportedModelError(f"{type(model).__name__}: two model tensors revert to {k!r}")
                per_tensor[k] = tuple(v.shape)
        if len(self._identity) < len(meta):
            whole = {k: tuple(v.shape) for k, v in _revert(model, dict(meta)).items()}
            if whole != per_tensor:
                diff = sorted(set(whole.items()) ^ set(per_tensor.items()))[:4]
                raise UnsupportedModelError(
                    f"{type(model).__name__}: transformers' conversion of this checkpoint cannot be undone "
                    f"tensor by tensor (differs in {diff})")

    def is_identity(self, name: str) -> bool:
        """Whether the model's tensor `name` is the checkpoint's tensor of that name, as it is."""
        return name in self._identity

    def convert(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint tensors `tensor` (the model's `name`) stands for: itself, or views of its parts."""
        if name in self._identity:
            yield name, tensor
            return
        yield from _revert(self.model, {name: tensor}).items()

    def meta(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> list[tuple[str, tuple[int, ...]]]:
        """(checkpoint name, shape) of what `convert` yields for a tensor of this shape, computed on meta."""
        if name in self._identity:
            return [(name, tuple(shape))]
        return [(k, tuple(v.shape)) for k, v in self.convert(name, torch.empty(shape, dtype=dtype, device="meta"))]
