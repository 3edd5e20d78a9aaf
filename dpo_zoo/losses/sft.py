"""SFT-anchored objectives: the chosen responses' negative log-likelihood on its own (``sft``) and
added to DPO (RPO).

The maths, sources and defaults are in ``docs/loss_maths.md``.

* ``sft``: supervised fine-tuning on the chosen responses, TRL's ``loss_type="sft"`` (a part of MPO,
  Wang et al., *Enhancing the Reasoning Ability of Multimodal Large Language Models via Mixed
  Preference Optimization*, 2024, arXiv:2411.10442).
* RPO: Pang, Yuan, Cho, He, Sukhbaatar, Weston, *Iterative Reasoning Preference Optimization*,
  NeurIPS 2024, arXiv:2404.19733 (Eq. 1: DPO + α · length-normalised NLL of the chosen response).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Loss, LossOutput, Need, PairBatch, upcast
from .registry import register_loss
from .dpo import check_beta, margin_output

NLL_REDUCTIONS = ("batch_tokens", "sequence")


def check_reduction(reduction: str) -> None:
    if reduction not in NLL_REDUCTIONS:
        raise ValueError(f"nll_reduction must be one of {', '.join(NLL_REDUCTIONS)}, got {reduction!r}")


def chosen_nll(batch: PairBatch, reduction: str) -> torch.Tensor:
    """Per-pair NLL of the chosen response ``[B]`` (policy log-probs, response tokens only).

    * ``sequence``: ``−log π_θ(y_w|x) / |y_w|``, each response's mean token NLL;
    * ``batch_tokens``: each pair's share ``−B · log π_θ(y_w|x) / N`` of the batch's token mean
      (``N`` = chosen response tokens in the batch), so that the mean over pairs is exactly the
      cross-entropy over all the batch's chosen tokens, which is what TRL's ``sft`` loss, CPO and ORPO
      compute. Longer responses weigh more, and the value of a pair depends on its batch.
    """
    mask = batch.mask("chosen").bool()
    tokens = upcast(batch.token_logps("policy", "chosen"))
    summed = torch.where(mask, tokens, torch.zeros_like(tokens)).sum(-1)
    if reduction == "sequence":
        return -summed / mask.sum(-1).clamp(min=1).to(summed.dtype)
    return -summed * (mask.shape[0] / mask.sum().clamp(min=1).to(summed.dtype))


def mean_token_logps(batch: PairBatch, side: str) -> torch.Tensor:
    """The policy's average per-token log-prob of the ``side`` response ``[B]``."""
    mask = batch.mask(side).bool()
    tokens = upcast(batch.token_logps("policy", side))
    summed = torch.where(mask, tokens, torch.zeros_like(tokens)).sum(-1)
    return summed / mask.sum(-1).clamp(min=1).to(summed.dtype)


@dataclass
class SFTConfig:
    """``nll_reduction`` ∈ {batch_tokens, sequence} = batch_tokens (TRL's token mean over the batch;
    ``sequence`` averages each response's own token mean)."""

    nll_reduction: str = "batch_tokens"

    def __post_init__(self):
        check_reduction(self.nll_reduction)


@register_loss("sft")
class SFTLoss(Loss):
    """SFT on the chosen responses: ``L = −(1/N) Σ_pairs Σ_{t ∈ y_w} log π_θ(y_w,t | x, y_w,<t)`` (mean
    over the batch's chosen tokens; per-pair shares as :func:`chosen_nll` describes).

    Needs no reference: the trainer loads none and reads none from a prepared set. Alone it is plain
    supervised fine-tuning; mixed with a preference loss it anchors the chosen likelihood (MPO is
    ``sigmoid + bco_pair + sft``). Rewards: each response's mean token log-prob under the policy (there
    is no reference to form a log-ratio); ``win_prob`` = σ(r_w − r_l).
    TRL: ``loss_type="sft"``; MPO: Wang et al., 2024, arXiv:2411.10442.
    """

    Config = SFTConfig
    requires = frozenset({Need.TOKEN_LOGPS})
    paper = "Wang et al., Enhancing the Reasoning Ability of Multimodal LLMs via Mixed Preference Optimization, 2024"
    arxiv = "2411.10442"
    implementation_notes = "Chosen-response token mean over the batch, as TRL's sft loss; no reference."

    reference_free = True

    def forward(self, batch: PairBatch) -> LossOutput:
        losses = chosen_nll(batch, self.config.nll_reduction)
        return margin_output(losses, mean_token_logps(batch, "chosen"), mean_token_logps(batch, "rejected"))


@dataclass
class RPOConfig:
    """``beta`` (β) = 0.1; ``alpha`` (α, the NLL weight) = 1.0, the paper's; ``nll_reduction`` =
    ``sequence`` (the paper's length-normalised NLL; ``batch_tokens`` is TRL's token mean, as TRL's
    former ``rpo_alpha`` computed it)."""

    beta: float = 0.1
    alpha: float = 1.0
    nll_reduction: str = "sequence"

    def __post_init__(self):
        check_beta(self.beta)
        if not self.alpha >= 0:
            raise ValueError(f"alpha (the NLL weight) must be >= 0, got {self.alpha}")
        check_reduction(self.nll_reduction)


@register_loss("rpo")
class RPOLoss(Loss):
    """RPO: ``L = −log σ(β h) + α · (−log π_θ(y_w|x) / |y_w|)``.

    DPO plus the chosen response's length-normalised NLL, which stops DPO from lowering the chosen
    likelihood along with the rejected one (the paper's motivation, on reasoning chains). α = 0 is DPO.
    Rewards ``β ℓ_θ(y)``; ``win_prob`` = σ(βh); ``rpo/nll`` logs the NLL term.
    Paper: Pang et al., NeurIPS 2024, arXiv:2404.19733, Eq. 1.
    """

    Config = RPOConfig
    requires = frozenset({Need.TOKEN_LOGPS})
    paper = "Pang et al., Iterative Reasoning Preference Optimization, NeurIPS 2024"
    arxiv = "2404.19733"
    implementation_notes = "Paper's length-normalised NLL per response by default; TRL's batch token mean via nll_reduction=batch_tokens."

    def forward(self, batch: PairBatch) -> LossOutput:
        cfg = self.config
        chosen_ratio, rejected_ratio = batch.log_ratios()
        nll = chosen_nll(batch, cfg.nll_reduction)
        losses = -F.logsigmoid(cfg.beta * (chosen_ratio - rejected_ratio)) + cfg.alpha * nll
        out = margin_output(losses, cfg.beta * chosen_ratio, cfg.beta * rejected_ratio)
        out.metrics["rpo/nll"] = nll.detach()
        return out
