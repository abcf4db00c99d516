"""Analysis of training runs: the entropy–performance law (arXiv 2505.22617), fits and forecasts; the numbers of a run
from its metrics (:mod:`entrorl.analysis.run`), the report of a run (:mod:`entrorl.analysis.run_report`) and the
documents both reports are written with (:mod:`entrorl.analysis.document`)."""

from entrorl.analysis.law import (
    EntropyLawFit,
    LawForecast,
    fit_entropy_law,
    forecast_entropy_law,
)

__all__ = [
    "EntropyLawFit",
    "LawForecast",
    "fit_entropy_law",
    "forecast_entropy_law",
]
