"""Per-token statistics of a policy, from one chunked pass over the logits.

For every response position with distribution ``p = softmax(z / T)`` and sampled token ``y``:

* ``logprob``        ``log p_y``
* ``entropy``        ``H = -sum_v p_v log p_v``                       (full vocabulary)
* ``disc``           ``S = p_y (log p_y + H)``                        entropy discriminator, arXiv 2602.03392
* ``disc_centered``  ``D = S - sum_v p_v^2 (log p_v + H)``            = S - E_{v~p}[S_v], same paper, Thm 3.3

``logprob`` and ``entropy`` are differentiable; ``disc`` and ``disc_centered`` are selection statistics
and carry no gradient. All statistics are float32 whatever the dtype of the logits (float64 logits,
used for exact checks, give float64).

Memory: the logits are read a chunk of rows at a time (about 4M elements: 131 rows at V = 32 000, 27 at
V = 152 064), in place even when they are a slice no view can flatten (``logits[:, :-1]``), and the
backward pass recomputes each chunk from the saved logits, so neither direction holds another
``[N, V]`` tensor beside the logits and their gradient. :func:`token_stats_from_hidden` goes further and
never builds the logits at all: each chunk is ``hidden @ W^T`` computed, used and discarded.

Numerics: each row is shifted by its maximum, so logits of any magnitude (``±1e4``) are safe, and
entries equal to ``-inf`` (top-k / top-p filtered vocabularies) have probability exactly 0 and
contribute nothing to any sum. A row whose every entry is ``-inf`` yields zeros. A ``+inf`` or NaN logit
describes no distribution: its row's statistics are NaN (or ``-inf`` log-probs), never a made-up number.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from entrorl._checks import as_bool_mask, check_int

__all__ = ["MIN_TEMPERATURE", "STAT_NAMES", "TokenStats", "token_stats", "token_stats_from_hidden", "default_chunk_size"]

STAT_NAMES = ("logprob", "entropy", "disc", "disc_centered")
# the smallest temperature tokens are scored at: the logits' scale 1 / T and the gradients it multiplies stay float32
# numbers (with room for a loss weight below 1e4)
MIN_TEMPERATURE = 1.0e4 / float(torch.finfo(torch.float32).max)

# Shifted logits are clamped here before use: exp(-1e4) is exactly 0 in float32 and float64, so the
# clamp changes no probability but keeps 0 * (-inf) out of every sum.
_LOGIT_FLOOR = -1.0e4
# below this 1 / temperature, |d loss / d H| * (1 / T) * 1e4 stays far inside float32 for any loss's weights
_SCALE_THAT_CAN_OVERFLOW = 1.0e20
# About 16 MiB of float32 per temporary per chunk: small next to any logits worth chunking.
_CHUNK_ELEMENTS = 1 << 22


@dataclass
class TokenStats:
    """The statistics of :func:`token_stats`, each shaped like ``targets`` (float32), or ``None`` if not asked for."""

    logprob: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    disc: torch.Tensor | None = None
    disc_centered: torch.Tensor | None = None

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {name: value for name in STAT_NAMES if (value := getattr(self, name)) is not None}


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk so that one float32 chunk holds about 4M elements (at least one row)."""
    return max(1, _CHUNK_ELEMENTS // max(1, vocab_size))


def _validate_need(need: Iterable[str]) -> tuple[bool, ...]:
    need = (need,) if isinstance(need, str) else tuple(need)  # need="entropy" is one statistic, not seven letters
    unknown = [name for name in need if name not in STAT_NAMES]
    if unknown:
        raise ValueError(f"token_stats: unknown statistic(s) {unknown}; choose from {list(STAT_NAMES)}")
    if not need:
        raise ValueError(f"token_stats: `need` is empty; ask for at least one of {list(STAT_NAMES)}")
    return tuple(name in need for name in STAT_NAMES)


def _validate_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not temperature > 0.0 or temperature != temperature or temperature == float("inf"):
        raise ValueError(f"token_stats: temperature must be a finite number > 0, got {temperature}")
    if temperature < MIN_TEMPERATURE:
        raise ValueError(f"token_stats: temperature {temperature:g} is below {MIN_TEMPERATURE:.3g}: scoring tokens at "
                         "it overflows float32")
    return temperature


def _inverse_temperature(temperature: float | torch.Tensor, targets: torch.Tensor,
                         rows: torch.Tensor | None) -> float | torch.Tensor:
    """``1 / T``: a number (a one-element tensor is one too), or, for a tensor of one temperature per position
    (shaped like ``targets``), a float64 tensor [N] of them, those of the valid ``rows`` checked as a number would be
    (a masked position's, padding perhaps, is not read)."""
    if not torch.is_tensor(temperature) or temperature.numel() == 1:
        return 1.0 / _validate_temperature(float(temperature.detach() if torch.is_tensor(temperature) else temperature))
    if tuple(temperature.shape) != tuple(targets.shape) or not temperature.is_floating_point():
        raise ValueError(f"token_stats: a temperature tensor must hold floats shaped like targets {tuple(targets.shape)}, "
                         f"got {temperature.dtype} {tuple(temperature.shape)}")
    values = temperature.detach().reshape(-1).to(device=targets.device, dtype=torch.float64)
    if rows is not None:
        values = torch.ones_like(values).index_copy_(0, rows, values.index_select(0, rows))
    if values.numel():
        _validate_temperature(float(values.min()))
        _validate_temperature(float(values.max()))
    return 1.0 / values


def _chunk_scale(inv_temperature: float | torch.Tensor, index: slice | torch.Tensor) -> float | torch.Tensor:
    """The inverse temperature of a chunk's rows: the number, or the chunk's entries of the per-row tensor."""
    return _take(inv_temperature, index) if torch.is_tensor(inv_temperature) else inv_temperature


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 logits are reduced in float64 (for exact checks); everything else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Workspace:
    """Two chunk-sized buffers reused across the chunks of one call. Fresh allocations of this size are
    often served by new pages from the OS, whose first-touch faults can cost more than the arithmetic."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self._buffers = [torch.empty((rows, vocab), dtype=dtype, device=device) for _ in range(2)]

    def get(self, slot: int, rows: int) -> torch.Tensor:
        return self._buffers[slot][:rows]


def _shifted_scaled(
    logits_chunk: torch.Tensor, inv_temperature: float, workspace: _Workspace | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, m)`` with ``u = (z - m) / T`` in the compute dtype, floored at -1e4 (so masked entries give
    p = 0 exactly), and ``m`` the finite row maxima (0 for an all ``-inf`` row)."""
    compute_dtype = _compute_dtype(logits_chunk.dtype)
    rows = logits_chunk.shape[0]
    if logits_chunk.dtype != compute_dtype:
        # convert once, then work in place: mixed-dtype arithmetic (bf16 - float32) is many times slower on CPU
        shifted = logits_chunk.to(compute_dtype) if workspace is None else workspace.get(0, rows).copy_(logits_chunk)
        row_max = shifted.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        shifted.sub_(row_max)
    else:
        row_max = logits_chunk.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        shifted = logits_chunk - row_max if workspace is None else torch.sub(logits_chunk, row_max, out=workspace.get(0, rows))
    if torch.is_tensor(inv_temperature):
        shifted.mul_(inv_temperature.to(shifted.dtype).unsqueeze(-1))
    elif inv_temperature != 1.0:
        shifted.mul_(inv_temperature)
    return shifted.clamp_(min=_LOGIT_FLOOR), row_max


def _target_shifted(
    logits_chunk: torch.Tensor, targets_chunk: torch.Tensor, shifted: torch.Tensor, row_max: torch.Tensor, inv_temperature: float
) -> torch.Tensor:
    """``(z_y - max z) / T`` without the -1e4 floor (exact log-probs for very unlikely targets); a target
    whose logit is ``-inf`` keeps the floor, so its log-prob is about -1e4 instead of ``-inf``."""
    floored = shifted.gather(-1, targets_chunk.unsqueeze(-1)).squeeze(-1)
    raw_target = logits_chunk.gather(-1, targets_chunk.unsqueeze(-1)).squeeze(-1).to(shifted.dtype)
    scale = inv_temperature.to(shifted.dtype) if torch.is_tensor(inv_temperature) else inv_temperature
    exact = (raw_target - row_max.squeeze(-1)) * scale
    return torch.where(torch.isfinite(exact), exact, floored)


def _exp(shifted: torch.Tensor, workspace: _Workspace | None) -> torch.Tensor:
    return shifted.exp() if workspace is None else torch.exp(shifted, out=workspace.get(1, shifted.shape[0]))


def _chunk_forward(
    logits_chunk: torch.Tensor,
    targets_chunk: torch.Tensor,
    inv_temperature: float,
    want_disc: bool,
    want_centered: bool,
    workspace: _Workspace | None = None,
) -> tuple[torch.Tensor, ...]:
    """(logprob, entropy, disc, disc_centered) of one chunk of rows; disc entries are None when not wanted."""
    shifted, row_max = _shifted_scaled(logits_chunk, inv_temperature, workspace)  # u
    weights = _exp(shifted, workspace)  # e = exp(u), p = e / s
    total = weights.sum(dim=-1)  # s
    empty_row = total <= 0
    total = torch.where(empty_row, torch.ones_like(total), total)
    log_total = total.log()
    logprob = _target_shifted(logits_chunk, targets_chunk, shifted, row_max, inv_temperature) - log_total
    weighted = shifted.mul_(weights)  # e u, in place: u is not needed any more
    entropy = log_total - weighted.sum(dim=-1) / total  # H = log s - sum p u
    entropy = torch.where(empty_row, torch.zeros_like(entropy), entropy)
    logprob = torch.where(empty_row, torch.zeros_like(logprob), logprob)
    disc = centered = None
    if want_disc or want_centered:
        disc = logprob.exp() * (logprob + entropy)
        disc = torch.where(empty_row, torch.zeros_like(disc), disc)
    if want_centered:
        # sum_v p_v^2 (log p_v + H) = (sum e^2 u + (H - log s) sum e^2) / s^2
        sum_sq = torch.linalg.vector_norm(weights, dim=-1).square()
        sum_sq_u = weighted.mul_(weights).sum(dim=-1)
        expected_disc = (sum_sq_u + (entropy - log_total) * sum_sq) / (total * total)
        centered = torch.where(empty_row, torch.zeros_like(disc), disc - expected_disc)
    return logprob, entropy, disc, centered


def _chunk_logit_grad(
    logits_chunk: torch.Tensor,
    targets_chunk: torch.Tensor,
    inv_temperature: float,
    grad_logprob: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    entropy: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    workspace: _Workspace | None = None,
) -> torch.Tensor:
    """d loss / d z for one chunk, recomputed from the logits; ``entropy`` is the chunk's H from the forward
    pass (needed only with ``grad_entropy``).

    With ``g`` = d loss / d log p_y and ``h`` = d loss / d H:
    ``dz = (g (onehot_y - p) - h p (log p + H)) / T``.  Writing ``p = e / s`` and ``log p = u - log s``
    this is ``e * (a u + b) + g onehot_y / T`` with per-row constants ``a = -h / (T s)`` and
    ``b = -(g + h (H - log s)) / (T s)``: one fused multiply-add and one multiply over the chunk.
    """
    shifted, _ = _shifted_scaled(logits_chunk, inv_temperature, workspace)  # u
    weights = _exp(shifted, workspace)  # e
    total = weights.sum(dim=-1)
    empty_row = total <= 0
    total = torch.where(empty_row, torch.ones_like(total), total)
    log_total = total.log()
    if torch.is_tensor(inv_temperature):
        inv_temperature = inv_temperature.to(total.dtype)
    row_scale = inv_temperature / total
    zeros = torch.zeros_like(total)
    g = zeros if grad_logprob is None else grad_logprob.to(total.dtype)
    h = zeros if grad_entropy is None else grad_entropy.to(total.dtype)
    if grad_entropy is not None:
        entropy = entropy.to(total.dtype)
        slope = (-h * row_scale).unsqueeze(-1)
        offset = (-(g + h * (entropy - log_total)) * row_scale).unsqueeze(-1)
        torch.addcmul(offset, shifted, slope, out=shifted)
    else:
        shifted.fill_(1.0).mul_((-g * row_scale).unsqueeze(-1))
    grad = shifted if out is None or out.dtype != shifted.dtype else out
    torch.mul(shifted, weights, out=grad)
    if bool(torch.as_tensor(inv_temperature > _SCALE_THAT_CAN_OVERFLOW).any()):  # a slope times a floored logit may be
        # inf, times a weight of 0: NaN
        grad.masked_fill_(weights == 0, 0.0)
    if grad_logprob is not None:
        grad.scatter_add_(-1, targets_chunk.unsqueeze(-1), (g * inv_temperature).unsqueeze(-1).to(grad.dtype))
    if bool(empty_row.any()):
        grad.masked_fill_(empty_row.unsqueeze(-1), 0.0)
    return grad


def _row_chunks(rows: torch.Tensor | None, n_rows: int, chunk_size: int) -> Iterator[slice | torch.Tensor]:
    """Contiguous slices when every row is valid, else chunks of the valid row indices."""
    if rows is None:
        for start in range(0, n_rows, chunk_size):
            yield slice(start, min(start + chunk_size, n_rows))
    else:
        for start in range(0, rows.numel(), chunk_size):
            yield rows[start : start + chunk_size]


def _row_count(rows: torch.Tensor | None, n_rows: int) -> int:
    return n_rows if rows is None else rows.numel()


def _take(tensor: torch.Tensor, index: slice | torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``tensor``: [N, X] (a view for a slice), or [B, T, X] read as its B * T rows (a copy of
    those rows alone; see :func:`_as_rows`)."""
    if tensor.dim() == 3:
        positions = torch.arange(index.start, index.stop, device=tensor.device) if isinstance(index, slice) else index
        return tensor[positions // tensor.shape[1], positions % tensor.shape[1]]
    return tensor[index] if isinstance(index, slice) else tensor.index_select(0, index)


def _as_rows(values: torch.Tensor) -> torch.Tensor:
    """``values`` as [N, X] rows: a view when its layout allows one; else [B, T, X] as it is, read a chunk of rows at a
    time by :func:`_take`. A model's shifted ``logits[:, :-1]`` cannot be viewed as [N, V]: ``reshape`` would copy all
    of it, a second [N, V] tensor, kept for the backward too."""
    if values.dim() == 2:
        return values
    try:
        return values.view(-1, values.shape[-1])
    except RuntimeError:
        return values


def _row_total(tensor: torch.Tensor) -> int:
    return tensor.shape[0] * tensor.shape[1] if tensor.dim() == 3 else tensor.shape[0]


def _zero_rows_like(tensor: torch.Tensor, *, fill: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A contiguous gradient shaped like ``tensor`` (zeros, or uninitialised without ``fill``) and its [N, X] view."""
    grad = (torch.zeros if fill else torch.empty)(tensor.shape, dtype=tensor.dtype, device=tensor.device)
    return grad, grad.view(-1, tensor.shape[-1])


def _take_optional(tensor: torch.Tensor | None, index: slice | torch.Tensor) -> torch.Tensor | None:
    return None if tensor is None else _take(tensor, index)


def _stats_by_chunk(logits_for, targets, rows, n_rows, like, inv_temperature, chunk_size, want_disc, want_centered):
    """Forward pass shared by both Functions: ``logits_for(index)`` yields one chunk of logits."""
    out = [torch.zeros(n_rows, dtype=_compute_dtype(like.dtype), device=like.device) for _ in range(4)]
    workspace = None
    with torch.no_grad():
        for index in _row_chunks(rows, n_rows, chunk_size):
            logits_chunk = logits_for(index)
            workspace = workspace or _Workspace(min(chunk_size, _row_count(rows, n_rows)), logits_chunk.shape[-1],
                                                _compute_dtype(logits_chunk.dtype), logits_chunk.device)
            results = _chunk_forward(logits_chunk, _take(targets, index), _chunk_scale(inv_temperature, index), want_disc,
                                     want_centered, workspace)
            for buffer, value in zip(out, results):
                if value is not None:
                    buffer[index] = value
    return out


def _logit_grads_by_chunk(
    logits_for, targets, rows, n_rows, inv_temperature, chunk_size, grad_logprob, grad_entropy, entropy, out_for=None
):
    """Backward pass shared by both Functions: yields ``(index, d loss / d logits of that chunk)``."""
    workspace = None
    for index in _row_chunks(rows, n_rows, chunk_size):
        logits_chunk = logits_for(index)
        workspace = workspace or _Workspace(min(chunk_size, _row_count(rows, n_rows)), logits_chunk.shape[-1],
                                            _compute_dtype(logits_chunk.dtype), logits_chunk.device)
        # the gradient may live in the workspace: the caller consumes it before the next chunk is computed
        yield index, _chunk_logit_grad(
            logits_chunk,
            _take(targets, index),
            _chunk_scale(inv_temperature, index),
            _take_optional(grad_logprob, index),
            _take_optional(grad_entropy, index),
            entropy=None if grad_entropy is None else _take(entropy, index),
            out=None if out_for is None else out_for(index),
            workspace=workspace,
        )


def _save_context(ctx, rows, inv_temperature, chunk_size, out) -> None:
    ctx.has_rows = rows is not None
    ctx.inv_temperature = inv_temperature
    ctx.chunk_size = chunk_size
    ctx.mark_non_differentiable(out[2], out[3])


_NO_ROWS = torch.empty(0, dtype=torch.long)


class _LogitsStats(torch.autograd.Function):
    """Chunked statistics from logits [N, V]; backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, logits, targets, rows, inv_temperature, chunk_size, want_disc, want_centered):
        ctx.set_materialize_grads(False)
        out = _stats_by_chunk(
            lambda index: _take(logits, index), targets, rows, _row_total(logits), logits,
            inv_temperature, chunk_size, want_disc, want_centered,
        )
        ctx.save_for_backward(logits, targets, _NO_ROWS if rows is None else rows, out[1])
        _save_context(ctx, rows, inv_temperature, chunk_size, out)
        return tuple(out)

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy, _grad_disc, _grad_centered):
        if grad_logprob is None and grad_entropy is None:
            return (None,) * 7
        logits, targets, rows, entropy = ctx.saved_tensors
        rows = rows if ctx.has_rows else None
        grad_logits, grad_rows = _zero_rows_like(logits, fill=rows is not None)

        def destination(index):
            return grad_rows[index] if isinstance(index, slice) else None

        chunks = _logit_grads_by_chunk(
            lambda index: _take(logits, index), targets, rows, _row_total(logits),
            ctx.inv_temperature, ctx.chunk_size, grad_logprob, grad_entropy, entropy, out_for=destination,
        )
        for index, grad_chunk in chunks:
            if not isinstance(index, slice) or grad_chunk.data_ptr() != grad_rows[index].data_ptr():
                grad_rows[index] = grad_chunk.to(logits.dtype)
        return grad_logits, None, None, None, None, None, None


class _HiddenStats(torch.autograd.Function):
    """Chunked statistics from hidden states [N, D] and an LM head [V, D]; logits exist one chunk at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, inv_temperature, chunk_size, want_disc, want_centered):
        ctx.set_materialize_grads(False)
        out = _stats_by_chunk(
            lambda index: torch.nn.functional.linear(_take(hidden, index), weight, bias), targets, rows,
            _row_total(hidden), hidden, inv_temperature, chunk_size, want_disc, want_centered,
        )
        ctx.save_for_backward(
            hidden, weight, _NO_ROWS if bias is None else bias, targets, _NO_ROWS if rows is None else rows, out[1]
        )
        ctx.has_bias = bias is not None
        _save_context(ctx, rows, inv_temperature, chunk_size, out)
        return tuple(out)

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy, _grad_disc, _grad_centered):
        if grad_logprob is None and grad_entropy is None:
            return (None,) * 9
        hidden, weight, bias, targets, rows, entropy = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        rows = rows if ctx.has_rows else None
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        accumulate_dtype = _compute_dtype(weight.dtype)
        grad_hidden, grad_hidden_rows = _zero_rows_like(hidden) if need_hidden else (None, None)
        grad_weight = torch.zeros(weight.shape, dtype=accumulate_dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=accumulate_dtype, device=weight.device) if need_bias else None
        chunks = _logit_grads_by_chunk(
            lambda index: torch.nn.functional.linear(_take(hidden, index), weight, bias), targets, rows,
            _row_total(hidden), ctx.inv_temperature, ctx.chunk_size, grad_logprob, grad_entropy, entropy,
        )
        for index, grad_chunk in chunks:
            if need_hidden:
                grad_hidden_rows[index] = (grad_chunk.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight.addmm_(grad_chunk.t(), _take(hidden, index).to(accumulate_dtype))
            if need_bias:
                grad_bias.add_(grad_chunk.sum(dim=0))
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def _flatten_inputs(name: str, values: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None):
    """Check shapes and flatten to rows; return (values as rows (:func:`_as_rows`), targets [N], valid row indices or
    None)."""
    if not torch.is_tensor(values) or values.dim() not in (2, 3):
        raise ValueError(f"token_stats: {name} must be a tensor [B, T, X] or [N, X], got shape {tuple(getattr(values, 'shape', ()))}")
    if not values.is_floating_point():
        raise ValueError(f"token_stats: {name} must be floating point, got {values.dtype}")
    if values.shape[-1] == 0:
        raise ValueError(f"token_stats: {name} must have a last dimension above 0, got shape {tuple(values.shape)}")
    if not torch.is_tensor(targets) or tuple(targets.shape) != tuple(values.shape[:-1]):
        raise ValueError(
            f"token_stats: targets must have shape {tuple(values.shape[:-1])} (the {name} without the last dim), "
            f"got {tuple(getattr(targets, 'shape', ()))}"
        )
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"token_stats: targets must hold integer token ids, got {targets.dtype}")
    flat_values = _as_rows(values)
    flat_targets = targets.reshape(-1).long()
    rows = None
    if mask is not None:
        if tuple(mask.shape) != tuple(targets.shape):
            raise ValueError(f"token_stats: mask must have the shape of targets {tuple(targets.shape)}, got {tuple(mask.shape)}")
        valid = as_bool_mask(mask, "token_stats: mask").reshape(-1)
        rows = valid.nonzero().squeeze(-1)
        # Targets outside the mask may be padding ids (even negative): only valid rows are gathered.
        flat_targets = torch.where(valid, flat_targets, torch.zeros_like(flat_targets))
    return flat_values, flat_targets, rows


