"""Preference data from the Hugging Face Hub, or from a local folder laid out like a Hub data-set
repository, read with ``datasets`` (``data.hub`` in the config).

The data set is resolved and prepared by ``datasets.load_dataset_builder(path, name, data_dir=...,
data_files=..., revision=...)`` and ``download_and_prepare()`` (what ``datasets.load_dataset`` does), so
the usual settings apply: ``HF_TOKEN`` for private or gated sets, ``HF_HOME`` / ``HF_DATASETS_CACHE`` for
the cache, ``HF_HUB_OFFLINE=1`` to use only what is cached, ``HF_ENDPOINT`` for another Hub. Data-set
loading scripts are never run (``datasets`` no longer supports them).

Every split is then read row by row like a file (:class:`~data_prep.readers.RowSource`), named
``org/name:split`` in errors and drop reports, and validated by the preprocessor like any file.

What enters the prepared set's cache key (:attr:`HubData.origin`): the data set, its configuration,
``data_dir``, ``data_files``, the splits and the commit the revision resolved to (a ``main`` that moved
is then a miss that names ``data_source``); the rows' content enters it through the pairs' fingerprint,
as for files. A local folder has no revision: its content alone keys it.

Offline, ``datasets`` serves the newest cached commit of a data set whatever revision is asked for; the
commit a branch or tag named when last resolved online is kept in huggingface_hub's cache
(``refs/<revision>``), and a mismatch is an error rather than silently other data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from .errors import DataError

from .readers import DEFAULT_SPLITS, RowSource, dataset_rows

COMMIT = re.compile(r"[0-9a-f]{40}")
HUB_KEYS = ("path", "name", "data_dir", "data_files", "revision", "split", "heldout_split")


@dataclass(frozen=True)
class HubSettings:
    """``data.hub``, checked (see ``HubDataConfig`` in dpo_zoo/config.py)."""

    path: str
    name: Optional[str] = None
    data_dir: Optional[str] = None
    data_files: Any = None
    revision: str = "main"
    split: Optional[str] = None
    heldout_split: Optional[str] = None

    @property
    def local(self) -> bool:
        """A local folder laid out like a Hub repository (``datasets`` tries a folder first too)."""
        return Path(self.path).expanduser().is_dir()

    def describe(self) -> str:
        """The data set as named in messages: ``org/name`` with whatever narrows it."""
        parts = [f"name={self.name}" if self.name else "", f"data_dir={self.data_dir}" if self.data_dir else "",
                 f"data_files={self.data_files}" if self.data_files else "",
                 f"revision={self.revision}" if not self.local else ""]
        narrowed = ", ".join(p for p in parts if p)
        return f"{self.path} ({narrowed})" if narrowed else self.path


def hub_settings(data: Mapping[str, Any]) -> Optional[HubSettings]:
    """``data.hub`` of the ``data`` settings as :class:`HubSettings`, or None when ``data.hub.path`` is
    not set. Raises :class:`DataError` naming the key for a setting that contradicts another."""
    hub = dict(data.get("hub") or {})
    unknown = sorted(set(hub) - set(HUB_KEYS))
    if unknown:
        raise DataError(f"`data.hub.{unknown[0]}`: unknown key (known: {', '.join(HUB_KEYS)})")
    path = hub.get("path")
    if path is None:
        stray = [k for k in HUB_KEYS if k != "path" and hub.get(k) not in (None, "main" if k == "revision" else None)]
        if stray:
            raise DataError(f"`data.hub.{stray[0]}`: set without data.hub.path (which data set?)")
        return None
    if not isinstance(path, str) or not path.strip():
        raise DataError(f"`data.hub.path`: expected a data set name (org/name) or a folder, got {path!r}")
    for key in ("name", "data_dir", "split", "heldout_split"):
        if hub.get(key) is not None and (not isinstance(hub[key], str) or not hub[key]):
            raise DataError(f"`data.hub.{key}`: expected a non-empty string or null, got {hub[key]!r}")
    revision = hub.get("revision") or "main"
    if not isinstance(revision, str):
        raise DataError(f"`data.hub.revision`: expected a branch, tag or commit, got {revision!r}")
    _check_data_files(hub.get("data_files"))
    if data.get("train_path"):
        raise DataError("`data.hub.path` and `data.train_path` both name the training data; set one of them to null")
    if hub.get("heldout_split") and data.get("heldout_path"):
        raise DataError("`data.hub.heldout_split` and `data.heldout_path` both name the held-out data; set one to null")
    if hub.get("split") and hub.get("split") == hub.get("heldout_split"):
        raise DataError(f"`data.hub.heldout_split`: {hub['split']!r} is also the training split; a held-out pair "
                        "must not be trained on (set it to null to hold out data.heldout_fraction instead)")
    settings = HubSettings(path=path, name=hub.get("name"), data_dir=hub.get("data_dir"),
                           data_files=hub.get("data_files"), revision=revision, split=hub.get("split"),
                           heldout_split=hub.get("heldout_split"))
    if settings.local and revision != "main":
        raise DataError(f"`data.hub.revision`: {path} is a local folder, which has no revisions; remove the setting")
    return settings


def _check_data_files(value: Any) -> None:
    def files(v: Any) -> bool:
        return isinstance(v, str) and bool(v) or isinstance(v, list) and bool(v) and all(isinstance(x, str) and x for x in v)

    if value is None or files(value):
        return
    if isinstance(value, Mapping) and value and all(isinstance(k, str) and files(v) for k, v in value.items()):
        return
    raise DataError(f"`data.hub.data_files`: expected a file pattern, a list of them, or {{split: pattern(s)}}, got {value!r}")


@dataclass
class HubData:
    """The prepared data set: its builder (splits on disk) and what identifies it (``origin``)."""

    settings: HubSettings
    builder: Any
    splits: List[str]
    origin: Dict[str, Any] = field(default_factory=dict)

    def pick_split(self, role: str) -> str:
        """The split of ``role`` ("train" or "heldout"); raises naming the splits there are."""
        wanted = self.settings.split if role == "train" else self.settings.heldout_split
        key = "split" if role == "train" else "heldout_split"
        if wanted is None:
            wanted = next((s for s in DEFAULT_SPLITS["train"] if s in self.splits), None)
            if wanted is None and len(self.splits) == 1:
                wanted = self.splits[0]
            if wanted is None:
                raise DataError(f"{self.settings.describe()}: no split named {' or '.join(DEFAULT_SPLITS['train'])}; "
                                f"it has {', '.join(self.splits)} (name one with data.hub.split)")
        if wanted not in self.splits:
            raise DataError(f"{self.settings.describe()}: no split {wanted!r} (data.hub.{key}); it has "
                            f"{', '.join(self.splits)}")
        return wanted

    def rows(self, role: str) -> RowSource:
        split = self.pick_split(role)
        dataset = self.builder.as_dataset(split=split)
        files = [entry["filename"] for entry in (dataset.cache_files or [])]
        name = f"{self.settings.path}:{split}"
        return RowSource(name, f"{Path(self.settings.path).name}/{split}", files, dataset_rows(dataset),
                         column_names=list(dataset.column_names), schema=dataset.features.arrow_schema, kind="split")


def _cached_commit(path: str, revision: str) -> Optional[str]:
    """The commit ``revision`` of data set ``path`` named when last resolved online: itself when it is a
    commit hash, else the ref that huggingface_hub's cache keeps (``refs/<revision>``); None if unknown."""
    if COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=path, repo_type="dataset") / "refs" / revision
    return ref.read_text(encoding="utf-8").strip() if ref.is_file() else None


