"""f-DPO: DPO under f-divergence constraints.

Wang, Jiang, Yang, Liu, Chen, *Beyond Reverse KL: Generalizing Direct Preference Optimization with
Diverse Divergence Constraints*, ICLR 2024, arXiv:2309.16240. Official code:
alecwangcq/f-divergence-dpo@07d9369, ``trainers.py`` (``dpo_loss``, ``forward_dpo_loss``,
``js_dpo_loss``, ``alpha_dpo_loss``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Loss, LossOutput, Need, PairBatch, check_beta
from .registry import register_loss

DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")
# ``jsd`` and ``alpha_divergence`` are the official repo's spellings (``config.loss.divergence``).
DIVERGENCE_ALIASES = {"jsd": "js", "alpha_divergence": "alpha"}


def capped_expm1(z: torch.Tensor, cap: float) -> torch.Tensor:
    """``e^z − 1`` for ``z ≤ cap``; beyond ``cap``, the tangent line at ``cap``: ``e^cap (1 + z − cap) − 1``.

    A plain clamp (TRL's choice) zeroes the gradient past the cap, so a pair whose chosen response the
    policy has pushed far below the reference stops getting any push back up on it. The tangent keeps
    the function increasing and C¹ with a constant, finite slope ``e^cap``, so the loss stays monotone
    and its gradient keeps its sign while values stay far from the fp32 maximum. ``expm1`` keeps
    precision when ``z`` is tiny (α → 0).
    """
    # Two branches joined by ``where`` rather than ``expm1(min(z, c)) + e^c (z − min(z, c))``: the sum's
    # gradient would be ``(e^z − e^c) + e^c``, which cancels catastrophically to 0 below the cap. The
    # exact branch sees a clamped input so that its unused side never overflows (0·inf in backward).
    exact = torch.expm1(z.clamp(max=cap))
    tangent = math.exp(cap) * (1.0 + (z - cap)) - 1.0
    return torch.where(z <= cap, exact, tangent)


def f_prime_shifted(log_ratio: torch.Tensor, divergence: str, alpha: float, exp_cap: float) -> torch.Tensor:
    """``f'(u) − f'(1)`` at ``u = exp(log_ratio)``, in numerically stable forms:

    * reverse KL: ``ℓ``;
    * forward KL: ``1 − e^{−ℓ}``;
    * Jensen–Shannon: ``log 2 + log σ(ℓ)`` (``f'(1) = log 1 = 0``);
    * α-divergence: ``(1 − e^{−αℓ}) / α`` (``f'(1) = 0``); ``α = 1`` is forward KL, ``α → 0`` reverse KL.

    Every exponent is capped by :func:`capped_expm1` at ``exp_cap``.
    """
    if divergence == "reverse_kl":
        return log_ratio
    if divergence == "forward_kl":
        return -capped_expm1(-log_ratio, exp_cap)
    if divergence == "js":
        return math.log(2.0) + F.logsigmoid(log_ratio)
    if divergence == "alpha":
        return -capped_expm1(-alpha * log_ratio, exp_cap) / alpha
    raise ValueError(f"unknown divergence {divergence!r}")


@dataclass
class FDPOConfig:
    """Hyperparameters of f-DPO.

    * ``beta`` (β) = 0.1. The official configs have no default (``beta: ???``); 0.1 follows DPO/TRL.
    * ``divergence`` ∈ {reverse_kl, forward_kl, js, alpha} = ``reverse_kl`` (= DPO). ``jsd`` and
      ``alpha_divergence`` (the official spellings) are accepted and stored as ``js`` / ``alpha``.
    * ``alpha`` (α) = 0.5, the *paper's* convention, ``0 < α ≤ 1``; read only by ``alpha``. The
      official code asserts ``0 < α < 1``; α = 1 is accepted here because it is exactly forward KL
      (the limit the tests check). TRL ≥ 0.29 uses ``α_TRL = 1 − α``; TRL 0.9.6–0.28 uses the paper's α.
    * ``exp_cap`` = 50.0: the largest exponent evaluated exactly (forward KL and α-divergence compute
      ``e^{−αℓ}``, which overflows fp32 at ``−αℓ ≈ 88.7`` although summed log-ratios reach hundreds).
      Past the cap the exponential continues along its tangent (:func:`capped_expm1`). With 50,
      ``e^50 ≈ 5e21``: per-pair losses stay below ``β e^50 (1 + α|ℓ|)/α`` (≈ 5e25 at ``|ℓ| = 10⁴``)
      and gradients below ``β e^50``, so batch sums and back-propagation through bf16/fp32 weights
      stay finite, while every exponent
      up to 50 (a response ``e^{50/α}`` times less likely under the policy than the reference, where
      the loss is saturated anyway) is exact. TRL ≥ 0.29 clamps at 80; fp16 training should lower
      this to about 10 (TRL uses 11) because the gradient flows back in fp16.
    """

    beta: float = 0.1
    divergence: str = "reverse_kl"
    alpha: float = 0.5
    exp_cap: float = 50.0

    def __post_init__(self):
        check_beta(self.beta)
        self.divergence = DIVERGENCE_ALIASES.get(self.divergence, self.divergence)
        if self.divergence not in DIVERGENCES:
            raise ValueError(
                f"divergence must be one of {', '.join(DIVERGENCES)} (or the aliases "
                f"{', '.join(DIVERGENCE_ALIASES)}), got {self.divergence!r}"
            )
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(
                f"alpha must be in (0, 1] (paper convention; alpha→0 is reverse KL, alpha=1 is forward KL), "
                f"got {self.alpha}"
            )
        if not (0.0 < self.exp_cap <= 88.0):
            raise ValueError(f"exp_cap must be in (0, 88] (e^88.7 overflows fp32), got {self.exp_cap}")


@register_loss("f_dpo_alpha", divergence="alpha")
@register_loss("f_dpo_js", divergence="js")
@register_loss("f_dpo_forward_kl", divergence="forward_kl")
@register_loss("f_dpo")
class FDPOLoss(Loss):
    """f-DPO: ``L = −log σ( β f'(u_w) − β f'(u_l) )`` with ``u = π_θ(y|x)/π_ref(y|x) = exp(ℓ_θ(y))``.

    With a regularizer ``β D_f(π_θ‖π_ref)`` the optimal policy satisfies
    ``r(x,y) = β f'(π(y|x)/π_ref(y|x)) + const(x)``; substituting into Bradley–Terry gives the loss.
    On summed log-ratios ``ℓ`` (computed in ≥ fp32):

    * reverse_kl: ``f'(u) = log u + 1``, used as ``ℓ`` (= DPO);
    * forward_kl: ``f'(u) = −1/u``, used as ``1 − e^{−ℓ}``;
    * js: ``f'(u) = log(2u/(1+u))``, used as ``log 2 + log σ(ℓ)``;
    * alpha (0 < α ≤ 1): ``f'(u) = (1 − u^{−α})/α``, used as ``(1 − e^{−αℓ})/α``.

    Constants cancel in the loss; α → 0 recovers reverse KL and α = 1 gives forward KL.
    Rewards ``β (f'(u) − f'(1))`` (detached): 0 when π_θ = π_ref and exactly DPO's ``β ℓ`` for reverse
    KL (the official code logs ``β f'(u)`` without the constant; margins and accuracies are equal).

    Hyperparameters (see :class:`FDPOConfig`): ``beta`` = 0.1, ``divergence`` = reverse_kl,
    ``alpha`` = 0.5 (paper convention), ``exp_cap`` = 50.
    Registered names: ``f_dpo`` (reverse KL), ``f_dpo_forward_kl``, ``f_dpo_js``, ``f_dpo_alpha``.
    Paper: Wang et al., ICLR 2024, arXiv:2309.16240. The f(u) forms of the paper's Table 1 are
    [UNVERIFIED] (paper body not read); the f' forms were checked against the official code.
    """

    Config = FDPOConfig
    requires = frozenset({Need.SEQUENCE_LOGPS})
    paper = "Wang et al., Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence Constraints, ICLR 2024"
    arxiv = "2309.16240"
    implementation_notes = (
        "Paper α convention (TRL ≥ 0.29 uses α_TRL = 1 − α); rewards β(f'(u) − f'(1)) where the"
        ' official code drops constants; exponent capped at exp_cap with a linear continuation.'
    )

    def forward(self, batch: PairBatch) -> LossOutput:
        cfg = self.config
        chosen_ratio, rejected_ratio = batch.log_ratios()
        chosen_f = f_prime_shifted(chosen_ratio, cfg.divergence, cfg.alpha, cfg.exp_cap)
        rejected_f = f_prime_shifted(rejected_ratio, cfg.divergence, cfg.alpha, cfg.exp_cap)
        logits = cfg.beta * (chosen_f - rejected_f)
        losses = -F.logsigmoid(logits)

        metrics = {"win_prob": torch.sigmoid(logits).detach()}
        if cfg.divergence in ("forward_kl", "alpha"):
            scale = 1.0 if cfg.divergence == "forward_kl" else cfg.alpha
            capped = (-scale * chosen_ratio > cfg.exp_cap) | (-scale * rejected_ratio > cfg.exp_cap)
            metrics["f_dpo/exp_capped"] = capped.to(logits.dtype).detach()
        return LossOutput(
            losses=losses,
            chosen_rewards=(cfg.beta * chosen_f).detach(),
            rejected_rewards=(cfg.beta * rejected_f).detach(),
            metrics=metrics,
        )


# ====================================================================== f-divergence scores for other losses
#
# TRL lets every loss built on the chosen−rejected score difference (its sigmoid, sigmoid_norm, hinge, ipo,
# exo_pair, robust and discopop) swap the log-ratio for an f-divergence score. The losses of this package
# that share that structure take the same three hyperparameters as f-DPO, validated here.


def check_divergence(config) -> None:
    """Validate (and canonicalise) ``config.divergence``, ``config.alpha`` and ``config.exp_cap`` as
    :class:`FDPOConfig` does (paper α convention: TRL's ``f_alpha_divergence_coef`` is ``1 − alpha``)."""
    config.divergence = DIVERGENCE_ALIASES.get(config.divergence, config.divergence)
    if config.divergence not in DIVERGENCES:
        raise ValueError(
            f"divergence must be one of {', '.join(DIVERGENCES)} (or the aliases "
            f"{', '.join(DIVERGENCE_ALIASES)}), got {config.divergence!r}"
        )
    if not 0.0 < config.alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1] (paper convention), got {config.alpha}")
    if not (0.0 < config.exp_cap <= 88.0):
        raise ValueError(f"exp_cap must be in (0, 88] (e^88.7 overflows fp32), got {config.exp_cap}")


def divergence_scores(chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor, config):
    """``(s_w, s_l)`` = ``f'(u) − f'(1)`` of each side's log-ratio (the log-ratio itself for reverse KL)."""
    if config.divergence == "reverse_kl":
        return chosen_ratio, rejected_ratio
    return (
        f_prime_shifted(chosen_ratio, config.divergence, config.alpha, config.exp_cap),
        f_prime_shifted(rejected_ratio, config.divergence, config.alpha, config.exp_cap),
    )
