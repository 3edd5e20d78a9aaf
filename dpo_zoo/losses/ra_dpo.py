"""Ra-DPO (risk-aware DPO under nested risk measures) and TDPO (token-level DPO).

Zhang, Li, Qi, Song, Yang, Wang, Wei, *Risk-aware Direct Preference Optimization under Nested Risk
Measure*, NeurIPS 2025, arXiv:2505.20359 (Eqs. 14–21, Algorithm 1). Official code:
zlj123-max/Ra-DPO@d6a10e3, ``Ra-DPO/train/trainers.py::Ra_DPOTrainer``. TDPO: Zeng, Liu, Ma, Yang,
Zhang, Wang, *Token-level Direct Preference Optimization*, ICML 2024, arXiv:2404.11999; official code
Vance0124/Token-level-Direct-Preference-Optimization, ``trainers.py::tdpo_loss``.

Both need, at every response position of both responses, the policy's log-probs over the whole
vocabulary ``[B,T,V]``, and the reference's, either whole or as the cache's top-k. Those tensors are
large (8 × 256 × 49,152 fp32 is 400 MB each), so the per-position terms are computed over chunks of
``chunk_size`` response positions by :class:`_PositionTerms`, whose memory beyond its inputs is the
gradient of the policy log-probs (which backpropagation needs anyway) plus one chunk's work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .base import Loss, LossInputError, LossOutput, Need, PairBatch, upcast
from .registry import register_loss
from .dpo import check_beta

RISKS = ("cvar", "cvar_official", "erm", "kl")
SIDES = ("chosen", "rejected")


# ====================================================================== risk measures of one position
#
# Each function takes the reference's and the policy's log-masses ``ref, pol`` ``[c, A]`` over the A
# atoms of a position's next-token distribution (the vocabulary, or the coarsened top-k + rest) and
# returns ``Φ`` ``[c]`` of ``Z = log π_ref(z) − log π_θ(z)`` with ``z ∼ π_ref``. They run on chunks of
# ``c × V`` entries, so reference-only quantities are built in place and without autograd: every
# ``c × V`` temporary counts towards the loss's peak memory.


def _mass_weighted_sum(weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``Σ weight · value`` with ``0 · (±inf or NaN) := 0``: a token the reference gives no mass (its
    log-prob is -inf, or underflowed) carries no weight whatever the policy says about it. ``weight``
    must not need a gradient (it never does: it is reference mass)."""
    # In place on the product is safe for autograd: the product's backward needs only ``weight``.
    return (weight * value).masked_fill_(weight <= 0, 0.0).sum(-1)


def kl_divergence(ref: torch.Tensor, pol: torch.Tensor) -> torch.Tensor:
    """``Σ π_ref (log π_ref − log π_θ)`` = KL(π_ref ‖ π_θ) (TDPO's per-position term)."""
    return _mass_weighted_sum(ref.exp(), ref - pol)


def cvar_lower(ref: torch.Tensor, pol: torch.Tensor, mu: float) -> torch.Tensor:
    """Paper Eq. 21: ``(1/μ) ∫_0^μ F_Z^{-1}(ξ) dξ``, the mean of the lower μ-mass of Z under π_ref.

    Atoms are sorted by Z ascending; atom i takes ``min(p_i, max(0, μ − P_{i−1}))`` of its mass
    (``P_{i−1}`` the mass before it), which splits the boundary atom. Equal values of Z may come in
    any order: they take the same total mass either way. The taken masses depend on the policy only
    through the order, so the gradient is ``−take_i/μ`` per atom.
    """
    z_sorted, order = (ref - pol).sort(dim=-1)
    with torch.no_grad():
        mass = ref.exp().gather(-1, order)
        take = mass.cumsum(-1).sub_(mass).neg_().add_(mu).clamp_(min=0)  # max(0, μ − P_{i−1})
        take = torch.minimum(take, mass, out=take)
        del mass, order
    return _mass_weighted_sum(take, z_sorted) / mu


