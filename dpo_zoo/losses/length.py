"""Length-aware DPO: length-normalised DPO (Tülu 3's ``sigmoid_norm``) and LD-DPO (length desensitisation).

DPO's summed log-ratios grow with response length, which rewards verbosity. These two losses change
what is summed. The maths, sources and defaults are in ``docs/loss_maths.md``.

* Length-normalised DPO: Lambert et al., *Tülu 3: Pushing Frontiers in Open Language Model
  Post-Training*, 2024, arXiv:2411.15124 (§5, "length-normalized DPO").
* LD-DPO: Liu et al., *Length Desensitization in Direct Preference
  Optimization*, 2024, arXiv:2409.06411.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F

from .base import Loss, LossOutput, Need, PairBatch, upcast
from .registry import register_loss
from .dpo import check_beta, margin_output
from .f_dpo import check_divergence, divergence_scores


def response_lengths(batch: PairBatch, side: str) -> torch.Tensor:
    """``|y|`` ``[B]``: response tokens of ``side`` (at least 1, so an empty response divides by 1)."""
    return batch.mask(side).sum(-1).clamp(min=1)


@dataclass
class NormalisedDPOConfig:
    """``beta`` (β) = 0.1 (TRL's default; Tülu 3 trains its 8B model with β = 5 on these per-token
    values); ``divergence`` / ``alpha`` / ``exp_cap`` as f-DPO (reverse_kl, 0.5, 50)."""

    beta: float = 0.1
    divergence: str = "reverse_kl"
    alpha: float = 0.5
    exp_cap: float = 50.0

    def __post_init__(self):
        check_beta(self.beta)
        check_divergence(self)


@register_loss("sigmoid_norm")
class NormalisedDPOLoss(Loss):
    """Length-normalised DPO: ``L = −log σ(β [s_w/|y_w| − s_l/|y_l|])``.

    ``s`` is the summed log-ratio ℓ_θ(y) (or an f-DPO score of it) and ``|y|`` the number of response
    tokens, so the margin compares average per-token log-ratios. Rewards ``β ℓ_θ(y)`` on the *summed*
    log-ratios, as TRL logs them; ``win_prob`` = the loss's own σ(β [s_w/|y_w| − s_l/|y_l|]).
    At equal lengths it is DPO with β/|y|. Paper: Lambert et al., Tülu 3, 2024, arXiv:2411.15124.
    TRL: ``loss_type="sigmoid_norm"``.
    """

    Config = NormalisedDPOConfig
    requires = frozenset({Need.TOKEN_LOGPS})  # the response masks give |y|
    paper = "Lambert et al., Tülu 3: Pushing Frontiers in Open Language Model Post-Training, 2024"
    arxiv = "2411.15124"
    implementation_notes = "Scores divided by the response token count, as TRL's sigmoid_norm; rewards on summed log-ratios."

    def forward(self, batch: PairBatch) -> LossOutput:
        cfg = self.config
        chosen_ratio, rejected_ratio = batch.log_ratios()
        chosen_score, rejected_score = divergence_scores(chosen_ratio, rejected_ratio, cfg)
        chosen_len = response_lengths(batch, "chosen").to(chosen_score.dtype)
        rejected_len = response_lengths(batch, "rejected").to(rejected_score.dtype)
        logits = cfg.beta * (chosen_score / chosen_len - rejected_score / rejected_len)
        out = margin_output(-F.logsigmoid(logits), cfg.beta * chosen_ratio, cfg.beta * rejected_ratio)
        out.metrics["win_prob"] = torch.sigmoid(logits).detach()
        return out


@dataclass
class LDDPOConfig:
    """``beta`` (β) = 0.1; ``ld_alpha`` (α ∈ [0, 1], the weight of the tokens beyond the shorter
    response's length) = 0.5. The paper tunes α per base model; 0.5 is a middle value, not a paper
    default (TRL has none either). α = 1 is DPO; α = 0 drops the excess tokens."""

    beta: float = 0.1
    ld_alpha: float = 0.5

    def __post_init__(self):
        check_beta(self.beta)
        if not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha must be in [0, 1] (1 = DPO, 0 = drop the excess tokens), got {self.ld_alpha}")


def desensitised_logps(batch: PairBatch, model: str, ld_alpha: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO's ``(log π̂(y_w), log π̂(y_l))`` ``[B]`` of ``model``: per pair, the first ``n = min(|y_w|,
    |y_l|)`` response tokens of each side count fully and the rest with weight ``ld_alpha``."""
    chosen_mask, rejected_mask = batch.mask("chosen").bool(), batch.mask("rejected").bool()
    shared = torch.minimum(chosen_mask.sum(-1), rejected_mask.sum(-1)).unsqueeze(-1)
    out = []
    for side, mask in (("chosen", chosen_mask), ("rejected", rejected_mask)):
        tokens = upcast(batch.token_logps(model, side))
        position = mask.long().cumsum(-1)  # 1-based index among the response tokens
        weight = torch.where(position <= shared, 1.0, ld_alpha).to(tokens.dtype)
        # Select rather than multiply so a -inf at a padding position cannot become NaN.
        out.append(torch.where(mask, tokens * weight, torch.zeros_like(tokens)).sum(-1))
    return out[0], out[1]


@register_loss("ld_dpo")
class LDDPOLoss(Loss):
    """LD-DPO: DPO on length-desensitised log-probs.

    With ``n = min(|y_w|, |y_l|)`` and ``p_t`` the per-token log-probs of a response,
    ``log π̂(y) = Σ_{t ≤ n} p_t + α Σ_{t > n} p_t`` for the policy and the reference alike, and
    ``L = −log σ(β [(log π̂_θ(y_w) − log π̂_ref(y_w)) − (log π̂_θ(y_l) − log π̂_ref(y_l))])``.
    The excess of the longer response, where its summed log-ratio picks up length, counts with weight α.
    Rewards ``β`` times the desensitised log-ratios (as TRL's); ``win_prob`` = σ(r_w − r_l).
    Hyperparameters: ``beta`` = 0.1, ``ld_alpha`` = 0.5. Paper: Liu et al., 2024, arXiv:2409.06411.
    TRL: ``ld_alpha`` with ``loss_type="sigmoid"``.
    """

    Config = LDDPOConfig
    requires = frozenset({Need.TOKEN_LOGPS})
    paper = "Liu et al., Length Desensitization in Direct Preference Optimization, 2024"
    arxiv = "2409.06411"
    implementation_notes = "TRL's ld_alpha with the sigmoid loss: shared-length prefix in full, the excess weighted by α, policy and reference alike."

    def forward(self, batch: PairBatch) -> LossOutput:
        cfg = self.config
        policy_chosen, policy_rejected = desensitised_logps(batch, "policy", cfg.ld_alpha)
        reference_chosen, reference_rejected = desensitised_logps(batch, "reference", cfg.ld_alpha)
        chosen_ratio, rejected_ratio = policy_chosen - reference_chosen, policy_rejected - reference_rejected
        losses = -F.logsigmoid(cfg.beta * (chosen_ratio - rejected_ratio))
        return margin_output(losses, cfg.beta * chosen_ratio, cfg.beta * rejected_ratio)
