"""End-to-end trainer runs on a tiny model the tests build: CLI training, resume after kill -9, the
non-finite guard, and configuration / data errors that must fail before a model loads."""

from __future__ import annotations

import contextlib
import dataclasses
import copy
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import warnings
import zlib
from pathlib import Path

import pytest
import torch
import yaml

from entrorl.trainer import ConfigError, Trainer, TrainingStopped, load_config, read_metrics
from entrorl.trainer.config import apply_overrides, parse_set_option

REPO = Path(__file__).resolve().parents[1]


def make_config(model_dir: Path, train: Path, held_out: Path | None, **sections) -> dict:
    config = {
        "seed": 7,
        "torch_threads": 1,
        "model": {"path": str(model_dir)},
        "data": {"train": str(train), **({"eval": str(held_out)} if held_out else {})},
        "reward": {"name": "exact_match"},
        "rollout": {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 6, "temperature": 1.0},
        "method": "grpo",
        "optim": {"steps": 3, "lr": 1e-3},
        **({"eval": {"every": 0, "n": 2, "ks": [1, 2], "max_prompts": 3, "top_forks": 5}} if held_out else {}),
        "logging": {"progress": False},
        "checkpoint": {"every": 2, "keep": 2},
    }
    for key, value in sections.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and isinstance(config.get(key), dict) else value
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "entrorl.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env)


def invoke_cli(*args: str) -> subprocess.CompletedProcess:
    """:func:`run_cli` in this process (no interpreter start, no imports again): the command's exit status, standard
    output and standard error, with the traceback of an exception the command did not turn into an exit status. The
    command runs as ``app``, not ``main``: its warnings reach pytest's recorder, not its standard error."""
    import traceback

    from typer.testing import CliRunner

    from entrorl.cli import app

    numbers = [getattr(signal, name) for name in ("SIGHUP", "SIGINT", "SIGTERM", "SIGXCPU") if hasattr(signal, name)]
    handlers = {number: signal.getsignal(number) for number in numbers}
    try:  # the train command sets handlers a process of its own would keep until it ends
        result = CliRunner().invoke(app, list(args))
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, stderr)


# a reward that varies between the samples of a random-init model (0 or 1 by the completion's characters)
PARITY_REWARD = "def score(prompt, completion, answer, **meta):\n    return float(sum(map(ord, completion)) % 2)\n"


@contextlib.contextmanager
def importable_module(directory: Path, name: str, source: str):
    """Module ``name`` with ``source`` written into ``directory`` and importable inside the block (a test's reward,
    given to the config as ``name:score``)."""
    (directory / f"{name}.py").write_text(source)
    sys.path.insert(0, str(directory))
    try:
        yield
    finally:
        sys.path.remove(str(directory))


def comparable(records: list[dict]) -> list[dict]:
    """Metrics without wall-clock timings."""
    return [{k: v for k, v in record.items() if not k.startswith("time/")} for record in records]


class NaNLoss:
    """A trainer's objective whose loss is NaN (everything else is the objective's own): on every call, or only on the
    calls whose 0-based index is in ``calls``."""

    def __init__(self, objective, calls=None):
        self.objective, self.calls, self.count = objective, calls, 0

    def __call__(self, batch, **kwargs):
        out = self.objective(batch, **kwargs)
        if self.calls is None or self.count in self.calls:
            out.loss = out.loss * float("nan")
        self.count += 1
        return out

    def __getattr__(self, name):
        return getattr(self.objective, name)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "dapo+clip_b+forking_tokens"])
def test_cli_train_writes_metrics_checkpoints_and_diagnostics(tmp_path, tiny_model_dir, arithmetic_files, method):
    train, held_out = arithmetic_files
    config = write_config(tmp_path / "run.yaml", make_config(tiny_model_dir, train, held_out, method=method))
    run_dir = tmp_path / "run"
    result = run_cli("train", str(config), "--run-dir", str(run_dir), "--set", "optim.steps=2", "--set",
                     "logging.progress=true")
    assert result.returncode == 0, result.stderr
    assert f"run directory: {run_dir}\n" in result.stderr  # whole on its line, however long
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    last = records[-1]
    for key in ("reward/mean", "reward/accuracy", "entropy/mean", "entropy/p90", "entropy/predicted_delta",
                "entropy/measured_delta", "entropy/delta_token_corr", "cov/top_0.2pct_mean", "disc/mean", "disc_centered/std",
                "loss/policy", "clip/ppo_frac", "response/length_mean", "train/grad_norm", "eval/pass_at_2"):
        assert key in last, key
    if method != "grpo":
        assert "select/clip_b_frac" in last and "select/forking_tokens_frac" in last
        assert 0.5 < last["select/forking_tokens_frac"] < 1.0
    checkpoint = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (checkpoint / "model" / "config.json").is_file() and (checkpoint / "trainer.pt").is_file()
    # the evaluation's line, and a closing line with what the run did and where its model is, from its files
    evaluation = (f"eval Avg@2 {last['eval/avg_at_n']:.3g}, Pass@1 {last['eval/pass_at_1']:.3g}, "
                  f"Pass@2 {last['eval/pass_at_2']:.3g}, solved by none {last['eval/frac_solved_none']:.3g} at step 2")
    assert f"train {method}: {evaluation}" in result.stderr
    first = records[0]
    assert (f"done: {run_dir}; entropy {first['entropy/mean']:.4g} (step 1) -> {last['entropy/mean']:.4g} (step 2); "
            f"reward {first['reward/mean']:.4g} (step 1) -> {last['reward/mean']:.4g} (step 2); {evaluation}; "
            f"model {checkpoint / 'model'}") in " ".join(result.stderr.split())
    forks = json.loads((run_dir / "forks" / "step_000002.json").read_text())
    assert len(forks) == 5 and {"token", "before", "after", "entropy", "samples", "chosen", "source"} <= set(forks[0])
    assert forks[0]["entropy"] >= forks[-1]["entropy"]
    # each decision point once: the n samples of a prompt share its first position, which is listed once for all
    assert len({(fork["source"], fork["position"], fork["before"]) for fork in forks}) == len(forks)
    assert all(fork["samples"] == sum(fork["chosen"].values()) for fork in forks)
    # the run's report, from its files: every section generated, the numbers those of the files
    result = run_cli("report", str(run_dir), "--no-figures")
    assert result.returncode == 0, result.stderr
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert report["section_errors"] == {} and report["method"] == method and report["steps"] == 2
    assert [row["step"] for row in report["evaluations"]["values"]] == [2]
    assert report["evaluations"]["values"][0]["Avg@n"] == last["eval/avg_at_n"]
    assert [row["entropy"] for row in report["forks"]["latest"]["values"]] == [fork["entropy"] for fork in forks]
    assert f"report: {run_dir / 'report' / 'report.html'}" in " ".join(result.stderr.split())


def environment_importing_from(folder) -> dict[str, str]:
    """This process's environment with ``folder`` first on the Python path (the rest of the path kept, so that a
    subprocess imports the entrorl under test), and ``folder/temporary`` as its temporary directory: a failing
    reward's traceback file lands there, not in the system's."""
    temporary = Path(folder) / "temporary"
    temporary.mkdir(exist_ok=True)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])),
            "TMPDIR": str(temporary)}


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(tmp_path, tiny_model_dir, arithmetic_files):
    train, held_out = arithmetic_files
    # exact match, slowed down so that the two steps after the step-4 checkpoint take far longer than the
    # polling interval below (a tiny model's step alone takes a few milliseconds)
    (tmp_path / "slow_reward.py").write_text(
        "import time\nfrom entrorl.rewards import exact_match\n\n"
        "def score(prompt, completion, answer, **meta):\n    time.sleep(0.03)\n    return exact_match(prompt, completion, answer, **meta)\n"
    )
    env = environment_importing_from(tmp_path)
    settings = make_config(tiny_model_dir, train, held_out, optim={"steps": 6, "lr": 1e-3, "mini_batches": 2},
                           method="adaptive_entropy", eval={"every": 3}, checkpoint={"every": 2, "keep": 3},
                           reward={"name": "slow_reward:score"})
    config = write_config(tmp_path / "run.yaml", settings)

    straight = tmp_path / "straight"
    finished = run_cli("train", str(config), "--run-dir", str(straight), env=env)
    assert finished.returncode == 0, finished.stderr

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, "-m", "entrorl.cli", "train", str(config), "--run-dir", str(interrupted)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while not (interrupted / "checkpoints" / "step_000004").is_dir():
        assert process.poll() is None and time.time() < deadline, "the run ended before its step-4 checkpoint"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert read_metrics(interrupted)[-1]["step"] < 6

    resumed = run_cli("train", str(config), "--run-dir", str(interrupted), "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert comparable(read_metrics(interrupted)) == comparable(read_metrics(straight))


def test_a_second_ctrl_c_during_the_first_ones_message_stops_the_run_and_is_not_a_reward_error(tmp_path):
    """Two Ctrl-C in quick succession while a reward runs: the first handler's rich print imports
    rich._emoji_codes on first use; the second SIGINT lands during that import, its own print finds the module
    half-initialised and raises ImportError, which escapes both handlers into the interrupted code (the reward).
    The second signal then did not stop the run, the reward was scored 0 for "ImportError: cannot import name 'EMOJI'
    from partially initialized module", and the step was checkpointed with it. The second signal stops at once."""
    script = textwrap.dedent("""
        import importlib.abc, importlib.util, signal, sys
        from rich.console import Console
        from entrorl.trainer import stop_signals

        class SignalDuringImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            # the second Ctrl-C arrives while rich._emoji_codes is being imported by the first handler's print
            def find_spec(self, name, path, target=None):
                if name != "rich._emoji_codes":
                    return None
                sys.meta_path.remove(self)
                self.real = importlib.util.find_spec(name)
                return importlib.util.spec_from_loader(name, self, origin=self.real.origin)
            def create_module(self, spec):
                return None
            def exec_module(self, module):
                signal.raise_signal(signal.SIGINT)
                self.real.loader.exec_module(module)

        assert "rich._emoji_codes" not in sys.modules
        sys.meta_path.insert(0, SignalDuringImport())
        received = []
        stop_signals.catch_stop_signals(received, Console(stderr=True))

        def reward():  # what the main thread was doing when Ctrl-C came
            signal.raise_signal(signal.SIGINT)
            return 1.0

        try:
            reward()
        except KeyboardInterrupt:
            print("OUTCOME: KeyboardInterrupt")
        except Exception as error:
            print(f"OUTCOME: {type(error).__name__}: {error}")
        else:
            print("OUTCOME: nothing")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    outcome = [line for line in result.stdout.splitlines() if line.startswith("OUTCOME:")]
    assert outcome == ["OUTCOME: KeyboardInterrupt"], (outcome, result.stderr[-2000:])


@pytest.mark.parametrize("error", [RuntimeError("reentrant call inside <_io.BufferedWriter name='<stderr>'>"),
                                   ImportError("cannot import name 'EMOJI' from partially initialized module")],
                         ids=["reentrant-write", "half-imported"])
def test_a_signal_that_interrupts_a_write_to_the_terminal_is_still_said_and_obeyed(tmp_path, capfd, monkeypatch, error):
    """A signal handler runs between two bytecodes of the main thread, possibly inside a write to stderr, where
    Python refuses a nested write, or inside the import a first print makes: the handlers then write to the file
    descriptor and still stop or exit; the console's error never reaches the interrupted code."""
    from entrorl.trainer import stop_signals

    class ConsoleInTheMiddleOfAWrite:
        file = None  # no descriptor of its own: standard error's

        def print(self, *args, **options):
            raise error

    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    received = []
    restore = stop_signals.catch_stop_signals(received, ConsoleInTheMiddleOfAWrite())
    try:
        signal.raise_signal(signal.SIGTERM)
        assert received == [signal.SIGTERM]
        with pytest.raises(SystemExit) as stopped:
            signal.raise_signal(signal.SIGTERM)
        assert stopped.value.code == 143
    finally:
        restore()
    said = capfd.readouterr().err
    assert "SIGTERM: finishing the current step, then saving a checkpoint" in said
    assert "SIGTERM again: stopping now, without waiting" in said

    exits = []
    monkeypatch.setattr(stop_signals.os, "_exit", exits.append)
    try:
        stop_signals.exit_at_once_on_another_signal(ConsoleInTheMiddleOfAWrite(), tmp_path)
        signal.raise_signal(signal.SIGINT)
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert exits == [130]
    assert f"SIGINT again: exiting now; the checkpoint is saved (continue with --resume --run-dir {tmp_path})" in \
        capfd.readouterr().err


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_saves_it_and_resume_loses_nothing(tmp_path, tiny_model_dir, arithmetic_files):
    """SIGINT (Ctrl-C, and SIGTERM likewise) does not throw away the steps since the last checkpoint: the step under
    way finishes and is saved, the command says how to continue and exits 128 + 2, and the resumed run equals one
    that was never interrupted."""
    train, _ = arithmetic_files
    (tmp_path / "slow_reward.py").write_text(
        "import time\nfrom entrorl.rewards import exact_match\n\n"
        "def score(prompt, completion, answer, **meta):\n    time.sleep(0.03)\n    return exact_match(prompt, completion, answer, **meta)\n"
    )
    env = environment_importing_from(tmp_path)
    settings = make_config(tiny_model_dir, train, None, optim={"steps": 8, "lr": 1e-3}, checkpoint={"every": 100},
                           reward={"name": "slow_reward:score"})
    config = write_config(tmp_path / "run.yaml", settings)
    straight = tmp_path / "straight"
    assert run_cli("train", str(config), "--run-dir", str(straight), env=env).returncode == 0

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, "-m", "entrorl.cli", "train", str(config), "--run-dir", str(interrupted)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while not (interrupted / "metrics.jsonl").is_file() or len(read_metrics(interrupted)) < 2:
        assert process.poll() is None and time.time() < deadline, "the run ended before its second step"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    lines = []
    for line in process.stderr:  # once it says so, all is saved: another Ctrl-C then ends it at once, without a traceback
        lines.append(line)
        if "interrupted by SIGINT" in line:
            process.send_signal(signal.SIGINT)
            break
    stderr = "".join(lines) + process.communicate(timeout=120)[1]
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    done = read_metrics(interrupted)[-1]["step"]
    assert 2 <= done < 8 and (interrupted / "checkpoints" / f"step_{done:06d}").is_dir()
    assert f"interrupted by SIGINT after step {done}" in stderr and "--resume" in stderr, stderr

    resumed = run_cli("train", str(config), "--run-dir", str(interrupted), "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step_{done:06d}" in resumed.stderr
    assert comparable(read_metrics(interrupted)) == comparable(read_metrics(straight))


def test_a_trainer_driven_step_by_step_logs_saves_and_is_refused_once_closed(tmp_path, tiny_model_dir,
                                                                           arithmetic_files):
    """A loop of one's own: train_step returns the metrics, log appends them to metrics.jsonl (which entrorl report
    reads), save checkpoints. Once closed (by close, or by train when it returns or raises), the trainer trains,
    evaluates, logs and saves no more, and says how to continue, before anything is sampled; a config that is no
    TrainConfig, or overrides given as one string, are named."""
    from entrorl.trainer.loggers import read_metrics

    train, held_out = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, held_out, optim={"steps": 2, "lr": 1e-3}))
    trainer = Trainer(config, run_dir=tmp_path / "run")
    for _ in range(2):
        metrics = trainer.train_step()
        trainer.log({**metrics, **trainer.evaluate()})
    trainer.save()
    assert repr(trainer) == f"Trainer('grpo', run_dir={str(tmp_path / 'run')!r}, step 2 of 2)"
    trainer.close()
    assert repr(trainer).endswith("step 2 of 2, closed)")
    assert [record["step"] for record in read_metrics(tmp_path / "run")] == [1, 2]
    assert "eval/avg_at_n" in read_metrics(tmp_path / "run")[-1]
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == read_metrics(tmp_path / "run")  # the file itself too
    sampled = []
    trainer.collect = lambda: sampled.append(True)  # nothing may be sampled by a closed trainer
    for call in (trainer.train_step, trainer.evaluate, trainer.save, trainer.train, lambda: trainer.log({"x": 1.0})):
        with pytest.raises(RuntimeError, match=r"is closed .*continue the run with a new Trainer\(config, "
                                               r"run_dir=\.\.\., resume=True\)"):
            call()
    assert not sampled and trainer.step == 2 and len(read_metrics(tmp_path / "run")) == 2
    # train() closes the trainer when it returns: raising optim.steps and calling it again is refused, not half-run
    resumed = Trainer(config.model_copy(update={"optim": config.optim.model_copy(update={"steps": 3})}),
                      run_dir=tmp_path / "run", resume=True)
    resumed.train()
    with pytest.raises(RuntimeError, match="is closed"):
        resumed.train()
    with pytest.raises(TypeError, match=r"Trainer takes a TrainConfig, got dict: build one with load_config"):
        Trainer(make_config(tiny_model_dir, train, None), run_dir=tmp_path / "other")
    with pytest.raises(TypeError, match=r"overrides is a list of key=value strings, got the string 'optim.lr=0.1'"):
        load_config(make_config(tiny_model_dir, train, None), "optim.lr=0.1")


def test_nonfinite_guard_skips_then_stops_with_checkpoint_intact(tmp_path, tiny_model_dir, arithmetic_files, monkeypatch):
    train, _ = arithmetic_files
    with importable_module(tmp_path, "parity_guard_reward", PARITY_REWARD):  # rewards that vary: the first step trains
        config = load_config(make_config(tiny_model_dir, train, None, checkpoint={"every": 1},
                                         reward={"name": "parity_guard_reward:score"},
                                         optim={"steps": 5, "lr": 1e-3, "max_consecutive_nonfinite": 2, "micro_batch_size": 3}))
        trainer = Trainer(config, run_dir=tmp_path / "run")
    first = trainer.train_step()
    saved = trainer.save()
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    monkeypatch.setattr(trainer, "objective", NaNLoss(trainer.objective))
    metrics = trainer.train_step()
    assert metrics["train/skipped_updates"] == 1
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    # no update happened, so none is predicted; every row's entropy was still scored (no zeros from the break)
    assert metrics["entropy/predicted_delta"] == 0.0 and "loss/policy" not in metrics
    assert metrics["entropy/p10"] > 0 and metrics["entropy/measured_delta"] == pytest.approx(0.0, abs=1e-6)
    # the weights' norm is logged every step, and was not moved by the skipped update
    assert metrics["train/weight_norm"] == first["train/weight_norm"] != trainer.weight_norm_at_start
    norm = f"{first['train/weight_norm']:.4g}"
    with pytest.raises(TrainingStopped, match=r"2 steps in a row \(steps 2-3\) had a non-finite loss or gradient.*The last "
                       rf"checkpoint, .*step_000001, is intact. The trained weights' norm: {norm} now, "
                       rf"{trainer.weight_norm_at_start:.4g} at the start of the run, {norm} in step_000001 \(") as stopped:
        trainer.train_step()
    assert (saved / "trainer.pt").is_file()
    assert "bfloat16" not in str(stopped.value) and "model.dtype" not in str(stopped.value)  # a float32 run
    assert stopped.value.step == 3 and stopped.value.metrics["train/skipped_total"] == 2
    # run by train(), the step that stops the run is written to metrics.jsonl (train_step alone logs nothing)
    with pytest.raises(TrainingStopped, match=r"had a non-finite loss or gradient"):
        trainer.train()
    (record,) = read_metrics(tmp_path / "run")
    assert record["step"] == 3 and record["train/skipped_updates"] >= 1 and record["train/skipped_total"] == 3
    assert record["train/updates"] == 0 and "reward/mean" in record
    assert record["train/weight_norm"] == pytest.approx(first["train/weight_norm"])  # the norm its message quotes


def test_a_model_that_gives_nan_log_probs_is_not_evaluated(tmp_path, tiny_model_dir, arithmetic_files):
    """NaN logits draw token 0 at every position and score every sample wrong: `eval` and a run's evaluation say
    the model is broken instead of writing such a summary (and NaN into the samples' JSON)."""
    from typer.testing import CliRunner

    from entrorl.cli import app
    from entrorl.modeling import load_causal_lm, load_tokenizer

    train, held_out = arithmetic_files
    broken = tmp_path / "broken"
    model = load_causal_lm(tiny_model_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight.fill_(float("nan"))
    model.save_pretrained(broken)
    load_tokenizer(tiny_model_dir).save_pretrained(broken)
    out, samples = tmp_path / "eval.json", tmp_path / "samples.jsonl"
    result = CliRunner().invoke(app, ["eval", "--model", str(broken), "--data", str(held_out), "--n", "2",
                                      "--reward", "exact_match", "--max-new-tokens", "3", "--out", str(out),
                                      "--samples", str(samples)])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and re.search(r"the model gives inf or NaN log-probs to \d+ of its \d+ sampled tokens "
                                               r"\(weights that overflow, or a broken checkpoint\); "
                                               r"nothing was written", said), said
    assert not out.exists() and not samples.exists()
    audited = CliRunner().invoke(app, ["data", "audit", "--model", str(broken), "--data", str(held_out), "--n", "2",
                                       "--reward", "exact_match", "--max-new-tokens", "3", "--out", str(tmp_path / "aud")])
    said = " ".join(audited.output.split())
    assert audited.exit_code == 2 and said.endswith(f"a broken checkpoint); nothing was written into {tmp_path / 'aud'}")
    assert not (tmp_path / "aud").exists()
    config = load_config(make_config(broken, train, held_out, eval={"at_start": True, "n": 1, "ks": [1]}))
    with pytest.raises(TrainingStopped, match=r"^evaluating the model as loaded: the model gives inf or NaN log-probs "
                                              r"to \d+ of its \d+ sampled tokens .*a broken checkpoint\)$"):
        Trainer(config, run_dir=tmp_path / "run").train()
    # an update whose weights overflow the evaluation's forward (lr 1e10): the cause, and the step's record is kept
    with importable_module(tmp_path, "parity_eval_reward", PARITY_REWARD):
        config = load_config(make_config(tiny_model_dir, train, held_out, reward={"name": "parity_eval_reward:score"},
                                         optim={"steps": 3, "lr": 1e10}, eval={"every": 1, "n": 1, "ks": [1]}))
        with pytest.raises(TrainingStopped, match=r"^evaluating after the update of step 1 \(optim.lr = 1e\+10: too "
                                                  r"high\?\): the model gives inf or NaN .*No checkpoint had been "
                                                  r"written \(checkpoint.every\). The trained weights' norm: "):
            Trainer(config, run_dir=tmp_path / "huge").train()
    (record,) = read_metrics(tmp_path / "huge")
    assert record["step"] == 1 and record["train/weight_norm"] > 1e8 and "eval/avg_at_n" not in record


def test_a_model_that_overflows_in_float16_alone_is_said_to(tmp_path, tiny_model_dir, arithmetic_files):
    """Weights that train in float32 and bfloat16 but whose activations pass float16's 65504: the stop read as a
    broken model ("the model as loaded gives inf or NaN log-probs"); it now names float16's range and the setting
    that loads the model in another type (model.dtype for a run, --dtype for eval and data audit)."""
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from entrorl.cli import app
    from entrorl.modeling import load_tokenizer

    train, held_out = arithmetic_files
    overflowing = tmp_path / "overflowing"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(30000.0)
        model.model.embed_tokens.weight.mul_(2.0)
    model.save_pretrained(overflowing)
    load_tokenizer(tiny_model_dir).save_pretrained(overflowing)
    said = r"; the model computes in float16, whose largest number is 65504: activations past it overflow where " \
           r"bfloat16 and float32 do not \({} bfloat16 or float32\)"
    settings = make_config(overflowing, train, held_out, optim={"steps": 1}, checkpoint={"every": 0})
    with pytest.raises(TrainingStopped, match=r"^the model as loaded gives inf or NaN log-probs to \d+ of its \d+ "
                                              r"sampled tokens" + said.format("model.dtype:") + "; stopping"):
        Trainer(load_config({**settings, "model": {"path": str(overflowing), "dtype": "float16"}}),
                run_dir=tmp_path / "f16").train()
    with pytest.raises(TrainingStopped, match=r"^evaluating the model as loaded: .*" + said.format("model.dtype:") + "$"):
        Trainer(load_config({**settings, "model": {"path": str(overflowing), "dtype": "float16"},
                             "eval": {"at_start": True, "n": 1, "ks": [1]}}), run_dir=tmp_path / "f16-eval").train()
    trained = Trainer(load_config(settings), run_dir=tmp_path / "f32")  # float32: the same weights train
    assert math.isfinite(trained.train_step()["entropy/mean"])
    trained.close()
    common = ["--model", str(overflowing), "--data", str(held_out), "--n", "2", "--reward", "exact_match",
              "--max-new-tokens", "3", "--dtype", "float16"]
    for command in (["eval", *common], ["data", "audit", *common, "--out", str(tmp_path / "audit")]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2 and re.search(said.format("--dtype"), " ".join(result.output.split())), result.output


def test_an_update_that_breaks_the_weights_stops_the_run_naming_the_checkpoint_to_resume(tmp_path, tiny_model_dir,
                                                                                          arithmetic_files):
    """lr 1e10 with AdamW: a finite gradient steps the weights to about 1e10, finite, but the next forward overflows.
    The run stops with the cause instead of a traceback from the advantages; a checkpoint written after that update
    holds the broken weights and is named as such. An update to inf / NaN weights stops at once, before any save."""
    train, _ = arithmetic_files
    with importable_module(tmp_path, "parity_lr_reward", PARITY_REWARD):
        config = load_config(make_config(tiny_model_dir, train, None, reward={"name": "parity_lr_reward:score"},
                                         optim={"steps": 4, "lr": 1e10}, checkpoint={"every": 1}))
        trainer = Trainer(config, run_dir=tmp_path / "huge")
        assert trainer.train_step()["train/grad_norm"] > 0
        trainer.save()
        with pytest.raises(TrainingStopped, match=r"after the update of step 1 \(optim.lr = 1e\+10: too high\?\), the policy "
                           r"gives inf or NaN log-probs to \d+ of its \d+ sampled tokens.*step_000001, holds these weights; "
                           r"no checkpoint before it is left. The trained weights' norm: .* now, .* at the start of the run, "
                           r".* in step_000001 \(train/weight_norm"):
            trainer.train_step()
        assert trainer.weight_norm > 1e8 * trainer.weight_norm_at_start  # the blow-up the message points at

        config = load_config(make_config(tiny_model_dir, train, None, reward={"name": "parity_lr_reward:score"},
                                         optim={"steps": 4, "lr": 1e-3}, checkpoint={"every": 1}))
        trainer = Trainer(config, run_dir=tmp_path / "nan")
        original_step = trainer.optimizer.step

        def step_to_nan(*args, **kwargs):
            original_step(*args, **kwargs)
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = float("nan")

        trainer.optimizer.step = step_to_nan
        with pytest.raises(TrainingStopped, match=r"update of step 1 left 1 weight tensor\(s\) with inf or NaN values.*"
                                                  r"No checkpoint had been written"):
            trainer.train_step()
        trainer.close()

        # finite weights so large (1e30) that their float32 norm overflows are as broken: stopped before any save
        trainer = Trainer(config, run_dir=tmp_path / "overflow")
        original_step = trainer.optimizer.step

        def step_far(*args, **kwargs):
            original_step(*args, **kwargs)
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = 1e30

        trainer.optimizer.step = step_far
        with pytest.raises(TrainingStopped, match=r"update of step 1 moved the weights so far \(entries beyond about "
                                                  r"1e19\) that their norm overflows .* optim.lr = 0.001 is far too "
                                                  r"high for this model. Stopping. No checkpoint had been written"):
            trainer.train_step()


def test_skipped_updates_leave_adaptive_coefficients_and_count_per_step(tmp_path, tiny_model_dir, arithmetic_files, monkeypatch):
    """A skipped update does not move the adaptive entropy coefficient; with several mini-batches a step whose
    updates are all skipped counts once towards max_consecutive_nonfinite; the rate logged is the one applied."""
    train, _ = arithmetic_files
    method = {"method": "adaptive_entropy", "params": {"target_entropy": 10.0, "delta": 0.001, "max_coeff": 0.01}}
    config = load_config(make_config(tiny_model_dir, train, None, method=method,
                                     optim={"steps": 5, "lr": 1e-3, "mini_batches": 2, "warmup_steps": 4,
                                            "max_consecutive_nonfinite": 2}))
    trainer = Trainer(config, run_dir=tmp_path / "run")
    first = trainer.train_step()
    assert first["train/lr"] == pytest.approx(1e-3 / 4)  # warm-up: step 1 runs at a quarter of the rate
    coefficient = trainer.objective.state_dict()
    assert next(iter(coefficient.values()))["coefficient"] > 0  # entropy is below the target: the controller moved
    objective = trainer.objective
    monkeypatch.setattr(trainer, "objective", NaNLoss(objective))
    metrics = trainer.train_step()
    assert metrics["train/skipped_updates"] == 2 and trainer.consecutive_nonfinite == 1  # two updates, one step
    assert metrics["train/lr"] == pytest.approx(2e-3 / 4)
    assert objective.state_dict() == coefficient
    with pytest.raises(TrainingStopped, match="2 steps in a row"):
        trainer.train_step()


def test_adaptive_entropy_coefficient_moves_once_per_step_whatever_the_updates(tmp_path, tiny_model_dir, arithmetic_files):
    """Skywork-OR1's controller moves once per training step: four mini-batches, two epochs or micro-batches make more
    objective calls per step, not more coefficient steps."""
    train, _ = arithmetic_files
    method = {"method": "adaptive_entropy", "params": {"target_entropy": 10.0, "delta": 0.001}}
    for optim in ({}, {"mini_batches": 4}, {"mini_batches": 2, "epochs": 2}, {"micro_batch_size": 3}):
        config = load_config(make_config(tiny_model_dir, train, None, method=method, optim={"steps": 3, "lr": 1e-3, **optim}))
        trainer = Trainer(config, run_dir=tmp_path / f"run-{len(list(tmp_path.iterdir()))}")
        logged = [trainer.train_step() for _ in range(3)]
        assert [m["reg/adaptive_entropy_next_coeff"] for m in logged] == pytest.approx([0.001, 0.002, 0.003]), optim
        assert [m["reg/adaptive_entropy_coeff"] for m in logged] == pytest.approx([0.0, 0.001, 0.002]), optim


def test_correct_threshold_reaches_the_estimators_that_split_right_from_wrong(tmp_path, tiny_model_dir, arithmetic_files):
    """PSR trains on correct samples only; "correct" is the reward's threshold, the same as accuracy's, unless the
    estimator's own parameter says otherwise: then the main reward's scores are judged against it."""
    train, _ = arithmetic_files
    with importable_module(tmp_path, "half_reward", "def score(prompt, completion, answer, **meta):\n    return 0.5\n"):
        advantages = {}
        for label, threshold, params in (("default", None, {}), ("full marks", 1.0, {}),
                                         ("estimator's own", 1.0, {"correct_threshold": 0.5})):
            config = load_config(make_config(tiny_model_dir, train, None, method="psr", advantage={"params": params},
                                             reward={"name": "half_reward:score", "correct_threshold": threshold}))
            scored = Trainer(config, run_dir=tmp_path / label.replace(" ", "-").replace("'", "")).collect()
            advantages[label] = (scored.advantages.unique().tolist(), scored.metrics["reward/accuracy"])
    assert advantages == {"default": ([1.0], 1.0), "full marks": ([0.0], 0.0), "estimator's own": ([1.0], 0.0)}


VERDICT_REWARDS = """
import torch

def zero(prompt, completion, answer, **meta):
    return 0.0

def one(prompt, completion, answer, **meta):
    return 1.0

def seven_tenths(prompt, completion, answer, **meta):
    return 0.7

def minus_one_on_odd(prompt, completion, answer, **meta):
    return -1.0 if len(set(completion)) % 2 else 0.0

def same_embedding(texts):
    return torch.ones(len(texts), 4)
"""

CORRECT_FROM_THE_REWARD = {  # method and reward settings; what every sample's advantage must be, given its verdict
    # wrong answers that earned only the extra format reward: PSR must not reinforce them
    "psr, extra reward": ("psr", {"name": "verdicts:zero", "extra": [{"name": "verdicts:one", "weight": 1.0}]}, {}),
    # right answers pushed under the threshold by the overlong penalty: still +1
    "w_reinforce, overlong": ("w_reinforce", {"name": "verdicts:one", "overlong": {"max_length": 6, "cache_length": 6}},
                              {}),
    # full marks needed, and the unlikeliness rank scales all but one sample of a group below it
    "w_reinforce, unlikeliness": ("w_reinforce", {"name": "verdicts:one", "correct_threshold": 1.0,
                                                  "unlikeliness": {"beta_rank": 0.25}}, {}),
    # identical completions' embeddings divide every reward by the group's size
    "psr, diversity": ("psr", {"name": "verdicts:one", "diversity": {"enabled": True, "model": "verdicts:same_embedding"}},
                       {}),
    # an all-correct group has no Pass@k advantage, whatever an extra reward makes of its rewards
    "passk, extra reward": ("passk_advantage", {"name": "verdicts:one", "extra": [{"name": "verdicts:minus_one_on_odd",
                                                                                    "weight": 1.0}]}, {"k": 2}),
    # a float32 score of 0.7 at a threshold of 0.7 is correct for accuracy, and so for the estimators
    "psr, score at the threshold": ("psr", {"name": "verdicts:seven_tenths", "correct_threshold": 0.7}, {}),
    "nsr, score at the threshold": ("nsr", {"name": "verdicts:seven_tenths", "correct_threshold": 0.7}, {}),
}


@pytest.mark.parametrize("case", list(CORRECT_FROM_THE_REWARD))
def test_estimators_that_split_right_from_wrong_take_the_reward_s_verdicts_not_the_shaped_reward(
        tmp_path, tiny_model_dir, arithmetic_files, case):
    """PSR, NSR, W-REINFORCE and Pass@k judge a sample right or wrong as accuracy does: extra rewards, the overlong
    penalty, diversity and unlikeliness shaping change the training reward, not that verdict."""
    method, reward, params = CORRECT_FROM_THE_REWARD[case]
    expected = {"psr": lambda c: c.float(), "nsr": lambda c: c.float() - 1.0, "w_reinforce": lambda c: c.float() * 2 - 1,
                "passk_advantage": lambda c: torch.zeros(len(c))}[method]  # passk: every group here is all right
    train, _ = arithmetic_files
    with importable_module(tmp_path, "verdicts", VERDICT_REWARDS):
        config = load_config(make_config(tiny_model_dir, train, None, method=method, reward=reward,
                                         advantage={"params": params}))
        scored = Trainer(config, run_dir=tmp_path / "run").collect()
    assert scored.metrics["reward/accuracy"] == float(scored.correct.float().mean())
    assert not torch.equal(scored.rewards, scored.correct.float()) or "threshold" in case  # the reward was shaped
    torch.testing.assert_close(scored.advantages, expected(scored.correct))


VARIED_REWARD = ("import hashlib\n"
                 "def score(prompt, completion, answer, **meta):\n"
                 "    return (int(hashlib.md5(completion.encode()).hexdigest()[:8], 16) % 1000) / 999.0\n")


def _documented_metric_patterns() -> dict[str, re.Pattern]:
    """docs/metrics.md's keys (the backticked names of each table row's first cell), placeholders as patterns."""
    text = (REPO / "docs" / "metrics.md").read_text(encoding="utf-8")
    patterns = {}
    for cell in re.findall(r"^\| (`[^|]+`) \|", text, flags=re.M):
        for key in re.findall(r"`([^`]+)`", cell):
            patterns[key] = re.compile(re.escape(key).replace("<name>", "[^/]+").replace("<k>", r"\d+")
                                       .replace("<q>", r"[0-9.]+"))
    return patterns


def test_every_metric_a_run_logs_is_in_the_metrics_reference(tmp_path, tiny_model_dir, arithmetic_files):
    """docs/metrics.md is the contract of metrics.jsonl: runs that use every kind of part, dynamic sampling, extra and
    overlong rewards, unlikeliness, a reference model, several updates a step, the first-order change and evaluations
    log no key it does not list, and every key it names without a placeholder is logged by one of them (but the
    diversity embedder's two)."""
    train, held_out = arithmetic_files
    runs = [
        dict(method="dapo+clip_b+forking_tokens+tis+entropy_bonus", rollout={"dynamic_sampling": True},
             reward={"name": "parity_metrics:score", "extra": [{"name": "parity_metrics:score", "weight": 0.5}],
                     "overlong": {"max_length": 6, "cache_length": 3}},
             diagnostics={"first_order": True}, eval={"at_start": True}),
        dict(method="kl_cov+adaptive_entropy+lopti_reweight", optim={"steps": 1, "lr": 1e-3, "mini_batches": 2},
             reward={"name": "parity_metrics:score", "unlikeliness": {"beta_rank": 0.25}}),
        dict(method="grpo+kl_ref+entropy_advantage+clip_cov+icepop+clip_v",
             optim={"steps": 1, "lr": 1e-3, "epochs": 2, "micro_batch_size": 3}),
        dict(method="cispo+low_entropy_tokens"), dict(method="gspo+nsr"), dict(method="dual_clip"),
        dict(method="w_reinforce", model={"dtype": "float16"}),
    ]
    logged: set[str] = set()
    with importable_module(tmp_path, "parity_metrics", PARITY_REWARD), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index, sections in enumerate(runs):
            sections = {"reward": {"name": "parity_metrics:score"}, "optim": {"steps": 1, "lr": 1e-3}, **sections}
            config = load_config(make_config(tiny_model_dir, train, held_out, **sections))
            run = Trainer(config, run_dir=tmp_path / f"run-{index}").train()
            logged |= {key for record in read_metrics(run) for key in record}
    patterns = _documented_metric_patterns()
    undocumented = sorted(key for key in logged if not any(p.fullmatch(key) for p in patterns.values()))
    assert not undocumented, f"metrics missing from docs/metrics.md: {undocumented}"
    never_logged = sorted(key for key in patterns if "<" not in key and key not in logged)
    assert never_logged == ["reward/diversity_weight_mean", "time/diversity_s"], never_logged


def test_an_estimator_s_own_correct_threshold_judges_the_main_score_not_the_reward_with_its_extras(
        tmp_path, tiny_model_dir, arithmetic_files):
    """advantage.params.correct_threshold compares the main reward's scores (0.5 here, under 1.0: wrong), not the
    training reward that an extra reward raised to 1.5: PSR gives every sample 0."""
    train, _ = arithmetic_files
    with importable_module(tmp_path, "verdicts", VERDICT_REWARDS), importable_module(
            tmp_path, "half_reward", "def score(prompt, completion, answer, **meta):\n    return 0.5\n"):
        config = load_config(make_config(tiny_model_dir, train, None, method="psr",
                                         advantage={"params": {"correct_threshold": 1.0}},
                                         reward={"name": "half_reward:score", "correct_threshold": 0.5,
                                                 "extra": [{"name": "verdicts:one", "weight": 1.0}]}))
        scored = Trainer(config, run_dir=tmp_path / "run").collect()
    assert scored.rewards.unique().tolist() == [1.5] and scored.metrics["reward/accuracy"] == 1.0
    assert scored.advantages.unique().tolist() == [0.0]


def test_an_estimator_s_own_correct_threshold_never_counts_a_sample_whose_reward_failed(
        tmp_path, tiny_model_dir, arithmetic_files):
    """A signed reward (-1) that raises on some samples, PSR with correct_threshold 0: the failed samples score 0,
    which reaches the threshold, but a failure is wrong at any threshold (as in reward/accuracy), so PSR gives them 0,
    not the +1 of a right answer; an extra reward's failure leaves the main score's verdict standing."""
    failing = ("def score(prompt, completion, answer, **meta):\n"
               "    if sum(map(ord, completion)) % 2:\n        raise RuntimeError('flaky')\n    return -1.0\n"
               "def fails_on_even(prompt, completion, answer, **meta):\n"
               "    if sum(map(ord, completion)) % 2 == 0:\n        raise RuntimeError('extra')\n    return 0.0\n")
    train, _ = arithmetic_files
    with importable_module(tmp_path, "signed_flaky", failing):
        config = load_config(make_config(tiny_model_dir, train, None, method="psr",
                                         advantage={"params": {"correct_threshold": 0.0}},
                                         reward={"name": "signed_flaky:score", "max_failing_steps": 0,
                                                 "extra": [{"name": "signed_flaky:fails_on_even", "weight": 1.0}]}))
        scored = Trainer(config, run_dir=tmp_path / "run").collect()
    parities = [sum(map(ord, completion)) % 2 for completion in scored.completions]
    main_failed = torch.tensor([parity == 1 for parity in parities])
    assert bool(main_failed.any()) and bool((~main_failed).any()), parities
    assert scored.advantages[main_failed].unique().tolist() == [0.0]  # failed: never reinforced as right
    assert scored.advantages[~main_failed].unique().tolist() == [0.0]  # -1 < 0: wrong, extra's failure or not


@pytest.mark.parametrize("ranked_by", ["unlikely estimator, top_k", "unlikely estimator, top_p",
                                       "unlikeliness shaping, top_k"])
def test_the_unlikeliness_rank_is_the_policy_s_likelihood_when_the_sampler_filters(
        tmp_path, tiny_model_dir, arithmetic_files, ranked_by):
    """arXiv 2506.02355 ranks a group's samples by the old policy's likelihood. With rollout.top_k / top_p the
    sampler's log-probs are those of the truncated, renormalised distribution, whose ranks differ: the policy scores
    the responses instead, for the `unlikely` estimator and for reward.unlikeliness (shaping before any estimator)."""
    import hashlib

    from entrorl.advantages import compute_advantages, unlikeliness_shaped_rewards

    shaping = ranked_by.startswith("unlikeliness shaping")
    rollout = {"prompts_per_step": 3, "group_size": 6, "max_new_tokens": 6,
               **({"top_p": 0.1} if ranked_by.endswith("top_p") else {"top_k": 3})}
    sections = ({"reward": {"name": "varied:score", "unlikeliness": {"beta_rank": 0.5}}} if shaping else
                {"reward": {"name": "varied:score"}, "advantage": {"name": "unlikely"}})
    train, _ = arithmetic_files
    with importable_module(tmp_path, "varied", VARIED_REWARD):
        trainer = Trainer(load_config(make_config(tiny_model_dir, train, None, rollout=rollout, **sections)),
                          run_dir=tmp_path / "run")
        scored = trainer.collect()
    rollouts, mask = scored.rollouts, scored.rollouts.response_mask
    with torch.no_grad():
        logprob = trainer.token_stats(trainer.model, rollouts, torch.arange(len(rollouts)), need=("logprob",)).logprob
    lengths = mask.sum(-1).clamp(min=1)
    policy = ((logprob * mask).sum(-1) / lengths).float()
    sampler = (rollouts.sampler_log_probs.sum(-1) / lengths).float()
    if shaping:
        raw = torch.tensor([(int(hashlib.md5(c.encode()).hexdigest()[:8], 16) % 1000) / 999.0 for c in scored.completions])

        def ranked(seq_log_prob):
            return unlikeliness_shaped_rewards(raw, scored.group_ids, seq_log_prob, beta_rank=0.5).float()

        observed = scored.rewards
    else:
        def ranked(seq_log_prob):
            return compute_advantages("unlikely", scored.rewards, scored.group_ids, seq_log_prob=seq_log_prob)

        observed = scored.advantages
    torch.testing.assert_close(observed, ranked(policy), rtol=0, atol=1e-5)
    assert not torch.allclose(ranked(policy), ranked(sampler), atol=1e-3)  # the filter's ranks would differ
    assert trainer._sequence_log_probs(rollouts).tolist() == pytest.approx(policy.tolist(), abs=1e-5)


def test_a_step_whose_selectors_drop_every_token_is_reported_once(tmp_path, tiny_model_dir, arithmetic_files):
    """NSR keeps the negative advantages; given PSR's advantages (1 for a correct sample) and a reward that marks every
    sample correct, it keeps nothing, and the run says so once instead of silently training on nothing."""
    import io

    from rich.console import Console

    train, _ = arithmetic_files
    with importable_module(tmp_path, "always_right", "def score(prompt, completion, answer, **meta):\n    return 1.0\n"):
        config = load_config(make_config(tiny_model_dir, train, None, method="nsr", advantage={"name": "psr"},
                                         reward={"name": "always_right:score"},
                                         optim={"steps": 2, "lr": 1e-3}, checkpoint={"every": 0}))
        output = io.StringIO()
        Trainer(config, run_dir=tmp_path / "run", console=Console(file=output, width=200)).train()
    assert output.getvalue().count("dropped every token") == 1
    assert [m["select/dropped_frac"] for m in read_metrics(tmp_path / "run")] == [1.0, 1.0]


def test_an_rft_step_without_a_correct_sample_says_that_none_was_accepted(tmp_path, tiny_model_dir, arithmetic_files):
    """rft trains on the correct samples alone: a step with none trains on nothing, which the run says once, naming
    the reason (no sample accepted), not as a composition of selectors to check."""
    import io

    from rich.console import Console

    train, _ = arithmetic_files
    with importable_module(tmp_path, "always_wrong", "def score(prompt, completion, answer, **meta):\n    return 0.0\n"):
        config = load_config(make_config(tiny_model_dir, train, None, method="rft", reward={"name": "always_wrong:score"},
                                         optim={"steps": 2, "lr": 1e-3}, checkpoint={"every": 0}))
        output = io.StringIO()
        Trainer(config, run_dir=tmp_path / "run", console=Console(file=output, width=300)).train()
    said = output.getvalue()
    assert said.count("no sample was accepted") == 1 and "dropped every token" not in said
    assert [m["select/rejection_sampling_frac"] for m in read_metrics(tmp_path / "run")] == [1.0, 1.0]
    assert [m["loss/policy"] for m in read_metrics(tmp_path / "run")] == [0.0, 0.0]


def test_icepop_masking_every_token_is_reported_once(tmp_path, tiny_model_dir, arithmetic_files):
    """top_k = 1 makes every sampled token certain under the sampler's filtered distribution: IcePop's ratio is the
    trainer's probability of the token, below its band for this model, so it masks every token; said once."""
    import io

    from rich.console import Console

    train, _ = arithmetic_files
    with pytest.warns(UserWarning, match="compares the trainer's log-probs"):
        config = load_config(make_config(tiny_model_dir, train, None, method="grpo+icepop", rollout={"top_k": 1},
                                         optim={"steps": 2, "lr": 1e-3}, checkpoint={"every": 0}))
    output = io.StringIO()
    Trainer(config, run_dir=tmp_path / "run", console=Console(file=output, width=300)).train()
    assert output.getvalue().count("IcePop masked every token") == 1
    assert "rollout.top_k / top_p make the sampler's those of the filtered distribution" in output.getvalue()
    assert [m["correction/icepop_masked_frac"] for m in read_metrics(tmp_path / "run")] == [1.0, 1.0]


def test_dr_grpo_divides_by_a_constant(tmp_path, tiny_model_dir, arithmetic_files):
    """Dr. GRPO's token sum is divided by a constant, the longest response allowed, not by the step's longest
    response (which the trainer's rollouts are cut to, so it changes from step to step); a configured one stays."""
    train, _ = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, None, method="dr_grpo", rollout={"max_new_tokens": 40}))
    assert Trainer(config, run_dir=tmp_path / "a").objective.loss_scale_factor == 40.0
    config = load_config(make_config(tiny_model_dir, train, None, method={"method": "dr_grpo", "loss_scale_factor": 7}))
    assert Trainer(config, run_dir=tmp_path / "b").objective.loss_scale_factor == 7.0


WHOLE_BATCH_SELECTORS = [{"method": "clip_b", "params": {"mu": 0.5}},
                         {"method": "clip_v", "params": {"mu": 0.5, "max_frac": 0.02}},
                         # the selector shrinks the normaliser, the bonus is aggregated over every valid token
                         {"method": "clip_b+entropy_bonus", "params": {"mu": 0.5, "entropy_coeff": 0.5}},
                         # fine-tuning on the accepted samples, normalised by their tokens over the whole batch
                         {"method": "rft"}]


ENTROPY_BONUS = {"method": "grpo+entropy_bonus", "params": {"entropy_coeff": 0.5}}
# k1's gradient is that of log pi even where the policy still equals the reference (the first step)
KL_REFERENCE = {"method": "grpo+kl_ref", "params": {"kl_loss_coef": 0.5, "kl_loss_type": "k1",
                                                    "loss_agg_mode": "seq-mean-token-sum"}}


@pytest.mark.parametrize("method", ["grpo", "dapo", "dr_grpo", ENTROPY_BONUS, KL_REFERENCE, *WHOLE_BATCH_SELECTORS],
                         ids=["grpo", "dapo", "dr_grpo", "entropy_bonus", "kl_ref", "clip_b", "clip_v",
                              "clip_b+bonus", "rft"])  # the four loss aggregations, terms aggregated like the loss (one read
                         # from the reference model), and selectors deciding over the batch
def test_micro_batches_give_the_full_batch_update(tmp_path, tiny_model_dir, arithmetic_files, method):
    """Gradient accumulation over micro-batches of 3 rows (cutting across groups) makes the same update as one pass,
    whatever the loss aggregation; Clip_B and Clip_V take their statistics (and Clip_V its cap) over the whole batch,
    as their released code does, so they drop the same tokens; rft divides by the accepted tokens of the whole batch."""
    train, _ = arithmetic_files
    with importable_module(tmp_path, "parity_reward", PARITY_REWARD):
        results = []
        for micro_batch_size in (None, 3):
            config = load_config(make_config(tiny_model_dir, train, None, method=method, reward={"name": "parity_reward:score"},
                                             rollout={"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 40},
                                             optim={"steps": 1, "lr": 1e-2, "micro_batch_size": micro_batch_size}))
            trainer = Trainer(config, run_dir=tmp_path / f"run-{micro_batch_size}")
            metrics = trainer.train_step()
            results.append((metrics, {name: p.grad.clone() for name, p in trainer.model.named_parameters()}))
    (whole, whole_grads), (micro, micro_grads) = results
    assert whole["reward/mean"] == micro["reward/mean"] and 0 < whole["reward/mean"] < 1  # same rollouts, real advantages
    assert whole["response/length_max"] > whole["response/length_mean"]  # uneven lengths: tokens and rows weigh differently
    assert micro["train/grad_norm"] == pytest.approx(whole["train/grad_norm"], rel=1e-4) and whole["train/grad_norm"] > 0
    assert micro["entropy/predicted_delta"] == pytest.approx(whole["entropy/predicted_delta"], rel=1e-3, abs=1e-12)
    selector = method["method"].split("+")[0] if method in WHOLE_BATCH_SELECTORS else None
    selector = {"rft": "rejection_sampling"}.get(selector, selector)
    if selector:
        assert whole[f"select/{selector}_frac"] > 0  # the selector acted
    # metrics of the micro-batches weighted into the mini-batch's (losses by their loss shares, token statistics by
    # their token counts, whatever the aggregation); the re-scoring, in micro-batch pieces, agrees too
    token_statistics = ["advantages/mean", "select/dropped_frac", "ratio/mean"]
    if selector:
        token_statistics.append(f"select/{selector}_frac")
    aggregated = ["reg/entropy_bonus"] if "entropy_bonus" in str(method) else ["kl/ref"] if method is KL_REFERENCE else []
    for key in ("loss/policy", "loss/total", "tokens/valid", "entropy/measured_delta", *token_statistics, *aggregated):
        assert micro[key] == pytest.approx(whole[key], rel=1e-3, abs=1e-6), key
    for name, gradient in whole_grads.items():  # the clipped gradient the optimizer stepped with (float32 sums in
        # another order: a wrong weighting of the pieces is off by percents)
        torch.testing.assert_close(micro_grads[name], gradient, rtol=1e-4, atol=1e-5 * float(gradient.abs().max()))


def test_adaptive_entropy_decides_its_first_step_on_the_whole_batch_with_micro_batches(tmp_path, tiny_model_dir,
                                                                                          arithmetic_files, monkeypatch):
    """With no earlier step measured, the adaptive entropy controller tests the first step's own entropy: with
    micro-batches that is the whole batch's (the trainer gives it), not the first micro-batch's. A target between the
    two would otherwise switch the bonus off under micro-batching alone."""
    from entrorl.objective.regularizers import AdaptiveEntropy

    train, _ = arithmetic_files
    first_batch_entropy = []
    original = AdaptiveEntropy.__call__

    def spy(self, batch, *args):
        first_batch_entropy.append(float(batch.entropy.detach()[batch.mask].double().mean()))
        return original(self, batch, *args)

    monkeypatch.setattr(AdaptiveEntropy, "__call__", spy)

    def one_step(target: float, micro_batch_size: int | None, run: str):
        method = {"method": "adaptive_entropy", "params": {"target_entropy": target, "entropy_coeff": 0.5, "max_coeff": 1.0}}
        config = load_config(make_config(tiny_model_dir, train, None, method=method, reward={"name": "parity_reward:score"},
                                         rollout={"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 40},
                                         optim={"steps": 1, "lr": 1e-2, "micro_batch_size": micro_batch_size}))
        trainer = Trainer(config, run_dir=tmp_path / run)
        first_batch_entropy.clear()
        metrics = trainer.train_step()
        return metrics, {name: p.grad.clone() for name, p in trainer.model.named_parameters()}, first_batch_entropy[0]

    with importable_module(tmp_path, "parity_reward", PARITY_REWARD):
        probe, _, first_micro_batch = one_step(0.0, 3, "probe")
        whole_batch = probe["reg/adaptive_entropy_step_entropy"]
        assert first_micro_batch != pytest.approx(whole_batch, rel=1e-6)
        target = (first_micro_batch + whole_batch) / 2  # the whole batch and the first micro-batch on either side
        (whole, whole_grads, _), (micro, micro_grads, _) = (one_step(target, size, f"run-{size}") for size in (None, 3))
    expected = 0.5 if whole_batch < target else 0.0
    assert whole["reg/adaptive_entropy_coeff"] == micro["reg/adaptive_entropy_coeff"] == expected
    assert micro["reg/adaptive_entropy_step_entropy"] == pytest.approx(whole_batch, rel=1e-5)
    for name, gradient in whole_grads.items():
        torch.testing.assert_close(micro_grads[name], gradient, rtol=1e-4, atol=1e-5 * float(gradient.abs().max()))


def test_eval_of_a_checkpoint_with_the_run_s_evaluation_seed_draws_the_run_s_samples(tmp_path, tiny_model_dir,
                                                                                      arithmetic_files):
    """README: the run's evaluation after step s is what `entrorl eval --seed seed + 1000003 (s + 1)` of that step's
    checkpoint draws, with the run's batch size and eval settings; another seed draws other samples."""
    from typer.testing import CliRunner

    from entrorl.cli import app

    train, held_out = arithmetic_files
    with importable_module(tmp_path, "parity_reward", PARITY_REWARD):
        config = load_config(make_config(tiny_model_dir, train, held_out, reward={"name": "parity_reward:score"},
                                         optim={"steps": 2, "lr": 1e-2}, eval={"n": 4, "max_prompts": 6}))
        run = Trainer(config, run_dir=tmp_path / "run").train()
        in_run = json.loads((run / "eval" / "step_000002.json").read_text())
        rates = {}
        for seed in (7 + 1000003 * 3, 0):
            out = tmp_path / f"eval-{seed}.json"
            result = CliRunner().invoke(app, ["eval", "--model", str(run / "checkpoints" / "step_000002" / "model"),
                                              "--data", str(held_out), "--reward", "parity_reward:score", "--n", "4",
                                              "--max-prompts", "6", "--seed", str(seed), "--batch-size",
                                              str(config.rollout.generation_batch_size), "--out", str(out)])
            assert result.exit_code == 0, result.output
            rates[seed] = json.loads(out.read_text())["pass_rates"]
    assert 0 < sum(in_run["pass_rates"]) < len(in_run["pass_rates"])  # rates that samples could change
    assert rates[7 + 1000003 * 3] == in_run["pass_rates"]
    assert rates[0] != in_run["pass_rates"]


def test_bfloat16_model_keeps_small_updates_in_float32_master_weights(tmp_path, tiny_model_dir, arithmetic_files):
    """At a fine-tuning learning rate most bfloat16 weights would not move at all; the float32 copies move, accumulate,
    are written back rounded, and survive a resume exactly."""
    train, _ = arithmetic_files
    with importable_module(tmp_path, "parity_bf16_reward", PARITY_REWARD):
        def trainer_for(run: str, master: bool, steps: int = 2, resume: bool = False) -> Trainer:
            config = load_config(make_config(tiny_model_dir, train, None, reward={"name": "parity_bf16_reward:score"},
                                             model={"path": str(tiny_model_dir), "dtype": "bfloat16", "master_weights": master},
                                             optim={"steps": steps, "lr": 1e-5}, checkpoint={"every": 1}))
            return Trainer(config, run_dir=tmp_path / run, resume=resume)

        plain = trainer_for("plain", master=False)
        before = {name: p.detach().clone() for name, p in plain.model.named_parameters()}
        plain.train_step()
        unchanged = sum(int((before[name] == p).sum()) for name, p in plain.model.named_parameters()) / len(torch.cat(
            [p.flatten() for p in before.values()]))
        assert plain.master is None and unchanged > 0.5  # lr 1e-5 is below most weights' bfloat16 rounding step

        mastered = trainer_for("master", master=True)
        assert mastered.master is not None and all(c.dtype == torch.float32 for c in mastered.master.copies)
        initial = [c.clone() for c in mastered.master.copies]
        mastered.train()
        moved = sum(int((a != b).sum()) for a, b in zip(initial, mastered.master.copies)) / sum(a.numel() for a in initial)
        assert moved > 0.9  # Adam moves every weight that has a gradient by about lr
        for parameter, master_copy in zip(mastered.master.parameters, mastered.master.copies):
            assert parameter.dtype == torch.bfloat16 and torch.equal(parameter, master_copy.to(torch.bfloat16))

        resumed = trainer_for("master", master=True, steps=3, resume=True)
        for saved, loaded in zip(mastered.master.copies, resumed.master.copies):
            assert torch.equal(saved, loaded)  # the float32 values, not the rounded model weights


def test_greedy_evaluation(tmp_path, tiny_model_dir, arithmetic_files):
    """eval.temperature 0 samples greedily: every sample of a prompt is the same, so each prompt is solved by all or
    none of them; fork entropies come from the model's own distribution."""
    train, held_out = arithmetic_files
    with pytest.warns(UserWarning, match="one answer repeated"):  # as this test checks
        config = load_config(make_config(tiny_model_dir, train, held_out, eval={
            "every": 0, "n": 3, "ks": [1, 3], "max_prompts": 4, "top_forks": 3, "temperature": 0}))
    trainer = Trainer(config, run_dir=tmp_path / "run")
    from entrorl.rollout import HFSampler

    sampled = []
    original = HFSampler.generate
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HFSampler, "generate", lambda self, *a, **k: sampled.append(original(self, *a, **k)) or sampled[-1])
        metrics = trainer.evaluate()
    responses = sampled[0].response_ids.view(4, 3, -1)  # 4 prompts x n = 3
    assert all(torch.equal(group[0], group[1]) and torch.equal(group[0], group[2]) for group in responses)
    assert metrics["eval/frac_solved_none"] + metrics["eval/frac_solved_all"] == 1.0
    forks = json.loads((tmp_path / "run" / "forks" / "step_000000.json").read_text())
    assert len(forks) == 3 and forks[0]["entropy"] > 0.1


def test_the_evaluation_s_fork_pass_keeps_to_the_micro_batch_size(tmp_path, tiny_model_dir, arithmetic_files):
    """The fork tokens' entropies are scored in pieces of optim.micro_batch_size rows (the size the user made fit in
    memory), not every evaluation row (prompts x eval.n) in one forward, and the forks are the same either way."""
    train, held_out = arithmetic_files
    forks = {}
    for micro_batch_size in (None, 3):
        config = load_config(make_config(tiny_model_dir, train, held_out, optim={"micro_batch_size": micro_batch_size},
                                         rollout={"generation_batch_size": 4},
                                         eval={"every": 0, "n": 4, "ks": [1], "max_prompts": 5, "top_forks": 5}))
        trainer = Trainer(config, run_dir=tmp_path / f"run-{micro_batch_size}")
        rows_per_forward = []
        hook = trainer.model.get_decoder().register_forward_pre_hook(
            lambda module, args, kwargs: rows_per_forward.append(
                (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[0]),
            with_kwargs=True)
        try:
            trainer.evaluate()
            hook.remove()
            from entrorl.rollout import SamplingParams
            from entrorl.trainer.evaluate import evaluate_model

            with pytest.raises(ValueError, match="evaluate_model: batch_size must be a positive integer, got 0"):
                evaluate_model(trainer.model, trainer.tokenizer, trainer.eval_records, trainer.eval_prompt_ids,
                               trainer.reward, n=1, ks=[1], sampling=SamplingParams(max_new_tokens=2), seed=0,
                               batch_size=0)
            with pytest.raises(ValueError, match="evaluate_model: scoring_batch_size must be a positive integer, got 0"):
                evaluate_model(trainer.model, trainer.tokenizer, trainer.eval_records, trainer.eval_prompt_ids,
                               trainer.reward, n=1, ks=[1], sampling=SamplingParams(max_new_tokens=2), seed=0,
                               top_forks=0, scoring_batch_size=0)  # refused before sampling, forks or not
        finally:
            hook.remove()
            trainer.close()
        # sampling runs generation_batch_size (4) rows at a time; the fork pass its 20 rows in pieces of the
        # micro-batch size, or of the generation batch size without one (it ran them in one forward)
        assert max(rows_per_forward) == 4, rows_per_forward
        assert rows_per_forward[-7:] == [3] * 6 + [2] if micro_batch_size else rows_per_forward[-5:] == [4] * 5
        forks[micro_batch_size] = json.loads((tmp_path / f"run-{micro_batch_size}" / "forks" / "step_000000.json").read_text())
    assert len(forks[3]) == 5
    assert [(f["sample"], f["position"], f["token"]) for f in forks[3]] == [
        (f["sample"], f["position"], f["token"]) for f in forks[None]]
    assert [f["entropy"] for f in forks[3]] == pytest.approx([f["entropy"] for f in forks[None]], rel=1e-5)


def test_rewards_whose_advantages_overflow_float32_stop_the_run_with_the_cause(tmp_path, tiny_model_dir, arithmetic_files):
    """RLOO's G/(G-1) (R - mean) of rewards +-3.4e38 is beyond float32: the run stops saying so (not a traceback, nor
    an update on inf advantages), and the step's record is kept."""
    train, _ = arithmetic_files
    huge = ("import torch\n"
            "def score(prompt, completion, answer, **meta):\n    return 3.4e38 if sum(map(ord, completion)) % 2 else -3.4e38\n"
            "def same_embedding(texts):\n    return torch.ones(len(texts), 4)\n")
    with importable_module(tmp_path, "huge_reward", huge):
        config = load_config(make_config(tiny_model_dir, train, None, reward={"name": "huge_reward:score"},
                                         advantage={"name": "rloo"}, checkpoint={"every": 0}))
        with pytest.raises(TrainingStopped, match=r"^step 1: advantage estimator 'rloo' gave advantages beyond float32's "
                                                  r"largest value, 3.4e\+38 \(rewards up to \|R\| = 3.4e\+38\): rescale "
                                                  r"the rewards; stopping. No checkpoint had been written"):
            Trainer(config, run_dir=tmp_path / "run").train()
        # the unlikeliness rank scales a negative reward up by as much as 1 + beta_rank: past float32 too
        config = load_config(make_config(tiny_model_dir, train, None, reward={"name": "huge_reward:score",
                                                                              "unlikeliness": {"beta_rank": 0.25}},
                                         checkpoint={"every": 0}))
        with pytest.raises(TrainingStopped, match=r"^step 1: reward.unlikeliness took rewards beyond float32's largest "
                                                  r"value, 3.4e\+38: rescale the rewards; stopping. No checkpoint"):
            Trainer(config, run_dir=tmp_path / "shaped").train()
        # the diversity weights double a negative reward of identical samples, before the unlikeliness rank runs
        config = load_config(make_config(tiny_model_dir, train, None, reward={
            "name": "huge_reward:score", "unlikeliness": {"beta_rank": 0.25},
            "diversity": {"enabled": True, "model": "huge_reward:same_embedding"}}, checkpoint={"every": 0}))
        with pytest.raises(TrainingStopped, match=r"^step 1: reward.diversity took rewards beyond float32's largest"):
            Trainer(config, run_dir=tmp_path / "diverse").train()
    for run in ("run", "shaped", "diverse"):
        (record,) = read_metrics(tmp_path / run)
        assert record["step"] == 1 and record["reward/mean"] != 0


def test_learning_rate_schedules():
    from entrorl.trainer import learning_rate_factor

    factors = {name: [learning_rate_factor(step, 6, warmup_steps=2, schedule=name, min_ratio=0.1) for step in range(6)]
               for name in ("constant", "linear", "cosine")}
    assert factors["constant"] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert factors["linear"] == pytest.approx([0.5, 1.0, 1.0, 0.775, 0.55, 0.325])  # reaches 0.1 one step after the end
    assert factors["cosine"][:3] == pytest.approx([0.5, 1.0, 1.0])
    assert factors["cosine"][4] == pytest.approx(0.55) and factors["cosine"][5] == pytest.approx(0.1 + 0.9 * 0.5 * (1 - 0.5 ** 0.5))
    assert learning_rate_factor(9, 10, schedule="cosine") > 0  # no step is spent at the final rate
    for name in ("linear", "cosine"):  # past the end (a resumed run made shorter) the rate stays at the final one
        assert [learning_rate_factor(step, 6, warmup_steps=2, schedule=name, min_ratio=0.1)
                for step in (6, 7, 10)] == pytest.approx([0.1, 0.1, 0.1])
    # a misspelled schedule fails at the first step, not once the warm-up is over
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'cosin'; choose one of constant, linear, cosine"):
        learning_rate_factor(0, 10, warmup_steps=2, schedule="cosin")
    for step, min_ratio in ((-1, 0.0), (3, 1.5), (3, -0.1)):
        with pytest.raises(ValueError, match="step must be >= 0 and min_ratio in \\[0, 1\\]"):
            learning_rate_factor(step, 10, schedule="linear", min_ratio=min_ratio)


def test_activation_checkpointing_and_a_cosine_schedule_train_like_the_plain_run(tmp_path, tiny_model_dir, arithmetic_files):
    """Recomputing activations changes memory, not numbers; the rate each step logs follows the schedule; an
    evaluation before the first step is logged as step 0."""
    train, held_out = arithmetic_files
    with importable_module(tmp_path, "parity_ckpt_reward", PARITY_REWARD):
        runs = {}
        for checkpointing in (False, True):
            config = load_config(make_config(
                tiny_model_dir, train, held_out, reward={"name": "parity_ckpt_reward:score"},
                model={"path": str(tiny_model_dir), "activation_checkpointing": checkpointing},
                optim={"steps": 3, "lr": 1e-2, "lr_schedule": "cosine", "min_lr_ratio": 0.2},
                eval={"every": 0, "n": 2, "ks": [1, 2], "max_prompts": 2, "top_forks": 0, "at_start": True},
                checkpoint={"every": 0}))
            trainer = Trainer(config, run_dir=tmp_path / f"run-{checkpointing}")
            trainer.train()
            runs[checkpointing] = read_metrics(tmp_path / f"run-{checkpointing}")
            if checkpointing:
                assert trainer.model.is_activation_checkpointing
    plain, checkpointed = runs[False], runs[True]
    assert [r["step"] for r in plain] == [0, 1, 2, 3] and "eval/pass_at_2" in plain[0] and "eval/pass_at_2" in plain[-1]
    assert [r["train/lr"] for r in plain[1:]] == pytest.approx([1e-2 * learning_rate for learning_rate in (1.0, 0.8, 0.4)])
    for before, after in zip(plain[1:], checkpointed[1:]):
        for key in ("loss/policy", "train/grad_norm", "entropy/mean", "entropy/measured_delta"):
            assert after[key] == pytest.approx(before[key], rel=1e-4, abs=1e-7), key


def test_rng_state_includes_cuda_generators_once_cuda_is_in_use(monkeypatch):
    """Sampling on a GPU draws from CUDA's generators: a checkpoint must carry them for a resume to draw the same."""
    from entrorl.trainer.checkpoint import capture_rng_state, restore_rng_state

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.tensor([1], dtype=torch.uint8)] * 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = capture_rng_state()
    assert len(state["cuda"]) == 2
    restore_rng_state(state)
    assert restored == [state["cuda"]]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert "cuda" not in capture_rng_state()  # CUDA never used: nothing to save, and no context is created


def test_config_errors_name_the_key_before_loading_a_model(tmp_path, arithmetic_files):
    import warnings

    train, _ = arithmetic_files
    base = make_config(tmp_path / "no-model-needed", train, None)
    with pytest.raises(ConfigError, match="optim.lrr: unknown key; did you mean 'lr'\\?"):
        load_config(base, ["optim.lrr=1e-5"])
    # the nearest keys of the section, inside a list of sections too; none near: the section's keys
    with pytest.raises(ConfigError, match=r"reward.extra.0.wieght: unknown key; did you mean 'weight'\?"):
        load_config(base, ["reward.extra=[{name: exact_match, wieght: 2}]"])
    with pytest.raises(ConfigError, match=r"checkpoint.zzz: unknown key; the keys here are every, keep$"):
        load_config(base, ["checkpoint.zzz=1"])
    with pytest.raises(ConfigError, match="unknown method 'clip_z'"):
        load_config({**base, "method": "clip_z"})
    with pytest.raises(ConfigError, match="unknown parameter 'muu'"):
        load_config({**base, "method": {"method": "clip_b", "params": {"muu": 2}}})
    # a parameter beside the method, not under params: named as written, with the fix, and nothing of pydantic's union
    with pytest.raises(ConfigError) as info:
        load_config(base, ["method=clip_b", "method.mu=0.1"])
    assert str(info.value).splitlines()[1:] == [
        "  method.mu: unknown key; a method's parameters go under method.params (--set method.params.mu=...)"]
    with pytest.raises(ConfigError, match=r"data.prompt_template: Input should be a valid string; YAML reads an unquoted "
                                          r"\{...\} as a mapping: quote the text"):
        load_config(base, ["data.prompt_template={question}"])
    with pytest.raises(ConfigError, match="  reward.kwargs: reward 'exact_match' is a plain reward function"):
        load_config(base, ["reward.name=exact_match", "reward.kwargs.x=1"])
    with pytest.raises(ConfigError, match="  reward: tolerance must be a finite number >= 0"):  # an option's value
        load_config(base, ["reward.name=math", "reward.kwargs.tolerance=-1"])
    for overrides, said in ((["method={name: clip_b}"],
                             "method.name: unknown key; the method's name goes under method.method (--set method.method=...)"),
                            (["method=clip_b", "method.loss_agg_mod=token-mean"],
                             "method.loss_agg_mod: unknown key; did you mean 'loss_agg_mode'?"),
                            (["method=clip_b", "method.nope=1"],  # not clip_b's, nor spelled like a key: all of them
                             "method.nope: unknown key; the keys here are method, surrogate, shapers, regularizers, "
                             "selectors, correction, loss_agg_mode, loss_scale_factor, params")):
        with pytest.raises(ConfigError) as info:
            load_config(base, overrides)
        assert str(info.value).splitlines()[1:] == [f"  {said}"]
    with pytest.raises(ConfigError, match="rollout.group_size"):
        load_config(base, ["rollout.group_size=0"])
    with pytest.raises(ConfigError) as info:  # the value shown once
        load_config(base, ["optim.betas=[1.0, 0.5]"])
    assert str(info.value).splitlines()[1:] == ["  optim.betas: each beta must lie in [0, 1) (got [1.0, 0.5])"]
    for key in ("rollout.temperature", "eval.temperature", "optim.lr", "optim.grad_clip", "reward.correct_threshold"):
        for value in (".inf", ".nan"):  # an infinite temperature samples uniformly, a NaN lr trains nothing
            with pytest.raises(ConfigError, match=rf"{key}: Input should be a finite number"):
                load_config(base, [f"{key}={value}"])
    with pytest.raises(ConfigError, match="unknown estimator"):
        load_config(base, ["advantage.name=grpoo"])
    with pytest.raises(ConfigError, match="eval.ks"):
        load_config(base, ["eval.ks=[1,64]"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad_reward = {**base, "reward": {"name": "no_such_reward"}}
    with pytest.raises(ConfigError, match="  reward.name: unknown reward 'no_such_reward'"):
        load_config(bad_reward)
    with pytest.raises(ConfigError, match=r"advantage.params: unknown parameter\(s\) epsilonn"):
        load_config(base, ["advantage.params={epsilonn: 1}"])
    with pytest.raises(ConfigError, match=r"rollout.group_size = 4 is smaller than the 'passk' advantage's k = 8: a group "
                                          r"needs at least k samples"):
        load_config(base, ["advantage.name=passk", "advantage.params={k: 8}"])
    # a group of exactly k samples: its one k-subset is the whole group, and every advantage is 0
    with pytest.raises(ConfigError, match=r"rollout.group_size = 4 is the 'passk' advantage's k: the only k-subset"):
        load_config(base, ["advantage.name=passk"])
    assert load_config(base, ["advantage.name=passk", "advantage.params={k: 2}"]).advantage.params == {"k": 2}
    for template, problem in (("Q: {prompt} {other}", r"field\(s\) \['other'\]"), ("{prompt} {", "not a valid format"),
                              ("{{prompt}} ok", r"no \{prompt\} field.*literal"), ("{prompt:{width}}", "KeyError: 'width'"),
                              ("{prompt:d}", "cannot be filled"), ("{prompt!x}", "cannot be filled")):
        with pytest.raises(ConfigError, match=rf"data.prompt_template: .*{problem}"):
            load_config(base, [f"data.prompt_template={json.dumps(template)}"])
    assert load_config(base, ['data.prompt_template="{{x}}: {prompt}"']).data.prompt_template == "{{x}}: {prompt}"
    with pytest.raises(ConfigError, match=r"--set 'optim.lr=\[1': the value is not valid YAML"):
        load_config(base, ["optim.lr=[1"])
    # a key given twice in one mapping: PyYAML would keep the last one, dropping the first section's settings
    repeated = tmp_path / "repeated.yaml"
    repeated.write_text(yaml.safe_dump(base, sort_keys=False) + "optim:\n  lr: 0.5\n")
    with pytest.raises(ConfigError, match=r"repeated.yaml is not valid YAML: line \d+: the key 'optim' is given a "
                                          r"second time \(first on line \d+\)"):
        load_config(repeated)
    with pytest.raises(ConfigError, match="the key 'p' is given a second time"):
        load_config(base, ["reward.kwargs={p: 1, p: 2}"])
    assert parse_set_option("reward.kwargs={a: &d {x: 1, y: 1}, b: {<<: *d, x: 2}}")[1] == {
        "a": {"x": 1, "y": 1}, "b": {"x": 2, "y": 1}}  # a merge key's values may be overridden: not a repetition
    # DAPO's overlong penalty that no response can reach (max_new_tokens is 6 here); above the limit, a warning
    with pytest.raises(ConfigError, match=r"reward.overlong: the penalty starts after max_length - cache_length = 10 "
                                          r"tokens.*rollout.max_new_tokens = 6, so it would never apply"):
        load_config(base, ["reward.overlong={max_length: 14, cache_length: 4}"])
    with pytest.warns(UserWarning, match="a response cut at the limit gets only part of the penalty"):
        load_config(base, ["reward.overlong={max_length: 8, cache_length: 4}"])
    assert load_config(base, ["reward.overlong={max_length: 6, cache_length: 4}"]).reward.overlong.max_length == 6
    # a method given by name takes parameters from --set too
    tuned = load_config({**base, "method": "clip_b"}, ["method.params.mu=3"])
    assert tuned.method.method == "clip_b" and tuned.method.params == {"mu": 3}
    import importlib.util

    find_spec = importlib.util.find_spec
    with pytest.MonkeyPatch.context() as patch:  # as on a machine without wandb
        patch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
        with pytest.raises(ConfigError, match=r"logging.wandb needs the wandb package, which is not installed"):
            load_config(base, ["logging.wandb=true"])
    with pytest.raises(ConfigError, match=r"optim.betas: .*\[0, 1\)"):
        load_config(base, ["optim.betas=[0.9, 1.5]"])
    with pytest.raises(ConfigError, match="kl_reference is false, but method 'grpo\\+kl_ref' needs"):
        load_config(base, ["optim.kl_reference=false", "method=grpo+kl_ref"])
    with pytest.raises(ConfigError, match="options:\n  optim.kl_reference is false"):  # not under "(top level)"
        load_config(base, ["optim.kl_reference=false", "method=grpo+kl_ref"])
    # contradictions and values that pydantic alone would let through
    for override, problem in (("optim.steps=true", "optim.steps: expected a number, not a boolean"),
                              ("seed=-1", "seed: Input should be greater than or equal to 0"),
                              ("eval.every=5", "eval.every: evaluations need their prompts, and data.eval is not set"),
                              ("eval.at_start=true", "eval.at_start: evaluations need their prompts")):
        with pytest.raises(ConfigError, match=problem):
            load_config(base, [override])
    with pytest.raises(ConfigError, match="rollout.dynamic_sampling: it keeps the groups whose samples disagree"):
        load_config(base, ["rollout.group_size=1", "rollout.dynamic_sampling=true"])
    with pytest.warns(UserWarning, match="rollout.group_size = 1: the .grpo. advantage takes its baseline from the other"):
        load_config(base, ["rollout.group_size=1"])
    with pytest.warns(UserWarning, match="method 'grpo\\+icepop' compares the trainer's log-probs .*rollout.top_k = 5"):
        load_config(base, ["method=grpo+icepop", "rollout.top_k=5"])
    with pytest.warns(UserWarning, match="method 'clip_v' reads disc_centered of the full distribution .*top_p = 0.9 draw "
                                         "the tokens from a truncated one"):
        load_config(base, ["method=clip_v", "rollout.top_p=0.9"])
    with warnings.catch_warnings():  # a method that reads no entropy statistic, or no filter: silent
        warnings.simplefilter("error")
        load_config(base, ["method=grpo", "rollout.top_p=0.9"])
        load_config(base, ["method=forking_tokens"])
    with pytest.raises(ConfigError, match="rollout.group_size: the 'passk' advantage compares the samples of a group"):
        load_config(base, ["rollout.group_size=1", "advantage.name=passk", "advantage.params={k: 1}"])
    with pytest.raises(ConfigError, match="advantage.name: the 'w_reinforce' advantage is already \\+lambda / -1"):
        load_config(base, ["method=w_reinforce", "advantage.name=w_reinforce"])  # lambda twice: lambda squared
    assert load_config(base, ["method=grpo", "advantage.name=w_reinforce"]).advantage_estimator() == "w_reinforce"
    assert load_config(base, ["method=w_reinforce", "advantage.name=w_reinforce", "advantage.params={lam: 1.0}"])


def test_a_top_k_that_keeps_the_whole_vocabulary_is_no_filter(tmp_path, arithmetic_files, tiny_model_dir):
    """The sampler applies top-k only below the vocabulary's size: top_k = 10 x V keeps every token, so neither the
    TIS/IcePop warning nor the truncated-entropy one is said (the model directory's config.json declares V); top-k
    below V still is."""
    import warnings

    from entrorl.modeling import declared_vocab_size

    train, _ = arithmetic_files
    vocab = declared_vocab_size(tiny_model_dir)
    assert vocab == json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    base = make_config(tiny_model_dir, train, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in ("dapo+tis", "forking_tokens"):
            config = load_config(base, [f"method={method}", f"rollout.top_k={10 * vocab}"])
            assert not config.rollout.filters_tokens(vocab) and config.rollout.filters_tokens()
        load_config(base, ["method=dapo+tis", f"rollout.top_k={vocab}"])
    with pytest.warns(UserWarning, match=f"rollout.top_k = {vocab - 1}"):
        load_config(base, ["method=dapo+tis", f"rollout.top_k={vocab - 1}"])


def test_a_later_method_paired_with_other_advantages_is_warned_about(tmp_path, arithmetic_files):
    """A composition trains with its first method's advantage estimator: 'dapo+psr' keeps the samples above their
    group's mean (GRPO advantages), not PSR's 1 / 0 ones. Said, unless advantage.name chooses."""
    import warnings

    train, _ = arithmetic_files
    base = make_config(tmp_path / "no-model-needed", train, None)
    with pytest.warns(UserWarning, match=r"method 'dapo\+psr': the advantages are the first method's, 'grpo', and 'psr' "
                                         r"is paired with 'psr'; set advantage.name"):
        assert load_config(base, ["method=dapo+psr"]).advantage_estimator() == "grpo"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(base, ["method=dapo+psr", "advantage.name=psr"]).advantage_estimator() == "psr"
        assert load_config(base, ["method=dapo+clip_b+forking_tokens"]).advantage_estimator() == "grpo"
        assert load_config(base, ["method=dr_grpo+forking_tokens"]).advantage_estimator() == "dr_grpo"
        listed = load_config({**base, "method": ["dapo", "clip_b"]})  # a list of names is their composition
        assert (listed.method, listed.method_names()) == ("dapo+clip_b", ["dapo", "clip_b"])
        assert load_config(base, ["method=[dapo, clip_b]"]).method == "dapo+clip_b"
        assert load_config(base, ["method=unlikely_reward"]).advantage_estimator() == "unlikely"
        assert load_config(base, ["method=passk_advantage", "rollout.group_size=8"]).advantage_estimator() == "passk"


def test_settings_that_the_configuration_never_reads_are_reported(tmp_path, arithmetic_files):
    """A setting moved from its default that nothing reads warns, naming it and what it waits for; booleans in a list
    of numbers are refused like booleans for a number."""
    import warnings

    train, held_out = arithmetic_files
    base = make_config(tmp_path / "no-model-needed", train, None)
    for overrides, problem in (
            (["optim.min_lr_ratio=0.1"], r"optim.min_lr_ratio = 0.1 has no effect: optim.lr_schedule is 'constant'"),
            (["optim.warmup_steps=4"], r"optim.warmup_steps = 4 is more than optim.steps = 3: the learning rate never "
                                       r"reaches optim.lr"),
            # the decay starts at optim.lr on the step after the warm-up: of 3 steps, 2 of warm-up leave none to decay
            (["optim.lr_schedule=cosine", "optim.warmup_steps=2"], r"optim.lr_schedule = 'cosine' has no effect: its "
             r"decay begins after the warm-up's 2 steps, at optim.lr, and optim.steps = 3 leaves no later step"),
            (["optim.lr_schedule=linear", "optim.steps=1"], r"optim.lr_schedule = 'linear' has no effect"),
            (["rollout.max_sampling_rounds=5"], r"rollout.max_sampling_rounds has no effect without rollout.dynamic_sampling"),
            (["rollout.dynamic_sampling_metric=reward"], r"rollout.dynamic_sampling_metric has no effect without"),
            (["rollout.vllm_gpu_memory_utilization=0.5"], r"vllm_gpu_memory_utilization has no effect with rollout.backend = 'hf'"),
            (["data.pass_rate_column=rate"], r"data.pass_rate_column has no effect without data.pass_rate_band"),
            (["eval.n=4"], r"eval.n has no effect: data.eval is not set, so no evaluation runs"),
            (["data.eval=", "eval.n=4"], r"eval.n has no effect: data.eval is not set"),  # empty: no evaluation data
            (["eval.top_k=5"], r"eval.top_k has no effect: data.eval is not set"),
            *(([f"eval.{key}={value}"], rf"eval.{key} has no effect: data.eval is not set")
              for key, value in (("ks", "[1]"), ("max_prompts", 2), ("temperature", 0), ("top_p", 0.9),
                                 ("top_forks", 3))),
            (["diagnostics.measure_entropy_change=false", "diagnostics.measure_fraction=0.5"],
             r"diagnostics.measure_fraction has no effect with diagnostics.measure_entropy_change = false"),
            (["model.master_weights=false"], r"model.master_weights has no effect with model.dtype = 'float32'"),
            (["reward.diversity.batch_size=8"], r"reward.diversity.batch_size has no effect while reward.diversity.enabled is false"),
            (["logging.project=mine"], r"logging.project has no effect without logging.wandb or logging.trackio"),
            (["method={method: grpo, loss_scale_factor: 12}"],
             r"loss_scale_factor = 12 has no effect: the loss aggregation is 'seq-mean-token-mean'"),
            (["method={method: dapo, params: {loss_scale_factor: 12}}"],
             r"loss_scale_factor = 12 has no effect: the loss aggregation is 'token-mean'")):
        with pytest.warns(UserWarning, match=problem):
            load_config(base, overrides)
    evaluated = make_config(tmp_path / "no-model-needed", train, held_out)
    with pytest.warns(UserWarning, match=r"eval.n = 2 samples at eval.temperature = 0 \(greedy\) are one answer repeated"):
        load_config(evaluated, ["eval.temperature=0"])
    with warnings.catch_warnings(record=True) as caught:  # a warm-up past the last step: that alone is said
        warnings.simplefilter("always")
        load_config(base, ["optim.lr_schedule=linear", "optim.warmup_steps=4"])
    assert [str(w.message).split(" = ")[0] for w in caught] == ["optim.warmup_steps"]
    with warnings.catch_warnings():  # each of them where it does take effect: silent
        warnings.simplefilter("error")
        load_config(base, ["optim.min_lr_ratio=0.1", "optim.lr_schedule=cosine", "optim.warmup_steps=1",
                           "rollout.dynamic_sampling=true", "rollout.max_sampling_rounds=5", "data.pass_rate_column=rate",
                           "data.pass_rate_band=[0.1, 0.9]", "model.dtype=bfloat16", "model.master_weights=false"])
        load_config(evaluated, ["eval.n=4", "eval.top_k=5"])
        load_config(evaluated, ["eval.n=1", "eval.ks=[1]", "eval.temperature=0"])
        load_config(base, ["method={method: grpo, loss_agg_mode: seq-mean-token-sum-norm, loss_scale_factor: 12}"])
    for override in ("eval.ks=[1, true]", "optim.betas=[true, 0.9]"):
        with pytest.raises(ConfigError, match=r"expected real numbers, not booleans or complex numbers"):
            load_config(base, [override])


def test_each_range_is_checked_at_its_edges(tmp_path, arithmetic_files):
    """A value just outside a documented range is refused naming its key; the edge itself is accepted, silently where
    it takes effect."""
    import warnings

    train, _ = arithmetic_files
    base = make_config(tmp_path / "no-model-needed", train, None)  # rollout.max_new_tokens = 6
    for override, key in (("rollout.top_p=0", "rollout.top_p"), ("optim.betas=[0.9, 1.0]", "optim.betas"),
                          ("optim.grad_clip=0", "optim.grad_clip"), ("eval.ks=[0]", "eval.ks"),
                          ("checkpoint.keep=0", "checkpoint.keep"), (f"seed={2**32}", "seed"),
                          ("logging.project=''", "logging.project"),
                          ("rollout.max_sampling_rounds=0", "rollout.max_sampling_rounds"),
                          ("data.pass_rate_band=[0.1, 0.5, 0.9]", "data.pass_rate_band"),
                          ("reward.overlong={max_length: 6, cache_length: 7}", "reward.overlong"),
                          ("reward.overlong={max_length: 10, cache_length: 4}", "reward.overlong: the penalty starts"),
                          ("optim.mini_batches=9", "optim.mini_batches = 9 is more than the 8 rows of a step"),
                          ("reward.unlikeliness={beta_rank: 1.5}", "reward.unlikeliness.beta_rank")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(base, [override])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(base, [f"seed={2**32 - 1}"]).seed == 2**32 - 1
        assert load_config(base, ["optim.betas=[0.0, 0.0]"]).optim.betas == (0.0, 0.0)  # [0, 1): 0 is in
        assert load_config(base, ["optim.mini_batches=8"]).optim.mini_batches == 8  # one row per update (2 prompts x 4)
        assert load_config(base, ["reward.unlikeliness={beta_rank: 1}"]).reward.unlikeliness.beta_rank == 1.0
        penalty_off = "reward.overlong={max_length: 6, cache_length: 4, penalty_factor: 0}"
        assert load_config(base, [penalty_off]).reward.overlong.penalty_factor == 0.0
        for overlong in ("{max_length: 6, cache_length: 6}", "{max_length: 6, cache_length: 4}"):  # at the response limit
            assert load_config(base, [f"reward.overlong={overlong}"]).reward.overlong.max_length == 6
        assert load_config({**base, "data": {**base["data"], "eval": "  "}}).data.eval is None
    with pytest.warns(UserWarning, match=r"rollout.top_k = 1 / top_p = 1.0"):  # top-k of 1 filters too
        load_config(base, ["method=grpo+icepop", "rollout.top_k=1"])


def test_settings_read_only_with_another_setting_are_silent_with_it(tmp_path, arithmetic_files, monkeypatch):
    """logging.project is read by trackio as by W&B; model.master_weights by float16 as by bfloat16."""
    import importlib.util
    import warnings

    train, _ = arithmetic_files
    base = make_config(tmp_path / "no-model-needed", train, None)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # as on a machine with trackio
                        lambda name, *a: find_spec("json") if name == "trackio" else find_spec(name, *a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(base, ["logging.trackio=true", "logging.project=mine"])
        load_config(base, ["model.dtype=float16", "model.master_weights=true"])
        load_config(base, ["model.dtype=float16", "model.master_weights=false", "model.lora.rank=4"])  # float32 adapters


def test_float16_weights_without_master_weights_are_refused():
    """AdamW's moments in float16: eps = 1e-8 and squared gradients under 6e-8 round to 0, and m / (sqrt(v) + eps)
    grows without bound (a float16 weight stepped by AdamW with gradient 1e-4 becomes -inf). bfloat16 has float32's
    range, and LoRA trains float32 adapters: both are allowed."""
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    weight.grad = torch.full((4,), 1e-4, dtype=torch.float16)
    torch.optim.AdamW([weight], lr=1e-3).step()
    assert not torch.isfinite(weight).any()  # the reason for the refusal
    base = {"model": {"path": "m", "dtype": "float16", "master_weights": False}, "data": {"train": "t.jsonl"}}
    with pytest.raises(ConfigError, match="dtype float16 with master_weights: false would keep AdamW's moments in float16"):
        load_config(base)
    load_config({**base, "model": {**base["model"], "dtype": "bfloat16"}})


def test_unknown_keys_suggest_every_near_key_and_transposed_letters():
    """An unknown key names each of the section's keys spelled like it (top_q: top_p and top_k), and a key with two
    letters swapped (kepe) still finds the one meant."""
    base = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}}
    with pytest.raises(ConfigError, match=r"rollout.top_q: unknown key; did you mean 'top_p' or 'top_k'\?"):
        load_config(base, ["rollout.top_q=3"])
    with pytest.raises(ConfigError, match=r"checkpoint.kepe: unknown key; did you mean 'keep'\?"):
        load_config(base, ["checkpoint.kepe=3"])


def test_a_passk_k_left_at_its_default_of_four_over_the_group_size_is_named():
    """Without advantage.params.k, passk's k is its default 4: a group of 3 is refused naming that k."""
    base = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "rollout": {"group_size": 3}}
    with pytest.raises(ConfigError, match=r"rollout.group_size = 3 is smaller than the 'passk' advantage's k = 4"):
        load_config(base, ["advantage.name=passk"])


def test_a_passk_group_of_k_samples_above_the_dry_run_s_size_is_named_as_such():
    """The advantage's dry run uses at most 8 samples (or k + 1): a group of exactly k = 16 samples is still refused as
    a group of k, not as one smaller than k, and k = 12 in a group of 16 passes."""
    base = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "rollout": {"group_size": 16}}
    with pytest.raises(ConfigError, match=r"rollout.group_size = 16 is the 'passk' advantage's k: the only k-subset"):
        load_config(base, ["advantage.name=passk", "advantage.params={k: 16}"])
    with pytest.raises(ConfigError, match=r"rollout.group_size = 16 is smaller than the 'passk' advantage's k = 17"):
        load_config(base, ["advantage.name=passk", "advantage.params={k: 17}"])
    assert load_config(base, ["advantage.name=passk", "advantage.params={k: 12}"]).advantage.params == {"k": 12}


def test_an_absurd_group_size_is_validated_without_allocating_the_group(tmp_path):
    """The advantage's dry run in load_config used tensors of rollout.group_size elements: a group of 10^9 made the
    validation itself allocate tens of GB (a raw allocator error under a memory limit). Run under a 3 GB limit."""
    script = textwrap.dedent("""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
        from entrorl.trainer import load_config
        for estimator in ("grpo", "passk"):
            load_config({"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "method": "grpo",
                         "advantage": {"name": estimator}, "rollout": {"group_size": 10**9, "dynamic_sampling": True}})
        print("validated")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and "validated" in done.stdout, done.stderr[-800:]


def test_set_options_and_configuration_files_that_are_malformed_are_named(tmp_path, arithmetic_files):
    """--set splits at its first '=' and an empty value is the empty string; an empty key, a key below a value, a
    folder, a file that is no mapping, and an empty file (no model, no data) are ConfigErrors naming what is wrong."""

    train, _ = arithmetic_files
    base = make_config(tmp_path / "no-model-needed", train, None)
    assert parse_set_option("data.prompt_template=Q={prompt}") == (["data", "prompt_template"], "Q={prompt}")
    assert parse_set_option("logging.name=") == (["logging", "name"], "")
    assert parse_set_option("logging.name=  ") == (["logging", "name"], "")  # blank is empty too, not YAML's null
    assert parse_set_option(" optim.lr =1e-5") == (["optim", "lr"], 1e-5)  # spaces around the key are not part of it
    with pytest.raises(ConfigError, match=r"--set expects key=value, got 'optim.lr'"):
        load_config(base, ["optim.lr"])
    assert load_config(base, ["data.prompt_template=Q={prompt} A="]).data.prompt_template == "Q={prompt} A="
    with pytest.raises(ConfigError, match=r"--set has an empty key in '=3'"):
        load_config(base, ["=3"])
    for option in ("optim..lr=0.5", ".optim.lr=0.5", "optim.lr.=0.5"):
        with pytest.raises(ConfigError, match=rf"--set '{re.escape(option)}': the key '.*' has an empty part"):
            load_config(base, [option])
    with pytest.raises(ConfigError, match=r"--set 'optim.lr.x=1': 'lr' is not a section \(it holds 0.001\)"):
        load_config(base, ["optim.lr.x=1"])
    with pytest.raises(ConfigError, match="is a directory; expected a YAML configuration file"):
        load_config(tmp_path)
    for text, problem in (("- optim\n- data\n", "must hold a mapping of sections, got list"), ("", "model: Field required")):
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(ConfigError, match=problem):
            load_config(tmp_path / "bad.yaml")
    # a composition given as a list takes --set method.params like a single name
    tuned = load_config({**base, "method": ["clip_b"]}, ["method.params.mu=3"])
    assert tuned.method.method == ["clip_b"] and tuned.method.params == {"mu": 3}


def test_each_bound_is_refused_just_past_it_and_taken_at_it(tmp_path, arithmetic_files):
    """Every documented lower or upper bound: the value just past it is refused naming its key, the bound itself (or
    the smallest value allowed) is accepted, silently where the configuration reads it."""
    import warnings

    train, held_out = arithmetic_files
    base = make_config(tmp_path / "no-model-needed", train, None)  # 2 prompts x 4 samples, max_new_tokens 6
    with_eval = make_config(tmp_path / "no-model-needed", train, held_out)  # eval.n = 2, eval.ks = [1, 2]
    for config, override, key in (
            (base, "rollout.prompts_per_step=0", "rollout.prompts_per_step"),
            (base, "rollout.max_new_tokens=0", "rollout.max_new_tokens"),
            (base, "rollout.temperature=0", "rollout.temperature"),
            (base, "rollout.generation_batch_size=0", "rollout.generation_batch_size"),
            (base, "rollout.vllm_gpu_memory_utilization=1", "rollout.vllm_gpu_memory_utilization"),
            (base, "rollout.vllm_gpu_memory_utilization=0", "rollout.vllm_gpu_memory_utilization"),
            (base, "optim.lr=0", "optim.lr"),
            (base, "optim.weight_decay=-0.1", "optim.weight_decay"),
            (base, "optim.eps=0", "optim.eps"),
            (base, "optim.warmup_steps=-1", "optim.warmup_steps"),
            (base, "optim.min_lr_ratio=1.5", "optim.min_lr_ratio"),
            (base, "optim.micro_batch_size=0", "optim.micro_batch_size"),
            (base, "optim.length_buckets=0", "optim.length_buckets"),
            (base, "optim.mini_batches=0", "optim.mini_batches"),
            (base, "optim.epochs=0", "optim.epochs"),
            (base, "optim.max_consecutive_nonfinite=0", "optim.max_consecutive_nonfinite"),
            (with_eval, "eval.n=0", "eval.n"),
            (with_eval, "eval.max_prompts=0", "eval.max_prompts"),
            (with_eval, "eval.top_p=0", "eval.top_p"),
            (with_eval, "eval.top_forks=-1", "eval.top_forks"),
            (base, "diagnostics.measure_fraction=0", "diagnostics.measure_fraction"),
            (base, "diagnostics.measure_fraction=1.5", "diagnostics.measure_fraction"),
            (base, "logging.samples_every=-1", "logging.samples_every"),
            (base, "checkpoint.every=-1", "checkpoint.every"),
            (base, "torch_threads=0", "torch_threads"),
            (base, "reward.max_failing_steps=-1", "reward.max_failing_steps"),
            (base, "reward.diversity={enabled: true, batch_size: 0}", "reward.diversity.batch_size"),
            (base, "reward.unlikeliness={beta_rank: -0.1}", "reward.unlikeliness.beta_rank"),
            (base, "reward.overlong={max_length: 6, cache_length: 0}", "reward.overlong.cache_length"),
            (base, "reward.overlong={max_length: 0, cache_length: 1}", "reward.overlong.max_length")):
        with pytest.raises(ConfigError, match=rf"\n  {re.escape(key)}: Input should be"):
            load_config(config, [override])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for config, overrides in (
                (base, ["rollout.prompts_per_step=1"]), (base, ["rollout.max_new_tokens=1"]),
                (base, ["rollout.generation_batch_size=1"]), (base, ["optim.lr_schedule=linear", "optim.min_lr_ratio=1"]),
                (base, ["optim.micro_batch_size=1"]), (base, ["optim.length_buckets=1"]),
                (base, ["optim.max_consecutive_nonfinite=1"]), (base, ["optim.weight_decay=0"]),
                (base, ["diagnostics.measure_fraction=1"]), (base, ["checkpoint.every=0"]),
                (base, ["logging.samples_every=0"]), (base, ["torch_threads=1"]),
                (base, ["reward.max_failing_steps=0"]),  # 0 = never stop
                (base, ["reward.unlikeliness={beta_rank: 0}"]),
                (base, ["reward.overlong={max_length: 6, cache_length: 1}"]),
                (base, ["reward.diversity={enabled: true, batch_size: 1}"]),
                (with_eval, ["eval.n=1", "eval.ks=[1]"]), (with_eval, ["eval.max_prompts=1"]),
                (with_eval, ["eval.top_forks=0"])):
            load_config(config, overrides)


def test_a_pass_rate_band_is_read_when_the_configuration_loads(tmp_path, arithmetic_files):
    """An unquoted [a, b] is the closed band it spells; a band that does not parse is refused naming
    data.pass_rate_band before any data is read."""
    train, _ = arithmetic_files
    base = make_config(tmp_path / "no-model-needed", train, None)
    assert load_config(base, ["data.pass_rate_band=[0.1, 0.5]"]).data.pass_rate_band == "[0.1, 0.5]"
    assert load_config(base, ["data.pass_rate_band='(1/16, 15/16)'"]).data.pass_rate_band == "(1/16, 15/16)"
    for band in ("'0.1-0.5'", "'[0.5, 0.1]'", "'[0.1, 2]'"):
        with pytest.raises(ConfigError, match=r"\n  data.pass_rate_band: "):
            load_config(base, [f"data.pass_rate_band={band}"])


def test_a_diversity_embedder_is_checked_only_when_diversity_is_on_and_warned_about_when_off(tmp_path, arithmetic_files):
    """reward.diversity.model must resolve once reward.diversity.enabled is true; while it is false, moving any of its
    settings (model, batch_size, device) has no effect and says so. Once it is on, a device that is none, or not here,
    is refused with the configuration."""
    train, _ = arithmetic_files
    base = make_config(tmp_path / "no-model-needed", train, None)
    with pytest.raises(ConfigError, match=r"\n  reward.diversity: unknown embedding model 'no-such-embedder'"):
        load_config(base, ["reward.diversity={enabled: true, model: no-such-embedder}"])
    for setting, value in (("model", "no-such-embedder"), ("batch_size", 8), ("device", "cuda")):
        with pytest.warns(UserWarning, match=rf"reward.diversity.{setting} has no effect while reward.diversity.enabled "
                                             "is false"):
            load_config(base, [f"reward.diversity.{setting}={value}"])
    # its device too, as model.device is: not a torch traceback once the run has started
    embedder = "model: all-MiniLM-L6-v2, enabled: true"
    for device, refusal in (("bogus", "'bogus' is not a device"), ("xla", "'xla': entrorl runs on 'cpu', 'cuda'"),
                            *([] if torch.cuda.is_available() else [("cuda", "'cuda': torch sees no CUDA GPU here")])):
        with pytest.raises(ConfigError, match=rf"reward.diversity.device: {re.escape(refusal)}"):
            load_config(base, [f"reward.diversity={{{embedder}, device: {device}}}"])
    assert load_config(base, [f"reward.diversity={{{embedder}, device: auto}}"]).reward.diversity.device == "auto"
    refused = invoke_cli("train", str(write_config(tmp_path / "run.yaml", base)), "--run-dir", str(tmp_path / "run"),
                         "--set", f"reward.diversity={{{embedder}, device: bogus}}")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "reward.diversity.device: 'bogus' is not a device" in refused.stderr


def test_the_diversity_embedder_runs_where_auto_resolves(tmp_path, tiny_model_dir, arithmetic_files, monkeypatch):
    """reward.diversity.device: auto is the first CUDA GPU when there is one, else the CPU, as model.device's: the
    embedder is given that device, not 'auto' (which torch.device refuses)."""
    import entrorl.trainer.loop as loop

    given = []
    monkeypatch.setattr(loop, "load_embedder", lambda model, *, batch_size, device: given.append(device) or
                        (lambda texts: torch.ones(len(texts), 2)))
    train, _ = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, None, optim={"steps": 1},
                                     reward={"diversity": {"enabled": True, "device": "auto"}}))
    Trainer(config, run_dir=tmp_path / "run").close()
    assert given == ["cuda" if torch.cuda.is_available() else "cpu"]


def test_diagnostics_first_order_is_warned_about_without_the_measurement(tmp_path, arithmetic_files):
    import warnings

    train, _ = arithmetic_files
    base = make_config(tmp_path / "no-model-needed", train, None)
    with pytest.warns(UserWarning, match=r"diagnostics.first_order has no effect with diagnostics.measure_entropy_change "
                                         r"= false"):
        load_config(base, ["diagnostics.measure_entropy_change=false", "diagnostics.first_order=true"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(base, ["diagnostics.first_order=true"])


def test_the_unlikeliness_reward_is_refused_twice_and_a_chosen_estimator_silences_the_pairing_warning(
        tmp_path, arithmetic_files):
    """reward.unlikeliness with the 'unlikely' estimator (the method's own or named) would apply it twice; a
    composition whose advantage.name is set trains with that estimator, and no method is said to be unpaired."""
    import warnings

    train, _ = arithmetic_files
    base = make_config(tmp_path / "no-model-needed", train, None)
    for overrides in (["method=unlikely_reward"], ["advantage.name=unlikely"]):
        with pytest.raises(ConfigError, match="reward.unlikeliness and the 'unlikely' advantage estimator both apply"):
            load_config(base, ["reward.unlikeliness={beta_rank: 0.5}", *overrides])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(base, ["reward.unlikeliness={beta_rank: 0.5}"]).advantage_estimator() == "grpo"
        config = load_config(base, ["method=dapo+psr", "advantage.name=rloo"])
        assert config.advantage_estimator() == "rloo"


def test_an_objective_without_a_method_name_is_custom_and_takes_grpo_advantages(tmp_path, arithmetic_files):
    train, _ = arithmetic_files
    base = make_config(tmp_path / "no-model-needed", train, None)
    config = load_config(base, ["method={loss_agg_mode: token-mean}"])
    assert config.method_names() == [] and config.method_label() == "custom"
    # parts added to a method, or in place of one, name it (the run folder, the progress bar, the report)
    for method, label in (("{method: grpo, regularizers: [entropy_bonus]}", "grpo+entropy_bonus"),
                          ("{method: [dapo, clip_b], selectors: [forking_tokens]}", "dapo+clip_b+forking_tokens"),
                          ("{surrogate: cispo, regularizers: [entropy_bonus]}", "cispo+entropy_bonus"),
                          ("{method: clip_b, params: {mu: 3}}", "clip_b")):
        assert load_config(base, [f"method={method}"]).method_label() == label
    assert config.advantage_estimator() == "grpo" and config.needs_reference() is False


def test_a_section_left_empty_in_the_file_takes_set_options(tmp_path, arithmetic_files):
    """YAML reads a section with nothing under it (`eval:`) as null: --set fills it as if it were absent."""
    train, held_out = arithmetic_files
    settings = make_config(tmp_path / "no-model-needed", train, held_out)
    settings.pop("reward", None)
    path = write_config(tmp_path / "run.yaml", settings)
    path.write_text(path.read_text() + "reward:\n  name: exact_match\n  overlong:\n")
    config = load_config(path, ["reward.overlong.max_length=6", "reward.overlong.cache_length=2"])
    assert (config.reward.overlong.max_length, config.reward.overlong.cache_length) == (6, 2)


def test_a_set_option_reaches_an_item_of_a_list_of_sections_by_its_position(tmp_path, arithmetic_files):
    """`reward.extra.1.weight=0.5` changes the second extra reward's weight only; a position past the end or a word
    where a position belongs is named."""
    train, held_out = arithmetic_files
    settings = make_config(tmp_path / "no-model-needed", train, held_out)
    settings["reward"] = {"name": "exact_match", "extra": [{"name": "math", "weight": 0.2},
                                                            {"name": "exact_match", "weight": 0.3}]}
    config = load_config(settings, ["reward.extra.1.weight=0.5", "reward.extra.0.kwargs={tolerance: 0.01}"])
    assert [(extra.name, extra.weight, extra.kwargs) for extra in config.reward.extra] == [
        ("math", 0.2, {"tolerance": 0.01}), ("exact_match", 0.5, {})]
    with pytest.raises(ConfigError, match=r"position 2 is past the end of a list of 2 items"):
        load_config(settings, ["reward.extra.2.weight=0.5"])
    with pytest.raises(ConfigError, match=r"'first' is not a position in a list of 2 items"):
        load_config(settings, ["reward.extra.first.weight=0.5"])
    with pytest.raises(ConfigError, match=r"'\u00b2' is not a position in a list of 2 items"):  # a digit int() refuses
        load_config(settings, ["reward.extra.\u00b2.weight=0.5"])
    settings["reward"] = {"name": "exact_match"}  # reward.extra left at its default, the empty list
    with pytest.raises(ConfigError, match=r"position 0 is past the end of a list of 0 items"):
        load_config(settings, ["reward.extra.0.weight=0.5"])
    settings.pop("optim", None)  # optim.betas at its default (0.9, 0.999): a position changes one of them
    assert load_config(settings, ["optim.betas.1=0.99"]).optim.betas == (0.9, 0.99)
    for position in ("\u0661", "-1"):  # named as no position, as in a list written in the file
        with pytest.raises(ConfigError, match=rf"'{position}' is not a position in a list of 2 items"):
            load_config(settings, [f"optim.betas.{position}=0.99"])
    with pytest.raises(ConfigError, match=r"model.lora.target_modules is no list \(its default: 'all-linear'\)"):
        load_config(settings, ["model.lora.target_modules.0=q_proj"])
    # a mapping left at its default is that empty mapping: a key of digits is a key there, as in `kwargs: {}`
    # a composition's part, by its position, whether the method is the list itself or under method.method
    for method, key in ((["dapo", "clip_b"], "method.1"), ({"method": ["dapo", "clip_b"]}, "method.method.1")):
        composed = load_config({**settings, "method": method}, [f"{key}=clip_v"])
        named = composed.method if isinstance(composed.method, str) else composed.method.method
        assert named in ("dapo+clip_v", ["dapo", "clip_v"])
    assert apply_overrides({}, ["reward.kwargs.0=1"]) == apply_overrides({"reward": {"kwargs": {}}}, ["reward.kwargs.0=1"]) \
        == {"reward": {"kwargs": {"0": 1}}}


def test_an_error_names_its_source_and_shows_a_value_but_not_a_whole_section(tmp_path, arithmetic_files):
    train, _ = arithmetic_files
    base = make_config(tmp_path / "no-model-needed", train, None)
    with pytest.raises(ConfigError) as info:
        load_config({**base, "optim": {**base["optim"], "lr": 0}})
    assert str(info.value) == "invalid configuration in the given config:\n  optim.lr: Input should be greater than 0 (got 0)"
    with pytest.raises(ConfigError) as info:
        load_config(base, ["reward.overlong={max_length: 6, cache_length: 7}"])
    assert str(info.value).splitlines()[1:] == ["  reward.overlong: cache_length must be <= max_length"]


def test_resume_refuses_how_the_model_and_prompts_are_set_up_and_takes_rollouts_and_rewards(tmp_path, arithmetic_files):
    """Under model. and data. only where the model runs, activation checkpointing and the evaluation data may change;
    rollouts, rewards, optimiser, evaluation, logging and checkpoints may all change; each key once, in order."""
    from entrorl.trainer.config import resume_changes

    train, held_out = arithmetic_files
    saved = load_config(make_config(tmp_path / "model", train, held_out)).model_dump(mode="json")
    current = copy.deepcopy(saved)
    current["model"].update(dtype="bfloat16", chat_template=True, disable_dropout=False, trust_remote_code=True)
    current["data"].update(prompt_template="Q: {prompt}", shuffle=False, prompt_column="question")
    current["rollout"].update(group_size=2, temperature=0.7)
    current["reward"].update(name="math", correct_threshold=0.9)
    current["eval"]["n"] = 4
    current["logging"]["name"] = "other"
    current["checkpoint"]["keep"] = 5
    current["torch_threads"] = 2
    refused, accepted = resume_changes(saved, current)
    assert [key for key, _, _ in refused] == ["data.prompt_column", "data.prompt_template", "data.shuffle",
                                              "model.chat_template", "model.disable_dropout", "model.dtype",
                                              "model.trust_remote_code"]
    assert [key for key, _, _ in accepted] == ["checkpoint.keep", "eval.n", "logging.name", "reward.correct_threshold",
                                               "reward.name", "rollout.group_size", "rollout.temperature", "torch_threads"]
    assert ("model.dtype", "float32", "bfloat16") in refused


def test_a_checkpoint_with_settings_this_version_does_not_know_is_still_compared(tmp_path, arithmetic_files):
    """A key that a later version wrote, or that this one no longer has, is no reason to fail the comparison: it is
    listed as a change like any other."""
    from entrorl.trainer.config import resume_changes

    train, _ = arithmetic_files
    current = load_config(make_config(tmp_path / "model", train, None)).model_dump(mode="json")
    saved = copy.deepcopy(current)
    saved["optim"]["retired_setting"] = 1
    refused, accepted = resume_changes(saved, current)
    assert ("optim.retired_setting", 1, None) in accepted


def test_an_exponent_with_a_plus_sign_or_digit_separators_is_a_number():
    """Free-form parameters receive numbers in every exponent form YAML 1.2 reads as one, not the text."""

    assert parse_set_option("advantage.params.epsilon=1e+2")[1] == 100.0
    assert parse_set_option("advantage.params.epsilon=1_0e-7")[1] == pytest.approx(1e-6)
    assert parse_set_option("x=5.e-1")[1] == 0.5


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "trackio"])
def test_each_tracker_asked_for_must_be_installed(tmp_path, arithmetic_files, monkeypatch, tracker):
    import importlib.util

    train, _ = arithmetic_files
    base = make_config(tmp_path / "no-model-needed", train, None)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else find_spec(name, *a))
    with pytest.raises(ConfigError, match=rf"logging.{tracker} needs the {tracker} package, which is not installed"):
        load_config(base, [f"logging.{tracker}=true"])


def _bare_settings(tmp_path) -> dict:
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    return {"model": {"path": str(tmp_path / "model")}, "data": {"train": str(train), "eval": str(train)},
            "reward": {"name": "exact_match"}, "rollout": {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 6}}


def test_resume_on_a_machine_without_the_checkpoint_s_gpu_lists_only_the_device(tmp_path, monkeypatch):
    """model.device may change on resume. The checkpoint's 'cuda:1' need not exist here: it was compared as a raw dump
    before, which listed the method and advantage.name, unchanged, as refused changes."""
    from entrorl.trainer.config import resume_changes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    saved = load_config(_bare_settings(tmp_path), ["model.device=cuda:1"]).model_dump(mode="json")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    current = load_config(_bare_settings(tmp_path), ["model.device=cpu"]).model_dump(mode="json")
    assert resume_changes(saved, current) == ([], [("model.device", "cuda:1", "cpu")])


def test_a_checkpoint_whose_method_names_a_part_twice_resumes_with_the_objective_it_trained(tmp_path):
    """A part named twice in one of the method's lists is refused now; an earlier version trained it as one part,
    each later entry's parameters over the first's. Its checkpoint's settings are compared as that objective: the
    configuration written with the part once, as trained, is no change; with the first entry's setting it is one."""
    from entrorl.trainer.config import resume_changes

    settings = _bare_settings(tmp_path)
    settings["method"] = {"method": "grpo", "selectors": [{"name": "advantage_sign", "keep": "negative"}]}
    current = load_config(settings).model_dump(mode="json")
    saved = copy.deepcopy(current)
    saved["method"]["selectors"] = [{"name": "advantage_sign", "keep": "positive"},
                                    {"name": "advantage_sign", "keep": "negative"}]
    assert resume_changes(saved, current) == ([], [])
    settings["method"]["selectors"][0]["keep"] = "positive"
    refused, _ = resume_changes(saved, load_config(settings).model_dump(mode="json"))
    assert [change[0] for change in refused] == ["method"]


def test_a_checkpoint_key_this_version_does_not_know_is_the_only_change_listed(tmp_path):
    from entrorl.trainer.config import resume_changes

    current = load_config(_bare_settings(tmp_path)).model_dump(mode="json")
    saved = copy.deepcopy(current)
    saved["optim"]["retired_setting"] = 1
    assert resume_changes(saved, current) == ([], [("optim.retired_setting", 1, None)])
    saved["method"] = "clip_b"
    assert resume_changes(saved, current)[0] == [("method", "clip_b", "grpo")]
    # one inside a list item (an extra reward's settings)
    settings = {**_bare_settings(tmp_path), "reward": {"name": "exact_match", "extra": [{"name": "exact_match", "weight": 0.5}]}}
    current = load_config(settings).model_dump(mode="json")
    saved = copy.deepcopy(current)
    saved["reward"]["extra"][0]["retired_setting"] = 3
    assert resume_changes(saved, current) == ([], [("reward.extra", saved["reward"]["extra"], current["reward"]["extra"])])


@pytest.mark.parametrize("spelled", ["method={method: [dapo, clip_b]}", "method=dapo + clip_b"])
def test_the_same_composition_spelled_otherwise_is_no_change_on_resume(tmp_path, spelled):
    from entrorl.trainer.config import resume_changes

    saved = load_config(_bare_settings(tmp_path), ["method=dapo+clip_b"]).model_dump(mode="json")
    current = load_config(_bare_settings(tmp_path), [spelled]).model_dump(mode="json")
    assert resume_changes(saved, current) == ([], [])
    other = load_config(_bare_settings(tmp_path), ["method=dapo+clip_v"]).model_dump(mode="json")
    assert [key for key, _, _ in resume_changes(saved, other)[0]] == ["method"]


def test_a_method_written_otherwise_but_building_the_same_objective_is_no_change_on_resume(tmp_path):
    """The method is compared as the objective it builds: a default written out, or a number given as text."""
    from entrorl.trainer.config import resume_changes

    def dump(*overrides):
        return load_config(_bare_settings(tmp_path), list(overrides)).model_dump(mode="json")

    assert resume_changes(dump("method=clip_b"), dump("method={method: clip_b, params: {mu: 2.5}}")) == ([], [])
    assert resume_changes(dump("method={method: clip_b, params: {mu: 3}}"),
                          dump("method={method: clip_b, params: {mu: '3'}}")) == ([], [])
    assert resume_changes(dump("method=dr_grpo", "method.loss_scale_factor=512"),
                          dump("method=dr_grpo", "method.params.loss_scale_factor=512")) == ([], [])
    refused, _ = resume_changes(dump("method={method: clip_b, params: {mu: 3}}"), dump("method=clip_b"))
    assert [(key, saved["params"], now) for key, saved, now in refused] == [("method", {"mu": 3}, "clip_b")]  # as written


def test_an_empty_eval_ks_is_refused_when_the_configuration_loads(tmp_path):
    """Every evaluation would otherwise fail after the model has loaded, with 'ks is empty'."""
    with pytest.raises(ConfigError, match=r"eval.ks: List should have at least 1 item"):
        load_config(_bare_settings(tmp_path), ["eval.ks=[]"])


def test_a_parameter_set_for_the_default_method_keeps_the_default_method(tmp_path):
    """--set method.params.X with no method in the file sets a parameter of the default method (GRPO), as it does when
    the file names one; it built an objective with no method at all ('custom', token-mean)."""
    config = load_config(_bare_settings(tmp_path), ["method.params.clip_ratio_high=0.3"])
    assert config.method_label() == "grpo"
    from entrorl.objective import build_objective

    objective = config.build_objective()
    assert objective.loss_agg_mode == build_objective("grpo").loss_agg_mode and objective.surrogate.clip_ratio_high == 0.3


def test_resume_compares_the_files_named_and_refuses_other_advantages(tmp_path, arithmetic_files, monkeypatch):
    """The evaluation data may change on resume, the advantage's parameters may not; a path is compared as the file it
    names (a link to the same file is no change); a checkpoint's settings compare the same on a machine without peft."""
    import importlib.util

    from entrorl.trainer.config import flatten_settings, resume_changes, with_resolved_paths

    train, held_out = arithmetic_files
    saved = load_config(make_config(tmp_path / "model", train, held_out)).model_dump(mode="json")
    current = copy.deepcopy(saved)
    (tmp_path / "linked.jsonl").symlink_to(train)
    current["data"]["train"] = str(tmp_path / "linked.jsonl")
    current["data"]["eval"] = str(train)
    current["advantage"]["params"] = {"epsilon": 1e-4}
    refused, accepted = resume_changes(saved, current)
    assert [key for key, _, _ in refused] == ["advantage.params.epsilon"]
    assert [key for key, _, _ in accepted] == ["data.eval"]
    # another method is refused, as one entry; where and how the model runs may change; a method written in full, and
    # its own estimator named, are the ones it took
    current = copy.deepcopy(saved)
    current["method"] = "clip_b"
    current["model"].update(device="cpu", activation_checkpointing=True)
    refused, accepted = resume_changes(saved, current)
    assert refused == [("method", "grpo", "clip_b")]
    assert [key for key, _, _ in accepted] == ["model.activation_checkpointing", "model.device"]
    named = copy.deepcopy(saved)
    named["advantage"]["name"] = "grpo"
    named["method"] = {"method": "grpo"}  # the method in its full form is the same method
    assert resume_changes(saved, named) == ([], [])

    monkeypatch.chdir(tmp_path)
    dump = {"model": {"path": "model"}, "data": {"train": "linked.jsonl", "eval": "eval.jsonl"}}
    assert with_resolved_paths(dump) == {"model": {"path": str(tmp_path.resolve() / "model")},
                                         "data": {"train": str(train.resolve()), "eval": str(tmp_path.resolve() / "eval.jsonl")}}
    assert dump["data"] == {"train": "linked.jsonl", "eval": "eval.jsonl"}  # the caller's dump is left as it was
    assert flatten_settings({"reward": {"kwargs": {}, "name": "math"}, "seed": 1}) == {"reward.name": "math", "seed": 1}

    with_adapters = copy.deepcopy(saved)
    with_adapters["model"]["lora"] = {"rank": 4}
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    refused, _ = resume_changes(with_adapters, saved)
    assert refused and all(key.startswith("model.lora") for key, _, _ in refused)


def test_the_cli_prints_entrorl_s_warnings_as_one_line_and_others_as_python_does(capsys, monkeypatch):
    """A configuration warning and entrorl's own UserWarning: one 'warning:' line; a library's deprecation that
    surfaced through an entrorl line keeps its category and place."""
    import warnings

    from entrorl import cli
    from entrorl.objective import SurrogateSetAsideWarning
    from entrorl.trainer import ConfigWarning

    monkeypatch.setattr(cli, "_python_show_warning", lambda message, category, filename, lineno, *rest: sys.stderr.write(
        warnings.formatwarning(message, category, filename, lineno)))
    inside = str(Path(cli.__file__))
    cli._show_warning(ConfigWarning("optim.x has no effect"), ConfigWarning, "/somewhere/pydantic/main.py", 280)
    cli._show_warning(UserWarning("nothing was trained"), UserWarning, inside, 10)
    cli._show_warning(FutureWarning("`foo` is deprecated"), FutureWarning, inside, 12)
    cli._show_warning(UserWarning("a plugin's"), UserWarning, inside.replace("entrorl", "entrorl_plugin"), 3)
    cli._show_warning(SurrogateSetAsideWarning("'kl_cov' after 'dapo'"), SurrogateSetAsideWarning, "/somewhere/lab.py", 5)
    printed = capsys.readouterr().err
    assert "warning: optim.x has no effect\nwarning: nothing was trained\n" in printed
    assert "warning: 'kl_cov' after 'dapo'\n" in printed
    assert f"{inside}:12: FutureWarning: `foo` is deprecated" in printed and "UserWarning: a plugin's" in printed


def test_a_checkpoint_whose_settings_this_version_refuses_still_resumes_once_they_are_mended(tmp_path, arithmetic_files):
    """A run saved with eval.every but no data.eval (accepted then, refused now) is compared setting by setting with
    the mended configuration, and its settings raise no warnings of their own."""
    import warnings

    from entrorl.trainer.config import resume_changes

    train, _ = arithmetic_files
    current = load_config(make_config(tmp_path / "model", train, None, method="grpo+icepop")).model_dump(mode="json")
    saved = copy.deepcopy(current)
    saved["eval"]["every"] = 5
    saved["rollout"]["top_k"] = 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        refused, accepted = resume_changes(saved, current)
    assert refused == [] and sorted(key for key, _, _ in accepted) == ["eval.every", "rollout.top_k"]


def test_predicted_entropy_change_of_the_step_covers_every_token_whatever_is_re_scored(tmp_path, tiny_model_dir,
                                                                                        arithmetic_files):
    """entropy/predicted_delta_sum is the whole step's -alpha D (README: over the step's tokens), not the re-scored
    rows' share: it is the same with the measurement on or off."""
    train, _ = arithmetic_files
    sums = []
    with importable_module(tmp_path, "parity_sum", PARITY_REWARD):
        for measured in (True, False):
            config = load_config(make_config(tiny_model_dir, train, None, reward={"name": "parity_sum:score"},
                                             diagnostics={"measure_entropy_change": measured}))
            trainer = Trainer(config, run_dir=tmp_path / f"run-{measured}")
            sums.append(trainer.train_step()["entropy/predicted_delta_sum"])
            trainer.close()
    assert sums[0] != 0.0 and sums[0] == pytest.approx(sums[1], rel=1e-9)


@pytest.mark.parametrize(("optim", "temperature"), [({"lr": 1e-4}, 1.0), ({"lr": 1e-4}, 0.7),
                                                    ({"lr": 1e-4, "mini_batches": 2, "micro_batch_size": 3}, 1.0)],
                         ids=["one-update", "temperature-0.7", "two-updates-micro-batched"])
def test_first_order_entropy_change_is_the_gradient_times_the_applied_update(tmp_path, tiny_model_dir, arithmetic_files,
                                                                             optim, temperature):
    """entropy/first_order_delta = grad H . (theta_after - theta_before) for the mean entropy H of the re-scored tokens:
    against a float64 copy of the model, its gradient before the step and its entropies before and after the step
    (the measured change without float32 rounding: equal to first order at this learning rate)."""
    train, _ = arithmetic_files
    captured = {}
    with importable_module(tmp_path, "parity_first_order", PARITY_REWARD):
        config = load_config(make_config(tiny_model_dir, train, None, reward={"name": "parity_first_order:score"},
                                         rollout={"temperature": temperature}, optim={"steps": 3, **optim},
                                         diagnostics={"first_order": True, "measure_fraction": 0.5}))
        trainer = Trainer(config, run_dir=tmp_path / "run")
        entropy_gradient = trainer._entropy_gradient

        def capture(rollouts, rows):
            captured.update(rollouts=rollouts, rows=rows, before=copy.deepcopy(trainer.model).double())
            return entropy_gradient(rollouts, rows)

        trainer._entropy_gradient = capture
        metrics = trainer.train_step()
        trainer.close()
    rollouts, rows, before = captured["rollouts"], captured["rows"], captured["before"]
    assert rows.tolist() == [0, 2, 4, 6]  # every other row of 8

    def mean_entropy(model):  # float64, one row at a time without padding
        entropies = []
        for row in rows.tolist():
            prompt = rollouts.prompt_ids[row][rollouts.prompt_mask[row]]
            response = rollouts.response_ids[row][rollouts.response_mask[row]]
            logits = model(input_ids=torch.cat([prompt, response])[None]).logits[0, len(prompt) - 1: -1] / temperature
            log_p = logits.log_softmax(dim=-1)
            entropies.append(-(log_p.exp() * log_p).sum(dim=-1))
        return torch.cat(entropies).mean()

    gradient = torch.autograd.grad(mean_entropy(before), list(before.parameters()))
    after = copy.deepcopy(trainer.model).double()
    moved = [a.detach() - b.detach() for a, b in zip(after.parameters(), before.parameters())]
    reference = sum(float((g * d).sum()) for g, d in zip(gradient, moved))
    # float32 against float64: the dot product cancels, so its float32 rounding reaches ~1e-4 of it on some CPUs
    assert reference != 0.0 and metrics["entropy/first_order_delta"] == pytest.approx(reference, rel=1e-3)

    def entropy_moved_by(fraction: float) -> float:  # H(theta_before + fraction * (theta_after - theta_before))
        with torch.no_grad():
            for parameter, origin, delta in zip(after.parameters(), before.parameters(), moved):
                parameter.copy_(origin + fraction * delta)
            return float(mean_entropy(after))

    # the derivative along the applied update, by central differences (error O(eps^2): 2.8% at eps 1, 0.25% at 0.3
    # here; much smaller steps drown in the float32 rounding that transformers' RMSNorm and RoPE keep in a float64 model)
    assert (entropy_moved_by(0.25) - entropy_moved_by(-0.25)) / 0.5 == pytest.approx(reference, rel=1e-2)
    config = load_config(make_config(tiny_model_dir, train, None, optim={"steps": 3, **optim}))
    assert "entropy/first_order_delta" not in Trainer(config, run_dir=tmp_path / "off").train_step()


def test_the_first_order_pass_leaves_a_dropout_model_s_training_as_it_was(tmp_path, tiny_model_dir, arithmetic_files):
    """With dropout left on, the extra forward of diagnostics.first_order must not draw from the random stream the
    rollouts and the update use: every metric equals the run without it."""
    train, _ = arithmetic_files
    model_dir = tmp_path / "dropout-model"
    shutil.copytree(tiny_model_dir, model_dir)
    settings = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**settings, "attention_dropout": 0.3}))
    runs = []
    with importable_module(tmp_path, "parity_dropout", PARITY_REWARD):
        for first_order in (False, True):
            config = load_config(make_config(model_dir, train, None, reward={"name": "parity_dropout:score"},
                                             model={"disable_dropout": False}, diagnostics={"first_order": first_order}))
            trainer = Trainer(config, run_dir=tmp_path / f"run-{first_order}")
            runs.append([trainer.train_step() for _ in range(2)])
            trainer.close()
    for without, with_it in zip(*runs):
        assert "entropy/first_order_delta" in with_it
        for key, value in without.items():
            if not key.startswith("time/"):
                assert with_it[key] == value or (math.isnan(value) and math.isnan(with_it[key])), key


def test_files_of_steps_after_the_resumed_checkpoint_are_removed(tmp_path, tiny_model_dir, arithmetic_files):
    """A run killed after step 4 but resumed from its step-2 checkpoint (or started afresh in the same directory)
    does not keep the evaluations, fork tokens, samples (and, afresh, the reward traceback) of the lost steps."""
    train, held_out = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, held_out, optim={"steps": 4, "lr": 1e-3},
                                     eval={"every": 1}, logging={"samples_every": 1}, checkpoint={"every": 2, "keep": 2}))
    run_dir = tmp_path / "run"
    Trainer(config, run_dir=run_dir).train()
    (run_dir / "reward_errors.log").write_text("step 3, sample 1: ValueError: lost with step 3\n")
    shutil.rmtree(run_dir / "checkpoints" / "step_000004")  # as if killed before step 4's checkpoint was complete

    def steps_of(folder: str) -> list[int]:
        return sorted(int(path.name.split("_")[1].split(".")[0]) for path in (run_dir / folder).glob("step_*"))

    assert steps_of("eval") == steps_of("forks") == steps_of("samples") == [1, 2, 3, 4]
    resumed = Trainer(config, run_dir=run_dir, resume=True)
    assert resumed.step == 2 and steps_of("eval") == steps_of("forks") == steps_of("samples") == [1, 2]
    assert not (run_dir / "reward_errors.log").exists()  # a discarded step's: the run's first failure is still to come
    resumed.close()
    (run_dir / "reward_errors.log").write_text("step 2, sample 1: ValueError: kept with step 2\n")
    Trainer(config, run_dir=run_dir, resume=True).close()
    assert (run_dir / "reward_errors.log").is_file()  # the resumed run's own history
    shutil.rmtree(run_dir / "checkpoints")
    Trainer(config, run_dir=run_dir).close()
    assert steps_of("eval") == steps_of("forks") == steps_of("samples") == []
    assert not (run_dir / "reward_errors.log").exists()


def test_a_run_directory_in_use_is_refused_and_what_killed_writes_left_is_removed(tmp_path, tiny_model_dir,
                                                                                   arithmetic_files, monkeypatch):
    """Two trainers in one directory (the same command started twice, or in one process from Python): the second
    stops before writing anything, naming the first's process or asking to close the first Trainer; once the first is done the directory is free. A start also removes the hidden
    temporary files of writes killed half-way (kill -9), which only the lock's holder can know to be dead."""
    train, _ = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, None, optim={"steps": 1, "lr": 1e-3}))
    run_dir = tmp_path / "run"
    first = Trainer(config, run_dir=run_dir)
    config_text = (run_dir / "config.json").read_text()
    with monkeypatch.context() as patched, \
            pytest.raises(OSError, match=r"is in use by another Trainer of this process; close\(\) it"):
        patched.setattr(Trainer, "_load_policy", lambda *args: pytest.fail("refused only after loading the model"))
        Trainer(config, run_dir=run_dir)
    assert (run_dir / "config.json").read_text() == config_text and run_dir.is_dir()
    first.train()  # releases the directory when it ends
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()  # a process that no longer runs, as one killed mid-write
    dead = killed.pid
    stale = [run_dir / f".config.json.tmp-{dead}", run_dir / "eval" / f".step_000001.json.tmp-{dead}",
             run_dir / "metrics.jsonl.tmp", run_dir / "checkpoints" / f".step_000002.tmp-{dead}" / "model"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("half") if path.name != "model" else path.mkdir()
    kept = run_dir / "eval" / f"notes.tmp-{dead}"  # not hidden: not one of entrorl's temporary files
    kept.write_text("mine")
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a live process writing into the directory without its lock (entrorl eval --out run/eval/...): left alone
        in_use = run_dir / "eval" / f".other.json.tmp-{writer.pid}"
        in_use.write_text("being written")
        resumed = Trainer(config, run_dir=run_dir, resume=True)
        resumed.close()
        assert in_use.read_text() == "being written"
    finally:
        writer.kill()
        writer.wait()
    assert not any(path.exists() for path in stale) and not (run_dir / "checkpoints" / f".step_000002.tmp-{dead}").exists()
    assert kept.read_text() == "mine" and resumed.step == 1


def test_a_run_directory_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, tiny_model_dir,
                                                                                   arithmetic_files, monkeypatch):
    """A file in the way, or a folder that cannot be written (permissions, a read-only mount), is named before the
    policy (and a reference model) spend minutes loading, and nothing is created."""
    from entrorl.trainer import checkpoint

    train, _ = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, None, optim={"steps": 1, "lr": 1e-3}))
    monkeypatch.setattr(Trainer, "_load_policy", lambda *args: pytest.fail("refused only after loading the model"))
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("x")
    for run_dir in (in_the_way, in_the_way / "run"):
        with pytest.raises(NotADirectoryError, match=f"{in_the_way} is a file, not a folder"):
            Trainer(config, run_dir=run_dir)
    read_only = tmp_path / "mounted-read-only"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(checkpoint.os, "access", lambda path, mode: Path(path) != read_only and real_access(path, mode))
    with pytest.raises(PermissionError, match=f"{read_only}, where it would be created, is not writable"):
        Trainer(config, run_dir=read_only / "runs" / "x")
    assert list(read_only.iterdir()) == []
    # a file, or a link to nothing, where the run puts a folder of its own (it trained a step, then said "File exists")
    for name in ("checkpoints", "eval", "tensorboard"):
        cluttered = tmp_path / f"cluttered-{name}"
        cluttered.mkdir()
        (cluttered / name).write_text("x")
        with pytest.raises(NotADirectoryError, match=f"cannot hold the run's {name}/: {cluttered / name} is a file, "
                                                     "not a folder"):
            Trainer(config, run_dir=cluttered)
    (tmp_path / "dangling").mkdir()
    (tmp_path / "dangling" / "forks").symlink_to(tmp_path / "nowhere")
    with pytest.raises(NotADirectoryError, match="forks is a link to nothing, not a folder"):
        Trainer(config, run_dir=tmp_path / "dangling")
    # a link to a folder that is not there (a scratch disk not mounted), itself or above: named with its target
    unmounted = tmp_path / "scratch-link"
    unmounted.symlink_to(tmp_path / "not-mounted")
    for run_dir in (unmounted, unmounted / "runs" / "x"):
        with pytest.raises(FileNotFoundError, match=f"{unmounted} is a link to {tmp_path / 'not-mounted'}, which does "
                                                    "not exist"):
            Trainer(config, run_dir=run_dir)
    # a model's folder (the run directory given as model.path, by a slip): its config.json would be replaced
    model_copy = tmp_path / "model-copy"
    shutil.copytree(tiny_model_dir, model_copy)
    before = (model_copy / "config.json").read_text()
    with pytest.raises(FileExistsError, match=f"the run directory {model_copy} holds a model"):
        Trainer(config, run_dir=model_copy)
    assert (model_copy / "config.json").read_text() == before and not (model_copy / "metrics.jsonl").exists()
    # inside another run's checkpoints/ (a slip of tab completion): that run's pruning would delete it
    earlier = tmp_path / "earlier"
    (earlier / "checkpoints" / "step_000001").mkdir(parents=True)
    (earlier / "config.json").write_text(json.dumps({"method": "grpo"}))
    linked = tmp_path / "linked"
    linked.symlink_to(earlier / "checkpoints" / "step_000001")
    for run_dir in (earlier / "checkpoints", earlier / "checkpoints" / "step_000001" / "run", linked / "run"):
        with pytest.raises(FileExistsError, match=f"the run directory {run_dir} is inside the checkpoints of the run "
                                                  f"{earlier}, which that run prunes"):
            Trainer(config, run_dir=run_dir)
    assert sorted(path.name for path in earlier.rglob("*")) == ["checkpoints", "config.json", "step_000001"]
    # a project whose training configuration is config.json and whose runs go into checkpoints/: no run owns that
    project = tmp_path / "project"
    (project / "checkpoints" / "run1" / "checkpoints" / "step_000001").mkdir(parents=True)
    (project / "config.json").write_text(json.dumps({"method": "grpo", "logging": {"run_dir": "checkpoints"}}))
    for run_dir in (project / "checkpoints" / "run1", project / "checkpoints" / "run2"):
        checkpoint.check_run_directory_writable(run_dir)
    # a shared checkpoints/ this user may enter but not list (mode 0711) holds none of their checkpoints
    real_iterdir = Path.iterdir

    def unlistable(path):
        if path == earlier / "checkpoints":
            raise PermissionError(13, "Permission denied", str(path))
        return real_iterdir(path)

    monkeypatch.setattr(Path, "iterdir", unlistable)
    checkpoint.check_run_directory_writable(earlier / "checkpoints" / "mine")


def test_a_folder_that_can_be_written_but_not_entered_is_no_run_directory(tmp_path, monkeypatch):
    """Creating files in a folder needs it searchable as well as writable."""
    from entrorl.trainer import checkpoint

    monkeypatch.setattr(checkpoint.os, "access", lambda path, mode: not mode & os.X_OK)
    with pytest.raises(PermissionError, match=f"{tmp_path}, where it would be created, is not writable"):
        checkpoint.check_run_directory_writable(tmp_path / "run")


def test_fewer_training_prompts_than_a_step_takes_is_warned_about(tmp_path, tiny_model_dir, monkeypatch):
    """One prompt and two prompts a step: every step trains that prompt in two groups, which the run says up front."""
    train = tmp_path / "one.jsonl"
    train.write_text(json.dumps({"prompt": "1+2=", "answer": "3"}) + "\n")
    config = load_config(make_config(tiny_model_dir, train, None, optim={"steps": 1, "lr": 1e-3}))

    class Loaded(Exception):
        pass

    monkeypatch.setattr(Trainer, "_load_policy", lambda *args: (_ for _ in ()).throw(Loaded()))
    with pytest.warns(UserWarning, match=r"data.train has 1 prompt\(s\), fewer than rollout.prompts_per_step = 2"), \
            pytest.raises(Loaded):
        Trainer(config, run_dir=tmp_path / "run")


def test_prompts_the_tokenizer_turns_into_its_unknown_token_are_warned_about(tmp_path, tiny_model_dir, monkeypatch):
    """A held-out prompt with a character the tokenizer has no token for ('€') is named before the weights load; the
    training prompts, all written in the tokenizer's characters, are not."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"{a}+2=", "answer": str(a + 2)}) + "\n" for a in range(2)))
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": "1€2=", "answer": "3"}\n', encoding="utf-8")
    config = load_config(make_config(tiny_model_dir, train, held_out, optim={"steps": 1, "lr": 1e-3}))

    class Loaded(Exception):
        pass

    monkeypatch.setattr(Trainer, "_load_policy", lambda *args: (_ for _ in ()).throw(Loaded()))
    with warnings.catch_warnings(record=True) as caught, pytest.raises(Loaded):
        warnings.simplefilter("always")
        Trainer(config, run_dir=tmp_path / "run")
    notes = [str(warning.message) for warning in caught if "unknown token" in str(warning.message)]
    assert len(notes) == 1 and notes[0].startswith("1 of the 2 prompts of data.eval hold text")
    assert f"the first is {held_out}:2, whose '€' the vocabulary cannot write" in notes[0]


def test_held_out_prompts_past_eval_max_prompts_are_checked_but_not_tokenised(tmp_path, tiny_model_dir, monkeypatch):
    """eval.max_prompts: 2 keeps the first two held-out prompts; the third, past it, is not tokenised (its '€' is not
    warned about), while a malformed row past it is still refused."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"{a}+2=", "answer": str(a + 2)}) + "\n" for a in range(2)))
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": "2+2=", "answer": "4"}\n'
                        '{"prompt": "1€2=", "answer": "3"}\n', encoding="utf-8")
    config = load_config(make_config(tiny_model_dir, train, held_out, eval={"max_prompts": 2}))
    seen = {}

    class Loaded(Exception):
        pass

    def stop(trainer, *args):
        seen.update(records=[record.prompt for record in trainer.eval_records], encoded=len(trainer.eval_prompt_ids))
        raise Loaded()

    monkeypatch.setattr(Trainer, "_load_policy", stop)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Loaded):
            Trainer(config, run_dir=tmp_path / "run")
    assert seen == {"records": ["1+2=", "2+2="], "encoded": 2}
    with held_out.open("a") as file:
        file.write('{"prompt": "3+3="}\n')
    with pytest.raises(ValueError, match=r"held_out.jsonl:4"):
        Trainer(config, run_dir=tmp_path / "run2")


def test_a_filesystem_without_locks_is_warned_about_once(tmp_path, monkeypatch, caplog):
    """Where the filesystem refuses flock (some network mounts) the run goes on unlocked, and says so once, not at the
    trainer's probe and again at its lock."""
    import errno
    import logging

    from entrorl.trainer import checkpoint

    def refuse(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(checkpoint.fcntl, "flock", refuse)
    with caplog.at_level(logging.WARNING, logger=checkpoint.__name__):
        assert checkpoint.lock_run_directory(tmp_path) is None
        assert checkpoint.lock_run_directory(tmp_path) is None
    assert [record.getMessage().split(" (")[0] for record in caplog.records] == [f"cannot lock {tmp_path}"]


def test_a_lock_refused_as_access_denied_is_a_run_in_use_and_the_lock_file_holds_one_process_id(tmp_path, monkeypatch):
    """Some systems refuse a held flock with EACCES rather than EAGAIN: that is another run, not a filesystem without
    locks. The lock file holds the holder's process id alone, whatever an earlier holder wrote."""
    import errno

    from entrorl.trainer import checkpoint

    (tmp_path / ".lock").write_text("4242424\n")
    handle = checkpoint.lock_run_directory(tmp_path)
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    handle.close()

    def held(*args):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(checkpoint.fcntl, "flock", held)
    with pytest.raises(OSError, match="is in use by another Trainer of this process"):
        checkpoint.lock_run_directory(tmp_path)
    (tmp_path / ".lock").write_text("4242424\n")
    with pytest.raises(OSError, match=r"is in use by another run \(process 4242424\); wait for it to end"):
        checkpoint.lock_run_directory(tmp_path)


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_a_start_of_the_same_run_while_another_loads_is_refused_not_merged_into_it(
        tmp_path, tiny_model_dir, arithmetic_files, monkeypatch, resume):
    """The same command started twice: the run directory's lock was only tried at the start, then taken once the model
    had loaded. A start (A) that ran to its end in between was overwritten by the slower one (B): B, holding what it
    had read before, cut metrics.jsonl back, set A's complete checkpoints aside as "incomplete or damaged" and trained
    in their place. Now an existing directory stays locked from the start (A is refused at once), and a directory
    that appears while B loads makes B refuse."""
    import entrorl.trainer.loop as loop

    train, _ = arithmetic_files
    settings = make_config(tiny_model_dir, train, None, optim={"steps": 2}, checkpoint={"every": 1, "keep": 5},
                           diagnostics={"measure_entropy_change": False})
    run = tmp_path / "run"
    if resume:
        Trainer(load_config({**settings, "optim": {"steps": 1}}), run_dir=run).train()
    original, other = loop.Trainer._load_policy, {}

    def load_while_the_same_run_starts(self, *args, **kwargs):
        if not other:
            other["outcome"] = "started"
            try:
                Trainer(load_config(settings), run_dir=run, resume=resume).train()
                other["outcome"] = "trained"
            except OSError as error:
                other["outcome"] = str(error)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(loop.Trainer, "_load_policy", load_while_the_same_run_starts)
    if resume:  # B holds the lock from its start: A is refused, B trains
        Trainer(load_config(settings), run_dir=run, resume=True).train()
        assert other["outcome"] == f"{run} is in use by another Trainer of this process; close() it (or let its " \
                                   "train() finish) first, or choose another run_dir / logging.name"
    else:  # A made the directory and trained to its end while B loaded: B is refused
        with pytest.raises(FileExistsError, match=rf"{re.escape(str(run))} was made by another run while this one was "
                                                  "starting; continue that run with --resume once it has ended"):
            Trainer(load_config(settings), run_dir=run)
        assert other["outcome"] == "trained"
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["latest", "step_000001", "step_000002"]
    assert [record["step"] for record in read_metrics(run / "metrics.jsonl")] == [1, 2]
    Trainer(load_config(settings), run_dir=run, resume=True).close()  # the lock went with the refused start


def test_links_planted_in_a_received_run_directory_never_make_a_resume_or_a_report_write_elsewhere(
        tmp_path, tiny_model_dir, arithmetic_files):
    """A run directory received from someone else whose files are links to files of this user's: taking the lock
    wrote the process id into what `.lock` named (truncating it), and a resume or a report replaced what config.json,
    checkpoints/latest, an eval file or report/report.md named. The lock's link is refused, naming it; the others are
    replaced by the run's own files; the files outside stay as they were."""
    from entrorl.analysis.run_report import write_run_report
    from entrorl.trainer import checkpoint

    train, held_out = arithmetic_files
    run = tmp_path / "run"
    settings = make_config(tiny_model_dir, train, held_out, eval={"every": 1}, checkpoint={"every": 1, "keep": 2},
                           diagnostics={"measure_entropy_change": False})
    Trainer(load_config({**settings, "optim": {"steps": 1}}), run_dir=run).train()
    write_run_report(run, figures=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    planted = {".lock": "lock", "config.json": "config", "checkpoints/latest": "latest",
               "eval/step_000002.json": "eval", "report/report.md": "report"}
    for name, outside in planted.items():
        (mine / outside).write_text(f"my {outside}\n")
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(mine / outside)
    with pytest.raises(OSError, match=rf"{re.escape(str(run / '.lock'))} is a link \(to {re.escape(str(mine / 'lock'))}"
                                      r"\), where a lock file of its own belongs: .* remove the link"):
        checkpoint.lock_run_directory(run)
    (run / ".lock").unlink()
    resumed = Trainer(load_config({**settings, "optim": {"steps": 2}}), run_dir=run, resume=True)
    resumed.train()
    resumed.close()
    write_run_report(run, figures=False)
    assert {outside: (mine / outside).read_text() for outside in planted.values()} == \
        {outside: f"my {outside}\n" for outside in planted.values()}
    for name in ("config.json", "checkpoints/latest", "eval/step_000002.json", "report/report.md"):
        assert (run / name).is_file() and not (run / name).is_symlink(), name
    assert (run / "checkpoints" / "latest").read_text() == "step_000002\n"


def test_temporary_files_are_removed_unless_a_live_process_of_another_user_writes_them(tmp_path, monkeypatch):
    """This process's own leftovers and the metrics file cut back by a killed resume go; a file whose process exists
    under another user (the signal is refused) stays."""
    from entrorl.trainer import checkpoint

    mine = tmp_path / "eval" / f".step_000001.json.tmp-{os.getpid()}"
    mine.parent.mkdir()
    mine.write_text("half")
    (tmp_path / "metrics.jsonl.tmp").write_text('{"step": 1}\n')
    others = tmp_path / f".config.json.tmp-{os.getpid() + 1}"
    others.write_text("being written")

    def refused(pid, signal_number):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(checkpoint.os, "kill", refused)
    checkpoint.remove_temporary_files(tmp_path)
    assert not mine.exists() and not (tmp_path / "metrics.jsonl.tmp").exists() and others.read_text() == "being written"


def test_progress_off_a_terminal_is_a_line_per_interval(tmp_path, tiny_model_dir, arithmetic_files):
    """In a log file or a batch job a live bar would print only when the run ends: the loop writes plain lines (the
    first step, the last, and one per interval between) instead."""
    import io

    from rich.console import Console

    train, _ = arithmetic_files
    output = io.StringIO()
    config = load_config(make_config(tiny_model_dir, train, None, optim={"steps": 3, "lr": 1e-3},
                                     logging={"progress": True}))
    Trainer(config, run_dir=tmp_path / "run", console=Console(file=output, force_terminal=False, width=200)).train()
    lines = [line for line in output.getvalue().splitlines() if "train grpo: step" in line]
    assert [line.split("step ")[1].split()[0] for line in lines] == ["1/3", "3/3"]
    assert "reward" in lines[0] and "steps/s" in lines[0]
    from entrorl.trainer.progress import StepProgress

    assert StepProgress(Console(file=io.StringIO(), force_jupyter=True), "x", 3, 0, enabled=True).live  # a notebook's bar


def test_a_signal_during_a_checkpoint_write_stops_after_that_step(tmp_path, tiny_model_dir, arithmetic_files, monkeypatch):
    """The step whose checkpoint was being written when the signal came is the last: no further step is trained."""
    from entrorl.trainer import TrainingInterrupted

    train, _ = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, None, optim={"steps": 4, "lr": 1e-3}, checkpoint={"every": 2}))
    trainer = Trainer(config, run_dir=tmp_path / "run")
    save = trainer.save

    def save_interrupted():
        os.kill(os.getpid(), signal.SIGINT)  # handled by the trainer's handler, in this thread, during the write
        return save()

    monkeypatch.setattr(trainer, "save", save_interrupted)
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(TrainingInterrupted) as stopped:
            trainer.train(handle_signals=True)
        # saved: from now on another signal ends the process at once (the CLI's printing and Python's exit remain)
        assert all(signal.getsignal(number).__name__ == "exit_now" for number in before)
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)
    assert stopped.value.step == 2 and stopped.value.checkpoint.name == "step_000002"
    assert [record["step"] for record in read_metrics(tmp_path / "run")] == [1, 2]


def test_a_signal_during_the_evaluation_at_the_start_stops_before_the_first_step(tmp_path, tiny_model_dir,
                                                                                 arithmetic_files, monkeypatch):
    """Ctrl-C during ``eval.at_start`` trains no step: the run stops with the evaluation logged, no checkpoint, and
    the same directory starts afresh. The signal's note says so, rather than promising a checkpoint."""
    import io

    from rich.console import Console

    from entrorl.trainer import TrainingInterrupted

    train, held_out = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, held_out, optim={"steps": 3, "lr": 1e-3},
                                     eval={"every": 0, "n": 2, "ks": [1], "max_prompts": 2, "top_forks": 0,
                                           "at_start": True}))
    said = io.StringIO()
    trainer = Trainer(config, run_dir=tmp_path / "run", console=Console(file=said, width=300))
    evaluate = trainer.evaluate

    def evaluate_interrupted():
        os.kill(os.getpid(), signal.SIGINT)
        return evaluate()

    monkeypatch.setattr(trainer, "evaluate", evaluate_interrupted)
    monkeypatch.setattr(trainer, "train_step", lambda: pytest.fail("a step was trained after the signal"))
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(TrainingInterrupted) as stopped:
            trainer.train(handle_signals=True)
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)
    assert stopped.value.step == 0 and stopped.value.checkpoint is None
    assert "before the first step" in str(stopped.value)
    assert ("SIGINT: finishing the evaluation at the start, then stopping before the first step (nothing to save yet)"
            in said.getvalue()) and "saving a checkpoint" not in said.getvalue()
    assert [record["step"] for record in read_metrics(tmp_path / "run")] == [0]
    assert Trainer(config, run_dir=tmp_path / "run").step == 0  # no checkpoint: a fresh start is allowed there


def test_the_train_command_says_how_to_go_on_after_an_interruption(tmp_path, tiny_model_dir, arithmetic_files,
                                                                   monkeypatch):
    """After a step: continue with --resume; before the first step (during eval.at_start): start again, without it."""
    from typer.testing import CliRunner

    from entrorl.cli import app
    from entrorl.trainer import TrainingInterrupted

    train, _ = arithmetic_files
    config = write_config(tmp_path / "run.yaml", make_config(tiny_model_dir, train, None, optim={"steps": 2}))
    for step, checkpoint, expected in ((3, tmp_path / "step_000003", "after step 3; checkpoint step_000003 saved. "
                                        "Continue with: entrorl train"),
                                       (0, None, "after the evaluation at the start, before the first step; nothing to "
                                        "resume. Start again with: entrorl train")):
        def interrupted(self, **options):
            raise TrainingInterrupted(signal.SIGINT, step, checkpoint)

        monkeypatch.setattr(Trainer, "train", interrupted)
        run_dir = tmp_path / f"run-{step}"
        result = CliRunner().invoke(app, ["train", str(config), "--set", "optim.lr=0.001", "--run-dir", str(run_dir)])
        output = " ".join(result.output.split())
        assert result.exit_code == 130 and f"interrupted by SIGINT {expected}" in output, result.output
        assert "--set=optim.lr=0.001" in output and str(run_dir) in output
        assert output.rstrip().endswith("--resume") == (checkpoint is not None), result.output
    # SIGTERM (a scheduler's pre-emption) exits 143, as the process would without the handler
    monkeypatch.setattr(Trainer, "train", lambda self, **options: (_ for _ in ()).throw(
        TrainingInterrupted(signal.SIGTERM, 1, tmp_path / "step_000001")))
    result = CliRunner().invoke(app, ["train", str(config), "--run-dir", str(tmp_path / "run-term")])
    assert result.exit_code == 128 + signal.SIGTERM and "interrupted by SIGTERM after step 1" in result.output, result.output
    # a run that stopped itself on purpose (non-finite steps): exit 3, told apart from a refused configuration's 2
    monkeypatch.setattr(Trainer, "train", lambda self, **options: (_ for _ in ()).throw(
        TrainingStopped("3 non-finite steps in a row")))
    result = CliRunner().invoke(app, ["train", str(config), "--run-dir", str(tmp_path / "run-stopped")])
    assert result.exit_code == 3 and "error: 3 non-finite steps in a row" in result.output, result.output
    # --resume without --run-dir needs logging.name to find the run; a blank one is none (it looked for a checkpoint
    # in a new <method>-<time> folder)
    for blank in ([], ["--set", "logging.name="], ["--set", "logging.name='  '"]):
        result = CliRunner().invoke(app, ["train", str(config), "--resume", *blank])
        assert result.exit_code == 2 and "--resume needs the run directory: pass --run-dir or set logging.name" in \
            " ".join(result.output.split()), result.output


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this system")
def test_a_hangup_asks_once_to_stop_and_never_to_stop_at_once(capfd):
    """With hangup, SIGHUP is a first request to stop (as SIGTERM), also where the starter ignored SIGTERM, and a
    repeat, or one after Ctrl-C, is ignored: a closed terminal is no request to stop at once (a second SIGHUP sent as
    SIGTERM abandoned the step being saved). Without hangup, SIGHUP is left alone. A terminal still open keeps its
    output; only one that hung up is sent to the null device."""
    from rich.console import Console

    from entrorl.trainer import stop_signals

    numbers = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    handlers = {number: signal.getsignal(number) for number in numbers}
    console = Console(file=io.StringIO())
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # a suite started with nohup ignores it: this is a terminal's run
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for first in (signal.SIGHUP, signal.SIGINT):
            received = []
            restore = stop_signals.catch_stop_signals(received, console, hangup=True)
            signal.raise_signal(first)
            signal.raise_signal(signal.SIGHUP)
            signal.raise_signal(signal.SIGHUP)
            assert received == [first]
            restore()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        untouched = signal.getsignal(signal.SIGHUP)
        stop_signals.catch_stop_signals([], console)()
        assert signal.getsignal(signal.SIGHUP) is untouched
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert "SIGHUP (the terminal closed): finishing the current step, then saving a checkpoint" in console.file.getvalue()
    import pty

    controller, terminal = pty.openpty()
    script = "from entrorl.trainer.stop_signals import send_a_hung_up_terminal_to_null as f; f(); print('still shown')"
    process = subprocess.Popen([sys.executable, "-c", script], stdout=terminal, stderr=terminal, cwd=REPO)
    os.close(terminal)
    shown = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(controller, 4096):
            shown += chunk
    os.close(controller)
    assert process.wait(timeout=60) == 0 and b"still shown" in shown, shown


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this system")
def test_a_hangup_while_a_finished_run_closes_does_not_end_the_train_command(tmp_path, tiny_model_dir, arithmetic_files,
                                                                            monkeypatch):
    """Once the last step was saved, train() put SIGHUP back to its default before closing the loggers, and the
    command's last line came after: a terminal closed then ended the process by the signal, the loggers not closed.
    The trainer's handling now lasts through the close, and the command ends with SIGHUP sending its output nowhere."""
    from typer.testing import CliRunner

    from entrorl.cli import app

    train, _ = arithmetic_files
    config = write_config(tmp_path / "run.yaml", make_config(tiny_model_dir, train, None, optim={"steps": 1}))
    close, closed = Trainer.close, []

    def close_as_the_terminal_goes(self, **options):
        if not closed:
            signal.raise_signal(signal.SIGHUP)  # the handler runs here: it must not be the default's
        closed.append(options)
        return close(self, **options)

    monkeypatch.setattr(Trainer, "close", close_as_the_terminal_goes)
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # a suite started with nohup ignores it: this is a terminal's run
        result = CliRunner().invoke(app, ["train", str(config), "--run-dir", str(tmp_path / "run")])
        signal.raise_signal(signal.SIGHUP)  # after the command: its output sent nowhere, nothing ended
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)
    assert result.exit_code == 0 and "done:" in result.output, result.output
    assert closed == [{}]  # closed once, as a finished run
    assert [record["step"] for record in read_metrics(tmp_path / "run")] == [1]
    # Ctrl-C (or SIGTERM, or the laboratory's at-once SIGTERM to its workers) while a finished run closes acts as it
    # would without the trainer's handlers, not as a request to finish a step that is not under way
    def close_interrupted(self, **options):
        if not closed[1:]:
            closed.append(options)
            signal.raise_signal(signal.SIGINT)
        return close(self, **options)

    monkeypatch.setattr(Trainer, "close", close_interrupted)
    said = io.StringIO()
    from rich.console import Console

    trainer = Trainer(load_config(make_config(tiny_model_dir, train, None, optim={"steps": 1})), run_dir=tmp_path / "run2",
                      console=Console(file=said))
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.train(handle_signals=True, stop_on_hangup=True)
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)
    assert "finishing" not in said.getvalue() and "send it again" not in said.getvalue(), said.getvalue()


def test_a_run_trained_outside_the_main_thread_with_signals_asked_for_ends_and_a_stopped_one_gives_sighup_back(
        tmp_path, tiny_model_dir, arithmetic_files, monkeypatch):
    """Outside the main thread no handler can be installed: train(handle_signals=True) ran and then failed at its end
    (the placeholder for the handlers' restore took no signal numbers). And a run stopped by Ctrl-C and saved put
    SIGHUP back never: its handler swallowed every later hangup of the process."""
    import threading

    from entrorl.trainer import TrainingInterrupted

    train, _ = arithmetic_files
    settings = make_config(tiny_model_dir, train, None, optim={"steps": 1})
    trainer = Trainer(load_config(settings), run_dir=tmp_path / "threaded")
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(trainer.train(handle_signals=True)))
    thread.start()
    thread.join(300)
    assert outcome == [tmp_path / "threaded"]

    step = Trainer.train_step

    def interrupted(self):
        signal.raise_signal(signal.SIGINT)
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with pytest.raises(TrainingInterrupted):
            Trainer(load_config({**settings, "optim": {"steps": 2}}), run_dir=tmp_path / "stopped").train(
                handle_signals=True, stop_on_hangup=True)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


SLOW_REWARD = """
import pathlib, time
def score(prompt, completion, answer, **meta):
    pathlib.Path(__file__).with_name("scoring").touch()
    time.sleep(0.05)
    return float(sum(map(ord, completion)) % 2)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this system")
def test_a_closed_terminal_stops_training_as_sigterm_does_with_the_step_saved(tmp_path, tiny_model_dir, arithmetic_files):
    """An ssh connection lost mid-run: SIGHUP's default action ended `entrorl train` at once, the steps since the last
    checkpoint lost. It now stops as SIGTERM does, the step under way finished and saved (exit 129), a repeat ignored
    (a closed terminal is no request to stop at once), and what the command writes to the terminal, which has gone
    (writes fail with EIO), goes to the null device."""
    import pty
    import threading

    train, _ = arithmetic_files
    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "slow_hangup_reward.py").write_text(SLOW_REWARD)
    config = write_config(tmp_path / "run.yaml", make_config(
        tiny_model_dir, train, None, reward={"name": "slow_hangup_reward:score"}, optim={"steps": 200},
        checkpoint={"every": 0}, logging={"progress": True}))
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "rewards"), os.environ.get("PYTHONPATH", "")])}
    controller, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "entrorl.cli", "train", str(config), "--run-dir", str(run_dir)],
                               stdin=terminal, stdout=terminal, stderr=terminal, cwd=REPO, env=env,
                               # a suite started with nohup passes SIGHUP on ignored: this is a terminal's run
                               preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    os.close(terminal)

    def drain() -> None:  # keep the terminal's buffer from filling until it is closed (then the read fails)
        with contextlib.suppress(OSError):
            while os.read(controller, 4096):
                pass

    threading.Thread(target=drain, daemon=True).start()
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "rewards" / "scoring").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before its first step was scored"
        os.close(controller)  # the terminal goes away: the process's writes to it fail from now on
        process.send_signal(signal.SIGHUP)
        time.sleep(0.02)
        process.send_signal(signal.SIGHUP)
        assert process.wait(timeout=240) == 128 + signal.SIGHUP
    finally:
        if process.poll() is None:
            process.kill()
    saved = [path.name for path in (run_dir / "checkpoints").glob("step_*")]
    assert len(saved) == 1, saved
    step = int(saved[0].removeprefix("step_"))
    assert [record["step"] for record in read_metrics(run_dir)] == list(range(1, step + 1))
    with importable_module(tmp_path / "rewards", "slow_hangup_reward", SLOW_REWARD):
        resumed = Trainer(load_config(config), run_dir=run_dir, resume=True)
        assert resumed.step == step
        resumed.close()


def test_ctrl_c_while_the_run_is_set_up_says_nothing_was_trained_and_how_to_go_on(tmp_path, tiny_model_dir,
                                                                                   arithmetic_files, monkeypatch):
    """A KeyboardInterrupt while the model loads, before train() catches signals, exits 130 with a line saying that no
    step was taken and the command to run: the same one (a fresh start, or with --resume a resume), not a silence."""
    from typer.testing import CliRunner

    from entrorl.cli import app

    train, _ = arithmetic_files
    config = write_config(tmp_path / "run.yaml", make_config(tiny_model_dir, train, None, optim={"steps": 2}))
    run_dir = tmp_path / "run"
    Trainer(load_config(make_config(tiny_model_dir, train, None, optim={"steps": 1})), run_dir=run_dir).train()

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_load_policy", interrupted)
    for resume, expected in ((False, "(nothing trained). Start again with: entrorl train"),
                             (True, "(nothing trained, no checkpoint changed). Continue with: entrorl train")):
        directory = run_dir if resume else tmp_path / "fresh"
        args = ["train", str(config), "--set", "optim.lr=0.001", "--run-dir", str(directory), *(["--resume"] * resume)]
        result = CliRunner().invoke(app, args)
        output = " ".join(result.output.split())
        assert result.exit_code == 130, result.output
        assert f"interrupted while the run was being set up, before any step {expected}" in output, output
        assert "--set=optim.lr=0.001" in output and str(directory) in output
        assert output.rstrip().endswith("--resume") is resume
    monkeypatch.undo()  # the advice holds: the interrupted fresh start's folder takes the same command again
    result = CliRunner().invoke(app, ["train", str(config), "--set", "optim.lr=0.001", "--run-dir", str(tmp_path / "fresh")])
    assert result.exit_code == 0 and (tmp_path / "fresh" / "checkpoints" / "step_000002").is_dir(), result.output


def test_ctrl_c_while_the_run_is_set_up_gives_back_the_whole_command(tmp_path, tiny_model_dir, arithmetic_files,
                                                                    monkeypatch):
    """The command the interruption suggests, read back as a shell reads it, is the one that was run: its
    configuration file, each --set and the run directory."""
    import shlex

    from typer.testing import CliRunner

    from entrorl.cli import app

    train, _ = arithmetic_files
    config = write_config(tmp_path / "my run.yaml", make_config(tiny_model_dir, train, None, optim={"steps": 1}))
    monkeypatch.setattr(Trainer, "_load_policy", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt()))
    result = CliRunner().invoke(app, ["train", str(config), "--set", "optim.lr=0.001", "--set", "seed=3",
                                      "--run-dir", str(tmp_path / "fresh")])
    assert result.exit_code == 130, result.output
    suggested = " ".join(result.output.split()).split("Start again with: ", 1)[1]
    assert shlex.split(suggested) == ["entrorl", "train", str(config), "--set=optim.lr=0.001", "--set=seed=3",
                                      "--run-dir", str(tmp_path / "fresh")]


def test_a_composition_warning_is_given_once_by_the_configuration_not_again_by_the_trainer(tmp_path, tiny_model_dir,
                                                                                            arithmetic_files):
    import warnings

    train, _ = arithmetic_files
    with pytest.warns(UserWarning, match="'kl_cov' after 'grpo' trains with grpo's surrogate"):
        config = load_config(make_config(tiny_model_dir, train, None, method="grpo+kl_cov", optim={"steps": 1}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        Trainer(config, run_dir=tmp_path / "run").close()


def test_should_stop_ends_the_run_at_a_steps_end_with_it_saved(tmp_path, tiny_model_dir, arithmetic_files, capfd):
    """The laboratory's stop, asked after each step, ends the run as a caught SIGINT does: the step saved,
    TrainingInterrupted; the handlers of a run stopped by a second signal go back instead of staying 'exit at once',
    and a run without a checkpoint yet says that there is nothing to resume."""
    from entrorl.trainer import TrainingInterrupted

    train, _ = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, None, optim={"steps": 4, "lr": 1e-3}, checkpoint={"every": 0}))
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(TrainingInterrupted) as stopped:
            Trainer(config, run_dir=tmp_path / "run").train(handle_signals=True, should_stop=lambda: True)
        assert stopped.value.step == 1 and stopped.value.checkpoint.name == "step_000001"
        for number in before:
            signal.signal(number, before[number])

        trainer = Trainer(config, run_dir=tmp_path / "again")

        def second_signal():
            handler = signal.getsignal(signal.SIGINT)
            handler(signal.SIGINT, None)  # the first: noted
            handler(signal.SIGINT, None)  # the second: KeyboardInterrupt out of the step, nothing saved

        trainer.train_step = second_signal
        capfd.readouterr()
        with pytest.raises(KeyboardInterrupt):
            trainer.train(handle_signals=True)
        said = " ".join(capfd.readouterr().err.split())
        assert "SIGINT again: stopping now, without waiting for the step under way to be saved (no checkpoint was " \
               "written yet: there is nothing to resume)" in said, said
        assert {number: signal.getsignal(number) for number in before} == before
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


def test_stop_signals_are_noted_once_then_stop_at_once_and_the_handlers_are_put_back():
    import io

    from rich.console import Console

    from entrorl.trainer.stop_signals import catch_stop_signals

    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    received, output = [], io.StringIO()
    restore = catch_stop_signals(received, Console(file=output))
    try:
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        assert received == [signal.SIGTERM] and "SIGTERM: finishing the current step" in output.getvalue()
        with pytest.raises(SystemExit) as stopped:  # a second SIGTERM: exit status 143, as without the handler
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        assert stopped.value.code == 128 + signal.SIGTERM
        assert "SIGTERM again: stopping now, without waiting for the step under way to be saved" in output.getvalue()
        with pytest.raises(KeyboardInterrupt):
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    finally:
        restore()
    assert {number: signal.getsignal(number) for number in before} == before


def test_the_cpu_time_limit_s_signal_finishes_the_step_and_its_repeats_do_not_stop_at_once():
    """SIGXCPU (a soft CPU-time limit) killed the process by default, saying nothing and saving nothing: it now asks
    for the step to finish and be saved; the kernel's repeats, every CPU second until the hard limit, are ignored."""
    import io

    from rich.console import Console

    from entrorl.trainer.stop_signals import catch_stop_signals

    before = signal.getsignal(signal.SIGXCPU)
    received, output = [], io.StringIO()
    restore = catch_stop_signals(received, Console(file=output, width=200))
    try:
        for _ in range(3):
            signal.getsignal(signal.SIGXCPU)(signal.SIGXCPU, None)
        assert received == [signal.SIGXCPU]
        assert output.getvalue().count("SIGXCPU: the process's CPU-time limit is reached (the hard limit ends it): "
                                       "finishing the current step, then saving a checkpoint") == 1
    finally:
        restore()
    assert signal.getsignal(signal.SIGXCPU) == before


def test_a_run_stopped_by_a_signal_leaves_sigxcpu_to_the_next_run(tmp_path, tiny_model_dir, arithmetic_files):
    """The Python API: a run stopped by a signal (here should_stop) left SIGXCPU ignored, so the next run took it for
    one its starter ignores and did not catch it (nor did any process started after, which inherits SIG_IGN)."""
    from entrorl.trainer import TrainingInterrupted

    train, _ = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, None, optim={"steps": 4}, checkpoint={"every": 0}))
    with pytest.raises(TrainingInterrupted):
        Trainer(config, run_dir=tmp_path / "one").train(handle_signals=True, should_stop=lambda: True)
    assert signal.getsignal(signal.SIGXCPU) is not signal.SIG_IGN
    trainer = Trainer(config, run_dir=tmp_path / "two")
    step = trainer.train_step

    def step_that_reaches_the_limit():
        os.kill(os.getpid(), signal.SIGXCPU)
        return step()

    trainer.train_step = step_that_reaches_the_limit
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.train(handle_signals=True)
    assert (stopped.value.signal_number, stopped.value.step) == (signal.SIGXCPU, 1)


def test_train_under_a_soft_cpu_time_limit_saves_its_step_and_says_how_to_continue(tmp_path, tiny_model_dir,
                                                                                   arithmetic_files):
    """`prlimit --cpu=S:H entrorl train ...`: at S CPU seconds the run finishes its step, saves it and exits 152 with
    the command that continues it, before the hard limit's SIGKILL."""
    train, _ = arithmetic_files
    config = write_config(tmp_path / "run.yaml", make_config(tiny_model_dir, train, None, optim={"steps": 100000},
                                                             checkpoint={"every": 1000}))
    def limit_cpu_time() -> None:  # the soft limit leaves time for the imports and a few steps
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (25, 60))

    done = subprocess.run([sys.executable, "-m", "entrorl.cli", "train", str(config), "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300, preexec_fn=limit_cpu_time,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 128 + signal.SIGXCPU, done.stderr[-2000:]
    assert "SIGXCPU: the process's CPU-time limit is reached" in done.stderr
    steps = [record["step"] for record in read_metrics(tmp_path / "run")]
    assert f"interrupted by SIGXCPU after step {steps[-1]}; checkpoint step_{steps[-1]:06d} saved. Continue with:" \
        in " ".join(done.stderr.split())


# `entrorl train` where a signal comes during a chosen step, then the kernel's SIGXCPU repeats (one every CPU second
# until the hard limit), imitated every 10 ms until the process is gone
REPEATED_SIGXCPU = textwrap.dedent("""
    import os, signal, subprocess, sys
    from entrorl.trainer import loop
    first_signal, at_last_step = signal.Signals[sys.argv.pop(1)], sys.argv.pop(1) == "last"
    original = loop.Trainer.train_step
    def step(self):
        if self.step == (self.config.optim.steps - 1 if at_last_step else 0):
            os.kill(os.getpid(), first_signal)
            subprocess.Popen(["bash", "-c", f"while kill -XCPU {os.getpid()} 2>/dev/null; do sleep 0.01; done"],
                             start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        return original(self)
    loop.Trainer.train_step = step
    from entrorl.cli import main
    sys.argv = ["entrorl", *sys.argv[1:]]
    main()
""")


@pytest.mark.parametrize("first, when, status, said", [
    ("SIGXCPU", "last", 0, "done:"), ("SIGINT", "first", 130, "interrupted by SIGINT after step 1")])
def test_the_cpu_time_limit_s_repeats_never_end_the_train_command(tmp_path, tiny_model_dir, arithmetic_files, first,
                                                                   when, status, said):
    """The limit reached in the last step (the run finishes) or after a Ctrl-C: the trainer's handler went back to the
    default as Python shut down, and a repeat ended the process by SIGXCPU (a core dump, 152 to a shell)."""
    train, _ = arithmetic_files
    config = write_config(tmp_path / "run.yaml", make_config(tiny_model_dir, train, None, optim={"steps": 2},
                                                             checkpoint={"every": 1}))
    done = subprocess.run([sys.executable, "-c", REPEATED_SIGXCPU, first, when, "train", str(config), "--run-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == status and said in " ".join(done.stderr.split()), (done.returncode, done.stderr[-1500:])


def test_a_stop_signal_the_process_ignores_stays_ignored():
    """A shell's background job ignores SIGINT (and a launcher may ignore SIGTERM): the trainer neither catches such
    a signal nor, once a checkpoint is saved, turns it into "exit at once"; the other one it catches as usual."""
    import io

    from rich.console import Console

    from entrorl.trainer.stop_signals import catch_stop_signals, exit_at_once_on_another_signal

    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        received = []
        restore = catch_stop_signals(received, Console(file=io.StringIO()))
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        assert received == [signal.SIGTERM]
        exit_at_once_on_another_signal(Console(file=io.StringIO()), Path("run"))
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) not in (before[signal.SIGTERM], signal.SIG_IGN)
        restore()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


def test_the_line_a_finished_run_ends_with_compares_its_first_and_last_steps(tmp_path):
    """`train`'s last line: entropy and reward at the first and the last training step (a step without entropy says
    n/a), then the latest evaluation and its step."""
    from entrorl.cli import _run_summary

    records = [{"step": 0, "eval/n": 2, "eval/avg_at_n": 0.125},  # the evaluation before the first step
               {"step": 1, "entropy/mean": 1.5, "reward/mean": 0.25},
               {"step": 2, "entropy/mean": 1.25, "reward/mean": 0.5, "eval/n": 2, "eval/avg_at_n": 0.75},
               {"step": 3, "reward/mean": 0.625}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    assert _run_summary(tmp_path) == (f"{tmp_path}; entropy 1.5 (step 1) -> n/a (step 3); reward 0.25 (step 1) -> 0.625 "
                                      "(step 3); eval Avg@2 0.75 at step 2")


def test_cli_resume_of_a_finished_run_and_unloadable_model_directories(tmp_path, tiny_model_dir, arithmetic_files):
    """--resume of a run already at optim.steps says so and touches nothing; a model directory without weights or
    tokenizer is a one-line error (exit 2), not a traceback from transformers."""
    import shutil

    train, held_out = arithmetic_files
    config = write_config(tmp_path / "run.yaml", make_config(tiny_model_dir, train, None, optim={"steps": 1, "lr": 1e-3}))
    run_dir = tmp_path / "run"
    assert invoke_cli("train", str(config), "--run-dir", str(run_dir)).returncode == 0
    before = (run_dir / "config.json").read_text()
    again = invoke_cli("train", str(config), "--run-dir", str(run_dir), "--resume", "--set", "optim.steps=1",
                       "--set", "optim.lr=0.5")
    assert again.returncode == 0 and "already at step 1 of optim.steps = 1: nothing to do" in again.stderr
    assert (run_dir / "config.json").read_text() == before
    # what a resume may not change is refused on a finished run too (not "nothing to do" and status 0)
    changed = invoke_cli("train", str(config), "--run-dir", str(run_dir), "--resume", "--set", "seed=1")
    said = " ".join(changed.stderr.split())
    assert changed.returncode == 2 and "--resume cannot change what the run was trained with: seed: 7 in the " \
        "checkpoint, 1 now" in said and "nothing to do" not in said, changed.stderr
    # a file where the run puts one of its folders (samples/) is named before the model loads, not after a step
    (run_dir / "samples").write_text("in the way")
    blocked = invoke_cli("train", str(config), "--run-dir", str(run_dir), "--resume", "--set", "optim.steps=2",
                         "--set", "logging.samples_every=1")
    assert blocked.returncode != 0 and "Traceback" not in blocked.stderr, blocked.stderr
    assert f"cannot hold the run's samples/: {run_dir / 'samples'} is a file, not a folder" in " ".join(
        blocked.stderr.split()), blocked.stderr
    assert sorted(path.name for path in (run_dir / "checkpoints").glob("step_*")) == ["step_000001"]

    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    for command in (["eval", "--model", str(no_weights), "--data", str(held_out), "--n", "2", "--reward", "exact_match"],
                    ["train", str(write_config(tmp_path / "bad.yaml", make_config(no_weights, train, None))),
                     "--run-dir", str(tmp_path / "bad-run")]):
        result = invoke_cli(*command)
        assert result.returncode == 2 and "has no weights" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "bad-run").exists()  # a run that could not start leaves no directory behind
    # a seed torch.manual_seed cannot take is refused with the options, not after the model has loaded
    from typer.testing import CliRunner

    from entrorl.cli import app

    for seed in (2**64, -(2**63) - 1):
        common = ["--model", str(tiny_model_dir), "--data", str(held_out), "--n", "1", "--seed", str(seed)]
        for command in (["eval", *common], ["data", "audit", *common, "--out", str(tmp_path / "audit")]):
            result = CliRunner().invoke(app, command)
            assert result.exit_code == 2 and "--seed" in result.output, result.output


CUSTOM_METHOD_MODULE = """
from pydantic import Field

from entrorl.objective import MethodSpec, Selector, register_method, register_part


@register_part("drop_long_responses_tail", description="drops response positions from max_position on", paper="none")
class DropLongResponsesTail(Selector):
    max_position: int = Field(2, ge=0)

    def __call__(self, batch, advantages, surrogate, metrics):
        import torch

        positions = torch.arange(batch.mask.shape[1], device=batch.mask.device).expand_as(batch.mask)
        return batch.mask & (positions >= self.max_position)


register_method(MethodSpec(name="short_grpo", description="grpo on each response's first tokens", paper="none",
                           selectors=(("drop_long_responses_tail", {}),)))
"""


def test_imports_register_a_method_of_ones_own_that_the_configuration_then_names(tmp_path, tiny_model_dir, arithmetic_files):
    """``imports`` loads a module that registers a selector and a method using it, before the method is read: the run
    trains with it (each response keeps its first max_position tokens); without the import, or with a module that is
    not there, the configuration is refused naming the method or the module."""
    (tmp_path / "my_methods.py").write_text(CUSTOM_METHOD_MODULE)
    train, _ = arithmetic_files
    settings = make_config(tiny_model_dir, train, None, optim={"steps": 1}, method={"method": "short_grpo", "params": {"max_position": 1}},
                           imports=["my_methods"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    run_dir = tmp_path / "run"
    trained = run_cli("train", str(write_config(tmp_path / "run.yaml", settings)), "--run-dir", str(run_dir), env=env)
    assert trained.returncode == 0, trained.stderr
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert record["select/dropped_frac"] == pytest.approx(1 - 8 / record["tokens/valid"])  # 8 responses, 1 token each
    assert json.loads((run_dir / "config.json").read_text())["imports"] == ["my_methods"]

    for imports, said in (([], "unknown method 'short_grpo'"),
                          (["no_such_methods"], "imports: cannot import module 'no_such_methods' (ModuleNotFoundError")):
        refused = run_cli("train", str(write_config(tmp_path / "bad.yaml", {**settings, "imports": imports})), env=env)
        assert refused.returncode == 2 and said in " ".join(refused.stderr.split()) and "Traceback" not in refused.stderr


def test_cli_reports_config_errors_without_traceback(tmp_path, arithmetic_files):
    train, _ = arithmetic_files
    config = write_config(tmp_path / "run.yaml", make_config(tmp_path / "missing-model", train, None))
    result = run_cli("train", str(config), "--set", "optim.steps=0")
    assert result.returncode == 2
    assert "optim.steps" in result.stderr and "Traceback" not in result.stderr
    assert f"invalid configuration in {config} with its --set options" in " ".join(result.stderr.split())
    # a configuration warning is one line naming the key, not the validator's frame where it surfaced
    warned = run_cli("train", str(config), "--set", "optim.min_lr_ratio=0.1")
    assert warned.returncode == 2 and "missing-model" in warned.stderr
    assert "warning: optim.min_lr_ratio = 0.1 has no effect" in warned.stderr and "pydantic" not in warned.stderr


def test_an_empty_path_on_the_command_line_is_refused_not_taken_for_the_current_folder(tmp_path, monkeypatch):
    """`--out "$OUT"` with OUT unset: as a Path, '' is '.', so `report --out ''` wrote into the current folder and
    `train --run-dir ''` trained there. Every path a command takes refuses it, before any work, with a usage error."""
    from typer.testing import CliRunner

    from entrorl.cli import app

    monkeypatch.chdir(tmp_path)
    commands = {
        "train's configuration": ["train", ""],
        "--run-dir": ["train", "run.yaml", "--run-dir", ""],
        "eval's --model": ["eval", "--model", "", "--data", "d.jsonl"],
        "eval's --data": ["eval", "--model", "m", "--data", ""],
        "--base": ["eval", "--model", "m", "--base", "", "--data", "d.jsonl"],
        "eval's --out": ["eval", "--model", "m", "--data", "d.jsonl", "--out", ""],
        "--samples": ["eval", "--model", "m", "--data", "d.jsonl", "--samples", ""],
        "report's run": ["report", ""],
        "report's --out": ["report", "run", "--out", ""],
        "lab's --out": ["lab", "--out", ""],
        "data reasoning-gym's --out": ["data", "reasoning-gym", "basic_arithmetic", "--out", ""],
        "data audit's --out": ["data", "audit", "--model", "m", "--data", "d.jsonl", "--out", ""],
    }
    for what, arguments in commands.items():
        result = CliRunner().invoke(app, arguments)
        assert result.exit_code == 2, (what, result.output)
        assert "an empty path (an unset shell variable?)" in " ".join(result.output.split()), (what, result.output)
    assert list(tmp_path.iterdir()) == []
    spaced = CliRunner().invoke(app, ["report", " "])  # a name of spaces is a name: only '' is refused
    assert spaced.exit_code != 0 and "an empty path" not in spaced.output


def test_an_empty_path_in_the_configuration_is_refused_naming_the_key(arithmetic_files):
    """`model.path: ''` or `data.train: ''` (an unset variable in a generated file) read the working directory as the
    model or the data, and `logging.run_dir: ''` put the run there: refused before anything loads, naming the key.
    `data.eval: ''` still means no evaluation data."""
    train, _ = arithmetic_files
    base = make_config(Path("model"), train, None)
    for key in ("model.path", "data.train", "logging.run_dir"):
        with pytest.raises(ConfigError, match=rf"{re.escape(key)}: an empty path; give a file or folder"):
            load_config(base, [f"{key}=''"])
    assert load_config(base, ["data.eval=''"]).data.eval is None
    assert load_config(base, ["logging.run_dir=' runs'"]).logging.run_dir == " runs"  # a name, if an odd one
    # a checkpoint of a run started (by an earlier version) with logging.run_dir '' is still read back to be compared
    from entrorl.trainer.config import resume_changes

    current = load_config(base).model_dump(mode="json")
    saved = {**current, "logging": {**current["logging"], "run_dir": ""}}
    assert resume_changes(saved, current) == ([], [("logging.run_dir", "", "runs")])


def test_a_config_file_that_is_not_utf8_or_has_a_key_that_is_not_text_is_named(tmp_path, arithmetic_files):
    """An editor's UTF-16 file, and a top-level key YAML reads as a boolean (`on:`) or a number: a ConfigError naming
    the file or the key, not a UnicodeDecodeError or TypeError ("keywords must be strings")."""
    train, _ = arithmetic_files
    config = tmp_path / "run.yaml"
    config.write_bytes(f"model:\n  path: m\ndata:\n  train: {train}\n".encode("utf-16"))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(config))} is not UTF-8 text \(byte 0 cannot be decoded\): "
                                          "save it as UTF-8"):
        load_config(config)
    config.write_text(f"model:\n  path: m\ndata:\n  train: {train}\non: 1\n")
    with pytest.raises(ConfigError, match=r"  True: a key must be text; YAML reads an unquoted on / off / yes / no as "
                                          r"a boolean: quote it, or remove the line$"):
        load_config(config)
    config.write_text(f"model:\n  path: m\n  3: x\ndata:\n  train: {train}\n")
    with pytest.raises(ConfigError, match=r"  model.3: a key must be text$"):
        load_config(config)


def test_a_temperature_that_overflows_the_scored_logits_is_refused(arithmetic_files):
    """The update scores the rollouts' tokens at rollout.temperature, and an evaluation its fork tokens at
    eval.temperature: the shifted logits (floored at -1e4) divided by a temperature below 1e4 / float32's max
    overflow, and the log-probs or their gradients are NaN."""
    from entrorl.tokens import MIN_TEMPERATURE, token_stats

    train, held_out = arithmetic_files
    base = make_config(Path("model"), train, held_out)
    for key, said in (("rollout.temperature", "must be at least 2.94e-35"),
                      ("eval.temperature", "must be 0 (greedy) or at least 2.94e-35")):
        with pytest.raises(ConfigError, match=rf"{key}: {re.escape(said)}: scoring tokens at a lower one overflows "
                                              "float32"):
            load_config(base, [f"{key}=1e-36"])
        assert getattr(load_config(base, [f"{key}={MIN_TEMPERATURE!r}"]), key.split(".")[0]).temperature == MIN_TEMPERATURE
    assert load_config(base, ["eval.temperature=0", "eval.n=1", "eval.ks=[1]"]).eval.temperature == 0
    with pytest.raises(ValueError, match="temperature 1e-36 is below 2.94e-35: scoring tokens at it overflows float32"):
        token_stats(torch.zeros(1, 3, 5), torch.zeros(1, 3, dtype=torch.long), temperature=1e-36)
    for entropy_weight in (1.0, 2.0, -50.0):  # a slope above the row's normaliser overflowed into 0 * inf
        logits = torch.tensor([[[0.0, 1.0, 2.0]]], requires_grad=True)
        stats = token_stats(logits, torch.tensor([[1]]), temperature=MIN_TEMPERATURE)
        (stats.logprob.sum() + entropy_weight * stats.entropy.sum()).backward()
        assert stats.entropy.item() == 0.0 and math.isfinite(stats.logprob.item()) and torch.isfinite(logits.grad).all()


def test_a_string_setting_that_yaml_read_as_a_number_says_to_quote_it(tmp_path, arithmetic_files):
    train, _ = arithmetic_files
    base = make_config(tmp_path / "model", train, None)
    # the value as typed, not as YAML read it (3.10 is the number 3.1)
    for typed, kind in (("2024", "number"), ("3.10", "number"), ("yes", "boolean")):
        with pytest.raises(ConfigError, match=rf"logging.name: Input should be a valid string \(got .*\); YAML read the "
                                              rf"value as a {kind}: put it in quotes as you wrote it, --set "
                                              rf"'logging.name=\"{re.escape(typed)}\"'$"):
            load_config(base, [f"logging.name={typed}"])
        assert load_config(base, [f'logging.name="{typed}"']).logging.name == typed
    with pytest.raises(ConfigError, match=r"YAML read the value as a number: put it in quotes as you wrote it in the file$"):
        load_config({**base, "logging": {**base["logging"], "name": 2024}})
    assert load_config(base, ["logging.name=12:30"]).logging.name == "12:30"  # text to YAML 1.2 (base 60 to YAML 1.1)


def test_python_s_none_in_a_setting_says_that_yaml_writes_null(tmp_path, arithmetic_files):
    """docs/configuration.md reads "None = no clipping" and the like; YAML takes None as text: a number or boolean
    setting refuses it saying to write null, and a text setting given None by --set warns that it is the text."""
    train, _ = arithmetic_files
    base = make_config(tmp_path / "model", train, None)
    for option, key in (("optim.grad_clip=None", "optim.grad_clip"), ("torch_threads=none", "torch_threads")):
        with pytest.raises(ConfigError, match=rf"{re.escape(key)}: Input should be a valid (number|integer).*; YAML reads "
                                              rf"None as text and writes no value as null \(or ~\): --set "
                                              rf"{re.escape(key)}=null$"):
            load_config(base, [option])
    with pytest.raises(ConfigError, match=r"YAML reads None as text and writes no value as null \(or ~\)$"):
        load_config({**base, "optim": {**base.get("optim", {}), "grad_clip": "None"}})
    assert load_config(base, ["optim.grad_clip=null"]).optim.grad_clip is None
    # a key that takes no None is not told to take null, nor a text key warned of the text 'None'
    with pytest.raises(ConfigError, match=r"optim.steps: Input should be a valid integer, unable to parse string as an "
                                          r"integer \(got 'None'\)$"):
        load_config(base, ["optim.steps=None"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(base, ["model.path=None"]).model.path == "None"
    with pytest.warns(UserWarning, match=r"^--set logging.name=None: logging.name is the text 'None'; YAML writes no "
                                         r"value as null \(--set logging.name=null\)$"):
        assert load_config(base, ["logging.name=None"]).logging.name == "None"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(base, ['logging.name="None run"']).logging.name == "None run"


def test_a_device_type_entrorl_does_not_run_on_is_refused_naming_model_device(tmp_path, arithmetic_files):
    """'meta', 'xpu', 'hpu' (any torch device type) passed the check, which looked for CUDA and MPS only: the model
    then loaded and the run died with a traceback deep inside (a meta tensor's .item(), a torch without XPU)."""
    train, _ = arithmetic_files
    base = make_config(tmp_path / "model", train, None)
    for device in ("meta", "xpu", "hpu", "xla"):
        with pytest.raises(ConfigError, match=rf"model.device: '{device}': entrorl runs on 'cpu', 'cuda', "
                                              rf"'cuda:N' or 'mps' \(or 'auto'\), not on '{device}' devices"):
            load_config(base, [f"model.device={device}"])
    assert load_config(base, ["model.device=cpu"]).model.device == "cpu"


def test_numbers_are_read_as_yaml_1_2_reads_them_not_as_octal_or_base_60(tmp_path, arithmetic_files):
    """YAML 1.1 (PyYAML's) read 010 as the octal 8 and 1:30 as the base-60 90: `--set seed=010` trained with seed 8,
    `eval.n: 1:30` drew 90 samples, without a word. YAML 1.2 reads 010 as 10 and 1:30 as text (which an integer
    setting refuses); 0x / 0o integers, 1e-6, 1_000 and .inf are read as before."""
    train, _ = arithmetic_files
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(make_config(tmp_path / "model", train, None)).replace("steps: 3", "steps: 010"))
    assert "steps: 010" in config_file.read_text()
    assert load_config(config_file).optim.steps == 10
    assert load_config(config_file, ["seed=010"]).seed == 10
    with pytest.raises(ConfigError, match=r"eval.n"):
        load_config(config_file, ["eval.n=1:30"])
    expected = {"010": 10, "-007": -7, "0x1F": 31, "0o17": 15, "1_000": 1000, "1e-6": 1e-6, "1:30": "1:30",
                "12:30:00": "12:30:00", "1.5": 1.5, "-.inf": float("-inf")}
    for typed, value in expected.items():
        assert parse_set_option(f"reward.kwargs.x={typed}")[1] == value, typed
    assert yaml.safe_load("010") == 8  # PyYAML's own loader is left as it is
    for typed, value in {"0b101": 5, "-0x1F": -31, "+0x1F": 31, "0b1010_0111": 167, "+0o17": 15}.items():
        assert parse_set_option(f"reward.kwargs.x={typed}")[1] == value, typed  # as YAML 1.1 read them
    for typed in ("0x_", "0b_", "-0o_", "0X1F"):  # a prefix without digits, or in capitals: text, as to YAML 1.2
        assert parse_set_option(f"reward.kwargs.x={typed}")[1] == typed
    for typed in ("!!int 0b2", "!!int 1:30", "!!int x", "!!int --1", "!!int 0x-1", '!!int "0x 1F"'):
        with pytest.raises(ConfigError, match=r"is not valid YAML \(.* is not an integer"):
            parse_set_option(f"seed={typed}")
    with pytest.raises(ConfigError, match=r"is not valid YAML"):  # a control character: PyYAML's reader refuses it
        parse_set_option("logging.name=a\x07b")


def test_a_set_value_that_yaml_would_cut_at_a_comment_is_refused():
    """`--set 'data.prompt_template=Q {prompt} # think step by step'` trained with the template `Q {prompt}`: YAML
    read the rest as a comment. Refused, saying so; a quoted value, or a '#' not after a space, is kept whole."""
    for option, kept in (("data.prompt_template=Q {prompt} # think", "'Q {prompt}'"), ("logging.name=exp #3", "'exp'"),
                         ("logging.name=#3", "None"), ("method={name: grpo} # the baseline", "{'name': 'grpo'}")):
        with pytest.raises(ConfigError, match=rf"YAML reads the text from '#' on as a comment, which would leave the "
                                              rf"value {re.escape(kept)}; quote the value"):
            parse_set_option(option)
    with pytest.raises(ConfigError, match=r"YAML ends the value before '\.\.\.', which would leave the value 'a'"):
        parse_set_option("logging.name=a\n...")
    assert parse_set_option("logging.name='exp #3'")[1] == "exp #3"
    assert parse_set_option('logging.name="exp #3"')[1] == "exp #3"
    assert parse_set_option("logging.name=exp#3")[1] == "exp#3"


def test_malformed_data_row_is_reported_with_file_and_line(tmp_path, tiny_model_dir):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=" "answer": "4"}\n')
    config = write_config(tmp_path / "run.yaml", make_config(tiny_model_dir, data, None))
    result = run_cli("train", str(config), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "prompts.jsonl:2" in result.stderr and "Traceback" not in result.stderr


def test_prompt_longer_than_context_is_reported_before_the_weights_load(tmp_path, tiny_model_dir, monkeypatch):
    """The context is read from config.json: a large model need not load for the prompts to be refused."""
    from entrorl.trainer import loop

    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "1+" * 40 + "1=", "answer": "41"}) + "\n")
    loaded = []
    monkeypatch.setattr(loop, "load_causal_lm", lambda *args, **kwargs: loaded.append(args) or pytest.fail("loaded"))
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: 82 prompt tokens \+ max_new_tokens 6 > context 64"):
        Trainer(load_config(make_config(tiny_model_dir, data, None)), run_dir=tmp_path / "run")
    assert not loaded


def test_chat_template_asked_of_a_tokenizer_without_one_fails_clearly(tmp_path, tiny_model_dir, arithmetic_files):
    train, _ = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, None, model={"path": str(tiny_model_dir), "chat_template": True}))
    with pytest.raises(ValueError, match="model.chat_template is true, but the tokenizer .* has no chat template"):
        Trainer(config, run_dir=tmp_path / "run")


def test_resume_without_checkpoint_fails_clearly(tmp_path, tiny_model_dir, arithmetic_files):
    train, _ = arithmetic_files
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(load_config(make_config(tiny_model_dir, train, None)), run_dir=tmp_path / "empty", resume=True)


def test_a_fresh_run_refuses_a_directory_with_checkpoints_and_resume_survives_a_cut_metrics_line(
        tmp_path, tiny_model_dir, arithmetic_files):
    """Starting over in a run directory would prune the earlier run's checkpoints: refused. A crash in the middle of
    writing metrics.jsonl leaves a partial last line: resume drops it."""
    train, _ = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, None, optim={"steps": 2, "lr": 1e-3}, checkpoint={"every": 1}))
    run_dir = tmp_path / "run"
    Trainer(config, run_dir=run_dir).train()
    with pytest.raises(FileExistsError, match=r"holds another run's checkpoints \(latest: step_000002\); pass --resume"):
        Trainer(config, run_dir=run_dir)
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"step": 3, "reward/mean": 0.')  # killed mid-line
    assert [record["step"] for record in read_metrics(run_dir)] == [1, 2]
    extended = load_config(make_config(tiny_model_dir, train, None, optim={"steps": 3, "lr": 1e-3}, checkpoint={"every": 1}))
    Trainer(extended, run_dir=run_dir, resume=True).train()
    assert [record["step"] for record in read_metrics(run_dir)] == [1, 2, 3]
    # trainer states deleted to save room: the models are still the run's, and a fresh start would set them aside
    # and replace its metrics.jsonl
    for state in (run_dir / "checkpoints").glob("step_*/trainer.pt"):
        state.unlink()
    with pytest.raises(FileExistsError, match=r"holds another run's trained models in checkpoints that cannot be "
                                              r"resumed \(step_000002: trainer.pt is missing; step_000003: trainer.pt "
                                              r"is missing\): move them out of .*checkpoints, or choose another"):
        Trainer(extended, run_dir=run_dir)
    assert [record["step"] for record in read_metrics(run_dir)] == [1, 2, 3]


def test_resume_takes_the_new_schedule_and_optimiser_settings_and_refuses_a_different_run(
        tmp_path, tiny_model_dir, arithmetic_files):
    """A resumed run trains with its own configuration: a longer run stretches a decaying schedule from where the
    checkpoint stands (not the old schedule's last rate), and a new lr / weight decay apply from the next step. What
    would make it another run (method, data, seed, model) is refused before any model loads, naming each key."""
    train, held_out = arithmetic_files

    def config(**optim):
        return load_config(make_config(tiny_model_dir, train, None, checkpoint={"every": 2},
                                       optim={"steps": 4, "lr": 1e-3, "lr_schedule": "linear", **optim}))

    run_dir = tmp_path / "run"
    Trainer(config(), run_dir=run_dir).train()
    assert [round(r["train/lr"], 8) for r in read_metrics(run_dir)] == [1e-3, 7.5e-4, 5e-4, 2.5e-4]
    from entrorl.trainer.checkpoint import load_trainer_state

    saved = load_trainer_state(run_dir / "checkpoints" / "step_000004")["config"]  # its files, from anywhere
    assert saved["data"]["train"] == os.path.realpath(train) and saved["model"]["path"] == os.path.realpath(tiny_model_dir)
    resumed = Trainer(config(steps=8, lr=2e-3, weight_decay=0.5), run_dir=run_dir, resume=True)
    assert {key for key, _, _ in resumed.resume_changes} == {"optim.steps", "optim.lr", "optim.weight_decay"}
    assert resumed.resume_learning_rate == pytest.approx((0.0, 1e-3))  # the old schedule had ended; now 2e-3 (1 - 4/8)
    assert resumed.optimizer.param_groups[0]["weight_decay"] == 0.5
    resumed.train()
    # step 5 is update 4 of 8 on the linear schedule: 2e-3 * (1 - 4/8); before, it ran at the old schedule's 0
    assert [round(r["train/lr"], 8) for r in read_metrics(run_dir)][4:] == [1e-3, 7.5e-4, 5e-4, 2.5e-4]

    # the same run spelled differently is no change: the method as a dict, the estimator named, a path spelled otherwise;
    # nor is the model's path, which only locates a reference model (none here: the policy is the checkpoint's)
    same = make_config(Path(os.path.relpath(tiny_model_dir)).parent / "." / tiny_model_dir.name, train, None,
                       method={"method": "grpo"}, advantage={"name": "grpo"}, checkpoint={"every": 2},
                       optim={"steps": 8, "lr": 2e-3, "weight_decay": 0.5, "lr_schedule": "linear"})
    moved = {**same, "model": {"path": str(tmp_path / "moved-model")}}
    for config_now, expected in ((same, []), (moved, [("model.path", str(tiny_model_dir), str(tmp_path / "moved-model"))])):
        trainer = Trainer(load_config(config_now), run_dir=run_dir, resume=True)
        trainer.close()
        assert trainer.resume_changes == expected

    changed = make_config(tiny_model_dir, held_out, None, method="clip_b", seed=8,
                          optim={"steps": 9, "lr": 1e-3, "lr_schedule": "linear"})
    with pytest.raises(ValueError, match=r"--resume cannot change what the run was trained with:\n"
                                         r"  method: 'grpo' in the checkpoint, 'clip_b' now\n"
                                         r"  seed: 7 in the checkpoint, 8 now\n"):
        Trainer(load_config({**changed, "model": {"path": str(tmp_path / "no-model-needed")}}), run_dir=run_dir, resume=True)


def test_resume_refuses_prompts_edited_in_place_and_accepts_the_same_rows_rewritten(tmp_path, tiny_model_dir, arithmetic_files):
    """The same data.train with as many rows, one answer changed, is another run's data: refused before training; the
    same rows written again (another file's bytes, the same prompts and answers) resume."""
    train = tmp_path / "train.jsonl"
    rows = [json.loads(line) for line in arithmetic_files[0].read_text().splitlines()]
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run_dir = tmp_path / "run"
    Trainer(load_config(make_config(tiny_model_dir, train, None, optim={"steps": 1})), run_dir=run_dir).train()
    resumed = load_config(make_config(tiny_model_dir, train, None, optim={"steps": 2}))
    train.write_text("".join(json.dumps(row, indent=None, separators=(",", ":")) + "\n" for row in rows))
    Trainer(resumed, run_dir=run_dir, resume=True).close()
    rows[5]["answer"] = str(int(rows[5]["answer"]) + 1)
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"--resume: the prompts of data.train are not those the checkpoint was trained "
                                         r"on: the state was saved over other records \(as many, but"):
        Trainer(resumed, run_dir=run_dir, resume=True)


def test_resume_takes_the_same_prompts_from_a_moved_file_and_refuses_others_before_the_model_loads(
        tmp_path, tiny_model_dir, arithmetic_files, monkeypatch):
    """data.train naming another file (the data moved, or a laboratory folder renamed) resumes when its prompts are the
    checkpoint's, listing the change; other prompts are refused naming both files, before any model loads."""
    train = tmp_path / "train.jsonl"
    shutil.copy(arithmetic_files[0], train)
    run_dir = tmp_path / "run"
    Trainer(load_config(make_config(tiny_model_dir, train, None, optim={"steps": 1})), run_dir=run_dir).train()
    moved = tmp_path / "elsewhere" / "prompts.jsonl"
    moved.parent.mkdir()
    train.rename(moved)
    trainer = Trainer(load_config(make_config(tiny_model_dir, moved, None, optim={"steps": 2})), run_dir=run_dir,
                      resume=True)
    assert trainer.resume_changes == [("data.train", str(train), str(moved)), ("optim.steps", 1, 2)]
    trainer.train()
    assert [row["step"] for row in read_metrics(run_dir)] == [1, 2]
    rows = moved.read_text().splitlines()
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(rows[1:] + rows[:1]) + "\n")  # the same rows in another order: other data
    monkeypatch.setattr(Trainer, "_load_policy", lambda *args: pytest.fail("the model loaded before the data's check"))
    with pytest.raises(ValueError, match=rf"--resume: the prompts of data.train \('{re.escape(str(other))}'; the "
                                         rf"checkpoint's: '{re.escape(str(moved))}'\) are not those the checkpoint"):
        Trainer(load_config(make_config(tiny_model_dir, other, None, optim={"steps": 3})), run_dir=run_dir, resume=True)


def test_resume_of_a_checkpoint_without_a_digest_of_its_prompts_keeps_data_train(tmp_path, tiny_model_dir,
                                                                                  arithmetic_files, monkeypatch):
    """A checkpoint written before the stream kept a digest of its prompts cannot tell whether another file holds the
    same ones: a changed data.train is refused there, as it was before a moved file could resume."""
    from entrorl.data import PromptStream

    original = PromptStream.state_dict
    monkeypatch.setattr(PromptStream, "state_dict",
                        lambda self: {key: value for key, value in original(self).items() if key != "records_digest"})
    train, copy = tmp_path / "train.jsonl", tmp_path / "copy.jsonl"
    shutil.copy(arithmetic_files[0], train)
    shutil.copy(arithmetic_files[0], copy)
    run_dir = tmp_path / "run"
    Trainer(load_config(make_config(tiny_model_dir, train, None, optim={"steps": 1})), run_dir=run_dir).train()
    with pytest.raises(ValueError, match=r"  data.train: .* now\nthis checkpoint keeps no digest of its prompts"):
        Trainer(load_config(make_config(tiny_model_dir, copy, None, optim={"steps": 2})), run_dir=run_dir, resume=True)
    Trainer(load_config(make_config(tiny_model_dir, train, None, optim={"steps": 2})), run_dir=run_dir,
            resume=True).close()


def test_a_checkpoint_records_its_software_and_a_resume_under_other_versions_says_so(
        tmp_path, tiny_model_dir, arithmetic_files, monkeypatch):
    """Each checkpoint records the Python, entrorl, torch and transformers versions it was written with; a resume under
    other ones continues but lists them, since the same-seed equality with an uninterrupted run needs the same ones."""
    import platform

    import transformers
    from typer.testing import CliRunner

    import entrorl
    from entrorl.cli import app
    from entrorl.trainer import checkpoint as checkpoints

    train, _ = arithmetic_files
    config = write_config(tmp_path / "run.yaml", make_config(tiny_model_dir, train, None, optim={"steps": 2}))
    run_dir = tmp_path / "run"
    first = CliRunner().invoke(app, ["train", str(config), "--run-dir", str(run_dir)])
    assert first.exit_code == 0, first.output
    software = checkpoints.load_trainer_state(run_dir / "checkpoints" / "step_000002")["software"]
    assert software == {"python": platform.python_version(), "entrorl": entrorl.__version__, "torch": torch.__version__,
                        "transformers": transformers.__version__}
    assert checkpoints.software_changes(software) == [] and checkpoints.software_changes(None) == []

    other = {**software, "torch": "9.9.9", "entrorl": "0.0.1"}
    monkeypatch.setattr(checkpoints, "software_versions", lambda: other)
    monkeypatch.setattr("entrorl.trainer.loop.software_versions", lambda: other)
    resumed = CliRunner().invoke(app, ["train", str(config), "--set", "optim.steps=3", "--run-dir", str(run_dir), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    output = " ".join(resumed.output.split())
    assert (f"software changed since that checkpoint: entrorl {entrorl.__version__} -> 0.0.1, torch {torch.__version__} "
            "-> 9.9.9; the run continues") in output, resumed.output
    # the checkpoint it writes records the versions of the process that wrote it
    assert checkpoints.load_trainer_state(run_dir / "checkpoints" / "step_000003")["software"]["torch"] == "9.9.9"


def test_a_resume_says_when_this_version_builds_the_method_otherwise_than_the_checkpoint_s(
        tmp_path, tiny_model_dir, arithmetic_files, monkeypatch):
    """A checkpoint names its method (``icepop``), which this version's registry rebuilds: a recipe that changed
    between versions (icepop's aggregation did) would change the training mid-run without a word. Each checkpoint
    records the objective it trained with, part by part, and a resume lists what this version builds otherwise."""
    from typer.testing import CliRunner

    from entrorl.cli import app
    from entrorl.trainer import checkpoint as checkpoints

    train, _ = arithmetic_files
    config = write_config(tmp_path / "run.yaml", make_config(tiny_model_dir, train, None, method="grpo",
                                                            optim={"steps": 1}))
    run_dir = tmp_path / "run"
    assert CliRunner().invoke(app, ["train", str(config), "--run-dir", str(run_dir)]).exit_code == 0
    built = checkpoints.load_trainer_state(run_dir / "checkpoints" / "step_000001")["objective_built"]
    assert built["loss_agg_mode"] == "seq-mean-token-mean" and built["surrogate"]["name"] == "ppo_clip"

    same = CliRunner().invoke(app, ["train", str(config), "--set", "optim.steps=2", "--run-dir", str(run_dir), "--resume"])
    assert same.exit_code == 0, same.output
    assert "builds the method otherwise" not in same.output

    from entrorl.objective import methods

    spec = methods.get_method("grpo")
    changed = dataclasses.replace(spec, loss_agg_mode="token-mean", surrogate=("ppo_clip", {"clip_ratio_high": 0.28}))
    monkeypatch.setitem(methods._METHODS, "grpo", changed)
    resumed = CliRunner().invoke(app, ["train", str(config), "--set", "optim.steps=3", "--run-dir", str(run_dir),
                                       "--resume"])
    assert resumed.exit_code == 0, resumed.output
    output = " ".join(resumed.output.split())
    assert ("this version builds the method otherwise than the one that wrote that checkpoint: loss_agg_mode: "
            "'seq-mean-token-mean' -> 'token-mean'; surrogate.ppo_clip.clip_ratio_high: 0.2 -> 0.28; the run continues "
            "with this version's") in output, resumed.output

    # a checkpoint written before checkpoints recorded their objective, of a method whose recipe changed since
    icepop = write_config(tmp_path / "icepop.yaml", make_config(tiny_model_dir, train, None, method="icepop",
                                                               optim={"steps": 1}))
    old_run = tmp_path / "old-run"
    assert CliRunner().invoke(app, ["train", str(icepop), "--run-dir", str(old_run)]).exit_code == 0
    state_file = old_run / "checkpoints" / "step_000001" / "trainer.pt"
    state = torch.load(io.BytesIO(state_file.read_bytes()), weights_only=False)  # not mapped: the file is rewritten
    del state["objective_built"]
    torch.save(state, state_file)
    checkpoints._write_file_list(old_run / "checkpoints" / "step_000001")  # as that version wrote it
    resumed = CliRunner().invoke(app, ["train", str(icepop), "--set", "optim.steps=2", "--run-dir", str(old_run),
                                       "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert ("that checkpoint predates the record of the objective it trained with; since, icepop: alone, it now "
            "aggregates as its paper, seq-mean-token-mean, where it took token-mean; the run continues with this "
            "version's") in " ".join(resumed.output.split()), resumed.output


_PARTS_WITH_PARAMETERS_OF_EVERY_KIND = """
from enum import Enum
from pathlib import Path

from entrorl.objective.parts import Regularizer, RegularizerTerm, register_part


class _Nothing(Regularizer):
    def __call__(self, batch, advantages, aggregate, metrics):
        return RegularizerTerm()


@register_part("recorded_tuple", description="a tuple parameter")
class TupleParameter(_Nothing):
    window: tuple[float, float] = (0.1, 0.9)


@register_part("recorded_int_keys", description="a mapping keyed by integers")
class IntKeys(_Nothing):
    weights: dict[int, float] = {1: 0.5}


class Mode(str, Enum):
    A = "a"


@register_part("recorded_enum", description="an enumeration")
class EnumParameter(_Nothing):
    mode: Mode = Mode.A


@register_part("recorded_path", description="a path")
class PathParameter(_Nothing):
    table: Path = Path("table.txt")
"""


@pytest.mark.parametrize("part", ["recorded_tuple", "recorded_int_keys", "recorded_enum", "recorded_path"])
def test_the_objective_a_checkpoint_records_resumes_whatever_its_parameters_hold(
        tmp_path, tiny_model_dir, arithmetic_files, monkeypatch, part):
    """The recorded objective is plain JSON data: a part's tuple, integer-keyed mapping, enumeration or path was
    stored as the object itself, which the weights-only loader refused (the run could not resume) or which compared
    unequal with the rebuilt one (a false 'builds the method otherwise')."""
    (tmp_path / "recorded_parts.py").write_text(_PARTS_WITH_PARAMETERS_OF_EVERY_KIND)
    monkeypatch.syspath_prepend(str(tmp_path))
    train, _ = arithmetic_files
    config = make_config(tiny_model_dir, train, None, imports=["recorded_parts"], optim={"steps": 1},
                         method={"method": "grpo", "regularizers": [part]}, checkpoint={"every": 1})
    Trainer(load_config(config), run_dir=tmp_path / "run").train()
    resumed = Trainer(load_config(config, ["optim.steps=2"]), run_dir=tmp_path / "run", resume=True)
    assert resumed.step == 1 and resumed.objective_changes == [] and resumed.recipe_notes == []
    resumed.close()


@pytest.mark.parametrize("section, key, value", [
    (None, None, None), ("logging", "a_key_another_version_had", 1),
    ("reward", "extra", [{"name": "module_on_the_old_machine:score"}]), ("logging", "wandb", True),
    ("rollout", "backend", "vllm"), ("rollout", "max_new_tokens", 9)])
def test_what_this_version_builds_from_a_checkpoint_s_settings_needs_only_its_method(section, key, value):
    """The comparison rebuilt the checkpoint's whole configuration: a setting this version does not know, or one this
    machine cannot honour (an extra reward's module, a tracker or vLLM not installed), none of which a resume is held
    to, left the comparison empty without a word, and a recipe that changed went unreported."""
    from entrorl.trainer import TrainConfig
    from entrorl.trainer.loop import _as_stored, objective_changes, trainer_objective

    config = TrainConfig.model_validate({"model": {"path": "/gone/model", "device": "cuda:7"},
                                         "data": {"train": "/gone/train.jsonl"}, "method": "dr_grpo"},
                                        context={"settings_only": True})
    recorded = _as_stored(trainer_objective(config).describe())
    recorded["surrogate"]["clip_ratio_high"] = 0.28  # as if an earlier version's dr_grpo clipped otherwise
    saved = config.model_dump(mode="json")
    if section is not None:
        saved[section][key] = value
    changes = objective_changes({"objective_built": recorded, "config": saved})
    assert ("surrogate.ppo_clip.clip_ratio_high", 0.28, 0.2) in changes
    # the divisor is the checkpoint's max_new_tokens: 9 is the checkpoint's, recorded as the default's 512
    assert [change for change in changes if change[0] == "loss_scale_factor"] == (
        [("loss_scale_factor", float(config.rollout.max_new_tokens), 9.0)] if key == "max_new_tokens" else [])
    [(setting, recorded_as, now)] = objective_changes({"objective_built": recorded,
                                                        "config": {**saved, "method": "no_such_method"}})
    assert (setting, recorded_as) == ("method", "as recorded")
    assert now.startswith("not built by this version from the checkpoint's settings: unknown method 'no_such_method'")


def test_a_setting_the_resume_changes_is_not_called_a_change_of_this_version(tmp_path, tiny_model_dir, arithmetic_files):
    """Dr. GRPO divides by rollout.max_new_tokens, which a resume may change: that is the resume's change, listed as
    such, not a method this version builds otherwise."""
    train, _ = arithmetic_files
    config = make_config(tiny_model_dir, train, None, method="dr_grpo", optim={"steps": 1}, checkpoint={"every": 1})
    Trainer(load_config(config), run_dir=tmp_path / "run").train()
    resumed = Trainer(load_config(config, ["optim.steps=2", "rollout.max_new_tokens=5"]), run_dir=tmp_path / "run",
                      resume=True)
    assert ("rollout.max_new_tokens", 6, 5) in resumed.resume_changes
    assert resumed.objective_changes == [] and resumed.objective.loss_scale_factor == 5.0
    resumed.close()


@pytest.mark.parametrize("method, noted", [("dapo+icepop", []), ("icepop", ["icepop"]), ("grpo+rft", ["rft"])])
def test_a_checkpoint_older_than_its_objective_record_hears_only_of_the_recipes_it_used_that_changed(
        tmp_path, tiny_model_dir, arithmetic_files, method, noted):
    """icepop's change was to its own aggregation: composed after dapo it trains as before; rft's selector changed
    wherever rft is composed."""
    from entrorl.trainer import checkpoint as checkpoints

    train, _ = arithmetic_files
    config = make_config(tiny_model_dir, train, None, method=method, optim={"steps": 1}, checkpoint={"every": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(load_config(config), run_dir=tmp_path / "run").train()
        step = tmp_path / "run" / "checkpoints" / "step_000001"
        state = torch.load(io.BytesIO((step / "trainer.pt").read_bytes()), weights_only=False)
        del state["objective_built"]  # as a version before the record wrote it
        torch.save(state, step / "trainer.pt")
        checkpoints._write_file_list(step)
        resumed = Trainer(load_config(config, ["optim.steps=2"]), run_dir=tmp_path / "run", resume=True)
    assert [note.split(":")[0] for note in resumed.recipe_notes] == noted
    resumed.close()


def test_a_moved_model_path_is_refused_on_resume_only_when_it_locates_a_reference_model(tiny_model_dir, arithmetic_files):
    """A resumed policy comes from its checkpoint; model.path then only says where the frozen reference loads from,
    so moving it changes the run exactly when a reference model is loaded (kl_ref, or optim.kl_reference)."""
    from entrorl.trainer.config import resume_changes

    train, _ = arithmetic_files
    for method, kl_reference, loads in (("grpo", None, False), ("kl_ref", None, True), ("grpo", True, True)):
        saved = load_config(make_config(tiny_model_dir, train, None, method=method, optim={"kl_reference": kl_reference}))
        assert saved.needs_reference() is loads
        moved = saved.model_copy(update={"model": saved.model.model_copy(update={"path": "elsewhere"})})
        refused, accepted = resume_changes(saved.model_dump(mode="json"), moved.model_dump(mode="json"),
                                           loads_reference=saved.needs_reference())
        assert [key for key, _, _ in (refused if loads else accepted)] == ["model.path"]
        assert not (accepted if loads else refused)


def test_metrics_are_flushed_every_step_and_synced_before_each_checkpoint(tmp_path, tiny_model_dir, arithmetic_files,
                                                                          monkeypatch):
    """A killed process loses no logged step (each line is flushed); fsync, which a slow disk makes cost milliseconds,
    runs once per checkpoint, before it is written, and at the end."""
    from entrorl.trainer import loggers

    train, _ = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, None, optim={"steps": 4, "lr": 1e-3}, checkpoint={"every": 2}))
    trainer = Trainer(config, run_dir=tmp_path / "run")
    metrics_file = trainer.logger._file.fileno()
    synced = []  # from here on: config.json's atomic write at the start may have had the same descriptor number
    fsync = os.fsync
    monkeypatch.setattr(loggers.os, "fsync", lambda descriptor: synced.append(descriptor) or fsync(descriptor))
    for _ in range(3):
        trainer.logger.log(trainer.step + 1, trainer.train_step())
    assert metrics_file not in synced and len(read_metrics(tmp_path / "run")) == 3  # flushed, readable, not yet synced
    trainer.save()
    assert synced.count(metrics_file) == 1
    trainer.close()
    assert synced.count(metrics_file) == 2


def run_with_a_checkpoint_per_step(tmp_path, tiny_model_dir, train, steps: int):
    """The configuration and run directory of a finished ``steps``-step run that kept a checkpoint of every step."""
    config = load_config(make_config(tiny_model_dir, train, None, optim={"steps": steps, "lr": 1e-3},
                                     checkpoint={"every": 1, "keep": steps}))
    Trainer(config, run_dir=tmp_path / "run").train()
    return config, tmp_path / "run"


def test_resume_skips_an_incomplete_checkpoint_and_names_an_unreadable_one(tmp_path, tiny_model_dir, arithmetic_files, caplog):
    config, run_dir = run_with_a_checkpoint_per_step(tmp_path, tiny_model_dir, arithmetic_files[0], steps=4)
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "step_000004" / "model" / "model.safetensors").unlink()  # the weights of the latest are gone
    with caplog.at_level("WARNING"):
        resumed = Trainer(config, run_dir=run_dir, resume=True)
    assert resumed.step == 3 and caplog.text.count("step_000004 is incomplete (model/model.safetensors is missing); "
                                                   "using step_000003 instead") == 1
    resumed.close()
    # a machine that lost power after the rename can leave empty files: that checkpoint is incomplete too
    (checkpoints / "step_000003" / "model" / "model.safetensors").write_bytes(b"")
    caplog.clear()
    with caplog.at_level("WARNING"):
        resumed = Trainer(config, run_dir=run_dir, resume=True)
    assert resumed.step == 2 and "step_000003 is incomplete (model/model.safetensors is empty); using " \
        "step_000002 instead" in caplog.text and "step_000004" not in caplog.text  # set aside by the first resume
    assert (checkpoints / "latest").read_text() == "step_000002\n"
    resumed.close()
    # a tokenizer file lost: without it the resumed run could not encode its prompts
    (checkpoints / "step_000002" / "model" / "tokenizer_config.json").unlink()
    with caplog.at_level("WARNING"):
        resumed = Trainer(config, run_dir=run_dir, resume=True)
    assert resumed.step == 1
    resumed.close()
    # damaged where the size did not change, in a checkpoint written before checksums: named when it is read
    listing = checkpoints / "step_000001" / "files.json"
    listing.write_text(json.dumps({"files": json.loads(listing.read_text())["files"]}))
    weights = checkpoints / "step_000001" / "model" / "model.safetensors"
    saved = weights.read_bytes()
    weights.write_bytes(b"x" * 40 + saved[40:])
    with pytest.raises(ValueError, match=r"the model of checkpoint .*step_000001 cannot be read \(SafetensorError: .*\); "
                                         r"delete step_000001 to resume from the checkpoint before it"):
        Trainer(config, run_dir=run_dir, resume=True)
    weights.write_bytes(saved)
    trainer_state = checkpoints / "step_000001" / "trainer.pt"
    saved = trainer_state.read_bytes()
    trainer_state.write_bytes(b"x" * 100 + saved[100:])
    with pytest.raises(ValueError, match=r"step_000001/trainer.pt cannot be read .*delete step_000001 to resume"):
        Trainer(config, run_dir=run_dir, resume=True)
    # cut short: no complete checkpoint is left, and the message says what is wrong with it, and which checkpoints the
    # earlier starts set aside
    trainer_state.write_bytes(saved[:100])
    with pytest.raises(FileNotFoundError, match=r"--resume: no checkpoint in .*checkpoints; incomplete: step_000001 "
                                                r"\(trainer.pt has 100 bytes instead of the \d+ written\); set aside by "
                                                r"earlier starts in .*passed_over: step_000002, step_000003, step_000004$"):
        Trainer(config, run_dir=run_dir, resume=True)


def flip_a_byte(path) -> None:
    """Change one bit in the middle of ``path``, away from any header or index: the size stays, the bytes do not."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_checkpoint_damaged_in_place_is_passed_over_by_resume_and_refused_by_eval(
        tmp_path, tiny_model_dir, arithmetic_files, caplog):
    """One bit changed inside a weight tensor or the optimizer state loads without an error; the CRC-32 that
    files.json keeps for every file finds it. A resume checks every file, a model reader the model's."""
    from entrorl.trainer.checkpoint import _crc32, latest_checkpoint, resolve_model_directory

    config, run_dir = run_with_a_checkpoint_per_step(tmp_path, tiny_model_dir, arithmetic_files[0], steps=3)
    checkpoints = run_dir / "checkpoints"
    listing = json.loads((checkpoints / "step_000003" / "files.json").read_text())
    assert set(listing["crc32"]) == {name for name in listing["files"] if not name.endswith((".json", ".txt", ".jinja", ".md"))}
    assert {"trainer.pt", "model/model.safetensors"} <= set(listing["crc32"])
    weights = checkpoints / "step_000003" / "model" / "model.safetensors"
    assert listing["crc32"]["model/model.safetensors"] == f"{zlib.crc32(weights.read_bytes()):08x}" == _crc32(weights)

    flip_a_byte(weights)
    flip_a_byte(checkpoints / "step_000002" / "trainer.pt")
    assert latest_checkpoint(run_dir) == checkpoints / "step_000003"  # without verify: sizes only

    # a model reader takes step 2, whose model is intact; named, a damaged checkpoint is refused with the way on
    assert resolve_model_directory(run_dir).weights == checkpoints / "step_000002" / "model"
    for given in (checkpoints / "step_000003", checkpoints / "step_000003" / "model"):
        with pytest.raises(ValueError, match=r"checkpoint .*step_000003 is damaged: model/model.safetensors does not "
                                             r"hold the bytes written.*; the newest intact one before it is .*step_000002$"):
            resolve_model_directory(given)
    assert resolve_model_directory(checkpoints / "step_000002").weights == checkpoints / "step_000002" / "model"

    # nothing intact left: the resume's error names what is wrong with each
    flip_a_byte(checkpoints / "step_000001" / "model" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"--resume: no checkpoint in .*; incomplete: step_000001 \(damaged: "
                                                r"model/model.safetensors does not hold.*step_000002 \(damaged: trainer.pt"):
        Trainer(config, run_dir=run_dir, resume=True)
    flip_a_byte(checkpoints / "step_000001" / "model" / "model.safetensors")  # the same bit back: intact again

    with caplog.at_level("WARNING"):
        resumed = Trainer(config, run_dir=run_dir, resume=True)
    assert resumed.step == 1 and resumed.resumed_from == checkpoints / "step_000001"
    resumed.close()
    assert re.search(r"step_000003 is damaged \(model/model.safetensors does not hold the bytes written: its CRC-32 is "
                     r"[0-9a-f]{8} instead of [0-9a-f]{8}\); using step_000002 instead", caplog.text)
    assert "step_000002 is damaged (trainer.pt does not hold the bytes written" in caplog.text
    assert "using step_000001 instead" in caplog.text
    # the checkpoints it passed over are set aside, where no reader takes them for the run's newest
    assert sorted(path.name for path in (checkpoints / "passed_over").iterdir()) == ["step_000002", "step_000003"]
    assert latest_checkpoint(run_dir) == checkpoints / "step_000001"
    # a checkpoint written before checksums passes: its size is all there is to check
    listing_file = checkpoints / "step_000001" / "files.json"
    listing_file.write_text(json.dumps({"files": json.loads(listing_file.read_text())["files"]}))
    assert latest_checkpoint(run_dir, verify="all") == checkpoints / "step_000001"


def test_resume_of_a_finished_run_whose_last_checkpoint_is_damaged_redoes_its_step(tmp_path, tiny_model_dir,
                                                                                     arithmetic_files):
    """The finished-run shortcut of `entrorl train --resume` ("nothing to do") checks every file of the last checkpoint,
    as the trainer's resume does: one bit changed in its weights, and the step is trained again from the one before."""
    from entrorl.trainer.checkpoint import latest_checkpoint

    config, run_dir = run_with_a_checkpoint_per_step(tmp_path, tiny_model_dir, arithmetic_files[0], steps=2)
    checkpoints = run_dir / "checkpoints"
    flip_a_byte(checkpoints / "step_000002" / "model" / "model.safetensors")
    yaml_config = write_config(tmp_path / "run.yaml", config.model_dump(mode="json"))
    result = run_cli("train", str(yaml_config), "--run-dir", str(run_dir), "--resume", "--set", "logging.progress=false")
    assert result.returncode == 0 and "nothing to do" not in result.stderr, result.stderr
    assert latest_checkpoint(run_dir, verify="all") == checkpoints / "step_000002"
    assert [path.name for path in (checkpoints / "passed_over").iterdir()] == ["step_000002"]


def test_a_resume_through_the_command_reads_each_file_of_its_checkpoint_once(tmp_path, tiny_model_dir, arithmetic_files,
                                                                           monkeypatch):
    """Checking a checkpoint's CRC-32 reads all of it (about half a second per GB): the command's finished-run check
    and the trainer's resume each did, for every resume. Now the command reads it only when the run looks finished."""
    from collections import Counter

    from typer.testing import CliRunner

    from entrorl.cli import app
    from entrorl.trainer import checkpoint

    config, run_dir = run_with_a_checkpoint_per_step(tmp_path, tiny_model_dir, arithmetic_files[0], steps=2)
    yaml_config = write_config(tmp_path / "run.yaml", config.model_dump(mode="json"))
    reads, real_crc32 = Counter(), checkpoint._crc32
    monkeypatch.setattr(checkpoint, "_crc32", lambda path: reads.update([Path(path)]) or real_crc32(path))
    resumed = run_dir / "checkpoints" / "step_000002"
    for steps, said in ((2, "nothing to do"), (3, "done")):
        reads.clear()
        result = CliRunner().invoke(app, ["train", str(yaml_config), "--run-dir", str(run_dir), "--resume", "--set",
                                          "logging.progress=false", "--set", f"optim.steps={steps}"])
        assert result.exit_code == 0 and said in result.output, result.output
        assert reads[resumed / "trainer.pt"] == reads[resumed / "model" / "model.safetensors"] == 1, reads


def prune_step_2_while_it_loads(checkpoints: Path, monkeypatch, part: str) -> list[Path]:
    """Make the first model load find step 2 pruned, as a training run that writes step 3 and prunes step 2 does; the
    ``part`` (``weights``, ``adapters``) of each load is appended to the list returned."""
    from entrorl.trainer import checkpoint

    real_load, loads = checkpoint.load_model_directory, []

    def pruned_while_loading(directory, **kwargs):
        loads.append(getattr(directory, part))
        if len(loads) == 1:
            shutil.copytree(checkpoints / "step_000002", checkpoints / "step_000003")
            (checkpoints / "latest").write_text("step_000003\n")
            shutil.rmtree(checkpoints / "step_000002")
            raise FileNotFoundError(2, "No such file or directory", str(getattr(directory, part)))
        return real_load(directory, **kwargs)

    monkeypatch.setattr(checkpoint, "load_model_directory", pruned_while_loading)
    return loads


def test_eval_of_a_run_that_prunes_the_checkpoint_it_loads_takes_the_next_newest(tmp_path, tiny_model_dir,
                                                                                  arithmetic_files, monkeypatch):
    """A run that is training writes step N+1 and prunes step N while `entrorl eval --model RUN` loads step N: eval
    takes the newest checkpoint again, says so, and records the one it evaluated."""
    from typer.testing import CliRunner

    from entrorl.cli import app

    _, run_dir = run_with_a_checkpoint_per_step(tmp_path, tiny_model_dir, arithmetic_files[0], steps=2)
    checkpoints = run_dir / "checkpoints"
    loads = prune_step_2_while_it_loads(checkpoints, monkeypatch, "weights")
    result = CliRunner().invoke(app, ["eval", "--model", str(run_dir), "--data", str(arithmetic_files[1]), "--n", "1",
                                      "--max-prompts", "2", "--max-new-tokens", "2", "--reward", "exact_match",
                                      "--out", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    assert loads == [checkpoints / "step_000002" / "model", checkpoints / "step_000003" / "model"]
    said = " ".join(result.output.split())
    assert f"{checkpoints / 'step_000002' / 'model'} was removed while it loaded (the run pruned its checkpoints): " \
           f"taking {checkpoints / 'step_000003' / 'model'}" in said
    settings = json.loads((tmp_path / "eval.json").read_text())["settings"]
    assert settings["model_directory"] == str((checkpoints / "step_000003" / "model").resolve())


def test_eval_of_a_run_that_prunes_every_checkpoint_it_loads_says_so_after_four(tmp_path, tiny_model_dir,
                                                                                  arithmetic_files, monkeypatch):
    """A run with a small checkpoint.keep that prunes each checkpoint eval takes while it loads: after four, eval stops
    saying that the run pruned them and what to do, not with the last load's error (a directory not found, or
    transformers taking the missing path for a hub id)."""
    from typer.testing import CliRunner

    from entrorl.cli import app
    from entrorl.trainer import checkpoint

    _, run_dir = run_with_a_checkpoint_per_step(tmp_path, tiny_model_dir, arithmetic_files[0], steps=2)
    checkpoints, loads = run_dir / "checkpoints", []

    def pruned_while_loading(directory, **kwargs):
        loads.append(directory.weights)
        step = checkpoints / directory.weights.parent.name
        after = f"step_{int(step.name.rpartition('_')[2]) + 1:06d}"
        shutil.copytree(step, checkpoints / after)
        (checkpoints / "latest").write_text(f"{after}\n")
        shutil.rmtree(step)
        raise FileNotFoundError(2, "No such file or directory", str(directory.weights))

    monkeypatch.setattr(checkpoint, "load_model_directory", pruned_while_loading)
    result = CliRunner().invoke(app, ["eval", "--model", str(run_dir), "--data", str(arithmetic_files[1]), "--n", "1",
                                      "--max-prompts", "2", "--max-new-tokens", "2", "--reward", "exact_match",
                                      "--out", str(tmp_path / "eval.json")])
    assert result.exit_code == 2, result.output
    assert loads == [checkpoints / f"step_{step:06d}" / "model" for step in (2, 3, 4, 5)]
    said = " ".join(result.output.split())
    assert (f"error: {run_dir}: the run pruned each of the 4 checkpoints taken while they loaded (the last, "
            f"{checkpoints / 'step_000005' / 'model'}): it is training with a small checkpoint.keep; evaluate a copy of "
            "a checkpoint, or raise checkpoint.keep") in said
    assert "No such file" not in said and not (tmp_path / "eval.json").exists()


@pytest.mark.parametrize("command", ["train", "eval", "data audit", "lab"])
def test_a_command_started_by_a_launcher_of_several_processes_is_refused_before_anything_loads(
        tmp_path, tiny_model_dir, arithmetic_files, monkeypatch, command):
    """`torchrun --nproc_per_node 2 entrorl train ...` (WORLD_SIZE=2 in each process): every process would train, sample
    or run the laboratory on its own into the same outputs; each command refuses, naming what to use instead, before
    any model, data or output folder is touched."""
    from typer.testing import CliRunner

    from entrorl.cli import app
    from entrorl.trainer import checkpoint

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(checkpoint, "load_model_directory", lambda *args, **kwargs: pytest.fail("a model loaded"))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(make_config(tiny_model_dir, arithmetic_files[0], None)))
    out = tmp_path / "out"
    arguments = {
        "train": ["train", str(config), "--run-dir", str(out)],
        "eval": ["eval", "--model", str(tiny_model_dir), "--data", str(arithmetic_files[1]), "--out", str(out / "e.json")],
        "data audit": ["data", "audit", "--data", str(arithmetic_files[1]), "--model", str(tiny_model_dir), "--out", str(out)],
        "lab": ["lab", "--preset", "quick", "--out", str(out)],
    }[command]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 2, result.output
    what = {"train": "entrorl's Trainer", "lab": "the laboratory"}.get(command, f"entrorl {command}")
    assert f"error: {what} runs in one process, but this one was started as one of 2" in " ".join(result.output.split())
    assert not out.exists()


def test_a_named_checkpoint_whose_model_was_cut_short_is_refused_with_the_sizes_and_the_one_before_it(
        tmp_path, tiny_model_dir, arithmetic_files):
    """A model file of another size than written (a copy or a write cut short) is said as such, with the newest intact
    checkpoint before it, not as an unreadable weight file to save again; a cut trainer.pt does not stop a model
    reader, which does not read it."""
    from entrorl.trainer.checkpoint import resolve_model_directory

    _, run_dir = run_with_a_checkpoint_per_step(tmp_path, tiny_model_dir, arithmetic_files[0], steps=2)
    checkpoints = run_dir / "checkpoints"
    weights = checkpoints / "step_000002" / "model" / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as file:
        file.truncate(size // 2)
    for given in (checkpoints / "step_000002", checkpoints / "step_000002" / "model"):
        with pytest.raises(ValueError, match=rf"^checkpoint .*step_000002 is incomplete \(model/model.safetensors has "
                                             rf"{size // 2} bytes instead of the {size} written\); the newest intact one "
                                             r"before it is .*step_000001$"):
            resolve_model_directory(given)
    assert resolve_model_directory(run_dir).weights == checkpoints / "step_000001" / "model"
    with (checkpoints / "step_000001" / "trainer.pt").open("r+b") as file:
        file.truncate(100)
    assert resolve_model_directory(checkpoints / "step_000001").weights == checkpoints / "step_000001" / "model"


def test_after_a_resume_that_passed_over_checkpoints_the_resumed_run_s_own_are_the_newest(
        tmp_path, tiny_model_dir, arithmetic_files):
    """Step 2's and 3's trainer states are damaged, so the resume continues from step 1 and sets both aside, with a
    warning naming them. The steps it trains then write the run's newest checkpoints: an evaluation of the run directory
    takes them, not the abandoned step 3 whose model is intact, and the pruning keeps them and step 1. A later resume that
    passes over a step of the same name again keeps both copies."""
    from entrorl.trainer.checkpoint import latest_checkpoint, resolve_model_directory

    train, _ = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, None, optim={"steps": 3, "lr": 1e-3},
                                     checkpoint={"every": 1, "keep": 3}))
    run_dir = tmp_path / "run"
    Trainer(config, run_dir=run_dir).train()
    root = run_dir / "checkpoints"
    flip_a_byte(root / "step_000002" / "trainer.pt")
    flip_a_byte(root / "step_000003" / "trainer.pt")

    with pytest.warns(UserWarning, match=r"moved the checkpoints this resume passed over \(incomplete or damaged\) to "
                                         r".*passed_over: step_000002, step_000003"):
        resumed = Trainer(config, run_dir=run_dir, resume=True)
    try:
        assert resumed.step == 1
        resumed.train_step()
        assert resumed.save() == root / "step_000002"
    finally:
        resumed.close()
    assert latest_checkpoint(run_dir) == root / "step_000002"
    assert resolve_model_directory(run_dir).weights == root / "step_000002" / "model"
    assert sorted(path.name for path in root.iterdir() if path.is_dir()) == ["passed_over", "step_000001", "step_000002"]
    assert (root / "latest").read_text() == "step_000002\n"

    flip_a_byte(root / "step_000002" / "trainer.pt")
    with pytest.warns(UserWarning, match=r"passed over .* step_000002.1$"):
        Trainer(config, run_dir=run_dir, resume=True).close()
    assert sorted(path.name for path in (root / "passed_over").iterdir()) == ["step_000002", "step_000002.1", "step_000003"]
    assert (root / "latest").read_text() == "step_000001\n"


def test_latest_pointer_problems_are_named_once(tmp_path, tiny_model_dir, arithmetic_files, caplog):
    """An empty ``latest``, one naming a deleted checkpoint, and a checkpoint written before files.json (judged by its
    trainer state, config and weights)."""
    from entrorl.trainer.checkpoint import latest_checkpoint

    _, run_dir = run_with_a_checkpoint_per_step(tmp_path, tiny_model_dir, arithmetic_files[0], steps=2)
    root = run_dir / "checkpoints"
    assert json.loads((root / "step_000002" / "files.json").read_text())["files"]["trainer.pt"] == \
        (root / "step_000002" / "trainer.pt").stat().st_size
    (root / "latest").write_text("")
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(run_dir) == root / "step_000002"
        assert latest_checkpoint(run_dir) == root / "step_000002"
    assert caplog.text.count("latest is empty; using step_000002 instead") == 1
    # the newest checkpoint renamed into place, then the pointer's own write cut short (a full disk): the newest is taken
    (root / "latest").write_text("step_000001\n")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(run_dir) == root / "step_000002"
    assert "latest names 'step_000001', but step_000002, a later complete checkpoint, is there; using step_000002" in caplog.text
    # a copy of a checkpoint is not a checkpoint, whatever its name sorts after, nor when the pointer names it
    (root / "latest").write_text("step_000002\n")
    shutil.copytree(root / "step_000002", root / "step_000002.bak")
    assert latest_checkpoint(run_dir) == root / "step_000002"
    shutil.copytree(root / "step_000001", root / "step_000001.bak")
    (root / "latest").write_text("step_000001.bak\n")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(run_dir) == root / "step_000002"
    assert "latest names 'step_000001.bak', which is not a checkpoint's name (step_<N>); using step_000002" in caplog.text
    shutil.rmtree(root / "step_000001.bak")
    shutil.rmtree(root / "step_000002.bak")
    shutil.rmtree(root / "step_000002")
    (root / "latest").write_text("step_000002\n")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(run_dir) == root / "step_000001"
    assert "latest names 'step_000002', which is not there; using step_000001 instead" in caplog.text
    # a JSON file edited in place (a chat template added, say) keeps the checkpoint complete; an emptied one does not
    edited = root / "step_000001" / "model" / "tokenizer_config.json"
    edited.write_text(edited.read_text() + "\n")
    assert latest_checkpoint(run_dir) == root / "step_000001"
    text = edited.read_text()
    edited.write_text("")
    assert latest_checkpoint(run_dir) is None
    edited.write_text(text)
    # a checkpoint from before files.json: complete with its trainer state, config and weights, and nothing to verify
    (root / "step_000001" / "files.json").unlink()
    (root / "step_000001" / "model" / "tokenizer.json").unlink()
    assert latest_checkpoint(run_dir) == root / "step_000001"
    assert latest_checkpoint(run_dir, verify="all") == root / "step_000001"
    (root / "step_000001" / "model" / "model.safetensors").write_bytes(b"")
    assert latest_checkpoint(run_dir) is None


def test_a_checkpoint_that_cannot_be_written_leaves_nothing_behind_and_names_the_intact_one(
        tmp_path, tiny_model_dir, arithmetic_files, monkeypatch):
    """A full disk (torch.save reports it as a RuntimeError) costs the checkpoint being written, never the previous
    one, and leaves no half-written directory to keep the disk full; what earlier failures left is cleared first."""
    from entrorl.trainer import checkpoint as checkpoints_module
    from entrorl.trainer.checkpoint import CheckpointWriteError, latest_checkpoint

    train, _ = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, None, optim={"steps": 3, "lr": 1e-3}, checkpoint={"every": 1}))
    run_dir = tmp_path / "run"
    trainer = Trainer(config, run_dir=run_dir)
    trainer.train_step()
    trainer.save()
    root = run_dir / "checkpoints"
    (root / ".step_000000.tmp-1").mkdir()  # left by an earlier failed write
    trainer.train_step()

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 865600 vs 865488")

    monkeypatch.setattr(checkpoints_module.torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"writing checkpoint step_000002 in .* failed \(RuntimeError: .*unexpected pos"
                                                   r".*\); the last complete checkpoint, step_000001, is intact") as failure:
        trainer.save()
    assert "full disk" not in str(failure.value)  # this disk has room: no guess that it is full
    # where the disk has less room than a checkpoint takes, the message says what torch's error does not
    import collections
    monkeypatch.setattr(checkpoints_module.shutil, "disk_usage",
                        lambda path: collections.namedtuple("usage", "total used free")(10**9, 10**9 - 2**10, 2**10))
    with pytest.raises(CheckpointWriteError, match=r"unexpected pos .*\), probably a full disk: 0.0 MiB free there, and a "
                                                   r"checkpoint of this model takes about [0-9.]+ MiB; the last complete"):
        trainer.save()
    assert sorted(path.name for path in root.iterdir()) == ["latest", "step_000001"]
    assert latest_checkpoint(run_dir) == root / "step_000001"
    trainer.close()


def test_a_run_directory_removed_during_the_run_stops_it_instead_of_losing_its_metrics(tmp_path, tiny_model_dir,
                                                                                        arithmetic_files):
    import shutil

    from entrorl.trainer.checkpoint import CheckpointWriteError

    train, _ = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, None, optim={"steps": 3, "lr": 1e-3}, checkpoint={"every": 1}))
    run_dir = tmp_path / "run"
    trainer = Trainer(config, run_dir=run_dir)
    trainer.logger.log(1, {"reward/mean": 0.5})
    shutil.rmtree(run_dir)
    with pytest.raises(FileNotFoundError, match=r"metrics.jsonl was deleted during the run .*stopping, since step 2"):
        trainer.logger.log(2, {"reward/mean": 0.5})
    with pytest.raises(CheckpointWriteError, match=r"the run directory .* no longer exists"):
        trainer.save()
    assert not run_dir.exists()  # not silently recreated by the checkpoint
    trainer.close()


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path, tiny_model_dir, arithmetic_files):
    """Leftover checkpoints that lost their weights are not counted when old checkpoints are pruned: a run started
    among them keeps its own."""
    from entrorl.trainer.checkpoint import latest_checkpoint

    train, _ = arithmetic_files
    run_dir = tmp_path / "run"
    Trainer(load_config(make_config(tiny_model_dir, train, None, optim={"steps": 3, "lr": 1e-3},
                                    checkpoint={"every": 1, "keep": 3})), run_dir=run_dir).train()
    for weights in (run_dir / "checkpoints").glob("step_*/model/model.safetensors"):
        weights.unlink()
    assert latest_checkpoint(run_dir) is None  # nothing complete left: a fresh run may start here
    Trainer(load_config(make_config(tiny_model_dir, train, None, optim={"steps": 1, "lr": 1e-3},
                                    checkpoint={"every": 1, "keep": 1})), run_dir=run_dir).train()
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step_000001"


def test_reward_that_raises_is_counted_not_fatal(tmp_path, tiny_model_dir, arithmetic_files, caplog):
    train, _ = arithmetic_files
    failing = "def score(prompt, completion, answer, **meta):\n    raise RuntimeError('reward server down')\n"
    with importable_module(tmp_path, "flaky_reward", failing):
        config = load_config(make_config(tiny_model_dir, train, None, reward={"name": "flaky_reward:score", "max_failing_steps": 2}))
        trainer = Trainer(config, run_dir=tmp_path / "run")
        metrics = trainer.train_step()
        assert metrics["reward/errors"] == 8 and metrics["reward/error_frac"] == 1.0 and metrics["reward/mean"] == 0.0
        assert (tmp_path / "run" / "reward_errors.log").read_text().startswith("step 1, ")
        assert "reward server down" in (tmp_path / "run" / "reward_errors.log").read_text()
        # a reward that fails on every sample step after step leaves nothing to train on: the run stops, saying why
        with pytest.raises(TrainingStopped, match=r"the reward failed \(raised, or gave no number\) on every sample of 2 steps in a row .*reward_errors.log"):
            trainer.train()
        assert (tmp_path / "run" / "reward_errors.log").read_text().startswith("step 1, ")  # the first failure stays
        # the step it stopped in is in the record, as far as it got: its rewards (train_step alone logs nothing)
        (record,) = read_metrics(tmp_path / "run")
        assert record["step"] == 2 and record["reward/error_frac"] == 1.0 and record["reward/errors"] == 8
    # an extra reward that always fails is counted, but the main reward still tells the samples apart: no stop
    with importable_module(tmp_path, "flaky_extra", failing):
        config = load_config(make_config(tiny_model_dir, train, None, reward={
            "name": "exact_match", "max_failing_steps": 1, "extra": [{"name": "flaky_extra:score", "weight": 0.1}]}))
        trainer = Trainer(config, run_dir=tmp_path / "extra-run")
        with caplog.at_level(logging.WARNING, logger="entrorl.rewards.base"):
            metrics = trainer.train_step()
    assert metrics["reward/errors"] == 8 and metrics["reward/error_frac"] == 0.0
    # which reward failed is said: in the terminal's line and in the kept traceback
    assert "reward 'flaky_extra:score' failed on 8 of 8 samples (scored 0)" in caplog.text
    first_line = (tmp_path / "extra-run" / "reward_errors.log").read_text().splitlines()[0]
    # the sample's data row too: a position in the step's batch alone does not find the row
    assert re.fullmatch(r"step 1, extra reward 'flaky_extra:score': reward raised for sample 0 \(.*train\.jsonl:\d+\): "
                        r"RuntimeError: reward server down", first_line), first_line


def test_paths_under_the_home_folder_are_read_as_a_shell_reads_them(tmp_path, tiny_model_dir, arithmetic_files,
                                                                     monkeypatch):
    """``~`` in a path setting (a YAML file has no shell to expand it) is the home folder, not a folder named ``~`` in
    the working directory; also the run directory given to the trainer."""
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_model_dir, home / "models" / "tiny")
    train, _ = arithmetic_files
    shutil.copy(train, home / "train.jsonl")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    config = load_config(make_config(Path("~/models/tiny"), Path("~/train.jsonl"), Path("~/train.jsonl"),
                                     logging={"progress": False, "run_dir": "~/runs", "name": "first"}))
    assert (config.model.path, config.data.train, config.data.eval) == (
        str(home / "models" / "tiny"), str(home / "train.jsonl"), str(home / "train.jsonl"))
    Trainer(config).close()
    Trainer(config, run_dir="~/elsewhere").close()
    assert (home / "runs" / "first").is_dir() and (home / "elsewhere").is_dir() and list(work.iterdir()) == []


@contextlib.contextmanager
def files_limited_to(size: int):
    """No file of this process may grow past ``size`` bytes (EFBIG, as a full disk gives ENOSPC) inside the block."""
    import resource

    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
        signal.signal(signal.SIGXFSZ, handler)


def test_a_reward_traceback_that_does_not_fit_is_named_and_the_resumed_run_keeps_its_own(tmp_path, tiny_model_dir,
                                                                                          arithmetic_files):
    """reward_errors.log written when the disk is full: the error names it and no empty log is left; a log an earlier
    version left empty (it wrote in place) is replaced by the resumed run's first traceback, not kept forever."""
    train, _ = arithmetic_files
    flag = tmp_path / "reward-fails"
    flaky = (f"import os\ndef score(prompt, completion, answer, **meta):\n    if os.path.exists({str(flag)!r}):\n"
             f"        raise RuntimeError('reward server down')\n    return 0.0\n")
    run_dir = tmp_path / "run"
    log = run_dir / "reward_errors.log"
    with importable_module(tmp_path, "flaky_when_flagged", flaky):
        config = load_config(make_config(tiny_model_dir, train, None, reward={"name": "flaky_when_flagged:score"}))
        trainer = Trainer(config, run_dir=run_dir)
        try:
            trainer.log(trainer.train_step())
            trainer.save()
            flag.touch()
            with files_limited_to(64), pytest.raises(OSError) as failure:  # the traceback is longer than 64 bytes
                trainer.train_step()
        finally:
            trainer.close(failed=True)
        assert failure.value.filename == str(log) and not log.exists()
        assert not list(run_dir.glob(".*.tmp-*"))
        log.write_text("")  # what writing it in place left on a full disk
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            resumed = Trainer(config, run_dir=run_dir, resume=True)
        try:
            resumed.train_step()
        finally:
            resumed.close()
    assert log.read_text().startswith("step 2, ") and "reward server down" in log.read_text()


def test_evaluation_samples_with_its_own_top_k_and_top_p(tmp_path, tiny_model_dir, arithmetic_files):
    """A rollout cut to its most likely token (rollout.top_k = 1) leaves evaluation sampling from the full distribution,
    unless eval.top_k says otherwise."""
    from entrorl.rollout import HFSampler

    train, held_out = arithmetic_files
    distinct = {}
    for label, eval_section in (("own", {}), ("top_k 1", {"top_k": 1}), ("top_p tiny", {"top_p": 1e-6})):
        config = load_config(make_config(tiny_model_dir, train, held_out, rollout={"top_k": 1},
                                         eval={"n": 4, "ks": [1, 4], "max_prompts": 3, **eval_section}))
        trainer = Trainer(config, run_dir=tmp_path / label)
        sampled, original = [], HFSampler.generate
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(HFSampler, "generate", lambda self, *a, **k: sampled.append(original(self, *a, **k)) or sampled[-1])
            trainer.evaluate()
        responses = sampled[0].response_ids.view(3, 4, -1)
        distinct[label] = max(len({tuple(row.tolist()) for row in group}) for group in responses)
    assert distinct == {"own": 4, "top_k 1": 1, "top_p tiny": 1}


# two groups of four a step, resampled up to three rounds until both are informative
THREE_SAMPLING_ROUNDS = {"prompts_per_step": 2, "group_size": 4, "temperature": 1.0, "dynamic_sampling": True,
                         "max_sampling_rounds": 3}


def call_counting_reward(body: str) -> str:
    """The source of a module whose ``score(prompt, completion, answer, **meta)`` runs ``body`` with ``calls[0]``
    the number of the call, from 1 (a reward whose scores or failures depend on the order of the samples)."""
    return "calls = [0]\ndef score(prompt, completion, answer, **meta):\n    calls[0] += 1\n" + textwrap.indent(body, "    ")


@contextlib.contextmanager
def trainer_sampling_three_rounds(tmp_path, tiny_model_dir, train, name: str, reward_body: str, *, held_out=None,
                                  run: str = "run", max_new_tokens: int = 4):
    """A trainer in ``tmp_path / run`` with dynamic sampling over up to three rounds, whose reward (module ``name``)
    is ``call_counting_reward(reward_body)``, importable while the block runs."""
    with importable_module(tmp_path, name, call_counting_reward(reward_body)):
        config = load_config(make_config(tiny_model_dir, train, held_out, reward={"name": f"{name}:score"},
                                         rollout={**THREE_SAMPLING_ROUNDS, "max_new_tokens": max_new_tokens}))
        yield Trainer(config, run_dir=tmp_path / run)


def test_reward_errors_of_every_sampling_round_and_of_evaluation_are_counted(tmp_path, tiny_model_dir, arithmetic_files):
    """Dynamic sampling: a failure in a resampling round counts in reward/errors and reaches reward_errors.log;
    evaluation's failures count in eval/reward_errors."""
    train, held_out = arithmetic_files
    late_failures = "if calls[0] > 8:\n    raise RuntimeError('late failure')\nreturn 0.0\n"
    with trainer_sampling_three_rounds(tmp_path, tiny_model_dir, train, "late_reward", late_failures, held_out=held_out,
                                       max_new_tokens=6) as trainer:
        metrics = trainer.train_step()  # round 1 scores 0 everywhere (uninformative), rounds 2 and 3 fail
        evaluation = trainer.evaluate()
    assert metrics["data/sampling_rounds"] == 3.0 and metrics["reward/errors"] == 16.0
    assert metrics["reward/error_frac"] == pytest.approx(16 / 24)  # failures of every round, over every row sampled
    assert "late failure" in (tmp_path / "run" / "reward_errors.log").read_text()
    assert evaluation["eval/reward_errors"] == 3 * 2  # eval.max_prompts x eval.n samples, all failing


def test_a_reward_failing_on_some_samples_only_does_not_stop_the_run(tmp_path, tiny_model_dir, arithmetic_files):
    train, _ = arithmetic_files
    all_but_one = call_counting_reward("if calls[0] > 1:\n"
                                       "    raise RuntimeError('flaky')\n"
                                       "return 0.0\n")
    with importable_module(tmp_path, "all_but_one_failing_reward", all_but_one):
        config = load_config(make_config(tiny_model_dir, train, None,
                                         reward={"name": "all_but_one_failing_reward:score", "max_failing_steps": 1}))
        metrics = Trainer(config, run_dir=tmp_path / "run").train_step()
    assert metrics["reward/error_frac"] == 7 / 8 and metrics["reward/errors"] == 7


def test_dynamic_sampling_keeps_groups_neither_all_right_nor_all_wrong(tmp_path, tiny_model_dir, arithmetic_files):
    """DAPO's filter compares correctness, not shaped rewards: with overlong shaping an all-wrong group of different
    lengths has unequal rewards but is still dropped."""
    train, _ = arithmetic_files
    odd_prompts_unsolved = ("def score(prompt, completion, answer, **meta):\n"
                            "    return float(sum(map(ord, completion)) % 2) if int(prompt[0]) % 2 == 0 else 0.0\n")
    with importable_module(tmp_path, "parity_dyn_reward", odd_prompts_unsolved):
        config = load_config(make_config(
            tiny_model_dir, train, None,
            reward={"name": "parity_dyn_reward:score", "overlong": {"max_length": 8, "cache_length": 7}},
            rollout={"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 12, "temperature": 1.0,
                     "dynamic_sampling": True, "max_sampling_rounds": 4},
            logging={"progress": False, "samples_every": 1}))
        trainer = Trainer(config, run_dir=tmp_path / "run")
        metrics = trainer.train_step()
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples" / "step_000001.jsonl").read_text().splitlines()]
    groups: dict[int, list[bool]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row["correct"])
    assert len(rows) == 16 and metrics["data/informative_groups"] == 4 and "reward/sampled_accuracy" in metrics
    assert all(0 < sum(correct) < len(correct) for correct in groups.values())


def test_extra_rewards_join_the_training_reward_with_their_weights(tmp_path, tiny_model_dir, arithmetic_files):
    train, _ = arithmetic_files
    length = "def score(prompt, completion, answer, **meta):\n    return len(completion) / 10\n"
    with importable_module(tmp_path, "length_reward", length):
        config = load_config(make_config(tiny_model_dir, train, None, reward={
            "name": "exact_match", "extra": [{"name": "length_reward:score", "weight": -0.5}]},
            logging={"progress": False, "samples_every": 1}))
        metrics = Trainer(config, run_dir=tmp_path / "run").train_step()
        resampled = load_config(make_config(tiny_model_dir, train, None, reward={
            "name": "exact_match", "extra": [{"name": "length_reward:score", "weight": -0.5}]},
            rollout={"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 6, "temperature": 1.0,
                     "dynamic_sampling": True, "dynamic_sampling_metric": "reward", "max_sampling_rounds": 2}))
        filtered = Trainer(resampled, run_dir=tmp_path / "run-dynamic").train_step()
    assert filtered["data/informative_groups"] == 0  # the extra term differs within groups; the main reward does not
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples" / "step_000001.jsonl").read_text().splitlines()]
    for row in rows:  # exact match never holds for a random model: the reward is the weighted length term alone
        assert row["reward"] == pytest.approx(-0.5 * len(row["completion"]) / 10) and row["correct"] is False
    assert metrics["reward/accuracy"] == 0.0
    assert metrics["reward/extra/length_reward:score_mean"] == pytest.approx(sum(len(r["completion"]) for r in rows) / 10 / len(rows))
    with pytest.raises(ConfigError, match="  reward.extra.0: .*unknown reward 'no_such_reward'"):
        load_config(make_config(tiny_model_dir, train, None, reward={"name": "exact_match", "extra": [{"name": "no_such_reward"}]}))
    twice = [{"name": "exact_match", "weight": 0.1}, {"name": "exact_match", "weight": 0.2}]
    with pytest.raises(ConfigError, match="reward.extra names a reward twice"):
        load_config(make_config(tiny_model_dir, train, None, reward={"name": "math", "extra": twice}))


def test_dynamic_sampling_on_rewards_tells_groups_apart_by_their_overlong_penalty(tmp_path, tiny_model_dir,
                                                                                 arithmetic_files):
    """With ``dynamic_sampling_metric: reward`` a group is compared on the main reward with its overlong penalty: equal
    scores of responses of different lengths are different rewards."""
    from entrorl.rewards import RewardRunner

    train, _ = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, None, reward={"name": "exact_match"},
                                     rollout={"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 6,
                                              "dynamic_sampling": True, "dynamic_sampling_metric": "reward"}))
    trainer = Trainer(config, run_dir=tmp_path / "run")
    runner = RewardRunner(lambda prompt, completion, answer, **meta: 0.0, overlong={"max_length": 10, "cache_length": 4})
    result = runner(["p"] * 4, ["x"] * 4, ["a"] * 4, None, [9, 3, 3, 3])
    assert trainer._informative([result], torch.tensor([0, 0, 1, 1])).tolist() == [True, True, False, False]


def test_a_resampling_round_brings_groups_of_its_own(tmp_path, tiny_model_dir, arithmetic_files):
    """The groups of a later sampling round never join one of an earlier round: the step keeps round 1's informative
    group and round 2's first, not round 1's uninformative one."""
    train, _ = arithmetic_files
    # round 1 (calls 1-8): group 1 is (1, 0, 0, 0), group 2 all 0; round 2: both groups (1, 0, 1, 0)
    rounds = "if calls[0] <= 8:\n    return 1.0 if calls[0] == 1 else 0.0\nreturn float(calls[0] % 2)\n"
    with trainer_sampling_three_rounds(tmp_path, tiny_model_dir, train, "two_rounds_reward", rounds) as trainer:
        scored = trainer.collect()
    assert scored.rewards.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert scored.metrics["data/sampling_rounds"] == 2.0 and len(set(scored.group_ids.tolist())) == 2


def test_under_passk_dynamic_sampling_drops_a_group_with_fewer_wrong_samples_than_k(tmp_path, tiny_model_dir,
                                                                                     arithmetic_files):
    """With fewer than k wrong samples every k-subset passes and every pass@k advantage of the group is 0: such a group
    was kept as informative and the step trained on nothing."""
    train, _ = arithmetic_files
    # round 1 (calls 1-4): (1, 1, 1, 0), one wrong, k = 2; round 2: (1, 0, 1, 0)
    rounds = "if calls[0] <= 4:\n    return 0.0 if calls[0] == 4 else 1.0\nreturn float(calls[0] % 2)\n"
    with importable_module(tmp_path, "passk_rounds_reward", call_counting_reward(rounds)):
        config = load_config(make_config(tiny_model_dir, train, None, reward={"name": "passk_rounds_reward:score"},
                                         method="passk_advantage", advantage={"params": {"k": 2}},
                                         rollout={**THREE_SAMPLING_ROUNDS, "prompts_per_step": 1, "max_new_tokens": 4}))
        scored = Trainer(config, run_dir=tmp_path / "run").collect()
    assert scored.metrics["data/sampling_rounds"] == 2.0 and scored.rewards.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert bool((scored.advantages != 0).all())


@pytest.mark.parametrize("estimator", ["nsr", "psr", "w_reinforce", "signed_reward", "reinforce_pp", "unlikely"])
def test_dynamic_sampling_with_an_estimator_that_trains_on_equal_groups_is_warned_of(tmp_path, estimator):
    """An all-wrong group has NSR's advantage -1 everywhere (a batch baseline, a rank, ... give other ones): dynamic
    sampling would throw away samples the estimator learns from."""
    from entrorl.trainer import ConfigWarning

    bare = _bare_settings(tmp_path)
    settings = {**bare, "advantage": {"name": estimator}, "rollout": {**bare["rollout"], "dynamic_sampling": True}}
    with pytest.warns(ConfigWarning, match=rf"rollout.dynamic_sampling drops .* but the '{estimator}' advantage trains "
                                           "on them"):
        load_config(settings)
    for group_baseline in ("grpo", "dr_grpo", "rloo", "passk", "reinforce_pp_baseline"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConfigWarning)
            load_config({**settings, "advantage": {"name": group_baseline, "params": {"k": 2} if group_baseline == "passk" else {}}})
    # GRPO after the unlikeliness rank: an all-right group's rewards differ, so it has advantages too; passk reads the
    # verdicts, which the rank leaves as they are
    shaped = {**settings, "advantage": {"name": "grpo"}, "reward": {"name": "exact_match", "unlikeliness": {}}}
    with pytest.warns(ConfigWarning, match=r"rollout.dynamic_sampling drops .* but the 'grpo' advantage after "
                                           r"reward.unlikeliness \(which make an all-right group's rewards unequal\)"):
        load_config(shaped)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        load_config({**shaped, "advantage": {"name": "passk", "params": {"k": 2}}})
        load_config({**shaped, "reward": {"name": "exact_match", "unlikeliness": {"beta_rank": 0}}})  # shapes nothing


def test_tokens_per_second_counts_every_sampled_token_of_the_step(tmp_path, tiny_model_dir, arithmetic_files):
    """Those of the groups dynamic sampling dropped too: they were sampled in the step's time."""
    train, _ = arithmetic_files
    rounds = "if calls[0] <= 8:\n    return 0.0\nreturn float(calls[0] % 2)\n"  # round 1 uninformative, round 2 full
    with trainer_sampling_three_rounds(tmp_path, tiny_model_dir, train, "tokens_rounds_reward", rounds) as trainer:
        sampled, generate = [], trainer.sampler.generate
        trainer.sampler.generate = lambda *a, **k: sampled.append(generate(*a, **k)) or sampled[-1]
        metrics = trainer.train_step()
    assert metrics["data/sampling_rounds"] == 2.0 and len(sampled) == 2
    counted = metrics["time/tokens_per_s"] * metrics["time/step_s"]
    assert counted == pytest.approx(sum(int(rollouts.lengths.sum()) for rollouts in sampled), rel=0.02)


def test_max_sampling_rounds_counts_the_first_round(tmp_path, tiny_model_dir, arithmetic_files):
    train, _ = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, None, reward={"name": "exact_match"},
                                     rollout={"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 6,
                                              "temperature": 1.0, "dynamic_sampling": True, "max_sampling_rounds": 1}))
    trainer = Trainer(config, run_dir=tmp_path / "run")
    with pytest.warns(UserWarning, match=r"at step 1 dynamic sampling found 0 informative group\(s\) of the 2 a step "
                                         r"takes within rollout.max_sampling_rounds = 1; the step trained on the first "
                                         r"round's groups") as said:
        trainer.train()
    metrics = read_metrics(tmp_path / "run")[0]
    assert metrics["data/sampling_rounds"] == 1.0  # a random-init model never answers right: no informative group
    assert sum("dynamic sampling found" in str(warning.message) for warning in said) == 1  # once, not every step


def test_dynamic_sampling_stops_once_the_batch_is_full_and_cuts_an_overshooting_round(tmp_path, tiny_model_dir,
                                                                                      arithmetic_files):
    """A first round whose groups are all informative is the whole step (no resampling); a round that brings more
    informative groups than a step holds is cut to prompts_per_step groups (DAPO fills exactly its batch), and
    reward/error_frac divides the failures by every row sampled in the step."""
    train, _ = arithmetic_files
    alternating = "return float(calls[0] % 2)\n"
    # round 1 (calls 1-8): group 1 informative (1, 0, 0, 0), group 2 all 0, call 2 raises; round 2: both informative
    overshooting = ("if calls[0] == 2:\n    raise RuntimeError('boom')\n"
                    "if calls[0] <= 8:\n    return 1.0 if calls[0] == 1 else 0.0\nreturn float(calls[0] % 2)\n")
    with trainer_sampling_three_rounds(tmp_path, tiny_model_dir, train, "alternating_reward", alternating,
                                       run="full") as trainer:
        full = trainer.train_step()
    assert full["data/sampling_rounds"] == 1.0 and full["data/informative_groups"] == 2.0
    with trainer_sampling_three_rounds(tmp_path, tiny_model_dir, train, "overshooting_reward", overshooting,
                                       run="cut") as trainer:
        cut = trainer.train_step()
    assert cut["data/sampling_rounds"] == 2.0
    assert cut["data/informative_groups"] == 2.0  # three informative groups sampled; the step holds two
    assert cut["reward/error_frac"] == pytest.approx(1 / 16)


def test_reward_that_cannot_take_the_data_columns_fails_before_the_model_loads(tmp_path, arithmetic_files):
    """A reward without **meta while the data has extra columns would fail on every sample: refused up front."""
    train, _ = arithmetic_files
    data = tmp_path / "with_meta.jsonl"
    data.write_text("".join(json.dumps({**json.loads(line), "level": 1}) + "\n" for line in train.read_text().splitlines()))
    with importable_module(tmp_path, "strict_reward", "def score(prompt, completion, answer):\n    return 0.0\n"):
        config = load_config(make_config(tmp_path / "absent-model", data, None, reward={"name": "strict_reward:score"}))
        with pytest.raises(ValueError, match=r"reward 'score' cannot be called.*\['level'\].*data.meta_columns"):
            Trainer(config, run_dir=tmp_path / "run")


@pytest.mark.parametrize(("setting", "said"), [
    ("data.prompt_column=''", "data.prompt_column: an empty column name"),
    ("data.answer_column=''", "data.answer_column: an empty column name"),
    ("data.pass_rate_column=''", "data.pass_rate_column: an empty column name"),
    ("data.meta_columns=['']", "data.meta_columns: an empty column name"),
    ("data.meta_columns=[level, topic, level]", "data.meta_columns: 'level' listed twice"),
    ("data.answer_column=prompt", "prompt_column and answer_column are both 'prompt'"),
    ("data.meta_columns=[level, answer]", "meta_columns lists ['answer'], the prompt or answer column"),
])
def test_the_data_s_column_names_are_checked_with_the_configuration(setting, said):
    """Column names that load_prompts would refuse (an empty one raised its TypeError as a traceback out of `entrorl
    train`) are configuration errors naming the key, before any model or data loads."""
    base = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}}
    with pytest.raises(ConfigError) as refused:
        load_config(base, [setting])
    assert said in str(refused.value)


def test_one_meta_column_can_be_named_alone_as_one_lora_module_can():
    """data.meta_columns: level is [level], in YAML and with --set; a list and null are as they were."""
    base = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}}
    for given, expected in (("level", ["level"]), (["level", "topic"], ["level", "topic"]), (None, None)):
        assert load_config({**base, "data": {**base["data"], "meta_columns": given}}).data.meta_columns == expected
    assert load_config(base, ["data.meta_columns=level"]).data.meta_columns == ["level"]


def test_cli_eval_and_methods(tmp_path, tiny_model_dir, arithmetic_files):
    _, held_out = arithmetic_files
    out = tmp_path / "eval.json"
    result = invoke_cli("eval", "--model", str(tiny_model_dir), "--data", str(held_out), "--n", "4", "--k", "1,2,4",
                        "--reward", "exact_match", "--max-new-tokens", "4", "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads(out.read_text())
    assert summary["n_problems"] == 8 and set(summary["pass_at_k"]) == {"1", "2", "4"}
    assert summary["settings"]["n"] == 4 and summary["settings"]["reward"] == "exact_match" and summary["settings"]["device"] == "cpu"
    assert summary["settings"]["model_directory"] == str(tiny_model_dir.resolve())  # what --model resolved to
    assert summary["sources"] == [f"{held_out}:{line}" for line in range(1, 9)] and len(summary["pass_rates"]) == 8
    assert json.loads(result.stdout) == summary
    # not a terminal, and no width asked for: the option names must still be whole
    help_text = run_cli("eval", "--help", env={k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH")}).stdout
    assert all(option in help_text for option in ("--max-new-tokens", "--correct-threshold", "--no-require-answer"))
    methods = invoke_cli("methods", "--json")
    assert methods.returncode == 0 and {m["name"] for m in json.loads(methods.stdout)} >= {"clip_b", "kl_cov", "forking_tokens"}
    table = run_cli("methods", env={k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH")}).stdout
    assert all(f"│ {name} " in table for name in ("adaptive_entropy", "entropy_advantage", "forking_tokens"))  # whole, piped
    (dr_grpo,) = [line for line in table.splitlines() if line.startswith("│ dr_grpo ")]
    assert "loss aggregation" in table and "│ seq-mean-token-sum-norm │" in dr_grpo
    too_big = invoke_cli("eval", "--model", str(tiny_model_dir), "--data", str(held_out), "--n", "2", "--k", "4")
    assert too_big.returncode == 2 and "exceeds --n" in too_big.stderr


def test_methods_with_a_method_lists_every_parameter_of_its_parts_with_its_meaning():
    """`entrorl methods dapo+clip_b` shows each part's parameters, those left at None too (clip_b's mu_high, ppo_clip's
    clip_ratio_c), with the composition's values (DAPO's clip-higher 0.28) and their fields' descriptions; the
    configuration it suggests is one the trainer's configuration reads. An unknown name fails listing the valid ones."""
    from typer.testing import CliRunner

    from entrorl.cli import app
    from entrorl.objective.selectors import ClipB
    from entrorl.trainer.config import TrainConfig

    described = CliRunner().invoke(app, ["methods", "dapo+clip_b", "--json"])
    assert described.exit_code == 0, described.output
    described = json.loads(described.output)
    assert described["name"] == "dapo+clip_b" and [m["name"] for m in described["methods"]] == ["dapo", "clip_b"]
    assert (described["loss_agg_mode"], described["advantage_estimator"]) == ("token-mean", "grpo")
    params = {(part["name"], p["name"]): (p["value"], p["description"]) for part in described["parts"] for p in part["params"]}
    assert params[("ppo_clip", "clip_ratio_high")][0] == 0.28 and params[("ppo_clip", "clip_ratio_c")][0] is None
    assert params[("clip_b", "mu_high")] == (None, ClipB.model_fields["mu_high"].description)
    assert set(params) == {("ppo_clip", name) for name in ("clip_ratio_low", "clip_ratio_high", "clip_ratio_c")} | {
        ("clip_b", name) for name in ClipB.model_fields}
    assert described["advantage"]["params"] == {"norm_adv_by_std_in_grpo": True, "epsilon": 1e-6, "std_scope": "group"}
    table = CliRunner().invoke(app, ["methods", "clip_b"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "mu_high" in table.output and "upper bound mu^+" in table.output
    # descriptions are printed as written, not as rich markup (which took "[min_coeff, max_coeff]" for a style)
    bracketed = CliRunner().invoke(app, ["methods", "adaptive_entropy"], env={"COLUMNS": "300"})
    catalogue = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "300"})
    assert "clipped to [min_coeff, max_coeff]" in bracketed.output and "[min_coeff," in catalogue.output
    assert "method: {method: clip_b, params: {clip_ratio_low: 0.2}}" in table.output
    assert ('its parameters, set under advantage.params (defaults): norm_adv_by_std_in_grpo: true, epsilon: 1e-06, '
            'std_scope: "group"') in " ".join(table.output.split())
    config = TrainConfig.model_validate({"model": {"path": "m"}, "data": {"train": "t.jsonl"},
                                         "method": {"method": "clip_b", "params": {"clip_ratio_low": 0.1}}})
    assert config.build_objective().surrogate.clip_ratio_low == 0.1
    unknown = CliRunner().invoke(app, ["methods", "dapo+nope"])
    assert unknown.exit_code == 2 and "unknown method 'nope'" in unknown.output and "clip_b" in unknown.output


def test_methods_with_a_composition_names_the_advantages_its_training_uses():
    """The advantages `entrorl methods A+B` names are those a configuration with that method trains with: the first
    method's (nsr+clip_b: nsr; clip_b+nsr: grpo)."""
    from typer.testing import CliRunner

    from entrorl.cli import app
    from entrorl.trainer.config import TrainConfig

    for method, expected in (("nsr+clip_b", "nsr"), ("clip_b+nsr", "grpo")):
        described = CliRunner().invoke(app, ["methods", method, "--json"])
        assert described.exit_code == 0, described.output
        config = TrainConfig.model_validate({"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "method": method})
        assert json.loads(described.output)["advantage_estimator"] == config.advantage_estimator() == expected


def test_methods_says_what_a_later_method_trains_with_when_its_own_surrogate_is_set_aside():
    """dapo+clip_cov trains Clip-Cov with DAPO's clip range, not its recipe's 1/1: `entrorl methods` says so beside
    clip_cov (and in --json), and says nothing of the kind for a composition that sets nothing aside."""
    from typer.testing import CliRunner

    from entrorl.cli import app

    shown = CliRunner().invoke(app, ["methods", "dapo+clip_cov"])
    assert shown.exit_code == 0 and "warning" not in shown.output
    assert "  here: 'clip_cov' after 'dapo' trains with dapo's clip_ratio_low=0.2" in shown.output
    described = json.loads(CliRunner().invoke(app, ["methods", "dapo+clip_cov", "--json"]).output)
    assert [entry["in_composition"][:27] for entry in described["methods"]] == ["", "'clip_cov' after 'dapo' tra"]
    assert "here:" not in CliRunner().invoke(app, ["methods", "dapo+clip_b"]).output


def test_methods_passes_on_warnings_other_than_a_set_aside_surrogate(monkeypatch):
    import warnings

    from typer.testing import CliRunner

    import entrorl.objective
    from entrorl.cli import app

    built = entrorl.objective.build_objective

    def warning_build(method):
        warnings.warn("another warning", UserWarning)
        return built(method)

    monkeypatch.setattr(entrorl.objective, "build_objective", warning_build)
    with pytest.warns(UserWarning, match="another warning"):
        assert CliRunner().invoke(app, ["methods", "dapo+clip_cov"]).exit_code == 0


def test_version_option_prints_the_installed_version_and_runs_nothing(tmp_path):
    """`entrorl --version` prints the package's version (the one its metadata declares) and exits 0, even when
    a command follows it."""
    from importlib.metadata import version

    from typer.testing import CliRunner

    import entrorl
    from entrorl.cli import app

    assert entrorl.__version__ == version("entrorl")
    for arguments in (["--version"], ["--version", "train", str(tmp_path / "missing.yaml")]):
        result = CliRunner().invoke(app, arguments)
        assert result.exit_code == 0 and result.stdout == f"entrorl {entrorl.__version__}\n", result.output


def test_the_methods_table_lists_the_parameters_a_method_sets_and_leaves_out_unset_ones():
    """`entrorl methods`: each method's parameters with their defaults; one without a default (None) is not listed."""
    from typer.testing import CliRunner

    from entrorl.cli import app
    from entrorl.objective import available_methods

    (clip_b,) = [info for info in available_methods() if info.name == "clip_b"]
    assert clip_b.params["clip_ratio_low"] == 0.2 and clip_b.params["mu_high"] is None
    result = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("│ clip_b ")]
    assert "│ clip_ratio_low=0.2, clip_ratio_high=0.2, " in row and "None" not in result.stdout
    assert row.split("│")[-2].strip() == clip_b.paper and clip_b.paper.startswith("arXiv 2602.03392")
    # the laboratory's supervised baseline is named under the table, and asked for alone it is explained
    assert result.stdout.splitlines()[-1].startswith("entrorl lab also runs sft, its supervised baseline")
    result = CliRunner().invoke(app, ["methods", "sft"])
    assert result.exit_code == 2 and "sft is not a training method but the laboratory's supervised baseline" in (
        " ".join(result.output.split()))


def test_cli_eval_writes_every_sample_it_scored(tmp_path, tiny_model_dir, arithmetic_files):
    """--samples: one line per sample, prompt by prompt, from which Avg@n and every pass rate are recomputed; the
    generation batch size is an option and is recorded; --samples cannot be --out."""
    from entrorl.rewards import get_reward

    _, held_out = arithmetic_files
    samples, out = tmp_path / "deep" / "samples.jsonl", tmp_path / "eval.json"
    base = ("eval", "--model", str(tiny_model_dir), "--data", str(held_out), "--n", "3", "--k", "1,3", "--reward",
            "exact_match", "--max-new-tokens", "5")
    result = invoke_cli(*base, "--samples", str(samples), "--out", str(out), "--batch-size", "5")
    assert result.returncode == 0, result.stderr
    summary = json.loads(out.read_text())
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(lines) == 8 * 3 and summary["samples_file"] == str(samples) and summary["settings"]["batch_size"] == 5
    assert [line["source"] for line in lines] == [source for source in summary["sources"] for _ in range(3)]
    assert [line["sample"] for line in lines] == [0, 1, 2] * 8
    exact = get_reward("exact_match")
    for line in lines:
        assert line["reward"] == float(exact(line["prompt"], line["completion"], line["answer"]))
        assert line["correct"] == (line["reward"] >= summary["threshold"]) and 1 <= line["length"] <= 5
        assert not line["truncated"] or line["length"] == 5  # cut at --max-new-tokens
        assert len(line["completion_ids"]) == line["length"] and line["sampler_log_prob"] < 0
    assert any(line["truncated"] for line in lines)  # the untrained model rarely stops within 5 tokens
    assert summary["avg_at_n"] == pytest.approx(sum(line["correct"] for line in lines) / len(lines))
    assert summary["pass_rates"] == pytest.approx([sum(line["correct"] for line in lines[3 * i: 3 * i + 3]) / 3
                                                   for i in range(8)])
    for clash, message in (
            (("--samples", str(out), "--out", str(out)), f"--samples {out} is --out"),
            (("--samples", str(held_out)), f"--samples {held_out} is --data"),  # the prompts would be overwritten
            (("--out", str(out), "--samples", str(tmp_path / "eval.reward_errors.log")), "is the reward errors' log of --out")):
        refused = invoke_cli(*base, *clash)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    assert len(held_out.read_text().splitlines()) == 8
    directory = invoke_cli(*base, "--samples", str(tmp_path))
    assert directory.returncode == 2 and "--samples" in directory.stderr and "is a directory" in directory.stderr


def test_cli_eval_reports_reward_errors_threshold_and_default_ks(tmp_path, tiny_model_dir, arithmetic_files):
    """The JSON summary says how many samples the reward failed on and which threshold made a sample correct; without
    --k, the ks are the powers of two up to --n and n (the old fixed 1,4,16 refused --n 8). Without --out, the first
    traceback goes to a new file in the temporary directory, named on the terminal."""
    _, held_out = arithmetic_files
    with importable_module(tmp_path, "flaky_reward", "def score(prompt, completion, answer, **meta):\n"
                           "    if prompt.startswith('1'):\n        raise RuntimeError('boom')\n    return 0.7\n"):
        result = run_cli("eval", "--model", str(tiny_model_dir), "--data", str(held_out), "--n", "3", "--max-new-tokens", "3",
                         "--reward", "flaky_reward:score", "--correct-threshold", "0.75", "--samples",
                         str(tmp_path / "samples.jsonl"), env=environment_importing_from(tmp_path))
    assert result.returncode == 0, result.stderr
    [log] = (tmp_path / "temporary").glob("entrorl-reward-errors-*.log")
    assert f"its traceback is in {log}" in " ".join(result.stderr.split())
    assert "RuntimeError: boom" in log.read_text() and "Traceback (most recent call last)" in log.read_text()
    summary = json.loads(result.stdout)
    failing = sum(json.loads(line)["prompt"].startswith("1") for line in held_out.read_text().splitlines())
    assert failing and summary["reward_errors"] == 3 * failing
    assert summary["threshold"] == 0.75 and summary["avg_at_n"] == 0.0  # 0.7 < 0.75: nothing is correct
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert {(sample["reward"], sample["correct"]) for sample in samples} == {(0.7, False), (0.0, False)}
    assert set(summary["pass_at_k"]) == {"1", "2", "3"}
    # the count is said once, for the whole evaluation (the reward runner's own warning, at its first failing batch,
    # said it again, or with one batch's count in data audit)
    said = [f"failed on {3 * failing} of {3 * len(held_out.read_text().splitlines())} samples"]
    assert re.findall(r"failed on \d+ of \d+ samples", result.stderr) == said
    with importable_module(tmp_path, "flaky_reward", "def score(prompt, completion, answer, **meta):\n"
                           "    if prompt.startswith('1'):\n        raise RuntimeError('boom')\n    return 0.7\n"):
        audited = run_cli("data", "audit", "--model", str(tiny_model_dir), "--data", str(held_out), "--n", "3",
                          "--max-new-tokens", "3", "--reward", "flaky_reward:score", "--batch-size", "3", "--out",
                          str(tmp_path / "audit"), env=environment_importing_from(tmp_path))
    assert audited.returncode == 0, audited.stderr
    assert re.findall(r"failed on \d+ of \d+ samples", audited.stderr) == said
    # the reward written beside "correct" is the one the threshold was compared with: 0.7, not float32's 0.69999999
    with importable_module(tmp_path, "seven_tenths", "def score(prompt, completion, answer, **meta):\n    return 0.7\n"):
        exact = run_cli("eval", "--model", str(tiny_model_dir), "--data", str(held_out), "--n", "2", "--max-new-tokens",
                        "2", "--reward", "seven_tenths:score", "--correct-threshold", "0.7", "--samples",
                        str(tmp_path / "exact.jsonl"), env=environment_importing_from(tmp_path))
    assert exact.returncode == 0, exact.stderr
    rows = [json.loads(line) for line in (tmp_path / "exact.jsonl").read_text().splitlines()]
    assert {(row["reward"], row["correct"]) for row in rows} == {(0.7, True)}


def test_the_eval_command_prints_the_summary_s_metrics_under_the_checkpoint_and_data_names(tmp_path, tiny_model_dir):
    """The table on stderr shows the summary's own Avg@n, Pass@k (only the ks asked for), shares solved by no / every
    sample and histogram, under a title naming the checkpoint (step_N/model) and the data file as it is spelled,
    brackets included; the settings record the sampling options given. The reward marks every second sample of the
    first prompt, every sample of the second and none of the others right: pass rates 1/2, 1, 0, 0."""
    from typer.testing import CliRunner

    from entrorl.cli import app

    model = tmp_path / "step_000003" / "model"
    shutil.copytree(tiny_model_dir, model)
    data = tmp_path / "[b]sums.jsonl"
    data.write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": "2+2=", "answer": "4"}\n{"prompt": "3+2=", "answer": "5"}\n'
                    '{"prompt": "4+2=", "answer": "6"}\n')
    with importable_module(tmp_path, "second_prompt_reward", "calls = [0]\n\n\ndef score(prompt, completion, answer, **meta):\n"
                           "    calls[0] += 1\n    return float(answer == '4' or (answer == '3' and calls[0] % 2 == 0))\n"):
        result = CliRunner().invoke(app, ["eval", "--model", str(model), "--data", str(data), "--n", "4", "--k", "2",
                                          "--max-new-tokens", "2", "--reward", "second_prompt_reward:score",
                                          "--top-k", "3", "--top-p", "0.9", "--out", str(tmp_path / "new" / "e.json")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary == json.loads((tmp_path / "new" / "e.json").read_text())
    assert summary["pass_rates"] == [0.5, 1.0, 0.0, 0.0] and list(summary["pass_at_k"]) == ["2"]
    assert summary["pass_at_k"]["2"] == pytest.approx(11 / 24) and summary["avg_at_n"] == 0.375
    assert summary["polarisation"]["histogram"] == [2, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    assert (summary["settings"]["top_k"], summary["settings"]["top_p"]) == (3, 0.9)
    rows = [" ".join(line.strip("│ ").split()) for line in result.output.splitlines() if line.startswith("│")]
    assert "step_000003/model on [b]sums.jsonl: 4 prompts x 4 samples" in " ".join(result.output.split())
    assert [row.replace(" │ ", "|") for row in rows] == [
        "Avg@4|0.3750", "Pass@2|0.4583", "solved by no sample|0.500 (2 of 4)", "solved by every sample|0.250 (1 of 4)",
        "pass-rate histogram|2 0 0 0 0 1 0 0 0 1"]


def test_the_eval_table_s_shares_of_prompts_say_their_counts_and_never_round_to_none_or_all():
    from entrorl.cli import _share_of_prompts

    assert _share_of_prompts(0.5, 4) == "0.500 (2 of 4)"
    assert _share_of_prompts(1 / 2001, 2001) == "0.000500 (1 of 2001)"
    assert _share_of_prompts(2000 / 2001, 2001) == "0.999500 (2000 of 2001)"
    assert _share_of_prompts(0.0, 7) == "0.000 (0 of 7)" and _share_of_prompts(1.0, 7) == "1.000 (7 of 7)"


def test_the_eval_command_samples_16_per_prompt_in_batches_of_64_by_default(tmp_path, tiny_model_dir, arithmetic_files):
    from typer.testing import CliRunner

    from entrorl.cli import app

    _, held_out = arithmetic_files
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--data", str(held_out), "--max-prompts",
                                      "1", "--max-new-tokens", "1", "--reward", "exact_match"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n_samples"] == summary["settings"]["n"] == 16 and summary["settings"]["batch_size"] == 64
    assert list(summary["pass_at_k"]) == ["1", "2", "4", "8", "16"]


def test_the_closing_line_of_a_run_gives_its_first_and_last_step_and_its_last_evaluation(tmp_path):
    from entrorl.cli import _run_summary

    records = [{"step": 0, "eval/avg_at_n": 0.125, "eval/n": 4.0, "eval/pass_at_1": 0.125},
               {"step": 1, "reward/mean": 0.1, "entropy/mean": 1.5},
               {"step": 2, "reward/mean": 0.2, "entropy/mean": 1.25, "eval/avg_at_n": 0.25, "eval/n": 4.0,
                "eval/pass_at_1": 0.25, "eval/pass_at_4": 0.5, "eval/frac_solved_none": 0.5},
               {"step": 3, "reward/mean": 0.3, "entropy/mean": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    assert _run_summary(tmp_path) == (f"{tmp_path}; entropy 1.5 (step 1) -> 1 (step 3); reward 0.1 (step 1) -> 0.3 "
                                      "(step 3); eval Avg@4 0.25, Pass@1 0.25, Pass@4 0.5, solved by none 0.5 at step 2")


def test_data_reasoning_gym_lists_tasks_on_stdout_and_writes_task_jsonl_by_default(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from entrorl.cli import app
    from entrorl.data import load_prompts

    monkeypatch.chdir(tmp_path)
    listed = CliRunner().invoke(app, ["data", "reasoning-gym", "--list"])
    assert listed.exit_code == 0 and "basic_arithmetic" in listed.stdout.split("\n"), listed.output
    result = CliRunner().invoke(app, ["data", "reasoning-gym", "basic_arithmetic", "--size", "2"])
    assert result.exit_code == 0, result.output
    assert len(load_prompts(tmp_path / "basic_arithmetic.jsonl")) == 2
    unnamed = CliRunner().invoke(app, ["data", "reasoning-gym"])
    assert unnamed.exit_code == 2 and "name a task" in unnamed.output, unnamed.output
    unknown = CliRunner().invoke(app, ["data", "reasoning-gym", "no_such_task"])
    assert unknown.exit_code == 2 and "`entrorl data reasoning-gym --list` shows the installed ones" in " ".join(
        unknown.output.split()), unknown.output
    misspelt = CliRunner().invoke(app, ["data", "reasoning-gym", "basic_arithmatic"])
    assert misspelt.exit_code == 2 and "unknown reasoning-gym task 'basic_arithmatic'; did you mean 'basic_arithmetic'?" \
        in " ".join(misspelt.output.split()), misspelt.output
    assert "did you mean" not in unknown.output  # nothing near 'no_such_task'


def test_cli_writes_reasoning_gym_data_the_reward_scores(tmp_path):
    """`entrorl data reasoning-gym` writes prompts whose reference answers the reasoning_gym reward marks right; a task
    checked without a reference answer loads once rows without answers are allowed."""
    from entrorl.data import DataError, load_prompts
    from entrorl.rewards import RewardRunner, get_reward

    arithmetic = tmp_path / "arithmetic.jsonl"
    result = invoke_cli("data", "reasoning-gym", "basic_arithmetic", "--size", "3", "--seed", "1", "--out", str(arithmetic))
    assert result.returncode == 0, result.stderr
    records = load_prompts(arithmetic)
    assert len(records) == 3 and all(record.meta["task"] == "basic_arithmetic" for record in records)
    scored = RewardRunner(get_reward("reasoning_gym"))([r.prompt for r in records], [f"<answer>{r.answer}</answer>" for r in records],
                                                       [r.answer for r in records], [r.meta for r in records])
    assert scored.errors == 0 and scored.correct.all()
    colouring = tmp_path / "colouring.jsonl"
    result = invoke_cli("data", "reasoning-gym", "graph_color", "--size", "2", "--out", str(colouring))
    assert result.returncode == 0 and "require_answer" in result.stderr, result.stderr
    with pytest.raises(DataError, match="data.require_answer: false"):
        load_prompts(colouring)
    assert [record.answer for record in load_prompts(colouring, require_answer=False)] == [None, None]
    table = invoke_cli("data", "reasoning-gym", "basic_arithmetic", "--size", "3", "--out", str(tmp_path / "arithmetic.csv"))
    assert table.returncode == 2 and "must end in .jsonl" in table.stderr and not (tmp_path / "arithmetic.csv").exists()


def test_reasoning_gym_prompts_go_to_a_jsonl_file_of_any_case_and_to_no_other_format(tmp_path):
    pytest.importorskip("reasoning_gym")
    from typer.testing import CliRunner

    from entrorl.cli import app

    result = CliRunner().invoke(app, ["data", "reasoning-gym", "basic_arithmetic", "--size", "2", "--out",
                                      str(tmp_path / "set.JSONL")])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "set.JSONL").read_text().splitlines()) == 2
    refused = CliRunner().invoke(app, ["data", "reasoning-gym", "basic_arithmetic", "--size", "2", "--out",
                                       str(tmp_path / "set.csv")])
    assert refused.exit_code == 2 and "the file must end in .jsonl" in " ".join(refused.output.split()), refused.output
    assert not (tmp_path / "set.csv").exists()


def test_cli_eval_of_a_run_samples_with_the_run_s_prompt_format(tmp_path, tiny_model_dir, arithmetic_files):
    """--model naming a run or one of its checkpoints: prompts are formatted as the run trained on them (its
    data.prompt_template and model.chat_template) and responses as long as its rollouts (rollout.max_new_tokens),
    said on stderr; --prompt-template and --max-new-tokens override it."""
    train, held_out = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, None, optim={"steps": 1}, checkpoint={"every": 1},
                                     data={"prompt_template": "Q {prompt}"}))
    Trainer(config, run_dir=tmp_path / "run").train()
    base = ("eval", "--data", str(held_out), "--n", "2", "--k", "1", "--reward", "exact_match", "--max-new-tokens", "3")
    for model in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "step_000001" / "model"):
        result = invoke_cli(*base, "--model", str(model))
        assert result.returncode == 0, result.stderr
        settings = json.loads(result.stdout)["settings"]
        assert (settings["prompt_template"], settings["chat_template"]) == ("Q {prompt}", False)
        assert "data.prompt_template = 'Q {prompt}'" in result.stderr and "model.chat_template = false" in result.stderr
        assert settings["max_new_tokens"] == 3 and "rollout.max_new_tokens" not in result.stderr
    followed = invoke_cli(*base[:-2], "--model", str(tmp_path / "run"))
    assert followed.returncode == 0, followed.stderr
    assert json.loads(followed.stdout)["settings"]["max_new_tokens"] == 6 and "rollout.max_new_tokens = 6" in followed.stderr
    given = invoke_cli(*base, "--model", str(tmp_path / "run"), "--prompt-template", "{prompt}")
    assert given.returncode == 0, given.stderr
    assert json.loads(given.stdout)["settings"]["prompt_template"] == "{prompt}"
    assert "data.prompt_template" not in given.stderr and "model.chat_template = false" in given.stderr
    own_reward = invoke_cli("eval", "--data", str(held_out), "--n", "1", "--max-new-tokens", "3", "--model", str(tmp_path / "run"))
    assert own_reward.returncode == 0, own_reward.stderr  # no --reward: the run's (exact_match), not math
    assert json.loads(own_reward.stdout)["settings"]["reward"] == "exact_match"
    assert "reward.name = 'exact_match'" in " ".join(own_reward.stderr.split())
    plain = invoke_cli(*base, "--model", str(tiny_model_dir))  # a model directory: no run to follow
    assert plain.returncode == 0 and "settings of the run" not in plain.stderr, plain.stderr
    assert json.loads(plain.stdout)["settings"]["prompt_template"] == "{prompt}"


def test_cli_eval_of_a_run_gives_its_reward_the_columns_the_run_gave_it(tmp_path, tiny_model_dir, monkeypatch):
    """A run trained with data.meta_columns [] and a reward that takes no other column: eval of the run on the same
    file passed the reward every column of the file and refused it (or gave a reward with **meta other keyword
    arguments than its training did)."""
    from typer.testing import CliRunner

    from entrorl.cli import app

    (tmp_path / "entrorl_test_plain_reward.py").write_text(
        "def score(prompt, completion, answer):\n    return float(completion.strip() == answer)\n\n"
        "def leveled(prompt, completion, answer, level):\n    return float(level >= 0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "train.jsonl"
    # an 'id' column the first reward takes not, and a 'meta' object whose fields go to the second one (as training
    # spreads it: the columns are chosen before)
    data.write_text("".join(json.dumps({"prompt": f"{a}+1=", "answer": str(a + 1), "id": a, "meta": {"level": a}})
                            + "\n" for a in range(4)))
    for meta_columns, reward in (([], "score"), (["meta"], "leveled")):
        config = load_config(make_config(tiny_model_dir, data, None, optim={"steps": 1}, checkpoint={"every": 1},
                                         data={"meta_columns": meta_columns},
                                         reward={"name": f"entrorl_test_plain_reward:{reward}"}))
        Trainer(config, run_dir=tmp_path / reward).train()
        result = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / reward), "--data", str(data), "--n", "1",
                                          "--max-new-tokens", "2", "--out", str(tmp_path / "e.json")])
        assert result.exit_code == 0, result.output
        assert f"data.meta_columns = {meta_columns!r}" in " ".join(result.output.split())
        assert json.loads((tmp_path / "e.json").read_text())["n_problems"] == 4
    assert json.loads((tmp_path / "e.json").read_text())["avg_at_n"] == 1.0  # every level reached the reward
    sys.modules.pop("entrorl_test_plain_reward", None)


def test_cli_eval_meta_columns_replace_the_run_s_and_a_missing_one_of_the_run_says_so(tmp_path, tiny_model_dir,
                                                                                     monkeypatch):
    """A run trained with data.meta_columns [level], evaluated on held-out data without that column: the error says the
    columns are the run's and that --meta-columns overrides them; --meta-columns '' gives the reward none and names
    given are the ones it gets."""
    from typer.testing import CliRunner

    from entrorl.cli import app

    (tmp_path / "entrorl_test_meta_reward.py").write_text(
        "def loose(prompt, completion, answer, **meta):\n    return float(sorted(meta) in ([], ['topic']))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    train, held_out = tmp_path / "train.jsonl", tmp_path / "held_out.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"{a}+1=", "answer": str(a + 1), "level": a}) + "\n" for a in range(4)))
    held_out.write_text("".join(json.dumps({"prompt": f"{a}+2=", "answer": str(a + 2), "topic": "sum", "id": a}) + "\n"
                                for a in range(3)))
    config = load_config(make_config(tiny_model_dir, train, None, optim={"steps": 1}, checkpoint={"every": 1},
                                     data={"meta_columns": ["level"]},
                                     reward={"name": "entrorl_test_meta_reward:loose"}))
    Trainer(config, run_dir=tmp_path / "run").train()
    command = ["eval", "--model", str(tmp_path / "run"), "--data", str(held_out), "--n", "1", "--max-new-tokens", "2",
               "--out", str(tmp_path / "e.json")]
    result = CliRunner().invoke(app, command)
    assert result.exit_code != 0
    said = " ".join(result.output.split())
    assert "meta column(s) 'level' missing" in said and "['level'] are the run's data.meta_columns" in said, said
    assert "--meta-columns overrides" in said
    for option, avg in (("", 1.0), ("topic", 1.0), ("topic,id", 0.0)):
        result = CliRunner().invoke(app, [*command, "--meta-columns", option])
        assert result.exit_code == 0, result.output
        assert "data.meta_columns" not in " ".join(result.output.split())  # the option's, not the run's
        assert json.loads((tmp_path / "e.json").read_text())["avg_at_n"] == avg
    sys.modules.pop("entrorl_test_meta_reward", None)


@pytest.mark.parametrize(("option", "said"), [("level,level", "lists 'level' twice"),
                                              ("answer", "lists 'answer', the prompt or answer column")])
def test_cli_eval_meta_columns_are_checked_as_the_option(tmp_path, option, said):
    from typer.testing import CliRunner

    from entrorl.cli import app

    data = tmp_path / "eval.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2", "level": 1}\n')
    result = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "no-model"), "--data", str(data),
                                      "--reward", "exact_match", "--meta-columns", option])
    assert result.exit_code == 2 and f"error: --meta-columns {option!r} {said}" in " ".join(result.output.split())


def test_prompt_format_reads_each_setting_of_the_run_on_its_own(tmp_path, capsys):
    """Each setting the run's config.json gives is used unless given; one it lacks falls back with a warning; a
    checkpoints/ linked to other storage still leads to its run."""
    from entrorl.cli import DEFAULT_MAX_NEW_TOKENS, _run_defaults

    run, storage = tmp_path / "run", tmp_path / "scratch"
    (storage / "step_000001" / "model").mkdir(parents=True)
    run.mkdir()
    (run / "checkpoints").symlink_to(storage, target_is_directory=True)
    (run / "config.json").write_text(json.dumps({"seed": 1, "data": {"prompt_template": "Q: {prompt}"},
                                                  "model": {"dtype": "bfloat16"}, "rollout": {"max_new_tokens": 12}}))
    model = run / "checkpoints" / "step_000001" / "model"
    defaults = _run_defaults(model, None, None, None, "math")
    assert (*defaults[:3], defaults.dtype) == ("Q: {prompt}", False, 12, "bfloat16")
    err = capsys.readouterr().err
    assert "data.prompt_template = 'Q: {prompt}'" in err and "does not give model.chat_template" in err
    assert "model.dtype = bfloat16" in err
    assert _run_defaults(model, None, None, None, "math", dtype="float32").dtype == "float32"  # --dtype wins
    capsys.readouterr()
    (run / "config.json").write_text(json.dumps({"data": {"prompt_template": 3}, "model": {"chat_template": True,
                                                 "dtype": "float8"}, "rollout": {"max_new_tokens": True}}))
    defaults = _run_defaults(run, None, None, None, "math")
    assert (*defaults[:3], defaults.dtype) == ("{prompt}", True, DEFAULT_MAX_NEW_TOKENS, "float32")
    assert ("does not give data.prompt_template or rollout.max_new_tokens or model.dtype"
            in " ".join(capsys.readouterr().err.split()))
    (run / "config.json").write_text(json.dumps({"rollout": {"max_new_tokens": 0}}))  # edited by hand: no length at all
    assert _run_defaults(run, "A {prompt}", False, None, "math", dtype="float16")[:3] == (
        "A {prompt}", False, DEFAULT_MAX_NEW_TOKENS)
    assert "does not give rollout.max_new_tokens; the default is used" in capsys.readouterr().err
    assert _run_defaults(run, "A {prompt}", False, 5, "math", dtype="float16", prompt_column="q",
                         answer_column="a")[:3] == ("A {prompt}", False, 5)  # all given: not read
    assert not capsys.readouterr().err
    assert _run_defaults(tmp_path, None, None, None) == ("{prompt}", False, DEFAULT_MAX_NEW_TOKENS, "math", {}, None,
                                                         "float32", "prompt", "answer", None)  # no run
    # the data's columns: the run's, said when they are not the defaults; given ones win
    (run / "config.json").write_text(json.dumps({"data": {"prompt_column": "prompt", "answer_column": "reward_model.gt"}}))
    defaults = _run_defaults(run, "{prompt}", False, 5, "math", dtype="float32")
    assert (defaults.prompt_column, defaults.answer_column) == ("prompt", "reward_model.gt")
    said = " ".join(capsys.readouterr().err.split())
    assert "data.answer_column = 'reward_model.gt'" in said and "data.prompt_column" not in said
    assert _run_defaults(run, "{prompt}", False, 5, "math", dtype="float32", answer_column="a").answer_column == "a"
    assert not capsys.readouterr().err


def test_eval_of_a_run_scores_with_the_run_s_reward_and_its_settings(tmp_path, capsys, monkeypatch):
    """Without --reward, a run's reward.name, reward.kwargs and reward.correct_threshold (after its imports) score the
    samples, as they scored the run's own evaluations, and are said; --reward gives another reward with its own
    defaults, and --correct-threshold overrides the run's threshold."""
    from entrorl.cli import _run_defaults

    monkeypatch.chdir(tmp_path)
    (tmp_path / "registers_a_reward.py").write_text("IMPORTED = True\n")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({
        "imports": ["registers_a_reward"], "data": {"prompt_template": "{prompt}"}, "model": {"chat_template": False},
        "rollout": {"max_new_tokens": 8}, "reward": {"name": "math", "kwargs": {"tolerance": 0.01}, "correct_threshold": 0.75}}))
    assert _run_defaults(run, None, None, None, dtype="float32")[3:6] == ("math", {"tolerance": 0.01}, 0.75)
    said = " ".join(capsys.readouterr().err.split())
    assert "reward.name = 'math', reward.kwargs = {'tolerance': 0.01}, reward.correct_threshold = 0.75" in said
    import registers_a_reward  # noqa: F401  (imported by the run's imports)

    assert _run_defaults(run, None, None, None, None, 0.5, "float32")[3:6] == ("math", {"tolerance": 0.01}, 0.5)
    assert _run_defaults(run, None, None, None, "exact_match", dtype="float32")[3:6] == ("exact_match", {}, None)
    (run / "config.json").write_text(json.dumps({"imports": ["no_such_module_here"], "reward": {"name": "mine:score"}}))
    with pytest.raises(ValueError, match="no_such_module_here.*run from the directory the run was trained from"):
        _run_defaults(run, "{prompt}", False, 8, dtype="float32")


def test_reward_args_go_over_the_run_s_reward_kwargs_or_are_the_options_of_the_reward_given(tmp_path, capsys):
    """``--reward-arg`` options: over the run's reward.kwargs (key by key) when the run's reward scores, the only
    options of a reward given with --reward, and of the default reward without a run; dotted keys nest, values are
    YAML, and a malformed option is refused naming --reward-arg."""
    from entrorl.cli import _reward_options, _run_defaults
    from entrorl.trainer.config import ConfigError

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"reward": {"name": "math", "kwargs": {
        "tolerance": 0.01, "x": 1, "config": {"min_terms": 2, "max_terms": 4}}}}))
    taken = _run_defaults(run, "{prompt}", False, 8, dtype="float32",
                          reward_args=["tolerance=0.5", "config.max_terms=5"])
    # one key each: a nested mapping of the run's keeps its other keys
    assert (taken.reward, taken.reward_kwargs) == ("math", {"tolerance": 0.5, "x": 1,
                                                            "config": {"min_terms": 2, "max_terms": 5}})
    given = _run_defaults(run, "{prompt}", False, 8, "exact_match", dtype="float32", reward_args=["y=2"])
    assert (given.reward, given.reward_kwargs) == ("exact_match", {"y": 2})
    assert _run_defaults(tmp_path, None, None, None, reward_args=["tolerance=0.5"]).reward_kwargs == {"tolerance": 0.5}
    with pytest.raises(ConfigError, match="'x' was given a value, so it cannot hold options"):
        _run_defaults(run, "{prompt}", False, 8, dtype="float32", reward_args=["x.y=1"])
    capsys.readouterr()

    assert _reward_options(["task=basic_arithmetic", "config.size=3", "config.seed=1", "note='2'", "empty="]) == {
        "task": "basic_arithmetic", "config": {"size": 3, "seed": 1}, "note": "2", "empty": ""}
    for option, message in (("task", "--reward-arg expects key=value"), ("=1", "--reward-arg has an empty key"),
                            ("a..b=1", "--reward-arg 'a..b=1': the key 'a..b' has an empty part"),
                            ("x={a: 1, a: 2}", "--reward-arg 'x={a: 1, a: 2}'")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            _reward_options([option])
    with pytest.raises(ConfigError, match="'a' was given a value, so it cannot hold options"):
        _reward_options(["a=1", "a.b=2"])


def test_cli_eval_and_audit_build_the_reward_with_the_reward_args_given(tmp_path, tiny_model_dir, arithmetic_files,
                                                                       monkeypatch):
    """``--reward X --reward-arg value=0.6`` builds X with that option (every score 0.6, not the factory's default 0)
    in eval and in data audit, and both summaries record it; an option the reward does not take is refused before
    sampling, naming it."""
    from typer.testing import CliRunner

    from entrorl.cli import app

    _, held_out = arithmetic_files
    monkeypatch.chdir(tmp_path)
    (tmp_path / "constant_reward.py").write_text(CONSTANT_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    common = ["--model", str(tiny_model_dir), "--data", str(held_out), "--n", "2", "--max-prompts", "2",
              "--max-new-tokens", "2", "--reward", "constant_reward:Constant"]
    result = CliRunner().invoke(app, ["eval", *common, "--reward-arg", "value=0.6", "--out", "eval.json",
                                      "--samples", "samples.jsonl"])
    assert result.exit_code == 0, result.output
    assert json.loads(Path("eval.json").read_text())["settings"]["reward_kwargs"] == {"value": 0.6}
    assert [json.loads(line)["reward"] for line in Path("samples.jsonl").read_text().splitlines()] == [
        pytest.approx(0.6)] * 4
    result = CliRunner().invoke(app, ["data", "audit", *common, "--reward-arg", "value=0.6", "--out", "aud"])
    assert result.exit_code == 0, result.output
    assert json.loads((Path("aud") / "summary.json").read_text())["settings"]["reward_kwargs"] == {"value": 0.6}
    result = CliRunner().invoke(app, ["eval", *common, "--reward-arg", "valeu=0.6"])
    assert result.exit_code == 2 and "valeu" in result.output and "sampling" not in result.output, result.output


def test_a_run_s_settings_that_are_true_or_false_instead_of_numbers_are_not_taken_for_1(tmp_path, capsys):
    """A config.json holding `true` for rollout.max_new_tokens or reward.correct_threshold (a hand-edited file) gives no
    1: the most new tokens is the default, with a warning naming the key, and the reward's own threshold is kept."""
    from entrorl.cli import DEFAULT_MAX_NEW_TOKENS, _run_defaults

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"rollout": {"max_new_tokens": True},
                                                 "reward": {"name": "math", "correct_threshold": True}}))
    defaults = _run_defaults(run, "{prompt}", False, None, dtype="float32")
    assert (defaults.max_new_tokens, defaults.reward, defaults.correct_threshold) == (DEFAULT_MAX_NEW_TOKENS, "math", None)
    said = " ".join(capsys.readouterr().err.split())
    assert "does not give rollout.max_new_tokens; the default is used" in said and "correct_threshold" not in said


CONSTANT_REWARD = """
class Constant:
    def __init__(self, value: float = 0.0):
        self.value = value

    def __call__(self, prompt, completion, answer, **meta):
        return self.value
"""


def test_eval_of_a_run_builds_the_run_s_reward_with_its_kwargs_and_threshold(tmp_path, tiny_model_dir, arithmetic_files,
                                                                            monkeypatch):
    """Without --reward, eval of a run's checkpoint scores with the run's reward built with reward.kwargs (every score
    0.6, not the factory's default 0) and judged against reward.correct_threshold (0.75: none right, where the
    reward's own 0.5 would count them all), and its summary records both."""
    from typer.testing import CliRunner

    from entrorl.cli import app

    _, held_out = arithmetic_files
    monkeypatch.chdir(tmp_path)
    (tmp_path / "constant_reward.py").write_text(CONSTANT_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    model = run / "checkpoints" / "step_000001" / "model"
    shutil.copytree(tiny_model_dir, model)
    (run / "config.json").write_text(json.dumps({
        "data": {"prompt_template": "{prompt}"}, "model": {"chat_template": False}, "rollout": {"max_new_tokens": 2},
        "reward": {"name": "constant_reward:Constant", "kwargs": {"value": 0.6}, "correct_threshold": 0.75}}))
    out, samples = tmp_path / "eval.json", tmp_path / "samples.jsonl"
    result = CliRunner().invoke(app, ["eval", "--model", str(model), "--data", str(held_out), "--n", "2",
                                      "--max-prompts", "2", "--out", str(out), "--samples", str(samples)])
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["settings"]["reward_kwargs"] == {"value": 0.6}
    assert summary["settings"]["correct_threshold"] == 0.75
    scored = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [(sample["reward"], sample["correct"]) for sample in scored] == [(pytest.approx(0.6), False)] * 4
    assert summary["avg_at_n"] == 0.0 and summary["pass_rates"] == [0.0, 0.0]


def test_cli_eval_fails_when_the_reward_failed_on_every_sample(tmp_path, tiny_model_dir, arithmetic_files):
    """Every score a 0 that says nothing: the summary is still written, and the exit is 2 with the reason."""
    _, held_out = arithmetic_files
    with importable_module(tmp_path, "broken_reward", "def score(prompt, completion, answer, **meta):\n"
                           "    raise RuntimeError('boom')\n"):
        result = run_cli("eval", "--model", str(tiny_model_dir), "--data", str(held_out), "--n", "2", "--k", "1",
                         "--max-new-tokens", "3", "--reward", "broken_reward:score", env=environment_importing_from(tmp_path))
    assert result.returncode == 2 and "the reward failed on all 16 samples" in result.stderr, result.stderr
    assert json.loads(result.stdout)["reward_errors"] == 16
    [log] = (tmp_path / "temporary").glob("entrorl-reward-errors-*.log")  # the first traceback, kept out of the system's
    assert "RuntimeError: boom" in log.read_text()


def test_cli_eval_names_a_damaged_weight_or_tokenizer_file(tmp_path, tiny_model_dir, arithmetic_files):
    """A weight file or a tokenizer file that cannot be parsed: an error naming it, no traceback."""
    import shutil

    _, held_out = arithmetic_files
    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    for case, (name, content, message) in enumerate((
            ("model.safetensors", b"garbage", "model.safetensors cannot be read (SafetensorError"),
            ("model.safetensors", weights[: len(weights) // 2], "model.safetensors cannot be read"),  # cut short
            ("tokenizer.json", b'{"bad": ', "tokenizer.json is not valid UTF-8 JSON"),
            ("tokenizer_config.json", b"[1, 2]", "tokenizer_config.json holds a JSON array"))):
        damaged = tmp_path / f"damaged-{case}"
        shutil.copytree(tiny_model_dir, damaged)
        (damaged / name).write_bytes(content)
        result = invoke_cli("eval", "--model", str(damaged), "--data", str(held_out), "--n", "2", "--k", "1",
                            "--reward", "exact_match", "--max-new-tokens", "3")
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_cli_eval_rejects_bad_inputs_without_traceback(tmp_path, tiny_model_dir, arithmetic_files):
    """A prompt longer than the context, a template with another field, and a prompt count below 1."""
    _, held_out = arithmetic_files
    long_data = tmp_path / "long.jsonl"
    long_data.write_text(held_out.read_text() + json.dumps({"prompt": "1+" * 40 + "1=", "answer": "41"}) + "\n")
    base = ("eval", "--model", str(tiny_model_dir), "--n", "2", "--k", "1", "--reward", "exact_match", "--max-new-tokens", "6")
    for extra, message in (
        (("--data", str(long_data)), "long.jsonl:9: 82 prompt tokens + max_new_tokens 6 > context 64"),
        (("--data", str(held_out), "--prompt-template", "Q{question}"), "has field(s) ['question']"),
        (("--data", str(held_out), "--max-prompts", "0"), "--max-prompts"),
    ):
        result = run_cli(*base, *extra)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_k_values_are_sorted_once_each_and_refused_below_1(capsys):
    """--k: comma-separated integers in any order, repeats and empty parts ignored; 0, a negative, a non-integer or no
    value at all is refused with exit 2 and names what was given."""
    import typer

    from entrorl.cli import _parse_ks

    assert _parse_ks("4, 1,2,2,") == [1, 2, 4] and _parse_ks(" 3 ") == [3]
    for text, message in (("0,2", "--k values must be >= 1, got '0,2'"), ("2,-1", "--k values must be >= 1"),
                          ("", "--k needs at least one k (comma-separated integers such as 1,4,16), got ''"),
                          (" , ", "--k needs at least one k"),
                          ("1,x", "--k expects comma-separated integers, got '1,x'"), ("1.5", "comma-separated integers"),
                          ("1_6", "comma-separated integers"), ("\uff18", "comma-separated integers")):  # int() reads both
        with pytest.raises(typer.Exit) as stopped:
            _parse_ks(text)
        assert stopped.value.exit_code == 2 and message in capsys.readouterr().err, text


def test_cli_eval_takes_k_up_to_n_in_any_order_and_only_the_first_max_prompts(tmp_path, tiny_model_dir, arithmetic_files):
    """--k equal to --n is allowed, the largest k (not the last written) is the one checked against --n, and
    --max-prompts evaluates that many prompts from the top of the file; the summary records the settings used."""
    from typer.testing import CliRunner

    from entrorl.cli import app

    _, held_out = arithmetic_files
    base = ["eval", "--model", str(tiny_model_dir), "--data", str(held_out), "--n", "2", "--max-new-tokens", "2",
            "--reward", "exact_match", "--max-prompts", "3"]
    result = CliRunner().invoke(app, [*base, "--k", "2,1"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert set(summary["pass_at_k"]) == {"1", "2"} and summary["n_problems"] == 3
    assert summary["sources"] == [f"{held_out}:{line}" for line in (1, 2, 3)]
    assert summary["settings"]["max_prompts"] == 3 and summary["settings"]["seed"] == 0
    assert summary["settings"]["correct_threshold"] == summary["threshold"] == 0.5  # the reward's own, as applied
    refused = CliRunner().invoke(app, [*base, "--k", "3,1"])
    assert refused.exit_code == 2 and "--k 3 exceeds --n 2" in refused.output, refused.output


def test_cli_eval_scores_rows_without_a_reference_answer_only_with_no_require_answer(tmp_path, tiny_model_dir):
    """A row without an answer is refused, naming its line, unless --no-require-answer: the reward then gets None."""
    from typer.testing import CliRunner

    from entrorl.cli import app

    data = tmp_path / "open.jsonl"
    data.write_text('{"prompt": "1+1="}\n{"prompt": "2+2=", "answer": "4"}\n')
    base = ["eval", "--model", str(tiny_model_dir), "--data", str(data), "--n", "2", "--k", "1", "--max-new-tokens", "2",
            "--reward", "answerless_reward:score"]
    with importable_module(tmp_path, "answerless_reward", "def score(prompt, completion, answer, **meta):\n"
                           "    return float(answer is None)\n"):
        refused = CliRunner().invoke(app, base)
        assert refused.exit_code == 2 and f"{data}:1" in refused.output, refused.output
        result = CliRunner().invoke(app, [*base, "--no-require-answer"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["pass_rates"] == [1.0, 0.0]


def test_cli_eval_samples_with_the_seed_temperature_and_top_k_given(tmp_path, tiny_model_dir, arithmetic_files):
    """The same --seed draws the same samples and another seed others; --temperature 0 (greedy) and --top-k 1 draw
    one completion per prompt, n times (with --temperature 0 the command says so)."""
    from typer.testing import CliRunner

    from entrorl.cli import app

    _, held_out = arithmetic_files
    n = 4
    base = ["eval", "--model", str(tiny_model_dir), "--data", str(held_out), "--n", str(n), "--k", "1",
            "--max-new-tokens", "4", "--reward", "exact_match", "--max-prompts", "3"]

    said = {}

    def completions(name: str, *options: str) -> list[list[str]]:
        samples = tmp_path / f"{name}.jsonl"
        result = CliRunner().invoke(app, [*base, "--samples", str(samples), *options])
        assert result.exit_code == 0, result.output
        said[name] = " ".join(result.output.split())
        drawn = [json.loads(line)["completion"] for line in samples.read_text().splitlines()]
        return [drawn[start: start + n] for start in range(0, len(drawn), n)]

    seeded = completions("seed-1", "--seed", "1")
    assert any(len(set(prompt)) > 1 for prompt in seeded)  # sampled at temperature 1: the samples differ
    assert completions("seed-1-again", "--seed", "1") == seeded
    assert completions("seed-2", "--seed", "2") != seeded
    for name, greedy in (("greedy", ("--temperature", "0")), ("top-1", ("--top-k", "1"))):
        assert all(len(set(prompt)) == 1 for prompt in completions(name, "--seed", "1", *greedy)), name
    assert "note: --temperature 0 samples greedily, so the 4 samples of a prompt are one answer repeated" in said["greedy"]
    assert "samples greedily" not in said["seed-1"]


def test_the_train_command_says_how_many_prompts_the_pass_rate_band_keeps(tmp_path, tiny_model_dir, monkeypatch):
    from typer.testing import CliRunner

    from entrorl.cli import app

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1), "pass_rate": rate}) + "\n"
                            for i, rate in enumerate([0.0, 0.25, 0.5, 1.0])))
    config = write_config(tmp_path / "run.yaml", make_config(tiny_model_dir, data, None))
    monkeypatch.setattr(Trainer, "train", lambda self, **options: self.run_dir)  # the set-up is what is checked
    result = CliRunner().invoke(app, ["train", str(config), "--run-dir", str(tmp_path / "run"),
                                      "--set", "data.pass_rate_band=(0, 1)"])
    assert "data.pass_rate_band (0, 1): 2 of the 4 training prompts are in the band" in " ".join(result.output.split()), \
        result.output


def test_pass_rate_band_filters_training_prompts(tmp_path, tiny_model_dir):
    data = tmp_path / "prompts.jsonl"
    rates = [0.0, 1 / 16, 0.25, 0.5, 15 / 16, 1.0]
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1), "pass_rate": rate}) + "\n"
                            for i, rate in enumerate(rates)))
    config = load_config(make_config(tiny_model_dir, data, None), ["data.pass_rate_band=(1/16, 15/16)"])
    trainer = Trainer(config, run_dir=tmp_path / "run")
    assert [r.meta["pass_rate"] for r in trainer.train_records] == [0.25, 0.5] and trainer.train_prompts_read == 6
    with pytest.raises(ConfigError, match="pass_rate_band"):
        load_config(make_config(tiny_model_dir, data, None), ["data.pass_rate_band=[0.5, 0.1]"])
    # a CSV cell is a string, and an unquoted [a, b] in YAML is a list: both are read as what they spell
    table = tmp_path / "prompts.csv"
    table.write_text("prompt,answer,pass_rate\n" + "".join(f"{i}+1=,{i + 1},{rate}\n" for i, rate in enumerate(rates)))
    config = load_config(make_config(tiny_model_dir, table, None, data={"pass_rate_band": [0.25, 0.5]}))
    assert config.data.pass_rate_band == "[0.25, 0.5]"
    trainer = Trainer(config, run_dir=tmp_path / "run-csv")
    assert [r.meta["pass_rate"] for r in trainer.train_records] == ["0.25", "0.5"]
    # a cell may spell a fraction as the band's edges may (a rate of n samples); "nan" is no rate
    table.write_text("prompt,answer,pass_rate\n" + "".join(f"{i}+1=,{i + 1},{rate}\n" for i, rate in
                                                           enumerate(["0", "1/16", "4/16", " 8 / 16 ", "15/16", "1"])))
    config = load_config(make_config(tiny_model_dir, table, None), ["data.pass_rate_band=(1/16, 15/16)"])
    assert [r.meta["pass_rate"] for r in Trainer(config, run_dir=tmp_path / "run-fractions").train_records] == [
        "4/16", " 8 / 16 "]
    table.write_text("prompt,answer,pass_rate\n1+1=,2,nan\n")
    with pytest.raises(ValueError, match=r"needs a numeric 'pass_rate' column; missing or not a number at .*prompts.csv:2"):
        Trainer(config, run_dir=tmp_path / "run-nan")
    table.write_text("prompt,answer,pass_rate\n1+1=,2,1e400\n")  # too large for a float: no rate either
    with pytest.raises(ValueError, match=r"needs a numeric 'pass_rate' column; missing or not a number at .*prompts.csv:2"):
        Trainer(config, run_dir=tmp_path / "run-overflow")


def test_pass_rate_band_reads_its_column_when_meta_columns_leave_it_out_and_the_reward_does_not_see_it(
        tmp_path, tiny_model_dir):
    """data.meta_columns names what the reward gets; the band still reads data.pass_rate_column, and the reward's
    keyword arguments stay those named (a column listed there keeps it)."""
    data = tmp_path / "prompts.jsonl"
    rates = [0.0, 1 / 16, 0.25, 0.5, 15 / 16, 1.0]
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1), "pass_rate": rate, "level": i})
                            + "\n" for i, rate in enumerate(rates)))
    band = "data.pass_rate_band=(1/16, 15/16)"
    trainer = Trainer(load_config(make_config(tiny_model_dir, data, None), [band, "data.meta_columns=[level]"]),
                      run_dir=tmp_path / "run")
    assert [r.meta for r in trainer.train_records] == [{"level": 2}, {"level": 3}]
    trainer = Trainer(load_config(make_config(tiny_model_dir, data, None), [band, "data.meta_columns=[level, pass_rate]"]),
                      run_dir=tmp_path / "run-both")
    assert [r.meta for r in trainer.train_records] == [{"level": 2, "pass_rate": 0.25}, {"level": 3, "pass_rate": 0.5}]
    # a rate column missing from a row is the band's error, not one of meta_columns (which never named it)
    data.write_text(data.read_text() + json.dumps({"prompt": "6+1=", "answer": "7", "level": 6}) + "\n")
    with pytest.raises(ValueError, match=r"^data.pass_rate_band needs a numeric 'pass_rate' column; missing at "
                                         r".*prompts.jsonl:7$"):
        Trainer(load_config(make_config(tiny_model_dir, data, None), [band, "data.meta_columns=[level]"]),
                run_dir=tmp_path / "run-no-rate")
    # a column of meta_columns that is missing is still said to be one of them
    data.write_text(data.read_text() + json.dumps({"prompt": "7+1=", "answer": "8", "pass_rate": 0.5}) + "\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:8: meta column\(s\) 'level' missing"):
        Trainer(load_config(make_config(tiny_model_dir, data, None), [band, "data.meta_columns=[level]"]),
                run_dir=tmp_path / "run-no-level")


def test_tensorboard_mirror(tmp_path, tiny_model_dir, arithmetic_files):
    pytest.importorskip("tensorboard")
    train, _ = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, None, optim={"steps": 1}, logging={"tensorboard": True, "progress": False}))
    Trainer(config, run_dir=tmp_path / "run").train()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_samples_log_keeps_each_rollout_with_its_reward_reason(tmp_path, tiny_model_dir, arithmetic_files):
    """logging.samples_every writes one line per rollout; the math reward's reason says why a sample scored 0."""
    train, _ = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, None, reward={"name": "math"},
                                     logging={"progress": False, "samples_every": 2},
                                     rollout={"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 6,
                                              "temperature": 1.0, "dynamic_sampling": True, "max_sampling_rounds": 2}))
    trainer = Trainer(config, run_dir=tmp_path / "run")
    metrics = [trainer.train_step() for _ in range(2)]
    samples = tmp_path / "run" / "samples"
    assert sorted(path.name for path in samples.iterdir()) == ["step_000002.jsonl"]  # step 1 is not a multiple of 2
    rows = [json.loads(line) for line in (samples / "step_000002.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(row["step"] == 2 for row in rows)  # P x G rows, informative or not
    assert {row["prompt"] for row in rows} <= {json.loads(line)["prompt"] for line in train.read_text().splitlines()}
    assert sum(row["reward"] for row in rows) / len(rows) == pytest.approx(metrics[1]["reward/mean"])
    for row in rows:
        assert row["completion"] is not None and row["length"] >= 0 and isinstance(row["truncated"], bool)
        assert len(row["completion_ids"]) == row["length"]
        assert trainer.tokenizer.decode(row["completion_ids"], skip_special_tokens=True) == row["completion"]
        assert row["sampler_log_prob"] <= 0.0 and (row["sampler_log_prob"] < 0.0) == (row["length"] > 0)
        if row["reward"] == 0.0:  # a random-init model answers wrongly: the record says why
            assert isinstance(row["reason"], str) and row["reason"]
    assert any(row["reward"] == 0.0 for row in rows)


def test_samples_log_gives_the_token_ids_sampled_and_their_log_probability_under_the_sampling_model(
        tmp_path, tiny_model_dir, arithmetic_files):
    """At temperature 1 without truncation the sampler's log-probability of a completion is the starting model's
    log p(completion_ids | prompt): recomputed here from the ids written, as a reader of the file would."""
    from entrorl.modeling import encode_prompt, load_causal_lm

    train, _ = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, None, logging={"progress": False, "samples_every": 1},
                                     rollout={"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 5,
                                              "temperature": 1.0}))
    trainer = Trainer(config, run_dir=tmp_path / "run")
    trainer.train_step()
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples" / "step_000001.jsonl").read_text().splitlines()]
    model = load_causal_lm(tiny_model_dir).eval()
    for row in rows:
        prompt_ids = encode_prompt(trainer.tokenizer, row["prompt"], template=config.data.prompt_template)
        ids = torch.tensor([prompt_ids + row["completion_ids"]])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(ids).logits[0, len(prompt_ids) - 1:-1].double(), dim=-1)
        expected = log_probs.gather(-1, torch.tensor(row["completion_ids"]).unsqueeze(-1)).sum().item()
        assert row["sampler_log_prob"] == pytest.approx(expected, abs=1e-3)


def test_device_setting_is_checked_before_any_model_loads(tmp_path, arithmetic_files, monkeypatch):
    train, _ = arithmetic_files
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"model.device.*no CUDA GPU"):
        load_config(make_config(tmp_path / "absent-model", train, None, model={"path": "m", "device": "cuda"}))
    with pytest.raises(ConfigError, match=r"model.device.*not a device"):
        load_config(make_config(tmp_path / "absent-model", train, None, model={"path": "m", "device": "gpu0"}))
    assert load_config(make_config(tmp_path / "absent-model", train, None, model={"path": "m"})).model.device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"model.device.*'cuda:1': there are only 1 CUDA devices"):
        load_config(make_config(tmp_path / "absent-model", train, None, model={"path": "m", "device": "cuda:1"}))
    assert load_config(make_config(tmp_path / "absent-model", train, None, model={"path": "m", "device": "cuda:0"}))


def varied_reward(prompt: str, completion: str, answer, /, **meta) -> float:
    """0, 0.5 or 1 by the completion's characters: a random model's groups then differ, and every step trains (an
    exact match of its sums would score every sample 0: no gradient)."""
    return (sum(map(ord, completion)) % 3) / 2


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_cuda_matches_the_cpu_step(tmp_path, tiny_model_dir, arithmetic_files):
    """On a GPU: two steps of an entropy method with a reference model and mini-batches train on the GPU with
    finite metrics, and the policy scores a fixed batch there as on the CPU."""
    from entrorl.modeling import bucketed_response_token_stats

    train, _ = arithmetic_files
    config = load_config(make_config(tiny_model_dir, train, None, model={"path": str(tiny_model_dir), "device": "cuda"},
                                     method="dapo+clip_b+kl_ref", reward={"name": f"{__name__}:varied_reward"},
                                     optim={"steps": 2, "lr": 1e-3, "mini_batches": 2}))
    trainer = Trainer(config, run_dir=tmp_path / "cuda")
    assert next(trainer.model.parameters()).device.type == "cuda"
    before = [parameter.detach().clone() for parameter in trainer.model.parameters()]
    steps = [trainer.train_step() for _ in range(2)]
    for key in ("reward/mean", "entropy/mean", "kl/ref_k1", "loss/total", "entropy/predicted_delta"):
        assert all(math.isfinite(step[key]) for step in steps), key
    # the updates ran on the GPU: gradients, and weights that moved (not a comparison of the untouched model)
    assert all(step["train/grad_norm"] > 0 for step in steps), [step["train/grad_norm"] for step in steps]
    assert any(not torch.equal(old, new) for old, new in zip(before, trainer.model.parameters()))
    trainer.save()

    rollouts = trainer.collect().rollouts
    fields = (rollouts.prompt_ids, rollouts.prompt_mask, rollouts.response_ids, rollouts.response_mask)
    on_gpu = bucketed_response_token_stats(trainer.model, *fields, need=("logprob", "entropy"))
    on_cpu = bucketed_response_token_stats(trainer.model.float().cpu(), *fields, need=("logprob", "entropy"))
    mask = rollouts.response_mask
    torch.testing.assert_close(on_gpu.logprob.cpu()[mask], on_cpu.logprob[mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(on_gpu.entropy.cpu()[mask], on_cpu.entropy[mask], atol=1e-4, rtol=1e-4)


def test_shared_prompts_train_exactly_like_one_pass_per_row(tmp_path, tiny_model_dir, arithmetic_files, monkeypatch):
    """optim.share_prompts changes how the scoring runs, never what a step computes."""
    from entrorl import modeling

    prompt_passes = []
    original = modeling._distinct_prompt_pass
    monkeypatch.setattr(modeling, "_distinct_prompt_pass", lambda *args: prompt_passes.append(1) or original(*args))
    train, _ = arithmetic_files
    steps = {}
    for share in (True, False):
        prompt_passes.clear()
        # prompts long enough, and groups large enough, that sharing saves more positions than the extra pass costs
        config = load_config(make_config(
            tiny_model_dir, train, None, data={"prompt_template": "Work out the sum, then answer: {prompt}"},
            rollout={"prompts_per_step": 2, "group_size": 8}, optim={"steps": 2, "share_prompts": share},
            checkpoint={"every": 0},
        ))
        trainer = Trainer(config, run_dir=tmp_path / f"share-{share}")
        steps[share] = [trainer.train_step() for _ in range(2)]
        assert bool(prompt_passes) == share
    for shared, plain in zip(steps[True], steps[False]):
        assert shared["reward/mean"] == plain["reward/mean"]
        for key in ("loss/total", "train/grad_norm", "entropy/mean"):
            assert shared[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-7), key
        # a difference of two float32 entropies near 4.6, whose rounding step is 4.8e-7: a few steps apart at most
        assert shared["entropy/measured_delta"] == pytest.approx(plain["entropy/measured_delta"], rel=1e-4, abs=2e-6)


def test_a_logger_that_fails_to_start_leaves_no_run_directory_and_nothing_open(tmp_path, tiny_model_dir, arithmetic_files,
                                                                                monkeypatch):
    """W&B without a login (here: an ``init`` that raises) fails the start; the run directory it was to log into is
    removed again, and ``config.json`` records the data and model by absolute path."""
    import importlib.machinery
    import types

    from entrorl.trainer import TrainConfig

    opened = []
    fake_wandb = types.ModuleType("wandb")
    fake_wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    def failing_init(**kwargs):
        opened.append(kwargs["dir"])
        raise RuntimeError("api key not configured (no-tty)")

    fake_wandb.init = failing_init
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    train, _ = arithmetic_files
    monkeypatch.chdir(train.parent)
    config = TrainConfig.model_validate(make_config(tiny_model_dir, Path(train.name), None,
                                                    logging={"progress": False, "wandb": True}))
    with pytest.raises(RuntimeError, match="api key not configured"):
        Trainer(config, run_dir=tmp_path / "runs" / "run")  # runs/ did not exist either: it goes too
    assert opened == [str(tmp_path / "runs" / "run")] and not (tmp_path / "runs").exists()

    kept = tmp_path / "existing"  # a directory the user made is left in place
    kept.mkdir()
    with pytest.raises(RuntimeError, match="api key not configured"):
        Trainer(config, run_dir=kept)
    assert kept.is_dir()

    config = config.model_copy(update={"logging": config.logging.model_copy(update={"wandb": False})})
    trainer = Trainer(config, run_dir=tmp_path / "run")
    recorded = json.loads((trainer.run_dir / "config.json").read_text())
    assert recorded["data"]["train"] == os.path.realpath(train) and os.path.isabs(recorded["model"]["path"])
    trainer.close()


def test_a_resume_that_fails_to_start_keeps_the_record_of_the_run_s_last_start(tmp_path, tiny_model_dir,
                                                                             arithmetic_files):
    """config.json records the settings of the run's latest start, which eval and data audit take: a resume that
    fails while starting (a metrics.jsonl damaged in its middle) must not leave there settings no step trained with."""
    config, run_dir = run_with_a_checkpoint_per_step(tmp_path, tiny_model_dir, arithmetic_files[0], steps=2)
    recorded = (run_dir / "config.json").read_text()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    changed = config.model_copy(update={"rollout": config.rollout.model_copy(update={"max_new_tokens": 3})})
    with pytest.raises(ValueError, match="metrics.jsonl: line 2 is not JSON"):
        Trainer(changed, run_dir=run_dir, resume=True)
    assert (run_dir / "config.json").read_text() == recorded


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_a_split_update_reports_the_whole_batch_metrics(loss_agg_mode):
    """Micro-batch metrics combine into the mini-batch's: losses and terms aggregated like the loss by their shares of
    the aggregation, fractions and token means by their token counts (rows of uneven lengths, entropies and ratios
    that vary from row to row, so that the weightings differ)."""
    from entrorl.objective import PolicyBatch, build_objective
    from entrorl.trainer.step_metrics import MicroBatchShares, step_metrics_over_updates

    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([9, 1, 4, 7, 2, 9, 5])
    rows, width = len(lengths), int(lengths.max())
    mask = torch.arange(width)[None] < lengths[:, None]

    def draw(scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(rows, 1, generator=generator) + torch.randn(rows, width, generator=generator)

    old = -torch.rand(rows, width, generator=generator) * 3
    fields = {"log_prob": old + 0.3 * draw(), "old_log_prob": old, "advantages": draw(), "mask": mask,
              "entropy": (draw(2.0) + 3).abs(), "ref_log_prob": old + 0.5 * draw()}
    objective = build_objective("grpo+entropy_bonus+kl_ref", loss_agg_mode=loss_agg_mode, entropy_coeff=0.5)
    whole = objective(PolicyBatch(**fields)).metrics
    all_rows = torch.arange(rows)
    records = [(objective(PolicyBatch(**{name: value[micro] for name, value in fields.items()})).metrics,
                MicroBatchShares.of(micro, all_rows, mask=mask, normaliser_mask=mask, loss_agg_mode=loss_agg_mode))
               for micro in all_rows.split(3)]
    combined = step_metrics_over_updates([records], aggregated=objective.aggregated_metrics)
    assert {"kl/ref", "reg/entropy_bonus", "clip/ppo_frac", "ratio/mean", "advantages/mean"} <= whole.keys()
    assert combined.keys() == whole.keys()
    for key, value in whole.items():
        assert combined[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_clip_b_sign_fractions_of_a_split_update_are_the_whole_batch_s():
    """Clip_B's dropped shares by advantage sign are shares of every valid token, as the other fractions: micro-batches
    of one sign each combine into the mini-batch's value (a share among one sign's tokens would not)."""
    from entrorl.objective import PolicyBatch, build_objective
    from entrorl.trainer.step_metrics import MicroBatchShares, step_metrics_over_updates

    rows, width = 4, 4
    mask = torch.ones(rows, width, dtype=torch.bool)
    advantages = torch.tensor([-1.0, -1.0, 1.0, 1.0])[:, None].expand(rows, width).clone()
    disc = torch.zeros(rows, width)
    disc[0, 0] = -10.0  # a negative-advantage token of low S: Clip_B drops it
    log_prob = torch.full((rows, width), -1.0)
    fields = {"log_prob": log_prob, "old_log_prob": log_prob, "advantages": advantages, "mask": mask, "disc": disc}
    objective = build_objective("clip_b", mu=2.0)
    whole_batch = PolicyBatch(**fields)
    whole = objective(whole_batch).metrics
    assert (whole["select/clip_b_frac_neg"], whole["select/clip_b_frac_pos"]) == (1 / 16, 0.0)
    all_rows = torch.arange(rows)
    records = [(objective(PolicyBatch(**{name: value[micro] for name, value in fields.items()}, population=whole_batch,
                                      rows=micro)).metrics,
                MicroBatchShares.of(micro, all_rows, mask=mask, normaliser_mask=mask, loss_agg_mode="token-mean"))
               for micro in all_rows.split(2)]  # rows 0-1 of negative advantages, rows 2-3 of positive ones
    combined = step_metrics_over_updates([records], aggregated=objective.aggregated_metrics)
    for key in ("select/clip_b_frac", "select/clip_b_frac_neg", "select/clip_b_frac_pos"):
        assert combined[key] == pytest.approx(whole[key]), key


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batch_shares_are_of_their_own_mini_batch_and_count_rows_with_a_token(loss_agg_mode):
    """Micro-batches of a mini-batch (every other row of the batch, one row without a valid token): each one's loss
    share is its part of the mini-batch's normaliser, tokens for token-mean, rows with a token for the seq-mean
    modes, and the shares of the mini-batch's micro-batches add up to 1."""
    from entrorl.trainer.step_metrics import MicroBatchShares

    lengths = torch.tensor([5, 9, 0, 5, 2, 7, 4, 1])
    mask = torch.arange(9)[None] < lengths[:, None]
    mini_batch = torch.tensor([0, 2, 4, 6])  # 5 + 0 + 2 + 4 = 11 tokens, 3 rows with a token
    micros = mini_batch.split(2)
    shares = [MicroBatchShares.of(micro, mini_batch, mask=mask, normaliser_mask=mask, loss_agg_mode=loss_agg_mode)
              for micro in micros]
    expected = [5 / 11, 6 / 11] if loss_agg_mode == "token-mean" else [1 / 3, 2 / 3]
    assert [share.loss for share in shares] == pytest.approx(expected)
    assert [share.aggregated for share in shares] == pytest.approx(expected)
    assert [share.tokens for share in shares] == pytest.approx([5 / 11, 6 / 11])  # token statistics: by tokens
    selector_shrunk = MicroBatchShares(loss=0.25, aggregated=0.5, tokens=0.75)
    assert selector_shrunk.weight_of("loss/policy", frozenset()) == 0.25
    assert selector_shrunk.weight_of("kl/ref", frozenset({"kl/ref"})) == 0.5
    assert selector_shrunk.weight_of("ratio/mean", frozenset()) == 0.75
    whole = MicroBatchShares.of(mini_batch, mini_batch, mask=mask, normaliser_mask=mask, loss_agg_mode=loss_agg_mode)
    assert (whole.loss, whole.aggregated, whole.tokens) == (1.0, 1.0, 1.0)
    emptied = torch.tensor([2])  # a whole mini-batch without a valid token: its token statistics weigh nothing
    nothing = MicroBatchShares.of(emptied, emptied, mask=mask, normaliser_mask=mask, loss_agg_mode=loss_agg_mode)
    assert (nothing.loss, nothing.aggregated, nothing.tokens) == (1.0, 1.0, 0.0)


def test_metrics_of_micro_batches_leave_out_non_finite_values_and_placeholders_of_empty_ones():
    """A micro-batch without valid tokens reports a placeholder maximum and NaN means: the mini-batch's maximum is
    that of the micro-batches with tokens, its means those of the finite values, and counts add up per update; the
    step's value of each metric is the mean of its updates' values."""
    from entrorl.trainer.step_metrics import MicroBatchShares, step_metrics_over_updates

    full = MicroBatchShares(loss=1.0, aggregated=1.0, tokens=1.0)
    empty = MicroBatchShares(loss=0.0, aggregated=0.0, tokens=0.0)
    records = [({"ratio/max": 1.5, "ratio/mean": 1.1, "loss/policy": 0.25, "tokens/valid": 12.0}, full),
               ({"ratio/max": 9.0, "ratio/mean": math.nan, "loss/policy": math.nan, "tokens/valid": 0.0},
                empty)]
    means = step_metrics_over_updates([records], aggregated=frozenset())
    assert means == {"ratio/max": 1.5, "ratio/mean": 1.1, "loss/policy": 0.25, "tokens/valid": 12.0}
    # two updates, the second without a valid token (placeholders 0 and 1): the step's statistics are the first's,
    # its count the mean over the updates; with no valid token in the whole step, a statistic is NaN (null)
    empty_update = MicroBatchShares(loss=1.0, aggregated=1.0, tokens=0.0)
    placeholder = {"ratio/max": 1.0, "ratio/mean": 0.0, "kl/old_new": 0.0, "loss/policy": 0.0, "tokens/valid": 0.0}
    first = {"ratio/max": 1.5, "ratio/mean": 1.1, "kl/old_new": 0.02, "loss/policy": 0.25, "tokens/valid": 12.0}
    means = step_metrics_over_updates([[(first, full)], [(placeholder, empty_update)]], aggregated=frozenset())
    assert means == {"ratio/max": 1.5, "ratio/mean": 1.1, "kl/old_new": 0.02, "loss/policy": 0.125, "tokens/valid": 6.0}
    # the same empty update split in two micro-batches (shares 0): the same step metrics, its loss 0 counted
    assert step_metrics_over_updates([[(first, full)], [(placeholder, empty), (placeholder, empty)]], aggregated=frozenset()) == means
    # a maximum is each update's, then their mean (as every objective metric), not the step's maximum
    second = {**first, "ratio/max": 3.5}
    assert step_metrics_over_updates([[(first, full)], [(second, full)]], aggregated=frozenset())["ratio/max"] == 2.5
    means = step_metrics_over_updates([[(placeholder, empty_update)]] * 2, aggregated=frozenset())
    assert math.isnan(means.pop("ratio/max")) and math.isnan(means.pop("ratio/mean")) and math.isnan(means.pop("kl/old_new"))
    assert means == {"loss/policy": 0.0, "tokens/valid": 0.0}


def test_every_configured_mini_batch_is_an_update(tmp_path, tiny_model_dir, arithmetic_files):
    """8 rows in 5 mini-batches make 5 updates (rows 2, 2, 2, 1, 1), not the 4 that equal chunks of 2 would; more
    mini-batches than rows is refused before the model loads."""
    train, _ = arithmetic_files
    for mini_batches, epochs in ((5, 1), (3, 2), (8, 1)):
        config = load_config(make_config(tiny_model_dir, train, None,
                                         optim={"steps": 1, "lr": 1e-3, "mini_batches": mini_batches, "epochs": epochs}))
        trainer = Trainer(config, run_dir=tmp_path / f"run-{mini_batches}-{epochs}")
        metrics = trainer.train_step()
        assert metrics["train/updates"] == mini_batches * epochs
        assert trainer.optimizer.state_dict()["state"][0]["step"] == mini_batches * epochs
    with pytest.raises(ConfigError, match="optim.mini_batches = 9 is more than the 8 rows"):
        load_config(make_config(tiny_model_dir, train, None, optim={"mini_batches": 9}))


def test_numbers_in_exponent_form_are_numbers_everywhere_in_the_config(tmp_path, tiny_model_dir, arithmetic_files):
    """PyYAML reads 1e-6 as a string (YAML 1.1 wants a dot); typed fields would convert it, free-form parameters would
    not: an advantage parameter was refused with "got '1e-6'" and a reward factory multiplied by the text."""

    train, _ = arithmetic_files
    path = write_config(tmp_path / "config.yaml", make_config(tiny_model_dir, train, None))
    path.write_text(path.read_text() + "advantage:\n  params:\n    epsilon: 1e-6\n")
    config = load_config(path, ["optim.lr=.5e-3", "reward.overlong.max_length=6", "reward.overlong.cache_length=2",
                                "reward.overlong.penalty_factor=1e0"])
    assert config.advantage.params == {"epsilon": 1e-6} and config.optim.lr == 5e-4
    assert parse_set_option("reward.kwargs.scale=1e1") == (["reward", "kwargs", "scale"], 10.0)
    assert parse_set_option("data.prompt_template='1e1'")[1] == "1e1"  # quoted: still text
    assert parse_set_option("x=1_000")[1] == 1000 and parse_set_option("x=.inf")[1] == float("inf")
    assert parse_set_option("x=-1e-6")[1] == -1e-6 and parse_set_option("x=+2E1")[1] == 20.0  # signed exponents too


def test_mask_truncated_leaves_cut_responses_out_of_the_loss_only(tmp_path, tiny_model_dir, arithmetic_files):
    """DAPO's overlong filtering: a response cut at max_new_tokens has no loss token and no gradient; it still counts
    in its group's advantages and in the entropy statistics."""
    train, _ = arithmetic_files
    with importable_module(tmp_path, "parity_cut_reward", PARITY_REWARD):
        results = {}
        for masked in (False, True):
            config = load_config(make_config(tiny_model_dir, train, None, reward={"name": "parity_cut_reward:score"},
                                             rollout={"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 40,
                                                      "mask_truncated": masked}, optim={"steps": 1, "lr": 1e-3}))
            trainer = Trainer(config, run_dir=tmp_path / f"run-{masked}")
            collected = []
            original = trainer.collect
            trainer.collect = lambda: collected.append(original()) or collected[-1]
            results[masked] = (trainer.train_step(), collected[0])
    (plain, scored), (masked, scored_masked) = results[False], results[True]
    rollouts = scored.rollouts
    assert 0 < float(rollouts.truncated.float().mean()) < 1  # some responses ended, some were cut
    torch.testing.assert_close(scored_masked.advantages, scored.advantages)  # same rollouts and advantages
    assert plain["tokens/valid"] == int(rollouts.response_mask.sum())
    assert masked["tokens/valid"] == int(rollouts.response_mask[~rollouts.truncated].sum())
    assert masked["entropy/mean"] == plain["entropy/mean"]  # statistics of every sampled token
    assert masked["loss/policy"] != plain["loss/policy"]


@pytest.mark.parametrize("example", sorted((REPO / "examples").glob("*.yaml")), ids=lambda path: path.name)
def test_every_example_configuration_validates(example, tiny_model_dir, arithmetic_files):
    """The examples' settings, with a model and data put in by --set overrides (model.path, data.train, data.eval), as
    the command line in their header does."""
    train, held_out = arithmetic_files
    config = load_config(example, [f"model.path={tiny_model_dir}", f"data.train={train}", f"data.eval={held_out}"])
    assert config.model.path == str(tiny_model_dir)


def test_a_file_that_cannot_grow_is_named_and_the_way_on_is_given(tmp_path, tiny_model_dir, arithmetic_files):
    """A write that fails for want of room (here a file-size limit, EFBIG, as a full disk gives ENOSPC): one line
    naming the file, not a bare '[Errno 27] File too large', and no second error from closing the loggers."""
    import resource

    train, _ = arithmetic_files
    config = write_config(tmp_path / "run.yaml", make_config(tiny_model_dir, train, None, optim={"steps": 6},
                                                             checkpoint={"every": 0}))
    limit = 6 * 1024  # metrics.jsonl passes it within a few steps; the only checkpoint would come at the last one

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, "-m", "entrorl.cli", "train", str(config), "--run-dir", str(tmp_path / "run")],
                            cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=limited)
    output = " ".join(result.stderr.split())
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"error: [Errno 27] File too large: '{tmp_path / 'run' / 'metrics.jsonl'}'; no checkpoint had been written" in output
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "run").glob(".*.tmp-*"))


def test_memory_that_runs_out_is_not_taken_for_a_damaged_file(tmp_path, tiny_model_dir, monkeypatch):
    """Under a memory limit (ulimit -v) a memory map is refused with ENOMEM: that says nothing of the file, so the
    error says memory ran out, never that the weights are damaged or that a checkpoint should be deleted."""
    import errno

    import transformers

    from entrorl.modeling import is_out_of_memory, load_causal_lm
    from entrorl.trainer.checkpoint import load_trainer_state

    refused = RuntimeError("unable to mmap 277235128 bytes from file <model.safetensors>: Cannot allocate memory (12)")
    assert is_out_of_memory(refused) and is_out_of_memory(MemoryError()) and is_out_of_memory(OSError(errno.ENOMEM, "x"))
    assert not is_out_of_memory(ValueError("wrapped"))
    wrapped = ValueError("while loading")
    wrapped.__cause__ = refused
    assert is_out_of_memory(wrapped)
    assert not is_out_of_memory(RuntimeError("Error while deserializing header: HeaderTooLarge"))
    assert not is_out_of_memory(ValueError("no file at /data/out of memory/model"))  # words count in allocator errors only
    try:
        try:
            raise MemoryError
        except MemoryError:
            raise OSError("while mapping")  # raised during the refusal, not from it
    except OSError as during:
        assert is_out_of_memory(during)

    def refuse(*args, **kwargs):
        raise refused

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(MemoryError, match=r"out of memory while loading the model of .*Cannot allocate memory \(12\)\): "
                                          r"the files are intact"):
        load_causal_lm(tiny_model_dir)
    monkeypatch.setattr(torch, "load", refuse)
    (tmp_path / "step_000002").mkdir()
    with pytest.raises(MemoryError, match=r"out of memory while reading .*trainer.pt"):
        load_trainer_state(tmp_path / "step_000002")


def test_eval_exits_1_when_its_summary_cannot_be_written(tmp_path, tiny_model_dir, arithmetic_files, monkeypatch):
    """A full disk at the end of an evaluation: the summary still reaches stdout, but the command exits 1 and says
    that --out holds an earlier result (a script must not read it as this one); no temporary file is left."""
    import errno

    from typer.testing import CliRunner

    from entrorl.cli import app
    from entrorl.trainer import checkpoint

    _, held_out = arithmetic_files
    out = tmp_path / "e.json"
    out.write_text('{"earlier": true}')
    write = checkpoint.atomic_write_text

    samples = tmp_path / "samples.jsonl"

    def full_disk(path, text, **options):
        if Path(path) in (out, samples):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write(path, text, **options)

    monkeypatch.setattr(checkpoint, "atomic_write_text", full_disk)
    command = ["eval", "--model", str(tiny_model_dir), "--data", str(held_out), "--n", "2", "--k", "1,2",
               "--max-new-tokens", "2", "--reward", "exact_match", "--max-prompts", "2"]
    result = CliRunner().invoke(app, [*command, "--out", str(out)])
    output = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert (f"cannot write {out}: [Errno 28] No space left on device: '{out}' (it still holds an earlier result)"
            in output)
    assert json.loads(out.read_text()) == {"earlier": True}
    # the samples file, likewise: the summary reaches stdout without naming it, and the exit is 1
    result = CliRunner().invoke(app, [*command, "--samples", str(samples)])
    assert result.exit_code == 1 and f"cannot write {samples}" in " ".join(result.output.split()), result.output
    assert "samples_file" not in json.loads(result.stdout) and not samples.exists()


def test_atomic_writes_leave_nothing_behind_and_name_their_file(tmp_path):
    """A write cut short (here: a file that may not grow) removes its temporary file and names the target."""
    import resource

    from entrorl.trainer.checkpoint import atomic_write_text

    target = tmp_path / "summary.json"
    target.write_text("old")
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, before[1]))
    try:
        with pytest.raises(OSError, match=re.escape(f"File too large: '{target}'")):
            atomic_write_text(target, "x" * 10_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
        signal.signal(signal.SIGXFSZ, handler)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_failed_rename_names_the_target_and_an_error_without_a_number_is_left_as_it_is(tmp_path):
    """os.replace's error names the temporary file: the error says the file that was to be written instead."""
    from entrorl._files import naming_file
    from entrorl.trainer.checkpoint import atomic_write_text

    target = tmp_path / "summary.json"
    (target / "in-the-way").mkdir(parents=True)  # a folder where the file goes: the rename fails
    with pytest.raises(OSError) as failure:
        atomic_write_text(target, "{}")
    assert failure.value.filename == str(target) and ".tmp-" not in str(failure.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    plain = OSError("cannot write")
    assert naming_file(plain, target) is plain


def test_eval_out_on_standard_output_leaves_one_summary_there_and_a_nameless_out_is_refused(tmp_path, tiny_model_dir,
                                                                                           monkeypatch):
    """`entrorl eval --out /dev/stdout`: the summary, written there, is not printed a second time (stdout held two JSON
    documents glued as `}{`); `--out .` and `--out ./` are refused as a directory (the reward log's name beside them
    raised a traceback)."""
    from typer.testing import CliRunner

    from entrorl.cli import app

    data = tmp_path / "eval.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    result = run_cli("eval", "--model", str(tiny_model_dir), "--data", str(data), "--n", "2", "--max-new-tokens", "2",
                     "--reward", "exact_match", "--device", "cpu", "--out", "/dev/stdout")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["n_samples"] == 2 and result.stdout.endswith("}\n")
    monkeypatch.chdir(tmp_path)
    for out in (".", "./"):
        refused = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--data", "eval.jsonl", "--out", out])
        assert refused.exit_code == 2 and isinstance(refused.exception, SystemExit), repr(refused.exception)
        assert "error: --out" in refused.output and "is a directory" in refused.output, refused.output


def test_atomic_writes_follow_symbolic_links_and_write_into_pipes_and_devices(tmp_path):
    """For a path the user names, a link is followed (the file it names gets the text, the link stays a link); a named
    pipe (as /dev/null or /dev/stdout) is written into, not replaced by a regular file. A run's own files
    (follow_links=False) replace a link at their place, and leave what it names as it was."""
    import threading

    from entrorl.trainer.checkpoint import atomic_torch_save, atomic_write_text

    results = tmp_path / "results"
    results.mkdir()
    (results / "summary.json").write_text("old")
    link = tmp_path / "summary.json"
    link.symlink_to(results / "summary.json")
    atomic_write_text(link, "new")
    assert link.is_symlink() and (results / "summary.json").read_text() == "new"
    assert sorted(p.name for p in results.iterdir()) == ["summary.json"]
    atomic_write_text(link, "the run's", follow_links=False)
    assert not link.is_symlink() and link.read_text() == "the run's"
    assert (results / "summary.json").read_text() == "new" and sorted(p.name for p in results.iterdir()) == ["summary.json"]
    (tmp_path / "state.pt").symlink_to(results / "summary.json")
    atomic_torch_save({"coefficient": 0.5}, tmp_path / "state.pt", follow_links=False)
    assert not (tmp_path / "state.pt").is_symlink() and (results / "summary.json").read_text() == "new"
    # a link into a folder not made yet: check_output_file accepts it, and the write makes the folder
    from entrorl.data.loading import check_output_file

    (tmp_path / "later.json").symlink_to(tmp_path / "not-yet" / "deeper" / "later.json")
    check_output_file(tmp_path / "later.json", what="--out")
    assert not (tmp_path / "not-yet").exists()
    atomic_write_text(tmp_path / "later.json", "made", make_folder=True)
    assert (tmp_path / "not-yet" / "deeper" / "later.json").read_text() == "made"
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    received = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_bytes()))
    reader.start()
    atomic_torch_save({"coefficient": 0.5}, pipe)
    reader.join(timeout=30)
    assert stat.S_ISFIFO(pipe.stat().st_mode)
    assert torch.load(io.BytesIO(received[0]), weights_only=True) == {"coefficient": 0.5}


def test_eval_and_audit_print_plain_progress_lines_away_from_a_terminal(tmp_path, tiny_model_dir, arithmetic_files,
                                                                        monkeypatch):
    """In a log (no terminal) a rich bar shows only when it ends: `eval` and `data audit` print a plain line of the
    sequences sampled at most every PROGRESS_LINE_EVERY_S seconds (here 0: after every generation batch)."""
    from typer.testing import CliRunner

    import entrorl.trainer.progress
    from entrorl.cli import app

    monkeypatch.setattr(entrorl.trainer.progress, "PROGRESS_LINE_EVERY_S", 0.0)
    _, held_out = arithmetic_files
    common = ["--model", str(tiny_model_dir), "--data", str(held_out), "--n", "2", "--reward", "exact_match",
              "--max-new-tokens", "2", "--batch-size", "4"]
    evaluated = CliRunner().invoke(app, ["eval", *common, "--k", "1"])
    audited = CliRunner().invoke(app, ["data", "audit", *common, "--out", str(tmp_path / "audit")])
    for result in (evaluated, audited):
        assert result.exit_code == 0, result.output
        lines = re.findall(r"sampling: (\d+)/16 sequences, \d+ s", result.output)
        assert lines == ["4", "8", "12"], result.output


@pytest.mark.parametrize("stdout", ["pipe", "file", "appended file"])
def test_atomic_writes_to_dev_stdout_write_into_the_process_s_output(tmp_path, stdout):
    """`--samples /dev/stdout | jq`, `> log` and `>> log`: /dev/stdout links through /proc/self/fd/1 to a pipe or to
    the log file; the text goes through the descriptor itself, in order with what the process writes before and
    after it, and the file is neither replaced nor truncated."""
    script = ("from pathlib import Path\nfrom entrorl.trainer.checkpoint import atomic_write_text\n"
              "print('before', flush=True)\natomic_write_text(Path('/dev/stdout'), 'JSON\\n')\n"
              "print('after', flush=True)\n")
    if stdout == "pipe":
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "before\nJSON\nafter\n"
    else:
        log = tmp_path / "results.log"
        log.write_text("earlier\n")
        with open(log, "a" if stdout == "appended file" else "w") as handle:
            result = subprocess.run([sys.executable, "-c", script], stdout=handle, stderr=subprocess.PIPE, text=True,
                                    timeout=120)
        assert result.returncode == 0, result.stderr
        assert log.read_text() == ("earlier\n" if stdout == "appended file" else "") + "before\nJSON\nafter\n"


def test_a_pipe_named_by_its_descriptor_is_an_output_written_into(tmp_path):
    """`--out >(jq .)` gives /dev/fd/N: checked as writable and written into, not replaced."""
    from entrorl.data.loading import check_output_file
    from entrorl.trainer.checkpoint import atomic_write_text

    read, write = os.pipe()
    try:
        assert check_output_file(f"/dev/fd/{write}", what="--out") == Path(f"/dev/fd/{write}")
        atomic_write_text(Path(f"/dev/fd/{write}"), "through the pipe\n")
        os.close(write)
        write = None
        assert os.read(read, 1000) == b"through the pipe\n"
    finally:
        os.close(read)
        if write is not None:
            os.close(write)


def test_an_output_linked_into_a_folder_that_takes_no_files_is_refused_before_any_work(tmp_path, monkeypatch):
    """The file a link names is replaced in its own folder: that folder is the one checked (here one whose new files
    are refused, as a read-only mount's; permission bits alone do not stop root)."""
    import tempfile

    from entrorl.data.loading import check_output_file

    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "summary.json").write_text("{}")
    (tmp_path / "summary.json").symlink_to(locked / "summary.json")
    make_temporary = tempfile.mkstemp

    def refused_in_locked(*args, dir=None, **kwargs):
        if Path(dir) == locked:
            raise PermissionError(13, "Permission denied")
        return make_temporary(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refused_in_locked)
    with pytest.raises(ValueError, match=rf"--out {re.escape(str(tmp_path / 'summary.json'))} cannot be written: "
                                         rf"the folder {re.escape(str(locked))} does not take new files"):
        check_output_file(tmp_path / "summary.json", what="--out")
    assert check_output_file(tmp_path / "elsewhere.json", what="--out") == tmp_path / "elsewhere.json"


def test_cli_eval_writes_its_outputs_through_symbolic_links(tmp_path, tiny_model_dir, arithmetic_files):
    """--out and --samples given as links write the files they name (results kept in a shared folder); a link to
    --out given as --samples is the same file, refused."""
    _, held_out = arithmetic_files
    results = tmp_path / "results"
    results.mkdir()
    for name in ("summary.json", "samples.jsonl"):
        (results / name).write_text('{"old": true}\n')
        (tmp_path / name).symlink_to(results / name)
    base = ("eval", "--model", str(tiny_model_dir), "--data", str(held_out), "--n", "2", "--k", "1", "--reward",
            "exact_match", "--max-new-tokens", "2")
    result = run_cli(*base, "--out", str(tmp_path / "summary.json"), "--samples", str(tmp_path / "samples.jsonl"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "summary.json").is_symlink() and (tmp_path / "samples.jsonl").is_symlink()
    assert json.loads((results / "summary.json").read_text())["n_problems"] == 8
    assert len((results / "samples.jsonl").read_text().splitlines()) == 8 * 2
    refused = run_cli(*base, "--out", str(tmp_path / "summary.json"), "--samples", str(results / "summary.json"))
    assert refused.returncode == 2 and "is --out" in refused.stderr, refused.stderr


def test_a_folder_is_a_run_only_with_checkpoints_or_both_its_configuration_and_metrics(tmp_path):
    """A training configuration alone, or a step_ folder that is not under checkpoints/, does not make a run."""
    from entrorl.trainer.checkpoint import training_run_of

    run = tmp_path / "run"
    (run / "exports" / "step_000001" / "model").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"seed": 7}))
    assert training_run_of(run) is None
    (run / "metrics.jsonl").write_text("")
    assert training_run_of(run) == run.resolve()
    assert training_run_of(run / "exports" / "step_000001" / "model") is None


def test_memory_that_runs_out_during_training_is_one_line_with_the_way_on(tmp_path, tiny_model_dir, arithmetic_files,
                                                                          monkeypatch):
    """An allocator's refusal in a step (a memory limit): the last checkpoint and the resume command, no traceback;
    any other RuntimeError still raises."""
    from typer.testing import CliRunner

    from entrorl.cli import app

    train, held_out = arithmetic_files
    config = write_config(tmp_path / "run.yaml", make_config(tiny_model_dir, train, None, optim={"steps": 2}))
    run_dir = tmp_path / "run"

    def out_of_memory(self, **options):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 9437184 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(Trainer, "train", out_of_memory)
    result = CliRunner().invoke(app, ["train", str(config), "--run-dir", str(run_dir)])
    output = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "error: out of memory while training step 1 ([enforce fail" in output and "files are intact" not in output
    assert output.endswith("use a smaller model or batch; no checkpoint had been written")
    monkeypatch.setattr(Trainer, "train", lambda self, **options: (_ for _ in ()).throw(RuntimeError("a bug")))
    result = CliRunner().invoke(app, ["train", str(config), "--run-dir", str(tmp_path / "run-2")])
    assert isinstance(result.exception, RuntimeError) and str(result.exception) == "a bug"
    # memory that runs out in an evaluation is said as such, with the checkpoint written before it
    monkeypatch.undo()
    from entrorl.trainer import loop

    monkeypatch.setattr(loop, "evaluate_model", lambda *args, **options: out_of_memory(None))  # inside Trainer.evaluate
    config = write_config(tmp_path / "eval.yaml", make_config(tiny_model_dir, train, held_out, optim={"steps": 2},
                                                             eval={"every": 2}, checkpoint={"every": 1}))
    result = CliRunner().invoke(app, ["train", str(config), "--run-dir", str(tmp_path / "run-3")])
    output = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "error: out of memory while evaluating after step 2 ([enforce fail" in output
    assert "the last checkpoint, step_000001, is intact" in output


def test_each_failure_of_a_run_ends_in_one_line_that_says_what_is_left_and_how_to_go_on(tmp_path, tiny_model_dir,
                                                                                         arithmetic_files, monkeypatch):
    """What `entrorl train` says when training fails, by what the run directory holds then: an intact checkpoint before
    the last step (the resume command), the last step's checkpoint (the run itself finished: a failure while closing),
    no checkpoint, or no run directory at all; a checkpoint that could not be written says how to go on only when an
    earlier one is there. A failure of the machine (disk, tracker) exits 1; a run stopped on purpose exits 3."""
    from typer.testing import CliRunner

    from entrorl.cli import app
    from entrorl.trainer.checkpoint import CheckpointWriteError
    from entrorl.trainer.loggers import TrackerError

    train, _ = arithmetic_files
    config = write_config(tmp_path / "run.yaml", make_config(tiny_model_dir, train, None, optim={"steps": 1},
                                                             checkpoint={"every": 1}))
    run_dir = tmp_path / "run"
    assert CliRunner().invoke(app, ["train", str(config), "--run-dir", str(run_dir)]).exit_code == 0
    trained = Trainer.train

    def failing(error: Exception, *, first=lambda self: None):
        def train(self, **options):
            try:
                first(self)
                raise error
            finally:
                self.close(failed=True)  # as train does when it raises: the run directory is let go
        return train

    def invoke(*extra: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, ["train", str(config), "--run-dir", str(run_dir), *extra])
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        return result.exit_code, " ".join(result.output.split())

    again = f"entrorl train {config} --set=optim.steps=2 --run-dir {run_dir} --resume"
    monkeypatch.setattr(Trainer, "train", failing(TrackerError("logging.tensorboard: TensorBoard could not write")))
    code, output = invoke("--set", "optim.steps=2", "--resume")
    assert code == 1 and output.endswith("error: logging.tensorboard: TensorBoard could not write; the last checkpoint, "
                                         f"step_000001, is intact: once the cause is fixed, continue with {again}"), output
    monkeypatch.setattr(Trainer, "train", failing(CheckpointWriteError("writing checkpoint step_000002 failed")))
    code, output = invoke("--set", "optim.steps=2", "--resume")
    assert code == 1 and output.endswith(f"error: writing checkpoint step_000002 failed; once the cause is fixed, continue "
                                         f"with {again}"), output
    monkeypatch.setattr(Trainer, "train", failing(TrainingStopped("3 non-finite steps in a row.")))
    code, output = invoke("--set", "optim.steps=2", "--resume")
    assert code == 3 and output.endswith(f"error: 3 non-finite steps in a row. Once the cause is fixed, continue with: "
                                         f"{again}"), output

    shutil.rmtree(run_dir)
    monkeypatch.setattr(Trainer, "train", failing(TrackerError("logging.wandb: W&B could not finish"), first=trained))
    code, output = invoke()
    assert code == 1 and output.endswith("error: logging.wandb: W&B could not finish; the run itself finished: its last "
                                         "checkpoint, step_000001, and metrics.jsonl are complete"), output

    shutil.rmtree(run_dir)
    monkeypatch.setattr(Trainer, "train", failing(CheckpointWriteError("writing checkpoint step_000001 failed")))
    code, output = invoke()
    assert code == 1 and output.endswith("error: writing checkpoint step_000001 failed"), output
    monkeypatch.setattr(Trainer, "train", failing(OSError(28, "No space left on device", str(run_dir / "metrics.jsonl"))))
    code, output = invoke()
    assert code == 1 and output.endswith("no checkpoint had been written"), output
    monkeypatch.setattr(Trainer, "train", failing(OSError(2, "No such file or directory", str(run_dir / "metrics.jsonl")),
                                                  first=lambda self: shutil.rmtree(self.run_dir)))
    code, output = invoke()
    assert code == 1 and output.endswith(f"metrics.jsonl'; the run directory {run_dir} no longer exists"), output
    monkeypatch.setattr(Trainer, "train", failing(CheckpointWriteError("the run directory is gone"),
                                                  first=lambda self: shutil.rmtree(self.run_dir)))
    code, output = invoke()
    assert code == 1 and output.endswith("error: the run directory is gone"), output


def test_a_key_given_twice_names_the_line_of_each(tmp_path, arithmetic_files):
    """The repeated key's own line and that of its first occurrence, counted from 1; a key YAML cannot hash (a list)
    is the YAML error it always was, not a traceback."""
    train, _ = arithmetic_files
    config = tmp_path / "twice.yaml"
    config.write_text(f"model:\n  path: {tmp_path}\ndata:\n  train: {train}\noptim:\n  steps: 4\n  lr: 0.1\n  steps: 8\n")
    with pytest.raises(ConfigError, match=r"twice.yaml is not valid YAML: line 8: the key 'steps' is given a second "
                                          r"time \(first on line 6\); YAML would keep only the last, dropping the first "
                                          r"one's value$"):
        load_config(config)
    # a --set mapping that repeats a key: told to give it once, not to quote it (which would make it a string)
    with pytest.raises(ConfigError, match=r"--set 'reward.kwargs=\{p: 1, p: 2\}': line 1: the key 'p' is given a second "
                                          r"time \(first on line 1\); YAML would keep only the last, dropping the first "
                                          r"one's value; give each key once$"):
        load_config(make_config(tmp_path, train, None), ["reward.kwargs={p: 1, p: 2}"])
    unhashable = tmp_path / "unhashable.yaml"
    unhashable.write_text(f"model:\n  path: {tmp_path}\ndata:\n  train: {train}\n? [a, b]\n: 1\n")
    with pytest.raises(ConfigError, match=r"(?s)unhashable.yaml is not valid YAML: .*found unhashable key"):
        load_config(unhashable)


def test_a_set_option_whose_key_is_blank_has_an_empty_key(tmp_path, arithmetic_files):
    train, _ = arithmetic_files
    with pytest.raises(ConfigError, match=r"^--set has an empty key in ' =3'$"):
        load_config(make_config(tmp_path, train, None), [" =3"])


def test_a_method_list_that_is_empty_or_holds_other_than_names_is_refused_naming_method(tmp_path, arithmetic_files):
    train, _ = arithmetic_files
    base = make_config(tmp_path, train, None)
    for given in ([], ["dapo", 1]):
        with pytest.raises(ConfigError, match=rf"  method: Input should be a valid string \(got {re.escape(repr(given))}\)"):
            load_config({**base, "method": given})


def test_greedy_evaluation_of_several_samples_is_warned_about_only_when_an_evaluation_runs(tmp_path, arithmetic_files):
    """With data.eval, eval.temperature 0 and eval.n above 1 warn that the samples repeat one answer; without it, the
    evaluation settings only have no effect, which is all that is said."""
    train, held_out = arithmetic_files
    with pytest.warns(UserWarning) as caught:
        load_config(make_config(tmp_path, train, held_out), ["eval.temperature=0"])
    assert [str(warning.message) for warning in caught] == [
        "eval.n = 2 samples at eval.temperature = 0 (greedy) are one answer repeated: every Pass@k is Pass@1, and "
        "eval.n = 1 gives the same figures"]
    with pytest.warns(UserWarning) as caught:
        load_config(make_config(tmp_path, train, None), ["eval.temperature=0"])
    assert [str(warning.message) for warning in caught] == [
        "eval.temperature has no effect: data.eval is not set, so no evaluation runs"]


def test_the_hint_to_quote_a_set_value_shows_it_without_surrounding_spaces(tmp_path, arithmetic_files):
    train, _ = arithmetic_files
    with pytest.raises(ConfigError, match=r"put it in quotes as you wrote it, --set 'logging.name=\"2024\"'$"):
        load_config(make_config(tmp_path, train, None), ["logging.name= 2024 "])


@pytest.mark.parametrize("sampled_with", ["eval", "the data command that takes a pass-rate band"])
def test_both_sampling_commands_note_greedy_repeats_only_for_temperature_0_and_more_than_one_sample(tmp_path,
                                                                                                    sampled_with):
    """`eval` and the data command that samples a model to sort prompts by pass rate: the note comes before anything
    loads (here the model directory is missing, and the command then fails)."""
    import inspect

    from typer.testing import CliRunner

    from entrorl.cli import app, data_app

    command = ["eval"] if sampled_with == "eval" else ["data", next(
        registered.name for registered in data_app.registered_commands
        if "band" in inspect.signature(registered.callback).parameters)]

    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    said = {}
    for n, temperature, top_k in (("2", "0", ()), ("1", "0", ()), ("2", "0.5", ()), ("2", "0.5", ("--top-k", "1")),
                                  ("1", "0.5", ("--top-k", "1")), ("2", "0.5", ("--top-k", "2"))):
        result = CliRunner().invoke(app, [*command, "--model", str(tmp_path / "missing"), "--data", str(data),
                                          "--n", n, "--temperature", temperature, *top_k, "--reward", "exact_match",
                                          "--out", str(tmp_path / "out")])
        assert result.exit_code == 2, result.output
        said[n, temperature, top_k] = " ".join(result.output.split())
    assert ("note: --temperature 0 samples greedily, so the 2 samples of a prompt are one answer repeated (every "
            "Pass@k is Pass@1, every pass rate 0 or 1): --n 1 gives the same figures") in said["2", "0", ()]
    assert "note: --top-k 1 samples greedily, so the 2 samples" in said["2", "0.5", ("--top-k", "1")]
    assert all("note:" not in said[key] for key in (("1", "0", ()), ("2", "0.5", ()), ("1", "0.5", ("--top-k", "1")),
                                                     ("2", "0.5", ("--top-k", "2"))))


def test_the_train_command_says_nothing_of_a_pass_rate_band_without_one(tmp_path, tiny_model_dir, arithmetic_files,
                                                                       monkeypatch):
    from typer.testing import CliRunner

    from entrorl.cli import app

    train, _ = arithmetic_files
    config = write_config(tmp_path / "run.yaml", make_config(tiny_model_dir, train, None))
    monkeypatch.setattr(Trainer, "train", lambda self, **options: self.run_dir)  # the set-up is what is checked
    result = CliRunner().invoke(app, ["train", str(config), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0 and "run directory:" in result.output, result.output
    assert "pass_rate_band" not in result.output and "in the band" not in result.output
    assert "stores" not in result.output  # a float32 model trained in float32


def test_the_train_command_says_when_half_precision_weights_are_trained_and_saved_in_float32(
        tmp_path, tiny_model_dir, arithmetic_files, monkeypatch):
    from typer.testing import CliRunner

    from entrorl.cli import app

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    declared = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**declared, "dtype": "bfloat16"}))
    train, _ = arithmetic_files
    monkeypatch.setattr(Trainer, "train", lambda self, **options: self.run_dir)  # the set-up is what is checked
    said = {}
    for dtype in ("float32", "bfloat16"):
        config = write_config(tmp_path / f"{dtype}.yaml", make_config(model, train, None, model={"dtype": dtype}))
        result = CliRunner().invoke(app, ["train", str(config), "--run-dir", str(tmp_path / dtype)])
        assert result.exit_code == 0, result.output
        said[dtype] = " ".join(result.output.split())
    assert ("model.path stores bfloat16 weights: they are trained in float32 (model.dtype) and the checkpoints hold "
            "float32, twice the size; model.dtype: bfloat16 keeps them in bfloat16") in said["float32"]
    assert "stores" not in said["bfloat16"]


def test_the_stored_weight_type_is_read_from_dtype_or_from_torch_dtype_as_transformers_4_writes_it(tmp_path):
    from entrorl.cli import _stored_dtype

    for declared, expected in (({"torch_dtype": "bfloat16"}, "bfloat16"), ({"dtype": "float16", "torch_dtype": "float32"},
                               "float16"), ({"dtype": None}, None), ({}, None)):
        (tmp_path / "config.json").write_text(json.dumps(declared))
        assert _stored_dtype(tmp_path) == expected, declared
    assert _stored_dtype(tmp_path / "missing") is None


def test_resume_of_a_finished_run_names_its_step_and_optim_steps_and_reads_past_an_unreadable_config_json(
        tmp_path, arithmetic_files, monkeypatch):
    """A run at step 2 resumed with optim.steps = 1 has nothing to do, whatever its config.json holds (a file that is
    no JSON object is not compared); a readable one that differs in the seed is refused, with exit status 2."""
    from typer.testing import CliRunner

    from entrorl.cli import app
    from entrorl.trainer import checkpoint
    from entrorl.trainer.config import with_resolved_paths

    train, _ = arithmetic_files
    settings = make_config(tmp_path, train, None, optim={"steps": 1, "lr": 1e-3})
    config = write_config(tmp_path / "run.yaml", settings)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.setattr(checkpoint, "latest_checkpoint", lambda *args, **kwargs: run_dir / "checkpoints" / "step_000002")

    def resume(*options: str):
        result = CliRunner().invoke(app, ["train", str(config), "--run-dir", str(run_dir), "--resume", *options])
        return result.exit_code, " ".join(result.output.split())

    for text in ("{not json", "[1, 2]", None):
        if text is not None:
            (run_dir / "config.json").write_text(text)
        code, said = resume()
        assert code == 0 and f"{run_dir} is already at step 2 of optim.steps = 1: nothing to do" in said, (text, said)
    (run_dir / "config.json").write_text(json.dumps(with_resolved_paths(load_config(settings).model_dump(mode="json"))))
    assert resume()[0] == 0
    code, said = resume("--set", "seed=1")
    assert code == 2 and "error: --resume cannot change what the run was trained with: seed: 7 in the checkpoint, " \
        "1 now" in said and "nothing to do" not in said, said


def test_software_changes_compare_only_the_versions_a_checkpoint_recorded():
    """A checkpoint that recorded some of the versions is compared on those alone: a package it did not record is no
    change, and one it recorded otherwise is listed as (package, saved, now)."""
    from entrorl.trainer.checkpoint import software_changes, software_versions

    now = software_versions()
    assert software_changes({"torch": now["torch"]}) == []
    assert software_changes({"torch": "0.0.1"}) == [("torch", "0.0.1", now["torch"])]
    assert software_changes(None) == [] and software_changes({}) == []


def test_a_damaged_checkpoint_names_as_the_one_before_it_only_a_checkpoint_whose_model_is_intact(tmp_path, tiny_model_dir):
    """Refusing a checkpoint whose weights changed in place, the error points at the newest earlier checkpoint whose
    model files still hold their bytes, passing over an earlier one damaged the same way."""
    from entrorl.modeling import load_causal_lm, load_tokenizer
    from entrorl.trainer.checkpoint import resolve_model_directory, save_checkpoint

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"optim": {"steps": 3}}))
    model, tokenizer = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    written = [save_checkpoint(run_dir, step, model=model, tokenizer=tokenizer, trainer_state={"step": step}, keep=3)
               for step in (1, 2, 3)]

    def damage(checkpoint):
        weights = checkpoint / "model" / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-100] ^= 0xFF
        weights.write_bytes(bytes(data))

    damage(written[2])
    with pytest.raises(ValueError, match=r"step_000003 is damaged: .*the newest intact one before it is .*step_000002$"):
        resolve_model_directory(written[2])
    damage(written[1])
    with pytest.raises(ValueError, match=r"step_000003 is damaged: .*the newest intact one before it is .*step_000001$"):
        resolve_model_directory(written[2])


def test_a_folder_of_lora_adapters_is_no_run_whatever_else_it_holds(tmp_path):
    """Adapters saved beside a checkpoints/ folder, or beside a config.json and a metrics.jsonl (another trainer's
    output directory), are adapters to evaluate, not an entrorl run."""
    from entrorl.trainer.checkpoint import training_run_of

    folder = tmp_path / "adapters"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"seed": 7}))
    (folder / "metrics.jsonl").write_text("")
    assert training_run_of(folder) == folder.resolve()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert training_run_of(folder) is None
    (folder / "checkpoints").rmdir()
    assert training_run_of(folder) is None


def test_cuda_generator_states_are_restored_only_onto_as_many_gpus_as_they_were_saved_from(monkeypatch):
    """A checkpoint written on two GPUs resumes on one (or on none) without touching the CUDA generators; on as many
    GPUs as it was written from, they are restored."""
    from entrorl.trainer.checkpoint import capture_rng_state, restore_rng_state

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = {**capture_rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8)] * 2}
    for gpus, expected in ((1, []), (2, [state["cuda"]])):
        monkeypatch.setattr(torch.cuda, "device_count", lambda gpus=gpus: gpus)
        restore_rng_state(state)
        assert restored == expected


def test_training_on_verl_style_parquet_with_chat_messages(tmp_path, tiny_model_dir):
    """A verl data set as it is: the prompt as chat messages (rendered by the chat template, which they need), the
    answer nested in reward_model.ground_truth; the samples show the user's turn as the prompt."""
    import pandas as pd

    from entrorl.modeling import load_tokenizer

    model_dir = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = load_tokenizer(model_dir)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }};{% endfor %}"
                               "{% if add_generation_prompt %}a:{% endif %}")
    tokenizer.save_pretrained(model_dir)
    rows = [{"data_source": "arith", "prompt": [{"role": "system", "content": "sum"}, {"role": "user", "content": f"{a}+{b}="}],
             "reward_model": {"style": "rule", "ground_truth": str(a + b)}, "extra_info": {"index": a}}
            for a in range(3) for b in range(2)]
    train = tmp_path / "train.parquet"
    pd.DataFrame(rows).to_parquet(train)
    config = make_config(model_dir, train, None, data={"train": str(train), "answer_column": "reward_model.ground_truth"},
                         optim={"steps": 1, "lr": 1e-3}, checkpoint={"every": 0, "keep": 1},
                         logging={"progress": False, "samples_every": 1})
    with pytest.raises(ValueError, match="the prompt is given as chat messages, .*set model.chat_template: true"):
        Trainer(load_config(config), run_dir=tmp_path / "plain")
    config["model"]["chat_template"] = True
    trainer = Trainer(load_config(config), run_dir=tmp_path / "run")
    decoded = tokenizer.decode(trainer.train_prompt_ids[0], skip_special_tokens=True)
    assert decoded == "s:sum;u:0+0=;a:"
    trainer.train()
    assert read_metrics(tmp_path / "run")[0]["step"] == 1
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples" / "step_000001.jsonl").read_text().splitlines()]
    assert {sample["prompt"] for sample in samples} <= {row["prompt"][1]["content"] for row in rows}
    assert all(sample["messages"] == [{"role": "system", "content": "sum"}, {"role": "user", "content": sample["prompt"]}]
               for sample in samples)
    assert all(sample["answer"] == str(eval(sample["prompt"][:-1])) for sample in samples)
    # eval on the run takes its columns and its chat template
    from typer.testing import CliRunner

    from entrorl.cli import app

    evaluated = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "run"), "--data", str(train), "--n", "2",
                                         "--k", "1", "--max-prompts", "2", "--out", str(tmp_path / "eval.json")])
    assert evaluated.exit_code == 0, evaluated.output
    settings = json.loads((tmp_path / "eval.json").read_text())["settings"]
    assert (settings["answer_column"], settings["chat_template"]) == ("reward_model.ground_truth", True)
    plain = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "run"), "--data", str(train), "--n", "1",
                                     "--k", "1", "--max-prompts", "1", "--samples", str(tmp_path / "samples.jsonl")])
    assert plain.exit_code == 0, plain.output
    (sample,) = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert sample["messages"][-1] == {"role": "user", "content": sample["prompt"]}


@pytest.mark.parametrize("command", [["eval", "--n", "1"], ["data", "audit", "--n", "2"]])
@pytest.mark.parametrize("option", ["--prompt-column", "--answer-column"])
def test_an_empty_column_option_is_refused_with_a_message(tmp_path, tiny_model_dir, arithmetic_files, command, option):
    from typer.testing import CliRunner

    from entrorl.cli import app

    train, _ = arithmetic_files
    result = CliRunner().invoke(app, [*command, "--model", str(tiny_model_dir), "--data", str(train), option, " "])
    assert result.exit_code == 2 and f"{option} names no column" in result.output, result.output


def _one_step_run_on(tmp_path, monkeypatch, table, **data_options) -> tuple[dict, Path]:
    """A one-step run, checkpointed, on ``table`` written as parquet; its configuration (set to 2 steps) and folder."""
    import pyarrow.parquet as pq

    from entrorl.lab.tiny_model import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model", seed=0, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                max_position_embeddings=64)
    pq.write_table(table, tmp_path / "train.parquet")
    config = make_config(model_dir, tmp_path / "train.parquet", None, optim={"steps": 1, "lr": 1e-3},
                         checkpoint={"every": 1, "keep": 5},
                         rollout={"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 2})
    config["data"].update(data_options)
    run_dir = tmp_path / "run"
    Trainer(load_config(config), run_dir=run_dir).train()
    config["optim"]["steps"] = 2
    return config, run_dir


def _as_the_previous_version_wrote_it(run_dir: Path, rows: list[tuple[str, str, dict]]) -> None:
    """The run's checkpoint made the previous version's: the data digest it took over ``rows`` (prompt, answer, meta
    as that version read them)."""
    import hashlib

    from entrorl.trainer import checkpoint as ckpt

    digest = hashlib.sha256()
    for prompt, answer, meta in rows:
        digest.update(json.dumps([prompt, answer, meta], sort_keys=True, default=str, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    checkpoint = ckpt.latest_checkpoint(run_dir)
    state = torch.load(checkpoint / "trainer.pt", weights_only=False)
    state["stream"].update(records_digest=digest.hexdigest(), num_records=len(rows))
    torch.save(state, checkpoint / "trainer.pt")
    ckpt._write_file_list(checkpoint)  # its files.json (sizes and CRC-32s)


def test_a_previous_version_s_run_on_a_class_label_answer_is_refused_saying_why(tmp_path, monkeypatch):
    """The previous version read a ClassLabel answer as the label's number ('1' for 'B'): its run's data digest does
    not match the names read now, and resuming it is refused saying so, not as "other prompts" (its reward was never
    given the names)."""
    import pyarrow as pa

    n = 8
    prompts, labels = [f"{i}+1=" for i in range(n)], [i % 4 for i in range(n)]
    features = {"prompt": {"dtype": "string", "_type": "Value"},
                "answer": {"names": ["A", "B", "C", "D"], "_type": "ClassLabel"}}
    table = pa.table({"prompt": prompts, "answer": pa.array(labels, pa.int64())}).replace_schema_metadata(
        {b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    config, run_dir = _one_step_run_on(tmp_path, monkeypatch, table)
    _as_the_previous_version_wrote_it(run_dir, [(prompts[i], str(labels[i]), {}) for i in range(n)])
    with pytest.raises(ValueError, match=r"--resume: the checkpoint was trained by an earlier version of entrorl, which "
                                         r"read the answers of data.train's ClassLabel column 'answer' as the labels' "
                                         r"numbers \('1'\)"):
        Trainer(load_config(config), run_dir=run_dir, resume=True)


def test_a_resume_on_other_data_reads_it_no_more_than_before(tmp_path, monkeypatch):
    """Data without a ClassLabel answer is not read again to look for the earlier reading of one: a resume refused
    for other data reads data.train twice (as it is, and as the version before the float32 reading read it)."""
    import pyarrow as pa

    import entrorl.trainer.loop as loop

    table = pa.table({"prompt": [f"{i}+1=" for i in range(8)], "answer": [str(i) for i in range(8)]})
    config, run_dir = _one_step_run_on(tmp_path, monkeypatch, table)
    _as_the_previous_version_wrote_it(run_dir, [(f"{i}+1=", "other", {}) for i in range(8)])
    reads, real = [], loop.load_prompts
    monkeypatch.setattr(loop, "load_prompts", lambda *args, **kwargs: reads.append(args) or real(*args, **kwargs))
    with pytest.raises(ValueError, match="are not those the checkpoint was trained on"):
        Trainer(load_config(config), run_dir=run_dir, resume=True)
    assert len(reads) == 2


def test_a_previous_version_s_run_resumes_on_unchanged_parquet_with_float32_values_within_structs(tmp_path,
                                                                                                   monkeypatch):
    """The previous version read float32 values within a struct or a list widened (0.1 as 0.10000000149011612): its
    run resumes on the unchanged file."""
    import numpy as np
    import pyarrow as pa

    n = 8
    prompts, answers = [f"{i}+1=" for i in range(n)], [str(i + 1) for i in range(n)]
    table = pa.table({"prompt": prompts, "answer": answers,
                      "info": pa.array([{"w": 0.1 * (i + 1)} for i in range(n)], pa.struct([("w", pa.float32())])),
                      "vals": pa.array([[0.1, 0.2 * i] for i in range(n)], pa.list_(pa.float32()))})
    config, run_dir = _one_step_run_on(tmp_path, monkeypatch, table)
    _as_the_previous_version_wrote_it(run_dir, [
        (prompts[i], answers[i], {"info": {"w": float(np.float32(0.1 * (i + 1)))},
                                  "vals": [float(np.float32(0.1)), float(np.float32(0.2 * i))]}) for i in range(n)])
    trainer = Trainer(load_config(config), run_dir=run_dir, resume=True)
    trainer.train()
    assert trainer.step == 2


@pytest.mark.parametrize("band", ["[0.7, 0.9)", "[0.7, 1]"])
def test_a_previous_version_s_run_whose_band_kept_other_prompts_is_refused_saying_why(tmp_path, monkeypatch, band):
    """Read widened, 0.7 fell out of [0.7, 0.9) and 0.9 came in (as many prompts, other ones); of [0.7, 1], one
    fewer: the run cannot continue on the prompts it was trained on, and the refusal says why."""
    import numpy as np
    import pyarrow as pa

    from entrorl.data import parse_band

    rates = [0.7, 0.9, 0.5, 0.8, 0.75, 0.85, 0.72, 0.88]
    prompts, answers = [f"{i}+1=" for i in range(len(rates))], [str(i + 1) for i in range(len(rates))]
    table = pa.table({"prompt": prompts, "answer": answers,  # a 'meta' object: its fields are the record's meta
                      "meta": pa.array([{"rate": r} for r in rates], pa.struct([("rate", pa.float32())]))})
    config, run_dir = _one_step_run_on(tmp_path, monkeypatch, table, pass_rate_band=band, pass_rate_column="rate")
    low, high, (low_in, high_in) = parse_band(band)
    widened = [float(np.float32(rate)) for rate in rates]
    _as_the_previous_version_wrote_it(run_dir, [
        (prompts[i], answers[i], {"rate": rate}) for i, rate in enumerate(widened)
        if (rate >= low if low_in else rate > low) and (rate <= high if high_in else rate < high)])
    with pytest.raises(ValueError, match="--resume: the checkpoint was trained by an earlier version of entrorl, which "
                                         "read the float32 values within the data's structs and lists widened"):
        Trainer(load_config(config), run_dir=run_dir, resume=True)
