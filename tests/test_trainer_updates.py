"""The trainer's update loop and bookkeeping, checked on a tiny model: the non-finite guard counts steps in a row;
every mini-batch starts from zero gradients and later updates are off-policy (their old log-probs are the sampling
policy's) on shuffled rows; the predicted entropy change follows the clipped update; each metric is over the tokens it
names (trained, applied updates, the whole run); a checkpoint restores every generator and keeps exactly ``keep``; a
bfloat16 model's float32 copies are clipped; evaluation groups samples by prompt."""

from __future__ import annotations

import copy
import errno
import json
import logging
import math
import os
import random
import shutil
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from entrorl.trainer import Trainer, TrainingStopped, load_config, read_metrics

from test_trainer import (  # noqa: E402
    PARITY_REWARD,
    THREE_SAMPLING_ROUNDS,
    NaNLoss,
    call_counting_reward,
    comparable,
    flip_a_byte,
    importable_module,
    make_config,
    trainer_sampling_three_rounds,
)


@pytest.fixture()
def parity(tmp_path):
    """A reward that varies between samples, importable as 'updates_parity:score'."""
    with importable_module(tmp_path, "updates_parity", PARITY_REWARD):
        yield "updates_parity:score"


@pytest.fixture
def trainer_for():
    """Builds trainers from test_trainer's configuration (``trainer_for(tmp_path, model_dir, train, ...)``) and closes
    them after the test, also when it raised."""
    made = []

    def build(tmp_path, model_dir, train, run="run", held_out=None, **sections) -> Trainer:
        made.append(Trainer(load_config(make_config(model_dir, train, held_out, **sections)), run_dir=tmp_path / run))
        return made[-1]

    yield build
    for trainer in made:
        trainer.close()


class Recording:
    """The objective, recording each call's (old_log_prob, log_prob) on the valid tokens."""

    def __init__(self, objective):
        self.objective, self.calls = objective, []

    def __call__(self, batch, **kwargs):
        self.calls.append((batch.old_log_prob.detach()[batch.mask].clone(), batch.log_prob.detach()[batch.mask].clone()))
        return self.objective(batch, **kwargs)

    def __getattr__(self, name):
        return getattr(self.objective, name)


# ------------------------------------------------------------------------------------------ the non-finite guard
def test_the_non_finite_count_starts_again_after_a_good_step(tmp_path, tiny_model_dir, arithmetic_files, parity,
                                                             monkeypatch, trainer_for):
    """max_consecutive_nonfinite counts steps IN A ROW: NaN, good, NaN with a limit of 2 must not stop."""
    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, reward={"name": parity},
                          optim={"steps": 5, "lr": 1e-3, "max_consecutive_nonfinite": 2})
    objective = trainer.objective
    monkeypatch.setattr(trainer, "objective", NaNLoss(objective))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert trainer.train_step()["train/skipped_updates"] == 1
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]  # torch's, about a step the trainer skipped
    monkeypatch.setattr(trainer, "objective", objective)
    assert trainer.train_step()["train/skipped_updates"] == 0
    assert trainer.consecutive_nonfinite == 0
    monkeypatch.setattr(trainer, "objective", NaNLoss(objective))
    trainer.train_step()  # one in a row again: no TrainingStopped
    assert trainer.consecutive_nonfinite == 1
    with pytest.raises(TrainingStopped, match="2 steps in a row"):
        trainer.train_step()


class InfiniteGradient(torch.autograd.Function):
    """The identity, whose backward multiplies the gradient by inf: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, gradient):
        return gradient * math.inf


class InfiniteGradientLoss:
    """A trainer's objective whose loss is finite but whose gradient is not."""

    def __init__(self, objective):
        self.objective = objective

    def __call__(self, batch, **kwargs):
        out = self.objective(batch, **kwargs)
        out.loss = out.policy_loss = InfiniteGradient.apply(out.loss)
        return out

    def __getattr__(self, name):
        return getattr(self.objective, name)


def test_a_finite_loss_with_a_non_finite_gradient_is_skipped_like_a_non_finite_loss(tmp_path, tiny_model_dir,
                                                                                     arithmetic_files, parity,
                                                                                     monkeypatch, trainer_for):
    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, reward={"name": parity},
                          optim={"steps": 5, "lr": 1e-3, "max_consecutive_nonfinite": 2})
    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    monkeypatch.setattr(trainer, "objective", InfiniteGradientLoss(trainer.objective))
    metrics = trainer.train_step()
    assert metrics["train/skipped_updates"] == 1 and metrics["train/updates"] == 0
    assert math.isnan(metrics["train/grad_norm"])
    assert all(torch.equal(weights[name], p) for name, p in trainer.model.named_parameters())
    assert trainer.consecutive_nonfinite == 1


def test_the_schedule_moves_on_over_a_skipped_step(tmp_path, tiny_model_dir, arithmetic_files, parity, monkeypatch,
                                                  trainer_for):
    """The learning-rate schedule follows steps, not applied updates: after a step whose update was skipped, the next
    step runs at its own place in the warm-up (as the uninterrupted schedule has it), not at the skipped one's."""
    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, reward={"name": parity},
                          optim={"steps": 5, "lr": 1e-3, "warmup_steps": 4, "max_consecutive_nonfinite": 3})
    objective = trainer.objective
    assert trainer.train_step()["train/lr"] == pytest.approx(1e-3 / 4)
    monkeypatch.setattr(trainer, "objective", NaNLoss(objective))
    skipped = trainer.train_step()
    assert skipped["train/skipped_updates"] == 1 and skipped["train/lr"] == pytest.approx(2e-3 / 4)
    monkeypatch.setattr(trainer, "objective", objective)
    assert trainer.train_step()["train/lr"] == pytest.approx(3e-3 / 4)


def test_a_resumed_run_goes_on_counting_steps_whose_reward_failed_on_every_sample(tmp_path, tiny_model_dir,
                                                                                   arithmetic_files):
    """reward.max_failing_steps counts steps in a row across a resume: one failed step before the checkpoint and one
    after it stop a run whose limit is 2, as they would have without the interruption."""
    train, _ = arithmetic_files
    failing = "def score(prompt, completion, answer, **meta):\n    raise RuntimeError('reward server down')\n"
    with importable_module(tmp_path, "down_reward", failing):
        config = load_config(make_config(tiny_model_dir, train, None, checkpoint={"every": 1},
                                         reward={"name": "down_reward:score", "max_failing_steps": 2}))
        trainer = Trainer(config, run_dir=tmp_path / "run")
        try:
            assert trainer.train_step()["reward/error_frac"] == 1.0 and trainer.consecutive_failed_rewards == 1
            trainer.save()
        finally:
            trainer.close()
        resumed = Trainer(config, run_dir=tmp_path / "run", resume=True)
        try:
            assert resumed.consecutive_failed_rewards == 1
            with pytest.raises(TrainingStopped, match=r"the reward failed \(raised, or gave no number\) on every sample of 2 steps in a row \(up to step 2\)"):
                resumed.train_step()
        finally:
            resumed.close()


def test_skipped_total_counts_the_whole_run(tmp_path, tiny_model_dir, arithmetic_files, parity, monkeypatch,
                                            trainer_for):
    """train/skipped_total is the run's running count of skipped updates, not this step's."""
    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, reward={"name": parity},
                          optim={"steps": 5, "lr": 1e-3, "max_consecutive_nonfinite": 5})
    monkeypatch.setattr(trainer, "objective", NaNLoss(trainer.objective))
    first, second = trainer.train_step(), trainer.train_step()
    assert first["train/skipped_total"] == 1 and second["train/skipped_total"] == 2
    assert second["train/skipped_updates"] == 1


def test_a_resumed_run_goes_on_counting_skipped_and_non_finite_steps(tmp_path, tiny_model_dir, arithmetic_files, parity,
                                                                    monkeypatch):
    """The run's counts (skipped updates, non-finite steps in a row) and the weights' norm at its start come back
    from the checkpoint, so that a resume neither forgets nor restarts them."""
    train, _ = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, None, reward={"name": parity}, checkpoint={"every": 1},
                                     optim={"steps": 5, "lr": 1e-3, "max_consecutive_nonfinite": 2}))
    trainer = Trainer(config, run_dir=tmp_path / "run")
    trainer.train_step()
    monkeypatch.setattr(trainer, "objective", NaNLoss(trainer.objective))
    trainer.train_step()
    trainer.save()
    trainer.close()
    resumed = Trainer(config, run_dir=tmp_path / "run", resume=True)
    try:
        assert (resumed.step, resumed.skipped_steps, resumed.consecutive_nonfinite) == (2, 1, 1)
        assert resumed.weight_norm_at_start == trainer.weight_norm_at_start != resumed.weight_norm
        monkeypatch.setattr(resumed, "objective", NaNLoss(resumed.objective))
        with pytest.raises(TrainingStopped, match=r"2 steps in a row \(steps 2-3\)"):
            resumed.train_step()
        assert resumed.skipped_steps == 2
    finally:
        resumed.close()


def test_token_counts_average_over_the_updates_applied(tmp_path, tiny_model_dir, arithmetic_files, parity,
                                                       monkeypatch, trainer_for):
    """With 2 mini-batches and the second update skipped, tokens/valid is the applied update's count (mean over the
    ONE applied update), not half of it."""
    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, reward={"name": parity},
                          optim={"steps": 3, "lr": 1e-3, "mini_batches": 2, "max_consecutive_nonfinite": 5})
    monkeypatch.setattr(trainer, "objective", NaNLoss(trainer.objective, calls={1}))
    rows = []
    original = trainer.token_stats

    def spy(model, rollouts, r, **kw):
        if torch.is_grad_enabled() and model is trainer.model:
            rows.append((r.clone(), rollouts.response_mask))
        return original(model, rollouts, r, **kw)

    monkeypatch.setattr(trainer, "token_stats", spy)
    metrics = trainer.train_step()
    assert metrics["train/updates"] == 1 and metrics["train/skipped_updates"] == 1
    first_rows, mask = rows[0]
    assert metrics["tokens/valid"] == int(mask[first_rows].sum())


# ------------------------------------------------------------------------------------------ updates
def test_every_mini_batch_starts_from_zero_gradients_on_rows_in_a_random_order(tmp_path, tiny_model_dir, arithmetic_files,
                                                                              parity, monkeypatch, trainer_for):
    """Each mini-batch's update uses its own gradient (none is left on the weights when its backward starts), and, as
    in PPO, each epoch's mini-batches draw their rows in a random order, not as contiguous groups in sampling order."""
    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, reward={"name": parity},
                          optim={"steps": 2, "lr": 1e-3, "mini_batches": 2, "epochs": 2})
    leftovers, seen = [], []
    original = trainer.token_stats

    def spy(model, rollouts, rows, **kw):
        if torch.is_grad_enabled() and model is trainer.model:
            leftovers.append(sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None))
            seen.append(rows.tolist())
        return original(model, rollouts, rows, **kw)

    monkeypatch.setattr(trainer, "token_stats", spy)
    metrics = trainer.train_step()
    assert metrics["train/updates"] == 4 and leftovers == [0.0] * 4
    assert any(rows != list(range(rows[0], rows[0] + len(rows))) for rows in seen)


@pytest.mark.parametrize("optim", [{"mini_batches": 2}, {"epochs": 2}], ids=["two-mini-batches", "two-epochs"])
def test_later_updates_take_the_sampling_policy_as_old(tmp_path, tiny_model_dir, arithmetic_files, parity,
                                                       monkeypatch, optim, trainer_for):
    """After the first update the old log-probs are those of the sampling-time policy, not the current one: the
    ratio of a later update differs from 1."""
    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, reward={"name": parity}, optim={"steps": 2, "lr": 1e-2, **optim})
    recording = Recording(trainer.objective)
    monkeypatch.setattr(trainer, "objective", recording)
    trainer.train_step()
    assert len(recording.calls) == 2
    old, new = recording.calls[0]
    assert torch.allclose(old, new, atol=1e-5)  # the first update: the policy that sampled
    old, new = recording.calls[1]
    assert float((old - new).abs().max()) > 1e-4  # the second: the weights moved since


# ------------------------------------------------------------------------------------------ clipping and prediction
def test_the_predicted_change_is_that_of_the_clipped_update(tmp_path, tiny_model_dir, arithmetic_files, parity,
                                                            trainer_for):
    """The predicted entropy change is that of the update applied: unchanged by a clip threshold that is not reached,
    scaled by grad_clip / grad_norm when it is."""
    train, _ = arithmetic_files
    sums = {}
    for clip in (None, 1e6, 1e-4):
        trainer = trainer_for(tmp_path, tiny_model_dir, train, run=f"run-{clip}", reward={"name": parity},
                              optim={"steps": 2, "lr": 1e-3, "grad_clip": clip})
        metrics = trainer.train_step()
        sums[clip] = (metrics["entropy/predicted_delta_sum"], metrics["train/grad_norm"])
        trainer.close()
    free, norm = sums[None]
    assert free != 0.0 and norm > 1e-4
    assert sums[1e6][0] == pytest.approx(free, rel=1e-6)
    assert sums[1e-4][0] == pytest.approx(free * 1e-4 / norm, rel=1e-3)


