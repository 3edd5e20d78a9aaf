"""The loss contract, checked for every name in the registry (not a hand-written list).

For each registered loss, on a batch that carries every input any loss may need (all derived from one
policy logits tensor and one reference logits tensor, so gradients can be traced):

* per-pair losses ``[B]``, finite; rewards ``[B]`` and detached; metrics detached;
* the gradient reaches the policy and is finite; the reference inputs are never modified;
* the input tensors a loss declares are exactly what it reads: removing a required one is a clear
  error naming it;
* wherever the spec says a setting reduces a loss to DPO, it does (``DPO_REDUCTIONS``); every other
  registered name must say why it does not (``NO_DPO_REDUCTION``), so a new loss cannot skip this.
"""

import pytest
import torch

from dpo_zoo.losses import NEED_FIELDS, LossInputError, Need, PairBatch, build_loss, check_inputs, compute_loss, registered_losses
from dpo_zoo.losses.registry import check_shapes

NAMES = sorted(registered_losses())

# name -> hyperparameters under which the spec says the loss equals DPO (on untied pairs of equal
# length, with behaviour log-probs equal to the policy's).
DPO_REDUCTIONS = {
    "dpo": {},
    "f_dpo": {"divergence": "reverse_kl"},
    "f_dpo_forward_kl": {"divergence": "reverse_kl"},
    "f_dpo_js": {"divergence": "reverse_kl"},
    "f_dpo_alpha": {"divergence": "reverse_kl"},
    "h_dpo": {"alpha": 1.0},
    "is_daa": {},  # weight = 1 when π_θ = π_b (spec §3)
    "sampo": {},  # equal lengths: nothing is down-sampled (spec §4)
    "sampo_official": {},
    "dpo_sanorm": {},  # (T_w+T_l)/2 · (1/T_y) = 1 at equal lengths
    "tie_dpo": {"nu_rk": 1.0},  # BT recovered at ν_RK = 1 (spec §7)
    "dpo_rk": {"nu_rk": 1.0},
    "dpo_davidson": {"nu_d": 0.0},
    "dpo_ties_as_wins": {},
    "sigmoid": {},  # TRL's name for DPO
    "robust": {"label_smoothing": 0.0},  # no flips assumed
    "ld_dpo": {"ld_alpha": 1.0},  # every token counts fully
    "rpo": {"alpha": 0.0},  # no NLL term
}
NO_DPO_REDUCTION = {
    "ipo": "a squared loss (Azar et al.), not a likelihood",
    "hinge": "a hinge loss (SLiC), not a likelihood",
    "is_ipo": "importance-weighted IPO",
    "ra_dpo": "adds the risk term δ; equals DPO only when policy = reference at every position",
    "ra_dpo2": "adds the risk term δ₂",
    "ra_dpo_official": "adds the risk term δ",
    "ra_dpo_erm": "adds the risk term δ",
    "tdpo": "adds the sequential-KL term δ",
    "tdpo1": "adds the sequential-KL term δ",
    "tdpo2": "adds the sequential-KL term δ₂",
    "discopop": "blends the logistic loss with an exponential one by σ(βh/τ)",
    "exo_pair": "the reverse KL to the smoothed labels, minimised at σ(βh) = 1 − ε, not a likelihood",
    "nca_pair": "scores each reward against 0 as well as the margin",
    "bco_pair": "a binary classifier on each reward, not on the margin",
    "sppo_hard": "a squared regression of each log-ratio on ±1/(2β)",
    "apo_zero": "anchors each reward at 0; not a function of the margin alone",
    "apo_down": "anchors the chosen reward at 0; not a function of the margin alone",
    "aot": "sorts margins over the batch (distributional dominance)",
    "aot_unpaired": "sorts each side's log-ratios over the batch",
    "sigmoid_norm": "divides each log-ratio by its length; DPO with β/|y| only at equal lengths",
    "sft": "no preference term at all",
    "simpo": "no reference; average log-probs and a margin γ",
    "cpo": "no reference; adds an NLL term",
    "orpo": "no reference; odds ratio plus NLL",
}

B, T, V = 4, 6, 11


