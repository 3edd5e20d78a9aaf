"""Checkpoints: written atomically with a checksummed manifest; a damaged or tampered one is reported,
skipped, and the run resumes from the last good one, ending with the weights of an uninterrupted run.

One uninterrupted run (4 steps, a checkpoint after each of steps 1-3, keep the newest 2) is the
reference; each case copies it, removes ``final/`` (as if killed after its last checkpoint), damages
checkpoints and trains again through the command line.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_zoo.train.checkpoints import MANIFEST, build_manifest, verify
from dpo_zoo.cli import main as cli_main
from dpo_zoo.config import load_config
from dpo_zoo.model.safe_load import safe_torch_load
from dpo_zoo.train.trainer import train

# SamPO draws random token subsets: the resumed run must also restore where the draws stand.
COMMON = ["loss=sampo", "train.max_steps=4", "train.save_every=1", "train.keep_checkpoints=2",
          "train.warmup_steps=1", "train.lr_schedule=cosine"]
MODEL_STATES = "mp_rank_00_model_states.pt"


class PlantedPayload:
    """Unpickling this runs a shell command that creates a file: what a tampered checkpoint might carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def reference_run(tiny_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoints") / "uninterrupted"
    train(load_config([], list(tiny_prepared) + COMMON + [f"train.output_dir={out}"]))
    return out


def interrupted_copy(reference_run, tmp_path) -> Path:
    """The reference run as it stood when killed right after its last checkpoint (step 3)."""
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    shutil.rmtree(out / "final")
    (out / "run.json").unlink()
    return out


def train_cli(tiny_prepared, out, capfd):
    code = cli_main(["train", *tiny_prepared, *COMMON, f"train.output_dir={out}"])
    captured = capfd.readouterr()
    return code, captured.out + captured.err


def final_weights(out) -> dict:
    return load_file(str(Path(out) / "final" / "model.safetensors"))


def assert_bit_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def plant_payload(path: Path, marker: Path):
    state = safe_torch_load(path, map_location="cpu")
    state["extra"] = PlantedPayload(marker)
    torch.save(state, path)


def truncate(path: Path):
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)


def resumed_from(out) -> list:
    return [r.get("checkpoint") for r in map(json.loads, open(out / "logs.jsonl")) if r.get("event") == "resume"]


def test_checkpoints_are_manifested_verified_and_only_the_newest_kept(reference_run):
    root = reference_run / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == ["step-0000002", "step-0000003"]
    assert (root / "latest").read_text() == "step-0000003"
    assert not list(root.glob(".*"))  # no temporary folders left
    manifest = json.loads((root / "step-0000003" / MANIFEST).read_text())
    assert manifest["step"] == 3
    assert set(manifest["identity"]) == {"config", "cache_key", "world_size"}
    assert manifest["identity"]["world_size"] == 1
    assert manifest["identity"]["config"]["loss"]["name"] == "sampo"
    assert MODEL_STATES in manifest["files"]
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())
    assert verify(root / "step-0000003")[1] == []


def test_tampered_checkpoint_is_skipped_its_payload_never_runs_and_the_run_ends_bit_identical(
        reference_run, tiny_prepared, tmp_path, capfd):
    out = interrupted_copy(reference_run, tmp_path)
    marker = tmp_path / "payload-ran"
    plant_payload(out / "checkpoints" / "step-0000003" / MODEL_STATES, marker)
    (out / "checkpoints" / ".incomplete-step-0000004").mkdir()  # a save killed half-way: ignored

    code, printed = train_cli(tiny_prepared, out, capfd)
    assert code == 0, printed
    assert not marker.exists()
    # The planted object changed the file's size (and so its checksum): caught before anything is unpickled.
    assert f"step-0000003 skipped: {MODEL_STATES}: " in printed
    assert "(truncated or changed): damaged or possibly tampered with" in printed
    assert "Traceback" not in printed and "weights_only" not in printed
    assert resumed_from(out) == ["step-0000002"]
    assert not (out / "checkpoints" / ".incomplete-step-0000004").exists()
    # The resumed run passes through step 2's checkpoint, as the uninterrupted one did.
    assert_bit_identical(final_weights(out), final_weights(reference_run))


def test_truncated_checkpoint_is_skipped_and_the_run_ends_bit_identical(reference_run, tiny_prepared, tmp_path, capfd):
    out = interrupted_copy(reference_run, tmp_path)
    path = out / "checkpoints" / "step-0000003" / MODEL_STATES
    recorded = path.stat().st_size
    truncate(path)

    code, printed = train_cli(tiny_prepared, out, capfd)
    assert code == 0, printed
    assert (f"step-0000003 skipped: {MODEL_STATES}: {recorded // 2} bytes where manifest.json records {recorded} "
            "(truncated or changed): damaged or possibly tampered with") in printed
    assert "Traceback" not in printed
    assert resumed_from(out) == ["step-0000002"]
    assert_bit_identical(final_weights(out), final_weights(reference_run))
    # The damaged checkpoint was replaced by a good one when the run saved step 3 again.
    assert verify(out / "checkpoints" / "step-0000003")[1] == []


