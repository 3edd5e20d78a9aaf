"""Ground-truth rewards: score (prompt, completion) texts in batches.

A reward is named by a *spec* string (``data.options.reward`` of the ``reward_pairs`` preprocessor,
``study.reward`` of a study):

* ``vader``: the VADER compound sentiment score of the completion alone, in [-1, 1] (Hutto & Gilbert,
  ICWSM 2014; the ``vaderSentiment`` package, whose lexicon ships inside it). It is the ground truth of
  the controlled-sentiment task (Rafailov et al. 2023, §6.1) as dpo_zoo runs it on a CPU: the DPO paper
  used a sentiment classifier; VADER is the rule-based scorer whose human ratings the ``vader``
  preprocessor already reads, so prompts, pairs and evaluation share one notion of "positive".
* a local folder holding a ``transformers`` sequence-classification model (safetensors only, its own
  code never run): the reward of ``prompt + completion`` is the logit when the model has one label,
  and ``logit[1] − logit[0]`` (the log-odds of label 1, e.g. POSITIVE) when it has two.
* ``module:function``: a Python callable ``function(prompts, completions) -> sequence of floats``,
  imported from an importable module (installed, or on ``PYTHONPATH``); e.g. ``mypkg.rewards:length``.
* ``judge:<judge spec>``: a pairwise judge (:mod:`dpo_zoo.rewards.judge`: ``module:function``, a causal-LM
  folder, or an OpenAI-compatible endpoint) as a reward: each completion scores its position-debiased
  preference over a *baseline* response to the same prompt (both orders, :mod:`dpo_zoo.rewards.win_rate`),
  so a mean reward is a win rate. The caller provides the baselines (``needs_baselines``): ``dpo-zoo study``
  gives each held-out prompt's chosen response, so a run's reward is its win rate against the data's
  preferred responses, and the reference model's is its own.

Every reward returns a float64 array with one finite value per completion, or raises
:class:`RewardError` naming the spec and what is wrong (not importable, not callable, the wrong number
or type of values, a non-finite value at a given index, a model folder that cannot serve).
``Reward.identity`` is what identifies the scores (a package version, weight hashes, a source hash): it
enters the cache key of pairs built from the reward.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from dpo_zoo.errors import UserError

BUILTIN_REWARDS = ("vader",)
JUDGE_PREFIX = "judge:"


class RewardError(UserError, ValueError):
    """A reward spec that cannot be loaded, or a reward that returned unusable scores."""


class Reward:
    """Scores completions; subclasses implement :meth:`_score` for one batch."""

    spec: str = ""
    batch_size: int = 32

    @property
    def identity(self) -> Dict[str, Any]:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _score(self, prompts: List[str], completions: List[str]) -> Any:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        """One finite float per completion, scored ``batch_size`` at a time."""
        prompts, completions = list(prompts), list(completions)
        if len(prompts) != len(completions):
            raise RewardError(f"reward {self.spec!r}: {len(prompts)} prompts but {len(completions)} completions")
        out: List[np.ndarray] = []
        for start in range(0, len(completions), self.batch_size):
            batch_p = prompts[start:start + self.batch_size]
            batch_c = completions[start:start + self.batch_size]
            out.append(self._checked(self._score(batch_p, batch_c), len(batch_c), start))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float64)

    def _checked(self, values: Any, expected: int, offset: int) -> np.ndarray:
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
            raise RewardError(f"reward {self.spec!r}: expected a sequence of {expected} floats, got "
                              f"{type(values).__name__}")
        if len(values) != expected:
            raise RewardError(f"reward {self.spec!r}: returned {len(values)} values for {expected} completions")
        try:
            array = np.asarray([_as_float(v) for v in values], dtype=np.float64)
        except TypeError as err:
            raise RewardError(f"reward {self.spec!r}: {err}") from None
        bad = np.flatnonzero(~np.isfinite(array))
        if bad.size:
            i = int(bad[0])
            raise RewardError(f"reward {self.spec!r}: value {array[i]} at completion {offset + i} is not finite")
        return array


def _as_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # a 0-d tensor or array
            return _as_float(value.item())
        raise TypeError(f"expected numbers, got {value!r} ({type(value).__name__})")
    return float(value)


class VaderReward(Reward):
    """VADER's compound score (the normalised sum of lexicon valences, in [-1, 1]) of the completion."""

    def __init__(self, batch_size: int = 256):
        try:
            from vaderSentiment import vaderSentiment as vader
        except ImportError:
            raise RewardError("reward 'vader' needs the vaderSentiment package: pip install vaderSentiment==3.3.2") from None
        self.spec, self.batch_size = "vader", batch_size
        self._analyzer = vader.SentimentIntensityAnalyzer()
        self._version = _package_version("vaderSentiment")

    @property
    def identity(self) -> Dict[str, Any]:
        return {"reward": "vader", "scores": "compound of the completion", "vaderSentiment": self._version}

    def _score(self, prompts: List[str], completions: List[str]) -> List[float]:
        return [self._analyzer.polarity_scores(text)["compound"] for text in completions]


