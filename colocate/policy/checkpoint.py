"""Checkpoints of an FSDP2 policy: sharded resume checkpoints (DCP) and HF exports.

A resume checkpoint is one `torch.distributed.checkpoint` directory holding the model, the AdamW state,
the LR scheduler and the step count. Every rank writes its own shards, so `path` must be on a filesystem
all ranks share, and a checkpoint can be loaded into a different world size (DCP reshards on load). Beside
the shards each rank keeps its RNG states (`rng_rank{r}.json`): those belong to a rank, not to a tensor DCP
could reshard, and a rank that is not there on load (another world size) keeps its own.

An HF export is what `AutoModelForCausalLM.from_pretrained` and vLLM read: safetensors in HF names, the
config (with the original architecture name, not FSDP's generated subclass), the generation config, and
the tokenizer files copied from the model the policy started from. Rank 0 writes it; the gathered weights
pass through rank 0's CPU memory one tensor at a time on their way into the state dict.
"""

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from huggingface_hub import save_torch_state_dict
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from colocate.policy.weights import iter_full_weights
from colocate.rng import rng_state, set_rng_state

# Files of an HF model directory that the export writes itself; everything else (tokenizer, chat template)
# is copied from the source directory.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_WRITTEN_FILES = {"config.json", "generation_config.json", "model.safetensors.index.json"}


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
) -> None:
    """Write model, optimizer, scheduler and step to the DCP directory `path` (a collective)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {
        "model": model_sd,
        "optimizer": optim_sd,
        "trainer": {"step": step, "scheduler": scheduler.state_dict()},
    }
    dcp.save(state, checkpoint_id=str(path))


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> int:
    """Load a checkpoint written by `save_checkpoint` in place (a collective); returns its step."""
    # The state dicts of the live objects are the templates DCP loads into (names, shapes, shardings).
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {
        "model": model_sd,
        "optimizer": optim_sd,
        "trainer": {"step": 0, "scheduler": scheduler.state_dict()},
    }
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    scheduler.load_state_dict(state["trainer"]["scheduler"])
    return int(state["trainer"]["step"])


def save_rng(path: str | Path, rank: int) -> None:
    """This rank's python / numpy / torch RNG states, beside the checkpoint's shards."""
    (Path(path) / f"rng_rank{rank}.json").write_text(json.dumps(rng_state()))


def load_rng(path: str | Path, rank: int) -> bool:
    """Restore what `save_rng` wrote for this rank; False where it wrote nothing (an older checkpoint, or a
    rank beyond the world size that saved it)."""
    file = Path(path) / f"rng_rank{rank}.json"
    if not file.is_file():
        return False
    set_rng_state(json.loads(file.read_text()))
    return True


def export_hf(
    path: str | Path,
    *,
    model: nn.Module,
    architecture: str,
    source_path: str | Path,
    rank: int,
    dtype: torch.dtype | None = None,
    max_shard_size: str = "5GB",
) -> None:
    """Write an HF checkpoint of the full model to `path` on rank 0 (a collective: every rank must call it).

    `architecture` is the class name of the unwrapped HF model (e.g. "Qwen2ForCausalLM").
    """
    state_dict: dict[str, torch.Tensor] = {}
    for name, tensor in iter_full_weights(model, dtype):
        if rank == 0:
            state_dict[name] = tensor.to("cpu", copy=True)  # its own storage: MoE parts are views of one tensor
    if rank == 0:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        save_torch_state_dict(state_dict, out, max_shard_size=max_shard_size)
        config = copy.deepcopy(model.config)
        config.architectures = [architecture]
        config.dtype = dtype or next(iter(state_dict.values())).dtype
        config.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
        for item in Path(source_path).iterdir():
            if (
                item.is_file()
                and item.name not in _WRITTEN_FILES
                and not item.name.endswith(_WEIGHT_SUFFIXES)
            ):
                shutil.copy2(item, out / item.name)
    dist.barrier()
