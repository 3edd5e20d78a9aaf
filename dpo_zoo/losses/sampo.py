"""SamPO: DPO with a down-sampled KL term, removing DPO's bias towards longer responses.

Lu, Li, An, Zhao, He, Yin, Sun, *Eliminating Biased Length Reliance of Direct Preference Optimization
via Down-Sampled KL Divergence*, EMNLP 2024, arXiv:2406.10957: the sampled loss is Eq. 10, the
deterministic averaging alternative ("DPO-SANorm") is Eq. 9. Official code: LuJunru/SamPO@25e9631,
``dpo_trainer.py::DPOTrainer.get_batch_logps`` (the ``len_norm`` branch).

Two classes rather than one with a ``variant`` switch: the sampled loss needs a random generator and
the averaging one does not, and a loss declares its needs per class (``requires``), which the trainer,
the cache and ``dpo-zoo losses`` read. With one class, ``dpo_sanorm`` would have to claim a generator
it never uses, or ``sampo`` would have to leave it optional and fail only inside ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from .base import Loss, LossInputError, LossOutput, Need, PairBatch, upcast
from .registry import register_loss
from .dpo import check_beta

SIDES = ("chosen", "rejected")


def sample_positions(mask: torch.Tensor, counts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A ``[B,T]`` bool mask keeping ``counts[b]`` positions of row ``b``, drawn uniformly without
    replacement from the positions where ``mask[b]`` is true (``counts[b] ≤ mask[b].sum()``).

    Vectorised over the batch: every position gets an i.i.d. uniform key, positions outside the mask get
    +inf, and the ``counts[b]`` smallest keys of each row are kept. The ranks of i.i.d. keys form a
    uniformly random permutation of the valid positions, so its first ``counts[b]`` entries are a uniform
    subset of that size. Keys are float64 so that ties (which would favour lower indices) have
    probability ≈ T²·2⁻⁵⁴, not the ≈ T²·2⁻²⁵ of float32.
    """
    # Draw on the generator's own device (a CPU generator may serve CUDA tensors), then move.
    keys = torch.rand(mask.shape, generator=generator, device=generator.device, dtype=torch.float64)
    keys = keys.to(mask.device).masked_fill(~mask, float("inf"))
    order = keys.argsort(dim=-1)
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(-1, order, positions)
    return ranks < counts.unsqueeze(-1)


def token_inputs(batch: PairBatch, needed_by: str) -> Tuple[Dict[str, torch.Tensor], Dict[Tuple[str, str], torch.Tensor]]:
    """Response masks (bool) per side and per-token log-probs (≥ fp32) per (model, side), shape-checked."""
    masks: Dict[str, torch.Tensor] = {}
    logps: Dict[Tuple[str, str], torch.Tensor] = {}
    for side in SIDES:
        masks[side] = batch.mask(side).bool()
        for model in ("policy", "reference"):
            values = upcast(batch.token_logps(model, side))
            if values.shape != masks[side].shape:
                raise LossInputError(
                    f"{needed_by}: `{model}_{side}_token_logps` has shape {tuple(values.shape)} but "
                    f"`{side}_mask` has shape {tuple(masks[side].shape)}"
                )
            logps[model, side] = values
    return masks, logps


