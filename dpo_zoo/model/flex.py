"""One attention call per layer for a packed row: FlexAttention over a block mask of the segment layout.

The packed row of :mod:`dpo_zoo.model.packing` holds pair after pair, ``[prompt | chosen | rejected]``.
Query ``q`` may attend key ``k`` of the row exactly when

    segment(q) = segment(k)  and  k ≤ q  and  not (q is a rejected token and k a chosen token),

i.e. block-diagonal over pairs, causal inside a pair, and the rejected branch sees the prompt and
itself (Wang & Hegde 2024, arXiv:2410.20305). ``model.attention=segments`` runs that as one
``scaled_dot_product_attention`` call per segment (a Python loop: many small kernels per layer, and an
explicit boolean mask for each shared-prompt segment). ``model.attention=flex`` runs it as **one**
PyTorch FlexAttention call per layer (Dong et al. 2024, "Flex Attention: A Programming Model for
Generating Optimized Attention Kernels", arXiv:2412.05496): the rule above is the ``mask_mod``, and
the :class:`~torch.nn.attention.flex_attention.BlockMask` — which 128 × 128 tiles are empty, full or
partial — is built once per packed row (so once per micro-batch, shared by every layer) from the
dense rule on the row's token layout, a vectorised ``[L, L]`` boolean evaluation. Empty tiles are
never computed, so the cost stays about ``Σ n_i²`` (plus partial tiles on segment borders), not
``L²``. FlexAttention runs compiled (``torch.compile``; its eager fallback materialises the whole
score matrix).

``model.attention=auto`` (the default) picks per device: on CPU the segment loop (measured on this
project's 2-core CPU with torch 2.13: FlexAttention's compiled forward is 2–3× slower than the loop
there, and FlexAttention has no backward pass on CPU at all); on other devices it times both on the
first packed layer it meets (forward, after a warm-up that includes compilation) and keeps the faster
for that device and dtype (:func:`choices` says what it picked).
"""

from __future__ import annotations

import functools
import math
import time
from typing import Callable, Dict, Tuple

import torch

MODES = ("auto", "segments", "flex")
BLOCK = 128  # FlexAttention's default sparse block (tile) size
_chosen: Dict[Tuple[str, str], str] = {}


def choices() -> Dict[str, str]:
    """What ``auto`` picked so far, per ``device/dtype`` (e.g. ``{"cuda/torch.bfloat16": "flex"}``)."""
    return {f"{device}/{dtype}": mode for (device, dtype), mode in _chosen.items()}


def token_layout(row) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token of the row, padded to whole tiles: (segment index, is chosen, is rejected).

    Padding positions get segment −1, so they match no real token (and ``mask_mod`` may be asked
    about any index below the padded length without reading out of range)."""
    length = row.length
    padded = math.ceil(max(length, 1) / BLOCK) * BLOCK
    segment = torch.full((padded,), -1, dtype=torch.int32)
    chosen = torch.zeros(padded, dtype=torch.bool)
    rejected = torch.zeros(padded, dtype=torch.bool)
    for index, part in enumerate(row.segments):
        segment[part.start : part.start + part.length] = index
        if part.chosen is not None:
            begin, end = part.chosen
            chosen[part.start + begin : part.start + end] = True
            rejected[part.start + end : part.start + part.length] = True
    device = row.input_ids.device
    return segment.to(device), chosen.to(device), rejected.to(device)


def block_mask(row):
    """The row's :class:`BlockMask` (built on first use, then kept on the row for every layer)."""
    cached = row.cache.get("flex_block_mask")
    if cached is not None:
        return cached
    from torch.nn.attention.flex_attention import BlockMask

    segment, chosen, rejected = token_layout(row)

    def allowed(batch, head, q, k):
        return (segment[q] == segment[k]) & (k <= q) & ~(rejected[q] & chosen[k])

    padded = segment.shape[0]
    tiles = padded // BLOCK
    index = torch.arange(padded, device=segment.device)
    dense = allowed(None, None, index[:, None], index[None, :])  # [Lp, Lp]
    dense[row.length :] = False  # padded queries: their outputs are never read
    grid = dense.view(tiles, BLOCK, tiles, BLOCK)
    some, full = grid.any(dim=(1, 3)), grid.all(dim=(1, 3))
    partial = some & ~full

    def listed(which: torch.Tensor):
        counts = which.sum(-1, dtype=torch.int32)
        order = torch.argsort((~which).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[None, None], order[None, None]

    kv_num, kv_index = listed(partial)
    full_num, full_index = listed(full)
    mask = BlockMask.from_kv_blocks(kv_num, kv_index, full_num, full_index, BLOCK_SIZE=BLOCK, mask_mod=allowed,
                                    seq_lengths=(row.length, row.length))
    row.cache["flex_block_mask"] = mask
    return mask


@functools.lru_cache(maxsize=None)
def _compiled() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_attention(query, key, value, row, scaling=None, dropout: float = 0.0) -> torch.Tensor:
    """One FlexAttention call over the whole row: ``query`` [1, H, L, D], ``key``/``value``
    [1, H_kv, L, D] (grouped-query heads are served by FlexAttention itself). Returns [1, L, H, D]."""
    if dropout:
        raise ValueError("model.attention=flex: FlexAttention has no attention dropout; the model's "
                         f"attention_dropout is {dropout}. Use model.attention=segments.")
    if query.device.type == "cpu" and torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        raise ValueError(f"model.attention=flex: PyTorch's FlexAttention (torch {torch.__version__}) has no backward "
                         "pass on CPU, so it cannot train there; use model.attention=segments or auto "
                         "(flex still serves a CPU reference pass, which needs no gradients)")
    groups = query.shape[1] // key.shape[1]
    out = _compiled()(query, key, value, block_mask=block_mask(row), scale=scaling, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous()


def resolve(mode: str, query, key, value, row, segments: Callable, scaling=None) -> str:
    """``segments`` or ``flex`` for this call. ``auto``: the segment loop on CPU; elsewhere the faster
    of the two, timed once per device and dtype on this call's own tensors (forward only, after one
    warm-up call each, which includes FlexAttention's compilation)."""
    if mode != "auto":
        return mode
    if query.device.type == "cpu":
        return "segments"
    key_ = (query.device.type, str(query.dtype))
    if key_ not in _chosen:
        timings = {}
        with torch.no_grad():
            candidates = {"segments": lambda: segments(query, key, value, row, 0.0, scaling),
                          "flex": lambda: flex_attention(query, key, value, row, scaling)}
            for name, run in candidates.items():
                try:
                    run()
                except Exception:  # a device or build where FlexAttention cannot run: the loop serves
                    continue
                _synchronize(query.device)
                started = time.perf_counter()
                for _ in range(3):
                    run()
                _synchronize(query.device)
                timings[name] = time.perf_counter() - started
        _chosen[key_] = min(timings, key=timings.get) if timings else "segments"
    return _chosen[key_]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
