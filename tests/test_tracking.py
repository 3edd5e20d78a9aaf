"""train.report_to: each tracker gets the metrics logs.jsonl holds, under the same (TRL) names, at the
same steps, read back from the tracker's own store: TensorBoard event files, a W&B offline run file,
an MLflow local (SQLite) store through MlflowClient, a Trackio project database. Nothing leaves the machine."""

import glob
import json
import struct
from pathlib import Path

import pytest

from dpo_zoo.config import ConfigError, load_config
from dpo_zoo.errors import TrainingError
from dpo_zoo.train.tracking import report_to_names
from dpo_zoo.train.trainer import train


def train_reporting_to(tiny_prepared, out_dir, report_to):
    """Two steps of the tiny model, logged every step, then the held-out evaluation."""
    cfg = load_config([], list(tiny_prepared) + [
        f"train.output_dir={out_dir}", f"train.report_to={report_to}", "train.run_name=tracked",
        "train.project=dpo_zoo_tests",
    ])
    train(cfg)
    records = [json.loads(line) for line in open(Path(out_dir) / "logs.jsonl")]
    by_step = {}
    for record in records:
        if "event" not in record:
            by_step.setdefault(record["step"], {}).update({k: v for k, v in record.items() if k != "step"})
    return by_step


def assert_same_metrics(logged, tracked):
    """Every number of logs.jsonl is in the tracker, same name, same step, same value (float32 tolerance:
    TensorBoard stores scalars as float32)."""
    assert sorted(tracked) == sorted(logged), (sorted(tracked), sorted(logged))
    for step, metrics in logged.items():
        for name, value in metrics.items():
            assert name in tracked[step], f"{name} missing at step {step}"
            assert tracked[step][name] == pytest.approx(value, rel=1e-6, abs=1e-6), (step, name)


# ==================================================================== the config value


@pytest.mark.parametrize("value, names", [
    ("tensorboard", ["tensorboard"]),
    ("none", []),
    ("[wandb,mlflow]", ["wandb", "mlflow"]),
    ("[trackio,trackio]", ["trackio"]),
    ("[]", []),
])
def test_report_to_takes_a_name_or_a_list(value, names):
    cfg = load_config([], [f"train.report_to={value}"])
    from omegaconf import OmegaConf

    raw = cfg.train.report_to
    assert report_to_names(raw if isinstance(raw, str) else OmegaConf.to_container(raw)) == names


def test_report_to_default_is_tensorboard():
    assert load_config([]).train.report_to == "tensorboard"


@pytest.mark.parametrize("value, message", [
    ("wanb", "'wanb' is not one of none, tensorboard, wandb, mlflow, trackio"),
    ("[none,wandb]", "'none' cannot be combined"),
    ("3", "must be a tracker name or a list of them"),
])
def test_bad_report_to_names_the_key(value, message):
    with pytest.raises(ConfigError) as err:
        load_config([], [f"train.report_to={value}"])
    assert "`train.report_to`" in str(err.value) and message in str(err.value)


