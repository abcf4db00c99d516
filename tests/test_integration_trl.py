"""EntropyGRPOTrainer: the entrorl objective inside TRL's GRPOTrainer, checked against entrorl and TRL."""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import trl  # noqa: E402
from entrorl.integrations.trl import (  # noqa: E402
    MIN_TRL_VERSION, OBJECTIVE_STATE_FILE, EntropyGRPOTrainer, accumulation_weight, check_trl_args, check_trl_version,
    objective_for_trl_loss,
)
from entrorl.lab.tiny_model import build_char_tokenizer, build_tiny_qwen2  # noqa: E402
from entrorl.objective import PolicyBatch, build_objective  # noqa: E402
from entrorl.tokens import token_stats  # noqa: E402

MAX_COMPLETION = 6


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_char_tokenizer()
    tok.padding_side = "left"
    return tok


def _model(tokenizer):
    return build_tiny_qwen2(
        len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=64, seed=0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )


def _reward_digits(completions, **kwargs):
    return [float(sum(ch.isdigit() for ch in text)) / MAX_COMPLETION for text in completions]


def _config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=4,
        num_generations=4, max_completion_length=MAX_COMPLETION, save_strategy="no", logging_steps=1, seed=0,
        learning_rate=1e-2, dataloader_num_workers=0, disable_tqdm=True,
    )
    values.update(overrides)
    return GRPOConfig(**values)


def _dataset():
    return Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(4) for b in range(4)]})


def _trainer(cls, tokenizer, tmp_path, objective=None, config=None, model=None, **kwargs):
    extra = {} if objective is None else {"objective": objective}
    return cls(
        model=model if model is not None else _model(tokenizer), reward_funcs=_reward_digits,
        args=config or _config(tmp_path), train_dataset=_dataset(),
        processing_class=tokenizer, **extra, **kwargs,
    )


def _inputs(tokenizer, *, rows=4, seed=0, off_policy=True, lengths=None):
    """A micro-batch as TRL hands it to the loss: left-padded prompts, right-padded completions of varied length."""
    generator = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    prompt_lengths = torch.randint(2, 5, (rows,), generator=generator)
    completion_lengths = torch.randint(1, MAX_COMPLETION + 1, (rows,), generator=generator)
    completion_lengths[0] = MAX_COMPLETION
    if lengths is not None:
        completion_lengths = torch.tensor(lengths)
    prompt_ids = torch.full((rows, 4), tokenizer.pad_token_id)
    prompt_mask = torch.zeros((rows, 4), dtype=torch.long)
    completion_ids = torch.full((rows, MAX_COMPLETION), tokenizer.pad_token_id)
    completion_mask = torch.zeros((rows, MAX_COMPLETION), dtype=torch.long)
    for row in range(rows):
        p, c = int(prompt_lengths[row]), int(completion_lengths[row])
        prompt_ids[row, 4 - p :] = torch.randint(4, vocab, (p,), generator=generator)
        prompt_mask[row, 4 - p :] = 1
        completion_ids[row, :c] = torch.randint(4, vocab, (c,), generator=generator)
        completion_mask[row, :c] = 1
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": torch.randn(rows, generator=generator),
        "num_items_in_batch": completion_mask.sum(),
    }
    if off_policy:
        # old log-probs that differ enough from the current ones for PPO clipping to act on some tokens
        inputs["old_per_token_logps"] = (-4.0 + 0.6 * torch.randn(rows, MAX_COMPLETION, generator=generator)) * completion_mask
    return inputs


def _rows(inputs, index):
    return {k: (v[index] if k != "num_items_in_batch" else v) for k, v in inputs.items()}


def _loss_and_grads(trainer, inputs, *, accumulation=1, steps_per_generation=1, parts=None):
    """Loss and parameter gradients, accumulated over ``parts`` (row index lists) like TRL's training loop."""
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = accumulation
    trainer.args.steps_per_generation = steps_per_generation
    total = 0.0
    for index in parts or [list(range(len(inputs["advantages"])))]:
        loss = trainer._compute_loss(trainer.model, _rows(inputs, index))
        loss.backward()
        total += float(loss.detach())
    grads = {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return total, grads


def _assert_grads_close(left, right, *, rtol=1e-4, atol=1e-6):
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def _assert_accumulated_loss_is_trls(ours, theirs, inputs) -> float:
    """Two accumulation steps of two rows each (rows 0-1, then 2-3): our trainer's loss and gradients equal TRL's.
    Returns TRL's loss."""
    parts = [[0, 1], [2, 3]]
    loss_ours, grads_ours = _loss_and_grads(ours, inputs, accumulation=2, steps_per_generation=2, parts=parts)
    loss_theirs, grads_theirs = _loss_and_grads(theirs, inputs, accumulation=2, steps_per_generation=2, parts=parts)
    assert loss_ours == pytest.approx(loss_theirs, rel=1e-5)
    _assert_grads_close(grads_ours, grads_theirs)
    return loss_theirs


def test_accumulation_weight_formula():
    # token-mean: micro tokens over the window's tokens per process (N_gen / P * G / S)
    assert accumulation_weight("token-mean", micro_valid_tokens=30, num_items_in_batch=240, num_processes=2,
                               gradient_accumulation_steps=2, steps_per_generation=4) == pytest.approx(30 / 60)
    assert accumulation_weight("seq-mean-token-mean", micro_valid_tokens=30, num_items_in_batch=240, num_processes=2,
                               gradient_accumulation_steps=4, steps_per_generation=4) == pytest.approx(0.25)
    assert accumulation_weight("token-mean", micro_valid_tokens=0, num_items_in_batch=0, num_processes=1,
                               gradient_accumulation_steps=1, steps_per_generation=1) == 0.0
    with pytest.raises(ValueError, match="must be >= 1"):
        accumulation_weight("token-mean", micro_valid_tokens=1, num_items_in_batch=1, num_processes=1,
                            gradient_accumulation_steps=0, steps_per_generation=1)
    with pytest.raises(ValueError, match="must be >= 1"):
        accumulation_weight("seq-mean-token-mean", micro_valid_tokens=1, num_items_in_batch=1, num_processes=0,
                            gradient_accumulation_steps=1, steps_per_generation=1)
    for mode in ("token-mean", "seq-mean-token-mean"):
        with pytest.raises(ValueError, match="must be >= 1"):
            accumulation_weight(mode, micro_valid_tokens=1, num_items_in_batch=1, num_processes=1,
                                gradient_accumulation_steps=1, steps_per_generation=0)


@pytest.mark.parametrize("fused_head", [True, False])
def test_loss_equals_objective_on_the_same_tensors(tokenizer, tmp_path, fused_head):
    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo+forking_tokens+clip_b", objective_params={"mu": 0.1},
                       fused_head=fused_head)
    assert trainer._uses_fused_head(trainer.model) is fused_head  # the caller's choice, on a model that could fuse
    inputs = _inputs(tokenizer)
    loss, grads = _loss_and_grads(trainer, inputs)

    # the reference: logits of a plain forward, entrorl's token statistics, a freshly built objective
    model = _model(tokenizer)
    mask = inputs["completion_mask"].bool()
    logits = model(input_ids=torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                   attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)).logits
    stats = token_stats(logits[:, -MAX_COMPLETION - 1 : -1], inputs["completion_ids"], mask=mask,
                        need=("logprob", "entropy", "disc", "disc_centered"))
    out = build_objective("dapo+forking_tokens+clip_b", mu=0.1)(PolicyBatch(
        log_prob=stats.logprob, old_log_prob=inputs["old_per_token_logps"].float(), advantages=inputs["advantages"],
        mask=mask, entropy=stats.entropy, disc=stats.disc, disc_centered=stats.disc_centered,
    ))
    out.loss.backward()
    # both selectors acted (80/20 on entropy, Clip_B on S), so the comparison covers H and S
    assert out.metrics["select/forking_tokens_frac"] > 0 and out.metrics["select/clip_b_frac"] > 0
    assert loss == pytest.approx(float(out.loss.detach()), rel=1e-5)
    _assert_grads_close(grads, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize(
    ("method", "trl_options"),
    [
        ("dapo", {"loss_type": "dapo", "epsilon": 0.2, "epsilon_high": 0.28}),
        ("grpo", {"loss_type": "grpo", "epsilon": 0.2}),
        ("dr_grpo", {"loss_type": "dr_grpo", "epsilon": 0.2, "scale_rewards": "none"}),
    ],
)
def test_matches_trl_own_loss_with_gradient_accumulation(tokenizer, tmp_path, method, trl_options):
    """Same inputs, two accumulation steps of two rows each: loss and gradient equal TRL's loss_type."""
    config = dict(gradient_accumulation_steps=2, per_device_train_batch_size=2, num_generations=4, **trl_options)
    ours = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective=method, config=_config(tmp_path, **config))
    theirs = _trainer(GRPOTrainer, tokenizer, tmp_path, config=_config(tmp_path, **config))
    inputs = _inputs(tokenizer, seed=3)
    _assert_accumulated_loss_is_trls(ours, theirs, inputs)
    # PPO clipping acted (else the comparison would not cover it), and TRL logged its own metrics beside ours
    assert max(ours._metrics["train"]["clip/ppo_frac"]) > 0
    assert ours._metrics["train"]["entropy"] == pytest.approx(theirs._metrics["train"]["entropy"], rel=1e-5)


@pytest.mark.parametrize("fused_head", [True, False])
def test_a_sampling_temperature_scales_the_logits_as_trl_does(tokenizer, tmp_path, fused_head):
    """GRPOConfig.temperature divides the logits before the log-probs and entropies, on either scoring path."""
    config = dict(gradient_accumulation_steps=2, per_device_train_batch_size=2, num_generations=4, temperature=0.5)
    ours = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, config=_config(tmp_path, **config), fused_head=fused_head)
    theirs = _trainer(GRPOTrainer, tokenizer, tmp_path, config=_config(tmp_path, **config))
    inputs = _inputs(tokenizer, seed=3)
    _assert_accumulated_loss_is_trls(ours, theirs, inputs)
    assert ours._metrics["train"]["entropy"] == pytest.approx(theirs._metrics["train"]["entropy"], rel=1e-5)


@pytest.mark.parametrize(
    ("method", "ours", "theirs"),
    [
        ("grpo", {"loss_type": "grpo"}, {"loss_type": "grpo"}),
        ("dr_grpo", {"loss_type": "dr_grpo", "scale_rewards": "none"}, {"loss_type": "dr_grpo", "scale_rewards": "none"}),
        # TRL's GSPO is its grpo loss with the sequence-level ratio
        ("gspo", {"loss_type": "grpo", "epsilon": 3e-4, "epsilon_high": 4e-4},
         {"loss_type": "grpo", "epsilon": 3e-4, "epsilon_high": 4e-4, "importance_sampling_level": "sequence"}),
    ],
)
def test_seq_mean_modes_count_fully_masked_rows_as_trl_does(tokenizer, tmp_path, method, ours, theirs):
    """A completion masked whole (mask_truncated_completions, a tool mask) still counts as a row of the micro-batch,
    as in TRL's grpo / dr_grpo: each accumulated micro-batch holds one such row."""
    shared = dict(gradient_accumulation_steps=2, per_device_train_batch_size=2, num_generations=4)
    entrorl_trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective=method, config=_config(tmp_path, **shared, **ours))
    trl_trainer = _trainer(GRPOTrainer, tokenizer, tmp_path, config=_config(tmp_path, **shared, **theirs))
    inputs = _inputs(tokenizer, seed=3)
    inputs["completion_mask"][[1, 3]] = 0
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    assert _assert_accumulated_loss_is_trls(entrorl_trainer, trl_trainer, inputs) != 0.0


