"""The files of a ``dpo-zoo compare`` report: ``summary.md``, ``summary.json``, ``pairs.csv``,
``pairs.parquet`` and a self-contained ``report.html`` (plots as base64 PNG, no external resources),
and ``inputs.json`` (written last: what the report was computed from, so an unchanged comparison is
reused).

Plots are drawn on bare :class:`matplotlib.figure.Figure` objects with the Agg canvas, never through
``pyplot``, so writing a report neither needs a display nor changes the caller's matplotlib backend.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dpo_zoo.metrics import functions as M
from dpo_zoo.staleness import differences

MISSING = "—"


# ==================================================================== numbers


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table: ``digits`` significant decimals, ``—`` for missing / NaN."""
    if value is None:
        return MISSING
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return MISSING
    if number != 0 and (abs(number) >= 1e4 or abs(number) < 10 ** -digits):
        return f"{number:.{digits}g}"
    return f"{number:.{digits}f}"


def fmt_pm(mean: Any, stderr: Any, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and not math.isfinite(mean)):
        return MISSING
    return f"{fmt(mean, digits)} ± {fmt(stderr, digits)}"


# ==================================================================== tables


SUMMARY_HEADER = [
    "entry", "loss", "ref", "acc", "tie |m|", "tie p", "margin (mean ± std)", "ECE", "Brier",
    "len corr", "acc: chosen longer / shorter", "Δlogp chosen", "Δlogp rejected", "KL MC ± se",
    "KL RB ± se", "entropy/tok", "loss",
]


JUDGE_HEADER = ["win rate ± se", "LC win rate ± se"]


def summary_header(summary: Dict[str, Any]) -> List[str]:
    """The summary table's columns: the win-rate columns only when a judge was asked (compare.judge)."""
    return SUMMARY_HEADER + (JUDGE_HEADER if summary.get("judge") else [])


def _win_rate_cells(entry: Dict[str, Any]) -> List[str]:
    rate = entry.get("win_rate")
    if rate is None:
        return ["baseline", "baseline"]
    return [fmt_pm(rate["win_rate"], rate["stderr"]), fmt_pm(rate["lc_win_rate"], rate["lc_stderr"])]


def judge_note(summary: Dict[str, Any]) -> str:
    """What the win-rate columns mean, with the judge's position bias and consistency per subject."""
    judge = summary.get("judge")
    if not judge:
        return ""
    seen = {}
    for entry in summary["entries"]:
        rate = entry.get("win_rate")
        if rate is not None and entry["subject"] not in seen:
            seen[entry["subject"]] = (f"{entry['subject']}: {rate['wins']} wins / {rate['ties']} ties / "
                                      f"{rate['losses']} losses, first answer chosen {fmt(rate['first_position_rate'])}, "
                                      f"same verdict in both orders {fmt(rate['consistency'])}")
    return (f"win rate: against {judge['baseline']}, judge `{judge['judge']}`, {judge['prompts']} held-out prompts "
            f"(one completion each, ≤ {judge['max_new_tokens']} tokens), each judged in both orders; the mean "
            "debiased preference ± SE. LC: length-controlled (AlpacaEval 2's regression on tanh of the standardised "
            "length difference, without its instruction term): the predicted preference at equal length. "
            + "; ".join(seen.values()) + ".")


def _accuracy_cell(metrics: Dict[str, Any]) -> str:
    """The accuracy, and how many of its pairs had a margin 0 up to rounding (scored ½), when any did."""
    zero = metrics.get("rewards/zero_margins")
    return fmt(metrics["rewards/accuracies"]) + (f" ({zero} at 0)" if zero else "")


