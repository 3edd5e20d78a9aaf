"""The format of a prepared set on disk: tokenized pairs plus the reference model's log-probs, keyed by
content. The column names, the manifest's name, the shard files, the key digest and the Arrow schema
live here; :mod:`dpo_zoo.cache.reader` reads and verifies a prepared set, :mod:`dpo_zoo.cache.writer` writes one.

Layout of one prepared set (one split, e.g. ``<prep.output_dir>/train``)::

    manifest.json         written last: its presence means the set is complete and verified
    shard-00000.arrow     Arrow IPC *file* format (uncompressed, so it can be memory-mapped)
    shard-00000.json      sidecar: rows, sha256, bytes, first/last id, digest of its ids, key digest,
                          which rank wrote it (what resume checks before keeping a shard)
    shard-00001.arrow
    ...

**Shards.** The split's pairs, in split order, are cut into consecutive shards of ``prep.shard_size``
pairs. Each shard is one record batch whose columns (constants of :mod:`dpo_zoo.cache.format`) are:
``id``; ``prompt`` / ``chosen`` / ``rejected`` as JSON text (``json.loads`` gives the string or the
message list); ``chosen_input_ids`` / ``rejected_input_ids`` (list<int32>, prompt + completion);
``chosen_completion_start`` / ``rejected_completion_start`` (int32); ``is_tie`` (bool); ``weight``
(float32); ``soft_label`` (float32, null when the data has none); ``ref_chosen_logps`` /
``ref_rejected_logps`` (float64, the sum over completion tokens; with ``prep.reference=false`` no
``ref_*`` column at all); and, when the reference values are per token, ``ref_chosen_token_logps`` / ``ref_rejected_token_logps`` (list<float32>, one per completion
token, aligned with ``input_ids[completion_start:]``). With ``prep.topk = k > 0`` also
``ref_{side}_topk_ids`` (list<list<int32>> [T, k]), ``ref_{side}_topk_logps`` (list<list<float32>>
[T, k]) and ``ref_{side}_rest_logmass`` (list<float32> [T], ``log(1 − Σ_topk p)``). Behaviour-policy
log-probs (``behavior_{side}_logps``, float64) are stored when every pair carries them.

Each shard is written atomically (temporary file, fsync, rename) and then its sidecar, the same way.
A shard counts as finished only when its sidecar names the current key and the shard's ids and the
file's sha256 matches the sidecar: a killed prep resumes from there, recomputing nothing finished.

**Manifest** (``manifest.json``)::

    format, schema_version, split, created, dpo_zoo_version
    key           the WHOLE cache key (see below); key_digest = sha256 of its canonical JSON
    provides      the loss needs it can serve (dpo_zoo.losses.Need values): ties, weights always;
                  sequence_logps unless prepared with prep.reference=false (key reference_source
                  "none": a set for reference-free losses); token_logps with per-token values; vocab_logps with topk > 0 (as
                  top-k + leftover mass); soft_labels / behavior_logps when every pair has them
    columns       the Arrow columns; topk
    counts        pairs, shards, tokens {input, completion} (both sides), bytes
    ids_digest    sha256 of the ordered pair ids (the coverage check compares against it)
    shards        [{file, rows, sha256, bytes, first_id, last_id, tokens}]
    drops         the drop report summary of the data load and tokenization
    layout        shard_size, batch_size, world_size (how it was computed; not part of the key:
                  they change no value beyond floating-point rounding of differently padded batches)
    extra         provenance: model name, folder, revision and commit, reference file, data sources,
                  data_prep fingerprint

**Key.** Every setting baked into the stored values: reference weights (sha256 per weight file) or the
sha256 of a user-supplied reference file, the commit a Hub model's revision resolved to
(``model_revision``), tokenizer fingerprint, chat template, max_length, max_prompt_length,
truncation_mode, the chat_template setting, preprocessor + options + column map + split settings, a
fingerprint of the split's pair content, for a Hub data set its name, subset, splits and the commit its
revision resolved to (``data_source``), dtype, topk and the schema version. A lookup with another
key is a miss whose message names every differing field.

Reading: :class:`dpo_zoo.cache.reader.PreparedSet` memory-maps the shards (nothing is loaded whole);
``dpo_zoo.cache.reader.verify_prepared_set`` runs the full check behind ``dpo-zoo prep --verify``.
"""

