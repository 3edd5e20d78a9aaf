"""APO: anchored preference optimisation (zero and down anchors).

D'Oosterlinck, Xu, Develder, Demeester, Singh, Potts, Kiela, Mehri, *Anchored Preference Optimization
and Contrastive Revisions: Addressing Underspecification in Alignment*, 2024, arXiv:2408.06266,
Eqs. 7 and 8. The maths, source and defaults are in ``docs/loss_maths.md``.
"""

from __future__ import annotations

import torch

from .base import Loss, LossOutput, Need, PairBatch
from .registry import register_loss
from .dpo import BetaConfig, margin_output


class _APOLoss(Loss):
    Config = BetaConfig
    requires = frozenset({Need.SEQUENCE_LOGPS})
    paper = "D'Oosterlinck et al., Anchored Preference Optimization and Contrastive Revisions, 2024"
    arxiv = "2408.06266"
    implementation_notes = "Eqs. 7 (apo_zero) and 8 (apo_down) as TRL's, with r = β ℓ_θ(y)."


@register_loss("apo_zero")
class APOZeroLoss(_APOLoss):
    """APO-zero: ``L = (1 − σ(r_w)) + σ(r_l)``, ``r = β ℓ_θ(y)``.

    Anchors each reward at 0 (the reference): the chosen likelihood is pushed up and the rejected one
    down, each on its own. For data whose chosen responses are better than the model's own outputs.
    ``win_prob`` = σ(r_w − r_l). Hyperparameter: ``beta`` = 0.1.
    Paper: D'Oosterlinck et al., 2024, arXiv:2408.06266, Eq. 7. TRL: ``loss_type="apo_zero"``.
    """

    def forward(self, batch: PairBatch) -> LossOutput:
        beta = self.config.beta
        chosen_ratio, rejected_ratio = batch.log_ratios()
        r_w, r_l = beta * chosen_ratio, beta * rejected_ratio
        return margin_output((1.0 - torch.sigmoid(r_w)) + torch.sigmoid(r_l), r_w, r_l)


@register_loss("apo_down")
class APODownLoss(_APOLoss):
    """APO-down: ``L = σ(r_w) + (1 − σ(r_w − r_l))``, ``r = β ℓ_θ(y)``.

    Pushes both likelihoods down, the rejected one more (through the margin term). For data whose
    chosen responses are *worse* than the model's own outputs. ``win_prob`` = σ(r_w − r_l).
    Hyperparameter: ``beta`` = 0.1.
    Paper: D'Oosterlinck et al., 2024, arXiv:2408.06266, Eq. 8. TRL: ``loss_type="apo_down"``.
    """

    def forward(self, batch: PairBatch) -> LossOutput:
        beta = self.config.beta
        chosen_ratio, rejected_ratio = batch.log_ratios()
        r_w, r_l = beta * chosen_ratio, beta * rejected_ratio
        return margin_output(torch.sigmoid(r_w) + (1.0 - torch.sigmoid(r_w - r_l)), r_w, r_l)
