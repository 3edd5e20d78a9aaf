"""Saving and restoring a training run: checkpoints through :mod:`dpo_zoo.train.checkpoints` (resumed only
when made with the run's training identity), ``train.overwrite``'s clean start, and the final save
(weights, tokenizer, the Hub model card and ``run.json``, :mod:`dpo_zoo.train.run_folder`). ``run`` is the
trainer's :class:`~dpo_zoo.train.trainer.Run` (rank, world size, output folder, logger)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from dpo_zoo.train import checkpoints
from dpo_zoo.config import as_dict, loss_hparams
from dpo_zoo.errors import TrainingError
from dpo_zoo.files import atomic_folder, disk_full_as_error
from dpo_zoo.train.run_folder import CHECKPOINT_DIR, FINAL_DIR, RUN_FILE, identity_changes, write_run_record


def clear_previous_run(run) -> None:
    """``train.overwrite=true``: drop the checkpoints, final weights and run.json of an earlier run in
    this folder (its logs stay, and this run appends to them), so nothing is resumed or reused."""
    import shutil

    if run.is_main:
        for path in (_checkpoint_root(run), run.output_dir / FINAL_DIR):
            if path.exists():
                shutil.rmtree(path)
        (run.output_dir / RUN_FILE).unlink(missing_ok=True)
    if run.world_size > 1:
        torch.distributed.barrier()


REFERENCE_STATE = "moving_reference"  # the client-state key of a TR-DPO reference in a checkpoint


def _checkpoint_root(run) -> Path:
    return run.output_dir / CHECKPOINT_DIR


def save_checkpoint(engine, run, step: int, identity: Dict[str, Any], keep: Optional[int] = None,
                    moving_reference=None) -> None:
    """Atomic, checksummed, verified before ``latest`` moves (:mod:`dpo_zoo.train.checkpoints`). A reference that
    moves during training (TR-DPO) is saved with it, so a resumed run continues from the same reference."""
    extra = {} if moving_reference is None else {REFERENCE_STATE: moving_reference.state_dict()}
    # The number of processes is recorded beside the identity: a resume must have the same (see resume).
    checkpoints.save(engine, _checkpoint_root(run), step, {**identity, "world_size": run.world_size}, run, keep=keep,
                     extra_state=extra)


def resume(engine, run, cfg, identity: Dict[str, Any], moving_reference=None) -> int:
    """The step of the newest checkpoint that verifies (damaged ones are reported and skipped), loaded
    into ``engine``; 0 without one."""
    root = _checkpoint_root(run)
    found = checkpoints.newest_verified(root, run) if cfg.train.resume else None
    if found is None:
        return 0
    written_by = found.identity.get("world_size")
    if written_by is not None and written_by != run.world_size:
        # ZeRO splits the optimizer state (and under ZeRO-3 the weights) per rank, and the pairs of a step
        # are positions of the global batch, which counts the ranks: another world size is another run.
        raise TrainingError(
            f"the checkpoint {found.folder} was written by {written_by} processes and this run has "
            f"{run.world_size}: resuming with another number of processes is not supported. Run it again with "
            f"{written_by} processes, or start over (train.resume=false, or another train.output_dir)"
        )
    changed = identity_changes(found.identity, identity)
    if changed:
        raise TrainingError(
            f"the checkpoint {found.folder} was made with a different {', '.join(changed)}: resuming from it would "
            "not give the run this config asks for. Set train.overwrite=true to start over, train.resume=false "
            "to ignore the checkpoint, or choose another train.output_dir"
        )
    state = checkpoints.load(engine, found)
    if moving_reference is not None:
        if REFERENCE_STATE not in state:
            raise TrainingError(f"the checkpoint {found.folder} holds no reference weights, which this run moves "
                                "(loss.sync_ref_model=true); set train.overwrite=true to start over")
        moving_reference.load_state_dict(state[REFERENCE_STATE])
    if run.is_main:
        print(f"[dpo-zoo train] resumed from {found.folder} at step {found.step}")
        run.log({"event": "resume", "step": found.step, "checkpoint": found.tag})
    return found.step


def save_final(engine, tokenizer, cfg, run, train_set, source, reference_mode: str, metrics) -> None:
    """``save_pretrained`` (safetensors; the adapter alone for LoRA), tokenizer, run.json, and the Hub
    model card ``final/README.md`` (:mod:`dpo_zoo.train.model_card`).

    ``base_model`` is the folder the policy started from; ``base_model_source`` says where that folder
    came from (``name_or_path``, and for a Hub model the ``revision`` asked for and the ``commit`` it
    resolved to), so compare can fetch the same base again on a machine without that folder."""
    final_dir = run.output_dir / FINAL_DIR
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # gathers every partition on rank 0
    else:
        state_dict = module.state_dict() if run.is_main else None
    if run.is_main:
        # Written into final.tmp and renamed when complete: a full disk (DiskFullError naming the folder
        # and the bytes written) or a kill leaves no half-written final/ to be read as a trained model.
        with atomic_folder(final_dir) as folder, disk_full_as_error(folder, what="the final model"):
            module.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(folder)
            record = _run_record(cfg, run, train_set, source, reference_mode, metrics, int(engine.global_steps))
            from dpo_zoo.train.model_card import write_model_card

            write_model_card(folder, json.loads(json.dumps(record, default=str)))
        with disk_full_as_error(run.output_dir / RUN_FILE, what="the run record"):
            write_run_record(run.output_dir, record)  # last: it marks the run finished
        print(f"[dpo-zoo train] saved {final_dir}")
    if run.world_size > 1:
        torch.distributed.barrier()


def _run_record(cfg, run, train_set, source, reference_mode: str, metrics, steps: int) -> Dict[str, Any]:
    """run.json: what was trained, from what, with which settings, and the last metrics."""
    name, hparams = loss_hparams(cfg)
    return {
        "loss": name,
        "loss_hparams": hparams,
        "base_model": str(source.path),
        "base_model_source": source.record(),
        "lora": bool(cfg.train.lora.enabled),
        "reference": reference_mode,
        "prepared_set": str(train_set.path),
        "cache_key": train_set.key,
        "metrics": metrics,
        "steps": steps,
        "train_pairs": len(train_set),
        "world_size": run.world_size,
        "config": as_dict(cfg),
    }
