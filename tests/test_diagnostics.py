"""The trainer's entropy diagnostics against the theory on a tabular policy (logits as free parameters)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from entrorl.objective import PolicyBatch, build_objective
from entrorl.tokens import token_stats
from entrorl.trainer.diagnostics import (
    FirstOrderEntropyChange,
    covariance_summary,
    decision_points,
    discriminator_summary,
    entropy_summary,
    predicted_vs_measured,
    readable_text,
    top_fork_tokens,
)


class CharTokenizer:
    """Decodes each id as the character of that code point."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("method", ["grpo", "dapo+clip_b", "entropy_advantage"])
def test_prediction_matches_a_tabular_sgd_step(temperature, method):
    """With the logits themselves as parameters and one small SGD step, the per-token prediction
    -alpha D (alpha = -lr g / T^2, g = d loss / d log p) equals the measured entropy change to first order."""
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 9, 40, generator=generator, dtype=torch.float64) * 2).requires_grad_()
    tokens = torch.randint(0, 40, (6, 9), generator=generator)
    mask = torch.rand(6, 9, generator=generator) > 0.2
    advantages = torch.randn(6, generator=generator, dtype=torch.float64)
    stats = token_stats(logits, tokens, temperature=temperature, mask=mask, need=("logprob", "entropy", "disc", "disc_centered"))
    stats.logprob.retain_grad()
    batch = PolicyBatch(log_prob=stats.logprob, old_log_prob=stats.logprob.detach(), advantages=advantages, mask=mask,
                        entropy=stats.entropy.detach(), disc=stats.disc, disc_centered=stats.disc_centered)
    build_objective(method)(batch).loss.backward()
    lr = 1e-3
    with torch.no_grad():
        after = token_stats(logits - lr * logits.grad, tokens, temperature=temperature, mask=mask).entropy
    metrics, predicted = predicted_vs_measured(stats.logprob.grad, stats.disc_centered, stats.entropy, after, mask,
                                               lr=lr, temperature=temperature)
    measured = (after - stats.entropy.detach())[mask]
    assert metrics["entropy/delta_token_corr"] > 0.999
    torch.testing.assert_close(predicted[mask].double(), measured, atol=1e-6, rtol=1e-2)
    assert metrics["entropy/predicted_delta"] == pytest.approx(float(measured.mean()), rel=1e-2)


def test_decision_points_are_shared_by_rows_with_the_same_prompt_and_prefix():
    prompt_ids = torch.tensor([[0, 5, 6], [0, 5, 6], [9, 5, 6], [7, 7, 7]])
    prompt_mask = torch.tensor([[False, True, True], [False, True, True], [True, True, True], [True, True, True]])
    responses = torch.tensor([[1, 2, 3], [1, 4, 3], [1, 2, 3], [1, 2, 3]])
    points = decision_points(prompt_ids, prompt_mask, responses)
    # rows 0 and 1 share the prompt "5 6" and the first response token, then part; rows 2 and 3 have prompts of their own
    assert points[0, 0] == points[1, 0] and points[0, 1] == points[1, 1] and points[0, 2] != points[1, 2]
    assert len({int(p) for p in points[:, 0]}) == 3 and len(set(points.flatten().tolist())) == 3 + 3 + 4
    # against a plain walk down each row's prefix, on random batches with few distinct tokens (many shared points)
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        prompts, kept = torch.randint(0, 2, (12, 3), generator=generator), torch.rand(12, 3, generator=generator) > 0.3
        responses = torch.randint(0, 3, (12, 5), generator=generator)
        seen, expected = {}, torch.empty(responses.shape, dtype=torch.long)
        for row in range(12):
            state = tuple(prompts[row][kept[row]].tolist())
            for position in range(5):
                expected[row, position] = seen.setdefault((position, state), len(seen))
                state = (state, int(responses[row, position]))
        got = decision_points(prompts, kept, responses).flatten()
        assert torch.equal(got[:, None] == got[None, :], expected.flatten()[:, None] == expected.flatten()[None, :])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_prediction_sums_the_updates_of_a_shared_decision_point(temperature):
    """A group's samples share their first position (and more while their responses agree): on a tabular policy
    whose logits belong to decision points, one SGD step changes a point's entropy by the sum of -alpha D over the
    tokens sampled there, which is what each of them is predicted (a prediction per token alone does not match)."""
    generator = torch.Generator().manual_seed(1)
    rows, width, vocab = 8, 3, 3
    prompt_ids = torch.tensor([[4], [5]]).repeat_interleave(4, dim=0)
    responses = torch.randint(0, vocab, (rows, width), generator=generator)
    points = decision_points(prompt_ids, torch.ones_like(prompt_ids, dtype=torch.bool), responses)
    assert points.unique().numel() < rows * width  # some points are shared
    table = (torch.randn(int(points.max()) + 1, vocab, generator=generator, dtype=torch.float64)).requires_grad_()
    mask = torch.ones(rows, width, dtype=torch.bool)
    stats = token_stats(table[points], responses, temperature=temperature, mask=mask,
                        need=("logprob", "entropy", "disc", "disc_centered"))
    stats.logprob.retain_grad()
    advantages = torch.randn(rows, generator=generator, dtype=torch.float64)
    batch = PolicyBatch(log_prob=stats.logprob, old_log_prob=stats.logprob.detach(), advantages=advantages, mask=mask,
                        entropy=stats.entropy.detach(), disc=stats.disc, disc_centered=stats.disc_centered)
    build_objective("grpo")(batch).loss.backward()
    lr = 1e-4
    with torch.no_grad():
        after = token_stats((table - lr * table.grad)[points], responses, temperature=temperature, mask=mask).entropy
    measured = (after - stats.entropy.detach())[mask]
    common = dict(lr=lr, temperature=temperature)
    metrics, predicted = predicted_vs_measured(stats.logprob.grad, stats.disc_centered, stats.entropy, after, mask,
                                               points=points, **common)
    torch.testing.assert_close(predicted[mask].double(), measured, atol=1e-9, rtol=1e-3)
    assert metrics["entropy/delta_token_corr"] > 0.9999
    alone, per_token = predicted_vs_measured(stats.logprob.grad, stats.disc_centered, stats.entropy, after, mask, **common)
    assert alone["entropy/delta_token_corr"] < 0.99  # each token's own update is not its point's change
    # the step's total is the same either way: each token's own -alpha D, summed once
    assert metrics["entropy/predicted_delta_sum"] == pytest.approx(float(per_token[mask].double().sum()), rel=1e-6)


