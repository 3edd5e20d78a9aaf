"""Every compare metric on a small table worked out by hand, and the `evaluate` modules agree with it.

The arithmetic is written in each test's docstring; the functions under test are the ones
`dpo-zoo compare` computes through (dpo_zoo/metrics/functions.py).
"""

import math

import numpy as np
import pytest

from dpo_zoo.metrics import EVALUATE_MODULES, metric_path
from dpo_zoo.metrics import functions as M


def test_preference_accuracy_scores_ties_apart_and_zero_margin_half():
    """margins [2, −1, 0, 0.5, −3], ties [F, F, F, T, T].
    Non-tie pairs: 2 > 0 → 1, −1 → 0, 0 → ½; accuracy = 1.5 / 3 = 0.5 (the ties 0.5 and −3 are left out).
    """
    margins, ties = [2.0, -1.0, 0.0, 0.5, -3.0], [False, False, False, True, True]
    assert M.preference_accuracy(margins, ties) == 0.5
    # Without tie flags every pair counts: (1 + 0 + ½ + 1 + 0) / 5 = 0.5 as well; change one to see it.
    assert M.preference_accuracy([2.0, -1.0, 0.0, 0.5, 3.0]) == pytest.approx(3.5 / 5)
    assert math.isnan(M.preference_accuracy([1.0, -1.0], [True, True]))  # no decided pair: undefined


def test_margins_zero_up_to_rounding_score_half():
    """Log-probs of magnitude 100 per pair: tolerance = 16 · 2⁻²³ · 100 = 1.9073e-4 (ROUNDING_ULPS = 16).
    Margins [1e-6, 2e-6, 2e-3, −3e-3]: the first two are 0 up to rounding → ½ each, 2e-3 → 1, −3e-3 → 0;
    accuracy = 2 / 4 = 0.5 with 2 zero margins, where their signs alone give 3 / 4.
    """
    tolerance = M.rounding_tolerance([-100.0] * 4, [-40.0, -100.0, -3.0, -7.0], [100.0] * 4, [float("nan")] * 4)
    assert tolerance.tolist() == pytest.approx([16 * 2.0 ** -23 * 100] * 4, rel=1e-12)
    assert tolerance[0] == pytest.approx(1.9073e-4, rel=1e-4)
    margins = [1e-6, 2e-6, 2e-3, -3e-3]
    assert M.preference_accuracy(margins, tolerance=tolerance) == 0.5
    assert M.zero_margin_count(margins, tolerance=tolerance) == 2
    assert M.preference_accuracy(margins) == 0.75 and M.zero_margin_count(margins) == 0  # tolerance 0: signs
    # A tie pair is left out of both; a scalar tolerance works too.
    assert M.preference_accuracy(margins, [True, False, False, False], 1e-4) == pytest.approx(1.5 / 3)
    assert M.zero_margin_count(margins, [True, False, False, False], 1e-4) == 1
    # The same rule in the length split: chosen longer [1e-6 → ½, 2e-3 → 1], rejected longer [2e-6 → ½, −3e-3 → 0].
    split = M.length_bias(margins, [1, -1, 1, -1], tolerance=tolerance)
    assert (split["acc_chosen_longer"], split["acc_rejected_longer"]) == (0.75, 0.25)
    with pytest.raises(M.MetricInputError, match="tolerance"):
        M.preference_accuracy(margins, tolerance=-1.0)
    with pytest.raises(M.MetricInputError, match="`tolerance` has 2 values"):
        M.preference_accuracy(margins, tolerance=[0.1, 0.1])


def test_tie_summary_and_margin_summary_by_hand():
    """Same table. Ties: |0.5|, |−3| → mean |m| = 1.75; tie_prob [.1, .2, .3, .4, .6] → on ties (0.4 + 0.6)/2 = 0.5.
    Non-tie margins [2, −1, 0]: mean 1/3; population std = √(((5/3)² + (4/3)² + (1/3)²)/3) = √(42/27) = √14/3.
    """
    margins, ties = [2.0, -1.0, 0.0, 0.5, -3.0], [False, False, False, True, True]
    summary = M.tie_summary(margins, ties, [0.1, 0.2, 0.3, 0.4, 0.6])
    assert summary == {"count": 2, "abs_margin": 1.75, "tie_prob": pytest.approx(0.5)}
    assert math.isnan(M.tie_summary(margins, ties)["tie_prob"])  # a loss without tie probabilities
    spread = M.margin_summary(margins, ties)
    assert spread["mean"] == pytest.approx(1 / 3)
    assert spread["std"] == pytest.approx(math.sqrt(14) / 3)


