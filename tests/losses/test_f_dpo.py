"""f-DPO (spec §2): hand-worked values, a naive reference from the spec's formula, the α limits, the
TRL ≥ 0.29 α convention, and fp32 behaviour at summed log-ratios of ±2000."""

import math

import pytest
import torch
import torch.nn.functional as F

from dpo_zoo.losses import LossConfigError, build_loss, compute_loss, get_loss_entry
from dpo_zoo.losses.f_dpo import capped_expm1, f_prime_shifted

ALPHAS = (0.1, 0.3, 0.5, 0.7, 0.9)


def pair(chosen_ratio, rejected_ratio, dtype=torch.float64):
    """Four summed log-probs whose log-ratios are the given values (reference fixed at −10 / −12)."""
    chosen_ratio = torch.as_tensor(chosen_ratio, dtype=dtype)
    rejected_ratio = torch.as_tensor(rejected_ratio, dtype=dtype)
    ref_c = torch.full_like(chosen_ratio, -10.0)
    ref_r = torch.full_like(rejected_ratio, -12.0)
    return dict(
        policy_chosen_logps=ref_c + chosen_ratio,
        policy_rejected_logps=ref_r + rejected_ratio,
        reference_chosen_logps=ref_c,
        reference_rejected_logps=ref_r,
    )


# ---------------------------------------------------------------- naive reference (spec §2, f' column)


def naive_f_prime(u, divergence, alpha):
    """f'(u) exactly as written in the spec's table, on the ratio u itself (float64, constants kept)."""
    if divergence == "reverse_kl":
        return torch.log(u) + 1.0
    if divergence == "forward_kl":
        return -1.0 / u
    if divergence == "js":
        return torch.log(2.0 * u / (1.0 + u))
    if divergence == "alpha":
        return (1.0 - u ** (-alpha)) / alpha
    raise AssertionError(divergence)


def naive_f_dpo(pc, pr, rc, rr, beta, divergence, alpha):
    """L = −log σ(β f'(u_w) − β f'(u_l)), rewards β (f'(u) − f'(1)), from the ratios u = π_θ/π_ref."""
    u_w = torch.exp(pc) / torch.exp(rc)
    u_l = torch.exp(pr) / torch.exp(rr)
    one = torch.ones((), dtype=torch.float64)
    f_w, f_l, f_1 = (naive_f_prime(u, divergence, alpha) for u in (u_w, u_l, one))
    margin = beta * f_w - beta * f_l
    loss = -torch.log(1.0 / (1.0 + torch.exp(-margin)))
    return loss, beta * (f_w - f_1), beta * (f_l - f_1)


def random_logps(seed, n=16):
    """Summed log-probs around −5..−30 (so exp() is exact in float64) with log-ratios within ±4."""
    g = torch.Generator().manual_seed(seed)
    ref = -5.0 - 25.0 * torch.rand(2, n, generator=g, dtype=torch.float64)
    pol = ref + 4.0 * (2.0 * torch.rand(2, n, generator=g, dtype=torch.float64) - 1.0)
    return pol[0], pol[1], ref[0], ref[1]


CASES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("js", 0.5)] + [("alpha", a) for a in ALPHAS]