@pytest.mark.parametrize(
    "trl_options",
    [
        {},  # TRL's default: dapo with epsilon_high = epsilon = 0.2
        {"loss_type": "grpo", "epsilon": 0.1},
        {"loss_type": "dr_grpo", "scale_rewards": "none"},
        {"loss_type": "cispo", "epsilon_high": 1.05},
        # GSPO: TRL's loss with the sequence-level ratio, entrorl's gspo with that loss's aggregation
        {"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4},
        {"importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4},
        {"loss_type": "dr_grpo", "importance_sampling_level": "sequence", "epsilon": 3e-4, "scale_rewards": "none"},
    ],
)
def test_without_an_objective_the_loss_is_trl_loss_type(tokenizer, tmp_path, trl_options):
    """EntropyGRPOTrainer in place of GRPOTrainer, with no objective, keeps GRPOConfig.loss_type's loss."""
    config = _config(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=2, **trl_options)
    ours = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, config=config)
    theirs = _trainer(GRPOTrainer, tokenizer, tmp_path, config=config)
    sequence_level = trl_options.get("importance_sampling_level") == "sequence"
    assert ours.objective.name == ("gspo" if sequence_level else trl_options.get("loss_type", "dapo"))
    inputs = _inputs(tokenizer, seed=3)
    _assert_accumulated_loss_is_trls(ours, theirs, inputs)
    clip_metric = ("clip/gspo_frac" if sequence_level else
                   "clip/cispo_frac" if trl_options.get("loss_type") == "cispo" else "clip/ppo_frac")
    assert max(ours._metrics["train"][clip_metric]) > 0  # the clip range, taken from epsilon / epsilon_high, acted


def test_loss_type_must_describe_the_objective(tmp_path):
    """A loss_type with no entrorl equivalent is refused, and a non-default one must be the objective's loss."""
    for loss_type in ("bnpo", "sapo", "luspo", "vespo"):
        with pytest.raises(ValueError, match=rf"loss_type={loss_type!r} has no entrorl method .* pass objective="):
            EntropyGRPOTrainer(model="not-loaded", args=_config(tmp_path, loss_type=loss_type))
        with pytest.raises(ValueError, match=rf"loss_type={loss_type!r}: entrorl has no method"):
            check_trl_args(_config(tmp_path, loss_type=loss_type), build_objective("grpo"))
    with pytest.raises(ValueError, match=r"epsilon_high = 0.2 .* below 1"):  # TRL's cispo with its default cap
        objective_for_trl_loss(_config(tmp_path, loss_type="cispo"))
    # a cap of exactly 1 is entrorl's cispo with clip_ratio_high = 0; just below 1 it has no equivalent
    capped = objective_for_trl_loss(_config(tmp_path, loss_type="cispo", epsilon_high=1.0)).surrogate
    assert (capped.clip_ratio_low, capped.clip_ratio_high) == (1.0, 0.0)
    with pytest.raises(ValueError, match=r"epsilon_high = 0.99 .* below 1"):
        objective_for_trl_loss(_config(tmp_path, loss_type="cispo", epsilon_high=0.99))
    for loss_type, method in (("dr_grpo", "grpo"), ("grpo", "dapo"), ("cispo", "dapo"), ("grpo", "kl_cov")):
        with pytest.raises(ValueError, match=rf"loss_type={loss_type!r} is not the objective's loss"):
            check_trl_args(_config(tmp_path, loss_type=loss_type), build_objective(method))
    with pytest.raises(ValueError, match="loss_type='dr_grpo' is not the objective's loss"):
        EntropyGRPOTrainer(model="not-loaded", args=_config(tmp_path, loss_type="dr_grpo"), objective="grpo")
    # the same loss, a composition that keeps it, or TRL's default loss_type (which cannot be told from a choice)
    check_trl_args(_config(tmp_path, loss_type="grpo"), build_objective("grpo+forking_tokens"))
    check_trl_args(_config(tmp_path, loss_type="dapo"), build_objective("clip_cov"))
    check_trl_args(_config(tmp_path, loss_type="grpo", epsilon=3e-4, epsilon_high=4e-4), build_objective("gspo"))
    check_trl_args(_config(tmp_path, loss_type="cispo", epsilon_high=5.0), build_objective("cispo", clip_ratio_high=4.0))
    for high in (0.14, 0.36, 0.57, 1.03):  # 1 + 0.14 is 1.1400000000000001 in binary: the cap as written still matches
        check_trl_args(_config(tmp_path, loss_type="cispo", epsilon_high=round(1 + high, 2)),
                       build_objective("cispo", clip_ratio_low=1.0, clip_ratio_high=high))
    with pytest.raises(ValueError, match=r"caps the IS weight at epsilon_high = 1.15"):
        check_trl_args(_config(tmp_path, loss_type="cispo", epsilon_high=1.15),
                       build_objective("cispo", clip_ratio_low=1.0, clip_ratio_high=0.14))
    with pytest.raises(ValueError, match=r"loss_type='cispo' caps the IS weight at epsilon_high = 5.0"):
        check_trl_args(_config(tmp_path, loss_type="cispo", epsilon_high=5.0), build_objective("cispo"))
    # the right cap but a lower bound TRL's cispo does not have
    with pytest.raises(ValueError, match=r"cispo clips it to \[1 - 0.2, 1 \+ 4.0\]"):
        check_trl_args(_config(tmp_path, loss_type="cispo", epsilon_high=5.0),
                       build_objective("cispo", clip_ratio_low=0.2, clip_ratio_high=4.0))


def test_trl_loss_objective_reads_grpo_config_defaults_and_takes_overrides(tmp_path):
    """objective_for_trl_loss(None) is GRPOConfig's defaults (dapo, epsilon 0.2 on both sides); an args object that lacks
    an option gets its default; objective_params override the parameters taken from TRL's options."""
    default = objective_for_trl_loss(None)
    assert default.name == "dapo" and default.loss_agg_mode == "token-mean"
    assert (default.surrogate.clip_ratio_low, default.surrogate.clip_ratio_high) == (0.2, 0.2)
    partial = objective_for_trl_loss(SimpleNamespace(loss_type="grpo"))
    assert partial.name == "grpo" and (partial.surrogate.clip_ratio_low, partial.surrogate.clip_ratio_high) == (0.2, 0.2)
    overridden = objective_for_trl_loss(_config(tmp_path, loss_type="grpo", epsilon=0.1), clip_ratio_high=0.3)
    assert (overridden.surrogate.clip_ratio_low, overridden.surrogate.clip_ratio_high) == (0.1, 0.3)


def test_beta_is_the_kl_coefficient(tokenizer, tmp_path, tiny_model_dir):
    """beta becomes kl_ref's kl_loss_coef and use_bias_correction_kl its importance_weighted unless the objective sets
    them; set both ways, they must agree; TRL's own loss with beta != 0 keeps its KL term, ratio-weighted or not."""
    config = _config(tmp_path, beta=0.04)
    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo+kl_ref", config=config, model=str(tiny_model_dir))
    assert trainer.objective.regularizers[0].kl_loss_coef == 0.04
    assert trainer.objective.regularizers[0].importance_weighted is True  # TRL's default use_bias_correction_kl
    for objective, params in (("dapo+kl_ref", {"kl_loss_coef": 0.5}),
                              ({"method": "dapo+kl_ref", "params": {"kl_loss_coef": 0.5}}, None),
                              ({"name": "dapo+kl_ref", "params": {"kl_loss_coef": 0.5}}, None),
                              ({"method": "dapo", "regularizers": [{"name": "kl_ref", "kl_loss_coef": 0.5}]}, None),
                              (build_objective("dapo+kl_ref"), None)):
        with pytest.raises(ValueError, match=r"beta = 0.04 and kl_ref's kl_loss_coef = (0.5|0.001) both set"):
            EntropyGRPOTrainer(model="not-loaded", args=config, objective=objective, objective_params=params)
    with pytest.raises(ValueError, match="use_bias_correction_kl = True and kl_ref's importance_weighted = False"):
        EntropyGRPOTrainer(model="not-loaded", args=config, objective="dapo+kl_ref",
                           objective_params={"importance_weighted": False})
    with pytest.raises(ValueError, match="set beta to the KL coefficient"):
        EntropyGRPOTrainer(model="not-loaded", args=_config(tmp_path), objective="dapo+kl_ref")

    # without an objective, TRL's loss with its KL term: k3, weighed by the ratio (TRL's default) or not
    for bias_correction in (True, False):
        config = _config(tmp_path, beta=0.04, loss_type="grpo", use_bias_correction_kl=bias_correction)
        ours = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, config=config, model=str(tiny_model_dir))
        theirs = _trainer(GRPOTrainer, tokenizer, tmp_path, config=config, model=str(tiny_model_dir))
        assert ours.objective.name == "grpo+kl_ref"
        assert ours.objective.regularizers[0].importance_weighted is bias_correction
        inputs = _inputs(tokenizer, seed=4)
        # a reference near the policy, so that no token's k3 reaches entrorl's clamp at 10 (TRL's k3 has none)
        with torch.no_grad():
            logits = theirs.model(input_ids=torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                                  attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)).logits
        log_probs = token_stats(logits[:, -MAX_COMPLETION - 1 : -1], inputs["completion_ids"], need=("logprob",)).logprob
        generator = torch.Generator().manual_seed(4)
        inputs["ref_per_token_logps"] = log_probs + 0.5 * torch.randn(log_probs.shape, generator=generator)
        loss_ours, grads_ours = _loss_and_grads(ours, inputs)
        loss_theirs, grads_theirs = _loss_and_grads(theirs, inputs)
        assert ours._metrics["train"]["kl/ref"][-1] > 0.1  # the KL term weighs in the comparison
        assert loss_ours == pytest.approx(loss_theirs, rel=1e-5)
        _assert_grads_close(grads_ours, grads_theirs)


def test_a_built_objective_is_not_changed_by_the_trainer(tokenizer, tmp_path):
    """The trainer works on a copy: one Objective given to two trainers gets each its own loss_scale_factor."""
    objective = build_objective("dr_grpo")
    trainers = [
        _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective=objective,
                 config=_config(tmp_path, max_completion_length=length, scale_rewards="none"))
        for length in (6, 12)
    ]
    assert [trainer.objective.loss_scale_factor for trainer in trainers] == [6.0, 12.0]
    assert objective.loss_scale_factor is None
    assert all(trainer.objective is not objective for trainer in trainers)
    # a scale the caller chose is kept: max_completion_length is only the default
    chosen = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dr_grpo", objective_params={"loss_scale_factor": 3.0},
                      config=_config(tmp_path, scale_rewards="none"))
    assert chosen.objective.loss_scale_factor == 3.0
    # parameters for a built objective would be silently lost: refused before any model is loaded
    with pytest.raises(ValueError, match="objective_params applies to a method name or config, not to a built Objective"):
        EntropyGRPOTrainer(model="not-loaded", args=_config(tmp_path), objective=objective,
                           objective_params={"clip_ratio_high": 0.3})


def test_mixed_precision_old_log_probs_match_with_a_float32_head(tokenizer, tmp_path, recwarn):
    """Under bfloat16 autocast TRL's old log-probs equal the objective's current ones only with cast_lm_head_to_fp32
    (both from float32 logits); without it the trainer warns when TRL computes old log-probs."""
    inputs = _inputs(tokenizer, seed=6)
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    mask = inputs["completion_mask"].bool()
    gaps = {}
    for cast in (False, True):
        config = _config(tmp_path, bf16=True, num_iterations=2, cast_lm_head_to_fp32=cast)
        recwarn.clear()
        trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="grpo", config=config)
        assert bool([w for w in recwarn if "cast_lm_head_to_fp32=True" in str(w.message)]) is not cast
        with torch.no_grad():
            trl_old, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, MAX_COMPLETION)
            stats, _ = trainer._response_stats(trainer.model, input_ids, attention_mask, inputs["completion_ids"], mask)
        gaps[cast] = float((trl_old - stats.logprob)[mask].abs().max())
    assert gaps[False] > 1e-4 and gaps[True] < 1e-5


def test_a_low_precision_head_warns_when_trl_scores_reference_log_probs(tokenizer, tmp_path, tiny_model_dir, recwarn):
    """With one pass per generation TRL computes no old log-probs, but with beta != 0 it scores the reference's: a
    bfloat16 head without cast_lm_head_to_fp32 warns then, and only then."""
    for beta, objective in ((0.04, "dapo+kl_ref"), (0.0, "dapo")):
        recwarn.clear()
        config = _config(tmp_path, bf16=True, beta=beta, cast_lm_head_to_fp32=False)
        _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective=objective, config=config, model=str(tiny_model_dir))
        assert bool([w for w in recwarn if "cast_lm_head_to_fp32=True" in str(w.message)]) is (beta != 0.0)


def _tied_model_dir(tmp_path, kind: str, tokenizer) -> str:
    """A tiny model whose input embeddings are tied to its head, kept where TRL's cast does not look for them: OPT
    (model.decoder.embed_tokens), GPT-2 (transformer.wte)."""
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    if kind == "opt":
        model = OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                         num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32, **ids))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=4, n_positions=64, **ids))
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path / kind)
    return str(tmp_path / kind)


@pytest.mark.parametrize("kind", ["qwen2+lora", "opt", "gpt2"])
def test_a_tied_head_trl_cannot_cast_is_not_advised_to_and_casting_it_is_refused_saying_why(
        tokenizer, tmp_path, tiny_model_dir, recwarn, kind):
    """TRL's cast_lm_head_to_fp32 fails on a tied head whose input embeddings are not at model.embed_tokens (a PEFT
    model, OPT, GPT-2): the low-precision warning does not advise it there, and setting it is refused naming the cause
    and the way out, instead of TRL's AttributeError."""
    from transformers import AutoConfig

    extra = {}
    if kind == "qwen2+lora":
        peft = pytest.importorskip("peft")
        model, extra["peft_config"] = str(tiny_model_dir), peft.LoraConfig(r=4, lora_alpha=8,
                                                                           target_modules=["q_proj", "v_proj"])
        assert AutoConfig.from_pretrained(tiny_model_dir).tie_word_embeddings
    else:
        model = _tied_model_dir(tmp_path, kind, tokenizer)

    def build(cast: bool):
        return _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo+kl_ref", model=model,
                        config=_config(tmp_path, bf16=True, beta=0.04, cast_lm_head_to_fp32=cast), **extra)

    build(cast=False)
    said = [str(w.message) for w in recwarn if "TRL computes the old / reference log-probs" in str(w.message)]
    assert said == ["TRL computes the old / reference log-probs with a bfloat16 or float16 LM head and the objective its "
                    "current ones in float32, so the ratio starts off 1 (and the reference KL off 0) by the rounding "
                    "(about 1e-3); TRL cannot score in float32 with the LM head of a model whose input embeddings are "
                    "tied to it and are not at model.embed_tokens (a PEFT-wrapped model, OPT, GPT-2, ...): its "
                    "cast_lm_head_to_fp32 fails there with an AttributeError"]
    with pytest.raises(ValueError, match=r"^TRL cannot score in float32 with the LM head of a model whose input "
                                         r"embeddings are tied to it .*AttributeError \('.*' object has no attribute "
                                         r"'(embed_tokens|model)'\); set GRPOConfig\(cast_lm_head_to_fp32=False\), "
                                         r"with which TRL's old and reference log-probs round to the half-precision head"):
        build(cast=True)


def test_a_tied_head_at_model_embed_tokens_is_still_advised_to_cast(tokenizer, tmp_path, tiny_model_dir, recwarn):
    """A tied Qwen2 without adapters keeps its embeddings where TRL's cast looks: the warning advises the cast, which
    builds."""
    config = _config(tmp_path, bf16=True, beta=0.04, cast_lm_head_to_fp32=False)
    _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo+kl_ref", model=str(tiny_model_dir), config=config)
    assert [w for w in recwarn if "set GRPOConfig(cast_lm_head_to_fp32=True)" in str(w.message)]
    config = _config(tmp_path, bf16=True, beta=0.04, cast_lm_head_to_fp32=True)
    _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo+kl_ref", model=str(tiny_model_dir), config=config)


def test_trl_version_guard():
    """TRL releases older than the normaliser and trainer methods the integration reproduces are refused."""
    with pytest.raises(ImportError, match=rf"needs TRL >= {MIN_TRL_VERSION} .* found 1.12.3"):
        check_trl_version("1.12.3")
    for version in (MIN_TRL_VERSION, "1.16.0", "2.3.0", trl.__version__):
        check_trl_version(version)


def test_liger_kernels_are_refused_only_where_they_replace_the_loss(tmp_path, monkeypatch):
    """TRL 1.16's use_liger_kernel patches layer kernels only; a TRL whose GRPOTrainer computes a Liger loss is refused."""
    objective = build_objective("dapo")
    if not hasattr(GRPOTrainer, "compute_liger_loss"):
        check_trl_args(SimpleNamespace(use_liger_kernel=True), objective)
    monkeypatch.setattr(GRPOTrainer, "compute_liger_loss", lambda self, *args: None, raising=False)
    with pytest.raises(ValueError, match="Liger's fused GRPO loss, which bypasses the objective"):
        check_trl_args(SimpleNamespace(use_liger_kernel=True), objective)


@pytest.mark.parametrize("method", ["dapo", "grpo", "dr_grpo", "entropy_advantage", "dapo+entropy_bonus"])
def test_gradient_accumulation_equals_the_full_batch(tokenizer, tmp_path, method):
    """Micro-batches of unequal token counts, accumulated, give the full batch's loss and gradient (a scalar
    regulariser such as the entropy bonus is aggregated like the policy loss, so it splits the same way)."""
    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective=method)
    # a first micro-batch of long completions, a second of short ones
    inputs = _inputs(tokenizer, rows=4, seed=5, lengths=[6, 5, 2, 1])
    full_loss, full_grads = _loss_and_grads(trainer, inputs)
    split_loss, split_grads = _loss_and_grads(trainer, inputs, accumulation=2, steps_per_generation=2, parts=[[0, 1], [2, 3]])
    assert split_loss == pytest.approx(full_loss, rel=1e-5)
    _assert_grads_close(split_grads, full_grads)


def test_generation_batch_spanning_several_optimizer_steps(tokenizer, tmp_path):
    """steps_per_generation = 2 x gradient_accumulation_steps: each window is normalised by its own share."""
    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo")
    inputs = _inputs(tokenizer, rows=4, seed=7)
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum() * 2  # the generation batch is twice this window
    loss, _ = _loss_and_grads(trainer, inputs, accumulation=2, steps_per_generation=4, parts=[[0, 1], [2, 3]])
    window = _inputs(tokenizer, rows=4, seed=7)
    reference, _ = _loss_and_grads(trainer, window)
    # window tokens are estimated as N_gen * G / S = the window's own count here
    assert loss == pytest.approx(reference, rel=1e-5)