def make_inputs(seed=0, equal_lengths=False, dtype=torch.float64, ties=True):
    """Every input of every loss, from leaf logits (policy: requires grad) and reference logits."""
    g = torch.Generator().manual_seed(seed)
    policy_logits = torch.randn(2, B, T, V, generator=g, dtype=dtype, requires_grad=True)
    reference_logits = torch.randn(2, B, T, V, generator=g, dtype=dtype)
    labels = torch.randint(0, V, (2, B, T), generator=g)
    if equal_lengths:
        lengths = torch.full((2, B), T - 1)
    else:
        lengths = torch.randint(2, T + 1, (2, B), generator=g)
    masks = torch.arange(T).expand(2, B, T) < lengths.unsqueeze(-1)
    policy_vocab = torch.log_softmax(policy_logits, -1)
    reference_vocab = torch.log_softmax(reference_logits, -1)
    policy_tokens = policy_vocab.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * masks
    reference_tokens = reference_vocab.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * masks
    topk_values, topk_ids = reference_vocab.topk(4, dim=-1)
    tensors = dict(
        policy_chosen_vocab_logps=policy_vocab[0],
        policy_rejected_vocab_logps=policy_vocab[1],
        reference_chosen_vocab_logps=reference_vocab[0],
        reference_rejected_vocab_logps=reference_vocab[1],
        chosen_labels=labels[0],
        rejected_labels=labels[1],
        chosen_mask=masks[0],
        rejected_mask=masks[1],
        policy_chosen_token_logps=policy_tokens[0],
        policy_rejected_token_logps=policy_tokens[1],
        reference_chosen_token_logps=reference_tokens[0],
        reference_rejected_token_logps=reference_tokens[1],
        policy_chosen_logps=policy_tokens[0].sum(-1),
        policy_rejected_logps=policy_tokens[1].sum(-1),
        reference_chosen_logps=reference_tokens[0].sum(-1),
        reference_rejected_logps=reference_tokens[1].sum(-1),
        reference_chosen_topk_logps=topk_values[0],
        reference_rejected_topk_logps=topk_values[1],
        reference_chosen_topk_ids=topk_ids[0],
        reference_rejected_topk_ids=topk_ids[1],
        is_tie=torch.tensor([False, True, False, True]) if ties else torch.zeros(B, dtype=torch.bool),
        weight=torch.tensor([1.0, 0.5, 2.0, 1.0], dtype=dtype),
        soft_label=torch.tensor([0.9, 0.5, 0.7, 0.5], dtype=dtype),
        seed=1234,
    )
    return policy_logits, tensors


def test_registry_holds_the_mission_losses():
    for name in ("dpo", "ipo", "hinge", "f_dpo", "is_daa", "sampo", "h_dpo", "ra_dpo", "tdpo", "tie_dpo"):
        assert name in NAMES


def test_every_name_is_classified_for_the_dpo_reduction():
    unclassified = [n for n in NAMES if n not in DPO_REDUCTIONS and n not in NO_DPO_REDUCTION]
    assert not unclassified, f"say whether these reduce to DPO: {unclassified}"


@pytest.mark.parametrize("name", NAMES)
def test_contract(name):
    loss = build_loss(name)
    policy_logits, tensors = make_inputs(seed=NAMES.index(name))
    reference_before = {k: v.clone() for k, v in tensors.items() if k.startswith("reference_")}
    batch = PairBatch(**tensors)
    check_inputs(loss, batch)
    out = loss(batch)

    assert out.losses.shape == (B,)
    finite = torch.isfinite(out.losses)
    assert finite.all(), f"{name}: non-finite losses {out.losses}"
    for rewards in (out.chosen_rewards, out.rejected_rewards):
        assert rewards.shape == (B,) and not rewards.requires_grad and torch.isfinite(rewards).all()
    for key, value in out.metrics.items():
        assert isinstance(value, torch.Tensor) and not value.requires_grad, f"{name}: metric {key} not detached"
    assert "win_prob" in out.metrics, f"{name}: compare needs metrics['win_prob']"
    win = out.metrics["win_prob"]
    assert win.shape == (B,) and ((win >= 0) & (win <= 1)).all()

    out.losses.sum().backward()
    grad = policy_logits.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert grad.abs().sum() > 0, f"{name}: no gradient reaches the policy"
    for key, before in reference_before.items():
        assert torch.equal(tensors[key], before), f"{name}: modified {key}"
        assert not tensors[key].requires_grad


@pytest.mark.parametrize("name", NAMES)
def test_missing_required_input_is_named(name):
    """Drop every field of each required need (and anything it could be derived from): the error names one."""
    loss = build_loss(name)
    _, tensors = make_inputs()
    for need in loss.requires:
        reduced = dict(tensors)
        doomed = set(NEED_FIELDS[need])
        if need is Need.SEQUENCE_LOGPS:  # sums can be derived from tokens or the vocabulary
            doomed |= set(NEED_FIELDS[Need.TOKEN_LOGPS]) | set(NEED_FIELDS[Need.VOCAB_LOGPS])
        if need is Need.TOKEN_LOGPS:
            doomed |= {f for f in NEED_FIELDS[Need.VOCAB_LOGPS] if "mask" not in f}
        if need is Need.GENERATOR:
            doomed |= {"seed"}
        for field in doomed:
            reduced.pop(field, None)
        with pytest.raises(LossInputError) as info:
            check_inputs(loss, PairBatch(**reduced))
        message = str(info.value)
        assert any(f in message for f in doomed | {"generator", "seed"}), message


