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
    ({"prompt": "Q?", "chosen": 5, "rejected": " no"}, R.WRONG_TYPE, "chosen", "got int 5"),
    ({"prompt": "Q?", "chosen": [{"role": "assistant"}], "rejected": " no"}, R.WRONG_TYPE, "chosen", "message 0 has no string 'content'"),
    ({"prompt": "Q?", "chosen": ["hi"], "rejected": " no"}, R.WRONG_TYPE, "chosen", "message 0 is not an object"),
    ({"prompt": "Q?", "chosen": [], "rejected": " no"}, R.EMPTY_COMPLETION, "chosen", "message list is empty"),
    ({"prompt": [MSG("user", "Q?")], "chosen": [MSG("assistant", "a")], "rejected": []}, R.EMPTY_COMPLETION, "rejected",
     "message list is empty"),
    ({"prompt": [MSG("narrator", "Once upon a time"), MSG("user", "Q?")], "chosen": [MSG("assistant", "a")],
      "rejected": [MSG("assistant", "b")]}, R.BAD_ROLE, "prompt", "message 0 has role 'narrator'; a role is one of "
                                                                 "system, user, assistant, tool"),
    ({"prompt": [MSG("user", "Q?")], "chosen": [MSG("assistant", "a"), MSG("critic", "good")],
      "rejected": [MSG("assistant", "b")]}, R.BAD_ROLE, "chosen", "message 1 has role 'critic'"),
    ({"prompt": "Q?", "chosen": [MSG("assistant", "a")], "rejected": " no"}, R.MIXED_FORMATS, "rejected", "chosen is a message list but rejected is a string"),
    ({"prompt": "Q?", "chosen": "  \n", "rejected": " no"}, R.EMPTY_COMPLETION, "chosen", "the completion is empty"),
    ({"prompt": [MSG("user", "Q?")], "chosen": [MSG("assistant", " ")], "rejected": [MSG("assistant", "no")]}, R.EMPTY_COMPLETION, "chosen", "empty"),
    ({"prompt": "Q?", "chosen": " same", "rejected": " same"}, R.IDENTICAL, "rejected", "identical to chosen"),
    ({**GOOD, "weight": -1}, R.BAD_VALUE, "weight", "finite number >= 0"),
    ({**GOOD, "weight": "heavy"}, R.WRONG_TYPE, "weight", "got str"),
    ({**GOOD, "tie": "maybe"}, R.WRONG_TYPE, "tie", "true/false"),
    ({**GOOD, "tie": 2}, R.BAD_VALUE, "tie", "true/false"),
    ({**GOOD, "soft_label": 1.5}, R.BAD_VALUE, "soft_label", "[0, 1]"),
    ({**GOOD, "soft_label": "likely"}, R.WRONG_TYPE, "soft_label", "[0, 1]"),
    ({**GOOD, "id": {"a": 1}}, R.WRONG_TYPE, "id", "string or integer id"),
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
        {"prompt": "Q?", "chosen": 3.5, "rejected": " no"},  # 5 wrong type
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
        R.WRONG_TYPE: 1,
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
        (5, "chosen", R.WRONG_TYPE),
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
    path = write_jsonl("d.jsonl", [{"prompt": "Q?", "chosen": " a", "rejected": " a"}])
    with pytest.raises(DataError, match=r"no training pairs left.\ndropped 1 rows of 1 read"):
        load_splits(cfg(path, on_bad_row="skip"))


