"""Trajectories (``study.eval_every``): each run's checkpoints exported as run folders (safetensors,
never unpickled) and evaluated like the final run, cached so a re-run evaluates nothing; the frontier
picture drawn as the DPO paper draws it, the reference at the origin."""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dpo_zoo.config import ConfigError, load_config
from dpo_zoo.errors import CheckpointError
from dpo_zoo.study.plot import envelope, frontier_figure, plot_frontier
from dpo_zoo.study.runner import aggregate, load_study, run_study
from dpo_zoo.train.export import export_checkpoint
from dpo_zoo.train.trainer import train

PROMPTS = ["The movie was", "I thought the film", "This is", "Honestly the plot", "The acting", "What a",
           "The ending was", "Overall I", "The director", "My friends said", "The soundtrack", "It felt"]


@pytest.fixture()
def study_file(tmp_path, tiny_model_dir, monkeypatch):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "t_reward.py").write_text(textwrap.dedent("""
        def chars(prompts, completions):
            return [len(c) / 6 for c in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    study = {
        "study": {"output_dir": str(tmp_path / "study"), "seeds": [0], "reward": "t_reward:chars", "eval_every": 2,
                  "eval": {"prompts": 2, "samples": 2, "max_new_tokens": 4, "batch_size": 4},
                  "losses": [{"label": "dpo", "loss": "dpo", "knob": "beta", "values": [0.1]}],
                  "claims": [], "progress": False},
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"preprocessor": "reward_pairs", "heldout_fraction": 0.25,
                 "options": {"prompts": str(tmp_path / "prompts.txt"), "reward": "t_reward:chars",
                             "samples_per_prompt": 3, "max_new_tokens": 6, "shard_prompts": 6, "batch_size": 6}},
        "prep": {"output_dir": str(tmp_path / "study" / "prepared"), "max_length": 48, "max_prompt_length": 16,
                 "progress": False},
        # keep_checkpoints 1 in the experiment: the study keeps every checkpoint all the same.
        "train": {"max_steps": 5, "micro_batch_size": 4, "learning_rate": 0.01, "lr_schedule": "constant",
                  "keep_checkpoints": 1, "progress": False},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    yield path
    sys.modules.pop("t_reward", None)


def test_study_with_eval_every_gives_each_run_its_trajectory_and_reruns_evaluate_nothing(study_file, tmp_path,
                                                                                         monkeypatch, capsys):
    import dpo_zoo.study.runner as study_module

    measured = []
    real_measure = study_module.Evaluator._measure

    def counting(self, *args, **kwargs):
        measured.append(args)
        return real_measure(self, *args, **kwargs)

    monkeypatch.setattr(study_module.Evaluator, "_measure", counting)
    summary = run_study(str(study_file))
    assert len(measured) == 1 + 3  # the reference, then the run: its checkpoints of steps 2 and 4 and its final weights
    run = next(r for r in summary["runs"] if r["label"] == "dpo")
    reference = next(r for r in summary["runs"] if r["label"] == "reference")
    assert run["step"] == 5 and reference["step"] == 0
    assert [p["step"] for p in run["trajectory"]] == [2, 4]
    for point in run["trajectory"]:
        assert point["kl_rb"] >= 0 and math.isfinite(point["reward"]) and point["n_samples"] == 4
        assert 0 <= point["accuracy"] <= 1  # the trainer evaluated the held-out pairs at each checkpoint
        assert "prompt_reward" not in point and "examples" not in point  # scalars only in the summary
    # Different weights at each step: the three points are three different policies.
    assert len({round(p["kl_rb"], 12) for p in [*run["trajectory"], run]}) == 3
    folder = tmp_path / "study" / "runs" / "dpo" / "beta=0.1" / "seed0"
    assert sorted(p.name for p in (folder / "checkpoints").iterdir() if p.is_dir()) == ["step-0000002", "step-0000004"]
    exported = folder / "trajectory" / "step-0000004"
    record = json.loads((exported / "run.json").read_text())
    assert record["steps"] == 4 and record["checkpoint"]["tag"] == "step-0000004"
    assert (exported / "final" / "model.safetensors").is_file() and not list(exported.rglob("*.pt"))
    assert json.loads((exported / "study_eval.json").read_text())["metrics"]["kl_rb"] == run["trajectory"][1]["kl_rb"]
    with open(tmp_path / "study" / "trajectory.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["label"], r["step"]) for r in rows] == [("reference", "0"), ("dpo", "2"), ("dpo", "4"), ("dpo", "5")]
    assert json.loads((tmp_path / "study" / "summary.json").read_text())["runs"][1]["trajectory"] == run["trajectory"]

    # Run again: everything is reused, nothing is evaluated, the same numbers come back.
    measured.clear()
    again = run_study(str(study_file))
    assert measured == [] and again["runs"] == summary["runs"]
    # Turned off: the same runs and final evaluations, no trajectory, still nothing evaluated.
    off = run_study(str(study_file), ["study.eval_every=0"])
    assert measured == [] and "trajectory" not in off["runs"][1] and off["runs"][1]["kl_rb"] == run["kl_rb"]
    # The checkpoints deleted after the export (they hold the optimizer state too): the exports stand.
    shutil.rmtree(folder / "checkpoints")
    assert run_study(str(study_file))["runs"] == summary["runs"] and measured == []
    # An export of another training (here: another learning rate in its run.json) is not used: its point
    # is left out, and said so.
    record["config"]["train"]["learning_rate"] = 0.5
    (exported / "run.json").write_text(json.dumps(record))
    capsys.readouterr()
    fewer = run_study(str(study_file))
    assert measured == [] and [p["step"] for p in fewer["runs"][1]["trajectory"]] == [2]
    assert "no checkpoint of step 4" in capsys.readouterr().err


def test_eval_every_must_be_a_count(study_file, tmp_path):
    with pytest.raises(ConfigError, match=r"`study.eval_every`: expected an integer >= 0"):
        load_study(str(study_file), ["study.eval_every=-1"])


@pytest.mark.parametrize("lora", [False, True])
def test_an_exported_checkpoint_holds_the_weights_of_that_step(tiny_prepared, tmp_path, lora):
    """Step 2 of a 4-step run, exported, equals a run of 2 steps (constant learning rate: the same updates)."""
    common = [*tiny_prepared, "train.lr_schedule=constant", "train.warmup_steps=0",
              f"train.lora.enabled={str(lora).lower()}"]
    train(load_config([], [*common, "train.max_steps=4", "train.save_every=2", f"train.output_dir={tmp_path / 'long'}"]))
    train(load_config([], [*common, "train.max_steps=2", f"train.output_dir={tmp_path / 'short'}"]))
    out = export_checkpoint(tmp_path / "long", tmp_path / "long" / "checkpoints" / "step-0000002", tmp_path / "export")
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    exported, short, long = (load_file(p / "final" / name) for p in (out, tmp_path / "short", tmp_path / "long"))
    assert sorted(exported) == sorted(short)
    for key in exported:
        torch.testing.assert_close(exported[key], short[key], rtol=0, atol=1e-6)
    assert any(not torch.equal(exported[k], long[k]) for k in exported)  # not the final weights
    assert json.loads((out / "run.json").read_text())["steps"] == 2
    # A changed checkpoint file is refused, naming it; nothing is exported from it.
    states = tmp_path / "long" / "checkpoints" / "step-0000002" / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF
    states.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: sha256 differs"):
        export_checkpoint(tmp_path / "long", states.parent, tmp_path / "export2")
    assert not (tmp_path / "export2").exists()


def test_envelope_by_hand():
    assert envelope([(0, 0), (1, 2), (2, 1), (3, 3)]) == [(0, 0), (1, 2), (3, 3)]
    assert envelope([(1, 1), (1, 2), (0, 0.5), (2, math.nan)]) == [(0, 0.5), (1, 2)]


def _summary_runs(spread: float):
    runs = [{"label": "reference", "loss": None, "knob": None, "strength": None, "seed": s, "kl_rb": 0.0,
             "reward": 0.2, "step": 0} for s in (0, 1)]
    for label, gain in (("dpo", 1.0), ("ipo", 0.7)):
        for beta in (0.1, 1.0):
            for seed in (0, 1):
                kl = spread / beta * (1 + 0.05 * seed)
                trajectory = [{"step": s, "kl_rb": kl * s / 6, "reward": 0.2 + gain * math.log1p(kl * s / 6)} for s in (2, 4)]
                runs.append({"label": label, "loss": label, "knob": "beta", "strength": beta, "seed": seed,
                             "kl_rb": kl, "reward": 0.2 + gain * math.log1p(kl), "step": 6, "trajectory": trajectory})
    return runs


@pytest.mark.parametrize("spread,scale", [(0.5, "linear"), (5.0, "symlog")])
def test_frontier_picture_from_a_hand_made_summary(tmp_path, spread, scale):
    runs = _summary_runs(spread if scale == "linear" else 0.05)
    if scale == "symlog":
        for run in runs[2:]:
            run["kl_rb"] *= 1000 ** (run["strength"] == 0.1)  # KLs from 0.05 to 50: three decades
    rows = aggregate(runs)
    figure = frontier_figure(rows, runs)
    axes = figure.axes[0]
    assert axes.get_xscale() == scale
    lines = [line for line in axes.get_lines() if len(line.get_xdata())]
    star = [line for line in lines if line.get_marker() == "*"]
    assert len(star) == 1 and list(star[0].get_xydata()[0]) == [0.0, 0.2]  # the reference at the origin
    thick = [line for line in lines if line.get_linewidth() > 2]  # the two envelopes, each from the origin
    assert len(thick) == 2 and all(tuple(line.get_xydata()[0]) == (0.0, 0.2) for line in thick)
    thin = [line for line in lines if line.get_linewidth() < 1 and len(line.get_xdata()) == 4]
    assert len(thin) == 8  # one per run: origin, two checkpoints, final
    left, right = axes.get_xlim()
    assert left < 0 < right and right >= max(r["kl_rb"] for r in runs)
    assert [t.get_text() for t in axes.get_legend().get_texts()][:3] == ["reference (KL 0)", "dpo (beta)", "ipo (beta)"]
    png = plot_frontier(rows, tmp_path / "frontier.png", runs)
    assert png.startswith(b"\x89PNG") and len(png) > 30_000
    # Without trajectories (eval_every 0): still the final points and envelopes.
    bare = [{k: v for k, v in r.items() if k != "trajectory"} for r in runs]
    axes = frontier_figure(rows, bare).axes[0]
    assert len([line for line in axes.get_lines() if line.get_linewidth() > 2]) == 2
    assert plot_frontier(rows, tmp_path / "final_only.png")[:4] == b"\x89PNG"  # from the aggregates alone
