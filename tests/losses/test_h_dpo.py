"""H-DPO (spec §5): α multiplies the policy log-probs only; α = 1 is DPO."""

import math

import pytest
import torch

from dpo_zoo.losses import LossConfigError, build_loss, compute_loss, get_loss_entry

from loss_inputs import F64, sequence_inputs, t


def random_logps(seed, n=16):
    g = torch.Generator().manual_seed(seed)
    ref = -5.0 - 40.0 * torch.rand(2, n, generator=g, dtype=F64)
    pol = ref + 6.0 * (2.0 * torch.rand(2, n, generator=g, dtype=F64) - 1.0)
    return pol[0], pol[1], ref[0], ref[1]


def naive_h_dpo(pc, pr, rc, rr, beta, alpha):
    """The spec's first form, term by term: z = αβ log π_θ(y_w) − β log π_ref(y_w) − αβ log π_θ(y_l)
    + β log π_ref(y_l); L = −log(1/(1 + e^{−z})); ∂L/∂log π_θ(y_w) = −αβ σ(−z), ∂L/∂log π_θ(y_l) =
    +αβ σ(−z)."""
    z = alpha * beta * pc - beta * rc - alpha * beta * pr + beta * rr
    loss = -torch.log(1.0 / (1.0 + torch.exp(-z)))
    sig_neg = 1.0 / (1.0 + torch.exp(z))
    return loss, -alpha * beta * sig_neg, alpha * beta * sig_neg


