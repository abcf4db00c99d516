"""entrorl.rollout: batched KV-cache sampling from a saved tiny model; the sampler's log-probs are exact."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from entrorl.modeling import left_pad, load_causal_lm, load_tokenizer, response_token_stats
from entrorl.rollout import HFSampler, Rollouts, SamplingParams, process_logits


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    torch.set_num_threads(1)
    return load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)


def _prompts(tokenizer):
    texts = ["1+2=", "33+4=", "5*6=7", "9"]  # different lengths: exercises left padding
    return [tokenizer(t)["input_ids"] for t in texts]


def test_tokenizer_round_trips_spaces_and_newlines(policy):
    _, tokenizer = policy
    text = "12 + 3 =\n15"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text) and tokenizer.decode(ids) == text


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_log_probs_equal_a_fresh_forward(policy, temperature):
    model, tokenizer = policy
    sampler = HFSampler(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, batch_size=3)
    torch.manual_seed(0)
    rollouts = sampler.generate(_prompts(tokenizer) * 2, SamplingParams(max_new_tokens=12, temperature=temperature))
    assert rollouts.response_ids.shape[0] == 8
    with torch.no_grad():
        stats = response_token_stats(model, rollouts.prompt_ids, rollouts.prompt_mask, rollouts.response_ids,
                                     rollouts.response_mask, temperature=temperature)
        dense = response_token_stats(model, rollouts.prompt_ids, rollouts.prompt_mask, rollouts.response_ids,
                                     rollouts.response_mask, temperature=temperature, fused_head=False)
    mask = rollouts.response_mask
    torch.testing.assert_close(stats.logprob[mask], rollouts.sampler_log_probs[mask], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(dense.logprob[mask], stats.logprob[mask], atol=2e-5, rtol=1e-5)
    assert torch.all(rollouts.sampler_log_probs[~mask] == 0)


def test_lengths_masks_and_truncation_are_consistent(policy):
    model, tokenizer = policy
    sampler = HFSampler(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(1)
    rollouts = sampler.generate(_prompts(tokenizer) * 4, SamplingParams(max_new_tokens=6))
    assert torch.equal(rollouts.response_mask.sum(-1), rollouts.lengths)
    eos = tokenizer.eos_token_id
    for row in range(len(rollouts)):
        response = rollouts.response_ids[row, : rollouts.lengths[row]].tolist()
        ended = eos in response
        assert ended == (not bool(rollouts.truncated[row]))
        if ended:
            assert response.index(eos) == len(response) - 1  # EOS is the last kept token
        assert torch.all(rollouts.response_ids[row, rollouts.lengths[row]:] == tokenizer.pad_token_id)


def test_same_seed_same_rollouts(policy):
    model, tokenizer = policy
    sampler = HFSampler(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    params = SamplingParams(max_new_tokens=8, top_k=20, top_p=0.9)
    torch.manual_seed(3)
    first = sampler.generate(_prompts(tokenizer), params)
    torch.manual_seed(3)
    second = sampler.generate(_prompts(tokenizer), params)
    assert torch.equal(first.response_ids, second.response_ids)


def test_greedy_is_argmax(policy):
    model, tokenizer = policy
    sampler = HFSampler(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    rollouts = sampler.generate(_prompts(tokenizer)[:1], SamplingParams(max_new_tokens=1, temperature=0.0))
    ids = torch.tensor([_prompts(tokenizer)[0]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits[0, -1].argmax()
    assert rollouts.response_ids[0, 0] == expected


def test_greedy_log_probs_are_those_of_the_temperature_one_distribution(policy):
    """At temperature 0 each kept log-prob is the chosen token's under the model's plain (temperature 1) softmax."""
    model, tokenizer = policy
    sampler = HFSampler.for_model(model, tokenizer)
    rollouts = sampler.generate(_prompts(tokenizer), SamplingParams(max_new_tokens=6, temperature=0.0))
    with torch.no_grad():
        stats = response_token_stats(model, rollouts.prompt_ids, rollouts.prompt_mask, rollouts.response_ids,
                                     rollouts.response_mask, temperature=1.0)
    mask = rollouts.response_mask
    assert bool((rollouts.sampler_log_probs[mask] < -1e-3).any())  # not all near-certain tokens
    torch.testing.assert_close(rollouts.sampler_log_probs[mask], stats.logprob[mask], atol=2e-5, rtol=1e-5)


def test_process_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    top_k = process_logits(logits, SamplingParams(top_k=2))
    assert torch.isinf(top_k[0, 2:]).all() and torch.isfinite(top_k[0, :2]).all()
    top_p = process_logits(logits, SamplingParams(top_p=0.7))  # 0.5 < 0.7, 0.5 + 0.25 >= 0.7: keep two
    assert torch.isfinite(top_p[0, :2]).all() and torch.isinf(top_p[0, 2:]).all()
    tiny_p = process_logits(logits, SamplingParams(top_p=0.01))  # the most likely token always stays
    assert torch.isfinite(tiny_p[0, 0]) and torch.isinf(tiny_p[0, 1:]).all()
    scaled = process_logits(logits, SamplingParams(temperature=0.5))
    torch.testing.assert_close(scaled, logits * 2)


def test_rare_tokens_of_a_large_vocabulary_are_drawn_at_their_probability():
    """Inverting a float32 running sum with a float32 uniform (a 2^-24 grid) cannot reach a token below ~6e-8 that
    follows most of the mass: its interval rounds to nothing (on this vocabulary ~1e-3 of the mass was never drawn).
    Each uniform must draw the token whose interval of the exact cumulative distribution holds it."""
    from entrorl.rollout.sampler import sample_from_log_probs

    vocab = 152_064
    logits = torch.zeros(1, vocab)
    logits[0, :20] = 14.0  # twenty tokens hold almost all the mass, as after a confident prefix
    log_probs = logits.log_softmax(-1)
    probabilities = log_probs.double().exp()[0]
    probabilities /= probabilities.sum()  # float32 log-probs sum to 1 within ~1e-7: the draw renormalises them
    before = probabilities.cumsum(0)
    assert probabilities[-1] < 2**-24 and 1e-3 < float(probabilities[20:].sum())  # each below the float32 grid
    for token in (20, vocab // 2, vocab - 1):  # a uniform inside each rare token's own interval draws it
        inside = (before[token] - probabilities[token] / 2).reshape(1, 1)
        assert int(sample_from_log_probs(log_probs, inside)) == token
    tail = float(before[19]) + (1 - float(before[19])) * torch.rand(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    drawn = torch.stack([sample_from_log_probs(log_probs, u[None])[0] for u in tail])
    torch.testing.assert_close(drawn, torch.searchsorted(before, tail[:, 0], right=True))


def test_the_sampler_draws_with_float64_uniforms(policy, monkeypatch):
    """A float32 uniform lies on a 2^-24 grid, which no float64 sum can refine."""
    from entrorl.rollout import sampler as sampler_module

    model, tokenizer = policy
    dtypes, draw = [], sampler_module.sample_from_log_probs
    monkeypatch.setattr(sampler_module, "sample_from_log_probs",
                        lambda log_probs, uniform=None: dtypes.append(uniform.dtype) or draw(log_probs, uniform))
    HFSampler.for_model(model, tokenizer).generate(_prompts(tokenizer), SamplingParams(max_new_tokens=3))
    assert dtypes and set(dtypes) == {torch.float64}


def test_concat_and_select_repad():
    def make(prompt_width, response_width, rows):
        return Rollouts(
            prompt_ids=torch.ones(rows, prompt_width, dtype=torch.long), prompt_mask=torch.ones(rows, prompt_width, dtype=torch.bool),
            response_ids=torch.ones(rows, response_width, dtype=torch.long), response_mask=torch.ones(rows, response_width, dtype=torch.bool),
            sampler_log_probs=torch.zeros(rows, response_width), lengths=torch.full((rows,), response_width),
            truncated=torch.zeros(rows, dtype=torch.bool),
        )

    joined = Rollouts.concat([make(2, 3, 1), make(4, 1, 2)], pad_token_id=0)
    assert joined.prompt_ids.shape == (3, 4) and joined.response_ids.shape == (3, 3)
    assert joined.prompt_mask[0].tolist() == [False, False, True, True]  # prompts stay left-padded
    assert joined.response_mask[1].tolist() == [True, False, False]  # responses right-padded
    assert len(joined.select([2])) == 1


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    for bad in (0, 8.0, None):
        with pytest.raises(ValueError, match=f"max_new_tokens must be a positive integer, got {bad!r}"):
            SamplingParams(max_new_tokens=bad)
    with pytest.raises(ValueError, match="top_k must be a non-negative integer, got 2.5"):
        SamplingParams(top_k=2.5)


def test_sampling_params_take_numpy_integers_as_python_ints():
    params = SamplingParams(max_new_tokens=np.int64(8), top_k=np.int32(5))
    assert (params.max_new_tokens, params.top_k) == (8, 5)
    assert type(params.max_new_tokens) is int and type(params.top_k) is int


def test_sampling_params_refuse_a_negative_temperature_a_top_p_above_one_and_a_negative_top_k():
    """An infinite temperature would sample uniformly and a NaN one would divide every logit into NaN: both refused."""
    for kwargs, name in (({"temperature": -0.5}, "temperature"), ({"temperature": float("inf")}, "temperature"),
                         ({"temperature": float("nan")}, "temperature"), ({"top_p": float("nan")}, "top_p"),
                         ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k")):
        with pytest.raises(ValueError, match=name):
            SamplingParams(**kwargs)


def test_a_sampler_without_eos_ids_or_with_an_empty_batch_is_refused_and_so_is_an_empty_prompt_list(policy):
    """With no id to stop at, every response would run to max_new_tokens; a batch of no rows would never advance."""
    model, _ = policy
    with pytest.raises(ValueError, match="at least one eos_token_id"):
        HFSampler(model, eos_token_id=[], pad_token_id=0)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {bad!r}"):
            HFSampler(model, eos_token_id=1, pad_token_id=0, batch_size=bad)
    with pytest.raises(ValueError, match="no prompts"):
        HFSampler(model, eos_token_id=1, pad_token_id=0).generate([], SamplingParams(max_new_tokens=2))


def test_eos_and_pad_ids_are_taken_as_any_integer_and_refused_when_they_are_not_one(policy):
    """One EOS id as a Python, numpy or 0-d tensor integer, several as a list or a tensor; a float, a negative id or a
    missing pad (a tokenizer without a pad token) is named, not failed on later."""
    import numpy as np

    model, _ = policy
    for one in (2, np.int64(2), torch.tensor(2)):
        assert HFSampler(model, eos_token_id=one, pad_token_id=np.int32(0)).eos_token_ids.tolist() == [2]
    for several in ([2, 5], (2, 5), torch.tensor([2, 5]), np.array([2, 5])):
        assert HFSampler(model, eos_token_id=several, pad_token_id=0).eos_token_ids.tolist() == [2, 5]
    for bad in (2.0, -1, [1, 2.5]):
        with pytest.raises(ValueError, match="eos_token_id must be a non-negative integer"):
            HFSampler(model, eos_token_id=bad, pad_token_id=0)
    with pytest.raises(ValueError, match="needs a pad_token_id"):
        HFSampler(model, eos_token_id=1, pad_token_id=None)
    with pytest.raises(ValueError, match="pad_token_id must be a non-negative integer, got 1.5"):
        HFSampler(model, eos_token_id=1, pad_token_id=1.5)


def test_an_empty_prompt_beside_others_is_refused(policy):
    """It would be sampled as if its prompt were one padding token."""
    model, tokenizer = policy
    sampler = HFSampler.for_model(model, tokenizer)
    with pytest.raises(ValueError, match=r"prompt\(s\) \[1\] have none"):
        sampler.generate([_prompts(tokenizer)[0], []], SamplingParams(max_new_tokens=2))


def test_a_prompt_token_outside_the_model_s_vocabulary_is_named(policy):
    """A tokenizer of another model: an id past the embedding table (or a negative one) is refused with the id and
    the vocabulary's size, not an IndexError from inside the model; padding, whatever its id, is not checked."""
    model, tokenizer = policy
    rows = model.get_input_embeddings().num_embeddings
    sampler = HFSampler.for_model(model, tokenizer)
    good = _prompts(tokenizer)[0]
    for bad in (rows, -1):
        with pytest.raises(ValueError, match=rf"a prompt holds token id {bad}, outside the model's vocabulary of "
                                             rf"{rows} ids: a tokenizer of another model\?"):
            sampler.generate([good, [*good[:-1], bad]], SamplingParams(max_new_tokens=2))
    assert sampler.generate([good, good[:1]], SamplingParams(max_new_tokens=2)).response_ids.shape[0] == 2


