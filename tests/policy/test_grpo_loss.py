"""GRPO loss against hand-checked numbers and a scalar reference written out token by token.

Shape legend: B = sequences, T = tokens per sequence.
"""

import math

import pytest
import torch

from colocate.policy.grpo_loss import grpo_loss
from colocate.policy.lr_schedule import lr_multiplier

# Two sequences, old logprobs 0, so each ratio is exp(logprob) and is set directly.
#   seq 0, A=+1: r=1.5 (clipped to 1.2), r=0.9 (not clipped: A>0 only clips above), masked.
#   seq 1, A=-2: r=0.5 (clipped to 0.8), r=1.5 (not clipped: A<0 only clips below), r=1.0.
RATIOS_BT = [[1.5, 0.9, 1.1], [0.5, 1.5, 1.0]]
MASK_BT = [[1, 1, 0], [1, 1, 1]]
ADVANTAGES_B = [1.0, -2.0]
# Per-token losses -min(rA, clip(r)A): [-1.2, -0.9, -] and [1.6, 3.0, 2.0].
TOKEN_MEAN = (-1.2 - 0.9 + 1.6 + 3.0 + 2.0) / 5  # 0.9
SEQ_MEAN = ((-1.2 - 0.9) / 2 + (1.6 + 3.0 + 2.0) / 3) / 2  # 0.575


def _inputs(requires_grad: bool = False) -> dict[str, torch.Tensor]:
    logprobs_BT = torch.log(torch.tensor(RATIOS_BT, dtype=torch.float64))
    logprobs_BT.requires_grad_(requires_grad)
    return {
        "logprobs_BT": logprobs_BT,
        "old_logprobs_BT": torch.zeros(2, 3, dtype=torch.float64),
        "advantages_B": torch.tensor(ADVANTAGES_B, dtype=torch.float64),
        "mask_BT": torch.tensor(MASK_BT),
    }


@pytest.mark.parametrize(
    ("loss_agg", "expected"), [("token_mean", TOKEN_MEAN), ("seq_mean_token_mean", SEQ_MEAN)]
)
def test_hand_checked_clipping_and_aggregation(loss_agg: str, expected: float) -> None:
    loss, metrics = grpo_loss(**_inputs(), loss_agg=loss_agg)
    assert loss.item() == pytest.approx(expected)
    assert metrics["clip_frac"].item() == pytest.approx(2 / 5)
    assert metrics["ratio_mean"].item() == pytest.approx((1.5 + 0.9 + 0.5 + 1.5 + 1.0) / 5)
    assert metrics["tokens"].item() == 5
    assert metrics["kl"].item() == 0.0


