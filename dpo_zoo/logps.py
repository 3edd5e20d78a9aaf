"""The one code path that turns a causal LM and tokenized sequences into completion log-probs.

Prep (the reference pass), train (the policy and a live reference) and compare all call
:func:`completion_logps`. Sequences are ``prompt + completion`` token ids, right-padded; row ``i``'s
completion starts at ``completion_start[i]``. The output is aligned to completion tokens: column ``j``
of row ``i`` is ``log π(y_j | x, y_<j)`` for the token at input position ``completion_start[i] + j``,
read from the logits at position ``completion_start[i] + j − 1`` (the causal shift; docs/loss_maths.md, conventions).

Memory: the full ``log_softmax`` over the vocabulary is never built for the whole batch; token
log-probs are ``logit[label] − logsumexp(logits)`` computed over row chunks, and vocabulary-level
outputs (needed only by token-level losses such as ``ra_dpo``) are built for completion positions only.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class CompletionLogps:
    """Per-completion-token outputs for ``N`` sequences, ``T`` = longest completion in the batch.

    ``token_logps`` [N,T] (0 on padding), ``mask`` [N,T] (1 on completion tokens), ``labels`` [N,T]
    (the completion token ids, 0 on padding), and when asked: ``vocab_logps`` [N,T,V], ``topk_logps``
    and ``topk_ids`` [N,T,K] with ``rest_logmass`` [N,T] = log(1 − Σ_topk p), and ``logits_mean``
    [N] (mean logit over completion positions and vocabulary, logged as TRL's ``logits/chosen``), and
    ``log_sq_mass`` [N,T] = ``log Σ_v π(v|·)²`` per completion position (WPO's weights; 0 on padding).
    """

    token_logps: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    vocab_logps: Optional[torch.Tensor] = None
    topk_logps: Optional[torch.Tensor] = None
    topk_ids: Optional[torch.Tensor] = None
    rest_logmass: Optional[torch.Tensor] = None
    logits_mean: Optional[torch.Tensor] = None
    log_sq_mass: Optional[torch.Tensor] = None

    def sums(self) -> torch.Tensor:
        """Summed completion log-probs [N]."""
        return (self.token_logps * self.mask.to(self.token_logps.dtype)).sum(-1)

    def split(self, n_first: int):
        """(first ``n_first`` rows, the rest): chosen and rejected of a concatenated forward."""
        first, rest = {}, {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            first[name] = None if value is None else value[:n_first]
            rest[name] = None if value is None else value[n_first:]
        return CompletionLogps(**first), CompletionLogps(**rest)


def completion_index(completion_start: torch.Tensor, lengths: torch.Tensor, seq_len: int):
    """Gather indices into the shifted logits ``[N, L−1]`` for completion tokens, and their mask.

    Returns ``(positions [N,T], mask [N,T])`` where ``positions[i, j] = completion_start[i] + j − 1``
    (the logits row that predicts completion token ``j``), clamped into range on padding.
    """
    completion_lengths = (lengths - completion_start).clamp(min=0)
    width = int(completion_lengths.max().item()) if completion_lengths.numel() else 0
    steps = torch.arange(width, device=completion_start.device)
    positions = completion_start.unsqueeze(1) - 1 + steps.unsqueeze(0)
    mask = steps.unsqueeze(0) < completion_lengths.unsqueeze(1)
    positions = positions.clamp(min=0, max=max(seq_len - 2, 0))
    return positions, mask


def _forward_accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM under any wrappers (DeepSpeed engine, PEFT) takes ``logits_to_keep``."""
    inner = model
    for _ in range(4):  # engine -> PeftModel -> LoraModel -> the transformers model
        if hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):
            inner = inner.module
        elif hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        else:
            break
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_start: torch.Tensor,
    *,
    vocab: bool = False,
    topk: int = 0,
    logits_mean: bool = False,
    sq_mass: bool = False,
    row_chunk: int = 4,
) -> CompletionLogps:
    """Run ``model`` once on ``input_ids`` [N,L] and return completion log-probs (see module doc).

    ``vocab=True`` also returns the full log-softmax [N,T,V] at completion positions (differentiable);
    ``topk=k`` returns the top-k reference distribution per position plus the leftover mass (no grad);
    ``sq_mass=True`` returns ``log Σ_v π(v)² = logsumexp(2·logits) − 2·logsumexp(logits)`` (no grad).
    Computation is in at least fp32 whatever the model's dtype. Gradients flow when the caller has
    them enabled (training); wrap in ``torch.inference_mode()`` for reference passes.

    Speed: logits are asked for only from the earliest position that predicts a completion token on
    (``logits_to_keep``, when the model takes it: the LM head's cost on prompt tokens is skipped and
    the model's own logit processing is kept); per-token values are ``logit[label] − logsumexp`` over
    row chunks taken with ``split`` (whose backward writes one gradient, not one per chunk).
    """
    n_rows, seq_len = input_ids.shape
    lengths = attention_mask.sum(-1)
    positions, mask = completion_index(completion_start, lengths, seq_len)
    width = positions.shape[1]
    labels_full = input_ids[:, 1:]  # token t is predicted by logits at t-1
    labels = torch.gather(labels_full, 1, positions) * mask

    # Positions first .. L-1 get logits; position L-1 predicts nothing (its label is padding, masked).
    first = max(int(completion_start.min().item()) - 1, 0) if n_rows else 0
    kwargs = {"logits_to_keep": seq_len - first} if first > 0 and _forward_accepts_logits_to_keep(model) else {}
    if not kwargs:
        first = 0
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    logits = outputs.logits  # [N, L − first, V]
    kept_labels = torch.cat([input_ids[:, first + 1 :], input_ids[:, :1]], dim=1)  # last column: unused
    kept_positions = (positions - first).clamp(min=0)

    token_chunks, vocab_chunks, topk_chunks, mean_chunks, sq_chunks = [], [], [], [], []
    for chunk_logits, chunk_labels, chunk_pos, chunk_mask in zip(
        logits.split(row_chunk), kept_labels.split(row_chunk), kept_positions.split(row_chunk), mask.split(row_chunk)
    ):
        if chunk_logits.dtype not in (torch.float32, torch.float64):
            chunk_logits = chunk_logits.float()
        log_norm = torch.logsumexp(chunk_logits, dim=-1)  # [r, K]
        picked = torch.gather(chunk_logits, 2, chunk_labels.unsqueeze(-1)).squeeze(-1)
        token_chunks.append(torch.gather(picked - log_norm, 1, chunk_pos) * chunk_mask)
        if vocab or topk:
            index = chunk_pos.unsqueeze(-1).expand(-1, -1, chunk_logits.shape[-1])
            chunk_vocab = torch.gather(chunk_logits, 1, index) - torch.gather(log_norm, 1, chunk_pos).unsqueeze(-1)
            if vocab:
                vocab_chunks.append(chunk_vocab)
            if topk:
                with torch.no_grad():
                    top_values, top_ids = chunk_vocab.detach().topk(topk, dim=-1)
                    top_mass = torch.logsumexp(top_values, dim=-1)
                    # log(1 − exp(top_mass)) without cancellation; clamp avoids log(0) when top-k is all.
                    rest = torch.log(-torch.expm1(top_mass.clamp(max=-1e-12)))
                    topk_chunks.append((top_values, top_ids, rest))
        if sq_mass:
            with torch.no_grad():
                per_position = torch.logsumexp(2.0 * chunk_logits.detach(), dim=-1) - 2.0 * log_norm.detach()
                sq_chunks.append(torch.gather(per_position, 1, chunk_pos) * chunk_mask)
        if logits_mean:
            with torch.no_grad():
                m = chunk_mask.to(chunk_logits.dtype)
                per_position = torch.gather(chunk_logits.detach().mean(-1), 1, chunk_pos)
                mean_chunks.append((per_position * m).sum(-1) / m.sum(-1).clamp(min=1))

    result = CompletionLogps(
        token_logps=torch.cat(token_chunks) if token_chunks else logits.new_zeros(n_rows, width).float(),
        mask=mask,
        labels=labels,
    )
    if vocab:
        result.vocab_logps = torch.cat(vocab_chunks)
    if topk:
        result.topk_logps = torch.cat([c[0] for c in topk_chunks])
        result.topk_ids = torch.cat([c[1] for c in topk_chunks])
        result.rest_logmass = torch.cat([c[2] for c in topk_chunks])
    if logits_mean:
        result.logits_mean = torch.cat(mean_chunks)
    if sq_mass:
        result.log_sq_mass = torch.cat(sq_chunks) if sq_chunks else result.token_logps.new_zeros(n_rows, width)
    return result
