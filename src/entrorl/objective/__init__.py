"""Policy objectives: surrogates, token selectors, advantage shapers, regularisers, mismatch corrections and
aggregation, composed into the named methods of the entropy-control literature.

>>> from entrorl.objective import PolicyBatch, build_objective
>>> objective = build_objective("dapo+clip_b+forking_tokens")
"""

from entrorl.objective import corrections, regularizers, selectors, shapers, surrogates  # noqa: F401  (registration)
from entrorl.objective import catalog  # noqa: F401  (registers the named methods)
from entrorl.objective.aggregation import LOSS_AGG_MODES, aggregate_loss
from entrorl.objective.batch import PolicyBatch
from entrorl.objective.core import Objective, ObjectiveOutput
from entrorl.objective.methods import (
    MethodInfo,
    MethodSpec,
    ObjectiveConfig,
    PartSpec,
    SurrogateSetAsideWarning,
    available_methods,
    build_objective,
    get_method,
    method_modules,
    methods_markdown_table,
    register_method,
)
from entrorl.objective.parts import (
    Correction,
    Regularizer,
    RegularizerTerm,
    Selector,
    Shaper,
    Surrogate,
    SurrogateOutput,
    available_parts,
    register_part,
)
from entrorl.objective.regularizers import kl_estimate

__all__ = [
    "LOSS_AGG_MODES",
    "aggregate_loss",
    "PolicyBatch",
    "Objective",
    "ObjectiveOutput",
    "MethodInfo",
    "MethodSpec",
    "ObjectiveConfig",
    "PartSpec",
    "SurrogateSetAsideWarning",
    "available_methods",
    "build_objective",
    "get_method",
    "method_modules",
    "methods_markdown_table",
    "register_method",
    "Correction",
    "Regularizer",
    "RegularizerTerm",
    "Selector",
    "Shaper",
    "Surrogate",
    "SurrogateOutput",
    "available_parts",
    "register_part",
    "kl_estimate",
]
