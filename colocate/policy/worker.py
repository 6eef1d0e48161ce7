"""One rank of the FSDP2 policy: forward log-probabilities, GRPO training steps, offload, weight streaming.

`PolicyWorker` is a plain class; `colocate.policy.group.PolicyGroup` runs one per GPU (or CPU process) as a
Ray actor. Every public method that touches the model is a collective: all ranks must call it, in the same
order, with batches that cut into the same number of micro-batches (checked; a mismatch raises on every
rank rather than hanging).

Precision: master weights, gradients and optimizer state are fp32. With `param_dtype="bfloat16"` FSDP2
casts parameters to bf16 for forward/backward and reduces gradients in fp32. Log-probabilities are always
computed in fp32 from the logits.

Log-probability layout: `logprobs_BT[b, t]` is log p(input_ids[b, t] | input_ids[b, :t]); column 0 has no
prefix and is 0. So `logprobs_BT`, `input_ids_BT` and the response mask share one index, and the response
mask alone says which tokens count. Position ids come from the attention mask, so left and right padding
give the same log-probabilities.

Offload (colocated with an inference engine): `offload()` moves optimizer state, and with
`include_params=True` the sharded parameters too, to CPU; `onload()` brings them back. On `device="cpu"`
nothing moves, but the same state is tracked, so a call that needs what was offloaded fails the same way
on CPU as on GPU.

Shape legend: B = sequences, T = tokens per sequence (prompt + response, padded), V = vocabulary.
"""

import datetime
import functools
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import psutil
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from colocate.policy import checkpoint
from colocate.policy.grpo_loss import LOSS_AGGS, LossAgg, grpo_loss
from colocate.policy.lr_schedule import LrDecay, lr_multiplier
from colocate.policy.weights import (
    ManifestEntry,
    forget_resident,
    iter_full_weights,
    iter_weight_sources,
    reshard,
    resident_weights,
    weights_manifest,
)
from colocate.refit.policy_side import StreamsRefits

T = TypeVar("T")
log = logging.getLogger(__name__)
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# Summed across ranks after each step, then divided by the global token count (all but the first two).
_METRIC_KEYS = ("loss", "tokens", "pg_loss", "kl", "clip_frac", "ratio_mean")


