"""Per-step entropy diagnostics: what the policy's entropy did, and what the theory predicted it would do.

Prediction (arXiv 2602.03392, Thm 3.3): a gradient step on the sampled token's log-prob with coefficient
``g_t = d loss / d log p_t`` moves the (temperature-scaled) logits by ``alpha_t (e_k - p)`` with
``alpha_t = -lr * g_t / T^2``, and the entropy by ``-alpha_t D_t``. It treats each position's logits as free
parameters (the "tabular" view), so with Adam and shared weights its *scale* differs from the measured change;
its sign and its correlation with the measured per-token change are what the theory claims. Tokens sampled at one
decision point (the same prompt and response prefix: a group's first position) move the same logits, so their
changes add up there (:func:`decision_points`). ``g_t`` is taken from
the updates the optimizer applied (a skipped update contributes nothing), scaled by gradient clipping; the gradient
that reaches the logits through an entropy term of the loss (``entropy_bonus``, ``adaptive_entropy``) flows through
``log p_t`` too and is part of ``g_t`` only through the log-prob: its direct effect on the entropy is left out.

The first-order prediction from the update actually applied (:class:`FirstOrderEntropyChange`, when asked):
``Delta H ~= grad_theta H . Delta theta``, with ``H`` the mean entropy of the re-scored tokens and ``Delta theta``
the step's whole change of the weights. It makes no tabular assumption: the optimizer's preconditioning, gradient
clipping and the coupling of positions through shared weights are all in ``Delta theta``, so what it leaves of the
measured change is the second-order part of the step.

The entropy discriminator (arXiv 2602.03392): with ``p`` the sampled token's probability and ``H`` the entropy of
its position, ``S = p (log p + H)`` and its centred form ``D = S - E_{k~pi}[S_k]``; a positive update of a token
with ``D > 0`` lowers the entropy, with ``D < 0`` raises it.
"""

from __future__ import annotations

import codecs
import collections
import functools
import itertools
import math
import re

import numpy as np
import torch

from entrorl._checks import check_int, in_float64
from entrorl.dynamics import covariance_concentration, token_covariance
from entrorl.objective.batch import sorted_quantile

__all__ = ["entropy_summary", "discriminator_summary", "decision_points", "predicted_vs_measured", "FirstOrderEntropyChange",
           "covariance_summary", "top_fork_tokens", "readable_text"]


