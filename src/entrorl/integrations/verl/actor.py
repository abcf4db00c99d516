"""The actor extension: entropy, S and D from verl's actor logits, handed to entrorl's policy losses.

verl's actor turns the logits of each micro-batch into log-probs (and, on request, entropy), then calls the
policy loss without them. Methods that select or shape tokens by entropy statistics (``forking_tokens``,
``low_entropy_tokens``, ``clip_b``, ``clip_v``, ``entropy_advantage``, ``entropy_bonus``, ``adaptive_entropy``)
need, per response token, with ``p = softmax(z / T)`` and ``y`` the sampled token:

* ``entropy``        ``H = -sum_v p_v log p_v`` (differentiable)
* ``disc``           ``S = p_y (log p_y + H)``                 (arXiv 2602.03392)
* ``disc_centered``  ``D = S - sum_v p_v^2 (log p_v + H)``     (arXiv 2602.03392, Thm 3.3)

The extension has three pieces, each usable alone:

* :func:`actor_token_stats` — the statistics of packed or padded logits with entrorl's chunked pass
  (:func:`entrorl.tokens.token_stats`): no second ``[N, V]`` tensor, float32 whatever the logits' dtype.
* :class:`TokenStatsEngineMixin` — a mixin for verl's FSDP language-model engine. Its ``prepare_model_outputs``
  adds ``entrorl_entropy`` / ``entrorl_disc`` / ``entrorl_disc_centered`` to the model output (same packed layout
  as ``log_probs``), computed only for the statistics the configured ``entrorl_<method>`` loss needs; its
  ``forward_step`` wraps the loss function with :func:`with_token_fields`.
* :func:`with_token_fields` — wraps a verl engine loss function ``fn(model_output, data, dp_group)``: it pads
  those statistics to ``[B, T]`` like verl pads ``log_probs``, adds verl's ``ref_log_prob`` and
  ``rollout_log_probs`` when the batch has them, and opens :func:`entrorl.integrations.verl.channel.provide_token_fields`
  around the call, so the ``entrorl_<method>`` loss called inside finds them. It also gives the metrics the loss
  marks as partial sums or maxima verl's ``SUM`` / ``MAX`` aggregation (verl's ``ppo_loss`` types a policy loss's
  metrics as means), so that verl's aggregation over micro-batches and ranks gives the step's value.

:func:`enable_actor_extension` puts the mixin into verl: it registers a subclass of verl's FSDP language-model
engine in place of the original (backends ``fsdp`` and ``fsdp2``). Importing :mod:`entrorl.integrations.verl`
calls it when the environment variable ``ENTRORL_VERL_ACTOR_EXTENSION=1`` is set (propagate it to the Ray
workers with ``+ray_kwargs.ray_init.runtime_env.env_vars.ENTRORL_VERL_ACTOR_EXTENSION='"1"'``). A custom actor can
call :func:`actor_token_stats` itself and pass the results to the loss as keyword arguments.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch

from entrorl._checks import widest_float
from entrorl.integrations.verl.channel import collect_metric_aggregations, provide_token_fields
from entrorl.integrations.verl.losses import LOSS_MODE_PREFIX, config_get, entrorl_parameters
from entrorl.objective import build_objective
from entrorl.tokens import token_stats

__all__ = [
    "LOGIT_STATS",
    "MODEL_OUTPUT_KEYS",
    "ACTOR_EXTENSION_ENV",
    "actor_token_stats",
    "stats_needed_by_loss_mode",
    "with_token_fields",
    "TokenStatsEngineMixin",
    "enable_actor_extension",
    "actor_extension_requested",
]

# The statistics computed from the logits, and the key of each in verl's model output.
LOGIT_STATS = ("entropy", "disc", "disc_centered")
MODEL_OUTPUT_KEYS = {name: f"entrorl_{name}" for name in LOGIT_STATS}
ACTOR_EXTENSION_ENV = "ENTRORL_VERL_ACTOR_EXTENSION"

# Batch keys verl's actor receives, and the policy-batch field each becomes.
_DATA_FIELDS = {"ref_log_prob": "ref_log_prob", "rollout_log_probs": "rollout_log_prob"}


def actor_token_stats(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    need: Iterable[str] = LOGIT_STATS,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` for each statistic in ``need`` (of ``entropy``, ``disc``, ``disc_centered``) of
    ``softmax(logits / temperature)`` at ``targets``, shaped like ``targets``.

    ``logits`` is ``[N, V]`` (verl's packed layout) or ``[B, T, V]``; ``temperature`` a number or a per-row tensor
    (verl's ``temperature_rmpad``): equal values are passed on as one number, distinct ones as one temperature per
    position, which :func:`entrorl.tokens.token_stats` applies chunk by chunk in float32 (no scaled copy of the
    logits, and a row's statistics do not depend on the others' temperatures). ``entropy`` is differentiable w.r.t.
    the logits, S and D are not.
    """
    need = tuple(need)
    unknown = [name for name in need if name not in LOGIT_STATS]
    if unknown or not need:
        raise ValueError(f"actor_token_stats: need must name some of {list(LOGIT_STATS)}, got {list(need)}")
    if torch.is_tensor(temperature):
        values = temperature.detach().reshape(-1)
        if values.numel() == 0 or bool((values == values[0]).all()):
            temperature = float(values[0]) if values.numel() else 1.0
        else:  # one per row of targets, or per leading entry ([B] for [B, T, V]), or verl's [N, 1]: one per position
            temperature = temperature.detach()
            while temperature.dim() > targets.dim() and temperature.shape[-1] == 1:
                temperature = temperature.squeeze(-1)
            temperature = temperature.reshape(*temperature.shape, *([1] * (targets.dim() - temperature.dim())))
            temperature = temperature.expand(targets.shape).to(widest_float(temperature.device))  # float32 on an Apple GPU
    stats = token_stats(logits, targets, temperature=temperature if torch.is_tensor(temperature) else float(temperature),
                        chunk_size=chunk_size, need=need)
    return {name: getattr(stats, name) for name in need}


