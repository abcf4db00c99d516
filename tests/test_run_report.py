"""The report of one training run (`entrorl report`), on run directories whose numbers are known exactly."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from entrorl.analysis.law import forecast_entropy_law
from entrorl.analysis.run import (INTERVENTION_KEY_PATTERNS, LAW_COLUMNS, MetricRecords, analyse_records, beyond_an_accuracy, chance_sign_agreement,
                                  edge_means, edge_phrase, fit_ceiling_shown, intervention_keys, last_steps_phrase,
                                  law_cells, law_of, pearson, ratio, read_json, read_metrics_records)
from entrorl.analysis.run_report import RECURRING_FORKS_SHOWN, NotARunDirectory, write_run_report


def write_run(directory: Path, records: list[dict], *, config: dict | None = None, evaluations: dict | None = None,
              forks: dict | None = None, extra_lines: list[str] = ()) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record) for record in records] + list(extra_lines)
    (directory / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    (directory / "config.json").write_text(json.dumps(config if config is not None else {"method": "grpo", "optim": {"steps": len(records)}}))
    for folder, files in (("eval", evaluations or {}), ("forks", forks or {})):
        for step, content in files.items():
            (directory / folder).mkdir(exist_ok=True)
            (directory / folder / f"step_{step:06d}.json").write_text(json.dumps(content))
    return directory


def law_records(steps: int, a: float = 0.4, b: float = 1.2) -> list[dict]:
    """Steps whose reward follows R = -a exp(H) + b exactly, entropy falling from 0.9 to 0.2."""
    entropy = np.linspace(0.9, 0.2, steps)
    return [{"step": i + 1, "entropy/mean": float(h), "reward/accuracy": float(b - a * math.exp(h))} for i, h in enumerate(entropy)]


def row(table: dict, column: str, value) -> dict:
    return next(values for values in table["values"] if values[column] == value)


def test_the_law_s_fit_forecast_and_ceiling_recover_a_run_that_follows_it(tmp_path):
    run = write_run(tmp_path / "run", law_records(80))
    report = write_run_report(run, figures=False)
    fit = report["law"]["fit"]
    assert fit["fit"]["a"] == pytest.approx(0.4, rel=1e-9) and fit["fit"]["b"] == pytest.approx(1.2, rel=1e-9)
    assert fit["fit"]["r2"] == pytest.approx(1.0)
    forecast = fit["forecast"]
    assert forecast["n_fit"] == 12  # ceil(0.15 * 80)
    assert forecast["predicted_ceiling"] == pytest.approx(0.8, rel=1e-9) and forecast["rmse"] == pytest.approx(0.0, abs=1e-12)
    (cells,) = report["law"]["table"]["values"]
    assert cells["forecast ceiling"] == pytest.approx(0.8, rel=1e-9) and cells["fit steps"] == 12
    summary = {r["quantity"]: r["value"] for r in report["summary"]["values"]}
    assert summary["forecast ceiling (law at zero entropy)"] == pytest.approx(0.8, rel=1e-9)
    assert summary["steps logged"] == 80 and summary["method"] == "grpo"
    shown = {r["quantity"]: r["value"] for r in report["summary"]["rows"]}
    assert shown["predicted vs measured entropy change: sign agreement"] == "n/a"  # no change was logged
    # start and end: the means over the first and last 10% (8 steps)
    entropy = np.linspace(0.9, 0.2, 80)
    assert summary["entropy start (nats)"] == pytest.approx(entropy[:8].mean())
    assert summary["entropy end/start"] == pytest.approx(entropy[-8:].mean() / entropy[:8].mean())
    markdown = (run / "report" / "report.md").read_text()
    assert "by the laboratory's threshold, applied to the training curve (the laboratory compares evaluations when it has them), entropy collapsed" in markdown  # 0.238 / 0.865 <= 0.5
    # the forecast against a constant (the fitted steps' mean reward) and the law fitted on every step, on the 68 later steps
    reward = np.array([r["reward/accuracy"] for r in law_records(80)])
    (baselines,) = report["forecast_baselines"]["values"]
    assert baselines["later steps"] == 68 and baselines["forecast RMSE"] == pytest.approx(0.0, abs=1e-12)
    assert baselines["constant RMSE"] == pytest.approx(np.sqrt(np.mean((reward[12:] - reward[:12].mean()) ** 2)))
    assert baselines["law fitted on every step: RMSE"] == pytest.approx(0.0, abs=1e-12)
    # the reward rises at every step: the best 5-step trailing mean is the last one, above the mean of the last 8 steps
    assert summary["reward reached (5-step moving average, max)"] == pytest.approx(reward[-5:].mean())
    assert summary["reward end"] == pytest.approx(reward[-8:].mean())


def test_a_ceiling_an_accuracy_cannot_reach_and_one_resting_on_few_steps_are_not_given_as_values(tmp_path):
    entropy = np.linspace(0.9, 0.5, 40)
    records = [{"step": i + 1, "entropy/mean": float(h), "reward/accuracy": float(1.25 - 0.2 * math.exp(h))}
               for i, h in enumerate(entropy)]
    report = write_run_report(write_run(tmp_path / "run", records), figures=False, fit_fraction=0.25)
    summary = {r["quantity"]: r for r in report["summary"]["rows"]}
    assert summary["forecast ceiling (law at zero entropy)"]["value"] == "above 1 (1.05): no ceiling in sight"
    (cells,) = report["law"]["table"]["values"]
    assert "ceiling and forecast ceiling above 1, the most an accuracy can be" in cells["note"]
    report = write_run_report(write_run(tmp_path / "short", law_records(8)), figures=False)
    (cells,) = report["law"]["table"]["values"]
    assert cells["ceiling"] is None and "fitted on 8 steps only (fewer than 10)" in cells["note"]


def test_a_forecast_on_too_few_steps_shows_no_ceiling_and_the_fit_fraction_is_the_caller_s(tmp_path):
    run = write_run(tmp_path / "run", law_records(40))
    report = write_run_report(run, figures=False)
    (cells,) = report["law"]["table"]["values"]
    assert cells["fit steps"] == 6 and cells["forecast ceiling"] is None  # 6 < 10 fitted steps
    assert "fewer than 10" in cells["note"]
    report = write_run_report(run, figures=False, fit_fraction=0.5)
    (cells,) = report["law"]["table"]["values"]
    assert cells["fit steps"] == 20 and cells["forecast ceiling"] == pytest.approx(0.8, rel=1e-9)
    assert report["fit_fraction"] == 0.5
    assert "A ceiling is shown once its fit rests on at least 10 points." in (run / "report" / "report.md").read_text()
    # the whole run is a valid fit fraction: (0, 1]
    report = write_run_report(run, figures=False, fit_fraction=1.0)
    assert report["fit_fraction"] == 1.0 and report["section_errors"] == {}


def test_predicted_and_measured_entropy_change_agreement_is_counted_exactly(tmp_path):
    measured = [0.3, -0.2, 0.1, -0.4, 0.5, -0.1, 0.2, -0.3, 0.0, 0.6]
    predicted = [1e-7, -2e-7, -1e-7, -3e-7, 5e-7, 1e-7, 2e-7, -2e-7, 4e-7, 0.0]  # signs agree at 6 of the 8 non-zero pairs
    # the first-order change agrees in sign with the measured one at all 9 steps where neither is 0
    first_order = [0.1, -0.1, 0.2, -0.1, 0.1, -0.2, 0.1, -0.1, 0.3, 0.1]
    records = [{"step": i + 1, "entropy/mean": 1.0 - 0.01 * i, "reward/accuracy": 0.1 * (i % 3),
                "entropy/predicted_delta": p, "entropy/measured_delta": m, "entropy/delta_token_corr": 0.5,
                "entropy/first_order_delta": f}
               for i, (p, m, f) in enumerate(zip(predicted, measured, first_order))]
    run = write_run(tmp_path / "run", records)
    report = write_run_report(run, figures=False)
    (values,) = report["entropy_change"]["values"]
    (texts,) = report["entropy_change"]["rows"]
    assert values["steps"] == 10 and values["sign agreement"] == 0.75 and texts["sign agreement"] == "0.75 of 8 steps"
    assert values["correlation across steps"] == pytest.approx(np.corrcoef(predicted, measured)[0, 1])
    # by chance: 4 of the 8 predictions and 4 of the 8 measurements are positive, so half would agree
    assert values["by chance"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.5)
    assert values["mean token correlation"] == 0.5
    assert values["first order: correlation"] == pytest.approx(np.corrcoef(first_order, measured)[0, 1])
    assert values["first order: sign agreement"] == 1.0 and texts["first order: sign agreement"] == "1 of 9 steps"
    summary = {r["quantity"]: r["value"] for r in report["summary"]["rows"]}
    assert summary["predicted vs measured entropy change: sign agreement"] == "0.75 of 8 steps (0.5 by chance)"
    # the predicted changes sum to 5e-7, the measured ones to 0.7
    assert ("Summed over the 10 steps, the predicted change is +5e-07 nats a token and the measured one +0.7."
            in (run / "report" / "report.md").read_text())


def test_the_step_0_evaluation_is_an_evaluation_not_a_training_step(tmp_path):
    records = [{"step": 0, "eval/avg_at_n": 0.25}] + law_records(10)
    records[1]["cov/top_0.02pct_ratio"] = 900.0
    records[2]["cov/top_0.02pct_ratio"] = 1100.0
    evaluations = {
        0: {"step": 0, "n_problems": 4, "n_samples": 2, "avg_at_n": 0.25, "pass_at_k": {"1": 0.25, "2": 0.5},
            "polarisation": {"frac_zero": 0.5, "frac_one": 0.0}},
        10: {"step": 10, "n_problems": 4, "n_samples": 2, "avg_at_n": 0.5, "pass_at_k": {"1": 0.5, "2": 0.75},
             "polarisation": {"frac_zero": 0.25, "frac_one": 0.25}},
    }
    report = write_run_report(write_run(tmp_path / "run", records, evaluations=evaluations), figures=False)
    assert report["steps"] == 10
    covariance = row(report["covariance"], "q", "top 0.02%")
    assert covariance["mean over steps"] == 1000.0 and covariance["step 1"] == 900.0
    table = report["evaluations"]
    assert [r["step"] for r in table["values"]] == [0, 10]
    assert row(table, "step", 0)["solved by none"] == 0.5 and row(table, "step", 0)["solved by all"] == 0.0
    assert row(table, "step", 10) == {"step": 10, "prompts": 4, "n": 2, "Avg@n": 0.5, "Pass@1": 0.5, "Pass@2": 0.75,
                                      "solved by none": 0.25, "solved by all": 0.25}
    summary = {r["quantity"]: r["value"] for r in report["summary"]["values"]}
    assert summary["evaluation Pass@2 at step 10"] == 0.75


def test_evaluations_logged_in_metrics_jsonl_are_reported_when_no_eval_folder_was_kept(tmp_path):
    """The trainer logs each evaluation in metrics.jsonl too: with the log copied alone (or a loop of one's own that
    logs its evaluations), the report reads them there, step 0's baseline included, and fits the evaluation law,
    rather than saying none was run."""
    records = [{"step": 0, "eval/avg_at_n": 0.1, "eval/n": 4.0, "eval/pass_at_1": 0.1, "eval/pass_at_4": 0.3,
                "eval/frac_solved_none": 0.6, "eval/frac_solved_all": 0.0}]
    for step in range(1, 13):
        record = {"step": step, "entropy/mean": 1.2 - 0.08 * step, "reward/accuracy": 0.05 * step}
        if step % 6 == 0:
            record.update({"eval/avg_at_n": 0.1 + 0.03 * step, "eval/n": 4.0, "eval/pass_at_1": 0.1 + 0.03 * step,
                           "eval/pass_at_4": 0.3 + 0.03 * step, "eval/frac_solved_none": 0.5,
                           "eval/frac_solved_all": 0.1})
        records.append(record)
    run = write_run(tmp_path / "run", records)
    report = write_run_report(run, figures=False)
    table = report["evaluations"]
    assert [r["step"] for r in table["values"]] == [0, 6, 12]
    assert row(table, "step", 0) == {"step": 0, "prompts": None, "n": 4, "Avg@n": 0.1, "Pass@1": 0.1, "Pass@4": 0.3,
                                     "solved by none": 0.6, "solved by all": 0.0}
    assert row(table, "step", 12)["Pass@4"] == pytest.approx(0.66)
    assert report["law"]["evaluations"] is not None and report["steps"] == 12
    markdown = (run / "report" / "report.md").read_text()
    assert "Each evaluation logged in `metrics.jsonl`" in markdown and "No evaluation was found" not in markdown
    # an eval/ folder, when kept, is what is read (it also counts the prompts)
    evaluation = {"n_problems": 8, "n_samples": 4, "avg_at_n": 0.5, "pass_at_k": {"1": 0.5}, "polarisation": {}}
    report = write_run_report(write_run(tmp_path / "with-eval", records, evaluations={12: evaluation}), figures=False)
    assert [r["step"] for r in report["evaluations"]["values"]] == [12]


def test_fork_tokens_latest_and_recurring(tmp_path):
    def fork(token, entropy):
        return {"token": token, "entropy": entropy, "before": "1+1=", "after": "\n#", "source": "eval.jsonl:3"}

    # a fork without an entropy is listed nowhere among the recurring ones; an entry that is not a fork is skipped
    forks = {5: [fork("2", 1.5), fork("+", 1.0), fork("?", None)], 10: [fork("3", 2.0), None, fork("2", 0.5), fork("+", 0.25)]}
    report = write_run_report(write_run(tmp_path / "run", law_records(10), forks=forks), figures=False)
    latest = report["forks"]["latest"]
    assert latest["title"] == "Step 10" and [r["entropy"] for r in latest["values"]] == [2.0, 0.5, 0.25]
    assert [r["rank"] for r in latest["values"]] == [1, 2, 3]
    assert latest["rows"][0]["context"] == "…1+1=⟦3⟧↵#…" and latest["rows"][0]["token"] == "'3'"
    recurring = {r["token"]: (r["times among the top positions"], r["mean entropy"]) for r in report["forks"]["recurring"]["values"]}
    assert recurring == {"'2'": (2, 1.0), "'+'": (2, 0.625), "'3'": (1, 2.0)}
    assert report["forks"]["recurring"]["title"] == "Recurring fork tokens over the 2 evaluation(s)"  # 3 tokens, 2 evaluations
    assert "The highest-entropy positions of the evaluation at step 10 (the top 3)," in (
        tmp_path / "run" / "report" / "report.md").read_text()  # as many as were saved
    # evaluations with eval.top_forks = 0 save empty lists: no positions, and no empty table under a heading
    report = write_run_report(write_run(tmp_path / "none", law_records(10), forks={5: [], 10: []}), figures=False)
    assert report["forks"] == {}
    assert "No fork tokens were found in `forks/`" in (tmp_path / "none" / "report" / "report.md").read_text()


def test_a_composition_one_of_whose_parts_never_acted_is_not_said_to_train_as_its_base(tmp_path):
    """dapo+clip_b+forking_tokens where Clip_B never dropped a token but the 80/20 selector dropped 80% at every step:
    the report names the idle part and the parts that acted."""
    records = [{**record, "select/clip_b_frac": 0.0, "select/forking_tokens_frac": 0.8} for record in law_records(6)]
    run = write_run(tmp_path / "run", records, config={"method": "dapo+clip_b+forking_tokens", "optim": {"steps": 6}})
    write_run_report(run, figures=False)
    said = " ".join((run / "report" / "report.md").read_text().split())
    assert "trained as its base objective does" not in said
    assert ("Part of the method's own intervention was 0 at every logged step (`select/clip_b_frac`): that part never "
            "acted on this run; its other parts did (`select/forking_tokens_frac`).") in said


def test_the_covariance_column_is_the_first_training_step_whatever_its_number(tmp_path):
    """A run that logs from step 10 on (a TRL run with logging_steps = 10) heads the column step 10, and a step-0 record
    (the evaluation before training) is not the first step."""
    records = [{"step": 10 * (i + 1), "entropy/mean": 1.0, "reward/accuracy": 0.5, "cov/top_0.02pct_ratio": 1000.0 + i}
               for i in range(4)]
    report = write_run_report(write_run(tmp_path / "late", records), figures=False)
    assert report["covariance"]["values"][0]["step 10"] == 1000.0
    assert "are the dots" not in (tmp_path / "late" / "report" / "report.md").read_text()  # no evaluation, no dots
    records = [{"step": 0, "eval/avg_at_n": 0.5}] + [{"step": i + 1, "entropy/mean": 1.0, "reward/accuracy": 0.5,
                                                        "cov/top_0.02pct_ratio": 500.0 + i} for i in range(3)]
    report = write_run_report(write_run(tmp_path / "at-start", records), figures=False)
    assert report["covariance"]["values"][0]["step 1"] == 500.0
    report = write_run_report(write_run(tmp_path / "eval-only", [{"step": 0, "eval/avg_at_n": 0.5}]), figures=False)
    assert "first step" in report["covariance"]["values"][0]  # no training step logged: no number to head it with


def test_interventions_and_a_method_whose_own_part_never_acted(tmp_path):
    records = [{"step": i + 1, "entropy/mean": 1.0, "reward/accuracy": 0.5, "select/clip_cov_frac": 0.0,
                "clip/ppo_frac": [0.0, 0.1, 0.3][i], "shape/entropy_bonus": [0.2, None, 0.4][i],
                "reg/kl_coeff": [0.5, -0.7, 0.0][i]} for i in range(3)]
    run = write_run(tmp_path / "run", records, config={"method": {"method": "clip_cov", "params": {}}, "optim": {"steps": 3}})
    report = write_run_report(run, figures=False)
    assert report["method"] == "clip_cov"
    clip = row(report["interventions"], "metric", "clip/ppo_frac")
    assert clip["steps"] == 3 and clip["mean"] == pytest.approx(0.4 / 3) and clip["max"] == 0.3 and clip["steps not 0"] == 2
    # an advantage shaper's bonus is an intervention too; a step that logged null is not counted
    bonus = row(report["interventions"], "metric", "shape/entropy_bonus")
    assert bonus["steps"] == 2 and bonus["mean"] == pytest.approx(0.3) and bonus["max"] == 0.4 and bonus["steps not 0"] == 2
    # the largest value, wherever it falls, and a negative coefficient is not 0
    coeff = row(report["interventions"], "metric", "reg/kl_coeff")
    assert coeff["max"] == 0.5 and coeff["mean"] == pytest.approx(-0.2 / 3) and coeff["steps not 0"] == 2
    assert "`select/clip_cov_frac`): on this run it never acted" in (run / "report" / "report.md").read_text()


@pytest.mark.parametrize(("method", "logged", "idle"), [
    # IcePop masked every token: a row of its own, and it acted
    ("dapo+icepop", {"correction/icepop_masked_frac": 1.0}, None),
    ("dapo+icepop", {"correction/icepop_masked_frac": 0.0}, "correction/icepop_masked_frac"),
    # TIS and kl_ref act at every step: rows of their own, never "never acted"
    ("dapo+tis", {"correction/tis_weight_mean": 1.0, "correction/tis_truncated_frac": 0.0}, None),
    ("kl_ref", {"kl/ref": 0.003, "kl/ref_k1": 0.002}, None),
    # KL-Cov selects tokens at every step, but its term is 0 while the policy has not moved (strictly on-policy)
    ("kl_cov", {"select/kl_cov_frac": 0.008, "kl_cov/abs_log_ratio": 0.0}, "kl_cov/abs_log_ratio"),
    ("kl_cov", {"select/kl_cov_frac": 0.008, "kl_cov/abs_log_ratio": 0.01}, None),
])
def test_corrections_the_reference_kl_and_kl_cov_s_term_are_shown_and_judged(tmp_path, method, logged, idle):
    records = [{"step": i + 1, "entropy/mean": 1.0, "reward/accuracy": 0.5, **logged} for i in range(3)]
    run = write_run(tmp_path / "run", records, config={"method": method, "optim": {"steps": 3}})
    report = write_run_report(run, figures=False)
    assert {values["metric"] for values in report["interventions"]["values"]} == set(logged)
    said = " ".join((run / "report" / "report.md").read_text().split())
    if idle is None:
        assert "never acted" not in said
    else:
        assert f"(`{idle}`): on this run it never acted" in said


def test_a_method_given_as_a_list_of_names_is_the_composition_they_make(tmp_path):
    """An objective config may name its methods as a list (``method: [dapo, clip_b]``), which config.json keeps as a
    list: the report names the composition as ``dapo+clip_b`` would and checks the same parts for never acting."""
    records = [{"step": i + 1, "entropy/mean": 1.0, "reward/accuracy": 0.5, "select/clip_b_frac": 0.0} for i in range(5)]
    run = write_run(tmp_path / "run", records, config={"method": {"method": ["dapo", "clip_b"]}, "optim": {"steps": 5}})
    report = write_run_report(run, figures=False)
    assert report["method"] == "dapo+clip_b"
    assert "`select/clip_b_frac`): on this run it never acted" in (run / "report" / "report.md").read_text()


def test_a_run_in_progress_with_a_line_cut_short(tmp_path):
    run = write_run(tmp_path / "run", law_records(4), config={"method": "grpo", "optim": {"steps": 100}},
                    extra_lines=['{"step": 5, "entro'])
    report = write_run_report(run, figures=False)
    markdown = (run / "report" / "report.md").read_text()
    assert report["steps"] == 4 and "got to step 4 of 100" in markdown
    assert "not a JSON object were skipped: 5." in markdown
    assert report["section_errors"] == {}
    # a run that logs every other step is at the last step it logged, not at the number of steps logged
    sparse = [{**record, "step": 2 * record["step"]} for record in law_records(4)]
    write_run_report(write_run(tmp_path / "sparse", sparse, config={"method": "grpo", "optim": {"steps": 100}}), figures=False)
    assert "got to step 8 of 100" in (tmp_path / "sparse" / "report" / "report.md").read_text()
    finished = write_run(tmp_path / "finished", law_records(4), config={"method": "grpo", "optim": {"steps": 4}})
    write_run_report(finished, figures=False)
    assert "got to step" not in (finished / "report" / "report.md").read_text()


def test_a_report_folder_or_figures_folder_planted_as_a_link_is_replaced_not_written_through(tmp_path):
    """A received run whose report/ (the default output) or report/figures/ links to a folder of this user's: the
    report replaced same-named files there (report.md, entropy.png)."""
    run = write_run(tmp_path / "run", law_records(6))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my notes\n")
    (run / "report").symlink_to(mine, target_is_directory=True)
    write_run_report(run, figures=False)
    assert (run / "report").is_dir() and not (run / "report").is_symlink()
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    (run / "report" / "figures").symlink_to(pictures, target_is_directory=True)
    write_run_report(run, figures=True)
    assert sorted(mine.iterdir()) == [mine / "report.md"] and (mine / "report.md").read_text() == "my notes\n"
    assert list(pictures.iterdir()) == [] and not (run / "report" / "figures").is_symlink()
    assert list((run / "report" / "figures").glob("*.png"))


def test_a_report_that_fails_leaves_no_report_folder_behind(tmp_path):
    run = tmp_path / "run"
    (run / "metrics.jsonl").mkdir(parents=True)
    with pytest.raises(OSError):
        write_run_report(run, figures=False)
    assert not (run / "report").exists()


def test_an_integer_metric_beyond_a_float_s_range_is_not_a_number(tmp_path):
    """JSON integers have no bound: 10^400 made float() raise OverflowError and the report a traceback; it is skipped
    as 1e400 is."""
    records = law_records(3)
    records[0]["entropy/mean"] = 10**400
    run = write_run(tmp_path / "run", records)
    report = write_run_report(run, figures=False)
    assert report["section_errors"] == {}
    assert (run / "report" / "report.md").is_file()


def test_a_code_span_holding_lines_and_html_from_a_laboratory_s_files_stays_one_inert_span(tmp_path):
    """A laboratory folder whose lab.json names its preset with blank lines and HTML: the continuing command, a code
    span, was written as it came, so the blank line ended the span and the HTML after it was raw HTML of report.md."""
    lab = tmp_path / "lab"
    run = write_run(lab / "methods" / "grpo", law_records(3), config={"method": "grpo", "optim": {"steps": 10}})
    (lab / "lab.json").write_text(json.dumps({"preset": {"name": "tiny\n\n<img src=x onerror=alert(1)>\n\n"},
                                              "methods": ["grpo"]}))
    write_run_report(run, figures=False)
    markdown = (run / "report" / "report.md").read_text()
    assert not [line for line in markdown.splitlines() if line.startswith("<img")]
    assert "↵↵<img src=x onerror=alert(1)>↵↵" in markdown


@pytest.mark.parametrize("bad_lines, listed", [(10, "4, 5, 6, 7, 8, 9, 10, 11, 12, 13."),
                                                (11, "4, 5, 6, 7, 8, 9, 10, 11, 12, 13, ...")])
def test_the_first_10_skipped_metric_lines_are_named_and_more_are_marked(tmp_path, bad_lines, listed):
    run = write_run(tmp_path / "run", law_records(3), extra_lines=["[1]"] * bad_lines)
    write_run_report(run, figures=False)
    assert f"Lines of `metrics.jsonl` that are not a JSON object were skipped: {listed}" in (run / "report" / "report.md").read_text()


def test_figures_are_drawn_and_an_empty_run_still_gets_a_report(tmp_path):
    run = write_run(tmp_path / "run", law_records(12), evaluations={
        s: {"avg_at_n": 0.1 * s, "pass_at_k": {"1": 0.1 * s}} for s in (4, 8, 12)})
    report = write_run_report(run, out=tmp_path / "elsewhere")
    assert set(report["figures"]) == {"curves.png", "law.png", "evaluations.png"}  # no entropy change was logged
    assert all((tmp_path / "elsewhere" / "figures" / name).stat().st_size > 1000 for name in report["figures"])
    assert "No figure entropy_change.png: the run logged no step with both" in (tmp_path / "elsewhere" / "report.md").read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"method": "grpo"}))
    report = write_run_report(empty, figures=False)
    assert report["steps"] == 0 and report["section_errors"] == {}
    assert report["figures_note"] == "figures were not drawn (--no-figures)"
    assert "No training step has been logged yet" in (empty / "report" / "report.md").read_text()


def test_a_report_that_cannot_be_written_leaves_the_previous_one_whole_figures_included(tmp_path):
    """A full disk (here a file-size limit, EFBIG) while writing a second report: an error naming the file, and the
    first report's text and figures exactly as they were (they used to be cut where the disk filled, under a
    report.md still linking to them); nothing staged is left behind."""
    import resource
    import signal

    run = write_run(tmp_path / "run", law_records(12), evaluations={
        s: {"avg_at_n": 0.1 * s, "pass_at_k": {"1": 0.1 * s}} for s in (4, 8, 12)})
    write_run_report(run)
    out = run / "report"
    before = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert len([path for path in before if path.suffix == ".png"]) == 3
    write_run(run, law_records(20))  # the run went on: every figure changes
    limit = min(len(content) for path, content in before.items() if path.suffix == ".png") - 100
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limits[1]))
    try:
        with pytest.raises(OSError) as failure:
            write_run_report(run)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert Path(failure.value.filename).parent in (out, out / "figures") and ".tmp-" not in str(failure.value)
    assert {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
    report = write_run_report(run)  # room again
    assert report["steps"] == 20 and sorted(path.name for path in out.iterdir()) == [
        "figures", "report.html", "report.json", "report.md"]


def test_what_is_not_a_run_directory_is_said(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run directory at"):
        write_run_report(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not a training run directory"):
        write_run_report(tmp_path)
    (tmp_path / "lab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="is a laboratory folder: its report is"):
        write_run_report(tmp_path)
    # the command it names re-runs that folder as it was started (a bare `entrorl lab --out` would take the default
    # preset and its whole matrix): its preset, methods and RL seed
    (tmp_path / "lab.json").write_text(json.dumps({"preset": {"name": "quick", "seed": 0, "rl_seed": 2},
                                                   "methods": ["grpo", "dapo+clip_b"]}))
    with pytest.raises(FileNotFoundError) as refused:
        write_run_report(tmp_path)
    assert f"(`entrorl lab --preset quick --methods grpo,dapo+clip_b --out {tmp_path} --rl-seed 2` writes it again)" \
        in str(refused.value)
    for flag_or_text in (0.0, True, np.bool_(True), "0.5"):  # a flag is not the fraction 1, nor a string a number
        with pytest.raises(ValueError, match=r"fit_fraction must be a number in \(0, 1\]"):
            write_run_report(write_run(tmp_path / "run", law_records(3)), fit_fraction=flag_or_text)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000003" / "model"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(FileNotFoundError, match=r"is in checkpoint step_000003 of the run .*run: report on the run"):
        write_run_report(checkpoint)
    with pytest.raises(FileNotFoundError, match=r"is in checkpoint step_000003 of the run .*run: report on the run"):
        write_run_report(checkpoint.parent)  # the checkpoint's own folder
    model = tmp_path / "a-model"  # a Hugging Face model's folder: its config.json is not a run's
    model.mkdir()
    (model / "config.json").write_text((checkpoint / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="not a training run directory"):
        write_run_report(model)


def test_the_report_command(tmp_path):
    from typer.testing import CliRunner

    from entrorl.cli import app

    run = write_run(tmp_path / "run", law_records(80))
    result = CliRunner().invoke(app, ["report", str(run), "--no-figures"])
    assert result.exit_code == 0, result.output
    assert "forecast ceiling (law at zero entropy): 0.8" in result.output
    assert (run / "report" / "report.html").is_file()
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "no run directory at" in result.output
    for refused in ("0", "-0.5", "1.01"):
        result = CliRunner().invoke(app, ["report", str(run), "--fit-fraction", refused])
        assert result.exit_code == 2 and "--fit-fraction must be above 0 and at most 1" in result.output, refused
    result = CliRunner().invoke(app, ["report", str(run), "--no-figures", "--fit-fraction", "1", "--out",
                                      str(tmp_path / "whole")])  # the forecast fitted on every step
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "whole" / "report.json").read_text())["fit_fraction"] == 1
    (tmp_path / "a_file").write_text("kept")
    for figures in ("--figures", "--no-figures"):  # refused before anything is written, naming the option
        result = CliRunner().invoke(app, ["report", str(run), figures, "--out", str(tmp_path / "a_file" / "report")])
        assert result.exit_code == 2 and " ".join(result.output.split()) == (
            f"error: --out {tmp_path / 'a_file' / 'report'} cannot be written: {tmp_path / 'a_file'} is not a directory")
        result = CliRunner().invoke(app, ["report", str(run), figures, "--out", str(tmp_path / "a_file")])
        assert result.exit_code == 2 and " ".join(result.output.split()) == (
            f"error: --out {tmp_path / 'a_file'} exists and is not a directory; expected a directory")
    assert (tmp_path / "a_file").read_text() == "kept"


def test_report_prints_the_run_s_method_and_the_paths_of_the_files_it_wrote(tmp_path):
    from typer.testing import CliRunner

    from entrorl.cli import app

    run = write_run(tmp_path / "run", law_records(80))
    for out, target in ((None, run / "report"), (tmp_path / "elsewhere", tmp_path / "elsewhere")):
        result = CliRunner().invoke(app, ["report", str(run), "--no-figures", *(["--out", str(out)] if out else [])])
        assert result.exit_code == 0, result.output
        output = " ".join(result.output.split())
        assert "method: grpo" in output
        assert f"report: {target / 'report.html'} ({target / 'report.md'})" in output
        assert (target / "report.html").is_file() and (target / "report.md").is_file()


def test_the_law_is_also_fitted_to_the_evaluations_with_the_entropy_of_the_policy_they_evaluated(tmp_path):
    records = law_records(56)  # steps 1..56
    entropy = {r["step"]: r["entropy/mean"] for r in records}
    # the evaluation after step N evaluates the policy that samples step N + 1; after the last step, step N's entropy
    evaluations = {step: {"avg_at_n": 0.9 - 0.3 * math.exp(entropy.get(step + 1, entropy.get(step))), "pass_at_k": {}}
                   for step in range(0, 60, 5)}
    report = write_run_report(write_run(tmp_path / "run", records, evaluations=evaluations), figures=False)
    by_evaluations = report["law"]["evaluations"]
    assert by_evaluations["n_points"] == 12 and by_evaluations["reward_key"] == "eval/avg_at_n"
    assert by_evaluations["fit"]["a"] == pytest.approx(0.3) and by_evaluations["fit"]["b"] == pytest.approx(0.9)
    training, evaluated = report["law"]["table"]["values"]
    assert training["fitted on"] == "training steps (reward/accuracy)"
    assert evaluated["fitted on"] == "evaluations (eval/avg_at_n)" and evaluated["ceiling"] == pytest.approx(0.6)
    # the Avg@n reached is the best evaluation's (evaluations are not smoothed)
    best = max(evaluation["avg_at_n"] for evaluation in evaluations.values())
    assert by_evaluations["reached"] == pytest.approx(best) and evaluated["reached"] == pytest.approx(best)
    # its forecast refits on the caller's fraction of the evaluations, as the training steps' does
    halves = write_run_report(write_run(tmp_path / "run", records, evaluations=evaluations), figures=False, fit_fraction=0.5)
    assert halves["law"]["evaluations"]["forecast"]["n_fit"] == 6 and halves["law"]["fit"]["forecast"]["n_fit"] == 28
    assert "fitted on 12 evaluations" not in evaluated["note"]
    one = write_run_report(write_run(tmp_path / "one", records, evaluations={5: evaluations[5]}), figures=False)
    assert one["law"]["evaluations"] is None and len(one["law"]["table"]["values"]) == 1


def test_a_trl_run_is_read_from_its_trainer_state(tmp_path):
    """TRL's GRPOTrainer with the entrorl plugin logs the diagnostics into the transformers log history: the newest
    checkpoint's trainer_state.json gives the steps (evaluation entries and the closing summary left out)."""
    history = [{"step": step, "loss": 0.1, "reward": 0.1 * step, "entropy": 1.0 - 0.1 * step,
                "cov/top_0.02pct_ratio": 100.0 * step, "select/clip_cov_frac": 0.01} for step in (1, 2, 3)]
    history += [{"step": 3, "eval_loss": 0.5}, {"step": 3, "eval_reward": 0.9, "eval_runtime": 1.0},  # with or without a loss
                {"step": 3, "train_runtime": 12.0, "train_loss": 0.1}]
    for step, entries in ((2, history[:2]), (3, history)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"log_history": entries}))
    report = write_run_report(tmp_path, figures=False)
    summary = {r["quantity"]: r["value"] for r in report["summary"]["values"]}
    assert summary["read from"] == "checkpoint-3/trainer_state.json" and report["steps"] == 3
    assert summary["reward"] == "reward/mean" and summary["method"] == "n/a"  # no entrorl_objective.json beside it
    assert summary["steps planned (max_steps)"] is None
    assert report["law"]["fit"]["n_points"] == 3
    # counted in log entries, as a TRL run's records are
    assert row(report["covariance"], "q", "top 0.02%")["mean over log entries"] == 200.0
    assert row(report["interventions"], "metric", "select/clip_cov_frac")["log entries"] == 3
    # a checkpoint folder is a run directory of its own, up to its step
    assert write_run_report(tmp_path / "checkpoint-2", figures=False)["steps"] == 2
    # the plugin's entrorl_objective.json names the method; TRL's max_steps are the planned steps; the folder's
    # config.json is the model's, not a run's
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 100}))
    (tmp_path / "checkpoint-3" / "entrorl_objective.json").write_text(json.dumps({"method": "dapo+clip_cov"}))
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({"log_history": history, "max_steps": 5}))
    report = write_run_report(tmp_path, figures=False)
    summary = {r["quantity"]: r["value"] for r in report["summary"]["values"]}
    assert summary["method"] == "dapo+clip_cov" and summary["steps planned (max_steps)"] == 5
    said = " ".join((tmp_path / "report" / "report.md").read_text().split())
    assert "A TRL run keeps no Pass@k evaluation" in said
    # stopped before its max_steps: continued the way TRL continues a run, not with entrorl train
    assert "got to step 3 of 5: it is still training or was stopped (`trainer.train(" \
           "resume_from_checkpoint=True)` continues it)" in said and "entrorl train" not in said



