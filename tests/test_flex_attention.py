"""``model.attention=flex`` (dpo_zoo/model/flex.py): one FlexAttention call per layer gives the padded
path's numbers.

FlexAttention has no backward pass on CPU (torch 2.13), so here the flex path is checked on values
(log-probs, the vocabulary outputs, every registered loss and its rewards, prep's cache), computed
without gradients; its gradients are checked by ``bench/gpu_check.sh`` on a device. fp32 to the
packing tests' 1e-5; bf16 to :data:`BF16_TOLERANCE` (see its comment).
"""

import pytest
import torch

from dpo_zoo.config import ConfigError, load_config
from dpo_zoo.losses import build_loss, registered_losses
from dpo_zoo.model import flex, packing
from dpo_zoo.model.logps import completion_logps, padded_completion_logps
from dpo_zoo.train.batching import collate, pair_batch
from tests.test_packing import TOLERANCE, _family, _fields, _pairs, _random_pairs, prepared_rows  # noqa: F401

# bf16 keeps 8 significant bits: a per-token log-prob of a few nats computed along two paths (other
# matrix shapes, another attention kernel) differs by a few bf16 ulps of the activations; measured
# here up to 1.3e-3 nats on the tiny models (either attention), so 0.02 nats is the bound (fp32: 1e-6).
BF16_TOLERANCE = 0.02
# Summed log-probs (a few hundred nats on the tiny model's HH pairs) differ by one fp32 ulp between
# the kernels (measured: 1.1e-7 relative); per-token values and losses stay within TOLERANCE absolute.
SUM_RTOL = 1e-6


def _dense_rule(row):
    """The [L, L] attention rule written from the segments' own masks (what the SDPA loop runs)."""
    allowed = torch.zeros(row.length, row.length, dtype=torch.bool)
    for s in row.segments:
        local = s.mask if s.mask is not None else torch.ones(s.length, s.length, dtype=torch.bool).tril()
        allowed[s.start : s.start + s.length, s.start : s.start + s.length] = local
    return allowed


