"""entrorl's advantage estimators in verl's registry, found by verl's own lookup."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed; run 'make test-verl'")

import entrorl.integrations.verl  # noqa: E402,F401  (registers the estimators)
from entrorl.advantages import available_advantages, compute_advantages  # noqa: E402

NEEDS_LOG_PROBS = {"unlikely"}
ESTIMATORS = [info.name for info in available_advantages()]


def _rollouts(seed: int = 0):
    """16 responses to 4 prompts (uids interleaved, as strings sharing a long prefix like verl's uuids), rewards on
    the last valid token."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (16,), generator=generator)
    mask = torch.arange(8).unsqueeze(0) < lengths.unsqueeze(1)
    outcome = (torch.rand(16, generator=generator) > 0.5).float()
    token_level_rewards = torch.zeros(16, 8)
    token_level_rewards[torch.arange(16), lengths - 1] = outcome
    uids = np.array([f"3f2b8c1e-9d4a-4e7b-a1c0-00000000000{i % 4}" for i in range(16)], dtype=object)
    old_log_probs = -torch.rand(16, 8, generator=generator)
    return token_level_rewards, mask, uids, outcome, lengths, old_log_probs


@pytest.mark.parametrize("name", ESTIMATORS)
def test_estimator_through_verl_equals_entrorl(name):
    from omegaconf import OmegaConf

    rewards, mask, uids, outcome, lengths, old_log_probs = _rollouts()
    fn = core_algos.get_adv_estimator_fn(f"entrorl_{name}")
    config = OmegaConf.create({"adv_estimator": f"entrorl_{name}", "norm_adv_by_std_in_grpo": True, "entrorl": {}})
    extra = {"old_log_probs": old_log_probs} if name in NEEDS_LOG_PROBS else {}
    advantages, returns = fn(token_level_rewards=rewards, response_mask=mask.int(), config=config, index=uids, **extra)

    group_ids = torch.tensor([i % 4 for i in range(16)])
    seq_log_prob = (old_log_probs * mask).sum(-1) / lengths
    expected = compute_advantages(name, outcome, group_ids, lengths=lengths, seq_log_prob=seq_log_prob)
    assert advantages.shape == rewards.shape and advantages.dtype == rewards.dtype
    torch.testing.assert_close(advantages, expected.unsqueeze(1) * mask)
    torch.testing.assert_close(returns, advantages)
    assert bool((advantages[~mask] == 0).all())


def test_entrorl_grpo_matches_verl_grpo():
    rewards, mask, uids, *_ = _rollouts(seed=3)
    verl_adv, _ = core_algos.compute_grpo_outcome_advantage(token_level_rewards=rewards, response_mask=mask.float(), index=uids)
    ours, _ = core_algos.get_adv_estimator_fn("entrorl_grpo")(token_level_rewards=rewards, response_mask=mask, config=None, index=uids)
    torch.testing.assert_close(ours, verl_adv, atol=1e-5, rtol=1e-5)


def test_parameters_from_the_algorithm_section():
    from omegaconf import OmegaConf

    rewards, mask, uids, outcome, _, _ = _rollouts(seed=1)
    fn = core_algos.get_adv_estimator_fn("entrorl_grpo")
    dr = fn(token_level_rewards=rewards, response_mask=mask, config=OmegaConf.create({"norm_adv_by_std_in_grpo": False}), index=uids)[0]
    expected = compute_advantages("dr_grpo", outcome, torch.tensor([i % 4 for i in range(16)]))
    torch.testing.assert_close(dr, expected.unsqueeze(1) * mask)

    passk = core_algos.get_adv_estimator_fn("entrorl_passk")
    k2 = passk(token_level_rewards=rewards, response_mask=mask, config=OmegaConf.create({"entrorl": {"k": 2}}), index=uids)[0]
    expected_k2 = compute_advantages("passk", outcome, torch.tensor([i % 4 for i in range(16)]), k=2)
    torch.testing.assert_close(k2, expected_k2.unsqueeze(1) * mask)
    with pytest.raises(ValueError, match=r"entrorl_passk.*unknown parameter\(s\) kk.*algorithm.entrorl"):
        passk(token_level_rewards=rewards, response_mask=mask, config=OmegaConf.create({"entrorl": {"kk": 2}}), index=uids)
    # 4 responses per prompt: k = 8 names a prompt uid and verl's setting, not an internal group number
    with pytest.raises(ValueError, match=r"prompt uid .* has 4 response\(s\), fewer than k = 8 \(4 prompts in all\): set "
                                         r"actor_rollout_ref.rollout.n to at least k"):
        passk(token_level_rewards=rewards, response_mask=mask, config=OmegaConf.create({"entrorl": {"k": 8}}), index=uids)


def test_missing_groups_and_log_probs_are_clear_errors():
    rewards, mask, uids, *_ = _rollouts()
    with pytest.raises(ValueError, match="entrorl_rloo' needs verl's 'index'"):
        core_algos.get_adv_estimator_fn("entrorl_rloo")(token_level_rewards=rewards, response_mask=mask, config=None)
    with pytest.raises(ValueError, match="entrorl_unlikely' needs the old policy's log-probs.*no setting makes it work"):
        core_algos.get_adv_estimator_fn("entrorl_unlikely")(token_level_rewards=rewards, response_mask=mask, config=None, index=uids)


@pytest.mark.slow
@pytest.mark.parametrize("route", ["VERL_USE_EXTERNAL_MODULES", "verl.plugins entry point"])
def test_registration_through_verl_import_mechanisms(route):
    """A fresh process that only imports verl finds the estimators and losses, through either route."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("VERL_USE_EXTERNAL")}
    if route == "VERL_USE_EXTERNAL_MODULES":
        env["VERL_USE_EXTERNAL_PLUGINS"] = "none"  # so only the environment variable can have registered them
        env["VERL_USE_EXTERNAL_MODULES"] = "entrorl.integrations.verl"
    code = (
        "import sys, verl\n"
        "from verl.trainer.ppo import core_algos\n"
        "assert 'entrorl.integrations.verl' in sys.modules\n"
        "fn = core_algos.get_adv_estimator_fn('entrorl_rloo')\n"
        "core_algos.get_policy_loss_fn('entrorl_clip_b')\n"
        "print(fn.__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "compute_entrorl_rloo_advantage"


@pytest.mark.slow
def test_without_any_route_verl_does_not_know_them():
    """The control for the test above: with plugins off and no module named, the names are unknown."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("VERL_USE_EXTERNAL")}
    env["VERL_USE_EXTERNAL_PLUGINS"] = "none"
    code = "import verl\nfrom verl.trainer.ppo import core_algos\ncore_algos.get_adv_estimator_fn('entrorl_rloo')\n"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Unknown advantage estimator" in result.stderr


def _trainer_algorithm_section(loss_mode: str, bypass_mode: bool = False):
    """``config.algorithm`` of a verl-shaped OmegaConf configuration, as verl's trainers pass it to an estimator."""
    from omegaconf import OmegaConf

    root = OmegaConf.create({
        "algorithm": {"adv_estimator": "entrorl_w_reinforce", "entrorl": {},
                      "rollout_correction": {"bypass_mode": bypass_mode}},
        "actor_rollout_ref": {"actor": {"policy_loss": {"loss_mode": loss_mode}}},
    })
    return root.algorithm


def test_w_reinforce_estimator_with_the_w_reinforce_loss_mode_is_refused():
    """The estimator's +lambda / -1 advantages, scaled by lambda again by the loss mode, would give lambda squared."""
    rewards, mask, uids, *_ = _rollouts(seed=2)
    estimator = core_algos.get_adv_estimator_fn("entrorl_w_reinforce")
    with pytest.raises(ValueError, match=r"entrorl_w_reinforce.*lambda again \(lambda squared\).*adv_estimator=entrorl_signed_reward"):
        estimator(token_level_rewards=rewards, response_mask=mask, config=_trainer_algorithm_section("entrorl_w_reinforce"), index=uids)
    for fine in ("entrorl_grpo", "vanilla"):
        estimator(token_level_rewards=rewards, response_mask=mask, config=_trainer_algorithm_section(fine), index=uids)
    signed = core_algos.get_adv_estimator_fn("entrorl_signed_reward")
    signed(token_level_rewards=rewards, response_mask=mask, config=_trainer_algorithm_section("entrorl_w_reinforce"), index=uids)


def test_rollout_correction_bypass_with_an_own_correction_is_refused():
    rewards, mask, uids, *_ = _rollouts(seed=2)
    estimator = core_algos.get_adv_estimator_fn("entrorl_grpo")
    for mode in ("entrorl_tis", "entrorl_icepop"):
        with pytest.raises(ValueError, match=rf"{mode}.*bypass mode.*algorithm.rollout_correction.bypass_mode=False"):
            estimator(token_level_rewards=rewards, response_mask=mask, config=_trainer_algorithm_section(mode, True), index=uids)
    estimator(token_level_rewards=rewards, response_mask=mask, config=_trainer_algorithm_section("entrorl_tis"), index=uids)
    estimator(token_level_rewards=rewards, response_mask=mask, config=_trainer_algorithm_section("entrorl_grpo", True), index=uids)


def test_verl_releases_before_0_9_are_refused(monkeypatch):
    import verl

    from entrorl.integrations.verl.losses import check_verl_version

    rewards, mask, uids, *_ = _rollouts()
    estimator = core_algos.get_adv_estimator_fn("entrorl_grpo")
    check_verl_version.cache_clear()
    monkeypatch.setattr(verl, "__version__", "0.8.0")
    try:
        with pytest.raises(RuntimeError, match=r"needs verl >= 0.9.*verl 0.8.0 is installed"):
            estimator(token_level_rewards=rewards, response_mask=mask, config=None, index=uids)
    finally:
        check_verl_version.cache_clear()
    for version in ("0.9.0.dev0", "unknown"):  # a version that does not parse (a source checkout) is not refused
        monkeypatch.setattr(verl, "__version__", version)
        try:
            estimator(token_level_rewards=rewards, response_mask=mask, config=None, index=uids)
            assert check_verl_version() == version
        finally:
            check_verl_version.cache_clear()


def test_the_entrorl_section_overrides_verl_s_norm_adv_by_std():
    from entrorl.integrations.verl.estimators import make_advantage_estimator

    rewards = torch.zeros(4, 3)
    rewards[:, -1] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    advantages, _ = make_advantage_estimator("grpo")(
        rewards, torch.ones(4, 3, dtype=torch.bool), index=np.array(["a"] * 4, dtype=object),
        config={"norm_adv_by_std_in_grpo": True, "entrorl": {"norm_adv_by_std_in_grpo": False}})
    torch.testing.assert_close(advantages[:, 0], torch.tensor([0.75, -0.25, -0.25, -0.25]))  # centred, not divided


def test_reinforce_pp_refuses_a_discount_verl_s_own_would_apply():
    """verl's reinforce_plus_plus discounts returns-to-go by algorithm.gamma; entrorl's REINFORCE++ is undiscounted, so
    a gamma other than 1 is refused instead of left out; at 1, or unset, the two agree."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo import core_algos

    from entrorl.integrations.verl.estimators import make_advantage_estimator

    rewards, mask, uids, *_ = _rollouts(3)
    ours = make_advantage_estimator("reinforce_pp")
    with pytest.raises(ValueError, match=r"algorithm.gamma = 0.5 would discount .*set algorithm.gamma=1.0"):
        ours(rewards, mask, config=OmegaConf.create({"gamma": 0.5}), index=uids)
    verl_own = core_algos.get_adv_estimator_fn("reinforce_plus_plus")
    expected, _ = verl_own(token_level_rewards=rewards, response_mask=mask.float(), config=OmegaConf.create({"gamma": 1.0}))
    for config in (OmegaConf.create({"gamma": 1.0}), {}):
        advantages, _ = ours(rewards, mask, config=config, index=uids)
        torch.testing.assert_close(advantages[mask], expected[mask], rtol=1e-5, atol=1e-5)
    for other in ("grpo", "rloo"):  # the outcome-level estimators verl itself computes without gamma
        make_advantage_estimator(other)(rewards, mask, config=OmegaConf.create({"gamma": 0.5}), index=uids)


def test_reinforce_pp_refuses_a_kl_penalty_in_the_reward():
    """algorithm.use_kl_in_reward puts -beta KL on every token, which verl's reinforce_plus_plus turns into returns-to-go
    (each token its own); entrorl's REINFORCE++ takes one outcome per response, so it refuses rather than sum them
    into one; the outcome-level estimators, which verl also sums, take it."""
    from omegaconf import OmegaConf

    from entrorl.integrations.verl.estimators import make_advantage_estimator

    rewards, mask, uids, *_ = _rollouts(3)
    with_kl = OmegaConf.create({"gamma": 1.0, "use_kl_in_reward": True})
    with pytest.raises(ValueError, match="use_kl_in_reward puts a KL penalty on every token"):
        make_advantage_estimator("reinforce_pp")(rewards, mask, config=with_kl, index=uids)
    for other in ("grpo", "reinforce_pp_baseline"):
        make_advantage_estimator(other)(rewards, mask, config=with_kl, index=uids)


def test_an_index_of_another_length_than_the_batch_is_refused():
    from entrorl.integrations.verl.estimators import make_advantage_estimator

    with pytest.raises(ValueError, match="index has 5 uids for 4 responses"):
        make_advantage_estimator("grpo")(torch.zeros(4, 3), torch.ones(4, 3, dtype=torch.bool), config={},
                                         index=np.array(list("aabbc"), dtype=object))
    with pytest.raises(ValueError, match="index has 3 uids for 4 responses"):
        make_advantage_estimator("grpo")(torch.zeros(4, 3), torch.ones(4, 3, dtype=torch.bool), config={},
                                         index=np.array(list("aab"), dtype=object))


@pytest.mark.parametrize("name", ["grpo", "unlikely"])
def test_padding_carries_no_log_prob_and_the_advantages_keep_a_float_reward_dtype(name):
    """The mean old log-prob is over a response's valid tokens: -inf log-probs in the padding change nothing. The
    advantages keep float32 / float64 rewards' dtype."""
    from entrorl.integrations.verl.estimators import make_advantage_estimator

    rewards, mask, uids, _, _, old_log_probs = _rollouts(seed=4)
    rewards, old_log_probs = rewards.double(), old_log_probs.double()
    assert bool((~mask).any())
    estimator = make_advantage_estimator(name)
    clean, _ = estimator(rewards, mask, config={}, index=uids, old_log_probs=old_log_probs)
    noisy, _ = estimator(rewards, mask, config={}, index=uids,
                         old_log_probs=torch.where(mask, old_log_probs, torch.full_like(old_log_probs, float("-inf"))))
    assert clean.dtype == torch.float64 and bool(clean.ne(0).any())
    torch.testing.assert_close(noisy, clean)


def test_a_reward_verl_placed_outside_the_response_mask_counts_as_in_verl_s_grpo():
    """verl scores a response on its last attention-mask position, which need not be a response token: an empty
    response's at column -1, an agent loop's that ended on tool output on a masked tool token. verl's grpo sums every
    token-level reward; so does entrorl_grpo (dropping it would also move the advantages of the rest of the group)."""
    rewards = torch.zeros(3, 4)
    rewards[0, 3] = 1.0  # on the last valid token
    rewards[1, 3] = 1.0  # on a masked token
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.float32)
    index = np.array(["a", "a", "a"], dtype=object)
    verl_adv, _ = core_algos.compute_grpo_outcome_advantage(token_level_rewards=rewards, response_mask=mask, index=index)
    ours, _ = core_algos.get_adv_estimator_fn("entrorl_grpo")(token_level_rewards=rewards, response_mask=mask,
                                                             config=None, index=index)
    torch.testing.assert_close(ours, verl_adv, atol=1e-5, rtol=1e-5)
    assert ours[:, 0].tolist() == pytest.approx([3 ** -0.5, 3 ** -0.5, -2 * 3 ** -0.5], abs=1e-5)