def test_the_newest_checkpoint_is_the_highest_numbered_and_the_plugin_s_own_reward_is_kept(tmp_path):
    """checkpoint-10 is newer than checkpoint-9 (numbers, not text); where the plugin logged ``reward/mean`` TRL's
    ``reward`` does not replace it; the log history is read ordered by step whatever its order in the file."""
    def history(steps):
        return [{"step": s, "reward": 0.0, "reward/mean": 0.1 * s, "entropy": 1.0 - 0.05 * s} for s in steps]

    for step in (9, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        entries = history(range(step, 0, -1))  # newest first
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"log_history": entries}))
    report = write_run_report(tmp_path, figures=False)
    summary = {r["quantity"]: r["value"] for r in report["summary"]["values"]}
    assert summary["read from"] == "checkpoint-10/trainer_state.json" and report["steps"] == 10
    # 10 steps: start and end are steps 1 and 10
    assert summary["reward start"] == pytest.approx(0.1) and summary["reward end"] == pytest.approx(1.0)
    assert summary["entropy start (nats)"] == pytest.approx(0.95)


def test_metrics_jsonl_is_read_before_a_trainer_state_beside_it(tmp_path):
    run = write_run(tmp_path / "run", law_records(10))
    (run / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 1, "reward": 0.5, "entropy": 1.0}]}))
    report = write_run_report(run, figures=False)
    summary = {r["quantity"]: r["value"] for r in report["summary"]["values"]}
    assert summary["read from"] == "metrics.jsonl" and report["steps"] == 10


