"""A mixture trains through the one trainer, logs each part's loss, and compare scores it and its parts."""

import json
import math

import pytest

from dpo_zoo.compare.runner import run_compare
from dpo_zoo.config import load_config
from dpo_zoo.losses import get_loss_entry
from dpo_zoo.train.trainer import train

MIXTURE = ["loss=dpo+hinge", "loss.weights=[1.0, 0.25]", "loss.beta=0.5"]


@pytest.fixture(scope="module")
def mixture_run(tiny_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixture") / "run"
    train(load_config([], [*tiny_prepared, *MIXTURE, f"train.output_dir={out}", "train.eval_every=1"]))
    return out


def test_the_log_carries_each_part_and_the_weighted_total(mixture_run):
    steps = [json.loads(line) for line in open(mixture_run / "logs.jsonl")]
    steps = [r for r in steps if "loss" in r]
    assert len(steps) == 2
    for record in steps:
        # Both are means over the same pairs, and the sum is linear: mean(L) = mean(L_dpo) + 0.25·mean(L_hinge).
        assert record["loss"] == pytest.approx(record["loss/dpo"] + 0.25 * record["loss/hinge"], rel=1e-5)
        assert "hinge/win_prob" in record
    run = json.loads((mixture_run / "run.json").read_text())
    assert run["loss"] == "dpo+hinge"
    assert {k: run["loss_hparams"][k] for k in ("weights", "dpo.beta", "hinge.beta")} == {
        "weights": [1.0, 0.25], "dpo.beta": 0.5, "hinge.beta": 0.5}


def test_compare_scores_the_mixture_and_its_parts(mixture_run, tiny_prepared, tmp_path):
    heldout = [o.split("=", 1)[1] for o in tiny_prepared if o.startswith("prep.output_dir=")][0]
    cfg = load_config([], [*tiny_prepared, "compare.kl_samples=0"])
    summary = run_compare(cfg, runs=[str(mixture_run)], data=heldout, output_dir=str(tmp_path / "cmp"))
    entries = {e["label"]: e for e in summary["entries"]}
    assert set(entries) == {"run", "run:dpo", "run:hinge"}
    assert entries["run:dpo"]["loss_hparams"] == {**get_loss_entry("dpo").defaults(), "beta": 0.5}
    assert entries["run:hinge"]["loss_hparams"] == {**get_loss_entry("hinge").defaults(), "beta": 0.5}
    mixture, dpo, hinge = (entries[k]["metrics"]["loss"] for k in ("run", "run:dpo", "run:hinge"))
    assert mixture == pytest.approx(dpo + 0.25 * hinge, rel=1e-9)
    assert math.isfinite(mixture)
