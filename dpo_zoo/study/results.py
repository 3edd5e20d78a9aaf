"""The claims table (``docs/results.md``), generated from a study's ``summary.json``, never typed by hand.

Each claim is declared in the study file (``study.claims``), so no code here knows a loss by name::

    - id: sampo_length
      claim: "SamPO: lower reward–length correlation than DPO at matched KL"
      compare: matched_kl           # matched_kl | same_strength | monotone
      treatment: sampo              # curve labels of study.losses
      baseline: dpo                 # (not used by monotone)
      metrics: [{metric: reward_length_corr, expect: lower}]
      report: [accuracy]            # shown beside the effect, not part of the verdict

How each comparison is made, per seed (the same seeds, data order and evaluation draws for every
curve, so the comparisons are paired), then summarised over seeds as mean ± 95% t interval:

* ``same_strength``: treatment − baseline at each strength value both curves have, averaged over those
  values; the mean KL (RB) of both is reported beside the effect;
* ``matched_kl``: each curve of that seed as metric against KL (RB), sorted by KL and linearly
  interpolated; the difference is averaged over 5 evenly spaced KLs of the range both curves cover.
  A seed where the ranges do not overlap gives no value;
* ``monotone``: the treatment curve alone, strengths in increasing order: the change of each metric
  from one value to the next.

Verdict per metric: *reproduced* when the 95% interval of the paired difference lies on the expected
side of 0 (``expect: lower`` → entirely below 0; for ``monotone``, every step's interval); *not
reproduced* when an interval lies entirely on the other side; otherwise *inconclusive at this scale*
(also with fewer than 2 seeds with a value). A claim is reproduced when all its metrics are, not
reproduced when any is not, else inconclusive.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from dpo_zoo.errors import StudyError

REFERENCE_LABEL = "reference"  # the reference model's own evaluation in a study's runs (KL 0)
# Two-sided 95% Student t quantiles t_{0.975, df} for df = 1..30 (beyond: the normal 1.96).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def ci95(values: Sequence[float]) -> Dict[str, float]:
    """Mean, SD and the half-width of the 95% t interval of the mean over ``values`` (NaNs dropped)."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    n = int(v.size)
    if n == 0:
        return {"mean": math.nan, "sd": math.nan, "ci95": math.nan, "n": 0}
    sd = float(v.std(ddof=1)) if n > 1 else math.nan
    t = T975[n - 2] if 2 <= n <= 31 else 1.96
    return {"mean": float(v.mean()), "sd": sd, "ci95": t * sd / math.sqrt(n) if n > 1 else math.nan, "n": n}



COMPARISONS = ("matched_kl", "same_strength", "monotone")
EXPECT = ("lower", "higher")
KL_METRIC = "kl_rb"
MATCH_POINTS = 5
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive at this scale"


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
            if not isinstance(m, dict) or m.get("metric") not in metrics or m.get("expect") not in EXPECT:
                errors.append(f"{where}.metrics[{j}]: expected {{metric: one of {', '.join(metrics)}, expect: lower|higher}}, got {m!r}")
        for m in claim.get("report") or []:
            if m not in metrics:
                errors.append(f"{where}.report: {m!r} is not a metric ({', '.join(metrics)})")
    return errors


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


def paired_same_strength(runs, treatment: str, baseline: str, metric: str) -> Dict[int, float]:
    out = {}
    base = _by_seed(runs, baseline)
    for seed, mine in _by_seed(runs, treatment).items():
        theirs = {json.dumps(r["strength"]): r for r in base.get(seed, [])}
        diffs = [_value(r, metric) - _value(theirs[json.dumps(r["strength"])], metric)
                 for r in mine if json.dumps(r["strength"]) in theirs]
        diffs = [d for d in diffs if not math.isnan(d)]
        if diffs:
            out[seed] = float(np.mean(diffs))
    return out


def _curve(points: Sequence[Dict[str, Any]], metric: str) -> Tuple[np.ndarray, np.ndarray]:
    pairs = sorted((_value(p, KL_METRIC), _value(p, metric)) for p in points)
    pairs = [(x, y) for x, y in pairs if not (math.isnan(x) or math.isnan(y))]
    return np.array([x for x, _ in pairs]), np.array([y for _, y in pairs])


