"""What a vLLM engine's model accepts from a refit, worked out from the engine itself without moving a weight.

`check_offer(model, offer)` runs the model's own `load_weights` over the offered (name, dtype, shape) list as
meta tensors, against meta twins of the model's parameters in checkpoint format, and records where each
tensor lands. It returns the mismatches a refit would otherwise hit silently or half-way:
- `rejected`: a name the loader raises on (unknown module, wrong shape: vLLM's loaders assert shapes);
- `ignored`: a name the loader silently drops (no parameter receives it, e.g. `lm_head.weight` of a tied model);
- `wrong_dtype`: a tensor whose dtype is not its parameter's (the loader would cast it on every refit);
- `unfilled`: an engine parameter the offer leaves short of elements (a withheld `k_proj` leaves `qkv_proj`
  two thirds full), so a refit would mix new and old weights.
Nothing of the live model changes: each module's parameter dict is swapped for one of twins for the call and
put back in `finally`. The twins are built from the layerwise-reload metadata where vLLM repacked the weights
(CPU, quantized: the live Linear `weight` is then empty) and from the live parameters elsewhere (GPU).

Why the engine's own loader and not a table of names: vLLM renames and stacks per architecture (qkv_proj,
gate_up_proj, MoE `w13_weight` from per-expert `w1`/`w3`, Mixtral's `block_sparse_moe`), and its loader is
the only place where that is certain for every family and both vLLM versions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from colocate.refit.plan import dtype_from_name, dtype_name

# (name, dtype name, shape): one tensor a refit offers (plan.Meta's row).
Offer = Sequence[tuple[str, str, tuple[int, ...]]]


@dataclass
class OfferCheck:
    """Where an offer disagrees with the engine; `ok` when it fills every parameter exactly."""

    rejected: dict[str, str] = field(default_factory=dict)  # offered name -> the loader's error
    # engine layers whose post-load processing an in-place refit cannot redo -> why (set by the caller)
    unsupported: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    wrong_dtype: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (offered, engine)
    # offered name -> {engine parameter: elements it fills there}; engine parameter -> elements it needs
    destinations: dict[str, dict[str, int]] = field(default_factory=dict)
    needs: dict[str, int] = field(default_factory=dict)

    def unfilled(self, names: Iterable[str] | None = None) -> dict[str, tuple[int, int]]:
        """Engine parameter -> (elements filled, needed) for those the tensors `names` (default: the whole
        offer) leave short."""
        loaded: dict[str, int] = {}
        for name in self.destinations if names is None else names:
            for param, numel in self.destinations.get(name, {}).items():
                loaded[param] = loaded.get(param, 0) + numel
        return {p: (loaded.get(p, 0), need) for p, need in self.needs.items() if need and loaded.get(p, 0) != need}

    @property
    def ok(self) -> bool:
        return not (self.rejected or self.unsupported or self.ignored or self.wrong_dtype or self.unfilled())

    def summary(self, limit: int = 5) -> str:
        """One line: the counts and the first mismatches of each kind."""
        if self.ok:
            return (f"every one of {len(self.destinations)} tensors lands; "
                    f"all {len(self.needs)} engine parameters filled")
        kinds = {
            "engine layers a refit cannot update in place": [f"{n} ({e})" for n, e in self.unsupported.items()],
            "rejected by the engine's loader": [f"{n} ({e})" for n, e in self.rejected.items()],
            "ignored by the engine": self.ignored,
            "of another dtype than the engine's": [f"{n}: {a} != {b}" for n, (a, b) in self.wrong_dtype.items()],
            "engine parameters left unfilled": [f"{n} ({a}/{b} elements)" for n, (a, b) in self.unfilled().items()],
        }
        parts = []
        for label, items in kinds.items():
            if items:
                more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
        return "; ".join(parts)


def _load_numel(module: torch.nn.Module, param: torch.Tensor) -> int:
    """Elements a checkpoint fills in `param`: vLLM pads the vocabulary of embeddings and LM heads."""
    indices = getattr(module, "shard_indices", None)
    if indices is not None and param.dim() == 2:
        return int(indices.num_org_elements) * param.shape[1]
    return int(getattr(param, "weight_loader_numel", param.numel()))


def _twin(param: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """A meta copy of a parameter with its attributes (weight_loader, output_dim, ...), bound to `module`."""
    from types import MethodType

    twin = param.data.to("meta")
    twin.__class__ = param.__class__
    twin.__dict__ = param.__dict__.copy()
    for key, value in twin.__dict__.items():  # layerwise metadata keeps loaders unbound (vLLM's sanitize)
        if isinstance(value, MethodType) and not isinstance(value.__self__, torch.nn.Module):
            twin.__dict__[key] = value.__func__.__get__(module)
    return twin


def _checkpoint_format(module: torch.nn.Module, use_reload_metadata: bool) -> dict[str, torch.Tensor]:
    live = {n: p for n, p in module._parameters.items() if p is not None}
    if use_reload_metadata:
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

        info = LAYERWISE_INFO.get(module)
        if info is not None:
            # The metadata leaves out what vLLM never repacks (a Linear's `bias`): the live one is right.
            return {**live, **info.restore_metadata[0]}
    return live


@contextmanager
def _meta_twins(model: torch.nn.Module, use_reload_metadata: bool,
                hits: list[tuple[str, int]]) -> Iterator[dict[str, tuple[torch.nn.Module, torch.Tensor]]]:
    """Swap every module's parameters for recording meta twins; yields engine name -> (module, twin)."""
    from vllm.model_executor.model_loader.reload.meta import CopyCounter
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    saved = [(m, m._parameters) for m in model.modules()]
    twins: dict[int, torch.Tensor] = {}  # by the live parameter: tied modules share one twin
    by_name: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {}
    try:
        for prefix, module in model.named_modules():
            live = {n: p for n, p in module._parameters.items() if p is not None}
            fmt = _checkpoint_format(module, use_reload_metadata)
            new = dict(module._parameters)
            for name, source in fmt.items():
                key = id(live.get(name, source))
                if key not in twins:
                    twin = _twin(source, module)
                    qualified = f"{prefix}.{name}" if prefix else name
                    loader = getattr(twin, "weight_loader", default_weight_loader)
                    # A reload leaves vLLM's deferring wrapper on the metadata tensors (it unwraps only the
                    # tensors it materialised); outside a reload that wrapper loads nothing.
                    while getattr(loader, "__name__", "") == "online_process_loader":
                        loader = loader.__wrapped__

                    def record(*args, _loader=loader, _q=qualified, **kwargs):
                        with CopyCounter() as counter:
                            out = _loader(*args, **kwargs)
                        hits.append((_q, counter.copied_numel))
                        return out

                    twin.weight_loader = record
                    twins[key] = twin
                    by_name[qualified] = (module, twin)
                new[name] = twins[key]
            module._parameters = new
        yield by_name
    finally:
        for module, params in saved:
            module._parameters = params


