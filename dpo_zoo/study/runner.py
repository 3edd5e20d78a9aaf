"""``dpo-zoo study``: which loss is better, on the reward–KL frontier (Rafailov et al. 2023, §6.1, Fig. 2).

A study file is an experiment config (``model``, ``data``, ``prep``, ``train``: shared by every run)
plus a ``study`` section::

    study:
      output_dir: studies/sentiment_frontier
      seeds: [0, 1, 2]             # train.seed of each run; the same seeds (so the same data order)
                                   # for every loss: paired comparisons
      reward: vader                # the ground truth (dpo_zoo.rewards.scorers spec)
      eval: {prompts: 32, samples: 4, max_new_tokens: 24, batch_size: 16, seed: 1234}
      losses:                      # one curve each
        - {label: dpo, loss: dpo, knob: beta, values: [0.05, 0.1, 0.5]}
        - {label: h_dpo, loss: h_dpo, knob: alpha, values: [0.8, 0.9], hparams: {beta: 0.1}}
      claims: [...]                # read by dpo_zoo.study.results (docs/results.md)
      eval_every: 0                # N > 0: also evaluate each run's checkpoint every N steps, a
                                   # trajectory per run (dpo_zoo.study.trajectory)

``knob`` names the loss hyperparameter that sets its strength (β, or the loss's own: H-DPO's α, f-DPO's
divergence); the study never asks which loss it runs. Every (curve, value, seed) is trained by the normal
trainer from the one prepared set (``dpo-zoo prep`` is run first; a cache hit when it is done) into
``<output_dir>/runs/<label>/<knob>=<value>/seed<seed>``. A finished run is reused by the trainer and its
evaluation (``study_eval.json``, keyed by the run and the evaluation settings) by the study, so a killed
study, run again, trains and evaluates only what is missing.

**Evaluation of one run** on ``eval.prompts`` held-out prompts (spread through the held-out set),
``eval.samples`` continuations each, sampled from the policy at temperature 1 (what KL(π‖π_ref) is an
expectation over) with the evaluation seed ``eval.seed``, the same for every run and apart from the
training seed: every run is measured on the same prompts with the same random stream (common random
numbers), so the evaluation noise of a paired difference largely cancels, and the evaluation of a
seed is not correlated with the data order that seed trained on. Standard errors are clustered by
prompt (the samples of one prompt are not independent draws: ``SE = sd(prompt means)/√prompts``):

* ``reward`` (± ``reward_se``): the mean ground-truth reward of the continuations;
* ``kl_rb`` / ``kl_mc`` (± SE): the per-sequence KL(π‖π_ref), Rao–Blackwellized (the exact KL of each
  next-token distribution, summed along the sample) and Monte Carlo (Σ log π/π_ref of the sampled
  tokens), both from :func:`dpo_zoo.compare.drift.kl_samples` on the same samples; ``rb_below_mc`` records
  whether the RB standard error is the smaller;
* ``entropy_per_token`` (policy entropy per sampled position), ``mean_length`` (tokens),
  ``distinct_1`` / ``distinct_2`` (unique word n-grams / all word n-grams over the run's continuations,
  Li et al. 2016), ``reward_length_corr`` (Pearson r between reward and length of the continuations);
* ``accuracy``: the held-out preference accuracy the trainer measured (``eval_rewards/accuracies``).

The reference model itself is evaluated once (label ``reference``, one record per seed so that every
seed's curve starts there): the common origin (KL 0).

Outputs in ``output_dir``: ``runs.json`` / ``runs.csv`` (every run), ``summary.json`` (mean, SD and 95%
CI over seeds of each metric per curve and value, and the study's settings and command),
``summary.md``, ``results.md`` (the claims of ``study.claims``: :mod:`dpo_zoo.study.results`),
``frontier.png`` (:mod:`dpo_zoo.study.plot`: reward against KL as the DPO paper draws it — the
reference at the origin, each run's trajectory through its checkpoints, each curve's envelope, the
final points' means ±1 SE over seeds labelled with their strength) and ``report.html`` (the picture and
the table, self-contained). With ``study.eval_every`` each run record has ``"step"`` (its last step)
and ``"trajectory"`` (its checkpoints' evaluations, :mod:`dpo_zoo.study.trajectory`), and
``trajectory.csv`` lists every evaluated point.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dpo_zoo.config import ConfigError, load_config, read_yaml
from dpo_zoo.errors import StoppedError, StudyError
from dpo_zoo.stopping import GracefulStop
from dpo_zoo.study import exact, exact_world, trajectory
from dpo_zoo.study.eval_cache import cached_evaluation
from dpo_zoo.study.plot import plot_frontier, write_html
from dpo_zoo.study.results import REFERENCE_LABEL, check_claims, ci95, summary_table, write_results

STUDY_DEFAULTS: Dict[str, Any] = {
    "output_dir": "studies/default",
    "seeds": [0, 1, 2],
    "reward": "vader",
    # seed: the evaluation's sampling seed, one for every run (common random numbers: every run and the
    # reference are evaluated on the same prompts with the same random stream), apart from train.seed;
    # `train` samples with each run's training seed instead (the behaviour before v2, so that the
    # studies published with it reproduce).
    "eval": {"prompts": 32, "samples": 4, "max_new_tokens": 24, "batch_size": 16, "seed": 1234},
    "losses": [],
    "claims": [],
    "eval_every": 0,  # evaluate each run's checkpoints every this many steps too (dpo_zoo/study/trajectory.py)
    # A mapping of world settings: train and evaluate in the exact benchmark's enumerable world
    # (dpo_zoo/study/exact_world.py, dpo_zoo/study/exact.py) instead of on real text. null: off.
    "exact": None,
    "progress": True,
}
METRICS = ("reward", "kl_rb", "kl_mc", "entropy_per_token", "distinct_1", "distinct_2", "mean_length",
           "reward_length_corr", "accuracy", "reward_drop")
TRAIN_TIME_FILE = "study_train.json"  # the time a run took to train, kept for the sittings that reuse it
EVAL_FORMAT = "dpo_zoo.study_eval.v2"  # v2: the evaluation seed apart from train.seed; SEs clustered by prompt


@dataclass
class Curve:
    label: str
    loss: str
    knob: str
    values: List[Any]
    hparams: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Study:
    path: Path
    settings: Dict[str, Any]  # the study section, defaults filled in
    curves: List[Curve]
    experiment: Dict[str, Any]  # the rest of the file
    overrides: List[str]  # experiment overrides from the command line
    command: str

    @property
    def output_dir(self) -> Path:
        return Path(self.settings["output_dir"]).expanduser()

    def experiment_file(self) -> Path:
        return self.output_dir / "experiment.yaml"

    def config(self, *extra: str):
        """The experiment config with the study's overrides and ``extra`` (a run's loss, seed, folder)."""
        return load_config([self.experiment_file()], [*self.overrides, *extra])

    def run_dir(self, curve: Curve, value: Any, seed: int) -> Path:
        return self.output_dir / "runs" / _safe(curve.label) / _safe(f"{curve.knob}={value}") / f"seed{seed}"

    def grid(self) -> List[Tuple[Curve, Any, int]]:
        return [(c, v, s) for c in self.curves for v in c.values for s in self.settings["seeds"]]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", str(text))


# ==================================================================== loading


def load_study(path: str, overrides: Sequence[str] = ()) -> Study:
    """Read a study file (module doc); ``study.*`` overrides change the study section, the others the
    experiment. Every problem is reported at once (:class:`ConfigError`)."""
    from omegaconf import OmegaConf

    raw = read_yaml(Path(path))
    section = raw.pop("study", None)
    errors: List[str] = []
    if not isinstance(section, dict):
        raise ConfigError([f"{path}: no `study` section (see dpo_zoo/study/runner.py for its keys)"])
    study_overrides = [o for o in overrides if o.startswith("study.")]
    if study_overrides:
        merged = OmegaConf.merge(OmegaConf.create(section), OmegaConf.from_dotlist([o[len("study."):] for o in study_overrides]))
        section = OmegaConf.to_container(merged, resolve=True)
    unknown = sorted(set(section) - set(STUDY_DEFAULTS))
    errors += [f"{path}: `study.{k}`: unknown key (known: {', '.join(STUDY_DEFAULTS)})" for k in unknown]
    settings = {**STUDY_DEFAULTS, **{k: v for k, v in section.items() if k in STUDY_DEFAULTS}}
    settings["eval"] = {**STUDY_DEFAULTS["eval"], **(settings.get("eval") or {})}
    for key in sorted(set(settings["eval"]) - set(STUDY_DEFAULTS["eval"])):
        errors.append(f"{path}: `study.eval.{key}`: unknown key (known: {', '.join(STUDY_DEFAULTS['eval'])})")
    for key in STUDY_DEFAULTS["eval"]:
        value, least = settings["eval"].get(key), 0 if key == "seed" else 1
        if key == "seed" and value == "train":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            errors.append(f"{path}: `study.eval.{key}`: expected an integer >= {least}, got {value!r}")
    seeds = settings["seeds"]
    if not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        errors.append(f"{path}: `study.seeds`: expected a list of distinct integers, got {seeds!r}")
    if not isinstance(settings["reward"], str) or not settings["reward"]:
        errors.append(f"{path}: `study.reward`: expected a reward spec (vader, a model folder, module:function)")
    errors += trajectory.check_setting(str(path), settings["eval_every"])
    if settings["exact"] is not None:
        settings["exact"], world_errors = exact_world.check_settings(str(path), settings["exact"])
        errors += world_errors
    curves = _curves(path, settings["losses"], errors)
    errors += [f"{path}: {e}" for e in check_claims(settings["claims"], [c.label for c in curves], METRICS)]
    if errors:
        raise ConfigError(errors)
    command = "dpo-zoo study " + " ".join(shlex.quote(x) for x in [str(path), *overrides])
    experiment_overrides = [o for o in overrides if not o.startswith("study.")]
    if settings["exact"] is not None:  # every run trains on the world's reference and pairs
        experiment_overrides = [*exact.experiment_overrides(Path(settings["output_dir"]).expanduser()), *experiment_overrides]
    study = Study(Path(path), settings, curves, raw, experiment_overrides, command)
    _write_experiment(study)
    try:  # every run's config must load: report a bad knob or value before anything trains
        for curve in curves:
            for value in curve.values:
                study.config(*_loss_overrides(curve, value))
    except ConfigError as err:
        raise ConfigError([f"{path}: {e}" for e in err.errors]) from None
    return study


def _curves(path: str, entries: Any, errors: List[str]) -> List[Curve]:
    if not isinstance(entries, list) or not entries:
        errors.append(f"{path}: `study.losses`: expected a non-empty list of {{label, loss, knob, values, hparams}}")
        return []
    curves, labels = [], set()
    for i, entry in enumerate(entries):
        where = f"{path}: `study.losses[{i}]`"
        if not isinstance(entry, dict):
            errors.append(f"{where}: expected a mapping, got {entry!r}")
            continue
        unknown = sorted(set(entry) - {"label", "loss", "knob", "values", "hparams"})
        errors += [f"{where}.{k}: unknown key (known: label, loss, knob, values, hparams)" for k in unknown]
        loss, knob, values = entry.get("loss"), entry.get("knob", "beta"), entry.get("values")
        label = str(entry.get("label", loss))
        if not isinstance(loss, str) or not loss:
            errors.append(f"{where}.loss: expected a registered loss name or preset")
            continue
        if not isinstance(values, list) or not values or len({json.dumps(v) for v in values}) != len(values):
            errors.append(f"{where}.values: expected a list of distinct values of `{knob}`, got {values!r}")
            continue
        hparams = entry.get("hparams") or {}
        if not isinstance(hparams, dict) or knob in hparams:
            errors.append(f"{where}.hparams: expected a mapping of fixed hyperparameters (without the knob `{knob}`)")
            continue
        if label in labels or label == REFERENCE_LABEL:
            errors.append(f"{where}.label: {label!r} is used twice (or reserved); give each curve its own label")
            continue
        labels.add(label)
        curves.append(Curve(label, loss, str(knob), list(values), dict(hparams)))
    return curves


def _write_experiment(study: Study) -> None:
    """The shared experiment config, beside the study's outputs (every run loads it)."""
    from omegaconf import OmegaConf

    study.output_dir.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(OmegaConf.create(study.experiment))
    target = study.experiment_file()
    if not target.is_file() or target.read_text() != text:
        target.write_text(text)


