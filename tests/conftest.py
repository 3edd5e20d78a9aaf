import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tiny import make_tiny_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama + real BPE tokenizer with a chat template, as a `transformers` folder."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


HH_FILE = "/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz"


def write_hh_slice(path, n_rows: int = 60):
    """The first ``n_rows`` real HH-RLHF pairs as a plain jsonl file."""
    import gzip
    import itertools
    from pathlib import Path

    source = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
    with gzip.open(source, "rt", encoding="utf-8") as f, open(path, "w", encoding="utf-8") as out:
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