def test_summaries_on_a_hand_example():
    entropy = torch.tensor([[0.0, 1.0, 2.0], [3.0, 100.0, 0.001]])
    mask = torch.tensor([[True, True, True], [True, False, True]])
    summary = entropy_summary(entropy, mask)
    assert summary["entropy/mean"] == pytest.approx((0 + 1 + 2 + 3 + 0.001) / 5)
    assert summary["entropy/max"] == 3.0 and summary["entropy/low_frac"] == pytest.approx(2 / 5)
    advantages = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    disc = torch.tensor([[0.2, -0.1, 0.3], [-0.4, 9.0, 0.1]])
    stats = discriminator_summary(disc, disc, advantages, mask)
    assert stats["disc/mean_pos_adv"] == pytest.approx(0.4 / 3) and stats["disc/mean_neg_adv"] == pytest.approx(-0.15)
    assert stats["disc/confident_frac"] == pytest.approx(3 / 5)
    assert math.isnan(discriminator_summary(disc, disc, torch.ones_like(disc), mask)["disc/mean_neg_adv"])
    assert covariance_summary(torch.zeros(2, 3), advantages, torch.zeros(2, 3, dtype=torch.bool)) == {}


def test_top_fork_tokens_decodes_in_context():
    prompt_ids = torch.tensor([[0, ord("Q")]])
    prompt_mask = torch.tensor([[False, True]])
    response_ids = torch.tensor([[ord("a"), ord("b"), ord("c"), 0]])
    response_mask = torch.tensor([[True, True, True, False]])
    entropy = torch.tensor([[0.1, 2.0, 0.5, 99.0]])
    forks = top_fork_tokens(CharTokenizer(), prompt_ids, prompt_mask, response_ids, response_mask, entropy, k=2)
    assert [f["token"] for f in forks] == ["b", "c"]  # the padding position is never a fork
    assert forks[0]["before"] == "Qa" and forks[0]["after"] == "c"


