"""Hub models and data sets through the real huggingface_hub and datasets clients, against a loopback Hub
(tests/hub_server.py).

What a user relies on: `model.name_or_path=org/name` downloads only safetensors, config and tokenizer
files; a second run works from the Hugging Face cache with HF_HUB_OFFLINE=1 and no server; the commit a
revision resolved to is in the cache key and run.json, so a `main` that moved is a named cache miss; a
repo that does not exist, a revision that does not exist, a repo with only pickled weights, and
offline-and-not-cached are each one clear error naming the repo and the revision. The same for a data
set (`data.hub`, read by `datasets`): downloaded once, read offline from its cache, its commit in the
cache key (`data_source`), a missing one named.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from hub_server import LoopbackHub, set_offline, use_hub
from tiny import tiny_overrides, write_hh_slice

from dpo_zoo.config import load_config
from dpo_zoo.errors import DataError, ModelError
from dpo_zoo.model.loading import HUB_MODEL_FILES, resolve_model, weights_fingerprint

REPO = Path(__file__).resolve().parents[1]
TINY = "org/tiny"
# What a Hub repo of the tiny model holds beyond what dpo_zoo may fetch: a pickled copy of the weights,
# another format in a sub-folder, a model card.
EXTRA_FILES = {"pytorch_model.bin": b"\x80\x04 not to be unpickled", "onnx/model.safetensors": b"other format",
               "README.md": b"# tiny\n"}


def model_cfg(name=TINY, revision="main"):
    return types.SimpleNamespace(name_or_path=name, revision=revision, cache_dir=None, trust_remote_code=False)


@pytest.fixture(scope="session")
def tiny_repo_files(tiny_model_dir):
    """The tiny model folder as the files of a Hub repo, plus files dpo_zoo must not fetch."""
    files = {p.name: p.read_bytes() for p in Path(tiny_model_dir).iterdir() if p.is_file()}
    assert "model.safetensors" in files and "tokenizer.json" in files
    return {**files, **EXTRA_FILES}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running loopback Hub with the clients pointed at it, the Hugging Face cache in tmp_path/hf."""
    with LoopbackHub() as server:
        use_hub(monkeypatch, server.url, tmp_path / "hf")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server


def go_offline(hub, monkeypatch):
    """Stop the server and set HF_HUB_OFFLINE=1: any request would now fail."""
    hub.stop()
    set_offline(monkeypatch, True)


# ---------------------------------------------------------------- resolving a Hub name


def test_first_download_fetches_only_safetensors_config_and_tokenizer(hub, tiny_repo_files, tiny_model_dir, tmp_path):
    commit = hub.push(TINY, tiny_repo_files)
    resolved = resolve_model(model_cfg())
    assert resolved.commit == commit and resolved.revision == "main" and resolved.name_or_path == TINY
    # the Hugging Face cache layout under HF_HOME, named by the commit
    assert resolved.path == tmp_path / "hf" / "hub" / "models--org--tiny" / "snapshots" / commit
    fetched = sorted(path.rsplit("/", 1)[-1] for path in hub.fetched())
    expected = sorted(name for name in tiny_repo_files if name not in EXTRA_FILES)
    assert fetched == expected
    assert not hub.fetched(".bin") and not any("onnx" in p for p in hub.fetched())
    # the same weights as the folder they were pushed from
    assert weights_fingerprint(resolved.path) == weights_fingerprint(tiny_model_dir)
    assert resolved.record() == {"name_or_path": TINY, "revision": "main", "commit": commit, "path": str(resolved.path)}


def test_hf_token_goes_with_every_request(hub, tiny_repo_files, monkeypatch):
    hub.push(TINY, tiny_repo_files)
    monkeypatch.setenv("HF_TOKEN", "hf_loopbacktoken")
    resolve_model(model_cfg())
    model_requests = [r for r in hub.requests if TINY in r.path]
    assert model_requests and {r.authorization for r in model_requests} == {"Bearer hf_loopbacktoken"}


def test_a_revision_can_be_a_branch_or_a_commit(hub, tiny_repo_files):
    first = hub.push(TINY, tiny_repo_files)
    hub.push(TINY, {**tiny_repo_files, "README.md": b"# moved\n"}, branch="dev")
    assert resolve_model(model_cfg(revision="dev")).commit != first
    assert resolve_model(model_cfg(revision=first)).commit == first


