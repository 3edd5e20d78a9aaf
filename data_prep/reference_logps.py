"""Reference log-probs the user brings (``prep.reference_logps_path``) instead of running a model.

A jsonl (optionally .gz) or parquet file with an ``id`` per pair and either the summed log-probs
(``ref_chosen_logps`` / ``ref_rejected_logps``) or one value per completion token
(``ref_chosen_token_logps`` / ``ref_rejected_token_logps``). :func:`read_reference_file` checks every
row (errors name file, row and field); :func:`references_from_file` matches the values to the pairs as
tokenized here.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

import numpy as np

from .errors import DataError
from .schema import PairReference, SideReference, TokenizedPair

SIDES = ("chosen", "rejected")


def _sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


@dataclass
class ReferenceFile:
    """Reference log-probs brought by the user: per id, sums and/or per-token lists for both sides."""

    path: Path
    sha256: str
    token_level: bool
    rows: Dict[str, Dict[str, Any]]


def read_reference_file(path: Union[str, Path]) -> ReferenceFile:
    """Read ``prep.reference_logps_path``: jsonl (optionally .gz) or parquet with an ``id`` field and
    either ``ref_chosen_logps`` / ``ref_rejected_logps`` (sums) or ``ref_chosen_token_logps`` /
    ``ref_rejected_token_logps`` (lists, one value per completion token); both may be given, then the
    sums must equal the lists' sums. Every row must have the same fields. Errors name file, row, field.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prep.reference_logps_path: {path} does not exist")
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            records = pq.read_table(path).to_pylist()
        except (OSError, pa.ArrowInvalid) as err:
            raise DataError(f"{path}: not a readable parquet file ({err})") from None
    elif name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        records = []
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as err:
                    raise DataError(f"{path}: row {line_no}: not valid JSON ({err})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}: row {line_no}: expected a JSON object")
                records.append(record)
    else:
        raise DataError(f"{path}: reference log-probs must be .jsonl, .jsonl.gz or .parquet")
    if not records:
        raise DataError(f"{path}: holds no rows")

    token_fields = ("ref_chosen_token_logps", "ref_rejected_token_logps")
    sum_fields = ("ref_chosen_logps", "ref_rejected_logps")
    first = records[0]
    token_level = all(first.get(f) is not None for f in token_fields)
    has_sums = all(first.get(f) is not None for f in sum_fields)
    if not token_level and not has_sums:
        raise DataError(
            f"{path}: row 1: needs `id` and either {' / '.join(sum_fields)} (sums) or "
            f"{' / '.join(token_fields)} (per-token lists)"
        )
    rows: Dict[str, Dict[str, Any]] = {}
    for row_no, record in enumerate(records, 1):
        pair_id = record.get("id")
        if pair_id is None:
            raise DataError(f"{path}: row {row_no}: field `id` is missing")
        pair_id = str(pair_id)
        if pair_id in rows:
            raise DataError(f"{path}: row {row_no}: id {pair_id!r} appears twice (first at row {rows[pair_id]['row']})")
        entry: Dict[str, Any] = {"row": row_no}
        for side in SIDES:
            if token_level:
                field_name = f"ref_{side}_token_logps"
                values = record.get(field_name)
                if not isinstance(values, (list, tuple)):
                    raise DataError(f"{path}: row {row_no} (id {pair_id!r}): field `{field_name}` must be a list of numbers")
                try:
                    array = np.asarray(values, dtype=np.float64)
                except (TypeError, ValueError):
                    raise DataError(f"{path}: row {row_no} (id {pair_id!r}): field `{field_name}` holds non-numbers") from None
                if array.ndim != 1 or not np.all(np.isfinite(array)) or np.any(array > 1e-6):
                    raise DataError(
                        f"{path}: row {row_no} (id {pair_id!r}): field `{field_name}` must be finite log-probs (<= 0)"
                    )
                entry[f"{side}_tokens"] = array.astype(np.float32)
            if has_sums:
                field_name = f"ref_{side}_logps"
                value = record.get(field_name)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise DataError(f"{path}: row {row_no} (id {pair_id!r}): field `{field_name}` must be a finite number")
                entry[f"{side}_sum"] = float(value)
                if token_level:
                    token_sum = float(entry[f"{side}_tokens"].astype(np.float64).sum())
                    if not math.isclose(token_sum, value, rel_tol=1e-5, abs_tol=1e-3):
                        raise DataError(
                            f"{path}: row {row_no} (id {pair_id!r}): field `{field_name}` = {value} is not the sum "
                            f"of `ref_{side}_token_logps` ({token_sum})"
                        )
        rows[pair_id] = entry
    return ReferenceFile(path=path, sha256=_sha256(path), token_level=token_level, rows=rows)


def references_from_file(ref_file: ReferenceFile, rows: Sequence[TokenizedPair], split: str) -> List[PairReference]:
    """Reference values of ``rows`` from a user file: every id must be present, and per-token lists
    must have one value per completion token of the pair as tokenized here."""
    missing = [r.pair.id for r in rows if r.pair.id not in ref_file.rows]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        raise DataError(
            f"{ref_file.path}: no reference values for {len(missing)} of the {len(rows)} pairs of the "
            f"{split} split (ids {shown}{', ...' if len(missing) > 5 else ''})"
        )
    out = []
    for r in rows:
        entry = ref_file.rows[r.pair.id]
        sides = {}
        for side, ids, start in (("chosen", r.chosen_input_ids, r.chosen_completion_start),
                                 ("rejected", r.rejected_input_ids, r.rejected_completion_start)):
            if ref_file.token_level:
                values = entry[f"{side}_tokens"]
                expected = len(ids) - start
                if len(values) != expected:
                    raise DataError(
                        f"{ref_file.path}: row {entry['row']} (id {r.pair.id!r}): field `ref_{side}_token_logps` "
                        f"has {len(values)} values but the {side} completion has {expected} tokens after "
                        "tokenization; the file must come from the same tokenizer, chat template and truncation"
                    )
                sides[side] = SideReference(logps=float(values.astype(np.float64).sum()), token_logps=values)
            else:
                sides[side] = SideReference(logps=entry[f"{side}_sum"])
        out.append(PairReference(**sides))
    return out
