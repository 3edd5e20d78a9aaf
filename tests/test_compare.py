"""`dpo-zoo compare`: KL estimators against exact enumeration, prepared data → training → report, one
forward pass for every loss, live reference when the cache lacks what a loss needs, tokenizer checks.

Unit tests use the tiny random Llama of conftest; the real SmolLM2 run is `slow`.
"""

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dpo_zoo.cli import main as cli_main
from dpo_zoo.compare.runner import run_compare
from dpo_zoo.config import load_config
from dpo_zoo.compare.drift import kl_samples, sequence_kl_terms
from dpo_zoo.errors import CacheError, CompareError
from dpo_zoo.model.logps import completion_logps
from dpo_zoo.losses import LossConfigError, registered_losses
from dpo_zoo.metrics import functions as M


def override_value(overrides, key):
    return next(o.split("=", 1)[1] for o in overrides if o.startswith(key + "="))


def pair_tolerances(pairs):
    """Per pair, the bound within which compare takes a margin for 0 (M.rounding_tolerance: 16 float32
    epsilons of the pair's largest summed log-prob)."""
    return M.rounding_tolerance(pairs.policy_chosen_logps, pairs.policy_rejected_logps,
                                pairs.reference_chosen_logps, pairs.reference_rejected_logps)


# ==================================================================== KL estimators


def test_sequence_kl_terms_by_hand():
    """One position, vocabulary {a, b}. Policy p = (½, ½), reference q = (¼, ¾), sampled token a:
    MC = log(½ / ¼) = ln 2;  RB = ½ ln(½/¼) + ½ ln(½/¾) = ½ ln 2 + ½ ln(2/3) = ½ ln(4/3);  H(p) = ln 2.
    Second row: p = (1, 0) (log 0 = −inf), q = (½, ½), token a: MC = RB = ln 2, H = 0, no NaN from 0·log 0.
    A masked (padding) position adds nothing."""
    log = math.log
    policy = torch.tensor([[[log(0.5), log(0.5)], [log(0.5), log(0.5)]],
                           [[0.0, -math.inf], [0.0, -math.inf]]], dtype=torch.float64)
    reference = torch.tensor([[[log(0.25), log(0.75)], [log(0.9), log(0.1)]],
                              [[log(0.5), log(0.5)], [log(0.5), log(0.5)]]], dtype=torch.float64)
    labels = torch.tensor([[0, 1], [0, 0]])
    mask = torch.tensor([[1, 0], [1, 0]])
    terms = sequence_kl_terms(policy, reference, labels, mask)
    assert terms["mc"].tolist() == pytest.approx([log(2), log(2)])
    assert terms["rb"].tolist() == pytest.approx([0.5 * log(4 / 3), log(2)])
    assert terms["entropy"].tolist() == pytest.approx([log(2), 0.0])
    assert terms["tokens"].tolist() == [1.0, 1.0]


EOS, VOCAB, PAD = 4, 5, 0


