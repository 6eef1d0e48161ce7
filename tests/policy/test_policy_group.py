"""Two FSDP2 ranks as Ray actors over gloo, on a tiny Qwen2 with tied embeddings.

Shape legend: B = sequences, T = tokens per sequence.
"""

import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM

from colocate.models.tiny import build_tiny_model
from colocate.policy.group import PolicyError, PolicyGroup
from colocate.policy.weights import gather_groups
from colocate.policy.worker import PolicyWorker

# The functions sent to workers through `execute` live here, in a module the workers cannot import.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.slow  # every test here drives Ray actors (about 45 s in all on 2 CPUs)

B, T, PROMPT = 4, 12, 6


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_tied"), tie_word_embeddings=True, seed=2)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    # A private instance, never a Ray cluster already running on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _make_group(model_path: Path, num_workers: int = 2, **overrides: Any) -> PolicyGroup:
    kwargs: dict[str, Any] = {
        "model_path": str(model_path),
        "device": "cpu",
        "param_dtype": "float32",
        "lr": 1e-5,  # small enough that 4 steps stay mostly inside the clip range
        # A schedule that changes the LR every step, so a resume that lost the scheduler shows.
        "warmup_steps": 2,
        "total_steps": 50,
        "lr_decay": "linear",
        "micro_batch_size": 1,  # two micro-batches per rank: gradient accumulation is exercised
        "max_grad_norm": 1.0,
        "seed": 0,
        **overrides,
    }
    # Half a CPU each, so a second group fits beside the module's on a 2-CPU cluster.
    return PolicyGroup(
        num_workers=num_workers,
        num_cpus_per_worker=0.5,
        env_vars={"OMP_NUM_THREADS": "1"},
        call_timeout_s=60,
        **kwargs,
    )


@pytest.fixture(scope="module")
def group(ray_cluster: None, model_path: Path) -> Iterator[PolicyGroup]:
    g = _make_group(model_path)
    yield g
    g.shutdown()


def _batch(group: PolicyGroup) -> dict[str, torch.Tensor]:
    """Prompts of PROMPT tokens (row 1 left-padded), responses after them (row 2 right-padded)."""
    gen = torch.Generator().manual_seed(0)
    input_ids_BT = torch.randint(3, 512, (B, T), generator=gen)
    attention_mask_BT = torch.ones(B, T, dtype=torch.long)
    attention_mask_BT[1, :2] = 0
    attention_mask_BT[2, -3:] = 0
    input_ids_BT[attention_mask_BT == 0] = 2
    response_mask_BT = attention_mask_BT.clone()
    response_mask_BT[:, :PROMPT] = 0
    return {
        "input_ids": input_ids_BT,
        "attention_mask": attention_mask_BT,
        "response_mask": response_mask_BT,
        "old_logprobs": group.logprobs(input_ids_BT, attention_mask_BT),
        "advantages": torch.tensor([1.0, -1.0, 1.0, -1.0]),
    }


