"""Options any loss takes (TRL's trainer options): WPO weighting and TR-DPO reference syncing."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dpo_zoo.train import trainer as trainer_module
from dpo_zoo.config import ConfigError, load_config
from dpo_zoo.errors import TrainingError
from dpo_zoo.model.logps import completion_logps
from dpo_zoo.losses import LossConfigError, Need, build_loss, compute_loss
from dpo_zoo.losses.options import soft_update
from dpo_zoo.train.trainer import train

# One pair: chosen tokens [−1, −1], rejected [−2, −3]; reference sums −3 and −4 → ℓ_w = 1, ℓ_l = −1, h = 2.
WPO_TENSORS = dict(
    policy_chosen_token_logps=[[-1.0, -1.0]], policy_rejected_token_logps=[[-2.0, -3.0]],
    chosen_mask=[[1, 1]], rejected_mask=[[1, 1]],
    reference_chosen_logps=[-3.0], reference_rejected_logps=[-4.0],
    policy_chosen_log_sq_mass=[[-2.0, -2.0]], policy_rejected_log_sq_mass=[[-1.0, -1.0]],
)


def test_wpo_weight_by_hand():
    """w(y_w) = exp(mean(−1 − (−2), −1 − (−2))) = e^1; w(y_l) = exp(mean(−2 + 1, −3 + 1)) = e^−1.5;
    weight e^−0.5 = 0.6065307. DPO (β = 0.5): −log σ(1) = 0.3132617 → 0.3132617 · 0.6065307 = 0.1900028."""
    tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in WPO_TENSORS.items()}
    tensors["policy_chosen_token_logps"].requires_grad_(True)
    out = compute_loss("dpo", **tensors, beta=0.5, use_weighting=True)
    plain = -math.log(1 / (1 + math.exp(-1.0)))
    assert out.metrics["wpo_weight"].item() == pytest.approx(math.exp(-0.5), rel=1e-12)
    assert out.losses.item() == pytest.approx(plain * math.exp(-0.5), rel=1e-12)
    # No gradient through the weight: ∂/∂ each chosen token = w · (−β σ(−1)).
    out.losses.sum().backward()
    expected = math.exp(-0.5) * -0.5 / (1 + math.exp(1.0))
    assert tensors["policy_chosen_token_logps"].grad[0].tolist() == pytest.approx([expected, expected], rel=1e-12)


def test_wpo_declares_its_need_and_names_the_missing_tensor():
    assert Need.SQUARED_PROB_MASS in build_loss("dpo", use_weighting=True).requires
    assert Need.SQUARED_PROB_MASS not in build_loss("dpo").requires
    incomplete = {k: v for k, v in WPO_TENSORS.items() if not k.endswith("log_sq_mass")}
    with pytest.raises(Exception, match="policy_chosen_log_sq_mass"):
        compute_loss("dpo", **incomplete, use_weighting=True)


def test_log_sq_mass_is_log_sum_of_squared_probabilities(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[5, 17, 42, 9, 33], [7, 8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    start = torch.tensor([2, 1])
    out = completion_logps(model, ids, mask, start, sq_mass=True)
    with torch.no_grad():
        probs = model(input_ids=ids, attention_mask=mask).logits.double().softmax(-1)
    for row in range(2):
        for j in range(int(out.mask[row].sum())):
            position = int(start[row]) + j - 1
            expected = math.log(float((probs[row, position] ** 2).sum()))
            assert out.log_sq_mass[row, j].item() == pytest.approx(expected, rel=1e-5)
    assert out.log_sq_mass[1, 2:].abs().sum() == 0


def test_soft_update_by_hand():
    policy, reference = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        policy.weight.copy_(torch.tensor([[1.0, 2.0]])), policy.bias.fill_(4.0)
        reference.weight.copy_(torch.tensor([[0.0, -2.0]])), reference.bias.fill_(0.0)
    soft_update(reference, policy, alpha=0.25)  # 0.25·policy + 0.75·reference
    assert reference.weight.tolist() == [[0.25, -1.0]] and reference.bias.tolist() == [1.0]
    assert policy.weight.tolist() == [[1.0, 2.0]]


@pytest.mark.parametrize("hparams, message", [
    ({"ref_model_mixup_alpha": 1.5}, r"ref_model_mixup_alpha must be in \[0, 1\]"),
    ({"ref_model_sync_steps": 0}, "ref_model_sync_steps must be an integer >= 1"),
    ({"use_weighting": "yes"}, "`use_weighting`: expected a boolean"),
])
def test_bad_options_are_named(hparams, message):
    with pytest.raises(LossConfigError, match=message):
        build_loss("dpo", **hparams)


def test_options_in_config_plain_and_mixture():
    cfg = load_config([], ["loss=dpo+hinge", "loss.sync_ref_model=true", "loss.ref_model_sync_steps=3"])
    assert cfg.loss.sync_ref_model is True and "dpo.sync_ref_model" not in cfg.loss
    from dpo_zoo.config import loss_hparams

    name, hparams = loss_hparams(cfg)
    loss = build_loss(name, **hparams)
    assert loss.reference_sync.every == 3 and loss.reference_sync.alpha == 0.6
    assert "use_weighting" not in load_config([], ["loss=dpo"]).loss  # listed only when set
    with pytest.raises(ConfigError, match="ref_model_mixup_alpha"):
        load_config([], ["loss=dpo", "loss.ref_model_mixup_alpha=2.0"])


# ==================================================================== training


@pytest.fixture
def syncs(monkeypatch):
    """Every reference update of a run: (reference before, policy, reference after) as state dicts."""
    seen = []

    def watched(reference, policy, alpha):
        before = {k: v.detach().clone() for k, v in reference.state_dict().items()}
        soft_update(reference, policy, alpha)
        seen.append((before, {k: v.detach().clone() for k, v in policy.state_dict().items()},
                     {k: v.detach().clone() for k, v in reference.state_dict().items()}))

    monkeypatch.setattr(trainer_module, "soft_update", watched)
    return seen


SYNC = ["loss=dpo", "loss.sync_ref_model=true", "loss.ref_model_mixup_alpha=0.5", "loss.ref_model_sync_steps=2",
        "train.max_steps=4", "train.learning_rate=1e-2"]


def test_the_reference_moves_as_specified_every_n_steps(syncs, tiny_prepared, tiny_model_dir, tmp_path):
    train(load_config([], [*tiny_prepared, *SYNC, f"train.output_dir={tmp_path / 'tr'}"]))
    assert len(syncs) == 2  # after steps 2 and 4 of 4
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    first_before, _, first_after = syncs[0]
    for key in initial:  # before the first update the reference is the starting model
        torch.testing.assert_close(first_before[key], initial[key], rtol=0, atol=0)
    for before, policy, after in syncs:
        for key in after:
            torch.testing.assert_close(after[key], 0.5 * policy[key] + 0.5 * before[key], rtol=1e-6, atol=1e-7)
        assert any(not torch.equal(after[k], before[k]) for k in after)
    for key in first_after:  # the second update starts from the first one's result
        torch.testing.assert_close(syncs[1][0][key], first_after[key], rtol=0, atol=0)
    record = json.loads((tmp_path / "tr" / "run.json").read_text())
    assert record["reference"] == "live"


def test_sync_refuses_the_cache_and_lora(tiny_prepared, tmp_path):
    with pytest.raises(TrainingError, match="sync_ref_model.*train.reference=live"):
        train(load_config([], [*tiny_prepared, *SYNC, "train.reference=cache", f"train.output_dir={tmp_path / 'a'}"]))
    with pytest.raises(TrainingError, match="LoRA"):
        train(load_config([], [*tiny_prepared, *SYNC, "train.lora.enabled=true", f"train.output_dir={tmp_path / 'b'}"]))


def test_a_resumed_sync_run_continues_from_the_saved_reference(tiny_prepared, tmp_path, monkeypatch):
    """Checkpoint at step 3 (the reference has moved once, at step 2), fail at step 4, resume: the weights
    equal those of an uninterrupted run, which needs the moved reference back from the checkpoint."""
    settings = [*tiny_prepared, *SYNC, "train.save_every=3"]
    whole = train(load_config([], [*settings, f"train.output_dir={tmp_path / 'whole'}"]))
    from dpo_zoo.losses import dpo as dpo_module

    real_forward, calls = dpo_module.DPOLoss.forward, []

    def failing(self, batch):
        calls.append(1)
        if len(calls) > 3 * 1:  # one micro-batch per step: fail in step 4, after the step-3 checkpoint
            raise RuntimeError("interrupted")
        return real_forward(self, batch)

    monkeypatch.setattr(dpo_module.DPOLoss, "forward", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        train(load_config([], [*settings, f"train.output_dir={tmp_path / 'cut'}"]))
    monkeypatch.setattr(dpo_module.DPOLoss, "forward", real_forward)
    resumed = train(load_config([], [*settings, f"train.output_dir={tmp_path / 'cut'}"]))
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_a_wpo_run_trains_logs_its_weights_and_compares_from_the_cache(tiny_prepared, tmp_path):
    from dpo_zoo.compare.runner import run_compare

    out = tmp_path / "wpo"
    train(load_config([], [*tiny_prepared, "loss=dpo", "loss.use_weighting=true", f"train.output_dir={out}"]))
    steps = [r for r in map(json.loads, open(out / "logs.jsonl")) if "loss" in r]
    # Weights are products of two exp(mean log-ratio to the policy's own Σπ²): positive, and well
    # below 1 for a random tiny model whose probability is spread over its vocabulary.
    assert steps and all(0 < r["loss/wpo_weight"] < 1 for r in steps)
    heldout = [o.split("=", 1)[1] for o in tiny_prepared if o.startswith("prep.output_dir=")][0]
    cfg = load_config([], [*tiny_prepared, "compare.kl_samples=0"])
    summary = run_compare(cfg, runs=[str(out)], data=heldout, output_dir=str(tmp_path / "cmp"))
    (entry,) = summary["entries"]
    assert entry["reference"] == "cache" and math.isfinite(entry["metrics"]["loss"])


def test_sync_under_zero3_equals_zero0(tiny_prepared, tmp_path):
    """ZeRO-3 partitions the policy's parameters; the soft update gathers them first, so the run (whose
    later losses depend on the moved reference) gives the weights of an unpartitioned one."""
    finals = {stage: train(load_config([], [*tiny_prepared, *SYNC, "train.learning_rate=1e-3",
                                             f"train.deepspeed.zero_stage={stage}", f"train.output_dir={tmp_path / str(stage)}"]))
              for stage in (0, 3)}
    a, b = load_file(str(finals[0] / "model.safetensors")), load_file(str(finals[3] / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