@pytest.mark.parametrize("decoder", ["static_cache", "transformers"])
def test_a_pad_token_outside_the_model_s_vocabulary_is_named(policy, decoder):
    """A pad token added to the tokenizer without resizing the embeddings pads the shorter prompts with an id the
    model has no row for: refused naming it, not an IndexError from inside the model."""
    model, tokenizer = policy
    rows = model.get_input_embeddings().num_embeddings
    sampler = HFSampler(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=rows + 3, decoder=decoder)
    with pytest.raises(ValueError, match=rf"pad_token_id {rows + 3} is outside the model's vocabulary of {rows} ids"):
        sampler.generate(_prompts(tokenizer)[:2], SamplingParams(max_new_tokens=2))


def test_stop_tokens_the_model_has_no_row_for_are_refused_or_named(policy, tmp_path):
    """An EOS added to the tokenizer without resizing the embeddings: the model can never sample it, so every response
    ran to max_new_tokens without a word (response/truncated_frac 1.0). With no stop id the model can sample, the
    sampler (and a Trainer, which builds one before any step) refuses; with another one left, a warning names it."""
    import json
    import warnings

    import yaml

    from entrorl.lab.tiny_model import build_char_tokenizer, build_tiny_qwen2
    from entrorl.trainer import Trainer, load_config

    model, tokenizer = policy
    rows = model.get_input_embeddings().num_embeddings
    for stops in ([rows], [rows, rows + 5]):
        with pytest.raises(ValueError, match=rf"no response could ever end: the stop token id\(s\) "
                                             rf"{re.escape(str(stops))} have no row in the model's vocabulary of {rows} ids"):
            HFSampler(model, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    with pytest.warns(UserWarning, match=rf"the stop token id\(s\) \[{rows}\] have no row in the model's vocabulary of "
                                         rf"{rows} ids and can never be sampled; responses end at the others "
                                         rf"\(\[{tokenizer.eos_token_id}\]\)"):
        HFSampler(model, eos_token_id=[tokenizer.eos_token_id, rows], pad_token_id=tokenizer.pad_token_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HFSampler.for_model(model, tokenizer)

    extended = build_char_tokenizer()
    small = build_tiny_qwen2(len(extended), hidden_size=32, max_position_embeddings=64)
    extended.add_special_tokens({"eos_token": "<|eot|>"})
    small.config.eos_token_id = small.generation_config.eos_token_id = None
    small.save_pretrained(tmp_path / "model")
    extended.save_pretrained(tmp_path / "model")
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "model": {"path": str(tmp_path / "model")}, "data": {"train": str(tmp_path / "train.jsonl")},
        "reward": {"name": "exact_match"}, "rollout": {"prompts_per_step": 1, "group_size": 2, "max_new_tokens": 4},
        "optim": {"steps": 1}, "logging": {"progress": False}}))
    with pytest.raises(ValueError, match=rf"the stop token id\(s\) \[{extended.eos_token_id}\] have no row"):
        Trainer(load_config(tmp_path / "run.yaml"), run_dir=tmp_path / "run")
    from typer.testing import CliRunner

    from entrorl.cli import app

    common = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.jsonl"), "--n", "2",
              "--max-new-tokens", "4"]
    for command in (["eval", *common], ["data", "audit", *common, "--out", str(tmp_path / "audit")]):
        refused = CliRunner().invoke(app, command)  # said in one line before any sampling, not a traceback
        assert refused.exit_code == 2 and "error: no response could ever end" in refused.output, refused.output


