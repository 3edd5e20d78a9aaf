"""The config system: every shipped YAML loads; unknown keys and bad values are named, all at once."""

import os
import subprocess
import sys
from typing import List
from pathlib import Path

import pytest

from dpo_zoo.config import REPO_ROOT, ConfigError, find_loss_preset, load_config, loss_hparams, read_yaml
from dpo_zoo.losses import build_loss, registered_losses

ALL_YAML = sorted((REPO_ROOT / "configs").rglob("*.yaml"))


def test_there_are_configs_to_check():
    assert any(p.parent.name == "loss" for p in ALL_YAML)


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_shipped_yaml_loads(path: Path, tmp_path: Path):
    if "study" in read_yaml(path):
        # A study file (dpo-zoo study): its study section and every run's experiment config must load.
        from dpo_zoo.study.runner import load_study

        study = load_study(str(path), [f"study.output_dir={tmp_path}"])
        assert study.curves and all(curve.loss in registered_losses() for curve in study.curves)
    elif path.parent.name == "loss":
        # A loss preset: selected with `loss=<stem>`; its name must be registered and its keys known.
        cfg = load_config([], [f"loss={path.stem}"])
        name, hparams = loss_hparams(cfg)
        assert name in registered_losses()
        preset = read_yaml(path)
        for key, value in preset.items():
            if key != "name":
                assert hparams[key] == value, f"{path}: {key}"
        build_loss(name, **hparams)  # the values themselves are valid for the loss
    else:
        cfg = load_config([path])
        assert cfg.loss.name in registered_losses()


def test_defaults_and_overrides():
    cfg = load_config([], ["loss=dpo", "loss.beta=0.25", "train.max_steps=7", "train.lora.enabled=true"])
    assert cfg.loss.beta == 0.25 and cfg.loss.label_smoothing == 0.0
    assert cfg.train.max_steps == 7 and cfg.train.lora.enabled is True
    assert cfg.train.output_dir == "runs/dpo"  # ${loss.name} interpolation resolved


def test_every_error_reported_at_once_with_the_key_named():
    with pytest.raises(ConfigError) as info:
        load_config(
            [],
            ["train.max_stepz=3", "loss.bta=0.1", "train.lora.r=abc", "prep.truncation_mode=middle", "nonsense"],
        )
    errors = info.value.errors
    text = "\n".join(errors)
    assert "train.max_stepz" in text
    assert "loss.bta" in text and "unknown hyperparameter of loss 'dpo'" in text
    assert "train.lora.r" in text
    assert "prep.truncation_mode" in text and "middle" in text
    assert "'nonsense' is not of the form key=value" in text
    assert len(errors) == 5


