"""Tokenize preference pairs: ``prompt + completion`` ids per side and where the completion starts.

**Rendering.** Conversational pairs (message lists) go through a chat template unless
``chat_template="none"``: ``"auto"`` uses the tokenizer's own, any other string is used as the Jinja
template. The prompt is rendered with ``add_generation_prompt=True`` when the completion opens with an
assistant message; the completion text is what the rendering of prompt + completion adds after that,
and the rendered conversation must start with the rendered prompt (else the row is bad: the template
rewrites earlier turns, e.g. drops reasoning, and no boundary exists). Templated text is tokenized with
``add_special_tokens=False``: the template writes its own BOS and end-of-turn tokens.

Plain text (strings, or messages with ``chat_template="none"``, written as HH-style
``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` with ``user``/``assistant`` shown as Human/Assistant) gets the
tokenizer's BOS in front when the tokenizer adds one itself, and its EOS after the completion, each
once (not when the text already starts or ends with it).

**Boundary.** Prompt and completion are tokenized together, as the model will see them, and the
offset mapping places the boundary: the completion starts at the first token that ends after the last
prompt character. A token that a BPE merges across the boundary (prompt ``"... the c"``, completion
``"at sat"``) therefore counts as completion, so the completion's log-prob covers all its characters.
Each side has its own boundary, since a merge may happen on one side only.

**Truncation.** A prompt longer than ``max_prompt_length`` tokens keeps its last tokens (``keep_end``,
the most recent turns; when the tokenizer adds BOS by itself, a leading BOS stays in front) or its
first (``keep_start``); ``max_prompt_length=None`` sets no prompt limit. The completion is
then cut to fit ``max_length``. A row is bad when a completion is cut to nothing (possible when
``max_prompt_length >= max_length`` or is None), when a completion has no tokens at all, or when the prompt has
none (the first completion token would have nothing to be predicted from).
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Sequence, Tuple

from .errors import DataError

from .drops import (
    EMPTY_COMPLETION,
    EMPTY_PROMPT,
    TEMPLATE_ERROR,
    TEMPLATE_NOT_PREFIX,
    TRUNCATED_TO_NOTHING,
    BadRow,
    DropReport,
    RowPolicy,
)
from .schema import PreferencePair, Text, TokenizedPair

TRUNCATION_MODES = ("keep_end", "keep_start")
_PLAIN_ROLES = {"user": "Human", "assistant": "Assistant"}


@dataclass
class _Side:
    prompt: str
    completion: str
    templated: bool


def plain_dialogue(messages: Sequence[dict]) -> str:
    """Messages as HH-style text: ``"\\n\\nHuman: hi\\n\\nAssistant: hello"``."""
    return "".join(f"\n\n{_PLAIN_ROLES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages)


def _render(tokenizer: Any, pair: PreferencePair, side: str, chat_template: str, prompt_cache: dict) -> _Side:
    completion: Text = getattr(pair, side)
    prompt: Text = pair.prompt
    if isinstance(completion, str):
        return _Side(prompt, completion, templated=False)
    generation = bool(completion) and completion[0]["role"] == "assistant"
    if chat_template == "none":
        # "\n\nAssistant: text": the marker ends the prompt, the space after it starts the completion.
        if generation:
            prompt_text = plain_dialogue(prompt) + "\n\nAssistant:"
            completion_text = " " + completion[0]["content"] + plain_dialogue(completion[1:])
        else:
            prompt_text, completion_text = plain_dialogue(prompt), plain_dialogue(completion)
        return _Side(prompt_text, completion_text, templated=False)
    template = None if chat_template == "auto" else chat_template
    # Both sides of a pair (and, in data like VADER's, many pairs) share a prompt: render it once.
    key = (json.dumps(prompt, sort_keys=True), generation)
    try:
        if key not in prompt_cache:
            prompt_cache[key] = tokenizer.apply_chat_template(
                list(prompt), tokenize=False, add_generation_prompt=generation, chat_template=template
            )
        prompt_text = prompt_cache[key]
        full = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False, chat_template=template)
    except Exception as err:  # jinja2 errors, or the template's own raise_exception (roles must alternate, ...)
        raise BadRow(TEMPLATE_ERROR, side, f"{type(err).__name__}: {err}") from None
    if not full.startswith(prompt_text):
        raise BadRow(TEMPLATE_NOT_PREFIX, side, f"rendered prompt ends with {prompt_text[-40:]!r}, conversation has {full[len(prompt_text) - 40:len(prompt_text) + 20]!r}")
    return _Side(prompt_text, full[len(prompt_text):], templated=True)


def _token_end(offset: Tuple[int, int]) -> int:
    return offset[1]


def _uses_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of text by itself (then plain text gets it too)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(without) and with_special[0] == bos


def _batched(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _truncate(
    ids: List[int], start: int, *, max_length: int, max_prompt_length: Optional[int], mode: str, keep_bos: Optional[int]
) -> Tuple[List[int], int, bool, bool]:
    prompt, completion = ids[:start], ids[start:]
    prompt_cut = max_prompt_length is not None and len(prompt) > max_prompt_length
    if prompt_cut:
        if mode == "keep_start":
            prompt = prompt[:max_prompt_length]
        elif keep_bos is not None and prompt[0] == keep_bos and max_prompt_length > 1:
            prompt = prompt[:1] + prompt[len(prompt) - (max_prompt_length - 1) :]
        else:
            prompt = prompt[len(prompt) - max_prompt_length :]
    room = max(0, max_length - len(prompt))
    completion_cut = len(completion) > room
    completion = completion[:room]
    return prompt + completion, len(prompt), prompt_cut, completion_cut


def _finish_side(
    name: str, ids: List[int], start: int, *, max_length: int, max_prompt_length: Optional[int], mode: str,
    keep_bos: Optional[int],
) -> Tuple[List[int], int, bool, bool]:
    """Check one side's tokens and truncate them: (ids, completion start, prompt cut?, completion cut?).
    Raises BadRow for a side that cannot be scored."""
    if start == len(ids):
        raise BadRow(EMPTY_COMPLETION, name, "the completion has no tokens")
    if start == 0:
        raise BadRow(
            EMPTY_PROMPT, name,
            "the prompt has no tokens and the tokenizer adds no BOS, so the first completion token cannot be scored",
        )
    ids, start, prompt_cut, completion_cut = _truncate(
        ids, start, max_length=max_length, max_prompt_length=max_prompt_length, mode=mode, keep_bos=keep_bos
    )
    if start == len(ids):
        raise BadRow(
            TRUNCATED_TO_NOTHING, name,
            f"the prompt keeps {start} tokens and max_length is {max_length} (max_prompt_length={max_prompt_length})",
        )
    return ids, start, prompt_cut, completion_cut


def tokenize_pairs(
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    *,
    max_length: int = 512,
    max_prompt_length: Optional[int] = 256,
    truncation_mode: str = "keep_end",
    chat_template: str = "auto",
    on_bad_row: str = "error",
    drops: Optional[DropReport] = None,
    batch_size: int = 512,
) -> List[TokenizedPair]:
    """Tokenize ``pairs`` (see module doc); returns the good ones in order.

    Bad rows raise :class:`DataError` naming file, row and side (``on_bad_row="error"``) or are added to
    ``drops`` (``"skip"``). ``drops.notes`` also counts truncated prompts and completions.
    """
    if truncation_mode not in TRUNCATION_MODES:
        raise DataError(f"`prep.truncation_mode`: {truncation_mode!r} is not one of {', '.join(TRUNCATION_MODES)}")
    if max_length < 1 or (max_prompt_length is not None and max_prompt_length < 1) or batch_size < 1:
        raise DataError(
            f"max_length, max_prompt_length and batch_size must be >= 1, got {max_length}, {max_prompt_length}, {batch_size}"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"the tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer; the prompt/completion boundary "
            "needs offset mappings (load it with AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    if chat_template == "auto" and any(p.conversational for p in pairs) and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the data is conversational but the tokenizer has no chat template; set prep.chat_template to a "
            "Jinja template, or to 'none' to write the turns as plain 'Human:/Assistant:' text"
        )
    policy = RowPolicy(on_bad_row, drops)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = _uses_bos(tokenizer)

    # 1. Render each side to (prompt text, completion text); a side that cannot be rendered is bad.
    rendered: List[Optional[Tuple[_Side, _Side]]] = []
    prompt_cache: dict = {}
    for pair in pairs:
        try:
            rendered.append(tuple(_render(tokenizer, pair, side, chat_template, prompt_cache) for side in ("chosen", "rejected")))
        except BadRow as bad:
            policy.bad_row(pair.source_file, pair.source_row, bad)
            rendered.append(None)

    # 2. Tokenize prompt + completion jointly, in batches, with offsets.
    sides = [side for r in rendered if r is not None for side in r]
    ids_and_starts: List[Tuple[List[int], int]] = []
    for chunk in _batched(sides, batch_size):
        encoded = tokenizer(
            [s.prompt + s.completion for s in chunk],
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
        )
        for side, ids, offsets in zip(chunk, encoded["input_ids"], encoded["offset_mapping"]):
            # First token ending after the prompt's last character (token ends never decrease).
            start = bisect.bisect_right(offsets, len(side.prompt), key=_token_end)
            ids = list(ids)
            if not side.templated:
                if add_bos and not (ids and ids[0] == bos):
                    ids.insert(0, bos)
                    start += 1
                if eos is not None and len(ids) > start and ids[-1] != eos:
                    ids.append(eos)
            ids_and_starts.append((ids, start))

    # 3. Truncate and check each side; rendered pairs have their two sides next to each other.
    out: List[TokenizedPair] = []
    cuts = {"prompt": 0, "completion": 0}
    tokenized = iter(ids_and_starts)
    for pair, r in zip(pairs, rendered):
        if r is None:
            continue
        raw_sides = (next(tokenized), next(tokenized))
        try:
            finished = [
                _finish_side(name, ids, start, max_length=max_length, max_prompt_length=max_prompt_length,
                             mode=truncation_mode, keep_bos=bos if add_bos else None)
                for name, (ids, start) in zip(("chosen", "rejected"), raw_sides)
            ]
        except BadRow as bad:
            policy.bad_row(pair.source_file, pair.source_row, bad)
            continue
        (chosen_ids, chosen_start, *chosen_cuts), (rejected_ids, rejected_start, *rejected_cuts) = finished
        cuts["prompt"] += chosen_cuts[0] + rejected_cuts[0]
        cuts["completion"] += chosen_cuts[1] + rejected_cuts[1]
        out.append(TokenizedPair(pair, chosen_ids, chosen_start, rejected_ids, rejected_start))
    if drops is not None:
        drops.note("prompt sides truncated to max_prompt_length", cuts["prompt"])
        drops.note("completion sides truncated to fit max_length", cuts["completion"])
    return out
