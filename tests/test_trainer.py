"""The trainer: every registered loss trains from the cache; the invariances users rely on hold.

All runs use the tiny random Llama and a prepared slice of the real HH-RLHF data (conftest), in fp32
on the CPU, so equalities are exact up to float reassociation: runs that split or batch the work
otherwise (micro-batches, cached against live reference, ZeRO stages) are compared to 1e-6 and marked
float_sensitive; a resumed run replays the same batches and is compared as closely.
"""

import json
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_zoo.config import load_config
from dpo_zoo.errors import TrainingError
from dpo_zoo.losses import registered_losses
from dpo_zoo.train.trainer import train

REPO = Path(__file__).resolve().parents[1]


# Invariance tests compare weights after Adam steps. Adam divides by √v, so a float32 difference of
# 1e-7 in a near-zero gradient (e.g. from summing in another order) moves a weight by up to ~lr·0.1;
# at this learning rate that stays below the 1e-6 tolerance while every step still changes weights.
# Measured with 1 and 2 threads: the largest weight difference is 4.5e-8, step losses agree to ~1e-7.
INVARIANCE_LR = "train.learning_rate=1e-5"


def run_training(overrides, out_dir, *extra):
    cfg = load_config([], list(overrides) + [f"train.output_dir={out_dir}", *extra])
    return train(cfg)


def weights(final_dir) -> dict:
    return load_file(str(Path(final_dir) / "model.safetensors"))


def initial_weights(tiny_model_dir) -> dict:
    return load_file(str(Path(tiny_model_dir) / "model.safetensors"))


def step_losses(out_dir):
    records = [json.loads(line) for line in open(Path(out_dir) / "logs.jsonl")]
    return [r["loss"] for r in records if "loss" in r]


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def needs_signature(name: str) -> tuple:
    """What the trainer does differently from one loss to another: the inputs it must build (the
    declared needs), whether a reference is read, and whether the cache's top-k can stand in for it."""
    from dpo_zoo.losses import build_loss

    loss = build_loss(name)
    return (tuple(sorted(map(str, loss.requires))), tuple(sorted(map(str, loss.optional))),
            loss.needs_reference, loss.accepts_topk_reference)


def one_loss_per_needs_set() -> list:
    """The first registered name (alphabetically) of each distinct :func:`needs_signature`: a new loss
    with a new set of needs is trained here automatically; the loss contract tests
    (tests/losses/test_contract.py) cover every name's values and gradients."""
    chosen = {}
    for name in sorted(registered_losses()):
        chosen.setdefault(needs_signature(name), name)
    return sorted(chosen.values())


def assert_trains_every_parameter(name, tiny_prepared, tiny_model_dir, out_dir):
    final = run_training(tiny_prepared, out_dir, f"loss={name}")
    before, after = initial_weights(tiny_model_dir), weights(final)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"{name}: parameters not updated: {unchanged}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(registered_losses()) - set(one_loss_per_needs_set())))
def test_every_other_registered_name_trains_every_parameter(name, tiny_prepared, tiny_model_dir, tmp_path):
    """The rest of the registry, name by name, in the slow suite (CI runs it): the trainer treats these
    exactly like the name of their needs set trained below, so the fast suite trains one per set."""
    assert_trains_every_parameter(name, tiny_prepared, tiny_model_dir, tmp_path / name)


@pytest.mark.parametrize("name", one_loss_per_needs_set())
def test_every_set_of_needs_trains_every_parameter(name, tiny_prepared, tiny_model_dir, tmp_path):
    assert_trains_every_parameter(name, tiny_prepared, tiny_model_dir, tmp_path / name)
    records = [json.loads(line) for line in open(tmp_path / name / "logs.jsonl")]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "grad_norm", "learning_rate"):
        assert key in steps[0], key
    assert any(k.startswith("eval_") for r in records for k in r)
    # Every logged metric is in the glossary (docs/metrics.md), or is one of the loss's own, namespaced.
    from dpo_zoo.docs import TRAINING_METRICS

    shared_prefixes = ("rewards/", "logps/", "logits/", "len/")
    for record in steps:
        for key in record:
            if key in ("step",) or key in TRAINING_METRICS:
                continue
            assert "/" in key and not key.startswith(shared_prefixes), f"{name}: undocumented metric {key}"
    run = json.loads((tmp_path / name / "run.json").read_text())
    assert run["loss"] == name and run["cache_key"]["tokenizer"]


