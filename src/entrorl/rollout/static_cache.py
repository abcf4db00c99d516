"""A lean prefill + decode loop for Llama-family decoders, with a preallocated KV cache.

``transformers``' own forward pays a fixed cost per call (output dataclasses, mask construction, a growing
``DynamicCache``, per-module hooks) that dwarfs the arithmetic of a small model decoding one token per row.
:class:`StaticCacheDecoder` runs the same computation straight from the model's own parameters: one
prefill over the left-padded prompts, then one call per new token that writes its keys and values into
a cache allocated once for the whole response. The logits equal the model's own (float rounding aside), and the
weights are read at every call, so the decoder always sees the current policy.

Only architectures whose layer is exactly "RMSNorm → attention with RoPE → residual → RMSNorm → gated MLP →
residual" qualify (:data:`STATIC_CACHE_MODEL_TYPES`), with plain ``nn.Linear`` / ``nn.Embedding`` modules (or, for
the projections, peft's LoRA layers around a plain ``nn.Linear``: ``W x + b + s * B A x``, arXiv 2106.09685), no
hooks (quantisation, offloading), a RoPE that does not depend on the sequence length, and no sliding window shorter
than the sequence; :func:`static_cache_unsupported_reason` says why a model does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from entrorl.modeling import length_dependent_rope

__all__ = ["FUSED_PROJECTIONS_MAX_BYTES", "STATIC_CACHE_MODEL_TYPES", "StaticCacheDecoder", "static_cache_unsupported_reason"]

# model types whose decoder layer is the Llama one (Qwen3 adds a per-head RMSNorm on queries and keys)
STATIC_CACHE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def static_cache_unsupported_reason(model: torch.nn.Module, total_length: int) -> str | None:
    """Why :class:`StaticCacheDecoder` cannot run ``model`` on sequences of ``total_length`` tokens, or None if it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in STATIC_CACHE_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {sorted(STATIC_CACHE_MODEL_TYPES)}"
    inner = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    if inner is None or type(head) is not torch.nn.Linear or type(getattr(inner, "embed_tokens", None)) is not torch.nn.Embedding:
        return "the model is not laid out as model.embed_tokens / model.layers / model.norm / lm_head"
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"):
            return f"module {name or 'model'} has forward hooks (adapter, quantisation or offloading)"
    rope = length_dependent_rope(model)  # its result depends on how a sequence is split into calls
    if rope is not None:
        return f"rope type {rope[0]!r} depends on the sequence length"
    for index, layer in enumerate(inner.layers):
        attention, mlp = layer.self_attn, layer.mlp
        projections = [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                       mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if any(_linear_parts(projection) is None for projection in projections):
            return f"layer {index} has a projection that is neither a plain nn.Linear nor a plain LoRA layer around one"
        window = getattr(attention, "sliding_window", getattr(config, "sliding_window", None))
        # a query attends to keys fewer than `window` positions back: a window of total_length never masks anything
        if window is not None and window < total_length:
            return f"layer {index} has a sliding window of {window} < the sequence length {total_length}"
    return None


def _linear_parts(module: torch.nn.Module) -> tuple[torch.nn.Linear, tuple[tuple[torch.nn.Linear, torch.nn.Linear, float], ...]] | None:
    """The plain ``nn.Linear`` a projection computes and the LoRA adapters ``(A, B, scale)`` whose ``scale * B(A(x))``
    it adds to the output (peft's LoRA layer: ``base_layer``, ``lora_A`` / ``lora_B`` / ``scaling`` per adapter); None
    for anything else, a LoRA variant (DoRA, ...) or dropout that acts included."""
    if type(module) is torch.nn.Linear:
        return module, ()
    base = getattr(module, "base_layer", None)
    if type(base) is not torch.nn.Linear or not all(hasattr(module, name) for name in ("lora_A", "lora_B", "scaling")):
        return None
    disabled, merged = getattr(module, "disable_adapters", False), getattr(module, "merged", False)
    if disabled and merged:  # peft takes the adapters back out of the weight first: left to the module itself
        return None
    if disabled or merged:
        return base, ()  # the base layer alone is what the module computes then
    adapters = []
    for name in getattr(module, "active_adapters", ()):
        if name not in module.lora_A:
            continue
        dropout = module.lora_dropout[name] if name in getattr(module, "lora_dropout", {}) else torch.nn.Identity()
        acts = isinstance(dropout, torch.nn.Dropout) and dropout.training and dropout.p > 0
        variant = name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False)
        if variant or acts or not isinstance(dropout, torch.nn.Identity | torch.nn.Dropout):
            return None
        down, up = module.lora_A[name], module.lora_B[name]
        if type(down) is not torch.nn.Linear or type(up) is not torch.nn.Linear:
            return None
        adapters.append((down, up, float(module.scaling[name])))
    return base, tuple(adapters)


