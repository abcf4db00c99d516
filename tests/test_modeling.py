"""Scoring responses in length groups, and running a prompt that several rows share only once: the same
statistics and gradients as one padded pass."""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from entrorl import modeling
from entrorl.modeling import (
    bucketed_response_token_stats,
    length_buckets,
    load_causal_lm,
    prompt_groups,
    response_token_stats,
    shares_prompts,
)

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


def test_a_peft_wrapper_takes_the_cache_under_its_model_s_name(tiny_model_dir):
    """PeftModel.forward takes **kwargs: the name is the wrapped model's, not the deprecated past_key_values."""
    peft = pytest.importorskip("peft")
    model = load_causal_lm(tiny_model_dir)
    expected = modeling.cache_argument(model)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    assert modeling.cache_argument(wrapped) == expected


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


COMMON = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=96, pad_token_id=0, eos_token_id=1)
ARCHITECTURES = {
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=8),
    "llama_bias": lambda: LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True),
    "mistral_mha": lambda: MistralConfig(**{**COMMON, "num_key_value_heads": 4}, sliding_window=None),
}


def random_model(config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # non-trivial norms and biases, so that a term the cached path dropped would show
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def grouped_batch(group_prompt_lengths: list[int], group_size: int, vocab: int, seed: int = 0):
    """GRPO-shaped rows: each prompt (left-padded to the widest) repeated ``group_size`` times, shuffled, with
    responses of ragged lengths (right-padded)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(group_prompt_lengths)
    rows = len(group_prompt_lengths) * group_size
    order = torch.randperm(rows, generator=generator)
    prompt_ids = torch.zeros(rows, width, dtype=torch.long)
    prompt_mask = torch.zeros(rows, width, dtype=torch.bool)
    for group, length in enumerate(group_prompt_lengths):
        tokens = torch.randint(3, vocab, (length,), generator=generator)
        for row in order[group * group_size : (group + 1) * group_size]:
            prompt_ids[row, width - length :] = tokens
            prompt_mask[row, width - length :] = True
    response_lengths = torch.randint(1, 20, (rows,), generator=generator)
    response_lengths[0] = 20
    response_mask = torch.arange(20)[None] < response_lengths[:, None]
    response_ids = torch.randint(3, vocab, (rows, 20), generator=generator) * response_mask
    return prompt_ids, prompt_mask, response_ids, response_mask


def test_prompt_groups_name_each_rows_distinct_prompt():
    prompt_ids, prompt_mask, _, _ = grouped_batch([3, 5, 5, 2], group_size=3, vocab=40)
    first, inverse = prompt_groups(prompt_ids, prompt_mask)
    assert len(first) == 4
    for row in range(len(inverse)):
        assert torch.equal(prompt_ids[row], prompt_ids[first[inverse[row]]])
        assert torch.equal(inverse[first[inverse[row]]], inverse[row])
    # the same tokens with other padding are other prompts
    ids = torch.tensor([[0, 7, 8], [7, 8, 0]])
    assert len(prompt_groups(ids, ids != 0)[0]) == 2


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
@pytest.mark.parametrize("max_buckets", [1, 8])
def test_shared_prompt_scoring_equals_one_padded_pass(architecture, max_buckets, monkeypatch):
    # in float64: the two paths multiply matrices of other shapes, whose float32 rounding differs by CPU
    model = random_model(ARCHITECTURES[architecture]()).double()
    assert shares_prompts(model)
    batch = grouped_batch([4, 9, 1, 6], group_size=4, vocab=COMMON["vocab_size"])
    mask = batch[3]
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1)) * mask

    def values_and_grads(score):
        model.zero_grad(set_to_none=True)
        stats = score(model, *batch, temperature=0.8, need=NEED)
        ((stats.logprob + 0.1 * stats.entropy) * weights).sum().backward()
        return stats, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    prompt_passes = []
    original = modeling._distinct_prompt_pass
    monkeypatch.setattr(modeling, "_distinct_prompt_pass",
                        lambda model, ids, prompt_mask: prompt_passes.append(len(ids)) or original(model, ids, prompt_mask))
    expected, expected_grads = values_and_grads(response_token_stats)
    shared, shared_grads = values_and_grads(
        lambda *args, **kwargs: bucketed_response_token_stats(*args, **kwargs, max_buckets=max_buckets, overhead_tokens=0,
                                                              prompt_pass_tokens=0))
    assert prompt_passes == [4]  # one pass over the 4 distinct prompts, not 16 rows
    for name in NEED:
        ours, theirs = getattr(shared, name), getattr(expected, name)
        assert ours.shape == theirs.shape == mask.shape
        torch.testing.assert_close(ours[mask], theirs[mask], atol=2e-5, rtol=1e-5)
        assert not ours[~mask].any()
    assert expected_grads.keys() == shared_grads.keys()
    for name in expected_grads:
        torch.testing.assert_close(shared_grads[name], expected_grads[name], atol=1e-5, rtol=1e-4)
    # switched off, or saving fewer positions than the extra pass costs, the prompts run once per row again
    prompt_passes.clear()
    off = bucketed_response_token_stats(model, *batch, need=("logprob",), share_prompts=False, prompt_pass_tokens=0)
    saved = int(batch[1].sum()) - (4 + 9 + 1 + 6)  # 16 rows' prompt positions minus the 4 distinct prompts'
    bucketed_response_token_stats(model, *batch, need=("logprob",), prompt_pass_tokens=saved)
    assert prompt_passes == []
    bucketed_response_token_stats(model, *batch, need=("logprob",), prompt_pass_tokens=saved - 1)
    assert prompt_passes == [4]
    torch.testing.assert_close(off.logprob[mask], response_token_stats(model, *batch, need=("logprob",)).logprob[mask])


def test_models_that_cannot_share_prompts_are_scored_row_by_row():
    checkpointed = random_model(Qwen2Config(**COMMON))
    enable = getattr(checkpointed, "activation_checkpointing_enable", None) or checkpointed.gradient_checkpointing_enable
    enable()
    assert not shares_prompts(checkpointed)
    windowed = random_model(MistralConfig(**COMMON, sliding_window=8))
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                                       bos_token_id=1, eos_token_id=1))
    for model in (windowed.eval(), gpt2.eval()):
        assert not shares_prompts(model)
        batch = grouped_batch([4, 6], group_size=3, vocab=40)
        with torch.no_grad():
            got = bucketed_response_token_stats(model, *batch, need=("logprob",))
            expected = response_token_stats(model, *batch, need=("logprob",))
        torch.testing.assert_close(got.logprob[batch[3]], expected.logprob[batch[3]], atol=2e-5, rtol=1e-5)


def test_shared_prompt_scoring_in_bfloat16_stays_close_to_one_padded_pass():
    model = random_model(ARCHITECTURES["qwen2"]()).to(torch.bfloat16)
    batch = grouped_batch([4, 9, 1, 6], group_size=4, vocab=COMMON["vocab_size"])
    mask = batch[3]
    with torch.no_grad():
        expected = response_token_stats(model, *batch, need=NEED)
        shared = bucketed_response_token_stats(model, *batch, need=NEED, prompt_pass_tokens=0, overhead_tokens=0)
    for name, atol in (("logprob", 2e-2), ("entropy", 2e-2), ("disc", 1e-3), ("disc_centered", 1e-3)):
        ours, theirs = getattr(shared, name)[mask].float(), getattr(expected, name)[mask].float()
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, theirs, atol=atol, rtol=1e-2)


def test_load_causal_lm_turns_off_attention_dropout_too(tmp_path):
    """Attention layers apply a plain float rate in train mode, outside any nn.Dropout: it must be zeroed as well."""
    config = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, attention_dropout=0.3)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = modeling.load_causal_lm(tmp_path).train()
    assert model.config.attention_dropout == 0.0 and model.model.layers[0].self_attn.attention_dropout == 0.0
    ids = torch.randint(0, 32, (2, 6))
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # no randomness left in train mode
    assert modeling.load_causal_lm(tmp_path, disable_dropout=False).model.layers[0].self_attn.attention_dropout == 0.3


@pytest.mark.parametrize("architecture", ["opt", "gpt_bigcode", "mixtral_jitter"])
def test_load_causal_lm_turns_off_dropout_kept_as_plain_rates_under_other_names(tmp_path, architecture):
    """OPT keeps its rates as module attributes named dropout / layerdrop, GPT-BigCode as attn_pdrop, Mixtral's router
    jitters in train mode: left on, the update would score the sampled tokens differently from the sampler."""
    from transformers import GPTBigCodeConfig, MixtralConfig, OPTConfig

    configs = {
        "opt": lambda: OPTConfig(vocab_size=40, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.1, attention_dropout=0.1,
                                 layerdrop=0.3),
        "gpt_bigcode": lambda: GPTBigCodeConfig(vocab_size=40, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                attn_pdrop=0.1, resid_pdrop=0.1, embd_pdrop=0.1),
        "mixtral_jitter": lambda: MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.5),
    }
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(configs[architecture]()).save_pretrained(tmp_path)
    model = load_causal_lm(tmp_path).train()
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    kept = load_causal_lm(tmp_path, disable_dropout=False).train()
    with torch.no_grad():
        assert not torch.equal(kept(input_ids=ids).logits, kept(input_ids=ids).logits)


def test_a_checkpoint_keeps_the_dropout_rates_of_the_model_it_was_loaded_from(tmp_path):
    """Training runs without dropout, but a checkpoint is a plain directory another trainer may fine-tune: its
    config.json holds the original rates (the model's and its modules' stay 0 while and after it is written), with
    or without adapters."""
    from transformers import GPT2Config

    from entrorl.lab.tiny_model import build_char_tokenizer
    from entrorl.trainer.adapters import LoraAdapter
    from entrorl.trainer.checkpoint import save_checkpoint

    rates = {"resid_pdrop": 0.1, "embd_pdrop": 0.2, "attn_pdrop": 0.3}
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                                **rates)).save_pretrained(tmp_path / "base")
    for lora in (False, True):
        model = load_causal_lm(tmp_path / "base")
        assert all(getattr(model.config, name) == 0.0 for name in rates)
        adapter = LoraAdapter(model, rank=2, alpha=4.0, target_modules=["c_attn"]) if lora else None
        run = tmp_path / f"run-{lora}"
        run.mkdir()
        written = save_checkpoint(run, 1, model=model, tokenizer=build_char_tokenizer(), trainer_state={}, keep=1,
                                  adapter=adapter)
        saved = json.loads((written / "model" / "config.json").read_text())
        assert {name: saved[name] for name in rates} == rates
        assert all(getattr(model.config, name) == 0.0 for name in rates)
        model.train()
        ids = torch.randint(0, 40, (2, 7))
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_the_probes_give_an_attention_mask_to_a_forward_that_takes_one():
    """GPT-2 warns that the ids may be padded when a forward without a mask meets its padding id: the load-time probes
    pass a mask of ones, except to a forward that takes none."""
    from types import SimpleNamespace

    calls = []

    class Masked(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            calls.append(attention_mask)
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 3))

    class Keywords(Masked):
        def forward(self, input_ids, **kwargs):
            return super().forward(input_ids, kwargs.get("attention_mask"))

    class Unmasked(torch.nn.Module):
        def forward(self, input_ids):
            calls.append("none")
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 3))

    ids = torch.tensor([[0, 1, 2]])
    for model in (Masked(), Keywords(), Unmasked()):
        assert modeling._probe_logits(model, ids).shape == (1, 3, 3)
    assert torch.equal(calls[0], torch.ones_like(ids)) and torch.equal(calls[1], torch.ones_like(ids))
    assert calls[2] == "none"


def test_randomness_under_an_unknown_name_is_reported(tmp_path):
    model = AutoModelForCausalLM.from_config(Qwen2Config(**COMMON))
    model.model.norm.register_forward_hook(lambda module, args, output: output + module.training * torch.randn_like(output))
    with pytest.warns(UserWarning, match=r"train-mode forward is still random with its dropout rates at 0"):
        modeling.turn_off_dropout(model)


def test_load_causal_lm_refuses_an_encoder_and_weights_that_leave_part_of_the_model_random(tmp_path):
    """transformers loads a BERT masked-LM directory as BertLMHeadModel, attending in both directions, and fills a
    weight missing from the files with random values, both with only a printed report: entrorl refuses them."""
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertForMaskedLM

    encoder = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(encoder)
    with pytest.raises(ValueError, match=r"is not a causal language model: its predictions at the first 4 positions "
                                         r"changed by .* when only later tokens did"):
        load_causal_lm(encoder)

    headless = tmp_path / "headless"
    AutoModelForCausalLM.from_config(LlamaConfig(**COMMON)).save_pretrained(headless)
    weights = load_file(headless / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, headless / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"do not fit LlamaForCausalLM \(missing: lm_head.weight\): those weights would "
                                         r"start at random"):
        load_causal_lm(headless)


def test_files_that_are_links_to_nothing_are_named_before_anything_loads(tmp_path, tiny_model_dir):
    """A Hugging Face cache's snapshot copied without its blobs: every file is a link to nothing. transformers said the
    weights were missing, asked for sentencepiece (a dangling tokenizer.json), complained of added tokens (a dangling
    tokenizer_config.json), or loaded without the generation config; each broken link is named, with its target."""
    from entrorl.modeling import load_tokenizer

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        copied = tmp_path / name
        shutil.copytree(tiny_model_dir, copied)
        (copied / name).unlink()
        os.symlink("../../blobs/0123abcd", copied / name)
        said = rf"{re.escape(str(copied))}: {re.escape(name)} is a link to \.\./\.\./blobs/0123abcd, which does not exist"
        with pytest.raises(FileNotFoundError, match=said):
            modeling.check_model_files(copied)
        if name.startswith("tokenizer"):
            with pytest.raises(FileNotFoundError, match=said):
                load_tokenizer(copied)
            modeling.check_model_files(copied, tokenizer=False)  # what is not read is not checked
        elif name != "config.json":
            with pytest.raises(FileNotFoundError, match=said):
                load_causal_lm(copied)
            modeling.check_model_files(copied, weights=False)
    # links to nothing that the load does not read: .bin weights beside model.safetensors, a consolidated file, a slow
    # tokenizer's vocabulary beside tokenizer.json
    for name in ("pytorch_model.bin", "consolidated.safetensors", "merges.txt", "vocab.json", "README.md"):
        unread = tmp_path / f"unread-{name}"
        shutil.copytree(tiny_model_dir, unread)
        os.symlink("../../blobs/0123abcd", unread / name)
        assert modeling.check_model_files(unread) == unread
        load_tokenizer(unread)
    # a link to nothing where transformers looks first is named, not passed over for the next file in its order
    beside_bin = tmp_path / "beside-bin"
    shutil.copytree(tiny_model_dir, beside_bin)
    load_causal_lm(tiny_model_dir).save_pretrained(beside_bin, safe_serialization=False)
    (beside_bin / "model.safetensors").unlink()
    os.symlink("../../blobs/0123abcd", beside_bin / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model.safetensors is a link to \.\./\.\./blobs/0123abcd"):
        modeling.check_model_files(beside_bin)
    # the shards of a real index that are links to nothing are named as links, not as files a copy left out
    sharded = tmp_path / "sharded"
    load_causal_lm(tiny_model_dir).save_pretrained(sharded, max_shard_size="20KB")
    load_tokenizer(tiny_model_dir).save_pretrained(sharded)
    shards = sorted(sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    for shard in shards:
        shard.unlink()
        os.symlink(f"../blobs/{shard.name}", shard)
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(shards[0].name)} is a link to \.\./blobs/.*, and "
                                                rf"{len(shards) - 1} more links to nothing"):
        modeling.check_model_files(sharded)
    # a listed shard's name is a name, not a pattern: 'w[1].safetensors' is not 'w1.safetensors', a link to nothing
    # the index does not list
    bracketed = tmp_path / "bracketed"
    load_causal_lm(tiny_model_dir).save_pretrained(bracketed, max_shard_size="20KB")
    load_tokenizer(tiny_model_dir).save_pretrained(bracketed)
    index = json.loads((bracketed / "model.safetensors.index.json").read_text())
    renamed = {old: f"w[{number}].safetensors" for number, old in enumerate(sorted(set(index["weight_map"].values())))}
    for old, new in renamed.items():
        (bracketed / old).rename(bracketed / new)
        os.symlink("../blobs/gone", bracketed / new.replace("[", "").replace("]", ""))
    index["weight_map"] = {weight: renamed[shard] for weight, shard in index["weight_map"].items()}
    (bracketed / "model.safetensors.index.json").write_text(json.dumps(index))
    assert modeling.check_model_files(bracketed) == bracketed
    # a link that leads to a file is a file
    linked = tmp_path / "linked"
    linked.mkdir()
    for file in tiny_model_dir.iterdir():
        os.symlink(file, linked / file.name)
    assert modeling.check_model_files(linked) == linked
    several = tmp_path / "several"
    shutil.copytree(tiny_model_dir, several)
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        (several / name).unlink()
        os.symlink(f"../blobs/{name}", several / name)
    with pytest.raises(FileNotFoundError, match=r"generation_config.json is a link to \.\./blobs/generation_config.json, "
                                                r"which does not exist, and 2 more links to nothing \(model.safetensors, tokenizer.json\)"):
        modeling.check_model_files(several)


def test_a_config_json_that_does_not_fit_the_weights_is_named(tmp_path, tiny_model_dir):
    """A config.json declaring another vocab_size than the weights: transformers raised a bare RuntimeError ("You set
    `ignore_mismatched_sizes` to `False`"); the refusal names the weight and both shapes."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    vocabulary = config["vocab_size"]
    (model / "config.json").write_text(json.dumps({**config, "vocab_size": 2 * vocabulary}))
    with pytest.raises(ValueError, match=r"do not fit Qwen2ForCausalLM \(of another shape: model.embed_tokens.weight"
                                         r"(, lm_head.weight)?\): .* with the config.json it was saved with"):
        load_causal_lm(model)


def test_a_config_json_whose_weights_cannot_fit_in_memory_is_named_not_said_out_of_memory(tmp_path, tiny_model_dir):
    """A config.json declaring a vocabulary of 10^9 or 10^11 rows: the load runs out of memory, and the message said
    "the files are intact; free memory", where the config does not fit the files (a model built on the meta device
    says so without memory). Run under a 3 GB address-space limit."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    script = textwrap.dedent("""
        import json, resource, sys
        from pathlib import Path
        from entrorl.modeling import load_causal_lm
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
        model = Path(sys.argv[1])
        config = json.loads((model / "config.json").read_text())
        for rows in (10**9, 10**11):
            (model / "config.json").write_text(json.dumps({**config, "vocab_size": rows}))
            try:
                load_causal_lm(model)
            except (ValueError, MemoryError) as error:
                print(type(error).__name__, error)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(model)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith(("ValueError", "MemoryError"))]
    assert len(lines) == 2, done.stdout[-2000:] + done.stderr[-2000:]
    for rows, line in zip((10**9, 10**11), lines):
        assert line.startswith("ValueError") and \
            f"[{config['vocab_size']}, 32] in the files, [{rows}, 32] in config.json" in line, line


@pytest.mark.parametrize("architecture", ["qwen2_tied", "qwen2_bfloat16", "gpt2"])
def test_causal_models_pass_the_causality_check(tmp_path, architecture):
    configs = {
        "qwen2_tied": lambda: Qwen2Config(**COMMON, tie_word_embeddings=True),
        "qwen2_bfloat16": lambda: Qwen2Config(**COMMON),
        "gpt2": lambda: GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=4, n_positions=64),
    }
    AutoModelForCausalLM.from_config(configs[architecture]()).save_pretrained(tmp_path)
    model = load_causal_lm(tmp_path, dtype="bfloat16" if architecture.endswith("bfloat16") else "float32")
    modeling.check_causal(model)  # again on the loaded model: no error


