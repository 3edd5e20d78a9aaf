"""Preference accuracy with ties scored apart (dpo_zoo; computed by dpo_zoo.metrics.functions)."""

import datasets
import evaluate

from dpo_zoo.metrics.functions import margin_summary, preference_accuracy, tie_summary

_DESCRIPTION = """
Accuracy of implicit-reward margins on preference pairs, with tie pairs scored apart.

On non-tie pairs: accuracy = mean(1[m > 0] + 0.5 * 1[m = 0]) (an exact 0 margin expresses no
preference and earns half a point), plus the mean and population std of the margins. On tie pairs
(the annotators could not separate the two responses): the mean |margin| and, when `tie_prob` is given
(tie-aware losses such as DPO-RK / DPO-D, arXiv:2409.17431), the mean predicted tie probability.
"""

_KWARGS_DESCRIPTION = """
Args:
    margins (`list` of `float`): r(y_w) - r(y_l) per pair, as the pair's loss defines its rewards.
    is_tie (`list` of `bool`): the pair's tie flag.
    tie_prob (`list` of `float`, optional): the loss's predicted P(y_w ~ y_l) per pair.
Returns:
    accuracy, margin_mean, margin_std (non-tie pairs), n_pairs, n_ties, tie_abs_margin, tie_prob
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

    def _compute(self, margins, is_tie, tie_prob=None):
        margins_stats = margin_summary(margins, is_tie)
        ties = tie_summary(margins, is_tie, tie_prob)
        return {
            "accuracy": preference_accuracy(margins, is_tie),
            "margin_mean": margins_stats["mean"],
            "margin_std": margins_stats["std"],
            "n_pairs": len(margins),
            "n_ties": ties["count"],
            "tie_abs_margin": ties["abs_margin"],
            "tie_prob": ties["tie_prob"],
        }
