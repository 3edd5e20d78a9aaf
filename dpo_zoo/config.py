"""Configuration: typed dataclasses, YAML files holding only what differs, dotted overrides.

One experiment file serves every command (``dpo-zoo prep X.yaml``, ``dpo-zoo train X.yaml loss=sampo``,
``dpo-zoo compare ...``): each reads the sections it needs. Rules:

* the schema is :class:`ExperimentConfig` (OmegaConf structured config); YAML files and command-line
  ``a.b=value`` overrides are merged onto its defaults, in order;
* an unknown key, a value of the wrong type or an out-of-range value is an error that names the key;
  every error is collected and reported at once (:class:`ConfigError`);
* ``loss=<name>`` picks a loss: a preset file ``configs/loss/<name>.yaml`` if one exists, else a
  registered loss name; ``loss.<hparam>=v`` sets a hyperparameter, validated against that loss's own
  dataclass, so ``loss.bta=0.1`` is an error naming ``loss.bta``;
* configs never run code: YAML is parsed with OmegaConf (safe loader), and interpolations are limited
  to ``${...}`` references inside the config (no custom resolvers are registered).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dpo_zoo.config_schema import (  # noqa: F401 (the schema's names are part of this module's API)
    CHOICES,
    NON_NEGATIVE,
    NULLABLE,
    POSITIVE,
    CompareConfig,
    DataConfig,
    DeepSpeedConfig,
    ExperimentConfig,
    HubDataConfig,
    LoraConfig,
    ModelConfig,
    PrepConfig,
    TrainConfig,
    one_of,
)


# The values of ``train.report_to``; each has an adapter in :mod:`dpo_zoo.train.tracking` (which checks
# that its table lists exactly these).
NO_TRACKER = "none"
TRACKER_NAMES = ("tensorboard", "wandb", "mlflow", "trackio")
TRACKER_CHOICES = (NO_TRACKER, *TRACKER_NAMES)


def report_to_names(value: Any) -> List[str]:
    """``train.report_to`` as a list of tracker names: a name, or a list of names; ``none`` (alone)
    or an empty list is no tracker. Raises ``ValueError`` naming the bad value and the choices."""
    names = [value] if isinstance(value, str) else value
    if names is None or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"must be a tracker name or a list of them ({', '.join(TRACKER_CHOICES)}), got {value!r}")
    unknown = [n for n in names if n not in TRACKER_CHOICES]
    if unknown:
        raise ValueError(f"{', '.join(map(repr, unknown))} is not one of {', '.join(TRACKER_CHOICES)}")
    if NO_TRACKER in names and len(names) > 1:
        raise ValueError(f"'none' cannot be combined with trackers, got {list(names)}")
    return [n for n in dict.fromkeys(names) if n != NO_TRACKER]


REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """One or more configuration problems; ``errors`` lists each, naming the key and the source."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.errors))


# ==================================================================== loading


def _flatten(node: Any, prefix: str = "") -> List[Tuple[str, Any]]:
    """Dotted (key, leaf) pairs of a plain nested dict; dicts under ``loss``/``columns``/``options``/
    ``hub.data_files`` and empty dicts stay leaves so their own rules apply."""
    out: List[Tuple[str, Any]] = []
    if isinstance(node, dict) and node and prefix not in ("data.columns", "data.options", "data.hub.data_files"):
        for key, value in node.items():
            out.extend(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    else:
        out.append((prefix, node))
    return out


def _parse_override(text: str) -> Tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"override '{text}' is not of the form key=value")
    key, _, raw = text.partition("=")
    # OmegaConf's dotlist grammar gives YAML-typed values (numbers, booleans, null, lists).
    parsed = OmegaConf.from_dotlist([f"v={raw}"])
    return key.strip(), OmegaConf.to_container(parsed, resolve=False)["v"]


def loss_preset_dirs() -> List[Path]:
    """Where ``loss=<name>`` looks for preset files: ./configs/loss, then the repo's configs/loss."""
    dirs = [Path.cwd() / "configs" / "loss", REPO_ROOT / "configs" / "loss"]
    seen, out = set(), []
    for d in dirs:
        if d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


def find_loss_preset(name: str) -> Optional[Path]:
    for directory in loss_preset_dirs():
        candidate = directory / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    return None


