"""Tie-aware DPO (spec §7): Rao–Kupper, Davidson and ties-as-wins; every property the spec lists."""

import math

import pytest
import torch

from dpo_zoo.losses import LossConfigError, LossInputError, build_loss, compute_loss, get_loss_entry
from dpo_zoo.losses.base import Need

from loss_inputs import F64, sequence_inputs


def margins(d, ties, beta=1.0, dtype=F64, requires_grad=False):
    """Tensors whose DPO reward margin β h equals ``d`` (reference −10/−12, policy shifted by d/β)."""
    d = torch.as_tensor(d, dtype=dtype)
    pc = (torch.full_like(d, -10.0) + d / beta).requires_grad_(requires_grad)
    return dict(
        policy_chosen_logps=pc,
        policy_rejected_logps=torch.full_like(d, -12.0),
        reference_chosen_logps=torch.full_like(d, -10.0),
        reference_rejected_logps=torch.full_like(d, -12.0),
        is_tie=torch.as_tensor(ties, dtype=torch.bool).expand(d.shape).clone(),
    )


def outcome_probs(name, d, **hparams):
    """(p_win, p_tie, p_lose) from the loss's metrics at margins d."""
    out = compute_loss(name, **margins(d, False), **hparams)
    return out.metrics["win_prob"], out.metrics["tie_prob"], out.metrics["tie/prob_lose"]


# ---------------------------------------------------------------- naive reference from the λ forms


def naive_tie_loss(pc, pr, rc, rr, ties, beta, model, nu):
    """Strengths λ = e^{r}, r = β ℓ_θ; the spec's ratio forms, then −log of the observed outcome.
    Rao–Kupper: win λ_w/(λ_w + νλ_l), tie (ν²−1)λ_wλ_l/((λ_w+νλ_l)(λ_l+νλ_w)).
    Davidson: win λ_w/(λ_w + λ_l + 2ν√(λ_wλ_l)), tie 2ν√(λ_wλ_l)/(same). BT: λ_w/(λ_w + λ_l), ties as wins."""
    lam_w = torch.exp(beta * (pc - rc))
    lam_l = torch.exp(beta * (pr - rr))
    if model == "rao_kupper":
        win = lam_w / (lam_w + nu * lam_l)
        tie = (nu**2 - 1.0) * lam_w * lam_l / ((lam_w + nu * lam_l) * (lam_l + nu * lam_w))
    elif model == "davidson":
        denom = lam_w + lam_l + 2.0 * nu * torch.sqrt(lam_w * lam_l)
        win = lam_w / denom
        tie = 2.0 * nu * torch.sqrt(lam_w * lam_l) / denom
    else:
        win = lam_w / (lam_w + lam_l)
        return -torch.log(win), win, torch.zeros_like(win)
    loss = torch.where(ties, -torch.log(tie), -torch.log(win))
    return loss, win, tie


def random_batch(seed, n=24):
    g = torch.Generator().manual_seed(seed)
    ref = -5.0 - 30.0 * torch.rand(2, n, generator=g, dtype=F64)
    pol = ref + 8.0 * (2.0 * torch.rand(2, n, generator=g, dtype=F64) - 1.0)
    ties = torch.rand(n, generator=g) < 0.4
    return pol[0], pol[1], ref[0], ref[1], ties


MODEL_NUS = (
    [("rao_kupper", nu) for nu in (1.0, 1.5, 3.0, 10.0)]
    + [("davidson", nu) for nu in (0.0, 0.5, 1.0, 3.0)]
    + [("bradley_terry", None)]
)


