"""Writing a prepared set (what ``dpo-zoo prep`` does; training and compare only read, with
:mod:`dpo_zoo.cache.reader`). The format is :mod:`dpo_zoo.cache.format`.

A split's pairs are cut into shards (:func:`plan_shards`); each shard becomes one Arrow table
(:func:`build_shard_table`) written atomically with its sidecar by :class:`PreparedSetWriter`, which
resumes finished shards and writes the manifest last, after the full content check.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from data_prep.schema import PairReference, PreferencePair, TokenizedPair

from dpo_zoo.cache import format as S
from dpo_zoo.cache.reader import _open_shard, check_contents
from dpo_zoo.cache.format import FORMAT, MANIFEST, SIDES, Layout, arrow_schema, canonical_json, digest, shard_file, sidecar_file
from dpo_zoo.errors import CacheError
from dpo_zoo.model.loading import atomic_write_bytes, sha256_path


def pairs_fingerprint(pairs: Iterable[PreferencePair]) -> str:
    """sha256 over the content of normalized pairs, in order: what a prepared set's values depend on
    (id, prompt, chosen, rejected, tie flag, weight, soft label, behaviour log-probs), not where the
    rows came from."""
    hasher = hashlib.sha256()
    for pair in pairs:
        record = {
            "id": pair.id,
            "prompt": pair.prompt,
            "chosen": pair.chosen,
            "rejected": pair.rejected,
            "is_tie": bool(pair.is_tie),
            "weight": float(pair.weight),
            "soft_label": None if pair.soft_label is None else float(pair.soft_label),
            "behavior": [pair.extra.get(f"behavior_{side}_logps") for side in SIDES],
        }
        hasher.update(canonical_json(record).encode())
        hasher.update(b"\n")
    return hasher.hexdigest()


def _offsets(lengths: Sequence[int], what: str) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        # Arrow's list<> type counts with int32 offsets; a smaller shard keeps every list addressable.
        raise CacheError(f"a shard's column `{what}` would hold {offsets[-1]} values; lower prep.shard_size")
    return pa.array(offsets.astype(np.int32))


def _list_array(arrays: Sequence[np.ndarray], value_type: pa.DataType, what: str) -> pa.Array:
    """list<value_type> from one 1-D numpy array per row, built from offsets (no Python lists)."""
    dtype = value_type.to_pandas_dtype()
    flat = np.concatenate([np.asarray(a, dtype) for a in arrays]) if arrays else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(_offsets([len(a) for a in arrays], what), pa.array(flat, type=value_type))


def _nested_list_array(arrays: Sequence[np.ndarray], value_type: pa.DataType, what: str) -> pa.Array:
    """list<list<value_type>> from one 2-D numpy array [T, k] per row."""
    dtype = value_type.to_pandas_dtype()
    flat = np.concatenate([np.asarray(a, dtype).reshape(-1) for a in arrays]) if arrays else np.zeros(0, dtype)
    inner_lengths = [a.shape[1] for a in arrays for _ in range(a.shape[0])]
    inner = pa.ListArray.from_arrays(_offsets(inner_lengths, what), pa.array(flat, type=value_type))
    return pa.ListArray.from_arrays(_offsets([a.shape[0] for a in arrays], what), inner)


def build_shard_table(
    rows: Sequence[TokenizedPair], references: Optional[Sequence[PairReference]], layout: Layout
) -> pa.Table:
    """The Arrow table of one shard: ``rows`` in order with their ``references`` (same order; None
    for a layout without reference values)."""
    if layout.reference and (references is None or len(rows) != len(references)):
        raise ValueError(f"{len(rows)} rows but {0 if references is None else len(references)} reference values")
    pairs = [r.pair for r in rows]
    columns: Dict[str, pa.Array] = {
        S.ID: pa.array([p.id for p in pairs], pa.string()),
        S.PROMPT_TEXT: pa.array([json.dumps(p.prompt, ensure_ascii=False) for p in pairs], pa.string()),
        S.CHOSEN_TEXT: pa.array([json.dumps(p.chosen, ensure_ascii=False) for p in pairs], pa.string()),
        S.REJECTED_TEXT: pa.array([json.dumps(p.rejected, ensure_ascii=False) for p in pairs], pa.string()),
        S.CHOSEN_INPUT_IDS: _list_array([r.chosen_input_ids for r in rows], pa.int32(), S.CHOSEN_INPUT_IDS),
        S.REJECTED_INPUT_IDS: _list_array([r.rejected_input_ids for r in rows], pa.int32(), S.REJECTED_INPUT_IDS),
        S.CHOSEN_COMPLETION_START: pa.array([r.chosen_completion_start for r in rows], pa.int32()),
        S.REJECTED_COMPLETION_START: pa.array([r.rejected_completion_start for r in rows], pa.int32()),
        S.IS_TIE: pa.array([bool(p.is_tie) for p in pairs], pa.bool_()),
        S.WEIGHT: pa.array([float(p.weight) for p in pairs], pa.float32()),
        S.SOFT_LABEL: pa.array([None if p.soft_label is None else float(p.soft_label) for p in pairs], pa.float32()),
    }
    if layout.reference:
        columns[S.REF_CHOSEN_LOGPS] = pa.array([float(r.chosen.logps) for r in references], pa.float64())
        columns[S.REF_REJECTED_LOGPS] = pa.array([float(r.rejected.logps) for r in references], pa.float64())
    for side, refs in (("chosen", [r.chosen for r in references or ()]),
                       ("rejected", [r.rejected for r in references or ()])):
        if layout.token_level:
            name = f"ref_{side}_token_logps"
            columns[name] = _list_array([r.token_logps for r in refs], pa.float32(), name)
        if layout.topk:
            for suffix, build, value_type in (("topk_ids", _nested_list_array, pa.int32()),
                                              ("topk_logps", _nested_list_array, pa.float32()),
                                              ("rest_logmass", _list_array, pa.float32())):
                name = f"ref_{side}_{suffix}"
                columns[name] = build([getattr(r, suffix) for r in refs], value_type, name)
    if layout.behavior:
        for side in SIDES:
            columns[f"behavior_{side}_logps"] = pa.array(
                [float(p.extra[f"behavior_{side}_logps"]) for p in pairs], pa.float64()
            )
    schema = arrow_schema(layout)
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def shard_token_counts(rows: Sequence[TokenizedPair]) -> Dict[str, int]:
    """Input tokens (both sides, prompt + completion) and completion tokens of a list of pairs."""
    total = completion = 0
    for r in rows:
        total += len(r.chosen_input_ids) + len(r.rejected_input_ids)
        completion += len(r.chosen_input_ids) - r.chosen_completion_start
        completion += len(r.rejected_input_ids) - r.rejected_completion_start
    return {"input": total, "completion": completion}


# ==================================================================== writing


@dataclass
class ShardRecord:
    """What the manifest and the sidecar say about one shard."""

    index: int
    file: str
    rows: int
    sha256: str
    bytes: int
    first_id: str
    last_id: str
    tokens: Dict[str, int]
    ids_digest: str

    def manifest_entry(self) -> Dict[str, Any]:
        return {
            "file": self.file,
            "rows": self.rows,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "first_id": self.first_id,
            "last_id": self.last_id,
            "tokens": self.tokens,
        }


def plan_shards(ids: Sequence[str], shard_size: int) -> List[List[str]]:
    """Consecutive runs of ``shard_size`` ids (the last one shorter), in split order."""
    return [list(ids[i : i + shard_size]) for i in range(0, len(ids), shard_size)]


class PreparedSetWriter:
    """Writes one prepared set shard by shard, resumable, and finishes it with the manifest.

    Several processes may share one writer folder, each writing different shards (``rank r`` takes
    shards ``r, r+W, ...``); only one of them, after all are done, calls :meth:`finalize`.
    """

    def __init__(self, directory: Union[str, Path], key: Mapping[str, Any], shard_ids: Sequence[Sequence[str]],
                 layout: Layout):
        self.directory = Path(directory)
        self.key = dict(key)
        self.key_digest = digest(self.key)
        self.shard_ids = [list(ids) for ids in shard_ids]
        self.layout = layout

    # ------------------------------------------------------------------ set-up (one process)
    def prepare_directory(self) -> None:
        """Create the folder; remove a manifest of another key (it is about to be rebuilt), shards past
        the plan, and temporary files of killed writers. Call from ONE process before any writes."""
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest = self.directory / MANIFEST
        if manifest.exists():
            # Removed first, so that an interrupted rebuild never leaves a manifest over changed shards.
            manifest.unlink()
        for temp in self.directory.glob(".*.tmp-*"):
            temp.unlink(missing_ok=True)
        self._remove_extra_shards()

    def _remove_extra_shards(self) -> None:
        planned = {shard_file(i) for i in range(len(self.shard_ids))} | {
            sidecar_file(i) for i in range(len(self.shard_ids))
        }
        for path in list(self.directory.glob("shard-*.arrow")) + list(self.directory.glob("shard-*.json")):
            if path.name not in planned:
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ shards
    def finished(self, index: int) -> Optional[ShardRecord]:
        """The record of shard ``index`` when it was finished for this key and these ids and its file
        still matches its checksum (the file is read once to check); else None."""
        sidecar = self.directory / sidecar_file(index)
        path = self.directory / shard_file(index)
        try:
            info = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            return None
        ids = self.shard_ids[index]
        if (
            not isinstance(info, dict)
            or info.get("key_digest") != self.key_digest
            or info.get("ids_digest") != digest(ids)
            or info.get("rows") != len(ids)
            or not path.is_file()
            or path.stat().st_size != info.get("bytes")
            or sha256_path(path) != info.get("sha256")
        ):
            return None
        return ShardRecord(
            index=index, file=path.name, rows=info["rows"], sha256=info["sha256"], bytes=info["bytes"],
            first_id=info["first_id"], last_id=info["last_id"], tokens=info["tokens"], ids_digest=info["ids_digest"],
        )

    def write(self, index: int, table: pa.Table, tokens: Mapping[str, int],
              written_by: Optional[Mapping[str, Any]] = None) -> ShardRecord:
        """Write shard ``index`` (atomically), then its sidecar. The table's ids must be the planned ones.
        ``written_by`` (e.g. rank and world size) is kept in the sidecar as provenance."""
        ids = table.column(S.ID).to_pylist()
        if ids != self.shard_ids[index]:
            raise CacheError(f"{self.directory / shard_file(index)}: rows do not match the shard plan")
        sink = pa.BufferOutputStream()
        with ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        data = sink.getvalue()
        record = ShardRecord(
            index=index, file=shard_file(index), rows=len(ids), sha256=hashlib.sha256(data).hexdigest(),
            bytes=data.size, first_id=ids[0], last_id=ids[-1], tokens=dict(tokens), ids_digest=digest(ids),
        )
        atomic_write_bytes(self.directory / record.file, data.to_pybytes())
        sidecar = {**record.manifest_entry(), "shard": index, "ids_digest": record.ids_digest,
                   "key_digest": self.key_digest, "written_by": dict(written_by or {})}
        atomic_write_bytes(self.directory / sidecar_file(index), (json.dumps(sidecar, indent=1) + "\n").encode())
        return record

    # ------------------------------------------------------------------ the end
    def finalize(self, *, drops: Any = None, layout_info: Optional[Mapping] = None,
                 extra: Optional[Mapping[str, Any]] = None, split: str = "") -> Dict[str, Any]:
        """Check every shard (checksum, coverage: each planned id in exactly one shard, values of the
        right length) and write the manifest last. Raises :class:`CacheError` naming what is wrong."""
        records = []
        for index in range(len(self.shard_ids)):
            record = self.finished(index)
            if record is None:
                raise CacheError(
                    f"{self.directory / shard_file(index)}: missing or not finished for this key; "
                    "run prep again to compute it"
                )
            records.append(record)
        self._remove_extra_shards()
        for temp in self.directory.glob(".*.tmp-*"):
            temp.unlink(missing_ok=True)
        all_ids = [i for ids in self.shard_ids for i in ids]
        manifest = {
            "format": FORMAT,
            "schema_version": S.SCHEMA_VERSION,
            "split": split,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "dpo_zoo_version": _version(),
            "key": self.key,
            "key_digest": self.key_digest,
            "provides": self.layout.provides(soft_labels=self._all_soft_labels(records)),
            "columns": arrow_schema(self.layout).names,
            "topk": self.layout.topk,
            "counts": {
                "pairs": len(all_ids),
                "shards": len(records),
                "tokens": {k: sum(r.tokens[k] for r in records) for k in ("input", "completion")},
                "bytes": sum(r.bytes for r in records),
            },
            "ids_digest": digest(all_ids),
            "shards": [r.manifest_entry() for r in records],
            "drops": drops,
            "layout": dict(layout_info or {}),
            "extra": dict(extra or {}),
        }
        # The full content check (coverage, lengths, sums) runs on the shards as they are on disk.
        check_contents(self.directory, manifest, verify_checksums=False)
        atomic_write_bytes(self.directory / MANIFEST, (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode())
        return manifest


    def _all_soft_labels(self, records: Sequence[ShardRecord]) -> bool:
        """Whether every pair has a soft label (a set with some nulls cannot serve soft-label losses)."""
        if not records:
            return False
        for record in records:
            table = _open_shard(self.directory / record.file, record.manifest_entry())
            if table.column(S.SOFT_LABEL).null_count:
                return False
        return True


def _version() -> str:
    from dpo_zoo import __version__

    return __version__
