"""The exact benchmark's world: every completion can be enumerated, so reward, KL, entropy and length are
computed exactly rather than estimated from samples.

A study with a ``study.exact`` section trains and is judged in this world instead of on real text.

**The world** (all of it fixed by ``study.exact`` and its ``seed``):

* ``prompts`` one-token prompts ``p0, p1, …`` and ``tokens`` content tokens ``t0, t1, …``; a completion
  is 1 to ``max_length`` content tokens followed by EOS, so there are ``Σ_{L=1..max_length} K^L``
  completions per prompt (4 680 for K = 8, max_length = 4).
* **The known distribution** ``q(y | x)``: a first-order Markov chain per prompt. After the prompt and
  after each content token ``a`` the next token is EOS with probability ``σ(s[x, L])`` (never before the
  first content token; always after ``max_length``), else content token ``b`` with probability
  ``softmax(g[x, a])_b``; ``g ~ N(0, token_spread²)``, ``s ~ N(stop_bias, 0.5²)``.
* **The reference** ``π_ref`` is a small real transformer (a 2-layer Llama with a word-level tokenizer),
  fitted to ``q`` by minimising the exact ``KL(q ‖ π_ref)`` (cross-entropy at every prefix of the
  completion tree, weighted by ``q`` of the prefix: the chain rule makes their sum the sequence-level
  divergence). It is then an ordinary ``transformers`` folder: prep, training and compare use it as they
  use any model.
* **The reward** ``r(x, y) = mean_t w[x, y_t] + length_bias · (L − 1) / (max_length − 1)`` with
  ``w ~ N(0, 1)``: the mean keeps the first term length-neutral, so ``length_bias`` alone sets how much
  the reward likes longer completions (the length claims' world).
* **Preference pairs**: a prompt (in turn), two distinct completions drawn from ``π_ref`` (the DPO paper's
  on-policy data), labelled by Bradley–Terry ``P(y₁ ≻ y₂) = σ((r₁ − r₂) / temperature)``; a pair whose
  reward gap is below ``tie_margin`` is a tie (``tie: true``, the tie-aware losses' data). Train and
  held-out pairs go to two jsonl files in TRL's schema, read by the ``generic`` preprocessor.

**The policy's distribution** over completions is the model's next-token distribution restricted, at
each position, to the tokens a completion may have there (content tokens first, then content or EOS,
EOS after ``max_length``) and renormalised: the finite-horizon analogue of the sampled studies'
``max_new_tokens``. The reference is measured the same way, so KL is between two distributions on the
same finite set. The mass the unrestricted model puts outside it is reported (``invalid_mass``); the
fitted reference keeps it near zero, and a loss that pushes mass onto tokens no completion has shows it.

**Exact metrics** of a policy π, per prompt and then averaged over prompts (uniform):
``reward = Σ_y π(y) r(x, y)``; ``kl_rb = kl_mc = KL(π ‖ π_ref) = Σ_y π(y) log(π(y)/π_ref(y))`` (nats per
completion: there is nothing to Rao–Blackwellize, both names carry the exact value so every claim reads
it); ``entropy_per_token = H(π) / E_π[T]`` where ``T`` counts the generated tokens, EOS included (by the
chain rule ``H(π)`` is the expected sum of the next-token entropies along a completion, so this is the
sampled studies' per-position entropy without the noise); ``mean_length = E_π[T]``;
``reward_length_corr`` = the correlation of ``r`` and ``T`` under π. Standard errors are 0.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

WORLD_FORMAT = "dpo_zoo.exact_world.v1"

WORLD_DEFAULTS: Dict[str, Any] = {
    "seed": 0,              # the world's own seed: q, the reward table, the reference's fit, the pairs
    "tokens": 8,            # K content tokens
    "max_length": 4,        # content tokens of the longest completion (then EOS)
    "prompts": 4,           # one-token prompts
    "train_pairs": 256,
    "heldout_pairs": 64,
    "token_spread": 1.5,    # SD of the Markov chain's next-token logits g
    "stop_bias": -0.5,      # mean of the stop logits s
    "length_bias": 0.0,     # reward per unit of (L − 1)/(max_length − 1)
    "temperature": 0.5,     # Bradley–Terry temperature of the labels
    "tie_margin": 0.0,      # |r₁ − r₂| below this: a tie
    "hidden_size": 32,      # the reference transformer
    "layers": 2,
    "fit_steps": 150,       # Adam steps of the exact fit of π_ref to q
    "fit_lr": 0.01,
}

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


class WorldError(ValueError):
    pass


def check_settings(where: str, section: Any) -> Tuple[Dict[str, Any], List[str]]:
    """``study.exact`` with defaults filled in, and the problems with it (unknown keys, bad values)."""
    if not isinstance(section, dict):
        return dict(WORLD_DEFAULTS), [f"{where}: `study.exact`: expected a mapping of world settings, got {section!r}"]
    errors = [f"{where}: `study.exact.{k}`: unknown key (known: {', '.join(WORLD_DEFAULTS)})"
              for k in sorted(set(section) - set(WORLD_DEFAULTS))]
    settings = {**WORLD_DEFAULTS, **{k: v for k, v in section.items() if k in WORLD_DEFAULTS}}
    least = {"tokens": 2, "max_length": 1, "prompts": 1, "train_pairs": 1, "heldout_pairs": 1, "hidden_size": 4,
             "layers": 1, "fit_steps": 0, "seed": 0}
    for key, low in least.items():
        v = settings[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            errors.append(f"{where}: `study.exact.{key}`: expected an integer >= {low}, got {v!r}")
    for key in ("token_spread", "stop_bias", "length_bias", "temperature", "tie_margin", "fit_lr"):
        v = settings[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            errors.append(f"{where}: `study.exact.{key}`: expected a finite number, got {v!r}")
    if not errors:
        if settings["temperature"] <= 0 or settings["fit_lr"] <= 0 or settings["tie_margin"] < 0:
            errors.append(f"{where}: `study.exact`: temperature and fit_lr must be > 0 and tie_margin >= 0")
        if completions_per_prompt(settings["tokens"], settings["max_length"]) > 200_000:
            errors.append(f"{where}: `study.exact`: tokens^max_length is too large to enumerate "
                          f"({completions_per_prompt(settings['tokens'], settings['max_length'])} completions per prompt)")
    return settings, errors


def completions_per_prompt(tokens: int, max_length: int) -> int:
    return sum(tokens ** n for n in range(1, max_length + 1))


def world_hash(settings: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"format": WORLD_FORMAT, **settings}, sort_keys=True).encode()).hexdigest()[:16]


# ==================================================================== the completion tree


@dataclass
class Tree:
    """Every completion of one prompt, and the rows the model is run on to score all of them at once.

    ``rows[i]`` = the K^max_length content sequences of full length (base-K digits of i); a completion
    of length L with tokens a₁…a_L is scored from the row whose first L tokens are a₁…a_L (padding with
    token 0): a causal model's outputs at positions 0…L of that row are the next-token distributions
    after each of its prefixes. ``content[n, t]`` (−1 past the end), ``length[n]`` (content tokens),
    ``row[n]`` for each completion n."""

    tokens: int
    max_length: int
    rows: np.ndarray      # [R, max_length] content token indices
    content: np.ndarray   # [N, max_length] content token indices, −1 past the end
    length: np.ndarray    # [N] content tokens (the generated tokens are length + 1, with EOS)
    row: np.ndarray       # [N] the row that scores completion n

    @classmethod
    def build(cls, tokens: int, max_length: int) -> "Tree":
        R = tokens ** max_length
        digits = (np.arange(R)[:, None] // tokens ** np.arange(max_length - 1, -1, -1)[None, :]) % tokens
        content, length, row = [], [], []
        for n in range(1, max_length + 1):
            prefixes = (np.arange(tokens ** n)[:, None] // tokens ** np.arange(n - 1, -1, -1)[None, :]) % tokens
            padded = np.full((len(prefixes), max_length), -1, dtype=np.int64)
            padded[:, :n] = prefixes
            content.append(padded)
            length.append(np.full(len(prefixes), n))
            row.append(np.arange(tokens ** n) * tokens ** (max_length - n))  # the row with zeros after
        return cls(tokens, max_length, digits.astype(np.int64), np.concatenate(content), np.concatenate(length),
                   np.concatenate(row))

    def __len__(self) -> int:
        return len(self.length)


def valid_mask(tokens: int, max_length: int) -> np.ndarray:
    """[max_length + 1, tokens + 1] which outputs a completion may have at each position: content
    tokens 0…K−1, then EOS (index K)."""
    mask = np.zeros((max_length + 1, tokens + 1), dtype=bool)
    mask[:max_length, :tokens] = True
    mask[1:, tokens] = True
    return mask


# ==================================================================== the known distribution and reward


@dataclass
class WorldTables:
    g: np.ndarray  # [P, K + 1, K] next-token logits after the prompt (state 0) and after token a (state a+1)
    s: np.ndarray  # [P, max_length] stop logits after L = 1…max_length content tokens (the last: always stop)
    w: np.ndarray  # [P, K] per-token reward

    @classmethod
    def draw(cls, settings: Dict[str, Any]) -> "WorldTables":
        rng = np.random.default_rng([int(settings["seed"]), 1])
        P, K, M = settings["prompts"], settings["tokens"], settings["max_length"]
        g = rng.normal(0.0, float(settings["token_spread"]), size=(P, K + 1, K))
        s = rng.normal(float(settings["stop_bias"]), 0.5, size=(P, M))
        w = rng.normal(0.0, 1.0, size=(P, K))
        return cls(g, s, w)

    def q_next(self, tree: Tree) -> np.ndarray:
        """[P, R, max_length + 1, K + 1] q's next-token distribution at each position of each row."""
        P, K, M = self.g.shape[0], tree.tokens, tree.max_length
        state = np.concatenate([np.zeros((len(tree.rows), 1), dtype=np.int64), tree.rows + 1], axis=1)  # [R, M+1]
        logits = self.g[:, state, :]  # [P, R, M+1, K]
        tok = np.exp(logits - logits.max(-1, keepdims=True))
        tok /= tok.sum(-1, keepdims=True)
        stop = np.zeros((P, M + 1))
        stop[:, 1:M] = 1.0 / (1.0 + np.exp(-self.s[:, : M - 1]))
        stop[:, M] = 1.0
        stop = np.broadcast_to(stop[:, None, :, None], (P, len(tree.rows), M + 1, 1))
        return np.concatenate([tok * (1.0 - stop), stop], axis=-1)

    def reward(self, tree: Tree, length_bias: float) -> np.ndarray:
        """[P, N] r(x, y) of every completion (module doc)."""
        M = tree.max_length
        safe = np.where(tree.content >= 0, tree.content, 0)
        per_token = np.where(tree.content[None] >= 0, self.w[:, safe], 0.0)  # [P, N, M]
        mean = per_token.sum(-1) / tree.length[None]
        bonus = length_bias * (tree.length - 1) / max(M - 1, 1)
        return mean + bonus[None]


