"""The study's picture: the reward–KL frontier drawn as the DPO paper draws it (Rafailov et al. 2023,
§6.1, Fig. 2 left: expected reward against KL(π‖π_ref), one point per checkpoint, a curve per
algorithm), and the self-contained ``report.html`` around it.

What ``frontier.png`` shows:

* the reference model at the origin (KL 0, its own reward): a black star; every curve starts there;
* each run's trajectory (``study.eval_every``, :mod:`dpo_zoo.study.trajectory`): a thin faint line
  from the origin through its checkpoints to its final point, in its curve's colour;
* per curve (a loss and its label) its *envelope*: the best reward reached at a KL at most x, over
  every point of that curve (all strengths, seeds and checkpoints, the origin included) — the Pareto
  front of (low KL, high reward), joined by straight lines, flat after its last point up to the curve's
  largest KL — as a thick line. Without trajectories it
  is the envelope of the final points (means over seeds);
* the final points: for each strength the mean over seeds, ±1 standard error over seeds as bars (the
  95% intervals are in the tables: with 3 seeds they are 2.5 times wider and would hide the points),
  annotated with the strength value.

One colour per curve, the legend outside the axes; the KL axis is symlog (linear around 0, so the
origin stays on it) when the positive KLs span more than :data:`SYMLOG_SPAN` (a factor), else linear.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from dpo_zoo.study.results import REFERENCE_LABEL

SYMLOG_SPAN = 50.0  # max/min positive KL beyond which the KL axis is symlog
Point = Tuple[float, float]


def standard_error(stat: Dict[str, float]) -> float:
    """The standard error of a mean over seeds (0 without a spread to estimate it from)."""
    sd, n = stat.get("sd"), stat.get("n") or 0
    return 0.0 if sd is None or n < 2 or math.isnan(sd) else sd / math.sqrt(n)


def envelope(points: Sequence[Point]) -> List[Point]:
    """The Pareto front of ``points`` for low x and high y, in increasing x: each point whose y is above
    that of every point at a smaller or equal x (the best y reached at x or less). Non-finite points
    are left out. ``[(0, 0), (1, 2), (2, 1), (3, 3)]`` → ``[(0, 0), (1, 2), (3, 3)]``."""
    front: List[Point] = []
    for x, y in sorted(((x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)), key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def _finite(point: Point) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in point)


def frontier_figure(rows: Sequence[Dict[str, Any]], runs: Optional[Sequence[Dict[str, Any]]] = None,
                    x: str = "kl_rb", y: str = "reward", exact: bool = False):
    """The matplotlib figure of the module doc, from the aggregate ``rows`` (mean/sd/n per metric, the
    reference's row included) and, optionally, the run records (their final points and
    ``trajectory``). ``exact``: the values are exact sums over every completion (the exact benchmark),
    which the axis labels say instead of naming an estimator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from matplotlib import patheffects

    halo = [patheffects.withStroke(linewidth=2.5, foreground="white")]  # labels stay legible over lines
    runs = list(runs or [])
    figure, axes = plt.subplots(figsize=(10, 6), dpi=110)
    reference = [r for r in rows if r["label"] == REFERENCE_LABEL]
    origin = (0.0, float(reference[0][y]["mean"])) if reference else None
    seed_origin = {r["seed"]: (0.0, float(r[y])) for r in runs if r["label"] == REFERENCE_LABEL}
    labels = [label for label in dict.fromkeys(r["label"] for r in rows) if label != REFERENCE_LABEL]
    palette = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20").colors
    drawn_x: List[float] = [0.0] if origin else []
    handles = []
    for index, label in enumerate(labels):
        colour = palette[index % len(palette)]
        finals = [r for r in rows if r["label"] == label]
        members = [r for r in runs if r["label"] == label]
        cloud: List[Point] = [origin] if origin else []
        for run in members:
            start = seed_origin.get(run.get("seed"), origin)
            line = [start] if start else []
            line += [(p.get(x, math.nan), p.get(y, math.nan)) for p in run.get("trajectory") or []]
            line.append((run.get(x, math.nan), run.get(y, math.nan)))
            line = [p for p in line if _finite(p)]
            cloud += line
            if len(line) > 1:
                axes.plot(*zip(*line), color=colour, linewidth=0.7, alpha=0.3, zorder=1)
            if line:
                axes.plot(*line[-1], marker=".", color=colour, alpha=0.45, markersize=4, zorder=2)
        means = [(r[x]["mean"], r[y]["mean"]) for r in finals]
        if not members:
            cloud += means
        front = envelope(cloud)
        widest = max((p[0] for p in cloud if _finite(p)), default=None)
        if front and widest is not None and widest > front[-1][0]:
            front.append((widest, front[-1][1]))  # no better reward up to the curve's largest KL: flat
        if front:
            axes.plot(*zip(*front), color=colour, linewidth=2.6, alpha=0.85, solid_capstyle="round", zorder=3)
        shown = [(r, m) for r, m in zip(finals, means) if _finite(m)]
        if shown:
            axes.errorbar([m[0] for _, m in shown], [m[1] for _, m in shown],
                          xerr=[standard_error(r[x]) for r, _ in shown], yerr=[standard_error(r[y]) for r, _ in shown],
                          marker="o", markersize=6.5, markeredgecolor="white", markeredgewidth=0.8, color=colour,
                          linestyle="none", elinewidth=1.0, capsize=2.5, zorder=4)
            for r, (xi, yi) in shown:
                axes.annotate(f"{r['strength']}", (xi, yi), textcoords="offset points", xytext=(6, 5), fontsize=7.5,
                              color=colour, zorder=5, path_effects=halo)
        drawn_x += [p[0] for p in cloud] + [m[0] for _, m in shown]
        knob = finals[0].get("knob") if finals else None
        handles.append(Line2D([], [], color=colour, linewidth=2.6, marker="o", markeredgecolor="white",
                              label=f"{label} ({knob})" if knob else label))
    if origin:
        axes.plot(*origin, marker="*", markersize=17, color="black", markeredgecolor="white", zorder=6,
                  linestyle="none")
        handles.insert(0, Line2D([], [], marker="*", markersize=13, color="black", linestyle="none",
                                 label="reference (KL 0)"))
    handles += [Line2D([], [], color="grey", linewidth=2.6, label="envelope: best reward at ≤ KL (Pareto front)"),
                Line2D([], [], color="grey", marker="o", linestyle="none", label="final: mean ± 1 SE over seeds"),
                Line2D([], [], color="grey", linewidth=0.7, alpha=0.5, label="one run, through its checkpoints")]
    _kl_axis(axes, drawn_x)
    if exact:
        axes.set_xlabel("KL(π‖π_ref) per sequence (exact, nats)" if x == "kl_rb" else x)
        axes.set_ylabel("expected ground-truth reward (exact)" if y == "reward" else y)
    else:
        axes.set_xlabel("KL(π‖π_ref) per sequence (Rao–Blackwellized, nats)" if x == "kl_rb" else x)
        axes.set_ylabel("mean ground-truth reward of sampled continuations" if y == "reward" else y)
    axes.set_title("reward–KL frontier (marker labels: strength)", fontsize=11)
    axes.grid(alpha=0.3, which="both", linewidth=0.5)
    axes.legend(handles=handles, fontsize=8.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.tight_layout()
    return figure


def _kl_axis(axes, xs: Sequence[float]) -> None:
    """Symlog when the positive KLs span decades (linear below the smallest, so 0 stays), else linear;
    the left edge a little below 0 so the origin shows whole."""
    positive = sorted(v for v in xs if math.isfinite(v) and v > 0)
    right = max(positive) if positive else 1.0
    if positive and right / positive[0] > SYMLOG_SPAN:
        threshold = 10 ** math.floor(math.log10(positive[0]))
        axes.set_xscale("symlog", linthresh=threshold, linscale=0.3)
        axes.set_xlim(-0.3 * threshold, right * 1.5)
    else:
        axes.set_xlim(-0.03 * right, right * 1.06)


def plot_frontier(rows: Sequence[Dict[str, Any]], path: Path, runs: Optional[Sequence[Dict[str, Any]]] = None,
                  exact: bool = False) -> bytes:
    """Draw :func:`frontier_figure` into ``path`` (PNG); returns its bytes."""
    import matplotlib.pyplot as plt

    figure = frontier_figure(rows, runs, exact=exact)
    figure.savefig(path)
    plt.close(figure)
    return Path(path).read_bytes()


def write_html(study: Any, table: str, png: bytes, path: Path) -> None:
    """``report.html``: the picture (inline) and the table of means ± 95% CI, self-contained."""
    import base64
    import html

    def md_to_html(md: str) -> str:
        lines = [line.strip("|").split(" | ") for line in md.splitlines() if not line.startswith("|---")]
        head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in lines[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in row) + "</tr>" for row in lines[1:])
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    image = base64.b64encode(png).decode("ascii")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>dpo_zoo study</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}</style>
</head><body><h1>Reward–KL frontier</h1><p><code>{html.escape(study.command)}</code></p>
<img alt="reward-KL frontier" src='data:image/png;base64,{image}'>
<h2>Mean ± 95% CI over seeds</h2>{md_to_html(table)}
<p>Reward: {html.escape(str(study.settings['reward']))}; {study.settings['eval']['prompts']} held-out prompts ×
{study.settings['eval']['samples']} samples per run; seeds {study.settings['seeds']}.</p></body></html>
"""
    path.write_text(page, encoding="utf-8")
