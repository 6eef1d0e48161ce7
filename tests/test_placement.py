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
