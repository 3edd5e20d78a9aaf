"""Reference-free losses: no reference model is loaded, no reference column is read, and prep can skip
the reference pass (``prep.reference=false``); a loss that needs the reference refuses such a set.

Checked by watching what the trainer does (the model loader and the prepared-set reads are wrapped),
not by reading the code.
"""

import json
from pathlib import Path

import pytest
import torch

from dpo_zoo.cache import reader as cache_module
from dpo_zoo.model import loading as models_module
from dpo_zoo.train.batching import REFERENCE_COLUMNS
from dpo_zoo.config import load_config
from dpo_zoo.errors import CacheError, TrainingError
from dpo_zoo.cache.prep import run_prep
from dpo_zoo.train.trainer import train

from tiny import tiny_overrides, write_hh_slice

# The registry's reference-free losses (they declare ``reference_free``); SimPO's defaults β = 2, γ = 0.5.
FREE = ("simpo", "cpo")


@pytest.fixture
def watched(monkeypatch):
    """Record every model load (path) and every column list read from a prepared set."""
    seen = {"loads": [], "columns": []}
    real_load, real_table = models_module.load_model, cache_module.PreparedSet.table

    def load_model(path, *args, **kwargs):
        seen["loads"].append(str(path))
        return real_load(path, *args, **kwargs)

    def table(self, indices=None, columns=None):
        seen["columns"].append(list(self.columns if columns is None else columns))
        return real_table(self, indices, columns)

    monkeypatch.setattr(models_module, "load_model", load_model)
    monkeypatch.setattr(cache_module.PreparedSet, "table", table)
    return seen


def _train(overrides, out_dir, *extra):
    return train(load_config([], [*overrides, f"train.output_dir={out_dir}", *extra]))


@pytest.mark.parametrize("name", FREE)
def test_the_declaration_drops_reference_fields(name):
    from dpo_zoo.losses import build_loss

    loss = build_loss(name)
    assert not loss.needs_reference
    assert loss.needed_fields() and not [f for f in loss.needed_fields() if f.startswith("reference_")]


def test_simpo_needs_no_reference_tensor():
    from dpo_zoo.losses import compute_loss

    # SimPO (β = 2, γ = 0.5) on mean log-probs −1 and −2: −log σ(2·(−1 − (−2)) − 0.5) = −log σ(1.5).
    out = compute_loss("simpo", policy_chosen_token_logps=[[-1.0, -1.0]], policy_rejected_token_logps=[[-2.0, -2.0]],
                       chosen_mask=[[1, 1]], rejected_mask=[[1, 1]])
    assert out.losses.item() == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(1.5)).item(), rel=1e-6)


@pytest.mark.parametrize("name, reference", [("simpo", "auto"), ("cpo", "live")])
def test_a_reference_free_run_loads_no_reference_and_reads_no_reference_column(
        name, reference, watched, tiny_prepared, tmp_path):
    final = _train(tiny_prepared, tmp_path / reference, f"loss={name}", f"train.reference={reference}",
                   "train.eval_every=1", "train.max_steps=2")
    assert len(watched["loads"]) == 1, watched["loads"]  # the policy only
    assert watched["columns"], "the trainer read no rows at all"
    for columns in watched["columns"]:
        assert not REFERENCE_COLUMNS & set(columns), columns
    record = json.loads((final.parent / "run.json").read_text())
    assert record["reference"] == "none"
    logged = [json.loads(line) for line in open(final.parent / "logs.jsonl")]
    assert any("eval_loss" in r for r in logged)


def test_a_reference_needing_live_run_loads_the_reference_and_a_cached_one_reads_its_columns(watched, tiny_prepared,
                                                                                             tmp_path):
    """The other side of the same watch: it does see a reference when there is one."""
    _train(tiny_prepared, tmp_path / "live", "loss=dpo", "train.reference=live")
    assert len(watched["loads"]) == 2
    watched["columns"].clear()
    _train(tiny_prepared, tmp_path / "cache", "loss=dpo", "train.reference=cache")
    assert any({"ref_chosen_logps", "ref_rejected_logps"} <= set(c) for c in watched["columns"])


