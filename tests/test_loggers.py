"""The metrics sinks: metrics.jsonl, and the TensorBoard / W&B / trackio mirrors on a fresh start, a resume and a failure.

W&B and trackio are stood in for by modules that record their calls and, as the real ones do, tell a resumed run the
step after the last one they hold (neither is installed with the tests' extras, and W&B would need a login);
TensorBoard is the real one."""

from __future__ import annotations

import contextvars
import importlib.machinery
import json
import re
import sys
import types
import warnings

import numpy as np
import pytest

from entrorl.trainer.loggers import MetricsLogger, TrackerError, read_metrics


class FakeWandbRun:
    def __init__(self, **options):
        self.options = options
        self.id = options.get("id") or f"run-{len(FakeTrackers.wandb_runs)}"
        held = [step for run in FakeTrackers.wandb_runs if run.id == self.id for step, _, _ in run.logged]
        self.step = max(held) + 1 if held else 0  # wandb.Run.step: a resumed run's next step
        self.logged: list[tuple[int, dict, bool]] = []
        self.exit_code = "not finished"

    def log(self, data, step=None, commit=None):
        self.logged.append((step, dict(data), commit))

    def finish(self, exit_code=None):
        self.exit_code = exit_code


class FakeTrackioRun:
    """What trackio.init returns: its log and finish act on this run (through the module's functions, which tests
    replace to make them fail)."""

    def __init__(self, module, name, next_step):
        self.module, self.name, self._next_step = module, name, next_step

    def log(self, data, step=None):
        self.module.current = self.name
        self.module.log(data, step=step)

    def finish(self):
        self.module.current = self.name
        self.module.finish()


class FakeTrackers:
    wandb_runs: list[FakeWandbRun] = []


@pytest.fixture
def trackers(monkeypatch):
    """Fake ``wandb`` and ``trackio`` modules: ``FakeTrackers.wandb_runs`` and the trackio module's ``calls``."""
    FakeTrackers.wandb_runs = []
    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    def init(**options):
        FakeTrackers.wandb_runs.append(FakeWandbRun(**options))
        return FakeTrackers.wandb_runs[-1]

    wandb.init = init
    trackio = types.ModuleType("trackio")
    trackio.__spec__ = importlib.machinery.ModuleSpec("trackio", None)
    trackio.calls = []
    trackio.runs = {}  # name: the steps it holds

    def trackio_init(**options):
        trackio.calls.append(("init", options))
        name = options["name"]
        if options["resume"] == "never" and name in trackio.runs:  # as trackio does: a name of its own
            name = f"{name}-{len(trackio.runs)}"
        held = trackio.runs.setdefault(name, [])
        trackio.current = name
        run = FakeTrackioRun(trackio, name, max(held) + 1 if held else 0)
        trackio.context_vars.current_run.set(run)
        return run

    def trackio_log(data, step=None):  # the module's functions act on the run started last, as trackio's do
        trackio.calls.append(("log", step, dict(data)))
        trackio.runs[trackio.current].append(step)

    trackio.init = trackio_init
    trackio.log = trackio_log
    trackio.context_vars = types.ModuleType("trackio.context_vars")
    trackio.context_vars.current_run = contextvars.ContextVar("current_run", default=None)
    monkeypatch.setitem(sys.modules, "trackio.context_vars", trackio.context_vars)
    trackio.finish = lambda: trackio.calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "trackio", trackio)
    return wandb, trackio


def log_steps(logger, steps):
    for step in steps:
        logger.log(step, {"entropy/mean": 1.0 / step, "reward/mean": 0.1 * step, "note": "text is not mirrored"})


