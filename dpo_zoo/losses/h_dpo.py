"""H-DPO: entropy-controllable DPO.

Omura, Fujita, Kataoka, *Entropy Controllable Direct Preference Optimization*, arXiv:2411.07595
(ICML 2025 workshop). No official code was found.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Loss, LossOutput, Need, PairBatch, upcast
from .registry import register_loss
from .dpo import check_beta


@dataclass
class HDPOConfig:
    """``beta`` (β) = 0.1 as in DPO; ``alpha`` (α) = 1.0, the weight of the entropy term (1 is DPO;
    the paper recommends α < 1 for sharper, lower-entropy policies, 0.9/0.95 recalled [UNVERIFIED]).
    Any α > 0 is accepted: α > 1 raises the optimal policy's entropy."""

    beta: float = 0.1
    alpha: float = 1.0

    def __post_init__(self):
        check_beta(self.beta)
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")


@register_loss("h_dpo")
class HDPOLoss(Loss):
    """H-DPO: DPO with the policy's entropy re-weighted by α.

    Writing the reverse-KL regulariser as ``KL(π‖π_ref) = −H(π) + H(π, π_ref)`` and weighting the
    entropy by α gives ``max_π E[r] − β (H(π, π_ref) − α H(π))``, whose optimum is
    ``π*(y|x) ∝ π_ref(y|x)^{1/α} exp(r(x,y)/(αβ))``, i.e. ``r = αβ log π* − β log π_ref + αβ log Z(x)``.
    Substituting into Bradley–Terry:

        ``L = −log σ( β [ α (log π_θ(y_w) − log π_θ(y_l)) − (log π_ref(y_w) − log π_ref(y_l)) ] )``

    on summed log-probs. α multiplies the *policy* log-probs only; α = 1 is DPO exactly and α < 1
    lowers the optimal policy's entropy (mode seeking). No vocabulary entropies are needed.
    Rewards ``β (α log π_θ(y) − log π_ref(y))`` (detached; defined up to a per-prompt constant, so they
    are not 0 at π_θ = π_ref unless α = 1, but their margin is the loss's logit). ``win_prob`` is
    σ(that margin).

    [UNVERIFIED] Only the paper's abstract could be read and no official code exists; the formula is
    re-derived from the abstract's objective (it is self-consistent: the optimum follows, α = 1 is DPO).
    Whether the paper puts α on the policy terms (as here, and as one third-party implementation does)
    or equivalently 1/α on the reference terms with a rescaled β is to be confirmed against §3 of
    arXiv:2411.07595.

    Hyperparameters: ``beta`` = 0.1, ``alpha`` = 1.0.
    Paper: Omura et al., arXiv:2411.07595.
    """

    Config = HDPOConfig
    requires = frozenset({Need.SEQUENCE_LOGPS})
    paper = "Omura, Fujita, Kataoka, Entropy Controllable Direct Preference Optimization, 2024"
    arxiv = "2411.07595"
    implementation_notes = (
        'α on the policy log-probs, re-derived from the abstract [UNVERIFIED]; no official code'
        ' found.'
    )

    def forward(self, batch: PairBatch) -> LossOutput:
        beta, alpha = self.config.beta, self.config.alpha
        policy_chosen = upcast(batch.sequence_logps("policy", "chosen"))
        policy_rejected = upcast(batch.sequence_logps("policy", "rejected"))
        ref_chosen = upcast(batch.sequence_logps("reference", "chosen"))
        ref_rejected = upcast(batch.sequence_logps("reference", "rejected"))
        # Differences taken within each model first: the summed log-probs can be thousands of nats
        # while the margin is a few, so subtracting the per-response rewards would lose fp32 precision.
        logits = beta * (alpha * (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected))
        losses = -F.logsigmoid(logits)
        return LossOutput(
            losses=losses,
            chosen_rewards=(beta * (alpha * policy_chosen - ref_chosen)).detach(),
            rejected_rewards=(beta * (alpha * policy_rejected - ref_rejected)).detach(),
            metrics={"win_prob": torch.sigmoid(logits).detach()},
        )
