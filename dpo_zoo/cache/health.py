"""Prepared-set health checks: functions of tokenized rows, the tokenizer and the drop report.

``dpo-zoo doctor PREPARED_SET`` runs them on a prepared split, and the trainer runs them on its
training set before the first step (warnings, not errors: the set is valid, but probably not what was
meant). Each returns a :class:`Finding` or ``None``; the sign each reads:

* ``boundary_merged``: a side's prompt tokens in the row differ from the prompt rendered and tokenized
  alone (rows whose prompt was truncated are left out). Prep tokenizes prompt + completion together and
  counts a token merged across the boundary as completion (:mod:`data_prep.tokenize`), so the row is
  scored correctly — but at generation time the prompt is tokenized alone, so the model is trained on a
  token sequence it will never be given (typically a prompt ending in a space or a half word).
* ``double_bos``: a row starting with two BOS tokens (a template that writes BOS and a tokenizer that
  adds it again): the model never saw that sequence in pre-training.
* ``template_not_prefix``: the chat template's rendering of a prompt (with the generation prompt) is not
  a prefix of its rendering of the whole conversation, on a two-turn probe conversation, or rows that prep
  dropped for it (drop reason ``chat template output does not start with the rendered prompt``): there is
  no boundary between prompt and completion (a template that drops earlier reasoning, adds a system
  prompt only sometimes, ...).
* ``truncation_emptied``: pairs prep dropped because truncation left a completion with no token (drop
  reason ``completion truncated to nothing``), or kept sides whose completion was cut to fewer than
  ``min_completion_tokens`` tokens: the pair's preference is decided by a token or two.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from dpo_zoo.cache import format as S

TEMPLATE_NOT_PREFIX_REASON = "chat template output does not start with the rendered prompt"
TRUNCATED_REASON = "completion truncated to nothing"
PROBE_CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


TEMPLATE_HINT = ("use a template that renders earlier turns the same way whatever follows (set prep.chat_template to "
                 "a fixed Jinja template), or prep.chat_template=none for plain Human:/Assistant: text.")


@dataclass(frozen=True)
class Finding:
    """One warning: which check, at which step (None: not tied to a step), what was seen, what to try."""

    check: str
    step: Optional[int]
    message: str
    hint: str

    def render(self) -> str:
        where = f"step {self.step}: " if self.step is not None else ""
        return f"{where}{self.check}: {self.message} Try: {self.hint}"

    def as_record(self) -> Dict[str, Any]:
        return {"event": "warning", "check": self.check, "step": self.step, "message": self.message,
                "hint": self.hint}


def _example(rows: List[str]) -> str:
    return f" (e.g. pair {rows[0]})" if rows else ""


def double_bos(rows: Sequence[Dict[str, Any]], bos_token_id: Optional[int]) -> Optional[Finding]:
    """Sign: ``input_ids[0] == input_ids[1] == bos_token_id`` on either side of a row."""
    if bos_token_id is None:
        return None
    bad = [str(r[S.ID]) for r in rows
           if any(len(r[c]) > 1 and r[c][0] == r[c][1] == bos_token_id for c in (S.CHOSEN_INPUT_IDS, S.REJECTED_INPUT_IDS))]
    if not bad:
        return None
    return Finding("double_bos", None,
                   f"{len(bad)} of {len(rows)} pairs start with two BOS tokens (id {bos_token_id}){_example(bad)}.",
                   "let only one of the chat template and the tokenizer write BOS (a template that starts with the BOS "
                   "text and a tokenizer with add_bos_token=true both add it); prepare again.")


def boundary_merged(rows: Sequence[Dict[str, Any]], tokenizer: Any, chat_template: str,
                    max_prompt_length: Optional[int]) -> Optional[Finding]:
    """Sign: a side's ``input_ids[:completion_start]`` differs from its prompt rendered (as prep renders it)
    and tokenized alone, for rows whose prompt was not truncated."""
    from data_prep.schema import PreferencePair
    from data_prep.tokenize import _render, _uses_bos

    add_bos, bos = _uses_bos(tokenizer), tokenizer.bos_token_id
    cache: dict = {}
    bad, example = [], ""
    for row in rows:
        pair = PreferencePair(id=str(row[S.ID]), prompt=json.loads(row[S.PROMPT_TEXT]),
                              chosen=json.loads(row[S.CHOSEN_TEXT]), rejected=json.loads(row[S.REJECTED_TEXT]))
        for side, ids_column, start_column in (("chosen", S.CHOSEN_INPUT_IDS, S.CHOSEN_COMPLETION_START),
                                               ("rejected", S.REJECTED_INPUT_IDS, S.REJECTED_COMPLETION_START)):
            try:
                rendered = _render(tokenizer, pair, side, chat_template, cache)
            except Exception:  # a row prep kept renders; anything else is not this check's business
                continue
            alone = list(tokenizer(rendered.prompt, add_special_tokens=False)["input_ids"])
            if not rendered.templated and add_bos and not (alone and alone[0] == bos):
                alone.insert(0, bos)
            if max_prompt_length is not None and len(alone) > max_prompt_length:
                continue  # truncated: the row's prompt is a cut of it
            in_row = list(row[ids_column][: row[start_column]])
            if in_row != alone:
                bad.append(str(row[S.ID]))
                if not example:
                    example = (f"; pair {row[S.ID]}: prompt ends {rendered.prompt[-20:]!r}, completion starts "
                               f"{rendered.completion[:20]!r}")
                break
    if not bad:
        return None
    return Finding("boundary_merged", None,
                   f"in {len(bad)} of {len(rows)} pairs the tokenizer merges the prompt's last characters with the "
                   f"completion's first token, so the row's prompt tokens are not the prompt's own{example}.",
                   "end prompts at a token boundary: no trailing space or half word (move the space to the start of "
                   "the completion), or use the chat template, which ends the prompt with a special token.")


def template_not_prefix(tokenizer: Any, chat_template: str, dropped: int = 0) -> Optional[Finding]:
    """Sign: on :data:`PROBE_CONVERSATION`, the template's rendering of the first three turns with the
    generation prompt is not a prefix of the rendering of all four; or ``dropped`` > 0 rows were dropped
    by prep for that reason."""
    if chat_template == "none":
        return None if not dropped else Finding(
            "template_not_prefix", None, f"prep dropped {dropped} pairs for it.", TEMPLATE_HINT)
    template = None if chat_template == "auto" else chat_template
    problem = ""
    if template is not None or getattr(tokenizer, "chat_template", None):
        try:
            prompt = tokenizer.apply_chat_template(PROBE_CONVERSATION[:3], tokenize=False, add_generation_prompt=True,
                                                   chat_template=template)
            full = tokenizer.apply_chat_template(PROBE_CONVERSATION, tokenize=False, chat_template=template)
            if not full.startswith(prompt):
                at = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
                problem = (f"on a two-turn probe conversation the rendered prompt and the rendered conversation part "
                           f"at character {at}: prompt has {prompt[max(0, at - 15):at + 15]!r}, conversation has "
                           f"{full[max(0, at - 15):at + 15]!r}")
        except Exception as err:  # a template that rejects the probe says nothing about the data's rows
            problem = ""
            del err
    if not problem and not dropped:
        return None
    parts = [p for p in (problem, f"prep dropped {dropped} pairs for it" if dropped else "") if p]
    return Finding("template_not_prefix", None,
                   "the chat template's rendering of a prompt is not the beginning of its rendering of the whole "
                   f"conversation: {'; '.join(parts)}.", TEMPLATE_HINT)


def truncation_emptied(rows: Sequence[Dict[str, Any]], dropped: int = 0, min_completion_tokens: int = 2,
                       max_length: Optional[int] = None) -> Optional[Finding]:
    """Sign: ``dropped`` > 0 pairs lost to truncation, or kept sides whose completion, cut at
    ``max_length``, has fewer than ``min_completion_tokens`` tokens."""
    short = []
    for row in rows:
        for ids_column, start_column in ((S.CHOSEN_INPUT_IDS, S.CHOSEN_COMPLETION_START),
                                         (S.REJECTED_INPUT_IDS, S.REJECTED_COMPLETION_START)):
            ids, start = row[ids_column], row[start_column]
            cut = max_length is not None and len(ids) >= max_length
            if cut and len(ids) - start < min_completion_tokens:
                short.append(str(row[S.ID]))
                break
    if not short and not dropped:
        return None
    parts = []
    if dropped:
        parts.append(f"prep dropped {dropped} pairs whose completion truncation left empty")
    if short:
        parts.append(f"{len(short)} of {len(rows)} kept pairs have a completion cut to fewer than "
                     f"{min_completion_tokens} tokens{_example(short)}")
    return Finding("truncation_emptied", None, "; ".join(parts) + ".",
                   "raise prep.max_length, or lower prep.max_prompt_length so the prompt leaves room for the "
                   "completion (prep.truncation_mode=keep_end keeps the prompt's end).")


def prepared_set_findings(rows: Sequence[Dict[str, Any]], tokenizer: Any, *, chat_template: Optional[str],
                          max_length: Optional[int], max_prompt_length: Optional[int],
                          drop_counts: Dict[str, int], min_completion_tokens: int = 2) -> List[Finding]:
    """Every prepared-set check on ``rows`` (dicts of a prepared split's columns); ``chat_template`` None
    (a custom template whose text is unknown) leaves out the checks that re-render prompts."""
    dropped_for_template = int(drop_counts.get(TEMPLATE_NOT_PREFIX_REASON, 0))
    # With the template's text unknown, only prep's own count of such rows is read ("none" probes nothing).
    probe = chat_template if chat_template is not None else "none"
    found = [
        boundary_merged(rows, tokenizer, chat_template, max_prompt_length) if chat_template is not None else None,
        double_bos(rows, tokenizer.bos_token_id),
        template_not_prefix(tokenizer, probe, dropped_for_template),
        truncation_emptied(rows, int(drop_counts.get(TRUNCATED_REASON, 0)), min_completion_tokens, max_length),
    ]
    return [f for f in found if f is not None]


def evenly_spaced(n: int, k: int) -> List[int]:
    """``min(n, k)`` row indices spread evenly through ``range(n)`` (all of them when ``k >= n``)."""
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def template_setting(prepared: Any) -> Optional[str]:
    """The ``prep.chat_template`` a prepared split was tokenized with: ``auto`` / ``none`` from its key,
    or a custom template's text from the resolved ``config.yaml`` beside the split (checked against the
    key's hash); None when that text cannot be found."""
    from pathlib import Path

    key = prepared.key
    setting = str(key.get("chat_template_setting", "auto"))
    if setting != "custom":
        return setting
    config = Path(prepared.path).parent / "config.yaml"
    if not config.is_file():
        return None
    from omegaconf import OmegaConf

    text = OmegaConf.select(OmegaConf.load(str(config)), "prep.chat_template")
    return str(text) if text is not None and S.digest(str(text)) == key.get("chat_template") else None


def prepared_set_checks(prepared: Any, tokenizer: Any, *, max_rows: int = 512, min_completion_tokens: int = 2) -> List[Finding]:
    """The checks on a :class:`~dpo_zoo.cache.reader.PreparedSet`: its rows (``max_rows`` of them, spread
    evenly through the set: re-rendering every prompt of a large set would take minutes), its key's
    tokenization settings and its drop report (whole). A custom template whose text is not beside the
    set leaves out the two checks that re-render prompts."""
    key = prepared.key
    rows = prepared.rows(evenly_spaced(len(prepared), max_rows), [S.ID, S.PROMPT_TEXT, S.CHOSEN_TEXT, S.REJECTED_TEXT,
                                                                   S.CHOSEN_INPUT_IDS, S.REJECTED_INPUT_IDS,
                                                                   S.CHOSEN_COMPLETION_START, S.REJECTED_COMPLETION_START])
    drops = (prepared.manifest.get("drops") or {}).get("counts") or {}
    return prepared_set_findings(rows, tokenizer, chat_template=template_setting(prepared),
                                 max_length=key.get("max_length"), max_prompt_length=key.get("max_prompt_length"),
                                 drop_counts=drops, min_completion_tokens=min_completion_tokens)
