"""Hints for a mistyped config key: the names users bring from TRL / transformers (``lr``,
``per_device_train_batch_size``, ...) and the closest known keys by spelling."""

from __future__ import annotations

from typing import Sequence

# Where every key is listed with its default and a comment.
CONFIG_DOC = "dpo_zoo/config_schema.py"

# Names users bring from TRL / transformers' TrainingArguments, and where dpo_zoo keeps them.
KEY_ALIASES = {
    "lr": "train.learning_rate",
    "learning_rate": "train.learning_rate",
    "per_device_train_batch_size": "train.micro_batch_size",
    "batch_size": "train.micro_batch_size",
    "gradient_accumulation": "train.gradient_accumulation_steps",
    "num_train_epochs": "train.epochs",
    "warmup": "train.warmup_steps",
    "lr_scheduler_type": "train.lr_schedule",
    "bf16": "train.precision",
    "beta": "loss.beta",
    "loss_type": "loss",
    "loss_weights": "loss.weights",
    "max_prompt_length": "prep.max_prompt_length",
    "max_length": "prep.max_length",
    "precompute_ref_log_probs": "train.reference",
    "report_to": "train.report_to",
    "run_name": "train.run_name",
}


def key_hint(known: Sequence[str], key: str) -> str:
    """``; did you mean `train.learning_rate`?`` for an unknown dotted ``key``: a known alias of its
    last part, else the closest of the ``known`` keys by spelling."""
    import difflib

    last = key.split(".")[-1]
    if last in KEY_ALIASES and KEY_ALIASES[last] != key:
        return f"; did you mean `{KEY_ALIASES[last]}`?"
    close = difflib.get_close_matches(key, list(known), n=2, cutoff=0.75)
    return f"; did you mean {' or '.join(f'`{k}`' for k in close)}?" if close else f" (known keys: see {CONFIG_DOC})"
