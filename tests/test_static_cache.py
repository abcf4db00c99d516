"""The static-cache decoder against the model's own forward: the same logits for prefill and every decode step
(left padding, grouped-query attention, Qwen3's query/key norms, biases), the models it must refuse, and the
sampler giving the same rollouts with either decoder."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from entrorl.rollout import HFSampler, SamplingParams
from entrorl.rollout.static_cache import StaticCacheDecoder, static_cache_unsupported_reason

VOCAB, PAD, EOS = 40, 0, 1
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, eos_token_id=EOS)
CONFIGS = {
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=8),
    "llama_bias": lambda: LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True),
    "mistral_mha": lambda: MistralConfig(**{**COMMON, "num_key_value_heads": 4}, sliding_window=None),
}


def build(name: str, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]()).to(dtype).eval()
    with torch.no_grad():  # random, non-trivial norms and biases so that a dropped term shows
        for param_name, parameter in model.named_parameters():
            if "norm" in param_name or param_name.endswith("bias"):
                parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for index, row in enumerate(rows):
        ids[index, width - len(row):] = torch.tensor(row)
        mask[index, width - len(row):] = True
    return ids, mask


def reference_next_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The model's own forward over the whole (left-padded) sequence: logits at the last position."""
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask.long(), position_ids=positions, use_cache=False).logits[:, -1].float()


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "own-weights"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_and_every_decode_step_equal_the_model_forward(name, fused, monkeypatch):
    """Both layouts of the projections: concatenated copies (small models) and the model's own weights (large ones)."""
    from entrorl.rollout import static_cache

    monkeypatch.setattr(static_cache, "FUSED_PROJECTIONS_MAX_BYTES", static_cache.FUSED_PROJECTIONS_MAX_BYTES if fused else 0)
    model = build(name)
    assert static_cache_unsupported_reason(model, 32) is None
    ids, mask = left_padded(PROMPTS)
    steps = 6
    decoder = StaticCacheDecoder(model, ids, mask, max_new_tokens=steps)
    assert all(len(layer.qkv) == (1 if fused else 3) and len(layer.gate_up) == (1 if fused else 2) for layer in decoder.layers)
    logits = decoder.prefill()
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        expected = reference_next_logits(model, ids, mask)
        torch.testing.assert_close(logits.float(), expected, atol=2e-5, rtol=2e-5, msg=f"{name}, step {step}")
        token = torch.randint(2, VOCAB, (len(PROMPTS),), generator=generator)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones((len(PROMPTS), 1), dtype=torch.bool)], dim=1)
        if step < steps - 1:
            logits = decoder.decode(token)
    decoder.decode(token)  # the last slot of the cache
    with pytest.raises(RuntimeError, match="at most max_new_tokens"):
        decoder.decode(token)


def draw_lora_weights(model) -> None:
    """Both factors of every LoRA adapter drawn at random (peft starts B at zero, which would hide the adapters), each
    parameter from a seed of its own."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(len(name))))


def with_lora(model, *, dropout: float = 0.0, targets="all-linear"):
    """peft's LoRA (on every linear layer but the output, by default), both factors random (B starts at zero)."""
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():  # peft asks transformers through a name it deprecates
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                            target_modules=targets))
    draw_lora_weights(model)
    return wrapped


# adapters of each layer the decoder runs: concatenated projections whose every part is adapted share one
ADAPTERS_PER_LAYER = {("all-linear", True): 4, ("all-linear", False): 7, ("some", True): 3, ("some", False): 3}