def test_grad_norm_is_the_mean_over_the_updates(tmp_path, tiny_model_dir, arithmetic_files, parity, monkeypatch,
                                                trainer_for):
    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, reward={"name": parity},
                          optim={"steps": 2, "lr": 1e-2, "mini_batches": 4})
    norms = []
    original = trainer._clip_gradients

    def spy():
        result = original()
        norms.append(result[0])
        return result

    monkeypatch.setattr(trainer, "_clip_gradients", spy)
    metrics = trainer.train_step()
    assert len(norms) == 4 and max(norms) > min(norms) * 1.001
    assert metrics["train/grad_norm"] == pytest.approx(sum(norms) / 4, rel=1e-9)


# ------------------------------------------------------------------------------------------ metrics on the right mask
def keep_what_collect_returns(trainer, monkeypatch) -> list:
    """The list that each later ``trainer.collect()`` appends its scored rollouts to."""
    collected = []
    original = trainer.collect
    monkeypatch.setattr(trainer, "collect", lambda: collected.append(original()) or collected[-1])
    return collected


def test_kl_and_covariance_are_over_the_trained_tokens(tmp_path, tiny_model_dir, arithmetic_files, parity,
                                                             monkeypatch, trainer_for):
    """With rollout.mask_truncated, kl/ref_k1 and cov/* are statistics of the trained tokens (mask), not of every
    sampled one."""
    from entrorl.trainer.diagnostics import covariance_summary

    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, reward={"name": parity},
                          method={"method": "grpo+kl_ref", "params": {"kl_loss_coef": 0.1}},
                          rollout={"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 40, "mask_truncated": True},
                          optim={"steps": 3, "lr": 1e-2})
    trainer.train_step()  # moves the policy away from the reference
    snapshot = copy.deepcopy(trainer.model)
    collected = keep_what_collect_returns(trainer, monkeypatch)
    metrics = trainer.train_step()
    scored = collected[0]
    rollouts = scored.rollouts
    assert 0 < float(rollouts.truncated.float().mean()) < 1
    rows = torch.arange(len(rollouts))
    with torch.no_grad():
        logprob = trainer.token_stats(snapshot, rollouts, rows, need=("logprob",)).logprob.float()
        reference = trainer.token_stats(trainer.reference, rollouts, rows, need=("logprob",)).logprob.float()
    mask = rollouts.response_mask & ~rollouts.truncated[:, None]
    valid = rollouts.response_mask
    expected = float((logprob - reference)[mask].mean())
    assert abs(expected - float((logprob - reference)[valid].mean())) > 1e-4  # the two masks tell apart
    assert metrics["kl/ref_k1"] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    token_advantages = scored.advantages[:, None].expand_as(mask) * mask
    cov = covariance_summary(logprob, token_advantages, mask)
    wrong = covariance_summary(logprob, token_advantages, valid)
    key = next(k for k in cov if cov[k] != pytest.approx(wrong[k], rel=1e-3))
    assert metrics[key] == pytest.approx(cov[key], rel=1e-3, abs=1e-7)


# ------------------------------------------------------------------------------------------ checkpoints
def test_a_checkpoint_restores_every_generator():
    """A checkpoint's RNG state puts back torch's, numpy's and Python's generators, each."""
    from entrorl.trainer.checkpoint import capture_rng_state, restore_rng_state

    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = capture_rng_state()
    expected = (torch.rand(3).tolist(), np.random.random(3).tolist(), [random.random() for _ in range(3)])
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    restore_rng_state(state)
    assert (torch.rand(3).tolist(), np.random.random(3).tolist(), [random.random() for _ in range(3)]) == expected


def resumable_config(tiny_model_dir, train, parity, **optim):
    """Four steps that move everything a checkpoint holds: rewards that vary (so AdamW's moments move), shuffled
    prompts, two mini-batches in a random order, a warm-up then a linear decay, the adaptive entropy coefficient."""
    method = {"method": "adaptive_entropy", "params": {"target_entropy": 10.0, "delta": 0.001, "max_coeff": 0.01}}
    return load_config(make_config(tiny_model_dir, train, None, method=method, reward={"name": parity},
                                   optim={"steps": 4, "lr": 1e-2, "mini_batches": 2, "warmup_steps": 2,
                                          "lr_schedule": "linear", **optim},
                                   checkpoint={"every": 2, "keep": 2}))


def train_until_killed(config, run_dir, *, saved_at: int, killed_after: int) -> None:
    """A run that checkpointed step ``saved_at``, logged steps up to ``killed_after`` and was then killed (its lock
    let go, nothing else written)."""
    trainer = Trainer(config, run_dir=run_dir)
    try:
        while trainer.step < killed_after:
            trainer.logger.log(trainer.step + 1, trainer.train_step())
            if trainer.step == saved_at:
                trainer.save()
    finally:
        trainer.close()


def test_a_resumed_run_logs_exactly_the_metrics_of_the_uninterrupted_run(tmp_path, tiny_model_dir, arithmetic_files,
                                                                         parity):
    """Killed after step 3 with step 2 checkpointed, then resumed: on the CPU with the same seed every step's metrics
    equal those of a run that never stopped, since the checkpoint gives back the data position, every generator, the
    optimizer's moments, the schedule's place and the adaptive entropy coefficient."""
    train, _ = arithmetic_files
    config = resumable_config(tiny_model_dir, train, parity)
    Trainer(config, run_dir=tmp_path / "straight").train()
    straight = comparable(read_metrics(tmp_path / "straight"))
    assert len({record["reward/mean"] for record in straight}) > 1 and all(r["train/updates"] == 2 for r in straight)
    assert len({record["reg/adaptive_entropy_next_coeff"] for record in straight}) == 4

    train_until_killed(config, tmp_path / "killed", saved_at=2, killed_after=3)
    assert [record["step"] for record in read_metrics(tmp_path / "killed")] == [1, 2, 3]
    Trainer(config, run_dir=tmp_path / "killed", resume=True).train()
    assert comparable(read_metrics(tmp_path / "killed")) == straight


def test_a_resumed_run_takes_the_betas_and_eps_of_its_own_configuration(tmp_path, tiny_model_dir, arithmetic_files,
                                                                        parity):
    """AdamW's moments come from the checkpoint, its betas and eps from the resumed run's configuration, as its
    learning rate and weight decay do."""
    train, _ = arithmetic_files
    config = resumable_config(tiny_model_dir, train, parity)
    train_until_killed(config, tmp_path / "run", saved_at=1, killed_after=1)
    changed = resumable_config(tiny_model_dir, train, parity, betas=[0.8, 0.9], eps=1e-6)
    resumed = Trainer(changed, run_dir=tmp_path / "run", resume=True)
    try:
        assert {key for key, _, _ in resumed.resume_changes} == {"optim.betas", "optim.eps"}
        assert [(tuple(group["betas"]), group["eps"]) for group in resumed.optimizer.param_groups] == [((0.8, 0.9), 1e-6)]
        assert all(state["step"] == 2 for state in resumed.optimizer.state.values())  # the moments of two updates
    finally:
        resumed.close()


def test_checkpoint_keep_keeps_exactly_that_many(tmp_path, tiny_model_dir, arithmetic_files, trainer_for):
    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, optim={"steps": 9, "lr": 1e-3}, checkpoint={"every": 1, "keep": 2})
    for step in (1, 2, 3, 4):
        trainer.step = step
        trainer.save()
    trainer.close()
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert kept == ["step_000003", "step_000004"]


@pytest.fixture(scope="module")
def tiny_policy(tiny_model_dir):
    """The tiny model and its tokenizer, loaded once, for writing checkpoints without a trainer."""
    from entrorl.modeling import load_causal_lm, load_tokenizer

    return load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)


def write_checkpoint(run_dir, step, tiny_policy, keep):
    from entrorl.trainer.checkpoint import save_checkpoint

    model, tokenizer = tiny_policy
    run_dir.mkdir(exist_ok=True)
    return save_checkpoint(run_dir, step, model=model, tokenizer=tokenizer, trainer_state={"step": step}, keep=keep)


def made_checkpoint(root, name, files=None, listed=None):
    """``root/name`` holding ``files`` (path: bytes) and a files.json listing them at their sizes, or ``listed``."""
    checkpoint = root / name
    checkpoint.mkdir(parents=True)
    for path, data in (files or {}).items():
        (checkpoint / path).parent.mkdir(parents=True, exist_ok=True)
        (checkpoint / path).write_bytes(data)
    sizes = {path: len(data) for path, data in (files or {}).items()}
    (checkpoint / "files.json").write_text(listed if listed is not None else json.dumps({"files": sizes}))
    return checkpoint


def test_pruning_counts_complete_checkpoints_only_and_never_removes_the_one_just_written(tmp_path, tiny_policy):
    """Leftovers that lost a file do not count towards ``keep`` (they would push out a checkpoint to keep), and the
    checkpoint just written stays even when a later step's is there."""
    from entrorl.trainer.checkpoint import latest_checkpoint

    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    for name in ("step_000005", "step_000006"):  # an earlier run's, each without its trainer state
        made_checkpoint(root, name, listed=json.dumps({"files": {"trainer.pt": 10}}))
    write_checkpoint(run_dir, 1, tiny_policy, keep=2)
    write_checkpoint(run_dir, 2, tiny_policy, keep=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000001", "step_000002", "step_000005", "step_000006"]
    assert latest_checkpoint(run_dir) == root / "step_000002"

    later = tmp_path / "later"
    made_checkpoint(later / "checkpoints", "step_000003")
    written = write_checkpoint(later, 2, tiny_policy, keep=1)
    assert written.is_dir() and sorted(p.name for p in (later / "checkpoints").glob("step_*")) == ["step_000002", "step_000003"]


@pytest.mark.parametrize("umask", [0o002, 0o022, 0o077])
def test_every_file_of_a_checkpoint_and_of_a_tiny_model_has_the_modes_the_umask_gives(tmp_path, tiny_policy, umask):
    """safetensors writes weight files 0600 whatever the umask: a teammate whom a group-shared project (umask 002)
    lets read a run's metrics could not load its checkpoints, nor a shared laboratory cache's model."""
    from entrorl.lab.tiny_model import save_tiny_model

    previous = os.umask(umask)
    try:
        checkpoint = write_checkpoint(tmp_path / "run", 1, tiny_policy, keep=1)
        tiny = save_tiny_model(tmp_path / "tiny", hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
    finally:
        os.umask(previous)
    for folder in (checkpoint, tiny):
        modes = {str(path.relative_to(folder)): stat.S_IMODE(path.stat().st_mode) for path in folder.rglob("*")
                 if path.is_file()}
        assert "model/model.safetensors" in modes or "model.safetensors" in modes
        assert modes == dict.fromkeys(modes, 0o666 & ~umask)


def test_a_checkpoint_that_cannot_be_pruned_stays_and_the_save_that_wrote_the_new_one_succeeds(tmp_path, tiny_policy,
                                                                                                monkeypatch, caplog):
    """Removing an old checkpoint fails (EBUSY: a mount point; EACCES): the new checkpoint and ``latest`` are already
    in place, so the save succeeds and says which folder stays; the next save that can prune it does."""
    from entrorl.trainer import checkpoint

    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    write_checkpoint(run_dir, 1, tiny_policy, keep=1)
    replace = os.replace

    def busy(source, target):
        if ".removed.tmp-" in str(target):
            raise OSError(errno.EBUSY, "Device or resource busy", str(source), None, str(target))
        replace(source, target)

    with monkeypatch.context() as patched, caplog.at_level(logging.WARNING, logger=checkpoint.__name__):
        patched.setattr(checkpoint.os, "replace", busy)
        assert write_checkpoint(run_dir, 2, tiny_policy, keep=1) == root / "step_000002"
    assert f"could not remove {root / 'step_000001'}, a checkpoint older than the 1 kept" in caplog.text
    assert checkpoint.latest_checkpoint(run_dir) == root / "step_000002"
    assert sorted(path.name for path in root.glob("step_*")) == ["step_000001", "step_000002"]
    write_checkpoint(run_dir, 3, tiny_policy, keep=1)
    assert sorted(path.name for path in root.iterdir()) == ["latest", "step_000003"]


def test_a_checkpoint_whose_pruning_is_cut_short_is_gone_from_the_checkpoints_and_removed_by_the_next_save(
        tmp_path, tiny_policy, monkeypatch):
    """A kill while an old checkpoint is deleted (here: the deletion stops after one file) leaves no half-deleted
    ``step_*`` folder, which no pruning would count or remove: the checkpoint was renamed to a temporary name first,
    and the next save removes that."""
    from entrorl.trainer import checkpoint

    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    write_checkpoint(run_dir, 1, tiny_policy, keep=2)
    write_checkpoint(run_dir, 2, tiny_policy, keep=2)
    real_rmtree = shutil.rmtree

    def dies_after_one_file(path, *args, **kwargs):
        path = Path(path)
        if "step_000001" in path.name and path.is_dir():
            next(file for file in path.rglob("*") if file.is_file()).unlink()
            raise KeyboardInterrupt  # the process ends here
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", dies_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(run_dir, 3, tiny_policy, keep=2)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    assert sorted(path.name for path in root.glob("step_*")) == ["step_000002", "step_000003"]
    write_checkpoint(run_dir, 4, tiny_policy, keep=2)
    assert sorted(path.name for path in root.iterdir()) == ["latest", "step_000003", "step_000004"]


def test_a_step_written_again_replaces_its_earlier_checkpoint(tmp_path, tiny_policy):
    """A resumed run writes again the steps a killed run had checkpointed after the one it resumed from (an incomplete
    one, say): the new checkpoint takes the place of the old folder, whatever is left of it."""
    from entrorl.trainer.checkpoint import latest_checkpoint

    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    write_checkpoint(run_dir, 1, tiny_policy, keep=3)
    write_checkpoint(run_dir, 2, tiny_policy, keep=3)
    (root / "step_000002" / "model" / "model.safetensors").unlink()
    (root / "step_000002" / "left-over").write_text("from the killed run")
    assert latest_checkpoint(run_dir) == root / "step_000001"
    assert write_checkpoint(run_dir, 2, tiny_policy, keep=3) == root / "step_000002"
    assert latest_checkpoint(run_dir) == root / "step_000002" and not (root / "step_000002" / "left-over").exists()


def test_latest_names_a_checkpoint_once_it_is_in_place_and_old_ones_go_only_after(tmp_path, tiny_policy, monkeypatch):
    """A failed rename of the new checkpoint leaves ``latest`` naming the previous one; a failed write of ``latest``
    prunes nothing."""
    from entrorl.trainer import checkpoint

    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    write_checkpoint(run_dir, 1, tiny_policy, keep=1)
    replace = os.replace

    def refuse_directories(source, target):
        if Path(source).is_dir():
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(source))
        replace(source, target)

    with monkeypatch.context() as patched:
        patched.setattr(checkpoint.os, "replace", refuse_directories)
        with pytest.raises(OSError, match="cross-device"):
            write_checkpoint(run_dir, 2, tiny_policy, keep=1)
    assert (root / "latest").read_text() == "step_000001\n"
    assert checkpoint.latest_checkpoint(run_dir) == root / "step_000001"

    def full_disk(path, text, **options):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "atomic_write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_checkpoint(run_dir, 3, tiny_policy, keep=1)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000001", "step_000003"]
    assert checkpoint.latest_checkpoint(run_dir) == root / "step_000003"


