"""The Megatron-core policy backend (`policy=megatron`). Only `worker.py` imports megatron; `convert.py` (HF <->
Megatron tensors), `layout.py` (ranks, stages, divisibility) and `preflight.py` (the checks before start) are pure
and run on CPU."""
