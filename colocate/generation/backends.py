"""The two vLLM engines a `GenerationWorker` can drive, behind one small interface.

- `SyncBackend`: `vllm.LLM` (via `make_llm`; on CPU in this process). A call runs the whole batch; a lock
  serialises calls, so a refit waits for the batch in progress and the next batch sees the new weights.
- `AsyncBackend`: `vllm.v1.engine.async_llm.AsyncLLM` (the same class and methods in vLLM 0.24 and 0.32),
  its event loop in a background thread of this process. Requests are admitted one by one through a
  `VersionGate`: a refit stops admitting, lets admitted requests finish on the old weights, swaps, resumes.
  Requests of one batch can therefore straddle a refit; each response still comes from one version.
  AsyncLLM always runs its engine core in a child process (spawned), which is where the worker extension and
  the refit receiver live; `collective_rpc` reaches them there. On CPU that child runs its worker in-process
  (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), instead of one process more.

Both: `update_weights(method)` runs a worker-extension method that changes the weights (the refit's update
task) with nothing generating, then resets the prefix cache (cached KV came from the old weights) and bumps
the version; a failure leaves them stale (see `gate.py`).

The prefix-cache reset walks every KV block in Python (vLLM's `BlockPool.reset_prefix_cache`): ~0.1 us a
block, so 3-9 ms for the ~80k blocks of a 1.5B model's cache at 30 % of an H200, on the refit's critical
path. It is skipped where nothing can be cached: no generation since the engine last forgot its cache.
`sleep(level >= 1)` forgets it (vLLM 0.24 and 0.32: `EngineCore.sleep` pauses the scheduler with
`clear_cache=True`, as the KV memory is released), and so does `forget_prefixes()`, which the worker calls
where sleep is a no-op (CPU), so that a colocated step (generate, sleep, train, wake, refit) never pays it.
A reset vLLM refuses (blocks still held) raises `PrefixCacheError`: stale KV must never be served.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from colocate.engine.vllm_engine import CPU_KV_CACHE_BYTES, make_llm, shutdown_llm
from colocate.generation.errors import PrefixCacheError, WeightsIncompleteError
from colocate.generation.gate import VersionGate

if TYPE_CHECKING:
    from vllm import RequestOutput, SamplingParams

T = TypeVar("T")


def require_reset(reset: bool) -> None:
    """vLLM's answer to `reset_prefix_cache()`: a refusal (blocks still held by requests) must not pass."""
    if not reset:
        raise PrefixCacheError("vLLM refused to reset the prefix cache (KV blocks still held by requests)")


