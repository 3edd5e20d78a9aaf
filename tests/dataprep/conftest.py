"""Fixtures for the data_prep tests: the tiny BPE tokenizer, and writers for small data files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tiny import HH_RLHF_TEST


@pytest.fixture(scope="session")
def hh_test_path() -> Path:
    """The real HH-RLHF harmless-base test split (2,312 rows), shipped in data/hh_rlhf/."""
    assert HH_RLHF_TEST.is_file(), f"{HH_RLHF_TEST} is missing; see data/hh_rlhf/README.md"
    return HH_RLHF_TEST


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _jsonl_bytes(rows) -> bytes:
    """Rows as JSON Lines; a `bytes` item is written as that raw line (for broken lines)."""
    lines = [r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode("utf-8") for r in rows]
    return b"\n".join(lines) + b"\n"


@pytest.fixture
def write_jsonl(tmp_path):
    def write(name: str, rows) -> Path:
        path = tmp_path / name
        data = _jsonl_bytes(rows)
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
        return path

    return write
