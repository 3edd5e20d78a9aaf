"""The verdict of every claim of a study, from its runs (``summary.json``), by rules fixed in advance.

Each claim is declared in the study file (``study.claims``), so no code here knows a loss by name::

    - id: sampo_length
      claim: "SamPO: lower reward–length correlation than DPO at matched KL"
      compare: matched_kl           # matched_kl | same_strength | monotone
      treatment: sampo              # curve labels of study.losses
      baseline: dpo                 # (not used by monotone)
      metrics: [{metric: reward_length_corr, expect: lower, margin: 0.05}]   # margin: optional (δ)
      report: [accuracy]            # shown beside the effect, not part of the verdict

**Paired values.** Every curve runs with the same seeds (data order, initialisation) and is evaluated with
the same prompts and sampling seed, so a claim's effect is computed per seed and the seeds are the unit
of replication:

* ``same_strength``: treatment − baseline at each strength value both curves have (one *cell* per value)
  and pooled (the per-seed mean over those values, a cell of its own when there are several);
* ``matched_kl``: per seed, each curve's points as metric against KL (RB), **anchored at the reference**
  (KL 0 and the reference's value of the metric: every curve starts there), sorted by KL and linearly
  interpolated; the difference is averaged over 5 evenly spaced KLs in (0, the smaller of the two
  curves' largest KLs]. Because both curves start at 0 their ranges always overlap, so no seed is dropped
  (dropping the seed whose curves do not overlap removes the seed that drifted furthest: not at random);
* ``monotone``: the treatment alone; the **whole-grid change** (largest strength − smallest, per seed)
  decides, and each step between neighbouring values is shown beside it (a claim over a grid cannot
  require every adjacent step to be significant: with AdamW and clipping, β's scale cancels at small β).

**Tests.** On each cell's per-seed values: the paired t test of "no effect" (two-sided) and, with the
metric's equivalence margin δ (``margin`` in the claim, else :data:`DEFAULT_MARGINS`), the two one-sided
tests of "the effect lies outside ±δ" (TOST). The difference tests of every cell of every claim of the
study form one family and are corrected together by Holm's method (family-wise error ≤ 5%); the
equivalence tests form a second family, corrected the same way. A cell is

* *reproduced* / *not reproduced* when its Holm-adjusted difference p < 0.05, by the effect's side;
* *equivalent within ±δ* when not, and its Holm-adjusted TOST p < 0.05;
* *inconclusive* otherwise, or always with fewer than :data:`MIN_SEEDS` paired seeds; it then states the
  seeds that would decide it at the observed mean and SD (at the level α/m, Holm's strictest).

**A metric's verdict** is decided by its cells: *not reproduced* when any cell is; else *reproduced* when
any cell is (the cell that decides is named: a decisive strength is not hidden by pooling over the
others); else *equivalent* when the pooled cell (or the only one) is; else *inconclusive*. **A claim** is
reproduced when all its metrics are, equivalent when all are, not reproduced when any metric is not
reproduced or some are equivalent while the claim expects a difference, else inconclusive.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dpo_zoo.study import stats

REFERENCE_LABEL = "reference"  # the reference model's own evaluation in a study's runs (KL 0)
COMPARISONS = ("matched_kl", "same_strength", "monotone")
EXPECT = ("lower", "higher")
KL_METRIC = "kl_rb"
MATCH_POINTS = 5
MIN_SEEDS = 3
ALPHA = 0.05
REPRODUCED, NOT_REPRODUCED, EQUIVALENT, INCONCLUSIVE = "reproduced", "not reproduced", "equivalent", "inconclusive"
# Equivalence margins δ per metric, where a claim gives none: differences smaller than these are too small
# to matter to a user choosing a loss (in the metric's own unit).
DEFAULT_MARGINS = {"reward": 0.02, "kl_rb": 0.25, "kl_mc": 0.25, "entropy_per_token": 0.02, "distinct_1": 0.01,
                   "distinct_2": 0.01, "mean_length": 0.5, "reward_length_corr": 0.05, "accuracy": 0.02}
FALLBACK_MARGIN_SHARE = 0.05  # a metric without a default: 5% of the baseline's mean absolute value


@dataclass
class Cell:
    """One test of one claim's metric: a strength, the pooled strengths, matched KL or the whole grid."""
    claim: str
    metric: str
    expect: str
    where: str
    values: Dict[int, float]
    margin: float
    decides: bool = True  # False: shown beside the verdict (a monotone claim's steps), not tested
    stat: Dict[str, float] = field(default_factory=dict)
    p_holm: float = math.nan
    p_equivalent_holm: float = math.nan
    verdict: str = INCONCLUSIVE
    needed: Dict[str, Optional[int]] = field(default_factory=dict)


