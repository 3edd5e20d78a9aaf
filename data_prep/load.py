"""``load_splits``: read the configured data with its preprocessor, validate it, and split it.

Order of work: read every row of ``data.train_path`` (and ``data.heldout_path``), or of the Hub data
set's splits (``data.hub``, :mod:`data_prep.hub`) → convert each row to a
:class:`PreferencePair` with the preprocessor (bad rows raise or are counted, per ``data.on_bad_row``)
→ reject repeated ids (within a file, and held-out pairs whose id is also a training id) → split off
the held-out pairs when there is no held-out file (by a hash of the id: deterministic, independent of
row order) → keep the first ``max_train_pairs`` / ``max_heldout_pairs`` → fingerprint both splits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import DataError

from . import hh_rlhf, ultrafeedback
from .columns import check_schema, whole_file_problem
from .drops import DUPLICATE_ID, DUPLICATE_ROW, BadRow, DropReport, RowPolicy
from .normalize import PAIR_FIELDS, Row, check_columns, check_encodable, generic_pair, heldout_by_hash
from .hub import hub_settings, open_hub
from .readers import RowSource, open_rows
from .schema import PreferencePair
from .reward_pairs import Generate, load_reward_pairs
from .vader import load_vader

FINGERPRINT_VERSION = b"dpo_zoo.pairs.v1\n"
# Options every file-reading preprocessor accepts: which split of a saved DatasetDict to read.
FILE_OPTIONS: Dict[str, Any] = {"train_split": None, "heldout_split": None}


@dataclass
class LoadedSplits:
    """Both splits, normalized and validated, with what was dropped and what was read.

    ``sources``: every file read (for content hashing). ``fingerprint``: sha256 over the normalized pairs
    of both splits in order (the "data content" field of the cache key). ``stats``: what the
    preprocessor counted (e.g. VADER's snippets, pairs and ties per source). ``origin``: for a Hub data
    set, what identifies it beyond its content (name, data_dir, data_files, splits, the commit its
    revision resolved to), for the cache key and the manifest; empty for files. ``warnings``: what the
    user should know but that drops nothing (exact duplicate rows kept), printed by prep.
    """

    train: List[PreferencePair]
    heldout: List[PreferencePair]
    drops: DropReport
    sources: List[str]
    fingerprint: str
    stats: Dict[str, Any] = field(default_factory=dict)
    origin: Dict[str, Any] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class FilePreprocessor:
    """A preprocessor that converts one raw row at a time: the columns it reads (which ``data.columns``
    may rename), its own options with defaults, the row -> pair conversion, and the kind of value each
    column holds (:data:`data_prep.columns.KINDS`; checked against a columnar file's schema)."""

    columns: Tuple[str, ...]
    required: Tuple[str, ...]
    options: Mapping[str, Any]
    convert: Callable[..., PreferencePair]
    kinds: Mapping[str, str] = field(default_factory=dict)


FILE_PREPROCESSORS: Dict[str, FilePreprocessor] = {
    "generic": FilePreprocessor(
        PAIR_FIELDS, ("chosen", "rejected"), {}, generic_pair,
        {"prompt": "text", "chosen": "text", "rejected": "text", "id": "id", "tie": "flag", "weight": "number",
         "soft_label": "number"},
    ),
    "hh_rlhf": FilePreprocessor(
        hh_rlhf.COLUMNS, ("chosen", "rejected"), hh_rlhf.OPTIONS, hh_rlhf.hh_pair,
        {"chosen": "string", "rejected": "string", "id": "id"},
    ),
    "ultrafeedback": FilePreprocessor(
        ultrafeedback.COLUMNS,
        ("chosen", "rejected", "score_chosen", "score_rejected"),
        ultrafeedback.OPTIONS,
        ultrafeedback.ultrafeedback_pair,
        {"prompt": "string", "prompt_id": "id", "chosen": "messages", "rejected": "messages",
         "score_chosen": "number", "score_rejected": "number", "id": "id"},
    ),
}


class DuplicateRows:
    """Exact duplicate rows (equal in every column) across every input read: counted and reported as a
    warning, or dropped as ``duplicate row`` with ``data.drop_duplicate_rows`` (a deliberate filter,
    like max_train_pairs, so it drops under either on_bad_row)."""

    def __init__(self, drop: bool):
        self.drop = drop
        self.first: Dict[bytes, Tuple[str, int]] = {}
        self.kept: Counter = Counter()

    def earlier_copy(self, raw: Mapping[str, Any], file: str, row: int) -> Optional[Tuple[str, int]]:
        """(file, row) of an earlier identical row, or None (and remember this one)."""
        text = json.dumps(raw, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=repr)
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
        if digest in self.first:
            return self.first[digest]
        self.first[digest] = (file, row)
        return None

    def warnings(self) -> List[str]:
        return [f"{file}: {n} rows are exact copies of earlier rows (kept; set data.drop_duplicate_rows=true "
                "to drop them)" for file, n in self.kept.items()]
PREPROCESSORS = (*FILE_PREPROCESSORS, "vader", "reward_pairs")


def data_settings(data_cfg: Any) -> Dict[str, Any]:
    """The ``data`` section as a plain dict, from an OmegaConf node, a DataConfig or a mapping."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(data_cfg, DictConfig):
            return OmegaConf.to_container(data_cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a dependency of the package
        pass
    if dataclasses.is_dataclass(data_cfg):
        return dataclasses.asdict(data_cfg)
    if isinstance(data_cfg, Mapping):
        return dict(data_cfg)
    raise TypeError(f"expected the `data` config section, got {type(data_cfg).__name__}")


def _file_options(name: str, pre: FilePreprocessor, options: Mapping[str, Any]) -> Dict[str, Any]:
    allowed = {**FILE_OPTIONS, **pre.options}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DataError(
            "; ".join(f"`data.options.{k}`: not an option of the {name} preprocessor" for k in unknown)
            + f" (its options: {', '.join(sorted(allowed)) or 'none'})"
        )
    merged = {**allowed, **options}
    for key, default in allowed.items():
        value = merged[key]
        if isinstance(default, bool) and not isinstance(value, bool):
            raise DataError(f"`data.options.{key}`: expected true or false, got {value!r}")
        if key in FILE_OPTIONS and value is not None and not isinstance(value, str):
            raise DataError(f"`data.options.{key}`: expected a split name, got {value!r}")
    return merged


def read_pairs(
    source: RowSource,
    *,
    name: str,
    pre: FilePreprocessor,
    columns: Mapping[str, str],
    options: Mapping[str, Any],
    policy: RowPolicy,
    drops: DropReport,
    duplicates: DuplicateRows,
) -> Tuple[List[PreferencePair], List[str]]:
    """Every valid pair of one input (a file, a saved folder's split or a Hub split), in order, and the
    files read. An input with no rows, or a column wrong for all of it, is one :class:`DataError`."""
    if source.schema is not None:
        check_schema(source.name, source.schema, pre.kinds, pre.required, columns, name)
    if source.column_names is not None:
        # Required fields, and every column data.columns names explicitly, must exist in a columnar file.
        wanted = list(pre.required) + [c for c in columns if c not in pre.required]
        missing = [c for c in wanted if columns.get(c, c) not in source.column_names]
        if missing:
            named = ", ".join(f"'{columns.get(c, c)}'" + (f" (as {c})" if c in columns else "") for c in missing)
            raise DataError(
                f"{source.name}: no column {named} for the {name} preprocessor; the columns are "
                f"{', '.join(source.column_names)} (rename with data.columns)"
            )
    kwargs = {k: v for k, v in options.items() if k in pre.options}
    pairs: List[PreferencePair] = []
    first_row: Dict[str, int] = {}
    rows_read = 0
    tally: Counter = Counter()  # (reason, field) of this input's bad rows
    first_detail: Dict[Tuple[str, Optional[str]], str] = {}
    for row_index, raw in source.rows:
        rows_read += 1
        if isinstance(raw, BadRow):
            policy.bad_row(source.name, row_index, raw)
            continue
        row = Row(raw, columns)
        try:
            check_encodable(raw)
            pair = pre.convert(row, file=source.name, row_index=row_index, stem=source.stem, **kwargs)
        except BadRow as bad:
            tally[(bad.reason, bad.field)] += 1
            first_detail.setdefault((bad.reason, bad.field), bad.detail)
            policy.bad_row(source.name, row_index, bad)
            continue
        copy_of = duplicates.earlier_copy(raw, source.name, row_index)
        if copy_of is not None and duplicates.drop:
            drops.add(source.name, row_index, None, DUPLICATE_ROW, f"the same as {copy_of[0]}, row {copy_of[1]}")
            continue
        if pair.id in first_row:
            policy.bad(source.name, row_index, row.label("id"), DUPLICATE_ID, f"id {pair.id!r} is already used by row {first_row[pair.id]}")
            continue
        if copy_of is not None:
            duplicates.kept[source.name] += 1
        first_row[pair.id] = row_index
        pairs.append(pair)
    drops.rows_read[source.name] = rows_read
    if rows_read == 0:
        raise DataError(f"{source.name}: read 0 rows from this {source.kind}: it holds no data")
    problem = whole_file_problem(source.name, rows_read, len(pairs), tally, first_detail)
    if problem:
        raise DataError(f"{problem}\n{drops.summary()}")
    return pairs, source.files


def split_key(pair: PreferencePair) -> str:
    """What the held-out split hashes: the pair id, or a preprocessor's group key (e.g. UltraFeedback's
    prompt_id, so one prompt never lands in both splits)."""
    return str(pair.extra.get("split_key", pair.id))


def fingerprint(train: Sequence[PreferencePair], heldout: Sequence[PreferencePair]) -> str:
    """sha256 over the normalized pairs of both splits, in order (ids, texts, tie, weight, soft label,
    extra); independent of where the files lie."""
    digest = hashlib.sha256(FINGERPRINT_VERSION)
    for split, pairs in (("train", train), ("heldout", heldout)):
        digest.update(f"[{split}] {len(pairs)}\n".encode())
        for p in pairs:
            record = [p.id, p.prompt, p.chosen, p.rejected, p.is_tie, p.weight, p.soft_label, p.extra]
            digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8"))
            digest.update(b"\n")
    return digest.hexdigest()


def _without_training_ids(heldout: List[PreferencePair], train: List[PreferencePair], policy: RowPolicy) -> List[PreferencePair]:
    """Held-out pairs whose id is also a training id are bad rows: they would be scored after training on them."""
    train_by_id = {p.id: p for p in train}
    kept = []
    for pair in heldout:
        other = train_by_id.get(pair.id)
        if other is None:
            kept.append(pair)
            continue
        policy.bad(
            pair.source_file, pair.source_row, "id", DUPLICATE_ID,
            f"id {pair.id!r} is also a training pair ({other.source_file}, row {other.source_row}); "
            "a held-out pair must not be trained on",
        )
    return kept


def _cap(pairs: List[PreferencePair], limit: Optional[int], key: str, drops: DropReport) -> List[PreferencePair]:
    if limit is None:
        return pairs
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise DataError(f"`data.{key}`: expected null or an integer >= 0, got {limit!r}")
    drops.note(f"pairs beyond data.{key}={limit} (valid, not used)", max(0, len(pairs) - limit))
    return pairs[:limit]


def load_splits(data_cfg: Any, generate: Optional[Generate] = None) -> LoadedSplits:
    """Read, normalize, validate and split the data described by ``data_cfg`` (the ``data`` section).

    ``generate`` samples and scores completions for the ``reward_pairs`` preprocessor
    (:mod:`data_prep.reward_pairs`); ``dpo-zoo prep`` passes one built on the reference model.

    Raises :class:`DataError` at the first bad row with ``on_bad_row: error``; with ``skip`` the bad rows
    are in ``LoadedSplits.drops``. Raises too when no training pair is left.
    """
    s = data_settings(data_cfg)
    name = s.get("preprocessor", "generic")
    if name not in PREPROCESSORS:
        raise DataError(f"`data.preprocessor`: {name!r} is not one of {', '.join(PREPROCESSORS)}")
    drops = DropReport()
    policy = RowPolicy(s.get("on_bad_row", "error"), drops)
    fraction = s.get("heldout_fraction", 0.1)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise DataError(f"`data.heldout_fraction`: must be in [0, 1), got {fraction!r}")
    options = dict(s.get("options") or {})
    train_path, heldout_path = s.get("train_path"), s.get("heldout_path")
    hub = hub_settings(s)
    stats: Dict[str, Any] = {"preprocessor": name}
    origin: Dict[str, Any] = {}
    warnings: List[str] = []
    has_heldout = bool(heldout_path)

    if name == "reward_pairs":
        for key, given in (("data.hub.path", hub is not None), ("data.columns", bool(s.get("columns"))),
                           ("data.heldout_path", bool(heldout_path))):
            if given:
                raise DataError(f"`{key}`: the reward_pairs preprocessor samples its own pairs from prompts "
                                "(data.options.prompts) and splits them by prompt; remove it")
        train, heldout, sources, pair_stats, origin = load_reward_pairs(
            train_path, heldout_fraction=fraction, options=options, policy=policy, drops=drops, generate=generate)
        stats.update(pair_stats)
    elif name == "vader":
        if hub is not None:
            raise DataError("`data.hub.path`: the vader preprocessor reads the VADER ratings (data.train_path), "
                            "not a Hub data set; set data.hub.path to null")
        if s.get("columns"):
            raise DataError("`data.columns`: the vader preprocessor reads a fixed layout; remove data.columns")
        if heldout_path:
            raise DataError(
                "`data.heldout_path`: the vader preprocessor splits by snippet itself (data.heldout_fraction); "
                "set data.heldout_path to null"
            )
        result = load_vader(train_path, heldout_fraction=fraction, options=options, policy=policy, drops=drops)
        train, heldout, sources = result.train, result.heldout, result.sources
        stats.update(result.stats)
    else:
        pre = FILE_PREPROCESSORS[name]
        opts = _file_options(name, pre, options)
        columns = check_columns(s.get("columns") or {}, pre.columns, name)
        if not train_path and hub is None:
            raise DataError(f"`data.train_path` (or `data.hub.path`): required by the {name} preprocessor")
        drop_duplicates = s.get("drop_duplicate_rows", False)
        if not isinstance(drop_duplicates, bool):
            raise DataError(f"`data.drop_duplicate_rows`: expected true or false, got {drop_duplicates!r}")
        duplicates = DuplicateRows(drop_duplicates)
        common = dict(name=name, pre=pre, columns=columns, options=opts, policy=policy, drops=drops,
                      duplicates=duplicates)
        hub_data = open_hub(hub) if hub is not None else None

        def open_source(role: str) -> RowSource:
            if hub_data is not None:
                return hub_data.rows(role)
            return open_rows(train_path if role == "train" else heldout_path, role=role, split=opts.get(f"{role}_split"))

        has_heldout = bool(heldout_path) or (hub is not None and hub.heldout_split is not None)
        if hub_data is not None and hub_data.origin:  # a Hub data set (a local folder has no origin beyond its rows)
            origin = {**hub_data.origin, "split": hub_data.pick_split("train"),
                      "heldout_split": hub_data.pick_split("heldout") if has_heldout else None}
        train, sources = read_pairs(open_source("train"), **common)
        if has_heldout:
            heldout, heldout_files = read_pairs(open_source("heldout"), **common)
            sources = sources + [f for f in heldout_files if f not in sources]
            heldout = _without_training_ids(heldout, train, policy)
        else:
            held = [heldout_by_hash(split_key(p), fraction) for p in train]
            heldout = [p for p, h in zip(train, held) if h]
            train = [p for p, h in zip(train, held) if not h]
        warnings += duplicates.warnings()
        drops.note("exact duplicate rows, kept (data.drop_duplicate_rows=true drops them)", sum(duplicates.kept.values()))
    stats["train_pairs_before_cap"], stats["heldout_pairs_before_cap"] = len(train), len(heldout)
    train = _cap(train, s.get("max_train_pairs"), "max_train_pairs", drops)
    heldout = _cap(heldout, s.get("max_heldout_pairs"), "max_heldout_pairs", drops)
    if not train:
        where = train_path or (hub.describe() if hub is not None else "the VADER data")
        raise DataError(f"{where}: no training pairs left.\n{drops.summary()}")
    if has_heldout and not stats["heldout_pairs_before_cap"]:
        where, key = (heldout_path, "data.heldout_path names this file") if heldout_path else (
            f"{hub.path}:{hub.heldout_split}", "data.hub.heldout_split names this split")
        raise DataError(f"{where}: no held-out pairs left ({key}; set it to null "
                        f"to split the held-out pairs off the training data).\n{drops.summary()}")
    stats["train_pairs"], stats["heldout_pairs"] = len(train), len(heldout)
    return LoadedSplits(train, heldout, drops, list(sources), fingerprint(train, heldout), stats, origin, warnings)
