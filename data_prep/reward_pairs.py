"""Preference pairs ranked by a ground-truth reward (the DPO paper's controlled-sentiment protocol,
Rafailov et al. 2023, §6.1): prompts → K completions each, sampled from the reference model → scored by
the reward → pairs.

This module holds the parts that need no model: the prompt set, the options, and pair formation. The
sampling and scoring are done by the caller (``dpo_zoo.rewards.sampling``, which ``dpo-zoo prep`` passes in
as ``generate``), so ``data_prep`` stays free of the model code.

**Prompts** (``prompts``): ``vader_movie`` (default), the movie-review prefixes of the DPO paper's task:
the first n words of each VADER movie-review snippet (the corpus of :mod:`data_prep.vader`, read from
``data.train_path`` or the cached ``vaderSentiment`` sdist), n drawn uniformly in
[``min_words``, ``max_words``] by ``random.Random("<seed>/<snippet id>")`` and kept below the snippet's
length, so there is always something left to continue. Or a UTF-8 text file, one prompt per line.
A prompt is held out when the sha256 of its key (``movie:<id>``, or ``line:<n>``) falls below
``data.heldout_fraction``, so the held-out prompts of a study are never trained on. ``num_prompts``
keeps the first ones (file order) of the whole set, before the split.

**Pairs** (``pairing``): ``best_worst`` (default, one pair per prompt: the highest against the lowest
reward) or ``all`` (every pair of distinct completions, the higher reward chosen). A pair whose reward
gap is at most ``tie_threshold`` is a tie (``tie``: true); with threshold 0 only equal rewards tie.
Identical completion texts are kept once (the first sampled): a pair never compares a text with itself.
A prompt whose completions are all the same text gives no pair (counted in the stats).
Each pair records its rewards in ``extra`` (``chosen_reward``, ``rejected_reward``).

Options: ``reward`` ("vader"), ``prompts`` ("vader_movie"), ``num_prompts`` (null: all), ``min_words`` (2),
``max_words`` (8), ``samples_per_prompt`` (4), ``temperature`` (1.0), ``max_new_tokens`` (24),
``pairing`` ("best_worst"), ``tie_threshold`` (0.0), ``seed`` (0), ``batch_size`` (16: prompts per
generation batch), ``shard_prompts`` (64: prompts per saved generation shard, the unit of resumption).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .drops import DropReport, RowPolicy
from .errors import DataError
from .normalize import heldout_by_hash
from .schema import PreferencePair

OPTIONS: Dict[str, Any] = {
    "reward": "vader",
    "prompts": "vader_movie",
    "num_prompts": None,
    "min_words": 2,
    "max_words": 8,
    "samples_per_prompt": 4,
    "temperature": 1.0,
    "max_new_tokens": 24,
    "pairing": "best_worst",
    "tie_threshold": 0.0,
    "seed": 0,
    "batch_size": 16,
    "shard_prompts": 64,
}
PAIRINGS = ("best_worst", "all")
BUILTIN_PROMPTS = ("vader_movie",)


@dataclass
class Prompt:
    key: str  # what the held-out split hashes, and the pair ids' stem
    text: str
    file: str
    row: int


@dataclass
class Samples:
    """What ``generate`` returns for a list of prompts: per prompt, the completions and their rewards."""

    completions: List[List[str]]
    rewards: List[List[float]]
    origin: Dict[str, Any]  # what identifies the sampler and the reward (weights, reward identity)


# generate(prompt texts, checked options) -> Samples
Generate = Callable[[List[str], Dict[str, Any]], Samples]


def check_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """The options merged onto :data:`OPTIONS`, every problem named at once."""
    errors = [f"`data.options.{k}`: not an option of the reward_pairs preprocessor (its options: {', '.join(OPTIONS)})"
              for k in sorted(set(options) - set(OPTIONS))]
    o = {**OPTIONS, **options}

    def integer(key: str, low: int, nullable: bool = False) -> None:
        value = o[key]
        if value is None and nullable:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            errors.append(f"`data.options.{key}`: expected an integer >= {low}{' or null' if nullable else ''}, got {value!r}")

    for key, low in (("min_words", 1), ("max_words", 1), ("samples_per_prompt", 2), ("max_new_tokens", 1),
                     ("batch_size", 1), ("shard_prompts", 1)):
        integer(key, low)
    integer("num_prompts", 1, nullable=True)
    if isinstance(o["seed"], bool) or not isinstance(o["seed"], int):
        errors.append(f"`data.options.seed`: expected an integer, got {o['seed']!r}")
    for key, low, strict in (("temperature", 0.0, True), ("tie_threshold", 0.0, False)):
        value = o[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or (strict and value == low):
            errors.append(f"`data.options.{key}`: expected a number {'>' if strict else '>='} {low}, got {value!r}")
    if not errors and o["min_words"] > o["max_words"]:
        errors.append(f"`data.options.min_words` ({o['min_words']}) is above `data.options.max_words` ({o['max_words']})")
    if o["pairing"] not in PAIRINGS:
        errors.append(f"`data.options.pairing`: {o['pairing']!r} is not one of {', '.join(PAIRINGS)}")
    if not isinstance(o["reward"], str) or not o["reward"].strip():
        errors.append(f"`data.options.reward`: expected 'vader', a model folder or module:function, got {o['reward']!r}")
    if not isinstance(o["prompts"], str) or not o["prompts"].strip():
        errors.append(f"`data.options.prompts`: expected {' or '.join(BUILTIN_PROMPTS)} or a text file, got {o['prompts']!r}")
    if errors:
        raise DataError("; ".join(errors))
    o["temperature"], o["tie_threshold"] = float(o["temperature"]), float(o["tie_threshold"])
    return o


# ==================================================================== prompts


def movie_prefixes(source: Optional[str], *, seed: int, min_words: int, max_words: int,
                   policy: RowPolicy, drops: Optional[DropReport]) -> List[Prompt]:
    """The first n ∈ [min_words, max_words] words of each VADER movie-review snippet (module doc)."""
    from .vader import fetch_sdist, read_snippets

    path = Path(source).expanduser() if source else fetch_sdist()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (data.train_path: the VADER data for the movie prompts)")
    snippets, _, _ = read_snippets(path, ["movie"], policy, drops)
    prompts = []
    for snippet in snippets["movie"]:
        words = snippet.text.split()
        if len(words) < 2:
            continue  # nothing would be left to continue
        n = random.Random(f"{seed}/{snippet.id}").randint(min_words, max_words)
        prompts.append(Prompt(f"movie:{snippet.id}", " ".join(words[:min(n, len(words) - 1)]), snippet.file, snippet.row))
    return prompts


def text_file_prompts(path: str) -> List[Prompt]:
    """One prompt per non-blank line of a UTF-8 text file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"`data.options.prompts`: {path!r} is neither {' nor '.join(BUILTIN_PROMPTS)} nor a text file")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{file}: not UTF-8 text (byte {err.start}); expected one prompt per line") from None
    prompts = [Prompt(f"line:{row}", line.rstrip("\n"), str(file), row) for row, line in enumerate(lines) if line.strip()]
    if not prompts:
        raise DataError(f"{file}: read 0 prompts (expected one prompt per line)")
    return prompts


