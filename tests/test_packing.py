"""Shared-prompt, padding-free batches (dpo_zoo/model/packing.py) give the padded path's numbers.

The packed path computes the same quantities as the padded ``[2B, L]`` block in another order (other
matrix shapes, attention over segments), so fp32 values agree to float rounding, not bit for bit; the
issue's tolerance is 1e-5 (absolute, on log-probs of a few nats and on per-step losses), about 7× the
largest difference measured on values (1.4e-6); parameter gradients are held to 1e-5 of each
tensor's largest entry (see :func:`_assert_gradients_close`). IS-DAA's step losses get a wider bound,
derived from the rounding of its un-β-scaled importance weight (see ``UNSCALED_SEQUENCE_WEIGHT``).
"""

import json
from pathlib import Path

import pytest
import torch

from dpo_zoo.model import packing
from dpo_zoo.train.batching import collate, pair_batch
from dpo_zoo.config import load_config
from dpo_zoo.model.logps import completion_logps, packed_completion_logps, padded_completion_logps
from dpo_zoo.losses import build_loss, registered_losses

TOLERANCE = 1e-5
VOCAB = 300


def _family(name: str):
    import transformers

    config_class, model_class = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    }[name]
    config = getattr(transformers, config_class)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return getattr(transformers, model_class)(config).float()


def _pairs(prompts, chosen, rejected):
    """Right-padded [2B, L] block of chosen rows then rejected rows, as collate builds it."""
    sequences = [p + c for p, c in zip(prompts, chosen)] + [p + r for p, r in zip(prompts, rejected)]
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    starts = torch.tensor([len(p) for p in prompts] * 2)
    return ids, mask, starts


def _random_pairs(seed=1):
    generator = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(3, VOCAB, (n,), generator=generator).tolist()

    # prompt lengths 5, 9, 3; one-token completions and a long rejected side included
    return _pairs([tokens(5), tokens(9), tokens(3)], [tokens(4), tokens(7), tokens(1)], [tokens(6), tokens(1), tokens(8)])


def _assert_gradients_close(actual, expected):
    """Parameter gradients to 1e-5 of the tensor's scale (the embedding gradient sums every token's
    contribution and reaches ~30, where float32 rounding alone is ~2e-6 per addition)."""
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        scale = max(1.0, float(value.abs().max()))
        torch.testing.assert_close(actual[name], value, atol=TOLERANCE * scale, rtol=0, msg=name)


def test_one_pair_is_laid_out_as_prompt_chosen_rejected():
    # prompt [11 12 13], chosen [21 22], rejected [31]
    ids, mask, starts = _pairs([[11, 12, 13]], [[21, 22]], [[31]])
    row = packing.pack_rows(ids, mask, starts, pairs=1)
    assert row.input_ids.tolist() == [[11, 12, 13, 21, 22, 31]]
    assert row.position_ids.tolist() == [[0, 1, 2, 3, 4, 3]]  # the rejected branch restarts where the prompt ends
    # chosen 21 is predicted at position 2 (last prompt token), 22 at 3; rejected 31 also at 2
    assert row.predictor.tolist() == [2, 3, 2]
    assert row.labels.tolist() == [21, 22, 31]
    assert row.rows.tolist() == [0, 0, 1] and row.cols.tolist() == [0, 1, 0]
    assert row.shared_pairs == 1 and len(row.segments) == 1
    allowed = row.segments[0].mask.int().tolist()
    assert allowed[5] == [1, 1, 1, 0, 0, 1]  # the rejected token sees the prompt and itself, not the chosen
    assert allowed[4] == [1, 1, 1, 1, 1, 0]  # the chosen side is plain causal
    assert allowed[2] == [1, 1, 1, 0, 0, 0]


def test_pairs_are_block_diagonal_and_unshared_prompts_are_two_causal_segments():
    # pair 0 shares its prompt; pair 1's rejected side has another prompt (e.g. truncated otherwise)
    ids, mask, starts = _pairs([[5, 6], [7, 8, 9]], [[1], [2, 3]], [[4], [4]])
    ids[3, :3] = torch.tensor([7, 8, 10])
    row = packing.pack_rows(ids, mask, starts, pairs=2)
    assert row.shared_pairs == 1
    assert [(s.start, s.length, s.mask is None) for s in row.segments] == [(0, 4, False), (4, 5, True), (9, 4, True)]
    assert row.length == 13  # 2+1+1 shared, then 5 and 4: no padding, nothing twice but pair 1's prompt
    assert row.position_ids.tolist() == [[0, 1, 2, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3]]