@pytest.mark.parametrize("divergence,alpha", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_fdpo_matches_naive_reference(divergence, alpha, seed, beta):
    pc, pr, rc, rr = random_logps(seed)
    pc.requires_grad_(True)
    out = compute_loss(
        "f_dpo",
        policy_chosen_logps=pc,
        policy_rejected_logps=pr,
        reference_chosen_logps=rc,
        reference_rejected_logps=rr,
        beta=beta,
        divergence=divergence,
        alpha=alpha,
    )
    pc_ref = pc.detach().clone().requires_grad_(True)
    loss, r_w, r_l = naive_f_dpo(pc_ref, pr, rc, rr, beta, divergence, alpha)
    assert out.losses.dtype == torch.float64
    torch.testing.assert_close(out.losses, loss.detach(), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(out.chosen_rewards, r_w.detach(), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(out.rejected_rewards, r_l.detach(), rtol=1e-6, atol=1e-12)
    (grad,) = torch.autograd.grad(out.losses.sum(), pc)
    (grad_ref,) = torch.autograd.grad(loss.sum(), pc_ref)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-6, atol=1e-12)


# ---------------------------------------------------------------- hand-worked values


def test_reverse_kl_is_dpo_hand_value():
    """ℓ_w = 1, ℓ_l = −1, β = 0.5: margin = 0.5·(1 − (−1)) = 1, loss = log(1 + e^{−1}) = 0.3132617;
    rewards β ℓ = 0.5 and −0.5; and the same numbers from the registry's ``dpo``."""
    out = compute_loss("f_dpo", **pair([1.0], [-1.0]), beta=0.5)
    torch.testing.assert_close(out.losses, torch.tensor([0.31326168751822286], dtype=torch.float64))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.5], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.5], dtype=torch.float64))
    dpo = compute_loss("dpo", **pair([1.0], [-1.0]), beta=0.5)
    torch.testing.assert_close(out.losses, dpo.losses)


def test_forward_kl_hand_value():
    """u_w = 2, u_l = 1/2, β = 1: f'(u) = −1/u gives margin −1/2 − (−2) = 1.5,
    loss = log(1 + e^{−1.5}) = 0.2014133; rewards 1 − 1/u: 0.5 and −1."""
    out = compute_loss("f_dpo_forward_kl", **pair([math.log(2.0)], [-math.log(2.0)]), beta=1.0)
    torch.testing.assert_close(out.losses, torch.tensor([0.20141327798275246], dtype=torch.float64))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.5], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-1.0], dtype=torch.float64))


def test_js_hand_value():
    """u_w = 3, u_l = 1, β = 1: f'(3) = log(6/4) = log 1.5, f'(1) = log 1 = 0, margin log 1.5,
    σ(log 1.5) = 1.5/2.5 = 0.6, loss = log(5/3) = 0.5108256; win_prob 0.6."""
    out = compute_loss("f_dpo_js", **pair([math.log(3.0)], [0.0]), beta=1.0)
    torch.testing.assert_close(out.losses, torch.tensor([math.log(5.0 / 3.0)], dtype=torch.float64))
    torch.testing.assert_close(out.metrics["win_prob"], torch.tensor([0.6], dtype=torch.float64))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([math.log(1.5)], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([0.0], dtype=torch.float64))


def test_alpha_hand_value():
    """α = 0.5, u_w = 4, u_l = 1/4, β = 1: f'(4) = (1 − 4^{−1/2})/0.5 = 1, f'(1/4) = (1 − 2)/0.5 = −2,
    margin 3, loss = log(1 + e^{−3}) = 0.0485874."""
    out = compute_loss("f_dpo_alpha", **pair([math.log(4.0)], [-math.log(4.0)]), beta=1.0, alpha=0.5)
    torch.testing.assert_close(out.losses, torch.tensor([0.04858735157374206], dtype=torch.float64))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([1.0], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-2.0], dtype=torch.float64))


def test_rewards_zero_at_reference_and_win_prob_is_sigmoid_margin():
    """π_θ = π_ref gives u = 1, so every divergence's reward β(f'(1) − f'(1)) is 0 and the loss is log 2."""
    for name in ("f_dpo", "f_dpo_forward_kl", "f_dpo_js", "f_dpo_alpha"):
        out = compute_loss(name, **pair([0.0, 0.0], [0.0, 0.0]))
        torch.testing.assert_close(out.chosen_rewards, torch.zeros(2, dtype=torch.float64))
        torch.testing.assert_close(out.losses, torch.full((2,), math.log(2.0), dtype=torch.float64))
        torch.testing.assert_close(out.metrics["win_prob"], torch.full((2,), 0.5, dtype=torch.float64))
    out = compute_loss("f_dpo_js", **pair([2.0, -1.0], [0.5, 3.0]), beta=0.3)
    margin = out.chosen_rewards - out.rejected_rewards
    torch.testing.assert_close(out.metrics["win_prob"], torch.sigmoid(margin))
    assert not out.metrics["win_prob"].requires_grad and out.metrics["win_prob"].shape == (2,)


