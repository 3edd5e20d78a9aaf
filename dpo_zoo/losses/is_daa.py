"""IS-DAA: importance-sampled direct alignment.

Nguyen et al., *Mitigating Reward Over-optimization in Direct Alignment Algorithms with Importance
Sampling*, NeurIPS 2025, arXiv:2506.08681. Code treated as official: mail-research/AIS-Sampling4DAAs@34029a0
(``cli/train_is_dpo.py``, ``config.py::DPOConfig``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .base import Loss, LossInputError, LossOutput, Need, PairBatch, upcast
from .registry import register_loss
from .dpo import DPOLoss, HingeLoss, IPOLoss, check_beta

BASES = {"dpo": DPOLoss, "ipo": IPOLoss, "hinge": HingeLoss}
DEFAULT_EPS = 0.25


@dataclass
class ISDAAConfig:
    """Hyperparameters of IS-DAA.

    * ``beta`` (β) = 0.1, the base loss's β (``DPOConfig.beta`` of the official code).
    * ``base`` ∈ {dpo, ipo, hinge} = ``dpo``: the direct-alignment loss that is importance-weighted.
    * ``eps`` (ε) = None, meaning 0.25 unless ``clip_max`` is given: the official parameterisation of
      the clip, ``C = e^{2ε}`` (0.25 → C ≈ 1.649; the released script's 1.0 → C = e² ≈ 7.389).
      ``eps = 0`` is ``C = 1``. The default is a sentinel so that an ``eps`` the user *set* is known,
      even when it equals 0.25.
    * ``clip_max`` (C) = None: the clip in ratio space; when given it is used instead of ``eps``. Any
      set ``eps`` (0.25 included) together with a ``clip_max`` other than ``e^{2ε}`` is an error, since
      one of the two would be silently ignored. A name's preset ``eps`` (``is_ipo``) counts as set. ``math.inf`` gives unclipped importance sampling, whose
      weights overflow fp32 once ``log w`` passes ≈ 88: the variance the clip exists to bound.

    ``C ≥ 1`` is required (``ε ≥ 0``): below 1 every pair would be down-weighted, including those the
    policy has not moved away from. [UNVERIFIED] how the paper itself writes the clip (a symbol C, ε,
    or a PPO-style 1+ε) could not be read; both official-code and ratio-space forms are offered.
    """

    beta: float = 0.1
    base: str = "dpo"
    eps: Optional[float] = None
    clip_max: Optional[float] = None

    def __post_init__(self):
        check_beta(self.beta)
        if self.base not in BASES:
            raise ValueError(f"base must be one of {', '.join(BASES)}, got {self.base!r}")
        if self.eps is not None and not self.eps >= 0:
            raise ValueError(f"eps must be >= 0 (the clip is C = e^(2 eps) >= 1), got {self.eps}")
        if self.clip_max is not None:
            if not self.clip_max >= 1:
                raise ValueError(f"clip_max must be >= 1 (or None to use eps), got {self.clip_max}")
            if self.eps is not None and not math.isclose(2.0 * self.eps, math.log(self.clip_max), rel_tol=1e-9):
                raise ValueError(
                    f"eps={self.eps} (C = e^(2 eps) = e^{2.0 * self.eps:g}) and clip_max={self.clip_max} "
                    "disagree; give only one (on a name that presets eps, such as is_ipo, override eps)"
                )

    @property
    def log_clip(self) -> float:
        """``log C``: ``log(clip_max)`` when given, else ``2 ε`` (ε = 0.25 when not set)."""
        if self.clip_max is not None:
            return math.log(self.clip_max)
        return 2.0 * (DEFAULT_EPS if self.eps is None else self.eps)


@register_loss("is_ipo", base="ipo", eps=1.0, beta=0.05)
@register_loss("is_daa")
class ISDAALoss(Loss):
    """IS-DAA: the base DAA loss of each pair times a clipped, stop-gradient importance weight.

    ``log w = [log π_θ(y_w) − log π_b(y_w)] + [log π_θ(y_l) − log π_b(y_l)]`` (summed log-probs; one
    weight per pair, joint over both responses), ``w = exp(min(log w, log C)) = min(w, C)``, and

        ``L = sg(w) · f_DAA(h)``,  with ``f_DAA(h)`` = ``−log σ(βh)`` (dpo), ``(h − 1/(2β))²`` (ipo,
        on summed log-probs as in the official code) or ``max(0, 1 − βh)`` (hinge).

    There is no lower clip: pairs the policy has moved away from get weights near 0. ``π_b`` is the
    policy that generated the data: the optional ``behavior_chosen_logps``/``behavior_rejected_logps``
    when given (the official code reads them from the dataset), else the reference (the paper's
    assumption). The weight is computed without gradient, so ``∇L = w ∇f_DAA(h)``. Weight 1 (π_θ = π_b)
    is exactly the base DAA; ``C = 1`` is *not* DPO: it keeps pairs with ``w ≥ 1`` and shrinks the rest.
    Rewards ``β ℓ_θ(y)`` as in DPO; ``win_prob`` is ``σ(β h)`` (the Bradley–Terry reading of the rewards,
    for every base).

    Hyperparameters (see :class:`ISDAAConfig`): ``beta`` = 0.1, ``base`` = dpo, ``eps`` = None (0.25,
    C = e^{0.5}, unless ``clip_max`` is given), ``clip_max`` = None.
    Registered names: ``is_daa`` (IS-DPO, the default base dpo, matching the method's name) and
    ``is_ipo`` = the released script ``scripts/train_IS/train_is_dpo.sh``: base ipo, ``eps`` = 1.0
    (C = e²), ``beta`` = 0.05 (the released ``train_is_dpo.py`` trains the IPO base loss; its DPO line is
    commented out).
    Paper: Nguyen et al., NeurIPS 2025, arXiv:2506.08681.
    """

    Config = ISDAAConfig
    requires = frozenset({Need.SEQUENCE_LOGPS})
    optional = frozenset({Need.BEHAVIOR_LOGPS})
    paper = "Nguyen et al., Mitigating Reward Over-optimization in Direct Alignment Algorithms with Importance Sampling, NeurIPS 2025"
    arxiv = "2506.08681"
    implementation_notes = (
        'Default base is DPO (IS-DPO); the released script trains the IPO base (registered as '
        'is_ipo). Clip given as clip_max (C) or the official eps (C = e^{2ε}).'
    )

    def forward(self, batch: PairBatch) -> LossOutput:
        cfg = self.config
        base = BASES[cfg.base](beta=cfg.beta)(batch)
        with torch.no_grad():
            behavior_chosen, behavior_rejected = self._behavior_logps(batch)
            log_weight = (upcast(batch.sequence_logps("policy", "chosen")) - behavior_chosen) + (
                upcast(batch.sequence_logps("policy", "rejected")) - behavior_rejected
            )
            weight = torch.exp(log_weight.clamp(max=cfg.log_clip)).to(base.losses.dtype)
            clipped = (log_weight > cfg.log_clip).to(base.losses.dtype)
        return LossOutput(
            losses=weight * base.losses,
            chosen_rewards=base.chosen_rewards,
            rejected_rewards=base.rejected_rewards,
            metrics={
                **base.metrics,  # the base's win_prob = σ(β h), unweighted: w scales the step, not the model
                "is/weight": weight,
                "is/log_weight": log_weight.to(base.losses.dtype),
                "is/clipped": clipped.mean(),
            },
        )

    def _behavior_logps(self, batch: PairBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        """π_b's summed log-probs: the behaviour fields when both are given, else the reference's."""
        given = (batch.has("behavior_chosen_logps"), batch.has("behavior_rejected_logps"))
        if all(given):
            return upcast(batch.behavior_chosen_logps), upcast(batch.behavior_rejected_logps)
        if any(given):
            missing = "behavior_rejected_logps" if given[0] else "behavior_chosen_logps"
            raise LossInputError(
                f"loss '{self.name or type(self).__name__}' got only one behaviour-policy tensor: "
                f"`{missing}` is missing (give both, or neither to use the reference log-probs)"
            )
        return upcast(batch.sequence_logps("reference", "chosen")), upcast(
            batch.sequence_logps("reference", "rejected")
        )
