"""``dpo-zoo compare``: score trained runs (or one policy under many losses) on held-out pairs.

    dpo-zoo compare runs/dpo runs/sampo --data prepared/x/heldout [--output reports/x]
    dpo-zoo compare runs/dpo --data prepared/x --losses all          # one policy, every registered loss

Reads top to bottom: open the held-out set → open each subject (a run folder, or a model folder) and
check its tokenizer against the set's → per subject: load the policy, decide where reference values
come from, **one policy pass** over the held-out pairs (:func:`score_pairs`), sample completions and
estimate the drift from the reference (:func:`estimate_kl`) → per-pair table → summary metrics
(:mod:`dpo_zoo.metrics.functions`) → ``summary.md`` (also printed), ``summary.json``, ``pairs.csv``,
``pairs.parquet`` and ``report.html`` in the output folder.

**Subjects and entries.** A *subject* is a policy: a run folder written by ``dpo-zoo train`` (its
``run.json`` names the loss, its hyperparameters, the base model and whether ``final/`` holds a LoRA
adapter or full weights), or a plain model folder (full weights, or a PEFT adapter whose
``adapter_config.json`` names a local base model). An *entry* is a subject scored under one loss: a
run's own loss by default, or every loss of ``--losses`` (``all`` or a comma list, at their default
hyperparameters). Each entry's implicit rewards, margin and ``win_prob`` are those its loss defines:
the loss is called on the pass's :class:`~dpo_zoo.losses.PairBatch` and returns them.

**One pass per subject.** The batch is built once per micro-batch with every field that any scored
loss reads (the union of their declared needs; :func:`dpo_zoo.train.batching.pair_batch`, the code path the
trainer uses), and every loss — the entries' and every registered loss at its defaults, for the
"held-out value of each loss" table — is called on that same batch. Vocabulary-level losses are
scored when the held-out set stores the reference's top-k (``prep.topk``) or the reference runs live;
otherwise they are skipped with a note. A loss that still cannot use the batch (e.g. one that needs
the whole reference vocabulary, not its top-k) is skipped with its own message.

**Reference.** From the prepared set (the cache), unless an entry's loss needs something the set does
not store, or the set's reference weights are not the run's base model: then the reference runs live
from the base model (loaded once per base, no gradients), and the report says why.

**Drift.** Sampled completions scored under the policy and its base model (:mod:`dpo_zoo.compare.drift`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dpo_zoo.cache import format as S
from dpo_zoo.train.batching import collate, loss_wants, pair_batch
from dpo_zoo.config import as_dict
from dpo_zoo.compare.subjects import (  # noqa: F401
    BaseModels,
    Subject,
    _has_tokenizer,
    check_tokenizer,
    load_policy,
    open_subject,
    parse_loss_list,
    _unique_labels,
)
from dpo_zoo.errors import CacheError, CompareError
from dpo_zoo.losses import POLICY_NEEDS, Loss, LossInputError, Need, build_loss, get_loss_entry, registered_losses
from dpo_zoo.compare.drift import kl_prompt_ids, kl_samples, summarize_kl
from dpo_zoo.compare.judging import judge_prompts, resolve_baseline, sample_for_judge, win_rates
from dpo_zoo.compare.report import INPUTS_FILE, compare_inputs, report_is_current
from dpo_zoo.files import atomic_write_text
from dpo_zoo.metrics import functions as M

LOGPS_NEEDS = (Need.SEQUENCE_LOGPS, Need.TOKEN_LOGPS, Need.VOCAB_LOGPS)


# ==================================================================== the held-out set


def open_heldout(data: str):
    """The prepared set at ``data``: a prepared split folder, or a ``prep.output_dir`` holding ``heldout/``."""
    from dpo_zoo.cache.reader import MANIFEST, PreparedSet

    path = Path(data)
    if (path / MANIFEST).is_file():
        return PreparedSet.open(path)
    if (path / "heldout" / MANIFEST).is_file():
        return PreparedSet.open(path / "heldout")
    raise CacheError(
        f"--data {data}: no prepared set there (no {MANIFEST} in {path} or {path / 'heldout'}); "
        "run `dpo-zoo prep` first and pass its `<prep.output_dir>/heldout`"
    )


# ==================================================================== which losses, which reference


@dataclass(frozen=True)
class BatchNeeds:
    """What one :func:`pair_batch` call fills to serve several losses at once: the union of their needs
    (``pair_batch`` reads only ``requires``, ``optional`` and ``needs_reference`` of a loss). The
    reference is always wanted, reference-free losses or not: compare reports every subject's drift
    from it (log-prob shift, implicit KL)."""

    requires: frozenset
    optional: frozenset = frozenset()
    needs_reference: bool = True

    @classmethod
    def union(cls, losses: Sequence[Loss]) -> "BatchNeeds":
        wants = frozenset().union(*(loss_wants(loss) for loss in losses)) if losses else frozenset()
        return cls(requires=wants, needs_reference=True)


def missing_inputs(loss: Loss, provides, live_reference: bool) -> List[str]:
    """The needs of ``loss`` that neither the prepared set nor a live reference can serve."""
    missing = []
    for need in sorted(loss.requires, key=str):
        if need is Need.GENERATOR or need in POLICY_NEEDS:
            continue  # compare seeds a generator; the policy pass serves the policy's own values
        if need in LOGPS_NEEDS and live_reference:
            continue  # the policy pass gives the policy side, the live reference the rest
        if need not in provides:
            missing.append(need.value)
    return missing


def _loss_key(name: str, hparams: Dict[str, Any]) -> str:
    """A loss identified by its name and *all* its hyperparameters, so equal losses are scored once."""
    full = {**get_loss_entry(name).defaults(), **hparams}
    return f"{name} {json.dumps(full, sort_keys=True, default=str)}"


def plan_reference(subject: Subject, own: Sequence[Loss], heldout, notes: List[str]) -> bool:
    """True when this subject's reference must run live (and why, in ``notes``); False: the cache."""
    from dpo_zoo.model.loading import weights_fingerprint

    reasons = []
    if not heldout.has_reference:
        reasons.append(f"{heldout.path} holds no reference log-probs (prepared with prep.reference=false)")
    for loss in own:
        lacking = missing_inputs(loss, heldout.provides, live_reference=False)
        if lacking:
            reasons.append(f"its loss '{loss.name}' needs {', '.join(lacking)}, which {heldout.path} does not store")
    cached_weights = heldout.key.get("model_weights")
    if subject.run_record is not None and cached_weights:
        if dict(cached_weights) != weights_fingerprint(subject.base_model):
            reasons.append(f"the reference log-probs in {heldout.path} were computed by another model than the "
                           f"run's base model {subject.base_model}")
    if reasons:
        notes.append(f"{subject.label}: reference run live from {subject.base_model}: " + "; ".join(reasons) + ".")
    return bool(reasons)


