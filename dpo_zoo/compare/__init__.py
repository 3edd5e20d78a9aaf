"""``dpo-zoo compare``: held-out scoring of runs (``runner``), the subjects it scores (``subjects``),
drift from the reference by sampling (``drift``) and the report it writes (``report``).
May use: every layer from train down."""
