"""Parity with TRL 1.16, through TRL's own code.

TRL computes its losses inside its trainers, from model outputs, so each case here drives TRL's
trainer method itself on a stand-in ``self`` (only the attributes the method reads) and a stand-in
model that returns fixed outputs:

* ``DPOTrainer._compute_loss`` for every ``loss_type`` (and ``ld_alpha``, the f-divergences,
  ``label_smoothing``, ``loss_weights``): the model returns per-token log-probs, as TRL's fused LM
  head does; the reference is a second stand-in model (TRL's live-reference path);
* ``CPOTrainer.get_batch_loss_metrics`` (CPO, SimPO) and ``ORPOTrainer.get_batch_loss_metrics``
  (ORPO): the model returns logits, from which TRL computes the log-probs and the NLL itself.

dpo_zoo's ``compute_loss`` gets the same values in float64, and the batch-mean losses, the per-pair
chosen/rejected rewards and the gradients with respect to the shared leaf tensor must agree to 1e-6
relative. Where dpo_zoo deliberately differs, the case states the mapping and checks it instead.

Shared losses (dpo_zoo name ← TRL): dpo/sigmoid ← sigmoid; hinge ← hinge; ipo ← ipo (mapped);
f_dpo_forward_kl / f_dpo_js / f_dpo_alpha ← sigmoid with f_divergence_type (mapped); robust; exo_pair;
nca_pair; bco_pair; sppo_hard; aot; aot_unpaired; apo_zero; apo_down; discopop; sigmoid_norm; sft
(mapped rewards); ld_dpo ← sigmoid with ld_alpha; rpo ← [sigmoid, sft] with loss_weights (mapped);
cpo, simpo ← CPOTrainer; orpo ← ORPOTrainer; mixtures ``a+b`` with ``weights`` ← ``loss_type`` lists
with ``loss_weights`` (MPO = sigmoid+bco_pair+sft); ``use_weighting`` (WPO) on sigmoid, bco_pair, nca_pair,
sigmoid_norm, apo_zero.

Not shared, so not compared: TRL 1.16's ``sigmoid`` ignores ``label_smoothing`` (dpo_zoo's cDPO has no
TRL 1.16 counterpart); TRL's f-divergences on ``ipo`` (TRL divides the f-score by the length, which has no
counterpart in dpo_zoo's summed IPO); CPOTrainer's hinge/IPO variants and AlphaPO transform.
"""

from __future__ import annotations

import math
import types
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from dpo_zoo.losses import compute_loss

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer", reason="TRL is in the bench extra (launch/setup_env.sh installs it)")
DPOTrainer = trl_dpo.DPOTrainer
from trl.experimental.cpo.cpo_trainer import CPOTrainer  # noqa: E402
from trl.experimental.orpo.orpo_trainer import ORPOTrainer  # noqa: E402

F64 = torch.float64
B, T, V = 5, 7, 9
RTOL = 1e-6


# ====================================================================== shared tensors


def token_data(seed: int, dtype=F64):
    """Policy per-token log-probs (a leaf ``[2B, T]``, chosen rows first, as TRL stacks them), the
    reference's, and response masks with lengths 1..T (some pairs of unequal length)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (2 * B,), generator=g)
    lengths[0], lengths[B] = T, 2  # at least one pair of clearly unequal length
    mask = torch.arange(T).expand(2 * B, T) < lengths.unsqueeze(-1)
    leaf = (-0.1 - 2.0 * torch.rand(2 * B, T, generator=g, dtype=F64)).to(dtype).requires_grad_(True)
    reference = torch.where(mask, -0.1 - 2.0 * torch.rand(2 * B, T, generator=g, dtype=F64), torch.zeros((), dtype=F64)).to(dtype)
    return leaf, reference, mask


def zoo_tokens(leaf, reference, mask):
    """dpo_zoo's keyword tensors from the same values (the policy's masked through the leaf)."""
    policy = torch.where(mask, leaf, torch.zeros((), dtype=leaf.dtype))
    return dict(
        policy_chosen_token_logps=policy[:B],
        policy_rejected_token_logps=policy[B:],
        reference_chosen_token_logps=reference[:B],
        reference_rejected_token_logps=reference[B:],
        chosen_mask=mask[:B],
        rejected_mask=mask[B:],
    )


class _Accelerator:
    """What TRL's loss code asks of accelerate on one process; records what it gathers."""

    device = torch.device("cpu")

    def __init__(self):
        self.gathered = []
        self.gathered_for_metrics = []

    def gather(self, x):
        self.gathered.append(x)
        return x

    def gather_for_metrics(self, x):
        self.gathered_for_metrics.append(x)
        return x