def _loss_overrides(curve: Curve, value: Any) -> List[str]:
    def item(key: str, v: Any) -> str:
        return f"loss.{key}={json.dumps(v) if not isinstance(v, str) else v}"

    return [f"loss={curve.loss}", *(item(k, v) for k, v in curve.hparams.items()), item(curve.knob, value)]


# ==================================================================== running


def run_study(path: str, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Prepare once, train and evaluate every run of the grid (reusing finished ones), write the outputs."""
    study = load_study(path, overrides)
    if study.settings["exact"] is not None:
        with exact.one_thread():
            return _run_grid(study)
    return _run_grid(study)


def _run_grid(study: Study) -> Dict[str, Any]:
    from tqdm.auto import tqdm

    from dpo_zoo.cache.prep import run_prep

    progress = bool(study.settings["progress"])
    base = study.config()
    if study.settings["exact"] is not None:  # the world first: prep reads its model and pairs
        world = exact_world.build_world(exact.world_folder(study.output_dir), study.settings["exact"], progress)
        run_prep(base)
        evaluator = exact.ExactEvaluator(study, base, world)
    else:
        run_prep(base)
        evaluator = Evaluator(study, base)
    records: List[Dict[str, Any]] = []
    for seed in study.settings["seeds"]:
        records.append({**evaluator.reference(seed), "step": 0})
    grid = study.grid()
    bar = tqdm(grid, desc="study", unit="run", disable=not progress)
    # SIGTERM/SIGINT: the run in progress saves a checkpoint and stops (its own handler, dpo_zoo/stopping.py);
    # between runs the study stops after the one it is evaluating. Finished runs and evaluations are kept.
    with GracefulStop("study", base.train.stop_grace_s, unit="run",
                      resume_hint="run the same command again: finished runs are reused") as stop:
        for done, (curve, value, seed) in enumerate(bar):
            bar.set_postfix_str(f"{curve.label} {curve.knob}={value} seed {seed}")
            where = f"{done} of {len(grid)} runs finished in {study.output_dir}"
            try:
                records.append(run_one(study, evaluator, curve, value, seed))
            except StoppedError as err:
                raise StoppedError(f"{err} (the study: {where}, the run in progress is {curve.label} "
                                   f"{curve.knob}={value} seed {seed})", err.signum) from None
            if stop.requested:
                raise StoppedError(stop.message(f"{done + 1} of {len(grid)} runs finished in {study.output_dir}"),
                                   stop.signum)
    return write_outputs(study, records, data_counts(base))


def data_counts(cfg) -> Dict[str, Dict[str, int]]:
    """Pairs and ties of each split of the study's prepared set (the tie claims depend on them)."""
    from dpo_zoo.cache.reader import PreparedSet

    counts = {}
    for split in ("train", "heldout"):
        table = PreparedSet.open(str(Path(cfg.prep.output_dir).expanduser() / split)).table()
        ties = sum(bool(t) for t in table.column("is_tie").to_pylist()) if "is_tie" in table.column_names else 0
        counts[split] = {"pairs": table.num_rows, "ties": ties}
    return counts


def run_one(study: Study, evaluator: "Evaluator", curve: Curve, value: Any, seed: int) -> Dict[str, Any]:
    """Train (or reuse) one run and evaluate it (or reuse its evaluation)."""
    from dpo_zoo.train.trainer import train

    folder = study.run_dir(curve, value, seed)
    run_settings = [*_loss_overrides(curve, value), f"train.seed={seed}", f"train.output_dir={folder}"]
    cfg, every = study.config(*run_settings), int(study.settings["eval_every"])
    if every:  # checkpoints to evaluate (dpo_zoo/study/trajectory.py); watch-only: finished runs are reused
        cfg = study.config(*run_settings, *trajectory.train_overrides(every, int(cfg.train.eval_every)))
    before = _file_hash(folder / "run.json")
    started = time.time()
    train(cfg)
    seconds = round(time.time() - started, 3)
    record = evaluator.run(folder, cfg, seed)
    step = trajectory.last_step(folder)
    out = {"label": curve.label, "loss": curve.loss, "knob": curve.knob, "strength": value, "seed": seed,
           "run_dir": str(folder), **record, "step": step, "train_seconds": _training_time(folder, before, seconds)}
    if every and step is not None:
        out["trajectory"] = trajectory.evaluate_checkpoints(evaluator, folder, cfg, seed, every, step)
        out["reward_drop"] = trajectory.reward_drop(out["trajectory"], out["reward"])
    return out


def _file_hash(path: Path) -> Optional[str]:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _training_time(folder: Path, run_before: Optional[str], seconds: float) -> Optional[float]:
    """How long the run took to train (the train call, model load and saving included). A run reused
    from an earlier sitting (its ``run.json`` unchanged by the call) keeps the time recorded when it
    trained, in ``study_train.json``; None when that sitting did not record one."""
    run_now = _file_hash(folder / "run.json")
    timing = folder / TRAIN_TIME_FILE
    if run_before is not None and run_before == run_now:
        saved = json.loads(timing.read_text()) if timing.exists() else {}
        return saved.get("train_seconds") if saved.get("run") == run_now else None
    timing.write_text(json.dumps({"run": run_now, "train_seconds": seconds}) + "\n")
    return seconds


class Evaluator:
    """Evaluates runs on held-out prompts (module doc), loading the reference model and reward once."""

    def __init__(self, study: Study, cfg):
        import torch

        from dpo_zoo.compare.runner import open_heldout
        from dpo_zoo.compare.subjects import BaseModels
        from dpo_zoo.compare.drift import kl_prompt_ids
        from dpo_zoo.rewards.scorers import load_reward

        self.study, self.cfg = study, cfg
        self.settings = dict(study.settings["eval"])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.heldout = open_heldout(str(Path(cfg.prep.output_dir).expanduser() / "heldout"))
        if len(self.heldout) == 0:
            raise StudyError(f"{self.heldout.path}: the held-out set has no pairs to draw prompts from")
        self.prompts = kl_prompt_ids(self.heldout, int(self.settings["prompts"]))
        self.reward = load_reward(str(study.settings["reward"]))
        self.bases = BaseModels(cfg, self.device)
        self._tokenizer = None

    def tokenizer(self, folder: Path):
        if self._tokenizer is None:
            from dpo_zoo.model.loading import load_tokenizer

            self._tokenizer = load_tokenizer(folder)
        return self._tokenizer

    def inputs(self, run_file: Optional[Path]) -> Dict[str, Any]:
        """What an evaluation depends on: the run's record, the held-out set, the settings, the reward."""
        run_hash = hashlib.sha256(run_file.read_bytes()).hexdigest() if run_file else None
        heldout = hashlib.sha256(json.dumps(self.heldout.key, sort_keys=True, default=str).encode()).hexdigest()
        return {"format": EVAL_FORMAT, "run": run_hash, "heldout": heldout, "eval": self.settings,
                "reward": self.reward.identity}

    def reference(self, seed: int) -> Dict[str, Any]:
        """The reference's own evaluation, the origin of every curve (KL 0). The evaluation seed does not
        depend on the training seed, so it is measured once and stands beside every seed's runs."""
        from dpo_zoo.model.loading import resolve_model

        folder = resolve_model(self.cfg.model).path
        per_seed = self.settings["seed"] == "train"
        out = self.study.output_dir / "reference" / (f"seed{seed}" if per_seed else "")
        model = self.bases.get(folder)
        record = self._cached(out, self.inputs(None) | {"model": str(folder)} | ({"seed": seed} if per_seed else {}),
                              lambda: self._measure(model, model, folder, seed))
        record["accuracy"] = math.nan  # the reference's implicit reward margin is 0 on every pair
        return {"label": REFERENCE_LABEL, "loss": None, "knob": None, "strength": None, "seed": seed,
                "run_dir": str(out), **record}

    def run(self, folder: Path, cfg, seed: int) -> Dict[str, Any]:
        from dpo_zoo.compare.subjects import load_policy, open_subject

        run_file = folder / "run.json"
        subject = open_subject(str(folder), cfg, None)
        record = self._cached(folder, self.inputs(run_file),
                              lambda: self._measure(load_policy(subject, cfg, self.device),
                                                    self.bases.get(subject.base_model), subject.base_model, seed))
        metrics = json.loads(run_file.read_text()).get("metrics", {})
        record["accuracy"] = float(metrics.get("eval_rewards/accuracies", math.nan))
        return record

    def _cached(self, folder: Path, inputs: Dict[str, Any], measure) -> Dict[str, Any]:
        return cached_evaluation(folder, inputs, measure)

    def _measure(self, policy, reference, tokenizer_folder: Path, train_seed: int) -> Dict[str, Any]:
        from dpo_zoo.compare.drift import kl_samples, summarize_kl

        tokenizer = self.tokenizer(tokenizer_folder)
        s = self.settings
        samples = kl_samples(policy, reference, self.prompts, n_samples=int(s["samples"]),
                             max_new_tokens=int(s["max_new_tokens"]), eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, batch_size=int(s["batch_size"]),
                             seed=train_seed if s["seed"] == "train" else int(s["seed"]),
                             device=self.device, progress=bool(self.study.settings["progress"]), desc="eval")
        prompt_texts = [tokenizer.decode(p, skip_special_tokens=True) for p in self.prompts for _ in range(int(s["samples"]))]
        texts = [tokenizer.decode(c, skip_special_tokens=True) for c in samples["completions"]]
        if getattr(self.reward, "needs_baselines", False):  # a judge reward (study.reward: judge:...)
            from dpo_zoo.compare.judging import chosen_baselines

            self.reward.set_baselines(*chosen_baselines(self.heldout, len(self.prompts), tokenizer))
        rewards = self.reward(prompt_texts, texts)
        return measure_samples(samples, summarize_kl(samples), rewards, texts, int(s["samples"]))


def measure_samples(samples: Dict[str, Any], kl: Dict[str, Any], rewards: np.ndarray, texts: Sequence[str],
                    samples_per_prompt: int = 1) -> Dict[str, Any]:
    """The per-run metrics (module doc) from the KL samples (prompt-major, ``samples_per_prompt`` per
    prompt), their rewards and decoded texts. Standard errors are clustered by prompt; the per-prompt
    means of reward and KL are kept (``prompt_reward``, ``prompt_kl_rb``) for analyses paired by prompt."""
    from dpo_zoo.metrics import functions as M

    reward = M.clustered_mean_and_stderr(rewards, samples_per_prompt)
    rb = M.clustered_mean_and_stderr(samples["rb"], samples_per_prompt)
    mc = M.clustered_mean_and_stderr(samples["mc"], samples_per_prompt)
    lengths = np.asarray(samples["tokens"], dtype=np.float64)
    corr = M.pearson(rewards, lengths)  # NaN when either side is constant
    return {
        "reward": reward["mean"], "reward_se": reward["stderr"],
        "kl_rb": rb["mean"], "kl_rb_se": rb["stderr"], "kl_mc": mc["mean"], "kl_mc_se": mc["stderr"],
        "rb_below_mc": bool(rb["stderr"] < mc["stderr"]) if rb["n"] > 1 else None,
        "prompt_reward": reward["cluster_means"], "prompt_kl_rb": rb["cluster_means"],
        "entropy_per_token": kl["entropy_per_token"], "mean_length": kl["mean_length"],
        "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
        "reward_length_corr": corr, "n_samples": kl["n_samples"],
        "examples": list(texts[:3]),
    }


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams over all word n-grams of the texts; NaN when none."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


# ==================================================================== aggregation and outputs

def aggregate(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (label, strength): each metric's mean, SD and 95% CI over seeds, in grid order."""
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["label"], json.dumps(r["strength"])), []).append(r)
    rows = []
    for (label, _), members in groups.items():
        first = members[0]
        row = {"label": label, "loss": first["loss"], "knob": first["knob"], "strength": first["strength"],
               "seeds": [m["seed"] for m in members]}
        for metric in METRICS:
            row[metric] = ci95([m.get(metric, math.nan) for m in members])
        row["rb_below_mc_runs"] = sum(1 for m in members if m.get("rb_below_mc"))
        rows.append(row)
    return rows