def _check_target_range(targets: torch.Tensor, vocab_size: int) -> None:
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab_size):
        raise ValueError(
            f"token_stats: target ids must lie in [0, {vocab_size}) (the vocabulary size); got range "
            f"[{int(targets.min())}, {int(targets.max())}]. Pass a mask to exclude padding positions."
        )


def _assemble(outputs, shape, wanted) -> TokenStats:
    return TokenStats(**{name: value.view(shape) for name, value, keep in zip(STAT_NAMES, outputs, wanted) if keep})


def token_stats(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    need: Iterable[str] = ("logprob", "entropy"),
) -> TokenStats:
    """Log-prob, entropy, S and D of ``softmax(logits / temperature)`` at ``targets``, in one chunked pass.

    Args:
        logits: ``[B, T, V]`` or ``[N, V]``, float32 / bfloat16 / float16 / float64.
        targets: sampled token ids shaped like ``logits`` without the last dim.
        temperature: the sampling temperature T. The statistics are those of the full-vocabulary ``softmax(z / T)``;
            a sampler that also filters (top-k, top-p) drew from a truncated distribution that they do not describe.
            A float tensor shaped like ``targets`` gives each position its own T (verl's per-row temperatures),
            applied chunk by chunk in the compute dtype: no scaled copy of the logits; masked positions' are not read.
        mask: optional bool/0-1 tensor shaped like ``targets``; statistics are computed only at valid
            positions and are 0 elsewhere (gradients too).
        chunk_size: rows per chunk; default keeps one float32 chunk near 4M elements.
        need: which of ``"logprob"``, ``"entropy"``, ``"disc"``, ``"disc_centered"`` to return.

    Returns:
        :class:`TokenStats` with the requested fields shaped like ``targets`` (float32).
        ``logprob`` and ``entropy`` are differentiable w.r.t. ``logits``; ``disc`` and ``disc_centered`` are not.
    """
    wanted = _validate_need(need)
    flat_logits, flat_targets, rows = _flatten_inputs("logits", logits, targets, mask)
    inv_temperature = _inverse_temperature(temperature, targets, rows)
    vocab_size = flat_logits.shape[-1]
    _check_target_range(flat_targets, vocab_size)
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab_size)
    chunk_size = check_int(chunk_size, "token_stats: chunk_size", minimum=1)
    outputs = _LogitsStats.apply(
        flat_logits, flat_targets, rows, inv_temperature, chunk_size, wanted[2], wanted[3]
    )
    return _assemble(outputs, targets.shape, wanted)