@pytest.mark.parametrize("model_type", ["rwkv", "recurrent_gemma"])
def test_a_model_that_ignores_the_padding_mask_is_refused(tmp_path, model_type):
    """A recurrent state that runs through the left padding would make every padded row's statistics wrong."""
    from transformers import AutoConfig

    options = {"rwkv": dict(hidden_size=32, num_hidden_layers=2, attention_hidden_size=32, intermediate_size=48,
                            context_length=64),
               "recurrent_gemma": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, lru_width=32, attention_window_size=6, head_dim=8,
                                       block_types=["recurrent", "attention"])}[model_type]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=40, pad_token_id=0, eos_token_id=1,
                                                                  **options))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0, 0.3)  # RecurrentGemma's own initialisation barely carries state across positions
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"does not handle left padding: .* \(model type '{model_type}'"):
        load_causal_lm(tmp_path)


def _row_alone_log_probs(model, prompt: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    ids = torch.cat([prompt, response])[None]
    with torch.no_grad():
        log_probs = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
    return log_probs.gather(-1, response[:, None])[:, 0]


@pytest.mark.parametrize("rope_type", ["longrope", "dynamic", "dynamic_per_layer_type"])
def test_a_length_dependent_rope_is_scored_as_each_row_alone(rope_type):
    """With longrope or dynamic NTK the frequencies follow the longest sequence of a forward call: rows on either side
    of the original context must not share a pass (nor a shorter prompt pass), or they get another row's rotation."""
    from transformers import LlamaConfig, Phi3Config

    torch.manual_seed(0)
    if rope_type == "longrope":
        config = Phi3Config(**{**COMMON, "max_position_embeddings": 128}, original_max_position_embeddings=16,
                            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
                                             "long_factor": [4.0, 8.0, 16.0, 32.0], "original_max_position_embeddings": 16})
    elif rope_type == "dynamic":
        config = LlamaConfig(**{**COMMON, "max_position_embeddings": 16},
                             rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0})
    else:  # Gemma 3: one RoPE per layer type, here dynamic on the full-attention layers
        from transformers import Gemma3TextConfig

        config = Gemma3TextConfig(**{**COMMON, "max_position_embeddings": 16}, head_dim=8, sliding_window=64,
                                  layer_types=["sliding_attention", "full_attention"],
                                  rope_parameters={"full_attention": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
                                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0, 0.3)
    assert modeling.length_dependent_rope(model) == (rope_type.removesuffix("_per_layer_type"), 16)
    assert not shares_prompts(model)
    pristine = copy.deepcopy(model)  # references from a model that has run nothing before
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 40, (length,), generator=generator) for length in (10, 6)]
    rows = [(prompt, torch.randint(3, 40, (length,), generator=generator)) for prompt in prompts for length in (3, 12, 5)]
    # every row (totals 13, 22, 15, 9, 18, 11 around the original 16), then only the two beyond it
    for chosen, max_buckets in (([0, 1, 2, 3, 4, 5], 1), ([0, 1, 2, 3, 4, 5], 4), ([1, 4], 1), ([1, 4], 4)):
        prompt_ids, prompt_mask = modeling.left_pad([rows[row][0].tolist() for row in chosen], 0)
        response_ids, response_mask = modeling.left_pad([rows[row][1].tolist()[::-1] for row in chosen], 0)
        response_ids, response_mask = response_ids.flip(-1), response_mask.flip(-1)  # right-padded
        with torch.no_grad():  # a longer call first, as the sampler's: dynamic NTK keeps the frequencies it grew to
            model(input_ids=torch.randint(3, 40, (1, 40)))
            stats = bucketed_response_token_stats(model, prompt_ids, prompt_mask, response_ids, response_mask,
                                                  max_buckets=max_buckets, overhead_tokens=0, prompt_pass_tokens=0)
        for index, row in enumerate(chosen):
            prompt, response = rows[row]
            alone = _row_alone_log_probs(copy.deepcopy(pristine), prompt, response)
            torch.testing.assert_close(stats.logprob[index, :len(response)], alone, atol=1e-4, rtol=0)