@dataclass(frozen=True)
class _Adapter:
    """``scale * B(A(x))`` added to the output's ``columns`` (all of them, or its projection's own within a
    concatenated one)."""

    down_weight: torch.Tensor
    down_bias: torch.Tensor | None
    up_weight: torch.Tensor
    up_bias: torch.Tensor | None
    scale: float
    columns: slice = field(default_factory=lambda: slice(None))

    @classmethod
    def of(cls, down: torch.nn.Linear, up: torch.nn.Linear, scale: float, columns: slice | None = None) -> "_Adapter":
        return cls(down.weight, down.bias, up.weight, up.bias, scale, slice(None) if columns is None else columns)

    @classmethod
    def block_diagonal(cls, adapters: list[tuple[torch.nn.Linear, torch.nn.Linear]], scale: float) -> "_Adapter":
        """The adapters of concatenated projections as one (same scale): their ``A`` stacked, their ``B`` on a block
        diagonal, so that two matrix products serve them all."""
        up = torch.block_diag(*[up.weight for _, up in adapters])
        down_bias = up_bias = None
        if any(down.bias is not None for down, _ in adapters):
            down_bias = torch.cat([down.bias if down.bias is not None else down.weight.new_zeros(down.out_features)
                                   for down, _ in adapters])
        if any(up.bias is not None for _, up in adapters):
            up_bias = torch.cat([up.bias if up.bias is not None else up.weight.new_zeros(up.out_features)
                                 for _, up in adapters])
        return cls(torch.cat([down.weight for down, _ in adapters]), down_bias, up, up_bias, scale)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """``scale * B(A(x))``, with ``x`` in the adapter's own dtype (as peft)."""
        down = F.linear(hidden.to(self.down_weight.dtype), self.down_weight, self.down_bias)
        return F.linear(down, self.up_weight, self.up_bias) * self.scale


@dataclass(frozen=True)
class _Linear:
    """One projection: a weight and bias, and the LoRA adapters adding to its output."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    adapters: tuple[_Adapter, ...] = ()

    @classmethod
    def of(cls, module: torch.nn.Module) -> "_Linear":
        base, adapters = _linear_parts(module)
        return cls(base.weight, base.bias, tuple(_Adapter.of(down, up, scale) for down, up, scale in adapters))

    @classmethod
    def concatenated(cls, modules) -> "_Linear":
        """The modules' projections as one, their weights (and biases) concatenated; their adapters as one when each
        has one of the same scale and type, else each adding to its projection's columns."""
        parts = [_linear_parts(module) for module in modules]
        bias = None
        if any(base.bias is not None for base, _ in parts):
            bias = torch.cat([base.bias if base.bias is not None else base.weight.new_zeros(base.out_features)
                              for base, _ in parts])
        weight = torch.cat([base.weight for base, _ in parts])
        singles = [own[0] for _, own in parts if len(own) == 1]
        if len(singles) == len(parts) and len({(scale, down.weight.dtype, up.weight.dtype) for down, up, scale in singles}) == 1:
            return cls(weight, bias, (_Adapter.block_diagonal([(down, up) for down, up, _ in singles], singles[0][2]),))
        adapters, start = [], 0
        for base, own in parts:
            adapters += [_Adapter.of(down, up, scale, slice(start, start + base.out_features)) for down, up, scale in own]
            start += base.out_features
        return cls(weight, bias, tuple(adapters))

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        output = F.linear(hidden, self.weight, self.bias)
        if not self.adapters:
            return output
        # as peft: a projection's adapters are added in the promoted dtype, and the sum is cast back once
        sums: dict[tuple[int | None, int | None], torch.Tensor] = {}
        for adapter in self.adapters:
            columns = (adapter.columns.start, adapter.columns.stop)
            sums[columns] = sums.get(columns, output[..., adapter.columns]) + adapter(hidden)
        for (start, stop), summed in sums.items():
            output[..., start:stop] = summed.to(output.dtype)
        return output


