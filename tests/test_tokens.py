"""entrorl.tokens: chunked statistics equal the naive full-vocabulary computation, values and gradients."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from entrorl.dynamics import token_discriminators
from entrorl.tokens import STAT_NAMES, default_chunk_size, token_stats, token_stats_from_hidden

ALL = STAT_NAMES


def naive_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """Reference: materialise log_softmax in float64 and reduce directly."""
    log_probs = torch.log_softmax(logits.double() / temperature, dim=-1)
    probs = log_probs.exp()
    safe_log_probs = torch.where(probs > 0, log_probs, torch.zeros_like(log_probs))
    entropy = -(probs * safe_log_probs).sum(-1)
    logprob = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    disc = logprob.exp() * (logprob + entropy)
    expected = (probs * probs * (safe_log_probs + entropy.unsqueeze(-1))).sum(-1)
    return {"logprob": logprob, "entropy": entropy, "disc": disc, "disc_centered": disc - expected}


def random_case(seed: int, shape=(3, 7), vocab=37, scale=3.0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=generator, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=generator)
    return logits, targets


@pytest.mark.parametrize("chunk_size", [1, 2, 5, None, 10_000])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_values_match_naive(chunk_size, temperature):
    logits, targets = random_case(0)
    stats = token_stats(logits, targets, temperature=temperature, chunk_size=chunk_size, need=ALL)
    reference = naive_stats(logits, targets, temperature)
    for name in ALL:
        value = getattr(stats, name)
        assert value.shape == targets.shape and value.dtype == torch.float64
        torch.testing.assert_close(value, reference[name], atol=1e-12, rtol=1e-10)


def test_flat_input_and_float32_output():
    logits, targets = random_case(1, shape=(11,), dtype=torch.float32)
    stats = token_stats(logits, targets, need=ALL)
    reference = naive_stats(logits, targets)
    for name in ALL:
        assert getattr(stats, name).dtype == torch.float32
        torch.testing.assert_close(getattr(stats, name).double(), reference[name], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_gradients_match_naive(temperature, chunk_size):
    logits, targets = random_case(2)
    weights_lp, weights_h = torch.randn(2, *targets.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))

    chunked = logits.clone().requires_grad_()
    stats = token_stats(chunked, targets, temperature=temperature, chunk_size=chunk_size)
    (stats.logprob * weights_lp + stats.entropy * weights_h).sum().backward()

    dense = logits.clone().requires_grad_()
    reference = naive_stats(dense, targets, temperature)
    (reference["logprob"] * weights_lp + reference["entropy"] * weights_h).sum().backward()
    torch.testing.assert_close(chunked.grad, dense.grad, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("which", ["logprob", "entropy"])
def test_gradient_of_one_output_only(which):
    logits, targets = random_case(3)
    chunked = logits.clone().requires_grad_()
    getattr(token_stats(chunked, targets), which).sum().backward()
    dense = logits.clone().requires_grad_()
    naive_stats(dense, targets)[which].sum().backward()
    torch.testing.assert_close(chunked.grad, dense.grad, atol=1e-12, rtol=1e-10)


def test_gradcheck_float64():
    logits, targets = random_case(4, shape=(2, 3), vocab=6)
    logits.requires_grad_()

    def fn(x):
        stats = token_stats(x, targets, temperature=0.8, chunk_size=2)
        return stats.logprob, stats.entropy

    assert torch.autograd.gradcheck(fn, (logits,))


def test_discriminators_are_detached_selection_statistics():
    logits, targets = random_case(5)
    logits.requires_grad_()
    stats = token_stats(logits, targets, need=ALL)
    assert stats.logprob.requires_grad and stats.entropy.requires_grad
    assert not stats.disc.requires_grad and not stats.disc_centered.requires_grad


def test_agrees_with_dense_theory_module():
    logits, targets = random_case(6, vocab=50)
    stats = token_stats(logits, targets, temperature=0.9, need=ALL)
    disc, centered = token_discriminators(logits, targets, temperature=0.9)
    torch.testing.assert_close(stats.disc, disc, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(stats.disc_centered, centered, atol=1e-12, rtol=1e-10)


def test_mask_computes_only_valid_positions_and_ignores_padding_targets():
    logits, targets = random_case(7, shape=(4, 6))
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.4
    padded_targets = torch.where(mask, targets, torch.full_like(targets, -100))
    chunked = logits.clone().requires_grad_()
    stats = token_stats(chunked, padded_targets, mask=mask, chunk_size=3, need=ALL)
    reference = naive_stats(logits, targets)
    for name in ALL:
        value = getattr(stats, name)
        torch.testing.assert_close(value[mask], reference[name][mask], atol=1e-12, rtol=1e-10)
        assert torch.all(value[~mask] == 0)
    (stats.logprob.sum() + stats.entropy.sum()).backward()
    assert torch.all(chunked.grad[~mask] == 0)
    dense = logits.clone().requires_grad_()
    naive = naive_stats(dense, targets)
    (naive["logprob"][mask].sum() + naive["entropy"][mask].sum()).backward()
    torch.testing.assert_close(chunked.grad, dense.grad, atol=1e-12, rtol=1e-10)


def test_empty_mask_gives_zeros_and_zero_gradient():
    logits, targets = random_case(8)
    logits.requires_grad_()
    mask = torch.zeros(targets.shape, dtype=torch.bool)
    stats = token_stats(logits, targets, mask=mask, need=ALL)
    assert all(torch.all(getattr(stats, name) == 0) for name in ALL)
    (stats.logprob.sum() + stats.entropy.sum()).backward()
    assert torch.all(logits.grad == 0)


def test_single_token():
    logits, targets = random_case(9, shape=(1,))
    stats = token_stats(logits, targets, need=ALL)
    reference = naive_stats(logits, targets)
    for name in ALL:
        torch.testing.assert_close(getattr(stats, name), reference[name], atol=1e-12, rtol=1e-10)


def test_minus_inf_logits_top_k_filtered():
    logits, targets = random_case(10, shape=(3, 5), vocab=20)
    filtered = logits.clone()
    threshold = logits.topk(4, dim=-1).values[..., -1:]
    filtered[logits < threshold] = float("-inf")
    kept_targets = logits.topk(4, dim=-1).indices[..., 0]  # sampled tokens are always among the kept ones
    chunked = filtered.clone().requires_grad_()
    stats = token_stats(chunked, kept_targets, chunk_size=4, need=ALL)
    for name in ALL:
        assert torch.isfinite(getattr(stats, name)).all(), name
    # equal to the statistics of the renormalised 4-token distribution
    top_logits = logits.topk(4, dim=-1).values
    reference = naive_stats(top_logits, torch.zeros_like(kept_targets))
    for name in ALL:
        torch.testing.assert_close(getattr(stats, name), reference[name], atol=1e-12, rtol=1e-10)
    (stats.logprob.sum() + stats.entropy.sum()).backward()
    assert torch.isfinite(chunked.grad).all()
    assert torch.all(chunked.grad[filtered == float("-inf")] == 0)


def test_all_minus_inf_row_gives_zeros_not_nan():
    logits = torch.full((2, 5), float("-inf"), dtype=torch.float64)
    logits[1] = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    logits.requires_grad_()
    stats = token_stats(logits, torch.tensor([0, 4]), need=ALL)
    assert all(torch.isfinite(getattr(stats, name)).all() for name in ALL)
    assert stats.entropy[0] == 0 and stats.logprob[0] == 0
    (stats.logprob.sum() + stats.entropy.sum()).backward()
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad[0] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_minus_inf_rows_in_half_precision_match_float32(dtype):
    """Half-precision logits with -inf entries (a fully masked row, a top-k filtered row) give the float32
    statistics of the same values: zeros for the fully masked row, values and gradients, never NaN."""
    logits = torch.full((3, 6), float("-inf"))
    logits[1] = torch.tensor([0.5, -1.0, 2.0, float("-inf"), 0.0, 1.0])
    logits[2] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    logits = logits.to(dtype)
    targets = torch.tensor([2, 2, 5])
    low = logits.clone().requires_grad_()
    stats = token_stats(low, targets, temperature=0.8, chunk_size=2, need=ALL)
    (stats.logprob.sum() + stats.entropy.sum()).backward()
    full = logits.float().requires_grad_()
    reference = token_stats(full, targets, temperature=0.8, chunk_size=2, need=ALL)
    (reference.logprob.sum() + reference.entropy.sum()).backward()
    for name in ALL:
        value = getattr(stats, name)
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), name
        assert value[0] == 0, name
        torch.testing.assert_close(value, getattr(reference, name))
    assert torch.isfinite(low.grad.float()).all() and torch.all(low.grad[0] == 0)
    torch.testing.assert_close(low.grad.float(), full.grad, atol=1e-3, rtol=1e-2)


def test_minus_inf_target_keeps_the_floor():
    """A target whose logit is -inf has log-prob (-1e4 - log sum_v exp((z_v - max z) / T)), finite instead of
    -inf; its S is 0 and its D is -E_p[S]; the gradient stays finite."""
    logits = torch.tensor([[0.0, float("-inf"), 1.0, 2.0], [0.3, -0.2, float("-inf"), 0.1]], dtype=torch.float64)
    targets = torch.tensor([1, 2])
    leaf = logits.clone().requires_grad_()
    stats = token_stats(leaf, targets, temperature=0.5, need=ALL)
    for name in ALL:
        assert torch.isfinite(getattr(stats, name)).all(), name
    for row in range(2):
        finite = logits[row][torch.isfinite(logits[row])]
        expected = -1e4 - torch.logsumexp((finite - finite.max()) / 0.5, dim=0)
        torch.testing.assert_close(stats.logprob[row], expected, atol=1e-9, rtol=0)
        kept = naive_stats(finite.unsqueeze(0), torch.zeros(1, dtype=torch.long), temperature=0.5)
        torch.testing.assert_close(stats.entropy[row], kept["entropy"][0], atol=1e-12, rtol=1e-10)
        expected_disc = kept["disc"][0] - kept["disc_centered"][0]  # E_p[S] of the kept entries
        torch.testing.assert_close(stats.disc_centered[row], -expected_disc, atol=1e-12, rtol=1e-10)
    assert torch.all(stats.disc == 0)
    (stats.logprob.sum() + stats.entropy.sum()).backward()
    assert torch.isfinite(leaf.grad).all()


def assert_each_subset_is_the_full_request(compute, together) -> None:
    """``compute(need)`` for every non-empty subset of the statistics gives exactly ``together``'s values of those, and
    None for the others."""
    for size in range(1, len(ALL) + 1):
        for subset in itertools.combinations(ALL, size):
            alone = compute(subset)
            for name in ALL:
                if name in subset:
                    torch.testing.assert_close(getattr(alone, name), getattr(together, name), atol=0, rtol=0)
                else:
                    assert getattr(alone, name) is None, (subset, name)


def test_each_subset_of_statistics_equals_the_full_request():
    """Asking for any subset of the statistics (e.g. only D, as a selector does) returns exactly those fields,
    equal to the ones computed together, and None for the others."""
    logits, targets = random_case(16)
    together = token_stats(logits, targets, temperature=0.9, chunk_size=4, need=ALL)
    assert_each_subset_is_the_full_request(
        lambda need: token_stats(logits, targets, temperature=0.9, chunk_size=4, need=need), together)


def test_from_hidden_low_precision_gradients_match_reference():
    """bfloat16 hidden states and LM head over many chunks: statistics and gradients match a float64 reduction
    of the same bfloat16 logits, up to bfloat16 rounding of the results (the weight gradient is accumulated
    across chunks in float32)."""
    generator = torch.Generator().manual_seed(17)
    hidden = torch.randn(64, 16, generator=generator).bfloat16().requires_grad_()
    weight = (torch.randn(48, 16, generator=generator) * 0.5).bfloat16().requires_grad_()
    targets = torch.randint(0, 48, (64,), generator=generator)
    stats = token_stats_from_hidden(hidden, weight, targets, chunk_size=4, need=ALL)
    (stats.logprob.sum() + stats.entropy.sum()).backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16

    logits = torch.nn.functional.linear(hidden.detach(), weight.detach()).double().requires_grad_()
    reference = naive_stats(logits, targets)
    (reference["logprob"].sum() + reference["entropy"].sum()).backward()
    for name in ALL:
        assert getattr(stats, name).dtype == torch.float32
        torch.testing.assert_close(getattr(stats, name).double(), reference[name].detach(), atol=1e-4, rtol=1e-4)
    weight_grad = logits.grad.t() @ hidden.detach().double()
    hidden_grad = logits.grad @ weight.detach().double()
    torch.testing.assert_close(weight.grad.double(), weight_grad, atol=1e-2 * float(weight_grad.abs().max()), rtol=1e-2)
    torch.testing.assert_close(hidden.grad.double(), hidden_grad, atol=1e-2 * float(hidden_grad.abs().max()), rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_are_finite(dtype):
    generator = torch.Generator().manual_seed(11)
    logits = (torch.randn(4, 300, generator=generator) * 1e4).to(dtype)
    logits[0, :] = 1e4  # an exactly uniform row
    targets = torch.randint(0, 300, (4,), generator=generator)
    leaf = logits.clone().requires_grad_()
    stats = token_stats(leaf, targets, need=ALL)
    for name in ALL:
        assert torch.isfinite(getattr(stats, name)).all(), name
    torch.testing.assert_close(stats.entropy[0], torch.tensor(math.log(300.0)), atol=1e-5, rtol=1e-5)
    (stats.logprob.sum() + stats.entropy.sum()).backward()
    assert torch.isfinite(leaf.grad.float()).all()


def test_unlikely_target_log_prob_is_exact_not_floored():
    logits = torch.tensor([[0.0, -5e4, 1.0]], dtype=torch.float64)
    stats = token_stats(logits, torch.tensor([1]))
    expected = -5e4 - math.log(math.exp(0.0) + math.exp(1.0))
    torch.testing.assert_close(stats.logprob, torch.tensor([expected], dtype=torch.float64), atol=1e-9, rtol=0)


def test_bfloat16_logits_match_float32_statistics():
    logits, targets = random_case(12, shape=(6, 9), vocab=500, dtype=torch.float32)
    low = logits.bfloat16()
    leaf = low.clone().requires_grad_()
    stats = token_stats(leaf, targets, need=ALL)
    reference = naive_stats(low.float(), targets)  # same rounded logits, exact reduction
    for name in ALL:
        assert getattr(stats, name).dtype == torch.float32
        torch.testing.assert_close(getattr(stats, name).double(), reference[name], atol=1e-4, rtol=1e-4)
    (stats.logprob.sum() + stats.entropy.sum()).backward()
    assert leaf.grad.dtype == torch.bfloat16 and torch.isfinite(leaf.grad.float()).all()


@pytest.mark.parametrize("vocab_chunk", [None, 1, 4, 28, 29])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_from_hidden_matches_logits_path(with_bias, chunk_size, vocab_chunk):
    generator = torch.Generator().manual_seed(13)
    hidden = torch.randn(3, 5, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(29, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(29, dtype=torch.float64, generator=generator, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 29, (3, 5), generator=generator)
    mask = torch.rand(3, 5, generator=generator) > 0.3
    g_lp, g_h = torch.randn(2, 3, 5, dtype=torch.float64, generator=generator)

    fused = token_stats_from_hidden(
        hidden, weight, targets, lm_head_bias=bias, temperature=0.8, mask=mask, chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk, need=ALL,
    )
    (fused.logprob * g_lp + fused.entropy * g_h).sum().backward()
    fused_grads = [t.grad.clone() for t in (hidden, weight, bias) if t is not None]
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None

    logits = torch.nn.functional.linear(hidden, weight, bias)
    dense = token_stats(logits, targets, temperature=0.8, mask=mask, need=ALL)
    (dense.logprob * g_lp + dense.entropy * g_h).sum().backward()
    dense_grads = [t.grad for t in (hidden, weight, bias) if t is not None]
    for name in ALL:
        torch.testing.assert_close(getattr(fused, name), getattr(dense, name), atol=1e-12, rtol=1e-10)
    for got, want in zip(fused_grads, dense_grads):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


def _fused_and_dense(hidden, weight, bias, targets, grads, **options):
    """Statistics and gradients of the fused path and of token_stats on the projected logits, same options."""
    results = []
    for fused in (True, False):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
        if fused:
            stats = token_stats_from_hidden(leaves[0], leaves[1], targets, lm_head_bias=leaves[2], need=ALL, **options)
        else:
            options = {key: value for key, value in options.items() if key != "vocab_chunk_size"}
            logits = torch.nn.functional.linear(leaves[0], leaves[1], leaves[2])
            stats = token_stats(logits, targets, need=ALL, **options)
        (stats.logprob * grads[0] + stats.entropy * grads[1]).sum().backward()
        results.append((stats, [t.grad for t in leaves if t is not None]))
    return results


@pytest.mark.parametrize("vocab_chunk", [1, 2, 5, 64])
def test_from_hidden_tiles_carry_the_maximum_across_the_vocabulary(vocab_chunk):
    """Rows whose largest logit lies in a late tile (the running maximum rises tile after tile, by hundreds of nats),
    a -inf bias masking columns (whole tiles of them), a row whose every logit is -inf, per-position temperatures and
    a mask: every statistic and gradient equals the dense path's."""
    generator = torch.Generator().manual_seed(41)
    vocab, dim = 64, 6
    hidden = torch.randn(4, 6, dim, dtype=torch.float64, generator=generator)
    weight = torch.randn(vocab, dim, dtype=torch.float64, generator=generator)
    bias = torch.linspace(-300.0, 300.0, vocab, dtype=torch.float64)  # rising maxima from tile to tile
    bias[10:30] = float("-inf")
    targets = torch.randint(0, vocab, (4, 6), generator=generator)
    targets[1, 1] = 12  # a target whose logit is -inf: log-prob floored, finite
    mask = torch.rand(4, 6, generator=generator) > 0.2
    mask[1, 1] = True
    temperature = 0.5 + torch.rand(4, 6, generator=generator, dtype=torch.float64)
    grads = torch.randn(2, 4, 6, dtype=torch.float64, generator=generator)
    (fused, fused_grads), (dense, dense_grads) = _fused_and_dense(
        hidden, weight, bias, targets, grads, temperature=temperature, mask=mask, chunk_size=5,
        vocab_chunk_size=vocab_chunk,
    )
    for name in ALL:
        torch.testing.assert_close(getattr(fused, name), getattr(dense, name), atol=1e-9, rtol=1e-9)
    for got, want in zip(fused_grads, dense_grads):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
    # every column masked: the row's statistics and gradients are zeros, as on the dense path
    all_masked = torch.full((vocab,), float("-inf"), dtype=torch.float64)
    (fused, fused_grads), (dense, dense_grads) = _fused_and_dense(
        hidden[:1], weight, all_masked, targets[:1], grads[:, :1], chunk_size=2, vocab_chunk_size=vocab_chunk)
    for name in ALL:
        assert torch.equal(getattr(fused, name), torch.zeros_like(getattr(fused, name))), name
        assert torch.equal(getattr(dense, name), getattr(fused, name)), name
    assert not fused_grads[0].any() and not fused_grads[1].any()


