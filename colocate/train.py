"""The training driver: warm-up (or a resumed checkpoint), GRPO steps, validation, checkpoints, metrics.
`run.py` calls `train`."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from colocate import resume
from colocate.algorithms.grpo import GRPO
from colocate.cluster import Cluster
from colocate.config import Config
from colocate.data.build import build_problems
from colocate.data.problem import Problem
from colocate.metrics import MetricsLogger, plot_rewards, plot_step_time
from colocate.rewards.pool import Item, RewardPool
from colocate.verify import verify_refit

log = logging.getLogger(__name__)


def _set_lr(worker: Any, lr: float) -> None:
    # The schedule multiplies base_lrs; the warm-up and the RL phase each set their own.
    worker.scheduler.base_lrs = [lr for _ in worker.scheduler.base_lrs]
    worker.scheduler._last_lr = [lr for _ in worker.scheduler.base_lrs]
    for group in worker.optimizer.param_groups:
        group["lr"] = lr


def _suffixed(scores: dict[str, float], when: str) -> dict[str, float]:
    """`val_accuracy` -> `val_accuracy_start` etc.: the summary's names for held-out scores at `when`."""
    return {f"{key}_{when}": value for key, value in scores.items()}


def _verify(cfg: Config, cluster: Cluster, grpo: GRPO, step: int) -> dict[str, float]:
    """`refit.verify_every`: the engines against HF on the policy's weights, after this step's refit."""
    r, pol = cfg.refit, cfg.policy
    problems = (grpo.val or grpo.train)[:r.verify_prompts]
    if pol.offload:  # the export gathers the weights on the policy's devices
        cluster.policy.onload()
    try:
        return verify_refit(cluster.policy, cluster.generation, prompt_ids=grpo.encode(problems),
                            max_tokens=min(r.verify_max_tokens, cfg.algorithm.max_new_tokens),
                            dtype=cfg.generation.dtype, device=cfg.placement.device, step=step)
    finally:
        if pol.offload:
            cluster.policy.offload(include_params=True)


def train(cfg: Config, cluster: Cluster, out_dir: Path) -> dict[str, Any]:
    pool = RewardPool(cfg.reward.fn, workers=cfg.reward.workers, timeout_s=cfg.reward.timeout_s)
    try:
        return _train(cfg, cluster, out_dir, pool)
    finally:
        pool.close()


def _train(cfg: Config, cluster: Cluster, out_dir: Path, pool: RewardPool) -> dict[str, Any]:
    from transformers import AutoTokenizer

    a = cfg.algorithm
    tok = AutoTokenizer.from_pretrained(cluster.model_path)
    train_set, val_set = build_problems(cfg.data, tok)

    def score(texts: list[str], problems: list[Problem]) -> list[float]:
        return pool.score([Item(t, p.answer, p.row, p.index) for t, p in zip(texts, problems, strict=True)])

    grpo = GRPO(policy=cluster.policy, generation=cluster.generation, refit=cluster.refit, tokenizer=tok,
                score=score, train=train_set, val=val_set, prompts_per_step=a.prompts_per_step,
                samples_per_prompt=a.samples_per_prompt, temperature=a.temperature, top_p=a.top_p,
                max_new_tokens=a.max_new_tokens, seed=cfg.data.seed, sleep=cfg.generation.sleep,
                sleep_level=cfg.generation.sleep_level, offload=cfg.policy.offload,
                kl=cfg.policy.kl_coef > 0)
    grpo.check_prompt_lengths(cfg.generation.max_model_len)
    metrics = MetricsLogger(out_dir, tensorboard=cfg.logging.tensorboard)
    summary: dict[str, Any] = {} if a.resume_from else _suffixed(grpo.evaluate(a.eval_samples), "initial")
    bar = not cfg.logging.progress

    first_step = 1
    if a.resume_from:
        first_step = resume.load(a.resume_from, policy=cluster.policy, sampler=grpo.rng) + 1
        cluster.refit()  # the engines sample step N+1 from the loaded weights
        summary["resumed_from_step"] = first_step - 1
        log.info("resumed from %s: step %d is next", a.resume_from, first_step)
    if a.sft_steps and not a.resume_from:  # the checkpoint's weights had their warm-up
        cluster.policy.execute(_set_lr, a.sft_lr)
        for i in tqdm(range(a.sft_steps), desc="warm-up (SFT)", disable=bar):
            out = grpo.sft_step()
            if i % 10 == 0 or i == a.sft_steps - 1:
                metrics.log(-a.sft_steps + i, {"sft_nll": out["nll"]})
        cluster.policy.execute(_set_lr, cfg.policy.lr)
        cluster.refit()
    start = grpo.evaluate(a.eval_samples)
    summary.update(_suffixed(start, "start"))
    if not a.resume_from:  # a resumed run's start is its checkpoint's step, logged by the run that wrote it
        metrics.log(0, start)
    log.info("held-out accuracy before RL: %.3f", start["val_accuracy"])

    t0 = time.perf_counter()
    samples = (out_dir / "samples.jsonl").open("a")  # one rollout per step: what the engine got, what it said
    m: dict[str, Any] = start
    for step in (pbar := tqdm(range(first_step, a.steps + 1), desc="GRPO", disable=bar)):
        m = grpo.step(step)
        samples.write(json.dumps({"step": step, **m.pop("sample")}) + "\n")
        samples.flush()
        m["reward_timeouts"] = pool.timeouts
        if cfg.refit.verify_every and step % cfg.refit.verify_every == 0:
            m.update(_verify(cfg, cluster, grpo, step))
        if step == a.steps or (a.val_every and step % a.val_every == 0):  # always a final held-out score
            m.update(grpo.evaluate(a.eval_samples))
        if a.checkpoint_every and step % a.checkpoint_every == 0:
            resume.save(resume.checkpoint_dir(out_dir, step), policy=cluster.policy, step=step, sampler=grpo.rng,
                        backend=cfg.policy.backend)
        m["weight_version"] = min(cluster.generation.weight_versions())
        metrics.log(step, m)
        pbar.set_postfix(reward=f"{m['reward_mean']:.2f}", val=m.get("val_accuracy", ""),
                         refit_ms=f"{m['refit_ms']:.0f}")
    summary.update(_suffixed({k: v for k, v in m.items() if k.startswith("val_")}, "end"))
    summary["train_seconds"] = time.perf_counter() - t0
    summary["weight_version"] = min(cluster.generation.weight_versions())
    samples.close()
    metrics.close()
    if cfg.logging.plot:
        plot_rewards(metrics.path, out_dir / "reward_curve.png",
                     title=f"GRPO on {Path(cluster.model_path).name}: held-out accuracy "
                           f"{summary['val_accuracy_start']:.2f} -> {summary['val_accuracy_end']:.2f}")
        plot_step_time(metrics.path, out_dir / "step_time.png",
                       title=f"GRPO step time on {Path(cluster.model_path).name} ({cfg.placement.device})")
    return summary
