"""Tiny offline models for tests: a real byte-level BPE tokenizer (trained here, with a chat template)
and a randomly initialised Llama of a few thousand parameters, saved as a plain `transformers` folder.

Nothing is downloaded. Building one takes well under a second.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

REPO_ROOT = Path(__file__).resolve().parents[1]
# The HH-RLHF harmless-base test split (Bai et al. 2022; MIT), shipped in the repository: data/hh_rlhf/.
HH_RLHF_TEST = REPO_ROOT / "data" / "hh_rlhf" / "harmless-base" / "test.jsonl.gz"


def _corpus(n_lines: int = 400):
    """Real English text to train the BPE on: the first HH-RLHF dialogues (shipped in data/hh_rlhf/)."""
    with gzip.open(HH_RLHF_TEST, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= n_lines:
                break
            row = json.loads(line)
            yield row["chosen"]
            yield row["rejected"]


def make_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model_dir(path: str | Path, seed: int = 0, hidden_size: int = 16, layers: int = 2) -> Path:
    """Save a tiny Llama + BPE tokenizer to ``path`` (safetensors) and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def write_hh_slice(path, n_rows: int = 60):
    """The first ``n_rows`` real HH-RLHF pairs as a plain jsonl file."""
    import itertools

    with gzip.open(HH_RLHF_TEST, "rt", encoding="utf-8") as f, open(path, "w", encoding="utf-8") as out:
        for line in itertools.islice(f, n_rows):
            out.write(line)
    return path


def tiny_overrides(model_dir, data_file, prep_dir, **extra):
    """Overrides for a fast experiment on the tiny model and a real HH slice."""
    values = {
        "model.name_or_path": str(model_dir),
        "data.preprocessor": "hh_rlhf",
        "data.train_path": str(data_file),
        "data.on_bad_row": "skip",
        "data.heldout_fraction": 0.2,
        "prep.output_dir": str(prep_dir),
        "prep.max_length": 96,
        "prep.max_prompt_length": 48,
        "prep.progress": "false",
        "prep.topk": 8,
        "train.progress": "false",
        "train.micro_batch_size": 2,
        "train.max_steps": 2,
        "train.learning_rate": 1e-3,
        "compare.progress": "false",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]