@pytest.mark.float_sensitive
@pytest.mark.parametrize("name", ["dpo", "sampo", "is_daa"])
def test_cached_reference_equals_live_reference(name, tiny_prepared, tmp_path):
    cached = run_training(tiny_prepared, tmp_path / "cache", f"loss={name}", "train.reference=cache", INVARIANCE_LR)
    live = run_training(tiny_prepared, tmp_path / "live", f"loss={name}", "train.reference=live", INVARIANCE_LR)
    assert step_losses(tmp_path / "cache") == pytest.approx(step_losses(tmp_path / "live"), abs=1e-6)
    assert_same_weights(weights(cached), weights(live), atol=1e-6)


@pytest.mark.float_sensitive
def test_batch_8x1_equals_batch_1x8(tiny_prepared, tmp_path):
    a = run_training(tiny_prepared, tmp_path / "a", "train.micro_batch_size=8", "train.gradient_accumulation_steps=1", INVARIANCE_LR)
    b = run_training(tiny_prepared, tmp_path / "b", "train.micro_batch_size=1", "train.gradient_accumulation_steps=8", INVARIANCE_LR)
    assert step_losses(tmp_path / "a") == pytest.approx(step_losses(tmp_path / "b"), abs=1e-6)
    assert_same_weights(weights(a), weights(b), atol=1e-6)


@pytest.mark.float_sensitive
def test_zero_stages_agree(tiny_prepared, tmp_path):
    finals = {
        stage: run_training(tiny_prepared, tmp_path / f"z{stage}", f"train.deepspeed.zero_stage={stage}", "loss=sampo", INVARIANCE_LR)
        for stage in (0, 1, 2, 3)
    }
    reference_losses = step_losses(tmp_path / "z0")
    reference_weights = weights(finals[0])
    for stage in (1, 2, 3):
        assert step_losses(tmp_path / f"z{stage}") == pytest.approx(reference_losses, abs=1e-6), stage
        assert_same_weights(weights(finals[stage]), reference_weights, atol=1e-6)


@pytest.mark.float_sensitive
def test_lora_trains_adapter_only_and_saves_it(tiny_prepared, tmp_path):
    final = run_training(
        tiny_prepared, tmp_path / "lora", "train.lora.enabled=true", "train.lora.r=4", "train.reference=live",
        "train.max_steps=3",
    )
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    assert not (final / "model.safetensors").exists()
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    losses = step_losses(tmp_path / "lora")
    # At step 1 the adapter's B matrices are 0: policy = reference, so the DPO loss is exactly log 2.
    assert losses[0] == pytest.approx(0.6931471805599453, abs=1e-6)


def files_of(folder: Path) -> dict:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_finished_run_is_reused_not_retrained(tiny_prepared, tmp_path, monkeypatch):
    environment = dict(os.environ)
    final = run_training(tiny_prepared, tmp_path / "r")
    assert dict(os.environ) == environment  # the one-process group's launcher variables are not left behind
    stamp = (final / "model.safetensors").stat().st_mtime_ns

    # Reuse is decided before any process group or DeepSpeed engine starts (a second `make demo` is fast).
    import dpo_zoo.train.trainer as trainer_module

    def no_start(*args, **kwargs):
        raise AssertionError("a reused run started a process group")

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "init_distributed", no_start)
        assert run_training(tiny_prepared, tmp_path / "r") == final
    assert (final / "model.safetensors").stat().st_mtime_ns == stamp
    run_training(tiny_prepared, tmp_path / "r", "train.overwrite=true")
    assert (final / "model.safetensors").stat().st_mtime_ns != stamp


def test_finished_run_with_other_settings_is_refused_not_silently_replaced(tiny_prepared, tmp_path):
    out = tmp_path / "r"
    run_training(tiny_prepared, out, "train.max_steps=2")
    finished = files_of(out)
    # How a run is watched does not matter: it is still the same run.
    run_training(tiny_prepared, out, "train.max_steps=2", "train.log_every=2", "train.progress=false")
    assert files_of(out) == finished
    with pytest.raises(TrainingError, match=r"different train\.learning_rate; set train\.overwrite=true"):
        run_training(tiny_prepared, out, "train.max_steps=2", "train.learning_rate=0.5")
    # Refused before anything is written: config.yaml, logs, TensorBoard files all as the finished run left them.
    assert files_of(out) == finished