def paired_matched_kl(runs, treatment: str, baseline: str, metric: str) -> Dict[int, float]:
    out = {}
    base = _by_seed(runs, baseline)
    for seed, mine in _by_seed(runs, treatment).items():
        x1, y1 = _curve(mine, metric)
        x2, y2 = _curve(base.get(seed, []), metric)
        if len(x1) < 2 or len(x2) < 2:
            continue
        low, high = max(x1[0], x2[0]), min(x1[-1], x2[-1])
        if not low < high:
            continue
        grid = np.linspace(low, high, MATCH_POINTS)
        out[seed] = float(np.mean(np.interp(grid, x1, y1) - np.interp(grid, x2, y2)))
    return out


def monotone_steps(runs, treatment: str, metric: str) -> List[Tuple[Any, Any, Dict[int, float]]]:
    """(from value, to value, {seed: change}) for each step of increasing strength."""
    by_seed = _by_seed(runs, treatment)
    values = sorted({json.dumps(r["strength"]) for r in runs if r["label"] == treatment},
                    key=lambda v: _strength_key(json.loads(v)))
    steps = []
    for a, b in zip(values, values[1:]):
        changes = {}
        for seed, members in by_seed.items():
            at = {json.dumps(r["strength"]): r for r in members}
            if a in at and b in at:
                d = _value(at[b], metric) - _value(at[a], metric)
                if not math.isnan(d):
                    changes[seed] = d
        steps.append((json.loads(a), json.loads(b), changes))
    return steps


def verdict_of(stat: Dict[str, float], expect: str) -> str:
    if stat["n"] < 2 or math.isnan(stat["ci95"]):
        return INCONCLUSIVE
    low, high = stat["mean"] - stat["ci95"], stat["mean"] + stat["ci95"]
    if expect == "lower":
        return REPRODUCED if high < 0 else NOT_REPRODUCED if low > 0 else INCONCLUSIVE
    return REPRODUCED if low > 0 else NOT_REPRODUCED if high < 0 else INCONCLUSIVE


def combine(verdicts: Sequence[str]) -> str:
    if verdicts and all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    return NOT_REPRODUCED if NOT_REPRODUCED in verdicts else INCONCLUSIVE


def _num(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:+.3f}"


def _stat(stat: Dict[str, float]) -> str:
    if stat["n"] == 0:
        return "no paired value"
    half = "" if math.isnan(stat["ci95"]) else f" ± {stat['ci95']:.3f}"
    return f"{_num(stat['mean'])}{half} (n={stat['n']})"


def _is_missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _fmt(stat: Dict[str, Any], digits: int = 3) -> str:
    """``mean ± 95% half-width`` of a :func:`ci95` summary (``–`` without a value); NaN may be null (JSON)."""
    if not stat["n"] or _is_missing(stat["mean"]):
        return "–"
    if _is_missing(stat["ci95"]):
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['ci95']:.{digits}f}"


