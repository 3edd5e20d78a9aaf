"""``dpo-zoo prep`` end to end on the tiny model: values, cache hits and misses, resume after a kill,
damaged shards, user-supplied reference log-probs, several processes, --verify and the shipped configs."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import dpo_zoo.cache.prep as prep_module
from dpo_zoo.cache import format as S
from dpo_zoo.cache.reader import PreparedSet, lookup, read_manifest
from dpo_zoo.cache.format import MANIFEST, shard_file, sidecar_file
from dpo_zoo.cli import main as cli_main
from dpo_zoo.config import REPO_ROOT, load_config
from dpo_zoo.errors import DataError
from dpo_zoo.losses.base import Need
from dpo_zoo.model.loading import load_model
from dpo_zoo.cache.prep import Processes, _load_context, plan_batches, run_prep

N_PAIRS = 16
SHARD_SIZE = 4
BATCH_SIZE = 2  # 4 sequences per forward: 2 forwards per shard of 4 pairs


def write_data(path: Path, n: int = N_PAIRS, change_row: int = -1) -> Path:
    """Conversational pairs (the chat template applies) of varied lengths."""
    with open(path, "w") as f:
        for i in range(n):
            answer = "changed answer" if i == change_row else f"Fine, thank you {i}." + " Really." * (i % 4)
            f.write(json.dumps({
                "id": f"q{i}",
                "prompt": [{"role": "user", "content": f"Question {i}: how are things going today?" + " Tell me." * (i % 3)}],
                "chosen": [{"role": "assistant", "content": answer}],
                "rejected": [{"role": "assistant", "content": "Go away." + " Now!" * (i % 5)}],
            }) + "\n")
    return path


@pytest.fixture
def workdir(tmp_path, tiny_model_dir, monkeypatch):
    """A working directory with data.jsonl, the tiny model and relative paths (they follow the cwd)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DPO_ZOO_CACHE", str(tmp_path / "cache"))  # hash memos of these throw-away models
    write_data(tmp_path / "data.jsonl")
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    return tmp_path


def make_cfg(*overrides, output="out"):
    return load_config([], [
        "model.name_or_path=model",
        "data.train_path=data.jsonl",
        "data.heldout_fraction=0.0",
        f"prep.output_dir={output}",
        f"prep.shard_size={SHARD_SIZE}",
        f"prep.batch_size={BATCH_SIZE}",
        "prep.progress=false",
        *overrides,
    ])