def selected_sum(values: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
    # `where`, not a product with the mask: padding may hold -inf/NaN, and 0·(-inf) would leak NaN.
    return torch.where(selection, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(-1)


def pair_output(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, metrics: Dict) -> LossOutput:
    """``L = −log σ(r_w − r_l)``; the rewards already carry β and the length correction."""
    margin = chosen_rewards - rejected_rewards
    metrics["win_prob"] = torch.sigmoid(margin).detach()
    return LossOutput(
        losses=-F.logsigmoid(margin),
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
        metrics=metrics,
    )


@dataclass
class SamPOConfig:
    """``beta`` (β, default 0.1, paper App. C); ``share_indices`` (default True: the reference is summed
    over the same sampled tokens as the policy, as in Eq. 10; False: the reference draws its own subset,
    as the official code's separate forward passes do)."""

    beta: float = 0.1
    share_indices: bool = True

    def __post_init__(self):
        check_beta(self.beta)
        if not isinstance(self.share_indices, bool):
            raise ValueError(f"share_indices must be a bool, got {self.share_indices!r}")


@register_loss("sampo_official", share_indices=False)
@register_loss("sampo")
class SamPOLoss(Loss):
    """SamPO (Eq. 10): DPO on token log-ratios summed over an equal number of sampled tokens per side.

    With ``T_w, T_l`` the response lengths and ``T_m = min(T_w, T_l)``, draw ``S(y)``: ``T_m`` positions
    of ``y`` uniformly without replacement (all of them for the shorter response). Then::

        r(y)    = β Σ_{t∈S(y)} [log π_θ(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)]
        L_SamPO = −log σ(r(y_w) − r(y_l))

    Both rewards sum the same number of tokens, so a longer response no longer gets a larger implicit
    reward, or a larger KL term, merely by being longer. Equal lengths give DPO exactly; ``T_m = 0``
    gives ``log 2``. Each token of the longer response is kept with probability ``T_m / T_long``, so
    ``E[r(y)] = β (T_m/T_y) ℓ_θ(y)``: in expectation SamPO rescales each sequence log-ratio to the
    shorter length, and the draws add noise around that. Gradients reach only the sampled tokens.

    ``share_indices=False`` (registered as ``sampo_official``): the reference sum uses an independent
    draw, ``r(y) = β (Σ_{S(y)} log π_θ − Σ_{S'(y)} log π_ref)``, as the official code does by calling
    its sampler separately in the policy and the reference passes. Distributions of the draws match
    the paper's either way; the exact official indices came from the global CUDA RNG and are not a
    reproducible target.

    Hyperparameters: ``beta`` = 0.1 (the paper uses 0.5 for Pythia-2.8B on TL;DR and 0.05 on HH), and
    ``share_indices`` = True. Needs per-token log-probs with response masks, and a ``generator`` or a
    ``seed`` (the paper trains with seed 42). Rewards are the sampled ``r(y)`` (detached). Metrics:
    ``sampo/chosen_selection``, ``sampo/rejected_selection`` (``[B,T]`` bool, the policy's subsets, for
    the caller), ``sampo/reference_chosen_selection``, ``sampo/reference_rejected_selection`` when not
    shared, ``sampo/num_sampled`` (``T_m``), ``win_prob`` = ``σ(r_w − r_l)``.

    Paper: Lu et al., EMNLP 2024, arXiv:2406.10957, Eq. 10.
    """

    Config = SamPOConfig
    requires = frozenset({Need.TOKEN_LOGPS, Need.GENERATOR})
    paper = "Lu et al., Eliminating Biased Length Reliance of Direct Preference Optimization via Down-Sampled KL Divergence, EMNLP 2024"
    arxiv = "2406.10957"
    implementation_notes = (
        'One token subset shared by policy and reference (Eq. 10); the official code draws them'
        ' independently (sampo_official). Draws are seeded, also at evaluation.'
    )

    def forward(self, batch: PairBatch) -> LossOutput:
        beta = self.config.beta
        masks, logps = token_inputs(batch, f"loss '{self.name or 'sampo'}'")
        num_sampled = torch.minimum(masks["chosen"].sum(-1), masks["rejected"].sum(-1))
        generator = batch.make_generator(masks["chosen"].device)

        policy_selection = {side: sample_positions(masks[side], num_sampled, generator) for side in SIDES}
        if self.config.share_indices:
            reference_selection = policy_selection
        else:
            reference_selection = {side: sample_positions(masks[side], num_sampled, generator) for side in SIDES}

        rewards = {
            side: beta
            * (
                selected_sum(logps["policy", side], policy_selection[side])
                - selected_sum(logps["reference", side], reference_selection[side])
            )
            for side in SIDES
        }
        metrics: Dict[str, torch.Tensor] = {
            "sampo/chosen_selection": policy_selection["chosen"],
            "sampo/rejected_selection": policy_selection["rejected"],
            "sampo/num_sampled": num_sampled.to(rewards["chosen"].dtype),
        }
        if not self.config.share_indices:
            metrics["sampo/reference_chosen_selection"] = reference_selection["chosen"]
            metrics["sampo/reference_rejected_selection"] = reference_selection["rejected"]
        return pair_output(rewards["chosen"], rewards["rejected"], metrics)


@dataclass
class SANormConfig:
    """``beta`` (β, default 0.1, as SamPO)."""

    beta: float = 0.1

    def __post_init__(self):
        check_beta(self.beta)


@register_loss("dpo_sanorm")
class DPOSANormLoss(Loss):
    """DPO-SANorm (SamPO paper Eq. 9): each sequence log-ratio rescaled to the pair's mean length.

    Deterministic alternative to SamPO's sampling. With ``ℓ_t`` the token log-ratios
    ``log π_θ(y_t | ·) − log π_ref(y_t | ·)`` and ``T_w, T_l`` the response lengths::

        r(y)  = β · ((T_w + T_l) / 2) · (1/T_y) Σ_{t∈y} ℓ_t
        L     = −log σ(r(y_w) − r(y_l))

    i.e. the per-token mean log-ratio times the pair's mean length, so both sides are measured on the
    same length. Equal lengths give DPO exactly. An empty response has ``r = 0`` (an empty sum; the
    formula's ``0/0`` is taken as 0), so two empty responses give ``log 2``.

    The paper reports it as an ablation, below SamPO; the official repo keeps it only as commented-out
    code in ``get_batch_logps``, which applies the same factor to the policy and the reference sums.
    Hyperparameter: ``beta`` = 0.1. Needs per-token log-probs with response masks; no randomness.
    Rewards ``r(y)`` (detached); metric ``win_prob`` = ``σ(r_w − r_l)``.

    Paper: Lu et al., EMNLP 2024, arXiv:2406.10957, Eq. 9 (§3.3).
    """

    Config = SANormConfig
    requires = frozenset({Need.TOKEN_LOGPS})
    paper = SamPOLoss.paper
    arxiv = "2406.10957"
    implementation_notes = (
        'Eq. 9 averaging variant; survives only as commented-out code in the official repo.'
    )

    def forward(self, batch: PairBatch) -> LossOutput:
        beta = self.config.beta
        masks, logps = token_inputs(batch, f"loss '{self.name or 'dpo_sanorm'}'")
        lengths = {side: masks[side].sum(-1) for side in SIDES}
        rewards = {}
        for side in SIDES:
            ratio = selected_sum(logps["policy", side], masks[side]) - selected_sum(
                logps["reference", side], masks[side]
            )
            # In the log-probs' precision: integer lengths divided in torch's default float32 would cost
            # float64 inputs ~1e-8 relative on every reward.
            mean_length = (lengths["chosen"] + lengths["rejected"]).to(ratio.dtype) / 2.0
            scale = mean_length / lengths[side].clamp(min=1).to(ratio.dtype)
            rewards[side] = beta * torch.where(lengths[side] > 0, scale * ratio, torch.zeros_like(ratio))
        return pair_output(rewards["chosen"], rewards["rejected"], {})