def test_evaluations_are_ordered_by_step_and_every_k_of_any_evaluation_is_a_column(tmp_path):
    """Files are listed in no particular order: the table runs by step and the summary gives the last one. A k only
    the earlier evaluations recorded still has its column (n/a where missing). A file that is not an evaluation (a
    list, in eval/) and a Pass@k entry whose key is not a k are left out, not taken down with the section."""
    evaluations = {step: {"avg_at_n": step / 100, "pass_at_k": {"1": step / 100, "4": step / 50}}
                   for step in (30, 5, 20, 10, 15)}  # written out of order
    evaluations[40] = {"avg_at_n": 0.4, "pass_at_k": {"1": 0.4, "mean": 0.4, "8": "n/a", "16": None}}  # no value for 8, 16
    evaluations[45] = [{"token": "x", "entropy": 1.0}]
    run = write_run(tmp_path / "run", law_records(40), evaluations=evaluations)
    (run / "eval" / "step_000050.json.tmp").write_text(json.dumps({"avg_at_n": 0.9}))  # not a step file: left out
    report = write_run_report(run, figures=False)
    assert report["section_errors"] == {}
    table = report["evaluations"]
    assert [r["step"] for r in table["values"]] == [5, 10, 15, 20, 30, 40]
    assert "Pass@4" in table["columns"] and "Pass@mean" not in table["columns"]
    assert "Pass@8" not in table["columns"] and "Pass@16" not in table["columns"]
    assert row(table, "step", 40)["Pass@4"] is None and row(table, "step", 30)["Pass@4"] == 0.6
    summary = {r["quantity"]: r["value"] for r in report["summary"]["values"]}
    assert summary["evaluation Avg@n at step 40"] == 0.4 and summary["evaluation Pass@1 at step 40"] == 0.4


def test_only_the_top_forks_of_the_latest_evaluation_are_listed(tmp_path):
    from entrorl.analysis.run import FORKS_SHOWN

    forks = {10: [{"token": str(i), "entropy": 3.0 - 0.1 * i, "before": "", "after": ""} for i in range(FORKS_SHOWN + 2)]}
    report = write_run_report(write_run(tmp_path / "run", law_records(10), forks=forks), figures=False)
    assert [r["rank"] for r in report["forks"]["latest"]["values"]] == list(range(1, FORKS_SHOWN + 1))
    assert f"(the top {FORKS_SHOWN} of the {FORKS_SHOWN + 2} saved)" in (tmp_path / "run" / "report" / "report.md").read_text()
    # the recurring tokens are the 10 most frequent of the 12 distinct ones
    assert len(report["forks"]["recurring"]["values"]) == RECURRING_FORKS_SHOWN == 10

# boundaries and marginals: values exactly on a threshold, the chance level's two marginals
def test_chance_agreement_takes_each_series_marginals_over_the_steps_without_a_zero(tmp_path):
    # signed steps (first 4): predicted + + + -  (p+ = 3/4), measured + - - - (m+ = 1/4); the last two have a zero
    predicted = np.array([1.0, 1.0, 1.0, -1.0, 0.0, 1.0])
    measured = np.array([1.0, -1.0, -1.0, -1.0, 1.0, 0.0])
    expected = 0.75 * 0.25 + 0.25 * 0.75
    assert chance_sign_agreement(predicted, measured) == pytest.approx(expected)
    records = [{"step": i + 1, "entropy/mean": 1.0, "reward/accuracy": 0.5, "entropy/predicted_delta": float(p),
                "entropy/measured_delta": float(m)} for i, (p, m) in enumerate(zip(predicted, measured))]
    report = write_run_report(write_run(tmp_path / "run", records), figures=False)
    (values,) = report["entropy_change"]["values"]
    assert values["by chance"] == pytest.approx(expected) and values["sign agreement"] == 0.5


def test_the_summary_sentence_of_a_two_step_run_gives_start_and_end_in_order(tmp_path):
    """From two steps on, the summary says where entropy and reward started and ended (each edge one step here)."""
    records = [{"step": 1, "entropy/mean": 1.0, "reward/accuracy": 0.2}, {"step": 2, "entropy/mean": 0.8, "reward/accuracy": 0.6}]
    run = write_run(tmp_path / "run", records)
    write_run_report(run, figures=False)
    said = " ".join((run / "report" / "report.md").read_text().split())
    assert "went from 1 to 0.8 nats, 0.8 of its start" in said and "did not collapse" in said
    assert "; the reward went from 0.2 to 0.6." in said


def test_an_end_at_exactly_half_the_start_is_a_collapse(tmp_path):
    entropy = [1.0] + [0.75] * 8 + [0.5]  # 10 steps: one step per edge, end/start = 0.5 exactly
    records = [{"step": i + 1, "entropy/mean": h, "reward/accuracy": 0.1 * i} for i, h in enumerate(entropy)]
    run = write_run(tmp_path / "run", records)
    write_run_report(run, figures=False)
    assert "by the laboratory's threshold, applied to the training curve (the laboratory compares evaluations when it has them), entropy collapsed" in (run / "report" / "report.md").read_text()


def test_a_zero_entropy_at_the_start_gives_no_ratio_and_no_crash(tmp_path):
    assert math.isnan(ratio(1.0, 0.0))
    records = [{"step": i + 1, "entropy/mean": 0.0 if i == 0 else 0.3, "reward/accuracy": 0.1 * i} for i in range(10)]
    report = write_run_report(write_run(tmp_path / "run", records), figures=False)
    summary = {r["quantity"]: r["value"] for r in report["summary"]["values"]}
    assert summary["entropy end/start"] is None


def test_the_law_s_end_points_count_the_fitted_points_not_the_steps(tmp_path):
    records = law_records(30)
    for record in records[1::2]:  # reward missing on every other step: 15 points where both are finite
        del record["reward/accuracy"]
    report = write_run_report(write_run(tmp_path / "run", records), figures=False)
    law = report["law"]["fit"]
    assert law["n_points"] == 15 and law["end_points"] == 2  # ceil(0.1 * 15), not ceil(0.1 * 30) = 3
    assert "unit" not in law  # the points are steps, the notes' default
    # the forecast's baselines are taken on the same 15 points
    reward = np.array([r["reward/accuracy"] for r in records if "reward/accuracy" in r])
    n_fit = law["forecast"]["n_fit"]
    (baselines,) = report["forecast_baselines"]["values"]
    assert baselines["later steps"] == 15 - n_fit
    assert baselines["constant RMSE"] == pytest.approx(np.sqrt(np.mean((reward[n_fit:] - reward[:n_fit].mean()) ** 2)))


def test_the_end_is_not_in_sample_when_it_follows_the_fitted_points(tmp_path):
    # 20 steps, fit_fraction 0.9: the first 18 are fitted, the last 2 (the end) are not
    report = write_run_report(write_run(tmp_path / "run", law_records(20)), figures=False, fit_fraction=0.9)
    law = report["law"]["fit"]
    assert law["forecast"]["n_fit"] == 18 and law["end_points"] == 2
    assert law["end_in_fit"] is False
    (cells,) = report["law"]["table"]["values"]
    assert "in-sample" not in (cells["note"] or "")


def test_a_forecast_on_exactly_the_minimum_steps_for_a_ceiling_gives_its_headroom(tmp_path):
    report = write_run_report(write_run(tmp_path / "run", law_records(40)), figures=False, fit_fraction=0.25)
    law = report["law"]["fit"]
    assert law["forecast"]["n_fit"] == 10
    assert law["ceiling_minus_reached"] is not None
    (cells,) = report["law"]["table"]["values"]
    assert cells["forecast ceiling − reached"] is not None


def test_two_evaluations_are_enough_for_the_evaluation_law(tmp_path):
    evaluations = {5: {"step": 5, "avg_at_n": 0.3}, 10: {"step": 10, "avg_at_n": 0.5}}
    report = write_run_report(write_run(tmp_path / "run", law_records(10), evaluations=evaluations), figures=False)
    assert report["law"]["evaluations"] is not None and report["law"]["evaluations"]["n_points"] == 2


class _Records(MetricRecords):
    def __init__(self, records):
        self.records = records


def test_a_negative_intervention_value_is_an_action():
    records = [{"step": i + 1, "entropy/mean": 1.0, "reward/accuracy": 0.5, "shape/entropy_advantage_bonus": -0.1}
               for i in range(5)]
    analysis = analyse_records(_Records(records), 0.15, "entropy_advantage")
    (item,) = [i for i in analysis.interventions if i["key"] == "shape/entropy_advantage_bonus"]
    assert item["active_steps"] == 5 and item["max_abs"] == 0.1 and not analysis.never_acted
    once = [{**record, "shape/entropy_advantage_bonus": -0.3 if i == 2 else 0.0} for i, record in enumerate(records)]
    (item,) = [i for i in analyse_records(_Records(once), 0.15, "entropy_advantage").interventions
               if i["key"] == "shape/entropy_advantage_bonus"]
    assert item["active_steps"] == 1 and item["max_abs"] == 0.3
    assert not analyse_records(_Records(once), 0.15, "entropy_advantage").never_acted  # one step is enough to have acted


