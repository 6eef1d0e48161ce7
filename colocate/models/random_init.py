"""A checkpoint with random weights of a real model's shapes, for system runs without downloads:

    python -m colocate.models.random_init --shapes qwen2.5-1.5b --out /tmp/qwen-random

Writes config.json + model.safetensors (random normal, std 0.02; norm scales 1 + that noise, so activations
keep their size through the layers and greedy decoding is not a run of near-ties) from
`colocate/bench/shapes/<shapes>`, and
the tiny model's tokenizer (its ids are all below any real vocabulary size), so engines, policy and tasks
load it like any local HF checkpoint.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def build(shapes: str, out: str | Path, *, dtype: str = "bfloat16", seed: int = 0, device: str = "cpu") -> Path:
    """`device="cuda"` draws the weights on the GPU: seconds instead of minutes for 8B shapes."""
    import transformers

    from colocate.bench.model_shapes import resolve_model
    from colocate.models.tiny import build_tiny_model

    out = Path(out)
    config_dir, _ = resolve_model(shapes)
    cfg = transformers.AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.02)
    model.save_pretrained(out)
    with tempfile.TemporaryDirectory() as tmp:
        tok = transformers.AutoTokenizer.from_pretrained(build_tiny_model(Path(tmp) / "tiny"))
        tok.save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    print(build(a.shapes, a.out, dtype=a.dtype, device=a.device))


if __name__ == "__main__":
    main()
