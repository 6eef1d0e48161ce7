"""Shared by the generation tests: one Ray session and two tiny models (seeds 0 and 1, same tokenizer)."""

from __future__ import annotations

import pytest
import ray

from tests import hf_reference


@pytest.fixture(scope="package")
def ray_session():
    if ray.is_initialized():  # started by whoever ran before us: share it, leave it running
        yield
        return
    # A private instance, never a Ray cluster already running on this machine.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="package")
def models(tmp_path_factory) -> dict[int, str]:
    return hf_reference.two_models(tmp_path_factory.mktemp("generation-models"))
