"""The laboratory report, on a synthetic run directory: every file is written, the HTML is self-contained, the
headline and the tables state the numbers of the metrics files (formatted once, identical in Markdown, HTML and
JSON), the entropy–reward law is recovered, and failed methods and null metrics are handled."""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from entrorl.lab.report import MIN_CEILING_STEPS, SECTIONS, edge_count, edge_means, fmt, moving_average, write_report

A_GRPO, B_GRPO = 0.3, 1.1
STEPS = 40
EVAL_N = 16
KS = [1, 2, 4, 8, 16]
BINS = np.linspace(-0.4, 0.4, 41)
FIGURES = ("curves.png", "pass_at_k.png", "law.png", "entropy_change.png", "covariance.png", "sd_distributions.png", "pass_rates.png")
NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(e[+-]?\d+)?$")


def _entropy_curve(name: str) -> np.ndarray:
    t = np.arange(STEPS, dtype=float)
    if name == "grpo":  # collapses: 1.2 -> about 0.3
        return 0.25 + 0.95 * np.exp(-t / 10.0)
    if name == "clip_cov":  # keeps most of it
        return 0.9 + 0.3 * np.exp(-t / 15.0)
    return np.full(STEPS, 1.2)  # nsr: constant, so the law cannot be fitted


def _metrics(name: str, rng: np.random.Generator) -> list[dict]:
    entropy = _entropy_curve(name)
    a, b = {"grpo": (A_GRPO, B_GRPO), "clip_cov": (0.2, 0.85)}.get(name, (0.0, 0.4))
    reward = -a * np.exp(entropy) + b + rng.normal(0.0, 0.005, STEPS)
    records = []
    for i in range(STEPS):
        predicted = float(rng.normal(-0.01, 0.005))
        record = {
            "step": i + 1,
            "entropy/mean": float(entropy[i]),
            "entropy/p10": float(entropy[i] * 0.2), "entropy/p50": float(entropy[i] * 0.8), "entropy/p90": float(entropy[i] * 2),
            "reward/accuracy": float(reward[i]),
            "reward/mean": float(reward[i]),
            "entropy/predicted_delta": predicted,
            "entropy/measured_delta": 3.0 * predicted + float(rng.normal(0.0, 0.004)),
            "entropy/delta_token_corr": float(rng.uniform(0.2, 0.6)),
            "cov/mean": 0.01,
            "cov/n_tokens": 400.0 + 10 * (i % 3),
            "cov/top_0.02pct_ratio": float(rng.uniform(100, 2000)),
            "cov/top_0.2pct_ratio": float(rng.uniform(50, 300)),
            "cov/top_2pct_ratio": float(rng.uniform(5, 30)),
            "cov/top_20pct_ratio": float(rng.uniform(1, 4)),
            "time/step_s": 0.5,
        }
        records.append(record)
    if name == "grpo":  # diagnostics.first_order: the measured change and a little noise (its own stream of numbers)
        noise = np.random.default_rng(1)
        for record in records:
            record["entropy/first_order_delta"] = record["entropy/measured_delta"] + float(noise.normal(0.0, 0.002))
    # null (NaN) values, as the logger writes them
    records[1]["entropy/mean"] = None
    records[5]["entropy/measured_delta"] = None
    records[6]["entropy/delta_token_corr"] = None
    records[0]["cov/top_0.02pct_ratio"] = None
    records[-2]["reward/accuracy"] = None
    return records


EVAL_ENTROPY = {"base": 1.0, "grpo": 0.3, "clip_cov": 0.9, "nsr": 1.1}  # the final evaluations' mean token entropy


def _final_eval(rng: np.random.Generator, strength: float, *, train_seconds: float | None, entropy: float | None = None) -> dict:
    rates = np.clip(rng.beta(strength, 1.0, 12), 0, 1)
    rates[0], rates[1] = 0.0, 1.0
    rates = np.round(rates * EVAL_N) / EVAL_N
    pass_at_k = {str(k): float(1 - np.mean((1 - rates) ** k)) for k in KS}
    counts = lambda: rng.integers(0, 50, len(BINS) - 1).tolist()  # noqa: E731
    result = {
        "summary": {"n_problems": 12, "n_samples": EVAL_N, "avg_at_n": float(rates.mean())},
        "avg_at_n": float(rates.mean()),
        "pass_at_k": pass_at_k,
        "pass_rates": rates.tolist(),
        "entropy_mean": float(rng.uniform(0.2, 1.2)) if entropy is None else entropy,
        "response_length_mean": 12.0,
        "distributions": {"disc/correct": counts(), "disc/wrong": counts(), "disc_centered/correct": counts(), "disc_centered/wrong": counts()},
        "histogram_bins": BINS.tolist(),
        "forks": [
            {"entropy": 2.5, "sample": 0, "position": 3, "token": "|", "before": "3+4+5=\n3+4=", "after": "7\n7+5=12"},
            {"entropy": 2.25, "sample": 1, "position": 1, "token": "<b>", "before": "a*b_c", "after": "&x"},
            {"entropy": float("nan"), "sample": 2, "position": 0, "token": "\n", "before": "", "after": "end"},
        ],
        "forgetting_accuracy": float(rng.uniform(0.2, 0.5)),
    }
    if train_seconds is not None:
        result["train_seconds"] = train_seconds
    return result


