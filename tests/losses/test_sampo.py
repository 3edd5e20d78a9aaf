"""SamPO (Eq. 10), its official independent-subset form and DPO-SANorm (Eq. 9) (spec §4)."""

import math
import time

import pytest
import torch

from dpo_zoo.losses import LossConfigError, LossInputError, PairBatch, build_loss, check_inputs, compute_loss
from dpo_zoo.losses.base import Need
from dpo_zoo.losses.sampo import sample_positions

LOG2 = math.log(2.0)


def token_batch(chosen_lengths, rejected_lengths, T=None, dtype=torch.float64, seed=0, pad_value=0.0):
    """Random per-token log-probs for B pairs; response tokens right-padded to length T."""
    g = torch.Generator().manual_seed(1000 + seed)
    T = T or max(max(chosen_lengths), max(rejected_lengths), 1)
    out = {}
    for side, lengths in (("chosen", chosen_lengths), ("rejected", rejected_lengths)):
        mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
        out[f"{side}_mask"] = mask
        for model in ("policy", "reference"):
            values = -3.0 * torch.rand(len(lengths), T, generator=g, dtype=torch.float64)
            out[f"{model}_{side}_token_logps"] = values.masked_fill(~mask, pad_value).to(dtype)
    return out


def naive_sampo(tensors, selections, beta):
    """Per-pair Python loop: r(y) = β (Σ_{t∈S} log π_θ − Σ_{t∈S'} log π_ref), L = −log σ(r_w − r_l)."""
    losses = []
    for b in range(tensors["chosen_mask"].shape[0]):
        rewards = {}
        for side in ("chosen", "rejected"):
            policy_sum = sum(
                float(tensors[f"policy_{side}_token_logps"][b, t])
                for t in range(tensors[f"{side}_mask"].shape[1])
                if selections["policy", side][b, t]
            )
            reference_sum = sum(
                float(tensors[f"reference_{side}_token_logps"][b, t])
                for t in range(tensors[f"{side}_mask"].shape[1])
                if selections["reference", side][b, t]
            )
            rewards[side] = beta * (policy_sum - reference_sum)
        margin = rewards["chosen"] - rewards["rejected"]
        losses.append(math.log1p(math.exp(-margin)))
    return torch.tensor(losses, dtype=torch.float64)


# ------------------------------------------------------------------ the registry and the declared needs


def test_registered_names_and_presets():
    assert build_loss("sampo").config.share_indices is True
    assert build_loss("sampo_official").config.share_indices is False
    assert build_loss("sampo").config.beta == 0.1
    assert build_loss("dpo_sanorm").config.beta == 0.1
    assert Need.GENERATOR in build_loss("sampo").requires
    assert Need.GENERATOR not in build_loss("dpo_sanorm").requires
    with pytest.raises(LossConfigError, match="beta"):
        build_loss("sampo", beta=0.0)
    with pytest.raises(LossConfigError, match="share_indices"):
        build_loss("sampo", share_indices="yes")


def test_sampo_without_generator_or_seed_is_a_clear_input_error():
    tensors = token_batch([2], [3])
    loss = build_loss("sampo")
    with pytest.raises(LossInputError, match="generator.*seed"):
        check_inputs(loss, PairBatch(**tensors))
    with pytest.raises(LossInputError, match="generator.*seed"):
        loss(PairBatch(**tensors))
    # The averaging variant draws nothing and runs without one.
    assert torch.isfinite(compute_loss("dpo_sanorm", **tensors).losses).all()


def test_mismatched_mask_shape_is_named():
    tensors = token_batch([2], [3], T=4)
    tensors["chosen_mask"] = tensors["chosen_mask"][:, :3]
    with pytest.raises(LossInputError, match="chosen_mask"):
        compute_loss("sampo", **tensors, seed=0)


# ------------------------------------------------------------------ reductions to DPO and the empty case


