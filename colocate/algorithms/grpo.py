"""GRPO, readable top to bottom: sample n completions per prompt, score them, normalise rewards within each
prompt's group, take one clipped policy-gradient step, refit the engines, repeat.

How it departs from the textbook:
- One optimizer step per batch, so the importance ratio starts at 1 and clipping only guards the step itself;
  `old_logprobs` are the policy's own (not the engine's sampling logprobs), which keeps the ratio exact
  when engine and trainer numerics differ.
- An optional supervised warm-up on the task's format (`sft_steps`) before RL, so that a tiny model from
  scratch gets some non-zero rewards; its loss is the same clipped objective with advantage 1 on the reference
  completion (a plain log-likelihood gradient at ratio 1).
- A group whose rewards are all equal has zero advantage and adds nothing but tokens to the loss average.

Shape legend: P prompts, G samples per prompt, B = P*G sequences, T tokens per sequence.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from colocate.data.problem import DataError, Problem

# (completions, the problems they answer) -> one reward each; `train.py` passes a `RewardPool`'s.
Score = Callable[[list[str], list[Problem]], list[float]]


@dataclass
class Batch:
    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    response_mask_BT: torch.Tensor


def pack_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Batch:
    """Right-padded prompt+response; response_mask marks response tokens in the `logprobs` layout
    (column t is log p(token t | tokens before it))."""
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    resp = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        resp[i, len(p): len(s)] = 1
    return Batch(ids, attn, resp)


def group_advantages(rewards_PG: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean over the group) / (std over the group + eps); zero where the group's rewards are equal."""
    mean = rewards_PG.mean(dim=1, keepdim=True)
    std = rewards_PG.std(dim=1, keepdim=True, unbiased=False)
    return (rewards_PG - mean) / (std + eps)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c are correct (Chen et al. 2021): the chance
    that k of them drawn without replacement include a correct one, 1 - C(n-c, k) / C(n, k)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(correct_by_prompt: list[list[bool]], k: int) -> float:
    """pass@k averaged over prompts, each from its own samples' correctness."""
    return statistics.fmean(pass_at_k(len(row), sum(row), k) for row in correct_by_prompt)


@contextmanager
def timed(metrics: dict[str, Any], key: str) -> Iterator[None]:
    """metrics[key] = the seconds the block took."""
    start = time.perf_counter()
    yield
    metrics[key] = time.perf_counter() - start


