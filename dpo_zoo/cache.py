"""The on-disk prepared set: tokenized pairs plus the reference model's log-probs, keyed by content.

Layout of one prepared set (one split, e.g. ``<prep.output_dir>/train``)::

    manifest.json         written last: its presence means the set is complete and verified
    shard-00000.arrow     Arrow IPC *file* format (uncompressed, so it can be memory-mapped)
    shard-00000.json      sidecar: rows, sha256, bytes, first/last id, digest of its ids, key digest,
                          which rank wrote it (what resume checks before keeping a shard)
    shard-00001.arrow
    ...

**Shards.** The split's pairs, in split order, are cut into consecutive shards of ``prep.shard_size``
pairs. Each shard is one record batch whose columns are those of :mod:`data_prep.schema`:
``id``; ``prompt`` / ``chosen`` / ``rejected`` as JSON text (``json.loads`` gives the string or the
message list); ``chosen_input_ids`` / ``rejected_input_ids`` (list<int32>, prompt + completion);
``chosen_completion_start`` / ``rejected_completion_start`` (int32); ``is_tie`` (bool); ``weight``
(float32); ``soft_label`` (float32, null when the data has none); ``ref_chosen_logps`` /
``ref_rejected_logps`` (float64, the sum over completion tokens; with ``prep.reference=false`` no
``ref_*`` column at all); and, when the reference values are per token, ``ref_chosen_token_logps`` / ``ref_rejected_token_logps`` (list<float32>, one per completion
token, aligned with ``input_ids[completion_start:]``). With ``prep.topk = k > 0`` also
``ref_{side}_topk_ids`` (list<list<int32>> [T, k]), ``ref_{side}_topk_logps`` (list<list<float32>>
[T, k]) and ``ref_{side}_rest_logmass`` (list<float32> [T], ``log(1 − Σ_topk p)``). Behaviour-policy
log-probs (``behavior_{side}_logps``, float64) are stored when every pair carries them.

Each shard is written atomically (temporary file, fsync, rename) and then its sidecar, the same way.
A shard counts as finished only when its sidecar names the current key and the shard's ids and the
file's sha256 matches the sidecar: a killed prep resumes from there, recomputing nothing finished.

**Manifest** (``manifest.json``)::

    format, schema_version, split, created, dpo_zoo_version
    key           the WHOLE cache key (see below); key_digest = sha256 of its canonical JSON
    provides      the loss needs it can serve (dpo_zoo.losses.Need values): ties, weights always;
                  sequence_logps unless prepared with prep.reference=false (key reference_source
                  "none": a set for reference-free losses); token_logps with per-token values; vocab_logps with topk > 0 (as
                  top-k + leftover mass); soft_labels / behavior_logps when every pair has them
    columns       the Arrow columns; topk
    counts        pairs, shards, tokens {input, completion} (both sides), bytes
    ids_digest    sha256 of the ordered pair ids (the coverage check compares against it)
    shards        [{file, rows, sha256, bytes, first_id, last_id, tokens}]
    drops         the drop report summary of the data load and tokenization
    layout        shard_size, batch_size, world_size (how it was computed; not part of the key:
                  they change no value beyond floating-point rounding of differently padded batches)
    extra         provenance: model name, folder, revision and commit, reference file, data sources,
                  data_prep fingerprint

**Key.** Every setting baked into the stored values: reference weights (sha256 per weight file) or the
sha256 of a user-supplied reference file, the commit a Hub model's revision resolved to
(``model_revision``), tokenizer fingerprint, chat template, max_length, max_prompt_length,
truncation_mode, the chat_template setting, preprocessor + options + column map + split settings, a
fingerprint of the split's pair content, for a Hub data set its name, subset, splits and the commit its
revision resolved to (``data_source``), dtype, topk and the schema version. A lookup with another
key is a miss whose message names every differing field.

Reading: :class:`PreparedSet` memory-maps the shards (nothing is loaded whole); ``verify_prepared_set``
runs the full check behind ``dpo-zoo prep --verify``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from data_prep import schema as S

from .errors import CacheError, DataError
from .models import atomic_write_bytes, sha256_path

FORMAT = "dpo_zoo.prepared_set"
MANIFEST = "manifest.json"
SIDES = ("chosen", "rejected")


def shard_file(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def sidecar_file(index: int) -> str:
    return f"shard-{index:05d}.json"


# ==================================================================== keys


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def digest(value: Any) -> str:
    """sha256 of the canonical JSON of ``value``."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def _show(value: Any) -> str:
    """A key value for a miss message: long hex digests shortened, strings unquoted."""
    if value is None:
        return "(none)"
    if isinstance(value, str):
        if len(value) >= 32 and all(c in "0123456789abcdef" for c in value):
            return value[:8] + "…"
        return value if len(value) <= 60 else value[:57] + "…"
    if isinstance(value, (dict, list)):
        text = canonical_json(value)
        return text if len(text) <= 60 else text[:57] + "…"
    return str(value)


