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
never builds the logits at all: a tile of rows by head columns (1024 x 4096 at V = 152 064) is
``hidden @ W_tile^T`` computed, reduced and discarded, the row sums carried from tile to tile as an online
log-sum-exp, so the head is read once per 1024 rows, not once per 27.

Numerics: each row is shifted by its maximum, so logits of any magnitude (``±1e4``) are safe, and
entries equal to ``-inf`` (top-k / top-p filtered vocabularies) have probability exactly 0 and
contribute nothing to any sum. A row whose every entry is ``-inf`` yields zeros. A ``+inf`` or NaN logit
describes no distribution: its row's statistics are NaN (or ``-inf`` log-probs), never a made-up number.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from entrorl._checks import as_bool_mask, check_int, widest_float

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
# Head columns projected at once by token_stats_from_hidden: rows per tile are then 4M / 4096 = 1024, enough for each
# tile's matrix product to be bound by arithmetic rather than by reading the head again.
_VOCAB_TILE = 4096


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
    (shaped like ``targets``), a float64 tensor [N] of them (float32 on Apple GPUs), those of the valid ``rows`` checked as a number would be
    (a masked position's, padding perhaps, is not read)."""
    if not torch.is_tensor(temperature) or temperature.numel() == 1:
        return 1.0 / _validate_temperature(float(temperature.detach() if torch.is_tensor(temperature) else temperature))
    if tuple(temperature.shape) != tuple(targets.shape) or not temperature.is_floating_point():
        raise ValueError(f"token_stats: a temperature tensor must hold floats shaped like targets {tuple(targets.shape)}, "
                         f"got {temperature.dtype} {tuple(temperature.shape)}")
    values = temperature.detach().reshape(-1).to(device=targets.device, dtype=widest_float(targets.device))
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
        self.dtype = dtype
        self._buffers = [torch.empty((rows, vocab), dtype=dtype, device=device) for _ in range(2)]

    def get(self, slot: int, rows: int, columns: int | None = None) -> torch.Tensor:
        """A contiguous ``[rows, columns]`` view of buffer ``slot`` (``columns`` defaults to the buffer's width)."""
        buffer = self._buffers[slot]
        if columns is None or columns == buffer.shape[1]:
            return buffer[:rows]
        return buffer.view(-1)[: rows * columns].view(rows, columns)


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
    """Forward pass of :class:`_LogitsStats`: ``logits_for(index)`` yields one chunk of rows of the logits."""
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
    """Backward pass of :class:`_LogitsStats`: yields ``(index, d loss / d logits of that chunk)``."""
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


def _differentiable_once(backward):
    """``backward`` run without recording a graph of its own (its chunks are written in place). A gradient of the
    gradient (``create_graph=True``; ``torch.func.grad`` of a ``torch.func.grad``) is refused: the first gradient would
    have no graph behind it, so this function's second-order term would be 0 without a word (torch's
    ``once_differentiable`` raises only when the incoming gradients require grad, which a loss's seldom do). One
    ``torch.func.grad`` is a first derivative, which runs."""

    @functools.wraps(backward)
    def differentiated_once(ctx, *grads):
        if torch.is_grad_enabled():
            level = _functorch_level() if torch._C._are_functorch_transforms_active() else None
            if level is None or level > 1:
                raise RuntimeError("token_stats: the statistics are differentiable once; a second derivative "
                                   "(create_graph=True, or nested torch.func.grad) is not available")
        with torch.no_grad():
            return backward(ctx, *grads)

    return differentiated_once


def _functorch_level() -> int:
    """The level of the innermost torch.func transform under way (1 for a single ``torch.func.grad``)."""
    current = getattr(torch._C._functorch, "maybe_current_level", None)
    level = current() if current is not None else None
    return 1 if level is None else int(level)


def _save_context(ctx, rows, inv_temperature, chunk_size, out) -> None:
    """What both classes' backward passes read besides the saved tensors; ``out[2:]`` (D, its centred form, and what
    :class:`_HiddenStats` returns for its backward pass) have no gradient."""
    ctx.has_rows = rows is not None
    ctx.inv_temperature = inv_temperature
    ctx.chunk_size = chunk_size
    ctx.mark_non_differentiable(*out[2:])


_NO_ROWS = torch.empty(0, dtype=torch.long)


class _LogitsStats(torch.autograd.Function):
    """Chunked statistics from logits [N, V]; backward recomputes each chunk. (The context is set apart from the
    forward pass, so that ``torch.func.grad`` can differentiate through it.)"""

    @staticmethod
    def forward(logits, targets, rows, inv_temperature, chunk_size, want_disc, want_centered):
        return tuple(_stats_by_chunk(
            lambda index: _take(logits, index), targets, rows, _row_total(logits), logits,
            inv_temperature, chunk_size, want_disc, want_centered,
        ))

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, targets, rows, inv_temperature, chunk_size, _, _ = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, targets, _NO_ROWS if rows is None else rows, output[1])
        _save_context(ctx, rows, inv_temperature, chunk_size, output)

    @staticmethod
    @_differentiable_once
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
            # a slice's gradient was written into its destination when it has the destination's dtype
            if not isinstance(index, slice) or grad_chunk.dtype != grad_rows.dtype:
                grad_rows[index] = grad_chunk.to(logits.dtype)
        return grad_logits, None, None, None, None, None, None


