"""The contracts between data_prep, the cache, the trainer and compare.

1. A **normalized pair** (what every reader/preprocessor yields, after validation) is a
   :class:`PreferencePair`: TRL's schema (``prompt``, ``chosen``, ``rejected``, each a string or a list
   of ``{"role", "content"}`` messages) plus ``id``, ``is_tie``, ``weight``, ``soft_label`` and where it
   came from (``source_file``, ``source_row``) for error messages and drop reports.

2. A **tokenized pair** adds, per side, the full token ids of ``prompt + completion`` and the index
   where the completion starts (the two sides may differ in prompt tokens when a tokenizer merges
   across the boundary, so each side carries its own start).

3. The **reference values** of a pair (:class:`PairReference`): per side the summed log-prob and,
   when known, one value per completion token (aligned with ``input_ids[completion_start:]``) and the
   reference's top-k distribution. They come from the reference model (``dpo-zoo prep``) or from a
   file the user brings (:mod:`data_prep.reference_logps`), and are stored in a prepared set, whose
   format (columns, manifest) is :mod:`dpo_zoo.cache.format`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

Message = Dict[str, str]
Text = Union[str, List[Message]]


@dataclass
class PreferencePair:
    """One validated preference pair in TRL's schema (see module docstring)."""

    id: str
    prompt: Text
    chosen: Text
    rejected: Text
    is_tie: bool = False
    weight: float = 1.0
    soft_label: Optional[float] = None
    source_file: str = ""
    source_row: int = -1
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


@dataclass
class TokenizedPair:
    pair: PreferencePair
    chosen_input_ids: List[int]
    chosen_completion_start: int
    rejected_input_ids: List[int]
    rejected_completion_start: int


@dataclass
class SideReference:
    """Reference values of one completion: ``logps`` (the sum) and, when known, ``token_logps`` [T]
    and the top-k distribution (``topk_ids`` / ``topk_logps`` [T, k], ``rest_logmass`` [T])."""

    logps: float
    token_logps: Optional[Any] = None  # numpy [T]
    topk_ids: Optional[Any] = None  # numpy [T, k]
    topk_logps: Optional[Any] = None  # numpy [T, k]
    rest_logmass: Optional[Any] = None  # numpy [T]


@dataclass
class PairReference:
    """Reference values of a pair, both sides."""

    chosen: SideReference
    rejected: SideReference