def test_bf16_rewards_give_float32_advantages_as_verl_s_grpo_does():
    """Computed from the bf16 rewards in float32 (verl's grpo returns float32 too, after some bf16 arithmetic)."""
    rewards, mask, uids, outcome, *_ = _rollouts(seed=9)
    rewards = (rewards * 0.7).bfloat16()
    verl_adv, _ = core_algos.compute_grpo_outcome_advantage(token_level_rewards=rewards, response_mask=mask.float(),
                                                            index=uids)
    ours, _ = core_algos.get_adv_estimator_fn("entrorl_grpo")(token_level_rewards=rewards, response_mask=mask,
                                                             config=None, index=uids)
    assert ours.dtype == verl_adv.dtype == torch.float32
    expected = compute_advantages("grpo", (outcome * 0.7).bfloat16().float(), torch.tensor([i % 4 for i in range(16)]))
    torch.testing.assert_close(ours, expected.unsqueeze(1) * mask)
    torch.testing.assert_close(ours, verl_adv, atol=1e-2, rtol=1e-2)


def test_a_response_without_valid_tokens_weighs_nothing_in_token_whitening():
    """reinforce_pp whitens over tokens (weights = response lengths): an empty response has weight 0, not 1."""
    from entrorl.integrations.verl.estimators import make_advantage_estimator

    rewards, mask, uids, outcome, lengths, _ = _rollouts(seed=5)
    mask[3], rewards[3], outcome[3], lengths[3] = False, 0.0, 0.0, 0
    advantages, _ = make_advantage_estimator("reinforce_pp")(rewards, mask, config={}, index=uids)
    expected = compute_advantages("reinforce_pp", outcome, torch.tensor([i % 4 for i in range(16)]), lengths=lengths)
    torch.testing.assert_close(advantages, expected.unsqueeze(1) * mask)