def check_offer(model: torch.nn.Module, offer: Offer, *, use_reload_metadata: bool) -> OfferCheck:
    """Dry-run `model.load_weights` over `offer` on meta tensors; see the module docstring."""
    result = OfferCheck()
    hits: list[tuple[str, int]] = []
    with torch.no_grad(), _meta_twins(model, use_reload_metadata, hits) as params:
        result.needs = {q: _load_numel(module, twin) for q, (module, twin) in params.items()}
        for name, dtype, shape in offer:
            hits.clear()
            meta = torch.empty(tuple(shape), dtype=dtype_from_name(dtype), device="meta")
            try:
                model.load_weights(weights=[(name, meta)])
            except Exception as e:  # the loader's verdict: unknown name, shape assertion, ...
                why = str(e).splitlines()[0][:160] if str(e) else "no message"
                result.rejected[name] = f"{dtype}{list(shape)}: {type(e).__name__}: {why}"
                continue
            if not hits:
                result.ignored.append(name)
                continue
            landed = result.destinations.setdefault(name, {})
            for qualified, numel in hits:
                landed[qualified] = landed.get(qualified, 0) + numel
                want = dtype_name(params[qualified][1].dtype)
                if want != dtype:
                    result.wrong_dtype[name] = (dtype, want)
    return result


def meta_engine_model(model_dir: str, max_model_len: int = 64) -> tuple[torch.nn.Module, torch.dtype]:
    """vLLM's model for a checkpoint, built on the meta device (no weights read or allocated), and its dtype.

    For a static check with no engine running: the same classes and loaders a started engine would use,
    with a one-process gloo group for vLLM's parallel state (its groups made anew for each model).
    """
    import tempfile

    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import destroy_model_parallel, model_parallel_is_initialized
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.utils import initialize_model

    config = EngineArgs(model=model_dir, load_format="dummy", enforce_eager=True, skip_tokenizer_init=True,
                        max_model_len=max_model_len).create_engine_config()
    with set_current_vllm_config(config):
        if not torch.distributed.is_initialized():
            init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                         distributed_init_method=f"file://{tempfile.mktemp(prefix='colocate-')}")
        # Per model: which groups exist depends on the config (an MoE model needs the expert-parallel one).
        if model_parallel_is_initialized():
            destroy_model_parallel()
        initialize_model_parallel(1, 1)
        dtype, default = config.model_config.dtype, torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # as vLLM's loader does: layers create their weights in it
        try:
            with torch.device("meta"):
                model = initialize_model(vllm_config=config)
        finally:
            torch.set_default_dtype(default)
    return model, dtype