@pytest.mark.parametrize("targets", ["all-linear", "some"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "own-weights"])
@pytest.mark.parametrize("name", ["qwen2", "qwen3", "llama_bias"])
def test_lora_layers_run_in_the_decoder_as_in_the_model(name, fused, targets, monkeypatch):
    """A LoRA projection adds scale * B(A(x)) to its base layer's output: to its own columns of a concatenated
    projection (or, when every part has one, all as one block-diagonal adapter), or to its own output; with the
    adapters switched off, the base alone."""
    from entrorl.rollout import static_cache

    monkeypatch.setattr(static_cache, "FUSED_PROJECTIONS_MAX_BYTES", static_cache.FUSED_PROJECTIONS_MAX_BYTES if fused else 0)
    model = build(name)
    base_logits = reference_next_logits(model, *left_padded(PROMPTS))
    wrapped = with_lora(model, targets=targets if targets == "all-linear" else ["q_proj", "v_proj", "up_proj"])
    assert static_cache_unsupported_reason(model, 32) is None
    for adapters_on in (True, False):
        with (contextlib.nullcontext() if adapters_on else wrapped.disable_adapter()):
            ids, mask = left_padded(PROMPTS)
            decoder = StaticCacheDecoder(model, ids, mask, max_new_tokens=3)
            assert sum(len(p.adapters) for layer in decoder.layers for p in (*layer.qkv, *layer.gate_up, layer.output,
                                                                             layer.down)) == (
                2 * ADAPTERS_PER_LAYER[targets, fused] if adapters_on else 0)
            logits = decoder.prefill()
            expected = reference_next_logits(model, ids, mask)
            assert not torch.allclose(expected, base_logits, atol=1e-2) if adapters_on else torch.equal(expected, base_logits)
            for token in (torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8])):
                torch.testing.assert_close(logits.float(), expected, atol=2e-5, rtol=2e-5)
                ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], 1)
                logits, expected = decoder.decode(token), reference_next_logits(model, ids, mask)


def test_lora_on_a_bfloat16_base_and_adapter_dropout():
    """float32 adapters on a bfloat16 base add in float32, as peft does; dropout that acts sends the model back to
    transformers' generate."""
    model = build("qwen2", torch.bfloat16)
    with_lora(model)
    assert {p.dtype for name, p in model.named_parameters() if "lora_" in name} == {torch.float32}
    ids, mask = left_padded(PROMPTS)
    logits = StaticCacheDecoder(model, ids, mask, max_new_tokens=1).prefill()
    torch.testing.assert_close(logits.float(), reference_next_logits(model, ids, mask), atol=0.05, rtol=0.05)
    dropping = build("qwen2")
    with_lora(dropping, dropout=0.1)
    dropping.train()
    assert "neither a plain nn.Linear nor a plain LoRA layer" in static_cache_unsupported_reason(dropping, 32)
    assert static_cache_unsupported_reason(dropping.eval(), 32) is None  # dropout does nothing in eval mode


def test_bfloat16_logits_stay_close_to_the_model_forward():
    model = build("qwen2", torch.bfloat16)
    ids, mask = left_padded(PROMPTS)
    decoder = StaticCacheDecoder(model, ids, mask, max_new_tokens=2)
    logits = decoder.prefill()
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference_next_logits(model, ids, mask), atol=0.05, rtol=0.05)
    token = torch.tensor([3, 4, 5])
    logits = decoder.decode(token)
    ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], 1)
    torch.testing.assert_close(logits.float(), reference_next_logits(model, ids, mask), atol=0.05, rtol=0.05)


def test_decoder_uses_the_weights_it_was_built_with_and_rejects_decode_before_prefill():
    model = build("qwen2")
    ids, mask = left_padded(PROMPTS)
    decoder = StaticCacheDecoder(model, ids, mask, max_new_tokens=2)
    with pytest.raises(RuntimeError, match="prefill"):
        decoder.decode(torch.tensor([2, 2, 2]))
    before = decoder.prefill()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(3.0)
    # a new decoder reads the changed weights: the logits move with them
    after = StaticCacheDecoder(model, ids, mask, max_new_tokens=2).prefill()
    torch.testing.assert_close(after.float(), reference_next_logits(model, ids, mask), atol=2e-5, rtol=2e-5)
    assert not torch.allclose(before, after)


def test_models_the_decoder_cannot_run_are_named_with_the_reason():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64))
    assert "gpt2" in static_cache_unsupported_reason(gpt2, 16)

    windowed = AutoModelForCausalLM.from_config(MistralConfig(**COMMON, sliding_window=8))
    assert "sliding window" in static_cache_unsupported_reason(windowed, 16)
    assert static_cache_unsupported_reason(windowed, 4) is None  # the window never bites on short sequences
    assert "sliding window of 8 < the sequence length 9" in static_cache_unsupported_reason(windowed, 9)

    hooked = build("qwen2")
    hooked.model.layers[1].mlp.register_forward_hook(lambda module, args, output: output * 2)
    assert "hooks" in static_cache_unsupported_reason(hooked, 16)

    dynamic = AutoModelForCausalLM.from_config(Qwen2Config(**COMMON, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                                       "rope_theta": 10000.0}))
    assert "rope" in static_cache_unsupported_reason(dynamic, 16)

    ids, mask = left_padded(PROMPTS)
    with pytest.raises(ValueError, match="gpt2"):
        StaticCacheDecoder(gpt2, ids, mask, max_new_tokens=2)


