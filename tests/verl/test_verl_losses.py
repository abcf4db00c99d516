"""entrorl's methods as verl policy losses: same loss and gradients as entrorl itself, verl's built-ins agree."""

from __future__ import annotations

import re

import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed; run 'make test-verl'")

import entrorl.integrations.verl  # noqa: E402,F401  (registers the loss modes)
from entrorl.dynamics import token_covariance  # noqa: E402
from entrorl.objective import LOSS_AGG_MODES, PolicyBatch, available_methods, build_objective  # noqa: E402

METHODS = [info.name for info in available_methods()]
FIELDS = ("entropy", "disc", "disc_centered", "ref_log_prob", "rollout_log_prob")

# verl's config values used throughout, and the entrorl parameter each one sets (written out here, independently
# of the integration's own table).
VERL_VALUES = {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0, "clip_cov_ratio": 0.05,
               "clip_cov_lb": -1e9, "clip_cov_ub": 1e9, "kl_cov_ratio": 0.1, "ppo_kl_coef": 0.5}
# Parameters that make each method's selection non-trivial on a 60-token batch.
ACTIVE = {"clip_b": {"mu": 0.5}, "clip_v": {"mu": 0.5, "max_frac": 0.2}, "clip_cov": {"seed": 3},
          "forking_tokens": {"top_entropy_quantile": 0.5}, "low_entropy_tokens": {"top_entropy_quantile": 0.5},
          "adaptive_entropy": {"target_entropy": 10.0, "entropy_coeff": 0.01}}


def _expected_params(method: str) -> dict:
    owned = {name for part in build_objective(method).parts for name in type(part).model_fields}
    return {**{k: v for k, v in VERL_VALUES.items() if k in owned}, **ACTIVE.get(method, {})}


def _grads(loss: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    leaves = [batch["log_prob"], batch["entropy"]]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return tuple(torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves))


def _verl_call(loss_mode: str, batch: dict, config, *, loss_agg_mode: str, mask=None, weights=None, extras=True, **more):
    fn = core_algos.get_policy_loss_fn(loss_mode)
    kwargs = {**({name: batch[name] for name in FIELDS} if extras else {}), **more}
    return fn(
        old_log_prob=batch["old_log_prob"],
        log_prob=batch["log_prob"],
        advantages=batch["advantages"],
        response_mask=batch["response_mask"] if mask is None else mask,
        loss_agg_mode=loss_agg_mode,
        config=config,
        rollout_is_weights=weights,
        **kwargs,
    )


def test_every_method_is_a_registered_loss_mode():
    registered = set(core_algos.POLICY_LOSS_REGISTRY)
    assert len(METHODS) >= 23
    assert {f"entrorl_{m}" for m in METHODS} <= registered
    assert {"vanilla", "clip_cov", "kl_cov"} <= registered  # verl's own modes untouched


@pytest.mark.parametrize("method", METHODS)
def test_verl_loss_equals_entrorl(method, batch_factory, config_factory):
    """Every mode, every aggregation, bool and 0/1 masks, local and data-parallel normalisers. One direct objective
    per setting is kept across calls, as the verl loss keeps its own: stateful parts evolve alike."""
    direct_objectives = {}
    for mode in LOSS_AGG_MODES:
        for float_mask in (False, True):
            for dp_size in (1, 2):
                batch = batch_factory(seed=len(method))
                n_tokens, n_seqs = int(batch["response_mask"].sum()), batch["response_mask"].shape[0]
                normalisers = {} if dp_size == 1 else {"dp_size": 2, "batch_num_tokens": 2 * n_tokens + 5,
                                                        "global_batch_size": 2 * n_seqs + 1}
                global_info = {} if dp_size == 1 else {**normalisers, "loss_scale_factor": 9}
                config = config_factory(f"entrorl_{method}", entrorl=ACTIVE.get(method), global_batch_info=global_info,
                                        **VERL_VALUES)
                mask = batch["response_mask"].float() if float_mask else None
                verl_loss, metrics = _verl_call(f"entrorl_{method}", batch, config, loss_agg_mode=mode, mask=mask)
                verl_grads = _grads(verl_loss, batch)

                scale = None if dp_size == 1 else 9
                if (mode, dp_size) not in direct_objectives:
                    direct_objectives[mode, dp_size] = build_objective(
                        method, loss_agg_mode=mode, loss_scale_factor=scale, **_expected_params(method))
                policy_batch = PolicyBatch(
                    log_prob=batch["log_prob"], old_log_prob=batch["old_log_prob"], advantages=batch["advantages"],
                    mask=batch["response_mask"], **{name: batch[name] for name in FIELDS},
                )
                output = direct_objectives[mode, dp_size](policy_batch, **normalisers)
                direct_grads = _grads(output.loss, batch)
                where = f"{method}, {mode}, float mask={float_mask}, dp={dp_size}"
                torch.testing.assert_close(verl_loss, output.loss, msg=lambda m: f"{where}: {m}")
                for ours, theirs in zip(verl_grads, direct_grads):
                    torch.testing.assert_close(ours, theirs, msg=lambda m: f"{where}: {m}")
                assert isinstance(metrics, dict) and all(isinstance(v, float) for v in metrics.values())
                if dp_size == 1:  # a whole loss: reported as it is
                    assert metrics["actor/loss/total"] == pytest.approx(float(output.loss.detach()))
                else:  # a partial sum, which verl's mean over micro-batches would misreport: left out here
                    assert "actor/loss/total" not in metrics
    if method in ACTIVE and method != "adaptive_entropy":
        assert output.metrics["select/dropped_frac"] > 0, f"{method}: the test parameters drop nothing"


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_verl_vanilla_equals_entrorl_dual_clip(mode, batch_factory, config_factory):
    """verl's PPO loss (clip-higher and dual-clip) is entrorl's ppo_clip, also with rollout weights and dp."""
    batch = batch_factory(seed=7, off_policy=0.8)
    generator = torch.Generator().manual_seed(1)
    weights = torch.rand(batch["log_prob"].shape, generator=generator) * 2
    n_tokens = int(batch["response_mask"].sum())
    info = {"dp_size": 2, "batch_num_tokens": 2 * n_tokens, "global_batch_size": 12, "loss_scale_factor": 7}
    config = config_factory("vanilla", clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, global_batch_info=info)
    verl_loss, verl_metrics = _verl_call("vanilla", batch, config, loss_agg_mode=mode, weights=weights, extras=False)
    verl_grad = torch.autograd.grad(verl_loss, batch["log_prob"])[0]

    ours_loss, ours_metrics = _verl_call("entrorl_dual_clip", batch, config, loss_agg_mode=mode, weights=weights, extras=False)
    ours_grad = torch.autograd.grad(ours_loss, batch["log_prob"])[0]
    torch.testing.assert_close(ours_loss, verl_loss)
    torch.testing.assert_close(ours_grad, verl_grad)
    assert ours_metrics["actor/ppo_kl"] == pytest.approx(verl_metrics["actor/ppo_kl"], abs=1e-6)
    # verl's clip fractions mean the same here: PPO's clipped branch, and dual-clip apart (both act on this batch)
    for key in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower"):
        assert verl_metrics[key] > 0 and ours_metrics[key] == pytest.approx(verl_metrics[key], abs=1e-6), key

    # the same from entrorl directly, weights applied by hand to the per-token loss
    objective = build_objective("dual_clip", clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode=mode, loss_scale_factor=7)
    policy_batch = PolicyBatch(log_prob=batch["log_prob"], old_log_prob=batch["old_log_prob"],
                               advantages=batch["advantages"], mask=batch["response_mask"])
    unweighted = objective(policy_batch, dp_size=2, batch_num_tokens=2 * n_tokens, global_batch_size=12).loss
    uniform = torch.full_like(weights, 1.5)
    weighted_uniform, _ = _verl_call("entrorl_dual_clip", batch, config, loss_agg_mode=mode, weights=uniform, extras=False)
    torch.testing.assert_close(weighted_uniform, 1.5 * unweighted)


