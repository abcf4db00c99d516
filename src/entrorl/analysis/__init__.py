"""Analysis of training runs: the entropy–performance law (arXiv 2505.22617), fits and forecasts."""

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