@pytest.mark.parametrize("decoder", ["static_cache", "transformers"])
def test_a_temperature_near_zero_samples_as_greedy_with_finite_log_probs(policy, decoder):
    """At temperature 1e-39 the logits divided by it overflow float32; shifted by their maximum first, every token
    but the most likely one goes to -inf, as the limit says, instead of NaN probabilities (and token 0 drawn)."""
    model, tokenizer = policy
    sampler = HFSampler(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        decoder=decoder)
    prompts = _prompts(tokenizer)
    greedy = sampler.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0))
    torch.manual_seed(0)
    near_zero = sampler.generate(prompts, SamplingParams(max_new_tokens=6, temperature=1e-39))
    assert near_zero.completion_ids() == greedy.completion_ids()
    assert torch.equal(near_zero.sampler_log_probs[near_zero.response_mask],
                       torch.zeros(int(near_zero.response_mask.sum())))


def test_loading_errors(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json is a file; the model is a directory"):
        load_causal_lm(tiny_model_dir / "config.json")
    run = tmp_path / "run"  # what `entrorl train` writes: its settings as config.json, the models in checkpoints
    (run / "checkpoints" / "step_000004" / "model").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "checkpoints" / "step_000004" / "model" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"run is an entrorl run directory; its models are in "
                                                r"checkpoints/step_N/model \(the last one: .*step_000004/model\)"):
        load_causal_lm(run)
    import shutil

    from entrorl.modeling import check_model_files

    model_with_runs = tmp_path / "model-with-runs"  # a real model directory that also holds a run's checkpoints
    shutil.copytree(tiny_model_dir, model_with_runs)
    shutil.copytree(run / "checkpoints", model_with_runs / "checkpoints")
    assert check_model_files(model_with_runs) == model_with_runs
    # a directory with the model's config but without its tokenizer or its weights says which is missing, before
    # transformers builds an empty tokenizer from config.json or fails deep inside from_pretrained
    import shutil

    for kept, loader, missing in (("model.safetensors", load_tokenizer, "has no tokenizer"),
                                  ("tokenizer.json", load_causal_lm, "has no weights")):
        partial = tmp_path / f"without-{missing.split()[-1]}"
        partial.mkdir()
        shutil.copy(tiny_model_dir / "config.json", partial)
        shutil.copy(tiny_model_dir / kept, partial)
        with pytest.raises(FileNotFoundError, match=missing):
            loader(partial)


def test_private_seed_draws_the_same_and_leaves_the_callers_stream_alone():
    from entrorl.rollout import private_seed

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with private_seed(7):
        inside = torch.rand(2)
    with private_seed(7):
        assert torch.equal(torch.rand(2), inside)
    assert torch.equal(torch.rand(3), expected_next)  # as if the seeded blocks had never run
    torch.manual_seed(7)  # the body draws what torch.manual_seed(seed) would have it draw
    assert torch.equal(torch.rand(2), inside)


@pytest.mark.parametrize("device_type", ["cuda", "mps"])
def test_private_seed_puts_back_a_gpus_generator_too(device_type, monkeypatch):
    """Sampling on a CUDA or an Apple GPU draws from that device's generator, which torch.manual_seed reseeds: its
    state is put back as the CPU's is (a stand-in module records what torch's fork_rng reads and writes)."""
    from entrorl.rollout import private_seed

    calls = []

    class DeviceModule:
        @staticmethod
        def get_rng_state(device):
            calls.append(("get", str(device)))
            return torch.tensor([1], dtype=torch.uint8)

        @staticmethod
        def set_rng_state(state, device):
            calls.append(("set", str(device)))

    real = torch.get_device_module
    monkeypatch.setattr(torch, "get_device_module", lambda kind=None: DeviceModule if kind == device_type else real(kind))
    with private_seed(7, device_type):
        pass
    assert calls == [("get", device_type), ("set", device_type)]
    calls.clear()
    with private_seed(7, "cpu"):
        pass
    assert calls == []