def test_a_directory_with_its_own_code_loads_only_when_allowed(tmp_path, tiny_model_dir):
    """A model or tokenizer with its own code (auto_map) is refused naming the setting that allows it; allowed, both
    load, the tokenizer included (transformers would otherwise ask on a terminal and wait)."""
    import json
    import shutil

    directory = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, directory)
    (directory / "configuration_tiny.py").write_text(
        "from transformers import Qwen2Config\n\nclass TinyConfig(Qwen2Config):\n    model_type = 'tiny_custom'\n")
    (directory / "modeling_tiny.py").write_text(
        "from transformers import Qwen2ForCausalLM\nfrom .configuration_tiny import TinyConfig\n\n"
        "class TinyForCausalLM(Qwen2ForCausalLM):\n    config_class = TinyConfig\n")
    (directory / "tokenization_tiny.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\nclass TinyTokenizerFast(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="tiny_custom", architectures=["TinyForCausalLM"],
                  auto_map={"AutoConfig": "configuration_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})
    (directory / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config.update(tokenizer_class="TinyTokenizerFast", auto_map={"AutoTokenizer": [None, "tokenization_tiny.TinyTokenizerFast"]})
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    for load in (load_causal_lm, modeling.load_tokenizer):
        with pytest.raises(ValueError, match="set model.trust_remote_code: true \\(train\\) or pass --trust-remote-code"):
            load(directory)
    assert type(modeling.load_tokenizer(directory, trust_remote_code=True)).__name__ == "TinyTokenizerFast"
    assert type(load_causal_lm(directory, trust_remote_code=True)).__name__ == "TinyForCausalLM"


def test_stop_token_ids_gathers_every_declared_eos():
    """A chat model may end a turn with another token than the tokenizer's EOS: every declared one stops sampling."""
    from types import SimpleNamespace

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[1, 84]), config=SimpleNamespace(eos_token_id=7))
    assert modeling.stop_token_ids(model, SimpleNamespace(eos_token_id=1)) == [1, 84, 7]
    plain = SimpleNamespace(generation_config=None, config=SimpleNamespace(eos_token_id=None))
    assert modeling.stop_token_ids(plain, SimpleNamespace(eos_token_id=3)) == [3]


def test_encode_prompt_fills_the_template_and_wraps_a_chat_turn_without_a_second_bos():
    from tokenizers.processors import TemplateProcessing

    from entrorl.lab.tiny_model import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    plain = modeling.encode_prompt(tokenizer, "1+2=", template="Q: {prompt}")
    assert tokenizer.decode(plain, skip_special_tokens=True) == "Q: 1+2="
    tokenizer.chat_template = "{{ bos_token }}user: {{ messages[0]['content'] }}\nassistant: "
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tokenizer.bos_token_id)])  # the tokenizer adds a BOS itself too
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    chat = modeling.encode_prompt(tokenizer, "1+2=", chat_template=True)
    assert chat.count(tokenizer.bos_token_id) == 1 and chat[0] == tokenizer.bos_token_id
    assert tokenizer.decode(chat, skip_special_tokens=True) == "user: 1+2=\nassistant: "
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="the tokenizer has none"):
        modeling.encode_prompt(tokenizer, "1+2=", chat_template=True)
    tokenizer.name_or_path = "models/base"  # as loaded from a directory: the message names it
    with pytest.raises(ValueError, match="the tokenizer in models/base has none"):
        modeling.encode_prompt(tokenizer, "1+2=", chat_template=True)
    # a template with a typo, or one that refuses the turn itself: a ValueError naming it, as bad input is
    tokenizer.chat_template = "{{ messages[0]['content'] }"
    with pytest.raises(ValueError, match=r"the chat template of the tokenizer in models/base cannot render a user turn: "
                                         r"TemplateSyntaxError: "):
        modeling.encode_prompt(tokenizer, "1+2=", chat_template=True)
    tokenizer.chat_template = "{{ raise_exception('system turn first') }}"
    with pytest.raises(ValueError, match=r"cannot render a user turn: TemplateError: system turn first$"):
        modeling.encode_prompt(tokenizer, "1+2=", chat_template=True)


def test_encode_prompt_writes_a_conversation_with_the_chat_template_and_the_template_in_its_last_turn():
    from entrorl.lab.tiny_model import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    conversation = ({"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2="})
    with pytest.raises(ValueError, match="the prompt is given as chat messages, .*set model.chat_template: true"):
        modeling.encode_prompt(tokenizer, "1+2=", messages=conversation)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    ids = modeling.encode_prompt(tokenizer, "1+2=", template="Q {prompt}", chat_template=True, messages=conversation)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "system: be brief\nuser: Q 1+2=\nassistant: "
    assert conversation[1]["content"] == "1+2="  # the record's own messages are left as they were
    alone = modeling.encode_prompt(tokenizer, "1+2=", chat_template=True)
    assert alone == modeling.encode_prompt(tokenizer, "1+2=", chat_template=True, messages=conversation[1:])


def test_encode_prompt_keeps_the_bos_a_tokenizer_adds_and_leaves_out_an_eos_it_appends():
    """A post-processor that ends every text with EOS would show the policy a finished text before its response."""
    from tokenizers.processors import TemplateProcessing

    from entrorl.lab.tiny_model import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", bos), ("<eos>", eos)])
    assert tokenizer("1+2=")["input_ids"][-1] == eos
    assert modeling.encode_prompt(tokenizer, "1+2=") == [bos] + tokenizer("1+2=", add_special_tokens=False)["input_ids"]
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", eos)])
    assert modeling.encode_prompt(tokenizer, "1+2=") == tokenizer("1+2=", add_special_tokens=False)["input_ids"]
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    assert modeling.encode_prompt(tokenizer, "1+2=") == tokenizer("1+2=")["input_ids"]
    # another special token after the text belongs to the prompt (ChatGLM ends prompts with its own); only EOS goes
    unk = tokenizer.unk_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A <unk> <eos>", special_tokens=[("<bos>", bos), ("<unk>", unk), ("<eos>", eos)])
    assert modeling.encode_prompt(tokenizer, "1+2=") == tokenizer("1+2=")["input_ids"][:-1]
    assert modeling.encode_prompt(tokenizer, "1+2=")[-1] == unk


def test_an_empty_prompt_drops_the_appended_eos_and_keeps_a_leading_bos_that_is_also_the_eos():
    """An empty text encodes to the special tokens alone: the EOS appended after it goes (so the prompt is seen as
    empty, and refused as such), the tokens put before any text stay, a BOS that shares the EOS's id too."""
    from tokenizers.processors import TemplateProcessing

    from entrorl.lab.tiny_model import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for single, special, expected in (
            ("<bos> $A <eos>", [("<bos>", bos), ("<eos>", eos)], [bos]),
            ("$A <eos>", [("<eos>", eos)], []),
            ("<eos> $A", [("<eos>", eos)], [eos]),  # GPT-2's habit: the one special token as BOS
            ("<eos> $A <eos>", [("<eos>", eos)], [eos])):
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single=single, special_tokens=special)
        assert modeling.encode_prompt(tokenizer, "") == expected, single
        assert modeling.encode_prompt(tokenizer, "", template="{prompt}") == expected, single


def test_a_checkpoint_tokenizer_declares_padding_only_when_its_source_did(tmp_path):
    """load_tokenizer lends EOS as padding for batching; a saved copy must not declare it (a collator that masks
    padding in the labels would mask every EOS of the saved model's training data)."""
    import json

    from transformers import AutoTokenizer

    from entrorl.lab.tiny_model import build_char_tokenizer

    source = build_char_tokenizer()
    own_pad = source.pad_token
    source.pad_token = None
    for name, tokenizer in (("no_pad", source), ("pad", build_char_tokenizer())):
        (tmp_path / name).mkdir()
        tokenizer.save_pretrained(tmp_path / name)
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "qwen2"}))

    lent = modeling.load_tokenizer(tmp_path / "no_pad")
    assert lent.pad_token == lent.eos_token
    modeling.save_tokenizer(lent, tmp_path / "no_pad_saved")
    assert lent.pad_token == lent.eos_token  # still batching with it
    assert json.loads((tmp_path / "no_pad_saved" / "tokenizer_config.json").read_text()).get("pad_token") is None
    assert AutoTokenizer.from_pretrained(tmp_path / "no_pad_saved").pad_token is None
    lent.pad_token = lent.unk_token  # a padding the caller chose since is the tokenizer's own
    modeling.save_tokenizer(lent, tmp_path / "chosen_pad_saved")
    assert AutoTokenizer.from_pretrained(tmp_path / "chosen_pad_saved").pad_token == lent.unk_token

    kept = modeling.load_tokenizer(tmp_path / "pad")
    modeling.save_tokenizer(kept, tmp_path / "pad_saved")
    assert AutoTokenizer.from_pretrained(tmp_path / "pad_saved").pad_token == own_pad != kept.eos_token


def test_a_damaged_bin_weight_file_is_named(tmp_path, tiny_model_dir):
    """A pickled weight file cut short fails with an error naming it, however much of it is left; whole, it loads."""
    import shutil

    from entrorl.modeling import DamagedWeightsError, load_causal_lm

    directory = tmp_path / "bin-model"
    shutil.copytree(tiny_model_dir, directory)
    (directory / "model.safetensors").unlink()
    torch.save(load_causal_lm(tiny_model_dir).state_dict(), directory / "pytorch_model.bin")
    assert load_causal_lm(directory).config.model_type == "qwen2"
    whole = (directory / "pytorch_model.bin").read_bytes()
    for kept in (100, len(whole) // 2, len(whole) - 50):
        (directory / "pytorch_model.bin").write_bytes(whole[:kept])
        with pytest.raises(DamagedWeightsError, match=r"pytorch_model\.bin cannot be read .*damaged or truncated"):
            load_causal_lm(directory)


@pytest.mark.parametrize("safe", [True, False])
def test_shards_missing_from_an_index_are_named_before_loading_and_training_args_bin_is_no_weight_file(
        tmp_path, tiny_model_dir, safe):
    """A sharded model lacking shards its index lists (a download cut short) is refused naming them, even beside a
    Trainer's training_args.bin, a pickle of its settings that a weights-only reader refuses and that is no weight
    file: a failed load is never blamed on it. A whole sharded model beside it loads."""
    import argparse
    import shutil

    from transformers import AutoModelForCausalLM

    from entrorl.modeling import DamagedWeightsError, check_model_files, load_causal_lm, quiet_progress_bars

    directory = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, directory)
    (directory / "model.safetensors").unlink()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if safe:
        with quiet_progress_bars():
            model.save_pretrained(directory, max_shard_size="20KB")
    else:  # as older transformers wrote them
        names = list(model.state_dict())
        files = [f"pytorch_model-{part + 1:05d}-of-00006.bin" for part in range(6)]
        weight_map = {}
        for part, file in enumerate(files):
            torch.save({name: model.state_dict()[name] for name in names[part::6]}, directory / file)
            weight_map.update({name: file for name in names[part::6]})
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    torch.save(argparse.Namespace(learning_rate=1e-5), directory / "training_args.bin")
    suffix = "safetensors" if safe else "bin"
    shards = sorted(directory.glob(f"{'model' if safe else 'pytorch_model'}-*-of-*.{suffix}"))
    assert len(shards) > 4
    assert load_causal_lm(directory).config.model_type == "qwen2"
    moved = tmp_path / "moved"
    moved.mkdir()
    for shard in shards[1:5]:
        shard.rename(moved / shard.name)
    index = "model.safetensors.index.json" if safe else "pytorch_model.bin.index.json"
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(str(directory))} lacks 4 of the weight files its "
                                                rf"{re.escape(index)} lists \({re.escape(shards[1].name)}, "
                                                rf"{re.escape(shards[2].name)}, {re.escape(shards[3].name)} and 1 more\): "
                                                "a download or a copy was cut short; copy them there$"):
        check_model_files(directory)
    for shard in shards[1:5]:
        (moved / shard.name).rename(shard)
    # the shards without their index (a download of *.safetensors alone): named before anything loads, not left to
    # transformers' "no file named model.safetensors" after the data and tokenizer
    (directory / index).rename(moved / index)
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(str(directory))} has the shards "
                                                rf"{re.escape(shards[0].name)}, {re.escape(shards[1].name)}, "
                                                rf"{re.escape(shards[2].name)}, \.\.\. but not their index, "
                                                rf"{re.escape(index)}, which says what each holds: copy it there too$"):
        check_model_files(directory)
    (moved / index).rename(directory / index)
    shards[1].write_bytes(shards[1].read_bytes()[:200])  # a damaged shard is still named, not training_args.bin
    with pytest.raises(DamagedWeightsError, match=rf"{re.escape(shards[1].name)} cannot be read"):
        load_causal_lm(directory)


def test_the_shard_check_reads_the_weights_config_json_names(tmp_path, tiny_model_dir):
    """transformers loads the file config.json names (transformers_weights) before model.safetensors or an index: a
    stale index beside it is not checked, and a named index is."""
    import shutil

    from transformers import AutoModelForCausalLM

    from entrorl.modeling import check_model_files

    directory = tmp_path / "named"
    shutil.copytree(tiny_model_dir, directory)
    (directory / "model.safetensors").rename(directory / "weights.safetensors")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "transformers_weights": "weights.safetensors"}))
    stale = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(stale))
    AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    assert check_model_files(directory) == directory
    (directory / "named.safetensors.index.json").write_text(json.dumps(stale))
    (directory / "config.json").write_text(json.dumps({**config, "transformers_weights": "named.safetensors.index.json"}))
    with pytest.raises(FileNotFoundError, match=r"lacks 1 of the weight files its named.safetensors.index.json lists "
                                                r"\(model-00001-of-00002.safetensors\)"):
        check_model_files(directory)