# ==================================================================== the pass


@dataclass
class ScoredPass:
    """Per-pair values of one policy pass: shared columns and, per scored loss key, its outputs."""

    columns: Dict[str, np.ndarray]
    outputs: Dict[str, Dict[str, np.ndarray]]  # loss key -> losses, chosen_rewards, rejected_rewards, win_prob, tie_prob
    skipped: Dict[str, str]  # loss key -> why it could not be scored
    forward_seconds: float = 0.0


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()


def score_pairs(policy, losses: Dict[str, Loss], heldout, *, pad_id: int, batch_size: int, seed: int,
                device: torch.device, required: Sequence[str] = (), reference_model=None,
                progress: bool = True, desc: str = "score", padding_free: bool = True) -> ScoredPass:
    """One policy pass over the held-out set; every loss of ``losses`` is called on each batch.

    Losses in ``required`` must work (their error propagates); any other loss that raises a
    :class:`LossInputError` is skipped with that message. A loss that samples (SamPO) gets a fresh
    generator per batch seeded from ``(seed, batch)``, the same for every loss, so its draws do not
    depend on which other losses are scored.
    """
    from tqdm.auto import tqdm

    needs = BatchNeeds.union(list(losses.values()))
    columns: Dict[str, List[np.ndarray]] = {}
    outputs: Dict[str, Dict[str, List[np.ndarray]]] = {key: {} for key in losses}
    skipped: Dict[str, str] = {}
    ids: List[str] = []
    n = len(heldout)
    starts = range(0, n, batch_size)
    forward_seconds = 0.0
    for batch_index, start in enumerate(tqdm(starts, desc=desc, unit="batch", disable=not progress)):
        rows = heldout.rows(list(range(start, min(start + batch_size, n))))
        collated = collate(rows, pad_id).to(device)
        started = time.perf_counter()
        with torch.no_grad():
            forward = pair_batch(needs, policy, collated, reference_model=reference_model, padding_free=padding_free)
        forward_seconds += time.perf_counter() - started
        batch = forward.batch
        ids.extend(collated.ids)
        chosen_start = np.array([r[S.CHOSEN_COMPLETION_START] for r in rows])
        values = {
            "prompt_len": chosen_start,
            "chosen_len": np.array([len(r[S.CHOSEN_INPUT_IDS]) for r in rows]) - chosen_start,
            "rejected_len": np.array([len(r[S.REJECTED_INPUT_IDS]) - r[S.REJECTED_COMPLETION_START] for r in rows]),
            "is_tie": np.array([bool(r.get(S.IS_TIE, False)) for r in rows]),
            "weight": np.array([float(r.get(S.WEIGHT, 1.0)) for r in rows]),
            "soft_label": np.array([math.nan if r.get(S.SOFT_LABEL) is None else float(r[S.SOFT_LABEL]) for r in rows]),
        }
        for model_name in ("policy", "reference"):
            for side in ("chosen", "rejected"):
                values[f"{model_name}_{side}_logps"] = _as_numpy(batch.sequence_logps(model_name, side))
        for name, value in values.items():
            columns.setdefault(name, []).append(value)

        for key, loss in losses.items():
            if key in skipped:
                continue
            batch.generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch_index)
            try:
                with torch.no_grad():
                    out = loss(batch)
            except LossInputError as err:
                if key in required:
                    raise
                skipped[key] = str(err)
                continue
            win_prob = out.metrics.get("win_prob")
            if win_prob is None:  # a third-party loss without it: the Bradley–Terry reading of its margin
                win_prob = torch.sigmoid(out.chosen_rewards - out.rejected_rewards)
            record = {
                "losses": out.losses,
                "chosen_rewards": out.chosen_rewards,
                "rejected_rewards": out.rejected_rewards,
                "win_prob": win_prob,
            }
            if "tie_prob" in out.metrics:
                record["tie_prob"] = out.metrics["tie_prob"]
            for name, value in record.items():
                outputs[key].setdefault(name, []).append(_as_numpy(value.reshape(-1)))
    columns_np = {name: np.concatenate(parts) for name, parts in columns.items()}
    columns_np["id"] = np.array(ids, dtype=object)
    outputs_np = {
        key: {name: np.concatenate(parts) for name, parts in values.items()}
        for key, values in outputs.items() if key not in skipped
    }
    return ScoredPass(columns=columns_np, outputs=outputs_np, skipped=skipped, forward_seconds=forward_seconds)