def _response_logprob_B(group: PolicyGroup, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logprobs_BT = group.logprobs(batch["input_ids"], batch["attention_mask"])
    return (logprobs_BT * batch["response_mask"]).sum(-1)


def test_training_raises_advantaged_responses_and_lowers_loss(group: PolicyGroup) -> None:
    batch = _batch(group)  # old_logprobs stay those of step 0: the surrogate is off-policy after it
    before_B = _response_logprob_B(group, batch)
    metrics = [group.train_step(batch) for _ in range(4)]
    after_B = _response_logprob_B(group, batch)

    losses = [m["loss"] for m in metrics]
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert metrics[0]["ratio_mean"] == pytest.approx(1.0)  # step 0 is on-policy
    assert metrics[0]["tokens"] == float(batch["response_mask"].sum())
    assert [m["step"] for m in metrics] == [1.0, 2.0, 3.0, 4.0]
    assert all(m["grad_norm"] > 0 and m["skipped"] == 0.0 for m in metrics)
    advantaged = batch["advantages"] > 0
    assert (after_B[advantaged] > before_B[advantaged]).all(), (before_B, after_B)
    assert (after_B[~advantaged] < before_B[~advantaged]).all(), (before_B, after_B)


def test_gradient_is_that_of_the_whole_batch(group: PolicyGroup, tmp_path: Path) -> None:
    """2 ranks x 2 micro-batches of 1 give the loss and gradient norm of 1 rank x 1 micro-batch of 4."""
    group.export_hf(str(tmp_path / "now"))  # the single rank starts from the group's current weights
    single = _make_group(tmp_path / "now", num_workers=1, micro_batch_size=B)
    try:
        batch = _batch(group)
        batch["advantages"] = torch.tensor([2.0, -1.0, 0.5, 0.0])
        # Both are measured before their optimizers step, so their differing AdamW moments do not matter.
        want, got = single.train_step(batch), group.train_step(batch)
    finally:
        single.shutdown()
    for key in ("grad_norm", "loss", "pg_loss", "tokens"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key


def _stream_and_gather(
    worker: PolicyWorker,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    streamed = {name: tensor.clone() for name, tensor in worker.iter_weights()}
    # In the FSDP compute dtype (fp32 here) the weights are gathered one FSDP module at a time (`unshard`):
    # the same bits, and one all-gather per decoder layer plus one for the root.
    by_module = {name: tensor.clone() for name, tensor in worker.iter_weights(torch.float32)}
    assert by_module.keys() == streamed.keys()
    for name, tensor in by_module.items():
        assert torch.equal(tensor, streamed[name]), name
    owners = {id(m) for m, _ in gather_groups(worker.model, list(streamed)).values()}
    assert len(owners) == worker.model.config.num_hidden_layers + 1
    # The reference path: DCP's full state dict, gathered independently of iter_weights.
    full = get_model_state_dict(
        worker.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return (streamed, full) if worker.rank == 0 else None


def _sources_and_weights(worker: PolicyWorker) -> tuple[int, int, list[str], bool]:
    from colocate.policy.weights import resident_weights
    from colocate.refit.sources import Fill

    # What a refit sender gets: fills that cast the local shard and all-gather it into the sender's buffer.
    sources = list(worker.refit_sources(torch.bfloat16))
    fills = sum(isinstance(s, Fill) for _, s in sources)
    gathered = [(n, s.materialize() if isinstance(s, Fill) else s.clone()) for n, s in sources]
    weights = [(n, t.clone()) for n, t in worker.iter_weights(torch.bfloat16)]
    unequal = [n for (n, a), (m, b) in zip(gathered, weights, strict=True)
               if n != m or a.dtype != b.dtype or not torch.equal(a, b)]
    return fills, len(sources), unequal, resident_weights(worker.model, torch.bfloat16) is None


def test_refit_fills_equal_the_gathered_weights(group: PolicyGroup) -> None:
    group.train_step(_batch(group))
    for fills, total, unequal, no_resident in group.execute(_sources_and_weights):
        assert unequal == []
        assert 0 < fills <= total  # the tiny model's dims are even: its projections gather as fills
        assert no_resident  # sharded over two ranks: nothing lives whole on one device


def _fill_in_rank_order(worker: PolicyWorker) -> list[str]:
    from colocate.refit.sources import Fill

    # Rank 0 consumes as a sender does: pulls a bucket's worth of sources, then fills them; rank 1 as a rank
    # that sends nothing: each fill as it comes. Every collective must still run in the same order on both.
    sources = worker.refit_sources(torch.bfloat16)
    got: list[tuple[str, torch.Tensor]] = []
    while True:
        bucket = list(itertools.islice(sources, 3 if worker.rank == 0 else 1))
        if not bucket:
            break
        got += [(n, s.materialize() if isinstance(s, Fill) else s) for n, s in bucket]
    want = list(worker.iter_weights(torch.bfloat16))
    return [n for (n, a), (m, b) in zip(got, want, strict=True) if n != m or not torch.equal(a, b)]


def test_refit_fills_keep_collectives_in_order_across_ranks(ray_cluster: None, tmp_path: Path) -> None:
    """Odd sizes shard unevenly: the embedding and every layer's gate/up are gathered whole, between runs
    of even weights gathered a module at a time; ranks pulling the sources in different patterns agree."""
    path = build_tiny_model(tmp_path / "odd", vocab_size=509, intermediate_size=255, seed=4)
    g = _make_group(path)
    try:
        assert g.execute(_fill_in_rank_order) == [[], []]
    finally:
        g.shutdown()


def test_iter_weights_equal_full_state_dict_after_a_step(group: PolicyGroup, tmp_path: Path) -> None:
    batch = _batch(group)
    group.train_step(batch)
    group.logprobs(batch["input_ids"], batch["attention_mask"])  # leaves the root FSDP unit unsharded
    streamed, full = group.execute(_stream_and_gather)[0]

    # Tied: lm_head.weight is the embedding, streamed once under the embedding's name.
    assert "lm_head.weight" in full and "lm_head.weight" not in streamed
    assert torch.equal(full["lm_head.weight"], full["model.embed_tokens.weight"])
    assert list(streamed) == [name for name in full if name != "lm_head.weight"]
    for name, tensor in streamed.items():
        assert tensor.dtype == full[name].dtype == torch.float32, name
        assert tensor.shape == full[name].shape, name
        assert torch.equal(tensor, full[name]), name

    manifest = group.weights_manifest()
    assert manifest == [(n, tuple(t.shape), t.dtype) for n, t in streamed.items()]

    group.export_hf(str(tmp_path / "hf"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert exported.config.tie_word_embeddings
    exported_sd = exported.state_dict()
    for name, tensor in streamed.items():
        assert torch.equal(exported_sd[name], tensor), name


def _draws(worker: PolicyWorker, rank_offset: bool = False) -> list[float]:
    """Draws from the rank's torch, numpy and python generators (`rank_offset`: rank r first draws r more,
    so that the ranks' states differ)."""
    import random

    import numpy as np

    for _ in range(worker.rank if rank_offset else 0):
        torch.rand(1), np.random.rand(), random.random()
    return [torch.rand(1).item(), float(np.random.rand()), random.random()]


def test_resume_reproduces_the_next_step(group: PolicyGroup, model_path: Path, tmp_path: Path) -> None:
    batch = _batch(group)
    group.train_step(batch)
    group.execute(_draws, True)  # each rank's generators moved on from their seed, each its own way
    group.save_checkpoint(str(tmp_path / "ckpt"))
    step = group.run_all("execute", lambda w: w.step)[0]
    want_draws = group.execute(_draws)
    # Two steps: the first one's metrics see only the weights; the second's also see the AdamW moments and
    # the LR schedule through the update the first made.
    want = [group.train_step(batch) for _ in range(2)]

    resumed = _make_group(model_path)
    try:
        assert resumed.load_checkpoint(str(tmp_path / "ckpt")) == step
        got_draws = resumed.execute(_draws)
        got = [resumed.train_step(batch) for _ in range(2)]
    finally:
        resumed.shutdown()
    assert got == want  # every metric, bit for bit
    assert got_draws == want_draws and want_draws[0] != want_draws[1]  # each rank's own RNG states, restored


def _fail_on_rank_1(worker: PolicyWorker) -> int:
    if worker.rank == 1:
        raise ValueError("boom on purpose")
    return worker.rank


def test_a_failing_rank_raises_policy_error_with_its_traceback(group: PolicyGroup) -> None:
    with pytest.raises(PolicyError) as info:
        group.execute(_fail_on_rank_1)
    assert info.value.rank == 1
    assert info.value.method == "execute"
    assert "boom on purpose" in info.value.traceback
    assert "_fail_on_rank_1" in info.value.traceback  # the remote frame, not just the message


def test_a_failing_constructor_raises_policy_error(ray_cluster: None, tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        _make_group(tmp_path / "no_such_model")
    assert info.value.method == "__init__"
    assert "no_such_model" in info.value.traceback


def test_placement_group_bundles(ray_cluster: None, model_path: Path) -> None:
    pg = placement_group([{"CPU": 0.5}, {"CPU": 0.5}])
    ray.get(pg.ready())
    try:
        # Reversed bundles: rank 0 in bundle 1, where the rendezvous port is looked for too.
        placed = _make_group(model_path, placement_group=pg, bundle_indices=[1, 0])
        try:
            input_ids_BT = torch.randint(3, 512, (2, 5))
            assert placed.logprobs(input_ids_BT, torch.ones_like(input_ids_BT)).shape == (2, 5)
        finally:
            placed.shutdown()
    finally:
        remove_placement_group(pg)


def test_batches_must_split_evenly(group: PolicyGroup) -> None:
    with pytest.raises(ValueError, match="split evenly"):
        group.logprobs(torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long))
