"""GPU: the colocated memory dance of one RL step on a real GPU, with the generation group's sleep mode.

    sleep(level) -> wake_up(["weights"]) -> refit -> wake_up(["kv_cache"]) -> generate

Level 1 keeps a host copy of the weights; level 2 drops them, and generating before the refit is refused.

The engine, started from model A and refit to B while asleep, must decode exactly as an engine started from B.
Its prefix cache holds a long prompt's blocks from A before the sleep; the refit after the sleep does not reset
it (sleep forgot it: vLLM's `EngineCore.sleep` clears it), and no block of A's may be served after it.
Each phase is timed and printed. Skipped without CUDA; run on the device machine with `pytest -m gpu -s`.
"""

from __future__ import annotations

import time

import pytest
import ray

from colocate.generation.errors import GenerationWorkerError, WeightsIncompleteError
from colocate.generation.group import GenerationGroup
from colocate.models.tiny import build_tiny_model
from colocate.refit.driver import await_refit
from colocate.refit.ipc.jobdir import new_job_dir, new_token
from tests.generation.actors import CheckpointSender

pytestmark = pytest.mark.gpu
# The last spans four whole KV blocks (16 tokens each on GPU), which the prefix cache keeps.
PROMPTS = [[1, 5, 9, 33], [7, 7, 2], [100, 4, 250, 3, 9], [(7 * i) % 500 + 1 for i in range(70)]]
MAX_TOKENS = 16
TIMEOUT = 60.0
ENGINE = dict(num_workers=1, num_gpus_per_worker=0.5, dtype="bfloat16", kv_cache_memory_bytes=256 << 20,
              gpu_memory_utilization=0.3, max_model_len=256, enable_sleep_mode=True)


def greedy(group):
    return [r.response_ids for r in group.generate(PROMPTS, temperature=0.0, max_tokens=MAX_TOKENS)]


def cached_tokens(group):
    return [r.cached_tokens for r in group.generate(PROMPTS, temperature=0.0, max_tokens=1)]


@pytest.mark.parametrize(("engine", "level"), [("sync", 1), ("sync", 2), ("async", 1), ("async", 2)])
def test_sleep_wake_refit_on_gpu(ray_session, tmp_path, engine, level):
    a = str(build_tiny_model(tmp_path / "a", seed=0, dtype="bfloat16"))
    b = str(build_tiny_model(tmp_path / "b", seed=1, dtype="bfloat16"))
    reference = GenerationGroup(engine=engine, model=b, **ENGINE)
    want_b = greedy(reference)
    reference.shutdown()

    group = GenerationGroup(engine=engine, model=a, **ENGINE)
    assert greedy(group) != want_b
    assert cached_tokens(group)[-1] >= 64  # A's blocks of the long prompt are cached
    job, job_dir, token = f"test-generation-gpu-{engine}", new_job_dir(), new_token()
    [key] = [i["key"] for i in group.open_refit("zmq", job=job, token=token, timeout_s=TIMEOUT, job_dir=job_dir)]
    assert "/cuda:" in key
    # The policy rank's stand-in shares the GPU with the engine, as in colocated training.
    sender = CheckpointSender.options(num_gpus=0.5).remote(job=job, job_dir=job_dir, token=token, key=key,
                                                           timeout_s=TIMEOUT, buffer_bytes=1 << 20,
                                                           device="cuda")
    ray.get(sender.__ray_ready__.remote())

    seconds = {}

    def phase(name, fn):
        start = time.perf_counter()
        out = fn()
        seconds[name] = time.perf_counter() - start
        return out

    phase(f"sleep(level={level})", lambda: group.sleep(level=level))
    assert group.status()[0]["prefixes_cached"] is False  # so the refit will not reset it
    with pytest.raises(GenerationWorkerError, match="asleep"):
        group.generate(PROMPTS, max_tokens=4)
    phase("wake_up(weights)", lambda: group.wake_up(["weights"]))
    if level == 2:  # awake, but with no weights until the refit: refused, not garbage
        group.wake_up(["kv_cache"])
        with pytest.raises(WeightsIncompleteError, match="level=2"):
            group.generate(PROMPTS, max_tokens=4)
    phase("refit", lambda: await_refit({"sender": [sender.stream.remote(b)],
                                        "receiver": group.receive_refit_futures()}, timeout_s=2 * TIMEOUT))
    phase("wake_up(kv_cache)", lambda: group.wake_up(["kv_cache"]))
    rollouts = phase("generate", lambda: group.generate(PROMPTS, temperature=0.0, max_tokens=MAX_TOKENS))
    print(f"\n{engine}, level {level}: " + ", ".join(f"{name} {s * 1000:.1f} ms" for name, s in seconds.items()))
    assert [r.cached_tokens for r in rollouts] == [0] * len(PROMPTS)  # nothing of A's served
    assert [r.response_ids for r in rollouts] == want_b
    assert group.weight_versions() == [1]
    ray.get(sender.close.remote())
    group.shutdown()
