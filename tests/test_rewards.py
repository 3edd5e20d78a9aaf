"""Rewards: the built-in VADER score, a sequence-classification model folder, a user callable, and
the errors each gives when it cannot serve."""

from __future__ import annotations

import math
import sys
import textwrap

import numpy as np
import pytest

from dpo_zoo.rewards.scorers import RewardError, load_reward


def test_vader_scores_the_completion_only_in_batches():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    reward = load_reward("vader")
    reward.batch_size = 2  # three batches for five completions
    prompts = ["I hated the film but", "x", "y", "z", "w"]
    completions = [" it was great fun", " terrible, awful, boring", "", " a film", " I love it!"]
    scores = reward(prompts, completions)
    analyzer = SentimentIntensityAnalyzer()
    assert scores.dtype == np.float64 and scores.shape == (5,)
    assert scores.tolist() == [analyzer.polarity_scores(c)["compound"] for c in completions]
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0.0  # the prompt's "hated" is not scored
    assert reward.identity["reward"] == "vader" and reward.identity["vaderSentiment"] == "3.3.2"


@pytest.fixture()
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        import math
        def length(prompts, completions):
            return [len(c) for c in completions]
        def short(prompts, completions):
            return [1.0]
        def text(prompts, completions):
            return ["high" for _ in completions]
        def nan(prompts, completions):
            return [math.nan if c == "b" else 0.0 for c in completions]
        def scalar(prompts, completions):
            return 3.0
        def boom(prompts, completions):
            raise KeyError("lexicon")
        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_a_callable_reward_and_its_identity(reward_module):
    reward = load_reward(f"{reward_module}:length")
    assert reward(["p", "q"], ["abc", ""]).tolist() == [3.0, 0.0]
    assert reward.identity["spec"] == "my_rewards:length" and len(reward.identity["source_sha256"]) == 64


@pytest.mark.parametrize("function, message", [
    ("short", "returned 1 values for 2 completions"),
    ("text", "expected numbers, got 'high'"),
    ("nan", "value nan at completion 1 is not finite"),
    ("scalar", "expected a sequence of 2 floats, got float"),
    ("boom", "raised KeyError"),
])
def test_a_bad_callable_is_named_with_what_it_returned(reward_module, function, message):
    reward = load_reward(f"{reward_module}:{function}")
    with pytest.raises(RewardError, match=message) as err:
        reward(["p", "q"], ["a", "b"])
    assert f"my_rewards:{function}" in str(err.value)


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz': ModuleNotFoundError"),
    ("my_rewards:missing", "has no attribute 'missing'"),
    ("my_rewards:NOT_CALLABLE", "is a int, not a function"),
    ("nothing_here", "not a built-in reward"),
    ("", "expected 'vader'"),
])
def test_a_spec_that_cannot_load_is_named(reward_module, spec, message):
    with pytest.raises(RewardError, match=message):
        load_reward(spec)


def test_a_classifier_folder_scores_prompt_plus_completion(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    folder = tmp_path / "rm"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=2,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    reward = load_reward(str(folder))
    reward.batch_size = 2
    prompts, completions = ["Hi", "The film", "A"], [" there", " was good", " b c d"]
    scores = reward(prompts, completions)
    for prompt, completion, score in zip(prompts, completions, scores):  # each alone, no padding
        ids = tokenizer(prompt + completion, return_tensors="pt")
        with torch.no_grad():
            logits = model(**ids).logits[0]
        assert score == pytest.approx(float(logits[1] - logits[0]), abs=1e-5)
    assert reward.identity["reward"] == "classifier" and reward.identity["num_labels"] == 2

    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(RewardError, match="only pickled weights"):
        load_reward(str(folder))
    with pytest.raises(RewardError, match="a file, not a model folder"):
        load_reward(str(folder / "config.json"))