def test_length_buckets_sort_by_whole_length_reach_max_buckets_and_keep_fewer_passes_on_a_tie():
    """Rows are ordered by prompt + response length (a long prompt counts as much as a long response), the number of
    groups goes up to max_buckets, and when more passes pad no fewer positions the fewer passes are kept."""
    # totals 41, 3, 31, 31: one pass pads 4 * 70 = 280, two pass 2 * 31 + 2 * 70 + 50 = 252, four 106 + 150 = 256
    groups = length_buckets(torch.tensor([40, 1, 1, 1]), torch.tensor([1, 2, 30, 30]), overhead_tokens=50)
    assert [group.tolist() for group in groups] == [[1, 2], [3, 0]]
    # eight very different lengths and free passes: one row per pass
    responses = torch.tensor([64, 1, 32, 2, 128, 4, 16, 8])
    groups = length_buckets(torch.ones(8, dtype=torch.long), responses, max_buckets=8, overhead_tokens=0)
    assert [group.tolist() for group in groups] == [[1], [3], [5], [7], [6], [2], [0], [4]]
    assert len(length_buckets(torch.ones(8, dtype=torch.long), responses, max_buckets=4, overhead_tokens=0)) == 4
    # equal lengths: splitting saves nothing, even when passes cost nothing
    assert len(length_buckets(torch.full((8,), 5), torch.full((8,), 7), overhead_tokens=0)) == 1


def test_prompt_groups_tell_padding_from_a_real_pad_token_and_name_the_first_row():
    """A prompt whose first token is the pad id is another prompt than the same ids with that column padding, and
    ``first`` names the first row of each distinct prompt."""
    ids = torch.tensor([[0, 7, 8], [0, 7, 8], [5, 7, 8], [0, 7, 8], [5, 7, 8]])
    mask = torch.tensor([[False, True, True], [True, True, True], [True, True, True], [False, True, True],
                         [True, True, True]])
    first, inverse = prompt_groups(ids, mask)
    assert sorted(first.tolist()) == [0, 1, 2]
    assert first[inverse].tolist() == [0, 1, 2, 0, 2]


def test_shared_prompts_in_one_length_group_skip_the_padded_pass(monkeypatch):
    """With one length group and a prompt pass taken, the responses run on the cached prompts only: the full padded
    pass over prompt + response (response_token_stats) is not run as well."""
    model = random_model(ARCHITECTURES["qwen2"]()).double()
    batch = grouped_batch([4, 9, 1, 6], group_size=4, vocab=COMMON["vocab_size"])
    mask = batch[3]
    with torch.no_grad():
        expected = response_token_stats(model, *batch, need=("logprob",))
        calls = []
        original = modeling.response_token_stats
        monkeypatch.setattr(modeling, "response_token_stats", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
        shared = bucketed_response_token_stats(model, *batch, need=("logprob",), max_buckets=1, prompt_pass_tokens=0)
    assert calls == []
    torch.testing.assert_close(shared.logprob[mask], expected.logprob[mask], atol=1e-10, rtol=1e-8)


def test_a_longrope_row_exactly_at_the_original_context_keeps_the_short_factors():
    """A row of exactly the original context (16 tokens) is within it: scored beside a longer row it must still
    get the short factors it gets alone."""
    from transformers import Phi3Config

    torch.manual_seed(0)
    config = Phi3Config(**{**COMMON, "max_position_embeddings": 128}, original_max_position_embeddings=16,
                        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
                                         "long_factor": [4.0, 8.0, 16.0, 32.0], "original_max_position_embeddings": 16})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0, 0.3)
    generator = torch.Generator().manual_seed(0)
    rows = [(torch.randint(3, 40, (10,), generator=generator), torch.randint(3, 40, (6,), generator=generator)),
            (torch.randint(3, 40, (6,), generator=generator), torch.randint(3, 40, (16,), generator=generator))]
    prompt_ids, prompt_mask = modeling.left_pad([prompt.tolist() for prompt, _ in rows], 0)
    response_ids, response_mask = modeling.left_pad([response.tolist()[::-1] for _, response in rows], 0)
    response_ids, response_mask = response_ids.flip(-1), response_mask.flip(-1)
    with torch.no_grad():
        stats = bucketed_response_token_stats(model, prompt_ids, prompt_mask, response_ids, response_mask,
                                              max_buckets=1, overhead_tokens=0, prompt_pass_tokens=0)
    for index, (prompt, response) in enumerate(rows):
        torch.testing.assert_close(stats.logprob[index, :len(response)], _row_alone_log_probs(model, prompt, response),
                                   atol=1e-4, rtol=0)


def test_check_prompts_fit_refuses_empty_prompts_and_prompts_past_the_context():
    """A prompt fits when its tokens plus max_new_tokens are at most the context; every misfit is listed (ten shown)."""
    from types import SimpleNamespace

    config = SimpleNamespace(max_position_embeddings=10)
    modeling.check_prompts_fit(config, [[3] * 6, [4]], ["a:1", "a:2"], max_new_tokens=4)  # 6 + 4 = 10: fits
    with pytest.raises(ValueError) as refused:
        modeling.check_prompts_fit(config, [[3] * 6, [], [4] * 7], ["a:1", "a:2", "a:3"], max_new_tokens=4)
    assert str(refused.value).splitlines()[:3] == [
        "2 prompt(s) do not fit the model's context:", "  a:2: the prompt encodes to zero tokens",
        "  a:3: 7 prompt tokens + max_new_tokens 4 > context 10"]
    with pytest.raises(ValueError, match=r"(?s)^12 prompt\(s\) .*\n  s:9: [^\n]*\n  \.\.\. and 2 more\n"):
        modeling.check_prompts_fit(config, [[]] * 12, [f"s:{i}" for i in range(12)], max_new_tokens=4)
    modeling.check_prompts_fit(SimpleNamespace(), [[3] * 500], ["a:1"], max_new_tokens=4)  # no declared context
    with pytest.raises(ValueError, match="zero tokens"):
        modeling.check_prompts_fit(SimpleNamespace(), [[]], ["a:1"], max_new_tokens=4)


def test_check_prompts_fit_refuses_token_ids_past_the_model_s_embedding():
    """A tokenizer given tokens the model was not resized for encodes ids the input embedding has no row for: each
    prompt holding one, and a padding token past it, is named (the embedding's own size wins over the config's)."""
    from types import SimpleNamespace

    config = SimpleNamespace(vocab_size=100, max_position_embeddings=64)
    modeling.check_prompts_fit(config, [[3, 99], [4]], ["a:1", "a:2"], max_new_tokens=4, pad_token_id=99)  # ids 0-99
    with pytest.raises(ValueError) as refused:
        modeling.check_prompts_fit(config, [[3, 99], [4, 100, 7], [], [120]], ["a:1", "a:2", "a:3", "a:4"],
                                   max_new_tokens=4, pad_token_id=100)
    lines = str(refused.value).splitlines()
    assert lines[:4] == ["the model's input embedding has 100 rows (token ids 0-99), and the tokenizer gives larger ids:",
                         "  the tokenizer's padding token: id 100", "  a:2: token id 100", "  a:4: token id 120"]
    assert "model.resize_token_embeddings(len(tokenizer))" in lines[-1]
    model = torch.nn.Module()
    model.config, model.get_input_embeddings = config, lambda: torch.nn.Embedding(50, 4)
    with pytest.raises(ValueError, match="has 50 rows"):
        modeling.check_prompts_fit(model, [[60]], ["a:1"], max_new_tokens=4)
    modeling.check_prompts_fit(SimpleNamespace(), [[10 ** 6]], ["a:1"], max_new_tokens=4, pad_token_id=10 ** 6)  # no size
    composite = SimpleNamespace(get_text_config=lambda: SimpleNamespace(vocab_size=8))
    with pytest.raises(ValueError, match="has 8 rows"):
        modeling.check_prompts_fit(composite, [[8]], ["a:1"], max_new_tokens=4)


def test_eval_refuses_a_tokenizer_with_tokens_the_model_has_no_embedding_for(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from entrorl.cli import app

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_tokens(["<sep>"])  # without model.resize_token_embeddings
    tokenizer.save_pretrained(model)
    data = tmp_path / "sums.jsonl"
    data.write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": "1<sep>2=", "answer": "3"}\n')
    result = CliRunner().invoke(app, ["eval", "--model", str(model), "--data", str(data), "--n", "1", "--max-new-tokens", "1"])
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert f"embedding has {len(tokenizer) - 1} rows" in output and "sums.jsonl:2: token id" in output
    assert "Traceback" not in result.output


def test_unknown_token_note_names_the_prompts_the_tokenizer_cannot_write_and_their_characters(tiny_model_dir):
    """The lab's tokenizer has no token for '×' or '€': a prompt holding them encodes them as <unk>, which the note
    counts (one prompt of three), and names by the first prompt's source and its characters, in order, once each."""
    from types import SimpleNamespace

    from entrorl.data import PromptRecord

    tokenizer = modeling.load_tokenizer(tiny_model_dir)
    records = [PromptRecord(prompt=text, answer="1", source=f"p.jsonl:{line}")
               for line, text in enumerate(["1+2=", "3×4€×=", "5€="], start=1)]
    encoded = [modeling.encode_prompt(tokenizer, record.prompt) for record in records]
    assert [ids.count(tokenizer.unk_token_id) for ids in encoded] == [0, 3, 1]
    note = modeling.unknown_token_note(tokenizer, encoded, records, what="data.train")
    assert note == ("2 of the 3 prompts of data.train hold text the tokenizer turns into its unknown token '<unk>' (the "
                    "model sees one token for any such character); the first is p.jsonl:2, whose '×' '€' the "
                    "vocabulary cannot write: check the data's encoding, or use a tokenizer that covers these characters")
    assert modeling.unknown_token_note(tokenizer, encoded[:1], records[:1], what="data.train") is None
    assert modeling.unknown_token_note(SimpleNamespace(unk_token_id=None), encoded, records, what="x") is None
    # characters of the prompt template: named as the template's, alone or after the prompt's
    template = "€ {prompt} ×"
    encoded = [modeling.encode_prompt(tokenizer, record.prompt, template=template) for record in records]
    note = modeling.unknown_token_note(tokenizer, encoded, records, what="data.train", template=template)
    assert note.endswith("the first is p.jsonl:1, the prompt template '€ {prompt} ×' holds '€' '×', which the vocabulary "
                         "cannot write: change the template, or use a tokenizer that covers these characters")
    note = modeling.unknown_token_note(tokenizer, encoded[2:], records[2:], what="data.train", template=template)
    assert note.endswith("the first is p.jsonl:3, whose '€' the vocabulary cannot write; the prompt template "
                         "'€ {prompt} ×' holds '€' '×', which it cannot write either: change the template and check the "
                         "data's encoding, or use a tokenizer that covers these characters")
    template = "× {prompt}"  # the prompt's own € besides
    encoded = [modeling.encode_prompt(tokenizer, record.prompt, template=template) for record in records]
    note = modeling.unknown_token_note(tokenizer, encoded[2:], records[2:], what="data.train", template=template)
    assert note.endswith("the first is p.jsonl:3, whose '€' the vocabulary cannot write; the prompt template "
                         "'× {prompt}' holds '×', which it cannot write either: change the template and check the "
                         "data's encoding, or use a tokenizer that covers these characters")


def test_unknown_token_note_shows_ten_characters_at_most_and_none_when_no_single_character_is_unknown():
    """The note names at most ten of the characters (then '...'), in the order they first appear; when no single
    character of the prompt turns into <unk> on its own (the tokenizer made it of a longer piece), it names none."""
    from entrorl.data import PromptRecord

    class Letters:  # knows a, b and c; every other character is <unk> (id 0)
        unk_token_id, unk_token = 0, "<unk>"

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [1 if character in "abc" else 0 for character in text]}

    unknown = "defghijklmn"  # eleven characters the vocabulary cannot write
    records = [PromptRecord(prompt=f"ab{unknown}d", answer="1", source="q.jsonl:1")]
    note = modeling.unknown_token_note(Letters(), [[1, 1, 0]], records, what="data.eval")
    shown = " ".join(repr(character) for character in unknown[:10])
    assert note == (f"1 of the 1 prompts of data.eval hold text the tokenizer turns into its unknown token '<unk>' (the "
                    f"model sees one token for any such character); the first is q.jsonl:1, whose {shown} ... the "
                    "vocabulary cannot write: check the data's encoding, or use a tokenizer that covers these characters")
    ten = [PromptRecord(prompt=unknown[:10], answer="1", source="q.jsonl:2")]
    assert f"whose {shown} the vocabulary" in modeling.unknown_token_note(Letters(), [[0]], ten, what="data.eval")
    known = [PromptRecord(prompt="abc", answer="1", source="q.jsonl:3")]  # the ids hold <unk>, no character is one
    assert modeling.unknown_token_note(Letters(), [[1, 0]], known, what="data.eval") == (
        "1 of the 1 prompts of data.eval hold text the tokenizer turns into its unknown token '<unk>' (the model sees "
        "one token for any such character); the first is q.jsonl:3: check the data's encoding, or use a tokenizer "
        "that covers these characters")


