"""Training-signal health checks: functions of the logged metric series of a run (``logs.jsonl``).

Each check reads one sign, documented on its function, and returns a :class:`Finding` (what was seen,
at which step, with the numbers, and what to try) or ``None``. The trainer runs them live after every
logged step (:class:`LiveHealth`; each finding is printed once and logged as an ``{"event":
"warning"}`` record), and ``dpo-zoo doctor RUN`` runs them again on the finished log. Thresholds are
``train.health.*`` (:class:`Thresholds` mirrors them); none of them changes what a run computes.

The checks (names as they appear in warnings):

* ``logps_both_falling``: the policy's log-probability of the chosen *and* of the rejected responses,
  relative to the reference on the same pairs (``logps/chosen_shift``, ``logps/rejected_shift``: mean of
  log π(y) − log π_ref(y) per sequence, divided by the mean completion length), both below
  ``−logp_fall_per_token`` nats per token over the last ``window`` logged steps. DPO can lower both while
  the margin grows (Razin et al. 2024, *Unintentional Unalignment: Likelihood Displacement in Direct
  Preference Optimization*, arXiv:2410.08847; Pal et al. 2024, *Smaug*, arXiv:2402.13228).
* ``loss_flat_at_log2``: ``loss`` within ``flat_tolerance`` of log 2 and ``|rewards/margins|`` below
  ``flat_tolerance`` on every one of ``flat_steps`` consecutive logged steps after warm-up: the
  log-sigmoid losses sit at log 2 exactly when the margin is 0, i.e. nothing is being learned.
* ``accuracy_saturated_early``: ``rewards/accuracies`` equal to 1.0 on consecutive logged steps covering
  at least ``saturation_pairs`` pairs, reached within the first ``early_fraction`` of the run: the pairs
  are separable by something trivial (length, a formatting artefact, a leaked label) or the step is
  too large.
* ``margin_at_start``: at the first step (before any update the policy *is* the reference)
  ``|logps/chosen_shift|`` or ``|logps/rejected_shift|`` (log π(y) − log π_ref(y), summed over the
  completion) above ``start_margin`` nats: the reference values are not the policy's starting point
  (another model, another revision, dropout active in the policy, a different precision). Only for
  losses that read the reference. It reads the log-ratio, not the loss's implicit reward: a loss whose
  reward is not β·(log π − log π_ref) has a non-zero reward at the start by design (H-DPO's
  β(α·log π − log π_ref) is β(α − 1)·log π_ref there). Logs without the shifts fall back to the rewards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Sequence

from dpo_zoo.cache.health import Finding

LOG2 = math.log(2.0)


@dataclass(frozen=True)
class Thresholds:
    """The thresholds of the checks (``train.health.*``, same names)."""

    window: int = 5
    logp_fall_per_token: float = 0.5
    flat_tolerance: float = 1e-3
    flat_steps: int = 10
    saturation_pairs: int = 64
    early_fraction: float = 0.25
    start_margin: float = 0.01
    kl_max: float = 20.0
    length_ratio: float = 1.5
    min_completion_tokens: int = 2
    rows: int = 512

    @classmethod
    def from_config(cls, section: Any) -> "Thresholds":
        return cls(**{f.name: type(f.default)(section[f.name]) for f in fields(cls) if section is not None
                      and f.name in section})


def _series(records: Sequence[Dict[str, Any]], name: str) -> List[tuple]:
    """(step, value) of every training record (``eval_*`` and events excluded) that logged ``name``."""
    out = []
    for record in records:
        value = record.get(name)
        if "event" in record or value is None or not isinstance(value, (int, float)):
            continue
        out.append((int(record.get("step", 0)), float(value)))
    return out


def logps_both_falling(records: Sequence[Dict[str, Any]], t: Thresholds = Thresholds()) -> Optional[Finding]:
    """Sign: mean over the last ``window`` steps of ``logps/{side}_shift / len/{side}`` below
    ``−logp_fall_per_token`` for both sides."""
    per_token = {}
    for side in ("chosen", "rejected"):
        shifts = dict(_series(records, f"logps/{side}_shift"))
        lengths = dict(_series(records, f"len/{side}"))
        steps = [s for s in shifts if lengths.get(s)]
        if len(steps) < t.window:
            return None
        last = steps[-t.window:]
        per_token[side] = (sum(shifts[s] / lengths[s] for s in last) / len(last),
                           sum(shifts[s] for s in last) / len(last))
    if all(per_token[side][0] < -t.logp_fall_per_token for side in per_token):
        step = max(s for s, _ in _series(records, "logps/chosen_shift"))
        (c_tok, c_seq), (r_tok, r_seq) = per_token["chosen"], per_token["rejected"]
        return Finding(
            "logps_both_falling", step,
            f"the policy's log-probs of both responses fell below the reference's: chosen by {-c_seq:.2f} nats per "
            f"sequence ({-c_tok:.3f} per token), rejected by {-r_seq:.2f} ({-r_tok:.3f} per token), mean of the last "
            f"{t.window} steps; the margin grows by pushing the rejected down faster, and probability mass goes to "
            "responses in neither.",
            "add a likelihood term on the chosen response (loss=rpo, or loss=dpo+sft loss.weights=[1.0,1.0]), lower "
            "train.learning_rate, or raise loss.beta; check that chosen and rejected are not near-identical.")
    return None


def loss_flat_at_log2(records: Sequence[Dict[str, Any]], t: Thresholds = Thresholds(),
                      warmup_steps: int = 0) -> Optional[Finding]:
    """Sign: ``|loss − log 2| < flat_tolerance`` and ``|rewards/margins| < flat_tolerance`` on each of the
    last ``flat_steps`` logged steps, all after ``warmup_steps``."""
    losses = [(s, v) for s, v in _series(records, "loss") if s > warmup_steps]
    margins = dict(_series(records, "rewards/margins"))
    if len(losses) < t.flat_steps:
        return None
    last = losses[-t.flat_steps:]
    flat = all(abs(v - LOG2) < t.flat_tolerance and abs(margins.get(s, math.inf)) < t.flat_tolerance for s, v in last)
    if not flat:
        return None
    return Finding(
        "loss_flat_at_log2", last[-1][0],
        f"the loss stayed at log 2 = {LOG2:.4f} (within {t.flat_tolerance:g}) with a margin of ~0 for {t.flat_steps} "
        f"logged steps ({last[0][0]}–{last[-1][0]}): the policy is not moving away from the reference.",
        "raise train.learning_rate (LoRA typically needs 1e-5–1e-4, full fine-tuning 1e-7–1e-6), check that warm-up "
        "has ended and that parameters are trainable, or raise loss.beta if it is tiny.")


def accuracy_saturated_early(records: Sequence[Dict[str, Any]], t: Thresholds = Thresholds(), *,
                             pairs_per_step: int, max_steps: int) -> Optional[Finding]:
    """Sign: ``rewards/accuracies == 1.0`` on consecutive logged steps covering ``saturation_pairs`` pairs
    (``pairs_per_step`` each), the last of them within ``early_fraction × max_steps``."""
    run_start, covered = None, 0
    for step, value in _series(records, "rewards/accuracies"):
        if step > t.early_fraction * max_steps:
            break
        if value >= 1.0:
            run_start = step if run_start is None else run_start
            covered += pairs_per_step
            if covered >= t.saturation_pairs:
                return Finding(
                    "accuracy_saturated_early", step,
                    f"every pair was ranked right on steps {run_start}–{step} ({covered} pairs in a row), within the "
                    f"first {t.early_fraction:.0%} of {max_steps} steps: the pairs are separated by something easy.",
                    "look for a cue that gives the answer away (chosen always longer, a formatting difference, the "
                    "label in the text), check the held-out accuracy (eval_rewards/accuracies), or lower "
                    "train.learning_rate.")
        else:
            run_start, covered = None, 0
    return None


def margin_at_start(records: Sequence[Dict[str, Any]], t: Thresholds = Thresholds(), *,
                    start_step: int = 0) -> Optional[Finding]:
    """Sign: on the record of step 1 (the forward pass of step 0, before any update; only when the run
    started at step 0 and logged it) ``max(|logps/chosen_shift|, |logps/rejected_shift|) > start_margin``
    (without the shifts: the same of ``rewards/chosen`` and ``rewards/rejected``)."""
    if start_step != 0:
        return None
    first = [r for r in records if "event" not in r and r.get("step") == 1 and "rewards/chosen" in r]
    if not first:
        return None
    record = first[0]
    if "logps/chosen_shift" in record and "logps/rejected_shift" in record:
        chosen, rejected = float(record["logps/chosen_shift"]), float(record["logps/rejected_shift"])
        what = "log π − log π_ref was"
    else:
        chosen, rejected = float(record["rewards/chosen"]), float(record["rewards/rejected"])
        what = "the implicit rewards were"
    if max(abs(chosen), abs(rejected)) <= t.start_margin:
        return None
    return Finding(
        "margin_at_start", 1,
        f"before any update {what} chosen {chosen:+.4f}, rejected {rejected:+.4f} (margin "
        f"{chosen - rejected:+.4f}), not 0: the reference log-probs are not those of the policy's starting point.",
        "prepare the reference with the same model and revision (dpo-zoo prep), train with train.reference=live, "
        "switch off dropout in the model config, and use the precision the reference was computed in.")


def series_findings(records: Sequence[Dict[str, Any]], t: Thresholds, *, needs_reference: bool, pairs_per_step: int,
                    max_steps: int, warmup_steps: int, start_step: int = 0) -> List[Finding]:
    """Every training-signal check on ``records`` (the ``logs.jsonl`` records of one run)."""
    found = [
        logps_both_falling(records, t) if needs_reference else None,
        loss_flat_at_log2(records, t, warmup_steps),
        accuracy_saturated_early(records, t, pairs_per_step=pairs_per_step, max_steps=max_steps),
        margin_at_start(records, t, start_step=start_step) if needs_reference else None,
    ]
    return [f for f in found if f is not None]


def kl_too_large(kl: float, kl_stderr: float, t: Thresholds = Thresholds(), step: Optional[int] = None) -> Optional[Finding]:
    """Sign: the sampled KL(π‖π_ref) per completion exceeds ``kl_max`` nats by more than two standard errors."""
    if kl is None or not math.isfinite(kl) or kl - 2 * (kl_stderr if kl_stderr and math.isfinite(kl_stderr) else 0.0) <= t.kl_max:
        return None
    return Finding(
        "kl_too_large", step,
        f"KL(π ‖ π_ref) on sampled completions is {kl:.2f} ± {kl_stderr:.2f} nats per completion, past "
        f"{t.kl_max:g}: the policy has drifted far from the reference (reward hacking and degenerate text follow).",
        "raise loss.beta, lower train.learning_rate or train fewer steps; compare an earlier checkpoint.")


def length_drift(policy_lengths: Sequence[float], reference_lengths: Sequence[float], t: Thresholds = Thresholds(),
                 max_new_tokens: Optional[int] = None, step: Optional[int] = None) -> Optional[Finding]:
    """Sign: the mean length of the policy's sampled completions is more than ``length_ratio`` times (or
    less than ``1 / length_ratio`` of) the reference's on the same prompts, and the difference is more
    than two standard errors (paired by prompt)."""
    n = min(len(policy_lengths), len(reference_lengths))
    if n < 2:
        return None
    policy, reference = [float(x) for x in policy_lengths[:n]], [float(x) for x in reference_lengths[:n]]
    mean_p, mean_r = sum(policy) / n, sum(reference) / n
    diffs = [a - b for a, b in zip(policy, reference)]
    mean_d = sum(diffs) / n
    sd = math.sqrt(sum((d - mean_d) ** 2 for d in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    if mean_r <= 0 or abs(mean_d) <= 2 * se:
        return None
    ratio = mean_p / mean_r
    if 1 / t.length_ratio <= ratio <= t.length_ratio:
        return None
    capped = ""
    if max_new_tokens:
        share = sum(x >= max_new_tokens for x in policy) / n
        capped = f"; {share:.0%} of the policy's samples hit the {max_new_tokens}-token limit"
    return Finding(
        "length_drift", step,
        f"sampled completions are {ratio:.2f}× the reference's length ({mean_p:.1f} against {mean_r:.1f} tokens over "
        f"{n} prompts, difference {mean_d:+.1f} ± {se:.1f}){capped}.",
        "a length-normalised or length-regularised loss (loss=sampo, loss=simpo, loss=ld_dpo), a higher loss.beta, "
        "or pairs whose chosen is not systematically longer (dpo-zoo compare reports the length bias).")


def reference_shift(forward) -> Dict[str, float]:
    """``logps/chosen_shift`` and ``logps/rejected_shift`` of one micro-batch: the mean over its pairs of
    log π(y) − log π_ref(y) (summed over the completion), what :func:`logps_both_falling` reads. Empty for
    a batch without reference values (a reference-free loss)."""
    import torch

    from dpo_zoo.losses import LossInputError

    try:
        with torch.no_grad():
            chosen, rejected = forward.batch.log_ratios()
    except LossInputError:
        return {}
    return {"logps/chosen_shift": chosen.detach().float().mean().item(),
            "logps/rejected_shift": rejected.detach().float().mean().item()}


class LiveHealth:
    """The checks as the trainer runs them (rank 0 only): the prepared-set checks once before the first
    step (:meth:`start`), the training-signal checks after every logged step (:meth:`log_and_check`). A
    check reports at most once per run; each finding is printed (``[dpo-zoo train] warning: ...``) and
    logged as an ``{"event": "warning"}`` record. Only the records the checks can still read are kept
    (the step-1 record, and a tail as long as the longest window), so a long run costs nothing more.
    The sampled checks (:func:`length_drift`, :func:`kl_too_large`) need completions sampled from the
    trained policy, which training does not make: ``dpo-zoo doctor RUN`` runs them."""

    def __init__(self, cfg, loss, run, max_steps: int, start_step: int):
        section = cfg.train.health
        self.enabled = bool(section.enabled) and run.is_main
        self.thresholds = t = Thresholds.from_config(section)
        self.run, self.records, self.reported = run, [], set()
        pairs = int(cfg.train.micro_batch_size) * int(cfg.train.gradient_accumulation_steps) * run.world_size
        self.settings = dict(needs_reference=bool(loss.needs_reference), pairs_per_step=pairs,
                             max_steps=int(max_steps), warmup_steps=int(cfg.train.warmup_steps),
                             start_step=int(start_step))
        self.tail = max(t.window, t.flat_steps, math.ceil(t.saturation_pairs / max(pairs, 1))) + 1
        self.max_rows = int(section.rows)
        self.min_completion_tokens = int(section.min_completion_tokens)

    @classmethod
    def start(cls, cfg, loss, run, max_steps: int, start_step: int, train_set, tokenizer) -> "LiveHealth":
        """The live checks of a run, after the prepared-set checks on its training set."""
        health = cls(cfg, loss, run, max_steps, start_step)
        if health.enabled:
            from dpo_zoo.cache.health import prepared_set_checks

            health.report(prepared_set_checks(train_set, tokenizer, max_rows=health.max_rows,
                                              min_completion_tokens=health.min_completion_tokens))
        return health

    def report(self, findings) -> None:
        for finding in findings:
            if finding.check in self.reported:
                continue
            self.reported.add(finding.check)
            print(f"[dpo-zoo train] warning: {finding.render()}", flush=True)
            self.run.log(finding.as_record())

    def log_and_check(self, record: Dict[str, Any]) -> None:
        """Log a step's ``record`` (``logs.jsonl`` and the trackers), then run the checks on the log so far."""
        self.run.log(record)
        if not self.enabled:
            return
        self.records.append(record)
        if len(self.records) > self.tail + 1:  # keep step 1 (margin_at_start) and the tail
            self.records = [r for r in self.records[:1] if r.get("step") == 1] + self.records[-self.tail:]
        self.report(series_findings(self.records, self.thresholds, **self.settings))
