"""Faults a long run meets on a shared machine, each through the real command line (``dpo_zoo.cli.main``,
or ``python -m dpo_zoo.cli`` where the process must die): a full disk (a small tmpfs, mounted here and
unmounted after), a stop signal (a real SIGTERM/SIGINT sent to the process at a chosen point of its
work), two writers of one folder, a prepared set altered under a running train, and an allocator out
of memory. In each: a clear message (no traceback), nothing finished lost, and where the case allows a
resumed run that ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_zoo.cli import main as cli_main
from dpo_zoo.config import load_config
from dpo_zoo.files import WriterLock
from dpo_zoo.stopping import GracefulStop
from dpo_zoo.train.checkpoints import verify
from dpo_zoo.train.trainer import train
from test_study import study_file  # noqa: F401  (a fixture: the tiny study of tests/test_study.py)

REPO = Path(__file__).resolve().parents[1]
RUN = ["train.max_steps=4", "train.save_every=1", "train.keep_checkpoints=1", "train.report_to=none"]


def override_value(overrides, key):
    return next(o.split("=", 1)[1] for o in overrides if o.startswith(key + "="))


def cli(argv, capfd):
    code = cli_main(argv)
    captured = capfd.readouterr()
    return code, captured.out + captured.err


def weights(run: Path) -> dict:
    return load_file(str(run / "final" / "model.safetensors"))


def assert_bit_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def resumed_from(run: Path) -> list:
    return [r.get("checkpoint") for r in map(json.loads, open(run / "logs.jsonl")) if r.get("event") == "resume"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_prepared, tmp_path_factory):
    """The run every interrupted one must end equal to: 4 steps, a checkpoint each step, keep 1."""
    out = tmp_path_factory.mktemp("faults") / "uninterrupted"
    train(load_config([], list(tiny_prepared) + RUN + [f"train.output_dir={out}"]))
    return out


def subprocess_env():
    # Same torch thread count as this process, so floats match the in-process reference run.
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}


# ==================================================================== a full disk


@contextlib.contextmanager
def small_disk(path: Path, size: int):
    """A tmpfs of ``size`` bytes at ``path`` (root only; skipped elsewhere); unmounted at the end."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield lambda new_size: subprocess.run(["mount", "-o", f"remount,size={new_size}", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_disk_full_during_prep_mid_shard_then_resumed_to_the_same_set(tiny_prepared, tmp_path, capfd):
    base = [o for o in tiny_prepared if not o.startswith("prep.output_dir=")] + ["prep.shard_size=4"]
    whole = tmp_path / "whole"
    assert cli_main(["prep", *base, f"prep.output_dir={whole}"]) == 0
    full = tree_bytes(whole)
    disk = tmp_path / "disk"
    with small_disk(disk, (full // 2) // 4096 * 4096) as grow:
        code, printed = cli(["prep", *base, f"prep.output_dir={disk / 'prepared'}"], capfd)
        assert code == 2, printed
        assert "disk full writing " + str(disk / "prepared") in printed and "bytes free" in printed
        assert "Traceback" not in printed
        # Nothing half-written under a real name: every shard file on the disk is a whole, checked one.
        leftovers = [p.name for p in (disk / "prepared").rglob(".*tmp*")]  # the writer's temporary names
        assert not leftovers, leftovers
        kept = sorted(p.relative_to(disk / "prepared") for p in (disk / "prepared").rglob("*.arrow"))
        for name in kept:
            assert (disk / "prepared" / name).read_bytes() == (whole / name).read_bytes(), name

        grow(full * 4)
        code, printed = cli(["prep", *base, f"prep.output_dir={disk / 'prepared'}"], capfd)
        assert code == 0, printed
        if kept:
            assert "shards already done, kept" in printed
        for split in ("train", "heldout"):
            ours = json.loads((disk / "prepared" / split / "manifest.json").read_text())
            theirs = json.loads((whole / split / "manifest.json").read_text())
            assert [s["sha256"] for s in ours["shards"]] == [s["sha256"] for s in theirs["shards"]]


def test_disk_full_during_a_checkpoint_keeps_the_last_one_and_resumes_bit_identical(tiny_prepared, uninterrupted,
                                                                                    tmp_path, capfd):
    checkpoint = tree_bytes(uninterrupted / "checkpoints")
    final = tree_bytes(uninterrupted / "final")
    disk = tmp_path / "disk"
    # Room for one checkpoint and the run's small files, not for the second checkpoint beside it.
    with small_disk(disk, (checkpoint * 3 // 2 + 65536) // 4096 * 4096) as grow:
        out = disk / "run"
        code, printed = cli(["train", *tiny_prepared, *RUN, f"train.output_dir={out}"], capfd)
        assert code == 2, printed
        assert f"disk full writing {out / 'checkpoints'}" in printed and "the checkpoint of step" in printed
        assert "Traceback" not in printed
        root = out / "checkpoints"
        assert not [p for p in root.iterdir() if p.name.startswith(".incomplete-")]
        kept = [p for p in root.iterdir() if p.name.startswith("step-")]
        assert kept and all(verify(p)[1] == [] for p in kept)
        assert not (out / "final").exists() and not (out / "run.json").exists()

        grow(checkpoint * 4 + final * 4 + (1 << 20))
        code, printed = cli(["train", *tiny_prepared, *RUN, f"train.output_dir={out}"], capfd)
        assert code == 0, printed
        assert resumed_from(out) == [kept[0].name]
        assert_bit_identical(weights(out), weights(uninterrupted))


def test_disk_full_during_final_leaves_no_final_folder_and_the_rerun_matches(tiny_prepared, uninterrupted, tmp_path,
                                                                           capfd):
    final = tree_bytes(uninterrupted / "final")
    disk = tmp_path / "disk"
    no_checkpoints = ["train.max_steps=4", "train.report_to=none"]
    with small_disk(disk, max(final // 2 // 4096 * 4096, 8192)) as grow:
        out = disk / "run"
        code, printed = cli(["train", *tiny_prepared, *no_checkpoints, f"train.output_dir={out}"], capfd)
        assert code == 2, printed
        assert f"disk full writing {out / 'final.tmp'}" in printed and "the final model" in printed
        assert "bytes written before the disk filled" in printed and "Traceback" not in printed
        assert not (out / "final").exists() and not (out / "final.tmp").exists() and not (out / "run.json").exists()
        grow(final * 4 + (1 << 20))
        code, printed = cli(["train", *tiny_prepared, *no_checkpoints, f"train.output_dir={out}"], capfd)
        assert code == 0, printed
        assert_bit_identical(weights(out), weights(uninterrupted))


def test_disk_full_during_compare_report_is_not_current_and_rewritten(tiny_prepared, tiny_model_dir, tmp_path, capfd):
    heldout = Path(override_value(tiny_prepared, "prep.output_dir")) / "heldout"
    def argv(out):
        return ["compare", str(tiny_model_dir), "--data", str(heldout), "--losses", "dpo", "--output", str(out),
                "--config", *tiny_prepared, "compare.kl_samples=0"]

    whole = tmp_path / "whole"
    assert cli_main(argv(whole)) == 0
    report = tree_bytes(whole)
    disk = tmp_path / "disk"
    with small_disk(disk, (report // 3) // 4096 * 4096 or 4096) as grow:
        out = disk / "report"
        code, printed = cli(argv(out), capfd)
        assert code == 2, printed
        assert f"disk full writing {out}" in printed and "Traceback" not in printed
        assert not (out / "inputs.json").exists()  # not current: the next compare writes it again
        assert not [p for p in out.iterdir() if p.name.startswith(".")]
        grow(report * 4 + (1 << 20))
        code, printed = cli(argv(out), capfd)
        assert code == 0, printed and "reusing" not in printed
        assert (out / "inputs.json").exists()
        assert json.loads((out / "summary.json").read_text())["entries"] == \
            json.loads((whole / "summary.json").read_text())["entries"]


# ==================================================================== stop signals


def signal_at_step(monkeypatch, at_step: int, *signums: int):
    """Make the trainer send itself ``signums`` while it runs step ``at_step`` (0-based)."""
    import dpo_zoo.train.trainer as trainer

    real = trainer.train_step

    def step_then_signal(*args, **kwargs):
        out = real(*args, **kwargs)
        if args[9] == at_step:  # train_step(engine, loss, train_set, columns, reference, watch, run, t, pad_id, step)
            for signum in signums:
                os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(trainer, "train_step", step_then_signal)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_saves_a_verified_checkpoint_and_the_rerun_ends_bit_identical(
        tiny_prepared, uninterrupted, tmp_path, capfd, monkeypatch, signum, code):
    out = tmp_path / "run"
    argv = ["train", *tiny_prepared, *RUN, "train.save_every=3", f"train.output_dir={out}"]
    signal_at_step(monkeypatch, 1, signum)
    got, printed = cli(argv, capfd)
    assert got == code, printed
    name = signal.Signals(signum).name
    assert f"{name} received: finishing the current step" in printed
    assert (f"stopped by {name}: saved and verified the checkpoint of step 2 of 4 at {out / 'checkpoints' / 'step-0000002'}"
            in printed)
    assert "run the same command again to resume" in printed and "Traceback" not in printed
    assert verify(out / "checkpoints" / "step-0000002")[1] == []
    assert not (out / "final").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))

    monkeypatch.undo()
    got, printed = cli(argv, capfd)
    assert got == 0, printed
    assert resumed_from(out) == ["step-0000002"]
    assert_bit_identical(weights(out), weights(uninterrupted))


DRIVER = textwrap.dedent("""
    import os, signal, sys, time
    import dpo_zoo.train.trainer as trainer
    real_step, real_save = trainer.train_step, trainer.save_checkpoint
    mode = os.environ["FAULT_MODE"]

    def step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        if args[9] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            if mode == "twice":
                os.kill(os.getpid(), signal.SIGTERM)
        return out

    def slow_save(*args, **kwargs):
        if mode == "slow_save":
            print("SIGNAL_TO_EXIT_START", time.monotonic(), flush=True)
            time.sleep(30)
        return real_save(*args, **kwargs)

    trainer.train_step, trainer.save_checkpoint = step, slow_save
    from dpo_zoo.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def run_driver(tmp_path, mode, argv, timeout=240):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(script), *argv], env={**subprocess_env(), "FAULT_MODE": mode},
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def test_a_second_signal_stops_at_once_and_nothing_half_written_is_resumed(tiny_prepared, uninterrupted, tmp_path,
                                                                           capfd):
    out = tmp_path / "run"
    argv = ["train", *tiny_prepared, *RUN, f"train.output_dir={out}"]
    code, printed, _ = run_driver(tmp_path, "twice", argv)
    assert code == 143, printed
    assert "stopped at once (a second SIGTERM)" in printed and "Traceback" not in printed
    assert not (out / "final").exists()
    for folder in (out / "checkpoints").glob("step-*"):  # whatever is under a real name verifies
        assert verify(folder)[1] == []
    got, printed = cli(argv, capfd)
    assert got == 0, printed
    assert_bit_identical(weights(out), weights(uninterrupted))


def test_stop_grace_bounds_the_wait_for_a_save(tiny_prepared, tmp_path):
    out = tmp_path / "run"
    argv = ["train", *tiny_prepared, *RUN, "train.save_every=0", "train.stop_grace_s=1.5", f"train.output_dir={out}"]
    code, printed, _ = run_driver(tmp_path, "slow_save", argv)
    assert code == 143, printed
    assert "stopped at once (train.stop_grace_s (1.5 s) passed before the save finished)" in printed
    assert "Traceback" not in printed
    assert not list((out / "checkpoints").glob("step-*")) if (out / "checkpoints").exists() else True


def test_graceful_stop_restores_the_handlers_it_replaced():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop("x") as outer:
        with GracefulStop("y") as inner:
            os.kill(os.getpid(), signal.SIGTERM)
            assert inner.requested and not outer.requested
        assert signal.getsignal(signal.SIGTERM) == outer._handle
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_stop_signal_during_prep_keeps_finished_shards(tiny_prepared, tmp_path, capfd, monkeypatch):
    import dpo_zoo.cache.prep as prep

    base = [o for o in tiny_prepared if not o.startswith("prep.output_dir=")] + ["prep.shard_size=4"]
    whole = tmp_path / "whole"
    assert cli_main(["prep", *base, f"prep.output_dir={whole}"]) == 0
    real_write, written = prep.PreparedSetWriter.write, []

    def write_then_signal(self, *args, **kwargs):
        real_write(self, *args, **kwargs)
        written.append(args[0])
        if len(written) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(prep.PreparedSetWriter, "write", write_then_signal)
    out = tmp_path / "prepared"
    code, printed = cli(["prep", *base, f"prep.output_dir={out}"], capfd)
    assert code == 143, printed
    assert "stopped by SIGTERM: train: 2 of" in printed and "finished shards are kept" in printed
    assert "Traceback" not in printed
    monkeypatch.undo()
    code, printed = cli(["prep", *base, f"prep.output_dir={out}"], capfd)
    assert code == 0, printed
    assert "train: 2 of" in printed and "shards already done, kept" in printed
    for split in ("train", "heldout"):
        ours = json.loads((out / split / "manifest.json").read_text())
        theirs = json.loads((whole / split / "manifest.json").read_text())
        assert [s["sha256"] for s in ours["shards"]] == [s["sha256"] for s in theirs["shards"]]


# ==================================================================== two writers


HOLDER = "import sys, time; from dpo_zoo.files import WriterLock; WriterLock(sys.argv[1], command='the first writer').acquire(); print('held', flush=True); time.sleep(600)"


@contextlib.contextmanager
def another_writer(folder: Path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], env=subprocess_env(), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_two_trains_in_one_folder_the_second_is_refused_naming_the_first(tiny_prepared, tmp_path, capfd):
    out = tmp_path / "run"
    argv = ["train", *tiny_prepared, *RUN, f"train.output_dir={out}"]
    with another_writer(out) as holder:
        code, printed = cli(argv, capfd)
        assert code == 2, printed
        assert f"{out} is being written by another dpo-zoo process: pid {holder.pid} on {socket.gethostname()}" in printed
        assert "the first writer" in printed and "Traceback" not in printed
        assert not (out / "logs.jsonl").exists()  # the second wrote nothing
    # The first writer was killed (SIGKILL: its lock file stays): the next train takes the stale lock over.
    code, printed = cli(argv, capfd)
    assert code == 0, printed
    assert f"took over the stale writer lock {out / WriterLock.NAME}" in printed
    assert not (out / WriterLock.NAME).exists()  # released at the end


def test_two_preps_into_one_folder_the_second_is_refused(tiny_prepared, tmp_path, capfd):
    base = [o for o in tiny_prepared if not o.startswith("prep.output_dir=")]
    out = tmp_path / "prepared"
    with another_writer(out) as holder:
        code, printed = cli(["prep", *base, f"prep.output_dir={out}"], capfd)
        assert code == 2, printed
        assert f"pid {holder.pid} on {socket.gethostname()}" in printed and "Traceback" not in printed
        assert not (out / "train").exists()


# ==================================================================== the prepared set changes under a run


def test_a_shard_altered_under_a_running_train_stops_it_naming_the_shard(tiny_prepared, tmp_path, capfd, monkeypatch):
    import dpo_zoo.train.trainer as trainer

    prepared = tmp_path / "prepared"
    shutil.copytree(override_value(tiny_prepared, "prep.output_dir"), prepared)
    shard = sorted((prepared / "train").glob("*.arrow"))[0]
    real = trainer.train_step

    def step_then_alter(*args, **kwargs):
        out = real(*args, **kwargs)
        if args[9] == 0:  # another prep rewrote one shard in place while this run reads the set
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 0xFF
            with open(shard, "r+b") as handle:
                handle.write(data)
        return out

    monkeypatch.setattr(trainer, "train_step", step_then_alter)
    overrides = [o for o in tiny_prepared if not o.startswith("prep.output_dir=")] + [f"prep.output_dir={prepared}"]
    code, printed = cli(["train", *overrides, *RUN, f"train.output_dir={tmp_path / 'run'}"], capfd)
    assert code == 2, printed
    assert f"{shard} was rebuilt or altered while this process was reading the prepared set" in printed
    assert "mixing two caches" in printed and "Traceback" not in printed


def test_a_prepared_set_rebuilt_under_a_reader_is_noticed(tiny_prepared, tmp_path):
    from dpo_zoo.cache.reader import PreparedSet
    from dpo_zoo.errors import CacheError

    prepared = tmp_path / "prepared"
    shutil.copytree(Path(override_value(tiny_prepared, "prep.output_dir")) / "train", prepared)
    opened = PreparedSet.open(prepared)
    opened.rows([0])
    manifest = prepared / "manifest.json"
    temp = prepared / ".manifest.json.new"
    temp.write_bytes(manifest.read_bytes())
    os.replace(temp, manifest)  # a rebuild renames new files over the old ones
    with pytest.raises(CacheError, match="manifest.json was rebuilt or altered"):
        opened.rows([0])


# ==================================================================== out of memory


def test_out_of_memory_in_a_step_names_the_settings_to_lower(tiny_prepared, tmp_path, capfd, monkeypatch):
    import dpo_zoo.train.trainer as trainer

    def allocate_too_much(*args, **kwargs):
        torch.empty(1 << 50, dtype=torch.uint8)  # the allocator's own failure, as a too-large micro-batch gets

    monkeypatch.setattr(trainer, "train_step", allocate_too_much)
    code, printed = cli(["train", *tiny_prepared, *RUN, f"train.output_dir={tmp_path / 'run'}"], capfd)
    assert code == 2, printed
    assert "out of memory in training step 1" in printed and "can't allocate memory" in printed
    assert "lower train.micro_batch_size (now 2" in printed and "train.gradient_checkpointing=true" in printed
    assert "Traceback" not in printed



def test_a_stop_signal_during_a_study_stops_its_run_with_a_checkpoint_and_names_the_study(study_file, tmp_path, capfd,
                                                                                          monkeypatch):
    import dpo_zoo.study.runner as study_module

    signal_at_step(monkeypatch, 0, signal.SIGTERM)
    code, printed = cli(["study", str(study_file), "train.max_steps=3"], capfd)
    assert code == 143, printed
    run = tmp_path / "study" / "runs" / "dpo" / "beta=0.1" / "seed0"
    assert f"saved and verified the checkpoint of step 1 of 3 at {run / 'checkpoints' / 'step-0000001'}" in printed
    assert (f"(the study: 0 of 8 runs finished in {tmp_path / 'study'}, the run in progress is dpo beta=0.1 seed 0)"
            in printed)
    assert "Traceback" not in printed
    assert verify(run / "checkpoints" / "step-0000001")[1] == []

    # Again, stopped (as by a kill) once the first run is done: that run resumed from its checkpoint.
    monkeypatch.undo()
    real_run_one, calls = study_module.run_one, []

    def only_the_first(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real_run_one(*args, **kwargs)

    monkeypatch.setattr(study_module, "run_one", only_the_first)
    with pytest.raises(KeyboardInterrupt):
        study_module.run_study(str(study_file), ["train.max_steps=3"])
    assert json.loads((run / "run.json").read_text())["steps"] == 3
    assert resumed_from(run) == ["step-0000001"]
