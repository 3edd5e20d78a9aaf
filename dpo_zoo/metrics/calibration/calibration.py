"""Calibration of predicted preference probabilities: ECE and Brier (dpo_zoo.metrics.functions)."""

import datasets
import evaluate

from dpo_zoo.metrics.functions import brier_score, calibration_bins, decided_win_prob, expected_calibration_error

_DESCRIPTION = """
Calibration of a loss's predicted P(y_w > y_l) ("win_prob") against labels: the pair's soft label
(a probability that y_w is preferred, e.g. from rater agreement) or 1 for a hard label.

Expected calibration error over `n_bins` equal-width bins [b/n, (b+1)/n) (last bin closed at 1):
ECE = sum_b (n_b / n) |mean label_b - mean prediction_b|. Each pair counts twice, as stored (p, y) and
swapped (1 - p, 1 - y), so that hard labels (all 1 in chosen-first order) still give a meaningful
reliability table and the result does not depend on which side was stored first; n is therefore twice
the number of pairs. Brier score: mean (p - y)^2 (unchanged by swapping).

Give decided (non-tie) pairs only. For a tie-aware loss pass its `tie_prob` too: the prediction is then
P(y_w > y_l | not a tie) = win_prob / (1 - tie_prob), the two-outcome probability a non-tie label tests.
"""

_KWARGS_DESCRIPTION = """
Args:
    win_prob (`list` of `float`): predicted P(y_w > y_l) in [0, 1], one per pair.
    labels (`list` of `float`): target in [0, 1]: soft label where known, else 1.
    n_bins (`int`, optional, default 10): number of equal-width bins.
    tie_prob (`list` of `float`, optional): a tie-aware loss's predicted P(y_w ~ y_l) per pair.
Returns:
    ece, brier, bins (the reliability table: lower, upper, count, confidence, observed).
Example:
    >>> metric = evaluate.load("dpo_zoo/metrics/calibration")
    >>> round(metric.compute(win_prob=[0.85, 0.65, 0.35, 0.95], labels=[1, 1, 1, 1])["ece"], 6)
    0.125
"""

_CITATION = """
@inproceedings{naeini2015obtaining,
  title={Obtaining Well Calibrated Probabilities Using Bayesian Binning},
  author={Naeini, Mahdi Pakdaman and Cooper, Gregory F. and Hauskrecht, Milos}, booktitle={AAAI}, year={2015}
}
@inproceedings{guo2017calibration,
  title={On Calibration of Modern Neural Networks},
  author={Guo, Chuan and Pleiss, Geoff and Sun, Yu and Weinberger, Kilian Q.}, booktitle={ICML}, year={2017}
}
@article{brier1950verification,
  title={Verification of Forecasts Expressed in Terms of Probability},
  author={Brier, Glenn W.}, journal={Monthly Weather Review}, volume={78}, number={1}, year={1950}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Calibration(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"win_prob": datasets.Value("float64"), "labels": datasets.Value("float64")}),
        )

    def _compute(self, win_prob, labels, n_bins=10, tie_prob=None):
        win_prob = decided_win_prob(win_prob, tie_prob)
        return {
            "ece": expected_calibration_error(win_prob, labels, n_bins),
            "brier": brier_score(win_prob, labels),
            "bins": calibration_bins(win_prob, labels, n_bins),
        }