@pytest.mark.parametrize("name", ["sampo", "sampo_official", "dpo_sanorm"])
@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
def test_equal_lengths_give_exactly_dpo(name, seed):
    """T_w = T_l per pair → every token is kept (T_m = T_long), so r(y) = β ℓ_θ(y) as in DPO."""
    tensors = token_batch([3, 5, 1, 6], [3, 5, 1, 6], T=7, seed=seed)
    dpo = compute_loss("dpo", **tensors, beta=0.3)
    out = compute_loss(name, **tensors, beta=0.3, seed=seed)
    torch.testing.assert_close(out.losses, dpo.losses, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(out.chosen_rewards, dpo.chosen_rewards, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(out.rejected_rewards, dpo.rejected_rewards, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("name", ["sampo", "sampo_official"])
def test_empty_response_gives_log_two(name):
    """T_w = 0 → T_m = 0 → no token on either side is summed → r_w = r_l = 0 → L = log 2, no gradient."""
    tensors = token_batch([0, 4], [5, 0], T=5)
    tensors["policy_chosen_token_logps"].requires_grad_(True)
    out = compute_loss(name, **tensors, seed=3)
    torch.testing.assert_close(out.losses, torch.full((2,), LOG2, dtype=torch.float64))
    assert out.chosen_rewards.abs().max() == 0 and out.rejected_rewards.abs().max() == 0
    assert out.metrics["sampo/num_sampled"].tolist() == [0.0, 0.0]
    out.losses.sum().backward()
    assert tensors["policy_chosen_token_logps"].grad.abs().max() == 0


def test_dpo_sanorm_hand_value():
    """β = 0.5. Chosen: T_w = 2, log-ratios (−1 + 1.5) + (−2 + 2.5) = 1.0. Rejected: T_l = 4, log-ratios
    4 × (−1 + 0.5) = −2.0. Mean length (2 + 4)/2 = 3.
    r_w = 0.5 × 3 × (1/2) × 1.0 = 0.75;  r_l = 0.5 × 3 × (1/4) × (−2.0) = −0.75;  margin 1.5.
    L = log(1 + e^{−1.5}) = 0.2014132779827524. (Plain DPO: margin 0.5 × 3.0 = 1.5 as well here, so
    the second pair checks a case where they differ.)
    Pair 2: chosen T_w = 1 with log-ratio 2.0, rejected T_l = 3 with log-ratios 3 × 0.5 = 1.5; mean
    length 2. r_w = 0.5 × 2 × 2.0 = 2.0; r_l = 0.5 × 2 × (1.5/3) = 0.5; margin 1.5 again, whereas DPO's
    is 0.5 × (2.0 − 1.5) = 0.25."""
    ninf = float("-inf")  # padding may hold anything; it must never reach the sums
    tensors = dict(
        policy_chosen_token_logps=torch.tensor([[-1.0, -2.0, ninf, ninf], [-1.0, ninf, ninf, ninf]], dtype=torch.float64),
        reference_chosen_token_logps=torch.tensor([[-1.5, -2.5, 0.0, 0.0], [-3.0, 0.0, 0.0, 0.0]], dtype=torch.float64),
        chosen_mask=torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]),
        policy_rejected_token_logps=torch.tensor([[-1.0] * 4, [-1.0, -1.0, -1.0, ninf]], dtype=torch.float64),
        reference_rejected_token_logps=torch.tensor([[-0.5] * 4, [-1.5, -1.5, -1.5, 0.0]], dtype=torch.float64),
        rejected_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
    )
    out = compute_loss("dpo_sanorm", **tensors, beta=0.5)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.75, 2.0], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.75, 0.5], dtype=torch.float64))
    torch.testing.assert_close(out.losses, torch.full((2,), 0.2014132779827524, dtype=torch.float64))
    torch.testing.assert_close(out.metrics["win_prob"], torch.exp(-out.losses))


def test_dpo_sanorm_one_empty_response():
    """T_w = 0, T_l = 2 with log-ratios 0.5 + 0.5: r_w = 0 (empty sum), r_l = 0.1 × 1 × (1.0/2) = 0.05;
    L = log(1 + e^{0.05}) = 0.7184596480132863."""
    tensors = token_batch([0], [2], T=2)
    tensors["policy_rejected_token_logps"] = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    tensors["reference_rejected_token_logps"] = torch.tensor([[-1.5, -1.5]], dtype=torch.float64)
    out = compute_loss("dpo_sanorm", **tensors)
    assert out.losses.item() == pytest.approx(0.7184596480132863, rel=1e-12)


# ------------------------------------------------------------------ the sampled subsets