def test_columns_are_renamed_and_named_as_in_the_file(write_jsonl):
    path = write_jsonl("d.jsonl", [{"question": "Q?", "good": " a", "bad": " b", "key": 7, "draw": True, "w": 0.5, "p": 0.6}])
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad", "id": "key", "tie": "draw", "weight": "w", "soft_label": "p"}
    pair = load_splits(cfg(path, columns=columns)).train[0]
    assert (pair.id, pair.prompt, pair.chosen, pair.rejected, pair.is_tie, pair.weight, pair.soft_label) == ("7", "Q?", " a", " b", True, 0.5, 0.6)
    bad = write_jsonl("e.jsonl", [{"question": "Q?", "good": 1, "bad": " b"}])
    with pytest.raises(DataError, match=r"field 'good \(as chosen\)': wrong type"):
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
    with pytest.raises(DataError, match=r"heldout.jsonl: read 0 rows from this file: it holds no data"):
        load_splits(DataConfig(train_path=str(write_jsonl("t.jsonl", [GOOD])), heldout_path=str(empty)))


# ---------------------------------------------------------------- problems of a whole file or column


def test_every_drop_reason_is_listed_in_the_readme():
    from dpo_zoo.config import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    reasons = {v for k, v in vars(R).items() if k.isupper() and isinstance(v, str) and k != "ON_BAD_ROW"}
    assert reasons == set(R.REASONS)
    assert [r for r in R.REASONS if f"`{r}`" not in readme] == []


