"""Pairwise win rates from a judge's verdicts: position-swap debiasing and a length-controlled rate.

**Position-swap debiasing.** Every (prompt, candidate, baseline) item is judged twice, the candidate
shown first (as "A") and then second (as "B"). With ``a_i`` the judge's probability that the first
response is better when the candidate is first, and ``b_i`` the same probability when the baseline is
first, the debiased preference for the candidate is

    q_i = ½ · (a_i + (1 − b_i)),

so a judge that always answers "A" (pure position bias: a_i = b_i = 1) gives q_i = ½ on every item,
and two identical responses give q_i = ½ whatever the judge's bias. A judge of hard verdicts (0 or 1)
gives q_i ∈ {0, ½, 1}: an item whose two verdicts disagree counts as a tie. (Zheng et al. 2023,
*Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena*, arXiv:2306.05685, §3.3–3.4, call an item
whose verdict flips with the order inconsistent and score it a tie.)

**Win rate** = mean_i q_i, with standard error ``sd(q) / √n`` (``sd`` with n − 1): the items are
independent when each prompt contributes one candidate and one baseline response.

**Length-controlled win rate** (Dubois, Galambosi, Liang & Hashimoto 2024, *Length-Controlled
AlpacaEval: A Simple Way to Debias Automatic Evaluators*, arXiv:2404.04475, §3). AlpacaEval 2 fits,
over all models m against the baseline b and all instructions x, the GLM

    P(m ≻ b | x) = σ( (θ_m − θ_b) + φ_{m,b} · tanh((len_m − len_b) / sd(len_m − len_b)) + (ψ_m − ψ_b) · γ_x )

and reports the win rate it predicts with the length term set to 0 (same-length responses),
``100 · E_x σ(θ_m − θ_b + (ψ_m − ψ_b) γ_x)``. dpo_zoo compares one candidate with one baseline at a
time, so it fits the simplified model without the instruction-difficulty term (γ_x is estimated across
many models' judgements of the same instruction, which a single comparison does not have):

    logit P(candidate ≻ baseline | item i) = θ + φ · tanh(Δ_i / sd(Δ)),   Δ_i = len(candidate_i) − len(baseline_i)

fitted to the soft preferences q_i by maximum likelihood (Bernoulli log-likelihood with soft labels,
Newton's method), and reports ``LC = σ(θ)``: the predicted preference when both responses have the
same length. Lengths are in tokens of the candidate's tokenizer. A small ridge penalty on φ alone
(:data:`LENGTH_RIDGE`; AlpacaEval also regularises the length coefficient) keeps the fit finite when
the length difference separates wins from losses perfectly. The standard error of θ is the sandwich
(robust) one, ``H⁻¹ (Σ_i s_i s_iᵀ) H⁻¹`` with the per-item scores s_i (the soft labels are not Bernoulli
draws, so the model-based variance would be wrong), and ``se(LC) = LC (1 − LC) se(θ)`` (delta method).
When every q_i is 1 (or every one 0) θ has no finite estimate; LC is then reported equal to the raw
rate, with no standard error. When all the length differences are equal, the length term cannot be
told from θ: LC is then the raw rate as well.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Sequence

import numpy as np

# Ridge penalty on the length coefficient φ (per item's log-likelihood scale: the penalty is ½·λ·φ²
# on the summed log-likelihood). Small enough to leave a non-separated fit unchanged to ~1e-3.
LENGTH_RIDGE = 1e-3


def _probabilities(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(array) | (array < 0) | (array > 1))
    if bad.size:
        raise ValueError(f"{name}: value {array[int(bad[0])]!r} at item {int(bad[0])} is not a probability in [0, 1]")
    return array


def debiased_preferences(candidate_first: Any, baseline_first: Any) -> np.ndarray:
    """``q_i = ½ (a_i + 1 − b_i)`` (module doc): ``candidate_first[i]`` is the judge's P(first better)
    with the candidate shown first, ``baseline_first[i]`` the same with the baseline shown first."""
    a = _probabilities(candidate_first, "candidate shown first")
    b = _probabilities(baseline_first, "baseline shown first")
    if a.shape != b.shape:
        raise ValueError(f"{a.size} verdicts with the candidate first but {b.size} with the baseline first")
    return 0.5 * (a + (1.0 - b))


def win_rate(preferences: Any) -> Dict[str, float]:
    """Mean preference with its standard error, and the counts of wins (q > ½), ties (q = ½), losses."""
    q = _probabilities(preferences, "preferences")
    n = int(q.size)
    if n == 0:
        return {"win_rate": math.nan, "stderr": math.nan, "n": 0, "wins": 0, "ties": 0, "losses": 0}
    stderr = float(np.std(q, ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {"win_rate": float(np.mean(q)), "stderr": stderr, "n": n, "wins": int(np.sum(q > 0.5)),
            "ties": int(np.sum(q == 0.5)), "losses": int(np.sum(q < 0.5))}


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic function, without overflow


def length_controlled_win_rate(preferences: Any, candidate_lengths: Any, baseline_lengths: Any,
                               ridge: float = LENGTH_RIDGE, max_iterations: int = 100) -> Dict[str, Any]:
    """The length-controlled win rate ``σ(θ)`` of the model in the module doc, with its standard error
    and the fitted coefficients ``theta`` and ``length_coef`` (φ)."""
    q = _probabilities(preferences, "preferences")
    delta = np.asarray(candidate_lengths, dtype=np.float64).reshape(-1) - np.asarray(baseline_lengths, dtype=np.float64).reshape(-1)
    if delta.shape != q.shape:
        raise ValueError(f"{q.size} preferences but {delta.size} length differences")
    raw = float(np.mean(q)) if q.size else math.nan
    out: Dict[str, Any] = {"lc_win_rate": raw, "stderr": math.nan, "theta": math.nan, "length_coef": math.nan,
                           "note": None}
    if q.size < 2:
        out["note"] = "fewer than 2 items: no fit"
        return out
    if np.all(q == 1.0) or np.all(q == 0.0):
        out["note"] = "every item won (or every item lost): no finite fit; the raw rate is reported"
        return out
    spread = float(np.std(delta, ddof=1))
    if not spread > 0:
        out["note"] = "every length difference is the same: the length term is not identifiable; the raw rate is reported"
        return out
    x = np.stack([np.ones_like(delta), np.tanh(delta / spread)], axis=1)
    penalty = np.diag([0.0, ridge])
    beta = np.zeros(2)
    for _ in range(max_iterations):
        p = _sigmoid(x @ beta)
        gradient = x.T @ (q - p) - penalty @ beta
        hessian = x.T @ (x * (p * (1 - p))[:, None]) + penalty
        step = np.linalg.solve(hessian, gradient)
        beta = beta + step
        if float(np.max(np.abs(step))) < 1e-12:
            break
    p = _sigmoid(x @ beta)
    hessian = x.T @ (x * (p * (1 - p))[:, None]) + penalty
    scores = x * (q - p)[:, None] - (penalty @ beta)[None, :] / len(q)
    bread = np.linalg.inv(hessian)
    covariance = bread @ (scores.T @ scores) @ bread
    theta, phi = float(beta[0]), float(beta[1])
    lc = float(_sigmoid(np.array(theta)))
    out.update({"lc_win_rate": lc, "stderr": float(lc * (1 - lc) * math.sqrt(max(covariance[0, 0], 0.0))),
                "theta": theta, "length_coef": phi})
    return out


def summarize_judgements(candidate_first: Sequence[float], baseline_first: Sequence[float],
                         candidate_lengths: Sequence[float], baseline_lengths: Sequence[float]) -> Dict[str, Any]:
    """Everything a report shows of one candidate against its baseline: the win rate ± SE (and counts),
    the length-controlled rate ± SE, the judge's position bias (how often it preferred the response
    shown first, over all 2n verdicts) and how often its two verdicts on an item agreed (the same response
    preferred in both orders, or neither in both)."""
    a = _probabilities(candidate_first, "candidate shown first")
    b = _probabilities(baseline_first, "baseline shown first")
    q = debiased_preferences(a, b)
    rate = win_rate(q)
    lc = length_controlled_win_rate(q, candidate_lengths, baseline_lengths)
    # The same response preferred in both orders (or no preference in both): sign(a − ½) = −sign(b − ½).
    consistent = np.sign(a - 0.5) == -np.sign(b - 0.5)
    return {
        **rate,
        "lc_win_rate": lc["lc_win_rate"], "lc_stderr": lc["stderr"], "lc_length_coef": lc["length_coef"],
        "lc_note": lc["note"],
        "first_position_rate": float(np.mean(np.concatenate([a, b]))) if a.size else math.nan,
        "consistency": float(np.mean(consistent)) if a.size else math.nan,
        "mean_length": float(np.mean(candidate_lengths)) if len(candidate_lengths) else math.nan,
        "baseline_mean_length": float(np.mean(baseline_lengths)) if len(baseline_lengths) else math.nan,
    }