def test_step_records_are_ordered_by_step_whatever_the_line_order(tmp_path):
    """Lines written out of order (a resumed run appending earlier steps) are read back ordered by step, so the start
    of the run is its first steps."""
    path = tmp_path / "metrics.jsonl"
    order = [3, 1, 4, 2]
    path.write_text("".join(json.dumps({"step": s, "entropy/mean": float(s)}) + "\n" for s in order))
    records, unreadable, repeated = read_metrics_records(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and unreadable == [] and repeated == []
    analysis = analyse_records(_Records(records), 0.15)
    assert analysis.entropy_start == 1.0 and analysis.entropy_end == 4.0


def test_the_forecast_error_at_the_end_is_the_mean_over_the_last_points():
    """``end_error`` is the forecast's predicted minus measured reward averaged over the last 10% of the points (3 of
    30 here), not the error at the last point alone."""
    records = law_records(30)
    offsets = [0.03, -0.06, 0.09]
    for record, offset in zip(records[-3:], offsets):
        record["reward/accuracy"] += offset
    law = analyse_records(_Records(records), 0.15).law
    entropy = np.array([r["entropy/mean"] for r in records])
    reward = np.array([r["reward/accuracy"] for r in records])
    forecast = forecast_entropy_law(entropy, reward, fit_fraction=0.15)
    assert law["end_points"] == 3
    assert law["end_error"] == pytest.approx(float(np.mean(forecast.fit.predict(entropy[-3:]) - reward[-3:])))
    assert law["end_error"] == pytest.approx(-np.mean(offsets), abs=1e-9)


def test_the_fit_ceiling_is_shown_from_exactly_the_minimum_number_of_steps():
    """The ceiling of the law fitted on every step is shown from 10 steps on (a > 0), not on 9."""
    assert fit_ceiling_shown(analyse_records(_Records(law_records(10)), 0.15).law)
    assert not fit_ceiling_shown(analyse_records(_Records(law_records(9)), 0.15).law)
    assert not fit_ceiling_shown({"fit": {"ceiling_applies": False, "n_points": 12}})


def test_a_ceiling_of_exactly_one_is_within_an_accuracy_s_range():
    """An accuracy can reach 1: only a ceiling above 1 is flagged, and only when the reward is an accuracy."""
    assert not beyond_an_accuracy({"reward_key": "reward/accuracy"}, 1.0)
    assert beyond_an_accuracy({"reward_key": "reward/accuracy"}, 1.001)
    assert beyond_an_accuracy({"reward_key": "eval/avg_at_n"}, 1.2)
    assert not beyond_an_accuracy({"reward_key": "reward/mean"}, 1.2)
    assert not beyond_an_accuracy({"reward_key": "reward/accuracy"}, None)


def test_no_headroom_is_given_for_a_forecast_whose_premise_fails():
    """A forecast fitted on enough steps but with a <= 0 (reward fell as entropy fell) forecasts no ceiling, so no
    distance between its ceiling and the reward reached is given."""
    entropy = np.linspace(0.9, 0.2, 80)
    records = [{"step": i + 1, "entropy/mean": float(h), "reward/accuracy": float(0.2 * math.exp(h) - 0.1)}
               for i, h in enumerate(entropy)]
    law = analyse_records(_Records(records), 0.15).law
    assert law["forecast"]["n_fit"] == 12 and law["forecast"]["fit"]["a"] == pytest.approx(-0.2)
    assert law["ceiling_minus_reached"] is None
    assert analyse_records(_Records(law_records(80)), 0.15).law["ceiling_minus_reached"] is not None
    note = law_cells(law)[-1].text
    assert "forecast a ≤ 0 on the first 12 steps: no forecast ceiling" in note


def test_a_correlation_needs_three_steps():
    """Two points always lie on a line: the correlation of predicted and measured change is undefined below 3 steps."""
    assert math.isnan(pearson(np.array([1.0, 2.0]), np.array([3.0, 1.0])))
    x, y = np.array([1.0, 2.0, 4.0]), np.array([3.0, 1.0, 2.0])
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert math.isnan(pearson(x, np.full(3, 2.0)))


def test_metric_lines_that_are_blank_not_an_object_or_not_utf8_are_handled(tmp_path):
    """Blank lines are skipped silently; a line that is JSON but not an object, or whose bytes are not UTF-8 where they
    break the JSON, is named as unreadable; bytes that are not UTF-8 inside a string leave the record readable."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"\n".join([
        b'{"step": 1, "entropy/mean": 0.5}',
        b"",
        b"[1, 2]",
        b'\xff\xfe{"step": 9}',
        b'{"step": 2, "entropy/mean": 0.4, "note": "\xff"}',
        b"7",
    ]) + b"\n")
    records, unreadable, _ = read_metrics_records(path)
    assert [r["step"] for r in records] == [1, 2] and unreadable == [3, 4, 6]
    assert read_metrics_records(tmp_path / "missing.jsonl") == ([], [], [])


def test_a_json_file_that_cannot_be_read_or_parsed_is_none(tmp_path):
    (tmp_path / "ok.json").write_text('{"a": 1}')
    (tmp_path / "bad.json").write_text('{"a": ')
    assert read_json(tmp_path / "ok.json") == {"a": 1}
    assert read_json(tmp_path / "bad.json") is None and read_json(tmp_path / "missing.json") is None


def test_steps_without_a_step_number_are_counted_from_1():
    assert _Records([{"entropy/mean": 1.0}, {"entropy/mean": 0.9}, {"step": 7}]).steps.tolist() == [1.0, 2.0, 7.0]


def test_a_step_0_record_keeps_step_0():
    """A step-0 record (the evaluation before the first step, ``eval.at_start``) is at step 0, not at step 1."""
    assert _Records([{"step": 0, "eval/avg_at_n": 0.25}, {"step": 1, "entropy/mean": 1.0}]).steps.tolist() == [0.0, 1.0]


def test_the_reward_is_the_accuracy_unless_only_the_mean_reward_was_logged():
    both = [{"step": 1, "reward/accuracy": 0.5, "reward/mean": 0.2}]
    assert _Records(both).reward_key == "reward/accuracy"
    assert _Records([{"step": 1, "reward/mean": 0.2}]).reward_key == "reward/mean"
    assert _Records([{"step": 1, "entropy/mean": 1.0}]).reward_key == "reward/accuracy"


def test_the_highest_reward_reached_is_the_best_5_step_trailing_mean():
    """``reward_reached`` is the maximum of the trailing 5-step moving average (missing steps left out), not the
    best single step: 3 steps at 1 among 0s reach 0.6."""
    rewards = [None, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    records = [{"step": i + 1, "entropy/mean": 1.0 - 0.05 * i} for i in range(10)]
    for record, reward in zip(records, rewards):
        if reward is not None:
            record["reward/accuracy"] = reward
    assert analyse_records(_Records(records), 0.15).reward_reached == pytest.approx(0.6)


def test_the_covariance_token_count_is_the_median_and_the_token_correlation_the_mean_over_steps():
    records = [{"step": i + 1, "entropy/mean": 1.0, "cov/n_tokens": n, "entropy/delta_token_corr": c}
               for i, (n, c) in enumerate([(100.0, 0.1), (1000.0, 0.9), (120.0, 0.2)])]
    analysis = analyse_records(_Records(records), 0.15)
    assert analysis.cov_tokens == 120.0 and analysis.change["token_corr_mean"] == pytest.approx(0.4)


def test_edge_means_of_no_steps_and_over_the_finite_values_only():
    start, end, n_edge = edge_means([])
    assert math.isnan(start) and math.isnan(end) and n_edge == 0
    # the means are over the finite values only: 20 steps, 2 a side
    assert edge_means([math.inf, 1.0] + [0.5] * 16 + [3.0, -math.inf]) == (1.0, 3.0, 2)
    analysis = analyse_records(_Records([]), 0.15)
    assert analysis.n_steps == 0 and analysis.n_edge == 0 and math.isnan(analysis.entropy_start)


def test_the_edge_and_last_steps_phrases_of_runs_of_no_step_one_step_a_side_or_different_lengths():
    assert edge_phrase(10) == "the first and the last 10% of the 10 training steps (1 step each)"
    assert edge_phrase(0) == "the training steps (none was logged)"
    assert last_steps_phrase({0}) == "the last 10% of steps"
    assert last_steps_phrase({40}) == "the last 10% of steps"
    assert last_steps_phrase({12}) == "the last 2 of the 12 steps (16.7%: 10% rounded up to whole steps)"
    assert last_steps_phrase({12, 40}) == "the last 10% of steps (rounded up to whole steps)"


def test_the_first_method_of_a_composition_decides_whether_interventions_are_checked():
    """The first method gives the trainer its advantage estimator: clip_b+nsr trains with GRPO advantages and its parts
    are checked (each once, although nsr and psr share their sign selector); nsr+clip_b trains with nsr's."""
    clip_b = [pattern.format("clip_b") for pattern in INTERVENTION_KEY_PATTERNS]
    sign = [pattern.format("advantage_sign") for pattern in INTERVENTION_KEY_PATTERNS]
    assert intervention_keys("clip_b+nsr") == clip_b + sign
    assert intervention_keys("clip_b+nsr+psr") == clip_b + sign
    assert intervention_keys("nsr+clip_b") == []


def test_a_method_with_parts_added_is_named_with_them_and_its_parts_interventions_are_checked(tmp_path):
    """A method written as a mapping that adds parts (``{method: grpo, regularizers: [entropy_bonus]}``) is named
    ``grpo+entropy_bonus`` in the report, not ``grpo``, and the part's own metric is checked: an entropy bonus whose
    coefficient stayed 0 is said never to have acted, by the term it logs. A surrogate put in place adds no
    intervention of its own, and a part the registry does not know (a run's own) leaves the others checked."""
    from entrorl.objective import PolicyBatch, build_objective

    assert "reg/entropy_bonus" in intervention_keys("grpo+entropy_bonus")
    assert intervention_keys("grpo+cispo") == [] and intervention_keys("grpo+no_such_part") == []
    assert intervention_keys("clip_b+no_such_part") == intervention_keys("clip_b")
    # the keys checked include one the part really logs
    batch = PolicyBatch(log_prob=torch.zeros(2, 3), old_log_prob=torch.zeros(2, 3), advantages=torch.tensor([1.0, -1.0]),
                        mask=torch.ones(2, 3, dtype=torch.bool), entropy=torch.ones(2, 3, requires_grad=True))
    logged = build_objective({"method": "grpo", "regularizers": [{"name": "entropy_bonus", "entropy_coeff": 0.0}]})(
        batch).metrics
    assert set(logged) & set(intervention_keys("grpo+entropy_bonus")) == {"reg/entropy_bonus"}
    records = [{"step": i + 1, "entropy/mean": 0.5, "reward/accuracy": 0.1 * i, "reg/entropy_bonus": 0.0}
               for i in range(5)]
    config = {"method": {"method": "grpo", "regularizers": [{"name": "entropy_bonus", "entropy_coeff": 0.0}],
                         "params": {}}, "optim": {"steps": 5}}
    report = write_run_report(write_run(tmp_path / "run", records, config=config), figures=False)
    assert report["method"] == "grpo+entropy_bonus"
    said = " ".join((tmp_path / "run" / "report" / "report.md").read_text().split())
    assert "The method's own intervention was 0 at every logged step (`reg/entropy_bonus`)" in said
    # a hand-edited mapping that is no valid method is named by what it gives
    config["method"] = {"method": "grpo", "regularizers": "not a list"}
    assert write_run_report(write_run(tmp_path / "odd", records, config=config), figures=False)["method"] == "grpo"


def test_law_notes_for_three_points_with_a_constant_reward_a_fit_error_and_a_failed_premise():
    """With 3 points R² is undefined only because the reward never changed; a fit error is noted by its first clause; a
    fit with a ≤ 0 says so, and not that its (inexistent) ceiling rests on too few steps."""
    records = [{"step": i + 1, "entropy/mean": h, "reward/accuracy": 0.5} for i, h in enumerate([0.9, 0.6, 0.3])]
    note = law_cells(analyse_records(_Records(records), 0.15).law)[-1].text
    assert "R² undefined: the reward never changed" in note and "fewer than 3 points" not in note
    flat = [{"step": i + 1, "entropy/mean": 0.7, "reward/accuracy": 0.1 * i} for i in range(5)]
    note = law_cells(analyse_records(_Records(flat), 0.15).law)[-1].text
    assert "fit: entropy is the same at all 5 points" in note
    assert "fit over training steps at which entropy changes" not in note
    falling = [{"step": i + 1, "entropy/mean": h, "reward/accuracy": 0.2 * math.exp(h)} for i, h in enumerate([0.9, 0.6, 0.3])]
    note = law_cells(analyse_records(_Records(falling), 0.15).law)[-1].text
    assert "a ≤ 0: reward did not rise as entropy fell" in note and "fitted on 3 steps only" not in note  # no ceiling to hide


def test_the_law_cells_give_the_headroom_with_its_sign_and_the_forecast_rmse():
    records = law_records(80)
    for i, record in enumerate(records):
        record["reward/accuracy"] += 0.01 * (-1) ** i  # off the law by 0.01 at every step
    law = analyse_records(_Records(records), 0.15).law
    assert law["ceiling_minus_reached"] > 0
    cells = dict(zip(LAW_COLUMNS, law_cells(law)))
    headroom = cells["forecast ceiling − reached"]
    assert headroom.text.startswith("+") and headroom.value == pytest.approx(law["ceiling_minus_reached"])
    assert cells["forecast RMSE"].value == pytest.approx(law["forecast"]["rmse"]) and law["forecast"]["rmse"] > 0.005


def test_the_report_command_names_a_section_that_failed_and_where_else_a_report_can_go(tmp_path, monkeypatch):
    """A section that raises is named with its error, printed as written (brackets are not console markup), and the
    report is still written (exit 0); a default report folder that cannot be made says --out writes it elsewhere, an
    --out that cannot be made does not."""
    from typer.testing import CliRunner

    from entrorl.analysis import run_report
    from entrorl.cli import app

    run = write_run(tmp_path / "run", law_records(80))

    def broken(self, section):
        raise ValueError("[bold]no[/bold] covariance")

    monkeypatch.setattr(run_report._RunReport, "covariance", broken)
    result = CliRunner().invoke(app, ["report", str(run), "--no-figures"])
    assert result.exit_code == 0, result.output
    assert "section covariance could not be generated: ValueError: [bold]no[/bold] covariance" in result.output
    assert (run / "report" / "report.html").is_file()
    monkeypatch.undo()
    shutil.rmtree(run / "report")
    (run / "report").write_text("")
    result = CliRunner().invoke(app, ["report", str(run), "--no-figures"])
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and output.startswith("error: ") and output.endswith(
        "; --out writes the report elsewhere"), output
    result = CliRunner().invoke(app, ["report", str(run), "--no-figures", "--out", str(run / "report" / "inside")])
    assert result.exit_code == 2 and "--out writes the report elsewhere" not in result.output, result.output
    assert f"--out {run / 'report' / 'inside'} cannot be written" in " ".join(result.output.split())


def test_a_stopped_laboratory_method_is_said_to_continue_with_its_laboratory_s_command(tmp_path):
    """A laboratory method's folder that logged fewer steps than planned: the laboratory's command goes on with it (its
    preset, methods and folder, from lab.json), not `entrorl train --resume` of a folder it did not write."""
    lab = tmp_path / "lab"
    run = write_run(lab / "methods" / "grpo", law_records(6), config={"method": "grpo", "optim": {"steps": 12}})
    (lab / "lab.json").write_text(json.dumps({"preset": {"name": "quick", "seed": 0, "rl_seed": None},
                                              "methods": ["grpo", "clip_cov"]}))
    write_run_report(run, figures=False)
    said = " ".join((run / "report" / "report.md").read_text().split())
    assert (f"got to step 6 of 12: it is still training or was stopped (`entrorl lab --preset quick --methods "
            f"grpo,clip_cov --out {lab}` continues it)") in said


def test_a_laboratory_method_folder_s_final_evaluation_is_its_evaluation_after_the_last_step(tmp_path):
    """`entrorl lab` evaluates each method once, after training, into `final_eval.json` (no `eval/` folder): the report
    shows it and its fork tokens at the last logged step. With `eval/` files it is left out (another prompt set)."""
    summary = {"n_problems": 8, "n_samples": 4, "avg_at_n": 0.375, "pass_at_k": {"1": 0.375, "2": 0.5, "4": 0.625},
               "pass_rates": [0.25] * 8, "polarisation": {"frac_zero": 0.25, "frac_one": 0.125}, "threshold": 0.5}
    final = {"summary": summary, "avg_at_n": 0.375, "forgetting_accuracy": 0.5,
             "forks": [{"token": "7", "entropy": 1.25, "before": "3+4=", "after": "", "source": "eval.jsonl:1"}]}
    run = write_run(tmp_path / "lab" / "methods" / "grpo", law_records(12))
    (run / "final_eval.json").write_text(json.dumps(final))
    report = write_run_report(run, figures=False)
    assert report["section_errors"] == {}
    (evaluation,) = report["evaluations"]["values"]
    assert evaluation == {"step": 12, "prompts": 8, "n": 4, "Avg@n": 0.375, "Pass@1": 0.375, "Pass@2": 0.5, "Pass@4": 0.625,
                          "solved by none": 0.25, "solved by all": 0.125}
    assert report["forks"]["latest"]["title"] == "Step 12" and report["forks"]["latest"]["values"][0]["entropy"] == 1.25
    assert "The laboratory's final evaluation (`final_eval.json`, after step 12)" in (run / "report" / "report.md").read_text()
    # the trainer's own evaluations come first: then the laboratory's is not mixed into their series
    evaluations = {6: {"n_problems": 2, "n_samples": 1, "avg_at_n": 0.5, "pass_at_k": {"1": 0.5}}}
    run = write_run(tmp_path / "trained", law_records(12), evaluations=evaluations)
    (run / "final_eval.json").write_text(json.dumps(final))
    report = write_run_report(run, figures=False)
    assert [r["step"] for r in report["evaluations"]["values"]] == [6] and report["forks"] == {}
    # a final_eval.json without a summary (an older or foreign file), or a run that logged no step, gives no evaluation
    run = write_run(tmp_path / "foreign", law_records(12))
    (run / "final_eval.json").write_text(json.dumps({"avg_at_n": 0.375}))
    assert write_run_report(run, figures=False)["evaluations"]["values"] == []


def test_a_ratio_to_a_negative_or_zero_start_is_undefined():
    """end/start is a share of the start only for a positive start: a negative or zero one gives nan, not a negative
    share that would read as a collapse."""
    assert math.isnan(ratio(0.3, -0.6)) and math.isnan(ratio(0.3, 0.0)) and math.isnan(ratio(math.nan, 1.0))
    assert ratio(0.3, 0.6) == 0.5


def test_a_correlation_with_a_constant_series_is_nan_without_a_warning():
    import warnings

    x = np.array([1.0, 2.0, 4.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(pearson(x, np.full(3, 2.0))) and math.isnan(pearson(np.full(3, 2.0), x))


def test_the_first_training_step_of_records_that_start_with_a_step_0_evaluation_is_step_1():
    """analyse_records on records holding the step-0 evaluation: the covariance's "first" value and the first step are
    those of step 1, not of the step-0 record."""
    records = [{"step": 0, "eval/avg_at_n": 0.25, "cov/top_0.02pct_ratio": 7.0}]
    records += [{"step": i + 1, "entropy/mean": 1.0 - 0.1 * i, "cov/top_0.02pct_ratio": 900.0 + i} for i in range(3)]
    analysis = analyse_records(_Records(records), 0.15)
    assert analysis.first_step == 1.0 and analysis.first_step_label == "step 1"
    assert analysis.cov["0.02"]["first"] == 900.0
    assert analysis.cov["0.02"]["mean"] == pytest.approx((7.0 + 900.0 + 901.0 + 902.0) / 4)


def test_a_reward_that_never_changed_is_noted_as_a_failed_premise():
    """A constant reward is fitted with a = 0: the law's premise a > 0 fails, and the note says so."""
    records = [{"step": i + 1, "entropy/mean": h, "reward/accuracy": 0.5} for i, h in enumerate([0.9, 0.6, 0.3])]
    law = analyse_records(_Records(records), 0.15).law
    assert law["fit"]["a"] == 0.0 and law["forecast"]["fit"]["a"] == 0.0
    note = law_cells(law)[-1].text
    assert "a ≤ 0: reward did not rise as entropy fell" in note
    assert "forecast a ≤ 0 on the first 3 steps: no forecast ceiling" in note


def test_a_forecast_on_a_flat_start_has_no_ceiling_and_says_why():
    """The reward is flat over the 3 fitted steps and rises afterwards: the forecast's a is 0, so it gives no ceiling,
    and the note says the premise failed, not that the ceiling rests on too few steps."""
    records = law_records(20)
    for record in records[:3]:
        record["reward/accuracy"] = 0.1
    law = analyse_records(_Records(records), 0.15).law
    assert law["forecast"]["n_fit"] == 3 and law["forecast"]["fit"]["a"] == 0.0 and law["fit"]["a"] > 0
    note = law_cells(law)[-1].text
    assert "forecast a ≤ 0 on the first 3 steps: no forecast ceiling" in note
    assert "forecast fitted on 3 steps only" not in note


def test_a_ceiling_above_1_that_is_not_shown_is_not_flagged():
    """On 8 steps neither ceiling is shown (fewer than 10), so none is said to be above 1, although both are (1.3)."""
    law = analyse_records(_Records(law_records(8, a=0.2, b=1.5)), 0.15).law
    assert law["fit"]["ceiling"] == pytest.approx(1.3) and law["forecast"]["predicted_ceiling"] == pytest.approx(1.3)
    cells = dict(zip(LAW_COLUMNS, law_cells(law)))
    assert "above 1" not in cells["note"].text and "fitted on 8 steps only" in cells["note"].text
    assert cells["ceiling"].text == cells["forecast ceiling"].text == "—"
    shown = analyse_records(_Records(law_records(20, a=0.2, b=1.5)), 0.5).law
    assert "ceiling and forecast ceiling above 1" in law_cells(shown)[-1].text


def test_the_law_of_evaluations_names_its_points_evaluations():
    entropy = np.linspace(0.9, 0.3, 5)
    law = law_of(entropy, 1.2 - 0.4 * np.exp(entropy), reward_key="eval/avg_at_n", reached=0.7, fit_fraction=0.15,
                 unit="evaluations")
    assert law["unit"] == "evaluations" and law["n_points"] == 5 and law["forecast"]["n_fit"] == 3
    note = law_cells(law)[-1].text
    assert "fitted on 5 evaluations only (fewer than 10)" in note
    assert "forecast fitted on 3 evaluations only (fewer than 10)" in note
    assert " steps" not in note


def test_a_finished_run_that_logged_every_other_step_is_not_said_to_be_in_progress(tmp_path):
    sparse = [{**record, "step": 2 * record["step"]} for record in law_records(4)]  # steps 2, 4, 6, 8 of 8
    run = write_run(tmp_path / "run", sparse, config={"method": "grpo", "optim": {"steps": 8}})
    write_run_report(run, figures=False)
    assert "got to step" not in (run / "report" / "report.md").read_text()


def test_planned_steps_given_as_a_flag_are_not_a_number(tmp_path):
    run = write_run(tmp_path / "run", law_records(4), config={"method": "grpo", "optim": {"steps": True}})
    summary = {r["quantity"]: r["value"] for r in write_run_report(run, figures=False)["summary"]["values"]}
    assert summary["steps planned (optim.steps)"] is None


def test_a_one_step_run_gives_no_start_to_end_sentence(tmp_path):
    run = write_run(tmp_path / "run", [{"step": 1, "entropy/mean": 1.0, "reward/accuracy": 0.2}])
    report = write_run_report(run, figures=False)
    summary = {r["quantity"]: r["value"] for r in report["summary"]["values"]}
    assert summary["entropy start (nats)"] == summary["entropy end (nats)"] == 1.0
    markdown = (run / "report" / "report.md").read_text()
    assert "went from" not in markdown and "Start and end are the means" not in markdown


def test_a_laboratory_final_evaluation_of_a_sparse_run_is_at_its_last_logged_step(tmp_path):
    """Steps 2, 4, ..., 24: the final evaluation stands after step 24, not after the 12th record."""
    final = {"summary": {"n_problems": 2, "n_samples": 1, "avg_at_n": 0.5, "pass_at_k": {"1": 0.5}},
             "forks": [{"token": "7", "entropy": 1.25, "before": "", "after": ""}]}
    sparse = [{**record, "step": 2 * record["step"]} for record in law_records(12)]
    run = write_run(tmp_path / "run", sparse)
    (run / "final_eval.json").write_text(json.dumps(final))
    report = write_run_report(run, figures=False)
    assert [r["step"] for r in report["evaluations"]["values"]] == [24]
    assert report["forks"]["latest"]["title"] == "Step 24"


def test_the_fork_tokens_of_forks_are_kept_over_those_of_a_laboratory_final_evaluation(tmp_path):
    final = {"summary": {"n_problems": 2, "n_samples": 1, "avg_at_n": 0.5, "pass_at_k": {"1": 0.5}},
             "forks": [{"token": "7", "entropy": 1.25, "before": "", "after": ""}]}
    forks = {5: [{"token": "x", "entropy": 2.0, "before": "", "after": ""}]}
    run = write_run(tmp_path / "run", law_records(12), forks=forks)
    (run / "final_eval.json").write_text(json.dumps(final))
    report = write_run_report(run, figures=False)
    assert [r["step"] for r in report["evaluations"]["values"]] == [12]  # the evaluation is still the laboratory's
    assert report["forks"]["latest"]["title"] == "Step 5"
    assert [r["token"] for r in report["forks"]["latest"]["values"]] == ["'x'"]


def test_a_checkpoint_without_a_trainer_state_is_passed_over(tmp_path):
    """checkpoint-3 holds no trainer_state.json (a save cut short): the newest checkpoint that has one is read."""
    (tmp_path / "checkpoint-2").mkdir()
    history = [{"step": s, "reward": 0.1 * s, "entropy": 1.0 - 0.1 * s} for s in (1, 2)]
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    (tmp_path / "checkpoint-3").mkdir()
    report = write_run_report(tmp_path, figures=False)
    summary = {r["quantity"]: r["value"] for r in report["summary"]["values"]}
    assert summary["read from"] == "checkpoint-2/trainer_state.json" and report["steps"] == 2


def test_recurring_fork_tokens_are_listed_most_frequent_first(tmp_path):
    def fork(token):
        return {"token": token, "entropy": 1.0, "before": "", "after": ""}

    forks = {5: [fork("a"), fork("b")], 10: [fork("b"), fork("c")], 15: [fork("c"), fork("b")]}
    report = write_run_report(write_run(tmp_path / "run", law_records(15), forks=forks), figures=False)
    recurring = [(r["token"], r["times among the top positions"]) for r in report["forks"]["recurring"]["values"]]
    assert recurring == [("'b'", 3), ("'c'", 2), ("'a'", 1)]


def test_the_laboratory_command_gives_the_rl_seed_only_where_it_is_not_the_preset_s_seed(tmp_path):
    (tmp_path / "lab.json").write_text(json.dumps({"preset": {"name": "quick", "seed": 3, "rl_seed": 3},
                                                   "methods": ["grpo"]}))
    with pytest.raises(FileNotFoundError) as refused:
        write_run_report(tmp_path)
    assert f"(`entrorl lab --preset quick --methods grpo --out {tmp_path}` writes it again)" in str(refused.value)


def test_numpy_flags_are_flags_not_numbers_in_the_report():
    from entrorl.analysis.document import finite, fmt

    assert finite(np.bool_(True)) is None and finite(True) is None and finite(np.float32(0.5)) == 0.5
    assert fmt(np.bool_(True)) == "yes" and fmt(np.bool_(False)) == "no"


def test_metric_lines_without_a_step_number_are_training_steps_numbered_from_1(tmp_path):
    """A hand-written log without step numbers: each line is a training step, as MetricRecords numbers them."""
    records = [{key: value for key, value in record.items() if key != "step"} for record in law_records(10)]
    report = write_run_report(write_run(tmp_path / "run", records), figures=False)
    assert report["steps"] == 10 and report["law"]["fit"]["n_points"] == 10


def test_a_chance_level_needs_two_steps_with_a_sign(tmp_path):
    """Over one step the chance agreement can only be 0 or 1 and says nothing: the summary gives the agreement alone
    and the table no chance level; from two steps on, both."""
    record = {"step": 1, "entropy/mean": 1.0, "reward/accuracy": 0.5, "entropy/predicted_delta": 1e-7,
              "entropy/measured_delta": -0.2}
    report = write_run_report(write_run(tmp_path / "one", [record]), figures=False)
    summary = {r["quantity"]: r["value"] for r in report["summary"]["rows"]}
    assert summary["predicted vs measured entropy change: sign agreement"] == "0 of 1 step"
    (values,) = report["entropy_change"]["values"]
    assert values["sign agreement"] == 0.0 and values["by chance"] is None
    two = [record, {**record, "step": 2, "entropy/measured_delta": 0.3}]
    summary = {r["quantity"]: r["value"] for r in write_run_report(write_run(tmp_path / "two", two), figures=False)
               ["summary"]["rows"]}
    assert summary["predicted vs measured entropy change: sign agreement"] == "0.5 of 2 steps (0.5 by chance)"


def test_every_key_of_report_json_is_in_the_reports_guide(tmp_path):
    """docs/reports.md names each key `entrorl report` writes, and each of the law's: a key added or renamed without
    the guide following fails here."""
    guide = (Path(__file__).resolve().parents[1] / "docs" / "reports.md").read_text(encoding="utf-8")
    section = guide[guide.index("## `entrorl report RUN_DIR`"):guide.index("## `entrorl lab`")]
    documented = set(re.findall(r"`([a-z_0-9]+)`", section))
    run = write_run(tmp_path / "run", law_records(40), evaluations={40: {"avg_at_n": 0.5, "pass_at_k": {"1": 0.5}}},
                    forks={40: [{"token": "x", "entropy": 1.2, "source": "f:1"}]})
    report = write_run_report(run, figures=False)
    law = report["law"]["fit"]
    written = {*report, *report["law"], *report["forks"], *law, *law["fit"], *law["forecast"]}
    assert written - documented == set()


def _trl_trainer_state(steps: int, max_steps: int) -> dict:
    history = [{"step": step, "loss": 0.0, "reward": 0.1 + 0.02 * step, "entropy": 2.0 - 0.05 * step}
               for step in range(1, steps + 1)]
    return {"global_step": steps, "max_steps": max_steps, "log_history": history}


def test_a_trl_run_continued_after_save_state_is_read_from_its_newer_checkpoint(tmp_path):
    """Trained to step 6 and saved with save_state (the output directory's trainer_state.json), then continued in the
    same folder to max_steps 30: its checkpoint-12 went further than the folder's own file, and is what is read."""
    (tmp_path / "checkpoint-6").mkdir()
    (tmp_path / "checkpoint-12").mkdir()
    (tmp_path / "trainer_state.json").write_text(json.dumps(_trl_trainer_state(6, 6)))
    (tmp_path / "checkpoint-6" / "trainer_state.json").write_text(json.dumps(_trl_trainer_state(6, 6)))
    (tmp_path / "checkpoint-12" / "trainer_state.json").write_text(json.dumps(_trl_trainer_state(12, 30)))
    report = write_run_report(tmp_path, out=tmp_path / "report", figures=False)
    summary = {row["quantity"]: row["value"] for row in report["summary"]["values"]}
    assert summary["read from"] == "checkpoint-12/trainer_state.json" and report["steps"] == 12
    assert summary["steps planned (max_steps)"] == 30
    (tmp_path / "trainer_state.json").write_text(json.dumps(_trl_trainer_state(12, 30)))  # saved again at the end
    report = write_run_report(tmp_path, out=tmp_path / "report", figures=False)
    assert {row["quantity"]: row["value"] for row in report["summary"]["values"]}["read from"] == "trainer_state.json"


@pytest.mark.parametrize(("written", "said"), [
    ('{"method": "grpo", "optim": {"steps": 3', "its config.json cannot be read as JSON"),
    (json.dumps({"model_type": "qwen2", "hidden_size": 32}), "its config.json is a model's configuration"),
    (json.dumps({"note": "hand-written"}), "its config.json names no training method"),
    ("null", "its config.json holds null"),
    ("[1, 2]", "its config.json holds a JSON list, not an object"),
    (None, "its config.json is a folder"),
])
def test_a_folder_whose_config_json_is_not_a_run_s_is_refused_saying_why(tmp_path, written, said):
    """A config.json cut short, a model's, or another file of that name: the error says what is wrong with it, rather
    than that the folder holds no config.json."""
    from entrorl.analysis.run_report import NotARunDirectory

    if written is None:
        (tmp_path / "config.json").mkdir()
    else:
        (tmp_path / "config.json").write_text(written)
    with pytest.raises(NotARunDirectory, match=re.escape(f"holds no metrics.jsonl or trainer_state.json, and {said}")):
        write_run_report(tmp_path, out=tmp_path / "report", figures=False)


def test_skipped_updates_are_said_and_a_run_that_never_updated_is_called_so(tmp_path):
    """Every update of every step skipped (non-finite): the report says the policy never changed; a run with some
    steps skipped counts them; a run without skips says neither."""
    records = law_records(6)
    never = write_run(tmp_path / "never", [{**r, "train/updates": 0.0, "train/skipped_updates": 2.0} for r in records])
    write_run_report(never, figures=False)
    markdown = (never / "report" / "report.md").read_text()
    assert "6 of 6 steps skipped updates whose loss or gradient was not finite (12 updates in all)" in markdown
    assert "No update was applied at any step" in markdown
    some = write_run(tmp_path / "some", [{**r, "train/updates": 2.0 - (i == 3), "train/skipped_updates": float(i == 3)}
                                         for i, r in enumerate(records)])
    write_run_report(some, figures=False)
    markdown = (some / "report" / "report.md").read_text()
    assert "1 of 6 steps skipped updates" in markdown and "No update was applied" not in markdown
    clean = write_run(tmp_path / "clean", [{**r, "train/updates": 2.0, "train/skipped_updates": 0.0} for r in records])
    write_run_report(clean, figures=False)
    assert "skipped updates" not in (clean / "report" / "report.md").read_text()


def test_a_trl_run_s_entropy_is_the_global_one_not_the_main_process_s(tmp_path):
    """Under data parallelism the plugin's entropy/mean is the main process's micro-batch's, its entropy the token mean
    over every process: the report's entropy (start, end, the law's fit) is the global one."""
    history = [{"step": step, "reward": 0.1 * step, "entropy": 2.0 - 0.1 * step, "entropy/mean": 5.0 - 0.1 * step}
               for step in range(1, 11)]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 10, "max_steps": 10, "log_history": history}))
    report = write_run_report(tmp_path, out=tmp_path / "report", figures=False)
    summary = {row["quantity"]: row["value"] for row in report["summary"]["values"]}
    start = next(value for quantity, value in summary.items() if quantity.startswith("entropy start"))
    assert start == pytest.approx(1.9)


