"""The contracts between data_prep, the cache, the trainer and compare.

1. A **normalized pair** (what every reader/preprocessor yields, after validation) is a
   :class:`PreferencePair`: TRL's schema (``prompt``, ``chosen``, ``rejected``, each a string or a list
   of ``{"role", "content"}`` messages) plus ``id``, ``is_tie``, ``weight``, ``soft_label`` and where it
   came from (``source_file``, ``source_row``) for error messages and drop reports.

2. A **tokenized pair** adds, per side, the full token ids of ``prompt + completion`` and the index
   where the completion starts (the two sides may differ in prompt tokens when a tokenizer merges
   across the boundary, so each side carries its own start).

3. A **prepared set** (on disk, ``dpo_zoo.cache``) is Arrow shards with the columns below, plus a
   manifest. Reference values are per completion token, aligned with
   ``input_ids[completion_start:]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

Message = Dict[str, str]
Text = Union[str, List[Message]]

SCHEMA_VERSION = 1

# --- columns of a prepared set -------------------------------------------------------------------
ID = "id"
PROMPT_TEXT = "prompt"  # the prompt as JSON text (string or message list), for reports
CHOSEN_TEXT = "chosen"
REJECTED_TEXT = "rejected"
CHOSEN_INPUT_IDS = "chosen_input_ids"  # list<int32>: prompt + chosen completion
REJECTED_INPUT_IDS = "rejected_input_ids"
CHOSEN_COMPLETION_START = "chosen_completion_start"  # int32
REJECTED_COMPLETION_START = "rejected_completion_start"
IS_TIE = "is_tie"  # bool
WEIGHT = "weight"  # float32
SOFT_LABEL = "soft_label"  # float32, null when the data has none: P(chosen preferred)
REF_CHOSEN_TOKEN_LOGPS = "ref_chosen_token_logps"  # list<float32>, one per completion token
REF_REJECTED_TOKEN_LOGPS = "ref_rejected_token_logps"
REF_CHOSEN_LOGPS = "ref_chosen_logps"  # float64: the sum of the per-token values
REF_REJECTED_LOGPS = "ref_rejected_logps"
REF_CHOSEN_TOPK_IDS = "ref_chosen_topk_ids"  # list<list<int32>> [T, k]   (only with prep.topk > 0)
REF_CHOSEN_TOPK_LOGPS = "ref_chosen_topk_logps"  # list<list<float32>> [T, k]
REF_CHOSEN_REST_LOGMASS = "ref_chosen_rest_logmass"  # list<float32> [T]: log(1 − Σ_topk p)
REF_REJECTED_TOPK_IDS = "ref_rejected_topk_ids"
REF_REJECTED_TOPK_LOGPS = "ref_rejected_topk_logps"
REF_REJECTED_REST_LOGMASS = "ref_rejected_rest_logmass"
BEHAVIOR_CHOSEN_LOGPS = "behavior_chosen_logps"  # float64, optional (IS-DAA's π_b)
BEHAVIOR_REJECTED_LOGPS = "behavior_rejected_logps"


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
