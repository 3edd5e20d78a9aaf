"""Losses that score each response's implicit reward on its own, not only the margin between them:
NCA, BCO (pairwise) and SPPO (hard labels).

DPO's loss depends on ``r_w − r_l`` alone, so both rewards may fall together. These losses also pull
each reward towards an absolute target (chosen up, rejected down), which keeps the chosen response's
likelihood from collapsing. ``r(y) = β ℓ_θ(y)`` throughout. The maths, sources and defaults are in
``docs/loss_maths.md``.

* NCA: Chen et al., *Noise Contrastive Alignment of Language Models with Explicit
  Rewards*, NeurIPS 2024, arXiv:2402.05369.
* BCO: Jung et al., *Binary Classifier Optimization for Large Language Model
  Alignment*, 2024, arXiv:2404.04656.
* SPPO: Wu, Sun, Yuan, Ji, Yang, Gu, *Self-Play Preference Optimization for Language Model
  Alignment*, 2024, arXiv:2405.00675 (Eq. 4.7 with hard probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Loss, LossOutput, Need, PairBatch
from .registry import register_loss
from .dpo import BetaConfig, check_beta, margin_output


@register_loss("nca_pair")
class NCAPairLoss(Loss):
    """NCA (pairwise): ``L = −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l)``.

    Noise-contrastive estimation with two responses: the chosen one is classified against the data,
    and both are contrasted against the reference's own samples (the ½ terms). Unlike DPO, the loss
    rises when both rewards fall, so the chosen likelihood is held up. ``win_prob`` = σ(r_w − r_l).
    Hyperparameter: ``beta`` = 0.1 (TRL's). Paper: Chen et al., NeurIPS 2024, arXiv:2402.05369.
    TRL: ``loss_type="nca_pair"``.
    """

    Config = BetaConfig
    requires = frozenset({Need.SEQUENCE_LOGPS})
    paper = "Chen et al., Noise Contrastive Alignment of Language Models with Explicit Rewards, NeurIPS 2024"
    arxiv = "2402.05369"
    implementation_notes = "Pairwise NCA as TRL's nca_pair (binary preference data, K = 2)."

    def forward(self, batch: PairBatch) -> LossOutput:
        beta = self.config.beta
        chosen_ratio, rejected_ratio = batch.log_ratios()
        r_w, r_l = beta * chosen_ratio, beta * rejected_ratio
        losses = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
        return margin_output(losses, r_w, r_l)


BCO_SHIFTS = ("none", "batch_mean")


@dataclass
class BCOPairConfig:
    """``beta`` (β) = 0.1; ``reward_shift`` ∈ {none, batch_mean} = none.

    The BCO paper shifts both rewards by δ, a running mean of the rewards over training, so that the
    classifier's boundary follows them. TRL 1.16's ``bco_pair`` has no shift (δ = 0), which ``none``
    matches. A running mean is state carried across steps (and across ranks and checkpoints), which a
    loss here does not hold; ``batch_mean`` is the stateless stand-in: δ = the mean of the batch's
    ``r_w`` and ``r_l``, without gradient (what a running mean tends to when batches look alike).
    """

    beta: float = 0.1
    reward_shift: str = "none"

    def __post_init__(self):
        check_beta(self.beta)
        if self.reward_shift not in BCO_SHIFTS:
            raise ValueError(f"reward_shift must be one of {', '.join(BCO_SHIFTS)}, got {self.reward_shift!r}")


@register_loss("bco_pair")
class BCOPairLoss(Loss):
    """BCO (pairwise): ``L = −log σ(r_w − δ) − log σ(−(r_l − δ))``.

    A binary classifier with the implicit reward as its logit: chosen responses are the positive
    class, rejected ones the negative class. The paper proves this bounds the DPO loss from above.
    ``δ`` = 0 (``reward_shift="none"``, TRL 1.16) or the batch's mean reward (``batch_mean``; see
    :class:`BCOPairConfig` for why no running mean is kept). Logged as ``bco/delta``.
    ``win_prob`` = σ(r_w − r_l). Paper: Jung et al., 2024, arXiv:2404.04656. TRL: ``loss_type="bco_pair"``
    (also a part of MPO = sigmoid + bco_pair + sft).
    """

    Config = BCOPairConfig
    requires = frozenset({Need.SEQUENCE_LOGPS})
    paper = "Jung et al., Binary Classifier Optimization for Large Language Model Alignment, 2024"
    arxiv = "2404.04656"
    implementation_notes = (
        "δ = 0 as TRL 1.16's bco_pair; the paper's running reward mean is offered statelessly as the "
        "batch's mean (reward_shift=batch_mean)."
    )

    def forward(self, batch: PairBatch) -> LossOutput:
        cfg = self.config
        chosen_ratio, rejected_ratio = batch.log_ratios()
        r_w, r_l = cfg.beta * chosen_ratio, cfg.beta * rejected_ratio
        if cfg.reward_shift == "batch_mean":
            delta = torch.cat([r_w, r_l]).detach().mean()
        else:
            delta = torch.zeros((), dtype=r_w.dtype, device=r_w.device)
        losses = -F.logsigmoid(r_w - delta) - F.logsigmoid(-(r_l - delta))
        out = margin_output(losses, r_w, r_l)
        out.metrics["bco/delta"] = delta.detach()
        return out


@register_loss("sppo_hard")
class SPPOHardLoss(Loss):
    """SPPO with hard probabilities: ``L = (ℓ_w − 1/(2β))² + (ℓ_l + 1/(2β))²``.

    SPPO regresses each response's log-ratio on ``(P(y ≻ π) − ½)/β``, with the win probability P
    estimated by a preference model. With hard labels P = 1 for the chosen and 0 for the rejected
    response, the targets are ``±1/(2β)``. Rewards ``β ℓ_θ(y)``; ``win_prob`` = σ(r_w − r_l).
    Hyperparameter: ``beta`` = 0.1 (β is the regression scale η⁻¹ of the paper).
    Paper: Wu et al., 2024, arXiv:2405.00675, Eq. 4.7. TRL: ``loss_type="sppo_hard"``.
    """

    Config = BetaConfig
    requires = frozenset({Need.SEQUENCE_LOGPS})
    paper = "Wu et al., Self-Play Preference Optimization for Language Model Alignment, 2024"
    arxiv = "2405.00675"
    implementation_notes = "Hard-label SPPO (P = 1 / 0) as TRL's sppo_hard; the soft, PairRM-estimated P is not computed here."

    def forward(self, batch: PairBatch) -> LossOutput:
        beta = self.config.beta
        chosen_ratio, rejected_ratio = batch.log_ratios()
        losses = (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
        return margin_output(losses, beta * chosen_ratio, beta * rejected_ratio)
