"""Whole-column checks: a problem that holds for every row of an input is one error for that input,
naming the column, not one bad row per row followed by "no training pairs left".

* **Columnar inputs** (Parquet, a saved ``datasets`` split, a Hub split) carry a schema: each column a
  preprocessor reads is checked against the kind of value it expects (:data:`KINDS`) before any row is
  read, e.g. a Parquet column of integers for ``chosen``, or a required column that is null throughout.
* **JSON inputs** have no schema: when every row of a file is a bad row for the same field and the
  same reason, and that reason is a missing field or a wrong type, the file is one error
  (:func:`whole_file_problem`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Optional, Tuple

from .errors import DataError

from .drops import MISSING_FIELD, WRONG_TYPE

# The kind of value a preprocessor reads from a column, and how it is said in messages.
KINDS = {
    "text": "text (a string, or a list of {role, content} messages)",
    "string": "a string",
    "messages": "a list of {role, content} messages",
    "number": "a number",
    "flag": "true/false (or 0/1)",
    "id": "a string or an integer",
}


def _is_string(t: Any) -> bool:
    import pyarrow.types as pt

    return pt.is_string(t) or pt.is_large_string(t) or (hasattr(pt, "is_string_view") and pt.is_string_view(t))


def _is_messages(t: Any) -> bool:
    """A list of structs with string ``role`` and ``content`` fields."""
    import pyarrow.types as pt

    if not (pt.is_list(t) or pt.is_large_list(t) or (hasattr(pt, "is_list_view") and pt.is_list_view(t))):
        return False
    item = t.value_type
    if not pt.is_struct(item):
        return False
    fields = {item.field(i).name: item.field(i).type for i in range(item.num_fields)}
    return all(name in fields and (_is_string(fields[name]) or pt.is_null(fields[name])) for name in ("role", "content"))


def _fits(kind: str, t: Any) -> bool:
    import pyarrow.types as pt

    if kind == "text":
        return _is_string(t) or _is_messages(t)
    if kind == "string":
        return _is_string(t)
    if kind == "messages":
        return _is_messages(t)
    if kind == "number":
        return pt.is_integer(t) or pt.is_floating(t) or pt.is_decimal(t)
    if kind == "flag":
        return pt.is_boolean(t) or pt.is_integer(t) or pt.is_floating(t)
    if kind == "id":
        return _is_string(t) or pt.is_integer(t)
    raise ValueError(f"unknown column kind {kind!r}")


def check_schema(source_name: str, schema: Any, kinds: Mapping[str, str], required: Tuple[str, ...],
                 columns: Mapping[str, str], preprocessor: str) -> None:
    """Raise one :class:`DataError` for the first column of ``schema`` (an Arrow schema) whose type cannot
    hold what ``preprocessor`` reads from it. ``kinds``: schema field -> kind; ``columns``: data.columns."""
    import pyarrow.types as pt

    for field, kind in kinds.items():
        column = columns.get(field, field)
        index = schema.get_field_index(column)
        if index < 0:
            continue  # absent: a missing required column is reported by the caller
        arrow_type = schema.field(index).type
        label = column if column == field else f"{column} (as {field})"
        if pt.is_null(arrow_type):
            if field in required:
                raise DataError(f"{source_name}: column '{label}' is null in every row (type null); the "
                                f"{preprocessor} preprocessor needs {KINDS[kind]} there: {MISSING_FIELD} for the whole file")
            continue
        if not _fits(kind, arrow_type):
            raise DataError(f"{source_name}: column '{label}' has type {arrow_type} for the whole file; the "
                            f"{preprocessor} preprocessor reads it as {KINDS[kind]}: {WRONG_TYPE} for the whole file "
                            "(one error, not a bad row per row; convert the column or map another with data.columns)")


def whole_file_problem(source_name: str, rows_read: int, kept: int, tally: Counter,
                       first_detail: Mapping[Tuple[str, Optional[str]], str]) -> Optional[str]:
    """The message for an input whose every row failed on the same field for the same column-level
    reason (missing field, wrong type), else None. ``tally`` counts (reason, field) of its bad rows."""
    if kept or rows_read == 0:
        return None
    for (reason, field), n in tally.items():
        if n == rows_read and field and reason in (MISSING_FIELD, WRONG_TYPE):
            return (f"{source_name}: column '{field}': {reason} in every row ({n} of {n}; the first: "
                    f"{first_detail[(reason, field)]}); a problem of the whole file, not of single rows "
                    "(check the file, or map another column with data.columns)")
    return None
