"""Placement strategy and tensor-parallel engines: the config's checks (before Ray starts) and the bundle
layout they lead to (pure; the multi-node runs themselves are in tests/test_multinode.py)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from colocate.config import ROOT, Config, ConfigError, check, register
from colocate.placement import PlacementError, check_engine_nodes, plan_bundles

register()


def _compose(overrides: list[str]) -> Config:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return OmegaConf.to_object(compose(config_name="config", overrides=["+recipe=grpo", *overrides]))


@pytest.mark.parametrize("strategy", ["PACK", "SPREAD", "STRICT_SPREAD"])
def test_every_ray_strategy_is_accepted(strategy):
    cfg = _compose([f"placement.strategy={strategy}", "placement.policy_workers=2",
                    "placement.generation_workers=2"])
    assert cfg.placement.strategy == strategy
    assert check(cfg, cluster_devices=0) == "zmq"


@pytest.mark.parametrize("overrides, gpus, match", [
    (["placement.strategy=spread"], 0, r"placement.strategy must be one of PACK, SPREAD, STRICT_SPREAD, got 'spread'"),
    (["generation.tensor_parallel_size=0"], 0, "generation.tensor_parallel_size must be >= 1"),
    # colocated: every engine device needs a policy rank beside it to send it the refit
    (["placement.policy_workers=1", "generation.tensor_parallel_size=2"], 0, r"1 \* 2 engine devices"),
    (["placement.policy_workers=1", "placement.generation_workers=2"], 0, r"2 \* 1 engine devices"),
    # colocated TP: an engine's ranks are processes of one node; a spread strategy separates them
    (["placement.policy_workers=2", "generation.tensor_parallel_size=2", "placement.strategy=STRICT_SPREAD"], 0,
     "use PACK"),
    # split on GPU: the policy's devices plus tp per engine
    (["placement=split", "placement.device=cuda", "placement.generation_workers=2",
      "generation.tensor_parallel_size=2"], 4, "needs 5 GPUs"),
    (["placement.device=cuda", "placement.policy_workers=4", "generation.tensor_parallel_size=4"], 2,
     "needs 4 GPUs"),
])
def test_impossible_scale_fails_before_any_actor(overrides, gpus, match):
    cfg = _compose(overrides)
    with pytest.raises(ConfigError, match=match) as info:
        check(cfg, cluster_devices=gpus)
    assert "\n" not in str(info.value)  # one line


def test_possible_tensor_parallel_placements_pass():
    assert check(_compose(["placement.policy_workers=2", "generation.tensor_parallel_size=2"]),
                 cluster_devices=0) == "zmq"
    assert check(_compose(["placement=split", "placement.device=cuda", "placement.generation_workers=2",
                           "generation.tensor_parallel_size=2"]), cluster_devices=5) == "broadcast"


@pytest.mark.parametrize("mode, pol, gen, tp, n, pol_b, gen_b, share", [
    ("colocated", 2, 2, 1, 2, [0, 1], [0, 1], 0.5),
    ("colocated", 4, 2, 2, 4, [0, 1, 2, 3], [0, 2], 0.5),   # engine w's TP ranks on devices 2w, 2w + 1
    ("colocated", 3, 1, 2, 3, [0, 1, 2], [0], 0.5),         # a policy rank without an engine beside it
    ("split", 1, 2, 1, 3, [0], [1, 2], 1.0),
    ("split", 2, 2, 2, 6, [0, 1], [2, 4], 1.0),
])
def test_bundle_layout(mode, pol, gen, tp, n, pol_b, gen_b, share):
    plan = plan_bundles(mode=mode, policy_workers=pol, generation_workers=gen, tensor_parallel_size=tp,
                        on_gpu=False)
    assert len(plan.bundles) == n and all(b == {"CPU": 1.0} for b in plan.bundles)
    assert (plan.policy_bundles, plan.generation_bundles, plan.share) == (pol_b, gen_b, share)
    gpu = plan_bundles(mode=mode, policy_workers=pol, generation_workers=gen, tensor_parallel_size=tp, on_gpu=True)
    assert all(b == {"GPU": 1.0, "CPU": 1.0} for b in gpu.bundles)


def test_an_engine_split_over_nodes_is_refused():
    plan = plan_bundles(mode="colocated", policy_workers=4, generation_workers=2, tensor_parallel_size=2,
                        on_gpu=False)
    check_engine_nodes(plan, 2, {0: "a", 1: "a", 2: "b", 3: "b"})  # one node per engine: fine
    with pytest.raises(PlacementError, match=r"engine 1's tensor-parallel bundles \[2, 3\] landed on 2 nodes"):
        check_engine_nodes(plan, 2, {0: "a", 1: "a", 2: "a", 3: "b"})
    # TP 1: any spread is fine
    check_engine_nodes(plan_bundles(mode="colocated", policy_workers=2, generation_workers=2,
                                    tensor_parallel_size=1, on_gpu=False), 1, {0: "a", 1: "b"})
