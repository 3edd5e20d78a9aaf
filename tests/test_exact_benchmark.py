"""The exact benchmark (dpo_zoo/study/exact_world.py, exact.py): enumeration, exact metrics by hand and
by brute force, the world's data, and a tiny exact study end to end."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import yaml

from dpo_zoo.config import ConfigError
from dpo_zoo.study import exact_world as E
from dpo_zoo.study.trajectory import reward_drop

TINY = {**E.WORLD_DEFAULTS, "tokens": 3, "max_length": 2, "prompts": 2, "train_pairs": 24, "heldout_pairs": 8,
        "hidden_size": 8, "layers": 1, "fit_steps": 40, "fit_lr": 0.05}


def test_tree_enumerates_every_completion_once():
    tree = E.Tree.build(3, 3)
    assert len(tree) == 3 + 9 + 27 == E.completions_per_prompt(3, 3)
    seqs = {tuple(c[:n]) for c, n in zip(tree.content, tree.length)}
    assert seqs == {s for n in (1, 2, 3) for s in itertools.product(range(3), repeat=n)}
    # the scoring row of each completion starts with the completion's tokens
    for c, n, r in zip(tree.content, tree.length, tree.row):
        assert list(tree.rows[r][:n]) == list(c[:n])


def test_exact_metrics_by_hand():
    """Two completions (t0 EOS, t1 EOS), π = (½, ½), π_ref = (¼, ¾), rewards (1, 0)."""
    tree = E.Tree.build(2, 1)
    logp = np.log([[0.5, 0.5]])
    ref = np.log([[0.25, 0.75]])
    out = E.exact_metrics(logp, ref, np.array([[1.0, 0.0]]), tree)
    assert out["kl_rb"] == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert out["reward"] == pytest.approx(0.5)
    assert out["mean_length"] == pytest.approx(2.0)  # one content token + EOS
    assert out["entropy_per_token"] == pytest.approx(math.log(2) / 2)
    assert math.isnan(out["reward_length_corr"])  # every completion has the same length
    assert E.exact_metrics(ref, ref, np.array([[1.0, 0.0]]), tree)["kl_rb"] == 0.0


def _brute_force_logp(model, prompt_id, content_ids, eos, seq, max_length):
    """log π(seq) token by token, one forward pass per prefix, restricted as the module doc says."""
    ids, total = [prompt_id], 0.0
    allowed_content = list(content_ids)
    for t, a in enumerate([*seq, None]):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
        allowed = (allowed_content if t < max_length else []) + ([eos] if t >= 1 else [])
        logps = torch.log_softmax(logits[allowed], dim=-1)
        target = eos if a is None else content_ids[a]
        total += float(logps[allowed.index(target)])
        if a is not None:
            ids.append(content_ids[a])
    return total


def test_completion_logps_equal_a_brute_force_walk(tmp_path):
    world = E.build_world(tmp_path / "world", TINY)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(world.model_dir)).eval()
    restricted, unrestricted = E.completion_logps(model, world.tree, TINY["prompts"])
    assert np.exp(restricted).sum(-1) == pytest.approx(np.ones(TINY["prompts"]), abs=1e-9)
    assert (np.exp(unrestricted).sum(-1) <= 1 + 1e-9).all()
    prompt_ids, content_ids, eos = E.token_ids(TINY["prompts"], TINY["tokens"])
    for x in range(TINY["prompts"]):
        for n in range(len(world.tree)):
            seq = list(world.tree.content[n][: world.tree.length[n]])
            assert restricted[x, n] == pytest.approx(
                _brute_force_logp(model, prompt_ids[x], content_ids, eos, seq, TINY["max_length"]), abs=1e-6)


def test_world_is_fitted_deterministic_and_reused(tmp_path):
    unfitted = E.build_world(tmp_path / "a", {**TINY, "fit_steps": 0})
    fitted = E.build_world(tmp_path / "b", TINY)
    info = {k: json.loads((w.folder / "world.json").read_text()) for k, w in (("a", unfitted), ("b", fitted))}
    assert info["b"]["kl_q_to_reference"] < 0.5 * info["a"]["kl_q_to_reference"]  # the fit moves π_ref to q
    again = E.build_world(tmp_path / "c", TINY)
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (again.folder / name).read_text() == (fitted.folder / name).read_text()
    stamp = (fitted.folder / "world.json").stat().st_mtime_ns
    E.build_world(tmp_path / "b", TINY)  # the same settings: reused, not rebuilt
    assert (fitted.folder / "world.json").stat().st_mtime_ns == stamp


def test_pairs_follow_the_reward(tmp_path):
    """With a near-zero Bradley–Terry temperature the label is the reward's order; ties below the margin."""
    world = E.build_world(tmp_path / "w", {**TINY, "temperature": 1e-6, "tie_margin": 0.3, "train_pairs": 60})
    text_to_n = {world.text(n): n for n in range(len(world.tree))}
    rows = [json.loads(line) for line in world.train_path.read_text().splitlines()]
    assert len(rows) == 60 and any(r["tie"] for r in rows) and not all(r["tie"] for r in rows)
    for r in rows:
        x = int(r["prompt"][1:])
        gap = world.reward[x, text_to_n[r["chosen"]]] - world.reward[x, text_to_n[r["rejected"]]]
        assert r["chosen"] != r["rejected"]
        assert (abs(gap) < 0.3) == r["tie"]
        if not r["tie"]:
            assert gap > 0


