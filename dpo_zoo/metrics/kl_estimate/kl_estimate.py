"""Monte Carlo and Rao-Blackwellized estimates of KL(policy || reference) (dpo_zoo.metrics.functions)."""

import datasets
import evaluate

from dpo_zoo.metrics.functions import mean_and_stderr

_DESCRIPTION = """
Summarises per-sample estimates of KL(pi || pi_ref) between two language models, each computed on one
completion y sampled from pi (dpo_zoo.compare.runner.sequence_kl_terms computes them):

* Monte Carlo: sum_t log pi(y_t | y_<t) / pi_ref(y_t | y_<t);
* Rao-Blackwellized: sum_t KL(pi(. | y_<t) || pi_ref(. | y_<t)), the exact next-token KL over the
  vocabulary at every sampled prefix (Amini, Vieira & Cotterell, "Better Estimation of the
  Kullback-Leibler Divergence Between Language Models", NeurIPS 2025, arXiv:2504.10637): unbiased, with
  variance no larger than the Monte Carlo estimator's, and never negative.

Returns each mean with its standard error std / sqrt(n) (std with ddof = 1) over the samples.
"""

_KWARGS_DESCRIPTION = """
Args:
    mc (`list` of `float`): per-sample Monte Carlo values.
    rb (`list` of `float`): per-sample Rao-Blackwellized values (same samples).
Returns:
    kl_mc, kl_mc_stderr, kl_rb, kl_rb_stderr, n_samples.
Example:
    >>> metric = evaluate.load("dpo_zoo/metrics/kl_estimate")
    >>> metric.compute(mc=[0.5, -0.1, 0.8], rb=[0.3, 0.4, 0.2])["kl_rb"]
    0.3
"""

_CITATION = """
@inproceedings{amini2025better,
  title={Better Estimation of the Kullback--Leibler Divergence Between Language Models},
  author={Amini, Afra and Vieira, Tim and Cotterell, Ryan}, booktitle={NeurIPS}, year={2025}, note={arXiv:2504.10637}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class KLEstimate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"mc": datasets.Value("float64"), "rb": datasets.Value("float64")}),
        )

    def _compute(self, mc, rb):
        monte_carlo, rao_blackwell = mean_and_stderr(mc), mean_and_stderr(rb)
        return {
            "kl_mc": monte_carlo["mean"],
            "kl_mc_stderr": monte_carlo["stderr"],
            "kl_rb": rao_blackwell["mean"],
            "kl_rb_stderr": rao_blackwell["stderr"],
            "n_samples": monte_carlo["n"],
        }