def test_sampler_decoders_give_the_same_rollouts():
    model = build("qwen3")
    prompts = [row for row in PROMPTS for _ in range(2)]
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=20)
    results = {}
    for decoder in ("static_cache", "transformers"):
        torch.manual_seed(3)
        results[decoder] = HFSampler(model, eos_token_id=EOS, pad_token_id=PAD, decoder=decoder).generate(prompts, params)
    fast, slow = results["static_cache"], results["transformers"]
    assert torch.equal(fast.response_ids, slow.response_ids) and torch.equal(fast.response_mask, slow.response_mask)
    assert torch.equal(fast.lengths, slow.lengths) and torch.equal(fast.truncated, slow.truncated)
    torch.testing.assert_close(fast.sampler_log_probs, slow.sampler_log_probs, atol=1e-5, rtol=1e-5)


def test_sampler_decoder_choice_is_checked():
    with pytest.raises(ValueError, match="unknown decoder"):
        HFSampler(build("qwen2"), eos_token_id=EOS, pad_token_id=PAD, decoder="compiled")
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                                       eos_token_id=EOS, pad_token_id=PAD)).eval()
    params = SamplingParams(max_new_tokens=3)
    with pytest.raises(ValueError, match="decoder='transformers'"):
        HFSampler(gpt2, eos_token_id=EOS, pad_token_id=PAD, decoder="static_cache").generate([[5, 6]], params)
    # "auto" falls back to the model's own forward
    rollouts = HFSampler(gpt2, eos_token_id=EOS, pad_token_id=PAD).generate([[5, 6]], params)
    assert rollouts.response_ids.shape[0] == 1


@pytest.mark.parametrize("name, decoder", [("qwen2", "static_cache"), ("llama_bias", "static_cache"),
                                           ("qwen2", "transformers")])
