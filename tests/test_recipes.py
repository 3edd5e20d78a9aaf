"""The two GPU recipes on Hub names (configs/experiments/zephyr_ultrafeedback.yaml, dpo_paper_hh.yaml)
load, resolve and carry their sources' values. Nothing is trained or downloaded: the model and data set
names are checked as Hub names, and data.hub through the same parser prep uses."""

from pathlib import Path

import pytest

from data_prep.hub import hub_settings
from dpo_zoo.config import as_dict, load_config
from dpo_zoo.model.loading import is_hub_repo_id

REPO = Path(__file__).resolve().parents[1]
ZEPHYR = REPO / "configs" / "experiments" / "zephyr_ultrafeedback.yaml"
DPO_PAPER = REPO / "configs" / "experiments" / "dpo_paper_hh.yaml"


def pairs_per_step(cfg, gpus=1):
    return cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * gpus


@pytest.mark.parametrize("path", [ZEPHYR, DPO_PAPER], ids=lambda p: p.stem)
def test_recipe_resolves_to_hub_names(path):
    cfg = load_config([path])
    assert is_hub_repo_id(cfg.model.name_or_path) and not Path(cfg.model.name_or_path).exists()
    assert cfg.model.revision == "main"
    settings = hub_settings(as_dict(cfg)["data"])
    assert settings is not None and is_hub_repo_id(settings.path) and not settings.local
    assert settings.split and settings.heldout_split and settings.split != settings.heldout_split
    assert cfg.loss.name == "dpo" and cfg.loss.beta == 0.1
    assert cfg.train.output_dir.endswith("/dpo")  # ${loss.name} resolved
    assert "NOT RUN HERE" in path.read_text()


def test_zephyr_recipe_has_the_handbook_values():
    cfg = load_config([ZEPHYR])
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert hub_settings(as_dict(cfg)["data"]).path == "HuggingFaceH4/ultrafeedback_binarized"
    assert (cfg.data.hub.split, cfg.data.hub.heldout_split) == ("train_prefs", "test_prefs")
    assert cfg.data.preprocessor == "ultrafeedback"
    assert cfg.train.learning_rate == 5e-7 and cfg.train.lr_schedule == "cosine" and cfg.train.epochs == 3
    assert pairs_per_step(cfg) == 128 == 8 * 2 * 8  # per device x accumulation x GPUs of the handbook
    steps = -(-3 * 61_100 // 128)  # 3 epochs of train_prefs (~61.1k rows) at 128 pairs per step
    assert cfg.train.warmup_steps == round(0.1 * steps)  # warmup_ratio 0.1
    assert (cfg.prep.max_length, cfg.prep.max_prompt_length) == (1024, 512)
    assert cfg.train.precision == "bfloat16" and cfg.train.weight_decay == 0.0


def test_dpo_paper_recipe_has_the_paper_values():
    cfg = load_config([DPO_PAPER])
    assert cfg.model.name_or_path == "EleutherAI/pythia-2.8b"
    assert hub_settings(as_dict(cfg)["data"]).path == "Anthropic/hh-rlhf"
    assert (cfg.data.hub.split, cfg.data.hub.heldout_split) == ("train", "test")
    assert cfg.data.preprocessor == "hh_rlhf" and cfg.data.options.as_messages is False
    assert cfg.prep.chat_template == "none" and cfg.prep.truncation_mode == "keep_end"
    assert pairs_per_step(cfg) == 64
    assert cfg.train.learning_rate == 1e-6 and cfg.train.warmup_steps == 150
    assert cfg.train.lr_schedule == "constant" and cfg.train.epochs == 1
    assert (cfg.prep.max_length, cfg.prep.max_prompt_length) == (512, 256)
    assert cfg.train.max_grad_norm == 10.0 and cfg.data.max_heldout_pairs == 256