def summary_table(rows: Sequence[Dict[str, Any]]) -> str:
    """Markdown: one line per (curve, strength), mean ± 95% CI over seeds."""
    lines = ["| curve | strength | seeds | reward | KL (RB) | KL (MC) | entropy/token | distinct-1 | distinct-2 | "
             "length | r(reward, length) | accuracy |", "|---" * 12 + "|"]
    for r in rows:
        strength = "–" if r["knob"] is None else f"{r['knob']}={r['strength']}"
        cells = [_fmt(r[m]) for m in ("reward", "kl_rb", "kl_mc", "entropy_per_token", "distinct_1", "distinct_2")]
        cells += [_fmt(r["mean_length"], 1), _fmt(r["reward_length_corr"]), _fmt(r["accuracy"])]
        lines.append(f"| {r['label']} | {strength} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checks_lines(runs: Sequence[Dict[str, Any]]) -> List[str]:
    """The study's own sanity checks: the Rao–Blackwellized KL's standard error against the Monte Carlo
    one on the same samples (lower on every trained run is what the estimator promises), and the time
    the runs took as recorded (a run reused from an earlier sitting records only its reuse)."""
    trained = [r for r in runs if r["label"] != REFERENCE_LABEL]
    below = [r for r in trained if r.get("rb_below_mc")]
    lines = [f"- Rao–Blackwellized KL standard error below the Monte Carlo one, on the same samples: "
             f"{len(below)} of {len(trained)} runs"]
    for r in trained:
        if not r.get("rb_below_mc"):
            lines.append(f"  - not below: {r['label']} {r.get('knob')}={r.get('strength')} seed {r['seed']} "
                         f"(RB SE {r.get('kl_rb_se')}, MC SE {r.get('kl_mc_se')})")
    ratios = [r["kl_rb_se"] / r["kl_mc_se"] for r in trained
              if not _is_missing(r.get("kl_rb_se")) and not _is_missing(r.get("kl_mc_se")) and r["kl_mc_se"] > 0]
    if ratios:
        lines.append(f"  - RB SE / MC SE: median {float(np.median(ratios)):.2f}, largest {max(ratios):.2f}")
    timed = [float(r["train_seconds"]) for r in trained if not _is_missing(r.get("train_seconds"))]
    eval_s = sum(float(r.get("eval_seconds") or 0.0) for r in runs)
    untimed = f"; {len(trained) - len(timed)} runs trained without a recorded time" if len(timed) < len(trained) else ""
    lines.append(f"- recorded time: training {sum(timed) / 60:.1f} min ({len(timed)} runs{untimed}), evaluation "
                 f"{eval_s / 60:.1f} min ({len(trained)} runs + {len(runs) - len(trained)} reference evaluations); "
                 "data preparation not included")
    return lines


def evaluate_claim(claim: Dict[str, Any], runs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The verdict and the numbers of one claim (module doc)."""
    kind, treatment, baseline = claim["compare"], claim["treatment"], claim.get("baseline")
    parts, verdicts, seeds = [], [], set()
    for m in claim["metrics"]:
        metric, expect = m["metric"], m["expect"]
        if kind == "monotone":
            step_verdicts = []
            steps = monotone_steps(runs, treatment, metric)
            for a, b, changes in steps:
                stat = ci95(list(changes.values()))
                seeds |= set(changes)
                step_verdicts.append(verdict_of(stat, expect))
                parts.append(f"Δ{metric} {a}→{b}: {_stat(stat)}")
            if len(steps) > 1:  # the whole grid at once, beside the steps (not part of the verdict)
                first, last = steps[0][0], steps[-1][1]
                whole = monotone_steps([r for r in runs if r["label"] == treatment and r["strength"] in (first, last)],
                                       treatment, metric)
                parts.append(f"Δ{metric} {first}→{last} (whole grid): {_stat(ci95(list(whole[0][2].values())))}")
            verdicts.append(combine(step_verdicts) if step_verdicts else INCONCLUSIVE)
        else:
            paired = (paired_matched_kl if kind == "matched_kl" else paired_same_strength)(runs, treatment, baseline, metric)
            stat = ci95(list(paired.values()))
            seeds |= set(paired)
            verdicts.append(verdict_of(stat, expect))
            parts.append(f"{metric} {treatment} − {baseline}: {_stat(stat)} (expected {expect})")
    extra = []
    if kind != "monotone":
        judged = {m["metric"] for m in claim["metrics"]}
        beside = [KL_METRIC] * (kind == "same_strength") + list(claim.get("report") or [])
        for metric in [m for m in dict.fromkeys(beside) if m not in judged]:  # each number once
            stat = ci95(list(paired_same_strength(runs, treatment, baseline, metric).values()))
            extra.append(f"{metric} {treatment} − {baseline} (same strength): {_stat(stat)}")
    each = {m["metric"]: v for m, v in zip(claim["metrics"], verdicts)}
    return {"id": claim["id"], "claim": claim["claim"], "compare": kind, "verdict": combine(verdicts), "each": each,
            "numbers": parts + extra, "seeds": sorted(seeds)}


def render_results(summary: Dict[str, Any], source: str, picture: str = "frontier.png") -> str:
    """The claims file of one study summary; ``source`` names the summary file and ``picture`` the
    frontier PNG beside the results file."""
    return render_studies([(summary, source, picture)])


def render_studies(studies: Sequence[Tuple[Dict[str, Any], str, str]]) -> str:
    """``docs/results.md`` from one or more ``(summary, summary file name, picture name)``: per study,
    its settings, the claims table, the frontier and the checks (one section per study when several)."""
    lines = [
        "# Which loss is better: the claims, run through dpo_zoo",
        "",
        "Generated by `python -m dpo_zoo.study_results` from the studies' `summary.json`; do not edit by hand",
        "(a test regenerates this file and checks it is byte-identical).",
    ]
    several = len(studies) > 1
    for number, (summary, source, picture) in enumerate(studies, 1):
        if several:
            lines += ["", f"## Study {number}: `{summary['study_file']}`"]
        lines += study_section(summary, source, picture, "###" if several else "##")
    return "\n".join(lines) + "\n"


def study_section(summary: Dict[str, Any], source: str, picture: str, heading: str) -> List[str]:
    settings = summary["settings"]
    runs = [r for r in summary["runs"] if r["label"] != REFERENCE_LABEL]
    experiment = summary.get("experiment", {})
    train = experiment.get("train", {})
    lines = [
        "",
        f"- study: `{summary['study_file']}` ({source}); command: `{summary['command']}`",
        f"- model: `{experiment.get('model', {}).get('name_or_path', 'smollm2-135m-instruct')}`; "
        f"train steps: {train.get('max_steps', 'default')}; LoRA: {train.get('lora', {}).get('enabled', False)}",
    ]
    data = summary.get("data") or {}
    if data:
        lines.append("- data: " + "; ".join(f"{split} {c['pairs']} pairs ({c['ties']} ties)" for split, c in data.items()))
    lines += [
        f"- reward: `{settings['reward']}`; evaluation: {settings['eval']['prompts']} held-out prompts × "
        f"{settings['eval']['samples']} samples, ≤ {settings['eval']['max_new_tokens']} new tokens",
        f"- seeds: {settings['seeds']} (paired: the same seeds for every loss); runs: {len(runs)}",
        "- numbers: paired difference treatment − baseline, mean ± 95% t interval over seeds (n = seeds)",
        "",
        "| claim | verdict | comparison | numbers | seeds |",
        "|---|---|---|---|---|",
    ]
    for claim in settings.get("claims", []):
        result = evaluate_claim(claim, runs)
        numbers = "<br>".join(result["numbers"]).replace("|", "\\|")
        each = ""
        if len(result["each"]) > 1:
            each = " (" + "; ".join(f"{metric}: {verdict}" for metric, verdict in result["each"].items()) + ")"
        lines.append(f"| {result['claim']} | **{result['verdict']}**{each} | {result['compare']} | {numbers} | "
                     f"{', '.join(map(str, result['seeds'])) or '–'} |")
    lines += ["", "How the comparisons and verdicts are made: `dpo_zoo/study/results.py` (module docstring).",
              "", f"{heading} The frontier", "",
              f"![reward–KL frontier]({picture})", "",
              "Mean ± 95% t interval over seeds; KL per sequence in nats.", "",
              summary_table(summary.get("aggregates", [])), "",
              f"{heading} Checks", "", *checks_lines(summary["runs"])]
    return lines


def sidecar_names(summary_path: Path, output: Path, number: int = 1) -> Tuple[str, str]:
    """(summary file, frontier picture) as the results file names them. Beside the study's own outputs
    they are its ``summary.json`` and ``frontier.png``; a results file written elsewhere (``docs/results.md``)
    gets copies of both named by its stem and the study's number (``results_summary.json``,
    ``results_frontier.png``, then ``results_summary2.json`` …), so that it can be regenerated from its
    own copies to the same bytes."""
    if number == 1 and summary_path.parent.resolve() == output.parent.resolve() and summary_path.name == "summary.json":
        return "summary.json", "frontier.png"
    suffix = "" if number == 1 else str(number)
    return f"{output.stem}_summary{suffix}.json", f"{output.stem}_frontier{suffix}.png"


def write_results(summary_paths: Union[str, Sequence[str]], output: str) -> str:
    """Render the summaries into ``output`` (with the sidecar copies of :func:`sidecar_names`: each
    summary, and its study's ``frontier.png`` when there is one beside it)."""
    import shutil

    paths = [Path(summary_paths)] if isinstance(summary_paths, (str, Path)) else [Path(p) for p in summary_paths]
    output_path = Path(output)
    studies, copies = [], []
    for number, path in enumerate(paths, 1):
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise StudyError(f"{path}: cannot read a study summary: {err}") from None
        summary_name, picture_name = sidecar_names(path, output_path, number)
        studies.append((summary, summary_name, picture_name))
        copies += [(path, summary_name), (path.parent / "frontier.png", picture_name)]
    text = render_studies(studies)
    output_path.write_text(text, encoding="utf-8")
    for source, name in copies:
        target = output_path.parent / name
        if source.exists() and source.resolve() != target.resolve():
            shutil.copyfile(source, target)
    return text


if __name__ == "__main__":  # python -m dpo_zoo.study_results SUMMARY.json [SUMMARY.json ...] [OUTPUT.md]
    import sys

    args = sys.argv[1:]
    summaries = [a for a in args if not a.endswith(".md")]
    outputs = [a for a in args if a.endswith(".md")]
    if not summaries or len(outputs) > 1:
        print("usage: python -m dpo_zoo.study_results STUDY_OUTPUT/summary.json [MORE/summary.json ...] [docs/results.md]\n"
              "  writes the claims of every study into one file, and beside it copies of each summary and\n"
              "  frontier.png named by its stem", file=sys.stderr)
        sys.exit(2)
    write_results(summaries, outputs[0] if outputs else "docs/results.md")
