"""The metrics of ``dpo-zoo compare``, as plain functions of per-pair arrays (one implementation).

``dpo_zoo.compare.runner`` calls these on its per-pair table, and the ``evaluate`` modules beside this file
(``dpo_zoo/metrics/<name>/<name>.py``, loadable offline with ``evaluate.load(path)``) wrap the same
functions, so a number in a compare report and the number ``evaluate`` gives are computed by the same
code.

Conventions (every function):

* Inputs are 1-D sequences of equal length (lists, numpy arrays or tensors); they are read as float64.
  A mismatch in length is a :class:`MetricInputError` naming the argument.
* A metric over an empty set of pairs (e.g. accuracy when every pair is a tie) is ``nan``, never a
  made-up 0; :func:`json_ready` turns ``nan`` into ``None`` for JSON.
* ``margin`` is a loss's implicit reward difference ``r(y_w) − r(y_l)`` (for DPO ``β h``; docs/loss_maths.md, conventions);
  ``win_prob`` is the loss's predicted ``P(y_w ≻ y_l)``; ``is_tie`` marks pairs the annotators could not
  separate, whose chosen/rejected order is arbitrary, so ordinary accuracy is not defined on them.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np


class MetricInputError(ValueError):
    """An input array is malformed (wrong length, not 1-D, out of range); the message names it."""


def as_array(values: Any, name: str, length: Optional[int] = None) -> np.ndarray:
    """``values`` as a 1-D float64 array (tensors are detached and moved to the CPU first)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise MetricInputError(f"`{name}` must be 1-D (one value per pair), got shape {array.shape}")
    if length is not None and array.shape[0] != length:
        raise MetricInputError(f"`{name}` has {array.shape[0]} values, expected {length} (one per pair)")
    return array


def _tie_mask(is_tie: Any, n: int) -> np.ndarray:
    if is_tie is None:
        return np.zeros(n, dtype=bool)
    return as_array(is_tie, "is_tie", n) != 0


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


# ==================================================================== preference accuracy


ROUNDING_ULPS = 16
"""How many float32 epsilons of a pair's log-prob scale its margin may be from 0 and still count as 0.

Summed log-probs are float32 sums of float32 token log-probs, and the reference pass (prep's cache)
and compare's policy pass batch and pad the pairs differently, so the same model gives the same sum
only up to rounding: on the tests' tiny Llama, within 0.8 ε·|sum| for batch sizes 1 to 8 and 1 or 2
threads (ε = 2⁻²³ ≈ 1.19e-7). A DPO-family margin is β times a signed sum of the pair's four summed
log-probs, so its rounding is below 4β·0.8 ε·max|log-prob|; 16 ε leaves a wide margin for deeper
models and other kernels, and stays far below what a trained policy shows (16 ε × 300 nats ≈ 6e-4)."""


def rounding_tolerance(*logps: Any) -> np.ndarray:
    """Per pair, ``ROUNDING_ULPS · ε₃₂ · max_k |logps_k[i]|``: the largest |margin| that is 0 up to
    float32 rounding, given the pair's summed log-probs (policy and reference, chosen and rejected).
    ``nan`` entries (e.g. no reference) are ignored; with no array given the result is empty."""
    if not logps:
        return np.zeros(0)
    first = as_array(logps[0], "logps[0]")
    magnitudes = np.stack([np.abs(first)] + [np.abs(as_array(v, f"logps[{k}]", first.size))
                                             for k, v in enumerate(logps[1:], start=1)])
    scale = np.where(np.isnan(magnitudes), 0.0, magnitudes).max(axis=0)
    return ROUNDING_ULPS * float(np.finfo(np.float32).eps) * scale


def _tolerances(tolerance: Any, n: int) -> np.ndarray:
    """``tolerance`` (a scalar or one value per pair) as ``n`` non-negative values."""
    if np.ndim(tolerance) == 0:
        tol = np.full(n, float(tolerance))
    else:
        tol = as_array(tolerance, "tolerance", n)
    if np.any(np.isnan(tol)) or np.any(tol < 0):
        raise MetricInputError("`tolerance` must be >= 0 (the largest |margin| that counts as 0)")
    return tol


def _zero_mask(m: np.ndarray, tolerance: Any) -> np.ndarray:
    """``|m_i| ≤ tolerance_i``: the margins that are 0 up to rounding (exact zeros for tolerance 0)."""
    return np.abs(m) <= _tolerances(tolerance, m.size)