def _valid(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return in_float64(values.detach()[mask])


def _varies(values: torch.Tensor) -> bool:
    """Whether ``values`` holds two different numbers (a constant vector's std need not round to 0)."""
    return bool(values.max() > values.min())


def entropy_summary(entropy: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mean, max and the 10/50/90% quantiles of the per-token entropy (nats) over ``mask``, and ``low_frac``: the share
    of tokens below 0.01 nats, positions the policy has all but decided (a collapsing run's share grows)."""
    values = _valid(entropy, mask)
    if values.numel() == 0:
        return {}
    ordered = values.sort().values  # not torch.quantile, which refuses 16M values or more (a large step's tokens)
    summary = {"entropy/mean": float(values.mean()), "entropy/max": float(ordered[-1]),
               "entropy/low_frac": float(in_float64(values < 1e-2).mean())}
    broken = bool(torch.isnan(ordered[-1]))  # sorted last: a NaN makes every quantile NaN, as numpy's
    summary.update({f"entropy/p{round(100 * level)}": math.nan if broken else float(sorted_quantile(ordered, level))
                    for level in (0.1, 0.5, 0.9)})
    return summary


def discriminator_summary(disc: torch.Tensor, centered: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Statistics of ``S = p (log p + H)`` (``disc``) and ``D = S - E_pi[S]`` (``disc_centered``), arXiv 2602.03392:
    mean and std over ``mask``, the mean over tokens of positive- and of negative-advantage samples, and
    ``disc/confident_frac``, the share of tokens with ``S > 0`` (sampled tokens more likely than the position's
    typical one)."""
    summary: dict[str, float] = {}
    for name, values in (("disc", disc), ("disc_centered", centered)):
        valid = _valid(values, mask)
        if valid.numel() == 0:
            continue
        summary[f"{name}/mean"] = float(valid.mean())
        summary[f"{name}/std"] = float(valid.std(unbiased=False))
        for sign, select in (("pos", advantages > 0), ("neg", advantages < 0)):
            part = _valid(values, mask & select)
            summary[f"{name}/mean_{sign}_adv"] = float(part.mean()) if part.numel() else math.nan
    valid_disc = _valid(disc, mask)
    if valid_disc.numel():
        summary["disc/confident_frac"] = float(in_float64(valid_disc > 0).mean())
    return summary


def decision_points(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor) -> torch.Tensor:
    """``[B, R]`` ids of the decision point of every response position: the prompt and the response before it. Rows
    that reach the same one (the samples of a prompt at position 0, and beyond while their responses agree) share its
    id, since they sample from the same distribution."""
    groups: dict[tuple[int, ...], int] = {}
    prompt_group = torch.tensor([groups.setdefault(tuple(token for token, kept in zip(ids, mask) if kept), len(groups))
                                 for ids, mask in zip(prompt_ids.tolist(), prompt_mask.bool().tolist())])
    # rows as [prompt, r_0, ..., r_{R-1}] in lexicographic order: two rows share the point of position j when their
    # first j + 1 columns agree, and in that order such rows are neighbours
    keys = torch.cat([prompt_group[:, None], response_ids.cpu()], dim=1).numpy()
    order = np.lexsort(keys.T[::-1])
    ordered = keys[order]
    rows, width = response_ids.shape
    differs = ordered[1:] != ordered[:-1]
    common = np.where(differs.any(axis=1), differs.argmax(axis=1), width + 1)  # leading columns a row shares with the one before
    starts = np.ones((rows, width), dtype=np.int64)  # a new point at (row, j) unless the row before shares columns 0..j
    starts[1:] = common[:, None] < np.arange(1, width + 1)[None, :]
    ids_ordered = np.cumsum(starts, axis=0) - 1 + np.arange(width)[None, :] * rows  # disjoint ids for every position
    ids = np.empty_like(ids_ordered)
    ids[order] = ids_ordered
    return torch.from_numpy(ids)


def predicted_vs_measured(
    grad_coefficients: torch.Tensor,
    disc_centered: torch.Tensor,
    entropy_before: torch.Tensor,
    entropy_after: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    lr: float,
    temperature: float,
    points: torch.Tensor | None = None,
    trained_mask: torch.Tensor | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """Predicted (tabular, first-order) and measured per-token entropy change over ``mask``; returns metrics and the
    per-token prediction.

    Every trained token (``trained_mask``, default ``mask``) moves the logits of its decision point, and at first order
    those moves add up: the prediction for a position is ``sum -alpha_t D_t`` over the trained tokens that share its
    decision point (``points``, see :func:`decision_points`; without it every position is its own). So it compares
    with the measured change of that position's entropy, which every token sharing the point sees.
    ``entropy/predicted_delta_sum`` is the step's whole predicted change, ``sum -alpha_t D_t`` over the trained tokens,
    and ``entropy/predicted_delta_batch`` the mean prediction over the trained tokens (``entropy/predicted_delta`` is
    the mean over ``mask``, the positions measured).
    """
    alpha = -lr * in_float64(grad_coefficients) / (temperature * temperature)  # float64 on the CPU for an Apple GPU
    mask = mask.to(alpha.device)
    trained = mask if trained_mask is None else trained_mask.to(alpha.device)
    own = torch.where(trained, -alpha * in_float64(disc_centered).to(alpha.device), torch.zeros((), dtype=torch.float64))
    predicted = own
    if points is not None and points.numel():
        points = points.to(own.device)  # decision_points returns them on the CPU
        summed = torch.zeros(int(points.max()) + 1, dtype=torch.float64, device=own.device).index_add_(0, points[trained], own[trained])
        predicted = summed[points]
    metrics = {
        "entropy/predicted_delta": float(predicted[mask].mean()) if mask.any() else math.nan,  # no token: no mean
        "entropy/predicted_delta_sum": float(own[trained].sum()),
        "entropy/predicted_delta_batch": float(predicted[trained].mean()) if trained.any() else math.nan,
    }
    if entropy_after is not None and mask.any():
        measured = (in_float64(entropy_after) - in_float64(entropy_before)).to(mask.device)[mask]
        metrics["entropy/measured_delta"] = float(measured.mean())
        pred = predicted[mask]
        if measured.numel() > 1 and _varies(pred) and _varies(measured):
            stacked = torch.stack([pred, measured])
            metrics["entropy/delta_token_corr"] = float(torch.corrcoef(stacked)[0, 1])
        else:
            metrics["entropy/delta_token_corr"] = math.nan
    return metrics, predicted.to(device=grad_coefficients.device, dtype=torch.float32)


class FirstOrderEntropyChange:
    """``g . (theta_after - theta_before)``, the first-order change of a function ``H`` of ``parameters`` whose
    gradient ``g`` was taken before an update: built before the update, read with :meth:`after_update`.

    Keeps ``g`` and ``g . theta_before`` (float64) instead of a copy of the old weights. Every product of two float32
    (or narrower) numbers is exact in float64 and the sums lose about 1e-16 of ``g . theta`` per term, so the
    difference keeps a change many orders below ``g . theta`` (float32 would not); ``g`` must be the same tensor on
    both sides (sum the gradients of ``H``'s pieces first).
    """

    def __init__(self, parameters: list[torch.Tensor], gradient: list[torch.Tensor | None]):
        if len(gradient) != len(parameters):
            raise ValueError(f"{len(gradient)} gradients for {len(parameters)} parameters")
        self.parameters = parameters
        self.gradient = [None if g is None else g.detach() for g in gradient]
        self.before = self._dot()

    @torch.no_grad()
    def _dot(self, chunk: int = 2**22) -> float:
        """``g . theta`` in float64, a slice of at most ``chunk`` entries at a time (no float64 copy of a whole
        embedding matrix)."""
        total = torch.zeros((), dtype=torch.float64)
        for parameter, gradient in zip(self.parameters, self.gradient):
            if gradient is None:
                continue
            weights, slope = parameter.detach().reshape(-1), gradient.reshape(-1)
            for start in range(0, weights.numel(), chunk):
                total += torch.dot(in_float64(slope[start: start + chunk]), in_float64(weights[start: start + chunk])).cpu()
        return float(total)

    def after_update(self) -> float:
        """The predicted change of ``H`` from the weights as they are now."""
        return self._dot() - self.before


def covariance_summary(logprob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Concentration of the token covariance (arXiv 2505.22617, Table 1)."""
    if not mask.any():
        return {}
    cov = token_covariance(logprob.detach(), advantages.detach(), mask)
    return covariance_concentration(cov, mask).to_dict()


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback piece (sentencepiece, Llama-style BPE)


def _bytes_as_pieces(error: UnicodeDecodeError):
    return "".join(f"<0x{byte:02X}>" for byte in error.object[error.start:error.end]), error.end


codecs.register_error("entrorl.byte_pieces", _bytes_as_pieces)


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE's map from its 256 stand-in characters (``Ġ`` for a space, ...) back to bytes."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {character: byte for byte, character in bytes_to_unicode().items()}


def readable_text(tokenizer, ids: list[int], *, following: int | None = None) -> str:
    """``tokenizer.decode(ids)``, except that bytes which do not complete a UTF-8 character show as ``<0xE4>``.

    A byte-level BPE or a byte-fallback vocabulary splits a character such as ``日`` over several tokens; decoded on
    its own, each piece (and a context cut in the middle of a character) is U+FFFD, so different tokens would read
    alike. Here the pieces' bytes are put back together, decoded as UTF-8, and only the bytes of an unfinished
    character are written as ``<0xNN>`` (sentencepiece's spelling); added and special tokens read as themselves.
    Tokenizers of other kinds, and text without U+FFFD, come back as ``decode`` gives them.

    ``following``: the id of the token the text follows. A sentencepiece decoder (Llama, Mistral) strips the leading
    space of what it decodes, so that ``▁The`` and ``The`` would both read ``The``: decoded after that token, the
    text keeps the space it has in the sequence."""
    if following is not None:
        anchor = _readable_text(tokenizer, [following])
        anchored = _readable_text(tokenizer, [following, *ids])
        if anchored.startswith(anchor):
            return anchored[len(anchor):]
    return _readable_text(tokenizer, ids)


def _readable_text(tokenizer, ids: list[int]) -> str:
    text = tokenizer.decode(ids)
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if "\ufffd" not in text or convert is None:
        return text
    pieces = convert(list(ids))
    if not all(isinstance(piece, str) for piece in pieces):
        return text
    byte_pieces = [_BYTE_PIECE.fullmatch(piece) for piece in pieces]
    if not any(byte_pieces):  # a byte-level BPE's pieces, or another kind
        alphabet = _byte_level_alphabet()
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}  # e.g. DeepSeek's <｜Assistant｜>: as written
        if not all(character in alphabet for token, piece in zip(ids, pieces) if token not in added
                   for character in piece):
            return text
        parts = []
        for is_added, run in itertools.groupby(zip(ids, pieces), key=lambda item: item[0] in added):
            run = list(run)
            parts.append(tokenizer.decode([token for token, _ in run]) if is_added else bytes(
                alphabet[character] for _, piece in run for character in piece).decode("utf-8", "entrorl.byte_pieces"))
        return "".join(parts)
    parts = []  # runs of byte pieces as bytes, the runs between them as the tokenizer decodes them
    for is_byte, run in itertools.groupby(range(len(ids)), key=lambda index: byte_pieces[index] is not None):
        run = list(run)
        start, end = run[0], run[-1] + 1
        if is_byte:
            parts.append(bytes(int(byte_pieces[index][1], 16) for index in run).decode("utf-8", "entrorl.byte_pieces"))
        elif start == 0:
            parts.append(tokenizer.decode(ids[start:end]))
        else:  # decoded after the byte before it, so that a decoder's strip of a leading space does not apply
            anchored, anchor = tokenizer.decode(ids[start - 1:end]), tokenizer.decode(ids[start - 1:start])
            parts.append(anchored[len(anchor):] if anchored.startswith(anchor) else tokenizer.decode(ids[start:end]))
    return "".join(parts)


def top_fork_tokens(tokenizer, prompt_ids, prompt_mask, response_ids, response_mask, entropy, *, k: int, context: int = 24,
                    sources: list[str] | None = None):
    """The ``k`` highest-entropy decision points of the responses, each decoded with its left context.

    A decision point is a prompt plus the response tokens before a position. Rows that reach the same one (the
    samples of a prompt all share position 0; greedy samples share every position) face the same next-token
    distribution, so it is listed once: ``samples`` is how many rows reached it and ``chosen`` counts the tokens
    they picked there; it is ranked by its first row's entropy (the row of lowest index), and ``entropy``, ``sample``,
    ``token`` and ``after`` are that row's.
    ``sources[row]`` of that row (e.g. the prompt's ``file:line``) is added as ``source`` when given.
    """
    k = check_int(k, "top_fork_tokens: k", minimum=0)
    context = check_int(context, "top_fork_tokens: context", minimum=0)
    if k <= 0 or not response_mask.any():
        return []
    width = response_ids.shape[1]
    prompts = [ids[mask].tolist() for ids, mask in zip(prompt_ids, prompt_mask)]
    responses = [ids[mask].tolist() for ids, mask in zip(response_ids, response_mask)]
    points = torch.where(response_mask.bool().cpu(), decision_points(prompt_ids, prompt_mask, response_ids), -1)
    # each decision point is ranked and reported by its first row (the lowest index), not by the row whose entropy
    # rounded highest (rows of one point scored in other batches differ by float32's rounding): the same responses
    # give the same forks
    row_of = torch.arange(len(points))[:, None].expand_as(points)
    valid = points >= 0
    first_row = torch.full((points.numel(),), len(points)).scatter_reduce(0, points[valid], row_of[valid], reduce="amin")
    is_first = valid & (first_row[points.clamp(min=0)] == row_of)
    scores = torch.where(is_first, entropy.detach().float().cpu(), -math.inf)
    order = scores.flatten().argsort(descending=True, stable=True)[: int(is_first.sum())].tolist()
    forks = []
    for flat_index in order:
        row, position = divmod(flat_index, width)
        point = int(points[row, position])
        sharing = (points[:, position] == point).nonzero().squeeze(-1).tolist()
        prompt, response = prompts[row], responses[row]
        sequence = prompt + response[:position]  # the rows sharing the decision point share it
        cut = max(0, len(sequence) - context)
        chosen = collections.Counter(readable_text(tokenizer, [responses[other][position]], following=sequence[-1])
                                     for other in sharing)
        fork = {
            "entropy": float(scores[row, position]),
            "sample": row,
            "position": position,
            "token": readable_text(tokenizer, [response[position]], following=sequence[-1]),
            "before": readable_text(tokenizer, sequence[cut:], following=sequence[cut - 1] if cut else None),
            "after": readable_text(tokenizer, response[position + 1 : position + 1 + context // 2],
                                   following=response[position]),
            "samples": len(sharing),
            "chosen": dict(chosen.most_common()),
        }
        if sources is not None:
            fork["source"] = sources[row]
        forks.append(fork)
        if len(forks) == k:
            break
    return forks