def summary_rows(summary: Dict[str, Any]) -> List[List[str]]:
    rows = []
    for entry in summary["entries"]:
        m, kl = entry["metrics"], entry["kl"]
        rows.append([
            entry["label"], entry["loss"], entry["reference"], _accuracy_cell(m),
            fmt(m["ties/abs_margin"]), fmt(m["ties/tie_prob"]),
            fmt_pm(m["rewards/margins"], m["rewards/margins_std"]),
            fmt(m["calibration/ece"]), fmt(m["calibration/brier"]), fmt(m["length/correlation"]),
            f"{fmt(m['length/acc_chosen_longer'])} / {fmt(m['length/acc_rejected_longer'])}",
            fmt(m["logps/chosen_shift"]), fmt(m["logps/rejected_shift"]),
            fmt_pm(kl["mc"], kl["mc_stderr"]), fmt_pm(kl["rb"], kl["rb_stderr"]),
            fmt(kl["entropy_per_token"]), fmt(m["loss"], 4),
        ] + (_win_rate_cells(entry) if summary.get("judge") else []))
    return rows


def loss_rows(summary: Dict[str, Any]) -> List[List[str]]:
    """Rows = registered losses, columns = subjects: each subject's held-out value of each loss."""
    subjects = list(summary["heldout_losses"])
    names = sorted({name for values in summary["heldout_losses"].values() for name in values})
    rows = []
    for name in names:
        row = [name]
        for subject in subjects:
            cell = summary["heldout_losses"][subject].get(name, {})
            row.append(fmt(cell.get("value"), 4) if cell.get("value") is not None else f"{MISSING}¹")
        rows.append(row)
    return rows