def test_the_logged_entropy_leaves_out_micro_batches_without_a_valid_token(tokenizer, tmp_path):
    """A micro-batch whose completions are all masked (mask_truncated_completions) has no entropy: the step's
    ``entropy`` is its other micro-batches' alone, and with none left it is not logged, not 0 (which a report of the
    run would read as a collapse)."""
    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo")
    inputs, empty = _inputs(tokenizer, rows=4, seed=3), _inputs(tokenizer, rows=4, seed=4)
    empty["completion_mask"] = torch.zeros_like(empty["completion_mask"])
    _loss_and_grads(trainer, inputs, accumulation=2, parts=[[0, 1, 2, 3]])
    _loss_and_grads(trainer, empty, accumulation=2, parts=[[0, 1, 2, 3]])
    trainer.log({})
    logged = trainer.state.log_history[-1]
    assert logged["entropy"] == pytest.approx(logged["entropy/mean"], rel=1e-5) and logged["entropy"] > 1.0
    _loss_and_grads(trainer, empty)
    trainer.log({})
    assert trainer.state.log_history[-1].get("entropy") is None


def test_adaptive_entropy_moves_once_per_optimizer_step_and_not_in_evaluation(tokenizer, tmp_path):
    """The micro-batches of one optimizer step (one state.global_step) move the coefficient once; an evaluation batch
    leaves it where training left it."""
    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="adaptive_entropy",
                       objective_params={"target_entropy": 100.0, "delta": 0.001})
    controller = trainer.objective.regularizers[0]
    inputs = _inputs(tokenizer, rows=4, seed=9)
    for step in range(3):
        trainer.state.global_step = step
        _loss_and_grads(trainer, inputs, accumulation=2, parts=[[0, 1], [2, 3]])
    trainer.objective.end_step()
    assert controller.coefficient == pytest.approx(0.003)
    state = trainer.objective.state_dict()
    trainer.model.eval()
    trainer._compute_loss(trainer.model, inputs)
    assert trainer.objective.state_dict() == state


def test_objective_state_is_saved_with_checkpoints_and_restored(tokenizer, tmp_path):
    """The adaptive coefficient lives in the objective: a checkpoint holds it and resuming puts it back."""
    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="adaptive_entropy",
                       objective_params={"target_entropy": 100.0, "delta": 0.001})
    for step in range(2):
        trainer.state.global_step = step
        _loss_and_grads(trainer, _inputs(tokenizer, rows=4, seed=11))
    trainer.objective.end_step()
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    trainer._save_checkpoint(trainer.model, None)
    checkpoint = Path(trainer.args.output_dir) / "checkpoint-1"
    assert (checkpoint / OBJECTIVE_STATE_FILE).is_file()
    # one process: the shared file alone, no per-process copies (those are for data parallelism)
    assert sorted(path.name for path in checkpoint.glob("entrorl_objective_state*")) == [OBJECTIVE_STATE_FILE]
    resumed = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="adaptive_entropy",
                       objective_params={"target_entropy": 100.0, "delta": 0.001})
    resumed.create_optimizer_and_scheduler(num_training_steps=4)
    resumed._load_optimizer_and_scheduler(str(checkpoint))
    assert resumed.objective.state_dict() == trainer.objective.state_dict()
    assert resumed.objective.regularizers[0].coefficient == pytest.approx(0.002)
    # a checkpoint without the state file (GRPOTrainer's own): resuming from it puts the initial state back
    fresh = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="adaptive_entropy",
                     objective_params={"target_entropy": 100.0, "delta": 0.001})
    fresh.create_optimizer_and_scheduler(num_training_steps=4)
    fresh._save_checkpoint(fresh.model, None)
    initial = Path(fresh.args.output_dir) / "checkpoint-0"
    (initial / OBJECTIVE_STATE_FILE).unlink(missing_ok=True)
    assert resumed.objective.state_dict() != fresh.objective.state_dict()
    with pytest.warns(UserWarning, match="holds no objective state .*: adaptive_entropy's state starts afresh"):
        resumed._load_optimizer_and_scheduler(str(initial))
    assert resumed.objective.state_dict() == fresh.objective.state_dict()
    assert resumed.objective.regularizers[0].coefficient == fresh.objective.regularizers[0].coefficient
    # the state that starts afresh is named by the part that holds it, when it was added to a method
    added = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path / "added", objective={
        "method": "dapo", "regularizers": [{"name": "adaptive_entropy", "target_entropy": 100.0}]})
    added.create_optimizer_and_scheduler(num_training_steps=4)
    with pytest.warns(UserWarning, match="holds no objective state .*: dapo\\+adaptive_entropy's state starts afresh"):
        added._load_optimizer_and_scheduler(str(initial))


def test_a_seeded_clip_cov_s_generator_is_checkpointed_even_before_its_first_draw(tokenizer, tmp_path):
    """A seeded Clip-Cov has state (its private generator) whose state_dict is empty until its first draw: a
    checkpoint written then still holds the state file, so that one without it (GRPOTrainer's, a lost file) is
    warned about rather than re-seeding the generator in silence, which replays the first steps' draws."""
    seeded = {"method": "clip_cov", "params": {"seed": 3}}
    fresh = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective=seeded)
    assert fresh.objective.stateful and fresh.objective.state_dict() == {}
    fresh.create_optimizer_and_scheduler(num_training_steps=4)
    fresh._save_checkpoint(fresh.model, None)
    checkpoint = Path(fresh.args.output_dir) / "checkpoint-0"
    assert torch.load(checkpoint / OBJECTIVE_STATE_FILE, weights_only=True) == {}
    _loss_and_grads(fresh, _inputs(tokenizer, rows=4, seed=11))  # draws: the generator now has a state
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fresh._load_optimizer_and_scheduler(str(checkpoint))  # its state from the file: not drawn from yet
    assert fresh.objective.state_dict() == {}
    (checkpoint / OBJECTIVE_STATE_FILE).unlink()
    with pytest.warns(UserWarning, match="holds no objective state .*: clip_cov's state starts afresh"):
        fresh._load_optimizer_and_scheduler(str(checkpoint))
    unseeded = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path / "unseeded", objective="clip_cov")
    assert not unseeded.objective.stateful  # torch's global generator: the checkpoint's RNG states restore it
    unseeded.create_optimizer_and_scheduler(num_training_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        unseeded._load_optimizer_and_scheduler(str(checkpoint))


def test_the_state_of_another_objective_is_refused_naming_the_file_and_the_objectives(tokenizer, tmp_path):
    """Resuming a checkpoint of dapo+adaptive_entropy with plain dapo: refused with the file, both objectives and the
    ways on, not Objective.load_state_dict's bare list of part names."""
    saved = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo+adaptive_entropy")
    saved.create_optimizer_and_scheduler(num_training_steps=4)
    saved._save_checkpoint(saved.model, None)
    checkpoint = Path(saved.args.output_dir) / "checkpoint-0"
    other = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo")
    other.create_optimizer_and_scheduler(num_training_steps=4)
    with pytest.raises(ValueError, match=re.escape(
            f"{checkpoint / OBJECTIVE_STATE_FILE} holds the state of the objective 'dapo+adaptive_entropy', which this "
            "trainer's objective 'dapo' cannot take (") + r".*regularizer/adaptive_entropy.*\); resume with the "
            r"objective the checkpoint was trained with, or delete that file"):
        other._load_optimizer_and_scheduler(str(checkpoint))


def test_the_controllers_statistics_are_shared_once_a_step_and_again_in_a_second_train(tokenizer, tmp_path, monkeypatch):
    """Under data parallelism the first micro-batch of each step sums the controllers' statistics over the processes
    (one collective a step); a second train() starts a new TrainerState whose step 0 shares again."""
    from accelerate import Accelerator
    from transformers import TrainerState

    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="adaptive_entropy")
    reduced = []
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    monkeypatch.setattr(trainer.accelerator, "reduce", lambda tensor, reduction: reduced.append(reduction) or tensor)
    from entrorl.objective import PolicyBatch

    zeros = torch.zeros(1, 2)
    batch = PolicyBatch(log_prob=zeros, old_log_prob=zeros, advantages=zeros, mask=torch.zeros(1, 2, dtype=torch.bool))
    trainer.state.global_step = 0
    trainer._share_step_statistics(batch)
    trainer._share_step_statistics(batch)  # a later micro-batch of step 0
    assert reduced == ["sum"]
    trainer.state = TrainerState()  # a second train(), from step 0 again
    trainer._share_step_statistics(batch)
    trainer.state.global_step = 1
    trainer._share_step_statistics(batch)
    assert reduced == ["sum", "sum", "sum"]


def test_under_data_parallelism_each_process_saves_and_restores_its_own_objective_state(tokenizer, tmp_path, monkeypatch):
    """Only the process TrainingArguments.should_save names writes the shared files; every process writes its own
    objective state (its part of the step being measured is its own) and a resume gives each its own back. A
    checkpoint without a process's file gives it the saving process's state, with a warning."""
    from accelerate import Accelerator

    def adaptive_trainer():
        return _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="adaptive_entropy",
                        objective_params={"target_entropy": 100.0, "delta": 0.001})

    trainer = adaptive_trainer()
    trainer.state.global_step = 0
    _loss_and_grads(trainer, _inputs(tokenizer, rows=4, seed=11))
    trainer.objective.end_step()
    assert trainer.objective.regularizers[0].coefficient == pytest.approx(0.001)
    trainer.state.global_step = 1
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    monkeypatch.setattr(GRPOConfig, "should_save", property(lambda self: False))
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    monkeypatch.setattr(Accelerator, "process_index", property(lambda self: 1))
    trainer._save_checkpoint(trainer.model, None)
    checkpoint = Path(trainer.args.output_dir) / "checkpoint-1"
    assert not (checkpoint / OBJECTIVE_STATE_FILE).exists() and (checkpoint / "entrorl_objective_state_1.pt").is_file()

    other = adaptive_trainer()  # the saving process's state, in its coefficient's initial value
    torch.save(other.objective.state_dict(), checkpoint / OBJECTIVE_STATE_FILE)
    resumed = adaptive_trainer()
    resumed.create_optimizer_and_scheduler(num_training_steps=4)
    resumed._load_optimizer_and_scheduler(str(checkpoint))
    assert resumed.objective.state_dict() == trainer.objective.state_dict()
    monkeypatch.setattr(Accelerator, "process_index", property(lambda self: 0))
    with pytest.warns(UserWarning, match="holds no objective state of process 0 .* it takes the state of the process "
                                         "that saved the checkpoint"):
        resumed._load_optimizer_and_scheduler(str(checkpoint))
    assert resumed.objective.state_dict() == other.objective.state_dict()


def test_rejects_trl_loss_options_the_objective_replaces(tokenizer, tmp_path):
    objective = build_objective("dapo")
    with pytest.raises(ValueError, match="forking_tokens"):
        check_trl_args(_config(tmp_path, top_entropy_quantile=0.2), objective)
    with pytest.raises(ValueError, match="entropy_bonus"):
        check_trl_args(_config(tmp_path, entropy_coef=0.01), objective)
    with pytest.raises(ValueError, match="'adaptive_entropy' method"):
        check_trl_args(_config(tmp_path, use_adaptive_entropy=True), objective)
    with pytest.raises(ValueError, match="delta \\(two-sided clipping\\): use the 'dual_clip' method"):
        check_trl_args(_config(tmp_path, delta=3.0), objective)
    with pytest.raises(ValueError, match="off_policy_mask_threshold: not available"):
        check_trl_args(_config(tmp_path, off_policy_mask_threshold=0.5), objective)
    with pytest.raises(ValueError, match="kl_ref"):
        check_trl_args(_config(tmp_path, beta=0.04), objective)
    with pytest.raises(ValueError, match="beta") as refused:
        check_trl_args(_config(tmp_path, beta=0.0), build_objective("dapo+kl_ref"))
    assert "use_bias_correction_kl" not in str(refused.value)  # TRL reads it only with beta != 0
    with pytest.raises(ValueError, match="leave it 'token'"):  # a per-token ratio cannot be made sequence-level
        check_trl_args(_config(tmp_path, importance_sampling_level="sequence"), build_objective("grpo"))
    # gspo's ratio is the sequence's: the option describes it
    check_trl_args(_config(tmp_path, importance_sampling_level="sequence", loss_type="grpo", epsilon=3e-4,
                           epsilon_high=4e-4), build_objective("gspo"))
    for options, problem in (({"loss_type": "cispo", "epsilon_high": 5.0}, "has no entrorl equivalent"),
                             ({"beta": 0.04}, "set use_bias_correction_kl=False")):
        with pytest.raises(ValueError, match=problem):
            EntropyGRPOTrainer(model="not-loaded", args=_config(tmp_path, importance_sampling_level="sequence", **options))
    check_trl_args(_config(tmp_path), objective)  # the defaults are fine
    check_trl_args(_config(tmp_path, beta=0.04), build_objective("dapo+kl_ref", kl_loss_coef=0.04, importance_weighted=True))
    check_trl_args(_config(tmp_path, beta=0.04, use_bias_correction_kl=False), build_objective("dapo+kl_ref", kl_loss_coef=0.04))
    # TRL's clipping range: accepted when it is the objective's own, else rejected naming the parameters to set
    check_trl_args(_config(tmp_path, epsilon=0.2, epsilon_high=0.28), objective)
    for options, method in (({"epsilon": 0.1}, "grpo"), ({"epsilon_high": 0.28}, "grpo"), ({"epsilon_high": 0.3}, "dapo")):
        with pytest.raises(ValueError, match=r"objective_params=\{'clip_ratio_low': 0\.\d+, 'clip_ratio_high': 0\.\d+\}"):
            check_trl_args(_config(tmp_path, **options), build_objective(method))
    check_trl_args(_config(tmp_path, epsilon=0.1), build_objective("grpo", clip_ratio_low=0.1, clip_ratio_high=0.1))
    for method, options in (("kl_cov", {"epsilon": 0.1}), ("cispo", {"epsilon_high": 5.0})):  # no such range there
        with pytest.raises(ValueError, match=r"does not clip the ratio .*leave them at their defaults") as refused:
            check_trl_args(_config(tmp_path, **options), build_objective(method))
        assert ("TRL's CISPO caps the weight" in str(refused.value)) == (method == "cispo")  # said only of cispo
    with pytest.raises(ValueError, match="sapo_temperature_pos, entropy_target: options of TRL's own loss"):
        check_trl_args(_config(tmp_path, sapo_temperature_pos=2.0, entropy_target=0.5), objective)
    loss_only = {"sapo_temperature_neg": 2.0, "sapo_temperature_pos": 2.0, "vespo_k_pos": 1.0, "vespo_lambda_pos": 1.0,
                 "vespo_k_neg": 1.0, "vespo_lambda_neg": 1.0, "entropy_coef_min": 0.1, "entropy_coef_max": 0.5,
                 "entropy_coef_delta": 0.01, "entropy_target": 0.5}
    for name, value in loss_only.items():
        with pytest.raises(ValueError, match=rf"{name}: options of TRL's own loss"):
            check_trl_args(_config(tmp_path, **{name: value}), objective)
    vllm_args = SimpleNamespace(use_vllm=True, vllm_importance_sampling_correction=True)
    with pytest.raises(ValueError, match="'tis' or 'icepop'"):
        check_trl_args(vllm_args, objective)
    check_trl_args(vllm_args, build_objective("dapo+tis"))
    # a rollout correction needs the sampler's log-probs, which TRL has only from vLLM or a rollout_func
    for method in ("dapo+tis", "dapo+icepop"):
        with pytest.raises(ValueError, match="use_vllm=True"):
            check_trl_args(_config(tmp_path), build_objective(method))
    check_trl_args(_config(tmp_path), build_objective("dapo+tis"), rollout_func=lambda prompts, trainer: None)
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode / vllm_importance_sampling_clip_max"):
        check_trl_args(SimpleNamespace(use_vllm=True, vllm_importance_sampling_correction=True,
                                       vllm_importance_sampling_mode="sequence_truncate",
                                       vllm_importance_sampling_clip_max=5.0), build_objective("dapo+tis"))
    with pytest.raises(ValueError, match=r"vllm_importance_sampling_clip_min: the objective's rollout correction"):
        check_trl_args(SimpleNamespace(use_vllm=True, vllm_importance_sampling_correction=True,
                                       vllm_importance_sampling_clip_min=0.5), build_objective("dapo+tis"))
    # a wrong method name fails before any model is built
    with pytest.raises(ValueError, match="unknown method"):
        EntropyGRPOTrainer(model="not-loaded", args=_config(tmp_path), objective="no_such_method")
    with pytest.raises(ValueError, match="forking_tokens"):
        EntropyGRPOTrainer(model="not-loaded", args=_config(tmp_path, top_entropy_quantile=0.2), objective="dapo")


