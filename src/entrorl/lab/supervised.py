"""Supervised baselines of the laboratory (the ones the seeds compare RL with).

* ``sft``: supervised fine-tuning on reference demonstrations of the training task;
* ``rft``: rejection-sampling fine-tuning on the model's own correct samples — an ordinary entrorl method
  (``log_likelihood`` surrogate with ``psr`` advantages, normalised by the correct samples' tokens), run by the
  normal trainer.

:class:`SFTTrainer` reuses the trainer's step. Each step still samples the policy on the step's prompts, so
reward, accuracy and entropy are measured on the policy's own samples exactly as for the RL methods; the
update then maximises the likelihood of one reference demonstration per sample instead.
"""

from __future__ import annotations

import random

import torch

from entrorl.lab.tasks import Task, TaskExample
from entrorl.rollout import Rollouts
from entrorl.trainer.diagnostics import entropy_summary
from entrorl.trainer.loop import ScoredRollouts, Trainer

__all__ = ["SFTTrainer", "SFT_OBJECTIVE"]

SFT_OBJECTIVE = {"surrogate": {"name": "log_likelihood"}, "loss_agg_mode": "token-mean"}


class SFTTrainer(Trainer):
    """The trainer with reference demonstrations in place of the sampled responses."""

    task: Task | None = None

    def use_task(self, task: Task) -> None:
        self.task = task

    def collect(self) -> ScoredRollouts:
        if self.task is None:
            raise RuntimeError("SFTTrainer needs use_task(task) before training")
        sampled = super().collect()
        with torch.no_grad():
            stats = self.token_stats(self.model, sampled.rollouts, torch.arange(len(sampled.rollouts)), need=("entropy",))
        metrics = {**sampled.metrics, **entropy_summary(stats.entropy.float().cpu(), sampled.rollouts.response_mask)}
        rng = random.Random(self.config.seed * 1_000_003 + self.step)
        demonstrations = [
            self.tokenizer(self.task.demonstration(self.task_example(record), rng))["input_ids"] + [self.tokenizer.eos_token_id]
            for record in sampled.records
        ]
        width = max(len(ids) for ids in demonstrations)
        response_ids = torch.full((len(demonstrations), width), self.tokenizer.pad_token_id, dtype=torch.long)
        for row, ids in enumerate(demonstrations):
            response_ids[row, : len(ids)] = torch.tensor(ids)
        lengths = torch.tensor([len(ids) for ids in demonstrations])
        rollouts = Rollouts(
            prompt_ids=sampled.rollouts.prompt_ids, prompt_mask=sampled.rollouts.prompt_mask, response_ids=response_ids,
            response_mask=torch.arange(width)[None, :] < lengths[:, None], sampler_log_probs=torch.zeros(response_ids.shape),
            lengths=lengths, truncated=torch.zeros(len(demonstrations), dtype=torch.bool),
        )
        ones = torch.ones(len(demonstrations))
        # the tokens the policy sampled this step, as the RL methods count them (not the demonstrations')
        return ScoredRollouts(rollouts, sampled.records, sampled.group_ids, ones, ones, metrics,
                              sampled_tokens=sampled.sampled_tokens)

    def task_example(self, record) -> TaskExample:
        meta = {k: v for k, v in record.meta.items() if k != "task"}
        return TaskExample(prompt=record.prompt, answer=record.answer, meta=meta)
