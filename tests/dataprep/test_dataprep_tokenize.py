"""tokenize_pairs with the tiny real BPE tokenizer: boundaries, special tokens, templates, truncation."""

import types

import pytest
from tokenizers import processors

from data_prep import DropReport, load_splits, tokenize_pairs
from data_prep import drops as R
from data_prep.schema import PreferencePair
from dpo_zoo.config import DataConfig
from dpo_zoo.errors import DataError


def pair(prompt, chosen, rejected, **kw):
    return PreferencePair(id=kw.pop("id", "x"), prompt=prompt, chosen=chosen, rejected=rejected, source_file="f.jsonl", source_row=kw.pop("row", 0), **kw)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture
def bos_tokenizer(tiny_model_dir):
    """The tiny tokenizer made to put BOS in front of text, as Llama-style tokenizers do."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", pair=f"{tok.bos_token} $A {tok.bos_token} $B", special_tokens=[(tok.bos_token, bos)]
    )
    assert tok("a")["input_ids"][0] == bos
    return tok


def split(tok, ids, start):
    return tok.decode(ids[:start]), tok.decode(ids[start:])


def test_a_token_merged_across_the_boundary_counts_as_completion(tokenizer):
    """Prompt "I saw th", completion "e cat sat": the BPE merges " the" across the boundary. Alone, the
    prompt ends in the token " th"; jointly, " the" is one token and it belongs to the completion, so
    the completion's log-prob covers every one of its characters."""
    prompt, completion = "I saw th", "e cat sat"
    joint = tokenizer(prompt + completion, add_special_tokens=False, return_offsets_mapping=True)
    spanning = [t for t, (a, b) in zip(joint["input_ids"], joint["offset_mapping"]) if a < len(prompt) < b]
    assert tokenizer.convert_ids_to_tokens(spanning) == ["Ġthe"]  # the merge this test is about
    alone = tokenizer.convert_ids_to_tokens(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert alone[-1] == "Ġth"

    (out,) = tokenize_pairs(tokenizer, [pair(prompt, completion, "is dog ran")])
    assert split(tokenizer, out.chosen_input_ids, out.chosen_completion_start) == ("I saw", " the cat sat<|im_end|>")
    assert tokenizer.convert_ids_to_tokens(out.chosen_input_ids[out.chosen_completion_start]) == "Ġthe"
    assert out.chosen_input_ids[:-1] == joint["input_ids"]  # the joint tokens, plus EOS
    # The other side merges differently ("th" + "is" are separate), so it has its own start.
    assert split(tokenizer, out.rejected_input_ids, out.rejected_completion_start) == ("I saw th", "is dog ran<|im_end|>")
    assert out.rejected_completion_start != out.chosen_completion_start


def test_plain_text_gets_eos_once_and_no_bos_when_the_tokenizer_adds_none(tokenizer):
    eos = tokenizer.eos_token_id
    first, second = tokenize_pairs(tokenizer, [pair("Q:", " yes", " no"), pair("Q:", " yes<|im_end|>", " no", id="y")])
    assert first.chosen_input_ids[-1] == eos and first.chosen_input_ids.count(eos) == 1
    assert first.chosen_input_ids[0] != tokenizer.bos_token_id
    assert second.chosen_input_ids.count(eos) == 1  # the text already ends with EOS: not doubled


def test_plain_text_gets_bos_once_when_the_tokenizer_adds_it(bos_tokenizer):
    tok = bos_tokenizer
    bos = tok.bos_token_id
    first, second = tokenize_pairs(tok, [pair("Q:", " yes", " no"), pair(tok.bos_token + "Q:", " yes", " no", id="y")])
    for out in (first, second):
        assert out.chosen_input_ids[0] == bos and out.chosen_input_ids.count(bos) == 1
        assert split(tok, out.chosen_input_ids, out.chosen_completion_start) == ("<|im_start|>Q:", " yes<|im_end|>")


def test_empty_prompt_needs_a_bos(tokenizer, bos_tokenizer):
    with pytest.raises(DataError, match=r"f.jsonl, row 0 \(0-based\), field 'chosen': empty prompt: the prompt has no tokens"):
        tokenize_pairs(tokenizer, [pair("", "yes", "no")])
    (out,) = tokenize_pairs(bos_tokenizer, [pair("", "yes", "no")])
    assert out.chosen_completion_start == 1


def test_conversation_uses_the_chat_template_without_extra_special_tokens(tokenizer):
    p = pair([user("Hi there")], [assistant("Hello!")], [assistant("Go away.")])
    (out,) = tokenize_pairs(tokenizer, [p])
    prompt, completion = split(tokenizer, out.chosen_input_ids, out.chosen_completion_start)
    assert prompt == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert completion == "Hello!<|im_end|>\n"
    full = tokenizer.apply_chat_template([user("Hi there"), assistant("Hello!")], tokenize=False)
    assert out.chosen_input_ids == tokenizer(full, add_special_tokens=False)["input_ids"]
    # One BOS (the template's own <|im_start|>) at the front, one end of turn per turn.
    assert out.chosen_input_ids[:2].count(tokenizer.bos_token_id) == 1
    assert out.chosen_input_ids.count(tokenizer.eos_token_id) == 2


def test_completion_that_opens_with_a_user_turn_has_no_generation_prompt(tokenizer):
    p = pair([user("Hi"), assistant("Yes?")], [user("Joke?"), assistant("No.")], [user("Bye"), assistant("Bye.")])
    (out,) = tokenize_pairs(tokenizer, [p])
    prompt, completion = split(tokenizer, out.chosen_input_ids, out.chosen_completion_start)
    assert prompt.endswith("Yes?<|im_end|>\n") and completion.startswith("<|im_start|>user\nJoke?")


def test_custom_template_string_and_no_template(tokenizer):
    p = pair([user("Hi")], [assistant("Hello")], [assistant("Bye")])
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    (out,) = tokenize_pairs(tokenizer, [p], chat_template=template)
    assert split(tokenizer, out.chosen_input_ids, out.chosen_completion_start) == ("[user] Hi\n[assistant] ", "Hello\n")
    (plain,) = tokenize_pairs(tokenizer, [p], chat_template="none")
    assert split(tokenizer, plain.chosen_input_ids, plain.chosen_completion_start) == ("\n\nHuman: Hi\n\nAssistant:", " Hello<|im_end|>")


def test_template_problems_are_bad_rows(tokenizer):
    strict = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('conversations must start with a user turn') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}|{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    bad = pair([{"role": "system", "content": "Be brief."}], [assistant("ok")], [assistant("no")], row=4)
    with pytest.raises(DataError, match=r"row 4 \(0-based\), field 'chosen': chat template rejected the messages: .*must start with a user turn"):
        tokenize_pairs(tokenizer, [bad], chat_template=strict)
    counting = "{{ messages|length }}:{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    with pytest.raises(DataError, match="chat template output does not start with the rendered prompt"):
        tokenize_pairs(tokenizer, [pair([user("Hi")], [assistant("a")], [assistant("b")])], chat_template=counting)


def test_truncation_keep_end_and_keep_start(tokenizer, bos_tokenizer):
    long_prompt = " ".join(f"w{i}" for i in range(40))
    p = pair(long_prompt, " " + "end " * 30, " short")
    drops = DropReport()
    (out,) = tokenize_pairs(tokenizer, [p], max_length=24, max_prompt_length=10, truncation_mode="keep_end", drops=drops)
    full = tokenize_pairs(tokenizer, [p], max_length=10_000, max_prompt_length=5_000)[0]
    assert out.chosen_completion_start == 10 and len(out.chosen_input_ids) == 24
    assert out.chosen_input_ids[:10] == full.chosen_input_ids[full.chosen_completion_start - 10 : full.chosen_completion_start]
    assert out.chosen_input_ids[10:] == full.chosen_input_ids[full.chosen_completion_start : full.chosen_completion_start + 14]
    assert tokenizer.eos_token_id not in out.chosen_input_ids  # a cut completion did not end: no EOS
    assert out.rejected_input_ids[10:] == full.rejected_input_ids[full.rejected_completion_start :]  # fits: whole, EOS kept
    assert drops.notes == {"prompt sides truncated to max_prompt_length": 2, "completion sides truncated to fit max_length": 1}
    assert drops.total == 0

    (start,) = tokenize_pairs(tokenizer, [p], max_length=24, max_prompt_length=10, truncation_mode="keep_start")
    assert start.chosen_input_ids[:10] == full.chosen_input_ids[:10]

    (with_bos,) = tokenize_pairs(bos_tokenizer, [p], max_length=24, max_prompt_length=10)
    bos_full = tokenize_pairs(bos_tokenizer, [p], max_length=10_000, max_prompt_length=5_000)[0]
    assert with_bos.chosen_input_ids[0] == bos_tokenizer.bos_token_id  # keep_end keeps BOS in front
    assert with_bos.chosen_input_ids[1:10] == bos_full.chosen_input_ids[bos_full.chosen_completion_start - 9 : bos_full.chosen_completion_start]


def test_completion_truncated_to_nothing(tokenizer):
    p = pair(" ".join(["word"] * 50), " yes", " no", row=7)
    with pytest.raises(DataError, match=r"row 7 \(0-based\), field 'chosen': completion truncated to nothing"):
        tokenize_pairs(tokenizer, [p], max_length=16, max_prompt_length=16)
    drops = DropReport()
    kept = tokenize_pairs(tokenizer, [p, pair("Q:", " a", " b", row=8)], max_length=16, max_prompt_length=16, on_bad_row="skip", drops=drops)
    assert [k.pair.source_row for k in kept] == [8]
    assert drops.counts == {R.TRUNCATED_TO_NOTHING: 1} and drops.rows[0]["row"] == 7


def test_skip_keeps_order_and_counts(tokenizer):
    pairs = [pair("A:", " x", " y", id="a", row=0), pair("", "x", "y", id="b", row=1), pair("C:", " x", " y", id="c", row=2)]
    drops = DropReport()
    out = tokenize_pairs(tokenizer, pairs, on_bad_row="skip", drops=drops)
    assert [o.pair.id for o in out] == ["a", "c"] and drops.counts == {R.EMPTY_PROMPT: 1}


def test_batch_size_does_not_change_the_result(tokenizer):
    pairs = [pair(f"Question {i}: what is {i} plus {i}?", f" It is {2 * i}.", f" No idea {i}.", id=str(i)) for i in range(30)]
    one = tokenize_pairs(tokenizer, pairs, batch_size=1)
    many = tokenize_pairs(tokenizer, pairs, batch_size=512)
    assert [(o.chosen_input_ids, o.chosen_completion_start, o.rejected_input_ids, o.rejected_completion_start) for o in one] == [
        (o.chosen_input_ids, o.chosen_completion_start, o.rejected_input_ids, o.rejected_completion_start) for o in many
    ]


def test_setting_errors(tokenizer):
    with pytest.raises(DataError, match="not a fast tokenizer"):
        tokenize_pairs(types.SimpleNamespace(is_fast=False), [])
    with pytest.raises(DataError, match="truncation_mode"):
        tokenize_pairs(tokenizer, [], truncation_mode="middle")
    no_template = types.SimpleNamespace(is_fast=True, chat_template=None)
    with pytest.raises(DataError, match="conversational but the tokenizer has no chat template"):
        tokenize_pairs(no_template, [pair([user("a")], [assistant("b")], [assistant("c")])])


def test_real_hh_pairs_tokenize_within_limits(tokenizer, hh_test_path):
    """The first 300 real HH pairs, as messages through the chat template and as raw text. Written back
    as HH text (template 'none'), the messages tokenize exactly as the raw text does: the first 300 rows
    have no stray spaces around turns (4 of the 2,303 good rows do, which the message form strips)."""
    messages = load_splits(DataConfig(preprocessor="hh_rlhf", train_path=str(hh_test_path), heldout_fraction=0.0, max_train_pairs=300, on_bad_row="skip"))
    text = load_splits(DataConfig(preprocessor="hh_rlhf", train_path=str(hh_test_path), heldout_fraction=0.0, max_train_pairs=300, on_bad_row="skip", options={"as_messages": False}))
    drops = DropReport()
    out = tokenize_pairs(tokenizer, messages.train, max_length=256, max_prompt_length=128, drops=drops)
    assert len(out) == 300 and drops.total == 0
    for o in out:
        for ids, start in ((o.chosen_input_ids, o.chosen_completion_start), (o.rejected_input_ids, o.rejected_completion_start)):
            assert 1 <= start <= 128 and start < len(ids) <= 256
            assert tokenizer.decode(ids[:start]).endswith("<|im_start|>assistant\n")
    as_text = tokenize_pairs(tokenizer, text.train, max_length=256, max_prompt_length=128)
    written_back = tokenize_pairs(tokenizer, messages.train, max_length=256, max_prompt_length=128, chat_template="none")
    assert len(as_text) == len(written_back) == 300
    for a, b in zip(as_text, written_back):
        assert (a.chosen_input_ids, a.chosen_completion_start) == (b.chosen_input_ids, b.chosen_completion_start)
        assert (a.rejected_input_ids, a.rejected_completion_start) == (b.rejected_input_ids, b.rejected_completion_start)


def test_no_prompt_limit_leaves_only_the_total_length_to_truncate(tokenizer):
    """max_prompt_length=None: a long prompt is kept whole and the completion is cut to fit max_length;
    with a limit the prompt is cut first (keep_end keeps its last tokens)."""
    long_prompt = "Tell me about the weather today, please."
    full = tokenizer(long_prompt, add_special_tokens=False)["input_ids"]
    short = len(tokenizer(" No", add_special_tokens=False)["input_ids"]) + 1  # with EOS
    max_length = len(full) + short  # room for the short completion, not the long one
    pairs = [pair(long_prompt, " It is sunny and warm today, with a light breeze.", " No")]
    drops = DropReport()
    (free,) = tokenize_pairs(tokenizer, pairs, max_length=max_length, max_prompt_length=None, drops=drops)
    assert free.chosen_input_ids[: free.chosen_completion_start] == full  # the prompt whole
    assert len(free.chosen_input_ids) == max_length  # the long completion cut to fit
    assert len(free.rejected_input_ids) == max_length and free.rejected_input_ids[-1] == tokenizer.eos_token_id
    assert "prompt sides truncated to max_prompt_length" not in drops.notes
    assert drops.notes["completion sides truncated to fit max_length"] == 1
    half = len(full) // 2
    (limited,) = tokenize_pairs(tokenizer, pairs, max_length=max_length, max_prompt_length=half)
    assert limited.chosen_completion_start == half and limited.chosen_input_ids[:half] == full[-half:]


def test_no_prompt_limit_and_a_prompt_filling_max_length_is_a_bad_row(tokenizer):
    long_prompt = "Tell me about the weather today, please."
    with pytest.raises(DataError, match=r"field 'chosen': completion truncated to nothing: .*max_prompt_length=None"):
        tokenize_pairs(tokenizer, [pair(long_prompt, " Sunny.", " No.")], max_length=4, max_prompt_length=None)


def test_the_config_takes_null_for_no_prompt_limit():
    from dpo_zoo.config import ConfigError, load_config

    assert load_config([], ["prep.max_prompt_length=null"]).prep.max_prompt_length is None
    with pytest.raises(ConfigError, match="`prep.max_prompt_length`: must be > 0, got 0"):
        load_config([], ["prep.max_prompt_length=0"])
