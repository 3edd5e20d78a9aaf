"""Data sets read through `datasets` (`data.hub`): folders laid out like Hub data-set repositories
(parquet shards under data/, subsets in folders), read by the real `datasets.load_dataset_builder` with
no network. The same data as a file gives the same pairs; errors name `<data set>:<split>`, row and
field. (The Hub itself, served on 127.0.0.1, is tested in the loopback-Hub tests.)"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import load_splits
from data_prep import drops as R
from data_prep.hub import HubSettings, hub_settings
from dpo_zoo.config import DataConfig, HubDataConfig
from dpo_zoo.errors import DataError
from tiny import HH_RLHF_TEST


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Each test prepares its data sets in its own `datasets` cache, and never reaches a network."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf_datasets"


def uf_row(i, prompt, good, bad, score_chosen=8.0, score_rejected=4.0):
    user = {"role": "user", "content": prompt}
    chosen = [user, {"role": "assistant", "content": good}]
    return {"prompt": prompt, "prompt_id": f"pid{i}", "chosen": chosen,
            "rejected": [user, {"role": "assistant", "content": bad}], "messages": chosen,
            "score_chosen": score_chosen, "score_rejected": score_rejected}


def ultrafeedback_repo(root, train_rows, test_rows):
    """A folder laid out like HuggingFaceH4/ultrafeedback_binarized: data/<split>-00000-of-00001.parquet."""
    (root / "data").mkdir(parents=True)
    for split, rows in (("train_prefs", train_rows), ("test_prefs", test_rows), ("train_sft", train_rows[:1])):
        pq.write_table(pa.Table.from_pylist(rows), root / "data" / f"{split}-00000-of-00001.parquet")
    return root


UF_TRAIN = [uf_row(0, "Name a prime.", "7", "8"), uf_row(1, "Capital of France?", "Paris.", "Lyon.", 7.5, 7.5),
            uf_row(2, "2+2?", "4", "5", 9.0, 2.0)]
UF_TEST = [uf_row(3, "Largest planet?", "Jupiter.", "Mars.", 8.0, 3.0)]


def hub_cfg(path, **hub):
    return {"preprocessor": "ultrafeedback", "hub": {"path": str(path), **hub}, "heldout_fraction": 0.0}


def test_ultrafeedback_layout_with_its_prefs_splits(tmp_path):
    repo = ultrafeedback_repo(tmp_path / "ultrafeedback_binarized", UF_TRAIN, UF_TEST)
    loaded = load_splits(hub_cfg(repo, split="train_prefs", heldout_split="test_prefs"))
    assert [p.chosen[-1]["content"] for p in loaded.train] == ["7", "Paris.", "4"]
    assert [p.is_tie for p in loaded.train] == [False, True, False]
    assert [p.prompt for p in loaded.heldout] == [[{"role": "user", "content": "Largest planet?"}]]
    assert loaded.drops.rows_read == {f"{repo}:train_prefs": 3, f"{repo}:test_prefs": 1}
    assert loaded.train[0].source_file == f"{repo}:train_prefs"
    assert loaded.origin == {}  # a local folder: keyed by its content alone
    assert all(f.endswith(".arrow") for f in loaded.sources)


def test_the_training_split_defaults_to_train_prefs_and_data_files_narrow_the_repo(tmp_path):
    repo = ultrafeedback_repo(tmp_path / "uf", UF_TRAIN, UF_TEST)
    loaded = load_splits(hub_cfg(repo))  # no split named: train, else train_prefs
    assert len(loaded.train) == 3 and loaded.heldout == []
    only = load_splits(hub_cfg(repo, data_files={"train_prefs": "data/train_prefs-*"}))
    assert len(only.train) == 3
    with pytest.raises(DataError, match=r"no split 'test_prefs' \(data.hub.heldout_split\); it has train_prefs$"):
        load_splits(hub_cfg(repo, data_files={"train_prefs": "data/train_prefs-*"}, heldout_split="test_prefs"))


def test_an_unknown_split_names_the_splits_there_are(tmp_path):
    repo = ultrafeedback_repo(tmp_path / "uf", UF_TRAIN, UF_TEST)
    with pytest.raises(DataError, match=r"uf: no split 'validation' \(data.hub.split\); it has "
                                        r"(?=.*train_prefs)(?=.*test_prefs)(?=.*train_sft)"):
        load_splits(hub_cfg(repo, split="validation"))


def test_a_bad_row_names_the_data_set_split_row_and_field(tmp_path):
    rows = [*UF_TRAIN, uf_row(3, "Best colour?", "Blue.", "Red.", 2.0, 6.0)]
    repo = ultrafeedback_repo(tmp_path / "uf", rows, UF_TEST)
    with pytest.raises(DataError, match=rf"{repo}:train_prefs, row 3 \(0-based\), field 'score_chosen': bad value"):
        load_splits(hub_cfg(repo, split="train_prefs"))
    skipped = load_splits({**hub_cfg(repo, split="train_prefs"), "on_bad_row": "skip"})
    assert len(skipped.train) == 3
    assert skipped.drops.rows == [{"file": f"{repo}:train_prefs", "row": 3, "field": "score_chosen",
                                   "reason": R.BAD_VALUE, "detail": "chosen scored 2.0 below rejected (6.0)"}]


def test_hh_rlhf_subset_by_data_dir_reads_like_the_file(tmp_path):
    """The shipped data/hh_rlhf folder is laid out like Anthropic/hh-rlhf (harmless-base/test.jsonl.gz):
    read with data_dir=harmless-base it gives exactly the pairs and drops of the file itself."""
    folder = HH_RLHF_TEST.parent.parent
    settings = dict(preprocessor="hh_rlhf", on_bad_row="skip", heldout_fraction=0.0)
    via_hub = load_splits(DataConfig(**settings, hub=HubDataConfig(path=str(folder), data_dir="harmless-base",
                                                                    split="test")))
    via_file = load_splits(DataConfig(**settings, train_path=str(HH_RLHF_TEST)))
    assert len(via_hub.train) == len(via_file.train) > 2000
    assert all((a.prompt, a.chosen, a.rejected) == (b.prompt, b.chosen, b.rejected)
               for a, b in zip(via_hub.train, via_file.train))
    assert via_hub.drops.counts == via_file.drops.counts
    assert via_hub.drops.rows_read == {f"{folder}:test": 2312}
    assert [r["row"] for r in via_hub.drops.rows] == [r["row"] for r in via_file.drops.rows]


def test_a_data_dir_that_matches_no_files_is_an_error(tmp_path):
    folder = HH_RLHF_TEST.parent.parent
    with pytest.raises(DataError, match=r"hh_rlhf \(data_dir=helpful-base\): no data files found"):
        load_splits({"preprocessor": "hh_rlhf", "hub": {"path": str(folder), "data_dir": "helpful-base"}})


def test_offline_and_not_cached_names_the_data_set_the_revision_and_what_to_do():
    with pytest.raises(DataError) as err:
        load_splits({"preprocessor": "hh_rlhf", "hub": {"path": "nobody-here/no-such-set", "revision": "v2"}})
    message = str(err.value)
    assert "nobody-here/no-such-set (revision=v2)" in message
    assert "not in the local cache" in message and "HF_HUB_OFFLINE=1" in message


@pytest.mark.parametrize(
    "data, message",
    [
        ({"train_path": "x.jsonl", "hub": {"path": "org/name"}}, "`data.hub.path` and `data.train_path` both"),
        ({"heldout_path": "x.jsonl", "hub": {"path": "org/name", "heldout_split": "test"}},
         "`data.hub.heldout_split` and `data.heldout_path` both"),
        ({"hub": {"split": "train"}}, r"`data.hub.split`: set without data.hub.path"),
        ({"hub": {"path": "org/name", "split": "test", "heldout_split": "test"}}, "also the training split"),
        ({"hub": {"path": "org/name", "data_files": {"train": 3}}}, "`data.hub.data_files`: expected"),
        ({"preprocessor": "vader", "hub": {"path": "org/name"}}, "the vader preprocessor reads the VADER ratings"),
    ],
)
def test_contradicting_settings_name_the_keys(data, message):
    with pytest.raises(DataError, match=message):
        load_splits({"preprocessor": "hh_rlhf", **data})


def test_a_local_folder_has_no_revision(tmp_path):
    (tmp_path / "repo").mkdir()
    with pytest.raises(DataError, match="local folder, which has no revisions"):
        hub_settings({"hub": {"path": str(tmp_path / "repo"), "revision": "v1"}})
    assert hub_settings({"hub": {"path": "org/name"}}) == HubSettings(path="org/name")
    assert hub_settings({"hub": {}}) is None


def test_the_config_reads_a_hub_source_and_data_files_as_a_mapping(tmp_path):
    from dpo_zoo.config import load_config

    data_yaml = tmp_path / "d.yaml"
    data_yaml.write_text(json.dumps({"data": {"preprocessor": "ultrafeedback", "hub": {
        "path": "HuggingFaceH4/ultrafeedback_binarized", "data_files": {"train_prefs": "data/train_prefs-*"},
        "split": "train_prefs"}}}))
    cfg = load_config([data_yaml], ["data.hub.revision=0123456789abcdef0123456789abcdef01234567"])
    assert cfg.data.hub.data_files == {"train_prefs": "data/train_prefs-*"}
    assert cfg.data.hub.revision == "0123456789abcdef0123456789abcdef01234567" and cfg.data.hub.heldout_split is None


def test_a_column_of_the_wrong_type_in_a_hub_split_is_one_error_naming_it(tmp_path):
    (tmp_path / "repo" / "data").mkdir(parents=True)
    rows = [{"prompt": f"Q{i}", "chosen": i, "rejected": " no"} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "repo" / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'repo'}:train: column 'chosen' has type int64 for the whole "
                                        "file; the generic preprocessor reads it as text"):
        load_splits({"preprocessor": "generic", "on_bad_row": "skip", "hub": {"path": str(tmp_path / "repo")}})


def _parquet_bytes(rows):
    import io

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def test_through_a_loopback_hub_the_commit_is_recorded_and_offline_reads_only_what_is_cached(tmp_path, monkeypatch):
    """The real datasets/huggingface_hub clients against tests/hub_server.py: the resolved commit is the
    origin; a moved main resolves to its new commit; offline after the server stopped, the cache serves
    the newest commit, and a revision the cache cannot serve is an error naming both commits."""
    from hub_server import LoopbackHub, set_offline, use_hub

    rows = [{"prompt": f"Q{i}?", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(6)]
    files = lambda n: {"data/train-00000-of-00001.parquet": _parquet_bytes(rows[:n]), "README.md": b"# prefs\n"}  # noqa: E731
    data = {"preprocessor": "generic", "heldout_fraction": 0.0, "hub": {"path": "org/prefs"}}
    with LoopbackHub() as hub:
        use_hub(monkeypatch, hub.url, tmp_path / "hf")
        first = hub.push("org/prefs", files(6), repo_type="dataset")
        loaded = load_splits(data)
        assert len(loaded.train) == 6 and loaded.train[0].source_file == "org/prefs:train"
        assert loaded.origin == {"hub": "org/prefs", "name": None, "data_dir": None, "data_files": None,
                                 "revision": "main", "commit": first, "split": "train", "heldout_split": None}
        moved = hub.push("org/prefs", files(4), repo_type="dataset")
        again = load_splits(data)
        assert again.origin["commit"] == moved != first and len(again.train) == 4
        assert load_splits({**data, "hub": {"path": "org/prefs", "revision": first}}).origin["commit"] == first
    set_offline(monkeypatch, True)
    offline = load_splits(data)
    assert offline.origin["commit"] == moved and offline.fingerprint == again.fingerprint
    with pytest.raises(DataError, match=rf"org/prefs \(revision={first}\): offline \(HF_HUB_OFFLINE=1\), datasets reads "
                                        rf"only the newest cached commit of the data set, {moved}, but revision {first} "
                                        rf"is {first}; run once with network access"):
        load_splits({**data, "hub": {"path": "org/prefs", "revision": first}})