def test_the_block_mask_is_the_segments_rule_and_skips_empty_tiles():
    # two long shared-prompt pairs and one unshared pair: the row spans several 128-token tiles
    generator = torch.Generator().manual_seed(0)
    tokens = lambda n: torch.randint(3, 300, (n,), generator=generator).tolist()  # noqa: E731
    ids, mask, starts = _pairs([tokens(150), tokens(90), tokens(20)], [tokens(40), tokens(70), tokens(5)],
                               [tokens(60), tokens(30), tokens(9)])
    ids[5, :3] = ids[5, :3] + 1  # pair 2's rejected side has another prompt: two causal segments
    row = packing.pack_rows(ids, mask, starts, pairs=3)
    assert row.shared_pairs == 2 and row.length > 3 * flex.BLOCK
    block = flex.block_mask(row)
    assert flex.block_mask(row) is block  # built once per row, shared by every layer
    index = torch.arange(row.length)
    rule = block.mask_mod(None, None, index[:, None], index[None, :])
    assert torch.equal(rule, _dense_rule(row))
    # tile (q, k) is listed (partial or full) exactly when some query of tile q may see some key of tile k
    tiles = -(-row.length // flex.BLOCK)
    padded = torch.zeros(tiles * flex.BLOCK, tiles * flex.BLOCK, dtype=torch.bool)
    padded[: row.length, : row.length] = rule
    wanted = padded.view(tiles, flex.BLOCK, tiles, flex.BLOCK).any(dim=(1, 3))
    listed = torch.zeros(tiles, tiles, dtype=torch.bool)
    for count, index_ in ((block.kv_num_blocks, block.kv_indices), (block.full_kv_num_blocks, block.full_kv_indices)):
        for q in range(tiles):
            listed[q, index_[0, 0, q, : count[0, 0, q]].long()] = True
    assert torch.equal(listed, wanted) and not wanted.all()  # some tiles are skipped


@pytest.mark.float_sensitive
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_flex_values_equal_the_padded_path(family):
    model = _family(family)
    ids, mask, starts = _random_pairs()
    options = dict(vocab=True, topk=5, logits_mean=True, sq_mass=True)
    with torch.no_grad():
        padded = padded_completion_logps(model, ids, mask, starts, **options)
        packing.set_attention(model, "flex")
        packed = completion_logps(model, ids, mask, starts, pairs=3, **options)
    on = padded.mask
    assert torch.equal(packed.mask, on) and torch.equal(packed.labels, padded.labels)
    torch.testing.assert_close(packed.token_logps, padded.token_logps, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(packed.vocab_logps[on], padded.vocab_logps[on], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(packed.topk_logps[on], padded.topk_logps[on], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(packed.rest_logmass[on], padded.rest_logmass[on], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(packed.log_sq_mass, padded.log_sq_mass, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(packed.logits_mean, padded.logits_mean, atol=TOLERANCE, rtol=0)


@pytest.mark.float_sensitive
@pytest.mark.parametrize("mode", ["segments", "flex"])
def test_bf16_packed_values_are_within_the_stated_tolerance_of_padded(mode):
    model = _family("qwen2").to(torch.bfloat16)
    ids, mask, starts = _random_pairs()
    with torch.no_grad():
        padded = padded_completion_logps(model, ids, mask, starts)
        packing.set_attention(model, mode)
        packed = completion_logps(model, ids, mask, starts, pairs=3)
    assert packed.token_logps.dtype == torch.float32  # the head's log-softmax runs in fp32
    torch.testing.assert_close(packed.token_logps, padded.token_logps, atol=BF16_TOLERANCE, rtol=0)


@pytest.mark.float_sensitive
@pytest.mark.parametrize("name", sorted(registered_losses()))
def test_every_registered_loss_has_the_same_inputs_and_loss_with_flex(name, prepared_rows):
    rows, model = prepared_rows
    loss = build_loss(name)
    collated = collate(rows, pad_token_id=0)
    results = []
    with torch.no_grad():
        for padding_free, mode in ((False, "segments"), (True, "flex")):
            packing.set_attention(model, mode)
            forward = pair_batch(loss, model, collated, reference_model=model,
                                 generator=torch.Generator().manual_seed(3), padding_free=padding_free)
            results.append((forward.batch, loss(forward.batch)))
    packing.set_attention(model, "auto")
    (padded, padded_out), (packed, packed_out) = results
    masks = {"chosen": padded.chosen_mask, "rejected": padded.rejected_mask}
    a, b = _fields(padded), _fields(packed)
    assert a.keys() == b.keys()
    for field in a:
        left, right = a[field], b[field]
        side = "rejected" if "rejected" in field else "chosen"
        if left.dim() >= 2 and left.shape[:2] == masks[side].shape:
            left, right = left[masks[side]], right[masks[side]]
        if left.dtype in (torch.bool, torch.long):
            assert torch.equal(left, right), field
        else:  # sums of ~280 nats: 1 fp32 ulp is 3e-5 there, so they get a relative bound too
            torch.testing.assert_close(right, left, atol=TOLERANCE, rtol=SUM_RTOL, msg=field)
    for field in ("losses", "chosen_rewards", "rejected_rewards"):
        torch.testing.assert_close(getattr(packed_out, field), getattr(padded_out, field), atol=TOLERANCE, rtol=0,
                                   msg=field)


def test_flex_refuses_to_train_on_cpu_with_a_clear_error():
    model = _family("llama")
    packing.set_attention(model, "flex")
    ids, mask, starts = _random_pairs()
    with pytest.raises(ValueError, match="model.attention=flex: .*no backward pass on CPU.*segments or auto"):
        completion_logps(model, ids, mask, starts, pairs=3)


def test_auto_is_the_segment_loop_on_cpu_and_the_setting_is_validated():
    model = _family("llama")
    assert packing.attention_of(model) == "auto"
    ids, mask, starts = _random_pairs()
    row = packing.pack_rows(ids, mask, starts, pairs=3)
    q = torch.zeros(1, 4, row.length, 16)
    assert flex.resolve("auto", q, q, q, row, packing.segment_attention) == "segments"
    with pytest.raises(ValueError, match="model.attention must be one of auto, segments, flex"):
        packing.set_attention(model, "dense")
    with pytest.raises(ConfigError, match="model.attention"):
        load_config([], ["model.attention=dense"])


@pytest.mark.float_sensitive
def test_prep_with_flex_writes_the_padded_paths_cache(tiny_model_dir, tmp_path):
    from dpo_zoo.cache.prep import run_prep
    from dpo_zoo.cache.reader import PreparedSet
    from tests.tiny import tiny_overrides, write_hh_slice

    data = write_hh_slice(tmp_path / "hh.jsonl")
    sets = []
    for settings in (["model.padding_free=false"], ["model.attention=flex"]):
        out = tmp_path / settings[0].split("=")[0].replace(".", "_")
        run_prep(load_config([], tiny_overrides(tiny_model_dir, data, out) + settings))
        sets.append(PreparedSet.open(out / "train"))
    padded, packed = sets
    assert padded.key == packed.key and len(padded) == len(packed) > 0  # the setting is not part of the key
    for a, b in zip(padded.rows(list(range(len(padded)))), packed.rows(list(range(len(packed))))):
        for column, value in a.items():
            if column.startswith("ref_") and value is not None and not column.endswith("topk_ids"):
                torch.testing.assert_close(torch.tensor(b[column], dtype=torch.float64),
                                           torch.tensor(value, dtype=torch.float64), atol=TOLERANCE, rtol=0, msg=column)