class _TokenModel(torch.nn.Module):
    """Stands in for a model with TRL's fused LM head: returns per-token log-probs ``[2B, T]``."""

    def __init__(self, log_probs, log_sum_sq_probs=None):
        super().__init__()
        self.is_gradient_checkpointing = False
        zeros = torch.zeros_like(log_probs).detach()
        self.outputs = SimpleNamespace(
            log_probs=log_probs,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=torch.zeros_like(zeros, dtype=torch.bool),
            log_sum_sq_probs=log_sum_sq_probs if log_sum_sq_probs is not None else zeros,
        )

    def forward(self, **kwargs):
        return self.outputs


def trl_dpo_loss(leaf, reference, mask, loss_type, *, beta, loss_weights=None, label_smoothing=0.0,
                 f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, ld_alpha=None, discopop_tau=0.05,
                 log_sq_mass=None):
    """TRL's ``DPOTrainer._compute_loss`` on these log-probs: (batch loss, chosen rewards, rejected rewards)."""
    loss_types = loss_type if isinstance(loss_type, list) else [loss_type]
    # TRL's sequences are [prompt token, response tokens...]; log-probs are per predicted position, so
    # the completion mask has one more column than the log-probs, its first (the prompt) 0.
    completion_mask = torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), mask.long()], dim=1)
    policy = torch.where(mask, leaf, torch.zeros((), dtype=leaf.dtype))  # TRL's fused head gives 0 off the labels
    model = _TokenModel(policy, log_sum_sq_probs=log_sq_mass)
    accelerator = _Accelerator()
    stub = SimpleNamespace(
        model=model,
        ref_model=_TokenModel(reference),
        accelerator=accelerator,
        aux_loss_enabled=False,
        beta=beta,
        ld_alpha=ld_alpha,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types),
        label_smoothing=label_smoothing,
        use_weighting=log_sq_mass is not None,
        precompute_ref_logps=False,
        args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * B, T + 1, dtype=torch.long),
        "attention_mask": torch.ones(2 * B, T + 1, dtype=torch.long),
        "completion_mask": completion_mask,
    }
    loss = DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    chosen_rewards, rejected_rewards = accelerator.gathered[0], accelerator.gathered[1]
    return loss, chosen_rewards, rejected_rewards


def assert_close(got, expected, what, rtol=RTOL):
    torch.testing.assert_close(got, expected, rtol=rtol, atol=1e-12 if rtol == RTOL else 1e-7, msg=lambda m: f"{what}: {m}")


def grad(value, leaf):
    (g,) = torch.autograd.grad(value, leaf, retain_graph=True)
    return g


# ====================================================================== DPOTrainer loss types