def test_expected_calibration_error_symmetrized_hard_labels():
    """p = [0.85, 0.65, 0.35, 0.95], hard labels (1). Both orders give 8 predictions:
    (.85,1) (.15,0) (.65,1) (.35,0) (.35,1) (.65,0) (.95,1) (.05,0). Bins of width 0.1:
      [0,.1): .05 vs 0 → gap .05 (n1);  [.1,.2): .15 vs 0 → .15 (n1);  [.3,.4): .35 vs ½ → .15 (n2);
      [.6,.7): .65 vs ½ → .15 (n2);     [.8,.9): .85 vs 1 → .15 (n1);  [.9,1]: .95 vs 1 → .05 (n1).
    ECE = (.05 + .15 + 2·.15 + 2·.15 + .15 + .05) / 8 = 1.0 / 8 = 0.125.
    Brier = ((.15)² + (.35)² + (.65)² + (.05)²) / 4 = (.0225 + .1225 + .4225 + .0025) / 4 = 0.1425.
    """
    p, labels = [0.85, 0.65, 0.35, 0.95], [1.0, 1.0, 1.0, 1.0]
    assert M.expected_calibration_error(p, labels) == pytest.approx(0.125)
    assert M.brier_score(p, labels) == pytest.approx(0.1425)
    bins = M.calibration_bins(p, labels)
    assert [(b["lower"], b["count"]) for b in bins] == [(0.0, 1), (0.1, 1), (0.3, 2), (0.6, 2), (0.8, 1), (0.9, 1)]
    # Storing the third pair the other way round, (0.65, label 0), changes nothing.
    swapped_p, swapped_y = [0.85, 0.65, 0.65, 0.95], [1.0, 1.0, 0.0, 1.0]
    assert M.expected_calibration_error(swapped_p, swapped_y) == pytest.approx(0.125)
    assert M.brier_score(swapped_p, swapped_y) == pytest.approx(0.1425)


def test_expected_calibration_error_soft_labels():
    """p = [0.72, 0.78, 0.15], soft labels [1, 0, 0.5]. Both orders: (.72,1) (.28,0) (.78,0) (.22,1)
    (.15,.5) (.85,.5). Bins: [.7,.8): conf .75, observed .5 → .25 (n2); [.2,.3): .25 vs .5 → .25 (n2);
    [.1,.2): .15 vs .5 → .35 (n1); [.8,.9): .85 vs .5 → .35 (n1).
    ECE = (2·.25 + 2·.25 + .35 + .35) / 6 = 1.7 / 6.  Brier = (.28² + .78² + .35²) / 3 = 0.8093 / 3.
    """
    p, labels = [0.72, 0.78, 0.15], [1.0, 0.0, 0.5]
    assert M.expected_calibration_error(p, labels) == pytest.approx(1.7 / 6)
    assert M.brier_score(p, labels) == pytest.approx(0.8093 / 3)


def test_calibration_edges_and_bad_inputs():
    """p = 1 falls in the last bin [0.9, 1] (closed), p = 0 in the first; a perfectly sure and right
    model has ECE 0. Probabilities outside [0, 1] and mismatched lengths are errors naming the input."""
    bins = M.calibration_bins([1.0], [1.0])
    assert [(b["lower"], b["count"]) for b in bins] == [(0.0, 1), (0.9, 1)]
    assert M.expected_calibration_error([1.0, 1.0], [1.0, 1.0]) == 0.0
    assert math.isnan(M.expected_calibration_error([], []))
    with pytest.raises(M.MetricInputError, match="win_prob"):
        M.expected_calibration_error([1.2], [1.0])
    with pytest.raises(M.MetricInputError, match="labels"):
        M.brier_score([0.5, 0.5], [1.0])
    with pytest.raises(M.MetricInputError, match="n_bins"):
        M.calibration_bins([0.5], [1.0], n_bins=0)


