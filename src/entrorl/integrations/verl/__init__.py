"""entrorl inside verl (0.9): every entrorl method as a verl policy-loss mode, entrorl's advantage estimators in
verl's estimator registry, entrorl's rewards as a ``custom_reward_function``, and an actor extension that gives
the losses entropy, S and D. Importing this module registers the losses and estimators; verl imports it in each
of its processes through the ``verl.plugins`` entry point entrorl declares, through
``VERL_USE_EXTERNAL_MODULES=entrorl.integrations.verl`` or through ``actor_rollout_ref.model.external_lib``.

* :mod:`~entrorl.integrations.verl.losses` — ``loss_mode=entrorl_<method>`` (``entrorl_clip_b``, ...);
* :mod:`~entrorl.integrations.verl.estimators` — ``adv_estimator=entrorl_<estimator>`` (``entrorl_rloo``, ...);
* :mod:`~entrorl.integrations.verl.rewards` — ``custom_reward_function.name=compute_score`` (and shortcuts);
* :mod:`~entrorl.integrations.verl.actor` — the statistics from the actor's logits, and the engine mixin that
  ``ENTRORL_VERL_ACTOR_EXTENSION=1`` installs;
* :mod:`~entrorl.integrations.verl.channel` — how those statistics reach the losses, and how the losses tell the
  actor which metrics verl must sum or take the maximum of.

See docs/verl.md for a complete launch.
"""

from entrorl.integrations.verl.actor import (
    TokenStatsEngineMixin,
    actor_extension_requested,
    actor_token_stats,
    enable_actor_extension,
    with_token_fields,
)
from entrorl.integrations.verl.channel import (
    TOKEN_FIELDS,
    collect_metric_aggregations,
    current_token_fields,
    provide_token_fields,
    record_metric_aggregations,
)
from entrorl.integrations.verl.estimators import estimator_name, make_advantage_estimator, register_advantage_estimators
from entrorl.integrations.verl.losses import (
    EntrorlPolicyLossConfig,
    entrorl_parameters,
    loss_mode_name,
    make_policy_loss,
    register_policy_losses,
    registered_loss_modes,
)
from entrorl.integrations.verl.rewards import compute_score, exact_match_score, math_score, reasoning_gym_score

__all__ = [
    "TOKEN_FIELDS",
    "EntrorlPolicyLossConfig",
    "TokenStatsEngineMixin",
    "actor_extension_requested",
    "actor_token_stats",
    "collect_metric_aggregations",
    "compute_score",
    "current_token_fields",
    "enable_actor_extension",
    "entrorl_parameters",
    "estimator_name",
    "exact_match_score",
    "loss_mode_name",
    "make_advantage_estimator",
    "make_policy_loss",
    "math_score",
    "provide_token_fields",
    "reasoning_gym_score",
    "record_metric_aggregations",
    "register_advantage_estimators",
    "register_policy_losses",
    "registered_loss_modes",
    "with_token_fields",
]

LOSS_MODES = register_policy_losses()
ADVANTAGE_ESTIMATORS = register_advantage_estimators()
if actor_extension_requested():
    enable_actor_extension()