def test_verl_kl_cov_equals_entrorl_kl_cov(batch_factory, config_factory):
    for mode in LOSS_AGG_MODES:
        batch = batch_factory(seed=11, off_policy=0.5)
        config = config_factory("kl_cov", kl_cov_ratio=0.1, ppo_kl_coef=0.7)
        verl_loss, _ = _verl_call("kl_cov", batch, config, loss_agg_mode=mode, extras=False)
        verl_grad = torch.autograd.grad(verl_loss, batch["log_prob"])[0]
        objective = build_objective("kl_cov", kl_cov_ratio=0.1, ppo_kl_coef=0.7, loss_agg_mode=mode)
        output = objective(PolicyBatch(log_prob=batch["log_prob"], old_log_prob=batch["old_log_prob"],
                                       advantages=batch["advantages"], mask=batch["response_mask"]))
        ours_grad = torch.autograd.grad(output.loss, batch["log_prob"])[0]
        torch.testing.assert_close(output.loss, verl_loss)
        torch.testing.assert_close(ours_grad, verl_grad)
        assert output.metrics["select/kl_cov_frac"] > 0


def _clip_cov_candidates(batch: dict, low: float, high: float, lb: float, ub: float) -> torch.Tensor:
    """Tokens Clip-Cov may drop, computed here from the paper's definition (arXiv 2505.22617)."""
    mask = batch["response_mask"]
    ratio = (batch["log_prob"].detach() - batch["old_log_prob"]).exp()
    advantages = batch["advantages"]
    ppo_clipped = (-advantages * ratio.clamp(1 - low, 1 + high)) > (-advantages * ratio)
    cov = token_covariance(batch["log_prob"].detach(), advantages, mask)
    return mask & ~ppo_clipped & (cov > lb) & (cov < ub)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_verl_clip_cov_drops_as_many_tokens_of_the_same_kind(seed, batch_factory, config_factory):
    """verl's Clip-Cov picks tokens at random: compare how many it drops and that all are candidates."""
    batch = batch_factory(seed=seed, batch=16, length=24, off_policy=0.3)
    mask = batch["response_mask"]
    settings = {"clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "clip_cov_ratio": 0.05, "clip_cov_lb": -0.05, "clip_cov_ub": 0.5}
    config = config_factory("clip_cov", **settings)
    candidates = _clip_cov_candidates(batch, 0.2, 0.2, -0.05, 0.5)
    expected = min(max(1, int(0.05 * int(mask.sum()))), int(candidates.sum()))
    assert 0 < expected < int(candidates.sum())  # a real random choice

    verl_loss, verl_metrics = _verl_call("clip_cov", batch, config, loss_agg_mode="token-mean", extras=False)
    verl_grad = torch.autograd.grad(verl_loss, batch["log_prob"])[0]
    ratio = (batch["log_prob"].detach() - batch["old_log_prob"]).exp()
    ppo_clipped = (-batch["advantages"] * ratio.clamp(0.8, 1.2)) > (-batch["advantages"] * ratio)
    verl_dropped = mask & (verl_grad == 0) & ~ppo_clipped & (batch["advantages"] != 0)

    objective = build_objective("clip_cov", clip_cov_ratio=0.05, clip_cov_lb=-0.05, clip_cov_ub=0.5,
                                clip_ratio_low=0.2, clip_ratio_high=0.2, seed=seed)
    output = objective(PolicyBatch(log_prob=batch["log_prob"], old_log_prob=batch["old_log_prob"],
                                   advantages=batch["advantages"], mask=mask))
    ours_dropped = mask & ~output.trained_mask

    assert int(verl_dropped.sum()) == int(ours_dropped.sum()) == expected
    assert bool((verl_dropped <= candidates).all()) and bool((ours_dropped <= candidates).all())
    assert verl_metrics["actor/pg_clipfrac"] == pytest.approx(output.metrics["select/clip_cov_frac"])
    # both keep the dropped tokens in the token-mean normaliser
    assert bool(output.loss_mask.equal(mask))

    # when every candidate is dropped the choice is no longer random: the losses are equal
    everything = config_factory("clip_cov", **{**settings, "clip_cov_ratio": 1.0})
    verl_all, _ = _verl_call("clip_cov", batch, everything, loss_agg_mode="token-mean", extras=False)
    ours_all = build_objective("clip_cov", clip_cov_ratio=1.0, clip_cov_lb=-0.05, clip_cov_ub=0.5,
                               clip_ratio_low=0.2, clip_ratio_high=0.2)(
        PolicyBatch(log_prob=batch["log_prob"], old_log_prob=batch["old_log_prob"], advantages=batch["advantages"], mask=mask))
    torch.testing.assert_close(ours_all.loss, verl_all)


def test_parameters_come_from_verl_config_and_the_entrorl_section(batch_factory, config_factory):
    batch = batch_factory(seed=5)
    config = config_factory("entrorl_clip_b", entrorl={"mu": 0.5}, clip_ratio_low=0.1, clip_ratio_high=0.3, clip_ratio_c=4.0)
    loss, _ = _verl_call("entrorl_clip_b", batch, config, loss_agg_mode="token-mean")
    expected = build_objective("clip_b", mu=0.5, clip_ratio_low=0.1, clip_ratio_high=0.3, clip_ratio_c=4.0)
    other = build_objective("clip_b", mu=2.5, clip_ratio_low=0.1, clip_ratio_high=0.3, clip_ratio_c=4.0)
    policy_batch = PolicyBatch(log_prob=batch["log_prob"], old_log_prob=batch["old_log_prob"],
                               advantages=batch["advantages"], mask=batch["response_mask"], disc=batch["disc"])
    torch.testing.assert_close(loss, expected(policy_batch).loss)
    assert not torch.allclose(expected(policy_batch).loss, other(policy_batch).loss)

    # a parameter set in both places: policy_loss.entrorl comes last and wins over verl's key
    both = config_factory("entrorl_clip_b", entrorl={"mu": 0.5, "clip_ratio_high": 0.05}, clip_ratio_low=0.1,
                          clip_ratio_high=0.3, clip_ratio_c=4.0)
    loss, _ = _verl_call("entrorl_clip_b", batch, both, loss_agg_mode="token-mean")
    entrorl_wins = build_objective("clip_b", mu=0.5, clip_ratio_low=0.1, clip_ratio_high=0.05, clip_ratio_c=4.0)
    torch.testing.assert_close(loss, entrorl_wins(policy_batch).loss)
    assert not torch.allclose(entrorl_wins(policy_batch).loss, expected(policy_batch).loss)


def test_hydra_style_config_with_the_entrorl_section(batch_factory):
    """The policy_loss section typed by ``_target_`` survives verl's own config conversion."""
    from omegaconf import OmegaConf

    from entrorl.integrations.verl import EntrorlPolicyLossConfig
    from verl.utils.config import omega_conf_to_dataclass

    raw = OmegaConf.create({
        "_target_": "verl.workers.config.FSDPActorConfig", "strategy": "fsdp", "rollout_n": 2,
        "ppo_micro_batch_size_per_gpu": 1,
        "policy_loss": {"_target_": "entrorl.integrations.verl.EntrorlPolicyLossConfig",
                        "loss_mode": "entrorl_forking_tokens", "entrorl": {"top_entropy_quantile": 0.5}},
    })
    config = omega_conf_to_dataclass(raw)
    assert isinstance(config.policy_loss, EntrorlPolicyLossConfig)
    batch = batch_factory(seed=2)
    _, metrics = _verl_call("entrorl_forking_tokens", batch, config, loss_agg_mode="token-mean")
    assert metrics["actor/select/forking_tokens_frac"] == pytest.approx(0.5, abs=0.05)


def test_unknown_parameter_is_a_clear_error(batch_factory, config_factory):
    batch = batch_factory()
    config = config_factory("entrorl_clip_b", entrorl={"muu": 3.0})
    with pytest.raises(ValueError, match=r"entrorl_clip_b.*unknown parameter 'muu' \(did you mean 'mu'\?\).*valid parameters.*'mu'") as error:
        _verl_call("entrorl_clip_b", batch, config, loss_agg_mode="token-mean")
    # verl passes these two to every loss itself, and policy_loss.entrorl refuses them: not offered as valid
    assert "loss_agg_mode" not in str(error.value) and "loss_scale_factor" not in str(error.value)


def test_verl_settings_that_replace_the_methods_own_are_named_once(batch_factory, config_factory):
    """verl's actor defaults (clip ratios 0.2, dual-clip at 3) take the place of GSPO's published ratios
    (3e-4 / 4e-4) unless set: the first call says so, naming each setting; what policy_loss.entrorl sets is the user's."""
    batch = batch_factory(seed=5)
    # ratios no other test uses: each setting's objective (and its warning) is built once per process
    with pytest.warns(UserWarning, match=r"entrorl_gspo' runs with verl's settings in place of the method's own: "
                                         r"clip_ratio_high 0.23 \(the method's: 0.0004\); clip_ratio_low 0.21 \(the method's: 0.0003\)"):
        _verl_call("entrorl_gspo", batch, config_factory("entrorl_gspo", clip_ratio_low=0.21, clip_ratio_high=0.23),
                   loss_agg_mode="seq-mean-token-mean")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        published = config_factory("entrorl_gspo", clip_ratio_low=3e-4, clip_ratio_high=4e-4)
        _verl_call("entrorl_gspo", batch, published, loss_agg_mode="seq-mean-token-mean")
        # set in policy_loss.entrorl, the ratios differ from the paper's by the user's own choice: nothing to say
        chosen = config_factory("entrorl_gspo", entrorl={"clip_ratio_low": 3.1e-4, "clip_ratio_high": 4.1e-4})
        _verl_call("entrorl_gspo", batch, chosen, loss_agg_mode="seq-mean-token-mean")


def test_verl_terms_that_would_count_twice_are_refused(batch_factory, config_factory):
    batch = batch_factory()
    with pytest.raises(ValueError, match=r"sets \['loss_agg_mode'\], which verl passes .*actor_rollout_ref.actor.loss_agg_mode"):
        _verl_call("entrorl_dr_grpo", batch, config_factory("entrorl_dr_grpo", entrorl={"loss_agg_mode": "seq-mean-token-sum-norm"}),
                   loss_agg_mode="token-mean")
    with pytest.raises(ValueError, match=r"sets \['loss_scale_factor'\], which verl passes .*actor_rollout_ref.actor.loss_scale_factor"):
        _verl_call("entrorl_dr_grpo", batch, config_factory("entrorl_dr_grpo", entrorl={"loss_scale_factor": 4.0}),
                   loss_agg_mode="token-mean")
    wrong_type = {"policy_loss": {"loss_mode": "entrorl_clip_b", "entrorl": "mu=3"}}  # a mistyped override, as a plain mapping
    with pytest.raises(ValueError, match="policy_loss.entrorl must be a mapping"):
        _verl_call("entrorl_clip_b", batch, wrong_type, loss_agg_mode="token-mean")
    for method in ("entropy_bonus", "adaptive_entropy"):
        with pytest.raises(ValueError, match=rf"entrorl_{method}' has its own entropy term \({method}\).*set actor_rollout_ref.actor.entropy_coeff=0"):
            _verl_call(f"entrorl_{method}", batch, config_factory(f"entrorl_{method}", entropy_coeff=0.01),
                       loss_agg_mode="token-mean")
    with pytest.raises(ValueError, match=r"entrorl_kl_ref' has its own KL .*set actor_rollout_ref.actor.kl_loss_coef=0"):
        _verl_call("entrorl_kl_ref", batch, config_factory("entrorl_kl_ref", use_kl_loss=True, kl_loss_coef=0.001),
                   loss_agg_mode="token-mean")
    _verl_call("entrorl_kl_ref", batch, config_factory("entrorl_kl_ref", use_kl_loss=True, kl_loss_coef=0.0),
               loss_agg_mode="token-mean")  # the working set-up: verl computes the reference, adds nothing


@pytest.mark.parametrize("method, field", [("clip_b", "disc"), ("clip_v", "disc_centered"), ("forking_tokens", "entropy"),
                                           ("entropy_advantage", "entropy"), ("entropy_bonus", "entropy"), ("adaptive_entropy", "entropy"), ("kl_ref", "ref_log_prob"), ("tis", "rollout_log_prob")])
def test_missing_statistics_name_the_actor_extension(method, field, batch_factory, config_factory):
    batch = batch_factory()
    with pytest.raises(ValueError, match=rf"entrorl_{method}.*needs per-token \['{field}'\].*actor extension.*ENTRORL_VERL_ACTOR_EXTENSION"):
        _verl_call(f"entrorl_{method}", batch, config_factory(f"entrorl_{method}"), loss_agg_mode="token-mean", extras=False)


def test_statistics_through_the_channel_equal_keywords(batch_factory, config_factory):
    from entrorl.integrations.verl import provide_token_fields

    batch = batch_factory(seed=4)
    config = config_factory("entrorl_clip_v", entrorl=ACTIVE["clip_v"])
    by_keyword, _ = _verl_call("entrorl_clip_v", batch, config, loss_agg_mode="token-mean")
    with provide_token_fields(disc_centered=batch["disc_centered"]):
        by_channel, _ = _verl_call("entrorl_clip_v", batch, config, loss_agg_mode="token-mean", extras=False)
    torch.testing.assert_close(by_channel, by_keyword)
    # a keyword given by the caller takes the place of the channel's field of the same name
    with provide_token_fields(disc_centered=-batch["disc_centered"]):
        by_both, _ = _verl_call("entrorl_clip_v", batch, config, loss_agg_mode="token-mean")
        by_negated, _ = _verl_call("entrorl_clip_v", batch, config, loss_agg_mode="token-mean", extras=False)
    torch.testing.assert_close(by_both, by_keyword)
    assert not torch.allclose(by_negated, by_keyword)  # the channel's field would give another loss
    with pytest.raises(ValueError, match="needs per-token"):  # the channel closes with the block
        _verl_call("entrorl_clip_v", batch, config, loss_agg_mode="token-mean", extras=False)


def test_nested_channel_blocks_see_the_inner_fields_and_restore_the_outer():
    from entrorl.integrations.verl import (collect_metric_aggregations, current_token_fields, provide_token_fields,
                                           record_metric_aggregations)

    entropy, disc = torch.ones(2, 3), torch.zeros(2, 3)
    with provide_token_fields(entropy=entropy, disc_centered=None):
        assert set(current_token_fields()) == {"entropy"}  # None entries are left out
        with provide_token_fields(disc=disc):
            assert set(current_token_fields()) == {"disc"}  # the inner fields only
        assert set(current_token_fields()) == {"entropy"} and current_token_fields()["entropy"] is entropy
    assert current_token_fields() == {}

    assert not record_metric_aggregations({"actor/loss/total": "sum"})  # outside any block: nothing records it
    with collect_metric_aggregations() as outer:
        with collect_metric_aggregations() as inner:
            assert record_metric_aggregations({"actor/loss/total": "sum"})
        assert record_metric_aggregations({"actor/ratio/max": "max"})
    assert inner == {"actor/loss/total": "sum"} and outer == {"actor/ratio/max": "max"}


def test_the_channel_refuses_what_it_cannot_carry():
    from entrorl.integrations.verl import collect_metric_aggregations, provide_token_fields, record_metric_aggregations

    with pytest.raises(ValueError, match=r"unknown per-token field\(s\) \['entropies'\]"):
        with provide_token_fields(entropies=torch.ones(2, 3)):
            pass
    for flat in (torch.ones(6), torch.ones(1, 2, 3)):
        with pytest.raises(ValueError, match=r"'entropy' must be a \[B, T\] tensor like log_prob, got \("):
            with provide_token_fields(entropy=flat):
                pass
    with pytest.raises(ValueError, match=r"unknown metric aggregation\(s\) \['mean'\]"):
        with collect_metric_aggregations():
            record_metric_aggregations({"actor/kl/ref": "mean"})


# (adaptive_entropy's coefficient and clip_cov's random choice change from one call to the next)
@pytest.mark.parametrize("method", [m for m in METHODS if build_objective(m).correction is None
                                    and m not in ("adaptive_entropy", "clip_cov")])
def test_unit_rollout_weights_leave_every_part_of_the_method_in_place(method, batch_factory, config_factory):
    """verl's rollout_is_weights take the place of a correction only: with weights 1 the selectors, shapers and
    regularisers act as without them, and loss and gradients are the same."""
    batch = batch_factory(seed=12)
    extra = {"use_kl_loss": True, "kl_loss_coef": 0.0} if method == "kl_ref" else {}
    config = config_factory(f"entrorl_{method}", entrorl=ACTIVE.get(method), **extra)
    unweighted, _ = _verl_call(f"entrorl_{method}", batch, config, loss_agg_mode="token-mean")
    unweighted_grads = _grads(unweighted, batch)
    weighted, metrics = _verl_call(f"entrorl_{method}", batch, config, loss_agg_mode="token-mean",
                                   weights=torch.ones_like(batch["log_prob"]))
    torch.testing.assert_close(weighted, unweighted)
    for ours, theirs in zip(_grads(weighted, batch), unweighted_grads):
        torch.testing.assert_close(ours, theirs)
    assert metrics["actor/correction/verl_is_weight_mean"] == 1.0


def test_rollout_weights_with_an_own_correction_are_refused(batch_factory, config_factory):
    batch = batch_factory()
    with pytest.raises(ValueError, match="own rollout correction.*rollout_is_weights"):
        _verl_call("entrorl_tis", batch, config_factory("entrorl_tis"), loss_agg_mode="token-mean",
                   weights=torch.ones_like(batch["log_prob"]))


def test_unsupported_aggregation_and_missing_global_counts(batch_factory, config_factory):
    batch = batch_factory()
    with pytest.raises(ValueError, match="token-sum.*not supported"):
        _verl_call("entrorl_grpo", batch, config_factory("entrorl_grpo"), loss_agg_mode="token-sum")
    config = config_factory("entrorl_grpo", global_batch_info={"dp_size": 4, "batch_num_tokens": None})
    with pytest.raises(ValueError, match="dp_size=4 but no batch_num_tokens"):
        _verl_call("entrorl_grpo", batch, config, loss_agg_mode="token-mean")
    # sequence aggregations are normalised by the global sequence count, not the token count
    config = config_factory("entrorl_grpo", global_batch_info={"dp_size": 4, "batch_num_tokens": 100})
    for mode in ("seq-mean-token-mean", "seq-mean-token-sum-norm"):
        with pytest.raises(ValueError, match="dp_size=4 but no global_batch_size"):
            _verl_call("entrorl_grpo", batch, config, loss_agg_mode=mode)
    config = config_factory("entrorl_grpo", global_batch_info={"dp_size": 1, "num_tokens": 100})
    with pytest.raises(ValueError, match=r"global_batch_info has keys \['num_tokens'\]"):
        _verl_call("entrorl_grpo", batch, config, loss_agg_mode="token-mean")
    with pytest.raises(TypeError, match=r"entrorl_grpo' got unexpected keyword\(s\) \['entropies'\]"):
        _verl_call("entrorl_grpo", batch, config_factory("entrorl_grpo"), loss_agg_mode="token-mean", extras=False,
                   entropies=batch["entropy"])


def _empty_mask(batch):
    return torch.zeros_like(batch["response_mask"])


@pytest.mark.parametrize("global_info", [{}, {"dp_size": 2, "batch_num_tokens": 100, "global_batch_size": 12}])
@pytest.mark.parametrize("method", METHODS)
def test_metric_names_do_not_depend_on_the_mask(method, global_info, batch_factory, config_factory):
    """verl's data-parallel aggregation needs the same metrics from every rank and micro-batch: a fully masked
    micro-batch reports every name a normal one does."""
    from entrorl.integrations.verl import collect_metric_aggregations

    batch = batch_factory(seed=3)
    extra = {"use_kl_loss": True, "kl_loss_coef": 0.0} if method == "kl_ref" else {}
    config = config_factory(f"entrorl_{method}", entrorl=ACTIVE.get(method), global_batch_info=dict(global_info), **extra)
    for collecting in (False, True):
        with collect_metric_aggregations() if collecting else _no_block():
            _, full = _verl_call(f"entrorl_{method}", batch, config, loss_agg_mode="token-mean")
            loss, empty = _verl_call(f"entrorl_{method}", batch, config, loss_agg_mode="token-mean", mask=_empty_mask(batch))
        assert set(empty) == set(full), f"{method}: {sorted(set(full) ^ set(empty))}"
        assert float(loss) == 0.0 and all(value == value for value in empty.values())


class _no_block:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_loss_terms_are_marked_as_sums_or_left_out(batch_factory, config_factory):
    """With the step's global counts a call's loss terms are partial sums and verl would average them: they are
    reported only where the actor extension retypes them (inside collect_metric_aggregations)."""
    from entrorl.integrations.verl import collect_metric_aggregations

    batch = batch_factory(seed=4)
    info = {"dp_size": 2, "batch_num_tokens": 90, "global_batch_size": 12}
    config = config_factory("entrorl_kl_ref", entrorl={"kl_loss_coef": 0.2}, use_kl_loss=True, kl_loss_coef=0.0,
                            global_batch_info=info)
    _, plain = _verl_call("entrorl_kl_ref", batch, config, loss_agg_mode="token-mean")
    summed = {"actor/loss/total", "actor/loss/policy", "actor/kl/ref"}
    assert not (summed | {"actor/ratio/max"}) & set(plain)
    assert plain["actor/tokens/valid"] == 90.0  # the step's global count, right under verl's mean
    with collect_metric_aggregations() as aggregations:
        loss, marked = _verl_call("entrorl_kl_ref", batch, config, loss_agg_mode="token-mean")
    assert aggregations == {**{name: "sum" for name in summed}, "actor/ratio/max": "max"}
    assert marked["actor/loss/total"] == pytest.approx(float(loss))
    assert set(marked) - set(plain) == set(aggregations)


@pytest.mark.parametrize("loss_agg_mode, info, partial", [
    ("token-mean", {"batch_num_tokens": 90}, True),
    ("token-mean", {"global_batch_size": 12}, False),  # token-mean ignores the sequence count: a whole loss
    ("seq-mean-token-mean", {"global_batch_size": 12}, True),
    ("seq-mean-token-mean", {"batch_num_tokens": 90}, False),  # a sequence mean ignores the token count
])
def test_a_loss_is_a_partial_sum_only_with_the_global_count_its_aggregation_uses(loss_agg_mode, info, partial, batch_factory):
    batch = batch_factory(seed=4)
    loss, metrics = _verl_call("entrorl_grpo", batch, {"global_batch_info": {"dp_size": 1, **info}},
                               loss_agg_mode=loss_agg_mode, extras=False)
    assert ("actor/loss/total" not in metrics) is partial
    if not partial:
        assert metrics["actor/loss/total"] == pytest.approx(float(loss))
    # tokens/valid is the step's count of valid tokens wherever verl gives it, the micro-batch's otherwise
    expected_tokens = info.get("batch_num_tokens", int(batch["response_mask"].sum()))
    assert metrics["actor/tokens/valid"] == float(expected_tokens)


def test_verl_kl_loss_type_selects_the_kl_ref_estimator(batch_factory, config_factory):
    """actor.kl_loss_type picks kl_ref's estimator where entrorl has the same one; verl's kl_penalty agrees."""
    from entrorl.integrations.verl import collect_metric_aggregations

    batch = batch_factory(seed=6)
    values = {}
    for verl_type, estimator in (("low_var_kl", "k3"), ("k3", "k3"), ("kl", "k1"), ("k1", "k1"), ("mse", "k2"), ("k2", "k2"),
                                  ("mse+", "k2"), ("k2+", "k2")):
        config = config_factory("entrorl_kl_ref", use_kl_loss=True, kl_loss_coef=0.0, kl_loss_type=verl_type, clip_ratio_c=3.0)
        with collect_metric_aggregations():
            _, metrics = _verl_call("entrorl_kl_ref", batch, config, loss_agg_mode="token-mean")
        mask = batch["response_mask"]
        verl_kl = core_algos.agg_loss(core_algos.kl_penalty(batch["log_prob"], batch["ref_log_prob"], verl_type), mask, "token-mean")
        assert metrics["actor/kl/ref"] == pytest.approx(float(verl_kl), rel=1e-5), verl_type
        values.setdefault(estimator, metrics["actor/kl/ref"])
    assert len(set(values.values())) == 3
    for unsupported in ("abs", "low_var_kl+", "k1+"):
        config = config_factory("entrorl_kl_ref", use_kl_loss=True, kl_loss_coef=0.0, kl_loss_type=unsupported)
        with pytest.raises(ValueError, match=rf"cannot honour actor_rollout_ref.actor.kl_loss_type='{re.escape(unsupported)}'.*low_var_kl"):
            _verl_call("entrorl_kl_ref", batch, config, loss_agg_mode="token-mean")


def test_w_reinforce_loss_mode_on_w_reinforce_advantages_warns(batch_factory, config_factory):
    """The w_reinforce estimator's +lambda / -1, scaled by lambda again, would train correct samples with lambda
    squared; signed_reward's +1 / -1 (the method's estimator) are what the loss mode expects."""
    import warnings

    batch = batch_factory(seed=7)
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0]).unsqueeze(1).expand_as(batch["log_prob"])
    config = config_factory("entrorl_w_reinforce", clip_ratio_c=7.0)  # a setting of its own: a fresh loss mode
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*runs with verl's settings")
        _verl_call("entrorl_w_reinforce", {**batch, "advantages": signs * batch["response_mask"]}, config, loss_agg_mode="token-mean")
        # other estimators' advantages: two positive values, or negatives other than -1
        two_positive = torch.tensor([0.1, -1.0, 0.5, -1.0, -1.0, 0.1]).unsqueeze(1) * batch["response_mask"]
        _verl_call("entrorl_w_reinforce", {**batch, "advantages": two_positive}, config, loss_agg_mode="token-mean")
        not_minus_one = torch.where(signs > 0, 0.1, -0.5) * batch["response_mask"]
        _verl_call("entrorl_w_reinforce", {**batch, "advantages": not_minus_one}, config, loss_agg_mode="token-mean")
    squared = torch.where(signs > 0, 0.1, -1.0) * batch["response_mask"]
    with pytest.warns(UserWarning, match=r"entrorl_w_reinforce.*\+0.1 / -1.*lambda squared.*adv_estimator=entrorl_signed_reward"):
        _verl_call("entrorl_w_reinforce", {**batch, "advantages": squared}, config, loss_agg_mode="token-mean")