# ==================================================================== metrics of one entry


def summarize_entry(columns: Dict[str, np.ndarray], output: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """Every summary metric of one entry (see :mod:`dpo_zoo.metrics.functions` for each definition)."""
    margins = output["chosen_rewards"] - output["rejected_rewards"]
    ties = columns["is_tie"]
    tie = M.tie_summary(margins, ties, output.get("tie_prob"))
    spread = M.margin_summary(margins, ties)
    labels = M.pair_labels(columns["soft_label"], len(margins))
    # Calibration is judged on the decided (non-tie) pairs, so a tie-aware loss's win probability is
    # taken conditional on "not a tie" (see M.decided_win_prob).
    calibrated = ~ties
    win_prob = M.decided_win_prob(output["win_prob"], output.get("tie_prob"))
    length_diff = columns["chosen_len"] - columns["rejected_len"]
    # A margin within float32 rounding of 0 (the policy's pass and the cached reference batch the pairs
    # differently) is scored as no preference, ½, and counted in rewards/zero_margins.
    zero = M.rounding_tolerance(*(columns[f"{model}_{side}_logps"] for model in ("policy", "reference")
                                  for side in ("chosen", "rejected")))
    length = M.length_bias(margins, length_diff, ties, tolerance=zero)
    return {
        "pairs": int(len(margins)),
        "ties": int(ties.sum()),
        "rewards/accuracies": M.preference_accuracy(margins, ties, tolerance=zero),
        "rewards/zero_margins": M.zero_margin_count(margins, ties, tolerance=zero),
        "rewards/margins": spread["mean"],
        "rewards/margins_std": spread["std"],
        "rewards/chosen": float(np.mean(output["chosen_rewards"])) if len(margins) else math.nan,
        "rewards/rejected": float(np.mean(output["rejected_rewards"])) if len(margins) else math.nan,
        "ties/abs_margin": tie["abs_margin"],
        "ties/tie_prob": tie["tie_prob"],
        "calibration/ece": M.expected_calibration_error(win_prob[calibrated], labels[calibrated]),
        "calibration/brier": M.brier_score(win_prob[calibrated], labels[calibrated]),
        "length/correlation": length["correlation"],
        "length/acc_chosen_longer": length["acc_chosen_longer"],
        "length/acc_rejected_longer": length["acc_rejected_longer"],
        "length/acc_same_length": length["acc_same_length"],
        "length/n_chosen_longer": length["n_chosen_longer"],
        "length/n_rejected_longer": length["n_rejected_longer"],
        "logps/chosen": float(np.mean(columns["policy_chosen_logps"])) if len(margins) else math.nan,
        "logps/rejected": float(np.mean(columns["policy_rejected_logps"])) if len(margins) else math.nan,
        "logps/chosen_shift": M.logp_shift(columns["policy_chosen_logps"], columns["reference_chosen_logps"]),
        "logps/rejected_shift": M.logp_shift(columns["policy_rejected_logps"], columns["reference_rejected_logps"]),
        "loss": M.weighted_mean(output["losses"], columns["weight"]),
        "calibration/bins": M.calibration_bins(win_prob[calibrated], labels[calibrated]),
    }


# ==================================================================== the command


@dataclass
class Entry:
    """One row of the comparison: a subject under one loss."""

    label: str
    subject: Subject
    loss_name: str
    loss_hparams: Dict[str, Any]
    key: str
    reference: str = "cache"
    metrics: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SubjectResult:
    """Everything one subject contributes to the report."""

    entries: List[Entry]
    tables: List[Dict[str, np.ndarray]]
    heldout_losses: Dict[str, Dict[str, Any]]
    kl: Dict[str, Any]
    samples: List[str]
    timings: Dict[str, float]
    judge_samples: Any = None  # its completions for the pairwise win rate (compare.judge)


def run_compare(cfg, runs: Sequence[str], data: str, losses: Optional[str] = None,
                output_dir: Optional[str] = None) -> Dict[str, Any]:
    """Compare ``runs`` on the held-out set ``data``; write the report to ``output_dir`` (default
    ``compare.output_dir``); print the markdown summary; return the summary (as in ``summary.json``)."""
    from dpo_zoo.compare.report import write_outputs

    started = time.perf_counter()
    c = cfg.compare
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(output_dir or c.output_dir)

    heldout = open_heldout(data)
    if len(heldout) == 0:
        raise CompareError(f"the held-out set at {heldout.path} has no pairs")
    notes: List[str] = []
    if heldout.key.get("split") not in (None, "heldout"):
        notes.append(f"{heldout.path} is the '{heldout.key.get('split')}' split, not held-out data.")
    loss_names = parse_loss_list(losses)
    subjects = [open_subject(path, cfg, loss_names) for path in runs]
    for subject in subjects:
        check_tokenizer(subject, heldout)
    _unique_labels(subjects)
    if c.judge:
        resolve_baseline(str(c.judge_baseline), subjects)  # a judge baseline that is not there: before any pass

    inputs = compare_inputs(cfg, subjects, heldout, loss_names)
    if not c.overwrite and report_is_current(out_dir, inputs):
        print((out_dir / "summary.md").read_text(encoding="utf-8"))
        print(f"[dpo-zoo compare] {out_dir} already holds this comparison (same runs, held-out set and settings); "
              "reusing it (set compare.overwrite=true to recompute)")
        return json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))

    bases = BaseModels(cfg, device)
    results = {s.label: score_subject(s, cfg, heldout, listed=loss_names is not None, several=len(subjects) > 1,
                                      bases=bases, device=device, notes=notes)
               for s in subjects}
    entries = [e for r in results.values() for e in r.entries]
    tables = [t for r in results.values() for t in r.tables]
    if not entries:
        raise CompareError("no entry could be scored: " + " ".join(notes))
    judged = win_rates(cfg, subjects, {label: r.judge_samples for label, r in results.items()}, heldout, bases,
                       device) if c.judge else None

    summary = {
        "data": {"path": str(heldout.path), "pairs": len(heldout), "ties": int(np.sum(tables[0]["is_tie"])),
                 "provides": sorted(str(n) for n in heldout.provides), "topk": heldout.topk,
                 "key_digest": heldout.manifest.get("key_digest")},
        "entries": [
            {"label": e.label, "subject": e.subject.label, "path": str(e.subject.path), "loss": e.loss_name,
             "loss_hparams": e.loss_hparams, "lora": e.subject.adapter, "base_model": str(e.subject.base_model),
             "reference": e.reference, "metrics": e.metrics, "kl": results[e.subject.label].kl,
             "win_rate": judged["by_subject"].get(e.subject.label) if judged else None}
            for e in entries
        ],
        "heldout_losses": {label: r.heldout_losses for label, r in results.items()},
        "samples": {label: r.samples for label, r in results.items()},
        "timings": {label: r.timings for label, r in results.items()},
        "notes": notes,
        "judge": judged["settings"] if judged else None,
        "settings": {"seed": int(cfg.train.seed), "batch_size": int(c.batch_size), "kl_prompts": int(c.kl_prompts),
                     "kl_samples": int(c.kl_samples), "kl_max_new_tokens": int(c.kl_max_new_tokens),
                     "ece_bins": 10, "device": str(device)},
        "config": as_dict(cfg),
    }
    summary["timings"]["total_seconds"] = time.perf_counter() - started
    (out_dir / INPUTS_FILE).unlink(missing_ok=True)  # a report being rewritten is not current
    markdown = write_outputs(summary, tables, out_dir)
    atomic_write_text(out_dir / INPUTS_FILE, json.dumps(inputs, indent=1, default=str) + "\n")  # last: marks it current
    print(markdown)
    print(f"[dpo-zoo compare] wrote {out_dir}: summary.md, summary.json, pairs.csv, pairs.parquet, report.html")
    return M.json_ready(summary)


