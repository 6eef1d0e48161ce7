"""Which bundle each worker of a group is scheduled in (the groups themselves are tested with real actors)."""

import pytest
from ray.util.placement_group import PlacementGroup

from colocate.placement import bundle_strategies


def test_worker_i_goes_to_bundle_i_unless_told_otherwise():
    pg = PlacementGroup.empty()
    assert [s.placement_group_bundle_index for s in bundle_strategies(3, pg, None)] == [0, 1, 2]
    assert [s.placement_group_bundle_index for s in bundle_strategies(2, pg, [1, 0])] == [1, 0]
    assert bundle_strategies(2, None, None) == [None, None]


@pytest.mark.parametrize("pg, indices, match", [
    (PlacementGroup.empty(), [0], "1 bundle indices for 2 workers"),
    (None, [0, 1], "need a placement_group"),
])
def test_inconsistent_placement_is_an_error(pg, indices, match):
    with pytest.raises(ValueError, match=match):
        bundle_strategies(2, pg, indices)


def test_a_tp_engine_sees_the_gpus_of_its_bundles_in_rank_order():
    from colocate.placement import engine_visible_devices, plan_bundles

    # Ray assigned the four bundles GPUs 3, 1, 0, 2; two TP=2 engines colocated with four policy ranks.
    gpus = ["3", "1", "0", "2"]
    plan = plan_bundles(mode="colocated", policy_workers=4, generation_workers=2, tensor_parallel_size=2, on_gpu=True)
    assert [engine_visible_devices(plan, gpus, w, 2)["CUDA_VISIBLE_DEVICES"] for w in range(2)] == ["3,1", "0,2"]
    # Split: the engine's devices follow the policy's.
    plan = plan_bundles(mode="split", policy_workers=1, generation_workers=1, tensor_parallel_size=2, on_gpu=True)
    env = engine_visible_devices(plan, ["5", "6", "7"], 0, 2)
    assert env == {"CUDA_VISIBLE_DEVICES": "6,7", "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
