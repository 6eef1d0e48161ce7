"""Where each actor of a group goes: worker i in bundle `bundle_indices[i]` of the job's placement group."""

from __future__ import annotations

from collections.abc import Sequence

from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


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