def test_every_file_of_a_checkpoint_and_its_pointer_are_synced_to_disk(tmp_path, tiny_policy, monkeypatch):
    """A machine that loses power after the rename must not find empty files: every file (files.json included),
    every folder, the checkpoints folder and ``latest`` went through fsync."""
    synced = set()
    fsync = os.fsync

    def recording(descriptor):
        synced.add(os.fstat(descriptor).st_ino)
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording)
    checkpoint = write_checkpoint(tmp_path / "run", 1, tiny_policy, keep=1)
    root = checkpoint.parent
    unsynced = [path for path in (root, root / "latest", checkpoint, *checkpoint.rglob("*")) if path.stat().st_ino not in synced]
    assert unsynced == [] and (checkpoint / "files.json").is_file()


def test_the_full_disk_note_counts_every_weight_a_checkpoint_writes(tmp_path, monkeypatch):
    """A frozen weight is written too (only the trained ones have optimizer state): a model of frozen weights larger
    than the free room gets the note."""
    import collections

    from entrorl.trainer import checkpoint

    class FrozenModel(torch.nn.Linear):
        def save_pretrained(self, directory):
            raise RuntimeError("unexpected pos 100 vs 90")

    model = FrozenModel(64, 64).requires_grad_(False)  # 16.25 KiB of float32 weights
    (tmp_path / "run").mkdir()
    monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                        lambda path: collections.namedtuple("usage", "total used free")(10**9, 10**9 - 2**13, 2**13))
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"probably a full disk: 0.0 MiB free there"):
        checkpoint.save_checkpoint(tmp_path / "run", 1, model=model, tokenizer=None, trainer_state={}, keep=1)


@pytest.mark.parametrize(("trained_in_bfloat16", "needed"), [(False, 16_640), (True, 58_240)])
def test_the_full_disk_note_is_given_exactly_when_the_free_room_is_below_what_the_checkpoint_takes(
        tmp_path, monkeypatch, trained_in_bfloat16, needed):
    """A frozen float32 Linear(64, 64) takes (64 * 64 + 64) * 4 = 16,640 bytes; a trained bfloat16 one writes its 2-byte
    weights and an optimizer state of AdamW's two float32 moments and a float32 master copy, 14 bytes a weight:
    58,240. That much room free gets no guess of a full disk, one byte less does."""
    import collections

    from entrorl.trainer import checkpoint

    class UnwritableModel(torch.nn.Linear):
        def save_pretrained(self, directory):
            raise RuntimeError("unexpected pos 100 vs 90")

    model = UnwritableModel(64, 64).to(torch.bfloat16) if trained_in_bfloat16 else UnwritableModel(64, 64).requires_grad_(False)
    (tmp_path / "run").mkdir()
    for free, noted in ((needed, False), (needed - 1, True)):
        monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                            lambda path, free=free: collections.namedtuple("usage", "total used free")(10**9, 10**9 - free, free))
        with pytest.raises(checkpoint.CheckpointWriteError) as failed:
            checkpoint.save_checkpoint(tmp_path / "run", 1, model=model, tokenizer=None, trainer_state={}, keep=1)
        assert ("probably a full disk" in str(failed.value)) is noted


def test_a_checkpoint_larger_than_the_file_size_limit_is_said_to_be(tmp_path):
    """`ulimit -f` below a checkpoint's trainer state: the save failed with torch's zip writer's "unexpected pos ...",
    which says nothing of the limit (Python ignores SIGXFSZ, so the write gets EFBIG)."""
    script = textwrap.dedent("""
        import resource, sys, torch
        from pathlib import Path
        from entrorl.trainer import checkpoint
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))
        model = torch.nn.Linear(64, 64)  # weights of 16,640 bytes, AdamW's moments 33,280: the state's 80,000 is over
        model.save_pretrained = lambda directory, **options: None
        tokenizer = type("Tokenizer", (), {"save_pretrained": lambda self, directory: None})()
        state = {"optimizer": [torch.zeros(20_000)]}
    """)
    said = _the_error_of_a_checkpoint_saved_in_a_process(tmp_path, script)
    assert ("probably the process's file-size limit (RLIMIT_FSIZE, `ulimit -f`): files of at most 0.04 MiB, which "
            "trainer.pt reached; raise the limit; no checkpoint was written before") in said


def test_a_full_disk_under_a_file_size_limit_every_file_fits_is_not_blamed_on_the_limit(tmp_path):
    """The note compared the limit with an estimate of the largest file (12 bytes a bfloat16 weight for AdamW's state,
    which takes 4), blamed the limit for a full disk, and never looked at the disk."""
    script = textwrap.dedent("""
        import errno, resource, sys, torch
        from pathlib import Path
        from entrorl.trainer import checkpoint
        model = torch.nn.Linear(256, 256).to(torch.bfloat16)
        optimizer = torch.optim.AdamW(model.parameters())
        model(torch.zeros(1, 256, dtype=torch.bfloat16)).sum().backward()
        optimizer.step()
        state = {"optimizer": optimizer.state_dict()}  # about 263 kB of bfloat16 moments
        resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, resource.RLIM_INFINITY))  # every file written fits
        model.save_pretrained = lambda directory, **options: None
        def full(self, directory):
            raise OSError(errno.ENOSPC, "No space left on device")
        tokenizer = type("Tokenizer", (), {"save_pretrained": full})()
    """)
    said = _the_error_of_a_checkpoint_saved_in_a_process(tmp_path, script)
    assert "No space left on device" in said and "file-size limit" not in said, said


def _the_error_of_a_checkpoint_saved_in_a_process(tmp_path, setting_up: str) -> str:
    """The CheckpointWriteError of save_checkpoint(model, tokenizer, state) after ``setting_up`` (Python code that
    makes them, and sets the limits) in a process of its own."""
    script = setting_up + textwrap.dedent("""
        try:
            checkpoint.save_checkpoint(Path(sys.argv[1]), 1, model=model, tokenizer=tokenizer, trainer_state=state, keep=1)
        except checkpoint.CheckpointWriteError as error:
            print(error)
    """)
    (tmp_path / "run").mkdir()
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_checkpoints_are_ordered_by_step_number_not_by_name(tmp_path):
    """Folders of steps with more digits than the padding (or written without it) are compared as numbers: step 10
    comes after step 9."""
    from entrorl.trainer.checkpoint import incomplete_checkpoints, latest_checkpoint

    root = tmp_path / "checkpoints"
    for name in ("step_1", "step_9", "step_10"):
        made_checkpoint(root, name)
    assert latest_checkpoint(tmp_path) == root / "step_10"
    assert latest_checkpoint(tmp_path, before_step=10) == root / "step_9"
    assert latest_checkpoint(tmp_path, before_step=9) == root / "step_1"
    assert latest_checkpoint(tmp_path, before_step=1) is None
    made_checkpoint(root, "step_20", listed="{")
    made_checkpoint(root, "step_3", listed="{")
    assert [path.name for path, _ in incomplete_checkpoints(tmp_path)] == ["step_3", "step_20"]


def test_a_checkpoint_is_complete_while_its_files_keep_their_written_sizes(tmp_path):
    """Empty as written is whole; a weight or state file of another size is not, larger or smaller; text files a user
    may edit (JSON, .txt, a .jinja chat template, a .md model card) only have to be there and not empty; a files.json that cannot be
    read makes the checkpoint incomplete, however it is wrong."""
    from entrorl.trainer.checkpoint import incomplete_checkpoints

    files = {"trainer.pt": b"state", "model/model.safetensors": b"weights", "model/added.txt": b"",
             "model/merges.txt": b"a b\n", "model/chat_template.jinja": b"{{ x }}", "adapter/README.md": b"# card\n"}
    whole = made_checkpoint(tmp_path / "checkpoints", "step_000001", files)
    (whole / "model" / "merges.txt").write_text("a b\nc d\n")
    (whole / "model" / "chat_template.jinja").write_text("{{ messages }}")
    (whole / "adapter" / "README.md").write_text("# card\n\nTrained on arithmetic.\n")
    grown = made_checkpoint(tmp_path / "checkpoints", "step_000002", files)
    (grown / "trainer.pt").write_bytes(b"state and more")
    for step, listing in enumerate(("{", "[]", '{"files": []}', '{"files": {"trainer.pt": "many"}}'), start=3):
        made_checkpoint(tmp_path / "checkpoints", f"step_{step:06d}", listed=listing)
    assert [(path.name, wrong) for path, wrong in incomplete_checkpoints(tmp_path)] == [
        ("step_000002", "trainer.pt has 14 bytes instead of the 5 written"),
        *((f"step_{step:06d}", "files.json cannot be read") for step in range(3, 7))]


def test_a_checkpoint_from_before_files_json_needs_its_weights_whole(tmp_path):
    """Without files.json: no weight file at all, or a sharded model with an empty shard, is incomplete; a checkpoint
    with adapters needs them whole, and may hold no merged weights."""
    from entrorl.trainer.checkpoint import incomplete_checkpoints

    def legacy(name, files):
        checkpoint = tmp_path / "checkpoints" / name
        for path, data in {"trainer.pt": b"state", "model/config.json": b"{}", **files}.items():
            (checkpoint / path).parent.mkdir(parents=True, exist_ok=True)
            (checkpoint / path).write_bytes(data)

    index = json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}).encode()
    legacy("step_000001", {})
    legacy("step_000002", {"model/model.safetensors.index.json": index, "model/model-1.safetensors": b"w",
                           "model/model-2.safetensors": b""})
    legacy("step_000003", {"model/model.safetensors.index.json": index, "model/model-1.safetensors": b"w",
                           "model/model-2.safetensors": b"w"})
    legacy("step_000004", {"adapter/adapter_config.json": b"{}", "adapter/adapter_model.safetensors": b""})
    legacy("step_000005", {"adapter/adapter_config.json": b"{}", "adapter/adapter_model.safetensors": b"a"})
    assert [(path.name, wrong) for path, wrong in incomplete_checkpoints(tmp_path)] == [
        ("step_000001", "the model's weights: missing or empty"), ("step_000002", "the model's weights: missing or empty"),
        ("step_000004", "the adapters' files: missing or empty")]