def preference_accuracy(margins: Any, is_tie: Any = None, tolerance: Any = 0.0) -> float:
    """Accuracy on the non-tie pairs: ``mean_i( 1[m_i > t_i] + ½·1[|m_i| ≤ t_i] )``.

    A margin that is 0 (e.g. the policy equals the reference, so every DPO margin is 0) expresses no
    preference, so it earns half a point, as a coin flip would on average, rather than 0 as a strict
    ``>`` gives (TRL's ``rewards/accuracies``) or 1 as ``≥`` would. "0" means 0 up to rounding:
    ``|m_i| ≤ t_i``, with ``tolerance`` ``t`` a scalar or one value per pair (compare passes
    :func:`rounding_tolerance` of the pair's log-probs; the default 0 counts only exact zeros), so a
    policy equal to its reference scores exactly ½ however the rounding falls. Tie pairs are left out:
    their order is arbitrary (see :func:`tie_summary` for them). ``nan`` when there is no non-tie pair.
    """
    m = as_array(margins, "margins")
    keep = ~_tie_mask(is_tie, m.size)
    zero = _zero_mask(m, tolerance)
    scores = ((m > 0) & ~zero).astype(np.float64) + 0.5 * zero
    return _mean(scores[keep])


def zero_margin_count(margins: Any, is_tie: Any = None, tolerance: Any = 0.0) -> int:
    """How many non-tie pairs have a margin that is 0 up to ``tolerance`` (each scored ½ by
    :func:`preference_accuracy`)."""
    m = as_array(margins, "margins")
    return int((_zero_mask(m, tolerance) & ~_tie_mask(is_tie, m.size)).sum())


def tie_summary(margins: Any, is_tie: Any, tie_prob: Any = None) -> Dict[str, float]:
    """On the tie pairs: ``count``, ``abs_margin`` = mean ``|m_i|`` (0 is the ideal: the model should not
    separate what the annotators could not) and, for tie-aware losses, ``tie_prob`` = mean predicted
    ``P(y_w ∼ y_l)``. ``nan`` entries when there is no tie pair (or no ``tie_prob``)."""
    m = as_array(margins, "margins")
    ties = _tie_mask(is_tie, m.size)
    out = {"count": int(ties.sum()), "abs_margin": _mean(np.abs(m[ties])), "tie_prob": math.nan}
    if tie_prob is not None:
        out["tie_prob"] = _mean(as_array(tie_prob, "tie_prob", m.size)[ties])
    return out


def margin_summary(margins: Any, is_tie: Any = None) -> Dict[str, float]:
    """``mean`` and ``std`` (population, ``ddof = 0``) of the margins of the non-tie pairs."""
    m = as_array(margins, "margins")
    kept = m[~_tie_mask(is_tie, m.size)]
    return {"mean": _mean(kept), "std": float(kept.std()) if kept.size else math.nan}


# ==================================================================== calibration


def pair_labels(soft_label: Any, n: int) -> np.ndarray:
    """The target of ``P(y_w ≻ y_l)`` per pair: the soft label where the pair has one (not ``nan``),
    else 1 (the annotators chose ``y_w``)."""
    if soft_label is None:
        return np.ones(n)
    soft = as_array(soft_label, "soft_label", n)
    return np.where(np.isnan(soft), 1.0, soft)


def decided_win_prob(win_prob: Any, tie_prob: Any = None) -> np.ndarray:
    """``P(y_w ≻ y_l | the pair is not a tie)`` = ``p_win / (1 − p_tie)``: what a non-tie label measures.

    A tie-aware model (Rao–Kupper, Davidson; arXiv:2409.17431) splits its mass over three outcomes, so
    ``p_win`` alone understates how sure it is of the order of a decided pair, and ``1 − p_win`` is not
    ``p_lose``. Conditioning on "not a tie" restores a two-outcome probability, whose swap is
    ``1 − p``; without ``tie_prob`` (Bradley–Terry losses) ``p_win`` is returned unchanged.
    """
    p = as_array(win_prob, "win_prob")
    if tie_prob is None:
        return p
    tie = as_array(tie_prob, "tie_prob", p.size)
    decided = 1.0 - tie
    return np.divide(p, decided, out=np.full_like(p, 0.5), where=decided > 0)