def _falling_steps(n: int) -> list[dict]:
    return [{"step": i + 1, "entropy/mean": 1.0 - 0.05 * i, "reward/accuracy": 0.1 + 0.03 * i} for i in range(n)]


def _write_small_run(directory: Path, records: list[dict], config: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (directory / "config.json").write_text(json.dumps(config or {"method": "grpo", "optim": {"steps": len(records)}}))
    return directory


def test_a_finished_trl_run_whose_logging_steps_do_not_divide_max_steps_is_not_called_stopped(tmp_path):
    """TRL logs every `logging_steps` (GRPOConfig's default is 10), so a finished run of 12 steps logs at 5 and 10 only;
    its trainer_state.json says global_step 12 of max_steps 12 and holds the closing `train_runtime` entry at step 12.
    The report must not say the run 'is still training or was stopped' and tell the user to resume it."""
    out = tmp_path / "trl-out"
    out.mkdir()
    history = [{"step": s, "epoch": s / 12, "loss": 0.0, "reward": 0.1 * s / 5, "entropy": 2.0 - 0.1 * s}
               for s in (5, 10)]
    history.append({"step": 12, "epoch": 1.0, "train_runtime": 3.0, "train_loss": 0.0})
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 12, "max_steps": 12, "log_history": history}))
    (out / "entrorl_objective.json").write_text(json.dumps({"method": "grpo"}))
    write_run_report(out, figures=False)
    markdown = (out / "report" / "report.md").read_text()
    assert "still training or was stopped" not in markdown, [l for l in markdown.splitlines() if "still training" in l]


