"""The benchmark scripts' own logic (argument checks, how ratios are formed, interruption), on stand-in workers or the
smallest sizes: the measurements themselves live in docs/benchmarks.md, not in tests."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    """The benchmark script ``name`` as a module (its ``main`` takes the command line as a list)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def _measurement(foreign_cpus: float) -> dict:
    """What a bench_trainer worker reports for one arm and round: two timed steps."""
    steps = [{"step_s": 0.1, "cpu_s": 0.1, "generate_s": 0.05, "update_s": 0.05, "diagnostics_s": None, "tokens": 16,
              "rows": 4, "reward_mean": 0.0} for _ in range(2)]
    return {"ok": True, "records": steps, "threads_seen": 1, "foreign_cpus": foreign_cpus, "steps_per_s": 10.0,
            "tokens_per_s": 160.0, "mean_completion_length": 4.0}


TINY_TRAINER_RUN = ["--steps", "2", "--warmup", "0", "--arms", "floor", "--hidden-size", "32", "--prompts-per-step",
                    "2", "--group-size", "2", "--max-new-tokens", "4"]


@pytest.mark.parametrize("arguments", [["--repeats", "0"], ["--tokens", "0"], ["--warmup", "-1"], ["--vocab", "1"],
                                       ["--timeout", "nan"]])
def test_token_stats_refuses_sizes_that_measure_nothing(arguments):
    with pytest.raises(SystemExit) as refused:
        _script("bench_token_stats").main(["--quick", *arguments, "--impl", "entrorl", "--skip-check"])
    assert refused.value.code == 2


def test_token_stats_runs_the_implementations_chosen_without_entrorl(capsys):
    status = _script("bench_token_stats").main(["--quick", "--impl", "naive", "--direction", "fwd", "--no-bf16"])
    said = capsys.readouterr().err
    assert status == 0 and "cannot be imported" not in said
    assert "[check] skipped: it compares entrorl's token_stats, which --impl leaves out" in said


def test_token_stats_cpu_ratio_is_the_median_of_the_paired_ratios(monkeypatch):
    """Like the wall-time one: calls whose CPU time doubles with their paired baseline's count as 1x."""
    bench = _script("bench_token_stats")
    timings = iter([(1.0, 1.0), (1.0, 1.0),  # (wall, CPU) of the paired logsumexp pass, then of the call: 1x
                    (1.0, 1.0), (2.0, 2.0),  # 2x
                    (10.0, 10.0), (10.0, 10.0)])  # 1x; the ratio of the medians would be 2x

    def timed(call):
        value = call()
        bench._FAULTS.append(0)
        return (value, *next(timings))

    monkeypatch.setattr(bench, "_timed", timed)
    result = bench._worker({"impl": "entrorl", "direction": "fwd", "vocab": 64, "tokens": 16, "dtype": "float32",
                            "seed": 0, "warmup": 0, "repeats": 3})
    assert result["ratio_vs_paired_logsumexp"] == pytest.approx(1.0)
    assert result["cpu_ratio_vs_paired_logsumexp"] == pytest.approx(1.0)


@pytest.mark.parametrize("foreign_cpus, disturbed", [(0.5, False), (1.5, True)])
def test_trainer_calls_a_round_disturbed_past_max_foreign_cpus(monkeypatch, capsys, foreign_cpus, disturbed):
    bench = _script("bench_trainer")
    monkeypatch.setattr(bench, "_spawn", lambda spec, timeout: _measurement(foreign_cpus))
    assert bench.main(["--rounds", "1", "--max-foreign-cpus", "1.0", *TINY_TRAINER_RUN]) == 0
    assert ("its timings are disturbed" in capsys.readouterr().err) == disturbed


def test_trainer_interrupted_reports_and_saves_the_rounds_it_finished(monkeypatch, capsys, tmp_path):
    bench = _script("bench_trainer")
    started = []

    def worker(spec, timeout):
        started.append(spec["round"])
        if len(started) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second round
        return _measurement(0.0)

    monkeypatch.setattr(bench, "_spawn", worker)
    saved = tmp_path / "bench.json"
    assert bench.main(["--rounds", "3", "--json", str(saved), *TINY_TRAINER_RUN]) == 130
    captured = capsys.readouterr()
    assert "interrupted: reporting the 1 finished measurement(s)" in captured.err and "floor" in captured.out
    assert started == [0, 1] and len(json.loads(saved.read_text())["results"]["floor"]) == 1


@pytest.mark.parametrize("arguments", [["--max-new-tokens", "0"], ["--measure-fraction", "1.5"], ["--timeout", "nan"],
                                       ["--json", "no/such/folder/bench.json"],
                                       # the arms share one batch shape and sampling, which the report's header states
                                       ["--entrorl-set", "rollout.group_size=4"], ["--entrorl-set", "rollout.top_p=0.9"],
                                       ["--entrorl-set", "rollout={group_size: 2}"]])