def test_warns_when_the_method_pairs_with_another_advantage_estimator(tokenizer, tmp_path, recwarn):
    with pytest.warns(UserWarning, match="advantage estimator"):
        _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="w_reinforce")
    with pytest.warns(UserWarning, match="scale_rewards='none'"):
        _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dr_grpo")
    recwarn.clear()
    _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dr_grpo", config=_config(tmp_path, scale_rewards="none"))
    # without an objective the trainer stands in for GRPOTrainer, TRL's loss_type and advantages alike: no warning
    _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, config=_config(tmp_path, loss_type="dr_grpo"))
    assert not [w for w in recwarn if "advantage" in str(w.message) or "scale_rewards" in str(w.message)]


def test_kl_reference_uses_trl_reference_log_probs(tokenizer, tmp_path, tiny_model_dir):
    # with beta != 0 TRL loads a frozen reference from the model's path, so the model is given as a local directory
    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo+kl_ref", objective_params={"kl_loss_type": "k1"},
                       config=_config(tmp_path, beta=0.5), model=str(tiny_model_dir))
    assert trainer.ref_model is not None
    inputs = _inputs(tokenizer, off_policy=False)
    loss_without, _ = _loss_and_grads(trainer, {**inputs, "ref_per_token_logps": torch.zeros(4, MAX_COMPLETION)})
    # k1 = log pi - log pi_ref: lowering the reference log-probs by 1 raises the token-mean KL by exactly 1
    loss_shifted, _ = _loss_and_grads(trainer, {**inputs, "ref_per_token_logps": torch.full((4, MAX_COMPLETION), -1.0)})
    assert loss_shifted - loss_without == pytest.approx(0.5 * 1.0, rel=1e-5)
    assert trainer._metrics["train"]["kl/ref"]


def test_sampler_log_probs_reach_the_mismatch_correction(tokenizer, tmp_path):
    """TRL's sampling_per_token_logps (vLLM's) become PolicyBatch.rollout_log_prob for TIS."""
    # TRL has sampler log-probs with vLLM or a rollout_func; this one is never called, the inputs are given directly
    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo+tis", rollout_func=lambda prompts, trainer: None)
    inputs = _inputs(tokenizer, off_policy=False)
    mask = inputs["completion_mask"].bool()
    # a sampler that gave every token log-prob -20: pi_train / pi_rollout is far above the cap C on every token
    loss, _ = _loss_and_grads(trainer, {**inputs, "sampling_per_token_logps": torch.full((4, MAX_COMPLETION), -20.0)})
    assert trainer._metrics["train"]["correction/tis_truncated_frac"][-1] == 1.0
    cap = build_objective("tis").correction.rollout_is_threshold
    plain, _ = _loss_and_grads(_trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo"), inputs)
    # on-policy dapo: loss = -sum(A) / n over valid tokens; TIS multiplies each token by the cap
    expected = -float((inputs["advantages"][:, None] * mask).sum()) / float(mask.sum())
    assert plain == pytest.approx(expected, rel=1e-5)
    assert loss == pytest.approx(cap * expected, rel=1e-5)


def test_a_token_without_a_sampler_log_prob_is_left_uncorrected_and_missing_ones_are_named(tokenizer, tmp_path):
    """TRL marks a token vLLM (or a rollout_func) gave no log-prob for as NaN, and its own correction leaves it
    uncorrected: here it gets a ratio of 1 too, instead of a NaN that would reach every weight. A batch without
    sampler log-probs at all is refused naming what to return."""
    inputs = _inputs(tokenizer, off_policy=True)
    sampled = inputs["old_per_token_logps"] - 0.3
    holed = sampled.clone()
    holed[0, :3] = float("nan")
    filled = sampled.clone()
    filled[0, :3] = inputs["old_per_token_logps"][0, :3]
    for method in ("dapo+tis", "dapo+icepop"):
        trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective=method, rollout_func=lambda prompts, trainer: None)
        loss, grads = _loss_and_grads(trainer, {**inputs, "sampling_per_token_logps": holed})
        assert math.isfinite(loss) and all(torch.isfinite(grad).all() for grad in grads.values())
        expected, expected_grads = _loss_and_grads(trainer, {**inputs, "sampling_per_token_logps": filled})
        assert loss == expected
        _assert_grads_close(grads, expected_grads, rtol=0, atol=0)
        with pytest.raises(ValueError, match=r"rollout correction \(\w+\) needs the sampler's log-prob .*with a "
                                             r"rollout_func, return them as 'logprobs'"):
            trainer._compute_loss(trainer.model, inputs)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_the_refusal_of_top_entropy_quantile_names_trl_s_own_loss(tokenizer, tmp_path, loss_type):
    """The objective and settings that the refusal of GRPOConfig.top_entropy_quantile suggests (the loss_type's own
    method with forking_tokens) give TRL's loss with that option (its entropy mask keeps the masked tokens in the
    normaliser), gradients included, whatever the loss_type."""
    import ast

    with pytest.raises(ValueError) as refused:
        check_trl_args(_config(tmp_path, top_entropy_quantile=0.2, loss_type=loss_type), build_objective(loss_type))
    suggested = re.search(r"objective='([a-z_+]+)', objective_params=(\{.*?\})", str(refused.value))
    objective, params = suggested.group(1), ast.literal_eval(suggested.group(2))
    assert objective == f"{loss_type}+forking_tokens" and params["top_entropy_quantile"] == 0.2
    shared = dict(gradient_accumulation_steps=2, per_device_train_batch_size=2, num_generations=4, loss_type=loss_type)
    ours = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective=objective, objective_params=params,
                    config=_config(tmp_path, **shared))
    theirs = _trainer(GRPOTrainer, tokenizer, tmp_path, config=_config(tmp_path, top_entropy_quantile=0.2, **shared))
    _assert_accumulated_loss_is_trls(ours, theirs, _inputs(tokenizer, seed=3))
    assert 0 < min(ours._metrics["train"]["select/forking_tokens_frac"])


def test_top_entropy_quantile_with_a_sequence_level_ratio_is_refused_without_naming_an_equivalent(tokenizer, tmp_path):
    """Under importance_sampling_level='sequence' TRL's entropy mask scales each sequence's term, whose ratio still takes
    the gradient of every valid token; gspo+forking_tokens (the token-level suggestion carried over) has TRL's loss but
    drops the masked tokens' gradient. The refusal says there is no equivalent instead of naming that one."""
    options = dict(loss_type="grpo", importance_sampling_level="sequence")
    with pytest.raises(ValueError) as refused:
        check_trl_args(_config(tmp_path, top_entropy_quantile=0.5, **options), build_objective("gspo"))
    message = " ".join(str(refused.value).split())
    assert ("top_entropy_quantile = 0.5 with importance_sampling_level='sequence' has no entrorl equivalent: TRL's "
            "entropy mask then only scales each sequence's loss") in message and "objective='" not in message
    # why: the same loss, another gradient
    params = {"top_entropy_quantile": 0.5, "keep_in_normaliser": True, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2,
              "loss_agg_mode": "seq-mean-token-mean"}
    ours = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="gspo+forking_tokens", objective_params=params,
                    config=_config(tmp_path, **options))
    theirs = _trainer(GRPOTrainer, tokenizer, tmp_path, config=_config(tmp_path, top_entropy_quantile=0.5, **options))
    inputs = _inputs(tokenizer, seed=3)
    our_loss, our_grads = _loss_and_grads(ours, inputs)
    their_loss, their_grads = _loss_and_grads(theirs, inputs)
    assert our_loss == pytest.approx(their_loss, rel=1e-5)
    with pytest.raises(AssertionError):
        _assert_grads_close(our_grads, their_grads)


@pytest.mark.parametrize("method", ["clip_cov", "forking_tokens"])
def test_trains_a_tiny_model_and_logs_entrorl_diagnostics(tokenizer, tmp_path, method):
    config = _config(tmp_path, max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=4,
                     num_generations=4, num_iterations=2)
    objective = {"method": method, "params": {"clip_cov_ratio": 0.2}} if method == "clip_cov" else method
    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective=objective, config=config)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "no parameter moved in two optimizer steps"
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        for key in ("entropy", "entropy/mean", "entropy/p10", "entropy/p90", "disc/mean", "disc_centered/mean",
                    "disc/confident_frac", "cov/top_2pct_ratio", "clip/ppo_frac", "select/dropped_frac"):
            assert key in entry, f"{key} missing from the logged metrics {sorted(entry)}"
        assert entry["entropy/p10"] <= entry["entropy/p50"] <= entry["entropy/p90"]
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["entropy/mean"])
        assert entry["entropy/mean"] == pytest.approx(entry["entropy"], rel=1e-4)
    assert any("reward" in entry for entry in logs)  # TRL's own metrics are still there (logged when it generates)
    selector_key = "select/clip_cov_frac" if method == "clip_cov" else "select/forking_tokens_frac"
    assert all(selector_key in entry for entry in logs)
    if method == "forking_tokens":
        # 80/20 keeps the top 20% by entropy: about 80% of the valid tokens are dropped
        assert all(0.6 <= entry[selector_key] <= 0.85 for entry in logs)
    # `entrorl report` on the output directory reads the same log history
    from entrorl.analysis.run_report import write_run_report

    trainer.save_state()
    report = write_run_report(trainer.args.output_dir, figures=False)
    assert report["section_errors"] == {} and report["steps"] == 2
    summary = {r["quantity"]: r["value"] for r in report["summary"]["values"]}
    assert summary["method"] == method and summary["steps planned (max_steps)"] == 2
    intervention = next(v for v in report["interventions"]["values"] if v["metric"] == selector_key)
    assert intervention["mean"] == pytest.approx(sum(entry[selector_key] for entry in logs) / 2)


def test_without_diagnostics_the_objective_metrics_are_still_logged(tokenizer, tmp_path):
    """TRL's own clip_ratio / kl metrics come from its loss, which is replaced: the objective's take their place,
    with or without the entropy diagnostics."""
    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo+forking_tokens", diagnostics=False)
    _loss_and_grads(trainer, _inputs(tokenizer, seed=3))
    logged = trainer._metrics["train"]
    assert {"clip/ppo_frac", "select/forking_tokens_frac", "loss/policy", "entropy"} <= set(logged)
    assert not [key for key in logged if key.startswith(("entropy/", "disc", "cov/"))]


def test_a_peft_lora_model_trains_its_adapters_and_reads_the_head_it_really_has(tokenizer, tmp_path):
    """GRPOTrainer's peft_config: on the same adapters and inputs, the loss, the adapters' gradients and the entropy
    equal TRL's own (the fused hidden @ W^T path reads the head through the PeftModel); training moves only the
    adapters. A head that is not a plain nn.Linear is never fused by default."""
    peft = pytest.importorskip("peft")

    def build(cls):
        return _trainer(cls, tokenizer, tmp_path, config=_config(tmp_path, max_steps=1, gradient_accumulation_steps=1),
                        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))

    ours, theirs = build(EntropyGRPOTrainer), build(GRPOTrainer)
    assert ours._uses_fused_head(ours.model)
    with torch.no_grad():  # B starts at zero, which would leave A without a gradient
        for name, parameter in ours.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    theirs.model.load_state_dict(ours.model.state_dict())
    inputs = _inputs(tokenizer, seed=3)
    (our_loss, our_grads), (their_loss, their_grads) = _loss_and_grads(ours, inputs), _loss_and_grads(theirs, inputs)
    assert our_grads and all("lora_" in name for name in our_grads)
    assert our_loss == pytest.approx(their_loss, rel=1e-5)
    _assert_grads_close(our_grads, their_grads)
    assert ours._metrics["train"]["entropy"] == pytest.approx(theirs._metrics["train"]["entropy"], rel=1e-5)

    before = {n: p.detach().clone() for n, p in ours.model.named_parameters()}
    ours.train()
    changed = {n for n, p in ours.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any("lora_A" in name for name in changed) and all("lora_" in name for name in changed)
    head = ours.accelerator.unwrap_model(ours.model).get_output_embeddings()
    wrapper = torch.nn.Sequential(head)  # stands for an adapter around lm_head, which TRL refuses to put there itself
    ours.accelerator.unwrap_model(ours.model).set_output_embeddings(wrapper)
    assert not ours._uses_fused_head(ours.model)


def test_arguments_are_seen_however_they_are_passed_and_warnings_point_at_the_caller(tokenizer, tmp_path):
    """A rollout_func given positionally counts for the check made before the model loads (it returns the sampler
    log-probs TIS needs), and a composition's warning names the line that built the trainer, not this package."""
    config = _config(tmp_path)

    def rollout_func(prompts, trainer):  # pragma: no cover - never called: the model is not loaded
        return {}

    positional = [_model(tokenizer), _reward_digits, config, _dataset(), None, tokenizer, None, None, (None, None),
                  None, None, None, rollout_func]
    import inspect

    from trl import GRPOTrainer

    assert list(inspect.signature(GRPOTrainer.__init__).parameters)[len(positional)] == "rollout_func"
    with pytest.raises(ValueError, match="use_vllm=True"):  # without it the check refuses TIS
        EntropyGRPOTrainer(*positional[:-1], objective="dapo+tis")
    EntropyGRPOTrainer(*positional, objective="dapo+tis")

    with pytest.warns(UserWarning, match="trains with dapo's surrogate") as raised:
        _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo+kl_cov")
    (warning,) = [w for w in raised if "trains with dapo's surrogate" in str(w.message)]
    assert warning.filename == __file__


def test_seq_mean_weight_is_one_over_the_accumulation_steps_not_the_steps_per_generation():
    for mode in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        assert accumulation_weight(mode, micro_valid_tokens=10, num_items_in_batch=80, num_processes=1,
                                   gradient_accumulation_steps=2, steps_per_generation=4) == pytest.approx(0.5)


def _loss_of(trainer, inputs, *, training: bool, accumulation_steps: int, steps_per_generation: int) -> float:
    """The plugin's loss of ``inputs`` in train or eval mode, with TRL's accumulation settings at the given values."""
    trainer.model.train(training)
    trainer.current_gradient_accumulation_steps, trainer.args.steps_per_generation = accumulation_steps, steps_per_generation
    with torch.no_grad():
        return float(trainer._compute_loss(trainer.model, inputs))


@pytest.mark.parametrize("method", ["dapo", "grpo"])
def test_the_evaluation_loss_is_not_scaled_for_accumulation(tokenizer, tmp_path, method):
    """The evaluation loss is the training loss of one unaccumulated step, a row masked whole counted in the seq-mean
    modes alike."""
    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective=method)
    inputs = _inputs(tokenizer)
    inputs["completion_mask"][1] = 0
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    train_loss = _loss_of(trainer, inputs, training=True, accumulation_steps=1, steps_per_generation=1)
    logged = {key: list(values) for key, values in trainer._metrics["train"].items()}
    eval_loss = _loss_of(trainer, inputs, training=False, accumulation_steps=2, steps_per_generation=4)
    assert train_loss != 0.0 and eval_loss == pytest.approx(train_loss, rel=1e-5)
    # the evaluation's metrics go to TRL's eval log (logged as eval_*), the training log is left as it was
    assert {key: list(values) for key, values in trainer._metrics["train"].items()} == logged
    evaluated = trainer._metrics["eval"]
    assert evaluated["loss/policy"] == logged["loss/policy"] and evaluated["entropy"] == logged["entropy"]


