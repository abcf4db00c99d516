"""Laboratory presets: ``default`` (the front-page run, 8 to 15 minutes on two cores once its base model is built)
and ``quick`` (the same matrix at toy scale, a few minutes; CI runs it end to end)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from entrorl._checks import did_you_mean
from entrorl.lab.base_model import BaseModelSpec
from entrorl.objective import get_method

__all__ = ["LabPreset", "PRESETS", "get_preset", "lab_method_names", "DEFAULT_METHODS"]

DEFAULT_METHODS = [
    "grpo", "dapo", "clip_cov", "kl_cov", "forking_tokens", "clip_b", "clip_v", "nsr", "w_reinforce",
    "entropy_advantage", "adaptive_entropy", "sft", "rft",
]


class LabPreset(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: str
    seed: int = 0
    rl_seed: int | None = Field(None, ge=0, le=2**32 - 1, description="seed of the RL and supervised runs (sampling, data order); None = seed. "
                                "The base model, the data and the evaluation keep `seed`, so runs with different rl_seed "
                                "differ only in their training randomness")
    base: BaseModelSpec = Field(default_factory=lambda: BaseModelSpec(
        tasks=("sum_chain", "rg_arithmetic"), problems_per_task=3000, wrong_fraction=0.2, hidden_size=96, num_layers=3,
        num_heads=4, num_kv_heads=2, steps=1200, lr=3e-3))
    train_task: str = "sum_chain"
    forgetting_task: str = "rg_arithmetic"
    train_problems: int = 2000
    eval_problems: int = 40
    forgetting_problems: int = 40
    methods: list[str] = Field(default_factory=lambda: list(DEFAULT_METHODS))
    steps: int = 170
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 40
    temperature: float = 1.0
    lr: float = 2e-4
    warmup_steps: int = 10
    mini_batches: int = 2
    checkpoint_every: int = 20
    eval_n: int = 64
    forgetting_n: int = 8
    top_forks: int = 20
    workers: int = 2
    law_fit_fraction: float = 0.2

    def check_methods(self) -> None:
        """Every method must be one the laboratory runs (:func:`lab_method_names`), or a composition of registered
        methods that :func:`entrorl.objective.build_objective` accepts (``dapo+clip_b``)."""
        from entrorl.objective import build_objective

        for method in self.methods:
            if method == "sft":
                continue
            if method == "base":
                raise ValueError("method 'base': the laboratory's report names the base model 'base', beside the methods; "
                                 "register your method under another name")
            if "+" in method:
                if any(not part or part != part.strip() for part in method.split("+")):
                    raise ValueError(f"method '{method}': write a composition without spaces or empty parts, as dapo+clip_b")
                if "sft" in method.split("+"):
                    raise ValueError(f"method '{method}': sft, the supervised baseline, is no RL objective and cannot be "
                                     "composed; run it alone (--methods sft,...)")
                try:
                    build_objective(method)
                except ValueError as error:  # said of the composition, or of one of its parts
                    said = str(error) if repr(method) in str(error) else f"method '{method}': {error}"
                    raise ValueError(said + (_OWN_METHODS_HINT if "unknown method" in said else "")) from None
                continue
            try:
                get_method(method)
            except ValueError:
                hint = did_you_mean(method, lab_method_names())
                raise ValueError(f"unknown method '{method}'; {hint}the laboratory runs: {', '.join(lab_method_names())}, "
                                 f"and compositions of them such as dapo+clip_b{_OWN_METHODS_HINT}") from None


_OWN_METHODS_HINT = " (a method of your own: --import the module that registers it)"


def lab_method_names() -> list[str]:
    """Every method name the laboratory accepts: the registered methods and the supervised baseline ``sft``."""
    from entrorl.objective import available_methods

    return sorted({info.name for info in available_methods()} | {"sft"})


PRESETS = {
    "default": LabPreset(name="default"),
    "quick": LabPreset(
        name="quick",
        base=BaseModelSpec(tasks=("sum_chain", "rg_arithmetic"), problems_per_task=600, wrong_fraction=0.2, hidden_size=64,
                           num_layers=2, num_heads=4, num_kv_heads=2, steps=400, batch_size=32, lr=5e-3),
        train_problems=400,
        eval_problems=12,
        forgetting_problems=12,
        steps=12,
        prompts_per_step=4,
        group_size=4,
        max_new_tokens=32,
        lr=2e-4,
        warmup_steps=2,
        checkpoint_every=6,
        eval_n=16,
        forgetting_n=4,
        top_forks=10,
    ),
}


def get_preset(name: str) -> LabPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown lab preset '{name}'; choose one of {sorted(PRESETS)}") from None