def test_a_trainer_state_damaged_inside_is_named_with_the_way_on(tmp_path):
    """A trainer.pt whose pickled state is damaged at its written size (the zip around it intact) is a ValueError
    naming the file and the checkpoint to delete, not a bare unpickling error."""
    from entrorl.trainer.checkpoint import load_trainer_state

    checkpoint = tmp_path / "step_000003"
    checkpoint.mkdir()
    torch.save({"step": 3}, checkpoint / "trainer.pt")
    data = bytearray((checkpoint / "trainer.pt").read_bytes())
    start = data.find(b"\x80\x02")  # the pickle's protocol mark
    data[start:start + 2] = b"\xff\xff"
    (checkpoint / "trainer.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"step_000003/trainer.pt cannot be read \(Unsupported operand 255\); delete "
                                         r"step_000003 to resume from the checkpoint before it"):
        load_trainer_state(checkpoint)


_RAN: list[str] = []


def _record_that_it_ran(what: str) -> None:
    _RAN.append(what)


class _RunsCodeWhenLoaded:
    """An object whose unpickling calls a function: what a file from elsewhere could make a pickle loader run."""

    def __reduce__(self):
        return (_record_that_it_ran, ("ran",))


class _PartState:
    """A type a part of one's own might keep in its state."""

    def __init__(self, value=0):
        self.value = value


def test_a_trainer_state_is_read_without_running_code_from_the_file(tmp_path):
    """trainer.pt is read with torch's weights-only loader: an object whose unpickling would call a function is refused
    naming its type, and the function does not run; what entrorl's checkpoints hold loads (numpy's generator state, numpy
    scalars, the TorchVersion string of older checkpoints); a type of one's own loads once allowed with
    torch.serialization.add_safe_globals."""
    import random

    import numpy as np

    from entrorl.trainer.checkpoint import load_trainer_state

    checkpoint = tmp_path / "step_000003"
    checkpoint.mkdir()
    torch.save({"step": 3, "payload": _RunsCodeWhenLoaded()}, checkpoint / "trainer.pt")
    with pytest.raises(ValueError, match=r"trainer.pt holds an object of type \S*_record_that_it_ran, which entrorl does "
                                         r"not load from a checkpoint \(loading it could run code from the file\)"):
        load_trainer_state(checkpoint)
    assert _RAN == []

    saved = {"step": 3, "rng": {"numpy": np.random.get_state(), "python": random.getstate(), "torch": torch.get_rng_state()},
             "software": {"torch": torch.__version__}, "scalars": [np.float64(0.5), np.int64(2), np.float32(1.5)],
             "array": np.arange(3.0)}
    torch.save(saved, checkpoint / "trainer.pt")
    loaded = load_trainer_state(checkpoint)
    assert loaded["rng"]["numpy"][0] == "MT19937" and np.array_equal(loaded["rng"]["numpy"][1], saved["rng"]["numpy"][1])
    assert loaded["software"]["torch"] == torch.__version__ and loaded["scalars"] == [0.5, 2, 1.5]

    torch.save({"step": 3, "objective": {"part": _PartState(7)}}, checkpoint / "trainer.pt")
    with pytest.raises(ValueError, match=r"holds an object of type .*_PartState.*add_safe_globals.*configuration's "
                                         r"`imports`"):
        load_trainer_state(checkpoint)
    allowed_before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([_PartState])
    try:
        assert load_trainer_state(checkpoint)["objective"]["part"].value == 7
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(allowed_before)


def test_cuda_generators_of_another_device_count_are_left_alone(monkeypatch):
    """A checkpoint written on two GPUs, resumed on one: CUDA's generators cannot be put back one for one."""
    from entrorl.trainer.checkpoint import restore_rng_state

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "cuda": [torch.tensor([1], dtype=torch.uint8)] * 2}
    restore_rng_state(state)
    assert restored == []
    restore_rng_state({**state, "cuda": state["cuda"][:1]})
    assert restored == [state["cuda"][:1]]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weight_norm_is_the_l2_norm_of_every_trained_weight_summed_in_float32(tmp_path, tiny_model_dir, arithmetic_files,
                                                                           parity, trainer_for, dtype):
    """train/weight_norm: one L2 norm over all trained weights together (not a sum of per-tensor norms), accumulated in
    float32 whatever the weights' precision."""
    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, reward={"name": parity},
                          model={"path": str(tiny_model_dir), "dtype": dtype}, optim={"steps": 2, "lr": 1e-3})

    def norm() -> float:
        return math.sqrt(sum(float(p.detach().double().square().sum()) for p in trainer.model.parameters()
                             if p.requires_grad))

    assert (trainer.master is None) == (dtype == "float32")  # float32 copies only of weights narrower than float32
    assert trainer.weight_norm_at_start == pytest.approx(norm(), rel=1e-5)
    metrics = trainer.train_step()
    assert metrics["train/weight_norm"] == pytest.approx(norm(), rel=1e-5)
    assert metrics["train/weight_norm"] != trainer.weight_norm_at_start


@pytest.mark.parametrize(("fraction", "rows"), [(0.3, [0, 2, 5]), (0.01, [0]), (1.0, list(range(8)))])
def test_the_re_scored_rows_are_the_configured_share_rounded_up_and_evenly_spread(tmp_path, tiny_model_dir,
                                                                                 arithmetic_files, parity, monkeypatch,
                                                                                 trainer_for, fraction, rows):
    """diagnostics.measure_fraction of the step's 8 rows, at least one, every k-th row."""
    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, reward={"name": parity},
                          diagnostics={"measure_fraction": fraction}, optim={"steps": 2, "lr": 1e-3})
    re_scored = []
    original = trainer.token_stats

    def spy(model, rollouts, selected, need=None, **options):
        if need == ("entropy",) and not torch.is_grad_enabled():
            re_scored.append(selected.tolist())
        return original(model, rollouts, selected, **options) if need is None else original(model, rollouts, selected,
                                                                                          need=need, **options)

    monkeypatch.setattr(trainer, "token_stats", spy)
    trainer.train_step()
    assert re_scored == [rows]


# ------------------------------------------------------------------------------------------ collection
def test_zero_std_groups_is_the_share_of_groups_whose_rewards_are_all_equal(tmp_path, tiny_model_dir, arithmetic_files,
                                                                            parity, trainer_for):
    """reward/zero_std_groups counts the groups that teach nothing (README): three groups, so the share is never 1/2
    and cannot be mistaken for its complement."""
    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, reward={"name": parity}, rollout={"prompts_per_step": 3})
    scored = trainer.collect()
    by_group = scored.rewards.view(3, 4)
    all_equal = (by_group.max(1).values == by_group.min(1).values).float()
    assert scored.metrics["reward/zero_std_groups"] == pytest.approx(float(all_equal.mean()))
    assert scored.metrics["response/length_max"] == float(scored.rollouts.lengths.max())


# ------------------------------------------------------------------------------------------ precision
def test_master_weights_gradients_are_clipped(tmp_path, tiny_model_dir, arithmetic_files, parity, trainer_for):
    """A bfloat16 model with float32 master weights: the gradient norm is measured and clipped on the copies."""
    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, reward={"name": parity},
                          model={"path": str(tiny_model_dir), "dtype": "bfloat16", "master_weights": True},
                          optim={"steps": 2, "lr": 1e-5, "grad_clip": 1e-6})
    metrics = trainer.train_step()
    assert metrics["train/grad_norm"] > 1e-6
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(c.grad) for c in trainer.master.copies
                                                    if c.grad is not None]))
    assert float(clipped) <= 1.01e-6


SCALED_PARITY_REWARD = ("SCALE = 1.0\n"
                        "def score(prompt, completion, answer, **meta):\n"
                        "    return SCALE * float(sum(map(ord, completion)) % 2)\n")


@pytest.mark.parametrize("loss_scaling", [True, False])
def test_float16_gradients_too_small_for_it_survive_through_the_loss_scale(tmp_path, tiny_model_dir, arithmetic_files,
                                                                          trainer_for, loss_scaling):
    """With RLOO's advantages (R minus the others' mean: no division by a std) the gradient is linear in the rewards.
    Rewards 1e-6 times smaller put most of a float16 backward pass below its smallest number (6e-8): the gradient
    norm should be 1e-6 times the one of rewards 0/1 on the same rollouts. With the loss scale it is; without it the
    small gradients round to 0."""
    train, _ = arithmetic_files
    norms = {}
    for scale in (1.0, 1e-6):
        module = f"scaled_parity_{str(scale).replace('.', '_').replace('-', '_')}"
        with importable_module(tmp_path, module, SCALED_PARITY_REWARD.replace("SCALE = 1.0", f"SCALE = {scale!r}")):
            trainer = trainer_for(tmp_path, tiny_model_dir, train, run=f"run-{module}", reward={"name": f"{module}:score"},
                                  advantage={"name": "rloo"},
                                  model={"path": str(tiny_model_dir), "dtype": "float16", "loss_scaling": loss_scaling},
                                  optim={"steps": 1, "lr": 1e-5, "grad_clip": None})
            metrics = trainer.train_step()
        assert (trainer.loss_scale is not None) == loss_scaling
        assert ("train/loss_scale" in metrics) == loss_scaling
        norms[scale] = metrics["train/grad_norm"]
    assert norms[1.0] > 0
    ratio = norms[1e-6] / (1e-6 * norms[1.0])
    if loss_scaling:
        assert ratio == pytest.approx(1.0, rel=1e-2)
    else:  # what the loss scale is for
        assert ratio < 0.8


def test_float16_overflow_halves_the_loss_scale_and_is_not_a_broken_run(tmp_path, tiny_model_dir, arithmetic_files,
                                                                       parity, trainer_for):
    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, reward={"name": parity},
                          model={"path": str(tiny_model_dir), "dtype": "float16"},
                          optim={"steps": 3, "lr": 1e-5, "mini_batches": 2})
    assert trainer.loss_scale.scale == 2.0**16
    trainer.loss_scale.scale = 2.0**60  # float16's gradients overflow to inf
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.train_step()
    assert metrics["train/loss_scale_overflows"] == 2.0 and metrics["train/loss_scale"] == 2.0**58
    assert metrics["train/skipped_updates"] == 0.0 and metrics["train/updates"] == 0.0
    assert trainer.consecutive_nonfinite == 0 and trainer.skipped_steps == 0
    assert all(torch.equal(before, after) for before, after in zip(weights, trainer.model.parameters()))
    trainer.loss_scale.scale = 2.0**10
    metrics = trainer.train_step()
    assert metrics["train/updates"] == 2.0 and metrics["train/loss_scale_overflows"] == 0.0
    assert trainer.loss_scale.state_dict() == {"scale": 2.0**10, "good_updates": 2}
    path = trainer.save()
    resumed_state = torch.load(path / "trainer.pt", weights_only=False)
    assert resumed_state["loss_scale"] == {"scale": 2.0**10, "good_updates": 2}


def test_float16_first_order_entropy_gradient_is_loss_scaled_too(tmp_path, tiny_model_dir, arithmetic_files, parity,
                                                                 trainer_for):
    """diagnostics.first_order's own backward pass through a float16 model: each token's share of the mean entropy
    lies in float16's subnormal range, so the pass is scaled as the updates' are (without: 1.4% off its float32
    value on this model, 7% on the small entries)."""
    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, reward={"name": parity},
                          model={"path": str(tiny_model_dir), "dtype": "float16"},
                          rollout={"prompts_per_step": 4, "group_size": 8, "max_new_tokens": 12},
                          diagnostics={"first_order": True, "measure_fraction": 1.0})
    rollouts = trainer.collect().rollouts
    rows = torch.arange(len(rollouts))
    got = torch.cat([g.float().flatten() for g in trainer._entropy_gradient(rollouts, rows).gradient if g is not None])
    float32_model = copy.deepcopy(trainer.model).float()  # the same float16-valued weights
    trained = [p for p in float32_model.parameters() if p.requires_grad]
    entropy = trainer.token_stats(float32_model, rollouts, rows, need=("entropy",)).entropy
    mean_entropy = entropy[rollouts.response_mask].sum() / int(rollouts.response_mask.sum())
    wanted = torch.cat([g.flatten() for g in torch.autograd.grad(mean_entropy, trained, allow_unused=True) if g is not None])
    assert float((got - wanted).norm() / wanted.norm()) < 5e-3


