"""Outcome-reward advantage estimators, as a registry of named functions.

Every estimator works on per-sample tensors of one training batch:

- ``rewards``: float ``[n]``, one scalar (outcome) reward per sampled response;
- ``group_ids``: int ``[n]``, samples drawn for the same prompt share an id. Ids are arbitrary
  integers and a group's samples need not be contiguous;
- ``lengths`` (optional): int ``[n]``, response token counts (token-weighted whitening);
- ``seq_log_prob`` (optional): float ``[n]``, length-normalised sequence log-prob under the old
  policy, ``(old_log_prob * mask).sum(-1) / mask.sum(-1)`` (the unlikeliness shaping).

and returns float32 per-sample advantages ``[n]``. :func:`expand_to_tokens` puts a sample's advantage
on every valid token of its response (outcome reward, gamma = 1: every token has the same return).

Conventions shared by all group-baseline estimators (documented once here):

- Group statistics are computed in float64 (on the CPU for rewards on an Apple GPU, which has no float64) and the
  result is cast to float32 (:func:`compute_advantages` returns it on the rewards' device).
- A group of two or more samples whose rewards are all equal gets advantages of exactly 0 (never NaN),
  whatever ``epsilon`` is.
- A singleton group has no baseline: its mean is taken as 0 (and, for ``grpo``, its std as 1), as verl
  does, so its advantage is its reward (``R / (1 + epsilon)`` for ``grpo``).

A new estimator is one decorated function::

    @register_advantage("my_adv", description="...", paper="arXiv 0000.00000")
    def my_adv(rewards, group_ids, *, lengths=None, seq_log_prob=None, scale: float = 1.0):
        ...

Its keyword-only parameters with defaults (other than the data inputs ``lengths``, ``seq_log_prob`` and
``correct``) are its tunable parameters; :func:`available_advantages` reads them from the signature. An estimator
that splits correct from wrong samples takes ``correct`` (bool ``[n]``, given by :func:`compute_advantages`) beside a
``correct_threshold`` parameter: a trainer passes the reward's own verdicts, which shaping the reward (extra rewards,
penalties, diversity) leaves as they are.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

import torch

from entrorl._checks import as_tensor, check_int, in_float64, is_real_number, widest_float

__all__ = [
    "AdvantageFn",
    "AdvantageOverflow",
    "AdvantageInfo",
    "register_advantage",
    "available_advantages",
    "advantage_info",
    "get_advantage_fn",
    "compute_advantages",
    "group_mean_std",
    "expand_to_tokens",
    "unlikeliness_shaped_rewards",
    "GROUP_BASELINE_ESTIMATORS",
]

AdvantageFn = Callable[..., torch.Tensor]

#: Estimators that compare a sample with the rest of its group (a group of one has no baseline).
GROUP_BASELINE_ESTIMATORS = frozenset({"grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "passk", "unlikely"})

# Keyword arguments that carry batch data rather than tunable parameters.
_DATA_KWARGS = ("lengths", "seq_log_prob", "correct")


@dataclass(frozen=True)
class AdvantageInfo:
    """What :func:`available_advantages` tells about one registered estimator."""

    name: str
    description: str
    paper: str
    params: dict[str, Any]


@dataclass(frozen=True)
class _Entry:
    fn: AdvantageFn
    info: AdvantageInfo
    data_kwargs: tuple[str, ...]  # which of _DATA_KWARGS the function accepts


_REGISTRY: dict[str, _Entry] = {}


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------


def _inspect_signature(name: str, fn: AdvantageFn) -> tuple[dict[str, Any], tuple[str, ...]]:
    sig = inspect.signature(fn)
    params: dict[str, Any] = {}
    data_kwargs: list[str] = []
    positional = []
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional.append(p.name)
        elif p.kind is p.KEYWORD_ONLY:
            if p.name in _DATA_KWARGS:
                data_kwargs.append(p.name)
            elif p.default is p.empty:
                raise TypeError(
                    f"advantage estimator {name!r}: keyword-only parameter {p.name!r} has no default; "
                    "every tunable parameter needs the paper's default value"
                )
            else:
                params[p.name] = p.default
        else:  # *args / **kwargs
            raise TypeError(
                f"advantage estimator {name!r}: *args/**kwargs are not allowed (found {p}); declare each "
                "parameter as keyword-only with a default so it can be listed and validated"
            )
    if len(positional) != 2:
        raise TypeError(
            f"advantage estimator {name!r} must take exactly two positional arguments "
            f"(rewards, group_ids); it takes {positional}"
        )
    return params, tuple(data_kwargs)


def register_advantage(name: str, *, description: str, paper: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator registering an advantage estimator under ``name``.

    The function must look like ``fn(rewards, group_ids, *, [lengths=None], [seq_log_prob=None],
    param=default, ...) -> Tensor[n]``. Raises ``ValueError`` if ``name`` is already registered and
    ``TypeError`` if the signature does not have that shape.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"advantage estimator name must be a non-empty string, got {name!r}")

    def decorator(fn: AdvantageFn) -> AdvantageFn:
        if name in _REGISTRY:
            raise ValueError(
                f"advantage estimator {name!r} is already registered "
                f"(by {_REGISTRY[name].fn.__module__}.{_REGISTRY[name].fn.__qualname__}); pick another name"
            )
        params, data_kwargs = _inspect_signature(name, fn)
        info = AdvantageInfo(name=name, description=description, paper=paper, params=params)
        _REGISTRY[name] = _Entry(fn=fn, info=info, data_kwargs=data_kwargs)
        return fn

    return decorator


def available_advantages() -> list[AdvantageInfo]:
    """All registered estimators, in registration order, with their papers and default parameters."""
    return [advantage_info(name) for name in _REGISTRY]


def advantage_info(name: str) -> AdvantageInfo:
    """What :func:`available_advantages` tells about estimator ``name`` (``ValueError`` listing valid names if
    unknown)."""
    info = _entry(name).info
    return AdvantageInfo(info.name, info.description, info.paper, dict(info.params))


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown advantage estimator {name!r}; valid names: {', '.join(_REGISTRY)}"
        ) from None


def get_advantage_fn(name: str) -> AdvantageFn:
    """The registered estimator function called ``name`` (``ValueError`` listing valid names if unknown)."""
    return _entry(name).fn


class AdvantageOverflow(ValueError):
    """Advantages beyond float32's range (rewards, or an estimator's parameter, near its largest value)."""


def compute_advantages(
    name: str,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    lengths: torch.Tensor | None = None,
    seq_log_prob: torch.Tensor | None = None,
    correct: torch.Tensor | None = None,
    **params: Any,
) -> torch.Tensor:
    """Validate the inputs and run estimator ``name``; returns float32 advantages ``[n]``.

    ``lengths`` / ``seq_log_prob`` / ``correct`` are validated when given and passed only to estimators that use them
    (so a trainer can always pass them). ``correct`` (bool ``[n]``) says which samples are right for the estimators
    that split right from wrong (``psr``, ``nsr``, ``signed_reward``, ``w_reinforce``, ``passk``); without it they
    compare ``rewards`` with ``correct_threshold`` in the rewards' own precision (a float32 0.7 reaches a threshold of
    0.7, as it does in :class:`entrorl.rewards.RewardRunner`). Unknown ``params`` raise ``ValueError`` listing the
    valid ones; so do advantages that overflow float32 (rewards near its largest value), rather than train on ``inf``.
    """
    entry = _entry(name)
    unknown = sorted(set(params) - set(entry.info.params))
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in entry.info.params.items()) or "(none)"
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for advantage estimator {name!r}; valid parameters: {valid}"
        )
    r, g = _check_rewards_groups(rewards, group_ids)
    data: dict[str, torch.Tensor | None] = {
        "lengths": None if lengths is None else _check_lengths(lengths, r),
        "seq_log_prob": None if seq_log_prob is None else _check_seq_log_prob(seq_log_prob, r),
        "correct": None if correct is None else _check_correct(correct, r),
    }
    if data["correct"] is None and "correct" in entry.data_kwargs and "correct_threshold" in entry.info.params:
        threshold = params.get("correct_threshold", entry.info.params["correct_threshold"])
        given = _as_tensor(rewards, "rewards", exact=True)
        data["correct"] = _is_correct(given if given.is_floating_point() else r, threshold).to(r.device)
    kwargs = {k: data[k] for k in entry.data_kwargs}
    home = rewards.device if torch.is_tensor(rewards) else r.device  # the rewards' device, whatever r's is
    out = entry.fn(r, g, **kwargs, **params).to(device=home, dtype=torch.float32)
    if not bool(torch.isfinite(out).all()):
        given = "".join(f", {key}={value!r}" for key, value in params.items())
        raise AdvantageOverflow(
            f"advantage estimator {name!r} gave advantages beyond float32's largest value, "
            f"{torch.finfo(torch.float32).max:.3g} (rewards up to |R| = {float(r.abs().max()):.3g}{given}): rescale "
            "the rewards" + (" or the parameters" if params else "")
        )
    return out


# --------------------------------------------------------------------------------------------------
# validation and group statistics
# --------------------------------------------------------------------------------------------------


def _as_tensor(x: Any, what: str, *, exact: bool = False) -> torch.Tensor:
    """``x`` as a tensor; with ``exact``, Python floats stay float64 and an empty list is integers
    (:func:`entrorl._checks.as_tensor`), for inputs that are read in float64 or as ids anyway."""
    if isinstance(x, torch.Tensor):
        return x
    try:
        return as_tensor(x) if exact else torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{what} must be a tensor (or convertible to one): {e}") from None


def _check_1d(x: torch.Tensor, what: str, n: int | None = None, ref: str = "rewards") -> None:
    if x.dim() != 1:
        raise ValueError(f"{what} must be 1-D [n] (one value per sampled response), got shape {tuple(x.shape)}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{what} has {x.shape[0]} entries but {ref} has {n}; they must have the same length")


def _check_finite(x: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        idx = torch.nonzero(bad).flatten()
        raise ValueError(
            f"{what} has {idx.numel()} non-finite value(s) (NaN/inf), first at index {int(idx[0])}: "
            f"{float(x[idx[0]])}"
        )


def _check_rewards_groups(
    rewards: Any, group_ids: Any, what: str = "rewards"
) -> tuple[torch.Tensor, torch.Tensor]:
    r = _as_tensor(rewards, what, exact=True)
    g = _as_tensor(group_ids, "group_ids", exact=True)
    _check_1d(r, what)
    if r.is_complex():
        raise ValueError(f"{what} must be real numbers, got a complex tensor")
    r = in_float64(r)  # on the CPU for an Apple GPU, which has no float64
    _check_finite(r, what)
    _check_1d(g, "group_ids", r.shape[0], what)
    if g.is_floating_point() or g.is_complex() or g.dtype == torch.bool:
        raise ValueError(
            f"group_ids must be an integer tensor (one prompt id per sample), got dtype {g.dtype}; "
            "map prompt uids to integers first"
        )
    return r, g.to(device=r.device, dtype=torch.int64)


def _check_correct(correct: Any, r: torch.Tensor) -> torch.Tensor:
    c = _as_tensor(correct, "correct", exact=True)
    _check_1d(c, "correct", r.shape[0])
    if c.dtype != torch.bool:
        raise ValueError(f"correct must be a boolean tensor (is each sample right), got dtype {c.dtype}")
    return c.to(r.device)


def _check_lengths(lengths: Any, r: torch.Tensor) -> torch.Tensor:
    ln = _as_tensor(lengths, "lengths", exact=True)
    _check_1d(ln, "lengths", r.shape[0])
    ln = ln.to(r.device).to(torch.float64)  # moved, then widened: an Apple GPU refuses both in one copy
    _check_finite(ln, "lengths")
    if bool((ln < 0).any()) or bool((ln != torch.round(ln)).any()):
        raise ValueError("lengths must be non-negative integer token counts")
    return ln


def _check_seq_log_prob(seq_log_prob: Any, r: torch.Tensor) -> torch.Tensor:
    lp = _as_tensor(seq_log_prob, "seq_log_prob", exact=True)
    _check_1d(lp, "seq_log_prob", r.shape[0])
    lp = lp.to(r.device).to(torch.float64)
    _check_finite(lp, "seq_log_prob")
    return lp


@dataclass
class _GroupStats:
    inverse: torch.Tensor  # [n] group index in 0..G-1
    count: torch.Tensor  # [n] int64, size of the sample's group
    mean: torch.Tensor  # [n] float64, exact value for constant groups
    std: torch.Tensor  # [n] float64, unbiased; 0 for singletons and constant groups
    constant: torch.Tensor  # [n] bool, all values of the sample's group are equal (singletons included)


def _group_stats(values: torch.Tensor, group_ids: torch.Tensor) -> _GroupStats:
    """Per-sample group statistics in float64, vectorised (no Python loop over groups)."""
    v = values.to(torch.float64)
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    cnt = torch.zeros(n_groups, dtype=torch.int64, device=v.device).index_add_(0, inv, torch.ones_like(inv))
    total = torch.zeros(n_groups, dtype=torch.float64, device=v.device).index_add_(0, inv, v)
    mean_g = total / cnt.to(torch.float64)
    gmax = torch.full((n_groups,), -math.inf, dtype=torch.float64, device=v.device)
    gmax = gmax.scatter_reduce(0, inv, v, reduce="amax", include_self=True)
    gmin = torch.full((n_groups,), math.inf, dtype=torch.float64, device=v.device)
    gmin = gmin.scatter_reduce(0, inv, v, reduce="amin", include_self=True)
    const_g = gmax == gmin
    # A constant group's mean is its value exactly (sum / count can be off by an ulp), so that
    # values - mean is exactly 0 there.
    mean_g = torch.where(const_g, gmax, mean_g)
    mean = mean_g[inv]
    sq = torch.zeros(n_groups, dtype=torch.float64, device=v.device).index_add_(0, inv, (v - mean) ** 2)
    denom = (cnt - 1).clamp(min=1).to(torch.float64)
    std_g = torch.where(const_g | (cnt < 2), torch.zeros_like(sq), torch.sqrt(sq / denom))
    return _GroupStats(inverse=inv, count=cnt[inv], mean=mean, std=std_g[inv], constant=const_g[inv])


def group_mean_std(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample group statistics: ``(mean [n], std [n], count [n])``.

    ``mean[i]`` / ``std[i]`` / ``count[i]`` are the mean, unbiased (N - 1) standard deviation and size of
    the group sample ``i`` belongs to. A singleton group has std 0 here (the unbiased std is undefined);
    estimators apply their own singleton convention. Vectorised with ``index_add`` / ``scatter_reduce``.
    mean and std have the dtype of ``values`` if it is floating point, float64 otherwise (float32 on an Apple GPU);
    count is int64. All three are on the device of ``values``.
    """
    v, g = _check_rewards_groups(values, group_ids, "values")
    st = _group_stats(v, g)
    vin = _as_tensor(values, "values")
    dtype = vin.dtype if vin.is_floating_point() else widest_float(vin.device)
    return st.mean.to(device=vin.device, dtype=dtype), st.std.to(device=vin.device, dtype=dtype), st.count.to(vin.device)


