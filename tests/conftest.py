import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tiny import make_tiny_model_dir, tiny_overrides, write_hh_slice  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama + real BPE tokenizer with a chat template, as a `transformers` folder."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory, tiny_model_dir):
    """A prepared tiny HH slice (train + held-out, top-8 reference distribution) and its overrides."""
    from dpo_zoo.config import load_config
    from dpo_zoo.prep import run_prep

    root = tmp_path_factory.mktemp("tiny-prepared")
    data_file = write_hh_slice(root / "hh.jsonl")
    overrides = tiny_overrides(tiny_model_dir, data_file, root / "prepared")
    run_prep(load_config([], overrides))
    return overrides
