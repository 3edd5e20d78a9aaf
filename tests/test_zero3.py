"""ZeRO-3 saves what `from_pretrained` loads: with LoRA, final/ is the adapter alone (gathered from the
partitions), equal to the one a ZeRO-0 run of the same steps saves, up to float32 rounding."""

import pytest

from dpo_zoo.config import load_config
from dpo_zoo.trainer import train


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