def linear_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(x, q, dim=-1)`` (linear interpolation between order statistics) via a sort, so
    it has no input-size limit (``torch.quantile`` refuses more than 2^24 elements)."""
    n = x.shape[-1]
    ordered = x.sort(dim=-1).values
    rank = q * (n - 1)
    below = int(rank // 1)
    above = min(below + 1, n - 1)
    return torch.lerp(ordered[..., below], ordered[..., above], rank - below)


def cvar_official(ref: torch.Tensor, pol: torch.Tensor, mu: float, split_vocab: bool) -> torch.Tensor:
    """The released code's ``calculate_cvar``: ``Σ_z π_ref(z) D(z) 1[D(z) > q]``, ``D = log π_ref − log π_θ``,
    ``q`` the unweighted (1−μ)-quantile of D over vocabulary *entries*, per vocabulary half
    ``[:V//2]``, ``[V//2:]`` when ``split_vocab``. Upper tail, no 1/μ (see the class docstring)."""
    d = ref - pol
    vocab = d.shape[-1]
    bounds = [(0, vocab // 2), (vocab // 2, vocab)] if split_vocab and vocab >= 2 else [(0, vocab)]
    with torch.no_grad():  # the indicator has no gradient
        above = torch.cat(
            [d[..., lo:hi] > linear_quantile(d[..., lo:hi], 1.0 - mu).unsqueeze(-1) for lo, hi in bounds], dim=-1
        )
        weight = ref.exp().masked_fill_(~above, 0.0)
    return _mass_weighted_sum(weight, d)


def entropic_risk(ref: torch.Tensor, pol: torch.Tensor, mu: float) -> torch.Tensor:
    """``Φ^μ(Z) = −(1/μ) log E_{π_ref}[e^{−μZ}] = −(1/μ) logsumexp((1−μ) log π_ref + μ log π_θ)``.

    The authors' entropic risk measure ``ρ_ERM(G; μ) = (1/μ) log E[e^{−μG}]`` read with the sign that
    makes it a lower-tail weighting of Z (like the paper's CVaR): it tends to the KL as μ → 0 and is
    ≤ KL for every μ > 0. It equals the Rényi divergence ``D_{1−μ}(π_ref ‖ π_θ)`` for μ < 1 and is ≤ 0
    for μ ≥ 1 (μ = 1 gives ``−log Σ_{π_ref>0} π_θ``, 0 when the supports agree). Worked example:
    π_ref = (.7, .2, .1), π_θ = (.5, .45, .05), μ = 5 gives Φ = −0.491 while the KL is 0.143.
    """
    # Tokens without reference mass drop out (−inf), whatever the policy says about them; in log space
    # the (1−μ) log π_ref factor is finite wherever π_ref > 0, so no power of a probability is formed.
    exponent = ((1.0 - mu) * ref + mu * pol).masked_fill_(ref == float("-inf"), float("-inf"))
    return -exponent.logsumexp(-1) / mu


# ====================================================================== chunked per-position terms


class _Spec(NamedTuple):
    risk: str
    mu: float
    split_vocab: bool
    chunk_size: int
    dtype: torch.dtype  # compute dtype (≥ fp32)


def _chunk_terms(
    pol: torch.Tensor,
    labels: torch.Tensor,
    ref_full: Optional[torch.Tensor],
    ref_topk: Optional[torch.Tensor],
    topk_ids: Optional[torch.Tensor],
    ref_rest: Optional[torch.Tensor],
    spec: _Spec,
    with_kl: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """For ``c`` positions (rows): the policy's label log-prob, the risk Φ and the KL (None when not
    ``with_kl``), each ``[c]``."""
    label_logps = pol.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if ref_full is not None:
        ref, atoms = ref_full, pol
    else:
        policy_topk = pol.gather(-1, topk_ids)
        if topk_ids.shape[-1] == pol.shape[-1]:  # K = V: nothing is left over, no rest atom
            ref, atoms = ref_topk, policy_topk
        else:
            if ref_rest is None:
                # log(1 − Σ_topk p_ref); rounding can push Σ past 1, which means no rest mass.
                ref_rest = torch.log((-torch.expm1(ref_topk.logsumexp(-1))).clamp(min=0))
            # Exact policy mass of the non-top-k tokens: mask the top-k out, then logsumexp.
            policy_rest = pol.scatter(-1, topk_ids, float("-inf")).logsumexp(-1)
            ref = torch.cat([ref_topk, ref_rest.unsqueeze(-1)], dim=-1)
            atoms = torch.cat([policy_topk, policy_rest.unsqueeze(-1)], dim=-1)
    kl = kl_divergence(ref, atoms) if with_kl or spec.risk == "kl" else None
    if spec.risk == "kl":
        risk = kl
    elif spec.risk == "cvar":
        risk = cvar_lower(ref, atoms, spec.mu)
    elif spec.risk == "cvar_official":
        risk = cvar_official(ref, atoms, spec.mu, spec.split_vocab)
    else:
        risk = entropic_risk(ref, atoms, spec.mu)
    return label_logps, risk, kl


def _rows(tensor: Optional[torch.Tensor], b: torch.Tensor, t: torch.Tensor, dtype=None) -> Optional[torch.Tensor]:
    if tensor is None:
        return None
    rows = tensor[b, t]
    return rows if dtype is None else rows.to(dtype)


class _PositionTerms(torch.autograd.Function):
    """``policy [B,T,V] → (label log-prob, Φ, KL)`` at the response positions ``(rows_b, rows_t)``, each
    ``[M]``, computed ``chunk_size`` positions at a time.

    Why a custom function and not ``torch.utils.checkpoint`` around slices: autograd's backward of a
    slice or a gather of a ``[B,T,V]`` tensor allocates a zero-filled ``[B,T,V]`` gradient per chunk
    and accumulates them, so the zero-filling grows with (number of chunks) × B·T·V and the peak
    holds extra full-size buffers (measured on 1024 positions × 32,768 fp32, 128 MB, CVaR, 32-position
    chunks: 298 MB beyond the input with checkpointing, 165 MB here, of which 128 MB is the
    gradient itself). Here the backward writes each chunk's gradient into one preallocated ``[B,T,V]``
    tensor, recomputing that chunk (as checkpointing would) instead of keeping its intermediates. Rows are gathered by advanced indexing, a chunk-sized copy, so prompt and
    padding positions are never touched and the inputs need not be contiguous. The reference is
    frozen: it gets no gradient.
    """

    @staticmethod
    def forward(ctx, policy, rows_b, rows_t, labels, ref_full, ref_topk, topk_ids, ref_rest, spec: _Spec):
        ctx.spec = spec
        ctx.save_for_backward(policy, rows_b, rows_t, labels, ref_full, ref_topk, topk_ids, ref_rest)
        pieces = []
        for start in range(0, rows_b.shape[0], spec.chunk_size):
            b = rows_b[start : start + spec.chunk_size]
            t = rows_t[start : start + spec.chunk_size]
            pieces.append(_chunk_terms(*_chunk_inputs(policy, labels, ref_full, ref_topk, topk_ids, ref_rest, b, t, spec), spec))
        if not pieces:
            empty = policy.new_zeros(0, dtype=spec.dtype)
            return empty, empty.clone(), empty.clone()
        label_logps, risk, kl = (torch.cat(parts) for parts in zip(*pieces))
        if spec.risk != "kl":
            ctx.mark_non_differentiable(kl)  # KL is then only a metric
        return label_logps, risk, kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_label, grad_risk, grad_kl):
        policy, rows_b, rows_t, labels, ref_full, ref_topk, topk_ids, ref_rest = ctx.saved_tensors
        spec = ctx.spec
        grad_policy = torch.zeros_like(policy)
        for start in range(0, rows_b.shape[0], spec.chunk_size):
            stop = start + spec.chunk_size
            b, t = rows_b[start:stop], rows_t[start:stop]
            pol, *rest = _chunk_inputs(policy, labels, ref_full, ref_topk, topk_ids, ref_rest, b, t, spec)
            with torch.enable_grad():
                pol = pol.detach().requires_grad_(True)
                # The KL is only a metric unless it is the risk: not recomputed, its graph not kept.
                label_logps, risk, _ = _chunk_terms(pol, *rest, spec, with_kl=False)
                outputs, grads = [label_logps, risk], [grad_label[start:stop], grad_risk[start:stop]]
                if spec.risk == "kl":  # risk is kl: one term, both gradients
                    grads[1] = grads[1] + grad_kl[start:stop]
                (grad_rows,) = torch.autograd.grad(outputs, [pol], grads)
            grad_policy[b, t] = grad_rows.to(policy.dtype)
        return grad_policy, None, None, None, None, None, None, None, None


def _chunk_inputs(policy, labels, ref_full, ref_topk, topk_ids, ref_rest, b, t, spec: _Spec):
    """The chunk's rows, upcast here (per chunk) so a bf16 input is never copied whole to fp32."""
    return (
        _rows(policy, b, t, spec.dtype),
        _rows(labels, b, t, torch.long),
        _rows(ref_full, b, t, spec.dtype),
        _rows(ref_topk, b, t, spec.dtype),
        _rows(topk_ids, b, t, torch.long),
        _rows(ref_rest, b, t, spec.dtype),
    )


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# ====================================================================== the loss


@dataclass
class RaDPOConfig:
    """Hyperparameters (official defaults from ``ra-dpo.yaml``): ``beta`` = 0.1; ``alpha`` = 0.5 (weight
    of δ₂, variant 2 only); ``variant`` ∈ {1, 2} = 1; ``risk`` ∈ {cvar, cvar_official, erm, kl} = cvar;
    ``mu`` = 0.95 (cvar/cvar_official: confidence level in (0, 1]; erm: risk aversion > 0; unused by kl);
    ``split_vocab`` = True (cvar_official only); ``chunk_size`` = 64 response positions per chunk."""

    beta: float = 0.1
    alpha: float = 0.5
    variant: int = 1
    risk: str = "cvar"
    mu: float = 0.95
    split_vocab: bool = True
    chunk_size: int = 64

    def __post_init__(self):
        check_beta(self.beta)
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.variant not in (1, 2) or isinstance(self.variant, bool):
            raise ValueError(f"variant must be 1 or 2, got {self.variant!r}")
        if self.risk not in RISKS:
            raise ValueError(f"risk must be one of {', '.join(RISKS)}, got {self.risk!r}")
        if self.risk in ("cvar", "cvar_official") and not 0.0 < self.mu <= 1.0:
            raise ValueError(f"mu (the CVaR confidence level) must be in (0, 1] for risk '{self.risk}', got {self.mu}")
        if self.risk == "erm" and not self.mu > 0.0:
            raise ValueError(f"mu (the entropic risk aversion) must be > 0 for risk 'erm', got {self.mu}")
        if not isinstance(self.split_vocab, bool):
            raise ValueError(f"split_vocab must be a bool, got {self.split_vocab!r}")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {self.chunk_size!r}")


@register_loss("ra_dpo_erm", risk="erm", mu=5.0, variant=2, alpha=0.5)
@register_loss("ra_dpo_official", risk="cvar_official", split_vocab=True)
@register_loss("ra_dpo2", variant=2)
@register_loss("ra_dpo")
class RaDPOLoss(Loss):
    """Ra-DPO: DPO with a token-level, risk-measured sequential divergence; TDPO when the risk is the mean.

    With ``s_t = [x, y_<t]`` and ``Z_t = log π_ref(z|s_t) − log π_θ(z|s_t)``, ``z ∼ π_ref(·|s_t)``::

        ℓ(y)  = Σ_t log π_θ(y_t|s_t) − log π_ref(y_t|s_t)
        D(y)  = Σ_t Φ^μ(Z_t)                                   (D_SeqRR; the KL for Φ = E: D_SeqKL)
        Ra-DPO1 (Eq. 17):  L = −log σ(β[(ℓ_w − ℓ_l) − (D_l − D_w)])
        Ra-DPO2 (Eq. 19):  L = −log σ(β[(ℓ_w − ℓ_l) − α (D_l − sg(D_w))])
        rewards r(y) = β (ℓ(y) + D(y))  (detached, as the official code logs them)

    Risk measures Φ^μ (``risk``), and what ``mu`` means for each:

    * ``cvar`` (paper Eq. 20–21, default): ``(1/μ) ∫_0^μ F_Z^{-1}``, the π_ref-weighted mean of the
      lower μ-mass of Z. μ ∈ (0, 1] is the confidence level: μ = 1 is the KL (TDPO), smaller μ averages
      a smaller lower tail, so Φ ≤ KL.
    * ``cvar_official`` (the released ``calculate_cvar``, registered as ``ra_dpo_official``):
      ``Σ_z π_ref(z) D(z) 1[D(z) > q]`` with ``q`` the unweighted linear-interpolation (1−μ)-quantile of
      D over vocabulary entries, taken per vocabulary half when ``split_vocab`` (the default, official
      ``is_split_risk_ratio``; the halves are vocabulary ids, not chosen/rejected as the code comment
      says). It keeps the *upper* tail, counts entries rather than mass, has no 1/μ, so it is typically
      ≥ KL (it drops the entries where the policy most exceeds the reference, whose terms are
      negative); μ is the fraction of entries kept, and even μ = 1 drops each half's minimum. The
      paper's remark that the risk term comes out "slightly larger than the KL" matches this, not
      Eq. 21. It needs the reference over the whole vocabulary (no top-k).
    * ``erm`` (experimental: from the authors' rebuttal, not the NeurIPS body): the entropic risk
      measure. The authors define ``ρ_ERM(G; μ) = (1/μ) log E[e^{−μG}]`` (μ > 0; README of
      "The results of Ra_DPO_2(ERM)" in zlj123-max/ICML2025-Ra-DPO). Applied to Z it is used as
      ``Φ^μ(Z) = −(1/μ) log E_{π_ref}[e^{−μZ}] = −(1/μ) logsumexp((1−μ) log π_ref + μ log π_θ)``: the
      sign under which Φ → KL as μ → 0 and Φ ≤ KL for every μ (the README's literal sign gives −KL as
      μ → 0). It weighs the tokens where the policy puts *more* mass than the reference (Z < 0) most;
      μ is the risk aversion. Example: π_ref = (.7, .2, .1), π_θ = (.5, .45, .05), μ = 5 → Φ = −0.491,
      KL = 0.143. The authors ran it only as Ra-DPO2 with α = 0.5 and μ = 5, which the ``ra_dpo_erm``
      preset is (sweep values quoted: μ ∈ {9, 7, 5}).
    * ``kl``: ``KL(π_ref(·|s_t) ‖ π_θ(·|s_t))``: TDPO1/TDPO2 exactly, registered as ``tdpo`` (= TDPO1,
      the official config's default), ``tdpo1`` and ``tdpo2`` through :class:`TDPOLoss`.

    Hyperparameters: ``beta`` = 0.1, ``alpha`` = 0.5, ``variant`` = 1, ``risk`` = ``cvar``, ``mu`` = 0.95,
    ``split_vocab`` = True, ``chunk_size`` = 64 (response positions per chunk: beyond its inputs and the
    policy gradient, the loss holds one chunk's work, ≈ 35 bytes × ``chunk_size`` × V for the CVaRs
    (measured, fp32), whatever B·T is: ≈ 340 MB at V = 152k; lower it for very large vocabularies).

    Inputs: ``policy_<side>_vocab_logps`` ``[B,T,V]`` (log-probs; pass ``log_softmax`` output, never
    ``softmax().log()``), ``<side>_labels``, ``<side>_mask``; the reference as
    ``reference_<side>_vocab_logps`` ``[B,T,V]`` or its top-k (``reference_<side>_topk_logps``,
    ``reference_<side>_topk_ids`` ``[B,T,K]``, optionally ``reference_<side>_rest_logmass`` ``[B,T]``
    = log(1 − Σ_topk π_ref), derived when absent) plus the reference's label log-probs
    ``reference_<side>_token_logps`` (the label may be outside the top-k; with the full reference they
    are gathered from it). The policy's label log-probs are always gathered from its vocabulary
    log-probs, so that they and the risk terms come from the same tensor.

    **Top-k reference (an approximation).** Each position's distribution is coarsened to K+1 atoms: the
    K tokens, and one "rest" atom with the reference's rest mass and the policy's exact mass of the
    non-top-k tokens (logsumexp of its log-probs there). The KL can only go down under coarsening
    (data-processing inequality), and so can ERM for μ < 1 (a Rényi divergence); for μ > 1 ERM can only
    go up (``Σ π_ref^{1−μ} π_θ^μ`` is then jointly convex and 1-homogeneous, so merging atoms lowers it).
    CVaR of the coarsened Z also differs. With K = V it
    is exact.

    Metrics: ``ra/risk_chosen``, ``ra/risk_rejected`` (D per pair), ``ra/kl_chosen``, ``ra/kl_rejected``
    (the sequential KL, whatever the risk), ``win_prob`` = ``σ(m)`` = ``exp(−L)`` with ``m`` the loss's
    logit: the loss's own P(y_w ≻ y_l). For Ra-DPO1 ``m = r_w − r_l``; for Ra-DPO2 (α ≠ 1) the logged
    rewards, following the code, do not add up to ``m``.

    Not implemented: the official non-default ``is_cal_risk_distribution_logps`` path (undocumented in
    the paper, unused by its configs). Batch reduction: per-pair losses; the official code
    sums over the micro-batch.
    Paper: Zhang et al., NeurIPS 2025, arXiv:2505.20359, Eqs. 17, 19, 21; TDPO: Zeng et al., ICML 2024,
    arXiv:2404.11999.
    """

    Config = RaDPOConfig
    # TOKEN_LOGPS as well: with a top-k reference, the reference's log-prob of the label (which may be
    # outside the top-k) must come as a per-token value, so the cache has to store it.
    requires = frozenset({Need.VOCAB_LOGPS, Need.TOKEN_LOGPS})
    paper = "Zhang et al., Risk-aware Direct Preference Optimization under Nested Risk Measure, NeurIPS 2025"
    arxiv = "2505.20359"
    implementation_notes = (
        'Paper CVaR (Eq. 21: lower tail, probability-weighted, 1/μ) by default; the official '
        "code's upper-tail per-half quantile is ra_dpo_official. log_softmax, not "
        'softmax().log(). ERM (experimental) is the authors\' −(1/μ) log E[e^{−μZ}], ≤ KL; ra_dpo_erm is '
        'Ra-DPO2 with α = 0.5, μ = 5 as they ran it. A cached top-k reference is used as a '
        'K+1-atom coarsening.'
    )

    @property
    def accepts_topk_reference(self) -> bool:
        """``cvar_official`` ranks every vocabulary entry; the other risks work on the top-k + rest."""
        return self.config.risk != "cvar_official"

    def forward(self, batch: PairBatch) -> LossOutput:
        cfg = self.config
        who = f"loss '{self.name or 'ra_dpo'}'"
        ratio, risk, kl = {}, {}, {}
        for side in SIDES:
            ratio[side], risk[side], kl[side] = self._side_terms(batch, side, who)

        beta = cfg.beta
        if cfg.variant == 1:
            delta = risk["rejected"] - risk["chosen"]
        else:
            delta = cfg.alpha * (risk["rejected"] - risk["chosen"].detach())
        logits = beta * ((ratio["chosen"] - ratio["rejected"]) - delta)
        metrics = {
            "win_prob": torch.sigmoid(logits).detach(),
            "ra/risk_chosen": risk["chosen"].detach(),
            "ra/risk_rejected": risk["rejected"].detach(),
            "ra/kl_chosen": kl["chosen"].detach(),
            "ra/kl_rejected": kl["rejected"].detach(),
        }
        return LossOutput(
            losses=-F.logsigmoid(logits),
            chosen_rewards=(beta * (ratio["chosen"] + risk["chosen"])).detach(),
            rejected_rewards=(beta * (ratio["rejected"] + risk["rejected"])).detach(),
            metrics=metrics,
        )

    def _side_terms(self, batch: PairBatch, side: str, who: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``ℓ(y)``, ``D(y)`` and the sequential KL, each ``[B]``, for one side."""
        cfg = self.config
        policy = batch.get(f"policy_{side}_vocab_logps", who)
        labels = batch.get(f"{side}_labels", who)
        mask = batch.mask(side).bool()
        B, T, V = policy.shape
        self._check_shape(who, f"{side}_labels", labels, (B, T))
        self._check_shape(who, f"{side}_mask", mask, (B, T))

        ref_full = batch.reference_chosen_vocab_logps if side == "chosen" else batch.reference_rejected_vocab_logps
        ref_topk = topk_ids = ref_rest = None
        if ref_full is not None:
            self._check_shape(who, f"reference_{side}_vocab_logps", ref_full, (B, T, V))
            ref_dtype = ref_full.dtype
        else:
            if cfg.risk == "cvar_official":
                raise LossInputError(
                    f"{who}: risk 'cvar_official' ranks vocabulary entries, so it needs the whole reference "
                    f"distribution `reference_{side}_vocab_logps`, not its top-k; use risk 'cvar' with a top-k cache"
                )
            ref_topk = batch.get(f"reference_{side}_topk_logps", who)
            topk_ids = batch.get(f"reference_{side}_topk_ids", who)
            self._check_shape(who, f"reference_{side}_topk_logps", ref_topk, (B, T, ref_topk.shape[-1]))
            self._check_shape(who, f"reference_{side}_topk_ids", topk_ids, tuple(ref_topk.shape))
            if ref_topk.shape[-1] > V:
                raise LossInputError(f"{who}: top-k of size {ref_topk.shape[-1]} exceeds the vocabulary ({V})")
            ref_rest = getattr(batch, f"reference_{side}_rest_logmass")
            if ref_rest is not None:
                self._check_shape(who, f"reference_{side}_rest_logmass", ref_rest, (B, T))
            ref_dtype = ref_topk.dtype
        dtype = torch.promote_types(_at_least_fp32(policy.dtype), _at_least_fp32(ref_dtype))

        rows_b, rows_t = mask.nonzero(as_tuple=True)
        row_labels = labels[rows_b, rows_t]
        if row_labels.numel() and (row_labels.min() < 0 or row_labels.max() >= V):
            raise LossInputError(f"{who}: `{side}_labels` must be token ids in [0, {V}) on every response position")
        spec = _Spec(cfg.risk, float(cfg.mu), cfg.split_vocab, cfg.chunk_size, dtype)
        label_logps, risk, kl = _PositionTerms.apply(
            policy, rows_b, rows_t, labels, ref_full, ref_topk, topk_ids, ref_rest, spec
        )

        def per_pair(values: torch.Tensor) -> torch.Tensor:
            return torch.zeros(B, dtype=dtype, device=policy.device).index_add(0, rows_b, values)

        return per_pair(label_logps) - self._reference_sum(batch, side, mask, dtype, who), per_pair(risk), per_pair(kl)

    @staticmethod
    def _reference_sum(batch: PairBatch, side: str, mask: torch.Tensor, dtype: torch.dtype, who: str) -> torch.Tensor:
        """``log π_ref(y|x)`` ``[B]``: per-token values (given, or gathered from the full reference) summed
        here in the compute dtype (a bf16 sum would lose ~3 significant digits)."""
        try:
            tokens = upcast(batch.token_logps("reference", side)).to(dtype)
        except LossInputError as err:
            raise LossInputError(f"{who}: the reference's label log-probs are needed too: {err}") from None
        return torch.where(mask, tokens, torch.zeros((), dtype=dtype, device=tokens.device)).sum(-1)

    @staticmethod
    def _check_shape(who: str, name: str, tensor: torch.Tensor, shape: Tuple[int, ...]) -> None:
        if tuple(tensor.shape) != tuple(shape):
            raise LossInputError(f"{who}: `{name}` has shape {tuple(tensor.shape)}, expected {tuple(shape)}")


@register_loss("tdpo2", risk="kl", variant=2)
@register_loss("tdpo1", risk="kl", variant=1)
@register_loss("tdpo", risk="kl", variant=1)
class TDPOLoss(RaDPOLoss):
    """TDPO: token-level DPO, Ra-DPO with the risk measure replaced by the expectation (``risk="kl"``).

    ``D(y) = Σ_t KL(π_ref(·|s_t) ‖ π_θ(·|s_t))`` (D_SeqKL) and, as in :class:`RaDPOLoss`::

        TDPO1: L = −log σ(β[(ℓ_w − ℓ_l) − (D_l − D_w)])
        TDPO2: L = −log σ(β[(ℓ_w − ℓ_l) − α (D_l − sg(D_w))])
        rewards r(y) = β (ℓ(y) + D(y))  (detached, as the official ``tdpo_loss``)

    ``tdpo`` is TDPO1, the default of the official ``config/loss/tdpo.yaml`` (``if_tdpo2: false`` since
    commit f567175, Jul 2024; the Ra-DPO repo's TDPO config agrees). The official ``tdpo_loss`` keyword
    default is ``if_tdpo2=True`` and the paper's headline method is TDPO2 (``tdpo2``); its README
    recommends TDPO1 at low learning rates and TDPO2 at higher ones. Hyperparameters: ``beta`` = 0.1,
    ``alpha`` = 0.5 (TDPO2 only), ``chunk_size`` = 64; inputs as :class:`RaDPOLoss`.

    Paper: Zeng, Liu, Ma, Yang, Zhang, Wang, *Token-level Direct Preference Optimization*, ICML 2024,
    arXiv:2404.11999 (code: Vance0124/Token-level-Direct-Preference-Optimization, ``trainers.py``).
    """

    paper = "Zeng et al., Token-level Direct Preference Optimization, ICML 2024"
    arxiv = "2404.11999"
    implementation_notes = (
        'Ra-DPO with the expectation as risk measure: sequential KL, exactly TDPO; tdpo = TDPO1'
        ' as the official config (if_tdpo2: false).'
    )
