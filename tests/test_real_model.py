"""The real SmolLM2-135M-Instruct model (from its PyPI package) trains with LoRA from the CLI."""

import json
import os
import subprocess
import sys

import pytest

from tiny import HH_RLHF_TEST as HH


@pytest.mark.slow
@pytest.mark.float_sensitive
def test_smollm2_lora_trains_from_the_cli_with_a_falling_loss(tmp_path):
    """16 real HH pairs, 4 per step: after one epoch the same pairs come back, and their loss is lower."""
    overrides = [
        "data.preprocessor=hh_rlhf", f"data.train_path={HH}", "data.on_bad_row=skip",
        "data.max_train_pairs=16", "data.max_heldout_pairs=4",
        f"prep.output_dir={tmp_path / 'prepared'}", "prep.max_length=128", "prep.max_prompt_length=64",
        "prep.progress=false",
        f"train.output_dir={tmp_path / 'run'}", "train.lora.enabled=true", "train.lora.r=8",
        "train.micro_batch_size=4", "train.max_steps=12", "train.learning_rate=2e-3", "train.lr_schedule=constant",
        "train.progress=false", "loss=dpo",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for command in ("prep", "train"):
        result = subprocess.run([sys.executable, "-m", "dpo_zoo.cli", command, *overrides], env=env,
                                capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in open(tmp_path / "run" / "logs.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12
    assert losses[0] == pytest.approx(0.6931471805599453, abs=1e-4)  # LoRA B = 0: policy = reference
    first_epoch, last_epoch = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last_epoch < first_epoch - 0.05, losses
    adapter = tmp_path / "run" / "final" / "adapter_model.safetensors"
    assert adapter.exists()