def test_a_resumed_run_sends_each_step_once_to_w_and_b_and_trackio(tmp_path, trackers):
    _, trackio = trackers
    logger = MetricsLogger(tmp_path, wandb=True, trackio=True, run_name="run", project="mine")
    log_steps(logger, range(1, 6))  # then killed: the checkpoint is at step 3, steps 4 and 5 were sent already
    first = FakeTrackers.wandb_runs[0]
    assert first.options["project"] == "mine" and first.options["resume"] == "allow" and first.options["id"] is None
    assert [(step, commit) for step, _, commit in first.logged] == [(1, True), (2, True), (3, True), (4, True), (5, True)]
    assert first.logged[0][1] == {"entropy/mean": 1.0, "reward/mean": 0.1}
    assert (tmp_path / "wandb_run_id").read_text() == first.id
    with pytest.warns(UserWarning, match="W&B already holds steps 4 to 5 and trackio already holds steps 4 to 5, sent "
                                         "before the run was interrupted; each takes a step once and keeps those values") as said:
        resumed = MetricsLogger(tmp_path, resume_step=3, wandb=True, trackio=True, run_name="run", project="mine")
        log_steps(resumed, range(4, 8))
    resumed.close()
    assert len([warning for warning in said if "already holds" in str(warning.message)]) == 1  # once, not per step
    second = FakeTrackers.wandb_runs[1]
    assert second.options["id"] == first.id and [step for step, _, _ in second.logged] == [6, 7]
    assert second.exit_code == 0
    inits = [call[1] for call in trackio.calls if call[0] == "init"]
    name = (tmp_path / "trackio_run").read_text().strip()
    assert re.fullmatch(r"run-\d{8}-\d{6}", name)  # the directory's name and the time of its start
    assert [(i["project"], i["name"], i["resume"]) for i in inits] == [("mine", name, "never"), ("mine", name, "allow")]
    assert trackio.runs == {name: [1, 2, 3, 4, 5, 6, 7]}
    assert [record["step"] for record in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6, 7]