def test_trainer_refuses_bad_settings_before_any_round(monkeypatch, arguments):
    bench = _script("bench_trainer")
    monkeypatch.setattr(bench, "_spawn", lambda spec, timeout: pytest.fail("a round ran"))
    with pytest.raises(SystemExit) as refused:
        bench.main([*TINY_TRAINER_RUN, *arguments])
    assert refused.value.code == 2



def _trainer_worker_spec(bench, tmp_path, arm: str, **changes) -> dict:
    from entrorl.lab.tiny_model import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model", seed=0, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                                max_position_embeddings=64)
    bench.write_prompts(tmp_path / "prompts.jsonl", 64, 0)
    return {"arm": arm, "round": 0, "model_dir": str(model_dir), "prompts": str(tmp_path / "prompts.jsonl"),
            "work_dir": str(tmp_path), "threads": 1, "seed": 0, "lr": 1e-4, "prompts_per_step": 2, "group_size": 4,
            "max_new_tokens": 8, "warmup": 0, "steps": 2, "profile": False, "measure_fraction": None,
            "entrorl_set": [], **changes}


def test_trainer_counts_every_token_sampled_with_dynamic_sampling(monkeypatch, tmp_path):
    """With dynamic sampling a step samples up to max_sampling_rounds batches: its completion tokens are all of them,
    the dropped groups' included, as its time is, not the kept rows' alone."""
    import torch

    from entrorl.rewards import base
    from entrorl.trainer import Trainer

    bench = _script("bench_trainer")
    sampled, collect = [], Trainer.collect

    def counting(self):
        scored = collect(self)
        sampled.append(scored.sampled_tokens)
        return scored

    monkeypatch.setattr(Trainer, "collect", counting)
    monkeypatch.delitem(base._REGISTRY, bench.REWARD_NAME, raising=False)  # the worker registers it
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    monkeypatch.setattr(bench, "bench_reward", lambda prompt, completion, answer, /, **meta: 0.0)  # no group informative
    spec = _trainer_worker_spec(bench, tmp_path, "entrorl-nodiag", entrorl_set=["rollout.dynamic_sampling=true"])
    records = bench.worker_entrorl(spec)["records"]
    assert [record["tokens"] for record in records] == sampled
    # three rounds of the batch's 8 rows, each at most 8 tokens long: the mean length stays a length
    assert [record["rows"] for record in records] == [3 * 2 * 4] * 2
    assert all(record["rows"] <= record["tokens"] <= 8 * record["rows"] for record in records)


def test_trainer_profiles_trl_s_timed_steps_without_a_warm_up(monkeypatch, tmp_path, capsys):
    pytest.importorskip("trl")
    import torch

    bench = _script("bench_trainer")
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    result = bench.worker_trl(_trainer_worker_spec(bench, tmp_path, "trl", steps=1, profile=True))
    assert result["timed_steps"] == 1 and "profile of the timed steps: trl" in capsys.readouterr().err


@pytest.mark.parametrize("arguments", [["--tokens", "0"], ["--vocab", "0"], ["--repeats", "0"], ["--hidden", "-2"],
                                       ["--threads", "0"]])
def test_fused_head_refuses_sizes_that_measure_nothing(arguments):
    with pytest.raises(SystemExit) as refused:
        _script("bench_fused_head").main(["--quick", *arguments])
    assert refused.value.code == 2


@pytest.mark.parametrize("direction", ["fwd+bwd", "fwd"])
def test_fused_head_arms_compute_the_float64_statistics(direction):
    """Each arm's worker, run in this process at a small size whose tiles and row chunks both split the head: every
    arm's log-probs and entropies are the float64 ones."""
    bench = _script("bench_fused_head")
    for arm in bench.ARMS:
        result = bench._worker({"arm": arm, "direction": direction, "dtype": "float32", "vocab": 5000, "hidden": 8,
                                "tokens": 1200, "repeats": 1, "seed": 0, "threads": None})
        assert result["status"] == "ok" and result["max_error"] < 1e-4, (arm, result)