def test_float16_first_order_pass_that_overflows_at_the_updates_scale_is_run_again_smaller(tmp_path, parity,
                                                                                        arithmetic_files, trainer_for):
    """A model whose outputs are not flat (embeddings scaled up): at a loss scale of 2^18, which a run reaches by itself
    after 4000 clean updates, the update's gradients fit float16 but the entropy's do not. The first-order pass halves
    its own scale until they do, and reports a finite change; the updates' scale stays."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from entrorl.lab.tiny_model import save_tiny_model

    source = save_tiny_model(tmp_path / "source", seed=0, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                             max_position_embeddings=64)
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(30.0 ** 0.5)
    model.save_pretrained(tmp_path / "peaked")
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path / "peaked")
    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tmp_path / "peaked", train, reward={"name": parity},
                          model={"path": str(tmp_path / "peaked"), "dtype": "float16"}, optim={"steps": 4, "lr": 1e-3},
                          diagnostics={"first_order": True})
    trainer.loss_scale.scale = 2.0**18
    metrics = trainer.train_step()
    assert metrics["train/updates"] == 1.0 and metrics["train/loss_scale_overflows"] == 0.0
    assert math.isfinite(metrics["entropy/measured_delta"]) and math.isfinite(metrics["entropy/first_order_delta"])
    assert trainer.loss_scale.scale == 2.0**18


def test_float16_first_order_pass_with_a_non_finite_forward_is_not_run_again(tmp_path, tiny_model_dir, arithmetic_files,
                                                                            parity, trainer_for):
    """A NaN weight makes the entropy itself NaN: no smaller scale mends that, so the pass is not repeated for every
    halving of the scale (17 passes at 2^16 before)."""
    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, reward={"name": parity},
                          model={"path": str(tiny_model_dir), "dtype": "float16"}, diagnostics={"first_order": True})
    rollouts = trainer.collect().rollouts
    with torch.no_grad():
        dict(trainer.model.named_parameters())["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    passes = []
    scoring = trainer.token_stats
    trainer.token_stats = lambda *args, **kwargs: passes.append(1) or scoring(*args, **kwargs)
    trainer._entropy_gradient(rollouts, torch.arange(len(rollouts)))
    assert len(passes) == 1


def test_loss_scaling_outside_float16_is_said_to_have_no_effect(tiny_model_dir, arithmetic_files):
    train, _ = arithmetic_files
    for dtype in ("float32", "bfloat16"):
        with pytest.warns(UserWarning, match=f"model.loss_scaling has no effect with model.dtype = '{dtype}'"):
            load_config(make_config(tiny_model_dir, train, None, model={"path": str(tiny_model_dir), "dtype": dtype,
                                                                       "loss_scaling": False}))


def test_the_loss_scale_grows_after_clean_updates_and_never_falls_below_one():
    from entrorl.trainer.precision import LossScale

    scale = LossScale(initial=4.0, growth_interval=3)
    for _ in range(3):
        scale.update(overflowed=False)
    assert scale.scale == 8.0 and scale.good_updates == 0
    for _ in range(5):
        scale.update(overflowed=True)
    assert scale.scale == 1.0 and not scale.can_shrink()
    parameter = torch.nn.Parameter(torch.ones(3))
    parameter.grad = torch.full((3,), 6.0)
    LossScale(initial=2.0).unscale([parameter, torch.nn.Parameter(torch.ones(2))])
    assert parameter.grad.tolist() == [3.0, 3.0, 3.0]


def test_master_weights_sum_the_micro_batches_gradients_in_float32(tmp_path, tiny_model_dir, arithmetic_files, parity,
                                                                     trainer_for):
    """A bfloat16 model stepped in micro-batches of one row: each micro-batch's gradient moves to the float32 copies as
    soon as it is computed, so the update's gradient is their float32 sum, not a sum rounded to bfloat16 at every
    addition."""
    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, reward={"name": parity},
                          model={"path": str(tiny_model_dir), "dtype": "bfloat16", "master_weights": True},
                          optim={"steps": 2, "lr": 1e-5, "grad_clip": None, "micro_batch_size": 1})
    master, taken = trainer.master, []
    original = master.take_gradients

    def spy():
        taken.append([None if p.grad is None else p.grad.float().clone() for p in master.parameters])
        original()

    master.take_gradients = spy
    trainer.train_step()
    rows = trainer.config.rollout.prompts_per_step * trainer.config.rollout.group_size
    assert len(taken) == rows > 1
    for index, copy in enumerate(master.copies):
        gradients = [grads[index] for grads in taken if grads[index] is not None]
        expected = gradients[0].clone()
        for gradient in gradients[1:]:
            expected += gradient
        assert copy.grad.dtype == torch.float32 and torch.equal(copy.grad, expected)
    assert all(p.grad is None for p in master.parameters)


def test_master_weights_are_needed_for_trainable_low_precision_weights_only():
    from entrorl.trainer.precision import needs_master_weights

    for dtype, needed in ((torch.float32, False), (torch.float64, False), (torch.bfloat16, True), (torch.float16, True)):
        assert needs_master_weights(torch.nn.Linear(3, 2).to(dtype)) is needed, dtype
    frozen_base = torch.nn.Sequential(torch.nn.Linear(3, 2).to(torch.bfloat16).requires_grad_(False), torch.nn.Linear(2, 2))
    assert not needs_master_weights(frozen_base)  # float32 adapters on a frozen bfloat16 base


def test_master_weights_are_needed_when_any_trainable_weight_is_narrower_than_float32():
    from entrorl.trainer.precision import needs_master_weights

    mixed = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2).to(torch.bfloat16))
    assert needs_master_weights(mixed)
    mixed[1].requires_grad_(False)
    assert not needs_master_weights(mixed)


def test_master_weights_step_float32_copies_of_the_trainable_weights():
    """Copies of the trainable weights only; the gradients move to the copies in float32 (none left on the model);
    the saved state is the copies' float32 values, not the rounded weights; a state of another length or shape is
    refused without touching the copies."""
    from entrorl.trainer.precision import MasterWeights

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(torch.bfloat16)
    model[0].bias.requires_grad_(False)
    master = MasterWeights(model)
    assert [copy.shape for copy in master.copies] == [(3, 4), (2, 3), (2,)]
    assert all(copy.dtype == torch.float32 for copy in master.copies)
    model(torch.randn(5, 4, dtype=torch.bfloat16)).sum().backward()
    expected = [p.grad.float() for p in master.parameters]
    master.take_gradients()
    assert all(p.grad is None for p in model.parameters())
    for copy, gradient in zip(master.copies, expected):
        assert copy.grad.dtype == torch.float32 and torch.equal(copy.grad, gradient)
    model(torch.randn(5, 4, dtype=torch.bfloat16)).sum().backward()  # a second micro-batch: added in float32
    second = [p.grad.float() for p in master.parameters]
    master.take_gradients()
    for copy, first, then in zip(master.copies, expected, second):
        assert torch.equal(copy.grad, first + then)

    with torch.no_grad():
        for copy in master.copies:
            copy.add_(1e-4)  # below bfloat16's rounding step for most weights
    master.write_back()
    saved = master.state_dict()
    assert all(torch.equal(s, c) for s, c in zip(saved, master.copies))
    assert not all(torch.equal(s, p.float()) for s, p in zip(saved, master.parameters))
    for parameter, copy in zip(master.parameters, master.copies):
        assert torch.equal(parameter, copy.to(torch.bfloat16))

    kept = [c.clone() for c in master.copies]
    for wrong in (saved[:2], [saved[0], saved[1], torch.zeros(1)], [saved[0], saved[1].T, saved[2]]):
        with pytest.raises(ValueError, match="do not match"):
            master.load_state_dict(wrong)
        assert all(torch.equal(a, b) for a, b in zip(kept, master.copies))
    moved = [s.clone() + 1 for s in saved]
    master.load_state_dict(moved)
    assert all(torch.equal(c, m) for c, m in zip(master.copies, moved))


def test_master_weights_of_float32_parameters_are_copies_too():
    """A model mixing bfloat16 and float32 trainable weights: stepping the copies leaves every weight of the model as
    it was until write_back."""
    from entrorl.trainer.precision import MasterWeights

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3).to(torch.bfloat16), torch.nn.Linear(3, 2))
    before = [p.detach().clone() for p in model.parameters()]
    master = MasterWeights(model)
    with torch.no_grad():
        for copy in master.copies:
            copy.add_(0.5)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    master.write_back()
    assert all(torch.equal(p, (b.float() + 0.5).to(b.dtype)) for p, b in zip(model.parameters(), before))


def test_master_weights_keep_the_gradient_of_a_weight_left_out_of_a_later_micro_batch():
    """A weight that gets no gradient in the second micro-batch keeps the first micro-batch's on its copy."""
    from entrorl.trainer.precision import MasterWeights

    torch.manual_seed(0)
    first, second = torch.nn.Linear(3, 2).to(torch.bfloat16), torch.nn.Linear(3, 2).to(torch.bfloat16)
    model = torch.nn.ModuleList([first, second])
    master = MasterWeights(model)
    (first(torch.randn(4, 3, dtype=torch.bfloat16)).sum() + second(torch.randn(4, 3, dtype=torch.bfloat16)).sum()).backward()
    gradients = [p.grad.float().clone() for p in master.parameters]
    master.take_gradients()
    first(torch.randn(4, 3, dtype=torch.bfloat16)).sum().backward()  # the second layer is not used
    more = [p.grad.float().clone() for p in first.parameters()]
    master.take_gradients()
    assert torch.equal(master.copies[0].grad, gradients[0] + more[0]) and torch.equal(master.copies[1].grad, gradients[1] + more[1])
    assert torch.equal(master.copies[2].grad, gradients[2]) and torch.equal(master.copies[3].grad, gradients[3])


# ------------------------------------------------------------------------------------------ evaluation
FIRST_PROMPT_ONLY = ("def score(prompt, completion, answer, **meta):\n"
                     "    return 1.0 if prompt == {first!r} else 0.0\n")


def test_evaluation_groups_samples_by_prompt(tmp_path, tiny_model_dir, arithmetic_files, trainer_for):
    """A reward that only the first eval prompt's samples earn: 1 of 4 prompts solved by all of its samples."""
    train, held_out = arithmetic_files
    first = json.loads(held_out.read_text().splitlines()[0])["prompt"]
    with importable_module(tmp_path, "first_prompt_only", FIRST_PROMPT_ONLY.format(first=first)):
        trainer = trainer_for(tmp_path, tiny_model_dir, train, held_out=held_out,
                              reward={"name": "first_prompt_only:score"},
                              eval={"every": 0, "n": 3, "ks": [1, 3], "max_prompts": 4, "top_forks": 0})
        metrics = trainer.evaluate()
        trainer.close()
    assert metrics["eval/avg_at_n"] == pytest.approx(0.25)
    assert metrics["eval/pass_at_1"] == pytest.approx(0.25) and metrics["eval/pass_at_3"] == pytest.approx(0.25)
    assert metrics["eval/frac_solved_all"] == pytest.approx(0.25)
    assert metrics["eval/frac_solved_none"] == pytest.approx(0.75)
    assert sorted(key for key in metrics if key.startswith("eval/pass_at_")) == ["eval/pass_at_1", "eval/pass_at_3"]


def test_a_reward_failure_in_an_evaluation_is_logged_with_the_step_evaluated(tmp_path, tiny_model_dir, arithmetic_files,
                                                                            trainer_for):
    """reward_errors.log's first line names the step the failure belongs to: an evaluation after step N is step N's
    (a resume from step N keeps it), here the evaluation before the first step, step 0."""
    train, held_out = arithmetic_files
    failing = "def score(prompt, completion, answer, **meta):\n    raise RuntimeError('no score')\n"
    with importable_module(tmp_path, "failing_eval_reward", failing):
        trainer = trainer_for(tmp_path, tiny_model_dir, train, held_out=held_out,
                              reward={"name": "failing_eval_reward:score"},
                              eval={"every": 0, "n": 2, "ks": [1], "max_prompts": 2, "top_forks": 0})
        assert trainer.evaluate()["eval/reward_errors"] == 4
    log = (tmp_path / "run" / "reward_errors.log").read_text()
    assert log.startswith("step 0, ") and "no score" in log


def test_evaluation_result_metrics_and_summary_come_from_its_summary():
    """Per-prompt pass counts [1, 4, 0, 2] of n = 4: every metric follows the summary's own numbers."""
    from entrorl.evaluation import summarize_samples
    from entrorl.trainer.evaluate import EvaluationResult

    correct = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 1], [1, 1, 0, 0]], dtype=bool)
    result = EvaluationResult(summary=summarize_samples(correct, ks=(1, 2, 4)), reward_errors=3, correct_threshold=0.75)
    metrics = result.metrics()
    assert metrics["eval/n"] == 4.0 and metrics["eval/reward_errors"] == 3.0
    assert metrics["eval/avg_at_n"] == pytest.approx(9 / 20)
    counts = [1, 4, 0, 2, 2]
    for k in (1, 2, 4):
        want = sum(1 - math.comb(4 - c, k) / math.comb(4, k) for c in counts) / len(counts)
        assert metrics[f"eval/pass_at_{k}"] == pytest.approx(want, abs=1e-12)
    assert sorted(key for key in metrics if key.startswith("eval/pass_at_")) == ["eval/pass_at_1", "eval/pass_at_2",
                                                                                "eval/pass_at_4"]
    assert metrics["eval/frac_solved_none"] == pytest.approx(1 / 5)
    assert metrics["eval/frac_solved_all"] == pytest.approx(1 / 5)
    assert result.to_dict()["threshold"] == 0.75 and result.to_dict()["reward_errors"] == 3


