"""Ra-DPO (CVaR, official CVaR, entropic risk) and TDPO (spec §6): hand values on a 3-token vocabulary,
the orderings and reductions the spec states, a naive per-position implementation, top-k coarsening,
chunking, numerics and bounded memory."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dpo_zoo.losses import LossConfigError, LossInputError, Need, PairBatch, build_loss, check_inputs, compute_loss
from dpo_zoo.losses.ra_dpo import cvar_lower, cvar_official, entropic_risk, kl_divergence, linear_quantile

LN2 = math.log(2.0)
SIDES = ("chosen", "rejected")


def softplus_neg(x):
    """−log σ(x) = log(1 + e^{−x})."""
    return math.log1p(math.exp(-x))


def vocab_batch(B=2, T=6, V=11, dtype=torch.float64, seed=0, policy_grad=True):
    """Random reference and nearby policy distributions; each pair has a prompt and some padding."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for side in SIDES:
        ref_logits = 2.0 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
        pol_logits = ref_logits + 0.7 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
        out[f"reference_{side}_vocab_logps"] = ref_logits.log_softmax(-1).to(dtype)
        out[f"policy_{side}_vocab_logps"] = pol_logits.log_softmax(-1).to(dtype).requires_grad_(policy_grad)
        out[f"{side}_labels"] = torch.randint(0, V, (B, T), generator=g)
        start = torch.randint(0, 2, (B, 1), generator=g)
        stop = torch.randint(3, T + 1, (B, 1), generator=g)
        positions = torch.arange(T).unsqueeze(0)
        out[f"{side}_mask"] = (positions >= start) & (positions < stop)
    return out


def policy_grads(tensors):
    return {side: tensors[f"policy_{side}_vocab_logps"].grad for side in SIDES}


def run(name, tensors, **hparams):
    """Loss output and gradients of Σ losses w.r.t. both policy tensors (fresh leaves each call)."""
    fresh = {k: (v.detach().clone().requires_grad_(True) if k.startswith("policy_") else v) for k, v in tensors.items()}
    out = compute_loss(name, **fresh, **hparams)
    out.losses.sum().backward()
    return out, policy_grads(fresh)


# ====================================================================== a naive reference implementation