def test_multimodal_inputs_are_refused_naming_the_keys(tokenizer, tmp_path):
    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo")
    inputs = _inputs(tokenizer)
    for key in ("pixel_values", "image_grid_thw", "num_images"):
        with pytest.raises(NotImplementedError, match=rf"text-only batches; got multimodal inputs \['{key}'\]"):
            trainer._compute_loss(trainer.model, {**inputs, key: torch.ones(4, 1)})


def test_a_tool_mask_only_removes_tokens(tokenizer, tmp_path):
    """An all-ones tool mask removes nothing, and keeps the padding out of the loss."""
    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo")
    inputs = _inputs(tokenizer)
    plain = _loss_of(trainer, inputs, training=True, accumulation_steps=1, steps_per_generation=1)
    ones = _loss_of(trainer, {**inputs, "tool_mask": torch.ones_like(inputs["completion_mask"])}, training=True,
                    accumulation_steps=1, steps_per_generation=1)
    assert ones == pytest.approx(plain, rel=1e-6)

    # on-policy dapo: the loss is minus the mean advantage over the tokens both masks keep
    inputs = _inputs(tokenizer, off_policy=False)
    tool_mask = torch.ones_like(inputs["completion_mask"])
    tool_mask[0, 1:4] = 0
    tool_mask[2, 0] = 0
    kept = inputs["completion_mask"].bool() & tool_mask.bool()
    assert kept.sum() < inputs["completion_mask"].sum()
    loss = _loss_of(trainer, {**inputs, "tool_mask": tool_mask, "num_items_in_batch": kept.sum()}, training=True,
                    accumulation_steps=1, steps_per_generation=1)
    expected = -float((inputs["advantages"][:, None] * kept).sum()) / float(kept.sum())
    assert loss == pytest.approx(expected, rel=1e-5)
    # a micro-batch whose tokens are all masked logs no entropy (NaN, which TRL's log leaves out of the mean: a 0 would
    # pull it down) and none of the objective's metrics (its ratio mean, its shares would read 0 likewise)
    logged = {key: len(values) for key, values in trainer._metrics["train"].items()}
    assert logged["ratio/mean"] and logged["clip/ppo_frac"]
    _loss_of(trainer, {**inputs, "tool_mask": torch.zeros_like(tool_mask)}, training=True, accumulation_steps=1,
             steps_per_generation=1)
    assert math.isnan(trainer._metrics["train"]["entropy"][-1])
    assert {key: len(values) for key, values in trainer._metrics["train"].items()} == {**logged, "entropy": logged["entropy"] + 1}


def test_the_moe_aux_loss_is_scaled_for_accumulation_as_trl_does(tokenizer, tmp_path):
    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo")
    inputs = _inputs(tokenizer)
    without = _loss_of(trainer, inputs, training=True, accumulation_steps=2, steps_per_generation=2)
    original = trainer._response_stats
    trainer._response_stats = lambda *a, **k: (original(*a, **k)[0], torch.tensor(1.0))  # a router loss of 1
    trainer.aux_loss_enabled, trainer.router_aux_loss_coef = True, 0.1
    with_aux = _loss_of(trainer, inputs, training=True, accumulation_steps=2, steps_per_generation=2)
    assert with_aux - without == pytest.approx(0.05, rel=1e-5)  # coef * aux / gradient_accumulation_steps, as TRL
    assert trainer._metrics["train"]["aux_loss"][-1] == 1.0  # logged under TRL's own key


def test_an_infinite_or_undefined_metric_of_a_micro_batch_is_left_out_of_trl_s_average(tokenizer, tmp_path):
    """A metric that overflowed on one micro-batch (the largest importance ratio exp(log p - log p_old) of tokens far
    off-policy) would make TRL's logged mean of it infinite for the whole optimizer step, and one undefined there (NaN:
    a quantile of a micro-batch whose tokens are all masked) would make it NaN: both left out. Finite values go in as
    they are."""
    from types import SimpleNamespace

    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo", diagnostics=False)
    batch = SimpleNamespace(entropy=torch.tensor([[0.5, 1.5, 9.0]]), mask=torch.tensor([[True, True, False]]))
    trainer._log_step("train", batch, {"ratio/max": float("inf"), "loss/pg": float("-inf"), "clip/ppo_frac": 0.25,
                                       "entropy/p90": float("nan")}, torch.zeros(1))
    logged = trainer._metrics["train"]
    assert logged["clip/ppo_frac"] == [0.25] and logged["entropy"] == [1.0]
    assert "ratio/max" not in logged and "loss/pg" not in logged and "entropy/p90" not in logged


def test_every_trl_1_13_release_passes_the_version_guard():
    """The documented floor is TRL 1.13 (the first with the window-normalised dapo loss): its releases pass, the last
    1.12 does not."""
    for version in ("1.13", "1.13.0", "1.13.2", "1.14.0"):
        check_trl_version(version)
    with pytest.raises(ImportError, match=r"needs TRL >= 1\.13 "):
        check_trl_version("1.12.99")


def test_the_refusal_of_top_entropy_quantile_suggests_trl_s_own_clip_range(tmp_path):
    """The suggested forking_tokens settings carry TRL's epsilon as clip_ratio_low and epsilon_high as clip_ratio_high."""
    import ast

    with pytest.raises(ValueError) as refused:
        check_trl_args(_config(tmp_path, top_entropy_quantile=0.3, epsilon=0.1, epsilon_high=0.28), build_objective("dapo"))
    suggested = re.search(r"objective='dapo\+forking_tokens', objective_params=(\{.*?\})", str(refused.value))
    assert ast.literal_eval(suggested.group(1)) == {"top_entropy_quantile": 0.3, "keep_in_normaliser": True,
                                                    "clip_ratio_low": 0.1, "clip_ratio_high": 0.28}


def test_a_refusal_names_an_objective_with_the_parts_added_to_its_method(tmp_path):
    """{method: dapo, regularizers: [entropy_bonus]} is named dapo+entropy_bonus, as entrorl train and report name it."""
    objective = build_objective({"method": "dapo", "regularizers": [{"name": "entropy_bonus", "entropy_coeff": 0.01}]})
    with pytest.raises(ValueError, match=r"the entrorl objective 'dapo\+entropy_bonus' replaces"):
        check_trl_args(_config(tmp_path, entropy_coef=0.01), objective)


def test_advantage_warnings_name_every_foreign_estimator_point_at_the_caller_and_spare_grpo(tokenizer, tmp_path, recwarn):
    """psr, nsr and rft train on TRL's group-normalised advantages too: each warns, as w_reinforce does; the warnings
    name the caller's line. A method with GRPO's own estimator under TRL's default scale_rewards does not warn."""
    for method in ("psr", "nsr", "rft", "w_reinforce"):
        recwarn.clear()
        _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective=method)
        (warning,) = [w for w in recwarn if "advantage estimator" in str(w.message)]
        assert warning.filename == __file__
    recwarn.clear()
    _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dr_grpo")
    (warning,) = [w for w in recwarn if "scale_rewards='none'" in str(w.message)]
    assert warning.filename == __file__
    recwarn.clear()
    for method in ("dapo", "grpo", "clip_cov"):
        _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective=method)
    assert not [w for w in recwarn if "advantage" in str(w.message) or "scale_rewards" in str(w.message)]


@pytest.mark.parametrize(("method", "loss_type"), [("dapo", "dapo"), ("grpo", "grpo")])
def test_on_policy_loss_and_gradient_equal_trl_s(tokenizer, tmp_path, method, loss_type):
    """Without old log-probs (one pass per generation, TRL's default) the ratio's denominator is the detached current
    log-prob: the gradient is the policy gradient, not zero, and equals TRL's."""
    config = dict(gradient_accumulation_steps=2, per_device_train_batch_size=2, loss_type=loss_type)
    ours = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective=method,
                    objective_params={"clip_ratio_high": 0.2}, config=_config(tmp_path, **config))
    theirs = _trainer(GRPOTrainer, tokenizer, tmp_path, config=_config(tmp_path, **config))
    inputs = _inputs(tokenizer, seed=3, off_policy=False)
    assert "old_per_token_logps" not in inputs
    _assert_accumulated_loss_is_trls(ours, theirs, inputs)
    _, grads = _loss_and_grads(ours, inputs)
    assert max(float(grad.abs().max()) for grad in grads.values()) > 1e-3


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_per_token_advantages_give_trl_s_loss(tokenizer, tmp_path, loss_type):
    """TRL's loss takes [B, T] advantages (a subclass's per-token credit) as well as [B]; so does the trainer."""
    config = _config(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=2, loss_type=loss_type)
    ours = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, config=config)
    theirs = _trainer(GRPOTrainer, tokenizer, tmp_path, config=config)
    inputs = _inputs(tokenizer, seed=3)
    inputs["advantages"] = torch.randn(4, MAX_COMPLETION, generator=torch.Generator().manual_seed(8))
    _assert_accumulated_loss_is_trls(ours, theirs, inputs)


def test_the_token_mean_window_is_divided_among_processes_as_trl_s(tokenizer, tmp_path, monkeypatch):
    """num_items_in_batch counts every process's tokens: with two processes each holds half the window, so the dapo
    loss of a micro-batch doubles, as TRL's; the seq-mean grpo loss does not depend on the process count."""
    from accelerate import Accelerator

    shared = dict(gradient_accumulation_steps=2, per_device_train_batch_size=2)
    trainers = {loss_type: (_trainer(EntropyGRPOTrainer, tokenizer, tmp_path, config=_config(tmp_path, loss_type=loss_type, **shared)),
                            _trainer(GRPOTrainer, tokenizer, tmp_path, config=_config(tmp_path, loss_type=loss_type, **shared)))
                for loss_type in ("dapo", "grpo")}
    inputs = _inputs(tokenizer, seed=3)
    single = {loss_type: _assert_accumulated_loss_is_trls(*pair, inputs) for loss_type, pair in trainers.items()}
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    double = {loss_type: _assert_accumulated_loss_is_trls(*pair, inputs) for loss_type, pair in trainers.items()}
    assert double["dapo"] == pytest.approx(2 * single["dapo"], rel=1e-6)
    assert double["grpo"] == pytest.approx(single["grpo"], rel=1e-6)


@pytest.mark.parametrize("method", ["dapo", "entropy_advantage"])
def test_logged_diagnostics_are_the_statistics_of_the_valid_tokens(tokenizer, tmp_path, method):
    """entropy/*, disc/* (S), disc_centered/* (D) and cov/* are entrorl's summaries of the micro-batch's valid tokens,
    with the advantages the loss used (each token's sequence's, after the method's shaping: entropy_advantage adds an
    entropy bonus): padding and tool-masked tokens are not in them."""
    from entrorl.trainer.diagnostics import covariance_summary, discriminator_summary, entropy_summary

    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective=method, fused_head=False)
    inputs = _inputs(tokenizer, seed=3)
    tool_mask = torch.ones_like(inputs["completion_mask"])
    tool_mask[0, 2:4] = 0
    _loss_and_grads(trainer, {**inputs, "tool_mask": tool_mask})
    logged = {key: values[-1] for key, values in trainer._metrics["train"].items()}

    mask = inputs["completion_mask"].bool() & tool_mask.bool()
    with torch.no_grad():
        logits = _model(tokenizer)(input_ids=torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                                   attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)).logits
    stats = token_stats(logits[:, -MAX_COMPLETION - 1 : -1], inputs["completion_ids"],
                        need=("logprob", "entropy", "disc", "disc_centered"))
    advantages = build_objective(method)(PolicyBatch(
        log_prob=stats.logprob, old_log_prob=inputs["old_per_token_logps"].float(), advantages=inputs["advantages"],
        mask=mask, entropy=stats.entropy, disc=stats.disc, disc_centered=stats.disc_centered,
    )).advantages
    raw = torch.where(mask, inputs["advantages"][:, None], 0.0)
    assert torch.equal(advantages, raw) is (method == "dapo")
    expected = {**entropy_summary(stats.entropy, mask),
                **discriminator_summary(stats.disc, stats.disc_centered, advantages, mask),
                **covariance_summary(stats.logprob, advantages, mask)}
    assert {"entropy/p10", "disc/mean", "disc_centered/mean", "disc/mean_neg_adv", "disc_centered/std"} <= set(expected)
    assert expected["disc/mean"] != pytest.approx(expected["disc_centered/mean"], rel=1e-2)
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert logged["entropy"] == pytest.approx(float(stats.entropy[mask].mean()), rel=1e-5)


