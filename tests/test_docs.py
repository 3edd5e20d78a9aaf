"""The docs cannot drift from the code: generated tables equal what the registry says now."""

import subprocess
import sys

from dpo_zoo.config import REPO_ROOT
from dpo_zoo.docs import generated_docs


def test_generated_docs_are_up_to_date():
    for path, text in generated_docs().items():
        assert path.exists(), f"{path} missing: run `python -m dpo_zoo.docs`"
        assert path.read_text() == text, f"{path} is stale: run `python -m dpo_zoo.docs`"


def test_loss_table_in_docs_equals_the_cli_output():
    printed = subprocess.run(
        [sys.executable, "-m", "dpo_zoo.cli", "losses"], capture_output=True, text=True, check=True
    ).stdout
    table = [line for line in printed.splitlines() if line.startswith("|")]
    docs = (REPO_ROOT / "docs" / "losses.md").read_text().splitlines()
    start = docs.index(table[0])
    assert docs[start : start + len(table)] == table
    assert len(table) > 20  # header, separator and one row per registered name


def test_paper_index_names_every_paper_of_the_registry():
    from dpo_zoo.losses import registered_losses

    text = (REPO_ROOT / "docs" / "papers.md").read_text()
    for entry in registered_losses().values():
        assert f"arXiv:{entry.cls.arxiv}" in text