def test_a_missing_tracker_package_names_the_extra(tiny_prepared, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(TrainingError, match=r"pip install 'dpo_zoo\[wandb\]'"):
        train(load_config([], list(tiny_prepared) + [f"train.output_dir={tmp_path}", "train.report_to=wandb"]))
    assert not (tmp_path / "logs.jsonl").exists()  # stopped before the run started


def test_tracker_settings_do_not_change_what_a_run_is(tiny_prepared, tmp_path):
    """Reporting somewhere else does not make a finished run 'trained with other settings'."""
    out = tmp_path / "run"
    train(load_config([], list(tiny_prepared) + [f"train.output_dir={out}", "train.report_to=none"]))
    before = (out / "final" / "model.safetensors").stat().st_mtime_ns
    train(load_config([], list(tiny_prepared) + [f"train.output_dir={out}", "train.report_to=tensorboard",
                                                 "train.run_name=other"]))
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == before  # reused, not retrained
    assert not (out / "tensorboard").exists()  # and no empty tracker run was opened for it


# ==================================================================== each tracker, read back


def test_tensorboard_event_files_hold_the_logged_metrics(tiny_prepared, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    logged = train_reporting_to(tiny_prepared, out, "tensorboard")
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tracked = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            tracked.setdefault(event.step, {})[tag] = event.value
    assert "rewards/accuracies" in tracked[2] and "eval_loss" in tracked[2]
    assert_same_metrics(logged, tracked)


def wandb_records(path):
    """The protobuf records of a W&B run file: W&B's 7-byte header, then LevelDB's log format (32 KiB
    blocks; each chunk a 7-byte header of crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_holds_the_logged_metrics_and_config(tiny_prepared, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install 'dpo_zoo[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    wandb.teardown()  # W&B reads its environment once per process, at set-up: start afresh with this one
    try:
        logged = train_reporting_to(tiny_prepared, tmp_path / "run", "wandb")
    finally:
        wandb.teardown()  # and wait for W&B's service to close the run file (it writes in the background)
    [run_file] = glob.glob(str(tmp_path / "wandb_dir" / "wandb" / "offline-run-*" / "run-*.wandb"))
    tracked, run_info, config = {}, None, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            tracked.setdefault(record.history.step.num, {}).update(
                {k: v for k, v in items.items() if not k.startswith("_")})
        elif kind == "run":
            run_info = record.run
            config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
    assert run_info.project == "dpo_zoo_tests" and run_info.display_name == "tracked"
    assert config["train"]["learning_rate"] == 1e-3 and config["loss"]["name"] == "dpo"
    assert_same_metrics(logged, tracked)


def test_mlflow_local_store_holds_the_logged_metrics_and_params(tiny_prepared, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install 'dpo_zoo[mlflow]')")
    from mlflow import MlflowClient

    # MLflow 3's local store (its default, at ./mlflow.db): a SQLite file. Its older folder store
    # cannot hold a metric `loss` beside `loss/...` (one is a file, the other a folder of that name).
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    logged = train_reporting_to(tiny_prepared, tmp_path / "run", "mlflow")
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("dpo_zoo_tests")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["train.learning_rate"] == "0.001" and run.data.params["loss.name"] == "dpo"
    tracked = {}
    for name in run.data.metrics:
        for point in client.get_metric_history(run.info.run_id, name):
            tracked.setdefault(point.step, {})[name] = point.value
    assert_same_metrics(logged, tracked)


def test_trackio_local_project_holds_the_logged_metrics(tiny_prepared, tmp_path, monkeypatch):
    pytest.importorskip("trackio", reason="the trackio extra is not installed (pip install 'dpo_zoo[trackio]')")
    import sys

    store = tmp_path / "trackio"
    monkeypatch.setenv("TRACKIO_DIR", str(store))
    # trackio reads TRACKIO_DIR once, at import, into module constants: if an earlier test imported
    # it, point those constants at this test's folder too.
    for module in [m for name, m in sys.modules.items() if name == "trackio" or name.startswith("trackio.")]:
        for constant, path in (("TRACKIO_DIR", store), ("MEDIA_DIR", store / "media"), ("ARTIFACTS_DIR", store / "artifacts")):
            if hasattr(module, constant):
                monkeypatch.setattr(module, constant, path)
    import trackio.sqlite_storage as storage

    logged = train_reporting_to(tiny_prepared, tmp_path / "run", "trackio")
    rows = storage.SQLiteStorage.get_logs("dpo_zoo_tests", "tracked")
    tracked = {}
    for row in rows:
        tracked.setdefault(row["step"], {}).update(
            {k: v for k, v in row.items() if k in logged.get(row["step"], {})})
    assert_same_metrics(logged, tracked)
    assert storage.SQLiteStorage.get_run_config("dpo_zoo_tests", "tracked")["train"]["learning_rate"] == 1e-3


def test_config_accepts_exactly_the_trackers_that_have_an_adapter():
    """dpo_zoo.config validates train.report_to without importing the train layer, from its own list of
    names; that list and the adapter table must name the same trackers."""
    from dpo_zoo.config import TRACKER_NAMES
    from dpo_zoo.train.tracking import KINDS

    assert tuple(KINDS) == TRACKER_NAMES
