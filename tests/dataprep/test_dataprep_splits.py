"""Train/held-out split, caps, sources and the fingerprint of load_splits."""

import random

import pytest

from data_prep import load_splits
from data_prep import drops as R
from data_prep.normalize import heldout_by_hash
from dpo_zoo.config import DataConfig, load_config
from dpo_zoo.errors import DataError


def rows(n, start=0):
    return [{"id": f"p{i}", "prompt": f"Question {i}?", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(start, start + n)]


def test_heldout_by_hash_of_the_id_is_deterministic_and_order_free(write_jsonl):
    data = rows(1000)
    loaded = load_splits(DataConfig(train_path=str(write_jsonl("a.jsonl", data)), heldout_fraction=0.1))
    shuffled = data[:]
    random.Random(0).shuffle(shuffled)
    again = load_splits(DataConfig(train_path=str(write_jsonl("b.jsonl", shuffled)), heldout_fraction=0.1))
    assert {p.id for p in loaded.heldout} == {p.id for p in again.heldout}
    assert all(heldout_by_hash(p.id, 0.1) for p in loaded.heldout) and not any(heldout_by_hash(p.id, 0.1) for p in loaded.train)
    # Each id is held out with probability 0.1 (as if drawn): about 100 of 1000, binomial sd 9.5.
    assert 70 <= len(loaded.heldout) <= 130 and len(loaded.train) + len(loaded.heldout) == 1000
    # file order is kept within each split
    assert [p.id for p in loaded.train] == [r["id"] for r in data if r["id"] not in {p.id for p in loaded.heldout}]


def test_no_heldout_when_the_fraction_is_zero(write_jsonl):
    loaded = load_splits(DataConfig(train_path=str(write_jsonl("a.jsonl", rows(50))), heldout_fraction=0.0))
    assert len(loaded.train) == 50 and loaded.heldout == []


def test_heldout_file(write_jsonl):
    train, heldout = write_jsonl("train.jsonl", rows(5)), write_jsonl("test.jsonl", rows(3, start=100))
    loaded = load_splits(DataConfig(train_path=str(train), heldout_path=str(heldout)))
    assert [p.id for p in loaded.train] == ["p0", "p1", "p2", "p3", "p4"]
    assert [p.id for p in loaded.heldout] == ["p100", "p101", "p102"]
    assert loaded.sources == [str(train), str(heldout)]
    assert loaded.drops.rows_read == {str(train): 5, str(heldout): 3}


def test_a_heldout_pair_that_is_also_a_training_pair_is_rejected(write_jsonl):
    train, heldout = write_jsonl("train.jsonl", rows(5)), write_jsonl("test.jsonl", rows(2, start=4))
    with pytest.raises(DataError, match=r"test.jsonl, row 0 \(0-based\), field 'id': duplicate id: id 'p4' is also a training pair"):
        load_splits(DataConfig(train_path=str(train), heldout_path=str(heldout)))
    loaded = load_splits(DataConfig(train_path=str(train), heldout_path=str(heldout), on_bad_row="skip"))
    assert [p.id for p in loaded.heldout] == ["p5"] and loaded.drops.counts == {R.DUPLICATE_ID: 1}


def test_caps_keep_the_first_pairs(write_jsonl):
    train, heldout = write_jsonl("train.jsonl", rows(10)), write_jsonl("test.jsonl", rows(4, start=100))
    loaded = load_splits(DataConfig(train_path=str(train), heldout_path=str(heldout), max_train_pairs=3, max_heldout_pairs=0))
    assert [p.id for p in loaded.train] == ["p0", "p1", "p2"] and loaded.heldout == []
    assert loaded.drops.notes == {
        "pairs beyond data.max_train_pairs=3 (valid, not used)": 7,
        "pairs beyond data.max_heldout_pairs=0 (valid, not used)": 4,
    }
    assert loaded.stats["train_pairs_before_cap"] == 10 and loaded.stats["train_pairs"] == 3
    with pytest.raises(DataError, match="`data.max_train_pairs`: expected null or an integer >= 0"):
        load_splits(DataConfig(train_path=str(train), max_train_pairs=-1))


def test_fingerprint_follows_content_not_location(write_jsonl, tmp_path):
    base = load_splits(DataConfig(train_path=str(write_jsonl("a.jsonl", rows(20))), heldout_fraction=0.2))
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "a.jsonl").write_bytes((tmp_path / "a.jsonl").read_bytes())
    same = load_splits(DataConfig(train_path=str(moved / "a.jsonl"), heldout_fraction=0.2))
    assert same.fingerprint == base.fingerprint and len(base.fingerprint) == 64
    edited = rows(20)
    edited[7]["chosen"] = " good 7!"
    changed = load_splits(DataConfig(train_path=str(write_jsonl("a.jsonl", edited)), heldout_fraction=0.2))
    assert changed.fingerprint != base.fingerprint
    resplit = load_splits(DataConfig(train_path=str(moved / "a.jsonl"), heldout_fraction=0.5))
    assert resplit.fingerprint != base.fingerprint
    tie = rows(20)
    tie[3]["tie"] = True
    assert load_splits(DataConfig(train_path=str(write_jsonl("a.jsonl", tie)), heldout_fraction=0.2)).fingerprint != base.fingerprint


def test_accepts_the_loaded_read_only_config(write_jsonl):
    path = write_jsonl("a.jsonl", rows(10))
    cfg = load_config(overrides=[f"data.train_path={path}", "data.heldout_fraction=0.3", "data.columns={}", "data.on_bad_row=skip"])
    from_node = load_splits(cfg.data)
    from_dataclass = load_splits(DataConfig(train_path=str(path), heldout_fraction=0.3, on_bad_row="skip"))
    assert from_node.fingerprint == from_dataclass.fingerprint


def test_setting_errors(write_jsonl):
    with pytest.raises(DataError, match="`data.preprocessor`: 'csv' is not one of generic, hh_rlhf, ultrafeedback, vader"):
        load_splits(DataConfig(preprocessor="csv", train_path="x"))
    with pytest.raises(DataError, match=r"`data.train_path` \(or `data.hub.path`\): required by the generic preprocessor"):
        load_splits(DataConfig())
    with pytest.raises(DataError, match=r"`data.heldout_fraction`: must be in \[0, 1\)"):
        load_splits(DataConfig(train_path=str(write_jsonl("a.jsonl", rows(2))), heldout_fraction=1.0))
    with pytest.raises(DataError, match="`data.options.train_split`: expected a split name"):
        load_splits(DataConfig(train_path=str(write_jsonl("a.jsonl", rows(2))), options={"train_split": 3}))