# (dpo_zoo name, dpo_zoo hyperparameters, TRL keyword settings); β = 0.3 throughout unless set.
SHARED = [
    ("dpo", {}, dict(loss_type="sigmoid")),
    ("sigmoid", {}, dict(loss_type="sigmoid")),
    ("hinge", {}, dict(loss_type="hinge")),
    ("robust", {"label_smoothing": 0.0}, dict(loss_type="robust", label_smoothing=0.0)),
    ("robust", {"label_smoothing": 0.1}, dict(loss_type="robust", label_smoothing=0.1)),
    ("robust", {"label_smoothing": 0.3}, dict(loss_type="robust", label_smoothing=0.3)),
    ("exo_pair", {"label_smoothing": 1e-3}, dict(loss_type="exo_pair", label_smoothing=1e-3)),
    ("exo_pair", {"label_smoothing": 0.2}, dict(loss_type="exo_pair", label_smoothing=0.2)),
    ("nca_pair", {}, dict(loss_type="nca_pair")),
    ("bco_pair", {}, dict(loss_type="bco_pair")),
    ("sppo_hard", {}, dict(loss_type="sppo_hard")),
    ("aot", {"label_smoothing": 0.0}, dict(loss_type="aot", label_smoothing=0.0)),
    ("aot", {"label_smoothing": 0.1}, dict(loss_type="aot", label_smoothing=0.1)),
    ("aot_unpaired", {"label_smoothing": 0.0}, dict(loss_type="aot_unpaired", label_smoothing=0.0)),
    ("aot_unpaired", {"label_smoothing": 0.2}, dict(loss_type="aot_unpaired", label_smoothing=0.2)),
    ("apo_zero", {}, dict(loss_type="apo_zero")),
    ("apo_down", {}, dict(loss_type="apo_down")),
    ("discopop", {}, dict(loss_type="discopop")),
    ("discopop", {"tau": 0.5}, dict(loss_type="discopop", discopop_tau=0.5)),
    ("sigmoid_norm", {}, dict(loss_type="sigmoid_norm")),
    ("ld_dpo", {"ld_alpha": 0.3}, dict(loss_type="sigmoid", ld_alpha=0.3)),
    ("ld_dpo", {"ld_alpha": 0.0}, dict(loss_type="sigmoid", ld_alpha=0.0)),
    ("ld_dpo", {"ld_alpha": 1.0}, dict(loss_type="sigmoid", ld_alpha=1.0)),
]
# The f-divergence option, on every TRL loss type that accepts it and that dpo_zoo shares (dpo_zoo's
# alpha is the paper's α; TRL's f_alpha_divergence_coef is 1 − α).
TRL_DIVERGENCE = {"forward_kl": "forward_kl", "js": "js_divergence", "alpha": "alpha_divergence"}
for _name, _trl in (("robust", "robust"), ("exo_pair", "exo_pair"), ("discopop", "discopop"), ("sigmoid_norm", "sigmoid_norm"),
                   ("hinge", "hinge")):
    for _div, _trl_div in TRL_DIVERGENCE.items():
        _zoo = {"divergence": _div, **({"alpha": 0.3} if _div == "alpha" else {})}
        if _name in ("robust", "exo_pair"):
            _zoo["label_smoothing"] = 0.1
        SHARED.append((_name, _zoo, dict(loss_type=_trl, f_divergence_type=_trl_div, f_alpha_divergence_coef=0.7,
                                          label_smoothing=_zoo.get("label_smoothing", 0.0))))


@pytest.mark.parametrize("name, hparams, trl", SHARED, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(SHARED)])
def test_dpo_trainer_loss_types(name, hparams, trl):
    # TRL 1.16's α-divergence branch knows fp16/bf16/fp32 only (a float64 input is a KeyError in its
    # clamp table), so those cases run in float32 on both sides and agree to float32 precision.
    fp32 = trl.get("f_divergence_type") == "alpha_divergence"
    rtol = 2e-5 if fp32 else RTOL
    leaf, reference, mask = token_data(seed=len(name), dtype=torch.float32 if fp32 else F64)
    beta = 0.3
    trl_loss, trl_chosen, trl_rejected = trl_dpo_loss(leaf, reference, mask, beta=beta, **trl)
    out = compute_loss(name, **zoo_tokens(leaf, reference, mask), beta=beta, **hparams)
    zoo_loss = out.losses.mean()
    assert_close(zoo_loss, trl_loss, f"{name} loss", rtol)
    assert_close(out.chosen_rewards, trl_chosen, f"{name} chosen rewards", rtol)
    assert_close(out.rejected_rewards, trl_rejected, f"{name} rejected rewards", rtol)
    assert_close(grad(zoo_loss, leaf), grad(trl_loss, leaf), f"{name} gradient", rtol)
    assert grad(zoo_loss, leaf).abs().sum() > 0