def test_an_empty_response_has_a_mean_old_log_prob_of_zero():
    """A response without valid tokens averages no log-prob: 0, not 0 / 0, and its group's advantages stay finite."""
    from entrorl.integrations.verl.estimators import make_advantage_estimator

    rewards, mask, uids, outcome, lengths, old_log_probs = _rollouts(seed=6)
    mask[5], rewards[5], outcome[5], lengths[5] = False, 0.0, 0.0, 0
    advantages, _ = make_advantage_estimator("unlikely")(rewards, mask, config={}, index=uids, old_log_probs=old_log_probs)
    seq_log_prob = (old_log_probs * mask).sum(-1) / lengths.clamp(min=1)
    expected = compute_advantages("unlikely", outcome, torch.tensor([i % 4 for i in range(16)]), lengths=lengths,
                                  seq_log_prob=seq_log_prob)
    assert bool(advantages.isfinite().all())
    torch.testing.assert_close(advantages, expected.unsqueeze(1) * mask)


def test_registering_the_estimators_again_keeps_verl_s_functions():
    from entrorl.integrations.verl import register_advantage_estimators

    before = {name: core_algos.get_adv_estimator_fn(name) for name in (f"entrorl_{e}" for e in ESTIMATORS)}
    assert register_advantage_estimators() == list(before)
    assert all(core_algos.get_adv_estimator_fn(name) is fn for name, fn in before.items())


