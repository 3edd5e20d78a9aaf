"""Bad rows: the reasons a row can be rejected, the drop report, and the ``on_bad_row`` policy.

Every check in ``data_prep`` that rejects a row raises :class:`BadRow` (reason, field, detail). The
caller hands it to a :class:`RowPolicy`, which either stops with a :class:`~data_prep.errors.DataError`
naming file, row and field (``on_bad_row: error``) or records the row in a :class:`DropReport`
(``on_bad_row: skip``). Nothing else drops rows, so ``DropReport.total`` plus the pairs kept always
accounts for every row read.

Rows are numbered from 0 in the order of the file (for JSON Lines: the 0-based line index, so row N is
line N+1 in an editor).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import DataError

# --- reasons (stable strings: they are the keys of DropReport.counts, appear in reports and errors, and
# are listed in the README; each names its category the way a user would search for it) -------------
MALFORMED_JSON = "malformed JSON"
UNDECODABLE = "undecodable text"
NOT_AN_OBJECT = "row is not an object"
MALFORMED_LINE = "malformed line"
MISSING_FIELD = "missing field"
WRONG_TYPE = "wrong type"  # a number where text is expected, a malformed message list, text for a weight
MIXED_FORMATS = "mixed text and messages"
BAD_VALUE = "bad value"  # the right type, out of range (a negative weight, chosen scored below rejected)
BAD_ROLE = "bad role"  # a message role other than system, user, assistant, tool
EMPTY_COMPLETION = "empty completion"
EMPTY_PROMPT = "empty prompt"  # the prompt has no tokens to predict the first completion token from
IDENTICAL = "chosen identical to rejected"
NO_SHARED_PROMPT = "no shared prompt"
NOT_A_COMPLETION = "completion is not an assistant reply"
DUPLICATE_ID = "duplicate id"
DUPLICATE_ROW = "duplicate row"  # an exact copy of an earlier row (dropped only with data.drop_duplicate_rows)
NOT_HH_DIALOGUE = "not an HH-RLHF dialogue"
HH_DIVERGED = "dialogues diverge before the final assistant turn"
UNMATCHED_SNIPPET = "snippet without ratings"
TEMPLATE_ERROR = "chat template rejected the messages"
TEMPLATE_NOT_PREFIX = "chat template output does not start with the rendered prompt"
TRUNCATED_TO_NOTHING = "completion truncated to nothing"
# Every reason, in the order the README lists them.
REASONS = (
    MISSING_FIELD, WRONG_TYPE, BAD_VALUE, BAD_ROLE, MIXED_FORMATS, EMPTY_PROMPT, EMPTY_COMPLETION, IDENTICAL,
    NO_SHARED_PROMPT, NOT_A_COMPLETION, DUPLICATE_ID, DUPLICATE_ROW, TRUNCATED_TO_NOTHING, TEMPLATE_ERROR,
    TEMPLATE_NOT_PREFIX, MALFORMED_JSON, UNDECODABLE, NOT_AN_OBJECT, NOT_HH_DIALOGUE, HH_DIVERGED,
    MALFORMED_LINE, UNMATCHED_SNIPPET,
)

ON_BAD_ROW = ("error", "skip")
_DETAIL_CHARS = 300  # details quote data; keep reports readable


@dataclass
class BadRow(Exception):
    """Raised by a check that rejects a row; the file and row are added by whoever reads the row."""

    reason: str
    field: Optional[str] = None
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.reason} ({self.field}): {self.detail}"


def describe(value: Any, limit: int = 60) -> str:
    """A short, type-revealing description of a bad value for error messages."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(value).__name__} {text}"


def location(file: str, row: Optional[int], field: Optional[str]) -> str:
    where = f"{file}"
    if row is not None and row >= 0:
        where += f", row {row} (0-based)"
    if field:
        where += f", field '{field}'"
    return where


class DropReport:
    """What was dropped, by reason, and each dropped row (file, row, field, reason, detail).

    ``notes`` counts things that changed rows without dropping them (e.g. truncated prompts, pairs
    beyond ``max_train_pairs``, merged duplicate snippets), so a report explains every count.
    ``rows_read`` maps each file to the number of rows read from it.
    """

    def __init__(self) -> None:
        self.rows: List[Dict[str, Any]] = []
        self._counts: Counter = Counter()
        self.notes: Counter = Counter()
        self.rows_read: Dict[str, int] = {}

    def add(self, file: str, row: Optional[int], field: Optional[str], reason: str, detail: str = "") -> None:
        if len(detail) > _DETAIL_CHARS:
            detail = detail[: _DETAIL_CHARS - 3] + "..."
        self.rows.append({"file": str(file), "row": row, "field": field, "reason": reason, "detail": detail})
        self._counts[reason] += 1

    def note(self, what: str, n: int = 1) -> None:
        if n:
            self.notes[what] += n

    @property
    def counts(self) -> Dict[str, int]:
        """reason -> number of dropped rows, most frequent first."""
        return dict(self._counts.most_common())

    @property
    def total(self) -> int:
        return len(self.rows)

    def summary(self) -> str:
        read = sum(self.rows_read.values())
        if self.total == 0:
            head = f"no rows dropped ({read} read)" if read else "no rows dropped"
        else:
            share = f" of {read} read ({100.0 * self.total / read:.2f}%)" if read else ""
            head = f"dropped {self.total} rows{share}"
        lines = [head]
        lines += [f"  {n:>7}  {reason}" for reason, n in self.counts.items()]
        if self.notes:
            lines.append("notes:")
            lines += [f"  {n:>7}  {what}" for what, n in sorted(self.notes.items())]
        return "\n".join(lines)

    def to_json(self) -> Dict[str, Any]:
        return {
            "total": self.total,
            "counts": self.counts,
            "rows_read": dict(self.rows_read),
            "notes": dict(sorted(self.notes.items())),
            "dropped": list(self.rows),
        }

    def write(self, path: str | Path) -> Path:
        """Write the report as JSON (atomically: a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


class RowPolicy:
    """Applies ``on_bad_row``: ``error`` raises at the first bad row, ``skip`` records it."""

    def __init__(self, on_bad_row: str, drops: Optional[DropReport]):
        if on_bad_row not in ON_BAD_ROW:
            raise DataError(f"`data.on_bad_row`: {on_bad_row!r} is not one of {', '.join(ON_BAD_ROW)}")
        if on_bad_row == "skip" and drops is None:
            raise ValueError("on_bad_row='skip' needs a DropReport to record the dropped rows in")
        self.on_bad_row = on_bad_row
        self.drops = drops

    def bad(self, file: str, row: Optional[int], field: Optional[str], reason: str, detail: str = "") -> None:
        if self.on_bad_row == "error":
            message = f"{location(file, row, field)}: {reason}"
            if detail:
                message += f": {detail}"
            message += " (set data.on_bad_row=skip to drop bad rows and get a drop report)"
            raise DataError(message)
        self.drops.add(file, row, field, reason, detail)

    def bad_row(self, file: str, row: Optional[int], error: BadRow) -> None:
        self.bad(file, row, error.field, error.reason, error.detail)
