"""Mixtures and WPO weighting against TRL 1.16's own ``DPOTrainer._compute_loss``.

TRL computes its loss inside the trainer from model outputs, so the method runs on a stand-in ``self``
(only what it reads) and stand-in models that return fixed per-token log-probs (and, for WPO, the
per-token ``log Σ_v π(v)²``), as TRL's fused LM head does. dpo_zoo's ``compute_loss`` gets the same
values in float64: the batch-mean loss and its gradient must agree to 1e-6 relative, and the rewards
(TRL logs ``β·log-ratio``; a mixture's are its first part's) too.

Cases: ``dpo+hinge`` ← ``loss_type=["sigmoid", "hinge"]`` with ``loss_weights``; MPO,
``sigmoid+bco_pair+sft`` ← ``["sigmoid", "bco_pair", "sft"]``; ``dpo`` / ``hinge`` with
``use_weighting`` ← the same loss type with ``use_weighting=True``; and ``dpo+hinge`` with weighting.

Found on the way: TRL 1.16 cannot backpropagate ``hinge`` with ``use_weighting=True`` (it multiplies
the ReLU's output in place, ``per_sequence_loss *= ...``, which autograd refuses). There the loss and
rewards are compared with TRL, and the gradient with that of TRL's formula written out of place.
Nor can it run ``sft`` with ``use_weighting=True`` at all (the in-place multiply of its expanded
batch loss is a RuntimeError in the forward pass), so MPO with WPO has no TRL value to compare with.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from dpo_zoo.losses import compute_loss

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer", reason="TRL is in the bench extra")

F64 = torch.float64
B, T = 4, 6


def values(seed):
    """A policy leaf [2B, T] (chosen rows first, as TRL stacks them), the reference's values, masks of
    lengths 1..T, and a per-token log Σπ² (≤ 0, above the token's own log-prob scale)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (2 * B,), generator=g)
    lengths[0], lengths[B] = T, 2
    mask = torch.arange(T).expand(2 * B, T) < lengths.unsqueeze(-1)
    leaf = (-0.2 - 1.5 * torch.rand(2 * B, T, generator=g, dtype=F64)).requires_grad_(True)
    reference = torch.where(mask, -0.2 - 1.5 * torch.rand(2 * B, T, generator=g, dtype=F64), torch.zeros((), dtype=F64))
    sq_mass = torch.where(mask, -0.1 - 1.0 * torch.rand(2 * B, T, generator=g, dtype=F64), torch.zeros((), dtype=F64))
    return leaf, reference, mask, sq_mass


class _Outputs(torch.nn.Module):
    def __init__(self, log_probs, log_sum_sq_probs):
        super().__init__()
        self.is_gradient_checkpointing = False
        zeros = torch.zeros_like(log_probs).detach()
        self.out = SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros,
                                   is_top1=torch.zeros_like(zeros, dtype=torch.bool), log_sum_sq_probs=log_sum_sq_probs)

    def forward(self, **kwargs):
        return self.out


class _Gather:
    device = torch.device("cpu")

    def __init__(self):
        self.gathered = []

    def gather(self, x):
        self.gathered.append(x)
        return x

    def gather_for_metrics(self, x):
        return x


def trl_loss(leaf, reference, mask, sq_mass, loss_types, loss_weights, beta, use_weighting):
    policy = torch.where(mask, leaf, torch.zeros((), dtype=F64))
    model = _Outputs(policy, sq_mass)
    gather = _Gather()
    stub = SimpleNamespace(
        model=model, ref_model=_Outputs(reference, torch.zeros_like(reference)), accelerator=gather,
        aux_loss_enabled=False, beta=beta, ld_alpha=None, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
        loss_types=loss_types, loss_weights=loss_weights, label_smoothing=0.0, use_weighting=use_weighting,
        precompute_ref_logps=False, args=SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    # TRL's sequences start with a prompt token: the completion mask has one more column, its first 0.
    inputs = {
        "input_ids": torch.zeros(2 * B, T + 1, dtype=torch.long),
        "attention_mask": torch.ones(2 * B, T + 1, dtype=torch.long),
        "completion_mask": torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), mask.long()], dim=1),
    }
    loss = trl_dpo.DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    return loss, gather.gathered[0], gather.gathered[1]