class ClassifierReward(Reward):
    """A sequence-classification model's score of ``prompt + completion`` (module doc)."""

    def __init__(self, folder: Path, batch_size: int = 16, device: str = "cpu", max_length: int = 512):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from dpo_zoo.model.loading import ModelError, check_safetensors_folder, weights_fingerprint

        self.spec, self.batch_size, self.max_length = str(folder), batch_size, max_length
        try:
            check_safetensors_folder(folder)
            self._weights = weights_fingerprint(folder)
            self._model = AutoModelForSequenceClassification.from_pretrained(
                str(folder), use_safetensors=True, trust_remote_code=False).eval().to(device)
            self._tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        except ModelError as err:
            raise RewardError(f"reward model {folder}: {err}") from None
        except (OSError, ValueError, KeyError) as err:
            raise RewardError(f"reward model {folder}: not a sequence-classification model folder "
                              f"that transformers can load without remote code: {err}") from None
        labels = int(self._model.config.num_labels)
        if labels not in (1, 2):
            raise RewardError(f"reward model {folder}: has {labels} labels; a reward needs 1 (a score) or 2 "
                              "(its label-1 log-odds is the score)")
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token or self._tokenizer.unk_token
            self._model.config.pad_token_id = self._tokenizer.pad_token_id
        self._labels, self._device, self._torch = labels, device, torch

    @property
    def identity(self) -> Dict[str, Any]:
        return {"reward": "classifier", "weights": self._weights, "num_labels": self._labels,
                "max_length": self.max_length}

    def _score(self, prompts: List[str], completions: List[str]) -> List[float]:
        texts = [p + c for p, c in zip(prompts, completions)]
        encoded = self._tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                  max_length=self.max_length).to(self._device)
        with self._torch.no_grad():
            logits = self._model(**encoded).logits.float()
        scores = logits[:, 0] if self._labels == 1 else logits[:, 1] - logits[:, 0]
        return scores.cpu().tolist()


class CallableReward(Reward):
    """``module:function(prompts, completions) -> floats``, imported once."""

    def __init__(self, spec: str, batch_size: int = 64):
        module_name, _, attr = spec.partition(":")
        self.spec, self.batch_size = spec, batch_size
        if not module_name or not attr:
            raise RewardError(f"reward {spec!r}: expected 'vader', a model folder, or module:function")
        try:
            module = importlib.import_module(module_name)
        except Exception as err:  # the user's module: any import failure, named
            raise RewardError(f"reward {spec!r}: cannot import module {module_name!r}: {type(err).__name__}: {err}") from None
        function: Optional[Callable] = module
        for part in attr.split("."):
            function = getattr(function, part, None)
            if function is None:
                raise RewardError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        if not callable(function):
            raise RewardError(f"reward {spec!r}: {attr!r} is a {type(function).__name__}, not a function")
        self._function = function
        source = getattr(module, "__file__", None)
        self._source = hashlib.sha256(Path(source).read_bytes()).hexdigest() if source and Path(source).is_file() else None

    @property
    def identity(self) -> Dict[str, Any]:
        return {"reward": "callable", "spec": self.spec, "source_sha256": self._source}

    def _score(self, prompts: List[str], completions: List[str]) -> Any:
        try:
            return self._function(prompts, completions)
        except Exception as err:
            raise RewardError(f"reward {self.spec!r} raised {type(err).__name__}: {err}") from err


class JudgeReward(Reward):
    """A judge as a reward: each completion's debiased preference (:mod:`dpo_zoo.rewards.win_rate`, both
    orders) against the *baseline* completion of its prompt, so the mean reward of a set of completions
    is their win rate against the baselines. The baselines are given by :meth:`set_baselines` before
    scoring (``dpo-zoo study``: the held-out pairs' chosen responses); ``needs_baselines`` tells the
    caller so."""

    needs_baselines = True

    def __init__(self, judge):
        self.judge, self.spec, self.batch_size = judge, f"judge:{judge.spec}", 64
        self._baselines: Dict[str, str] = {}

    def set_baselines(self, prompts: Sequence[str], baselines: Sequence[str]) -> None:
        """The baseline response of each prompt (a prompt given twice keeps its last baseline)."""
        if len(prompts) != len(baselines):
            raise RewardError(f"reward {self.spec!r}: {len(prompts)} prompts but {len(baselines)} baselines")
        self._baselines.update(zip(prompts, baselines))

    @property
    def identity(self) -> Dict[str, Any]:
        return {"reward": "judge", "judge": self.judge.identity, "scores": "debiased preference against a baseline"}

    def _score(self, prompts: List[str], completions: List[str]) -> List[float]:
        from dpo_zoo.rewards.win_rate import debiased_preferences

        missing = [p for p in prompts if p not in self._baselines]
        if missing:
            raise RewardError(f"reward {self.spec!r}: no baseline response for the prompt {missing[0][:80]!r}")
        baselines = [self._baselines[p] for p in prompts]
        first = self.judge(prompts, completions, baselines)
        second = self.judge(prompts, baselines, completions)
        return debiased_preferences(first, second).tolist()


def load_reward(spec: str, *, device: str = "cpu") -> Reward:
    """The reward named by ``spec`` (module doc): ``vader``, a model folder, ``module:function`` or ``judge:<spec>``."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError(f"reward: expected 'vader', a model folder or module:function, got {spec!r}")
    spec = spec.strip()
    if spec == "vader":
        return VaderReward()
    if spec.startswith(JUDGE_PREFIX):  # before module:function, which the judge's own spec may be
        from dpo_zoo.rewards.judge import load_judge

        return JudgeReward(load_judge(spec[len(JUDGE_PREFIX):], device=device))
    path = Path(spec).expanduser()
    if path.is_dir():
        return ClassifierReward(path, device=device)
    if ":" in spec and not path.exists():
        return CallableReward(spec)
    if path.exists():
        raise RewardError(f"reward {spec!r}: a file, not a model folder; give the folder of a "
                          "sequence-classification model, 'vader', or module:function")
    raise RewardError(f"reward {spec!r}: no such model folder, not a built-in reward ({', '.join(BUILTIN_REWARDS)}) "
                      "and not of the form module:function")


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"