def _greedy_and_log_probs_against_the_model(model, prompt: list[int], max_new_tokens: int):
    """entrorl's greedy response to ``prompt`` next to transformers' own, and its sampled (T = 1) log-probs next
    to a fresh unpadded forward over prompt + response."""
    sampler = HFSampler(model, eos_token_id=[1], pad_token_id=0)
    greedy = sampler.generate([prompt], SamplingParams(max_new_tokens=max_new_tokens, temperature=0)).response_ids[0].tolist()
    theirs = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(prompt):].tolist()
    torch.manual_seed(0)
    rollouts = sampler.generate([prompt], SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0))
    length = int(rollouts.lengths[0])
    ids = torch.tensor([prompt + rollouts.response_ids[0, :length].tolist()])
    with torch.no_grad():
        log_probs = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
    recomputed = log_probs.gather(-1, ids[0, len(prompt):, None])[:, 0]
    return greedy, theirs, rollouts.sampler_log_probs[0, :length], recomputed


@pytest.mark.parametrize("model_type", ["mamba", "falcon_mamba"])
def test_state_space_models_decode_without_the_mask(model_type):
    """A Mamba decode step given the whole attention mask scales its one new token by it (transformers passes none)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=40, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
                                  conv_kernel=4, pad_token_id=0, eos_token_id=1)
    model = AutoModelForCausalLM.from_config(config).eval()
    greedy, theirs, sampled, recomputed = _greedy_and_log_probs_against_the_model(model, [5, 9, 13, 17, 21, 25, 29], 8)
    assert greedy == theirs
    torch.testing.assert_close(sampled, recomputed, atol=1e-4, rtol=0)


def _longrope_model():
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    config = Phi3Config(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=128, original_max_position_embeddings=12,
                        pad_token_id=0, eos_token_id=1,
                        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
                                         "long_factor": [4.0, 8.0, 16.0, 32.0], "original_max_position_embeddings": 12})
    model = Phi3ForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0, 0.3)  # sharp distributions, so that a wrong rotation shows
    return model


def test_a_longrope_model_rebuilds_its_cache_where_its_sequences_pass_the_original_context():
    """Phi-3's long-context RoPE rotates every position with its long factors once a sequence passes the original
    context: the keys cached before then are recomputed at that step (as transformers' generate does); a response
    that ends beyond the original context is then sampled from the model's own distribution from there on."""
    model = _longrope_model()
    prompt = [5, 9, 13, 17, 21, 25, 29, 33]
    greedy, theirs, sampled, recomputed = _greedy_and_log_probs_against_the_model(model, prompt, 10)
    assert greedy == theirs
    # the tokens drawn from a call that holds 13 positions or more: on the long factors, as the recompute
    switched = 13 - len(prompt)
    assert len(sampled) > switched
    torch.testing.assert_close(sampled[switched:], recomputed[switched:], atol=1e-4, rtol=0)


def test_a_longrope_cache_on_the_long_factors_keeps_its_rows_and_a_long_prompt_is_not_run_twice(monkeypatch):
    """Dropping rows from a cache rotated with the long factors could leave only rows under the original context,
    whose next tokens would be rotated with the short ones: such a cache keeps its rows. A prompt already beyond the
    original context is prefilled on the long factors, with nothing to rebuild."""
    from entrorl.rollout.sampler import _TransformersDecoder

    model = _longrope_model()
    prompt_ids, prompt_mask = left_pad([list(range(3, 14)), [5, 6, 7]], 0)  # 11 tokens and 3: the first passes 12 first
    with torch.no_grad():
        decoder = _TransformersDecoder(model, prompt_ids, prompt_mask)
        decoder.prefill()
        decoder.decode(torch.tensor([20, 21]))  # the long row's token at position 11: still the short factors
        assert not decoder.long_factors and decoder.select(torch.tensor([0, 1]))
        decoder.decode(torch.tensor([22, 23]))  # position 12: the cache is rebuilt on the long factors
        assert decoder.long_factors and not decoder.select(torch.tensor([1]))

        runs = []
        whole = _TransformersDecoder._run_whole_sequences
        monkeypatch.setattr(_TransformersDecoder, "_run_whole_sequences", lambda self: runs.append(1) or whole(self))
        decoder = _TransformersDecoder(model, *left_pad([list(range(3, 17))], 0))
        decoder.prefill()
        decoder.decode(torch.tensor([20]))
        assert decoder.long_factors and runs == [1]


def test_top_p_keeps_the_smallest_prefix_that_reaches_p():
    """Four equal tokens and p = 0.5: the first two already reach 0.5, so the third is dropped."""
    assert int(torch.isfinite(process_logits(torch.zeros(1, 4), SamplingParams(top_p=0.5))).sum()) == 2


def _nucleus_reference(probabilities: list[float], top_p: float) -> list[bool]:
    """Which tokens nucleus filtering keeps, by hand: in order of decreasing probability, a token stays while the
    mass of the tokens before it is below ``top_p``."""
    kept, mass = [False] * len(probabilities), 0.0
    for index in sorted(range(len(probabilities)), key=lambda i: -probabilities[i]):
        kept[index] = mass < top_p
        mass += probabilities[index]
    return kept


def test_top_p_keeps_the_most_likely_tokens_wherever_they_stand_in_each_row():
    """The nucleus is found by probability, not by position: rows whose likely tokens come last or in between keep
    exactly the tokens the hand-computed nucleus keeps."""
    rows = [[0.1, 0.15, 0.25, 0.5], [0.3, 0.05, 0.6, 0.05], [0.2, 0.2, 0.2, 0.4]]
    filtered = process_logits(torch.log(torch.tensor(rows)), SamplingParams(top_p=0.7))
    assert torch.isfinite(filtered).tolist() == [_nucleus_reference(row, 0.7) for row in rows]
    assert torch.isfinite(filtered).tolist() == [[False, False, True, True], [True, False, True, False],
                                                 [True, True, False, True]]


def test_temperature_is_applied_before_top_p():
    """Probabilities 0.5, 0.3, 0.2 at temperature 2 become about 0.42, 0.32, 0.26: with p = 0.75 the mass before the
    last token (about 0.74) is below p, so all three stay (at temperature 1 it would be 0.8 and the last dropped)."""
    probabilities = torch.tensor([[0.5, 0.3, 0.2]])
    logits = torch.log(probabilities)
    heated = (probabilities.sqrt() / probabilities.sqrt().sum()).tolist()[0]
    assert _nucleus_reference(heated, 0.75) == [True, True, True] and _nucleus_reference([0.5, 0.3, 0.2], 0.75)[2] is False
    torch.testing.assert_close(process_logits(logits, SamplingParams(temperature=2.0, top_p=0.75)), logits / 2)


def test_top_p_is_taken_over_the_distribution_top_k_leaves():
    """Top-k first, then top-p on what top-k kept: 0.4, 0.3, 0.2, 0.1 with k = 2 leave 4/7 and 3/7, and with p = 0.5
    the first token alone already reaches p."""
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    filtered = process_logits(logits, SamplingParams(top_k=2, top_p=0.5))
    assert torch.isfinite(filtered).tolist() == [[True, False, False, False]]


def test_top_k_at_or_above_the_vocabulary_size_keeps_every_token():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    for top_k in (3, 10):
        assert torch.equal(process_logits(logits, SamplingParams(top_k=top_k)), logits)


def test_the_default_parameters_leave_the_logits_unchanged_even_for_a_negligible_token():
    """top_p = 1 disables the nucleus filter: a token whose probability (about 4e-44) vanishes beside the others'
    rounding stays finite."""
    logits = torch.tensor([[0.0, -100.0, 1.0]])
    assert torch.equal(process_logits(logits, SamplingParams()), logits)


def test_bfloat16_logits_are_processed_in_float32():
    """The filters and the kept log-probs work on float32 scores, not on the model's low-precision logits."""
    logits = torch.tensor([[1.0, 0.3, -0.7, 2.1]], dtype=torch.bfloat16)
    processed = process_logits(logits, SamplingParams(temperature=0.7))
    assert processed.dtype == torch.float32
    torch.testing.assert_close(processed, logits.float() / 0.7, atol=0, rtol=0)


def test_inverse_cdf_sampling_never_draws_a_minus_inf_token_and_a_uniform_on_a_step_takes_the_next_token():
    from entrorl.rollout.sampler import sample_from_log_probs

    leading_minus_inf = torch.tensor([[-math.inf, math.log(0.5), math.log(0.5)]], dtype=torch.float64)
    assert sample_from_log_probs(leading_minus_inf, torch.zeros(1, 1, dtype=torch.float64)).tolist() == [1]
    halves = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    assert sample_from_log_probs(halves, torch.full((1, 1), 0.5, dtype=torch.float64)).tolist() == [1]


def _rollouts_with_many_eos_ids(policy, every: int, max_new_tokens: int) -> tuple[Rollouts, list[int]]:
    """Rollouts whose stop ids are the tokenizer's EOS and every ``every``-th id, so that a random model ends most
    responses early; ``compact=False`` keeps finished rows in the batch while the others decode on."""
    model, tokenizer = policy
    eos = [tokenizer.eos_token_id] + [i for i in range(model.config.vocab_size)
                                      if i % every == 0 and i != tokenizer.eos_token_id]
    sampler = HFSampler(model, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, compact=False)
    torch.manual_seed(0)
    return sampler.generate(_prompts(tokenizer) * 4, SamplingParams(max_new_tokens=max_new_tokens)), eos


def test_every_listed_eos_id_ends_a_response(policy):
    rollouts, eos = _rollouts_with_many_eos_ids(policy, every=2, max_new_tokens=8)
    tokenizer = policy[1]
    ended_by_another_id = 0
    for row in range(len(rollouts)):
        response = rollouts.response_ids[row, : rollouts.lengths[row]].tolist()
        stops = [index for index, token in enumerate(response) if token in set(eos)]
        assert stops == ([] if bool(rollouts.truncated[row]) else [len(response) - 1])
        ended_by_another_id += bool(stops) and response[-1] != tokenizer.eos_token_id
    assert ended_by_another_id > 0


def test_sampler_log_probs_are_zero_after_a_response_ends(policy):
    """Rows that end early while the batch decodes on hold 0 there."""
    rollouts, _ = _rollouts_with_many_eos_ids(policy, every=3, max_new_tokens=10)
    assert bool((~rollouts.response_mask).any())
    assert torch.equal(rollouts.sampler_log_probs[~rollouts.response_mask],
                       torch.zeros(int((~rollouts.response_mask).sum()), dtype=rollouts.sampler_log_probs.dtype))


class _ScriptedDecoder:
    """A decoder whose greedy token for row ``r`` (of the chunk) is EOS at step ``finish[r]`` and 5 before; records
    the rows of every decode call and the model's mode at the prefill."""

    def __init__(self, model, batch: int, finish: list[int]):
        self.model, self.vocab, self.finish = model, model.config.vocab_size, finish
        self.rows, self.step, self.decoded, self.training = torch.arange(batch), 0, [], None

    def _logits(self) -> torch.Tensor:
        logits = torch.zeros(len(self.rows), self.vocab)
        for index, row in enumerate(self.rows.tolist()):
            logits[index, 1 if self.step == self.finish[row % len(self.finish)] else 5] = 10.0
        return logits

    def prefill(self) -> torch.Tensor:
        self.training = self.model.training
        return self._logits()

    def select(self, rows: torch.Tensor) -> bool:
        self.rows = self.rows[rows]
        return True

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        assert len(tokens) == len(self.rows)
        self.decoded.append(len(tokens))
        self.step += 1
        return self._logits()


def _scripted_sampler(policy, finish: list[int], **kwargs) -> tuple[HFSampler, list[_ScriptedDecoder]]:
    model, _ = policy
    sampler = HFSampler(model, eos_token_id=1, pad_token_id=0, **kwargs)
    decoders = []
    sampler._make_decoder = lambda ids, mask, max_new_tokens: decoders.append(_ScriptedDecoder(model, len(ids), finish)) or decoders[-1]
    return sampler, decoders


def test_rows_leave_the_decoder_once_a_quarter_have_finished_and_sampling_stops_when_all_have(policy):
    """One row of four ending at the first step is a quarter: the next decode call runs three rows. Once every row
    has ended no step follows, and the responses are as wide as the longest."""
    sampler, decoders = _scripted_sampler(policy, finish=[0, 4, 4, 4])
    rollouts = sampler.generate([[5, 6]] * 4, SamplingParams(max_new_tokens=6, temperature=0.0))
    assert decoders[0].decoded == [3, 3, 3, 3]
    assert rollouts.response_ids.tolist() == [[1, 0, 0, 0, 0], [5, 5, 5, 5, 1], [5, 5, 5, 5, 1], [5, 5, 5, 5, 1]]
    assert rollouts.lengths.tolist() == [1, 5, 5, 5] and not rollouts.truncated.any()
    sampler, decoders = _scripted_sampler(policy, finish=[0, 1, 4, 4, 4, 4, 4, 4])  # one of eight: fewer than a quarter
    sampler.generate([[5, 6]] * 8, SamplingParams(max_new_tokens=6, temperature=0.0))
    assert decoders[0].decoded == [8, 6, 6, 6]


def test_generate_reports_progress_per_chunk_and_restores_the_models_mode(policy):
    """Sampling runs the model in eval mode and leaves it in the mode it found; progress counts finished prompts."""
    model, _ = policy
    sampler, decoders = _scripted_sampler(policy, finish=[1], batch_size=2)
    done = []
    try:
        model.train()
        sampler.generate([[5, 6]] * 5, SamplingParams(max_new_tokens=3, temperature=0.0), progress=done.append)
        assert model.training
    finally:
        model.eval()
    assert done == [2, 4, 5] and [decoder.training for decoder in decoders] == [False] * 3
    sampler.generate([[5, 6]], SamplingParams(max_new_tokens=3, temperature=0.0))
    assert not model.training


def test_no_decode_step_follows_the_last_token_of_a_truncated_batch(policy):
    """Responses that never end take max_new_tokens tokens from the prefill and max_new_tokens - 1 decode calls."""
    sampler, decoders = _scripted_sampler(policy, finish=[99])
    rollouts = sampler.generate([[5, 6]] * 2, SamplingParams(max_new_tokens=4, temperature=0.0))
    assert decoders[0].decoded == [2, 2, 2]
    assert rollouts.response_ids.tolist() == [[5] * 4] * 2 and rollouts.lengths.tolist() == [4, 4]
    assert rollouts.truncated.tolist() == [True, True]


@pytest.mark.parametrize("batch_size", [64, 1])
def test_prompts_and_finished_responses_are_padded_with_the_given_pad_id(policy, batch_size):
    """Shorter prompts are left-padded and responses right-padded after their EOS with pad_token_id, here 7, also
    where the rows come from separate chunks (batch_size 1) joined afterwards."""
    model, _ = policy
    sampler = HFSampler(model, eos_token_id=1, pad_token_id=7, batch_size=batch_size)
    finishes = iter([[0, 2]] if batch_size > 1 else [[0], [2]])  # each chunk's rows: EOS at step 0, then at step 2
    sampler._make_decoder = lambda ids, mask, max_new_tokens: _ScriptedDecoder(model, len(ids), next(finishes))
    rollouts = sampler.generate([[5, 6], [5]], SamplingParams(max_new_tokens=4, temperature=0.0))
    assert rollouts.prompt_ids.tolist() == [[5, 6], [7, 5]]
    assert rollouts.prompt_mask.tolist() == [[True, True], [False, True]]
    assert rollouts.response_ids.tolist() == [[1, 7, 7], [5, 5, 1]]


def test_concat_pads_sampler_log_probs_on_the_right():
    """Each row's log-probs stay under its response tokens when a wider part forces padding."""
    def make(response_width, value):
        return Rollouts(
            prompt_ids=torch.ones(1, 2, dtype=torch.long), prompt_mask=torch.ones(1, 2, dtype=torch.bool),
            response_ids=torch.ones(1, response_width, dtype=torch.long), response_mask=torch.ones(1, response_width, dtype=torch.bool),
            sampler_log_probs=torch.full((1, response_width), value), lengths=torch.full((1,), response_width),
            truncated=torch.zeros(1, dtype=torch.bool))

    joined = Rollouts.concat([make(3, -0.5), make(1, -2.0)], pad_token_id=0)
    assert joined.sampler_log_probs.tolist() == [[-0.5, -0.5, -0.5], [-2.0, 0.0, 0.0]]


def test_concat_and_select_keep_each_rows_prompt_length_and_truncation_flag():
    """Prompts are left-padded with the pad id, and every row keeps its own length and truncation flag, through a
    concatenation and a selection of rows."""
    def make(prompt, response, truncated):
        return Rollouts(
            prompt_ids=torch.tensor([prompt]), prompt_mask=torch.ones(1, len(prompt), dtype=torch.bool),
            response_ids=torch.tensor([response]), response_mask=torch.ones(1, len(response), dtype=torch.bool),
            sampler_log_probs=torch.zeros(1, len(response)), lengths=torch.tensor([len(response)]),
            truncated=torch.tensor([truncated]))

    joined = Rollouts.concat([make([3], [4, 5, 6], True), make([7, 8, 2], [1], False)], pad_token_id=9)
    assert joined.prompt_ids.tolist() == [[9, 9, 3], [7, 8, 2]]
    assert joined.response_ids.tolist() == [[4, 5, 6], [1, 9, 9]]
    assert joined.lengths.tolist() == [3, 1] and joined.truncated.tolist() == [True, False]
    picked = joined.select([1, 0])  # every field follows its row
    assert picked.prompt_ids.tolist() == [[7, 8, 2], [9, 9, 3]] and picked.response_ids.tolist() == [[1, 9, 9], [4, 5, 6]]
    assert picked.response_mask.tolist() == [[True, False, False], [True, True, True]]
    assert picked.lengths.tolist() == [1, 3] and picked.truncated.tolist() == [False, True]
    masked = joined.select(torch.tensor([False, True]))  # a boolean mask keeps the rows it marks
    assert masked.prompt_ids.tolist() == [[7, 8, 2]] and masked.lengths.tolist() == [1]
    with pytest.raises(ValueError, match=r"one entry per row \(2\), got shape \(3,\)"):
        joined.select(torch.tensor([True, False, True]))


def test_a_longrope_decoder_that_dropped_rows_rebuilds_its_cache_from_the_rows_it_kept():
    """Rows dropped before a sequence passes the original context are gone from the rebuild on the long factors too."""
    from entrorl.rollout.sampler import _TransformersDecoder

    model = _longrope_model()
    long_prompt = list(range(3, 14))  # 11 tokens: its second new token is at position 12, past the original 12
    prompt_ids, prompt_mask = left_pad([[5, 6, 7], long_prompt], 0)
    with torch.no_grad():
        decoder = _TransformersDecoder(model, prompt_ids, prompt_mask)
        decoder.prefill()
        assert decoder.select(torch.tensor([1]))
        decoder.decode(torch.tensor([20]))
        logits = decoder.decode(torch.tensor([21]))
        assert decoder.long_factors
        expected = model(input_ids=torch.tensor([long_prompt + [20, 21]])).logits[0, -1]
    torch.testing.assert_close(logits[0], expected, atol=1e-4, rtol=0)


def test_the_default_decoder_is_the_static_cache_where_it_can_run_and_the_models_own_forward_elsewhere(policy):
    """``decoder="auto"`` runs a Qwen2 on the static cache and a Phi-3 with longrope (a RoPE that depends on the
    sequence length) on its own forward; ``"transformers"`` always takes the model's own forward."""
    from entrorl.rollout.sampler import _TransformersDecoder
    from entrorl.rollout.static_cache import StaticCacheDecoder

    model, tokenizer = policy
    ids, mask = left_pad(_prompts(tokenizer), tokenizer.pad_token_id)
    auto = HFSampler(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert auto.decoder == "auto"
    assert type(auto._make_decoder(ids, mask, 4)) is StaticCacheDecoder
    plain = HFSampler(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, decoder="transformers")
    assert type(plain._make_decoder(ids, mask, 4)) is _TransformersDecoder
    longrope = HFSampler(_longrope_model(), eos_token_id=1, pad_token_id=0)
    assert type(longrope._make_decoder(torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.bool), 4)) is _TransformersDecoder


def test_for_model_stops_at_every_eos_the_model_declares_and_pads_with_the_tokenizers_pad():
    """A chat model's end-of-turn token, declared in its generation config, ends a response as the tokenizer's EOS does."""
    from types import SimpleNamespace

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[2, 9]), config=SimpleNamespace(eos_token_id=4))
    sampler = HFSampler.for_model(model, SimpleNamespace(eos_token_id=2, pad_token_id=0), batch_size=5)
    assert sampler.eos_token_ids.tolist() == [2, 9, 4]
    assert (sampler.pad_token_id, sampler.batch_size) == (0, 5)