class PolicyWorker(StreamsRefits):
    """One FSDP2 rank of the policy model. See the module docstring for the conventions."""

    def __init__(
        self,
        *,
        model_path: str,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        device: Literal["cpu", "cuda"] = "cuda",
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        total_steps: int = 1,
        lr_decay: LrDecay = "constant",
        min_lr_ratio: float = 0.0,
        max_grad_norm: float = 1.0,
        micro_batch_size: int = 4,
        param_dtype: Literal["bfloat16", "float32"] = "bfloat16",
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        kl_coef: float = 0.0,
        reference: bool = False,
        loss_agg: LossAgg = "token_mean",
        temperature: float = 1.0,
        gradient_checkpointing: bool = False,
        attn_implementation: str = "sdpa",
        seed: int = 0,
        dist_timeout_s: float = 1800.0,
    ) -> None:
        if param_dtype not in _DTYPES:
            raise ValueError(f"param_dtype must be one of {tuple(_DTYPES)}, got {param_dtype!r}")
        if loss_agg not in LOSS_AGGS:
            raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
        started = time.perf_counter()
        self.rank = rank
        self.world_size = world_size
        self.model_path = model_path
        self.micro_batch_size = micro_batch_size
        self.max_grad_norm = max_grad_norm
        self.clip_low, self.clip_high, self.kl_coef = clip_low, clip_high, kl_coef
        self.loss_agg: LossAgg = loss_agg
        self.temperature = temperature
        self.step = 0
        self._params_offloaded = False
        self._optimizer_offloaded = False
        # (param, key) of optimizer-state tensors moved off the device, so onload() restores exactly those
        # and leaves AdamW's CPU `step` counters where AdamW wants them.
        self._offloaded_state: list[tuple[nn.Parameter, str]] = []

        self.device = self._init_distributed(device, master_addr, master_port, dist_timeout_s)
        _seed_everything(seed)

        # Every rank loads the full fp32 checkpoint to CPU and fully_shard keeps its shard: simple and fine up
        # to a few billion parameters; larger models want rank-0 loading plus broadcast.
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32, attn_implementation=_attention_for(model_path, attn_implementation)
        )
        model.config.use_cache = False
        self.architecture = type(model).__name__
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.param_dtype = _DTYPES[param_dtype]
        self.model = self._shard(model, self.param_dtype)

        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay
        )
        schedule = functools.partial(
            lr_multiplier,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            decay=lr_decay,
            min_lr_ratio=min_lr_ratio,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        # The KL term's reference: the initial weights, sharded like the policy, frozen, no optimizer. Kept in
        # `param_dtype`: it only runs forwards, which FSDP2 computes in that dtype from the fp32 weights anyway
        # (the same rounding), so bf16 halves its memory and gives the policy's initial logprobs bit for bit
        # (tests/policy/test_reference_kl.py).
        self.reference: nn.Module | None = None
        if reference:
            ref = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=self.param_dtype,
                attn_implementation=_attention_for(model_path, attn_implementation)
            )
            ref.config.use_cache = False
            self.reference = self._shard(ref.requires_grad_(False).eval(), self.param_dtype)
        log.info("policy rank %d: model loaded in %.1f s (%s, %s)", rank, time.perf_counter() - started,
                 self.architecture, self.device)

    # ---------------------------------------------------------------- setup

    def _init_distributed(
        self, device: str, master_addr: str, master_port: int, timeout_s: float
    ) -> torch.device:
        if device == "cuda":
            # Under Ray each actor sees only its own GPU(s); elsewhere, ranks of one host share them.
            torch.cuda.set_device(self.rank % torch.cuda.device_count())
            torch_device = torch.device("cuda", torch.cuda.current_device())
            backend = "nccl"
        elif device == "cpu":
            torch_device, backend = torch.device("cpu"), "gloo"
        else:
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=self.rank,
            world_size=self.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            # Binding the device lets NCCL connect eagerly; gloo takes no device.
            **({"device_id": torch_device} if backend == "nccl" else {}),
        )
        self.mesh = init_device_mesh(torch_device.type, (self.world_size,))
        return torch_device

    def _shard(self, model: nn.Module, param_dtype: torch.dtype) -> nn.Module:
        mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        # One FSDP unit per decoder layer (the classes HF marks as not to be split), then the root, which
        # takes the embeddings, the final norm and lm_head (a tied lm_head stays one parameter in one unit).
        layer_classes = set(getattr(model, "_no_split_modules", None) or ())
        layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
        if not layers:
            raise ValueError(f"{type(model).__name__} names no decoder-layer classes in _no_split_modules")
        for layer in layers:
            fully_shard(layer, mesh=self.mesh, mp_policy=mp_policy)
        fully_shard(model, mesh=self.mesh, mp_policy=mp_policy)
        return model

    # ---------------------------------------------------------------- forward

    def _token_logprobs(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor,
                        model: nn.Module | None = None) -> torch.Tensor:
        position_ids_BT = (attention_mask_BT.long().cumsum(-1) - 1).clamp(min=0)
        logits_BTV = (model or self.model)(
            input_ids=input_ids_BT, attention_mask=attention_mask_BT, position_ids=position_ids_BT
        ).logits
        # fp32 log-softmax: bf16 logits lose the small differences between old and new policy.
        logits_BTV = logits_BTV[:, :-1].float() / self.temperature
        targets_BT = input_ids_BT[:, 1:].unsqueeze(-1)
        logprobs_BT = torch.gather(logits_BTV, -1, targets_BT).squeeze(-1) - torch.logsumexp(logits_BTV, -1)
        return torch.cat([logprobs_BT.new_zeros(logprobs_BT.shape[0], 1), logprobs_BT], dim=1)

    def _micro_batches(self, batch_size: int) -> list[slice]:
        # FSDP2 runs collectives in every forward: all ranks must run the same number of them.
        sizes = torch.tensor([batch_size, -batch_size], dtype=torch.int64, device=self.device)
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
        if int(sizes[0]) != -int(sizes[1]):
            raise ValueError(
                f"ranks hold different batch sizes (from {-int(sizes[1])} to {int(sizes[0])}); "
                "split the batch evenly across ranks"
            )
        mbs = self.micro_batch_size
        return [slice(start, min(start + mbs, batch_size)) for start in range(0, batch_size, mbs)]

    @torch.no_grad()
    def logprobs(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor,
                 reference: bool = False) -> torch.Tensor:
        """log p(token t | tokens < t) for every position of this rank's batch, fp32 on CPU, column 0 zero;
        with `reference`, under the frozen reference model (built with `reference=True`)."""
        self._require(params=True)
        if reference and self.reference is None:
            raise RuntimeError(f"rank {self.rank}: no reference model (the worker was built without reference=True)")
        model = self.reference if reference else self.model
        model.eval()
        out_BT = [
            self._token_logprobs(
                input_ids_BT[mb].to(self.device), attention_mask_BT[mb].to(self.device), model
            ).cpu()
            for mb in self._micro_batches(input_ids_BT.shape[0])
        ]
        return torch.cat(out_BT) if out_BT else torch.zeros(input_ids_BT.shape, dtype=torch.float32)

    # ---------------------------------------------------------------- training

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step on this rank's share of the batch; returns metrics of the global batch.

        `batch` holds `input_ids` [B, T], `attention_mask` [B, T], `response_mask` [B, T] (tokens the loss
        counts), `old_logprobs` [B, T] and `advantages` [B] and, optionally, `ref_logprobs` [B, T], in the
        layout of `logprobs`.
        """
        self._require(params=True, optimizer=True)
        self.model.train()
        input_ids_BT = batch["input_ids"].to(self.device)
        attention_mask_BT = batch["attention_mask"].to(self.device)
        mask_BT = batch["response_mask"].to(self.device).bool()
        old_logprobs_BT = batch["old_logprobs"].to(self.device, torch.float32)
        advantages_B = batch["advantages"].to(self.device, torch.float32)
        ref_BT = batch.get("ref_logprobs")
        ref_logprobs_BT = ref_BT.to(self.device, torch.float32) if ref_BT is not None else None

        micro_batches = self._micro_batches(input_ids_BT.shape[0])
        counts = torch.tensor([mask_BT.sum(), mask_BT.shape[0]], dtype=torch.float64, device=self.device)
        dist.all_reduce(counts)
        global_tokens, global_seqs = float(counts[0]), float(counts[1])
        # Each micro-batch's loss is a share of the global batch's loss, so the accumulated gradient is the
        # whole batch's. FSDP2 averages gradients over ranks; the world_size factor undoes that average.
        denom = global_tokens if self.loss_agg == "token_mean" else global_seqs
        loss_denom = denom / self.world_size

        sums = torch.zeros(len(_METRIC_KEYS), dtype=torch.float64, device=self.device)
        for mb in micro_batches:
            loss, metrics = grpo_loss(
                logprobs_BT=self._token_logprobs(input_ids_BT[mb], attention_mask_BT[mb]),
                old_logprobs_BT=old_logprobs_BT[mb],
                advantages_B=advantages_B[mb],
                mask_BT=mask_BT[mb],
                ref_logprobs_BT=ref_logprobs_BT[mb] if ref_logprobs_BT is not None else None,
                kl_coef=self.kl_coef,
                clip_low=self.clip_low,
                clip_high=self.clip_high,
                loss_agg=self.loss_agg,
                loss_denom=loss_denom,
            )
            loss.backward()
            tokens = metrics["tokens"]
            sums += torch.stack(
                [loss.detach() / self.world_size, tokens] + [metrics[k] * tokens for k in _METRIC_KEYS[2:]]
            ).to(sums)

        grad_norm = self._clip_grad_norm()
        lr = self.scheduler.get_last_lr()[0]
        # A non-finite norm means a bad batch: stepping would write NaN into every weight.
        skipped = not math.isfinite(grad_norm)
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1

        dist.all_reduce(sums)
        out = dict(zip(_METRIC_KEYS, sums.tolist(), strict=True))
        for key in _METRIC_KEYS[2:]:
            out[key] /= max(out["tokens"], 1.0)
        out.update(grad_norm=grad_norm, lr=lr, step=float(self.step), skipped=float(skipped))
        out.update(self._memory_metrics())
        return out

    def _memory_metrics(self) -> dict[str, float]:
        """This rank's memory, for the metrics: the reference's shards (what `kl_coef > 0` costs, besides its
        forward pass) and, on a GPU, the peak allocated since the last step (reset here)."""
        out = {}
        if self.reference is not None:
            reshard(self.reference)  # its root stays gathered after a no-grad forward: count the shards
            out["reference_gb"] = sum(_local_bytes(p) for p in self.reference.parameters()) / 1e9
        if self.device.type == "cuda":
            out["policy_peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
            torch.cuda.reset_peak_memory_stats(self.device)
        return out

    def _clip_grad_norm(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        total_norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        # Each rank's norm covers its shards only (a DTensor pending a reduction); full_tensor() reduces it.
        if isinstance(total_norm, DTensor):
            total_norm = total_norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, total_norm)
        return float(total_norm)

    # ---------------------------------------------------------------- memory

    def offload(self, include_params: bool = True) -> None:
        """Move optimizer state (and the sharded parameters, if `include_params`) to CPU."""
        if self.device.type != "cpu":
            if not self._optimizer_offloaded:
                for group in self.optimizer.param_groups:
                    for param in group["params"]:
                        state = self.optimizer.state[param]
                        for key, value in state.items():
                            if torch.is_tensor(value) and value.device.type != "cpu":
                                state[key] = value.to("cpu", non_blocking=True)
                                self._offloaded_state.append((param, key))
            if include_params and not self._params_offloaded:
                reshard(self.model)
                forget_resident(self.model)  # its views would keep the parameters' GPU memory
                self.model.to("cpu")
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        self._optimizer_offloaded = True
        self._params_offloaded = self._params_offloaded or include_params

    def onload(self) -> None:
        """Bring back whatever `offload` moved to CPU."""
        if self.device.type != "cpu":
            if self._params_offloaded:
                self.model.to(self.device)
            for param, key in self._offloaded_state:
                state = self.optimizer.state[param]
                state[key] = state[key].to(self.device, non_blocking=True)
            torch.cuda.synchronize()
        self._offloaded_state.clear()
        self._params_offloaded = self._optimizer_offloaded = False

    def is_offloaded(self) -> dict[str, bool]:
        return {"params": self._params_offloaded, "optimizer": self._optimizer_offloaded}

    def _require(self, *, params: bool = False, optimizer: bool = False) -> None:
        if (params and self._params_offloaded) or (optimizer and self._optimizer_offloaded):
            raise RuntimeError(f"rank {self.rank}: offloaded ({self.is_offloaded()}); call onload() first")

    def free_device_memory_bytes(self) -> int:
        """Free memory of this rank's device: the whole GPU's (all processes), or the host's available RAM."""
        if self.device.type == "cpu":
            return int(psutil.virtual_memory().available)
        try:
            import pynvml

            # NVML numbers devices physically; the UUID maps through CUDA_VISIBLE_DEVICES.
            pynvml.nvmlInit()
            uuid = str(torch.cuda.get_device_properties(self.device).uuid)
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
        except Exception:
            # pynvml missing or failing: cudaMemGetInfo gives the same device-wide figure.
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free)

    # ---------------------------------------------------------------- weights and checkpoints

    def iter_weights(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Full weights one at a time, in HF names, on this rank's device (a collective generator)."""
        self._require(params=True)
        return iter_full_weights(self.model, dtype, fsdp_param_dtype=self.param_dtype)

    def refit_sources(self, dtype: torch.dtype) -> Iterator[tuple[str, Any]]:
        """`iter_weights` for a refit sender: even shards as fills gathered straight into its buffers."""
        self._require(params=True)
        return iter_weight_sources(self.model, dtype, fsdp_param_dtype=self.param_dtype)

    def close_refit(self) -> None:
        super().close_refit()
        forget_resident(self.model)  # the sender let go of the parameters' storages: so does the kept list

    def resident_weights(self, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]] | None:
        """One rank on a GPU: the parameters themselves, read in place by a one-copy refit."""
        self._require(params=True)
        return resident_weights(self.model, dtype) if self.device.type == "cuda" else None

    def weights_manifest(self, dtype: torch.dtype | None = None) -> list[ManifestEntry]:
        """`(name, shape, dtype)` of what `iter_weights(dtype)` yields; gathers nothing."""
        return weights_manifest(self.model, dtype)

    def save_checkpoint(self, path: str) -> None:
        self._require(params=True, optimizer=True)
        checkpoint.save_checkpoint(
            path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, step=self.step
        )
        checkpoint.save_rng(path, self.rank)

    def load_checkpoint(self, path: str) -> int:
        self._require(params=True, optimizer=True)
        self.step = checkpoint.load_checkpoint(
            path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler
        )
        checkpoint.load_rng(path, self.rank)
        return self.step

    def export_hf(self, path: str, dtype: torch.dtype | None = None) -> None:
        self._require(params=True)
        checkpoint.export_hf(
            path,
            model=self.model,
            architecture=self.architecture,
            source_path=Path(self.model_path),
            rank=self.rank,
            dtype=dtype,
        )

    def execute(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(self, *args, **kwargs)` here: the hook through which refit senders and tests reach in."""
        return fn(self, *args, **kwargs)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def _attention_for(model_path: str, requested: str) -> str:
    """`requested`, unless the model soft-caps attention logits (Gemma2): sdpa and flash attention skip the
    cap, so the policy's log-probabilities would differ from the engine's (measured: up to 0.18 nats on a
    tiny Gemma2); eager attention applies it."""
    from transformers import AutoConfig

    if requested != "eager" and getattr(AutoConfig.from_pretrained(model_path), "attn_logit_softcapping", None):
        return "eager"
    return requested


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
