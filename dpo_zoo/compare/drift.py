"""Drift of a policy from its reference: KL estimated on sampled completions (``dpo-zoo compare``).

``compare.kl_prompts`` held-out prompts (evenly spaced through the set, so every source of a
mixed set is represented) × ``compare.kl_samples`` completions of at most
``compare.kl_max_new_tokens`` tokens are sampled from the policy at temperature 1 (no top-k/top-p;
a seeded generator, ``train.seed``), stopping at the EOS token. On each sample, with the base model as
reference: the Monte Carlo estimate ``Σ_t log π(y_t|y_<t) − log π_ref(y_t|y_<t)``, the Rao–Blackwellized
estimate ``Σ_t KL(π(·|y_<t) ‖ π_ref(·|y_<t))`` (exact over the vocabulary at each sampled prefix; Amini,
Vieira & Cotterell, *Better Estimation of the Kullback–Leibler Divergence Between Language Models*,
NeurIPS 2025, arXiv:2504.10637) and the policy's entropy ``Σ_t H(π(·|y_<t))``. Both estimators are
unbiased for the KL between the two models' distributions over completions truncated at EOS or the
token limit (the same stopping rule applies to both models); the RB one has variance ≤ MC's and is never
negative. Each is reported with its standard error ``std/√n`` over the samples.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from dpo_zoo.cache import format as S
from dpo_zoo.model.logps import completion_logps
from dpo_zoo.metrics import functions as M


def _cache_keyword(model) -> str:
    """The name ``model.forward`` takes the key/value cache under: ``cache`` in recent transformers
    (which deprecates ``past_key_values``), ``past_key_values`` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()


def kl_prompt_ids(heldout, n_prompts: int) -> List[List[int]]:
    """Prompt token ids of ``n_prompts`` held-out pairs spread evenly through the set (all when fewer)."""
    n = len(heldout)
    if n == 0 or n_prompts == 0:
        return []
    indices = sorted(set(np.linspace(0, n - 1, num=min(n_prompts, n)).round().astype(int).tolist()))
    rows = heldout.rows(indices, columns=[S.CHOSEN_INPUT_IDS, S.CHOSEN_COMPLETION_START])
    return [list(r[S.CHOSEN_INPUT_IDS][: r[S.CHOSEN_COMPLETION_START]]) for r in rows]


@torch.no_grad()
def sample_completions(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_token_id: Optional[int],
                       pad_token_id: int, generator: torch.Generator, device: torch.device) -> List[List[int]]:
    """One completion per prompt, sampled from ``model`` at temperature 1 (the plain softmax: no top-k,
    top-p or penalties), ending at the first EOS (kept) or after ``max_new_tokens`` tokens.

    Prompts of a batch are left-padded and decoded together with the key/value cache; positions count
    from each prompt's first real token, so padding changes no value.
    """
    if not prompts or max_new_tokens <= 0:
        return [[] for _ in prompts]
    cache_keyword = _cache_keyword(model)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        attention[i, width - len(prompt):] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
    cache, logits = getattr(out, cache_keyword), out.logits[:, -1]
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    steps: List[torch.Tensor] = []
    for step in range(max_new_tokens):
        probs = torch.softmax(logits.float(), dim=-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        steps.append(token.masked_fill(finished, -1))  # -1 marks "already ended"
        if eos_token_id is not None:
            finished = finished | (token == eos_token_id)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=token.unsqueeze(-1), attention_mask=attention, position_ids=positions,
                    use_cache=True, **{cache_keyword: cache})
        cache, logits = getattr(out, cache_keyword), out.logits[:, -1]
    tokens = torch.stack(steps, dim=1).cpu().tolist()
    return [[t for t in row if t >= 0] for row in tokens]


