"""The claims table (``docs/results.md``), generated from a study's ``summary.json``, never typed by hand.

How claims are declared, paired, tested and decided: :mod:`dpo_zoo.study.verdicts` (module doc). This
module renders them: per study its settings, the claims table (verdict, the cell that decides it, each
cell's paired difference with its 95% t interval, p-value and Holm-adjusted p-value, and for an
undecided claim the seeds that would decide it), the frontier and the checks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from dpo_zoo.errors import StudyError
from dpo_zoo.study import verdicts as V
from dpo_zoo.study.stats import t_ppf
from dpo_zoo.study.verdicts import (  # noqa: F401  (re-exported: the names the runner and users import)
    ALPHA, EQUIVALENT, INCONCLUSIVE, KL_METRIC, MIN_SEEDS, NOT_REPRODUCED, REFERENCE_LABEL, REPRODUCED,
    check_claims, evaluate_claim, evaluate_claims)


def ci95(values: Sequence[float]) -> Dict[str, float]:
    """Mean, SD and the half-width of the 95% t interval of the mean over ``values`` (NaNs dropped)."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    n = int(v.size)
    if n == 0:
        return {"mean": math.nan, "sd": math.nan, "ci95": math.nan, "n": 0}
    sd = float(v.std(ddof=1)) if n > 1 else math.nan
    return {"mean": float(v.mean()), "sd": sd, "ci95": t_ppf(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else math.nan, "n": n}


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
    """Markdown: one line per (curve, strength), mean ± 95% CI over seeds; the reward drop from the
    trajectory's peak (:func:`dpo_zoo.study.trajectory.reward_drop`) when the study has trajectories."""
    drops = any(not _is_missing((r.get("reward_drop") or {}).get("mean")) for r in rows)
    head = ["curve", "strength", "seeds", "reward", "KL (RB)", "KL (MC)", "entropy/token", "distinct-1", "distinct-2",
            "length", "r(reward, length)", "accuracy", *(["reward drop"] if drops else [])]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        strength = "–" if r["knob"] is None else f"{r['knob']}={r['strength']}"
        cells = [_fmt(r[m]) for m in ("reward", "kl_rb", "kl_mc", "entropy_per_token", "distinct_1", "distinct_2")]
        cells += [_fmt(r["mean_length"], 2), _fmt(r["reward_length_corr"]), _fmt(r["accuracy"])]
        if drops:
            cells.append(_fmt(r.get("reward_drop") or {"mean": math.nan, "ci95": math.nan}))
        lines.append(f"| {r['label']} | {strength} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checks_lines(runs: Sequence[Dict[str, Any]]) -> List[str]:
    """The study's own sanity checks: the Rao–Blackwellized KL's standard error against the Monte Carlo
    one on the same samples (lower on every trained run is what the estimator promises), and the time
    the runs took as recorded (a run reused from an earlier sitting records only its reuse)."""
    trained = [r for r in runs if r["label"] != REFERENCE_LABEL]
    below = [r for r in trained if r.get("rb_below_mc")]
    sampled = [r for r in trained if r.get("rb_below_mc") is not None]  # exact runs have no estimator to check
    lines = [f"- Rao–Blackwellized KL standard error below the Monte Carlo one, on the same samples: "
             f"{len(below)} of {len(sampled)} runs"] if sampled else []
    invalid = [float(r["invalid_mass"]) for r in trained if not _is_missing(r.get("invalid_mass"))]
    if invalid:
        lines.append(f"- exact world: mass the unrestricted policy puts outside the completions, largest "
                     f"{max(invalid):.2g} (median {float(np.median(invalid)):.2g}) over {len(invalid)} runs")
    for r in sampled:
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


def _p(p: float) -> str:
    return "–" if _is_missing(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def cell_line(cell: "V.Cell") -> str:
    """One cell: where, the paired difference ± 95% half-width (n, p, Holm-adjusted p), and its verdict
    (or the seeds that would decide it)."""
    line = f"{cell.where}: {_stat(cell.stat)}"
    if not cell.decides:
        return line + " (a step of the grid: shown, not tested)"
    if cell.stat["n"] < MIN_SEEDS:
        return line + f" → {INCONCLUSIVE} (fewer than {MIN_SEEDS} paired seeds)"
    line = line[:-1] + f", p {_p(cell.stat['p'])}, Holm {_p(cell.p_holm)}; TOST ±{cell.margin:g}: Holm {_p(cell.p_equivalent_holm)})"
    verdict = f"equivalent within ±{cell.margin:g}" if cell.verdict == EQUIVALENT else cell.verdict
    needed = cell.needed or {}
    if cell.verdict == INCONCLUSIVE:
        options = [f"{n} seeds to {kind}" for kind, n in (("differ", needed.get("difference")),
                                                          ("be equivalent", needed.get("equivalence"))) if n]
        verdict += " (would need about " + " or ".join(options) + ")" if options else " (no number of seeds would decide it at this effect and SD)"
    return f"{line} → {verdict}"


def _difference(claim: Dict[str, Any], metric: str) -> str:
    baseline = claim.get("baseline")
    return f"{metric} {claim['treatment']} − {baseline}" if baseline else f"Δ{metric} ({claim['treatment']}, low → high strength)"


def headline(claim: Dict[str, Any], result: Dict[str, Any]) -> List[str]:
    """Per metric, the cell that decides it (else the pooled or only cell): the table's numbers."""
    lines = []
    for spec in claim["metrics"]:
        metric = spec["metric"]
        cells = [c for c in result["cells"] if c.metric == metric and c.decides]
        chosen = next((c for c in cells if c.where == result["decided_by"].get(metric)), None) \
            or next((c for c in cells if c.where == "pooled"), cells[0] if cells else None)
        if chosen is not None:
            lines.append(f"{_difference(claim, metric)}, {cell_line(chosen)}")
    return lines


def claim_details(claim: Dict[str, Any], result: Dict[str, Any], runs: Sequence[Dict[str, Any]]) -> List[str]:
    """Every cell of one claim, then the metrics reported beside it (not part of the verdict)."""
    treatment, baseline = claim["treatment"], claim.get("baseline")
    parts = []
    for spec in claim["metrics"]:
        parts.append(f"  - {_difference(claim, spec['metric'])}: {result['each'][spec['metric']]}")
        parts += [f"    - {cell_line(c)}" for c in result["cells"] if c.metric == spec["metric"]]
    if claim["compare"] != "monotone":
        judged = {m["metric"] for m in claim["metrics"]}
        beside = [KL_METRIC] * (claim["compare"] == "same_strength") + list(claim.get("report") or [])
        for metric in [m for m in dict.fromkeys(beside) if m not in judged]:  # each number once
            stat = ci95(list(V.pooled(V.same_strength_cells(runs, treatment, baseline, metric)).values()))
            parts.append(f"  - beside (not tested): {metric} {treatment} − {baseline}, same strength, pooled: {_stat(stat)}")
    return parts


def _verdict_text(result: Dict[str, Any]) -> str:
    text = f"**{result['verdict']}**"
    if len(result["each"]) > 1:
        text += " (" + "; ".join(f"{m}: {v}" for m, v in result["each"].items()) + ")"
    if result["verdict"] == INCONCLUSIVE:
        text += (f"; would need about {result['seeds_needed']} paired seeds" if result["seeds_needed"]
                 else "; no number of seeds would decide it at the observed effects")
    return text


def _decided_by(result: Dict[str, Any]) -> str:
    cells = [f"{m}: {w}" if len(result["decided_by"]) > 1 else w for m, w in result["decided_by"].items() if w]
    return "; ".join(cells) or "–"


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
    results = evaluate_claims(settings.get("claims", []), summary["runs"])
    family = sum(1 for r in results for c in r["cells"] if c.decides and c.stat["n"] >= MIN_SEEDS)
    experiment = summary.get("experiment", {})
    train = experiment.get("train", {})
    exact = settings.get("exact")
    if exact:  # the exact benchmark (dpo_zoo/study/exact_world.py): no sampling, no reward model
        from dpo_zoo.study.exact_world import completions_per_prompt

        model = (f"the exact world's reference (a {exact['layers']}-layer Llama, width {exact['hidden_size']}, "
                 "fitted to a known Markov chain)")
        evaluation = (f"- reward and evaluation: **exact**, sums over every completion ({exact['tokens']} content tokens, "
                      f"1–{exact['max_length']} of them then EOS: {completions_per_prompt(exact['tokens'], exact['max_length'])} "
                      f"per prompt, {exact['prompts']} prompts); world seed {exact['seed']}, reward length bias "
                      f"{exact['length_bias']:g}, tie margin {exact['tie_margin']:g}, Bradley–Terry temperature "
                      f"{exact['temperature']:g}; no evaluation noise (standard errors 0)")
    else:
        model = f"`{experiment.get('model', {}).get('name_or_path', 'smollm2-135m-instruct')}`"
        evaluation = (f"- reward: `{settings['reward']}`; evaluation: {settings['eval']['prompts']} held-out prompts × "
                      f"{settings['eval']['samples']} samples, ≤ {settings['eval']['max_new_tokens']} new tokens; "
                      + (f"sampling seed {settings['eval']['seed']} for every run (common random numbers)"
                         if settings["eval"].get("seed", "train") != "train" else "sampling seed: each run's training seed"))
    lines = [
        "",
        f"- study: `{summary['study_file']}` ({source}); command: `{summary['command']}`",
        f"- model: {model}; "
        + (f"epochs: {train['epochs']}" if train.get("epochs") else f"train steps: {train.get('max_steps', 'default')}")
        + f"; LoRA: {train.get('lora', {}).get('enabled', False)}",
    ]
    data = summary.get("data") or {}
    if data:
        lines.append("- data: " + "; ".join(f"{split} {c['pairs']} pairs ({c['ties']} ties)" for split, c in data.items()))
    lines += [
        evaluation,
        f"- seeds: {settings['seeds']} (paired: the same seeds for every loss); runs: {len(runs)}",
        "- numbers: per cell (a strength, the pooled strengths, matched KL or the whole grid), the paired "
        "difference treatment − baseline over seeds, mean ± 95% t interval (n = paired seeds), its p-value and "
        f"the Holm-adjusted one; the family: {family} tested cells of this study's {len(settings.get('claims', []))} "
        f"claims, family-wise error ≤ {ALPHA:g}; TOST: equivalence within the margin ±δ",
        "",
        "| claim | verdict | comparison | decided by | numbers | seeds |",
        "|---|---|---|---|---|---|",
    ]
    claims = settings.get("claims", [])
    for claim, result in zip(claims, results):
        numbers = "<br>".join(headline(claim, result)).replace("|", "\\|")
        lines.append(f"| {result['claim']} | {_verdict_text(result)} | {result['compare']} | {_decided_by(result)} | "
                     f"{numbers} | {len(result['seeds'])} |")
    if claims:
        lines += ["", f"{heading} Every cell of every claim", ""]
        for claim, result in zip(claims, results):
            lines += [f"- `{claim['id']}`: {result['claim']} — **{result['verdict']}**",
                      *claim_details(claim, result, summary["runs"])]
    lines += ["", "How the comparisons and verdicts are made: `dpo_zoo/study/verdicts.py` (module docstring).",
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
