"""The on-disk prepared set: shards + manifest, keys and misses, resume, integrity, coverage, reading,
and user-supplied reference log-probs. Synthetic values; no model is run here (see test_prep.py)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.reference_logps import read_reference_file, references_from_file
from data_prep.schema import PairReference, PreferencePair, SideReference, TokenizedPair
from dpo_zoo.cache import format as S
from dpo_zoo.cache.reader import PreparedSet, check_contents, lookup, read_manifest, verify_prepared_set
from dpo_zoo.cache.format import MANIFEST, Layout, digest, shard_file, sidecar_file
from dpo_zoo.cache.writer import PreparedSetWriter, build_shard_table, pairs_fingerprint, plan_shards, shard_token_counts
from dpo_zoo.errors import CacheError, DataError
from dpo_zoo.losses.base import Need
from dpo_zoo.staleness import describe

KEY = {"schema_version": 1, "split": "train", "max_length": 64, "model_weights": {"model.safetensors": "a" * 64},
       "tokenizer": "b" * 64, "topk": 0}


def make_rows(n, seed=0, soft=False):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = [rng.randrange(1, 300) for _ in range(rng.randrange(1, 6))]
        chosen = [rng.randrange(1, 300) for _ in range(rng.randrange(1, 8))]
        rejected = [rng.randrange(1, 300) for _ in range(rng.randrange(1, 8))]
        pair = PreferencePair(
            id=f"pair-{i}", prompt=f"prompt {i}", chosen=[{"role": "assistant", "content": f"yes {i}"}],
            rejected=f"no {i}", is_tie=(i % 5 == 0), weight=1.0 + i / 10, soft_label=(0.7 if soft else None),
        )
        rows.append(TokenizedPair(pair, prompt + chosen, len(prompt), prompt + rejected, len(prompt)))
    return rows


def make_refs(rows, topk=0, seed=0):
    rng = np.random.default_rng(seed)
    refs = []
    for r in rows:
        sides = {}
        for side, ids, start in (("chosen", r.chosen_input_ids, r.chosen_completion_start),
                                 ("rejected", r.rejected_input_ids, r.rejected_completion_start)):
            t = len(ids) - start
            values = -rng.random(t).astype(np.float32) * 5
            extra = {}
            if topk:
                extra = dict(topk_ids=rng.integers(0, 300, (t, topk)).astype(np.int32),
                             topk_logps=-rng.random((t, topk)).astype(np.float32),
                             rest_logmass=-rng.random(t).astype(np.float32))
            sides[side] = SideReference(logps=float(values.astype(np.float64).sum()), token_logps=values, **extra)
        refs.append(PairReference(**sides))
    return refs


def write_set(path, rows, refs, layout=Layout(), key=KEY, shard_size=4):
    writer = PreparedSetWriter(path, key, plan_shards([r.pair.id for r in rows], shard_size), layout)
    writer.prepare_directory()
    for i in range(0, len(rows), shard_size):
        chunk = rows[i : i + shard_size]
        writer.write(i // shard_size, build_shard_table(chunk, refs[i : i + shard_size], layout), shard_token_counts(chunk))
    return writer.finalize(drops={"total": 0}, split="train", layout_info={"shard_size": shard_size})


@pytest.fixture
def built(tmp_path):
    rows = make_rows(10)
    refs = make_refs(rows)
    manifest = write_set(tmp_path / "set", rows, refs)
    return tmp_path / "set", rows, refs, manifest


# ---------------------------------------------------------------- writing and reading


def test_roundtrip_through_memory_mapped_shards(built):
    path, rows, refs, manifest = built
    assert sorted(p.name for p in path.iterdir()) == [MANIFEST] + sorted(
        [shard_file(i) for i in range(3)] + [sidecar_file(i) for i in range(3)]
    )
    data = PreparedSet.open(path)
    assert len(data) == 10 and data.ids == [r.pair.id for r in rows]
    assert data.provides == {Need.SEQUENCE_LOGPS, Need.TOKEN_LOGPS, Need.TIES, Need.WEIGHTS}
    assert data.key == KEY
    row = data.row(7)
    assert row[S.CHOSEN_INPUT_IDS] == rows[7].chosen_input_ids
    assert row[S.CHOSEN_COMPLETION_START] == rows[7].chosen_completion_start
    assert json.loads(row[S.CHOSEN_TEXT]) == rows[7].pair.chosen
    assert json.loads(row[S.REJECTED_TEXT]) == "no 7"
    np.testing.assert_array_equal(np.float32(row[S.REF_CHOSEN_TOKEN_LOGPS]), refs[7].chosen.token_logps)
    assert row[S.REF_REJECTED_LOGPS] == refs[7].rejected.logps
    assert row[S.IS_TIE] is False and data.row(5)[S.IS_TIE] is True
    assert row[S.SOFT_LABEL] is None
    assert [r[S.ID] for r in data.rows([9, 0, -1])] == ["pair-9", "pair-0", "pair-9"]
    table = data.table([1, 2], columns=[S.ID, S.WEIGHT])
    assert table.column_names == [S.ID, S.WEIGHT] and table.column(S.WEIGHT).to_pylist() == pytest.approx([1.1, 1.2])
    with pytest.raises(IndexError, match="out of range"):
        data.row(10)
    counts = manifest["counts"]
    assert counts["pairs"] == 10 and counts["shards"] == 3
    assert counts["tokens"] == shard_token_counts(rows)
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["shards"][1]["first_id"] == "pair-4" and manifest["shards"][1]["last_id"] == "pair-7"


def test_topk_layout_provides_vocab_logps(tmp_path):
    rows = make_rows(5, soft=True)
    refs = make_refs(rows, topk=3)
    write_set(tmp_path / "k", rows, refs, layout=Layout(topk=3))
    data = PreparedSet.open(tmp_path / "k")
    assert Need.VOCAB_LOGPS in data.provides and Need.SOFT_LABELS in data.provides and data.topk == 3
    row = data.row(2)
    np.testing.assert_array_equal(np.array(row[S.REF_CHOSEN_TOPK_IDS]), refs[2].chosen.topk_ids)
    np.testing.assert_array_equal(np.float32(row[S.REF_REJECTED_TOPK_LOGPS]), refs[2].rejected.topk_logps)
    np.testing.assert_array_equal(np.float32(row[S.REF_CHOSEN_REST_LOGMASS]), refs[2].chosen.rest_logmass)
    assert row[S.SOFT_LABEL] == pytest.approx(0.7)


def test_sums_only_set_lacks_token_logps(tmp_path):
    rows = make_rows(3)
    refs = [PairReference(SideReference(-1.5), SideReference(-2.5)) for _ in rows]
    write_set(tmp_path / "s", rows, refs, layout=Layout(token_level=False))
    data = PreparedSet.open(tmp_path / "s")
    assert Need.TOKEN_LOGPS not in data.provides and Need.SEQUENCE_LOGPS in data.provides
    assert S.REF_CHOSEN_TOKEN_LOGPS not in data.columns and data.row(0)[S.REF_REJECTED_LOGPS] == -2.5


def test_empty_split_is_a_valid_set(tmp_path):
    write_set(tmp_path / "e", [], [])
    data = PreparedSet.open(tmp_path / "e")
    assert len(data) == 0 and data.ids == [] and S.REF_CHOSEN_TOKEN_LOGPS in data.table().column_names


def test_shard_bytes_are_deterministic(tmp_path, built):
    path, rows, refs, manifest = built
    again = write_set(tmp_path / "again", rows, refs)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]


# ---------------------------------------------------------------- keys and lookup


def test_miss_names_each_differing_field():
    new = {**KEY, "max_length": 32, "model_weights": {"model.safetensors": "c" * 64}, "extra_field": True}
    lines = describe(KEY, new)
    assert lines == ["extra_field (none) → True", "max_length 64 → 32", "model_weights model.safetensors aaaaaaaa… → cccccccc…"]


def test_lookup_states(built, tmp_path):
    path, rows, refs, manifest = built
    assert lookup(tmp_path / "nothing", KEY).status == "absent"
    hit = lookup(path, KEY)
    assert hit.status == "hit" and hit.message(path) == f"cache hit: {path}"
    miss = lookup(path, {**KEY, "tokenizer": "d" * 64})
    assert miss.status == "miss" and "cache miss: tokenizer bbbbbbbb… → dddddddd…" in miss.message(path)
    (path / MANIFEST).unlink()
    assert lookup(path, KEY).status == "incomplete"


def test_pairs_fingerprint_follows_content():
    rows = make_rows(3)
    base = pairs_fingerprint([r.pair for r in rows])
    rows[1].pair.rejected = "changed"
    assert pairs_fingerprint([r.pair for r in rows]) != base


# ---------------------------------------------------------------- integrity


def _flip_byte(path: Path, offset: int):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_shard_is_refused_by_name(built):
    path = built[0]
    _flip_byte(path / shard_file(1), 200)
    with pytest.raises(CacheError, match=r"shard-00001\.arrow: sha256 differs"):
        PreparedSet.open(path)
    damaged = lookup(path, KEY)
    assert damaged.status == "damaged" and "shard-00001.arrow" in damaged.reasons[0]
    with pytest.raises(CacheError, match="shard-00001"):
        verify_prepared_set(path)


def test_truncated_shard_is_refused_even_without_checksums(built):
    path = built[0]
    shard = path / shard_file(2)
    shard.write_bytes(shard.read_bytes()[:-100])
    for verify in (True, False):
        with pytest.raises(CacheError, match=r"shard-00002\.arrow: \d+ bytes, the manifest says \d+ \(truncated"):
            PreparedSet.open(path, verify=verify)


def test_bad_manifest_is_named(built):
    path = built[0]
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["schema_version"] = 99
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="manifest.json: field `schema_version` is 99"):
        PreparedSet.open(path)
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(CacheError, match="manifest.json: not valid JSON"):
        PreparedSet.open(path)


def test_coverage_failures_are_detected(built):
    path, rows, refs, manifest = built
    # Shard 1 replaced by a copy of shard 0, its manifest entry made to match: ids now repeat.
    (path / shard_file(1)).write_bytes((path / shard_file(0)).read_bytes())
    tampered = json.loads(json.dumps(manifest))
    tampered["shards"][1] = {**manifest["shards"][0], "file": shard_file(1)}
    with pytest.raises(CacheError, match="pair id 'pair-0' appears in more than one row"):
        check_contents(path, tampered)
    # A manifest that claims a pair no shard holds.
    write_set(path, rows, refs)
    tampered = read_manifest(path)
    tampered["counts"]["pairs"] += 1
    tampered["ids_digest"] = digest([r.pair.id for r in rows] + ["pair-missing"])
    with pytest.raises(CacheError, match="coverage check failed: the shards hold 10 pairs"):
        check_contents(path, tampered)


def test_values_of_the_wrong_length_are_refused_at_finalize(tmp_path):
    rows = make_rows(4)
    refs = make_refs(rows)
    refs[2].rejected.token_logps = refs[2].rejected.token_logps[:-1]
    with pytest.raises(CacheError, match=r"row 2 \(id 'pair-2'\), column `ref_rejected_token_logps`: \d+ values for \d+"):
        write_set(tmp_path / "bad", rows, refs)
    assert not (tmp_path / "bad" / MANIFEST).exists()


def test_finalize_refuses_a_missing_shard(tmp_path):
    rows = make_rows(8)
    writer = PreparedSetWriter(tmp_path / "p", KEY, plan_shards([r.pair.id for r in rows], 4), Layout())
    writer.prepare_directory()
    writer.write(0, build_shard_table(rows[:4], make_refs(rows[:4]), Layout()), shard_token_counts(rows[:4]))
    with pytest.raises(CacheError, match="shard-00001.arrow: missing or not finished"):
        writer.finalize()


# ---------------------------------------------------------------- resume


def test_finished_shards_are_recognised_only_for_their_key_ids_and_bytes(built):
    path, rows, refs, _ = built
    ids = plan_shards([r.pair.id for r in rows], 4)
    writer = PreparedSetWriter(path, KEY, ids, Layout())
    assert all(writer.finished(i) is not None for i in range(3))
    assert PreparedSetWriter(path, {**KEY, "max_length": 1}, ids, Layout()).finished(0) is None
    assert PreparedSetWriter(path, KEY, plan_shards([r.pair.id for r in rows], 3), Layout()).finished(0) is None
    _flip_byte(path / shard_file(0), 300)
    assert writer.finished(0) is None and writer.finished(1) is not None
    (path / sidecar_file(1)).unlink()
    assert writer.finished(1) is None


def test_rebuild_removes_the_old_manifest_first_and_stale_shards(built):
    path, rows, refs, _ = built
    writer = PreparedSetWriter(path, {**KEY, "max_length": 1}, plan_shards([r.pair.id for r in rows[:4]], 4), Layout())
    (path / ".shard-00000.arrow.tmp-123").write_bytes(b"left by a killed writer")
    writer.prepare_directory()
    assert sorted(p.name for p in path.iterdir()) == [shard_file(0), sidecar_file(0)]


# ---------------------------------------------------------------- user-supplied reference log-probs


def _write_jsonl(path, records, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def test_reference_file_with_token_lists(tmp_path):
    rows = make_rows(4)
    refs = make_refs(rows)
    records = [{"id": r.pair.id, "ref_chosen_token_logps": ref.chosen.token_logps.tolist(),
                "ref_rejected_token_logps": ref.rejected.token_logps.tolist()} for r, ref in zip(rows, refs)]
    records.append({"id": "not-in-this-split", "ref_chosen_token_logps": [-1.0], "ref_rejected_token_logps": [-2.0]})
    ref_file = read_reference_file(_write_jsonl(tmp_path / "ref.jsonl.gz", records, gz=True))
    assert ref_file.token_level
    got = references_from_file(ref_file, rows, "train")
    np.testing.assert_array_equal(got[3].chosen.token_logps, refs[3].chosen.token_logps)
    assert got[3].rejected.logps == pytest.approx(refs[3].rejected.logps)


def test_reference_file_with_sums_in_parquet(tmp_path):
    rows = make_rows(3)
    pq.write_table(pa.table({"id": [r.pair.id for r in rows], "ref_chosen_logps": [-1.0, -2.0, -3.0],
                             "ref_rejected_logps": [-4.0, -5.0, -6.0]}), tmp_path / "ref.parquet")
    ref_file = read_reference_file(tmp_path / "ref.parquet")
    assert not ref_file.token_level
    got = references_from_file(ref_file, rows, "train")
    assert [g.rejected.logps for g in got] == [-4.0, -5.0, -6.0] and got[0].chosen.token_logps is None


def test_reference_file_errors_name_file_row_and_field(tmp_path):
    rows = make_rows(3)
    sums = [{"id": r.pair.id, "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0} for r in rows]
    ref_file = read_reference_file(_write_jsonl(tmp_path / "partial.jsonl", sums[:2]))
    with pytest.raises(DataError, match=r"partial.jsonl: no reference values for 1 of the 3 pairs of the train split \(ids 'pair-2'\)"):
        references_from_file(ref_file, rows, "train")
    tokens = [{"id": r.pair.id, "ref_chosen_token_logps": [-0.5] * (len(r.chosen_input_ids) - r.chosen_completion_start),
               "ref_rejected_token_logps": [-0.5] * 99} for r in rows]
    ref_file = read_reference_file(_write_jsonl(tmp_path / "len.jsonl", tokens))
    with pytest.raises(DataError, match=r"len.jsonl: row 1 \(id 'pair-0'\): field `ref_rejected_token_logps` has 99 values"):
        references_from_file(ref_file, rows, "train")
    cases = {
        "noid.jsonl": ([{"ref_chosen_logps": -1.0, "ref_rejected_logps": -1.0}], r"row 1: field `id` is missing"),
        "nofields.jsonl": ([{"id": "a"}], r"row 1: needs `id` and either"),
        "dup.jsonl": ([sums[0], sums[0]], r"row 2: id 'pair-0' appears twice"),
        "nan.jsonl": ([sums[0], {**sums[1], "ref_rejected_logps": "x"}], r"row 2 \(id 'pair-1'\): field `ref_rejected_logps` must be a finite number"),
        "positive.jsonl": ([{"id": "a", "ref_chosen_token_logps": [0.5], "ref_rejected_token_logps": [-1.0]}],
                           r"row 1 \(id 'a'\): field `ref_chosen_token_logps` must be finite log-probs"),
        "mismatch.jsonl": ([{"id": "a", "ref_chosen_token_logps": [-1.0], "ref_rejected_token_logps": [-1.0],
                             "ref_chosen_logps": -1.0, "ref_rejected_logps": -3.0}],
                           r"row 1 \(id 'a'\): field `ref_rejected_logps` = -3.0 is not the sum"),
    }
    for name, (records, message) in cases.items():
        with pytest.raises(DataError, match=rf"{name}: {message}"):
            read_reference_file(_write_jsonl(tmp_path / name, records))
    (tmp_path / "broken.jsonl").write_text('{"id": "a"\n')
    with pytest.raises(DataError, match=r"broken.jsonl: row 1: not valid JSON"):
        read_reference_file(tmp_path / "broken.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        read_reference_file(tmp_path / "absent.jsonl")
