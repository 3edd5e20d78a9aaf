"""Trajectories: each run's path on the reward–KL plane during training, as the DPO paper draws its
frontier (Rafailov et al. 2023, §6.1, Fig. 2, left: every point there is one checkpoint).

With ``study.eval_every: N`` (0, the default, is off) every run trains with ``train.save_every=N`` and
keeps all its checkpoints (``train.keep_checkpoints=null``; both only change how a run is watched, so
finished runs stay reusable), and ``train.eval_every=N`` when the experiment sets none (the held-out
preference accuracy of each checkpoint). Each checkpoint of steps ``N, 2N, … < last`` is exported as a
run folder ``<run>/trajectory/step-000000S`` (:func:`dpo_zoo.train.export.export_checkpoint`: verified,
read without unpickling, safetensors out) and evaluated by the study's evaluator exactly as the final
run is — ``evaluator.run(folder, cfg, seed)``, whatever the evaluator (sampled or exact) — and so cached
the same way, in that folder's ``study_eval.json`` keyed by its ``run.json``, which records the step and
the sha256 of the checkpoint's manifest: a study run again exports and evaluates only what is missing.

The run's record gets ``"trajectory": [{"step": s, <metric>: value, …}, …]``: the earlier checkpoints
in increasing step, scalars only (the per-prompt lists stay in each folder's ``study_eval.json``); the
final point is the record itself (``"step"``: its last step) and the reference (step 0) the common
origin. A run trained before ``eval_every`` was set has no checkpoints and is reused as it is: its
trajectory is what its checkpoints give (a note says which steps are missing; ``train.overwrite=true``
trains it again). Disk: an export is a copy of the weights (the adapter alone for LoRA); once exported, a
run's ``checkpoints/`` (which also hold the optimizer state) may be deleted: an export is used without its
checkpoint when it is of this very run (the same training identity as the run's ``run.json``).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

TRAJECTORY_DIR = "trajectory"


def check_setting(path: str, value: Any) -> List[str]:
    """The problem with ``study.eval_every`` (an integer >= 0), if any."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return [f"{path}: `study.eval_every`: expected an integer >= 0 (0: no trajectories), got {value!r}"]
    return []


def train_overrides(every: int, train_eval_every: int) -> List[str]:
    """The run settings a trajectory needs: a checkpoint every ``every`` steps, all kept."""
    if not every:
        return []
    extra = [f"train.save_every={every}", "train.keep_checkpoints=null"]
    return extra + ([f"train.eval_every={every}"] if not train_eval_every else [])


def evaluate_checkpoints(evaluator, folder: Path, cfg, seed: int, every: int, last_step: int) -> List[Dict[str, Any]]:
    """The trajectory of the finished run ``folder`` (module doc): one point per checkpoint of a step
    ``N, 2N, … < last_step``, in increasing step."""
    from dpo_zoo.train.checkpoints import checkpoint_folders, tag_for
    from dpo_zoo.train.export import export_checkpoint
    from dpo_zoo.train.run_folder import CHECKPOINT_DIR

    found = dict(checkpoint_folders(folder / CHECKPOINT_DIR))
    points, missing = [], []
    for step in range(every, last_step, every):
        target = folder / TRAJECTORY_DIR / tag_for(step)
        if step in found:
            exported = export_checkpoint(folder, found[step], target, trust_remote_code=bool(cfg.model.trust_remote_code))
        elif exported_from_this_run(folder, target, step):
            exported = target  # its checkpoint deleted since (it also held the optimizer state): the export stands
        else:
            missing.append(step)
            continue
        record = evaluator.run(exported, cfg, seed)
        points.append({"step": step, **{k: v for k, v in record.items() if _scalar(v) and k != "step"}})
    if missing:
        print(f"[dpo-zoo study] {folder}: no checkpoint of step {', '.join(map(str, missing))} (trained before "
              "study.eval_every was set, or deleted before it was exported); its trajectory leaves them out "
              "(train.overwrite=true trains the run again)", file=sys.stderr)
    return points


def exported_from_this_run(folder: Path, exported: Path, step: int) -> bool:
    """Whether ``exported`` holds step ``step`` of this very run: the same training identity (config
    less the watch-only settings, and the prepared set) as the run's own ``run.json``."""
    import json

    from dpo_zoo.train.run_folder import RUN_FILE, identity_changes, is_finished, training_identity

    if not is_finished(exported):
        return False
    try:
        own, theirs = (json.loads((f / RUN_FILE).read_text()) for f in (folder, exported))
    except (OSError, ValueError):
        return False
    identity = training_identity(own.get("config") or {}, own.get("cache_key") or {})
    stored = training_identity(theirs.get("config") or {}, theirs.get("cache_key") or {})
    return theirs.get("steps") == step and "checkpoint" in theirs and not identity_changes(stored, identity)


def reward_drop(points: Sequence[Dict[str, Any]], final_reward: float) -> float:
    """How far the run's reward fell from its best point by the end: ``max_t reward_t − reward_final``
    over its checkpoints and final point (≥ 0; 0 when the reward never fell). Reward over-optimisation
    (Gao et al. 2023; the IS-DAA paper's Fig. 1) shows as a drop: the true reward peaks and then falls as
    training drives the policy further from the reference. NaN when the final reward is."""
    import math

    rewards = [float(p["reward"]) for p in points if isinstance(p.get("reward"), (int, float))]
    if not isinstance(final_reward, (int, float)) or not math.isfinite(final_reward):
        return math.nan
    finite = [r for r in rewards if math.isfinite(r)]
    return max([*finite, float(final_reward)]) - float(final_reward)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def write_csv(records: Sequence[Dict[str, Any]], metrics: Sequence[str], path: Path) -> None:
    """``trajectory.csv``: one row per evaluated point of every run, its checkpoints then its final
    point (the reference at step 0 first), for plotting elsewhere."""
    fields = ["label", "strength", "seed", "step", *metrics]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            for point in [*r.get("trajectory", []), r]:
                writer.writerow({"label": r["label"], "strength": r["strength"], "seed": r["seed"],
                                 **{k: point.get(k) for k in ("step", *metrics)}})


def last_step(folder: Path) -> Optional[int]:
    """The step a finished run ended at (``run.json`` ``steps``; None when an older trainer wrote none)."""
    from dpo_zoo.train.run_folder import read_run_record

    steps = read_run_record(folder).get("steps")
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else None
