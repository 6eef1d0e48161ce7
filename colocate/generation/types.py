"""What generation takes and returns: sampling options in, one `Rollout` per (prompt, sample) out.

Shape legend: P = prompt tokens, R = response tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from colocate.generation.errors import SamplingOptionError

# A prompt is token ids, a text, or (with `chat=True`) a list of chat messages {"role": ..., "content": ...}.
Prompt = list[int] | str | list[dict[str, str]]


@dataclass(frozen=True)
class SamplingConfig:
    """The sampling options every generation call takes, validated once on the driver."""

    temperature: float = 1.0
    """0 is greedy."""
    top_p: float = 1.0
    max_tokens: int = 64
    """At most this many response tokens; fewer where `max_model_len` is reached first."""
    n: int = 1
    """Samples per prompt."""
    stop: tuple[str, ...] = ()
    """Strings that end a response (not included in it)."""
    seed: int | None = None
    """Prompt i (in the whole batch) is sampled with seed `seed + i`, so results do not depend on how the
    batch is sharded over workers. None: not reproducible."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise SamplingOptionError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SamplingOptionError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1 or self.n < 1:
            raise SamplingOptionError(f"max_tokens and n must be >= 1, got {self.max_tokens} and {self.n}")
        if self.temperature == 0 and self.n > 1:  # vLLM refuses it: the n samples would be one sample n times
            raise SamplingOptionError(f"greedy sampling (temperature=0) takes n=1, got n={self.n}")
        if isinstance(self.stop, str):  # a bare string would be iterated per character
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> SamplingConfig:
        """Build from keyword options; an unknown key raises `SamplingOptionError` naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise SamplingOptionError(f"unknown sampling option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)


@dataclass
class Rollout:
    """One sampled response to one prompt, with the weight version that produced every one of its tokens."""

    prompt_ids: list[int]
    """[P]"""
    response_ids: list[int]
    """[R]: the sampled tokens, EOS included where generation stopped at it."""
    logprobs: list[float]
    """[R]: log-probability of each sampled token under the raw model distribution (vLLM's default
    `logprobs_mode="raw_logprobs"`: before temperature and top-p), as the policy computes it."""
    finish_reason: str
    """"stop" (EOS or a stop string), "length" (max_tokens or max_model_len), or "abort"."""
    weight_version: int
    """How many refits the engine had completed when this response was generated."""
    prompt_index: int
    """Index of the prompt in the batch given to the group."""
    sample_index: int
    """0..n-1 among the samples of this prompt."""
    response_text: str = ""
    cached_tokens: int = 0
    """Of the prompt's tokens, how many had their KV read from vLLM's prefix cache (whole blocks only)."""