def test_length_bias_is_added_to_the_reward():
    tree = E.Tree.build(2, 3)
    tables = E.WorldTables.draw({**E.WORLD_DEFAULTS, "tokens": 2, "max_length": 3, "prompts": 1})
    plain, biased = tables.reward(tree, 0.0), tables.reward(tree, 1.0)
    assert biased - plain == pytest.approx(((tree.length - 1) / 2)[None])


def test_reward_drop_by_hand():
    assert reward_drop([{"reward": 0.2}, {"reward": 0.9}, {"reward": 0.5}], 0.4) == pytest.approx(0.5)
    assert reward_drop([{"reward": 0.1}], 0.4) == 0.0
    assert math.isnan(reward_drop([], math.nan))


def test_bad_world_settings_name_the_key(tmp_path):
    from dpo_zoo.study.runner import load_study

    study = _study(tmp_path)
    study["study"]["exact"] = {"tokens": 1, "colour": 3}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(study))
    with pytest.raises(ConfigError) as err:
        load_study(str(path))
    text = str(err.value)
    assert "study.exact.colour" in text and "study.exact.tokens" in text


def _study(tmp_path):
    return {
        "study": {"output_dir": str(tmp_path / "study"), "seeds": [0, 1, 2], "progress": False,
                  "exact": {k: TINY[k] for k in ("tokens", "max_length", "prompts", "train_pairs", "heldout_pairs",
                                                 "hidden_size", "layers", "fit_steps", "fit_lr")},
                  "losses": [{"label": "dpo", "loss": "dpo", "knob": "beta", "values": [0.1, 1.0]}],
                  "claims": [{"id": "dpo_monotone", "claim": "DPO: higher β, lower KL", "compare": "monotone",
                              "treatment": "dpo", "metrics": [{"metric": "kl_rb", "expect": "lower"}]}]},
        "prep": {"output_dir": str(tmp_path / "study" / "prepared"), "max_length": 6, "max_prompt_length": 2,
                 "progress": False},
        "train": {"epochs": 1, "max_steps": 1000, "micro_batch_size": 8, "learning_rate": 0.01,
                  "lr_schedule": "constant", "progress": False, "report_to": "none"},
    }


def test_tiny_exact_study_end_to_end(tmp_path):
    from dpo_zoo.study.runner import run_study

    path = tmp_path / "exact.yaml"
    path.write_text(yaml.safe_dump(_study(tmp_path)))
    summary = run_study(str(path))
    runs = summary["runs"]
    reference = [r for r in runs if r["label"] == "reference"]
    trained = [r for r in runs if r["label"] == "dpo"]
    assert len(reference) == 3 and len(trained) == 6
    info = json.loads((tmp_path / "study" / "world" / "world.json").read_text())
    assert reference[0]["kl_rb"] == 0.0 and reference[0]["reward"] == pytest.approx(info["reference_reward"])
    assert all(r["exact"] and r["kl_rb"] > 0 and r["kl_rb_se"] == 0.0 for r in trained)
    results = (tmp_path / "study" / "results.md").read_text()
    assert "**exact**" in results and "Rao–Blackwellized" not in results
    # Run again: every run and evaluation is reused (the evaluations' files are not rewritten).
    evals = sorted((tmp_path / "study" / "runs").rglob("study_eval.json"))
    stamps = [p.stat().st_mtime_ns for p in evals]
    again = run_study(str(path))
    assert [p.stat().st_mtime_ns for p in evals] == stamps
    assert [r["kl_rb"] for r in again["runs"]] == [r["kl_rb"] for r in runs]