def score_subject(subject: Subject, cfg, heldout, *, listed: bool, several: bool, bases: BaseModels,
                  device: torch.device, notes: List[str]) -> SubjectResult:
    """Load one policy, make its one pass (cache reference, or live when needed), estimate its drift.

    ``listed``: the entries are the ``--losses`` list (scored when the data allows, else skipped with
    a note) rather than the subject's own loss (which must be scored, with a live reference if need be).
    """
    from dpo_zoo.model.loading import load_tokenizer

    c, seed = cfg.compare, int(cfg.train.seed)
    timer = time.perf_counter()
    tokenizer = load_tokenizer(subject.weights_dir if _has_tokenizer(subject.weights_dir) else subject.base_model)
    policy = load_policy(subject, cfg, device)
    timings = {"load_seconds": time.perf_counter() - timer}

    entry_keys = [_loss_key(name, hparams) for name, hparams in subject.losses]
    own = {key: _built(name, hparams) for key, (name, hparams) in zip(entry_keys, subject.losses)}
    required = [] if listed else list(own)
    defaults = {name: _loss_key(name, {}) for name in sorted(registered_losses())}
    live = plan_reference(subject, [own[k] for k in required], heldout, notes)

    def one_pass(live: bool) -> ScoredPass:
        scored: Dict[str, Loss] = {}
        for key, loss in [*own.items(), *((k, _built(n, {})) for n, k in defaults.items())]:
            if key not in scored and (key in required or not missing_inputs(loss, heldout.provides, live)):
                scored[key] = loss
        return score_pairs(policy, scored, heldout, pad_id=tokenizer.pad_token_id, batch_size=int(c.batch_size),
                           seed=seed, device=device, required=required,
                           reference_model=bases.get(subject.base_model) if live else None,
                           progress=bool(c.progress), desc=f"score {subject.label}",
                           padding_free=bool(cfg.model.padding_free))

    timer = time.perf_counter()
    try:
        scored_pass = one_pass(live)
    except LossInputError as err:
        if live:
            raise
        # The declared needs looked satisfied but the loss cannot use what the cache stores (e.g. a
        # top-k reference where it ranks the whole vocabulary): the reference runs live instead.
        notes.append(f"{subject.label}: reference run live from {subject.base_model}: {err}")
        live = True
        scored_pass = one_pass(live)
    timings["pass_seconds"] = time.perf_counter() - timer
    timings["forward_seconds"] = scored_pass.forward_seconds

    heldout_losses: Dict[str, Dict[str, Any]] = {}
    for name, key in defaults.items():
        heldout_losses[name] = _loss_cell(scored_pass, key, _built(name, {}), heldout, live)

    timer = time.perf_counter()
    kl, samples = _drift(subject, policy, bases, heldout, tokenizer, cfg, device, seed, notes)
    timings["kl_seconds"] = time.perf_counter() - timer
    judged = None
    if c.judge:  # one completion per judge prompt, for the pairwise win rate (dpo_zoo/compare/judging.py)
        judged = sample_for_judge(policy, judge_prompts(heldout, int(c.judge_prompts))[0], tokenizer,
                                  max_new_tokens=int(c.judge_max_new_tokens), batch_size=int(c.batch_size),
                                  seed=seed, device=device)

    entries, tables = [], []
    for index, ((name, hparams), key) in enumerate(zip(subject.losses, entry_keys)):
        if listed:
            label = f"{subject.label}:{name}" if several else name
        else:  # the subject's own loss, then (for a mixture) each of its parts
            label = subject.label if index == 0 else f"{subject.label}:{name}"
        if key not in scored_pass.outputs:
            cell = _loss_cell(scored_pass, key, own[key], heldout, live)
            notes.append(f"{label}: not scored: {cell['skipped']}")
            continue
        entry = Entry(label=label, subject=subject, loss_name=name,
                      loss_hparams={**get_loss_entry(name).defaults(), **hparams}, key=key,
                      reference="live" if live else "cache")
        entry.metrics = summarize_entry(scored_pass.columns, scored_pass.outputs[key])
        entries.append(entry)
        tables.append(_pair_rows(entry, scored_pass, defaults))
    del policy
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return SubjectResult(entries=entries, tables=tables, heldout_losses=heldout_losses, kl=kl, samples=samples,
                         timings=timings, judge_samples=judged)


