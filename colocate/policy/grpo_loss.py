"""The GRPO policy loss, as a pure function of log-probabilities.

Per response token t of sequence b, with r = exp(logprobs - old_logprobs) and A = advantages_B[b]:

    pg_t  = -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A)          (PPO clipped surrogate)
    kl_t  = exp(ref - logprobs) - (ref - logprobs) - 1                        (k3 estimator of KL(pi || ref))
    l_t   = pg_t + kl_coef * kl_t

Aggregation over the response tokens (mask_BT == 1):

    token_mean           : sum_{b,t} l_t / N_tokens                 (every token weighs the same; DAPO)
    seq_mean_token_mean  : sum_b (sum_t l_t / len_b) / N_seqs        (every sequence weighs the same; the
                                                                      original GRPO paper)

How this departs from the textbook: the denominator can be passed in (`loss_denom`) instead of taken from
the batch, so that a batch cut into micro-batches and data-parallel ranks sums to exactly the loss of the
whole batch. `clip_low` and `clip_high` may differ ("clip-higher", DAPO), which lets rare tokens whose
probability rises gain more than the symmetric range would allow.

Masked-out positions are removed with `torch.where`, never multiplied by zero, so a NaN or inf in a padding
position (a fully masked attention row, a -inf logprob) cannot leak into the loss or its gradient.

Shape legend: B = sequences in the batch, T = tokens per sequence (prompt + response, padded).
"""

from typing import Literal

import torch

LossAgg = Literal["token_mean", "seq_mean_token_mean"]
LOSS_AGGS: tuple[str, ...] = ("token_mean", "seq_mean_token_mean")


def grpo_loss(
    *,
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    ref_logprobs_BT: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    loss_agg: LossAgg = "token_mean",
    loss_denom: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of one (micro-)batch and its metrics.

    `loss_denom` replaces the batch's own token count (token_mean) or sequence count (seq_mean_token_mean);
    leave it None for a whole batch on one process.

    Metrics are detached means over this batch's response tokens (`pg_loss`, `kl`, `clip_frac`,
    `ratio_mean`) plus `tokens`, the count they were taken over, so callers can weight them to combine
    micro-batches and ranks. `kl` is reported whenever `ref_logprobs_BT` is given, even with `kl_coef` 0.
    """
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    mask_BT = mask_BT.bool()
    zeros_BT = torch.zeros_like(logprobs_BT)
    advantages_BT = advantages_B.to(logprobs_BT.dtype).unsqueeze(-1).expand_as(logprobs_BT)

    # Clamp the log-ratio before exp: a stale or mismatched old logprob must not overflow to inf.
    log_ratio_BT = torch.where(mask_BT, logprobs_BT - old_logprobs_BT, zeros_BT).clamp(-20.0, 20.0)
    ratio_BT = torch.exp(log_ratio_BT)
    clipped_ratio_BT = ratio_BT.clamp(1.0 - clip_low, 1.0 + clip_high)
    surrogate_BT = ratio_BT * advantages_BT
    clipped_surrogate_BT = clipped_ratio_BT * advantages_BT
    pg_BT = -torch.minimum(surrogate_BT, clipped_surrogate_BT)
    # A token is "clipped" when the clipped branch won the min, i.e. its gradient is zero.
    clipped_BT = (clipped_surrogate_BT < surrogate_BT) & mask_BT

    per_token_BT = pg_BT
    kl_BT = zeros_BT
    if ref_logprobs_BT is not None:
        ref_log_ratio_BT = torch.where(mask_BT, ref_logprobs_BT - logprobs_BT, zeros_BT).clamp(-20.0, 20.0)
        kl_BT = torch.exp(ref_log_ratio_BT) - ref_log_ratio_BT - 1.0
        if kl_coef != 0.0:
            per_token_BT = pg_BT + kl_coef * kl_BT
    per_token_BT = torch.where(mask_BT, per_token_BT, zeros_BT)

    if loss_agg == "token_mean":
        denom = float(mask_BT.sum()) if loss_denom is None else loss_denom
        loss = per_token_BT.sum() / max(denom, 1.0)
    else:
        lengths_B = mask_BT.sum(-1).clamp(min=1).to(per_token_BT.dtype)
        denom = float(mask_BT.shape[0]) if loss_denom is None else loss_denom
        loss = (per_token_BT.sum(-1) / lengths_B).sum() / max(denom, 1.0)

    with torch.no_grad():
        tokens = mask_BT.sum().to(logprobs_BT.dtype)
        n = tokens.clamp(min=1.0)
        metrics = {
            "pg_loss": torch.where(mask_BT, pg_BT, zeros_BT).sum() / n,
            "kl": torch.where(mask_BT, kl_BT, zeros_BT).sum() / n,
            "clip_frac": clipped_BT.sum().to(logprobs_BT.dtype) / n,
            "ratio_mean": torch.where(mask_BT, ratio_BT, zeros_BT).sum() / n,
            "tokens": tokens,
        }
    return loss, {k: v.detach() for k, v in metrics.items()}
