"""prep.zero3: the reference model partitioned over two prep processes (DeepSpeed ZeRO-3 inference,
started by launch/single_node.sh) writes the cache one process writes with the whole model."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_zoo.config import load_config
from dpo_zoo.cache.prep import run_prep
from dpo_zoo.parallel.process_group import _free_port
from tiny import tiny_overrides, write_hh_slice

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_partitioned_reference_writes_the_unsharded_cache(tiny_model_dir, tmp_path):
    data_file = write_hh_slice(tmp_path / "hh.jsonl")
    common = ["prep.shard_size=16"]  # 4 train shards: rank 0 has 2, rank 1 has 2 (and the held-out shard)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env.update(DS_ACCELERATOR="cpu", NUM_GPUS="2", MASTER_PORT=str(_free_port()),
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    result = subprocess.run(
        ["bash", str(REPO / "launch" / "single_node.sh"), "prep",
         *tiny_overrides(tiny_model_dir, data_file, tmp_path / "sharded"), *common, "prep.zero3=true"],
        env=env, capture_output=True, text=True, timeout=900)
    said = result.stdout + result.stderr
    assert result.returncode == 0, said[-4000:]
    run_prep(load_config([], tiny_overrides(tiny_model_dir, data_file, tmp_path / "whole") + common))

    # Each rank held half of every parameter (rounded up: ZeRO-3 pads a partition to a multiple of 2).
    held = {int(r): (int(h.replace(",", "")), int(f.replace(",", ""))) for r, h, f in
            re.findall(r"rank (\d): holds ([\d,]+) of the reference's ([\d,]+) parameter bytes", said)}
    assert sorted(held) == [0, 1]
    for mine, full in held.values():
        assert full / 2 <= mine <= full / 2 + 4 * 64  # at most one padding element per parameter tensor

    for split in ("train", "heldout"):
        sharded = json.loads((tmp_path / "sharded" / split / "manifest.json").read_text())
        whole = json.loads((tmp_path / "whole" / split / "manifest.json").read_text())
        for manifest in (sharded, whole):
            manifest.pop("created"), manifest["layout"].pop("world_size")
        assert sharded == whole
        for shard in whole["shards"]:
            assert (tmp_path / "sharded" / split / shard["file"]).read_bytes() == \
                (tmp_path / "whole" / split / shard["file"]).read_bytes()