@pytest.mark.parametrize("divergence, trl_divergence", list(TRL_DIVERGENCE.items()))
def test_f_dpo_against_trl_sigmoid_with_f_divergence(divergence, trl_divergence):
    """Mapping: f-DPO's α is the paper's (TRL ≥ 0.29 takes ``f_alpha_divergence_coef = 1 − α``), and
    f-DPO's rewards are β (f'(u) − f'(1)), the scores its loss compares, where TRL logs β ℓ for every
    divergence. Losses and gradients agree; each side's rewards are checked in its own convention."""
    fp32 = divergence == "alpha"  # TRL 1.16's α branch has no float64 (see test_dpo_trainer_loss_types)
    rtol = 2e-5 if fp32 else RTOL
    leaf, reference, mask = token_data(seed=3, dtype=torch.float32 if fp32 else F64)
    beta, alpha = 0.3, 0.3
    trl_loss, trl_chosen, trl_rejected = trl_dpo_loss(
        leaf, reference, mask, "sigmoid", beta=beta, f_divergence_type=trl_divergence, f_alpha_divergence_coef=1 - alpha
    )
    tensors = zoo_tokens(leaf, reference, mask)
    out = compute_loss(f"f_dpo_{divergence}" if divergence != "js" else "f_dpo_js", **tensors, beta=beta, alpha=alpha)
    zoo_loss = out.losses.mean()
    assert_close(zoo_loss, trl_loss, "loss", rtol)
    assert_close(grad(zoo_loss, leaf), grad(trl_loss, leaf), "gradient", rtol)
    chosen_ratio = (tensors["policy_chosen_token_logps"] - tensors["reference_chosen_token_logps"]).sum(-1).detach()
    assert_close(trl_chosen, beta * chosen_ratio, "TRL's rewards are β ℓ", rtol)
    shifted_f_prime = {
        "forward_kl": 1 - torch.exp(-chosen_ratio),
        "js": math.log(2) + torch.nn.functional.logsigmoid(chosen_ratio),
        "alpha": (1 - torch.exp(-alpha * chosen_ratio)) / alpha,
    }[divergence]
    assert_close(out.chosen_rewards, beta * shifted_f_prime, "f-DPO's rewards are β (f'(u) − f'(1))", rtol)
    # The margins the two log agree for reverse KL only; for the others the loss's own win
    # probability is σ(β (s_w − s_l)) = exp(−loss).
    assert_close(out.metrics["win_prob"], torch.exp(-out.losses.detach()), "win_prob", rtol)


def test_ipo_against_trl_maps_through_per_token_averages():
    """Mapping: TRL's IPO divides each log-ratio by its response length before the squared loss;
    dpo_zoo's ``ipo`` is the paper's, on summed log-ratios. Given per-token-averaged log-probs it is
    TRL's loss exactly (same gradient), and its rewards are TRL's divided by the length."""
    leaf, reference, mask = token_data(seed=4)
    beta = 0.3
    trl_loss, trl_chosen, trl_rejected = trl_dpo_loss(leaf, reference, mask, "ipo", beta=beta)
    tensors = zoo_tokens(leaf, reference, mask)
    lengths = mask.sum(-1).to(F64)
    averaged = dict(
        policy_chosen_logps=tensors["policy_chosen_token_logps"].sum(-1) / lengths[:B],
        policy_rejected_logps=tensors["policy_rejected_token_logps"].sum(-1) / lengths[B:],
        reference_chosen_logps=tensors["reference_chosen_token_logps"].sum(-1) / lengths[:B],
        reference_rejected_logps=tensors["reference_rejected_token_logps"].sum(-1) / lengths[B:],
    )
    out = compute_loss("ipo", **averaged, beta=beta)
    zoo_loss = out.losses.mean()
    assert_close(zoo_loss, trl_loss, "loss")
    assert_close(grad(zoo_loss, leaf), grad(trl_loss, leaf), "gradient")
    assert_close(out.chosen_rewards, trl_chosen / lengths[:B], "chosen rewards = TRL's / |y_w|")
    assert_close(out.rejected_rewards, trl_rejected / lengths[B:], "rejected rewards = TRL's / |y_l|")


