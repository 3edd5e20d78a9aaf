"""DiscoPOP: the log-ratio modulated loss found by LLM-driven objective discovery.

Chris Lu, Holt, Fanconi, Chan, Foerster, van der Schaar, Lange, *Discovering Preference Optimization
Algorithms with and for Large Language Models*, NeurIPS 2024, arXiv:2406.08414, Eq. 5. The maths,
source and defaults are in ``docs/loss_maths.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Loss, LossOutput, Need, PairBatch
from .registry import register_loss
from .dpo import check_beta, margin_output
from .f_dpo import check_divergence, divergence_scores


@dataclass
class DiscoPOPConfig:
    """``beta`` (β) = 0.1 (TRL's default); ``tau`` (τ, the temperature of
    the blend) = 0.05, the paper's recommended value and TRL's ``discopop_tau``; ``divergence`` /
    ``alpha`` / ``exp_cap`` as f-DPO."""

    beta: float = 0.1
    tau: float = 0.05
    divergence: str = "reverse_kl"
    alpha: float = 0.5
    exp_cap: float = 50.0

    def __post_init__(self):
        check_beta(self.beta)
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        check_divergence(self)


@register_loss("discopop")
class DiscoPOPLoss(Loss):
    """DiscoPOP (log-ratio modulated loss, "LRML"): with ``ρ = βh`` and ``m = σ(ρ/τ)``::

        L = (1 − m) · (−log σ(ρ)) + m · e^{−ρ}

    a blend of DPO's logistic loss and an exponential loss, the blend weight set by the margin itself:
    pairs already ranked right (ρ ≫ 0) are scored by the exponential, the rest by the logistic loss.
    The blend weight carries gradient (as in the paper and TRL). Rewards ``β ℓ_θ(y)``;
    ``win_prob`` = σ(ρ). Paper: Lu et al., NeurIPS 2024, arXiv:2406.08414, Eq. 5.
    TRL: ``loss_type="discopop"``.
    """

    Config = DiscoPOPConfig
    requires = frozenset({Need.SEQUENCE_LOGPS})
    paper = "Lu et al., Discovering Preference Optimization Algorithms with and for Large Language Models, NeurIPS 2024"
    arxiv = "2406.08414"
    implementation_notes = "Eq. 5 as TRL's discopop (gradient through the blend weight), with f-divergence scores."

    def forward(self, batch: PairBatch) -> LossOutput:
        cfg = self.config
        chosen_ratio, rejected_ratio = batch.log_ratios()
        chosen_score, rejected_score = divergence_scores(chosen_ratio, rejected_ratio, cfg)
        rho = cfg.beta * (chosen_score - rejected_score)
        blend = torch.sigmoid(rho / cfg.tau)
        losses = (1.0 - blend) * -F.logsigmoid(rho) + blend * torch.exp(-rho)
        out = margin_output(losses, cfg.beta * chosen_ratio, cfg.beta * rejected_ratio)
        out.metrics["win_prob"] = torch.sigmoid(rho).detach()
        return out