def test_asymmetric_clip_high() -> None:
    # Only seq 0 / token 0 (r=1.5, A>0) hits the upper bound: it now counts 1.28 instead of 1.2.
    loss, _ = grpo_loss(**_inputs(), clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(TOKEN_MEAN - 0.08 / 5)
    # Widening the lower bound frees seq 1 / token 0 (r=0.5, A<0): 1.6 becomes 0.5 * 2 = 1.0.
    loss, metrics = grpo_loss(**_inputs(), clip_low=0.6, clip_high=0.2)
    assert loss.item() == pytest.approx(TOKEN_MEAN - 0.6 / 5)
    assert metrics["clip_frac"].item() == pytest.approx(1 / 5)


def test_gradient_signs() -> None:
    inputs = _inputs(requires_grad=True)
    loss, _ = grpo_loss(**inputs)
    loss.backward()
    # d(-rA)/dlogprob = -rA / 5 on unclipped tokens; clipped and masked tokens get none.
    expected_BT = torch.tensor([[0.0, -0.9 / 5, 0.0], [0.0, 3.0 / 5, 2.0 / 5]], dtype=torch.float64)
    torch.testing.assert_close(inputs["logprobs_BT"].grad, expected_BT)


def test_kl_k3() -> None:
    inputs = _inputs()
    delta_BT = torch.tensor([[math.log(2), 0.0, 5.0], [0.0, -math.log(2), 0.0]], dtype=torch.float64)
    ref_logprobs_BT = inputs["logprobs_BT"] + delta_BT  # the 5.0 sits on a masked token
    # k3 = e^d - d - 1: (1 - ln 2) + (ln 2 - 0.5) = 0.5 over 5 tokens.
    loss, metrics = grpo_loss(**inputs, ref_logprobs_BT=ref_logprobs_BT, kl_coef=0.1)
    assert metrics["kl"].item() == pytest.approx(0.1)
    assert loss.item() == pytest.approx(TOKEN_MEAN + 0.1 * 0.1)
    # With kl_coef 0 the KL is still reported but not in the loss.
    loss, metrics = grpo_loss(**inputs, ref_logprobs_BT=ref_logprobs_BT, kl_coef=0.0)
    assert loss.item() == pytest.approx(TOKEN_MEAN)
    assert metrics["kl"].item() == pytest.approx(0.1)


def test_masked_positions_cannot_leak() -> None:
    inputs = _inputs()
    logprobs_BT = inputs["logprobs_BT"].clone()
    logprobs_BT[0, 2] = float("nan")
    inputs["old_logprobs_BT"][0, 2] = float("-inf")
    logprobs_BT.requires_grad_(True)
    ref_BT = torch.zeros(2, 3, dtype=torch.float64)
    ref_BT[0, 2] = float("inf")
    loss, metrics = grpo_loss(**{**inputs, "logprobs_BT": logprobs_BT}, ref_logprobs_BT=ref_BT, kl_coef=0.1)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert torch.isfinite(logprobs_BT.grad).all()
    assert logprobs_BT.grad[0, 2] == 0.0


def _reference(logprobs, old, adv, mask, ref, kl_coef, lo, hi, agg):
    """Token-by-token scalar GRPO, straight from the formula."""
    seq_losses, tokens_total, loss_total = [], 0, 0.0
    for b in range(len(logprobs)):
        seq_sum, seq_n = 0.0, 0
        for t in range(len(logprobs[b])):
            if not mask[b][t]:
                continue
            r = math.exp(logprobs[b][t] - old[b][t])
            pg = -min(r * adv[b], min(max(r, 1 - lo), 1 + hi) * adv[b])
            d = ref[b][t] - logprobs[b][t]
            token_loss = pg + kl_coef * (math.exp(d) - d - 1)
            seq_sum, seq_n = seq_sum + token_loss, seq_n + 1
        seq_losses.append(seq_sum / max(seq_n, 1))
        tokens_total, loss_total = tokens_total + seq_n, loss_total + seq_sum
    if agg == "token_mean":
        return loss_total / tokens_total
    return sum(seq_losses) / len(seq_losses)


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scalar_reference(loss_agg: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    shape = (4, 7)
    old_BT = -torch.rand(shape, generator=gen, dtype=torch.float64) * 3
    logprobs_BT = old_BT + torch.randn(shape, generator=gen, dtype=torch.float64) * 0.3
    ref_BT = old_BT + torch.randn(shape, generator=gen, dtype=torch.float64) * 0.3
    adv_B = torch.randn(4, generator=gen, dtype=torch.float64)
    mask_BT = (torch.rand(shape, generator=gen) < 0.7).long()
    mask_BT[:, 3] = 1  # no empty sequence
    loss, _ = grpo_loss(
        logprobs_BT=logprobs_BT,
        old_logprobs_BT=old_BT,
        advantages_B=adv_B,
        mask_BT=mask_BT,
        ref_logprobs_BT=ref_BT,
        kl_coef=0.05,
        clip_low=0.2,
        clip_high=0.28,
        loss_agg=loss_agg,
    )
    expected = _reference(
        logprobs_BT.tolist(), old_BT.tolist(), adv_B.tolist(), mask_BT.tolist(), ref_BT.tolist(),
        0.05, 0.2, 0.28, loss_agg,
    )  # fmt: skip
    assert loss.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
def test_micro_batches_with_global_denominator_sum_to_the_whole(loss_agg: str) -> None:
    inputs = _inputs()
    whole, _ = grpo_loss(**inputs, loss_agg=loss_agg)
    denom = 5.0 if loss_agg == "token_mean" else 2.0
    parts = [
        grpo_loss(**{k: v[i : i + 1] for k, v in inputs.items()}, loss_agg=loss_agg, loss_denom=denom)[0]
        for i in range(2)
    ]
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item())


def test_unknown_loss_agg() -> None:
    with pytest.raises(ValueError, match="loss_agg"):
        grpo_loss(**_inputs(), loss_agg="sum")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("step", "decay", "expected"),
    [
        (0, "constant", 1 / 3),
        (1, "constant", 2 / 3),
        (2, "constant", 1.0),
        (50, "constant", 1.0),
        (2, "linear", 1.0),
        (7, "linear", 0.55),  # halfway through 10 decay steps, down to min 0.1
        (12, "linear", 0.1),
        (99, "linear", 0.1),
        (7, "cosine", 0.55),
        (12, "cosine", 0.1),
    ],
)
def test_lr_multiplier(step: int, decay: str, expected: float) -> None:
    got = lr_multiplier(step, warmup_steps=2, total_steps=12, decay=decay, min_lr_ratio=0.1)  # type: ignore[arg-type]
    assert got == pytest.approx(expected)