def test_sft_against_trl_sft():
    """``sft`` needs no reference, so its rewards are the policy's mean token log-probs, where TRL (which
    always has a reference) logs β ℓ; losses and gradients agree."""
    leaf, reference, mask = token_data(seed=5)
    trl_loss, _, _ = trl_dpo_loss(leaf, reference, mask, "sft", beta=0.3)
    tensors = zoo_tokens(leaf, reference, mask)
    policy_only = {k: v for k, v in tensors.items() if not k.startswith("reference_")}
    out = compute_loss("sft", **policy_only)
    zoo_loss = out.losses.mean()
    assert_close(zoo_loss, trl_loss, "loss")
    assert_close(grad(zoo_loss, leaf), grad(trl_loss, leaf), "gradient")
    assert_close(out.chosen_rewards, (tensors["policy_chosen_token_logps"].sum(-1) / mask[:B].sum(-1)).detach(), "rewards")


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_rpo_is_trl_sigmoid_plus_weighted_sft(alpha):
    """Mapping: RPO with ``nll_reduction="batch_tokens"`` is TRL's ``loss_type=["sigmoid", "sft"]`` with
    ``loss_weights=[1, α]`` (the paper's default ``sequence`` averages each response's own tokens)."""
    leaf, reference, mask = token_data(seed=6)
    beta = 0.3
    trl_loss, trl_chosen, trl_rejected = trl_dpo_loss(leaf, reference, mask, ["sigmoid", "sft"], beta=beta, loss_weights=[1.0, alpha])
    out = compute_loss("rpo", **zoo_tokens(leaf, reference, mask), beta=beta, alpha=alpha, nll_reduction="batch_tokens")
    zoo_loss = out.losses.mean()
    assert_close(zoo_loss, trl_loss, "loss")
    assert_close(out.chosen_rewards, trl_chosen, "chosen rewards")
    assert_close(out.rejected_rewards, trl_rejected, "rejected rewards")
    assert_close(grad(zoo_loss, leaf), grad(trl_loss, leaf), "gradient")


# ====================================================================== mixtures and WPO weighting

MIXTURES = [
    # TRL's MPO: loss_type=["sigmoid", "bco_pair", "sft"] with loss_weights=[0.8, 0.2, 1.0]
    ("sigmoid+bco_pair+sft", [0.8, 0.2, 1.0], ["sigmoid", "bco_pair", "sft"]),
    ("dpo+sft", [1.0, 0.2], ["sigmoid", "sft"]),
    ("robust+nca_pair", [0.5, 1.5], ["robust", "nca_pair"]),
]


@pytest.mark.parametrize("name, weights, trl_types", MIXTURES, ids=[m[0] for m in MIXTURES])
def test_mixtures_against_trl_loss_type_lists(name, weights, trl_types):
    """A mixture ``a+b+…`` with ``weights`` is TRL's ``loss_type=[…]`` with ``loss_weights``; both log the
    first part's rewards (β ℓ)."""
    leaf, reference, mask = token_data(seed=9)
    beta = 0.3
    trl_loss, trl_chosen, trl_rejected = trl_dpo_loss(leaf, reference, mask, trl_types, beta=beta,
                                                      loss_weights=weights, label_smoothing=0.1)
    shared = {"beta": beta} | ({"robust.label_smoothing": 0.1} if "robust" in name else {})
    out = compute_loss(name, **zoo_tokens(leaf, reference, mask), weights=weights, **shared)
    zoo_loss = out.losses.mean()
    assert_close(zoo_loss, trl_loss, f"{name} loss")
    assert_close(out.chosen_rewards, trl_chosen, f"{name} chosen rewards")
    assert_close(out.rejected_rewards, trl_rejected, f"{name} rejected rewards")
    assert_close(grad(zoo_loss, leaf), grad(trl_loss, leaf), f"{name} gradient")


# Not hinge: TRL 1.16 multiplies its ReLU output by the weights in place, and autograd then refuses the
# backward pass (TRL's hinge + use_weighting cannot train).
@pytest.mark.parametrize("name, trl_type", [("dpo", "sigmoid"), ("bco_pair", "bco_pair"), ("nca_pair", "nca_pair"),
                                            ("sigmoid_norm", "sigmoid_norm"), ("apo_zero", "apo_zero")])
