"""The hh_rlhf preprocessor, on made-up dialogues and on the real harmless-base test split."""

import gzip
import json

import pytest

from data_prep import load_splits
from data_prep import drops as R
from data_prep.hh_rlhf import parse_dialogue
from data_prep.drops import BadRow
from dpo_zoo.config import DataConfig
from dpo_zoo.errors import DataError

PROMPT = "\n\nHuman: How do I bake bread?\n\nAssistant: With flour.\n\nHuman: And then?\n\nAssistant:"
ROW = {"chosen": PROMPT + " Knead it and let it rise.", "rejected": PROMPT + " Eat the flour."}


def cfg(path, **kw):
    return DataConfig(preprocessor="hh_rlhf", train_path=str(path), heldout_fraction=0.0, **kw)


def test_dialogue_to_messages():
    assert parse_dialogue(ROW["chosen"], "chosen") == [
        {"role": "user", "content": "How do I bake bread?"},
        {"role": "assistant", "content": "With flour."},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "Knead it and let it rise."},
    ]


def test_as_messages_prompt_is_the_shared_turns(write_jsonl):
    pair = load_splits(cfg(write_jsonl("hh.jsonl", [ROW]))).train[0]
    assert pair.prompt == parse_dialogue(ROW["chosen"], "chosen")[:-1]
    assert pair.chosen == [{"role": "assistant", "content": "Knead it and let it rise."}]
    assert pair.rejected == [{"role": "assistant", "content": "Eat the flour."}]
    assert pair.id == "hh:0"