def test_an_evaluation_file_that_cannot_be_read_is_said_not_silently_dropped(tmp_path):
    """The run's files are 'read leniently: what cannot be read is left out and said' (run_report._TrainingRun). A
    final evaluation whose file was cut short (eval/step_000004.json) vanishes from the report without a word: the
    summary then quotes the evaluation at step 2 as the last one."""
    run = _write_small_run(tmp_path / "run", _falling_steps(4))
    (run / "eval").mkdir()
    good = {"avg_at_n": 0.25, "n_problems": 4, "n_samples": 4, "pass_at_k": {"1": 0.25, "4": 0.5}}
    (run / "eval" / "step_000002.json").write_text(json.dumps(good))
    (run / "eval" / "step_000004.json").write_text(json.dumps(good)[:20])  # a write cut short
    write_run_report(run, figures=False)
    markdown = (run / "report" / "report.md").read_text()
    assert "step_000004.json" in markdown


def test_a_config_json_that_cannot_be_read_is_said_not_silently_dropped(tmp_path):
    """With metrics.jsonl present and config.json cut short, the report shows method 'n/a' and no planned steps and
    checks no intervention, without saying that config.json could not be read."""
    run = _write_small_run(tmp_path / "run", _falling_steps(4))
    (run / "config.json").write_text('{"method": "clip_b", "optim": {"ste')
    write_run_report(run, figures=False)
    markdown = (run / "report" / "report.md").read_text()
    assert "config.json" in markdown


def test_a_trl_run_logged_every_few_steps_is_not_said_to_have_as_many_training_steps_as_log_entries(tmp_path):
    """With TRL's logging_steps = 5 over 12 optimizer steps the log history has 2 entries (steps 5 and 10). The summary
    says 'the first and the last 1 of the 2 training steps': the run trained 12 steps; 2 is the number of log entries
    (each already a mean over a 5-step window)."""
    out = tmp_path / "trl-out"
    out.mkdir()
    history = [{"step": s, "loss": 0.0, "reward": 0.1 * s / 5, "entropy": 2.0 - 0.1 * s} for s in (5, 10)]
    history.append({"step": 12, "train_runtime": 3.0, "train_loss": 0.0})
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 12, "max_steps": 12, "log_history": history}))
    (out / "entrorl_objective.json").write_text(json.dumps({"method": "grpo"}))
    write_run_report(out, figures=False)
    markdown = (out / "report" / "report.md").read_text()
    assert "of the 2 training steps" not in markdown


def _verl_log(path: Path, steps: int = 30, *, sources=("gsm8k",), extra_lines: str = "") -> Path:
    """What verl's file logger writes: one {"step", "data"} object per line, a validation before training at step 0,
    then training steps whose metrics carry verl's names (and the entrorl plugin's, under actor/)."""
    lines = [{"step": 0, "data": {f"val-core/{source}/acc/mean@4": 0.2 for source in sources}}]
    for step in range(1, steps + 1):
        entropy = 1.2 * math.exp(-step / 10) + 0.1
        data = {"actor/entropy": entropy, "critic/score/mean": 0.8 - 0.5 * math.exp(entropy - 1.3),
                "actor/pg_loss": 0.01, "actor/select/clip_b_frac": 0.02 if step > 1 else 0.0,
                "response_length/mean": 100 + step}
        if step % 10 == 0:
            data.update({f"val-core/{source}/acc/mean@4": 0.2 + 0.01 * step + 0.1 * i
                         for i, source in enumerate(sources)})
            data["val-aux/num_turns/mean"] = 1
        lines.append({"step": step, "data": data})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + extra_lines)
    return path


def test_a_verl_file_logger_log_is_reported_on(tmp_path):
    """verl's `file` logger's JSON lines: actor/entropy is the entropy, critic/score/mean the reward, the plugin's
    actor/select/* its select/*; the validation before training is an evaluation, not a step; the law is the least-squares
    fit of the reward on exp(entropy); the report goes beside the log as NAME.report."""
    log = _verl_log(tmp_path / "entrorl" / "exp1.jsonl", extra_lines='{"step": 31, "da\n')
    report = write_run_report(log, figures=False)
    out = tmp_path / "entrorl" / "exp1.report"
    assert report["out"] == str(out) and (out / "report.html").is_file()
    assert report["steps"] == 30 and report["reward_key"] == "reward/mean"
    assert report["unreadable_lines"] == [32] and report["unreadable_files"] == []
    entropy = np.array([1.2 * math.exp(-step / 10) + 0.1 for step in range(1, 31)])
    reward = 0.8 - 0.5 * np.exp(entropy - 1.3)
    slope, intercept = np.polyfit(np.exp(entropy), reward, 1)
    fit = report["law"]["fit"]["fit"]
    assert fit["a"] == pytest.approx(-slope) and fit["b"] == pytest.approx(intercept) and fit["r2"] == pytest.approx(1.0)
    evaluations = {row["step"]: row["Avg@n"] for row in report["evaluations"]["values"]}
    assert evaluations == pytest.approx({0: 0.2, 10: 0.3, 20: 0.4, 30: 0.5})
    activity = {row["metric"]: row for row in report["interventions"]["values"]}
    assert activity["select/clip_b_frac"]["steps not 0"] == 29
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# entrorl run — exp1") and "steps planned (trainer.total_training_steps)" in markdown
    assert "Lines of `exp1.jsonl` that are not verl's" in markdown and ": 32." in markdown
    assert "A verl run saves no fork tokens." in markdown


def test_a_folder_holding_one_verl_log_is_that_run_and_several_are_named(tmp_path):
    """A folder (verl's <root>/<project>) with one verl log is reported on as that log; with several, the error names
    them; a file that is no verl log is refused, saying what is read."""
    from entrorl.analysis.run_report import NotARunDirectory

    project = tmp_path / "project"
    _verl_log(project / "exp1.jsonl", steps=12, sources=("gsm8k", "math"))
    report = write_run_report(project, figures=False)
    assert report["out"] == str(project / "exp1.report") and report["steps"] == 12
    # two data sources: Avg@n is their mean
    assert {row["step"]: row["Avg@n"] for row in report["evaluations"]["values"]} == pytest.approx({0: 0.2, 10: 0.35})
    _verl_log(project / "exp2.jsonl", steps=3)
    with pytest.raises(NotARunDirectory, match=r"several verl logs \(exp1.jsonl, exp2.jsonl\): name the one"):
        write_run_report(project, figures=False)
    other = tmp_path / "notes.jsonl"
    other.write_text('{"step": 1, "entropy/mean": 1.0}\n')
    with pytest.raises(NotARunDirectory, match="is a file: `entrorl report` reads a run directory, or the JSON lines of "
                                               "verl's file logger"):
        write_run_report(other, figures=False)


def test_the_report_command_takes_a_verl_log_and_a_trl_run_s_log_entries(tmp_path):
    """`entrorl report LOG.jsonl` reports a verl run beside its log; a TRL run's summary line counts log entries."""
    from typer.testing import CliRunner

    from entrorl.cli import app

    log = _verl_log(tmp_path / "exp1.jsonl", steps=12)
    result = CliRunner().invoke(app, ["report", str(log), "--no-figures"])
    assert result.exit_code == 0, result.output
    assert "steps logged: 12" in result.output and str(tmp_path / "exp1.report" / "report.html") in result.output
    trl = tmp_path / "trl-out"
    trl.mkdir()
    history = [{"step": step, "loss": 0.0, "reward": 0.1 * step, "entropy": 2.0 - 0.1 * step} for step in (5, 10, 15)]
    (trl / "trainer_state.json").write_text(json.dumps({"global_step": 15, "max_steps": 15, "log_history": history}))
    result = CliRunner().invoke(app, ["report", str(trl), "--no-figures"])
    assert result.exit_code == 0 and "log entries: 3" in result.output, result.output


def _trl_run_logged_every(out: Path, *, logging_steps: int = 3, max_steps: int = 31) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    history = [{"step": s, "loss": 0.0, "reward": 0.02 * s, "entropy": 2.0 - 0.05 * s}
               for s in range(logging_steps, max_steps + 1, logging_steps)]
    history.append({"step": max_steps, "train_runtime": 3.0, "train_loss": 0.0})
    (out / "trainer_state.json").write_text(json.dumps({"global_step": max_steps, "max_steps": max_steps,
                                                        "logging_steps": logging_steps, "log_history": history}))
    (out / "entrorl_objective.json").write_text(json.dumps({"method": "grpo"}))
    return out


def test_a_trl_run_whose_own_trainer_state_json_is_cut_short_names_it(tmp_path):
    """docs/reports.md: 'A file that cannot be read (cut short, ...) is left out and named in the summary'. A TRL
    output folder whose own (final) trainer_state.json is cut short is reported from checkpoint-15's, said to have
    'got to step 15 of 31: it is still training or was stopped', and the unreadable file is named nowhere."""
    out = _trl_run_logged_every(tmp_path / "trl")
    state = json.loads((out / "trainer_state.json").read_text())
    checkpoint = out / "checkpoint-15"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps(
        {**state, "global_step": 15, "log_history": [h for h in state["log_history"]
                                                     if h["step"] <= 15 and "train_runtime" not in h]}))
    (checkpoint / "entrorl_objective.json").write_text(json.dumps({"method": "grpo"}))
    text = (out / "trainer_state.json").read_text()
    (out / "trainer_state.json").write_text(text[: len(text) // 2])
    write_run_report(out, figures=False)
    said = " ".join((out / "report" / "report.md").read_text().split())
    assert "could not be read" in said and "`trainer_state.json`" in said


def test_a_trl_run_s_law_table_does_not_call_its_log_entries_training_steps(tmp_path):
    """e2245dd: 'its log entries are not called training steps' -- the summary now says 'log entries', but the law
    table of the same report still labels its 10 points (of a 31-step run logged every 3 steps) 'training steps'."""
    out = _trl_run_logged_every(tmp_path / "trl")
    report = write_run_report(out, figures=False)
    labels = [row[next(iter(row))] for row in report["law"]["table"]["rows"]]
    assert not any(str(label).startswith("training steps") for label in labels), labels


def _verl_line(step, data) -> str:
    # what verl's FileLogger writes: orjson.dumps({"step": step, "data": data}) + "\n" (non-ASCII kept raw)
    return json.dumps({"step": step, "data": data}, ensure_ascii=False, separators=(",", ":")) + "\n"


def _verl_train_step(step: int) -> dict:
    entropy = 1.5 / step ** 0.3
    return {"actor/entropy": entropy, "critic/score/mean": 0.9 - 0.3 * math.exp(entropy)}


def _markdown_section(markdown: str, title: str) -> str:
    start = markdown.index(f"## {title}")
    end = markdown.find("\n## ", start + 1)
    return " ".join(markdown[start:end if end >= 0 else None].split())


@pytest.mark.parametrize("method, label", [
    ({"method": "grpo", "regularizers": [{"name": "entropy_bonus", "entropy_coeff": 0.0},
                                         {"name": "entropy_bonus", "entropy_coeff": 0.0}], "params": {}},
     "grpo+entropy_bonus"),
    ({"regularizers": [{"name": "entropy_bonus", "entropy_coeff": 0.0}, {"name": "entropy_bonus"}], "params": {}},
     "entropy_bonus"),
])
def test_an_old_run_whose_method_names_a_part_twice_is_labelled_as_it_trained(tmp_path, method, label):
    """A part named twice is refused now; an earlier version trained it as one part and wrote config.json so. The
    report read that method as refused and labelled the run by its methods alone ('grpo', or nothing), leaving out
    the part's intervention check."""
    records = [{"step": i + 1, "entropy/mean": 0.5, "reward/accuracy": 0.1 * i, "reg/entropy_bonus": 0.0}
               for i in range(5)]
    run = write_run(tmp_path / "run", records, config={"method": method, "optim": {"steps": 5}})
    report = write_run_report(run, figures=False)
    assert report["method"] == label
    said = " ".join((run / "report" / "report.md").read_text().split())
    assert "The method's own intervention was 0 at every logged step (`reg/entropy_bonus`)" in said


def _verl_validation(accuracy: float) -> dict:
    return {"val-core/openai/gsm8k/acc/mean@4": accuracy, "val-aux/openai/gsm8k/reward/mean@4": accuracy}


@pytest.mark.parametrize("validates_before_training", [True, False])
def test_a_verl_restart_drops_the_abandoned_attempt_s_validations(tmp_path, validates_before_training):
    """Two verl logs joined: the first attempt trained to step 57, validating every 5 steps, and crashed; the second
    resumed from the step-50 checkpoint (with or without verl's validation before training, at step 50), validating
    every 10. The first attempt's validation at step 55 judged a policy the restart threw away: it went with that
    attempt's steps 51..57, not only when it came after the log's last step."""
    lines = [_verl_line(0, _verl_validation(0.1))]
    for step in range(1, 58):
        lines.append(_verl_line(step, {**_verl_train_step(step), **(_verl_validation(0.5 if step != 55 else 0.99)
                                                                     if step % 5 == 0 else {})}))
    if validates_before_training:
        lines.append(_verl_line(50, _verl_validation(0.5)))
    for step in range(51, 71):
        lines.append(_verl_line(step, {**_verl_train_step(step), **(_verl_validation(0.6) if step % 10 == 0 else {})}))
    log = tmp_path / "exp.jsonl"
    log.write_text("".join(lines))
    report = write_run_report(log, figures=False)
    assert report["repeated_steps"] == list(range(51, 58))
    steps = [int(row["step"]) for row in report["evaluations"]["rows"]]
    assert steps == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 60, 70]
    # and a validation-only line at the last trained step (a resume from the newest checkpoint) drops nothing
    log.write_text("".join(lines[:58]) + _verl_line(57, _verl_validation(0.7)))
    steps = [int(row["step"]) for row in write_run_report(log, figures=False)["evaluations"]["rows"]]
    assert steps == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 57]