# ---------------------------------------------------------------- α limits and the TRL convention


def test_alpha_to_zero_recovers_reverse_kl():
    """(1 − e^{−αℓ})/α = ℓ − αℓ²/2 + O(α²): the loss approaches DPO's, the gap shrinking with α."""
    batch = pair([1.5, -2.0, 3.0], [-0.5, 1.0, 3.5])
    dpo = compute_loss("f_dpo", **batch).losses
    gaps = [
        (compute_loss("f_dpo_alpha", **batch, alpha=a).losses - dpo).abs().max().item()
        for a in (0.1, 1e-3, 1e-6)
    ]
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 1e-6


def test_alpha_one_gives_forward_kl():
    """α = 1 in the α-divergence's f' is forward KL's 1 − 1/u: exactly by the formula, at α = 1 itself,
    and as the limit α → 1."""
    ratio = torch.tensor([-3.0, -0.5, 0.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(
        f_prime_shifted(ratio, "alpha", 1.0, 50.0), f_prime_shifted(ratio, "forward_kl", 0.5, 50.0)
    )
    batch = pair([1.5, -2.0, 3.0], [-0.5, 1.0, 3.5])
    forward = compute_loss("f_dpo_forward_kl", **batch).losses
    near_one = compute_loss("f_dpo_alpha", **batch, alpha=1.0 - 1e-9).losses
    torch.testing.assert_close(near_one, forward, rtol=1e-7, atol=0.0)
    at_one = compute_loss("f_dpo_alpha", **batch, alpha=1.0)
    torch.testing.assert_close(at_one.losses, forward, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(at_one.chosen_rewards, compute_loss("f_dpo_forward_kl", **batch).chosen_rewards)


@pytest.mark.parametrize("alpha_paper", ALPHAS)
def test_fdpo_trl_new_alpha_convention_mapping(alpha_paper):
    """TRL ≥ 0.29 writes f'(t) = (t^{α_TRL − 1} − 1)/(α_TRL − 1). With α_TRL = 1 − α_paper this is
    (t^{−α} − 1)/(−α) = (1 − t^{−α})/α, the paper's f': the losses agree. α_TRL = α_paper instead gives a
    different loss whenever α_paper ≠ 1/2 (the pitfall the mapping avoids)."""

    def trl_loss(pc, pr, rc, rr, beta, alpha_trl):
        def f_prime(t):
            return (t ** (alpha_trl - 1.0) - 1.0) / (alpha_trl - 1.0)

        margin = beta * (f_prime(torch.exp(pc - rc)) - f_prime(torch.exp(pr - rr)))
        return -F.logsigmoid(margin)

    pc, pr, rc, rr = random_logps(7)
    ours = compute_loss(
        "f_dpo_alpha",
        policy_chosen_logps=pc,
        policy_rejected_logps=pr,
        reference_chosen_logps=rc,
        reference_rejected_logps=rr,
        beta=0.3,
        alpha=alpha_paper,
    ).losses
    torch.testing.assert_close(ours, trl_loss(pc, pr, rc, rr, 0.3, 1.0 - alpha_paper), rtol=1e-6, atol=1e-12)
    if abs(alpha_paper - 0.5) > 0.05:
        assert (ours - trl_loss(pc, pr, rc, rr, 0.3, alpha_paper)).abs().max() > 1e-3


# ---------------------------------------------------------------- numerics: ±2000 and beyond


@pytest.mark.parametrize("name", ["f_dpo", "f_dpo_forward_kl", "f_dpo_js", "f_dpo_alpha"])
def test_finite_and_correct_at_summed_log_ratios_of_2000(name):
    """fp32, ℓ ∈ {−2000, +2000}. A pair the policy already ranks right by 4000 nats has loss ≈ 0 for
    every divergence (JS: f'(u_w) − f'(u_l) = log σ(2000) − log σ(−2000) ≈ 2000, margin 0.1·2000 = 200).
    The swapped pair has a large finite loss, and its gradient pushes the chosen log-prob up (the capped
    exponent keeps a non-zero slope e^cap at ℓ_w = −2000 instead of clamping it to zero) and never
    pushes the rejected one up."""
    right = pair([2000.0], [-2000.0], dtype=torch.float32)
    wrong = {k: v.clone() for k, v in pair([-2000.0], [2000.0], dtype=torch.float32).items()}
    wrong["policy_chosen_logps"].requires_grad_(True)
    wrong["policy_rejected_logps"].requires_grad_(True)

    good = compute_loss(name, **right)
    assert torch.isfinite(good.losses).all() and good.losses.item() < 1e-6
    bad = compute_loss(name, **wrong)
    assert torch.isfinite(bad.losses).all() and bad.losses.item() > 1.0
    assert torch.isfinite(bad.chosen_rewards).all() and torch.isfinite(bad.rejected_rewards).all()
    grad_c, grad_r = torch.autograd.grad(
        bad.losses.sum(), [wrong["policy_chosen_logps"], wrong["policy_rejected_logps"]]
    )
    assert torch.isfinite(grad_c).all() and torch.isfinite(grad_r).all()
    assert grad_c.item() < 0.0 and grad_r.item() >= 0.0
    if name == "f_dpo":
        # Only reverse KL's f' is unbounded above; JS, forward KL and α tend to log 2, 1 and 1/α as
        # u → ∞, so at ℓ_l = 2000 their slopes (σ(−2000), e^{−2000}, e^{−2000α}) are genuinely 0.
        assert grad_r.item() > 0.0


def test_float32_stability_at_sums_of_minus_5000():
    """Summed log-probs of −5000 with gaps of thousands, in fp32 and bf16, for every divergence and α:
    losses, rewards and gradients are finite, and a bf16 input is computed in fp32."""
    pc = torch.tensor([-5000.0, -5000.0, -1000.0, -5000.0])
    pr = torch.tensor([-5000.0, -1000.0, -5000.0, -4990.0])
    rc = torch.tensor([-5000.0, -2000.0, -5000.0, -4000.0])
    rr = torch.tensor([-1000.0, -5000.0, -3000.0, -5000.0])
    for dtype in (torch.float32, torch.bfloat16):
        for name, alpha in [("f_dpo", 0.5), ("f_dpo_forward_kl", 0.5), ("f_dpo_js", 0.5)] + [
            ("f_dpo_alpha", a) for a in ALPHAS
        ]:
            tensors = [t.to(dtype).requires_grad_(True) for t in (pc, pr)]
            out = compute_loss(
                name,
                policy_chosen_logps=tensors[0],
                policy_rejected_logps=tensors[1],
                reference_chosen_logps=rc.to(dtype),
                reference_rejected_logps=rr.to(dtype),
                alpha=alpha,
            )
            assert out.losses.dtype == torch.float32
            assert torch.isfinite(out.losses).all(), (name, alpha, dtype)
            assert torch.isfinite(out.losses.mean())
            assert torch.isfinite(out.chosen_rewards).all() and torch.isfinite(out.rejected_rewards).all()
            grads = torch.autograd.grad(out.losses.mean(), tensors)
            assert all(torch.isfinite(g.float()).all() for g in grads), (name, alpha, dtype)


def test_exponents_below_the_cap_are_exact_in_fp32():
    """Forward KL at ℓ_w = −40 (e^{40} ≈ 2.35e17, below the cap 50) equals the float64 formula:
    margin = 0.1·((1 − e^{40}) − (1 − e^{0})) = −0.1·(e^{40} − 1), loss = −margin."""
    out = compute_loss("f_dpo_forward_kl", **pair([-40.0], [0.0], dtype=torch.float32))
    expected = 0.1 * (math.exp(40.0) - 1.0)
    assert out.losses.item() == pytest.approx(expected, rel=1e-6)
    assert out.metrics["f_dpo/exp_capped"].item() == 0.0
    capped = compute_loss("f_dpo_forward_kl", **pair([-60.0], [0.0], dtype=torch.float32))
    assert capped.metrics["f_dpo/exp_capped"].item() == 1.0


def test_capped_expm1_is_continuous_with_its_slope_at_the_cap():
    """Below the cap e^z − 1; above, e^c (1 + z − c) − 1: at z = c + 2, e^c·3 − 1. The slope is e^c on
    both sides of the cap, and e^z − 1 is exact for tiny z (expm1)."""
    cap = 5.0
    z = torch.tensor([cap - 1e-9, cap + 1e-9, cap + 2.0, 1e-12], dtype=torch.float64, requires_grad=True)
    value = capped_expm1(z, cap)
    expected = torch.tensor(
        [math.exp(cap) - 1.0, math.exp(cap) - 1.0, 3.0 * math.exp(cap) - 1.0, 1e-12], dtype=torch.float64
    )
    torch.testing.assert_close(value.detach(), expected, rtol=1e-8, atol=1e-20)
    (grad,) = torch.autograd.grad(value.sum(), z)
    slope = torch.full((3,), math.exp(cap), dtype=torch.float64)
    torch.testing.assert_close(grad[:3], slope, rtol=1e-8, atol=0)


def test_exp_cap_setting_is_used():
    """With exp_cap = 1, forward KL at ℓ_w = −3 uses e^1·(1 + 3 − 1) = 3e: margin = 0.1·((1 − 3e) − 0),
    loss = softplus(0.1·(3e − 1))."""
    out = compute_loss("f_dpo_forward_kl", **pair([-3.0], [0.0]), exp_cap=1.0)
    expected = math.log1p(math.exp(0.1 * (3.0 * math.e - 1.0)))
    assert out.losses.item() == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- configuration and registry


def test_registered_names_and_presets():
    assert get_loss_entry("f_dpo").defaults() == {
        "beta": 0.1,
        "divergence": "reverse_kl",
        "alpha": 0.5,
        "exp_cap": 50.0,
    }
    assert build_loss("f_dpo_forward_kl").config.divergence == "forward_kl"
    assert build_loss("f_dpo_js").config.divergence == "js"
    assert build_loss("f_dpo_alpha").config.divergence == "alpha"
    assert get_loss_entry("f_dpo").cls.arxiv == "2309.16240"


def test_official_spellings_are_aliases():
    """``jsd`` / ``alpha_divergence`` (the official config values) give the same loss as js / alpha."""
    assert build_loss("f_dpo", divergence="jsd").config.divergence == "js"
    assert build_loss("f_dpo", divergence="alpha_divergence").config.divergence == "alpha"
    batch = pair([0.7, -1.2], [0.1, 0.4])
    torch.testing.assert_close(
        compute_loss("f_dpo", **batch, divergence="jsd").losses, compute_loss("f_dpo_js", **batch).losses
    )


@pytest.mark.parametrize(
    "hparams",
    [
        {"divergence": "chi2"},
        {"alpha": 0.0},
        {"alpha": 1.0 + 1e-9},
        {"alpha": -0.3},
        {"beta": 0.0},
        {"exp_cap": 100.0},
        {"exp_cap": 0.0},
    ],
)
def test_invalid_hyperparameters_are_rejected(hparams):
    with pytest.raises(LossConfigError):
        build_loss("f_dpo_alpha", **hparams)