@pytest.mark.slow
def test_when_every_checkpoint_is_damaged_the_run_stops_listing_them(reference_run, tiny_prepared, tmp_path):
    """Through a real process: exit status, message, and no traceback on either stream."""
    out = interrupted_copy(reference_run, tmp_path)
    marker = tmp_path / "payload-ran"
    plant_payload(out / "checkpoints" / "step-0000003" / MODEL_STATES, marker)
    truncate(out / "checkpoints" / "step-0000002" / MODEL_STATES)
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, "-m", "dpo_zoo.cli", "train", *tiny_prepared, *COMMON,
                             f"train.output_dir={out}"], capture_output=True, text=True, env=env, timeout=900)
    printed = result.stdout + result.stderr
    assert result.returncode == 2, printed
    assert f"dpo-zoo train: no checkpoint in {out / 'checkpoints'} can be resumed from:" in result.stderr
    assert f"{out / 'checkpoints' / 'step-0000003'}: {MODEL_STATES}: " in result.stderr
    assert f"{out / 'checkpoints' / 'step-0000002'}: {MODEL_STATES}:" in result.stderr
    assert "train.resume=false" in result.stderr
    assert "Traceback" not in printed and "weights_only" not in printed
    assert not marker.exists()
    assert not (out / "final").exists()


def test_a_payload_with_a_forged_manifest_is_refused_by_safe_loading(reference_run, tmp_path):
    """Someone who also rewrites the manifest's checksums still gets nothing run: the file does not open
    under safe loading, and the report names the object it refused."""
    folder = tmp_path / "step-0000003"
    shutil.copytree(reference_run / "checkpoints" / "step-0000003", folder)
    marker = tmp_path / "payload-ran"
    plant_payload(folder / MODEL_STATES, marker)
    old = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).unlink()
    forged = build_manifest(folder, old["step"], old["identity"])
    (folder / MANIFEST).write_text(json.dumps(forged))

    _, problems = verify(folder)
    assert problems == [f"{MODEL_STATES}: holds a pickled object that safe loading does not allow (posix.system); "
                        "nothing of it was run: damaged or possibly tampered with"]
    assert not marker.exists()


def test_a_file_added_to_a_checkpoint_is_reported(reference_run, tmp_path):
    folder = tmp_path / "step-0000003"
    shutil.copytree(reference_run / "checkpoints" / "step-0000003", folder)
    shutil.copy(folder / MODEL_STATES, folder / "mp_rank_01_model_states.pt")
    (folder / MANIFEST).write_text((folder / MANIFEST).read_text().replace('"step": 3', '"step": 4'))
    _, problems = verify(folder)
    assert problems == [
        "manifest.json records step 4, but the folder is step-0000003: damaged or possibly tampered with",
        "mp_rank_01_model_states.pt: not listed in manifest.json (a file added after the save): damaged or "
        "possibly tampered with",
    ]


def test_keep_checkpoints_must_be_positive():
    from dpo_zoo.config import ConfigError

    with pytest.raises(ConfigError, match=r"`train.keep_checkpoints`: must be >= 1 \(or null: keep all\), got 0"):
        load_config([], ["train.keep_checkpoints=0"])


@pytest.mark.slow
def test_two_processes_skip_a_damaged_rank_file_together(tiny_prepared, tmp_path):
    """ZeRO-2 over 2 ranks under the `deepspeed` launcher: each rank writes its own optimizer file, the
    manifest covers both, and when rank 1's file of the newest checkpoint is truncated both ranks
    resume from the one before and end bit-identical to the uninterrupted run."""
    from dpo_zoo.parallel.process_group import _free_port

    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    common = list(tiny_prepared) + ["train.max_steps=3", "train.save_every=1", "train.deepspeed.zero_stage=2",
                                    "train.micro_batch_size=1"]

    def launch(out):
        result = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(_free_port()), "--module",
                                 "dpo_zoo.cli", "train", *common, f"train.output_dir={out}"],
                                env=env, capture_output=True, text=True, timeout=900)
        return result.returncode, result.stdout + result.stderr

    code, printed = launch(tmp_path / "full")
    assert code == 0, printed[-3000:]
    manifest = json.loads((tmp_path / "full" / "checkpoints" / "step-0000002" / MANIFEST).read_text())
    rank_files = sorted(name for name in manifest["files"] if name.endswith("optim_states.pt"))
    assert len(rank_files) == 2 and "rank_1" in rank_files[1]

    out = interrupted_copy(tmp_path / "full", tmp_path)
    truncate(out / "checkpoints" / "step-0000002" / rank_files[1])
    code, printed = launch(out)
    assert code == 0, printed[-3000:]
    assert f"step-0000002 skipped: {rank_files[1]}:" in printed
    assert "Traceback" not in printed
    assert resumed_from(out) == ["step-0000001"]
    assert_bit_identical(final_weights(out), final_weights(tmp_path / "full"))