def _head_tiles(vocab_size: int, width: int) -> list[slice]:
    return [slice(start, min(start + width, vocab_size)) for start in range(0, vocab_size, width)]


def _finite_or_zero(values: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(values), values, torch.zeros_like(values))


def _project(hidden_rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, columns: slice,
             workspace: _Workspace) -> torch.Tensor:
    """The logits ``hidden_rows @ W[columns]^T (+ b[columns])`` of one tile, in the compute dtype, in workspace slot 0
    (a half-precision head multiplies in its own dtype, as the model's output layer does, then converts)."""
    out = workspace.get(0, hidden_rows.shape[0], columns.stop - columns.start)
    if hidden_rows.dtype == out.dtype:
        torch.mm(hidden_rows, weight[columns].t(), out=out)
        if bias is not None:
            out.add_(bias[columns])
    else:
        out.copy_(torch.nn.functional.linear(hidden_rows, weight[columns], None if bias is None else bias[columns]))
    return out


def _column_scale(scale: float | torch.Tensor, dtype: torch.dtype) -> float | torch.Tensor:
    """A chunk's inverse temperature ready to multiply a tile: the number, or its rows' as a ``[rows, 1]`` column."""
    return scale.to(dtype).unsqueeze(-1) if torch.is_tensor(scale) else scale


