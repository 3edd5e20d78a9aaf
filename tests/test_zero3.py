"""ZeRO-3 saves what `from_pretrained` loads: with LoRA, final/ is the adapter alone (gathered from the
partitions), equal to the one a ZeRO-0 run of the same steps saves, up to float32 rounding."""

import pytest

from dpo_zoo.config import load_config
from dpo_zoo.train.trainer import train


@pytest.mark.slow
@pytest.mark.float_sensitive
def test_zero3_lora_adapter_loads_and_equals_zero0(tiny_prepared, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapters = {}
    for stage in (0, 3):
        out = tmp_path / f"zero{stage}"
        train(load_config([], list(tiny_prepared) + [
            "train.lora.enabled=true", "train.max_steps=2", f"train.deepspeed.zero_stage={stage}", f"train.output_dir={out}"]))
        assert not (out / "final" / "model.safetensors").exists()  # the adapter alone, not the full model
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "final")
        adapters[stage] = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    assert adapters[3].keys() == adapters[0].keys() and adapters[0]
    assert max(adapters[0][k].abs().max().item() for k in adapters[0] if "lora_B" in k) > 1e-4  # it trained
    for name in adapters[0]:
        # Same steps, another reduction order: Adam moves each weight by about lr per step, rounding far less.
        assert (adapters[3][name] - adapters[0][name]).abs().max().item() <= 1e-6, name


def test_lockstep_batches_even_out_the_ranks():
    """5 rows, batches of 1, 2 ranks: rank 0 runs rows 0, 2, 4 and rank 1 rows 1, 3; under ZeRO-3 rank 1
    re-runs its first batch once, uncounted, so both run three forward passes."""
    from dpo_zoo.model.sharded_reference import lockstep_batches

    assert lockstep_batches(5, 1, 0, 2, lockstep=True) == [(0, True), (2, True), (4, True)]
    assert lockstep_batches(5, 1, 1, 2, lockstep=True) == [(1, True), (3, True), (1, False)]
    assert lockstep_batches(5, 1, 1, 2, lockstep=False) == [(1, True), (3, True)]
    # A rank with no rows at all re-runs the set's first batch.
    assert lockstep_batches(2, 2, 1, 2, lockstep=True) == [(0, False)]
    assert lockstep_batches(0, 2, 0, 2, lockstep=True) == []
    # Every row is counted exactly once over the ranks.
    for n, b, w in [(7, 2, 3), (12, 3, 2), (1, 4, 4)]:
        counted = [r for rank in range(w) for start, c in lockstep_batches(n, b, rank, w, True) if c
                   for r in range(start, min(start + b, n))]
        assert sorted(counted) == list(range(n))
        assert len({len(lockstep_batches(n, b, rank, w, True)) for rank in range(w)}) == 1


@pytest.mark.slow
@pytest.mark.float_sensitive
def test_two_process_zero3_partitions_the_live_reference(tiny_model_dir, tmp_path):
    """Full fine-tuning under ZeRO-3 on 2 processes with a live reference: the reference is partitioned
    (each rank holds half of its parameter bytes), and the per-step and held-out losses equal one
    process's with the whole reference and the same global batch. The held-out set has 10
    pairs in batches of 4 over 2 ranks, so the ranks hold different numbers of held-out batches (the
    lockstep re-run)."""
    import json
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    from dpo_zoo.parallel.process_group import _free_port
    from dpo_zoo.cache.prep import run_prep
    from dpo_zoo.model.sharded_reference import lockstep_batches
    from tiny import tiny_overrides, write_hh_slice

    data_file = write_hh_slice(tmp_path / "hh.jsonl", n_rows=55)
    common = tiny_overrides(tiny_model_dir, data_file, tmp_path / "prepared") + [
        "train.max_steps=3", "train.reference=live", "train.learning_rate=1e-4", "train.eval_every=2"]
    run_prep(load_config([], common))
    heldout_rows = sum(s["rows"] for s in json.loads((tmp_path / "prepared" / "heldout" / "manifest.json").read_text())["shards"])
    own_batches = [len(lockstep_batches(heldout_rows, 4, rank, 2, lockstep=False)) for rank in (0, 1)]
    assert own_batches[0] != own_batches[1], (heldout_rows, own_batches)  # e.g. 10 pairs: 2 batches and 1

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env.update(DS_ACCELERATOR="cpu", NUM_GPUS="2", MASTER_PORT=str(_free_port()),
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    two = tmp_path / "two"
    result = subprocess.run(
        ["bash", str(Path(__file__).resolve().parents[1] / "launch" / "single_node.sh"), "train", *common,
         "train.micro_batch_size=4", "train.deepspeed.zero_stage=3", f"train.output_dir={two}"],
        env=env, capture_output=True, text=True, timeout=900)
    said = result.stdout + result.stderr
    assert result.returncode == 0, said[-4000:]
    held, full = (int(x.replace(",", "")) for x in
                  re.search(r"live reference partitioned \(ZeRO-3\): rank 0 holds ([\d,]+) of its ([\d,]+)", said).groups())
    assert full / 2 <= held <= full / 2 + 4 * 64  # half, plus at most one padding element per tensor

    one = tmp_path / "one"
    train(load_config([], common + ["train.micro_batch_size=8", f"train.output_dir={one}"]))

    def logged(out, key):
        return [r[key] for r in map(json.loads, open(out / "logs.jsonl")) if key in r]

    assert len(logged(two, "loss")) == 3 and len(logged(two, "eval_loss")) == 2
    for key in ("loss", "eval_loss", "eval_rewards/accuracies"):
        assert logged(two, key) == pytest.approx(logged(one, key), abs=1e-6), key


@pytest.mark.slow
@pytest.mark.float_sensitive
def test_two_process_zero3_lora_adapter_equals_one_process(tiny_prepared, tiny_model_dir, tmp_path):
    """LoRA under ZeRO-3 on 2 processes (launch/single_node.sh): final/ is the adapter alone, gathered
    from both ranks' partitions, and equals a one-process ZeRO-0 run with the same global batch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dpo_zoo.parallel.process_group import _free_port

    common = list(tiny_prepared) + ["train.lora.enabled=true", "train.max_steps=2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env.update(DS_ACCELERATOR="cpu", NUM_GPUS="2", MASTER_PORT=str(_free_port()),
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    result = subprocess.run(
        ["bash", str(Path(__file__).resolve().parents[1] / "launch" / "single_node.sh"), "train", *common,
         "train.micro_batch_size=1", "train.deepspeed.zero_stage=3", f"train.output_dir={tmp_path / 'two'}"],
        env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "world=2" in result.stdout and "zero=3" in result.stdout
    train(load_config([], common + ["train.micro_batch_size=2", "train.deepspeed.zero_stage=0",
                                    f"train.output_dir={tmp_path / 'one'}"]))
    adapters = {}
    for name in ("two", "one"):
        final = tmp_path / name / "final"
        assert not (final / "model.safetensors").exists()  # the adapter alone
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final)
        adapters[name] = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    assert adapters["two"].keys() == adapters["one"].keys() and adapters["one"]
    assert max(adapters["one"][k].abs().max().item() for k in adapters["one"] if "lora_B" in k) > 1e-4
    for key in adapters["one"]:
        assert (adapters["two"][key] - adapters["one"][key]).abs().max().item() <= 1e-6, key