@pytest.mark.parametrize("name", sorted(n for n in DPO_REDUCTIONS if n in NAMES))
def test_reduces_to_dpo(name):
    _, tensors = make_inputs(seed=7, equal_lengths=True, ties=False)
    tensors = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in tensors.items()}
    tensors["behavior_chosen_logps"] = tensors["policy_chosen_logps"]
    tensors["behavior_rejected_logps"] = tensors["policy_rejected_logps"]
    entry = registered_losses()[name]
    beta = 0.3
    hparams = dict(DPO_REDUCTIONS[name])
    if "beta" in entry.defaults():
        hparams["beta"] = beta
    loss = entry.build(**hparams)
    dpo = build_loss("dpo", beta=beta)
    expected = dpo(PairBatch(**tensors))
    got = loss(PairBatch(**tensors))
    torch.testing.assert_close(got.losses, expected.losses, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.chosen_rewards - got.rejected_rewards, expected.chosen_rewards - expected.rejected_rewards, rtol=1e-9, atol=1e-12)


def test_complete_inputs_pass_the_shape_check():
    _, tensors = make_inputs()
    check_shapes(PairBatch(**tensors))


@pytest.mark.parametrize(
    "field, bad, words",
    [
        ("policy_rejected_logps", lambda t: t[:-1], ["`policy_rejected_logps` has", "pairs"]),
        ("reference_chosen_logps", lambda t: t.unsqueeze(-1), ["`reference_chosen_logps`", "expected 1 dimensions"]),
        ("chosen_mask", lambda t: torch.cat([t, t[:, :1]], 1), ["chosen side", "`chosen_mask`"]),
        ("reference_rejected_vocab_logps", lambda t: t[..., :-1], ["rejected side's vocabulary", "reference_rejected_vocab_logps"]),
        ("is_tie", lambda t: t[0], ["`is_tie` is a scalar"]),
    ],
)
def test_inconsistent_shapes_are_named(field, bad, words):
    """Through the functional entry point a shape mistake is a LossInputError naming the tensors,
    not a broadcasting error from inside the loss (or, worse, a silently broadcast result)."""
    _, tensors = make_inputs()
    tensors = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in tensors.items()}
    tensors[field] = bad(tensors[field])
    with pytest.raises(LossInputError) as info:
        compute_loss("dpo", **tensors)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_plain_lists_are_accepted_as_tensors():
    as_lists = dict(policy_chosen_logps=[-1.0, -2.0], policy_rejected_logps=[-1.5, -1.0],
                    reference_chosen_logps=[-1.2, -2.0], reference_rejected_logps=[-1.2, -1.2])
    from_lists = compute_loss("dpo", **as_lists)
    from_tensors = compute_loss("dpo", **{k: torch.tensor(v) for k, v in as_lists.items()})
    torch.testing.assert_close(from_lists.losses, from_tensors.losses)
    # by hand: h = (−1 − (−1.2)) − (−1.5 − (−1.2)) = 0.5; −log σ(0.1·0.5) = log(1 + e^−0.05) = 0.6684596
    assert from_lists.losses[0].item() == pytest.approx(0.6684596, abs=1e-6)
    with pytest.raises(LossInputError, match="`policy_chosen_logps`: expected a tensor"):
        compute_loss("dpo", **{**as_lists, "policy_chosen_logps": "not numbers"})


@pytest.mark.parametrize("name", [n for n in NAMES if not build_loss(n).needs_reference])
def test_reference_free_losses_run_without_any_reference_input(name):
    """A loss that declares no reference computes the same losses and gradients with every reference
    tensor removed (it needs none, and the values it would get do not matter)."""
    loss = build_loss(name)
    policy_logits, tensors = make_inputs(seed=3)
    without = {k: v for k, v in tensors.items() if not k.startswith("reference_")}
    check_inputs(loss, PairBatch(**without))
    full, bare = loss(PairBatch(**tensors)), loss(PairBatch(**without))
    torch.testing.assert_close(bare.losses, full.losses, rtol=0, atol=0)
    (g_full,) = torch.autograd.grad(full.losses.sum(), policy_logits, retain_graph=True)
    (g_bare,) = torch.autograd.grad(bare.losses.sum(), policy_logits)
    torch.testing.assert_close(g_bare, g_full, rtol=0, atol=0)