def sequence_kl_terms(policy_vocab_logps: torch.Tensor, reference_vocab_logps: torch.Tensor,
                      labels: torch.Tensor, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-sample KL estimates and entropy from per-position log-distributions ``[N,T,V]``.

    With ``p_t = π(·|y_<t)`` and ``q_t = π_ref(·|y_<t)`` at the sampled prefixes:

    * ``mc``  = ``Σ_t log p_t(y_t) − log q_t(y_t)`` (the plain Monte Carlo estimator of KL(π‖π_ref));
    * ``rb``  = ``Σ_t Σ_v p_t(v) (log p_t(v) − log q_t(v))`` (Rao–Blackwellized, arXiv:2504.10637:
      the conditional expectation of the MC term at each position given the prefix);
    * ``entropy`` = ``Σ_t −Σ_v p_t(v) log p_t(v)``; ``tokens`` = the number of positions.

    Entries with ``p_t(v) = 0`` contribute 0 (``0 · log 0 = 0``), never NaN.
    """
    mask_f = mask.to(policy_vocab_logps.dtype)
    p = policy_vocab_logps.exp()
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    kl_terms = torch.where(p > 0, p * (policy_vocab_logps - reference_vocab_logps), zero).sum(-1)
    entropy_terms = torch.where(p > 0, -p * policy_vocab_logps, zero).sum(-1)
    index = labels.clamp(min=0).unsqueeze(-1)
    log_ratio = (policy_vocab_logps.gather(-1, index) - reference_vocab_logps.gather(-1, index)).squeeze(-1)
    return {
        "mc": (log_ratio * mask_f).sum(-1),
        "rb": (kl_terms * mask_f).sum(-1),
        "entropy": (entropy_terms * mask_f).sum(-1),
        "tokens": mask_f.sum(-1),
    }


def kl_samples(policy, reference, prompts: Sequence[Sequence[int]], *, n_samples: int, max_new_tokens: int,
               eos_token_id: Optional[int], pad_token_id: int, batch_size: int, seed: int, device: torch.device,
               progress: bool = True, desc: str = "kl") -> Dict[str, Any]:
    """Sample ``n_samples`` completions per prompt from ``policy`` and score each under both models.

    Returns per-sample arrays ``mc``, ``rb``, ``entropy``, ``tokens`` and the ``completions`` (token ids),
    prompt-major. The log-probs of the samples come from :func:`dpo_zoo.model.logps.completion_logps` on
    ``prompt + completion`` (the shared code path), not from the sampling loop.
    """
    from tqdm.auto import tqdm

    generator = torch.Generator(device=device).manual_seed(seed)
    rows = [list(p) for p in prompts for _ in range(n_samples)]
    result: Dict[str, List] = {"mc": [], "rb": [], "entropy": [], "tokens": [], "completions": []}
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", disable=not progress):
        chunk = rows[start:start + batch_size]
        completions = sample_completions(policy, chunk, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                         pad_token_id=pad_token_id, generator=generator, device=device)
        sequences = [p + c for p, c in zip(chunk, completions)]
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, sequence in enumerate(sequences):
            input_ids[i, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
            attention[i, : len(sequence)] = 1
        starts = torch.tensor([len(p) for p in chunk], dtype=torch.long)
        input_ids, attention, starts = input_ids.to(device), attention.to(device), starts.to(device)
        with torch.no_grad():
            mine = completion_logps(policy, input_ids, attention, starts, vocab=True)
            theirs = completion_logps(reference, input_ids, attention, starts, vocab=True)
        terms = sequence_kl_terms(mine.vocab_logps, theirs.vocab_logps, mine.labels, mine.mask)
        for name, value in terms.items():
            result[name].append(_as_numpy(value))
        result["completions"].extend(completions)
    out: Dict[str, Any] = {name: np.concatenate(result[name]) if result[name] else np.zeros(0)
                           for name in ("mc", "rb", "entropy", "tokens")}
    out["completions"] = result["completions"]
    return out


def summarize_kl(samples: Dict[str, Any]) -> Dict[str, Any]:
    """Means with standard errors of the per-sample estimates, and the mean entropy per token."""
    mc, rb = M.mean_and_stderr(samples["mc"]), M.mean_and_stderr(samples["rb"])
    tokens = float(np.sum(samples["tokens"]))
    return {
        "mc": mc["mean"], "mc_stderr": mc["stderr"],
        "rb": rb["mean"], "rb_stderr": rb["stderr"],
        "entropy_per_token": float(np.sum(samples["entropy"]) / tokens) if tokens else math.nan,
        "mean_length": float(np.mean(samples["tokens"])) if len(samples["tokens"]) else math.nan,
        "n_samples": mc["n"],
    }