def test_top_fork_tokens_lists_each_decision_point_once():
    # three samples of one prompt: "ab", "ac", "xb"; position 0 is one state for all, position 1 after "a" is one
    # state for the first two rows (where they chose b and c), position 1 after "x" is the third row's alone
    prompt_ids = torch.tensor([[ord("Q")]] * 3)
    prompt_mask = torch.ones(3, 1, dtype=torch.bool)
    response_ids = torch.tensor([[ord("a"), ord("b")], [ord("a"), ord("c")], [ord("x"), ord("b")]])
    response_mask = torch.ones(3, 2, dtype=torch.bool)
    entropy = torch.tensor([[3.0, 2.0], [3.0, 2.0], [3.0, 1.0]])
    forks = top_fork_tokens(CharTokenizer(), prompt_ids, prompt_mask, response_ids, response_mask, entropy, k=5,
                            sources=["p.jsonl:1"] * 3)
    assert [(f["before"], f["samples"], f["chosen"]) for f in forks] == [
        ("Q", 3, {"a": 2, "x": 1}), ("Qa", 2, {"b": 1, "c": 1}), ("Qx", 1, {"b": 1})]
    assert [f["entropy"] for f in forks] == [3.0, 2.0, 1.0] and {f["source"] for f in forks} == {"p.jsonl:1"}
    # a greedy evaluation (every sample the same) has one decision point per position, not one per sample
    same = torch.tensor([[ord("a"), ord("b")]] * 3)
    greedy = top_fork_tokens(CharTokenizer(), prompt_ids, prompt_mask, same, response_mask, entropy, k=5)
    assert [(f["position"], f["samples"]) for f in greedy] == [(0, 3), (1, 3)]
    # rows of one decision point scored in other batches differ by float32's rounding: the fork is its first row's
    rounded = torch.tensor([[3.0, 2.0], [3.0 + 1e-6, 2.0], [3.0 - 1e-6, 1.0]])
    forks = top_fork_tokens(CharTokenizer(), prompt_ids, prompt_mask, response_ids, response_mask, rounded, k=5,
                            sources=["p.jsonl:1", "p.jsonl:2", "p.jsonl:3"])
    assert [(f["sample"], f["entropy"], f["token"], f["after"], f["source"]) for f in forks[:1]] == [
        (0, 3.0, "a", "b", "p.jsonl:1")]
    # and it is ranked by that row's entropy: row 2's own point (3.0 + 2e-7 there) comes first
    rounded = torch.tensor([[3.0, 2.0], [3.0 + 4e-7, 2.0], [3.0, 3.0 + 2e-7]])
    forks = top_fork_tokens(CharTokenizer(), prompt_ids, prompt_mask, response_ids, response_mask, rounded, k=1)
    assert [(f["sample"], f["position"]) for f in forks] == [(2, 1)]


