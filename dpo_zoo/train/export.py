"""A training checkpoint as a run folder: the weights of step ``s``, in the form ``dpo-zoo compare`` and
``dpo-zoo study`` read (``run.json`` + ``final/``, safetensors only), so anything that scores a finished
run scores a checkpoint the same way.

A checkpoint (:mod:`dpo_zoo.train.checkpoints`) keeps the module's weights in DeepSpeed's
``mp_rank_00_model_states.pt`` (key ``module``: the ``state_dict`` of the trained module, the PEFT
wrapper for LoRA). It is verified first (manifest, sizes, sha256) and read with
:func:`~dpo_zoo.model.safe_load.safe_torch_load` (``weights_only``, memory-mapped: the optimizer state
beside the weights is not read), never unpickled. The weights are loaded into the run's own model
skeleton — the base model, wrapped by the run's final adapter for LoRA, so the adapter settings are the
run's — with ``strict=True`` (a missing or unexpected tensor is an error, not a silent partial load),
and written with ``save_pretrained(safe_serialization=True)``, as the trainer's final save writes them.

Under ZeRO stages 0-2 the model states file holds the whole module. Under ZeRO-3 it holds empty
placeholders (the weights are spread over the ranks' optimizer partitions); such a checkpoint is
refused with that reason.

The exported ``run.json`` is the run's own record with ``steps`` = the checkpoint's step, ``metrics`` =
what ``logs.jsonl`` recorded at that step (the held-out evaluation when ``train.eval_every`` ran there;
otherwise empty), and ``checkpoint``: its tag, step and the sha256 of its manifest (which lists every
file's sha256), so the record, and every cache keyed by it, changes exactly when the checkpoint does.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Dict

from dpo_zoo.errors import CheckpointError
from dpo_zoo.train import checkpoints
from dpo_zoo.train.run_folder import FINAL_DIR, LOGS_FILE, RUN_FILE, read_run_record, write_run_record

MODEL_STATES = "mp_rank_00_model_states.pt"
# Files of final/ that are not the weights: copied as they are (tokenizer, chat template, generation config).
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json", "README.md")


def checkpoint_identity(folder: Path) -> Dict[str, Any]:
    """The checkpoint's tag, step and manifest sha256 (the manifest lists every file's sha256)."""
    folder = Path(folder)
    manifest = json.loads((folder / checkpoints.MANIFEST).read_text())
    return {"tag": folder.name, "step": int(manifest["step"]),
            "manifest_sha256": hashlib.sha256((folder / checkpoints.MANIFEST).read_bytes()).hexdigest()}


def is_exported(checkpoint: Path, out: Path) -> bool:
    """Whether ``out`` already holds the export of exactly this checkpoint (its files unchanged)."""
    try:
        record = json.loads((Path(out) / RUN_FILE).read_text())
        return (Path(out) / FINAL_DIR).is_dir() and record.get("checkpoint") == checkpoint_identity(checkpoint)
    except (OSError, ValueError, KeyError):
        return False


def export_checkpoint(run_dir: Path, checkpoint: Path, out: Path, trust_remote_code: bool = False) -> Path:
    """Write the weights of ``checkpoint`` (a ``step-*`` folder of the finished run ``run_dir``) as a run
    folder ``out`` (module doc); returns ``out``. A :class:`CheckpointError` names the file and why when
    the checkpoint does not verify, holds no usable weights, or does not fit the run's model."""
    import torch

    from dpo_zoo.model.loading import load_model
    from dpo_zoo.model.safe_load import safe_torch_load

    run_dir, checkpoint, out = Path(run_dir), Path(checkpoint), Path(out)
    if is_exported(checkpoint, out):
        return out
    _, problems = checkpoints.verify(checkpoint)
    if problems:
        raise CheckpointError(f"checkpoint {checkpoint} does not verify: {'; '.join(problems)}")
    states = safe_torch_load(checkpoint / MODEL_STATES, map_location="cpu", mmap=True)
    weights = states.get("module") if isinstance(states, dict) else None
    if not isinstance(weights, dict) or not weights:
        raise CheckpointError(f"{checkpoint / MODEL_STATES}: holds no module weights (key `module`)")
    if any(isinstance(t, torch.Tensor) and t.numel() == 0 for t in weights.values()):
        raise CheckpointError(
            f"{checkpoint / MODEL_STATES}: the weights are empty placeholders (a ZeRO-3 checkpoint: its weights are "
            "split over the ranks' optimizer partitions); exporting ZeRO-3 checkpoints is not supported")
    record = read_run_record(run_dir)
    final = run_dir / FINAL_DIR
    model = load_model(_base_model(run_dir, record), dtype="float32", trust_remote_code=trust_remote_code)
    if (final / "adapter_config.json").is_file():
        from peft import PeftModel

        from dpo_zoo.model.loading import peft_wrapping

        with peft_wrapping():  # the run's own adapter settings (rank, alpha, target modules)
            model = PeftModel.from_pretrained(model, str(final), is_trainable=False)
    try:
        model.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()}, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{checkpoint / MODEL_STATES}: its weights do not fit the run's model "
                              f"({str(err).splitlines()[0]})") from None
    staging = out.with_name(out.name + ".incomplete")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / FINAL_DIR).mkdir(parents=True)
    for path in final.iterdir():
        if path.is_file() and path.name not in WEIGHT_FILES:
            shutil.copyfile(path, staging / FINAL_DIR / path.name)
    model.save_pretrained(staging / FINAL_DIR, safe_serialization=True)
    identity = checkpoint_identity(checkpoint)
    write_run_record(staging, {**record, "steps": identity["step"], "metrics": logged_metrics(run_dir, identity["step"]),
                               "checkpoint": identity})
    shutil.rmtree(out, ignore_errors=True)
    staging.replace(out)  # whole or not at all: a killed export is redone
    return out


def _base_model(run_dir: Path, record: Dict[str, Any]) -> Path:
    """The folder the run started from, or (not on this machine, from the Hub) the same commit again."""
    from dpo_zoo.model.loading import resolve_hub_model

    base, source = Path(record["base_model"]), record.get("base_model_source") or {}
    if base.is_dir():
        return base
    if source.get("commit"):
        return resolve_hub_model(str(source["name_or_path"]), str(source["commit"])).path
    raise CheckpointError(f"{run_dir / RUN_FILE}: `base_model` {base} is not a folder on this machine")


def logged_metrics(run_dir: Path, step: int) -> Dict[str, float]:
    """The metrics ``logs.jsonl`` recorded at ``step`` (later records of the step win: a resumed run
    logs it again); empty without a log."""
    found: Dict[str, float] = {}
    path = Path(run_dir) / LOGS_FILE
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("step") == step and "event" not in entry:
                found.update({k: v for k, v in entry.items() if k != "step" and isinstance(v, (int, float))})
    return found
