"""The trainer's update loop and bookkeeping, checked on a tiny model: the non-finite guard counts steps in a row;
every mini-batch starts from zero gradients and later updates are off-policy (their old log-probs are the sampling
policy's) on shuffled rows; the predicted entropy change follows the clipped update; each metric is over the tokens it
names (trained, applied updates, the whole run); a checkpoint restores every generator and keeps exactly ``keep``; a
bfloat16 model's float32 copies are clipped; evaluation groups samples by prompt."""

from __future__ import annotations

import copy
import json
import random
import warnings

import numpy as np
import pytest
import torch

from entrorl.trainer import Trainer, TrainingStopped, load_config

from test_trainer import PARITY_REWARD, NaNLoss, importable_module, make_config  # noqa: E402


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
    collected = []
    original = trainer.collect
    monkeypatch.setattr(trainer, "collect", lambda: collected.append(original()) or collected[-1])
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


def test_checkpoint_keep_keeps_exactly_that_many(tmp_path, tiny_model_dir, arithmetic_files, trainer_for):
    train, _ = arithmetic_files
    trainer = trainer_for(tmp_path, tiny_model_dir, train, optim={"steps": 9, "lr": 1e-3}, checkpoint={"every": 1, "keep": 2})
    for step in (1, 2, 3, 4):
        trainer.step = step
        trainer.save()
    trainer.close()
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert kept == ["step_000003", "step_000004"]


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