class CountingForward:
    """Stands in for completion_logps in dpo_zoo.cache.prep: counts calls, optionally fails on call N."""

    def __init__(self, monkeypatch, fail_on: int = 0):
        self.calls = 0
        self.fail_on = fail_on
        self.real = prep_module.completion_logps
        monkeypatch.setattr(prep_module, "completion_logps", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("injected failure")
        return self.real(*args, **kwargs)


def shard_hashes(path: Path):
    return [s["sha256"] for s in read_manifest(path)["shards"]]


def fresh_token_logps(model, input_ids, start):
    """log π(y_j | x, y_<j) for the completion tokens, straight from one unpadded forward."""
    ids = torch.tensor([input_ids])
    with torch.inference_mode():
        logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    targets = ids[0, start:]
    return logps[start - 1 : len(input_ids) - 1].gather(-1, targets[:, None])[:, 0].numpy()


# ---------------------------------------------------------------- values and layout


@pytest.mark.float_sensitive
def test_cached_values_equal_a_fresh_forward(workdir):
    """Prep's padded, length-sorted batches against one unpadded forward per sequence: another batch
    shape, so the values agree to float32 rounding only. A token log-prob of the tiny model is a few
    nats (ulp ≈ 5e-7), so 1e-5 is ≈ 20 ulps; a sum of at most ~40 of them gets 1e-4."""
    paths = run_prep(make_cfg("data.heldout_fraction=0.25"))
    model = load_model(workdir / "model", "float32")
    total = 0
    for split in ("train", "heldout"):
        data = PreparedSet.open(paths[split])
        assert data.provides == {Need.SEQUENCE_LOGPS, Need.TOKEN_LOGPS, Need.TIES, Need.WEIGHTS}
        for row in data.rows(range(len(data))):
            for side in ("chosen", "rejected"):
                ids, start = row[f"{side}_input_ids"], row[f"{side}_completion_start"]
                expected = fresh_token_logps(model, ids, start)
                np.testing.assert_allclose(row[f"ref_{side}_token_logps"], expected, rtol=0, atol=1e-5)
                assert row[f"ref_{side}_logps"] == pytest.approx(expected.sum(), abs=1e-4)
        total += len(data)
    assert total == N_PAIRS
    assert (workdir / "out" / "drops.json").is_file()
    resolved = load_config([workdir / "out" / "config.yaml"])
    assert resolved.prep.shard_size == SHARD_SIZE and resolved.data.train_path == "data.jsonl"


@pytest.mark.float_sensitive
def test_topk_is_the_models_top_k(workdir):
    """The cached top-k against a fresh unpadded forward. Two log-probs within rounding of each other
    may come out in either order under another batch shape, so the ids are not compared position by
    position: each cached id must have, in the fresh forward, the cached log-prob, and the cached
    values must be the fresh top-k values (both to 1e-5, ≈ 20 float32 ulps of a few nats)."""
    paths = run_prep(make_cfg("prep.topk=3"))
    data = PreparedSet.open(paths["train"])
    assert Need.VOCAB_LOGPS in data.provides
    model = load_model(workdir / "model", "float32")
    row = data.row(5)
    ids, start = row["chosen_input_ids"], row["chosen_completion_start"]
    with torch.inference_mode():
        logps = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)[start - 1 : len(ids) - 1]
    top = logps.topk(3, dim=-1)
    cached_ids = torch.tensor(np.array(row[S.REF_CHOSEN_TOPK_IDS]), dtype=torch.long)
    cached_values = np.array(row[S.REF_CHOSEN_TOPK_LOGPS])
    np.testing.assert_allclose(logps.gather(-1, cached_ids).numpy(), cached_values, atol=1e-5)
    np.testing.assert_allclose(cached_values, top.values.numpy(), atol=1e-5)
    assert all(len(set(ids)) == 3 for ids in cached_ids.tolist())  # three distinct entries per position
    rest = np.log1p(-np.exp(top.values.double().numpy()).sum(-1))
    np.testing.assert_allclose(row[S.REF_CHOSEN_REST_LOGMASS], rest, atol=1e-5)


def test_batches_are_pairs_longest_first_and_cover_every_sequence(workdir):
    cfg = make_cfg()
    context = _load_context(cfg, Processes(single=True))
    rows = prep_module._tokenize(cfg, context)["train"]
    batches = plan_batches(rows, 3, pad_id=0)
    members = [m for b in batches for m in b.members]
    assert sorted(members) == sorted((i, side) for i in range(len(rows)) for side in ("chosen", "rejected"))
    totals = []
    for b in batches:
        n = len(b.members) // 2
        assert n <= 3 and b.members == [(i, "chosen") for i, _ in b.members[:n]] + [(i, "rejected") for i, _ in b.members[:n]]
        totals += [len(rows[i].chosen_input_ids) + len(rows[i].rejected_input_ids) for i, _ in b.members[:n]]
    assert totals == sorted(totals, reverse=True)  # longest pairs first: a batch too big fails at once


# ---------------------------------------------------------------- hits and misses


def test_second_run_is_a_hit_that_computes_nothing(workdir, capsys, monkeypatch):
    paths = run_prep(make_cfg())
    before = shard_hashes(paths["train"])
    capsys.readouterr()
    counter = CountingForward(monkeypatch)
    started = time.time()
    run_prep(make_cfg("train.max_steps=7"))  # a setting prep does not depend on: still a hit
    assert time.time() - started < 10
    out = capsys.readouterr().out
    assert f"cache hit: {paths['train']}" in out and f"cache hit: {paths['heldout']}" in out
    assert counter.calls == 0 and shard_hashes(paths["train"]) == before


