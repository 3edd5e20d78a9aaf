"""TRL's loss types, LD-DPO, RPO, SimPO, CPO and ORPO: hand values and the properties their papers state.

(Agreement with TRL's own code is tests/losses/test_trl_parity.py; here each number can be checked by hand.)
"""

import math

import pytest
import torch

from dpo_zoo.losses import LossConfigError, PairBatch, build_loss, check_inputs, compute_loss

from loss_inputs import F64, sequence_inputs, t

LN2 = math.log(2.0)


def softplus(x):
    return math.log1p(math.exp(x))


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# ====================================================================== margin losses (robust, EXO, DiscoPOP)


def test_robust_is_an_unbiased_estimate_of_the_clean_dpo_loss():
    """rDPO's defining property: if a label is flipped with probability ε, the expected robust loss
    is the clean DPO loss: (1−ε) L_ε(h) + ε L_ε(−h) = −log σ(βh), for any h."""
    eps, beta = 0.2, 0.5
    h = t(-3.0, -0.4, 0.0, 1.3, 6.0)
    zeros = torch.zeros_like(h)
    forward = compute_loss("robust", **sequence_inputs(h, zeros, zeros, zeros), beta=beta, label_smoothing=eps).losses
    flipped = compute_loss("robust", **sequence_inputs(zeros, h, zeros, zeros), beta=beta, label_smoothing=eps).losses
    expected = torch.nn.functional.softplus(-beta * h)
    torch.testing.assert_close((1 - eps) * forward + eps * flipped, expected, rtol=1e-12, atol=1e-14)
    # by hand at h = 0: [(1−ε) ln 2 − ε ln 2] / (1 − 2ε) = ln 2
    assert forward[2].item() == pytest.approx(LN2, rel=1e-12)


def test_exo_pair_is_a_kl_divergence_minimised_at_one_minus_eps():
    """KL(q ‖ (1−ε, ε)) ≥ 0, = 0 exactly where σ(βh) = 1−ε, i.e. βh = log((1−ε)/ε).
    At h = 0, ε = 0.1: ½(log ½ − log 0.9) + ½(log ½ − log 0.1) = ½ log(0.25/0.09) = 0.5108256."""
    eps, beta = 0.1, 0.5
    h_star = math.log((1 - eps) / eps) / beta
    h = t(0.0, h_star, -2.0, 10.0)
    zeros = torch.zeros_like(h)
    out = compute_loss("exo_pair", **sequence_inputs(h, zeros, zeros, zeros), beta=beta, label_smoothing=eps)
    assert out.losses[0].item() == pytest.approx(0.5 * math.log(0.25 / 0.09), rel=1e-12)
    assert out.losses[1].item() == pytest.approx(0.0, abs=1e-12)
    assert (out.losses >= -1e-12).all()
    with pytest.raises(LossConfigError, match="label_smoothing"):
        build_loss("exo_pair", label_smoothing=0.0)


def test_discopop_hand_values():
    """ρ = βh. At ρ = 0: blend ½ → ½ ln 2 + ½ · 1. At ρ = 2, τ = 0.05: blend σ(40) ≈ 1 → e^{−2}."""
    beta = 1.0
    h = t(0.0, 2.0)
    zeros = torch.zeros_like(h)
    out = compute_loss("discopop", **sequence_inputs(h, zeros, zeros, zeros), beta=beta)
    assert out.losses[0].item() == pytest.approx(0.5 * LN2 + 0.5, rel=1e-12)
    blend = sigmoid(40.0)
    assert out.losses[1].item() == pytest.approx((1 - blend) * softplus(-2.0) + blend * math.exp(-2.0), rel=1e-12)


