"""The study's verdict rules (dpo_zoo/study/verdicts.py) on hand-made summaries whose answer is known, and
the statistics under them (dpo_zoo/study/stats.py) against values from published tables."""

import math

import pytest

from dpo_zoo.study import stats
from dpo_zoo.study.results import render_results
from dpo_zoo.study.verdicts import (EQUIVALENT, INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, evaluate_claim,
                                    evaluate_claims)

SEEDS = range(8)
# Zero-mean wiggles with a known SD, one per seed (mean 0, SD exactly 0.1: Σw² = 0.07 over 7): the "noise" of the hand-made runs.
WIGGLE = (0.1, -0.1, 0.05, -0.05, 0.15, -0.15, 0.0, 0.0)


def run(label, strength, seed, knob="beta", **metrics):
    return {"label": label, "knob": knob, "strength": strength, "seed": seed, **metrics}


def reference(seed, **metrics):
    return {"label": "reference", "knob": None, "strength": None, "seed": seed, **metrics}


def test_t_distribution_and_holm_by_table():
    # Student t quantiles t_{0.975, ν} from any table: 12.706 (1), 4.303 (2), 2.365 (7), 2.042 (30).
    for df, quantile in ((1, 12.706), (2, 4.303), (7, 2.365), (30, 2.042)):
        assert stats.t_ppf(0.975, df) == pytest.approx(quantile, abs=5e-4)
    assert stats.t_cdf(2.0, 10) == pytest.approx(0.96331, abs=1e-5)
    assert stats.t_cdf(0.0, 4) == 0.5
    # Paired t on [1, 2, 3]: t = 2/(1/√3) = 3.464, ν = 2, two-sided p = 0.0742.
    test = stats.paired([1.0, 2.0, 3.0], margin=5.0)
    assert test["p"] == pytest.approx(0.0742, abs=1e-4)
    # TOST within ±5: max(P(T > (2+5)/0.577), P(T < (2−5)/0.577)) = P(T_2 < −5.196) = 0.0175.
    assert test["p_equivalent"] == pytest.approx(0.0175, abs=1e-4)
    # Holm: sorted 0.01·4, max(0.04, 0.03·3), max(0.09, 0.04·2), 0.2·1.
    assert stats.holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    # mean 1, SD 1: t_{0.975}(5)/√6 = 1.050 ≥ 1 but t_{0.975}(6)/√7 = 0.925 < 1: 7 seeds.
    assert stats.seeds_needed(1.0, 1.0, 0.05)["difference"] == 7


def test_a_decisive_strength_is_not_hidden_by_pooling():
    """Treatment − baseline KL: +0.9 (± 0.11 over seeds) at β 0.5, noise of SD 3 at β 0.1. Pooled, the
    mean 0.45 is swamped by β 0.1's noise; the β 0.5 cell alone is a decisive "not reproduced" (the claim
    expects lower KL)."""
    noise = (3.0, -4.0, 2.5, -3.5, 4.0, -2.0, 1.0, -1.5)
    runs = []
    for seed in SEEDS:
        runs += [run("base", 0.1, seed, kl_rb=5.0), run("base", 0.5, seed, kl_rb=2.0),
                 run("tie", 0.1, seed, kl_rb=5.0 + noise[seed]), run("tie", 0.5, seed, kl_rb=2.9 + WIGGLE[seed])]
    claim = {"id": "ties", "claim": "tie-aware: lower KL", "compare": "same_strength", "treatment": "tie",
             "baseline": "base", "metrics": [{"metric": "kl_rb", "expect": "lower"}]}
    result = evaluate_claim(claim, runs)
    cells = {c.where: c for c in result["cells"]}
    assert cells["pooled"].verdict == INCONCLUSIVE and cells["beta=0.1"].verdict == INCONCLUSIVE
    assert cells["beta=0.5"].verdict == NOT_REPRODUCED and cells["beta=0.5"].stat["mean"] == pytest.approx(0.9)
    assert result["verdict"] == NOT_REPRODUCED and result["decided_by"] == {"kl_rb": "beta=0.5"}


def test_matched_kl_anchored_at_the_reference_keeps_the_seed_that_drifted_furthest():
    """Seed 2's treatment curve lies at KL 4-6, beyond the baseline's 0.5-2: without the reference point
    the ranges do not overlap and the seed would be dropped. Anchored at (0, reference reward), both
    curves start at the origin and every seed counts. Treatment reward = 0.1·KL, baseline 0.05·KL (from
    the reference's 0), so on (0, 2] the treatment is higher by 0.05·KL: mean over KL 0.4..2 = 0.06."""
    runs = []
    for seed in (0, 1, 2):
        runs.append(reference(seed, kl_rb=0.0, reward=0.0))
        runs += [run("base", b, seed, kl_rb=kl, reward=0.05 * kl) for b, kl in ((0.5, 0.5), (0.1, 2.0))]
        tkl = (4.0, 6.0) if seed == 2 else (1.0, 3.0)
        runs += [run("treat", b, seed, kl_rb=kl, reward=0.1 * kl) for b, kl in zip((0.5, 0.1), tkl)]
    claim = {"id": "m", "claim": "treat: higher reward at matched KL", "compare": "matched_kl", "treatment": "treat",
             "baseline": "base", "metrics": [{"metric": "reward", "expect": "higher"}]}
    result = evaluate_claim(claim, runs)
    (cell,) = result["cells"]
    assert sorted(cell.values) == [0, 1, 2]
    # The seed that drifted: matched KL in (0, 2], treatment 0.1·x vs baseline 0.05·x → mean 0.05·mean(x) = 0.06.
    assert cell.values[2] == pytest.approx(0.06)
    # Without the reference's records the non-overlapping seed has no value: fewer than 3 → inconclusive.
    unanchored = evaluate_claim(claim, [r for r in runs if r["label"] != "reference"])
    assert sorted(unanchored["cells"][0].values) == [0, 1] and unanchored["verdict"] == INCONCLUSIVE


