"""Tie-aware DPO: DPO-RK (Rao–Kupper) and DPO-D (Davidson), plus the ties-as-wins baseline.

Chen, Yang, Lin, Mei, Lyu, Byrne, *On Extending Direct Preference Optimization to Accommodate Ties*,
NeurIPS 2025, arXiv:2409.17431. No official code exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F

from .base import Loss, LossInputError, LossOutput, Need, PairBatch
from .registry import register_loss
from .dpo import check_beta

MODELS = ("rao_kupper", "davidson", "bradley_terry")

OutcomeLogProbs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def rao_kupper_log_probs(d: torch.Tensor, nu: float) -> OutcomeLogProbs:
    """``log p(y_w ≻ y_l), log p(y_w ∼ y_l), log p(y_l ≻ y_w)`` under Rao–Kupper with ``ν ≥ 1``.

    With ``a = log ν``: win ``σ(d − a)``, loss ``σ(−d − a)``, tie ``(ν² − 1) σ(d − a) σ(−d − a)``; all
    in log space. ``ν = 1`` gives ``log 0 = −inf`` for the tie (plain Bradley–Terry cannot score ties).
    """
    shift = math.log(nu)
    log_win = F.logsigmoid(d - shift)
    log_lose = F.logsigmoid(-d - shift)
    # log(ν² − 1) as log(ν − 1) + log(ν + 1): no cancellation for ν just above 1.
    log_tie_scale = -math.inf if nu == 1.0 else math.log(nu - 1.0) + math.log(nu + 1.0)
    return log_win, log_tie_scale + log_win + log_lose, log_lose


def davidson_log_probs(d: torch.Tensor, nu: float) -> OutcomeLogProbs:
    """The same three log-probabilities under Davidson with ``ν ≥ 0``.

    ``p(y_w ≻ y_l) = 1/(1 + e^{−d} + 2ν e^{−d/2})``; dividing numerators and denominator by
    ``e^{−d/2}`` gives the symmetric normaliser ``log Z = logsumexp(d/2, −d/2, log 2ν)``, so
    ``log p_win = d/2 − log Z``, ``log p_tie = log 2ν − log Z``, ``log p_lose = −d/2 − log Z``; the tie is
    exactly symmetric in ``d``. ``ν = 0`` makes the tie ``−inf`` (logsumexp ignores the ``−inf`` entry).
    """
    log_two_nu = math.log(2.0 * nu) if nu > 0 else -math.inf
    half = 0.5 * d
    log_norm = torch.logsumexp(torch.stack([half, -half, torch.full_like(d, log_two_nu)]), dim=0)
    # When one outcome is nearly certain, ``±d/2 − log Z`` cancels two large terms and loses the
    # small remainder; there the outcome's −log p = log(1 + e^{a} + e^{b}) with a, b < 0 is taken
    # with log1p instead (a, b clamped so the branch not taken stays finite for autograd).
    tie_term = log_two_nu - half  # log(2ν e^{−d/2}), the tie term relative to the win's numerator
    log_win = torch.where(
        (d > 0) & (tie_term < 0), -_log1p_exp_sum(-d, tie_term), half - log_norm
    )
    log_lose = torch.where(
        (d < 0) & (log_two_nu + half < 0), -_log1p_exp_sum(d, log_two_nu + half), -half - log_norm
    )
    return log_win, log_two_nu - log_norm, log_lose


def _log1p_exp_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(1 + e^a + e^b)`` for ``a, b ≤ 0``, accurate when the result is tiny."""
    return torch.log1p(torch.exp(a.clamp(max=0.0)) + torch.exp(b.clamp(max=0.0)))


def bradley_terry_log_probs(d: torch.Tensor) -> OutcomeLogProbs:
    """Bradley–Terry: win ``σ(d)``, loss ``σ(−d)``, tie probability 0."""
    return F.logsigmoid(d), torch.full_like(d, -math.inf), F.logsigmoid(-d)


@dataclass
class TieDPOConfig:
    """Hyperparameters of tie-aware DPO.

    * ``beta`` (β) = 0.1, the DPO β in ``d = β h`` (the paper reports β ∈ {0.1, 0.5, 1.0}).
    * ``model`` ∈ {rao_kupper, davidson, bradley_terry} = ``rao_kupper``; ``bradley_terry`` trains
      ties as ordinary wins (the paper's DPO(CP+TP) baseline).
    * ``nu_rk`` (ν_RK ≥ 1) = 3.0, i.e. ``α_RK = log 3``; ``nu_d`` (ν_D ≥ 0) = 1.0. Both defaults make an
      equally matched pair tie with probability ½ (paper §2.2/§2.3.1); results are reported
      insensitive to them (App. F.1). ν_RK = 1 / ν_D = 0 reduce to Bradley–Terry, whose tie
      likelihood is 0, so tie pairs get an infinite loss.
    """

    beta: float = 0.1
    model: str = "rao_kupper"
    nu_rk: float = 3.0
    nu_d: float = 1.0

    def __post_init__(self):
        check_beta(self.beta)
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if not (1.0 <= self.nu_rk < math.inf):
            raise ValueError(f"nu_rk must be finite and >= 1, got {self.nu_rk}")
        if not (0.0 <= self.nu_d < math.inf):
            raise ValueError(f"nu_d must be finite and >= 0, got {self.nu_d}")