def write_outputs(study: Study, records: List[Dict[str, Any]], data: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    out = study.output_dir
    from dpo_zoo.metrics.functions import json_ready

    rows = aggregate(records)
    summary = {
        "command": study.command, "study_file": str(study.path), "settings": study.settings,
        "experiment": study.experiment, "overrides": study.overrides, "data": data or {},
        "curves": [c.__dict__ for c in study.curves], "aggregates": rows,
        "runs": [{k: v for k, v in r.items() if k != "examples"} for r in records],
    }
    summary = json_ready(summary)
    (out / "runs.json").write_text(json.dumps(json_ready(records), indent=1))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    fields = ["label", "loss", "knob", "strength", "seed", "step", *METRICS, "reward_se", "kl_rb_se", "kl_mc_se",
              "rb_below_mc", "n_samples", "train_seconds", "eval_seconds", "run_dir"]
    with open(out / "runs.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    table = summary_table(rows)
    (out / "summary.md").write_text(table + "\n")
    if study.settings["eval_every"]:
        trajectory.write_csv(records, METRICS, out / "trajectory.csv")
    png = plot_frontier(rows, out / "frontier.png", records, exact=study.settings["exact"] is not None)
    write_html(study, table, png, out / "report.html")
    write_results(str(out / "summary.json"), str(out / "results.md"))
    print(table)
    print(f"[dpo-zoo study] {len(records)} runs; outputs in {out} (frontier.png, report.html, runs.csv, summary.json)")
    return summary
