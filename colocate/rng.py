"""A process's random number generators (python, numpy, torch CPU and CUDA) as JSON-ready data, and back:
what a checkpoint keeps of the driver and of each policy rank, so that a resumed run draws what the
uninterrupted one would have drawn.

torch states are byte tensors, kept as base64 text; numpy's key array as a list of ints.
"""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch


def _b64(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def generator_state(generator: torch.Generator) -> str:
    return _b64(generator.get_state())


def set_generator_state(generator: torch.Generator, state: str) -> None:
    generator.set_state(_unb64(state))


def rng_state() -> dict[str, Any]:
    version, key, gauss = random.getstate()
    name, np_key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": [version, list(key), gauss],
        "numpy": [name, np_key.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, key, gauss = state["python"]
    random.setstate((version, tuple(key), gauss))
    name, np_key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(np_key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