def _byte_level_bpe():
    """A byte-level BPE (GPT-2's kind) trained on ASCII text: every byte of ``日`` and ``本`` is a token of its own."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(["the cat sat on the mat"] * 4, vocab_size=270, min_frequency=1, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=trained._tokenizer)


def _byte_fallback_bpe():
    """A sentencepiece-style BPE (Llama's kind): characters outside its vocabulary become ``<0xNN>`` byte pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"<0x{byte:02X}>": 1 + byte for byte in range(256)}, "\u2581": 257, "a": 258, "b": 259,
             "\u2581a": 260}
    model = Tokenizer(models.BPE(vocab=vocab, merges=[("\u2581", "a")], byte_fallback=True, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                       decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=model)


@pytest.mark.parametrize("make_tokenizer", [_byte_level_bpe, _byte_fallback_bpe])
def test_readable_text_shows_the_bytes_of_a_split_character_instead_of_replacement_characters(make_tokenizer):
    tokenizer = make_tokenizer()
    ids = tokenizer.encode("a 日本")
    pieces = [readable_text(tokenizer, [token]) for token in ids]
    assert "\ufffd" in "".join(tokenizer.decode([token]) for token in ids)  # what a plain decode shows
    assert pieces[-6:] == ["<0xE6>", "<0x97>", "<0xA5>", "<0xE6>", "<0x9C>", "<0xAC>"]  # UTF-8 of 日本
    assert readable_text(tokenizer, ids) == tokenizer.decode(ids) == "a 日本"  # whole characters decode as usual
    assert readable_text(tokenizer, ids[-5:]) == "<0x97><0xA5>本"  # a context that starts inside a character
    assert readable_text(tokenizer, ids[:-2]) == "a 日<0xE6>"
    after = tokenizer.encode("日 b a")  # text after a split character keeps its spaces
    first_byte = [readable_text(tokenizer, [token]) for token in after].index("<0xE6>")
    assert readable_text(tokenizer, after[first_byte + 1:]) == "<0x97><0xA5> b a"


def test_a_padded_position_is_not_a_sample_of_its_decision_point():
    """Rows "ab" and "a" (then padding) share the point after "a", but only the first samples there."""
    prompt_ids = torch.tensor([[ord("Q")]] * 2)
    response_ids = torch.tensor([[ord("a"), ord("b")], [ord("a"), 0]])
    response_mask = torch.tensor([[True, True], [True, False]])
    entropy = torch.tensor([[1.0, 2.0], [1.0, 5.0]])
    forks = top_fork_tokens(CharTokenizer(), prompt_ids, torch.ones(2, 1, dtype=torch.bool), response_ids,
                            response_mask, entropy, k=5)
    assert [(f["position"], f["samples"], f["chosen"]) for f in forks] == [(1, 1, {"b": 1}), (0, 2, {"a": 2})]


def test_top_fork_tokens_keeps_different_bytes_apart():
    """Two samples that chose different bytes at one decision point: two choices, not one U+FFFD counted twice."""
    tokenizer = _byte_level_bpe()
    first, second = tokenizer.encode("日")[0], tokenizer.encode("本")[1]
    prompt_ids = torch.tensor([tokenizer.encode("the")] * 2)
    prompt_mask = torch.ones_like(prompt_ids, dtype=torch.bool)
    response_ids = torch.tensor([[first], [second]])
    forks = top_fork_tokens(tokenizer, prompt_ids, prompt_mask, response_ids, torch.ones(2, 1, dtype=torch.bool),
                            torch.ones(2, 1), k=1)
    assert forks[0]["chosen"] == {"<0xE6>": 1, "<0x9C>": 1} and forks[0]["token"] == "<0xE6>"


def test_first_order_change_keeps_a_change_far_below_the_weights_rounding():
    """g . theta_after - g . theta_before in float64 equals g . (theta_after - theta_before) where the change is 2e-7 of
    g . theta (float32 would keep none of it), and a parameter without a gradient counts for nothing."""
    generator = torch.Generator().manual_seed(0)
    weights = [1000 + torch.randn(300, generator=generator), torch.randn(7, generator=generator)]
    gradient = [torch.randn(300, generator=generator), None]
    change = FirstOrderEntropyChange(weights, gradient)
    step = 1e-4 * torch.randn(300, generator=generator)
    moved = weights[0] + step  # float32: the step is rounded to the weights' grid, as an optimizer's would be
    with torch.no_grad():
        applied = moved.double() - weights[0].double()
        weights[0].copy_(moved)
        weights[1].add_(1.0)
    expected = float(gradient[0].double() @ applied)
    assert expected != 0.0 and change.after_update() == pytest.approx(expected, rel=1e-7)
    with pytest.raises(ValueError, match="1 gradients for 2 parameters"):
        FirstOrderEntropyChange(weights, gradient[:1])
    with pytest.raises(ValueError, match="3 gradients for 2 parameters"):
        FirstOrderEntropyChange(weights, gradient + [torch.ones(7)])


def _two_rows_at_one_decision_point():
    """Two rows, one position each, one shared decision point; both trained, only row 0 measured again."""
    return predicted_vs_measured(
        torch.tensor([[1.0], [1.0]]), torch.tensor([[1.0], [2.0]]), torch.zeros(2, 1), torch.full((2, 1), 0.5),
        torch.tensor([[True], [False]]), lr=1.0, temperature=1.0, points=torch.tensor([[0], [0]]),
        trained_mask=torch.tensor([[True], [True]]))


def test_the_prediction_sums_every_trained_token_measured_or_not():
    """A position's prediction adds the moves of every trained token at its decision point (Thm 3.3 per point), the
    batch sum covers every trained token, and the mean prediction is over the measured positions' point sums: here
    -alpha D = 1 + 2 for every position."""
    metrics, predicted = _two_rows_at_one_decision_point()
    assert predicted.flatten().tolist() == pytest.approx([3.0, 3.0])
    assert metrics["entropy/predicted_delta_sum"] == pytest.approx(3.0)
    assert metrics["entropy/predicted_delta_batch"] == pytest.approx(3.0)
    assert metrics["entropy/predicted_delta"] == pytest.approx(3.0)


def test_the_covariance_summary_centres_on_the_valid_tokens_only():
    """C_t centres log p and A over the valid tokens (SPEC 1): the padding's values move nothing."""
    summary = covariance_summary(torch.tensor([[-1.0, -2.0, 100.0]]), torch.tensor([[1.0, -1.0, 50.0]]),
                                 torch.tensor([[True, True, False]]))
    assert summary["cov/mean"] == pytest.approx(0.5) and summary["cov/n_tokens"] == 2.0


def test_entropy_summary_quantiles_and_low_share_are_over_the_mask():
    entropy = torch.tensor([[0.0, 0.01, 0.5, 50.0], [1.0, 2.0, 3.0, -4.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, True, True, False]])
    summary = entropy_summary(entropy, mask)
    valid = np.array([0.0, 0.01, 0.5, 1.0, 2.0, 3.0])
    for name, q in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9)):
        assert summary[f"entropy/{name}"] == pytest.approx(float(np.quantile(valid, q)), rel=1e-6), name
    assert summary["entropy/mean"] == pytest.approx(valid.mean()) and summary["entropy/max"] == 3.0
    assert summary["entropy/low_frac"] == pytest.approx(1 / 6)  # 0.01 itself is not below 0.01
    assert entropy_summary(entropy, torch.zeros_like(mask)) == {}


def test_entropy_summary_gives_its_quantiles_for_a_step_of_16m_tokens():
    """torch.quantile refuses 16M values or more; a large step (512 prompts x 16 samples x 2k tokens) still logs
    entropy/p10, p50 and p90, numpy's linear-interpolation quantiles."""
    entropy = torch.linspace(0, 1, 16_000_001).reshape(1, -1)
    summary = entropy_summary(entropy, torch.ones_like(entropy, dtype=torch.bool))
    for name, q in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9)):
        assert summary[f"entropy/{name}"] == pytest.approx(q, abs=1e-6), name
    assert summary["entropy/max"] == 1.0