def test_a_tracker_turned_on_at_the_resume_or_that_lost_the_steps_gets_every_step_after_the_checkpoint(tmp_path, trackers):
    logger = MetricsLogger(tmp_path)
    log_steps(logger, range(1, 6))
    logger.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing was sent before: nothing to warn about
        resumed = MetricsLogger(tmp_path, resume_step=3, wandb=True)
        log_steps(resumed, range(4, 6))
    resumed.close(failed=True)
    resumed.close()  # a second close does nothing: the run stays marked as failed
    (run,) = FakeTrackers.wandb_runs
    assert [step for step, _, _ in run.logged] == [4, 5] and run.exit_code == 1
    # an interrupted attempt whose last steps never reached storage (a killed process's buffer): they are sent again
    run.logged = run.logged[:1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = MetricsLogger(tmp_path, resume_step=4, wandb=True)
        log_steps(resumed, [5])
    assert [step for step, _, _ in FakeTrackers.wandb_runs[-1].logged] == [5]


def test_each_tracker_skips_only_the_steps_it_holds_in_its_own_run(tmp_path, trackers):
    _, trackio = trackers
    for directory in (tmp_path / "elsewhere" / "run", tmp_path / "run"):
        directory.mkdir(parents=True)
    other = MetricsLogger(tmp_path / "elsewhere" / "run", trackio=True, run_name="run")  # another directory of that name
    log_steps(other, range(1, 10))
    other.close()
    (tmp_path / "run" / "trackio_run").write_text("run-20260101-000000\n")  # this one's trackio run, started earlier
    trackio.runs["run-20260101-000000"] = [1, 2, 3]  # trackio stored fewer steps than W&B before the interruption
    logger = MetricsLogger(tmp_path / "run", wandb=True, resume_step=0, run_name="run")
    log_steps(logger, range(1, 6))
    logger.close()
    with pytest.warns(UserWarning, match=r"W&B already holds steps 3 to 5 and trackio already holds step 3, sent before"):
        resumed = MetricsLogger(tmp_path / "run", resume_step=2, wandb=True, trackio=True, run_name="run")
        log_steps(resumed, range(3, 7))
    assert [step for step, _, _ in FakeTrackers.wandb_runs[-1].logged] == [6]
    other_name = (tmp_path / "elsewhere" / "run" / "trackio_run").read_text().strip()
    assert trackio.runs == {other_name: list(range(1, 10)), "run-20260101-000000": [1, 2, 3, 4, 5, 6]}


def test_w_and_b_gets_the_steps_it_lacks_while_trackio_skips_those_it_holds(tmp_path, trackers):
    """The other way round: trackio stored more steps than W&B before the interruption."""
    _, trackio = trackers
    logger = MetricsLogger(tmp_path, wandb=True, resume_step=0, run_name="run")
    log_steps(logger, range(1, 4))
    logger.close()
    (tmp_path / "trackio_run").write_text("run-20260101-000000\n")
    trackio.runs["run-20260101-000000"] = [1, 2, 3, 4, 5]
    with pytest.warns(UserWarning, match=r"W&B already holds step 3 and trackio already holds steps 3 to 5, sent before"):
        resumed = MetricsLogger(tmp_path, resume_step=2, wandb=True, trackio=True, run_name="run")
        log_steps(resumed, range(3, 7))
    resumed.close()
    assert [step for step, _, _ in FakeTrackers.wandb_runs[-1].logged] == [4, 5, 6]
    assert trackio.runs["run-20260101-000000"] == [1, 2, 3, 4, 5, 6]


def test_a_fresh_start_leaves_no_earlier_w_and_b_files_and_a_failure_to_start_is_not_hidden(tmp_path, trackers,
                                                                                             monkeypatch):
    wandb, trackio = trackers
    (tmp_path / "wandb" / "offline-run-1-abc").mkdir(parents=True)
    starting = wandb.init
    wandb.init = lambda **options: (_ for _ in ()).throw(Exception("No API key configured."))
    with pytest.raises(TrackerError):
        MetricsLogger(tmp_path, wandb=True)
    assert (tmp_path / "wandb" / "offline-run-1-abc").is_dir()  # kept while no new W&B run has started
    wandb.init = starting
    MetricsLogger(tmp_path, wandb=True).close()
    assert not (tmp_path / "wandb").exists() and not (tmp_path / ".wandb-earlier").exists()  # once it has, gone
    trackio.init = lambda **options: (_ for _ in ()).throw(ConnectionError("no server"))
    monkeypatch.setattr(FakeWandbRun, "finish",
                        lambda self, exit_code=None: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(TrackerError, match=r"logging.trackio: could not start trackio: ConnectionError: no server"):
        MetricsLogger(tmp_path, wandb=True, trackio=True)


def test_a_tracker_that_fails_is_named_and_the_others_are_still_closed(tmp_path, trackers):
    wandb, trackio = trackers
    wandb.init = lambda **options: (_ for _ in ()).throw(Exception("No API key configured. Use `wandb login` to log in."))
    with pytest.raises(TrackerError, match=r"logging.wandb: could not start W&B in .*wandb: Exception: No API key configured. "
                                           r"Use `wandb login` to log in; without a login, WANDB_MODE=offline logs"):
        MetricsLogger(tmp_path, tensorboard=True, wandb=True)
    # a sink that fails while closing does not keep the ones after it open
    logger = MetricsLogger(tmp_path, tensorboard=True, trackio=True)

    def broken():
        raise OSError(28, "No space left on device")

    def finish_then_fail():
        trackio.calls.append(("finish",))
        raise ConnectionError("no server")

    logger._tensorboard.close = broken
    trackio.finish = finish_then_fail
    # the first sink's error is the one raised, after every sink was closed
    with pytest.raises(TrackerError, match=r"logging.tensorboard: TensorBoard could not write in .*tensorboard: OSError"):
        logger.close()
    assert trackio.calls[-1] == ("finish",)


def test_a_resume_from_step_0_is_a_resume_not_a_fresh_start(tmp_path):
    """Step 0 (the evaluation before the first update) is a step like the others: a resume from it keeps it in
    metrics.jsonl and in TensorBoard, and drops only the steps after it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, tensorboard=True)
    logger.log(0, {"reward/mean": 0.0})
    logger.log(1, {"reward/mean": 0.1})  # then killed, before the checkpoint of step 1
    logger.close()
    logger = MetricsLogger(tmp_path, tensorboard=True, resume_step=0)
    assert read_metrics(tmp_path) == [{"step": 0, "reward/mean": 0.0}]
    logger.log(1, {"reward/mean": 0.25})
    logger.close()
    assert [record["step"] for record in read_metrics(tmp_path)] == [0, 1]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("reward/mean")] == [(0, 0.0), (1, 0.25)]


def test_running_out_of_memory_in_a_tracker_is_not_reported_as_the_tracker_s_failure(tmp_path, trackers):
    _, trackio = trackers

    def out_of_memory(data, step=None):
        raise MemoryError

    logger = MetricsLogger(tmp_path, trackio=True)
    trackio.log = out_of_memory
    with pytest.raises(MemoryError):
        logger.log(1, {"x": 0.5})
    logger.close()


def test_a_fresh_start_removes_the_tensorboard_events_of_an_earlier_attempt(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, tensorboard=True)
    log_steps(logger, range(1, 5))  # killed before any checkpoint: the next start is a fresh one
    logger.close()
    logger = MetricsLogger(tmp_path, tensorboard=True)
    log_steps(logger, range(1, 3))
    logger.close()
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("reward/mean")] == [1, 2]
    # a resume keeps them: TensorBoard itself drops the steps after the checkpoint
    logger = MetricsLogger(tmp_path, tensorboard=True, resume_step=1)
    log_steps(logger, [2, 3])
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("reward/mean")] == [1, 2, 3]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_a_tracker_that_cannot_start_is_one_line_before_anything_is_trained(tmp_path, trackers, tiny_model_dir,
                                                                             arithmetic_files):
    from typer.testing import CliRunner

    from entrorl.cli import app

    wandb, _ = trackers
    wandb.init = lambda **options: (_ for _ in ()).throw(Exception("No API key configured."))
    train, _ = arithmetic_files
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"model": {"path": str(tiny_model_dir)}, "data": {"train": str(train)},
                                  "reward": {"name": "exact_match"}, "rollout": {"prompts_per_step": 2, "group_size": 2,
                                                                                 "max_new_tokens": 4},
                                  "optim": {"steps": 1}, "logging": {"wandb": True, "project": "mine"}}))
    result = CliRunner().invoke(app, ["train", str(config), "--run-dir", str(tmp_path / "run")])
    output = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert output.startswith(f"error: logging.wandb: could not start W&B in {tmp_path / 'run' / 'wandb'}: Exception: No API "
                             "key configured; without a login, WANDB_MODE=offline logs into the run directory, for `wandb "
                             "sync` to upload later")
    assert not (tmp_path / "run").exists()  # a run that could not start leaves no directory


def test_tensorboard_s_writer_thread_prints_no_traceback_while_other_threads_still_do(monkeypatch):
    import threading

    from entrorl.cli import _quiet_tensorboard_writer_thread

    shown = []  # the threads whose errors reach the hook that was there before (Python's prints a traceback)
    monkeypatch.setattr(threading, "excepthook", lambda args: shown.append(args.thread.name))
    _quiet_tensorboard_writer_thread()

    def failing():
        raise OSError(28, "No space left on device")

    writer_thread = type("_AsyncWriterThread", (threading.Thread,),
                         {"__module__": "tensorboard.summary.writer.event_file_writer"})  # as TensorBoard's is
    for thread in (writer_thread(target=failing, name="tensorboard's"), threading.Thread(target=failing, name="ours")):
        thread.start()
        thread.join()
    assert shown == ["ours"]


def test_a_tracker_that_fails_to_close_a_finished_run_does_not_send_the_user_to_resume(tmp_path, tiny_model_dir,
                                                                                       arithmetic_files, monkeypatch):
    from typer.testing import CliRunner

    from entrorl.cli import app

    close_for_real = MetricsLogger.close

    def cannot_finish(self, *, failed=False):
        close_for_real(self, failed=failed)
        raise TrackerError("logging.wandb: W&B could not finish: OSError: [Errno 28] No space left on device")

    monkeypatch.setattr(MetricsLogger, "close", cannot_finish)
    train, _ = arithmetic_files
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"model": {"path": str(tiny_model_dir)}, "data": {"train": str(train)},
                                  "reward": {"name": "exact_match"}, "rollout": {"prompts_per_step": 2, "group_size": 2,
                                                                                 "max_new_tokens": 4},
                                  "optim": {"steps": 1}}))
    result = CliRunner().invoke(app, ["train", str(config), "--run-dir", str(tmp_path / "run")])
    output = " ".join(result.output.split())
    assert result.exit_code == 1, result.output  # the run failed on its way, not a usage error
    assert ("error: logging.wandb: W&B could not finish: OSError: [Errno 28] No space left on device; the run itself "
            "finished: its last checkpoint, step_000001, and metrics.jsonl are complete") in output
    assert "--resume" not in output


@pytest.mark.parametrize("resume_step", [None, 3])
def test_links_planted_at_the_logger_s_files_are_replaced_not_written_through(tmp_path, trackers, resume_step):
    """A run directory received from elsewhere: metrics.jsonl as a link to nothing was appended through (creating
    the file it names), a metrics.jsonl.tmp link had the kept metrics written into what it named on a resume, and
    the W&B id and trackio run files were written through their links. The files outside stay as they were."""
    from entrorl.trainer.loggers import TRACKIO_RUN_FILE, WANDB_ID_FILE

    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("tmp", "wandb", "trackio"):
        (mine / name).write_text(f"my {name}\n")
    run = tmp_path / "run"
    run.mkdir()
    if resume_step is not None:
        (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    else:
        (run / "metrics.jsonl").symlink_to(mine / "metrics")  # to nothing: exists() is False
    (run / "metrics.jsonl.tmp").symlink_to(mine / "tmp")
    (run / WANDB_ID_FILE).symlink_to(mine / "wandb")
    (run / TRACKIO_RUN_FILE).symlink_to(mine / "trackio")
    logger = MetricsLogger(run, resume_step=resume_step, wandb=True, trackio=True, run_name="run")
    log_steps(logger, [4])
    logger.close()
    assert sorted(path.name for path in mine.iterdir()) == ["tmp", "trackio", "wandb"]
    assert [(mine / name).read_text() for name in ("tmp", "wandb", "trackio")] == ["my tmp\n", "my wandb\n",
                                                                                   "my trackio\n"]
    for name in ("metrics.jsonl", WANDB_ID_FILE, TRACKIO_RUN_FILE):
        assert (run / name).is_file() and not (run / name).is_symlink(), name
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == (
        [4] if resume_step is None else [1, 2, 3, 4])


def test_metrics_jsonl_holds_this_start_s_steps_with_non_finite_values_as_null(tmp_path):
    """A fresh start replaces an earlier attempt's metrics.jsonl; NaN and infinities are written as null (valid JSON),
    each record starts with its step, and a step can be read back before the logger is closed."""
    logger = MetricsLogger(tmp_path)
    log_steps(logger, range(1, 4))
    logger.close()
    logger = MetricsLogger(tmp_path)
    logger.log(1, {"a": float("nan"), "b": float("inf"), "c": -float("inf"), "d": 2.5, "e": 3, "f": "x",
                   "g": np.float64("nan"), "h": np.float64(-np.inf)})  # numpy's float64 is a float too
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert read_metrics(tmp_path) == [{"step": 1, "a": None, "b": None, "c": None, "d": 2.5, "e": 3, "f": "x", "g": None,
                                       "h": None}]
    assert list(json.loads(text)) == ["step", "a", "b", "c", "d", "e", "f", "g", "h"]
    logger.close()
    logger.close()  # a second close does nothing


def test_numpy_scalars_and_0d_tensors_are_written_as_the_numbers_they_hold_and_other_objects_are_refused(tmp_path):
    """Metrics computed with numpy or torch need no conversion by the caller; an object JSON cannot write stops the step
    before anything of it is written, naming the metric."""
    import torch

    logger = MetricsLogger(tmp_path)
    logger.log(1, {"a": np.float32(0.5), "b": np.int64(3), "c": np.bool_(True), "d": torch.tensor(0.25),
                   "e": torch.tensor(7), "f": np.float32("nan"), "g": torch.tensor(float("-inf"))})
    with pytest.raises(TypeError, match=r"step 2: metrics must be numbers.*\{'h': 'Tensor'\}"):
        logger.log(2, {"x": 1.0, "h": torch.tensor([1.0, 2.0])})
    # a metric named step would relabel the record in metrics.jsonl, while the trackers keep the step it was logged at
    with pytest.raises(ValueError, match="step 2: a metric may not be named 'step', the record's own key; rename it"):
        logger.log(2, {"step": 99, "x": 1.0})
    logger.close()
    assert read_metrics(tmp_path) == [{"step": 1, "a": 0.5, "b": 3, "c": True, "d": 0.25, "e": 7, "f": None, "g": None}]
    assert [type(value) for value in read_metrics(tmp_path)[0].values()][1:6] == [float, int, bool, float, int]


def test_a_step_logged_after_metrics_jsonl_was_deleted_is_refused(tmp_path):
    """The run directory removed during the run: the next step stops the run instead of going into an unlinked file."""
    logger = MetricsLogger(tmp_path)
    logger.log(1, {"x": 0.5})
    (tmp_path / "metrics.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"metrics.jsonl was deleted during the run .*since step 2 and the steps"):
        logger.log(2, {"x": 0.25})
    logger.close()


def test_read_metrics_leaves_out_only_a_last_line_cut_short(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "x": 0.5}\n\n{"step": 2, "x": 0.25}\n{"step": 3, "x": 0.')
    assert read_metrics(tmp_path) == [{"step": 1, "x": 0.5}, {"step": 2, "x": 0.25}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "x": 0.5}\n{"step": 2, "x\n{"step": 3, "x": 0.125}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not JSON"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "x": 0.5}\n\n{"step": 2, "x\n{"step": 3, "x": 0.125}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 3 is not JSON"):  # the file's line, blank ones counted
        read_metrics(tmp_path)
    # a resume keeps the complete steps up to the checkpoint and drops the cut line
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "x": 0.5}\n{"step": 2, "x": 0.25}\n{"step": 3, "x": 0.')
    MetricsLogger(tmp_path, resume_step=2).close()
    assert [record["step"] for record in read_metrics(tmp_path)] == [1, 2]


def test_trackers_are_sent_finite_numbers_only(tmp_path, trackers):
    _, trackio = trackers
    logger = MetricsLogger(tmp_path, tensorboard=True, wandb=True, trackio=True)
    logger.log(1, {"a": float("nan"), "b": float("inf"), "c": 0.5, "d": 4, "e": "text"})
    logger.close()
    logger.close()
    assert FakeTrackers.wandb_runs[0].logged == [(1, {"c": 0.5, "d": 4}, True)]
    assert ("log", 1, {"c": 0.5, "d": 4}) in trackio.calls
    assert trackio.calls.count(("finish",)) == 1


def test_a_fresh_start_opens_new_tracker_runs_even_where_an_earlier_attempt_left_its_markers(tmp_path, trackers):
    _, trackio = trackers
    (tmp_path / "wandb_run_id").write_text("earlier-run")
    (tmp_path / "trackio_run").write_text("run-20260101-000000\n")
    trackio.runs["run-20260101-000000"] = [1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is held by the new runs: nothing to warn about
        logger = MetricsLogger(tmp_path, wandb=True, trackio=True, run_name="run")
        log_steps(logger, [1, 2])
    logger.close()
    (run,) = FakeTrackers.wandb_runs
    assert run.options["id"] is None and [step for step, _, _ in run.logged] == [1, 2]
    (init,) = [call[1] for call in trackio.calls if call[0] == "init"]
    assert init["resume"] == "never" and init["name"] != "run-20260101-000000"
    assert (tmp_path / "wandb_run_id").read_text() == run.id


def test_sync_and_close_make_the_logged_steps_durable(tmp_path, monkeypatch):
    import os

    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), fsync(fd))[1])
    logger = MetricsLogger(tmp_path)
    logger.log(1, {"x": 0.5})
    assert synced == []  # no fsync per step
    descriptor = logger._file.fileno()
    logger.sync()
    assert synced == [descriptor]
    logger.log(2, {"x": 0.25})
    logger.close()
    assert synced == [descriptor, descriptor]  # closing syncs the steps logged since
    logger.close()
    assert len(synced) == 2


def test_a_resume_that_cannot_rewrite_metrics_jsonl_leaves_it_as_it_was_and_names_it(tmp_path, monkeypatch):
    from entrorl.trainer import checkpoint

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "x": 0.5}\n{"step": 2, "x": 0.25}\n')

    def disk_fills_up(path, write, **options):
        def half_then_full(handle):
            write(handle)
            handle.truncate(handle.tell() // 2)
            raise OSError(28, "No space left on device")

        write_atomically(path, half_then_full, **options)

    write_atomically = checkpoint.write_atomically
    monkeypatch.setattr(checkpoint, "write_atomically", disk_fills_up)
    with pytest.raises(OSError, match="No space left on device") as raised:
        MetricsLogger(tmp_path, resume_step=1)
    monkeypatch.undo()
    assert raised.value.filename == str(tmp_path / "metrics.jsonl")
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "x": 0.5}\n{"step": 2, "x": 0.25}\n'
    assert sorted(path.name for path in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left behind


def test_a_resume_says_which_steps_the_checkpoint_trained_that_metrics_jsonl_does_not_hold(tmp_path):
    """metrics.jsonl cut back (or deleted) since the checkpoint was written: the resume warns of the gap the run's
    curves will have, naming the steps; a whole file warns of nothing."""
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": step, "x": 0.5}) for step in (0, 1, 2, 3, 4, 5)]
    for kept, said in ((lines, None), (lines[:3], "holds no record of 2 of the 4 steps the checkpoint trained (steps 3 "
                                                   "to 4)"),
                       ([lines[0], lines[2], lines[4]], "holds no record of 2 of the 4 steps the checkpoint trained "
                                                         "(some of steps 1 to 3)"),
                       (None, "metrics.jsonl is missing (steps 1 to 4)")):
        path.unlink(missing_ok=True)
        if kept is not None:
            path.write_text("".join(line + "\n" for line in kept))
        with warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            MetricsLogger(tmp_path, resume_step=4).close()
        gaps = [str(warning.message) for warning in raised if "have a gap there" in str(warning.message)]
        assert gaps == ([] if said is None else [gaps[0]]) and (said is None or said in gaps[0]), (said, gaps)


def test_a_step_that_cannot_be_written_names_metrics_jsonl(tmp_path):
    class FullDisk:
        def __init__(self, file):
            self.file = file
            self.closed = False

        def fileno(self):
            return self.file.fileno()

        def write(self, text):
            raise OSError(28, "No space left on device")

        def flush(self):
            self.file.flush()

        def close(self):
            self.closed = True
            self.file.close()

    logger = MetricsLogger(tmp_path)
    logger._file = FullDisk(logger._file)
    with pytest.raises(OSError, match="No space left on device") as raised:
        logger.log(1, {"x": 0.5})
    assert raised.value.filename == str(tmp_path / "metrics.jsonl")
    logger.close()


def test_a_resume_with_a_trackio_that_does_not_say_which_steps_it_holds_warns_and_sends_every_step(tmp_path, trackers):
    _, trackio = trackers
    starting = trackio.init
    trackio.init = lambda **options: FakeTrackioRun(trackio, starting(**options).name, None)  # no _next_step
    (tmp_path / "trackio_run").write_text("run-20260101-000000\n")
    trackio.runs["run-20260101-000000"] = [1, 2, 3]
    with pytest.warns(UserWarning, match="this trackio version does not say which steps its run already holds"):
        logger = MetricsLogger(tmp_path, resume_step=1, trackio=True, run_name="run")
    log_steps(logger, [2, 3])
    logger.close()
    assert trackio.runs["run-20260101-000000"] == [1, 2, 3, 2, 3]
    # a fresh start has nothing to resume: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MetricsLogger(tmp_path, trackio=True, run_name="run").close()


def test_each_step_reaches_tensorboard_s_files_before_the_logger_is_closed(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, tensorboard=True)
    logger.log(1, {"reward/mean": 0.5})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("reward/mean")] == [(1, 0.5)]
    logger.close()


def test_every_step_is_flushed_to_tensorboard_not_only_the_first(tmp_path):
    """TensorBoard's writer flushes its first event at once and the others every two minutes: the logger flushes it
    after each step, so a crash loses no step that metrics.jsonl holds."""
    logger = MetricsLogger(tmp_path, tensorboard=True)
    flushed = []
    flush = logger._tensorboard.flush
    logger._tensorboard.flush = lambda: (flushed.append(True), flush())[1]
    log_steps(logger, [1, 2, 3])
    assert len(flushed) == 3
    logger.close()


def test_a_fresh_start_without_w_and_b_keeps_the_w_and_b_files_in_the_run_directory(tmp_path):
    (tmp_path / "wandb" / "offline-run-1-abc").mkdir(parents=True)
    MetricsLogger(tmp_path).close()
    MetricsLogger(tmp_path, tensorboard=True).close()
    assert (tmp_path / "wandb" / "offline-run-1-abc").is_dir()
    assert not (tmp_path / ".wandb-earlier").exists()


def test_w_and_b_and_trackio_get_the_run_s_config_and_w_and_b_writes_into_the_run_directory(tmp_path, trackers):
    _, trackio = trackers
    config = {"method": "grpo", "optim": {"lr": 1e-6}}
    MetricsLogger(tmp_path, wandb=True, trackio=True, run_name="run", project="mine", config=config).close()
    (run,) = FakeTrackers.wandb_runs
    assert {key: run.options[key] for key in ("project", "name", "config", "dir")} == {
        "project": "mine", "name": "run", "config": config, "dir": str(tmp_path)}
    (init,) = [call[1] for call in trackio.calls if call[0] == "init"]
    assert init["config"] == config and init["project"] == "mine"


def test_non_finite_values_inside_list_and_dict_metrics_are_written_as_null(tmp_path):
    """A histogram or a table of metrics is JSON too: its NaN and infinities become null (json.dumps would write NaN /
    Infinity, which no strict JSON reader takes)."""
    logger = MetricsLogger(tmp_path)
    logger.log(1, {"hist": [float("nan"), 1.0, (float("-inf"), 2)], "table": {"x": float("inf"), "y": {"z": np.float64("nan")}}})
    logger.close()

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    record = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert record == {"step": 1, "hist": [None, 1.0, [None, 2]], "table": {"x": None, "y": {"z": None}}}


def _metrics_with_line_separator(run_dir):
    """A metrics.jsonl whose records hold a raw U+2028 inside a string (what json.dumps(..., ensure_ascii=False),
    orjson or jq write): four steps, one JSON object per '\\n'-ended line."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "reward/mean": 0.1 * s, "note": "a\u2028b"}, ensure_ascii=False) + "\n"
                            for s in range(1, 5)), encoding="utf-8")
    return path