def test_a_longrope_prompt_exactly_at_the_original_context_is_rebuilt_on_the_long_factors_at_its_first_new_token():
    """A 12-token prompt (the original context) is prefilled on the short factors; the call that feeds position 12
    passes the context, so the cache is rebuilt and the logits are those of one forward over all 13 tokens."""
    from entrorl.rollout.sampler import _TransformersDecoder

    model = _longrope_model()
    prompt = list(range(3, 15))
    with torch.no_grad():
        decoder = _TransformersDecoder(model, *left_pad([prompt], 0))
        prefill = decoder.prefill()
        assert not decoder.long_factors
        torch.testing.assert_close(prefill[0], model(input_ids=torch.tensor([prompt])).logits[0, -1], atol=1e-4, rtol=0)
        logits = decoder.decode(torch.tensor([20]))
        assert decoder.long_factors
        expected = model(input_ids=torch.tensor([prompt + [20]])).logits[0, -1]
    torch.testing.assert_close(logits[0], expected, atol=1e-4, rtol=0)


def test_a_dynamic_ntk_model_samples_with_the_frequencies_its_prompt_gets_alone_whatever_ran_before():
    """transformers keeps the dynamic-NTK frequencies of the longest call so far (40 tokens here): an 18-token prompt,
    past the original 16, must still be run with the frequencies its own length gives, as a fresh model does."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                         pad_token_id=0, eos_token_id=1,
                                         rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0})).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0, 0.3)  # sharp distributions, so that a wrong rotation shows
    fresh = copy.deepcopy(model)
    prompt = list(range(3, 21))
    with torch.no_grad():
        model(input_ids=torch.randint(3, 40, (1, 40), generator=torch.Generator().manual_seed(0)))
        expected = fresh(input_ids=torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
    torch.manual_seed(0)
    rollouts = HFSampler(model, eos_token_id=[1], pad_token_id=0).generate([prompt], SamplingParams(max_new_tokens=1))
    torch.testing.assert_close(rollouts.sampler_log_probs[0, 0], expected[rollouts.response_ids[0, 0]], atol=1e-4, rtol=0)


def test_top_k_keeps_every_token_tied_with_the_kth_as_transformers_does():
    """Top-k removes the tokens strictly below the k-th largest score: a tie at the k-th place keeps every tied
    token (transformers' TopKLogitsWarper does the same), never an arbitrary one of them."""
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0], [0.5, 0.5, 0.5, -1.0, 0.5]])
    filtered = process_logits(logits, SamplingParams(top_k=2))
    assert torch.isfinite(filtered).tolist() == [[False, True, True, True, False], [True, True, True, False, True]]
    assert torch.equal(filtered, TopKLogitsWarper(top_k=2)(None, logits.clone()))
    assert torch.equal(filtered[torch.isfinite(filtered)], logits[torch.isfinite(filtered)])