@pytest.fixture(scope="module")
def prepared_without_reference(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("no-reference")
    data = write_hh_slice(root / "hh.jsonl", 16)
    overrides = tiny_overrides(tiny_model_dir, data, root / "prepared", **{"prep.topk": 0, "prep.reference": "false"})
    from dpo_zoo.cache import prep as prep_module

    real_load = prep_module.load_model
    loads = []
    prep_module.load_model = lambda *a, **k: loads.append(a) or real_load(*a, **k)
    try:
        run_prep(load_config([], overrides))
    finally:
        prep_module.load_model = real_load
    assert loads == [], "prep.reference=false loaded a model"
    return overrides, root / "prepared"


def test_prep_without_reference_says_so_in_key_and_manifest(prepared_without_reference):
    _, root = prepared_without_reference
    for split in ("train", "heldout"):
        manifest = json.loads((root / split / "manifest.json").read_text())
        assert manifest["key"]["reference_source"] == "none" and manifest["key"]["model_weights"] is None
        assert not REFERENCE_COLUMNS & set(manifest["columns"])
        assert manifest["provides"] == ["ties", "weights"]
        assert cache_module.verify_prepared_set(root / split)["pairs"] == manifest["counts"]["pairs"]
    assert not cache_module.PreparedSet.open(root / "train").has_reference


def test_prep_without_reference_is_another_cache_key(prepared_without_reference, tiny_prepared):
    """Same data and model with and without the reference pass: the keys differ in reference_source."""
    _, root = prepared_without_reference
    key = json.loads((root / "train" / "manifest.json").read_text())["key"]
    other = Path([o.split("=", 1)[1] for o in tiny_prepared if o.startswith("prep.output_dir=")][0])
    with_reference = json.loads((other / "train" / "manifest.json").read_text())["key"]
    assert with_reference["reference_source"] == "model" and key["reference_source"] == "none"


@pytest.mark.parametrize("name", FREE)
def test_a_reference_free_loss_trains_on_a_set_without_reference(name, prepared_without_reference, watched,
                                                                 tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    overrides, _ = prepared_without_reference
    final = _train(overrides, tmp_path / name, f"loss={name}")
    assert len(watched["loads"]) == 1
    before, after = load_file(str(Path(tiny_model_dir) / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("mode", ["auto", "cache"])
def test_a_reference_needing_loss_refuses_a_set_without_reference(mode, prepared_without_reference, tmp_path):
    overrides, root = prepared_without_reference
    with pytest.raises(TrainingError) as info:
        _train(overrides, tmp_path / "dpo", "loss=dpo", f"train.reference={mode}")
    message = str(info.value)
    assert "reference_chosen_logps" in message and "prep.reference=false" in message and str(root / "train") in message


def test_a_reference_needing_loss_trains_live_on_a_set_without_reference(prepared_without_reference, watched, tmp_path):
    overrides, _ = prepared_without_reference
    _train(overrides, tmp_path / "dpo", "loss=dpo", "train.reference=live")
    assert len(watched["loads"]) == 2


@pytest.mark.parametrize("setting", ["prep.topk=4", "prep.reference_logps_path=refs.jsonl"])
def test_prep_without_reference_refuses_settings_that_need_one(setting, tiny_model_dir, tmp_path):
    data = write_hh_slice(tmp_path / "hh.jsonl", 4)
    overrides = tiny_overrides(tiny_model_dir, data, tmp_path / "prepared", **{"prep.topk": 0, "prep.reference": "false"})
    with pytest.raises(CacheError, match=f"{setting.split('=')[0]}.*prep.reference=false"):
        run_prep(load_config([], [*overrides, setting]))
