"""Build what a run needs from its config: the Ray connection, the placement group, the policy and generation
groups, and the refit between them. Configs become flat keyword arguments here, at the edge.

Placement:
- colocated: one bundle per device; policy rank i and generation worker i share bundle i (on GPU each takes
  half a GPU of it, so both land on the same device). Refit: ZMQ + CUDA IPC / shared memory, per device.
- split: policy bundles, then generation bundles, on different devices. Refit: bucketed broadcast.
With tensor-parallel engines each engine takes tp bundles (`placement.py` has the layout). The placement
group's strategy is `placement.strategy`: PACK, SPREAD or STRICT_SPREAD over the cluster's nodes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from colocate.config import Config, ConfigError, check
from colocate.placement import check_engine_nodes, engine_visible_devices, plan_bundles
from colocate.refit.driver import run_refit
from colocate.refit.ipc.jobdir import new_job_dir, new_token
from colocate.rendezvous import get_rendezvous

log = logging.getLogger(__name__)


def bundle_gpu_ids(pg: Any, n: int) -> list[str]:
    """The physical GPU of each of the placement group's `n` bundles: Ray gives a task in a bundle that
    bundle's GPU, so a tiny probe in each reports it (before any actor claims the rest)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    probe = ray.remote(num_cpus=0, num_gpus=0.01)(_gpu_id)
    return ray.get([probe.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=b)).remote() for b in range(n)], timeout=60)


def _gpu_id() -> str:
    [gpu] = ray.get_gpu_ids()
    return str(gpu)


def actor_env() -> dict[str, str]:
    """The environment every actor of a run gets.

    NCCL_CUMEM_ENABLE: NCCL reads it once per process, at its first communicator. The policy's FSDP group
    comes first in its process and vLLM pins it to 0 in the engine's; a broadcast refit between ranks that
    disagree cannot open each other's buffers (`refit/nccl/group.py`), so every actor starts with the
    value the broadcast group uses.
    VLLM_LOGGING_LEVEL: vLLM's INFO lines (a page per engine start) would bury the actors' progress lines
    (`logs.py`).
    """
    from colocate.refit.nccl.group import CUMEM_DEFAULT

    return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false",
            "NCCL_CUMEM_ENABLE": os.environ.get("NCCL_CUMEM_ENABLE", CUMEM_DEFAULT),
            "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}


def connect(address: str, num_cpus: int | None, *, log_to_driver: bool = True) -> None:
    """Join the running cluster (a `ray job submit` sets RAY_ADDRESS) or start a local one. With
    `log_to_driver` the actors' output is printed here: their progress at start-up, vLLM's warnings."""
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": actor_env(), "worker_process_setup_hook": "colocate.logs.setup_actor_logging"}
    if address == "local":
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=log_to_driver)
        return
    if address == "auto" and not os.environ.get("RAY_ADDRESS"):
        try:
            ray.init(address="auto", runtime_env=runtime_env, log_to_driver=log_to_driver)
            log.info("joined the running Ray cluster")
            return
        except ConnectionError:
            pass
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=log_to_driver)
        log.info("started a local Ray cluster")
    else:
        ray.init(address=None if address == "auto" else address, runtime_env=runtime_env,
                 log_to_driver=log_to_driver)


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def alive_node_resources() -> list[dict[str, float]]:
    """Each live node's resources (for the error when a placement group cannot be placed)."""
    return [{k: n["Resources"].get(k, 0.0) for k in ("CPU", "GPU")}
            for n in ray.nodes() if n.get("Alive")]


def bundle_nodes(pg: Any) -> dict[int, str]:
    """Bundle index -> the id of the node it was placed on (the placement group is ready)."""
    return {int(b): node for b, node in ray.util.placement_group_table(pg)["bundles_to_node_id"].items()}


@dataclass
class Cluster:
    cfg: Config
    transport: str
    model_path: str
    policy: Any
    generation: Any
    pg: Any
    job: str
    job_dir: str
    token: str
    rendezvous: Any = None
    refits: int = 0

    def refit(self) -> dict[str, float]:
        """Policy -> every engine (`refit/driver.py`); the time it took and its parts, in ms."""
        self.refits += 1
        return run_refit(self.policy.workers, self.generation, rendezvous=self.rendezvous, refit=self.refits,
                         timeout_s=self.cfg.refit.timeout_s)

    def open_policy_refit(self, receivers: int) -> None:
        """Every policy rank's half of the refit channel, after the engines' `receivers` TP ranks opened
        theirs (over zmq each rank looks its engine's receiver up); `cfg.refit` as it is now."""
        r, p = self.cfg.refit, self.cfg.placement
        tp = self.cfg.generation.tensor_parallel_size
        # zmq: policy rank i sends to the engine TP rank on its device (engine i // tp, TP rank i % tp).
        streams = [rank < p.generation_workers * tp if self.transport == "zmq" else rank == 0
                   for rank in range(p.policy_workers)]
        self.policy.open_refit([
            dict(transport=self.transport, job=self.job, token=self.token, dtype=self.cfg.generation.dtype,
                 streams=streams[rank], buffer_size_mb=r.buffer_size_mb, auto_fraction=r.auto_fraction,
                 timeout_s=r.timeout_s, job_dir=self.job_dir, device_slot=rank,
                 world_size=1 + receivers,  # broadcast: the sender and every engine TP rank
                 one_copy=r.one_copy and not self.cfg.policy.offload, shard_slice=r.shard_slice)
            for rank in range(p.policy_workers)])

    def close(self) -> None:
        if self.policy is not None:
            with contextlib.suppress(Exception):  # closing after a failure: the actors may be gone
                self.policy.close_refit()
        for group in (self.generation, self.policy):
            if group is not None:
                with contextlib.suppress(Exception):
                    group.shutdown()
        if self.pg is not None:
            remove_placement_group(self.pg)
        shutil.rmtree(self.job_dir, ignore_errors=True)  # sockets and segments were closed with their owners