def test_pair_labels_and_decided_win_prob():
    """Labels: soft label where known, else 1: [0.7, nan] → [0.7, 1].
    Decided win probability p_win / (1 − p_tie): [0.25 / 0.5, 0.6 / 1] = [0.5, 0.6]; without tie_prob unchanged."""
    assert M.pair_labels([0.7, float("nan")], 2).tolist() == [0.7, 1.0]
    assert M.pair_labels(None, 3).tolist() == [1.0, 1.0, 1.0]
    assert M.decided_win_prob([0.25, 0.6], [0.5, 0.0]).tolist() == pytest.approx([0.5, 0.6])
    assert M.decided_win_prob([0.25, 0.6]).tolist() == [0.25, 0.6]


def test_pearson_by_hand():
    """x = [1, 2, 3, 4], y = [2, 4, 5, 9]: deviations dx = [−1.5, −.5, .5, 1.5], dy = [−3, −1, 0, 4];
    Σ dx·dy = 4.5 + .5 + 0 + 6 = 11, Σ dx² = 5, Σ dy² = 26 → r = 11 / √130 ≈ 0.96476."""
    assert M.pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    assert math.isnan(M.pearson([1, 1, 1], [1, 2, 3]))  # constant side: undefined, not 0
    assert math.isnan(M.pearson([1], [2]))


def test_length_bias_by_hand():
    """margins [1, 1, 2, −2, 0, −3], length diff [5, 3, −2, −4, 0, 7], the last pair a tie.
    Chosen longer (non-tie): pairs 1, 2 both right → 1.0 (n 2). Rejected longer: 2 right, −2 wrong → 0.5
    (n 2). Same length: margin 0 → ½ (n 1). Correlation over all six pairs = Pearson(margins, diff)."""
    margins, diff, ties = [1.0, 1.0, 2.0, -2.0, 0.0, -3.0], [5, 3, -2, -4, 0, 7], [False] * 5 + [True]
    out = M.length_bias(margins, diff, ties)
    assert (out["acc_chosen_longer"], out["n_chosen_longer"]) == (1.0, 2)
    assert (out["acc_rejected_longer"], out["n_rejected_longer"]) == (0.5, 2)
    assert (out["acc_same_length"], out["n_same_length"]) == (0.5, 1)
    assert out["correlation"] == pytest.approx(M.pearson(margins, diff))
    assert out["correlation"] == pytest.approx(np.corrcoef(margins, diff)[0, 1])


def test_binned_accuracy_by_hand():
    """margins [1, −1, 2, −2, 0, 3], values [−5, −1, 0, 2, 4, 10], edges [−10, 0, 10].
    [−10, 0): 1 right, −1 wrong → 0.5 (n 2). [0, 10] (last bin closed, so 10 is in): 2 right, −2 wrong,
    0 half, 3 right → (1 + 0 + ½ + 1) / 4 = 0.625 (n 4)."""
    bins = M.binned_accuracy([1.0, -1.0, 2.0, -2.0, 0.0, 3.0], [-5, -1, 0, 2, 4, 10], [-10, 0, 10])
    assert [(b["count"], b["accuracy"]) for b in bins] == [(2, 0.5), (4, 0.625)]
    with pytest.raises(M.MetricInputError, match="edges"):
        M.binned_accuracy([1.0], [0.0], [1.0, 1.0])


def test_logp_shift_mean_and_stderr_weighted_mean():
    """Shift: policy [−10, −20] vs reference [−12, −19] → mean(2, −1) = 0.5.
    [1, 2, 3, 4]: mean 2.5, std (ddof 1) = √(5/3), standard error √(5/3) / 2 ≈ 0.6455.
    Weighted mean of [1, 2, 3] with weights [1, 0, 2]: (1 + 0 + 6) / 3 = 7/3."""
    assert M.logp_shift([-10.0, -20.0], [-12.0, -19.0]) == 0.5
    stats = M.mean_and_stderr([1.0, 2.0, 3.0, 4.0])
    assert stats["mean"] == 2.5 and stats["n"] == 4
    assert stats["stderr"] == pytest.approx(math.sqrt(5 / 3) / 2)
    assert math.isnan(M.mean_and_stderr([3.0])["stderr"])
    assert M.weighted_mean([1.0, 2.0, 3.0], [1.0, 0.0, 2.0]) == pytest.approx(7 / 3)
    assert M.weighted_mean([1.0, 2.0, 3.0]) == 2.0