@pytest.mark.parametrize("name", ["sampo", "sampo_official"])
def test_each_subset_has_exactly_t_min_elements_within_the_mask(name):
    g = torch.Generator().manual_seed(5)
    chosen_lengths = torch.randint(0, 30, (40,), generator=g).tolist()
    rejected_lengths = torch.randint(0, 30, (40,), generator=g).tolist()
    tensors = token_batch(chosen_lengths, rejected_lengths, T=32)
    # Left-pad some rows instead, so the valid positions are not always a prefix.
    tensors["rejected_mask"] = tensors["rejected_mask"].flip(-1)
    out = compute_loss(name, **tensors, seed=11)
    t_min = torch.minimum(tensors["chosen_mask"].sum(-1), tensors["rejected_mask"].sum(-1))
    keys = ["chosen_selection", "rejected_selection"]
    if name == "sampo_official":
        keys += ["reference_chosen_selection", "reference_rejected_selection"]
    for key in keys:
        selection = out.metrics[f"sampo/{key}"]
        side = "chosen" if "chosen" in key else "rejected"
        assert selection.dtype == torch.bool and selection.shape == (40, 32)
        assert torch.equal(selection.sum(-1), t_min), key
        assert not (selection & ~tensors[f"{side}_mask"]).any(), key
    # The shorter response keeps every token.
    shorter_is_chosen = tensors["chosen_mask"].sum(-1) <= tensors["rejected_mask"].sum(-1)
    sel = out.metrics["sampo/chosen_selection"]
    assert torch.equal(sel[shorter_is_chosen], tensors["chosen_mask"][shorter_is_chosen])


