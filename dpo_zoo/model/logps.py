"""The one code path that turns a causal LM and tokenized sequences into completion log-probs.

Prep (the reference pass), train (the policy and a live reference), compare and drift estimation all
call :func:`completion_logps`. Sequences are ``prompt + completion`` token ids, right-padded; row ``i``'s
completion starts at ``completion_start[i]``. The output is aligned to completion tokens: column ``j``
of row ``i`` is ``log π(y_j | x, y_<j)`` for the token at input position ``completion_start[i] + j``,
read from the logits at position ``completion_start[i] + j − 1`` (the causal shift; docs/loss_maths.md, conventions).

Two ways to compute the same values:

* **packed** (the default, :mod:`dpo_zoo.model.packing`): the sequences are packed into one row without
  padding, each pair's prompt once ([prompt | chosen | rejected], the rejected branch attending to the
  prompt and itself), and the LM head is applied only at the positions that predict a completion token;
* **padded**: the ``[N, L]`` block as given (any architecture; also the fallback).

Per token, ``log π(y|·) = logit[y] − logsumexp(logits)``. The LM head runs in chunks of
``head_chunk`` completion tokens; when training (gradients on, no vocabulary-level output asked for) each
chunk keeps only its hidden states and its logits are recomputed in the backward pass, so no
``[tokens, V]`` logits tensor stays alive for backward. With a plain bias-free linear head and no top-k
asked for, a chunk's backward is written out (:class:`_ChunkTokenLogps`): ``∂/∂logits = g·(e_y − p)``
computed in place on the recomputed logits, then two matrix products in the head's dtype (bf16 when
training in bf16), instead of autograd's chain of ``[tokens, V]`` temporaries through ``logsumexp``. Vocabulary-level outputs (needed
only by token-level losses such as ``ra_dpo`` and ``tdpo``) are built for completion positions only,
from the same chunks.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from dpo_zoo.model import packing


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


def _topk_and_rest(vocab_logps: torch.Tensor, k: int):
    """(top-k log-probs, their ids, log of the leftover mass ``log(1 − Σ_topk p)``), without grad."""
    with torch.no_grad():
        top_values, top_ids = vocab_logps.detach().topk(k, dim=-1)
        top_mass = torch.logsumexp(top_values, dim=-1)
        # log(1 − exp(top_mass)) without cancellation; clamp avoids log(0) when top-k is all.
        rest = torch.log(-torch.expm1(top_mass.clamp(max=-1e-12)))
    return top_values, top_ids, rest


def _forward_accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM under any wrappers (DeepSpeed engine, PEFT) takes ``logits_to_keep``."""
    inner = packing.causal_lm(model)
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def padded_completion_logps(
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
    """The padded path of :func:`completion_logps`: the model runs once on the ``[N, L]`` block as given.

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
                topk_chunks.append(_topk_and_rest(chunk_vocab, topk))
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


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_start: torch.Tensor,
    *,
    pairs: Optional[int] = None,
    padding_free: bool = True,
    vocab: bool = False,
    topk: int = 0,
    logits_mean: bool = False,
    sq_mass: bool = False,
    head_chunk: int = 512,
) -> CompletionLogps:
    """Run ``model`` once over the sequences ``input_ids`` [N,L] and return completion log-probs.

    ``pairs=n``: the first ``n`` rows are chosen sequences and the next ``n`` their rejected partners,
    so each pair's prompt is computed once. ``padding_free=False`` runs the padded block instead (the
    same values up to float rounding; see the module docstring).
    ``vocab=True`` also returns the full log-softmax [N,T,V] at completion positions (differentiable);
    ``topk=k`` returns the top-k reference distribution per position plus the leftover mass (no grad);
    ``sq_mass=True`` returns ``log Σ_v π(v)² = logsumexp(2·logits) − 2·logsumexp(logits)`` (no grad).
    Computation is in at least fp32 whatever the model's dtype. Gradients flow when the caller has
    them enabled (training); wrap in ``torch.inference_mode()`` or ``torch.no_grad()`` for reference passes.
    """
    options = dict(vocab=vocab, topk=topk, logits_mean=logits_mean, sq_mass=sq_mass)
    if padding_free and input_ids.shape[0]:
        row = packing.pack_rows(input_ids, attention_mask, completion_start, pairs)
        if row is not None and row.labels.numel() and packing.prepare(model, row.longest_segment):
            return packed_completion_logps(model, row, head_chunk=head_chunk, **options)
    return padded_completion_logps(model, input_ids, attention_mask, completion_start, **options)


def _head_values(head: Optional[torch.nn.Module], hidden: torch.Tensor, labels: torch.Tensor,
                 vocab: bool, topk: int, logits_mean: bool, sq_mass: bool):
    """Per-token values of one chunk of ``m`` completion tokens: ``hidden`` [m,H] goes through ``head``
    (or already is the logits when ``head`` is None). Returns (token log-probs [m], vocab [m,V] or None,
    top-k triple or None, mean logit [m] or None, log Σ p² [m] or None)."""
    logits = head(hidden) if head is not None else hidden
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    log_norm = torch.logsumexp(logits, dim=-1)
    tokens = logits.gather(1, labels.unsqueeze(1)).squeeze(1) - log_norm
    vocab_logps = logits - log_norm.unsqueeze(1) if (vocab or topk) else None
    top = _topk_and_rest(vocab_logps, topk) if topk else None
    with torch.no_grad():
        mean = logits.detach().mean(-1) if logits_mean else None
        square = torch.logsumexp(2.0 * logits.detach(), dim=-1) - 2.0 * log_norm.detach() if sq_mass else None
    return tokens, (vocab_logps if vocab else None), top, mean, square


class _ChunkTokenLogps(torch.autograd.Function):
    """Per-token log-probs of one chunk, ``log π(y_m) = h_m·w_y − logsumexp_v(h_m·w_v)`` for hidden
    states ``h`` [m, H] and a head weight ``W`` [V, H], with the mean logit and ``log Σ_v π(v)²`` as
    gradient-free side outputs when asked. Backward recomputes the logits (nothing of size [m, V] is
    kept) and uses ``∂ log π(y)/∂ logits = e_y − softmax(logits)``: ``∂h = G·W`` and ``∂W = Gᵀ·h`` for
    ``G = g·(e_y − p)``. The logits are always normalised in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, want_mean: bool, want_square: bool):
        # Under autocast (train.precision=bfloat16) both products of the backward run in the autocast
        # dtype too: the casts are made here, once, and saved; the gradients go back in the inputs' dtypes.
        ctx.input_dtypes = hidden.dtype, weight.dtype
        if torch.is_autocast_enabled(hidden.device.type):
            compute = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(compute), weight.to(compute)
        logits = (hidden @ weight.t()).float()
        log_norm = torch.logsumexp(logits, dim=-1)
        tokens = logits.gather(1, labels.unsqueeze(1)).squeeze(1) - log_norm
        mean = logits.mean(-1) if want_mean else None
        square = torch.logsumexp(logits.mul_(2.0), dim=-1) - 2.0 * log_norm if want_square else None
        ctx.save_for_backward(hidden, weight, labels, log_norm)
        ctx.mark_non_differentiable(*[t for t in (mean, square) if t is not None])
        return tokens, mean, square

    @staticmethod
    def backward(ctx, grad, _mean, _square):
        hidden, weight, labels, log_norm = ctx.saved_tensors
        probs = (hidden @ weight.t()).float().sub_(log_norm.unsqueeze(1)).exp_()
        probs.mul_(grad.neg().unsqueeze(1)).scatter_add_(1, labels.unsqueeze(1), grad.unsqueeze(1))
        d_logits = probs.to(hidden.dtype)
        hidden_dtype, weight_dtype = ctx.input_dtypes
        d_hidden = (d_logits @ weight).to(hidden_dtype) if ctx.needs_input_grad[0] else None
        d_weight = (d_logits.t() @ hidden).to(weight_dtype) if ctx.needs_input_grad[1] else None
        return d_hidden, d_weight, None, None, None