def expand_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Broadcast per-sample advantages ``[n]`` to tokens: ``out[i, t] = advantages[i]`` where ``mask[i, t]``,
    0 elsewhere. ``mask`` is ``[n, T]`` (bool, or 0/1 numbers: nonzero means valid)."""
    a = _as_tensor(advantages, "advantages")
    m = _as_tensor(mask, "mask")
    _check_1d(a, "advantages")
    if m.dim() != 2 or m.shape[0] != a.shape[0]:
        raise ValueError(
            f"mask must be [n, T] with n = {a.shape[0]} (the number of advantages), got shape {tuple(m.shape)}"
        )
    m = m.to(a.device)
    m = m if m.dtype == torch.bool else m != 0
    return torch.where(m, a.unsqueeze(1), torch.zeros((), dtype=a.dtype, device=a.device))


def _check_threshold(correct_threshold: float) -> None:
    if not is_real_number(correct_threshold) or not math.isfinite(correct_threshold):
        raise ValueError(f"correct_threshold must be a finite number (a reward at or above it is correct), "
                         f"got {correct_threshold!r}")


def _is_correct(rewards: torch.Tensor, correct_threshold: float) -> torch.Tensor:
    _check_threshold(correct_threshold)
    return rewards >= correct_threshold


def _verdicts(r: torch.Tensor, correct: torch.Tensor | None, correct_threshold: float) -> torch.Tensor:
    """``correct`` as given, else ``r >= correct_threshold``; the threshold is checked either way."""
    if correct is None:
        return _is_correct(r, correct_threshold)
    _check_threshold(correct_threshold)
    return correct


def _token_whiten(x: torch.Tensor, lengths: torch.Tensor | None, epsilon: float) -> torch.Tensor:
    """Global whitening of per-sample values repeated over their tokens (weights = lengths, or 1 each).

    mean = sum w x / W, var = sum w (x - mean)^2 / (W - 1) with W = sum w (unbiased, over tokens),
    out = (x - mean) / (std + epsilon). Zero-length samples carry no token and get 0. If the values of
    all samples with tokens are equal (or there is a single token), every output is exactly 0.
    """
    w = torch.ones_like(x) if lengths is None else lengths.to(x)
    if x.numel() == 0:
        return x.clone()
    total = float(w.sum())
    if total <= 0:
        raise ValueError("lengths sum to zero: there is no valid token to whiten over")
    has_tok = w > 0
    xs = x[has_tok]
    if bool((xs == xs[0]).all()):
        return torch.zeros_like(x)
    mean = (w * x).sum() / total
    var = (w * (x - mean) ** 2).sum() / (total - 1.0)
    out = (x - mean) / (torch.sqrt(var) + epsilon)
    return torch.where(has_tok, out, torch.zeros_like(out))


def _check_eps(epsilon: float, name: str) -> None:
    if not (is_real_number(epsilon) and math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"{name}: epsilon must be a finite number >= 0, got {epsilon!r}")


# --------------------------------------------------------------------------------------------------
# estimators
# --------------------------------------------------------------------------------------------------


@register_advantage(
    "grpo",
    description="Group-normalised advantage (R - mean_g) / (std_g + eps); std optional (False = Dr. GRPO), or the "
                "batch's (std_scope='batch', Lite PPO / TRL's scale_rewards='batch').",
    paper="DeepSeekMath / GRPO, arXiv 2402.03300",
)
def grpo(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    norm_adv_by_std_in_grpo: bool = True,
    epsilon: float = 1e-6,
    std_scope: str = "group",
) -> torch.Tensor:
    """GRPO outcome advantage (arXiv 2402.03300): ``A_i = (R_i - mean_g) / (std_g + epsilon)``.

    ``std_g`` is the unbiased (N - 1) group std, as verl's ``torch.std``. With
    ``norm_adv_by_std_in_grpo=False``: ``A_i = R_i - mean_g``. A singleton group gets mean 0 and std 1
    (verl's convention), i.e. ``A = R / (1 + epsilon)`` (``A = R`` without std). A group of equal rewards
    gets exactly 0. ``std_scope="batch"`` divides by the unbiased std of every reward of the batch instead (group
    mean, batch std: Lite PPO, arXiv 2508.08221; TRL's ``scale_rewards="batch"``), singletons included; a batch
    without a std (one reward, or equal ones) takes std 1, as a singleton group does.
    """
    _check_eps(epsilon, "grpo")
    if norm_adv_by_std_in_grpo not in (True, False):
        raise ValueError(f"norm_adv_by_std_in_grpo must be True or False, got {norm_adv_by_std_in_grpo!r}")
    if std_scope not in ("group", "batch"):
        raise ValueError(f"std_scope must be 'group' or 'batch', got {std_scope!r}")
    if std_scope == "batch" and not norm_adv_by_std_in_grpo:
        raise ValueError("std_scope='batch' says which std to divide by, and norm_adv_by_std_in_grpo=False divides by "
                         "none: leave std_scope at 'group', or divide by the std")
    r, g = _check_rewards_groups(rewards, group_ids)
    adv, st = _group_centred(r, g)
    single = st.count == 1
    if std_scope == "batch":
        values = r.to(torch.float64)
        batch_std = values.std() if values.numel() > 1 and bool((values != values[0]).any()) else values.new_ones(())
        adv = adv / (batch_std + epsilon)
    elif norm_adv_by_std_in_grpo:
        std = torch.where(single, torch.ones_like(st.std), st.std)
        adv = adv / (std + epsilon)
    adv = torch.where(st.constant & ~single, torch.zeros_like(adv), adv)  # 0 / 0 with epsilon = 0
    return adv.to(torch.float32)


def _group_centred(r: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, _GroupStats]:
    """``R_i - mean_g`` in float64 (a singleton group's baseline is 0, a constant group gives exactly 0), and the
    group statistics."""
    st = _group_stats(r, g)
    single = st.count == 1
    centred = r.to(torch.float64) - torch.where(single, torch.zeros_like(st.mean), st.mean)
    return torch.where(st.constant & ~single, torch.zeros_like(centred), centred), st


@register_advantage(
    "dr_grpo",
    description="Dr. GRPO: group-mean baseline without std division, A = R - mean_g.",
    paper="Understanding R1-Zero-Like Training (Dr. GRPO), arXiv 2503.20783",
)
def dr_grpo(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO (arXiv 2503.20783): ``A_i = R_i - mean_g`` (no std normalisation, removing the
    question-difficulty bias). Singleton group: ``A = R``. Pair with a constant-normaliser aggregation
    (verl ``seq-mean-token-sum-norm``)."""
    return grpo(rewards, group_ids, norm_adv_by_std_in_grpo=False)


@register_advantage(
    "rloo",
    description="REINFORCE leave-one-out: A_i = R_i - mean of the other samples of the group.",
    paper="Back to Basics: Revisiting REINFORCE Style Optimization (RLOO), arXiv 2402.14740",
)
def rloo(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """RLOO (arXiv 2402.14740): ``A_i = R_i - (sum_g - R_i)/(G - 1) = (G R_i - sum_g)/(G - 1)``,
    computed as ``G/(G - 1) (R_i - mean_g)`` (same value; exact 0 for equal rewards). A singleton group
    has no other sample: ``A = R``."""
    r, g = _check_rewards_groups(rewards, group_ids)
    st = _group_stats(r, g)
    cnt = st.count.to(torch.float64)
    single = st.count == 1
    scale = torch.where(single, torch.ones_like(cnt), cnt / (cnt - 1).clamp(min=1))
    adv = torch.where(single, r, scale * (r - st.mean))
    return adv.to(torch.float32)


@register_advantage(
    "reinforce_pp",
    description="REINFORCE++: outcome return (gamma=1) on every token, global token-weighted whitening.",
    paper="REINFORCE++, arXiv 2501.03262",
)
def reinforce_pp(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    lengths: torch.Tensor | None = None,
    epsilon: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++ (arXiv 2501.03262) with an outcome reward and gamma = 1: every token of response i
    has return ``R_i``; the returns are whitened over all valid tokens of the batch::

        W = sum_i L_i,  mean = sum_i L_i R_i / W,  var = sum_i L_i (R_i - mean)^2 / (W - 1)
        A_i = (R_i - mean) / (sqrt(var) + epsilon)

    with ``L_i = lengths[i]`` (each sample counts once per token) or 1 when ``lengths`` is None. The
    variance is the unbiased token-count-weighted one (denominator W - 1, as verl's ``masked_whiten``;
    verl then multiplies by ``rsqrt(var + 1e-8)`` where this uses ``/(std + epsilon)``). Group ids are
    not used. No per-token KL reward shaping is included. Zero-length samples get 0; a batch of equal
    returns gets 0.
    """
    _check_eps(epsilon, "reinforce_pp")
    r, g = _check_rewards_groups(rewards, group_ids)
    ln = None if lengths is None else _check_lengths(lengths, r)
    return _token_whiten(r, ln, epsilon).to(torch.float32)


@register_advantage(
    "reinforce_pp_baseline",
    description="REINFORCE++ with a group-mean baseline: R - mean_g, then global token-weighted whitening.",
    paper="REINFORCE++, arXiv 2501.03262",
)
def reinforce_pp_baseline(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    lengths: torch.Tensor | None = None,
    epsilon: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++-baseline (arXiv 2501.03262): ``x_i = R_i - mean_g`` (singleton group: baseline 0),
    then the same global token-weighted whitening as :func:`reinforce_pp` (unbiased, W - 1)."""
    _check_eps(epsilon, "reinforce_pp_baseline")
    r, g = _check_rewards_groups(rewards, group_ids)
    ln = None if lengths is None else _check_lengths(lengths, r)
    centred, _ = _group_centred(r, g)  # in float64: centring in float32 overflowed rewards near its largest
    return _token_whiten(centred, ln, epsilon).to(torch.float32)


@register_advantage(
    "w_reinforce",
    description="Weighted REINFORCE: +lam for correct, -1 for incorrect samples, no baseline.",
    paper="The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning, arXiv 2506.01347",
)
def w_reinforce(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    correct: torch.Tensor | None = None,
    lam: float = 0.1,
    correct_threshold: float = 0.5,
) -> torch.Tensor:
    """W-REINFORCE (arXiv 2506.01347, Eq. 9, ``L = lam L_PSR + L_NSR``): ``A = +lam`` if
    ``R >= correct_threshold`` (or ``correct``, when given) else ``-1``. No baseline, no std. ``lam = 1`` is
    REINFORCE with ±1 rewards, ``lam = 0`` is NSR. The default threshold 0.5 works for 0/1 and ±1 rewards.

    The ``w_reinforce`` *method* gets the same advantages another way: ``signed_reward``'s ±1, whose positive part its
    ``positive_scale`` shaper multiplies by ``lam``. Give this estimator to a method without that shaper (``grpo``,
    ``dapo``); with the ``w_reinforce`` method the correct samples would get ``lam ** 2``."""
    if not (is_real_number(lam) and math.isfinite(lam) and lam >= 0.0):  # a negative lam would penalise correct samples
        raise ValueError(f"w_reinforce: lam must be a finite number >= 0 (lam = 0 is NSR), got {lam!r}")
    r, _ = _check_rewards_groups(rewards, group_ids)
    correct = _verdicts(r, correct, correct_threshold)
    return torch.where(correct, torch.full_like(r, float(lam)), torch.full_like(r, -1.0)).to(torch.float32)


@register_advantage(
    "signed_reward",
    description="REINFORCE on +1 / -1 rewards: +1 for correct, -1 for incorrect, no baseline.",
    paper="The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning, arXiv 2506.01347",
)
def signed_reward(rewards: torch.Tensor, group_ids: torch.Tensor, *, correct: torch.Tensor | None = None,
                  correct_threshold: float = 0.5) -> torch.Tensor:
    """The reward ``r(x, y) in {-1, +1}`` of arXiv 2506.01347 (Eq. 1) used directly as the advantage:
    ``A = +1`` if ``R >= correct_threshold`` else ``-1``. The ``w_reinforce`` method scales its positive part
    by lambda inside the objective; ``psr`` / ``nsr`` keep one sign."""
    r, _ = _check_rewards_groups(rewards, group_ids)
    return _verdicts(r, correct, correct_threshold).to(torch.float32) * 2.0 - 1.0


@register_advantage(
    "psr",
    description="Positive-sample reinforcement only: A = 1 for correct, 0 for incorrect.",
    paper="The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning, arXiv 2506.01347",
)
def psr(rewards: torch.Tensor, group_ids: torch.Tensor, *, correct: torch.Tensor | None = None,
        correct_threshold: float = 0.5) -> torch.Tensor:
    """PSR (arXiv 2506.01347): ``A = 1`` if ``R >= correct_threshold`` else ``0`` (trains on correct
    samples only; sharpens the distribution)."""
    r, _ = _check_rewards_groups(rewards, group_ids)
    return _verdicts(r, correct, correct_threshold).to(torch.float32)


@register_advantage(
    "nsr",
    description="Negative-sample reinforcement only: A = 0 for correct, -1 for incorrect.",
    paper="The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning, arXiv 2506.01347",
)
def nsr(rewards: torch.Tensor, group_ids: torch.Tensor, *, correct: torch.Tensor | None = None,
        correct_threshold: float = 0.5) -> torch.Tensor:
    """NSR (arXiv 2506.01347): ``A = 0`` if ``R >= correct_threshold`` else ``-1`` (trains on incorrect
    samples only; keeps entropy near the base model's)."""
    r, _ = _check_rewards_groups(rewards, group_ids)
    return _verdicts(r, correct, correct_threshold).to(torch.float32) - 1.0


def _passk_group(n: int, n_neg: int, k: int) -> tuple[float, float]:
    """(A_pos, A_neg) for a group of n samples with n_neg incorrect, exact rationals then float64."""
    if n_neg == 0 or n_neg == n:
        return 0.0, 0.0
    q = Fraction(math.comb(n_neg, k), math.comb(n, k))  # = 1 - R_bar
    p_all_neg = Fraction(math.comb(n_neg - 1, k - 1), math.comb(n - 1, k - 1))
    sigma = math.sqrt(float(q * (1 - q)))
    a_pos = float(q) / (sigma + 1e-6)
    a_neg = float(q - p_all_neg) / (sigma + 1e-6)
    return a_pos, a_neg


@register_advantage(
    "passk",
    description="Pass@k training: analytic group advantage of the max-over-k-subsets reward.",
    paper="Pass@k Training for Adaptively Balancing Exploration and Exploitation, arXiv 2508.10751",
)
def passk(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    correct: torch.Tensor | None = None,
    k: int = 4,
    correct_threshold: float = 0.5,
) -> torch.Tensor:
    """Pass@k training (arXiv 2508.10751), analytic advantage. Per group of N samples, N_neg incorrect
    (``R < correct_threshold``, or not ``correct`` when given)::

        R_bar = 1 - C(N_neg, k) / C(N, k)          (expected pass@k reward of a k-subset)
        sigma = sqrt(R_bar (1 - R_bar))
        A_pos = (1 - R_bar) / (sigma + 1e-6)
        A_neg = (1 - R_bar - C(N_neg - 1, k - 1) / C(N - 1, k - 1)) / (sigma + 1e-6)

    Binomials are exact integers (``math.comb``) combined as exact fractions, then float64. All-correct
    and all-wrong groups get 0; so does a group with N_neg < k (every k-subset passes: both numerators
    are exactly 0). A group with fewer than k samples raises ``ValueError``.
    """
    k = check_int(k, "passk: k", minimum=1)
    r, g = _check_rewards_groups(rewards, group_ids)
    correct = _verdicts(r, correct, correct_threshold)
    adv = torch.zeros_like(r)
    if r.numel() == 0:
        return adv.to(torch.float32)
    uniq, inv = torch.unique(g, return_inverse=True)
    n_groups = uniq.numel()
    cnt = torch.zeros(n_groups, dtype=torch.int64, device=r.device).index_add_(0, inv, torch.ones_like(inv))
    neg = torch.zeros(n_groups, dtype=torch.int64, device=r.device).index_add_(0, inv, (~correct).long())
    a_pos = torch.zeros(n_groups, dtype=torch.float64)
    a_neg = torch.zeros(n_groups, dtype=torch.float64)
    for j, (gid, n, n_neg) in enumerate(zip(uniq.tolist(), cnt.tolist(), neg.tolist())):
        if n < k:
            raise ValueError(
                f"passk: group {gid} has {n} sample(s), fewer than k = {k}; sample at least k responses "
                "per prompt or lower k"
            )
        a_pos[j], a_neg[j] = _passk_group(n, n_neg, k)
    a_pos, a_neg = a_pos.to(r.device), a_neg.to(r.device)
    adv = torch.where(correct, a_pos[inv], a_neg[inv])
    return adv.to(torch.float32)


def unlikeliness_shaped_rewards(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    seq_log_prob: torch.Tensor,
    beta_rank: float = 0.25,
) -> torch.Tensor:
    """Unlikeliness reward shaping (Rewarding the Unlikely, arXiv 2506.02355), float64 ``[n]``.

    Within each group of size G, ``rank_i`` = (number of samples of the group with a smaller
    ``seq_log_prob``, ties broken by sample index) / G, so 0 is the least likely sample and
    (G - 1)/G the most likely, among all G samples, wrong ones included (the released code's ranking);
    ``R'_i = R_i (1 - beta_rank * rank_i)``. With 0/1 rewards only correct samples change: a correct one that is the
    most likely of its group gets ``1 - beta_rank (G - 1)/G``. The paper's rewards are >= 0; a
    negative reward (a ±1 reward, DAPO's overlong penalty) loses the same share ``|R_i| beta_rank rank_i`` instead,
    ``R'_i = R_i (1 + beta_rank * rank_i)``, so that the more likely of two equal rewards always ends lower
    (multiplying would favour the likely one).
    """
    r, g = _check_rewards_groups(rewards, group_ids)
    if seq_log_prob is None:
        raise ValueError(_MISSING_LOGP)
    lp = _check_seq_log_prob(seq_log_prob, r)
    if not (is_real_number(beta_rank) and 0.0 <= beta_rank <= 1.0):
        raise ValueError(f"beta_rank must be a number in [0, 1] (the paper uses 0.25; above 1 a likely correct sample "
                         f"would end below a wrong one), got {beta_rank!r}")
    n = r.numel()
    if n == 0:
        return r.clone()
    _, inv = torch.unique(g, return_inverse=True)
    # Sort by log-prob (stable: ties keep index order), then stably by group: the position of a sample
    # inside its group's block is its rank.
    order = torch.sort(lp, stable=True).indices
    order = order[torch.sort(inv[order], stable=True).indices]
    n_groups = int(inv.max()) + 1
    cnt = torch.zeros(n_groups, dtype=torch.int64, device=r.device).index_add_(0, inv, torch.ones_like(inv))
    start = torch.cumsum(cnt, 0) - cnt
    pos = torch.arange(n, device=r.device) - start[inv[order]]
    rank = torch.empty(n, dtype=torch.int64, device=r.device)
    rank[order] = pos
    frac = rank.to(torch.float64) / cnt[inv].to(torch.float64)
    return r - float(beta_rank) * frac * r.abs()


_MISSING_LOGP = (
    "the 'unlikely' estimator needs seq_log_prob: the length-normalised sequence log-prob of each response "
    "under the old (sampling) policy, e.g. (old_log_prob * mask).sum(-1) / mask.sum(-1); pass it as "
    "compute_advantages(..., seq_log_prob=...)"
)


@register_advantage(
    "unlikely",
    description="Unlikeliness reward: scale R by 1 - beta_rank * rank/G (rank by old-policy likelihood; a negative R "
    "by 1 + beta_rank * rank/G), then GRPO.",
    paper="Rewarding the Unlikely: Lifting GRPO Beyond Distribution Sharpening, arXiv 2506.02355",
)
def unlikely(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    seq_log_prob: torch.Tensor | None = None,
    beta_rank: float = 0.25,
    epsilon: float = 1e-6,
) -> torch.Tensor:
    """Rewarding the Unlikely (arXiv 2506.02355): ``R' = R (1 - beta_rank * rank / G)`` (``R (1 + beta_rank *
    rank / G)`` for ``R < 0``) with the within-group likelihood rank of :func:`unlikeliness_shaped_rewards`, then GRPO
    on R':
    ``A = (R' - mean_g(R')) / (std_g(R') + epsilon)`` (unbiased std; same singleton / equal-reward
    conventions as ``grpo``). Requires ``seq_log_prob``."""
    if seq_log_prob is None:
        raise ValueError(_MISSING_LOGP)
    _check_eps(epsilon, "unlikely")
    shaped = unlikeliness_shaped_rewards(rewards, group_ids, seq_log_prob, beta_rank=beta_rank)
    return grpo(shaped, group_ids, norm_adv_by_std_in_grpo=True, epsilon=epsilon)