def test_inclusion_probabilities_are_those_of_a_uniform_subset():
    """One pair repeated N = 20,000 times in one batch (each row draws its own keys). The longer
    (chosen) response has 7 valid positions out of 9 (positions 1 and 5 are masked), the rejected has
    3, so T_m = 3. A uniform 3-subset of 7 keeps each valid token with p = 3/7 = 0.428571 and each pair
    of valid tokens with q = (3·2)/(7·6) = 1/7 = 0.142857. Standard errors: √(p(1−p)/N) = 0.0035 and
    √(q(1−q)/N) = 0.0025; the tolerance is 5 of them (0.0175, 0.0124). A sampler that kept a random
    contiguous window would pass the first check and fail the second (adjacent pairs ≈ 2/7)."""
    N = 20_000
    mask = torch.tensor([1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    chosen_mask = mask.expand(N, 9)
    counts = torch.full((N,), 3)
    selection = sample_positions(chosen_mask, counts, torch.Generator().manual_seed(2024)).double()
    p, q = 3 / 7, 1 / 7
    frequency = selection.mean(0)
    assert frequency[~mask].abs().max() == 0
    assert (frequency[mask] - p).abs().max() < 5 * math.sqrt(p * (1 - p) / N)
    joint = (selection.T @ selection) / N
    valid = mask.nonzero().squeeze(-1)
    pairs = joint[valid][:, valid]
    off_diagonal = pairs[~torch.eye(7, dtype=torch.bool)]
    assert (off_diagonal - q).abs().max() < 5 * math.sqrt(q * (1 - q) / N)


def test_inclusion_probability_through_the_loss():
    """Same property via the registered loss: 20,000 copies of a pair with T_w = 8, T_l = 2 keep each
    chosen token with probability 2/8 = 0.25 (5σ = 5 √(0.25·0.75/20000) = 0.0153)."""
    N = 20_000
    tensors = token_batch([8] * N, [2] * N, T=8)
    out = compute_loss("sampo", **tensors, seed=9)
    frequency = out.metrics["sampo/chosen_selection"].double().mean(0)
    assert (frequency - 0.25).abs().max() < 5 * math.sqrt(0.25 * 0.75 / N)
    assert out.metrics["sampo/rejected_selection"][:, :2].all()


def test_fixed_seed_is_deterministic_and_seeds_differ():
    """4 pairs with T_w = 20, T_l = 5: two different seeds draw identical subsets in all four pairs with
    probability C(20,5)^−4 ≈ 4e−18."""
    tensors = token_batch([20] * 4, [5] * 4, T=20)
    a = compute_loss("sampo", **tensors, seed=42)
    b = compute_loss("sampo", **tensors, seed=42)
    c = compute_loss("sampo", **tensors, seed=43)
    assert torch.equal(a.losses, b.losses)
    assert torch.equal(a.metrics["sampo/chosen_selection"], b.metrics["sampo/chosen_selection"])
    assert not torch.equal(a.metrics["sampo/chosen_selection"], c.metrics["sampo/chosen_selection"])
    # A generator seeded the same way gives the same draw; a generator advances between calls.
    g = torch.Generator().manual_seed(42)
    d = compute_loss("sampo", **tensors, generator=g)
    e = compute_loss("sampo", **tensors, generator=g)
    assert torch.equal(d.metrics["sampo/chosen_selection"], a.metrics["sampo/chosen_selection"])
    assert not torch.equal(d.metrics["sampo/chosen_selection"], e.metrics["sampo/chosen_selection"])


def test_gradients_only_on_selected_tokens():
    """∂L/∂log π_θ(y_t) = −β σ(−m) for t ∈ S(y_w) and +β σ(−m) for t ∈ S(y_l), 0 elsewhere, with
    m = r_w − r_l (L = −log σ(m), ∂L/∂m = −σ(−m), ∂m/∂log π_θ(y_t) = ±β on selected tokens)."""
    beta = 0.5
    tensors = token_batch([9, 3, 6], [4, 7, 6], T=9, pad_value=float("-inf"))
    for side in ("chosen", "rejected"):
        tensors[f"policy_{side}_token_logps"].requires_grad_(True)
    out = compute_loss("sampo", **tensors, beta=beta, seed=1)
    out.losses.sum().backward()
    coefficient = beta * torch.sigmoid(-(out.chosen_rewards - out.rejected_rewards))
    for side, sign in (("chosen", -1.0), ("rejected", 1.0)):
        grad = tensors[f"policy_{side}_token_logps"].grad
        selection = out.metrics[f"sampo/{side}_selection"]
        assert torch.isfinite(grad).all()
        assert grad[~selection].abs().max() == 0
        expected = (sign * coefficient).unsqueeze(-1).expand_as(grad)[selection]
        torch.testing.assert_close(grad[selection], expected)
        assert (grad[selection] != 0).all()


def test_independent_reference_subsets():
    """share_indices=False: the reference subset is drawn independently, so for a valid token of the
    longer response P(t ∈ S ∧ t ∈ S') = (T_m/T)² = (3/7)² = 0.183673, where a shared subset gives
    3/7 = 0.428571. N = 20,000 copies; 5σ = 5 √(0.1837·0.8163/20000) = 0.0137."""
    N = 20_000
    tensors = token_batch([7] * N, [3] * N, T=7)
    shared = compute_loss("sampo", **tensors, seed=0)
    assert "sampo/reference_chosen_selection" not in shared.metrics
    out = compute_loss("sampo_official", **tensors, seed=0)
    policy = out.metrics["sampo/chosen_selection"]
    reference = out.metrics["sampo/reference_chosen_selection"]
    assert torch.equal(reference.sum(-1), torch.full((N,), 3))
    both = (policy & reference).double().mean(0)
    expected = (3 / 7) ** 2
    assert (both - expected).abs().max() < 5 * math.sqrt(expected * (1 - expected) / N)
    # The shorter response is fully kept by both draws, so there the subsets coincide.
    assert torch.equal(out.metrics["sampo/rejected_selection"], out.metrics["sampo/reference_rejected_selection"])


@pytest.mark.parametrize("name", ["sampo", "sampo_official"])
def test_matches_a_naive_per_pair_loop_in_float64(name):
    g = torch.Generator().manual_seed(3)
    chosen_lengths = torch.randint(0, 12, (16,), generator=g).tolist()
    rejected_lengths = torch.randint(0, 12, (16,), generator=g).tolist()
    tensors = token_batch(chosen_lengths, rejected_lengths, T=12, seed=4)
    out = compute_loss(name, **tensors, beta=0.7, seed=5)
    m = out.metrics
    selections = {
        ("policy", "chosen"): m["sampo/chosen_selection"],
        ("policy", "rejected"): m["sampo/rejected_selection"],
        ("reference", "chosen"): m.get("sampo/reference_chosen_selection", m["sampo/chosen_selection"]),
        ("reference", "rejected"): m.get("sampo/reference_rejected_selection", m["sampo/rejected_selection"]),
    }
    expected = naive_sampo(tensors, selections, beta=0.7)
    assert out.losses.dtype == torch.float64
    torch.testing.assert_close(out.losses, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(m["win_prob"], torch.exp(-out.losses))


def test_the_expected_sampled_reward_is_the_length_rescaled_log_ratio():
    """E[r(y_w)] = β (T_m/T_w) ℓ_θ(y_w) under a shared uniform subset. Chosen log-ratios are
    t/10 for t = 1..6 (T_w = 6, ℓ = 2.1), T_l = 2: E[r_w] = 0.1 × (2/6) × 2.1 = 0.07. Each draw's r_w is
    0.1 × a sum of two distinct values of {0.1..0.6}, variance ≤ (0.1 × 0.5)² ; the mean of 20,000 draws
    is within 5 × 0.05/√20000 = 0.0018 of 0.07."""
    N = 20_000
    tensors = token_batch([6] * N, [2] * N, T=6)
    tensors["reference_chosen_token_logps"] = tensors["policy_chosen_token_logps"] - torch.arange(1, 7) / 10
    out = compute_loss("sampo", **tensors, seed=8)
    assert abs(out.chosen_rewards.mean().item() - 0.07) < 0.0018


def test_dtypes():
    tensors = token_batch([3, 4], [5, 2], dtype=torch.bfloat16)
    out = compute_loss("sampo", **tensors, seed=0)
    assert out.losses.dtype == torch.float32
    tensors = token_batch([3, 4], [5, 2], dtype=torch.float64)
    assert compute_loss("sampo", **tensors, seed=0).losses.dtype == torch.float64
    assert compute_loss("dpo_sanorm", **tensors).losses.dtype == torch.float64


def test_64_pairs_by_512_tokens_runs_fast():
    """64 pairs × 512 positions, lengths 1..512, forward and backward of ``sampo_official`` (four
    subset draws). Measured on the shared 2-core CPU: ≈ 5–9 ms on one thread (``sampo``: ≈ 3 ms), and
    ≈ 90 ms with two threads while other jobs load the machine. The bound is loose so that a busy
    machine does not fail it."""
    g = torch.Generator().manual_seed(0)
    tensors = token_batch(
        torch.randint(1, 513, (64,), generator=g).tolist(), torch.randint(1, 513, (64,), generator=g).tolist(), T=512, dtype=torch.float32
    )
    tensors["policy_chosen_token_logps"].requires_grad_(True)
    tensors["policy_rejected_token_logps"].requires_grad_(True)
    start = time.perf_counter()
    out = compute_loss("sampo_official", **tensors, seed=0)
    out.losses.mean().backward()
    elapsed = time.perf_counter() - start
    assert torch.isfinite(out.losses).all() and out.losses.shape == (64,)
    assert elapsed < 2.0, f"took {elapsed:.3f} s"


def test_dpo_sanorm_is_exact_in_float64():
    """T_w = 7, T_l = 10, per-token log-ratios 30 and 25: r_w = (17/2)(1/7)(7·30) = 255 and
    r_l = (17/2)(1/10)(10·25) = 212.5 exactly (β = 1); the length factor is taken in float64 too."""
    T = 10
    chosen_mask = torch.zeros(1, T, dtype=torch.float64)
    chosen_mask[0, :7] = 1
    rejected_mask = torch.ones(1, T, dtype=torch.float64)
    out = compute_loss(
        "dpo_sanorm", beta=1.0, chosen_mask=chosen_mask, rejected_mask=rejected_mask,
        policy_chosen_token_logps=30.0 * chosen_mask, reference_chosen_token_logps=torch.zeros(1, T, dtype=torch.float64),
        policy_rejected_token_logps=25.0 * rejected_mask, reference_rejected_token_logps=torch.zeros(1, T, dtype=torch.float64),
    )
    assert out.chosen_rewards.item() == pytest.approx(255.0, rel=1e-14)  # float32 lengths gave 1.4e-8
    assert out.rejected_rewards.item() == pytest.approx(212.5, rel=1e-14)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-42.5)), rel=1e-12)
