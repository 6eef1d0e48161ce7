"""Do the engines decode as HF transformers does on the policy's weights?  The comparison behind
`colocate.check --refit` and behind a run's `refit.verify_every`.

A run's check, after the refit of a step (`verify_refit`):
1. every engine decodes the same few prompts greedily (each engine: a wrong weight may sit in one only);
2. the policy exports its current weights to HF safetensors in the engine's dtype (a collective; rank 0
   writes), and rank 0 loads them into HF transformers on its own device and decodes the prompts greedily
   too, and scores each engine's tokens teacher-forced;
3. `compare`: each engine's tokens must equal HF's, or part from them only at a near-tie (HF's own choice
   beats the engine's by no more than the logprob tolerance: rounding decides those, and random-weight models
   have many), and the logprobs of the engine's tokens must be HF's within the tolerance. A weight the refit
   got wrong moves them by whole nats (a Qwen3-MoE refit with fused expert names: 8.2). Otherwise
   `RefitVerifyError`, naming the engine, the prompt and the numbers.

HF runs with eager attention: the reference implementation (sdpa drops Gemma2's attention-logit
soft-capping). Greedy is plain, as the engine decodes: no penalty a checkpoint's generation_config may set.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from colocate.refit.errors import RefitError

# Teacher-forced logprobs of the engine's tokens against HF's, per dtype the engine computes in; ten times
# that on GPU, where vLLM's kernels round differently (Qwen2.5-1.5B shapes, fp32, H200: 4.6e-3).
LOGPROB_TOL = {"float32": 2e-3, "bfloat16": 0.1, "float16": 0.05}


class RefitVerifyError(RefitError):
    """After a refit, an engine decodes otherwise than HF transformers on the policy's weights: a weight
    reached the engine wrong (or not at all)."""


def tolerance(dtype: str, device: str) -> float:
    return LOGPROB_TOL[dtype] * (10 if device == "cuda" else 1)


# ------------------------------------------------------------------------------------------------ HF side
def load_hf(model_dir: str, dtype: torch.dtype, device: str | torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    return model.to(device).eval()


@torch.no_grad()
def hf_greedy(model: Any, prompt_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy responses, one prompt at a time (no padding), stopping at EOS as vLLM does."""
    device = next(model.parameters()).device
    out = []
    for ids in prompt_ids:
        x = torch.tensor([ids], device=device)
        y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_tokens,
                           repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
                           pad_token_id=model.config.eos_token_id)
        out.append(y[0, len(ids):].tolist())
    return out


@torch.no_grad()
def hf_scores(model: Any, prompt_ids: list[list[int]], responses: list[list[int]]
              ) -> tuple[list[list[float]], list[list[float]]]:
    """HF's logprobs of `responses` (teacher-forced), and HF's top logprob at each of those positions (how far
    each response token was from HF's own choice)."""
    device = next(model.parameters()).device
    logprobs, top = [], []
    for ids, resp in zip(prompt_ids, responses, strict=True):
        if not resp:
            logprobs.append([])
            top.append([])
            continue
        full = torch.tensor([ids + resp], device=device)
        lp_RV = torch.log_softmax(model(full).logits[0, len(ids) - 1:-1].float(), -1)
        logprobs.append(lp_RV.gather(-1, torch.tensor(resp, device=device)[:, None])[:, 0].tolist())
        top.append(lp_RV.max(-1).values.tolist())
    return logprobs, top


# ---------------------------------------------------------------------------------------------- verdicts
def tie_gap(engine: list[int], hf: list[int], hf_lp: list[float], hf_top: list[float]) -> float:
    """At the first token where the engine's greedy output leaves HF's, HF's top logprob minus HF's logprob of
    the engine's token (0: a dead heat); inf if one output is a prefix of the other (a length difference)."""
    for i, (a, b) in enumerate(zip(engine, hf, strict=False)):
        if a != b:
            return hf_top[i] - hf_lp[i]
    return float("inf")


@dataclass
class Verdict:
    prompts: int
    greedy_equal: int
    near_ties: int
    max_logprob_diff: float
    max_divergence_gap: float  # 0.0 where every prompt was equal
    tol: float
    first_difference: str  # "" where none

    @property
    def ok(self) -> bool:
        return self.greedy_equal + self.near_ties == self.prompts and self.max_logprob_diff <= self.tol


