"""The numbers of one training run, from its ``metrics.jsonl`` alone: start and end of entropy and reward, the
entropy–performance law with its ceiling forecast (arXiv 2505.22617, Eq. 6), predicted against measured entropy
change per step (arXiv 2602.03392, Thm 3.3), covariance concentration (arXiv 2505.22617, Table 1) and whether a
method's own intervention ever acted. Shared by the laboratory report and the report of a training run."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from entrorl.analysis.document import Cell, dash, finite, fmt, json_value, missing, num, text
from entrorl.analysis.law import fit_entropy_law, forecast_entropy_law

ENTROPY_KEY = "entropy/mean"
REWARD_KEY = "reward/accuracy"  # the share of the step's samples the verifier accepted
FALLBACK_REWARD_KEY = "reward/mean"  # used only when a run never logged REWARD_KEY
EVAL_REWARD_KEY = "eval/avg_at_n"  # the share of the held-out samples the verifier accepted
ACCURACY_KEYS = (REWARD_KEY, EVAL_REWARD_KEY)
EDGE_FRACTION = 0.1
COLLAPSE_RATIO = 0.5  # entropy has collapsed when its end is at most this share of its start
SMOOTH_WINDOW = 5
FORKS_SHOWN = 10
COV_PERCENTS = ("0.02", "0.2", "2", "20")
INTERVENTION_KEY_PATTERNS = ("select/{}_frac", "reg/{}_coeff", "reg/{}", "shape/{}_bonus", "correction/{}_masked_frac",
                             "{}/abs_log_ratio")
# a forecast ceiling extrapolates the law fitted on the first steps to zero entropy: on fewer steps than this it is
# noise (a 2-parameter fit on 3 nearly equal points can promise any reward)
MIN_CEILING_STEPS = 10


def edge_count(n_steps: int) -> int:
    """How many steps make the start (and the end) of a run: ``max(1, ceil(EDGE_FRACTION * n))``."""
    return max(1, math.ceil(round(EDGE_FRACTION * n_steps, 9)))


def edge_is_exact(n_steps: int) -> bool:
    return n_steps > 0 and edge_count(n_steps) == round(EDGE_FRACTION * n_steps, 9)


def edge_phrase(n_steps: int, *, unit: tuple[str, str] = ("step", "training steps")) -> str:
    """The start and end of an ``n_steps`` run in words, saying what is really averaged: "the first and the last 10%
    of the 40 training steps (4 steps each)", or where that share is not a whole number of steps, "the first and
    the last 2 of the 12 training steps (16.7% each: 10% rounded up to whole steps)". ``unit``: what each record is,
    singular and plural (a TRL log history's entries each average ``logging_steps`` steps)."""
    one, many = unit
    if n_steps <= 0:
        return f"the {many} (none was logged)"
    n_edge = edge_count(n_steps)
    edge = f"{n_edge} {one if n_edge == 1 else many.split()[-1]}"
    if edge_is_exact(n_steps):
        return f"the first and the last {fmt(100 * EDGE_FRACTION)}% of the {n_steps} {many} ({edge} each)"
    return (f"the first and the last {n_edge} of the {n_steps} {many} ({fmt(100 * n_edge / n_steps)}% each: "
            f"{fmt(100 * EDGE_FRACTION)}% rounded up to whole {many.split()[-1]})")


def sparse_edges_phrase(n_steps: int, logged: dict[str, int], *, unit: tuple[str, str] = ("step", "training steps")) -> str:
    """For the keys (``{label: records that logged it}``) logged at some of the ``n_steps`` records only, what their
    start and end are taken over: " (the reward, logged at 5 of the entries, over the first and the last 1 of
    those)";
    "" when every key is logged at every record."""
    many = unit[1].split()[-1]
    parts = [f"{label}, logged at {count} of the {many}, over the first and the last {edge_count(count)} of those"
             for label, count in logged.items() if 0 < count < n_steps]
    return f" ({'; '.join(parts)})" if parts else ""


def last_steps_phrase(step_counts: set[int]) -> str:
    """"the last 10% of steps", or "the last 2 of the 12 steps (16.7%: ...)" when that share is not whole steps."""
    percent = fmt(100 * EDGE_FRACTION)
    if len(step_counts) != 1:
        return f"the last {percent}% of steps (rounded up to whole steps)"
    (n_steps,) = step_counts
    if n_steps <= 0 or edge_is_exact(n_steps):
        return f"the last {percent}% of steps"
    n_edge = edge_count(n_steps)
    return f"the last {n_edge} of the {n_steps} steps ({fmt(100 * n_edge / n_steps)}%: {percent}% rounded up to whole steps)"


def edge_means(values: Any) -> tuple[float, float, int]:
    """(start, end, steps per edge): the means of the finite values among the first and the last
    :func:`edge_count` steps; ``nan`` where an edge has no finite value."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return math.nan, math.nan, 0
    n_edge = edge_count(array.size)
    return nanmean(array[:n_edge]), nanmean(array[-n_edge:]), n_edge


def moving_average(values: Any, window: int = SMOOTH_WINDOW) -> np.ndarray:
    """Trailing moving average over ``window`` steps (fewer at the start), ignoring non-finite values."""
    array = np.asarray(values, dtype=np.float64)
    out = np.full(array.shape, np.nan)
    for i in range(array.size):
        chunk = array[max(0, i - window + 1): i + 1]
        chunk = chunk[np.isfinite(chunk)]
        if chunk.size:
            out[i] = chunk.mean()
    return out


def nanmean(values: Any) -> float:
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    return float(array.mean()) if array.size else math.nan


def nanmedian(values: Any) -> float:
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    return float(np.median(array)) if array.size else math.nan


def nanmax(values: Any) -> float:
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    return float(array.max()) if array.size else math.nan


def ratio(numerator: float, denominator: float) -> float:
    if finite(numerator) is None or finite(denominator) is None or denominator <= 0:
        return math.nan
    return numerator / denominator


def read_json(path: Path) -> Any:
    """The content of a JSON file, or None when it cannot be read or parsed (a run's files are read leniently); a
    byte-order mark an editor put before it is not part of it."""
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return None


def json_lines(path: Path) -> list[tuple[int, Any]]:
    """``(line number, parsed value)`` of each non-blank line of ``path``, the value None for a line that is not JSON.
    Lines end at "\n", "\r\n" or "\r" (as the trainer's ``read_metrics`` reads them), not at a U+2028 inside a string
    (orjson writes it raw; ``str.splitlines`` would cut there). A byte-order mark before the first line (an editor's)
    is not part of it. Raises ``OSError`` when the file cannot be read."""
    parsed = []
    # a long run's log can be hundreds of MB: it is read a line at a time, and the records share one string per key
    # (each line's parse makes its own: half the memory of a 30k-step log)
    keys: dict[str, str] = {}
    with path.open(encoding="utf-8-sig", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError:
                value = None
            if isinstance(value, dict):
                value = {keys.setdefault(key, key): item for key, item in value.items()}
            parsed.append((number, value))
    return parsed


def read_metrics_records(path: Path) -> tuple[list[dict[str, Any]], list[int], list[int]]:
    """The step records, ordered by step, the numbers of the lines that could not be read (a write cut short), which
    are skipped, and the steps logged more than once (see :func:`latest_record_of_each_step`)."""
    records, unreadable = [], []
    try:
        lines = json_lines(path)
    except OSError:
        return [], [], []
    for number, record in lines:
        if isinstance(record, dict):
            records.append(record)
        else:
            unreadable.append(number)
    records, repeated = latest_record_of_each_step(records)
    return records, unreadable, repeated


def latest_record_of_each_step(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
    """``records`` (in the order they were written) ordered by step, one per step, and the steps that had more than
    one record. A later record of a step that logs its training again (an entropy, loss or reward metric already
    logged there) replaces what came before it: a log that went on past its last checkpoint and was then continued
    from it, or two logs joined, holds the steps in between twice, and the later attempt is the run's; when later
    steps were logged meanwhile, it is a restart from that step, and the earlier attempt's records of the steps after
    it go too, abandoned with it. One that logs other metrics (its evaluation, a time) is merged into it, its values
    over the earlier ones: a loop of one's own may log a step's training and evaluation metrics apart. A record
    without a finite step is kept as it is."""
    latest: dict[float, dict[str, Any]] = {}
    logged: set[float] = set()
    repeated: set[float] = set()
    stepless = []
    highest = -math.inf
    for record in records:
        step = finite(record.get("step"))
        if step is None:
            stepless.append(record)
            continue
        if step in logged:
            repeated.add(step)
        logged.add(step)
        if step in latest:
            earlier = latest[step]
            shared = (earlier.keys() & record.keys()) - {"step"}
            if not any(_is_training_metric(key) for key in shared):  # the rest of the step, logged apart
                record = {**earlier, **record}
            elif step < highest:  # a restart from this step
                for abandoned in [later for later in latest if later > step]:
                    del latest[abandoned]
                highest = step
        latest[step] = record
        highest = max(highest, step)
    kept = sorted([*latest.values(), *stepless], key=lambda r: finite(r.get("step")) or 0.0)
    return kept, sorted(int(step) if float(step).is_integer() else step for step in repeated)


def _is_training_metric(key: str) -> bool:
    """Whether a metric describes a training step (its entropy, loss or reward), not an evaluation or a time."""
    name = str(key).lower()
    return (not name.startswith(("eval", "val-", "val/", "test", "time", "timing"))
            and any(word in name for word in ("entropy", "loss", "reward")))


class MetricRecords:
    """Access to a run's step records (``self.records``, ordered by step) as per-step series."""

    records: list[dict[str, Any]]

    def series(self, key: str) -> np.ndarray:
        return np.array([finite(r.get(key)) if finite(r.get(key)) is not None else np.nan for r in self.records], dtype=np.float64)

    def has(self, key: str) -> bool:
        return any(finite(r.get(key)) is not None for r in self.records)

    def logged_series(self, key: str) -> np.ndarray:
        """:meth:`series` over the records that hold ``key`` only: a key logged at some steps (TRL's ``reward`` with
        ``num_iterations`` > 1, logged by the entries that generated) has its own first and last steps."""
        return np.array([finite(r[key]) if finite(r[key]) is not None else np.nan for r in self.records if key in r],
                        dtype=np.float64)

    @property
    def steps(self) -> np.ndarray:
        numbered = [finite(record.get("step")) for record in self.records]
        return np.array([float(i + 1) if step is None else step for i, step in enumerate(numbered)], dtype=np.float64)

    @property
    def reward_key(self) -> str:
        return REWARD_KEY if self.has(REWARD_KEY) or not self.has(FALLBACK_REWARD_KEY) else FALLBACK_REWARD_KEY


def intervention_keys(method: str) -> list[str]:
    """The metric keys that show whether a method's own intervention acted at a step, for each part the method adds
    to its surrogate (token selectors, regularisers, advantage shapers, a rollout correction): ``select/<part>_frac``
    (share of tokens the part selected), ``reg/<part>_coeff`` (the coefficient in force), ``reg/<part>`` (the entropy
    bonus's term), ``shape/<part>_bonus`` (mean advantage bonus), ``correction/<part>_masked_frac`` (IcePop's share of
    tokens masked) and
    ``<part>/abs_log_ratio`` (KL-Cov's mean |log pi - log pi_old| over the valid tokens: its term is 0 strictly
    on-policy, however many tokens it selects, so this key, when logged, stands for the part instead of its
    ``select/`` key); only the keys a run logged are checked. Empty for a method without such parts (GRPO, the
    supervised baselines) or one the registry does not know, and for a method with an advantage estimator of its own
    (nsr, psr, w_reinforce): that estimator changes the advantages at every step, so an idle part (NSR's sign
    selector, which its estimator leaves nothing to drop) does not mean the method never acted. A part's name among
    the methods' (the label of ``{method: grpo, regularizers: [entropy_bonus]}``, ``grpo+entropy_bonus``) is that
    part; one the registry does not know (a run's own, registered by its imports) is left out."""
    from entrorl.objective.methods import get_method
    from entrorl.objective.parts import available_parts

    kinds: dict[str, set[str]] = {}
    for info in available_parts():
        kinds.setdefault(info.name, set()).add(info.kind)
    parts: list[str] = []
    for position, name in enumerate(method.split("+")):
        try:
            spec = get_method(name)
        except ValueError:  # a part added to the methods (``grpo+entropy_bonus``), or no method (e.g. sft)
            if position == 0 and name not in kinds:  # no method of the registry's: nothing known to check
                return []
            if kinds.get(name, {"surrogate"}) != {"surrogate"}:  # a part of the run's own imports is not known here
                parts.append(name)
            continue
        if position == 0 and spec.advantage_estimator != "grpo":  # the first method gives the advantage estimator
            return []
        parts += [ref[0] for ref in (*spec.selectors, *spec.regularizers, *spec.shapers, *filter(None, [spec.correction]))]
    return [pattern.format(part) for part in dict.fromkeys(parts) for pattern in INTERVENTION_KEY_PATTERNS]


@dataclass
class RunAnalysis:
    """Everything computed from one run's step records (empty for a model that was not trained: the base model)."""

    run: MetricRecords
    n_steps: int = 0
    n_edge: int = 0
    # the records that logged the entropy and the reward: all of them, unless a key is logged at some steps only
    entropy_steps: int = 0
    reward_steps: int = 0
    entropy_start: float = math.nan
    entropy_end: float = math.nan
    entropy_ratio: float = math.nan
    reward_start: float = math.nan
    reward_end: float = math.nan
    reward_reached: float = math.nan
    law: dict[str, Any] = field(default_factory=dict)
    change: dict[str, Any] = field(default_factory=dict)
    cov: dict[str, Any] = field(default_factory=dict)
    cov_tokens: float = math.nan  # median response tokens a step, over which the top-q% shares are taken
    first_step: float = math.nan  # the first training step logged (1, unless logging started later): cov's "first"

    @property
    def first_step_label(self) -> str:
        """How a column of values at :attr:`first_step` is headed: ``step 1``, or ``first step`` when it is unknown."""
        return f"step {fmt(self.first_step)}" if math.isfinite(self.first_step) else "first step"
    interventions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def never_acted(self) -> list[dict[str, Any]]:
        """The intervention metrics that were 0 at every step they were logged."""
        return [i for i in self.interventions if i["active_steps"] == 0]


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 3 or np.std(x) == 0 or np.std(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def sign_agreement(predicted: np.ndarray, measured: np.ndarray) -> tuple[float, int]:
    """``(share, steps)``: the share of steps, among the ``steps`` where neither is 0, on which the signs agree."""
    signed = (predicted != 0) & (measured != 0)
    steps = int(np.count_nonzero(signed))
    return (float(np.mean(np.sign(predicted[signed]) == np.sign(measured[signed]))) if steps else math.nan), steps


def chance_sign_agreement(predicted: np.ndarray, measured: np.ndarray) -> float:
    """The share of agreeing signs expected by chance from each series' own share of positive values,
    ``p+ m+ + p- m-``, over the steps where neither is 0 (what :func:`sign_agreement` should beat)."""
    signed = (predicted != 0) & (measured != 0)
    if not np.any(signed):
        return math.nan
    p_up, m_up = float(np.mean(predicted[signed] > 0)), float(np.mean(measured[signed] > 0))
    return p_up * m_up + (1.0 - p_up) * (1.0 - m_up)


def law_of(entropy: np.ndarray, reward: np.ndarray, *, reward_key: str, reached: float, fit_fraction: float,
           unit: str = "steps") -> dict[str, Any]:
    """The entropy–performance law of a run's points (arXiv 2505.22617, Eq. 6), as :func:`law_cells` reads it: the fit
    over every point where both values are finite, the forecast from the first ``fit_fraction`` of them with its error
    at the end, and the forecast ceiling's distance to ``reached``; the reason in ``fit_error`` / ``forecast_error``
    where either cannot be fitted. ``unit`` names the points in the notes (``steps``, ``evaluations``)."""
    keep = np.isfinite(entropy) & np.isfinite(reward)
    h, r = entropy[keep], reward[keep]
    law: dict[str, Any] = {"n_points": int(keep.sum()), "reward_key": reward_key, "reached": json_value(reached)}
    if unit != "steps":
        law["unit"] = unit
    try:
        law["fit"] = fit_entropy_law(h, r).to_dict()
    except ValueError as error:
        law["fit_error"] = str(error)
    try:
        forecast = forecast_entropy_law(h, r, fit_fraction=fit_fraction)
        law["forecast"] = forecast.to_dict()
        # the forecast's error where the run ended: predicted minus measured reward, averaged over the last points
        n_end = edge_count(h.size)
        law["end_error"] = json_value(float(np.mean(forecast.fit.predict(h[-n_end:]) - r[-n_end:])))
        law["end_points"] = n_end
        law["end_in_fit"] = h.size - n_end < forecast.n_fit
        # no run comes near zero entropy: the distance to the ceiling is headroom, not an error of the forecast
        law["ceiling_minus_reached"] = (json_value(forecast.predicted_ceiling - reached)
                                        if forecast.fit.ceiling_applies and forecast.n_fit >= MIN_CEILING_STEPS else None)
    except ValueError as error:
        law["forecast_error"] = str(error)
    return law


def analyse_records(run: MetricRecords, fit_fraction: float, method: str = "", *, unit: str = "steps") -> RunAnalysis:
    """Everything :class:`RunAnalysis` holds, from the run's step records; ``method`` (a registered method or a
    composition) names the interventions to check (none when empty or unknown); ``unit`` names the records in the
    law's notes (a TRL run's are ``log entries``)."""
    result = RunAnalysis(run=run, n_steps=len(run.records))
    entropy, reward = run.series(ENTROPY_KEY), run.series(run.reward_key)
    # each key's start and end are taken over the records that logged it, so that one logged at some steps only
    # is not n/a at an edge whose steps happen to lack it
    logged_entropy, logged_reward = run.logged_series(ENTROPY_KEY), run.logged_series(run.reward_key)
    result.entropy_start, result.entropy_end, _ = edge_means(logged_entropy)
    result.reward_start, result.reward_end, _ = edge_means(logged_reward)
    result.n_edge = edge_count(result.n_steps) if result.n_steps else 0
    result.entropy_steps, result.reward_steps = int(logged_entropy.size), int(logged_reward.size)
    # one logged step is its run's start and end alike: no change to measure, not a ratio of 1
    result.entropy_ratio = ratio(result.entropy_end, result.entropy_start) if logged_entropy.size >= 2 else math.nan
    result.reward_reached = nanmax(moving_average(reward))

    # the entropy–reward law, over the steps where both are finite
    law = law_of(entropy, reward, reward_key=run.reward_key, reached=result.reward_reached, fit_fraction=fit_fraction,
                 unit=unit)
    result.law = law

    keys = intervention_keys(method) if method else []
    for key in keys:
        part = key.removeprefix("select/").removesuffix("_frac") if key.startswith("select/") else None
        if part is not None and f"{part}/abs_log_ratio" in keys and run.has(f"{part}/abs_log_ratio"):
            continue  # its term, not its selection, says whether it acted
        values = run.series(key)
        values = values[np.isfinite(values)]
        if values.size:
            result.interventions.append({"key": key, "steps": int(values.size), "active_steps": int(np.count_nonzero(values)),
                                         "max_abs": float(np.max(np.abs(values)))})

    # predicted vs measured entropy change per step
    predicted, measured = run.series("entropy/predicted_delta"), run.series("entropy/measured_delta")
    both = np.isfinite(predicted) & np.isfinite(measured)
    p, m = predicted[both], measured[both]
    agreement, signed_steps = sign_agreement(p, m)
    result.change = {
        "n_steps": int(both.sum()),
        "pearson": pearson(p, m),
        "sign_agreement": agreement,
        "sign_steps": signed_steps,
        "token_corr_mean": nanmean(run.series("entropy/delta_token_corr")),
        "predicted": p,
        "measured": m,
    }
    # the first-order change of the update actually applied (diagnostics.first_order), when the run recorded it
    first_order = run.series("entropy/first_order_delta")
    recorded = np.isfinite(first_order) & np.isfinite(measured)
    agreement, signed_steps = sign_agreement(first_order[recorded], measured[recorded])
    result.change.update({
        "first_order_pearson": pearson(first_order[recorded], measured[recorded]),
        "first_order_sign_agreement": agreement,
        "first_order_sign_steps": signed_steps,
    })

    # covariance concentration
    # the first training step's value: step 0 is the evaluation before training, and a run may log from a later step
    trained = np.flatnonzero(run.steps >= 1)
    first = int(trained[0]) if trained.size else None
    result.first_step = float(run.steps[first]) if first is not None else math.nan
    cov = {}
    for q in COV_PERCENTS:
        values = run.series(f"cov/top_{q}pct_ratio")
        cov[q] = {"mean": nanmean(values), "first": float(values[first]) if first is not None else math.nan}
    result.cov = cov
    result.cov_tokens = nanmedian(run.series("cov/n_tokens"))
    return result


def fit_ceiling_shown(law: dict[str, Any]) -> bool:
    """Whether the ceiling of the law fitted on every step is worth showing: the law's premise holds (``a > 0``) and it
    rests on at least :data:`MIN_CEILING_STEPS` steps."""
    fit = law.get("fit") or {}
    return bool(fit.get("ceiling_applies") and fit.get("n_points", 0) >= MIN_CEILING_STEPS)


def forecast_ceiling_shown(law: dict[str, Any]) -> bool:
    """Whether a run's forecast ceiling is worth showing: the law's premise holds on the fitted steps (``a > 0``) and
    they are at least :data:`MIN_CEILING_STEPS`."""
    forecast = law.get("forecast") or {}
    return bool(forecast and (forecast.get("fit") or {}).get("ceiling_applies") and forecast["n_fit"] >= MIN_CEILING_STEPS)


def beyond_an_accuracy(law: dict[str, Any], value: Any) -> bool:
    """Whether a ceiling is above 1 while the reward is an accuracy: the law extrapolated past the reward's range."""
    return law.get("reward_key") in ACCURACY_KEYS and finite(value) is not None and value > 1.0


LAW_COLUMNS = ["points", "a", "b", "R²", "ceiling", "fit steps", "forecast ceiling", "reached", "forecast ceiling − reached",
               "forecast error, end", "forecast RMSE", "note"]


def law_columns(law: dict[str, Any]) -> list[str]:
    """:data:`LAW_COLUMNS`, with ``fit steps`` named after the law's points when they are not steps (``fit log
    entries`` for a TRL run's log history)."""
    unit = law.get("unit", "steps")
    return [f"fit {unit}" if column == "fit steps" and unit != "evaluations" else column for column in LAW_COLUMNS]


def law_cells(law: dict[str, Any]) -> list[Cell]:
    """The cells of :data:`LAW_COLUMNS` for a run's ``RunAnalysis.law``: the fit over every step and the forecast from
    the first steps (each ceiling shown only where ``a > 0`` and the fit rests on at least :data:`MIN_CEILING_STEPS`
    steps), and a note saying why a value is missing or how to read it."""
    fit, forecast = law.get("fit"), law.get("forecast")
    forecast_fit = (forecast or {}).get("fit") or {}
    unit = law.get("unit", "steps")  # what the points are: training steps, or evaluations
    notes = [f"{part}: {law[part + '_error'].split('; ')[0]}" for part in ("fit", "forecast") if part + "_error" in law]
    if fit and fit.get("r2") is None:
        notes.append("R² undefined: " + ("fewer than 3 points" if fit["n_points"] < 3 else "the reward never changed"))
    if fit and not fit.get("ceiling_applies"):
        notes.append("a ≤ 0: reward did not rise as entropy fell, so the law's premise fails and it forecasts no ceiling")
    fit_shown = fit_ceiling_shown(law)
    if fit and fit.get("ceiling_applies") and not fit_shown:
        notes.append(f"fitted on {fit['n_points']} {unit} only (fewer than {MIN_CEILING_STEPS}): its ceiling, an "
                     "extrapolation to zero entropy, is not shown")
    if forecast and not forecast_fit.get("ceiling_applies"):
        notes.append(f"forecast a ≤ 0 on the first {forecast['n_fit']} {unit}: no forecast ceiling")
    ceiling_shown = forecast_ceiling_shown(law)
    if forecast and forecast_fit.get("ceiling_applies") and not ceiling_shown:
        notes.append(f"forecast fitted on {forecast['n_fit']} {unit} only (fewer than {MIN_CEILING_STEPS}): its "
                     "ceiling, an extrapolation to zero entropy, is not shown")
    if forecast and law.get("end_in_fit"):
        notes.append(f"forecast error at the end is in-sample: the last {unit} were among the fitted ones")
    above = [label for label, value, shown in (
        ("ceiling", (fit or {}).get("ceiling"), fit_shown),
        ("forecast ceiling", (forecast or {}).get("predicted_ceiling"), ceiling_shown))
        if shown and beyond_an_accuracy(law, value)]
    if above:
        notes.append(f"{' and '.join(above)} above 1, the most an accuracy can be: the law extrapolated "
                     "beyond the reward's range, so read it as 'no ceiling in sight', not as a value")
    cells = [num(law["n_points"])]
    cells += ([num(fit["a"]), num(fit["b"]), num(fit["r2"]), num(fit["ceiling"]) if fit_shown else dash()]
              if fit else [missing()] * 4)
    cells += ([num(forecast["n_fit"]), num(forecast["predicted_ceiling"]) if ceiling_shown else dash()]
              if forecast else [missing()] * 2)
    cells += [num(law["reached"])]
    if forecast:
        cells += [num(law["ceiling_minus_reached"], signed=True) if ceiling_shown else dash(),
                  num(law.get("end_error"), signed=True), num(forecast["rmse"])]
    else:
        cells += [missing()] * 3
    cells += [text("; ".join(notes))]
    return cells