def test_eval_warns_of_prompts_the_tokenizer_turns_into_its_unknown_token(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from entrorl.cli import app

    data = tmp_path / "sums.jsonl"
    data.write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": "1€2=", "answer": "3"}\n', encoding="utf-8")
    with pytest.warns(UserWarning, match=r"1 of the 2 prompts of .*sums\.jsonl hold text .* the first is .*sums\.jsonl:2, "
                                         r"whose '€' the vocabulary cannot write"):
        result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--data", str(data), "--n", "1",
                                          "--max-new-tokens", "1"])
    assert result.exit_code == 0, result.output


def test_encode_prompt_keeps_an_eos_that_the_text_itself_ends_with():
    """Only the EOS the post-processor appends is left out: a prompt whose own text ends with the EOS token keeps it."""
    from tokenizers.processors import TemplateProcessing

    from entrorl.lab.tiny_model import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", bos), ("<eos>", eos)])
    text = "1+2=" + tokenizer.eos_token
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert plain[-1] == eos
    assert modeling.encode_prompt(tokenizer, text) == [bos] + plain


def test_the_behaviour_probes_stay_within_a_context_shorter_than_the_probe():
    """A model whose context is shorter than the probes' usual length is probed within it: a GPT-2 with 5 positions
    (its position table has no sixth row) passes both checks instead of failing on a position it does not have."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=5)).eval()
    assert modeling.model_context_length(model) == 5
    modeling.check_causal(model)
    modeling.check_left_padding(model)


def test_encode_prompt_fills_the_template_as_a_format_string_and_wraps_all_of_it_in_the_chat_turn():
    """The template is filled with ``str.format`` (doubled braces are literal braces); with the chat template the
    filled template, not the bare prompt, is the user's turn, and the turn ends with the assistant's opening (the
    generation prompt) that the response continues."""
    from entrorl.lab.tiny_model import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    plain = modeling.encode_prompt(tokenizer, "1+2", template="{{x}}: {prompt}=")
    assert tokenizer.decode(plain, skip_special_tokens=True) == "{x}: 1+2="
    tokenizer.chat_template = ("{% for message in messages %}[{{ message['role'] }}]{{ message['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}[assistant]{% endif %}")
    chat = modeling.encode_prompt(tokenizer, "1+2", template="Q: {prompt}=", chat_template=True)
    assert tokenizer.decode(chat, skip_special_tokens=True) == "[user]Q: 1+2=[assistant]"


def test_declares_a_model_reads_model_type_or_architectures(tmp_path):
    """A model's config.json names its ``model_type`` or its ``architectures`` (either is enough); a run's settings, a
    damaged file or a JSON list are not a model's config."""
    import json

    file = tmp_path / "config.json"
    for content, declared in (({"model_type": "qwen2"}, True), ({"architectures": ["Qwen2ForCausalLM"]}, True),
                              ({"seed": 7, "optim": {"lr": 1e-6}}, False), (["qwen2"], False)):
        file.write_text(json.dumps(content))
        assert modeling.declares_a_model(file) is declared, content
    file.write_text("{not json")
    assert modeling.declares_a_model(file) is False
    assert modeling.declares_a_model(tmp_path / "missing.json") is False


def test_a_run_directory_given_as_a_model_names_its_newest_checkpoint(tmp_path):
    """A run directory is refused pointing at the model of its last checkpoint, not its first."""
    run = tmp_path / "run"
    for step in ("step_000004", "step_000010", "step_000007"):
        (run / "checkpoints" / step / "model").mkdir(parents=True)
        (run / "checkpoints" / step / "model" / "config.json").write_text("{}")
    (run / "config.json").write_text('{"seed": 7}')
    with pytest.raises(FileNotFoundError, match=r"\(the last one: .*step_000010/model\)"):
        load_causal_lm(run)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_load_causal_lm_loads_the_weights_in_the_dtype_asked_for(tiny_model_dir, dtype):
    """``dtype`` chooses the precision of every floating-point weight of the loaded model."""
    model = load_causal_lm(tiny_model_dir, dtype=dtype)
    assert model.dtype == getattr(torch, dtype)
    assert {parameter.dtype for parameter in model.parameters()} == {getattr(torch, dtype)}
    with pytest.raises(ValueError, match=r"unknown dtype 'float64'; choose one of \['bfloat16', 'float16', 'float32'\]"):
        load_causal_lm(tiny_model_dir, dtype="float64")


def test_the_behaviour_checks_leave_the_model_in_the_mode_they_found_it():
    """The causality, left-padding and dropout checks switch modes to probe the model, then put back the mode it had."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**COMMON))
    for training in (True, False):
        model.train(training)
        for check in (modeling.check_causal, modeling.check_left_padding, modeling.turn_off_dropout):
            check(model)
            assert model.training is training and all(module.training is training for module in model.modules())


def test_a_model_whose_forward_takes_no_position_ids_is_refused_by_name():
    """A forward without ``position_ids`` (or without ``attention_mask``) cannot run entrorl's left-padded batches:
    refused with the reason, not a bare TypeError from inside the check."""
    from types import SimpleNamespace

    class WithoutPositions(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(model_type="without_positions", vocab_size=40)
            self.embed = torch.nn.Embedding(40, 8)
            self.head = torch.nn.Linear(8, 40)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, input_ids, attention_mask=None):
            return SimpleNamespace(logits=self.head(self.embed(input_ids)))

    with pytest.raises(ValueError, match=r"cannot run left-padded batches: its forward does not take an attention mask "
                                         r"and position ids \(.*position_ids"):
        modeling.check_left_padding(WithoutPositions(), "tiny")


def test_read_model_config_is_none_for_a_config_transformers_cannot_read(tmp_path, tiny_model_dir):
    """An unknown model type or a damaged config.json gives None (the loader then says why); a model's gives its config."""
    assert modeling.read_model_config(tiny_model_dir).max_position_embeddings == 64
    (tmp_path / "config.json").write_text('{"model_type": "no_such_model_type"}')
    assert modeling.read_model_config(tmp_path) is None
    (tmp_path / "config.json").write_text("{not json")
    assert modeling.read_model_config(tmp_path) is None


def test_a_failed_load_blames_a_weight_file_only_when_its_header_cannot_be_read(tiny_model_dir, monkeypatch):
    """When loading fails, the weight files' headers are read again to name a damaged one. A header read refused for
    memory (a memory limit) says nothing of the file: the error says memory ran out. With every header readable, an
    error that is not about memory is raised as it is, not as a damaged file."""
    import safetensors
    import transformers

    from entrorl.modeling import DamagedWeightsError

    refused = RuntimeError("unable to mmap 1000 bytes from file <model.safetensors>: Cannot allocate memory (12)")

    def refuse(*args, **kwargs):
        raise refused

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    with pytest.raises(MemoryError, match=r"out of memory while loading the model of .*the files are intact"):
        load_causal_lm(tiny_model_dir)
    monkeypatch.undo()

    def fail(*args, **kwargs):
        raise RuntimeError("an unrelated failure")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)
    with pytest.raises(RuntimeError, match=r"^an unrelated failure$") as raised:
        load_causal_lm(tiny_model_dir)
    assert not isinstance(raised.value, DamagedWeightsError)


def test_a_tokenizer_without_an_eos_token_is_refused(tmp_path):
    """Without an EOS no response could ever end: load_tokenizer refuses such a tokenizer, naming its directory."""
    import json

    from entrorl.lab.tiny_model import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ValueError, match=rf"the tokenizer in {tmp_path} has no eos_token: responses could never end"):
        modeling.load_tokenizer(tmp_path)


def test_a_damaged_generation_config_or_weights_under_a_name_transformers_does_not_read_are_named(tmp_path,
                                                                                               tiny_model_dir):
    """transformers passes over a generation_config.json cut short without a word, and with it the end-of-turn ids it
    lists as stop tokens (responses then run to the length limit); weights only under a name it does not read
    (Mistral's consolidated.safetensors) failed after the data and tokenizer had loaded."""
    import shutil

    directory = tmp_path / "model"
    shutil.copytree(tiny_model_dir, directory)
    generation = directory / "generation_config.json"
    generation.write_text('{"eos_token_id": [1, 7], "bos_token_id": 2')
    with pytest.raises(ValueError, match=rf"{generation} is not valid UTF-8 JSON .*the file is damaged; save the model "
                                         r"\(or its GenerationConfig\) again"):
        modeling.load_causal_lm(directory)
    generation.unlink()
    (directory / "model.safetensors").rename(directory / "consolidated.safetensors")
    with pytest.raises(FileNotFoundError, match=r"has weight files transformers does not read "
                                                r"\(consolidated.safetensors\): it reads model.safetensors"):
        modeling.check_model_files(directory)


def test_a_damaged_tokenizer_file_is_named(tmp_path, tiny_model_dir):
    """A tokenizer file that is not a JSON object (cut short, or another JSON value) is refused naming the file, not
    with a parser's message that names none."""
    import shutil

    directory = tmp_path / "model"
    shutil.copytree(tiny_model_dir, directory)
    config = directory / "tokenizer_config.json"
    whole = config.read_text()
    config.write_text(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=rf"{config} is not valid UTF-8 JSON .*the file is damaged; save the tokenizer"):
        modeling.load_tokenizer(directory)
    config.write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{config} holds a JSON array, not an object: the file is damaged"):
        modeling.load_tokenizer(directory)
    config.write_text(whole)
    assert modeling.load_tokenizer(directory).eos_token == "<eos>"


def test_out_of_memory_message_is_one_line_with_the_errors_first_line():
    """The message keeps the first line of the error (the allocator's own words), drops the rest, and says the files
    are intact only when files were being read."""
    error = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nSee documentation for Memory Management")
    message = str(modeling.out_of_memory_while("loading the model of m", error))
    assert message.startswith("out of memory while loading the model of m (CUDA out of memory. Tried to allocate 2.00 "
                              "GiB): the files are intact; free memory")
    assert "\n" not in message and "documentation" not in message
    assert "intact" not in str(modeling.out_of_memory_while("training step 3", error, files_read=False))
    assert "(MemoryError)" in str(modeling.out_of_memory_while("training step 3", MemoryError()))


def test_a_plain_linear_head_model_is_scored_without_building_the_logits():
    """Qwen2's statistics come from its final hidden states through the head's weight (the head module never runs over
    the [B, R, V] logits); GPT-2, whose head is not in the list, runs its head over the response positions only."""
    qwen2 = random_model(Qwen2Config(**COMMON)).eval()
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                                       bos_token_id=1, eos_token_id=1)).eval()
    batch = ragged_batch(3, vocab=40)
    for model, expected_positions in ((qwen2, []), (gpt2, [batch[2].shape[1] + 1])):
        positions = []
        hook = model.get_output_embeddings().register_forward_hook(
            lambda module, inputs, output: positions.append(output.shape[1]))
        try:
            with torch.no_grad():
                response_token_stats(model, *batch, need=("logprob",))
        finally:
            hook.remove()
        assert positions == expected_positions


def test_rows_of_a_length_dependent_rope_are_grouped_by_side_of_the_original_context():
    """Within the original context (16) rows are length-bucketed as usual (one group with max_buckets=1); beyond it,
    longrope rows (all on the long factors) share a group and dynamic-NTK rows share one only with rows of their length."""
    prompt_lengths = torch.tensor([4, 6, 8, 10, 12, 6])
    response_lengths = torch.tensor([6, 6, 12, 10, 10, 10])  # totals 10, 12, 20, 20, 22 and 16, at the context
    for kind, expected in (("longrope", [[0, 1, 5], [2, 3, 4]]), ("dynamic", [[0, 1, 5], [2, 3], [4]])):
        groups = modeling._rope_safe_buckets(prompt_lengths, response_lengths, (kind, 16), max_buckets=1, overhead_tokens=0)
        assert [sorted(group.tolist()) for group in groups] == expected


