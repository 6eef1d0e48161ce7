"""A group of two synchronous vLLM CPU engines in Ray actors: sampling against HF transformers, refits through
the rendezvous paired with a sender's futures, and every named error. One group serves the whole module.

Shape legend: R = response tokens.
"""

from __future__ import annotations

import os
import signal

import pytest
import ray
import torch
from transformers import AutoTokenizer

from colocate.generation.errors import (
    GenerationWorkerDiedError,
    GenerationWorkerError,
    PromptTooLongError,
    SamplingOptionError,
    WeightsIncompleteError,
)
from colocate.generation.group import GenerationGroup
from colocate.refit.driver import await_refit
from colocate.refit.errors import RefitError
from colocate.refit.ipc.jobdir import new_job_dir, new_token
from tests import hf_reference as hf
from tests.generation.actors import CheckpointBroadcaster, CheckpointSender

pytestmark = pytest.mark.slow
PROMPTS = ["Q: 12+7= A:", "Q: 93-40= A:", "The answer is", "what is the sum"]
MAX_TOKENS = 16
MAX_MODEL_LEN = 256
TIMEOUT = 30.0
# vLLM's CPU kernels and HF's eager float32 forward differ by rounding only (measured: < 2e-5).
LOGPROB_ATOL = 1e-3


@pytest.fixture(scope="module")
def group(ray_session, models):
    g = GenerationGroup(num_workers=2, num_cpus_per_worker=1, model=models[0], dtype="float32",
                        max_model_len=MAX_MODEL_LEN, seed=0)
    yield g
    g.shutdown()


