"""DPO for noisy preference labels: robust DPO (rDPO) and EXO's pairwise form.

Both read each pair's label as possibly flipped with probability ε (``label_smoothing``), the way
cDPO does, but draw different conclusions from it. The maths, sources and defaults are in
``docs/loss_maths.md``.

* rDPO: Chowdhury, Kini, Natarajan, *Provably Robust DPO: Aligning Language Models with Noisy
  Feedback*, ICML 2024, arXiv:2403.00409.
* EXO: Ji et al., *Towards Efficient Exact Optimization of Language Model
  Alignment*, ICML 2024, arXiv:2402.00856 (Eq. 16, K = 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Loss, LossOutput, Need, PairBatch
from .registry import register_loss
from .dpo import check_beta, margin_output
from .f_dpo import check_divergence, divergence_scores


@dataclass
class RobustDPOConfig:
    """``beta`` (β) = 0.1; ``label_smoothing`` (ε, the assumed flip rate, in [0, 0.5)) = 0.1, the value
    the rDPO paper's experiments and TRL's documentation suggest (TRL's own default 0 makes it DPO);
    ``divergence`` / ``alpha`` / ``exp_cap`` as f-DPO (reverse_kl, 0.5, 50): the score of each side."""

    beta: float = 0.1
    label_smoothing: float = 0.1
    divergence: str = "reverse_kl"
    alpha: float = 0.5
    exp_cap: float = 50.0

    def __post_init__(self):
        check_beta(self.beta)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing (the flip rate ε) must be in [0, 0.5), got {self.label_smoothing}")
        check_divergence(self)


@register_loss("robust")
class RobustDPOLoss(Loss):
    """rDPO: ``L = [−(1−ε) log σ(βh) + ε log σ(−βh)] / (1 − 2ε)``, ``h = s_w − s_l``.

    An unbiased estimate of the clean-label DPO loss when each label is flipped with probability ε
    (rDPO's de-biasing; cDPO instead *adds* ε log σ(−βh), which biases the loss towards a finite
    margin). ``s`` is the log-ratio ℓ_θ(y) (reverse KL) or an f-DPO score. Rewards ``β ℓ_θ(y)``
    (as TRL logs them, whatever the divergence); ``win_prob`` = σ(βh). ε = 0 is DPO.
    Paper: Chowdhury et al., ICML 2024, arXiv:2403.00409. TRL: ``loss_type="robust"``.
    """

    Config = RobustDPOConfig
    requires = frozenset({Need.SEQUENCE_LOGPS})
    paper = "Chowdhury, Kini, Natarajan, Provably Robust DPO: Aligning Language Models with Noisy Feedback, ICML 2024"
    arxiv = "2403.00409"
    implementation_notes = "As TRL's robust loss (de-biased cDPO), with its f-divergence scores."

    def forward(self, batch: PairBatch) -> LossOutput:
        cfg = self.config
        chosen_ratio, rejected_ratio = batch.log_ratios()
        chosen_score, rejected_score = divergence_scores(chosen_ratio, rejected_ratio, cfg)
        logits = cfg.beta * (chosen_score - rejected_score)
        eps = cfg.label_smoothing
        losses = (-(1.0 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1.0 - 2.0 * eps)
        out = margin_output(losses, cfg.beta * chosen_ratio, cfg.beta * rejected_ratio)
        out.metrics["win_prob"] = torch.sigmoid(logits).detach()
        return out


@dataclass
class EXOConfig:
    """``beta`` (β) = 0.1; ``label_smoothing`` (ε ∈ (0, 1), the target probability of the rejected
    response) = 1e-3, the EXO paper's recommendation (TRL requires ε > 0 too); ``divergence`` /
    ``alpha`` / ``exp_cap`` as f-DPO."""

    beta: float = 0.1
    label_smoothing: float = 1e-3
    divergence: str = "reverse_kl"
    alpha: float = 0.5
    exp_cap: float = 50.0

    def __post_init__(self):
        check_beta(self.beta)
        if not 0.0 < self.label_smoothing < 1.0:
            raise ValueError(
                f"label_smoothing (EXO's ε) must be in (0, 1): the target distribution needs mass on both "
                f"responses; got {self.label_smoothing}"
            )
        check_divergence(self)


@register_loss("exo_pair")
class EXOPairLoss(Loss):
    """EXO (pairwise): ``L = KL(q_θ ‖ p_ε)`` over the two responses, ``q_θ = (σ(βh), σ(−βh))``,
    ``p_ε = (1−ε, ε)``::

        L = σ(βh) [log σ(βh) − log(1−ε)] + σ(−βh) [log σ(−βh) − log ε]

    EXO minimises the *reverse* KL from the policy's implied preference distribution to the labels'
    (DPO minimises the forward one, a cross-entropy), which the paper shows is mode-seeking, as exact
    RL-with-KL optimisation is. The minimum (0) is at σ(βh) = 1−ε. Rewards ``β ℓ_θ(y)``; ``win_prob`` = σ(βh).
    Paper: Ji et al., ICML 2024, arXiv:2402.00856, Eq. 16 with K = 2. TRL: ``loss_type="exo_pair"``.
    """

    Config = EXOConfig
    requires = frozenset({Need.SEQUENCE_LOGPS})
    paper = "Ji et al., Towards Efficient Exact Optimization of Language Model Alignment, ICML 2024"
    arxiv = "2402.00856"
    implementation_notes = "Pairwise EXO (K = 2) with one β for policy and labels, as TRL's exo_pair."

    def forward(self, batch: PairBatch) -> LossOutput:
        cfg = self.config
        chosen_ratio, rejected_ratio = batch.log_ratios()
        chosen_score, rejected_score = divergence_scores(chosen_ratio, rejected_ratio, cfg)
        logits = cfg.beta * (chosen_score - rejected_score)
        eps = cfg.label_smoothing
        log_q_w, log_q_l = F.logsigmoid(logits), F.logsigmoid(-logits)
        losses = log_q_w.exp() * (log_q_w - math.log1p(-eps)) + log_q_l.exp() * (log_q_l - math.log(eps))
        out = margin_output(losses, cfg.beta * chosen_ratio, cfg.beta * rejected_ratio)
        out.metrics["win_prob"] = torch.sigmoid(logits).detach()
        return out
