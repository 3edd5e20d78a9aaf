"""Sampling and scoring for the ``reward_pairs`` preprocessor (:mod:`data_prep.reward_pairs`).

``dpo-zoo prep`` builds a :class:`ShardedSampler` on the reference model and hands it to
``data_prep.load_splits`` as ``generate``. For each shard of ``shard_prompts`` prompts it draws
``samples_per_prompt`` completions per prompt with ``transformers``' ``generate`` (left-padded batches,
key/value cache, plain ancestral sampling at ``temperature``: no top-k, top-p or penalties, at most
``max_new_tokens`` new tokens, stopping at EOS), scores them with the reward (:mod:`dpo_zoo.rewards.scorers`) and
writes the shard atomically to ``<prep.output_dir>/generations/<key>/shard-NNNNN.json``.

The key is a sha256 over what the samples depend on: the model's weight hashes, the tokenizer, the
prompts, the sampling options, the seed and the reward's identity. A killed prep resumes at the first
missing shard; another setting writes under another key. Shard ``i`` is sampled after
``torch.manual_seed(seed · 1000003 + i)``, so a resumed run draws exactly what an uninterrupted one does.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from dpo_zoo.rewards.scorers import Reward, load_reward

# The options that change the samples or their scores (pairing and tie_threshold only re-pair them).
SAMPLE_OPTIONS = ("prompts", "num_prompts", "min_words", "max_words", "samples_per_prompt", "temperature",
                  "max_new_tokens", "seed", "shard_prompts")
FORMAT = "dpo_zoo.reward_pairs.v1"


class ShardedSampler:
    """``generate(prompts, options) -> data_prep.reward_pairs.Samples`` (module doc)."""

    def __init__(self, model_path: Path, tokenizer: Any, *, weights: Dict[str, str], tokenizer_hash: str,
                 work_dir: Path, dtype: str = "float32", device: str = "cpu", progress: bool = True):
        # A copy: padding a batch reconfigures a fast tokenizer's backend, which would change the
        # tokenizer fingerprint prep records (and the trainer then refuses the set).
        self.model_path, self.tokenizer, self.weights = Path(model_path), copy.deepcopy(tokenizer), weights
        self.tokenizer_hash, self.work_dir, self.dtype = tokenizer_hash, Path(work_dir), dtype
        self.device, self.progress = device, progress
        self._model = None

    def model(self):
        if self._model is None:
            from dpo_zoo.model.loading import load_model

            self._model = load_model(self.model_path, dtype=self.dtype).to(self.device)
        return self._model

    def key(self, prompts: List[str], options: Dict[str, Any], reward: Reward) -> str:
        record = {"format": FORMAT, "weights": self.weights, "tokenizer": self.tokenizer_hash,
                  "prompts": hashlib.sha256(json.dumps(prompts).encode("utf-8")).hexdigest(),
                  "options": {k: options[k] for k in SAMPLE_OPTIONS}, "reward": reward.identity}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode("utf-8")).hexdigest()[:20]

    def __call__(self, prompts: List[str], options: Dict[str, Any]):
        from tqdm.auto import tqdm

        from data_prep.reward_pairs import Samples

        reward = load_reward(options["reward"], device=self.device)
        folder = self.work_dir / self.key(prompts, options, reward)
        folder.mkdir(parents=True, exist_ok=True)
        size = int(options["shard_prompts"])
        completions: List[List[str]] = []
        rewards: List[List[float]] = []
        starts = range(0, len(prompts), size)
        for index, start in enumerate(tqdm(starts, desc="sample+score", unit="shard", disable=not self.progress)):
            path = folder / f"shard-{index:05d}.json"
            chunk = prompts[start:start + size]
            shard = _read_shard(path, chunk)
            if shard is None:
                torch.manual_seed(int(options["seed"]) * 1000003 + index)
                texts = self.sample(chunk, options)
                flat_prompts = [p for p in chunk for _ in range(int(options["samples_per_prompt"]))]
                scores = reward(flat_prompts, [t for group in texts for t in group]).tolist()
                k = int(options["samples_per_prompt"])
                shard = {"prompts": chunk, "completions": texts,
                         "rewards": [scores[i * k:(i + 1) * k] for i in range(len(chunk))]}
                _write_atomically(path, shard)
            completions.extend(shard["completions"])
            rewards.extend(shard["rewards"])
        origin = {"reward": reward.identity, "samples": folder.name}
        return Samples(completions, rewards, origin)

    @torch.no_grad()
    def sample(self, prompts: List[str], options: Dict[str, Any]) -> List[List[str]]:
        """``samples_per_prompt`` completions of each prompt (decoded, special tokens dropped)."""
        model, tokenizer = self.model(), self.tokenizer
        k, batch = int(options["samples_per_prompt"]), int(options["batch_size"])
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"  # generation appends on the right, so real tokens must end there
        out: List[List[str]] = []
        try:
            for start in range(0, len(prompts), batch):
                encoded = tokenizer(prompts[start:start + batch], return_tensors="pt", padding=True,
                                    add_special_tokens=True).to(self.device)
                generated = model.generate(
                    **encoded, do_sample=True, temperature=float(options["temperature"]), top_k=0, top_p=1.0,
                    repetition_penalty=1.0, max_new_tokens=int(options["max_new_tokens"]), num_return_sequences=k,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                new = generated[:, encoded["input_ids"].shape[1]:]
                texts = tokenizer.batch_decode(new, skip_special_tokens=True)
                out.extend(texts[i * k:(i + 1) * k] for i in range(len(texts) // k))
        finally:
            tokenizer.padding_side = side
        return out


def _read_shard(path: Path, prompts: List[str]) -> Optional[Dict[str, Any]]:
    """A finished shard for exactly these prompts, or None (missing or written by other settings)."""
    if not path.is_file():
        return None
    try:
        shard = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return shard if shard.get("prompts") == prompts else None


def _write_atomically(path: Path, value: Any) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