def test_other_ranks_take_the_commit_rank_0_resolved(hub, tiny_repo_files):
    """What prep and train pass to the other processes of a launch: rank 0's commit, even after main moved."""
    first = hub.push(TINY, tiny_repo_files)
    hub.push(TINY, {**tiny_repo_files, "README.md": b"# moved\n"})
    pinned = resolve_model(model_cfg(), commit=first)
    assert pinned.commit == first and pinned.revision == "main"
    assert resolve_model(model_cfg()).commit != first


def test_second_run_from_the_cache_offline_after_the_server_stopped(hub, tiny_repo_files, monkeypatch):
    from dpo_zoo.model.loading import load_model, load_tokenizer

    hub.push(TINY, tiny_repo_files)
    online = resolve_model(model_cfg())
    go_offline(hub, monkeypatch)
    offline = resolve_model(model_cfg())
    assert offline == online
    model, tokenizer = load_model(offline.path), load_tokenizer(offline.path)
    assert model.config.vocab_size == len(tokenizer)


def test_offline_and_not_cached_names_repo_revision_and_what_to_do(hub, monkeypatch):
    go_offline(hub, monkeypatch)
    with pytest.raises(ModelError) as info:
        resolve_model(model_cfg("org/never-fetched", "v2"))
    message = str(info.value)
    assert "'org/never-fetched' at revision 'v2'" in message and "HF_HUB_OFFLINE" in message
    assert "run once online" in message and "HF_HOME" in message


def test_server_unreachable_and_not_cached_is_a_clear_error(hub, monkeypatch):
    hub.stop()  # online mode, but nobody answers
    with pytest.raises(ModelError, match=r"'org/tiny' at revision 'main'.*could not be reached.*HF_ENDPOINT"):
        resolve_model(model_cfg())


def test_a_repo_that_does_not_exist(hub):
    with pytest.raises(ModelError) as info:
        resolve_model(model_cfg("org/no-such-model"))
    message = str(info.value)
    assert "'org/no-such-model' at revision 'main'" in message and "no such model repo" in message
    assert hub.url in message and "HF_TOKEN" in message


def test_a_revision_that_does_not_exist(hub, tiny_repo_files):
    hub.push(TINY, tiny_repo_files)
    with pytest.raises(ModelError, match=r"'org/tiny' at revision 'v9'.*has no revision 'v9'.*model.revision"):
        resolve_model(model_cfg(revision="v9"))


def test_a_repo_with_only_pickled_weights_is_refused_and_nothing_pickled_is_fetched(hub, tiny_repo_files):
    pickled_only = {name: content for name, content in tiny_repo_files.items() if not name.endswith(".safetensors")}
    commit = hub.push("org/pickled", pickled_only)
    with pytest.raises(ModelError) as info:
        resolve_model(model_cfg("org/pickled"))
    message = str(info.value)
    assert f"'org/pickled' at revision 'main' (commit {commit[:12]})" in message
    assert "only pickled weights (pytorch_model.bin)" in message and "safetensors" in message
    assert not hub.fetched(".bin")


def test_revision_is_for_hub_names_only(tiny_model_dir):
    with pytest.raises(ModelError, match="model.revision 'v2' applies to Hugging Face Hub names only"):
        resolve_model(model_cfg(str(tiny_model_dir), "v2"))


def test_what_is_fetched_is_what_transformers_loads():
    """The patterns are anchored at the file name: nothing in a sub-folder but chat templates, no pickles."""
    from huggingface_hub.utils import filter_repo_objects

    repo = ["model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "config.json",
            "tokenizer.json", "pytorch_model.bin", "model.pt", "original/consolidated.00.pth",
            "onnx/model.safetensors", "sub/model.safetensors", "README.md", "additional_chat_templates/tool.jinja"]
    assert sorted(filter_repo_objects(repo, allow_patterns=list(HUB_MODEL_FILES))) == [
        "additional_chat_templates/tool.jinja", "config.json", "model-00001-of-00002.safetensors",
        "model.safetensors", "model.safetensors.index.json", "tokenizer.json"]


