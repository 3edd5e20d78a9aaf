"""``dpo-zoo study``: a grid of runs trained and evaluated on a ground-truth reward (``runner``), and
the claims judged from their summary (``results``).
May use: every layer from compare down."""