def test_temperature_top_k_and_top_p_apply_together():
    """Probabilities 0.4, 0.3, 0.2, 0.1 at temperature 2 with k = 3: the three largest logits halved, the last
    removed; adding p = 0.5 on what is left (about 0.39, 0.34, 0.27) keeps the first two."""
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    minus_inf = float("-inf")
    expected = torch.tensor([[math.log(0.4) / 2, math.log(0.3) / 2, math.log(0.2) / 2, minus_inf]])
    torch.testing.assert_close(process_logits(logits, SamplingParams(temperature=2.0, top_k=3)), expected)
    expected[0, 2] = minus_inf
    torch.testing.assert_close(process_logits(logits, SamplingParams(temperature=2.0, top_k=3, top_p=0.5)), expected)


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9, 0.97])
def test_top_p_keeps_the_hand_computed_nucleus_of_random_distributions_over_many_tokens(top_p):
    """Rows of 200 random probabilities, many of them close together: the kept tokens are exactly the nucleus
    computed by hand in float64 (the running mass must not be rounded more coarsely than float32)."""
    generator = torch.Generator().manual_seed(int(top_p * 100))
    logits = 3 * torch.randn(6, 200, generator=generator)
    probabilities = logits.double().softmax(-1)
    filtered = process_logits(logits, SamplingParams(top_p=top_p))
    assert torch.isfinite(filtered).tolist() == [_nucleus_reference(row, top_p) for row in probabilities.tolist()]
    assert 6 < int(torch.isfinite(filtered).sum()) < 6 * 200


