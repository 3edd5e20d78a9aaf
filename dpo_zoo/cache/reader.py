"""Reading and verifying a prepared set (the reference cache): all that training and compare need.

:func:`lookup` says whether a folder holds a set for a key (hit, miss naming the changed fields,
damaged, incomplete, absent); :class:`PreparedSet` memory-maps a finished set, refusing a damaged one;
:func:`verify_prepared_set` is the full check behind ``dpo-zoo prep --verify``. The format is
:mod:`dpo_zoo.cache.format`; :mod:`dpo_zoo.cache.writer` writes sets.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from dpo_zoo.cache import format as S
from dpo_zoo.cache.format import FORMAT, MANIFEST, SIDES, Layout, arrow_schema, digest
from dpo_zoo.errors import CacheError
from dpo_zoo.model.loading import sha256_path
from dpo_zoo.staleness import describe


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
    differences = describe(manifest["key"], key)
    if differences:
        return Lookup("miss", differences, manifest)
    problems = check_shard_files(directory, manifest, verify_checksums)
    if problems:
        return Lookup("damaged", problems, manifest)
    return Lookup("hit", [], manifest)


# ==================================================================== reading


def _file_identity(path: Path) -> Optional[Tuple[int, int, int, int]]:
    """(device, inode, size, modification time in ns) of a file, None when it is gone: a file replaced by
    a rename gets a new inode, one written in place a new size or time."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


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

    Rows are returned as Python dicts keyed by the column names of :mod:`dpo_zoo.cache.format`
    (:meth:`row`, :meth:`rows`) or as a pyarrow table (:meth:`table`), in the split's order.
    """

    def __init__(self, path: Path, manifest: Dict[str, Any], tables: List[pa.Table]):
        self.path = path
        self.manifest = manifest
        self._shards = tables
        self._identities = {name: _file_identity(path / name) for name in self._watched()}
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
        from dpo_zoo.losses.base import Need

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

    def _watched(self) -> List[str]:
        return [MANIFEST, *(entry["file"] for entry in self.manifest["shards"])]

    def check_unchanged(self) -> None:
        """Raise a :class:`CacheError` naming the file when the manifest or a shard on disk is not the one
        this set was opened on (rebuilt by another prep, altered, or removed): its rows were read when
        opened, so going on would mix two caches. A stat per file: cheap enough for every read."""
        for name, opened in self._identities.items():
            now = _file_identity(self.path / name)
            if now != opened:
                what = "was removed" if now is None else "was rebuilt or altered"
                raise CacheError(
                    f"{self.path / name} {what} while this process was reading the prepared set {self.path} "
                    "(opened with other bytes): stopping rather than mixing two caches. If a prep rebuilt it, "
                    "run again: a checkpointed run resumes only when the prepared set's key is the same")

    def table(self, indices: Optional[Sequence[int]] = None, columns: Optional[Sequence[str]] = None) -> pa.Table:
        """The rows at ``indices`` (all when None) and ``columns`` (all when None) as a pyarrow table;
        first :meth:`check_unchanged`."""
        self.check_unchanged()
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
