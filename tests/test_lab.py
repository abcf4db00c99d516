"""The laboratory end to end: the base model is rebuilt identically from its seed; the quick preset runs the
whole matrix and writes a report whose numbers are the ones in the metrics files."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from entrorl.lab import presets as lab_presets_module
from entrorl.lab.base_model import BaseModelSpec, build_base_model
from entrorl.lab.presets import DEFAULT_METHODS, get_preset
from entrorl.lab.runner import run_lab
from entrorl.lab.tiny_model import build_char_tokenizer, build_tiny_qwen2
from entrorl.trainer import read_metrics

REPO = Path(__file__).resolve().parents[1]


def _weights_digest(directory: Path) -> str:
    from safetensors.torch import load_file

    tensors = load_file(directory / "model.safetensors")
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].numpy().tobytes())
    return digest.hexdigest()


def test_base_model_is_rebuilt_identically_from_its_seed(tmp_path):
    spec = BaseModelSpec(problems_per_task=40, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, steps=6, batch_size=8)
    first = build_base_model(spec, cache_dir=tmp_path / "a")
    second = build_base_model(spec, cache_dir=tmp_path / "b")
    assert _weights_digest(first) == _weights_digest(second)
    other = build_base_model(BaseModelSpec(**{**spec.__dict__, "seed": 1}), cache_dir=tmp_path / "a")
    assert _weights_digest(other) != _weights_digest(first)
    info = json.loads((first / "base.json").read_text())
    assert info["key"] == spec.key() and info["spec"]["steps"] == 6
    assert build_base_model(spec, cache_dir=tmp_path / "a") == first  # cached: not retrained


def test_the_share_of_wrong_demonstrations_of_a_base_model_changes_its_trained_weights(tmp_path):
    spec = BaseModelSpec(tasks=("sum_chain",), problems_per_task=8, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                         steps=1, batch_size=4)
    right, wrong = (BaseModelSpec(**{**spec.__dict__, "wrong_fraction": share}) for share in (0.0, 0.75))
    assert _weights_digest(build_base_model(right, cache_dir=tmp_path)) != _weights_digest(build_base_model(wrong, cache_dir=tmp_path))


def test_the_base_model_s_cache_key_covers_every_setting_and_the_data_format(monkeypatch):
    """A change to any setting, or to the data a specification trains on, must not find the old model in the cache."""
    from dataclasses import fields, replace

    from entrorl.lab import base_model

    spec = BaseModelSpec()
    changes = {"tasks": ("sum_chain",), "problems_per_task": 3001, "demos_per_problem": 3, "wrong_fraction": 0.25,
               "hidden_size": 96, "num_layers": 3, "num_heads": 8, "num_kv_heads": 4, "max_position_embeddings": 512,
               "steps": 1501, "batch_size": 32, "lr": 1e-3, "seed": 1, "extra": {"note": 1}}
    assert set(changes) == {item.name for item in fields(BaseModelSpec)}  # a new setting gets a change here too
    keys = {spec.key()} | {replace(spec, **{name: value}).key() for name, value in changes.items()}
    assert len(keys) == len(changes) + 1
    assert BaseModelSpec().key() == spec.key()
    monkeypatch.setattr(base_model, "_FORMAT_VERSION", base_model._FORMAT_VERSION + 1)
    assert spec.key() not in keys


def built_and_locks(cache_lab) -> tuple[list[str], int]:
    """What a lab cache folder holds: its entries other than the builds' lock files, and how many lock files."""
    names = sorted(path.name for path in cache_lab.iterdir())
    return [name for name in names if not name.endswith(".lock")], sum(name.endswith(".lock") for name in names)


def test_two_processes_needing_one_uncached_base_model_train_it_once(tmp_path, monkeypatch):
    """The second waits for the first's build (a lock file in the cache), saying so, then reads the model it built."""
    import threading

    from entrorl.lab import base_model

    started, release, trained = threading.Event(), threading.Event(), []

    def train(spec, directory, progress=None):
        trained.append(directory)
        started.set()
        assert release.wait(30)
        (directory / "weights").write_text("built once")
        return {"key": spec.key()}

    monkeypatch.setattr(base_model, "_train", train)
    spec, results = BaseModelSpec(), []
    first = threading.Thread(target=lambda: results.append(build_base_model(spec, cache_dir=tmp_path)))
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=lambda: results.append(build_base_model(spec, cache_dir=tmp_path)))
    with pytest.MonkeyPatch.context() as waiting:
        said = []
        waiting.setattr(base_model.logger, "warning", lambda message, *args: said.append(message % args))
        second.start()
        for _ in range(300):  # until the second one is waiting for the lock
            if said:
                break
            __import__("time").sleep(0.01)
        release.set()
        first.join(30)
        second.join(30)
    assert len(trained) == 1 and results == [tmp_path / "lab" / f"base-{spec.key()}"] * 2
    assert said == [f"process {__import__('os').getpid()} is building the base model base-{spec.key()}; waiting for it"]
    assert (results[0] / "weights").read_text() == "built once"


def test_a_cached_base_model_is_reused_only_when_complete_and_rebuilt_on_request(tmp_path, monkeypatch):
    from entrorl.lab import base_model

    trained = []

    def train(spec, directory, progress=None):
        trained.append(spec)
        (directory / "weights").write_text(str(len(trained)))
        return {"key": spec.key()}

    monkeypatch.setattr(base_model, "_train", train)
    spec = BaseModelSpec()
    cache = tmp_path / "cache"
    final = cache / "lab" / f"base-{spec.key()}"
    final.mkdir(parents=True)  # left without its base.json: not a finished model
    (final / "partial").write_text("")
    killed_build = cache / "lab" / f".base-{spec.key()}.tmp-{2**22 + 12345}"  # of a build killed on its way
    killed_build.mkdir()
    other_spec = cache / "lab" / f".base-{'0' * 16}.tmp-{2**22 + 12345}"  # another spec's: maybe another machine's
    other_spec.mkdir()
    assert build_base_model(spec, cache_dir=cache) == final and len(trained) == 1
    assert sorted(path.name for path in final.iterdir()) == ["base.json", "weights"]
    assert not killed_build.exists() and other_spec.exists()
    assert build_base_model(spec, cache_dir=cache) == final and len(trained) == 1
    assert build_base_model(spec, cache_dir=cache, rebuild=True) == final and len(trained) == 2
    assert (final / "weights").read_text() == "2" and built_and_locks(cache / "lab") == (sorted([other_spec.name, final.name]), 1)


def test_a_cached_base_model_whose_weights_are_damaged_is_built_again(tmp_path, monkeypatch):
    """A truncated weight file beside a whole base.json (a disk error, a copy cut short) failed the base evaluation
    with 'save the model again', which a laboratory user never did."""
    from entrorl.lab import base_model

    trained = []

    def train(spec, directory, progress=None):
        trained.append(spec)
        build_tiny_qwen2(len(build_char_tokenizer()), hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                         intermediate_size=32).save_pretrained(directory)
        return {"key": spec.key()}

    monkeypatch.setattr(base_model, "_train", train)
    spec, cache, said = BaseModelSpec(), tmp_path / "cache", []
    monkeypatch.setattr(base_model.logger, "warning", lambda message, *args: said.append(message % args))
    final = build_base_model(spec, cache_dir=cache)
    assert base_model.cached_base_model(spec, cache) == final and len(trained) == 1
    weights = final / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert base_model.cached_base_model(spec, cache) is None
    assert said == [f"the cached base model's {weights} cannot be read (damaged or truncated): building it again"]
    assert build_base_model(spec, cache_dir=cache) == final and len(trained) == 2 and len(said) == 2  # once a build
    assert base_model.cached_base_model(spec, cache) == final


def test_a_read_only_cache_that_holds_the_base_model_is_used(tmp_path, monkeypatch):
    """Only a cache that must take a new base model must be writable (a shared, read-only one is read)."""
    from entrorl.lab import runner

    out = _finished_folder(tmp_path, monkeypatch)
    cached = tmp_path / "cache" / "lab" / "base-x"
    cached.mkdir(parents=True)
    monkeypatch.setattr(runner, "cached_base_model", lambda spec, cache_dir=None, say=True: cached)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *args, **kwargs: False if str(path).startswith(
        str(tmp_path / "cache")) and mode & os.W_OK else real_access(path, mode, *args, **kwargs))
    monkeypatch.setattr(runner, "_run_method", _dies_on_clip_cov)  # grpo: found finished
    assert runner.run_lab("quick", methods=["grpo"], out=out, workers=1, cache_dir=tmp_path / "cache") == out
    monkeypatch.setattr(runner, "cached_base_model", lambda spec, cache_dir=None, say=True: None)  # one to build: refused at once
    with pytest.raises(ValueError, match="cannot be written"):
        runner.run_lab("quick", methods=["grpo"], out=out, workers=1, cache_dir=tmp_path / "cache")


def test_the_cache_is_entrorl_cache_or_under_the_home_folder_and_is_made_only_when_asked(tmp_path, monkeypatch):
    import os

    from entrorl.lab.base_model import default_cache_dir, lab_cache_root

    monkeypatch.setenv("ENTRORL_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    assert lab_cache_root(create=False) == tmp_path / "elsewhere" / "lab" and not (tmp_path / "elsewhere").exists()
    assert lab_cache_root() == tmp_path / "elsewhere" / "lab" and (tmp_path / "elsewhere" / "lab").is_dir()
    monkeypatch.delenv("ENTRORL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "entrorl"
    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.W_OK)  # a read-only filesystem
    with pytest.raises(ValueError, match=r"cache .*elsewhere/lab cannot be written .*point ENTRORL_CACHE at a writable folder"):
        lab_cache_root(tmp_path / "elsewhere", create=False)


def test_sft_batches_hold_each_pair_once_per_pass_and_mark_only_the_completion_and_its_eos():
    from entrorl.lab.base_model import sft_batches
    from entrorl.lab.tiny_model import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    pairs = [("1+2=", "3"), ("10+20=", "30"), ("7=", "seven"), ("a", "bc")]
    batches = sft_batches(pairs, tokenizer, batch_size=2, seed=0)
    seen = []
    for _ in range(2):  # one pass over the four pairs
        input_ids, attention, loss_mask = next(batches)
        for ids, attend, mask in zip(input_ids, attention, loss_mask):
            length = int(attend.sum())
            assert attend[:length].all() and (ids[length:] == tokenizer.pad_token_id).all() and not mask[length:].any()
            completion = ids[mask]
            assert completion[-1] == tokenizer.eos_token_id
            prompt_length = length - len(completion)
            assert mask[prompt_length:length].all() and not mask[:prompt_length].any()
            seen.append((tokenizer.decode(ids[:prompt_length]), tokenizer.decode(completion[:-1])))
    assert sorted(seen) == sorted(pairs)

    def first_pass(seed):
        batches = sft_batches(pairs, tokenizer, batch_size=2, seed=seed)
        return [next(batches)[0].tolist() for _ in range(2)]

    assert first_pass(3) == first_pass(3)
    assert len({json.dumps(first_pass(seed)) for seed in range(5)}) > 1  # the seed orders the pairs


def test_sft_batches_from_fewer_pairs_than_a_batch_hold_them_all_and_a_bad_corpus_is_refused():
    """A corpus smaller than one batch (a small ``problems_per_task`` with the default ``batch_size``) gives batches of
    the whole corpus instead of leaving the base model's training waiting forever for its first batch; no pairs, a
    batch size below 1 and a specification that could not train are refused."""
    from entrorl.lab.base_model import BaseModelSpec, sft_batches
    from entrorl.lab.tiny_model import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    batches = sft_batches([("1+2=", "3"), ("2+2=", "4"), ("3+3=", "6")], tokenizer, batch_size=4, seed=0)
    for _ in range(2):
        input_ids, _, _ = next(batches)
        assert sorted(tokenizer.decode(row[:4]) for row in input_ids) == ["1+2=", "2+2=", "3+3="]
    with pytest.raises(ValueError, match="no prompt/completion pairs"):
        next(sft_batches([], tokenizer, batch_size=4, seed=0))
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        next(sft_batches([("1+2=", "3")], tokenizer, batch_size=0, seed=0))
    for bad, message in (({"steps": 0}, "steps must be a positive integer, got 0"),
                         ({"batch_size": 2.5}, "batch_size must be a positive integer, got 2.5"),
                         ({"tasks": ()}, r"tasks must be a list of lab task names \(.*\), got \(\)"),
                         ({"wrong_fraction": 1.5}, r"wrong_fraction must be a number in \[0, 1\], got 1.5"),
                         ({"lr": float("nan")}, "lr must be a finite number >= 0, got nan")):
        with pytest.raises(ValueError, match=message):
            BaseModelSpec(**bad)
    assert BaseModelSpec(steps=np.int64(300), batch_size=np.int32(16)).key() == BaseModelSpec(steps=300, batch_size=16).key()


def test_the_supervised_loss_is_the_mean_negative_log_likelihood_of_the_marked_next_tokens():
    from entrorl.lab.base_model import sft_batches, supervised_loss
    from entrorl.lab.tiny_model import build_char_tokenizer, build_tiny_qwen2

    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(len(tokenizer), hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, seed=0)
    input_ids, attention, loss_mask = next(sft_batches([("1+2=", "3"), ("10+20=", "30 x")], tokenizer, batch_size=2, seed=0))
    expected = []
    with torch.no_grad():
        loss = supervised_loss(model, input_ids, attention, loss_mask)
        for ids, attend, mask in zip(input_ids, attention, loss_mask):
            length = int(attend.sum())
            log_probs = model(input_ids=ids[None, :length]).logits[0].float().log_softmax(-1)
            expected += [-log_probs[position - 1, ids[position]] for position in range(1, length) if mask[position]]
    assert len(expected) == 2 + 5  # "3" and "30 x", each with its EOS
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), abs=1e-5)


def test_a_base_model_has_the_architecture_and_the_initial_weights_its_specification_names(tmp_path):
    """With a learning rate of 0 the trained model is its initialisation: the spec's architecture from the spec's seed."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from entrorl.lab.tiny_model import build_char_tokenizer, build_tiny_qwen2

    spec = BaseModelSpec(tasks=("sum_chain",), problems_per_task=10, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2,
                         max_position_embeddings=48, steps=1, batch_size=4, lr=0.0, seed=3)
    directory = build_base_model(spec, cache_dir=tmp_path)
    tokenizer = build_char_tokenizer()
    config = AutoConfig.from_pretrained(directory)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.max_position_embeddings, config.vocab_size) == (16, 2, 4, 2, 48, len(tokenizer))
    initial = build_tiny_qwen2(len(tokenizer), hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2,
                               max_position_embeddings=48, seed=3).state_dict()
    weights = load_file(directory / "model.safetensors")
    assert weights and all(torch.equal(tensor, initial[name]) for name, tensor in weights.items())
    info = json.loads((directory / "base.json").read_text())
    assert len(info["loss_curve"]) == 1 and info["final_loss"] == info["loss_curve"][0]  # the mean of the steps there are


def test_a_tiny_qwen2_is_seeded_with_tied_embeddings_and_leaves_the_global_random_state_alone():
    from entrorl.lab.tiny_model import build_char_tokenizer, build_tiny_qwen2

    tokenizer = build_char_tokenizer()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    model = build_tiny_qwen2(len(tokenizer), hidden_size=16, num_layers=1, num_heads=4, num_kv_heads=2, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    again = build_tiny_qwen2(len(tokenizer), hidden_size=16, num_layers=1, num_heads=4, num_kv_heads=2, seed=5)
    other = build_tiny_qwen2(len(tokenizer), hidden_size=16, num_layers=1, num_heads=4, num_kv_heads=2, seed=6)
    assert all(torch.equal(tensor, again.state_dict()[name]) for name, tensor in model.state_dict().items())
    assert not torch.equal(model.model.embed_tokens.weight, other.model.embed_tokens.weight)
    config = model.config
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert (config.vocab_size, config.num_attention_heads, config.num_key_value_heads) == (len(tokenizer), 4, 2)
    assert (config.pad_token_id, config.eos_token_id, config.bos_token_id) == (0, 1, 2)


def test_the_character_tokenizer_has_one_token_per_distinct_character_and_decodes_verbatim():
    from entrorl.lab.tiny_model import SPECIAL_TOKENS, build_char_tokenizer

    tokenizer = build_char_tokenizer("ab a")
    assert SPECIAL_TOKENS[:3] == ("<pad>", "<eos>", "<bos>") and len(tokenizer) == len(SPECIAL_TOKENS) + 3
    assert [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id] == [0, 1, 2, 3]
    assert tokenizer("ab ba?")["input_ids"] == [4, 5, 6, 5, 4, 3]  # "?" is not in the alphabet
    tokenizer = build_char_tokenizer()
    text = "1 . 2 , 3 ' s 4 ! x n't"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_a_tiny_qwen2_s_default_architecture_is_64_wide_2_layers_4_heads_2_kv_heads_512_positions_no_dropout():
    from entrorl.lab.tiny_model import build_tiny_qwen2

    config = build_tiny_qwen2(100).config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.max_position_embeddings, config.vocab_size) == (64, 256, 2, 4, 2, 512, 100)
    assert config.attention_dropout == 0.0


def test_the_default_alphabet_gives_printable_ascii_and_the_newline_a_token_each_and_spaces_are_decoded_as_written():
    """100 tokens: the four specials, then one per printable ASCII character (space included) and the newline; a
    multi-line prompt has no unknown token. The tokenizer never cleans up spaces (transformers 4 would drop the one
    before punctuation when asked to)."""
    import string

    from entrorl.lab.tiny_model import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    characters = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    assert len(characters) == 96 and len(tokenizer) == 100
    ids = [tokenizer(character)["input_ids"] for character in characters]
    assert all(len(one) == 1 for one in ids) and sorted(one[0] for one in ids) == list(range(4, 100))
    assert tokenizer.unk_token_id not in tokenizer("line 1\nline 2")["input_ids"]
    assert tokenizer.clean_up_tokenization_spaces is False


def test_a_saved_tiny_model_loads_back_as_built_and_leaves_the_progress_bars_as_they_were(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from entrorl.lab.tiny_model import build_tiny_qwen2, save_tiny_model

    sizes = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}
    enabled = hf_logging.is_progress_bar_enabled()
    try:
        for bars in (False, True):
            (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
            directory = save_tiny_model(tmp_path / f"bars-{bars}", seed=4, **sizes)
            assert hf_logging.is_progress_bar_enabled() == bars
    finally:
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    model, tokenizer = AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    assert (model.config.pad_token_id, model.config.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    built = build_tiny_qwen2(len(tokenizer), seed=4, **sizes).state_dict()
    assert all(torch.equal(tensor, built[name]) for name, tensor in model.state_dict().items())


_COUNT_SETTINGS = ("problems_per_task", "demos_per_problem", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                   "max_position_embeddings", "steps", "batch_size")


@pytest.mark.parametrize("name", _COUNT_SETTINGS)
def test_every_count_of_a_base_model_specification_must_be_a_whole_number_of_at_least_one(name):
    with pytest.raises(ValueError, match=rf"BaseModelSpec\.{name} must be a positive integer, got 0"):
        BaseModelSpec(**{name: 0})
    with pytest.raises(ValueError, match=rf"BaseModelSpec\.{name} must be a positive integer, got 1.5"):
        BaseModelSpec(**{name: 1.5})
    assert getattr(BaseModelSpec(**{name: np.int64(1)}), name) == 1


def test_the_share_of_wrong_demonstrations_may_be_anything_from_0_to_1_inclusive():
    assert BaseModelSpec(wrong_fraction=0.0).wrong_fraction == 0.0
    assert BaseModelSpec(wrong_fraction=1.0).wrong_fraction == 1.0
    for bad in (-0.01, 1.01, float("nan"), True, "0.3"):
        with pytest.raises(ValueError, match=r"wrong_fraction must be a number in \[0, 1\]"):
            BaseModelSpec(wrong_fraction=bad)


def test_the_base_model_s_learning_rate_must_be_finite_and_may_be_zero():
    assert BaseModelSpec(lr=0.0).lr == 0.0
    for bad in (float("inf"), -1e-3, float("nan"), True, "0.003"):
        with pytest.raises(ValueError, match=r"lr must be a finite number >= 0"):
            BaseModelSpec(lr=bad)


def test_the_base_model_s_seed_is_an_integer_and_its_tasks_are_lab_task_names():
    """Refused when the specification is made, before a cache folder is named after it: a seed given as a flag, a
    float or a string; tasks given as one string (it would be read letter by letter) or naming no lab task."""
    assert BaseModelSpec(seed=np.int64(1)).key() == BaseModelSpec(seed=1).key()
    for bad in (1.5, True, "1"):
        with pytest.raises(ValueError, match=r"BaseModelSpec\.seed must be an integer"):
            BaseModelSpec(seed=bad)
    assert BaseModelSpec(tasks=["sum_chain"]).key() == BaseModelSpec(tasks=("sum_chain",)).key()
    for bad in ("sum_chain", (), None):
        with pytest.raises(ValueError, match=r"BaseModelSpec\.tasks must be a list of lab task names \(countdown, "):
            BaseModelSpec(tasks=bad)
    for bad in (("nope",), ("sum_chain", 3)):
        with pytest.raises(ValueError, match=r"unknown lab task"):
            BaseModelSpec(tasks=bad)

def test_the_cache_key_is_16_hex_digits_whatever_the_order_of_the_extra_settings():
    """The key names the cache folder: equal specifications (dicts compare without their order) share one."""
    import re

    first, second = BaseModelSpec(extra={"a": 1, "b": {"x": 1, "y": 2}}), BaseModelSpec(extra={"b": {"y": 2, "x": 1}, "a": 1})
    assert first == second and first.key() == second.key()
    assert re.fullmatch(r"[0-9a-f]{16}", first.key())
    assert first.key() != BaseModelSpec(extra={"a": 1, "b": {"x": 1, "y": 3}}).key()


def test_sft_batches_hold_batch_size_pairs_each_and_shuffle_the_pairs_anew_every_pass():
    """Five pairs in batches of two: every batch holds two pairs, a pass is two batches of four distinct pairs (the
    fifth waits), and the passes do not all repeat the first one's order."""
    from entrorl.lab.base_model import sft_batches
    from entrorl.lab.tiny_model import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    pairs = [(f"{i}+{i}=", str(2 * i)) for i in range(5)]
    batches = sft_batches(pairs, tokenizer, batch_size=2, seed=0)
    passes = []
    for _ in range(8):
        prompts = []
        for _ in range(2):
            input_ids, _, _ = next(batches)
            assert input_ids.shape[0] == 2
            prompts += [tokenizer.decode(row[:4]) for row in input_ids]
        assert len(set(prompts)) == 4
        passes.append(prompts)
    assert len({tuple(p) for p in passes}) > 1
    assert {prompt for p in passes for prompt in p} == {prompt for prompt, _ in pairs}