def zoo_tensors(leaf, reference, mask, sq_mass):
    policy = torch.where(mask, leaf, torch.zeros((), dtype=F64))
    return dict(
        policy_chosen_token_logps=policy[:B], policy_rejected_token_logps=policy[B:],
        reference_chosen_token_logps=reference[:B], reference_rejected_token_logps=reference[B:],
        chosen_mask=mask[:B], rejected_mask=mask[B:],
        policy_chosen_log_sq_mass=sq_mass[:B], policy_rejected_log_sq_mass=sq_mass[B:],
    )


CASES = [
    ("dpo+hinge", {"weights": [1.0, 0.4]}, ["sigmoid", "hinge"], [1.0, 0.4], False),
    ("hinge+dpo", {"weights": [0.7, 2.0]}, ["hinge", "sigmoid"], [0.7, 2.0], False),
    ("dpo", {"use_weighting": True}, ["sigmoid"], [1.0], True),
    ("hinge", {"use_weighting": True}, ["hinge"], [1.0], True),
    ("dpo+hinge", {"weights": [1.0, 0.4], "use_weighting": True}, ["sigmoid", "hinge"], [1.0, 0.4], True),
    # MPO (TRL's documented mixture): DPO + BCO + SFT.
    ("sigmoid+bco_pair+sft", {"weights": [0.8, 0.2, 1.0]}, ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], False),
]


@pytest.mark.parametrize("name, hparams, loss_types, loss_weights, use_weighting", CASES,
                         ids=[f"{c[0]}-{'wpo' if c[4] else 'plain'}" for c in CASES])
def test_matches_trl(name, hparams, loss_types, loss_weights, use_weighting):
    leaf, reference, mask, sq_mass = values(seed=len(name) + 10 * use_weighting)
    beta = 0.3
    expected, trl_chosen, trl_rejected = trl_loss(leaf, reference, mask, sq_mass, loss_types, loss_weights, beta,
                                                  use_weighting)
    out = compute_loss(name, **zoo_tensors(leaf, reference, mask, sq_mass), beta=beta, **hparams)
    got = out.losses.mean()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(out.chosen_rewards, trl_chosen.detach(), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(out.rejected_rewards, trl_rejected.detach(), rtol=1e-6, atol=1e-12)
    (g_zoo,) = torch.autograd.grad(got, leaf, retain_graph=True)
    try:
        (g_trl,) = torch.autograd.grad(expected, leaf)
    except RuntimeError as err:  # TRL 1.16: hinge × use_weighting modifies the ReLU output in place
        assert "hinge" in loss_types and use_weighting and "inplace operation" in str(err)
        tensors = zoo_tensors(leaf, reference, mask, sq_mass)
        ratios = [(tensors[f"policy_{s}_token_logps"] - tensors[f"reference_{s}_token_logps"]).sum(-1)
                  for s in ("chosen", "rejected")]
        h = ratios[0] - ratios[1]
        weights = out.metrics["wpo_weight"]  # checked against TRL through the loss value above
        per_type = {"sigmoid": -torch.nn.functional.logsigmoid(beta * h), "hinge": torch.relu(1 - beta * h)}
        total = sum(w * (per_type[kind] * weights).mean() for kind, w in zip(loss_types, loss_weights))
        (g_trl,) = torch.autograd.grad(total, leaf)
    torch.testing.assert_close(g_zoo, g_trl, rtol=1e-6, atol=1e-12)
    assert g_zoo.abs().sum() > 0
    if use_weighting:  # the weights do change the loss (these values are not all weight 1)
        plain = compute_loss(name, **zoo_tensors(leaf, reference, mask, sq_mass), beta=beta,
                             **{k: v for k, v in hparams.items() if k != "use_weighting"}).losses.mean()
        assert abs(plain.item() - got.item()) > 1e-3
