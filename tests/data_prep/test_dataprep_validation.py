"""Every bad-row reason: named precisely with on_bad_row=error, counted exactly with skip."""

import json

import pytest

from data_prep import DropReport, load_splits
from data_prep import drops as R
from data_prep.normalize import split_implicit
from dpo_zoo.config import DataConfig
from dpo_zoo.errors import DataError

GOOD = {"prompt": "Q?", "chosen": " yes", "rejected": " no"}
MSG = lambda role, content: {"role": role, "content": content}  # noqa: E731


def cfg(path, **kw):
    return DataConfig(train_path=str(path), heldout_fraction=0.0, **kw)


# (row, reason, field, a piece of the message) for each kind of bad row
BAD_ROWS = [
    ({"prompt": "Q?", "rejected": " no"}, R.MISSING_FIELD, "chosen", "required field is missing"),
    ({"prompt": "Q?", "chosen": None, "rejected": " no"}, R.MISSING_FIELD, "chosen", "required field is null"),
    ({"prompt": "Q?", "chosen": 5, "rejected": " no"}, R.NOT_TEXT, "chosen", "got int 5"),
    ({"prompt": "Q?", "chosen": [{"role": "assistant"}], "rejected": " no"}, R.NOT_TEXT, "chosen", "message 0 has no string 'content'"),
    ({"prompt": "Q?", "chosen": ["hi"], "rejected": " no"}, R.NOT_TEXT, "chosen", "message 0 is not an object"),
    ({"prompt": "Q?", "chosen": [], "rejected": " no"}, R.NOT_TEXT, "chosen", "message list is empty"),
    ({"prompt": "Q?", "chosen": [MSG("assistant", "a")], "rejected": " no"}, R.MIXED_FORMATS, "rejected", "chosen is a message list but rejected is a string"),
    ({"prompt": "Q?", "chosen": "  \n", "rejected": " no"}, R.EMPTY_COMPLETION, "chosen", "the completion is empty"),
    ({"prompt": [MSG("user", "Q?")], "chosen": [MSG("assistant", " ")], "rejected": [MSG("assistant", "no")]}, R.EMPTY_COMPLETION, "chosen", "empty"),
    ({"prompt": "Q?", "chosen": " same", "rejected": " same"}, R.IDENTICAL, "rejected", "identical to chosen"),
    ({**GOOD, "weight": -1}, R.BAD_VALUE, "weight", "finite number >= 0"),
    ({**GOOD, "weight": "heavy"}, R.BAD_VALUE, "weight", "got str"),
    ({**GOOD, "tie": "maybe"}, R.BAD_VALUE, "tie", "true/false"),
    ({**GOOD, "soft_label": 1.5}, R.BAD_VALUE, "soft_label", "[0, 1]"),
    ({**GOOD, "id": {"a": 1}}, R.BAD_VALUE, "id", "string or integer id"),
    ({"chosen": [MSG("user", "Hi")], "rejected": [MSG("user", "Hi"), MSG("assistant", "Yo")]}, R.EMPTY_COMPLETION, "chosen", "once the shared prompt is split off"),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi\n\nAssistant: Yo"}, R.EMPTY_COMPLETION, "chosen", "once the shared prompt"),
    ({**GOOD, "weight": 1e39}, R.BAD_VALUE, "weight", "float32"),  # would be inf in the float32 cache
    ({"chosen": "Tell me a joke.", "rejected": "Why is the sky blue?"}, R.NO_SHARED_PROMPT, "rejected", "share no prompt"),
    ({"chosen": [MSG("user", "A?"), MSG("assistant", "x")], "rejected": [MSG("user", "B?"), MSG("assistant", "y")]},
     R.NO_SHARED_PROMPT, "rejected", "share no prompt"),
    ({"prompt": [MSG("user", "Q?")], "chosen": [MSG("user", "x")], "rejected": [MSG("assistant", "no")]},
     R.NOT_A_COMPLETION, "chosen", "expected 'assistant' first"),
    ({"prompt": [MSG("user", "Q?")], "chosen": [MSG("assistant", "a"), MSG("user", "b"), MSG("assistant", "c")],
      "rejected": [MSG("assistant", "no")]}, R.NOT_A_COMPLETION, "chosen", "no 'user' turn"),
]