def test_dropping_finished_rows_leaves_every_sample_unchanged(name, decoder):
    """Compaction (finished rows leave the decoder) gives the same tokens and log-probs as decoding every row to
    the end, for sampled and greedy decoding, and really drops rows on the way."""
    model = build(name)
    eos = list(range(1, 9))  # many end tokens, so that rows finish at many different steps
    prompts = [[5 + i % 7] * (1 + i % 4) + [12 + i % 5, 20 + i % 3] for i in range(24)]  # lengths 3 to 6
    for params in (SamplingParams(max_new_tokens=24, temperature=1.0), SamplingParams(max_new_tokens=24, temperature=0.0)):
        results, batches = {}, {}
        for compact in (True, False):
            sampler = HFSampler(model, eos_token_id=eos, pad_token_id=PAD, decoder=decoder, compact=compact)
            seen = []
            original = sampler._make_decoder

            def recording(*args, original=original, seen=seen):
                inner = original(*args)
                decode = inner.decode
                inner.decode = lambda tokens: (seen.append(tokens.shape[0]), decode(tokens))[1]
                return inner

            sampler._make_decoder = recording
            torch.manual_seed(11)
            results[compact], batches[compact] = sampler.generate(prompts, params), seen
        on, off = results[True], results[False]
        assert torch.equal(on.response_ids, off.response_ids) and torch.equal(on.lengths, off.lengths)
        assert torch.equal(on.response_mask, off.response_mask) and torch.equal(on.truncated, off.truncated)
        torch.testing.assert_close(on.sampler_log_probs, off.sampler_log_probs, atol=1e-5, rtol=1e-5)
        assert set(batches[False]) == {len(prompts)}
        if params.temperature > 0:  # sampled rows end at many different steps: the decoder batch shrinks
            assert min(batches[True]) < len(prompts) and sorted(batches[True], reverse=True) == batches[True]
            assert len(batches[True]) == len(batches[False])


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"alora_invocation_tokens": [5]}], ids=["dora", "alora"])
def test_lora_variants_are_left_to_transformers(variant):
    """DoRA rescales the adapted weight's columns, and activated LoRA adapts only the tokens after its invocation
    sequence: neither is the W x + s B A x the decoder computes."""
    peft = pytest.importorskip("peft")
    model = build("qwen2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], **variant)
        except TypeError:
            pytest.skip(f"this peft has no {next(iter(variant))}")
        peft.get_peft_model(model, config)
    assert "nor a plain LoRA layer" in static_cache_unsupported_reason(model, 32)


@pytest.mark.parametrize("variant", ["bf16-base", "bf16-two-adapters", "lora-bias"])
def test_an_adapted_projection_computes_exactly_what_peft_does(variant):
    """Bit for bit against peft's own module: x cast to the adapters' dtype, their terms added to the base output in
    the promoted dtype, the sum cast back once (with two adapters, not after each)."""
    peft = pytest.importorskip("peft")
    from entrorl.rollout.static_cache import _Linear, _linear_parts

    model = build("qwen2", torch.bfloat16 if variant.startswith("bf16") else torch.float32)
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=variant == "lora-bias")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = peft.get_peft_model(model, peft.LoraConfig(**config))
        if variant == "bf16-two-adapters":
            wrapped.add_adapter("second", peft.LoraConfig(**{**config, "lora_alpha": 3}))
            wrapped.base_model.set_adapter(["default", "second"])
    draw_lora_weights(model)
    attention = model.model.layers[0].self_attn
    hidden = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0)).to(attention.q_proj.weight.dtype)
    with torch.no_grad():
        assert len(_linear_parts(attention.q_proj)[1]) == (2 if variant == "bf16-two-adapters" else 1)
        assert torch.equal(_Linear.of(attention.q_proj)(hidden), attention.q_proj(hidden))
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        # one matrix product for the three: its own summation order, one rounding step of the dtype at most
        step = 2.0 ** -7 if hidden.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(_Linear.concatenated(projections)(hidden),
                                   torch.cat([projection(hidden) for projection in projections], dim=-1),
                                   rtol=step, atol=1e-6)
        # merged into the weights and then switched off: peft takes them back out first, so the module runs itself
        wrapped.merge_adapter()
        with wrapped.disable_adapter():
            assert _linear_parts(attention.q_proj) is None


def test_adapters_merged_into_the_weights_are_not_added_again():
    """After peft merges its adapters into the base weights the module computes the base layer alone: the decoder
    runs the merged weights, with no adapter on top."""
    model = build("qwen2")
    wrapped = with_lora(model)
    ids, mask = left_padded(PROMPTS)
    adapted = reference_next_logits(model, ids, mask)
    wrapped.merge_adapter()
    decoder = StaticCacheDecoder(model, ids, mask, max_new_tokens=1)
    assert not any(p.adapters for layer in decoder.layers for p in (*layer.qkv, *layer.gate_up, layer.output, layer.down))
    torch.testing.assert_close(decoder.prefill().float(), adapted, atol=1e-4, rtol=1e-4)


def test_adapters_of_different_scales_keep_their_own_in_a_concatenated_projection():
    """peft's alpha_pattern gives the key projection's adapter another scale than the query's and value's: the
    concatenated projection must not run them all with one scale."""
    peft = pytest.importorskip("peft")
    model = build("qwen2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, alpha_pattern={"k_proj": 2},
                                                   target_modules=["q_proj", "k_proj", "v_proj"]))
    draw_lora_weights(model)
    attention = model.model.layers[0].self_attn
    assert attention.k_proj.scaling["default"] != attention.q_proj.scaling["default"]
    ids, mask = left_padded(PROMPTS)
    decoder = StaticCacheDecoder(model, ids, mask, max_new_tokens=1)
    assert len(decoder.layers[0].qkv) == 1
    torch.testing.assert_close(decoder.prefill().float(), reference_next_logits(model, ids, mask), atol=2e-5, rtol=2e-5)