@pytest.mark.parametrize("model,nu", MODEL_NUS)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_tie_dpo_matches_naive_reference(model, nu, seed, beta):
    pc, pr, rc, rr, ties = random_batch(seed)
    hparams = {"model": model, "beta": beta}
    if model == "rao_kupper":
        hparams["nu_rk"] = nu
    elif model == "davidson":
        hparams["nu_d"] = nu
    leaf = pc.clone().requires_grad_(True)
    out = compute_loss(
        "tie_dpo",
        policy_chosen_logps=leaf,
        policy_rejected_logps=pr,
        reference_chosen_logps=rc,
        reference_rejected_logps=rr,
        is_tie=ties,
        **hparams,
    )
    leaf_ref = pc.clone().requires_grad_(True)
    loss, win, tie = naive_tie_loss(leaf_ref, pr, rc, rr, ties, beta, model, nu)
    torch.testing.assert_close(out.losses, loss.detach(), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(out.metrics["win_prob"], win.detach(), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(out.metrics["tie_prob"], tie.detach(), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(out.chosen_rewards, beta * (pc - rc), rtol=1e-6, atol=1e-12)
    finite = torch.isfinite(loss)
    (grad,) = torch.autograd.grad(out.losses[finite].sum(), leaf)
    # The naive form's own where() would give NaN gradients through log(0) in the ν_RK = 1 / ν_D = 0
    # limits, so its gradient is taken from the selected likelihood terms only.
    as_tie = ties & finite if model != "bradley_terry" else torch.zeros_like(ties)
    naive_total = -torch.log(win[~as_tie & finite]).sum() - torch.log(tie[as_tie]).sum()
    (grad_ref,) = torch.autograd.grad(naive_total, leaf_ref)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-6, atol=1e-12)
    if (model, nu) in (("rao_kupper", 1.0), ("davidson", 0.0)):
        assert torch.isinf(out.losses[ties]).all() and torch.isfinite(out.losses[~ties]).all()


# ---------------------------------------------------------------- hand-worked values


def test_rao_kupper_hand_values():
    """ν = 3 (a = log 3). d = 0: win σ(−log 3) = 1/4, lose 1/4, tie 8·(1/4)(1/4) = 1/2; losses
    −log(1/4) = 1.3862944 (win pair), −log(1/2) = 0.6931472 (tie pair).
    d = 2 log 3 (β = 0.5, h = 4 log 3): win σ(d − a) = σ(log 3) = 3/4, lose σ(−3 log 3) = 1/28,
    tie 8·(3/4)(1/28) = 6/28; 3/4 + 1/28 + 6/28 = 1. Losses −log(3/4) = 0.2876821 (win) and
    −log(3/14) = 1.5404450 (tie)."""
    d = [0.0, 0.0, 2 * math.log(3.0), 2 * math.log(3.0)]
    out = compute_loss("dpo_rk", **margins(d, [False, True, False, True], beta=0.5), beta=0.5)
    expected = [math.log(4.0), math.log(2.0), math.log(4.0 / 3.0), math.log(14.0 / 3.0)]
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=F64))
    torch.testing.assert_close(out.metrics["win_prob"], torch.tensor([0.25, 0.25, 0.75, 0.75], dtype=F64))
    torch.testing.assert_close(out.metrics["tie_prob"], torch.tensor([0.5, 0.5, 6 / 28, 6 / 28], dtype=F64))
    lose = torch.tensor([0.25, 0.25, 1 / 28, 1 / 28], dtype=F64)
    torch.testing.assert_close(out.metrics["tie/prob_lose"], lose)
    assert out.metrics["tie/tie_fraction"].item() == 0.5


def test_davidson_hand_values():
    """ν = 1. d = 0: denominator 1 + 1 + 2 = 4, win 1/4, tie 2/4. d = 2 log 2 (e^{−d/2} = 1/2):
    denominator 1 + 1/4 + 2·1·(1/2) = 9/4, win 4/9, tie 1/(9/4) = 4/9, lose (1/4)/(9/4) = 1/9.
    Losses: −log(1/4) = 1.3862944, −log(1/2), −log(4/9) = 0.8109302 (win and tie pairs alike)."""
    d = [0.0, 0.0, 2 * math.log(2.0), 2 * math.log(2.0)]
    out = compute_loss("dpo_davidson", **margins(d, [False, True, False, True]), beta=1.0)
    expected = [math.log(4.0), math.log(2.0), math.log(9 / 4), math.log(9 / 4)]
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=F64))
    torch.testing.assert_close(out.metrics["tie/prob_lose"][2], torch.tensor(1 / 9, dtype=F64))


def test_defaults_make_equal_strengths_tie_with_probability_half():
    for name in ("tie_dpo", "dpo_rk", "dpo_davidson"):
        _, tie, _ = outcome_probs(name, [0.0])
        assert tie.item() == pytest.approx(0.5, abs=1e-15)


# ---------------------------------------------------------------- properties from the paper's text

D_GRID = [-30.0, -4.0, -1.0, -0.1, 0.0, 0.3, 2.0, 7.0, 30.0]
RK_NUS = [1.0, 1.01, 2.0, 3.0, 10.0]
D_NUS = [0.0, 0.25, 1.0, 4.0]


def param_cases():
    return [("dpo_rk", {"nu_rk": nu}) for nu in RK_NUS] + [("dpo_davidson", {"nu_d": nu}) for nu in D_NUS]


