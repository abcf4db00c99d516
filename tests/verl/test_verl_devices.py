"""The verl loss modes and advantage estimators given tensors on a GPU, without one: on the second device that
``tests/simulated_device.py`` simulates on the CPU (a CPU tensor mixed with a device tensor raises as on CUDA), every
loss and gradient equals the CPU's."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed; run 'make test-verl'")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the simulation
import entrorl.integrations.verl  # noqa: E402,F401  (registers the loss modes and estimators)
from entrorl.advantages import available_advantages  # noqa: E402
from entrorl.objective import LOSS_AGG_MODES, available_methods  # noqa: E402
from simulated_device import OnDevice, on_device, simulated_device  # noqa: E402

FIELDS = ("entropy", "disc", "disc_centered", "ref_log_prob", "rollout_log_prob")
# parameters that make each method's selection act on a small batch (Clip-Cov without a seed: a private generator
# cannot be made on the simulated device; its random choice draws from torch's generator, seeded before each call)
ACTIVE = {"clip_b": {"mu": 0.5}, "clip_v": {"mu": 0.5, "max_frac": 0.2}, "clip_cov": {"clip_cov_ratio": 0.2},
          "forking_tokens": {"top_entropy_quantile": 0.5}, "low_entropy_tokens": {"top_entropy_quantile": 0.5},
          "adaptive_entropy": {"target_entropy": 10.0, "entropy_coeff": 0.01}}


def _loss_and_gradients(method: str, mode: str, dp_size: int, weights: torch.Tensor | None, on, make_batch,
                        actor_config) -> tuple:
    batch = make_batch(seed=1)
    moved = {name: on(value).requires_grad_(value.requires_grad) for name, value in batch.items()}
    n_tokens, n_seqs = int(batch["response_mask"].sum()), batch["response_mask"].shape[0]
    global_info = {} if dp_size == 1 else {"dp_size": 2, "batch_num_tokens": 2 * n_tokens + 5,
                                           "global_batch_size": 2 * n_seqs + 1, "loss_scale_factor": 9}
    config = actor_config(f"entrorl_{method}", entrorl=ACTIVE.get(method), global_batch_info=global_info)
    loss, metrics = core_algos.get_policy_loss_fn(f"entrorl_{method}")(
        old_log_prob=moved["old_log_prob"], log_prob=moved["log_prob"], advantages=moved["advantages"],
        response_mask=moved["response_mask"], loss_agg_mode=mode, config=config,
        rollout_is_weights=None if weights is None else on(weights), **{name: moved[name] for name in FIELDS})
    leaves = [moved["log_prob"], moved["entropy"]]
    gradients = torch.autograd.grad(loss, leaves, allow_unused=True)
    gradients = [torch.zeros_like(leaf) if gradient is None else gradient for gradient, leaf in zip(gradients, leaves)]
    return float(loss.detach()), [gradient.cpu() for gradient in gradients]


@pytest.mark.parametrize("method", [info.name for info in available_methods()])
def test_a_loss_mode_on_device_tensors_equals_the_cpu(method, batch_factory, config_factory):
    weights = torch.rand(batch_factory(seed=1)["response_mask"].shape, generator=torch.Generator().manual_seed(0)) + 0.5
    for mode in LOSS_AGG_MODES:
        for dp_size in (1, 2):
            for rollout_weights in (None, weights):
                torch.manual_seed(0)
                try:
                    expected = _loss_and_gradients(method, mode, dp_size, rollout_weights, lambda tensor: tensor,
                                                   batch_factory, config_factory)
                except ValueError as refused:  # a method that corrects the mismatch itself refuses verl's weights
                    assert rollout_weights is not None and "rollout_is_weights" in str(refused)
                    continue
                torch.manual_seed(0)
                with simulated_device():
                    got = _loss_and_gradients(method, mode, dp_size, rollout_weights, on_device, batch_factory,
                                              config_factory)
                assert got[0] == pytest.approx(expected[0], rel=1e-6, abs=1e-9), (mode, dp_size)
                for gradient, expected_gradient in zip(got[1], expected[1]):
                    torch.testing.assert_close(gradient, expected_gradient)


@pytest.mark.parametrize("name", [info.name for info in available_advantages()])
def test_an_estimator_on_device_tensors_equals_the_cpu(name):
    from omegaconf import OmegaConf

    rewards = torch.zeros(8, 5)
    rewards[torch.arange(8), 3] = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    mask = torch.ones(8, 5, dtype=torch.int32)
    uids = np.array(["a"] * 4 + ["b"] * 4, dtype=object)
    old_log_probs = -torch.linspace(0.1, 2.0, 40).reshape(8, 5)
    config = OmegaConf.create({"adv_estimator": f"entrorl_{name}", "norm_adv_by_std_in_grpo": True,
                               "entrorl": {"k": 2} if name == "passk" else {}})
    estimator = core_algos.get_adv_estimator_fn(f"entrorl_{name}")
    expected, _ = estimator(token_level_rewards=rewards, response_mask=mask, config=config, index=uids,
                            old_log_probs=old_log_probs)
    with simulated_device():
        got, returns = estimator(token_level_rewards=on_device(rewards), response_mask=on_device(mask), config=config,
                                 index=uids, old_log_probs=on_device(old_log_probs))
        assert isinstance(got, OnDevice) and isinstance(returns, OnDevice)
    torch.testing.assert_close(got.cpu(), expected)


@pytest.mark.parametrize("float64", [True, False], ids=["device", "device-without-float64"])
def test_the_actors_token_statistics_with_per_row_temperatures_on_a_device(float64, monkeypatch):
    """verl's distinct per-row temperatures ([N, 1]) go to token_stats on their device (float32 on an Apple GPU)."""
    import entrorl._checks
    from entrorl.integrations.verl.actor import actor_token_stats

    if not float64:
        monkeypatch.setattr(entrorl._checks, "DEVICES_WITHOUT_FLOAT64", frozenset({"mps", "meta"}))
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(15, 7, generator=generator)
    targets = torch.randint(0, 7, (15,), generator=generator)
    temperature = torch.full((15, 1), 0.7)
    temperature[5:] = 0.9
    expected = actor_token_stats(logits, targets, temperature=temperature)
    with simulated_device(float64=float64):
        got = actor_token_stats(on_device(logits), on_device(targets), temperature=on_device(temperature))
        assert all(isinstance(value, OnDevice) for value in got.values())
    for name, value in expected.items():
        torch.testing.assert_close(got[name].cpu(), value)