def test_the_behaviour_probes_judge_a_difference_against_the_logits_scale_but_never_below_one():
    """float32 logits move by rounding only: below 1e-4 x max(1, largest logit), 5e-2 x that in half precision."""
    from types import SimpleNamespace

    full, half = SimpleNamespace(dtype=torch.float32), SimpleNamespace(dtype=torch.bfloat16)
    small, large = torch.full((2, 3), 1e-2), torch.full((2, 3), 100.0)
    assert modeling._probe_difference(full, small + 5e-5, small) is None  # small logits: the floor of 1 holds
    assert modeling._probe_difference(full, small + 5e-3, small) == pytest.approx(5e-3)
    assert modeling._probe_difference(full, large + 5e-3, large) is None  # 5e-3 < 1e-4 x 100
    assert modeling._probe_difference(half, small + 2e-2, small) is None
    assert modeling._probe_difference(half, large + 6.0, large) == pytest.approx(6.0)


def test_a_left_padded_row_is_scored_as_alone_by_a_model_with_absolute_positions():
    """Positions count from each row's first real token: GPT-2 adds a learned embedding per position, so a row shifted
    right by its padding would be scored at other positions than it is sampled at."""
    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                                       bos_token_id=1, eos_token_id=1)).eval()
    prompt_ids, prompt_mask, response_ids, response_mask = ragged_batch(4, vocab=40)
    with torch.no_grad():
        stats = response_token_stats(gpt2, prompt_ids, prompt_mask, response_ids, response_mask, need=("logprob",))
    for row in range(4):
        prompt, response = prompt_ids[row][prompt_mask[row]], response_ids[row][response_mask[row]]
        torch.testing.assert_close(stats.logprob[row, :len(response)], _row_alone_log_probs(gpt2, prompt, response),
                                   atol=1e-5, rtol=0)


def test_stop_token_ids_keep_the_tokenizers_eos_first_then_the_declared_order_without_repeats():
    """The tokenizer's EOS leads, then the generation config's ids in their own order, then the config's; each once."""
    from types import SimpleNamespace

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[5, 2, 9, 5]), config=SimpleNamespace(eos_token_id=2))
    assert modeling.stop_token_ids(model, SimpleNamespace(eos_token_id=9)) == [9, 5, 2]


def test_left_pad_of_no_rows_or_of_an_empty_row():
    """No sequences give a [0, 0] batch; an empty sequence is a row of padding only, masked out."""
    ids, mask = modeling.left_pad([], 7)
    assert ids.shape == mask.shape == (0, 0) and mask.dtype == torch.bool
    ids, mask = modeling.left_pad([[], [3, 4]], 7)
    assert ids.tolist() == [[7, 7], [3, 4]] and mask.tolist() == [[False, False], [True, True]]


@pytest.mark.parametrize("message", [
    "std::bad_alloc", "DefaultCPUAllocator: not enough memory: you tried to allocate 8 bytes",
    "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"])
def test_each_allocators_wording_of_a_refusal_is_out_of_memory(message):
    assert modeling.is_out_of_memory(RuntimeError(message))
    assert not modeling.is_out_of_memory(RuntimeError(message.replace("memory", "patience").replace("bad_alloc", "bad_cast")))


def test_a_device_out_of_memory_error_counts_whatever_its_words_and_an_explicit_cause_is_followed_first():
    assert modeling.is_out_of_memory(torch.OutOfMemoryError("Tried to allocate 2.00 GiB"))
    try:
        try:
            raise KeyError("unrelated")
        except KeyError:
            raise ValueError("scoring failed") from MemoryError()
    except ValueError as error:
        assert modeling.is_out_of_memory(error)


def test_out_of_memory_message_takes_the_first_line_with_words_of_the_error():
    message = str(modeling.out_of_memory_while("scoring", RuntimeError("\n  CUDA out of memory.\nmore"), files_read=False))
    assert message.startswith("out of memory while scoring (CUDA out of memory.): free memory")


def test_a_checkpoint_directory_given_as_the_model_points_at_its_model_subdirectory(tmp_path, tiny_model_dir):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "step_000003" / "model")
    (tmp_path / "step_000003" / "trainer.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"has no config.json: .* \(an entrorl checkpoint keeps its model in model/"):
        load_causal_lm(tmp_path / "step_000003")
    with pytest.raises(FileNotFoundError, match=r"has no config.json: it is not a Hugging Face model directory$"):
        load_causal_lm(tmp_path)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt",
                                  "spiece.model"])
def test_any_one_saved_tokenizer_file_counts_as_a_tokenizer(tmp_path, name):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        modeling.check_model_files(tmp_path, weights=False)
    (tmp_path / name).write_text("{}")
    assert modeling.check_model_files(tmp_path, weights=False) == tmp_path


@pytest.mark.parametrize("name, content, message", [
    ("special_tokens_map.json", "[1]", r"special_tokens_map\.json holds a JSON array, not an object"),
    ("added_tokens.json", "7", r"added_tokens\.json holds a JSON number, not an object"),
    ("tokenizer_config.json", b"{\"a\": \"\xff\"}", r"tokenizer_config\.json is not valid UTF-8 JSON"),
    ("tokenizer.json", '{"version": ', r"tokenizer\.json is not valid UTF-8 JSON"),
])
def test_every_damaged_tokenizer_file_is_named(tmp_path, tiny_model_dir, name, content, message):
    import shutil

    directory = tmp_path / "model"
    shutil.copytree(tiny_model_dir, directory)
    if name == "special_tokens_map.json":  # checked after tokenizer_config.json, whatever other file is absent
        (directory / "added_tokens.json").unlink(missing_ok=True)
    write = (directory / name).write_bytes if isinstance(content, bytes) else (directory / name).write_text
    write(content)
    with pytest.raises(ValueError, match=message):
        modeling.load_tokenizer(directory)


def test_memory_that_runs_out_while_loading_is_said_in_one_line(tiny_model_dir, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(MemoryError, match=r"^out of memory while loading the model of .* \(MemoryError\): the files are intact"):
        load_causal_lm(tiny_model_dir)


def test_weights_missing_from_the_files_are_listed_five_at_most(tmp_path):
    from safetensors.torch import load_file, save_file

    AutoModelForCausalLM.from_config(LlamaConfig(**{**COMMON, "num_hidden_layers": 1})).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = sorted(name for name in weights if name.startswith("model.layers.0."))[:7]
    for count, more in ((6, " and 1 more"), (5, "")):
        kept = {name: value for name, value in weights.items() if name not in dropped[:count]}
        save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ValueError) as refused:
            load_causal_lm(tmp_path)
        assert f"(missing: {', '.join(dropped[:5])}{more})" in str(refused.value)


def test_the_probes_allow_float16_rounding_as_they_allow_bfloat16s():
    from types import SimpleNamespace

    small = torch.full((2, 3), 1e-2)
    assert modeling._probe_difference(SimpleNamespace(dtype=torch.float16), small + 2e-2, small) is None


def test_turning_off_dropout_covers_a_text_config_and_small_rates_and_a_model_without_randomness_gives_no_warning():
    import warnings

    model = random_model(Qwen2Config(**{**COMMON, "attention_dropout": 0.01}))
    model.config.text_config = Qwen2Config(**COMMON, attention_dropout=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        modeling.turn_off_dropout(model)
    assert model.config.attention_dropout == 0.0 and model.config.text_config.attention_dropout == 0.0
    assert model.model.layers[0].self_attn.attention_dropout == 0.0


def test_a_context_length_of_zero_is_no_declared_context():
    from types import SimpleNamespace

    assert modeling.model_context_length(SimpleNamespace(max_position_embeddings=0)) is None
    modeling.check_prompts_fit(SimpleNamespace(max_position_embeddings=0), [[3] * 5], ["a:1"], max_new_tokens=4)


def test_length_buckets_try_only_powers_of_two_group_counts():
    """Three clusters of four rows would split best in 3 groups, but only k = 1, 2, 4, 8 are tried."""
    prompt_lengths = torch.ones(12, dtype=torch.long)
    response_lengths = torch.tensor([99, 9, 49, 9, 99, 49, 9, 49, 99, 9, 49, 99])
    groups = length_buckets(prompt_lengths, response_lengths, max_buckets=8, overhead_tokens=100)
    # k = 1: 1200; k = 2: 6 x 50 + 6 x 100 + 100 = 1000; k = 3 would be 640 + 200; k = 4: 780 + 300; k = 8: 640 + 500
    assert [group.tolist() for group in groups] == [[1, 3, 6, 9, 2, 5], [7, 10, 0, 4, 8, 11]]


def test_the_original_context_of_a_length_dependent_rope_is_its_parameters_first_then_the_config():
    from types import SimpleNamespace

    config = SimpleNamespace(original_max_position_embeddings=32, max_position_embeddings=64,
                             rope_parameters={"rope_type": "longrope", "original_max_position_embeddings": 16})
    assert modeling.length_dependent_rope(SimpleNamespace(config=config)) == ("longrope", 16)
    per_type = SimpleNamespace(rope_parameters={"a": {"rope_type": "dynamic"},
                                                "b": {"rope_type": "dynamic", "original_max_position_embeddings": 8}})
    assert modeling.length_dependent_rope(SimpleNamespace(config=per_type)) == ("dynamic", 8)


def test_a_model_with_some_sliding_window_layers_does_not_share_prompts():
    model = random_model(Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=1))
    assert model.config.layer_types.count("full_attention") == 1
    assert not shares_prompts(model)


def test_a_damaged_weight_file_is_named_even_when_the_load_failed_for_memory(tmp_path, monkeypatch):
    """A cut header can ask for more memory than there is: the file whose header cannot be read is what to report,
    not memory (the load's out-of-memory error is only what the header check runs while handling)."""
    import shutil

    import transformers

    from entrorl.lab.tiny_model import save_tiny_model
    from entrorl.modeling import DamagedWeightsError, load_causal_lm

    directory = save_tiny_model(tmp_path / "model", seed=0, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                max_position_embeddings=32)
    intact = tmp_path / "intact"
    shutil.copytree(directory, intact)
    (directory / "model.safetensors").write_bytes(b"garbage")

    def refuse(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 900.00 GiB")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(DamagedWeightsError, match=r"model\.safetensors cannot be read"):
        load_causal_lm(directory)
    with pytest.raises(MemoryError, match=r"out of memory while loading the model of .*the files are intact"):
        load_causal_lm(intact)


def test_turning_off_dropout_twice_still_restores_the_original_rates_for_a_checkpoint():
    """A second turn_off_dropout finds the config's rates already at 0: the rates the first call zeroed must still be
    the ones config_rates_restored puts back (and takes away again after the block)."""
    model = random_model(Qwen2Config(**{**COMMON, "attention_dropout": 0.25}))
    modeling.turn_off_dropout(model)
    modeling.turn_off_dropout(model)
    assert model.config.attention_dropout == 0.0
    with modeling.config_rates_restored(model):
        assert model.config.attention_dropout == 0.25
    assert model.config.attention_dropout == 0.0


def test_an_error_raised_while_handling_out_of_memory_counts_only_when_asked_to_look_at_what_it_handled():
    """An error raised inside ``except MemoryError`` (an implicit context, no ``from``) is out of memory by default,
    and not with ``during=False``; an unrelated chain is not; a cycle of contexts ends the walk."""
    try:
        try:
            raise MemoryError()
        except MemoryError:
            raise OSError(errno.EIO, "read failed")
    except OSError as error:
        handled = error
    assert modeling.is_out_of_memory(handled)
    assert not modeling.is_out_of_memory(handled, during=False)
    assert modeling.is_out_of_memory(OSError(errno.ENOMEM, "mmap refused"), during=False)
    first, second = RuntimeError("a"), RuntimeError("b")
    first.__context__, second.__context__ = second, first
    assert not modeling.is_out_of_memory(first)


def test_a_model_that_reports_checkpointing_under_the_older_name_does_not_share_prompts():
    """Before transformers 5.24 a model says is_gradient_checkpointing (no is_activation_checkpointing): its
    checkpointed layers would drop the prompt cache, so it must not share prompts; without checkpointing it does."""
    from types import SimpleNamespace

    for checkpointing, shared in ((True, False), (False, True)):
        older = SimpleNamespace(config=Qwen2Config(**COMMON), get_decoder=object, is_gradient_checkpointing=checkpointing,
                                get_output_embeddings=lambda: torch.nn.Linear(2, 2))
        assert shares_prompts(older) is shared


def test_a_model_with_a_three_token_context_that_ignores_the_padding_mask_is_still_refused():
    """Three positions are enough for the left-padding probe (one token beside three): a forward that sums over the
    padding, as a recurrent state does, is refused even at that context."""
    from types import SimpleNamespace

    class Running(torch.nn.Module):
        dtype = torch.float32

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(10, 4)
            self.config = SimpleNamespace(max_position_embeddings=3, model_type="running")

        def get_input_embeddings(self):
            return self.embed

        def forward(self, input_ids, attention_mask=None, position_ids=None):
            return SimpleNamespace(logits=self.embed(input_ids).cumsum(1))

    with pytest.raises(ValueError, match="does not handle left padding"):
        modeling.check_left_padding(Running())


def _tiny_moe_asking_for_router_logits(directory, model_type: str):
    """A random-init Mixtral or Qwen2-MoE whose config asks for the router's logits (output_router_logits: true, as a
    model fine-tuned with the load-balancing loss is saved), with a character tokenizer."""
    import transformers

    from entrorl.lab.tiny_model import build_char_tokenizer, save_quietly

    tokenizer = build_char_tokenizer()
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.bos_token_id, output_router_logits=True)
    config = (transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common) if model_type == "mixtral"
              else transformers.Qwen2MoeConfig(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
                                               num_experts_per_tok=2, **common))
    torch.manual_seed(0)
    save_quietly(AutoModelForCausalLM.from_config(config), tokenizer, directory)
    return directory


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_a_moe_model_asking_for_router_logits_samples_without_them_and_saves_them_asked_for(tmp_path, model_type):
    """With output_router_logits on, transformers' load-balancing loss fails on a one-token decode step (its mask is
    the whole sequence's): entrorl runs the model without them, says so, and a checkpoint's config keeps the setting."""
    from entrorl.modeling import load_tokenizer
    from entrorl.rollout.sampler import HFSampler, SamplingParams

    directory = _tiny_moe_asking_for_router_logits(tmp_path / model_type, model_type)
    with pytest.warns(UserWarning, match="sets output_router_logits: entrorl samples and scores without the router's"):
        model = load_causal_lm(directory)
    tokenizer = load_tokenizer(directory)
    prompts = [tokenizer("1+2=", add_special_tokens=False)["input_ids"], tokenizer("3+45=", add_special_tokens=False)["input_ids"]]
    torch.manual_seed(0)
    rollouts = HFSampler.for_model(model, tokenizer, batch_size=4).generate(prompts, SamplingParams(max_new_tokens=4))
    assert rollouts.response_ids.shape[0] == 2 and model.config.output_router_logits is False
    with modeling.config_rates_restored(model):
        model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["output_router_logits"] is True
    assert model.config.output_router_logits is False