def read_yaml(path: Path) -> Dict[str, Any]:
    try:
        loaded = OmegaConf.load(str(path))
    except (OSError, OmegaConfBaseException, Exception) as err:  # yaml errors are not OmegaConf's
        raise ConfigError([f"{path}: cannot read: {err}"]) from None
    if isinstance(loaded, ListConfig):
        raise ConfigError([f"{path}: expected a mapping at the top level, found a list"])
    return OmegaConf.to_container(loaded, resolve=False) or {}


def load_config(
    files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    schema: type = ExperimentConfig,
) -> DictConfig:
    """Merge YAML ``files`` and dotted ``overrides`` onto ``schema``'s defaults; check everything.

    Returns a resolved, read-only :class:`DictConfig`. Raises :class:`ConfigError` listing every
    problem (unknown keys, wrong types, bad values), each with the file or override it came from.
    """
    errors: List[str] = []
    cfg = OmegaConf.structured(schema)
    loss_entries: List[Tuple[str, str, Any]] = []  # (source, key under loss, value)

    sources: List[Tuple[str, List[Tuple[str, Any]]]] = []
    for path in files:
        try:
            sources.append((str(path), _flatten(read_yaml(Path(path)))))
        except ConfigError as err:
            errors.extend(err.errors)
    for text in overrides:
        try:
            key, value = _parse_override(text)
            sources.append((f"override '{text}'", _flatten({key: value}) if isinstance(value, dict) else [(key, value)]))
        except ValueError as err:
            errors.append(str(err))

    for source, pairs in sources:
        for key, value in pairs:
            if key == "loss" or key.startswith("loss."):
                loss_entries.append((source, key[len("loss.") :] if key != "loss" else "", value))
                continue
            try:
                OmegaConf.update(cfg, key, value, merge=True, force_add=False)
            except OmegaConfBaseException as err:
                if re.search(r"Key '[^']*' not in '", str(err)):  # an unknown key: say so, and what was meant
                    errors.append(f"{source}: `{key}`: unknown key{_key_hint(cfg, key)}")
                else:
                    errors.append(f"{source}: `{key}`: {_omegaconf_message(err)}")

    loss_section = _resolve_loss_section(loss_entries, errors)
    if loss_section is not None:
        cfg.loss = loss_section

    errors.extend(_check_values(cfg))
    if not errors:
        try:
            OmegaConf.resolve(cfg)
        except OmegaConfBaseException as err:
            errors.append(f"interpolation: {_omegaconf_message(err)}")
    if errors:
        raise ConfigError(errors)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _key_hint(cfg: DictConfig, key: str) -> str:
    """The hint for an unknown dotted key (:func:`dpo_zoo.config_hints.key_hint`)."""
    from dpo_zoo.config_hints import key_hint

    return key_hint([dotted for dotted, _ in _flatten(OmegaConf.to_container(cfg, resolve=False))], key)


def _omegaconf_message(err: Exception) -> str:
    message = str(err).split("\n")[0]
    return message.replace("Key '", "unknown key '") if "not in struct" in str(err) else message


def _resolve_loss_section(entries: List[Tuple[str, str, Any]], errors: List[str]) -> Optional[Dict[str, Any]]:
    """Build the ``loss`` section: its name (preset file or registered name) and checked hparams."""
    from dpo_zoo.losses import LossConfigError, get_loss_entry, load_loss_plugin
    from dpo_zoo.losses.options import OPTION_KEYS

    name, hparams, plugin = "dpo", {}, None
    hparam_sources: Dict[str, str] = {}
    for source, key, value in entries:
        if key in ("", "name"):
            if isinstance(value, dict):  # `loss: {name: x, beta: y}` written as one mapping
                for sub_key, sub_value in value.items():
                    entries.append((source, str(sub_key), sub_value))
                continue
            # A list of names is a mixture (TRL's loss_type list): [sigmoid, bco_pair, sft] = sigmoid+bco_pair+sft.
            name = "+".join(map(str, value)) if isinstance(value, list) else str(value)
            preset = find_loss_preset(name)
            if preset is not None:
                preset_values = read_yaml(preset)
                name = str(preset_values.pop("name", name))
                hparams = dict(preset_values)
                hparam_sources = {k: str(preset) for k in hparams}
            else:
                hparams, hparam_sources = {}, {}
        elif key == "plugin":
            plugin = value
        elif isinstance(value, dict) and value:  # a mixture part's keys written as a mapping: dpo: {beta: 0.1}
            for sub_key, sub_value in value.items():
                entries.append((source, f"{key}.{sub_key}", sub_value))
        else:
            hparams[key] = value
            hparam_sources[key] = source

    if plugin:
        try:
            load_loss_plugin(str(plugin))
        except Exception as err:  # an import error of the user's module, named
            errors.append(f"loss.plugin: cannot import '{plugin}': {err}")
            return None
    try:
        entry = get_loss_entry(name)
    except LossConfigError as err:
        errors.append(f"loss: {err}")
        return None
    # A mixture's shared keys (loss.beta) become its parts' own (loss.dpo.beta); a plain loss's stay.
    expanded = entry.expand_shared(hparams)
    hparam_sources = {k: hparam_sources.get(k) or hparam_sources.get(k.partition(".")[2], "") for k in expanded}
    hparams = expanded
    known = set(entry.defaults()) | set(OPTION_KEYS)  # options any loss takes (use_weighting, sync_ref_model, ...)
    for key in sorted(set(hparams) - known):
        errors.append(
            f"{hparam_sources[key]}: `loss.{key}`: unknown hyperparameter of loss '{name}' "
            f"(known: {', '.join(sorted(known))})"
        )
    good = {k: v for k, v in hparams.items() if k in known}
    for key, problem in entry.type_problems(good).items():
        errors.append(f"{hparam_sources[key]}: `loss.{key}`: {problem}")
        good.pop(key)
    try:
        entry.build(**good)
    except LossConfigError as err:
        errors.append(f"loss: {err}")
        return None
    section = {"name": name, **{**entry.defaults(), **good}}
    if plugin:
        section["plugin"] = plugin
    return section


