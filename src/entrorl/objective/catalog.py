"""The named methods of SPEC §3, each a composition of registered parts with its paper's defaults.

Baselines are built the way the papers' own baselines were: the entropy papers (Clip-Cov / KL-Cov, 80/20,
Clip_B / Clip_V) trained with verl's token-mean aggregation, so their methods use ``token-mean``; ``grpo``
keeps the original per-sequence mean.
"""

from __future__ import annotations

from entrorl.objective.methods import MethodSpec, register_method

_CLIP_HIGHER = ("ppo_clip", {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28})

METHOD_SPECS = (
    MethodSpec(
        name="grpo",
        description="PPO-clip surrogate on group-normalised advantages",
        paper="arXiv 2402.03300",
        surrogate=("ppo_clip", {}),
        loss_agg_mode="seq-mean-token-mean",
    ),
    MethodSpec(
        name="dapo",
        description="clip-higher (decoupled eps_low / eps_high), token-mean loss; pair with dynamic sampling and overlong shaping",
        paper="arXiv 2503.14476",
        surrogate=_CLIP_HIGHER,
        notes="DAPO's dynamic sampling and overlong reward shaping live in the data and reward layers.",
    ),
    MethodSpec(
        name="dual_clip",
        description="PPO-clip with dual-clip: for A < 0 the loss is capped at -c A",
        paper="arXiv 1912.09729",
        surrogate=("ppo_clip", {"clip_ratio_c": 3.0}),
    ),
    MethodSpec(
        name="dr_grpo",
        description="advantages without std division; per-sequence token sum over a constant",
        paper="arXiv 2503.20783",
        surrogate=("ppo_clip", {}),
        loss_agg_mode="seq-mean-token-sum-norm",
        advantage_estimator="dr_grpo",
        notes="loss_scale_factor is the maximum generation length: entrorl train sets it to rollout.max_new_tokens; "
              "in Python, unset, it is each batch's padded length T, which varies with the batch.",
    ),
    MethodSpec(
        name="clip_cov",
        description="drop a random few tokens with covariance in (lb, ub), not already PPO-clipped; dropped tokens stay in the normaliser",
        paper="arXiv 2505.22617",
        surrogate=("ppo_clip", {"clip_ratio_low": 1.0, "clip_ratio_high": 1.0}),
        selectors=(("clip_cov", {}),),
        notes="PPO clip 1/1 as in the paper's recipe: Clip-Cov, not PPO, controls the update.",
        surrogate_is_the_method=True,
    ),
    MethodSpec(
        name="kl_cov",
        description="no PPO clipping; |log r| penalty on the top-k tokens by covariance (a no-op strictly on-policy)",
        paper="arXiv 2505.22617",
        surrogate=("unclipped", {}),
        regularizers=(("kl_cov", {}),),
        notes="Strictly on-policy the |log r| term is zero with zero gradient: use several mini-batches or epochs.",
        surrogate_is_the_method=True,
    ),
    MethodSpec(
        name="forking_tokens",
        description="train only on the top-rho highest-entropy tokens (80/20), normalised by the kept count",
        paper="arXiv 2506.01939",
        surrogate=_CLIP_HIGHER,
        selectors=(("forking_tokens", {}),),
        notes="TRL's top_entropy_quantile keeps the dropped tokens in the loss's normaliser: keep_in_normaliser: true "
              "gives its numbers.",
    ),
    MethodSpec(
        name="low_entropy_tokens",
        description="the 80/20 ablation: train only on the bottom 1-rho entropy tokens",
        paper="arXiv 2506.01939",
        surrogate=_CLIP_HIGHER,
        selectors=(("low_entropy_tokens", {}),),
    ),
    MethodSpec(
        name="clip_b",
        description="drop negative-advantage tokens with S - mean(S) < -mu std(S) (batch-normalised discriminator)",
        paper="arXiv 2602.03392",
        selectors=(("clip_b", {}),),
    ),
    MethodSpec(
        name="clip_v",
        description="drop A <= 0 tokens with D < -mu std(D) (vocabulary-centred discriminator), at most max_frac",
        paper="arXiv 2602.03392",
        selectors=(("clip_v", {}),),
    ),
    MethodSpec(
        name="psr",
        description="positive sample reinforcement: train on positive-advantage samples only",
        paper="arXiv 2506.01347",
        selectors=(("advantage_sign", {"keep": "positive"}),),
        advantage_estimator="psr",
    ),
    MethodSpec(
        name="nsr",
        description="negative sample reinforcement: train on negative-advantage samples only",
        paper="arXiv 2506.01347",
        selectors=(("advantage_sign", {"keep": "negative"}),),
        advantage_estimator="nsr",
    ),
    MethodSpec(
        name="w_reinforce",
        description="lambda * PSR + NSR: positive advantages scaled by lambda",
        paper="arXiv 2506.01347",
        shapers=(("positive_scale", {}),),
        advantage_estimator="signed_reward",
        notes="With +1/-1 rewards and no baseline (the 'signed_reward' estimator) this is W-REINFORCE's +lambda / -1.",
    ),
    MethodSpec(
        name="entropy_advantage",
        description="advantage plus a clipped, detached entropy term min(alpha H, |A| / kappa)",
        paper="arXiv 2506.14758",
        shapers=(("entropy_advantage", {}),),
    ),
    MethodSpec(
        name="entropy_bonus",
        description="loss - c H with a fixed coefficient",
        paper="arXiv 2505.22617 (Sec. 4 sweep)",
        regularizers=(("entropy_bonus", {}),),
    ),
    MethodSpec(
        name="adaptive_entropy",
        description="entropy bonus only while H < target; the coefficient steps by +-delta within [min_coeff, max_coeff]",
        paper="arXiv 2505.22312",
        regularizers=(("adaptive_entropy", {}),),
    ),
    MethodSpec(
        name="kl_ref",
        description="KL penalty to a frozen reference policy (k1 / k2 / k3)",
        paper="arXiv 2402.03300",
        regularizers=(("kl_ref", {}),),
    ),
    MethodSpec(
        name="lopti_reweight",
        description="advantage reweighting (alpha pi_old + 1 - alpha) A",
        paper="arXiv 2505.12929",
        shapers=(("lopti_reweight", {}),),
    ),
    MethodSpec(
        name="unlikely_reward",
        description="GRPO on the unlikeliness reward: samples ranked by likelihood in their group, R (1 - beta rank / G)",
        paper="arXiv 2506.02355",
        advantage_estimator="unlikely",
        notes="The ranking is the 'unlikely' advantage estimator's (beta_rank = 0.25, advantage.params.beta_rank); the paper also "
              "trains 2 PPO epochs on each batch (optim.epochs).",
    ),
    MethodSpec(
        name="passk_advantage",
        description="analytic pass@k group advantage: a group is rewarded for pass@k, not for each sample's pass@1",
        paper="arXiv 2508.10751",
        advantage_estimator="passk",
        notes="k is the 'passk' estimator's parameter (advantage.params.k, default 4); a sample is correct at the "
              "reward's correct_threshold.",
    ),
    MethodSpec(
        name="cispo",
        description="clipped, detached IS weight times A log pi: no token loses its gradient",
        paper="arXiv 2506.13585",
        surrogate=("cispo", {}),
    ),
    MethodSpec(
        name="gspo",
        description="sequence-level geometric-mean ratio, clipped at 3e-4 / 4e-4",
        paper="arXiv 2507.18071",
        surrogate=("gspo", {}),
        loss_agg_mode="seq-mean-token-mean",
    ),
    MethodSpec(
        name="rft",
        description="rejection-sampling fine-tuning: maximise the likelihood of the model's own correct samples",
        paper="arXiv 2304.06767",
        surrogate=("log_likelihood", {}),
        selectors=(("rejection_sampling", {}),),
        advantage_estimator="psr",
        notes="A supervised baseline: the 'psr' advantages are 1 for correct samples and 0 otherwise, and the "
              "wrong samples leave the normaliser, so that the loss is the mean NLL of the correct samples' tokens.",
    ),
    MethodSpec(
        name="tis",
        description="truncated importance sampling min(pi_train / pi_rollout, C) for sampler mismatch; compose as 'dapo+tis'",
        paper="Yao et al. 2025 (TIS)",
        correction=("tis", {}),
    ),
    MethodSpec(
        name="icepop",
        description="weight each token by its train/rollout probability ratio, zeroing those whose ratio leaves [0.5, 5]; compose as 'dapo+icepop'",
        paper="arXiv 2510.18855",
        correction=("icepop", {}),
        loss_agg_mode="seq-mean-token-mean",  # J_IcePop: (1/G) sum_i (1/|y_i|) sum_t, GRPO's normalisation
    ),
)

for _spec in METHOD_SPECS:
    register_method(_spec)
