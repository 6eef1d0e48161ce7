"""One vLLM engine serving rollouts and receiving refits; `GenerationGroup` runs it as a Ray actor.

The refit's update task (`receive_refit`) drains generation first (`backends.py`): admitted requests finish
on the old weights before any tensor is loaded. The sender's `timeout_s` must therefore cover the longest
in-flight generation as well as the transfer itself.

Sleep mode: on GPU `sleep(level)` frees the weights (level 1: offloaded to host memory, level 2: dropped) and
the KV cache; `wake_up(["weights"])`, then a refit, then `wake_up(["kv_cache"])` keeps peak memory low. vLLM
has no sleep mode on CPU: there both calls log one line and do nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from typing import Any, Literal

import ray
import torch

from colocate.generation.backends import AsyncBackend, Backend, SyncBackend
from colocate.generation.errors import EngineStartError, PromptTooLongError, WeightsIncompleteError
from colocate.generation.types import Prompt, Rollout, SamplingConfig
from colocate.rendezvous import device_key, get_rendezvous

DEFAULT_EXTENSION = "colocate.refit.engine_side.RefitExtension"
ALL_TAGS = ("weights", "kv_cache")
logger = logging.getLogger(__name__)


class GenerationWorker:
    def __init__(
        self,
        *,
        model: str,
        index: int = 0,
        engine: Literal["sync", "async"] = "sync",
        dtype: str = "auto",
        load_format: str = "auto",
        tensor_parallel_size: int = 1,
        max_model_len: int = 256,
        gpu_memory_utilization: float = 0.5,
        kv_cache_memory_bytes: int | None = None,
        seed: int = 0,
        enforce_eager: bool = True,
        enable_sleep_mode: bool = False,
        worker_extension_cls: str | None = DEFAULT_EXTENSION,
    ) -> None:
        """`index`: this worker's place in its group (its CPU device slot). `engine`: see `backends.py`."""
        if engine not in ("sync", "async"):
            raise EngineStartError(f"engine must be 'sync' or 'async', got {engine!r}", worker_index=index)
        # A path that is not there would otherwise be looked up on the model hub first.
        if model.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(model)):
            raise EngineStartError(f"model directory {model!r} does not exist", worker_index=index)
        self.index = index
        self.max_model_len = max_model_len
        self.on_gpu = torch.cuda.is_available()
        self._asleep: set[str] = set()
        self._weights_dropped = False  # by sleep(level=2), until a refit completes
        self._keys: list[str] = []
        self._rendezvous: Any = None  # the refit job's; held: the actor lives as long as its creator holds it
        self._refit_transport: str | None = None
        self._refit_job = ""
        self._master_known = False
        self._connect_timeout_s = 0.0
        backend_cls = AsyncBackend if engine == "async" else SyncBackend
        started = time.perf_counter()
        logger.info("engine %d: starting vLLM (%s engine, tp=%d) for %s", index, engine, tensor_parallel_size, model)
        try:
            self._backend: Backend = backend_cls(
                model, dtype=dtype, load_format=load_format, seed=seed, max_model_len=max_model_len,
                kv_cache_memory_bytes=kv_cache_memory_bytes, gpu_memory_utilization=gpu_memory_utilization,
                enforce_eager=enforce_eager, tensor_parallel_size=tensor_parallel_size,
                worker_extension_cls=worker_extension_cls, enable_sleep_mode=enable_sleep_mode,
            )
        except Exception as e:
            raise EngineStartError(f"worker {index}: the {engine} vLLM engine for {model!r} failed to start: "
                                   f"{type(e).__name__}: {e}", worker_index=index) from e
        logger.info("engine %d: up in %.1f s", index, time.perf_counter() - started)

    # ------------------------------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        chat: bool = False,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 64,
        stop: Sequence[str] = (),
        seed: int | None = None,
        prompt_offset: int = 0,
    ) -> list[Rollout]:
        """Sample `n` responses per prompt; rollouts in prompt order, then sample order.

        `prompt_offset` is the index of `prompts[0]` in the caller's batch: it names prompts in errors and
        rollouts, and offsets per-prompt seeds.
        """
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        config = SamplingConfig(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop,
                                seed=seed)
        if self._asleep:
            raise RuntimeError(f"worker {self.index} is asleep ({sorted(self._asleep)} released); wake it up")
        if self._weights_dropped:
            raise WeightsIncompleteError(f"worker {self.index}: sleep(level=2) dropped the weights; refit first",
                                         worker_index=self.index)
        prompt_ids_B = [self.encode(p, chat=chat) for p in prompts]
        for i, ids in enumerate(prompt_ids_B):
            if len(ids) >= self.max_model_len:
                raise PromptTooLongError(
                    f"prompt {prompt_offset + i} has {len(ids)} tokens: max_model_len={self.max_model_len} "
                    "leaves no room for a response", worker_index=self.index)
        params_B = [
            SamplingParams(
                n=config.n, temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_tokens,
                stop=list(config.stop) or None,
                seed=None if config.seed is None else config.seed + prompt_offset + i,
                logprobs=0,  # the sampled token's own logprob
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            for i in range(len(prompt_ids_B))
        ]
        rollouts = []
        for i, (out, version) in enumerate(self._backend.generate(prompt_ids_B, params_B)):
            for c in sorted(out.outputs, key=lambda c: c.index):
                tokens_R = list(c.token_ids)
                logprobs_R = [c.logprobs[t][tok].logprob for t, tok in enumerate(tokens_R)] if c.logprobs else []
                rollouts.append(Rollout(
                    prompt_ids=prompt_ids_B[i], response_ids=tokens_R, logprobs=logprobs_R,
                    finish_reason=str(c.finish_reason), weight_version=version, prompt_index=prompt_offset + i,
                    sample_index=c.index, response_text=c.text, cached_tokens=out.num_cached_tokens or 0,
                ))
        return rollouts

    def encode(self, prompt: Prompt, *, chat: bool = False) -> list[int]:
        """Token ids of a prompt; with `chat`, texts and message lists go through the chat template."""
        if isinstance(prompt, list) and not (prompt and isinstance(prompt[0], dict)):
            return [int(t) for t in prompt]
        tok = self._backend.tokenizer
        if chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return tok.encode(text, add_special_tokens=False)  # the template already has the special tokens
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be token ids or a string without chat=True, got {type(prompt)}")
        return tok.encode(prompt)  # as vLLM encodes a text prompt

    # --------------------------------------------------------------------------------------------- refit
    def open_refit(self, transport: str, *, job: str, token: str, timeout_s: float = 60.0, job_dir: str = "",
                   rank: int = 1, world_size: int = 0, connect_timeout_s: float | None = None) -> list[dict]:
        """Make every worker of this engine a receiver of the job's refits (`refit/engine_side.py`).

        zmq (colocated): bind each TP rank's receiver in the private `job_dir` and register it with the job's
        rendezvous under its device's key: the GPU's UUID, or on CPU the slot `index * tp + rank` (several
        engines on one node then get distinct keys); returns [{"key"}] per TP rank.
        broadcast (split): TP rank r is group rank `rank + r` of `world_size`; the group is joined at the
        first refit, waiting up to `connect_timeout_s` (None: the transport's default) for the sender and the
        other receivers; returns [{"rank", "device"}] per TP rank.
        """
        from colocate.refit.nccl.group import CONNECT_TIMEOUT_S

        self.close_refit()
        # Hold the job's rendezvous actor from now on: it lives only as long as its creator holds it.
        self._rendezvous = get_rendezvous(job)
        self._refit_job, self._refit_transport, self._master_known = job, transport, False
        self._connect_timeout_s = CONNECT_TIMEOUT_S if connect_timeout_s is None else connect_timeout_s
        infos = self._backend.call_workers("colocate_refit_open", transport, job=job, token=token,
                                           timeout_s=timeout_s, job_dir=job_dir, rank=rank,
                                           world_size=world_size, connect_timeout_s=self._connect_timeout_s)
        if transport != "zmq":
            return infos
        node = ray.get_runtime_context().get_node_id()
        keys = []
        for tp_rank, info in enumerate(infos):
            kind, ident = info["device_key"].split(":", 1)
            if kind == "cpu":
                ident = str(self.index * len(infos) + tp_rank)
            keys.append(device_key(node, kind, ident))
            ray.get(self._rendezvous.register.remote(keys[-1], info["address"]))
        self._keys = keys
        return [{"key": k} for k in keys]

    def receive_refit(self, refit: int | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        """The update task of refit number `refit`: drain generation, receive, reset the prefix cache (if it
        can hold anything: see backends.py), bump the version. Returns TP rank 0's receive stats (every rank
        receives the same stream).

        Over broadcast the sender's store address is looked up here, in the actor, at the first refit (the
        async engine's workers live in a child process that is not connected to Ray)."""
        from colocate.rendezvous import lookup_master

        t0 = time.perf_counter()
        self._check_weights_awake()
        if self._refit_transport is None:
            raise RuntimeError(f"worker {self.index}: open_refit was not called")
        if self._refit_transport == "broadcast" and not self._master_known:
            master = lookup_master(self._refit_job, self._connect_timeout_s)
            self._backend.call_workers("colocate_refit_set_master", master)
            self._master_known = True
        per_rank = self._backend.update_weights("colocate_refit_receive", refit=refit, timeout_s=timeout_s,
                                                check_filled=self._weights_dropped)
        self._refilled(sorted({p for stats in per_rank for p in stats.pop("unloaded", ())}))
        stats = dict(per_rank[0])
        # The whole task (prefix-cache reset and refill check included), beside the receiver's own load time.
        stats["task_seconds"] = time.perf_counter() - t0
        return stats

    def close_refit(self) -> None:
        if self._refit_transport is not None:
            self._backend.call_workers("colocate_refit_close")
        if self._rendezvous is not None and self._keys:
            # The job's rendezvous may be gone already (its owner, another engine of the group, closed
            # first): the keys went with it.
            with contextlib.suppress(ray.exceptions.RayActorError):
                ray.get([self._rendezvous.unregister.remote(k) for k in self._keys])
        self._keys, self._refit_transport = [], None

    def _refilled(self, missing: list[str]) -> None:
        """After a completed refit: weights dropped by sleep(level=2) are back only if it filled every one
        (`missing`: the parameters it did not fill, as the workers found when asked to check)."""
        if not self._weights_dropped:
            return
        if missing:
            raise WeightsIncompleteError(
                f"worker {self.index}: sleep(level=2) dropped the weights and the refit refilled only part of "
                f"them ({len(missing)} parameters missing, e.g. {missing[:3]}); refit with every weight",
                worker_index=self.index)
        self._weights_dropped = False

    def _check_weights_awake(self) -> None:
        # Asleep, the weights' device memory is unmapped: loading into it would crash the engine.
        if "weights" in self._asleep:
            raise RuntimeError(f"worker {self.index}: wake_up(['weights']) before a refit")

    def weight_version(self) -> int:
        return self._backend.version

    def status(self) -> dict[str, Any]:
        """Version, stale flag and load (for monitoring and tests)."""
        return {**self._backend.status(), "asleep": sorted(self._asleep)}

    def call_workers(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Any worker-extension method on every TP rank (fingerprints in tests, load modes in benchmarks)."""
        return self._backend.call_workers(method, *args, **kwargs)

    # -------------------------------------------------------------------------------------------- memory
    def sleep(self, level: int = 1) -> None:
        """Release the weights and KV cache (GPU); in-flight requests finish first. On CPU it only forgets
        the cached prefixes, as on GPU.

        Level 1 copies the weights to host memory and back on wake-up; level 2 drops them (no copies), for
        when a full refit follows: until one completes, `generate` raises `WeightsIncompleteError`.
        """
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        if not self.on_gpu:
            logger.warning("worker %d: sleep(level=%d) is a no-op on CPU (vLLM has no sleep mode there)",
                           self.index, level)
            # What sleep does to the KV cache on GPU (its cached prefixes are forgotten), so that a refit
            # after it behaves, and is tested, the same way here.
            self._backend.forget_prefixes()
            return
        self._backend.sleep(level)
        self._asleep = set(ALL_TAGS)
        self._weights_dropped = self._weights_dropped or level == 2

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Reallocate `tags` ("weights", "kv_cache"; None: all). A no-op on CPU."""
        if not self.on_gpu:
            logger.warning("worker %d: wake_up(tags=%s) is a no-op on CPU (vLLM has no sleep mode there)",
                           self.index, tags)
            return
        asleep = [t for t in (tags or ALL_TAGS) if t in self._asleep]
        if not asleep:  # mapping awake memory again would fail inside vLLM's allocator
            return
        self._backend.wake_up(asleep)
        self._asleep -= set(asleep)

    def shutdown(self) -> None:
        self.close_refit()
        self._backend.shutdown()