def skipped_reasons(summary: Dict[str, Any]) -> List[str]:
    """The losses that could not be scored: one line per distinct reason, naming the losses and the
    subjects it applies to (the usual case, "no top-k in the cache", is one line, not one per loss)."""
    by_reason: Dict[str, Dict[str, List[str]]] = {}
    for subject, values in summary["heldout_losses"].items():
        for name, cell in sorted(values.items()):
            if cell.get("value") is None and cell.get("skipped"):
                group = by_reason.setdefault(cell["skipped"], {"losses": [], "subjects": []})
                if name not in group["losses"]:
                    group["losses"].append(name)
                if subject not in group["subjects"]:
                    group["subjects"].append(subject)
    return [f"{', '.join(g['losses'])} ({', '.join(g['subjects'])}): {reason}" for reason, g in by_reason.items()]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def clean(cell: Any) -> str:
        return str(cell).replace("|", "\\|")  # a bare | would end the cell

    lines = ["| " + " | ".join(clean(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(summary: Dict[str, Any]) -> str:
    data = summary["data"]
    parts = [
        "# dpo-zoo compare",
        "",
        f"Held-out set `{data['path']}`: {data['pairs']} pairs, {data['ties']} ties "
        f"(stores: {', '.join(data['provides'])}).",
        "",
        markdown_table(summary_header(summary), summary_rows(summary)),
        "",
        "acc: preference accuracy on non-tie pairs (margin > 0; a margin 0 up to float32 rounding counts ½, "
        "and \"(n at 0)\" says how many did). tie |m|, tie p: mean "
        "|margin| and mean predicted tie probability on tie pairs. ECE: 10 equal-width bins, each pair counted "
        "in both orders; labels are soft labels where present, else 1; Brier against the same labels. "
        "len corr: Pearson(margin, chosen − rejected tokens). Δlogp: mean log π − log π_ref. KL: "
        "KL(π ‖ π_ref) in nats per completion, Monte Carlo and Rao–Blackwellized, ± standard error. "
        "loss: the entry's own loss, mean over pairs." + (" " + judge_note(summary) if summary.get("judge") else ""),
        "",
        "## Held-out value of every registered loss (default hyperparameters)",
        "",
        markdown_table(["loss", *summary["heldout_losses"].keys()], loss_rows(summary)),
    ]
    reasons = skipped_reasons(summary)
    if reasons:
        parts += ["", "¹ not scored:", ""] + [f"- {line}" for line in reasons]
    if summary["notes"]:
        parts += ["", "## Notes", ""] + [f"- {note}" for note in summary["notes"]]
    timings = {k: v for k, v in summary["timings"].items() if isinstance(v, dict)}
    if timings:
        parts += ["", "## Timings (seconds)", "",
                  markdown_table(["subject", "load", "pass", "forward", "kl"],
                                 [[k, fmt(v["load_seconds"], 1), fmt(v["pass_seconds"], 1),
                                   fmt(v["forward_seconds"], 1), fmt(v["kl_seconds"], 1)] for k, v in timings.items()])]
    return "\n".join(parts) + "\n"


# ==================================================================== plots


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(width: float = 7.0, height: float = 4.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def plot_margins(tables: Sequence[Dict[str, np.ndarray]]) -> str:
    """Histograms of the margins per entry: non-tie pairs, and tie pairs when there are any."""
    has_ties = any(bool(np.any(t["is_tie"])) for t in tables)
    figure = _figure(10 if has_ties else 7, 4)
    axes = figure.subplots(1, 2 if has_ties else 1, squeeze=False)[0]
    everything = np.concatenate([t["margin"] for t in tables]) if tables else np.zeros(1)
    finite = everything[np.isfinite(everything)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
    if low == high:
        low, high = low - 1.0, high + 1.0
    edges = np.linspace(low, high, 31)
    for axis, want_ties, title in ((axes[0], False, "non-tie pairs"), *(((axes[1], True, "tie pairs"),) if has_ties else ())):
        for table in tables:
            values = table["margin"][np.asarray(table["is_tie"], dtype=bool) == want_ties]
            if values.size:
                axis.hist(values, bins=edges, histtype="step", linewidth=1.6, label=str(table["entry"][0]))
        axis.axvline(0.0, color="black", linewidth=0.8, linestyle="--")
        axis.set_xlabel("margin r(y_w) − r(y_l)")
        axis.set_ylabel("pairs")
        axis.set_title(f"Margin distribution, {title}")
        axis.legend(fontsize=8)
    return _png(figure)


def length_edges(length_diff: np.ndarray, max_bins: int = 6) -> List[float]:
    """Bin edges for the length difference: quantiles (so bins hold similar counts), made unique."""
    values = np.asarray(length_diff, dtype=np.float64)
    if values.size == 0:
        return [0.0, 1.0]
    quantiles = np.quantile(values, np.linspace(0, 1, max_bins + 1))
    # Token counts are whole numbers: whole-number edges read better and lose nothing.
    quantiles = quantiles.round() if np.all(values == values.round()) else quantiles.round(6)
    edges = sorted(set(quantiles.tolist()))
    if len(edges) == 1:
        edges = [edges[0] - 0.5, edges[0] + 0.5]
    return edges


def plot_length_accuracy(tables: Sequence[Dict[str, np.ndarray]]) -> str:
    """Accuracy of each entry in bins of the length difference (chosen − rejected tokens)."""
    figure = _figure()
    axis = figure.subplots()
    non_tie = ~np.asarray(tables[0]["is_tie"], dtype=bool)
    edges = length_edges(np.asarray(tables[0]["length_diff"], dtype=np.float64)[non_tie])
    centers = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    for table in tables:
        bins = M.binned_accuracy(table["margin"], table["length_diff"], edges, table["is_tie"],
                                 tolerance=M.rounding_tolerance(table["policy_chosen_logps"], table["policy_rejected_logps"],
                                                                table["reference_chosen_logps"], table["reference_rejected_logps"]))
        axis.plot(centers, [b["accuracy"] for b in bins], marker="o", label=str(table["entry"][0]))
    counts = [b["count"] for b in M.binned_accuracy(tables[0]["margin"], tables[0]["length_diff"], edges, tables[0]["is_tie"])]
    axis.set_xticks(centers)
    axis.set_xticklabels([f"[{a:g}, {b:g}]\nn={n}" for a, b, n in zip(edges, edges[1:], counts)], fontsize=7)
    axis.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel("length difference |y_w| − |y_l| (tokens), quantile bins")
    axis.set_ylabel("preference accuracy")
    axis.set_title("Accuracy by length difference (non-tie pairs)")
    axis.legend(fontsize=8)
    return _png(figure)


def plot_kl_accuracy(summary: Dict[str, Any]) -> Optional[str]:
    """Each entry at (KL_RB ± se, accuracy); ``None`` when no KL was estimated."""
    points = [(e["label"], e["kl"]["rb"], e["kl"]["rb_stderr"], e["metrics"]["rewards/accuracies"])
              for e in summary["entries"] if e["kl"]["rb"] is not None]
    if not points:
        return None
    figure = _figure()
    axis = figure.subplots()
    for label, kl, stderr, accuracy in points:
        axis.errorbar([kl], [accuracy], xerr=[stderr if stderr is not None and math.isfinite(stderr) else 0.0],
                      fmt="o", capsize=3, label=label)
        axis.annotate(label, (kl, accuracy), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axis.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    axis.margins(x=0.15, y=0.15)  # room for the labels of the outermost points
    axis.set_xlabel("KL(π ‖ π_ref), Rao–Blackwellized (nats per completion)")
    axis.set_ylabel("preference accuracy (held-out)")
    axis.set_title("Drift from the reference against accuracy")
    return _png(figure)


def plot_reliability(summary: Dict[str, Any]) -> str:
    """Reliability diagram: mean label against mean predicted P(y_w ≻ y_l) per bin."""
    figure = _figure(5.5, 5)
    axis = figure.subplots()
    axis.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
    for entry in summary["entries"]:
        bins = entry["metrics"]["calibration/bins"]
        if bins:
            axis.plot([b["confidence"] for b in bins], [b["observed"] for b in bins], marker="o",
                      label=f"{entry['label']} (ECE {fmt(entry['metrics']['calibration/ece'])})")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("predicted P(y_w ≻ y_l) (both orders)")
    axis.set_ylabel("observed (soft label, else 1)")
    axis.set_title("Calibration")
    axis.legend(fontsize=8)
    return _png(figure)


# ==================================================================== HTML


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; margin: 0.5em 0 1.5em 0; border: 1px solid #eee; }
.note { color: #555; font-size: 0.9em; max-width: 70em; }
pre { background: #f7f7f7; padding: 0.5em; white-space: pre-wrap; max-width: 70em; }
"""


def render_html(summary: Dict[str, Any], tables: Sequence[Dict[str, np.ndarray]]) -> str:
    data = summary["data"]
    plots = [("Margin distributions", plot_margins(tables)),
             ("Accuracy by length difference", plot_length_accuracy(tables))]
    kl_plot = plot_kl_accuracy(summary)
    if kl_plot is not None:
        plots.append(("KL against accuracy", kl_plot))
    plots.append(("Calibration", plot_reliability(summary)))
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>dpo-zoo compare</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>dpo-zoo compare</h1>",
        f"<p>Held-out set <code>{html.escape(data['path'])}</code>: {data['pairs']} pairs, {data['ties']} ties.</p>",
        _html_table(summary_header(summary), summary_rows(summary)),
        "<p class='note'>acc: accuracy on non-tie pairs (margin &gt; 0; a margin 0 up to float32 rounding counts ½, "
        "and &quot;(n at 0)&quot; says how many did). ECE: 10 equal-width "
        "bins, each pair in both orders, labels = soft label where present else 1. KL in nats per completion "
        "(± standard error), Monte Carlo and Rao–Blackwellized (Amini et al., arXiv:2504.10637).</p>",
        *([f"<p class='note'>{html.escape(judge_note(summary))}</p>"] if summary.get("judge") else []),
    ]
    for title, png in plots:
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{png}'>")
    parts.append("<h2>Held-out value of every registered loss (defaults)</h2>")
    parts.append(_html_table(["loss", *summary["heldout_losses"].keys()], loss_rows(summary)))
    reasons = skipped_reasons(summary)
    if reasons:
        parts.append("<p class='note'>¹ not scored:</p><ul class='note'>"
                     + "".join(f"<li>{html.escape(r)}</li>" for r in reasons) + "</ul>")
    samples = summary.get("samples") or {}
    if any(samples.values()):
        parts.append("<h2>Sampled completions (first few per policy)</h2>")
        for subject, texts in samples.items():
            parts.append(f"<h3>{html.escape(subject)}</h3>")
            parts += [f"<pre>{html.escape(text)}</pre>" for text in texts]
    if summary["notes"]:
        parts.append("<h2>Notes</h2><ul class='note'>" + "".join(f"<li>{html.escape(n)}</li>" for n in summary["notes"]) + "</ul>")
    parts.append("<h2>Settings</h2><pre>" + html.escape(json.dumps(summary["settings"], indent=1)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ==================================================================== files


def pairs_frame(tables: Sequence[Dict[str, np.ndarray]]):
    """All entries' per-pair rows as one long pandas DataFrame (one row per entry and pair)."""
    import pandas as pd

    frames = [pd.DataFrame({name: list(values) if values.dtype == object else values for name, values in t.items()})
              for t in tables]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_outputs(summary: Dict[str, Any], tables: Sequence[Dict[str, np.ndarray]], out_dir: Path) -> str:
    """Write every report file into ``out_dir``; returns the markdown summary. Each file is written whole
    or not at all (:func:`~dpo_zoo.files.atomic_write_bytes`); a full disk is a
    :class:`~dpo_zoo.errors.DiskFullError` naming the file, and the report stays "not current" (no
    ``inputs.json``), so the next compare writes it again."""
    import io

    from dpo_zoo.files import atomic_write_bytes, atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(summary)
    atomic_write_text(out_dir / "summary.md", markdown)
    atomic_write_text(out_dir / "summary.json", json.dumps(M.json_ready(summary), indent=2, default=str) + "\n")
    frame = pairs_frame(tables)
    atomic_write_text(out_dir / "pairs.csv", frame.to_csv(index=False))
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(out_dir / "pairs.parquet", buffer.getvalue())
    atomic_write_text(out_dir / "report.html", render_html(summary, tables))
    return markdown


# ==================================================================== is the report current?


# Written last, once every report file is complete: what the report was computed from.
INPUTS_FILE = "inputs.json"
REPORT_FILES = ("summary.md", "summary.json", "pairs.csv", "pairs.parquet", "report.html")
# Settings that do not change any number of the report.
REPORT_ONLY_SETTINGS = ("output_dir", "progress", "overwrite")


def _file_stats(folder: Path, skip: Sequence[str] = ()) -> List[Tuple[str, int, int]]:
    """(relative path, size, mtime in ns) of every file under ``folder``: changes when any file is rewritten."""
    out = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not (relative.parts and relative.parts[0] in skip):
            stat = path.stat()
            out.append((str(relative), stat.st_size, stat.st_mtime_ns))
    return out


def compare_inputs(cfg, subjects: Sequence[Any], heldout, loss_names: Optional[List[str]]) -> Dict[str, Any]:
    """Everything a comparison's numbers depend on: each subject's weights and record (files by size and
    modification time) and its base model, the held-out set's manifest, the loss list, the settings
    (less :data:`REPORT_ONLY_SETTINGS`) and the dpo_zoo version."""
    from dpo_zoo import __version__
    from dpo_zoo.config import as_dict

    config = json.loads(json.dumps(as_dict(cfg), default=str))
    for key in REPORT_ONLY_SETTINGS:
        config["compare"].pop(key, None)
    return {
        "version": __version__,
        "subjects": [
            {"path": str(s.path.resolve()), "weights": _file_stats(s.weights_dir),
             "run_record": s.run_record, "base_model": str(s.base_model), "base_files": _file_stats(s.base_model)}
            for s in subjects
        ],
        "heldout": {"path": str(Path(heldout.path).resolve()), "manifest": heldout.manifest},
        "losses": loss_names,
        "config": config,
    }


def report_is_current(out_dir: Path, inputs: Dict[str, Any]) -> bool:
    """Whether ``out_dir`` holds a complete report computed from exactly ``inputs``."""
    marker = out_dir / INPUTS_FILE
    if not marker.is_file() or not all((out_dir / name).is_file() for name in REPORT_FILES):
        return False
    try:
        stored = json.loads(marker.read_text(encoding="utf-8"))
    except ValueError:
        return False
    return not differences(stored, json.loads(json.dumps(inputs, default=str)), depth=0)
