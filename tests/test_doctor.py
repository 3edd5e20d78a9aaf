"""The DPO doctor (issue 26): every check fires on a run (or prepared set) built to show it and stays
quiet on a healthy one; the trainer reports the same findings live, and ``dpo-zoo doctor`` on the folder.

Training-signal checks are exercised on real tiny runs where a setting produces the sign for certain
(learning rate 0: a loss flat at log 2; reference log-probs brought from a file that are not the
policy's: a margin at step 0), and on constructed ``logs.jsonl`` series for the signs a 2-step tiny run
cannot be relied on to show (both log-probs falling, accuracy saturated early); prepared-set checks on
real tiny prepared sets built with a trailing-space prompt, a template that writes BOS twice, a
template that is not prefix-consistent, and a length limit that empties completions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dpo_zoo.cache import health as CH
from dpo_zoo.cli import main
from dpo_zoo.config import load_config
from dpo_zoo.train import health as H
from tiny import CHAT_TEMPLATE, make_tokenizer, tiny_overrides, write_hh_slice

T = H.Thresholds()


def steps(n, **series):
    """``n`` logged training records; each keyword is a constant or a function of the step (1-based)."""
    return [{"step": s, **{k: (v(s) if callable(v) else v) for k, v in series.items()}} for s in range(1, n + 1)]


# ---------------------------------------------------------------- training-signal checks on series

def test_logps_both_falling_fires_when_both_sides_fall_and_says_by_how_much():
    falling = steps(10, **{"logps/chosen_shift": lambda s: -3.0 * s, "logps/rejected_shift": lambda s: -4.0 * s,
                           "len/chosen": 20.0, "len/rejected": 20.0})
    finding = H.logps_both_falling(falling)
    assert finding is not None and finding.step == 10
    # last 5 steps: chosen −3·(6..10) → mean −24 nats (−1.2 per token); rejected −32 (−1.6)
    assert "chosen by 24.00 nats per sequence (1.200 per token)" in finding.message
    assert "rejected by 32.00" in finding.message and "loss=rpo" in finding.hint
    healthy = steps(10, **{"logps/chosen_shift": lambda s: 0.5 * s, "logps/rejected_shift": lambda s: -4.0 * s,
                           "len/chosen": 20.0, "len/rejected": 20.0})
    assert H.logps_both_falling(healthy) is None


def test_accuracy_saturated_early_needs_enough_pairs_early_in_the_run():
    saturated = steps(12, **{"rewards/accuracies": 1.0})
    finding = H.accuracy_saturated_early(saturated, pairs_per_step=8, max_steps=100)
    assert finding is not None and finding.step == 8  # 8 steps × 8 pairs = the 64 pairs of the threshold
    assert H.accuracy_saturated_early(saturated, pairs_per_step=2, max_steps=100) is None  # 24 pairs: chance
    late = [{"step": s, "rewards/accuracies": 1.0 if s > 30 else 0.75} for s in range(1, 60)]
    assert H.accuracy_saturated_early(late, pairs_per_step=8, max_steps=100) is None
    broken = [{"step": s, "rewards/accuracies": 0.875 if s % 4 == 0 else 1.0} for s in range(1, 25)]
    assert H.accuracy_saturated_early(broken, pairs_per_step=8, max_steps=100) is None


def test_kl_and_length_drift_read_their_thresholds_with_the_standard_error():
    assert H.kl_too_large(25.0, 1.0, T) is not None
    assert H.kl_too_large(21.0, 1.0, T) is None  # within two standard errors of the threshold
    assert H.kl_too_large(5.0, 0.5, T) is None
    longer = H.length_drift([40, 44, 48, 48], [20, 22, 25, 24], T, max_new_tokens=48)
    # (40+44+48+48)/4 = 45 against (20+22+25+24)/4 = 22.75: 1.98×
    assert longer is not None and "1.98×" in longer.message and "50% of the policy's samples hit" in longer.message
    assert H.length_drift([21, 23, 24, 25], [20, 22, 25, 24], T) is None
    assert H.length_drift([10, 10, 10, 10], [30, 31, 29, 30], T) is not None  # shorter counts too


# ---------------------------------------------------------------- real tiny runs

def _train(overrides, out_dir, *extra):
    from dpo_zoo.train.trainer import train

    train(load_config([], [*overrides, f"train.output_dir={out_dir}", *extra]))
    return [json.loads(line) for line in open(Path(out_dir) / "logs.jsonl")]


def _warnings(records):
    return {r["check"]: r for r in records if r.get("event") == "warning"}


def test_learning_rate_zero_is_a_loss_flat_at_log2_live_and_in_the_doctor(tiny_prepared, tmp_path, capsys):
    flat = tmp_path / "flat"
    records = _train(tiny_prepared, flat, "train.learning_rate=0", "train.max_steps=4", "train.health.flat_steps=3")
    warning = _warnings(records)["loss_flat_at_log2"]
    assert warning["step"] == 3 and "log 2 = 0.6931" in warning["message"]
    assert "loss_flat_at_log2" in capsys.readouterr().out
    assert main(["doctor", str(flat), "--no-sample", "--config", "train.health.flat_steps=3"]) == 1
    assert "step 4: loss_flat_at_log2" in capsys.readouterr().out
    healthy = tmp_path / "healthy"
    records = _train(tiny_prepared, healthy, "train.max_steps=4", "train.health.flat_steps=3")
    assert not {"loss_flat_at_log2", "margin_at_start"} & set(_warnings(records))
    assert main(["doctor", str(healthy), "--no-sample", "--config", "train.health.flat_steps=3"]) in (0, 1)
    out = capsys.readouterr().out
    assert "loss_flat_at_log2" not in out and "margin_at_start" not in out


def test_reference_that_is_not_the_start_is_a_margin_at_step_0(tiny_model_dir, tmp_path):
    from dpo_zoo.cache.prep import run_prep
    from dpo_zoo.cache.reader import PreparedSet

    data = write_hh_slice(tmp_path / "hh.jsonl", n_rows=20)
    own = tiny_overrides(tiny_model_dir, data, tmp_path / "own_prepared", **{"prep.topk": 0})
    run_prep(load_config([], own))
    # Reference log-probs brought from a file (as if computed by another model): every pair's summed
    # values are far from the tiny policy's own (about −400 and −300 against its ~−150).
    ids = []
    for split in ("train", "heldout"):
        prepared = PreparedSet.open(tmp_path / "own_prepared" / split)
        ids += [r["id"] for r in prepared.rows(list(range(len(prepared))), ["id"])]
    refs = tmp_path / "refs.jsonl"
    refs.write_text("".join(json.dumps({"id": i, "ref_chosen_logps": -400.0, "ref_rejected_logps": -300.0}) + "\n"
                            for i in ids))
    brought = tiny_overrides(tiny_model_dir, data, tmp_path / "file_prepared",
                             **{"prep.topk": 0, "prep.reference_logps_path": str(refs)})
    run_prep(load_config([], brought))
    warning = _warnings(_train(brought, tmp_path / "off", "train.max_steps=1"))["margin_at_start"]
    assert warning["step"] == 1 and "not 0" in warning["message"] and "train.reference=live" in warning["hint"]
    assert "margin_at_start" not in _warnings(_train(own, tmp_path / "own", "train.max_steps=1"))
    # H-DPO's implicit reward β(α·log π − log π_ref) is β(α − 1)·log π_ref at the start, far from 0 by
    # design; the check reads log π − log π_ref, which is 0 there, and stays quiet.
    records = _train(own, tmp_path / "h_dpo", "train.max_steps=1", "loss=h_dpo", "loss.alpha=0.5")
    first = next(r for r in records if r.get("step") == 1 and "rewards/chosen" in r)
    assert abs(first["rewards/chosen"]) > 0.01 and abs(first["logps/chosen_shift"]) < 1e-4
    assert "margin_at_start" not in _warnings(records)


# ---------------------------------------------------------------- prepared-set checks on real tiny sets

def _prep(tiny_model_dir, tmp_path, name, rows=None, files=(), **extra):
    from dpo_zoo.cache.prep import run_prep

    data = tmp_path / f"{name}.jsonl"
    if rows is None:
        write_hh_slice(data, n_rows=20)
    else:
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    values = {"prep.topk": 0, "prep.reference": "false", **extra}
    if rows is not None:
        values["data.preprocessor"] = "generic"
    run_prep(load_config(list(files), tiny_overrides(tiny_model_dir, data, tmp_path / name, **values)))
    return tmp_path / name


def _doctor(path, capsys):
    status = main(["doctor", str(path), "--no-sample"])
    return status, capsys.readouterr().out


def test_prompt_ending_in_a_space_is_a_merged_boundary(tiny_model_dir, tmp_path, capsys):
    # " I" and " the" are single tokens of the tiny BPE: the prompt's trailing space joins the completion's first word.
    spaced = [{"prompt": f"Question {i}: is the sky blue? Answer: ", "chosen": "I think the sky is blue.",
               "rejected": "the sky is green."} for i in range(12)]
    status, out = _doctor(_prep(tiny_model_dir, tmp_path, "space", spaced), capsys)
    assert status == 1 and "boundary_merged" in out and "prompt ends 'e sky blue? Answer: '" in out
    clean = [{"prompt": f"Question {i}: is the sky blue? Answer:", "chosen": " I think the sky is blue.",
              "rejected": " the sky is green."} for i in range(12)]
    status, out = _doctor(_prep(tiny_model_dir, tmp_path, "clean", clean), capsys)
    assert status == 0 and "no problem found" in out


def test_template_writing_bos_twice_is_a_double_bos(tiny_model_dir, tmp_path, capsys):
    # The tiny tokenizer's BOS is <|im_start|>, which every turn of its template also starts with.
    template = tmp_path / "bos_template.yaml"
    template.write_text(yaml.safe_dump({"prep": {"chat_template": "{{ bos_token }}" + CHAT_TEMPLATE}}))
    conversations = [{"prompt": [{"role": "user", "content": f"hello number {i}"}],
                      "chosen": [{"role": "assistant", "content": "hi there"}],
                      "rejected": [{"role": "assistant", "content": "go away"}]} for i in range(12)]
    status, out = _doctor(_prep(tiny_model_dir, tmp_path, "bos", conversations, files=[template]), capsys)
    assert status == 1 and "double_bos" in out and "boundary_merged" not in out
    status, out = _doctor(_prep(tiny_model_dir, tmp_path, "one_bos", conversations), capsys)
    assert status == 0


def test_template_that_is_not_prefix_consistent_is_found_on_the_probe():
    tokenizer = make_tokenizer()
    # The generation prompt opens a thinking block that the rendered conversation does not contain.
    thinking = CHAT_TEMPLATE.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'")
    assert thinking != CHAT_TEMPLATE
    finding = CH.template_not_prefix(tokenizer, thinking)
    assert finding is not None and "<think>" in finding.message
    assert CH.template_not_prefix(tokenizer, "auto") is None
    assert "prep dropped 3 pairs" in CH.template_not_prefix(tokenizer, "auto", dropped=3).message


def test_length_limit_that_empties_completions_is_reported(tiny_model_dir, tmp_path, capsys):
    # Half the prompts are 12 times longer; with no prompt limit they leave no room in 40 tokens.
    rows = [{"prompt": "Tell me about it. " * (12 if i % 2 else 1) + "Answer:", "chosen": " I think the sky is blue.",
             "rejected": " the sky is green."} for i in range(16)]
    path = _prep(tiny_model_dir, tmp_path, "short", rows, **{"prep.max_prompt_length": "null", "prep.max_length": 40,
                                                             "data.on_bad_row": "skip"})
    status, out = _doctor(path, capsys)
    assert status == 1 and "truncation_emptied" in out and "prep dropped 8 pairs" in out
    status, out = _doctor(_prep(tiny_model_dir, tmp_path, "long", rows, **{"prep.max_length": 200,
                                                                          "prep.max_prompt_length": 150}), capsys)
    assert status == 0


def test_doctor_on_something_else_is_a_clear_error(tmp_path, capsys):
    assert main(["doctor", str(tmp_path)]) == 2
    assert "neither a run folder" in capsys.readouterr().err