def _loss_mode_needs(config: Any) -> tuple[tuple[str, ...], bool]:
    """For the ``entrorl_<method>`` loss configured in verl's actor ``config``: the logit statistics it reads and
    whether its loss differentiates through the entropy; ``((), False)`` for verl's own loss modes. Cached per
    method and parameters, since the actor asks for every micro-batch."""
    loss_mode = config_get(config_get(config, "policy_loss"), "loss_mode", "vanilla")
    if not isinstance(loss_mode, str) or not loss_mode.startswith(LOSS_MODE_PREFIX):
        return (), False
    method = loss_mode[len(LOSS_MODE_PREFIX):]
    params = entrorl_parameters(method, config)
    key = (method, repr(sorted(params.items())))
    if key not in _NEEDED:
        objective = build_objective(method, **params)
        required = objective.required_fields
        # a regulariser's term may be the entropy itself (the entropy bonus's H): its gradient is kept for every
        # regulariser reading it, built-in or registered by the user; selectors and shapers read it detached
        _NEEDED[key] = (tuple(name for name in LOGIT_STATS if name in required),
                        any("entropy" in part.requires for part in objective.regularizers))
    return _NEEDED[key]


_NEEDED: dict[tuple[str, str], tuple[tuple[str, ...], bool]] = {}


def stats_needed_by_loss_mode(config: Any) -> tuple[str, ...]:
    """The logit statistics the ``entrorl_<method>`` loss configured in verl's actor ``config`` needs (empty for
    verl's own loss modes)."""
    return _loss_mode_needs(config)[0]


def entropy_gradient_needed(config: Any) -> bool:
    """Whether the configured ``entrorl_<method>`` loss may differentiate through the entropy: whether one of its
    regularisers reads it (``entropy_bonus`` and ``adaptive_entropy``, whose term is the entropy itself, or a
    regulariser of one's own); selectors and shapers read the statistics as detached selection or shaping quantities,
    and S and D carry no gradient."""
    return _loss_mode_needs(config)[1]


