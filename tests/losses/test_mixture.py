"""Loss mixtures (``loss=dpo+hinge``): weighted per-pair sums, per-part hyperparameters, needs that add
up, each part's loss in the metrics; values worked out by hand."""

import math

import pytest
import torch

from dpo_zoo.config import ConfigError, load_config, loss_hparams
from dpo_zoo.losses import LossConfigError, Need, build_loss, compute_loss, get_loss_entry

# Pair 1: ℓ_w = −10 − (−12) = 2, ℓ_l = −15 − (−14) = −1, h = 3.  Pair 2: ℓ_w = ℓ_l = 0, h = 0.
def prefixed(name, **changes):
    """``{name.key: value}`` for every hyperparameter of registered loss ``name`` (defaults, then ``changes``)."""
    return {f"{name}.{k}": v for k, v in {**get_loss_entry(name).defaults(), **changes}.items()}


TENSORS = dict(
    policy_chosen_logps=[-10.0, -10.0], policy_rejected_logps=[-15.0, -15.0],
    reference_chosen_logps=[-12.0, -10.0], reference_rejected_logps=[-14.0, -15.0],
)
SIGMOID_MINUS_1_5 = 0.18242552380635635  # σ(−1.5)


def tensors(requires_grad=False):
    out = {k: torch.tensor(v, dtype=torch.float64) for k, v in TENSORS.items()}
    for key in ("policy_chosen_logps", "policy_rejected_logps"):
        out[key].requires_grad_(requires_grad)
    return out


def test_weighted_sum_of_parts_by_hand():
    """β = 0.5 shared, hinge's own β = 0.2, weights [1, 0.2].
    Pair 1: DPO −log σ(0.5·3) = 0.2014133; hinge max(0, 1 − 0.2·3) = 0.4 → 0.2014133 + 0.2·0.4 = 0.2814133.
    Pair 2: DPO −log σ(0) = log 2 = 0.6931472; hinge max(0, 1 − 0) = 1 → 0.6931472 + 0.2 = 0.8931472."""
    out = compute_loss("dpo+hinge", **tensors(), beta=0.5, **{"hinge.beta": 0.2, "weights": [1.0, 0.2]})
    assert out.losses.tolist() == pytest.approx([0.2014132779827524 + 0.08, math.log(2) + 0.2], rel=1e-12)
    assert out.metrics["loss/dpo"].tolist() == pytest.approx([0.2014132779827524, math.log(2)], rel=1e-12)
    assert out.metrics["loss/hinge"].tolist() == pytest.approx([0.4, 1.0], rel=1e-12)
    # Rewards and win_prob are the first part's: β ℓ with DPO's β = 0.5.
    assert out.chosen_rewards.tolist() == pytest.approx([1.0, 0.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.5, 0.0])
    assert out.metrics["win_prob"].tolist() == pytest.approx([1 - SIGMOID_MINUS_1_5, 0.5])
    assert out.metrics["hinge/win_prob"].tolist() == pytest.approx([torch.sigmoid(torch.tensor(0.2 * 2 + 0.2)).item(),
                                                                    0.5])


def test_gradient_is_the_weighted_sum_of_the_parts_gradients():
    """Pair 1, ∂/∂log π(y_w): DPO −β σ(−βh) = −0.5·σ(−1.5) = −0.0912128; hinge (active) −β = −0.2, times
    the weight 0.2 → −0.04. Sum −0.1312128."""
    leaves = tensors(requires_grad=True)
    compute_loss("dpo+hinge", **leaves, beta=0.5, **{"hinge.beta": 0.2, "weights": [1.0, 0.2]}).losses.sum().backward()
    assert leaves["policy_chosen_logps"].grad[0].item() == pytest.approx(-0.5 * SIGMOID_MINUS_1_5 - 0.04, rel=1e-12)
    assert leaves["policy_rejected_logps"].grad[0].item() == pytest.approx(0.5 * SIGMOID_MINUS_1_5 + 0.04, rel=1e-12)