def test_raw_text_keeps_the_implicit_prompt(write_jsonl):
    pair = load_splits(cfg(write_jsonl("hh.jsonl", [ROW]), options={"as_messages": False})).train[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == (PROMPT, " Knead it and let it rise.", " Eat the flour.")
    assert pair.prompt + pair.chosen == ROW["chosen"] and pair.prompt + pair.rejected == ROW["rejected"]


@pytest.mark.parametrize(
    "row, reason, field",
    [
        ({"chosen": "Human: hi\n\nAssistant: yo", "rejected": ROW["rejected"]}, R.NOT_HH_DIALOGUE, "chosen"),
        ({"chosen": ROW["chosen"], "rejected": ROW["rejected"] + "\n\nHuman: more?"}, R.NOT_HH_DIALOGUE, "rejected"),
        ({"chosen": ROW["chosen"] + "\n\nHuman: ok\n\nAssistant: bye", "rejected": ROW["rejected"]}, R.HH_DIVERGED, "rejected"),
        ({"chosen": PROMPT + " ", "rejected": ROW["rejected"]}, R.EMPTY_COMPLETION, "chosen"),
        ({"chosen": ROW["chosen"], "rejected": ROW["chosen"]}, R.IDENTICAL, "rejected"),
        ({"chosen": [{"role": "user", "content": "x"}], "rejected": ROW["rejected"]}, R.WRONG_TYPE, "chosen"),
        ({"chosen": ROW["chosen"]}, R.MISSING_FIELD, "rejected"),
    ],
)
@pytest.mark.parametrize("as_messages", [True, False])
def test_bad_dialogues(write_jsonl, row, reason, field, as_messages):
    path = write_jsonl("hh.jsonl", [ROW, row])
    with pytest.raises(DataError, match=rf"row 1 \(0-based\), field '{field}': {reason}"):
        load_splits(cfg(path, options={"as_messages": as_messages}))


def test_text_mode_requires_identical_raw_prompts(write_jsonl):
    # The same turns once stripped, but different spacing: as messages it is one prompt, as text it is not.
    spaced = {"chosen": ROW["chosen"], "rejected": PROMPT.replace("With flour.", "With flour. ") + " Eat the flour."}
    assert len(load_splits(cfg(write_jsonl("a.jsonl", [spaced]))).train) == 1
    with pytest.raises(DataError, match="differs in whitespace"):
        load_splits(cfg(write_jsonl("b.jsonl", [spaced]), options={"as_messages": False}))


def test_unknown_option_and_column(write_jsonl):
    path = write_jsonl("hh.jsonl", [ROW])
    with pytest.raises(DataError, match=r"`data.options.as_message`: not an option of the hh_rlhf preprocessor"):
        load_splits(cfg(path, options={"as_message": False}))
    with pytest.raises(DataError, match=r"`data.options.as_messages`: expected true or false"):
        load_splits(cfg(path, options={"as_messages": "no"}))
    with pytest.raises(DataError, match=r"`data.columns.prompt`: not a field the hh_rlhf preprocessor reads"):
        load_splits(cfg(path, columns={"prompt": "p"}))


# ----------------------------------------------------------------------------- the real data


def _real_rows(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("as_messages", [True, False])
def test_real_harmless_base_test_split(hh_test_path, as_messages):
    """2,312 real rows: 9 bad (0.39%). 4 have an empty final assistant turn in `chosen` (rows 86, 516,
    925, 1103); in 5 the two dialogues part before the final assistant turn (rows 1254, 1688, 1950, 1952,
    2036: one side continues for more turns). None has chosen identical to rejected."""
    rows = _real_rows(hh_test_path)
    assert len(rows) == 2312
    assert sum(r["chosen"] == r["rejected"] for r in rows) == 0  # identical pairs: counted, none here

    loaded = load_splits(cfg(hh_test_path, on_bad_row="skip", options={"as_messages": as_messages}))
    drops = loaded.drops
    assert drops.rows_read == {str(hh_test_path): 2312}
    assert drops.counts == {R.HH_DIVERGED: 5, R.EMPTY_COMPLETION: 4}
    assert len(loaded.train) == 2312 - 9
    by_reason = {reason: [d["row"] for d in drops.rows if d["reason"] == reason] for reason in drops.counts}
    assert by_reason[R.EMPTY_COMPLETION] == [86, 516, 925, 1103]
    assert by_reason[R.HH_DIVERGED] == [1254, 1688, 1950, 1952, 2036]
    assert all(d["field"] == "chosen" for d in drops.rows if d["reason"] == R.EMPTY_COMPLETION)
    kept_rows = [p.source_row for p in loaded.train]
    assert kept_rows == sorted(set(range(2312)) - set(by_reason[R.EMPTY_COMPLETION]) - set(by_reason[R.HH_DIVERGED]))

    first = loaded.train[0]
    if as_messages:
        assert first.prompt[0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
        assert first.prompt[-1]["role"] == "user" and len(first.chosen) == 1 and first.chosen[0]["role"] == "assistant"
    else:
        assert first.prompt.startswith("\n\nHuman: what are some pranks") and first.prompt.endswith("\n\nAssistant:")
        assert first.prompt + first.chosen == rows[0]["chosen"]


def test_real_split_stops_at_the_first_bad_row_by_default(hh_test_path):
    with pytest.raises(DataError, match=r"row 86 \(0-based\), field 'chosen': empty completion"):
        load_splits(cfg(hh_test_path))


def test_real_split_read_generically_keeps_multi_turn_completions(hh_test_path):
    """The generic reader splits at the last shared "\\n\\nAssistant:", so the 5 diverging rows become
    multi-turn completions (TRL's behaviour) and only the 4 empty completions are dropped."""
    loaded = load_splits(DataConfig(train_path=str(hh_test_path), heldout_fraction=0.0, on_bad_row="skip"))
    assert loaded.drops.counts == {R.EMPTY_COMPLETION: 4}
    diverged = next(p for p in loaded.train if p.source_row == 1254)
    # Its chosen side goes on for another assistant turn (after a "Human:" the data lost its newlines at).
    assert "\n\nAssistant:" in diverged.chosen and diverged.prompt.endswith("\n\nAssistant:")


def test_parse_dialogue_rejects_what_is_not_a_dialogue():
    with pytest.raises(BadRow, match="does not start with"):
        parse_dialogue("hello", "chosen")
    with pytest.raises(BadRow, match="does not end with an assistant turn"):
        parse_dialogue("\n\nHuman: hi", "chosen")