def _symmetrized(win_prob: Any, labels: Any):
    p = as_array(win_prob, "win_prob")
    y = as_array(labels, "labels", p.size)
    if np.any((p < 0) | (p > 1) | np.isnan(p)):
        raise MetricInputError("`win_prob` must hold probabilities in [0, 1]")
    if np.any((y < 0) | (y > 1) | np.isnan(y)):
        raise MetricInputError("`labels` must hold probabilities in [0, 1] (1 = chosen preferred)")
    return np.concatenate([p, 1.0 - p]), np.concatenate([y, 1.0 - y])


def calibration_bins(win_prob: Any, labels: Any, n_bins: int = 10) -> List[Dict[str, float]]:
    """The reliability table behind :func:`expected_calibration_error`, one dict per non-empty bin:
    ``lower``, ``upper``, ``count``, ``confidence`` (mean prediction), ``observed`` (mean label).

    **Convention.** A pair is an unordered comparison that happens to be stored chosen-first, so with
    hard labels every label would be 1 and a reliability diagram would be degenerate. Each pair
    therefore counts twice, once as stored, ``(p, y)``, and once swapped, ``(1 − p, 1 − y)``; the
    result does not depend on the stored order. Bins are ``n_bins`` equal-width intervals
    ``[b/n, (b+1)/n)`` of the prediction, the last one closed at 1.
    """
    if n_bins < 1:
        raise MetricInputError(f"`n_bins` must be >= 1, got {n_bins}")
    p, y = _symmetrized(win_prob, labels)
    index = np.minimum(np.floor(p * n_bins).astype(np.int64), n_bins - 1)
    bins = []
    for b in range(n_bins):
        inside = index == b
        if inside.any():
            bins.append({
                "lower": b / n_bins,
                "upper": (b + 1) / n_bins,
                "count": int(inside.sum()),
                "confidence": float(p[inside].mean()),
                "observed": float(y[inside].mean()),
            })
    return bins