def _target_columns(targets_rows: torch.Tensor, columns: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Which rows' targets fall in the tile, and each row's target column inside it (clamped for the others)."""
    in_tile = (targets_rows >= columns.start) & (targets_rows < columns.stop)
    return in_tile, (targets_rows - columns.start).clamp(0, columns.stop - columns.start - 1).unsqueeze(-1)


def _hidden_chunk_forward(hidden_rows, weight, bias, targets_rows, scale, tiles, want_disc, want_centered, workspace):
    """The statistics of one chunk of rows, the head projected one tile of columns at a time (an online log-sum-exp),
    plus what the backward pass needs: each row's maximum logit and ``log s``.

    With ``m`` the running row maximum of the logits, ``u = (z - m) / T`` floored at -1e4 and ``e = exp(u)``, the
    sums ``s = sum e``, ``t = sum e u`` (and, for D, ``q = sum e^2``, ``r = sum e^2 u``) are carried from tile to
    tile; when the maximum rises from ``m`` to ``m'``, with ``d = (m - m') / T`` and ``c = exp(d)``:
    ``s <- c s``, ``t <- c (t + d s)``, ``q <- c^2 q``, ``r <- c^2 (r + d q)``. At the end ``H = log s - t / s``.
    """
    rows = hidden_rows.shape[0]
    like = dict(dtype=workspace.dtype, device=hidden_rows.device)
    running_max = torch.full((rows,), float("-inf"), **like)
    target_logit = torch.full((rows,), float("-inf"), **like)
    total, weighted = torch.zeros(rows, **like), torch.zeros(rows, **like)
    square_total, square_weighted = torch.zeros(rows, **like), torch.zeros(rows, **like)
    row_scale = scale.to(workspace.dtype) if torch.is_tensor(scale) else scale
    tile_scale = _column_scale(scale, workspace.dtype)
    for columns in tiles:
        logits = _project(hidden_rows, weight, bias, columns, workspace)  # z
        in_tile, column = _target_columns(targets_rows, columns)
        target_logit = torch.where(in_tile, logits.gather(-1, column).squeeze(-1), target_logit)
        new_max = torch.maximum(running_max, logits.amax(dim=-1))
        shift = _finite_or_zero(new_max)
        step = (_finite_or_zero(running_max) - shift) * row_scale  # d <= 0
        carry = torch.where(total > 0, step.exp(), torch.zeros_like(step))  # c: nothing to carry before a finite logit
        shifted = logits.sub_(shift.unsqueeze(-1)).mul_(tile_scale).clamp_(min=_LOGIT_FLOOR)  # u
        weights = torch.exp(shifted, out=workspace.get(1, rows, shifted.shape[1]))  # e
        tile_weighted = shifted.mul_(weights).sum(dim=-1)  # sum e u; shifted holds e u from here
        weighted = torch.where(carry > 0, carry * (weighted + step * total), torch.zeros_like(carry)) + tile_weighted
        if want_centered:
            carry_squared = carry * carry
            tile_square_weighted = shifted.mul_(weights).sum(dim=-1)  # sum e^2 u
            square_weighted = torch.where(
                carry_squared > 0, carry_squared * (square_weighted + step * square_total), torch.zeros_like(carry)
            ) + tile_square_weighted
            square_total = carry_squared * square_total + torch.linalg.vector_norm(weights, dim=-1).square()
        total = carry * total + weights.sum(dim=-1)
        running_max = new_max
    # a +inf or NaN logit: no distribution, the row's statistics are NaN
    broken = torch.isnan(running_max) | (running_max == float("inf"))
    empty_row = (total <= 0) & ~broken
    log_total = torch.where(empty_row, torch.ones_like(total), total).log()
    log_total = torch.where(broken, torch.full_like(total, float("nan")), log_total)
    entropy = torch.where(empty_row, torch.zeros_like(total), log_total - weighted / total)
    row_max = _finite_or_zero(running_max)
    exact = (target_logit - row_max) * row_scale
    logprob = torch.where(torch.isfinite(exact), exact, torch.full_like(exact, _LOGIT_FLOOR)) - log_total
    logprob = torch.where(empty_row, torch.zeros_like(logprob), logprob)
    # as token_stats gives: a +inf logit takes all the mass, so a finite target's log-prob is -inf
    finite_target_beside_infinity = (running_max == float("inf")) & (target_logit < float("inf"))
    logprob = torch.where(finite_target_beside_infinity, torch.full_like(logprob, float("-inf")), logprob)
    disc = centered = None
    if want_disc or want_centered:
        disc = torch.where(empty_row, torch.zeros_like(logprob), logprob.exp() * (logprob + entropy))
    if want_centered:
        expected_disc = (square_weighted + (entropy - log_total) * square_total) / (total * total)
        centered = torch.where(empty_row, torch.zeros_like(disc), disc - expected_disc)
    return (logprob, entropy, disc, centered), (row_max, log_total, empty_row)


def _hidden_chunk_backward(hidden_rows, weight, bias, targets_rows, scale, tiles, grad_logprob, grad_entropy, entropy,
                           row_max, log_total, empty_row, workspace):
    """Yields ``(columns, d loss / d z of the tile)`` for one chunk of rows, each tile recomputed from the head.

    ``dz = p (a log p + b) + g onehot_y / T`` with per-row ``a = -h / T``, ``b = -(g + h H) / T`` (``g`` = d loss /
    d log p_y, ``h`` = d loss / d H), and ``log p = (z - m) / T - log s`` from the forward pass's ``m`` and ``log s``.
    The tile lives in the workspace: the caller consumes it before the next one is computed."""
    dtype = workspace.dtype
    zeros = torch.zeros(hidden_rows.shape[0], dtype=dtype, device=hidden_rows.device)
    g = zeros if grad_logprob is None else torch.where(empty_row, zeros, grad_logprob.to(dtype))
    h = zeros if grad_entropy is None else torch.where(empty_row, zeros, grad_entropy.to(dtype))
    row_scale = scale.to(dtype) if torch.is_tensor(scale) else scale
    slope = (-h * row_scale).unsqueeze(-1)
    offset = (-(g + h * entropy.to(dtype)) * row_scale).unsqueeze(-1) if grad_entropy is not None else \
        (-g * row_scale).unsqueeze(-1)
    target_grad = g * row_scale
    tile_scale = _column_scale(scale, dtype)
    can_overflow = bool(torch.as_tensor(scale > _SCALE_THAT_CAN_OVERFLOW).any())
    for columns in tiles:
        logits = _project(hidden_rows, weight, bias, columns, workspace)
        log_p = logits.sub_(row_max.unsqueeze(-1)).mul_(tile_scale).sub_(log_total.unsqueeze(-1)).clamp_(min=_LOGIT_FLOOR)
        probs = torch.exp(log_p, out=workspace.get(1, *log_p.shape))
        grad = torch.addcmul(offset, log_p, slope, out=log_p).mul_(probs)
        if can_overflow:  # a slope times a floored log-prob may be inf, times a probability of 0: NaN
            grad.masked_fill_(probs == 0, 0.0)
        in_tile, column = _target_columns(targets_rows, columns)
        if bool(in_tile.any()):
            grad.scatter_add_(-1, column, torch.where(in_tile, target_grad, zeros).unsqueeze(-1))
        yield columns, grad


class _HiddenStats(torch.autograd.Function):
    """Chunked statistics from hidden states [N, D] and an LM head [V, D]; logits exist one tile at a time. Besides
    the four statistics, the forward pass returns what the backward pass needs (each row's maximum logit, ``log s``
    and whether it is empty), so that the context can be set apart from it, as ``torch.func.grad`` requires."""

    @staticmethod
    def forward(hidden, weight, bias, targets, rows, inv_temperature, chunk_size, vocab_tile, want_disc, want_centered):
        n_rows = _row_total(hidden)
        dtype = _compute_dtype(hidden.dtype)
        out = [torch.zeros(n_rows, dtype=dtype, device=hidden.device) for _ in range(4)]
        row_max, log_total = torch.zeros(n_rows, dtype=dtype, device=hidden.device), torch.zeros_like(out[0])
        empty_row = torch.zeros(n_rows, dtype=torch.bool, device=hidden.device)
        tiles = _head_tiles(weight.shape[0], vocab_tile)
        workspace = _Workspace(min(chunk_size, _row_count(rows, n_rows)), min(vocab_tile, weight.shape[0]), dtype,
                               hidden.device)
        with torch.no_grad():
            for index in _row_chunks(rows, n_rows, chunk_size):
                results, normalizer = _hidden_chunk_forward(
                    _take(hidden, index), weight, bias, _take(targets, index), _chunk_scale(inv_temperature, index),
                    tiles, want_disc, want_centered, workspace,
                )
                for buffer, value in zip(out, results):
                    if value is not None:
                        buffer[index] = value
                for buffer, value in zip((row_max, log_total, empty_row), normalizer):
                    buffer[index] = value
        return (*out, row_max, log_total, empty_row)

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, bias, targets, rows, inv_temperature, chunk_size, vocab_tile, _, _ = inputs
        ctx.set_materialize_grads(False)
        row_max, log_total, empty_row = output[4:]
        ctx.save_for_backward(hidden, weight, _NO_ROWS if bias is None else bias, targets,
                              _NO_ROWS if rows is None else rows, output[1], row_max, log_total, empty_row)
        ctx.has_bias = bias is not None
        ctx.vocab_tile = vocab_tile
        _save_context(ctx, rows, inv_temperature, chunk_size, output)

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad_logprob, grad_entropy, _grad_disc, _grad_centered, *_grad_backward_inputs):
        if grad_logprob is None and grad_entropy is None:
            return (None,) * 10
        hidden, weight, bias, targets, rows, entropy, row_max, log_total, empty_row = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        rows = rows if ctx.has_rows else None
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        n_rows = _row_total(hidden)
        dtype = _compute_dtype(hidden.dtype)
        grad_hidden, grad_hidden_rows = _zero_rows_like(hidden) if need_hidden else (None, None)
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if need_bias else None
        tiles = _head_tiles(weight.shape[0], ctx.vocab_tile)
        workspace = _Workspace(min(ctx.chunk_size, _row_count(rows, n_rows)), min(ctx.vocab_tile, weight.shape[0]),
                               dtype, hidden.device)
        for index in _row_chunks(rows, n_rows, ctx.chunk_size):
            hidden_rows = _take(hidden, index)
            hidden_in_compute = hidden_rows.to(dtype) if need_weight else None
            chunk_grad_hidden = torch.zeros(hidden_rows.shape, dtype=dtype, device=hidden.device) if need_hidden else None
            tile_grads = _hidden_chunk_backward(
                hidden_rows, weight, bias, _take(targets, index), _chunk_scale(ctx.inv_temperature, index), tiles,
                _take_optional(grad_logprob, index), _take_optional(grad_entropy, index), _take(entropy, index),
                _take(row_max, index), _take(log_total, index), _take(empty_row, index), workspace,
            )
            for columns, grad in tile_grads:
                if need_hidden:
                    if weight.dtype == dtype:
                        chunk_grad_hidden.addmm_(grad, weight[columns])
                    else:
                        chunk_grad_hidden.add_(grad.to(weight.dtype) @ weight[columns])
                if need_weight:
                    grad_weight[columns].addmm_(grad.t(), hidden_in_compute)
                if need_bias:
                    grad_bias[columns].add_(grad.sum(dim=0))
            if need_hidden:
                grad_hidden_rows[index] = chunk_grad_hidden.to(hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


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
        ``logprob`` and ``entropy`` are differentiable w.r.t. ``logits`` (once: there is no second derivative; under
        ``torch.func.grad`` too); ``disc`` and ``disc_centered`` are not.
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
    vocab_chunk_size: int | None = None,
    need: Iterable[str] = ("logprob", "entropy"),
) -> TokenStats:
    """The statistics of :func:`token_stats` for ``logits = hidden @ lm_head_weight.T (+ bias)``, never
    materialising the full logits: a tile of ``chunk_size`` rows by ``vocab_chunk_size`` head columns is projected,
    reduced and discarded at a time, forward and backward, the row sums carried across a row's tiles as an online
    log-sum-exp (the softmax normaliser of arXiv 1805.02867). Gradients flow to ``hidden``, ``lm_head_weight`` and
    ``lm_head_bias``.

    Args:
        hidden: ``[B, T, D]`` or ``[N, D]`` final hidden states (after the last norm).
        lm_head_weight: ``[V, D]``, e.g. ``model.get_output_embeddings().weight``.
        chunk_size: rows per tile; the default keeps one float32 tile near 4M elements (1024 rows at the default
            width), so the head is read once per 1024 rows in each direction.
        vocab_chunk_size: head columns per tile, 4096 by default (the whole head when it has fewer).
        targets, temperature, mask, need: as in :func:`token_stats`.
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
    if vocab_chunk_size is None:
        vocab_chunk_size = _VOCAB_TILE
    vocab_chunk_size = check_int(vocab_chunk_size, "token_stats_from_hidden: vocab_chunk_size", minimum=1)
    if chunk_size is None:
        chunk_size = default_chunk_size(min(vocab_size, vocab_chunk_size))
    chunk_size = check_int(chunk_size, "token_stats_from_hidden: chunk_size", minimum=1)
    outputs = _HiddenStats.apply(
        flat_hidden, lm_head_weight, lm_head_bias, flat_targets, rows, inv_temperature, chunk_size, vocab_chunk_size,
        wanted[2], wanted[3],
    )
    return _assemble(outputs[:4], targets.shape, wanted)