def _rms_norm(hidden: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """The model's RMSNorm: normalise in float32, cast back, then scale by the weight."""
    if hidden.dtype == torch.float32:
        return F.rms_norm(hidden, norm.weight.shape, norm.weight, norm.variance_epsilon)
    normed = F.rms_norm(hidden.float(), norm.weight.shape, None, norm.variance_epsilon)
    return norm.weight * normed.to(hidden.dtype)


def _rotate(states: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``[..., D]``: ``x * cos + rotate_half(x) * sin``, with ``rotate_half(x) * sin`` written as
    ``roll(x, D/2) * signed_sin`` (``signed_sin`` has its first half negated)."""
    return torch.addcmul(states * cos, states.roll(states.shape[-1] // 2, dims=-1), signed_sin)


# Concatenating a layer's query/key/value and gate/up weights saves matmul calls, which is what a small model's
# decode step costs; on a large model it would copy most of the weights for little gain, so above this many bytes
# of copies the projections run one by one on the model's own weights.
FUSED_PROJECTIONS_MAX_BYTES = 256 * 2**20


@dataclass(frozen=True)
class _LayerWeights:
    """One decoder layer's parameters; the query/key/value and the gate/up projections are each either one
    concatenated projection or the model's own ones."""

    input_norm: torch.nn.Module
    qkv: tuple[_Linear, ...]
    query_norm: torch.nn.Module | None
    key_norm: torch.nn.Module | None
    output: _Linear
    post_attention_norm: torch.nn.Module
    gate_up: tuple[_Linear, ...]
    activation: object
    down: _Linear

    @classmethod
    def of(cls, layer, *, fuse: bool) -> "_LayerWeights":
        attention, mlp = layer.self_attn, layer.mlp

        def projections(modules) -> tuple[_Linear, ...]:
            return (_Linear.concatenated(modules),) if fuse else tuple(_Linear.of(module) for module in modules)

        return cls(
            input_norm=layer.input_layernorm,
            qkv=projections((attention.q_proj, attention.k_proj, attention.v_proj)),
            query_norm=getattr(attention, "q_norm", None),
            key_norm=getattr(attention, "k_norm", None),
            output=_Linear.of(attention.o_proj),
            post_attention_norm=layer.post_attention_layernorm,
            gate_up=projections((mlp.gate_proj, mlp.up_proj)),
            activation=mlp.act_fn,
            down=_Linear.of(mlp.down_proj),
        )


def _project(hidden: torch.Tensor, projections: tuple[_Linear, ...]) -> torch.Tensor:
    """``hidden`` through one concatenated projection, or through each and joined on the last dimension."""
    if len(projections) == 1:
        return projections[0](hidden)
    return torch.cat([projection(hidden) for projection in projections], dim=-1)


def _fused_copy_bytes(model) -> int:
    """The bytes that concatenating every layer's query/key/value and gate/up weights would copy."""
    total = 0
    for layer in model.model.layers:
        for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj, layer.mlp.up_proj):
            weight = _linear_parts(module)[0].weight
            total += weight.numel() * weight.element_size()
    return total


class StaticCacheDecoder:
    """Prefill and per-token decode for one batch of left-padded prompts, over a preallocated KV cache.

    Args:
        model: a causal LM accepted by :func:`static_cache_unsupported_reason`.
        prompt_ids: ``[B, P]`` left-padded prompt token ids.
        prompt_mask: ``[B, P]`` bool, True on prompt tokens.
        max_new_tokens: how many tokens :meth:`decode` may be called with (the cache holds ``P + max_new_tokens``).

    Call :meth:`prefill` once, then :meth:`decode` with each sampled token; both return the next token's
    ``[B, V]`` logits in the model's dtype. Positions follow the prompt mask (the first prompt token of every row
    is position 0), as in the model's forward with ``position_ids = cumsum(mask) - 1``. On a small model the
    query/key/value and gate/up weights are concatenated once, here (a copy that lives as long as the decoder, at
    most :data:`FUSED_PROJECTIONS_MAX_BYTES`; larger models run those projections on their own weights), so a
    decoder serves one batch: build a new one after the model's weights change.
    """

    def __init__(self, model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int):
        reason = static_cache_unsupported_reason(model, prompt_ids.shape[1] + max_new_tokens)
        if reason is not None:
            raise ValueError(f"StaticCacheDecoder cannot run this model: {reason}")
        config = model.config
        self.inner = model.model
        self.head = model.lm_head
        fuse = _fused_copy_bytes(model) <= FUSED_PROJECTIONS_MAX_BYTES
        with torch.no_grad():
            self.layers = [_LayerWeights.of(layer, fuse=fuse) for layer in self.inner.layers]
        first = self.inner.layers[0].self_attn
        self.head_dim = first.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = first.scaling
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens

        batch, prompt_width = prompt_ids.shape
        total = prompt_width + max_new_tokens
        device, weight = prompt_ids.device, self.head.weight
        # [B * kv_heads, P + max_new_tokens, D]: one matrix per (row, KV head), as batched matmuls want them
        self.keys = [weight.new_zeros(batch * self.num_kv_heads, total, self.head_dim) for _ in self.layers]
        self.values = [weight.new_zeros(batch * self.num_kv_heads, total, self.head_dim) for _ in self.layers]
        key_mask = torch.cat([prompt_mask.bool(), prompt_mask.new_ones((batch, max_new_tokens), dtype=torch.bool)], dim=1)
        # decode: 0 where a key may be attended to (the prompt's real tokens, then every generated slot), -inf elsewhere
        self.decode_bias = torch.zeros(key_mask.shape, dtype=weight.dtype, device=device).masked_fill(~key_mask, float("-inf"))
        self.decode_bias = self.decode_bias.repeat_interleave(self.num_kv_heads, dim=0)[:, None, :]
        self.filled = 0

        prompt_positions = (prompt_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
        decode_positions = prompt_positions[:, -1:] + 1 + torch.arange(max_new_tokens, device=device)
        cos_table, sin_table = self.inner.rotary_emb(weight, torch.arange(total, device=device)[None, :])
        cos_table, sin_table = cos_table[0], sin_table[0]
        half = self.head_dim // 2
        sign = torch.ones(self.head_dim, dtype=sin_table.dtype, device=device)
        sign[:half] = -1
        signed_sin_table = sin_table * sign
        # [B, T, 1, D] for the prefill; [max_new_tokens, B, 1, 1, D] so that step t reads one contiguous block
        self.prefill_rope = (cos_table[prompt_positions][:, :, None], signed_sin_table[prompt_positions][:, :, None])
        self.decode_cos = cos_table[decode_positions].transpose(0, 1)[:, :, None, None].contiguous()
        self.decode_sin = signed_sin_table[decode_positions].transpose(0, 1)[:, :, None, None].contiguous()

        # causal and padding mask of the prefill; a padding query attends to itself so that no row is all -inf
        causal = torch.ones(prompt_width, prompt_width, dtype=torch.bool, device=device).tril()
        diagonal = torch.eye(prompt_width, dtype=torch.bool, device=device)
        self.prefill_mask = (causal & (prompt_mask.bool()[:, None, :] | diagonal))[:, None]

    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        """Run the prompts through the model, fill the cache; the logits of the first response token."""
        hidden = self.inner.embed_tokens(self.prompt_ids)
        batch, length, _ = hidden.shape
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        cos, signed_sin = self.prefill_rope
        for index, layer in enumerate(self.layers):
            query, key, value = self._query_key_value(layer, hidden, cos, signed_sin)
            self._store(index, key, value)
            attended = F.scaled_dot_product_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=self.prefill_mask,
                scale=self.scaling, enable_gqa=heads != kv_heads,
            )
            hidden = self._finish_layer(layer, hidden, attended.transpose(1, 2).reshape(batch, length, heads * head_dim))
        self.filled = length
        return self._logits(hidden[:, -1])

    def select(self, rows: torch.Tensor) -> bool:
        """Keep only ``rows`` of the batch: their cache entries, masks and positions (always possible here)."""
        kv_heads = self.num_kv_heads

        def rows_of(tensor: torch.Tensor) -> torch.Tensor:  # [B * kv_heads, ...] -> [len(rows) * kv_heads, ...]
            return tensor.view(-1, kv_heads, *tensor.shape[1:])[rows].reshape(-1, *tensor.shape[1:])

        self.keys = [rows_of(keys) for keys in self.keys]
        self.values = [rows_of(values) for values in self.values]
        self.decode_bias = rows_of(self.decode_bias)
        self.decode_cos, self.decode_sin = self.decode_cos[:, rows], self.decode_sin[:, rows]
        self.prompt_ids = self.prompt_ids[rows]
        return True

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``[B]``); the logits of the next one."""
        step = self.filled - self.prompt_ids.shape[1]
        if self.filled == 0 or step >= self.max_new_tokens:
            raise RuntimeError(f"decode() called at step {step}: call prefill() first, and at most max_new_tokens times")
        hidden = F.embedding(tokens[:, None], self.inner.embed_tokens.weight)
        batch = hidden.shape[0]
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        cos, signed_sin = self.decode_cos[step], self.decode_sin[step]
        end = self.filled + 1
        bias = self.decode_bias[:, :, :end]
        for index, layer in enumerate(self.layers):
            query, key, value = self._query_key_value(layer, hidden, cos, signed_sin)
            self._store(index, key, value)
            # the query heads sharing a KV head become that head's query rows: one small matmul per (row, KV head)
            grouped = query.reshape(batch * kv_heads, heads // kv_heads, head_dim)
            scores = torch.baddbmm(bias, grouped, self.keys[index][:, :end].transpose(1, 2), alpha=self.scaling)
            weights = scores.softmax(dim=-1, dtype=torch.float32).to(scores.dtype)
            attended = torch.bmm(weights, self.values[index][:, :end]).view(batch, 1, heads * head_dim)
            hidden = self._finish_layer(layer, hidden, attended)
        self.filled = end
        return self._logits(hidden[:, -1])

    def _query_key_value(self, layer: _LayerWeights, hidden: torch.Tensor, cos, signed_sin):
        """Queries ``[B, T, H, D]``, keys and values ``[B, T, H_kv, D]``, RoPE applied."""
        batch, length, _ = hidden.shape
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = _project(_rms_norm(hidden, layer.input_norm), layer.qkv)
        qkv = qkv.view(batch, length, heads + 2 * kv_heads, self.head_dim)
        if layer.query_norm is not None:
            query_key = torch.cat([_rms_norm(qkv[:, :, :heads], layer.query_norm),
                                   _rms_norm(qkv[:, :, heads : heads + kv_heads], layer.key_norm)], dim=2)
        else:
            query_key = qkv[:, :, : heads + kv_heads]
        query_key = _rotate(query_key, cos, signed_sin)
        return query_key[:, :, :heads], query_key[:, :, heads:], qkv[:, :, heads + kv_heads :]

    def _store(self, index: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write ``[B, T, H_kv, D]`` keys and values into the cache slots after the filled ones."""
        batch, length = key.shape[:2]
        start = self.filled
        for cache, states in ((self.keys[index], key), (self.values[index], value)):
            cache.view(batch, self.num_kv_heads, -1, self.head_dim)[:, :, start : start + length] = states.transpose(1, 2)

    @staticmethod
    def _finish_layer(layer: _LayerWeights, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Attention output projection and residual, then the gated MLP and its residual."""
        hidden = hidden + layer.output(attended)
        gate, up = _project(_rms_norm(hidden, layer.post_attention_norm), layer.gate_up).chunk(2, dim=-1)
        return hidden + layer.down(layer.activation(gate) * up)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(_rms_norm(hidden, self.inner.norm), self.head.weight, self.head.bias)