def _pad_like_log_probs(tensor: torch.Tensor, data: Any) -> torch.Tensor:
    from verl.workers.utils.padding import no_padding_2_padding

    return no_padding_2_padding(tensor, data)


def with_token_fields(loss_function: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a verl engine loss function so the ``entrorl_<method>`` loss it calls sees the actor's statistics.

    When called as a loss (``model_output=..., data=...``), the wrapper pads each ``entrorl_*`` entry of
    ``model_output`` to ``[B, T]`` like ``log_probs``, takes ``ref_log_prob`` / ``rollout_log_probs`` from ``data``
    when present, and calls ``loss_function`` inside :func:`provide_token_fields`; the metrics the loss marks as
    sums or maxima come back as verl ``Metric`` objects of that aggregation. Any other call (verl also passes the loss
    function as a logits processor) goes straight through.
    """

    @functools.wraps(loss_function)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if "model_output" not in kwargs or "data" not in kwargs:
            return loss_function(*args, **kwargs)
        model_output, data = kwargs["model_output"], kwargs["data"]
        fields: dict[str, torch.Tensor] = {}
        for name, key in MODEL_OUTPUT_KEYS.items():
            if key in model_output:
                fields[name] = _pad_like_log_probs(model_output[key], data)
        present = [key for key in _DATA_FIELDS if key in data.keys()]
        if present:
            padded = data.select(*present, "response_mask").to_padded_tensor()
            for key in present:
                fields[_DATA_FIELDS[key]] = padded[key]
        with provide_token_fields(**fields), collect_metric_aggregations() as aggregations:
            result = loss_function(*args, **kwargs)
        return _retyped_metrics(result, aggregations)

    return wrapped


def _retyped_metrics(result: Any, aggregations: dict[str, str]) -> Any:
    """``(loss, metrics)`` with each metric named in ``aggregations`` re-made as a verl ``Metric`` of that
    aggregation (same values); anything else is returned as it is."""
    if not aggregations or not isinstance(result, tuple) or len(result) != 2 or not isinstance(result[1], dict):
        return result
    from verl.utils.metric import AggregationType, Metric

    loss, metrics = result
    metrics = dict(metrics)
    for name, how in aggregations.items():
        if name not in metrics:
            continue
        retyped = Metric(AggregationType(how))
        value = metrics[name]
        retyped.extend(value.values if isinstance(value, Metric) else [value])
        metrics[name] = retyped
    return loss, metrics


def _loss_config(loss_function: Any) -> Any:
    """verl's actor config bound into its loss function (``functools.partial(ppo_loss, config=...)``), if any."""
    while loss_function is not None:
        if isinstance(loss_function, functools.partial):
            if "config" in loss_function.keywords:
                return loss_function.keywords["config"]
            loss_function = loss_function.func
        else:
            loss_function = getattr(loss_function, "__wrapped__", None)
    return None


class TokenStatsEngineMixin:
    """Mixin for verl's FSDP language-model engine (``FSDPEngineWithLMHead``): adds the logit statistics that the
    configured ``entrorl_<method>`` loss needs to the model output and routes them to the loss.

    Put it first: ``class Engine(TokenStatsEngineMixin, FSDPEngineWithLMHead)``. With verl's fused kernels the
    logits never exist, so a loss that needs the statistics fails with an error saying to switch them off.
    """

    _entrorl_need: tuple[str, ...] = ()
    _entrorl_entropy_gradient: bool = False

    def forward_step(self, micro_batch: Any, loss_function: Any, forward_only: bool) -> Any:
        config = None if loss_function is None else _loss_config(loss_function)
        need = () if config is None else stats_needed_by_loss_mode(config)
        self._entrorl_need = need
        self._entrorl_entropy_gradient = bool(need) and not forward_only and entropy_gradient_needed(config)
        if self._entrorl_entropy_gradient:
            from verl.utils import tensordict_utils as tu

            # verl's log-prob kernel may write its gradient into the logits' storage (inplace_backward) unless
            # it is told that the entropy is computed too; the entropy bonus backpropagates through those logits
            tu.assign_non_tensor(micro_batch, calculate_entropy=True)
        try:
            wrapped = loss_function if loss_function is None else with_token_fields(loss_function)
            return super().forward_step(micro_batch, wrapped, forward_only)
        finally:
            self._entrorl_need = ()
            self._entrorl_entropy_gradient = False

    def prepare_model_outputs(self, output: Any, output_args: dict, micro_batch: Any, logits_processor_func: Any) -> dict:
        model_output = super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        if self._entrorl_need:
            model_output.update(self._entrorl_token_stats(output, output_args, micro_batch))
        return model_output

    def _entrorl_token_stats(self, output: Any, output_args: dict, micro_batch: Any) -> dict[str, torch.Tensor]:
        from verl.utils import tensordict_utils as tu

        if getattr(output, "logits", None) is None:
            raise ValueError(
                f"the entrorl policy loss needs {list(self._entrorl_need)} from the logits, which this forward pass did not "
                "return: set actor_rollout_ref.model.use_fused_kernels=False"
            )
        logits = output.logits
        if hasattr(logits, "full_tensor"):  # vocabulary-sharded DTensor under tensor parallelism
            logits = logits.full_tensor()
        if not self._entrorl_entropy_gradient:
            logits = logits.detach()  # selection statistics only: no graph, nothing to conflict with verl's backward
        cu_seqlens = micro_batch["input_ids"].offsets()
        targets = output_args["input_ids_rmpad_rolled"].reshape(-1)
        use_remove_padding = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)
        if use_remove_padding:
            stats = actor_token_stats(logits.squeeze(0), targets, temperature=output_args["temperature_rmpad"],
                                      need=self._entrorl_need)
            stats = {name: self._gather_and_unpad_packed(values, output_args["pad_size"]) for name, values in stats.items()}
        else:
            # row by row on views of the padded [B, T, V] logits: their valid part is never copied into a second
            # [N, V] tensor, which at a large vocabulary would cost as much memory as the logits themselves
            by_row, start = [], 0
            temperatures = output_args["temperature"].reshape(-1).tolist()
            for row, length, temperature in zip(logits, cu_seqlens.diff().tolist(), temperatures):
                by_row.append(actor_token_stats(row[:length], targets[start:start + length], temperature=temperature,
                                                need=self._entrorl_need))
                start += length
            stats = {name: torch.cat([row[name] for row in by_row]) for name in self._entrorl_need}
        return {MODEL_OUTPUT_KEYS[name]: torch.nested.nested_tensor_from_jagged(values, cu_seqlens)
                for name, values in stats.items()}


_EXTENDED_ENGINES: dict[type, type] = {}


def enable_actor_extension() -> list[str]:
    """Register ``TokenStatsEngineMixin`` on top of verl's FSDP language-model engine for every backend and device
    it is registered for, in place of the original; returns the ``backend/device`` keys replaced. Idempotent."""
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    replaced = []
    for backend, by_device in EngineRegistry._engines.get("language_model", {}).items():
        for device, engine_cls in list(by_device.items()):
            if not issubclass(engine_cls, FSDPEngineWithLMHead) or issubclass(engine_cls, TokenStatsEngineMixin):
                continue
            if engine_cls not in _EXTENDED_ENGINES:
                _EXTENDED_ENGINES[engine_cls] = type(f"TokenStats{engine_cls.__name__}", (TokenStatsEngineMixin, engine_cls), {})
            by_device[device] = _EXTENDED_ENGINES[engine_cls]
            replaced.append(f"{backend}/{device}")
    return replaced


def actor_extension_requested() -> bool:
    """Whether ``ENTRORL_VERL_ACTOR_EXTENSION`` asks for the extension (``1``, ``true`` or ``yes``)."""
    return os.environ.get(ACTOR_EXTENSION_ENV, "").strip().lower() in ("1", "true", "yes")
