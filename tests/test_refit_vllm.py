"""End to end on CPU: a policy-side sender and a real vLLM engine in two Ray actors, refit through the
rendezvous actor with paired futures; the engine then decodes exactly as HF transformers on the new weights."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray

from colocate.refit.checksum import fingerprint
from colocate.refit.driver import ABORT_GRACE_S, await_refit
from colocate.refit.errors import (
    RefitAbortedError,
    RefitError,
    RefitManifestError,
    RefitPeerDiedError,
    RefitTimeoutError,
)
from colocate.refit.ipc.jobdir import new_job_dir, new_token
from colocate.rendezvous import get_rendezvous
from tests import hf_reference
from tests.refit_actors import EngineActor, SenderActor, expected_params, fingerprint_all

pytestmark = pytest.mark.slow
PROMPTS = ["Q: 12+7= A:", "Q: 93-40= A:", "The answer is"]
MAX_TOKENS = 12
TIMEOUT = 20.0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return hf_reference.two_models(tmp_path_factory.mktemp("refit-vllm"))


@pytest.fixture(scope="module")
def hf(models):
    return hf_reference.greedy_of_each(models, PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def pair(models):
    # A private instance, never a Ray cluster already running on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    job, job_dir, token = "test-refit-vllm", new_job_dir(), new_token()
    rendezvous = get_rendezvous(job)  # held by the driver for the module: the actors come and go
    engine = EngineActor.remote(models[0], job, job_dir, token, TIMEOUT)
    # Registered before the sender looks it up: a cold engine start (empty compile caches) can pass TIMEOUT.
    ray.get(engine.pid.remote())
    sender = SenderActor.remote(job, job_dir, token, TIMEOUT, 64 << 10)
    yield engine, sender
    del rendezvous
    ray.get(sender.close.remote())
    ray.shutdown()


def refit(engine, sender, checkpoint, corrupt=None, drop=None):
    return await_refit({"sender": [sender.stream.remote(checkpoint, corrupt, drop)],
                        "receiver": [engine.receive.remote()]}, timeout_s=4 * TIMEOUT)


def test_refit_into_vllm_matches_hf(pair, models, hf):
    engine, sender = pair
    prompt_ids, want = hf
    assert ray.get(engine.greedy.remote(prompt_ids, MAX_TOKENS)) == want[0]

    out = refit(engine, sender, models[1])
    assert out["sender"][0]["buckets"] > 1 and out["receiver"][0]["buckets"] == out["sender"][0]["buckets"]
    received, params = ray.get(engine.fingerprints.remote())
    assert received == fingerprint_all(models[1])  # what reached the engine, bit for bit
    readable = expected_params(models[1])
    assert readable and all(params[n] == fingerprint(t) for n, t in readable.items())
    assert ray.get(engine.greedy.remote(prompt_ids, MAX_TOKENS)) == want[1]

    refit(engine, sender, models[0])  # and back: a second refit on the same pair
    assert ray.get(engine.greedy.remote(prompt_ids, MAX_TOKENS)) == want[0]


def test_failed_refit_raises_one_error_and_loses_nothing(pair, models, hf):
    engine, sender = pair
    prompt_ids, want = hf
    with pytest.raises(RefitError, match="refit failed on the sender side") as info:
        refit(engine, sender, models[1], corrupt="model.layers.1.mlp.up_proj.weight")
    msg = str(info.value)
    assert "up_proj" in msg and "shape" in msg and "sender.py\", line" in msg  # the remote traceback
    assert "(and then on the receiver: " in msg  # the engine's update task failed too (and said what), not hung
    refit(engine, sender, models[1])  # the pair still works
    assert ray.get(engine.greedy.remote(prompt_ids, MAX_TOKENS)) == want[1]


@pytest.mark.parametrize("bad, where", [
    ({"drop": "model.layers.1.self_attn.k_proj.weight"}, "model.layers.1.self_attn.qkv_proj.weight"),
    ({"reshape": "model.layers.0.mlp.down_proj.weight"}, "model.layers.0.mlp.down_proj.weight"),
], ids=["withheld", "misshaped"])
def test_the_engine_refuses_an_inexact_manifest_before_any_bucket(pair, models, hf, bad, where):
    """The production check (no `expected` list): the engine dry-runs its own loader over the manifest."""
    engine, sender = pair
    prompt_ids, want = hf
    refit(engine, sender, models[0])
    futures = {"sender": [sender.stream.remote(models[1], **bad)], "receiver": [engine.receive.remote()]}
    with pytest.raises(RefitError, match="cannot take this refit exactly"):  # one error for the refit
        await_refit(futures, timeout_s=4 * TIMEOUT)
    for ref in futures["sender"] + futures["receiver"]:  # both sides raise it, naming the parameter
        with pytest.raises(RefitManifestError, match=where.replace(".", r"\.")):
            ray.get(ref)
    received, _ = ray.get(engine.fingerprints.remote())
    assert received == {}  # no bucket was loaded
    assert ray.get(engine.greedy.remote(prompt_ids, MAX_TOKENS)) == want[0]
    refit(engine, sender, models[1])  # the pair still works
    assert ray.get(engine.greedy.remote(prompt_ids, MAX_TOKENS)) == want[1]
    assert ray.get(engine.unloaded_params.remote()) == []


def test_a_killed_engine_is_reported_at_once_and_the_sender_aborted(pair, models):
    """kill -9 of the engine mid-refit, with a 60 s refit timeout: the driver raises RefitPeerDiedError as soon
    as Ray knows the process died (within 5 s), and aborts the sender, which was waiting for an ack."""
    job, job_dir, token = "test-refit-kill", new_job_dir(), new_token()
    rendezvous = get_rendezvous(job)  # held: the actors look each other up through it
    engine = EngineActor.remote(models[0], job, job_dir, token, 60.0)
    sender = SenderActor.remote(job, job_dir, token, 60.0, 64 << 10)
    pid = ray.get(engine.pid.remote())
    futures = {"sender": [sender.stream.remote(models[1], delay_s=0.2, refit=1)],
               "receiver": [engine.receive.remote(refit=1)]}
    time.sleep(1.0)  # mid-stream: 27 tensors at 0.2 s each
    os.kill(pid, signal.SIGKILL)
    t = time.perf_counter()
    with pytest.raises(RefitPeerDiedError, match="refit failed on the receiver side") as info:
        await_refit(futures, timeout_s=180.0, abort=lambda: rendezvous.abort.remote(1))
    assert time.perf_counter() - t < 5.0  # the bound; the sender's own timeout is 60 s
    assert info.value.side == "receiver"
    # The survivor was aborted, not left waiting out its 60 s: its task has ended with the named echo.
    with pytest.raises(ray.exceptions.RayTaskError) as sent:
        ray.get(futures["sender"][0], timeout=5.0)
    assert isinstance(sent.value.cause, RefitAbortedError) and sent.value.cause.echo
    ray.get(sender.pid.remote(), timeout=5.0)  # and the sender's actor is free for the next call
    ray.kill(sender)


def test_a_killed_policy_is_reported_at_once_and_the_engine_aborted_then_refits_exactly(pair, models, hf):
    """kill -9 of the sending (policy) process mid-refit: RefitPeerDiedError on the sender side within 5 s,
    the engine's update task aborted (not left waiting for its 60 s timeout), and the engine then takes a
    refit from a new sender bit for bit."""
    prompt_ids, want = hf
    job, job_dir, token = "test-refit-kill-sender", new_job_dir(), new_token()
    rendezvous = get_rendezvous(job)
    engine = EngineActor.remote(models[0], job, job_dir, token, 60.0)
    sender = SenderActor.remote(job, job_dir, token, 60.0, 64 << 10)
    pid = ray.get(sender.pid.remote())
    futures = {"sender": [sender.stream.remote(models[1], delay_s=0.2, refit=1)],
               "receiver": [engine.receive.remote(refit=1)]}
    time.sleep(1.0)
    os.kill(pid, signal.SIGKILL)
    t = time.perf_counter()
    with pytest.raises(RefitPeerDiedError, match="refit failed on the sender side"):
        await_refit(futures, timeout_s=180.0, abort=lambda: rendezvous.abort.remote(1))
    assert time.perf_counter() - t < 5.0
    with pytest.raises(ray.exceptions.RayTaskError) as got:
        ray.get(futures["receiver"][0], timeout=5.0)
    assert isinstance(got.value.cause, RefitAbortedError)
    fresh = SenderActor.remote(job, job_dir, token, 60.0, 64 << 10)
    await_refit({"sender": [fresh.stream.remote(models[1], refit=2)], "receiver": [engine.receive.remote(refit=2)]},
                timeout_s=120.0)
    received, _ = ray.get(engine.fingerprints.remote())
    assert received == fingerprint_all(models[1])
    assert ray.get(engine.greedy.remote(prompt_ids, MAX_TOKENS)) == want[1]
    ray.get(fresh.close.remote())
    ray.kill(engine)


def test_a_stalled_engine_is_reported_within_the_timeout_and_a_few_seconds(pair, models):
    """SIGSTOP of the engine mid-refit: the sender gives up after its `timeout_s` (no ack), and the driver
    raises then, not after its own, longer bound."""
    timeout_s = 5.0
    job, job_dir, token = "test-refit-stall", new_job_dir(), new_token()
    rendezvous = get_rendezvous(job)  # noqa: F841  (held: the actors look each other up through it)
    engine = EngineActor.remote(models[0], job, job_dir, token, timeout_s)
    pid = ray.get(engine.pid.remote())  # registered: the sender's lookup is bounded by `timeout_s` too
    sender = SenderActor.remote(job, job_dir, token, timeout_s, 64 << 10)
    # Up before the clock starts: a fresh actor's start (importing torch on a busy 2-core CI machine) took
    # seconds once, and a stream that begins after the stop is not the case under test.
    ray.get(sender.pid.remote())
    futures = {"sender": [sender.stream.remote(models[1], delay_s=0.1)], "receiver": [engine.receive.remote()]}
    time.sleep(1.0)
    os.kill(pid, signal.SIGSTOP)
    t = time.perf_counter()
    try:
        with pytest.raises(RefitTimeoutError, match="refit failed on the sender side"):
            await_refit(futures, timeout_s=20 * timeout_s)
        assert time.perf_counter() - t < timeout_s + ABORT_GRACE_S + 4.0  # the bound, with slack for Ray
    finally:
        os.kill(pid, signal.SIGCONT)
    ray.kill(engine)
    ray.kill(sender)