def check_claims(claims: Any, labels: Sequence[str], metrics: Sequence[str]) -> List[str]:
    """Problems of a ``study.claims`` list (each named by its index and key); empty when it is usable."""
    if not isinstance(claims, list):
        return [f"`study.claims`: expected a list, got {claims!r}"]
    errors = []
    for i, claim in enumerate(claims):
        where = f"`study.claims[{i}]`"
        if not isinstance(claim, dict):
            errors.append(f"{where}: expected a mapping")
            continue
        for key in ("id", "claim", "compare", "treatment", "metrics"):
            if key not in claim:
                errors.append(f"{where}: missing `{key}`")
        if claim.get("compare") not in COMPARISONS:
            errors.append(f"{where}.compare: {claim.get('compare')!r} is not one of {', '.join(COMPARISONS)}")
        sides = ["treatment"] + ([] if claim.get("compare") == "monotone" else ["baseline"])
        for side in sides:
            if claim.get(side) not in labels:
                errors.append(f"{where}.{side}: {claim.get(side)!r} is not a curve label ({', '.join(labels)})")
        for j, m in enumerate(claim.get("metrics") or []):
            margin = m.get("margin") if isinstance(m, dict) else None
            if not isinstance(m, dict) or m.get("metric") not in metrics or m.get("expect") not in EXPECT \
                    or set(m) - {"metric", "expect", "margin"} \
                    or (margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin <= 0)):
                errors.append(f"{where}.metrics[{j}]: expected {{metric: one of {', '.join(metrics)}, expect: lower|higher, "
                              f"margin: a number > 0 (optional)}}, got {m!r}")
        for m in claim.get("report") or []:
            if m not in metrics:
                errors.append(f"{where}.report: {m!r} is not a metric ({', '.join(metrics)})")
    return errors


# ==================================================================== paired values


def _by_seed(runs: Sequence[Dict[str, Any]], label: str) -> Dict[int, List[Dict[str, Any]]]:
    out: Dict[int, List[Dict[str, Any]]] = {}
    for r in runs:
        if r["label"] == label:
            out.setdefault(r["seed"], []).append(r)
    return out


def _value(run: Dict[str, Any], metric: str) -> float:
    v = run.get(metric)
    return math.nan if v is None else float(v)