@pytest.mark.parametrize("row, reason, field, text", BAD_ROWS, ids=[f"{r[1]}-{i}" for i, r in enumerate(BAD_ROWS)])
def test_each_bad_row_is_an_error_naming_file_row_and_field(write_jsonl, row, reason, field, text):
    path = write_jsonl("d.jsonl", [GOOD, GOOD | {"id": "second"}, row])
    with pytest.raises(DataError) as err:
        load_splits(cfg(path))
    message = str(err.value)
    assert message.startswith(f"{path}, row 2 (0-based), field '{field}': {reason}"), message
    assert text in message and "on_bad_row=skip" in message


@pytest.mark.parametrize(
    "line, reason",
    [(b'{"chosen": " a", "rejected": " \xff"}', R.UNDECODABLE), (b'{"chosen": " a", ', R.MALFORMED_JSON), (b'"just a string"', R.NOT_AN_OBJECT),
     (b"[" * 100_000 + b"]" * 100_000, R.MALFORMED_JSON),  # nesting beyond the parser's recursion limit
     (b'{"chosen": " a", "rejected": " b", "weight": 1' + b"0" * 5000 + b"}", R.MALFORMED_JSON)],  # 5001-digit integer
)
def test_unreadable_lines_are_errors_naming_file_and_row(write_jsonl, line, reason):
    path = write_jsonl("d.jsonl", [GOOD, line])
    with pytest.raises(DataError, match=rf"d.jsonl, row 1 \(0-based\): {reason}"):
        load_splits(cfg(path))


def test_duplicate_id_names_both_rows(write_jsonl):
    path = write_jsonl("d.jsonl", [GOOD | {"id": "a"}, GOOD | {"id": "b"}, GOOD | {"id": "a"}])
    with pytest.raises(DataError, match=r"row 2 \(0-based\), field 'id': duplicate id: id 'a' is already used by row 0"):
        load_splits(cfg(path))


def test_known_mix_of_bad_rows_is_counted_exactly(write_jsonl, tmp_path):
    """12 rows: 5 good, 7 bad of 6 reasons; the drop report accounts for every one."""
    rows = [
        GOOD | {"id": "g0"},
        {"prompt": "Q?", "rejected": " no"},  # 1 missing field
        b'{"prompt": "Q?", "chosen": " \xc3\x28", "rejected": " no"}',  # 2 undecodable (invalid UTF-8)
        GOOD | {"id": "g1", "chosen": " sure"},
        b"{not json}",  # 4 malformed JSON
        {"prompt": "Q?", "chosen": 3.5, "rejected": " no"},  # 5 not text
        {"prompt": "Q?", "chosen": " ", "rejected": " no"},  # 6 empty completion
        GOOD | {"id": "g2", "chosen": " ok"},
        {"prompt": "Q?", "chosen": " x", "rejected": " x"},  # 8 identical
        GOOD | {"id": "g1"},  # 9 duplicate id
        {"prompt": "Q?", "chosen": [MSG("assistant", "x")], "rejected": " y"},  # 10 mixed formats
        GOOD | {"id": "g3", "chosen": " fine"},
        b"",  # blank line: not a row
        GOOD | {"id": "g4", "chosen": " great"},
    ]
    path = write_jsonl("mix.jsonl", rows)
    loaded = load_splits(cfg(path, on_bad_row="skip"))
    assert [p.id for p in loaded.train] == ["g0", "g1", "g2", "g3", "g4"]
    drops = loaded.drops
    assert drops.counts == {
        R.MISSING_FIELD: 1,
        R.UNDECODABLE: 1,
        R.MALFORMED_JSON: 1,
        R.NOT_TEXT: 1,
        R.EMPTY_COMPLETION: 1,
        R.IDENTICAL: 1,
        R.DUPLICATE_ID: 1,
        R.MIXED_FORMATS: 1,
    }
    assert drops.total == 8 and drops.rows_read == {str(path): 13}
    assert len(loaded.train) + drops.total == 13
    assert [(d["row"], d["field"], d["reason"]) for d in drops.rows] == [
        (1, "chosen", R.MISSING_FIELD),
        (2, None, R.UNDECODABLE),
        (4, None, R.MALFORMED_JSON),
        (5, "chosen", R.NOT_TEXT),
        (6, "chosen", R.EMPTY_COMPLETION),
        (8, "rejected", R.IDENTICAL),
        (9, "id", R.DUPLICATE_ID),
        (10, "rejected", R.MIXED_FORMATS),
    ]
    assert all(d["file"] == str(path) for d in drops.rows)
    summary = drops.summary()
    assert summary.startswith("dropped 8 rows of 13 read (61.54%)") and "duplicate id" in summary
    written = json.loads(drops.write(tmp_path / "out" / "drops.json").read_text())
    assert written["total"] == 8 and written["counts"] == drops.counts and len(written["dropped"]) == 8