def naive_position_risk(ref, pol, risk, mu, split_vocab):
    """Φ of one position from its atoms' log-masses ``ref, pol`` ``[A]``, written independently:
    CVaR by the Rockafellar–Uryasev form sup_ν {ν − E[(ν − Z)^+]/μ} (the sup of this concave piecewise-
    linear function is at an atom); the official CVaR with ``torch.quantile``; ERM as −log E[e^{−μZ}]/μ."""
    p = ref.exp()
    z = ref - pol
    if risk == "kl":
        return (p * z).sum()
    if risk == "cvar":
        return torch.stack([nu - (p * torch.relu(nu - z)).sum() / mu for nu in z]).max()
    if risk == "erm":
        return -torch.log((p * torch.exp(-mu * z)).sum()) / mu
    if risk == "cvar_official":
        V = z.shape[0]
        halves = [(0, V // 2), (V // 2, V)] if split_vocab else [(0, V)]
        total = 0.0
        for lo, hi in halves:
            q = torch.quantile(z[lo:hi].detach(), 1.0 - mu)
            for i in range(lo, hi):
                if z[i] > q:
                    total = total + p[i] * z[i]
        return total
    raise ValueError(risk)


def naive_atoms(tensors, side, b, t, pol_row, topk):
    """The reference and policy log-masses of one position: the vocabulary, or the K top-k tokens plus
    one rest atom (masses summed directly with exp, not by the loss's masked logsumexp)."""
    if not topk:
        return tensors[f"reference_{side}_vocab_logps"][b, t], pol_row
    ids = tensors[f"reference_{side}_topk_ids"][b, t].tolist()
    ref_top = tensors[f"reference_{side}_topk_logps"][b, t]
    others = [i for i in range(pol_row.shape[0]) if i not in ids]
    if not others:
        return ref_top, pol_row[ids]
    rest_ref = torch.log1p(-ref_top.exp().sum()).reshape(1)
    rest_pol = torch.log(torch.stack([pol_row[i].exp() for i in others]).sum()).reshape(1)
    return torch.cat([ref_top, rest_ref]), torch.cat([pol_row[ids], rest_pol])


def naive_loss(tensors, beta=0.1, alpha=0.5, variant=1, risk="cvar", mu=0.95, split_vocab=True, topk=False):
    """Per pair, per position Python loops; returns the per-pair losses."""
    losses = []
    B = tensors["chosen_mask"].shape[0]
    for b in range(B):
        ratio, divergence = {}, {}
        for side in SIDES:
            pol = tensors[f"policy_{side}_vocab_logps"]
            ratio[side], divergence[side] = 0.0, 0.0
            for t in range(pol.shape[1]):
                if not tensors[f"{side}_mask"][b, t]:
                    continue
                label = int(tensors[f"{side}_labels"][b, t])
                ratio[side] = ratio[side] + pol[b, t, label] - tensors[f"reference_{side}_token_logps"][b, t]
                ref_atoms, pol_atoms = naive_atoms(tensors, side, b, t, pol[b, t], topk)
                divergence[side] = divergence[side] + naive_position_risk(ref_atoms, pol_atoms, risk, mu, split_vocab)
        if variant == 1:
            delta = divergence["rejected"] - divergence["chosen"]
        else:
            chosen = divergence["chosen"].detach() if torch.is_tensor(divergence["chosen"]) else divergence["chosen"]
            delta = alpha * (divergence["rejected"] - chosen)
        losses.append(torch.nn.functional.softplus(-beta * ((ratio["chosen"] - ratio["rejected"]) - delta)))
    return torch.stack(losses)


def with_reference_token_logps(tensors):
    out = dict(tensors)
    for side in SIDES:
        ref = tensors[f"reference_{side}_vocab_logps"]
        out[f"reference_{side}_token_logps"] = ref.gather(-1, tensors[f"{side}_labels"].unsqueeze(-1)).squeeze(-1)
    return out


def topk_of(tensors, K, give_rest=False, keep_full=False):
    """Replace the full reference by its top-K (what the cache stores), plus the label log-probs."""
    out = with_reference_token_logps(tensors)
    for side in SIDES:
        full = out[f"reference_{side}_vocab_logps"]
        values, ids = full.topk(K, dim=-1)
        out[f"reference_{side}_topk_logps"] = values
        out[f"reference_{side}_topk_ids"] = ids
        if give_rest:
            out[f"reference_{side}_rest_logmass"] = torch.log1p(-values.exp().sum(-1))
        if not keep_full:
            del out[f"reference_{side}_vocab_logps"]
    return out


# ====================================================================== registry and configuration


def test_registered_names_and_presets():
    expect = {
        "ra_dpo": dict(risk="cvar", variant=1, mu=0.95, beta=0.1, alpha=0.5, split_vocab=True),
        "ra_dpo2": dict(risk="cvar", variant=2, mu=0.95),
        "ra_dpo_official": dict(risk="cvar_official", variant=1, split_vocab=True, mu=0.95),
        "ra_dpo_erm": dict(risk="erm", variant=2, alpha=0.5, mu=5.0),  # as the authors ran it
        "tdpo": dict(risk="kl", variant=1, alpha=0.5, beta=0.1),  # official tdpo.yaml: if_tdpo2: false
        "tdpo1": dict(risk="kl", variant=1),
        "tdpo2": dict(risk="kl", variant=2),
    }
    for name, values in expect.items():
        config = build_loss(name).config
        for key, value in values.items():
            assert getattr(config, key) == value, (name, key)
    assert build_loss("ra_dpo").arxiv == "2505.20359"
    assert build_loss("tdpo").arxiv == "2404.11999"


@pytest.mark.parametrize(
    "hparams, match",
    [
        (dict(mu=0.0), "mu"),
        (dict(mu=1.5), "mu"),
        (dict(risk="erm", mu=0.0), "mu"),
        (dict(risk="var"), "risk"),
        (dict(variant=3), "variant"),
        (dict(alpha=-0.1), "alpha"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(beta=0.0), "beta"),
    ],
)
def test_invalid_hyperparameters_are_named(hparams, match):
    with pytest.raises(LossConfigError, match=match):
        build_loss("ra_dpo", **hparams)


def test_erm_accepts_mu_above_one_and_kl_ignores_mu():
    build_loss("ra_dpo", risk="erm", mu=9.0)
    build_loss("tdpo", mu=7.0)


# ====================================================================== hand values, 3-token vocabulary


def three_token_pair():
    """One pair, one response token each. Chosen: π_ref = (1/2, 1/4, 1/4), π_θ = (1/4, 1/4, 1/2), label 2.
    Rejected: π_θ = π_ref = (1/4, 1/2, 1/4), label 0. So ℓ_w = log(½/¼) = ln 2, ℓ_l = 0, and on the
    rejected side Z ≡ 0, every risk is 0."""
    log = lambda values: torch.tensor([[values]], dtype=torch.float64).log()
    return dict(
        reference_chosen_vocab_logps=log([0.5, 0.25, 0.25]),
        policy_chosen_vocab_logps=log([0.25, 0.25, 0.5]).requires_grad_(True),
        chosen_labels=torch.tensor([[2]]),
        chosen_mask=torch.tensor([[1]]),
        reference_rejected_vocab_logps=log([0.25, 0.5, 0.25]),
        policy_rejected_vocab_logps=log([0.25, 0.5, 0.25]).requires_grad_(True),
        rejected_labels=torch.tensor([[0]]),
        rejected_mask=torch.tensor([[1]]),
    )


def test_three_token_risk_values():
    """Chosen Z = log π_ref − log π_θ = (ln 2, 0, −ln 2) with masses (½, ¼, ¼).
    KL = ½ ln 2 + 0 − ¼ ln 2 = ¼ ln 2 = 0.1732868.
    CVaR μ=1: every atom, = KL. CVaR μ=0.5: Z sorted (−ln2: ¼, 0: ¼, ln2: ½), takes ¼, ¼, 0:
      (−¼ ln 2)/0.5 = −½ ln 2. CVaR μ=0.6: takes ¼, ¼, 0.1 (boundary split): (−¼ + 0.1) ln 2/0.6 = −¼ ln 2.
    ERM μ=2: −½ log Σ π_θ²/π_ref = −½ log((1/16)/½ + (1/16)/¼ + ¼/¼) = −½ log(1.375) = −0.1592269;
      μ=1: −log Σ π_θ = 0.
    Official, no split, μ=0.95: entries sorted (−ln2, 0, ln2), rank 0.05 × 2 = 0.1, q = −ln2 + 0.1 ln2
      = −0.9 ln 2; kept D > q: tokens 0 and 1: ½ ln 2 + ¼ × 0 = ½ ln 2 ≥ KL.
    Official, split (halves [0:1], [1:3]): half 1 = (ln 2), q = ln 2, nothing is > q; half 2 = (0, −ln 2),
      q = −ln 2 + 0.05 ln 2, keeps token 1 with D = 0: total 0."""
    t = three_token_pair()
    ref, pol = t["reference_chosen_vocab_logps"][0], t["policy_chosen_vocab_logps"][0].detach()
    assert kl_divergence(ref, pol).item() == pytest.approx(0.25 * LN2, rel=1e-12)
    assert cvar_lower(ref, pol, 1.0).item() == pytest.approx(0.25 * LN2, rel=1e-12)
    assert cvar_lower(ref, pol, 0.5).item() == pytest.approx(-0.5 * LN2, rel=1e-12)
    assert cvar_lower(ref, pol, 0.6).item() == pytest.approx(-0.25 * LN2, rel=1e-12)
    assert entropic_risk(ref, pol, 2.0).item() == pytest.approx(-0.5 * math.log(1.375), rel=1e-12)
    assert entropic_risk(ref, pol, 1.0).item() == pytest.approx(0.0, abs=1e-15)
    assert cvar_official(ref, pol, 0.95, split_vocab=False).item() == pytest.approx(0.5 * LN2, rel=1e-12)
    assert cvar_official(ref, pol, 0.95, split_vocab=True).item() == pytest.approx(0.0, abs=1e-15)


def test_entropic_risk_worked_example():
    """The specification's example: π_ref = (.7, .2, .1), π_θ = (.5, .45, .05), μ = 5.
    Σ π_ref^{−4} π_θ^5 = .7^−4·.5^5 + .2^−4·.45^5 + .1^−4·.05^5 = 0.130154 + 11.533008 + 0.003125 = 11.666287,
    Φ = −log(11.666287)/5 = −0.4913; KL = .7 ln(.7/.5) + .2 ln(.2/.45) + .1 ln(.1/.05) = 0.1427."""
    ref = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64).log()
    pol = torch.tensor([0.5, 0.45, 0.05], dtype=torch.float64).log()
    phi = entropic_risk(ref, pol, 5.0).item()
    assert phi == pytest.approx(-math.log(0.7**-4 * 0.5**5 + 0.2**-4 * 0.45**5 + 0.1**-4 * 0.05**5) / 5, rel=1e-12)
    assert round(phi, 3) == -0.491
    assert round(kl_divergence(ref, pol).item(), 3) == 0.143
    # A token the reference gives no mass is left out, whatever the policy puts on it.
    ref0 = torch.tensor([0.7, 0.3, 0.0], dtype=torch.float64).log()
    expected = -math.log(0.7**-4 * 0.5**5 + 0.3**-4 * 0.45**5) / 5
    assert entropic_risk(ref0, pol, 5.0).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "name, hparams, logit, chosen_risk",
    [
        # TDPO1: β[(ℓ_w − ℓ_l) − (D_l − D_w)] = 0.5 [ln2 − (0 − ¼ ln2)] = 0.625 ln2 → L = 0.4998171
        ("tdpo", {}, 0.625 * LN2, 0.25 * LN2),
        # Ra-DPO with the KL as its risk is TDPO
        ("ra_dpo", dict(risk="kl"), 0.625 * LN2, 0.25 * LN2),
        # Ra-DPO with μ = 1 CVaR is TDPO
        ("ra_dpo", dict(mu=1.0), 0.625 * LN2, 0.25 * LN2),
        # TDPO2, α = 0.5: 0.5 [ln2 − 0.5 (0 − ¼ ln2)] = 0.5625 ln2 → L = 0.5170827
        ("tdpo2", {}, 0.5625 * LN2, 0.25 * LN2),
        # CVaR μ = 0.5: D_w = −½ ln2: 0.5 [ln2 − (0 + ½ ln2)] = 0.25 ln2 → L = 0.6102526
        ("ra_dpo", dict(mu=0.5), 0.25 * LN2, -0.5 * LN2),
        # ERM μ = 2: D_w = −½ log 1.375: 0.5 [ln2 − ½ log 1.375] → L = 0.5685492
        ("ra_dpo", dict(risk="erm", mu=2.0), 0.5 * (LN2 - 0.5 * math.log(1.375)), -0.5 * math.log(1.375)),
        # official, no split: D_w = ½ ln2: 0.5 [ln2 + ½ ln2] = 0.75 ln2 → L = 0.4666252
        ("ra_dpo_official", dict(split_vocab=False), 0.75 * LN2, 0.5 * LN2),
    ],
)
def test_three_token_losses(name, hparams, logit, chosen_risk):
    """β = 0.5. Rewards β(ℓ + D): r_w = 0.5 (ln 2 + D_w), r_l = 0; win_prob = σ(logit)."""
    out = compute_loss(name, **three_token_pair(), beta=0.5, **hparams)
    assert out.losses.item() == pytest.approx(softplus_neg(logit), rel=1e-12)
    assert out.metrics["ra/risk_chosen"].item() == pytest.approx(chosen_risk, rel=1e-12)
    assert out.metrics["ra/risk_rejected"].item() == pytest.approx(0.0, abs=1e-15)
    assert out.metrics["ra/kl_chosen"].item() == pytest.approx(0.25 * LN2, rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.5 * (LN2 + chosen_risk), rel=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(0.0, abs=1e-15)
    assert out.metrics["win_prob"].item() == pytest.approx(1.0 / (1.0 + math.exp(-logit)), rel=1e-12)


def test_three_token_tdpo1_gradient():
    """TDPO1, β = 0.5, logit m = 0.625 ln 2, ∂L/∂m = −σ(−m) = −1/(1 + 2^{0.625}) = −0.3933638.
    m = β[log π_θ(2) − ... + Σ π_ref(z)(log π_ref(z) − log π_θ(z))], so ∂m/∂log π_θ(z) = β(1[z = 2] − π_ref(z)):
    chosen gradient = −0.3933638 × 0.5 × (−½, −¼, 1 − ¼) = (0.0983410, 0.0491705, −0.1475114)."""
    t = three_token_pair()
    compute_loss("tdpo", **t, beta=0.5).losses.sum().backward()
    s = 1.0 / (1.0 + 2.0**0.625)
    expected = torch.tensor([[[0.25 * s, 0.125 * s, -0.375 * s]]], dtype=torch.float64)
    torch.testing.assert_close(t["policy_chosen_vocab_logps"].grad, expected, rtol=1e-12, atol=0)


# ====================================================================== properties from the spec


def test_cvar_at_mu_one_is_kl_and_ra_dpo_is_tdpo():
    tensors = vocab_batch(B=3, T=5, V=13, seed=1)
    a, grads_a = run("ra_dpo", tensors, mu=1.0)
    b, grads_b = run("tdpo", tensors)
    torch.testing.assert_close(a.metrics["ra/risk_chosen"], b.metrics["ra/kl_chosen"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.losses, b.losses, rtol=1e-12, atol=1e-12)
    for side in SIDES:
        torch.testing.assert_close(grads_a[side], grads_b[side], rtol=1e-10, atol=1e-12)
    c, _ = run("ra_dpo2", tensors, mu=1.0, alpha=0.3)
    d, _ = run("tdpo2", tensors, alpha=0.3)
    torch.testing.assert_close(c.losses, d.losses, rtol=1e-12, atol=1e-12)


def test_cvar_and_erm_below_kl_on_random_distributions():
    g = torch.Generator().manual_seed(7)
    ref = (3.0 * torch.randn(500, 50, generator=g, dtype=torch.float64)).log_softmax(-1)
    pol = (3.0 * torch.randn(500, 50, generator=g, dtype=torch.float64)).log_softmax(-1)
    kl = kl_divergence(ref, pol)
    assert (kl >= 0).all()
    for mu in (0.5, 0.9, 0.95, 0.99):
        assert (cvar_lower(ref, pol, mu) <= kl + 1e-12).all()
    for mu in (0.1, 0.5, 1.0, 5.0, 9.0):
        assert (entropic_risk(ref, pol, mu) <= kl + 1e-12).all()
    # μ ≥ 1: −(1/μ) log Σ π_ref^{1−μ} π_θ^μ ≤ 0 (Hölder / Jensen), more averse as μ grows.
    for mu in (1.0, 5.0, 9.0):
        assert (entropic_risk(ref, pol, mu) <= 1e-12).all()
    assert (entropic_risk(ref, pol, 9.0) <= entropic_risk(ref, pol, 5.0) + 1e-12).all()
    # μ → 0 brings the entropic risk to the KL (it is the Rényi divergence of order 1−μ → 1).
    torch.testing.assert_close(entropic_risk(ref, pol, 1e-7), kl, rtol=1e-4, atol=1e-6)
    # A smaller CVaR level averages a smaller, lower tail.
    assert (cvar_lower(ref, pol, 0.5) <= cvar_lower(ref, pol, 0.9) + 1e-12).all()


def test_official_cvar_is_typically_above_kl():
    """It drops the lowest (1−μ) fraction of entries of D, mostly negative terms, so it exceeds the KL
    for nearly every random position (here for all 500)."""
    g = torch.Generator().manual_seed(8)
    ref = (2.0 * torch.randn(500, 64, generator=g, dtype=torch.float64)).log_softmax(-1)
    pol = (ref + torch.randn(500, 64, generator=g, dtype=torch.float64)).log_softmax(-1)
    official = cvar_official(ref, pol, 0.95, split_vocab=True)
    assert (official >= kl_divergence(ref, pol)).float().mean() >= 0.99


@pytest.mark.parametrize("n", [1, 2, 3, 10, 64, 4097])
@pytest.mark.parametrize("q", [0.0, 0.01, 0.05, 0.3, 0.5, 0.95, 1.0])
def test_linear_quantile_equals_torch_quantile(n, q):
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    torch.testing.assert_close(linear_quantile(x, q), torch.quantile(x, q, dim=-1), rtol=1e-12, atol=1e-12)
    x32 = x.float()
    torch.testing.assert_close(linear_quantile(x32, q), torch.quantile(x32, q, dim=-1), rtol=1e-6, atol=1e-6)


def test_linear_quantile_has_no_size_limit():
    """torch.quantile refuses more than 2^24 elements; 2 rows × 2^23 + 1 entries is 16,777,218."""
    x = torch.arange(2 * (2**23 + 1), dtype=torch.float32).reshape(2, -1)
    assert linear_quantile(x, 0.5).tolist() == [2**22, 2**23 + 1 + 2**22]


def test_ra_dpo2_sends_no_gradient_through_the_chosen_risk():
    """Ra-DPO2: m = β[(ℓ_w − ℓ_l) − α(D_l − sg(D_w))]. The chosen policy then only enters through ℓ_w,
    a gather at the labels, so its gradient is −β σ(−m) at each response position's label entry and
    exactly 0 on every other vocabulary entry. Under Ra-DPO1, D_w puts gradient −take(z)/μ on every atom
    of the lower μ-tail (so on all but the top ≈5% of mass for μ = 0.95)."""
    tensors = vocab_batch(B=2, T=5, V=9, seed=3)
    beta = 0.3
    out, grads = run("ra_dpo2", tensors, beta=beta)
    logits = torch.log(out.metrics["win_prob"] / (1 - out.metrics["win_prob"]))
    expected = torch.zeros_like(grads["chosen"])
    mask, labels = tensors["chosen_mask"], tensors["chosen_labels"]
    for b in range(2):
        for t in range(5):
            if mask[b, t]:
                expected[b, t, labels[b, t]] = -beta * torch.sigmoid(-logits[b])
    torch.testing.assert_close(grads["chosen"], expected, rtol=1e-10, atol=1e-14)
    _, grads_v1 = run("ra_dpo", tensors, beta=beta)
    assert ((grads_v1["chosen"][mask] != 0).sum(-1) > 1).all()
    # The rejected side's risk does get gradient beyond the label under Ra-DPO2.
    assert ((grads["rejected"][tensors["rejected_mask"]] != 0).sum(-1) > 1).all()


@pytest.mark.parametrize("risk", ["cvar", "kl", "erm", "cvar_official"])
def test_variants_one_and_two_at_alpha_one_agree_in_value_not_gradient(risk):
    tensors = vocab_batch(B=2, T=5, V=9, seed=4)
    mu = 2.0 if risk == "erm" else 0.9
    v1, g1 = run("ra_dpo", tensors, risk=risk, mu=mu, variant=1)
    v2, g2 = run("ra_dpo", tensors, risk=risk, mu=mu, variant=2, alpha=1.0)
    torch.testing.assert_close(v1.losses, v2.losses, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(v1.chosen_rewards, v2.chosen_rewards, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(g1["rejected"], g2["rejected"], rtol=1e-12, atol=1e-14)
    assert (g1["chosen"] - g2["chosen"]).abs().max() > 1e-4


@pytest.mark.parametrize("risk", ["cvar", "cvar_official", "erm", "kl"])
@pytest.mark.parametrize("variant", [1, 2])
def test_matches_a_naive_per_position_loop_in_float64(risk, variant):
    """Losses and gradients against ``naive_loss`` (1e-6 relative); the naive CVaR is the
    Rockafellar–Uryasev form, not the sort-and-split of the implementation."""
    tensors = with_reference_token_logps(vocab_batch(B=3, T=6, V=10, seed=5))
    mu = {"cvar": 0.8, "cvar_official": 0.9, "erm": 3.0, "kl": 0.95}[risk]
    hparams = dict(beta=0.2, alpha=0.7, variant=variant, risk=risk, mu=mu)
    out, grads = run("ra_dpo", tensors, chunk_size=4, **hparams)
    fresh = {k: (v.detach().clone().requires_grad_(True) if k.startswith("policy_") else v) for k, v in tensors.items()}
    expected = naive_loss(fresh, **hparams)
    expected.sum().backward()
    assert out.losses.dtype == torch.float64
    torch.testing.assert_close(out.losses, expected.detach(), rtol=1e-6, atol=0)
    for side in SIDES:
        torch.testing.assert_close(grads[side], fresh[f"policy_{side}_vocab_logps"].grad, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name", ["ra_dpo", "ra_dpo2", "ra_dpo_official", "ra_dpo_erm", "tdpo"])
def test_chunked_equals_unchunked(name):
    tensors = vocab_batch(B=3, T=7, V=12, seed=6)
    reference, reference_grads = run(name, tensors, chunk_size=10**6)
    for chunk_size in (1, 7):
        out, grads = run(name, tensors, chunk_size=chunk_size)
        torch.testing.assert_close(out.losses, reference.losses, rtol=1e-13, atol=1e-13)
        for key in ("ra/risk_chosen", "ra/risk_rejected", "ra/kl_chosen", "ra/kl_rejected"):
            torch.testing.assert_close(out.metrics[key], reference.metrics[key], rtol=1e-13, atol=1e-13)
        for side in SIDES:
            torch.testing.assert_close(grads[side], reference_grads[side], rtol=1e-12, atol=1e-14)


def test_positions_outside_the_mask_are_never_read():
    """Prompt and padding rows may hold anything (NaN here): the result is the same."""
    tensors = vocab_batch(B=2, T=6, V=8, seed=9)
    clean, clean_grads = run("ra_dpo", tensors)
    dirty = dict(tensors)
    for side in SIDES:
        outside = ~tensors[f"{side}_mask"]
        for model in ("policy", "reference"):
            key = f"{model}_{side}_vocab_logps"
            dirty[key] = tensors[key].detach().clone()
            dirty[key][outside] = float("nan")
        dirty[f"{side}_labels"] = tensors[f"{side}_labels"].masked_fill(outside, -100)
        dirty[f"reference_{side}_token_logps"] = (
            tensors[f"reference_{side}_vocab_logps"].gather(-1, tensors[f"{side}_labels"].unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        )
    out, grads = run("ra_dpo", dirty)
    torch.testing.assert_close(out.losses, clean.losses, rtol=1e-14, atol=1e-14)
    for side in SIDES:
        torch.testing.assert_close(grads[side], clean_grads[side])
        assert grads[side][~tensors[f"{side}_mask"]].abs().max() == 0


# ====================================================================== top-k reference


@pytest.mark.parametrize("name", ["ra_dpo", "ra_dpo2", "ra_dpo_erm", "tdpo"])
def test_topk_with_k_equal_v_is_exact(name):
    tensors = vocab_batch(B=2, T=5, V=9, seed=10)
    full, full_grads = run(name, tensors)
    out, grads = run(name, topk_of(tensors, K=9))
    torch.testing.assert_close(out.losses, full.losses, rtol=1e-12, atol=1e-12)
    for side in SIDES:
        torch.testing.assert_close(grads[side], full_grads[side], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("risk", ["cvar", "erm", "kl"])
def test_topk_matches_a_naive_coarsened_distribution(risk):
    """K = 4 of V = 10: K+1 atoms, the rest atom with the reference's leftover mass and the policy's
    mass of the other 6 tokens. Loss and gradients against the naive loop on those atoms."""
    tensors = vocab_batch(B=2, T=5, V=10, seed=11)
    mu = 2.0 if risk == "erm" else 0.9
    cached = topk_of(tensors, K=4)
    out, grads = run("ra_dpo", cached, risk=risk, mu=mu)
    fresh = {k: (v.detach().clone().requires_grad_(True) if k.startswith("policy_") else v) for k, v in cached.items()}
    expected = naive_loss(fresh, risk=risk, mu=mu, topk=True)
    expected.sum().backward()
    torch.testing.assert_close(out.losses, expected.detach(), rtol=1e-6, atol=0)
    for side in SIDES:
        torch.testing.assert_close(grads[side], fresh[f"policy_{side}_vocab_logps"].grad, rtol=1e-6, atol=1e-12)
    # The given rest mass and the derived one agree.
    given, _ = run("ra_dpo", topk_of(tensors, K=4, give_rest=True), risk=risk, mu=mu)
    torch.testing.assert_close(given.losses, out.losses, rtol=1e-12, atol=1e-12)


def test_topk_coarsening_moves_kl_and_entropic_risk_the_known_way():
    """Merging atoms can only lower the KL and ERM with μ < 1 (a Rényi divergence of order 1−μ: data
    processing), and can only raise ERM with μ > 1 (Σ π_ref^{1−μ} π_θ^μ is then jointly convex and
    1-homogeneous, hence subadditive, so merging lowers the sum and raises −log(sum)/μ)."""
    tensors = vocab_batch(B=2, T=6, V=16, seed=12)
    for risk, mu, direction in (("kl", 0.95, -1), ("erm", 0.5, -1), ("erm", 5.0, +1)):
        full, _ = run("ra_dpo", tensors, risk=risk, mu=mu)
        for K in (1, 4, 15):
            coarse, _ = run("ra_dpo", topk_of(tensors, K=K), risk=risk, mu=mu)
            for side in SIDES:
                change = direction * (coarse.metrics[f"ra/risk_{side}"] - full.metrics[f"ra/risk_{side}"])
                assert (change >= -1e-12).all(), (risk, mu, K)


def test_declared_needs_for_the_cache():
    """The cache stores the top-k, which serves every risk but the official CVaR; the reference's label
    log-probs must come per token (the label may be outside the top-k), so TOKEN_LOGPS is required."""
    assert {Need.VOCAB_LOGPS, Need.TOKEN_LOGPS} <= build_loss("ra_dpo").requires
    for name in ("ra_dpo", "ra_dpo2", "ra_dpo_erm", "tdpo", "tdpo2"):
        assert build_loss(name).accepts_topk_reference, name
    assert not build_loss("ra_dpo_official").accepts_topk_reference
    tensors = vocab_batch(B=2, T=5, V=9, seed=19)
    check_inputs(build_loss("ra_dpo"), PairBatch(**tensors))  # full reference: everything derivable
    cached = topk_of(tensors, K=3)
    check_inputs(build_loss("ra_dpo"), PairBatch(**cached))
    del cached["reference_rejected_token_logps"]
    with pytest.raises(LossInputError, match="reference_rejected_token_logps"):
        check_inputs(build_loss("ra_dpo"), PairBatch(**cached))


def test_full_reference_is_preferred_when_both_are_given():
    tensors = vocab_batch(B=2, T=5, V=9, seed=13)
    full, _ = run("ra_dpo", tensors)
    both, _ = run("ra_dpo", topk_of(tensors, K=3, keep_full=True))
    torch.testing.assert_close(both.losses, full.losses, rtol=1e-14, atol=1e-14)


def test_topk_input_errors():
    tensors = vocab_batch(B=2, T=5, V=9, seed=14)
    with pytest.raises(LossInputError, match="cvar_official.*reference_chosen_vocab_logps"):
        compute_loss("ra_dpo_official", **topk_of(tensors, K=3))
    cached = topk_of(tensors, K=3)
    for side in SIDES:
        del cached[f"reference_{side}_token_logps"]
    with pytest.raises(LossInputError, match="reference_chosen_token_logps"):
        compute_loss("ra_dpo", **cached)
    bad = dict(tensors)
    bad["chosen_labels"] = tensors["chosen_labels"].masked_fill(tensors["chosen_mask"], -100)
    with pytest.raises(LossInputError, match="chosen_labels"):
        compute_loss("ra_dpo", **bad)
    bad = dict(tensors)
    bad["reference_rejected_vocab_logps"] = tensors["reference_rejected_vocab_logps"][..., :8]
    with pytest.raises(LossInputError, match="reference_rejected_vocab_logps"):
        build_loss("ra_dpo")(PairBatch(**bad))


# ====================================================================== numerics and dtypes


@pytest.mark.parametrize("name", ["ra_dpo", "ra_dpo2", "ra_dpo_official", "ra_dpo_erm", "tdpo"])
def test_finite_in_float32_when_reference_probabilities_underflow(name):
    """Half of each reference row at log-prob −1e4 (probability 0 in fp32: exp(−1e4) underflows), and a
    few at −inf; the policy puts −1e4 on other tokens. Losses, metrics and gradients stay finite."""
    tensors = vocab_batch(B=2, T=5, V=12, dtype=torch.float32, seed=15)
    for side in SIDES:
        ref_logits = torch.randn(2, 5, 12)
        ref_logits[..., :6] = -1e4
        ref_logits[..., 0] = float("-inf")
        tensors[f"reference_{side}_vocab_logps"] = ref_logits.log_softmax(-1)
        pol_logits = torch.randn(2, 5, 12)
        pol_logits[..., 9:] = -1e4
        tensors[f"policy_{side}_vocab_logps"] = pol_logits.log_softmax(-1).requires_grad_(True)
        tensors[f"{side}_labels"] = torch.full((2, 5), 7)
    out, grads = run(name, tensors)
    assert out.losses.dtype == torch.float32
    assert torch.isfinite(out.losses).all()
    assert all(torch.isfinite(v).all() for v in out.metrics.values())
    for side in SIDES:
        assert torch.isfinite(grads[side]).all()


def test_input_dtypes_are_respected():
    tensors = vocab_batch(B=2, T=4, V=8, dtype=torch.bfloat16, seed=16)
    out, grads = run("ra_dpo", tensors)
    assert out.losses.dtype == torch.float32
    assert grads["chosen"].dtype == torch.bfloat16 and torch.isfinite(grads["chosen"]).all()
    reference = vocab_batch(B=2, T=4, V=8, dtype=torch.float32, seed=16)
    expected, _ = run("ra_dpo", {k: (v.to(torch.bfloat16).float() if v.is_floating_point() else v) for k, v in reference.items()})
    torch.testing.assert_close(out.losses, expected.losses, rtol=1e-5, atol=1e-6)


def test_no_response_tokens_gives_log_two():
    """Empty responses: ℓ = D = 0 on both sides → L = log 2, no gradient."""
    tensors = vocab_batch(B=2, T=4, V=8, seed=17)
    for side in SIDES:
        tensors[f"{side}_mask"] = torch.zeros(2, 4, dtype=torch.bool)
    out, grads = run("ra_dpo", tensors)
    torch.testing.assert_close(out.losses, torch.full((2,), LN2, dtype=torch.float64))
    assert grads["chosen"] is None or grads["chosen"].abs().max() == 0


def test_eval_without_grad():
    tensors = vocab_batch(B=2, T=4, V=8, seed=18, policy_grad=False)
    with torch.no_grad():
        out = compute_loss("ra_dpo", **tensors)
    assert out.losses.shape == (2,) and not out.losses.requires_grad


# ====================================================================== bounded memory

MEMORY_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys, time, torch
    torch.set_num_threads(1)  # steadier timings on a shared machine; memory does not depend on it
    from dpo_zoo.losses import compute_loss

    B, T, V = (int(a) for a in sys.argv[1:4])
    risk = sys.argv[4]
    chunks = [int(c) for c in sys.argv[5].split(",")]

    def status_mb(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024

    def log_probs(g, B, T, V):
        x = torch.randn(B, T, V, generator=g)
        for b in range(B):  # normalise in place, block by block, without a full-size temporary
            x[b] -= x[b].logsumexp(-1, keepdim=True)
        return x

    def batch(B, T, V, g):
        out = {}
        for side in ("chosen", "rejected"):
            out[f"policy_{side}_vocab_logps"] = log_probs(g, B, T, V).requires_grad_(True)
            out[f"reference_{side}_vocab_logps"] = log_probs(g, B, T, V)
            out[f"{side}_labels"] = torch.randint(0, V, (B, T), generator=g)
            out[f"{side}_mask"] = torch.ones(B, T, dtype=torch.bool)
        return out

    g = torch.Generator().manual_seed(0)
    # warm-up (kernels, thread pools, allocator) on a tiny batch
    compute_loss("ra_dpo", risk=risk, **batch(2, 4, 64, g)).losses.sum().backward()

    tensors = batch(B, T, V, g)
    results = []
    for chunk in chunks:
        for side in ("chosen", "rejected"):
            tensors[f"policy_{side}_vocab_logps"].grad = None
        gc.collect()
        baseline = status_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
        start = time.perf_counter()
        out = compute_loss("ra_dpo", risk=risk, chunk_size=chunk, **tensors)
        forward_s = time.perf_counter() - start
        forward_peak = status_mb("VmHWM") - baseline
        out.losses.sum().backward()
        total_s = time.perf_counter() - start
        tensor_mb = B * T * V * 4 / 2**20
        results.append(dict(chunk=chunk, tensor_mb=tensor_mb, grads_mb=2 * tensor_mb, forward_s=forward_s,
                            total_s=total_s, forward_peak_mb=forward_peak, peak_mb=status_mb("VmHWM") - baseline,
                            loss=out.losses.sum().item()))
        del out
    print(json.dumps(results))
    """
)


def measure(B, T, V, chunks, risk="cvar"):
    """Peak resident memory beyond the inputs (MB) of forward + backward at each chunk size, run one
    after the other in a fresh process (smallest first: a later run may reuse memory an earlier one
    freed, which can only understate its own peak). The peak includes the two policy gradients
    (``grads_mb``), which backpropagation needs whatever the loss does; times are on one thread.

    A fixed glibc mmap threshold makes every tensor above 64 KiB its own mapping, returned to the OS when
    freed; with glibc's default (a threshold that grows up to 32 MiB), freed chunk-sized tensors stay in
    the heap and the resident size overstates what is live by up to 2×."""
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(B), str(T), str(V), risk, ",".join(map(str, chunks))],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    assert result.returncode == 0, result.stderr
    return {r["chunk"]: r for r in json.loads(result.stdout.strip().splitlines()[-1])}


@pytest.mark.slow
def test_memory_scales_with_chunk_size_not_with_positions():
    """2 × 32 × 32,768 fp32 (8 MB per tensor, 64 response positions per side, 16 MB of policy
    gradients). A chunk's work (forward, or the recomputation autograd keeps for its backward) is
    ≈ 28 bytes per (position, vocabulary entry): ≈ 7 MB for 8-position chunks, ≈ 58 MB for 64-position
    chunks (the whole side at once). Measured: peak beyond the inputs 25.2 MB at chunk 8 (16 MB of it
    the gradients) against 73.9 MB at chunk 64; forward alone 6.9 against 55.9 MB; ≈ 1 s each."""
    results = measure(2, 32, 32768, [8, 64])
    small, large = results[8], results[64]
    assert small["loss"] == pytest.approx(large["loss"], rel=1e-5)
    assert small["peak_mb"] < small["grads_mb"] + 20, results
    assert small["forward_peak_mb"] < 15, results
    assert large["peak_mb"] > small["peak_mb"] + 30, results
    assert large["forward_peak_mb"] > small["forward_peak_mb"] + 30, results


@pytest.mark.slow
def test_memory_at_full_scale():
    """8 pairs × 256 positions × 49,152 vocabulary, fp32: 384 MiB per tensor, 4 tensors, and 768 MiB of
    policy gradients. Chunks of 64 and 512 positions, each in its own process. Measured (one thread,
    loaded 2-core CPU, ≈ 64 s each): peak beyond the inputs 879 MB at chunk 64 (768 of it the
    gradients; forward alone 84 MB) and 1,656 MB at chunk 512 (forward 672 MB): the part beyond the
    gradients grows 111 → 888 MB, 8× for 8× the chunk. One chunk of 2,048 (a whole side at once, as an
    unchunked implementation) peaks at 3,552 MB (forward 2,688 MB)."""
    results = {chunk: measure(8, 256, 49152, [chunk])[chunk] for chunk in (64, 512)}
    print(json.dumps(results, indent=1))
    grads = results[64]["grads_mb"]
    assert results[64]["loss"] == pytest.approx(results[512]["loss"], rel=1e-5)
    assert results[64]["peak_mb"] < grads + 250, results
    assert results[512]["peak_mb"] > results[64]["peak_mb"] + 400, results
    assert results[512]["peak_mb"] < grads + 1500, results