def expected_calibration_error(win_prob: Any, labels: Any, n_bins: int = 10) -> float:
    """ECE = ``Σ_b (n_b / n) · |mean label_b − mean prediction_b|`` over equal-width bins.

    Naeini, Cooper & Hauskrecht, *Obtaining Well Calibrated Probabilities Using Bayesian Binning*, AAAI
    2015; Guo et al., *On Calibration of Modern Neural Networks*, ICML 2017 (arXiv:1706.04599). Labels
    may be soft (a probability that ``y_w`` is preferred). Each pair counts in both orders (see
    :func:`calibration_bins`), so ``n`` is twice the number of pairs. ``nan`` for no pairs.
    """
    bins = calibration_bins(win_prob, labels, n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        return math.nan
    return float(sum(b["count"] * abs(b["observed"] - b["confidence"]) for b in bins) / total)


def brier_score(win_prob: Any, labels: Any) -> float:
    """Brier score ``mean_i (p_i − y_i)²`` (Brier, Monthly Weather Review 1950); soft labels allowed.

    Swapping a pair's order maps ``(p, y)`` to ``(1 − p, 1 − y)`` and leaves ``(p − y)²`` unchanged,
    so no symmetrization is needed. 0 is perfect; always predicting ½ scores 0.25 against hard labels.
    """
    p, y = _symmetrized(win_prob, labels)
    return _mean((p - y) ** 2)


# ==================================================================== length


def pearson(x: Any, y: Any) -> float:
    """Pearson correlation; ``nan`` when either side is constant or there are fewer than 2 values."""
    a = as_array(x, "x")
    b = as_array(y, "y", a.size)
    if a.size < 2:
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else math.nan


def length_bias(margins: Any, length_diff: Any, is_tie: Any = None, tolerance: Any = 0.0) -> Dict[str, float]:
    """How rewards follow length (Singhal et al., *A Long Way to Go: Investigating Length Correlations in
    RLHF*, arXiv:2310.03716; Park et al., *Disentangling Length from Quality in Direct Preference
    Optimization*, arXiv:2403.19159).

    ``length_diff`` = completion tokens of ``y_w`` minus those of ``y_l``. Returns ``correlation`` =
    Pearson(margin, length_diff) over **all** pairs (swapping a tie pair flips both signs, so its
    order does not matter), and accuracy (:func:`preference_accuracy`) on the non-tie pairs split by
    which side is longer: ``acc_chosen_longer``, ``acc_rejected_longer``, ``acc_same_length``, with
    their counts ``n_*`` (``tolerance`` as in :func:`preference_accuracy`). A length-exploiting model
    scores high when the chosen side is longer and low when it is shorter.
    """
    m = as_array(margins, "margins")
    d = as_array(length_diff, "length_diff", m.size)
    ties = _tie_mask(is_tie, m.size)
    tol = _tolerances(tolerance, m.size)
    out: Dict[str, float] = {"correlation": pearson(m, d)}
    for name, part in (("chosen_longer", d > 0), ("rejected_longer", d < 0), ("same_length", d == 0)):
        keep = part & ~ties
        out[f"acc_{name}"] = preference_accuracy(m[keep], tolerance=tol[keep])
        out[f"n_{name}"] = int(keep.sum())
    return out


def binned_accuracy(margins: Any, values: Any, edges: Sequence[float], is_tie: Any = None,
                    tolerance: Any = 0.0) -> List[Dict[str, float]]:
    """:func:`preference_accuracy` of the non-tie pairs whose ``values`` fall in ``[edges[k], edges[k+1])``
    (the last bin closed), one dict per bin: ``lower``, ``upper``, ``count``, ``accuracy`` (``tolerance``
    as in :func:`preference_accuracy`)."""
    m = as_array(margins, "margins")
    v = as_array(values, "values", m.size)
    keep = ~_tie_mask(is_tie, m.size)
    tol = _tolerances(tolerance, m.size)
    edges = [float(e) for e in edges]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise MetricInputError(f"`edges` must be at least two increasing values, got {edges}")
    out = []
    for k, (lower, upper) in enumerate(zip(edges, edges[1:])):
        last = k == len(edges) - 2
        inside = keep & (v >= lower) & ((v <= upper) if last else (v < upper))
        out.append({"lower": lower, "upper": upper, "count": int(inside.sum()),
                    "accuracy": preference_accuracy(m[inside], tolerance=tol[inside])})
    return out


# ==================================================================== drift


def logp_shift(policy_logps: Any, reference_logps: Any) -> float:
    """Mean change of summed log-probs against the reference, ``mean_i(log π_θ(y_i) − log π_ref(y_i))``:
    DPO can lower the likelihood of the chosen responses too, as long as the rejected ones fall further
    (Pal et al., *Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive*,
    arXiv:2402.13228), so the two shifts are reported apart."""
    policy = as_array(policy_logps, "policy_logps")
    reference = as_array(reference_logps, "reference_logps", policy.size)
    return _mean(policy - reference)


def mean_and_stderr(values: Any) -> Dict[str, float]:
    """``mean`` and its standard error ``std / √n`` (``std`` with ``ddof = 1``; ``nan`` for n < 2)."""
    v = as_array(values, "values")
    if v.size == 0:
        return {"mean": math.nan, "stderr": math.nan, "n": 0}
    stderr = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
    return {"mean": float(v.mean()), "stderr": stderr, "n": int(v.size)}


def clustered_mean_and_stderr(values: Any, cluster_size: int) -> Dict[str, float]:
    """Mean of ``values`` laid out cluster-major (``cluster_size`` consecutive values per cluster, e.g.
    the samples of one prompt) and its standard error clustered by cluster: with ``G`` clusters of equal
    size and cluster means ``m_g``, ``SE = sd(m_g) / √G`` (``ddof = 1``). Samples of one prompt share the
    prompt, so they are not independent draws; treating them as such understates the SE when prompts
    differ (the design effect ``1 + (k − 1)ρ``). ``n`` counts the clusters; ``nan`` SE for G < 2."""
    v = as_array(values, "values")
    if cluster_size < 1 or v.size % cluster_size:
        raise ValueError(f"{v.size} values do not split into clusters of {cluster_size}")
    if v.size == 0:
        return {"mean": math.nan, "stderr": math.nan, "n": 0, "cluster_means": []}
    means = v.reshape(-1, cluster_size).mean(axis=1)
    stderr = float(means.std(ddof=1) / math.sqrt(means.size)) if means.size > 1 else math.nan
    return {"mean": float(v.mean()), "stderr": stderr, "n": int(means.size), "cluster_means": means.tolist()}


def weighted_mean(values: Any, weights: Any = None) -> float:
    """``mean_i(w_i · v_i)``: the trainer's reduction of per-pair losses (w = 1 without weights)."""
    v = as_array(values, "values")
    if weights is None:
        return _mean(v)
    return _mean(v * as_array(weights, "weights", v.size))


# ==================================================================== output


def json_ready(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` and numpy scalars made plain, so
    ``json.dumps`` writes valid JSON."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value
