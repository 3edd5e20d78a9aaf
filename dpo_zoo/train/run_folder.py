"""The run folder ``dpo-zoo train`` writes and ``dpo-zoo compare`` reads (``train.output_dir``)::

    config.yaml     the resolved config of the last run started here
    logs.jsonl      one JSON record per logged step / evaluation / event (appended)
    tensorboard/    the same scalars for TensorBoard (train.report_to=tensorboard, the default)
    checkpoints/    DeepSpeed checkpoints with a checksummed manifest each (``step-0000010``, ...;
                    ``latest`` names the newest verified one): see :mod:`dpo_zoo.train.checkpoints`
    final/          the trained weights (``save_pretrained``: full model, or the LoRA adapter alone)
    final/README.md the Hub model card (:mod:`dpo_zoo.train.model_card`)
    run.json        written last: the loss, its hyperparameters, the base model, the reference mode, the
                    prepared set and its cache key, the final metrics, and the resolved config

A run is *finished* when ``run.json`` and ``final/`` exist. Its *training identity* is what its
weights depend on: the resolved config less the settings that only change how a run is watched
(:data:`WATCH_ONLY_SETTINGS`), and the cache key of the prepared set. A finished run is reused, and a
checkpoint resumed, only when the identity is unchanged; :func:`identity_changes` names what differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from dpo_zoo.errors import UserError
from dpo_zoo.staleness import differences

CONFIG_FILE = "config.yaml"
LOGS_FILE = "logs.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
FINAL_DIR = "final"
RUN_FILE = "run.json"

# Fields every run.json has (compare reads them).
RUN_RECORD_FIELDS = ("loss", "loss_hparams", "base_model")

# Settings that change how a run is watched, where it is kept or where it starts, not what it computes:
# a finished run is reused, and a checkpoint resumed (also in a moved or copied run folder), whatever
# their values.
WATCH_ONLY_SETTINGS = ("output_dir", "progress", "log_every", "eval_every", "save_every", "keep_checkpoints",
                       "overwrite", "resume", "report_to", "project", "run_name",
                       "distributed_timeout_s", "stop_grace_s", "health")
# Model settings that change how the values are computed, not the values (beyond float rounding).
RUNTIME_ONLY_MODEL_SETTINGS = ("padding_free", "attention")


class RunFolderError(UserError, ValueError):
    """A run folder's ``run.json`` cannot be read (names the file and the field)."""


def is_finished(folder: Path) -> bool:
    """Whether ``folder`` holds a finished run (``run.json`` and ``final/``)."""
    return (Path(folder) / RUN_FILE).is_file() and (Path(folder) / FINAL_DIR).is_dir()


def read_run_record(folder: Path) -> Dict[str, Any]:
    """The ``run.json`` of ``folder``, checked for the fields every run record has."""
    path = Path(folder) / RUN_FILE
    try:
        record = json.loads(path.read_text())
    except ValueError as err:
        raise RunFolderError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise RunFolderError(f"{path}: expected a JSON object")
    for key in RUN_RECORD_FIELDS:
        if key not in record:
            raise RunFolderError(f"{path}: missing field `{key}` (was it written by `dpo-zoo train`?)")
    return record


def write_run_record(folder: Path, record: Dict[str, Any]) -> None:
    """Write ``run.json`` (the last file of a finished run), atomically: its presence marks the run finished."""
    from dpo_zoo.files import atomic_write_text

    atomic_write_text(Path(folder) / RUN_FILE, json.dumps(record, indent=2, default=str))


def training_identity(config: Dict[str, Any], cache_key: Dict[str, Any]) -> Dict[str, Any]:
    """What a run's weights depend on: the resolved ``config`` (a plain dict) less
    :data:`WATCH_ONLY_SETTINGS` and :data:`RUNTIME_ONLY_MODEL_SETTINGS`, and the ``cache_key`` of the prepared set it trains on. run.json
    records both (``config``, ``cache_key``); every checkpoint stores the identity itself."""
    config = json.loads(json.dumps(config, default=str))
    for key in WATCH_ONLY_SETTINGS:
        config.get("train", {}).pop(key, None)
    for key in RUNTIME_ONLY_MODEL_SETTINGS:
        config.get("model", {}).pop(key, None)
    return {"config": config, "cache_key": dict(cache_key)}


def identity_changes(stored: Dict[str, Any], identity: Dict[str, Any]) -> List[str]:
    """Dotted names of what differs between a stored identity and the current one, e.g.
    ``["train.learning_rate", "prepared set (cache key: data)"]``; empty when they match."""
    changes = [".".join(path) for path, _, _ in differences(stored.get("config", {}), identity["config"], depth=2)]
    fields = [path[0] for path, _, _ in differences(stored.get("cache_key") or {}, identity["cache_key"], depth=1)]
    if fields:
        changes.append(f"prepared set (cache key: {', '.join(fields)})")
    return changes


def finished_run_changes(folder: Path, identity: Dict[str, Any]) -> Optional[List[str]]:
    """None when ``folder`` holds no finished run; else what differs between that run's identity
    (from its run.json) and ``identity`` (empty: the same run)."""
    if not is_finished(folder):
        return None
    record = json.loads((Path(folder) / RUN_FILE).read_text())
    return identity_changes(training_identity(record.get("config", {}), record.get("cache_key") or {}), identity)