def test_a_completion_with_no_prompt_token_before_it_runs_padded():
    ids, mask, starts = _pairs([[5, 6]], [[1]], [[2]])
    assert packing.pack_rows(ids, mask, starts.new_tensor([0, 2]), pairs=1) is None


@pytest.mark.float_sensitive
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_packed_values_and_gradients_equal_the_padded_path(family):
    model = _family(family)
    ids, mask, starts = _random_pairs()
    options = dict(vocab=True, topk=5, logits_mean=True, sq_mass=True)
    padded = padded_completion_logps(model, ids, mask, starts, **options)
    packed = completion_logps(model, ids, mask, starts, pairs=3, **options)
    assert model.config._attn_implementation == packing.ATTENTION_NAME
    on = padded.mask
    assert torch.equal(packed.mask, on) and torch.equal(packed.labels, padded.labels)
    torch.testing.assert_close(packed.token_logps, padded.token_logps, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(packed.vocab_logps[on], padded.vocab_logps[on], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(packed.topk_logps[on], padded.topk_logps[on], atol=TOLERANCE, rtol=0)
    assert torch.equal(packed.topk_ids[on], padded.topk_ids[on])
    torch.testing.assert_close(packed.rest_logmass[on], padded.rest_logmass[on], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(packed.log_sq_mass, padded.log_sq_mass, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(packed.logits_mean, padded.logits_mean, atol=TOLERANCE, rtol=0)

    grads = []
    for packed_path in (False, True):
        model.zero_grad()
        out = completion_logps(model, ids, mask, starts, pairs=3, padding_free=packed_path, head_chunk=4)
        (out.sums() * torch.arange(1.0, 7.0)).sum().backward()  # distinct weights: a swapped row would show
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    _assert_gradients_close(grads[1], grads[0])


@pytest.mark.float_sensitive
def test_gradient_checkpointing_and_lora_adapters_keep_the_packed_values():
    """Recomputed decoder layers get the packed row again; LoRA layers inside the decoder are run by
    the split head path too (the adapter switched off gives the base model's values)."""
    import peft

    model = _family("llama")
    ids, mask, starts = _random_pairs()
    expected = padded_completion_logps(model, ids, mask, starts)
    model.gradient_checkpointing_enable()
    model.train()
    checkpointed = completion_logps(model, ids, mask, starts, pairs=3)
    checkpointed.sums().sum().backward()  # recomputes each layer with the packed row
    torch.testing.assert_close(checkpointed.token_logps, expected.token_logps, atol=TOLERANCE, rtol=0)
    model.gradient_checkpointing_disable()

    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with_adapter = completion_logps(wrapped, ids, mask, starts, pairs=3)
    assert (with_adapter.token_logps - expected.token_logps).abs().max() > 1e-3  # the adapter is applied
    torch.testing.assert_close(with_adapter.token_logps, padded_completion_logps(wrapped, ids, mask, starts).token_logps,
                               atol=TOLERANCE, rtol=0)
    with wrapped.disable_adapter():
        base = completion_logps(wrapped, ids, mask, starts, pairs=3)
    torch.testing.assert_close(base.token_logps, expected.token_logps, atol=TOLERANCE, rtol=0)


@pytest.mark.float_sensitive
def test_generation_is_unchanged_by_the_packed_attention_implementation():
    model = _family("llama").eval()
    prompt = torch.tensor([[5, 6, 7, 8], [0, 9, 10, 11]])
    attention = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])  # left padding, as generation pads
    before = model(input_ids=prompt, attention_mask=attention).logits
    ids, mask, starts = _random_pairs()
    completion_logps(model, ids, mask, starts, pairs=3)  # switches the model to the packed implementation
    after = model(input_ids=prompt, attention_mask=attention).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def test_model_forward_with_kept_logits_equals_the_split_head(monkeypatch):
    """The path for a head that cannot be run apart (a ZeRO-3 partitioned model): the model's own
    forward with ``logits_to_keep`` = the predicting positions."""
    model = _family("llama")
    ids, mask, starts = _random_pairs()
    row = packing.pack_rows(ids, mask, starts, pairs=3)
    assert packing.prepare(model, row.longest_segment)
    split = packed_completion_logps(model, row, vocab=True)
    monkeypatch.setattr(packing, "lm_head_of", lambda model: None)
    whole = packed_completion_logps(model, row, vocab=True)
    torch.testing.assert_close(whole.token_logps, split.token_logps, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(whole.vocab_logps, split.vocab_logps, atol=TOLERANCE, rtol=0)


def _saved_vocabulary_activations(model, fn) -> list:
    """Element counts of the activations over the vocabulary (last dimension V, not a parameter)
    that autograd saves for backward while ``fn`` runs."""
    parameters = {p.data_ptr() for p in model.parameters()}
    sizes = []

    def pack(tensor):
        if tensor.dim() and tensor.shape[-1] == VOCAB and tensor.data_ptr() not in parameters:
            sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


def test_chunked_head_keeps_no_logits_tensor_for_backward():
    model = _family("llama")
    ids, mask, starts = _random_pairs()
    completion_tokens = int((mask.sum(-1) - starts).sum())  # 27

    def packed():
        completion_logps(model, ids, mask, starts, pairs=3, head_chunk=8).sums().sum().backward()

    def padded():
        padded_completion_logps(model, ids, mask, starts).sums().sum().backward()

    # packed: each head chunk keeps only its hidden states; its logits are recomputed in backward
    assert _saved_vocabulary_activations(model, packed) == []
    # the padded path keeps its logits for backward, and the measurement sees them
    assert max(_saved_vocabulary_activations(model, padded)) >= completion_tokens * VOCAB


def test_an_unsupported_architecture_runs_padded_and_says_so_once(recwarn):
    import transformers

    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).float().eval()  # eval: no dropout
    packing._said_once.discard("type:gpt2")
    ids, mask, starts = _random_pairs()
    first = completion_logps(model, ids, mask, starts, pairs=3)
    completion_logps(model, ids, mask, starts, pairs=3)
    said = [w for w in recwarn if "shared-prompt packing" in str(w.message)]
    assert len(said) == 1 and "'gpt2' runs the padded" in str(said[0].message)
    torch.testing.assert_close(first.token_logps, padded_completion_logps(model, ids, mask, starts).token_logps,
                               atol=0, rtol=0)


# ------------------------------------------------------------------ the whole registry, real prepared pairs


@pytest.fixture(scope="module")
def prepared_rows(tiny_prepared, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from dpo_zoo.train.trainer import open_prepared

    cfg = load_config([], tiny_prepared)
    train_set, _ = open_prepared(cfg)
    rows = train_set.rows(list(range(6)))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return rows, model


def _fields(batch):
    return {name: getattr(batch, name) for name in batch.__dataclass_fields__
            if isinstance(getattr(batch, name), torch.Tensor)}


@pytest.mark.float_sensitive
@pytest.mark.parametrize("name", sorted(registered_losses()))
def test_every_registered_loss_sees_the_same_inputs_and_loss(name, prepared_rows):
    """Per pair: policy and live-reference log-probs (sums, per token, vocabulary), the masks, and the
    loss with its rewards and gradients, packed against padded, on real prepared HH pairs."""
    rows, model = prepared_rows
    loss = build_loss(name)
    collated = collate(rows, pad_token_id=0)
    results = []
    for padding_free in (False, True):
        model.zero_grad()
        forward = pair_batch(loss, model, collated, reference_model=model, generator=torch.Generator().manual_seed(3),
                             padding_free=padding_free)
        output = loss(forward.batch)
        output.losses.mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((forward.batch, output, grads))
    (padded, padded_out, padded_grads), (packed, packed_out, packed_grads) = results
    assert packed.chosen_mask.sum() > 0 and torch.equal(packed.chosen_mask, padded.chosen_mask)
    masks = {"chosen": padded.chosen_mask, "rejected": padded.rejected_mask}
    a, b = _fields(padded), _fields(packed)
    assert a.keys() == b.keys()
    for field in a:
        left, right = a[field].detach(), b[field].detach()
        side = "rejected" if "rejected" in field else "chosen"
        if left.dim() >= 2 and left.shape[:2] == masks[side].shape:  # per token: compare completion tokens only
            left, right = left[masks[side]], right[masks[side]]
        if left.dtype in (torch.bool, torch.long):
            assert torch.equal(left, right), field
        else:
            torch.testing.assert_close(right, left, atol=TOLERANCE, rtol=0, msg=field)
    for field in ("losses", "chosen_rewards", "rejected_rewards"):
        torch.testing.assert_close(getattr(packed_out, field), getattr(padded_out, field), atol=TOLERANCE, rtol=0,
                                   msg=field)
    _assert_gradients_close(packed_grads, padded_grads)


def _step_losses(out_dir: Path):
    return [json.loads(line)["loss"] for line in open(out_dir / "logs.jsonl") if '"loss"' in line]


@pytest.mark.float_sensitive
@pytest.mark.parametrize("name", sorted(registered_losses()))
def test_every_registered_loss_trains_to_the_same_step_losses(name, tiny_prepared, tmp_path):
    """Five optimizer steps through the trainer (DeepSpeed, AdamW), packed against padded."""
    from dpo_zoo.train.trainer import train

    losses = []
    for padding_free in ("false", "true"):
        out = tmp_path / padding_free
        train(load_config([], [*tiny_prepared, f"loss={name}", "train.max_steps=5", "train.learning_rate=1e-4",
                               f"model.padding_free={padding_free}", f"train.output_dir={out}"]))
        losses.append(_step_losses(out))
    assert len(losses[0]) == 5
    tolerance = TOLERANCE
    if name in UNSCALED_SEQUENCE_WEIGHT:
        tolerance += _weight_rounding(out, losses[0])
    assert losses[1] == pytest.approx(losses[0], abs=tolerance)


# Losses whose value is multiplied by exp(Σ log π_θ − Σ log π_ref) with no β in front (IS-DAA's importance
# weight). The padded and packed summed log-probs each round to about ε₃₂·|Σ log p| (a few hundred nats
# here, so ~5e-5 in log w), and that error reaches the loss as a relative error, not shrunk by β as in DPO:
# the step loss may differ by up to loss · ε₃₂ · (|Σ log p_w| + |Σ log p_l|). Measured: 1.09e-5 at step 5
# (loss 0.671, sums ≈ 254 + 176 nats, bound ≈ 3.4e-5); every other loss stays under 1.6e-6.
UNSCALED_SEQUENCE_WEIGHT = {"is_daa", "is_ipo"}
EPS32 = 2.0 ** -23


def _weight_rounding(out_dir: Path, step_losses):
    """Per step, ``loss · ε₃₂ · (|logps/chosen| + |logps/rejected|)`` from the run's logged batch means."""
    rows = [json.loads(line) for line in open(out_dir / "logs.jsonl") if '"loss"' in line]
    return max(abs(loss) * EPS32 * (abs(row["logps/chosen"]) + abs(row["logps/rejected"]))
               for loss, row in zip(step_losses, rows))


@pytest.mark.float_sensitive
def test_prep_writes_the_padded_paths_cache(tiny_model_dir, tmp_path):
    """Reference per-token log-probs, their sums and the top-k distribution, packed against padded."""
    from dpo_zoo.cache.reader import PreparedSet
    from dpo_zoo.cache.prep import run_prep
    from tests.tiny import tiny_overrides, write_hh_slice

    data = write_hh_slice(tmp_path / "hh.jsonl")
    sets = []
    for padding_free in ("false", "true"):
        out = tmp_path / f"prepared-{padding_free}"
        run_prep(load_config([], tiny_overrides(tiny_model_dir, data, out) + [f"model.padding_free={padding_free}"]))
        sets.append(PreparedSet.open(out / "train"))
    padded, packed = sets
    assert padded.key == packed.key and len(padded) == len(packed) > 0
    for a, b in zip(padded.rows(list(range(len(padded)))), packed.rows(list(range(len(packed))))):
        for column, value in a.items():
            if column.startswith("ref_") and value is not None:
                if column.endswith("topk_ids"):
                    continue  # near-equal log-probs may swap order; their values are compared below
                left = torch.tensor(value, dtype=torch.float64)
                right = torch.tensor(b[column], dtype=torch.float64)
                torch.testing.assert_close(right, left, atol=TOLERANCE, rtol=0, msg=column)
            else:
                assert b[column] == value, column


def test_padding_free_is_not_part_of_a_runs_identity(tiny_prepared):
    """Switching the padded path on or off changes how the values are computed, not what a run
    trains: a finished run is reused and a checkpoint resumed either way."""
    from dpo_zoo.config import as_dict
    from dpo_zoo.train.run_folder import identity_changes, training_identity

    identities = [training_identity(as_dict(load_config([], [*tiny_prepared, f"model.padding_free={v}"])), {"data": "x"})
                  for v in ("true", "false")]
    assert identity_changes(identities[0], identities[1]) == []
    other = training_identity(as_dict(load_config([], [*tiny_prepared, "model.trust_remote_code=true"])), {"data": "x"})
    assert identity_changes(identities[0], other) == ["model.trust_remote_code"]