def token_stats_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    lm_head_bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    need: Iterable[str] = ("logprob", "entropy"),
) -> TokenStats:
    """The statistics of :func:`token_stats` for ``logits = hidden @ lm_head_weight.T (+ bias)``, never
    materialising the full logits: each chunk of rows is projected, reduced and discarded, forward and
    backward. Gradients flow to ``hidden``, ``lm_head_weight`` and ``lm_head_bias``.

    Args:
        hidden: ``[B, T, D]`` or ``[N, D]`` final hidden states (after the last norm).
        lm_head_weight: ``[V, D]``, e.g. ``model.get_output_embeddings().weight``.
        targets, temperature, mask, chunk_size, need: as in :func:`token_stats`.
    """
    wanted = _validate_need(need)
    flat_hidden, flat_targets, rows = _flatten_inputs("hidden", hidden, targets, mask)
    inv_temperature = _inverse_temperature(temperature, targets, rows)
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != flat_hidden.shape[-1] or lm_head_weight.shape[0] == 0:
        raise ValueError(
            f"token_stats_from_hidden: lm_head_weight must be [V, {flat_hidden.shape[-1]}] with V >= 1 to match hidden, "
            f"got {tuple(lm_head_weight.shape)}"
        )
    if lm_head_bias is not None and tuple(lm_head_bias.shape) != (lm_head_weight.shape[0],):
        raise ValueError(f"token_stats_from_hidden: lm_head_bias must be [{lm_head_weight.shape[0]}], got {tuple(lm_head_bias.shape)}")
    for part, tensor in (("lm_head_weight", lm_head_weight), ("lm_head_bias", lm_head_bias)):
        if tensor is not None and tensor.dtype != flat_hidden.dtype:
            raise ValueError(f"token_stats_from_hidden: {part} is {tensor.dtype} and hidden {flat_hidden.dtype}; give "
                             "them one dtype (the projection multiplies them)")
    vocab_size = lm_head_weight.shape[0]
    _check_target_range(flat_targets, vocab_size)
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab_size)
    chunk_size = check_int(chunk_size, "token_stats_from_hidden: chunk_size", minimum=1)
    outputs = _HiddenStats.apply(
        flat_hidden, lm_head_weight, lm_head_bias, flat_targets, rows, inv_temperature, chunk_size, wanted[2], wanted[3]
    )
    return _assemble(outputs, targets.shape, wanted)
