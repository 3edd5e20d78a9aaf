"""The reward_pairs preprocessor: prompts → K samples from the reference → reward → pairs (DPO §6.1)."""

from __future__ import annotations

import json

import pytest

from data_prep import load_splits
from data_prep.drops import DropReport, RowPolicy
from data_prep.reward_pairs import Prompt, check_options, form_pairs, movie_prefixes
from dpo_zoo.config import DataConfig, load_config
from dpo_zoo.errors import DataError

PROMPT = Prompt("line:0", "The film", "prompts.txt", 0)


def test_best_against_worst_ties_and_repeated_texts():
    texts = [" good", " bad", " good", " fine", " awful"]
    rewards = [0.5, -0.4, 0.5, 0.1, -0.4]
    (pair,) = form_pairs(PROMPT, texts, rewards, pairing="best_worst", tie_threshold=0.0)
    # the first sampled among equal rewards on both ends: index 0 (not its copy 2) against index 1
    assert (pair.chosen, pair.rejected, pair.is_tie, pair.id) == (" good", " bad", False, "line:0#0>1")
    assert pair.extra["chosen_reward"] == 0.5 and pair.extra["rejected_reward"] == -0.4

    every = form_pairs(PROMPT, texts, rewards, pairing="all", tie_threshold=0.0)
    # 4 distinct texts (index 2 repeats index 0): C(4,2) = 6 pairs, the higher reward chosen
    assert len(every) == 6 and all(p.extra["chosen_reward"] >= p.extra["rejected_reward"] for p in every)
    assert [p.is_tie for p in every].count(True) == 1  # " bad" vs " awful": equal rewards
    wide = form_pairs(PROMPT, texts, rewards, pairing="all", tie_threshold=0.4)
    # gaps: .4 (good-fine), .9, .9, .5 (fine-bad), .5, 0 → ties at ≤ 0.4: good-fine and bad-awful
    assert sum(p.is_tie for p in wide) == 2
    assert form_pairs(PROMPT, [" a", " a"], [1.0, 1.0], pairing="best_worst", tie_threshold=0) == []


def test_options_are_checked_all_at_once():
    with pytest.raises(DataError) as err:
        check_options({"samples_per_prompt": 1, "temperature": 0, "pairing": "best", "colour": 1})
    message = str(err.value)
    for part in ("data.options.colour", "samples_per_prompt`: expected an integer >= 2", "temperature`: expected a number > 0",
                 "pairing`: 'best' is not one of best_worst, all"):
        assert part in message


def test_movie_prefixes_are_the_first_words_of_each_snippet(tmp_path):
    snippets = [("1", "A gripping , beautifully shot film about loss and love ."), ("2", "Dull ."), ("3", "Two words")]
    (tmp_path / "movieReviewSnippets_GroundTruth.txt").write_bytes(
        "\r\n".join(f"{i}\t0.5\t{t}" for i, t in snippets).encode())
    (tmp_path / "movieReviewSnippets_anonDataRatings.txt").write_bytes(
        "\r\n".join(f"{i}\t0.5\t0.5\t[1, 0]" for i, _ in snippets).encode())
    prompts = movie_prefixes(str(tmp_path), seed=0, min_words=2, max_words=8, policy=RowPolicy("error", DropReport()), drops=None)
    words = {"1": snippets[0][1].split(), "2": ["Dull", "."], "3": ["Two", "words"]}
    assert [p.key for p in prompts] == ["movie:1", "movie:2", "movie:3"]
    for prompt in prompts:
        full = words[prompt.key.split(":")[1]]
        n = len(prompt.text.split())
        assert full[:n] == prompt.text.split() and 1 <= n < len(full) and (n >= 2 or len(full) <= 2)
    assert movie_prefixes(str(tmp_path), seed=0, min_words=2, max_words=8, policy=RowPolicy("error", DropReport()),
                          drops=None) == prompts


