"""Pairwise judges: which of two responses to the same prompt is better.

A judge maps ``(prompts, first, second)`` to the probability that the *first* response is better, one
float in [0, 1] per item (1: first, 0: second, ½: no preference). It is named by a *spec* string
(``compare.judge``; ``judge:<spec>`` as a reward, :mod:`dpo_zoo.rewards.scorers`):

* ``module:function``: a Python callable ``function(prompts, first, second)`` imported from an
  importable module, returning per item a float in [0, 1] or one of the letters ``"A"`` (first) /
  ``"B"`` (second) (``"tie"`` for ½);
* a local folder holding a ``transformers`` causal LM (safetensors only; its own code never run,
  ``trust_remote_code`` off): it reads :data:`JUDGE_INSTRUCTION` (through its chat template when it has
  one) and the judge's probability is ``softmax(logit_A, logit_B)[A]`` at the position after the
  question, over the single tokens ``A`` and ``B`` (the first token the model would write);
* an OpenAI-compatible endpoint, ``http(s)://host[:port]/v1#MODEL``: ``POST <url>/chat/completions``
  with the same instruction, ``max_tokens: 1``, ``temperature: 0`` and ``logprobs: true,
  top_logprobs: 5``; the probability is ``p_A / (p_A + p_B)`` from the first token's top log-probs when
  the server returns them, else 1 / 0 from the reply's first letter. ``MODEL`` is the model the server is
  asked for (the part after ``#``, which a URL never sends). ``OPENAI_API_KEY``, when set, is sent as
  the bearer token; ``DPO_ZOO_JUDGE_TIMEOUT`` (seconds, default 60) bounds each request.

Position bias is not handled here: :mod:`dpo_zoo.rewards.win_rate` asks every item in both orders.
Every judge raises :class:`JudgeError` naming its spec and the item when it cannot answer.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

from dpo_zoo.errors import UserError

JUDGE_SYSTEM = "You are a careful judge of answers. You compare two responses to the same prompt."
JUDGE_INSTRUCTION = (
    "Prompt:\n{prompt}\n\n"
    "Response A:\n{first}\n\n"
    "Response B:\n{second}\n\n"
    "Which response is better: more helpful, more correct and better written? "
    "Answer with the single letter A or B."
)


class JudgeError(UserError, ValueError):
    """A judge spec that cannot be loaded, or a judge that returned an unusable verdict."""


def judge_messages(prompt: str, first: str, second: str) -> List[Dict[str, str]]:
    """The chat messages a model or endpoint judge reads for one item."""
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_INSTRUCTION.format(prompt=prompt, first=first, second=second)}]


class Judge:
    """Base class: :meth:`__call__` checks lengths and values; subclasses implement :meth:`_judge`."""

    spec: str = ""
    batch_size: int = 8

    @property
    def identity(self) -> Dict[str, Any]:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _judge(self, prompts: List[str], first: List[str], second: List[str]) -> Sequence[Any]:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> np.ndarray:
        """P(first better) per item, judged ``batch_size`` items at a time."""
        prompts, first, second = list(prompts), list(first), list(second)
        if not len(prompts) == len(first) == len(second):
            raise JudgeError(f"judge {self.spec!r}: {len(prompts)} prompts, {len(first)} first and "
                             f"{len(second)} second responses")
        out: List[float] = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            verdicts = self._judge(prompts[start:stop], first[start:stop], second[start:stop])
            if isinstance(verdicts, (str, bytes)) or not hasattr(verdicts, "__len__") or \
                    len(verdicts) != len(prompts[start:stop]):
                got = len(verdicts) if hasattr(verdicts, "__len__") else type(verdicts).__name__
                raise JudgeError(f"judge {self.spec!r}: expected {len(prompts[start:stop])} verdicts, got {got}")
            out.extend(_verdict(self.spec, v, start + i) for i, v in enumerate(verdicts))
        return np.asarray(out, dtype=np.float64)


def _verdict(spec: str, value: Any, index: int) -> float:
    """One verdict as P(first better): a float in [0, 1], or the letter A / B (or "tie")."""
    if isinstance(value, str):
        letter = value.strip().upper()
        if letter in ("A", "B", "TIE"):
            return {"A": 1.0, "B": 0.0, "TIE": 0.5}[letter]
        raise JudgeError(f"judge {spec!r}: verdict {value!r} at item {index} is not A, B, tie or a probability")
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise JudgeError(f"judge {spec!r}: verdict {value!r} at item {index} is not A, B, tie or a probability")
    number = float(value)
    if not 0.0 <= number <= 1.0:  # also false for NaN
        raise JudgeError(f"judge {spec!r}: verdict {number} at item {index} is not a probability in [0, 1]")
    return number


class CallableJudge(Judge):
    """``module:function(prompts, first, second) -> verdicts``, imported once."""

    def __init__(self, spec: str):
        module_name, _, attr = spec.partition(":")
        self.spec, self.batch_size = spec, 64
        if not module_name or not attr:
            raise JudgeError(f"judge {spec!r}: expected module:function, a model folder, or http(s)://host/v1#model")
        try:
            module = importlib.import_module(module_name)
        except Exception as err:  # the user's module: any import failure, named
            raise JudgeError(f"judge {spec!r}: cannot import module {module_name!r}: {type(err).__name__}: {err}") from None
        function: Any = module
        for part in attr.split("."):
            function = getattr(function, part, None)
            if function is None:
                raise JudgeError(f"judge {spec!r}: module {module_name!r} has no attribute {attr!r}")
        if not callable(function):
            raise JudgeError(f"judge {spec!r}: {attr!r} is a {type(function).__name__}, not a function")
        self._function: Callable = function
        source = getattr(module, "__file__", None)
        self._source = hashlib.sha256(Path(source).read_bytes()).hexdigest() if source and Path(source).is_file() else None

    @property
    def identity(self) -> Dict[str, Any]:
        return {"judge": "callable", "spec": self.spec, "source_sha256": self._source}

    def _judge(self, prompts, first, second):
        try:
            return self._function(prompts, first, second)
        except Exception as err:
            raise JudgeError(f"judge {self.spec!r} raised {type(err).__name__}: {err}") from err


class ModelJudge(Judge):
    """A local causal LM reading :data:`JUDGE_INSTRUCTION`; P(A) from its next-token logits of A and B."""

    def __init__(self, folder: Path, device: str = "cpu", batch_size: int = 4):
        import torch

        from dpo_zoo.model.loading import ModelError, load_model, load_tokenizer, weights_fingerprint

        self.spec, self.batch_size, self._device, self._torch = str(folder), batch_size, device, torch
        try:
            self._model = load_model(folder, dtype="float32", trust_remote_code=False).to(device)
            self._tokenizer = load_tokenizer(folder, trust_remote_code=False)
            self._weights = weights_fingerprint(folder)
        except ModelError as err:
            raise JudgeError(f"judge model {folder}: {err}") from None
        except (OSError, ValueError, KeyError) as err:
            raise JudgeError(f"judge model {folder}: not a causal LM folder that transformers can load without "
                             f"remote code: {err}") from None
        self._letters = [self._single_token(letter) for letter in ("A", "B")]

    def _single_token(self, letter: str) -> int:
        ids = self._tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise JudgeError(f"judge model {self.spec}: its tokenizer writes {letter!r} as {len(ids)} tokens; "
                             "a model judge needs A and B to be one token each")
        return int(ids[0])

    @property
    def identity(self) -> Dict[str, Any]:
        return {"judge": "model", "weights": self._weights, "instruction": JUDGE_INSTRUCTION}

    def _text(self, prompt: str, first: str, second: str) -> str:
        messages = judge_messages(prompt, first, second)
        if getattr(self._tokenizer, "chat_template", None):
            return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{messages[0]['content']}\n\n{messages[1]['content']}\n\nAnswer:"

    def _judge(self, prompts, first, second):
        torch = self._torch
        rows = [self._tokenizer(self._text(p, a, b), add_special_tokens=not getattr(self._tokenizer, "chat_template", None))["input_ids"]
                for p, a, b in zip(prompts, first, second)]
        width = max(len(r) for r in rows)
        pad = self._tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: the last position is every row's next token
            ids[i, width - len(row):] = torch.as_tensor(row)
            mask[i, width - len(row):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = self._model(input_ids=ids.to(self._device), attention_mask=mask.to(self._device),
                                 position_ids=positions.to(self._device)).logits[:, -1].float()
        pair = logits[:, self._letters]
        return torch.softmax(pair, dim=-1)[:, 0].cpu().tolist()


class EndpointJudge(Judge):
    """An OpenAI-compatible chat-completions endpoint (module doc)."""

    def __init__(self, spec: str):
        url, _, model = spec.partition("#")
        if not model:
            raise JudgeError(f"judge {spec!r}: name the model the endpoint should run after '#', "
                             "e.g. http://127.0.0.1:8000/v1#my-judge")
        self.spec, self.batch_size = spec, 16
        self._url, self._model = url.rstrip("/") + "/chat/completions", model
        self._timeout = float(os.environ.get("DPO_ZOO_JUDGE_TIMEOUT", "60"))

    @property
    def identity(self) -> Dict[str, Any]:
        return {"judge": "endpoint", "url": self._url, "model": self._model, "instruction": JUDGE_INSTRUCTION}

    def _judge(self, prompts, first, second):
        return [self._one(p, a, b) for p, a, b in zip(prompts, first, second)]

    def _one(self, prompt: str, first: str, second: str) -> float:
        import urllib.error
        import urllib.request

        body = json.dumps({"model": self._model, "messages": judge_messages(prompt, first, second), "max_tokens": 1,
                           "temperature": 0, "logprobs": True, "top_logprobs": 5}).encode()
        headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        request = urllib.request.Request(self._url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                reply = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")[:300]
            raise JudgeError(f"judge {self.spec!r}: {self._url} answered HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as err:
            raise JudgeError(f"judge {self.spec!r}: cannot reach {self._url}: {err}") from None
        except ValueError as err:
            raise JudgeError(f"judge {self.spec!r}: {self._url} did not answer JSON: {err}") from None
        return self._read(reply)

    def _read(self, reply: Any) -> float:
        try:
            choice = reply["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"judge {self.spec!r}: the reply has no choices: {str(reply)[:200]}") from None
        top = (((choice.get("logprobs") or {}).get("content") or [{}])[0] or {}).get("top_logprobs") or []
        mass = {"A": 0.0, "B": 0.0}
        for candidate in top:
            token = str(candidate.get("token", "")).strip().upper()
            if token in mass:
                mass[token] += float(np.exp(float(candidate.get("logprob", -np.inf))))
        if mass["A"] + mass["B"] > 0:
            return mass["A"] / (mass["A"] + mass["B"])
        content = str((choice.get("message") or {}).get("content") or "").strip()
        if content[:1].upper() in ("A", "B"):
            return 1.0 if content[:1].upper() == "A" else 0.0
        raise JudgeError(f"judge {self.spec!r}: the reply {content[:80]!r} names neither A nor B")


def load_judge(spec: str, *, device: str = "cpu") -> Judge:
    """The judge named by ``spec`` (module doc)."""
    if not isinstance(spec, str) or not spec.strip():
        raise JudgeError(f"judge: expected module:function, a model folder or http(s)://host/v1#model, got {spec!r}")
    spec = spec.strip()
    if spec.startswith(("http://", "https://")):
        return EndpointJudge(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelJudge(path, device=device)
    if ":" in spec and not path.exists():
        return CallableJudge(spec)
    raise JudgeError(f"judge {spec!r}: no such model folder, not an http(s) endpoint and not of the form module:function")
