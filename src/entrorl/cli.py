"""The ``entrorl`` command: ``train``, ``eval``, ``report``, ``methods``, ``lab``, ``data audit`` and ``data reasoning-gym``."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import re
import shlex
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NamedTuple, NoReturn, Optional, get_args

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Entropy-aware reinforcement fine-tuning of language models.")


class _MessagesConsole(Console):
    """The console of progress and messages, on stderr. Once the reader of that output has gone (`entrorl eval ... 2>&1
    | head -1`), what it would print goes to the null device and the command carries on to write its files (rich
    would end the process at the next print, with exit 1, losing an evaluation that had finished)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        with contextlib.suppress(AttributeError, OSError, ValueError):
            descriptor = self.file.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, descriptor)  # Python's own later writes to stderr (a flush at exit) go there too
            os.close(null)


# Every string that comes from the user's data, files or code (answers, prompts, paths, error messages) is printed
# escaped (rich.markup.escape) or as a rich Text: as markup, "[bold]x" would print "x" and "[/i]" would raise.
console = _MessagesConsole(stderr=True)
_python_show_warning = warnings.showwarning


PATH_METAVAR = "<path>"


def _path(value: str) -> Path:
    """A file or folder named on the command line. An empty one, most often an unset shell variable (``--out "$OUT"``),
    is refused: as a ``Path`` it would be the current folder, which the command would then read or write into."""
    if value == "":
        raise typer.BadParameter("an empty path (an unset shell variable?)")
    return Path(value)


def _print_version(value: bool) -> None:
    if value:
        from entrorl import __version__

        typer.echo(f"entrorl {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="print entrorl's version and exit")] = False,
) -> None:
    """Entropy-aware reinforcement fine-tuning of language models."""


def _fail(message: str, code: int = 2) -> NoReturn:
    from entrorl._checks import visible_controls

    # plain text (a message may hold brackets), never wrapped: a path or file:line stays on one line
    console.print(Text.assemble(("error:", "bold red"), " ", visible_controls(message)), soft_wrap=True)
    raise typer.Exit(code)


@app.command(help=(
    "Train a local Hugging Face model with an entrorl method; writes metrics.jsonl and checkpoints. Every "
    "key of the configuration: docs/configuration.md."))
