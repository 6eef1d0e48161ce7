"""Which model families a refit is proven exact for, and the refusal of every other one before a run starts.

Each architecture here is covered by `tests/test_model_zoo.py` (CPU, both transports: after a refit of
perturbed weights the engine's greedy tokens equal HF transformers' on the policy's weights). Another
architecture may well work, but nothing has shown it: `python -m colocate.check DIR --refit` is how to find
out, and `allow_unverified=True` (`model.allow_unverified=true`) how to run it anyway. Whatever the family,
the engine still checks every refit's manifest against its own loader before any bucket moves.
"""

from __future__ import annotations

from typing import Any

from colocate.models.errors import UnsupportedModelError

VERIFIED_ARCHITECTURES = frozenset({
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Phi3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
})


def check_supported(hf_config: Any, *, allow_unverified: bool = False) -> None:
    """Raise UnsupportedModelError unless the checkpoint's architecture is one the refit is verified for."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs:
        raise UnsupportedModelError("config.json names no architecture (\"architectures\" is empty)")
    unknown = [a for a in archs if a not in VERIFIED_ARCHITECTURES]
    if unknown and not allow_unverified:
        raise UnsupportedModelError(
            f"architecture {', '.join(unknown)} is not verified for exact refit (verified: "
            f"{', '.join(sorted(VERIFIED_ARCHITECTURES))}); `python -m colocate.check DIR --refit` tests it, "
            "model.allow_unverified=true runs it anyway")