def _peft_model_agrees_with_its_logits_path(wrapped) -> None:
    """The default statistics of ``wrapped`` (fused or not, as :func:`response_token_stats` decides), and those of the
    bucketed path, equal the logits path's."""
    from entrorl.modeling import bucketed_response_token_stats, response_token_stats

    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(4, 60, (2, 3), generator=generator)
    prompt_mask = torch.ones_like(prompt_ids, dtype=torch.bool)
    response_ids = torch.randint(4, 60, (2, 5), generator=generator)
    response_mask = torch.ones_like(response_ids, dtype=torch.bool)
    with torch.no_grad():
        reference = response_token_stats(wrapped, prompt_ids, prompt_mask, response_ids, response_mask, fused_head=False)
        default = response_token_stats(wrapped, prompt_ids, prompt_mask, response_ids, response_mask)
        bucketed = bucketed_response_token_stats(wrapped, prompt_ids, prompt_mask, response_ids, response_mask)
    for stats in (default, bucketed):
        torch.testing.assert_close(stats.logprob, reference.logprob, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.entropy, reference.entropy, rtol=1e-5, atol=1e-5)


def test_response_token_stats_on_a_peft_model_uses_the_backbone(tiny_model_dir):
    """On a peft PeftModel ``model.model`` is the whole Qwen2ForCausalLM (peft forwards the attribute), whose output
    has no ``last_hidden_state``: the fused path must reach the backbone (``get_decoder``), and give the logits path's
    statistics."""
    peft = pytest.importorskip("peft")
    from entrorl.modeling import load_causal_lm

    model = load_causal_lm(tiny_model_dir)
    _peft_model_agrees_with_its_logits_path(peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"])))


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning"])
def test_response_token_stats_of_a_prompt_learning_peft_model_match_its_logits_path(tiny_model_dir, kind):
    """A prompt-learning wrapper adds its virtual tokens (or prefix keys and values) in its own forward, which a call
    of the backbone skips: such a model is not fused."""
    peft = pytest.importorskip("peft")
    from entrorl.modeling import load_causal_lm

    config = (peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4) if kind == "prompt_tuning"
              else peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    _peft_model_agrees_with_its_logits_path(peft.get_peft_model(load_causal_lm(tiny_model_dir), config))


@pytest.mark.parametrize("transformers_bars, hub_bars", [(True, True), (False, False), (False, True)])
def test_loading_and_saving_a_model_leave_the_progress_bar_settings_as_they_were(tiny_model_dir, tmp_path, capfd,
                                                                                   transformers_bars, hub_bars):
    """No bar per weight file while a model loads or a checkpoint is written, and transformers' and huggingface_hub's
    own settings put back afterwards: a notebook's later downloads keep their bars, a user's "off" stays off."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    from entrorl.modeling import load_tokenizer
    from entrorl.trainer.checkpoint import save_checkpoint

    (hf_logging.enable_progress_bar if transformers_bars else hf_logging.disable_progress_bar)()
    (hub_utils.enable_progress_bars if hub_bars else hub_utils.disable_progress_bars)()
    try:
        model = load_causal_lm(tiny_model_dir)
        assert (hf_logging.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled()) == (transformers_bars,
                                                                                                      hub_bars)
        (tmp_path / "run").mkdir()
        capfd.readouterr()
        save_checkpoint(tmp_path / "run", 1, model=model, tokenizer=load_tokenizer(tiny_model_dir), trainer_state={},
                        keep=1)
        assert "%|" not in capfd.readouterr().err
        assert (hf_logging.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled()) == (transformers_bars,
                                                                                                      hub_bars)
    finally:
        hf_logging.enable_progress_bar()


def test_quiet_progress_bars_puts_back_huggingface_hubs_settings_of_each_group():
    import importlib

    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from transformers.utils import logging as hf_logging

    from entrorl.modeling import quiet_progress_bars

    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")
    if hub_tqdm.HF_HUB_DISABLE_PROGRESS_BARS is not None:
        pytest.skip("HF_HUB_DISABLE_PROGRESS_BARS is set: it overrides every group's setting")
    saved = dict(hub_tqdm.progress_bar_states)
    try:
        hf_logging.enable_progress_bar()
        disable_progress_bars("huggingface_hub.http_get")
        with quiet_progress_bars():
            assert are_progress_bars_disabled()
        assert not are_progress_bars_disabled() and are_progress_bars_disabled("huggingface_hub.http_get")
    finally:
        hf_logging.enable_progress_bar()
        hub_tqdm.progress_bar_states.clear()
        hub_tqdm.progress_bar_states.update(saved)


def test_the_unknown_token_note_names_the_characters_of_any_turn_of_a_conversation():
    from entrorl.data import PromptRecord
    from entrorl.lab.tiny_model import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }};{% endfor %}"
                               "{% if add_generation_prompt %}a:{% endif %}")
    record = PromptRecord(prompt="1+1=", answer="2", source="chat.jsonl:1",
                          messages=({"role": "system", "content": "\u20ac"}, {"role": "user", "content": "1+1="}))
    ids = modeling.encode_prompt(tokenizer, record.prompt, chat_template=True, messages=record.messages)
    assert tokenizer.unk_token_id in ids
    note = modeling.unknown_token_note(tokenizer, [ids], [record], what="data.train")
    assert "the first is chat.jsonl:1, whose '\u20ac' the vocabulary cannot write" in note


def test_encoding_records_names_the_row_a_chat_template_refuses():
    from entrorl.data import PromptRecord
    from entrorl.lab.tiny_model import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}"
                               "{% endfor %}")
    records = [PromptRecord(prompt="1+1=", answer="2", source="chat.jsonl:1",
                            messages=({"role": "user", "content": "1+1="},)),
               PromptRecord(prompt="2+2=", answer="4", source="chat.jsonl:2",
                            messages=({"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2="}))]
    assert len(modeling.encode_records(tokenizer, records[:1], chat_template=True)) == 1
    template, tokenizer.chat_template = tokenizer.chat_template, None
    with pytest.raises(ValueError, match="^a chat template was asked for, but the tokenizer has none$"):  # no row's fault
        modeling.encode_records(tokenizer, records, chat_template=True)
    tokenizer.chat_template = template
    with pytest.raises(ValueError, match=r"^chat.jsonl:2: the chat template of the tokenizer cannot render the "
                                         r"conversation: TemplateError: System role not supported$"):
        modeling.encode_records(tokenizer, records, chat_template=True)


def test_a_chat_template_ending_turns_with_a_token_the_sampler_does_not_stop_at_is_said(tiny_model_dir):
    """A base model's tokenizer with a ChatML-like template: its turns end with a special token that is neither its
    EOS nor in its generation config, so responses would run past their turn."""
    from entrorl.modeling import load_tokenizer, unstopped_turn_end_note

    model, tokenizer = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    end_of_turn = tokenizer.bos_token  # a special token that is not a stop token
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}" + end_of_turn + "{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    note = unstopped_turn_end_note(model, tokenizer)
    assert note.startswith(f"the chat template ends an assistant turn with {end_of_turn!r} (id {tokenizer.bos_token_id})")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.bos_token_id]
    assert unstopped_turn_end_note(model, tokenizer) is None
    tokenizer.chat_template = tokenizer.chat_template.replace(end_of_turn, tokenizer.eos_token)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    assert unstopped_turn_end_note(model, tokenizer) is None  # its EOS ends the turn
    tokenizer.chat_template = "{{ raise_exception('no') }}"
    assert unstopped_turn_end_note(model, tokenizer) is None


def _turn_model(vocab_size: int, eos: int = 1):
    from entrorl.lab.tiny_model import build_tiny_qwen2

    return build_tiny_qwen2(vocab_size, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                            max_position_embeddings=64, pad_token_id=0, eos_token_id=eos, bos_token_id=2)


def _tokenizer_read_back(tokenizer, tmp_path):
    """The tokenizer as read back from its files (tokenizer.json's added tokens, special=True), as a model's is."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "tok")
    return AutoTokenizer.from_pretrained(tmp_path / "tok")


def test_llama3_style_end_of_turn_token_that_is_special_but_not_named_is_said(tmp_path):
    """Llama 3's <|eot_id|> is an added token marked special, not a named one (not in all_special_ids): a base Llama 3
    (EOS <|end_of_text|> only) given the Llama 3 template is warned about."""
    from tokenizers import AddedToken

    from entrorl.lab.tiny_model import build_char_tokenizer
    from entrorl.modeling import unstopped_turn_end_note

    tokenizer = build_char_tokenizer()
    tokenizer.add_tokens([AddedToken(token, special=True)
                          for token in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")])
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    tokenizer = _tokenizer_read_back(tokenizer, tmp_path)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    model = _turn_model(len(tokenizer), eos=tokenizer.eos_token_id)
    note = unstopped_turn_end_note(model, tokenizer)
    assert note is not None and "'<|eot_id|>'" in note and f"id {eot}" in note


def test_phi3_style_template_with_eos_after_the_whole_conversation_still_says_the_unstopped_turn_end():
    """Phi-3's template closes every turn with <|end|> and writes the EOS once, after the whole conversation: the turn
    still ends with <|end|>, which a sampler stopping only at the EOS runs past."""
    from entrorl.lab.tiny_model import build_char_tokenizer
    from entrorl.modeling import unstopped_turn_end_note

    tokenizer = build_char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}")
    model = _turn_model(len(tokenizer), eos=tokenizer.eos_token_id)
    note = unstopped_turn_end_note(model, tokenizer)
    assert note is not None and "'<|end|>'" in note


def test_an_end_marker_the_tokenizer_cannot_spell_is_not_named_as_unk():
    """A marker the vocabulary cannot spell tokenizes to <unk>: that is never advised as a stop token (it would stop
    every response at its first unknown character)."""
    from entrorl.lab.tiny_model import build_char_tokenizer
    from entrorl.modeling import unstopped_turn_end_note

    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}<\uff5cend\u2581of\u2581turn\uff5c>"
                               "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    model = _turn_model(len(tokenizer), eos=tokenizer.eos_token_id)
    note = unstopped_turn_end_note(model, tokenizer)
    assert note is None or ("'<unk>'" not in note and f"add {tokenizer.unk_token_id} " not in note)


def test_a_template_rendering_no_string_is_not_judged_instead_of_raising():
    """A render that is not a string is not judged: no error out of Trainer.__init__ or eval."""
    from types import SimpleNamespace

    from entrorl.modeling import unstopped_turn_end_note

    class ListRenderingTokenizer:
        chat_template = "x"
        eos_token_id = 1
        all_special_ids = [1]

        def apply_chat_template(self, conversation, tokenize=False):
            return [conversation]

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=1), config=SimpleNamespace(eos_token_id=1))
    assert unstopped_turn_end_note(model, ListRenderingTokenizer()) is None


