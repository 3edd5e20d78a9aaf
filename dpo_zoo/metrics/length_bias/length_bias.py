"""Reward-length correlation and accuracy by which side is longer (dpo_zoo.metrics.functions)."""

import datasets
import evaluate

from dpo_zoo.metrics.functions import length_bias

_DESCRIPTION = """
How much implicit-reward margins follow response length: the Pearson correlation between the margin
r(y_w) - r(y_l) and the length difference |y_w| - |y_l| (completion tokens) over all pairs, and the
preference accuracy (exact 0 margin = half a point) of the non-tie pairs split by whether the chosen
response is longer, shorter, or as long as the rejected one.
"""

_KWARGS_DESCRIPTION = """
Args:
    margins (`list` of `float`): r(y_w) - r(y_l) per pair.
    length_diff (`list` of `float`): completion tokens of y_w minus those of y_l.
    is_tie (`list` of `bool`, optional): tie flags (tie pairs are left out of the accuracies).
Returns:
    correlation, acc_chosen_longer, acc_rejected_longer, acc_same_length and the counts n_*.
Example:
    >>> metric = evaluate.load("dpo_zoo/metrics/length_bias")
    >>> metric.compute(margins=[1.0, 2.0, 3.0], length_diff=[1, 2, 3])["correlation"]
    1.0
"""

_CITATION = """
@article{singhal2023long,
  title={A Long Way to Go: Investigating Length Correlations in RLHF},
  author={Singhal, Prasann and Goyal, Tanya and Xu, Jiacheng and Durrett, Greg}, journal={arXiv:2310.03716}, year={2023}
}
@inproceedings{park2024disentangling,
  title={Disentangling Length from Quality in Direct Preference Optimization},
  author={Park, Ryan and Rafailov, Rafael and Ermon, Stefano and Finn, Chelsea}, booktitle={Findings of ACL}, year={2024}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LengthBias(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"margins": datasets.Value("float64"), "length_diff": datasets.Value("float64")}),
        )

    def _compute(self, margins, length_diff, is_tie=None):
        return length_bias(margins, length_diff, is_tie)
