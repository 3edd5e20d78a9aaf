"""dpo-zoo study, reduced: a tiny model, reward_pairs from a prompt file, 2 losses × 2 strengths × 2 seeds,
end to end (plot, report, claims); a killed study resumes without retraining finished runs."""

from __future__ import annotations

import json
import math
import shutil
import sys
import textwrap

import numpy as np
import pytest
import yaml

from dpo_zoo.config import ConfigError
from dpo_zoo.study.runner import ci95, distinct_n, load_study, run_study
from dpo_zoo.study.results import render_results, write_results

PROMPTS = ["The movie was", "I thought the film", "This is", "Honestly the plot", "The acting", "What a",
           "The ending was", "Overall I", "The director", "My friends said", "The soundtrack", "It felt"]
CLAIMS = [
    {"id": "monotone", "claim": "DPO: higher beta, lower KL and reward", "compare": "monotone", "treatment": "dpo",
     "metrics": [{"metric": "kl_rb", "expect": "lower"}, {"metric": "reward", "expect": "lower"}]},
    {"id": "entropy", "claim": "H-DPO: lower entropy at matched KL", "compare": "matched_kl", "treatment": "h_dpo",
     "baseline": "dpo", "metrics": [{"metric": "entropy_per_token", "expect": "lower"}], "report": ["accuracy"]},
    {"id": "same", "claim": "H-DPO: lower KL at the same strength index", "compare": "same_strength",
     "treatment": "h_dpo", "baseline": "dpo", "metrics": [{"metric": "kl_rb", "expect": "lower"}]},
]


