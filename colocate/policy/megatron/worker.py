"""One rank of the Megatron-core policy (`policy=megatron`): the FSDP2 `PolicyWorker`'s methods, on a GPTModel
with tensor and pipeline parallelism, Megatron's DDP and distributed optimizer.

Written for megatron-core 0.19.2 (the GPU machines' bundle; Python 3.12, torch 2.11, no Transformer Engine, so
the local layer spec). megatron is imported inside this module's functions only: importing the module needs
torch alone, and `preflight.check_available` refuses the backend before start where megatron-core or CUDA is
missing. Every megatron call names, in a comment, the 0.19.2 file it was checked against (paths under
`megatron/core/`). `tests/policy/test_megatron_gpu.py` exercises it on the GPU machine. Its whole body (TP=2 fp32,
PP=2 bf16), plus checkpoint save / load / replayed step, a step after offload / onload, and DP=2, has also run on
CPU against the 0.19.2 wheel's source (gloo; only CUDA calls patched out in a scratch script, not kept here).

Conventions as in `colocate/policy/worker.py`: every method that touches the model is a collective; the
log-probability layout is the same (`logprobs_BT[b, t]` = log p(input_ids[b, t] | input_ids[b, :t]), column 0
is 0). Ranks of one data-parallel group (same `dp` in `layout.rank_coords`) are given the same batch share
(`PolicyGroup` does it). Position ids: Megatron's RoPE ignores `position_ids` (`models/gpt/gpt_model.py:403-431`:
only mrope reads them), so a left-padded row has its real tokens at positions shifted by the padding. RoPE
scores depend on positions only through their differences, so the log-probabilities equal the mask-derived
positions' ones up to rounding.

Loss: Megatron's per-token path (`calculate_per_token_loss=True`): each micro-batch returns the *sum* of its
GRPO losses and its token (or sequence) count; `distributed/finalize_model_grads.py:676-699` sums the counts
over pipeline and data ranks and divides every gradient by the global count, and DDP then sums gradients over
data ranks (`distributed/distributed_data_parallel.py:179-184`). That is `grpo_loss` of the whole batch.

Weights out (refit, export): `refit_sources` walks `convert.export_order` (HF checkpoint order, the order of
`weights_manifest`), a fill per HF weight; per mapping the owning stage all-gathers the tensor ranks' slices (cast
first: a cast is elementwise, so the same bits, and half the traffic in bf16), copies each HF weight out of them
(`convert.gathered_views`) into the sender's buffer, and broadcasts it over the pipeline group. Every rank fills
every HF weight (a refit runs it on every rank); extra memory held is one mapping's gathered parameter.
`iter_weights` (export, checks) fills fresh tensors. With tp = pp = 1 a colocated refit reads the parameters in
place instead (`resident_weights`).

Shape legend: B = sequences, T = tokens per sequence, V = vocabulary (V_r: one tensor rank's slice).
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from colocate.policy.grpo_loss import LOSS_AGGS, LossAgg, grpo_loss
from colocate.policy.lr_schedule import LrDecay, lr_multiplier
from colocate.policy.megatron import convert
from colocate.policy.megatron.errors import MegatronModelError
from colocate.policy.weights import ManifestEntry
from colocate.refit.policy_side import StreamsRefits
from colocate.refit.sources import Fill, castable

T = TypeVar("T")
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_METRIC_KEYS = ("loss", "tokens", "pg_loss", "kl", "clip_frac", "ratio_mean")
_COPIED_SUFFIXES = (".json", ".txt", ".model", ".jinja")  # tokenizer and configs; weights are written anew


class MegatronPolicyWorker(StreamsRefits):
    """One Megatron-core rank of the policy. See the module docstring for the conventions."""

    def __init__(
        self,
        *,
        model_path: str,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        device: Literal["cuda"] = "cuda",
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
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
        loss_agg: LossAgg = "token_mean",
        temperature: float = 1.0,
        seed: int = 0,
        dist_timeout_s: float = 1800.0,
        reference: bool = False,
    ) -> None:
        if reference:  # refused before start too (config.check_policy_parallel); here for direct callers
            raise ValueError("the Megatron policy has no reference model yet: policy.kl_coef must be 0")
        if device != "cuda":
            raise ValueError(f"the Megatron policy runs on CUDA only, got device={device!r}")
        if param_dtype not in _DTYPES or loss_agg not in LOSS_AGGS:
            raise ValueError(f"param_dtype {param_dtype!r} / loss_agg {loss_agg!r}: expected one of "
                             f"{tuple(_DTYPES)} / {LOSS_AGGS}")
        from transformers import AutoConfig

        self.rank, self.world_size, self.model_path = rank, world_size, model_path
        self.tp, self.pp = tensor_parallel_size, pipeline_parallel_size
        self.micro_batch_size, self.temperature = micro_batch_size, temperature
        self.clip_low, self.clip_high, self.kl_coef, self.loss_agg = clip_low, clip_high, kl_coef, loss_agg
        self.base_lr = lr
        self.lr_at = functools.partial(lr_multiplier, warmup_steps=warmup_steps, total_steps=total_steps,
                                       decay=lr_decay, min_lr_ratio=min_lr_ratio)
        self.step = 0
        self._params_offloaded = self._optimizer_offloaded = False
        self._resident_params: dict[str, torch.Tensor] | None = None
        self._resident: tuple[list[int], list[tuple[str, torch.Tensor]]] | None = None
        self.param_dtype = _DTYPES[param_dtype]
        self.hf_config = AutoConfig.from_pretrained(model_path)
        self.dims = convert.dims_from_hf_config(self.hf_config)

        self.device = self._init_distributed(master_addr, master_port, dist_timeout_s, seed)
        self.tf_config = self._transformer_config()
        model = self._build_model()
        self._load_hf_weights(model)
        self.model, self.optimizer = self._wrap(model, lr=lr, weight_decay=weight_decay, betas=betas,
                                                max_grad_norm=max_grad_norm)

    # ---------------------------------------------------------------- setup

    def _init_distributed(self, master_addr: str, master_port: int, timeout_s: float, seed: int) -> torch.device:
        from megatron.core import parallel_state, tensor_parallel

        torch.cuda.set_device(self.rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group(backend="nccl", init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                                world_size=self.world_size, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device)
        # parallel_state.py:601 (order "tp-cp-ep-dp-pp", as layout.rank_coords assumes)
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=self.tp,
                                                 pipeline_model_parallel_size=self.pp)
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.pp_ranks = dist.get_process_group_ranks(self.pp_group)  # global rank of each stage, in stage order
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)  # tensor_parallel/random.py:446
        return device

    def _transformer_config(self) -> Any:
        # transformer/transformer_config.py and model_parallel_config.py (field names and defaults checked there)
        from megatron.core.transformer.enums import AttnBackend
        from megatron.core.transformer.transformer_config import TransformerConfig

        d, c = self.dims, self.hf_config
        return TransformerConfig(
            num_layers=d.num_layers, hidden_size=d.hidden_size, num_attention_heads=d.num_heads,
            num_query_groups=d.num_kv_heads, kv_channels=d.head_dim, ffn_hidden_size=d.intermediate_size,
            normalization="RMSNorm", layernorm_epsilon=c.rms_norm_eps,
            gated_linear_unit=True, activation_func=torch.nn.functional.silu,
            add_bias_linear=False, add_qkv_bias=d.qkv_bias, qk_layernorm=d.qk_norm,
            hidden_dropout=0.0, attention_dropout=0.0, attention_softmax_in_fp32=True,
            attention_backend=AttnBackend.local,  # the local spec's DotProductAttention; no Transformer Engine
            masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
            apply_rope_fusion=False, gradient_accumulation_fusion=False,  # fused kernels need apex / TE
            tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp, sequence_parallel=False,
            params_dtype=self.param_dtype, bf16=self.param_dtype == torch.bfloat16, pipeline_dtype=self.param_dtype,
            calculate_per_token_loss=True,  # see the module docstring: Megatron divides by the global count
            variable_seq_lengths=True,  # micro-batches differ in size (the last one) and length across calls
            # transformer_config.py:2644 raises for the default "allgather" dispatcher with variable_seq_lengths,
            # even for a dense model (no MoE layer reads it); slime and miles set "alltoall" for this reason
            # (THUDM/slime slime/utils/arguments.py). Seen on the first H200 run.
            moe_token_dispatcher_type="alltoall",
            perform_initialization=False,  # every weight is overwritten from the checkpoint
        )

    def _build_model(self) -> Any:
        # models/gpt/gpt_model.py:94 (constructor), models/gpt/gpt_layer_specs.py:467 (local spec)
        from megatron.core import parallel_state
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=self.dims.qk_norm)
        return GPTModel(
            config=self.tf_config, transformer_layer_spec=spec, vocab_size=self.dims.vocab_size,
            max_sequence_length=self.hf_config.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
            parallel_output=True, share_embeddings_and_output_weights=self.dims.tied,
            position_embedding_type="rope", rotary_percent=1.0, rotary_base=convert.rope_theta(self.hf_config),
        ).to(self.device)

    def _load_hf_weights(self, model: Any) -> None:
        """This rank's slices, converted from the HF safetensors (only this stage's tensors are read)."""
        from safetensors import safe_open

        files = sorted(Path(self.model_path).glob("*.safetensors"))
        handles = [safe_open(str(f), framework="pt") for f in files]
        where = {name: h for h in handles for name in h.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        state = convert.megatron_state(lambda name: where[name].get_tensor(name), self.dims, tp_size=self.tp,
                                       tp_rank=self.tp_rank, pp_size=self.pp, pp_rank=self.pp_rank)
        params = dict(model.named_parameters())
        if set(params) != set(state):
            only_model, only_converted = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise MegatronModelError("model", f"Megatron parameters and converted names differ: only in the model "
                                     f"{only_model}, only converted {only_converted}")
        with torch.no_grad():
            for name, param in params.items():
                if tuple(param.shape) != tuple(state[name].shape):
                    raise MegatronModelError("model", f"{name}: model {tuple(param.shape)}, converted "
                                             f"{tuple(state[name].shape)}")
                param.copy_(state[name])

    def _wrap(self, model: Any, *, lr: float, weight_decay: float, betas: tuple[float, float],
              max_grad_norm: float) -> tuple[Any, Any]:
        # distributed/distributed_data_parallel.py:44, distributed_data_parallel_config.py:12,
        # optimizer/__init__.py:988 get_megatron_optimizer, optimizer/optimizer_config.py (fields)
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True,
                                                   overlap_grad_reduce=False, overlap_param_gather=False)
        # With the distributed optimizer, DDP moves each parameter into its contiguous buffer, copying its value.
        ddp = DistributedDataParallel(config=self.tf_config, ddp_config=ddp_config, module=model)
        bf16 = self.param_dtype == torch.bfloat16
        opt_config = OptimizerConfig(optimizer="adam", lr=lr, min_lr=0.0, weight_decay=weight_decay,
                                     adam_beta1=betas[0], adam_beta2=betas[1], adam_eps=1e-8,
                                     clip_grad=max_grad_norm, bf16=bf16, params_dtype=self.param_dtype,
                                     use_distributed_optimizer=True)
        optimizer = get_megatron_optimizer(opt_config, [ddp])
        # What Megatron's own training loop sets (pipeline_parallel/schedules.py:741,836 read them).
        self.tf_config.finalize_model_grads_func = finalize_model_grads
        self.tf_config.no_sync_func = ddp.no_sync
        return ddp, optimizer

    # ---------------------------------------------------------------- forward

    def _micro_batches(self, batch_size: int) -> list[slice]:
        sizes = torch.tensor([batch_size, -batch_size], dtype=torch.int64, device=self.device)
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
        if int(sizes[0]) != -int(sizes[1]):
            raise ValueError(f"ranks hold different batch sizes (from {-int(sizes[1])} to {int(sizes[0])})")
        mbs = self.micro_batch_size
        return [slice(s, min(s + mbs, batch_size)) for s in range(0, batch_size, mbs)]

    @staticmethod
    def _attention_mask(attention_mask_BT: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, T] bool, True = masked: causal and padded keys. Megatron's local attention builds its
        causal mask only when given none (fusions/fused_softmax.py:319-329), so both go in here."""
        T_ = attention_mask_BT.shape[1]
        causal_TT = torch.ones(T_, T_, dtype=torch.bool, device=attention_mask_BT.device).tril()
        allowed_BTT = causal_TT.unsqueeze(0) & attention_mask_BT.bool().unsqueeze(1)
        return ~allowed_BTT.unsqueeze(1)

    def _forward(self, model: Any, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
        position_ids_BT = (attention_mask_BT.long().cumsum(-1) - 1).clamp(min=0)  # read by no RoPE path
        # gpt_model.py:519 forward; with labels=None the last stage returns logits [B, T, V_r] (gpt_model.py:790)
        return model(input_ids=input_ids_BT, position_ids=position_ids_BT,
                     attention_mask=self._attention_mask(attention_mask_BT))

    def _token_logprobs(self, logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor) -> torch.Tensor:
        # tensor_parallel/cross_entropy.py:213: -log softmax at the target over the vocabulary split across
        # tensor ranks, in fp32; it edits its input in place, so it gets a fresh tensor.
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        logits_BTV = logits_BTV[:, :-1].float() / self.temperature
        logprobs_BT = -vocab_parallel_cross_entropy(logits_BTV, input_ids_BT[:, 1:], tp_group=self.tp_group)
        return torch.cat([logprobs_BT.new_zeros(logprobs_BT.shape[0], 1), logprobs_BT], dim=1)

    def _run(self, batches: list[dict[str, torch.Tensor]], loss_fn: Callable, *, forward_only: bool) -> list:
        """Megatron's schedule over `batches` (pipeline_parallel/schedules.py:48 get_forward_backward_func,
        :696 no pipelining, :2120 1F1B); `loss_fn(batch, logits)` runs on the last stage."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def step(data_iterator: Iterator, model: Any) -> tuple[torch.Tensor, Callable]:
            batch = next(data_iterator)
            return (self._forward(model, batch["input_ids"], batch["attention_mask"]),
                    functools.partial(loss_fn, batch))

        return get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(batches), model=[self.model],
            num_microbatches=len(batches), seq_length=batches[0]["input_ids"].shape[1],
            micro_batch_size=self.micro_batch_size, forward_only=forward_only,
            collect_non_loss_data=forward_only)

    def _from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.pp > 1:
            dist.broadcast(tensor, src=self.pp_ranks[-1], group=self.pp_group)
        return tensor

    @torch.no_grad()
    def logprobs(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
        """As `PolicyWorker.logprobs`: [B, T] fp32 on CPU, on every rank of the data-parallel group."""
        self._require(params=True)
        self.model.eval()
        slices = self._micro_batches(input_ids_BT.shape[0])
        if not slices:
            return torch.zeros(input_ids_BT.shape, dtype=torch.float32)
        batches = [{"input_ids": input_ids_BT[s].to(self.device),
                    "attention_mask": attention_mask_BT[s].to(self.device)} for s in slices]

        def collect(batch: dict, logits_BTV: torch.Tensor, non_loss_data: bool = True) -> torch.Tensor:
            return self._token_logprobs(logits_BTV, batch["input_ids"])

        out = self._run(batches, collect, forward_only=True)
        logprobs_BT = torch.cat(out) if out else torch.empty(input_ids_BT.shape, device=self.device)
        return self._from_last_stage(logprobs_BT.float().contiguous()).cpu()

    # ---------------------------------------------------------------- training

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """As `PolicyWorker.train_step`: one optimizer step on this data-parallel group's share; the metrics of
        the global batch, the same on every rank."""
        self._require(params=True, optimizer=True)
        self.model.train()
        slices = self._micro_batches(batch["input_ids"].shape[0])
        batches = [{k: v[s].to(self.device) for k, v in batch.items()} for s in slices]
        sums = torch.zeros(len(_METRIC_KEYS) + 1, dtype=torch.float64, device=self.device)

        def loss_fn(mb: dict, logits_BTV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
            mask_BT = mb["response_mask"].bool()
            ref = mb.get("ref_logprobs")
            # loss_denom=1: the sum over this micro-batch; Megatron divides by the global count (docstring).
            loss, metrics = grpo_loss(
                logprobs_BT=self._token_logprobs(logits_BTV, mb["input_ids"]),
                old_logprobs_BT=mb["old_logprobs"].float(), advantages_B=mb["advantages"].float(), mask_BT=mask_BT,
                ref_logprobs_BT=ref.float() if ref is not None else None, kl_coef=self.kl_coef,
                clip_low=self.clip_low, clip_high=self.clip_high, loss_agg=self.loss_agg, loss_denom=1.0)
            count = mask_BT.sum() if self.loss_agg == "token_mean" else torch.tensor(mask_BT.shape[0])
            count = count.to(device=self.device, dtype=torch.int)
            tokens = metrics["tokens"]
            sums.add_(torch.stack([loss.detach(), tokens, *(metrics[k] * tokens for k in _METRIC_KEYS[2:]),
                                   count.to(tokens.dtype)]).to(sums))
            return loss, count, {}

        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * self.lr_at(self.step)
        lr = self.base_lr * self.lr_at(self.step)
        self.model.zero_grad_buffer()  # distributed_data_parallel.py:603
        self.optimizer.zero_grad()
        self._run(batches, loss_fn, forward_only=False)
        # optimizer/optimizer.py:1855 (chained) / :816: (update_successful, grad_norm, num_zeros_in_grad); the
        # norm is over all ranks' gradients, and clipping to clip_grad happens inside.
        success, grad_norm, _ = self.optimizer.step()
        self.step += 1

        dist.all_reduce(sums, group=self.dp_group)
        self._from_last_stage(sums)
        values = sums.tolist()
        out = dict(zip(_METRIC_KEYS, values[:-1], strict=True))
        out["loss"] /= max(values[-1], 1.0)
        for key in _METRIC_KEYS[2:]:
            out[key] /= max(out["tokens"], 1.0)
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        out.update(grad_norm=grad_norm, lr=lr, step=float(self.step),
                   skipped=float(not success or not math.isfinite(grad_norm)))
        return out

    # ---------------------------------------------------------------- memory

    def offload(self, include_params: bool = True) -> None:
        """Optimizer state (fp32 master weights and moments) to CPU, gradient buffers freed, and with
        `include_params` the parameter buffers to pinned CPU memory: optimizer/optimizer.py:555 offload_to_cpu,
        distributed_data_parallel.py:636 offload_grad_buffers, param_and_grad_buffer.py:1619 offload_to_cpu."""
        if not self._optimizer_offloaded:
            self.optimizer.offload_to_cpu()
            self.model.offload_grad_buffers()
        if include_params and not self._params_offloaded:
            self._resident = None  # its views would keep the parameters' GPU memory
            for buffer in self.model.buffers + self.model.expert_parallel_buffers:
                buffer.offload_to_cpu(move_params=True, move_grads=False)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        self._optimizer_offloaded = True
        self._params_offloaded = self._params_offloaded or include_params

    def onload(self) -> None:
        if self._params_offloaded:
            for buffer in self.model.buffers + self.model.expert_parallel_buffers:
                buffer.reload_from_cpu(move_params=True, move_grads=False)
        if self._optimizer_offloaded:
            self.model.restore_grad_buffers()
            self.optimizer.restore_from_cpu()
        torch.cuda.synchronize()
        self._params_offloaded = self._optimizer_offloaded = False

    def is_offloaded(self) -> dict[str, bool]:
        return {"params": self._params_offloaded, "optimizer": self._optimizer_offloaded}

    def _require(self, *, params: bool = False, optimizer: bool = False) -> None:
        if (params and self._params_offloaded) or (optimizer and self._optimizer_offloaded):
            raise RuntimeError(f"rank {self.rank}: offloaded ({self.is_offloaded()}); call onload() first")

    def free_device_memory_bytes(self) -> int:
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(free)

    # ---------------------------------------------------------------- weights and checkpoints

    def iter_weights(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """`(HF name, full HF tensor)` of every exported weight, on every rank, in `weights_manifest(dtype)`'s
        order: `refit_sources`' fills, each into a tensor of its own (a collective generator: every rank must
        drive it to the end)."""
        for name, fill in self.refit_sources(dtype or self.param_dtype):
            yield name, fill.materialize()

    def refit_sources(self, dtype: torch.dtype) -> Iterator[tuple[str, Fill]]:
        """A `Fill` per exported HF weight, on every rank, in `weights_manifest(dtype)`'s order
        (`convert.export_order`), that writes it straight into a refit sender's buffer: one copy out of the
        gathered parameter, no HF tensor made in between (`iter_weights` fills fresh tensors instead).

        Why every rank, in one fixed order: a refit runs this on every policy rank at once (colocated: each
        rank streams to the engine on its own GPU; split: rank 0 streams, the others fill scratch tensors), and
        the collectives inside pair up only if all ranks issue them in the same order. They all run inside
        the fills (never while the sender takes the next source: it takes a whole bucket's before filling
        any), so they come in manifest order on every rank whatever each one reads ahead. Per mapping
        (`convert.Mapping`, `_MappingFill`):
        - at its first weight's fill, the owning stage's tensor ranks all-gather their slices into one tensor
          (cast to `dtype` first: a cast is elementwise, so the same bits, with half the traffic in bf16).
          Replicated parameters (norms) are gathered too and tp rank 0's copy is taken, so every rank yields
          the same bits even if the copies ever drifted (a perturbation per rank, a non-deterministic kernel);
        - each weight is copied out of it through `convert.gathered_views` (views only: bit-exact);
        - with pp > 1, each owning-stage rank broadcasts it over its pipeline group (the ranks of the same tp
          rank on the other stages), into the same place in their buffers.
        Memory: one mapping's gathered parameter at a time (q, k, v's, or gate and up's, or one weight's),
        never the model.
        """
        self._require(params=True)
        params = dict(self.model.module.named_parameters())
        shapes = convert.hf_shapes(self.dims)
        for m in convert.export_order(self.dims, self.pp):
            fills = _MappingFill(self, m, params[m.megatron] if m.stage == self.pp_rank else None, dtype)
            for name in m.hf:
                yield name, Fill(shapes[name], dtype, self.device, functools.partial(fills.write, name))

    def resident_weights(self, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]] | None:
        """With tp = pp = 1 (any data-parallel size: after each optimizer step every rank holds all the
        parameters), every HF weight as a view of the parameter holding it (`convert.resident_views`), read in
        place by a one-copy refit: no gather, no conversion copy, no packing; q, k and v go as strided views of
        the interleaved linear_qkv. None otherwise (a rank holds slices or one stage: the buffered path).
        Kept while the parameters stay where they are (an optimizer step writes in place; an offload moves
        them): building the views of ~340 weights costs ~1 ms of Python, a third of the copy."""
        self._require(params=True)
        if self.tp != 1 or self.pp != 1 or not castable(self.param_dtype, dtype):
            return None
        if self._resident_params is None:
            self._resident_params = dict(self.model.module.named_parameters())
        key = [p.data_ptr() for p in self._resident_params.values()]
        if self._resident is None or self._resident[0] != key:
            self._resident = (key, convert.resident_views(self._resident_params, self.dims))
        return self._resident[1]

    def close_refit(self) -> None:
        super().close_refit()
        self._resident = None  # the sender let go of the parameters' storages: so do the kept views

    def weights_manifest(self, dtype: torch.dtype | None = None) -> list[ManifestEntry]:
        """`(HF name, full shape, dtype)` of what `iter_weights(dtype)` yields, in its order; from the config
        alone (`convert.export_order` / `hf_shapes`), so it gathers nothing and is the same on every rank."""
        shapes, out_dtype = convert.hf_shapes(self.dims), dtype or self.param_dtype
        return [(name, shapes[name], out_dtype) for m in convert.export_order(self.dims, self.pp) for name in m.hf]

    def _checkpoint_file(self, path: str) -> Path:
        from megatron.core import parallel_state

        tag = f"tp{self.tp_rank}_pp{self.pp_rank}_dp{parallel_state.get_data_parallel_rank()}"
        return Path(path) / f"model_{tag}.pt"

    def _inner_optimizers(self) -> list[Any]:
        """The torch optimizers inside Megatron's (chained) distributed optimizer, one per parameter dtype
        group: each holds this rank's fp32 main-parameter shards and their Adam state."""
        chained = getattr(self.optimizer, "chained_optimizers", [self.optimizer])  # optimizer.py:1855
        return [opt.optimizer for opt in chained]

    def save_checkpoint(self, path: str) -> None:
        """Per-rank model state, Megatron's optimizer state_dict and this rank's shard of the distributed
        optimizer (the inner torch optimizers' state and their fp32 main parameters, as they are). Resuming
        needs the same tp / pp / dp layout; for another layout, export to HF and start from that.

        Not `save_parameter_state` / `load_parameter_state` (distrib_optimizer.py:1411 / :2542): without
        Transformer Engine or Apex, 0.19.2 falls back to torch's AdamW (optimizer/__init__.py:33), whose
        per-parameter state holds a `step` tensor that the parameter state does not save, and loading it then
        fails with KeyError: 'step' (distrib_optimizer.py:1223; run on CPU against 0.19.2)."""
        self._require(params=True, optimizer=True)
        out = self._checkpoint_file(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        shards = [{"state": inner.state_dict(),
                   "main_params": [p.detach().cpu().clone() for g in inner.param_groups for p in g["params"]]}
                  for inner in self._inner_optimizers()]
        torch.save({"model": self.model.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "optimizer_shards": shards, "step": self.step}, out)
        dist.barrier()

    # torch.no_grad: the main parameters are leaves that require grad (or, in fp32, views of the model's);
    # copying into them outside no_grad raises "a leaf Variable that requires grad is being used in an in-place
    # operation" (seen on CPU against 0.19.2 in its own load_parameter_state_from_dp_zero).
    @torch.no_grad()
    def load_checkpoint(self, path: str) -> int:
        self._require(params=True, optimizer=True)
        state = torch.load(self._checkpoint_file(path), map_location=self.device, weights_only=False)
        self.model.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        inners = self._inner_optimizers()
        if len(inners) != len(state["optimizer_shards"]):
            raise ValueError(f"{path}: {len(state['optimizer_shards'])} optimizer shards saved, {len(inners)} here")
        for inner, saved in zip(inners, state["optimizer_shards"], strict=True):
            inner.load_state_dict(saved["state"])
            params = [p for g in inner.param_groups for p in g["params"]]
            if [tuple(p.shape) for p in params] != [tuple(t.shape) for t in saved["main_params"]]:
                raise ValueError(f"{path}: the optimizer shards' shapes differ (another tp / pp / dp layout?)")
            for param, saved_param in zip(params, saved["main_params"], strict=True):
                param.copy_(saved_param)
        self.step = int(state["step"])
        dist.barrier()
        return self.step

    def export_hf(self, path: str, dtype: torch.dtype | None = None) -> None:
        """An HF checkpoint of the current weights, written by rank 0 (a collective)."""
        from huggingface_hub import save_torch_state_dict

        state = {}
        for name, tensor in self.iter_weights(dtype):
            if self.rank == 0:
                state[name] = tensor.to("cpu", copy=True)
        if self.rank == 0:
            out = Path(path)
            out.mkdir(parents=True, exist_ok=True)
            save_torch_state_dict(state, out)
            for item in Path(self.model_path).iterdir():
                if item.is_file() and item.suffix in _COPIED_SUFFIXES and item.name != "model.safetensors.index.json":
                    shutil.copy2(item, out / item.name)
            config = json.loads((out / "config.json").read_text())
            config["torch_dtype"] = config["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
            (out / "config.json").write_text(json.dumps(config, indent=2))
        dist.barrier()

    def execute(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(self, *args, **kwargs)` here: the hook through which refit senders and tests reach in."""
        return fn(self, *args, **kwargs)

    def shutdown(self) -> None:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()  # parallel_state.py:2506
        if dist.is_initialized():
            dist.destroy_process_group()


class _MappingFill:
    """The fills of one mapping's HF weights (`MegatronPolicyWorker.refit_sources`): the first gathers the
    parameter over the tensor ranks (owning stage only), each copies its weight out and, with pp > 1,
    broadcasts it from the owning stage; the gathered tensor is dropped after the last weight."""

    def __init__(self, worker: MegatronPolicyWorker, mapping: convert.Mapping, local: torch.Tensor | None,
                 dtype: torch.dtype) -> None:
        self.w, self.mapping, self.local, self.dtype = worker, mapping, local, dtype
        self.views: dict[str, torch.Tensor] | None = None
        self.left = len(mapping.hf)

    def write(self, name: str, out: torch.Tensor) -> None:
        w = self.w
        if self.local is not None:
            if self.views is None:
                self.views = convert.gathered_views(self.mapping, self._gather(), w.dims, w.tp)
            view = self.views[name]
            out.view(view.shape).copy_(view)  # `out` is contiguous: viewed as the (maybe folded) view
        if w.pp > 1:
            dist.broadcast(out, src=w.pp_ranks[self.mapping.stage], group=w.pp_group)
        self.left -= 1
        if not self.left:
            self.views = None

    def _gather(self) -> torch.Tensor:
        w, local = self.w, self.local.detach().to(self.dtype)
        if w.tp == 1:
            return local
        local = local.contiguous()
        gathered = torch.empty((w.tp * local.shape[0], *local.shape[1:]), dtype=self.dtype, device=w.device)
        dist.all_gather_into_tensor(gathered, local, group=w.tp_group)
        return gathered