# ==================================================================== pairs


def form_pairs(prompt: Prompt, completions: Sequence[str], rewards: Sequence[float], *, pairing: str,
               tie_threshold: float) -> List[PreferencePair]:
    """Pairs of one prompt's scored completions (module doc: best_worst or all; ties within the threshold)."""
    first: Dict[str, int] = {}
    for index, text in enumerate(completions):
        first.setdefault(text, index)
    distinct = sorted(first.values())
    if len(distinct) < 2:
        return []
    if pairing == "best_worst":
        # The first sampled among equal rewards, so the choice does not depend on sort stability.
        best = max(distinct, key=lambda i: (rewards[i], -i))
        worst = min(distinct, key=lambda i: (rewards[i], i))
        candidates = [(best, worst)] if best != worst else [(distinct[0], distinct[1])]
    else:
        candidates = list(itertools.combinations(distinct, 2))
    pairs = []
    for a, b in candidates:
        chosen, rejected = (a, b) if rewards[a] >= rewards[b] else (b, a)
        gap = rewards[chosen] - rewards[rejected]
        pairs.append(PreferencePair(
            id=f"{prompt.key}#{chosen}>{rejected}",
            prompt=prompt.text,
            chosen=completions[chosen],
            rejected=completions[rejected],
            is_tie=gap <= tie_threshold,
            source_file=prompt.file,
            source_row=prompt.row,
            extra={"split_key": prompt.key, "chosen_reward": float(rewards[chosen]),
                   "rejected_reward": float(rewards[rejected])},
        ))
    return pairs


