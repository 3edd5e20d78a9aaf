"""dpo_zoo: offline preference optimization of language models.

Parts: ``dpo_zoo.losses`` (the loss registry), ``dpo_zoo.logps`` (the one log-prob code path),
``dpo_zoo.cache`` (prepared sets and the reference cache), ``dpo_zoo.prep`` / ``data_prep`` (data),
``dpo_zoo.trainer`` (the DeepSpeed pairwise trainer), ``dpo_zoo.compare`` (held-out comparison),
``dpo_zoo.cli`` (the ``dpo-zoo`` command).
"""

__version__ = "0.1.0"