def _loss_cell(scored_pass: ScoredPass, key: str, loss: Loss, heldout, live: bool) -> Dict[str, Any]:
    """A loss's held-out value (the trainer's reduction, mean of weight × loss), or why it has none."""
    if key in scored_pass.outputs:
        return {"value": M.weighted_mean(scored_pass.outputs[key]["losses"], scored_pass.columns["weight"])}
    if key in scored_pass.skipped:
        return {"value": None, "skipped": scored_pass.skipped[key]}
    lacking = missing_inputs(loss, heldout.provides, live)
    hint = " (prepare with prep.topk>0 for vocabulary-level losses)" if Need.VOCAB_LOGPS.value in lacking else ""
    return {"value": None, "skipped": f"needs {', '.join(lacking)}, which {heldout.path} does not store{hint}"}


def _built(name: str, hparams: Dict[str, Any]) -> Loss:
    return build_loss(name, **hparams)


def _drift(subject: Subject, policy, bases: BaseModels, heldout, tokenizer, cfg, device, seed: int,
           notes: List[str]) -> Tuple[Dict[str, Any], List[str]]:
    """KL estimates of one subject against its base model, and a few decoded samples for the report."""
    c = cfg.compare
    prompts = kl_prompt_ids(heldout, int(c.kl_prompts))
    if not prompts or int(c.kl_samples) == 0 or int(c.kl_max_new_tokens) == 0:
        if not any(note.startswith("KL skipped") for note in notes):
            notes.append("KL skipped: compare.kl_prompts, compare.kl_samples or compare.kl_max_new_tokens is 0.")
        return {"mc": None, "mc_stderr": None, "rb": None, "rb_stderr": None, "entropy_per_token": None,
                "mean_length": None, "n_samples": 0}, []
    reference = bases.get(subject.base_model)
    samples = kl_samples(policy, reference, prompts, n_samples=int(c.kl_samples),
                         max_new_tokens=int(c.kl_max_new_tokens), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, batch_size=int(c.batch_size), seed=seed, device=device,
                         progress=bool(c.progress), desc=f"kl {subject.label}")
    texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in samples["completions"][:6]]
    return summarize_kl(samples), texts


