"""Turn one raw row into a validated :class:`~data_prep.schema.PreferencePair` (TRL's schema).

Accepted layouts (TRL's preference formats):

* **standard**: ``prompt``, ``chosen``, ``rejected`` are strings; ``chosen``/``rejected`` are the
  completions only.
* **conversational**: the same fields are lists of ``{"role", "content"}`` messages (other keys of a
  message are kept and reach the chat template unchanged).
* **implicit prompt**: no ``prompt`` field; ``chosen`` and ``rejected`` are whole texts and the prompt
  is their shared beginning (:func:`split_implicit`).

Optional fields: ``id`` (string or integer; default ``<file stem>:<row>``), ``tie`` (boolean, or 0/1),
``weight`` (finite number >= 0, default 1), ``soft_label`` (P(chosen preferred), a number in [0, 1]).
``data.columns`` renames source columns onto these names.

Checks (each a :class:`~data_prep.drops.BadRow` with its reason): a required field is missing or null
(a ``prompt`` field that is present counts as required: leave it out for an implicit prompt);
a field has the wrong type (a number for text, a malformed message list, text for a weight); a
message's role is not one of system, user, assistant, tool (bad role); prompt and completions mix
strings and messages; an optional field has a bad value (out of range); a completion is empty (or
whitespace only, or an empty message list); chosen is identical to rejected.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import DataError

from .drops import (
    BAD_ROLE,
    BAD_VALUE,
    EMPTY_COMPLETION,
    IDENTICAL,
    MISSING_FIELD,
    MIXED_FORMATS,
    NO_SHARED_PROMPT,
    NOT_A_COMPLETION,
    WRONG_TYPE,
    UNDECODABLE,
    BadRow,
    describe,
)
from .schema import PreferencePair, Text

# The field names of TRL's schema that `data.columns` may remap (preprocessors add their own).
PAIR_FIELDS = ("prompt", "chosen", "rejected", "id", "tie", "weight", "soft_label")
# The marker before an assistant turn in HH-style text; an implicit text prompt ends right after it.
ASSISTANT_MARKER = "\n\nAssistant:"


class Row:
    """A raw row seen through ``data.columns``: ``row.get("chosen")`` reads the mapped source column,
    and errors name the column as it is spelled in the file."""

    def __init__(self, values: Mapping[str, Any], columns: Mapping[str, str]):
        self.values = values
        self.columns = columns

    def source_name(self, name: str) -> str:
        return self.columns.get(name, name)

    def label(self, name: str) -> str:
        """The field as named in messages: the source column, with the schema name when renamed."""
        source = self.source_name(name)
        return source if source == name else f"{source} (as {name})"

    def _check_mapped(self, name: str) -> None:
        """A column the user named in ``data.columns`` must exist: its absence is an error, not "not given"."""
        if name in self.columns and self.columns[name] not in self.values:
            raise BadRow(MISSING_FIELD, self.label(name), f"column named by data.columns.{name} is missing")

    def has(self, name: str) -> bool:
        self._check_mapped(name)
        return self.source_name(name) in self.values

    def get(self, name: str, default: Any = None) -> Any:
        self._check_mapped(name)
        return self.values.get(self.source_name(name), default)

    def require(self, name: str) -> Any:
        value = self.get(name)
        if value is None:
            state = "is null" if self.has(name) else "is missing"
            raise BadRow(MISSING_FIELD, self.label(name), f"required field {state}")
        return value


def check_columns(columns: Mapping[str, str], allowed: Sequence[str], preprocessor: str) -> Dict[str, str]:
    """``data.columns`` as a plain dict, every key one the preprocessor reads (else a DataError)."""
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(allowed))
    if unknown:
        raise DataError(
            "; ".join(f"`data.columns.{k}`: not a field the {preprocessor} preprocessor reads" for k in unknown)
            + f" (it reads: {', '.join(allowed)})"
        )
    for key, value in columns.items():
        if not isinstance(value, str) or not value:
            raise DataError(f"`data.columns.{key}`: expected a column name, got {describe(value)}")
    return columns


# ==================================================================== text values


def check_encodable(values: Any, field: Optional[str] = None) -> None:
    """A string that cannot be written as UTF-8 (a lone surrogate, from a ``\\ud800`` escape in JSON)
    is undecodable text; raise :class:`BadRow` naming the field."""
    if isinstance(values, str):
        try:
            values.encode("utf-8")
        except UnicodeEncodeError as err:
            raise BadRow(UNDECODABLE, field, f"not valid Unicode text: {values[err.start]!r} at character "
                         f"{err.start} (a lone surrogate)") from None
    elif isinstance(values, Mapping):
        for key, value in values.items():
            check_encodable(value, str(key) if field is None else field)
            check_encodable(key, field)
    elif isinstance(values, (list, tuple)):
        for value in values:
            check_encodable(value, field)


# The roles a message may have: those chat templates render (OpenAI's and TRL's conversational format).
ROLES = ("system", "user", "assistant", "tool")


def as_text(value: Any, field: str, *, allow_empty_list: bool = False) -> Text:
    """A string, or a list of messages with a ``role`` in :data:`ROLES` and a string ``content``.

    An empty list is an empty completion unless ``allow_empty_list`` (a prompt may be empty)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, (list, tuple)):
        raise BadRow(WRONG_TYPE, field, f"expected a string or a list of {{role, content}} messages, got {describe(value)}")
    if not value and not allow_empty_list:
        raise BadRow(EMPTY_COMPLETION, field, "the message list is empty")
    messages: List[Dict[str, Any]] = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise BadRow(WRONG_TYPE, field, f"message {i} is not an object: {describe(message)}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise BadRow(WRONG_TYPE, field, f"message {i} has no string 'role' (got {describe(role)})")
        if role not in ROLES:
            # A chat template renders whatever role it is given; an unknown one is a data error, not a turn.
            raise BadRow(BAD_ROLE, field, f"message {i} has role {role!r}; a role is one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise BadRow(WRONG_TYPE, field, f"message {i} has no string 'content' (got {describe(content)})")
        messages.append(dict(message))
    return messages


def is_blank(text: Text) -> bool:
    if isinstance(text, str):
        return not text.strip()
    return not any(m["content"].strip() for m in text)


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    # Compare in blocks first: the shared prompt of a dialogue is usually most of the text.
    step = 256
    while i + step <= n and a[i : i + step] == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


def split_implicit(chosen: Text, rejected: Text) -> Tuple[Text, Text, Text]:
    """(prompt, chosen completion, rejected completion) from two whole texts sharing a beginning.

    Messages: the prompt is the leading messages both lists share. Strings: the longest common prefix,
    cut back to a boundary so no word is split between prompt and completion: right after the last
    ``"\\n\\nAssistant:"`` in it when there is one (HH-style dialogue), else before the last run of
    whitespace in it (the completion then starts with that whitespace, as word-initial tokens of BPE
    vocabularies do); with neither, the prompt is empty.
    """
    if isinstance(chosen, list):
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        return chosen[:k], chosen[k:], rejected[k:]
    prefix = chosen[: _common_prefix_length(chosen, rejected)]
    marker = prefix.rfind(ASSISTANT_MARKER)
    if marker >= 0:
        cut = marker + len(ASSISTANT_MARKER)
    else:
        last_space = max((i for i in range(len(prefix) - 1, -1, -1) if prefix[i].isspace()), default=-1)
        cut = len(prefix[: last_space + 1].rstrip()) if last_space >= 0 else 0
    return chosen[:cut], chosen[cut:], rejected[cut:]


# ==================================================================== optional fields


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_tie(value: Any, field: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if _number(value) and value in (0, 1):
        return bool(value)
    reason = BAD_VALUE if _number(value) else WRONG_TYPE
    raise BadRow(reason, field, f"expected true/false (or 0/1), got {describe(value)}")


# Weights are stored as float32: anything larger would become inf in the cache.
FLOAT32_MAX = 3.4028234663852886e38


def parse_weight(value: Any, field: str) -> float:
    if value is None:
        return 1.0
    if not _number(value) or not math.isfinite(value) or value < 0 or value > FLOAT32_MAX:
        raise BadRow(BAD_VALUE if _number(value) else WRONG_TYPE, field,
                     f"expected a finite number >= 0 (at most {FLOAT32_MAX:.4g}, float32), got {describe(value)}")
    return float(value)


def parse_soft_label(value: Any, field: str) -> Optional[float]:
    if value is None:
        return None
    if not _number(value) or not 0.0 <= value <= 1.0:
        raise BadRow(BAD_VALUE if _number(value) else WRONG_TYPE, field,
                     f"expected a probability in [0, 1], got {describe(value)}")
    return float(value)


def parse_id(value: Any, field: str, default: str) -> str:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadRow(WRONG_TYPE, field, f"expected a string or integer id, got {describe(value)}")
    value = str(value)
    if not value.strip():
        raise BadRow(BAD_VALUE, field, "the id is empty")
    return value


# ==================================================================== the pair


def make_pair(
    *,
    prompt: Optional[Text],
    chosen: Text,
    rejected: Text,
    id: str,
    fields: Tuple[str, str, str] = ("prompt", "chosen", "rejected"),
    is_tie: bool = False,
    weight: float = 1.0,
    soft_label: Optional[float] = None,
    source_file: str = "",
    source_row: int = -1,
    extra: Optional[Dict[str, Any]] = None,
) -> PreferencePair:
    """Check the three texts against each other and build the pair; ``prompt=None`` means implicit.

    ``fields`` are the names used in messages for prompt, chosen and rejected.
    """
    prompt_field, chosen_field, rejected_field = fields
    conversational = isinstance(chosen, list)
    if isinstance(rejected, list) != conversational:
        raise BadRow(MIXED_FORMATS, rejected_field, f"{chosen_field} is {_kind(chosen)} but {rejected_field} is {_kind(rejected)}")
    if prompt is not None and isinstance(prompt, list) != conversational:
        raise BadRow(MIXED_FORMATS, prompt_field, f"{prompt_field} is {_kind(prompt)} but {chosen_field} is {_kind(chosen)}")
    if chosen == rejected:
        raise BadRow(IDENTICAL, rejected_field, f"{rejected_field} is identical to {chosen_field}")
    implicit = prompt is None
    if implicit:
        prompt, chosen, rejected = split_implicit(chosen, rejected)
        if is_blank(prompt):
            raise BadRow(NO_SHARED_PROMPT, rejected_field,
                         f"{chosen_field} and {rejected_field} share no prompt (no common beginning to split off); "
                         "give the prompt in its own column")
    if conversational:
        for name, completion in ((chosen_field, chosen), (rejected_field, rejected)):
            roles = [m["role"] for m in completion]
            if roles and (roles[0] != "assistant" or "user" in roles):
                raise BadRow(NOT_A_COMPLETION, name,
                             f"a completion is the assistant's reply: its turns are {roles}, expected 'assistant' "
                             "first and no 'user' turn (put earlier turns in the prompt)")
    for name, completion in ((chosen_field, chosen), (rejected_field, rejected)):
        if is_blank(completion):
            where = " once the shared prompt is split off" if implicit else ""
            raise BadRow(EMPTY_COMPLETION, name, f"the completion is empty{where}")
    return PreferencePair(
        id=id,
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        is_tie=is_tie,
        weight=weight,
        soft_label=soft_label,
        source_file=source_file,
        source_row=source_row,
        extra=extra or {},
    )


def _kind(text: Any) -> str:
    return "a message list" if isinstance(text, list) else "a string"


def generic_pair(row: Row, *, file: str, row_index: int, stem: str) -> PreferencePair:
    """The generic preprocessor: TRL's schema, explicit or implicit prompt (see module doc)."""
    chosen = as_text(row.require("chosen"), row.label("chosen"))
    rejected = as_text(row.require("rejected"), row.label("rejected"))
    prompt: Optional[Text] = None
    if row.has("prompt"):
        prompt = as_text(row.require("prompt"), row.label("prompt"), allow_empty_list=True)
    return make_pair(
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        id=parse_id(row.get("id"), row.label("id"), f"{stem}:{row_index}"),
        fields=(row.label("prompt"), row.label("chosen"), row.label("rejected")),
        is_tie=parse_tie(row.get("tie"), row.label("tie")),
        weight=parse_weight(row.get("weight"), row.label("weight")),
        soft_label=parse_soft_label(row.get("soft_label"), row.label("soft_label")),
        source_file=file,
        source_row=row_index,
    )


def heldout_by_hash(key: str, fraction: float) -> bool:
    """Deterministic membership of the held-out split: sha256 of ``key`` read as a number in [0, 1)."""
    if fraction <= 0:
        return False
    value = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return value < fraction
