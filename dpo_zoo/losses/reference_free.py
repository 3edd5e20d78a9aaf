"""Reference-free preference objectives: SimPO, CPO and ORPO.

None of them reads a reference model: the trainer loads none, a prepared set's reference columns are
not read, and prep can skip the reference pass. Their "rewards" are functions of the policy alone.
The maths, sources and defaults are in ``docs/loss_maths.md``.

* SimPO: Meng, Xia, Chen, *SimPO: Simple Preference Optimization with a Reference-Free Reward*,
  NeurIPS 2024, arXiv:2405.14734 (Eq. 6).
* CPO: Xu, Sharaf, Chen, Tan, Shen, Van Durme, Murray, Kim, *Contrastive Preference Optimization:
  Pushing the Boundaries of LLM Performance in Machine Translation*, ICML 2024, arXiv:2401.08417.
* ORPO: Hong, Lee, Thorne, *ORPO: Monolithic Preference Optimization without Reference Model*,
  EMNLP 2024, arXiv:2403.07691 (Eqs. 4–7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Loss, LossOutput, Need, PairBatch, upcast
from .registry import register_loss
from .dpo import check_beta, margin_output
from .sft import check_reduction, chosen_nll, mean_token_logps


class ReferenceFreeLoss(Loss):
    """A loss that reads only the policy: declares that it needs no reference."""

    reference_free = True


def _check_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")


@dataclass
class SimPOConfig:
    """``beta`` (β) = 2.0 and ``gamma`` (γ, the target margin) = 0.5, i.e. the official trainer's default
    β = 2.0 with γ/β = 0.25 (TRL's ``simpo_gamma`` default is 0.5 as well); ``label_smoothing`` (ε) = 0.
    The paper tunes β and γ per model."""

    beta: float = 2.0
    gamma: float = 0.5
    label_smoothing: float = 0.0

    def __post_init__(self):
        check_beta(self.beta)
        _check_smoothing(self.label_smoothing)


@register_loss("simpo")
class SimPOLoss(ReferenceFreeLoss):
    """SimPO: ``L = −(1−ε) log σ(m) − ε log σ(−m)``, ``m = β [log π_θ(y_w)/|y_w| − log π_θ(y_l)/|y_l|] − γ``.

    The implicit reward is the policy's *average* per-token log-prob, ``r(y) = (β/|y|) log π_θ(y|x)``,
    so no reference model is needed and length does not inflate it; γ asks for a margin. Rewards are
    those ``r(y)`` (as TRL's CPOTrainer with ``loss_type="simpo"`` logs them); ``win_prob`` = σ(m).
    Paper: Meng, Xia, Chen, NeurIPS 2024, arXiv:2405.14734, Eq. 6. TRL: CPOTrainer ``loss_type="simpo"``
    with ``cpo_alpha=0`` (TRL's ``simpo_gamma`` is γ).
    """

    Config = SimPOConfig
    requires = frozenset({Need.TOKEN_LOGPS})  # per-token values and masks give the averages
    paper = "Meng, Xia, Chen, SimPO: Simple Preference Optimization with a Reference-Free Reward, NeurIPS 2024"
    arxiv = "2405.14734"
    implementation_notes = "Eq. 6 with cDPO-style label smoothing as the official code and TRL; no reference."

    def forward(self, batch: PairBatch) -> LossOutput:
        cfg = self.config
        r_w = cfg.beta * mean_token_logps(batch, "chosen")
        r_l = cfg.beta * mean_token_logps(batch, "rejected")
        margin = r_w - r_l - cfg.gamma
        eps = cfg.label_smoothing
        losses = -(1.0 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)
        out = margin_output(losses, r_w, r_l)
        out.metrics["win_prob"] = torch.sigmoid(margin).detach()
        return out


@dataclass
class CPOConfig:
    """``beta`` (β) = 0.1, ``cpo_alpha`` (the NLL weight λ) = 1.0 and ``label_smoothing`` (ε) = 0: TRL's
    CPOConfig defaults (the paper's objective has weight 1); ``nll_reduction`` = batch_tokens (TRL's
    token mean over the batch)."""

    beta: float = 0.1
    cpo_alpha: float = 1.0
    label_smoothing: float = 0.0
    nll_reduction: str = "batch_tokens"

    def __post_init__(self):
        check_beta(self.beta)
        if not self.cpo_alpha >= 0:
            raise ValueError(f"cpo_alpha (the NLL weight) must be >= 0, got {self.cpo_alpha}")
        _check_smoothing(self.label_smoothing)
        check_reduction(self.nll_reduction)


@register_loss("cpo")
class CPOLoss(ReferenceFreeLoss):
    """CPO: ``L = −(1−ε) log σ(β m) − ε log σ(−β m) + λ · NLL(y_w)``, ``m = log π_θ(y_w|x) − log π_θ(y_l|x)``.

    DPO with the reference dropped (a uniform reference, the paper's approximation), on *summed*
    log-probs, plus a behaviour-cloning NLL on the chosen responses. Rewards ``β log π_θ(y|x)``;
    ``win_prob`` = σ(β m); ``cpo/nll`` logs the NLL term. Paper: Xu et al., ICML 2024,
    arXiv:2401.08417. TRL: CPOTrainer ``loss_type="sigmoid"`` (TRL's CPO hinge/IPO variants and
    AlphaPO's reward transform are not offered here).
    """

    Config = CPOConfig
    requires = frozenset({Need.TOKEN_LOGPS})
    paper = "Xu et al., Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine Translation, ICML 2024"
    arxiv = "2401.08417"
    implementation_notes = "As TRL's CPOTrainer (sigmoid): summed log-probs, NLL = token mean over the batch's chosen tokens."

    def forward(self, batch: PairBatch) -> LossOutput:
        cfg = self.config
        chosen = upcast(batch.sequence_logps("policy", "chosen"))
        rejected = upcast(batch.sequence_logps("policy", "rejected"))
        logits = cfg.beta * (chosen - rejected)
        eps = cfg.label_smoothing
        nll = chosen_nll(batch, cfg.nll_reduction)
        losses = -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits) + cfg.cpo_alpha * nll
        out = margin_output(losses, cfg.beta * chosen, cfg.beta * rejected)
        out.metrics["cpo/nll"] = nll.detach()
        return out


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − e^x)`` for ``x ≤ 0``, accurate on both sides of ``−log 2`` (Mächler, 2012): ``log(−expm1(x))``
    near 0, ``log1p(−e^x)`` further out."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclass
class ORPOConfig:
    """``beta`` (λ, the odds-ratio weight) = 0.1, the paper's and TRL's; ``nll_reduction`` =
    batch_tokens (TRL's token mean over the batch)."""

    beta: float = 0.1
    nll_reduction: str = "batch_tokens"

    def __post_init__(self):
        check_beta(self.beta)
        check_reduction(self.nll_reduction)


@register_loss("orpo")
class ORPOLoss(ReferenceFreeLoss):
    """ORPO: ``L = NLL(y_w) − λ log σ(log odds_θ(y_w) − log odds_θ(y_l))``.

    With the policy's average per-token log-prob ``a(y) = log π_θ(y|x)/|y|`` (the paper's
    length-normalised likelihood), ``odds(y) = P/(1 − P)`` for ``P = e^{a(y)}``, so
    ``log odds(y) = a(y) − log(1 − e^{a(y)})``. SFT and a preference penalty in one stage, without a
    reference. Rewards ``λ a(y)``; ``win_prob`` = σ(log-odds ratio); ``orpo/nll`` and
    ``orpo/log_odds_ratio`` are logged. Paper: Hong, Lee, Thorne, EMNLP 2024, arXiv:2403.07691.
    TRL: ORPOTrainer (whose NLL also counts the prompt's tokens; here, as in the paper, only the
    response's).
    """

    Config = ORPOConfig
    requires = frozenset({Need.TOKEN_LOGPS})
    paper = "Hong, Lee, Thorne, ORPO: Monolithic Preference Optimization without Reference Model, EMNLP 2024"
    arxiv = "2403.07691"
    implementation_notes = "Average log-probs in the odds as the paper and TRL; NLL over the response only (TRL also counts prompt tokens)."

    def forward(self, batch: PairBatch) -> LossOutput:
        cfg = self.config
        a_w, a_l = mean_token_logps(batch, "chosen"), mean_token_logps(batch, "rejected")
        log_odds_ratio = (a_w - a_l) - (log1mexp(a_w) - log1mexp(a_l))
        nll = chosen_nll(batch, cfg.nll_reduction)
        losses = nll - cfg.beta * F.logsigmoid(log_odds_ratio)
        out = margin_output(losses, cfg.beta * a_w, cfg.beta * a_l)
        out.metrics["win_prob"] = torch.sigmoid(log_odds_ratio).detach()
        out.metrics["orpo/nll"] = nll.detach()
        out.metrics["orpo/log_odds_ratio"] = log_odds_ratio.detach()
        return out
