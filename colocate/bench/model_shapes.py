"""Which tensors a refit moves for a model: HF names, shapes and dtype, from a config alone.

`--model` takes `tiny` (built here), a shape set shipped in `colocate/bench/shapes/` (`llama3-8b`,
`qwen2.5-1.5b`, `qwen3-30b-a3b-12l`: Qwen3-30B-A3B cut to 12 of its 48 layers, 128 experts each; configs
only, for engines with `load_format="dummy"`), or a local HF directory.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

SHAPES = Path(__file__).parent / "shapes"


def resolve_model(model: str) -> tuple[Path, bool]:
    """(directory with config.json, whether it holds weights)."""
    if model == "tiny":
        from colocate.models.tiny import build_tiny_model

        return build_tiny_model(Path(tempfile.mkdtemp(prefix="colocate-tiny-")), seed=0), True
    path = SHAPES / model if (SHAPES / model).is_dir() else Path(model)
    if not (path / "config.json").exists():
        known = sorted(p.name for p in SHAPES.iterdir())
        raise FileNotFoundError(f"--model {model!r}: no config.json there (shape sets: tiny, {', '.join(known)})")
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    return path, has_weights


def param_meta(model_dir: Path, dtype: torch.dtype) -> list[tuple[str, tuple[int, ...]]]:
    """Checkpoint names and shapes of what a policy streams, built on the meta device: tied weights appear
    once, MoE experts one tensor per expert and projection (`policy.weights.weights_manifest`)."""
    import transformers

    from colocate.policy.weights import weights_manifest

    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return [(n, tuple(s)) for n, s, _ in weights_manifest(model, dtype)]