def test_distinct_n_and_ci_by_hand():
    assert distinct_n(["a b a", "a b"], 1) == 2 / 5  # unigrams a b a a b: 2 distinct of 5
    assert distinct_n(["a b a", "a b"], 2) == 2 / 3  # bigrams (a b) (b a) (a b)
    assert math.isnan(distinct_n(["a", ""], 2))
    stat = ci95([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.3027
    assert stat["mean"] == 2.0 and stat["sd"] == 1.0 and stat["ci95"] == pytest.approx(4.3027 / math.sqrt(3), abs=1e-4)


@pytest.fixture()
def study_file(tmp_path, tiny_model_dir, monkeypatch):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    # A reward the tiny random model's text varies in (it writes byte soup): characters per token.
    (tmp_path / "e_reward.py").write_text(textwrap.dedent("""
        def share_of_e(prompts, completions):
            return [len(c) / 6 for c in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    study = {
        "study": {"output_dir": str(tmp_path / "study"), "seeds": [0, 1], "reward": "e_reward:share_of_e",
                  "eval": {"prompts": 2, "samples": 4, "max_new_tokens": 6, "batch_size": 12},
                  "losses": [{"label": "dpo", "loss": "dpo", "knob": "beta", "values": [0.1, 1.0]},
                             {"label": "h_dpo", "loss": "h_dpo", "knob": "alpha", "values": [0.8, 0.95],
                              "hparams": {"beta": 0.1}}],
                  "claims": CLAIMS, "progress": False},
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"preprocessor": "reward_pairs", "heldout_fraction": 0.25,
                 "options": {"prompts": str(tmp_path / "prompts.txt"), "reward": "e_reward:share_of_e",
                             "samples_per_prompt": 3, "max_new_tokens": 6, "shard_prompts": 6, "batch_size": 6}},
        "prep": {"output_dir": str(tmp_path / "study" / "prepared"), "max_length": 48, "max_prompt_length": 16,
                 "progress": False},
        "train": {"max_steps": 2, "micro_batch_size": 4, "learning_rate": 0.005, "lr_schedule": "constant",
                  "progress": False},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    yield path
    sys.modules.pop("e_reward", None)


def test_reduced_study_end_to_end_and_resumed_after_a_kill(study_file, tmp_path, monkeypatch, capsys):
    import dpo_zoo.study.runner as study_module

    real_run_one, calls = study_module.run_one, []

    def killed_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[2:])
        return real_run_one(*args, **kwargs)

    monkeypatch.setattr(study_module, "run_one", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_study(str(study_file))
    out = tmp_path / "study"
    finished = [out / "runs" / "dpo" / "beta=0.1" / f"seed{s}" for s in (0, 1)]
    stamps = {p: ((p / "final").stat().st_mtime_ns, (p / "study_eval.json").read_text()) for p in finished}
    first_times = {str(p): json.loads((p / "study_train.json").read_text())["train_seconds"] for p in finished}
    assert all(t > 0 for t in first_times.values())
    monkeypatch.setattr(study_module, "run_one", real_run_one)
    capsys.readouterr()

    summary = run_study(str(study_file))
    printed = capsys.readouterr().out
    # The two finished runs were reused (not trained, not evaluated again), the other six trained.
    assert printed.count("already trained with this config") == 2
    for path, (mtime, evaluation) in stamps.items():
        assert (path / "final").stat().st_mtime_ns == mtime and (path / "study_eval.json").read_text() == evaluation

    runs = [r for r in summary["runs"] if r["label"] != "reference"]
    # A reused run keeps the training time recorded when it trained, not the reuse's.
    for run in runs:
        if run["run_dir"] in first_times:
            assert run["train_seconds"] == first_times[run["run_dir"]]
        assert run["train_seconds"] > 0
    assert len(runs) == 8 and sorted({(r["label"], r["strength"]) for r in runs}) == [
        ("dpo", 0.1), ("dpo", 1.0), ("h_dpo", 0.8), ("h_dpo", 0.95)]
    for run in runs:
        assert run["n_samples"] == 8 and run["kl_rb"] >= 0 and math.isfinite(run["kl_mc"])
        # The Rao–Blackwellized estimator's standard error is below the Monte Carlo one on the same samples.
        assert run["kl_rb_se"] < run["kl_mc_se"] and run["rb_below_mc"] is True
        assert 0 < run["distinct_2"] <= 1 and run["mean_length"] <= 6 and 0 <= run["accuracy"] <= 1
        assert run["reward_se"] >= 0  # clustered by prompt: checked against the prompt means below
    reference = [r for r in summary["runs"] if r["label"] == "reference"]
    assert len(reference) == 2 and all(r["kl_rb"] == 0 and r["kl_mc"] == 0 for r in reference)
    # One evaluation seed for every run (common random numbers): the reference is measured once and its
    # record stands beside each seed; the standard errors are clustered by prompt (the per-prompt means kept).
    assert {k: v for k, v in reference[0].items() if k != "seed"} == {k: v for k, v in reference[1].items() if k != "seed"}
    for run in runs:
        means = run["prompt_reward"]
        assert len(means) == len(run["prompt_kl_rb"]) == run["n_samples"] // 4  # 2 prompts × 4 samples
        assert run["reward"] == pytest.approx(sum(means) / len(means))
        assert run["reward_se"] == pytest.approx(float(np.std(means, ddof=1)) / math.sqrt(len(means)))

    aggregates = {(a["label"], a["strength"]): a for a in summary["aggregates"]}
    dpo = [r["reward"] for r in runs if r["label"] == "dpo" and r["strength"] == 0.1]
    assert aggregates[("dpo", 0.1)]["reward"]["mean"] == pytest.approx(sum(dpo) / 2)

    png = (out / "frontier.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "| dpo | beta=0.1 | 2 |" in (out / "summary.md").read_text()
    assert len((out / "runs.csv").read_text().strip().splitlines()) == 1 + 10

    # The claims table: generated from summary.json, the same bytes when generated again.
    results = (out / "results.md").read_text()
    assert results == render_results(json.loads((out / "summary.json").read_text()), "summary.json", "frontier.png")
    assert "![reward–KL frontier](frontier.png)" in results and "| dpo | beta=0.1 | 2 |" in results
    assert "RB SE / MC SE" in results and "8 of 8 runs" in results
    # Published elsewhere (docs/results.md): the summary and picture are copied beside it under its stem,
    # and regenerating from that copy gives the same bytes.
    docs = tmp_path / "docs"
    docs.mkdir()
    published = write_results(str(out / "summary.json"), str(docs / "results.md"))
    assert "(results_summary.json)" in published and "![reward–KL frontier](results_frontier.png)" in published
    assert (docs / "results_frontier.png").read_bytes() == png
    assert (docs / "results_summary.json").read_bytes() == (out / "summary.json").read_bytes()
    again = tmp_path / "again"
    again.mkdir()
    shutil.copyfile(docs / "results_summary.json", again / "results_summary.json")
    write_results(str(again / "results_summary.json"), str(again / "results.md"))
    assert (again / "results.md").read_bytes() == (docs / "results.md").read_bytes()
    # The pairs and ties each split held, from the prepared set.
    assert summary["data"]["train"]["pairs"] > 0 and summary["data"]["heldout"]["pairs"] > 0
    assert f"- data: train {summary['data']['train']['pairs']} pairs (" in results
    # Several studies in one file: a section each, regenerated from the copies to the same bytes.
    both = write_results([str(out / "summary.json"), str(out / "summary.json")], str(docs / "all.md"))
    assert both.count("## Study ") == 2 and "![reward–KL frontier](all_frontier2.png)" in both
    assert (docs / "all_summary2.json").exists() and (docs / "all_frontier2.png").exists()
    shutil.copyfile(docs / "all_summary.json", again / "all_summary.json")
    shutil.copyfile(docs / "all_summary2.json", again / "all_summary2.json")
    assert write_results([str(again / "all_summary.json"), str(again / "all_summary2.json")], str(again / "all.md")) == both
    for claim in CLAIMS:
        assert claim["claim"] in results
    assert "dpo-zoo study" in results and "seeds: [0, 1]" in results


def test_bad_study_files_name_the_key(tmp_path, study_file):
    study = yaml.safe_load(study_file.read_text())
    study["study"]["losses"][1]["knob"] = "gamma"
    study["study"]["claims"][1]["baseline"] = "ipo"
    study["study"]["eval"]["samples"] = 0
    study["study"]["colour"] = 1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(study))
    with pytest.raises(ConfigError) as err:
        load_study(str(path))
    message = str(err.value)
    for part in ("`study.colour`: unknown key", "`study.eval.samples`: expected an integer >= 1",
                 "`study.claims[1]`.baseline: 'ipo' is not a curve label"):
        assert part in message
    study["study"].pop("colour")
    study["study"]["eval"]["samples"] = 2
    study["study"]["claims"][1]["baseline"] = "dpo"
    path.write_text(yaml.safe_dump(study))
    with pytest.raises(ConfigError, match="loss.gamma"):  # a knob the loss does not have, before any training
        load_study(str(path))


@pytest.mark.parametrize("name", ["sentiment_frontier", "sentiment_frontier_gpu"])
def test_shipped_study_configs_load(name, tmp_path):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    study = load_study(str(repo / "configs" / "experiments" / f"{name}.yaml"), [f"study.output_dir={tmp_path}"])
    labels = [c.label for c in study.curves]
    assert len(labels) == 11 and len(study.settings["claims"]) == 11 and len(study.settings["seeds"]) >= 3
    cfg = study.config()
    assert cfg.data.preprocessor == "reward_pairs" and cfg.data.options.reward == study.settings["reward"] == "vader"
    assert cfg.prep.topk > 0  # Ra-DPO and TDPO train from the cached reference distribution


def test_shipped_tie_study_config_loads(tmp_path):
    """The tie study pairs every two samples and calls a small reward gap a tie; its claims compare
    the tie-aware losses with ties as wins."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    study = load_study(str(repo / "configs" / "experiments" / "sentiment_ties.yaml"), [f"study.output_dir={tmp_path}"])
    assert [c.loss for c in study.curves] == ["dpo_ties_as_wins", "dpo_rk", "dpo_davidson"]
    assert {c["baseline"] for c in study.settings["claims"]} == {"ties_as_wins"}
    cfg = study.config()
    assert cfg.data.options.pairing == "all" and cfg.data.options.tie_threshold > 0


def _run(label, strength, seed, **metrics):
    return {"label": label, "strength": strength, "seed": seed, **metrics}


def test_claim_verdicts_by_hand():
    from dpo_zoo.study.results import NOT_REPRODUCED, REPRODUCED, evaluate_claim

    # Two curves per seed; b lies 0.1 above a in reward along the KL range both cover ([1, 2]).
    runs = []
    for seed, shift in ((0, 0.0), (1, 0.01), (2, -0.01)):
        runs += [_run("a", 0.5, seed, kl_rb=1.0, reward=1.0 + shift), _run("a", 0.1, seed, kl_rb=3.0, reward=3.0 + shift),
                 _run("b", 0.5, seed, kl_rb=0.0, reward=0.1 + shift), _run("b", 0.1, seed, kl_rb=2.0, reward=2.1 + shift)]
    matched = evaluate_claim({"id": "m", "claim": "b higher reward at matched KL", "compare": "matched_kl",
                              "treatment": "b", "baseline": "a", "metrics": [{"metric": "reward", "expect": "higher"}]}, runs)
    # a: reward = KL on [1, 3]; b: reward = KL + 0.1 on [0, 2]: the difference is +0.1 at every matched KL.
    assert matched["verdict"] == REPRODUCED and matched["cells"][0].stat["mean"] == pytest.approx(0.1)
    assert matched["cells"][0].stat["sd"] == pytest.approx(0.0, abs=1e-12)
    same = evaluate_claim({"id": "s", "claim": "b lower KL at the same strength", "compare": "same_strength",
                           "treatment": "b", "baseline": "a", "metrics": [{"metric": "kl_rb", "expect": "lower"}]}, runs)
    assert same["verdict"] == REPRODUCED  # b − a = −1 at each strength and pooled, on every seed
    assert {c.where: round(c.stat["mean"], 6) for c in same["cells"]} == {"strength=0.1": -1.0, "strength=0.5": -1.0,
                                                                         "pooled": -1.0}
    # a: raising the strength 0.1 → 0.5 lowers KL (3 → 1) and reward: monotone as claimed; "higher" is refuted.
    down = {"id": "d", "claim": "monotone", "compare": "monotone", "treatment": "a",
            "metrics": [{"metric": "kl_rb", "expect": "lower"}, {"metric": "reward", "expect": "lower"}]}
    assert evaluate_claim(down, runs)["verdict"] == REPRODUCED
    up = dict(down, metrics=[{"metric": "kl_rb", "expect": "higher"}])
    assert evaluate_claim(up, runs)["verdict"] == NOT_REPRODUCED


def test_shipped_powered_and_exact_study_configs_load(tmp_path):
    """The designs docs/results.md reports: the powered sentiment study (≥ 8 paired seeds, one full epoch,
    ≥ 48 held-out prompts) and the four exact-benchmark files (20 seeds, an exact world)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1] / "configs" / "experiments"
    powered = load_study(str(repo / "sentiment_powered.yaml"), [f"study.output_dir={tmp_path / 'p'}"])
    assert len(powered.settings["seeds"]) >= 8 and powered.settings["eval"]["prompts"] >= 48
    assert powered.config().train.epochs == 1
    for name, curves, claims in (("exact_benchmark", 8, 6), ("exact_ties", 3, 2), ("exact_length", 4, 3),
                                 ("exact_overopt", 2, 3)):
        study = load_study(str(repo / f"{name}.yaml"), [f"study.output_dir={tmp_path / name}"])
        assert len(study.grid()) == curves * 20 and len(study.settings["claims"]) == claims, name
        assert study.settings["exact"] is not None, name