@pytest.mark.parametrize("alpha", [0.5, 0.9, 0.95, 1.0, 1.5])
@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_h_dpo_matches_naive_reference(alpha, beta, seed):
    pc, pr, rc, rr = random_logps(seed)
    leaves = [pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)]
    out = compute_loss(
        "h_dpo",
        policy_chosen_logps=leaves[0],
        policy_rejected_logps=leaves[1],
        reference_chosen_logps=rc,
        reference_rejected_logps=rr,
        beta=beta,
        alpha=alpha,
    )
    loss, grad_w, grad_l = naive_h_dpo(pc, pr, rc, rr, beta, alpha)
    torch.testing.assert_close(out.losses, loss, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(out.chosen_rewards, beta * (alpha * pc - rc), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(out.rejected_rewards, beta * (alpha * pr - rr), rtol=1e-6, atol=1e-12)
    grads = torch.autograd.grad(out.losses.sum(), leaves)
    torch.testing.assert_close(grads[0], grad_w, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(grads[1], grad_l, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_alpha_one_equals_dpo(seed):
    pc, pr, rc, rr = random_logps(seed)
    tensors = sequence_inputs(pc, pr, rc, rr)
    h = compute_loss("h_dpo", **tensors, beta=0.3, alpha=1.0)
    dpo = compute_loss("dpo", **tensors, beta=0.3)
    torch.testing.assert_close(h.losses, dpo.losses, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(h.chosen_rewards, dpo.chosen_rewards, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(h.rejected_rewards, dpo.rejected_rewards, rtol=1e-12, atol=1e-14)


def test_hand_worked_value():
    """β = 1, α = 0.5, log π_θ = (−4, −8), log π_ref = (−5, −6):
    logit = 1·[0.5·(−4 − (−8)) − (−5 − (−6))] = 0.5·4 − 1 = 1, loss = log(1 + e^{−1}) = 0.3132617.
    (DPO would have logit (−4 + 5) − (−8 + 6) = 3.) Rewards β(α log π_θ − log π_ref): chosen
    0.5·(−4) + 5 = 3, rejected 0.5·(−8) + 6 = 2; margin 1 = the logit; win_prob σ(1) = 0.7310586."""
    out = compute_loss(
        "h_dpo",
        policy_chosen_logps=t(-4.0),
        policy_rejected_logps=t(-8.0),
        reference_chosen_logps=t(-5.0),
        reference_rejected_logps=t(-6.0),
        beta=1.0,
        alpha=0.5,
    )
    torch.testing.assert_close(out.losses, t(math.log1p(math.exp(-1.0))))
    torch.testing.assert_close(out.chosen_rewards, t(3.0))
    torch.testing.assert_close(out.rejected_rewards, t(2.0))
    torch.testing.assert_close(out.metrics["win_prob"], t(1.0 / (1.0 + math.exp(-1.0))))
    assert not out.metrics["win_prob"].requires_grad


def test_alpha_scales_only_the_policy_terms():
    """Shifting both reference log-probs by the same constant leaves the loss unchanged (only the
    reference difference enters); scaling the policy difference by 1/α with the reference fixed gives
    the α = 1 loss back (α multiplies the policy terms only)."""
    pc, pr, rc, rr = random_logps(4)
    base = sequence_inputs(pc, pr, rc, rr)
    shifted = dict(base, reference_chosen_logps=rc - 7.0, reference_rejected_logps=rr - 7.0)
    a = compute_loss("h_dpo", **base, alpha=0.8).losses
    torch.testing.assert_close(compute_loss("h_dpo", **shifted, alpha=0.8).losses, a, rtol=1e-12, atol=1e-14)
    stretched = dict(base, policy_chosen_logps=pc / 0.8, policy_rejected_logps=pr / 0.8)
    torch.testing.assert_close(
        compute_loss("h_dpo", **stretched, alpha=0.8).losses,
        compute_loss("h_dpo", **base, alpha=1.0).losses,
        rtol=1e-12,
        atol=1e-14,
    )


def test_float32_stability_and_precision_at_sums_of_minus_5000():
    """fp32 sums near −5000. (a) Precision: log π_θ = (−5000.25, −5003), log π_ref = (−4999, −5001.5),
    α = 0.9, β = 10: logit = 10·(0.9·2.75 − 2.5) = −0.25, loss = softplus(0.25) = 0.8259394. Taking
    each model's difference first keeps this exact to fp32 rounding; subtracting the rewards
    0.9·(−5000.25) + 4999 etc. would give −0.2539 (error 4e-3). (b) Gaps of thousands of nats, fp32
    and bf16: finite losses and gradients."""
    out = compute_loss(
        "h_dpo",
        policy_chosen_logps=t(-5000.25, dtype=torch.float32),
        policy_rejected_logps=t(-5003.0, dtype=torch.float32),
        reference_chosen_logps=t(-4999.0, dtype=torch.float32),
        reference_rejected_logps=t(-5001.5, dtype=torch.float32),
        beta=10.0,
        alpha=0.9,
    )
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(0.25)), rel=1e-5)

    pc = torch.tensor([-5000.0, -1000.0, -5000.0])
    pr = torch.tensor([-1000.0, -5000.0, -5000.0])
    rc = torch.tensor([-5000.0, -5000.0, -1000.0])
    rr = torch.tensor([-5000.0, -1000.0, -5000.0])
    for dtype in (torch.float32, torch.bfloat16):
        for alpha in (0.5, 0.95, 1.0):
            leaves = [x.to(dtype).requires_grad_(True) for x in (pc, pr)]
            out = compute_loss(
                "h_dpo",
                policy_chosen_logps=leaves[0],
                policy_rejected_logps=leaves[1],
                reference_chosen_logps=rc.to(dtype),
                reference_rejected_logps=rr.to(dtype),
                alpha=alpha,
            )
            assert out.losses.dtype == torch.float32 and torch.isfinite(out.losses).all()
            grads = torch.autograd.grad(out.losses.sum(), leaves)
            assert all(torch.isfinite(g.float()).all() for g in grads)


def test_defaults_and_validation():
    entry = get_loss_entry("h_dpo")
    assert entry.defaults() == {"beta": 0.1, "alpha": 1.0}
    assert entry.cls.arxiv == "2411.07595"
    assert "[UNVERIFIED]" in entry.cls.__doc__
    for bad in ({"alpha": 0.0}, {"alpha": -0.5}, {"beta": 0.0}):
        with pytest.raises(LossConfigError):
            build_loss("h_dpo", **bad)