@register_loss("dpo_ties_as_wins", model="bradley_terry")
@register_loss("dpo_davidson", model="davidson")
@register_loss("dpo_rk", model="rao_kupper")
@register_loss("tie_dpo")
class TieDPOLoss(Loss):
    """Tie-aware DPO: ``L = −(1 − t) log p_θ(y_w ≻ y_l) − t log p_θ(y_w ∼ y_l)`` (paper Eq. 14–16).

    ``t`` is the pair's tie flag and ``d = β h`` the DPO reward margin (strengths ``λ = e^{r}``):

    * Rao–Kupper (ν ≥ 1, ``α_RK = log ν``): ``p(y_w ≻ y_l) = λ_w/(λ_w + νλ_l) = σ(d − α_RK)`` (Bradley–
      Terry shifted by α_RK), ``p(y_w ∼ y_l) = (ν² − 1) σ(d − α_RK) σ(−d − α_RK)``.
    * Davidson (ν ≥ 0): ``p(y_w ≻ y_l) = 1/(1 + e^{−d} + 2ν e^{−d/2})``,
      ``p(y_w ∼ y_l) = 2ν/(e^{d/2} + e^{−d/2} + 2ν) = 2ν √(p(y_w ≻ y_l) p(y_l ≻ y_w))``.
    * Bradley–Terry (``dpo_ties_as_wins``): ``−log σ(d)`` on every pair, ties included.

    Computed in log space and selected per pair with ``where`` (never ``(1 − t)·…``, which gives
    ``0·∞`` = NaN when ν makes the unused term infinite). On ties both models' gradients are odd in
    ``d`` and drive ``d → 0``; the tie loss is symmetric under swapping ``y_w`` and ``y_l``, so the
    order of a tied pair does not matter. Rewards ``β ℓ_θ(y)`` as in DPO. Metrics: ``win_prob``
    (``p(y_w ≻ y_l)``), ``tie_prob``, ``tie/prob_lose`` (``p(y_l ≻ y_w)``), ``tie/tie_fraction``.

    The formulas are reconstructed from the paper's text (the readable copy has its equations
    stripped) and the classical models; every property the text states is tested.

    Hyperparameters (see :class:`TieDPOConfig`): ``beta`` = 0.1, ``model`` = rao_kupper,
    ``nu_rk`` = 3, ``nu_d`` = 1. Registered names: ``tie_dpo`` and ``dpo_rk`` (Rao–Kupper),
    ``dpo_davidson``, ``dpo_ties_as_wins`` (the DPO(CP+TP) baseline).
    Paper: Chen et al., NeurIPS 2025, arXiv:2409.17431.
    """

    Config = TieDPOConfig
    requires = frozenset({Need.SEQUENCE_LOGPS, Need.TIES})
    paper = "Chen et al., On Extending Direct Preference Optimization to Accommodate Ties, NeurIPS 2025"
    arxiv = "2409.17431"
    implementation_notes = (
        'Likelihoods reconstructed from the paper text and the classical Rao–Kupper and '
        "Davidson models (no official code); ties-as-wins is the paper's DPO(CP+TP) baseline."
    )

    def forward(self, batch: PairBatch) -> LossOutput:
        cfg = self.config
        chosen_ratio, rejected_ratio = batch.log_ratios()
        d = cfg.beta * (chosen_ratio - rejected_ratio)
        is_tie = batch.get("is_tie", f"loss '{self.name or type(self).__name__}'")
        if is_tie.shape != d.shape:
            raise LossInputError(
                f"`is_tie` must have shape {tuple(d.shape)} (one flag per pair), got {tuple(is_tie.shape)}"
            )
        is_tie = is_tie.to(device=d.device, dtype=torch.bool)

        if cfg.model == "rao_kupper":
            log_win, log_tie, log_lose = rao_kupper_log_probs(d, cfg.nu_rk)
        elif cfg.model == "davidson":
            log_win, log_tie, log_lose = davidson_log_probs(d, cfg.nu_d)
        else:
            log_win, log_tie, log_lose = bradley_terry_log_probs(d)

        if cfg.model == "bradley_terry":
            losses = -log_win
        else:
            losses = torch.where(is_tie, -log_tie, -log_win)
        return LossOutput(
            losses=losses,
            chosen_rewards=(cfg.beta * chosen_ratio).detach(),
            rejected_rewards=(cfg.beta * rejected_ratio).detach(),
            metrics={
                "win_prob": log_win.exp().detach(),
                "tie_prob": log_tie.exp().detach(),
                "tie/prob_lose": log_lose.exp().detach(),
                "tie/tie_fraction": is_tie.to(d.dtype).mean(),
            },
        )