def _fused_head_values(head, hidden, labels, vocab, topk, logits_mean, sq_mass):
    """:func:`_head_values`'s tuple from :class:`_ChunkTokenLogps` (token-level outputs only)."""
    tokens, mean, square = _ChunkTokenLogps.apply(hidden, head.weight, labels, logits_mean, sq_mass)
    return tokens, None, None, mean, square


def packed_completion_logps(
    model: torch.nn.Module,
    row: "packing.PackedRow",
    *,
    vocab: bool = False,
    topk: int = 0,
    logits_mean: bool = False,
    sq_mass: bool = False,
    head_chunk: int = 512,
) -> CompletionLogps:
    """The packed path of :func:`completion_logps` for a row built by :func:`dpo_zoo.model.packing.pack_rows`.

    When the LM head can be applied apart from the model (:func:`dpo_zoo.model.packing.lm_head_of`), the
    decoder runs over the row and the head only over the ``M`` predicting positions, ``head_chunk`` at
    a time; otherwise the whole model runs with ``logits_to_keep`` = those positions.
    """
    device = row.input_ids.device
    row.attention = packing.attention_of(model)
    call = dict(input_ids=row.input_ids, position_ids=row.position_ids, use_cache=False,
                attention_mask=packing.mask_placeholder(device), packed_row=row)
    split = packing.lm_head_of(model)
    if split is not None:
        decoder, head = split
        hidden = decoder(**call).last_hidden_state[0].index_select(0, row.predictor)  # [M, H]
    else:
        head = None
        hidden = model(**call, logits_to_keep=row.predictor).logits[0]  # [M, V]
    # Checkpointing a chunk keeps only its hidden states for backward; a vocabulary-level output is
    # kept whole by the loss anyway, so recomputing its logits would save nothing.
    recompute = head is not None and not vocab and torch.is_grad_enabled() and hidden.requires_grad
    fused = recompute and not topk and type(head) is torch.nn.Linear and head.bias is None
    parts = []
    flags = (vocab, topk, logits_mean, sq_mass)
    for chunk_hidden, chunk_labels in zip(hidden.split(head_chunk), row.labels.split(head_chunk)):
        if fused:
            parts.append(_fused_head_values(head, chunk_hidden, chunk_labels, *flags))
        elif recompute:
            parts.append(checkpoint(_head_values, head, chunk_hidden, chunk_labels, *flags, use_reentrant=False))
        else:
            parts.append(_head_values(head, chunk_hidden, chunk_labels, *flags))

    n, width = row.n_rows, row.width
    place = (row.rows, row.cols)

    def spread(values: torch.Tensor) -> torch.Tensor:
        """Per-token values [M, ...] into the padded layout [N, T, ...] (0 where no token)."""
        return values.new_zeros((n, width) + tuple(values.shape[1:])).index_put(place, values)

    tokens = torch.cat([p[0] for p in parts]) if parts else hidden.new_zeros(0).float()
    result = CompletionLogps(
        token_logps=spread(tokens),
        mask=spread(torch.ones_like(row.rows, dtype=torch.bool)),
        labels=spread(row.labels),
    )
    if vocab:
        result.vocab_logps = spread(torch.cat([p[1] for p in parts]))
    if topk:
        result.topk_logps = spread(torch.cat([p[2][0] for p in parts]))
        result.topk_ids = spread(torch.cat([p[2][1] for p in parts]))
        result.rest_logmass = spread(torch.cat([p[2][2] for p in parts]))
    if logits_mean:
        means = torch.cat([p[3] for p in parts])
        counts = torch.zeros(n, dtype=means.dtype, device=device).index_add_(0, row.rows, torch.ones_like(means))
        sums = torch.zeros(n, dtype=means.dtype, device=device).index_add_(0, row.rows, means)
        result.logits_mean = sums / counts.clamp(min=1)
    if sq_mass:
        result.log_sq_mass = spread(torch.cat([p[4] for p in parts]))
    return result
