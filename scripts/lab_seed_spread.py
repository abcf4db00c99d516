"""The spread of laboratory results across runs that differ only in their training seed.

    entrorl lab --preset default --out runs/lab-seed0
    entrorl lab --preset default --rl-seed 1 --out runs/lab-seed1
    entrorl lab --preset default --rl-seed 2 --out runs/lab-seed2
    python scripts/lab_seed_spread.py runs/lab-seed0 runs/lab-seed1 runs/lab-seed2 [--markdown]

For each method and each number of the summary table it prints the mean over the runs and the range
``[min, max]``, read from every run's report.json; and for GRPO the collapse criterion of each run. Nothing is
typed by hand. Runs whose settings (their lab.json's preset, the methods and rl_seed aside) or base model differ are
refused, naming what differs: their spread would not be one over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from entrorl.analysis.document import md_escape
from entrorl.trainer.config import flatten_settings
from entrorl.lab.report import (HEADLINE_COLLAPSE_PREFIX, HEADLINE_EVAL_ENTROPY_RATIO, HEADLINE_REWARD_END,
                                HEADLINE_REWARD_START)

# the summary's columns before and after its Pass@k ones, whose k come from the preset (quick: up to 16, default: 64)
LEADING, TRAILING = ("entropy end/start", "reward end"), ("forgetting Δ", "eval entropy")


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def spread_table(reports: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per method present in every run; cells ``mean [min, max]``, followed by
    ``(n of N runs)`` when only n of the runs have the number (a method that failed or was interrupted in the others);
    the Pass@k columns those of the first run's summary (every k it reports)."""
    per_run = [{row["method"]: row for row in report["summary"]["values"]} for report in reports]
    methods = [name for name in per_run[0] if all(name in run for run in per_run[1:])]
    first = next(iter(per_run[0].values()), {})
    columns = (*LEADING, *(key for key in first if key.startswith("Pass@")), *TRAILING)
    header = ["method", *columns]
    rows = []
    for method in methods:
        cells = [method]
        for column in columns:
            values = [run[method].get(column) for run in per_run]
            values = [value for value in values if isinstance(value, (int, float))]
            partial = f" ({len(values)} of {len(per_run)} runs)" if 0 < len(values) < len(per_run) else ""
            cells.append(f"{_fmt(statistics.fmean(values))} [{_fmt(min(values))}, {_fmt(max(values))}]{partial}"
                         if values else "—")
        rows.append(cells)
    return header, rows


def other_settings(records: list[dict], names: list[str]) -> list[str]:
    """For each run whose settings differ from the first's (its lab.json ``records``: the preset without ``methods``
    and ``rl_seed``, and the base model's fingerprint where both record one), what differs, in words."""
    def compared(record: dict) -> dict:
        preset = {key: value for key, value in record["preset"].items() if key not in ("methods", "rl_seed")}
        return flatten_settings(preset)

    first, said = compared(records[0]), []
    for name, record in zip(names[1:], records[1:]):
        settings = compared(record)
        keys = [key for key in sorted(set(first) | set(settings)) if first.get(key) != settings.get(key)]
        shown = [f"{key}: {first.get(key)!r} in {names[0]}, {settings.get(key)!r} here" for key in keys[:5]]
        shown += [f"and {len(keys) - 5} more"] if len(keys) > 5 else []
        fingerprints = records[0].get("base_model_fingerprint"), record.get("base_model_fingerprint")
        if all(fingerprints) and fingerprints[0] != fingerprints[1]:
            shown.append(f"another base model than {names[0]}'s (built on another kind of CPU, or another cache)")
        if shown:
            said.append(f"{name}: {'; '.join(shown)}")
    return said


def collapse_lines(reports: list[dict], names: list[str]) -> list[str]:
    lines = []
    for name, report in zip(names, reports):
        headline = report.get("headline") or {}
        if "numbers" not in headline:  # GRPO not in the run, failed or interrupted: the report says which
            lines.append(f"{name}: no collapse criterion ({headline.get('skipped', 'GRPO has no results')})")
            continue
        numbers = {row["quantity"]: row["value"] for row in headline["numbers"]["rows"]}
        collapse = next(((quantity, value) for quantity, value in numbers.items()
                         if quantity.startswith(HEADLINE_COLLAPSE_PREFIX)), ("collapse", "?"))
        lines.append(f"{name}: {HEADLINE_EVAL_ENTROPY_RATIO} {numbers.get(HEADLINE_EVAL_ENTROPY_RATIO, '?')}, "
                     f"{collapse[0]} {collapse[1]}; training reward "
                     f"{numbers.get(HEADLINE_REWARD_START, '?')} → {numbers.get(HEADLINE_REWARD_END, '?')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="laboratory run directories (each with report.json)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    missing = [str(run) for run in args.runs if not (run / "report.json").is_file()]
    if missing:
        parser.error(f"no report.json in: {', '.join(missing)}")
    reports = [json.loads((run / "report.json").read_text()) for run in args.runs]
    records = [json.loads((run / "lab.json").read_text()) for run in args.runs]
    presets = [record["preset"] for record in records]
    # without --rl-seed the runs train with the preset's seed: `--rl-seed 0` is the same training as the default
    seeds = [preset.get("rl_seed") if preset.get("rl_seed") is not None else preset.get("seed", 0) for preset in presets]
    names = [f"{run.name} (rl_seed {seed}{'' if preset.get('rl_seed') is not None else ', the preset seed'})"
             for run, seed, preset in zip(args.runs, seeds, presets)]
    differing = other_settings(records, [str(run) for run in args.runs])
    if differing:
        parser.error("these runs differ in more than their training seed, so their spread is not one over seeds:\n  "
                     + "\n  ".join(differing))
    if len(set(seeds)) < len(seeds):
        print("warning: some runs share their rl_seed, so their spread is not a spread over seeds", file=sys.stderr)
    print(f"{len(reports)} runs: " + ", ".join(names))
    print()
    header, rows = spread_table(reports)
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for method, *cells in rows:  # a method's name as text (the numbers' brackets are meant)
            print("| " + " | ".join([md_escape(method), *cells]) + " |")
    else:
        for row in [header, *rows]:
            print("  ".join(row))
    print()
    for line in collapse_lines(reports, names):
        print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