# ==================================================================== scoring a model exactly


def token_ids(prompts: int, tokens: int) -> Tuple[List[int], List[int], int]:
    """The vocabulary's layout: ``<pad> <eos> <unk> p0 … t0 …``: (prompt ids, content ids, EOS id)."""
    return [3 + i for i in range(prompts)], [3 + prompts + i for i in range(tokens)], 1


def completion_logps(model, tree: Tree, prompts: int, batch_rows: int = 8192) -> Tuple[np.ndarray, np.ndarray]:
    """(restricted, unrestricted) log π(y | x) of every completion, each [P, N] float64 (module doc:
    the restricted distribution renormalises over the tokens a completion may have at each position)."""
    import torch

    prompt_ids, content_ids, eos = token_ids(prompts, tree.tokens)
    outputs = torch.tensor([*content_ids, eos])
    allowed = torch.from_numpy(valid_mask(tree.tokens, tree.max_length))
    device = next(model.parameters()).device
    content = torch.tensor(content_ids)[torch.from_numpy(tree.rows)]  # [R, M]
    restricted, unrestricted = [], []
    with torch.no_grad():
        for p in prompt_ids:
            chunks_r, chunks_u = [], []
            for start in range(0, len(content), batch_rows):
                block = content[start:start + batch_rows]
                ids = torch.cat([torch.full((len(block), 1), p), block], dim=1).to(device)
                logits = model(input_ids=ids).logits.double().cpu()  # [B, M+1, V]
                full = torch.log_softmax(logits, dim=-1)[..., outputs]  # [B, M+1, K+1]
                masked = logits[..., outputs].masked_fill(~allowed, -math.inf)
                chunks_r.append(torch.log_softmax(masked, dim=-1))
                chunks_u.append(full)
            restricted.append(_score(torch.cat(chunks_r).numpy(), tree))
            unrestricted.append(_score(torch.cat(chunks_u).numpy(), tree))
    return np.stack(restricted), np.stack(unrestricted)