def describe_key_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    """One ``"field old → new"`` line per differing key field; mappings are compared per entry
    (``"model_weights model.safetensors a1b2c3d4… → c3d4e5f6…"``)."""
    lines = []
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            for sub in sorted(set(before) | set(after)):
                if before.get(sub) != after.get(sub):
                    lines.append(f"{name} {sub} {_show(before.get(sub))} → {_show(after.get(sub))}")
        else:
            lines.append(f"{name} {_show(before)} → {_show(after)}")
    return lines


def pairs_fingerprint(pairs: Iterable[S.PreferencePair]) -> str:
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


# ==================================================================== reference values


@dataclass
class SideReference:
    """Reference values of one completion: ``logps`` (the sum) and, when known, ``token_logps`` [T]
    and the top-k distribution (``topk_ids`` / ``topk_logps`` [T, k], ``rest_logmass`` [T])."""

    logps: float
    token_logps: Optional[np.ndarray] = None
    topk_ids: Optional[np.ndarray] = None
    topk_logps: Optional[np.ndarray] = None
    rest_logmass: Optional[np.ndarray] = None


@dataclass
class PairReference:
    chosen: SideReference
    rejected: SideReference


@dataclass(frozen=True)
class Layout:
    """Which optional columns a prepared set has. ``reference=False`` (``prep.reference=false``): no
    reference column at all, so the set serves only reference-free losses (and live-reference runs)."""

    token_level: bool = True
    topk: int = 0
    behavior: bool = False
    reference: bool = True

    def __post_init__(self):
        if not self.reference and (self.token_level or self.topk):
            raise ValueError("a layout without reference values has no per-token or top-k reference columns")

    def provides(self, soft_labels: bool) -> List[str]:
        needs = ["ties", "weights"]
        if self.reference:
            needs.append("sequence_logps")
        if self.token_level:
            needs.append("token_logps")
        if self.topk > 0:
            needs.append("vocab_logps")
        if soft_labels:
            needs.append("soft_labels")
        if self.behavior:
            needs.append("behavior_logps")
        return sorted(needs)