# ---------------------------------------------------------------- prep, train, compare on a Hub name


def prep_overrides(tmp_path, **extra):
    data = write_hh_slice(tmp_path / "hh.jsonl", 12)
    return tiny_overrides(TINY, data, tmp_path / "prepared", **{"prep.topk": 0, **extra})


def run_prep_quiet(overrides, capsys):
    from dpo_zoo.cache.prep import run_prep

    capsys.readouterr()
    run_prep(load_config([], overrides))
    return capsys.readouterr().out


def test_prep_keys_the_commit_and_a_moved_main_is_a_named_miss(hub, tiny_repo_files, tmp_path, capsys, monkeypatch):
    first = hub.push(TINY, tiny_repo_files)
    overrides = prep_overrides(tmp_path)
    out = run_prep_quiet(overrides, capsys)
    assert "cache empty" in out
    manifest = json.loads((tmp_path / "prepared" / "train" / "manifest.json").read_text())
    assert manifest["key"]["model_revision"] == first
    assert manifest["extra"]["model"] == TINY and manifest["extra"]["model_commit"] == first
    assert manifest["extra"]["model_revision"] == "main"

    # main moves to a new commit (same files): the next prep names the change and rebuilds
    moved = hub.push(TINY, tiny_repo_files)
    assert moved != first
    out = run_prep_quiet(overrides, capsys)
    assert f"cache miss: model_revision {first[:8]}… → {moved[:8]}…" in out
    # only the revision differs: the weights and tokenizer are byte-identical
    assert out.count("cache miss: model_revision") == 2 and "model_weights" not in out

    # and a third run, offline with the server gone, is a hit from the Hugging Face cache
    go_offline(hub, monkeypatch)
    out = run_prep_quiet(overrides, capsys)
    assert out.count("cache hit") == 2 and "nothing to do" in out


def test_train_refuses_a_cache_of_the_old_main_and_names_both_commits(hub, tiny_repo_files, tmp_path, capsys):
    """main moved to other weights after prep: the cached reference no longer matches the policy's
    starting weights, and the refusal says that the revision moved."""
    from tiny import make_tiny_model_dir

    from dpo_zoo.errors import TrainingError
    from dpo_zoo.train.trainer import train

    first = hub.push(TINY, tiny_repo_files)
    overrides = prep_overrides(tmp_path)
    run_prep_quiet(overrides, capsys)
    retrained = make_tiny_model_dir(tmp_path / "retrained", seed=1)
    moved = hub.push(TINY, {**tiny_repo_files, "model.safetensors": (retrained / "model.safetensors").read_bytes()})
    with pytest.raises(TrainingError) as info:
        train(load_config([], overrides + [f"train.output_dir={tmp_path / 'run'}", "train.reference=cache"]))
    message = str(info.value)
    assert "computed by another model" in message
    assert f"prepared at commit {first[:12]}; model.revision 'main' of {TINY} now resolves to {moved[:12]}" in message


def test_compare_takes_a_hub_name_and_finds_it_offline(hub, tiny_repo_files, tmp_path, capsys, monkeypatch):
    """`dpo-zoo compare org/name`: the Hub model against the cache made from it, with the server gone.
    The policy is the reference, so every margin is 0 and the accuracy is exactly 1/2 (ties score 1/2)."""
    from dpo_zoo.compare.runner import run_compare

    hub.push(TINY, tiny_repo_files)
    overrides = prep_overrides(tmp_path)
    run_prep_quiet(overrides, capsys)
    go_offline(hub, monkeypatch)
    summary = run_compare(load_config([], overrides + ["compare.kl_samples=0"]), runs=[TINY],
                          data=str(tmp_path / "prepared" / "heldout"), losses="dpo", output_dir=str(tmp_path / "report"))
    (entry,) = summary["entries"]
    assert entry["subject"] == TINY and entry["metrics"]["rewards/accuracies"] == 0.5