def _score(next_logps: np.ndarray, tree: Tree) -> np.ndarray:
    """Σ_t log p(y_t | y_<t) + log p(EOS | y) of each completion from the rows' next-token log-probs
    [R, M+1, K+1]."""
    K, M = tree.tokens, tree.max_length
    rows = next_logps[tree.row]  # [N, M+1, K+1]
    positions = np.arange(M)[None, :]
    picked = np.take_along_axis(rows[:, :M, :], np.where(tree.content >= 0, tree.content, 0)[:, :, None], axis=2)[..., 0]
    content_sum = np.where(positions < tree.length[:, None], picked, 0.0).sum(-1)
    return content_sum + rows[np.arange(len(tree)), tree.length, K]


def exact_metrics(logp: np.ndarray, ref_logp: np.ndarray, reward: np.ndarray, tree: Tree,
                  unrestricted: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """The module doc's exact metrics of π (log-probs [P, N]) against π_ref, averaged over prompts."""
    pi = np.exp(logp)
    pi /= pi.sum(-1, keepdims=True)  # already 1 up to rounding
    T = (tree.length + 1).astype(np.float64)[None]
    kl = (pi * (logp - ref_logp)).sum(-1)
    entropy = -(pi * logp).sum(-1)
    mean_t = (pi * T).sum(-1)
    mean_r = (pi * reward).sum(-1)
    cov = (pi * (reward - mean_r[:, None]) * (T - mean_t[:, None])).sum(-1)
    var_r = (pi * (reward - mean_r[:, None]) ** 2).sum(-1)
    var_t = (pi * (T - mean_t[:, None]) ** 2).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where((var_r > 1e-18) & (var_t > 1e-18), cov / np.sqrt(var_r * var_t), np.nan)
    out = {
        "reward": float(mean_r.mean()), "reward_se": 0.0,
        "kl_rb": float(kl.mean()), "kl_rb_se": 0.0, "kl_mc": float(kl.mean()), "kl_mc_se": 0.0,
        "rb_below_mc": None,
        "prompt_reward": [float(v) for v in mean_r], "prompt_kl_rb": [float(v) for v in kl],
        "entropy": float(entropy.mean()),
        "entropy_per_token": float(entropy.mean() / mean_t.mean()),
        "mean_length": float(mean_t.mean()),
        "distinct_1": math.nan, "distinct_2": math.nan,
        "reward_length_corr": float(np.nanmean(corr)) if np.isfinite(corr).any() else math.nan,
        "n_samples": 0, "exact": True,
    }
    if unrestricted is not None:
        out["invalid_mass"] = float((1.0 - np.exp(unrestricted).sum(-1)).mean())
    return out


# ==================================================================== building the world


@dataclass
class World:
    folder: Path
    settings: Dict[str, Any]
    tree: Tree
    reward: np.ndarray  # [P, N]

    @property
    def model_dir(self) -> Path:
        return self.folder / "model"

    @property
    def train_path(self) -> Path:
        return self.folder / "train.jsonl"

    @property
    def heldout_path(self) -> Path:
        return self.folder / "heldout.jsonl"

    @property
    def identity(self) -> str:
        return world_hash(self.settings)

    def text(self, n: int) -> str:
        """Completion ``n`` as the data files write it (a leading space: prompt + completion is the text)."""
        return "".join(f" t{a}" for a in self.tree.content[n][: self.tree.length[n]])


def world_paths(folder: Path) -> Dict[str, Path]:
    return {"model": folder / "model", "train": folder / "train.jsonl", "heldout": folder / "heldout.jsonl"}


def build_world(folder: Path, settings: Dict[str, Any], progress: bool = False) -> World:
    """The world of ``settings`` in ``folder`` (module doc): built once, reused while ``world.json``
    records the same settings. The fit and the pairs are deterministic in ``settings['seed']``."""
    folder = Path(folder)
    tree = Tree.build(settings["tokens"], settings["max_length"])
    tables = WorldTables.draw(settings)
    world = World(folder, dict(settings), tree, tables.reward(tree, float(settings["length_bias"])))
    record = folder / "world.json"
    if record.is_file():
        try:
            if json.loads(record.read_text()).get("identity") == world.identity and (world.model_dir / "config.json").is_file():
                return world
        except (OSError, ValueError):
            pass
    from dpo_zoo.files import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    model, fit = fit_reference(tables, tree, settings, progress)
    save_model(model, settings, world.model_dir)
    ref_logp, _ = completion_logps(model, tree, settings["prompts"])
    train, heldout, counts = draw_pairs(world, ref_logp)
    atomic_write_text(world.train_path, "".join(json.dumps(r) + "\n" for r in train))
    atomic_write_text(world.heldout_path, "".join(json.dumps(r) + "\n" for r in heldout))
    q_logp = np.log(np.maximum(_q_sequences(tables, tree), 1e-300))
    info = {"format": WORLD_FORMAT, "identity": world.identity, "settings": settings, "fit": fit, "pairs": counts,
            "completions_per_prompt": len(tree),
            "kl_q_to_reference": float((np.exp(q_logp) * (q_logp - ref_logp)).sum(-1).mean()),
            "reference_reward": float((np.exp(ref_logp) * world.reward).sum(-1).mean()),
            "best_reward": float(world.reward.max(-1).mean())}
    atomic_write_text(record, json.dumps(info, indent=1) + "\n")
    return world


def _q_sequences(tables: WorldTables, tree: Tree) -> np.ndarray:
    """[P, N] q(y | x) of every completion."""
    return np.exp(np.stack([_score(np.log(np.maximum(q, 1e-300)), tree) for q in tables.q_next(tree)]))


def fit_reference(tables: WorldTables, tree: Tree, settings: Dict[str, Any], progress: bool):
    """A small Llama fitted to q by the exact cross-entropy over the completion tree (module doc)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    P, K, M = settings["prompts"], settings["tokens"], settings["max_length"]
    prompt_ids, content_ids, eos = token_ids(P, K)
    torch.manual_seed(int(settings["seed"]))
    hidden = int(settings["hidden_size"])
    config = LlamaConfig(vocab_size=3 + P + K, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=int(settings["layers"]), num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max(16, M + 2), eos_token_id=eos, pad_token_id=0, bos_token_id=None,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    q = torch.from_numpy(tables.q_next(tree))  # [P, R, M+1, K+1]
    # Weight of row r at position t: q(prefix of length t) / (rows sharing that prefix), so that the sum
    # over rows is the expectation over the tree's nodes.
    q_seq_prefix = np.ones((P, len(tree.rows), M + 1))
    qn = tables.q_next(tree)
    for t in range(1, M + 1):
        picked = np.take_along_axis(qn[:, :, t - 1, :K], tree.rows[None, :, t - 1:t].repeat(P, 0), axis=2)[..., 0]
        q_seq_prefix[:, :, t] = q_seq_prefix[:, :, t - 1] * picked
    weights = torch.from_numpy(q_seq_prefix / (K ** (M - np.arange(M + 1)))[None, None, :])
    ids = torch.cat([torch.tensor(prompt_ids).repeat_interleave(len(tree.rows))[:, None],
                     torch.tensor(content_ids)[torch.from_numpy(tree.rows)].repeat(P, 1)], dim=1)
    outputs = torch.tensor([*content_ids, eos])
    q_flat, w_flat = q.reshape(-1, M + 1, K + 1).float(), weights.reshape(-1, M + 1).float()
    optim = torch.optim.Adam(model.parameters(), lr=float(settings["fit_lr"]))
    history = []
    for step in tqdm(range(int(settings["fit_steps"])), desc="fit reference", disable=not progress):
        logp = torch.log_softmax(model(input_ids=ids).logits, dim=-1)[..., outputs]  # [P·R, M+1, K+1]
        loss = -(w_flat * (q_flat * logp).sum(-1)).sum() / P
        optim.zero_grad()
        loss.backward()
        optim.step()
        if step % 50 == 0 or step == int(settings["fit_steps"]) - 1:
            history.append([step, float(loss.detach())])
    model.eval()
    return model, {"cross_entropy": history}


def save_model(model, settings: Dict[str, Any], target: Path) -> None:
    """The fitted reference with its word-level tokenizer, as a plain ``transformers`` folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    P, K = settings["prompts"], settings["tokens"]
    vocab = {PAD: 0, EOS: 1, UNK: 2, **{f"p{i}": 3 + i for i in range(P)}, **{f"t{i}": 3 + P + i for i in range(K)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(target), safe_serialization=True)
    fast.save_pretrained(str(target))


def draw_pairs(world: World, ref_logp: np.ndarray):
    """Train and held-out pairs (module doc): two distinct completions from π_ref, Bradley–Terry labels."""
    s = world.settings
    rng = np.random.default_rng([int(s["seed"]), 2])
    probs = np.exp(ref_logp)
    probs /= probs.sum(-1, keepdims=True)
    rows, ties = [], 0
    total = int(s["train_pairs"]) + int(s["heldout_pairs"])
    for i in range(total):
        x = i % s["prompts"]
        a = b = 0
        while a == b:
            a, b = rng.choice(len(world.tree), size=2, p=probs[x])
        gap = float(world.reward[x, a] - world.reward[x, b])
        tie = abs(gap) < float(s["tie_margin"])
        # σ(x) written through tanh: the same number, without exp overflowing at a tiny temperature.
        first_wins = rng.random() < 0.5 * (1.0 + math.tanh(gap / (2.0 * float(s["temperature"]))))
        chosen, rejected = (a, b) if (first_wins or tie) else (b, a)
        ties += tie
        rows.append({"id": f"pair{i:05d}", "prompt": f"p{x}", "chosen": world.text(chosen),
                     "rejected": world.text(rejected), "tie": bool(tie)})
    train, heldout = rows[: s["train_pairs"]], rows[s["train_pairs"]:]
    return train, heldout, {"train": len(train), "heldout": len(heldout), "ties": int(ties)}