def test_adapters_of_different_dtypes_keep_their_own_in_a_concatenated_projection():
    """A bfloat16 adapter on the key projection beside float32 ones on the query and value: peft runs each in its own
    dtype, so the concatenated projection must not stack them into one float32 adapter."""
    peft = pytest.importorskip("peft")
    from entrorl.rollout.static_cache import _Linear

    model = build("qwen2", torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    draw_lora_weights(model)
    attention = model.model.layers[0].self_attn
    attention.k_proj.lora_A["default"].to(torch.bfloat16)
    attention.k_proj.lora_B["default"].to(torch.bfloat16)
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    hidden = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.no_grad():
        concatenated = _Linear.concatenated(projections)
        assert [adapter.down_weight.dtype for adapter in concatenated.adapters] == [torch.float32, torch.bfloat16,
                                                                                   torch.float32]
        torch.testing.assert_close(concatenated(hidden), torch.cat([projection(hidden) for projection in projections], -1),
                                   rtol=2.0 ** -7, atol=1e-6)


def test_projections_are_concatenated_while_the_copy_is_at_most_the_byte_limit(monkeypatch):
    """The limit counts the bytes of the query/key/value and gate/up weights a concatenation copies, in their dtype."""
    from entrorl.rollout import static_cache

    model = build("qwen2", torch.bfloat16)
    copied = sum(2 * module.weight.numel() for layer in model.model.layers
                 for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                                layer.mlp.gate_proj, layer.mlp.up_proj))
    ids, mask = left_padded(PROMPTS)
    for limit, layout in ((copied, 1), (copied - 1, 3)):
        monkeypatch.setattr(static_cache, "FUSED_PROJECTIONS_MAX_BYTES", limit)
        assert len(StaticCacheDecoder(model, ids, mask, max_new_tokens=1).layers[0].qkv) == layout


def test_a_forward_pre_hook_is_refused_like_a_forward_hook():
    """A pre-hook may rewrite a module's input (offloading, quantisation): the decoder, which never calls the
    module, would skip it. So may accelerate's hook, which replaces the module's forward (``_hf_hook``) rather than
    registering a torch hook."""
    hooked = build("qwen2")
    hooked.model.layers[0].self_attn.register_forward_pre_hook(lambda module, args: None)
    assert "hooks" in static_cache_unsupported_reason(hooked, 16)
    offloaded = build("qwen2")
    offloaded.model.layers[1].mlp.down_proj._hf_hook = object()
    assert static_cache_unsupported_reason(offloaded, 16) == (
        "module model.layers.1.mlp.down_proj has forward hooks (adapter, quantisation or offloading)")