def test_a_uniform_at_the_top_of_its_range_draws_the_last_token_of_positive_probability():
    """Some generators give a uniform of exactly 1 (curand's range is (0, 1]): the draw must still be the last token
    that has probability, not a trailing -inf token nor an index past the vocabulary."""
    from entrorl.rollout.sampler import sample_from_log_probs

    log_probs = torch.log(torch.tensor([[0.25, 0.75, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0]], dtype=torch.float64))
    assert sample_from_log_probs(log_probs, torch.ones(2, 1, dtype=torch.float64)).tolist() == [1, 2]
    just_below = torch.full((2, 1), 1 - 2.0**-53, dtype=torch.float64)
    assert sample_from_log_probs(log_probs, just_below).tolist() == [1, 2]


def _processed_log_probs_of_the_responses(model, rollouts: Rollouts, params: SamplingParams) -> torch.Tensor:
    """Each response token's log-prob under process_logits(params) of a fresh unpadded forward, row by row."""
    expected = torch.zeros_like(rollouts.sampler_log_probs)
    for row in range(len(rollouts)):
        prompt = rollouts.prompt_ids[row, rollouts.prompt_mask[row]]
        length = int(rollouts.lengths[row])
        ids = torch.cat([prompt, rollouts.response_ids[row, :length]])[None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        log_probs = process_logits(logits, params).log_softmax(-1)
        expected[row, :length] = log_probs.gather(-1, ids[0, len(prompt):, None])[:, 0]
    return expected


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=6, temperature=0.7, top_k=5, top_p=0.8),
                                    SamplingParams(max_new_tokens=6, temperature=0.0, top_k=3),
                                    SamplingParams(max_new_tokens=6, temperature=0.0, top_p=0.3)],
                         ids=["sampled", "greedy-top-k", "greedy-top-p"])