def test_entropy_summary_quantiles_are_nan_beside_a_nan_entropy():
    """A NaN entropy (a broken forward pass) makes the mean, the maximum and every quantile NaN, as numpy's."""
    entropy = torch.tensor([[0.5, float("nan"), 0.2, 0.1]])
    summary = entropy_summary(entropy, torch.ones_like(entropy, dtype=torch.bool))
    assert all(math.isnan(summary[f"entropy/{name}"]) for name in ("mean", "max", "p10", "p50", "p90"))


def test_discriminator_summary_against_numpy():
    disc = torch.tensor([[0.2, 0.0, -0.3, 5.0], [0.4, -0.1, 0.0, -7.0]], dtype=torch.float64)
    centered = torch.tensor([[0.1, -0.2, 0.3, 9.0], [-0.4, 0.5, 0.6, 9.0]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, 1.0, 0.0, 1.0], [-2.0, 0.0, -2.0, -2.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, False]])
    stats = discriminator_summary(disc, centered, advantages, mask)
    for name, values in (("disc", disc), ("disc_centered", centered)):
        valid = values[mask].numpy()
        assert stats[f"{name}/mean"] == pytest.approx(valid.mean(), abs=1e-12)
        assert stats[f"{name}/std"] == pytest.approx(valid.std(), abs=1e-12)  # population std
        # zero-advantage tokens are on neither side
        assert stats[f"{name}/mean_pos_adv"] == pytest.approx(values[0, :2].mean().item(), abs=1e-12)
        assert stats[f"{name}/mean_neg_adv"] == pytest.approx(values[1, [0, 2]].mean().item(), abs=1e-12)
    assert stats["disc/confident_frac"] == pytest.approx(2 / 6)  # S = 0 is not confident


def test_a_measured_position_that_was_not_trained_is_predicted_no_change():
    """Without decision points each position's prediction is its own trained token's -alpha D: a measured position
    that was not trained predicts 0, and predicted_delta averages over the measured positions."""
    metrics, predicted = predicted_vs_measured(
        torch.tensor([[1.0], [1.0]]), torch.tensor([[1.0], [2.0]]), torch.zeros(2, 1), torch.tensor([[0.5], [0.25]]),
        torch.tensor([[True], [True]]), lr=1.0, temperature=1.0, trained_mask=torch.tensor([[True], [False]]))
    assert predicted.flatten().tolist() == pytest.approx([1.0, 0.0])
    assert metrics["entropy/predicted_delta"] == pytest.approx(0.5)
    assert metrics["entropy/predicted_delta_batch"] == pytest.approx(1.0)
    assert metrics["entropy/predicted_delta_sum"] == pytest.approx(1.0)
    assert metrics["entropy/measured_delta"] == pytest.approx(0.375)
    assert metrics["entropy/delta_token_corr"] == pytest.approx(1.0)


def test_an_empty_mask_predicts_and_measures_nothing():
    metrics, predicted = predicted_vs_measured(
        torch.ones(2, 3), torch.ones(2, 3), torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool),
        lr=1.0, temperature=1.0)
    # a mean over no token is NaN (written as null); the sum of no prediction is 0
    assert metrics["entropy/predicted_delta_sum"] == 0.0 and sorted(metrics) == [
        "entropy/predicted_delta", "entropy/predicted_delta_batch", "entropy/predicted_delta_sum"]
    assert math.isnan(metrics["entropy/predicted_delta"]) and math.isnan(metrics["entropy/predicted_delta_batch"])
    assert torch.equal(predicted, torch.zeros(2, 3))
    # responses of no tokens at all: no decision point either
    empty = torch.zeros(2, 0)
    metrics, predicted = predicted_vs_measured(empty, empty, empty, empty, torch.zeros(2, 0, dtype=torch.bool), lr=1.0,
                                               temperature=1.0, points=torch.zeros(2, 0, dtype=torch.long))
    assert metrics["entropy/predicted_delta_sum"] == 0.0 and predicted.shape == (2, 0)


def test_first_order_change_covers_a_parameter_larger_than_one_slice():
    """An embedding-sized parameter (over 2**22 entries) is read slice by slice; every slice counts, and so does a
    parameter of a single entry."""
    size = 2**22 + 1000
    weights = [torch.zeros(size), torch.zeros(1)]
    gradient = [torch.zeros(size), torch.tensor([4.0])]
    gradient[0][:10] = 2.0
    gradient[0][-1000:] = 1.0
    change = FirstOrderEntropyChange(weights, gradient)
    with torch.no_grad():
        weights[0].add_(0.5)
        weights[1].add_(0.5)
    assert change.after_update() == pytest.approx(0.5 * (2.0 * 10 + 1000 + 4.0))


