"""The policy as a group of Ray actors, one worker per rank (FSDP2 `PolicyWorker` or `MegatronPolicyWorker`),
driven from the trainer.

Every call fans out to all ranks (the worker methods are collectives) and waits for all of them. The first
rank to fail ends the wait with a `PolicyError` naming that rank and carrying its remote traceback; it does
not wait on the ranks that are then stuck in a collective with the dead one. After a `PolicyError` the
group is unusable (its process group is broken): shut it down and build a new one.

Batches are cut along the batch dimension into one equal, contiguous share per data-parallel rank; results that
are per sequence come back concatenated in the same order. FSDP2 ranks are all data-parallel (rank r gets share
r); Megatron ranks of one tensor / pipeline group share a data-parallel rank and get the same share
(`megatron.layout.rank_coords`), and the first rank of each group answers for it.

Shape legend: B = sequences, T = tokens per sequence.
"""

import socket
from collections.abc import Callable, Sequence
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from colocate.placement import bundle_strategies
from colocate.policy.megatron.layout import rank_coords
from colocate.policy.weights import ManifestEntry


def worker_class(backend: str) -> type:
    """The worker class of a policy backend; the Megatron one is imported only when asked for."""
    if backend == "fsdp2":
        from colocate.policy.worker import PolicyWorker

        return PolicyWorker
    if backend == "megatron":
        from colocate.policy.megatron.worker import MegatronPolicyWorker

        return MegatronPolicyWorker
    raise ValueError(f"policy backend must be 'fsdp2' or 'megatron', got {backend!r}")


class PolicyError(RuntimeError):
    """A policy rank failed (raised, died, or timed out); `traceback` is the remote one."""

    def __init__(self, *, rank: int, method: str, traceback: str) -> None:
        super().__init__(f"policy rank {rank} failed in {method}():\n{traceback}")
        self.rank = rank
        self.method = method
        self.traceback = traceback