def load_reward_pairs(path: Optional[str], *, heldout_fraction: float, options: Dict[str, Any], policy: RowPolicy,
                      drops: Optional[DropReport], generate: Optional[Generate]) -> Tuple[List[PreferencePair], List[PreferencePair], List[str], Dict[str, Any], Dict[str, Any]]:
    """(train pairs, held-out pairs, files read, stats, origin) of the reward_pairs preprocessor."""
    o = check_options(options)
    if generate is None:
        raise DataError("the reward_pairs preprocessor samples from the reference model: run it through "
                        "`dpo-zoo prep` (or pass `generate` to load_splits)")
    if o["prompts"] == "vader_movie":
        prompts = movie_prefixes(path, seed=o["seed"], min_words=o["min_words"], max_words=o["max_words"],
                                 policy=policy, drops=drops)
    else:
        prompts = text_file_prompts(o["prompts"])
    if o["num_prompts"] is not None:
        prompts = prompts[:o["num_prompts"]]
    samples = generate([p.text for p in prompts], o)
    if len(samples.completions) != len(prompts) or len(samples.rewards) != len(prompts):
        raise DataError(f"reward_pairs: the sampler returned {len(samples.completions)} completion lists for "
                        f"{len(prompts)} prompts")
    splits: Dict[str, List[PreferencePair]] = {"train": [], "heldout": []}
    no_pair = 0
    for prompt, completions, rewards in zip(prompts, samples.completions, samples.rewards):
        side = "heldout" if heldout_by_hash(prompt.key, heldout_fraction) else "train"
        pairs = form_pairs(prompt, completions, rewards, pairing=o["pairing"], tie_threshold=o["tie_threshold"])
        no_pair += not pairs
        splits[side].extend(pairs)
    if drops is not None:
        drops.note("reward_pairs: prompts whose completions were all the same text (no pair)", no_pair)
    stats = {"prompts": len(prompts), "prompts_without_pair": no_pair,
             "train_ties": sum(p.is_tie for p in splits["train"]),
             "heldout_ties": sum(p.is_tie for p in splits["heldout"])}
    files = sorted({p.file for p in prompts})
    return splits["train"], splits["heldout"], files, stats, dict(samples.origin)


def heldout_prompts(path: Optional[str], *, heldout_fraction: float, options: Dict[str, Any]) -> List[str]:
    """The held-out prompt texts of a reward_pairs set (the study evaluates on them), in order."""
    o = check_options(options)
    policy = RowPolicy("skip", DropReport())
    if o["prompts"] == "vader_movie":
        prompts = movie_prefixes(path, seed=o["seed"], min_words=o["min_words"], max_words=o["max_words"],
                                 policy=policy, drops=None)
    else:
        prompts = text_file_prompts(o["prompts"])
    if o["num_prompts"] is not None:
        prompts = prompts[:o["num_prompts"]]
    return [p.text for p in prompts if heldout_by_hash(p.key, heldout_fraction)]
