"""The pairwise win rate of ``dpo-zoo compare`` (``compare.judge``): samples, both orders, the rates.

With ``compare.judge`` set, each subject samples one completion for each of ``compare.judge_prompts``
held-out prompts (spread evenly through the set, like the KL prompts), at temperature 1, at most
``compare.judge_max_new_tokens`` tokens, from a generator seeded with ``train.seed`` (every subject and
the baseline draw with the same seed). The baseline (``compare.judge_baseline``) is ``reference`` —
each subject's own base model, sampled the same way — or the label or folder of one of the compared
runs. The judge (:mod:`dpo_zoo.rewards.judge`) sees every (prompt, subject's completion, baseline's
completion) twice, the subject's first and then second; :mod:`dpo_zoo.rewards.win_rate` turns the two
verdicts into the debiased preference, the win rate ± SE and the length-controlled win rate ± SE
(lengths in tokens of the completions). The prompt the judge reads is the held-out prompt as text
(a message list as ``role: content`` lines); completions are decoded without special tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dpo_zoo.cache import format as S
from dpo_zoo.errors import CompareError
from dpo_zoo.rewards.win_rate import summarize_judgements

REFERENCE_BASELINE = "reference"


@dataclass
class JudgeSamples:
    """One model's completions for the judge's prompts: decoded texts and token counts."""

    texts: List[str]
    lengths: List[int]


def prompt_text(raw: str) -> str:
    """A stored prompt (JSON text: a string or a message list) as the text a judge reads."""
    value = json.loads(raw)
    if isinstance(value, str):
        return value
    return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in value)


def judge_prompts(heldout, n_prompts: int):
    """(prompt token ids, prompt texts) of ``n_prompts`` held-out pairs spread evenly through the set."""
    n = len(heldout)
    if n == 0 or n_prompts == 0:
        return [], []
    indices = sorted(set(np.linspace(0, n - 1, num=min(n_prompts, n)).round().astype(int).tolist()))
    rows = heldout.rows(indices, columns=[S.CHOSEN_INPUT_IDS, S.CHOSEN_COMPLETION_START, S.PROMPT_TEXT])
    return ([list(r[S.CHOSEN_INPUT_IDS][: r[S.CHOSEN_COMPLETION_START]]) for r in rows],
            [prompt_text(r[S.PROMPT_TEXT]) for r in rows])


def sample_for_judge(model, prompt_ids: Sequence[Sequence[int]], tokenizer, *, max_new_tokens: int, batch_size: int,
                     seed: int, device: torch.device) -> JudgeSamples:
    """One completion per prompt from ``model`` (module doc), decoded."""
    from dpo_zoo.compare.drift import sample_completions

    generator = torch.Generator(device=device).manual_seed(seed)
    texts, lengths = [], []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        completions = sample_completions(model, chunk, max_new_tokens=max_new_tokens,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                         generator=generator, device=device)
        texts += [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        lengths += [len(c) for c in completions]
    return JudgeSamples(texts, lengths)


def judge_pair(judge, prompts: Sequence[str], candidate: JudgeSamples, baseline: JudgeSamples) -> Dict[str, Any]:
    """Both orders through ``judge``; the summary of :func:`~dpo_zoo.rewards.win_rate.summarize_judgements`."""
    candidate_first = judge(prompts, candidate.texts, baseline.texts)
    baseline_first = judge(prompts, baseline.texts, candidate.texts)
    return summarize_judgements(candidate_first, baseline_first, candidate.lengths, baseline.lengths)


def resolve_baseline(setting: str, subjects: Sequence[Any]) -> Optional[Any]:
    """None for the reference baseline; else the compared subject that ``setting`` names (label or folder)."""
    if setting == REFERENCE_BASELINE:
        return None
    for subject in subjects:
        if setting == subject.label or Path(setting).resolve() == Path(subject.path).resolve():
            return subject
    raise CompareError(f"compare.judge_baseline={setting!r}: neither 'reference' nor one of the compared runs "
                       f"({', '.join(s.label for s in subjects)})")


def win_rates(cfg, subjects: Sequence[Any], samples: Dict[str, JudgeSamples], heldout, bases,
              device: torch.device) -> Dict[str, Any]:
    """Each subject's win rate against the baseline (``by_subject``, keyed by subject label; the baseline
    run itself has none) and the judge's settings (``settings``), as ``summary.json`` records them.
    ``samples``: each subject's :class:`JudgeSamples`; ``bases``: the base models (``BaseModels``)."""
    from dpo_zoo.model.loading import load_tokenizer
    from dpo_zoo.rewards.judge import load_judge

    c = cfg.compare
    judge = load_judge(str(c.judge), device=str(device))
    baseline_subject = resolve_baseline(str(c.judge_baseline), subjects)
    prompt_ids, prompts = judge_prompts(heldout, int(c.judge_prompts))
    reference_samples: Dict[str, JudgeSamples] = {}
    out: Dict[str, Any] = {}
    texts: Dict[str, Dict[str, List[str]]] = {}  # what was judged, kept in summary.json
    for subject in subjects:
        if subject is baseline_subject:
            continue
        if baseline_subject is not None:
            baseline = samples[baseline_subject.label]
        else:  # the subject's base model, sampled once per base with the same seed and settings
            key = str(subject.base_model)
            if key not in reference_samples:
                reference_samples[key] = sample_for_judge(
                    bases.get(subject.base_model), prompt_ids, load_tokenizer(subject.base_model),
                    max_new_tokens=int(c.judge_max_new_tokens), batch_size=int(c.batch_size),
                    seed=int(cfg.train.seed), device=device)
            baseline = reference_samples[key]
        out[subject.label] = judge_pair(judge, prompts, samples[subject.label], baseline)
        texts[subject.label] = {"completions": samples[subject.label].texts, "baseline": baseline.texts}
    settings = {"judge": str(c.judge), "identity": judge.identity,
                "baseline": baseline_subject.label if baseline_subject is not None else REFERENCE_BASELINE,
                "prompts": len(prompts), "max_new_tokens": int(c.judge_max_new_tokens), "prompt_texts": prompts,
                "judged": texts}
    return {"by_subject": out, "settings": settings}


def chosen_baselines(heldout, n_prompts: int, tokenizer) -> Tuple[List[str], List[str]]:
    """(prompt texts, chosen responses) of the held-out pairs :func:`~dpo_zoo.compare.drift.kl_prompt_ids`
    picks, decoded without special tokens: the baselines of a judge reward in ``dpo-zoo study``."""
    n = len(heldout)
    if n == 0 or n_prompts == 0:
        return [], []
    indices = sorted(set(np.linspace(0, n - 1, num=min(n_prompts, n)).round().astype(int).tolist()))
    rows = heldout.rows(indices, columns=[S.CHOSEN_INPUT_IDS, S.CHOSEN_COMPLETION_START])
    prompts = [tokenizer.decode(r[S.CHOSEN_INPUT_IDS][: r[S.CHOSEN_COMPLETION_START]], skip_special_tokens=True)
               for r in rows]
    chosen = [tokenizer.decode(r[S.CHOSEN_INPUT_IDS][r[S.CHOSEN_COMPLETION_START]:], skip_special_tokens=True)
              for r in rows]
    return prompts, chosen
