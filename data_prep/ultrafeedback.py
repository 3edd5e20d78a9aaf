"""The UltraFeedback-binarized layout (HuggingFaceH4/ultrafeedback_binarized, splits ``train_prefs`` /
``test_prefs``), read from a local Parquet/JSON Lines file or a saved ``datasets`` folder.

Columns: ``prompt`` (str), ``prompt_id`` (str), ``chosen`` and ``rejected`` (message lists: the user's
prompt, then the assistant's response), ``score_chosen`` and ``score_rejected`` (the rating of each
response, 1-10), and ``messages`` (a copy of ``chosen``, not read).

Normalisation: the prompt is the messages ``chosen`` and ``rejected`` share at the start (the user
turn); when they share none (a variant that stores only the responses), the prompt is the ``prompt``
string as one user message. Equal scores make the pair a tie (``is_tie``); a chosen score below the
rejected one is a ``bad value``. The pair id is ``<file stem>:<row>``; ``prompt_id`` is kept in
``extra`` and is what the held-out split hashes, so one prompt never lands in both splits.
"""

from __future__ import annotations

import math
from typing import Any

from .drops import BAD_VALUE, WRONG_TYPE, BadRow, describe
from .normalize import Row, as_text, make_pair, parse_id, split_implicit
from .schema import PreferencePair

COLUMNS = ("prompt", "prompt_id", "chosen", "rejected", "score_chosen", "score_rejected", "id")
OPTIONS: dict = {}


def _score(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRow(WRONG_TYPE, field, f"expected a finite number, got {describe(value)}")
    if not math.isfinite(value):
        raise BadRow(BAD_VALUE, field, f"expected a finite number, got {describe(value)}")
    return float(value)


def ultrafeedback_pair(row: Row, *, file: str, row_index: int, stem: str) -> PreferencePair:
    chosen_field, rejected_field = row.label("chosen"), row.label("rejected")
    chosen = as_text(row.require("chosen"), chosen_field)
    rejected = as_text(row.require("rejected"), rejected_field)
    for name, value in ((chosen_field, chosen), (rejected_field, rejected)):
        if not isinstance(value, list):
            raise BadRow(WRONG_TYPE, name, "expected a message list (UltraFeedback-binarized layout), got a string")
    score_chosen = _score(row.require("score_chosen"), row.label("score_chosen"))
    score_rejected = _score(row.require("score_rejected"), row.label("score_rejected"))
    if score_chosen < score_rejected:
        raise BadRow(
            BAD_VALUE, row.label("score_chosen"), f"chosen scored {score_chosen} below rejected ({score_rejected})"
        )
    prompt_id = row.get("prompt_id")
    extra = {"score_chosen": score_chosen, "score_rejected": score_rejected}
    if prompt_id is not None:
        extra["prompt_id"] = str(prompt_id)
        extra["split_key"] = f"prompt_id:{prompt_id}"
    shared, _, _ = split_implicit(chosen, rejected)
    prompt = None  # implicit: the shared leading messages
    if not shared and chosen != rejected:
        text = row.require("prompt")
        if not isinstance(text, str):
            raise BadRow(WRONG_TYPE, row.label("prompt"), f"expected the prompt as a string, got {describe(text)}")
        prompt = [{"role": "user", "content": text}]
    return make_pair(
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        id=parse_id(row.get("id"), row.label("id"), f"{stem}:{row_index}"),
        fields=(row.label("prompt"), chosen_field, rejected_field),
        is_tie=score_chosen == score_rejected,
        source_file=file,
        source_row=row_index,
        extra=extra,
    )