def test_rms_norm_in_bfloat16_rounds_as_the_models_own():
    """Normalised in float32, cast back to bfloat16, and only then scaled by the weight: bit for bit the model's
    RMSNorm."""
    from entrorl.rollout.static_cache import _rms_norm

    model = build("qwen3", torch.bfloat16)
    hidden = (3 * torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(_rms_norm(hidden, model.model.norm), model.model.norm(hidden))
        heads = hidden.view(4, 7, 4, 8)
        norm = model.model.layers[0].self_attn.k_norm
        assert torch.equal(_rms_norm(heads, norm), norm(heads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_uses_the_model_s_own_epsilon(dtype):
    """A large epsilon (Llama-2 uses 1e-5, Qwen 1e-6) changes the normalised values: the decoder takes the norm's."""
    from entrorl.rollout.static_cache import _rms_norm

    norm = build("qwen2", dtype).model.norm
    norm.variance_epsilon = 0.5
    hidden = (0.5 * torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(_rms_norm(hidden, norm), norm(hidden), atol=1e-6, rtol=1e-6)


def test_a_sliding_window_as_long_as_the_cache_masks_nothing_and_is_accepted():
    """transformers' window keeps the keys fewer than ``window`` positions back: with ``window`` = prompt + new tokens
    nothing is ever masked, so the decoder runs the model and gives its logits at every step, the last included."""
    model = AutoModelForCausalLM.from_config(MistralConfig(**COMMON, sliding_window=8)).eval()
    ids, mask = left_padded([[5, 6, 7, 8, 9], [10, 11, 12]])
    steps = 8 - ids.shape[1]
    assert static_cache_unsupported_reason(model, ids.shape[1] + steps) is None
    decoder = StaticCacheDecoder(model, ids, mask, max_new_tokens=steps)
    logits = decoder.prefill()
    for step in range(steps + 1):
        torch.testing.assert_close(logits.float(), reference_next_logits(model, ids, mask), atol=2e-5, rtol=2e-5)
        if step == steps:
            break
        token = torch.tensor([3 + step, 20 + step])
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1)
        logits = decoder.decode(token)
    # one more new token and the window would bite on the last one: the decoder refuses the batch
    ids, mask = left_padded([[5, 6, 7, 8, 9], [10, 11, 12]])
    with pytest.raises(ValueError, match="sliding window of 8 < the sequence length 9"):
        StaticCacheDecoder(model, ids, mask, max_new_tokens=steps + 1)


def test_the_default_decoder_falls_back_to_the_models_forward_when_the_new_tokens_would_pass_the_window():
    """The window is checked against prompt + max_new_tokens, not the prompt alone: 5 + 3 tokens fit a window of 8 and
    run on the static cache, 5 + 4 do not and run on the model's own forward (which applies the window)."""
    from entrorl.rollout.sampler import _TransformersDecoder

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MistralConfig(**COMMON, sliding_window=8)).eval()
    ids, mask = left_padded([[5, 6, 7, 8, 9], [10, 11, 12]])
    sampler = HFSampler(model, eos_token_id=EOS, pad_token_id=PAD)
    assert type(sampler._make_decoder(ids, mask, 3)) is StaticCacheDecoder
    assert type(sampler._make_decoder(ids, mask, 4)) is _TransformersDecoder
    rollouts = sampler.generate([[5, 6, 7, 8, 9], [10, 11, 12]], SamplingParams(max_new_tokens=4, temperature=0.0))
    assert len(rollouts) == 2 and rollouts.response_ids.shape[1] <= 4


ROPE_VARIANTS = {
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
}


@pytest.mark.parametrize("rope", sorted(ROPE_VARIANTS))
def test_rope_variants_that_do_not_depend_on_the_length_run_as_in_the_model(rope):
    """YaRN scales cos and sin by its attention factor (about 1.14 at factor 4), Llama 3 and linear scaling change the
    frequencies: the decoder takes the model's own rotary tables, so its logits stay the model's at every step."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**COMMON, rope_parameters=ROPE_VARIANTS[rope])).eval()
    if rope == "yarn":
        assert model.model.rotary_emb.attention_scaling > 1.1
    ids, mask = left_padded(PROMPTS)
    assert static_cache_unsupported_reason(model, ids.shape[1] + 3) is None
    decoder = StaticCacheDecoder(model, ids, mask, max_new_tokens=3)
    logits = decoder.prefill()
    for token in (torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8]), None):
        torch.testing.assert_close(logits.float(), reference_next_logits(model, ids, mask), atol=2e-5, rtol=2e-5)
        if token is None:
            break
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], 1)
        logits = decoder.decode(token)


def test_a_window_named_in_the_config_but_used_by_no_layer_does_not_refuse_the_model():
    """Qwen2 with use_sliding_window and max_window_layers = every layer runs full attention in all of them: the
    window of 4 in its config masks nothing, so the decoder runs the model past 4 tokens and gives its logits. With
    the second layer windowed, that layer is named."""
    config = dict(**COMMON, use_sliding_window=True, sliding_window=4)
    torch.manual_seed(0)
    full = AutoModelForCausalLM.from_config(Qwen2Config(**config, max_window_layers=2)).eval()
    assert full.config.sliding_window == 4 and set(full.config.layer_types) == {"full_attention"}
    ids, mask = left_padded(PROMPTS)
    assert static_cache_unsupported_reason(full, ids.shape[1] + 2) is None
    decoder = StaticCacheDecoder(full, ids, mask, max_new_tokens=2)
    torch.testing.assert_close(decoder.prefill().float(), reference_next_logits(full, ids, mask), atol=2e-5, rtol=2e-5)
    token = torch.tensor([3, 4, 5])
    logits = decoder.decode(token)
    ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], 1)
    torch.testing.assert_close(logits.float(), reference_next_logits(full, ids, mask), atol=2e-5, rtol=2e-5)
    windowed = AutoModelForCausalLM.from_config(Qwen2Config(**config, max_window_layers=1)).eval()
    assert static_cache_unsupported_reason(windowed, 9) == "layer 1 has a sliding window of 4 < the sequence length 9"


def test_a_gemma_model_is_left_to_its_own_forward():
    """Gemma scales its embeddings by sqrt(hidden) and its norms by 1 + weight: not the Llama layer the decoder runs."""
    from transformers import GemmaConfig

    from entrorl.rollout.sampler import _TransformersDecoder

    gemma = AutoModelForCausalLM.from_config(GemmaConfig(**COMMON, head_dim=8)).eval()
    assert "model type 'gemma' is not one of" in static_cache_unsupported_reason(gemma, 16)
    ids, mask = left_padded(PROMPTS)
    assert type(HFSampler(gemma, eos_token_id=EOS, pad_token_id=PAD)._make_decoder(ids, mask, 2)) is _TransformersDecoder


class _DoublingLinear(torch.nn.Linear):
    """A subclass of nn.Linear whose forward is not ``W x + b`` (as a quantised layer's is not)."""

    def forward(self, hidden):
        return 2 * super().forward(hidden)


class _DoublingEmbedding(torch.nn.Embedding):
    def forward(self, ids):
        return 2 * super().forward(ids)


def _doubling(linear: torch.nn.Linear) -> _DoublingLinear:
    replacement = _DoublingLinear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    replacement.load_state_dict(linear.state_dict())
    return replacement


def test_subclasses_of_linear_and_embedding_are_refused_as_projections_lora_base_layers_and_embeddings():
    """The decoder computes ``W x + b`` and the embedding lookup from the weights and never calls the modules: a
    subclass of nn.Linear or nn.Embedding (a quantised layer, a custom forward) must send the model to its own
    forward, whether it is a projection, the base layer under a LoRA adapter or the token embedding."""
    plain = build("qwen2")
    plain.model.layers[1].mlp.down_proj = _doubling(plain.model.layers[1].mlp.down_proj)
    assert "layer 1 has a projection that is neither" in static_cache_unsupported_reason(plain, 16)
    adapted = build("qwen2")
    with_lora(adapted, targets=["q_proj"])
    query = adapted.model.layers[0].self_attn.q_proj
    query.base_layer = _doubling(query.base_layer)
    assert "layer 0 has a projection that is neither" in static_cache_unsupported_reason(adapted, 16)
    scaled = build("qwen2")  # an embedding whose forward is not the lookup (Gemma 3 scales it, for one)
    scaled.model.embed_tokens = _DoublingEmbedding(VOCAB, 32)
    assert "not laid out as model.embed_tokens" in static_cache_unsupported_reason(scaled, 16)


def test_an_active_adapter_that_skips_a_projection_leaves_the_others_on_the_static_cache():
    """Two active adapters, the second on the value projection only: the query projection holds only the first, and
    the decoder still runs the model, with both adapters where they are, as the model's forward does."""
    peft = pytest.importorskip("peft")
    model = build("qwen2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        wrapped.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["v_proj"]))
        wrapped.base_model.set_adapter(["default", "second"])
    draw_lora_weights(model)
    attention = model.model.layers[0].self_attn
    assert "second" not in attention.q_proj.lora_A and "second" in attention.v_proj.lora_A
    assert static_cache_unsupported_reason(model, 32) is None
    ids, mask = left_padded(PROMPTS)
    torch.testing.assert_close(StaticCacheDecoder(model, ids, mask, max_new_tokens=1).prefill().float(),
                               reference_next_logits(model, ids, mask), atol=2e-5, rtol=2e-5)


def test_the_prefill_mask_lets_every_query_attend_and_a_padding_query_only_itself():
    """A padding query whose every key were masked would leave attention an all -inf row (NaN, or whatever a kernel
    makes of it, in the cache): it attends to itself alone, and every real query to the real tokens up to it."""
    ids, mask = left_padded(PROMPTS)
    decoder = StaticCacheDecoder(build("qwen2"), ids, mask, max_new_tokens=1)
    allowed = decoder.prefill_mask[:, 0]
    width = ids.shape[1]
    assert allowed.shape == (len(PROMPTS), width, width) and bool(allowed.any(dim=-1).all())
    for row in range(len(PROMPTS)):
        for query in range(width):
            expected = [key == query if not mask[row, query] else bool(mask[row, key]) and key <= query
                        for key in range(width)]
            assert allowed[row, query].tolist() == expected, (row, query)
