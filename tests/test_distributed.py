"""Two processes started by launch/single_node.sh (the real `deepspeed` launcher; gloo on the CPU) train
like one process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_zoo.config import load_config
from dpo_zoo.parallel.process_group import _free_port
from dpo_zoo.train.trainer import train


def step_losses(out_dir):
    return [r["loss"] for r in map(json.loads, open(Path(out_dir) / "logs.jsonl")) if "loss" in r]


@pytest.mark.slow
@pytest.mark.float_sensitive
def test_two_process_zero2_matches_one_process(tiny_prepared, tmp_path):
    """ZeRO-2 over 2 ranks × micro-batch 1 sees the same pairs per step as 1 rank × micro-batch 2, and
    DeepSpeed averages the ranks' gradients: the per-step losses agree."""
    common = list(tiny_prepared) + ["train.max_steps=3", "train.deepspeed.zero_stage=2", "train.learning_rate=1e-5"]
    two = tmp_path / "two"
    assert shutil.which("deepspeed", path=os.path.dirname(sys.executable)), "installed with the deepspeed package"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "NUM_GPUS": "2", "MASTER_PORT": str(_free_port()),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    result = subprocess.run(
        ["bash", str(Path(__file__).resolve().parents[1] / "launch" / "single_node.sh"), "train", *common, "train.micro_batch_size=1", f"train.output_dir={two}"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "world=2" in result.stdout
    train(load_config([], common + ["train.micro_batch_size=2", f"train.output_dir={tmp_path / 'one'}"]))
    assert step_losses(two) == pytest.approx(step_losses(tmp_path / "one"), abs=1e-6)
    assert (two / "final" / "model.safetensors").exists()


def test_a_launched_command_exits_with_its_code_and_all_its_output(tiny_prepared):
    """Under a launcher (``RANK`` set) ``python -m dpo_zoo.cli`` skips interpreter teardown; what it
    printed (to a pipe with PYTHONUNBUFFERED unset, so block-buffered) and its exit code are those of the plain run, for a command
    that succeeds and one that fails."""
    prepared = next(o.split("=", 1)[1] for o in tiny_prepared if o.startswith("prep.output_dir="))
    results = {}
    for launched in (False, True):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "PYTHONUNBUFFERED")}
        if launched:
            env["RANK"] = "0"
        for target in (prepared, prepared + "-missing"):
            done = subprocess.run([sys.executable, "-m", "dpo_zoo.cli", "doctor", target], env=env,
                                  capture_output=True, text=True, timeout=300)
            results[launched, target] = done.returncode, done.stdout, done.stderr
    for target in (prepared, prepared + "-missing"):
        assert results[True, target] == results[False, target]
    assert results[True, prepared][0] == 0 and results[True, prepared][1].strip()
    assert results[True, prepared + "-missing"][0] == 2 and "doctor" in results[True, prepared + "-missing"][2]
