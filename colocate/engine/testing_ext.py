"""A worker extension for tests: the weight-update steps of `vllm_engine`, callable by `llm.collective_rpc`.

    llm = make_llm(path, worker_extension_cls="colocate.engine.testing_ext.WeightUpdateTestExtension")
    llm.collective_rpc("colocate_begin_weight_update")
    llm.collective_rpc("colocate_load_weights", args=(bucket,))   # once per bucket
    llm.collective_rpc("colocate_finish_weight_update")

Tensors travel as RPC arguments, which only works with the in-process engine (the CPU default); a real refit
moves them through a transport (`colocate.refit`) instead.
"""

from __future__ import annotations

import torch

from colocate.engine import vllm_engine


class WeightUpdateTestExtension:
    """Mixed into the vLLM worker, so `self` is the worker."""

    def colocate_begin_weight_update(self) -> None:
        vllm_engine.begin_weight_update(self)

    def colocate_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        vllm_engine.load_weights_into_worker(self, weights)

    def colocate_finish_weight_update(self) -> None:
        vllm_engine.finish_weight_update(self)

    def colocate_parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(p.shape) for name, p in vllm_engine.engine_named_parameters(self).items()}