def test_evaluate_model_keeps_each_sample_s_shaped_reward_length_and_index_prompt_by_prompt(tiny_model_dir):
    """keep_samples lists n samples a prompt, prompt by prompt, each with its index among the prompt's samples, the
    completion sampled from that prompt, its token count, whether it was cut, and its reward after the overlong
    penalty (the score is a constant 1, so every sample stays correct). Greedy, the untrained model repeats a prompt's
    last token: "1+2=" runs to max_new_tokens, a prompt ending in EOS stops at once. Scoring fork tokens leaves a
    model in eval mode as it was."""
    from entrorl.data import PromptRecord
    from entrorl.modeling import load_causal_lm, load_tokenizer
    from entrorl.rewards import RewardRunner
    from entrorl.rollout import SamplingParams
    from entrorl.trainer.evaluate import evaluate_model

    model, tokenizer = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    model.eval()
    records = [PromptRecord("1+2=", "3", source="a:1"), PromptRecord("9" + tokenizer.eos_token, "9", source="a:2")]
    prompt_ids = [tokenizer(record.prompt)["input_ids"] for record in records]
    overlong = {"max_length": 7, "cache_length": 4, "penalty_factor": 1.0}  # 0 up to 3 tokens, -0.75 at 6
    runner = RewardRunner(lambda prompt, completion, answer, **meta: 1.0, overlong=overlong)
    result = evaluate_model(model, tokenizer, records, prompt_ids, runner, n=3, ks=[1], seed=0, keep_samples=True, top_forks=2,
                            sampling=SamplingParams(max_new_tokens=6, temperature=0.0))
    samples = result.samples
    assert [(sample["source"], sample["sample"], sample["prompt"]) for sample in samples] == [
        (record.source, index, record.prompt) for record in records for index in range(3)]
    assert [sample["completion"] for sample in samples] == ["======"] * 3 + [""] * 3
    assert [sample["length"] for sample in samples] == [6] * 3 + [1] * 3
    assert [sample["truncated"] for sample in samples] == [True] * 3 + [False] * 3
    assert [sample["reward"] for sample in samples] == pytest.approx([0.25] * 3 + [1.0] * 3)
    assert all(sample["correct"] for sample in samples) and result.summary.avg_at_n == 1.0 and result.reward_errors == 0
    assert len(result.forks) == 2 and not model.training
    # a failing reward is named by the sample the samples list gives it, its index among its prompt's samples
    def fails_on_the_second_prompt(prompt, completion, answer, **meta):
        if prompt.startswith("9"):
            raise RuntimeError("no")
        return 1.0

    failed = evaluate_model(model, tokenizer, records, prompt_ids, RewardRunner(fails_on_the_second_prompt), n=3, ks=[1],
                            seed=0, keep_samples=True, sampling=SamplingParams(max_new_tokens=6, temperature=0.0))
    assert failed.first_reward_error.startswith("reward raised for sample 0 (a:2): RuntimeError: no")
    assert (failed.samples[3]["source"], failed.samples[3]["sample"]) == ("a:2", 0)
    with pytest.raises(ValueError, match="evaluate_model: no prompts to evaluate"):
        evaluate_model(model, tokenizer, [], [], runner, n=3, ks=[1], seed=0, sampling=SamplingParams(max_new_tokens=6))
    with pytest.raises(ValueError, match="evaluate_model: n must be a positive integer, got 0"):
        evaluate_model(model, tokenizer, records, prompt_ids, runner, n=0, ks=None, seed=0, sampling=SamplingParams(max_new_tokens=6))
    with pytest.raises(ValueError, match="evaluate_model: 2 records but 1 tokenized prompts"):
        evaluate_model(model, tokenizer, records, prompt_ids[:1], runner, n=3, ks=None, seed=0,
                       sampling=SamplingParams(max_new_tokens=6))


def test_evaluate_model_groups_each_prompt_s_own_samples_and_reports_the_ks_asked_for(tiny_model_dir):
    """Pass rates, pass@k and the polarisation come from each prompt's own n samples (a reward that marks every sample
    of the second prompt only right gives rates [0, 1, 0]), and only for the ks asked for (not the default ones)."""
    from entrorl.data import PromptRecord
    from entrorl.modeling import load_causal_lm, load_tokenizer
    from entrorl.rewards import RewardRunner
    from entrorl.rollout import SamplingParams
    from entrorl.trainer.evaluate import evaluate_model

    model, tokenizer = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    records = [PromptRecord("1+2=", "3", source="a:1"), PromptRecord("2+2=", "4", source="a:2"),
               PromptRecord("3+2=", "5", source="a:3")]
    prompt_ids = [tokenizer(record.prompt)["input_ids"] for record in records]
    runner = RewardRunner(lambda prompt, completion, answer, **meta: SimpleNamespace(score=float(answer == "4"),
                                                                                     reason=f"checked {answer}"))
    result = evaluate_model(model, tokenizer, records, prompt_ids, runner, n=4, ks=[2], seed=0, keep_samples=True,
                            sampling=SamplingParams(max_new_tokens=2))
    summary = result.summary
    assert summary.pass_rates.tolist() == [0.0, 1.0, 0.0] and list(summary.pass_at_k) == [2]
    assert summary.pass_at_k[2] == pytest.approx(1 / 3) and summary.avg_at_n == pytest.approx(1 / 3)
    assert (summary.polarisation.frac_zero, summary.polarisation.frac_one) == (2 / 3, 1 / 3)
    assert result.metrics()["eval/frac_solved_all"] == 1 / 3 and "eval/pass_at_1" not in result.metrics()
    assert [sample["reason"] for sample in result.samples] == [f"checked {r.answer}" for r in records for _ in range(4)]
    assert [sample["correct"] for sample in result.samples] == [False] * 4 + [True] * 4 + [False] * 4


def test_evaluate_model_marks_truncated_only_the_samples_cut_at_max_new_tokens(tiny_model_dir):
    """Greedy with one new token: "1+2=" is cut (the untrained model repeats "="), while "9<eos>" samples its EOS as
    that one token, which ends the response: the same length, but not truncated."""
    from entrorl.data import PromptRecord
    from entrorl.modeling import load_causal_lm, load_tokenizer
    from entrorl.rewards import RewardRunner
    from entrorl.rollout import SamplingParams
    from entrorl.trainer.evaluate import evaluate_model

    model, tokenizer = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    records = [PromptRecord("1+2=", "3", source="a:1"), PromptRecord("9" + tokenizer.eos_token, "9", source="a:2")]
    prompt_ids = [tokenizer(record.prompt)["input_ids"] for record in records]
    runner = RewardRunner(lambda prompt, completion, answer, **meta: 1.0)
    result = evaluate_model(model, tokenizer, records, prompt_ids, runner, n=2, ks=[1], seed=0, keep_samples=True,
                            sampling=SamplingParams(max_new_tokens=1, temperature=0.0))
    assert [(s["completion"], s["length"], s["truncated"]) for s in result.samples] == [
        ("=", 1, True), ("=", 1, True), ("", 1, False), ("", 1, False)]


def _evaluate_tiny(tiny_model_dir, **options):
    from entrorl.data import PromptRecord
    from entrorl.modeling import load_causal_lm, load_tokenizer
    from entrorl.rewards import RewardRunner
    from entrorl.rollout import SamplingParams
    from entrorl.trainer.evaluate import evaluate_model

    model, tokenizer = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    records = [PromptRecord("1+2=", "3", source="p.jsonl:1"), PromptRecord("2+7=", "9", source="p.jsonl:2")]
    prompt_ids = [tokenizer(record.prompt)["input_ids"] for record in records]
    runner = options.pop("runner", None) or RewardRunner(lambda prompt, completion, answer, **meta: 0.0)
    options = {"n": 6, "ks": [1], "seed": 0, "keep_samples": True, "sampling": SamplingParams(max_new_tokens=4), **options}
    return model, evaluate_model(model, tokenizer, records, prompt_ids, runner, **options)


def test_evaluate_model_samples_under_its_own_seed_and_leaves_the_caller_s_random_stream_as_it_was(tiny_model_dir):
    """The same seed gives the same samples whatever the caller's random state, another seed others; torch's
    global stream goes on afterwards as if no evaluation had run. The default batch holds 64 rows."""
    def completions(seed, **options):
        return [sample["completion"] for sample in _evaluate_tiny(tiny_model_dir, seed=seed, **options)[1].samples]

    torch.manual_seed(11)
    first = completions(5)
    after = torch.rand(3)
    torch.manual_seed(11)
    torch.rand(3)  # another caller state
    assert completions(5) == first
    torch.manual_seed(11)
    completions(6)
    assert torch.equal(torch.rand(3), after)
    assert completions(6) != first and completions(5, batch_size=64) == first
    heard = []
    _evaluate_tiny(tiny_model_dir, n=35, progress=heard.append)  # 70 rows: one full batch of 64, then 6
    assert heard == [64, 70]


def test_evaluate_model_reports_the_reward_s_threshold_the_forks_sources_and_its_sampling_progress(tiny_model_dir):
    """The result keeps the reward runner's correctness threshold, each fork token names the file and line of its
    prompt, and progress hears the rows sampled so far, one call per batch of batch_size rows."""
    from entrorl.rewards import RewardRunner

    heard = []
    runner = RewardRunner(lambda prompt, completion, answer, **meta: 0.8, correct_threshold=0.9)
    _, result = _evaluate_tiny(tiny_model_dir, runner=runner, top_forks=40, batch_size=5, progress=heard.append)
    assert result.correct_threshold == 0.9 and result.to_dict()["threshold"] == 0.9 and result.summary.avg_at_n == 0.0
    assert {fork["source"] for fork in result.forks} == {"p.jsonl:1", "p.jsonl:2"}
    assert heard == [5, 10, 12]


def test_evaluate_model_scores_fork_tokens_in_eval_mode_and_puts_a_training_model_back_in_training(tiny_model_dir,
                                                                                                  monkeypatch):
    """Fork entropies are those of the model without dropout; a model that was training is training again after."""
    from entrorl.data import PromptRecord
    from entrorl.modeling import load_causal_lm, load_tokenizer
    from entrorl.rewards import RewardRunner
    from entrorl.rollout import SamplingParams
    from entrorl.trainer import evaluate as evaluate_module

    modes = []
    original = evaluate_module.bucketed_response_token_stats

    def spy(model, *args, **options):
        modes.append(model.training)
        return original(model, *args, **options)

    monkeypatch.setattr(evaluate_module, "bucketed_response_token_stats", spy)
    model, tokenizer = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    model.train()
    result = evaluate_module.evaluate_model(model, tokenizer, [PromptRecord("1+2=", "3")], [tokenizer("1+2=")["input_ids"]],
                                            RewardRunner(lambda prompt, completion, answer, **meta: 0.0), n=2, ks=[1],
                                            seed=0, top_forks=1, sampling=SamplingParams(max_new_tokens=3))
    assert modes == [False] and model.training and len(result.forks) == 1

def test_evaluation_fork_entropies_use_the_sampling_temperature(tmp_path, tiny_model_dir, arithmetic_files, trainer_for,
                                                                monkeypatch):
    """Fork tokens are scored at eval.temperature, and the model is left in the mode it was in."""
    from entrorl.trainer import evaluate as evaluate_module

    train, held_out = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, held_out=held_out,
                          eval={"every": 0, "n": 2, "ks": [1], "max_prompts": 2, "top_forks": 2, "temperature": 0.5})
    temperatures = []
    original = evaluate_module.bucketed_response_token_stats

    def spy(*args, **options):
        temperatures.append(options["temperature"])
        return original(*args, **options)

    monkeypatch.setattr(evaluate_module, "bucketed_response_token_stats", spy)
    trainer.model.train()
    trainer.evaluate()
    assert temperatures == [0.5]
    assert trainer.model.training


def test_evaluations_and_checkpoints_follow_their_every_and_the_last_step_and_a_resume_does_not_repeat_them(
        tmp_path, tiny_model_dir, arithmetic_files, parity, monkeypatch):
    """eval.every 2 and checkpoint.every 2 over 3 steps: steps 2 and 3 (the last step always); eval.at_start
    evaluates step 0 of a fresh run only, not again when a resumed run starts."""
    train, held_out = arithmetic_files
    evaluated, saved = [], []
    original_evaluate, original_save = Trainer.evaluate, Trainer.save
    monkeypatch.setattr(Trainer, "evaluate", lambda self: evaluated.append(self.step) or original_evaluate(self))
    monkeypatch.setattr(Trainer, "save", lambda self: saved.append(self.step) or original_save(self))

    def run(steps: int, resume: bool) -> None:
        config = load_config(make_config(tiny_model_dir, train, held_out, reward={"name": parity},
                                         optim={"steps": steps, "lr": 1e-3}, checkpoint={"every": 2, "keep": 5},
                                         eval={"every": 2, "n": 2, "ks": [1], "max_prompts": 2, "top_forks": 0,
                                               "at_start": True}))
        Trainer(config, run_dir=tmp_path / "run", resume=resume).train()

    run(3, resume=False)
    assert evaluated == [0, 2, 3] and saved == [2, 3]
    assert sorted(path.name for path in (tmp_path / "run" / "eval").iterdir()) == [
        "step_000000.json", "step_000002.json", "step_000003.json"]
    evaluated.clear(), saved.clear()
    run(4, resume=True)
    assert evaluated == [4] and saved == [4]


