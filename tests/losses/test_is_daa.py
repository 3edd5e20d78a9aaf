"""IS-DAA (spec §3): the clipped, detached, joint importance weight times a base DAA loss."""

import math

import pytest
import torch

from dpo_zoo.losses import LossConfigError, LossInputError, build_loss, compute_loss, get_loss_entry
from dpo_zoo.losses.base import Need

from loss_inputs import F64, sequence_inputs, t


# ---------------------------------------------------------------- naive reference (spec §3 formulas)


def naive_is_daa(pc, pr, rc, rr, bc, br, beta, base, clip):
    """w = min(π_θ(y_w)π_θ(y_l) / (π_b(y_w)π_b(y_l)), C) from the probabilities themselves, then
    L = w · f_DAA(h); the weight is detached, so the gradient is w·∇f_DAA."""
    with torch.no_grad():
        ratio = (torch.exp(pc) * torch.exp(pr)) / (torch.exp(bc) * torch.exp(br))
        w = torch.minimum(ratio, torch.full_like(ratio, clip))
    h = (pc - rc) - (pr - rr)
    if base == "dpo":
        f = -torch.log(1.0 / (1.0 + torch.exp(-beta * h)))
    elif base == "ipo":
        f = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        f = torch.maximum(1.0 - beta * h, torch.zeros_like(h))
    return w * f, w


def random_batch(seed, n=16):
    """Summed log-probs in −5..−30, behaviour log-probs near the reference, so exp() is exact in float64
    and the joint weight spreads over roughly e^{±6} (both clipped and unclipped pairs)."""
    g = torch.Generator().manual_seed(seed)
    ref = -5.0 - 25.0 * torch.rand(2, n, generator=g, dtype=F64)
    pol = ref + 3.0 * (2.0 * torch.rand(2, n, generator=g, dtype=F64) - 1.0)
    beh = ref + 0.5 * (2.0 * torch.rand(2, n, generator=g, dtype=F64) - 1.0)
    return pol[0], pol[1], ref[0], ref[1], beh[0], beh[1]


CLIPS = [
    {"eps": 0.0},
    {"eps": 0.25},
    {"eps": 1.0},
    {"clip_max": 1.2},
    {"clip_max": 4.0},
    {"clip_max": math.inf},
]


def clip_value(clip):
    return math.exp(2.0 * clip["eps"]) if "eps" in clip else clip["clip_max"]


