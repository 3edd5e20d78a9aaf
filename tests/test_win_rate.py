"""Pairwise win rate (issue 26): a stub judge's rate equals a hand count, swap debiasing and the length
control on constructed cases, the three kinds of judge (module:function, model folder, an
OpenAI-compatible endpoint served on 127.0.0.1 by the test), and the judge as a study reward."""

from __future__ import annotations

import json
import math
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

from dpo_zoo.rewards import judge as J
from dpo_zoo.rewards import win_rate as W


# ---------------------------------------------------------------- stub judges (importable as module:function)

def longer_wins(prompts, first, second):
    """Deterministic: the longer text wins, equal lengths tie."""
    return ["A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie" for a, b in zip(first, second)]


def always_first(prompts, first, second):
    return [1.0] * len(prompts)


def contains_good(prompts, first, second):
    """Prefers the response containing 'good' (ties otherwise), whatever the order."""
    return [0.5 if ("good" in a) == ("good" in b) else float("good" in a) for a, b in zip(first, second)]


# ---------------------------------------------------------------- the maths

def test_stub_judge_win_rate_equals_hand_count():
    candidate = ["good one", "bad", "good", "meh", "good too", "x"]
    baseline = ["bad", "good", "bad", "meh", "bad", "y"]
    judge = J.load_judge(f"{__name__}:contains_good")
    a = judge(["p"] * 6, candidate, baseline)
    b = judge(["p"] * 6, baseline, candidate)
    summary = W.summarize_judgements(a, b, [len(c) for c in candidate], [len(c) for c in baseline])
    # By hand: wins on items 0, 2, 4; loss on 1; ties on 3 and 5 → (3 + 0.5·2) / 6.
    assert summary["wins"] == 3 and summary["losses"] == 1 and summary["ties"] == 2
    assert summary["win_rate"] == pytest.approx(4 / 6)
    q = np.array([1, 0, 1, 0.5, 1, 0.5])
    assert summary["stderr"] == pytest.approx(np.std(q, ddof=1) / math.sqrt(6))
    assert summary["consistency"] == 1.0  # the judge does not depend on the order


def test_swap_debiasing_cancels_a_position_biased_judge():
    judge = J.load_judge(f"{__name__}:always_first")
    candidate, baseline = ["a", "bb", "ccc"], ["x", "y", "z"]
    a, b = judge(["p"] * 3, candidate, baseline), judge(["p"] * 3, baseline, candidate)
    summary = W.summarize_judgements(a, b, [1, 2, 3], [1, 1, 1])
    assert a.tolist() == [1.0, 1.0, 1.0]  # one order alone would say the candidate always wins
    assert summary["win_rate"] == 0.5 and summary["ties"] == 3
    assert summary["first_position_rate"] == 1.0 and summary["consistency"] == 0.0
    # identical responses score exactly 1/2 whatever the judge's bias
    assert W.debiased_preferences([0.9], [0.9]).tolist() == [0.5]


def test_length_control_recovers_the_intercept_of_a_logistic_judge():
    rng = np.random.default_rng(0)
    delta = rng.integers(-20, 40, size=300).astype(float)
    theta, phi = 0.4, 1.3
    q = 1 / (1 + np.exp(-(theta + phi * np.tanh(delta / np.std(delta, ddof=1)))))
    fit = W.length_controlled_win_rate(q, delta, np.zeros_like(delta), ridge=0.0)
    assert fit["theta"] == pytest.approx(theta, abs=1e-9) and fit["length_coef"] == pytest.approx(phi, abs=1e-9)
    assert fit["lc_win_rate"] == pytest.approx(1 / (1 + math.exp(-theta)), abs=1e-9)
    assert np.mean(q) > fit["lc_win_rate"] + 0.05  # the raw rate is inflated by the longer candidates


def test_length_control_removes_a_pure_length_preference():
    # A judge that only prefers the longer response; the candidate is longer on 80% of prompts.
    judge = J.load_judge(f"{__name__}:longer_wins")
    rng = np.random.default_rng(1)
    n = 200
    baseline_len = rng.integers(5, 15, size=n)
    longer = np.arange(n) < 160
    candidate_len = np.where(longer, baseline_len + rng.integers(1, 10, size=n), baseline_len - rng.integers(1, 4, size=n))
    candidate = ["w" * int(k) for k in candidate_len]
    baseline = ["w" * int(k) for k in baseline_len]
    a, b = judge(["p"] * n, candidate, baseline), judge(["p"] * n, baseline, candidate)
    summary = W.summarize_judgements(a, b, candidate_len, baseline_len)
    assert summary["win_rate"] == pytest.approx(0.8)
    assert abs(summary["lc_win_rate"] - 0.5) < 0.1  # at equal length the judge has no preference
    assert summary["lc_length_coef"] > 1


