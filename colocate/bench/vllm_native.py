"""The baseline for the refit benchmark: one refit through vLLM 0.24's own CUDA IPC weight-transfer path.

vLLM 0.24.0 (the GPU build) only: 0.32 replaced this API (`IPCTrainerSendWeightsArgs` is gone, the trainer
side became `IPCTrainerInitInfo` + a sync client), and CUDA IPC needs a GPU anyway. vLLM is imported inside
the function, so importing this module needs neither vLLM nor CUDA.

What `native_refit` times, both processes on one GPU (trainer: torch only; engine: an in-process `vllm.LLM`
built with `ENGINE_KWARGS`, serving `getattr(llm, method)(**kwargs)` requests sent through `call_engine`):

    trainer                                    engine (Worker = the in-process GPU worker)
    call_engine("start_weight_update")    ->   LLM.start_weight_update -> collective_rpc
                                               -> Worker.start_weight_update: initialize_layerwise_reload
    IPCWeightTransferEngine.trainer_send_weights:
      packed=False: reduce_tensor per tensor,
        ONE update_weights, all handles   ->   LLM.update_weights -> collective_rpc -> Worker.update_weights
      packed=True: copy into one reused        -> parse_update_info -> IPCWeightTransferEngine.receive_weights
        bucket_bytes IPC buffer, sync,            (rebuild_cuda_tensor; packed: slice + clone each tensor)
        update_weights per bucket         ->   -> model.load_weights (layerwise reload)
      torch.cuda.ipc_collect() per send        -> torch.accelerator.synchronize()
    call_engine("finish_weight_update")   ->   Worker.finish_weight_update: finalize_layerwise_reload

`start_weight_update` keeps its default `is_checkpoint_format=True`: the tensors carry HF checkpoint names
(`q_proj`, `k_proj`, ... rather than vLLM's fused `qkv_proj`), which only the checkpoint-format path loads.

Deviation from a stock vLLM deployment: the transport. 0.24's `trainer_send_weights` offers 'ray' (a Ray
actor call), 'http' (the OpenAI server's `/update_weights`, handles pickled into base64 JSON) and a
callable `send_mode`; we use the callable, which forwards exactly the request the 'ray' transport sends
(`dict(update_info=asdict(update_info))`) over the harness's pipe instead of Ray. So the timing contains
vLLM's packing, handle export/import, loading and synchronisation, plus a pickled pipe round trip per
`update_weights` in place of a Ray round trip. Not timed: `init_weight_transfer_engine`, a no-op for IPC in
0.24 that `start_weight_update` does not require. The trainer must not be part of a torch.distributed group
of more than one rank: vLLM would then all-gather the handles across it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferUpdateInfo

# The worker builds a weight-transfer engine only when the config names one; without it
# start/update/finish_weight_update raise "Weight transfer not configured". A plain dict so that this module
# needs no vLLM import (`EngineArgs.__post_init__` turns it into a `WeightTransferConfig`).
ENGINE_KWARGS: dict[str, Any] = {"weight_transfer_config": {"backend": "ipc"}}


def native_refit(
    tensors: list[tuple[str, torch.Tensor]],
    *,
    packed: bool,
    call_engine: Callable[[str, dict[str, Any]], Any],
    bucket_bytes: int = 1 << 30,
) -> None:
    """Send `tensors` (HF names, on this process's GPU) into the engine through vLLM 0.24's IPC path.

    `packed=False`: one IPC handle per tensor, all in one `update_weights`. `packed=True`: tensors are copied
    into one reused `bucket_bytes` IPC buffer, one `update_weights` per bucket (vLLM raises if a tensor is
    larger than the buffer). On return the engine holds the new weights: every `update_weights` synchronises
    the engine's device before `call_engine` returns, and `finish_weight_update` finalises the reload.
    """
    from vllm.distributed.weight_transfer.ipc_engine import (
        IPCTrainerSendWeightsArgs,
        IPCWeightTransferEngine,
    )

    def send(update_info: IPCWeightTransferUpdateInfo) -> None:
        # The 'ray' transport's request, verbatim: `h.update_weights.remote(dict(update_info=asdict(...)))`.
        call_engine("update_weights", {"request": {"update_info": dataclasses.asdict(update_info)}})

    args = IPCTrainerSendWeightsArgs(send_mode=send, packed=packed, packed_buffer_size_bytes=bucket_bytes)
    call_engine("start_weight_update", {"is_checkpoint_format": True})
    try:
        IPCWeightTransferEngine.trainer_send_weights(iter(tensors), args)
    except BaseException:
        # Close the engine's update session, or the next start_weight_update is refused as "already active".
        # If the engine's own update_weights raised, it has closed the session itself and this raises too.
        with contextlib.suppress(Exception):
            call_engine("finish_weight_update", {})
        raise
    call_engine("finish_weight_update", {})