def test_f_divergence_scores_match_f_dpo():
    """The divergence option is f-DPO's score: robust at ε = 0 with JS is f-DPO (JS) exactly."""
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(6, generator=g, dtype=F64) for _ in range(4)]
    for divergence in ("forward_kl", "js", "alpha"):
        robust = compute_loss("robust", **sequence_inputs(*values), label_smoothing=0.0, divergence=divergence, alpha=0.3)
        f_dpo = compute_loss("f_dpo", **sequence_inputs(*values), divergence=divergence, alpha=0.3)
        torch.testing.assert_close(robust.losses, f_dpo.losses, rtol=1e-12, atol=1e-14)
        # TRL's spellings are accepted too (js_divergence is TRL's; jsd / alpha_divergence the official code's)
    assert build_loss("robust", divergence="jsd").config.divergence == "js"


# ====================================================================== per-response losses


def test_nca_bco_sppo_apo_hand_values():
    """ℓ_w = ℓ_l = 0 (policy = reference): NCA = ln2 + ½ln2 + ½ln2 = 2 ln 2; BCO = 2 ln 2;
    APO-zero = (1 − ½) + ½ = 1; APO-down = ½ + (1 − ½) = 1; SPPO = 2 · (1/(2β))² = 2 · 25 = 50 at β = 0.1."""
    zeros = t(0.0)
    inputs = sequence_inputs(zeros, zeros, zeros, zeros)
    assert compute_loss("nca_pair", **inputs).losses.item() == pytest.approx(2 * LN2, rel=1e-12)
    assert compute_loss("bco_pair", **inputs).losses.item() == pytest.approx(2 * LN2, rel=1e-12)
    assert compute_loss("apo_zero", **inputs).losses.item() == pytest.approx(1.0, rel=1e-12)
    assert compute_loss("apo_down", **inputs).losses.item() == pytest.approx(1.0, rel=1e-12)
    assert compute_loss("sppo_hard", **inputs, beta=0.1).losses.item() == pytest.approx(50.0, rel=1e-12)
    # SPPO's targets: ℓ_w = 1/(2β), ℓ_l = −1/(2β) give 0.
    at_target = sequence_inputs(t(5.0), t(-5.0), t(0.0), t(0.0))
    assert compute_loss("sppo_hard", **at_target, beta=0.1).losses.item() == pytest.approx(0.0, abs=1e-15)


def test_pointwise_losses_penalise_both_rewards_falling_unlike_dpo():
    """Lowering both log-ratios by the same amount leaves DPO unchanged but raises NCA, BCO and APO-zero
    (they hold the chosen likelihood up)."""
    before = sequence_inputs(t(1.0), t(-1.0), t(0.0), t(0.0))
    after = sequence_inputs(t(-4.0), t(-6.0), t(0.0), t(0.0))
    assert compute_loss("dpo", **after).losses.item() == pytest.approx(compute_loss("dpo", **before).losses.item(), rel=1e-12)
    for name in ("nca_pair", "bco_pair", "apo_zero"):
        assert compute_loss(name, **after).losses.item() > compute_loss(name, **before).losses.item(), name


