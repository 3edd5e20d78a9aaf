"""The subjects of ``dpo-zoo compare``: what is scored, read from the folders the user names.

A *subject* is a policy: a run folder written by ``dpo-zoo train`` (its ``run.json`` names the loss,
its hyperparameters, the base model and whether ``final/`` holds a LoRA adapter or full weights; see
:mod:`dpo_zoo.train.run_folder`), or a plain model folder (full weights, or a PEFT adapter whose
``adapter_config.json`` names a local base model). Its tokenizer must be the held-out set's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from dpo_zoo.config import loss_hparams
from dpo_zoo.errors import CompareError
from dpo_zoo.losses import get_loss_entry, load_loss_plugin, registered_losses
from dpo_zoo.train.run_folder import FINAL_DIR, RUN_FILE, RunFolderError, read_run_record


@dataclass
class Subject:
    """One policy to score, and where its pieces come from."""

    label: str
    path: Path  # what the user named
    weights_dir: Path  # final/ of a run, or the model folder
    base_model: Path  # the reference for drift, and for a live reference
    adapter: bool  # weights_dir holds a PEFT adapter on top of base_model
    losses: List[Tuple[str, Dict[str, Any]]]  # (registered name, hyperparameters): one entry each
    tokenizer_hash: str
    tokenizer_source: str  # where tokenizer_hash was read, for messages
    run_record: Optional[Dict[str, Any]] = None


def _has_tokenizer(folder: Path) -> bool:
    from dpo_zoo.model.loading import TOKENIZER_FILES

    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def parse_loss_list(losses: Optional[str]) -> Optional[List[str]]:
    """``None`` (each run's own loss), ``"all"`` (every registered name) or a comma list (checked)."""
    if losses is None:
        return None
    if losses.strip() == "all":
        return sorted(registered_losses())
    names = [name.strip() for name in losses.split(",") if name.strip()]
    if not names:
        raise CompareError("--losses: give 'all' or a comma-separated list of registered loss names")
    for name in names:
        get_loss_entry(name)  # a LossConfigError naming the unknown loss and the registered ones
    return names


def open_subject(path: str, cfg, loss_names: Optional[List[str]]) -> Subject:
    """Read a run folder (``run.json`` + ``final/``), a model folder or a Hub model name (``org/name``,
    fetched at ``model.revision`` when it is ``model.name_or_path``, else at ``main``) into a
    :class:`Subject`."""
    from dpo_zoo.model.loading import DEFAULT_REVISION, is_hub_repo_id, resolve_hub_model, resolve_model_path, tokenizer_fingerprint

    folder = Path(path)
    label = folder.name
    if not folder.exists() and is_hub_repo_id(str(path)):
        same = str(path) == str(cfg.model.name_or_path)
        folder = resolve_hub_model(str(path), str(cfg.model.revision) if same else DEFAULT_REVISION).path
        label = str(path)
    if folder.name == FINAL_DIR and (folder.parent / RUN_FILE).is_file():
        folder = folder.parent  # `runs/dpo/final` names the run `runs/dpo`
    if (folder / RUN_FILE).is_file():
        try:
            record = read_run_record(folder)
        except RunFolderError as err:
            raise CompareError(str(err)) from None
        weights_dir = folder / FINAL_DIR
        if not weights_dir.is_dir():
            raise CompareError(f"run folder {folder} has no {FINAL_DIR}/: the run did not finish")
        plugin = (record.get("config") or {}).get("loss", {}).get("plugin")
        if plugin:
            load_loss_plugin(str(plugin))
        base = _run_base_model(folder / RUN_FILE, record)
        token_hash = (record.get("cache_key") or {}).get("tokenizer")
        source = f"{folder / RUN_FILE} `cache_key.tokenizer`"
        if not token_hash:
            token_hash, source = tokenizer_fingerprint(base), f"the base model's tokenizer ({base})"
        own = [(str(record["loss"]), dict(record["loss_hparams"]))]
        adapter = bool(record.get("lora")) or (weights_dir / "adapter_config.json").is_file()
        return Subject(label=folder.name, path=folder, weights_dir=weights_dir, base_model=base, adapter=adapter,
                       losses=_entry_losses(own, loss_names), tokenizer_hash=token_hash, tokenizer_source=source,
                       run_record=record)

    if (folder / "adapter_config.json").is_file():
        try:
            adapter_config = json.loads((folder / "adapter_config.json").read_text())
        except ValueError as err:
            raise CompareError(f"{folder / 'adapter_config.json'}: not valid JSON ({err})") from None
        base = _adapter_base_model(folder / "adapter_config.json", adapter_config)
        adapter = True
    elif (folder / "config.json").is_file():
        base, adapter = resolve_model_path(cfg.model), False
    else:
        raise CompareError(
            f"{folder}: neither a run folder ({RUN_FILE} + {FINAL_DIR}/) nor a model folder (config.json or "
            "adapter_config.json)"
        )
    tokenizer_dir = folder if _has_tokenizer(folder) else base
    name, hparams = loss_hparams(cfg)
    return Subject(label=label, path=folder, weights_dir=folder, base_model=Path(base), adapter=adapter,
                   losses=_entry_losses([(name, hparams)], loss_names),
                   tokenizer_hash=tokenizer_fingerprint(tokenizer_dir),
                   tokenizer_source=f"the tokenizer files in {tokenizer_dir}")


def _run_base_model(run_file: Path, record: Dict[str, Any]) -> Path:
    """The base model of a run: the folder ``run.json`` names, or, where that folder is not on this
    machine and the base came from the Hub, the same commit fetched again (from the Hugging Face cache
    when it is there)."""
    from dpo_zoo.model.loading import resolve_hub_model

    base = Path(record["base_model"])
    if base.is_dir():
        return base
    source = record.get("base_model_source") or {}
    if source.get("commit"):
        return resolve_hub_model(str(source["name_or_path"]), str(source["commit"])).path
    raise CompareError(f"{run_file}: `base_model` {base} is not a folder on this machine")


def _adapter_base_model(config_file: Path, adapter_config: Dict[str, Any]) -> Path:
    """The base of a PEFT adapter folder: ``base_model_name_or_path`` as a local folder, else as a Hub
    repo at the adapter's ``revision`` (``main`` when it records none)."""
    from dpo_zoo.model.loading import DEFAULT_REVISION, is_hub_repo_id, resolve_hub_model

    name = str(adapter_config.get("base_model_name_or_path") or "")
    if name and Path(name).is_dir():
        return Path(name)
    if is_hub_repo_id(name):
        return resolve_hub_model(name, str(adapter_config.get("revision") or DEFAULT_REVISION)).path
    raise CompareError(
        f"{config_file}: `base_model_name_or_path` {name!r} is neither a local model folder nor a Hugging Face "
        "Hub name (org/name)"
    )


def _entry_losses(own, loss_names):
    """The ``--losses`` list, else the subject's own loss followed by its parts when it is a mixture
    (each part scored on its own, with the hyperparameters it had in the mixture)."""
    if loss_names is not None:
        return [(name, {}) for name in loss_names]
    out = []
    for name, hparams in own:
        out += [(name, hparams), *get_loss_entry(name).components(hparams)]
    return out


def check_tokenizer(subject: Subject, heldout) -> None:
    """Token ids mean nothing under another tokenizer: refuse, naming both sides and the fix."""
    expected = heldout.key.get("tokenizer")
    if expected and expected != subject.tokenizer_hash:
        raise CompareError(
            f"{subject.path} and the held-out set at {heldout.path} use different tokenizers: "
            f"{subject.tokenizer_hash[:12]}… (from {subject.tokenizer_source}) vs {str(expected)[:12]}… "
            f"({heldout.path / 'manifest.json'} `key.tokenizer`). Prepare the held-out data with this model "
            f"(model.name_or_path={subject.base_model}) and compare on that"
        )


def _unique_labels(subjects: Sequence[Subject]) -> None:
    """Folder names, made unique with their parent folder (then a counter) when two collide."""
    names = [s.label for s in subjects]
    for subject in subjects:
        if names.count(subject.label) > 1:
            subject.label = f"{subject.path.parent.name}/{subject.path.name}"
    seen: Dict[str, int] = {}
    for subject in subjects:
        seen[subject.label] = seen.get(subject.label, 0) + 1
        if seen[subject.label] > 1:
            subject.label = f"{subject.label}#{seen[subject.label]}"


# ==================================================================== models


def load_policy(subject: Subject, cfg, device: torch.device):
    """The subject's policy in eval mode, no gradients: full weights, or base + PEFT adapter.

    Safetensors only (a folder with pickled weights only is refused by :func:`check_safetensors_folder`),
    and a folder's own Python code runs only with ``model.trust_remote_code=true``.
    """
    from dpo_zoo.model.loading import check_safetensors_folder, load_model

    remote = bool(cfg.model.trust_remote_code)
    check_safetensors_folder(subject.weights_dir)
    if subject.adapter:
        from peft import PeftModel

        if not (subject.weights_dir / "adapter_model.safetensors").is_file():
            raise CompareError(f"{subject.weights_dir}: a PEFT adapter folder without adapter_model.safetensors")
        base = load_model(subject.base_model, dtype="float32", trust_remote_code=remote)
        from dpo_zoo.model.loading import peft_wrapping

        with peft_wrapping():
            model = PeftModel.from_pretrained(base, str(subject.weights_dir), is_trainable=False)
    else:
        model = load_model(subject.weights_dir, dtype="float32", trust_remote_code=remote)
    return model.to(device).eval().requires_grad_(False)


class BaseModels:
    """Base (reference) models, each loaded once however many subjects share it."""

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device, self._models = cfg, device, {}

    def get(self, path: Path):
        from dpo_zoo.model.loading import load_model

        key = str(Path(path).resolve())
        if key not in self._models:
            model = load_model(path, dtype="float32", trust_remote_code=bool(self.cfg.model.trust_remote_code))
            self._models[key] = model.to(self.device).eval().requires_grad_(False)
        return self._models[key]
