"""What `colocate.run` checks of a Megatron-core policy before Ray or any actor starts.

`check_available` needs nothing but the config: it runs first, so a machine without megatron-core fails in about
a second (no torch import, no model built). `check_model_layout` then reads the checkpoint's config.json and
refuses shapes that the parallel sizes do not divide, or a model the conversion does not cover.
"""

from __future__ import annotations

import importlib.util

from colocate.policy.megatron.errors import MegatronUnavailableError

MEGATRON_CORE_VERSION = "0.19.2"  # the GPU machines' bundle (../shared/device/wheels.txt)


def unavailable_reason(device: str) -> str | None:
    """Why a Megatron-core policy cannot run here (one line), or None."""
    try:
        found = importlib.util.find_spec("megatron.core") is not None
    except ModuleNotFoundError:  # no top-level `megatron` package at all
        found = False
    if not found:
        return (f"megatron-core is not installed (`import megatron.core` fails; the backend is written for "
                f"megatron-core=={MEGATRON_CORE_VERSION}, which the GPU machines carry)")
    if device != "cuda":
        return f"placement.device={device!r}: Megatron-core's model code runs on CUDA only"
    import torch

    if not torch.cuda.is_available():
        return "CUDA is not available (Megatron-core's model code needs it)"
    return None


def check_available(device: str) -> None:
    reason = unavailable_reason(device)
    if reason is not None:
        raise MegatronUnavailableError(reason)


def check_model_layout(model_path: str, *, tp_size: int, pp_size: int, world_size: int) -> None:
    """`MegatronModelError` / `MegatronLayoutError` unless the checkpoint converts and divides over tp and pp."""
    from transformers import AutoConfig

    from colocate.policy.megatron.convert import dims_from_hf_config
    from colocate.policy.megatron.layout import check_divisible

    dims = dims_from_hf_config(AutoConfig.from_pretrained(model_path))
    check_divisible(num_heads=dims.num_heads, num_kv_heads=dims.num_kv_heads,
                    intermediate_size=dims.intermediate_size, vocab_size=dims.vocab_size,
                    num_layers=dims.num_layers, tp_size=tp_size, pp_size=pp_size, world_size=world_size)