def check_refit_exact(policy: Any, generation: Any, dtype: str) -> None:
    """Refuse the run before its first step unless every engine takes the policy's refit exactly: the
    engines dry-run their own loaders over what the policy will stream (`engine.accepts`)."""
    import torch

    from colocate.models.checkpoint_format import UnsupportedModelError
    from colocate.refit.plan import manifest_meta_of

    offer = manifest_meta_of(policy.weights_manifest(getattr(torch, dtype)))
    for report in generation.check_offer(offer):
        if not report["ok"]:
            raise UnsupportedModelError(f"a refit of this model would not be exact: {report['summary']}")


def build(cfg: Config, model_path: str, job: str) -> Cluster:
    from colocate.generation.group import GenerationGroup
    from colocate.policy.group import PolicyGroup

    p, g, pol = cfg.placement, cfg.generation, cfg.policy
    transport = check(cfg, cluster_devices=cluster_gpus())
    on_gpu = p.device == "cuda"
    n_pol, n_gen, tp = p.policy_workers, p.generation_workers, g.tensor_parallel_size
    plan = plan_bundles(mode=p.mode, policy_workers=n_pol, generation_workers=n_gen, tensor_parallel_size=tp,
                        on_gpu=on_gpu)
    pol_bundles, gen_bundles, share = plan.policy_bundles, plan.generation_bundles, plan.share
    pg = placement_group(plan.bundles, strategy=p.strategy)
    if not pg.wait(timeout_seconds=60):
        remove_placement_group(pg)
        raise ConfigError(f"the cluster cannot place {len(plan.bundles)} bundles {plan.bundles[0]} with strategy "
                          f"{p.strategy} (nodes: {alive_node_resources()})")
    try:
        check_engine_nodes(plan, tp, bundle_nodes(pg))
    except ConfigError:
        remove_placement_group(pg)
        raise
    log.info("starting %d policy rank(s) and %d engine(s) (%s, refit over %s)", n_pol, n_gen, p.mode, transport)
    job_dir, token = new_job_dir(), new_token()
    cluster = Cluster(cfg, transport, model_path, None, None, pg, job, job_dir, token)
    # The driver creates the job's rendezvous actor and holds it for the whole run: a named actor that is
    # not detached ends when its creator drops its last handle.
    cluster.rendezvous = get_rendezvous(job)
    backend_kwargs = {} if pol.backend == "fsdp2" else {
        "tensor_parallel_size": pol.tensor_parallel_size, "pipeline_parallel_size": pol.pipeline_parallel_size}
    try:
        cluster.policy = PolicyGroup(
            backend=pol.backend, **backend_kwargs,
            num_workers=n_pol, num_cpus_per_worker=share, num_gpus_per_worker=share if on_gpu else 0,
            placement_group=pg, bundle_indices=pol_bundles,
            model_path=model_path, device=p.device, lr=pol.lr, weight_decay=pol.weight_decay,
            warmup_steps=pol.warmup_steps, total_steps=max(cfg.algorithm.steps + cfg.algorithm.sft_steps, 1),
            max_grad_norm=pol.max_grad_norm, micro_batch_size=pol.micro_batch_size, param_dtype=pol.param_dtype,
            clip_low=pol.clip_low, clip_high=pol.clip_high, kl_coef=pol.kl_coef, reference=pol.kl_coef > 0,
            loss_agg=pol.loss_agg,
            seed=pol.seed,
        )
        # An engine spanning several GPUs (TP) sees all of its bundles' GPUs; its TP ranks are processes of
        # vLLM's multiprocessing executor on them (`make_llm`), its actor claims a share of the first.
        engine_env = None
        if on_gpu and tp > 1:
            gpus = bundle_gpu_ids(pg, len(plan.bundles))
            engine_env = [engine_visible_devices(plan, gpus, w, tp) for w in range(n_gen)]
        cluster.generation = GenerationGroup(
            num_workers=n_gen, num_cpus_per_worker=share, num_gpus_per_worker=share if on_gpu else 0,
            placement_group=pg, bundle_indices=gen_bundles, worker_env_vars=engine_env,
            model=model_path, dtype=g.dtype, max_model_len=g.max_model_len,
            kv_cache_memory_bytes=g.kv_cache_memory_bytes, gpu_memory_utilization=g.gpu_memory_utilization,
            enforce_eager=g.enforce_eager, engine=g.engine, enable_sleep_mode=g.sleep and on_gpu, seed=g.seed,
            tensor_parallel_size=tp,
        )
        check_refit_exact(cluster.policy, cluster.generation, g.dtype)
        # Engines first: over zmq each policy rank looks its engine's receiver up when it opens.
        r = cfg.refit
        receivers = cluster.generation.open_refit(transport, job=job, token=token, timeout_s=r.timeout_s,
                                                  job_dir=job_dir)  # one per engine TP rank
        cluster.open_policy_refit(receivers=len(receivers))
    except BaseException:
        cluster.close()
        raise
    log.info("policy and engines up; refit channel open")
    return cluster
