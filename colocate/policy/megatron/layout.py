"""Where things live in a Megatron-core policy: which pipeline stage owns each layer, which tensor / data /
pipeline rank a global rank is, and whether a model's shapes divide over the parallel sizes. Pure functions.

Megatron-core 0.19.2 is the reference for every rule here (files under `megatron/core/`, as in the 0.19.2 wheel):
- stages: `transformer/transformer_block.py:70` `get_num_layers_to_build` and
  `transformer/transformer_layer.py:59` `get_transformer_layer_offset`: without an uneven first/last stage, a
  custom layout or virtual stages (none of which colocate sets), `num_layers % pp == 0` is asserted and stage s
  builds layers [s * L/pp, (s+1) * L/pp), numbered from 0 within the stage (`transformer_block.py:363`).
- ranks: `parallel_state.py:617` `initialize_model_parallel(order="tp-cp-ep-dp-pp")`: the tensor rank varies
  fastest, then (cp = ep = 1 here) data, then pipeline.
- divisibility: `transformer/attention.py:350-366` (heads over tp; when num_query_groups < tp each rank takes
  part of one group, which needs tp % num_query_groups == 0), `tensor_parallel/layers.py:965,1328` (the output
  / input size of a column / row parallel linear over tp), `tensor_parallel/utils.py:114` (the vocabulary over
  tp; colocate does not pad it, so the exported embedding keeps the checkpoint's shape).
"""

from __future__ import annotations

from dataclasses import dataclass

from colocate.policy.megatron.errors import MegatronLayoutError


@dataclass(frozen=True)
class RankCoords:
    tp: int
    dp: int
    pp: int


def rank_coords(rank: int, *, tp_size: int, pp_size: int, world_size: int) -> RankCoords:
    """Tensor, data and pipeline rank of global `rank` in Megatron's default order "tp-cp-ep-dp-pp"."""
    dp_size = world_size // (tp_size * pp_size)
    return RankCoords(tp=rank % tp_size, dp=(rank // tp_size) % dp_size, pp=rank // (tp_size * dp_size))


def layers_per_stage(num_layers: int, pp_size: int) -> int:
    if num_layers % pp_size:
        raise MegatronLayoutError(
            "num_hidden_layers", f"{num_layers} layers do not split evenly over {pp_size} pipeline stages")
    return num_layers // pp_size


def stage_of_layer(layer: int, *, num_layers: int, pp_size: int) -> tuple[int, int]:
    """(pipeline stage, index within that stage's `decoder.layers`) of global decoder layer `layer`."""
    if not 0 <= layer < num_layers:
        raise IndexError(f"layer {layer} of a {num_layers}-layer model")
    per = layers_per_stage(num_layers, pp_size)
    return layer // per, layer % per


def check_divisible(*, num_heads: int, num_kv_heads: int, intermediate_size: int, vocab_size: int,
                    num_layers: int, tp_size: int, pp_size: int, world_size: int) -> None:
    """Raise `MegatronLayoutError` naming the first quantity the parallel sizes do not divide."""
    if tp_size < 1 or pp_size < 1:
        raise MegatronLayoutError("tensor_parallel_size", f"tp={tp_size} and pp={pp_size} must be >= 1")
    if world_size % (tp_size * pp_size):
        raise MegatronLayoutError(
            "policy_workers", f"{world_size} policy workers are not a multiple of tp * pp = {tp_size * pp_size}")
    if num_heads % tp_size:
        raise MegatronLayoutError("num_attention_heads", f"{num_heads} heads do not split over tp={tp_size}")
    if num_kv_heads >= tp_size and num_kv_heads % tp_size:
        raise MegatronLayoutError(
            "num_key_value_heads", f"{num_kv_heads} key/value heads do not split over tp={tp_size}")
    if num_kv_heads < tp_size and tp_size % num_kv_heads:
        # Megatron then gives each group to tp / num_kv_heads ranks (attention.py:1839-1860).
        raise MegatronLayoutError(
            "num_key_value_heads", f"tp={tp_size} is not a multiple of the {num_kv_heads} key/value heads")
    if intermediate_size % tp_size:
        raise MegatronLayoutError(
            "intermediate_size", f"{intermediate_size} MLP channels do not split over tp={tp_size}")
    if vocab_size % tp_size:
        raise MegatronLayoutError(
            "vocab_size", f"the vocabulary of {vocab_size} does not split over tp={tp_size} (colocate does not "
            "pad it: the refit must send the checkpoint's shapes)")
    layers_per_stage(num_layers, pp_size)