def test_rollout_correction_bypass_is_refused_or_warned(batch_factory, config_factory):
    """verl's bypass mode makes the old log-probs the rollout's: tis / icepop weights are exp(0) = 1."""
    from entrorl.integrations.verl import EntrorlPolicyLossConfig
    from verl.trainer.config import RolloutCorrectionConfig
    from verl.workers.config import ActorConfig

    batch = batch_factory(seed=8)
    policy_loss = EntrorlPolicyLossConfig(loss_mode="entrorl_tis", rollout_correction=RolloutCorrectionConfig(bypass_mode=True))
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, policy_loss=policy_loss)
    with pytest.raises(ValueError, match=r"entrorl_tis.*bypass mode.*algorithm.rollout_correction.bypass_mode=False"):
        _verl_call("entrorl_tis", batch, config, loss_agg_mode="token-mean")
    bypassed = {**batch, "rollout_log_prob": batch["old_log_prob"].clone()}
    config = config_factory("entrorl_icepop", clip_ratio_c=6.0)
    with pytest.warns(UserWarning, match=r"entrorl_icepop.*old and the rollout log-probs are equal.*bypass_mode=False"):
        _verl_call("entrorl_icepop", bypassed, config, loss_agg_mode="token-mean")
    # equal on the valid tokens is enough: the padding differs (verl pads the rollout log-probs with 0)
    padded = {**batch, "rollout_log_prob": torch.where(batch["response_mask"], batch["old_log_prob"], 0.0)}
    assert not torch.equal(padded["rollout_log_prob"], batch["old_log_prob"])
    with pytest.warns(UserWarning, match=r"entrorl_icepop.*old and the rollout log-probs are equal.*bypass_mode=False"):
        _verl_call("entrorl_icepop", padded, config_factory("entrorl_icepop", clip_ratio_c=6.5), loss_agg_mode="token-mean")
    # a fully masked micro-batch has no token to compare: no evidence of bypass mode
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*runs with verl's settings")
        _verl_call("entrorl_icepop", bypassed, config_factory("entrorl_icepop", clip_ratio_c=6.6), loss_agg_mode="token-mean",
                   mask=_empty_mask(batch))


