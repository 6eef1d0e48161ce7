"""Where each actor of a run goes: the bundles of the job's placement group (`plan_bundles`, pure), worker i
of a group in bundle `bundle_indices[i]` (`bundle_strategies`), and the check of where bundles landed
(`check_engine_nodes`).

Bundle layout (tp = generation.tensor_parallel_size):
- colocated: max(policy ranks, engines * tp) bundles, one per device; policy rank i in bundle i, engine w
  in bundle w * tp (its TP ranks on devices w * tp .. w * tp + tp - 1, each shared with the policy rank of
  that index, which sends it the refit).
- split: the policy's bundles 0 .. P - 1, then tp bundles per engine; engine w in bundle P + w * tp.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from colocate.config import ConfigError


class PlacementError(ConfigError):
    """The cluster placed the run's bundles where its actors cannot work together (found once the placement
    group is ready, before any actor starts)."""


@dataclass(frozen=True)
class BundlePlan:
    bundles: list[dict[str, float]]
    policy_bundles: list[int]
    generation_bundles: list[int]
    share: float
    """The part of its bundle each actor takes: colocated, half (both sides land on the same device)."""

    def engine_bundles(self, engine: int, tensor_parallel_size: int) -> list[int]:
        """The bundles (devices) engine `engine`'s TP ranks use."""
        first = self.generation_bundles[engine]
        return list(range(first, first + tensor_parallel_size))


def plan_bundles(*, mode: str, policy_workers: int, generation_workers: int, tensor_parallel_size: int,
                 on_gpu: bool) -> BundlePlan:
    tp = tensor_parallel_size
    bundle = {"GPU": 1.0, "CPU": 1.0} if on_gpu else {"CPU": 1.0}
    if mode == "colocated":
        n = max(policy_workers, generation_workers * tp)
        return BundlePlan([dict(bundle) for _ in range(n)], list(range(policy_workers)),
                          [w * tp for w in range(generation_workers)], share=0.5)
    n = policy_workers + generation_workers * tp
    return BundlePlan([dict(bundle) for _ in range(n)], list(range(policy_workers)),
                      [policy_workers + w * tp for w in range(generation_workers)], share=1.0)


def engine_visible_devices(plan: BundlePlan, bundle_gpus: Sequence[str], engine: int,
                           tensor_parallel_size: int) -> dict[str, str]:
    """The environment of engine `engine`'s actor on GPU when it spans k > 1 devices: CUDA_VISIBLE_DEVICES =
    the physical GPUs of its k bundles in TP-rank order (vLLM's TP rank r takes visible device r: the one it
    shares, colocated, with the policy rank of bundle first + r), and Ray told not to narrow it to the one
    GPU the actor itself claims. `bundle_gpus[b]`: bundle b's GPU, as Ray assigned it."""
    gpus = [bundle_gpus[b] for b in plan.engine_bundles(engine, tensor_parallel_size)]
    return {"CUDA_VISIBLE_DEVICES": ",".join(gpus), "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}


def check_engine_nodes(plan: BundlePlan, tensor_parallel_size: int, bundle_nodes: Mapping[int, str]) -> None:
    """Every engine's TP ranks are processes on its actor's node: its bundles must all be on that node
    (`bundle_nodes`: bundle index -> node id, as `placement_group_table` reports them)."""
    for engine in range(len(plan.generation_bundles)):
        used = plan.engine_bundles(engine, tensor_parallel_size)
        nodes = sorted({bundle_nodes[b] for b in used})
        if len(nodes) > 1:
            raise PlacementError(f"engine {engine}'s tensor-parallel bundles {used} landed on {len(nodes)} nodes "
                                 f"({', '.join(n[:8] for n in nodes)}); an engine spans devices of one node")


def bundle_strategies(
    num_workers: int, placement_group: PlacementGroup | None, bundle_indices: Sequence[int] | None
) -> list[PlacementGroupSchedulingStrategy | None]:
    """One scheduling strategy per worker (bundle i by default); all None without a placement group."""
    if placement_group is None:
        if bundle_indices is not None:
            raise ValueError("bundle_indices need a placement_group")
        return [None] * num_workers
    if bundle_indices is None:
        bundle_indices = list(range(num_workers))
    if len(bundle_indices) != num_workers:
        raise ValueError(f"{len(bundle_indices)} bundle indices for {num_workers} workers")
    return [PlacementGroupSchedulingStrategy(placement_group=placement_group, placement_group_bundle_index=i)
            for i in bundle_indices]