def test_epochs_set_the_schedule_horizon(tiny_prepared, tmp_path):
    """train.epochs=1 over T steps with a linear schedule (no warm-up): the rate of step k is
    peak·(T − k)/T, so it reaches 0 at the end of the last step, whatever train.max_steps says."""
    from dpo_zoo.cache.reader import PreparedSet

    prepared = Path([o.split("=", 1)[1] for o in tiny_prepared if o.startswith("prep.output_dir=")][0])
    n_pairs = len(PreparedSet.open(prepared / "train", verify=False))
    batch, peak = 8, 1e-3
    steps = -(-n_pairs // batch)
    run_training(tiny_prepared, tmp_path / "e", "train.epochs=1", f"train.micro_batch_size={batch}", "train.max_steps=100",
                 "train.lr_schedule=linear", "train.warmup_steps=0", f"train.learning_rate={peak}")
    records = [json.loads(line) for line in open(tmp_path / "e" / "logs.jsonl")]
    rates = [r["learning_rate"] for r in records if "loss" in r and "learning_rate" in r]
    assert len(rates) == steps > 2
    assert rates == pytest.approx([peak * (steps - k) / steps for k in range(steps)], rel=1e-6)


def test_checkpoint_of_other_settings_is_not_resumed_and_overwrite_starts_over(tiny_prepared, tmp_path):
    out = tmp_path / "r"
    common = ["train.save_every=1", "train.max_steps=3"]
    run_training(tiny_prepared, out, *common)
    shutil.rmtree(out / "final")  # as if killed after its last checkpoint
    (out / "run.json").unlink()
    with pytest.raises(TrainingError, match=r"checkpoint .* different loss\.beta, train\.max_steps"):
        run_training(tiny_prepared, out, "train.save_every=1", "train.max_steps=4", "loss.beta=0.5")
    run_training(tiny_prepared, out, "train.save_every=1", "train.max_steps=4", "loss.beta=0.5", "train.overwrite=true")
    events = [json.loads(line) for line in open(out / "logs.jsonl")]
    assert not any(r.get("event") == "resume" for r in events)
    starts = [r for r in events if r.get("event") == "start"]
    assert starts[-1]["step"] == 0  # trained from the start, not from the old checkpoint
    assert [r["step"] for r in events if "loss" in r][-4:] == [1, 2, 3, 4]


@pytest.mark.slow
def test_resume_after_kill_gives_the_same_weights(tiny_prepared, tmp_path):
    """A run killed (SIGKILL) after its second checkpoint and started again ends with the weights of an
    uninterrupted run, to 1e-6."""
    common = ["train.max_steps=5", "train.save_every=1", "loss=sampo", "train.warmup_steps=2", "train.lr_schedule=cosine"]
    uninterrupted = run_training(tiny_prepared, tmp_path / "full", *common)

    out = tmp_path / "killed"
    args = [sys.executable, "-m", "dpo_zoo.cli", "train", *tiny_prepared, f"train.output_dir={out}", *common]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    log_file = open(tmp_path / "killed.log", "w")
    process = subprocess.Popen(args, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-0000002").exists():
        assert process.poll() is None, "the run ended before it could be killed:\n" + (tmp_path / "killed.log").read_text()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "final").exists()

    resumed = run_training(tiny_prepared, out, *common)
    log = [json.loads(line) for line in open(out / "logs.jsonl")]
    assert any(r.get("event") == "resume" for r in log)
    assert_same_weights(weights(resumed), weights(uninterrupted), atol=1e-6)


def test_non_finite_loss_is_caught_with_step_and_batch(tiny_prepared, tmp_path, monkeypatch):
    from dpo_zoo.losses import dpo as dpo_module

    original = dpo_module.DPOLoss.forward
    calls = {"n": 0}

    def poisoned(self, batch):
        out = original(self, batch)
        calls["n"] += 1
        if calls["n"] == 2:  # the second micro-batch: step 1
            out.losses = out.losses + float("nan")
        return out

    monkeypatch.setattr(dpo_module.DPOLoss, "forward", poisoned)
    with pytest.raises(TrainingError) as info:
        run_training(tiny_prepared, tmp_path / "nan", "train.max_steps=3")
    message = str(info.value)
    assert "non-finite loss" in message and "at step 1" in message and "pair ids" in message


def test_preflight_refuses_a_loss_the_cache_cannot_serve(tiny_model_dir, tmp_path):
    from tiny import tiny_overrides, write_hh_slice
    from dpo_zoo.cache.prep import run_prep

    data = write_hh_slice(tmp_path / "hh.jsonl", 12)
    overrides = tiny_overrides(tiny_model_dir, data, tmp_path / "prepared", **{"prep.topk": 0})
    run_prep(load_config([], overrides))
    with pytest.raises(TrainingError, match="vocab_logps.*prep.topk"):
        run_training(overrides, tmp_path / "ra", "loss=ra_dpo", "train.reference=cache")


def test_preflight_refuses_a_cache_of_another_tokenizer(tiny_prepared, tmp_path):
    import sys as _sys

    _sys.path.insert(0, str(REPO / "tests"))
    from tiny import make_tokenizer
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other-model"
    model = AutoModelForCausalLM.from_pretrained([o.split("=", 1)[1] for o in tiny_prepared if o.startswith("model.name_or_path=")][0])
    model.save_pretrained(other, safe_serialization=True)
    make_tokenizer(vocab_size=300).save_pretrained(other)
    with pytest.raises(TrainingError, match="another tokenizer"):
        run_training(tiny_prepared, tmp_path / "x", f"model.name_or_path={other}")


def test_grad_norm_is_the_l2_norm_over_every_gradient():
    """The logged pre-clipping norm: √(Σ g²) over all parameters, parameters without a gradient skipped."""
    from types import SimpleNamespace

    from dpo_zoo.train.trainer import _grad_norm

    module = torch.nn.Linear(3, 2)
    module.weight.grad = torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    module.bias.grad = torch.tensor([12.0, 0.0])
    assert _grad_norm(SimpleNamespace(module=module)) == pytest.approx(13.0, rel=1e-7)  # √(9 + 16 + 144)
    module.bias.grad = None
    assert _grad_norm(SimpleNamespace(module=module)) == pytest.approx(5.0, rel=1e-7)
    module.weight.grad = None
    assert _grad_norm(SimpleNamespace(module=module)) == 0.0


def test_bf16_trains_under_autocast_with_fp32_weights_and_fp32_like_losses(tiny_prepared, tiny_model_dir, tmp_path,
                                                                           monkeypatch):
    """train.precision=bfloat16 (ZeRO 0-2): the module keeps fp32 weights (the optimizer updates fp32
    masters), the matrix products run in bf16, and the step losses follow the fp32 run's within bf16
    rounding (8 significant bits: a loss near ln 2 moves by ~1e-2 at most over these steps)."""
    import dpo_zoo.model.logps as logps_module

    seen = []
    original = logps_module._ChunkTokenLogps.forward

    def spy(ctx, hidden, weight, *args):
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(ctx, hidden, weight, *args)

    monkeypatch.setattr(logps_module._ChunkTokenLogps, "forward", staticmethod(spy))
    fp32 = run_training(tiny_prepared, tmp_path / "fp32", "train.precision=float32")
    assert not any(seen)
    seen.clear()
    bf16 = run_training(tiny_prepared, tmp_path / "bf16", "train.precision=bfloat16")
    assert seen and all(seen)  # the head's products ran under bf16 autocast
    assert all(w.dtype == torch.float32 for w in weights(bf16).values())
    a, b = step_losses(tmp_path / "fp32"), step_losses(tmp_path / "bf16")
    assert len(a) == len(b) and a[0] == pytest.approx(b[0], abs=2e-2)
    assert max(abs(x - y) for x, y in zip(a, b)) < 5e-2
    # The total weight move is within 10% of fp32's.
    start, w32, w16 = initial_weights(tiny_model_dir), weights(fp32), weights(bf16)
    move32 = sum(float((w32[k] - start[k]).float().norm() ** 2) for k in start) ** 0.5
    move16 = sum(float((w16[k] - start[k]).float().norm() ** 2) for k in start) ** 0.5
    assert move16 == pytest.approx(move32, rel=0.1)
