"""entrorl: entropy-aware reinforcement fine-tuning of language models.

Layers (imports point downward only; ``tests/test_layers.py`` checks it):

0. ``entrorl.tokens``, ``entrorl.dynamics`` — per-token statistics and the entropy-dynamics theory
1. ``entrorl.advantages``, ``entrorl.objective`` — advantage estimators and composable objectives
2. ``entrorl.modeling``, ``entrorl.rollout``, ``entrorl.rewards``, ``entrorl.data``, ``entrorl.evaluation`` — the
   parts of a run: models, samplers, rewards, prompt data, pass@k and polarisation
3. ``entrorl.trainer``, ``entrorl.analysis`` — the run: the loop, its configuration and checkpoints; the
   entropy–performance law, forecasts and reports
4. ``entrorl.lab``, ``entrorl.integrations``, ``entrorl.cli`` — entry points
"""

from entrorl.advantages import available_advantages, compute_advantages
from entrorl.objective import PolicyBatch, available_methods, build_objective
from entrorl.tokens import TokenStats, token_stats, token_stats_from_hidden

__version__ = "0.1.0"

__all__ = [
    "PolicyBatch",
    "TokenStats",
    "available_advantages",
    "available_methods",
    "build_objective",
    "compute_advantages",
    "token_stats",
    "token_stats_from_hidden",
    "__version__",
]