@pytest.mark.parametrize("method", ["gspo", "cispo", "grpo"])
def test_every_clipped_surrogate_reports_verl_clip_fractions(method, batch_factory, config_factory):
    _, metrics = _verl_call(f"entrorl_{method}", batch_factory(seed=9), config_factory(f"entrorl_{method}"),
                            loss_agg_mode="token-mean")
    assert {"actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"} <= set(metrics)


def kl_cov_mini_batch(batch_factory, config, *, micro_batches: int, tokens: int, sequences: int, on_policy: bool,
                      zero_advantages: bool = False, dp_size: int = 1) -> None:
    """One mini-batch of ``entrorl_kl_cov`` loss calls, one per micro-batch, under verl's global counts ``tokens`` and
    ``sequences`` over ``dp_size`` workers; ``on_policy``: old log-probs equal to the current ones on the valid
    tokens."""
    for seed in range(micro_batches):
        batch = batch_factory(seed=seed)
        mask = batch["response_mask"]
        if on_policy:  # equal on the valid tokens; what the padding holds is no evidence
            batch["old_log_prob"] = torch.where(mask, batch["log_prob"].detach(), 0.0)
        if zero_advantages:
            batch["advantages"] = torch.where(mask, 0.0, 1.0)
        config.global_batch_info.update({"dp_size": dp_size, "batch_num_tokens": tokens, "global_batch_size": sequences})
        _verl_call("entrorl_kl_cov", batch, config, loss_agg_mode="token-mean")