@pytest.mark.slow
def test_lora_on_a_hub_base_records_it_and_compare_finds_it_offline(hub, tiny_repo_files, tmp_path, capsys,
                                                                    monkeypatch):
    """Train LoRA on a Hub base, then compare with the server gone: from run.json, from a run.json whose
    snapshot folder is not on this machine (fetched again by commit, here from the cache), and from the
    adapter folder alone (adapter_config.json names the repo and the commit)."""
    from dpo_zoo.compare.runner import run_compare
    from dpo_zoo.train.trainer import train

    commit = hub.push(TINY, tiny_repo_files)
    overrides = prep_overrides(tmp_path)
    run_prep_quiet(overrides, capsys)
    run_dir = tmp_path / "run"
    train(load_config([], overrides + [f"train.output_dir={run_dir}", "train.max_steps=2", "train.lora.enabled=true",
                                       "train.eval_every=0"]))
    record = json.loads((run_dir / "run.json").read_text())
    assert record["base_model_source"] == {"name_or_path": TINY, "revision": "main", "commit": commit,
                                           "path": record["base_model"]}
    adapter = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == TINY and adapter["revision"] == commit

    go_offline(hub, monkeypatch)
    heldout = str(tmp_path / "prepared" / "heldout")
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run_dir, elsewhere)
    (elsewhere / "run.json").write_text(json.dumps({**record, "base_model": str(tmp_path / "not-here")}))
    adapter_only = tmp_path / "adapter-only"
    shutil.copytree(run_dir / "final", adapter_only)
    summary = run_compare(load_config([], overrides + ["loss=dpo"]), runs=[str(run_dir), str(elsewhere), str(adapter_only)],
                          data=heldout, losses="dpo", output_dir=str(tmp_path / "report"))
    accuracies = [entry["metrics"]["rewards/accuracies"] for entry in summary["entries"]]
    assert len(accuracies) == 3 and accuracies[0] == accuracies[1] == accuracies[2]


# ---------------------------------------------------------------- as a user runs it: environment variables


