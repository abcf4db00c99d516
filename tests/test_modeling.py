"""Scoring responses in length groups: the same statistics and gradients as one padded pass."""

from __future__ import annotations

import pytest
import torch

from entrorl.modeling import bucketed_response_token_stats, length_buckets, load_causal_lm, response_token_stats

NEED = ("logprob", "entropy", "disc", "disc_centered")


def ragged_batch(rows: int, vocab: int, seed: int = 0):
    """Left-padded prompts and right-padded responses of very different lengths (pad id 0)."""
    generator = torch.Generator().manual_seed(seed)
    prompt_lengths = torch.randint(2, 9, (rows,), generator=generator)
    response_lengths = torch.randint(1, 25, (rows,), generator=generator)
    response_lengths[0] = 24
    prompt_ids = torch.zeros(rows, int(prompt_lengths.max()), dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids, dtype=torch.bool)
    response_ids = torch.zeros(rows, int(response_lengths.max()), dtype=torch.long)
    response_mask = torch.zeros_like(response_ids, dtype=torch.bool)
    for row in range(rows):
        p, r = int(prompt_lengths[row]), int(response_lengths[row])
        prompt_ids[row, -p:] = torch.randint(3, vocab, (p,), generator=generator)
        prompt_mask[row, -p:] = True
        response_ids[row, :r] = torch.randint(3, vocab, (r,), generator=generator)
        response_mask[row, :r] = True
    return prompt_ids, prompt_mask, response_ids, response_mask


def test_length_buckets_partition_the_rows_and_cut_padding():
    prompt_lengths = torch.tensor([5, 5, 5, 5, 5, 5, 5, 5])
    response_lengths = torch.tensor([100, 3, 90, 2, 4, 95, 1, 3])
    groups = length_buckets(prompt_lengths, response_lengths, overhead_tokens=10)
    assert sorted(torch.cat(groups).tolist()) == list(range(8))
    padded = sum(len(g) * int(prompt_lengths[g].max() + response_lengths[g].max()) for g in groups)
    assert len(groups) > 1 and padded < 8 * 105 * 0.6
    # equal lengths, or a forward pass that costs more than the padding it saves: one group
    assert len(length_buckets(prompt_lengths, torch.full((8,), 7))) == 1
    assert len(length_buckets(prompt_lengths, response_lengths, overhead_tokens=10_000)) == 1
    assert len(length_buckets(prompt_lengths, response_lengths, max_buckets=1, overhead_tokens=0)) == 1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_bucketed_scoring_equals_one_padded_pass(tiny_model_dir, temperature):
    model = load_causal_lm(tiny_model_dir)
    vocab = model.config.vocab_size
    batch = ragged_batch(12, vocab)
    mask = batch[3]
    whole = response_token_stats(model, *batch, temperature=temperature, need=NEED)
    grouped = bucketed_response_token_stats(model, *batch, temperature=temperature, need=NEED, overhead_tokens=0)
    assert len(length_buckets(batch[1].sum(-1), mask.sum(-1), overhead_tokens=0)) > 1  # really split
    for name in NEED:
        ours, theirs = getattr(grouped, name), getattr(whole, name)
        assert ours.shape == theirs.shape == mask.shape
        torch.testing.assert_close(ours[mask], theirs[mask], atol=2e-5, rtol=1e-5)
        assert not ours[~mask].any()  # zeros on padding
    # the gradient of a loss through log-probs and entropy reaches the weights the same way
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1)) * mask

    def weight_grads(stats):
        model.zero_grad(set_to_none=True)
        ((stats.logprob + 0.1 * stats.entropy) * weights).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    expected = weight_grads(response_token_stats(model, *batch, temperature=temperature, need=NEED))
    got = weight_grads(bucketed_response_token_stats(model, *batch, temperature=temperature, need=NEED, overhead_tokens=0))
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4)