def _pair_rows(entry: Entry, scored_pass: ScoredPass, default_keys: Dict[str, str]) -> Dict[str, np.ndarray]:
    """The per-pair table of one entry (one row per held-out pair)."""
    columns = scored_pass.columns
    output = scored_pass.outputs[entry.key]
    n = len(columns["id"])
    table: Dict[str, Any] = {
        "entry": np.array([entry.label] * n, dtype=object),
        "subject": np.array([entry.subject.label] * n, dtype=object),
        "loss_name": np.array([entry.loss_name] * n, dtype=object),
        "id": columns["id"],
        "prompt_len": columns["prompt_len"],
        "chosen_len": columns["chosen_len"],
        "rejected_len": columns["rejected_len"],
        "length_diff": columns["chosen_len"] - columns["rejected_len"],
        "is_tie": columns["is_tie"],
        "soft_label": columns["soft_label"],
        "weight": columns["weight"],
        "policy_chosen_logps": columns["policy_chosen_logps"],
        "policy_rejected_logps": columns["policy_rejected_logps"],
        "reference_chosen_logps": columns["reference_chosen_logps"],
        "reference_rejected_logps": columns["reference_rejected_logps"],
        "reward_chosen": output["chosen_rewards"],
        "reward_rejected": output["rejected_rewards"],
        "margin": output["chosen_rewards"] - output["rejected_rewards"],
        "win_prob": output["win_prob"],
        "tie_prob": output.get("tie_prob", np.full(n, math.nan)),
        "loss": output["losses"],
    }
    for name, key in default_keys.items():
        values = scored_pass.outputs.get(key)
        table[f"loss/{name}"] = values["losses"] if values is not None else np.full(n, math.nan)
    return table
