"""A faster `load_weights` for dense models on GPU: each HF tensor copied straight into its slice of the
engine's parameter, with the destinations worked out once per engine instead of once per call.

Why: vLLM's `model.load_weights` rebuilds its name -> parameter table and walks its stacked-parameter
mapping for every call and every tensor. A refit calls it once per bucket, so for Llama-3-8B that is ~32
calls and ~290 lookups each refit, milliseconds of Python on the critical path. Here the plan is:
- vLLM's fused parameters (`packed_modules_mapping`, e.g. qkv_proj <- q/k/v_proj, gate_up_proj <-
  gate/up_proj) are split along dim 0 by the fusing layer's own per-rank sizes (`output_partition_sizes`:
  this TP rank's q / k / v heads, gate / up rows), in mapping order;
- every other parameter takes the HF tensor of the same name; a vocabulary padded by vLLM takes the
  first rows.
A tensor-parallel worker takes a tensor directly only where what arrived is exactly its part: a shard-sliced
tensor (`refit/slices.py`, the slice its own loader keeps) of the destination's shape, or a whole tensor
of the destination's shape (replicated: norms, a KV head every rank keeps). A whole tensor for a sharded
destination goes to vLLM's loader, which slices it. So only where this is certainly what `load_weights`
does: no quantization, one pipeline stage, an architecture on `SUPPORTED`, same dtype, same shape.
Anything else (an unknown name, a shape that differs) goes through `model.load_weights`, per tensor, so the
result is always what vLLM's loader would produce (`tests/test_tp_loaders.py` checks both against it on a
TP=2 model).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from colocate.refit.folded import fold_into, unfold
from colocate.refit.slices import slice_data

# Tensors from this size up are copied one by one (see `DirectLoader.load`).
FOREACH_MAX_BYTES = 16 << 20

SUPPORTED = {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"}


def checkpoint_names_known(model_config: Any) -> bool:
    """Whether the engine's parameter names are the checkpoint's, packing aside (see `param_sources`)."""
    archs = set(getattr(model_config.hf_config, "architectures", None) or [])
    return bool(archs) and archs <= SUPPORTED


def can_load_directly(worker: Any) -> bool:
    return (
        torch.cuda.is_available()
        and worker.parallel_config.pipeline_parallel_size == 1
        and worker.model_config.quantization is None
        and checkpoint_names_known(worker.model_config)
    )


def param_sources(model: torch.nn.Module) -> dict[str, list[str]]:
    """Engine parameter (vLLM name) -> the HF tensors that fill it: itself, or a fused parameter's parts in
    `packed_modules_mapping` order (qkv_proj <- q_proj, k_proj, v_proj). Names only, valid on any device."""
    packed: dict[str, list[str]] = dict(getattr(model, "packed_modules_mapping", {}) or {})
    out = {}
    for pname, _ in model.named_parameters():
        module_name, _, leaf = pname.rpartition(".")
        fused = next((k for k in packed if module_name.endswith("." + k) or module_name == k), None)
        if fused is None:
            out[pname] = [pname]
        else:
            prefix = module_name[: len(module_name) - len(fused)]
            out[pname] = [f"{prefix}{part}.{leaf}" for part in packed[fused]]
    return out


def destinations(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF tensor name -> the view of the engine parameter it is copied into."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for pname, sources in param_sources(model).items():
        param = params[pname]
        if sources == [pname]:
            out[pname] = param.data
            continue
        module = modules.get(pname.rpartition(".")[0])
        # This TP rank's part of each (the global `output_sizes` over the TP size, KV heads replicated)
        sizes = getattr(module, "output_partition_sizes", None) or getattr(module, "output_sizes", None)
        if sizes is None or len(sizes) != len(sources) or sum(sizes) != param.shape[0]:
            continue  # not a layout we can split with certainty: vLLM's loader handles these names
        offset = 0
        for name, size in zip(sources, sizes, strict=True):
            out[name] = param.data.narrow(0, offset, size)
            offset += size
    return out


class _Plan(NamedTuple):
    big: list[tuple[torch.Tensor, torch.Tensor]]  # (destination, source), one copy each
    small: list[tuple[list[torch.Tensor], list[torch.Tensor]]]  # per source dtype, one foreach copy
    rest: list[tuple[str, torch.Tensor]]  # for vLLM's own loader


class DirectLoader:
    def __init__(self, model: torch.nn.Module, tp_size: int = 1) -> None:
        self.model, self.tp_size = model, tp_size
        self.dst = destinations(model)

    def load(self, weights: list[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None) -> int:
        """`dtype`: what the tensors stand for; a wider float source is cast by the copy into a parameter of
        that dtype (round to nearest, as `.to(dtype)`), and cast first on vLLM's loader path.

        Small tensors of one source dtype go out as one multi-tensor launch (`torch._foreach_copy_`), large
        ones one copy each. Measured on an H200 (docs/benchmarks/2026-12-01-refit-speed-h200 and its -s7): a copy per
        tensor costs Qwen2.5-1.5B's 338 tensors 5.2 ms of engine load against a 3.3 ms floor (launches and
        Python per tensor), while one foreach launch for all of Llama-3-8B's 16 GB loaded in 12 ms against 8.8
        ms one copy each (its kernel walks big tensors in chunks, slower than a plain copy).
        Returns how many tensors went to vLLM's loader instead.

        The one-copy refit hands over the same views every refit (`schedule.SameViews`): where each goes is
        worked out once and kept with them (planning 340 tensors costs ~0.5 ms of Python, a sixth of
        Qwen2.5-1.5B's copy)."""
        memo = getattr(weights, "memo", None)  # `SameViews`: planned once, with the views
        plan = memo.get((self, dtype)) if memo is not None else None
        if plan is None:
            plan = self._plan(weights, dtype)
            if memo is not None:
                memo[(self, dtype)] = plan
        for d, data in plan.big:
            d.copy_(data, non_blocking=True)
        for dsts, srcs in plan.small:
            torch._foreach_copy_(dsts, srcs, non_blocking=True)
        if plan.rest:
            self.model.load_weights(weights=[(n, unfold(t if dtype is None else t.to(dtype))) for n, t in plan.rest])
        return len(plan.rest)

    def _plan(self, weights: list[tuple[str, torch.Tensor]], dtype: torch.dtype | None) -> _Plan:
        small: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        plan = _Plan([], [], [])
        for name, t in weights:
            data, piece = slice_data(t)  # a shard-sliced tensor: the slice that arrived
            d = self._destination(name, data, dtype, sliced=piece is not None)
            # A FoldedTensor (a view inside a parameter of another layout): the destination viewed its way.
            pair = fold_into(d, data) if d is not None else None
            if pair is None:
                plan.rest.append((name, t))
                continue
            d, data = pair
            if d.nbytes >= FOREACH_MAX_BYTES:
                plan.big.append((d, data))
            else:
                dsts, srcs = small.setdefault(data.dtype, ([], []))
                dsts.append(d)
                srcs.append(data)
        plan.small.extend(small.values())
        return plan

    def _destination(self, name: str, t: torch.Tensor, dtype: torch.dtype | None, *, sliced: bool = False
                     ) -> torch.Tensor | None:
        """Where `t` goes, or None for vLLM's loader (an unknown name, another dtype, another shape).
        `sliced`: `t` is the slice of the tensor that this TP rank's loader keeps."""
        d = self.dst.get(name)
        if d is None or d.dtype != (dtype or t.dtype) or d.shape[1:] != t.shape[1:]:
            return None
        if d.shape[0] == t.shape[0]:
            return d  # its part, or (whole, this shape) a tensor every rank keeps whole
        # vLLM pads the vocabulary (the padding stays): the first rows take this rank's part of it, which is
        # the whole tensor on one rank, or the slice that arrived; a whole one on a TP rank goes to vLLM.
        if d.shape[0] > t.shape[0] and ("embed_tokens" in name or "lm_head" in name) and (sliced or self.tp_size == 1):
            return d[: t.shape[0]]
        return None