def test_without_a_sampler_it_says_how_to_run_it():
    with pytest.raises(DataError, match="run it through `dpo-zoo prep`"):
        load_splits(DataConfig(preprocessor="reward_pairs", options={"prompts": "x"}))


def reward_pairs_overrides(model_dir, root, **options):
    (root / "prompts.txt").write_text("\n".join(["The movie was", "I thought the film", "This is", "Honestly the plot",
                                                 "The acting", "What a", "The ending was", "Overall I"]) + "\n")
    opts = {"prompts": str(root / "prompts.txt"), "samples_per_prompt": 3, "max_new_tokens": 6, "shard_prompts": 3,
            "batch_size": 2, "seed": 1, **options}
    return [f"model.name_or_path={model_dir}", "data.preprocessor=reward_pairs", "data.heldout_fraction=0.25",
            f"prep.output_dir={root / 'prepared'}", "prep.max_length=48", "prep.max_prompt_length=16",
            "prep.progress=false", *[f"data.options.{k}={v}" for k, v in opts.items()]]


def test_prep_samples_scores_pairs_caches_and_resumes(tmp_path, tiny_model_dir, capsys):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    import data_prep
    from dpo_zoo.cache.reader import PreparedSet
    from dpo_zoo.cache.prep import run_prep

    overrides = reward_pairs_overrides(tiny_model_dir, tmp_path)
    cfg = load_config([], overrides)
    paths = run_prep(cfg)
    shards = sorted((tmp_path / "prepared" / "generations").glob("*/shard-*.json"))
    assert len(shards) == 3  # 8 prompts, 3 per shard
    first = [json.loads(s.read_text()) for s in shards]
    assert [len(c) for s in first for c in s["completions"]] == [3] * 8

    analyzer = SentimentIntensityAnalyzer()
    splits = data_prep.load_splits(cfg.data, _reader_only(tiny_model_dir, tmp_path))
    pairs = splits.train + splits.heldout
    assert len(pairs) >= 6 and splits.heldout  # at most one per prompt, some prompts held out
    for pair in pairs:  # chosen has the higher VADER compound score of its own text
        assert pair.extra["chosen_reward"] == analyzer.polarity_scores(pair.chosen)["compound"]
        assert pair.extra["rejected_reward"] == analyzer.polarity_scores(pair.rejected)["compound"]
        assert pair.extra["chosen_reward"] >= pair.extra["rejected_reward"] and pair.chosen != pair.rejected
    assert len(PreparedSet.open(paths["train"])) == len(splits.train)

    # Killed after the first shard: the rest is sampled again and comes out the same (seeded per shard).
    for shard in shards[1:]:
        shard.unlink()
    run_prep(load_config([], overrides + ["prep.output_dir=" + str(tmp_path / "prepared")]))
    assert [json.loads(s.read_text()) for s in shards] == first
    assert "cache hit" in capsys.readouterr().out

    # A generation setting is part of the cache key: a miss that names it, and new samples.
    capsys.readouterr()
    run_prep(load_config([], reward_pairs_overrides(tiny_model_dir, tmp_path, temperature=0.7)))
    assert "preprocessor_options" in capsys.readouterr().out
    assert len(list((tmp_path / "prepared" / "generations").iterdir())) == 2


def _reader_only(model_dir, root):
    """The sampler prep uses, reading the shards it wrote (it must not need to sample again)."""
    from dpo_zoo.model.loading import load_tokenizer, tokenizer_fingerprint, weights_fingerprint
    from dpo_zoo.rewards.sampling import ShardedSampler

    class NoSampling(ShardedSampler):
        def sample(self, prompts, options):
            raise AssertionError("a finished shard was sampled again")

    tokenizer = load_tokenizer(model_dir)
    return NoSampling(model_dir, tokenizer, weights=weights_fingerprint(model_dir),
                      tokenizer_hash=tokenizer_fingerprint(tokenizer), work_dir=root / "prepared" / "generations",
                      progress=False)
