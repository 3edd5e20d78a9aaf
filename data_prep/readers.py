"""Stream raw rows, with their 0-based row numbers, from the file formats preference data comes in.

Formats, chosen by the path:

* **JSON Lines** (``.jsonl``, ``.ndjson``, and the same gzip-compressed, ``.gz``; gzip is recognised by
  its magic bytes, whatever the name): one JSON object per line. The file is read as bytes and each line
  decoded on its own, so one line of invalid UTF-8 or broken JSON is one bad row, not a failed file. The
  row number is the 0-based line index; blank lines carry no data and are passed over (they still count
  in the numbering, so row N stays line N+1).
* **JSON** (``.json``, ``.json.gz``): a list of objects, or an object whose ``"data"`` is that list.
  A ``.json`` file that is really JSON Lines (several top-level objects) is read as JSON Lines.
* **Parquet** (``.parquet``): streamed by record batch.
* **Saved ``datasets`` folders** (``datasets.save_to_disk``): a ``Dataset``, or a ``DatasetDict`` from
  which one split is picked (``options.train_split`` / ``options.heldout_split``, else the first of the
  usual names that exists).
* Data sets on the Hub (or folders laid out like one) are opened by :mod:`data_prep.hub` and read
  through :func:`dataset_rows`.

Each row comes out as ``(row, dict)``, or ``(row, BadRow)`` when the row itself cannot be read
(undecodable bytes, malformed JSON, not an object); the caller applies ``on_bad_row``.
"""

from __future__ import annotations

import codecs
import gzip
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

from .errors import DataError

from .drops import MALFORMED_JSON, NOT_AN_OBJECT, UNDECODABLE, BadRow, describe

RawRow = Tuple[int, Union[dict, BadRow]]