def test_a_biased_lm_head_is_read_with_its_bias_on_the_fused_path(tokenizer, tmp_path):
    """hidden @ W^T + b: the fused statistics take the head's bias, so both scoring paths give one loss, one gradient
    (the bias's included) and one entropy."""
    results = []
    for fused_head in (True, False):
        model = _model(tokenizer)
        old_head = model.get_output_embeddings()
        head = torch.nn.Linear(old_head.in_features, old_head.out_features, bias=True)
        with torch.no_grad():
            head.weight.copy_(old_head.weight)
            head.bias.copy_(torch.randn(head.out_features, generator=torch.Generator().manual_seed(5)))
        model.set_output_embeddings(head)
        trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo", model=model, fused_head=fused_head)
        assert trainer._uses_fused_head(trainer.model) is fused_head
        loss, grads = _loss_and_grads(trainer, _inputs(tokenizer, seed=3))
        assert any(name.endswith("lm_head.bias") for name in grads)
        results.append((loss, grads, trainer._metrics["train"]["entropy"][-1]))
    (fused_loss, fused_grads, fused_entropy), (plain_loss, plain_grads, plain_entropy) = results
    assert fused_loss == pytest.approx(plain_loss, rel=1e-5)
    assert fused_entropy == pytest.approx(plain_entropy, rel=1e-5)
    _assert_grads_close(fused_grads, plain_grads)


def test_a_head_subclassing_linear_is_not_fused_by_default(tokenizer, tmp_path):
    """A subclass of nn.Linear (a quantised or adapted layer) may compute more than hidden @ W^T: only a plain
    nn.Linear head is fused unless the caller says so."""

    class ScaledHead(torch.nn.Linear):
        def forward(self, hidden):
            return 2.0 * super().forward(hidden)

    model = _model(tokenizer)
    plain = model.get_output_embeddings()
    head = ScaledHead(plain.in_features, plain.out_features, bias=False)
    with torch.no_grad():
        head.weight.copy_(plain.weight)
    model.set_output_embeddings(head)
    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo", model=model)
    assert not trainer._uses_fused_head(trainer.model)


def test_the_head_is_not_fused_when_fsdp_or_zero3_shard_the_parameters(tokenizer, tmp_path, monkeypatch):
    """Outside the forward a process holds its shard of lm_head.weight alone: the model's own logits are used, and
    fused_head=True is refused."""
    from types import SimpleNamespace

    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo")
    assert trainer._uses_fused_head(trainer.model)
    monkeypatch.setattr(trainer, "is_fsdp_enabled", True)
    assert not trainer._uses_fused_head(trainer.model)
    monkeypatch.setattr(trainer, "is_fsdp_enabled", False)
    monkeypatch.setattr(trainer, "is_deepspeed_enabled", True)
    state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2))
    monkeypatch.setattr(trainer.accelerator, "state", state)
    assert trainer._uses_fused_head(trainer.model)  # ZeRO-2 shards the optimizer's state, not the weights
    state.deepspeed_plugin.zero_stage = 3
    assert not trainer._uses_fused_head(trainer.model)
    monkeypatch.setattr(EntropyGRPOTrainer, "_parameters_are_sharded", lambda self: True)
    with pytest.raises(ValueError, match="fused_head=True reads lm_head.weight outside the model's forward"):
        _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo", fused_head=True)


def test_a_processor_that_takes_images_is_refused_when_the_trainer_is_built(tokenizer, tmp_path):
    import copy

    processor = copy.deepcopy(tokenizer)
    processor.image_processor = object()
    with pytest.raises(NotImplementedError, match=r"scores text-only batches; this model's processor takes images"):
        _trainer(EntropyGRPOTrainer, processor, tmp_path, objective="dapo")


def test_a_low_precision_head_warns_for_every_way_trl_scores_old_log_probs(tokenizer, tmp_path, recwarn):
    """TRL scores old log-probs when a generation spans more micro-steps than one optimizer step, and for vLLM's
    correction; a head stored in bfloat16 is low precision even without bf16 autocast."""
    def warned():
        return bool([w for w in recwarn if "cast_lm_head_to_fp32=True" in str(w.message)])

    # steps_per_generation > gradient_accumulation_steps: old log-probs are computed (TRL's own condition)
    _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="grpo",
             config=_config(tmp_path, bf16=True, steps_per_generation=2, gradient_accumulation_steps=1,
                            cast_lm_head_to_fp32=False))
    assert warned()
    recwarn.clear()
    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="grpo",
                       config=_config(tmp_path, bf16=True, cast_lm_head_to_fp32=False))
    assert not warned()  # one pass per generation, no reference: nothing is scored by TRL's head
    trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
    trainer._warn_on_low_precision_head()
    assert warned()
    recwarn.clear()
    trainer.vllm_importance_sampling_correction = False
    trainer._warn_on_low_precision_head()
    assert not warned()
    # a bfloat16 head under float32 autocast settings
    _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="grpo", model=_model(tokenizer).to(torch.bfloat16),
             config=_config(tmp_path, num_iterations=2, cast_lm_head_to_fp32=False))
    assert warned()


def test_a_stateless_objective_writes_no_state_file_with_its_checkpoints(tokenizer, tmp_path):
    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo")
    trainer.state.global_step = 1
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    trainer._save_checkpoint(trainer.model, None)
    checkpoint = Path(trainer.args.output_dir) / "checkpoint-1"
    assert checkpoint.is_dir() and not (checkpoint / OBJECTIVE_STATE_FILE).exists()
    # the method's name is written with every checkpoint, for `entrorl report`
    assert json.loads((checkpoint / "entrorl_objective.json").read_text()) == {"method": "dapo"}
    # resuming it: there is no state to miss, so no warning that one starts afresh
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        trainer._load_optimizer_and_scheduler(str(checkpoint))
    assert not [w for w in raised if "holds no objective state" in str(w.message)]
    # a method with parts added is named with them, as entrorl train names its run
    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path / "parts", objective={
        "method": "dapo", "regularizers": [{"name": "entropy_bonus", "entropy_coeff": 0.001}]})
    trainer.save_state()
    assert json.loads((Path(trainer.args.output_dir) / "entrorl_objective.json").read_text()) == {
        "method": "dapo+entropy_bonus"}


class _Killed(BaseException):
    """Stands for the process being killed at that moment."""


def test_a_crash_at_any_moment_of_a_checkpoint_leaves_a_resumable_one_that_holds_the_objective_state(
        tokenizer, tmp_path, monkeypatch):
    """The objective's state goes into the checkpoint folder before TRL writes trainer_state.json (what makes a folder
    a checkpoint to resume from) and prunes the older ones (save_total_limit): killed right after the pruning, the run
    resumes from the new checkpoint with that step's state. Written after TRL's files, the state was missing there
    while the checkpoint that held the previous one was already deleted: the coefficient started afresh."""
    import transformers.trainer

    params = {"target_entropy": 100.0, "delta": 0.001}
    config = dict(save_strategy="steps", save_steps=1, save_total_limit=1, max_steps=2)
    first = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="adaptive_entropy", objective_params=params,
                     config=_config(tmp_path, **config))
    prune = transformers.trainer.rotate_checkpoints

    def prune_then_die(*args, **kwargs):
        prune(*args, **kwargs)
        if first.state.global_step == 2:
            raise _Killed

    monkeypatch.setattr(transformers.trainer, "rotate_checkpoints", prune_then_die)
    with pytest.raises(_Killed):
        first.train()
    monkeypatch.undo()
    at_step_2 = first.objective.state_dict()
    assert at_step_2 != build_objective("adaptive_entropy", **params).state_dict()  # the controller has moved
    assert sorted(path.name for path in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-2"]

    resumed = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="adaptive_entropy", objective_params=params,
                       config=_config(tmp_path, **config))
    load = resumed._load_optimizer_and_scheduler
    restored = {}

    def load_and_stop(checkpoint):
        load(checkpoint)
        restored["checkpoint"], restored["state"] = checkpoint, resumed.objective.state_dict()
        raise _Killed

    resumed._load_optimizer_and_scheduler = load_and_stop
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "holds no objective state ... starts afresh" would fail here
        with pytest.raises(_Killed):
            resumed.train(resume_from_checkpoint=True)
    assert restored["checkpoint"].endswith("checkpoint-2") and restored["state"] == at_step_2


def test_resume_from_checkpoint_true_passes_over_a_checkpoint_whose_save_was_cut_short(tokenizer, tmp_path,
                                                                                        monkeypatch):
    """Killed while transformers writes the model of checkpoint-2 (its folder then holds entrorl's files and part of
    the model, no trainer_state.json), a run resumes from checkpoint-1, which pruning has not yet removed, with a
    warning; transformers' own search takes the newest folder and fails ("Can't find a valid checkpoint")."""
    params = {"target_entropy": 100.0, "delta": 0.001}
    config = dict(save_strategy="steps", save_steps=1, save_total_limit=1, max_steps=2)
    first = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="adaptive_entropy", objective_params=params,
                     config=_config(tmp_path, **config))
    save_model = first.save_model

    def killed_at_step_2(*args, **kwargs):
        if first.state.global_step == 2:
            raise _Killed
        return save_model(*args, **kwargs)

    first.save_model = killed_at_step_2
    with pytest.raises(_Killed):
        first.train()
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    resumed = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="adaptive_entropy", objective_params=params,
                       config=_config(tmp_path, **config))
    load = resumed._load_optimizer_and_scheduler
    restored = []
    resumed._load_optimizer_and_scheduler = lambda checkpoint: load(checkpoint) or restored.append(checkpoint)
    with pytest.warns(UserWarning, match=r"checkpoint-2 hold\(s\) no readable trainer_state.json \(a save cut short\): "
                                         r"resuming from .*checkpoint-1$") as warned:
        resumed.train(resume_from_checkpoint=True)
    assert [w.filename for w in warned if "cut short" in str(w.message)] == [__file__]  # the call's line, not ours
    (tmp_path / "out" / "checkpoint-9").mkdir()  # the resumed run rewrote checkpoint-2 whole; another cut short
    with pytest.warns(UserWarning, match=r"checkpoint-9 hold.* \(a save cut short\)") as warned:
        assert Path(resumed.latest_complete_checkpoint()).name == "checkpoint-2"
    assert [w.filename for w in warned] == [__file__]
    assert [Path(path).name for path in restored] == ["checkpoint-1"] and resumed.state.global_step == 2
    empty = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path / "empty", objective="dapo",
                     config=_config(tmp_path / "empty", **config))
    assert empty.latest_complete_checkpoint() is None
    with pytest.raises(ValueError, match="No valid checkpoint found"):  # transformers' own message
        empty.train(resume_from_checkpoint=True)
    (tmp_path / "empty" / "out" / "checkpoint-3").mkdir(parents=True)  # only a save cut short
    with pytest.raises(ValueError, match=r"no complete checkpoint in .*out: .*checkpoint-3 hold\(s\) no readable "
                                         r"trainer_state.json \(a save cut short\); train without resume_from_checkpoint"):
        empty.train(resume_from_checkpoint=True)
    # transformers writes trainer_state.json in place: killed while writing it, the folder holds it cut short
    state = tmp_path / "out" / "checkpoint-2" / "trainer_state.json"
    (tmp_path / "out" / "checkpoint-9").rmdir()
    shutil.copytree(tmp_path / "out" / "checkpoint-2", tmp_path / "out" / "checkpoint-3")
    for cut in ("", state.read_text()[:100]):
        (tmp_path / "out" / "checkpoint-3" / "trainer_state.json").write_text(cut)
        with pytest.warns(UserWarning, match=r"checkpoint-3 hold\(s\) no readable trainer_state.json"):
            assert Path(resumed.latest_complete_checkpoint()).name == "checkpoint-2"


def test_a_stateless_objective_writing_over_an_earlier_checkpoint_removes_its_objective_state(tokenizer, tmp_path):
    """A run started again in an output directory used before writes over TRL's files of checkpoint-N; a stateless
    objective must also take out the earlier run's state file, which resuming would otherwise load (or refuse)."""
    stateful = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="adaptive_entropy")
    stateful.state.global_step = 1
    stateful.create_optimizer_and_scheduler(num_training_steps=4)
    stateful._save_checkpoint(stateful.model, None)
    checkpoint = Path(stateful.args.output_dir) / "checkpoint-1"
    assert (checkpoint / OBJECTIVE_STATE_FILE).is_file()
    stateless = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo")
    stateless.state.global_step = 1
    stateless.create_optimizer_and_scheduler(num_training_steps=4)
    stateless._save_checkpoint(stateless.model, None)
    assert not (checkpoint / OBJECTIVE_STATE_FILE).exists()
    assert json.loads((checkpoint / "entrorl_objective.json").read_text()) == {"method": "dapo"}
    stateless._load_optimizer_and_scheduler(str(checkpoint))  # raised "entries ... for parts this objective lacks"
    assert not list(checkpoint.glob(".*.tmp-*"))  # the state is written through a temporary file, renamed into place


@pytest.mark.parametrize("method", ["adaptive_entropy", "dapo"])
def test_a_save_on_fewer_processes_removes_the_per_process_states_of_the_others(tokenizer, tmp_path, monkeypatch, method):
    """A 1-process run writing over a 2-process run's checkpoint: the old entrorl_objective_state_<i>.pt files go, or
    a 2-process resume would load the other run's coefficients (or refuse them, for a stateless method); a 3-process
    run's extra file goes under 2 processes, and each process's own stays."""
    from accelerate import Accelerator

    earlier = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="adaptive_entropy",
                       objective_params={"target_entropy": 100.0, "delta": 0.3})
    checkpoint = Path(earlier.args.output_dir) / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    for index in range(3):
        torch.save(earlier.objective.state_dict(), checkpoint / f"entrorl_objective_state_{index}.pt")
    later = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective=method)
    later.state.global_step = 1
    later.create_optimizer_and_scheduler(num_training_steps=4)
    later._save_checkpoint(later.model, None)
    assert not list(checkpoint.glob("entrorl_objective_state_*.pt"))
    assert (checkpoint / OBJECTIVE_STATE_FILE).is_file() == (method == "adaptive_entropy")
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    for index in range(3):
        torch.save(earlier.objective.state_dict(), checkpoint / f"entrorl_objective_state_{index}.pt")
    later._save_checkpoint(later.model, None)  # as process 0 of 2: its own file is rewritten, process 1's left to it
    kept = sorted(path.name for path in checkpoint.glob("entrorl_objective_state_*.pt"))
    assert kept == (["entrorl_objective_state_0.pt", "entrorl_objective_state_1.pt"] if method == "adaptive_entropy"
                    else ["entrorl_objective_state_1.pt"])
    if method == "adaptive_entropy":
        assert torch.load(checkpoint / "entrorl_objective_state_0.pt", weights_only=True) == later.objective.state_dict()


def test_an_args_object_without_use_bias_correction_kl_gets_trl_s_default(tmp_path):
    """An options object lacking use_bias_correction_kl reads as GRPOConfig's default (True), as objective_for_trl_loss
    reads it: kl_ref must then be importance-weighted."""
    args = SimpleNamespace(beta=0.04)
    assert objective_for_trl_loss(args).regularizers[0].importance_weighted is True
    check_trl_args(args, build_objective("dapo+kl_ref", kl_loss_coef=0.04, importance_weighted=True))
    with pytest.raises(ValueError, match="use_bias_correction_kl = True and kl_ref's importance_weighted = False"):
        check_trl_args(args, build_objective("dapo+kl_ref", kl_loss_coef=0.04, importance_weighted=False))


