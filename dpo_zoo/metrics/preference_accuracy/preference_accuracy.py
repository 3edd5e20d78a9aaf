"""Preference accuracy with ties scored apart (dpo_zoo; computed by dpo_zoo.metrics.functions)."""

import datasets
import evaluate

from dpo_zoo.metrics.functions import margin_summary, preference_accuracy, tie_summary, zero_margin_count

_DESCRIPTION = """
Accuracy of implicit-reward margins on preference pairs, with tie pairs scored apart.

On non-tie pairs: accuracy = mean(1[m > t] + 0.5 * 1[|m| <= t]) (a margin that is 0 up to the
tolerance t expresses no preference and earns half a point; t = 0 unless given, `dpo-zoo compare`
uses 16 float32 epsilons of the pair's largest summed log-prob), plus the mean and population std of
the margins. On tie pairs
(the annotators could not separate the two responses): the mean |margin| and, when `tie_prob` is given
(tie-aware losses such as DPO-RK / DPO-D, arXiv:2409.17431), the mean predicted tie probability.
"""

_KWARGS_DESCRIPTION = """
Args:
    margins (`list` of `float`): r(y_w) - r(y_l) per pair, as the pair's loss defines its rewards.
    is_tie (`list` of `bool`): the pair's tie flag.
    tie_prob (`list` of `float`, optional): the loss's predicted P(y_w ~ y_l) per pair.
    tolerance (`float` or `list` of `float`, optional): the largest |margin| that counts as 0 (default 0).
Returns:
    accuracy, margin_mean, margin_std (non-tie pairs), n_pairs, n_ties, n_zero_margins (non-tie pairs
    within the tolerance of 0), tie_abs_margin, tie_prob
    (NaN where a set is empty or tie_prob is not given).
Example:
    >>> metric = evaluate.load("dpo_zoo/metrics/preference_accuracy")
    >>> metric.compute(margins=[2.0, -1.0, 0.0, 0.5], is_tie=[False, False, False, True])["accuracy"]
    0.5
"""

_CITATION = """
@inproceedings{rafailov2023direct,
  title={Direct Preference Optimization: Your Language Model is Secretly a Reward Model},
  author={Rafailov, Rafael and Sharma, Archit and Mitchell, Eric and Ermon, Stefano and Manning, Christopher D. and Finn, Chelsea},
  booktitle={NeurIPS}, year={2023}, note={arXiv:2305.18290}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PreferenceAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"margins": datasets.Value("float64"), "is_tie": datasets.Value("bool")}),
        )

    def _compute(self, margins, is_tie, tie_prob=None, tolerance=0.0):
        margins_stats = margin_summary(margins, is_tie)
        ties = tie_summary(margins, is_tie, tie_prob)
        return {
            "accuracy": preference_accuracy(margins, is_tie, tolerance),
            "margin_mean": margins_stats["mean"],
            "margin_std": margins_stats["std"],
            "n_pairs": len(margins),
            "n_ties": ties["count"],
            "n_zero_margins": zero_margin_count(margins, is_tie, tolerance),
            "tie_abs_margin": ties["abs_margin"],
            "tie_prob": ties["tie_prob"],
        }