class Backend(Protocol):
    tokenizer: Any

    def generate(self, prompt_ids_B: list[list[int]], params_B: list[SamplingParams]
                 ) -> list[tuple[RequestOutput, int]]:
        """Run every request to the end; each output with the weight version that produced it."""
        ...

    def call_workers(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """`collective_rpc` on the engine's workers, one result per worker (TP rank)."""
        ...

    def update_weights(self, method: str, *args: Any, **kwargs: Any) -> list[Any]: ...

    def sleep(self, level: int) -> None: ...

    def forget_prefixes(self) -> None:
        """Reset the prefix cache now (where `sleep` is a no-op), so the next refit needs no reset."""
        ...

    def wake_up(self, tags: list[str] | None) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def shutdown(self) -> None: ...


class SyncBackend:
    def __init__(self, model: str, **engine_kwargs: Any) -> None:
        self._llm = make_llm(model, **engine_kwargs)
        self.tokenizer = self._llm.get_tokenizer()
        self._lock = threading.Lock()  # LLM is not thread-safe; Ray runs our methods in a thread pool
        self.version = 0
        self.stale = False
        self.prefixes_cached = False  # whether any request ran since the prefix cache was last emptied

    def generate(self, prompt_ids_B: list[list[int]], params_B: list[SamplingParams]
                 ) -> list[tuple[RequestOutput, int]]:
        with self._lock:
            if self.stale:
                raise WeightsIncompleteError(
                    f"the last refit failed part-way (weights were version {self.version}); refit again")
            prompts = [{"prompt_token_ids": ids} for ids in prompt_ids_B]
            self.prefixes_cached = True
            outputs = self._llm.generate(prompts, params_B, use_tqdm=False)
            return [(out, self.version) for out in outputs]

    def call_workers(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        with self._lock:
            return self._llm.collective_rpc(method, args=args, kwargs=kwargs)

    def update_weights(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        with self._lock:
            try:
                result = self._llm.collective_rpc(method, args=args, kwargs=kwargs)
                if self.prefixes_cached:
                    self._reset_prefix_cache()
            except BaseException:
                self.stale = True
                raise
            self.stale = False
            self.version += 1
            return result

    def _reset_prefix_cache(self) -> None:
        require_reset(self._llm.reset_prefix_cache())
        self.prefixes_cached = False

    def sleep(self, level: int) -> None:
        with self._lock:
            self._llm.sleep(level=level)
            self.prefixes_cached = False  # level >= 1 discards the KV cache, its prefix hashes with it

    def forget_prefixes(self) -> None:
        with self._lock:
            if self.prefixes_cached:
                self._reset_prefix_cache()

    def wake_up(self, tags: list[str] | None) -> None:
        with self._lock:
            self._llm.wake_up(tags=tags)

    def status(self) -> dict[str, Any]:
        return {"version": self.version, "stale": self.stale, "busy": self._lock.locked(),
                "prefixes_cached": self.prefixes_cached}

    def shutdown(self) -> None:
        with self._lock:
            shutdown_llm(self._llm)


class AsyncBackend:
    def __init__(self, model: str, **engine_kwargs: Any) -> None:
        self.prefixes_cached = False  # whether any request ran since the prefix cache was last emptied
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-async-loop", daemon=True)
        self._thread.start()
        try:
            self._engine = self._run(self._start(model, engine_kwargs))
        except BaseException:
            self._stop_loop()
            raise
        self.tokenizer = self._engine.get_tokenizer()

    async def _start(self, model: str, engine_kwargs: dict[str, Any]) -> Any:
        # Built on the loop: AsyncLLM starts its output handler on the running loop.
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._gate = VersionGate()
        args = AsyncEngineArgs(model=model, disable_log_stats=True, **async_engine_kwargs(**engine_kwargs))
        return AsyncLLM.from_engine_args(args)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # ------------------------------------------------------------------------------------------ generation
    def generate(self, prompt_ids_B: list[list[int]], params_B: list[SamplingParams]
                 ) -> list[tuple[RequestOutput, int]]:
        return self._run(self._generate(prompt_ids_B, params_B))

    async def _generate(self, prompt_ids_B: list[list[int]], params_B: list[SamplingParams]
                        ) -> list[tuple[RequestOutput, int]]:
        try:
            # A TaskGroup cancels the other requests when one fails (vLLM aborts a cancelled request).
            async with asyncio.TaskGroup() as tasks:
                futures = [tasks.create_task(self._one(ids, p)) for ids, p in zip(prompt_ids_B, params_B,
                                                                                   strict=True)]
        except ExceptionGroup as group:
            raise group.exceptions[0] from None
        return [f.result() for f in futures]

    async def _one(self, prompt_ids: list[int], params: SamplingParams) -> tuple[RequestOutput, int]:
        async with self._gate.request() as version:
            self.prefixes_cached = True
            final = None
            async for out in self._engine.generate({"prompt_token_ids": prompt_ids}, params,
                                                   request_id=uuid.uuid4().hex):
                final = out
            assert final is not None and final.finished
            return final, version

    # -------------------------------------------------------------------------------------- engine control
    def call_workers(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return self._run(self._engine.collective_rpc(method, args=args, kwargs=kwargs))

    def update_weights(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return self._run(self._update(method, args, kwargs))

    async def _update(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        async with self._gate.update():
            if not self.prefixes_cached:
                return await self._engine.collective_rpc(method, args=args, kwargs=kwargs)
            # Nothing generates under the gate, so no block is cached between the reset and the new weights:
            # sent together, the reset costs no round trip of its own through the engine core.
            result, reset = await asyncio.gather(self._engine.collective_rpc(method, args=args, kwargs=kwargs),
                                                 self._engine.reset_prefix_cache())
            self._check_reset(reset)
        return result

    def _check_reset(self, reset: bool) -> None:
        require_reset(reset)
        self.prefixes_cached = False

    def sleep(self, level: int) -> None:
        async def sleep() -> None:  # the flag inside the gate: no request can be admitted in between
            await self._engine.sleep(level=level)
            self.prefixes_cached = False  # level >= 1 discards the KV cache, its prefix hashes with it

        self._run(self._exclusive(sleep()))

    def forget_prefixes(self) -> None:
        async def forget() -> None:
            if self.prefixes_cached:
                self._check_reset(await self._engine.reset_prefix_cache())

        self._run(self._exclusive(forget()))

    def wake_up(self, tags: list[str] | None) -> None:
        self._run(self._exclusive(self._engine.wake_up(tags=tags)))

    async def _exclusive(self, coro: Coroutine[Any, Any, Any]) -> None:
        async with self._gate.exclusive():
            await coro

    @property
    def version(self) -> int:
        return self._gate.version

    def status(self) -> dict[str, Any]:
        gate = self._gate
        return {"version": gate.version, "stale": gate.stale, "in_flight": gate.in_flight,
                "updating": gate.updating, "prefixes_cached": self.prefixes_cached}

    def shutdown(self) -> None:
        async def stop() -> None:  # on the loop: shutdown cancels the output handler, a task of the loop
            self._engine.shutdown()

        try:
            self._run(stop())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def async_engine_kwargs(
    *,
    dtype: str,
    load_format: str,
    seed: int,
    max_model_len: int,
    kv_cache_memory_bytes: int | None,
    gpu_memory_utilization: float,
    enforce_eager: bool,
    tensor_parallel_size: int,
    worker_extension_cls: str | None,
    enable_sleep_mode: bool,
) -> dict[str, Any]:
    """`AsyncEngineArgs` keywords with the CPU settings `make_llm` applies to `LLM` (see its docstring)."""
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # read by the spawned engine core
        if kv_cache_memory_bytes is None:
            kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
    kwargs: dict[str, Any] = dict(
        dtype=dtype, load_format=load_format, seed=seed, max_model_len=max_model_len,
        gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
        tensor_parallel_size=tensor_parallel_size, enable_sleep_mode=enable_sleep_mode and not on_cpu,
    )
    if kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
    if worker_extension_cls is not None:
        kwargs["worker_extension_cls"] = worker_extension_cls
    return kwargs