@pytest.mark.parametrize("name,hparams", param_cases())
def test_three_outcome_probabilities_sum_to_one(name, hparams):
    win, tie, lose = outcome_probs(name, D_GRID, beta=1.0, **hparams)
    torch.testing.assert_close(win + tie + lose, torch.ones(len(D_GRID), dtype=F64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("name,hparams", param_cases())
def test_tie_probability_symmetric_and_win_lose_swap(name, hparams):
    """Swapping y_w and y_l maps d → −d: the tie probability is unchanged and win/lose exchange."""
    win, tie, lose = outcome_probs(name, D_GRID, beta=1.0, **hparams)
    win_s, tie_s, lose_s = outcome_probs(name, [-d for d in D_GRID], beta=1.0, **hparams)
    torch.testing.assert_close(tie_s, tie, rtol=1e-13, atol=1e-300)
    torch.testing.assert_close(win_s, lose, rtol=1e-13, atol=1e-300)
    torch.testing.assert_close(lose_s, win, rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("name,hparams", param_cases())
def test_tie_loss_symmetric_under_swapping_chosen_and_rejected(name, hparams):
    pc, pr, rc, rr, _ = random_batch(9)
    ties = torch.ones_like(pc, dtype=torch.bool)
    forward = compute_loss(
        name,
        policy_chosen_logps=pc,
        policy_rejected_logps=pr,
        reference_chosen_logps=rc,
        reference_rejected_logps=rr,
        is_tie=ties,
        **hparams,
    )
    swapped = compute_loss(
        name,
        policy_chosen_logps=pr,
        policy_rejected_logps=pc,
        reference_chosen_logps=rr,
        reference_rejected_logps=rc,
        is_tie=ties,
        **hparams,
    )
    torch.testing.assert_close(swapped.losses, forward.losses, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("seed", [0, 1])
def test_bradley_terry_recovered_at_nu_rk_one_and_nu_d_zero(seed):
    """ν_RK = 1 and ν_D = 0 give DPO's loss and win probability σ(βh) on win pairs and tie prob 0."""
    pc, pr, rc, rr, _ = random_batch(seed)
    tensors = sequence_inputs(pc, pr, rc, rr)
    wins = torch.zeros_like(pc, dtype=torch.bool)
    dpo = compute_loss("dpo", **tensors, beta=0.3)
    for name, hparams in (("dpo_rk", {"nu_rk": 1.0}), ("dpo_davidson", {"nu_d": 0.0})):
        out = compute_loss(name, **tensors, is_tie=wins, beta=0.3, **hparams)
        torch.testing.assert_close(out.losses, dpo.losses, rtol=1e-12, atol=1e-14)
        bt_win = torch.sigmoid(dpo.chosen_rewards - dpo.rejected_rewards)
        torch.testing.assert_close(out.metrics["win_prob"], bt_win, rtol=1e-12, atol=0)
        assert torch.equal(out.metrics["tie_prob"], torch.zeros_like(pc))


@pytest.mark.parametrize("nu", RK_NUS)
def test_rao_kupper_win_is_bradley_terry_shifted_by_alpha_rk(nu):
    """p_RK(y_w ≻ y_l | d) = σ(d − log ν): the RK win loss at d equals DPO's loss at margin d − log ν,
    and the win gradient is DPO's scale factor shifted: ∂L/∂d = −σ(−(d − log ν))."""
    d = torch.tensor(D_GRID, dtype=F64)
    tensors = margins(d, False, requires_grad=True)
    out = compute_loss("dpo_rk", **tensors, beta=1.0, nu_rk=nu)
    shifted = margins(d - math.log(nu), False)
    shifted.pop("is_tie")
    dpo_at_shifted_margin = compute_loss("dpo", **shifted, beta=1.0).losses
    torch.testing.assert_close(out.losses, dpo_at_shifted_margin, rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad(out.losses.sum(), tensors["policy_chosen_logps"])
    torch.testing.assert_close(grad, -torch.sigmoid(-(d - math.log(nu))), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("nu", D_NUS)
def test_davidson_tie_is_geometric_mean_of_win_and_lose(nu):
    win, tie, lose = outcome_probs("dpo_davidson", D_GRID, beta=1.0, nu_d=nu)
    torch.testing.assert_close(tie, 2.0 * nu * torch.sqrt(win * lose), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("nu", RK_NUS)
def test_rao_kupper_equal_strengths_ratio(nu):
    """d = 0: P_RK(tie) = (ν − 1)/2 · P_RK(no tie). (ν = 3: 1/2 = 1·(1/4 + 1/4).)"""
    win, tie, lose = outcome_probs("dpo_rk", [0.0], nu_rk=nu)
    torch.testing.assert_close(tie, (nu - 1.0) / 2.0 * (win + lose), rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("nu", D_NUS)
def test_davidson_equal_strengths_ratio(nu):
    """d = 0: P_D(tie) = ν · P_D(no tie). (ν = 1: 2/4 = 1·(1/4 + 1/4).)"""
    win, tie, lose = outcome_probs("dpo_davidson", [0.0], nu_d=nu)
    torch.testing.assert_close(tie, nu * (win + lose), rtol=1e-13, atol=1e-16)


TIE_CAPABLE = [("dpo_rk", {"nu_rk": nu}) for nu in (1.5, 3.0, 10.0)] + [
    ("dpo_davidson", {"nu_d": nu}) for nu in (0.25, 1.0, 4.0)
]


@pytest.mark.parametrize("name,hparams", TIE_CAPABLE)
def test_tie_gradient_drives_margin_to_zero(name, hparams):
    """On tie pairs ∂L/∂d has the sign of d (descent moves d toward 0), is zero at d = 0 and is odd.
    RK: ∂L/∂d = σ(d + a) − σ(a − d); Davidson: ∂L/∂d = (e^{d/2} − e^{−d/2}) / (2 Z)."""
    grid = [-5.0, -1.0, -0.2, 0.0, 0.2, 1.0, 5.0]
    d = torch.tensor(grid, dtype=F64)
    tensors = margins(d, True, requires_grad=True)
    out = compute_loss(name, **tensors, beta=1.0, **hparams)
    (grad,) = torch.autograd.grad(out.losses.sum(), tensors["policy_chosen_logps"])
    assert torch.equal(torch.sign(grad), torch.sign(d))
    assert grad[3].item() == 0.0
    torch.testing.assert_close(grad.flip(0), -grad, rtol=1e-12, atol=1e-15)
    if name == "dpo_rk":
        a = math.log(hparams["nu_rk"])
        torch.testing.assert_close(grad, torch.sigmoid(d + a) - torch.sigmoid(a - d), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name,hparams", [("dpo_rk", {"nu_rk": 1.0}), ("dpo_davidson", {"nu_d": 0.0})])
def test_bradley_terry_limit_gives_infinite_loss_on_ties_only(name, hparams):
    """ν_RK = 1 / ν_D = 0: the tie likelihood is 0, so tie pairs get +∞; the win pairs in the same batch
    keep finite losses and finite, non-NaN gradients (the per-pair ``where`` avoids 0·∞)."""
    tensors = margins([0.5, -1.0, 2.0], [True, False, False], requires_grad=True)
    out = compute_loss(name, **tensors, **hparams)
    assert out.losses[0].item() == math.inf
    assert torch.isfinite(out.losses[1:]).all()
    (grad,) = torch.autograd.grad(out.losses[1:].sum(), tensors["policy_chosen_logps"])
    assert torch.isfinite(grad).all() and grad[0].item() == 0.0 and (grad[1:] < 0).all()


def test_ties_as_wins_is_dpo_on_every_pair():
    """dpo_ties_as_wins (the paper's DPO(CP+TP)): the tie flag does not change the loss, which is DPO's."""
    pc, pr, rc, rr, ties = random_batch(4)
    assert ties.any() and not ties.all()
    tensors = sequence_inputs(pc, pr, rc, rr)
    out = compute_loss("dpo_ties_as_wins", **tensors, is_tie=ties)
    dpo = compute_loss("dpo", **tensors)
    torch.testing.assert_close(out.losses, dpo.losses, rtol=1e-12, atol=1e-14)
    assert torch.equal(out.metrics["tie_prob"], torch.zeros_like(pc))


# ---------------------------------------------------------------- numerics, inputs and configuration


@pytest.mark.parametrize("name", ["dpo_rk", "dpo_davidson", "dpo_ties_as_wins"])
def test_float32_stability_at_sums_of_minus_5000(name):
    """fp32/bf16 sums of −5000 with gaps of thousands (d = 0.1·h up to ±800) on win and tie pairs:
    losses (ν > 1, ν_D > 0) and gradients are finite, and the three probabilities still sum to 1."""
    pc = torch.tensor([-5000.0, -1000.0, -5000.0, -1000.0, -5000.0])
    pr = torch.tensor([-1000.0, -5000.0, -1000.0, -5000.0, -5000.0])
    rc = torch.tensor([-5000.0, -5000.0, -5000.0, -5000.0, -5000.0])
    rr = torch.tensor([-5000.0, -1000.0, -5000.0, -1000.0, -5000.0])
    ties = torch.tensor([False, False, True, True, True])
    for dtype in (torch.float32, torch.bfloat16):
        leaves = [x.to(dtype).requires_grad_(True) for x in (pc, pr)]
        out = compute_loss(
            name,
            policy_chosen_logps=leaves[0],
            policy_rejected_logps=leaves[1],
            reference_chosen_logps=rc.to(dtype),
            reference_rejected_logps=rr.to(dtype),
            is_tie=ties,
        )
        assert out.losses.dtype == torch.float32 and torch.isfinite(out.losses).all()
        total = out.metrics["win_prob"] + out.metrics["tie_prob"] + out.metrics["tie/prob_lose"]
        torch.testing.assert_close(total, torch.ones(5), rtol=0, atol=1e-6)
        grads = torch.autograd.grad(out.losses.mean(), leaves)
        assert all(torch.isfinite(g.float()).all() for g in grads)


def test_missing_or_misshapen_tie_flags_are_errors():
    tensors = margins([0.0, 1.0], False)
    tensors.pop("is_tie")
    with pytest.raises(LossInputError, match="is_tie"):
        compute_loss("tie_dpo", **tensors)
    with pytest.raises(LossInputError, match="is_tie"):
        compute_loss("tie_dpo", **tensors, is_tie=torch.tensor([True, False, True]))


def test_tie_flags_may_be_given_as_numbers():
    tensors = margins([0.0, 1.0], False)
    tensors["is_tie"] = torch.tensor([1.0, 0.0])
    out = compute_loss("tie_dpo", **tensors, beta=1.0)
    as_bool = compute_loss("tie_dpo", **margins([0.0, 1.0], [True, False]), beta=1.0)
    torch.testing.assert_close(out.losses, as_bool.losses)


def test_registry_names_needs_and_defaults():
    defaults = {"beta": 0.1, "model": "rao_kupper", "nu_rk": 3.0, "nu_d": 1.0}
    assert get_loss_entry("tie_dpo").defaults() == defaults
    assert build_loss("dpo_rk").config.model == "rao_kupper"
    assert build_loss("dpo_davidson").config.model == "davidson"
    assert build_loss("dpo_ties_as_wins").config.model == "bradley_terry"
    cls = get_loss_entry("tie_dpo").cls
    assert Need.TIES in cls.requires and Need.SEQUENCE_LOGPS in cls.requires
    assert cls.arxiv == "2409.17431"


@pytest.mark.parametrize(
    "hparams", [{"nu_rk": 0.9}, {"nu_d": -0.1}, {"model": "thurstone"}, {"beta": 0.0}, {"nu_rk": math.inf}]
)
def test_invalid_hyperparameters_are_rejected(hparams):
    with pytest.raises(LossConfigError):
        build_loss("tie_dpo", **hparams)


@pytest.mark.parametrize("d, nu", [(61.766, 0.3), (80.0, 1.0), (-80.0, 1.0), (40.0, 1.0), (-40.0, 2.0)])
def test_davidson_keeps_relative_precision_when_an_outcome_is_nearly_certain(d, nu):
    """−log p_win = log(1 + e^{−d} + 2ν e^{−d/2}) by hand (log1p), to 1e-9 relative even when it is
    ~1e-14: the symmetric ``d/2 − log Z`` form alone cancels two large terms there."""
    pair = dict(policy_chosen_logps=torch.tensor([d], dtype=F64), policy_rejected_logps=torch.zeros(1, dtype=F64),
                reference_chosen_logps=torch.zeros(1, dtype=F64), reference_rejected_logps=torch.zeros(1, dtype=F64))
    out = compute_loss("dpo_davidson", **pair, is_tie=torch.tensor([False]), beta=1.0, nu_d=nu)
    exact = math.log1p(math.exp(-d) + 2 * nu * math.exp(-d / 2)) if d > 0 else -d + math.log1p(math.exp(d) + 2 * nu * math.exp(d / 2))
    assert out.losses.item() == pytest.approx(exact, rel=1e-9, abs=0.0)
    swapped = compute_loss("dpo_davidson", **{**pair, "policy_chosen_logps": pair["policy_rejected_logps"],
                                             "policy_rejected_logps": pair["policy_chosen_logps"]},
                           is_tie=torch.tensor([False]), beta=1.0, nu_d=nu)
    p_win, p_lose = math.exp(-out.losses.item()), math.exp(-swapped.losses.item())  # p_lose(d) = p_win(−d)
    p_tie = 2 * nu * math.sqrt(p_win * p_lose)  # Davidson: the tie is 2ν × the geometric mean
    assert p_win + p_tie + p_lose == pytest.approx(1.0, abs=1e-12)