def test_a_sequence_level_gspo_objective_takes_an_unweighted_kl_as_trl_s_or_is_refused(tokenizer, tmp_path, tiny_model_dir):
    """With importance_sampling_level='sequence' TRL weighs the KL by the sequence's ratio (use_bias_correction_kl,
    its default) and kl_ref can only weigh it by each token's: refused with objective='gspo+kl_ref' as without an
    objective. Unweighted, the loss and gradient are TRL's; at the token level the gspo surrogate is the ratio's level."""
    gspo = dict(loss_type="grpo", epsilon=3e-4, epsilon_high=4e-4, beta=0.1)
    for objective in (None, "gspo+kl_ref"):
        with pytest.raises(ValueError, match="weighs the KL by the sequence's ratio, kl_ref by each token's"):
            _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective=objective, model=str(tiny_model_dir),
                     config=_config(tmp_path, importance_sampling_level="sequence", **gspo))
    token_level = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="gspo+kl_ref", model=str(tiny_model_dir),
                           config=_config(tmp_path, **gspo))
    assert token_level.objective.regularizers[0].importance_weighted is True
    config = _config(tmp_path, importance_sampling_level="sequence", use_bias_correction_kl=False, **gspo)
    ours = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="gspo+kl_ref", config=config, model=str(tiny_model_dir))
    theirs = _trainer(GRPOTrainer, tokenizer, tmp_path, config=config, model=str(tiny_model_dir))
    inputs = _inputs(tokenizer, seed=5)
    with torch.no_grad():  # a reference near the policy, so that no token's k3 reaches entrorl's clamp at 10
        logits = theirs.model(input_ids=torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                              attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)).logits
    log_probs = token_stats(logits[:, -MAX_COMPLETION - 1 : -1], inputs["completion_ids"], need=("logprob",)).logprob
    inputs["ref_per_token_logps"] = log_probs + 0.5 * torch.randn(log_probs.shape, generator=torch.Generator().manual_seed(5))
    loss_ours, grads_ours = _loss_and_grads(ours, inputs)
    loss_theirs, grads_theirs = _loss_and_grads(theirs, inputs)
    assert ours._metrics["train"]["kl/ref"][-1] > 0.1  # the KL term weighs in the comparison
    assert loss_ours == pytest.approx(loss_theirs, rel=1e-5)
    _assert_grads_close(grads_ours, grads_theirs)


def test_a_half_precision_model_with_a_float32_head_is_scored_through_the_fused_head(tokenizer, tmp_path, tiny_model_dir):
    """cast_lm_head_to_fp32=True on a bfloat16 model (what the low-precision warning advises) makes the head float32
    over bfloat16 hidden states: the fused path projects them in float32, as TRL's head does, equal to the logits'
    path, and the model trains."""
    config = _config(tmp_path, num_iterations=2, cast_lm_head_to_fp32=True, model_init_kwargs={"dtype": "bfloat16"},
                     max_steps=1)
    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo", config=config, model=str(tiny_model_dir))
    assert trainer.model.get_output_embeddings().weight.dtype == torch.float32
    assert trainer.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    inputs = _inputs(tokenizer, seed=7)
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    mask = inputs["completion_mask"].bool()
    stats = {}
    with torch.no_grad():
        for fused in (True, False):
            trainer.fused_head = fused
            stats[fused], _ = trainer._response_stats(trainer.model, input_ids, attention_mask, inputs["completion_ids"], mask)
        trl_log_probs, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, MAX_COMPLETION)
    torch.testing.assert_close(stats[True].logprob[mask], stats[False].logprob[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats[True].logprob[mask], trl_log_probs[mask].float(), rtol=1e-5, atol=1e-5)
    trainer.fused_head = None
    trainer.train()
    assert trainer.state.global_step == 1 and math.isfinite(trainer.state.log_history[0]["loss"])


TWO_PROCESS_RUN = '''
import json, os, random, sys

import torch
from datasets import Dataset
from trl import GRPOConfig

from entrorl.integrations.trl import EntropyGRPOTrainer

model_dir, output_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
resume = sys.argv[4] if len(sys.argv) > 4 else None
torch.set_num_threads(1)


class FixedCompletions(EntropyGRPOTrainer):
    """Completions drawn from the prompt, the sample's place in its group and the step: the same on every attempt."""

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):  # (completion ids, sampler log-probs)
        seen, completions = {}, []
        for ids in prompt_ids:
            index = seen[tuple(ids)] = seen.get(tuple(ids), -1) + 1
            draw = random.Random(hash((tuple(ids), index, self.state.global_step)) & 0xFFFFFFFF)
            completions.append([draw.randint(4, len(self.processing_class) - 1) for _ in range(draw.randint(2, 8))])
        return completions, None


def digits(completions, **kwargs):
    return [float(sum(character.isdigit() for character in text)) + 0.1 * len(text) for text in completions]


per_device = int(os.environ.get("PER_DEVICE", "4"))
args = GRPOConfig(output_dir=output_dir, use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=per_device,
                  num_generations=4, max_completion_length=8, logging_steps=1, seed=0, learning_rate=0.5, optim="sgd",
                  max_grad_norm=0.0, lr_scheduler_type="constant", max_steps=steps, save_strategy="steps",
                  save_steps=1, disable_tqdm=True)
trainer = FixedCompletions(model=model_dir, reward_funcs=digits, args=args, processing_class=None,
                           train_dataset=Dataset.from_list([{"prompt": f"{a}+{b}="} for a in range(4) for b in range(4)]),
                           objective="adaptive_entropy",
                           objective_params={"target_entropy": 4.5961, "delta": 0.05, "max_coeff": 1.0})
trainer.train(resume_from_checkpoint=resume)
rank = trainer.accelerator.process_index
weights = torch.cat([p.detach().flatten() for p in trainer.accelerator.unwrap_model(trainer.model).parameters()])
with open(f"{output_dir}/rank{rank}.json", "w") as handle:
    json.dump({"coefficient": trainer.objective.regularizers[0].coefficient, "weights_sum": float(weights.double().sum()),
               "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
               "coefficients": [entry["reg/adaptive_entropy_controller_coeff"] for entry in trainer.state.log_history
                                if "reg/adaptive_entropy_controller_coeff" in entry]}, handle)
if torch.distributed.is_initialized():  # left to the interpreter's exit, gloo's threads may abort the process
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
'''


@pytest.mark.slow
def test_two_processes_move_one_adaptive_coefficient_and_resume_as_an_uninterrupted_run(tmp_path):
    """Under data parallelism (2 CPU processes, gloo) the adaptive_entropy controller measures both processes' tokens:
    one coefficient, the one a single process with the same global batch moves; a run resumed from a checkpoint
    continues exactly as the uninterrupted one, on every process."""
    import os
    import shutil
    import socket
    import subprocess
    import sys

    from entrorl.lab.tiny_model import save_tiny_model

    model_dir = tmp_path / "model"
    save_tiny_model(model_dir, seed=0, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    max_position_embeddings=64)
    script = tmp_path / "run.py"
    script.write_text(TWO_PROCESS_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false",
           "TRL_EXPERIMENTAL_SILENCE": "1"}

    def launch(output_dir, *arguments, processes=2):
        with socket.socket() as probe:  # a free port for the processes' rendezvous
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
                   "127.0.0.1", "--master_port", str(port), str(script), str(model_dir), str(output_dir), "3", *arguments]
        finished = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                                  env={**env, "PER_DEVICE": str(8 // processes)})
        assert finished.returncode == 0, finished.stderr[-3000:]
        return [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in range(processes)]

    whole = launch(tmp_path / "whole")
    assert whole[0]["coefficients"] == whole[1]["coefficients"] and len(set(whole[0]["coefficients"])) > 1
    alone = launch(tmp_path / "alone", processes=1)  # the same 8 rows a step in one process
    assert alone[0]["coefficients"] == whole[0]["coefficients"]
    assert sorted(path.name for path in (tmp_path / "whole" / "checkpoint-2").glob("entrorl_objective_state*")) == [
        "entrorl_objective_state.pt", "entrorl_objective_state_0.pt", "entrorl_objective_state_1.pt"]
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = launch(tmp_path / "resumed", str(tmp_path / "resumed" / "checkpoint-2"))
    for rank in (0, 1):
        assert resumed[rank]["coefficient"] == whole[rank]["coefficient"]
        assert resumed[rank]["weights_sum"] == whole[rank]["weights_sum"]
        assert resumed[rank]["losses"][-1] == whole[rank]["losses"][-1]


@pytest.mark.parametrize("quantile", [0.5, 0.9, 0.99])
def test_every_top_entropy_quantile_below_one_is_refused(tmp_path, quantile):
    """TRL applies its entropy mask for any top_entropy_quantile < 1: each such value is refused naming forking_tokens
    with that quantile; 1.0 (TRL's default, no mask) passes."""
    with pytest.raises(ValueError, match=rf"top_entropy_quantile = {quantile:g}: use the 'forking_tokens' method"):
        check_trl_args(_config(tmp_path, top_entropy_quantile=quantile), build_objective("dapo"))
    check_trl_args(_config(tmp_path, top_entropy_quantile=1.0), build_objective("dapo"))


@pytest.mark.parametrize("method", ["cispo", "kl_cov", "dr_grpo+forking_tokens"])
def test_a_sequence_level_ratio_is_refused_for_every_surrogate_but_gspo(tmp_path, method):
    """importance_sampling_level='sequence' describes only gspo's ratio: an objective with any other surrogate (CISPO's
    weight, kl_cov's unclipped ratio, a per-token PPO composition) is refused."""
    with pytest.raises(ValueError, match=r"importance_sampling_level='sequence': the objective's surrogate sets the "
                                         r"ratio's level, and this one's is per token"):
        check_trl_args(_config(tmp_path, importance_sampling_level="sequence"), build_objective(method))


@pytest.mark.parametrize(("method", "options", "suggested"), [
    ("grpo", {"epsilon_high": 0.28}, {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28}),
    ("grpo", {"epsilon": 0.1}, {"clip_ratio_low": 0.1, "clip_ratio_high": 0.1}),
    ("dapo", {"epsilon": 0.15, "epsilon_high": 0.3}, {"clip_ratio_low": 0.15, "clip_ratio_high": 0.3}),
])
def test_the_refusal_of_epsilon_suggests_the_clip_ratios_that_pass(tmp_path, method, options, suggested):
    """A clip range of TRL's that differs from the objective's is refused with epsilon as clip_ratio_low and
    epsilon_high (epsilon when unset) as clip_ratio_high; those objective_params then pass the same options."""
    import ast

    config = _config(tmp_path, **options)
    objective = build_objective(method)
    with pytest.raises(ValueError) as refused:
        check_trl_args(config, objective)
    own = (objective.surrogate.clip_ratio_low, objective.surrogate.clip_ratio_high)
    assert (f"the objective clips with its own ratios (PPOClip: clip_ratio_low = {own[0]}, clip_ratio_high = {own[1]})"
            in str(refused.value))
    params = ast.literal_eval(re.search(r"pass objective_params=(\{.*?\})", str(refused.value)).group(1))
    assert params == suggested
    check_trl_args(config, build_objective(method, **params))


def test_the_low_precision_warning_covers_float16_uneven_accumulation_and_points_at_the_caller(tokenizer, tmp_path, recwarn):
    """fp16 is a half-precision head as bf16 is; TRL scores old log-probs whenever gradient_accumulation_steps is not a
    multiple of steps_per_generation * num_iterations (3 steps of a 2-step generation), not when it is (4 of 2); the
    warning names the line that built the trainer."""
    def head_warned(trainer):
        with warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            trainer._warn_on_low_precision_head()
        return bool([w for w in raised if "cast_lm_head_to_fp32=True" in str(w.message)])

    _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="grpo",
             config=_config(tmp_path, bf16=True, num_iterations=2, cast_lm_head_to_fp32=False))
    (warning,) = [w for w in recwarn if "cast_lm_head_to_fp32=True" in str(w.message)]
    assert warning.filename == __file__
    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="grpo",
                       config=_config(tmp_path, num_iterations=2, cast_lm_head_to_fp32=False))
    assert not head_warned(trainer)  # a float32 head without autocast: nothing to warn about
    trainer.args.fp16 = True
    assert head_warned(trainer)
    trainer.args.fp16, trainer.args.bf16, trainer.num_iterations = False, True, 1
    for accumulation, steps_per_generation, warns in ((3, 2, True), (4, 2, False), (2, 2, False)):
        trainer.args.gradient_accumulation_steps, trainer.args.steps_per_generation = accumulation, steps_per_generation
        assert head_warned(trainer) is warns, (accumulation, steps_per_generation)


def test_an_epsilon_high_of_zero_is_kept_and_only_an_unset_one_falls_back_to_epsilon(tmp_path):
    """TRL's upper clip is epsilon_high when it is not None, else epsilon: 0.0 is an upper clip of 1 + 0, not unset."""
    zero = objective_for_trl_loss(_config(tmp_path, loss_type="grpo", epsilon=0.2, epsilon_high=0.0)).surrogate
    assert (zero.clip_ratio_low, zero.clip_ratio_high) == (0.2, 0.0)
    unset = objective_for_trl_loss(_config(tmp_path, loss_type="grpo", epsilon=0.15)).surrogate
    assert (unset.clip_ratio_low, unset.clip_ratio_high) == (0.15, 0.15)
    check_trl_args(_config(tmp_path, loss_type="grpo", epsilon_high=0.0),
                   build_objective("grpo", clip_ratio_low=0.2, clip_ratio_high=0.0))


@pytest.mark.parametrize(("options", "problem"), [
    # TRL applies these whenever they are not None, zero included: OPSM with threshold 0, coef_1 capped at 0
    ({"off_policy_mask_threshold": 0.0}, "off_policy_mask_threshold: not available"),
    ({"delta": 0.0}, r"delta \(two-sided clipping\)"),
    # a negative entropy_coef is an entropy penalty in TRL's loss, still not the objective's
    ({"entropy_coef": -0.01}, "entropy_coef / use_adaptive_entropy"),
    # a level TRL does not know is not the token level either
    ({"importance_sampling_level": "seq"}, "leave it 'token'"),
])
def test_trl_loss_options_that_trl_applies_at_zero_negative_or_unknown_values_are_refused(tmp_path, options, problem):
    with pytest.raises(ValueError, match=problem):
        check_trl_args(_config(tmp_path, **options), build_objective("dapo"))


def test_a_vllm_cap_removed_by_setting_it_to_none_is_refused_beside_a_rollout_correction():
    """vllm_importance_sampling_clip_max=None differs from TRL's default (3.0) as much as any other value does."""
    args = SimpleNamespace(use_vllm=True, vllm_importance_sampling_correction=True,
                           vllm_importance_sampling_clip_max=None)
    with pytest.raises(ValueError, match=r"vllm_importance_sampling_clip_max: the objective's rollout correction"):
        check_trl_args(args, build_objective("dapo+tis"))


@pytest.mark.parametrize("objective", ["grpo+kl_ref", {"method": "grpo+kl_ref"}, None])
@pytest.mark.parametrize("beta", [-0.04, float("inf")])
def test_a_bad_beta_is_refused_as_kl_refs_coefficient_naming_beta(tmp_path, objective, beta):
    """With or without a kl_ref objective: the part's own message (it was pydantic's raw assignment error with one),
    and the GRPOConfig option behind the parameter."""
    with pytest.raises(ValueError) as refused:
        EntropyGRPOTrainer._own_objective(objective, {}, _config(tmp_path, beta=beta))
    message = str(refused.value)
    assert message.startswith("regularizer 'kl_ref': invalid parameter value — kl_loss_coef: ")
    assert message.endswith("(kl_loss_coef comes from GRPOConfig's beta)") and "pydantic.dev" not in message