def _variant(workdir, name):
    """A config differing from make_cfg() in one key field, and the field(s) the miss must name."""
    if name == "model_weights":
        from tiny import make_tiny_model_dir

        make_tiny_model_dir(workdir / "model2", seed=1)
        return make_cfg("model.name_or_path=model2"), ["model_weights model.safetensors"]
    if name == "tokenizer":
        # Same weights, a tokenizer that splits text differently (one added token): ids change.
        from transformers import AutoTokenizer

        shutil.copytree(workdir / "model", workdir / "model3")
        tokenizer = AutoTokenizer.from_pretrained(workdir / "model3")
        tokenizer.add_tokens(["Assistant"])
        tokenizer.save_pretrained(workdir / "model3")
        return make_cfg("model.name_or_path=model3"), ["tokenizer "]
    if name == "data":
        write_data(workdir / "data2.jsonl", change_row=3)
        return make_cfg("data.train_path=data2.jsonl"), ["data "]
    if name == "chat_template":
        template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        return make_cfg(f"prep.chat_template={json.dumps(template)}"), ["chat_template ", "chat_template_setting auto → custom"]
    overrides = {
        "max_length": ("prep.max_length=300", "max_length 512 → 300"),
        "max_prompt_length": ("prep.max_prompt_length=12", "max_prompt_length 256 → 12"),
        "truncation_mode": ("prep.truncation_mode=keep_start", "truncation_mode keep_end → keep_start"),
        "dtype": ("prep.dtype=bfloat16", "dtype float32 → bfloat16"),
        "topk": ("prep.topk=2", "topk 0 → 2"),
        "preprocessor_options": ("data.options={train_split: train}", "preprocessor_options train_split (none) → train"),
    }
    override, expected = overrides[name]
    return make_cfg(override), [expected]


@pytest.mark.parametrize("field", ["model_weights", "tokenizer", "data", "chat_template", "max_length",
                                   "max_prompt_length", "truncation_mode", "dtype", "topk", "preprocessor_options"])
def test_changing_a_key_field_is_a_miss_that_names_it(workdir, field):
    paths = run_prep(make_cfg())
    cfg, expected = _variant(workdir, field)
    key = _load_context(cfg, Processes(single=True)).keys["train"]
    state = lookup(paths["train"], key)
    assert state.status == "miss"
    message = state.message(paths["train"])
    assert message.startswith("cache miss: ")
    for text in expected:
        assert text in message, message
    assert len(state.reasons) == len(expected), state.reasons  # only the changed field(s)


def test_a_hub_data_sets_moved_commit_is_a_miss_that_names_it(workdir, monkeypatch):
    """What identifies a Hub data set beyond its rows (LoadedSplits.origin: the resolved commit) is part
    of the key: a `main` that moved is a miss naming data_source, even when the rows are the same."""
    import data_prep

    read, commit = data_prep.load_splits, {"now": "a" * 40}

    def from_the_hub(data_cfg, *args, **kwargs):
        splits = read(data_cfg, *args, **kwargs)
        splits.origin = {"hub": "org/prefs", "revision": "main", "commit": commit["now"], "split": "train"}
        return splits

    monkeypatch.setattr(data_prep, "load_splits", from_the_hub)
    paths = run_prep(make_cfg())
    manifest = read_manifest(paths["train"])
    assert manifest["key"]["data_source"]["commit"] == "a" * 40
    assert manifest["extra"]["data_source"]["hub"] == "org/prefs"
    assert lookup(paths["train"], _load_context(make_cfg(), Processes(single=True)).keys["train"]).status == "hit"
    commit["now"] = "b" * 40
    state = lookup(paths["train"], _load_context(make_cfg(), Processes(single=True)).keys["train"])
    assert state.status == "miss" and len(state.reasons) == 1
    assert state.reasons[0].startswith("data_source commit "), state.reasons