def _write(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def build_run(directory: Path, methods=("grpo", "clip_cov", "nsr", "kl_cov"), failed=("kl_cov",)) -> Path:
    rng = np.random.default_rng(0)
    preset = {"name": "quick", "train_task": "sum_chain", "forgetting_task": "countdown", "steps": STEPS, "eval_n": EVAL_N,
              "law_fit_fraction": 0.2, "methods": list(methods), "workers": 2, "seed": 0, "base": {"hidden_size": 64}}
    _write(directory / "lab.json", {"preset": preset, "base_model": "base-abc123", "base_model_spec": {"hidden_size": 64},
                                    "methods": list(methods), "workers": 2})
    _write(directory / "base" / "final_eval.json", _final_eval(rng, 0.6, train_seconds=None, entropy=EVAL_ENTROPY["base"]))
    for index, name in enumerate(methods):
        run = directory / "methods" / name
        run.mkdir(parents=True, exist_ok=True)
        records = _metrics(name, rng)
        if name in failed:
            records = records[:3]
            (run / "error.log").write_text("Traceback (most recent call last):\n  ...\nRuntimeError: synthetic failure <b>\n")
        else:
            _write(run / "final_eval.json", _final_eval(rng, 1.0 + index, train_seconds=30.0 + index, entropy=EVAL_ENTROPY.get(name)))
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 99, "entropy/me')
    return directory


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    out = build_run(tmp_path_factory.mktemp("lab") / "lab-20250101-000000")
    report = write_report(out)
    return out, report, (out / "report.md").read_text(encoding="utf-8"), (out / "report.html").read_text(encoding="utf-8")


def _tables(node):
    """Every formatted table in report.json."""
    if isinstance(node, dict):
        if "columns" in node and "rows" in node:
            yield node
        for value in node.values():
            yield from _tables(value)
    elif isinstance(node, list):
        for value in node:
            yield from _tables(value)


def _grpo_metric(out: Path, key: str) -> list[float]:
    records = [json.loads(line) for line in (out / "methods" / "grpo" / "metrics.jsonl").read_text().splitlines()[:STEPS]]
    return [math.nan if r.get(key) is None else r[key] for r in records]


def test_number_format_and_rules():
    assert fmt(0.416666) == "0.417" and fmt(12.345) == "12.3" and fmt(1234.4) == "1234" and fmt(99.97) == "100"
    assert fmt(None) == fmt(float("nan")) == fmt(float("inf")) == "n/a"
    assert fmt(0.05, signed=True) == "+0.05" and fmt(-0.05, signed=True) == "-0.05" and fmt(-0.0) == "0" and fmt(7) == "7"
    assert fmt(True) == "yes"
    assert fmt(0, signed=True) == "0" and fmt(3, signed=True) == "+3"  # zero is not positive: no sign
    assert edge_count(40) == 4 and edge_count(30) == 3 and edge_count(5) == 1 and edge_count(12) == 2
    start, end, n = edge_means([1.0, float("nan"), 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    assert (start, end, n) == (1.0, 10.0, 1)
    assert moving_average([1.0, 3.0, float("nan"), 5.0], window=2).tolist() == [1.0, 2.0, 3.0, 5.0]


def test_finite_takes_numbers_only():
    from entrorl.analysis.document import finite

    assert finite(3) == 3.0 and finite("0.5") == 0.5 and finite(np.float32(0.25)) == 0.25
    assert finite(True) is None and finite(False) is None  # a flag is not a number
    assert finite(None) is finite("x") is finite(math.nan) is finite(-math.inf) is None


def test_json_values_are_plain_python_with_none_for_what_is_not_finite():
    """report.json keeps raw values: numpy flags, integers and floats become Python's own (which json can write), dict
    keys become strings, and nan / inf become None."""
    from entrorl.analysis.document import json_value

    value = json_value({"flag": np.bool_(True), 2: np.int64(3), "share": np.float32(0.5), "gap": np.float64("nan"),
                        "row": np.array([1.5, np.inf]), "pair": (np.bool_(False), -math.inf)})
    assert value == {"flag": True, "2": 3, "share": 0.5, "gap": None, "row": [1.5, None], "pair": [False, None]}
    assert [type(value[key]) for key in ("flag", "2", "share")] == [bool, int, float]
    assert json.loads(json.dumps(value)) == value


def test_a_subplot_grid_hides_exactly_the_axes_it_does_not_use():
    """count panels in rows of at most ``columns`` (never more columns than panels): the unused cells of the last row
    are hidden, the count returned are shown."""
    from matplotlib.figure import Figure

    from entrorl.analysis.document import subplot_grid

    for count, columns, shape in ((5, 3, (2, 3)), (7, 2, (4, 2)), (2, 4, (1, 2)), (1, 1, (1, 1))):
        figure = Figure()
        axes = subplot_grid(figure, count, columns)
        assert len(axes) == count and all(axis.get_visible() for axis in axes)
        assert [axis.get_visible() for axis in figure.axes] == [True] * count + [False] * (shape[0] * shape[1] - count)
        assert axes[0].get_gridspec().get_geometry() == shape


def test_tables_align_numeric_columns_mark_cell_kinds_and_refuse_a_wrong_cell_count():
    from entrorl.analysis.document import Table, missing, num, text

    table = Table(["name", "value", "note"], title="t")
    assert table.to_markdown().splitlines()[1] == "|---|---|---|"  # no rows: nothing to align
    table.add([text("a"), num(1.5), num(2)])
    table.add([text("b"), missing(), text("x")])
    # right-aligned only where every cell of the column is a number
    assert table.to_markdown().splitlines()[1] == "|---|---:|---|"
    assert '<tr><td class="txt">a</td><td class="num">1.5</td><td class="num">2</td></tr>' in table.to_html()
    for cells in ([text("c"), num(1.0)], [text("c"), num(1.0), num(2.0), num(3.0)]):
        with pytest.raises(ValueError, match=f"table 't': {len(cells)} cells for 3 columns"):
            table.add(cells)
    assert len(table.rows) == 2


def test_documents_keep_code_spans_as_code_link_their_sections_and_escape_text():
    from entrorl.analysis.document import Heading, Section, md_escape, one_line, render_html, render_markdown

    section = Section("pass-at-k", "Pass@k")
    section.say("The traceback is in `methods/<name>/error.log`; a <b> tag is text.")
    section.blocks.append(Heading("model <i>"))
    markdown = render_markdown("run <x>", [section])
    assert "[Pass@k](#pass-at-k)" in markdown and '<a id="pass-at-k"></a>' in markdown
    assert "The traceback is in `methods/<name>/error.log`; a \\<b\\> tag is text." in markdown
    document = render_html("run <x>", [section])
    assert "<title>run &lt;x&gt;</title>" in document and "<h1>run &lt;x&gt;</h1>" in document
    assert "The traceback is in <code>methods/&lt;name&gt;/error.log</code>; a &lt;b&gt; tag is text." in document
    assert "<h3>model &lt;i&gt;</h3>" in document
    # an entity and a formula in text stay as written: "&amp;" would render as "&", "$$x$$" as math on GitHub
    assert md_escape("a &amp; b, $$x$$ | c") == "a \\&amp; b, \\$\\$x\\$\\$ \\| c"
    assert one_line("a\r\nb\rc\nd\te") == "a↵b↵c↵d⇥e"  # every line break, whichever its convention, and tabs


def test_a_section_that_fails_says_so_and_is_recorded_under_its_anchor():
    from entrorl.analysis.document import Section, build_section

    def build(section):
        section.say("before")
        raise KeyError("pass_at_k")

    errors = {}
    section = build_section(Section("pass-at-k", "Pass@k"), build, errors)
    assert errors == {"pass-at-k": "KeyError: 'pass_at_k'"}
    assert [block.content for block in section.blocks] == [
        "before", "This section could not be generated: KeyError: 'pass_at_k'"]


def test_every_file_is_written(report_run):
    out, report, markdown, document = report_run
    for name in ("report.md", "report.html", "report.json"):
        assert (out / name).stat().st_size > 0
    for name in FIGURES:
        assert (out / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"](figures/{name})" in markdown
    assert json.loads((out / "report.json").read_text()) == report
    assert report["section_errors"] == {}, report["section_errors"]
    assert set(report["figures"]) == set(FIGURES)


def test_every_section_heading_is_present(report_run):
    _, _, markdown, document = report_run
    for anchor, title in SECTIONS:
        assert f"\n## {title}\n" in markdown, title
        assert f'<section id="{anchor}"><h2>{html.escape(title)}</h2>' in document, title
        assert f'href="#{anchor}"' in document


def test_html_is_self_contained(report_run):
    _, _, _, document = report_run
    links = re.findall(r"""\b(src|href)\s*=\s*["']([^"']*)["']""", document, flags=re.I)
    assert links
    for attribute, target in links:
        if attribute.lower() == "src":
            assert target.startswith("data:image/png;base64,"), target[:40]
        else:
            assert target.startswith("#"), target
    assert len([1 for a, _ in links if a.lower() == "src"]) == len(FIGURES)
    for needle in ("<script", "<link", "url(", "@import", "<iframe"):
        assert needle not in document.lower()
    # untrusted text (tokens, contexts, errors) is escaped
    assert "<b>" not in document and "&lt;b&gt;" in document


def test_headline_states_grpo_numbers_from_the_metrics(report_run):
    out, report, markdown, document = report_run
    entropy = np.array(_grpo_metric(out, "entropy/mean"))
    reward = np.array(_grpo_metric(out, "reward/accuracy"))
    n_edge = math.ceil(0.1 * STEPS)  # the documented rule: the first and last 10% of the steps
    start = float(np.nanmean(entropy[:n_edge]))  # step 2 is null: mean of the finite ones
    end = float(np.nanmean(entropy[-n_edge:]))
    reward_start, reward_end = float(np.nanmean(reward[:n_edge])), float(np.nanmean(reward[-n_edge:]))
    assert start == pytest.approx(np.mean(entropy[[0, 2, 3]]))
    headline = report["headline"]["paragraphs"][0]
    for value in (start, end, end / start, reward_start, reward_end):
        assert f"{value:.3g}" in headline, (value, headline)
        assert fmt(value) == f"{value:.3g}"
    assert "first and the last 10%" in headline and f"{n_edge} steps each" in headline
    # the collapse criterion compares the final evaluations: GRPO's samples against the base model's
    assert report["headline"]["collapse"] is True and EVAL_ENTROPY["grpo"] <= 0.5 * EVAL_ENTROPY["base"]
    assert f"{EVAL_ENTROPY['grpo']:.3g}" in headline and f"{EVAL_ENTROPY['base']:.3g}" in headline
    assert "holds" in headline and "rose" in headline
    assert headline.replace("`", "") in markdown.replace("`", "").replace("\\", "")
    assert html.escape(headline.split("`")[0]) in document
    numbers = {row["quantity"]: row["value"] for row in report["headline"]["numbers"]["rows"]}
    assert numbers["GRPO training entropy start"] == f"{start:.3g}" and numbers["GRPO training entropy end"] == f"{end:.3g}"
    # the criterion's start is named: here the base model's evaluation entropy, not the training curve's start
    assert numbers["collapse threshold (0.5 × the base model's evaluation entropy)"] == fmt(0.5 * EVAL_ENTROPY["base"])
    assert "the training reward rose" in headline
    # the kept-entropy rule: ratio >= 1.25 x GRPO's; clip_cov and nsr keep far more than GRPO
    assert report["headline"]["kept_methods"] == ["clip_cov", "nsr"]
    assert "1.25 × GRPO's" in report["headline"]["paragraphs"][1]
    ratio = float(end / start)
    assert f"(1.25 × {fmt(ratio)} = {fmt(1.25 * ratio)})" in report["headline"]["paragraphs"][1]
    grpo_pass1 = json.loads((out / "methods" / "grpo" / "final_eval.json").read_text())["pass_at_k"]["1"]
    assert fmt(grpo_pass1) in report["headline"]["paragraphs"][1]
    assert numbers["steps per edge"] == str(n_edge) and numbers["training steps"] == str(STEPS)
    assert numbers["base model evaluation entropy"] == fmt(EVAL_ENTROPY["base"])
    assert numbers["GRPO final evaluation entropy"] == fmt(EVAL_ENTROPY["grpo"])
    # each kept method's row gives GRPO's and the base model's Pass@1 and Pass@16 in their own columns
    base_pass = json.loads((out / "base" / "final_eval.json").read_text())["pass_at_k"]
    grpo_pass = json.loads((out / "methods" / "grpo" / "final_eval.json").read_text())["pass_at_k"]
    for kept in report["headline"]["kept"]["rows"]:
        assert (kept["Pass@1 GRPO"], kept["Pass@1 base"]) == (fmt(grpo_pass["1"]), fmt(base_pass["1"]))
        assert (kept["Pass@16 GRPO"], kept["Pass@16 base"]) == (fmt(grpo_pass["16"]), fmt(base_pass["16"]))


def test_law_fit_recovers_the_synthetic_constants(report_run):
    _, report, markdown, _ = report_run
    fits = report["law"]["fits"]
    grpo = fits["grpo"]
    assert grpo["fit"]["a"] == pytest.approx(A_GRPO, abs=0.02)
    assert grpo["fit"]["b"] == pytest.approx(B_GRPO, abs=0.03)
    assert grpo["fit"]["r2"] > 0.99
    assert grpo["forecast"]["fit"]["a"] == pytest.approx(A_GRPO, abs=0.1)
    assert grpo["forecast"]["n_fit"] == math.ceil(0.2 * grpo["n_points"])
    assert grpo["forecast"]["fit"]["ceiling_applies"] and "ceiling_error" not in grpo
    # fitted on 8 steps, fewer than the report's minimum for a forecast ceiling: none is given (the value itself is
    # checked on a longer run in test_law_columns_are_honest_forecasts)
    assert grpo["forecast"]["n_fit"] < MIN_CEILING_STEPS and grpo["ceiling_minus_reached"] is None
    assert abs(grpo["end_error"]) < 0.05  # the synthetic run follows the law to the end
    # constant entropy: no fit, n/a with the reason
    assert "fit" not in fits["nsr"] and "same at all" in fits["nsr"]["fit_error"]
    row = next(r for r in report["law"]["table"]["rows"] if r["method"] == "nsr")
    assert row["a"] == "n/a" and "same at all" in row["note"]
    assert "refits on the first 20% of those steps" in " ".join(markdown.split())  # law_fit_fraction 0.2
    # the median forecast RMSE is over the 2 methods that have one, nsr aside
    rmse = [fits[name]["forecast"]["rmse"] for name in ("grpo", "clip_cov")]
    assert (f"the median forecast RMSE on the held-out steps is {fmt(np.median(rmse))} over 2 methods"
            in " ".join(markdown.split()))


def test_every_table_number_is_the_same_string_in_markdown_html_and_json(report_run):
    out, report, markdown, document = report_run
    summary = report["summary"]
    assert summary["rows"] and [r["method"] for r in summary["rows"]] == ["base", "grpo", "clip_cov", "nsr", "kl_cov"]
    for row in summary["rows"]:  # every cell of the summary, text included
        for column, value in row.items():
            assert f"| {value} |" in markdown.replace("\\_", "_"), (column, value)
            assert f">{html.escape(value)}</td>" in document, (column, value)
    checked = 0
    for table in _tables(report):  # and every number of every other table
        for row in table["rows"]:
            for value in row.values():
                if NUMBER.match(value):
                    assert f"| {value} |" in markdown and f">{value}</td>" in document, (table["title"], value)
                    checked += 1
    assert checked > 200
    # the values behind the strings are the ones in the files
    grpo_eval = json.loads((out / "methods" / "grpo" / "final_eval.json").read_text())
    base_eval = json.loads((out / "base" / "final_eval.json").read_text())
    grpo = next(r for r in summary["rows"] if r["method"] == "grpo")
    assert grpo["Pass@1"] == fmt(grpo_eval["pass_at_k"]["1"]) and grpo["Pass@16"] == fmt(grpo_eval["pass_at_k"]["16"])
    base = next(r for r in summary["rows"] if r["method"] == "base")
    assert base["forgetting acc"] == fmt(base_eval["forgetting_accuracy"]) and base["forgetting Δ"] == "—"
    pass_at_k = {r["model"]: r for r in report["pass_at_k"]["rows"]}
    assert list(pass_at_k) == ["base", "grpo", "clip_cov", "nsr"]  # the base model first, no failed method
    assert pass_at_k["base"]["Pass@2"] == fmt(base_eval["pass_at_k"]["2"])
    assert grpo["forgetting Δ"] == fmt(grpo_eval["forgetting_accuracy"] - base_eval["forgetting_accuracy"], signed=True)
    assert grpo["train time (s)"] == fmt(grpo_eval["train_seconds"])
    for name in ("grpo", "clip_cov"):  # the forecast's RMSE and the final evaluation's entropy, per method
        shown = next(r for r in summary["rows"] if r["method"] == name)
        assert shown["forecast RMSE"] == fmt(report["law"]["fits"][name]["forecast"]["rmse"])
        assert shown["eval entropy"] == fmt(EVAL_ENTROPY[name])
    assert any(abs(float(v) - grpo_eval["pass_at_k"]["1"]) < 1e-3 for k, v in grpo.items() if "pass@1" in k.lower())
    entropy = np.array(_grpo_metric(out, "entropy/mean"))
    assert grpo["entropy end/start"] == fmt(np.nanmean(entropy[-4:]) / np.nanmean(entropy[:4]))
    cov = next(r for r in report["covariance"]["rows"] if r["method"] == "grpo")
    assert cov["top 0.02% mean"] == fmt(np.nanmean(_grpo_metric(out, "cov/top_0.02pct_ratio")))
    assert cov["top 0.02% step 1"] == "n/a"  # null at step 1
    # 410 tokens a step: the top 0.02% and 0.2% are both the one top token, which the section says
    said = " ".join(markdown.split())
    assert ("A step has 410 response tokens (median over steps and methods): top 0.02% = 1 token, top 0.2% = 1 token, "
            "top 2% = 8 tokens, top 20% = 82 tokens; at this scale the top 0.02% and 0.2% are the same tokens") in said
    rates = next(r for r in report["pass_rates"]["rows"] if r["model"] == "grpo")
    assert rates["rate 0"] == fmt(np.mean(np.array(grpo_eval["pass_rates"]) == 0))


def test_predicted_and_first_order_changes_are_compared_with_the_measured_one(report_run):
    """Correlations and sign agreements recomputed from metrics.jsonl; a run without the first-order metric shows n/a."""
    out, report, markdown, document = report_run
    rows = {row["method"]: row for row in report["entropy_change"]["rows"]}
    predicted, measured, first_order = (np.array(_grpo_metric(out, key)) for key in (
        "entropy/predicted_delta", "entropy/measured_delta", "entropy/first_order_delta"))
    both = np.isfinite(predicted) & np.isfinite(measured)
    assert rows["grpo"]["steps"] == fmt(int(both.sum()))
    assert rows["grpo"]["correlation across steps"] == fmt(np.corrcoef(predicted[both], measured[both])[0, 1])
    signed = both & (predicted != 0) & (measured != 0)
    assert rows["grpo"]["sign agreement"] == (
        f"{fmt(np.mean(np.sign(predicted[signed]) == np.sign(measured[signed])))} of {int(signed.sum())} steps")
    recorded = np.isfinite(first_order) & np.isfinite(measured)
    assert rows["grpo"]["first order: correlation"] == fmt(np.corrcoef(first_order[recorded], measured[recorded])[0, 1])
    assert float(rows["grpo"]["first order: correlation"]) > 0.9
    signed = recorded & (first_order != 0) & (measured != 0)
    assert rows["grpo"]["first order: sign agreement"] == (
        f"{fmt(np.mean(np.sign(first_order[signed]) == np.sign(measured[signed])))} of {int(signed.sum())} steps")
    assert rows["clip_cov"]["first order: correlation"] == rows["clip_cov"]["first order: sign agreement"] == "n/a"
    assert "The first-order change's ranges from" in markdown
    nonzero = lambda values: np.abs(values[np.isfinite(values) & (values != 0)])  # noqa: E731
    typical_predicted, typical_measured = np.median(nonzero(predicted[both])), np.median(nonzero(measured[both]))
    assert (f"median size is {fmt(typical_predicted)} nats a step against {fmt(typical_measured)} measured, a factor of "
            f"about 10^{round(np.log10(typical_measured / typical_predicted))}") in markdown


def test_failed_methods_are_listed_not_compared(report_run):
    _, report, markdown, document = report_run
    assert report["methods"]["kl_cov"]["status"] == "failed"
    assert "synthetic failure" in report["methods"]["kl_cov"]["error"]
    row = next(r for r in report["summary"]["rows"] if r["method"] == "kl_cov")
    assert row["status"] == "failed" and row["Pass@1"] == "n/a"
    assert report["failed"]["rows"][0]["method"] == "kl_cov"
    assert report["failed"]["rows"][0]["steps logged"] == "3"  # its line cut short is not a step
    assert "### Failed methods" in markdown and "kl_cov" in markdown and "synthetic failure" in markdown
    assert "synthetic failure &lt;b&gt;" in document
    assert "kl_cov" not in report["law"]["fits"]
    assert all(r["method"] != "kl_cov" for r in report["curves"]["rows"])


def test_forks_are_escaped_in_context(report_run):
    _, report, markdown, document = report_run
    rows = report["forks"]["grpo"]["rows"]
    assert rows[0]["token"] == repr("|") and rows[0]["context"] == "…3+4+5=↵3+4=⟦|⟧7↵7+5=12…"
    assert rows[2]["entropy"] == "n/a"
    assert "…3+4+5=↵3+4=⟦\\|⟧7↵7+5=12…" in markdown
    assert "⟦&lt;b&gt;⟧&amp;x" in document


def test_only_the_top_forks_of_each_final_evaluation_are_listed(tmp_path):
    from entrorl.analysis.run import FORKS_SHOWN

    out = build_run(tmp_path / "lab-forks", methods=("grpo",), failed=())
    evaluation = json.loads((out / "methods" / "grpo" / "final_eval.json").read_text())
    evaluation["forks"] = [{"token": str(i), "entropy": 3.0 - 0.1 * i, "before": "", "after": ""} for i in range(FORKS_SHOWN + 2)]
    _write(out / "methods" / "grpo" / "final_eval.json", evaluation)
    rows = write_report(out, figures=False)["forks"]["grpo"]["values"]
    assert [r["rank"] for r in rows] == list(range(1, FORKS_SHOWN + 1)) and rows[-1]["token"] == repr(str(FORKS_SHOWN - 1))


def test_the_distributions_figure_names_the_models_it_shows(report_run, tmp_path):
    """Two methods besides GRPO finished (kl_cov failed): both are shown and named, not 'the 3 other methods'."""
    said = " ".join(report_run[2].split())
    assert re.search(r"The figure shows the base model, GRPO and the 2 other methods \((clip_cov, nsr|nsr, clip_cov)\);", said)
    out = build_run(tmp_path / "lab-one", methods=("grpo", "nsr"), failed=())
    write_report(out, figures=False)
    said = " ".join((out / "report.md").read_text(encoding="utf-8").split())
    assert "The figure shows the base model, GRPO and the other method (nsr);" in said


def test_reproduce_section(report_run):
    _, report, markdown, _ = report_run
    reproduce = report["reproduce"]
    assert reproduce["command"] == "entrorl lab --preset quick --methods grpo,clip_cov,nsr,kl_cov"
    assert "`entrorl lab --preset quick --methods grpo,clip_cov,nsr,kl_cov`" in markdown
    items = {row["item"]: row["value"] for row in reproduce["machine"]["rows"]}
    assert items["torch"] and items["CPU count"] != "n/a"
    assert items["train + eval time summed over methods (s)"] == fmt(30.0 + 31.0 + 32.0)


def test_without_grpo_the_headline_says_so(tmp_path):
    out = build_run(tmp_path / "lab-no-grpo", methods=("clip_cov", "nsr"), failed=())
    report = write_report(out, figures=False)
    assert report["section_errors"] == {} and report["figures"] == {} and not (out / "figures").exists()
    assert report["headline"]["skipped"] == "grpo not in the run"
    assert "GRPO is not in this run" in (out / "report.md").read_text()


def test_failed_grpo_and_an_empty_run(tmp_path):
    out = build_run(tmp_path / "lab-grpo-failed", methods=("grpo", "nsr"), failed=("grpo",))
    report = write_report(out, figures=False)
    assert report["section_errors"] == {} and report["headline"]["skipped"] == "grpo failed"
    empty = tmp_path / "lab-empty"
    _write(empty / "lab.json", {"preset": {"name": "quick"}, "methods": ["grpo"]})
    report = write_report(empty)  # no base evaluation, no method output at all: nothing to plot, no crash
    assert report["section_errors"] == {}
    assert report["methods"]["grpo"]["status"] == "missing"
    assert (empty / "report.html").exists()
    markdown = (empty / "report.md").read_text()  # each missing figure says why, not its caption
    assert "No figure curves.png: no finished method logged a training step." in markdown
    assert "No figure pass_rates.png: no final evaluation holds per-prompt pass rates." in markdown
    assert "nothing to plot" not in markdown


def _write_metrics(run: Path, entropy, reward, **series) -> None:
    records = [{"step": i + 1, "entropy/mean": float(h), "reward/accuracy": float(r),
                **{key.replace("__", "/"): float(values[i]) for key, values in series.items()}}
               for i, (h, r) in enumerate(zip(entropy, reward))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_forecast_error_at_the_end_is_said_to_average_the_points_it_averages(tmp_path):
    """With a step whose entropy is not finite, the law's points are fewer than the steps: 'forecast error, end' then
    averages the last 10% of those points (law.fits.<method>.end_points), and the report says so instead of naming
    a number of the run's steps; with every step finite it names the steps."""
    out = build_run(tmp_path / "lab-gaps", methods=("grpo", "nsr"), failed=())
    h = np.linspace(1.0, 0.5, 60)
    reward = -0.3 * np.exp(h) + 0.9
    reward[-6:] -= 0.02 * np.arange(1, 7)  # the end leaves the law, by a different amount at each step
    entropy = h.copy()
    entropy[-20] = np.nan  # 59 points of 60 steps: 6 end points either way, but not the same 6 steps
    entropy[-3] = np.nan
    for name in ("grpo", "nsr"):
        _write_metrics(out / "methods" / name, entropy, reward)
    report = write_report(out, figures=False)
    law = report["law"]["fits"]["grpo"]
    finite = np.isfinite(entropy)
    assert law["n_points"] == 58 and law["end_points"] == 6
    # the first steps follow the law exactly, so the forecast is the law: its error is the offsets at the last 6 points
    assert law["end_error"] == pytest.approx(float(np.mean(0.9 - 0.3 * np.exp(h[finite][-6:]) - reward[finite][-6:])),
                                             abs=1e-9)
    said = " ".join((out / "report.md").read_text().split())
    assert said.count("reward averaged over the last 10% of the steps where both are finite") == 2  # summary, law
    _write_metrics(out / "methods" / "grpo", h, reward)
    _write_metrics(out / "methods" / "nsr", h, reward)
    write_report(out, figures=False)
    said = " ".join((out / "report.md").read_text().split())
    assert "where both are finite (rounded" not in said and said.count("reward averaged over the last 10% of steps") == 2


def test_law_columns_are_honest_forecasts(tmp_path):
    out = build_run(tmp_path / "lab-law", methods=("grpo", "nsr"), failed=())
    h = np.linspace(1.0, 0.5, 60)  # a forecast fitted on the first 20% = 12 steps
    _write_metrics(out / "methods" / "grpo", h, -0.3 * np.exp(h) + 0.9)  # exactly on the law
    _write_metrics(out / "methods" / "nsr", h, 0.2 * np.exp(h) - 0.1)  # reward falls with entropy: a < 0
    report = write_report(out, figures=False)
    assert report["section_errors"] == {}
    columns = report["summary"]["columns"]
    assert "ceiling error" not in columns and "forecast error, end" in columns
    grpo = next(v for v in report["summary"]["values"] if v["method"] == "grpo")
    assert abs(grpo["forecast error, end"]) < 1e-9 and grpo["law R²"] == pytest.approx(1.0)
    law = report["law"]["fits"]["grpo"]
    reached = float(np.max(moving_average(-0.3 * np.exp(h) + 0.9)))
    assert law["ceiling_minus_reached"] == pytest.approx(0.6 - reached)  # headroom, not an error
    rows = {r["method"]: r for r in report["law"]["table"]["rows"]}
    assert rows["grpo"]["ceiling"] == "0.6" and rows["grpo"]["forecast ceiling"] == "0.6"
    assert rows["nsr"]["ceiling"] == "—" and rows["nsr"]["forecast ceiling"] == "—"
    assert rows["nsr"]["forecast ceiling − reached"] == "—" and "a ≤ 0" in rows["nsr"]["note"]
    assert "a ≤ 0: reward did not rise as entropy fell, so the law's premise fails" in rows["nsr"]["note"]
    assert not report["law"]["fits"]["nsr"]["fit"]["ceiling_applies"]
    assert "not an error of the forecast" in (out / "report.md").read_text()
    # fitted on a handful of steps, the forecast's extrapolation to zero entropy is not shown as a ceiling
    few = np.linspace(1.0, 0.5, 12)
    _write_metrics(out / "methods" / "grpo", few, -0.3 * np.exp(few) + 0.9)
    report = write_report(out, figures=False)
    rows = {r["method"]: r for r in report["law"]["table"]["rows"]}
    assert rows["grpo"]["ceiling"] == "0.6" and rows["grpo"]["forecast ceiling"] == "—"
    assert rows["grpo"]["forecast ceiling − reached"] == "—" and "fitted on 3 steps only" in rows["grpo"]["note"]
    assert report["law"]["fits"]["grpo"]["ceiling_minus_reached"] is None  # report.json agrees with the table
    # a law whose ceiling lies above 1 extrapolates an accuracy past its range: the note says so
    _write_metrics(out / "methods" / "grpo", h, -0.3 * np.exp(h) + 1.5)  # ceiling 1.2
    report = write_report(out, figures=False)
    rows = {r["method"]: r for r in report["law"]["table"]["rows"]}
    assert rows["grpo"]["ceiling"] == "1.2" and "ceiling and forecast ceiling above 1, the most an accuracy" in rows["grpo"]["note"]
    assert "above 1" not in rows["nsr"]["note"]


def test_the_summary_signs_a_positive_forecast_error_and_states_changes_equal_as_shown_once(tmp_path):
    """'forecast error, end' is predicted minus measured, with its sign; forgetting changes that round to the same
    shown value (+0.1 and +0.10001) are stated once, for every method."""
    out = build_run(tmp_path / "lab-signs", methods=("grpo", "nsr"), failed=())
    h = np.linspace(1.0, 0.5, 60)
    reward = -0.3 * np.exp(h) + 0.9
    reward[-6:] -= 0.02  # the last 10% fall 0.02 below the law the first steps follow
    _write_metrics(out / "methods" / "grpo", h, reward)
    for path, accuracy in (("base", 0.3), ("methods/grpo", 0.4), ("methods/nsr", 0.40001)):
        evaluation = json.loads((out / path / "final_eval.json").read_text())
        evaluation["forgetting_accuracy"] = accuracy
        _write(out / path / "final_eval.json", evaluation)
    report = write_report(out, figures=False)
    assert report["law"]["fits"]["grpo"]["end_error"] == pytest.approx(0.02, abs=1e-9)
    grpo = next(r for r in report["summary"]["rows"] if r["method"] == "grpo")
    assert grpo["forecast error, end"] == "+0.02" and grpo["forgetting Δ"] == "+0.1"
    assert ("the base model's accuracy on the untrained task is 0.3; after training it changed by +0.1 for every method."
            in " ".join((out / "report.md").read_text().split()))


def test_two_point_law_fit_has_no_r2(tmp_path):
    out = build_run(tmp_path / "lab-two", methods=("grpo",), failed=())
    _write_metrics(out / "methods" / "grpo", [1.0, 0.5], [0.2, 0.4])
    report = write_report(out, figures=False)
    grpo = next(r for r in report["summary"]["rows"] if r["method"] == "grpo")
    assert grpo["law R²"] == "n/a"
    row = next(r for r in report["law"]["table"]["rows"] if r["method"] == "grpo")
    assert "fewer than 3 points" in row["note"]


def test_an_intervention_that_never_acted_is_flagged(tmp_path):
    out = build_run(tmp_path / "lab-idle", methods=("grpo", "clip_b", "clip_cov", "adaptive_entropy"), failed=())
    h = np.linspace(1.0, 0.5, STEPS)
    r = -0.3 * np.exp(h) + 0.9
    zeros, some = np.zeros(STEPS), np.where(np.arange(STEPS) % 3 == 0, 0.01, 0.0)
    # clip_b's entropy falls less than GRPO's: the headline counts it as keeping entropy, and says its part never acted
    _write_metrics(out / "methods" / "clip_b", np.linspace(1.0, 0.9, STEPS), r, select__clip_b_frac=zeros,
                   select__dropped_frac=zeros)
    _write_metrics(out / "methods" / "clip_cov", h, r, select__clip_cov_frac=some)
    _write_metrics(out / "methods" / "adaptive_entropy", h, r, reg__adaptive_entropy_coeff=zeros,
                   reg__adaptive_entropy_controller_coeff=np.full(STEPS, 1e-4))
    _write_metrics(out / "methods" / "grpo", h, r, select__dropped_frac=zeros)
    report = write_report(out, figures=False)
    notes = {row["method"]: row["note"] for row in report["summary"]["rows"]}
    assert notes["clip_b"] == f"never acted: select/clip_b_frac = 0 at all {STEPS} steps"
    assert notes["adaptive_entropy"] == f"never acted: reg/adaptive_entropy_coeff = 0 at all {STEPS} steps"
    assert notes["grpo"] == notes["clip_cov"] == notes["base"] == ""
    assert report["never_acted"] == ["clip_b", "adaptive_entropy"]
    assert report["headline"]["kept_methods"] == ["clip_b"]
    assert any("its own intervention never acted, so this is its surrogate's doing)" in paragraph
               for paragraph in report["headline"]["paragraphs"])
    assert report["interventions"]["clip_cov"][0] == {"key": "select/clip_cov_frac", "steps": STEPS,
                                                      "active_steps": STEPS // 3 + 1, "max_abs": 0.01}
    markdown = (out / "report.md").read_text()
    assert ("2 methods never applied their own intervention, or part of it, during training: clip_b (`select/clip_b_frac` "
            f"0 at all {STEPS} steps)") in markdown


def test_a_composition_whose_one_part_stayed_idle_is_flagged_for_that_part(tmp_path):
    """In dapo+clip_b+forking_tokens the 80/20 selector acts while Clip_B may never fire: the note names clip_b and
    says the other parts acted, not that the run trained with the surrogate alone."""
    name = "dapo+clip_b+forking_tokens"
    out = build_run(tmp_path / "lab-composed", methods=("grpo", name), failed=())
    h = np.linspace(1.0, 0.5, STEPS)
    r = -0.3 * np.exp(h) + 0.9
    _write_metrics(out / "methods" / "grpo", h, r)
    _write_metrics(out / "methods" / name, np.linspace(1.0, 0.9, STEPS), r, select__clip_b_frac=np.zeros(STEPS),
                   select__forking_tokens_frac=np.full(STEPS, 0.8))
    report = write_report(out, figures=False)
    assert report["never_acted"] == [name]
    # it kept entropy through the part that acted: the headline does not put that on its surrogate
    assert report["headline"]["kept_methods"] == [name]
    assert not any("surrogate's doing" in paragraph for paragraph in report["headline"]["paragraphs"])
    row = next(r for r in report["summary"]["rows"] if r["method"] == name)
    assert row["note"] == f"never acted: select/clip_b_frac = 0 at all {STEPS} steps (its other parts acted)"
    assert f"{name} (`select/clip_b_frac` 0 at all {STEPS} steps; its other parts acted)" in (out / "report.md").read_text()


def test_the_edge_text_states_what_is_averaged(tmp_path):
    from entrorl.lab.report import edge_phrase

    assert edge_phrase(40) == "the first and the last 10% of the 40 training steps (4 steps each)"
    assert edge_phrase(12) == "the first and the last 2 of the 12 training steps (16.7% each: 10% rounded up to whole steps)"
    assert edge_phrase(5) == "the first and the last 1 of the 5 training steps (20% each: 10% rounded up to whole steps)"
    out = build_run(tmp_path / "lab-12", methods=("grpo", "clip_cov"), failed=())
    for name in ("grpo", "clip_cov"):
        _write_metrics(out / "methods" / name, np.linspace(1.0, 0.5, 12), np.linspace(0.1, 0.3, 12))
    report = write_report(out, figures=False)
    assert "the first and the last 2 of the 12 training steps (16.7% each" in report["headline"]["paragraphs"][0]
    assert "10% of the 12" not in (out / "report.md").read_text()
    assert "over the last 2 of the 12 steps (16.7%: 10% rounded up to whole steps)" in (out / "report.md").read_text()


def test_the_report_covers_every_method_of_the_folder(tmp_path):
    out = build_run(tmp_path / "lab-union", methods=("grpo", "clip_cov", "nsr"), failed=())
    lab = json.loads((out / "lab.json").read_text())
    # an older runner recorded only the methods of the last invocation (here grpo, named twice)
    lab["methods"], lab["preset"]["methods"] = ["grpo", "grpo"], ["grpo"]
    (out / "lab.json").write_text(json.dumps(lab))
    report = write_report(out, figures=False)
    assert [r["method"] for r in report["summary"]["rows"]] == ["base", "grpo", "clip_cov", "nsr"]
    assert report["reproduce"]["command"] == "entrorl lab --preset quick --methods grpo,clip_cov,nsr"


def test_wall_clock_sums_the_invocations_that_ran_something(tmp_path):
    from entrorl.lab.report import CPU_KERNELS_LABEL, WALL_CLOCK_LABEL

    out = build_run(tmp_path / "lab-clock", methods=("grpo", "nsr"), failed=())
    lab = json.loads((out / "lab.json").read_text())
    lab["invocations"] = [
        {"started_at": 1000.0, "finished_at": 1100.0, "ran": ["grpo"], "base_evaluated": True, "cpu_kernels": "AVX512"},
        {"started_at": 5000.0, "finished_at": 5002.0, "ran": [], "cpu_kernels": "DEFAULT"},  # everything cached: not counted
        {"started_at": 6000.0, "finished_at": 6050.0, "ran": ["nsr"], "cpu_kernels": "AVX2"},  # a resume, on another CPU
        {"started_at": 7000.0, "ran": ["nsr"]},  # killed: no end recorded
        # the system clock set back 3 h while it ran: the monotonic duration counts
        {"started_at": 20000.0, "finished_at": 9200.0, "seconds": 25.0, "ran": ["grpo"]},
    ]
    (out / "lab.json").write_text(json.dumps(lab))  # lab.json is newer than every final_eval.json
    report = write_report(out, figures=False)
    items = {row["item"]: row["value"] for row in report["reproduce"]["machine"]["rows"]}
    assert items[WALL_CLOCK_LABEL] == "175" and items["invocations counted / in all"] == "3 / 5"
    more = [{"started_at": 30000.0, "finished_at": 30010.0, "ran": [], "base_evaluated": True},  # evaluated the base: counted
            {"started_at": 40000.0, "finished_at": 39000.0, "ran": ["nsr"]}]  # clock set back, no monotonic time: 0 s
    (out / "lab.json").write_text(json.dumps({**lab, "invocations": lab["invocations"] + more}))
    items = {row["item"]: row["value"] for row in write_report(out, figures=False)["reproduce"]["machine"]["rows"]}
    assert items[WALL_CLOCK_LABEL] == "185" and items["invocations counted / in all"] == "5 / 7"
    assert items[CPU_KERNELS_LABEL] == "AVX512, AVX2"  # the kernels of the invocations that trained, in order
    lab["base_model_cpu_kernels"] = "DEFAULT"  # a base model from a cache shared with another machine
    (out / "lab.json").write_text(json.dumps(lab))
    items = {row["item"]: row["value"] for row in write_report(out, figures=False)["reproduce"]["machine"]["rows"]}
    assert items[CPU_KERNELS_LABEL] == "AVX512, AVX2 (base model: DEFAULT)"
    markdown = (out / "report.md").read_text()
    assert "1 invocation recorded no end" in markdown and "lab.json to last final evaluation" not in markdown
    script = (Path(__file__).resolve().parents[1] / "scripts" / "update_readme_lab.py").read_text()
    assert f'"{WALL_CLOCK_LABEL}"' in script and f'"{CPU_KERNELS_LABEL}"' in script  # the README shows both


def test_a_method_acting_through_its_advantages_is_not_flagged():
    from entrorl.analysis.run import INTERVENTION_KEY_PATTERNS
    from entrorl.lab.report import intervention_keys

    assert intervention_keys("clip_b") == [pattern.format("clip_b") for pattern in INTERVENTION_KEY_PATTERNS]
    assert "reg/adaptive_entropy_coeff" in intervention_keys("adaptive_entropy")
    assert {"select/kl_cov_frac", "kl_cov/abs_log_ratio"} <= set(intervention_keys("kl_cov"))
    assert "correction/icepop_masked_frac" in intervention_keys("dapo+icepop")
    # nsr's estimator leaves no positive advantage for its sign selector to drop: the selector idles, nsr acts
    assert intervention_keys("nsr") == intervention_keys("psr") == intervention_keys("w_reinforce") == []
    assert intervention_keys("grpo") == intervention_keys("sft") == []


def test_the_seed_spread_script_reads_the_headline_numbers_of_a_report(report_run):
    """scripts/lab_seed_spread.py names the headline quantities through report.py's constants, so a renamed label
    cannot leave it printing '?'."""
    import importlib.util

    out, report, _, _ = report_run
    path = Path(__file__).resolve().parents[1] / "scripts" / "lab_seed_spread.py"
    spec = importlib.util.spec_from_file_location("lab_seed_spread", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (line,) = module.collapse_lines([report], ["seed0"])
    assert "?" not in line and line.startswith("seed0: GRPO") and "collapse (" in line
    # its Pass@k columns are those the report has, whatever the preset's largest k
    header, rows = module.spread_table([report, report])
    pass_columns = [column for column in header if column.startswith("Pass@")]
    assert pass_columns and pass_columns == [key for key in report["summary"]["values"][0] if key.startswith("Pass@")]
    (grpo,) = [row for row in rows if row[0] == "grpo"]
    assert all(cell != "—" for column, cell in zip(header, grpo) if column in pass_columns)


def test_the_seed_spread_script_warns_when_two_runs_trained_with_the_same_seed(tmp_path, capsys):
    """A run without --rl-seed trains with the preset's seed: beside one with --rl-seed 0 (the same training, as the
    laboratory itself accepts) the spread is not one over seeds, and the script says so; 0 and 1 are two seeds."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "lab_seed_spread.py"
    spec = importlib.util.spec_from_file_location("lab_seed_spread", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = {"summary": {"values": [{"method": "grpo", "reward end": 0.4}]}, "headline": {"numbers": {"rows": []}}}
    for seeds, warned in (((None, 0), True), ((None, 1), False)):
        runs = []
        for position, rl_seed in enumerate(seeds):
            run = tmp_path / f"{seeds}-{position}"
            _write(run / "lab.json", {"preset": {"name": "quick", "seed": 0, "rl_seed": rl_seed}})
            _write(run / "report.json", report)
            runs.append(str(run))
        assert module.main(runs) == 0
        said = capsys.readouterr()
        assert ("share their rl_seed" in said.err) is warned
        assert "(rl_seed 0, the preset seed)" in said.out


def test_the_seed_spread_script_names_a_run_without_grpo_results_and_a_number_only_some_runs_have(tmp_path, capsys):
    """A run whose GRPO was interrupted or failed has a headline without numbers (the script died with a KeyError),
    and its cells are not a spread over every run."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "lab_seed_spread.py"
    spec = importlib.util.spec_from_file_location("lab_seed_spread", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    finished = {"summary": {"values": [{"method": "grpo", "reward end": 0.4}]}, "headline": {"numbers": {"rows": []}}}
    stopped = {"summary": {"values": [{"method": "grpo", "reward end": None}]},
               "headline": {"skipped": "grpo interrupted", "paragraphs": []}}
    runs = []
    for rl_seed, report in ((0, finished), (1, stopped)):
        run = tmp_path / f"seed{rl_seed}"
        _write(run / "lab.json", {"preset": {"name": "quick", "seed": 0, "rl_seed": rl_seed}})
        _write(run / "report.json", report)
        runs.append(str(run))
    assert module.main(runs) == 0
    said = capsys.readouterr().out
    assert "0.4 [0.4, 0.4] (1 of 2 runs)" in said
    assert "seed1 (rl_seed 1): no collapse criterion (grpo interrupted)" in said


def test_the_seed_spread_script_refuses_runs_that_differ_in_more_than_their_seed(tmp_path, capsys):
    """Runs of other settings (12 against 40 steps, another preset) or another base model are no spread over seeds:
    refused (exit 2), naming what differs; the methods run and the seeds may differ."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "lab_seed_spread.py"
    spec = importlib.util.spec_from_file_location("lab_seed_spread", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = {"summary": {"values": [{"method": "grpo", "reward end": 0.4}]}, "headline": {"numbers": {"rows": []}}}

    def runs(*records):
        folders = []
        for position, record in enumerate(records):
            run = tmp_path / f"run{len(list(tmp_path.iterdir()))}-{position}"
            _write(run / "lab.json", record)
            _write(run / "report.json", report)
            folders.append(str(run))
        return folders

    seed = {"name": "quick", "seed": 0, "steps": 12, "methods": ["grpo"], "base": {"steps": 400}}
    same = runs({"preset": {**seed, "rl_seed": 1}, "base_model_fingerprint": "a"},
                {"preset": {**seed, "rl_seed": 2, "methods": ["grpo", "nsr"]}, "base_model_fingerprint": "a"})
    assert module.main(same) == 0
    capsys.readouterr()
    for other, said in (({"preset": {**seed, "rl_seed": 2, "steps": 40}}, "steps: 12 in "),
                        ({"preset": {**seed, "rl_seed": 2, "base": {"steps": 200}}}, "base.steps: 400 in "),
                        ({"preset": {**seed, "rl_seed": 2}, "base_model_fingerprint": "b"}, "another base model")):
        with pytest.raises(SystemExit) as refused:
            module.main(runs({"preset": {**seed, "rl_seed": 1}, "base_model_fingerprint": "a"}, other))
        assert refused.value.code == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "differ in more than their training seed" in err and said in err, err


def test_the_entropy_change_axes_carry_their_power_of_ten_in_their_labels():
    """The scale of a panel goes into its axis labels (matplotlib's offset text sat on the panel's title)."""
    from entrorl.analysis.document import power_of_ten

    assert power_of_ten([3e-9, -1e-8]) == -8
    assert power_of_ten([0.001, float("nan")]) == -3
    assert power_of_ten([0.5, -2.0]) == 0 and power_of_ten([0.01]) == 0 and power_of_ten([999.0]) == 0
    assert power_of_ten([12345.0]) == 4
    assert power_of_ten([]) == 0 and power_of_ten([0.0, float("inf"), float("nan")]) == 0


def test_unreadable_metrics_lines_are_named_not_dropped_silently(report_run):
    """build_run ends each metrics.jsonl with a line cut short: the report names it, per method, and leaves it out."""
    out, report, markdown, html = report_run
    line = STEPS + 1  # kl_cov failed after 3 steps
    assert report["unreadable_metrics_lines"] == {"grpo": [line], "clip_cov": [line], "nsr": [line], "kl_cov": [4]}
    assert (f"were left out: grpo: line {line}; clip_cov: line {line}; nsr: line {line}; kl_cov: line 4."
            in " ".join(markdown.split()))


def test_more_than_5_unreadable_metrics_lines_are_counted_after_the_first_5(tmp_path):
    out = build_run(tmp_path / "lab-lines", methods=("grpo",), failed=())
    _write_metrics(out / "methods" / "grpo", np.linspace(1.0, 0.5, 20), np.full(20, 0.3))
    with (out / "methods" / "grpo" / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 21, "entro\n' * 7)
    report = write_report(out, figures=False)
    assert report["unreadable_metrics_lines"] == {"grpo": list(range(21, 28))}
    assert "were left out: grpo: lines 21, 22, 23, 24, 25 and 2 more." in " ".join((out / "report.md").read_text().split())


def test_the_covariance_section_takes_the_median_token_count_over_methods_and_ranges_the_top_share(tmp_path):
    """The token count stated is the median over the methods' steps (4, 4 and 1000 tokens: 4), at which every top-q%
    is the one top token, but not at nsr's 1000, so the columns are not said to agree; the range sentence is that of
    the smallest q's mean ratio, lowest first."""
    out = build_run(tmp_path / "lab-cov", methods=("grpo", "clip_cov", "nsr"), failed=())
    h = np.linspace(1.0, 0.5, 20)
    for name, tokens, top in (("grpo", 4.0, 900.0), ("clip_cov", 4.0, 1500.0), ("nsr", 1000.0, 1200.0)):
        _write_metrics(out / "methods" / name, h, np.full(20, 0.3), cov__n_tokens=np.full(20, tokens),
                       **{"cov__top_0.02pct_ratio": np.full(20, top), "cov__top_20pct_ratio": np.full(20, 2.0)})
    report = write_report(out, figures=False)
    said = " ".join((out / "report.md").read_text().split())
    assert ("A step has 4 response tokens (median over steps and methods): top 0.02% = 1 token, top 0.2% = 1 token, "
            "top 2% = 1 token, top 20% = 1 token.") in said and "are the same tokens" not in said
    assert "the top 0.02% of tokens carry from 900× (grpo) to 1500× (clip_cov) the mean covariance." in said
    rows = {r["method"]: r for r in report["covariance"]["values"]}
    assert rows["nsr"]["top 0.02% mean"] == 1200.0 and rows["nsr"]["top 20% step 1"] == 2.0


def test_the_s_d_figure_shows_the_3_methods_that_kept_most_entropy_and_the_curves_name_every_reward(tmp_path):
    methods = ("grpo", "clip_cov", "nsr", "kl_cov", "clip_b")
    out = build_run(tmp_path / "lab-sd", methods=methods, failed=())
    steps = np.arange(20)
    for name, end in zip(methods, (0.3, 0.6, 0.9, 0.5, 0.8)):  # end/start ratios, from a start of 1
        _write_metrics(out / "methods" / name, np.where(steps < 10, 1.0, end), np.full(20, 0.3))
        if name == "kl_cov":  # a run that logged only the mean reward
            path = out / "methods" / name / "metrics.jsonl"
            records = [json.loads(line) for line in path.read_text().splitlines()]
            path.write_text("".join(json.dumps({"step": r["step"], "entropy/mean": r["entropy/mean"],
                                                "reward/mean": r["reward/accuracy"]}) + "\n" for r in records))
    report = write_report(out, figures=False)
    assert report["distributions"]["shown_in_figure"] == ["base", "grpo", "nsr", "clip_b", "clip_cov"]
    # the curves name every reward the methods logged
    assert "and the reward `reward/accuracy` / `reward/mean` (the share" in (out / "report.md").read_text()


def test_a_histogram_bin_that_straddles_0_is_not_counted_below_0(tmp_path):
    out = build_run(tmp_path / "lab-bins", methods=("grpo",), failed=())
    evaluation = json.loads((out / "methods" / "grpo" / "final_eval.json").read_text())
    evaluation["histogram_bins"] = [-1.0, -0.5, 0.5, 1.0]
    evaluation["distributions"] = {key: [1, 2, 3] for key in evaluation["distributions"]}
    _write(out / "methods" / "grpo" / "final_eval.json", evaluation)
    rows = {r["model"]: r for r in write_report(out, figures=False)["distributions"]["table"]["values"]}
    assert rows["grpo"]["S<0 correct"] == pytest.approx(1 / 6) and rows["grpo"]["D<0 wrong"] == pytest.approx(1 / 6)


def test_pass_rates_that_are_not_numbers_are_left_out_of_the_polarisation(tmp_path):
    out = build_run(tmp_path / "lab-rates", methods=("grpo",), failed=())
    evaluation = json.loads((out / "methods" / "grpo" / "final_eval.json").read_text())
    evaluation["pass_rates"] = [0.0, 1.0, 0.5, float("nan"), None, 0.25]
    _write(out / "methods" / "grpo" / "final_eval.json", evaluation)
    report = write_report(out, figures=False)
    assert report["section_errors"] == {}
    (grpo,) = [r for r in report["pass_rates"]["values"] if r["model"] == "grpo"]
    assert grpo["prompts"] == 4 and grpo["mean pass rate"] == pytest.approx(0.4375)
    assert grpo["rate 0"] == grpo["rate 1"] == 0.25 and grpo["mixed"] == 0.5


def test_the_headline_s_rules_include_their_boundaries(tmp_path):
    """An evaluation entropy of exactly half the base model's is a collapse ("at most half"); a method whose entropy
    ratio is exactly 1.25 x GRPO's kept entropy ("at least"); a Pass@1 equal to GRPO's is neither higher nor lower."""
    out = build_run(tmp_path / "lab-edges", methods=("grpo", "nsr"), failed=())
    steps = np.arange(20)
    _write_metrics(out / "methods" / "grpo", np.where(steps < 10, 1.0, 0.4), np.full(20, 0.3))  # ratio 0.4
    _write_metrics(out / "methods" / "nsr", np.where(steps < 10, 1.0, 0.5), np.full(20, 0.3))  # ratio 0.5 = 1.25 x 0.4
    evaluations = {name: json.loads((out / path).read_text())
                   for name, path in (("base", "base/final_eval.json"), ("grpo", "methods/grpo/final_eval.json"),
                                      ("nsr", "methods/nsr/final_eval.json"))}
    evaluations["grpo"]["entropy_mean"] = 0.5 * evaluations["base"]["entropy_mean"]
    evaluations["nsr"]["pass_at_k"]["1"] = evaluations["grpo"]["pass_at_k"]["1"]
    evaluations["grpo"]["pass_at_k"]["16"], evaluations["nsr"]["pass_at_k"]["16"] = 0.9, 0.95
    _write(out / "methods" / "grpo" / "final_eval.json", evaluations["grpo"])
    _write(out / "methods" / "nsr" / "final_eval.json", evaluations["nsr"])
    headline = write_report(out, figures=False)["headline"]
    assert headline["collapse"] is True
    assert headline["kept_methods"] == ["nsr"]
    assert any("the methods that kept entropy have 0 higher and 0 lower Pass@1 and 1 higher and 0 lower Pass@16;" in paragraph
               for paragraph in headline["paragraphs"])


def test_summary_and_headline_values_are_computed_from_the_run(report_run):
    """The summary's reward end and entropy end/start are the edge means of each method's metrics; the headline's
    evaluation entropy ratio is GRPO's over the base model's; GRPO is not counted among the methods compared with it;
    the forgetting sentence names the method that lost most and the one that gained most."""
    out, report, markdown, _ = report_run
    rows = {row["method"]: row for row in report["summary"]["rows"]}
    for name in ("grpo", "clip_cov", "nsr"):
        lines = (out / "methods" / name / "metrics.jsonl").read_text().splitlines()[:STEPS]
        records = [json.loads(line) for line in lines]
        series = {key: np.array([math.nan if r.get(key) is None else r[key] for r in records])
                  for key in ("entropy/mean", "reward/accuracy")}
        n_edge = math.ceil(0.1 * STEPS)
        assert rows[name]["reward end"] == fmt(float(np.nanmean(series["reward/accuracy"][-n_edge:])))
        entropy = series["entropy/mean"]
        ratio = float(np.nanmean(entropy[-n_edge:]) / np.nanmean(entropy[:n_edge]))
        assert rows[name]["entropy end/start"] == fmt(ratio)
    numbers = {row["quantity"]: row["value"] for row in report["headline"]["numbers"]["rows"]}
    assert numbers["GRPO evaluation entropy / base"] == fmt(EVAL_ENTROPY["grpo"] / EVAL_ENTROPY["base"])
    assert "2 of 2 methods kept entropy" in report["headline"]["paragraphs"][1]
    base = json.loads((out / "base" / "final_eval.json").read_text())["forgetting_accuracy"]
    deltas = {name: json.loads((out / "methods" / name / "final_eval.json").read_text())["forgetting_accuracy"] - base
              for name in ("grpo", "clip_cov", "nsr")}
    worst, best = min(deltas, key=deltas.get), max(deltas, key=deltas.get)
    assert worst != best
    assert (f"after training it changed by {fmt(deltas[worst], signed=True)} ({worst}) to "
            f"{fmt(deltas[best], signed=True)} ({best})") in markdown


def test_the_headline_falls_back_to_the_training_curve_without_a_base_entropy(tmp_path):
    """A base model evaluation entropy of 0 cannot anchor the collapse criterion: the training curve's edges are used,
    and the report is written without a section error. A reward that ends where it started did not change; one that
    ends lower fell."""
    out = build_run(tmp_path / "lab-zero", methods=("grpo",), failed=())
    steps = np.arange(20)
    _write_metrics(out / "methods" / "grpo", np.where(steps < 10, 1.0, 0.4), np.full(20, 0.3))
    base = json.loads((out / "base" / "final_eval.json").read_text())
    base["entropy_mean"] = 0.0
    _write(out / "base" / "final_eval.json", base)
    report = write_report(out, figures=False)
    assert report["section_errors"] == {}
    headline = report["headline"]
    numbers = {row["quantity"]: row["value"] for row in headline["numbers"]["rows"]}
    assert numbers["collapse threshold (0.5 × training entropy start)"] == "0.5"
    assert headline["collapse"] is True and headline["reward_change"] == "did not change at the shown precision"
    _write_metrics(out / "methods" / "grpo", np.where(steps < 10, 1.0, 0.4), np.where(steps < 10, 0.3, 0.2))
    assert write_report(out, figures=False)["headline"]["reward_change"] == "fell"
    # a rise the report cannot show (0.3 and 0.3001 are both "0.3") is not stated as one
    _write_metrics(out / "methods" / "grpo", np.where(steps < 10, 1.0, 0.4), np.where(steps < 10, 0.3, 0.3001))
    assert write_report(out, figures=False)["headline"]["reward_change"] == "did not change at the shown precision"


def test_pass_at_k_columns_use_the_ks_every_model_has_and_the_best_ratio_is_named(tmp_path):
    """The largest k is the largest one every evaluation holds; when no method kept entropy, the headline names the
    method with the highest end/start entropy ratio."""
    out = build_run(tmp_path / "lab-ks", methods=("grpo", "clip_cov", "nsr"), failed=())
    steps = np.arange(20)
    for name, end in (("grpo", 0.4), ("clip_cov", 0.3), ("nsr", 0.45)):  # threshold 1.25 x 0.4 = 0.5: none kept
        _write_metrics(out / "methods" / name, np.where(steps < 10, 1.0, end), np.full(20, 0.3))
    evaluation = json.loads((out / "methods" / "nsr" / "final_eval.json").read_text())
    del evaluation["pass_at_k"]["16"]
    evaluation["pass_at_k"]["mean"] = 0.5  # not a k: left out
    evaluation["pass_at_k"]["1"] = None  # a value not recorded is missing, not 0
    _write(out / "methods" / "nsr" / "final_eval.json", evaluation)
    report = write_report(out, figures=False)
    nsr = next(row for row in report["summary"]["rows"] if row["method"] == "nsr")
    assert nsr["Pass@1"] == "n/a" and nsr["Pass@8"] == fmt(evaluation["pass_at_k"]["8"])
    assert report["rules"]["largest_k"] == 8
    assert "Pass@8" in report["summary"]["columns"] and "Pass@16" not in report["summary"]["columns"]
    assert report["summary"]["columns"].count("Pass@8") == 1  # the largest k is not repeated as the middle one
    # a k whose value one evaluation did not record keeps its column: that cell alone is n/a
    assert report["pass_at_k"]["columns"] == ["model", "Pass@1", "Pass@2", "Pass@4", "Pass@8"]
    assert next(row for row in report["pass_at_k"]["rows"] if row["model"] == "nsr")["Pass@1"] == "n/a"
    assert report["headline"]["kept_methods"] == []
    assert any("No method kept entropy by this rule; the highest ratio is 0.45 (nsr)." in paragraph
               for paragraph in report["headline"]["paragraphs"])


def test_a_method_failed_by_its_outcome_or_its_error_log_alone_is_listed_as_failed(tmp_path):
    """Without error.log, the runner's outcomes.json says a method failed (its error's last line is given); a folder
    under methods/ holding only an error.log is a method of the run too; an empty folder is not."""
    out = build_run(tmp_path / "lab-outcomes", methods=("grpo", "nsr", "kl_cov"), failed=("kl_cov",))
    (out / "methods" / "kl_cov" / "error.log").unlink()
    _write(out / "outcomes.json", {"kl_cov": {"status": "failed", "error": "Traceback ...\n  ...\nValueError: boom\n\n"}})
    (out / "methods" / "clip_b").mkdir()
    (out / "methods" / "clip_b" / "error.log").write_text("RuntimeError: out of memory\n")
    (out / "methods" / "empty").mkdir()
    report = write_report(out, figures=False)
    assert list(report["methods"]) == ["grpo", "nsr", "kl_cov", "clip_b"]
    assert report["methods"]["kl_cov"]["status"] == "failed" and report["methods"]["kl_cov"]["error"] == "ValueError: boom"
    assert report["methods"]["clip_b"]["status"] == "failed"
    assert report["methods"]["clip_b"]["error"] == "RuntimeError: out of memory"


def test_the_law_fit_fraction_defaults_to_the_preset_s(tmp_path):
    from entrorl.lab.presets import LabPreset

    out = build_run(tmp_path / "lab-fraction", methods=("grpo",), failed=())
    lab = json.loads((out / "lab.json").read_text())
    del lab["preset"]["law_fit_fraction"]  # a preset recorded before the setting existed
    (out / "lab.json").write_text(json.dumps(lab))
    report = write_report(out, figures=False)
    assert report["rules"]["law_fit_fraction"] == LabPreset.model_fields["law_fit_fraction"].default


def test_the_reproduce_command_names_what_differs_from_the_preset(tmp_path):
    """The preset's methods in another order need no --methods; the workers of the invocations that ran are named
    when they differ from the preset's, in a folder where an older invocation recorded no "ran"; a seed of 0 is a
    seed."""
    from entrorl.lab.presets import get_preset

    methods = tuple(reversed(get_preset("quick").methods))
    out = build_run(tmp_path / "lab-reproduce", methods=methods, failed=())
    lab = json.loads((out / "lab.json").read_text())
    lab["preset"]["rl_seed"] = 0
    for name in methods:  # no method recorded its time
        evaluation = json.loads((out / "methods" / name / "final_eval.json").read_text())
        del evaluation["train_seconds"]
        _write(out / "methods" / name / "final_eval.json", evaluation)
    lab["invocations"] = [{"started_at": 0.0, "finished_at": 10.0, "workers": 2},  # an older version's: no "ran"
                          {"started_at": 20.0, "finished_at": 30.0, "workers": 3, "ran": ["grpo"]}]
    (out / "lab.json").write_text(json.dumps(lab))
    reproduce = write_report(out, figures=False)["reproduce"]
    assert reproduce["command"] == "entrorl lab --preset quick --workers 3 --rl-seed 0"
    items = {row["item"]: row["value"] for row in reproduce["machine"]["rows"]}
    assert items["train + eval time summed over methods (s)"] == "n/a"


def test_distributions_and_pass_rates_are_the_final_evaluations(report_run):
    """Token counts and the share of S (or D) below 0, every bin ending at or below 0 included, from the histograms;
    the mean pass rate; and the range of the share of prompts at 0 or 1 over the trained methods, the base model
    aside."""
    out, report, markdown, _ = report_run
    evaluations = {"base": json.loads((out / "base" / "final_eval.json").read_text())}
    evaluations.update({name: json.loads((out / "methods" / name / "final_eval.json").read_text())
                        for name in ("grpo", "clip_cov", "nsr")})
    rows = {row["model"]: row for row in report["distributions"]["table"]["values"]}
    ends = {}
    for model, evaluation in evaluations.items():
        counts = {key: np.array(value, dtype=float) for key, value in evaluation["distributions"].items()}
        assert rows[model]["tokens correct"] == counts["disc/correct"].sum()
        assert rows[model]["tokens wrong"] == counts["disc/wrong"].sum()
        below = BINS[1:] <= 0  # the bin [-0.02, 0] is below 0 too
        assert rows[model]["S<0 wrong"] == pytest.approx(counts["disc/wrong"][below].sum() / counts["disc/wrong"].sum())
        assert rows[model]["D<0 correct"] == pytest.approx(
            counts["disc_centered/correct"][below].sum() / counts["disc_centered/correct"].sum())
        rates = np.array(evaluation["pass_rates"])
        (shown,) = [r for r in report["pass_rates"]["values"] if r["model"] == model]
        assert shown["mean pass rate"] == pytest.approx(rates.mean())
        ends[model] = float(np.mean(rates == 0) + np.mean(rates == 1))
    trained = {model: share for model, share in ends.items() if model != "base"}
    assert report["distributions"]["shown_in_figure"] == ["base", "grpo", "nsr", "clip_cov"]  # highest ratio first
    low, high = min(trained, key=trained.get), max(trained, key=trained.get)
    assert (f"The base model has {fmt(ends['base'])} of its prompts at 0 or 1; after training that share ranges from "
            f"{fmt(trained[low])} ({low}) to {fmt(trained[high])} ({high}).") in " ".join(markdown.split())


def test_the_curves_and_the_ranges_stated_are_those_of_the_runs(report_run):
    """The start and end of each run in the curves table are the headline's; the sentences that give a range name
    the lowest value first."""
    _, report, markdown, _ = report_run
    numbers = {row["quantity"]: row["value"] for row in report["headline"]["numbers"]["rows"]}
    grpo = next(row for row in report["curves"]["rows"] if row["method"] == "grpo")
    assert grpo["entropy start"] == numbers["GRPO training entropy start"]
    assert grpo["entropy end"] == numbers["GRPO training entropy end"]
    assert grpo["reward start"] == numbers["GRPO training reward start"] != grpo["reward end"]
    assert grpo["reward end"] == numbers["GRPO training reward end"]
    said = " ".join(markdown.split())
    correlations = {row["method"]: row["correlation across steps"] for row in report["entropy_change"]["values"]}
    low, high = min(correlations, key=correlations.get), max(correlations, key=correlations.get)
    assert (f"The tabular prediction's correlation across steps ranges from {fmt(correlations[low])} ({low}) to "
            f"{fmt(correlations[high])} ({high}).") in said
    r2 = {name: law["fit"]["r2"] for name, law in report["law"]["fits"].items() if "fit" in law}
    low, high = min(r2, key=r2.get), max(r2, key=r2.get)
    assert f"R² ranges from {fmt(r2[low])} ({low}) to {fmt(r2[high])} ({high})" in said


def test_the_law_section_gives_the_median_forecast_rmse(tmp_path):
    out = build_run(tmp_path / "lab-rmse", methods=("grpo", "clip_cov", "nsr"), failed=())
    h = np.linspace(1.0, 0.5, 40)
    noise = np.random.default_rng(3).normal(0.0, 1.0, 40)
    for name, scale in (("grpo", 0.001), ("clip_cov", 0.002), ("nsr", 0.05)):  # the mean RMSE is far from the median
        _write_metrics(out / "methods" / name, h, -0.3 * np.exp(h) + 0.9 + scale * noise)
    report = write_report(out, figures=False)
    rmse = [report["law"]["fits"][name]["forecast"]["rmse"] for name in ("grpo", "clip_cov", "nsr")]
    assert fmt(np.median(rmse)) != fmt(np.mean(rmse))
    assert (f"the median forecast RMSE on the held-out steps is {fmt(np.median(rmse))} over 3 methods"
            in " ".join((out / "report.md").read_text().split()))


@pytest.mark.parametrize("measured_size, said", [(3e-3, "0.003 measured, a factor of about 10^4"),
                                                  (1e-3, "0.001 measured, a factor of about 10^4")])  # 10^3.7
def test_the_scales_of_predicted_and_measured_change_are_compared_over_their_non_zero_steps(tmp_path, measured_size, said):
    """The typical sizes are medians (one step predicting 10 times more does not move them) and the factor between
    them is rounded to the nearest power of ten."""
    out = build_run(tmp_path / "lab-scale", methods=("grpo",), failed=())
    steps = np.arange(20)
    sign = np.where(steps % 3 == 0, -1.0, 1.0)
    predicted = np.where(steps % 2 == 0, 0.0, 2e-7 * sign)  # half the steps predict no change
    predicted[-1] *= 10.0
    _write_metrics(out / "methods" / "grpo", np.linspace(1.0, 0.5, 20), np.full(20, 0.3),
                   entropy__predicted_delta=predicted, entropy__measured_delta=measured_size * sign)
    report = write_report(out, figures=False)
    assert report["section_errors"] == {}
    assert f"the tabular prediction's median size is 2e-07 nats a step against {said}." in " ".join(
        (out / "report.md").read_text().split())
    # the signs are compared on the 10 steps where the prediction is not 0
    (grpo,) = report["entropy_change"]["rows"]
    assert (grpo["steps"], grpo["sign agreement"]) == ("20", "1 of 10 steps")


def _set_evaluation(out: Path, path: str, **changes) -> dict:
    evaluation = json.loads((out / path / "final_eval.json").read_text())
    for key, value in changes.items():
        if key == "pass_at_k":
            evaluation["pass_at_k"].update(value)
        else:
            evaluation[key] = value
    _write(out / path / "final_eval.json", evaluation)
    return evaluation


def test_the_methods_that_kept_entropy_are_compared_with_grpo_and_the_base_model_each_in_its_own_column(tmp_path):
    """A kept method's row and sentence give its own Pass@1 and Pass@16 beside GRPO's and the base model's; the count
    sentence compares it with GRPO's values, then with the base model's (here they point in opposite directions)."""
    out = build_run(tmp_path / "lab-kept", methods=("grpo", "nsr"), failed=())
    steps = np.arange(20)
    _write_metrics(out / "methods" / "grpo", np.where(steps < 10, 1.0, 0.4), np.full(20, 0.3))  # ratio 0.4
    _write_metrics(out / "methods" / "nsr", np.full(20, 1.0), np.full(20, 0.3))  # ratio 1: kept
    _set_evaluation(out, "base", pass_at_k={"1": 0.9, "16": 0.5})
    _set_evaluation(out, "methods/grpo", pass_at_k={"1": 0.2, "16": 0.95})
    _set_evaluation(out, "methods/nsr", pass_at_k={"1": 0.5, "16": 0.9})
    headline = write_report(out, figures=False)["headline"]
    assert headline["kept_methods"] == ["nsr"]
    assert headline["kept"]["rows"] == [{"method": "nsr", "entropy end/start": "1", "Pass@1": "0.5", "Pass@1 GRPO": "0.2",
                                         "Pass@1 base": "0.9", "Pass@16": "0.9", "Pass@16 GRPO": "0.95",
                                         "Pass@16 base": "0.5"}]
    said = " ".join(headline["paragraphs"])
    assert ("1 of 1 method kept entropy: nsr (ratio 1: Pass@1 0.5, Pass@16 0.9). For comparison, GRPO has Pass@1 0.2 and "
            "Pass@16 0.95, the base model Pass@1 0.9 and Pass@16 0.5.") in said
    assert ("Against GRPO, the methods that kept entropy have 1 higher and 0 lower Pass@1 and 0 higher and 1 lower Pass@16; "
            "against the base model, 0 higher and 1 lower Pass@1 and 1 higher and 0 lower Pass@16 (comparing the values "
            "as shown).") in said
    markdown = (out / "report.md").read_text()
    assert "### Methods that kept entropy\n" in markdown and "| nsr | 1 | 0.5 | 0.2 | 0.9 | 0.9 | 0.95 | 0.5 |" in markdown


def test_the_summary_shows_pass_at_8_between_pass_at_1_and_the_largest_k_and_the_base_model_s_entropy(report_run):
    """Pass@8 sits between Pass@1 and Pass@16; the base row gives its evaluation entropy; the summary's text says
    'the last 10% of steps' from the finished runs' step counts (the failed one's 3 steps aside)."""
    _, report, markdown, _ = report_run
    columns = report["summary"]["columns"]
    assert columns[:7] == ["method", "status", "entropy end/start", "reward end", "Pass@1", "Pass@8", "Pass@16"]
    base = next(row for row in report["summary"]["rows"] if row["method"] == "base")
    assert base["status"] == "base" and base["eval entropy"] == fmt(EVAL_ENTROPY["base"])
    assert base["entropy end/start"] == base["law R²"] == base["train time (s)"] == "—"
    assert ("Entropy end/start: `entropy/mean` averaged over the last 10% of steps divided by its average over as many "
            "first steps; reward end: `reward/accuracy` over the last 10% of steps;") in " ".join(markdown.split())
    assert "forecast error, end: the law fitted on the first 20% of steps, its predicted minus" in " ".join(markdown.split())


def test_the_curves_table_gives_the_maximum_of_the_smoothed_reward_as_reached(tmp_path):
    """A reward that peaks mid-run and falls back: 'reward reached' is the peak of its moving average, not its end."""
    out = build_run(tmp_path / "lab-peak", methods=("grpo",), failed=())
    reward = np.concatenate([np.linspace(0.2, 0.8, 10), np.linspace(0.8, 0.4, 10)])
    _write_metrics(out / "methods" / "grpo", np.linspace(1.0, 0.5, 20), reward)
    (grpo,) = write_report(out, figures=False)["curves"]["rows"]
    assert grpo["reward reached"] == fmt(float(np.max(moving_average(reward))))
    assert (grpo["reward start"], grpo["reward end"]) == (fmt(np.mean(reward[:2])), fmt(np.mean(reward[-2:])))
    assert float(grpo["reward reached"]) > 0.7 > float(grpo["reward end"])


def test_the_headline_states_each_entropy_in_its_place(report_run, tmp_path):
    """GRPO's evaluation entropy is named as GRPO's and the base model's as the base model's, with their ratio; on the
    training curve, the end is said before the start; a reward edge that is missing is not compared."""
    _, report, _, _ = report_run
    assert ("compares the mean token entropy of the final evaluation's samples, 0.3, against the base model's on the same "
            "held-out prompts, 1 (ratio 0.3): it holds") in report["headline"]["paragraphs"][0]
    numbers = {row["quantity"]: row["value"] for row in report["headline"]["numbers"]["rows"]}
    assert numbers["collapse (final evaluation entropy ≤ 0.5 × the base model's)"] == "yes"
    assert (numbers["GRPO training entropy end"], numbers["GRPO training entropy end/start"]) == ("0.272", "0.257")
    out = build_run(tmp_path / "lab-curve", methods=("grpo",), failed=())
    steps = np.arange(20)
    _write_metrics(out / "methods" / "grpo", np.where(steps < 10, 1.0, 0.4), np.where(steps < 2, math.nan, 0.3))
    _set_evaluation(out, "base", entropy_mean=None)
    report = write_report(out, figures=False)
    assert report["section_errors"] == {}
    headline = report["headline"]
    assert "compares the training curve's end against its start (0.4 against 1): it holds" in headline["paragraphs"][0]
    numbers = {row["quantity"]: row["value"] for row in headline["numbers"]["rows"]}
    assert numbers["collapse (training entropy end ≤ 0.5 × start)"] == "yes"
    _write_metrics(out / "methods" / "grpo", np.where(steps < 10, 1.0, 0.6), np.where(steps < 2, math.nan, 0.3))
    headline = write_report(out, figures=False)["headline"]
    numbers = {row["quantity"]: row["value"] for row in headline["numbers"]["rows"]}
    assert headline["collapse"] is False and numbers["collapse (training entropy end ≤ 0.5 × start)"] == "no"
    assert "(0.6 against 1): it does not hold" in headline["paragraphs"][0]
    assert headline["reward_change"] == "cannot be compared (missing values)"


def test_failed_and_missing_methods_keep_their_place_and_are_counted_in_words(report_run, tmp_path):
    """Rows follow the run's order of methods, a failed one included; two methods that did not finish 'are' left
    out; the pointer to error.log is given when one of them failed, even if the other is only missing."""
    _, report, _, _ = report_run
    assert report["methods"]["kl_cov"]["steps"] == 3 and report["methods"]["grpo"]["steps"] == STEPS
    out = build_run(tmp_path / "lab-order", methods=("grpo", "kl_cov", "clip_b", "nsr"), failed=("kl_cov", "clip_b"))
    (out / "methods" / "clip_b" / "error.log").unlink()  # no error recorded: missing (interrupted)
    report = write_report(out, figures=False)
    assert [row["method"] for row in report["summary"]["rows"]] == ["base", "grpo", "kl_cov", "clip_b", "nsr"]
    assert [report["methods"][name]["status"] for name in ("kl_cov", "clip_b")] == ["failed", "missing"]
    for table in (report["summary"], report["failed"]):
        statuses = {row["method"]: row["status"] for row in table["rows"]}
        assert (statuses["kl_cov"], statuses["clip_b"]) == ("failed", "missing")
    (clip_b,) = [row for row in report["failed"]["rows"] if row["method"] == "clip_b"]
    assert clip_b["error (last line)"] == "no final_eval.json and no error.log (interrupted?)"
    assert ("2 methods did not finish and are left out of every comparison: kl_cov, clip_b. The full error of a failed "
            "one") in " ".join((out / "report.md").read_text().split())
    (out / "methods" / "kl_cov" / "error.log").unlink()
    write_report(out, figures=False)
    said = " ".join((out / "report.md").read_text().split())
    assert "2 methods did not finish and are left out of every comparison: kl_cov, clip_b." in said
    assert "The full error of a failed one" not in said


def test_the_default_preset_is_reproduced_with_make_lab(tmp_path):
    from entrorl.lab.presets import get_preset

    out = build_run(tmp_path / "lab-default", methods=tuple(get_preset("default").methods), failed=())
    lab = json.loads((out / "lab.json").read_text())
    lab["preset"]["name"] = "default"
    lab["preset"]["workers"] = lab["workers"]
    lab["preset"]["rescore"] = True  # a flag is written as recorded, not as a number
    (out / "lab.json").write_text(json.dumps(lab))
    reproduce = write_report(out, figures=False)["reproduce"]
    assert reproduce["command"] == "entrorl lab --preset default" and reproduce["make"] == "make lab"
    assert "Re-run with `entrorl lab --preset default` (or `make lab`);" in (out / "report.md").read_text()
    settings = {row["setting"]: row["value"] for row in reproduce["preset"]["rows"]}
    assert settings["rescore"] == "True" and settings["workers"] == "2" and settings["name"] == "default"
    assert settings["base"] == '{"hidden_size": 64}' and settings["methods"] == json.dumps(list(get_preset("default").methods))


def test_the_machine_table_without_a_finished_invocation(tmp_path):
    """Two invocations killed before their end: no wall clock (n/a, not 0), both named in words; their two worker
    counts are both listed; a base model trained with the same kernels is not named apart."""
    from entrorl.lab.report import CPU_KERNELS_LABEL, WALL_CLOCK_LABEL

    out = build_run(tmp_path / "lab-killed", methods=("grpo", "nsr"), failed=())
    lab = json.loads((out / "lab.json").read_text())
    lab["base_model_cpu_kernels"] = "AVX2"
    lab["invocations"] = [{"started_at": 0.0, "ran": ["grpo"], "workers": 2, "cpu_kernels": "AVX2"},
                          {"started_at": 10.0, "ran": ["nsr"], "workers": 3, "cpu_kernels": "AVX2"}]
    (out / "lab.json").write_text(json.dumps(lab))
    report = write_report(out, figures=False)
    items = {row["item"]: row["value"] for row in report["reproduce"]["machine"]["rows"]}
    assert items[WALL_CLOCK_LABEL] == "n/a" and items["invocations counted / in all"] == "0 / 2"
    assert items["workers"] == "2, 3" and items[CPU_KERNELS_LABEL] == "AVX2"
    assert "--workers" not in report["reproduce"]["command"]
    assert ("2 invocations recorded no end (the process was killed) and are not counted"
            in " ".join((out / "report.md").read_text().split()))


def test_prompts_never_and_always_solved_are_in_their_own_columns_and_a_fork_without_entropy_is_missing(tmp_path):
    out = build_run(tmp_path / "lab-ends", methods=("grpo",), failed=())
    _set_evaluation(out, "methods/grpo", pass_rates=[0.0, 0.0, 0.0, 1.0, 0.5],
                    forks=[{"token": "x", "before": "a", "after": "b"}])
    report = write_report(out, figures=False)
    (grpo,) = [row for row in report["pass_rates"]["rows"] if row["model"] == "grpo"]
    assert (grpo["prompts"], grpo["rate 0"], grpo["rate 1"], grpo["mixed"], grpo["mean pass rate"]) == ("5", "0.6", "0.2", "0.2", "0.3")
    assert report["forks"]["grpo"]["rows"] == [{"rank": "1", "token": "'x'", "entropy": "n/a", "context": "…a⟦x⟧b…"}]
    base = json.loads((out / "base" / "final_eval.json").read_text())["pass_rates"]
    share = fmt(np.mean(np.array(base) == 0) + np.mean(np.array(base) == 1))
    assert (f"The base model has {share} of its prompts at 0 or 1; after training that share ranges from 0.8 (grpo)"
            in " ".join((out / "report.md").read_text().split()))


def test_two_parts_that_never_acted_are_both_noted(tmp_path):
    out = build_run(tmp_path / "lab-two-idle", methods=("grpo", "clip_b"), failed=())
    zeros = np.zeros(STEPS)
    _write_metrics(out / "methods" / "clip_b", np.linspace(1.0, 0.5, STEPS), np.full(STEPS, 0.3),
                   select__clip_b_frac=zeros, reg__clip_b_coeff=zeros)
    report = write_report(out, figures=False)
    (row,) = [r for r in report["summary"]["rows"] if r["method"] == "clip_b"]
    assert row["note"] == (f"never acted: select/clip_b_frac = 0 at all {STEPS} steps; "
                           f"never acted: reg/clip_b_coeff = 0 at all {STEPS} steps")
    assert (f"1 method never applied its own intervention, or part of it, during training: clip_b (`select/clip_b_frac` "
            f"and `reg/clip_b_coeff` 0 at all {STEPS} steps)." in " ".join((out / "report.md").read_text().split()))


def test_a_model_without_fork_tokens_keeps_its_heading_and_says_so(tmp_path):
    out = build_run(tmp_path / "lab-no-forks", methods=("grpo",), failed=())
    _set_evaluation(out, "methods/grpo", forks=[])
    report = write_report(out, figures=False)
    assert report["forks"]["grpo"]["rows"] == [] and len(report["forks"]["base"]["rows"]) == 3
    assert "### grpo\n\nNo fork tokens recorded." in (out / "report.md").read_text()


def test_methods_follow_the_order_lab_json_records_before_the_preset_s(tmp_path):
    out = build_run(tmp_path / "lab-order-of-lab", methods=("grpo", "nsr"), failed=())
    lab = json.loads((out / "lab.json").read_text())
    lab["methods"] = ["nsr", "grpo"]  # every invocation's methods, in the order they were asked for
    (out / "lab.json").write_text(json.dumps(lab))
    report = write_report(out, figures=False)
    assert list(report["methods"]) == ["nsr", "grpo"]
    assert [row["method"] for row in report["summary"]["rows"]] == ["base", "nsr", "grpo"]


def test_the_summary_gives_each_model_s_own_pass_at_1_8_and_16(report_run):
    out, report, _, _ = report_run
    rows = {row["method"]: row for row in report["summary"]["rows"]}
    for model, path in (("base", "base"), ("grpo", "methods/grpo"), ("clip_cov", "methods/clip_cov"), ("nsr", "methods/nsr")):
        pass_at_k = json.loads((out / path / "final_eval.json").read_text())["pass_at_k"]
        assert [rows[model][f"Pass@{k}"] for k in (1, 8, 16)] == [fmt(pass_at_k[str(k)]) for k in (1, 8, 16)], model


def test_the_largest_k_is_one_the_base_model_has_too(tmp_path):
    out = build_run(tmp_path / "lab-base-ks", methods=("grpo", "nsr"), failed=())
    evaluation = json.loads((out / "base" / "final_eval.json").read_text())
    del evaluation["pass_at_k"]["16"]
    _write(out / "base" / "final_eval.json", evaluation)
    report = write_report(out, figures=False)
    assert report["rules"]["largest_k"] == 8
    assert report["pass_at_k"]["columns"] == ["model", "Pass@1", "Pass@2", "Pass@4", "Pass@8"]


def test_a_method_interrupted_by_the_runner_without_an_error_is_missing_not_failed(tmp_path):
    out = build_run(tmp_path / "lab-interrupted", methods=("grpo", "nsr"), failed=("nsr",))
    (out / "methods" / "nsr" / "error.log").unlink()
    _write(out / "outcomes.json", {"nsr": {"method": "nsr", "status": "interrupted", "step": 2}})
    report = write_report(out, figures=False)
    assert report["methods"]["nsr"]["status"] == "missing"
    # outcomes.json says how it stopped and where it saved: the report says so, and how to go on
    assert report["methods"]["nsr"]["error"] == ("interrupted, saved at step 2: running the laboratory's command again "
                                                 "continues it")


def test_one_method_s_forecast_rmse_is_not_said_over_1_methods(tmp_path):
    out = build_run(tmp_path / "lab-one", methods=("grpo",), failed=())
    h = np.linspace(1.0, 0.5, 40)
    _write_metrics(out / "methods" / "grpo", h, -0.3 * np.exp(h) + 0.9)
    write_report(out, figures=False)
    said = " ".join((out / "report.md").read_text().split())
    assert "over 1 method." in said and "over 1 methods" not in said


def test_an_evaluation_without_pass_at_k_leaves_the_others_columns_and_none_is_headed_pass_at_none(tmp_path):
    """The base evaluation has no pass_at_k: the methods' common ks still head the columns (the base's cells are n/a)."""
    out = build_run(tmp_path / "lab-no-k", methods=("grpo", "nsr"), failed=())
    evaluation = json.loads((out / "base" / "final_eval.json").read_text())
    del evaluation["pass_at_k"]
    _write(out / "base" / "final_eval.json", evaluation)
    report = write_report(out, figures=False)
    assert not any("None" in column for column in report["summary"]["columns"])
    assert not any("None" in column for column in report["headline"]["kept"]["columns"])


def test_token_counts_of_an_evaluation_without_distributions_are_missing_not_0(tmp_path):
    """'n/a = missing': an evaluation that recorded no S/D histograms has no token count (not 0)."""
    out = build_run(tmp_path / "lab-no-dist", methods=("grpo",), failed=())
    evaluation = json.loads((out / "base" / "final_eval.json").read_text())
    del evaluation["distributions"]
    _write(out / "base" / "final_eval.json", evaluation)
    report = write_report(out, figures=False)
    (base,) = [row for row in report["distributions"]["table"]["rows"] if row["model"] == "base"]
    assert base["tokens correct"] == base["tokens wrong"] == "n/a"


def test_the_collapse_and_kept_verdicts_agree_with_the_numbers_as_shown(tmp_path):
    """A verdict stated beside rounded numbers compares those numbers: GRPO's evaluation entropy 0.50004 against half
    the base model's 1.0 is shown as 0.5 against 0.5, so the collapse criterion (≤) holds; a ratio of 0.49999 against
    the kept threshold 1.25 × 0.4 = 0.5 is shown as 0.5 against 0.5, so the method kept entropy (≥)."""
    out = build_run(tmp_path / "lab-shown", methods=("grpo", "nsr"), failed=())
    steps = np.arange(20)
    _write_metrics(out / "methods" / "grpo", np.where(steps < 10, 1.0, 0.4), np.full(20, 0.3))  # ratio 0.4
    _write_metrics(out / "methods" / "nsr", np.where(steps < 10, 1.0, 0.49999), np.full(20, 0.3))
    _set_evaluation(out, "base", entropy_mean=1.0)
    _set_evaluation(out, "methods/grpo", entropy_mean=0.50004)
    headline = write_report(out, figures=False)["headline"]
    said = " ".join(headline["paragraphs"])
    assert headline["collapse"] is True
    assert "0.5, against the base model's on the same held-out prompts, 1 (ratio 0.5): it holds" in said
    assert headline["kept_methods"] == ["nsr"]
    assert "(1.25 × 0.4 = 0.5). 1 of 1 method kept entropy: nsr (ratio 0.5" in said


def test_an_agreement_cell_says_step_for_one_step_and_steps_for_more():
    from entrorl.analysis.document import agreement_cell

    assert agreement_cell(1.0, 1).text == "1 of 1 step" and agreement_cell(1.0, 1).value == 1.0
    assert agreement_cell(0.5, 2).text == "0.5 of 2 steps"
    assert agreement_cell(math.nan, 0).text == "n/a" and agreement_cell(math.nan, 0).value is None


def test_more_than_10_colours_take_the_strong_shades_first_then_their_light_pairs():
    import matplotlib

    from entrorl.analysis.document import colours

    names = [f"m{i}" for i in range(12)]
    got = colours(names)
    tab10, tab20 = matplotlib.colormaps["tab10"], matplotlib.colormaps["tab20"]
    assert [got[name] for name in names[:10]] == [tab20(2 * i) for i in range(10)] == [tab10(i) for i in range(10)]
    assert (got["m10"], got["m11"]) == (tab20(1), tab20(3))
    assert colours(names[:3]) == {name: tab10(i) for i, name in enumerate(names[:3])}


def test_a_table_s_json_keeps_every_row_as_text_and_as_value():
    from entrorl.analysis.document import Table, num, text

    table = Table(["i", "share"], title="t")
    for i in range(60):
        table.add([text(str(i)), num(i / 60)])
    data = table.to_json()
    assert data["title"] == "t" and data["columns"] == ["i", "share"]
    assert len(data["rows"]) == len(data["values"]) == 60
    assert data["rows"][59] == {"i": "59", "share": "0.983"} and data["values"][59] == {"i": "59", "share": 59 / 60}


def test_the_rules_in_report_json_are_the_documented_constants(report_run):
    _, report, _, _ = report_run
    assert report["rules"] == {
        "entropy_key": "entropy/mean", "reward_key": "reward/accuracy", "fallback_reward_key": "reward/mean",
        "edge_fraction": 0.1, "collapse_ratio": 0.5, "kept_margin": 1.25, "smoothing_window": 5,
        "law_fit_fraction": 0.2, "largest_k": 16,
        "number_format": "3 significant figures; whole numbers from 100; n/a = missing, — = not applicable",
    }


def test_the_summary_gives_each_method_s_own_evaluation_values_and_one_failed_method_is_left_out_in_the_singular(report_run):
    """Forgetting accuracy, evaluation entropy and train time of each row are that method's final evaluation's."""
    out, report, markdown, _ = report_run
    rows = {row["method"]: row for row in report["summary"]["rows"]}
    for index, name in enumerate(("grpo", "clip_cov", "nsr")):
        evaluation = json.loads((out / "methods" / name / "final_eval.json").read_text())
        assert rows[name]["forgetting acc"] == fmt(evaluation["forgetting_accuracy"]), name
        assert rows[name]["eval entropy"] == fmt(EVAL_ENTROPY[name]), name
        assert rows[name]["train time (s)"] == fmt(30.0 + index) == fmt(evaluation["train_seconds"]), name
    assert "1 method did not finish and is left out of every comparison: kl_cov." in " ".join(markdown.split())


def test_the_ranges_of_the_first_order_correlation_and_of_the_top_covariance_share_are_the_tables(report_run):
    """The first-order sentence gives the first-order correlation (only grpo recorded it); the covariance sentence
    ranges the smallest q's mean over steps, not its first step's value."""
    _, report, markdown, _ = report_run
    said = " ".join(markdown.split())
    (grpo,) = [row for row in report["entropy_change"]["rows"] if row["method"] == "grpo"]
    first_order = grpo["first order: correlation"]
    assert first_order != grpo["correlation across steps"]
    assert f"The first-order change's ranges from {first_order} (grpo) to {first_order} (grpo)." in said
    means = {row["method"]: row["top 0.02% mean"] for row in report["covariance"]["values"]}
    low, high = min(means, key=means.get), max(means, key=means.get)
    assert (f"the top 0.02% of tokens carry from {fmt(means[low])}× ({low}) to {fmt(means[high])}× ({high}) the mean "
            "covariance.") in said


def test_the_kept_count_is_out_of_every_other_finished_method_and_grpo_alone_is_compared_with_none(tmp_path):
    out = build_run(tmp_path / "lab-kept-one", methods=("grpo", "clip_cov", "nsr"), failed=())
    steps = np.arange(20)
    for name, end in (("grpo", 0.4), ("clip_cov", 0.45), ("nsr", 0.9)):  # threshold 0.5: nsr alone kept entropy
        _write_metrics(out / "methods" / name, np.where(steps < 10, 1.0, end), np.full(20, 0.3))
    headline = write_report(out, figures=False)["headline"]
    assert headline["kept_methods"] == ["nsr"]
    assert "(1.25 × 0.4 = 0.5). 1 of 2 methods kept entropy: nsr (ratio 0.9:" in " ".join(headline["paragraphs"])
    solo = build_run(tmp_path / "lab-solo", methods=("grpo", "nsr"), failed=("nsr",))
    headline = write_report(solo, figures=False)["headline"]
    assert headline["paragraphs"][1:] == ["No other method finished, so none is compared with GRPO."]


def test_grpo_without_an_evaluation_entropy_falls_back_to_its_curve_and_without_any_entropy_is_not_judged(tmp_path):
    out = build_run(tmp_path / "lab-no-eval-entropy", methods=("grpo", "nsr"), failed=())
    steps = np.arange(20)
    _write_metrics(out / "methods" / "grpo", np.where(steps < 10, 1.0, 0.4), np.full(20, 0.3))
    _set_evaluation(out, "methods/grpo", entropy_mean=None)  # the base model has one, GRPO's evaluation has not
    headline = write_report(out, figures=False)["headline"]
    numbers = {row["quantity"]: row["value"] for row in headline["numbers"]["rows"]}
    assert headline["collapse"] is True and numbers["collapse (training entropy end ≤ 0.5 × start)"] == "yes"
    assert "compares the training curve's end against its start (0.4 against 1): it holds" in headline["paragraphs"][0]
    records = [{"step": i + 1, "entropy/mean": None, "reward/accuracy": 0.3} for i in range(20)]
    (out / "methods" / "grpo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    report = write_report(out, figures=False)
    headline = report["headline"]
    assert report["section_errors"] == {}
    numbers = {row["quantity"]: row["value"] for row in headline["numbers"]["rows"]}
    assert headline["collapse"] is None and numbers["collapse (training entropy end ≤ 0.5 × start)"] == "n/a"
    assert "(n/a against n/a): it cannot be checked (missing entropy);" in headline["paragraphs"][0]
    assert headline["paragraphs"][1] == "GRPO's entropy ratio is undefined, so no method is compared with it."


def test_a_method_without_an_entropy_ratio_is_not_counted_as_keeping_entropy(tmp_path):
    out = build_run(tmp_path / "lab-no-ratio", methods=("grpo", "clip_cov", "nsr"), failed=())
    steps = np.arange(20)
    _write_metrics(out / "methods" / "grpo", np.where(steps < 10, 1.0, 0.4), np.full(20, 0.3))
    _write_metrics(out / "methods" / "clip_cov", np.full(20, 1.0), np.full(20, 0.3))
    records = [{"step": i + 1, "entropy/mean": None, "reward/accuracy": 0.3} for i in range(20)]
    (out / "methods" / "nsr" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    report = write_report(out, figures=False)
    assert report["section_errors"] == {}
    assert report["headline"]["kept_methods"] == ["clip_cov"]
    assert "1 of 2 methods kept entropy: clip_cov (ratio 1:" in report["headline"]["paragraphs"][1]


def test_an_intervention_logged_at_some_steps_is_said_idle_over_the_steps_it_was_logged(tmp_path):
    out = build_run(tmp_path / "lab-idle-part", methods=("grpo", "clip_b"), failed=())
    records = [{"step": i + 1, "entropy/mean": 1.0 - i / 80, "reward/accuracy": 0.3,
                "select/clip_b_frac": 0.0 if i < 30 else None} for i in range(STEPS)]
    (out / "methods" / "clip_b" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    report = write_report(out, figures=False)
    (row,) = [r for r in report["summary"]["rows"] if r["method"] == "clip_b"]
    assert row["note"] == "never acted: select/clip_b_frac = 0 at all 30 steps"
    assert ("1 method never applied its own intervention, or part of it, during training: clip_b (`select/clip_b_frac` "
            "0 at all 30 steps).") in " ".join((out / "report.md").read_text().split())


def test_each_idle_part_is_said_idle_over_the_steps_it_was_itself_logged(tmp_path):
    """Two parts of a method that never acted, logged at 40 and at 30 steps: the sentence gives each its own count, as
    the summary's note does."""
    out = build_run(tmp_path / "lab-idle-parts", methods=("grpo", "clip_b"), failed=())
    _write_metrics(out / "methods" / "clip_b", np.linspace(1, .5, 40), np.full(40, .3), select__clip_b_frac=np.zeros(40),
                   reg__clip_b_coeff=np.where(np.arange(40) < 30, 0.0, np.nan))
    report = write_report(out, figures=False)
    (row,) = [r for r in report["summary"]["rows"] if r["method"] == "clip_b"]
    assert row["note"].endswith("reg/clip_b_coeff = 0 at all 30 steps")
    assert ("clip_b (`select/clip_b_frac` 0 at all 40 steps and `reg/clip_b_coeff` 0 at all 30 steps)"
            in " ".join((out / "report.md").read_text().split()))


def test_evaluations_without_pass_at_k_are_not_said_to_be_missing(tmp_path):
    out = build_run(tmp_path / "lab-no-pass", methods=("grpo",), failed=())
    for path in ("base", "methods/grpo"):
        evaluation = json.loads((out / path / "final_eval.json").read_text())
        del evaluation["pass_at_k"]
        _write(out / path / "final_eval.json", evaluation)
    write_report(out, figures=False)
    assert "No Pass@k values: no final evaluation holds any." in (out / "report.md").read_text()
    for path in ("base/final_eval.json", "methods/grpo/final_eval.json"):
        (out / path).unlink()
    write_report(out, figures=False)
    assert "No Pass@k values: no final evaluation was found." in (out / "report.md").read_text()


def test_no_highest_ratio_is_named_when_no_other_method_has_an_entropy_ratio(tmp_path):
    out = build_run(tmp_path / "lab-no-ratio", methods=("grpo", "nsr"), failed=())
    (out / "methods" / "nsr" / "metrics.jsonl").write_text("")
    said = " ".join(write_report(out, figures=False)["headline"]["paragraphs"])
    assert "the highest ratio" not in said
    assert ("No other method has an entropy ratio (none logged its entropy at a start and at a later end of its run), so "
            "none kept entropy by this rule.") in said


def _set_eval_entropy(out: Path, model: str, entropy: float) -> None:
    path = out / ("base" if model == "base" else f"methods/{model}") / "final_eval.json"
    _write(path, {**json.loads(path.read_text()), "entropy_mean": entropy})


def test_the_collapse_verdict_is_the_ratio_s_as_printed_beside_it(tmp_path):
    """Base 0.2196 and GRPO 0.10996 nats: each side rounds to 0.11, but their ratio, printed 0.501, is above 0.5, so
    the criterion does not hold; a ratio printed 0.5 holds."""
    out = build_run(tmp_path / "lab-edge", methods=("grpo", "nsr"), failed=())
    for grpo, ratio, verdict in ((0.10996, "0.501", False), (0.10981, "0.5", True)):
        _set_eval_entropy(out, "base", 0.2196)
        _set_eval_entropy(out, "grpo", grpo)
        headline = write_report(out, figures=False)["headline"]
        numbers = {row["quantity"]: row["value"] for row in headline["numbers"]["rows"]}
        assert numbers["GRPO evaluation entropy / base"] == ratio
        assert headline["collapse"] is verdict
        assert f"(ratio {ratio}): it {'holds' if verdict else 'does not hold'}" in headline["paragraphs"][0]


def _without_base_eval_entropy(out: Path) -> None:
    """The collapse criterion then reads GRPO's training curve: no base evaluation entropy to compare with."""
    path = out / "base" / "final_eval.json"
    _write(path, {key: value for key, value in json.loads(path.read_text()).items() if key != "entropy_mean"})


def test_the_training_curve_s_collapse_verdict_needs_a_start_and_a_later_end(tmp_path):
    """On the training curve, one logged step has no end/start ratio, so no verdict (not 'does not hold' from a ratio
    of 1), and a start entropy of 0 has none either, said as such rather than as missing entropy; one logged reward is
    not said to have stayed the same."""
    out = build_run(tmp_path / "lab-curve", methods=("grpo", "nsr"), failed=())
    _without_base_eval_entropy(out)
    for entropy, reason in (([0.8], "one logged entropy, whose start is its end"),
                            ([0.0] * 10 + [0.3] * 10, "a start entropy of 0, of which no ratio is taken")):
        _write_metrics(out / "methods" / "grpo", entropy, np.linspace(0.2, 0.6, len(entropy)))
        headline = write_report(out, figures=False)["headline"]
        assert headline["collapse"] is None
        assert f"it cannot be checked ({reason})" in headline["paragraphs"][0]
    # nor is one logged reward said not to have changed: its start is its end too
    assert headline["reward_change"] == "rose"
    _write_metrics(out / "methods" / "grpo", [0.8], [0.3])
    headline = write_report(out, figures=False)["headline"]
    assert headline["reward_change"] == "cannot be compared (one logged reward, whose start is its end)"
    assert "the training reward cannot be compared (one logged reward" in headline["paragraphs"][0]


def test_a_method_with_one_logged_step_has_no_entropy_ratio_and_did_not_keep_entropy(tmp_path):
    """With one step, its start and its end are the same step: no end/start ratio (not 1), so the method is not said
    to have kept entropy; two steps are a start and an end."""
    out = build_run(tmp_path / "lab-one-step", methods=("grpo", "nsr", "clip_cov"), failed=())
    _write_metrics(out / "methods" / "grpo", np.linspace(1.0, 0.5, 20), np.linspace(0.2, 0.6, 20))
    _write_metrics(out / "methods" / "nsr", [0.8], [0.3])
    _write_metrics(out / "methods" / "clip_cov", [0.8, 0.8], [0.3, 0.3])
    report = write_report(out, figures=False)
    rows = {row["method"]: row for row in report["curves"]["values"]}
    assert rows["nsr"]["steps"] == 1 and rows["nsr"]["entropy end/start"] is None
    assert rows["clip_cov"]["entropy end/start"] == 1.0
    assert report["headline"]["kept_methods"] == ["clip_cov"]


def test_the_covariance_token_count_is_the_median_over_every_method_s_steps(tmp_path):
    """GRPO's 20 steps of 1000 tokens and another method's 3 of 5000: the median over the 23 steps is 1000, not the
    median of the two methods' medians (3000)."""
    out = build_run(tmp_path / "lab-cov", methods=("grpo", "nsr"), failed=())
    for name, steps, tokens in (("grpo", 20, 1000.0), ("nsr", 3, 5000.0)):
        _write_metrics(out / "methods" / name, np.linspace(1.0, 0.5, steps), np.linspace(0.2, 0.6, steps),
                       cov__n_tokens=np.full(steps, tokens))
    write_report(out, figures=False)
    assert "A step has 1000 response tokens (median over steps and methods)" in (out / "report.md").read_text()


def _stepped(ratio: float, steps: int = 20) -> np.ndarray:
    """Entropy 1, then ``ratio`` over the last 10% of the steps: an end/start ratio of exactly ``ratio``."""
    entropy = np.ones(steps)
    entropy[-max(1, steps // 10):] = ratio
    return entropy


def test_the_kept_entropy_rule_s_equation_holds_as_printed_and_decides(tmp_path):
    """GRPO's ratio 0.3004 prints as 0.3: the threshold is 1.25 x 0.3 = 0.375 as printed, and a ratio of 0.375 is at
    it (kept), where 1.25 x 0.3004 = 0.3755 would have printed 0.376 beside '1.25 x 0.3'."""
    out = build_run(tmp_path / "lab-kept", methods=("grpo", "nsr"), failed=())
    for name, ratio in (("grpo", 0.3004), ("nsr", 0.375)):
        _write_metrics(out / "methods" / name, _stepped(ratio), np.linspace(0.2, 0.6, 20))
    headline = write_report(out, figures=False)["headline"]
    assert "(1.25 × 0.3 = 0.375)" in " ".join(headline["paragraphs"]) and headline["kept_methods"] == ["nsr"]


def test_ratios_as_far_above_the_collapse_threshold_as_below_are_both_near_it(tmp_path):
    out = build_run(tmp_path / "lab-near", methods=("grpo", "nsr"), failed=())
    _set_eval_entropy(out, "base", 1.0)
    # as printed, as the verdict takes it: 0.4496 and 0.4504 both read 0.45, 10% below the threshold
    for grpo, near in ((0.45, True), (0.55, True), (0.44, False), (0.56, False), (0.4496, True), (0.4504, True),
                       (0.5504, True), (0.5496, True), (0.4494, False)):
        _set_eval_entropy(out, "grpo", grpo)
        assert write_report(out, figures=False)["headline"]["near_threshold"] is near, grpo


def test_sentences_over_every_method_say_which_ones_have_no_value(tmp_path):
    """Forgetting changed alike 'for every method' only when each has a value; the kept methods' Pass@k counts say
    how many have none, rather than reading '0 higher and 0 lower' as equal."""
    out = build_run(tmp_path / "lab-missing", methods=("grpo", "nsr"), failed=())
    path = out / "methods" / "nsr" / "final_eval.json"
    evaluation = json.loads(path.read_text())
    _write(path, {**{key: value for key, value in evaluation.items() if key != "forgetting_accuracy"},
                  "pass_at_k": {key: None for key in evaluation["pass_at_k"]}})
    _write_metrics(out / "methods" / "grpo", _stepped(0.4), np.linspace(0.2, 0.6, 20))
    _write_metrics(out / "methods" / "nsr", _stepped(0.9), np.linspace(0.2, 0.6, 20))
    report = write_report(out, figures=False)
    said = (out / "report.md").read_text()
    assert "for every method with a forgetting accuracy (1 of 2)." in " ".join(said.split())
    assert report["headline"]["kept_methods"] == ["nsr"]
    assert "0 higher and 0 lower (1 n/a) Pass@1" in " ".join(report["headline"]["paragraphs"])


def test_the_covariance_columns_are_said_to_agree_only_where_the_counts_agree_at_every_step(tmp_path):
    """At the median 800 tokens the top 0.02% and 0.2% are one token each, but at a step of 1200 the top 0.2% is two:
    their columns need not agree, and the report does not say they do; at 800 tokens everywhere it does."""
    out = build_run(tmp_path / "lab-cov-agree", methods=("grpo", "nsr"), failed=())
    for sizes, agree in (([800.0] * 14 + [1200.0] * 6, False), ([800.0] * 20, True)):
        for name in ("grpo", "nsr"):
            _write_metrics(out / "methods" / name, np.linspace(1.0, 0.5, 20), np.linspace(0.2, 0.6, 20),
                           cov__n_tokens=np.array(sizes))
        write_report(out, figures=False)
        said = " ".join((out / "report.md").read_text().split())
        assert ("0.02% and 0.2% are the same tokens, so their columns agree" in said) is agree


def test_an_evaluation_whose_pass_at_k_is_no_mapping_leaves_the_report_standing(tmp_path):
    out = build_run(tmp_path / "lab-bad-pass", methods=("grpo", "nsr"), failed=())
    path = out / "methods" / "nsr" / "final_eval.json"
    _write(path, {**json.loads(path.read_text()), "pass_at_k": [0.3, 0.6]})
    report = write_report(out, figures=False)
    assert (out / "report.md").is_file() and report["methods"]["nsr"]["status"] == "ok"
    assert next(row for row in report["summary"]["rows"] if row["method"] == "nsr")["Pass@1"] == "n/a"


def test_the_law_section_ranges_r2_over_the_fits_that_have_one(tmp_path):
    out = build_run(tmp_path / "lab-r2", methods=("grpo", "nsr"), failed=())
    h = np.linspace(1.0, 0.5, 20)
    _write_metrics(out / "methods" / "grpo", h, -0.3 * np.exp(h) + 0.9)
    _write_metrics(out / "methods" / "nsr", [1.0, 0.5], [0.2, 0.4])  # two points: a fit without R²
    report = write_report(out, figures=False)
    assert report["section_errors"] == {}
    assert report["law"]["fits"]["nsr"]["fit"]["r2"] is None
    assert "R² ranges from 1 (grpo) to 1 (grpo)" in " ".join((out / "report.md").read_text().split())


def test_the_law_fit_fraction_recorded_in_the_preset_is_the_one_used_and_stated(tmp_path):
    out = build_run(tmp_path / "lab-quarter", methods=("grpo",), failed=())
    lab = json.loads((out / "lab.json").read_text())
    lab["preset"]["law_fit_fraction"] = 0.25
    (out / "lab.json").write_text(json.dumps(lab))
    report = write_report(out, figures=False)
    assert report["rules"]["law_fit_fraction"] == report["law"]["fit_fraction"] == 0.25
    assert report["law"]["fits"]["grpo"]["forecast"]["n_fit"] == STEPS // 4
    assert "the law fitted on the first 25% of steps" in " ".join((out / "report.md").read_text().split())


@pytest.mark.parametrize("invocations, workers, flag", [
    ([{"started_at": 0.0, "finished_at": 5.0, "workers": 3, "ran": [], "base_evaluated": True},  # evaluated the base
      {"started_at": 9.0, "finished_at": 9.5, "workers": 5, "ran": []}], "3", " --workers 3"),  # found all done
    ([{"started_at": 0.0, "finished_at": 5.0, "workers": 3, "ran": ["grpo"]},
      {"started_at": 9.0, "finished_at": 19.0, "workers": 4, "ran": ["nsr"]}], "3, 4", ""),  # no single count to name
])
def test_the_workers_named_are_those_of_the_invocations_that_did_something(tmp_path, invocations, workers, flag):
    out = build_run(tmp_path / "lab-workers", methods=("grpo", "nsr"), failed=())
    lab = json.loads((out / "lab.json").read_text())
    lab["invocations"] = invocations
    (out / "lab.json").write_text(json.dumps(lab))
    reproduce = write_report(out, figures=False)["reproduce"]
    items = {row["item"]: row["value"] for row in reproduce["machine"]["rows"]}
    assert items["workers"] == workers
    assert reproduce["command"] == "entrorl lab --preset quick --methods grpo,nsr" + flag


def test_an_empty_error_log_marks_a_failure_and_an_evaluation_that_is_not_an_object_is_no_evaluation(tmp_path):
    out = build_run(tmp_path / "lab-odd-files", methods=("grpo", "nsr", "kl_cov"), failed=("kl_cov",))
    (out / "methods" / "kl_cov" / "error.log").write_text("")  # killed before it wrote a line
    (out / "methods" / "nsr" / "final_eval.json").write_text("[1, 2]")
    (out / "base" / "final_eval.json").write_text("[1, 2]")
    report = write_report(out, figures=False)
    assert report["section_errors"] == {}
    assert (report["methods"]["kl_cov"]["status"], report["methods"]["kl_cov"]["error"]) == ("failed", "error.log is empty")
    assert report["methods"]["nsr"]["status"] == "missing"
    assert [row["method"] for row in report["summary"]["rows"]] == ["grpo", "nsr", "kl_cov"]


def test_a_run_without_a_base_evaluation_writes_every_section_without_the_base_model(tmp_path):
    out = build_run(tmp_path / "lab-no-base", methods=("grpo", "nsr"), failed=())
    (out / "base" / "final_eval.json").unlink()
    report = write_report(out, figures=False)
    assert report["section_errors"] == {}
    assert [row["method"] for row in report["summary"]["rows"]] == ["grpo", "nsr"]
    assert [row["model"] for row in report["pass_rates"]["rows"]] == ["grpo", "nsr"]
    assert "The base model has" not in (out / "report.md").read_text()
    assert report["headline"]["collapse"] is not None  # judged on GRPO's training curve


def test_markdown_escaping_covers_headings_emphasis_edge_underscores_and_line_breaks():
    """Markdown-significant characters are backslash-escaped (a leading ``#`` would make a heading, ``*`` emphasis);
    an underscore is escaped at a word's edge but not inside a word (``snake_case``); a line break becomes ``↵`` so a
    table cell stays on its row."""
    from entrorl.analysis.document import Table, md_escape, text

    assert md_escape("# a *b* _c_ snake_case x_\nnext") == "\\# a \\*b\\* \\_c\\_ snake_case x\\_↵next"
    assert md_escape("_lead and trail_") == "\\_lead and trail\\_"
    table = Table(["token"])
    table.add([text("line one\nline two")])
    assert table.to_markdown().splitlines() == ["| token |", "|---|", "| line one↵line two |"]


def test_headings_navigation_and_figure_captions_are_escaped_in_markdown_and_html():
    """Every piece of text reaches the document escaped: a table title (a Markdown heading), the section titles of the
    HTML navigation, and a figure's caption in its ``alt`` attribute, where a quote would end the attribute."""
    from entrorl.analysis.document import FigureBlock, Heading, Section, render_html, render_markdown

    section = Section("forks", "Forks <top>")
    section.blocks.append(Heading("top *20%* of_tokens_"))
    section.blocks.append(FigureBlock("f.png", 'entropy "before" <and> after', b"\x89PNG"))
    markdown = render_markdown("run", [section])
    assert "### top \\*20%\\* of_tokens\\_" in markdown.splitlines()  # the inner underscore is in a word
    assert "![entropy \"before\" \\<and\\> after](figures/f.png)" in markdown
    document = render_html("run", [section])
    assert '<nav><a href="#forks">Forks &lt;top&gt;</a></nav>' in document
    assert ('<img alt="entropy &quot;before&quot; &lt;and&gt; after" src="data:image/png;base64,iVBORw==">'
            "<figcaption>entropy &quot;before&quot; &lt;and&gt; after</figcaption>") in document


def test_a_number_cell_keeps_a_plain_json_value_and_html_tables_have_a_head_and_a_body():
    """``num`` stores the value report.json writes: numpy numbers as Python ones, nan as None; the HTML table puts its
    column names in ``<thead>`` and its rows in ``<tbody>``."""
    from entrorl.analysis.document import Table, num, text

    cells = [num(np.float32(0.5)), num(np.int64(3)), num(math.nan), num(-math.inf, signed=True)]
    assert [cell.value for cell in cells] == [0.5, 3, None, None]
    assert [type(cell.value) for cell in cells[:2]] == [float, int]
    assert [cell.text for cell in cells] == ["0.5", "3", "n/a", "n/a"]
    table = Table(["a", "b"])
    table.add([text("x"), num(1)])
    assert table.to_html() == ('<table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td class="txt">x</td>'
                               '<td class="num">1</td></tr></tbody></table>')


def test_every_key_of_report_json_is_in_the_reports_guide(report_run):
    """docs/reports.md names each key `entrorl lab`'s report.json has, and those of its rules, methods, headline,
    law fits and reproduce sections."""
    _, report, _, _ = report_run
    guide = (Path(__file__).resolve().parents[1] / "docs" / "reports.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`([a-z_0-9]+)`", guide[guide.index("## `entrorl lab`"):]))
    documented |= set(re.findall(r"`([a-z_0-9]+)`", guide[guide.index("`law.fit` holds"):guide.index("## `entrorl lab`")]))
    written = {*report, *report["rules"], *report["methods"]["grpo"], *report["headline"], *report["law"],
               *report["law"]["fits"]["grpo"], *report["distributions"], *report["reproduce"]}
    assert written - documented == set()


def _falling_steps(n: int) -> list[dict]:
    return [{"step": i + 1, "entropy/mean": 1.0 - 0.05 * i, "reward/accuracy": 0.1 + 0.03 * i} for i in range(n)]


def test_a_lab_method_whose_final_eval_json_is_cut_short_is_not_said_to_have_none(tmp_path):
    """A laboratory method folder holding a final_eval.json that cannot be parsed (a write cut short, a full disk) is
    listed as 'no final_eval.json and no error.log (interrupted?)': the file is there; the report should say that it
    cannot be read (lab/report.py, _load_run)."""
    lab = tmp_path / "lab"
    method = lab / "methods" / "dapo"
    method.mkdir(parents=True)
    (lab / "lab.json").write_text(json.dumps({"preset": {"name": "quick"}, "methods": ["dapo"]}))
    (method / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _falling_steps(12)))
    (method / "final_eval.json").write_text('{"summary": {"avg_at_n": 0.5}, "pass_at_k": {"1": 0.')
    report = write_report(lab, figures=False)
    (row,) = report["failed"]["rows"]
    assert "no final_eval.json" not in row["error (last line)"], row


def test_the_lab_report_names_a_base_model_evaluation_it_cannot_read(tmp_path):
    """e2245dd names a lab method's final_eval.json that cannot be read; base/final_eval.json cut short is still
    dropped silently, while the report says 'One row per method and one for the base model' and draws 'the base
    model' as the dashed line."""
    lab = tmp_path / "lab"
    method = lab / "methods" / "dapo"
    method.mkdir(parents=True)
    (lab / "lab.json").write_text(json.dumps({"preset": {"name": "quick"}, "methods": ["dapo"]}))
    (method / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i + 1, "entropy/mean": 1.0 - 0.05 * i, "reward/accuracy": 0.1 + 0.03 * i}) + "\n"
        for i in range(12)))
    good = {"summary": {"avg_at_n": 0.5, "n_samples": 4}, "pass_at_k": {"1": 0.5, "4": 0.7}}
    (method / "final_eval.json").write_text(json.dumps(good))
    (lab / "base").mkdir()
    (lab / "base" / "final_eval.json").write_text(json.dumps(good)[:25])
    write_report(lab, figures=False)
    said = " ".join((lab / "report.md").read_text().split())
    assert "base/final_eval.json" in said



def test_a_collapse_ratio_close_to_the_threshold_is_said_to_be_one_seed_s(tmp_path):
    """GRPO's evaluation entropy at 0.539 of the base model's does not meet the criterion (≤ 0.5), but another training
    seed can: the headline says so and how to see the spread; at 0.3 or 0.7 it says nothing of the kind."""
    out = build_run(tmp_path / "lab-near", methods=("grpo",), failed=())
    steps = np.arange(20)
    _write_metrics(out / "methods" / "grpo", np.where(steps < 10, 1.0, 0.4), np.full(20, 0.3))
    _set_evaluation(out, "base", entropy_mean=1.0)
    for entropy, near in ((0.539, True), (0.46, True), (0.3, False), (0.7, False)):
        _set_evaluation(out, "methods/grpo", entropy_mean=entropy)
        headline = write_report(out, figures=False)["headline"]
        said = " ".join(headline["paragraphs"])
        assert headline["near_threshold"] is near
        assert ("another training seed can put it on the other side" in said) is near, said
        if near:
            assert f"That ratio, {entropy}, is within 10% of the threshold 0.5" in said
            assert "`--rl-seed 1`" in said and "scripts/lab_seed_spread.py" in said
