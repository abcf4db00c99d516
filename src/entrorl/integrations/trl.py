"""entrorl's objectives and diagnostics inside TRL's ``GRPOTrainer``.

:class:`EntropyGRPOTrainer` keeps everything TRL does around the loss — generation (transformers or vLLM),
reward functions, group advantages (``scale_rewards``), old / reference log-probs, the buffering of a
generation batch over ``steps_per_generation`` micro-steps, logging — and replaces the loss itself: each
micro-batch is scored in one forward pass, the per-token statistics (log-prob, entropy ``H``, the entropy
discriminator ``S`` and its centred form ``D``, arXiv 2602.03392) come from :mod:`entrorl.tokens`, and the
loss is the entrorl objective (any method name, ``"a+b+c"`` composition, dict or ``ObjectiveConfig``) applied
to a :class:`~entrorl.objective.PolicyBatch` built from TRL's ``inputs``. Without an objective the loss is TRL's own
``GRPOConfig.loss_type`` (:func:`objective_for_trl_loss`), so the trainer can stand in for ``GRPOTrainer``.
TRL >= ``MIN_TRL_VERSION`` is required (the tests run against ``TESTED_TRL_VERSION``).

Gradient accumulation. ``GRPOTrainer`` turns off ``transformers``' own loss scaling and returns losses that are
already scaled for accumulation. The objective computes its loss on the micro-batch with its own
``loss_agg_mode``; this trainer multiplies it by the micro-batch's share of the accumulation window so that
the accumulated gradient is the gradient of the whole window's loss:

* ``token-mean``: ``valid tokens of the micro-batch / valid tokens of the window per process``, the window
  count being TRL's ``num_items_in_batch / num_processes * gradient_accumulation_steps / steps_per_generation``
  (exactly TRL's ``dapo`` normaliser, which undoes the data-parallel gradient averaging too);
* the ``seq-mean-*`` modes: ``1 / gradient_accumulation_steps`` (TRL's ``grpo`` / ``dr_grpo`` scaling), the
  objective averaging over all the micro-batch's rows (``global_batch_size``), a completion masked whole
  (``mask_truncated_completions``, a tool mask) included, as TRL does; entrorl's own default counts only the rows
  with a token. ``seq-mean-token-sum-norm`` (Dr. GRPO) divides by ``max_completion_length`` when the objective sets
  no ``loss_scale_factor``, as TRL's ``dr_grpo`` does.

So ``"dapo"`` reproduces TRL's ``loss_type="dapo"`` (with ``epsilon_high=0.28``), ``"grpo"`` reproduces
``loss_type="grpo"``, ``"dr_grpo"`` reproduces ``loss_type="dr_grpo"`` and ``"gspo"`` reproduces ``loss_type="grpo"``
with ``importance_sampling_level="sequence"`` (and GSPO's epsilons), loss and gradient. ``beta`` is the ``kl_ref``
coefficient. Selectors decide
on each micro-batch alone (as verl does), and those that take dropped tokens out of the normaliser (80/20,
Clip_B, Clip_V, rft's rejection sampling) use the micro-batch's kept count; entrorl's own trainer gives Clip_B, Clip_V
and rft the whole batch.

State. Stateful parts (the ``adaptive_entropy`` coefficient, the generator of a Clip-Cov given a ``seed``; without
one it draws from torch's global generator, which the checkpoint's RNG state restores) are saved with each
checkpoint (``entrorl_objective_state.pt``) and restored on ``resume_from_checkpoint``. The adaptive coefficient
moves once per optimizer step (the micro-batches of one ``state.global_step``), as TRL's own adaptive entropy
does; under data parallelism it measures every process's tokens (the processes sum their entropy and token counts
at the first micro-batch of each step), so one coefficient moves on every process; each process also saves and
restores its own state (``entrorl_objective_state_<process>.pt``), whose partial measurement is its own.
Evaluation batches leave every state as training left it.

Metrics. TRL's loss-side metrics (``clip_ratio/*``, ``kl``) are not computed, since its loss is not; instead every
micro-step appends to TRL's metrics (averaged by ``log``) the objective's metrics (``select/*``, ``clip/*``,
``ratio/*``, ``kl/*``, ``loss/*``, ...) and, with ``diagnostics`` on, the entropy summary
(``entropy/mean``, ``entropy/p10|p50|p90``, ``entropy/low_frac``), S and D statistics overall and by the sign of
the advantage (``disc/*``, ``disc_centered/*``) and the token-covariance concentration (``cov/*``), all computed
on the process's micro-batch by :mod:`entrorl.trainer.diagnostics`. ``entropy`` is TRL's global token mean.

TRL's loss-side options that the objective replaces are rejected with a message naming the entrorl method
or parameter to use instead (``top_entropy_quantile`` → ``forking_tokens``, ``entropy_coef`` → ``entropy_bonus``,
``epsilon`` / ``epsilon_high`` → the surrogate's ``clip_ratio_low`` / ``clip_ratio_high``, ...), and so is a rollout
correction (``tis``, ``icepop``) without the sampler log-probs it needs (``use_vllm``).
Advantages are TRL's: a method whose own estimator is not GRPO's (``w_reinforce``, ``psr``, ...) gets a warning.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from packaging.version import Version

try:
    import trl
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
    from trl import GRPOConfig, GRPOTrainer
except ImportError as error:  # pragma: no cover - exercised only without trl
    raise ImportError("entrorl.integrations.trl needs TRL: pip install 'entrorl[trl]'") from error

from entrorl._checks import is_real_number
from entrorl._files import refuse_a_name_that_is_not_utf8
from entrorl.analysis.run import read_json
from entrorl.analysis.run_report import TRL_OBJECTIVE_FILE
from entrorl.modeling import FUSED_HEAD_MODEL_TYPES, model_vocab_size
from entrorl.objective import Objective, ObjectiveConfig, PolicyBatch, build_objective, get_method
from entrorl.objective.parts import make_part
from entrorl.objective.regularizers import AdaptiveEntropy, KLReference
from entrorl.objective.surrogates import CISPO, GSPO, PPOClip
from entrorl.rollout.sampler import leaves_tokens_out
from entrorl.tokens import STAT_NAMES, TokenStats, token_stats, token_stats_from_hidden
from entrorl.trainer.checkpoint import atomic_torch_save, atomic_write_text
from entrorl.trainer.diagnostics import covariance_summary, discriminator_summary, entropy_summary

__all__ = [
    "EntropyGRPOTrainer", "accumulation_weight", "check_trl_args", "check_trl_version", "objective_for_trl_loss",
]

#: The oldest TRL whose ``GRPOTrainer`` this trainer matches: from 1.13 TRL normalises ``loss_type="dapo"`` by one
#: accumulation window's tokens (the normaliser ``accumulation_weight`` reproduces), and the private ``GRPOTrainer``
#: methods the trainer overrides are known from that version on.
MIN_TRL_VERSION = "1.13"
#: The TRL version the integration's tests ran against.
TESTED_TRL_VERSION = "1.16.0"


def check_trl_version(version: str) -> None:
    """Refuse a TRL older than ``MIN_TRL_VERSION``, whose loss normalisers and private trainer methods differ from
    those this trainer reproduces and overrides (its losses would silently stop matching TRL's). Newer versions pass."""
    if Version(version) < Version(MIN_TRL_VERSION):
        raise ImportError(
            f"entrorl.integrations.trl needs TRL >= {MIN_TRL_VERSION} (tested with {TESTED_TRL_VERSION}), found "
            f"{version}: pip install 'trl>={MIN_TRL_VERSION}'"
        )


check_trl_version(trl.__version__)

#: The file in each checkpoint directory that holds the objective's state (adaptive coefficients, generators).
OBJECTIVE_STATE_FILE = "entrorl_objective_state.pt"
_CHECKPOINT_FOLDER = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")  # as transformers names them


def objective_state_file(process_index: int) -> str:
    """The file of one process's objective state in a checkpoint written by several processes (each measures its own
    micro-batches, so their adaptive coefficients and generators differ)."""
    return f"entrorl_objective_state_{process_index}.pt"


_PROCESS_STATE_FILE = re.compile(r"entrorl_objective_state_(\d+)\.pt")  # objective_state_file's names


def _readable_json(path: str) -> bool:
    """Whether ``path`` is a file that holds JSON whole (transformers writes ``trainer_state.json`` in place: a crash
    while writing it leaves it empty or cut short)."""
    try:
        with open(path, encoding="utf-8") as handle:
            json.load(handle)
    except (OSError, ValueError):
        return False
    return True


def _saved_objective_label(checkpoint: str) -> str | None:
    """The objective a checkpoint was trained with, as its ``entrorl_objective.json`` names it (None without one)."""
    saved = read_json(Path(checkpoint) / TRL_OBJECTIVE_FILE)
    method = saved.get("method") if isinstance(saved, dict) else None
    return method if isinstance(method, str) else None


# surrogates that clip the ratio to [1 - eps_low, 1 + eps_high] as TRL's epsilon / epsilon_high do
_RATIO_CLIPPED_SURROGATES = (PPOClip, GSPO)

# TRL's advantages are group-normalised (scale_rewards="group" or "batch") or only centred ("none").
_TRL_COMPATIBLE_ESTIMATORS = {"grpo", "dr_grpo"}
# generate()'s truncations besides top-k / top-p / min-p, as GenerationConfig applies them
_GENERATE_TRUNCATIONS = {"typical_p": lambda value: value < 1.0, "epsilon_cutoff": lambda value: value > 0.0,
                         "eta_cutoff": lambda value: value > 0.0,
                         "top_h": lambda value: True}  # any top_h keeps at most the 100 likeliest tokens

# generation settings besides a repetition penalty and an n-gram ban that change the sampled distribution:
# generate()'s, then vLLM's SamplingParams'
_SAMPLING_RESHAPERS = ("bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
                       "presence_penalty", "frequency_penalty", "logit_bias", "bad_words", "allowed_token_ids",
                       "min_tokens")

#: TRL ``loss_type`` -> the entrorl method whose loss is TRL's (same surrogate, same aggregation), given TRL's clip
#: range. ``bnpo`` (a token mean over each micro-batch alone), ``sapo``, ``luspo`` and ``vespo`` have none.
TRL_LOSS_TYPE_METHODS = {"grpo": "grpo", "dapo": "dapo", "dr_grpo": "dr_grpo", "cispo": "cispo"}

# what an objective must be for a loss_type to describe it: its surrogate family and its aggregation
_LOSS_TYPE_SHAPES = {
    "grpo": (_RATIO_CLIPPED_SURROGATES, "seq-mean-token-mean"),
    "dapo": (_RATIO_CLIPPED_SURROGATES, "token-mean"),
    "dr_grpo": (_RATIO_CLIPPED_SURROGATES, "seq-mean-token-sum-norm"),
    "cispo": ((CISPO,), "token-mean"),
}


# GRPOConfig options that only TRL's own loss reads (its SAPO / VESPO losses, its adaptive entropy controller's
# settings): set away from their defaults they would silently do nothing. use_bias_correction_kl is not among them:
# it becomes kl_ref's importance_weighted
_LOSS_ONLY_OPTIONS = ("sapo_temperature_neg", "sapo_temperature_pos", "vespo_k_pos",
                      "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "entropy_coef_min", "entropy_coef_max",
                      "entropy_coef_delta", "entropy_target")


def _trl_default(name: str) -> Any:
    """``GRPOConfig``'s default for option ``name`` (None for an option this TRL version does not have)."""
    return next((field.default for field in dataclasses.fields(GRPOConfig) if field.name == name), None)


def _set_by_user(args: Any, name: str) -> bool:
    """Whether option ``name`` of ``args`` differs from ``GRPOConfig``'s default (an absent option does not)."""
    return hasattr(args, name) and getattr(args, name) != _trl_default(name)


def _trl_option(args: Any, name: str) -> Any:
    """Option ``name`` of ``args``, or ``GRPOConfig``'s default when ``args`` is None or lacks it."""
    return getattr(args, name) if hasattr(args, name) else _trl_default(name)


def _trl_clip_range(args: Any) -> tuple[float, float]:
    """TRL's ``(epsilon_low, epsilon_high)``: ``epsilon_high`` falls back to ``epsilon`` when unset."""
    low, high = _trl_option(args, "epsilon"), _trl_option(args, "epsilon_high")
    return low, low if high is None else high


def _kl_reference(objective: Objective) -> KLReference | None:
    return next((part for part in objective.regularizers if isinstance(part, KLReference)), None)


def objective_for_trl_loss(args: Any, **objective_params: Any) -> Objective:
    """The entrorl objective whose loss is ``GRPOTrainer``'s under ``args`` (a ``GRPOConfig``, or None for its
    defaults): the method named by ``loss_type`` with TRL's clip range, plus ``kl_ref`` (k3, ``kl_loss_coef = beta``,
    ``importance_weighted = use_bias_correction_kl``) when ``beta != 0``; with ``importance_sampling_level="sequence"``
    the method is ``gspo`` (the sequence-level ratio) with that loss type's aggregation. ``objective_params`` override
    its parameters. Refused: a ``loss_type`` without an entrorl method of the same loss, ``cispo`` capping the weight
    below 1 (entrorl's cap is ``1 + clip_ratio_high``) or at the sequence level, and a sequence-level ratio weighing
    the KL (``use_bias_correction_kl`` with ``beta != 0``), which kl_ref weighs per token."""
    method, params = _trl_loss_composition(args)
    try:
        return build_objective(method, **{**params, **objective_params})
    except ValueError as error:
        if str(error).startswith("unknown parameter"):
            raise ValueError(f"{error}. Without objective=..., objective_params adjusts the loss of GRPOConfig.loss_type "
                             f"({method!r}); for another method pass objective=... (e.g. 'clip_b')") from None
        raise _naming_trl_options(error, set(params) - set(objective_params)) from None


# the objective's parameters that GRPOConfig's options set, by the option
_TRL_OPTION_OF_PARAMETER = {"clip_ratio_low": "epsilon", "clip_ratio_high": "epsilon_high (epsilon when unset)",
                            "kl_loss_coef": "beta"}


def _naming_trl_options(error: ValueError, from_trl: set[str]) -> ValueError:
    """``error`` (an objective's bad parameter) with the ``GRPOConfig`` option behind each parameter it names among
    ``from_trl``, since a TRL user set ``epsilon`` or ``beta``, not ``clip_ratio_low`` or ``kl_loss_coef``."""
    about = str(error).split("valid parameters:")[0]  # a list of every valid name says nothing about one of them
    named = [f"{name} comes from GRPOConfig's {_TRL_OPTION_OF_PARAMETER[name]}" for name in sorted(from_trl)
             if name in _TRL_OPTION_OF_PARAMETER and re.search(rf"\b{name}\b", about)]
    return ValueError(f"{error} ({'; '.join(named)})") if named else error


def _trl_loss_composition(args: Any) -> tuple[str, dict[str, Any]]:
    """The methods and parameters of :func:`objective_for_trl_loss` (ValueError for a loss it cannot express)."""
    loss_type = _trl_option(args, "loss_type")
    method = TRL_LOSS_TYPE_METHODS.get(loss_type)
    if method is None:
        raise ValueError(
            f"EntropyGRPOTrainer: GRPOConfig.loss_type={loss_type!r} has no entrorl method with the same loss; pass "
            f"objective=... (an entrorl method, e.g. 'dapo') and leave loss_type at its default"
        )
    low, high = _trl_clip_range(args)
    if loss_type == "cispo":
        if high < 1.0:
            raise ValueError(
                f"EntropyGRPOTrainer: loss_type='cispo' caps the IS weight at epsilon_high = {high} (epsilon when "
                "epsilon_high is unset), below 1, which entrorl's cispo (cap 1 + clip_ratio_high) cannot express; set "
                "epsilon_high >= 1 (ScaleRL uses 5.0) or pass objective=..."
            )
        params: dict[str, Any] = {"clip_ratio_low": 1.0, "clip_ratio_high": high - 1.0}
    else:
        params = {"clip_ratio_low": low, "clip_ratio_high": high}
    beta = _trl_option(args, "beta")
    if _trl_option(args, "importance_sampling_level") == "sequence":
        if loss_type == "cispo":
            raise ValueError("EntropyGRPOTrainer: loss_type='cispo' with importance_sampling_level='sequence' has no "
                             "entrorl equivalent; pass objective=... or leave importance_sampling_level at 'token'")
        if beta and _trl_option(args, "use_bias_correction_kl"):
            raise ValueError("EntropyGRPOTrainer: with importance_sampling_level='sequence' TRL weighs the KL by the "
                             "sequence's ratio, kl_ref by each token's: set use_bias_correction_kl=False, or pass objective=...")
        method, params = "gspo", {**params, "loss_agg_mode": get_method(method).loss_agg_mode}
    if beta:
        method = f"{method}+kl_ref"
        params = {**params, "kl_loss_coef": beta, "kl_loss_type": "k3",
                  "importance_weighted": bool(_trl_option(args, "use_bias_correction_kl"))}
    return method, params


def _kl_setting_given(name: str, objective: Any, objective_params: dict[str, Any]) -> bool:
    """Whether the caller chose kl_ref's setting ``name``: in ``objective_params``, in the objective's config, or by
    building the ``Objective`` (whose settings cannot be told from defaults)."""
    if name in objective_params or isinstance(objective, Objective):
        return True
    if isinstance(objective, dict):
        objective = ObjectiveConfig(**{("method" if key == "name" and "method" not in objective else key): value
                                       for key, value in objective.items()})
    if not isinstance(objective, ObjectiveConfig):
        return False  # a method name or a list of names: the methods' defaults
    return name in objective.params or any(part.name == "kl_ref" and name in part.params for part in objective.regularizers)


def check_trl_args(args: Any, objective: Objective, *, rollout_func: Any = None) -> None:
    """Reject GRPOConfig options that change the loss, since the entrorl objective computes it instead, and
    objectives that need what this configuration does not provide (a rollout correction without sampler log-probs).
    An ``output_dir`` whose name is not UTF-8 is refused too: its checkpoints' tokenizer could not be saved there."""
    if isinstance(getattr(args, "output_dir", None), str):
        refuse_a_name_that_is_not_utf8(args.output_dir, "GRPOConfig.output_dir")
    problems = []
    if getattr(args, "top_entropy_quantile", 1.0) < 1.0:
        quantile = args.top_entropy_quantile
        if getattr(args, "importance_sampling_level", "token") == "sequence":
            # TRL's mask scales each sequence's term, whose ratio still takes every valid token's gradient; entrorl's
            # selectors drop a token's gradient with its term
            problems.append(
                f"top_entropy_quantile = {quantile:g} with importance_sampling_level='sequence' has no entrorl "
                "equivalent: TRL's entropy mask then only scales each sequence's loss, whose sequence-level ratio "
                "keeps the gradient of every valid token, while the 'forking_tokens' method drops the masked tokens' "
                "gradient; use 'forking_tokens' with the token-level ratio, or leave top_entropy_quantile at 1.0")
        else:
            try:  # TRL's loss with the entropy mask: that of its loss_type, plus forking_tokens
                method, params = _trl_loss_composition(args)
                said = f"objective='{method}+forking_tokens', objective_params=" + repr(
                    {"top_entropy_quantile": quantile, "keep_in_normaliser": True, **params})
            except ValueError:  # a loss_type entrorl cannot express is refused on its own
                said = f"objective='...+forking_tokens', objective_params={{'top_entropy_quantile': {quantile:g}, " \
                       "'keep_in_normaliser': True}"
            problems.append(
                f"top_entropy_quantile = {quantile:g}: use the 'forking_tokens' method; TRL's entropy mask keeps the "
                f"dropped tokens in the loss's normaliser, so TRL's loss is {said} (the same loss on one process; under "
                "data parallelism TRL takes the quantile over every process's tokens, forking_tokens over each "
                "process's micro-batch)")
    if getattr(args, "entropy_coef", 0.0) or getattr(args, "use_adaptive_entropy", False):
        problems.append("entropy_coef / use_adaptive_entropy: use the 'entropy_bonus' method (its coefficient: "
                        "objective_params={'entropy_coeff': ...}) or the 'adaptive_entropy' method")
    if getattr(args, "use_liger_kernel", False) and hasattr(GRPOTrainer, "compute_liger_loss"):
        problems.append("use_liger_kernel: this TRL computes the loss with Liger's fused GRPO loss, which bypasses the "
                        "objective; set use_liger_kernel=False")
    if getattr(args, "delta", None) is not None:
        problems.append("delta (two-sided clipping): use the 'dual_clip' method or the ppo_clip part's clip_ratio_c")
    if getattr(args, "off_policy_mask_threshold", None) is not None:
        problems.append("off_policy_mask_threshold: not available in the objective; leave it None")
    if getattr(args, "importance_sampling_level", "token") != "token" and not isinstance(objective.surrogate, GSPO):
        problems.append("importance_sampling_level='sequence': the objective's surrogate sets the ratio's level, and "
                        "this one's is per token; leave it 'token', or use the 'gspo' method (the sequence-level ratio)")
    surrogate = objective.surrogate
    loss_type = getattr(args, "loss_type", None)
    if loss_type is not None and loss_type != _trl_default("loss_type"):
        problems.extend(_loss_type_problems(loss_type, objective))
    if loss_type == "cispo" and isinstance(surrogate, CISPO):
        cap = _trl_clip_range(args)[1]
        # compared to rounding: 1 + 0.14 is 1.1400000000000001, and a user writes 1.14
        if surrogate.clip_ratio_low != 1.0 or not math.isclose(1.0 + surrogate.clip_ratio_high, cap, rel_tol=1e-12):
            problems.append(
                f"loss_type='cispo' caps the IS weight at epsilon_high = {cap} with no lower bound, the objective's "
                f"cispo clips it to [1 - {surrogate.clip_ratio_low}, 1 + {surrogate.clip_ratio_high}]: set "
                f"epsilon_high = 1 + clip_ratio_high (>= 1) and clip_ratio_low = 1.0, or leave loss_type at its default"
            )
    elif _set_by_user(args, "epsilon") or _set_by_user(args, "epsilon_high"):
        low, high = _trl_clip_range(args)
        own = (getattr(surrogate, "clip_ratio_low", None), getattr(surrogate, "clip_ratio_high", None))
        if not isinstance(surrogate, _RATIO_CLIPPED_SURROGATES):  # no clip range, or one that means something else
            cispo_note = (" (TRL's CISPO caps the weight at epsilon_high itself, entrorl's cispo at 1 + clip_ratio_high)"
                          if isinstance(surrogate, CISPO) else "")
            problems.append(
                f"epsilon / epsilon_high: the objective's surrogate ({type(surrogate).__name__}) does not clip the ratio "
                f"to [1 - epsilon, 1 + epsilon_high]{cispo_note}; leave them at their defaults and set the surrogate's "
                "parameters through objective_params"
            )
        elif own != (low, high):
            problems.append(
                f"epsilon = {_trl_option(args, 'epsilon')}, epsilon_high = {_trl_option(args, 'epsilon_high')}: the "
                "objective clips with its own ratios "
                f"({type(surrogate).__name__}: clip_ratio_low = {own[0]}, clip_ratio_high = {own[1]}); pass "
                f"objective_params={{'clip_ratio_low': {low}, 'clip_ratio_high': {high}}} or leave epsilon and "
                "epsilon_high at their defaults"
            )
    inert = [name for name in _LOSS_ONLY_OPTIONS if _set_by_user(args, name)]
    if inert:
        problems.append(f"{', '.join(inert)}: options of TRL's own loss, which the objective replaces; leave them at "
                        "their defaults (the methods' parameters go in objective_params)")
    needs_reference = "ref_log_prob" in objective.required_fields
    kl_reference = _kl_reference(objective)
    beta = getattr(args, "beta", 0.0)
    if needs_reference and beta == 0.0:
        problems.append(
            "the objective has a KL-to-reference part (kl_ref) but beta == 0, so TRL loads no reference model: set "
            "beta to the KL coefficient (it becomes kl_ref's kl_loss_coef)"
        )
    if beta != 0.0 and not needs_reference:
        problems.append(f"beta = {beta} has no effect on the objective: add the 'kl_ref' method (its coefficient is beta) "
                        "or set beta=0")
    if beta != 0.0 and kl_reference is not None and kl_reference.kl_loss_coef != beta:
        problems.append(
            f"beta = {beta} and kl_ref's kl_loss_coef = {kl_reference.kl_loss_coef} both set the KL coefficient: give "
            "it once (beta alone, or kl_loss_coef equal to beta)"
        )
    bias_correction = bool(_trl_option(args, "use_bias_correction_kl"))
    if beta != 0.0 and kl_reference is not None and kl_reference.importance_weighted != bias_correction:
        problems.append(
            f"use_bias_correction_kl = {bias_correction} and kl_ref's importance_weighted = "
            f"{kl_reference.importance_weighted} both say whether the KL is weighed by pi / pi_old: give it once "
            "(use_bias_correction_kl alone, or importance_weighted equal to it)"
        )
    if (beta != 0.0 and kl_reference is not None and kl_reference.importance_weighted
            and getattr(args, "importance_sampling_level", "token") == "sequence"):
        problems.append("importance_sampling_level='sequence' with use_bias_correction_kl: TRL weighs the KL by the "
                        "sequence's ratio, kl_ref by each token's; set use_bias_correction_kl=False (an unweighted KL, "
                        "as TRL's then), or leave importance_sampling_level at 'token' (the gspo surrogate sets the "
                        "ratio's level itself)")
    use_vllm = getattr(args, "use_vllm", False)
    vllm_correction = use_vllm and _trl_option(args, "vllm_importance_sampling_correction")
    correction = objective.correction
    if vllm_correction and correction is None:
        problems.append(
            "use_vllm with vllm_importance_sampling_correction: add the 'tis' or 'icepop' method (it uses vLLM's "
            "log-probs) or set vllm_importance_sampling_correction=False"
        )
    if correction is not None:
        if not use_vllm and rollout_func is None:
            problems.append(
                f"the objective's rollout correction ({type(correction).__name__}) weighs each token by the sampler's "
                "probability, which TRL provides only with use_vllm=True (or a rollout_func that returns 'logprobs'); "
                "without it the sampler is the trained model itself: drop the correction"
            )
        replaced = [name for name in ("vllm_importance_sampling_mode", "vllm_importance_sampling_clip_max",
                                      "vllm_importance_sampling_clip_min") if _set_by_user(args, name)]
        if replaced:
            problems.append(
                f"{' / '.join(replaced)}: the objective's rollout correction ({type(correction).__name__}) sets how the "
                "mismatch is corrected; set its parameters through objective_params and leave these at their defaults"
            )
    if problems:
        raise ValueError(
            f"EntropyGRPOTrainer: GRPOConfig options that the entrorl objective {objective.label!r} replaces:\n  - "
            + "\n  - ".join(problems)
        )


def _loss_type_problems(loss_type: str, objective: Objective) -> list[str]:
    """Why ``loss_type`` does not describe ``objective`` (empty when it does): TRL's loss of that name must have the
    objective's surrogate family and aggregation, and a loss_type with no entrorl equivalent describes none."""
    shape = _LOSS_TYPE_SHAPES.get(loss_type)
    if shape is None:
        return [f"loss_type={loss_type!r}: entrorl has no method with TRL's {loss_type} loss and the objective replaces "
                "it; leave loss_type at its default"]
    surrogates, loss_agg_mode = shape
    if isinstance(objective.surrogate, surrogates) and objective.loss_agg_mode == loss_agg_mode:
        return []
    return [f"loss_type={loss_type!r} is not the objective's loss ({type(objective.surrogate).__name__} surrogate, "
            f"loss_agg_mode={objective.loss_agg_mode!r}; TRL's {loss_type} is {loss_agg_mode!r}): leave loss_type at "
            f"its default, or pass objective={TRL_LOSS_TYPE_METHODS[loss_type]!r} (or a composition starting with it)"]


def accumulation_weight(
    loss_agg_mode: str,
    *,
    micro_valid_tokens: float,
    num_items_in_batch: float,
    num_processes: int,
    gradient_accumulation_steps: int,
    steps_per_generation: int,
) -> float:
    """The factor that scales a micro-batch loss (normalised on the micro-batch) to its share of the window.

    ``token-mean``: ``n_micro / (N_gen / P * G / S)`` with ``N_gen`` the valid tokens of the whole generation
    batch (all processes), ``P`` processes, ``G`` accumulation steps, ``S`` steps per generation;
    ``seq-mean-*``: ``1 / G``. Pass ``gradient_accumulation_steps = steps_per_generation = 1`` in evaluation.
    """
    if gradient_accumulation_steps < 1 or steps_per_generation < 1 or num_processes < 1:
        raise ValueError(
            "accumulation_weight: gradient_accumulation_steps, steps_per_generation and num_processes must be >= 1, "
            f"got {gradient_accumulation_steps}, {steps_per_generation}, {num_processes}"
        )
    if loss_agg_mode == "token-mean":
        window_tokens = max(float(num_items_in_batch), 1.0) / num_processes * gradient_accumulation_steps / steps_per_generation
        return float(micro_valid_tokens) / window_tokens
    return 1.0 / gradient_accumulation_steps


@contextlib.contextmanager
def _outside_autocast(head: torch.nn.Module, device_type: str):
    """The output layer runs with autocast off, on float32 inputs, while the rest of the model keeps it: how TRL's
    ``cast_lm_head_to_fp32`` scores its head, where a plain forward under autocast would run the head in bfloat16."""
    enabled: list[bool] = []

    def before(module, args):
        enabled.append(torch.is_autocast_enabled(device_type))
        torch.set_autocast_enabled(device_type, False)
        return tuple(value.float() if torch.is_tensor(value) and value.is_floating_point() else value for value in args)

    def after(module, args, output):
        torch.set_autocast_enabled(device_type, enabled.pop())

    handles = [head.register_forward_pre_hook(before), head.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# TRL's cast_lm_head_to_fp32 hooks a tied model's input embeddings at model.embed_tokens, where a PEFT-wrapped model,
# OPT or GPT-2 do not keep them
_TIED_HEAD_ELSEWHERE = ("TRL cannot score in float32 with the LM head of a model whose input embeddings are tied to it "
                        "and are not at model.embed_tokens (a PEFT-wrapped model, OPT, GPT-2, ...): its "
                        "cast_lm_head_to_fp32 fails there with an AttributeError")


def _tied_head_trl_cannot_cast(model: Any) -> bool:
    """Whether TRL's ``cast_lm_head_to_fp32`` fails on ``model`` (the model TRL is given, a PEFT wrapper included): a
    tied head whose input embeddings are not at ``model.model.embed_tokens``."""
    embeddings = getattr(getattr(model, "model", None), "embed_tokens", None)
    return bool(getattr(model.config, "tie_word_embeddings", False)) and not isinstance(embeddings, torch.nn.Module)


def _raised_in(error: BaseException, function: str) -> bool:
    """Whether ``error`` was raised inside a function named ``function`` (any frame of its traceback)."""
    frames = error.__traceback__
    while frames is not None:
        if frames.tb_frame.f_code.co_name == function:
            return True
        frames = frames.tb_next
    return False


class EntropyGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` whose loss is an entrorl objective, with entrorl's entropy diagnostics in its logs.

    Args:
        *args, **kwargs: as for ``trl.GRPOTrainer`` (model, reward_funcs, args, train_dataset, ...).
        objective: a method name (``"clip_cov"``), a composition (``"dapo+clip_b+forking_tokens"``), a list of
            names, a dict / ``ObjectiveConfig``, or a built :class:`~entrorl.objective.Objective` (the trainer works
            on a copy). ``None`` (default): TRL's own loss, the entrorl method named by ``GRPOConfig.loss_type``
            (see :func:`objective_for_trl_loss`). With ``beta != 0``, kl_ref's coefficient is ``beta`` unless set.
        objective_params: parameter overrides for ``build_objective`` (``{"mu": 3.0}``).
        fused_head: compute the statistics from the final hidden states and the LM-head weight without building
            the logits; ``None`` = when the architecture's logits are exactly ``hidden @ W^T`` (Qwen2/3, Llama, ...).
            A head that is not a plain ``nn.Linear`` (an adapter on ``lm_head``) is not fused by default; ``True``
            would read its base weight alone. Nor are parameters that FSDP or DeepSpeed ZeRO-3 shard, whose weight
            a process holds a shard of outside the forward (``True`` is refused there).
        diagnostics: append entrorl's entropy / S / D / covariance statistics to the logged metrics (the objective's
            own metrics, clipping and selection fractions, are logged either way).

    >>> trainer = EntropyGRPOTrainer(model, reward_funcs=reward, args=GRPOConfig(...),
    ...                              train_dataset=dataset, objective="clip_cov")   # doctest: +SKIP
    >>> trainer.train()                                                             # doctest: +SKIP
    """

    def __init__(
        self,
        *args: Any,
        objective: str | list[str] | dict[str, Any] | Objective | None = None,
        objective_params: dict[str, Any] | None = None,
        fused_head: bool | None = None,
        diagnostics: bool = True,
        **kwargs: Any,
    ) -> None:
        try:  # GRPOTrainer's arguments by name, however they were passed
            given = inspect.signature(GRPOTrainer.__init__).bind_partial(self, *args, **kwargs).arguments
        except TypeError:  # let GRPOTrainer itself name the wrong argument
            given = {}
        grpo_args, rollout_func = given.get("args"), given.get("rollout_func")
        # the objective is built (and so validated) before TRL loads any model; the warnings of a composition point
        # at the caller's line, not at this module
        with warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            self.objective = self._own_objective(objective, objective_params or {}, grpo_args)
        for warning in raised:
            warnings.warn(warning.message, warning.category, stacklevel=2)
        if grpo_args is not None:
            check_trl_args(grpo_args, self.objective, rollout_func=rollout_func)
        try:
            super().__init__(*args, **kwargs)
        except AttributeError as error:
            if _raised_in(error, "_cast_lm_head_to_fp32"):
                raise ValueError(f"{_TIED_HEAD_ELSEWHERE} ({error}); set GRPOConfig(cast_lm_head_to_fp32=False), with "
                                 "which TRL's old and reference log-probs round to the half-precision head (about "
                                 "1e-3)") from error
            raise
        if hasattr(self.processing_class, "image_processor"):  # a vision-language model's processor
            raise NotImplementedError("EntropyGRPOTrainer scores text-only batches; this model's processor takes images "
                                      f"({type(self.processing_class).__name__})")
        check_trl_args(self.args, self.objective, rollout_func=rollout_func)
        self._warn_on_filtered_sampling(generate_samples=not getattr(self.args, "use_vllm", False) and rollout_func is None)
        if self.objective.loss_agg_mode == "seq-mean-token-sum-norm" and self.objective.loss_scale_factor is None:
            self.objective.loss_scale_factor = float(self.max_completion_length)
        if objective is not None:  # without one the loss is TRL's own loss_type, as GRPOTrainer's
            self._warn_on_advantage_mismatch()
        self._warn_on_low_precision_head()
        if fused_head and self._parameters_are_sharded():
            raise ValueError("fused_head=True reads lm_head.weight outside the model's forward, where FSDP and DeepSpeed "
                             "ZeRO-3 hold only this process's shard of it; leave fused_head to None (the model's own "
                             "logits are used)")
        self.fused_head = fused_head
        self.diagnostics = diagnostics
        # (the run's TrainerState, its step) whose first micro-batch shared the controllers' statistics: a second train()
        # starts a new state, whose step 0 shares again (the state itself is kept: a dead one's id may be reused)
        self._shared_step: tuple[Any, int] | None = None

    @staticmethod
    def _own_objective(objective: Any, objective_params: dict[str, Any], grpo_args: Any) -> Objective:
        """The objective this trainer computes and may adjust (``loss_scale_factor``, the KL coefficient): TRL's own
        loss for ``objective=None``, a copy of a built ``Objective`` (the caller's object is never changed, so it can
        serve several trainers), and kl_ref's coefficient and importance weighting set to ``beta`` and
        ``use_bias_correction_kl`` unless the caller chose them."""
        if objective is None:
            return objective_for_trl_loss(grpo_args, **objective_params)
        if isinstance(objective, Objective):
            if objective_params:
                raise ValueError("objective_params applies to a method name or config, not to a built Objective")
            own = copy.deepcopy(objective)
        else:
            own = build_objective(objective, **objective_params)
        kl_reference = _kl_reference(own)
        beta = _trl_option(grpo_args, "beta")
        if kl_reference is not None and beta:
            if not _kl_setting_given("kl_loss_coef", objective, objective_params):
                try:  # checked as the part's own parameters are, with its message
                    kl_reference.kl_loss_coef = make_part("regularizer", "kl_ref", {"kl_loss_coef": beta}).kl_loss_coef
                except ValueError as error:
                    raise _naming_trl_options(error, {"kl_loss_coef"}) from None
            if not _kl_setting_given("importance_weighted", objective, objective_params):
                kl_reference.importance_weighted = bool(_trl_option(grpo_args, "use_bias_correction_kl"))
        return own

    def _warn_on_advantage_mismatch(self) -> None:
        names = self.objective.name.split("+") if self.objective.name != "custom" else []
        estimators = {get_method(name).advantage_estimator for name in names}
        foreign = sorted(estimators - _TRL_COMPATIBLE_ESTIMATORS)
        if foreign:
            warnings.warn(
                f"objective {self.objective.label!r} is paired with the advantage estimator(s) {foreign}, but "
                "EntropyGRPOTrainer uses TRL's group-normalised advantages (scale_rewards); the loss is the method's, "
                "the advantages are not",
                stacklevel=3,
            )
        scale_rewards = str(getattr(self.args, "scale_rewards", "group")).lower()
        if "dr_grpo" in estimators and scale_rewards not in ("none", "false"):
            warnings.warn(
                f"objective {self.objective.label!r} uses Dr. GRPO advantages (no std division): set "
                f"GRPOConfig(scale_rewards='none'), got scale_rewards={scale_rewards!r}",
                stacklevel=3,
            )

    def _warn_on_filtered_sampling(self, *, generate_samples: bool = True) -> None:
        """The objective's caveats (:meth:`Objective.filtered_sampling_caveats`) when GRPOConfig's top_k (below the
        vocabulary's size), top_p or min_p leave tokens out of the sampled distribution, as its ``generation_kwargs``
        (which TRL applies over them) set them, or when those kwargs set one of generate's other truncations
        (``typical_p`` below 1, ``epsilon_cutoff`` or ``eta_cutoff`` above 0, any ``top_h``); when the model's
        ``generate`` samples (``generate_samples``: no vLLM, no rollout_func), also those its generation_config.json
        sets where TRL leaves them unset. A ``temperature`` among them that is not
        GRPOConfig's draws the tokens at one temperature while TRL and the objective score them at the other: that is
        warned about for every objective."""
        settings = {name: getattr(self.args, name, None) for name in ("top_k", "top_p", "min_p")}
        given = getattr(self.args, "generation_kwargs", None) or {}
        settings.update({name: given[name] for name in settings if name in given})
        # what TRL leaves unset (None, or not passed at all), generate() takes from the model's generation_config.json
        model_settings = (getattr(self.accelerator.unwrap_model(self.model), "generation_config", None)
                          if generate_samples else None)
        from_model = {name: getattr(model_settings, name, None) for name in [*settings, *_GENERATE_TRUNCATIONS,
                                                                               "no_repeat_ngram_size"]}
        from_model = {name: value for name, value in from_model.items()
                      if value is not None and settings.get(name) is None and name not in given}
        settings.update({name: from_model[name] for name in settings if name in from_model})
        top_k, top_p, min_p = settings.values()
        model_file = "the model's generation_config.json"
        other_truncations = [f"GRPOConfig's generation_kwargs {name} = {given[name]}" if name in given
                             else f"{model_file} {name} = {from_model[name]}"
                             for name, cuts in _GENERATE_TRUNCATIONS.items()
                             if is_real_number(value := given.get(name, from_model.get(name))) and cuts(value)]
        if leaves_tokens_out(top_k=top_k, top_p=top_p, min_p=min_p, vocab_size=model_vocab_size(self.model)):
            filters = (f"GRPOConfig's top_k = {top_k} / top_p = {top_p} / min_p = {min_p}"
                       + (" (with its generation_kwargs)" if any(name in given for name in settings) else "")
                       + (f" ({', '.join(name for name in settings if name in from_model)} from {model_file})"
                          if any(name in from_model for name in settings) else ""))
        elif other_truncations:
            filters = " / ".join(other_truncations)
        else:
            filters = None
        if filters is not None:
            for caveat in self.objective.filtered_sampling_caveats(filters, "GRPOConfig's temperature"):
                warnings.warn(caveat, stacklevel=3)
        self._warn_on_penalised_sampling(given, from_model)
        sampled_at = given.get("temperature")
        if is_real_number(sampled_at) and sampled_at != self.temperature:
            warnings.warn(
                f"GRPOConfig's generation_kwargs temperature = {sampled_at} draws the completions at another temperature "
                f"than GRPOConfig's temperature = {self.temperature}, at which TRL and the objective score their "
                "log-probs: the policy trained is not the one sampled (the ratio of an on-policy step is not 1, and the "
                "entropy statistics describe the scoring temperature); set GRPOConfig's temperature instead",
                stacklevel=3)

    def _warn_on_penalised_sampling(self, given: dict[str, Any], from_model: dict[str, Any]) -> None:
        """generate()'s penalties (a repetition penalty, an n-gram ban, banned or suppressed tokens, sequence biases)
        reshape the distribution the completions are drawn from, which TRL and the objective score unpenalised: a
        method reading H, S, D or the sampler's log-probs is told so, as for a truncation."""
        penalty = given.get("repetition_penalty", getattr(self.args, "repetition_penalty", None))
        penalties = [f"{'GRPOConfig.generation_kwargs' if 'repetition_penalty' in given else 'GRPOConfig'}'s "
                     f"repetition_penalty = {penalty}"] if is_real_number(penalty) and penalty != 1 else []
        ngrams = given.get("no_repeat_ngram_size", from_model.get("no_repeat_ngram_size"))
        if is_real_number(ngrams) and ngrams > 0:
            source = "GRPOConfig.generation_kwargs's" if "no_repeat_ngram_size" in given else \
                "the model's generation_config.json's"
            penalties.append(f"{source} no_repeat_ngram_size = {ngrams}")
        # generate()'s and vLLM's (presence / frequency penalties, logit biases, banned or allowed tokens, min_tokens)
        penalties += [f"GRPOConfig.generation_kwargs's {name}" for name in _SAMPLING_RESHAPERS
                      if given.get(name) not in (None, 0, 0.0, [], {}, "")]
        read = sorted({"entropy", "disc", "disc_centered", "rollout_log_prob"} & set(self.objective.required_fields))
        if penalties and read:
            warnings.warn(
                f"{' / '.join(penalties)} reshape the distribution the completions are drawn from, while "
                f"TRL and method {self.objective.label!r} score them under the full distribution at GRPOConfig's "
                f"temperature: the {', '.join(read)} it reads describe another distribution than the one sampled "
                "(a sampler/trainer ratio holds the penalty too)", stacklevel=4)

    def _warn_on_low_precision_head(self) -> None:
        """TRL scores the old and reference log-probs with its own LM head, in the autocast or weight dtype unless
        ``cast_lm_head_to_fp32``; the objective's current log-probs come from float32 logits. When TRL computes old
        log-probs (off-policy micro-steps, vLLM's correction) or reference ones (``beta``), a bfloat16 / float16 head
        makes the first pass's ratio differ from 1 (about 1e-3) and the KL to a reference equal to the policy differ
        from 0; ``cast_lm_head_to_fp32=True`` scores them in float32 too."""
        if getattr(self.args, "cast_lm_head_to_fp32", True):
            return
        head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
        low_precision = self.args.bf16 or self.args.fp16 or head.weight.dtype != torch.float32
        generate_every = self.args.steps_per_generation * self.num_iterations
        old_log_probs = self.args.gradient_accumulation_steps % generate_every != 0 or (
            self.use_vllm and self.vllm_importance_sampling_correction
        )
        if low_precision and (old_log_probs or self.beta != 0.0):
            warnings.warn(
                "TRL computes the old / reference log-probs with a bfloat16 or float16 LM head and the objective its "
                "current ones in float32, so the ratio starts off 1 (and the reference KL off 0) by the rounding"
                + (f" (about 1e-3); {_TIED_HEAD_ELSEWHERE}"
                   if _tied_head_trl_cannot_cast(self.accelerator.unwrap_model(self.model))
                   else ": set GRPOConfig(cast_lm_head_to_fp32=True) to score them in float32 as well"),
                stacklevel=3,
            )

    # ------------------------------------------------------------------------------------------------ checkpoints
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``GRPOTrainer.train``; ``resume_from_checkpoint=True`` takes the newest *complete* checkpoint of
        ``output_dir`` (:meth:`latest_complete_checkpoint`) where transformers takes the newest folder."""
        if resume_from_checkpoint is True:  # True again when there is none: transformers says so
            resume_from_checkpoint = self._latest_complete_checkpoint() or True
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def latest_complete_checkpoint(self) -> str | None:
        """The newest ``checkpoint-N`` folder of ``args.output_dir`` that holds a readable ``trainer_state.json``,
        which a save writes (in place, not as one rename) after everything but the pruning of older checkpoints; newer
        folders without it, or with one cut short (saves cut short by a crash), are passed over with a warning. None
        when ``output_dir`` holds no checkpoint folder; ``ValueError`` when it holds only incomplete ones."""
        return self._latest_complete_checkpoint()

    def _latest_complete_checkpoint(self) -> str | None:
        """:meth:`latest_complete_checkpoint`, called by it or by :meth:`train`: either way the warning points two
        frames up, at the user's call."""
        folder = self.args.output_dir
        numbered = sorted(((int(match[1]), name) for name in (os.listdir(folder) if os.path.isdir(folder) else [])
                           if (match := _CHECKPOINT_FOLDER.fullmatch(name)) and os.path.isdir(os.path.join(folder, name))),
                          reverse=True)
        incomplete = []
        for _, name in numbered:
            checkpoint = os.path.join(folder, name)
            if _readable_json(os.path.join(checkpoint, TRAINER_STATE_NAME)):
                if incomplete:
                    warnings.warn(f"{', '.join(incomplete)} hold(s) no readable {TRAINER_STATE_NAME} (a save cut "
                                  f"short): resuming from {checkpoint}", stacklevel=3)
                return checkpoint
            incomplete.append(checkpoint)
        if incomplete:
            raise ValueError(f"no complete checkpoint in {folder}: {', '.join(incomplete)} hold(s) no readable "
                             f"{TRAINER_STATE_NAME} (a save cut short); train without resume_from_checkpoint to start afresh")
        return None

    def _save_checkpoint(self, model, trial) -> None:
        """The objective's state and name go into the checkpoint folder before TRL's files: TRL writes
        ``trainer_state.json`` (what makes a folder a complete checkpoint, see :meth:`latest_complete_checkpoint`) and
        then prunes older checkpoints (``save_total_limit``) last, so a crash at any moment leaves a complete checkpoint
        that holds the state. Stale state files are removed: a stateless objective's, and the per-process files of
        processes this run does not have (a run on fewer processes writing over an earlier run's checkpoint), which a
        resume on more processes would otherwise load."""
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        state = self.objective.state_dict()
        files = [OBJECTIVE_STATE_FILE] if self.args.should_save else []
        if self.accelerator.num_processes > 1:  # each process's own, as transformers keeps its RNG states
            files.append(objective_state_file(self.accelerator.process_index))
        folder.mkdir(parents=True, exist_ok=True)
        if self.args.should_save:
            own_files = self.accelerator.num_processes if self.accelerator.num_processes > 1 else 0
            for stale in folder.iterdir():
                if (match := _PROCESS_STATE_FILE.fullmatch(stale.name)) and int(match[1]) >= own_files:
                    stale.unlink(missing_ok=True)
        for name in files:
            if state or self.objective.stateful:  # an empty state too: the state before it first moved
                atomic_torch_save(state, folder / name, follow_links=False)
            else:
                (folder / name).unlink(missing_ok=True)
        if self.args.should_save:
            self._write_objective_name(str(folder))
        super()._save_checkpoint(model, trial)

    def save_state(self) -> None:
        super().save_state()
        if self.args.should_save:
            self._write_objective_name(self.args.output_dir)

    def _write_objective_name(self, folder: str) -> None:
        """The objective's name (with the parts added to its methods) beside the ``trainer_state.json`` written there,
        for ``entrorl report``."""
        atomic_write_text(Path(folder) / TRL_OBJECTIVE_FILE, json.dumps({"method": self.objective.label}),
                          follow_links=False)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            own = os.path.join(checkpoint, objective_state_file(self.accelerator.process_index))
            shared = os.path.join(checkpoint, OBJECTIVE_STATE_FILE)
            if self.accelerator.num_processes > 1 and not os.path.exists(own) and os.path.exists(shared):
                warnings.warn(f"{checkpoint} holds no objective state of process {self.accelerator.process_index} "
                              f"(saved by {self.accelerator.num_processes} processes?): it takes the state of the "
                              "process that saved the checkpoint", stacklevel=2)
            path = own if self.accelerator.num_processes > 1 and os.path.exists(own) else shared
            if not os.path.exists(path) and self.objective.stateful:
                warnings.warn(f"{checkpoint} holds no objective state (a checkpoint of GRPOTrainer, or of another "
                              f"objective): {self.objective.label}'s state starts afresh", stacklevel=2)
            try:
                self.objective.load_state_dict(torch.load(path, weights_only=True) if os.path.exists(path) else {})
            except ValueError as error:  # the state of parts this objective lacks, or cannot take
                saved = _saved_objective_label(checkpoint)
                raise ValueError(f"{path} holds the state of {f'the objective {saved!r}' if saved else 'another objective'}, "
                                 f"which this trainer's objective {self.objective.label!r} cannot take ({error}); resume "
                                 "with the objective the checkpoint was trained with, or delete that file to start the "
                                 "objective's state afresh") from None

    # ------------------------------------------------------------------------------------------------ scoring
    def _parameters_are_sharded(self) -> bool:
        """Whether FSDP or DeepSpeed ZeRO-3 shards the parameters over the processes (outside a forward each process
        holds its shard alone)."""
        if getattr(self, "is_fsdp_enabled", False):
            return True
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None) if getattr(self, "is_deepspeed_enabled", False) else None
        return getattr(plugin, "zero_stage", None) == 3

    def _uses_fused_head(self, model: torch.nn.Module) -> bool:
        if self.fused_head is not None:
            return self.fused_head
        if self._parameters_are_sharded():
            return False
        unwrapped = self.accelerator.unwrap_model(model)
        # a head that is not a plain nn.Linear (a LoRA adapter on lm_head, ...) computes more than hidden @ W^T
        if type(unwrapped.get_output_embeddings()) is not torch.nn.Linear:
            return False
        return getattr(getattr(unwrapped, "config", None), "model_type", None) in FUSED_HEAD_MODEL_TYPES

    def _response_stats(
        self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[TokenStats, torch.Tensor | None]:
        """Log-prob, H, S and D of the completion tokens (temperature-scaled like TRL), and the MoE aux loss."""
        width = completion_ids.size(1)
        forward_kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if self.aux_loss_enabled:
            forward_kwargs["output_router_logits"] = True
        fused = self._uses_fused_head(model)
        float32_head = not fused and getattr(self.args, "cast_lm_head_to_fp32", False)
        with self.accelerator.autocast():
            if fused:
                outputs = model(**forward_kwargs, output_hidden_states=True, logits_to_keep=1)
            else:
                head = self.accelerator.unwrap_model(model).get_output_embeddings()
                with _outside_autocast(head, input_ids.device.type) if float32_head else contextlib.nullcontext():
                    outputs = model(**forward_kwargs, logits_to_keep=width + 1)
        # the statistics are reduced in float32 whatever the autocast dtype of the forward pass
        if fused:
            hidden = outputs.hidden_states[-1][:, -width - 1 : -1]
            head = self.accelerator.unwrap_model(model).get_output_embeddings()
            # cast_lm_head_to_fp32 on a half-precision model: a float32 head, which TRL feeds float32 hidden states
            dtype = torch.promote_types(hidden.dtype, head.weight.dtype)
            bias = None if head.bias is None else head.bias.to(dtype)
            stats = token_stats_from_hidden(
                hidden.to(dtype), head.weight.to(dtype), completion_ids, lm_head_bias=bias, temperature=self.temperature,
                mask=mask, need=STAT_NAMES,
            )
        else:
            logits = outputs.logits[:, -width - 1 : -1]
            stats = token_stats(logits, completion_ids, temperature=self.temperature, mask=mask, need=STAT_NAMES)
        aux_loss = getattr(outputs, "aux_loss", None) if self.aux_loss_enabled else None
        return stats, aux_loss

    def _share_step_statistics(self, batch: PolicyBatch) -> None:
        """Under data parallelism, at the first micro-batch of each step: the adaptive entropy controllers measure
        every process's tokens (:meth:`AdaptiveEntropy.share_measurement`), so that one coefficient moves on every
        process, as TRL's own controller and Skywork-OR1's verl code measure the whole batch. Every process runs the
        same micro-batches, so each makes the same collectives."""
        shared = self._shared_step
        if self.accelerator.num_processes < 2 or (
                shared is not None and shared[0] is self.state and shared[1] == self.state.global_step):
            return
        self._shared_step = (self.state, self.state.global_step)
        for part in self.objective.regularizers:
            if isinstance(part, AdaptiveEntropy):
                part.share_measurement(batch, lambda local: self.accelerator.reduce(local, reduction="sum"))

    def _sampler_log_prob(self, inputs: dict[str, Any], old_log_prob: torch.Tensor) -> torch.Tensor | None:
        """The sampler's per-token log-probs for the objective's rollout correction (None without a correction). TRL
        marks a token the engine returned no log-prob for as NaN and leaves it uncorrected: it gets the old log-prob
        here, a ratio of 1, instead of a NaN that would reach every weight through the gradient."""
        if self.objective.correction is None:
            return None
        sampled = inputs.get("sampling_per_token_logps")
        if sampled is None:
            raise ValueError(
                f"the objective's rollout correction ({self.objective.correction.name}) needs the sampler's log-prob of "
                "every completion token, and this batch has none: with a rollout_func, return them as 'logprobs' (one "
                "list per completion); with vLLM, keep use_vllm=True")
        sampled = sampled.float()
        return torch.where(torch.isnan(sampled), old_log_prob, sampled)

    # ------------------------------------------------------------------------------------------------ the loss
    def _compute_loss(self, model, inputs: dict[str, Any]) -> torch.Tensor:
        """The entrorl objective on one micro-batch, scaled for gradient accumulation (see the module docstring)."""
        unsupported = [key for key in ("pixel_values", "image_grid_thw", "num_images") if key in inputs]
        if unsupported:
            raise NotImplementedError(f"EntropyGRPOTrainer scores text-only batches; got multimodal inputs {unsupported}")
        mode = "train" if self.model.training else "eval"
        training = mode == "train"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask.bool()
        if "tool_mask" in inputs:
            mask = mask & inputs["tool_mask"].bool()
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        stats, aux_loss = self._response_stats(model, input_ids, attention_mask, completion_ids, mask)

        old_log_prob = inputs.get("old_per_token_logps")
        old_log_prob = stats.logprob.detach() if old_log_prob is None else old_log_prob.float()
        batch = PolicyBatch(
            log_prob=stats.logprob,
            old_log_prob=old_log_prob,
            advantages=inputs["advantages"].float(),
            mask=mask,
            entropy=stats.entropy,
            disc=stats.disc,
            disc_centered=stats.disc_centered,
            ref_log_prob=None if inputs.get("ref_per_token_logps") is None else inputs["ref_per_token_logps"].float(),
            rollout_log_prob=self._sampler_log_prob(inputs, old_log_prob),
            step=self.state.global_step,
        )
        # the seq-mean modes average over every row of the micro-batch, empty ones included, as TRL's grpo and dr_grpo do
        rows = float(mask.size(0))
        if training:
            self._share_step_statistics(batch)
            out = self.objective(batch, global_batch_size=rows)
        else:  # an evaluation leaves stateful parts (adaptive coefficients, RNGs) as training left them
            state = copy.deepcopy(self.objective.state_dict())
            out = self.objective(batch, global_batch_size=rows)
            self.objective.load_state_dict(state)

        accumulation_steps = self.current_gradient_accumulation_steps if training else 1
        weight = accumulation_weight(
            self.objective.loss_agg_mode,
            micro_valid_tokens=float(mask.sum()),
            num_items_in_batch=float(inputs["num_items_in_batch"]),
            num_processes=self.accelerator.num_processes,
            gradient_accumulation_steps=accumulation_steps,
            steps_per_generation=self.args.steps_per_generation if training else 1,
        )
        loss = out.loss * weight
        if aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation_steps
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())

        self._log_step(mode, batch, out.metrics, out.advantages)
        return loss

    def _log_step(self, mode: str, batch: PolicyBatch, objective_metrics: dict[str, float], advantages: torch.Tensor) -> None:
        metrics = self._metrics[mode]
        mask = batch.mask
        totals = torch.stack([torch.where(mask, batch.entropy.detach(), 0.0).sum(), mask.sum().float()])
        totals = self.accelerator.reduce(totals, reduction="sum")
        # no valid token, no entropy: NaN, which TRL's log leaves out of the mean (a 0 would read as a collapse)
        metrics["entropy"].append(float(totals[0] / totals[1]) if float(totals[1]) > 0 else math.nan)
        # the loss's own (clipping, selection, KL): TRL's loss-side metrics are not computed. A micro-batch without a
        # valid token has none (its ratio mean, its entropy quantile, its shares would read 0): left out of the mean
        entries = dict(objective_metrics) if bool(mask.any()) else {}
        if self.diagnostics:
            token_advantages = torch.where(mask, advantages, 0.0)
            entries.update(entropy_summary(batch.entropy, mask))
            entries.update(discriminator_summary(batch.disc, batch.disc_centered, token_advantages, mask))
            entries.update(covariance_summary(batch.log_prob, token_advantages, mask))
        for key, value in entries.items():
            value = float(value)
            if math.isfinite(value):  # TRL logs each metric's plain mean over the micro-batches
                metrics[key].append(value)