# Tried in order when a DatasetDict is given and no split is named in the options.
DEFAULT_SPLITS = {
    "train": ("train", "train_prefs"),
    "heldout": ("test", "test_prefs", "validation", "heldout"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_SUFFIXES = (".jsonl.gz", ".ndjson.gz", ".json.gz", ".jsonl", ".ndjson", ".json", ".parquet", ".gz")


@dataclass
class RowSource:
    """The rows of one input: ``name`` (shown in messages), ``stem`` (for default ids ``<stem>:<row>``),
    ``files`` (every file read, for content hashing) and the row iterator. A columnar input (Parquet, a
    ``datasets`` split) also has its ``column_names`` and their Arrow ``schema``, checked before any row."""

    name: str
    stem: str
    files: List[str]
    rows: Iterator[RawRow]
    column_names: Optional[List[str]] = field(default=None)
    schema: Any = None
    kind: str = "file"  # what it is, in messages: file | split


def file_stem(path: Path) -> str:
    name = path.name
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return path.stem


def open_rows(path: str | Path, *, role: str = "train", split: Optional[str] = None) -> RowSource:
    """Open ``path`` (see module doc) and return its rows. ``role`` ("train"/"heldout") picks the default
    split of a ``DatasetDict``; ``split`` names one explicitly."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        return _dataset_folder(path, role=role, split=split)
    name = path.name.lower()
    if name.endswith(".parquet"):
        parquet = _open_parquet(path)
        return RowSource(str(path), file_stem(path), [str(path)], _parquet_rows(parquet), parquet.schema_arrow.names,
                         parquet.schema_arrow)
    if name.endswith((".json", ".json.gz")):
        return RowSource(str(path), file_stem(path), [str(path)], _json_rows(path))
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")):
        return RowSource(str(path), file_stem(path), [str(path)], _jsonl_rows(path))
    raise DataError(
        f"{path}: unknown data format; expected .jsonl, .jsonl.gz, .json, .parquet or a saved `datasets` folder"
    )


def _open_bytes(path: Path):
    with open(path, "rb") as probe:
        magic = probe.read(2)
    return gzip.open(path, "rb") if magic == _GZIP_MAGIC else open(path, "rb")


def _parse_line(raw: bytes, row: int) -> Optional[Union[dict, BadRow]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return BadRow(UNDECODABLE, None, f"invalid UTF-8 at byte {err.start} of the line: {raw[max(0, err.start - 10):err.end + 10]!r}")
    if row == 0:
        text = text.lstrip("\ufeff")  # a byte-order mark is an encoding artefact, not data
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return BadRow(MALFORMED_JSON, None, f"{err.msg} at column {err.colno}")
    except (RecursionError, ValueError) as err:  # nesting too deep, an integer of thousands of digits
        return BadRow(MALFORMED_JSON, None, f"cannot be parsed: {type(err).__name__}: {str(err)[:120]}")
    if not isinstance(value, dict):
        return BadRow(NOT_AN_OBJECT, None, f"expected a JSON object, got {describe(value)}")
    return value


def _jsonl_rows(path: Path) -> Iterator[RawRow]:
    try:
        with _open_bytes(path) as f:
            for row, raw in enumerate(f):
                parsed = _parse_line(raw, row)
                if parsed is not None:
                    yield row, parsed
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        # A truncated or corrupt gzip stream: the rows after it are unreadable; say so, do not stop quietly.
        raise DataError(f"{path}: cannot read the file: {err}") from None


def _json_rows(path: Path) -> Iterator[RawRow]:
    try:
        with _open_bytes(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read the file: {err}") from None
    try:
        text = codecs.decode(data, "utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: invalid UTF-8 at byte {err.start}; the whole JSON document is unreadable") from None
    try:
        value = json.loads(text)
    except (RecursionError, ValueError) as err:
        if not isinstance(err, json.JSONDecodeError):
            raise DataError(f"{path}: the JSON document cannot be parsed: {type(err).__name__}: {str(err)[:120]}") from None
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            # Several top-level objects: it is JSON Lines with a .json name (common on the Hub).
            yield from _jsonl_rows(path)
            return
        raise DataError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of objects or {{\"data\": [...]}}, got {describe(value)}")
    for row, item in enumerate(value):
        if isinstance(item, dict):
            yield row, item
        else:
            yield row, BadRow(NOT_AN_OBJECT, None, f"expected a JSON object, got {describe(item)}")


def _open_parquet(path: Path) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file: {err}") from None


def _parquet_rows(parquet: Any) -> Iterator[RawRow]:
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for item in batch.to_pylist():
            yield row, item
            row += 1


def _dataset_folder(path: Path, *, role: str, split: Optional[str]) -> RowSource:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # FileNotFoundError or datasets' own errors for a folder it does not know
        raise DataError(f"{path}: not a saved `datasets` folder (datasets.load_from_disk failed: {err})") from None
    name, stem, root = str(path), path.name, path
    if isinstance(loaded, datasets.DatasetDict):
        available = list(loaded.keys())
        if split is None:
            candidates: Sequence[str] = DEFAULT_SPLITS.get(role, ())
            split = next((s for s in candidates if s in loaded), None)
            if split is None and len(available) == 1:
                split = available[0]
        if split is None or split not in loaded:
            wanted = f"split {split!r}" if split else f"a {role} split"
            raise DataError(
                f"{path}: this DatasetDict has no {wanted}; it has {', '.join(available)} "
                f"(name one with data.options.{role}_split)"
            )
        loaded = loaded[split]
        name, stem, root = f"{path}[{split}]", f"{path.name}/{split}", path / split
    files = sorted(str(p) for p in root.rglob("*") if p.is_file())
    if root != path and (path / "dataset_dict.json").is_file():
        files.insert(0, str(path / "dataset_dict.json"))
    return RowSource(name, stem, files, dataset_rows(loaded), column_names=list(loaded.column_names),
                     schema=loaded.features.arrow_schema, kind="split" if root != path else "data set")


def dataset_rows(dataset: Any) -> Iterator[RawRow]:
    """The rows of a ``datasets.Dataset``, numbered from 0, read a batch at a time."""
    row = 0
    columns = list(dataset.column_names)
    for batch in dataset.iter(batch_size=1024):
        for values in zip(*(batch[c] for c in columns)):
            yield row, dict(zip(columns, values))
            row += 1