def test_kl_cov_warns_after_on_policy_mini_batches_not_micro_batches(batch_factory, config_factory):
    """In verl each step's first mini-batch is on-policy and every micro-batch is a loss call: four on-policy
    micro-batches followed by an off-policy mini-batch are KL-Cov working as intended. Three on-policy mini-batches
    in a row (one mini-batch per step) are a no-op, and the loss says so."""
    import warnings

    def mini_batch(tokens, on_policy, config, zero_advantages=False):
        kl_cov_mini_batch(batch_factory, config, micro_batches=4, tokens=tokens, sequences=24, on_policy=on_policy,
                          zero_advantages=zero_advantages)

    config = config_factory("entrorl_kl_cov", kl_cov_ratio=0.11, ppo_kl_coef=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            mini_batch(200 + step, True, config)
            mini_batch(300 + step, False, config)
    assert not [w for w in caught if "kl_cov" in str(w.message).lower() and "on-policy" in str(w.message)]

    config = config_factory("entrorl_kl_cov", kl_cov_ratio=0.12, ppo_kl_coef=1.0)
    with pytest.warns(UserWarning, match=r"entrorl_kl_cov.*3 mini-batches in a row.*no-op strictly on-policy"):
        for step in range(3):
            mini_batch(400 + step, True, config)

    # advantages all 0 (every group's rewards equal): the policy loss moves no weight, so such mini-batches are no
    # evidence either way, neither counted nor resetting the count (settings of their own: warnings are per loss mode)
    config = config_factory("entrorl_kl_cov", kl_cov_ratio=0.13, ppo_kl_coef=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            mini_batch(500 + step, True, config, zero_advantages=True)
        mini_batch(600, True, config)
        mini_batch(601, True, config)
        mini_batch(602, True, config, zero_advantages=True)
    assert not [w for w in caught if "on-policy" in str(w.message)]
    with pytest.warns(UserWarning, match=r"entrorl_kl_cov.*3 mini-batches in a row.*no-op strictly on-policy"):
        mini_batch(603, True, config)


@pytest.mark.parametrize("dp_size, others_tokens", [(1, 0), (2, 1), (2, 3)])
def test_kl_cov_tells_apart_mini_batches_whose_global_counts_are_equal(batch_factory, config_factory, dp_size,
                                                                       others_tokens):
    """Consecutive steps often have equal global counts (the same number of sequences; every response at its length
    limit): a mini-batch then ends when this worker's micro-batches have added up to its share of the rows, so one
    mini-batch per step still warns after three steps, and two per step (the second off-policy) never does; with data
    parallelism as without, the other worker holding as many tokens as this one or three times as many (verl deals
    rows out evenly, not tokens)."""
    import warnings

    micro_batches = [batch_factory(seed=seed) for seed in range(2)]
    tokens = (1 + others_tokens) * sum(int(batch["response_mask"].sum()) for batch in micro_batches)

    def mini_batch(config, on_policy):
        kl_cov_mini_batch(batch_factory, config, micro_batches=2, tokens=tokens, sequences=12 * dp_size,
                          on_policy=on_policy, dp_size=dp_size)

    config = config_factory("entrorl_kl_cov", kl_cov_ratio=0.15 + (dp_size + others_tokens) / 100, ppo_kl_coef=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            mini_batch(config, on_policy=True)
    assert not [w for w in caught if "mini-batches in a row" in str(w.message)]  # two steps: not yet
    with pytest.warns(UserWarning, match=r"entrorl_kl_cov.*3 mini-batches in a row.*no-op strictly on-policy"):
        mini_batch(config, on_policy=True)

    config = config_factory("entrorl_kl_cov", kl_cov_ratio=0.45 + (dp_size + others_tokens) / 100, ppo_kl_coef=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            mini_batch(config, on_policy=True)
            mini_batch(config, on_policy=False)
    assert not [w for w in caught if "mini-batches in a row" in str(w.message)]


# the actor configuration's fallbacks and the normalisers' edge cases
def test_dp_size_2_without_the_global_token_count_is_refused(batch_factory):
    with pytest.raises(ValueError, match="dp_size=2 but no batch_num_tokens"):
        _verl_call("entrorl_grpo", batch_factory(), {"global_batch_info": {"dp_size": 2}}, loss_agg_mode="token-mean",
                   extras=False)


def test_maxima_are_marked_as_maxima_even_without_global_counts(batch_factory):
    from entrorl.integrations.verl import collect_metric_aggregations

    with collect_metric_aggregations() as aggregations:
        _, metrics = _verl_call("entrorl_grpo", batch_factory(), {}, loss_agg_mode="token-mean", extras=False)
    assert "actor/ratio/max" in metrics
    assert aggregations == {"actor/ratio/max": "max"}  # never averaged; no loss term is summed without global counts
    # outside the block: one call is the whole loss, and its maximum is reported as it is
    batch = batch_factory()
    _, plain = _verl_call("entrorl_grpo", batch, {}, loss_agg_mode="token-mean", extras=False)
    ratio = (batch["log_prob"].detach() - batch["old_log_prob"]).exp()[batch["response_mask"]]
    assert plain["actor/ratio/max"] == pytest.approx(float(ratio.max()), rel=1e-6)


def test_loss_scale_factor_falls_back_to_the_actor_config(batch_factory):
    batch = batch_factory()
    by_7, _ = _verl_call("entrorl_grpo", batch, {"loss_scale_factor": 7.0}, loss_agg_mode="seq-mean-token-sum-norm",
                         extras=False)
    by_14, _ = _verl_call("entrorl_grpo", batch, {"loss_scale_factor": 14.0}, loss_agg_mode="seq-mean-token-sum-norm",
                          extras=False)
    assert float(by_7) != 0.0 and float(by_7) == pytest.approx(2 * float(by_14), rel=1e-6)
    # verl's global_batch_info carries the step's factor, which wins over the actor config's
    both, _ = _verl_call("entrorl_grpo", batch, {"loss_scale_factor": 7.0, "global_batch_info": {"loss_scale_factor": 14.0}},
                         loss_agg_mode="seq-mean-token-sum-norm", extras=False)
    assert float(both) == pytest.approx(float(by_14), rel=1e-6)


@pytest.mark.parametrize("factor", [True, 10**400, "abc", 0, float("inf")])
def test_a_loss_scale_factor_that_is_not_a_finite_positive_number_is_refused_naming_it(batch_factory, factor):
    """From the actor config or verl's global_batch_info, as everywhere else: True is no divisor of 1."""
    batch = batch_factory()
    for config in ({"loss_scale_factor": factor}, {"global_batch_info": {"loss_scale_factor": factor}}):
        where = "global_batch_info's" if "global_batch_info" in config else "actor_rollout_ref.actor."
        with pytest.raises(ValueError, match=rf"^verl: loss_scale_factor must be a finite number > 0, got .* \(from "
                                             rf"{where}"):
            _verl_call("entrorl_grpo", batch, config, loss_agg_mode="seq-mean-token-sum-norm", extras=False)


def test_verl_clip_ratio_is_the_fallback_for_both_clip_bounds(batch_factory):
    batch = batch_factory(seed=1)
    loss, _ = _verl_call("entrorl_grpo", batch, {"clip_ratio": 0.05}, loss_agg_mode="token-mean", extras=False)

    def direct(**params):
        return float(build_objective("grpo", loss_agg_mode="token-mean", **params)(PolicyBatch(
            log_prob=batch["log_prob"], old_log_prob=batch["old_log_prob"], advantages=batch["advantages"],
            mask=batch["response_mask"])).loss)

    expected = direct(clip_ratio_low=0.05, clip_ratio_high=0.05)
    assert expected != pytest.approx(direct())  # clipping at 0.05 acts on this batch
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_the_verl_is_weight_mean_is_over_the_valid_tokens(batch_factory):
    batch = batch_factory(seed=2)
    weights = torch.where(batch["response_mask"], 0.5, 100.0).to(batch["log_prob"].dtype)
    _, metrics = _verl_call("entrorl_grpo", batch, {}, loss_agg_mode="token-mean", weights=weights, extras=False)
    assert metrics["actor/correction/verl_is_weight_mean"] == pytest.approx(0.5)



def test_an_empty_micro_batch_reads_a_verl_weight_mean_of_one(batch_factory):
    batch = batch_factory(seed=2)
    weights = torch.full_like(batch["log_prob"], 0.5)
    _, metrics = _verl_call("entrorl_grpo", batch, {}, loss_agg_mode="token-mean", weights=weights, extras=False,
                            mask=_empty_mask(batch))
    assert metrics["actor/correction/verl_is_weight_mean"] == 1.0


@pytest.mark.parametrize("method", ["gspo", "cispo"])
def test_a_surrogate_without_dual_clip_reports_no_lower_clip_fraction(method, batch_factory, config_factory):
    """verl's pg_clipfrac_lower is the dual-clip share: 0 for a surrogate without dual clip, however much it clips."""
    _, metrics = _verl_call(f"entrorl_{method}", batch_factory(seed=9, off_policy=0.8), config_factory(f"entrorl_{method}"),
                            loss_agg_mode="token-mean")
    assert metrics["actor/pg_clipfrac"] == pytest.approx(metrics[f"actor/clip/{method}_frac"]) and metrics["actor/pg_clipfrac"] > 0
    assert metrics["actor/pg_clipfrac_lower"] == 0.0


def test_an_input_warning_is_given_once_per_loss_mode(batch_factory, config_factory):
    import warnings

    batch = batch_factory(seed=8)
    bypassed = {**batch, "rollout_log_prob": batch["old_log_prob"].clone()}
    config = config_factory("entrorl_icepop", clip_ratio_c=6.7)  # a setting of its own: a fresh loss mode
    with pytest.warns(UserWarning, match=r"old and the rollout log-probs are equal"):
        _verl_call("entrorl_icepop", bypassed, config, loss_agg_mode="token-mean")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _verl_call("entrorl_icepop", bypassed, config, loss_agg_mode="token-mean")


def test_kl_cov_without_global_counts_counts_every_call_as_a_mini_batch(batch_factory, config_factory):
    """Without verl's global counts nothing ties calls to a mini-batch: three on-policy calls in a row warn."""
    import warnings

    config = config_factory("entrorl_kl_cov", kl_cov_ratio=0.14, ppo_kl_coef=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(3):
            batch = batch_factory(seed=seed)
            batch["old_log_prob"] = torch.where(batch["response_mask"], batch["log_prob"].detach(), 0.0)
            _verl_call("entrorl_kl_cov", batch, config, loss_agg_mode="token-mean")
    assert [w for w in caught if re.search(r"entrorl_kl_cov.*3 mini-batches in a row", str(w.message))]


def test_the_loss_refuses_verl_releases_before_0_9(monkeypatch, batch_factory):
    import verl

    from entrorl.integrations.verl.losses import check_verl_version

    check_verl_version.cache_clear()
    monkeypatch.setattr(verl, "__version__", "0.8.2")
    try:
        with pytest.raises(RuntimeError, match=r"needs verl >= 0.9.*verl 0.8.2 is installed"):
            _verl_call("entrorl_grpo", batch_factory(), {}, loss_agg_mode="token-mean", extras=False)
    finally:
        check_verl_version.cache_clear()


@pytest.mark.parametrize("method", ["entropy_bonus", "adaptive_entropy"])
def test_a_negative_verl_entropy_coeff_is_refused_next_to_an_own_entropy_term(method, batch_factory, config_factory):
    with pytest.raises(ValueError, match=rf"entrorl_{method}' has its own entropy term.*entropy_coeff = -0.01"):
        _verl_call(f"entrorl_{method}", batch_factory(), config_factory(f"entrorl_{method}", entropy_coeff=-0.01),
                   loss_agg_mode="token-mean")


def test_an_unknown_method_fails_when_its_loss_is_made():
    from entrorl.integrations.verl import make_policy_loss

    with pytest.raises(ValueError, match="no_such_method"):
        make_policy_loss("no_such_method")


def test_the_channel_s_fields_and_records_are_its_own():
    """What current_token_fields returns is a copy: changing it leaves the open block's fields alone. Inside a
    collecting block a record, even an empty one, is taken."""
    from entrorl.integrations.verl import collect_metric_aggregations, current_token_fields, provide_token_fields, record_metric_aggregations

    entropy = torch.ones(2, 3)
    with provide_token_fields(entropy=entropy):
        current_token_fields()["disc"] = torch.zeros(2, 3)
        current_token_fields().pop("entropy")
        assert set(current_token_fields()) == {"entropy"}
    with collect_metric_aggregations() as collected:
        assert record_metric_aggregations({}) is True
    assert collected == {}


def test_a_keyword_given_as_none_leaves_the_channel_s_field_in_place(batch_factory, config_factory):
    """A caller passing ``disc_centered=None`` gives nothing: the channel's field is used, as when it is left out."""
    from entrorl.integrations.verl import provide_token_fields

    batch = batch_factory(seed=4)
    config = config_factory("entrorl_clip_v", entrorl=ACTIVE["clip_v"])
    by_keyword, _ = _verl_call("entrorl_clip_v", batch, config, loss_agg_mode="token-mean")
    with provide_token_fields(disc_centered=batch["disc_centered"]):
        by_channel, _ = _verl_call("entrorl_clip_v", batch, config, loss_agg_mode="token-mean", extras=False,
                                   disc_centered=None)
    torch.testing.assert_close(by_channel, by_keyword)


def test_registered_loss_modes_are_the_entrorl_modes_of_verl_s_registry():
    from entrorl.integrations.verl import registered_loss_modes

    modes = registered_loss_modes()
    assert modes == sorted(name for name in core_algos.POLICY_LOSS_REGISTRY if name.startswith("entrorl_"))
    assert {f"entrorl_{m}" for m in METHODS} <= set(modes)
    assert not {"vanilla", "clip_cov", "kl_cov", "gspo"} & set(modes)  # verl's own modes are not entrorl's


def test_kl_cov_without_a_token_count_counts_the_rows_that_have_valid_tokens(batch_factory, config_factory):
    """With only verl's sequence count, a mini-batch ends when its micro-batches' non-empty rows add up to it: a
    fully masked row is no sequence. Two micro-batches of 5 valid rows (and one empty row each) under a count of 10
    are one mini-batch, so one on-policy mini-batch per step warns after the third step, not the second."""
    import warnings

    config = config_factory("entrorl_kl_cov", kl_cov_ratio=0.17, ppo_kl_coef=1.0)

    def step():
        for seed in range(2):
            batch = batch_factory(seed=seed)
            mask = batch["response_mask"].clone()
            mask[-1] = False  # an empty row
            batch["old_log_prob"] = torch.where(mask, batch["log_prob"].detach(), 0.0)
            config.global_batch_info.update({"dp_size": 1, "batch_num_tokens": None, "global_batch_size": 10})
            _verl_call("entrorl_kl_cov", batch, config, loss_agg_mode="seq-mean-token-mean", mask=mask)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
        step()
    assert not [w for w in caught if "mini-batches in a row" in str(w.message)]
    with pytest.warns(UserWarning, match=r"entrorl_kl_cov.*3 mini-batches in a row"):
        step()


def test_the_bypass_warning_needs_log_probs_that_are_equal_not_close(batch_factory, config_factory):
    """Rollout log-probs 1e-6 away from the old ones come from another engine (no bypass mode): no warning."""
    import warnings

    batch = batch_factory(seed=8)
    close = {**batch, "rollout_log_prob": batch["old_log_prob"] + 1e-6}
    assert not torch.equal(close["rollout_log_prob"], batch["old_log_prob"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*runs with verl's settings")
        _verl_call("entrorl_icepop", close, config_factory("entrorl_icepop", clip_ratio_c=6.8), loss_agg_mode="token-mean")


def test_verl_weights_of_another_dtype_keep_the_loss_in_the_log_prob_dtype(batch_factory):
    batch = batch_factory(seed=2)
    weights = torch.rand(batch["log_prob"].shape, generator=torch.Generator().manual_seed(3)) + 0.5
    as_float32, _ = _verl_call("entrorl_grpo", batch, {}, loss_agg_mode="token-mean", weights=weights, extras=False)
    as_float64, _ = _verl_call("entrorl_grpo", batch, {}, loss_agg_mode="token-mean", weights=weights.double(),
                               extras=False)
    assert as_float64.dtype == batch["log_prob"].dtype == torch.float32
    torch.testing.assert_close(as_float64, as_float32)


def test_a_fractional_loss_scale_factor_divides_as_given(batch_factory):
    batch = batch_factory()
    by_2_5, _ = _verl_call("entrorl_grpo", batch, {"global_batch_info": {"loss_scale_factor": 2.5}},
                           loss_agg_mode="seq-mean-token-sum-norm", extras=False)
    by_5, _ = _verl_call("entrorl_grpo", batch, {"global_batch_info": {"loss_scale_factor": 5}},
                         loss_agg_mode="seq-mean-token-sum-norm", extras=False)
    assert float(by_5.detach()) != 0.0 and float(by_2_5.detach()) == pytest.approx(2 * float(by_5.detach()), rel=1e-6)


def test_each_verl_key_sets_the_parameter_of_the_same_name(config_factory):
    """verl's actor and policy_loss keys reach every method that owns a parameter of that name, with the value verl
    holds (values here unlike any method's default), and no method that does not."""
    from entrorl.integrations.verl import entrorl_parameters

    values = {"clip_ratio_low": 0.11, "clip_ratio_high": 0.31, "clip_ratio_c": 4.5, "clip_cov_ratio": 0.07,
              "clip_cov_lb": -0.3, "clip_cov_ub": 0.9, "kl_cov_ratio": 0.13, "ppo_kl_coef": 0.6}
    for method in METHODS:
        owned = {name for part in build_objective(method).parts for name in type(part).model_fields}
        params = entrorl_parameters(method, config_factory(f"entrorl_{method}", **values))
        assert {key: params[key] for key in values if key in params} == {
            key: value for key, value in values.items() if key in owned}, method
    assert {"clip_cov_lb", "clip_cov_ub", "clip_cov_ratio"} <= set(entrorl_parameters("clip_cov", config_factory(
        "entrorl_clip_cov", **values)))


def test_a_negative_verl_kl_loss_coef_is_refused_next_to_kl_ref(batch_factory, config_factory):
    """verl adds kl_loss_coef times its KL whatever the sign: next to kl_ref's own KL it would count twice."""
    with pytest.raises(ValueError, match=r"entrorl_kl_ref' has its own KL .*set actor_rollout_ref.actor.kl_loss_coef=0"):
        _verl_call("entrorl_kl_ref", batch_factory(),
                   config_factory("entrorl_kl_ref", use_kl_loss=True, kl_loss_coef=-0.001), loss_agg_mode="token-mean")


def test_rollout_log_probs_equal_to_the_old_ones_leave_a_method_without_correction_alone(batch_factory, config_factory):
    """The actor extension forwards verl's rollout log-probs to every method: equal to the old ones (bypass mode), they
    are no concern of a method that does not correct by them: no warning, and the loss of the method as it is."""
    import warnings

    batch = batch_factory(seed=8)
    bypassed = {**batch, "rollout_log_prob": batch["old_log_prob"].clone()}
    config = config_factory("entrorl_grpo", clip_ratio_c=6.9)  # a setting of its own: a fresh loss mode
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*runs with verl's settings")
        loss, _ = _verl_call("entrorl_grpo", bypassed, config, loss_agg_mode="token-mean")
    objective = build_objective("grpo", clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=6.9,
                                loss_agg_mode="token-mean")
    expected = objective(PolicyBatch(log_prob=batch["log_prob"], old_log_prob=batch["old_log_prob"],
                                     advantages=batch["advantages"], mask=batch["response_mask"])).loss
    torch.testing.assert_close(loss, expected)


def test_an_invalid_parameter_value_names_the_loss_mode_and_where_to_set_it(batch_factory, config_factory):
    with pytest.raises(ValueError, match=r"^verl loss_mode 'entrorl_clip_b': .*mu.*greater than 0.*"
                                         r"\(set in actor_rollout_ref.actor.policy_loss.entrorl.mu\)$"):
        _verl_call("entrorl_clip_b", batch_factory(), config_factory("entrorl_clip_b", entrorl={"mu": -2.5}),
                   loss_agg_mode="token-mean")
    # a value from one of verl's own keys: that key, not policy_loss.entrorl
    with pytest.raises(ValueError, match=r"clip_ratio_high: .*\(set in actor_rollout_ref.actor.clip_ratio_high "
                                         r"\(clip_ratio when it is unset\)\)$"):
        _verl_call("entrorl_dapo", batch_factory(), config_factory("entrorl_dapo", clip_ratio_high=float("nan")),
                   loss_agg_mode="token-mean")
    # a check across two parameters names both, and where each came from
    with pytest.raises(ValueError, match=r"clip_cov_lb.*clip_cov_ub.*\(set in actor_rollout_ref.actor.policy_loss."
                                         r"clip_cov_lb; actor_rollout_ref.actor.policy_loss.clip_cov_ub\)$"):
        _verl_call("entrorl_clip_cov", batch_factory(),
                   config_factory("entrorl_clip_cov", clip_cov_lb=6.0, clip_cov_ub=5.0), loss_agg_mode="token-mean")
    with pytest.raises(ValueError, match=r"\(set in actor_rollout_ref.actor.clip_ratio_c\)$"):
        _verl_call("entrorl_dual_clip", batch_factory(), config_factory("entrorl_dual_clip", clip_ratio_c=0.5),
                   loss_agg_mode="token-mean")
    with pytest.raises(ValueError, match=r"\(set in actor_rollout_ref.actor.policy_loss.clip_cov_ratio\)$"):
        _verl_call("entrorl_clip_cov", batch_factory(),
                   config_factory("entrorl_clip_cov", clip_cov_ratio=-1.0), loss_agg_mode="token-mean")