def test_a_latest_pointer_naming_the_newest_is_not_warned_about(tmp_path, tiny_model_dir, arithmetic_files, caplog,
                                                                trainer_for):
    import logging

    from entrorl.trainer.checkpoint import latest_checkpoint

    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, optim={"steps": 9, "lr": 1e-3}, checkpoint={"every": 1, "keep": 3})
    for step in (1, 2):
        trainer.step = step
        trainer.save()
    trainer.close()
    with caplog.at_level(logging.WARNING, logger="entrorl.trainer.checkpoint"):
        assert latest_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "step_000002"
    assert caplog.records == []


def test_covariance_and_discriminator_statistics_pair_log_probs_with_the_advantages_the_loss_used(
        tmp_path, tiny_model_dir, arithmetic_files, parity, monkeypatch, trainer_for):
    """With a method that reshapes advantages (entropy_advantage adds a clipped entropy term per token), cov/* and the
    discriminators' advantage splits are statistics of the shaped advantages the update used (the objective's first
    pass over each row, across two mini-batches), as the covariance theory and the objective's own selectors take
    them, not of the estimator's."""
    from entrorl.trainer import loop
    from entrorl.trainer.diagnostics import covariance_summary

    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, reward={"name": parity}, method="entropy_advantage",
                          rollout={"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 12},
                          optim={"steps": 2, "lr": 1e-3, "mini_batches": 2, "epochs": 2})
    passes, given = [], {}
    objective = trainer.objective
    original_call = type(objective).__call__

    def recording(self, batch):
        out = original_call(self, batch)
        passes.append((batch.advantages.detach().cpu(), out.advantages.detach().float().cpu()))
        return out

    monkeypatch.setattr(type(objective), "__call__", recording)
    monkeypatch.setattr(loop, "covariance_summary", lambda logprob, advantages, mask: given.setdefault(
        "cov", (logprob, advantages, mask)) and covariance_summary(logprob, advantages, mask))
    metrics = trainer.train_step()
    logprob, advantages, mask = given["cov"]
    # every row's shaped advantages are among the first mini-batch passes (two per epoch, epoch 1 covers every row)
    first_epoch = passes[:2]
    for estimator, used in first_epoch:
        assert not torch.equal(estimator, used)  # the shaping changed them
    rows = {tuple(row.tolist()) for _, used in first_epoch for row in used}
    assert {tuple(row.tolist()) for row in advantages} == rows
    assert metrics["cov/mean"] == pytest.approx(covariance_summary(logprob, advantages, mask)["cov/mean"])


def test_a_file_s_crc32_runs_on_across_the_chunks_it_is_read_in(tmp_path, monkeypatch):
    """A weight file larger than one read is checked as a whole: the CRC-32 of every chunk after the first goes on from
    the one before, as zlib's of the whole file."""
    import zlib

    from entrorl.trainer import checkpoint

    data = bytes(range(256)) * 3
    (tmp_path / "weights.bin").write_bytes(data)
    monkeypatch.setattr(checkpoint, "_READ_CHUNK", 100)
    assert checkpoint._crc32(tmp_path / "weights.bin") == f"{zlib.crc32(data):08x}"
    assert checkpoint._crc32(tmp_path / "weights.bin") != f"{zlib.crc32(data[700:]):08x}"


def test_a_checkpoint_from_before_files_json_with_an_unreadable_weight_index_is_incomplete(tmp_path):
    """Without files.json, a sharded model's index that is not JSON cannot say which shards there are: its weights are
    not taken for whole."""
    from entrorl.trainer.checkpoint import incomplete_checkpoints, latest_checkpoint

    checkpoint = tmp_path / "checkpoints" / "step_000001"
    for path, data in {"trainer.pt": b"state", "model/config.json": b"{}", "model/model.safetensors.index.json": b"{",
                       "model/model-1.safetensors": b"w"}.items():
        (checkpoint / path).parent.mkdir(parents=True, exist_ok=True)
        (checkpoint / path).write_bytes(data)
    assert incomplete_checkpoints(tmp_path) == [(checkpoint, "the model's weights: missing or empty")]
    assert latest_checkpoint(tmp_path) is None


def test_setting_aside_the_checkpoints_of_a_fresh_start_removes_the_latest_pointer(tmp_path):
    """On a fresh start every checkpoint goes to passed_over/ and ``latest`` goes with them (it would name a folder
    that is not there); after a resumed step it names that step's checkpoint, with six digits."""
    from entrorl.trainer.checkpoint import latest_checkpoint, set_aside_checkpoints_after

    root = tmp_path / "checkpoints"
    for name in ("step_000001", "step_000002", "step_000003"):
        made_checkpoint(root, name)
    (root / "latest").write_text("step_000003\n")
    assert set_aside_checkpoints_after(tmp_path, 1) == [root / "passed_over" / "step_000002",
                                                         root / "passed_over" / "step_000003"]
    assert (root / "latest").read_text() == "step_000001\n"
    assert set_aside_checkpoints_after(tmp_path, None) == [root / "passed_over" / "step_000001"]
    assert not (root / "latest").exists() and latest_checkpoint(tmp_path) is None
    assert sorted(path.name for path in root.iterdir()) == ["passed_over"]
    assert set_aside_checkpoints_after(tmp_path, None) == [] and not (root / "latest").exists()


def test_a_checkpoint_from_before_files_json_is_read_as_a_model_without_its_trainer_state(tmp_path, tiny_model_dir):
    """A model reader does not read trainer.pt: a checkpoint written before files.json whose trainer state is empty
    still stands for its model/."""
    import shutil

    from entrorl.trainer.checkpoint import resolve_model_directory

    checkpoint = tmp_path / "checkpoints" / "step_000001"
    shutil.copytree(tiny_model_dir, checkpoint / "model")
    (checkpoint / "trainer.pt").write_bytes(b"")
    resolved = resolve_model_directory(checkpoint)
    assert (resolved.weights, resolved.tokenizer, resolved.adapters) == (checkpoint / "model", checkpoint / "model", None)


def test_a_damaged_copy_of_a_checkpoint_is_refused_without_naming_an_earlier_one(tmp_path, tiny_policy):
    """A copy (step_000002.bak) is no checkpoint of the run: given with a damaged model, it is refused as damaged, and
    no checkpoint before it is looked for (its name has no step)."""
    from entrorl.trainer.checkpoint import resolve_model_directory

    run_dir = tmp_path / "run"
    write_checkpoint(run_dir, 1, tiny_policy, keep=2)
    written = write_checkpoint(run_dir, 2, tiny_policy, keep=2)
    (run_dir / "config.json").write_text(json.dumps({"seed": 7}))
    copy = shutil.copytree(written, run_dir / "checkpoints" / "step_000002.bak")
    flip_a_byte(copy / "model" / "model.safetensors")
    with pytest.raises(ValueError, match=r"^checkpoint .*step_000002\.bak is damaged: model/model.safetensors does not "
                                         r"hold the bytes written: its CRC-32 is [0-9a-f]{8} instead of [0-9a-f]{8}$"):
        resolve_model_directory(copy)


def test_a_checkpoint_that_cannot_be_written_names_the_last_intact_one_not_a_damaged_one(tmp_path, tiny_policy, monkeypatch):
    """Step 2's weights were changed in place (its CRC-32 no longer matches), so the checkpoint a resume would take
    is step 1: a failed write names that one as intact, not step 2."""
    from entrorl.trainer import checkpoint

    run = tmp_path / "run"
    for step in (1, 2):
        write_checkpoint(run, step, tiny_policy, keep=3)
    flip_a_byte(run / "checkpoints" / "step_000002" / "model" / "model.safetensors")

    def full_disk(*args, **kwargs):
        raise RuntimeError("unexpected pos 10 vs 5")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    model, tokenizer = tiny_policy
    with pytest.raises(checkpoint.CheckpointWriteError) as failure:
        checkpoint.save_checkpoint(run, 3, model=model, tokenizer=tokenizer, trainer_state={}, keep=3)
    assert str(failure.value).endswith("the last complete checkpoint, step_000001, is intact")


def test_a_checkpoint_whose_trainer_state_was_deleted_still_stands_for_its_model(tmp_path, tiny_policy):
    """A model reader never reads trainer.pt: a checkpoint without it (deleted to save room) gives its model/, as the
    checkpoint's model/ itself does; a folder that merely holds a model/ is no checkpoint."""
    from entrorl.trainer.checkpoint import resolve_model_directory

    written = write_checkpoint(tmp_path / "run", 1, tiny_policy, keep=1)
    (written / "trainer.pt").unlink()
    assert resolve_model_directory(written / "model").weights == written / "model"
    assert resolve_model_directory(written).weights == written / "model"
    # the run, or its checkpoints/, whose every checkpoint lost its trainer state: the newest model, which a resume,
    # needing the trainer state, does not take
    from entrorl.trainer.checkpoint import latest_checkpoint

    newer = write_checkpoint(tmp_path / "run", 2, tiny_policy, keep=2)
    (newer / "trainer.pt").unlink()
    for given in (tmp_path / "run", tmp_path / "run" / "checkpoints"):
        assert resolve_model_directory(given).weights == newer / "model"
    assert latest_checkpoint(tmp_path / "run") is None and latest_checkpoint(tmp_path / "run", verify="all") is None
    # a checkpoint written before files.json, whose weights are gone, is passed over by a model reader too
    for checkpoint_dir in (written, newer):
        (checkpoint_dir / "files.json").unlink()
    (newer / "model" / "model.safetensors").unlink()
    assert latest_checkpoint(tmp_path / "run", verify="model") == written
    assert resolve_model_directory(tmp_path / "run").weights == written / "model"
    # a model saved in a folder named checkpoints is the model it is, not a run's checkpoints
    named_so = tmp_path / "checkpoints"
    shutil.copytree(written / "model", named_so)
    assert resolve_model_directory(named_so).weights == named_so
    other = tmp_path / "other"
    shutil.copytree(written / "model", other / "model")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model_directory(other)


def test_a_stopped_run_calls_intact_the_checkpoint_a_resume_would_take(tmp_path, tiny_policy):
    """The message of a run that stops (non-finite updates, weights broken by the step) names the last checkpoint as
    intact: with step 2's weights changed in place, that is step 1."""
    run = tmp_path / "run"
    for step in (1, 2):
        write_checkpoint(run, step, tiny_policy, keep=3)
    flip_a_byte(run / "checkpoints" / "step_000002" / "model" / "model.safetensors")
    phrase = Trainer._last_checkpoint_phrase(SimpleNamespace(run_dir=run))
    assert phrase == f"The last checkpoint, {run / 'checkpoints' / 'step_000001'}, is intact."


# ------------------------------------------------------------------------------------------ the record of a stopped step
def test_a_stop_on_non_finite_updates_records_the_step_s_applied_and_skipped_updates_and_its_rate(
        tmp_path, tiny_model_dir, arithmetic_files, parity, monkeypatch, trainer_for):
    """Two mini-batches, the second one's loss NaN on two steps in a row: the record of the step that stops the run
    counts that step's one applied and one skipped update, the run's skipped total, and the warm-up rate it ran at."""
    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, reward={"name": parity},
                          optim={"steps": 5, "lr": 1e-3, "mini_batches": 2, "warmup_steps": 4,
                                 "max_consecutive_nonfinite": 2})
    objective = trainer.objective
    monkeypatch.setattr(trainer, "objective", NaNLoss(objective, calls={1}))
    first = trainer.train_step()
    assert (first["train/updates"], first["train/skipped_updates"]) == (1, 1)
    monkeypatch.setattr(trainer, "objective", NaNLoss(objective, calls={1}))
    with pytest.raises(TrainingStopped, match=r"2 steps in a row \(steps 1-2\)") as stopped:
        trainer.train_step()
    record = stopped.value.metrics
    assert stopped.value.step == 2
    assert record["train/updates"] == 1 and record["train/skipped_updates"] == 1 and record["train/skipped_total"] == 2
    assert record["train/lr"] == pytest.approx(2e-3 / 4)  # step 2 of a 4-step warm-up


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_non_finite_stop_of_a_half_precision_model_suggests_training_in_float32(tmp_path, tiny_model_dir,
                                                                                  arithmetic_files, parity,
                                                                                  monkeypatch, trainer_for, dtype):
    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, reward={"name": parity},
                          model={"path": str(tiny_model_dir), "dtype": dtype},
                          optim={"steps": 2, "lr": 1e-3, "max_consecutive_nonfinite": 1})
    monkeypatch.setattr(trainer, "objective", NaNLoss(trainer.objective))
    with pytest.raises(TrainingStopped, match=r"step 1 had a non-finite loss or gradient; stopping: lower optim.lr, check "
                                              r"the reward values, or train in float32 \(model.dtype\)\. "):
        trainer.train_step()


