"""The async engine keeps serving while a refit arrives: requests admitted before the refit finish on the old
weights, requests sent during it wait and run on the new ones, and no response mixes the two.

A response's tokens are checked against HF greedy decoding under the version it claims: the two tiny models
(seeds 0 and 1) decode differently, so a response that switched weights midway would match neither.
"""

from __future__ import annotations

import time

import pytest
import ray
from transformers import AutoTokenizer

from colocate.generation.group import GenerationGroup
from colocate.refit.driver import await_refit
from colocate.refit.ipc.jobdir import new_job_dir, new_token
from tests import hf_reference as hf
from tests.generation.actors import CheckpointBroadcaster, CheckpointSender

pytestmark = pytest.mark.slow
# Long enough that the first batch is still decoding when the refit arrives (~1 s on one CPU core).
MAX_TOKENS = 128
FIRST = ["Q: 12+7= A:", "The answer is", "Q: 3+4= A:", "what is the sum"]
SECOND = ["Q: 93-40= A:", "check the result", "Q: 50+1= A:", "the final answer"]
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def group(ray_session, models):
    g = GenerationGroup(num_workers=1, num_cpus_per_worker=1, engine="async", model=models[0],
                        dtype="float32", max_model_len=512, seed=0)
    yield g
    g.shutdown()


def wait_for(group, what, predicate, timeout_s=TIMEOUT):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = group.status()[0]
        if predicate(status):
            return status
        time.sleep(0.005)
    raise AssertionError(f"worker never became {what}: {group.status()}")


def test_refit_during_generation_never_mixes_versions(group, models):
    tok = AutoTokenizer.from_pretrained(models[0])
    want_first = {seed: hf.greedy(models[seed], [tok(p)["input_ids"] for p in FIRST], MAX_TOKENS)
                  for seed in (0, 1)}
    want_second = hf.greedy(models[1], [tok(p)["input_ids"] for p in SECOND], MAX_TOKENS)
    assert want_first[0] != want_first[1]

    job, job_dir, token = "test-generation-async", new_job_dir(), new_token()
    [key] = [i["key"] for i in group.open_refit("zmq", job=job, token=token, timeout_s=TIMEOUT, job_dir=job_dir)]
    sender = CheckpointSender.remote(job=job, job_dir=job_dir, token=token, key=key, timeout_s=TIMEOUT)
    ray.get(sender.__ray_ready__.remote())

    start = time.monotonic()
    first = group.generate_futures(FIRST, temperature=0.0, max_tokens=MAX_TOKENS)
    wait_for(group, "busy", lambda s: s["in_flight"] == len(FIRST))
    refit = {"sender": [sender.stream.remote(models[1])], "receiver": group.receive_refit_futures()}
    draining = wait_for(group, "draining", lambda s: s["updating"])
    second = group.generate_futures(SECOND, temperature=0.0, max_tokens=MAX_TOKENS)
    await_refit(refit, timeout_s=2 * TIMEOUT)
    first_rollouts, second_rollouts = group.collect(first), group.collect(second)
    print(f"refit began with {draining['in_flight']} requests in flight; both batches done after "
          f"{time.monotonic() - start:.2f} s")

    # The refit waited for the first batch: it was still decoding when the refit closed the gate.
    assert draining["in_flight"] > 0, "the first batch finished before the refit: make it longer"
    assert [r.weight_version for r in first_rollouts] == [0] * len(FIRST)
    assert [r.response_ids for r in first_rollouts] == want_first[0]
    assert all(r.finish_reason in ("length", "stop") for r in first_rollouts)  # completed, not aborted
    assert [r.weight_version for r in second_rollouts] == [1] * len(SECOND)
    assert [r.response_ids for r in second_rollouts] == want_second
    assert group.weight_versions() == [1]
    ray.get(sender.close.remote())


def test_broadcast_refit_into_the_async_engine(group, models):
    """The async engine's workers live in a child process without Ray: the actor looks the sender up."""
    tok = AutoTokenizer.from_pretrained(models[0])
    prompt_ids = [tok(p)["input_ids"] for p in FIRST]
    job = "test-generation-async-bcast"
    token = new_token()
    [info] = group.open_refit("broadcast", job=job, token=token, timeout_s=TIMEOUT, connect_timeout_s=TIMEOUT)
    assert info["rank"] == 1
    sender = CheckpointBroadcaster.remote(job=job, token=token, world_size=2, timeout_s=TIMEOUT)
    before = group.weight_versions()[0]
    await_refit({"sender": [sender.stream.remote(models[0])], "receiver": group.receive_refit_futures()},
                timeout_s=2 * TIMEOUT)
    assert group.weight_versions() == [before + 1]
    rollouts = group.generate(FIRST, temperature=0.0, max_tokens=16)
    assert [r.response_ids for r in rollouts] == hf.greedy(models[0], prompt_ids, 16)
    group.close_refit()
    ray.get(sender.close.remote())


def test_the_async_engine_drops_cached_prefixes_at_a_refit(group, models):
    """As in test_group, through AsyncLLM's engine core: a refit after requests resets the prefix cache (the
    next request finds no block cached and decodes as HF on the new weights); after sleep() it need not."""
    long_ids = hf.long_prompt_ids(models[0])
    want = {seed: hf.greedy(path, [long_ids], 16)[0] for seed, path in models.items()}
    job, job_dir, token = "test-generation-async-prefix", new_job_dir(), new_token()
    [key] = [i["key"] for i in group.open_refit("zmq", job=job, token=token, timeout_s=TIMEOUT, job_dir=job_dir)]
    sender = CheckpointSender.remote(job=job, job_dir=job_dir, token=token, key=key, timeout_s=TIMEOUT)
    ray.get(sender.__ray_ready__.remote())

    def refit_to(seed):
        await_refit({"sender": [sender.stream.remote(models[seed])], "receiver": group.receive_refit_futures()},
                    timeout_s=2 * TIMEOUT)

    def decode():
        [r] = group.generate([long_ids], temperature=0.0, max_tokens=16)
        return r.response_ids, r.cached_tokens

    refit_to(0)
    decode()
    tokens, cached = decode()
    assert tokens == want[0] and cached >= hf.CPU_KV_BLOCK
    refit_to(1)
    assert decode() == (want[1], 0)
    group.sleep(level=1)
    assert group.status()[0]["prefixes_cached"] is False
    group.wake_up()
    refit_to(0)
    assert decode() == (want[0], 0)
    group.close_refit()
    ray.get(sender.close.remote())