def toy_llama(seed):
    """A 1-layer Llama over a 5-token vocabulary (token 4 = EOS), large random weights so that the
    next-token distributions are far from uniform and two seeds are far apart (KL of a few nats)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         initializer_range=0.7, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def all_completions(max_new_tokens=3):
    """Every completion the sampler can produce: ends at EOS, or after 3 tokens: 1 + 4 + 16·5 = 85."""
    out = []
    for length in range(1, max_new_tokens + 1):
        for body in __import__("itertools").product(range(VOCAB - 1), repeat=length - 1):
            out.append(list(body) + [EOS])
    out += [list(body) + [last] for body in __import__("itertools").product(range(VOCAB - 1), repeat=max_new_tokens - 1)
            for last in range(VOCAB - 1)]
    return out


def exact_kl(policy, reference, prompt):
    """KL(p ‖ q) = Σ_y p(y) log p(y)/q(y) over all 85 completions, and the exact variances of the
    per-sample MC and RB values, Var = Σ_y p(y) (value(y) − KL)²."""
    completions = all_completions()
    sequences = [prompt + c for c in completions]
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), PAD)
    attention = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
    starts = torch.full((len(sequences),), len(prompt))
    with torch.no_grad():
        mine = completion_logps(policy, ids, attention, starts, vocab=True)
        theirs = completion_logps(reference, ids, attention, starts, vocab=True)
    terms = sequence_kl_terms(mine.vocab_logps.double(), theirs.vocab_logps.double(), mine.labels, mine.mask)
    p = mine.sums().double().exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-5)  # the 85 completions are the whole space
    kl = (p * terms["mc"]).sum().item()
    # Rao–Blackwell: the RB value is the conditional expectation of the MC value, same mean.
    assert (p * terms["rb"]).sum().item() == pytest.approx(kl, rel=1e-5)
    return {"kl": kl, "var_mc": (p * (terms["mc"] - kl) ** 2).sum().item(),
            "var_rb": (p * (terms["rb"] - kl) ** 2).sum().item()}


def test_mc_and_rao_blackwell_kl_agree_with_exact_kl_and_rb_has_lower_variance():
    """Two prompts of different lengths (so the sampler's left padding is exercised), 3000 samples each.

    Exact (enumeration): KL ≈ 2.04 and 3.57 nats; per-sample variance MC ≈ 8.9 / 11.0, RB ≈ 0.26 / 1.04.
    Over the 6000 samples the standard errors are ≈ 0.042 (MC) and ≈ 0.014 (RB), so a 4-σ band is a
    sound test of unbiasedness (a false failure has probability ≈ 6e-5 per estimator); the sample
    variances of the 6000 values (mixtures over the two prompts) must be within 10% of the exact ones
    (relative standard error of a sample variance here ≈ 3%), and RB's below MC's, as proved."""
    policy, reference = toy_llama(0), toy_llama(1)
    prompts = [[1], [2, 3, 1]]
    exact = [exact_kl(policy, reference, prompt) for prompt in prompts]
    for e in exact:
        assert e["var_rb"] <= e["var_mc"]
    samples = kl_samples(policy, reference, prompts, n_samples=3000, max_new_tokens=3, eos_token_id=EOS,
                         pad_token_id=PAD, batch_size=6000, seed=0, device=torch.device("cpu"), progress=False)
    for completion in samples["completions"]:
        assert 1 <= len(completion) <= 3
        assert EOS not in completion[:-1]  # sampling stops at EOS
    n = len(samples["mc"])
    assert n == 6000
    true_kl = np.mean([e["kl"] for e in exact])
    # Mixture variance over the two equally weighted prompts: mean of (within variance + squared offset).
    true_var = {name: np.mean([e[f"var_{name}"] + (e["kl"] - true_kl) ** 2 for e in exact]) for name in ("mc", "rb")}
    for name in ("mc", "rb"):
        values = samples[name]
        stderr = values.std(ddof=1) / math.sqrt(n)
        assert abs(values.mean() - true_kl) < 4 * stderr, (name, values.mean(), true_kl, stderr)
        assert values.var(ddof=1) == pytest.approx(true_var[name], rel=0.10)
    assert samples["rb"].var(ddof=1) < samples["mc"].var(ddof=1) / 4  # ≈ 8.5× smaller here
    assert samples["rb"].min() >= 0  # a sum of KLs is never negative; MC values often are
    assert samples["mc"].min() < 0


@pytest.mark.float_sensitive
def test_sampling_is_seeded():
    policy = toy_llama(0)
    kwargs = dict(n_samples=4, max_new_tokens=3, eos_token_id=EOS, pad_token_id=PAD, batch_size=8,
                  device=torch.device("cpu"), progress=False)
    first = kl_samples(policy, policy, [[1], [2, 3]], seed=7, **kwargs)
    again = kl_samples(policy, policy, [[1], [2, 3]], seed=7, **kwargs)
    assert first["completions"] == again["completions"]
    assert np.allclose(first["rb"], 0.0) and np.allclose(first["mc"], 0.0)  # a model against itself


# ==================================================================== prepared data → runs → report

GOOD = ["good", "great", "nice", "happy", "love", "thank"]
BAD = ["bad", "awful", "hate", "sad", "angry", "never"]
PROMPTS = ["Tell me about your day.", "How was the movie?", "What do you think of it?", "Describe the food."]


def synthetic_rows(n, seed):
    """Pairs with an easily learned signal: chosen completions use only GOOD words, rejected only BAD."""
    rng = random.Random(seed)
    return [{"id": f"s{seed}-{i}", "prompt": rng.choice(PROMPTS) + "\n",
             "chosen": " ".join(rng.choice(GOOD) for _ in range(rng.randint(3, 6))),
             "rejected": " ".join(rng.choice(BAD) for _ in range(rng.randint(3, 6)))} for i in range(n)]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def synthetic_overrides(model_dir, root, train_file, prep_dir, *extra):
    return [
        f"model.name_or_path={model_dir}", "data.preprocessor=generic", f"data.train_path={train_file}",
        f"data.heldout_path={root / 'heldout.jsonl'}", f"prep.output_dir={prep_dir}", "prep.max_length=64",
        "prep.max_prompt_length=24", "prep.progress=false", "train.progress=false", "compare.progress=false",
        "train.micro_batch_size=8", "train.max_steps=10", "train.learning_rate=5e-3", "train.lr_schedule=constant",
        "compare.kl_prompts=4", "compare.kl_samples=2", "compare.kl_max_new_tokens=8", *extra,
    ]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, tiny_model_dir):
    """96 training pairs, 24 held-out pairs, prepared without top-k; a run trained on them (full
    fine-tuning) and a run trained on the same pairs with chosen and rejected swapped (LoRA)."""
    from dpo_zoo.cache.prep import run_prep
    from dpo_zoo.train.trainer import train

    root = tmp_path_factory.mktemp("synthetic")
    train_rows = synthetic_rows(96, seed=1)
    write_jsonl(root / "train.jsonl", train_rows)
    write_jsonl(root / "heldout.jsonl", synthetic_rows(24, seed=2))
    write_jsonl(root / "flipped.jsonl", [dict(r, chosen=r["rejected"], rejected=r["chosen"]) for r in train_rows])
    normal = synthetic_overrides(tiny_model_dir, root, root / "train.jsonl", root / "prep_normal")
    flipped = synthetic_overrides(tiny_model_dir, root, root / "flipped.jsonl", root / "prep_flipped")
    run_prep(load_config([], normal))
    run_prep(load_config([], flipped))
    train(load_config([], normal + [f"train.output_dir={root / 'runs' / 'normal'}"]))
    train(load_config([], flipped + [f"train.output_dir={root / 'runs' / 'flipped'}", "train.lora.enabled=true"]))
    return {"root": root, "overrides": normal, "heldout": root / "prep_normal" / "heldout",
            "normal": root / "runs" / "normal", "flipped": root / "runs" / "flipped"}


@pytest.mark.float_sensitive
def test_compare_normal_and_flipped_runs_end_to_end(synthetic, tmp_path, capsys):
    out = tmp_path / "report"
    summary = run_compare(load_config([], synthetic["overrides"]),
                          runs=[str(synthetic["normal"]), str(synthetic["flipped"])],
                          data=str(synthetic["heldout"]), output_dir=str(out))
    entries = {e["label"]: e for e in summary["entries"]}
    assert list(entries) == ["normal", "flipped"]
    assert entries["normal"]["metrics"]["rewards/accuracies"] > 0.5
    assert entries["flipped"]["metrics"]["rewards/accuracies"] < 0.5
    assert entries["flipped"]["lora"] is True and entries["normal"]["lora"] is False
    assert all(e["reference"] == "cache" for e in entries.values())

    import pandas as pd

    pairs = pd.read_parquet(out / "pairs.parquet")
    # Same loss, same reduction as the trainer's final evaluation on this held-out set. Both read the
    # cached reference, but the trainer's pass batches the policy's pairs otherwise, so its log-probs
    # agree with compare's only to float32 rounding, within pair_tolerances (measured: < 1/20 of it).
    # −log σ(m) has slope below 1 in m, so the mean loss moves by at most the mean bound; and a pair
    # compare scores ½ (margin 0 up to that bound) may fall on either side in the trainer's strict
    # margin > 0, so the accuracies differ by at most ½ per such pair.
    for label, entry in entries.items():
        trained = json.loads((synthetic[label] / "run.json").read_text())["metrics"]
        bound = pair_tolerances(pairs[pairs.entry == label])
        assert entry["metrics"]["loss"] == pytest.approx(trained["eval_loss"], abs=float(bound.mean()))
        n, zero = entry["metrics"]["pairs"], entry["metrics"]["rewards/zero_margins"]
        assert entry["metrics"]["rewards/accuracies"] == pytest.approx(trained["eval_rewards/accuracies"],
                                                                        abs=0.5 * zero / n + 1e-12)
        kl = entry["kl"]
        assert kl["n_samples"] == 8 and kl["rb"] > 0 and math.isfinite(kl["mc"]) and kl["entropy_per_token"] > 0

    # Every registered loss has a held-out value, or a reason: no top-k in this cache.
    for label in ("normal", "flipped"):
        cells = summary["heldout_losses"][label]
        assert set(cells) == set(registered_losses())
        assert cells["dpo"]["value"] == pytest.approx(entries[label]["metrics"]["loss"])
        assert cells["ra_dpo"]["value"] is None and "prep.topk" in cells["ra_dpo"]["skipped"]
        assert cells["sampo"]["value"] is not None and cells["tie_dpo"]["value"] is not None

    for name in ("summary.md", "summary.json", "pairs.csv", "pairs.parquet", "report.html"):
        assert (out / name).is_file(), name
    printed = capsys.readouterr().out
    assert "| entry | loss | ref | acc |" in printed and printed.count("\n| normal | dpo | cache |") == 1
    assert (out / "summary.md").read_text() in printed
    assert json.loads((out / "summary.json").read_text())["entries"][0]["label"] == "normal"

    assert len(pairs) == 2 * 24 and len(pd.read_csv(out / "pairs.csv")) == 2 * 24
    # The margin is the loss's own: for DPO β·[(log π − log π_ref)(y_w) − (log π − log π_ref)(y_l)].
    h = (pairs.policy_chosen_logps - pairs.reference_chosen_logps) - (pairs.policy_rejected_logps - pairs.reference_rejected_logps)
    assert np.allclose(pairs.margin, 0.1 * h, atol=1e-5)
    assert np.allclose(pairs["loss/dpo"], np.logaddexp(0, -0.1 * h), atol=1e-5)  # −log σ(βh)
    assert (pairs.length_diff == pairs.chosen_len - pairs.rejected_len).all()

    page = (out / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 4  # margins, length, KL vs accuracy, calibration
    assert "http://" not in page and "https://" not in page  # self-contained


def test_live_reference_when_the_cache_lacks_what_the_loss_needs(synthetic, tmp_path):
    """ra_dpo needs the reference's vocabulary distribution; the synthetic set has no top-k, so
    compare runs the reference live from the run's base model, says so, and can then score even
    ra_dpo_official (which needs the whole reference vocabulary, not a top-k)."""
    from dpo_zoo.train.trainer import train

    run_dir = tmp_path / "ra"
    train(load_config([], synthetic["overrides"] + [f"train.output_dir={run_dir}", "loss=ra_dpo",
                                                     "train.max_steps=1", "train.lora.enabled=true"]))
    summary = run_compare(load_config([], synthetic["overrides"]), runs=[str(run_dir)], data=str(synthetic["heldout"]),
                          output_dir=str(tmp_path / "report"))
    entry = summary["entries"][0]
    assert entry["loss"] == "ra_dpo" and entry["reference"] == "live"
    assert any("reference run live" in note and "vocab_logps" in note for note in summary["notes"])
    cells = summary["heldout_losses"]["ra"]
    assert all(cell["value"] is not None for cell in cells.values()), cells
    assert math.isfinite(entry["metrics"]["rewards/accuracies"])


def test_losses_all_from_one_forward_pass(tiny_prepared, tiny_model_dir, tmp_path):
    """One model folder under every registered loss: the policy runs once per batch, nothing else runs
    (reference from the cache, no sampling), and ra_dpo_official — which needs the whole reference
    vocabulary, not the cached top-k — is reported as not scored."""
    from transformers import GenerationMixin

    heldout = Path(override_value(tiny_prepared, "prep.output_dir")) / "heldout"
    cfg = load_config([], list(tiny_prepared) + ["compare.kl_samples=0", "compare.batch_size=4"])
    calls = []

    def count(module, args, kwargs, output):
        # the decoder (LlamaModel): the packed path runs it and applies the LM head itself
        if not isinstance(module, GenerationMixin) and hasattr(module, "layers") and hasattr(module, "embed_tokens"):
            calls.append(kwargs.get("input_ids", args[0] if args else None).shape)

    handle = torch.nn.modules.module.register_module_forward_hook(count, with_kwargs=True)
    try:
        summary = run_compare(cfg, runs=[str(tiny_model_dir)], data=str(heldout), losses="all",
                              output_dir=str(tmp_path / "all"))
    finally:
        handle.remove()
    n_pairs = summary["data"]["pairs"]
    assert len(calls) == math.ceil(n_pairs / 4)  # one forward per batch of 4 pairs
    assert all(shape[0] == 1 for shape in calls)  # each one packed row: [prompt | chosen | rejected] per pair
    scored = {e["label"] for e in summary["entries"]}
    assert scored == set(registered_losses()) - {"ra_dpo_official"}
    assert any(note.startswith("ra_dpo_official: not scored") for note in summary["notes"])
    assert all(e["kl"]["n_samples"] == 0 for e in summary["entries"])
    # One pass: the policy log-probs behind every entry are the same numbers (the same computation,
    # so exact equality is right here).
    import pandas as pd

    pairs = pd.read_parquet(tmp_path / "all" / "pairs.parquet")
    spread = pairs.groupby("id")["policy_chosen_logps"].agg(lambda v: v.max() - v.min())
    assert (spread == 0).all()

    # The same through the command line, for a comma list.
    rc = cli_main(["compare", str(tiny_model_dir), "--data", str(heldout), "--losses", "dpo,ipo",
                   "--output", str(tmp_path / "two"), "--config", *tiny_prepared, "compare.kl_samples=0"])
    assert rc == 0
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert [e["label"] for e in two["entries"]] == ["dpo", "ipo"]


def test_an_unchanged_comparison_is_reused_and_a_changed_one_recomputed(tiny_prepared, tiny_model_dir, tmp_path,
                                                                         capsys):
    """A second compare of the same model, held-out set and settings runs no model and prints the same
    table; new weights, or compare.overwrite=true, recompute it."""
    import shutil

    heldout = Path(override_value(tiny_prepared, "prep.output_dir")) / "heldout"
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    base = list(tiny_prepared) + ["compare.kl_samples=0"]
    forwards = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: forwards.append(1))

    def compare(*extra):
        forwards.clear()
        summary = run_compare(load_config([], base + list(extra)), runs=[str(model)], data=str(heldout),
                              losses="dpo,sampo", output_dir=str(tmp_path / "report"))
        return summary, len(forwards), capsys.readouterr().out

    try:
        first, n_first, printed_first = compare()
        html_stamp = (tmp_path / "report" / "report.html").stat().st_mtime_ns
        second, n_second, printed_second = compare("compare.progress=false")  # display only: still reused
        assert n_first > 0 and n_second == 0
        assert "reusing it (set compare.overwrite=true to recompute)" in printed_second
        assert (tmp_path / "report" / "summary.md").read_text() in printed_second
        assert second["entries"] == json.loads(json.dumps(first["entries"], default=str))
        assert (tmp_path / "report" / "report.html").stat().st_mtime_ns == html_stamp

        _, n_overwrite, printed = compare("compare.overwrite=true")
        assert n_overwrite > 0 and "reusing" not in printed
        (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())  # rewritten weights
        _, n_changed, printed = compare()
        assert n_changed > 0 and "reusing" not in printed
        _, n_other_batch, _ = compare("compare.batch_size=3")  # a setting of the comparison changed
        assert n_other_batch > 0
    finally:
        handle.remove()


def test_tokenizer_mismatch_is_refused(tiny_prepared, tiny_model_dir, tmp_path, capsys):
    heldout = Path(override_value(tiny_prepared, "prep.output_dir")) / "heldout"
    cfg = load_config([], list(tiny_prepared) + ["compare.kl_samples=0"])
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")  # another chat template
    with pytest.raises(CompareError, match="different tokenizers") as err:
        run_compare(cfg, runs=[str(other)], data=str(heldout), losses="dpo", output_dir=str(tmp_path / "r"))
    assert "manifest.json" in str(err.value) and str(other) in str(err.value)

    # A run folder: the tokenizer its training set was made with (run.json) must match too.
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "final")
    (run / "run.json").write_text(json.dumps({"loss": "dpo", "loss_hparams": {"beta": 0.1},
                                              "base_model": str(tiny_model_dir), "lora": False,
                                              "cache_key": {"tokenizer": "0" * 64}}))
    with pytest.raises(CompareError, match=r"run.json `cache_key.tokenizer`"):
        run_compare(cfg, runs=[str(run)], data=str(heldout), output_dir=str(tmp_path / "r"))
    # The CLI prints it plainly and exits 2.
    rc = cli_main(["compare", str(other), "--data", str(heldout), "--losses", "dpo", "--config", *tiny_prepared])
    assert rc == 2 and "different tokenizers" in capsys.readouterr().err


@pytest.mark.float_sensitive
def test_clear_errors_for_bad_arguments(tiny_prepared, tiny_model_dir, tmp_path):
    heldout = Path(override_value(tiny_prepared, "prep.output_dir")) / "heldout"
    cfg = load_config([], list(tiny_prepared) + ["compare.kl_samples=0"])
    with pytest.raises(LossConfigError, match="unknown loss 'dpoo'"):
        run_compare(cfg, runs=[str(tiny_model_dir)], data=str(heldout), losses="dpo,dpoo")
    with pytest.raises(CacheError, match="no prepared set"):
        run_compare(cfg, runs=[str(tiny_model_dir)], data=str(tmp_path / "nothing"), losses="dpo")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run.json").write_text(json.dumps({"loss": "dpo", "loss_hparams": {}, "base_model": str(tiny_model_dir)}))
    with pytest.raises(CompareError, match="has no final/"):
        run_compare(cfg, runs=[str(unfinished)], data=str(heldout))
    with pytest.raises(CompareError, match="neither a run folder"):
        run_compare(cfg, runs=[str(tmp_path)], data=str(heldout))
    # The prep output folder itself is accepted as --data (its heldout/ is used).
    summary = run_compare(cfg, runs=[str(tiny_model_dir)], data=str(heldout.parent), losses="dpo",
                          output_dir=str(tmp_path / "ok"))
    # The base model against the cache made from it: the policy is the reference, so every margin is 0,
    # but only up to float32 rounding: the cache's reference pass and compare's policy pass batch and
    # pad the pairs differently, so margins come out as ±1e-6 or so, with signs that depend on the CPU
    # and the batching. Compare counts a margin within M.rounding_tolerance of 0 as no preference (½),
    # which makes the accuracy exactly ½ on any machine; the bound is ≥ 20× the rounding measured here.
    import pandas as pd

    metrics = summary["entries"][0]["metrics"]
    pairs = pd.read_parquet(tmp_path / "ok" / "pairs.parquet")
    bound = pair_tolerances(pairs)
    assert (pairs.margin.abs() <= bound).all(), (pairs.margin.abs() / bound).max()
    assert metrics["rewards/zero_margins"] == metrics["pairs"] - metrics["ties"] > 0
    assert metrics["rewards/accuracies"] == 0.5
    # −log σ(m) is log 2 at m = 0 with slope ½, so each pair's loss is within ½|m| ≤ ½ bound of log 2.
    assert metrics["loss"] == pytest.approx(math.log(2), abs=0.5 * float(bound.max()))
    assert f"| 0.500 ({metrics['rewards/zero_margins']} at 0) |" in (tmp_path / "ok" / "summary.md").read_text()


def test_truncated_or_pickled_final_weights_are_clear_errors(tiny_prepared, tiny_model_dir, tmp_path, capfd):
    """compare refuses a run whose final/ (full weights or LoRA adapter) is truncated, naming the file,
    and an adapter saved as a pickle, which it never unpickles; the CLI prints it plainly and exits 2."""
    from peft import LoraConfig, get_peft_model

    from dpo_zoo.model.loading import load_model, peft_wrapping

    heldout = Path(override_value(tiny_prepared, "prep.output_dir")) / "heldout"

    def compare_cli(run):
        code = cli_main(["compare", str(run), "--data", str(heldout), "--output", str(tmp_path / "report"),
                         "--config", *tiny_prepared, "compare.kl_samples=0"])
        captured = capfd.readouterr()
        assert "Traceback" not in captured.out + captured.err
        return code, captured.err

    def truncate(path):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    full = tmp_path / "full"
    shutil.copytree(tiny_model_dir, full / "final")
    (full / "run.json").write_text(json.dumps({"loss": "dpo", "loss_hparams": {"beta": 0.1},
                                               "base_model": str(tiny_model_dir), "lora": False}))
    truncate(full / "final" / "model.safetensors")
    code, err = compare_cli(full)
    assert code == 2
    assert f"{full / 'final' / 'model.safetensors'}: not a complete safetensors file" in err
    assert "truncated or damaged" in err

    adapter = tmp_path / "adapter"
    with peft_wrapping():
        model = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(adapter / "final", safe_serialization=True)
    (adapter / "run.json").write_text(json.dumps({"loss": "dpo", "loss_hparams": {"beta": 0.1},
                                                  "base_model": str(tiny_model_dir), "lora": True}))
    assert compare_cli(adapter)[0] == 0  # whole, it loads
    truncate(adapter / "final" / "adapter_model.safetensors")
    code, err = compare_cli(adapter)
    assert code == 2
    assert f"{adapter / 'final' / 'adapter_model.safetensors'}: not a complete safetensors file" in err

    (adapter / "final" / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.ones(1)}, adapter / "final" / "adapter_model.bin")
    code, err = compare_cli(adapter)
    assert code == 2 and "only pickled weights (adapter_model.bin)" in err


# ==================================================================== the real model


@pytest.mark.slow
def test_compare_lora_runs_of_smollm2_on_vader(tmp_path):
    """SmolLM2-135M on a small VADER slice: two short LoRA runs (dpo, sampo), compared with sampling."""
    from dpo_zoo.cache.prep import run_prep
    from dpo_zoo.train.trainer import train

    overrides = [
        "model.name_or_path=smollm2-135m-instruct", "data.preprocessor=vader", "data.max_train_pairs=32",
        "data.max_heldout_pairs=16", f"prep.output_dir={tmp_path / 'prepared'}", "prep.max_length=128",
        "prep.max_prompt_length=64", "prep.progress=false", "train.progress=false", "compare.progress=false",
        "train.micro_batch_size=4", "train.max_steps=2", "train.learning_rate=1e-4", "train.lora.enabled=true",
        "compare.kl_prompts=2", "compare.kl_samples=2", "compare.kl_max_new_tokens=8",
    ]
    run_prep(load_config([], overrides))
    for loss in ("dpo", "sampo"):
        train(load_config([], overrides + [f"loss={loss}", f"train.output_dir={tmp_path / loss}"]))
    summary = run_compare(load_config([], overrides), runs=[str(tmp_path / "dpo"), str(tmp_path / "sampo")],
                          data=str(tmp_path / "prepared" / "heldout"), output_dir=str(tmp_path / "report"))
    assert [e["loss"] for e in summary["entries"]] == ["dpo", "sampo"]
    for entry in summary["entries"]:
        m = entry["metrics"]
        assert 0 <= m["rewards/accuracies"] <= 1 and math.isfinite(m["calibration/ece"])
        assert entry["kl"]["n_samples"] == 4 and entry["kl"]["rb"] >= 0
    assert summary["data"]["ties"] == summary["entries"][0]["metrics"]["ties"]
    assert (tmp_path / "report" / "report.html").stat().st_size > 10_000