def test_length_control_degenerate_cases_report_the_raw_rate():
    assert W.length_controlled_win_rate([1, 1, 1], [3, 4, 5], [1, 1, 1])["lc_win_rate"] == 1.0
    same = W.length_controlled_win_rate([1, 0, 0.5], [3, 3, 3], [1, 1, 1])
    assert same["lc_win_rate"] == 0.5 and "not identifiable" in same["note"]


def test_bad_verdicts_are_named():
    def judge_returning(values):
        module = type(sys)("fake_judges")
        module.j = lambda p, a, b: values
        sys.modules["fake_judges"] = module
        return J.load_judge("fake_judges:j")

    with pytest.raises(J.JudgeError, match=r"verdict 1.5 at item 1 is not a probability"):
        judge_returning([0.2, 1.5])(["p", "q"], ["a", "b"], ["c", "d"])
    with pytest.raises(J.JudgeError, match=r"verdict 'C' at item 0"):
        judge_returning(["C", "A"])(["p", "q"], ["a", "b"], ["c", "d"])
    with pytest.raises(J.JudgeError, match="expected 2 verdicts, got 1"):
        judge_returning([0.2])(["p", "q"], ["a", "b"], ["c", "d"])
    with pytest.raises(J.JudgeError, match="no such model folder"):
        J.load_judge("/nonexistent/judge")
    with pytest.raises(J.JudgeError, match="cannot import module"):
        J.load_judge("no_such_module_xyz:f")


# ---------------------------------------------------------------- an OpenAI-compatible endpoint on 127.0.0.1

