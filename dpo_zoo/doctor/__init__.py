"""``dpo-zoo doctor``: the health checks of a run folder or a prepared set (``runner``). The checks
themselves are lower down, where the trainer runs them live: training signals in ``train/health.py``,
prepared-set rows in ``cache/health.py``.
May use: every layer from compare down."""