def train(
    config: Annotated[Path, typer.Argument(parser=_path, help="YAML training configuration")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a key, e.g. --set optim.lr=1e-5 or --set reward.extra.0.weight=0.5 (repeatable)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the latest checkpoint of the run directory")] = False,
    run_dir: Annotated[Optional[Path], typer.Option(parser=_path, metavar=PATH_METAVAR, help="run directory (default: logging.run_dir/logging.name)")] = None,
) -> None:
    from entrorl.modeling import is_out_of_memory, out_of_memory_while
    from entrorl.trainer import ConfigError, Trainer, TrainingInterrupted, TrainingStopped, load_config
    from entrorl.trainer.checkpoint import CheckpointWriteError, checkpoint_step, latest_checkpoint
    from entrorl.trainer.loop import check_resume_settings
    from entrorl.trainer.stop_signals import HANGUP, send_a_hung_up_terminal_to_null
    from entrorl.trainer.loggers import TrackerError

    try:
        train_config = load_config(config, set_ or [])
    except ConfigError as error:
        _fail(str(error))
    if resume and run_dir is None and train_config.logging.name is None:
        _fail("--resume needs the run directory: pass --run-dir or set logging.name")
    if resume:  # a finished run is left as it is, without loading anything
        directory = run_dir if run_dir is not None else Path(train_config.logging.run_dir) / train_config.logging.name
        latest = latest_checkpoint(directory)  # its files' CRC-32 read once: here when finished, else by the trainer
        if latest is not None and checkpoint_step(latest) >= train_config.optim.steps:
            latest = latest_checkpoint(directory, verify="all")  # a damaged last step is redone, as the trainer would
        if latest is not None and checkpoint_step(latest) >= train_config.optim.steps:
            saved_config = _read_json_object(directory / "config.json")  # that of the run's latest start
            if saved_config is not None:
                try:
                    check_resume_settings(saved_config, train_config)
                except ValueError as error:
                    _fail(str(error))
            console.print(f"{escape(str(directory))} is already at step {checkpoint_step(latest)} of optim.steps = "
                          f"{train_config.optim.steps}: nothing to do (raise optim.steps with --set to train further; "
                          "a decaying lr_schedule then stretches over the new total)", soft_wrap=True, highlight=False)
            return
    def command(directory: Path | None) -> list[str]:
        """This command again, in run directory ``directory`` (without --resume)."""
        return ["entrorl", "train", str(config), *(f"--set={option}" for option in set_ or []),
                *(["--run-dir", str(directory)] if directory is not None else [])]

    # Ctrl-C while the data, the reward and the model load: no step was taken
    interrupted = (f"while the run was being set up, before any step (nothing trained"
                   f"{', no checkpoint changed' if resume else ''}). {'Continue' if resume else 'Start again'} with: "
                   f"{shlex.join([*command(run_dir), *(['--resume'] if resume else [])])}")
    try:
        with _said_when_interrupted(interrupted):
            trainer = Trainer(train_config, run_dir=run_dir, resume=resume, console=console)
    except (ValueError, OSError, TrackerError) as error:  # OSError: missing files, and unreadable ones
        _fail(str(error))
    except (MemoryError, RuntimeError) as error:  # e.g. the optimizer's state under a memory limit
        if not is_out_of_memory(error):
            raise
        _fail(str(error) if str(error).startswith("out of memory")
              else str(out_of_memory_while("setting up the run", error, files_read=False)), code=1)
    console.print(Text(f"run directory: {trainer.run_dir}"), soft_wrap=True)
    if train_config.data.pass_rate_band is not None:
        console.print(Text(f"data.pass_rate_band {train_config.data.pass_rate_band}: {len(trainer.train_records)} of the "
                           f"{trainer.train_prompts_read} training prompts are in the band"), soft_wrap=True)
    if trainer.adapter is not None:
        lora = train_config.model.lora
        total = sum(parameter.numel() for parameter in trainer.model.parameters())
        console.print(f"LoRA adapters (rank {lora.rank}, alpha {lora.alpha:g}): {trainer.adapter.trainable_parameters():,} "
                      f"trained parameters of {total:,}", highlight=False)
    stored = _stored_dtype(Path(train_config.model.path))
    if stored in ("bfloat16", "float16") and train_config.model.dtype == "float32":
        console.print(Text(f"model.path stores {stored} weights: they are trained in float32 (model.dtype) and the "
                           f"checkpoints hold float32, twice the size; model.dtype: {stored} keeps them in {stored}"),
                      soft_wrap=True)
    if trainer.resumed_from is not None:
        console.print(f"resuming from {escape(trainer.resumed_from.name)} (step {trainer.step} of "
                      f"{train_config.optim.steps})", highlight=False)
        for key, old, new in trainer.resume_changes:
            console.print(Text(f"  changed since that checkpoint: {key}: {old!r} -> {new!r}"), soft_wrap=True)
        if trainer.resume_learning_rate is not None:
            before, now = trainer.resume_learning_rate
            console.print(f"  so the next step's learning rate is {now:.4g} (the checkpoint's schedule: {before:.4g})",
                          highlight=False, soft_wrap=True)
        for note in trainer.version_notes():
            console.print(Text(f"  {note}"), soft_wrap=True)
    again = command(trainer.run_dir)

    def with_the_way_on(message: str) -> str:
        """``message``, then the last checkpoint and the command that continues from it."""
        if not trainer.run_dir.is_dir():
            return f"{message}; the run directory {trainer.run_dir} no longer exists"
        latest = latest_checkpoint(trainer.run_dir, verify="all")  # called intact: the one a resume would take
        if latest is not None and checkpoint_step(latest) >= train_config.optim.steps:  # failed while closing
            return (f"{message}; the run itself finished: its last checkpoint, {latest.name}, and metrics.jsonl are "
                    "complete")
        return f"{message}; " + (f"the last checkpoint, {latest.name}, is intact: once the cause is fixed, continue "
                                 f"with {shlex.join([*again, '--resume'])}" if latest is not None
                                 else "no checkpoint had been written")

    _quiet_tensorboard_writer_thread()
    try:
        trainer.train(handle_signals=True, stop_on_hangup=True)
    except TrainingStopped as error:  # its message names the last intact checkpoint, if any
        resumable = trainer.run_dir.is_dir() and latest_checkpoint(trainer.run_dir, verify="all") is not None
        _fail(f"{error}" + (f" Once the cause is fixed, continue with: {shlex.join([*again, '--resume'])}"
                            if resumable else ""), code=3)
    except CheckpointWriteError as error:  # a full disk, a removed run directory: the message names the intact one
        latest = latest_checkpoint(trainer.run_dir, verify="all") if trainer.run_dir.is_dir() else None
        _fail(f"{error}" + (f"; once the cause is fixed, continue with {shlex.join([*again, '--resume'])}"
                            if latest is not None else ""), code=1)
    except TrackerError as error:  # TensorBoard, W&B or trackio (the message names which)
        _fail(with_the_way_on(str(error)), code=1)
    except OSError as error:  # any other file the run writes (metrics, evaluations, samples)
        if is_out_of_memory(error):  # ENOMEM: a memory map or a process refused, not a file
            error = out_of_memory_while(trainer.activity, error, files_read=False)
        _fail(with_the_way_on(str(error)), code=1)
    except TrainingInterrupted as error:
        by = f" by {signal.Signals(error.signal_number).name}"
        if error.checkpoint is None:
            console.print(Text.assemble(("interrupted", "bold yellow"), by + " after the evaluation at the start, before "
                                        "the first step; nothing to resume. Start again with: " + shlex.join(again)),
                          soft_wrap=True)
        else:
            console.print(Text.assemble(("interrupted", "bold yellow"), by + f" after step {error.step}; checkpoint "
                                        f"{error.checkpoint.name} saved. Continue with: " + shlex.join([*again, "--resume"])),
                          soft_wrap=True)
        raise typer.Exit(128 + error.signal_number) from None
    except (MemoryError, RuntimeError) as error:  # after TrainingInterrupted, a RuntimeError too
        if not is_out_of_memory(error):
            raise
        _fail(with_the_way_on(str(out_of_memory_while(trainer.activity, error, files_read=False))), code=1)
    finally:
        # the run has ended, saved or not; a soft CPU-time limit's SIGXCPU comes again every CPU second, and as
        # Python shuts down (the trainer's handler back to the default) a repeat would end the process by the signal
        if hasattr(signal, "SIGXCPU"):
            signal.signal(signal.SIGXCPU, signal.SIG_IGN)
        # and a closed terminal's SIGHUP would end it before its last line is said: it only sends that line nowhere
        if HANGUP is not None and signal.getsignal(HANGUP) is not signal.SIG_IGN:
            signal.signal(HANGUP, lambda number, frame: send_a_hung_up_terminal_to_null())
    console.print(Text.assemble(("done", "green"), f": {_run_summary(trainer.run_dir)}"), soft_wrap=True)


def _quiet_tensorboard_writer_thread() -> None:
    """From here on, errors in TensorBoard's writer thread print nothing (a process-wide ``threading.excepthook``): the
    same error (a full disk) reaches the run at its next write, which names the folder in one line, where Python would
    first print the thread's traceback."""
    import threading

    default = threading.excepthook

    def hook(args) -> None:
        if not type(args.thread).__module__.startswith("tensorboard"):
            default(args)

    threading.excepthook = hook


def _run_summary(run_dir: Path) -> str:
    """What a finished run did, from its files: steps, entropy and reward at the first and last step, the last
    evaluation, and the final model's directory (what `entrorl eval --model` takes)."""
    from entrorl.trainer.checkpoint import latest_checkpoint
    from entrorl.trainer.loggers import read_metrics
    from entrorl.trainer.progress import format_evaluation

    everything = read_metrics(run_dir)
    records = [record for record in everything if record.get("step", 0) > 0 and "reward/mean" in record]
    parts = [str(run_dir)]
    if records:
        first, last = records[0], records[-1]

        def moved(key: str, label: str) -> str:
            values = [record.get(key) for record in (first, last)]
            shown = ["n/a" if value is None else f"{value:.4g}" for value in values]
            return f"{label} {shown[0]} (step {first['step']}) -> {shown[1]} (step {last['step']})"

        parts += [moved("entropy/mean", "entropy"), moved("reward/mean", "reward")]
    evaluated = [record for record in everything if "eval/avg_at_n" in record]
    if evaluated:
        parts.append(f"{format_evaluation(evaluated[-1])} at step {evaluated[-1]['step']}")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        parts.append(f"model {checkpoint / 'model'}")
    return "; ".join(parts)


def _parse_ks(text: str) -> list[int]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not all(re.fullmatch(r"[-+]?[0-9]+", part) for part in parts):  # int() would also read 1_6 and other digits
        _fail(f"--k expects comma-separated integers, got {text!r}")
    ks = sorted({int(part) for part in parts})
    if not ks:
        _fail(f"--k needs at least one k (comma-separated integers such as 1,4,16), got {text!r}")
    if ks[0] < 1:
        _fail(f"--k values must be >= 1, got {text!r}")
    return ks


def _probability_above_zero(value: float) -> float:
    """``--top-p``'s check, in the option's parser: a probability above 0 (typer's ranges cannot leave 0 out)."""
    if not 0 < value <= 1:
        raise typer.BadParameter(f"{value:g} is not in the range 0<x<=1 (1 = off)")
    return value


# options that `eval` and `data audit` share, spelled once
DEFAULT_MAX_NEW_TOKENS = 256
ModelDirOption = Annotated[Path, typer.Option("--model", parser=_path, metavar=PATH_METAVAR, help="local Hugging Face model directory, a training checkpoint "
                                              "or run directory (its newest checkpoint), or LoRA adapters in peft's "
                                              "format (a checkpoint's adapter/) on the base model they record")]
BaseModelOption = Annotated[Optional[Path], typer.Option("--base", parser=_path, metavar=PATH_METAVAR, help="with --model naming LoRA adapters, or a LoRA "
                                                         "run or checkpoint (then its adapters are loaded): the base "
                                                         "model's directory, instead of the one the adapters record")]
DataFileOption = Annotated[Path, typer.Option("--data", parser=_path, metavar=PATH_METAVAR, help="prompt file (.jsonl, .json, .csv, .parquet, .arrow, "
                                                          "datasets save_to_disk directory: for eval, a DatasetDict's "
                                                          "only split or a split's sub-directory; for data audit, its "
                                                          "train split)")]
SamplesOption = Annotated[int, typer.Option("--n", min=1, help="samples per prompt")]
MaxNewTokensOption = Annotated[Optional[int], typer.Option(
    min=1, help="most tokens sampled per response (default: rollout.max_new_tokens in the run's config.json when "
    f"--model is a run or one of its checkpoints, else {DEFAULT_MAX_NEW_TOKENS})")]
TemperatureOption = Annotated[float, typer.Option(min=0.0, help="sampling temperature (0 = greedy)")]
TopPOption = Annotated[float, typer.Option(callback=_probability_above_zero, help="nucleus sampling: keep the smallest "
                                           "set of tokens whose probability reaches this (1 = off)  [0<x<=1]")]
TopKOption = Annotated[int, typer.Option(min=0, help="keep only the k most likely tokens (0 = off)")]
PromptColumnOption = Annotated[Optional[str], typer.Option(
    help="the data's column holding the prompt: text, or chat messages (with --chat-template); default: a run's "
    "data.prompt_column when --model is a run or one of its checkpoints, else prompt")]
AnswerColumnOption = Annotated[Optional[str], typer.Option(
    help="the data's column holding the reference answer (reward_model.ground_truth: a field within a column); "
    "default: a run's data.answer_column when --model is a run or one of its checkpoints, else answer")]
MetaColumnsOption = Annotated[Optional[str], typer.Option(
    "--meta-columns", help="comma-separated columns of the data passed to the reward as keyword arguments, '' for none "
    "(default: a run's data.meta_columns when --model is a run or one of its checkpoints and --reward is not given, "
    "else every column but the prompt and the answer)", show_default=False)]
SeedOption = Annotated[int, typer.Option(help="sampling seed (what torch.manual_seed takes: -2**63 to 2**64 - 1)",
                                         min=-(2**63), max=2**64 - 1)]
RewardOption = Annotated[Optional[str], typer.Option("--reward", help="reward name or package.module:function "
                                                     "(default: a run's own reward, with its settings, else math)")]
RewardArgOption = Annotated[Optional[list[str]], typer.Option(
    "--reward-arg", help="an option of the reward, KEY=VALUE with a YAML value, repeatable (--reward-arg "
    "task=basic_arithmetic); over a run's own reward.kwargs when --reward is not given", show_default=False)]
CorrectThresholdOption = Annotated[Optional[float], typer.Option(
    help="a sample is correct when its reward reaches this (default: the reward's own; 1.0 for reasoning_gym and "
    "code, 0.5 otherwise)")]
PromptTemplateOption = Annotated[Optional[str], typer.Option(
    "--prompt-template", help="format string with {prompt} (default: the run's data.prompt_template when --model is a "
    "run or one of its checkpoints, else '{prompt}')")]
ChatTemplateOption = Annotated[Optional[bool], typer.Option(
    "--chat-template/--no-chat-template", help="wrap each prompt as a user turn with the tokenizer's chat template, as "
    "model.chat_template does in training (default: the run's model.chat_template when --model is a run or one of its "
    "checkpoints, else off)")]
DeviceOption = Annotated[str, typer.Option("--device", help="'auto' (a CUDA GPU when there is one), 'cpu', 'cuda', 'cuda:N', 'mps' (an Apple GPU)")]
DtypeOption = Annotated[Optional[str], typer.Option(
    "--dtype", help="float32, bfloat16 or float16 [default: the run's model.dtype when --model is a training run or "
    "one of its checkpoints, else float32]", show_default=False)]
RequireAnswerOption = Annotated[bool, typer.Option(
    help="refuse rows without a reference answer (--no-require-answer for tasks whose reward checks answers without "
    "one)")]
TrustRemoteCodeOption = Annotated[bool, typer.Option("--trust-remote-code", help="run the model directory's own model "
                                                     "and tokenizer code (auto_map in its config); read it first")]


def _sampling_inputs(model: Path, data: Path, reward: str | None, *, prompt_column: str | None,
                     answer_column: str | None, meta_columns: str | None = None,
                     prompt_template: str | None, chat_template: bool | None, max_new_tokens: int | None,
                     temperature: float, top_p: float, top_k: int,
                     max_prompts: int | None, device: str, dtype: str | None, base: Path | None = None,
                     check_fit: bool = False, trust_remote_code: bool = False, require_answer: bool = True,
                     correct_threshold: float | None = None, check_outputs: Callable[[], None] | None = None,
                     reward_args: list[str] | None = None, command: str):
    """What `eval` and `data audit` (``command``, named in errors) sample from: the prompt records, the reward
    (checked against their columns), the tokenizer, the model in eval mode, the encoded prompts, the model directory
    resolved, the settings used (prompt format, reward and its settings: the run's unless given, see
    :func:`_run_defaults`; ``reward_args`` are ``--reward-arg`` options) and the sampling parameters (their most new
    tokens, like the prompt format, the run's unless given); ValueError /
    FileNotFoundError on bad input. The model is a complete model directory or LoRA adapters on ``base`` (see
    :func:`entrorl.trainer.checkpoint.resolve_model_directory`). With ``check_fit`` every prompt must leave the most
    new tokens of the context (checked before the weights load when config.json declares the context).
    ``check_outputs`` runs once the data and the reward are checked, before the model loads: a place to refuse an
    output that could not be written, before the sampling it would lose. Ctrl-C or SIGTERM meanwhile: one line saying
    nothing was written, exit 130 / 143."""
    from entrorl._checks import refuse_multi_process_launch
    from entrorl.data import DataError, check_prompt_template, load_prompts
    from entrorl.modeling import (check_prompt_ids_in_vocabulary, check_prompts_fit, check_stop_tokens_can_be_sampled,
                                  encode_records, load_tokenizer, read_model_config, stop_token_ids, unknown_token_note,
                                  unstopped_turn_end_note)
    from entrorl.rewards import RewardRunner, get_reward
    from entrorl.rollout import SamplingParams
    from entrorl.trainer.checkpoint import load_model_directory
    from entrorl.trainer.config import resolve_device

    refuse_multi_process_launch(command)
    for option, column in (("--prompt-column", prompt_column), ("--answer-column", answer_column)):
        if column is not None and not column.strip():
            raise ValueError(f"{option} names no column; leave it out for the run's own, or 'prompt' / 'answer'")
    with _said_when_interrupted("while loading the model and the prompts: nothing was written"):
        defaults = _run_defaults(model, prompt_template, chat_template, max_new_tokens, reward, correct_threshold, dtype,
                                 reward_args=reward_args, prompt_column=prompt_column, answer_column=answer_column,
                                 meta_columns=meta_columns)
        if meta_columns is not None:  # said of the option, before load_prompts says it of its argument
            listed = defaults.meta_columns or []
            twice = sorted({name for name in listed if listed.count(name) > 1})
            shared = [name for name in listed if name in (defaults.prompt_column, defaults.answer_column)]
            if twice or shared:
                raise ValueError(f"--meta-columns {meta_columns!r} lists " + (
                    f"{', '.join(map(repr, twice))} twice" if twice else
                    f"{', '.join(map(repr, shared))}, the prompt or answer column") + "; list other columns, once each")
        directory = _model_directory(model, base, defaults.dtype)
        prompt_template, chat_template = defaults.prompt_template, defaults.chat_template
        max_new_tokens = defaults.max_new_tokens
        sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        check_prompt_template(prompt_template)
        try:
            records = load_prompts(data, prompt_column=defaults.prompt_column, answer_column=defaults.answer_column,
                                   meta_columns=defaults.meta_columns,  # the run's reward: the columns its training read
                                   require_answer=require_answer,  # an audit reads training data: a DatasetDict's train
                                   split=None if command == "entrorl eval" else "train")[:max_prompts]
        except DataError as error:
            if meta_columns is None and defaults.meta_columns is not None and "meta column" in str(error):
                raise DataError(f"{error}; {defaults.meta_columns} are the run's data.meta_columns, which --meta-columns "
                                "overrides ('' for none)", path=error.path, location=error.location) from None
            raise
        reward_runner = RewardRunner(get_reward(defaults.reward, **defaults.reward_kwargs),  # the count: said at the end
                                     correct_threshold=defaults.correct_threshold, name=defaults.reward, warn=False)
        reward_runner.check_arguments([record.meta for record in records])
        if check_outputs is not None:
            check_outputs()

        def load(directory):
            tokenizer = load_tokenizer(directory.tokenizer, trust_remote_code=trust_remote_code)
            prompt_ids = encode_records(tokenizer, records, template=prompt_template, chat_template=chat_template)
            note = unknown_token_note(tokenizer, prompt_ids, records, what=str(data), template=prompt_template)
            if note is not None:
                warnings.warn(note, stacklevel=3)
            declared = read_model_config(directory.weights, trust_remote_code=trust_remote_code) if check_fit else None
            if declared is not None:
                check_prompts_fit(declared, prompt_ids, [r.source for r in records], max_new_tokens=max_new_tokens,
                                  pad_token_id=tokenizer.pad_token_id)
            policy = load_model_directory(directory, dtype=defaults.dtype, trust_remote_code=trust_remote_code,
                                          device=resolve_device(device))
            if check_fit and declared is None:
                check_prompts_fit(policy, prompt_ids, [r.source for r in records], max_new_tokens=max_new_tokens,
                                  pad_token_id=tokenizer.pad_token_id)
            elif not check_fit:  # prompts past the context are the audit's to report; ids past the embedding never run
                check_prompt_ids_in_vocabulary(policy, prompt_ids, [r.source for r in records],
                                               pad_token_id=tokenizer.pad_token_id)
            check_stop_tokens_can_be_sampled(policy, stop_token_ids(policy, tokenizer), warn=False)  # the sampler warns
            turn_end = unstopped_turn_end_note(policy, tokenizer) if chat_template else None
            if turn_end is not None:
                warnings.warn(f"--chat-template: {turn_end}", stacklevel=3)
            return tokenizer, prompt_ids, policy

        for attempt in range(_PRUNED_RETRIES + 1):
            try:
                tokenizer, prompt_ids, policy = load(directory)
                break
            except (OSError, ValueError) as error:  # a run that is training may prune the checkpoint chosen while it loads
                if all(path.exists() for path in (directory.weights, directory.tokenizer, directory.adapters)
                       if path is not None):
                    raise
                if attempt == _PRUNED_RETRIES:
                    raise FileNotFoundError(
                        f"{model}: the run pruned each of the {attempt + 1} checkpoints taken while they loaded (the "
                        f"last, {directory.adapters or directory.weights}): it is training with a small "
                        "checkpoint.keep; evaluate a copy of a checkpoint, or raise checkpoint.keep") from error
                newer = _model_directory(model, base, defaults.dtype)
                if newer == directory:
                    raise
                console.print(Text(f"{directory.adapters or directory.weights} was removed while it loaded (the run "
                                   f"pruned its checkpoints): taking {newer.adapters or newer.weights}"), soft_wrap=True)
                directory = newer
    return records, reward_runner, tokenizer, policy, prompt_ids, directory, defaults, sampling


def _model_directory(model: Path, base: Path | None, dtype: str):
    """What ``--model`` (and ``--base``) stand for (see :func:`entrorl.trainer.checkpoint.resolve_model_directory`),
    for weights of ``dtype``: a LoRA run's checkpoint is its adapters on the base model, as it trained, when ``--base``
    names the base or in bfloat16 / float16, where its merged ``model/`` (float32) would lose most of the update; in
    half precision without the base at hand, the merged ``model/``, said."""
    from entrorl.trainer.adapters import ADAPTER_DIRECTORY
    from entrorl.trainer.checkpoint import resolve_model_directory

    if base is not None:
        return resolve_model_directory(model, base=base, prefer_adapters=True)
    if dtype not in ("bfloat16", "float16"):
        return resolve_model_directory(model)
    try:
        if importlib.util.find_spec("peft") is None:
            raise ImportError("loading the adapters needs the peft package (pip install peft)")
        return resolve_model_directory(model, prefer_adapters=True)
    except (FileNotFoundError, ValueError, ImportError) as error:
        merged = resolve_model_directory(model)  # the error of a model that cannot be read at all
        beside = merged.weights.parent / ADAPTER_DIRECTORY
        if merged.adapters is None and merged.weights.name == "model" and beside.is_dir():  # a LoRA checkpoint's
            console.print(Text.assemble(("warning", "yellow"), f": {error}; loading the merged {merged.weights} in "
                                        f"{dtype} instead, which rounds away part of the update trained on the adapters "
                                        "(--dtype float32 keeps it, --base loads the adapters on the base)"), soft_wrap=True)
        return merged


def _share_of_prompts(share: float, prompts: int) -> str:
    """``0.250 (1 of 4)``: a share of the prompts with their count, and digits enough that 1 prompt in 2001 does not
    read 0.000 (nor 2000 of them 1.000)."""
    shown = f"{share:.3f}"
    if shown in ("0.000", "1.000") and share not in (0.0, 1.0):
        shown = f"{share:.6f}"
    return f"{shown} ({round(share * prompts)} of {prompts})"


# how many times eval and data audit take the next newest checkpoint of a run that pruned the one they were loading
_PRUNED_RETRIES = 3


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's "stop") or SIGXCPU (a soft CPU-time limit reached) arrived inside
    :func:`_stop_signals_as_interrupt`: a KeyboardInterrupt, so that it passes wherever Ctrl-C does (a reward's or an
    import's ``except Exception`` does not swallow it)."""

    def __init__(self, signal_number: int = signal.SIGTERM) -> None:
        super().__init__(signal_number)
        self.signal_number = signal_number


# the kernel sends SIGXCPU at a soft CPU-time limit (`ulimit -St`, a scheduler's cputime), then again every CPU second
# until the hard limit's SIGKILL (no such signal on Windows)
_CPU_TIME_LIMIT = getattr(signal, "SIGXCPU", None)


@contextlib.contextmanager
def _stop_signals_as_interrupt():
    """Inside, SIGTERM and a first SIGXCPU raise :class:`_Terminated`, as Ctrl-C raises KeyboardInterrupt: in the main
    thread, for each signal unless the process was started with it ignored. The handlers before are put back on the
    way out (a second SIGTERM while the first is being said then ends the process as it would have, without a
    traceback), except that once the CPU-time limit is reached SIGXCPU stays ignored: its repeats, which are no new
    request, would end the command while it says why it stopped, or during Python's shutdown."""
    limit_reached = False

    def terminated(signum, frame):
        nonlocal limit_reached
        if signum == _CPU_TIME_LIMIT:
            if limit_reached:
                return
            limit_reached = True
        raise _Terminated(signum)

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGTERM, _CPU_TIME_LIMIT):
            if number is not None and signal.getsignal(number) is not signal.SIG_IGN:
                previous[number] = signal.signal(number, terminated)
    try:
        yield
    finally:
        for number, handler in previous.items():
            if number == _CPU_TIME_LIMIT and limit_reached:
                handler = signal.SIG_IGN
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _said_when_interrupted(what: str | Callable[[], str]):
    """Ctrl-C, SIGTERM or SIGXCPU inside: one line saying so and what became of the work (``what``, or what it returns
    then; after the progress bar has let go of the terminal), then exit 128 + the signal's number (130, 143, 152), as
    the signal itself would, without a traceback."""
    try:
        with _stop_signals_as_interrupt():
            yield
    except _Terminated as stopped:
        said = what if isinstance(what, str) else what()
        by = ("(SIGXCPU: the process's CPU-time limit is reached)" if stopped.signal_number == _CPU_TIME_LIMIT
              else "(SIGTERM)")
        console.print(Text.assemble(("terminated", "bold yellow"), f" {by} {said}"), soft_wrap=True)
        raise typer.Exit(128 + stopped.signal_number) from None
    except KeyboardInterrupt:
        said = what if isinstance(what, str) else what()
        console.print(Text.assemble(("interrupted", "bold yellow"), f" {said}"), soft_wrap=True)
        raise typer.Exit(128 + signal.SIGINT) from None


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    """``path``'s device, inode and modification time, which a file put in its place changes; None when there is none."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino, status.st_mtime_ns


def _note_if_greedy_samples_repeat(n: int, temperature: float, top_k: int | None = None) -> None:
    """Say so when greedy decoding (``--temperature 0``, or ``--top-k 1``) meets ``--n`` above 1: each prompt's samples
    are then one answer repeated, and --n 1 gives the same figures in a fraction of the time."""
    greedy = "--temperature 0" if temperature == 0 else "--top-k 1" if top_k == 1 else None
    if greedy is not None and n > 1:
        console.print(Text(f"note: {greedy} samples greedily, so the {n} samples of a prompt are one answer "
                           f"repeated (every Pass@k is Pass@1, every pass rate 0 or 1): --n 1 gives the same figures"),
                      soft_wrap=True)


def _read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _stored_dtype(model: Path) -> str | None:
    """The weights' type a model directory's ``config.json`` declares (``dtype``, or ``torch_dtype`` before
    transformers 5), or None."""
    config = _read_json_object(model / "config.json") or {}
    declared = config.get("dtype", config.get("torch_dtype"))
    return declared if isinstance(declared, str) else None


class _SamplingDefaults(NamedTuple):
    prompt_template: str
    chat_template: bool
    max_new_tokens: int
    reward: str
    reward_kwargs: dict[str, Any]
    correct_threshold: float | None
    dtype: str
    prompt_column: str
    answer_column: str
    meta_columns: list[str] | None = None  # the run's data.meta_columns, with its reward: the columns it was given


def _reward_options(options: list[str], onto: dict[str, Any] | None = None) -> dict[str, Any]:
    """The reward's keyword arguments ``onto`` (a run's ``reward.kwargs``) with ``--reward-arg KEY=VALUE`` options set
    in them, one key each (a dotted key reaches into a nested mapping, keeping its other keys; values are YAML);
    ValueError naming the option on a malformed one."""
    from entrorl.trainer.config import ConfigError, parse_set_option

    options_by_name: dict[str, Any] = copy.deepcopy(onto or {})
    for option in options:
        path, value = parse_set_option(option, flag="--reward-arg")
        node = options_by_name
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--reward-arg {option!r}: '{part}' was given a value, so it cannot hold options")
        node[path[-1]] = value
    return options_by_name


def _run_defaults(model: Path, prompt_template: str | None, chat_template: bool | None, max_new_tokens: int | None,
                  reward: str | None = None, correct_threshold: float | None = None,
                  dtype: str | None = None, reward_args: list[str] | None = None, *, prompt_column: str | None = None,
                  answer_column: str | None = None, meta_columns: str | None = None) -> _SamplingDefaults:
    """The data's columns, prompt template, chat-template switch, most new tokens, reward and weights' type to sample
    and score with: those given, else, when ``model`` is a training run or one of its checkpoints, the run's own
    (``data.prompt_column``, ``data.answer_column``, ``data.prompt_template``, ``model.chat_template``,
    ``rollout.max_new_tokens``, ``model.dtype``, and
    ``reward.name`` with its ``reward.kwargs`` and, unless given, ``reward.correct_threshold``, after the run's
    ``imports``, in its config.json; said in one line), else ``prompt`` and ``answer``, ``"{prompt}"`` without the chat template,
    :data:`DEFAULT_MAX_NEW_TOKENS`, ``math`` and float32. ``reward_args`` (``--reward-arg`` options) set the reward's
    options: in the run's ``reward.kwargs`` when the run's reward is taken, else from none. ``meta_columns``
    (``--meta-columns``, comma-separated; ``''``: none) are the columns given to the reward: else the run's
    ``data.meta_columns`` with its reward, else every column but the prompt and the answer."""
    from entrorl.trainer.checkpoint import training_run_of
    from entrorl.trainer.config import ModelConfig

    reward_args = reward_args or []
    given = (prompt_column, answer_column, prompt_template, chat_template, max_new_tokens, reward, dtype)
    run = training_run_of(model) if None in given else None
    if run is None:
        return _SamplingDefaults("{prompt}" if prompt_template is None else prompt_template, bool(chat_template),
                                 DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens,
                                 "math" if reward is None else reward, _reward_options(reward_args), correct_threshold,
                                 "float32" if dtype is None else dtype, "prompt" if prompt_column is None else prompt_column,
                                 "answer" if answer_column is None else answer_column, _column_list(meta_columns))
    config = _read_json_object(run / "config.json") or {}

    def recorded(section: str, name: str, kind: type):
        part = config.get(section)
        value = part.get(name) if isinstance(part, dict) else None
        return value if isinstance(value, kind) else None

    taken, unread = [], []

    def setting(given, key: str, kind: type, default, shown=repr, valid=lambda value: True):
        """``given``, else the run's ``key`` (``section.name``) when it is a valid ``kind``, else ``default``."""
        if given is not None:
            return given
        value = recorded(*key.split("."), kind)
        if value is None or not valid(value):
            unread.append(key)
            return default
        taken.append(f"{key} = {shown(value)}")
        return value

    def column(given, name: str, default: str) -> str:
        """A column the run read its data from; said only when it is not the default."""
        value = recorded("data", name, str) if given is None else None
        if not value:
            return default if given is None else given
        if value != default:
            taken.append(f"data.{name} = {value!r}")
        return value

    prompt_column = column(prompt_column, "prompt_column", "prompt")
    answer_column = column(answer_column, "answer_column", "answer")
    prompt_template = setting(prompt_template, "data.prompt_template", str, "{prompt}")
    chat_template = setting(chat_template, "model.chat_template", bool, False, shown=lambda value: str(value).lower())
    max_new_tokens = setting(max_new_tokens, "rollout.max_new_tokens", int, DEFAULT_MAX_NEW_TOKENS, shown=str,
                             valid=lambda value: not isinstance(value, bool) and value >= 1)
    dtype = setting(dtype, "model.dtype", str, "float32", shown=str,
                    valid=lambda value: value in get_args(ModelConfig.model_fields["dtype"].annotation))
    reward_kwargs: dict[str, Any] = {}
    columns = _column_list(meta_columns)
    if reward is None:  # the run's reward, as its own evaluations scored with it
        reward = setting(None, "reward.name", str, "math")
        if recorded("reward", "name", str) is not None:
            run_columns = recorded("data", "meta_columns", list)  # which columns of the data the reward was given
            if meta_columns is None and run_columns is not None and all(isinstance(name, str) for name in run_columns):
                taken.append(f"data.meta_columns = {run_columns!r}")
                columns = run_columns
            reward_kwargs = recorded("reward", "kwargs", dict) or {}
            if reward_kwargs:
                taken.append(f"reward.kwargs = {reward_kwargs!r}")
            threshold = recorded("reward", "correct_threshold", (int, float))
            if correct_threshold is None and threshold is not None and not isinstance(threshold, bool):
                correct_threshold = float(threshold)
                taken.append(f"reward.correct_threshold = {threshold!r}")
            _import_the_run_s_modules(config.get("imports"), run)
    reward_kwargs = _reward_options(reward_args, onto=reward_kwargs)
    if taken:
        console.print(Text(f"settings of the run in {run} (its config.json): {', '.join(taken)}; --prompt-column, "
                           "--answer-column, --meta-columns, --prompt-template, --chat-template / --no-chat-template, "
                           "--max-new-tokens, --reward, --correct-threshold and --dtype override them, and --reward-arg one reward "
                           "option"), soft_wrap=True)
    if unread:
        console.print(Text.assemble(("warning", "yellow"), f": {run / 'config.json'} does not give "
                                    f"{' or '.join(unread)}; the default is used"), soft_wrap=True)
    return _SamplingDefaults(prompt_template, chat_template, max_new_tokens, reward, reward_kwargs, correct_threshold,
                             dtype, prompt_column, answer_column, columns)


