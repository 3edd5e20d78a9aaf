"""From prepared rows to a loss's :class:`~dpo_zoo.losses.PairBatch` — shared by train and compare.

Two steps, both independent of which loss is used:

1. :func:`collate` pads a list of prepared rows (dicts with the columns of ``data_prep/schema.py``) into
   tensors: one ``[2B, L]`` block of ``chosen`` rows followed by ``rejected`` rows for a single policy
   forward, plus every per-pair and reference column the rows carry.
2. :func:`pair_batch` runs the policy (and, when asked, a live reference) through
   :func:`dpo_zoo.model.logps.completion_logps` and fills exactly the fields that the loss declares it needs.
   By default the block is not run as it is padded: it is packed into one row with each pair's prompt
   computed once (:mod:`dpo_zoo.model.packing`); the padded block is the fallback and gives the same values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from dpo_zoo.cache import format as S
from dpo_zoo.model.logps import CompletionLogps, completion_logps
from dpo_zoo.losses import Loss, Need, PairBatch


@dataclass
class Collated:
    """A padded batch of ``B`` pairs (see :func:`collate`)."""

    ids: List[str]
    input_ids: torch.Tensor  # [2B, L]: chosen rows, then rejected rows; right-padded
    attention_mask: torch.Tensor  # [2B, L]
    completion_start: torch.Tensor  # [2B]
    per_pair: Dict[str, torch.Tensor] = field(default_factory=dict)  # is_tie, weight, soft_label, behavior_*
    reference: Dict[str, torch.Tensor] = field(default_factory=dict)  # reference_* fields of PairBatch

    @property
    def n_pairs(self) -> int:
        return len(self.ids)

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum().item())

    def to(self, device: torch.device) -> "Collated":
        return Collated(
            ids=self.ids,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            completion_start=self.completion_start.to(device),
            per_pair={k: v.to(device) for k, v in self.per_pair.items()},
            reference={k: v.to(device) for k, v in self.reference.items()},
        )


def _pad_2d(rows: Sequence[Sequence[float]], width: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=dtype)
    for i, values in enumerate(rows):
        if len(values):
            out[i, : len(values)] = torch.as_tensor(values, dtype=dtype)
    return out


def _pad_3d(rows: Sequence[Sequence[Sequence[float]]], width: int, depth: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(len(rows), width, depth, dtype=dtype)
    for i, values in enumerate(rows):
        if len(values):
            out[i, : len(values)] = torch.as_tensor(values, dtype=dtype)
    return out


def collate(rows: Sequence[Dict[str, Any]], pad_token_id: int) -> Collated:
    """Pad prepared rows into tensors.

    Reference per-token values are padded to ``T`` = the longest completion of either side in the
    batch, the width :func:`completion_logps` gives for the same ``[2B, L]`` block, so policy and
    reference tensors line up column for column.
    """
    sequences = [r[S.CHOSEN_INPUT_IDS] for r in rows] + [r[S.REJECTED_INPUT_IDS] for r in rows]
    starts = [r[S.CHOSEN_COMPLETION_START] for r in rows] + [r[S.REJECTED_COMPLETION_START] for r in rows]
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
    width = max(len(s) - st for s, st in zip(sequences, starts))

    per_pair: Dict[str, torch.Tensor] = {}
    first = rows[0]
    if S.IS_TIE in first:
        per_pair["is_tie"] = torch.tensor([bool(r[S.IS_TIE]) for r in rows])
    if S.WEIGHT in first:
        per_pair["weight"] = torch.tensor([float(r[S.WEIGHT]) for r in rows])
    if first.get(S.SOFT_LABEL) is not None:
        per_pair["soft_label"] = torch.tensor(
            [float("nan") if r.get(S.SOFT_LABEL) is None else float(r[S.SOFT_LABEL]) for r in rows]
        )
    for column, name in ((S.BEHAVIOR_CHOSEN_LOGPS, "behavior_chosen_logps"), (S.BEHAVIOR_REJECTED_LOGPS, "behavior_rejected_logps")):
        if first.get(column) is not None:
            per_pair[name] = torch.tensor([float(r[column]) for r in rows], dtype=torch.float64)

    reference: Dict[str, torch.Tensor] = {}
    for side in ("chosen", "rejected"):
        token_col = getattr(S, f"REF_{side.upper()}_TOKEN_LOGPS")
        sum_col = getattr(S, f"REF_{side.upper()}_LOGPS")
        if first.get(sum_col) is not None:
            reference[f"reference_{side}_logps"] = torch.tensor([float(r[sum_col]) for r in rows], dtype=torch.float64)
        if first.get(token_col) is not None:
            reference[f"reference_{side}_token_logps"] = _pad_2d([r[token_col] for r in rows], width, torch.float32)
        topk_col = getattr(S, f"REF_{side.upper()}_TOPK_LOGPS")
        if first.get(topk_col) is not None:
            k = len(first[topk_col][0]) if len(first[topk_col]) else 0
            k = max(k, max((len(r[topk_col][0]) for r in rows if len(r[topk_col])), default=0))
            reference[f"reference_{side}_topk_logps"] = _pad_3d([r[topk_col] for r in rows], width, k, torch.float32)
            ids_col = getattr(S, f"REF_{side.upper()}_TOPK_IDS")
            reference[f"reference_{side}_topk_ids"] = _pad_3d([r[ids_col] for r in rows], width, k, torch.long)
            rest_col = getattr(S, f"REF_{side.upper()}_REST_LOGMASS")
            if first.get(rest_col) is not None:
                reference[f"reference_{side}_rest_logmass"] = _pad_2d([r[rest_col] for r in rows], width, torch.float32)

    return Collated(
        ids=[str(r[S.ID]) for r in rows],
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_start=torch.tensor(starts, dtype=torch.long),
        per_pair=per_pair,
        reference=reference,
    )


def loss_wants(loss: Loss) -> set:
    """Every need the loss declares, required or optional."""
    return set(loss.requires) | set(loss.optional)


REFERENCE_COLUMNS = frozenset({
    S.REF_CHOSEN_LOGPS, S.REF_REJECTED_LOGPS, S.REF_CHOSEN_TOKEN_LOGPS, S.REF_REJECTED_TOKEN_LOGPS,
    S.REF_CHOSEN_TOPK_IDS, S.REF_REJECTED_TOPK_IDS, S.REF_CHOSEN_TOPK_LOGPS, S.REF_REJECTED_TOPK_LOGPS,
    S.REF_CHOSEN_REST_LOGMASS, S.REF_REJECTED_REST_LOGMASS,
})


def columns_to_read(columns: Sequence[str], reference_from_rows: bool) -> List[str]:
    """The prepared-set columns a pass reads: all of them, less the reference columns when the
    reference values do not come from the rows (a reference-free loss, or a live reference)."""
    return [c for c in columns if reference_from_rows or c not in REFERENCE_COLUMNS]


def cache_reference_fields(loss: Loss) -> List[str]:
    """The reference fields the loss reads, in the form a prepared set stores them."""
    wants = loss_wants(loss)
    fields: List[str] = []
    for side in ("chosen", "rejected"):
        if Need.VOCAB_LOGPS in wants:
            fields += [f"reference_{side}_topk_logps", f"reference_{side}_topk_ids"]
        if Need.TOKEN_LOGPS in wants:
            fields.append(f"reference_{side}_token_logps")
        if Need.SEQUENCE_LOGPS in wants:
            fields.append(f"reference_{side}_logps")
    return fields


@dataclass
class ForwardResult:
    """A loss-ready batch plus the policy outputs that metrics read (TRL's logps/logits)."""

    batch: PairBatch
    policy_chosen: CompletionLogps
    policy_rejected: CompletionLogps


def _fill(batch: PairBatch, model: str, chosen: CompletionLogps, rejected: CompletionLogps, wants: set) -> None:
    for side, out in (("chosen", chosen), ("rejected", rejected)):
        setattr(batch, f"{model}_{side}_token_logps", out.token_logps)
        setattr(batch, f"{model}_{side}_logps", out.sums())
        if Need.VOCAB_LOGPS in wants and out.vocab_logps is not None:
            setattr(batch, f"{model}_{side}_vocab_logps", out.vocab_logps)
        if out.log_sq_mass is not None:
            setattr(batch, f"{model}_{side}_log_sq_mass", out.log_sq_mass)


def pair_batch(
    loss: Loss,
    policy: torch.nn.Module,
    collated: Collated,
    *,
    reference_model: Optional[torch.nn.Module] = None,
    reference_context=None,
    generator: Optional[torch.Generator] = None,
    logits_mean: bool = True,
    padding_free: bool = True,
) -> ForwardResult:
    """Run the policy once over the ``B`` pairs and build the :class:`PairBatch` the loss needs.

    ``padding_free``: pack the pairs into one row, each prompt once (see :func:`completion_logps`);
    else run the padded ``[2B, L]`` block.

    Reference values come from ``collated.reference`` (the cache) unless ``reference_model`` is given,
    in which case it runs without gradients inside ``reference_context()`` when given (e.g. a PEFT
    model's ``disable_adapter``, so the frozen base weights are the reference).
    """
    wants = loss_wants(loss)
    vocab = Need.VOCAB_LOGPS in wants
    n = collated.n_pairs
    out = completion_logps(
        policy, collated.input_ids, collated.attention_mask, collated.completion_start, pairs=n,
        padding_free=padding_free, vocab=vocab, logits_mean=logits_mean, sq_mass=Need.SQUARED_PROB_MASS in wants,
    )
    chosen, rejected = out.split(n)
    batch = PairBatch(chosen_mask=chosen.mask, rejected_mask=rejected.mask)
    if vocab:
        batch.chosen_labels, batch.rejected_labels = chosen.labels, rejected.labels
    _fill(batch, "policy", chosen, rejected, wants)

    if loss.needs_reference:
        if reference_model is not None:
            import contextlib

            with (reference_context() if reference_context else contextlib.nullcontext()), torch.no_grad():
                ref_out = completion_logps(
                    reference_model, collated.input_ids, collated.attention_mask, collated.completion_start, pairs=n,
                    padding_free=padding_free, vocab=vocab,
                )
            ref_chosen, ref_rejected = ref_out.split(n)
            _fill(batch, "reference", ref_chosen, ref_rejected, wants)
        else:
            for name, value in collated.reference.items():
                setattr(batch, name, value)

    for name, value in collated.per_pair.items():
        setattr(batch, name, value)
    if generator is not None:
        batch.generator = generator
    return ForwardResult(batch=batch, policy_chosen=chosen, policy_rejected=rejected)
