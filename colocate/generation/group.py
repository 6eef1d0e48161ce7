"""Data-parallel vLLM engines as Ray actors, one `GenerationWorker` each, driven from the trainer.

A batch of prompts is cut into `num_workers` contiguous shards (sizes differing by at most one, the first
ones larger); worker w serves shard w and the rollouts come back in prompt order, then sample order.

Every failure comes out as one named exception (`errors.py`) naming the worker, with its remote traceback.
Refits pair with the sender's futures:

    group.open_refit("zmq", job=job, token=token, job_dir=job_dir)  # once; policy ranks look the keys up
    driver.run_refit(policy.workers, group, rendezvous=rendezvous, refit=n, timeout_s=timeout_s)  # each refit

Generation can overlap training: `generate_futures` returns at once, `collect` waits. With
`engine="async"` a refit arriving meanwhile is applied between requests (see `backends.py`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup

from colocate.generation.errors import (
    EngineStartError,
    GenerationError,
    GenerationWorkerDiedError,
    GenerationWorkerError,
)
from colocate.generation.types import Prompt, Rollout, SamplingConfig
from colocate.generation.worker import GenerationWorker
from colocate.placement import bundle_strategies

# Concurrent calls one worker accepts: generation batches, a refit's update task, status queries.
MAX_CONCURRENCY = 16
SHUTDOWN_TIMEOUT_S = 30.0
_ANSI_COLOR = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the actor name in its error text


def shard_bounds(num_items: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges covering `num_items`, sizes differing by at most one."""
    base, extra = divmod(num_items, num_shards)
    bounds, start = [], 0
    for shard in range(num_shards):
        stop = start + base + (shard < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


@dataclass
class PendingRollouts:
    """A generation in flight: one future per worker that got prompts, in prompt order."""

    worker_indices: list[int]
    refs: list[ray.ObjectRef]


class GenerationGroup:
    """`num_workers` engines; `worker_kwargs` go to every `GenerationWorker` unchanged (see its signature)."""

    def __init__(
        self,
        *,
        num_workers: int,
        num_cpus_per_worker: float = 1.0,
        num_gpus_per_worker: float = 0.0,
        placement_group: PlacementGroup | None = None,
        bundle_indices: Sequence[int] | None = None,
        env_vars: dict[str, str] | None = None,
        worker_env_vars: Sequence[dict[str, str]] | None = None,
        chat: bool = False,
        call_timeout_s: float | None = None,
        **worker_kwargs: Any,
    ) -> None:
        """`worker_env_vars[i]`: more environment for worker i (a TP engine's GPUs on top of `env_vars`).
        `chat`: format text prompts (and message lists) with the tokenizer's chat template.
        `call_timeout_s`: bound on every wait (None: unbounded; generation can take long)."""
        strategies = bundle_strategies(num_workers, placement_group, bundle_indices)
        self.num_workers = num_workers
        self.tensor_parallel_size = int(worker_kwargs.get("tensor_parallel_size", 1))
        self.chat = chat
        self.call_timeout_s = call_timeout_s
        actor_cls = ray.remote(GenerationWorker)
        self.workers = []
        for index in range(num_workers):
            env = {**(env_vars or {}), **(worker_env_vars[index] if worker_env_vars else {})}
            self.workers.append(actor_cls.options(
                num_cpus=num_cpus_per_worker,
                num_gpus=num_gpus_per_worker,
                scheduling_strategy=strategies[index],
                runtime_env={"env_vars": env} if env else None,
                max_concurrency=MAX_CONCURRENCY,
            ).remote(index=index, **worker_kwargs))
        try:
            self._wait([w.__ray_ready__.remote() for w in self.workers], "__init__")
        except GenerationError:
            self.shutdown(timeout_s=0)  # the others may still be starting: no point waiting for them
            raise

    # ---------------------------------------------------------------------------------------------- waits
    def _wait(self, refs: list[ray.ObjectRef], method: str, indices: list[int] | None = None) -> list[Any]:
        """Results in the order of `refs`; the first failure raises (the others are not waited for)."""
        index_of = dict(zip(refs, indices if indices is not None else range(len(refs)), strict=True))
        results: dict[ray.ObjectRef, Any] = {}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=self.call_timeout_s)
            if not ready:
                stuck = sorted(index_of[r] for r in pending)
                raise GenerationWorkerError(f"workers {stuck} gave no answer to {method}() within "
                                            f"{self.call_timeout_s} s", worker_index=stuck[0])
            try:
                results[ready[0]] = ray.get(ready[0])
            except (RayTaskError, RayActorError, GetTimeoutError) as err:
                raise _named_error(err, index_of[ready[0]], method) from err
        return [results[r] for r in refs]

    def _call_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return self._wait([getattr(w, method).remote(*args, **kwargs) for w in self.workers], method)

    # ------------------------------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[Prompt], **sampling: Any) -> list[Rollout]:
        """`n` rollouts per prompt, in prompt order then sample order. Options: `SamplingConfig`'s fields
        (n, temperature, top_p, max_tokens, stop, seed); any other raises `SamplingOptionError`."""
        return self.collect(self.generate_futures(prompts, **sampling))

    def generate_futures(self, prompts: Sequence[Prompt], **sampling: Any) -> PendingRollouts:
        """Start `generate` and return at once (the trainer can work meanwhile); `collect` waits."""
        config = SamplingConfig.from_options(sampling)
        indices, refs = [], []
        for index, (start, stop) in enumerate(shard_bounds(len(prompts), self.num_workers)):
            if start == stop:
                continue
            indices.append(index)
            refs.append(self._generate_on(index, prompts[start:stop], config, prompt_offset=start))
        return PendingRollouts(indices, refs)

    def generate_each(self, prompts: Sequence[Prompt], **sampling: Any) -> list[list[Rollout]]:
        """Every engine samples all of `prompts` (a check of each engine's weights); one list per engine."""
        config = SamplingConfig.from_options(sampling)
        return self._wait([self._generate_on(i, prompts, config) for i in range(self.num_workers)], "generate")

    def _generate_on(self, index: int, prompts: Sequence[Prompt], config: SamplingConfig,
                     prompt_offset: int = 0) -> ray.ObjectRef:
        return self.workers[index].generate.remote(
            list(prompts), chat=self.chat, n=config.n, temperature=config.temperature, top_p=config.top_p,
            max_tokens=config.max_tokens, stop=config.stop, seed=config.seed, prompt_offset=prompt_offset)

    def collect(self, pending: PendingRollouts) -> list[Rollout]:
        shards = self._wait(pending.refs, "generate", pending.worker_indices)
        return [rollout for shard in shards for rollout in shard]

    # --------------------------------------------------------------------------------------------- refit
    def open_refit(self, transport: str, *, job: str, token: str, timeout_s: float = 60.0, job_dir: str = "",
                   connect_timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Make every engine a receiver of the job's refits over `transport` (`GenerationWorker.open_refit`);
        each TP rank's info, by worker. Over broadcast the group is the policy's rank 0 (group rank 0) and
        every engine worker: engine w's TP rank r is group rank 1 + w * tp + r."""
        tp = self.tensor_parallel_size
        world_size = 1 + self.num_workers * tp
        refs = [w.open_refit.remote(transport, job=job, token=token, timeout_s=timeout_s, job_dir=job_dir,
                                    rank=1 + index * tp, world_size=world_size,
                                    connect_timeout_s=connect_timeout_s)
                for index, w in enumerate(self.workers)]
        return [info for infos in self._wait(refs, "open_refit") for info in infos]

    def receive_refit_futures(self, refit: int | None = None, timeout_s: float | None = None
                              ) -> list[ray.ObjectRef]:
        """Every engine's update task for refit number `refit`, to await with the policy's (`driver`)."""
        return [w.receive_refit.remote(refit, timeout_s) for w in self.workers]

    def close_refit(self) -> None:
        self._call_all("close_refit")

    def check_offer(self, offer: list[tuple[str, str, tuple[int, ...]]]) -> list[dict[str, Any]]:
        """Whether a refit of these (name, dtype, shape) tensors fills each engine exactly, per TP rank of
        each worker: {"ok", "summary", ...} (the dry run of `engine.accepts`; no weight moves)."""
        return [r for ranks in self._call_all("call_workers", "colocate_check_offer", offer) for r in ranks]

    def weight_versions(self) -> list[int]:
        return self._call_all("weight_version")

    def status(self) -> list[dict[str, Any]]:
        return self._call_all("status")

    # -------------------------------------------------------------------------------------------- memory
    def sleep(self, level: int = 1) -> None:
        self._call_all("sleep", level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self._call_all("wake_up", tags)

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Stop the engines cleanly within `timeout_s`, then kill the actors (an async engine's engine-core
        child process exits with its actor)."""
        refs = [w.shutdown.remote() for w in self.workers]
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []


def _named_error(err: Exception, index: int, method: str) -> GenerationError:
    """The exception the group raises for a worker's failure, with the remote traceback in its message."""
    text = _ANSI_COLOR.sub("", str(err))
    if isinstance(err, RayActorError):
        if method == "__init__":
            return EngineStartError(f"worker {index} failed to start:\n{text}", worker_index=index)
        return GenerationWorkerDiedError(f"worker {index} died during {method}():\n{text}", worker_index=index)
    cause = getattr(err, "cause", None)
    cls = type(cause) if isinstance(cause, GenerationError) else GenerationWorkerError
    return cls(f"worker {index} failed in {method}():\n{text}", worker_index=index)