def test_prep_prints_the_data_warnings(workdir, capsys):
    """An exact duplicate row is kept but reported: prep says so (on a cache hit too)."""
    row = {"prompt": [{"role": "user", "content": "How are you?"}], "chosen": [{"role": "assistant", "content": "Fine."}],
           "rejected": [{"role": "assistant", "content": "Go away."}]}  # no id: each row gets data:<row>
    (workdir / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [row, row, row | {"chosen": [
        {"role": "assistant", "content": "Well, thanks."}]}]))
    capsys.readouterr()
    _load_context(make_cfg(), Processes(single=True))
    assert ("warning: data.jsonl: 1 rows are exact copies of earlier rows (kept; set data.drop_duplicate_rows=true "
            "to drop them)") in capsys.readouterr().out


def test_a_data_set_folder_is_read_without_progress_bars_when_progress_is_off(workdir, capsys, monkeypatch):
    """data.hub on a folder laid out like a Hub repo: datasets prepares it; prep.progress=false keeps its
    progress bars off (CI logs), and they are back on afterwards."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", workdir / "hf_datasets")
    (workdir / "prefs" / "data").mkdir(parents=True)
    rows = [json.loads(line) for line in (workdir / "data.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), workdir / "prefs" / "data" / "train-00000-of-00001.parquet")
    capsys.readouterr()
    context = _load_context(make_cfg("data.train_path=null", "data.hub.path=prefs"), Processes(single=True))
    assert len(context.splits.train) == N_PAIRS and context.splits.train[0].source_file == "prefs:train"
    assert "Generating" not in capsys.readouterr().err
    assert datasets.is_progress_bar_enabled()


def _add_rows_without_prompt_tokens(path: Path, n: int) -> None:
    """Rows that pass loading but are dropped at tokenization: an empty string prompt has no tokens."""
    with open(path, "a") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"empty{i}", "prompt": "", "chosen": " yes", "rejected": " no"}) + "\n")


def test_rows_dropped_at_tokenization_under_skip_are_reported_again_under_error(workdir):
    """A cache made with on_bad_row=skip is not a hit for on_bad_row=error, whose run must stop at the
    row skip dropped (the row is never hidden behind a cache hit)."""
    _add_rows_without_prompt_tokens(workdir / "data.jsonl", 1)
    paths = run_prep(make_cfg("data.on_bad_row=skip"))
    assert len(PreparedSet.open(paths["train"])) == N_PAIRS
    drops = json.loads((workdir / "out" / "drops.json").read_text())
    assert "prompt has no tokens" in json.dumps(drops)
    with pytest.raises(DataError, match=r"row 16.*empty prompt: the prompt has no tokens"):
        run_prep(make_cfg("data.on_bad_row=error"))


def test_nothing_left_after_tokenization_is_an_error(workdir):
    (workdir / "data.jsonl").write_text("")
    _add_rows_without_prompt_tokens(workdir / "data.jsonl", 3)
    with pytest.raises(DataError, match="no training pairs left after tokenization"):
        run_prep(make_cfg("data.on_bad_row=skip"))


def test_a_miss_rebuilds_and_says_why(workdir, capsys):
    paths = run_prep(make_cfg())
    capsys.readouterr()
    run_prep(make_cfg("prep.max_length=40", "prep.max_prompt_length=20"))
    out = capsys.readouterr().out
    assert "cache miss: max_length 512 → 40; max_prompt_length 256 → 20" in out
    manifest = read_manifest(paths["train"])
    assert manifest["key"]["max_length"] == 40
    assert all(len(r[S.CHOSEN_INPUT_IDS]) <= 40 for r in PreparedSet.open(paths["train"]).rows(range(N_PAIRS)))


# ---------------------------------------------------------------- interruption and resume


def _batches_per_shard(cfg):
    context = _load_context(cfg, Processes(single=True))
    rows = prep_module._tokenize(cfg, context)["train"]
    return [len(plan_batches(rows[i : i + SHARD_SIZE], BATCH_SIZE, 0)) for i in range(0, len(rows), SHARD_SIZE)]


def test_injected_failure_then_rerun_recomputes_only_unfinished_shards(workdir, monkeypatch):
    reference = run_prep(make_cfg(output="uninterrupted"))["train"]
    per_shard = _batches_per_shard(make_cfg())
    fail_on = per_shard[0] + per_shard[1] + 1  # the first forward of shard 2
    CountingForward(monkeypatch, fail_on=fail_on)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_prep(make_cfg())
    train = workdir / "out" / "train"
    assert not (train / MANIFEST).exists()
    assert sorted(p.name for p in train.glob("shard-*.json")) == [sidecar_file(0), sidecar_file(1)]
    mtimes = {i: (train / shard_file(i)).stat().st_mtime_ns for i in (0, 1)}
    counter = CountingForward(monkeypatch)
    run_prep(make_cfg())
    assert counter.calls == sum(per_shard[2:])  # shards 0 and 1 were not recomputed
    assert {i: (train / shard_file(i)).stat().st_mtime_ns for i in (0, 1)} == mtimes
    assert shard_hashes(train) == shard_hashes(reference)


KILLED_PREP = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(int(sys.argv[2]))
    import dpo_zoo.cache.prep as prep
    real = prep.completion_logps
    def slow(*args, **kwargs):  # slow enough that the parent can kill it between shards
        out = real(*args, **kwargs)
        time.sleep(0.4)
        return out
    prep.completion_logps = slow
    from dpo_zoo.config import load_config
    prep.run_prep(load_config([sys.argv[1]]))
""")


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_rerun_gives_an_identical_cache(workdir, monkeypatch):
    """SIGKILL (no cleanup runs) after the first shard lands and a random extra delay, then rerun:
    finished shards are kept as they are and the result is byte-identical to an uninterrupted run."""
    torch.manual_seed(int(time.time()))
    config = workdir / "exp.yaml"
    config.write_text(textwrap.dedent(f"""
        model: {{name_or_path: model}}
        data: {{train_path: data.jsonl, heldout_fraction: 0.0}}
        prep: {{output_dir: out, shard_size: {SHARD_SIZE}, batch_size: {BATCH_SIZE}, progress: false}}
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PREP, str(config), str(torch.get_num_threads())],
                            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    train = workdir / "out" / "train"
    deadline = time.time() + 120
    while not (train / sidecar_file(0)).exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "the first shard never landed"
        time.sleep(0.05)
    time.sleep(float(torch.rand(1)) * 0.8)  # somewhere inside the next shard or two
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (train / MANIFEST).exists()
    finished = sorted(int(p.name[6:11]) for p in train.glob("shard-*.json"))
    assert finished and finished == list(range(len(finished))) and len(finished) < N_PAIRS // SHARD_SIZE
    mtimes = {i: (train / shard_file(i)).stat().st_mtime_ns for i in finished}

    per_shard = _batches_per_shard(make_cfg())
    counter = CountingForward(monkeypatch)
    run_prep(make_cfg())
    assert counter.calls == sum(n for i, n in enumerate(per_shard) if i not in finished)
    assert {i: (train / shard_file(i)).stat().st_mtime_ns for i in finished} == mtimes
    assert not list(train.glob(".*.tmp-*"))
    reference = run_prep(make_cfg(output="uninterrupted"))["train"]
    assert shard_hashes(train) == shard_hashes(reference)


def test_damaged_shard_is_refused_then_recomputed_by_prep(workdir, capsys, monkeypatch):
    paths = run_prep(make_cfg())
    before = shard_hashes(paths["train"])
    shard = paths["train"] / shard_file(2)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    from dpo_zoo.errors import CacheError

    with pytest.raises(CacheError, match="shard-00002.arrow: sha256 differs"):
        PreparedSet.open(paths["train"])
    capsys.readouterr()
    counter = CountingForward(monkeypatch)
    run_prep(make_cfg())
    assert "cache damaged: " in capsys.readouterr().out
    assert counter.calls == _batches_per_shard(make_cfg())[2]
    assert shard_hashes(paths["train"]) == before


# ---------------------------------------------------------------- user-supplied reference values


def _export_reference(path: Path, out: Path, sums_only=False, drop_id=None, cut_id=None):
    data = PreparedSet.open(path)
    with open(out, "w") as f:
        for row in data.rows(range(len(data))):
            if row["id"] == drop_id:
                continue
            if sums_only:
                record = {"id": row["id"], "ref_chosen_logps": row["ref_chosen_logps"],
                          "ref_rejected_logps": row["ref_rejected_logps"]}
            else:
                record = {"id": row["id"], "ref_chosen_token_logps": row["ref_chosen_token_logps"],
                          "ref_rejected_token_logps": row["ref_rejected_token_logps"]}
                if row["id"] == cut_id:
                    record["ref_chosen_token_logps"] = record["ref_chosen_token_logps"][:-1]
            f.write(json.dumps(record) + "\n")
    return out


def test_user_supplied_reference_logps(workdir, monkeypatch):
    model_set = run_prep(make_cfg(output="from_model"))["train"]
    tokens_file = _export_reference(model_set, workdir / "ref_tokens.jsonl")
    counter = CountingForward(monkeypatch)
    paths = run_prep(make_cfg(f"prep.reference_logps_path={tokens_file}", output="from_file"))
    assert counter.calls == 0
    from_file, from_model = PreparedSet.open(paths["train"]), PreparedSet.open(model_set)
    assert from_file.key["reference_source"] == "file" and from_file.key["model_weights"] is None
    assert Need.TOKEN_LOGPS in from_file.provides
    for a, b in zip(from_file.rows(range(N_PAIRS)), from_model.rows(range(N_PAIRS))):
        assert a["ref_chosen_token_logps"] == b["ref_chosen_token_logps"]
        assert a["ref_rejected_logps"] == pytest.approx(b["ref_rejected_logps"], abs=1e-9)

    sums_file = _export_reference(model_set, workdir / "ref_sums.jsonl", sums_only=True)
    sums = PreparedSet.open(run_prep(make_cfg(f"prep.reference_logps_path={sums_file}", output="sums"))["train"])
    assert Need.TOKEN_LOGPS not in sums.provides and Need.SEQUENCE_LOGPS in sums.provides
    assert sums.row(3)["ref_chosen_logps"] == from_model.row(3)["ref_chosen_logps"]


def test_bad_user_reference_files_are_clear_errors(workdir, capsys):
    model_set = run_prep(make_cfg(output="from_model"))["train"]
    missing = _export_reference(model_set, workdir / "missing.jsonl", drop_id="q7")
    with pytest.raises(DataError, match=r"missing.jsonl: no reference values for 1 of the \d+ pairs of the train split \(ids 'q7'\)"):
        run_prep(make_cfg(f"prep.reference_logps_path={missing}", output="bad1"))
    cut = _export_reference(model_set, workdir / "cut.jsonl", cut_id="q2")
    assert cli_main(["prep", "model.name_or_path=model", "data.train_path=data.jsonl", "data.heldout_fraction=0.0",
                     "prep.output_dir=bad2", "prep.progress=false", f"prep.reference_logps_path={cut}"]) == 2
    err = capsys.readouterr().err
    assert "cut.jsonl: row 3 (id 'q2'): field `ref_chosen_token_logps` has" in err and "values but the chosen completion has" in err
    with pytest.raises(Exception, match="prep.topk = 2 needs the reference model"):
        run_prep(make_cfg(f"prep.reference_logps_path={cut}", "prep.topk=2", output="bad3"))


# ---------------------------------------------------------------- --verify and the CLI


def test_cli_prep_and_verify(workdir, capsys):
    args = ["model.name_or_path=model", "data.train_path=data.jsonl", "data.heldout_fraction=0.25",
            "prep.output_dir=cli", "prep.progress=false", f"prep.shard_size={SHARD_SIZE}"]
    assert cli_main(["prep", *args]) == 0
    capsys.readouterr()
    assert cli_main(["prep", *args, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "[verify] train: ok: " in out and "key matches the config" in out and "all checks passed" in out
    assert cli_main(["prep", *args, "prep.max_length=300", "--verify"]) == 1
    assert "key differs from the config: max_length 512 → 300" in capsys.readouterr().out
    shard = workdir / "cli" / "heldout" / shard_file(0)
    shard.write_bytes(shard.read_bytes()[:-10])
    assert cli_main(["prep", *args, "--verify"]) == 1
    assert "heldout: FAILED: " in capsys.readouterr().out


# ---------------------------------------------------------------- several processes


@pytest.mark.slow
def test_two_processes_split_the_shards(workdir):
    """torchrun with 2 CPU processes: rank r writes shards r, r+2, ...; the result is byte-identical to
    one process running with the same number of threads."""
    config = workdir / "exp.yaml"
    config.write_text(textwrap.dedent(f"""
        model: {{name_or_path: model}}
        data: {{train_path: data.jsonl, heldout_fraction: 0.25}}
        prep: {{output_dir: dist, shard_size: {SHARD_SIZE}, batch_size: {BATCH_SIZE}, progress: false}}
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "dpo_zoo.cli", "prep", str(config)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    train = workdir / "dist" / "train"
    writers = {i: json.loads((train / sidecar_file(i)).read_text())["written_by"] for i in range(len(list(train.glob("shard-*.json"))))}
    assert writers and all(w == {"rank": i % 2, "world_size": 2} for i, w in writers.items())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same threads per process as under torchrun
    try:
        single = run_prep(make_cfg("data.heldout_fraction=0.25", output="single"))
    finally:
        torch.set_num_threads(threads)
    for split in ("train", "heldout"):
        a, b = PreparedSet.open(workdir / "dist" / split), PreparedSet.open(single[split])
        assert a.ids == b.ids and a.manifest["counts"] == b.manifest["counts"]
        assert shard_hashes(workdir / "dist" / split) == shard_hashes(single[split])  # byte-identical


# ---------------------------------------------------------------- the shipped experiment configs


@pytest.mark.parametrize("name", ["hh_smollm2", "vader_smollm2"])
def test_experiment_configs_load(name, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    cfg = load_config([REPO_ROOT / "configs" / "experiments" / f"{name}.yaml"])
    assert cfg.model.name_or_path == "smollm2-135m-instruct"
    assert cfg.prep.output_dir == f"prepared/{name}"
    if name == "hh_smollm2":
        assert cfg.data.preprocessor == "hh_rlhf" and cfg.data.on_bad_row == "skip"
        assert Path(cfg.data.train_path).is_file()  # relative to the repository root, where it is run from
    else:
        assert cfg.data.preprocessor == "vader"


@pytest.mark.slow
@pytest.mark.float_sensitive
def test_real_model_on_a_few_hh_pairs(tmp_path, monkeypatch):
    """SmolLM2-135M on a dozen real HH-RLHF pairs via the shipped config: values equal a fresh forward."""
    monkeypatch.chdir(REPO_ROOT)
    cfg = load_config([REPO_ROOT / "configs" / "experiments" / "hh_smollm2.yaml"], [
        "data.max_train_pairs=12", "data.max_heldout_pairs=2", f"prep.output_dir={tmp_path / 'hh'}",
        "prep.max_length=192", "prep.max_prompt_length=128", "prep.progress=false",
    ])
    paths = run_prep(cfg)
    data = PreparedSet.open(paths["train"])
    assert len(data) == 12
    model = load_model(read_manifest(paths["train"])["extra"]["model_path"], "float32")
    for row in data.rows([0, 5, 11]):
        for side in ("chosen", "rejected"):
            expected = fresh_token_logps(model, row[f"{side}_input_ids"], row[f"{side}_completion_start"])
            np.testing.assert_allclose(row[f"ref_{side}_token_logps"], expected, rtol=0, atol=1e-4)
            assert math.isfinite(row[f"ref_{side}_logps"])