def arrow_schema(layout: Layout) -> pa.Schema:
    """The Arrow schema of a shard with this layout (column names from data_prep.schema)."""
    fields = [
        pa.field(S.ID, pa.string(), nullable=False),
        pa.field(S.PROMPT_TEXT, pa.string()),
        pa.field(S.CHOSEN_TEXT, pa.string()),
        pa.field(S.REJECTED_TEXT, pa.string()),
        pa.field(S.CHOSEN_INPUT_IDS, pa.list_(pa.int32())),
        pa.field(S.REJECTED_INPUT_IDS, pa.list_(pa.int32())),
        pa.field(S.CHOSEN_COMPLETION_START, pa.int32()),
        pa.field(S.REJECTED_COMPLETION_START, pa.int32()),
        pa.field(S.IS_TIE, pa.bool_()),
        pa.field(S.WEIGHT, pa.float32()),
        pa.field(S.SOFT_LABEL, pa.float32()),
    ]
    if layout.reference:
        fields += [pa.field(S.REF_CHOSEN_LOGPS, pa.float64()), pa.field(S.REF_REJECTED_LOGPS, pa.float64())]
    if layout.token_level:
        fields += [
            pa.field(S.REF_CHOSEN_TOKEN_LOGPS, pa.list_(pa.float32())),
            pa.field(S.REF_REJECTED_TOKEN_LOGPS, pa.list_(pa.float32())),
        ]
    if layout.topk:
        for ids_col, logps_col, rest_col in (
            (S.REF_CHOSEN_TOPK_IDS, S.REF_CHOSEN_TOPK_LOGPS, S.REF_CHOSEN_REST_LOGMASS),
            (S.REF_REJECTED_TOPK_IDS, S.REF_REJECTED_TOPK_LOGPS, S.REF_REJECTED_REST_LOGMASS),
        ):
            fields += [
                pa.field(ids_col, pa.list_(pa.list_(pa.int32()))),
                pa.field(logps_col, pa.list_(pa.list_(pa.float32()))),
                pa.field(rest_col, pa.list_(pa.float32())),
            ]
    if layout.behavior:
        fields += [pa.field(S.BEHAVIOR_CHOSEN_LOGPS, pa.float64()), pa.field(S.BEHAVIOR_REJECTED_LOGPS, pa.float64())]
    return pa.schema(fields, metadata={"dpo_zoo.format": FORMAT, "dpo_zoo.schema_version": str(S.SCHEMA_VERSION)})


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
    rows: Sequence[S.TokenizedPair], references: Optional[Sequence[PairReference]], layout: Layout
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


def shard_token_counts(rows: Sequence[S.TokenizedPair]) -> Dict[str, int]:
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
    from . import __version__

    return __version__


# ==================================================================== lookup


@dataclass
class Lookup:
    """The state of a prepared-set folder for a key.

    ``status``: ``hit`` (complete, same key, shards intact), ``miss`` (complete, other key; ``reasons``
    name each differing field), ``damaged`` (same key, but shards fail their check; ``reasons`` name
    them), ``incomplete`` (no manifest: never finished, resumable) or ``absent``.
    """

    status: str
    reasons: List[str] = field(default_factory=list)
    manifest: Optional[Dict[str, Any]] = None

    def message(self, path: Path) -> str:
        if self.status == "hit":
            return f"cache hit: {path}"
        if self.status == "miss":
            return f"cache miss: {'; '.join(self.reasons)} ({path}); rebuilding"
        if self.status == "damaged":
            return f"cache damaged: {'; '.join(self.reasons)} ({path}); recomputing the bad shards"
        if self.status == "incomplete":
            return f"cache incomplete: {path}; resuming"
        return f"cache empty: {path}; building"