def _column_list(names: str | None) -> list[str] | None:
    """``--meta-columns``' comma-separated names (``''``: none); ``None`` (every other column) when it is not given."""
    return None if names is None else [name.strip() for name in names.split(",") if name.strip()]


def _import_the_run_s_modules(names: Any, run: Path) -> None:
    """The run's ``imports`` (modules that register its reward, among others), imported as its training did: from
    the Python path, then the working directory; ``ValueError`` naming the run when one cannot be imported."""
    from entrorl.rewards.base import import_named_module

    for name in names if isinstance(names, list) else []:
        if isinstance(name, str) and name.strip():
            try:
                import_named_module(name.strip(), f"the imports of the run in {run}")
            except ValueError as error:
                raise ValueError(f"{error}; run from the directory the run was trained from, or pass --reward") \
                    from None


def _sampling_settings(model: Path, directory, reward_runner, defaults: _SamplingDefaults, sampling, *, n: int,
                       max_prompts: int | None, seed: int, batch_size: int, policy) -> dict[str, Any]:
    """What `eval` and `data audit` record of how they sampled and scored (their summaries' ``settings``, one set of
    keys for both; ``device``: the one ``policy`` ran on, not ``--device`` as typed)."""
    return {"model": str(model), **_model_settings(directory), "reward": reward_runner.name,
            "reward_kwargs": defaults.reward_kwargs, "n": n, "max_new_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
            "prompt_column": defaults.prompt_column, "answer_column": defaults.answer_column,
            "prompt_template": defaults.prompt_template, "chat_template": defaults.chat_template,
            "max_prompts": max_prompts, "correct_threshold": reward_runner.correct_threshold, "dtype": defaults.dtype,
            "seed": seed, "batch_size": batch_size, "device": str(next(policy.parameters()).device)}