@pytest.fixture(scope="module")
def prompt_ids(models) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(models[0])
    return [tok(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def refit_pair(group):
    """The group's receivers, registered with the rendezvous, and one sender per engine (one per "device")."""
    job, job_dir, token = "test-generation-group", new_job_dir(), new_token()
    keys = [i["key"] for i in group.open_refit("zmq", job=job, token=token, timeout_s=TIMEOUT, job_dir=job_dir)]
    assert len(keys) == 2 and keys[0].endswith("/cpu:0") and keys[1].endswith("/cpu:1")
    senders = [CheckpointSender.remote(job=job, job_dir=job_dir, token=token, key=k, timeout_s=TIMEOUT)
               for k in keys]
    # Started before any refit: the receivers' timeout counts from the refit, not from a sender's start-up.
    ray.get([s.__ray_ready__.remote() for s in senders])
    yield senders
    ray.get([s.close.remote() for s in senders])


def refit(group, senders, checkpoint, corrupt=None):
    return await_refit({"sender": [s.stream.remote(checkpoint, corrupt) for s in senders],
                        "receiver": group.receive_refit_futures()}, timeout_s=4 * TIMEOUT)


def greedy(group):
    rollouts = group.generate(PROMPTS, temperature=0.0, max_tokens=MAX_TOKENS)
    return [r.response_ids for r in rollouts]


def test_samples_in_order_with_hf_logprobs(group, models, prompt_ids):
    rollouts = group.generate(PROMPTS, n=2, temperature=1.0, max_tokens=MAX_TOKENS, seed=0)
    assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(i, s) for i in range(4) for s in range(2)]
    assert [r.prompt_ids for r in rollouts] == [ids for ids in prompt_ids for _ in range(2)]
    assert all(r.weight_version == 0 for r in rollouts)
    assert rollouts[0].response_ids != rollouts[1].response_ids  # two samples, not one twice
    worst = 0.0
    for r in rollouts:
        assert len(r.logprobs) == len(r.response_ids) > 0
        want_R = hf.token_logprobs(models[0], r.prompt_ids, r.response_ids)
        worst = max(worst, (torch.tensor(r.logprobs) - want_R).abs().max().item())
    print(f"max |logprob vLLM - HF| = {worst:.2e}")
    assert worst < LOGPROB_ATOL

    again = group.generate(PROMPTS, n=2, temperature=1.0, max_tokens=MAX_TOKENS, seed=0)
    assert [r.response_ids for r in again] == [r.response_ids for r in rollouts]  # seeded: reproducible


def test_greedy_matches_hf_generate(group, models, prompt_ids):
    want = hf.greedy(models[0], prompt_ids, MAX_TOKENS)
    assert greedy(group) == want


def test_chat_prompts_use_the_chat_template(group, models):
    tok = AutoTokenizer.from_pretrained(models[0])
    messages = [[{"role": "system", "content": "add"}, {"role": "user", "content": "Q: 1+2="}], "Q: 5+5="]
    group.chat = True
    try:
        rollouts = group.generate(messages, temperature=0.0, max_tokens=4)
    finally:
        group.chat = False
    want = [tok.apply_chat_template(messages[0], add_generation_prompt=True, tokenize=False),
            "user: Q: 5+5=\nassistant:"]
    assert [r.prompt_ids for r in rollouts] == [tok(t, add_special_tokens=False)["input_ids"] for t in want]


def test_refit_switches_weights_and_version(group, refit_pair, models, prompt_ids):
    want = {seed: hf.greedy(path, prompt_ids, MAX_TOKENS) for seed, path in models.items()}
    assert want[0] != want[1]
    out = refit(group, refit_pair, models[1])
    assert all(s["buckets"] > 1 for s in out["sender"])
    assert [r["buckets"] for r in out["receiver"]] == [s["buckets"] for s in out["sender"]]
    assert group.weight_versions() == [1, 1]
    rollouts = group.generate(PROMPTS, temperature=0.0, max_tokens=MAX_TOKENS)
    assert [r.response_ids for r in rollouts] == want[1]
    assert all(r.weight_version == 1 for r in rollouts)

    refit(group, refit_pair, models[0])  # back, for the tests after this one
    assert group.weight_versions() == [2, 2]
    assert greedy(group) == want[0]


def test_failed_refit_blocks_generation_until_the_next_one(group, refit_pair, models, prompt_ids):
    with pytest.raises(RefitError, match="refit failed on the sender side"):
        refit(group, refit_pair, models[1], corrupt="model.layers.1.mlp.up_proj.weight")
    assert group.weight_versions() == [2, 2]
    with pytest.raises(WeightsIncompleteError, match="refit again"):
        group.generate(PROMPTS, max_tokens=4)
    refit(group, refit_pair, models[0])
    assert group.weight_versions() == [3, 3]
    assert greedy(group) == hf.greedy(models[0], prompt_ids, MAX_TOKENS)


def test_a_refit_drops_cached_prefixes_and_after_sleep_needs_no_reset(group, refit_pair, models):
    """Prefix caching is on, so a refit must drop the KV blocks the old weights computed: the next request
    finds none cached and decodes as HF does on the new weights. sleep() forgets the cache (on CPU as on GPU),
    so the refit after it skips the reset (it walks every block: milliseconds on a GPU's cache)."""
    long_ids = hf.long_prompt_ids(models[0])
    want = {seed: hf.greedy(path, [long_ids], MAX_TOKENS)[0] for seed, path in models.items()}
    assert want[0] != want[1]

    def decode():  # on each engine: its tokens, and how many prompt tokens came from its prefix cache
        per_engine = group.generate_each([long_ids], temperature=0.0, max_tokens=MAX_TOKENS)
        return [r.response_ids for [r] in per_engine], [r.cached_tokens for [r] in per_engine]

    decode()
    tokens, cached = decode()
    assert tokens == [want[0]] * 2 and min(cached) >= hf.CPU_KV_BLOCK  # the cache serves the prompt's first block
    refit(group, refit_pair, models[1])  # a cache that holds blocks: the refit resets it
    tokens, cached = decode()
    assert tokens == [want[1]] * 2 and cached == [0, 0]
    decode()
    group.sleep(level=1)
    assert [s["prefixes_cached"] for s in group.status()] == [False, False]
    group.wake_up()
    refit(group, refit_pair, models[0])  # nothing cached: no reset
    tokens, cached = decode()
    assert tokens == [want[0]] * 2 and cached == [0, 0]
    assert [s["prefixes_cached"] for s in group.status()] == [True, True]


def test_broadcast_refit(group, models, prompt_ids):
    """Split placement's transport into the same engines: one sender broadcasts to both."""
    job = "test-generation-group-bcast"
    token = new_token()
    infos = group.open_refit("broadcast", job=job, token=token, timeout_s=TIMEOUT, connect_timeout_s=TIMEOUT)
    assert [i["rank"] for i in infos] == [1, 2]
    sender = CheckpointBroadcaster.remote(job=job, token=token, world_size=3, timeout_s=TIMEOUT)
    before = group.weight_versions()
    for seed in (1, 0):  # there and back, in the same group
        out = await_refit({"sender": [sender.stream.remote(models[seed])],
                           "receiver": group.receive_refit_futures()}, timeout_s=4 * TIMEOUT)
        assert [r["buckets"] for r in out["receiver"]] == [out["sender"][0]["buckets"]] * 2
        assert greedy(group) == hf.greedy(models[seed], prompt_ids, MAX_TOKENS)
    assert group.weight_versions() == [v + 2 for v in before]
    group.close_refit()
    ray.get(sender.close.remote())


def test_prompt_too_long(group):
    with pytest.raises(PromptTooLongError, match=r"prompt 2 has 256 tokens: max_model_len=256") as info:
        group.generate(["short", "short", [7] * MAX_MODEL_LEN], max_tokens=4)
    assert info.value.worker_index == 1  # shards [0, 2) and [2, 3)
    assert 'worker.py", line' in str(info.value)  # the remote traceback


def test_unknown_sampling_option(group):
    with pytest.raises(SamplingOptionError, match="temprature"):
        group.generate(PROMPTS, temprature=0.5)


def test_sleep_and_wake_up_are_no_ops_on_cpu(group, models, prompt_ids):
    group.sleep(level=1)
    group.wake_up(["weights"])
    group.wake_up(["kv_cache"])
    group.sleep(level=2)  # no-op on CPU: the weights stay, so generating needs no refit first
    group.wake_up()
    assert greedy(group) == hf.greedy(models[0], prompt_ids, MAX_TOKENS)
    with pytest.raises(GenerationWorkerError, match="sleep level must be 1 or 2"):
        group.sleep(level=3)


def test_killed_worker_is_named(group):
    # Last in the module: the group is unusable afterwards. SIGKILL, as a crash or the OOM killer would:
    # `ray.kill` takes effect asynchronously, and a call made right after it may still be served.
    pid = ray.get(group.workers[1].__ray_call__.remote(lambda worker: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(GenerationWorkerDiedError, match="worker 1 died during generate") as info:
        group.generate(PROMPTS, max_tokens=4)
    assert info.value.worker_index == 1
