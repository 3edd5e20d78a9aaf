"""Every input format yields the same rows, numbered from 0, and unreadable input is named."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.drops import MALFORMED_JSON, NOT_AN_OBJECT, UNDECODABLE, BadRow
from data_prep.readers import file_stem, open_rows
from dpo_zoo.errors import DataError

ROWS = [
    {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."},
    {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}], "rejected": [{"role": "assistant", "content": "Go away"}]},
]


def _rows(path, **kw):
    return list(open_rows(path, **kw).rows)


def test_jsonl_plain_and_gzip_give_the_same_rows(write_jsonl):
    for name in ("d.jsonl", "d.jsonl.gz"):
        path = write_jsonl(name, ROWS)
        assert _rows(path) == [(0, ROWS[0]), (1, ROWS[1])]
        assert open_rows(path).stem == "d"


def test_gzip_is_recognised_by_its_bytes_not_its_name(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(gzip.compress(json.dumps(ROWS[0]).encode() + b"\n"))
    assert _rows(path) == [(0, ROWS[0])]


def test_jsonl_blank_lines_keep_the_numbering_of_lines(write_jsonl):
    path = write_jsonl("d.jsonl", [ROWS[0], b"", b"   ", ROWS[1]])
    assert [row for row, _ in _rows(path)] == [0, 3]


def test_jsonl_bad_lines_are_bad_rows_not_a_failed_file(write_jsonl):
    path = write_jsonl("d.jsonl", [ROWS[0], b'{"chosen": "a", "rejected": "b\xff\xfe"}', b'{"chosen": ', b"[1, 2]", ROWS[1]])
    rows = _rows(path)
    assert [r for r, _ in rows] == [0, 1, 2, 3, 4]
    assert rows[0][1] == ROWS[0] and rows[4][1] == ROWS[1]
    assert [(v.reason, v.field) for _, v in rows[1:4]] == [(UNDECODABLE, None), (MALFORMED_JSON, None), (NOT_AN_OBJECT, None)]
    assert "byte" in rows[1][1].detail and "column" in rows[2][1].detail


def test_jsonl_byte_order_mark_is_not_data(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\n")
    assert _rows(path) == [(0, ROWS[0])]


def test_truncated_gzip_is_a_named_error(tmp_path, write_jsonl):
    whole = write_jsonl("d.jsonl.gz", ROWS * 50).read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="cut.jsonl.gz: cannot read the file"):
        _rows(cut)


def test_corrupt_gzip_is_a_named_error(tmp_path, write_jsonl):
    whole = bytearray(write_jsonl("d.jsonl.gz", ROWS * 50).read_bytes())
    whole[40:60] = bytes(20)  # damage the deflate stream, keep the header
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(bytes(whole))
    with pytest.raises(DataError, match="bad.jsonl.gz: cannot read the file"):
        _rows(bad)


@pytest.mark.parametrize("layout", ["list", "data"])
def test_json_list_or_data_object(tmp_path, layout):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS if layout == "list" else {"data": ROWS}))
    assert _rows(path) == [(0, ROWS[0]), (1, ROWS[1])]


def test_json_items_that_are_not_objects_are_bad_rows(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ROWS[0], "oops"]))
    rows = _rows(path)
    assert rows[0] == (0, ROWS[0]) and isinstance(rows[1][1], BadRow) and rows[1][1].reason == NOT_AN_OBJECT


def test_json_that_is_really_json_lines_is_read_as_such(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    assert _rows(path) == [(0, ROWS[0]), (1, ROWS[1])]


def test_broken_json_document_names_file_line_and_column(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"chosen": "a",\n "rejected": }\n]')
    with pytest.raises(DataError, match=r"d.json: malformed JSON at line 3, column 14"):
        _rows(path)
    path.write_text('{"rows": []}')
    with pytest.raises(DataError, match="expected a JSON list of objects"):
        _rows(path)


def test_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    # Two layouts cannot share one Parquet column type; write the conversational one.
    pq.write_table(pa.Table.from_pylist([ROWS[1]] * 3), path, row_group_size=2)
    source = open_rows(path)
    assert source.column_names == ["prompt", "chosen", "rejected"]
    assert list(source.rows) == [(0, ROWS[1]), (1, ROWS[1]), (2, ROWS[1])]


def test_not_parquet_is_a_named_error(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_text("not parquet")
    with pytest.raises(DataError, match="d.parquet: not a readable Parquet file"):
        _rows(path)


def test_saved_dataset_and_dataset_dict(tmp_path):
    import datasets

    single = datasets.Dataset.from_list([ROWS[1]] * 2)
    single.save_to_disk(str(tmp_path / "single"))
    source = open_rows(tmp_path / "single")
    assert list(source.rows) == [(0, ROWS[1]), (1, ROWS[1])]
    assert any(f.endswith(".arrow") for f in source.files)

    both = datasets.DatasetDict({"train_prefs": single, "test_prefs": datasets.Dataset.from_list([ROWS[1]])})
    both.save_to_disk(str(tmp_path / "dd"))
    train = open_rows(tmp_path / "dd", role="train")
    assert train.name.endswith("[train_prefs]") and train.stem == "dd/train_prefs" and len(list(train.rows)) == 2
    assert train.files[0].endswith("dataset_dict.json") and all("test_prefs" not in f for f in train.files)
    heldout = open_rows(tmp_path / "dd", role="heldout")
    assert heldout.stem == "dd/test_prefs" and len(list(heldout.rows)) == 1
    with pytest.raises(DataError, match="has no split 'validation'; it has train_prefs, test_prefs"):
        open_rows(tmp_path / "dd", split="validation")


def test_unknown_format_and_missing_path(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data format"):
        open_rows(tmp_path / "d.csv")
    with pytest.raises(DataError, match="no such file"):
        open_rows(tmp_path / "absent.jsonl")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="not a saved `datasets` folder"):
        open_rows(tmp_path / "empty_dir")


def test_file_stem_drops_data_suffixes(tmp_path):
    assert file_stem(tmp_path / "hh-rlhf-harmless-base-test.jsonl.gz") == "hh-rlhf-harmless-base-test"
    assert file_stem(tmp_path / "x.parquet") == "x"
    assert file_stem(tmp_path / "x.json") == "x"
