"""DPO (sigmoid) with conservative label smoothing, plus IPO and hinge as context losses.

Rafailov et al., *Direct Preference Optimization: Your Language Model is Secretly a Reward Model*,
NeurIPS 2023, arXiv:2305.18290, Eq. 7. IPO: Azar et al., arXiv:2310.12036, Eq. 17. Hinge: SLiC
(Zhao et al., arXiv:2305.10425).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Loss, LossOutput, Need, PairBatch
from .registry import register_loss
from .base import check_beta  # noqa: F401  (the losses import it from here too)


def margin_output(losses, chosen_rewards, rejected_rewards) -> LossOutput:
    """Detached rewards plus ``win_prob`` = σ(r_w − r_l), the Bradley–Terry reading of the margin."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return LossOutput(
        losses=losses,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        metrics={"win_prob": torch.sigmoid(chosen_rewards - rejected_rewards)},
    )


@dataclass
class DPOConfig:
    """``beta`` (β, default 0.1 as in TRL and SamPO App. C); ``label_smoothing`` (ε ∈ [0, 0.5], cDPO,
    default 0 = DPO)."""

    beta: float = 0.1
    label_smoothing: float = 0.0

    def __post_init__(self):
        check_beta(self.beta)
        if not 0.0 <= self.label_smoothing <= 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5], got {self.label_smoothing}")


@register_loss("sigmoid")
@register_loss("dpo")
class DPOLoss(Loss):
    """DPO: ``L = −(1−ε) log σ(β h) − ε log σ(−β h)`` (ε = 0 is DPO, ε > 0 is cDPO).

    ``h = [log π_θ(y_w) − log π_ref(y_w)] − [log π_θ(y_l) − log π_ref(y_l)]`` on summed log-probs.
    Rewards ``r(y) = β ℓ_θ(y)`` (detached). Gradients: ``∂L/∂log π_θ(y_w) = −β σ(−βh)`` for ε = 0.

    Hyperparameters: ``beta`` = 0.1, ``label_smoothing`` = 0.
    Paper: Rafailov et al. 2023, arXiv:2305.18290, Eq. 7; cDPO from the official repo
    (eric-mitchell/direct-preference-optimization, ``trainers.py::preference_loss``).
    """

    Config = DPOConfig
    requires = frozenset({Need.SEQUENCE_LOGPS})
    paper = "Rafailov et al., Direct Preference Optimization, NeurIPS 2023"
    arxiv = "2305.18290"
    implementation_notes = (
        'Eq. 7 on summed log-probs, as the official repo; cDPO through label_smoothing.'
    )

    def forward(self, batch: PairBatch) -> LossOutput:
        beta, eps = self.config.beta, self.config.label_smoothing
        chosen_ratio, rejected_ratio = batch.log_ratios()
        logits = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
        return margin_output(losses, beta * chosen_ratio, beta * rejected_ratio)


@dataclass
class BetaConfig:
    """``beta`` (β, the scale of the implicit reward ``r(y) = β ℓ_θ(y)``) = 0.1, TRL's default."""

    beta: float = 0.1

    def __post_init__(self):
        check_beta(self.beta)


@dataclass
class IPOConfig:
    """``beta`` (τ in Azar et al.; the regression target is ``1/(2τ)``), default 0.1."""

    beta: float = 0.1

    def __post_init__(self):
        check_beta(self.beta)


@register_loss("ipo")
class IPOLoss(Loss):
    """IPO (context loss): ``L = (h − 1/(2τ))²`` with τ = ``beta``, on **summed** log-probs.

    This is the DPO repo's and the IS-DAA repo's form. TRL and SamPO's trainer instead divide each
    sequence log-ratio by its token count first; to train that form, pass per-token-averaged
    log-probs as the sequence log-probs. Rewards ``β ℓ_θ(y)``.

    Paper: Azar et al., *A General Theoretical Paradigm to Understand Learning from Human
    Preferences*, AISTATS 2024, arXiv:2310.12036, Eq. 17.
    """

    Config = IPOConfig
    requires = frozenset({Need.SEQUENCE_LOGPS})
    paper = "Azar et al., A General Theoretical Paradigm to Understand Learning from Human Preferences, AISTATS 2024"
    arxiv = "2310.12036"
    implementation_notes = (
        "Summed log-probs (DPO and IS-DAA repos), not TRL's per-token average."
    )

    def forward(self, batch: PairBatch) -> LossOutput:
        beta = self.config.beta
        chosen_ratio, rejected_ratio = batch.log_ratios()
        h = chosen_ratio - rejected_ratio
        losses = (h - 1.0 / (2.0 * beta)) ** 2
        return margin_output(losses, beta * chosen_ratio, beta * rejected_ratio)


@dataclass
class HingeConfig:
    """``beta`` (β) = 0.1 (the margin is ``1/β`` in log-ratio units); ``divergence`` / ``alpha`` /
    ``exp_cap`` as f-DPO (reverse_kl, 0.5, 50): the score of each side, as TRL's ``f_divergence_type``."""

    beta: float = 0.1
    divergence: str = "reverse_kl"
    alpha: float = 0.5
    exp_cap: float = 50.0

    def __post_init__(self):
        from .f_dpo import check_divergence  # f_dpo imports this module

        check_beta(self.beta)
        check_divergence(self)


@register_loss("hinge")
class HingeLoss(Loss):
    """Hinge / SLiC (context loss): ``L = max(0, 1 − β (s_w − s_l))``, ``s`` the log-ratio ℓ_θ(y) (or an
    f-DPO score of it); rewards ``β ℓ_θ(y)``.

    Hyperparameters: ``beta`` = 0.1 (the margin is ``1/β`` in log-ratio units), ``divergence`` = reverse_kl.
    Paper: Zhao et al., *SLiC-HF: Sequence Likelihood Calibration with Human Feedback*, arXiv:2305.10425.
    """

    Config = HingeConfig
    requires = frozenset({Need.SEQUENCE_LOGPS})
    paper = "Zhao et al., SLiC-HF: Sequence Likelihood Calibration with Human Feedback, 2023"
    arxiv = "2305.10425"
    implementation_notes = (
        'Summed log-probs; margin 1/β in log-ratio units.'
    )

    def forward(self, batch: PairBatch) -> LossOutput:
        from .f_dpo import divergence_scores

        beta = self.config.beta
        chosen_ratio, rejected_ratio = batch.log_ratios()
        chosen_score, rejected_score = divergence_scores(chosen_ratio, rejected_ratio, self.config)
        losses = torch.relu(1.0 - beta * (chosen_score - rejected_score))
        return margin_output(losses, beta * chosen_ratio, beta * rejected_ratio)
