"""The HH-RLHF layout (Bai et al. 2022; github.com/anthropics/hh-rlhf): ``{"chosen": str, "rejected": str}``.

Each string is a whole dialogue, turns introduced by ``"\\n\\nHuman:"`` and ``"\\n\\nAssistant:"``::

    "\\n\\nHuman: How do I ...?\\n\\nAssistant: You could ...\\n\\nHuman: And ...?\\n\\nAssistant: <response>"

The two dialogues of a row share every turn up to the final assistant turn, which is the response
being compared. The prompt is those shared turns; the completion is the final assistant turn.

Options: ``as_messages`` (default true) converts each dialogue into a message list (Human -> ``user``,
Assistant -> ``assistant``, each turn's text stripped of the spaces around it), for the tokenizer's
chat template. With ``as_messages: false`` the raw text is kept: the prompt is the dialogue up to and
including the final ``"\\n\\nAssistant:"`` (the implicit prompt of the DPO paper's HH setup) and the
completion is the rest of each string, its leading space included.

Row checks beyond the generic ones: a dialogue that does not start with a Human turn or does not end
with an Assistant turn is ``not an HH-RLHF dialogue``; two dialogues whose turns before their final
assistant turn differ (the preference is then not about one response to one prompt) are
``dialogues diverge before the final assistant turn``.
"""

from __future__ import annotations

import re
from typing import List

from .drops import HH_DIVERGED, NOT_HH_DIALOGUE, WRONG_TYPE, BadRow
from .normalize import Row, as_text, make_pair, parse_id
from .schema import Message, PreferencePair

COLUMNS = ("chosen", "rejected", "id")
OPTIONS = {"as_messages": True}

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_dialogue(text: str, field: str) -> List[Message]:
    """The turns of an HH dialogue as messages; raises BadRow when ``text`` is not one."""
    if not text.startswith(HUMAN):
        raise BadRow(NOT_HH_DIALOGUE, field, f"does not start with {HUMAN!r}: {text[:40]!r}")
    pieces = _TURN.split(text)
    # re.split with one group: ["", role, content, role, content, ...]; the leading piece is empty
    # because the text starts with a marker.
    turns = [{"role": _ROLES[pieces[i]], "content": pieces[i + 1].strip()} for i in range(1, len(pieces), 2)]
    if turns[-1]["role"] != "assistant":
        raise BadRow(NOT_HH_DIALOGUE, field, f"does not end with an assistant turn ({ASSISTANT!r})")
    return turns


def hh_pair(row: Row, *, file: str, row_index: int, stem: str, as_messages: bool) -> PreferencePair:
    chosen_field, rejected_field = row.label("chosen"), row.label("rejected")
    chosen = as_text(row.require("chosen"), chosen_field)
    rejected = as_text(row.require("rejected"), rejected_field)
    for name, value in ((chosen_field, chosen), (rejected_field, rejected)):
        if not isinstance(value, str):
            raise BadRow(WRONG_TYPE, name, "expected the dialogue as one string, got a message list")
    chosen_turns = parse_dialogue(chosen, chosen_field)
    rejected_turns = parse_dialogue(rejected, rejected_field)
    if chosen_turns[:-1] != rejected_turns[:-1]:
        shared = 0
        while chosen_turns[shared] == rejected_turns[shared]:
            shared += 1
        raise BadRow(
            HH_DIVERGED,
            rejected_field,
            f"turn {shared} differs ({len(chosen_turns)} turns in {chosen_field}, {len(rejected_turns)} in "
            f"{rejected_field}); the final assistant turn is turn {len(chosen_turns) - 1}",
        )
    if as_messages:
        prompt, chosen_out, rejected_out = chosen_turns[:-1], chosen_turns[-1:], rejected_turns[-1:]
    else:
        cut_c, cut_r = chosen.rfind(ASSISTANT) + len(ASSISTANT), rejected.rfind(ASSISTANT) + len(ASSISTANT)
        prompt, chosen_out, rejected_out = chosen[:cut_c], chosen[cut_c:], rejected[cut_r:]
        if chosen[:cut_c] != rejected[:cut_r]:
            # Same turns once stripped, different spacing in the raw text: the raw prompts must match.
            raise BadRow(HH_DIVERGED, rejected_field, "the raw text before the final assistant turn differs in whitespace")
    return make_pair(
        prompt=prompt,
        chosen=chosen_out,
        rejected=rejected_out,
        id=parse_id(row.get("id"), row.label("id"), f"{stem}:{row_index}"),
        fields=("prompt", chosen_field, rejected_field),
        source_file=file,
        source_row=row_index,
    )