def _model_settings(directory) -> dict[str, str]:
    """For a summary's settings: what ``--model`` resolved to, as absolute paths: the model directory loaded (a run
    directory's newest checkpoint, say), or the LoRA adapters and the base model they were put on."""
    if directory.adapters is None:
        return {"model_directory": str(directory.weights.resolve())}
    return {"adapters": str(directory.adapters.resolve()), "base": str(directory.weights.resolve())}


def _reward_log_path(out: Path | None) -> Path | None:
    """Where `entrorl eval --out FILE` keeps the first reward traceback: beside FILE; None without ``--out``, or when
    it is a device, a pipe or a descriptor (``/dev/stdout``), beside which nothing is written (a temporary file then)."""
    from entrorl._files import written_in_place

    if out is None or not out.name or written_in_place(out):  # no name: '.' or '/', which --out's check refuses
        return None
    return out.with_name(f"{out.stem}.reward_errors.log")


def _is_standard_output(path: Path) -> bool:
    """Whether ``path`` is what this process's standard output writes into (``/dev/stdout``, or the file or pipe it is
    redirected to)."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError, AttributeError):  # no descriptor (a captured stdout: io.UnsupportedOperation)
        return False


def _keep_reward_traceback(first_error: str | None, log: Path | None) -> Path | None:
    """Write the reward's first failure (a summary line, then its traceback) to ``log``, or to a new temporary file when
    ``log`` is None, as `train` keeps it in reward_errors.log; the file written (None without a failure, or when it
    cannot be written: the terminal's one-line summary is then all there is)."""
    from entrorl.trainer.checkpoint import atomic_write_text

    if first_error is None:
        return None
    try:
        if log is None:
            with tempfile.NamedTemporaryFile("w", encoding="utf-8", errors="backslashreplace",
                                             prefix="entrorl-reward-errors-", suffix=".log", delete=False) as handle:
                handle.write(first_error + "\n")
            return Path(handle.name)
        atomic_write_text(log, first_error + "\n", make_folder=True)
        return log
    except OSError:
        return None


def _print_reward_errors(errors: int, samples: int, first_error: str | None, log: Path | None) -> None:
    """One line: how many samples the reward failed on, the first failure, and where its traceback is."""
    from entrorl._checks import visible_controls
    from entrorl.rewards import error_headline

    if not errors:
        return
    where = f"; its traceback is in {log}" if log is not None else ""
    console.print(Text.assemble(
        ("reward errors", "yellow"),
        f": the reward failed on {errors} of {samples} samples, which scored 0; "
        f"first: {visible_controls(error_headline(first_error))}{where}",
    ), soft_wrap=True)


@contextlib.contextmanager
def _sampling_progress(total: int, *, elapsed: bool = False):
    """A bar of the sequences sampled, ``advance(done, total=None)`` moving it: live on a terminal; elsewhere (a log
    file, a batch job) a plain line at most every ``PROGRESS_LINE_EVERY_S`` seconds, as training prints, so that a long
    evaluation shows it advancing. ``elapsed`` shows the count and the time spent rather than rich's default columns."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from entrorl.trainer.progress import PROGRESS_LINE_EVERY_S

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) if elapsed else ()
    started = last_line = time.perf_counter()
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("sampling", total=total)

        def advance(done: int, new_total: int | None = None) -> None:
            nonlocal last_line, total
            total = new_total if new_total is not None else total
            progress.update(task, completed=done, total=total)
            now = time.perf_counter()
            if not (console.is_terminal or console.is_jupyter) and done < total and now - last_line >= PROGRESS_LINE_EVERY_S:
                last_line = now
                console.print(f"sampling: {done}/{total} sequences, {now - started:.0f} s", highlight=False)

        yield advance


def _write_evaluation(result, records, data: Path, out: Path | None, samples: Path | None,
                      reward_log_path: Path | None, *, settings: dict[str, Any]
                      ) -> tuple[str, Path | None, list[str]]:
    """Write ``entrorl eval``'s ``--samples`` and ``--out`` and the first reward error's traceback; returns the
    summary as JSON, the traceback's file, and why a file could not be written."""
    from entrorl.rewards import error_headline
    from entrorl.trainer.checkpoint import atomic_write_text

    summary = result.to_dict()
    # what was evaluated and how, and which prompt each pass rate belongs to (file:line), for a later look
    summary["settings"] = {"data": str(data), **settings}
    summary["sources"] = [record.source for record in records]
    reward_log = _keep_reward_traceback(result.first_reward_error, reward_log_path)
    if result.reward_errors:
        summary["first_reward_error"] = error_headline(result.first_reward_error)
        summary["reward_errors_log"] = None if reward_log is None else str(reward_log)
    elif reward_log_path is not None:  # the traceback of an earlier evaluation into this --out is not this one's
        with contextlib.suppress(OSError):
            reward_log_path.unlink(missing_ok=True)
    not_written = []  # checked before sampling, so rare (a full disk): the summary still reaches stdout, the exit is 1
    if samples is not None:
        try:
            atomic_write_text(samples, "".join(json.dumps(sample, ensure_ascii=False) + "\n" for sample in result.samples),
                              make_folder=True)
            summary["samples_file"] = str(samples)
        except OSError as error:
            not_written.append(f"cannot write {samples}: {error}")
    text = json.dumps(summary, indent=1)
    if out is not None:
        try:
            atomic_write_text(out, text + "\n", make_folder=True)
        except OSError as error:
            not_written.append(f"cannot write {out}: {error}" + (" (it still holds an earlier result)"
                                                                if out.is_file() else ""))
    return text, reward_log, not_written


@app.command("eval", help=(
    "Avg@n, unbiased Pass@k and the pass-rate histogram of a model on a prompt file."))
def evaluate(
    model: ModelDirOption,
    data: DataFileOption,
    n: SamplesOption = 16,
    base: BaseModelOption = None,
    k: Annotated[Optional[str], typer.Option(help="comma-separated k values for Pass@k, each at most --n "
                                                  "(default: powers of two up to n, and n)")] = None,
    reward: RewardOption = None,
    reward_arg: RewardArgOption = None,
    max_new_tokens: MaxNewTokensOption = None,
    temperature: TemperatureOption = 1.0,
    top_p: TopPOption = 1.0,
    top_k: TopKOption = 0,
    prompt_column: PromptColumnOption = None,
    answer_column: AnswerColumnOption = None,
    meta_columns: MetaColumnsOption = None,
    prompt_template: PromptTemplateOption = None,
    chat_template: ChatTemplateOption = None,
    max_prompts: Annotated[Optional[int], typer.Option(min=1, help="evaluate only the first N prompts")] = None,
    correct_threshold: CorrectThresholdOption = None,
    require_answer: RequireAnswerOption = True,
    seed: SeedOption = 0,
    out: Annotated[Optional[Path], typer.Option(parser=_path, metavar=PATH_METAVAR, help="write the JSON summary here")] = None,
    samples: Annotated[Optional[Path], typer.Option(parser=_path, metavar=PATH_METAVAR,
        help="write every sample here, one JSON line each: its prompt's source (file:line), prompt (and its messages, "
        "for a prompt given as chat messages), completion (with "
        "its token ids and their log-probability under the sampler, at temperature 1 for greedy sampling), "
        "reference answer, reward, correctness, length, truncation and the reward's reason")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="sequences per generation call (the samples drawn depend on "
                                                       "it, the distribution does not)")] = 64,
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    from entrorl.data.loading import check_output_file
    from entrorl.trainer.evaluate import NonFiniteLogProbs, evaluate_model

    ks = None if k is None else _parse_ks(k)
    if ks is not None and ks[-1] > n:
        _fail(f"--k {ks[-1]} exceeds --n {n}: Pass@k needs at least k samples per prompt")
    _note_if_greedy_samples_repeat(n, temperature, top_k)
    outputs = {option: path for option, path in (("--out", out), ("--samples", samples)) if path is not None}
    taken = {data.resolve(): "--data"}
    reward_log_path = _reward_log_path(out)
    if reward_log_path is not None:
        taken[reward_log_path.resolve()] = f"the reward errors' log of --out ({reward_log_path})"
    for option, path in outputs.items():
        if path.resolve() in taken:
            _fail(f"{option} {path} is {taken[path.resolve()]}; give each file its own path")
        taken[path.resolve()] = option

    def check_outputs() -> None:
        for option, path in outputs.items():
            check_output_file(path, what=option)

    try:
        records, reward_runner, tokenizer, policy, prompt_ids, directory, defaults, sampling = _sampling_inputs(
            model, data, reward, prompt_column=prompt_column, answer_column=answer_column, meta_columns=meta_columns,
            prompt_template=prompt_template, chat_template=chat_template, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, max_prompts=max_prompts, device=device, dtype=dtype,
            base=base, check_fit=True, trust_remote_code=trust_remote_code, require_answer=require_answer,
            correct_threshold=correct_threshold, check_outputs=check_outputs, reward_args=reward_arg,
            command="entrorl eval")
    except (ValueError, OSError, ImportError, MemoryError) as error:  # ImportError: adapters without peft
        _fail(str(error))
    max_new_tokens = sampling.max_new_tokens
    files = [path for path in (samples, out) if path is not None]
    before = {path: _file_identity(path) for path in files}  # a file put in place changes its identity

    def what_was_written() -> str:
        if result is None:
            return "while sampling: nothing was written"
        if not files:
            return "after sampling: no file was asked for (--out, --samples)"
        written = [str(path) for path in files if _file_identity(path) != before[path]]
        unwritten = [str(path) for path in files if str(path) not in written]
        if not unwritten:
            return f"after the results were written: {', '.join(written)}"
        earlier = " (it still holds an earlier result)" if out is not None and str(out) in unwritten and out.is_file() \
            else ""
        return (f"while writing the results: {', '.join(written) or 'nothing'} written, {', '.join(unwritten)} "
                f"not{earlier}")

    result = None
    try:
        with _said_when_interrupted(what_was_written):
            with _sampling_progress(len(records) * n) as advance:
                result = evaluate_model(policy, tokenizer, records, prompt_ids, reward_runner, n=n, ks=ks,
                                        sampling=sampling, seed=seed, batch_size=batch_size,
                                        keep_samples=samples is not None, progress=advance)
            text, reward_log, not_written = _write_evaluation(
                result, records, data, out, samples, reward_log_path,
                settings=_sampling_settings(model, directory, reward_runner, defaults, sampling, n=n,
                                            max_prompts=max_prompts, seed=seed, batch_size=batch_size, policy=policy))
    except NonFiniteLogProbs as error:
        _fail(f"{error}; nothing was written")
    # (the files are written before the table is printed: a reader of the output that has gone loses no result)
    # what was loaded, named by the absolute path's last parts (`--model model`, or a run directory: its checkpoint)
    named = (directory.adapters or directory.weights).resolve()
    # a checkpoint's step_N/model or step_N/adapter
    label = f"{named.parent.name}/{named.name}" if named.name in ("model", "adapter") else named.name
    table = Table(title=escape(f"{label} on {data.name}: {len(records)} prompts x {n} samples"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row(f"Avg@{n}", f"{result.summary.avg_at_n:.4f}")
    for key, value in result.summary.pass_at_k.items():
        table.add_row(f"Pass@{key}", f"{value:.4f}")
    polarisation = result.summary.polarisation
    for label, share in (("solved by no sample", polarisation.frac_zero), ("solved by every sample", polarisation.frac_one)):
        table.add_row(label, _share_of_prompts(share, polarisation.n_problems))
    table.add_row("pass-rate histogram", " ".join(str(c) for c in polarisation.histogram))
    if result.reward_errors:
        table.add_row("reward errors", str(result.reward_errors))
    console.print(table)
    _print_reward_errors(result.reward_errors, len(records) * n, result.first_reward_error, reward_log)
    for message in not_written:
        console.print(Text.assemble(("error:", "bold red"), f" {message}"), soft_wrap=True)
    if out is None or not _is_standard_output(out):  # --out /dev/stdout has written it there already
        sys.stdout.write(text + "\n")
    if result.reward_errors and result.reward_errors >= len(records) * n:
        _fail(f"the reward failed on all {len(records) * n} samples, so every score above is 0 whatever the answer; "
              "check that the reward suits this data (its columns, its answers)")
    if not_written:  # a script reading the file must not take an old one for this result
        raise typer.Exit(1)


@app.command(help=(
    "Check the entropy theory on a training run: law fit and ceiling forecast, predicted vs measured "
    "entropy change, covariance concentration, interventions, evaluations and fork tokens, as report.md / "
    "report.html / report.json."))
def report(
    run_dir: Annotated[Path, typer.Argument(parser=_path, help="a training run directory (entrorl train --run-dir, or TRL's output_dir "
                                                 "with the entrorl plugin), or verl's file-logger JSON lines")],
    out: Annotated[Optional[Path], typer.Option(parser=_path, metavar=PATH_METAVAR, help="where to write the report (default: RUN_DIR/report; for verl's "
                                                     "NAME.jsonl, NAME.report beside it)")] = None,
    fit_fraction: Annotated[float, typer.Option(help="share of the first steps the law's forecast is fitted on, "
                                                      "above 0 and at most 1 (the paper's 15%)")] = 0.15,
    figures: Annotated[bool, typer.Option(help="draw the PNG figures")] = True,
) -> None:
    from entrorl.analysis.run_report import NotARunDirectory, default_report_dir, write_run_report
    from entrorl.data.loading import check_output_directory

    if not 0.0 < fit_fraction <= 1.0:
        _fail(f"--fit-fraction must be above 0 and at most 1 (the share of the run's first steps the law's forecast is "
              f"fitted on); got {fit_fraction}")
    if out is not None:
        try:
            check_output_directory(out, what="--out")
        except ValueError as error:
            _fail(str(error))
    try:
        result = write_run_report(run_dir, out=out, fit_fraction=fit_fraction, figures=figures)
    except NotARunDirectory as error:
        _fail(str(error))
    except OSError as error:  # a run file that cannot be read, or a report that cannot be written: the message names it
        try:
            written = out if out is not None else default_report_dir(run_dir)
        except OSError:  # the run's folder itself cannot be read: the error above says so
            written = run_dir / "report"
        unwritable = out is None and str(getattr(error, "filename", "") or "").startswith(str(written))
        _fail(f"{error}" + ("; --out writes the report elsewhere" if unwritable else ""), code=1)
    target = Path(result["out"])
    summary = {row["quantity"]: row["value"] for row in (result.get("summary") or {}).get("rows", [])}
    shown = ("method", "steps logged", "log entries", "entropy end/start", "law R² (every step)", "forecast ceiling (law at zero entropy)",
             "predicted vs measured entropy change: sign agreement")
    for quantity in shown:
        if quantity in summary:
            console.print(f"{escape(quantity)}: {escape(str(summary[quantity]))}", soft_wrap=True, highlight=False)
    for section, error in (result.get("section_errors") or {}).items():
        console.print(f"[yellow]section {escape(section)} could not be generated[/yellow]: {escape(error)}", soft_wrap=True)
    console.print(f"[green]report[/green]: {escape(str(target / 'report.html'))}  ({escape(str(target / 'report.md'))})",
                  soft_wrap=True)


# what `entrorl methods` says of the laboratory's one method that is no training objective
SFT_BASELINE = "fine-tuning on a reference demonstration of each sampled prompt; its update reads no reward"
# below this many columns the methods table's narrow columns would fold their text a few characters a line
_METHODS_TABLE_WIDTH = 120


@app.command(help=(
    "List every method with its parameters, defaults and paper; with METHOD, every parameter of that one."))
def methods(
    method: Annotated[Optional[str], typer.Argument(help="one method, or a composition such as dapo+clip_b: every "
                                                        "parameter of its parts, with its default and meaning")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print as JSON")] = False,
    imports: Annotated[Optional[list[str]], typer.Option(
        "--import", help="a module to import first (repeatable), which registers methods or parts of your own")] = None,
) -> None:
    from entrorl.objective import available_methods
    from entrorl.rewards.base import import_named_modules

    try:
        import_named_modules(imports or [], "--import")
    except ValueError as error:
        _fail(str(error))
    if method is not None and method.strip() == "sft":  # the laboratory's, not a training objective
        _fail(f"sft is not a training method but the laboratory's supervised baseline: {SFT_BASELINE}; run it with "
              "entrorl lab --methods sft,grpo")
    if method is not None:
        _describe_method(method, as_json=as_json)
        return
    infos = available_methods()
    if as_json:
        sys.stdout.write(json.dumps([info.__dict__ for info in infos], indent=1, default=str) + "\n")
        return
    columns = ("method", "description", "parameters", "loss aggregation", "advantages", "paper")
    rows = [(info.name, info.description,
             ", ".join(f"{key}={value}" for key, value in info.params.items() if value is not None),
             info.loss_agg_mode, info.advantage_estimator, info.paper) for info in infos]
    # off a terminal rich assumes 80 columns, where the descriptions would take a line per word
    out = Console(width=160 if _piped_without_a_width() else None)
    if out.width >= _METHODS_TABLE_WIDTH:
        table = Table(title="entrorl methods")
        for column in columns:
            table.add_column(column, overflow="fold", no_wrap=column in ("method", "loss aggregation", "advantages"))
        for row in rows:
            table.add_row(*map(Text, row))  # as written: "[min_coeff, max_coeff]" is no markup
        out.print(table)
    else:  # the table's columns would be a few characters wide: a block per method instead
        for name, description, *details in rows:
            out.print(Text.assemble((name, "bold"), f": {description}"), soft_wrap=True)
            for label, value in zip(columns[2:], details):
                if value:
                    out.print(Text(f"  {label}: {value}"), soft_wrap=True)
    out.print(Text(f"entrorl lab also runs sft, its supervised baseline ({SFT_BASELINE}): entrorl lab --methods "
                   "sft,grpo"), soft_wrap=True)


def _describe_method(method: str, *, as_json: bool) -> None:
    """``entrorl methods METHOD``: what each method of the composition does, its aggregation and advantage estimator
    (with the estimator's parameters, set under ``advantage.params``), and every parameter of its parts (those left at
    None included) with its value and its field's description."""
    from entrorl.advantages import advantage_info
    from entrorl.objective import ObjectiveConfig, SurrogateSetAsideWarning, build_objective, get_method

    try:
        with warnings.catch_warnings(record=True) as raised:  # a set-aside surrogate is said beside the method
            warnings.simplefilter("always", SurrogateSetAsideWarning)
            objective = build_objective(method)
        set_aside = [caught for caught in raised if issubclass(caught.category, SurrogateSetAsideWarning)]
        for caught in raised:  # any other warning is the user's to see
            if caught not in set_aside:
                warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)
        specs = [get_method(name) for name in ObjectiveConfig(method=method).method_names()]
    except ValueError as error:
        _fail(str(error))
    parts = [{"kind": part.kind, "name": part.name,
              "params": [{"name": key, "value": value, "description": type(part).model_fields[key].description or ""}
                         for key, value in part.params().items()]} for part in objective.parts]
    try:
        estimator = advantage_info(specs[0].advantage_estimator)
    except ValueError as error:  # a method registered with an estimator that is not
        _fail(f"method {specs[0].name!r}: {error}")
    # a later method whose own surrogate the first method's replaces: what it trains with in this composition
    in_composition = {spec.name: next((str(caught.message) for caught in set_aside
                                       if getattr(caught.message, "method", None) == spec.name), "") for spec in specs}
    described = {"name": objective.name,
                 "methods": [{"name": spec.name, "description": spec.description, "paper": spec.paper,
                              "notes": spec.notes, "in_composition": in_composition[spec.name]} for spec in specs],
                 "loss_agg_mode": objective.loss_agg_mode, "advantage_estimator": estimator.name,
                 "advantage": {"description": estimator.description, "paper": estimator.paper,
                               "params": estimator.params},
                 "parts": parts}
    if as_json:
        sys.stdout.write(json.dumps(described, indent=1, default=str) + "\n")
        return
    out = Console(width=160 if _piped_without_a_width() else None)
    for spec in specs:
        out.print(Text.assemble((spec.name, "bold"), f": {spec.description} ({spec.paper})"), soft_wrap=True)
        if spec.notes:
            out.print(Text(f"  {spec.notes}"), soft_wrap=True)
        if in_composition[spec.name]:
            out.print(Text(f"  here: {in_composition[spec.name]}"), soft_wrap=True)
    out.print(Text(f"loss aggregation {objective.loss_agg_mode}; advantages {estimator.name} (advantage.name): "
                   f"{estimator.description} ({estimator.paper})"), soft_wrap=True)
    if estimator.params:
        settings = ", ".join(f"{key}: {json.dumps(value)}" for key, value in estimator.params.items())
        out.print(Text(f"  its parameters, set under advantage.params (defaults): {settings}"), soft_wrap=True)
    table = Table(title=f"parameters of {objective.name}")
    for column in ("part", "parameter", "default", "meaning"):
        table.add_column(column, overflow="fold", no_wrap=column != "meaning")
    for part in parts:
        for param in part["params"]:
            table.add_row(*map(Text, (f"{part['kind']} {part['name']}", param["name"], str(param["value"]),
                                      param["description"])))
    out.print(table)
    example = next((param for part in parts for param in part["params"] if param["value"] is not None), None)
    if example is not None:
        setting = f"{example['name']}: {example['value']}"
        out.print(Text(f"set one in a configuration as method: {{method: {objective.name}, params: {{{setting}}}}}, "
                       f"or in Python as build_objective({objective.name!r}, {example['name']}={example['value']!r})"),
                  soft_wrap=True)


@app.command(help=(
    "The entropy laboratory: train the built-in tiny model with every method side by side, then write a "
    "report."))
def lab(
    preset: Annotated[str, typer.Option(help="default (8 to 15 minutes on two cores once the base model is built) or "
                                              "quick (the same matrix at toy scale, a few minutes)")] = "default",
    methods: Annotated[Optional[list[str]], typer.Option("--methods", help="methods to run, comma-separated or repeated, compositions included (dapo+clip_b); default: the preset's matrix")] = None,
    out: Annotated[Optional[Path], typer.Option(parser=_path, metavar=PATH_METAVAR, help="run directory; an existing one is resumed")] = None,
    workers: Annotated[Optional[int], typer.Option(help="parallel processes (default: the preset's, 2)")] = None,
    rl_seed: Annotated[Optional[int], typer.Option(help="seed of the training runs only (same base model, data and "
                                                   "evaluation): repeat with 1, 2, ... to see the spread across seeds")] = None,
    imports: Annotated[Optional[list[str]], typer.Option(
        "--import", help="a module to import first (repeatable), which registers methods of your own "
                         "(entrorl.objective.register_method) for --methods to name")] = None,
) -> None:
    from entrorl.analysis.run_report import lab_command, lab_imports
    from entrorl.lab.runner import (LabInterrupted, default_run_directory, failed_methods, interrupted_methods,
                                    run_lab)

    names = [name.strip() for item in (methods or []) for name in item.split(",") if name.strip()]
    if methods is not None and not names:  # `--methods ""` would otherwise run the whole matrix
        _fail("--methods names no method; leave it out to run the preset's matrix")
    if out is None:
        out = default_run_directory()

    def command_for(methods: list[str]) -> str:
        # the modules the folder's methods of one's own need: earlier invocations' (lab.json) and this one's
        needed = [*lab_imports(_read_json_object(out / "lab.json") or {}), *(name.strip() for name in imports or [])]
        return lab_command(preset, methods, out, workers=workers, rl_seed=rl_seed, imports=list(dict.fromkeys(needed)))

    again = command_for(names)
    try:
        with _stop_signals_as_interrupt():  # while the base model is built and the report written (the methods' runs count it)
            run_dir = run_lab(preset, methods=names or None, out=out, workers=workers, console=console,
                              rl_seed=rl_seed, imports=imports)
    except ValueError as error:
        _fail(str(error))
    except OSError as error:  # a full disk: the report or the laboratory's own record could not be written
        _fail(f"{error}; finished methods and each method's last checkpoint are kept in {out}: once the cause is "
              f"fixed, continue with {again}", code=1)
    except (LabInterrupted, KeyboardInterrupt) as error:
        number = getattr(error, "signal_number", signal.SIGINT)
        by = {signal.SIGINT: "", _CPU_TIME_LIMIT: " by SIGXCPU (the CPU-time limit is reached)"}.get(
            number, f" by {signal.Signals(number).name}")
        unfinished = ""
        if isinstance(error, LabInterrupted):
            unfinished = (f" ({', '.join(error.methods)} not finished)" if error.methods
                          else " after every method had finished, before the report was written")
        elif (left := interrupted_methods(out)):  # stopped at once: the folder's record of what is left
            unfinished = f" ({', '.join(left)} not finished)"
        console.print(Text.assemble(("interrupted", "bold yellow"), f"{by}{unfinished}: finished methods and each "
                                    f"method's last checkpoint are kept in {out}. Continue with: {again}"), soft_wrap=True)
        raise typer.Exit(128 + number) from None
    console.print(Text.assemble(("report", "green"), f": {run_dir / 'report.html'}  ({run_dir / 'report.md'})"),
                  soft_wrap=True)  # paths on one line, whatever the width
    # the report is written, but a script running the laboratory must see that it is not whole
    failed, unfinished = failed_methods(run_dir), interrupted_methods(run_dir)
    said = []
    if failed:
        said.append(f"{len(failed)} method(s) failed and are left out of the report's comparisons: {', '.join(failed)} "
                    f"(each one's error in {run_dir / 'methods'}/<name>/error.log)")
    if unfinished:  # interrupted by an earlier invocation, and not among the methods this one ran
        said.append(f"{len(unfinished)} method(s) of {run_dir} were interrupted earlier and are left out of the report's "
                    f"comparisons: {', '.join(unfinished)}; continue them with {command_for(unfinished)}")
    if said:
        _fail("; ".join(said), code=1)


data_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Inspect and clean prompt data sets.")
app.add_typer(data_app, name="data")


@data_app.command("reasoning-gym", help=(
    "Generate a reasoning-gym task as a prompt file for `train` and `eval` with the `reasoning_gym` "
    "reward.\n\nEach line holds the prompt, the reference answer (null for tasks whose verifier needs "
    "none: train with data.require_answer false) and the task's entry, name and config, which the "
    "reward's verifier reads."))
def data_reasoning_gym(
    task: Annotated[str, typer.Argument(help="reasoning-gym data set, e.g. basic_arithmetic (--list shows them all)")] = "",
    out: Annotated[Optional[Path], typer.Option(parser=_path, metavar=PATH_METAVAR, help="JSONL file to write (default: <task>.jsonl)")] = None,
    size: Annotated[int, typer.Option(min=1, help="prompts to generate")] = 1000,
    seed: Annotated[int, typer.Option(help="generation seed (the same seed gives the same prompts, on every run: tasks "
                                              "whose generator follows Python's string hashing are generated with "
                                              "PYTHONHASHSEED=0)")] = 0,
    instruction: Annotated[bool, typer.Option(help="append the instruction to answer inside <answer></answer> tags, "
                                              "which the reasoning_gym reward reads")] = True,
    list_tasks: Annotated[bool, typer.Option("--list", help="print the installed tasks and exit")] = False,
) -> None:
    from entrorl._checks import did_you_mean
    from entrorl.data import PromptRecord, write_jsonl
    from entrorl.data.loading import check_output_file
    from entrorl.rewards import REASONING_GYM_INSTRUCTION, reasoning_gym_records
    from entrorl.rewards.reasoning_gym import available_reasoning_gym_tasks, verifier_accepts_nonsense

    if list_tasks:
        sys.stdout.write("\n".join(available_reasoning_gym_tasks()) + "\n")
        return
    if not task:
        _fail("name a task (e.g. `entrorl data reasoning-gym basic_arithmetic`); --list shows them all")
    target = out if out is not None else Path(f"{task}.jsonl")
    try:
        check_output_file(target, what="--out" if out is not None else "the output file")
    except ValueError as error:
        _fail(str(error))
    if target.suffix.lower() != ".jsonl":
        _fail(f"--out {target}: the prompts are written as JSON lines, so the file must end in .jsonl (a .csv or "
              ".parquet name would hold JSON lines that no reader takes for that format)")
    if task not in available_reasoning_gym_tasks():
        _fail(f"unknown reasoning-gym task {task!r}; {did_you_mean(task, available_reasoning_gym_tasks())}"
              "`entrorl data reasoning-gym --list` shows the installed ones")
    try:
        generated = reasoning_gym_records(task, size=size, seed=seed, same_in_every_process=True,
                                          instruction=REASONING_GYM_INSTRUCTION if instruction else None)
    except Exception as error:  # noqa: BLE001 - whatever reasoning-gym raises (composite: an AssertionError) ends here
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        _fail(f"reasoning-gym cannot generate the task {task!r} with its default configuration ({reason}); this "
              "command sets no task options: generate such a task from Python with "
              "entrorl.rewards.reasoning_gym_records(task, size=..., seed=..., **config) and write it with "
              "entrorl.data.write_jsonl")
    try:
        records = [PromptRecord(prompt=r["prompt"], answer=r["answer"], meta=json.loads(json.dumps(r["meta"], default=list)),
                                source=f"{task}[{i}]") for i, r in enumerate(generated)]
        write_jsonl(records, target)
    except (ValueError, TypeError, OSError) as error:
        _fail(str(error))
    missing = sum(record.answer is None for record in records)
    note = f"; {missing} without a reference answer (use data.require_answer: false)" if missing else ""
    console.print(Text(f"wrote {len(records)} prompts of {task} to {target}{note}"), soft_wrap=True)
    if verifier_accepts_nonsense(task, generated):
        console.print(Text(f"warning: reasoning-gym's verifier of {task} gives full marks to a nonsense answer, so its "
                           "reward cannot tell right from wrong answers; train on another task", style="yellow"),
                      soft_wrap=True)


@data_app.command("audit", help=(
    "Sample a model on every prompt and separate hard prompts from ones whose reference looks "
    "wrong.\n\nWrites into --out: the pass-rate histogram (JSON and PNG), the suspected-wrong prompts, "
    "every prompt's audit, the rows in --band in the input's format, and summary.json. The input is only "
    "read."))
def data_audit(
    model: ModelDirOption,
    data: DataFileOption,
    n: SamplesOption = 16,
    base: BaseModelOption = None,
    reward: RewardOption = None,
    reward_arg: RewardArgOption = None,
    band: Annotated[str, typer.Option(help="keep rows whose pass rate lies in this band, e.g. '[0.1,0.5]' or '(1/16,15/16)'")] = "(0, 1)",
    consensus: Annotated[float, typer.Option(help="majority share from which a wrong majority answer makes a prompt look wrong")] = 0.5,
    low_pass_rate: Annotated[float, typer.Option(help="pass rates at or below this are rarely solved (hard or wrong)")] = 0.25,
    keep_wrong: Annotated[bool, typer.Option("--keep-wrong", help="keep suspected-wrong rows in the filtered file")] = False,
    out: Annotated[Optional[Path], typer.Option(parser=_path, metavar=PATH_METAVAR, help="output directory (default: <stem>.audit next to the data, small.audit/ for small.jsonl)")] = None,
    max_new_tokens: MaxNewTokensOption = None,
    temperature: TemperatureOption = 1.0,
    top_p: TopPOption = 1.0,
    top_k: TopKOption = 0,
    prompt_column: PromptColumnOption = None,
    answer_column: AnswerColumnOption = None,
    meta_columns: MetaColumnsOption = None,
    prompt_template: PromptTemplateOption = None,
    chat_template: ChatTemplateOption = None,
    max_prompts: Annotated[Optional[int], typer.Option(min=1, help="audit only the first N prompts (the filtered file and the summary cover only those)")] = None,
    correct_threshold: CorrectThresholdOption = None,
    require_answer: RequireAnswerOption = True,
    batch_size: Annotated[int, typer.Option(min=1, help="sequences per generation call")] = 64,
    seed: SeedOption = 0,
    device: DeviceOption = "auto",
    dtype: DtypeOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    from entrorl._checks import visible_controls
    from entrorl.data import parse_band
    from entrorl.data.audit import AuditThresholds
    from entrorl.trainer.audit import (REWARD_ERRORS_LOG, audit_records, check_audit_output, default_audit_dir,
                                       write_audit_outputs)
    from entrorl.trainer.evaluate import NonFiniteLogProbs

    directory = out if out is not None else default_audit_dir(data)
    _note_if_greedy_samples_repeat(n, temperature, top_k)
    try:  # the options, named as the user typed them (not as the functions that read them)
        parse_band(band)
    except ValueError as error:
        _fail(f"--band {band!r}: {str(error).removeprefix('parse_band: ')}")
    try:
        thresholds = AuditThresholds(consensus=consensus, low_pass_rate=low_pass_rate)
    except ValueError as error:
        message = str(error).removeprefix("AuditThresholds: ")
        _fail(f"--{message.replace('low_pass_rate', 'low-pass-rate')}")
    try:
        records, reward_runner, tokenizer, policy, prompt_ids, model_directory, defaults, sampling = _sampling_inputs(
            model, data, reward, prompt_column=prompt_column, answer_column=answer_column, meta_columns=meta_columns,
            prompt_template=prompt_template, chat_template=chat_template, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, max_prompts=max_prompts, device=device, dtype=dtype,
            base=base, trust_remote_code=trust_remote_code,  # prompts that do not fit: reported one by one
            require_answer=require_answer, correct_threshold=correct_threshold,
            check_outputs=lambda: check_audit_output(data, directory), reward_args=reward_arg,
            command="entrorl data audit")
    except (ValueError, OSError, ImportError, MemoryError) as error:  # OSError: missing files, unreadable model directories
        _fail(str(error))
    max_new_tokens = sampling.max_new_tokens

    try:
        with _said_when_interrupted(f"while sampling: nothing was written into {directory}"), \
                _sampling_progress(len(records) * n, elapsed=True) as advance:
            result = audit_records(policy, tokenizer, records, prompt_ids, reward_runner, n=n, sampling=sampling,
                                   thresholds=thresholds, seed=seed, batch_size=batch_size, progress=advance)
    except NonFiniteLogProbs as error:
        _fail(f"{error}; nothing was written into {directory}")
    for item in result.too_long[:20]:
        console.print(Text.assemble(("skipped", "yellow"), " ", item.message(max_new_tokens)), soft_wrap=True)
    if len(result.too_long) > 20:
        console.print(f"[yellow]skipped[/yellow] ... and {len(result.too_long) - 20} more prompts too long for the context")
    settings = {**_sampling_settings(model, model_directory, reward_runner, defaults, sampling, n=n,
                                     max_prompts=max_prompts, seed=seed, batch_size=batch_size, policy=policy)}
    earlier = directory / "summary.json"
    # a reward that failed on every sample labels nothing and writes no set: its traceback alone is kept, to read why
    # (in a temporary file when --out holds an earlier audit's set, which stays as it was)
    reward_log = (_keep_reward_traceback(result.first_reward_error,
                                         None if earlier.is_file() else directory / REWARD_ERRORS_LOG)
                  if result.reward_failed_everywhere else None)
    summary_before = _file_identity(earlier)

    def what_the_folder_holds() -> str:  # the summary goes in last: a new one means the whole set is in
        if _file_identity(earlier) in (summary_before, None):
            return f"while writing the audit's files: {directory} holds what it held before"
        return (f"after the audit's files went in: {directory} holds this audit's set (what it replaced may be left "
                "under hidden .NAME.old-... names)")

    try:
        with _said_when_interrupted(what_the_folder_holds):
            outputs = write_audit_outputs(result, data, directory, band=band, keep_wrong=keep_wrong,
                                          thresholds=thresholds, settings=settings)
    except (ValueError, OSError) as error:
        where = f"; its traceback is in {reward_log}" if reward_log else ""
        if reward_log is None and result.first_reward_error is not None:  # the set it belonged to was not written
            kept_log = _keep_reward_traceback(result.first_reward_error, None)
            where = (f"; the reward failed on {result.reward_errors} samples, the first failure's traceback is in "
                     f"{kept_log}" if kept_log else "")
        kept = (f" ({directory} still holds the files of an earlier audit, summary.json from "
                f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(earlier.stat().st_mtime))})" if earlier.is_file() else "")
        _fail(f"{error}{where}{kept}")
    reward_log = outputs.reward_errors_log

    histogram = result.histogram()
    table = Table(title=f"pass rates of {histogram.n_prompts} prompts x {n} samples")
    for column in ("pass rate", "prompts", "ok", "hard", "looks wrong", ""):
        table.add_column(column, justify="left" if not column else "right")
    widest = max(histogram.counts)
    for correct, count in enumerate(histogram.counts):
        row = [histogram.by_verdict[verdict][correct] for verdict in ("ok", "hard", "looks_wrong")]
        table.add_row(f"{correct}/{n}", str(count), *map(str, row), _histogram_bar(count, widest))
    console.print(table)

    wrong = [(record, audit) for record, audit in zip(result.records, result.audits)
             if audit is not None and audit.verdict == "looks_wrong"]
    if wrong:
        suspects = Table(title=f"{len(wrong)} prompts whose reference looks wrong")
        for column in ("where", "reference", "majority answer", "share", "pass rate"):
            suspects.add_column(column, overflow="fold")
        for record, audit in wrong[:20]:
            shown = (record.source, record.answer, audit.majority_answer)
            suspects.add_row(*(Text(visible_controls(str(text))) for text in shown),
                             f"{audit.majority_share:.2f}", f"{audit.n_correct}/{audit.n_samples}")
        console.print(suspects)
    summary = outputs.summary
    counts, kept = summary["counts"], summary["band"]
    console.print(Text(
        f"ok {counts['ok']}, hard {counts['hard']}, looks wrong {counts['looks_wrong']}, too long {counts['too_long']}; "
        f"band {band}: kept {kept['kept']} of {summary['prompts']} rows -> {outputs.filtered}"
    ), soft_wrap=True)
    _print_reward_errors(result.reward_errors, result.n_sampled, result.first_reward_error, reward_log)
    console.print(Text.assemble(("audit", "green"), f": {outputs.directory}"), soft_wrap=True)
    sys.stdout.write(json.dumps(summary, indent=1) + "\n")


def _histogram_bar(count: int, widest: int, width: int = 24) -> str:
    """``count`` as a bar of ``#`` scaled so that ``widest`` fills ``width``; any count above zero shows at least one
    ``#`` (a bin of 1 prompt next to one of 500 is not an empty bin)."""
    if count <= 0:
        return ""
    return "#" * max(1, round(width * count / widest))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """entrorl's own warnings as one ``warning:`` line (pydantic's validator or a library's frame, where the warning
    surfaces, says nothing to the user); other libraries' warnings as Python prints them."""
    from entrorl.objective import SurrogateSetAsideWarning
    from entrorl.trainer import ConfigWarning

    ours = category is UserWarning and Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent)
    if issubclass(category, (ConfigWarning, SurrogateSetAsideWarning)) or ours:  # a library's deprecation raised through an entrorl line is not
        console.print(Text.assemble(("warning:", "bold yellow"), f" {message}"), soft_wrap=True)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


def _piped_without_a_width() -> bool:
    """Whether stdout is no terminal (a pipe, a file, or closed: ``>&-``) and COLUMNS gives no width: rich then
    assumes 80 columns."""
    try:
        terminal = sys.stdout is not None and sys.stdout.isatty()
    except ValueError:  # a closed file
        terminal = False
    return not terminal and not os.environ.get("COLUMNS")


def main() -> None:
    for name in ("stdout", "stderr"):  # closed (`>&-`, a daemon): what would be printed goes nowhere, not a traceback
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115 - for the process's lifetime
    # off a terminal (a pipe, a log, a CI job) rich assumes 80 columns, where the help's option names are cut short;
    # typer reads its help width from rich_utils.MAX_WIDTH (the TERMINAL_WIDTH variable), which then stays the user's
    from typer import rich_utils

    if getattr(rich_utils, "MAX_WIDTH", 0) is None and _piped_without_a_width():
        rich_utils.MAX_WIDTH = 140
    warnings.showwarning = _show_warning
    try:
        app()
    finally:
        # the command has ended; were a soft CPU-time limit reached, its SIGXCPU would come again every CPU second, and
        # a repeat during Python's shutdown (every handler back to the default) would end the process by the signal
        if _CPU_TIME_LIMIT is not None:
            signal.signal(_CPU_TIME_LIMIT, signal.SIG_IGN)


if __name__ == "__main__":
    main()
