"""The ultrafeedback preprocessor, on small files written in the UltraFeedback-binarized schema."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import load_splits
from data_prep import drops as R
from dpo_zoo.config import DataConfig
from dpo_zoo.errors import DataError


def uf_row(i, prompt, good, bad, score_chosen=8.0, score_rejected=4.0):
    user = {"role": "user", "content": prompt}
    chosen = [user, {"role": "assistant", "content": good}]
    return {
        "prompt": prompt,
        "prompt_id": f"pid{i}",
        "chosen": chosen,
        "rejected": [user, {"role": "assistant", "content": bad}],
        "messages": chosen,
        "score_chosen": score_chosen,
        "score_rejected": score_rejected,
    }


ROWS = [
    uf_row(0, "Name a prime.", "7", "8"),
    uf_row(1, "Capital of France?", "Paris.", "Lyon.", 7.5, 7.5),
    uf_row(2, "2+2?", "4", "5", 9.0, 2.0),
]


def write_parquet(tmp_path, rows, name="train_prefs.parquet"):
    path = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def cfg(path, **kw):
    return DataConfig(preprocessor="ultrafeedback", train_path=str(path), heldout_fraction=0.0, **kw)


def test_reads_the_binarized_layout(tmp_path):
    loaded = load_splits(cfg(write_parquet(tmp_path, ROWS)))
    first, tie, third = loaded.train
    assert first.prompt == [{"role": "user", "content": "Name a prime."}]
    assert first.chosen == [{"role": "assistant", "content": "7"}] and first.rejected == [{"role": "assistant", "content": "8"}]
    assert first.id == "train_prefs:0" and first.extra["prompt_id"] == "pid0"
    assert first.extra["score_chosen"] == 8.0 and first.extra["score_rejected"] == 4.0
    assert [p.is_tie for p in loaded.train] == [False, True, False]  # equal scores are a tie
    assert third.soft_label is None and third.weight == 1.0


def test_responses_only_take_the_prompt_column(write_jsonl):
    row = {"prompt": "Hi?", "chosen": [{"role": "assistant", "content": "Hello"}], "rejected": [{"role": "assistant", "content": "Bye"}], "score_chosen": 5, "score_rejected": 1}
    pair = load_splits(cfg(write_jsonl("uf.jsonl", [row]))).train[0]
    assert pair.prompt == [{"role": "user", "content": "Hi?"}] and pair.chosen == row["chosen"]


@pytest.mark.parametrize(
    "change, reason, field",
    [
        ({"score_chosen": 2.0, "score_rejected": 6.0}, R.BAD_VALUE, "score_chosen"),
        ({"score_chosen": None}, R.MISSING_FIELD, "score_chosen"),
        ({"score_rejected": "high"}, R.WRONG_TYPE, "score_rejected"),
        ({"rejected": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}]}, R.IDENTICAL, "rejected"),
        ({"chosen": "7"}, R.WRONG_TYPE, "chosen"),
    ],
)
def test_bad_rows(write_jsonl, change, reason, field):
    path = write_jsonl("uf.jsonl", [ROWS[1], ROWS[0] | change])
    with pytest.raises(DataError, match=rf"row 1 \(0-based\), field '{field}': {reason}"):
        load_splits(cfg(path))
    loaded = load_splits(cfg(path, on_bad_row="skip"))
    assert loaded.drops.counts == {reason: 1} and len(loaded.train) == 1


def test_heldout_split_keeps_a_prompt_on_one_side(tmp_path):
    """Several rows of one prompt_id all land in the same split (it hashes prompt_id, not the row id)."""
    rows = [uf_row(i // 3, f"prompt {i // 3}", f"good {i}", f"bad {i}") for i in range(300)]
    loaded = load_splits(DataConfig(preprocessor="ultrafeedback", train_path=str(write_parquet(tmp_path, rows)), heldout_fraction=0.3))
    train_ids = {p.extra["prompt_id"] for p in loaded.train}
    heldout_ids = {p.extra["prompt_id"] for p in loaded.heldout}
    assert train_ids and heldout_ids and not train_ids & heldout_ids
    assert len(train_ids) + len(heldout_ids) == 100


def test_dataset_dict_with_train_prefs_and_test_prefs(tmp_path):
    import datasets

    folder = tmp_path / "ultrafeedback_binarized"
    datasets.DatasetDict({
        "train_prefs": datasets.Dataset.from_list(ROWS),
        "test_prefs": datasets.Dataset.from_list([uf_row(9, "Largest ocean?", "Pacific.", "Atlantic.")]),
        "train_sft": datasets.Dataset.from_list([{"x": 1}]),
    }).save_to_disk(str(folder))
    loaded = load_splits(cfg(folder, heldout_path=str(folder)))
    assert [p.id for p in loaded.train] == ["ultrafeedback_binarized/train_prefs:0", "ultrafeedback_binarized/train_prefs:1", "ultrafeedback_binarized/train_prefs:2"]
    assert [p.id for p in loaded.heldout] == ["ultrafeedback_binarized/test_prefs:0"]
    assert any("test_prefs" in s for s in loaded.sources) and any("train_prefs" in s for s in loaded.sources)
    # Naming a split without the needed columns is one clear error.
    with pytest.raises(DataError, match=r"\[train_sft\]: no column 'chosen', 'rejected', 'score_chosen', 'score_rejected'"):
        load_splits(cfg(folder, options={"train_split": "train_sft"}))