def test_an_equivalent_pair_is_told_from_a_noisy_one():
    """Differences of ±0.001 around 0 with the default reward margin ±0.02: equivalent. The same mean with
    SD 0.3: inconclusive, and the seeds that would decide it are stated."""
    quiet, noisy = [], []
    for seed in SEEDS:
        quiet += [run("a", 0.1, seed, reward=0.5), run("b", 0.1, seed, reward=0.5 + WIGGLE[seed] / 100)]
        noisy += [run("a", 0.1, seed, reward=0.5), run("b", 0.1, seed, reward=0.5 + 3 * WIGGLE[seed] + 0.01)]
    claim = {"id": "e", "claim": "b: higher reward", "compare": "same_strength", "treatment": "b", "baseline": "a",
             "metrics": [{"metric": "reward", "expect": "higher"}]}
    assert evaluate_claim(claim, quiet)["verdict"] == EQUIVALENT
    result = evaluate_claim(claim, noisy)
    assert result["verdict"] == INCONCLUSIVE and result["seeds_needed"] is not None and result["seeds_needed"] > 8
    text = render_results({"settings": {"claims": [claim], "eval": {"prompts": 1, "samples": 1, "max_new_tokens": 1},
                                        "reward": "r", "seeds": list(SEEDS)},
                           "study_file": "s.yaml", "command": "dpo-zoo study s.yaml", "runs": noisy, "aggregates": []},
                          "summary.json")
    assert f"would need about {result['seeds_needed']} paired seeds" in text


def test_a_claim_only_holm_turns_inconclusive():
    """One cell with p = 0.0255 is reproduced alone; in a family with five null claims (p ≈ 1), Holm multiplies
    its p by 6 and it is no longer significant."""
    def claim(label):
        return {"id": label, "claim": f"{label}: lower KL", "compare": "same_strength", "treatment": label,
                "baseline": "a", "metrics": [{"metric": "kl_rb", "expect": "lower", "margin": 0.01}]}

    runs = []
    for seed in SEEDS:
        runs.append(run("a", 0.1, seed, kl_rb=3.0))
        runs.append(run("b", 0.1, seed, kl_rb=3.0 - 0.1 + WIGGLE[seed]))  # mean −0.1, SD 0.1: t = 0.1/(0.1/√8) = 2.83, ν = 7, p = 0.0255
        runs += [run(f"n{k}", 0.1, seed, kl_rb=3.0 + WIGGLE[(seed + k) % 8]) for k in range(5)]  # mean 0
    alone = evaluate_claim(claim("b"), runs)
    assert alone["verdict"] == REPRODUCED and alone["cells"][0].stat["p"] == pytest.approx(0.0255, abs=5e-4)
    family = evaluate_claims([claim("b")] + [claim(f"n{k}") for k in range(5)], runs)
    assert family[0]["verdict"] == INCONCLUSIVE
    assert family[0]["cells"][0].p_holm == pytest.approx(6 * alone["cells"][0].stat["p"])


def test_fewer_than_three_paired_seeds_never_decide():
    runs = []
    for seed in (0, 1):
        runs += [run("a", 0.1, seed, kl_rb=3.0), run("b", 0.1, seed, kl_rb=1.0 + 0.01 * seed)]
    claim = {"id": "few", "claim": "b: lower KL", "compare": "same_strength", "treatment": "b", "baseline": "a",
             "metrics": [{"metric": "kl_rb", "expect": "lower"}]}
    assert evaluate_claim(claim, runs)["verdict"] == INCONCLUSIVE


def test_a_monotone_claim_is_judged_by_the_whole_grid():
    """KL falls 0.3 from β 0.05 to 0.1 (not significant alone: SD 0.5) and 3 from 0.1 to 0.5: the whole-grid
    change decides, the steps are shown."""
    runs = []
    for seed in SEEDS:
        first = 6.0 + 5 * WIGGLE[seed]
        runs += [run("dpo", 0.05, seed, kl_rb=first), run("dpo", 0.1, seed, kl_rb=5.7),
                 run("dpo", 0.5, seed, kl_rb=2.7 + WIGGLE[seed])]
    claim = {"id": "mono", "claim": "higher β: lower KL", "compare": "monotone", "treatment": "dpo",
             "metrics": [{"metric": "kl_rb", "expect": "lower"}]}
    result = evaluate_claim(claim, runs)
    whole, *steps = result["cells"]
    assert whole.where == "0.05→0.5 (whole grid)" and whole.stat["mean"] == pytest.approx(-3.3)
    assert [s.decides for s in steps] == [False, False] and result["verdict"] == REPRODUCED
    assert not math.isnan(steps[0].stat["ci95"])