def _strength_key(value: Any) -> Tuple[int, Any]:
    return (0, float(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, str(value))


def strengths(runs, label: str) -> List[Any]:
    """The strength values of a curve, in increasing order."""
    values = {json.dumps(r["strength"]) for r in runs if r["label"] == label}
    return [json.loads(v) for v in sorted(values, key=lambda v: _strength_key(json.loads(v)))]


def same_strength_cells(runs, treatment: str, baseline: str, metric: str) -> Dict[Any, Dict[int, float]]:
    """``{strength: {seed: treatment − baseline}}`` at each strength both curves have."""
    base = _by_seed(runs, baseline)
    out: Dict[Any, Dict[int, float]] = {}
    for seed, mine in _by_seed(runs, treatment).items():
        theirs = {json.dumps(r["strength"]): r for r in base.get(seed, [])}
        for r in mine:
            key = json.dumps(r["strength"])
            if key in theirs:
                d = _value(r, metric) - _value(theirs[key], metric)
                if not math.isnan(d):
                    out.setdefault(key, {})[seed] = d
    return {json.loads(k): out[k] for k in sorted(out, key=lambda k: _strength_key(json.loads(k)))}


def pooled(cells: Dict[Any, Dict[int, float]]) -> Dict[int, float]:
    """Per seed, the mean over the strengths that seed has a value at."""
    seeds = sorted({s for values in cells.values() for s in values})
    return {s: float(np.mean([values[s] for values in cells.values() if s in values])) for s in seeds}


def anchored_curve(points: Sequence[Dict[str, Any]], origin: Optional[Dict[str, Any]], metric: str) -> Tuple[np.ndarray, np.ndarray]:
    """A seed's curve as (KL, metric) sorted by KL, starting at the reference's point (KL 0) when given."""
    pairs = [(_value(p, KL_METRIC), _value(p, metric)) for p in points]
    if origin is not None:
        pairs.append((0.0, _value(origin, metric)))
    pairs = sorted((x, y) for x, y in pairs if not (math.isnan(x) or math.isnan(y)))
    return np.array([x for x, _ in pairs]), np.array([y for _, y in pairs])


def matched_kl_values(runs, treatment: str, baseline: str, metric: str) -> Dict[int, float]:
    """``{seed: mean of treatment − baseline over matched KLs}`` (module doc)."""
    out = {}
    base, origins = _by_seed(runs, baseline), _by_seed(runs, REFERENCE_LABEL)
    for seed, mine in _by_seed(runs, treatment).items():
        origin = (origins.get(seed) or [None])[0]
        x1, y1 = anchored_curve(mine, origin, metric)
        x2, y2 = anchored_curve(base.get(seed, []), origin, metric)
        if len(x1) < 2 or len(x2) < 2:
            continue
        low, high = max(x1[0], x2[0]), min(x1[-1], x2[-1])
        if not low < high:
            continue
        grid = np.linspace(low, high, MATCH_POINTS + 1)[1:]  # at the shared origin the difference is 0 by construction
        out[seed] = float(np.mean(np.interp(grid, x1, y1) - np.interp(grid, x2, y2)))
    return out


def change_between(runs, label: str, metric: str, low: Any, high: Any) -> Dict[int, float]:
    """``{seed: metric(high) − metric(low)}`` of one curve."""
    out = {}
    for seed, members in _by_seed(runs, label).items():
        at = {json.dumps(r["strength"]): r for r in members}
        a, b = at.get(json.dumps(low)), at.get(json.dumps(high))
        if a is not None and b is not None:
            d = _value(b, metric) - _value(a, metric)
            if not math.isnan(d):
                out[seed] = d
    return out


# ==================================================================== cells, family, verdicts


def margin_of(spec: Dict[str, Any], runs, baseline: Optional[str]) -> float:
    if spec.get("margin") is not None:
        return float(spec["margin"])
    metric = spec["metric"]
    if metric in DEFAULT_MARGINS:
        return DEFAULT_MARGINS[metric]
    values = [abs(_value(r, metric)) for r in runs if r["label"] == baseline]
    values = [v for v in values if not math.isnan(v)]
    return FALLBACK_MARGIN_SHARE * float(np.mean(values)) if values and np.mean(values) > 0 else 1e-9


def claim_cells(claim: Dict[str, Any], runs: Sequence[Dict[str, Any]]) -> List[Cell]:
    """Every cell of one claim (module doc), untested."""
    kind, treatment, baseline = claim["compare"], claim["treatment"], claim.get("baseline")
    out: List[Cell] = []
    for spec in claim["metrics"]:
        metric, expect = spec["metric"], spec["expect"]
        margin = margin_of(spec, runs, baseline or treatment)

        def cell(where: str, values: Dict[int, float], decides: bool = True) -> Cell:
            return Cell(claim["id"], metric, expect, where, values, margin, decides)

        if kind == "same_strength":
            cells = same_strength_cells(runs, treatment, baseline, metric)
            knob = next((r.get("knob") for r in runs if r["label"] == treatment), None) or "strength"
            out += [cell(f"{knob}={value}", values) for value, values in cells.items()]
            if len(cells) > 1:
                out.append(cell("pooled", pooled(cells)))
        elif kind == "matched_kl":
            out.append(cell("matched KL", matched_kl_values(runs, treatment, baseline, metric)))
        else:
            values = strengths(runs, treatment)
            if len(values) >= 2:
                out.append(cell(f"{values[0]}→{values[-1]} (whole grid)",
                                change_between(runs, treatment, metric, values[0], values[-1])))
            if len(values) > 2:
                out += [cell(f"{a}→{b}", change_between(runs, treatment, metric, a, b), decides=False)
                        for a, b in zip(values, values[1:])]
    return out


def test_family(cells: Sequence[Cell]) -> None:
    """Test every cell, correct the deciding cells' tests by Holm (module doc), set each cell's verdict."""
    for c in cells:
        c.stat = stats.paired(list(c.values.values()), c.margin)
    tested = [c for c in cells if c.decides and c.stat["n"] >= MIN_SEEDS]
    for c, p in zip(tested, stats.holm([c.stat["p"] for c in tested])):
        c.p_holm = p
    for c, p in zip(tested, stats.holm([c.stat["p_equivalent"] for c in tested])):
        c.p_equivalent_holm = p
    strictest = ALPHA / max(1, len(tested))
    for c in cells:
        mean = c.stat["mean"]
        if not c.decides:
            c.verdict = ""
        elif c.stat["n"] < MIN_SEEDS:
            c.verdict = INCONCLUSIVE
        elif c.p_holm < ALPHA:
            wanted = mean < 0 if c.expect == "lower" else mean > 0
            c.verdict = REPRODUCED if wanted else NOT_REPRODUCED
        elif c.p_equivalent_holm < ALPHA:
            c.verdict = EQUIVALENT
        else:
            c.verdict = INCONCLUSIVE
        if c.decides and c.verdict == INCONCLUSIVE and c.stat["n"] >= 2:
            c.needed = stats.seeds_needed(mean, c.stat["sd"], strictest, c.margin)


def metric_verdict(cells: Sequence[Cell]) -> Tuple[str, Optional[Cell]]:
    """A metric's verdict from its deciding cells, and the cell that decides it (module doc)."""
    deciding = [c for c in cells if c.decides]
    for verdict in (NOT_REPRODUCED, REPRODUCED):
        hits = [c for c in deciding if c.verdict == verdict]
        if hits:
            return verdict, min(hits, key=lambda c: c.p_holm)
    main = next((c for c in deciding if c.where == "pooled"), deciding[0] if len(deciding) == 1 else None)
    if main is not None and main.verdict == EQUIVALENT:
        return EQUIVALENT, main
    if deciding and all(c.verdict == EQUIVALENT for c in deciding):
        return EQUIVALENT, deciding[-1]
    return INCONCLUSIVE, None


def claim_verdict(verdicts: Sequence[str]) -> str:
    if not verdicts:
        return INCONCLUSIVE
    if all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    if all(v == EQUIVALENT for v in verdicts):
        return EQUIVALENT
    if NOT_REPRODUCED in verdicts or (EQUIVALENT in verdicts and INCONCLUSIVE not in verdicts):
        return NOT_REPRODUCED
    return INCONCLUSIVE


def seeds_to_decide(cells: Sequence[Cell], each: Dict[str, str]) -> Optional[int]:
    """Paired seeds at which the claim would be decided, at the observed means and SDs: every undecided
    metric needs one of its cells decided (the fewest seeds among its cells), the claim all its metrics
    (the most among them). None when some metric would not be decided at any number of seeds."""
    per_metric = []
    for metric, verdict in each.items():
        if verdict != INCONCLUSIVE:
            continue
        options = [n for c in cells if c.metric == metric for n in (c.needed or {}).values() if n is not None]
        if not options:
            return None
        per_metric.append(min(options))
    return max(per_metric) if per_metric else None


def evaluate_claims(claims: Sequence[Dict[str, Any]], runs: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Every claim of a study, its cells tested as one family: per claim ``verdict``, ``each`` (metric →
    verdict), ``decided_by`` (metric → the deciding cell), ``cells``, ``seeds`` and ``seeds_needed``."""
    per_claim = [(claim, claim_cells(claim, runs)) for claim in claims]
    test_family([c for _, cells in per_claim for c in cells])
    results = []
    for claim, cells in per_claim:
        each, decided_by = {}, {}
        for spec in claim["metrics"]:
            verdict, cell = metric_verdict([c for c in cells if c.metric == spec["metric"]])
            each[spec["metric"]], decided_by[spec["metric"]] = verdict, cell.where if cell else None
        verdict = claim_verdict(list(each.values()))
        results.append({"id": claim["id"], "claim": claim["claim"], "compare": claim["compare"], "verdict": verdict,
                        "each": each, "decided_by": decided_by, "cells": cells,
                        "seeds": sorted({s for c in cells for s in c.values}),
                        "seeds_needed": seeds_to_decide(cells, each) if verdict == INCONCLUSIVE else None})
    return results


def evaluate_claim(claim: Dict[str, Any], runs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One claim tested alone (a family of its own cells)."""
    return evaluate_claims([claim], runs)[0]