def test_sampler_log_probs_are_those_of_the_filtered_renormalised_distribution(policy, params):
    """With top-k / top-p the kept log-prob is the token's under the distribution the filters leave, renormalised
    (at temperature 0, that of the temperature-1 logits): higher than the unfiltered model's wherever a filter
    removed mass."""
    model, tokenizer = policy
    torch.manual_seed(0)
    rollouts = HFSampler.for_model(model, tokenizer).generate(_prompts(tokenizer) * 2, params)
    mask = rollouts.response_mask
    expected = _processed_log_probs_of_the_responses(model, rollouts, params)
    torch.testing.assert_close(rollouts.sampler_log_probs[mask], expected[mask], atol=2e-5, rtol=1e-5)
    unfiltered = _processed_log_probs_of_the_responses(model, rollouts, SamplingParams(temperature=params.temperature))
    assert bool((rollouts.sampler_log_probs[mask] > unfiltered[mask] + 1e-3).any())


def test_left_padded_prompts_of_a_model_with_learned_positions_start_at_position_zero():
    """GPT-2 looks up a learned embedding per position: through the model's own forward, a left-padded prompt's
    first token is at position 0 and its padding never at a negative one, so each row's log-probs are those of an
    unpadded forward over that row alone."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                        eos_token_id=1, pad_token_id=0)).eval()
    params = SamplingParams(max_new_tokens=5)
    torch.manual_seed(0)
    rollouts = HFSampler(model, eos_token_id=[1], pad_token_id=0).generate([[5, 6, 7, 8, 9, 10], [11, 12], [13]], params)
    assert rollouts.prompt_mask.sum(-1).tolist() == [6, 2, 1]
    mask = rollouts.response_mask
    expected = _processed_log_probs_of_the_responses(model, rollouts, params)
    torch.testing.assert_close(rollouts.sampler_log_probs[mask], expected[mask], atol=2e-5, rtol=1e-5)


def test_greedy_sampling_draws_no_random_numbers(policy):
    """Greedy decoding needs no uniform: the caller's random stream goes on as if it had not run."""
    sampler, _ = _scripted_sampler(policy, finish=[2, 3])
    torch.manual_seed(11)
    expected_next = torch.rand(3)
    torch.manual_seed(11)
    sampler.generate([[5, 6]] * 2, SamplingParams(max_new_tokens=5, temperature=0.0))
    assert torch.equal(torch.rand(3), expected_next)


def test_completion_ids_drop_the_padding_and_summed_sampler_log_probs_add_up_the_valid_tokens():
    rollouts = Rollouts(
        prompt_ids=torch.zeros(3, 1, dtype=torch.long), prompt_mask=torch.ones(3, 1, dtype=torch.bool),
        response_ids=torch.tensor([[5, 6, 2], [7, 0, 0], [0, 0, 0]]),
        response_mask=torch.tensor([[True, True, True], [True, False, False], [False, False, False]]),
        sampler_log_probs=torch.tensor([[-0.5, -1.0, -0.25], [-2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),
        lengths=torch.tensor([3, 1, 0]), truncated=torch.tensor([False, False, False]))
    assert rollouts.completion_ids() == [[5, 6, 2], [7], []]
    assert rollouts.summed_sampler_log_probs() == [-1.75, -2.0, 0.0]


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (5, 1.0), (9, 1.0), (0, 0.9), (5, 0.5)])
def test_leaves_tokens_out_says_whether_process_logits_filters(top_k, top_p):
    from entrorl.rollout.sampler import leaves_tokens_out

    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    filtered = process_logits(logits, SamplingParams(max_new_tokens=1, top_k=top_k, top_p=top_p))
    assert leaves_tokens_out(top_k=top_k, top_p=top_p, vocab_size=5) == bool(torch.isinf(filtered).any())
    assert leaves_tokens_out(top_k=0, top_p=None, min_p=0.05)


def _model_without_logits_to_keep():
    """A tiny Qwen2 whose forward has the signature of model code written before transformers' ``logits_to_keep``
    (many ``trust_remote_code`` models), and the plain model with the same weights."""
    from transformers import Qwen2ForCausalLM

    from entrorl.lab.tiny_model import build_tiny_qwen2

    class OlderForwardForCausalLM(Qwen2ForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                    output_hidden_states=None, return_dict=None):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)

    plain = build_tiny_qwen2(30, hidden_size=32, num_layers=1, seed=0).eval()
    older = OlderForwardForCausalLM(plain.config)
    older.load_state_dict(plain.state_dict())
    return older.eval(), plain


def test_a_model_whose_forward_takes_no_logits_to_keep_samples_and_scores_as_one_that_does():
    """logits_to_keep is passed only to a forward that takes it; otherwise the positions wanted are taken from the whole
    logits: the same tokens, log-probs and token statistics (the model's own logits, not the fused head)."""
    from entrorl.modeling import logits_to_keep

    older, plain = _model_without_logits_to_keep()
    assert logits_to_keep(older, 1) == {} and logits_to_keep(plain, 1) == {"logits_to_keep": 1}
    assert logits_to_keep(torch.compile(plain), 3) == {"logits_to_keep": 3}  # a wrapper passes it on
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    prompts = [[3, 4, 5], [6]]
    sampled = [HFSampler(model, eos_token_id=1, pad_token_id=0, decoder="transformers").generate(prompts, params)
               for model in (older, plain)]
    assert sampled[0].completion_ids() == sampled[1].completion_ids()
    torch.testing.assert_close(sampled[0].sampler_log_probs, sampled[1].sampler_log_probs)
    rollouts = sampled[1]
    stats = [response_token_stats(model, rollouts.prompt_ids, rollouts.prompt_mask, rollouts.response_ids,
                                  rollouts.response_mask, fused_head=False) for model in (older, plain)]
    torch.testing.assert_close(stats[0].logprob, stats[1].logprob)
    torch.testing.assert_close(stats[0].entropy, stats[1].entropy)


@pytest.mark.parametrize("prompts", [["2+3=", "7*8="], "2+3=", {"input_ids": [[3, 4]], "attention_mask": [[1, 1]]}],
                         ids=["texts", "one-text", "tokenizer-output"])
def test_prompts_given_as_text_are_refused_saying_to_tokenize_them(prompts):
    from entrorl.lab.tiny_model import build_tiny_qwen2

    sampler = HFSampler(build_tiny_qwen2(30, hidden_size=32, num_layers=1, seed=0), eos_token_id=1, pad_token_id=0)
    with pytest.raises(TypeError, match=r"takes prompts as token ids, one list per prompt, .*tokenize them first"):
        sampler.generate(prompts, SamplingParams(max_new_tokens=2))