def test_inputs_are_checked_and_json_is_valid():
    with pytest.raises(M.MetricInputError, match="`is_tie` has 1 values, expected 2"):
        M.preference_accuracy([1.0, 2.0], [True])
    with pytest.raises(M.MetricInputError, match="1-D"):
        M.preference_accuracy([[1.0, 2.0]])
    import torch

    assert M.preference_accuracy(torch.tensor([1.0, -1.0])) == 0.5  # tensors are accepted
    assert M.json_ready({"a": float("nan"), "b": [np.float32(1.5), np.int64(2)], "c": math.inf}) == \
        {"a": None, "b": [1.5, 2], "c": None}


# ==================================================================== the evaluate modules


@pytest.fixture(scope="module")
def evaluate_modules():
    import evaluate

    return {name: evaluate.load(metric_path(name)) for name in EVALUATE_MODULES}


def test_evaluate_modules_load_offline_and_agree_with_the_functions(evaluate_modules):
    """Loaded by path with HF_HUB_OFFLINE=1 (set in conftest); each gives the hand-worked numbers above."""
    import os

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    accuracy = evaluate_modules["preference_accuracy"].compute(
        margins=[2.0, -1.0, 0.0, 0.5, -3.0], is_tie=[False, False, False, True, True],
        tie_prob=[0.1, 0.2, 0.3, 0.4, 0.6])
    assert accuracy["accuracy"] == 0.5 and accuracy["n_ties"] == 2 and accuracy["n_zero_margins"] == 1
    within = evaluate_modules["preference_accuracy"].compute(margins=[1e-6, 2e-6, 2e-3, -3e-3], is_tie=[False] * 4,
                                                             tolerance=1e-4)
    assert within["accuracy"] == 0.5 and within["n_zero_margins"] == 2  # as in the rounding test above
    assert accuracy["tie_abs_margin"] == 1.75 and accuracy["tie_prob"] == pytest.approx(0.5)
    assert accuracy["margin_std"] == pytest.approx(math.sqrt(14) / 3)

    calibration = evaluate_modules["calibration"].compute(win_prob=[0.85, 0.65, 0.35, 0.95], labels=[1, 1, 1, 1])
    assert calibration["ece"] == pytest.approx(0.125) and calibration["brier"] == pytest.approx(0.1425)
    tie_aware = evaluate_modules["calibration"].compute(win_prob=[0.25], labels=[1.0], tie_prob=[0.5])
    assert tie_aware["brier"] == pytest.approx(0.25)  # decided probability ½ against label 1

    length = evaluate_modules["length_bias"].compute(margins=[1.0, 1.0, 2.0, -2.0, 0.0], length_diff=[5, 3, -2, -4, 0])
    assert (length["acc_chosen_longer"], length["acc_rejected_longer"], length["acc_same_length"]) == (1.0, 0.5, 0.5)

    shift = evaluate_modules["logp_shift"].compute(
        policy_chosen_logps=[-10.0, -20.0], reference_chosen_logps=[-12.0, -19.0],
        policy_rejected_logps=[-15.0, -5.0], reference_rejected_logps=[-11.0, -5.0])
    assert shift == {"chosen_shift": 0.5, "rejected_shift": -2.0}

    kl = evaluate_modules["kl_estimate"].compute(mc=[1.0, 2.0, 3.0, 4.0], rb=[2.0, 2.0, 3.0, 3.0])
    assert kl["kl_mc"] == 2.5 and kl["kl_mc_stderr"] == pytest.approx(math.sqrt(5 / 3) / 2)
    assert kl["kl_rb"] == 2.5 and kl["kl_rb_stderr"] == pytest.approx(math.sqrt(1 / 3) / 2)


@pytest.mark.slow
def test_evaluate_load_needs_no_network(tmp_path):
    """A fresh interpreter with every Hugging Face offline switch on, an empty HF cache and a dead proxy
    (any request would fail) loads and runs a module by path."""
    import os
    import subprocess
    import sys

    code = (
        "import evaluate; from dpo_zoo.metrics import metric_path; "
        "m = evaluate.load(metric_path('calibration')); "
        "print(round(m.compute(win_prob=[0.85, 0.65, 0.35, 0.95], labels=[1, 1, 1, 1])['ece'], 6))"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "0.125"