@pytest.mark.parametrize("after_the_first_attempt, kept", [
    # a resume from step 5 validated and died; the next one continued from the step-10 checkpoint
    ([_verl_line(5, _verl_validation(0.25))] + [_verl_line(step, _verl_train_step(step)) for step in (11, 12, 13)],
     [0, 5, 10]),
    # a val_only run of the base model appended, then a resume from step 10
    ([_verl_line(0, _verl_validation(0.11))] + [_verl_line(step, _verl_train_step(step)) for step in (11, 12, 13)],
     [0, 5, 10]),
    # the report is taken while a resume from step 5 has validated but not trained yet: steps 6..10 are still read
    ([_verl_line(5, _verl_validation(0.25))], [0, 5, 10]),
])
def test_a_verl_validation_alone_drops_no_evaluation(tmp_path, after_the_first_attempt, kept):
    """Only a step trained again is a restart: a validation line below the last step dropped the evaluations after
    it while their steps were still read."""
    first = [_verl_line(0, _verl_validation(0.1))] + [
        _verl_line(step, {**_verl_train_step(step), **(_verl_validation(0.5) if step % 5 == 0 else {})})
        for step in range(1, 11)]
    log = tmp_path / "exp.jsonl"
    log.write_text("".join(first + after_the_first_attempt))
    report = write_run_report(log, figures=False)
    assert [int(row["step"]) for row in report["evaluations"]["rows"]] == kept


def test_a_verl_report_names_the_keys_it_read_and_says_how_verl_aggregates_its_entropy(tmp_path):
    """verl's actor/entropy is its loss's aggregation of the token entropies (agg_loss with actor.loss_agg_mode):
    under seq-mean-token-sum(-norm) it moves with the response length. The report read it as `entropy/mean` and called
    it the mean token entropy, naming neither it nor critic/score/mean; a log without a score called the reward
    `reward/accuracy`, a key verl never writes."""
    log = tmp_path / "exp.jsonl"
    log.write_text("".join(_verl_line(step, _verl_train_step(step)) for step in range(1, 21)))
    report = write_run_report(log, figures=False)
    assert report["reward_key"] == "reward/mean"
    assert report["source_keys"] == {"entropy/mean": "actor/entropy", "reward/mean": "critic/score/mean"}
    markdown = (tmp_path / "exp.report" / "report.md").read_text()
    summary = _markdown_section(markdown, "Summary")
    assert "The entropy `entropy/mean` (verl's `actor/entropy`) went from" in summary
    assert "mean token entropy (`entropy/mean`)" not in summary
    assert "by `actor.loss_agg_mode`" in summary and "moves with the response length" in summary
    assert "R = `reward/mean` (verl's `critic/score/mean`)" in _markdown_section(markdown, "Entropy–reward law")
    rows = {row["quantity"]: row["value"] for row in report["summary"]["rows"]}
    assert rows["reward"] == "reward/mean (verl's critic/score/mean)"
    assert rows["entropy"] == "entropy/mean (verl's actor/entropy)"

    log.write_text("".join(_verl_line(step, {"actor/entropy": 1.0 / step}) for step in range(1, 6)))
    assert write_run_report(log, figures=False)["reward_key"] == "reward/mean"


def test_verl_val_only_log_does_not_say_metrics_jsonl_holds_no_step(tmp_path):
    """A verl `val_only` run (or one still in its validation before training) logs one val-core line at step 0. The
    summary says "`metrics.jsonl` holds none": the run has no metrics.jsonl; the file read is the verl log."""
    log = tmp_path / "proj" / "exp.jsonl"
    log.parent.mkdir()
    log.write_text(_verl_line(0, {"val-core/gsm8k/acc/mean@1": 0.4, "val-aux/gsm8k/reward/mean@1": 0.1}))
    report = write_run_report(log, figures=False)
    assert report["steps"] == 0
    markdown = (tmp_path / "proj" / "exp.report" / "report.md").read_text()
    assert "metrics.jsonl" not in markdown


def test_verl_log_just_created_is_not_called_not_a_verl_log(tmp_path):
    """verl's FileLogger creates <project>/<experiment>.jsonl (empty) when Tracking starts, before the validation
    before training (minutes). `entrorl report` on it says the file is not verl's file logger's JSON lines ("which it
    is not"), where a run still training should be reported on (no step yet) or the log said to be empty."""
    from entrorl.analysis.run_report import NotARunDirectory, write_run_report

    log = tmp_path / "proj" / "exp.jsonl"
    log.parent.mkdir()
    log.write_bytes(b"")
    try:
        report = write_run_report(log, figures=False)
    except NotARunDirectory as error:
        assert "empty" in str(error), str(error)
    else:
        assert report["steps"] == 0


def test_verl_log_line_holding_a_unicode_line_separator_is_read_whole(tmp_path):
    """orjson (verl's FileLogger) writes U+2028 raw inside a JSON string (here a data source's name in a val-core key).
    is_verl_log reads the file by '\\n' lines and accepts it, but _verl_records splits with str.splitlines(), which
    also splits at U+2028: the step-0 validation is lost and lines 1 and 2 are reported unreadable though line 2 is
    fine (the numbers no longer match the file's lines)."""
    log = tmp_path / "exp.jsonl"
    log.write_text(_verl_line(0, {"val-core/math\u2028v2/acc/mean@1": 0.5, "val-core/gsm8k/acc/mean@1": 0.3})
                   + "".join(_verl_line(step, _verl_train_step(step)) for step in range(1, 6)), encoding="utf-8")
    assert log.read_text(encoding="utf-8").count("\n") == 6
    report = write_run_report(log, figures=False)
    assert report["unreadable_lines"] == []
    assert {row["step"]: row["Avg@n"] for row in report["evaluations"]["values"]} == pytest.approx({0: 0.4})


def test_verl_log_of_a_resumed_run_says_where_it_starts(tmp_path):
    """verl resumes by default (trainer.resume_mode=auto) and its FileLogger opens the log with "wb": a resumed run's
    log holds the validation at the resumed step 50 and steps 51.. only. The report calls step 51-52 the entropy
    "start" and rules on collapse from them without saying the log begins at step 51 (steps 1-50 are not in it)."""
    log = tmp_path / "exp.jsonl"
    log.write_text(_verl_line(50, {"val-core/gsm8k/acc/mean@1": 0.4})
                   + "".join(_verl_line(step, _verl_train_step(step)) for step in range(51, 71)))
    write_run_report(log, figures=False)
    summary = _markdown_section((tmp_path / "exp.report" / "report.md").read_text(), "Summary")
    assert "51" in summary, summary


def test_report_command_on_a_folder_holding_a_verl_log_hints_out_when_its_report_cannot_be_written(tmp_path):
    """The CLI names --out when the default report folder cannot be written; for a folder holding one verl log the
    default is <folder>/<experiment>.report, but the handler compares with <folder>/report, so the hint is lost
    (it is given when the log file itself is named)."""
    from typer.testing import CliRunner

    from entrorl.cli import app

    project = tmp_path / "proj"
    project.mkdir()
    (project / "exp.jsonl").write_text("".join(_verl_line(step, _verl_train_step(step)) for step in range(1, 13)))
    (project / "exp.report").write_text("a file where the report folder goes")
    named = CliRunner().invoke(app, ["report", str(project / "exp.jsonl"), "--no-figures"])
    assert named.exit_code == 1 and "--out writes the report elsewhere" in named.output, named.output
    folder = CliRunner().invoke(app, ["report", str(project), "--no-figures"])
    assert folder.exit_code == 1
    assert "--out writes the report elsewhere" in folder.output, folder.output


def test_trl_law_tables_do_not_count_log_entries_as_steps(tmp_path):
    """9c3b745 calls a TRL run's law points log entries ('fitted on: log entries', notes 'fitted on 3 log entries'),
    but the same row's column 'fit steps' shows 3 (3 log entries = 9 steps) and the baseline table's 'later steps'
    shows 7 (7 log entries = 21 steps)."""
    out = tmp_path / "trl"
    out.mkdir()
    history = [{"step": s, "loss": 0.0, "reward": 0.02 * s, "entropy": 2.0 - 0.05 * s} for s in range(3, 32, 3)]
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 31, "max_steps": 31, "logging_steps": 3,
                                                        "log_history": history}))
    (out / "entrorl_objective.json").write_text(json.dumps({"method": "grpo"}))
    report = write_run_report(out, figures=False)
    (row,) = report["law"]["table"]["rows"]
    assert row["fitted on"].startswith("log entries") and "3 log entries" in row["note"]
    columns = report["law"]["table"]["columns"] + report["forecast_baselines"]["columns"]
    assert not [column for column in columns if column in ("fit steps", "later steps")], columns


def test_report_on_a_verl_project_folder_whose_log_is_still_empty_says_it_is_empty(tmp_path):
    """verl's FileLogger creates <project>/<experiment>.jsonl empty at start. 3579fc5 says so when the file is named
    ('... is empty: nothing has been logged yet'), but `entrorl report <project>` on the same folder says it holds
    no run and that 'verl's file logger writes JSON lines that can be named instead' -- the folder holds exactly
    that file (_verl_logs_in / is_verl_log drops an empty file)."""
    from entrorl.analysis.run_report import NotARunDirectory, write_run_report

    project = tmp_path / "proj"
    project.mkdir()
    (project / "exp.jsonl").write_bytes(b"")
    with pytest.raises(NotARunDirectory) as named:
        write_run_report(project / "exp.jsonl", figures=False)
    assert "empty" in str(named.value)
    with pytest.raises(NotARunDirectory) as folder:
        write_run_report(project, figures=False)
    assert "empty" in str(folder.value), str(folder.value)


def test_a_key_logged_at_some_entries_only_has_its_own_start_and_end(tmp_path):
    """TRL with num_iterations = 2 logs `reward` only in the entries that generated (every other one): with 10
    entries the edges are one entry each, and the last entry lacks the reward. Its start and end are the means over
    the first and last entries that logged it (0.0 and 0.8), not n/a, and the summary says so."""
    out = tmp_path / "trl"
    out.mkdir()
    history = [{"step": s, "loss": 0.0, "entropy": 2.0 - 0.1 * s, **({"reward": 0.1 * (s - 1)} if s % 2 else {})}
               for s in range(1, 11)]
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 10, "max_steps": 10, "log_history": history}))
    (out / "entrorl_objective.json").write_text(json.dumps({"method": "grpo"}))
    report = write_run_report(out, figures=False)
    said = " ".join((out / "report" / "report.md").read_text().split())
    assert "the reward went from 0 to 0.8" in said, said
    assert "(the reward, logged at 5 of the entries, over the first and the last 1 of those)" in said, said
    assert "the entropy, logged" not in said
    assert report["steps"] == 10
    records = MetricRecords()
    records.records = history
    assert list(records.logged_series("reward")) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    assert records.logged_series("absent").size == 0


def test_steps_logged_twice_are_read_once_from_their_last_record_and_said(tmp_path):
    """A log holding steps 41-60 twice (a run that went on past its checkpoint, then was continued from it; or two
    logs joined) is a run of 100 steps: the later record of each step is read, and the report names the steps."""
    records = law_records(100)
    continued = [{**record, "reward/accuracy": record["reward/accuracy"] + 0.05} for record in records[40:]]
    run = write_run(tmp_path / "run", records[:60] + continued, config={"method": "grpo", "optim": {"steps": 100}})
    report = write_run_report(run, figures=False)
    assert report["steps"] == 100 and report["repeated_steps"] == list(range(41, 61))
    markdown = " ".join((run / "report" / "report.md").read_text().split())
    assert "logged 20 steps more than once (41, 42, 43, 44, 45, 46, 47, 48, 49, 50, ...)" in markdown
    records_read, _, repeated = read_metrics_records(run / "metrics.jsonl")
    assert [r["step"] for r in records_read] == list(range(1, 101)) and repeated == list(range(41, 61))
    assert all(r["reward/accuracy"] == c["reward/accuracy"] for r, c in zip(records_read[40:60], continued[:20]))


def test_a_verl_log_with_steps_logged_twice_is_read_once_per_step(tmp_path):
    log = tmp_path / "proj" / "exp.jsonl"
    log.parent.mkdir()
    lines = [_verl_line(step, _verl_train_step(step)) for step in range(1, 31)]
    lines += [_verl_line(step, {**_verl_train_step(step), "critic/score/mean": 0.5}) for step in range(21, 41)]
    log.write_text("".join(lines))
    report = write_run_report(log, figures=False)
    assert report["steps"] == 40 and report["repeated_steps"] == list(range(21, 31))


def test_a_verl_validation_of_a_reward_s_mean_score_is_not_read_as_an_accuracy(tmp_path):
    """Without an `acc`, verl's validation logs `val-core/<source>/reward/mean@n`, the reward's mean score on its own
    scale (0-5 here): a ceiling above 1 fitted to it is a value, not 'no ceiling in sight'. The law's row names it."""
    lines = [_verl_line(0, {"val-core/my_task/reward/mean@4": 5.0 - 2.0 * math.exp(1.1)})]
    for step in range(1, 201):
        entropy = math.exp(-2 * step / 200) + 0.1
        data = {"actor/entropy": entropy, "critic/score/mean": 5.0 - 2.0 * math.exp(entropy) + 0.01 * math.sin(step)}
        if step % 10 == 0:
            following = math.exp(-2 * (step + 1) / 200) + 0.1
            data["val-core/my_task/reward/mean@4"] = 5.0 - 2.0 * math.exp(following) + 0.01 * math.cos(step)
        lines.append(_verl_line(step, data))
    log = tmp_path / "proj" / "exp.jsonl"
    log.parent.mkdir()
    log.write_text("".join(lines))
    report = write_run_report(log, figures=False)
    row = next(row for row in report["law"]["table"]["rows"] if row["fitted on"].startswith("evaluations"))
    assert row["fitted on"] == "evaluations (val-core/<source>/reward/mean@n)" and "accuracy" not in row["note"]
    assert report["law"]["evaluations"]["reward_key"] == "val-core/<source>/reward/mean@n"
    accuracy_log = _verl_log(tmp_path / "acc" / "exp.jsonl")  # `acc`: an accuracy, as before
    assert write_run_report(accuracy_log, figures=False)["law"]["evaluations"]["reward_key"] == "eval/avg_at_n"


def test_a_folder_whose_verl_log_is_named_metrics_jsonl_is_reported_as_verl_s(tmp_path):
    """VERL_FILE_LOGGER_PATH=<dir>/metrics.jsonl: the folder holds a verl log under entrorl's file name; it is read as
    verl's (before, as an entrorl run's metrics, where every quantity was n/a)."""
    folder = tmp_path / "exp"
    _verl_log(folder / "metrics.jsonl")
    report = write_run_report(folder, figures=False)
    assert report["steps"] == 30 and report["out"] == str(folder / "metrics.report")
    assert (folder / "metrics.report" / "report.md").read_text().startswith("# entrorl run — exp")  # the folder's name
    assert report["law"]["fit"]["fit"] is not None


def test_verl_s_own_clipping_metrics_show_among_the_interventions(tmp_path):
    """verl's own loss logs `actor/pg_clipfrac`, `actor/pg_clipfrac_lower` and `actor/ppo_kl` (docs/migrating.md):
    the interventions table shows them, instead of saying that no clipping metric was logged."""
    log = tmp_path / "proj" / "exp.jsonl"
    log.parent.mkdir()
    log.write_text("".join(_verl_line(step, {**_verl_train_step(step), "actor/pg_clipfrac": 0.02,
                                             "actor/pg_clipfrac_lower": 0.001, "actor/ppo_kl": 0.0005,
                                             "actor/pg_loss": 0.1}) for step in range(1, 31)))
    report = write_run_report(log, figures=False)
    assert [row["metric"] for row in report["interventions"]["values"]] == ["pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"]
    section = _markdown_section((tmp_path / "proj" / "exp.report" / "report.md").read_text(), "Interventions and clipping")
    assert "logged no selector" not in section and "`pg_clipfrac` (PPO's clipped share)" in section


def test_report_json_has_the_forecast_baselines_key_without_a_forecast(tmp_path):
    """report.json's keys are those docs/reports.md lists, on a run too short for a forecast too (an empty table)."""
    run = write_run(tmp_path / "run", [{"step": 1, "entropy/mean": 1.0, "reward/accuracy": 0.2}],
                    config={"method": "grpo", "optim": {"steps": 100}})
    report = write_run_report(run, figures=False)
    assert report["forecast_baselines"]["values"] == [] and len(report["forecast_baselines"]["columns"]) == 4


def test_a_metrics_file_starting_with_a_byte_order_mark_loses_no_line(tmp_path):
    """An editor's UTF-8 byte-order mark before the first line is not part of it: the first step is read, and a verl
    log so written is still recognised."""
    run = write_run(tmp_path / "run", law_records(20))
    path = run / "metrics.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    records, unreadable, _ = read_metrics_records(path)
    assert len(records) == 20 and unreadable == []
    log = _verl_log(tmp_path / "proj" / "exp.jsonl")
    log.write_bytes(b"\xef\xbb\xbf" + log.read_bytes())
    assert write_run_report(log, figures=False)["steps"] == 30