def test_top_fork_tokens_never_lists_padding_and_cuts_the_context():
    prompt_ids = torch.tensor([[ord("Q")]])
    prompt_mask = torch.ones(1, 1, dtype=torch.bool)
    response_ids = torch.tensor([[ord(c) for c in "abcdefghij"] + [0, 0]])
    response_mask = torch.tensor([[True] * 10 + [False] * 2])
    entropy = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 9.0, 0.6, 0.7, 0.8, 0.9, 50.0, 60.0]])
    forks = top_fork_tokens(CharTokenizer(), prompt_ids, prompt_mask, response_ids, response_mask, entropy, k=20,
                            context=4)
    assert len(forks) == 10 and all(f["position"] < 10 for f in forks)  # k beyond the valid tokens: no padding
    assert (forks[0]["token"], forks[0]["before"], forks[0]["after"]) == ("f", "bcde", "gh")
    assert top_fork_tokens(CharTokenizer(), prompt_ids, prompt_mask, response_ids, response_mask, entropy, k=0) == []


def _llama_style_tokenizer():
    """A Llama-2-shaped tokenizer: BPE with byte fallback, Metaspace pre-tokenizer, and Llama's decoder
    (Replace '▁' -> ' ', ByteFallback, Fuse, Strip one leading space), BOS added by the post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", *[f"<0x{i:02X}>" for i in range(256)],
              "▁", "T", "h", "e", "Th", "The", "▁The", "a", "n", "s", "w", "r", "an", "ans", "answ", "answe", "answer",
              "▁answer", "i", "▁i", "▁is", "Q", ":", "A", "?", "1", "2", "3", "4", "5", "6", "7", "8", "9", "0"]
    vocab = {piece: index for index, piece in enumerate(pieces)}
    merges = [("T", "h"), ("Th", "e"), ("▁", "The"), ("a", "n"), ("an", "s"), ("ans", "w"), ("answ", "e"),
              ("answe", "r"), ("▁", "answer"), ("▁", "i"), ("▁i", "s")]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_fork_tokens_keep_sentencepiece_word_boundary():
    """A sentencepiece decoder strips the leading space of what it decodes: decoded alone, '▁The' and 'The' both read
    'The', and '▁' reads ''. Decoded after the token before them, the two picks at one decision point stay apart
    and the lone space shows."""
    from entrorl.trainer.diagnostics import top_fork_tokens

    tokenizer = _llama_style_tokenizer()
    vocab = tokenizer.get_vocab()
    prompt = tokenizer("Q:")["input_ids"]
    prompt_ids = torch.tensor([prompt, prompt])
    prompt_mask = torch.ones_like(prompt_ids, dtype=torch.bool)
    response_ids = torch.tensor([[vocab["▁The"], vocab["▁answer"]], [vocab["The"], vocab["▁"]]])
    response_mask = torch.ones_like(response_ids, dtype=torch.bool)
    entropy = torch.tensor([[3.0, 1.0], [3.0, 2.0]])
    forks = top_fork_tokens(tokenizer, prompt_ids, prompt_mask, response_ids, response_mask, entropy, k=3)
    first = forks[0]
    assert first["position"] == 0 and first["samples"] == 2
    assert first["chosen"] == {" The": 1, "The": 1} and first["token"] == " The" and first["after"] == " answer"
    lone_space = next(fork for fork in forks if fork["sample"] == 1 and fork["position"] == 1)
    assert lone_space["token"] == " " and lone_space["before"] == "<s> Q:The"


def test_fork_context_shows_partial_bytes_next_to_deepseek_style_special_tokens():
    """A byte-level BPE whose special tokens hold characters outside the byte alphabet (DeepSeek-R1's '<｜Assistant｜>',
    with full-width bars): the special token reads as itself and the byte next to it as <0xE6>, not U+FFFD."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from entrorl.trainer.diagnostics import readable_text

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {character: index for index, character in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<｜Assistant｜>", special=True, normalized=False),
                                AddedToken("<|im_start|>", special=True, normalized=False),
                                AddedToken("<|endoftext|>", special=True, normalized=False)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    first_byte = tokenizer("日", add_special_tokens=False)["input_ids"][0]
    ascii_special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    deepseek_special = tokenizer.convert_tokens_to_ids("<｜Assistant｜>")
    assert readable_text(tokenizer, [ascii_special, first_byte]) == "<|im_start|><0xE6>"
    assert readable_text(tokenizer, [deepseek_special, first_byte]) == "<｜Assistant｜><0xE6>"

def test_readable_text_is_decode_when_it_has_no_replacement_character():
    class CleaningTokenizer:
        """A byte-level vocabulary whose decode strips the leading space (``Ġ``) of a text."""

        def decode(self, ids):
            return "".join(["Ġa", "Ġb"][i] for i in ids).replace("Ġ", " ").lstrip()

        def convert_ids_to_tokens(self, ids):
            return [["Ġa", "Ġb"][i] for i in ids]

    assert readable_text(CleaningTokenizer(), [0, 1]) == "a b"


class _ReplacementTokenizer:
    """A vocabulary of another kind whose decode shows U+FFFD: its pieces are neither byte pieces nor byte-level."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids):
        return "x\ufffd"

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]


@pytest.mark.parametrize("pieces", [["x", None], ["x", "\ufffd"], ["##x", "\u65e5"]])
def test_readable_text_of_an_unknown_kind_of_vocabulary_is_decode(pieces):
    assert readable_text(_ReplacementTokenizer(pieces), [0, 1]) == "x\ufffd"


def test_a_fork_names_its_first_row_s_sample_and_source_and_lists_the_choices_most_common_first():
    """The fork after "a" is reached by rows 1 to 3 (row 0 took "x"): its sample and source are row 1's, and its choices
    come most common first ("c" twice before "b" once, though "b" was sampled first)."""
    prompt_ids = torch.tensor([[ord("Q")]] * 4)
    response_ids = torch.tensor([[ord(a), ord(b)] for a, b in ("xb", "ab", "ac", "ac")])
    entropy = torch.tensor([[0.5, 0.1], [0.5, 2.0], [0.5, 2.0], [0.5, 2.0]])
    forks = top_fork_tokens(CharTokenizer(), prompt_ids, torch.ones(4, 1, dtype=torch.bool), response_ids,
                            torch.ones(4, 2, dtype=torch.bool), entropy, k=1, sources=[f"p.jsonl:{i}" for i in range(4)])
    (fork,) = forks
    assert (fork["sample"], fork["position"], fork["source"], fork["token"]) == (1, 1, "p.jsonl:1", "b")
    assert list(fork["chosen"].items()) == [("c", 2), ("b", 1)] and fork["samples"] == 3


def test_summaries_of_bfloat16_statistics_are_computed_in_double_precision():
    """bfloat16 entropies and discriminators summarise to the same numbers as their exact float64 values (a bfloat16
    mean keeps 3 significant digits)."""
    generator = torch.Generator().manual_seed(0)
    entropy = (torch.rand(4, 300, generator=generator) * 3).bfloat16()
    disc = torch.randn(4, 300, generator=generator).bfloat16()
    advantages = torch.randn(4, 1, generator=generator).expand(4, 300)
    mask = torch.rand(4, 300, generator=generator) > 0.1
    exact = entropy.double()[mask]
    summary = entropy_summary(entropy, mask)
    assert summary["entropy/mean"] == pytest.approx(float(exact.mean()), rel=1e-12)
    assert summary["entropy/max"] == float(exact.max())
    stats = discriminator_summary(disc, disc, advantages, mask)
    valid = disc.double()[mask]
    assert stats["disc/mean"] == pytest.approx(float(valid.mean()), rel=1e-12)
    assert stats["disc/std"] == pytest.approx(float(valid.std(unbiased=False)), rel=1e-12)
    positive = disc.double()[mask & (advantages > 0)]
    assert stats["disc/mean_pos_adv"] == pytest.approx(float(positive.mean()), rel=1e-12)


def test_the_per_token_prediction_comes_back_as_float32():
    metrics, predicted = predicted_vs_measured(
        torch.ones(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, 3),
        torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), lr=0.5, temperature=1.0)
    assert predicted.dtype == torch.float32 and predicted.tolist() == [[0.5] * 3] * 2
    assert metrics["entropy/predicted_delta_sum"] == 3.0


def test_a_measured_position_that_was_not_trained_is_predicted_its_decision_point_s_change():
    """Row 1 is measured but not trained; it shares its decision point with row 0, which was: the point's logits moved
    by row 0's update, so row 1 is predicted row 0's -alpha D (not 0)."""
    metrics, predicted = predicted_vs_measured(
        torch.tensor([[1.0], [1.0]]), torch.tensor([[1.0], [2.0]]), torch.zeros(2, 1), torch.full((2, 1), 0.5),
        torch.tensor([[True], [True]]), lr=1.0, temperature=1.0, points=torch.tensor([[0], [0]]),
        trained_mask=torch.tensor([[True], [False]]))
    assert predicted.flatten().tolist() == [1.0, 1.0]
    assert metrics["entropy/predicted_delta"] == 1.0 and metrics["entropy/predicted_delta_sum"] == 1.0


def test_the_token_correlation_is_measured_however_small_the_predicted_changes():
    """A small learning rate makes every predicted change tiny (here ~1e-15 nats): their correlation with the measured
    changes is still computed (1 for measured changes proportional to them), not reported as undefined."""
    disc = torch.tensor([[0.1, -0.2, 0.3, 0.05]], dtype=torch.float64)
    measured = 1e-3 * disc
    metrics, predicted = predicted_vs_measured(torch.ones(1, 4, dtype=torch.float64), disc, torch.zeros(1, 4),
                                               measured, torch.ones(1, 4, dtype=torch.bool), lr=1e-14, temperature=1.0)
    assert float(predicted.abs().max()) < 1e-14
    assert metrics["entropy/delta_token_corr"] == pytest.approx(1.0, abs=1e-9)


def test_top_fork_tokens_lists_a_zero_entropy_token_before_any_padding():
    """A token sampled with certainty has entropy exactly 0, as padding scores no entropy: the valid tokens are all
    listed, the padding never."""
    response_ids = torch.tensor([[ord("a"), ord("b"), 0, 0], [ord("c"), 0, 0, 0]])
    response_mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    entropy = torch.tensor([[0.7, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    forks = top_fork_tokens(CharTokenizer(), torch.tensor([[ord("P")], [ord("Q")]]), torch.ones(2, 1, dtype=torch.bool),
                            response_ids, response_mask, entropy, k=10)
    assert [(f["sample"], f["position"], f["token"]) for f in forks][0] == (0, 0, "a")
    assert sorted((f["sample"], f["position"], f["token"]) for f in forks) == [(0, 0, "a"), (0, 1, "b"), (1, 0, "c")]


@pytest.mark.parametrize(("context", "before", "after"), [(0, "", ""), (2, "ab", "d"), (5, "Qab", "de"), (24, "Qab", "def")])
def test_a_fork_s_left_context_holds_exactly_the_last_context_tokens(context, before, after):
    """``context`` tokens before the fork (prompt included), none for 0, all when fewer; ``context // 2`` after it."""
    (fork,) = top_fork_tokens(CharTokenizer(), torch.tensor([[ord("Q")]]), torch.ones(1, 1, dtype=torch.bool),
                              torch.tensor([[ord(c) for c in "abcdef"]]), torch.ones(1, 6, dtype=torch.bool),
                              torch.tensor([[0.0, 0.0, 9.0, 0.0, 0.0, 0.0]]), k=1, context=context)
    assert (fork["before"], fork["token"], fork["after"]) == (before, "c", after)


@pytest.mark.parametrize("argument", ["context", "k"])
@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_a_fork_context_or_count_that_is_not_a_count_is_refused(argument, value):
    counts = {"k": 1, "context": 2, argument: value}
    with pytest.raises(ValueError, match=f"top_fork_tokens: {argument}"):
        top_fork_tokens(None, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool),
                        torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 2),
                        **counts)