def test_wpo_weighting_against_trl_use_weighting(name, trl_type):
    """``use_weighting`` (WPO): TRL multiplies each pair's loss by exp(mean_t[log π(y_t) − log Σ_v π(v)²])
    of both responses, from its fused head's per-token ``log_sum_sq_probs``; dpo_zoo reads the same
    per-token values as ``policy_<side>_log_sq_mass``."""
    leaf, reference, mask = token_data(seed=10)
    g = torch.Generator().manual_seed(11)
    log_sq_mass = torch.where(mask, -0.05 - 1.5 * torch.rand(2 * B, T, generator=g, dtype=F64), torch.zeros((), dtype=F64))
    beta = 0.3
    trl_loss, trl_chosen, trl_rejected = trl_dpo_loss(leaf, reference, mask, trl_type, beta=beta, log_sq_mass=log_sq_mass)
    out = compute_loss(name, **zoo_tokens(leaf, reference, mask), beta=beta, use_weighting=True,
                       policy_chosen_log_sq_mass=log_sq_mass[:B], policy_rejected_log_sq_mass=log_sq_mass[B:])
    zoo_loss = out.losses.mean()
    assert_close(zoo_loss, trl_loss, f"{name} loss")
    assert_close(out.chosen_rewards, trl_chosen, f"{name} chosen rewards")
    assert_close(grad(zoo_loss, leaf), grad(trl_loss, leaf), f"{name} gradient")
    unweighted = compute_loss(name, **zoo_tokens(leaf, reference, mask), beta=beta).losses.mean()
    assert abs(unweighted.item() - zoo_loss.item()) > 1e-3  # the weighting did something


# ====================================================================== CPOTrainer and ORPOTrainer (logits)


