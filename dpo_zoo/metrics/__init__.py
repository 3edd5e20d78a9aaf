"""Preference-comparison metrics: plain functions (:mod:`dpo_zoo.metrics.functions`) and ``evaluate``
modules wrapping them, one folder each (``dpo_zoo/metrics/<name>/<name>.py``).

Load a module offline by its path::

    import evaluate
    from dpo_zoo.metrics import metric_path
    accuracy = evaluate.load(metric_path("preference_accuracy"))
    accuracy.compute(margins=[0.3, -0.1, 0.0], is_tie=[False, False, False])

``dpo-zoo compare`` computes through the same functions, so its numbers and ``evaluate``'s agree.
"""

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
EVALUATE_MODULES = ("preference_accuracy", "calibration", "length_bias", "logp_shift", "kl_estimate")


def metric_path(name: str) -> str:
    """The folder of the ``evaluate`` module ``name`` (one of :data:`EVALUATE_MODULES`)."""
    if name not in EVALUATE_MODULES:
        raise ValueError(f"unknown dpo_zoo metric '{name}'; known: {', '.join(EVALUATE_MODULES)}")
    return str(METRICS_DIR / name)