def read_manifest(directory: Union[str, Path]) -> Dict[str, Any]:
    """The manifest of a prepared set, checked for form; :class:`CacheError` naming the file otherwise."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CacheError(
            f"{path}: no manifest; {Path(directory)} is not a finished prepared set (run `dpo-zoo prep` first)"
        )
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise CacheError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path}: field `format` is not {FORMAT!r}; not a dpo_zoo prepared set")
    if manifest.get("schema_version") != S.SCHEMA_VERSION:
        raise CacheError(
            f"{path}: field `schema_version` is {manifest.get('schema_version')!r}, this dpo_zoo reads "
            f"version {S.SCHEMA_VERSION}; run `dpo-zoo prep` again"
        )
    for name, kind in (("key", dict), ("shards", list), ("counts", dict), ("provides", list),
                       ("columns", list), ("ids_digest", str), ("key_digest", str)):
        if not isinstance(manifest.get(name), kind):
            raise CacheError(f"{path}: field `{name}` is missing or not a {kind.__name__}")
    for i, entry in enumerate(manifest["shards"]):
        for name, kind in (("file", str), ("rows", int), ("sha256", str), ("bytes", int)):
            if not isinstance(entry, dict) or not isinstance(entry.get(name), kind):
                raise CacheError(f"{path}: field `shards[{i}].{name}` is missing or not a {kind.__name__}")
    return manifest


def check_shard_files(directory: Path, manifest: Mapping[str, Any], verify_checksums: bool = True) -> List[str]:
    """Problems with the shard files (missing, wrong size, wrong sha256), each naming the shard."""
    problems = []
    for entry in manifest["shards"]:
        path = directory / entry["file"]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or altered)")
        elif verify_checksums and sha256_path(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (altered or corrupt)")
    return problems


def lookup(directory: Union[str, Path], key: Mapping[str, Any], verify_checksums: bool = True) -> Lookup:
    """Compare the prepared set in ``directory`` with ``key`` (see :class:`Lookup`).

    With ``verify_checksums`` every shard is read once to check its sha256 (about a second per GB).
    """
    directory = Path(directory)
    if not (directory / MANIFEST).exists():
        has_shards = directory.is_dir() and any(directory.glob("shard-*.json"))
        return Lookup("incomplete" if has_shards else "absent")
    try:
        manifest = read_manifest(directory)
    except CacheError as err:
        return Lookup("damaged", [str(err)])
    differences = describe_key_diff(manifest["key"], key)
    if differences:
        return Lookup("miss", differences, manifest)
    problems = check_shard_files(directory, manifest, verify_checksums)
    if problems:
        return Lookup("damaged", problems, manifest)
    return Lookup("hit", [], manifest)


# ==================================================================== reading


def _open_shard(path: Path, entry: Mapping[str, Any]) -> pa.Table:
    try:
        source = pa.memory_map(str(path), "r")
        table = ipc.open_file(source).read_all()
    except (OSError, pa.ArrowInvalid) as err:
        raise CacheError(f"{path}: not a readable Arrow IPC file ({err})") from None
    if table.num_rows != entry["rows"]:
        raise CacheError(f"{path}: {table.num_rows} rows, the manifest says {entry['rows']}")
    return table


def check_contents(directory: Path, manifest: Mapping[str, Any], verify_checksums: bool = True) -> Dict[str, Any]:
    """The full check of a prepared set; raises :class:`CacheError` naming the shard and field.

    Files: present, the manifest's size, and (``verify_checksums``) its sha256. Schema: the manifest's
    columns. Coverage: every id once across shards, in the manifest's order (``ids_digest``), first/last
    ids and row counts per shard. Values: completion starts within the sequence; per-token values
    (and top-k rows) one per completion token; sums equal to the per-token values; token counts equal
    to the manifest's. Returns a summary dict.
    """
    problems = check_shard_files(directory, manifest, verify_checksums)
    if problems:
        raise CacheError("; ".join(problems))
    columns = list(manifest["columns"])
    seen: set = set()
    all_ids: List[str] = []
    tokens = {"input": 0, "completion": 0}
    for entry in manifest["shards"]:
        path = directory / entry["file"]
        table = _open_shard(path, entry)
        if table.schema.names != columns:
            missing = sorted(set(columns) - set(table.schema.names))
            extra = sorted(set(table.schema.names) - set(columns))
            raise CacheError(f"{path}: columns differ from the manifest (missing {missing}, unexpected {extra})")
        ids = table.column(S.ID).to_pylist()
        if ids and (ids[0] != entry.get("first_id") or ids[-1] != entry.get("last_id")):
            raise CacheError(f"{path}: first/last id {ids[0]!r}/{ids[-1]!r} differ from the manifest")
        for pair_id in ids:
            if pair_id in seen:
                raise CacheError(f"{path}: pair id {pair_id!r} appears in more than one row")
            seen.add(pair_id)
        all_ids.extend(ids)
        for side in SIDES:
            _check_side(path, table, side, columns, ids, tokens)
    if digest(all_ids) != manifest["ids_digest"] or len(all_ids) != manifest["counts"].get("pairs"):
        raise CacheError(
            f"{directory / MANIFEST}: coverage check failed: the shards hold {len(all_ids)} pairs whose ids "
            f"do not match the manifest's `ids_digest` / `counts.pairs` ({manifest['counts'].get('pairs')})"
        )
    expected_tokens = manifest["counts"].get("tokens")
    if expected_tokens != tokens:
        raise CacheError(f"{directory / MANIFEST}: field `counts.tokens` is {expected_tokens}, the shards hold {tokens}")
    return {"pairs": len(all_ids), "shards": len(manifest["shards"]), "tokens": tokens,
            "bytes": sum(e["bytes"] for e in manifest["shards"])}


def _check_side(path: Path, table: pa.Table, side: str, columns: List[str], ids: List[str],
                tokens: Dict[str, int]) -> None:
    def fail(row: int, column: str, what: str):
        raise CacheError(f"{path}: row {row} (id {ids[row]!r}), column `{column}`: {what}")

    input_col = f"{side}_input_ids"
    seq_len = pc.list_value_length(table.column(input_col)).to_numpy(zero_copy_only=False)
    start = table.column(f"{side}_completion_start").to_numpy(zero_copy_only=False)
    bad = np.nonzero((start < 1) | (start > seq_len))[0]
    if bad.size:
        fail(int(bad[0]), f"{side}_completion_start", f"{start[bad[0]]} is outside 1..{seq_len[bad[0]]}")
    completion = seq_len - start
    tokens["input"] += int(seq_len.sum())
    tokens["completion"] += int(completion.sum())
    sums_col = f"ref_{side}_logps"
    if sums_col not in columns:  # prepared with prep.reference=false: no reference column to check
        return
    sums = table.column(sums_col).to_numpy(zero_copy_only=False)
    if not np.all(np.isfinite(sums)):
        fail(int(np.nonzero(~np.isfinite(sums))[0][0]), sums_col, "not finite")
    token_col = f"ref_{side}_token_logps"
    if token_col in columns:
        values = table.column(token_col)
        lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
        bad = np.nonzero(lengths != completion)[0]
        if bad.size:
            fail(int(bad[0]), token_col, f"{lengths[bad[0]]} values for {completion[bad[0]]} completion tokens")
        flat = pc.list_flatten(values).to_numpy(zero_copy_only=False).astype(np.float64)
        if not np.all(np.isfinite(flat)):
            raise CacheError(f"{path}: column `{token_col}` holds non-finite values")
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        row_sums = np.add.reduceat(flat, offsets[:-1]) if flat.size else np.zeros(len(lengths))
        row_sums[lengths == 0] = 0.0  # reduceat returns the next element for empty rows
        bad = np.nonzero(~np.isclose(row_sums, sums, rtol=1e-6, atol=1e-4))[0]
        if bad.size:
            fail(int(bad[0]), sums_col, f"{sums[bad[0]]} is not the sum of `{token_col}` ({row_sums[bad[0]]})")
    for suffix in ("topk_ids", "topk_logps", "rest_logmass"):
        column = f"ref_{side}_{suffix}"
        if column in columns:
            lengths = pc.list_value_length(table.column(column)).to_numpy(zero_copy_only=False)
            bad = np.nonzero(lengths != completion)[0]
            if bad.size:
                fail(int(bad[0]), column, f"{lengths[bad[0]]} positions for {completion[bad[0]]} completion tokens")


def _layout_of(manifest: Mapping[str, Any]) -> pa.Schema:
    """The Arrow schema a manifest describes (used for an empty set, which has no shard to read)."""
    columns = set(manifest["columns"])
    return arrow_schema(Layout(token_level=S.REF_CHOSEN_TOKEN_LOGPS in columns, topk=int(manifest.get("topk", 0)),
                               behavior=S.BEHAVIOR_CHOSEN_LOGPS in columns,
                               reference=S.REF_CHOSEN_LOGPS in columns))


class PreparedSet:
    """Read access to a finished prepared set, memory-mapped (shards are never loaded whole).

    ``PreparedSet.open(path)`` reads and checks the manifest, checks every shard's size and (with
    ``verify=True``, the default) its sha256, which reads each shard once: about a second per GB on
    one core, paid once per open. A shard that fails is refused with a :class:`CacheError` naming it;
    its bytes are never handed out as data. ``verify=False`` keeps the size and row-count checks only.

    Rows are returned as Python dicts keyed by the column names of :mod:`data_prep.schema`
    (:meth:`row`, :meth:`rows`) or as a pyarrow table (:meth:`table`), in the split's order.
    """

    def __init__(self, path: Path, manifest: Dict[str, Any], tables: List[pa.Table]):
        self.path = path
        self.manifest = manifest
        self._shards = tables
        self._table = pa.concat_tables(tables) if tables else _layout_of(manifest).empty_table()
        self._ids: Optional[List[str]] = None

    @classmethod
    def open(cls, path: Union[str, Path], verify: bool = True) -> "PreparedSet":
        path = Path(path)
        manifest = read_manifest(path)
        problems = check_shard_files(path, manifest, verify_checksums=verify)
        if problems:
            raise CacheError("refusing to read a damaged prepared set: " + "; ".join(problems))
        tables = [_open_shard(path / entry["file"], entry) for entry in manifest["shards"]]
        for entry, table in zip(manifest["shards"], tables):
            if table.schema.names != list(manifest["columns"]):
                raise CacheError(f"{path / entry['file']}: columns differ from the manifest's `columns`")
        return cls(path, manifest, tables)

    def __len__(self) -> int:
        return self._table.num_rows

    @property
    def ids(self) -> List[str]:
        if self._ids is None:
            self._ids = self._table.column(S.ID).to_pylist()
        return self._ids

    @property
    def key(self) -> Dict[str, Any]:
        return self.manifest["key"]

    @property
    def provides(self) -> frozenset:
        """The :class:`~dpo_zoo.losses.base.Need` values this set serves."""
        from .losses.base import Need

        return frozenset(Need(n) for n in self.manifest["provides"])

    @property
    def columns(self) -> List[str]:
        return list(self.manifest["columns"])

    @property
    def has_reference(self) -> bool:
        """False for a set prepared with ``prep.reference=false`` (no reference log-probs stored)."""
        return S.REF_CHOSEN_LOGPS in self.manifest["columns"]

    @property
    def topk(self) -> int:
        return int(self.manifest.get("topk", 0))

    def table(self, indices: Optional[Sequence[int]] = None, columns: Optional[Sequence[str]] = None) -> pa.Table:
        """The rows at ``indices`` (all when None) and ``columns`` (all when None) as a pyarrow table."""
        table = self._table if columns is None else self._table.select(list(columns))
        if indices is None:
            return table
        return table.take(pa.array(self._check_indices(indices), pa.int64()))

    def rows(self, indices: Sequence[int], columns: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
        return self.table(indices, columns).to_pylist()

    def row(self, index: int) -> Dict[str, Any]:
        return self.rows([index])[0]

    def _check_indices(self, indices: Sequence[int]) -> List[int]:
        out = [int(i) for i in indices]
        for i in out:
            if not -len(self) <= i < len(self):
                raise IndexError(f"row {i} is out of range for a prepared set of {len(self)} pairs ({self.path})")
        return [i % len(self) for i in out]

    def __repr__(self) -> str:
        return f"PreparedSet({self.path}, pairs={len(self)}, provides={sorted(self.manifest['provides'])})"


def verify_prepared_set(path: Union[str, Path]) -> Dict[str, Any]:
    """Full check of a finished prepared set (see :func:`check_contents`); returns a summary."""
    path = Path(path)
    manifest = read_manifest(path)
    summary = check_contents(path, manifest, verify_checksums=True)
    summary.update(provides=manifest["provides"], key=manifest["key"], split=manifest.get("split", ""))
    return summary


# ==================================================================== user-supplied reference values


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
    return ReferenceFile(path=path, sha256=sha256_path(path), token_level=token_level, rows=rows)


def references_from_file(ref_file: ReferenceFile, rows: Sequence[S.TokenizedPair], split: str) -> List[PairReference]:
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
