"""The parts of generation that need no engine: sharding, sampling options, and the version gate."""

from __future__ import annotations

import asyncio

import pytest

from colocate.generation.errors import SamplingOptionError, WeightsIncompleteError
from colocate.generation.gate import VersionGate
from colocate.generation.group import shard_bounds
from colocate.generation.types import SamplingConfig


@pytest.mark.parametrize(
    ("items", "shards", "want"),
    [
        (8, 2, [(0, 4), (4, 8)]),
        (5, 2, [(0, 3), (3, 5)]),
        (7, 3, [(0, 3), (3, 5), (5, 7)]),
        (1, 3, [(0, 1), (1, 1), (1, 1)]),
        (0, 2, [(0, 0), (0, 0)]),
    ],
)
def test_shard_bounds_are_contiguous_and_balanced(items, shards, want):
    assert shard_bounds(items, shards) == want


def test_sampling_options():
    assert SamplingConfig.from_options({"n": 4, "stop": "\n"}).stop == ("\n",)
    with pytest.raises(SamplingOptionError, match=r"\['max_new_tokens'\]"):
        SamplingConfig.from_options({"max_new_tokens": 3})
    for bad in ({"top_p": 0.0}, {"temperature": -1.0}, {"n": 0}, {"temperature": 0.0, "n": 2}):
        with pytest.raises(SamplingOptionError):
            SamplingConfig.from_options(bad)


def test_gate_drains_admitted_requests_and_holds_new_ones():
    async def scenario() -> list[str]:
        gate, log = VersionGate(), []

        async def request(name: str, seconds: float) -> None:
            async with gate.request() as version:
                log.append(f"{name} start v{version}")
                await asyncio.sleep(seconds)
                log.append(f"{name} end v{version}")

        async def update() -> None:
            async with gate.update():
                log.append("update")

        old = asyncio.create_task(request("old", 0.05))
        await asyncio.sleep(0.01)
        refit = asyncio.create_task(update())
        await asyncio.sleep(0.01)
        new = asyncio.create_task(request("new", 0.0))
        await asyncio.gather(old, refit, new)
        return log

    assert asyncio.run(scenario()) == ["old start v0", "old end v0", "update", "new start v1", "new end v1"]


def test_gate_turns_stale_after_a_failed_update_until_one_succeeds():
    async def scenario() -> None:
        gate = VersionGate()
        with pytest.raises(RuntimeError, match="boom"):
            async with gate.update():
                raise RuntimeError("boom")
        assert (gate.version, gate.stale) == (0, True)
        with pytest.raises(WeightsIncompleteError):
            async with gate.request():
                pass
        async with gate.exclusive():  # sleep / wake up: no version change, still stale
            pass
        assert gate.stale
        async with gate.update():
            pass
        assert (gate.version, gate.stale, gate.in_flight) == (1, False, 0)
        async with gate.request() as version:
            assert version == 1

    asyncio.run(scenario())
