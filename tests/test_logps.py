"""The padded path of `completion_logps` against a brute-force reading of the full log-softmax,
values and gradients (the packed path is checked against this one in tests/test_packing.py).

The fast path asks the model for logits only from the earliest completion position on
(``logits_to_keep``) and works on row chunks; neither may change a number beyond float32 rounding:
the chunks are other batch shapes, so values agree to atol 1e-6 + rtol 1e-6 (a few ulps of log-probs
of a few nats; tests/README.md).
"""

import pytest
import torch

from dpo_zoo.model.logps import _forward_accepts_logits_to_keep, padded_completion_logps as completion_logps


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from tests.tiny import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path_factory.mktemp("logps_model"), seed=3)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


class _NoLogitsToKeep(torch.nn.Module):
    """The same model behind a forward without ``logits_to_keep``: the full-logits path."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, attention_mask, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def _batch(vocab_size):
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([12, 9, 15, 7])
    starts = torch.tensor([5, 4, 9, 6])  # row 3 has a one-token completion
    ids = torch.randint(3, vocab_size, (4, 15), generator=generator)
    mask = (torch.arange(15).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return ids * mask, mask, starts, lengths


def _brute_force(model, ids, mask, starts, lengths):
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logps = torch.log_softmax(logits, -1)
    rows = []
    for i in range(ids.shape[0]):
        positions = torch.arange(int(starts[i]), int(lengths[i]))
        rows.append(logps[i, positions - 1, ids[i, positions]])
    return rows


def test_model_under_wrappers_is_seen_to_take_logits_to_keep(tiny_model):
    assert _forward_accepts_logits_to_keep(tiny_model)
    assert not _forward_accepts_logits_to_keep(_NoLogitsToKeep(tiny_model))


@pytest.mark.float_sensitive
@pytest.mark.parametrize("row_chunk", [1, 3, 8])
def test_token_logps_equal_the_full_log_softmax(tiny_model, row_chunk):
    ids, mask, starts, lengths = _batch(tiny_model.config.vocab_size)
    out = completion_logps(tiny_model, ids, mask, starts, row_chunk=row_chunk, vocab=True, logits_mean=True)
    expected = _brute_force(tiny_model, ids, mask, starts, lengths)
    assert out.token_logps.shape == (4, 7) and out.mask.sum(-1).tolist() == [7, 5, 6, 1]
    for i, row in enumerate(expected):
        n = len(row)
        torch.testing.assert_close(out.token_logps[i, :n], row, atol=1e-6, rtol=1e-6)
        assert torch.all(out.token_logps[i, n:] == 0)
        # vocab_logps at completion token j is the whole distribution that predicted it
        picked = out.vocab_logps[i, :n].gather(-1, ids[i, int(starts[i]) : int(lengths[i])].unsqueeze(-1))
        torch.testing.assert_close(picked.squeeze(-1), row, atol=1e-6, rtol=1e-6)
    full_path = completion_logps(_NoLogitsToKeep(tiny_model), ids, mask, starts, vocab=True, logits_mean=True)
    torch.testing.assert_close(out.logits_mean, full_path.logits_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.vocab_logps, full_path.vocab_logps, atol=1e-6, rtol=1e-6)


@pytest.mark.float_sensitive
def test_gradients_equal_the_full_logits_path(tiny_model):
    ids, mask, starts, _ = _batch(tiny_model.config.vocab_size)
    grads = []
    for model in (tiny_model, _NoLogitsToKeep(tiny_model)):
        tiny_model.zero_grad()
        completion_logps(model, ids, mask, starts, row_chunk=2).sums().sum().backward()
        grads.append({n: p.grad.clone() for n, p in tiny_model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)
    tiny_model.zero_grad()
