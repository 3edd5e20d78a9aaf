"""The checkout stands on its own: the data it uses ships inside it, and no tracked file names a path
outside it (a sibling folder such as ``../<name>``, or an absolute path of some machine).

`.ci/run` runs the whole suite from a copy of the checkout in an empty temporary folder, which catches
what is read at run time; this test catches what is written down (configs, docs, recorded results).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
from pathlib import Path
from typing import List, Tuple

import pytest

from tiny import HH_RLHF_TEST, REPO_ROOT

HH_RLHF_SHA256 = "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03"

# A path that climbs out of the folder it is read from: `../<name>` (once or more).
PARENT_PATH = re.compile(r"(?<![\w.])(?:\.\./)+[\w.\-/]*")
# Absolute paths whose first folder belongs to a machine or a person, not to the project.
MACHINE_PATH = re.compile(
    r"(?<![\w.~$%}\-])/(?:work|home|root|Users|mnt|scratch|tmp|gpfs|lustre)/[\w.\-]"
    r"|\b[A-Za-z]:\\(?:Users|home)\\"
)


def outside_paths(text: str, file: Path, root: Path) -> List[Tuple[int, str]]:
    """(line, path) for every path in ``text`` (the content of ``file`` in checkout ``root``) that names
    a place outside the checkout. A ``../`` path is allowed only when, taken from the file's own folder,
    it stays inside the checkout and names something that exists there (a link between docs)."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for match in PARENT_PATH.finditer(line):
            relative = match.group(0).rstrip(".")
            target = (root / file).parent / relative
            inside = target.resolve().is_relative_to(root.resolve())
            if not (inside and target.exists()):
                found.append((number, match.group(0)))
        found += [(number, m.group(0)) for m in MACHINE_PATH.finditer(line)]
    return found


def tracked_files() -> List[Path]:
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"not a git checkout, cannot list tracked files: {err}")
    return [Path(p) for p in listing.stdout.decode("utf-8").split("\0") if p]


def test_no_tracked_file_names_a_path_outside_the_checkout():
    files = tracked_files()
    assert Path("README.md") in files and Path("tests/test_self_contained.py") in files
    problems = []
    for file in files:
        path = REPO_ROOT / file
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary (the gzipped data)
        text = data.decode("utf-8", errors="replace")
        problems += [f"{file}:{line}: {what}" for line, what in outside_paths(text, file, REPO_ROOT)]
    assert not problems, "tracked files name paths outside the checkout:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "file, text, flagged",
    [
        ("configs/experiments/x.yaml", "train_path: .." + "/shared/data/hh.jsonl.gz", True),
        ("README.md", "see .." + "/other_project/notes.md", True),
        ("tests/tiny.py", 'Path(__file__).parents[2] / "x"  # ../..' + "/sibling_data/x", True),
        ("bench/results/r.json", '"data": "/' + 'work/shared/data/hh.jsonl.gz"', True),
        ("bench/results/r.json", '"path": "/' + 'tmp/tt/run2/prepared/train"', True),
        ("docs/x.md", "cd /" + "home/alice/dpo_zoo", True),
        ("docs/x.md", "C:\\" + "Users\\alice\\dpo_zoo", True),
        ("docs/papers.md", "[the README](../README.md)", False),
        ("configs/experiments/hh_smollm2.yaml", "train_path: data/hh_rlhf/harmless-base/test.jsonl.gz", False),
        ("launch/demo.sh", "#!/usr/bin/env bash; cache in ~/.cache/dpo_zoo and $HOME/.cache", False),
        ("README.md", "https://huggingface.co/datasets/Anthropic/hh-rlhf/tree/main/harmless-base", False),
    ],
)
def test_outside_paths_flags_siblings_and_machine_paths(file, text, flagged):
    assert bool(outside_paths(text, Path(file), REPO_ROOT)) is flagged


def test_the_hh_rlhf_split_ships_with_its_licence_and_provenance():
    """The exact file of anthropics/hh-rlhf (harmless-base/test.jsonl.gz), its MIT licence and a README."""
    assert hashlib.sha256(HH_RLHF_TEST.read_bytes()).hexdigest() == HH_RLHF_SHA256
    with gzip.open(HH_RLHF_TEST, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 2312 and all(set(r) == {"chosen", "rejected"} for r in rows)
    folder = HH_RLHF_TEST.parent.parent
    licence = (folder / "LICENSE").read_text(encoding="utf-8")
    assert licence.startswith("MIT License") and "Copyright (c) 2022 Anthropic" in licence
    readme = (folder / "README.md").read_text(encoding="utf-8")
    assert "anthropics/hh-rlhf" in readme and "354e5c3" in readme and HH_RLHF_SHA256 in readme
