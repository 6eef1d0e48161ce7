"""Engines that cannot start surface as `EngineStartError` from the group, naming the worker and the cause."""

from __future__ import annotations

import pytest

from colocate.generation.errors import EngineStartError
from colocate.generation.group import GenerationGroup


def test_missing_model_directory(ray_session, tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(EngineStartError, match="worker 0 failed to start") as info:
        GenerationGroup(num_workers=1, model=missing)
    assert f"model directory {missing!r} does not exist" in str(info.value)
    assert info.value.worker_index == 0


@pytest.mark.slow
def test_vllm_failure_carries_its_cause(ray_session, tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a model directory vLLM cannot make sense of
    with pytest.raises(EngineStartError, match=r"the sync vLLM engine for .* failed to start") as info:
        GenerationGroup(num_workers=1, model=str(tmp_path))
    assert 'backends.py", line' in str(info.value)  # the remote traceback