def test_an_entrorl_section_that_is_not_a_mapping_is_a_clear_error():
    from entrorl.integrations.verl.estimators import make_advantage_estimator

    with pytest.raises(ValueError, match=r"algorithm.entrorl must be a mapping of 'passk' parameters, got str"):
        make_advantage_estimator("passk")(torch.zeros(4, 3), torch.ones(4, 3, dtype=torch.bool), config={"entrorl": "k=2"},
                                          index=np.array(list("aabb"), dtype=object))


def test_the_outcome_reward_is_the_sum_of_token_level_rewards():
    """verl's token-level rewards may be spread over a response (a per-token KL penalty, partial scores): the outcome
    is their sum over the valid tokens, as verl's outcome estimators take it."""
    from entrorl.integrations.verl.estimators import make_advantage_estimator

    rewards, mask, uids, *_ = _rollouts(seed=7)
    generator = torch.Generator().manual_seed(8)
    spread = torch.where(mask, torch.rand(rewards.shape, generator=generator) * 0.5, 0.0)
    advantages, _ = make_advantage_estimator("grpo")(spread, mask, config={}, index=uids)
    verl_adv, _ = core_algos.compute_grpo_outcome_advantage(token_level_rewards=spread, response_mask=mask.float(), index=uids)
    torch.testing.assert_close(advantages, verl_adv, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gamma", [0.99, 1.01])
def test_reinforce_pp_refuses_any_discount_other_than_one(gamma):
    from entrorl.integrations.verl.estimators import make_advantage_estimator

    rewards, mask, uids, *_ = _rollouts(3)
    with pytest.raises(ValueError, match=rf"algorithm.gamma = {gamma} would discount .*set algorithm.gamma=1.0"):
        make_advantage_estimator("reinforce_pp")(rewards, mask, config={"gamma": gamma}, index=uids)


def test_a_configured_loss_mode_of_a_method_this_process_does_not_know_is_left_to_the_actor():
    """The driver may not know an entrorl method the workers register: the estimator computes its advantages."""
    rewards, mask, uids, outcome, *_ = _rollouts(seed=2)
    estimator = core_algos.get_adv_estimator_fn("entrorl_grpo")
    advantages, _ = estimator(token_level_rewards=rewards, response_mask=mask, index=uids,
                              config=_trainer_algorithm_section("entrorl_method_of_another_process", True))
    expected = compute_advantages("grpo", outcome, torch.tensor([i % 4 for i in range(16)]))
    torch.testing.assert_close(advantages, expected.unsqueeze(1) * mask)