@pytest.mark.parametrize("name", ["metrics.jsonl", "trainer_state.json", "config.json"])
def test_a_run_s_own_file_given_instead_of_its_folder_is_answered_with_the_folder(tmp_path, name):
    from entrorl.analysis.run_report import NotARunDirectory

    run = write_run(tmp_path / "my run", law_records(20))
    (run / "trainer_state.json").write_text(json.dumps({"log_history": []}))
    with pytest.raises(NotARunDirectory, match=re.escape(f"is a file of the run in {run}: `entrorl report` reads the "
                                                         f"run's folder (`entrorl report '{run}'`)")):
        write_run_report(run / name, figures=False)


def test_the_raw_line_of_a_key_logged_at_some_steps_only_is_drawn_through_them(tmp_path, monkeypatch):
    """TRL with num_iterations 2 logs `reward` at every other entry: the thin raw line joins the entries that have it
    (matplotlib breaks a line at each NaN, so nothing of it was drawn)."""
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.plot

    def plot(self, *args, **kwargs):
        if kwargs.get("linewidth") == 0.6:
            drawn.append(np.asarray(args[1], dtype=float))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    records = law_records(20)
    for record in records[1::2]:
        del record["reward/accuracy"]
    write_run_report(write_run(tmp_path / "run", records), figures=True)
    assert drawn[1].size == 10 and np.isfinite(drawn[1]).all()  # the reward's, after the entropy's


def test_the_trainer_states_of_a_trl_run_are_read_newest_first_and_no_further_than_needed(tmp_path, monkeypatch):
    """A run that keeps every checkpoint: its own file at the last step is the only one read; without it, the newest
    checkpoint; when that one is cut short, the next newest as well, and the cut one is named."""
    from entrorl.analysis import run_report

    for step in range(2, 42, 2):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(_trl_trainer_state(step, 40)))
    (tmp_path / "trainer_state.json").write_text(json.dumps(_trl_trainer_state(40, 40)))
    read = []
    original = run_report.read_json
    monkeypatch.setattr(run_report, "read_json", lambda path: read.append(path) or original(path))
    assert run_report.trainer_states(tmp_path) == (tmp_path / "trainer_state.json", []) and len(read) == 1
    (tmp_path / "trainer_state.json").unlink()
    read.clear()
    assert run_report.trainer_states(tmp_path) == (tmp_path / "checkpoint-40" / "trainer_state.json", [])
    assert read == [tmp_path / "checkpoint-40" / "trainer_state.json"]
    (tmp_path / "checkpoint-40" / "trainer_state.json").write_text('{"global_step": 4')
    read.clear()
    cut = tmp_path / "checkpoint-40" / "trainer_state.json"
    assert run_report.trainer_states(tmp_path) == (tmp_path / "checkpoint-38" / "trainer_state.json", [cut])
    assert len(read) == 2


def test_a_byte_order_mark_before_a_run_s_files_is_read_past_by_every_reader(tmp_path):
    """The trainer's reader (read_metrics, and a resumed run cutting its log back) and the report's config.json reader
    read past an editor's byte-order mark as the report's log reader does."""
    from entrorl.trainer import read_metrics

    run = write_run(tmp_path / "run", law_records(20), config={"method": "clip_b", "optim": {"steps": 20}})
    for name in ("metrics.jsonl", "config.json"):
        (run / name).write_bytes(b"\xef\xbb\xbf" + (run / name).read_bytes())
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 21))
    report = write_run_report(run, figures=False)
    assert report["unreadable_files"] == [] and report["method"] == "clip_b"


def test_an_empty_metrics_jsonl_or_a_model_s_config_given_instead_of_a_folder(tmp_path):
    """A run's metrics.jsonl that holds nothing yet is answered with the run's folder (not with verl's file logger); a
    model's config.json is not called a run's file."""
    from entrorl.analysis.run_report import NotARunDirectory

    run = write_run(tmp_path / "run", [])
    with pytest.raises(NotARunDirectory, match=re.escape(f"is a file of the run in {run}")) as raised:
        write_run_report(run / "metrics.jsonl", figures=False)
    assert "verl" not in str(raised.value)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(NotARunDirectory, match="is a file: `entrorl report` reads a run directory"):
        write_run_report(model / "config.json", figures=False)


def test_a_step_logged_in_parts_keeps_every_part(tmp_path):
    """A loop of one's own logging a step's training metrics, then its evaluation, as two records of one step: both
    parts are read (each key's last value), not only the second record."""
    records = law_records(20)
    parts = []
    for record in records:
        parts.append(record)
        if record["step"] % 5 == 0:
            parts.append({"step": record["step"], "eval/avg_at_n": 0.1 * record["step"] / 5})
    run = write_run(tmp_path / "run", parts)
    records_read, _, repeated = read_metrics_records(run / "metrics.jsonl")
    assert repeated == [5, 10, 15, 20] and len(records_read) == 20
    assert all("entropy/mean" in r and "reward/accuracy" in r for r in records_read)
    assert [r.get("eval/avg_at_n") for r in records_read if r["step"] % 5 == 0] == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_the_law_section_s_prose_names_the_score_a_verl_validation_logged(tmp_path):
    lines = [_verl_line(step, {**_verl_train_step(step), **({"val-core/task/reward/mean@4": 2.0 + 0.01 * step}
                                                             if step % 10 == 0 else {})}) for step in range(1, 101)]
    log = tmp_path / "proj" / "exp.jsonl"
    log.parent.mkdir()
    log.write_text("".join(lines))
    write_run_report(log, figures=False)
    section = _markdown_section((tmp_path / "proj" / "exp.report" / "report.md").read_text(),
                                "Entropy–reward law and ceiling forecast").split("### Fit and forecast")[0]
    assert "`eval/avg_at_n`" not in section and "(`val-core/<source>/reward/mean@n`: verl's validation logged the " \
        "reward's mean score, on its own scale, not an accuracy)" in section


def test_a_checkpoint_folder_named_with_a_non_ascii_digit_is_passed_over(tmp_path):
    """'checkpoint-²' passes str.isdigit() but not int(): such a folder is not a TRL checkpoint (a bare ValueError
    ended the report before)."""
    from entrorl.analysis.run_report import trainer_states

    for name, steps in (("checkpoint-\u00b2", 2), ("checkpoint-3", 3)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text(json.dumps(_trl_trainer_state(steps, 40)))
    assert trainer_states(tmp_path) == (tmp_path / "checkpoint-3" / "trainer_state.json", [])
    assert write_run_report(tmp_path, figures=False)["steps"] == 3


def test_a_continued_attempt_s_record_replaces_the_abandoned_one_s(tmp_path):
    """Two logs joined: an attempt that went on to step 6, then one continued from step 4 with the entropy-change
    measurement off. Steps 5 and 6 are the continued attempt's records alone: the abandoned attempt's
    entropy/predicted_delta does not survive into them (a record repeating a step's metrics is a new attempt)."""
    first = [{"step": s, "entropy/mean": 1.0 - 0.05 * s, "reward/accuracy": 0.1 * s,
              "entropy/predicted_delta": -0.01, "entropy/measured_delta": -0.02} for s in range(1, 7)]
    continued = [{"step": s, "entropy/mean": 0.9 - 0.05 * s, "reward/accuracy": 0.11 * s} for s in range(5, 9)]
    run = write_run(tmp_path / "run", first + continued)
    records, _, repeated = read_metrics_records(run / "metrics.jsonl")
    by_step = {record["step"]: record for record in records}
    assert repeated == [5, 6] and by_step[5] == continued[0] and by_step[6] == continued[1]


def test_a_log_holding_only_a_byte_order_mark_is_called_empty(tmp_path):
    from entrorl.analysis.run_report import NotARunDirectory

    log = tmp_path / "exp.jsonl"
    log.write_bytes(b"\xef\xbb\xbf\n")
    with pytest.raises(NotARunDirectory, match="is empty: nothing has been logged yet"):
        write_run_report(log, figures=False)


def test_a_log_is_split_into_lines_as_the_trainers_reader_splits_it(tmp_path):
    """"\n", "\r\n" and a lone "\r" end a line for entrorl report as for read_metrics; a U+2028 inside a string
    does not."""
    from entrorl.analysis.run import json_lines
    from entrorl.trainer.loggers import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 0.5}\r{"step": 2, "loss": 0.25}\r\n{"step": 3, "note": "a\xe2\x80\xa8b"}\n')
    assert [record["step"] for record in read_metrics(path)] == [1, 2, 3]
    assert json_lines(path) == [(1, {"step": 1, "loss": 0.5}), (2, {"step": 2, "loss": 0.25}),
                                (3, {"step": 3, "note": "a\u2028b"})]


def test_a_continued_run_s_report_drops_the_steps_the_abandoned_attempt_logged_beyond_it(tmp_path):
    """Steps 1-10 of an attempt that died, then 6-8 of the attempt continued from its step-5 checkpoint (two logs
    joined, or a continued run still training): the last record of each step was kept, and steps logged once with
    it, so the abandoned attempt's steps 9 and 10 ended the run (10 steps, its reward and entropy at the end)."""
    from entrorl.analysis.run import read_metrics_records

    run = tmp_path / "run"
    run.mkdir()
    first = [{"step": s, "entropy/mean": 1.0 - 0.05 * s, "reward/accuracy": 0.1} for s in range(1, 11)]
    second = [{"step": s, "entropy/mean": 2.0, "reward/accuracy": 0.9} for s in range(6, 9)]
    evaluation = [{"step": 8, "eval/avg_at_n": 0.5}]  # the rest of a step, logged apart: merged, no restart
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first + second + evaluation))
    (run / "config.json").write_text(json.dumps({"method": "grpo", "optim": {"steps": 20}}))
    records, _, repeated = read_metrics_records(run / "metrics.jsonl")
    assert repeated == [6, 7, 8]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8] and records[-1]["eval/avg_at_n"] == 0.5
    report = write_run_report(run, figures=False)
    summary = {row["quantity"]: row["value"] for row in report["summary"]["values"]}
    assert report["steps"] == 8
    assert summary["reward end"] == 0.9 and summary["entropy end (nats)"] == 2.0
    assert "got to step 10" not in (run / "report" / "report.md").read_text()


def test_a_step_s_evaluation_logged_after_the_next_step_is_merged_not_taken_for_a_restart(tmp_path):
    """A loop of one's own logs step N's evaluation after step N+1's training, both records with a 'time': it was
    taken for a restart (step N+1 dropped) or replaced step N's training record; it is merged into it."""
    from entrorl.analysis.run import latest_record_of_each_step

    records = []
    for step in range(1, 21):
        records.append({"step": step, "entropy/mean": 1 - 0.02 * step, "reward/mean": 0.1, "time": step})
        if step % 5 == 1 and step > 1:
            records.append({"step": step - 1, "eval/avg_at_n": 0.3, "time": step + 0.5})
    kept, repeated = latest_record_of_each_step(records)
    assert [record["step"] for record in kept] == list(range(1, 21)) and repeated == [5, 10, 15]
    assert kept[4] == {"step": 5, "entropy/mean": 1 - 0.1, "reward/mean": 0.1, "time": 6.5, "eval/avg_at_n": 0.3}


def test_a_joined_verl_log_s_report_drops_the_abandoned_attempt_s_evaluations(tmp_path):
    """Attempt 1 logged steps 1-15 (validation every 5), attempt 2 resumed from step 10 and got to 13: the report
    ended training at 13 but still showed attempt 1's validation at step 15 as the run's last one."""

    def line(step, data):
        return json.dumps({"step": step, "data": data}) + "\n"

    def train(step, offset=0.0):
        entropy = 1.2 * math.exp(-step / 10) + 0.1 + offset
        data = {"actor/entropy": entropy, "critic/score/mean": 0.8 - 0.5 * math.exp(entropy - 1.3)}
        if step % 5 == 0:
            data["val-core/gsm8k/acc/mean@4"] = 0.2 + 0.01 * step
        return data

    log = tmp_path / "exp.jsonl"
    log.write_text(line(0, {"val-core/gsm8k/acc/mean@4": 0.2}) + "".join(line(s, train(s)) for s in range(1, 16))
                   + line(10, {"val-core/gsm8k/acc/mean@4": 0.33})
                   + "".join(line(s, train(s, 0.05)) for s in range(11, 14)))
    report = write_run_report(log, out=tmp_path / "report", figures=False)
    assert report["steps"] == 13
    assert [row["step"] for row in report["evaluations"]["values"]] == [0, 5, 10]
    assert report["evaluations"]["values"][-1]["Avg@n"] == 0.33


def test_the_report_decides_collapse_on_the_ratio_it_prints(tmp_path):
    """Entropy from 1 to 0.5004 prints as '0.5 of its start': at most the laboratory's threshold 0.5, so it collapsed
    by that threshold, as the laboratory's own report decides on the ratio it shows."""
    history = [{"step": i + 1, "loss": 0.0, "reward": 0.1 + 0.02 * i, "entropy": h}
               for i, h in enumerate([1.0] * 5 + [0.5004] * 5)]
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text(json.dumps({"global_step": 10, "log_history": history}))
    write_run_report(tmp_path, figures=False)
    said = " ".join((tmp_path / "report" / "report.md").read_text().split())
    assert "0.5 of its start: at most 0.5" in said and "entropy collapsed" in said


def _run_with_a_checkpoint(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000004" / "model").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "entropy/mean": 1.0, "reward/accuracy": 0.5}) + "\n"
                                               for s in range(1, 5)))
    (run / "checkpoints" / "step_000004" / "model" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    return run


@pytest.mark.parametrize("how", ["dot", "dotdot", "link", "linked in", "through a linked run"])
def test_a_checkpoint_is_said_to_be_one_however_its_folder_is_named(tmp_path, monkeypatch, how):
    """'.', '..' or a link naming a checkpoint's folder, a checkpoint linked in from another disk, a run reached
    through a link: the report still says whose checkpoint it is, naming the run as typed."""
    run = _run_with_a_checkpoint(tmp_path)
    checkpoint, name, run_named = run / "checkpoints" / "step_000004", "step_000004", str(run)
    if how == "link":
        target = tmp_path / "latest"
        target.symlink_to(checkpoint, target_is_directory=True)
    elif how == "linked in":
        elsewhere = tmp_path / "other_disk" / "step_000008"
        elsewhere.mkdir(parents=True)
        target, name = run / "checkpoints" / "step_000008", "step_000008"
        target.symlink_to(elsewhere, target_is_directory=True)
    elif how == "through a linked run":
        (tmp_path / "runlink").symlink_to(run, target_is_directory=True)
        target, run_named = tmp_path / "runlink" / "checkpoints" / "step_000004", str(tmp_path / "runlink")
    else:
        monkeypatch.chdir(checkpoint if how == "dot" else checkpoint / "model")
        target = Path("." if how == "dot" else "..")
    with pytest.raises(NotARunDirectory, match=re.escape(f"is in checkpoint {name} of the run {run_named}: report on")):
        write_run_report(target, figures=False)


def test_a_trl_run_s_tables_count_log_entries_not_steps(tmp_path):
    """Each entry of a TRL run logged every 3 steps averages 3 steps: the interventions, the entropy change's
    agreement and the covariance's columns count entries, as the summary does."""
    history = [{"step": s, "loss": 0.0, "reward": 0.02 * s, "entropy": 2.0 - 0.05 * s, "select/clip_cov_frac": 0.0,
                "entropy/predicted_delta": -0.01, "entropy/measured_delta": -0.02 + 0.001 * s,
                "cov/top_0.02pct_ratio": 100.0 + s} for s in range(3, 31, 3)]
    (tmp_path / "checkpoint-30").mkdir()
    (tmp_path / "checkpoint-30" / "trainer_state.json").write_text(json.dumps({"global_step": 30, "log_history": history}))
    report = write_run_report(tmp_path, figures=False)
    said = " ".join((tmp_path / "report" / "report.md").read_text().split())
    clip = row(report["interventions"], "metric", "select/clip_cov_frac")
    assert clip["log entries"] == 10 and clip["log entries not 0"] == 0
    assert "of 10 log entries" in said and "Summed over the 10 log entries" in said and "10 steps" not in said
    assert "first log entry (at step 3)" in row(report["covariance"], "q", "top 0.02%")
