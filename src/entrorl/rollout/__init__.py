"""Samplers that produce rollouts (token ids and the sampler's log-probs) from a policy."""

from entrorl.rollout.sampler import HFSampler, Rollouts, SamplingParams, forked_rng, private_seed, process_logits

__all__ = ["HFSampler", "Rollouts", "SamplingParams", "forked_rng", "private_seed", "process_logits"]
