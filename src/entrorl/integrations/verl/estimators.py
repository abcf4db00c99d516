"""entrorl's advantage estimators in verl's estimator registry, as ``entrorl_<estimator>``.

Select one with ``algorithm.adv_estimator=entrorl_rloo``. verl calls it in the driver with
``token_level_rewards``, ``response_mask``, ``config`` (the ``algorithm`` section) and ``index`` (the prompt uid
of each response); it returns ``(advantages, returns)``, both ``[B, T]``: the outcome reward of a response is the
sum of its token-level rewards, the per-response advantage of :func:`entrorl.advantages.compute_advantages` is
put on every valid token, and the returns equal the advantages (as verl's GRPO does).

Parameters: the estimator's defaults, then verl's ``algorithm.norm_adv_by_std_in_grpo`` for ``entrorl_grpo``,
then the mapping ``algorithm.entrorl`` (``+algorithm.entrorl.k=8``; an unknown name is an error listing the
valid ones). ``entrorl_reinforce_pp`` is undiscounted: an ``algorithm.gamma`` other than 1 (which verl's own
``reinforce_plus_plus`` applies to returns-to-go) is refused, and so is ``algorithm.use_kl_in_reward`` (a KL penalty
on every token, which verl's own turns into returns-to-go and one outcome per response cannot hold). ``entrorl_unlikely`` needs the old policy's
log-probs, which verl passes to no custom estimator: it raises unless its caller passes ``old_log_probs``.

The driver looks estimators up, and the actor extension is not imported there: load this module in the driver
with ``VERL_USE_EXTERNAL_MODULES=entrorl.integrations.verl`` (or through the ``verl.plugins`` entry point that
installing entrorl declares).

verl hands an estimator its ``algorithm`` section only; when that is a node of verl's whole configuration (as verl's
trainers pass it), the estimator also reads the actor's ``policy_loss.loss_mode`` and refuses two pairings that
silently change the method: ``entrorl_w_reinforce`` with a loss mode that scales positive advantages by lambda
itself (``entrorl_w_reinforce``: lambda squared; its estimator is ``entrorl_signed_reward``), and verl's
rollout-correction bypass mode with ``entrorl_tis`` / ``entrorl_icepop`` (their weights become 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from entrorl.advantages import advantage_info, available_advantages, compute_advantages, expand_to_tokens
from entrorl.integrations.verl.losses import LOSS_MODE_PREFIX, check_verl_version, config_get
from entrorl.objective import build_objective
from verl.trainer.ppo.core_algos import register_adv_est

__all__ = ["ESTIMATOR_PREFIX", "estimator_name", "make_advantage_estimator", "register_advantage_estimators"]

ESTIMATOR_PREFIX = "entrorl_"

# verl's own algorithm keys that carry an entrorl estimator parameter of the same name.
_VERL_ALGORITHM_KEYS = ("norm_adv_by_std_in_grpo",)


def estimator_name(estimator: str) -> str:
    """The verl ``adv_estimator`` name of an entrorl estimator: ``entrorl_<estimator>``."""
    return f"{ESTIMATOR_PREFIX}{estimator}"


def _group_ids(index: Any, n: int, name: str) -> torch.Tensor:
    """Integer group ids from verl's per-response prompt uids (strings or numbers), in order of first appearance."""
    if index is None:
        raise ValueError(f"verl adv_estimator {name!r} needs verl's 'index' (the prompt uid of each response) to form groups")
    uids = np.asarray(index, dtype=object).reshape(-1)
    if uids.shape[0] != n:
        raise ValueError(f"verl adv_estimator {name!r}: index has {uids.shape[0]} uids for {n} responses")
    ids: dict[Any, int] = {}
    return torch.tensor([ids.setdefault(uid, len(ids)) for uid in uids.tolist()], dtype=torch.int64)


def _check_group_sizes(index: Any, k: Any, name: str) -> None:
    """Each prompt uid has at least ``k`` responses (Pass@k advantages need k of them), else an error naming the uid
    and verl's setting, not a group number of entrorl's own."""
    if not isinstance(k, int) or isinstance(k, bool):
        return  # the estimator's own check names the bad value
    counts: dict[Any, int] = {}
    for uid in np.asarray(index, dtype=object).reshape(-1).tolist():
        counts[uid] = counts.get(uid, 0) + 1
    short = [(uid, n) for uid, n in counts.items() if n < k]
    if short:
        uid, n = short[0]
        raise ValueError(f"verl adv_estimator {name!r}: prompt uid {uid!r} has {n} response(s), fewer than k = {k}"
                         + (f" ({len(short)} prompts in all)" if len(short) > 1 else "")
                         + ": set actor_rollout_ref.rollout.n to at least k, or algorithm.entrorl.k lower")


def _parameters(estimator: str, defaults: Mapping[str, Any], config: Any) -> dict[str, Any]:
    params = {key: config_get(config, key) for key in _VERL_ALGORITHM_KEYS if key in defaults and config_get(config, key) is not None}
    explicit = config_get(config, "entrorl") or {}
    if not isinstance(explicit, Mapping):
        raise ValueError(f"algorithm.entrorl must be a mapping of {estimator!r} parameters, got {type(explicit).__name__}")
    params.update({str(key): value for key, value in dict(explicit).items()})
    return params


def _configured_loss_mode(config: Any) -> str | None:
    """The actor's ``policy_loss.loss_mode`` when ``config`` is the ``algorithm`` node of verl's whole OmegaConf
    configuration (verl's trainers pass ``self.config.algorithm``); None when the estimator cannot see it."""
    get_root = getattr(config, "_get_root", None)
    if get_root is None:
        return None
    try:
        from omegaconf import OmegaConf

        loss_mode = OmegaConf.select(get_root(), "actor_rollout_ref.actor.policy_loss.loss_mode", default=None)
    except Exception:  # a node without a root, or a root of another shape: nothing to check
        return None
    return loss_mode if isinstance(loss_mode, str) else None