@pytest.mark.parametrize("vocab_chunk", [3, 50, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_hidden_tiles_at_low_precision_match_a_float64_reference(vocab_chunk, dtype):
    """Across tiles, float32 and bfloat16 heads give the float64 statistics of the logits they round to, and gradients
    within the precision of one product in their dtype."""
    generator = torch.Generator().manual_seed(42)
    hidden = torch.randn(96, 16, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(300, 16, generator=generator) * 0.7).to(dtype).requires_grad_()
    targets = torch.randint(0, 300, (96,), generator=generator)
    stats = token_stats_from_hidden(hidden, weight, targets, temperature=0.7, chunk_size=32,
                                    vocab_chunk_size=vocab_chunk, need=ALL)
    (stats.logprob.sum() + 0.5 * stats.entropy.sum()).backward()
    logits = torch.nn.functional.linear(hidden.detach(), weight.detach()).double().requires_grad_()
    reference = naive_stats(logits, targets, 0.7)
    (reference["logprob"].sum() + 0.5 * reference["entropy"].sum()).backward()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-4
    for name in ALL:
        torch.testing.assert_close(getattr(stats, name).double(), reference[name].detach(), atol=tolerance, rtol=tolerance)
    for got, want in ((weight.grad, logits.grad.t() @ hidden.detach().double()),
                      (hidden.grad, logits.grad @ weight.detach().double())):
        assert got.dtype == dtype
        limit = (1e-5 if dtype == torch.float32 else 1e-2) * float(want.abs().max())
        torch.testing.assert_close(got.double(), want, atol=limit, rtol=0)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_from_hidden_a_non_finite_logit_in_any_tile_gives_nan_in_its_row_only(bad):
    """A +inf or NaN logit in a late tile (a broken head column reached by one row) makes that row's statistics NaN,
    not a number computed from the tiles before it; the other rows are untouched."""
    generator = torch.Generator().manual_seed(43)
    hidden = torch.randn(3, 4, dtype=torch.float64, generator=generator)
    weight = torch.randn(20, 4, dtype=torch.float64, generator=generator)
    weight[17, 0] = 1e200
    hidden[1, 0] = 1e200 if bad == float("inf") else bad  # row 1's logit 17 is +inf, or all its logits are NaN
    targets = torch.tensor([3, 4, 5])
    grads = torch.randn(2, 3, dtype=torch.float64, generator=generator)
    (fused, fused_grads), (dense, dense_grads) = _fused_and_dense(hidden, weight, None, targets, grads,
                                                                  vocab_chunk_size=4)
    assert torch.isnan(fused.entropy[1]) and torch.isnan(fused.disc_centered[1])
    assert torch.isnan(fused_grads[0][1]).all()
    # -inf beside a +inf logit, NaN for NaN logits
    torch.testing.assert_close(fused.logprob[1], dense.logprob[1], equal_nan=True, atol=0, rtol=0)
    for name in ALL:
        torch.testing.assert_close(getattr(fused, name)[[0, 2]], getattr(dense, name)[[0, 2]], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(fused_grads[0][[0, 2]], dense_grads[0][[0, 2]], atol=1e-12, rtol=1e-10)


def test_from_hidden_default_tile_is_4m_elements_and_the_width_is_checked():
    """At a 152k vocabulary the default tile is 1024 rows by 4096 columns; a width below 1 is a ValueError."""
    import entrorl.tokens as tokens

    assert default_chunk_size(min(151_936, tokens._VOCAB_TILE)) == 1024
    with pytest.raises(ValueError, match="vocab_chunk_size"):
        token_stats_from_hidden(torch.randn(3, 4), torch.randn(10, 4), torch.zeros(3, dtype=torch.long),
                                vocab_chunk_size=0)


@pytest.mark.parametrize("vocab_chunk", [None, 16, 50])
def test_from_hidden_never_builds_full_logits(monkeypatch, vocab_chunk):
    """Every projection inside the fused path covers one tile: at most `chunk_size` rows by `vocab_chunk_size`
    columns, never all N rows nor (with a narrower tile) all V columns; each tile once forward, once backward."""
    import entrorl.tokens as tokens

    n_rows, vocab, chunk = 64, 50, 8
    hidden = torch.randn(n_rows, 16, requires_grad=True)
    weight = torch.randn(vocab, 16, requires_grad=True)
    targets = torch.randint(0, vocab, (n_rows,))
    seen = []
    original_project = tokens._project

    def spying_project(hidden_rows, weight, bias, columns, workspace):
        logits = original_project(hidden_rows, weight, bias, columns, workspace)
        seen.append(tuple(logits.shape))
        return logits

    monkeypatch.setattr(tokens, "_project", spying_project)
    stats = token_stats_from_hidden(hidden, weight, targets, chunk_size=chunk, vocab_chunk_size=vocab_chunk)
    (stats.logprob.sum() + stats.entropy.sum()).backward()
    width = vocab if vocab_chunk is None else vocab_chunk
    tiles = -(-vocab // width)
    assert max(rows for rows, _ in seen) == chunk and max(columns for _, columns in seen) == width
    assert len(seen) == 2 * (n_rows // chunk) * tiles


def test_backward_holds_no_second_full_size_tensor():
    """Peak extra memory of forward+backward stays near one chunk (checked via the chunk size, not timing):
    the custom Function saves its inputs and the per-row entropy, so the one full-size saved tensor is the logits."""
    logits, targets = random_case(14, shape=(40,), vocab=64, dtype=torch.float32)
    logits.requires_grad_()
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stats = token_stats(logits, targets, chunk_size=4)
    full_size = [t for t in saved if t.numel() >= logits.numel()]
    assert len(full_size) == 1 and full_size[0].data_ptr() == logits.data_ptr()
    (stats.logprob.sum() + stats.entropy.sum()).backward()


@pytest.mark.parametrize("fused", [False, True])
def test_a_shifted_slice_of_the_model_s_output_is_read_in_place_not_copied(fused):
    """``logits[:, :-1]`` (and hidden states sliced the same way), which no view can make [N, V]: the statistics and
    gradients equal those of a contiguous copy, no full-size tensor but the input is saved for the backward, and the
    forward reads one chunk of rows at a time."""
    torch.manual_seed(0)
    width = 16 if fused else 40
    full = torch.randn(3, 9, width, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(40, width, requires_grad=True) if fused else None
    shifted = full[:, :-1]
    targets = torch.randint(0, 40, (3, 8))
    mask = torch.rand(3, 8) > 0.3

    def stats_of(values):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            if fused:
                stats = token_stats_from_hidden(values, weight, targets, mask=mask, chunk_size=5, need=STAT_NAMES)
            else:
                stats = token_stats(values, targets, mask=mask, chunk_size=5, need=STAT_NAMES)
        return stats, saved

    copied = shifted.detach().contiguous().requires_grad_()
    reference, _ = stats_of(copied)
    stats, saved = stats_of(shifted)
    assert not shifted.is_contiguous()
    kept = [t.data_ptr() for t in saved if t.numel() >= shifted.numel() and t is not weight]  # the head: the model's
    assert kept == [full.data_ptr()]
    for name in STAT_NAMES:
        assert torch.equal(getattr(stats, name), getattr(reference, name)), name
    (stats.logprob.sum() + stats.entropy.sum()).backward()
    (reference.logprob.sum() + reference.entropy.sum()).backward()
    assert torch.equal(full.grad[:, :-1], copied.grad) and not full.grad[:, -1].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_temperature_per_position_equals_each_row_scored_at_its_own(dtype):
    """verl's per-row temperatures: each row's statistics and gradient are those of its own temperature, in the
    compute dtype (a bfloat16 division by T moved a row's entropy by up to 0.09 nats when its neighbours' T differed)."""
    torch.manual_seed(1)
    logits = (3 * torch.randn(2, 5, 300)).to(dtype).requires_grad_()
    targets = torch.randint(0, 300, (2, 5))
    temperature = torch.tensor([[0.6] * 5, [1.0, 1.3, 0.6, 2.0, 0.7]])
    stats = token_stats(logits, targets, temperature=temperature, chunk_size=3, need=STAT_NAMES)
    (stats.logprob.sum() + 2 * stats.entropy.sum()).backward()
    for b, t in itertools.product(range(2), range(5)):
        row = logits.detach()[b, t : t + 1].clone().requires_grad_()
        alone = token_stats(row, targets[b, t : t + 1], temperature=float(temperature[b, t]), need=STAT_NAMES)
        (alone.logprob.sum() + 2 * alone.entropy.sum()).backward()
        for name in STAT_NAMES:
            assert float(getattr(stats, name)[b, t].detach()) == pytest.approx(float(getattr(alone, name).detach()), rel=1e-6,
                                                                                abs=1e-6)
        torch.testing.assert_close(logits.grad[b, t : t + 1], row.grad, rtol=1e-6, atol=1e-6)
    reference = torch.log_softmax(logits.detach().double() / temperature.double().unsqueeze(-1), dim=-1)
    entropy = -(reference.exp() * reference).sum(-1)
    assert (stats.entropy.double() - entropy).abs().max() < 1e-5
    for bad, message in ((torch.ones(5), r"shaped like targets \(2, 5\)"), (torch.zeros(2, 5), "finite number > 0"),
                         (torch.ones(2, 5, dtype=torch.long), "must hold floats")):
        with pytest.raises(ValueError, match=message):
            token_stats(logits, targets, temperature=bad)
    # a one-element tensor is one temperature, as a number is
    for one in (torch.tensor(0.7), torch.tensor([0.7]), torch.tensor([0.7], requires_grad=True)):  # read without a warning
        assert torch.equal(token_stats(logits, targets, temperature=one).entropy,
                           token_stats(logits, targets, temperature=0.7).entropy)
    single = token_stats(logits[:1, 0], targets[:1, 0], temperature=torch.tensor([2])).entropy  # however targets look
    assert torch.equal(single, token_stats(logits[:1, 0], targets[:1, 0], temperature=2).entropy)
    # masked positions' temperatures are not read (padding of 0); the valid ones' statistics are unchanged
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    padded = temperature.clone()
    padded[1, 3:] = 0.0
    masked = token_stats(logits, targets, temperature=padded, mask=mask, need=STAT_NAMES)
    for name in STAT_NAMES:
        assert torch.equal(getattr(masked, name)[mask], getattr(stats, name)[mask].detach()), name
        assert not getattr(masked, name)[~mask].any()


def test_default_chunk_size():
    assert default_chunk_size(32_000) == (1 << 22) // 32_000
    assert default_chunk_size(10**9) == 1


def test_input_validation_messages():
    logits, targets = random_case(15)
    with pytest.raises(ValueError, match="unknown statistic"):
        token_stats(logits, targets, need=("logprob", "perplexity"))
    with pytest.raises(ValueError, match=r"unknown statistic\(s\) \['perplexity'\]"):  # one name, not its letters
        token_stats(logits, targets, need="perplexity")
    only = token_stats(logits, targets, need="entropy")
    assert only.entropy is not None and only.logprob is None
    with pytest.raises(ValueError, match="temperature"):
        token_stats(logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match="targets must have shape"):
        token_stats(logits, targets[:, :-1])
    with pytest.raises(ValueError, match=r"target ids must lie in \[0, 37\)"):
        token_stats(logits, targets + 100)
    with pytest.raises(ValueError, match="integer token ids"):
        token_stats(logits, targets.double())
    with pytest.raises(ValueError, match="integer token ids"):  # a boolean is a flag, not a token id
        token_stats(logits, targets > 5)
    with pytest.raises(ValueError, match="logits must be floating point"):
        token_stats(logits.round().long(), targets)
    huge = targets.clone()
    huge[0, 0] = 2**32 + 1  # not read modulo 2**32 as token 1
    with pytest.raises(ValueError, match=r"target ids must lie in \[0, 37\)"):
        token_stats(logits, huge)
    with pytest.raises(ValueError, match="mask must have the shape"):
        token_stats(logits, targets, mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_size"):
        token_stats(logits, targets, chunk_size=0)
    with pytest.raises(ValueError, match="lm_head_weight must be"):
        token_stats_from_hidden(torch.randn(3, 4), torch.randn(10, 5), torch.zeros(3, dtype=torch.long))
    # no vocabulary (or no hidden size): named, not a reshape error from inside
    with pytest.raises(ValueError, match=r"logits must have a last dimension above 0, got shape \(2, 0\)"):
        token_stats(torch.zeros(2, 0), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"hidden must have a last dimension above 0"):
        token_stats_from_hidden(torch.zeros(3, 0), torch.zeros(10, 0), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"lm_head_weight must be \[V, 4\] with V >= 1"):
        token_stats_from_hidden(torch.randn(3, 4), torch.zeros(0, 4), torch.zeros(3, dtype=torch.long))
    # a head of another dtype than the hidden states: named, not torch's matmul error
    with pytest.raises(ValueError, match=r"lm_head_weight is torch.float64 and hidden torch.float32; give them one dtype"):
        token_stats_from_hidden(torch.randn(3, 4), torch.randn(10, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"lm_head_bias is torch.bfloat16 and hidden torch.float32"):
        token_stats_from_hidden(torch.randn(3, 4), torch.randn(10, 4), torch.zeros(3, dtype=torch.long),
                                lm_head_bias=torch.zeros(10, dtype=torch.bfloat16))


def test_input_validation_edges():
    """An empty `need`, a non-finite or non-positive temperature and a target id equal to the vocabulary size
    are rejected with a clear ValueError rather than silently giving no or meaningless statistics."""
    logits, targets = random_case(18)
    with pytest.raises(ValueError, match="empty"):
        token_stats(logits, targets, need=())
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="temperature"):
            token_stats(logits, targets, temperature=bad)
        with pytest.raises(ValueError, match="temperature"):
            token_stats_from_hidden(
                torch.randn(3, 4), torch.randn(10, 4), torch.zeros(3, dtype=torch.long), temperature=bad
            )
    at_vocab = targets.clone()
    at_vocab[0, 0] = logits.shape[-1]
    with pytest.raises(ValueError, match=r"target ids must lie in \[0, 37\)"):
        token_stats(logits, at_vocab)
    with pytest.raises(ValueError, match=r"target ids must lie in \[0, 10\)"):
        token_stats_from_hidden(torch.randn(3, 4), torch.randn(10, 4), torch.tensor([0, 10, 1]))


def test_default_request_is_logprob_and_entropy_only():
    """Without `need`, both entry points return log-prob and entropy and leave S and D uncomputed (None)."""
    logits, targets = random_case(19)
    stats = token_stats(logits, targets)
    assert stats.logprob is not None and stats.entropy is not None
    assert stats.disc is None and stats.disc_centered is None
    assert set(stats.as_dict()) == {"logprob", "entropy"}
    fused = token_stats_from_hidden(torch.randn(4, 3, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64),
                                    torch.tensor([0, 8, 3, 1]))
    assert set(fused.as_dict()) == {"logprob", "entropy"}


def test_empty_batch_gives_empty_statistics_and_gradient():
    """Zero rows (an empty micro-batch, or sequences of length 0) give empty statistics, not an error."""
    for shape in ((0,), (2, 0)):
        logits = torch.randn(*shape, 11, dtype=torch.float64, requires_grad=True)
        targets = torch.zeros(shape, dtype=torch.long)
        stats = token_stats(logits, targets, need=ALL)
        for name in ALL:
            assert getattr(stats, name).shape == shape
        (stats.logprob.sum() + stats.entropy.sum()).backward()
        assert logits.grad.shape == logits.shape
        fused = token_stats_from_hidden(torch.randn(*shape, 3), torch.randn(11, 3), targets, need=ALL)
        assert all(getattr(fused, name).shape == shape for name in ALL)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_narrow_integer_targets_equal_int64_targets(dtype):
    """Token ids of any accepted integer dtype give exactly the statistics and gradients of int64 ids."""
    logits, targets = random_case(20, shape=(3, 4), vocab=40)
    wide = logits.clone().requires_grad_()
    reference = token_stats(wide, targets, chunk_size=5, need=ALL)
    (reference.logprob.sum() + reference.entropy.sum()).backward()
    narrow = logits.clone().requires_grad_()
    stats = token_stats(narrow, targets.to(dtype), chunk_size=5, need=ALL)
    (stats.logprob.sum() + stats.entropy.sum()).backward()
    for name in ALL:
        assert torch.equal(getattr(stats, name), getattr(reference, name)), name
    assert torch.equal(narrow.grad, wide.grad)


def test_mask_with_a_single_valid_token():
    """A mask with exactly one valid position (a one-token response) gives that token's statistics and gradient
    and zeros everywhere else, on both entry points."""
    logits, targets = random_case(21, shape=(2, 3))
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[1, 2] = True
    leaf = logits.clone().requires_grad_()
    stats = token_stats(leaf, targets, mask=mask, need=ALL)
    reference = naive_stats(logits, targets)
    for name in ALL:
        value = getattr(stats, name)
        torch.testing.assert_close(value[1, 2], reference[name][1, 2], atol=1e-12, rtol=1e-10)
        assert torch.all(value[~mask] == 0)
    (stats.logprob.sum() + stats.entropy.sum()).backward()
    dense = logits.clone().requires_grad_()
    naive = naive_stats(dense, targets)
    (naive["logprob"][1, 2] + naive["entropy"][1, 2]).backward()
    torch.testing.assert_close(leaf.grad, dense.grad, atol=1e-12, rtol=1e-10)
    hidden = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(22))
    weight = torch.randn(37, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(23))
    fused = token_stats_from_hidden(hidden, weight, targets, mask=mask, need=ALL)
    projected = naive_stats(hidden @ weight.t(), targets)
    for name in ALL:
        torch.testing.assert_close(getattr(fused, name)[1, 2], projected[name][1, 2], atol=1e-12, rtol=1e-10)


def test_from_hidden_each_subset_of_statistics_equals_the_full_request():
    """The fused path honours `need` like token_stats: any subset of the statistics equals the full request."""
    generator = torch.Generator().manual_seed(24)
    hidden = torch.randn(3, 5, 6, dtype=torch.float64, generator=generator)
    weight = torch.randn(23, 6, dtype=torch.float64, generator=generator)
    targets = torch.randint(0, 23, (3, 5), generator=generator)
    together = token_stats_from_hidden(hidden, weight, targets, temperature=0.9, chunk_size=4, need=ALL)
    reference = naive_stats(hidden @ weight.t(), targets, 0.9)
    for name in ALL:
        torch.testing.assert_close(getattr(together, name), reference[name], atol=1e-12, rtol=1e-10)
    assert_each_subset_is_the_full_request(
        lambda need: token_stats_from_hidden(hidden, weight, targets, temperature=0.9, chunk_size=4, need=need), together)


def test_from_hidden_rejects_a_bias_of_the_wrong_shape():
    """A bias must have one entry per vocabulary row: a length-1 bias (which would broadcast silently) or one of the
    wrong length is a ValueError."""
    hidden, weight, targets = torch.randn(3, 4), torch.randn(10, 4), torch.tensor([0, 9, 2])
    for bad in (torch.randn(1), torch.randn(11), torch.randn(1, 10)):
        with pytest.raises(ValueError, match=r"lm_head_bias must be \[10\]"):
            token_stats_from_hidden(hidden, weight, targets, lm_head_bias=bad)


def test_default_chunk_size_for_large_vocabularies():
    """The default chunk holds at most 4M elements and is as large as that allows, for real vocabulary sizes."""
    for vocab in (50_257, 128_256, 151_936, 262_144):
        rows = default_chunk_size(vocab)
        assert rows == (1 << 22) // vocab
        assert rows * vocab <= 1 << 22 < (rows + 1) * vocab
    assert default_chunk_size(151_936) == 27


def test_padding_targets_outside_the_vocabulary_are_ignored_under_the_mask():
    """Padding ids at masked positions may be any integer (the vocabulary size, a huge id, -100): they are never
    range-checked nor gathered, and give exactly the statistics and gradient of in-range padding."""
    logits, targets = random_case(25, shape=(3, 5), vocab=37)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(26)) > 0.4
    clean = logits.clone().requires_grad_()
    reference = token_stats(clean, torch.where(mask, targets, torch.zeros_like(targets)), mask=mask, chunk_size=2, need=ALL)
    (reference.logprob.sum() + reference.entropy.sum()).backward()
    for pad in (37, 10**6, -100):
        leaf = logits.clone().requires_grad_()
        padded = torch.where(mask, targets, torch.full_like(targets, pad))
        stats = token_stats(leaf, padded, mask=mask, chunk_size=2, need=ALL)
        for name in ALL:
            assert torch.equal(getattr(stats, name), getattr(reference, name)), (pad, name)
        (stats.logprob.sum() + stats.entropy.sum()).backward()
        assert torch.equal(leaf.grad, clean.grad), pad
        hidden = torch.randn(3, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(27))
        weight = torch.randn(37, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(28))
        fused = token_stats_from_hidden(hidden, weight, padded, mask=mask, need=ALL)
        projected = naive_stats(hidden @ weight.t(), torch.where(mask, targets, torch.zeros_like(targets)))
        for name in ALL:
            torch.testing.assert_close(getattr(fused, name)[mask], projected[name][mask], atol=1e-12, rtol=1e-10)


def test_from_hidden_bias_gradient_is_accumulated_across_chunks_in_float32():
    """bfloat16 LM head with a bias, one row per chunk, per-token loss weights of both signs that nearly cancel:
    the bias gradient is the float64 sum rounded once to bfloat16, not a sum of bfloat16-rounded chunk sums."""
    generator = torch.Generator().manual_seed(32)
    n, vocab, target = 64, 16, 3
    hidden = torch.randn(1, 8, generator=generator).expand(n, 8).bfloat16().contiguous().requires_grad_()
    weight = (torch.randn(vocab, 8, generator=generator) * 0.3).bfloat16().requires_grad_()
    bias = (torch.randn(vocab, generator=generator) * 0.3).bfloat16().requires_grad_()
    loss_weights = torch.tensor([1.0, -1.0]).repeat(n // 2) * (3.0 + 0.1 * torch.arange(n) / n)
    stats = token_stats_from_hidden(hidden, weight, torch.full((n,), target), lm_head_bias=bias, chunk_size=1)
    (stats.logprob * loss_weights).sum().backward()
    assert bias.grad.dtype == torch.bfloat16
    # every row has the same logits z, so d/d bias of sum_i w_i log p_y = (sum_i w_i) (onehot_y - p)
    logits = torch.nn.functional.linear(hidden.detach()[:1], weight.detach(), bias.detach()).double()[0]
    expected = loss_weights.double().sum() * (torch.nn.functional.one_hot(torch.tensor(target), vocab).double()
                                              - torch.softmax(logits, dim=-1))
    # within bfloat16 rounding of the result itself (8 significant bits)
    assert torch.all((bias.grad.double() - expected).abs() <= expected.abs() * 2.0**-8 + 1e-5)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_plus_inf_or_nan_logit_gives_nan_in_its_row_only_values_and_gradient(bad):
    """A +inf or NaN logit describes no distribution: its row's statistics and gradient are NaN (never zeros that
    pass for a masked row), while the other rows keep their exact values and gradients."""
    logits, targets = random_case(29, shape=(4,), vocab=9)
    logits[1, 4] = bad
    leaf = logits.clone().requires_grad_()
    stats = token_stats(leaf, targets, chunk_size=3, need=ALL)
    (stats.logprob.sum() + stats.entropy.sum()).backward()
    assert torch.isnan(stats.entropy[1]) and torch.isnan(leaf.grad[1]).all()
    good = torch.tensor([0, 2, 3])
    dense = logits[good].clone().requires_grad_()
    reference = naive_stats(dense, targets[good])
    (reference["logprob"].sum() + reference["entropy"].sum()).backward()
    for name in ALL:
        torch.testing.assert_close(getattr(stats, name)[good], reference[name], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(leaf.grad[good], dense.grad, atol=1e-12, rtol=1e-10)


def test_the_statistics_differentiate_under_torch_func_grad_as_under_autograd():
    """torch.func.grad of a loss built on token_stats / token_stats_from_hidden: the autograd Functions define
    setup_context apart from forward, as torch.func requires, and give autograd's gradient; a second derivative
    (create_graph=True, nested torch.func.grad) is refused: the backward passes record no graph, so it would be 0."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, generator=generator)
    hidden = torch.randn(2, 3, 4, dtype=torch.float64, generator=generator)
    weight, bias = torch.randn(5, 4, dtype=torch.float64, generator=generator), torch.randn(5, dtype=torch.float64)
    targets = torch.randint(0, 5, (2, 3), generator=generator)
    mask = torch.tensor([[True, True, False], [True, False, True]])

    def from_logits(values):
        stats = token_stats(values, targets, mask=mask, temperature=0.7)
        return stats.logprob.sum() + 0.5 * stats.entropy.sum()

    def from_hidden(values, head, head_bias):
        stats = token_stats_from_hidden(values, head, targets, lm_head_bias=head_bias, mask=mask,
                                        need=("logprob", "entropy", "disc"), vocab_chunk_size=2)
        return stats.logprob.sum() + 0.5 * stats.entropy.sum()

    for loss, inputs in ((from_logits, (logits,)), (from_hidden, (hidden, weight, bias))):
        tracked = [value.clone().requires_grad_() for value in inputs]
        loss(*tracked).backward()
        functional = torch.func.grad(loss, argnums=tuple(range(len(inputs))))(*inputs)
        for got, value in zip(functional, tracked):
            torch.testing.assert_close(got, value.grad)
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.autograd.grad(loss(*tracked), tracked[0], create_graph=True)
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.func.grad(lambda first: torch.func.grad(loss)(first, *inputs[1:]).sum())(inputs[0])
