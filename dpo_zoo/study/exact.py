"""The exact benchmark's evaluator and the settings a study in the exact world runs with.

A study file with a ``study.exact`` section (:mod:`dpo_zoo.study.exact_world` for the world and its
settings) is run by ``dpo-zoo study`` as any other: the runner builds the world once into
``<output_dir>/world`` (a model folder and two jsonl files of pairs), points the experiment at them
(:func:`experiment_overrides`: ``model.name_or_path``, the ``generic`` preprocessor and the two data
files), prepares, trains every run through the normal trainer, and evaluates each run and checkpoint
with :class:`ExactEvaluator` instead of sampling: reward, KL, entropy and length are sums over every
completion, with no evaluation noise, so every difference between runs is training noise and the seeds
alone decide a claim. ``study.reward`` and ``study.eval`` are not used (the reward is the world's).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Dict, Iterator, List

from dpo_zoo.study import exact_world

WORLD_DIR = "world"
EXACT_EVAL_FORMAT = "dpo_zoo.study_eval.exact.v1"


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run an exact study on one torch thread (restored after). The world's model is a 2-layer Llama
    of a few thousand parameters: its matrix products are too small to gain from intra-op threads, and
    on a machine that has other work the extra threads wait on each other. Measured here with the other
    core busy: 28-30 s a run of 64 steps on 2 threads, 1.0 s on one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def world_folder(output_dir: Path) -> Path:
    return Path(output_dir) / WORLD_DIR


def experiment_overrides(output_dir: Path) -> List[str]:
    """What every run of an exact study trains on: the world's reference and its pairs."""
    paths = exact_world.world_paths(world_folder(output_dir))
    return [f"model.name_or_path={paths['model']}", "data.preprocessor=generic",
            f"data.train_path={paths['train']}", f"data.heldout_path={paths['heldout']}"]


class ExactEvaluator:
    """Evaluates runs exactly in the study's world (module doc); the same interface as the sampled
    :class:`dpo_zoo.study.runner.Evaluator` (``reference(seed)``, ``run(folder, cfg, seed)``), with its
    results cached the same way, in each folder's ``study_eval.json`` keyed by the run's record."""

    def __init__(self, study, cfg, world: "exact_world.World"):
        import torch

        from dpo_zoo.compare.subjects import BaseModels

        self.study, self.cfg, self.world = study, cfg, world
        self.device = torch.device("cpu")
        self.bases = BaseModels(cfg, self.device)
        self._reference_logp = None

    def inputs(self, run_file) -> Dict[str, Any]:
        run_hash = hashlib.sha256(Path(run_file).read_bytes()).hexdigest() if run_file else None
        return {"format": EXACT_EVAL_FORMAT, "run": run_hash, "world": self.world.identity}

    def reference_logp(self):
        if self._reference_logp is None:
            model = self.bases.get(self.world.model_dir)
            self._reference_logp = exact_world.completion_logps(model, self.world.tree, self.world.settings["prompts"])[0]
        return self._reference_logp

    def reference(self, seed: int) -> Dict[str, Any]:
        from dpo_zoo.study.results import REFERENCE_LABEL
        from dpo_zoo.study.eval_cache import cached_evaluation

        out = self.study.output_dir / "reference"
        model = self.bases.get(self.world.model_dir)
        record = cached_evaluation(out, self.inputs(None), lambda: self._measure(model))
        record["accuracy"] = math.nan
        return {"label": REFERENCE_LABEL, "loss": None, "knob": None, "strength": None, "seed": seed,
                "run_dir": str(out), **record}

    def run(self, folder: Path, cfg, seed: int) -> Dict[str, Any]:
        from dpo_zoo.compare.subjects import load_policy, open_subject
        from dpo_zoo.study.eval_cache import cached_evaluation

        run_file = Path(folder) / "run.json"
        subject = open_subject(str(folder), cfg, None)
        record = cached_evaluation(Path(folder), self.inputs(run_file),
                                   lambda: self._measure(load_policy(subject, cfg, self.device)))
        metrics = json.loads(run_file.read_text()).get("metrics", {})
        record["accuracy"] = float(metrics.get("eval_rewards/accuracies", math.nan))
        return record

    def _measure(self, policy) -> Dict[str, Any]:
        logp, unrestricted = exact_world.completion_logps(policy, self.world.tree, self.world.settings["prompts"])
        out = exact_world.exact_metrics(logp, self.reference_logp(), self.world.reward, self.world.tree, unrestricted)
        out["examples"] = []
        return out