def test_a_mixture_of_one_weighted_part_is_that_part_scaled():
    plain = compute_loss("dpo", **tensors(), beta=0.5).losses
    mixed = compute_loss("dpo+hinge", **tensors(), **{"dpo.beta": 0.5, "weights": [3.0, 0.0]}).losses
    assert mixed.tolist() == pytest.approx((3 * plain).tolist(), rel=1e-12)


def test_needs_add_up():
    loss = build_loss("dpo+sampo+tie_dpo")
    assert loss.requires == {Need.SEQUENCE_LOGPS, Need.TOKEN_LOGPS, Need.GENERATOR, Need.TIES}
    assert loss.needs_reference
    # A part that needs the whole reference distribution makes the mixture need it too.
    assert not build_loss("dpo+ra_dpo_official").accepts_topk_reference
    assert build_loss("dpo+ra_dpo").accepts_topk_reference
    assert [name for name, _ in loss.components()] == ["dpo", "sampo", "tie_dpo"]
    # Reference-free only when every part is: SimPO + SFT reads no reference, DPO + SFT does.
    assert not build_loss("simpo+sft").needs_reference and build_loss("dpo+sft").needs_reference
    assert build_loss("simpo+sft").needed_fields() and not any(
        f.startswith("reference_") for f in build_loss("simpo+sft").needed_fields())


def test_defaults_and_parts_of_the_entry():
    entry = get_loss_entry("dpo+hinge")
    assert entry.defaults() == {"weights": [1.0, 1.0], **prefixed("dpo"), **prefixed("hinge")}
    assert entry.defaults()["dpo.beta"] == 0.1 and entry.defaults()["hinge.beta"] == 0.1
    assert entry.components({"beta": 0.3, "hinge.beta": 0.2}) == [("dpo", {"beta": 0.3}), ("hinge", {"beta": 0.2})]


@pytest.mark.parametrize("hparams, message", [
    ({"gamma": 1.0}, "unknown hyperparameter"),
    ({"weights": [1.0]}, "list of 2 finite numbers"),
    ({"weights": [1.0, float("nan")]}, "list of 2 finite numbers"),
    ({"hinge.beta": -1.0}, "beta must be > 0"),
])
def test_bad_hyperparameters_are_named(hparams, message):
    with pytest.raises(LossConfigError, match=message):
        build_loss("dpo+hinge", **hparams)


@pytest.mark.parametrize("name, message", [("dpo+dpo", "appears twice"), ("dpo+", "empty part"), ("dpo+nope", "unknown loss 'nope'")])
def test_bad_mixture_names(name, message):
    with pytest.raises(LossConfigError, match=message):
        get_loss_entry(name)


def test_config_per_part_shared_and_list_forms(tmp_path):
    cfg = load_config([], ["loss=dpo+hinge", "loss.weights=[1.0, 0.2]", "loss.beta=0.5", "loss.hinge.beta=0.2"])
    name, hparams = loss_hparams(cfg)
    assert name == "dpo+hinge"
    assert hparams == {"weights": [1.0, 0.2], **prefixed("dpo", beta=0.5), **prefixed("hinge", beta=0.2)}
    # TRL's list form, and parts' keys as nested mappings, in a YAML file.
    path = tmp_path / "mix.yaml"
    path.write_text("loss:\n  name: [dpo, hinge]\n  weights: [1.0, 0.2]\n  beta: 0.5\n  hinge:\n    beta: 0.2\n")
    assert loss_hparams(load_config([path])) == (name, hparams)
    # The resolved config reads back to the same loss.
    from dpo_zoo.config import save_resolved

    save_resolved(cfg, tmp_path / "resolved.yaml")
    assert loss_hparams(load_config([tmp_path / "resolved.yaml"])) == (name, hparams)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError) as info:
        load_config([], ["loss=dpo+hinge", "loss.hinge.beta=abc", "loss.gamma=1"])
    message = str(info.value)
    assert "`loss.hinge.beta`: expected a number" in message and "`loss.gamma`: unknown hyperparameter" in message