def test_read_metrics_reads_a_line_holding_u2028_as_read_metrics_records_does(tmp_path):
    """3579fc5 made read_metrics_records (entrorl report, the lab report) split metrics.jsonl at '\\n' only, because
    splitlines() also cuts at U+2028 inside a string; the trainer's own reader, trainer/loggers.py _records (behind
    entrorl.trainer.read_metrics and the CLI's end-of-run summary), still uses splitlines() and raises
    'line 1 is not JSON' on the same file."""
    from entrorl.analysis.run import read_metrics_records
    from entrorl.trainer import read_metrics

    path = _metrics_with_line_separator(tmp_path / "run")
    records, unreadable, _ = read_metrics_records(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and unreadable == []
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]


def test_resume_truncates_a_metrics_file_holding_u2028(tmp_path):
    """MetricsLogger(resume_step=...) (trainer/loggers.py:59, the resume truncation of metrics.jsonl) reads the file
    with the same splitlines()-based _records: a resume fails with 'line 1 is not JSON' on a file entrorl report reads."""
    from entrorl.trainer.loggers import MetricsLogger

    path = _metrics_with_line_separator(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger = MetricsLogger(tmp_path / "run", resume_step=2)
        logger.close()
    kept = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    assert [r["step"] for r in kept] == [1, 2]
    assert kept[0]["note"] == "a\u2028b"


def test_two_runs_open_in_one_process_each_log_into_their_own_w_and_b_and_trackio_runs(tmp_path, trackers):
    """trackio.log / trackio.finish act on the run started last in the process: a first run's steps went into the
    second's trackio run, and its close finished the second one. W&B hands back the run already open unless asked for
    a new one (reinit='create_new')."""
    _, trackio = trackers
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    a = MetricsLogger(first, wandb=True, trackio=True, run_name="a")
    b = MetricsLogger(second, wandb=True, trackio=True, run_name="b")
    log_steps(a, [1, 2])
    log_steps(b, [1, 2, 3])
    a.close()
    log_steps(b, [4])
    b.close()
    name_a, name_b = ((folder / "trackio_run").read_text().strip() for folder in (first, second))
    assert trackio.runs == {name_a: [1, 2], name_b: [1, 2, 3, 4]}
    assert all(run.options["reinit"] == "create_new" for run in FakeTrackers.wandb_runs)
    # closed, a run is no longer trackio's current one (as trackio.finish() leaves it): a later trackio.log of the
    # user's is refused by trackio, not stored as a new step of the finished run
    assert trackio.context_vars.current_run.get() is None


def test_a_trackio_store_that_cannot_be_written_or_steps_it_could_not_store_stop_the_run(tmp_path, trackers):
    """trackio starts whatever its store, and its writer, in another thread, only warns that a batch could not be
    stored: the run trained to the end with nothing in trackio. A store that cannot be made is refused at the start,
    naming logging.trackio; steps trackio notes it could not store stop the run at the next step."""
    _, trackio = trackers
    (tmp_path / "a-file").write_text("")
    trackio.utils = types.SimpleNamespace(TRACKIO_DIR=tmp_path / "a-file" / "trackio")
    with pytest.raises(TrackerError, match=r"logging.trackio: could not start trackio: NotADirectoryError"):
        MetricsLogger(tmp_path, trackio=True)
    trackio.utils.TRACKIO_DIR = tmp_path / "store"
    logger = MetricsLogger(tmp_path, trackio=True)
    logger.log(1, {"x": 1.0})
    logger._trackio._warned_failures = {"init-config", "write-logs-to-sqlite"}  # what trackio notes beside its warning
    with pytest.raises(TrackerError, match=r"logging.trackio: trackio could not log: RuntimeError: trackio could not "
                                           r"store the run's steps \(write-logs-to-sqlite; its warning says why\)"):
        logger.log(2, {"x": 2.0})
    with pytest.raises(TrackerError, match="trackio could not finish"):
        logger.close()
    assert (tmp_path / "store").is_dir()
