"""Dataset preprocessors: read, normalise and validate preference data, then tokenize it (see schema.py).

Public API (the prep command and the cache build on these names):

* :func:`load_splits` (``data`` config section) -> :class:`LoadedSplits`: train and held-out
  :class:`PreferencePair` lists, the :class:`DropReport`, every file read, and a fingerprint of the
  normalized pairs.
* :func:`tokenize_pairs` (tokenizer, pairs, ...) -> :class:`TokenizedPair` list.
* :class:`DropReport`: bad rows by reason and each dropped row (file, 0-based row, field, reason).

Preprocessors (``data.preprocessor``): ``generic`` (TRL's schema: :mod:`data_prep.normalize`),
``hh_rlhf`` (:mod:`data_prep.hh_rlhf`), ``vader`` (:mod:`data_prep.vader`), ``ultrafeedback``
(:mod:`data_prep.ultrafeedback`); file formats in :mod:`data_prep.readers`.
"""

from .drops import DropReport
from .load import LoadedSplits, fingerprint, load_splits
from .schema import PreferencePair, TokenizedPair
from .tokenize import tokenize_pairs

__all__ = [
    "DropReport",
    "LoadedSplits",
    "PreferencePair",
    "TokenizedPair",
    "fingerprint",
    "load_splits",
    "tokenize_pairs",
]