@pytest.mark.parametrize("base", ["dpo", "ipo", "hinge"])
@pytest.mark.parametrize("clip", CLIPS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_behavior", [False, True])
def test_is_daa_matches_naive_reference(base, clip, seed, with_behavior):
    pc, pr, rc, rr, bc, br = random_batch(seed)
    pc = pc.requires_grad_(True)
    tensors = sequence_inputs(pc, pr, rc, rr)
    if with_behavior:
        tensors.update(behavior_chosen_logps=bc, behavior_rejected_logps=br)
    else:
        bc, br = rc, rr
    out = compute_loss("is_daa", **tensors, base=base, beta=0.2, **clip)

    pc_ref = pc.detach().clone().requires_grad_(True)
    loss, w = naive_is_daa(pc_ref, pr, rc, rr, bc, br, 0.2, base, clip_value(clip))
    torch.testing.assert_close(out.losses, loss.detach(), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(out.metrics["is/weight"], w, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(out.chosen_rewards, 0.2 * (pc - rc).detach(), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(out.rejected_rewards, 0.2 * (pr - rr), rtol=1e-6, atol=1e-12)
    (grad,) = torch.autograd.grad(out.losses.sum(), pc)
    (grad_ref,) = torch.autograd.grad(loss.sum(), pc_ref)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-6, atol=1e-12)


# ---------------------------------------------------------------- reductions the spec names


@pytest.mark.parametrize("base", ["dpo", "ipo", "hinge"])
def test_weight_one_gives_the_base_daa(base):
    """Behaviour log-probs equal to the policy's make log w = 0, w = 1: the base loss exactly."""
    pc, pr, rc, rr, _, _ = random_batch(3)
    tensors = sequence_inputs(pc, pr, rc, rr)
    out = compute_loss("is_daa", **tensors, behavior_chosen_logps=pc, behavior_rejected_logps=pr, base=base)
    plain = compute_loss(base, **tensors)
    assert torch.equal(out.metrics["is/weight"], torch.ones(16, dtype=F64))
    torch.testing.assert_close(out.losses, plain.losses, rtol=0, atol=0)
    torch.testing.assert_close(out.chosen_rewards, plain.chosen_rewards, rtol=0, atol=0)


def test_policy_at_reference_gives_dpo():
    """At initialisation π_θ = π_ref = π_b, so w = 1 and IS-DPO is DPO (loss log 2 at h = 0)."""
    logps = t(-7.0, -20.0)
    out = compute_loss(
        "is_daa",
        policy_chosen_logps=logps,
        policy_rejected_logps=logps - 1.0,
        reference_chosen_logps=logps,
        reference_rejected_logps=logps - 1.0,
    )
    torch.testing.assert_close(out.losses, torch.full((2,), math.log(2.0), dtype=F64))


def test_clip_one_is_not_dpo():
    """C = 1 (eps = 0), β = 0.1, h = 0 in both pairs so DPO's loss is log 2 = 0.693147 for each.
    Pair 1: log w = (−9 + 10) + (−12 + 12) = 1 ≥ 0 → w = min(e, 1) = 1 → loss log 2 (DPO's).
    Pair 2: log w = (−11 + 10) + (−13 + 12) = −2 → w = e^{−2} = 0.135335 → loss 0.135335·0.693147
    = 0.0938061, shrunk below DPO's."""
    out = compute_loss(
        "is_daa",
        policy_chosen_logps=t(-9.0, -11.0),
        policy_rejected_logps=t(-12.0, -13.0),
        reference_chosen_logps=t(-10.0, -10.0),
        reference_rejected_logps=t(-13.0, -12.0),
        eps=0.0,
    )
    # h: pair 1 (1) − (1) = 0; pair 2 (−1) − (−1) = 0.
    dpo = math.log(2.0)
    torch.testing.assert_close(out.losses, t(dpo, math.exp(-2.0) * dpo))
    torch.testing.assert_close(out.metrics["is/weight"], t(1.0, math.exp(-2.0)))
    assert out.metrics["is/clipped"].item() == 0.5
    assert out.losses[1] < dpo


def test_gradient_is_weight_times_base_gradient():
    """∇L = w ∇f_DPO with w detached: the gradient wrt every log-prob equals w times DPO's."""
    pc, pr, rc, rr, bc, br = random_batch(5)
    leaves = [x.clone().requires_grad_(True) for x in (pc, pr)]
    out = compute_loss(
        "is_daa",
        policy_chosen_logps=leaves[0],
        policy_rejected_logps=leaves[1],
        reference_chosen_logps=rc,
        reference_rejected_logps=rr,
        behavior_chosen_logps=bc,
        behavior_rejected_logps=br,
        eps=1.0,
    )
    grads = torch.autograd.grad(out.losses.sum(), leaves)
    leaves2 = [x.clone().requires_grad_(True) for x in (pc, pr)]
    dpo = compute_loss(
        "dpo",
        policy_chosen_logps=leaves2[0],
        policy_rejected_logps=leaves2[1],
        reference_chosen_logps=rc,
        reference_rejected_logps=rr,
    )
    dpo_grads = torch.autograd.grad(dpo.losses.sum(), leaves2)
    w = out.metrics["is/weight"]
    assert not w.requires_grad
    assert (w < 1).any() and (w > 1).any()  # the check is not vacuous: weights differ from 1
    for g, g_dpo in zip(grads, dpo_grads):
        torch.testing.assert_close(g, w * g_dpo, rtol=1e-12, atol=1e-15)


def test_behavior_logps_are_used_when_given():
    """β = 0.1, eps = 1 (C = e² ≈ 7.389). ℓ_w = −10 + 11 = 1, ℓ_l = 0, h = 1, DPO loss softplus(−0.1).
    Without behaviour log-probs π_b = π_ref: log w = 1 + 0 = 1, w = e.
    With π_b(y_w) = −10.2, π_b(y_l) = −12.1: log w = 0.2 + 0.1 = 0.3, w = e^{0.3} = 1.3498588."""
    tensors = dict(
        policy_chosen_logps=t(-10.0),
        policy_rejected_logps=t(-12.0),
        reference_chosen_logps=t(-11.0),
        reference_rejected_logps=t(-12.0),
    )
    base = math.log1p(math.exp(-0.1))
    without = compute_loss("is_daa", **tensors, eps=1.0)
    with_b = compute_loss(
        "is_daa", **tensors, behavior_chosen_logps=t(-10.2), behavior_rejected_logps=t(-12.1), eps=1.0
    )
    torch.testing.assert_close(without.losses, t(math.e * base))
    torch.testing.assert_close(with_b.losses, t(math.exp(0.3) * base))
    torch.testing.assert_close(with_b.metrics["is/log_weight"], t(0.3))


def test_one_behavior_tensor_alone_is_an_error():
    tensors = dict(
        policy_chosen_logps=t(-1.0),
        policy_rejected_logps=t(-2.0),
        reference_chosen_logps=t(-1.0),
        reference_rejected_logps=t(-2.0),
    )
    with pytest.raises(LossInputError, match="behavior_rejected_logps"):
        compute_loss("is_daa", **tensors, behavior_chosen_logps=t(-1.0))


def test_clip_hand_value_and_metrics():
    """Default eps = 0.25 → C = e^{0.5} = 1.6487213. Pair 1: log w = 1 > 0.5 → w = C, clipped.
    Pair 2: log w = −0.2 → w = e^{−0.2} = 0.8187308, not clipped. is/clipped = 1/2.
    win_prob = σ(β h): pair 1 h = 1 − 0 = 1 → σ(0.1) = 0.5249792; pair 2 h = −0.2 − 0 → σ(−0.02)."""
    out = compute_loss(
        "is_daa",
        policy_chosen_logps=t(-9.0, -10.2),
        policy_rejected_logps=t(-12.0, -12.0),
        reference_chosen_logps=t(-10.0, -10.0),
        reference_rejected_logps=t(-12.0, -12.0),
    )
    torch.testing.assert_close(out.metrics["is/weight"], t(math.exp(0.5), math.exp(-0.2)))
    assert out.metrics["is/clipped"].shape == () and out.metrics["is/clipped"].item() == 0.5
    torch.testing.assert_close(out.metrics["win_prob"], t(1 / (1 + math.exp(-0.1)), 1 / (1 + math.exp(0.02))))
    torch.testing.assert_close(
        out.losses, t(math.exp(0.5) * math.log1p(math.exp(-0.1)), math.exp(-0.2) * math.log1p(math.exp(0.02)))
    )


def test_is_ipo_is_the_released_script():
    """is_ipo: base ipo, eps = 1 (C = e²), β = 0.05 → target 1/(2·0.05) = 10. With h = 1 and
    log w = 1 (< 2, unclipped): loss = e·(1 − 10)² = 81e = 220.1796."""
    entry = get_loss_entry("is_ipo")
    assert entry.presets == {"base": "ipo", "eps": 1.0, "beta": 0.05}
    out = compute_loss(
        "is_ipo",
        policy_chosen_logps=t(-10.0),
        policy_rejected_logps=t(-12.0),
        reference_chosen_logps=t(-11.0),
        reference_rejected_logps=t(-12.0),
    )
    torch.testing.assert_close(out.losses, t(81.0 * math.e))


# ---------------------------------------------------------------- configuration


def test_clip_max_overrides_default_eps_and_agreeing_values_are_fine():
    assert build_loss("is_daa").config.log_clip == pytest.approx(0.5)
    assert build_loss("is_daa", clip_max=3.0).config.log_clip == pytest.approx(math.log(3.0))
    assert build_loss("is_daa", eps=0.5, clip_max=math.e).config.log_clip == pytest.approx(1.0)
    assert build_loss("is_daa", clip_max=math.inf).config.log_clip == math.inf
    assert build_loss("is_daa", eps=0.25).config.log_clip == pytest.approx(0.5)
    assert build_loss("is_daa", eps=0.25, clip_max=math.exp(0.5)).config.log_clip == pytest.approx(0.5)
    assert build_loss("is_ipo", eps=0.0).config.log_clip == 0.0


@pytest.mark.parametrize(
    "name,hparams",
    [
        ("is_daa", {"eps": 0.5, "clip_max": 3.0}),
        ("is_daa", {"eps": 0.25, "clip_max": 3.0}),  # eps set to its default value still disagrees
        ("is_daa", {"eps": 0.0, "clip_max": math.inf}),
        ("is_ipo", {"clip_max": 3.0}),  # the preset eps = 1 disagrees: override eps instead
        ("is_daa", {"clip_max": 0.5}),
        ("is_daa", {"eps": -0.1}),
        ("is_daa", {"base": "kto"}),
        ("is_daa", {"beta": -1.0}),
        ("is_daa", {"label_smoothing": 0.1}),
    ],
)
def test_invalid_configs_are_rejected(name, hparams):
    with pytest.raises(LossConfigError):
        build_loss(name, **hparams)


def test_declares_behavior_logps_as_optional():
    cls = get_loss_entry("is_daa").cls
    assert Need.BEHAVIOR_LOGPS in cls.optional and Need.BEHAVIOR_LOGPS not in cls.requires
    assert cls.arxiv == "2506.08681"


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("base", ["dpo", "ipo", "hinge"])
def test_float32_stability_at_sums_of_minus_5000(base):
    """fp32 and bf16 sums of −5000 with gaps of thousands: log w ranges from −8000 (w = 0) to +5000
    (clipped to C); losses, weights and gradients are finite."""
    pc = torch.tensor([-5000.0, -1000.0, -5000.0, -3000.0])
    pr = torch.tensor([-5000.0, -2000.0, -1000.0, -5000.0])
    rc = torch.tensor([-1000.0, -5000.0, -5000.0, -5000.0])
    rr = torch.tensor([-1000.0, -3000.0, -5000.0, -4000.0])
    for dtype in (torch.float32, torch.bfloat16):
        leaves = [x.to(dtype).requires_grad_(True) for x in (pc, pr)]
        out = compute_loss(
            "is_daa",
            policy_chosen_logps=leaves[0],
            policy_rejected_logps=leaves[1],
            reference_chosen_logps=rc.to(dtype),
            reference_rejected_logps=rr.to(dtype),
            base=base,
        )
        assert out.losses.dtype == torch.float32
        assert torch.isfinite(out.losses).all() and torch.isfinite(out.losses.mean())
        weights = out.metrics["is/weight"]
        assert weights[0].item() == 0.0 and weights[1].item() == pytest.approx(math.exp(0.5), rel=1e-6)
        grads = torch.autograd.grad(out.losses.mean(), leaves)
        assert all(torch.isfinite(g.float()).all() for g in grads)