def logits_data(seed: int):
    """A leaf of logits ``[2B, T+1, V]`` (chosen rows first) over sequences ``[prompt token, response…, pad…]``,
    TRL's batch dictionary for them, and dpo_zoo's per-token log-probs and masks from the same leaf."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * B, T + 1, V, generator=g, dtype=F64).requires_grad_(True)
    input_ids = torch.randint(1, V, (2 * B, T + 1), generator=g)
    lengths = torch.randint(1, T + 1, (2 * B,), generator=g)
    lengths[0], lengths[B] = T, 1
    attention = torch.arange(T + 1).expand(2 * B, T + 1) <= lengths.unsqueeze(-1)  # prompt + response
    input_ids = torch.where(attention, input_ids, torch.zeros_like(input_ids))
    labels = torch.where(attention, input_ids, torch.full_like(input_ids, -100))
    labels[:, 0] = -100  # the prompt is not a label
    batch = {}
    for side, rows in (("chosen", slice(0, B)), ("rejected", slice(B, 2 * B))):
        batch[f"{side}_input_ids"] = input_ids[rows]
        batch[f"{side}_attention_mask"] = attention[rows].long()
        batch[f"{side}_labels"] = labels[rows]
    mask = attention[:, 1:]
    token_logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    token_logps = torch.where(mask, token_logps, torch.zeros((), dtype=F64))
    tensors = dict(
        policy_chosen_token_logps=token_logps[:B],
        policy_rejected_token_logps=token_logps[B:],
        chosen_mask=mask[:B],
        rejected_mask=mask[B:],
    )
    return logits, batch, tensors


def _logits_stub(trainer_cls, logits, **attributes):
    accelerator = _Accelerator()
    stub = SimpleNamespace(
        accelerator=accelerator,
        aux_loss_enabled=False,
        is_encoder_decoder=False,
        pad_token_id=0,
        padding_value=0,
        concatenated_inputs=trainer_cls.concatenated_inputs,
        get_batch_logps=trainer_cls.get_batch_logps,
        **attributes,
    )
    for method in ("concatenated_forward", "cpo_loss", "odds_ratio_loss"):
        if hasattr(trainer_cls, method):
            setattr(stub, method, types.MethodType(getattr(trainer_cls, method), stub))
    model = lambda *args, **kwargs: SimpleNamespace(logits=logits)  # noqa: E731
    return stub, model, accelerator


@pytest.mark.parametrize(
    "name, hparams, trl",
    [
        ("cpo", {}, dict(loss_type="sigmoid", cpo_alpha=1.0, label_smoothing=0.0)),
        ("cpo", {"cpo_alpha": 0.5, "label_smoothing": 0.2}, dict(loss_type="sigmoid", cpo_alpha=0.5, label_smoothing=0.2)),
        ("cpo", {"cpo_alpha": 0.0}, dict(loss_type="sigmoid", cpo_alpha=0.0, label_smoothing=0.0)),
        ("simpo", {"beta": 2.0, "gamma": 0.5}, dict(loss_type="simpo", cpo_alpha=0.0, label_smoothing=0.0, simpo_gamma=0.5)),
        ("simpo", {"beta": 2.5, "gamma": 1.2, "label_smoothing": 0.1},
         dict(loss_type="simpo", cpo_alpha=0.0, label_smoothing=0.1, simpo_gamma=1.2)),
    ],
)
def test_cpo_trainer(name, hparams, trl):
    logits, batch, tensors = logits_data(seed=7)
    beta = hparams.get("beta", 0.1)
    stub, model, accelerator = _logits_stub(CPOTrainer, logits, beta=beta, alpha=0.0, **trl)
    trl_loss, _ = CPOTrainer.get_batch_loss_metrics(stub, model, batch)
    trl_chosen, trl_rejected = accelerator.gathered_for_metrics[0], accelerator.gathered_for_metrics[1]
    out = compute_loss(name, **tensors, **hparams)
    zoo_loss = out.losses.mean()
    assert_close(zoo_loss, trl_loss, f"{name} loss")
    assert_close(out.chosen_rewards, trl_chosen, f"{name} chosen rewards")
    assert_close(out.rejected_rewards, trl_rejected, f"{name} rejected rewards")
    assert_close(grad(zoo_loss, logits), grad(trl_loss, logits), f"{name} gradient")


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_trainer(beta):
    """TRL's ORPO NLL covers every attended token after the first; with a one-token prompt (as here)
    that is the response, which is what dpo_zoo's (the paper's) NLL covers."""
    logits, batch, tensors = logits_data(seed=8)
    stub, model, accelerator = _logits_stub(ORPOTrainer, logits, beta=beta)
    trl_loss, _ = ORPOTrainer.get_batch_loss_metrics(stub, model, batch)
    trl_chosen, trl_rejected = accelerator.gathered_for_metrics[0], accelerator.gathered_for_metrics[1]
    out = compute_loss("orpo", **tensors, beta=beta)
    zoo_loss = out.losses.mean()
    # TRL computes the odds ratio in float32 (``.float()`` in ``odds_ratio_loss``), so agreement is to
    # float32 precision there.
    torch.testing.assert_close(zoo_loss, trl_loss.to(F64), rtol=1e-6, atol=1e-6)
    assert_close(out.chosen_rewards, trl_chosen.to(F64), "chosen rewards")
    assert_close(out.rejected_rewards, trl_rejected.to(F64), "rejected rewards")
    torch.testing.assert_close(grad(zoo_loss, logits), grad(trl_loss, logits), rtol=1e-5, atol=1e-7)


# ====================================================================== completeness


def trl_loss_types():
    """TRL 1.16's loss types, read from its own DPOConfig (the help of ``loss_type``)."""
    import dataclasses
    import re

    from trl.trainer.dpo_config import DPOConfig

    help_text = next(f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type").metadata["help"]
    return re.findall(r"`'(\w+)'`", help_text)


def test_every_trl_loss_type_is_registered_listed_and_compared():
    """A strict superset of TRL 1.16's objectives: each of its loss types is a registered name that
    ``dpo-zoo losses`` prints, and this file compares it with TRL's code."""
    import subprocess
    import sys

    from dpo_zoo.losses import registered_losses

    types_ = trl_loss_types()
    assert len(types_) == 15 and "sigmoid" in types_ and "sigmoid_norm" in types_
    listed = subprocess.run([sys.executable, "-m", "dpo_zoo.cli", "losses"], capture_output=True, text=True, check=True).stdout
    compared = {trl["loss_type"] for _, _, trl in SHARED} | {"ipo", "sft"}
    for loss_type in types_:
        assert loss_type in registered_losses(), loss_type
        assert f"| `{loss_type}` |" in listed, loss_type
        assert loss_type in compared, loss_type
    for name in ("simpo", "cpo", "orpo", "rpo", "ld_dpo"):
        assert f"| `{name}` |" in listed, name