def test_unknown_key_in_a_yaml_names_the_file(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  micro_batch_size: 2\n  learnin_rate: 1e-5\nloss:\n  name: dpo\n  beta: 0.2\n")
    with pytest.raises(ConfigError) as info:
        load_config([path])
    assert str(path) in info.value.errors[0] and "train.learnin_rate" in info.value.errors[0]
    assert info.value.errors[0].endswith("unknown key; did you mean `train.learning_rate`?")


@pytest.mark.parametrize("override, meant", [
    ("train.lr=1e-5", "train.learning_rate"),  # TRL / TrainingArguments names
    ("per_device_train_batch_size=4", "train.micro_batch_size"),
    ("beta=0.2", "loss.beta"),
    ("prep.max_lenght=256", "prep.max_length"),  # a misspelling
])
def test_unknown_key_suggests_the_key_meant(override, meant):
    with pytest.raises(ConfigError) as info:
        load_config([], [override])
    assert info.value.errors[0].endswith(f"did you mean `{meant}`?") or f"`{meant}` or" in info.value.errors[0]


def test_loss_section_as_mapping_and_selection_order(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("loss:\n  name: ipo\n  beta: 0.3\n")
    cfg = load_config([path])
    assert (cfg.loss.name, cfg.loss.beta) == ("ipo", 0.3)
    # `loss=<name>` on the command line replaces the loss, and its hyperparameters start from defaults.
    cfg = load_config([path], ["loss=dpo"])
    assert (cfg.loss.name, cfg.loss.beta) == ("dpo", 0.1)


def test_bad_loss_value_is_reported():
    with pytest.raises(ConfigError, match="beta must be > 0"):
        load_config([], ["loss.beta=-1"])


@pytest.mark.parametrize("overrides, key, expected, value", [
    (["loss.beta=abc"], "loss.beta", "a number (float)", "'abc' (str)"),
    (["loss.beta=true"], "loss.beta", "a number (float)", "True (bool)"),
    (["loss=sampo", "loss.share_indices=maybe"], "loss.share_indices", "a boolean (true or false)", "'maybe' (str)"),
    (["loss=sampo", "loss.share_indices=1"], "loss.share_indices", "a boolean (true or false)", "1 (int)"),
    (["loss=ra_dpo", "loss.variant=1.5"], "loss.variant", "an integer", "1.5 (float)"),
    (["loss=is_daa", "loss.clip_max=x"], "loss.clip_max", "a number (float) or null", "'x' (str)"),
])
def test_hyperparameter_of_the_wrong_type_names_key_type_and_value(overrides, key, expected, value):
    with pytest.raises(ConfigError) as caught:
        load_config([], overrides)
    assert caught.value.errors == [f"override '{overrides[-1]}': `{key}`: expected {expected}, got {value}"]


def test_hyperparameter_types_accept_what_they_should():
    cfg = load_config([], ["loss=is_daa", "loss.beta=1", "loss.clip_max=null"])  # an int is a fine float
    assert (cfg.loss.beta, cfg.loss.clip_max) == (1, None)
    with pytest.raises(Exception, match=r"loss 'dpo': `beta`: expected a number \(float\), got 'abc'"):
        build_loss("dpo", beta="abc")  # the Python API says the same


@pytest.mark.slow
def test_wrong_hyperparameter_type_through_the_cli_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dpo_zoo.cli", "train", "loss.beta=abc"], cwd=tmp_path,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 2
    assert "`loss.beta`: expected a number (float), got 'abc' (str)" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_configs_never_run_code(tmp_path):
    """YAML tags that would construct Python objects are not honoured."""
    path = tmp_path / "evil.yaml"
    path.write_text("train:\n  output_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError):
        load_config([path])


def test_loss_preset_lookup():
    presets = sorted((REPO_ROOT / "configs" / "loss").glob("*.yaml"))
    assert presets, "configs/loss holds the paper presets"
    assert find_loss_preset(presets[0].stem) is not None
    assert find_loss_preset("no-such-preset") is None


def settings_equal_to_defaults(path: Path) -> List[str]:
    """The keys a shipped YAML sets to the value they have anyway (config defaults, or the loss's own
    hyperparameter defaults), which a config file should leave out."""
    from omegaconf import OmegaConf

    from dpo_zoo.config import ExperimentConfig, _flatten
    from dpo_zoo.losses import get_loss_entry

    data = read_yaml(path)
    if path.parent.name == "loss":
        data = {"loss": data}
    defaults = OmegaConf.structured(ExperimentConfig)
    loss = data.get("loss") or {}
    loss = dict(loss) if isinstance(loss, dict) else {"name": loss}
    name = str(loss.get("name", "dpo"))
    # (A mixture, loss=a+b, has per-part sections; only its name is compared here.)
    loss_defaults = {"name": "dpo", **({} if "+" in name else get_loss_entry(name).defaults())}
    same = []
    for key, value in _flatten({k: v for k, v in data.items() if k != "loss"}):
        if OmegaConf.select(defaults, key, default="<absent>") == value:
            same.append(f"{key}: {value!r}")
    for key, value in loss.items():
        if path.parent.name == "loss" and key == "name":
            continue  # a preset names its loss
        if key in loss_defaults and loss_defaults[key] == value:
            same.append(f"loss.{key}: {value!r}")
    return same


# Reproductions of a published setting pin every value the source states, defaults included, so that a
# later change of a default cannot silently change them: the paper presets (configs/loss, listed with
# their values in docs/papers.md) and the recipes that cite a source per value.
PINNED_SETTINGS = [p for p in ALL_YAML if p.parent.name == "loss"] + [
    REPO_ROOT / "configs" / "experiments" / "dpo_paper_hh.yaml",
    REPO_ROOT / "configs" / "experiments" / "zephyr_ultrafeedback.yaml",
]


@pytest.mark.parametrize("path", [p for p in ALL_YAML if p not in PINNED_SETTINGS],
                         ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_shipped_yaml_sets_no_value_equal_to_its_default(path: Path):
    """A config file holds only what differs from the defaults (DESIGN §3), so reading it says what is special."""
    same = settings_equal_to_defaults(path)
    assert not same, f"{path.relative_to(REPO_ROOT)} restates defaults: {'; '.join(same)}"


def test_the_default_check_catches_a_restated_default(tmp_path):
    restated = tmp_path / "x.yaml"
    restated.write_text("train:\n  max_steps: 100\n  seed: 7\nloss:\n  name: dpo\n  beta: 0.1\n  label_smoothing: 0.2\n")
    assert settings_equal_to_defaults(restated) == ["train.max_steps: 100", "loss.name: 'dpo'", "loss.beta: 0.1"]


def test_every_config_field_is_explained_where_it_is_defined():
    """Each field of the config dataclasses has a comment on the line above it (or after it)."""
    import ast

    source = (REPO_ROOT / "dpo_zoo" / "config_schema.py").read_text().split("\n")
    tree = ast.parse("\n".join(source))
    bare = []
    sections = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name.endswith("Config")]
    assert {node.name for node in sections} >= {"ExperimentConfig", "TrainConfig", "PrepConfig"}
    for node in sections:
        for item in node.body:
            if isinstance(item, ast.AnnAssign):
                line = source[item.lineno - 1]
                if not source[item.lineno - 2].strip().startswith("#") and "#" not in line:
                    bare.append(f"{node.name}.{item.target.id}")
    assert not bare, f"fields without a comment: {bare}"


def test_allowed_values_are_declared_with_their_fields():
    from dpo_zoo.config import CHOICES

    from data_prep.load import PREPROCESSORS

    assert CHOICES["data.preprocessor"] == tuple(PREPROCESSORS)  # one list, data_prep's
    assert CHOICES["train.lr_schedule"] == ("constant", "linear", "cosine", "cosine_with_min_lr", "warmup_stable_decay")
    with pytest.raises(ConfigError, match=r"`train.lr_schedule`: 'cosin' is not one of constant, linear"):
        load_config([], ["train.lr_schedule=cosin"])