def _free_endpoint() -> tuple[str, str, int]:
    """(node id, node IP, a free TCP port) of the node this runs on: where rank 0 will listen."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), port


class PolicyGroup:
    """`num_workers` policy ranks as Ray actors: `backend` "fsdp2" (`PolicyWorker`) or "megatron"
    (`MegatronPolicyWorker`, which also takes `tensor_parallel_size` and `pipeline_parallel_size`);
    `worker_kwargs` go to every worker unchanged."""

    def __init__(
        self,
        *,
        num_workers: int,
        num_cpus_per_worker: float = 1.0,
        num_gpus_per_worker: float = 0.0,
        placement_group: PlacementGroup | None = None,
        bundle_indices: Sequence[int] | None = None,
        env_vars: dict[str, str] | None = None,
        call_timeout_s: float | None = None,
        backend: str = "fsdp2",
        **worker_kwargs: Any,
    ) -> None:
        strategies = bundle_strategies(num_workers, placement_group, bundle_indices)
        self.num_workers = num_workers
        self.call_timeout_s = call_timeout_s
        tp, pp = worker_kwargs.get("tensor_parallel_size", 1), worker_kwargs.get("pipeline_parallel_size", 1)
        # Which batch share each rank takes, and the rank that answers for each share.
        self.share_of = [rank_coords(r, tp_size=tp, pp_size=pp, world_size=num_workers).dp for r in range(num_workers)]
        self.num_shares = num_workers // (tp * pp)
        self.answering = [self.share_of.index(share) for share in range(self.num_shares)]

        # The rendezvous port must be free on rank 0's node, so look for it there: in rank 0's bundle, or
        # anywhere and then pin rank 0 to the node that answered.
        probe = ray.remote(num_cpus=0)(_free_endpoint).options(scheduling_strategy=strategies[0])
        node_id, master_addr, master_port = ray.get(probe.remote())

        actor_cls = ray.remote(worker_class(backend))
        self.workers = []
        for rank in range(num_workers):
            scheduling: Any = strategies[rank]
            if scheduling is None and rank == 0:
                scheduling = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
            self.workers.append(
                actor_cls.options(
                    num_cpus=num_cpus_per_worker,
                    num_gpus=num_gpus_per_worker,
                    scheduling_strategy=scheduling,
                    runtime_env={"env_vars": env_vars} if env_vars else None,
                ).remote(
                    rank=rank,
                    world_size=num_workers,
                    master_addr=master_addr,
                    master_port=master_port,
                    **worker_kwargs,
                )
            )
        # Constructors run concurrently (they rendezvous with each other); wait for all, failing fast and
        # leaving no half-built group behind.
        try:
            self._wait([w.__ray_ready__.remote() for w in self.workers], "__init__")
        except PolicyError:
            self.shutdown()
            raise

    # ---------------------------------------------------------------- fan-out

    def _wait(self, refs: list[ray.ObjectRef], method: str) -> list[Any]:
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=self.call_timeout_s)
            if not ready:
                # The first rank still pending is named; the others may only be waiting on it in a collective
                # (or may never have been scheduled, for want of resources).
                ranks = sorted(rank_of[ref] for ref in pending)
                raise PolicyError(
                    rank=ranks[0],
                    method=method,
                    traceback=f"no answer after {self.call_timeout_s} s from ranks {ranks}",
                )
            ref = ready[0]
            try:
                results[rank_of[ref]] = ray.get(ref)
            except (RayTaskError, RayActorError, GetTimeoutError) as err:
                raise PolicyError(rank=rank_of[ref], method=method, traceback=str(err)) from err
        return results

    def run_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call `method(*args, **kwargs)` on every rank; the results in rank order."""
        return self._wait([getattr(w, method).remote(*args, **kwargs) for w in self.workers], method)

    def _run_split(self, method: str, per_rank_args: list[tuple[Any, ...]]) -> list[Any]:
        refs = [getattr(w, method).remote(*args) for w, args in zip(self.workers, per_rank_args, strict=True)]
        return self._wait(refs, method)

    def _split(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if tensor.shape[0] % self.num_shares:
            raise ValueError(
                f"batch of {tensor.shape[0]} does not split evenly over {self.num_shares} data-parallel ranks"
            )
        return torch.tensor_split(tensor, self.num_shares)

    # ---------------------------------------------------------------- the worker's API

    def logprobs(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
        """`PolicyWorker.logprobs` of the whole batch, split over ranks: [B, T] fp32."""
        shares = list(zip(self._split(input_ids_BT), self._split(attention_mask_BT), strict=True))
        out = self._run_split("logprobs", [shares[self.share_of[r]] for r in range(self.num_workers)])
        return torch.cat([out[r] for r in self.answering])

    def reference_logprobs(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
        """As `logprobs`, under the frozen reference model (the workers were built with `reference=True`)."""
        shares = [(ids, mask, True) for ids, mask in
                  zip(self._split(input_ids_BT), self._split(attention_mask_BT), strict=True)]
        return torch.cat(self._run_split("logprobs", shares))

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step on the whole batch; the metrics of the global batch (the same on every rank)."""
        split = {key: self._split(value) for key, value in batch.items()}
        shares = [({key: parts[self.share_of[rank]] for key, parts in split.items()},)
                  for rank in range(self.num_workers)]
        return self._run_split("train_step", shares)[0]

    def offload(self, include_params: bool = True) -> None:
        self.run_all("offload", include_params)

    def onload(self) -> None:
        self.run_all("onload")

    def free_device_memory_bytes(self) -> list[int]:
        return self.run_all("free_device_memory_bytes")

    def weights_manifest(self, dtype: torch.dtype | None = None) -> list[ManifestEntry]:
        # Not a collective: rank 0 alone answers.
        return self._wait([self.workers[0].weights_manifest.remote(dtype)], "weights_manifest")[0]

    def save_checkpoint(self, path: str) -> None:
        self.run_all("save_checkpoint", path)

    def load_checkpoint(self, path: str) -> int:
        return self.run_all("load_checkpoint", path)[0]

    def export_hf(self, path: str, dtype: torch.dtype | None = None) -> None:
        self.run_all("export_hf", path, dtype)

    def execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """`fn(worker, *args, **kwargs)` on every rank (e.g. a refit sender driving `iter_weights`)."""
        return self.run_all("execute", fn, *args, **kwargs)

    def call_rank0(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(worker, *args, **kwargs)` on rank 0 alone (not a collective)."""
        return self._wait([self.workers[0].execute.remote(fn, *args, **kwargs)], "execute")[0]

    def open_refit(self, per_rank: list[dict[str, Any]]) -> None:
        """Every rank's `open_refit(**per_rank[rank])` (`refit/policy_side.py`)."""
        self._wait([w.open_refit.remote(**kw) for w, kw in zip(self.workers, per_rank, strict=True)], "open_refit")

    def close_refit(self) -> None:
        self.run_all("close_refit")

    def shutdown(self) -> None:
        """Kill the actors, without a graceful call first: after a failure ranks may hang in a collective."""
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