def test_a_template_expression_failing_with_another_error_on_a_row_names_the_row():
    """A template expression failing on one row in any way (here a ZeroDivisionError) is reported with the row and
    the chat template, not as a bare traceback."""
    from entrorl.data import PromptRecord
    from entrorl.lab.tiny_model import build_char_tokenizer
    from entrorl.modeling import encode_records

    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = "{{ 10 // (messages | length - 1) }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    records = [PromptRecord(prompt="1+1=", answer="2", source="chat.jsonl:1",
                            messages=({"role": "system", "content": "s"}, {"role": "user", "content": "1+1="})),
               PromptRecord(prompt="2+2=", answer="4", source="chat.jsonl:2")]
    with pytest.raises(ValueError, match=r"^chat.jsonl:2: the chat template"):
        encode_records(tokenizer, records, chat_template=True)


def test_encode_prompt_refuses_a_conversation_that_does_not_end_with_the_prompt_as_the_user_s_turn():
    from entrorl.lab.tiny_model import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}a:"
    for messages in ([{"role": "system", "content": "be brief"}], [{"role": "user", "content": "x"}],
                     [{"role": "user", "content": "y"}, {"role": "assistant", "content": "y"}], []):
        with pytest.raises(ValueError, match="messages must end with the user's turn whose content is the prompt"):
            modeling.encode_prompt(tokenizer, "y", chat_template=True, messages=messages)


def test_harmony_style_template_whose_generated_turn_ends_with_return_is_not_warned(tmp_path):
    """gpt-oss's (harmony) template closes an assistant turn of the history with <|end|> but the last one, the turn
    a model generates, with <|return|>, its stop token; <|end|> also closes the reasoning inside a response, so
    advising it as a stop token would cut every response after its reasoning."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from entrorl.lab.tiny_model import build_char_tokenizer, build_tiny_qwen2
    from entrorl.modeling import unstopped_turn_end_note

    tokenizer = build_char_tokenizer()
    tokenizer.add_tokens([AddedToken(token, special=True)
                          for token in ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>")])
    tokenizer.eos_token = "<|return|>"
    tokenizer.chat_template = (
        "{% for m in messages %}"
        "{% if m['role'] == 'assistant' %}<|start|>assistant<|channel|>final<|message|>{{ m['content'] }}"
        "{% if loop.last and not add_generation_prompt %}<|return|>{% else %}<|end|>{% endif %}"
        "{% else %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|start|>assistant{% endif %}")
    tokenizer.save_pretrained(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    eos = tokenizer.convert_tokens_to_ids("<|return|>")
    assert tokenizer.eos_token_id == eos
    model = build_tiny_qwen2(len(tokenizer), hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                             max_position_embeddings=64, pad_token_id=0, eos_token_id=eos, bos_token_id=2)
    assert unstopped_turn_end_note(model, tokenizer) is None, unstopped_turn_end_note(model, tokenizer)


def test_glm4_style_template_whose_turn_ends_at_the_next_role_marker_is_still_judged(tmp_path):
    """GLM-4 writes nothing after a reply: its turn ends where the next role's marker (<|user|>) begins, which is
    judged instead."""
    from tokenizers import AddedToken

    from entrorl.lab.tiny_model import build_char_tokenizer
    from entrorl.modeling import unstopped_turn_end_note

    tokenizer = build_char_tokenizer()
    tokenizer.add_tokens([AddedToken(token, special=True) for token in
                          ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
                           "<|endoftext|>")])
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.chat_template = (  # glm-4-9b-chat's template, without its tools branch
        "[gMASK]<sop>{% for item in messages %}{% if item['role'] == 'system' %}<|system|>\n{{ item['content'] }}"
        "{% elif item['role'] == 'user' %}<|user|>\n{{ item['content'] }}"
        "{% elif item['role'] == 'assistant' %}<|assistant|>\n{{ item['content'] }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tokenizer = _tokenizer_read_back(tokenizer, tmp_path)
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    model = _turn_model(len(tokenizer), eos=tokenizer.eos_token_id)  # stops: <|endoftext|> only
    note = unstopped_turn_end_note(model, tokenizer)
    assert note is not None and "'<|user|>'" in note and f"id {user}" in note
    # with GLM's own stop tokens it stays quiet
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, user,
                                            tokenizer.convert_tokens_to_ids("<|observation|>")]
    assert unstopped_turn_end_note(model, tokenizer) is None


def _outcomes_as_an_ordinary_user(runner, imports: str, *calls: str) -> list[str]:
    """What each of ``calls`` (Python expressions, after ``imports``) gives run as an ordinary user: ``read``, or
    the exception's type and message."""
    lines = [imports] + [f"try:\n    {call}\n    print('RESULT read')\nexcept Exception as error:\n"
                         f"    print('RESULT', type(error).__name__, error)" for call in calls]
    result = runner("\n".join(lines))
    outcomes = [line.split(" ", 1)[1] for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(outcomes) == len(calls), result.stdout + result.stderr[-2000:]
    return outcomes


def _readable_copy(tiny_model_dir, folder):
    """A copy of the tiny model every user may read (and the folders above it, up to the shared one, enter)."""
    import os

    shutil.copytree(tiny_model_dir, folder)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    for path in folder.parents:
        if path.name.startswith("entrorl-ordinary-user-"):
            break
        os.chmod(path, 0o755)
    return folder


UNREADABLE = "PermissionError [Errno 13] Permission denied: this user may not read it"


@pytest.fixture
def files_only_root_reads():
    """``unreadable(path)``: make ``path`` root's alone (0600), skipping where this is not root."""
    import os

    if os.geteuid() != 0:
        pytest.skip("making a file this user cannot read needs another user: root")
    return lambda path: os.chmod(path, 0o600)


def test_model_files_this_user_may_not_read_are_said_to_be_so_not_damaged(tiny_model_dir, as_an_ordinary_user,
                                                                          files_only_root_reads):
    """A teammate's model whose weights are not readable to others (safetensors wrote them 0600): the error says
    permission denied with the owner and mode, not 'No such file or directory ... damaged or truncated; save the
    model again'. A laboratory cache of such files is refused alike, naming ENTRORL_CACHE."""
    import stat

    from entrorl.lab.base_model import BaseModelSpec

    shared = as_an_ordinary_user.folder
    model = _readable_copy(tiny_model_dir, shared / "model")
    cached = _readable_copy(tiny_model_dir, shared / "cache" / "lab" / f"base-{BaseModelSpec().key()}")
    for folder in (model, cached):
        (folder / "base.json").write_text("{}")
        files_only_root_reads(folder / "model.safetensors")
    loaded, cache = _outcomes_as_an_ordinary_user(
        as_an_ordinary_user, "from pathlib import Path\nfrom entrorl.lab.base_model import BaseModelSpec, "
        "cached_base_model\nfrom entrorl.modeling import load_causal_lm",
        f"load_causal_lm({str(model)!r})", f"cached_base_model(BaseModelSpec(), Path({str(shared / 'cache')!r}))")
    mode = stat.filemode(stat.S_IFREG | 0o600)
    assert loaded == (f"{UNREADABLE} (owner root, mode {mode}); ask its owner to make it readable (chmod g+r or a+r), "
                      f"or copy the model: '{model / 'model.safetensors'}'")
    assert cache.startswith(UNREADABLE) and "point ENTRORL_CACHE at a cache of your own" in cache, cache


def test_the_files_checked_for_being_readable_are_those_the_load_reads(tiny_model_dir, as_an_ordinary_user,
                                                                       files_only_root_reads):
    """As transformers reads them: an unreadable pytorch_model.bin that loads (no model.safetensors, another
    *.safetensors beside it) is named as unreadable, not as damaged; no refusal for an unreadable file no loader
    reads (notes.json; legacy weights beside model.safetensors; Mistral's consolidated.safetensors; a vocabulary
    file beside tokenizer.json, which holds it; the weights when only the tokenizer loads)."""
    from safetensors.torch import load_file

    shared = as_an_ordinary_user.folder
    legacy = _readable_copy(tiny_model_dir, shared / "legacy")
    torch.save(load_file(legacy / "model.safetensors"), legacy / "pytorch_model.bin")
    (legacy / "model.safetensors").rename(legacy / "extra.safetensors")
    files_only_root_reads(legacy / "pytorch_model.bin")
    unread = _readable_copy(tiny_model_dir, shared / "unread")
    shutil.copy(unread / "model.safetensors", unread / "consolidated.safetensors")
    (unread / "notes.json").write_text("{}")
    (unread / "vocab.json").write_text("{}")
    (unread / "pytorch_model.bin").write_bytes(b"never read")
    for name in ("consolidated.safetensors", "notes.json", "vocab.json", "pytorch_model.bin"):
        files_only_root_reads(unread / name)
    weights_unread = _readable_copy(tiny_model_dir, shared / "weights-unread")
    files_only_root_reads(weights_unread / "model.safetensors")
    outcomes = _outcomes_as_an_ordinary_user(
        as_an_ordinary_user, "from entrorl.modeling import load_causal_lm, load_tokenizer",
        f"load_causal_lm({str(legacy)!r})", f"load_causal_lm({str(unread)!r})", f"load_tokenizer({str(unread)!r})",
        f"load_tokenizer({str(weights_unread)!r})")
    assert outcomes[0].startswith(UNREADABLE) and outcomes[0].endswith(f"'{legacy / 'pytorch_model.bin'}'"), outcomes
    assert outcomes[1:] == ["read"] * 3


def test_a_slow_tokenizer_s_merges_and_a_folder_this_user_may_not_list_are_said_to_be_so(
        tiny_model_dir, as_an_ordinary_user, files_only_root_reads):
    """Without tokenizer.json a BPE tokenizer reads vocab.json and merges.txt: an unreadable merges.txt is named (the
    tokenizers library says 'Permission denied (os error 13)', naming no file). A model folder this user may enter
    but not list was said to have no weights."""
    import os

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    shared = as_an_ordinary_user.folder
    slow = _readable_copy(tiny_model_dir, shared / "slow-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (slow / name).unlink(missing_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["hello world 1+2=3"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.model.save(str(slow))
    (slow / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        os.chmod(slow / name, 0o644)
    files_only_root_reads(slow / "merges.txt")
    unlisted = _readable_copy(tiny_model_dir, shared / "unlisted")
    os.chmod(unlisted, 0o711)
    merges, folder = _outcomes_as_an_ordinary_user(
        as_an_ordinary_user, "from entrorl.modeling import load_causal_lm, load_tokenizer",
        f"load_tokenizer({str(slow)!r})", f"load_causal_lm({str(unlisted)!r})")
    assert merges.startswith(UNREADABLE) and merges.endswith(f"'{slow / 'merges.txt'}'"), merges
    assert folder.startswith("PermissionError [Errno 13] Permission denied: this user may not list the model "
                             "directory (owner root, mode drwx--x--x)") and folder.endswith(f"'{unlisted}'"), folder


def test_unreadable_lora_adapters_of_a_checkpoint_are_said_to_be_so_not_missing(tiny_model_dir, as_an_ordinary_user,
                                                                                files_only_root_reads):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    shared = as_an_ordinary_user.folder
    base = _readable_copy(tiny_model_dir, shared / "lora-base")
    step = _readable_copy(tiny_model_dir, shared / "lora-run" / "checkpoints" / "step_000001" / "model").parent
    (step / "model" / "model.safetensors").unlink()  # a checkpoint saved without its merged model
    model = AutoModelForCausalLM.from_pretrained(base)
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                               base_model_name_or_path=str(base))).save_pretrained(step / "adapter")
    for path in [step / "adapter", *(step / "adapter").iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        files_only_root_reads(step / "adapter" / name)
        (outcome,) = _outcomes_as_an_ordinary_user(
            as_an_ordinary_user, "from entrorl.trainer.checkpoint import load_model_directory, resolve_model_directory",
            f"load_model_directory(resolve_model_directory({str(step / 'model')!r}))")
        assert outcome.startswith(UNREADABLE) and outcome.endswith(f"'{step / 'adapter' / name}'"), outcome
        (step / "adapter" / name).chmod(0o644)