def test_the_supervised_loss_is_zero_without_marked_tokens_and_taken_in_float32_for_a_bfloat16_model():
    from entrorl.lab.base_model import sft_batches, supervised_loss
    from entrorl.lab.tiny_model import build_char_tokenizer, build_tiny_qwen2

    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(len(tokenizer), hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, seed=0)
    input_ids, attention, loss_mask = next(sft_batches([("1+2=", "3"), ("10+20=", "30 x")], tokenizer, batch_size=2, seed=0))
    with torch.no_grad():
        nothing = supervised_loss(model, input_ids, attention, torch.zeros_like(loss_mask))
        assert nothing.item() == 0.0
        model = model.to(torch.bfloat16)
        loss = supervised_loss(model, input_ids, attention, loss_mask)
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
        nll = -logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]
        expected = nll[loss_mask[:, 1:]].mean()
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_base_model_is_its_seeded_initialisation_after_its_steps_of_adamw_on_its_tasks_corpora(tmp_path):
    """20 steps replayed by hand: the corpus of each task from the seed plus 7919 per task, batches from the seed,
    AdamW without weight decay, gradients clipped to norm 1, the learning rate warmed up over 50 steps and decayed
    linearly to a floor of 10%; progress hears of every step, and base.json records the corpus size, the loss of each
    step (100 points at most) and the mean of the last 50."""
    from safetensors.torch import load_file

    from entrorl.lab.base_model import sft_batches, supervised_loss
    from entrorl.lab.tasks import get_task, sft_corpus
    from entrorl.lab.tiny_model import build_char_tokenizer, build_tiny_qwen2

    spec = BaseModelSpec(tasks=("sum_chain", "rg_arithmetic"), problems_per_task=4, demos_per_problem=2, wrong_fraction=0.5,
                         hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, max_position_embeddings=128, steps=20,
                         batch_size=3, lr=1e-2, seed=2)
    heard = []
    directory = build_base_model(spec, cache_dir=tmp_path, progress=lambda *args: heard.append(args))

    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(len(tokenizer), hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                             max_position_embeddings=128, seed=2)
    pairs = [pair for index, name in enumerate(spec.tasks)
             for pair in sft_corpus(get_task(name), 4, seed=2 + 7919 * index, wrong_fraction=0.5, demos_per_problem=2)]
    batches = sft_batches(pairs, tokenizer, batch_size=3, seed=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for step in range(20):
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 * min(1.0, (step + 1) / 50) * max(0.1, 1.0 - step / 20)
        loss = supervised_loss(model, *next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    expected = model.state_dict()
    weights = load_file(directory / "model.safetensors")
    assert weights and all(torch.allclose(tensor, expected[name], rtol=0, atol=1e-7) for name, tensor in weights.items())
    assert heard == [(step + 1, 20, pytest.approx(loss, rel=1e-5)) for step, loss in enumerate(losses)]
    info = json.loads((directory / "base.json").read_text())
    assert info["corpus_pairs"] == len(pairs) > 3
    assert info["loss_curve"] == pytest.approx(losses, rel=1e-5)
    assert info["final_loss"] == pytest.approx(sum(losses) / 20, rel=1e-5)


def test_a_cache_folder_that_cannot_be_entered_is_refused(tmp_path, monkeypatch):
    """Writing into a folder needs its search (x) permission as well as its write permission."""
    import os

    from entrorl.lab.base_model import lab_cache_root

    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.X_OK)
    with pytest.raises(ValueError, match=r"cache .*/lab cannot be written .*point ENTRORL_CACHE at a writable folder"):
        lab_cache_root(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_a_cache_folder_that_cannot_be_made_is_named_before_a_base_model_is_trained(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    from entrorl.lab import base_model

    def refused(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(base_model, "_train", lambda *args, **kwargs: pytest.fail("trained"))
    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(ValueError, match=r"cache .*/lab cannot be created \(Read-only file system\); point ENTRORL_CACHE"):
        base_model.build_base_model(BaseModelSpec(), cache_dir=tmp_path / "cache")

@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT", "EFBIG"])
def test_a_base_model_that_finds_no_room_in_its_cache_names_the_cache(tmp_path, monkeypatch, code):
    """A full disk, a quota reached and a file too large all say to free space or move ENTRORL_CACHE; nothing is left."""
    import errno

    from entrorl.lab import base_model

    def no_room(spec, directory, progress=None):
        raise OSError(getattr(errno, code), "no room")

    monkeypatch.setattr(base_model, "_train", no_room)
    with pytest.raises(OSError, match=r"the base model cannot be written into the cache .*no room.*ENTRORL_CACHE"):
        base_model.build_base_model(BaseModelSpec(), cache_dir=tmp_path / "cache")
    assert built_and_locks(tmp_path / "cache" / "lab") == ([], 1)


def test_the_character_tokenizer_gives_each_unknown_character_its_own_unk_token():
    from entrorl.lab.tiny_model import build_char_tokenizer

    tokenizer = build_char_tokenizer("ab")
    assert tokenizer("a??b\t")["input_ids"] == [4, 3, 3, 5, 3]


def test_a_tiny_qwen2_s_feed_forward_is_four_times_its_hidden_size_unless_given():
    from entrorl.lab.tiny_model import build_tiny_qwen2

    sizes = {"num_layers": 1, "num_heads": 2, "num_kv_heads": 1}
    assert build_tiny_qwen2(20, hidden_size=16, **sizes).config.intermediate_size == 64
    model = build_tiny_qwen2(20, hidden_size=16, intermediate_size=24, **sizes)
    assert model.config.intermediate_size == 24 and model.model.layers[0].mlp.up_proj.weight.shape == (24, 16)


def test_a_tiny_model_is_saved_without_progress_bars(tmp_path):
    """save_quietly turns transformers' progress bars off while the model and the tokenizer are written."""
    from transformers.utils import logging as hf_logging

    from entrorl.lab.tiny_model import save_quietly

    seen = []

    class Recording:
        def save_pretrained(self, directory):
            seen.append(hf_logging.is_progress_bar_enabled())

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        save_quietly(Recording(), Recording(), tmp_path)
        assert seen == [False, False] and hf_logging.is_progress_bar_enabled()
    finally:
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()

def test_presets_cover_the_issue_matrix():
    default = get_preset("default")
    for method in ("grpo", "dapo", "clip_cov", "kl_cov", "forking_tokens", "clip_b", "clip_v", "nsr", "w_reinforce",
                   "entropy_advantage", "adaptive_entropy", "sft", "rft"):
        assert method in default.methods
    assert default.methods == DEFAULT_METHODS and default.train_task != default.forgetting_task
    assert default.eval_n >= 64
    with pytest.raises(ValueError, match="unknown lab preset"):
        get_preset("huge")
    from entrorl.lab.presets import PRESETS
    from entrorl.lab.runner import _checked_workers

    for preset in PRESETS.values():  # each runs as it is: its methods and its number of workers pass the checks
        preset.check_methods()
        assert _checked_workers(None, preset) == _checked_workers(preset.workers, preset) == preset.workers


def test_a_preset_refuses_an_unknown_setting_and_an_rl_seed_outside_numpy_s_seed_range():
    from pydantic import ValidationError

    from entrorl.lab.presets import LabPreset

    assert LabPreset(name="mine").rl_seed is None and LabPreset(name="mine", rl_seed=2**32 - 1).rl_seed == 2**32 - 1
    for rl_seed in (-1, 2**32):
        with pytest.raises(ValidationError, match="rl_seed"):
            LabPreset(name="mine", rl_seed=rl_seed)
    with pytest.raises(ValidationError, match="stepz"):
        LabPreset(name="mine", stepz=3)


def test_the_presets_train_two_methods_at_a_time_and_quick_is_the_default_matrix_at_a_smaller_scale():
    """The README's promises: two processes at a time, the law fitted on the first 20% of steps, Pass@k up to 64 and
    the 170 steps of the front-page run; quick runs the same methods, tasks and fit fraction, with fewer steps."""
    default, quick = get_preset("default"), get_preset("quick")
    assert default.workers == quick.workers == 2
    assert default.law_fit_fraction == quick.law_fit_fraction == 0.2
    assert (default.steps, default.eval_n) == (170, 64)
    assert (default.train_task, default.forgetting_task) == ("sum_chain", "rg_arithmetic")
    assert quick.methods == default.methods == DEFAULT_METHODS
    assert (quick.train_task, quick.forgetting_task) == (default.train_task, default.forgetting_task)
    assert quick.steps < default.steps and quick.base.steps < default.base.steps

@pytest.mark.parametrize(("name", "expected"), [
    ("default", {"steps": 170, "prompts_per_step": 8, "group_size": 8, "max_new_tokens": 40, "temperature": 1.0, "lr": 2e-4,
                 "warmup_steps": 10, "mini_batches": 2, "checkpoint_every": 20, "eval_n": 64, "forgetting_n": 8,
                 "top_forks": 20, "train_problems": 2000, "eval_problems": 40, "forgetting_problems": 40}),
    ("quick", {"steps": 12, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 32, "temperature": 1.0, "lr": 2e-4,
               "warmup_steps": 2, "mini_batches": 2, "checkpoint_every": 6, "eval_n": 16, "forgetting_n": 4,
               "top_forks": 10, "train_problems": 400, "eval_problems": 12, "forgetting_problems": 12}),
])
def test_each_preset_trains_and_evaluates_with_its_published_budget(name, expected):
    """The front page's numbers are a default run's, reproduced to every printed digit only under the same budget;
    quick saves a checkpoint half-way, so that an interrupted quick run resumes from there."""
    preset = get_preset(name)
    assert {key: getattr(preset, key) for key in expected} == expected


@pytest.mark.slow
def test_rl_seed_changes_only_the_training_seed(tmp_path):
    from entrorl.lab.runner import _prepare_data, _trainer_config

    preset = get_preset("quick")
    reseeded = preset.model_copy(update={"rl_seed": 5})
    data = _prepare_data(tmp_path / "lab", preset)
    same = _trainer_config(preset, "grpo", tmp_path / "model", data, tmp_path / "runs" / "grpo")
    other = _trainer_config(reseeded, "grpo", tmp_path / "model", data, tmp_path / "runs" / "grpo")
    assert (same["seed"], other["seed"]) == (preset.seed, 5)
    assert {k: v for k, v in same.items() if k != "seed"} == {k: v for k, v in other.items() if k != "seed"}
    assert reseeded.base == preset.base  # the same cached base model


def test_resuming_with_other_settings_is_refused(tmp_path):
    from entrorl.lab.runner import _check_same_preset, run_lab

    out = tmp_path / "lab"
    out.mkdir()
    preset = get_preset("quick")
    (out / "lab.json").write_text(json.dumps({"preset": preset.model_dump(mode="json")}))
    with pytest.raises(ValueError, match=r"rl_seed: 0 \(without --rl-seed: the preset's seed\) there, 3 now.*same options"):
        run_lab("quick", out=out, rl_seed=3)
    reseeded = {"preset": preset.model_copy(update={"rl_seed": 3}).model_dump(mode="json")}
    with pytest.raises(ValueError, match=r"rl_seed: 3 there, 0 \(without --rl-seed: the preset's seed\) now"):
        _check_same_preset(out, preset, reseeded)  # resumed without the --rl-seed it was started with
    # no rl_seed trains with seed (0 here): --rl-seed 0 runs the same training, and is accepted
    _check_same_preset(out, preset.model_copy(update={"rl_seed": 0}), {"preset": preset.model_dump(mode="json")})
    changed = preset.model_copy(update={"steps": preset.steps + 1}).model_dump(mode="json")
    (out / "lab.json").write_text(json.dumps({"preset": changed}))
    with pytest.raises(ValueError, match=rf"steps: {preset.steps + 1} there, {preset.steps} now"):
        run_lab("quick", out=out, methods=["grpo"])


def test_quick_lab_end_to_end(tmp_path):
    out = tmp_path / "lab"
    env_cache = tmp_path / "cache"
    result = subprocess.run(
        [sys.executable, "-m", "entrorl.cli", "lab", "--preset", "quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900, env={**__import__("os").environ, "ENTRORL_CACHE": str(env_cache)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    preset = get_preset("quick")
    for method in preset.methods:
        run = out / "methods" / method
        assert (run / "final_eval.json").is_file(), (method, (run / "error.log").read_text() if (run / "error.log").exists() else "")
        assert [r["step"] for r in read_metrics(run)] == list(range(1, preset.steps + 1))
    for name in ("report.md", "report.html", "report.json"):
        assert (out / name).is_file()
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "grpo" in markdown and "<img" in html
    # every number of the summary table is the one computed from the run's own files
    for method in preset.methods:
        final = json.loads((out / "methods" / method / "final_eval.json").read_text())
        (row,) = [r for r in report["summary"]["values"] if r["method"] == method]
        assert row["Pass@1"] == pytest.approx(final["pass_at_k"]["1"])
        assert row[f"Pass@{preset.eval_n}"] == pytest.approx(final["pass_at_k"][str(preset.eval_n)])
        (shown,) = [r for r in report["summary"]["rows"] if r["method"] == method]
        assert f"| {shown['Pass@1']} |" in markdown and shown["Pass@1"] in html
    assert report["section_errors"] in ({}, [], None)

    # re-running on the same directory resumes: nothing is retrained
    again = subprocess.run(
        [sys.executable, "-m", "entrorl.cli", "lab", "--preset", "quick", "--out", str(out), "--methods", "grpo"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "ENTRORL_CACHE": str(env_cache)},
    )
    assert again.returncode == 0 and "cached" in again.stderr
    # ... and the report still covers every method, with a wall clock that counts the invocation that trained
    from entrorl.lab.report import WALL_CLOCK_LABEL

    report = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in report["summary"]["rows"]] == ["base", *preset.methods]
    assert report["reproduce"]["command"] == "entrorl lab --preset quick"
    items = {row["item"]: row["value"] for row in report["reproduce"]["machine"]["rows"]}
    assert float(items[WALL_CLOCK_LABEL]) > 0 and items["invocations counted / in all"] == "1 / 2"


def test_an_unusable_out_is_refused_before_anything_is_built(tmp_path):
    from entrorl.lab.runner import run_lab

    a_file = tmp_path / "f"
    a_file.write_text("")
    cache = tmp_path / "cache"
    elsewhere = tmp_path / "project"  # `--out .` in a project, or `--out "$UNSET"`: not a laboratory folder
    (elsewhere / "src").mkdir(parents=True)
    (elsewhere / "README.md").write_text("")
    for out, fragment in ((a_file / "x", f"{a_file} is a file, not a directory"), (a_file, "is an existing file"),
                          (Path("/proc/entrorl-lab-test"), "cannot be used as a run directory"),
                          (elsewhere, r"holds other files \(README.md, src\) and no laboratory run")):
        with pytest.raises(ValueError, match=fragment):
            run_lab("quick", methods=["grpo"], out=out, cache_dir=cache)
    assert not cache.exists()
    # a laboratory folder interrupted before its lab.json was written is still one
    from entrorl.lab.runner import _prepare_run_directory

    (tmp_path / "early" / "data").mkdir(parents=True)
    _prepare_run_directory(tmp_path / "early")


def test_a_resumed_method_counts_the_train_time_of_its_interrupted_and_failed_invocations(tmp_path, monkeypatch):
    """A method interrupted after 3.5 s and finished by the next invocation in 2 s reports 5.5 s of train time, not
    the last invocation's 2 s."""
    from types import SimpleNamespace

    from entrorl.lab import runner
    from entrorl.trainer import TrainingInterrupted

    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr(runner, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    monkeypatch.setattr(runner, "_pay_one_off_costs", lambda job: None)
    run_dir = tmp_path / "grpo"
    run_dir.mkdir()

    def interrupted(job):
        clock.now += 3.5
        raise TrainingInterrupted(2, 4, run_dir / "checkpoints" / "step_000004")

    def finished(job):
        clock.now += 2.0
        return {"pass_at_k": {"1": 0.5}}

    monkeypatch.setattr(runner, "_train_and_evaluate", interrupted)
    assert runner._run_method({"method": "grpo", "run_dir": str(run_dir)})["status"] == "interrupted"
    monkeypatch.setattr(runner, "_train_and_evaluate", finished)
    assert runner._run_method({"method": "grpo", "run_dir": str(run_dir)})["status"] == "done"
    assert json.loads((run_dir / "final_eval.json").read_text())["train_seconds"] == pytest.approx(5.5)
    # its final_eval.json cut short: evaluated again (1 s), adding to the 5.5 s of the invocations that trained it
    (run_dir / "final_eval.json").write_text('{"pass_at_k": {"1": 0.')

    def evaluated_again(job):
        clock.now += 1.0
        return {"pass_at_k": {"1": 0.5}}

    monkeypatch.setattr(runner, "_train_and_evaluate", evaluated_again)
    assert runner._run_method({"method": "grpo", "run_dir": str(run_dir)})["status"] == "done"
    assert json.loads((run_dir / "final_eval.json").read_text())["train_seconds"] == pytest.approx(6.5)

    # interrupted twice (3.5 s, then 3.5 s more), then finished in 2 s: 9 s; an earlier failure's error.log is gone
    (run_dir / "final_eval.json").unlink()
    (run_dir / runner._EARLIER_SECONDS).unlink()
    monkeypatch.setattr(runner, "_train_and_evaluate", interrupted)
    for _ in range(2):
        assert runner._run_method({"method": "grpo", "run_dir": str(run_dir)})["status"] == "interrupted"
    (run_dir / "error.log").write_text("ValueError: an earlier invocation's failure\n")
    monkeypatch.setattr(runner, "_train_and_evaluate", finished)
    assert runner._run_method({"method": "grpo", "run_dir": str(run_dir)})["status"] == "done"
    assert json.loads((run_dir / "final_eval.json").read_text())["train_seconds"] == pytest.approx(9.0)
    assert not (run_dir / "error.log").exists()

    # failed after training 4 s (its steps saved), then finished in 2 s: 6 s
    (run_dir / "final_eval.json").unlink()
    (run_dir / runner._EARLIER_SECONDS).unlink()

    def failed(job):
        clock.now += 4.0
        raise RuntimeError("an illegal memory access")

    monkeypatch.setattr(runner, "_train_and_evaluate", failed)
    assert runner._run_method({"method": "grpo", "run_dir": str(run_dir)})["status"] == "failed"
    monkeypatch.setattr(runner, "_train_and_evaluate", finished)
    assert runner._run_method({"method": "grpo", "run_dir": str(run_dir)})["status"] == "done"
    assert json.loads((run_dir / "final_eval.json").read_text())["train_seconds"] == pytest.approx(6.0)


def test_a_method_that_raises_fails_with_its_traceback_in_its_error_log(tmp_path, monkeypatch):
    from entrorl.lab import runner

    monkeypatch.setattr(runner, "_process_warmed_up", True)

    def broken(job):
        raise ValueError("the reward cannot be imported")

    monkeypatch.setattr(runner, "_train_and_evaluate", broken)
    run_dir = tmp_path / "methods" / "grpo"  # not made yet: the error still lands in it
    outcome = runner._run_method({"method": "grpo", "run_dir": str(run_dir)})
    assert outcome["method"] == "grpo" and outcome["status"] == "failed"
    assert "ValueError: the reward cannot be imported" in outcome["error"]
    logged = (run_dir / "error.log").read_text()
    assert logged.startswith("Traceback") and "ValueError: the reward cannot be imported" in logged
    assert not (run_dir / "final_eval.json").exists()


@pytest.mark.parametrize("recorded", ["NaN", "Infinity", "-3.0", '"3.5"', "null"])
def test_earlier_train_seconds_that_are_not_a_finite_non_negative_number_count_as_none(tmp_path, monkeypatch, recorded):
    from types import SimpleNamespace

    from entrorl.lab import runner

    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr(runner, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    monkeypatch.setattr(runner, "_process_warmed_up", True)
    run_dir = tmp_path / "grpo"
    run_dir.mkdir()
    (run_dir / runner._EARLIER_SECONDS).write_text(f'{{"seconds": {recorded}}}')

    def finished(job):
        clock.now += 2.0
        return {"pass_at_k": {"1": 0.5}}

    monkeypatch.setattr(runner, "_train_and_evaluate", finished)
    assert runner._run_method({"method": "grpo", "run_dir": str(run_dir)})["status"] == "done"
    assert json.loads((run_dir / "final_eval.json").read_text())["train_seconds"] == 2.0


@pytest.fixture
def signal_handlers_restored():
    """For a test that runs a worker's code in the test process, which leaves Ctrl-C ignored, as a worker does."""
    import signal

    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    yield
    for number, handler in before.items():
        signal.signal(number, handler)


def test_an_interrupted_laboratory_saves_what_it_trained_and_says_how_to_go_on(tmp_path, monkeypatch, signal_handlers_restored):
    """Ctrl-C: a method being trained returns 'interrupted' once its trainer has saved the step, one not started
    yet does not start; the command prints what was kept and the command that continues, and exits 130."""
    from typer.testing import CliRunner

    from entrorl.cli import app
    from entrorl.lab import runner
    from entrorl.trainer import TrainingInterrupted

    class Stop:
        def __init__(self):
            self.set_ = False

        def is_set(self):
            return self.set_

    stop = Stop()
    monkeypatch.setattr(runner, "_STOP", stop)
    monkeypatch.setattr(runner, "_pay_one_off_costs", lambda job: None)

    def interrupted(job):
        raise TrainingInterrupted(2, 4, tmp_path / "grpo" / "checkpoints" / "step_000004")

    monkeypatch.setattr(runner, "_train_and_evaluate", interrupted)
    (tmp_path / "grpo").mkdir()
    assert runner._run_method({"method": "grpo", "run_dir": str(tmp_path / "grpo")}) == {
        "method": "grpo", "status": "interrupted", "step": 4}
    assert not (tmp_path / "grpo" / "error.log").exists()  # an interruption is not a failure
    stop.set_ = True
    monkeypatch.setattr(runner, "_train_and_evaluate", lambda job: pytest.fail("a method started after Ctrl-C"))
    assert runner._run_method({"method": "nsr", "run_dir": str(tmp_path / "nsr")})["status"] == "interrupted"
    # Ctrl-C while the worker warms up (it ignores Ctrl-C then): the method does not start either
    stop.set_ = False
    monkeypatch.setattr(runner, "_process_warmed_up", False)
    monkeypatch.setattr(runner, "_pay_one_off_costs", lambda job: setattr(stop, "set_", True))
    assert runner._run_method({"method": "nsr", "run_dir": str(tmp_path / "nsr")})["status"] == "interrupted"
    assert runner._process_warmed_up

    # a worker leaves a method with its Ctrl-C ignored and SIGTERM handled as outside training (a first one is the
    # laboratory's stop, ignored; once stop is set it ends the worker), whatever the trainer left installed (its "exit at
    # once" handlers once a signal's step is saved)
    import signal

    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    stop.set_ = False

    def trained_with_a_signal(job):
        signal.signal(signal.SIGTERM, lambda *args: None)
        return {"pass_at_k": {"1": 0.5}}

    monkeypatch.setattr(runner, "_train_and_evaluate", trained_with_a_signal)
    (tmp_path / "rft").mkdir()
    try:
        assert runner._run_method({"method": "rft", "run_dir": str(tmp_path / "rft")})["status"] == "done"
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is runner._terminated_outside_training
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)

    def run_lab(preset, *, out, **options):
        raise runner.LabInterrupted(out, ["grpo", "nsr"])

    monkeypatch.setattr(runner, "run_lab", run_lab)
    result = CliRunner().invoke(app, ["lab", "--preset", "quick", "--methods", "grpo,nsr", "--out", str(tmp_path / "lab")])
    output = " ".join(result.output.split())
    assert result.exit_code == 130, result.output
    assert "interrupted (grpo, nsr not finished)" in output
    assert f"Continue with: entrorl lab --preset quick --methods grpo,nsr --out {tmp_path / 'lab'}" in output
    monkeypatch.setattr(runner, "run_lab", lambda preset, *, out, **options: (_ for _ in ()).throw(
        runner.LabInterrupted(out, [])))
    result = CliRunner().invoke(app, ["lab", "--preset", "quick", "--methods", "grpo", "--out", str(tmp_path / "lab")])
    assert result.exit_code == 130 and "after every method had finished, before the report was written" in " ".join(
        result.output.split())

    def stopped_at_once(preset, *, out, **options):  # a second Ctrl-C: the folder records what was left
        out.mkdir(parents=True, exist_ok=True)
        (out / "lab.json").write_text(json.dumps({"methods": ["grpo", "nsr"]}))
        (out / "outcomes.json").write_text(json.dumps({"grpo": {"status": "interrupted"}, "nsr": {"status": "done"}}))
        raise runner.StoppedAtOnce(signal.SIGINT)

    monkeypatch.setattr(runner, "run_lab", stopped_at_once)
    result = CliRunner().invoke(app, ["lab", "--preset", "quick", "--methods", "grpo,nsr", "--out", str(tmp_path / "lab")])
    assert result.exit_code == 130 and "interrupted (grpo not finished)" in " ".join(result.output.split())
    # the command that continues repeats the workers and the seed of the training runs, which the results depend on
    result = CliRunner().invoke(app, ["lab", "--preset", "quick", "--methods", "grpo", "--methods", "nsr", "--out",
                                      str(tmp_path / "lab"), "--workers", "3", "--rl-seed", "2"])
    assert result.exit_code == 130 and (f"Continue with: entrorl lab --preset quick --methods grpo,nsr --out "
                                        f"{tmp_path / 'lab'} --workers 3 --rl-seed 2") in " ".join(result.output.split())
    # `--methods ""` names no method: refused, rather than running the whole matrix
    result = CliRunner().invoke(app, ["lab", "--preset", "quick", "--methods", " , ", "--out", str(tmp_path / "lab")])
    assert result.exit_code == 2 and "--methods names no method" in result.output, result.output


def test_method_names_are_stripped_deduplicated_and_checked(tmp_path, monkeypatch):
    from entrorl.lab import runner
    from entrorl.lab.presets import lab_method_names
    from entrorl.lab.runner import _requested_methods, run_lab

    monkeypatch.setattr(runner, "build_base_model", lambda *args, **kwargs: pytest.fail("a base model was built"))

    assert _requested_methods(["grpo", " clip_b ", "grpo", "", "clip_b"]) == ["grpo", "clip_b"]
    assert _requested_methods("grpo, clip_b,grpo") == ["grpo", "clip_b"]
    assert _requested_methods(None) is None  # the preset's matrix
    for nothing in ([" ", ""], [], ""):  # as `--methods ""`: refused, rather than running the whole matrix
        with pytest.raises(ValueError, match="names no method"):
            _requested_methods(nothing)
    with pytest.raises(ValueError, match="unknown method 'nope'") as error:
        run_lab("quick", methods=["grpo", "nope"], out=tmp_path / "lab", cache_dir=tmp_path / "cache")
    assert set(DEFAULT_METHODS) <= set(lab_method_names())
    for name in lab_method_names():
        assert f" {name}," in str(error.value) or str(error.value).endswith(f" {name}")
    with pytest.raises(ValueError, match="unknown method 'nope'"):  # one method asked for is the matrix too
        run_lab("quick", methods="nope", out=tmp_path / "lab", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="unknown method 'grpoo'; did you mean 'grpo'\\? the laboratory runs"):
        run_lab("quick", methods="grpoo", out=tmp_path / "lab", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "lab").exists() and not (tmp_path / "cache").exists()


def test_compositions_of_methods_are_laboratory_methods():
    """The lab runs what build_objective builds (dapo+clip_b); a composition it refuses is refused with its reason."""
    preset = get_preset("quick")
    preset.model_copy(update={"methods": ["grpo", "dapo+clip_b+forking_tokens"]}).check_methods()
    with pytest.raises(ValueError, match=r"method 'dapo\+cispo': 'cispo' adds nothing after 'dapo'"):
        preset.model_copy(update={"methods": ["dapo+cispo"]}).check_methods()
    with pytest.raises(ValueError, match=r"method 'grpo\+nope': .*nope"):
        preset.model_copy(update={"methods": ["grpo+nope"]}).check_methods()
    with pytest.raises(ValueError, match=r"method 'sft\+clip_b': sft, the supervised baseline, .* cannot be composed"):
        preset.model_copy(update={"methods": ["sft+clip_b"]}).check_methods()
    for composed in ("clip_b+sft", "dapo+sft+clip_b"):  # wherever sft stands in the composition
        with pytest.raises(ValueError, match=r"sft, the supervised baseline, .* cannot be composed"):
            preset.model_copy(update={"methods": [composed]}).check_methods()
    with pytest.raises(ValueError, match=r"^method 'grpo\+grpo' names 'grpo' more than once"):  # not a run of its own
        preset.model_copy(update={"methods": ["grpo+grpo"]}).check_methods()
    from entrorl.lab.runner import _requested_methods

    assert _requested_methods(["dapo + clip_b", "dapo+clip_b"]) == ["dapo+clip_b"]  # one name, one run folder
    for malformed in ("dapo+clip_b+", "+dapo", "dapo++clip_b"):
        with pytest.raises(ValueError, match="empty part"):
            _requested_methods([malformed])
    for malformed in ("dapo + clip_b", "dapo+clip_b+", "+dapo", "dapo++clip_b"):
        with pytest.raises(ValueError, match="without spaces or empty parts"):
            preset.model_copy(update={"methods": [malformed]}).check_methods()


@pytest.mark.parametrize("workers", [0, -1])
def test_workers_below_one_are_refused(tmp_path, workers):
    from entrorl.lab.runner import run_lab

    with pytest.raises(ValueError, match="--workers must be a whole number of at least 1"):
        run_lab("quick", methods=["grpo"], workers=workers, out=tmp_path / "lab", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "lab").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("rl_seed", [-1, 2**32, 10**400, 1.5, True, float("inf"), float("nan"), "7"])
def test_an_rl_seed_out_of_numpy_s_range_is_refused_before_anything_is_built(tmp_path, monkeypatch, rl_seed):
    """Infinity, NaN and an int beyond a float's range too, with the same message (not int()'s or math.isfinite's own
    OverflowError or ValueError)."""
    from entrorl.lab import runner

    monkeypatch.setattr(runner, "build_base_model", lambda *args, **kwargs: pytest.fail("a base model was built"))
    with pytest.raises(ValueError, match=r"--rl-seed must be a whole number from 0 to 2\*\*32 - 1"):
        runner.run_lab("quick", methods=["grpo"], rl_seed=rl_seed, out=tmp_path / "lab", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "lab").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("rl_seed", [0, 2**32 - 1, 7.0])
def test_an_rl_seed_within_numpy_s_range_is_taken_as_a_whole_number(tmp_path, rl_seed):
    """Accepted, it reaches the check of the folder's settings (which then refuses the folder's other rl_seed)."""
    from entrorl.lab.runner import run_lab

    out = tmp_path / "lab"
    out.mkdir()
    (out / "lab.json").write_text(json.dumps({"preset": get_preset("quick").model_copy(update={"rl_seed": 1}).model_dump(mode="json")}))
    with pytest.raises(ValueError, match=rf"\(rl_seed: 1 there, {int(rl_seed)} now\)"):
        run_lab("quick", methods=["grpo"], rl_seed=rl_seed, out=out, cache_dir=tmp_path / "cache")


def test_a_cache_that_cannot_be_written_is_named_before_the_run_directory_is_made(tmp_path):
    from entrorl.lab.runner import run_lab

    a_file = tmp_path / "cache-file"
    a_file.write_text("")
    with pytest.raises(ValueError, match=r"the laboratory's cache .*cache-file/lab cannot be created: .*cache-file is a "
                                          r"file; point ENTRORL_CACHE at a writable folder"):
        run_lab("quick", methods=["grpo"], out=tmp_path / "lab", cache_dir=a_file)
    assert not (tmp_path / "lab").exists()


def test_the_cli_exits_1_when_a_method_failed_after_writing_the_report(tmp_path, monkeypatch):
    """The report is written either way; a script running the laboratory sees from the status that it is not whole."""
    from typer.testing import CliRunner

    from entrorl.cli import app
    from entrorl.lab import runner

    out = tmp_path / "lab"

    def fake_run_lab(preset, *, out, outcomes, **kwargs):
        out.mkdir(exist_ok=True)
        (out / "outcomes.json").write_text(json.dumps(outcomes))
        return out

    for outcomes, status in (({"grpo": {"status": "done"}, "nsr": {"status": "failed", "error": "boom"}}, 1),
                             ({"grpo": {"status": "done"}, "nsr": {"status": "cached"}}, 0)):
        monkeypatch.setattr(runner, "run_lab", lambda preset, outcomes=outcomes, **kwargs: fake_run_lab(preset, outcomes=outcomes, **kwargs))
        result = CliRunner().invoke(app, ["lab", "--preset", "quick", "--out", str(out)])
        assert result.exit_code == status, result.output
        # the report's paths whole on one line, however narrow the console (a CI log, a captured stderr)
        assert f"report: {out / 'report.html'}  ({out / 'report.md'})" in result.output.splitlines()
        if status:
            assert "1 method(s) failed and are left out of the report's comparisons: nsr" in " ".join(result.output.split())


def test_a_preset_mismatch_names_the_settings_not_their_values(tmp_path):
    from entrorl.lab.runner import run_lab

    out = tmp_path / "lab"
    out.mkdir()
    (out / "lab.json").write_text(json.dumps({"preset": get_preset("quick").model_dump(mode="json")}))
    with pytest.raises(ValueError) as error:
        run_lab("default", out=out, cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert "this folder was started with preset quick, now default" in message
    assert "base.steps" in message and "same options or choose another --out" in message
    assert "{" not in message and len(message) < 400, message
    changed = get_preset("quick").model_copy(update={"base": get_preset("default").base}).model_dump(mode="json")
    (out / "lab.json").write_text(json.dumps({"preset": changed}))
    with pytest.raises(ValueError, match=r"other settings \(base\.batch_size: 64 there, 32 now; .*base\.steps: 1200 there, 400 now\); resume") as error:
        run_lab("quick", out=out, cache_dir=tmp_path / "cache")
    assert "{" not in str(error.value)


def test_the_worker_warm_up_is_paid_once_and_not_timed(tmp_path, monkeypatch):
    import time

    from entrorl.lab import runner

    warm_ups = []
    monkeypatch.setattr(runner, "_process_warmed_up", False)
    monkeypatch.setattr(runner, "_pay_one_off_costs", lambda job: (warm_ups.append(job["method"]), time.sleep(0.5)))
    monkeypatch.setattr(runner, "_train_and_evaluate", lambda job: {"pass_at_k": {"1": 0.5}})
    for method in ("grpo", "clip_b"):
        job = {"method": method, "run_dir": str(tmp_path / method)}
        (tmp_path / method).mkdir()
        assert runner._run_method(job)["status"] == "done"
        assert json.loads((tmp_path / method / "final_eval.json").read_text())["train_seconds"] < 0.25
    assert warm_ups == ["grpo"]


def test_a_final_evaluation_that_cannot_be_read_is_done_again(tmp_path, monkeypatch):
    from entrorl.lab import runner

    monkeypatch.setattr(runner, "_process_warmed_up", True)
    monkeypatch.setattr(runner, "_train_and_evaluate", lambda job: {"pass_at_k": {"1": 0.5}})
    job = {"method": "grpo", "run_dir": str(tmp_path / "grpo")}
    (tmp_path / "grpo").mkdir()
    final = tmp_path / "grpo" / "final_eval.json"
    final.write_text('{"pass_at_k": {"1": 0.')  # cut short
    assert runner._run_method(job)["status"] == "done"
    assert json.loads(final.read_text())["pass_at_k"] == {"1": 0.5}
    assert runner._run_method(job)["status"] == "cached"


def test_the_warm_up_runs_on_a_real_model(tmp_path, tiny_model_dir):
    from entrorl.lab.runner import _pay_one_off_costs, _prepare_data

    preset = get_preset("quick").model_copy(update={"train_problems": 4, "eval_problems": 2, "forgetting_problems": 2})
    data = _prepare_data(tmp_path / "lab", preset)
    job = {"preset": preset.model_dump(mode="json"), "model_dir": str(tiny_model_dir), "data": {k: str(v) for k, v in data.items()}}
    _pay_one_off_costs(job)  # raises if the warm-up is broken (run_lab swallows its errors)
    assert sorted(p.name for p in (tmp_path / "lab").iterdir()) == ["data"]


def test_a_resumed_subset_keeps_every_method_of_the_folder(tmp_path, monkeypatch):
    """Re-running one method on a finished folder: nothing is retrained, lab.json and the report keep every method."""
    from test_lab_report import build_run

    from entrorl.lab import runner

    out = build_run(tmp_path / "lab", methods=("grpo", "clip_cov", "nsr"), failed=())
    preset = get_preset("quick").model_copy(update={"methods": ["grpo", "clip_cov", "nsr"]})
    lab = json.loads((out / "lab.json").read_text())
    lab["preset"] = preset.model_dump(mode="json")
    (out / "lab.json").write_text(json.dumps(lab))
    model_dir = tmp_path / "base-model"
    monkeypatch.setattr(runner, "build_base_model", lambda spec, cache_dir=None, progress=None: model_dir)
    monkeypatch.setattr(runner, "_prepare_data", lambda out, preset: {k: out / "data" / f"{k}.jsonl" for k in ("train", "eval", "forget")})
    runner.run_lab("quick", methods=["grpo", " grpo"], out=out, workers=1)
    recorded = json.loads((out / "lab.json").read_text())
    assert recorded["methods"] == recorded["preset"]["methods"] == ["grpo", "clip_cov", "nsr"]
    (invocation,) = recorded["invocations"]
    assert invocation["methods"] == ["grpo"] and invocation["ran"] == [] and invocation["seconds"] >= 0
    assert invocation["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()
    report = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in report["summary"]["rows"]] == ["base", "grpo", "clip_cov", "nsr"]
    # an invocation that trained nothing says nothing of how the folder was trained: no --workers 1
    assert report["reproduce"]["command"] == "entrorl lab --preset quick --methods grpo,clip_cov,nsr"
    (workers,) = [row for row in report["reproduce"]["machine"]["rows"] if row["item"] == "workers"]
    assert workers["value"] == "n/a"
    # one that trained (here: evaluated the base model) with other workers than the preset's does
    recorded["invocations"][0]["base_evaluated"] = True
    (out / "lab.json").write_text(json.dumps(recorded))
    from entrorl.lab.report import write_report

    write_report(out)
    report = json.loads((out / "report.json").read_text())
    assert report["reproduce"]["command"].endswith("--workers 1")


def _dies_on_clip_cov(job):
    """A worker's method for the pool tests (imported by the spawned worker): clip_cov's worker is killed outright,
    as the out-of-memory killer would; the others are found finished."""
    import os
    import signal

    if job["method"] == "clip_cov":
        os.kill(os.getpid(), signal.SIGKILL)
    if job["method"] == "nsr":  # killed after its final evaluation was written: it is done
        (Path(job["run_dir"]) / "final_eval.json").write_text(json.dumps({"pass_at_k": {"1": 0.5}}))
        os.kill(os.getpid(), signal.SIGKILL)
    return {"method": job["method"], "status": "cached"}


def _interrupted_by_its_own_signal(job):
    """A worker's method stopped by a SIGINT of its own (sent to the group while the laboratory ignores it, as a
    script's background job does); a method started after it finds the laboratory stopped."""
    import time

    from entrorl.lab import runner

    if job["method"] == "grpo":
        return {"method": "grpo", "status": "interrupted", "step": 3}
    time.sleep(2)  # the laboratory sees grpo's outcome meanwhile
    return {"method": job["method"], "status": "interrupted" if runner._STOP.is_set() else "done"}


def _finished_folder(tmp_path, monkeypatch):
    from test_lab_report import build_run

    from entrorl.lab import runner

    out = build_run(tmp_path / "lab", methods=("grpo", "clip_cov", "nsr"), failed=())
    lab = json.loads((out / "lab.json").read_text())
    lab["preset"] = get_preset("quick").model_copy(update={"methods": ["grpo", "clip_cov", "nsr"]}).model_dump(mode="json")
    (out / "lab.json").write_text(json.dumps(lab))
    monkeypatch.setattr(runner, "build_base_model", lambda spec, cache_dir=None, progress=None: tmp_path / "base-model")
    monkeypatch.setattr(runner, "_prepare_data", lambda out, preset: {k: out / "data" / f"{k}.jsonl" for k in ("train", "eval", "forget")})
    return out


def test_a_killed_worker_fails_its_method_only(tmp_path, monkeypatch):
    """A worker killed by a signal (multiprocessing.Pool waited for its task for ever): its method fails, with the
    signal in its error.log and the report, and the next method runs in a new worker."""
    from entrorl.lab import runner

    out = _finished_folder(tmp_path, monkeypatch)
    (out / "methods" / "nsr" / "metrics.jsonl").unlink()  # never started: no step logged
    (out / "methods" / "clip_cov" / "final_eval.json").unlink()  # not finished
    (out / "methods" / "nsr" / "final_eval.json").unlink()
    (out / "methods" / "clip_cov" / "error.log").write_text("ValueError: an earlier invocation's error\n")
    monkeypatch.setattr(runner, "_run_method", _dies_on_clip_cov)
    started = __import__("time").monotonic()
    runner.run_lab("quick", methods=["grpo", "clip_cov", "nsr"], out=out, workers=1)
    assert __import__("time").monotonic() - started < 120
    assert runner.failed_methods(out) == ["clip_cov"]
    error = (out / "methods" / "clip_cov" / "error.log").read_text()  # this death, not the earlier error
    assert error.startswith("its worker process was killed by SIGKILL (the system's out-of-memory killer sends it")
    report = json.loads((out / "report.json").read_text())
    assert report["methods"]["clip_cov"]["status"] == "failed" and report["methods"]["nsr"]["status"] == "ok"


@pytest.mark.parametrize("status", ["interrupted", "failed"])
def test_a_method_finished_after_its_outcome_was_recorded_is_neither_interrupted_nor_failed(tmp_path, monkeypatch,
                                                                                            status):
    """An invocation stopped or failed clip_cov (outcomes.json says so); the next one finished it (its worker wrote
    final_eval.json) and was killed before recording the outcome. The report shows clip_cov as ok, and the command
    said it was interrupted or failed, "left out of the report's comparisons", and exited 1."""
    from entrorl.lab import runner

    out = _finished_folder(tmp_path, monkeypatch)
    (out / "outcomes.json").write_text(json.dumps({"clip_cov": {"method": "clip_cov", "status": status, "error": "x"}}))
    assert runner.interrupted_methods(out) == [] and runner.failed_methods(out) == []
    (out / "methods" / "clip_cov" / "final_eval.json").write_text('{"pass_at')  # cut short: not finished
    assert (runner.interrupted_methods(out), runner.failed_methods(out)) == (
        (["clip_cov"], []) if status == "interrupted" else ([], ["clip_cov"]))


def test_the_workers_recorded_and_reported_are_the_processes_that_ran(tmp_path, monkeypatch):
    """--workers 7 for two methods runs two processes; lab.json and the report's machine table and command said 7."""
    from entrorl.lab import runner

    out = _finished_folder(tmp_path, monkeypatch)
    used = []

    def run_jobs(jobs, workers, outcomes, *args):
        used.append(workers)
        outcomes.update({job["method"]: {"method": job["method"], "status": "cached"} for job in jobs})

    monkeypatch.setattr(runner, "_run_jobs", run_jobs)
    runner.run_lab("quick", methods=["grpo", "clip_cov"], out=out, workers=7)
    recorded = json.loads((out / "lab.json").read_text())
    recorded["invocations"][0]["base_evaluated"] = True  # an invocation that trained: the report shows its workers
    (out / "lab.json").write_text(json.dumps(recorded))
    from entrorl.lab.report import write_report

    report = write_report(out, figures=False)
    (workers,) = [row for row in report["reproduce"]["machine"]["rows"] if row["item"] == "workers"]
    assert used == [2] and recorded["workers"] == recorded["invocations"][0]["workers"] == 2
    assert workers["value"] == "2" and "--workers" not in report["reproduce"]["command"]  # 2 is the preset's own


def test_a_method_s_error_log_planted_as_a_link_is_replaced_not_written_through(tmp_path):
    """A received laboratory folder whose methods/grpo/error.log links to a file of this user's: a method whose worker
    never ran (none could be started) had its error written through the link."""
    from unittest import mock

    from entrorl.lab import runner

    mine = tmp_path / "mine"
    mine.write_text("my file\n")
    out = tmp_path / "lab"
    (out / "methods" / "grpo").mkdir(parents=True)
    (out / "methods" / "grpo" / "error.log").symlink_to(mine)
    runner._record_outcome({"method": "grpo", "status": "failed", "died": True, "error": "no worker process"}, {},
                           mock.MagicMock(), {"grpo": 0}, out, 4, 1)
    assert mine.read_text() == "my file\n"
    assert (out / "methods" / "grpo" / "error.log").read_text() == "no worker process\n"


def test_no_worker_process_can_be_started(tmp_path, monkeypatch):
    """A process that cannot be made (out of memory, a process limit) fails the method it was for; the run goes on
    and writes its report."""
    from entrorl.lab import runner

    out = _finished_folder(tmp_path, monkeypatch)
    for method in ("grpo", "nsr"):
        (out / "methods" / method / "final_eval.json").unlink()

    def no_process(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(runner, "_Worker", no_process)
    runner.run_lab("quick", methods=["grpo", "clip_cov", "nsr"], out=out, workers=2)
    assert runner.failed_methods(out) == ["grpo", "nsr"]  # clip_cov had finished before: its evaluation stands
    assert (out / "methods" / "nsr" / "error.log").read_text() == (
        "no worker process could be started for it: [Errno 12] Cannot allocate memory\n")
    assert (out / "report.md").exists()


def _waits_for_ctrl_c(job):
    """A worker's method that signals it has started, then trains until the laboratory stops."""
    import time

    from entrorl.lab import runner

    (Path(job["run_dir"]) / "started").write_text("")
    deadline = time.monotonic() + 60
    while not runner._STOP.is_set():
        if time.monotonic() > deadline:  # the Ctrl-C never reached the laboratory
            return {"method": job["method"], "status": "done"}
        time.sleep(0.05)
    return {"method": job["method"], "status": "interrupted", "step": 2}


def _signal_once_started(started: Path, *signals: int, pause: float = 1.0) -> None:
    """From another thread: once ``started`` exists (a method began), send this process each of ``signals``, ``pause``
    seconds apart (the laboratory's loop sees one before the next)."""
    import os
    import threading
    import time

    def send():
        while not started.exists():
            time.sleep(0.05)
        for position, number in enumerate(signals):
            if position:
                time.sleep(pause)
            os.kill(os.getpid(), number)

    threading.Thread(target=send, daemon=True).start()


def test_one_ctrl_c_keeps_every_outcome_and_starts_nothing_more(tmp_path, monkeypatch, signal_handlers_restored):
    """Ctrl-C is counted, not raised wherever it lands (it could lose an outcome received but not yet recorded): the
    method being trained saves its step, the queued one does not start, and the laboratory reports both."""
    import signal

    from entrorl.lab import runner

    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job ignores it)
    out = _finished_folder(tmp_path, monkeypatch)
    for method in ("grpo", "clip_cov"):
        (out / "methods" / method / "final_eval.json").unlink()
    monkeypatch.setattr(runner, "_run_method", _waits_for_ctrl_c)

    _signal_once_started(out / "methods" / "grpo" / "started", signal.SIGINT)
    with pytest.raises(runner.LabInterrupted) as interrupted:
        runner.run_lab("quick", methods=["grpo", "clip_cov"], out=out, workers=1)
    assert sorted(interrupted.value.methods) == ["clip_cov", "grpo"]
    assert not (out / "methods" / "clip_cov" / "started").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    recorded = json.loads((out / "lab.json").read_text())["invocations"][-1]
    assert recorded["ran"] == ["grpo"]


def test_sigterm_stops_the_laboratory_as_ctrl_c_does_and_the_command_exits_143(tmp_path, monkeypatch,
                                                                                signal_handlers_restored):
    """A job scheduler's SIGTERM: the method being trained saves its step, the queued one does not start, the
    laboratory says what it kept and how to go on, and exits with 128 + SIGTERM (not killed mid-write, silent)."""
    import signal

    from typer.testing import CliRunner

    from entrorl.cli import app
    from entrorl.lab import runner

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    out = _finished_folder(tmp_path, monkeypatch)
    for method in ("grpo", "clip_cov"):
        (out / "methods" / method / "final_eval.json").unlink()
    monkeypatch.setattr(runner, "_run_method", _waits_for_ctrl_c)

    _signal_once_started(out / "methods" / "grpo" / "started", signal.SIGTERM)
    result = CliRunner().invoke(app, ["lab", "--preset", "quick", "--methods", "grpo,clip_cov", "--out", str(out),
                                      "--workers", "1"])
    output = " ".join(result.output.split())
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    assert "SIGTERM: each method being trained finishes its step and saves it" in output
    assert "grpo: interrupted, saved at step 2" in output and "clip_cov: interrupted before it started" in output
    assert "not finished): finished methods and each method's last checkpoint are kept" in output
    assert "Continue with: entrorl lab --preset quick --methods grpo,clip_cov" in output
    assert not (out / "methods" / "clip_cov" / "started").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back


def _over_its_cpu_time_outside_training(stop, reached) -> None:
    """A worker, past its start, that reaches its own soft CPU-time limit while not training (warming up,
    evaluating): SIGXCPU, then its repeat a CPU second later, as the kernel sends them."""
    import os
    import signal
    import time

    from entrorl.lab import runner

    runner._init_worker(stop)
    for _ in range(2):
        os.kill(os.getpid(), signal.SIGXCPU)
        time.sleep(0.1)  # the handler runs at the next instruction of the main thread
    reached.value = runner._cpu_time_limit_reached
    outcome = runner._run_method({"method": "grpo", "run_dir": "unused"})
    reached.value = reached.value and outcome == {"method": "grpo", "status": "interrupted", "signal": "SIGXCPU"}


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGXCPU"), reason="no CPU-time limit signal on this system")
def test_a_worker_reaching_its_cpu_time_limit_outside_training_is_not_killed_and_starts_no_method():
    """Each process has its own CPU clock: a worker reaching its limit outside training died of SIGXCPU's default
    action (a core dump), its method counted as failed. It notes the limit: its method stops (here: does not start),
    interrupted by SIGXCPU."""
    import ctypes
    import multiprocessing
    import signal

    from entrorl.lab.runner import _StopRequest

    context = multiprocessing.get_context("spawn")
    reached = context.RawValue(ctypes.c_bool, False)
    process = context.Process(target=_over_its_cpu_time_outside_training, args=(_StopRequest(context), reached))
    process.start()
    process.join(120)
    assert process.exitcode == 0, f"exit {process.exitcode} (-{signal.SIGXCPU}: killed by SIGXCPU)"
    assert reached.value


def _stopped_by_its_cpu_time_limit(job):
    from entrorl.lab import runner

    (Path(job["run_dir"]) / "started").write_text("")
    if job["method"] == "grpo":
        return {"method": "grpo", "status": "interrupted", "step": 2, "signal": "SIGXCPU"}
    return {"method": job["method"], "status": "interrupted" if runner._STOP.is_set() else "done"}


def test_a_worker_s_cpu_time_limit_stops_the_laboratory_with_exit_152(tmp_path, monkeypatch):
    """A worker stopped by its CPU-time limit (its step saved): the laboratory stops as for a method stopped by a
    signal, says it was the CPU-time limit, and exits 128 + SIGXCPU (it said 'a method was stopped by a signal' and
    exited 130, as for Ctrl-C)."""
    import signal

    from typer.testing import CliRunner

    from entrorl.cli import app
    from entrorl.lab import runner

    out = _finished_folder(tmp_path, monkeypatch)
    for method in ("grpo", "clip_cov"):
        (out / "methods" / method / "final_eval.json").unlink()
    monkeypatch.setattr(runner, "_run_method", _stopped_by_its_cpu_time_limit)
    result = CliRunner().invoke(app, ["lab", "--preset", "quick", "--methods", "grpo,clip_cov", "--out", str(out),
                                      "--workers", "1"])
    output = " ".join(result.output.split())
    assert result.exit_code == 128 + getattr(signal, "SIGXCPU", 24), result.output
    assert "a worker reached its CPU-time limit (SIGXCPU): the others finish their step" in output
    assert "grpo: interrupted, saved at step 2" in output and "clip_cov: interrupted before it started" in output
    assert "interrupted by SIGXCPU (the CPU-time limit is reached) (clip_cov, grpo not finished)" in output or \
        "interrupted by SIGXCPU (the CPU-time limit is reached) (grpo, clip_cov not finished)" in output, output
    assert not (out / "methods" / "clip_cov" / "started").exists()


def test_a_second_laboratory_in_a_folder_in_use_is_refused_naming_the_first_one_s_process(tmp_path, monkeypatch):
    """Two laboratories on one --out would overwrite each other's record and outcomes: the second is refused before
    anything is built, naming the process of the first (which holds the folder's lock), and the first's files stay."""
    import subprocess
    import sys

    from entrorl.lab import runner

    out = _finished_folder(tmp_path, monkeypatch)
    before = (out / "lab.json").read_text()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"handle = open({str(out / '.lock')!r}, 'a+')\n"
        "fcntl.flock(handle, fcntl.LOCK_EX); handle.seek(0); handle.truncate(); handle.write('4242\\n'); handle.flush()\n"
        "print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(runner, "build_base_model", lambda *args, **kwargs: pytest.fail("built"))
        with pytest.raises(ValueError, match=rf"--out {out} is in use by another run \(process 4242\); wait for it to "
                                             r"end, or choose another --out$"):
            runner.run_lab("quick", methods=["grpo"], out=out, workers=1)
    finally:
        holder.kill()
        holder.wait()
    assert (out / "lab.json").read_text() == before
    # a laboratory of this process (another thread of a notebook) is named as such, in the laboratory's words
    from entrorl.trainer.checkpoint import lock_run_directory

    held = lock_run_directory(out, options="--out", user="laboratory")
    try:
        with pytest.raises(ValueError, match=rf"--out {out} is in use by another laboratory of this process; let it "
                                             r"finish first, or choose another --out$"):
            runner.run_lab("quick", methods=["grpo"], out=out, workers=1)
    finally:
        held.close()


def test_the_laboratory_gives_the_caller_its_torch_threads_back(tmp_path, monkeypatch):
    """run_lab trains with one torch thread in its own process; a notebook that called it keeps its own number
    after it, whether it returned or raised."""
    import torch

    from entrorl.lab import runner

    out = _finished_folder(tmp_path, monkeypatch)
    seen = []

    def fails_while_building(spec, cache_dir=None, progress=None):
        seen.append(torch.get_num_threads())
        raise RuntimeError("no room for the base model")

    monkeypatch.setattr(runner, "build_base_model", fails_while_building)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with pytest.raises(RuntimeError, match="no room"):
            runner.run_lab("quick", methods=["grpo"], out=out, workers=1)
        assert seen == [1] and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name, said", [("SIGTERM", "interrupted by SIGTERM:"),
                                        ("SIGXCPU", "interrupted by SIGXCPU (the CPU-time limit is reached):")])
def test_sigterm_or_a_cpu_time_limit_while_the_base_model_is_built_is_said_and_exits_128_plus_its_number(
        tmp_path, monkeypatch, name, said):
    """SIGTERM or SIGXCPU (a soft CPU-time limit, whose default is a core dump) outside the methods' runs (the base
    model's training, minutes on first use): the laboratory says it was interrupted, by what and how to go on, and
    exits 143 / 152, as within a method, not killed without a word. SIGTERM's handler is put back; SIGXCPU, once
    the limit is reached, stays ignored (the kernel repeats it every CPU second)."""
    import os
    import signal

    from typer.testing import CliRunner

    from entrorl.cli import app
    from entrorl.lab import runner

    number = getattr(signal, name, None)
    if number is None:
        pytest.skip(f"no {name} on this system")
    signal.signal(number, signal.SIG_DFL)
    out = _finished_folder(tmp_path, monkeypatch)

    def terminated_while_building(spec, cache_dir=None, progress=None):
        os.kill(os.getpid(), number)
        __import__("time").sleep(30)  # the signal lands here
        raise AssertionError(f"{name} did not stop the laboratory")

    monkeypatch.setattr(runner, "build_base_model", terminated_while_building)
    result = CliRunner().invoke(app, ["lab", "--preset", "quick", "--methods", "grpo", "--out", str(out)])
    assert result.exit_code == 128 + number, result.output
    output = " ".join(result.output.split())
    assert said in output and "Continue with: entrorl lab --preset quick --methods grpo" in output, output
    assert signal.getsignal(number) is (signal.SIG_DFL if name == "SIGTERM" else signal.SIG_IGN)


def _trains_on_regardless(job):
    """A worker's method that signals it has started, then trains on whatever the laboratory asks."""
    import time

    (Path(job["run_dir"]) / "started").write_text("")
    time.sleep(60)
    return {"method": job["method"], "status": "done"}


def test_a_second_sigterm_stops_the_laboratory_at_once_and_exits_143(tmp_path, monkeypatch, signal_handlers_restored):
    """Two SIGTERMs (a scheduler that does not wait): the workers are ended at once, and the exit status is still
    SIGTERM's, 128 + 15."""
    import signal
    import time

    from typer.testing import CliRunner

    from entrorl.cli import app
    from entrorl.lab import runner

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    out = _finished_folder(tmp_path, monkeypatch)
    (out / "methods" / "grpo" / "final_eval.json").unlink()
    monkeypatch.setattr(runner, "_run_method", _trains_on_regardless)

    _signal_once_started(out / "methods" / "grpo" / "started", signal.SIGTERM, signal.SIGTERM)
    started = time.monotonic()
    result = CliRunner().invoke(app, ["lab", "--preset", "quick", "--methods", "grpo", "--out", str(out),
                                      "--workers", "1"])
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    assert time.monotonic() - started < 30  # not the method's 60 s: its worker was ended
    assert "Continue with: entrorl lab --preset quick --methods grpo" in " ".join(result.output.split())
    # the method ended at once is recorded as interrupted, for the next invocation that leaves it out to say so
    assert json.loads((out / "outcomes.json").read_text())["grpo"]["status"] == "interrupted"
    assert runner.interrupted_methods(out) == ["grpo"]


def test_a_method_without_an_outcome_or_a_final_evaluation_was_interrupted(tmp_path, monkeypatch):
    """The laboratory killed (kill -9) while a method trained records no outcome: the method is still unfinished."""
    from entrorl.lab import runner

    out = _finished_folder(tmp_path, monkeypatch)
    (out / "outcomes.json").unlink(missing_ok=True)
    assert runner.interrupted_methods(out) == []  # finished, every one
    (out / "methods" / "clip_cov" / "final_eval.json").unlink()
    assert runner.interrupted_methods(out) == ["clip_cov"]
    (out / "outcomes.json").write_text(json.dumps({"clip_cov": {"method": "clip_cov", "status": "failed", "error": "x"}}))
    assert runner.interrupted_methods(out) == [] and runner.failed_methods(out) == ["clip_cov"]


def test_a_method_stopped_by_a_signal_of_its_own_is_not_reported_as_finished(tmp_path, monkeypatch):
    """A worker that stopped its method (its step saved) by a signal this process did not get: the laboratory stops
    as after Ctrl-C (the next method does not train) and writes no report."""
    from entrorl.lab import runner

    out = _finished_folder(tmp_path, monkeypatch)
    monkeypatch.setattr(runner, "_run_method", _interrupted_by_its_own_signal)
    with pytest.raises(runner.LabInterrupted) as interrupted:
        runner.run_lab("quick", methods=["grpo", "clip_cov"], out=out, workers=1)
    assert interrupted.value.methods == ["grpo", "clip_cov"]
    assert not (out / "report.md").exists()


def _finishes_grpo_then_is_interrupted(job):
    """grpo trains to the end; the next method is stopped by a signal of its own after saving step 2."""
    if job["method"] == "grpo":
        return {"method": "grpo", "status": "done"}
    return {"method": job["method"], "status": "interrupted", "step": 2}


def test_an_interrupted_laboratory_records_the_outcomes_it_has(tmp_path, monkeypatch):
    """Methods that failed before and were retried by an invocation that was then interrupted are no longer listed as
    failed: one finished since, the other was interrupted (not failed) on its way."""
    from entrorl.lab import runner

    out = _finished_folder(tmp_path, monkeypatch)
    for method in ("grpo", "clip_cov"):
        (out / "methods" / method / "final_eval.json").unlink()
    (out / "outcomes.json").write_text(json.dumps({m: {"method": m, "status": "failed", "error": "ValueError: before"}
                                                   for m in ("grpo", "clip_cov")}))
    monkeypatch.setattr(runner, "_run_method", _finishes_grpo_then_is_interrupted)
    with pytest.raises(runner.LabInterrupted):
        runner.run_lab("quick", methods=["grpo", "clip_cov"], out=out, workers=1)
    assert runner.failed_methods(out) == []
    outcomes = json.loads((out / "outcomes.json").read_text())
    assert outcomes["grpo"]["status"] == "done" and outcomes["clip_cov"] == {"method": "clip_cov", "status": "interrupted", "step": 2}


def test_a_method_interrupted_earlier_and_not_continued_makes_the_command_exit_1_with_the_way_on(
        tmp_path, monkeypatch):
    """A method interrupted by an earlier invocation and left out of this one's --methods is missing from the report's
    comparisons, as a failed one is: the command writes the report, then exits 1 naming it and the command that
    continues it (with this invocation's --rl-seed, which the folder requires)."""
    from typer.testing import CliRunner

    from entrorl.cli import app
    from entrorl.lab import runner

    out = _finished_folder(tmp_path, monkeypatch)
    (out / "methods" / "clip_cov" / "final_eval.json").unlink()
    (out / "outcomes.json").write_text(json.dumps({"clip_cov": {"method": "clip_cov", "status": "interrupted", "step": 2}}))
    monkeypatch.setattr(runner, "_run_method", _finishes_grpo_then_is_interrupted)
    result = CliRunner().invoke(app, ["lab", "--preset", "quick", "--methods", "grpo", "--out", str(out)])
    said = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert (out / "report.md").is_file()
    assert ("1 method(s) of " in said and "were interrupted earlier and are left out of the report's comparisons: "
            "clip_cov; continue them with entrorl lab --preset quick --methods clip_cov --out" in said)
    assert runner.interrupted_methods(out) == ["clip_cov"] and runner.failed_methods(out) == []
    # beside a method that failed, both are said
    outcomes = json.loads((out / "outcomes.json").read_text())
    (out / "outcomes.json").write_text(json.dumps({**outcomes, "nsr": {"method": "nsr", "status": "failed",
                                                                        "error": "ValueError: boom"}}))
    (out / "methods" / "nsr" / "final_eval.json").unlink()
    result = CliRunner().invoke(app, ["lab", "--preset", "quick", "--methods", "grpo", "--out", str(out)])
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "1 method(s) failed and are left out of the report's comparisons: nsr" in said
    assert "interrupted earlier and are left out of the report's comparisons: clip_cov; continue them with" in said


def test_the_s_and_d_histograms_count_every_token_in_their_end_bins():
    """Values beyond +-0.4 (and 0.4 itself, which float32 rounds above the float64 edge) land in the end bins."""
    from entrorl.lab.runner import _histogram

    counts = _histogram(torch.tensor([1.0, -1.0, 0.4, -0.4, 0.1, 0.0], dtype=torch.float32))
    assert sum(counts) == 6 and counts[0] == 2 and counts[-1] == 2
    # 40 bins of width 0.02 from -0.4: -0.11 lies in bin 14, 0.11 in bin 25
    counts = _histogram(torch.tensor([0.11, -0.11], dtype=torch.float64))
    assert len(counts) == 40 and counts[14] == counts[25] == 1 and sum(counts) == 2


def test_a_full_disk_is_one_line_that_says_how_to_go_on(tmp_path, monkeypatch):
    """The laboratory's own record or report cannot be written (a full disk): one line naming the file, what is
    kept, and the command that continues; exit 1. A base model that cannot be cached names the cache."""
    import errno

    from safetensors import SafetensorError
    from typer.testing import CliRunner

    from entrorl.cli import app
    from entrorl.lab import base_model, runner

    out = tmp_path / "lab"

    def full_disk(preset, *, out, **options):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "report.html"))

    monkeypatch.setattr(runner, "run_lab", full_disk)
    result = CliRunner().invoke(app, ["lab", "--preset", "quick", "--methods", "grpo", "--out", str(out)])
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert (f"error: [Errno 28] No space left on device: '{out / 'report.html'}'; finished methods and each method's "
            f"last checkpoint are kept in {out}: once the cause is fixed, continue with entrorl lab --preset quick "
            f"--methods grpo --out {out}") in output

    def no_room(spec, directory, progress=None):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(base_model, "_train", no_room)
    with pytest.raises(OSError, match=r"the base model cannot be written into the cache .*StorageFull.*ENTRORL_CACHE"):
        base_model.build_base_model(BaseModelSpec(), cache_dir=tmp_path / "cache", rebuild=True)
    assert built_and_locks(tmp_path / "cache" / "lab") == ([], 1)  # nothing half-built is left

    def no_space(spec, directory, progress=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(base_model, "_train", no_space)
    with pytest.raises(OSError, match=r"the base model cannot be written into the cache .*No space left.*ENTRORL_CACHE"):
        base_model.build_base_model(BaseModelSpec(), cache_dir=tmp_path / "cache", rebuild=True)

    def refused(spec, directory, progress=None):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(base_model, "_train", refused)  # not a lack of room: raised as it is
    with pytest.raises(PermissionError, match=r"^\[Errno 13\] Permission denied$"):
        base_model.build_base_model(BaseModelSpec(), cache_dir=tmp_path / "cache", rebuild=True)


def test_setting_differences_are_named_by_their_dotted_keys_also_when_one_side_lacks_them():
    from entrorl.lab.runner import _setting_differences

    recorded = {"steps": 1, "base": {"steps": 2, "lr": 0.1}, "dropped": 5, "methods": ["grpo"]}
    current = {"steps": 1, "base": {"steps": 3, "lr": 0.1}, "added": 6, "methods": ["grpo"]}
    assert _setting_differences(recorded, current) == [("added", None, 6), ("base.steps", 2, 3), ("dropped", 5, None)]
    assert _setting_differences(current, current) == []


def test_a_setting_value_is_shown_in_at_most_forty_characters():
    from entrorl.lab.runner import _short_repr

    assert _short_repr("x" * 38) == repr("x" * 38)  # 40 characters: shown whole
    assert _short_repr("x" * 39) == "'" + "x" * 38 + "…"  # 41: cut to 39 and an ellipsis
    assert len(_short_repr(list(range(100)))) == 40 and _short_repr(None) == "None"


def test_a_record_that_is_missing_unreadable_or_not_an_object_reads_as_empty(tmp_path):
    from entrorl.lab.runner import _read_json_object, failed_methods

    path = tmp_path / "outcomes.json"
    assert _read_json_object(path) == {} and failed_methods(tmp_path) == []
    for text in ("[1, 2]", '"failed"', "null", '{"grpo": ', ""):
        path.write_text(text)
        assert _read_json_object(path) == {}
    outcomes = {"grpo": {"status": "failed", "error": "boom"}, "nsr": {"status": "interrupted", "step": 2},
                "clip_b": {"status": "cached"}, "dapo": {"status": "done"}, "odd": "failed", "rft": {"status": "failed"}}
    path.write_text(json.dumps(outcomes))
    assert _read_json_object(path) == outcomes
    assert failed_methods(tmp_path) == ["grpo", "rft"]


_SIX_CHANGES = {"steps": 13, "lr": 1.0, "warmup_steps": 9, "mini_batches": 7, "checkpoint_every": 5, "eval_n": 3}


@pytest.mark.parametrize(("changes", "same_name", "expected"), [
    ({"steps": 13}, False, "started with preset default, now quick (1 other setting differs: steps);"),
    (_SIX_CHANGES, False, "now quick (6 other settings differ: checkpoint_every, eval_n, lr, mini_batches, steps, "
                          "warmup_steps);"),
    ({**_SIX_CHANGES, "top_forks": 2}, False, "now quick (7 other settings differ: checkpoint_every, eval_n, lr, "
                                              "mini_batches, steps, top_forks and 1 more);"),
    (_SIX_CHANGES, True, "(checkpoint_every: 5 there, {checkpoint_every} now; eval_n: 3 there, {eval_n} now; lr: 1.0 "
                         "there, {lr} now; mini_batches: 7 there, {mini_batches} now; steps: 13 there, {steps} now; "
                         "warmup_steps: 9 there, {warmup_steps} now);"),
    ({**_SIX_CHANGES, "top_forks": 2}, True, "(checkpoint_every: 5 there, {checkpoint_every} now; eval_n: 3 there, "
                                             "{eval_n} now; lr: 1.0 there, {lr} now; mini_batches: 7 there, "
                                             "{mini_batches} now; steps: 13 there, {steps} now; top_forks: 2 there, "
                                             "{top_forks} now; and 1 more);"),
], ids=["other preset, 1 setting", "other preset, 6 settings", "other preset, 7 settings", "same preset, 6 settings",
        "same preset, 7 settings"])
def test_a_preset_mismatch_names_at_most_six_settings(tmp_path, changes, same_name, expected):
    from entrorl.lab.runner import _check_same_preset

    quick = get_preset("quick")
    recorded = quick.model_copy(update={**changes, **({} if same_name else {"name": "default"})}).model_dump(mode="json")
    with pytest.raises(ValueError) as error:
        _check_same_preset(tmp_path, quick, {"preset": recorded})
    assert expected.format(**quick.model_dump()) in str(error.value), str(error.value)


def test_a_folder_is_resumed_with_other_methods_or_without_a_recorded_preset(tmp_path):
    from entrorl.lab.runner import _check_same_preset

    quick = get_preset("quick")
    others = quick.model_copy(update={"methods": ["grpo", "nsr"]}).model_dump(mode="json")
    for record in ({"preset": others}, {}, {"preset": "quick"}, {"preset": None}):
        _check_same_preset(tmp_path, quick, record)


def test_the_number_of_workers_is_the_preset_s_or_a_whole_number_of_at_least_one():
    import numpy as np

    from entrorl.lab.runner import _checked_workers

    preset = get_preset("quick").model_copy(update={"workers": 3})
    assert _checked_workers(None, preset) == 3 and _checked_workers(1, preset) == 1
    counted = _checked_workers(np.int64(4), preset)
    assert counted == 4 and type(counted) is int  # written to lab.json: a Python int
    for wrong in (0, -2, True, 2.0, "2", np.int64(0)):
        with pytest.raises(ValueError, match="--workers must be a whole number of at least 1"):
            _checked_workers(wrong, preset)


def test_a_run_directory_may_hold_hidden_files_and_is_left_as_it_was_found(tmp_path):
    from entrorl.lab.runner import _prepare_run_directory

    hidden = tmp_path / "hidden"
    (hidden / ".git").mkdir(parents=True)
    (hidden / ".notes").write_text("")
    _prepare_run_directory(hidden)
    assert sorted(entry.name for entry in hidden.iterdir()) == [".git", ".notes"]  # no write check left behind
    new = tmp_path / "new" / "lab"
    _prepare_run_directory(new)
    assert new.is_dir() and list(new.iterdir()) == []
    resumed = tmp_path / "resumed"  # a laboratory folder (lab.json) may hold files of the user's too
    resumed.mkdir()
    (resumed / "lab.json").write_text("{}")
    (resumed / "notes.txt").write_text("")
    _prepare_run_directory(resumed)
    for names, listed in (("abc", r"\(a, b, c\) and no"), ("abcd", r"\(a, b, c, \.\.\.\) and no")):
        folder = tmp_path / names
        folder.mkdir()
        for name in names:
            (folder / name).write_text("")
        with pytest.raises(ValueError, match=listed):
            _prepare_run_directory(folder)


@pytest.mark.parametrize(("outcome", "trained"), [
    (None, True),  # cut short while training it
    ({"method": "grpo", "status": "done"}, True),
    ({"method": "grpo", "status": "failed", "error": "boom"}, True),
    ({"method": "grpo", "status": "interrupted", "step": 3}, True),
    ({"method": "grpo", "status": "interrupted"}, False),  # never started
    ({"method": "grpo", "status": "cached"}, False),
])
def test_an_invocation_trained_a_method_unless_it_found_it_finished_or_never_started_it(outcome, trained):
    from entrorl.lab.runner import _trained_here

    assert _trained_here(outcome) is trained


def test_a_dead_worker_s_reason_names_its_signal_or_its_exit_status():
    import signal

    from entrorl.lab.runner import _death_of

    assert _death_of(-signal.SIGKILL) == ("its worker process was killed by SIGKILL (the system's out-of-memory killer "
                                          "sends it when memory runs out; fewer --workers use less)")
    assert _death_of(-signal.SIGTERM) == "its worker process was killed by SIGTERM"
    assert _death_of(-99) == "its worker process was killed by signal 99"
    for status in (0, 1, None):
        assert _death_of(status) == (f"its worker process exited with status {status} before returning an outcome "
                                     "(what it printed, if anything, is above)")


class _RecordingProgress:
    """What the laboratory's progress display is told: each bar's last update, the bars stopped, the lines printed
    (with rich's options)."""

    tasks = ()

    def __init__(self):
        from types import SimpleNamespace

        self.updates, self.stopped, self.lines = {}, [], []
        self.console = SimpleNamespace(print=lambda text, **options: self.lines.append(text))

    def update(self, bar, **fields):
        self.updates[bar] = fields

    def start_task(self, bar):
        pass

    def stop_task(self, bar):
        self.stopped.append(bar)


def test_an_outcome_sets_its_bar_and_a_dead_worker_s_reason_becomes_its_error_log(tmp_path):
    from entrorl.lab.runner import _record_outcome

    methods = tmp_path / "methods"
    for method, logged in (("grpo", 3), ("rft", 7)):
        (methods / method).mkdir(parents=True)
        (methods / method / "metrics.jsonl").write_text("{}\n" * logged)
    (methods / "nsr").mkdir()
    (methods / "nsr" / "error.log").write_text("the whole traceback\n")
    outcomes, progress = {}, _RecordingProgress()
    names = ("grpo", "rft", "nsr", "dapo", "clip_b", "kl_cov")
    bars = {method: f"bar of {method}" for method in names}
    for outcome in ({"method": "grpo", "status": "interrupted", "step": 3}, {"method": "rft", "status": "failed", "error": "x"},
                    {"method": "nsr", "status": "failed", "error": "the traceback's end"}, {"method": "dapo", "status": "cached"},
                    {"method": "clip_b", "status": "done"},
                    {"method": "kl_cov", "status": "failed", "error": "its worker process was killed by SIGKILL", "died": True}):
        _record_outcome(outcome, outcomes, progress, bars, tmp_path, steps=5, jobs=len(names))
    assert list(outcomes) == list(names)
    assert progress.updates == {
        "bar of grpo": {"completed": 3, "status": "[yellow]interrupted"},
        "bar of rft": {"completed": 5, "status": "[red]failed"},  # more lines than steps: a full bar, no more
        "bar of nsr": {"completed": 0, "status": "[red]failed"},
        "bar of dapo": {"completed": 5, "status": "done (cached)"},
        "bar of clip_b": {"completed": 5, "status": "[green]done"},
        "bar of kl_cov": {"completed": 0, "status": "[red]failed"},
    }
    assert progress.stopped == ["bar of grpo", "bar of rft", "bar of nsr", "bar of kl_cov"]
    assert progress.lines[0] == "grpo: interrupted, saved at step 3 (1/6)" and progress.lines[-1] == "kl_cov: failed (6/6)"
    assert (methods / "nsr" / "error.log").read_text() == "the whole traceback\n"  # a method that raised keeps its own
    assert (methods / "kl_cov" / "error.log").read_text() == "its worker process was killed by SIGKILL\n"


def test_a_method_s_trainer_configuration(tmp_path):
    from entrorl.lab.runner import _trainer_config
    from entrorl.lab.supervised import SFT_OBJECTIVE

    preset = get_preset("quick")
    data = {name: tmp_path / "data" / f"{name}.jsonl" for name in ("train", "eval", "forget")}
    config = _trainer_config(preset, "grpo", tmp_path / "model", data, tmp_path / "methods" / "grpo")
    assert config["seed"] == preset.seed and config["method"] == "grpo"
    assert config["model"] == {"path": str(tmp_path / "model")} and config["data"] == {"train": str(data["train"])}
    assert config["reward"] == {"name": "entrorl.lab.runner:task_reward", "kwargs": {"task": preset.train_task}}
    assert config["logging"] == {"run_dir": str(tmp_path / "methods"), "name": "grpo", "progress": False}
    assert config["optim"] == {"steps": preset.steps, "lr": preset.lr, "warmup_steps": preset.warmup_steps,
                               "mini_batches": preset.mini_batches, "grad_clip": 1.0}
    assert config["checkpoint"] == {"every": preset.checkpoint_every, "keep": 1}
    # the report compares each step's measured entropy change with its first-order prediction
    assert config["diagnostics"]["first_order"] is True
    sampled = preset.model_copy(update={"prompts_per_step": 3, "group_size": 5, "max_new_tokens": 7, "temperature": 0.7})
    rollout = _trainer_config(sampled, "grpo", tmp_path / "model", data, tmp_path / "methods" / "grpo")["rollout"]
    assert {key: rollout[key] for key in ("prompts_per_step", "group_size", "max_new_tokens", "temperature")} == {
        "prompts_per_step": 3, "group_size": 5, "max_new_tokens": 7, "temperature": 0.7}
    reseeded = _trainer_config(preset.model_copy(update={"rl_seed": 5}), "sft", tmp_path / "model", data, tmp_path / "sft")
    assert reseeded["seed"] == 5 and reseeded["method"] == SFT_OBJECTIVE
    # sft maximises the likelihood of every demonstration token alike: the mean over all tokens of the batch
    assert SFT_OBJECTIVE == {"surrogate": {"name": "log_likelihood"}, "loss_agg_mode": "token-mean"}
    own_seed = _trainer_config(preset.model_copy(update={"seed": 3}), "grpo", tmp_path / "model", data, tmp_path / "grpo")
    assert own_seed["seed"] == 3  # without an rl_seed the runs train with the preset's seed


def test_the_laboratory_data_files_are_written_once_from_the_preset_s_seed(tmp_path):
    from entrorl.data import load_prompts
    from entrorl.lab.runner import _prepare_data
    from entrorl.lab.tasks import get_task

    preset = get_preset("quick").model_copy(update={"train_problems": 6, "eval_problems": 4, "forgetting_problems": 3})
    paths = _prepare_data(tmp_path / "lab", preset)
    assert paths == {name: tmp_path / "lab" / "data" / f"{name}.jsonl" for name in ("train", "eval", "forget")}
    train_task, forget_task = get_task(preset.train_task), get_task(preset.forgetting_task)
    for name, task, count, split in (("train", train_task, 6, "train"), ("eval", train_task, 4, "eval"),
                                     ("forget", forget_task, 3, "eval")):
        expected = task.records(count, seed=preset.seed, split=split)
        assert [(r.prompt, r.answer) for r in load_prompts(paths[name])] == [(r.prompt, r.answer) for r in expected], name
    # the held-out prompts are not the training ones: the split matters
    assert {r.prompt for r in train_task.records(4, seed=preset.seed, split="train")} != {
        r.prompt for r in load_prompts(paths["eval"])}
    # rl_seed changes the training randomness only, not the data
    reseeded = _prepare_data(tmp_path / "reseeded", preset.model_copy(update={"rl_seed": 5}))
    assert all(reseeded[name].read_text() == paths[name].read_text() for name in paths)
    # a resumed folder keeps its files as they are
    paths["train"].write_text('{"prompt": "kept", "answer": "1"}\n')
    _prepare_data(tmp_path / "lab", preset)
    assert paths["train"].read_text() == '{"prompt": "kept", "answer": "1"}\n'


def test_the_policy_evaluation_counts_each_prompt_s_samples_and_only_real_response_tokens(tmp_path, tiny_model_dir, monkeypatch):
    """evaluate_policy draws eval_n samples per held-out prompt and forgetting_n per forgetting prompt, under its own
    seed: the pass rates are per prompt, Pass@k runs up to k = eval_n, the S/D histograms of the correct and the
    wrong samples count exactly their response tokens (padding left out), and the entropy and length means are
    those of the real response tokens."""
    from entrorl.data import PromptRecord, write_jsonl
    from entrorl.lab import runner
    from entrorl.modeling import bucketed_response_token_stats, load_causal_lm, load_tokenizer
    from entrorl.rollout import HFSampler

    eval_prompts, forget_prompts = ["1+1=", "2+2=", "3+3="], ["4+4=", "5+5="]
    data = {"eval": tmp_path / "eval.jsonl", "forget": tmp_path / "forget.jsonl"}
    write_jsonl([PromptRecord(prompt=p, answer="0") for p in eval_prompts], data["eval"])
    write_jsonl([PromptRecord(prompt=p, answer="0") for p in forget_prompts], data["forget"])
    graded = []

    def verifier(prompt, completion, answer, **meta):  # right on the first prompt of each split only
        graded.append(prompt)
        return 1.0 if prompt in ("1+1=", "4+4=") else 0.0

    monkeypatch.setattr(runner, "get_task", lambda name: verifier)
    drawn = []
    generate = HFSampler.generate
    monkeypatch.setattr(HFSampler, "generate", lambda self, *args, **kwargs: drawn.append(generate(self, *args, **kwargs)) or drawn[-1])
    preset = get_preset("quick").model_copy(update={"eval_n": 4, "forgetting_n": 3, "max_new_tokens": 12, "top_forks": 3})
    model, tokenizer = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    torch.manual_seed(123)
    result = runner.evaluate_policy(model, tokenizer, preset, data)

    assert graded == [p for p in eval_prompts for _ in range(4)] + [p for p in forget_prompts for _ in range(3)]
    assert result["pass_rates"] == [1.0, 0.0, 0.0] and set(result["pass_at_k"]) == {"1", "2", "4"}
    assert result["forgetting_accuracy"] == pytest.approx(0.5)
    rollouts = drawn[0]
    mask = rollouts.response_mask
    assert not mask.all(), "the test needs responses that end before max_new_tokens"
    correct = torch.arange(len(mask)) < 4  # the samples of the first prompt
    for name in ("disc", "disc_centered"):
        assert len(result["distributions"][f"{name}/correct"]) == len(result["histogram_bins"]) - 1
        assert sum(result["distributions"][f"{name}/correct"]) == int(mask[correct].sum())
        assert sum(result["distributions"][f"{name}/wrong"]) == int(mask[~correct].sum())
    with torch.no_grad():
        stats = bucketed_response_token_stats(model, rollouts.prompt_ids, rollouts.prompt_mask, rollouts.response_ids,
                                              mask, temperature=preset.temperature, need=("entropy",))
    assert result["entropy_mean"] == pytest.approx(float(stats.entropy[mask].mean()), rel=1e-5)
    assert result["response_length_mean"] == pytest.approx(float(mask.sum(dim=1).float().mean()))
    # the evaluation seeds its own sampling: the caller's random state does not change it
    torch.manual_seed(7)
    assert runner.evaluate_policy(model, tokenizer, preset, data) == result


def test_a_method_is_trained_by_its_own_trainer_resumed_from_its_checkpoint_and_then_evaluated(tmp_path, monkeypatch,
                                                                                               signal_handlers_restored):
    """sft runs the supervised trainer on the training task, every other method the RL trainer; a method with a
    checkpoint resumes from it; in a worker the trainer stops at a step's end when the laboratory stops; the trained
    model is what is evaluated."""
    from entrorl import trainer as trainer_package
    from entrorl.lab import runner, supervised
    from entrorl.lab.tasks import get_task
    from entrorl.trainer import checkpoint

    class RecordingTrainer:
        def __init__(self, config, *, run_dir, resume):
            self.config, self.run_dir, self.resume, self.task, self.trained = config, run_dir, resume, None, None
            self.model, self.tokenizer = f"model of {run_dir.name}", f"tokenizer of {run_dir.name}"
            built[run_dir.name] = self

        def use_task(self, task):
            self.task = task

        def train(self, **options):
            self.trained = options

        def version_notes(self):
            self.resumed_from = self.run_dir / "checkpoints" / "step_000004"
            return ["software changed since that checkpoint: torch 1 -> 2"] if self.resume else []

    class RecordingSFTTrainer(RecordingTrainer):
        pass

    built = {}
    monkeypatch.setattr(trainer_package, "Trainer", RecordingTrainer)
    monkeypatch.setattr(supervised, "SFTTrainer", RecordingSFTTrainer)
    monkeypatch.setattr(checkpoint, "latest_checkpoint",
                        lambda run_dir, **checks: run_dir / "checkpoints" / "step_000004" if run_dir.name == "sft" else None)
    monkeypatch.setattr(runner, "evaluate_policy", lambda model, tokenizer, preset, data: {
        "model": model, "tokenizer": tokenizer, "eval_n": preset.eval_n, "data": sorted(data)})
    preset = get_preset("quick")
    data = {name: str(tmp_path / "data" / f"{name}.jsonl") for name in ("train", "eval", "forget")}

    def job(method):
        return {"preset": preset.model_dump(mode="json"), "method": method, "run_dir": str(tmp_path / "methods" / method),
                "model_dir": str(tmp_path / "model"), "data": data}

    monkeypatch.setattr(runner, "_STOP", None)
    with pytest.warns(UserWarning, match=r"^sft, resumed from step_000004: software changed since that checkpoint: "
                                         r"torch 1 -> 2$"):  # what entrorl train prints on a resume, the lab warns
        assert runner._train_and_evaluate(job("sft")) == {"model": "model of sft", "tokenizer": "tokenizer of sft",
                                                          "eval_n": preset.eval_n, "data": ["eval", "forget", "train"]}
    sft = built["sft"]
    assert type(sft) is RecordingSFTTrainer and sft.resume and sft.trained == {}
    assert type(sft.task) is type(get_task(preset.train_task)) and sft.run_dir == tmp_path / "methods" / "sft"
    assert sft.config.seed == preset.seed and sft.config.optim.steps == preset.steps
    monkeypatch.setattr(runner, "_STOP", __import__("threading").Event())  # in a worker
    assert runner._train_and_evaluate(job("grpo"))["model"] == "model of grpo"
    grpo = built["grpo"]
    assert type(grpo) is RecordingTrainer and not grpo.resume and grpo.task is None
    assert grpo.trained == {"handle_signals": True, "should_stop": runner._laboratory_stopped}
    runner._train_and_evaluate(job("rft"))  # the other supervised baseline is an ordinary method of the RL trainer
    assert type(built["rft"]) is RecordingTrainer and built["rft"].task is None


def test_the_supervised_trainer_trains_on_one_correct_reference_per_sample_drawn_anew_each_step(tmp_path, tiny_model_dir,
                                                                                               monkeypatch):
    """Each sample's response becomes a correct demonstration of its problem followed by EOS (padding masked out), with
    reward and advantage 1; the policy's own samples still give the step's reward and entropy measurements."""
    from entrorl.data import write_jsonl
    from entrorl.lab.runner import _trainer_config
    from entrorl.lab.supervised import SFTTrainer
    from entrorl.lab.tasks import get_task
    from entrorl.trainer import Trainer, load_config

    task = get_task("sum_chain")
    preset = get_preset("quick").model_copy(update={"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4})
    data = {"train": tmp_path / "train.jsonl"}
    write_jsonl(task.records(4, seed=0, split="train"), data["train"])
    trainer = SFTTrainer(load_config(_trainer_config(preset, "sft", tiny_model_dir, data, tmp_path / "run")), run_dir=tmp_path / "run")
    with pytest.raises(RuntimeError, match=r"use_task\(task\)"):
        trainer.collect()
    trainer.use_task(task)
    sampled = Trainer.collect(trainer)
    monkeypatch.setattr(Trainer, "collect", lambda self: sampled)
    scored = trainer.collect()
    tokenizer, rollouts = trainer.tokenizer, scored.rollouts
    assert scored.records == sampled.records and torch.equal(rollouts.prompt_ids, sampled.rollouts.prompt_ids)
    assert scored.rewards.tolist() == scored.advantages.tolist() == [1.0] * 4 and not rollouts.truncated.any()
    for row, record in enumerate(scored.records):
        length = int(rollouts.lengths[row])
        ids = rollouts.response_ids[row]
        assert rollouts.response_mask[row].tolist() == [True] * length + [False] * (ids.shape[0] - length)
        assert ids[length - 1] == tokenizer.eos_token_id and (ids[length:] == tokenizer.pad_token_id).all()
        assert task.score(record.prompt, tokenizer.decode(ids[: length - 1]), record.answer, **record.meta) == 1.0
    assert {"reward/accuracy", "entropy/mean"} <= set(scored.metrics)
    assert scored.metrics["reward/accuracy"] == sampled.metrics["reward/accuracy"]

    def demonstrations(step):
        trainer.step = step
        return [tokenizer.decode(ids) for ids in trainer.collect().rollouts.response_ids]

    assert demonstrations(0) == demonstrations(0) and demonstrations(0) != demonstrations(1)


class _Pipe:
    """A worker's end of the pipe as the laboratory sees it: ``messages`` become readable from the ``ready_after``-th
    poll on (an outcome sent while the laboratory was looking at the process)."""

    def __init__(self, messages, ready_after=1):
        self.messages, self.ready_after, self.polls, self.sent, self.closed = list(messages), ready_after, 0, [], False

    def poll(self):
        self.polls += 1
        return self.polls >= self.ready_after and bool(self.messages)

    def recv(self):
        return self.messages.pop(0)

    def send(self, message):
        self.sent.append(message)

    def close(self):
        self.closed = True


def test_a_worker_s_outcome_is_its_methods_own_even_when_sent_as_it_ended_and_is_given_once(tmp_path):
    import signal
    from types import SimpleNamespace

    from entrorl.lab.runner import _death_of, _Worker

    def worker_with(pipe, *, alive, exitcode=None):
        worker = object.__new__(_Worker)
        worker.connection, worker.job = pipe, {"method": "grpo", "run_dir": str(tmp_path / "grpo")}
        worker.process = SimpleNamespace(is_alive=lambda: alive, exitcode=exitcode, join=lambda timeout=None: None)
        return worker

    running = worker_with(_Pipe([]), alive=True)
    assert running.outcome() is None and running.method == "grpo"
    sent = {"method": "grpo", "status": "done", "seconds": 1.5}
    ended = worker_with(_Pipe([sent], ready_after=2), alive=False, exitcode=0)  # sent, then the process ended
    assert ended.outcome() == sent
    assert ended.job is None and ended.method is None and ended.outcome() is None  # given once
    killed = worker_with(_Pipe([]), alive=False, exitcode=-signal.SIGKILL)
    assert killed.outcome() == {"method": "grpo", "status": "failed", "error": _death_of(-signal.SIGKILL), "died": True}
    (tmp_path / "grpo").mkdir()
    (tmp_path / "grpo" / "final_eval.json").write_text('{"pass_at_k": {"1": 0.5}}')  # killed once evaluated: done
    assert worker_with(_Pipe([]), alive=False, exitcode=-signal.SIGKILL).outcome() == {"method": "grpo", "status": "done"}


def test_the_jobs_run_in_at_most_the_given_number_of_workers_and_each_outcome_is_recorded_once(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from entrorl.lab import runner

    made, running = [], set()

    class Worker:  # finishes its method at the poll after the one that started it
        def __init__(self, context, stop, run):
            self.connection, self.job, self.polled = _Pipe([]), None, False
            self.process = SimpleNamespace(is_alive=lambda: True, join=lambda timeout=None: None, kill=lambda: None)
            made.append(self)

        @property
        def method(self):
            return self.job["method"] if self.job else None

        def start(self, job):
            self.job, self.polled = job, False
            running.add(job["method"])
            assert len(running) <= 2, f"more methods at once than workers: {sorted(running)}"

        def outcome(self):
            if self.job is None or not self.polled:
                self.polled = True
                return None
            running.discard(self.job["method"])
            outcome, self.job = {"method": self.job["method"], "status": "done"}, None
            return outcome

    monkeypatch.setattr(runner, "_Worker", Worker)
    monkeypatch.setattr(runner.time, "sleep", lambda seconds: None)
    methods = ["grpo", "nsr", "clip_b", "dapo", "rft"]
    jobs = [{"method": method, "run_dir": str(tmp_path / "methods" / method)} for method in methods]
    outcomes, progress = {}, _RecordingProgress()
    stopped = runner._run_jobs(jobs, 2, outcomes, progress, {m: m for m in methods}, tmp_path, steps=4)
    assert stopped is None and len(made) == 2
    assert outcomes == {method: {"method": method, "status": "done"} for method in methods}
    assert sorted(line.split(":")[0] for line in progress.lines) == sorted(methods)
    assert [line.split("(")[-1] for line in progress.lines] == [f"{i}/5)" for i in range(1, 6)]
    assert all(worker.connection.sent == [None] and worker.connection.closed for worker in made)  # told to stop


def test_a_second_ctrl_c_ends_the_workers_at_once_and_the_methods_not_started_are_interrupted(
        tmp_path, monkeypatch, signal_handlers_restored):
    """Ctrl-C pressed twice before the laboratory looked: KeyboardInterrupt, every worker ended at once (SIGTERM)
    without waiting for its outcome, and the methods under way and those never started are recorded as interrupted."""
    import signal
    from types import SimpleNamespace

    from entrorl.lab import runner

    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    ended = []

    class Worker:  # Ctrl-C is pressed twice while its method trains
        def __init__(self, context, stop, run):
            self.connection, self.job, self.polls = _Pipe([]), None, 0
            self.process = SimpleNamespace(is_alive=lambda: not ended, join=lambda timeout=None: None,
                                           terminate=lambda: ended.append("terminate"), kill=lambda: ended.append("kill"))

        @property
        def method(self):
            return self.job["method"] if self.job else None

        def start(self, job):
            self.job = job

        def _received(self):  # nothing sent on its way out
            return None

        def outcome(self):
            self.polls += 1
            if self.polls == 1:
                for _ in range(2):
                    signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # the laboratory's own Ctrl-C handler
                return None
            outcome, self.job = {"method": self.job["method"], "status": "interrupted", "step": 1}, None
            return outcome

    monkeypatch.setattr(runner, "_Worker", Worker)
    monkeypatch.setattr(runner.time, "sleep", lambda seconds: None)
    outcomes = {}
    jobs = [{"method": method, "run_dir": str(tmp_path / method)} for method in ("grpo", "nsr")]
    with pytest.raises(KeyboardInterrupt):
        runner._run_jobs(jobs, 1, outcomes, _RecordingProgress(), {"grpo": "grpo", "nsr": "nsr"}, tmp_path, steps=4)
    assert ended == ["terminate"]
    # grpo's outcome never came: it was under way (so this invocation trained it), interrupted too
    assert outcomes == {"grpo": {"method": "grpo", "status": "interrupted", "under_way": True},
                        "nsr": {"method": "nsr", "status": "interrupted"}}


def test_a_worker_runs_each_job_it_receives_until_told_to_stop(monkeypatch, signal_handlers_restored):
    """A worker sends back each job's outcome; it ends on None, once the laboratory has stopped (after sending the
    outcome of the method it was running), when the laboratory's end of the pipe is gone, or on a second Ctrl-C
    (no outcome then)."""
    import threading

    from entrorl.lab import runner

    class Connection:
        def __init__(self, jobs, *, send_fails=False):
            self.jobs, self.send_fails, self.received, self.sent = list(jobs), send_fails, 0, []

        def recv(self):
            self.received += 1
            if not self.jobs:
                raise EOFError
            return self.jobs.pop(0)

        def send(self, outcome):
            if self.send_fails:
                raise OSError("the pipe is closed")
            self.sent.append(outcome)

    monkeypatch.setattr(runner, "_STOP", None)

    def run(job):
        if job["method"] == "stopping":
            stop.set()
        if job["method"] == "pressed":
            raise KeyboardInterrupt
        return {"method": job["method"], "status": "done"}

    stop = threading.Event()
    told = Connection([{"method": "grpo"}, {"method": "nsr"}, None, {"method": "never"}])
    runner._worker_loop(told, stop, run)
    assert told.sent == [{"method": "grpo", "status": "done"}, {"method": "nsr", "status": "done"}] and told.received == 3
    stopped = Connection([{"method": "stopping"}, {"method": "never"}])
    runner._worker_loop(stopped, stop, run)
    assert stopped.sent == [{"method": "stopping", "status": "done"}] and stopped.received == 1
    stop.clear()
    for connection, received in ((Connection([{"method": "pressed"}, {"method": "never"}]), 1),
                                 (Connection([{"method": "grpo"}, {"method": "never"}], send_fails=True), 1),
                                 (Connection([]), 1)):
        runner._worker_loop(connection, stop, run)
        assert connection.sent == [] and connection.received == received


@pytest.mark.parametrize("at_once", [False, True], ids=["told-to-stop", "at-once"])
def test_ending_the_workers_tells_or_terminates_them_and_leaves_none_behind(at_once):
    """Idle workers are sent None; ``at_once`` sets the laboratory's stop (so a worker exits once its trainer has
    saved its step) and sends SIGTERM to every live worker; one still alive after the wait is killed; every pipe is
    closed."""
    import threading
    from types import SimpleNamespace

    from entrorl.lab.runner import _end_workers

    def worker(*, alive, obeys):
        state = {"alive": alive, "calls": []}

        def ask(call):
            state["calls"].append(call)
            if obeys or call == "kill":
                state["alive"] = False

        process = SimpleNamespace(is_alive=lambda: state["alive"], join=lambda timeout=None: None,
                                  terminate=lambda: ask("terminate"), kill=lambda: ask("kill"))
        pipe = _Pipe([])
        pipe.send = lambda message: (pipe.sent.append(message), ask("told") if message is None else None)
        return SimpleNamespace(process=process, connection=pipe, state=state, job=None)

    pool = [worker(alive=True, obeys=True), worker(alive=True, obeys=False), worker(alive=False, obeys=True)]
    stop = threading.Event()
    _end_workers(pool, stop, at_once)
    assert stop.is_set() is at_once
    first = "terminate" if at_once else "told"
    assert [w.state["calls"] for w in pool] == [[first], [first, "kill"], []]
    assert all(w.connection.closed for w in pool) and not any(w.state["alive"] for w in pool)
    assert [w.connection.sent for w in pool] == ([[], [], []] if at_once else [[None], [None], []])


def test_an_rl_seed_of_zero_trains_with_seed_zero_also_when_the_preset_s_seed_is_not_zero(tmp_path):
    from entrorl.lab.runner import _trainer_config

    preset = get_preset("quick").model_copy(update={"seed": 3, "rl_seed": 0})
    data = {name: tmp_path / "data" / f"{name}.jsonl" for name in ("train", "eval", "forget")}
    assert _trainer_config(preset, "grpo", tmp_path / "model", data, tmp_path / "grpo")["seed"] == 0


def test_a_method_trains_on_one_thread_with_the_preset_s_sampling_and_no_evaluation_of_its_own(tmp_path):
    from entrorl.lab.runner import _trainer_config

    preset = get_preset("quick")
    data = {name: tmp_path / "data" / f"{name}.jsonl" for name in ("train", "eval", "forget")}
    config = _trainer_config(preset, "grpo", tmp_path / "model", data, tmp_path / "methods" / "grpo")
    assert config["torch_threads"] == 1 and config["eval"] == {"every": 0}
    assert config["rollout"] == {"prompts_per_step": preset.prompts_per_step, "group_size": preset.group_size,
                                 "max_new_tokens": preset.max_new_tokens, "temperature": preset.temperature,
                                 "generation_batch_size": 256}


class _ScoredByPosition:
    """A verifier that scores a batch at once: the ``i``-th sample of a prompt is right when ``right[prompt][i]``."""

    def __init__(self, right):
        self.right = right

    def __call__(self, prompt, completion, answer, **meta):
        raise AssertionError("scored one by one")

    def score_batch(self, prompts, completions, answers, metas):
        seen = {}
        scores = []
        for prompt in prompts:
            index = seen[prompt] = seen.get(prompt, -1) + 1
            scores.append(1.0 if self.right[prompt][index] else 0.0)
        return scores


def _two_prompt_files(tmp_path):
    from entrorl.data import PromptRecord, write_jsonl

    data = {"eval": tmp_path / "eval.jsonl", "forget": tmp_path / "forget.jsonl"}
    write_jsonl([PromptRecord(prompt=p, answer="0") for p in ("1+1=", "2+2=")], data["eval"])
    write_jsonl([PromptRecord(prompt=p, answer="0") for p in ("4+4=", "5+5=")], data["forget"])
    return data


def test_the_policy_evaluation_gives_the_unbiased_pass_at_k_up_to_64_and_the_mean_forgetting_accuracy(
        tmp_path, tiny_model_dir, monkeypatch):
    """64 samples of a prompt right 16 times and of one never right: Pass@k = (1 - C(48, k)/C(64, k)) / 2 for
    k = 1, 2, ..., 64; the forgetting accuracy is the share of right samples (2 of 6), not of prompts solved once."""
    import math

    from entrorl.lab import runner
    from entrorl.modeling import load_causal_lm, load_tokenizer

    data = _two_prompt_files(tmp_path)
    right = {"1+1=": [i < 16 for i in range(64)], "2+2=": [False] * 64,
             "4+4=": [True, False, True], "5+5=": [False] * 3}
    monkeypatch.setattr(runner, "get_task", lambda name: _ScoredByPosition(right))
    preset = get_preset("quick").model_copy(update={"eval_n": 64, "forgetting_n": 3, "max_new_tokens": 3, "top_forks": 2})
    result = runner.evaluate_policy(load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir), preset, data)
    assert result["pass_rates"] == [0.25, 0.0] and result["avg_at_n"] == pytest.approx(0.125)
    expected = {str(k): (1 - math.comb(48, k) / math.comb(64, k)) / 2 for k in (1, 2, 4, 8, 16, 32, 64)}
    assert result["pass_at_k"] == pytest.approx(expected) and list(result["pass_at_k"]) == list(expected)
    assert result["forgetting_accuracy"] == pytest.approx(2 / 6)


def test_the_policy_evaluation_samples_and_measures_entropy_at_the_preset_s_temperature_under_its_seed(
        tmp_path, tiny_model_dir, monkeypatch):
    """At temperature 0.5 the sampler is asked for 0.5 and the entropy is that of the 0.5-tempered distribution;
    the sampling seed follows the preset's seed; top_forks fork tokens are listed."""
    from entrorl.lab import runner
    from entrorl.modeling import bucketed_response_token_stats, load_causal_lm, load_tokenizer
    from entrorl.rollout import HFSampler

    data = _two_prompt_files(tmp_path)
    monkeypatch.setattr(runner, "get_task", lambda name: (lambda prompt, completion, answer, **meta: 0.0))
    drawn = []
    generate = HFSampler.generate

    def recorded(self, prompts, params):
        drawn.append((params, torch.initial_seed(), generate(self, prompts, params)))
        return drawn[-1][2]

    monkeypatch.setattr(HFSampler, "generate", recorded)
    model, tokenizer = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    preset = get_preset("quick").model_copy(update={"eval_n": 4, "forgetting_n": 2, "max_new_tokens": 8,
                                                    "temperature": 0.5, "top_forks": 3})
    result = runner.evaluate_policy(model, tokenizer, preset, data)
    params, seed, rollouts = drawn[0]
    assert (params.temperature, params.max_new_tokens) == (0.5, 8) and drawn[1][0].temperature == 0.5
    entropy = {}
    with torch.no_grad():
        for temperature in (0.5, 1.0):
            stats = bucketed_response_token_stats(model, rollouts.prompt_ids, rollouts.prompt_mask, rollouts.response_ids,
                                                  rollouts.response_mask, temperature=temperature, need=("entropy",))
            entropy[temperature] = float(stats.entropy[rollouts.response_mask].mean())
    assert abs(entropy[0.5] - entropy[1.0]) > 1e-3
    assert result["entropy_mean"] == pytest.approx(entropy[0.5], rel=1e-5)
    assert len(result["forks"]) == 3
    assert seed == preset.seed + 17  # the seed the published evaluations were drawn under
    drawn.clear()
    runner.evaluate_policy(model, tokenizer, preset.model_copy(update={"seed": preset.seed + 5}), data)
    assert drawn[0][1] == seed + 5


def test_a_method_not_started_before_the_laboratory_stopped_does_not_pay_the_warm_up(tmp_path, monkeypatch):
    import threading

    from entrorl.lab import runner

    stop = threading.Event()
    stop.set()
    monkeypatch.setattr(runner, "_STOP", stop)
    monkeypatch.setattr(runner, "_process_warmed_up", False)
    monkeypatch.setattr(runner, "_pay_one_off_costs", lambda job: pytest.fail("warmed up after the laboratory stopped"))
    assert runner._run_method({"method": "grpo", "run_dir": str(tmp_path / "grpo")}) == {
        "method": "grpo", "status": "interrupted"}
    assert not runner._process_warmed_up


def test_a_folder_holding_what_an_interrupted_laboratory_leaves_without_its_lab_json_is_one(tmp_path):
    from entrorl.lab.runner import _prepare_run_directory

    out = tmp_path / "lab"
    for name in ("data", "base", "methods", "figures"):
        (out / name).mkdir(parents=True)
    for name in ("outcomes.json", "report.md", "report.html", "report.json"):
        (out / name).write_text("{}")
    _prepare_run_directory(out)


@pytest.mark.parametrize("at_once", [False, True], ids=["told-to-stop", "at-once"])
def test_ending_the_workers_waits_10_s_after_sigterm_and_30_s_after_telling_them(at_once):
    import threading
    from types import SimpleNamespace

    from entrorl.lab.runner import _end_workers

    waits = []
    process = SimpleNamespace(is_alive=lambda: True, terminate=lambda: None, kill=lambda: None,
                              join=lambda timeout=None: waits.append(timeout))
    pool = [SimpleNamespace(process=process, connection=_Pipe([]), job=None)]
    _end_workers(pool, threading.Event(), at_once)
    assert (9 < waits[0] <= 10) if at_once else (29 < waits[0] <= 30)


def test_a_bar_advances_by_the_logged_steps_up_to_its_total_and_its_clock_starts_at_the_first_step(tmp_path):
    from types import SimpleNamespace

    from entrorl.lab.runner import _show_progress

    class Progress(_RecordingProgress):
        def __init__(self):
            super().__init__()
            self.tasks = [SimpleNamespace(id="bar of nsr", started=True)]
            self.begun = []

        def start_task(self, bar):
            self.begun.append(bar)

    for method, logged in (("grpo", 7), ("clip_b", 0), ("nsr", 2)):
        (tmp_path / "methods" / method).mkdir(parents=True)
        (tmp_path / "methods" / method / "metrics.jsonl").write_text("{}\n" * logged)
    progress = Progress()
    _show_progress(["grpo", "clip_b", "nsr", "dapo"], progress, {m: f"bar of {m}" for m in ("grpo", "clip_b", "nsr", "dapo")},
                   tmp_path, steps=5)
    assert progress.begun == ["bar of grpo"]  # nsr's clock runs already; clip_b and dapo logged no step yet
    assert progress.updates == {"bar of grpo": {"completed": 5}, "bar of clip_b": {"completed": 0},
                                "bar of nsr": {"completed": 2}, "bar of dapo": {"completed": 0}}


def test_a_laboratory_started_with_ctrl_c_ignored_keeps_ignoring_it(signal_handlers_restored):
    import signal

    from entrorl.lab.runner import _counting_stop_signals

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with _counting_stop_signals() as requests:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert requests.count == 0 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with _counting_stop_signals() as requests:
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    assert requests.count == 1 and requests.said_as == "Ctrl-C"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_to_the_laboratory_counts_as_a_request_to_stop_and_its_handler_is_put_back(signal_handlers_restored):
    import signal

    from entrorl.lab.runner import _counting_stop_signals

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with _counting_stop_signals() as requests:
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
    assert (requests.count, requests.said_as) == (1, "SIGTERM")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGXCPU"), reason="no CPU-time limit signal on this system")
def test_a_cpu_time_limit_reached_asks_the_laboratory_to_stop_once_whatever_its_repeats():
    """SIGXCPU (a soft CPU-time limit) would end the laboratory's process with a core dump and no word: it counts as
    one request to stop, as SIGTERM does; the kernel's repeats every CPU second are no second request (which would
    end the methods at once); the handler before is put back."""
    import signal

    from entrorl.lab.runner import _counting_stop_signals

    signal.signal(signal.SIGXCPU, signal.SIG_DFL)
    with _counting_stop_signals() as requests:
        for _ in range(3):
            signal.getsignal(signal.SIGXCPU)(signal.SIGXCPU, None)
    assert (requests.count, requests.said_as) == (1, "SIGXCPU (the CPU-time limit is reached)")
    assert signal.getsignal(signal.SIGXCPU) is signal.SIG_DFL
    with _counting_stop_signals() as requests:  # a Ctrl-C after it is the second request
        signal.getsignal(signal.SIGXCPU)(signal.SIGXCPU, None)
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    assert requests.count == 2


def test_a_resumed_invocation_records_the_folder_s_methods_in_order_and_its_outcomes_over_the_earlier_ones(
        tmp_path, monkeypatch):
    """The folder's methods keep their first order with the new ones after them; this invocation's outcomes replace
    the earlier ones of the same methods and keep the others; its record says it evaluated the base model, what it
    trained (not the method it found finished), its workers, and that it did not complete (a method failed); an
    unreadable earlier record is dropped."""
    import io

    from rich.console import Console

    from entrorl.lab import report, runner

    out = tmp_path / "lab"
    out.mkdir()
    folder = ["grpo", "clip_cov", "nsr"]
    earlier = {"started_at": 1.0, "finished_at": 2.0, "seconds": 1.0, "methods": folder, "ran": folder}
    (out / "lab.json").write_text(json.dumps({"preset": get_preset("quick").model_copy(update={"methods": folder}).model_dump(mode="json"),
                                              "methods": folder, "invocations": [earlier, "garbage"]}))
    (out / "outcomes.json").write_text(json.dumps({"grpo": {"method": "grpo", "status": "failed", "error": "old"},
                                                   "nsr": {"method": "nsr", "status": "failed", "error": "old"}}))
    monkeypatch.setattr(runner, "build_base_model", lambda spec, cache_dir=None, progress=None: tmp_path / "base-model")
    monkeypatch.setattr(runner, "_prepare_data", lambda out, preset: {k: out / "data" / f"{k}.jsonl" for k in ("train", "eval", "forget")})
    monkeypatch.setattr("entrorl.modeling.load_causal_lm", lambda path: "model")
    monkeypatch.setattr("entrorl.modeling.load_tokenizer", lambda path: "tokenizer")
    monkeypatch.setattr(runner, "evaluate_policy", lambda model, tokenizer, preset, data: {"pass_at_k": {"1": 0.5}})
    monkeypatch.setattr(report, "write_report", lambda out: None)
    ran = []

    def run_jobs(jobs, workers, outcomes, progress, bars, out, steps):
        ran.append([job["method"] for job in jobs])
        outcomes.update({"nsr": {"method": "nsr", "status": "cached"},
                         "dapo": {"method": "dapo", "status": "failed", "error": "new"}})
        return None

    monkeypatch.setattr(runner, "_run_jobs", run_jobs)
    console = Console(file=io.StringIO(), width=400)
    runner.run_lab("quick", methods=["nsr", "dapo"], out=out, workers=3, console=console)
    assert ran == [["nsr", "dapo"]]
    recorded = json.loads((out / "lab.json").read_text())
    assert recorded["methods"] == recorded["preset"]["methods"] == ["grpo", "clip_cov", "nsr", "dapo"]
    assert recorded["workers"] == 2  # --workers 3 for two methods: two processes
    assert recorded["invocations"][0] == earlier and len(recorded["invocations"]) == 2
    now = recorded["invocations"][1]
    assert (now["methods"], now["ran"], now["workers"]) == (["nsr", "dapo"], ["dapo"], 2)
    assert now["base_evaluated"] is True and now["completed"] is False
    assert json.loads((out / "outcomes.json").read_text()) == {
        "grpo": {"method": "grpo", "status": "failed", "error": "old"}, "nsr": {"method": "nsr", "status": "cached"},
        "dapo": {"method": "dapo", "status": "failed", "error": "new"}}
    assert runner.failed_methods(out) == ["grpo", "dapo"]
    printed = " ".join(console.file.getvalue().split())
    assert "the report covers all 4 methods of" in printed and "(grpo, clip_cov, nsr, dapo)" in printed


@pytest.mark.parametrize("stop", [RuntimeError("the base evaluation ran out of memory"), KeyboardInterrupt()])
def test_an_invocation_whose_base_evaluation_failed_is_recorded_as_not_completed(tmp_path, monkeypatch, stop):
    """The base model's evaluation raises (or is stopped with Ctrl-C) before any method starts: the invocation is
    recorded, with its end, as not completed (no method finished) and as having run no method, and the error reaches
    the caller."""
    from entrorl.lab import runner

    out = tmp_path / "lab"
    monkeypatch.setattr(runner, "build_base_model", lambda spec, cache_dir=None, progress=None: tmp_path / "base-model")
    monkeypatch.setattr(runner, "_prepare_data", lambda out, preset: {k: out / "data" / f"{k}.jsonl" for k in ("train", "eval", "forget")})
    monkeypatch.setattr("entrorl.modeling.load_causal_lm", lambda path: "model")
    monkeypatch.setattr("entrorl.modeling.load_tokenizer", lambda path: "tokenizer")

    def failing(model, tokenizer, preset, data):
        raise stop

    monkeypatch.setattr(runner, "evaluate_policy", failing)
    monkeypatch.setattr(runner, "_run_jobs", lambda *args: pytest.fail("no method starts after the base evaluation failed"))
    with pytest.raises(type(stop)):
        runner.run_lab("quick", methods=["grpo", "nsr"], out=out)
    invocation = json.loads((out / "lab.json").read_text())["invocations"][-1]
    assert invocation["base_evaluated"] is True and "finished_at" in invocation
    assert invocation["completed"] is False and invocation["ran"] == []


def test_the_policy_evaluation_gives_pass_at_n_also_when_n_is_not_a_power_of_two(tmp_path, tiny_model_dir, monkeypatch):
    """eval_n = 6: Pass@k for k = 1, 2, 4 and 6 (the docstring's "k up to eval_n", n itself included)."""
    import math

    from entrorl.lab import runner
    from entrorl.modeling import load_causal_lm, load_tokenizer

    data = _two_prompt_files(tmp_path)
    right = {"1+1=": [True, False, True, False, False, False], "2+2=": [False] * 6, "4+4=": [True], "5+5=": [False]}
    monkeypatch.setattr(runner, "get_task", lambda name: _ScoredByPosition(right))
    preset = get_preset("quick").model_copy(update={"eval_n": 6, "forgetting_n": 1, "max_new_tokens": 3, "top_forks": 2})
    result = runner.evaluate_policy(load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir), preset, data)
    expected = {str(k): (1 - math.comb(4, k) / math.comb(6, k)) / 2 for k in (1, 2, 4, 6)}
    assert result["pass_at_k"] == pytest.approx(expected) and list(result["pass_at_k"]) == list(expected)


def test_the_supervised_trainer_draws_its_demonstrations_from_the_run_s_seed(tmp_path, tiny_model_dir, monkeypatch):
    """The same step of runs with another seed trains on other demonstrations (each run its own draw)."""
    from entrorl.data import write_jsonl
    from entrorl.lab.runner import _trainer_config
    from entrorl.lab.supervised import SFTTrainer
    from entrorl.lab.tasks import get_task
    from entrorl.trainer import Trainer, load_config

    task = get_task("sum_chain")
    preset = get_preset("quick").model_copy(update={"prompts_per_step": 4, "group_size": 2, "max_new_tokens": 2})
    data = {"train": tmp_path / "train.jsonl"}
    write_jsonl(task.records(4, seed=0, split="train"), data["train"])
    trainer = SFTTrainer(load_config(_trainer_config(preset, "sft", tiny_model_dir, data, tmp_path / "run")), run_dir=tmp_path / "run")
    trainer.use_task(task)
    sampled = Trainer.collect(trainer)
    monkeypatch.setattr(Trainer, "collect", lambda self: sampled)

    def demonstrations(seed):
        trainer.config = trainer.config.model_copy(update={"seed": seed})
        return [trainer.tokenizer.decode(ids) for ids in trainer.collect().rollouts.response_ids]

    assert demonstrations(0) == demonstrations(0) and demonstrations(0) != demonstrations(1)


@pytest.mark.parametrize(("a", "b"), [({"lr": 1}, {"lr": 1.0}), ({"wrong_fraction": 0}, {"wrong_fraction": 0.0}),
                                      ({"lr": np.float32(0.5)}, {"lr": 0.5})])
def test_equal_specifications_share_one_cache_key(a, b):
    """1 and 1.0, or a numpy 0.5 and 0.5, are one setting: one key, so one cached model (a numpy float made the key's
    JSON fail, an int made another key)."""
    assert BaseModelSpec(**a) == BaseModelSpec(**b)
    assert BaseModelSpec(**a).key() == BaseModelSpec(**b).key()
    assert BaseModelSpec().key() == BaseModelSpec(lr=3e-3, wrong_fraction=0.3).key()


def test_an_empty_entrorl_cache_means_the_default_cache(monkeypatch, tmp_path):
    """ENTRORL_CACHE set but empty is unset (it put the cache in the working directory); '~' is the home folder, and a
    relative path is taken from the working directory once, as an absolute one."""
    from entrorl.lab.base_model import default_cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("ENTRORL_CACHE", "")
    assert default_cache_dir() == tmp_path / ".cache" / "entrorl"
    monkeypatch.setenv("ENTRORL_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.setenv("ENTRORL_CACHE", "~/mine")  # as a shell would not expand it inside quotes
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ENTRORL_CACHE", "relative")
    assert default_cache_dir() == tmp_path / "relative"


def test_a_finished_base_model_in_a_read_only_cache_is_used(tmp_path, monkeypatch):
    """A cache that already holds the model is only read: a read-only one is fine (it was refused as unwritable); one
    without the model is still refused before any training."""
    import os

    from entrorl.lab import base_model

    spec = BaseModelSpec()
    final = tmp_path / "lab" / f"base-{spec.key()}"
    final.mkdir(parents=True)
    (final / "base.json").write_text(json.dumps({"key": spec.key()}))
    monkeypatch.setattr(base_model, "_train", lambda *args, **kwargs: pytest.fail("trained again"))
    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.W_OK)  # a read-only filesystem
    assert base_model.build_base_model(spec, cache_dir=tmp_path) == final
    with pytest.raises(ValueError, match="cannot be written"):
        base_model.build_base_model(BaseModelSpec(seed=1), cache_dir=tmp_path)


def test_training_a_base_model_leaves_the_caller_s_random_stream_as_it_was(tmp_path, monkeypatch):
    from entrorl.lab import base_model

    monkeypatch.setattr(base_model, "_train_seeded", lambda spec, directory, progress=None: {"drawn": torch.rand(1).item()})
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = base_model._train(BaseModelSpec(seed=5), tmp_path)
    assert torch.equal(torch.rand(3), expected)
    assert base_model._train(BaseModelSpec(seed=5), tmp_path) == first  # seeded by the spec, inside


def test_a_left_over_temporary_folder_of_the_same_process_id_does_not_stop_a_base_model_build(tmp_path, monkeypatch):
    """A build killed earlier may leave ``.base-<key>.tmp-<pid>``; a later process with the same id clears it first, and
    none of its files reach the finished model."""
    import os

    from entrorl.lab import base_model

    def train(spec, directory, progress=None):
        (directory / "weights").write_text("new")
        return {"key": spec.key()}

    monkeypatch.setattr(base_model, "_train", train)
    spec = BaseModelSpec()
    stale = tmp_path / "lab" / f".base-{spec.key()}.tmp-{os.getpid()}"
    stale.mkdir(parents=True)
    (stale / "half-written").write_text("old")
    final = base_model.build_base_model(spec, cache_dir=tmp_path)
    assert sorted(path.name for path in final.iterdir()) == ["base.json", "weights"]
    assert built_and_locks(tmp_path / "lab") == ([final.name], 1)


def test_a_worker_does_not_repeat_the_warning_the_laboratory_gave_when_it_checked_its_methods(monkeypatch):
    """``dapo+kl_cov`` trains with DAPO's clipped surrogate, not KL-Cov's unclipped one: the laboratory says so once,
    when it checks its methods; the worker that builds the objective again stays quiet about it, and about nothing
    else."""
    import signal
    import warnings

    from entrorl.lab import runner
    from entrorl.objective import SurrogateSetAsideWarning, build_objective

    preset = get_preset("quick").model_copy(update={"methods": ["dapo+kl_cov"]})
    with pytest.warns(SurrogateSetAsideWarning, match="'kl_cov' after 'dapo' trains with dapo's surrogate"):
        preset.check_methods()
    monkeypatch.setattr(runner, "_STOP", None)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runner._init_worker(None)
            build_objective("dapo+kl_cov")
            warnings.warn("another warning", UserWarning)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert [str(w.message) for w in caught] == ["another warning"]


def _lab_sft_run(tmp_path):
    """One step of the laboratory's sft baseline on a random tiny Qwen2, configured as the laboratory does."""
    from entrorl.data import write_jsonl
    from entrorl.lab.presets import get_preset
    from entrorl.lab.runner import _trainer_config
    from entrorl.lab.supervised import SFTTrainer
    from entrorl.lab.tasks import get_task
    from entrorl.lab.tiny_model import save_tiny_model
    from entrorl.trainer import load_config

    model_dir = save_tiny_model(tmp_path / "model", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    task = get_task("sum_chain")
    data = {"train": tmp_path / "train.jsonl"}
    write_jsonl(task.records(16, seed=0, split="train"), data["train"])
    preset = get_preset("quick").model_copy(update={"steps": 2, "prompts_per_step": 2, "group_size": 2,
                                                    "max_new_tokens": 6, "warmup_steps": 0})
    run_dir = tmp_path / "sft"
    config = load_config(_trainer_config(preset, "sft", model_dir, data, run_dir))
    trainer = SFTTrainer(config, run_dir=run_dir)
    trainer.use_task(task)
    trainer.train()
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lab_sft_tokens_per_s_counts_the_sampled_tokens(tmp_path):
    """docs/metrics.md: ``time/tokens_per_s`` is "sampled response tokens per second of the step". The laboratory's
    ``sft`` baseline samples the policy every step (its reward, accuracy and ``response/length_mean`` are those
    samples'), but SFTTrainer.collect (entrorl/lab/supervised.py, the ScoredRollouts it returns) drops the
    ``sampled_tokens`` of the sampled rollouts, so train_step (trainer/loop.py: ``tokens = valid.sum() if
    scored.sampled_tokens is None``) counts the reference demonstrations' tokens instead."""
    torch.manual_seed(0)
    rows = _lab_sft_run(tmp_path)
    for row in rows:
        sampled = row["response/length_mean"] * 4  # 2 prompts x 2 samples, every one sampled this step
        counted = row["time/tokens_per_s"] * row["time/step_s"]
        assert counted == pytest.approx(sampled, rel=1e-3), (
            f"time/tokens_per_s x time/step_s = {counted:.1f} tokens, but the step sampled {sampled:.1f}")


def _tiny_preset(monkeypatch, *, steps: int = 4) -> "lab_presets_module.LabPreset":
    preset = lab_presets_module.LabPreset(
        name="tiny",
        base=BaseModelSpec(tasks=("sum_chain", "rg_arithmetic"), problems_per_task=40, hidden_size=32, num_layers=1,
                           num_heads=2, num_kv_heads=1, steps=5, batch_size=8, lr=5e-3),
        train_problems=40, eval_problems=4, forgetting_problems=4, steps=steps, prompts_per_step=2, group_size=2,
        max_new_tokens=12, warmup_steps=1, checkpoint_every=2, eval_n=4, forgetting_n=2, top_forks=3, workers=1,
    )
    monkeypatch.setitem(lab_presets_module.PRESETS, "tiny", preset)
    return preset


def _press_ctrl_c_twice_when(metrics, lines: int):
    def press():
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if metrics.exists() and metrics.read_text().count("\n") >= lines:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # two separate deliveries
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=press, daemon=True)
    thread.start()
    return thread


def test_an_invocation_stopped_at_once_records_the_method_it_was_training(tmp_path, monkeypatch):
    """runner.py's module docstring: each invocation in lab.json records `ran`, "the methods it trained or was
    training". A second Ctrl-C while grpo trains (it had trained and saved steps in this invocation) records
    `ran: []`: the method under way gets the outcome {"status": "interrupted"} without a step
    (runner._run_jobs' finally), which _trained_here takes for "stopped before it started". Consequence: a resumed
    invocation stopped at once is left out of the report's wall clock ("summed over the invocations that ran
    something") and of its worker counts, though it trained (its seconds are in the method's train time)."""
    _tiny_preset(monkeypatch, steps=200)
    out, cache = tmp_path / "lab", tmp_path / "cache"
    metrics = out / "methods" / "grpo" / "metrics.jsonl"
    presser = _press_ctrl_c_twice_when(metrics, 2)
    with pytest.raises(KeyboardInterrupt):
        run_lab("tiny", methods=["grpo"], out=out, workers=1, cache_dir=cache)
    presser.join()
    assert metrics.read_text().count("\n") >= 2  # it trained steps in this invocation
    invocation = json.loads((out / "lab.json").read_text())["invocations"][-1]
    assert "grpo" in invocation["ran"], invocation


def _worker_pids() -> list[int]:
    """This process's multiprocessing workers (not its resource tracker)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and "spawn_main" in cmdline:
            pids.append(int(entry))
    return pids


def _run_lab_terminating_its_group(tmp_path, *, after_s: float):
    """Run the tiny laboratory (grpo) and, ``after_s`` seconds after its worker appears, send SIGTERM to the worker
    and to this process, as a job scheduler stopping the process group does; returns the output folder once the
    laboratory has raised its stop."""
    out, cache = tmp_path / "lab", tmp_path / "cache"
    sent = []

    def terminate_the_group():
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            workers = _worker_pids()
            if workers:
                time.sleep(after_s)
                for pid in workers:
                    os.kill(pid, signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)
                sent.extend(workers)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=terminate_the_group, daemon=True)
    thread.start()
    with pytest.raises(BaseException) as stopped:
        run_lab("tiny", methods=["grpo"], out=out, workers=1, cache_dir=cache)
    thread.join()
    assert sent, "no worker was seen"
    assert getattr(stopped.value, "signal_number", None) == signal.SIGTERM
    return out


def test_sigterm_to_the_process_group_while_a_worker_starts_is_a_stop_not_a_failure(tmp_path, monkeypatch):
    """README: "Ctrl-C (or SIGTERM, exit status 143) lets each method being trained finish and save its step (the
    others do not start)". SIGTERM sent to the whole process group (what GNU `timeout`, Slurm's scancel or a systemd
    stop do) while a worker is starting (importing, warming up) or making its final evaluation kills that worker: the
    method is recorded as failed with "its worker process was killed by SIGTERM" (error.log, outcomes.json, exit
    status 1 later), and the CLI says "interrupted after every method had finished, before the report was written".
    With Ctrl-C at the same moment the method is "interrupted before it started" (or finishes its evaluation).
    Cause: a worker ignores SIGINT but leaves SIGTERM at its default outside the trainer's handler
    (runner._init_worker, _Worker.__init__'s _ignoring_ctrl_c, _run_method's finally)."""
    _tiny_preset(monkeypatch, steps=4)
    out = _run_lab_terminating_its_group(tmp_path, after_s=0.3)  # the worker is importing / warming up
    outcome = json.loads((out / "outcomes.json").read_text())["grpo"]
    assert outcome["status"] != "failed", outcome
    assert not (out / "methods" / "grpo" / "error.log").exists()


def test_an_unreadable_base_evaluation_and_a_method_without_an_intact_checkpoint_are_made_again(tmp_path, monkeypatch,
                                                                                                capfd):
    """A method's final_eval.json that cannot be read is evaluated again when the laboratory is re-run (runner.py:
    "one that cannot be read is evaluated again"), but base/final_eval.json is reused whenever it exists
    (runner._run_in_folder: `if not base_eval.exists()`): an empty or cut-short one stays for ever, the report says
    "`base/final_eval.json` cannot be read (cut short?) ... the base model's rows and lines are missing", and re-running
    the command, the remedy the laboratory gives for everything else, changes nothing (exit 0).

    A method whose only checkpoint is damaged (or lost its trainer state) before its final evaluation trains again,
    that checkpoint set aside: resumed, it failed on every run ("--resume: no checkpoint"), and started afresh the
    trainer refuses a fresh start over it."""
    from entrorl.lab.runner import failed_methods

    _tiny_preset(monkeypatch, steps=2)
    out, cache = tmp_path / "lab", tmp_path / "cache"
    run_lab("tiny", methods=["grpo"], out=out, workers=1, cache_dir=cache)
    base_eval = out / "base" / "final_eval.json"
    whole = json.loads(base_eval.read_text())
    base_eval.write_text(base_eval.read_text()[:100])  # cut short (a disk error, a copy interrupted)
    method = out / "methods" / "grpo"
    (method / "final_eval.json").unlink()
    (state,) = method.glob("checkpoints/step_*/trainer.pt")
    damaged = bytearray(state.read_bytes())
    damaged[len(damaged) // 2] ^= 1  # every file there, one bit changed: only its CRC-32 tells
    state.write_bytes(bytes(damaged))
    capfd.readouterr()
    run_lab("tiny", methods=["grpo"], out=out, workers=1, cache_dir=cache)
    said = " ".join(capfd.readouterr().err.split())
    assert re.search(r"grpo: no checkpoint of it can be resumed; moved them to .*passed_over \(step_000002\) and "
                     r"training it again from the start", said), said
    assert json.loads(base_eval.read_text()) == whole
    assert failed_methods(out) == [] and (method / "final_eval.json").is_file()


def test_a_moved_folder_continues_its_methods_but_not_from_another_base_model_built_under_the_same_name(
        tmp_path, monkeypatch):
    """Each method's config names the folder's data/train.jsonl by its absolute path: a folder renamed or moved still
    continues a method left with a checkpoint and no final evaluation (its trainer resumes from the same prompts).

    The base model is cached by its settings alone: rebuilt on another kind of CPU (another cache, another node) it
    has other weights under the same name, and continuing the folder would train new methods from it beside the base
    evaluation and methods of the first. Refused, naming the base model, with lab.json's record of the first kept."""
    import shutil

    from safetensors.torch import load_file, save_file

    from entrorl.lab.runner import failed_methods

    _tiny_preset(monkeypatch, steps=2)
    first, cache = tmp_path / "lab-20260101-000000", tmp_path / "cache"
    run_lab("tiny", methods=["grpo"], out=first, workers=1, cache_dir=cache)
    recorded = json.loads((first / "lab.json").read_text())
    assert len(recorded["base_model_fingerprint"]) == 64
    (first / "methods" / "grpo" / "final_eval.json").unlink()  # cut off after its last checkpoint
    moved = tmp_path / "lab-seed0"
    shutil.move(str(first), str(moved))
    run_lab("tiny", methods=["grpo"], out=moved, workers=1, cache_dir=cache)  # the same base model: continues
    assert failed_methods(moved) == [] and (moved / "methods" / "grpo" / "final_eval.json").is_file()

    (weights,) = cache.glob("lab/base-*/model.safetensors")
    tensors = load_file(str(weights))
    name = next(key for key, value in tensors.items() if value.dtype == torch.float32)
    save_file({**tensors, name: tensors[name] + 0.05}, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="its methods started from another base model than the one built for these "
                                         "settings now"):
        run_lab("tiny", methods=["grpo", "dapo"], out=moved, workers=1, cache_dir=cache)
    now = json.loads((moved / "lab.json").read_text())
    assert now["base_model_fingerprint"] == recorded["base_model_fingerprint"]
    assert not (moved / "methods" / "dapo").exists()


def test_a_lab_worker_s_exit_now_message_names_the_laboratory_s_command(tmp_path, tiny_model_dir):
    model_dir = tiny_model_dir
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                             for a in range(4) for b in range(4)))
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal
        from entrorl.trainer import Trainer, TrainingInterrupted, load_config
        config = load_config({{
            "seed": 7, "torch_threads": 1, "model": {{"path": {str(model_dir)!r}}},
            "data": {{"train": {str(train)!r}}}, "reward": {{"name": "exact_match"}},
            "rollout": {{"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4, "temperature": 1.0}},
            "method": "grpo", "optim": {{"steps": 3, "lr": 1e-3}}, "logging": {{"progress": False}},
            "checkpoint": {{"every": 2, "keep": 2}},
        }})
        trainer = Trainer(config, run_dir={str(tmp_path / "run")!r}, resume=False)
        trainer.resumed_by = "running the laboratory's command again"   # as runner._train_and_evaluate sets it
        try:
            trainer.train(handle_signals=True, should_stop=lambda: True)  # the laboratory's stop: step 1 is saved
        except TrainingInterrupted:
            pass
        os.kill(os.getpid(), signal.SIGTERM)   # a further signal while the worker is still on its way out
        import time; time.sleep(5)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    said = done.stdout + done.stderr
    assert "again: exiting now" in said, said[-2000:]
    assert "--resume" not in said, said[-2000:]
    assert "laboratory" in said, said[-2000:]


def test_stop_requests_during_the_last_poll_are_not_dropped(tmp_path, monkeypatch, signal_handlers_restored):
    from entrorl.lab import runner

    signal.signal(signal.SIGTERM, lambda number, frame: None)  # a handler to replace (as the CLI's)

    class Worker:  # its method finishes at the first poll
        def __init__(self, context, stop, run):
            self.job = None
            self.connection = SimpleNamespace(send=lambda message: None, close=lambda: None,
                                              poll=lambda *a: False, recv=lambda: None)
            self.process = SimpleNamespace(is_alive=lambda: True, join=lambda timeout=None: None,
                                           terminate=lambda: None, kill=lambda: None)

        @property
        def method(self):
            return self.job["method"] if self.job else None

        def start(self, job):
            self.job = job

        def _received(self):
            return None

        def outcome(self):
            if self.job is None:
                return None
            outcome, self.job = {"method": self.job["method"], "status": "done"}, None
            return outcome

    sleeps = []

    def sleep(seconds):  # the scheduler's SIGTERM arrives twice while the laboratory waits for its next poll
        sleeps.append(seconds)
        if len(sleeps) == 2:  # the first wait follows the job's start, the second the recording of its outcome
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(runner, "_Worker", Worker)
    monkeypatch.setattr(runner, "time", SimpleNamespace(sleep=sleep, monotonic=time.monotonic, time=time.time,
                                                        perf_counter=time.perf_counter))
    outcomes = {}
    jobs = [{"method": "grpo", "run_dir": str(tmp_path / "grpo")}]
    try:
        stopped_by = runner._run_jobs(jobs, 1, outcomes, _RecordingProgress(), {"grpo": "grpo"}, tmp_path, steps=4)
    except KeyboardInterrupt as error:  # StoppedAtOnce: also a right answer to two requests
        stopped_by = getattr(error, "signal_number", None)
    assert len(sleeps) >= 2, "the loop never waited after the outcome"
    assert stopped_by == signal.SIGTERM, "the two SIGTERMs received during the last wait were dropped"


# --------------------------------------------------------------------------------------------------------------------
# 4. lab/runner.py _Worker.__init__ now starts workers with SIGTERM ignored (_ignoring_stop_signals), and their handler
#    is installed only once their imports are done (_init_worker). The laboratory's "stop at once" (a second Ctrl-C or
#    SIGTERM) ends workers with process.terminate(), i.e. SIGTERM, which a starting worker now ignores: the stop waits
#    for the worker's imports (3.4 s measured against 0.85 s before the change with `entrorl lab --preset quick
#    --methods grpo,clip_cov` and two Ctrl-C to the group while workers start), up to the 10 s SIGKILL deadline on a
#    slow file system. A worker whose start-up is slow (a module taking 6 s to import) shows it deterministically.
# --------------------------------------------------------------------------------------------------------------------


def test_stopping_at_once_does_not_wait_for_a_starting_worker(tmp_path, monkeypatch):
    import multiprocessing

    from entrorl.lab import runner

    (tmp_path / "slow_start_module.py").write_text(textwrap.dedent("""
        import time
        time.sleep(6)  # a slow import (cold caches, a network file system)

        def run(job):
            return {"method": job["method"], "status": "done"}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import slow_start_module  # noqa: F401  (the parent imports it too: 6 s, before the clock starts)

    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    worker = runner._Worker(context, stop, slow_start_module.run)
    try:
        time.sleep(0.5)  # it is starting: unpickling its target imports the slow module
        started = time.monotonic()
        runner._end_workers([worker], stop, at_once=True)
        took = time.monotonic() - started
    finally:
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
    assert took < 2.0, f"stopping at once took {took:.1f} s: the starting worker ignored the laboratory's SIGTERM"


def test_sigterm_to_the_group_while_a_worker_imports_does_not_count_the_method_as_ran(tmp_path, monkeypatch,
                                                                                      signal_handlers_restored):
    _tiny_preset(monkeypatch, steps=4)
    # a worker's start-up (the interpreter's imports) made slow, so that the signal surely lands while it imports
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys, time
        if "--multiprocessing-fork" in sys.argv:
            time.sleep(4)
    """))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    out = _run_lab_terminating_its_group(tmp_path, after_s=0.5)  # inside its 4 s start-up: no entrorl imported yet
    outcome = json.loads((out / "outcomes.json").read_text())["grpo"]
    assert outcome["status"] == "interrupted", outcome
    assert not (out / "methods" / "grpo" / "metrics.jsonl").exists()  # it never trained a step
    invocation = json.loads((out / "lab.json").read_text())["invocations"][-1]
    assert invocation["ran"] == [], (invocation, outcome)


@pytest.fixture
def own_registry(monkeypatch):
    """Methods registered in the test are forgotten after it."""
    from entrorl.objective import methods

    monkeypatch.setattr(methods, "_METHODS", dict(methods._METHODS))
    monkeypatch.setattr(methods, "_REGISTERED_BY", dict(methods._REGISTERED_BY))


def test_a_method_of_ones_own_named_base_is_refused_since_the_report_names_the_base_model_so(own_registry):
    """A registered method named 'base' would train in methods/base/ and its evaluation would replace the base model's
    in the report (the base row, every forgetting difference, the collapse criterion): refused; 'dapo+base' is another
    name and runs."""
    from entrorl.objective import MethodSpec, register_method

    register_method(MethodSpec(name="base", description="grpo with Clip_B", paper="none", selectors=(("clip_b", {}),)))
    preset = get_preset("quick")
    with pytest.raises(ValueError, match="method 'base': the laboratory's report names the base model 'base'"):
        preset.model_copy(update={"methods": ["grpo", "base"]}).check_methods()
    preset.model_copy(update={"methods": ["dapo+base"]}).check_methods()


def test_a_method_of_ones_own_trains_in_the_laboratorys_workers(tmp_path, monkeypatch, own_registry):
    """A method registered by a module the caller imported trains in the workers (new processes, which import that
    module too), and the report's command to re-run it carries the ``--import``."""
    (tmp_path / "lab_own_method.py").write_text(textwrap.dedent("""
        from entrorl.objective import MethodSpec, register_method
        register_method(MethodSpec(name="own_grpo", description="grpo with Clip_B", paper="none", selectors=(("clip_b", {}),)))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lab_own_method", raising=False)
    import lab_own_method  # noqa: F401

    try:
        _tiny_preset(monkeypatch, steps=1)
        out = tmp_path / "lab"
        run_lab("tiny", methods=["own_grpo", "dapo+own_grpo"], out=out, workers=1, cache_dir=tmp_path / "cache")
        outcomes = json.loads((out / "outcomes.json").read_text())
        assert {name: outcome["status"] for name, outcome in outcomes.items()} == {"own_grpo": "done",
                                                                                   "dapo+own_grpo": "done"}
        assert json.loads((out / "lab.json").read_text())["imports"] == ["lab_own_method"]
        assert "--import lab_own_method" in (out / "report.md").read_text()
    finally:
        sys.modules.pop("lab_own_method", None)


def test_a_method_registered_by_an_interactive_session_is_refused_before_anything_is_built(tmp_path, monkeypatch,
                                                                                             own_registry):
    """The workers cannot run a notebook's code: the laboratory says so up front, and how to make it importable."""
    import types

    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # no __file__: a notebook, python -c
    exec("from entrorl.objective import MethodSpec, register_method\n"
         "register_method(MethodSpec(name='typed_in', description='x', paper='none', selectors=(('clip_b', {}),)))", {"__name__": "__main__"})
    _tiny_preset(monkeypatch)
    with pytest.raises(ValueError, match=r"method 'typed_in' is registered by this interactive session.*--import MODULE"):
        run_lab("tiny", methods=["grpo+typed_in"], out=tmp_path / "lab", workers=1, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "lab").exists() and not (tmp_path / "cache").exists()
    with pytest.raises(ValueError, match=r"--import: cannot import module 'no_such_module_here'"):
        run_lab("tiny", methods=["grpo"], out=tmp_path / "lab", imports=["no_such_module_here"])


def test_the_methods_and_lab_commands_import_modules_of_ones_own(tmp_path, monkeypatch, own_registry):
    """``--import MODULE`` lets ``entrorl methods`` describe, and ``entrorl lab`` run, a method the module registers."""
    from typer.testing import CliRunner

    from entrorl.cli import app

    (tmp_path / "cli_own_method.py").write_text(textwrap.dedent("""
        from entrorl.objective import MethodSpec, register_method
        register_method(MethodSpec(name="cli_own", description="grpo with Clip_B, mine", paper="none",
                                   selectors=(("clip_b", {}),)))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cli_own_method", raising=False)
    try:
        described = CliRunner().invoke(app, ["methods", "cli_own", "--import", "cli_own_method", "--json"])
        assert described.exit_code == 0, described.output
        assert json.loads(described.output)["methods"][0]["description"] == "grpo with Clip_B, mine"
        missing = CliRunner().invoke(app, ["methods", "--import", "no_such_module_here"])
        assert missing.exit_code == 2 and "--import: cannot import module 'no_such_module_here'" in missing.output
        seen = {}
        monkeypatch.setattr("entrorl.lab.runner.run_lab", lambda *a, **k: seen.update(k) or tmp_path)
        CliRunner().invoke(app, ["lab", "--methods", "cli_own", "--import", "cli_own_method", "--out", str(tmp_path)])
        assert seen["imports"] == ["cli_own_method"] and seen["methods"] == ["cli_own"]
    finally:
        sys.modules.pop("cli_own_method", None)


def test_a_worker_ends_on_sigterm_whenever_it_lands_while_the_stop_request_is_read(tmp_path):
    """Once the laboratory asked to stop, a SIGTERM ends a worker that is not training. The worker reads the stop
    request often (between methods, after its warm-up); a ``multiprocessing.Event`` read there holds a lock that the
    signal handler, reading it too, waits on for ever. The worker below does nothing but read it."""
    script = textwrap.dedent("""
        import multiprocessing, signal, sys
        from entrorl.lab import runner
        runner._STOP = runner._StopRequest(multiprocessing.get_context("spawn"))
        runner._STOP.set()
        signal.signal(signal.SIGTERM, runner._terminated_outside_training)
        print("reading", flush=True)
        while True:
            runner._STOP.is_set()
    """)
    for _ in range(3):
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            assert process.stdout.readline().strip() == "reading"
            time.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) == -signal.SIGTERM
        finally:
            process.kill()
            process.wait()


def test_the_workers_import_a_methods_parts_before_the_module_that_registers_it(tmp_path, monkeypatch, own_registry):
    """The module registering a method names parts another module registers: a new process must import that one
    first. A method first typed into a session and then registered by a module is the module's."""
    import types

    from entrorl.lab.runner import _worker_imports
    from entrorl.objective import parts

    monkeypatch.setattr(parts, "_REGISTRY", {kind: dict(registry) for kind, registry in parts._REGISTRY.items()})
    (tmp_path / "own_parts_mod.py").write_text(textwrap.dedent("""
        import torch
        from entrorl.objective import Selector, register_part

        @register_part("own_nothing", description="drops nothing")
        class OwnNothing(Selector):
            def __call__(self, batch, advantages, surrogate, metrics):
                return torch.zeros_like(batch.mask)
    """))
    (tmp_path / "own_method_mod.py").write_text(textwrap.dedent("""
        from entrorl.objective import MethodSpec, register_method
        register_method(MethodSpec(name="own_parts_method", description="x", paper="", selectors=(("own_nothing", {}),)))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # a session: no __file__
    from entrorl.objective import MethodSpec, register_method

    try:
        import own_parts_mod  # noqa: F401

        exec("register_method(spec)", {"__name__": "__main__", "register_method": register_method,
                                       "spec": MethodSpec(name="own_parts_method", description="x", paper="",
                                                          selectors=(("own_nothing", {}),))})
        with pytest.raises(ValueError, match="registered by this interactive session"):
            _worker_imports(["own_parts_method"], [])
        import own_method_mod  # noqa: F401  (the same method, now from a module)

        assert _worker_imports(["grpo+own_parts_method", "sft"], ["extra_mod"]) == ["extra_mod", "own_parts_mod",
                                                                                      "own_method_mod"]
    finally:
        for name in ("own_parts_mod", "own_method_mod"):
            sys.modules.pop(name, None)


def test_the_command_that_continues_earlier_methods_carries_the_folders_imports(tmp_path, monkeypatch):
    """A method of one's own interrupted by an earlier invocation (``--import mine_mod``, in lab.json) is continued
    with a command that imports it."""
    from typer.testing import CliRunner

    from entrorl.cli import app
    from entrorl.lab import runner

    def earlier_folder(preset, *, out, **kwargs):
        out.mkdir(exist_ok=True)
        (out / "lab.json").write_text(json.dumps({"preset": {"name": "quick"}, "methods": ["grpo", "mine"],
                                                  "imports": ["mine_mod"]}))
        (out / "outcomes.json").write_text(json.dumps({"grpo": {"status": "done"}, "mine": {"status": "interrupted"}}))
        return out

    monkeypatch.setattr(runner, "run_lab", earlier_folder)
    result = CliRunner().invoke(app, ["lab", "--preset", "quick", "--methods", "grpo", "--out", str(tmp_path / "lab")])
    assert "continue them with entrorl lab --preset quick --methods mine --out" in " ".join(result.output.split())
    assert "--import mine_mod" in " ".join(result.output.split())


def test_an_unknown_method_of_ones_own_is_told_to_import_its_module(tmp_path):
    for methods in (["mine"], ["dapo+mine"]):
        with pytest.raises(ValueError, match="a method of your own: --import the module that registers it"):
            run_lab("quick", methods=methods, out=tmp_path / "lab")