# ------------------------------------------------------------------------------------------ what a step records
def test_the_samples_file_holds_each_row_s_advantage_answer_length_and_truncation(tmp_path, tiny_model_dir,
                                                                                  arithmetic_files, parity,
                                                                                  monkeypatch, trainer_for):
    """samples/step_<N>.jsonl rows are the step's rollouts in order, each with the advantage it was trained with (not
    its reward), its prompt's reference answer, its length and whether it was cut; response/truncated_frac is the
    share of cut rows."""
    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, reward={"name": parity},
                          rollout={"max_new_tokens": 12}, logging={"progress": False, "samples_every": 1})
    collected = keep_what_collect_returns(trainer, monkeypatch)
    metrics = trainer.train_step()
    scored = collected[0]
    rollouts = scored.rollouts
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples" / "step_000001.jsonl").read_text().splitlines()]
    assert 0 < float(rollouts.truncated.float().mean()) < 1  # some responses ended, some were cut
    assert not torch.equal(scored.advantages, scored.rewards)
    assert [row["advantage"] for row in rows] == pytest.approx(scored.advantages.tolist())
    assert [row["reward"] for row in rows] == pytest.approx(scored.rewards.tolist())
    assert [row["answer"] for row in rows] == [record.answer for record in scored.records]
    assert all(row["answer"] for row in rows)
    assert [row["truncated"] for row in rows] == rollouts.truncated.tolist()
    assert [row["length"] for row in rows] == rollouts.lengths.tolist()
    assert metrics["response/truncated_frac"] == pytest.approx(float(rollouts.truncated.float().mean()))


def test_zero_std_groups_and_the_shaped_mean_are_of_the_rewards_after_group_shaping(tmp_path, tiny_model_dir,
                                                                                   arithmetic_files, trainer_for):
    """A reward of 1 everywhere with reward.unlikeliness (beta_rank 0.5, groups of 4): the rewards the advantages see
    are 1 - 0.5 rank / 4 for ranks 0..3, unequal within every group, so no group is zero-std, and their mean is
    1 - 0.5 * 1.5 / 4; reward/mean stays the reward's own."""
    train, _ = arithmetic_files
    with importable_module(tmp_path, "always_one", "def score(prompt, completion, answer, **meta):\n    return 1.0\n"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = trainer_for(tmp_path, tiny_model_dir, train,
                                  reward={"name": "always_one:score", "unlikeliness": {"beta_rank": 0.5}})
        scored = trainer.collect()
    assert sorted(scored.rewards.tolist()) == [0.625] * 2 + [0.75] * 2 + [0.875] * 2 + [1.0] * 2
    assert scored.metrics["reward/mean"] == 1.0
    assert scored.metrics["reward/shaped_mean"] == pytest.approx(0.8125)
    assert scored.metrics["reward/zero_std_groups"] == 0.0


def test_the_step_s_time_is_split_into_generation_update_and_diagnostics(tmp_path, tiny_model_dir, arithmetic_files,
                                                                         parity, monkeypatch, trainer_for):
    """The first-order pass runs between generation and the update but counts as diagnostics: the three parts add up
    to the step's time, and a slow first-order pass shows in time/diagnostics_s, not in time/update_s."""
    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, reward={"name": parity},
                          diagnostics={"first_order": True, "measure_fraction": 0.5})
    original = trainer._entropy_gradient

    def slow(rollouts, rows):
        time.sleep(0.3)
        return original(rollouts, rows)

    monkeypatch.setattr(trainer, "_entropy_gradient", slow)
    metrics = trainer.train_step()
    parts = metrics["time/generate_s"] + metrics["time/update_s"] + metrics["time/diagnostics_s"]
    assert parts == pytest.approx(metrics["time/step_s"], abs=0.05)
    assert metrics["time/diagnostics_s"] >= 0.3 and metrics["time/update_s"] >= 0


def test_a_step_with_every_response_cut_and_mask_truncated_has_no_kl_and_is_reported(tmp_path, tiny_model_dir,
                                                                                    arithmetic_files, parity):
    """rollout.mask_truncated with every response of the first step cut at max_new_tokens (2 here): no token is trained
    on, kl/ref_k1 is 0 (not NaN), and the run says that nothing was trained and why."""
    import io

    from rich.console import Console

    train, _ = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, None, reward={"name": parity},
                                     method={"method": "grpo+kl_ref", "params": {"kl_loss_coef": 0.1}},
                                     rollout={"max_new_tokens": 2, "mask_truncated": True},
                                     optim={"steps": 2, "lr": 1e-3}, checkpoint={"every": 0}))
    output = io.StringIO()
    Trainer(config, run_dir=tmp_path / "run", console=Console(file=output, width=300)).train()
    first = read_metrics(tmp_path / "run")[0]
    assert first["tokens/valid"] == 0.0
    # a mean over no token is written as null, not as a 0 that would read "the policy equals the reference"
    assert first["kl/ref_k1"] is None and first["entropy/predicted_delta_batch"] is None
    assert first["entropy/predicted_delta_sum"] == 0.0  # nothing trained: no change predicted anywhere
    # the throughput counts every sampled token (8 rows of 2), trained on or not
    assert first["time/tokens_per_s"] * first["time/step_s"] == pytest.approx(16, rel=0.01)
    said = output.getvalue()
    assert said.count("at step 1 no token was left to train on (tokens/valid = 0)") == 1
    assert "every response was cut at rollout.max_new_tokens, and rollout.mask_truncated leaves such responses out" in said


def test_covariance_takes_the_first_epoch_s_shaped_advantages_when_later_epochs_shape_them_otherwise(
        tmp_path, tiny_model_dir, arithmetic_files, parity, monkeypatch, trainer_for):
    """entropy_advantage with a small alpha (its entropy term below the |A| / kappa cap): the second epoch's entropies,
    after the first epoch's updates, shape the advantages otherwise; cov/* pairs log-probs with the first epoch's."""
    from entrorl.trainer import loop

    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, reward={"name": parity},
                          method={"method": "entropy_advantage", "params": {"alpha": 0.01}},
                          rollout={"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 12},
                          optim={"steps": 2, "lr": 1e-2, "mini_batches": 2, "epochs": 2})
    passes, given = [], {}
    original_call = type(trainer.objective).__call__

    def recording(self, batch):
        out = original_call(self, batch)
        passes.append(out.advantages.detach().float().cpu())
        return out

    monkeypatch.setattr(type(trainer.objective), "__call__", recording)
    monkeypatch.setattr(loop, "covariance_summary", lambda logprob, advantages, mask: given.setdefault(
        "advantages", advantages) is not None and {})
    trainer.train_step()
    rows_of = lambda shaped: {tuple(row.tolist()) for used in shaped for row in used}  # noqa: E731
    first_epoch, second_epoch = rows_of(passes[:2]), rows_of(passes[2:])
    assert first_epoch != second_epoch
    assert {tuple(row.tolist()) for row in given["advantages"]} == first_epoch


def test_an_evaluation_file_names_the_step_it_evaluated(tmp_path, tiny_model_dir, arithmetic_files, parity,
                                                        trainer_for):
    train, held_out = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, held_out=held_out, reward={"name": parity})
    trainer.train_step()
    trainer.evaluate()
    assert json.loads((tmp_path / "run" / "eval" / "step_000001.json").read_text())["step"] == 1


def test_a_resumed_run_s_stop_gives_the_norm_of_the_checkpoint_it_resumed_from(tmp_path, tiny_model_dir,
                                                                               arithmetic_files, parity, monkeypatch):
    """After a resume the non-finite stop names the norm held in the checkpoint resumed from; a checkpoint of a version
    that did not record the norm at the start of the run leaves that one out rather than take the checkpoint's."""
    from entrorl.trainer import loop

    train, _ = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, None, reward={"name": parity}, checkpoint={"every": 1},
                                     optim={"steps": 5, "lr": 1e-3, "max_consecutive_nonfinite": 1}))
    trainer = Trainer(config, run_dir=tmp_path / "run")
    start = trainer.weight_norm_at_start
    trainer.train_step()
    trainer.save()
    trainer.close()
    resumed = Trainer(config, run_dir=tmp_path / "run", resume=True)
    try:
        norm = f"{resumed.weight_norm:.4g}"
        monkeypatch.setattr(resumed, "objective", NaNLoss(resumed.objective))
        with pytest.raises(TrainingStopped, match=rf"The trained weights' norm: {norm} now, {start:.4g} at the start of "
                                                  rf"the run, {norm} in step_000001 \("):
            resumed.train_step()
    finally:
        resumed.close()
    load_trainer_state = loop.load_trainer_state

    def older(checkpoint):
        state = load_trainer_state(checkpoint)
        del state["weight_norm_at_start"]
        return state

    monkeypatch.setattr(loop, "load_trainer_state", older)
    resumed = Trainer(config, run_dir=tmp_path / "run", resume=True)
    try:
        assert resumed.weight_norm_at_start is None
        monkeypatch.setattr(resumed, "objective", NaNLoss(resumed.objective))
        with pytest.raises(TrainingStopped, match=rf"The trained weights' norm: {norm} now, {norm} in step_000001 \("):
            resumed.train_step()
    finally:
        resumed.close()


def test_the_failing_reward_count_starts_again_after_a_step_whose_reward_scored_a_sample(tmp_path, tiny_model_dir,
                                                                                       arithmetic_files):
    """reward.max_failing_steps counts steps IN A ROW: failing everywhere, then scoring, then failing everywhere again
    with a limit of 2 must not stop."""
    train, _ = arithmetic_files
    body = "if 8 < calls[0] <= 16:\n    return float(calls[0] % 2)\nraise RuntimeError('reward server down')\n"
    with importable_module(tmp_path, "down_up_down", call_counting_reward(body)):
        config = load_config(make_config(tiny_model_dir, train, None,
                                         reward={"name": "down_up_down:score", "max_failing_steps": 2}))
        trainer = Trainer(config, run_dir=tmp_path / "run")
        try:
            errors = [trainer.train_step()["reward/error_frac"] for _ in range(3)]  # no TrainingStopped
        finally:
            trainer.close()
    assert errors == [1.0, 0.0, 1.0] and trainer.consecutive_failed_rewards == 1


# ------------------------------------------------------------------------------------------ dynamic sampling
def test_the_sampled_reward_and_accuracy_cover_every_round_s_rows_and_the_mean_has_the_extra_reward(
        tmp_path, tiny_model_dir, arithmetic_files):
    """Round 1: groups (1, 0, 0, 0) and (0, 0, 0, 0); round 2: (1, 0, 1, 0) twice; an extra reward of 1 at weight
    0.25. reward/sampled_accuracy is 5 of the 16 rows sampled (the kept 8 have 3), reward/sampled_mean adds the extra
    reward to the same rows' scores."""
    train, _ = arithmetic_files
    body = "if calls[0] <= 8:\n    return 1.0 if calls[0] == 1 else 0.0\nreturn float(calls[0] % 2)\n"
    source = call_counting_reward(body) + "\ndef bonus(prompt, completion, answer, **meta):\n    return 1.0\n"
    with importable_module(tmp_path, "rounds_with_bonus", source):
        config = load_config(make_config(tiny_model_dir, train, None, rollout={**THREE_SAMPLING_ROUNDS, "max_new_tokens": 4},
                                         reward={"name": "rounds_with_bonus:score",
                                                 "extra": [{"name": "rounds_with_bonus:bonus", "weight": 0.25}]}))
        trainer = Trainer(config, run_dir=tmp_path / "run")
        try:
            scored = trainer.collect()
        finally:
            trainer.close()
    metrics = scored.metrics
    assert metrics["data/sampling_rounds"] == 2.0 and metrics["reward/accuracy"] == 3 / 8
    assert metrics["reward/sampled_accuracy"] == 5 / 16
    assert metrics["reward/sampled_mean"] == pytest.approx(5 / 16 + 0.25)


def test_a_step_without_any_informative_group_trains_on_one_round_s_rows(tmp_path, tiny_model_dir, arithmetic_files):
    """Three rounds of all-zero rewards: nothing informative, so the step takes the first prompts_per_step x
    group_size rows, not the three rounds' 24."""
    train, _ = arithmetic_files
    with trainer_sampling_three_rounds(tmp_path, tiny_model_dir, train, "zero_rounds", "return 0.0\n") as trainer:
        try:
            scored = trainer.collect()
        finally:
            trainer.close()
    assert scored.metrics["data/sampling_rounds"] == 3.0 and scored.metrics["data/informative_groups"] == 0.0
    assert len(scored.rollouts) == 8 and len(scored.records) == 8 and scored.group_ids.tolist() == [0] * 4 + [1] * 4


def test_the_evaluation_line_lists_pass_at_k_in_numeric_order():
    from entrorl.trainer.progress import format_evaluation

    metrics = {"eval/n": 16.0, "eval/avg_at_n": 0.25, "eval/pass_at_16": 0.75, "eval/pass_at_2": 0.5,
               "eval/pass_at_1": 0.25}
    assert format_evaluation(metrics) == "eval Avg@16 0.25, Pass@1 0.25, Pass@2 0.5, Pass@16 0.75"
