"""Mean change of chosen and rejected log-probs against the reference (dpo_zoo.metrics.functions)."""

import datasets
import evaluate

from dpo_zoo.metrics.functions import logp_shift

_DESCRIPTION = """
Mean change of the summed completion log-probs from the reference model to the policy, separately for
the chosen and the rejected responses: mean_i(log pi(y_i|x_i) - log pi_ref(y_i|x_i)). DPO can lower the
chosen log-probs too, as long as the rejected ones fall further (Pal et al., arXiv:2402.13228), so a
rising margin alone does not say which side moved.
"""

_KWARGS_DESCRIPTION = """
Args:
    policy_chosen_logps, reference_chosen_logps, policy_rejected_logps, reference_rejected_logps
    (`list` of `float`): summed completion log-probs per pair.
Returns:
    chosen_shift, rejected_shift.
Example:
    >>> metric = evaluate.load("dpo_zoo/metrics/logp_shift")
    >>> metric.compute(policy_chosen_logps=[-10.0], reference_chosen_logps=[-12.0],
    ...                policy_rejected_logps=[-15.0], reference_rejected_logps=[-11.0])
    {'chosen_shift': 2.0, 'rejected_shift': -4.0}
"""

_CITATION = """
@article{pal2024smaug,
  title={Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive},
  author={Pal, Arka and Karkhanis, Deep and Dooley, Samuel and Roberts, Manley and Naidu, Siddartha and White, Colin},
  journal={arXiv:2402.13228}, year={2024}
}
"""

_SIDES = ("policy_chosen_logps", "reference_chosen_logps", "policy_rejected_logps", "reference_rejected_logps")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LogpShift(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({name: datasets.Value("float64") for name in _SIDES}),
        )

    def _compute(self, policy_chosen_logps, reference_chosen_logps, policy_rejected_logps, reference_rejected_logps):
        return {
            "chosen_shift": logp_shift(policy_chosen_logps, reference_chosen_logps),
            "rejected_shift": logp_shift(policy_rejected_logps, reference_rejected_logps),
        }