class _JudgeServer:
    """Chat completions: answers 'A' when response A contains 'good' (else 'B'), with top log-probs
    when ``logprobs`` is asked for and ``with_logprobs`` is set."""

    def __init__(self, with_logprobs: bool):
        self.requests = []
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server_self.requests.append((self.path, dict(self.headers), body))
                text = body["messages"][-1]["content"]
                first = text.split("Response A:\n", 1)[1].split("\n\nResponse B:", 1)[0]
                letter = "A" if "good" in first else "B"
                choice = {"index": 0, "message": {"role": "assistant", "content": letter}, "finish_reason": "length"}
                if with_logprobs and body.get("logprobs"):
                    p = 0.9
                    choice["logprobs"] = {"content": [{"token": letter, "logprob": math.log(p), "top_logprobs": [
                        {"token": letter, "logprob": math.log(p)},
                        {"token": "B" if letter == "A" else "A", "logprob": math.log(1 - p)}]}]}
                reply = json.dumps({"id": "x", "object": "chat.completion", "choices": [choice]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


@pytest.mark.parametrize("with_logprobs", [True, False])
def test_endpoint_judge_on_a_loopback_server(with_logprobs, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with _JudgeServer(with_logprobs) as server:
        judge = J.load_judge(f"{server.url}#judge-model")
        verdicts = judge(["p1", "p2"], ["a good answer", "bad"], ["bad", "good"])
    expected = [0.9, 0.1] if with_logprobs else [1.0, 0.0]
    assert verdicts.tolist() == pytest.approx(expected)
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "judge-model" and body["max_tokens"] == 1
    assert headers["Authorization"] == "Bearer sk-test"
    assert "Response A:\na good answer" in body["messages"][-1]["content"]


def test_endpoint_judge_errors_name_the_endpoint():
    with pytest.raises(J.JudgeError, match="name the model"):
        J.load_judge("http://127.0.0.1:1/v1")
    with pytest.raises(J.JudgeError, match="cannot reach"):
        J.load_judge("http://127.0.0.1:1/v1#m")(["p"], ["a"], ["b"])


# ---------------------------------------------------------------- a local model folder

def test_model_judge_reads_the_logits_of_a_and_b(tmp_path):
    import torch

    from tiny import make_tiny_model_dir

    folder = make_tiny_model_dir(tmp_path / "judge")
    judge = J.load_judge(str(folder))
    p = judge(["say hi", "say bye"], ["hi", "bye"], ["hello", "ciao"])
    assert p.shape == (2,) and np.all((p > 0) & (p < 1))
    # the same value by hand: softmax over the A/B logits after the rendered instruction
    tokenizer, model = judge._tokenizer, judge._model
    text = judge._text("say hi", "hi", "hello")
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    a, b = judge._letters
    assert p[0] == pytest.approx(torch.softmax(logits[[a, b]], -1)[0].item(), abs=1e-5)


# ---------------------------------------------------------------- dpo-zoo compare with a judge

def test_compare_reports_the_win_rate_of_its_judge(tiny_prepared, tmp_path):
    """A run that has not moved (learning rate 0) samples exactly what its reference samples (same seed):
    every item is a tie, whatever the judge's position bias; a real run's rate is the stub's hand count."""
    from dpo_zoo.compare.runner import run_compare
    from dpo_zoo.config import load_config
    from dpo_zoo.train.trainer import train

    still = tmp_path / "still"
    moved = tmp_path / "moved"
    train(load_config([], [*tiny_prepared, f"train.output_dir={still}", "train.learning_rate=0", "train.max_steps=1"]))
    train(load_config([], [*tiny_prepared, f"train.output_dir={moved}", "train.learning_rate=0.05", "train.max_steps=2"]))
    prep_dir = next(o.split("=", 1)[1] for o in tiny_prepared if o.startswith("prep.output_dir="))
    settings = ["compare.judge_prompts=6", "compare.judge_max_new_tokens=8", "compare.kl_prompts=2"]
    cfg = load_config([], [*tiny_prepared, *settings, f"compare.judge={__name__}:always_first"])
    summary = run_compare(cfg, [str(still)], f"{prep_dir}/heldout", output_dir=str(tmp_path / "report_still"))
    rate = summary["entries"][0]["win_rate"]
    assert rate["win_rate"] == 0.5 and rate["ties"] == 6 and rate["first_position_rate"] == 1.0
    judged = summary["judge"]["judged"]["still"]
    assert judged["completions"] == judged["baseline"]

    cfg = load_config([], [*tiny_prepared, *settings, f"compare.judge={__name__}:longer_wins", "compare.judge_baseline=still"])
    summary = run_compare(cfg, [str(still), str(moved)], f"{prep_dir}/heldout", output_dir=str(tmp_path / "report"))
    by_label = {e["subject"]: e["win_rate"] for e in summary["entries"]}
    assert by_label["still"] is None  # the baseline itself
    judged = summary["judge"]["judged"]["moved"]
    hand = [1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5
            for a, b in zip(judged["completions"], judged["baseline"])]
    assert by_label["moved"]["win_rate"] == pytest.approx(sum(hand) / len(hand))
    assert by_label["moved"]["n"] == 6 and judged["completions"] != judged["baseline"]
    table = (tmp_path / "report" / "summary.md").read_text()
    assert "win rate ± se" in table and "baseline" in table and "against still" in table
    assert "win rate" in (tmp_path / "report" / "report.html").read_text()


# ---------------------------------------------------------------- the judge as a study reward

def test_judge_reward_scores_the_debiased_preference_against_each_prompts_baseline():
    from dpo_zoo.rewards.scorers import RewardError, load_reward

    reward = load_reward(f"judge:{__name__}:contains_good")
    assert reward.needs_baselines and reward.identity["judge"]["spec"] == f"{__name__}:contains_good"
    reward.set_baselines(["p1", "p2"], ["a good one", "plain"])
    # p1: "bad" loses to the good baseline (0); p2: "good" beats the plain one (1); p1: "good" ties (½)
    assert reward(["p1", "p2", "p1"], ["bad", "good", "good too"]).tolist() == [0.0, 1.0, 0.5]
    with pytest.raises(RewardError, match="no baseline response for the prompt 'p3'"):
        reward(["p3"], ["x"])


def test_study_baselines_are_the_chosen_responses_of_the_evaluation_prompts(tiny_prepared):
    from dpo_zoo.cache.reader import PreparedSet
    from dpo_zoo.compare.drift import kl_prompt_ids
    from dpo_zoo.compare.judging import chosen_baselines
    from dpo_zoo.model.loading import load_tokenizer

    prep_dir = next(o.split("=", 1)[1] for o in tiny_prepared if o.startswith("prep.output_dir="))
    model = next(o.split("=", 1)[1] for o in tiny_prepared if o.startswith("model.name_or_path="))
    heldout, tokenizer = PreparedSet.open(f"{prep_dir}/heldout"), load_tokenizer(model)
    prompts, chosen = chosen_baselines(heldout, 5, tokenizer)
    # the prompts the study decodes for its reward (dpo_zoo/study/runner.py, Evaluator._measure)
    assert prompts == [tokenizer.decode(p, skip_special_tokens=True) for p in kl_prompt_ids(heldout, 5)]
    first = heldout.rows([0])[0]
    assert chosen[0] == tokenizer.decode(first["chosen_input_ids"][first["chosen_completion_start"]:],
                                         skip_special_tokens=True)
    assert len(set(chosen)) > 1
