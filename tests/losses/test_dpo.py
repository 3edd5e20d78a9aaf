"""DPO, cDPO, IPO and hinge against values worked out by hand (spec §1)."""

import math

import pytest
import torch

from dpo_zoo.losses import LossConfigError, LossInputError, PairBatch, build_loss, compute_loss


def four(pc, pr, rc, rr, dtype=torch.float64):
    return dict(
        policy_chosen_logps=torch.tensor(pc, dtype=dtype),
        policy_rejected_logps=torch.tensor(pr, dtype=dtype),
        reference_chosen_logps=torch.tensor(rc, dtype=dtype),
        reference_rejected_logps=torch.tensor(rr, dtype=dtype),
    )


def test_dpo_hand_value():
    """ℓ_w = −10 − (−12) = 2, ℓ_l = −15 − (−14) = −1, h = 3, β = 0.5 → βh = 1.5.
    L = −log σ(1.5) = log(1 + e^{−1.5}) = log(1.2231302) = 0.2014133.
    Rewards: β ℓ_w = 1.0, β ℓ_l = −0.5."""
    out = compute_loss("dpo", **four([-10.0], [-15.0], [-12.0], [-14.0]), beta=0.5)
    assert out.losses.item() == pytest.approx(0.2014132779827524, rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(1.0)
    assert out.rejected_rewards.item() == pytest.approx(-0.5)


def test_dpo_gradient_matches_spec():
    """∂L/∂log π_θ(y_w) = −β σ(−βh), ∂L/∂log π_θ(y_l) = +β σ(−βh); with β = 0.5, h = 3:
    σ(−1.5) = 0.18242552 → ∓0.09121276."""
    tensors = four([-10.0], [-15.0], [-12.0], [-14.0])
    tensors["policy_chosen_logps"].requires_grad_(True)
    tensors["policy_rejected_logps"].requires_grad_(True)
    compute_loss("dpo", **tensors, beta=0.5).losses.sum().backward()
    assert tensors["policy_chosen_logps"].grad.item() == pytest.approx(-0.5 * 0.18242552380635635, rel=1e-10)
    assert tensors["policy_rejected_logps"].grad.item() == pytest.approx(0.5 * 0.18242552380635635, rel=1e-10)


def test_cdpo_label_smoothing():
    """ε = 0.1, βh = 1.5: L = −0.9 log σ(1.5) − 0.1 log σ(−1.5)
    = 0.9 × 0.2014133 + 0.1 × 1.7014133 = 0.18127195 + 0.17014133 = 0.35141328."""
    out = compute_loss("dpo", **four([-10.0], [-15.0], [-12.0], [-14.0]), beta=0.5, label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(0.9 * 0.2014132779827524 + 0.1 * 1.7014132779827524, rel=1e-12)


def test_ipo_hand_value_on_summed_logps():
    """h = 3, τ = β = 0.25 → target 1/(2τ) = 2; L = (3 − 2)² = 1."""
    out = compute_loss("ipo", **four([-10.0], [-15.0], [-12.0], [-14.0]), beta=0.25)
    assert out.losses.item() == pytest.approx(1.0)


def test_hinge_hand_value():
    """β = 0.5, h = 3: 1 − 1.5 < 0 → 0; with h = 1 (ℓ_l = 1): 1 − 0.5 = 0.5."""
    assert compute_loss("hinge", **four([-10.0], [-15.0], [-12.0], [-14.0]), beta=0.5).losses.item() == 0.0
    out = compute_loss("hinge", **four([-10.0], [-13.0], [-12.0], [-14.0]), beta=0.5)
    assert out.losses.item() == pytest.approx(0.5)


def test_dpo_stable_in_float32_at_extreme_logps():
    """βh = ±500 in float32: log σ computed as softplus never gives inf/nan."""
    out = compute_loss("dpo", **four([-5000.0, -1.0], [-1.0, -5000.0], [-1.0, -1.0], [-1.0, -1.0], torch.float32), beta=0.1)
    assert torch.isfinite(out.losses).all()
    assert out.losses[0].item() == pytest.approx(499.9, rel=1e-5)  # −log σ(−499.9) ≈ 499.9
    assert out.losses[1].item() == pytest.approx(0.0, abs=1e-30)


def test_sums_are_derived_from_token_logps():
    """Per-token values with masks give the same loss as their sums."""
    token = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out_tokens = compute_loss(
        "dpo",
        policy_chosen_token_logps=token,
        policy_rejected_token_logps=token * 2,
        reference_chosen_token_logps=token * 0.5,
        reference_rejected_token_logps=token,
        chosen_mask=mask,
        rejected_mask=mask,
    )
    sums = (token * mask).sum(-1)
    out_sums = compute_loss("dpo", **four(sums.tolist(), (2 * sums).tolist(), (0.5 * sums).tolist(), sums.tolist()))
    torch.testing.assert_close(out_tokens.losses, out_sums.losses)


def test_missing_tensor_is_named():
    with pytest.raises(LossInputError, match="reference_rejected_logps"):
        compute_loss(
            "dpo",
            policy_chosen_logps=torch.zeros(2),
            policy_rejected_logps=torch.zeros(2),
            reference_chosen_logps=torch.zeros(2),
        )


def test_bad_hyperparameters_are_named():
    with pytest.raises(LossConfigError, match="'bta'"):
        build_loss("dpo", bta=0.1)
    with pytest.raises(LossConfigError, match="beta must be > 0"):
        build_loss("dpo", beta=0.0)
    with pytest.raises(LossConfigError, match="unknown loss 'dpoo'"):
        build_loss("dpoo")


def test_bf16_inputs_are_computed_in_float32():
    out = compute_loss("dpo", **four([-10.0], [-15.0], [-12.0], [-14.0], torch.bfloat16), beta=0.5)
    assert out.losses.dtype == torch.float32
    assert out.losses.item() == pytest.approx(0.2014132779827524, rel=1e-6)


def test_pair_batch_vocab_to_token_view():
    """Token log-probs gathered from vocabulary log-probs at the labels, -100 labels masked."""
    vocab = torch.log_softmax(torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]]), -1)
    batch = PairBatch(
        policy_chosen_vocab_logps=vocab,
        chosen_labels=torch.tensor([[2, -100]]),
        chosen_mask=torch.tensor([[1, 0]]),
    )
    expected = 3.0 - math.log(math.exp(1) + math.exp(2) + math.exp(3))
    assert batch.token_logps("policy", "chosen")[0, 0].item() == pytest.approx(expected, rel=1e-6)
    assert batch.sequence_logps("policy", "chosen").item() == pytest.approx(expected, rel=1e-6)
