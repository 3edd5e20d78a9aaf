"""dpo_zoo: offline preference optimization of language models.

The package is laid out by the stage each part serves. Dependencies point one way, down this
picture: a module imports its own layer and the layers below it, never one above
(``tests/test_structure.py`` enforces :data:`LAYERS`, and that there is no import cycle)::

    interface   cli, docs                       the `dpo-zoo` command; generated docs
        |
    study       study/                          loss-vs-loss studies: runs, claims, verdicts
        |
    doctor      doctor/                         `dpo-zoo doctor`: health checks of runs and prepared sets
        |
    compare     compare/                        held-out scoring of runs, drift (KL), win rates, reports
        |
    train       train/                          the DeepSpeed pairwise trainer, checkpoints, run folders
        |
    cache       cache/                          prepared sets: format, reader, writer, reference pass
        |
    config      config, config_schema, _hints   the schema, loading, overrides and validation
        |
    rewards     rewards/                        ground-truth rewards and reward-labelled sampling
        |
    runtime     model/, parallel/               models, log-probs, packing; process groups, peers
        |
    maths       losses/, metrics/               the loss registry; the `evaluate` metrics
        |
    base        errors, files, staleness,       errors, atomic files and locks, config diffs,
                stopping                        stopping on SIGTERM/SIGINT

``data_prep`` (the preprocessors) sits below all of it and imports neither dpo_zoo nor torch.
A new subpackage or top-level module gets its place in :data:`LAYERS`. Public import paths for plug-ins:
``dpo_zoo.losses`` (``Loss``, ``register_loss``, the registry) and ``dpo_zoo/metrics/`` (for
``evaluate.load``).
"""

__version__ = "0.1.0"

# Low to high. Each entry: a layer's name and the modules or subpackages in it (dotted, under dpo_zoo).
LAYERS = (
    ("base", ("errors", "files", "staleness", "stopping")),
    ("maths", ("losses", "metrics")),
    ("runtime", ("model", "parallel")),
    ("rewards", ("rewards",)),
    ("config", ("config", "config_schema", "config_hints")),
    ("cache", ("cache",)),
    ("train", ("train",)),
    ("compare", ("compare",)),
    ("doctor", ("doctor",)),
    ("study", ("study",)),
    ("interface", ("cli", "docs", "study_results")),
)
