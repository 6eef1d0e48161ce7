"""The training driver: warm-up, GRPO steps, validation, checkpoints, metrics. `run.py` calls `train`."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from colocate.algorithms.grpo import GRPO
from colocate.cluster import Cluster
from colocate.config import Config
from colocate.data.build import build_problems
from colocate.data.problem import Problem
from colocate.metrics import MetricsLogger, plot_rewards, plot_step_time
from colocate.rewards.pool import Item, RewardPool

log = logging.getLogger(__name__)


def _set_lr(worker: Any, lr: float) -> None:
    # The schedule multiplies base_lrs; the warm-up and the RL phase each set their own.
    worker.scheduler.base_lrs = [lr for _ in worker.scheduler.base_lrs]
    worker.scheduler._last_lr = [lr for _ in worker.scheduler.base_lrs]
    for group in worker.optimizer.param_groups:
        group["lr"] = lr


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
    summary: dict[str, Any] = {"val_accuracy_initial": grpo.validate()}
    bar = not cfg.logging.progress

    if a.sft_steps:
        cluster.policy.execute(_set_lr, a.sft_lr)
        for i in tqdm(range(a.sft_steps), desc="warm-up (SFT)", disable=bar):
            out = grpo.sft_step()
            if i % 10 == 0 or i == a.sft_steps - 1:
                metrics.log(-a.sft_steps + i, {"sft_nll": out["nll"]})
        cluster.policy.execute(_set_lr, cfg.policy.lr)
        cluster.refit()
    start = grpo.validate()
    summary["val_accuracy_start"] = start
    metrics.log(0, {"val_accuracy": start})
    log.info("held-out accuracy before RL: %.3f", start)

    t0 = time.perf_counter()
    samples = (out_dir / "samples.jsonl").open("a")  # one rollout per step: what the engine got, what it said
    for step in (pbar := tqdm(range(1, a.steps + 1), desc="GRPO", disable=bar)):
        m = grpo.step(step)
        samples.write(json.dumps({"step": step, **m.pop("sample")}) + "\n")
        samples.flush()
        m["reward_timeouts"] = pool.timeouts
        if step == a.steps or (a.val_every and step % a.val_every == 0):  # always a final held-out score
            m["val_accuracy"] = grpo.validate()
        if a.checkpoint_every and step % a.checkpoint_every == 0:
            cluster.policy.save_checkpoint(str(out_dir / "checkpoints" / f"step_{step:05d}"))
        m["weight_version"] = min(cluster.generation.weight_versions())
        metrics.log(step, m)
        pbar.set_postfix(reward=f"{m['reward_mean']:.2f}", val=m.get("val_accuracy", ""),
                         refit_ms=f"{m['refit_ms']:.0f}")
    summary["val_accuracy_end"] = m.get("val_accuracy") if a.steps else start
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