def test_no_pair_left_is_an_error_with_the_summary(write_jsonl):
    path = write_jsonl("d.jsonl", [{"chosen": 1, "rejected": 2}])
    with pytest.raises(DataError, match=r"no training pairs left.\ndropped 1 rows of 1 read"):
        load_splits(cfg(path, on_bad_row="skip"))


def test_columns_are_renamed_and_named_as_in_the_file(write_jsonl):
    path = write_jsonl("d.jsonl", [{"question": "Q?", "good": " a", "bad": " b", "key": 7, "draw": True, "w": 0.5, "p": 0.6}])
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad", "id": "key", "tie": "draw", "weight": "w", "soft_label": "p"}
    pair = load_splits(cfg(path, columns=columns)).train[0]
    assert (pair.id, pair.prompt, pair.chosen, pair.rejected, pair.is_tie, pair.weight, pair.soft_label) == ("7", "Q?", " a", " b", True, 0.5, 0.6)
    bad = write_jsonl("e.jsonl", [{"question": "Q?", "good": 1, "bad": " b"}])
    with pytest.raises(DataError, match=r"field 'good \(as chosen\)': not text"):
        load_splits(cfg(bad, columns=columns))
    with pytest.raises(DataError, match=r"`data.columns.answer`: not a field the generic preprocessor reads"):
        load_splits(cfg(path, columns={"answer": "good"}))


def test_missing_column_of_a_parquet_file_is_one_error_not_every_row_dropped(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "Q", "good": " a", "bad": " b"}] * 3), path)
    with pytest.raises(DataError, match=r"no column 'gooood' \(as chosen\) for the generic preprocessor; the columns are question, good, bad"):
        load_splits(cfg(path, on_bad_row="skip", columns={"prompt": "question", "chosen": "gooood", "rejected": "bad"}))


def test_default_id_is_file_stem_and_row(write_jsonl):
    path = write_jsonl("my-data.jsonl.gz", [GOOD, b"", GOOD | {"chosen": " yep"}])
    assert [p.id for p in load_splits(cfg(path)).train] == ["my-data:0", "my-data:2"]


def test_optional_fields_defaults_and_forms(write_jsonl):
    path = write_jsonl("d.jsonl", [GOOD, GOOD | {"id": 3, "tie": 1, "weight": 2, "soft_label": 0}])
    first, second = load_splits(cfg(path)).train
    assert (first.is_tie, first.weight, first.soft_label) == (False, 1.0, None)
    assert (second.id, second.is_tie, second.weight, second.soft_label) == ("3", True, 2.0, 0.0)


def test_implicit_prompt_of_strings():
    # HH-style text: the prompt ends right after the last "\n\nAssistant:" the two share.
    hh_c = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant: Sure, here"
    hh_r = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant: Sure, no"
    assert split_implicit(hh_c, hh_r) == ("\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant:", " Sure, here", " Sure, no")
    # Plain text: never inside a word; the completion keeps its leading space.
    assert split_implicit("I like cats", "I like cars") == ("I like", " cats", " cars")
    assert split_implicit("The answer is yes", "The answer is no") == ("The answer is", " yes", " no")
    assert split_implicit("cats", "cars") == ("", "cats", "cars")


