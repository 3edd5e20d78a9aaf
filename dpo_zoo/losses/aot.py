"""AOT: alignment via optimal transport (paired and unpaired).

Melnyk, Mroueh, Belgodere, Rigotti, Nitsure, Yurochkin, Greenewald, Navratil, Ross, *Distributional
Preference Alignment of LLMs via Optimal Transport*, NeurIPS 2024, arXiv:2406.05882. The maths, source
and defaults are in ``docs/loss_maths.md``.

AOT asks for *first-order stochastic dominance* of the chosen rewards' distribution over the
rejected rewards' distribution, not for each pair's margin to be positive. In one dimension the
optimal transport between two empirical distributions matches their order statistics, so the loss
sorts over the batch: the ``i``-th per-pair loss belongs to the ``i``-th quantile, not to pair ``i``.
Per-pair weights would therefore be attached to the wrong terms, and the loss depends on which pairs
share a batch (as TRL's, per device micro-batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Loss, LossOutput, Need, PairBatch, upcast
from .registry import register_loss
from .dpo import check_beta, margin_output


def _smoothed_logistic(delta: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    logits = beta * delta
    return -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


@dataclass
class AOTConfig:
    """``beta`` (β) = 0.1 and ``label_smoothing`` (ε ∈ [0, 0.5], a cDPO-style smoothing of the
    dominance violation) = 0: TRL's defaults."""

    beta: float = 0.1
    label_smoothing: float = 0.0

    def __post_init__(self):
        check_beta(self.beta)
        if not 0.0 <= self.label_smoothing <= 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5], got {self.label_smoothing}")


class _AOTLoss(Loss):
    Config = AOTConfig
    requires = frozenset({Need.SEQUENCE_LOGPS})
    paper = "Melnyk et al., Distributional Preference Alignment of LLMs via Optimal Transport, NeurIPS 2024"
    arxiv = "2406.05882"
    implementation_notes = (
        "Logistic relaxation of the dominance violation on sorted batch quantities, as TRL's aot / "
        "aot_unpaired; per-pair losses are per quantile, so per-pair weights do not apply."
    )

    def _output(self, losses, chosen_ratio, rejected_ratio, delta) -> LossOutput:
        beta = self.config.beta
        out = margin_output(losses, beta * chosen_ratio, beta * rejected_ratio)
        # The dominance the loss asks for, per quantile: σ(β δ_(i)).
        out.metrics["aot/quantile_win_prob"] = torch.sigmoid(beta * delta).detach()
        return out


@register_loss("aot")
class AOTPairedLoss(_AOTLoss):
    """AOT (paired): with ``m_i = log π_θ(y_w) − log π_θ(y_l)`` and ``m^ref_i`` the reference's, each
    sorted over the batch (``m_(1) ≤ … ≤ m_(B)``)::

        δ_(i) = m_(i) − m^ref_(i),   L_(i) = −(1−ε) log σ(β δ_(i)) − ε log σ(−β δ_(i))

    i.e. the policy's margins must dominate the reference's quantile by quantile. Rewards
    ``β ℓ_θ(y)`` per pair (unsorted); ``win_prob`` = σ(r_w − r_l) per pair.
    Hyperparameters: ``beta`` = 0.1, ``label_smoothing`` (ε) = 0.
    Paper: Melnyk et al., NeurIPS 2024, arXiv:2406.05882. TRL: ``loss_type="aot"``.
    """

    def forward(self, batch: PairBatch) -> LossOutput:
        chosen_ratio, rejected_ratio = batch.log_ratios()
        policy_margin = upcast(batch.sequence_logps("policy", "chosen")) - upcast(batch.sequence_logps("policy", "rejected"))
        reference_margin = upcast(batch.sequence_logps("reference", "chosen")) - upcast(
            batch.sequence_logps("reference", "rejected")
        )
        delta = policy_margin.sort(dim=0).values - reference_margin.sort(dim=0).values
        losses = _smoothed_logistic(delta, self.config.beta, self.config.label_smoothing)
        return self._output(losses, chosen_ratio, rejected_ratio, delta)


@register_loss("aot_unpaired")
class AOTUnpairedLoss(_AOTLoss):
    """AOT (unpaired): the chosen log-ratios ``ℓ_θ(y_w)`` and rejected log-ratios ``ℓ_θ(y_l)`` are each
    sorted over the batch, and the chosen distribution must dominate the rejected one::

        δ_(i) = ℓ_w,(i) − ℓ_l,(i),   L_(i) = −(1−ε) log σ(β δ_(i)) − ε log σ(−β δ_(i))

    Unpaired: it does not use which chosen response goes with which rejected one. Rewards ``β ℓ_θ(y)``
    per pair; ``win_prob`` = σ(r_w − r_l). Hyperparameters: ``beta`` = 0.1, ``label_smoothing`` = 0.
    Paper: Melnyk et al., NeurIPS 2024, arXiv:2406.05882. TRL: ``loss_type="aot_unpaired"``.
    """

    def forward(self, batch: PairBatch) -> LossOutput:
        chosen_ratio, rejected_ratio = batch.log_ratios()
        delta = chosen_ratio.sort(dim=0).values - rejected_ratio.sort(dim=0).values
        losses = _smoothed_logistic(delta, self.config.beta, self.config.label_smoothing)
        return self._output(losses, chosen_ratio, rejected_ratio, delta)