@pytest.mark.slow
def test_cli_prep_with_hf_environment_then_offline_after_the_server_stopped(tiny_repo_files, tmp_path):
    """`dpo-zoo prep` in a fresh process that knows the Hub only from HF_ENDPOINT / HF_HOME, then again
    with HF_HUB_OFFLINE=1 once the server is gone: the second run is a cache hit."""
    overrides = prep_overrides(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
           "TRANSFORMERS_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "DPO_ZOO_CACHE": str(tmp_path / "dz")}
    env.pop("HF_HUB_CACHE", None)
    command = [sys.executable, "-m", "dpo_zoo.cli", "prep", *overrides]
    with LoopbackHub() as server:
        commit = server.push(TINY, tiny_repo_files)
        env["HF_ENDPOINT"] = server.url  # the same endpoint, gone, for the offline runs below
        first = subprocess.run(command, env=env, capture_output=True, text=True,
                               timeout=600)
        assert first.returncode == 0, first.stderr[-3000:]
        assert server.fetched("model.safetensors")
    assert (tmp_path / "hf" / "hub" / "models--org--tiny" / "snapshots" / commit / "model.safetensors").exists()
    second = subprocess.run(command, env={**env, "HF_HUB_OFFLINE": "1"},
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("cache hit") == 2
    missing = subprocess.run([sys.executable, "-m", "dpo_zoo.cli", "prep", *overrides, "model.revision=v2"],
                             env={**env, "HF_HUB_OFFLINE": "1"},
                             capture_output=True, text=True, timeout=600)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "'org/tiny' at revision 'v2' is not in the Hugging Face cache" in missing.stderr + missing.stdout


# ---------------------------------------------------------------- Hub data sets (data.hub), through the same server


def parquet_bytes(rows):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def hh_rows(tmp_path_factory):
    """30 real HH-RLHF pairs (chosen / rejected dialogues), as rows."""
    path = write_hh_slice(tmp_path_factory.mktemp("hh") / "hh.jsonl", 30)
    return [json.loads(line) for line in path.read_text().splitlines()]


def hh_dataset_files(rows):
    """A data-set repo laid out as the Hub's parquet conversions are: data/<split>-00000-of-00001.parquet."""
    return {"data/train-00000-of-00001.parquet": parquet_bytes(rows[:24]),
            "data/test-00000-of-00001.parquet": parquet_bytes(rows[24:]),
            "README.md": b"---\nlicense: mit\n---\n# a slice of Anthropic/hh-rlhf\n"}


def hub_data(path="org/hh", **hub):
    return {"preprocessor": "hh_rlhf", "hub": {"path": path, **hub}, "heldout_fraction": 0.0}


def texts(pairs):
    return [(p.prompt, p.chosen, p.rejected) for p in pairs]


def test_hub_data_set_first_download_then_offline_after_the_server_stopped(hub, hh_rows, tmp_path, monkeypatch):
    from data_prep import load_splits

    commit = hub.push("org/hh", hh_dataset_files(hh_rows), repo_type="dataset")
    monkeypatch.setenv("HF_TOKEN", "hf_loopbacktoken")
    online = load_splits(hub_data(split="train", heldout_split="test"))
    assert online.origin["commit"] == commit and online.origin["hub"] == "org/hh"
    assert len(online.train) == 24 and len(online.heldout) == 6
    # the same pairs as the same rows read from a local file
    local = tmp_path / "hh.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in hh_rows[:24]))
    assert texts(online.train) == texts(load_splits({"preprocessor": "hh_rlhf", "train_path": str(local),
                                                     "heldout_fraction": 0.0}).train)
    # parquet files and the card are fetched, with the token; nothing else
    assert sorted(p.rsplit("/", 1)[-1] for p in hub.fetched()) == [
        "README.md", "test-00000-of-00001.parquet", "train-00000-of-00001.parquet"]
    assert {r.authorization for r in hub.requests if "org/hh" in r.path} == {"Bearer hf_loopbacktoken"}

    go_offline(hub, monkeypatch)
    offline = load_splits(hub_data(split="train", heldout_split="test"))
    assert offline.origin == online.origin and texts(offline.train) == texts(online.train)


def test_a_hub_data_set_that_does_not_exist(hub):
    from data_prep import load_splits

    with pytest.raises(DataError) as info:
        load_splits(hub_data("org/no-such-data"))
    message = str(info.value)
    assert "org/no-such-data" in message and "revision=main" in message and "not found" in message
    assert "HF_TOKEN" in message


def test_a_hub_data_set_offline_and_not_cached(hub, monkeypatch):
    from data_prep import load_splits

    go_offline(hub, monkeypatch)
    with pytest.raises(DataError) as info:
        load_splits(hub_data("org/never-fetched"))
    message = str(info.value)
    assert "org/never-fetched" in message and "HF_HUB_OFFLINE" in message


def test_prep_on_a_hub_model_and_data_set_names_each_moved_main(hub, tiny_repo_files, hh_rows, tmp_path, capsys,
                                                                 monkeypatch):
    """Both a model and a data set from the Hub: each one's `main` moving is named on its own; offline with
    the server gone, the same prep is a hit from the caches."""
    model_commit = hub.push(TINY, tiny_repo_files)
    data_commit = hub.push("org/hh", hh_dataset_files(hh_rows), repo_type="dataset")
    overrides = tiny_overrides(TINY, "null", tmp_path / "prepared", **{
        "prep.topk": 0, "data.hub.path": "org/hh", "data.hub.split": "train", "data.hub.heldout_split": "test"})
    out = run_prep_quiet(overrides, capsys)
    assert out.count("cache empty") == 2
    key = json.loads((tmp_path / "prepared" / "heldout" / "manifest.json").read_text())["key"]
    assert key["model_revision"] == model_commit and key["data_source"]["commit"] == data_commit

    moved_data = hub.push("org/hh", hh_dataset_files(hh_rows), repo_type="dataset")
    out = run_prep_quiet(overrides, capsys)
    assert f"cache miss: data_source commit {data_commit[:8]}… → {moved_data[:8]}…" in out
    assert "model_revision" not in out

    moved_model = hub.push(TINY, tiny_repo_files)
    out = run_prep_quiet(overrides, capsys)
    assert f"cache miss: model_revision {model_commit[:8]}… → {moved_model[:8]}…" in out
    assert "data_source" not in out

    go_offline(hub, monkeypatch)
    out = run_prep_quiet(overrides, capsys)
    assert out.count("cache hit") == 2
