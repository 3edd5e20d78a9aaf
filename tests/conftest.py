"""Shared fixtures, and the suite's rule for floats.

Floats: compare with equality only what is computed the same way (the same code path, batch shapes,
padding and thread count), e.g. a resumed run replaying the batches of an uninterrupted one, or two
losses read from one forward pass. Anything computed along another path (another batch size or
padding, the cached reference against a live pass, chunked against full logits, another thread count
or process) agrees only up to float32 rounding: compare it with a tolerance stated from that rounding
(ε₃₂ = 2⁻²³ ≈ 1.19e-7 relative to the magnitudes involved), or assert a property rounding cannot
change. Mark such tests ``@pytest.mark.float_sensitive``; ``make test-float`` runs them again with
``DPO_ZOO_TEST_THREADS=1`` and ``=2`` so that a hidden exactness assumption fails on any machine.

``DPO_ZOO_TEST_THREADS=N`` sets ``torch.set_num_threads(N)`` for the session, and ``OMP_NUM_THREADS``
so that the subprocesses tests start (the CLI, torchrun, the deepspeed launcher) use N threads too
unless a test sets its own.
"""

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    """Apply DPO_ZOO_TEST_THREADS before anything is collected (a bad value is a plain usage error)."""
    value = os.environ.get("DPO_ZOO_TEST_THREADS")
    if not value:
        return
    if not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"DPO_ZOO_TEST_THREADS must be a positive integer, got {value!r}")
    import torch

    torch.set_num_threads(int(value))
    os.environ["OMP_NUM_THREADS"] = value


from tiny import make_tiny_model_dir, tiny_overrides, write_hh_slice  # noqa: E402


def pytest_report_header(config):
    import torch

    return f"torch threads: {torch.get_num_threads()} (DPO_ZOO_TEST_THREADS={os.environ.get('DPO_ZOO_TEST_THREADS', 'unset')})"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama + real BPE tokenizer with a chat template, as a `transformers` folder."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory, tiny_model_dir):
    """A prepared tiny HH slice (train + held-out, top-8 reference distribution) and its overrides."""
    from dpo_zoo.config import load_config
    from dpo_zoo.cache.prep import run_prep

    root = tmp_path_factory.mktemp("tiny-prepared")
    data_file = write_hh_slice(root / "hh.jsonl")
    overrides = tiny_overrides(tiny_model_dir, data_file, root / "prepared")
    run_prep(load_config([], overrides))
    return overrides
