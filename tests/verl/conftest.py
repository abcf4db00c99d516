"""The verl tests run in the verl environment (`make install-verl`, `make test-verl`).

With ENTRORL_REQUIRE_VERL=1 (set by scripts/run_tests.sh) a missing or broken verl fails the run; elsewhere
(the main environment has no verl) each module skips itself with ``pytest.importorskip``, saying why.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

VERL_SKIP_REASON = "verl is not installed in this environment; run 'make test-verl' (it uses .venv-verl)"

if os.environ.get("ENTRORL_REQUIRE_VERL") == "1":
    try:
        importlib.import_module("verl.trainer.ppo.core_algos")
    except ImportError as error:
        raise RuntimeError(
            f"ENTRORL_REQUIRE_VERL=1 but verl cannot be imported ({error}); create the verl environment with "
            "'make install-verl'"
        ) from error


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def make_batch(seed: int = 0, batch: int = 6, length: int = 12, vocab: int = 11, off_policy: float = 0.3) -> dict:
    """verl-shaped tensors of one micro-batch: responses of varying length, per-token fields from real logits.

    ``log_prob`` and ``entropy`` are leaves that require grad (so tests can compare their gradients); ``disc``
    and ``disc_centered`` are the S and D of the same logits.
    """
    from entrorl.tokens import token_stats

    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, length + 1, (batch,), generator=generator)
    lengths[0] = length
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    logits = torch.randn(batch, length, vocab, generator=generator) * 2.0
    targets = torch.randint(0, vocab, (batch, length), generator=generator)
    stats = token_stats(logits, targets, need=("logprob", "entropy", "disc", "disc_centered"))
    noise = torch.randn(batch, length, generator=generator) * off_policy
    sequence_advantage = torch.randn(batch, generator=generator)
    return {
        "old_log_prob": stats.logprob.detach() + noise,
        "log_prob": stats.logprob.detach().clone().requires_grad_(True),
        "advantages": (sequence_advantage.unsqueeze(1) * mask).float(),
        "response_mask": mask,
        "entropy": stats.entropy.detach().clone().requires_grad_(True),
        "disc": stats.disc.detach(),
        "disc_centered": stats.disc_centered.detach(),
        "ref_log_prob": stats.logprob.detach() + torch.randn(batch, length, generator=generator) * 0.2,
        "rollout_log_prob": stats.logprob.detach() + noise + torch.randn(batch, length, generator=generator) * 0.1,
    }


def actor_config(loss_mode: str = "vanilla", entrorl: dict | None = None, **overrides):
    """A verl ``ActorConfig`` as the actor builds it (the policy_loss section typed for entrorl parameters)."""
    from entrorl.integrations.verl import EntrorlPolicyLossConfig
    from verl.workers.config import ActorConfig

    policy_keys = ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio", "ppo_kl_coef")
    policy = {key: overrides.pop(key) for key in policy_keys if key in overrides}
    return ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        policy_loss=EntrorlPolicyLossConfig(loss_mode=loss_mode, entrorl=dict(entrorl or {}), **policy),
        **overrides,
    )


@pytest.fixture
def batch_factory():
    """:func:`make_batch`."""
    return make_batch


@pytest.fixture
def config_factory():
    """:func:`actor_config`."""
    return actor_config