class GRPO:
    def __init__(self, *, policy: Any, generation: Any, refit: Callable[[], dict[str, float]], tokenizer: Any,
                 score: Score, train: list[Problem], val: list[Problem], prompts_per_step: int, samples_per_prompt: int,
                 temperature: float, top_p: float, max_new_tokens: int, seed: int,
                 sleep: bool = False, sleep_level: int = 1, offload: bool = False, kl: bool = False) -> None:
        """`kl`: the policy holds a frozen reference model; its per-token logprobs enter the loss's KL term."""
        self.policy, self.generation, self.refit = policy, generation, refit
        self.tok = tokenizer
        self.score = score
        self.train, self.val = train, val
        self.P, self.G = prompts_per_step, samples_per_prompt
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.sleep, self.sleep_level, self.offload = sleep, sleep_level, offload
        self.kl = kl
        self.rng = torch.Generator().manual_seed(seed)
        # Sampling seeds: prompt i of step s is seeded (seed << 40) + (s << 20) + i, unique per (run seed, step,
        # prompt). Seeding step s with s alone gave prompt i of step s the seed of prompt i - 1 of step s + 1: the
        # same random stream again, the same completions for a prompt drawn twice.
        if prompts_per_step >= 1 << 20:
            raise ValueError(f"prompts_per_step must be below {1 << 20}, got {prompts_per_step}")
        self.seed = seed
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos

    def check_prompt_lengths(self, max_model_len: int) -> None:
        """Refuse, before the first step, a prompt that leaves no room for `max_new_tokens` in the engine."""
        for p in (*self.train, *self.val):
            n = len(self.encode([p])[0])
            if n + self.max_new_tokens > max_model_len:
                raise DataError(f"row {p.index} has a prompt of {n} tokens: with algorithm.max_new_tokens="
                                f"{self.max_new_tokens} it does not fit generation.max_model_len={max_model_len}",
                                subject="generation.max_model_len")

    def encode(self, problems: list[Problem]) -> list[list[int]]:
        return [self.tok(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]

    def _sample_problems(self, n: int) -> list[Problem]:
        idx = torch.randint(len(self.train), (n,), generator=self.rng).tolist()
        return [self.train[i] for i in idx]

    # ---- supervised warm-up ---------------------------------------------------------------------------
    def sft_step(self) -> dict[str, float]:
        problems = self._sample_problems(self.P * self.G)
        completions = [self.tok(" " + p.answer, add_special_tokens=False)["input_ids"] + [self.eos]
                       for p in problems]
        b = pack_sequences(self.encode(problems), completions, self.pad)
        old = self.policy.logprobs(b.input_ids_BT, b.attention_mask_BT)
        out = self.policy.train_step({
            "input_ids": b.input_ids_BT, "attention_mask": b.attention_mask_BT,
            "response_mask": b.response_mask_BT, "old_logprobs": old,
            "advantages": torch.ones(b.input_ids_BT.shape[0]),
        })
        mask = b.response_mask_BT.bool()
        out["nll"] = -(old[mask].mean().item())  # of the reference completion, before this step
        return out

    # ---- validation -----------------------------------------------------------------------------------
    def evaluate(self, samples: int = 0) -> dict[str, float]:
        """Held-out scores. `val_accuracy`: the greedy completions' mean reward; `val_pass@1`: the share of
        prompts whose greedy completion is correct (reward > 0; the same number for 0/1 rewards); with
        `samples` = k > 1, `val_pass@k`: pass@k from k completions per prompt sampled at the run's temperature
        and top_p, from fixed seeds (so evaluations differ only by the weights)."""
        prompts = self.encode(self.val)
        correct, rewards = self._correct_by_prompt(prompts, n=1, temperature=0.0, top_p=1.0)
        out = {"val_accuracy": statistics.fmean(row[0] for row in rewards), "val_pass@1": mean_pass_at_k(correct, 1)}
        if samples > 1:
            correct, _ = self._correct_by_prompt(prompts, n=samples, temperature=self.temperature, top_p=self.top_p)
            out[f"val_pass@{samples}"] = mean_pass_at_k(correct, samples)
        return out

    def _correct_by_prompt(self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float
                           ) -> tuple[list[list[bool]], list[list[float]]]:
        """n completions of every held-out prompt: per prompt, whether each is correct, and its reward."""
        rollouts = self.generation.generate(prompts, n=n, temperature=temperature, top_p=top_p,
                                            max_tokens=self.max_new_tokens, stop=None, seed=0)
        texts = [self.tok.decode(r.response_ids, skip_special_tokens=True) for r in rollouts]
        rewards = self.score(texts, [self.val[r.prompt_index] for r in rollouts])
        rewards_by_prompt: list[list[float]] = [[] for _ in self.val]
        for r, reward in zip(rollouts, rewards, strict=True):
            rewards_by_prompt[r.prompt_index].append(reward)
        return [[reward > 0 for reward in row] for row in rewards_by_prompt], rewards_by_prompt

    # ---- one RL step ----------------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, Any]:
        """One RL step. Timed parts: generation_s, reward_s, training_s (with the policy's onload), refit_ms,
        sleep_s, wake_weights_s, wake_kv_s (sleep_wake_s: their sum), offload_s; step_s is the whole, and
        refit_share = (refit + sleep/wake) / step; reference_s (inside training_s) with the KL term.
        `sample`: the first rollout (prompt ids as the engine got them, prompt text, completion, answer,
        reward)."""
        m: dict[str, Any] = {}
        step_start = time.perf_counter()
        problems = self._sample_problems(self.P)
        with timed(m, "generation_s"):
            rollouts = self.generation.generate(self.encode(problems), n=self.G, temperature=self.temperature,
                                                top_p=self.top_p, max_tokens=self.max_new_tokens, stop=None,
                                                seed=(self.seed << 40) + (step << 20))
        responses = [list(r.response_ids) for r in rollouts]
        n_tokens = sum(len(r) for r in responses)
        m["tokens_per_s"] = n_tokens / m["generation_s"]
        # Of the prompt tokens, the share whose KV vLLM's prefix cache served (a group's samples share whole
        # blocks of their prompt; 0 for prompts shorter than a block).
        m["prompt_cached_share"] = sum(r.cached_tokens for r in rollouts) / max(sum(len(r.prompt_ids)
                                                                                  for r in rollouts), 1)
        texts = [self.tok.decode(r, skip_special_tokens=True) for r in responses]
        with timed(m, "reward_s"):
            rewards_B = self.score(texts, [problems[i // self.G] for i in range(len(texts))])
        rewards_PG = torch.tensor(rewards_B).view(self.P, self.G)
        advantages_B = group_advantages(rewards_PG).view(-1)
        m["reward_mean"] = rewards_PG.mean().item()
        m["reward_std"] = rewards_PG.std(unbiased=False).item()
        m["accuracy"] = (rewards_PG.amax(dim=1) > 0).float().mean().item()  # pass@G over the batch
        m["weight_version"] = min(r.weight_version for r in rollouts)
        # One rollout as the engine saw it (its prompt token ids) and as it was scored, for samples.jsonl.
        first = rollouts[0]
        m["sample"] = {"prompt_ids": list(first.prompt_ids), "prompt": self.tok.decode(first.prompt_ids),
                       "completion": texts[0], "answer": problems[0].answer, "reward": rewards_B[0]}

        if self.sleep:
            with timed(m, "sleep_s"):
                self.generation.sleep(level=self.sleep_level)
        with timed(m, "training_s"):
            if self.offload:
                self.policy.onload()
            prompts = [list(r.prompt_ids) for r in rollouts]
            b = pack_sequences(prompts, responses, self.pad)
            old_BT = self.policy.logprobs(b.input_ids_BT, b.attention_mask_BT)
            batch = {"input_ids": b.input_ids_BT, "attention_mask": b.attention_mask_BT,
                     "response_mask": b.response_mask_BT, "old_logprobs": old_BT, "advantages": advantages_B}
            if self.kl:
                with timed(m, "reference_s"):  # the reference's cost: one more forward pass of the batch
                    batch["ref_logprobs"] = self.policy.reference_logprobs(b.input_ids_BT, b.attention_mask_BT)
            train = self.policy.train_step(batch)
        m.update({k: train[k] for k in ("loss", "kl", "clip_frac", "grad_norm", "lr", "reference_gb", "policy_peak_gb")
                  if k in train})

        if self.sleep:
            with timed(m, "wake_weights_s"):  # weights first: the KV cache comes back after the refit
                self.generation.wake_up(tags=["weights"])
        m.update(self.refit())
        if self.offload:
            with timed(m, "offload_s"):
                self.policy.offload(include_params=True)
        if self.sleep:
            with timed(m, "wake_kv_s"):
                self.generation.wake_up(tags=["kv_cache"])
        sleep_s = sum(m.get(k, 0.0) for k in ("sleep_s", "wake_weights_s", "wake_kv_s"))
        m["sleep_wake_s"] = sleep_s
        m["step_s"] = time.perf_counter() - step_start
        m["refit_share"] = (m["refit_ms"] / 1e3 + sleep_s) / m["step_s"]
        return m