def test_a_bad_epsilon_is_named_as_grpo_configs_option(tmp_path):
    with pytest.raises(ValueError, match=r"clip_ratio_low: .*\(clip_ratio_high comes from GRPOConfig's epsilon_high "
                                         r"\(epsilon when unset\); clip_ratio_low comes from GRPOConfig's epsilon\)$"):
        objective_for_trl_loss(_config(tmp_path, epsilon=float("nan")))
    with pytest.raises(ValueError) as refused:  # a parameter the caller set is the caller's own
        objective_for_trl_loss(_config(tmp_path), clip_ratio_low=float("nan"))
    assert "GRPOConfig" not in str(refused.value)


@pytest.mark.parametrize(("options", "params"), [({}, {"mu": 2.5}), ({"beta": 0.04}, {"kl_loss_typ": "k3"})])
def test_an_unknown_parameter_without_objective_names_itself_not_grpo_config_options(tmp_path, options, params):
    """objective=None with a misnamed objective_params key: the error is about that key and says what objective_params
    adjusts there; the list of valid parameters holds clip_ratio_low and kl_loss_coef, which is no reason to blame
    GRPOConfig's epsilon or beta."""
    name = next(iter(params))
    for build in (lambda: objective_for_trl_loss(_config(tmp_path, **options), **params),
                  lambda: EntropyGRPOTrainer._own_objective(None, params, _config(tmp_path, **options))):
        with pytest.raises(ValueError) as refused:
            build()
        message = str(refused.value)
        assert f"unknown parameter '{name}'" in message and "comes from GRPOConfig" not in message, message
        assert "objective_params adjusts the loss of GRPOConfig.loss_type" in message
    assert "did you mean 'kl_loss_type'?" in message if name == "kl_loss_typ" else "did you mean" not in message


@pytest.mark.parametrize("objective", [{"method": "dapo+kl_ref"}, {"name": "dapo+kl_ref"},
                                       {"method": "dapo", "regularizers": [{"name": "kl_ref"}]}])
def test_a_config_objective_with_kl_ref_takes_beta_and_use_bias_correction_kl(tokenizer, tmp_path, tiny_model_dir,
                                                                             objective):
    """A dict objective that leaves kl_ref's coefficient and weighting unset gets beta and use_bias_correction_kl, as a
    method name does (instead of being refused for kl_ref's own default coefficient)."""
    for bias_correction in (True, False):
        config = _config(tmp_path, beta=0.04, use_bias_correction_kl=bias_correction)
        trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective=objective, config=config,
                           model=str(tiny_model_dir))
        kl_reference = trainer.objective.regularizers[0]
        assert (kl_reference.kl_loss_coef, kl_reference.importance_weighted) == (0.04, bias_correction)


def test_a_custom_objective_without_a_method_name_builds_without_an_advantage_warning(tokenizer, tmp_path, recwarn):
    """An objective given by its parts alone (no catalogue method, so named 'custom') has no estimator of its own to
    warn about, and trains on TRL's advantages."""
    objective = build_objective({"surrogate": {"name": "ppo_clip", "clip_ratio_high": 0.28}})
    assert objective.name == "custom"
    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective=objective)
    assert not [w for w in recwarn if "advantage" in str(w.message) or "scale_rewards" in str(w.message)]
    loss, _ = _loss_and_grads(trainer, _inputs(tokenizer, seed=3))
    dapo = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo")
    reference, _ = _loss_and_grads(dapo, _inputs(tokenizer, seed=3))
    assert loss == pytest.approx(reference, rel=1e-6)  # ppo_clip at 0.2 / 0.28, token-mean: dapo's loss


def test_under_data_parallelism_a_checkpoint_without_any_objective_state_only_says_it_starts_afresh(
        tokenizer, tmp_path, monkeypatch):
    """A GRPOTrainer checkpoint resumed on 2 processes holds neither the shared nor the process's own state file: the
    state starts afresh with that one warning, and no claim that it takes the state of the saving process."""
    from accelerate import Accelerator

    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="adaptive_entropy",
                       objective_params={"target_entropy": 100.0, "delta": 0.001})
    trainer.state.global_step = 0
    _loss_and_grads(trainer, _inputs(tokenizer, rows=4, seed=11))
    trainer.objective.end_step()
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    checkpoint = tmp_path / "grpo-checkpoint"
    checkpoint.mkdir()
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        trainer._load_optimizer_and_scheduler(str(checkpoint))
    messages = [str(w.message) for w in raised if "objective state" in str(w.message)]
    assert len(messages) == 1 and "adaptive_entropy's state starts afresh" in messages[0]
    assert trainer.objective.regularizers[0].coefficient == 0.0


def test_inputs_of_other_float_dtypes_give_the_float32_loss_of_float32_inputs(tokenizer, tmp_path, tiny_model_dir):
    """TRL's old, reference and sampler log-probs (and advantages) may come in another float dtype: the loss is the
    float32 loss of the same values in float32, bit for bit."""
    trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo+tis+kl_ref",
                       config=_config(tmp_path, beta=0.04), model=str(tiny_model_dir),
                       rollout_func=lambda prompts, trainer: None)
    inputs = _inputs(tokenizer, seed=3)
    inputs["sampling_per_token_logps"] = inputs["old_per_token_logps"] - 0.3
    inputs["ref_per_token_logps"] = inputs["old_per_token_logps"] + 0.2
    trainer.model.train()
    trainer.current_gradient_accumulation_steps, trainer.args.steps_per_generation = 1, 1
    for key in ("old_per_token_logps", "ref_per_token_logps", "sampling_per_token_logps", "advantages"):
        for dtype in (torch.float64, torch.bfloat16):
            values = inputs[key].to(dtype)
            with torch.no_grad():
                loss = trainer._compute_loss(trainer.model, {**inputs, key: values})
                expected = trainer._compute_loss(trainer.model, {**inputs, key: values.float()})
            assert loss.dtype == torch.float32 and float(loss) == float(expected), (key, dtype)


def test_an_args_object_without_an_option_reads_as_trl_s_default_in_every_check():
    """check_trl_args on an object lacking GRPOConfig options (a SimpleNamespace): epsilon reads as 0.2 in the clip
    range's refusal (not an AttributeError), and use_vllm without vllm_importance_sampling_correction as TRL's default
    correction, which needs tis or icepop."""
    from types import SimpleNamespace

    from entrorl.integrations.trl import check_trl_args
    from entrorl.objective import build_objective

    with pytest.raises(ValueError, match=r"objective_params=\{'clip_ratio_low': 0.2, 'clip_ratio_high': 0.3\}"):
        check_trl_args(SimpleNamespace(epsilon_high=0.3), build_objective("grpo"))
    with pytest.raises(ValueError, match="'tis' or 'icepop'"):
        check_trl_args(SimpleNamespace(use_vllm=True), build_objective("dapo"))


def test_trl_logits_path_under_autocast_with_float32_head_gives_ratio_one(tmp_path, tiny_model_dir):
    """docs/trl.md: with bf16 autocast, cast_lm_head_to_fp32=True makes TRL's old log-probs and the objective's current
    ones "both come from float32 logits (equal to about 1e-6, tested)". On the logits path (fused_head=False, which is
    also what FSDP / ZeRO-3 and non-listed architectures get) the objective's logits are computed by the model's head
    inside accelerator.autocast(), i.e. in bfloat16, while TRL's come from a float32 head outside autocast: the
    on-policy first pass's ratio is off 1 by bfloat16 rounding."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig

    from entrorl.integrations.trl import EntropyGRPOTrainer

    model_dir = tiny_model_dir
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=True, report_to="none",
                        per_device_train_batch_size=4, num_generations=4, max_completion_length=6, save_strategy="no",
                        logging_steps=1, seed=0, learning_rate=1e-2, disable_tqdm=True, num_iterations=2,
                        cast_lm_head_to_fp32=True)
    trainer = EntropyGRPOTrainer(
        model=str(model_dir), reward_funcs=lambda completions, **kw: [float(len(c) % 2) for c in completions],
        args=config, train_dataset=Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(4) for b in range(4)]}),
        processing_class=tokenizer, objective="grpo", fused_head=False,
    )
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(4, len(tokenizer), (4, 4), generator=generator)
    completion_ids = torch.randint(4, len(tokenizer), (4, 6), generator=generator)
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.ones_like(input_ids)
    mask = torch.ones_like(completion_ids, dtype=torch.bool)
    with torch.no_grad():
        trl_old, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, 6)
        stats, _ = trainer._response_stats(trainer.model, input_ids, attention_mask, completion_ids, mask)
        trainer.fused_head = True
        fused, _ = trainer._response_stats(trainer.model, input_ids, attention_mask, completion_ids, mask)
    fused_gap = float((trl_old.float() - fused.logprob)[mask].abs().max())
    logits_gap = float((trl_old.float() - stats.logprob)[mask].abs().max())
    assert fused_gap < 1e-5  # the fused path does what the docs say
    assert logits_gap < 1e-5, f"logits path: old vs current log-prob differ by {logits_gap:.3g} on-policy"


def test_sampling_that_leaves_tokens_out_is_warned_about_for_an_objective_reading_entropy(tokenizer, tmp_path, recwarn):
    """GRPOConfig's top_p / min_p / top_k below the vocabulary draw from a truncated distribution: a method reading
    H, S or D is told so, as entrorl's own trainer tells it; top_k at the vocabulary's size filters nothing."""
    for options in ({"top_p": 0.9}, {"min_p": 0.05}, {"top_k": 5}, {"generation_kwargs": {"top_p": 0.5}}):
        with pytest.warns(UserWarning, match=r"method 'forking_tokens' reads entropy of the full distribution at "
                                             r"GRPOConfig's temperature, while GRPOConfig's top_k"):
            _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="forking_tokens",
                     config=_config(tmp_path, **options))
    for method in ("entropy_bonus", "adaptive_entropy"):  # a bonus on, and a controller of, the full one's entropy
        with pytest.warns(UserWarning, match=rf"method '{method}' reads entropy of the full distribution"):
            _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective=method, config=_config(tmp_path, top_p=0.9))
    recwarn.clear()
    _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="forking_tokens",
             config=_config(tmp_path, top_k=len(tokenizer)))
    _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo", config=_config(tmp_path, top_p=0.9))
    _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="forking_tokens",  # the kwargs set it back to 1
             config=_config(tmp_path, top_p=0.9, generation_kwargs={"top_p": 1.0}))
    assert not [w for w in recwarn if "truncated" in str(w.message)]


def test_generate_s_other_truncations_and_another_sampling_temperature_in_generation_kwargs_are_warned_about(
        tokenizer, tmp_path, recwarn):
    """generation_kwargs reach generate() over GRPOConfig's settings: typical_p below 1 and an epsilon / eta cutoff
    truncate the sampled distribution as top_p does; a temperature there samples at it while TRL scores the
    log-probs at GRPOConfig's temperature, whatever the objective. What TRL leaves unset comes from the model's
    generation_config.json (min_p, typical_p); penalties (repetition, n-grams) reshape the distribution."""
    for kwargs in ({"typical_p": 0.9}, {"epsilon_cutoff": 3e-4}, {"eta_cutoff": 1e-3}, {"top_h": 1.0}):
        name, value = next(iter(kwargs.items()))
        with pytest.warns(UserWarning, match=rf"reads entropy of the full distribution at GRPOConfig's temperature, "
                                             rf"while GRPOConfig's generation_kwargs {name} = {value} draw"):
            _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="forking_tokens",
                     config=_config(tmp_path, generation_kwargs=kwargs))
    with pytest.warns(UserWarning, match=r"generation_kwargs temperature = 0.7 draws the completions at another "
                                         r"temperature than GRPOConfig's temperature = 1.0"):
        _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="grpo",
                 config=_config(tmp_path, generation_kwargs={"temperature": 0.7}))
    # what TRL leaves unset generate() takes from the model's generation_config.json
    model = _model(tokenizer)
    model.generation_config.min_p, model.generation_config.typical_p = 0.5, 0.5
    with pytest.warns(UserWarning, match=r"while GRPOConfig's top_k = 0 / top_p = 1.0 / min_p = 0.5 \(min_p from the "
                                         r"model's generation_config.json\) draw"):
        _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="forking_tokens", model=model)
    model.generation_config.min_p = None
    with pytest.warns(UserWarning, match=r"while the model's generation_config.json typical_p = 0.5 draw"):
        trainer = _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="forking_tokens", model=model)
    recwarn.clear()  # vLLM or a rollout_func samples: the model's generation_config.json is not read
    trainer._warn_on_filtered_sampling(generate_samples=False)
    assert not [w for w in recwarn if "truncated" in str(w.message)]
    model.generation_config.typical_p, model.generation_config.no_repeat_ngram_size = None, 3
    with pytest.warns(UserWarning, match=r"^the model's generation_config.json's no_repeat_ngram_size = 3 reshape"):
        _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="forking_tokens", model=model)
    # penalties reshape it: the same mismatch for a method reading H, S, D
    for options in ({"repetition_penalty": 1.3}, {"generation_kwargs": {"repetition_penalty": 1.3}},
                    {"generation_kwargs": {"no_repeat_ngram_size": 2}}, {"generation_kwargs": {"presence_penalty": 0.5}}):
        with pytest.warns(UserWarning, match=r"GRPOConfig(.generation_kwargs)?'s (repetition_penalty = 1.3|"
                                             r"no_repeat_ngram_size = 2|presence_penalty) reshape the distribution the "
                                             r"completions are drawn from, while TRL and method 'dapo\+clip_b' score "
                                             r"them under the full distribution"):
            _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="dapo+clip_b", config=_config(tmp_path, **options))
    recwarn.clear()
    _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="grpo",  # reads none of them: silent
             config=_config(tmp_path, repetition_penalty=1.3))
    assert not [w for w in recwarn if "reshape" in str(w.message)]
    recwarn.clear()
    for kwargs in ({"typical_p": 1.0}, {"epsilon_cutoff": 0.0}, {"temperature": 0.7}):
        options = {"temperature": 0.7} if "temperature" in kwargs else {}
        _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="forking_tokens",
                 config=_config(tmp_path, generation_kwargs=kwargs, **options))
    assert not [w for w in recwarn if "truncated" in str(w.message) or "another temperature" in str(w.message)]


def test_an_output_dir_whose_name_is_not_utf8_is_refused_before_training(tmp_path, tokenizer):
    """Its first checkpoint would fail after the steps were spent (TRL's model card, the tokenizer's save: the
    tokenizers library takes UTF-8 names only)."""
    import os

    output_dir = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"sortie-\xe9"))
    with pytest.raises(ValueError, match=r"GRPOConfig.output_dir .*sortie-\\xe9 has a name that is not UTF-8"):
        _trainer(EntropyGRPOTrainer, tokenizer, tmp_path, objective="grpo", config=_config(tmp_path, output_dir=output_dir))