def compare(engine: list[list[int]], engine_lp: list[list[float]], hf: list[list[int]],
            hf_lp: list[list[float]], hf_top: list[list[float]], tol: float) -> Verdict:
    """One engine's greedy tokens and their logprobs against HF's (`hf_lp`, `hf_top`: HF's scores of the
    engine's tokens, from `hf_scores`)."""
    diff, first = 0.0, ""
    for i, (x, y) in enumerate(zip(engine_lp, hf_lp, strict=True)):
        for j, (a, b) in enumerate(zip(x, y, strict=True)):
            if abs(a - b) > diff:
                diff = abs(a - b)
            if abs(a - b) > tol and not first:
                first = f"prompt {i} token {j}: engine logprob {a:.4g}, HF {b:.4g}"
    gaps = []
    for i, (e, h, lp, t) in enumerate(zip(engine, hf, hf_lp, hf_top, strict=True)):
        if e != h:
            gaps.append(g := tie_gap(e, h, lp, t))
            if g > tol and not first:
                first = f"prompt {i}: engine {e[:12]} vs HF {h[:12]} (HF prefers its token by {g:.3g} nats)"
    return Verdict(prompts=len(engine), greedy_equal=sum(e == h for e, h in zip(engine, hf, strict=True)),
                   near_ties=sum(g <= tol for g in gaps), max_logprob_diff=float(f"{diff:.3g}"),
                   max_divergence_gap=float(f"{max(gaps):.3g}") if gaps else 0.0, tol=tol, first_difference=first)


# ------------------------------------------------------------------------------------------- in a run
def _scratch_dir(worker: Any) -> str:
    # On rank 0's node, which writes the export and reads it back (the driver may be on another node).
    return tempfile.mkdtemp(prefix="colocate-verify-")


def _hf_on_rank(worker: Any, model_dir: str, dtype: str, prompt_ids: list[list[int]], max_tokens: int,
                responses_E: list[list[list[int]]]) -> dict[str, Any]:
    """On policy rank 0: HF on the exported weights, on the rank's device; the export is removed after."""
    try:
        model = load_hf(model_dir, getattr(torch, dtype), worker.device)
        greedy = hf_greedy(model, prompt_ids, max_tokens)
        scores = [hf_scores(model, prompt_ids, responses) for responses in responses_E]
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"greedy": greedy, "logprobs_E": [s[0] for s in scores], "top_E": [s[1] for s in scores]}
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)


def check_engines(policy: Any, generation: Any, *, prompt_ids: list[list[int]], max_tokens: int, dtype: str,
                  device: str) -> list[Verdict]:
    """Each engine's verdict against HF transformers on the policy's current weights (module docstring)."""
    rollouts_E = generation.generate_each(prompt_ids, temperature=0.0, max_tokens=max_tokens, n=1)
    responses_E = [[list(r.response_ids) for r in rollouts] for rollouts in rollouts_E]
    model_dir = policy.call_rank0(_scratch_dir)
    policy.export_hf(model_dir, getattr(torch, dtype))
    hf = policy.call_rank0(_hf_on_rank, model_dir, dtype, prompt_ids, max_tokens, responses_E)
    tol = tolerance(dtype, device)
    return [compare(responses, [list(r.logprobs) for r in rollouts], hf["greedy"], lp, top, tol)
            for responses, rollouts, lp, top in zip(responses_E, rollouts_E, hf["logprobs_E"], hf["top_E"],
                                                    strict=True)]


def verify_refit(policy: Any, generation: Any, *, prompt_ids: list[list[int]], max_tokens: int, dtype: str,
                 device: str, step: int) -> dict[str, float]:
    """`check_engines` in a run: metrics verify_*, or `RefitVerifyError` for the first engine that differs."""
    t0 = time.perf_counter()
    verdicts = check_engines(policy, generation, prompt_ids=prompt_ids, max_tokens=max_tokens, dtype=dtype,
                             device=device)
    for index, v in enumerate(verdicts):
        if not v.ok:
            raise RefitVerifyError(
                f"step {step}: engine {index} decodes otherwise than HF transformers on the policy's weights "
                f"after the refit: {v.greedy_equal} of {v.prompts} greedy outputs equal, {v.near_ties} near-ties, "
                f"logprobs within {v.max_logprob_diff} of HF's (tolerance {v.tol}); first: {v.first_difference}",
                side="receiver")
    return {"verify_prompts": sum(v.prompts for v in verdicts),
            "verify_greedy_equal": sum(v.greedy_equal for v in verdicts),
            "verify_near_ties": sum(v.near_ties for v in verdicts),
            "verify_max_logprob_diff": max(v.max_logprob_diff for v in verdicts),
            "verify_s": time.perf_counter() - t0}