def _lookup(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def _check_values(cfg: DictConfig) -> List[str]:
    errors = []
    for key, allowed in CHOICES.items():
        value = _lookup(cfg, key)
        if value not in allowed:
            errors.append(f"`{key}`: {value!r} is not one of {', '.join(allowed)}")
    for key in POSITIVE:
        value = _lookup(cfg, key)
        if value is None and key in NULLABLE:
            continue
        if value is None or value <= 0:
            errors.append(f"`{key}`: must be > 0, got {value!r}")
    for key in NON_NEGATIVE:
        value = _lookup(cfg, key)
        if value is None or value < 0:
            errors.append(f"`{key}`: must be >= 0, got {value!r}")
    if not 0.0 <= cfg.data.heldout_fraction < 1.0:
        errors.append(f"`data.heldout_fraction`: must be in [0, 1), got {cfg.data.heldout_fraction}")
    if not cfg.train.distributed_timeout_s > 0:
        errors.append(f"`train.distributed_timeout_s`: must be > 0, got {cfg.train.distributed_timeout_s}")
    if cfg.train.keep_checkpoints is not None and cfg.train.keep_checkpoints < 1:
        errors.append(f"`train.keep_checkpoints`: must be >= 1 (or null: keep all), got {cfg.train.keep_checkpoints}")
    try:
        report_to_names(OmegaConf.to_container(cfg.train.report_to) if isinstance(cfg.train.report_to, ListConfig)
                        else cfg.train.report_to)
    except ValueError as err:
        errors.append(f"`train.report_to`: {err}")
    if cfg.train.min_lr_ratio is not None and not 0.0 <= cfg.train.min_lr_ratio <= 1.0:
        errors.append(f"`train.min_lr_ratio`: must be in [0, 1], got {cfg.train.min_lr_ratio}")
    if cfg.train.lr_schedule == "warmup_stable_decay" and not (cfg.train.decay_steps or 0) > 0:
        errors.append(f"`train.decay_steps`: train.lr_schedule=warmup_stable_decay needs a number of decay steps > 0, "
                      f"got {cfg.train.decay_steps!r}")
    if cfg.train.deepspeed.zero_stage not in (None, 0, 1, 2, 3):
        errors.append(f"`train.deepspeed.zero_stage`: must be 0, 1, 2 or 3, got {cfg.train.deepspeed.zero_stage}")
    if cfg.prep.max_prompt_length is not None and cfg.prep.max_prompt_length >= cfg.prep.max_length:
        errors.append(
            f"`prep.max_prompt_length` ({cfg.prep.max_prompt_length}) must be smaller than "
            f"`prep.max_length` ({cfg.prep.max_length})"
        )
    return errors


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_resolved(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config (every default filled in) next to an output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))


def as_dict(cfg: DictConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def loss_hparams(cfg: DictConfig) -> Tuple[str, Dict[str, Any]]:
    """(loss name, hyperparameters) of a loaded config."""
    section = dict(as_dict(cfg)["loss"])
    section.pop("plugin", None)
    return section.pop("name"), section