def _parquet(path, rows=None, table=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(table if table is not None else pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("on_bad_row", ["error", "skip"])
def test_a_parquet_column_of_the_wrong_type_is_one_error_naming_it(tmp_path, on_bad_row):
    import pyarrow as pa

    path = _parquet(tmp_path / "d.parquet", table=pa.table({"prompt": ["Q1", "Q2", "Q3"], "chosen": [1, 2, 3],
                                                            "rejected": [" a", " b", " c"]}))
    with pytest.raises(DataError) as err:
        load_splits(cfg(path, on_bad_row=on_bad_row))
    assert str(err.value).startswith(f"{path}: column 'chosen' has type int64 for the whole file; the generic "
                                     "preprocessor reads it as text (a string, or a list of {role, content} messages): "
                                     "wrong type for the whole file"), str(err.value)
    renamed = _parquet(tmp_path / "e.parquet", table=pa.table({"q": ["Q"], "good": [" a"], "bad": [" b"], "w": ["x"]}))
    with pytest.raises(DataError, match=r"column 'w \(as weight\)' has type string for the whole file; .* a number"):
        load_splits(cfg(renamed, columns={"prompt": "q", "chosen": "good", "rejected": "bad", "weight": "w"}))


def test_a_required_parquet_column_null_throughout_is_one_error(tmp_path):
    import pyarrow as pa

    path = _parquet(tmp_path / "d.parquet", table=pa.table({"prompt": ["Q1", "Q2"], "chosen": [" a", " b"],
                                                            "rejected": pa.array([None, None], pa.null())}))
    with pytest.raises(DataError, match=r"d.parquet: column 'rejected' is null in every row \(type null\).*missing field"):
        load_splits(cfg(path, on_bad_row="skip"))
    # An optional column that is null throughout is just absent values.
    ok = _parquet(tmp_path / "e.parquet", table=pa.table({"chosen": [" a"], "rejected": [" b"], "prompt": ["Q"],
                                                          "weight": pa.array([None], pa.null())}))
    assert load_splits(cfg(ok)).train[0].weight == 1.0


def test_ultrafeedback_with_string_completions_is_one_error(tmp_path):
    path = _parquet(tmp_path / "uf.parquet", [{"prompt": "Q", "chosen": "a", "rejected": "b", "score_chosen": 2.0,
                                               "score_rejected": 1.0}])
    with pytest.raises(DataError, match=r"column 'chosen' has type string for the whole file; the ultrafeedback "
                                        r"preprocessor reads it as a list of \{role, content\} messages"):
        load_splits(cfg(path, preprocessor="ultrafeedback"))


def test_a_jsonl_file_with_no_rejected_at_all_is_one_error_naming_the_column(write_jsonl):
    path = write_jsonl("d.jsonl", [{"prompt": f"Q{i}?", "chosen": " yes"} for i in range(4)])
    with pytest.raises(DataError) as err:
        load_splits(cfg(path, on_bad_row="skip"))
    message = str(err.value)
    assert message.startswith(f"{path}: column 'rejected': missing field in every row (4 of 4; the first: required "
                              "field is missing); a problem of the whole file"), message
    assert "no training pairs left" not in message
    # The same field bad in only some rows: those rows are dropped, the others kept.
    mixed = write_jsonl("e.jsonl", [{"prompt": "Q?", "chosen": " yes"}, GOOD, {"prompt": "Q?", "chosen": " ok"}])
    loaded = load_splits(cfg(mixed, on_bad_row="skip"))
    assert len(loaded.train) == 1 and loaded.drops.counts == {R.MISSING_FIELD: 2}


def test_a_jsonl_column_of_numbers_throughout_is_one_error(write_jsonl):
    path = write_jsonl("d.jsonl", [{"prompt": "Q?", "chosen": i, "rejected": " no"} for i in range(3)])
    with pytest.raises(DataError, match=r"d.jsonl: column 'chosen': wrong type in every row \(3 of 3; the first: "
                                        r"expected a string or a list of \{role, content\} messages, got int 0\)"):
        load_splits(cfg(path, on_bad_row="skip"))


@pytest.mark.parametrize("content", [b"", b"\n\n"])
def test_an_empty_training_file_says_it_read_0_rows(tmp_path, content):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"^{path}: read 0 rows from this file: it holds no data$"):
        load_splits(cfg(path))


def test_an_empty_parquet_file_says_it_read_0_rows(tmp_path):
    import pyarrow as pa

    path = _parquet(tmp_path / "d.parquet", table=pa.table({"chosen": pa.array([], pa.string()),
                                                            "rejected": pa.array([], pa.string())}))
    with pytest.raises(DataError, match=r"d.parquet: read 0 rows from this file"):
        load_splits(cfg(path))


# ---------------------------------------------------------------- exact duplicate rows


def test_exact_duplicate_rows_are_counted_and_reported_as_a_warning(write_jsonl):
    other = {"prompt": "Q2?", "chosen": " yes", "rejected": " no"}
    path = write_jsonl("d.jsonl", [GOOD, other, GOOD, GOOD, GOOD | {"weight": 0.5}])
    loaded = load_splits(cfg(path))
    assert len(loaded.train) == 5  # kept: ids differ (file:row), so nothing else objects
    assert loaded.warnings == [f"{path}: 2 rows are exact copies of earlier rows (kept; set "
                               "data.drop_duplicate_rows=true to drop them)"]
    assert loaded.drops.notes == {"exact duplicate rows, kept (data.drop_duplicate_rows=true drops them)": 2}
    assert loaded.drops.total == 0


def test_exact_duplicate_rows_are_dropped_on_request_naming_the_first(write_jsonl, tmp_path):
    train = write_jsonl("t.jsonl", [GOOD, GOOD | {"id": "a"}, GOOD, GOOD | {"id": "a"}])
    heldout = write_jsonl("h.jsonl", [GOOD | {"id": "h"}, GOOD])  # row 1 copies a training row
    loaded = load_splits(DataConfig(train_path=str(train), heldout_path=str(heldout), drop_duplicate_rows=True))
    assert [p.id for p in loaded.train] == ["t:0", "a"] and [p.id for p in loaded.heldout] == ["h"]
    assert [(d["file"], d["row"], d["reason"], d["detail"]) for d in loaded.drops.rows] == [
        (str(train), 2, R.DUPLICATE_ROW, f"the same as {train}, row 0"),
        (str(train), 3, R.DUPLICATE_ROW, f"the same as {train}, row 1"),
        (str(heldout), 1, R.DUPLICATE_ROW, f"the same as {train}, row 0"),
    ]
    assert loaded.warnings == [] and loaded.drops.rows_read == {str(train): 4, str(heldout): 2}
