"""Prepared sets and the reference cache: the on-disk format (``format``), the verified reader
(``reader``), the atomic writer (``writer``) and the reference pass ``dpo-zoo prep`` runs (``prep``).
May use: base, maths, runtime, rewards, config."""
