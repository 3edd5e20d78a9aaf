"""The docs cannot drift from the code: generated tables equal what the registry says now."""

from dpo_zoo.config import REPO_ROOT
from dpo_zoo.docs import generated_docs


def test_generated_docs_are_up_to_date():
    for path, text in generated_docs().items():
        assert path.exists(), f"{path} missing: run `python -m dpo_zoo.docs`"
        assert path.read_text() == text, f"{path} is stale: run `python -m dpo_zoo.docs`"


def test_loss_table_in_docs_equals_the_cli_output(capsys):
    from dpo_zoo.cli import main

    assert main(["losses"]) == 0
    printed = capsys.readouterr().out
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


def test_loss_maths_covers_every_registered_name_with_its_formula_paper_and_defaults():
    """docs/loss_maths.md is where the maths lives: every name has a section with its paper (arXiv id),
    a formula (a docstring that states the loss, ``L = …`` or a displayed block) and its defaults."""
    from dpo_zoo.losses import registered_losses

    text = (REPO_ROOT / "docs" / "loss_maths.md").read_text()
    sections = text.split("\n## ")[1:]
    for name, entry in registered_losses().items():
        section = next((s for s in sections if f"`{name}`" in s.split("\n", 1)[0]), None)
        assert section is not None, f"docs/loss_maths.md has no section for {name}"
        assert f"arXiv:{entry.cls.arxiv}" in section, name
        assert "L = " in section or "L_" in section or "::" in section, f"{name}: no formula in its section"
        defaults = ", ".join(f"{k}={v}" for k, v in entry.defaults().items()) or "none"
        assert f"| `{name}` | {defaults} |" in section, f"{name}: defaults missing"


def test_no_tracked_code_or_doc_points_outside_the_repository_for_the_maths():
    for path in list((REPO_ROOT / "dpo_zoo").rglob("*.py")) + list((REPO_ROOT / "docs").glob("*.md")) + [REPO_ROOT / "README.md"]:
        text = path.read_text()
        # The parent-folder form is built here so that this test does not itself name a path outside
        # the checkout (tests/test_self_contained.py checks every tracked file for that).
        for outside in ("shared/spec", "spec §", "/".join(("..", "shared"))):
            assert outside not in text, f"{path} refers to {outside!r}; the maths is in docs/loss_maths.md"


def test_results_md_regenerates_from_its_summaries_to_the_same_bytes(tmp_path):
    """docs/results.md is generated from the studies' summaries (copied beside it), never edited by
    hand: regenerating it from copies of those summaries gives the same file."""
    import re
    import shutil

    from dpo_zoo.study.results import write_results

    docs = REPO_ROOT / "docs"
    text = (docs / "results.md").read_text(encoding="utf-8")
    names = re.findall(r"\(((?:results_summary\d*)\.json)\)", text)
    assert names[0] == "results_summary.json" and len(names) == len(set(names))
    for name in names:
        shutil.copyfile(docs / name, tmp_path / name)
    assert write_results([str(tmp_path / name) for name in names], str(tmp_path / "results.md")) == text
    for picture in re.findall(r"\]\((results_frontier\d*\.png)\)", text):
        assert (docs / picture).read_bytes().startswith(b"\x89PNG")
    # Every claim of the issue is there with a verdict.
    for claim in ("SamPO", "H-DPO", "Rao–Kupper", "Davidson", "forward KL", "Jensen–Shannon", "IS-DAA", "Ra-DPO",
                  "TDPO", "DPO: higher β"):
        row = next(line for line in text.splitlines() if line.startswith("| ") and claim in line.split(" | ")[0])
        assert re.search(r"\*\*(reproduced|not reproduced|equivalent|inconclusive)\*\*", row), claim