def test_implicit_prompt_of_messages(write_jsonl):
    shared = [MSG("system", "Be kind."), MSG("user", "Hi")]
    path = write_jsonl("d.jsonl", [{"chosen": shared + [MSG("assistant", "Hello!")], "rejected": shared + [MSG("assistant", "What?")]}])
    pair = load_splits(cfg(path)).train[0]
    assert pair.prompt == shared and pair.chosen == [MSG("assistant", "Hello!")] and pair.rejected == [MSG("assistant", "What?")]
    assert pair.conversational


def test_extra_message_keys_are_kept(write_jsonl):
    chosen = [{"role": "assistant", "content": "a", "name": "bot"}]
    path = write_jsonl("d.jsonl", [{"prompt": [MSG("user", "q")], "chosen": chosen, "rejected": [MSG("assistant", "b")]}])
    assert load_splits(cfg(path)).train[0].chosen == chosen


def test_drop_report_api():
    report = DropReport()
    assert report.total == 0 and report.counts == {} and report.summary() == "no rows dropped"
    report.add("f.jsonl", 3, "chosen", R.EMPTY_COMPLETION, "x" * 1000)
    report.add("f.jsonl", 5, None, R.MALFORMED_JSON)
    report.add("f.jsonl", 7, "chosen", R.EMPTY_COMPLETION)
    report.note("prompt sides truncated to max_prompt_length", 4)
    report.note("nothing", 0)
    assert report.counts == {R.EMPTY_COMPLETION: 2, R.MALFORMED_JSON: 1} and report.total == 3
    assert len(report.rows[0]["detail"]) == 300  # long details are shortened
    as_json = report.to_json()
    assert as_json["notes"] == {"prompt sides truncated to max_prompt_length": 4}
    assert as_json["dropped"][1] == {"file": "f.jsonl", "row": 5, "field": None, "reason": R.MALFORMED_JSON, "detail": ""}


def test_on_bad_row_must_be_known(write_jsonl):
    with pytest.raises(DataError, match="`data.on_bad_row`: 'ignore' is not one of error, skip"):
        load_splits(cfg(write_jsonl("d.jsonl", [GOOD]), on_bad_row="ignore"))


def test_lone_surrogate_is_undecodable_text_naming_the_field(write_jsonl):
    """``"\\ud800"`` is valid JSON but not Unicode text: a bad row, never a crash further on."""
    line = b'{"prompt": "Q?", "chosen": " a \\ud800", "rejected": " no"}'
    path = write_jsonl("d.jsonl", [GOOD, line])
    with pytest.raises(DataError, match=r"row 1 \(0-based\), field 'chosen': undecodable text: .*lone surrogate"):
        load_splits(cfg(path))
    loaded = load_splits(cfg(path, on_bad_row="skip"))
    assert len(loaded.train) == 1 and loaded.drops.counts == {R.UNDECODABLE: 1}


def test_a_column_named_in_data_columns_must_exist(write_jsonl):
    path = write_jsonl("d.jsonl", [{"chosen": " yes", "rejected": " no", "text": "Q?"}])
    with pytest.raises(DataError, match=r"field 'question \(as prompt\)': missing field: column named by data.columns.prompt"):
        load_splits(cfg(path, columns={"prompt": "question"}))
    with pytest.raises(DataError, match=r"field 'w \(as weight\)'"):
        load_splits(cfg(path, columns={"prompt": "text", "weight": "w"}))


def test_an_empty_heldout_file_is_an_error(write_jsonl, tmp_path):
    empty = tmp_path / "heldout.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"heldout.jsonl: no held-out pairs left"):
        load_splits(DataConfig(train_path=str(write_jsonl("t.jsonl", [GOOD])), heldout_path=str(empty)))