def open_hub(settings: HubSettings) -> HubData:
    """Resolve, download (unless cached) and prepare the data set; every failure is a :class:`DataError`
    that names the data set, the revision and what to do."""
    import datasets
    from datasets.data_files import EmptyDatasetError
    from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError

    where = settings.describe()
    try:
        builder = datasets.load_dataset_builder(
            settings.path, settings.name, data_dir=settings.data_dir, data_files=settings.data_files,
            revision=None if settings.local else settings.revision,
        )
        builder.download_and_prepare()
    except DatasetNotFoundError as err:
        raise DataError(f"{where}: not found on the Hub ({err}). Check the name and revision; a private or gated "
                        "data set needs a token (HF_TOKEN or `huggingface-cli login`)") from None
    except ConnectionError as err:
        raise DataError(f"{where}: the Hub cannot be reached and the data set is not in the local cache "
                        f"({datasets.config.HF_DATASETS_CACHE}): {err}. Run once with network access (without "
                        "HF_HUB_OFFLINE=1) to download it, or point data.hub.path at a local copy") from None
    except (DataFilesNotFoundError, EmptyDatasetError) as err:
        raise DataError(f"{where}: no data files found ({err}); check data.hub.data_dir / data.hub.data_files") from None
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:
        raise DataError(f"{where}: cannot be read by datasets: {type(err).__name__}: {err}") from None
    splits = list(builder.info.splits or {})
    if not splits:
        raise DataError(f"{where}: the data set has no splits")
    origin: Dict[str, Any] = {}
    if not settings.local:
        resolved = builder.hash if isinstance(builder.hash, str) else None
        if datasets.config.HF_HUB_OFFLINE:
            # Offline, datasets reads the newest cached commit of the data set, whatever revision was asked
            # for: check it against the commit the revision named when it was last resolved online.
            expected = _cached_commit(settings.path, settings.revision)
            if expected and resolved and resolved != expected:
                raise DataError(
                    f"{where}: offline (HF_HUB_OFFLINE=1), datasets reads only the newest cached commit of the data "
                    f"set, {resolved}, but revision {settings.revision} is {expected}; run once with network "
                    f"access, or set data.hub.revision={resolved}")
        origin = {"hub": settings.path, "name": settings.name, "data_dir": settings.data_dir,
                  "data_files": settings.data_files, "revision": settings.revision, "commit": resolved,
                  "split": settings.split, "heldout_split": settings.heldout_split}
    return HubData(settings, builder, splits, origin)