from __future__ import annotations

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, List

import pyarrow as pa

FORMAT = "dpo_zoo.prepared_set"
MANIFEST = "manifest.json"
SIDES = ("chosen", "rejected")

SCHEMA_VERSION = 1

# --- the columns of a shard -------------------------------------------------------------------
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


def shard_file(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def sidecar_file(index: int) -> str:
    return f"shard-{index:05d}.json"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def digest(value: Any) -> str:
    """sha256 of the canonical JSON of ``value``."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


@dataclass(frozen=True)
class Layout:
    """Which optional columns a prepared set has. ``reference=False`` (``prep.reference=false``): no
    reference column at all, so the set serves only reference-free losses (and live-reference runs)."""

    token_level: bool = True
    topk: int = 0
    behavior: bool = False
    reference: bool = True

    def __post_init__(self):
        if not self.reference and (self.token_level or self.topk):
            raise ValueError("a layout without reference values has no per-token or top-k reference columns")

    def provides(self, soft_labels: bool) -> List[str]:
        needs = ["ties", "weights"]
        if self.reference:
            needs.append("sequence_logps")
        if self.token_level:
            needs.append("token_logps")
        if self.topk > 0:
            needs.append("vocab_logps")
        if soft_labels:
            needs.append("soft_labels")
        if self.behavior:
            needs.append("behavior_logps")
        return sorted(needs)


def arrow_schema(layout: Layout) -> pa.Schema:
    """The Arrow schema of a shard with this layout ."""
    fields = [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(PROMPT_TEXT, pa.string()),
        pa.field(CHOSEN_TEXT, pa.string()),
        pa.field(REJECTED_TEXT, pa.string()),
        pa.field(CHOSEN_INPUT_IDS, pa.list_(pa.int32())),
        pa.field(REJECTED_INPUT_IDS, pa.list_(pa.int32())),
        pa.field(CHOSEN_COMPLETION_START, pa.int32()),
        pa.field(REJECTED_COMPLETION_START, pa.int32()),
        pa.field(IS_TIE, pa.bool_()),
        pa.field(WEIGHT, pa.float32()),
        pa.field(SOFT_LABEL, pa.float32()),
    ]
    if layout.reference:
        fields += [pa.field(REF_CHOSEN_LOGPS, pa.float64()), pa.field(REF_REJECTED_LOGPS, pa.float64())]
    if layout.token_level:
        fields += [
            pa.field(REF_CHOSEN_TOKEN_LOGPS, pa.list_(pa.float32())),
            pa.field(REF_REJECTED_TOKEN_LOGPS, pa.list_(pa.float32())),
        ]
    if layout.topk:
        for ids_col, logps_col, rest_col in (
            (REF_CHOSEN_TOPK_IDS, REF_CHOSEN_TOPK_LOGPS, REF_CHOSEN_REST_LOGMASS),
            (REF_REJECTED_TOPK_IDS, REF_REJECTED_TOPK_LOGPS, REF_REJECTED_REST_LOGMASS),
        ):
            fields += [
                pa.field(ids_col, pa.list_(pa.list_(pa.int32()))),
                pa.field(logps_col, pa.list_(pa.list_(pa.float32()))),
                pa.field(rest_col, pa.list_(pa.float32())),
            ]
    if layout.behavior:
        fields += [pa.field(BEHAVIOR_CHOSEN_LOGPS, pa.float64()), pa.field(BEHAVIOR_REJECTED_LOGPS, pa.float64())]
    return pa.schema(fields, metadata={"dpo_zoo.format": FORMAT, "dpo_zoo.schema_version": str(SCHEMA_VERSION)})