def _refuse_silent_pairings(estimator: str, config: Any) -> None:
    """Refuse an estimator / loss-mode pairing that changes the method without an error anywhere else."""
    loss_mode = _configured_loss_mode(config)
    if loss_mode is None or not loss_mode.startswith(LOSS_MODE_PREFIX):
        return
    try:
        objective = build_objective(loss_mode[len(LOSS_MODE_PREFIX):])
    except ValueError:
        return  # a method this process does not know: the actor reports it
    if estimator == "w_reinforce" and any(shaper.name == "positive_scale" for shaper in objective.shapers):
        raise ValueError(
            f"verl adv_estimator {estimator_name(estimator)!r} gives +lambda / -1 advantages and loss_mode {loss_mode!r} "
            "scales positive advantages by lambda again (lambda squared): set algorithm.adv_estimator=entrorl_signed_reward"
        )
    bypass = config_get(config_get(config, "rollout_correction"), "bypass_mode", False)
    if bypass and objective.correction is not None:
        raise ValueError(
            f"loss_mode {loss_mode!r} corrects by pi_old / pi_rollout, which verl's rollout-correction bypass mode makes 1 "
            "on every token (it uses the rollout log-probs as the old ones): set algorithm.rollout_correction.bypass_mode=False"
        )


def make_advantage_estimator(estimator: str):
    """A verl advantage-estimator function computing entrorl estimator ``estimator`` (see the module docstring)."""
    try:
        info = advantage_info(estimator)
    except ValueError:
        raise ValueError(f"unknown entrorl advantage estimator {estimator!r}; valid: "
                         f"{[i.name for i in available_advantages()]}") from None

    def advantage_estimator(
        token_level_rewards: torch.Tensor,
        response_mask: torch.Tensor,
        config: Any = None,
        index: Any = None,
        old_log_probs: torch.Tensor | None = None,
        **unused: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_verl_version()
        _refuse_silent_pairings(estimator, config)
        gamma = config_get(config, "gamma")
        if estimator == "reinforce_pp" and gamma is not None and gamma != 1:
            raise ValueError(
                f"verl adv_estimator {estimator_name(estimator)!r} computes REINFORCE++ from each response's outcome "
                f"reward, undiscounted; algorithm.gamma = {gamma} would discount the returns-to-go of verl's own "
                "reinforce_plus_plus: set algorithm.gamma=1.0, or use adv_estimator=reinforce_plus_plus")
        if estimator == "reinforce_pp" and config_get(config, "use_kl_in_reward", False):
            raise ValueError(
                f"verl adv_estimator {estimator_name(estimator)!r} computes REINFORCE++ from each response's outcome "
                "reward; algorithm.use_kl_in_reward puts a KL penalty on every token, which verl's own "
                "reinforce_plus_plus turns into returns-to-go and this estimator would sum into one outcome: keep the KL "
                "out of the reward (actor_rollout_ref.actor.use_kl_loss=True), or use adv_estimator=reinforce_plus_plus")
        mask = response_mask if response_mask.dtype == torch.bool else response_mask != 0
        # every position counts, as in verl's own estimators: verl may score a response on a token outside its mask
        # (an empty response's at column -1; an agent loop that ended on tool output, on the last tool token)
        rewards = token_level_rewards.sum(dim=-1)
        group_ids = _group_ids(index, rewards.shape[0], estimator_name(estimator)).to(rewards.device)
        lengths = mask.sum(dim=-1)
        seq_log_prob = None
        if old_log_probs is not None:
            seq_log_prob = torch.where(mask, old_log_probs, torch.zeros_like(old_log_probs)).sum(-1) / lengths.clamp(min=1)
        elif estimator == "unlikely":
            raise ValueError(
                f"verl adv_estimator {estimator_name(estimator)!r} needs the old policy's log-probs, which verl's trainer "
                "passes to none of the estimators it looks up by name (only to its own off-policy ones), so no setting "
                "makes it work there; use another estimator, or call this function with old_log_probs yourself"
            )
        params = _parameters(estimator, info.params, config)
        if "k" in info.params:
            _check_group_sizes(index, params.get("k", info.params["k"]), estimator_name(estimator))
        try:
            per_response = compute_advantages(
                estimator, rewards, group_ids, lengths=lengths, seq_log_prob=seq_log_prob, **params
            )
        except ValueError as error:
            raise ValueError(f"verl adv_estimator {estimator_name(estimator)!r}: {error} (parameters go in algorithm.entrorl)") from None
        advantages = expand_to_tokens(per_response.to(token_level_rewards.device), mask).to(
            torch.promote_types(token_level_rewards.dtype, torch.float32))  # bf16 rewards: float32 advantages
        return advantages, advantages.clone()

    advantage_estimator.__name__ = advantage_estimator.__qualname__ = f"compute_{estimator_name(estimator)}_advantage"
    advantage_estimator.__doc__ = f"verl advantage estimator {estimator_name(estimator)!r}: entrorl's {estimator!r} ({info.paper})."
    return advantage_estimator


_REGISTERED: dict[str, Any] = {}


def register_advantage_estimators() -> list[str]:
    """Register every entrorl advantage estimator in verl's registry as ``entrorl_<estimator>``; returns the names.
    Registering again (a second import route) is a no-op: verl refuses a different function under a taken name."""
    names = []
    for info in available_advantages():
        name = estimator_name(info.name)
        if name not in _REGISTERED:
            _REGISTERED[name] = make_advantage_estimator(info.name)
        register_adv_est(name)(_REGISTERED[name])
        names.append(name)
    return names
