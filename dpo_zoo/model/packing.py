"""Shared-prompt, padding-free forward passes: a micro-batch as one packed row of pair segments.

Layout
------
The padded path runs a batch of ``B`` pairs as a ``[2B, L]`` block: every prompt twice (once with each
completion) and every row padded to the longest. Here the same pairs become **one row** of
``Σ_i (P_i + C_i + R_i)`` tokens, pair after pair, where pair ``i`` is the segment

    [ prompt (P_i) | chosen completion (C_i) | rejected completion (R_i) ]

(Wang & Hegde 2024, "Accelerating Direct Preference Optimization with Prefix Sharing",
arXiv:2410.20305). Inside a segment, prompt and chosen tokens attend causally as usual; a rejected
token attends to the prompt and to the rejected tokens before it, never to the chosen tokens; and the
rejected position ids restart at ``P_i``, where the prompt ends. Each completion therefore sees exactly
the context it has in its own padded row, so its log-probs are the same up to float rounding. Segments
never attend to each other (block-diagonal attention), so no padded position is ever computed.

The first completion token of either side is predicted by the output at the last prompt position (one
shared output); every later token by the output just before it *within its own branch*. A
:class:`PackedRow` records, per completion token, that predicting position (``predictor``), the token
id (``labels``) and where the value goes in the padded ``[2B, T]`` layout (``rows``, ``cols``), so the
results line up column for column with the padded path's.

A pair whose two sequences do not start with the same prompt tokens (e.g. truncated differently), and
any sequence list that is not pairs (drift estimation over samples), is packed as plain causal
segments, one per sequence: no prompt sharing, still no padding.

Batches
-------
A step still holds a fixed number of pairs (``train.micro_batch_size`` × accumulation × processes), in
the same seeded order: packing changes how a micro-batch is computed, not which pairs it holds, so
resuming, gradient accumulation and the slicing across processes are exactly those of the padded path
(losses are means over pairs either way). There is no token budget and no length-aware regrouping:
segments never attend to each other, so a packed micro-batch costs the sum of its segments' costs
however their lengths mix, and regrouping would save nothing (it would for a kernel that pays for the
whole row, such as one dense block mask). ``prep.batch_size`` pairs are likewise packed per reference
pass, longest pairs first.

Attention
---------
The model runs with the attention implementation :data:`ATTENTION_NAME`, registered with transformers'
``AttentionInterface``. When a forward call carries a ``packed_row`` it computes attention in one of
two ways (``model.attention``, recorded on the model by :func:`set_attention`):

* ``segments``: segment by segment with ``torch.nn.functional.scaled_dot_product_attention`` (SDPA): a
  plain causal segment uses SDPA's causal kernel, a shared-prompt segment an explicit ``[n, n]``
  boolean mask. Cost is ``Σ n_i²`` per layer rather than ``(Σ n_i)²`` of one dense block mask;
* ``flex``: one FlexAttention call per layer over a block mask of the same rule, built once per row
  (:mod:`dpo_zoo.model.flex`);
* ``auto`` (the default): the segment loop on CPU, else whichever of the two measures faster. Without a ``packed_row`` (e.g.
generation) it is exactly transformers' SDPA attention, so switching a model to it changes nothing else.

Supported families: :data:`SUPPORTED_MODEL_TYPES` (Llama, which covers SmolLM2; Mistral; Qwen2; Qwen3) —
their decoder layers pass the attention call through that interface and apply rotary embeddings from
``position_ids``. Any other architecture, a model loaded with another attention implementation, or a
segment longer than the model's sliding window falls back to the padded path, said once per model type.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from dpo_zoo.model import flex

ATTENTION_NAME = "dpo_zoo_packed"
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Attention implementations a supported model may be loaded with and still be switched to ours
# (ours is exactly SDPA whenever no packed row is passed).
_SWITCHABLE = frozenset({"sdpa", "eager", ATTENTION_NAME})
_said_once: set = set()


@dataclass
class Segment:
    """Tokens ``[start, start + length)`` of the packed row; ``mask[q, k]`` True where query ``q`` may
    attend key ``k`` (segment-local indices), or None for plain causal attention. ``chosen`` is the
    segment-local ``[begin, end)`` of a shared-prompt segment's chosen tokens (the rejected tokens,
    from ``end`` on, never see them); None for a plain causal segment."""

    start: int
    length: int
    mask: Optional[torch.Tensor] = None
    chosen: Optional[Tuple[int, int]] = None


@dataclass
class PackedRow:
    """One packed row and where each completion token's value belongs (see the module docstring).

    ``M`` = completion tokens over all sequences; ``rows[m]``/``cols[m]`` place token ``m`` at row
    ``rows[m]`` (0..N−1, the padded batch's row) and completion column ``cols[m]``; ``width`` = ``T``.
    """

    input_ids: torch.Tensor  # [1, L]
    position_ids: torch.Tensor  # [1, L]
    segments: List[Segment]
    predictor: torch.Tensor  # [M] row position whose output predicts completion token m
    labels: torch.Tensor  # [M] the completion token ids
    rows: torch.Tensor  # [M]
    cols: torch.Tensor  # [M]
    n_rows: int
    width: int
    shared_pairs: int  # pairs whose prompt is computed once
    # How attention runs over the row (model.attention: auto | segments | flex); set per forward call.
    attention: str = "auto"
    # Built once per row and shared by every layer (FlexAttention's block mask).
    cache: Dict[str, object] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def longest_segment(self) -> int:
        return max((s.length for s in self.segments), default=0)


def pack_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_start: torch.Tensor, pairs: Optional[int] = None
) -> Optional[PackedRow]:
    """Pack the right-padded ``[N, L]`` sequences into one :class:`PackedRow`.

    With ``pairs = n`` the first ``n`` rows are chosen sequences and the next ``n`` their rejected
    partners (``N = 2n``): a pair whose ``completion_start`` and prompt tokens agree becomes one
    shared-prompt segment. Returns None when some sequence's completion starts at position 0 (no
    prompt token before it to predict its first token from), which only the padded path handles.
    """
    device = input_ids.device
    ids = input_ids.detach().cpu()
    lengths = attention_mask.detach().sum(-1).cpu().tolist()
    starts = completion_start.detach().cpu().tolist()
    n_rows = ids.shape[0]
    if any(s < 1 for s in starts):
        return None
    if pairs is not None and 2 * pairs != n_rows:
        raise ValueError(f"pack_rows: {n_rows} rows are not {pairs} chosen + {pairs} rejected sequences")

    tokens: List[torch.Tensor] = []
    positions: List[torch.Tensor] = []
    predictor: List[torch.Tensor] = []
    labels: List[torch.Tensor] = []
    rows: List[torch.Tensor] = []
    cols: List[torch.Tensor] = []
    segments: List[Segment] = []
    cursor = 0

    def completion(row: int, begin: int, end: int, predicted_from: torch.Tensor) -> None:
        count = end - begin
        predictor.append(predicted_from)
        labels.append(ids[row, begin:end])
        rows.append(torch.full((count,), row, dtype=torch.long))
        cols.append(torch.arange(count))

    def causal_segment(row: int) -> None:
        nonlocal cursor
        length, start = lengths[row], starts[row]
        tokens.append(ids[row, :length])
        positions.append(torch.arange(length))
        completion(row, start, length, cursor + start - 1 + torch.arange(max(length - start, 0)))
        segments.append(Segment(cursor, length))
        cursor += length

    shared = 0
    order = range(pairs) if pairs is not None else range(n_rows)
    for index in order:
        if pairs is None:
            causal_segment(index)
            continue
        chosen, rejected = index, index + pairs
        prompt = starts[chosen]
        if not (starts[rejected] == prompt and lengths[chosen] >= prompt and lengths[rejected] >= prompt
                and torch.equal(ids[chosen, :prompt], ids[rejected, :prompt])):
            causal_segment(chosen)
            causal_segment(rejected)
            continue
        shared += 1
        n_chosen, n_rejected = lengths[chosen] - prompt, lengths[rejected] - prompt
        length = prompt + n_chosen + n_rejected
        tokens += [ids[chosen, : lengths[chosen]], ids[rejected, prompt : lengths[rejected]]]
        positions += [torch.arange(lengths[chosen]), torch.arange(prompt, lengths[rejected])]
        last_prompt = cursor + prompt - 1
        completion(chosen, prompt, lengths[chosen], last_prompt + torch.arange(n_chosen))
        rejected_from = cursor + prompt + n_chosen - 1 + torch.arange(n_rejected)
        if n_rejected:
            rejected_from[0] = last_prompt
        completion(rejected, prompt, lengths[rejected], rejected_from)
        mask = torch.ones(length, length, dtype=torch.bool).tril_()
        mask[prompt + n_chosen :, prompt : prompt + n_chosen] = False  # rejected never sees chosen
        segments.append(Segment(cursor, length, mask.to(device), chosen=(prompt, prompt + n_chosen)))
        cursor += length

    width = max([0] + [lengths[r] - starts[r] for r in range(n_rows)])
    return PackedRow(
        input_ids=torch.cat(tokens).unsqueeze(0).to(device),
        position_ids=torch.cat(positions).unsqueeze(0).to(device),
        segments=segments,
        predictor=torch.cat(predictor).to(device),
        labels=torch.cat(labels).to(device),
        rows=torch.cat(rows).to(device),
        cols=torch.cat(cols).to(device),
        n_rows=n_rows,
        width=width,
        shared_pairs=shared,
    )


def segment_attention(query, key, value, row: PackedRow, dropout: float = 0.0, scaling=None) -> torch.Tensor:
    """``model.attention=segments``: one SDPA call per segment (causal kernel for a plain segment, the
    segment's boolean mask for a shared-prompt one). ``query`` [1, H, L, D], ``key``/``value``
    [1, H_kv, L, D] (grouped-query heads repeated, as transformers' SDPA path does); returns [1, L, H, D]."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    outputs = []
    for segment in row.segments:
        span = slice(segment.start, segment.start + segment.length)
        outputs.append(F.scaled_dot_product_attention(
            query[:, :, span], key[:, :, span], value[:, :, span], attn_mask=segment.mask, dropout_p=dropout,
            is_causal=segment.mask is None, scale=scaling,
        ))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     packed_row: Optional[PackedRow] = None, **kwargs):
    """transformers attention function: over a packed row, the segment loop or one FlexAttention call
    (``packed_row.attention``; :mod:`dpo_zoo.model.flex`), else plain SDPA. Returns ``([1, L, H, D], None)``."""
    if packed_row is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    mode = flex.resolve(packed_row.attention, query, key, value, packed_row, segment_attention, scaling)
    if mode == "flex":
        return flex.flex_attention(query, key, value, packed_row, scaling, dropout), None
    return segment_attention(query, key, value, packed_row, dropout, scaling), None


def set_attention(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Record how ``model``'s packed rows run attention (``model.attention``: auto | segments | flex);
    returns ``model``."""
    if mode not in flex.MODES:
        raise ValueError(f"model.attention must be one of {', '.join(flex.MODES)}, got {mode!r}")
    causal_lm(model)._dpo_zoo_attention = mode
    return model


def attention_of(model: torch.nn.Module) -> str:
    """The mode :func:`set_attention` recorded on ``model`` (``auto`` when none was)."""
    return getattr(causal_lm(model), "_dpo_zoo_attention", "auto")


@functools.lru_cache(maxsize=None)
def _register() -> None:
    """Register :func:`packed_attention` with transformers (once per process)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, packed_attention)
    # Without a packed row the model builds SDPA's own mask; with one, the caller hands a 4-D
    # placeholder that transformers passes through untouched, so no [L, L] mask is ever built.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def mask_placeholder(device: torch.device) -> torch.Tensor:
    """The ``attention_mask`` of a packed call: transformers returns a 4-D mask as-is instead of
    building one; :func:`packed_attention` ignores it and reads the row's segments."""
    return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM under any wrappers (DeepSpeed engine, PEFT)."""
    inner = model
    for _ in range(4):  # engine -> PeftModel -> LoraModel -> the transformers model
        if hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):
            inner = inner.module
        elif hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        else:
            break
    return inner


def _say_once(key: str, message: str) -> None:
    if key not in _said_once:
        _said_once.add(key)
        warnings.warn(message, stacklevel=3)


def prepare(model: torch.nn.Module, longest_segment: int) -> bool:
    """Whether ``model`` can run a packed row whose longest segment has ``longest_segment`` tokens;
    switches a supported model to :data:`ATTENTION_NAME` on first use. Says once why not otherwise."""
    inner = causal_lm(model)
    config = getattr(inner, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        _say_once(f"type:{model_type}", f"dpo_zoo: shared-prompt packing supports {', '.join(sorted(SUPPORTED_MODEL_TYPES))}; "
                  f"model type {model_type!r} runs the padded [2B, L] batch instead (same values, slower)")
        return False
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in _SWITCHABLE:
        _say_once(f"impl:{implementation}", f"dpo_zoo: the model was loaded with attn_implementation={implementation!r}; "
                  "shared-prompt packing needs SDPA, so the padded batch runs instead")
        return False
    window = getattr(config, "sliding_window", None)
    windowed = window is not None and (model_type == "mistral" or getattr(config, "use_sliding_window", False)
                                       or "sliding_attention" in (getattr(config, "layer_types", None) or ()))
    if windowed and longest_segment > int(window):
        _say_once(f"window:{model_type}", f"dpo_zoo: a pair of {longest_segment} tokens exceeds the sliding window "
                  f"({window}); such batches run padded")
        return False
    if implementation != ATTENTION_NAME:
        _register()
        inner.set_attn_implementation(ATTENTION_NAME)
    return True


def lm_head_of(model: torch.nn.Module):
    """(decoder, LM head) of the causal LM when its head can be applied apart from the model — a
    plain linear layer whose weight is held whole on this process — else None (e.g. a ZeRO-3
    partitioned model, whose parameters are gathered only inside the model's own forward)."""
    inner = causal_lm(model)
    try:
        head, decoder = inner.get_output_embeddings(), inner.get_decoder()
    except (AttributeError, NotImplementedError):
        return None
    if not isinstance(head, torch.nn.Linear) or decoder is None or hasattr(head.weight, "ds_id"):
        return None
    return decoder, head