def test_bco_batch_mean_shift_is_invariant_to_a_common_reward_offset():
    g = torch.Generator().manual_seed(1)
    pc, pr = torch.randn(5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    zeros = torch.zeros(5, dtype=F64)
    base = compute_loss("bco_pair", **sequence_inputs(pc, pr, zeros, zeros), reward_shift="batch_mean")
    shifted = compute_loss("bco_pair", **sequence_inputs(pc + 7.0, pr + 7.0, zeros, zeros), reward_shift="batch_mean")
    torch.testing.assert_close(base.losses, shifted.losses, rtol=1e-12, atol=1e-14)
    assert base.metrics["bco/delta"].item() == pytest.approx(0.1 * torch.cat([pc, pr]).mean().item(), rel=1e-12)


def test_aot_sorts_over_the_batch():
    """AOT's loss is a function of the sorted margins: permuting the pairs permutes nothing in the
    per-quantile losses; the unpaired form also ignores which chosen goes with which rejected."""
    g = torch.Generator().manual_seed(2)
    values = [torch.randn(6, generator=g, dtype=F64) for _ in range(4)]
    perm = torch.randperm(6, generator=g)
    out = compute_loss("aot", **sequence_inputs(*values))
    permuted = compute_loss("aot", **sequence_inputs(*[v[perm] for v in values]))
    torch.testing.assert_close(out.losses, permuted.losses, rtol=1e-12, atol=0)
    pc, pr, rc, rr = values
    unpaired = compute_loss("aot_unpaired", **sequence_inputs(pc, pr, rc, rr))
    rejected_shuffled = compute_loss("aot_unpaired", **sequence_inputs(pc, pr[perm], rc, rr[perm]))
    torch.testing.assert_close(unpaired.losses, rejected_shuffled.losses, rtol=1e-12, atol=0)
    # by hand for one pair: δ = (pc − pr) − (rc − rr), L = softplus(−βδ)
    one = compute_loss("aot", **sequence_inputs(t(-1.0), t(-3.0), t(-2.0), t(-2.5)), beta=0.5)
    assert one.losses.item() == pytest.approx(softplus(-0.5 * 1.5), rel=1e-12)


# ====================================================================== length-aware


def token_pair(chosen, rejected, ref_chosen=None, ref_rejected=None):
    """One pair from per-token lists (padded with zeros to the longer one, masked)."""
    T = max(len(chosen), len(rejected))

    def pad(values):
        return torch.tensor([list(values) + [0.0] * (T - len(values))], dtype=F64)

    def mask(values):
        return torch.tensor([[1] * len(values) + [0] * (T - len(values))], dtype=torch.bool)

    ref_chosen = ref_chosen or [0.0] * len(chosen)
    ref_rejected = ref_rejected or [0.0] * len(rejected)
    return dict(
        policy_chosen_token_logps=pad(chosen), policy_rejected_token_logps=pad(rejected),
        reference_chosen_token_logps=pad(ref_chosen), reference_rejected_token_logps=pad(ref_rejected),
        chosen_mask=mask(chosen), rejected_mask=mask(rejected),
    )


def test_sigmoid_norm_and_ld_dpo_by_hand():
    """Chosen: 4 tokens, log-ratio per token −1 (ℓ_w = −4); rejected: 1 token, −2 (ℓ_l = −2); β = 1.
    sigmoid_norm: −log σ(−4/4 − (−2/1)) = softplus(−1). DPO: softplus(−(−4 + 2)) = softplus(2).
    LD-DPO, α = 0.5: shared length 1: ℓ̂_w = −1 + 0.5·(−3) = −2.5, ℓ̂_l = −2: softplus(0.5)."""
    pair = token_pair([-1.0] * 4, [-2.0])
    assert compute_loss("sigmoid_norm", **pair, beta=1.0).losses.item() == pytest.approx(softplus(-1.0), rel=1e-12)
    assert compute_loss("dpo", **pair, beta=1.0).losses.item() == pytest.approx(softplus(2.0), rel=1e-12)
    ld = compute_loss("ld_dpo", **pair, beta=1.0, ld_alpha=0.5)
    assert ld.losses.item() == pytest.approx(softplus(0.5), rel=1e-12)
    assert ld.chosen_rewards.item() == pytest.approx(-2.5, rel=1e-12)
    assert compute_loss("ld_dpo", **pair, beta=1.0, ld_alpha=1.0).losses.item() == pytest.approx(softplus(2.0), rel=1e-12)


# ====================================================================== NLL-anchored and reference-free


def test_sft_and_rpo_nll_by_hand():
    """Two pairs: chosen token log-probs (−1, −2, −3) and (−4): batch token mean = 10/4 = 2.5 (TRL's sft);
    per-response means 2 and 4. RPO (α = 1, β = 0.5, ℓ = 0): ln 2 + per-response mean."""
    pairs = [token_pair([-1.0, -2.0, -3.0], [-1.0]), token_pair([-4.0], [-1.0])]
    T = 3

    def cat(key):
        values = [p[key] for p in pairs]
        values = [torch.nn.functional.pad(v, (0, T - v.shape[1])) for v in values]
        return torch.cat(values)

    batch = {k: cat(k) for k in pairs[0]}
    batch["reference_chosen_token_logps"] = batch["policy_chosen_token_logps"].clone()
    batch["reference_rejected_token_logps"] = batch["policy_rejected_token_logps"].clone()
    policy_only = {k: v for k, v in batch.items() if not k.startswith("reference_")}
    sft = compute_loss("sft", **policy_only)
    assert sft.losses.mean().item() == pytest.approx(2.5, rel=1e-12)
    sequence = compute_loss("sft", **policy_only, nll_reduction="sequence")
    torch.testing.assert_close(sequence.losses, t(2.0, 4.0), rtol=1e-12, atol=0)
    rpo = compute_loss("rpo", **batch, beta=0.5, alpha=1.0)
    torch.testing.assert_close(rpo.losses, t(LN2 + 2.0, LN2 + 4.0), rtol=1e-12, atol=0)
    assert compute_loss("rpo", **batch, alpha=0.0).losses[0].item() == pytest.approx(LN2, rel=1e-12)


def test_simpo_cpo_orpo_by_hand():
    """Chosen 2 tokens (−0.5 each, mean −0.5, sum −1); rejected 1 token (−2).
    SimPO β = 2, γ = 0.5: m = 2(−0.5 + 2) − 0.5 = 2.5 → softplus(−2.5).
    CPO β = 0.1, λ = 1: softplus(−0.1 · (−1 + 2)) + NLL (one pair: 2 tokens, 1/2 each → 0.5).
    ORPO β = 0.1: log odds(a) = a − log(1 − e^a); ratio = (−0.5 − log(1 − e^−0.5)) − (−2 − log(1 − e^−2)),
    L = 0.5 + 0.1 · softplus(−ratio)."""
    pair = token_pair([-0.5, -0.5], [-2.0])
    policy_only = {k: v for k, v in pair.items() if not k.startswith("reference_")}
    assert compute_loss("simpo", **policy_only).losses.item() == pytest.approx(softplus(-2.5), rel=1e-12)
    assert compute_loss("cpo", **policy_only).losses.item() == pytest.approx(softplus(-0.1) + 0.5, rel=1e-12)
    ratio = (-0.5 - math.log(1 - math.exp(-0.5))) - (-2.0 - math.log(1 - math.exp(-2.0)))
    orpo = compute_loss("orpo", **policy_only)
    assert orpo.losses.item() == pytest.approx(0.5 + 0.1 * softplus(-ratio), rel=1e-12)
    assert orpo.metrics["win_prob"].item() == pytest.approx(sigmoid(ratio), rel=1e-12)


@pytest.mark.parametrize("name", ["simpo", "cpo", "orpo", "sft"])
def test_reference_free_losses_declare_it_and_read_no_reference(name):
    """Declared: no reference fields are needed. Read: reference values, if given anyway, change nothing."""
    loss = build_loss(name)
    assert not loss.needs_reference
    assert not [f for f in loss.needed_fields() if f.startswith("reference_")]
    pair = token_pair([-0.5, -0.7, -0.2], [-1.5, -0.1])
    policy_only = {k: v for k, v in pair.items() if not k.startswith("reference_")}
    check_inputs(loss, PairBatch(**policy_only))
    with_reference = token_pair([-0.5, -0.7, -0.2], [-1.5, -0.1], [-9.0, -9.0, -9.0], [-0.1, -0.1])
    assert compute_loss(name, **policy_only).losses.item() == compute_loss(name, **with_reference).losses.item()


def test_reference_needing_losses_still_need_it():
    for name in ("dpo", "robust", "rpo", "sigmoid_norm", "ld_dpo", "aot", "bco_pair"):
        assert build_loss(name).needs_reference, name