def test_fused_head_ratios_are_over_the_dense_arm_and_a_wrong_arm_fails_the_run(monkeypatch, capsys):
    bench = _script("bench_fused_head")
    seconds = {"dense": 2.0, "fused": 1.0, "fused-rows": 4.0}

    def stand_in(spec, timeout):
        error = 0.5 if spec["arm"] == "fused-rows" and spec["direction"] == "fwd" else 1e-6
        return {"spec": spec, "status": "ok", "median_s": seconds[spec["arm"]], "extra_peak_mib": 1.0, "max_error": error}

    monkeypatch.setattr(bench, "_run_worker", stand_in)
    assert bench.main(["--vocab", "100", "--markdown"]) == 1
    table = capsys.readouterr()
    assert "| 100 | float32 | fwd+bwd | fused | 1.000 | 0.50x |" in table.out
    assert "| 100 | float32 | fwd+bwd | fused-rows | 4.000 | 2.00x |" in table.out
    assert "statistics are off from float64" in table.err
    monkeypatch.setattr(bench, "_run_worker", lambda spec, timeout: {**stand_in(spec, timeout), "max_error": 0.0})
    assert bench.main(["--vocab", "100"]) == 0


def test_fused_head_interrupted_keeps_the_arms_measured_in_the_interrupted_group(monkeypatch, capsys):
    """A Ctrl-C while the third arm runs: 'interrupted: the rows measured so far follow', then an empty table -- the
    dense and fused arms already measured sit in `results` and are only appended to `rows` after the last arm.
    (Seen with a real SIGINT: the table printed had no row.)"""
    bench = _script("bench_fused_head")

    def worker(spec, timeout):
        if spec["arm"] == "fused-rows":
            raise KeyboardInterrupt
        return {"spec": spec, "status": "ok", "median_s": 1.0, "extra_peak_mib": 1.0, "max_error": 0.0}

    monkeypatch.setattr(bench, "_run_worker", worker)
    assert bench.main(["--vocab", "100", "--direction", "fwd", "--markdown"]) == 130
    table = capsys.readouterr().out
    assert "| dense |" in table and "| fused |" in table, table


def test_fused_head_a_nan_error_fails_the_run(monkeypatch, capsys):
    """'the script exits with status 1 if one is off': an arm whose max error is NaN (NaN statistics) passes,
    because `nan > tolerance` is False."""
    bench = _script("bench_fused_head")
    monkeypatch.setattr(bench, "_run_worker", lambda spec, timeout: {
        "spec": spec, "status": "ok", "median_s": 1.0, "extra_peak_mib": 1.0,
        "max_error": float("nan") if spec["arm"] == "fused" else 0.0})
    assert bench.main(["--vocab", "100", "--direction", "fwd"]) == 1


def test_fused_head_worker_does_not_hide_nan_entropies_behind_the_log_prob_error(monkeypatch):
    """_worker takes max(logprob error, entropy error) with Python's max: a NaN entropy error second is dropped
    (max(1e-7, nan) == 1e-7), so an arm whose entropies are all NaN reports a tiny max error."""
    import torch

    bench = _script("bench_fused_head")
    real = bench._statistics

    def nan_entropy(arm, hidden, weight, targets):
        stats = real(arm, hidden, weight, targets)
        stats.entropy = stats.entropy * float("nan")
        return stats

    monkeypatch.setattr(bench, "_statistics", nan_entropy)
    result = bench._worker({"arm": "fused", "direction": "fwd", "dtype": "float32", "vocab": 300, "hidden": 8,
                            "tokens": 70, "repeats": 1, "seed": 0, "threads": None})
    error = result["max_error"]
    assert not (error <= 1e-3), error


@pytest.mark.parametrize("arguments", [["--samples", "0"], ["--rounds", "0"], ["--workers", "2", "0"]])
def test_code_reward_refuses_sizes_that_measure_nothing(arguments):
    with pytest.raises(SystemExit) as refused:
        _script("bench_code_reward").main(arguments)
    assert refused.value.code == 2


@pytest.mark.skipif(sys.platform != "linux", reason="the code reward's sandbox is Linux-only")
def test_code_reward_arms_score_the_batch_alike_and_report_the_speed_up(capsys):
    assert _script("bench_code_reward").main(["--samples", "5", "--rounds", "1", "--workers", "2", "--markdown"]) == 0
    table = capsys.readouterr().out
    assert "| 1 |" in table and "| 2 |" in table and "1.00x" in table


def test_code_reward_checks_every_round_s_verdicts_against_one_worker_s(monkeypatch):
    import torch

    import entrorl.rewards as rewards

    class Result:
        def __init__(self, scores):
            self.scores, self.errors, self.first_error = torch.tensor(scores), 0, None

    class Runner:
        def __init__(self, workers):
            self.workers, self.calls = workers, 0

        def __call__(self, prompts, completions, answers):
            self.calls += 1
            scores = [1.0] * len(completions)
            if self.workers == 2 and self.calls == 2:  # workers=2's second round differs (only the first was checked)
                scores[0] = 0.0
            return Result(scores)

    monkeypatch.setattr(rewards, "RewardRunner", Runner)
    monkeypatch.setattr(rewards, "get_reward", lambda name, workers: workers)
    assert _script("bench_code_reward").main(["--samples", "3", "--rounds", "2", "--workers", "2"]) == 1