@pytest.mark.parametrize("case", ["constant-prediction", "constant-prediction-whose-std-rounds", "constant-measure",
                                  "one-token"])
def test_the_token_correlation_is_nan_without_a_warning_when_either_side_does_not_vary(case):
    """A correlation with a constant side (or of one token) is undefined: NaN, without a division-by-zero warning."""
    import warnings

    disc = torch.tensor([[0.1, -0.2, 0.3]], dtype=torch.float64)
    after = torch.tensor([[0.4, 0.1, 0.2]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    if case == "constant-prediction":
        disc = torch.full((1, 3), 0.25, dtype=torch.float64)
    elif case == "constant-prediction-whose-std-rounds":  # the mean of three 0.2s rounds: std() is about 3e-17
        disc = torch.full((1, 3), 0.2, dtype=torch.float64)
    elif case == "constant-measure":
        after = torch.full((1, 3), 0.5, dtype=torch.float64)
    else:
        mask = torch.tensor([[False, True, False]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics, _ = predicted_vs_measured(torch.ones(1, 3, dtype=torch.float64), disc, torch.zeros(1, 3), after, mask,
                                           lr=1.0, temperature=1.0)
    assert math.isnan(metrics["entropy/delta_token_corr"])
    assert metrics["entropy/measured_delta"] == pytest.approx(float(after[mask].mean()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_diagnostics_of_a_batch_on_cuda_equal_those_of_the_same_batch_on_the_cpu():
    """The TRL integration logs the entropy, S / D and covariance statistics of micro-batches that live on the
    accelerator: every tensor those functions build goes to the batch's device, and the numbers are the CPU's."""
    generator = torch.Generator().manual_seed(0)
    entropy, logprob = (torch.rand(3, 7, generator=generator) for _ in range(2))
    disc, centered = (torch.rand(3, 7, generator=generator) - 0.5 for _ in range(2))  # S and D of both signs
    advantages = torch.tensor([[1.0], [-1.0], [0.5]]).expand(3, 7).contiguous()  # both sides of the split
    mask = torch.rand(3, 7, generator=generator) > 0.3

    def summaries(device):
        on = [tensor.to(device) for tensor in (entropy, disc, centered, logprob, advantages, mask)]
        return {**entropy_summary(on[0], on[5]), **discriminator_summary(on[1], on[2], on[4], on[5]),
                **covariance_summary(on[3], on[4], on[5])}

    on_cpu, on_cuda = summaries("cpu"), summaries("cuda")
    assert on_cuda.keys() == on_cpu.keys() and "entropy/p50" in on_cuda and "disc/mean_pos_adv" in on_cuda
    assert not [key for key, value in on_cpu.items() if math.isnan(value)]  # every statistic is compared as a number
    for key, value in on_cpu.items():
        assert on_cuda[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
