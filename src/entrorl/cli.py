"""The ``entrorl`` command: ``train``, ``eval`` and ``methods``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Entropy-aware reinforcement fine-tuning of language models.")
console = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/bold red] {message}")
    raise typer.Exit(code)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML training configuration")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a key, e.g. --set optim.lr=1e-5 (repeatable)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the latest checkpoint of the run directory")] = False,
    run_dir: Annotated[Optional[Path], typer.Option(help="run directory (default: logging.run_dir/logging.name)")] = None,
) -> None:
    """Train a local Hugging Face model with an entrorl method; writes metrics.jsonl and checkpoints."""
    from entrorl.trainer import ConfigError, Trainer, TrainingStopped, load_config

    try:
        train_config = load_config(config, set_ or [])
    except ConfigError as error:
        _fail(str(error))
    if resume and run_dir is None and train_config.logging.name is None:
        _fail("--resume needs the run directory: pass --run-dir or set logging.name")
    try:
        trainer = Trainer(train_config, run_dir=run_dir, resume=resume, console=console)
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    console.print(f"run directory: {trainer.run_dir}")
    try:
        trainer.train()
    except TrainingStopped as error:
        _fail(str(error), code=3)
    console.print(f"[green]done[/green]: {trainer.run_dir}")


def _parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        _fail(f"--k expects comma-separated integers, got {text!r}")
    if not ks or ks[0] < 1:
        _fail(f"--k values must be >= 1, got {text!r}")
    return ks


@app.command("eval")
def evaluate(
    model: Annotated[Path, typer.Option(help="local Hugging Face model directory")],
    data: Annotated[Path, typer.Option(help="prompt file (.jsonl, .json, .csv, .parquet, datasets directory)")],
    n: Annotated[int, typer.Option(help="samples per prompt")] = 16,
    k: Annotated[str, typer.Option(help="comma-separated k values for Pass@k")] = "1,4,16",
    reward: Annotated[str, typer.Option(help="reward name or package.module:function")] = "math",
    max_new_tokens: Annotated[int, typer.Option()] = 256,
    temperature: Annotated[float, typer.Option()] = 1.0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    prompt_column: Annotated[str, typer.Option()] = "prompt",
    answer_column: Annotated[str, typer.Option()] = "answer",
    prompt_template: Annotated[str, typer.Option(help="format string with {prompt}")] = "{prompt}",
    max_prompts: Annotated[Optional[int], typer.Option(help="evaluate only the first N prompts")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    out: Annotated[Optional[Path], typer.Option(help="write the JSON summary here")] = None,
) -> None:
    """Avg@n, unbiased Pass@k and the pass-rate histogram of a model on a prompt file."""
    from rich.progress import Progress

    from entrorl.data import load_prompts
    from entrorl.modeling import load_causal_lm, load_tokenizer
    from entrorl.rewards import RewardRunner, get_reward
    from entrorl.rollout import SamplingParams
    from entrorl.trainer.evaluate import evaluate_model

    ks = _parse_ks(k)
    if ks[-1] > n:
        _fail(f"--k {ks[-1]} exceeds --n {n}: Pass@k needs at least k samples per prompt")
    try:
        records = load_prompts(data, prompt_column=prompt_column, answer_column=answer_column)[:max_prompts]
        reward_runner = RewardRunner(get_reward(reward))
        tokenizer = load_tokenizer(model)
        policy = load_causal_lm(model).eval()
        sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    prompt_ids = [tokenizer(prompt_template.format(prompt=r.prompt))["input_ids"] for r in records]
    with Progress(console=console) as progress:
        task = progress.add_task("sampling", total=len(records) * n)
        result = evaluate_model(policy, tokenizer, records, prompt_ids, reward_runner, n=n, ks=ks, sampling=sampling,
                                seed=seed, progress=lambda done: progress.update(task, completed=done))
    summary = result.summary.to_dict()
    table = Table(title=f"{model.name} on {data.name}: {len(records)} prompts x {n} samples")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row(f"Avg@{n}", f"{result.summary.avg_at_n:.4f}")
    for key, value in result.summary.pass_at_k.items():
        table.add_row(f"Pass@{key}", f"{value:.4f}")
    polarisation = result.summary.polarisation
    table.add_row("solved by no sample", f"{polarisation.frac_zero:.3f}")
    table.add_row("solved by every sample", f"{polarisation.frac_one:.3f}")
    table.add_row("pass-rate histogram", " ".join(str(c) for c in polarisation.histogram))
    if result.reward_errors:
        table.add_row("reward errors", str(result.reward_errors))
    console.print(table)
    text = json.dumps(summary, indent=1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    sys.stdout.write(text + "\n")


@app.command()
def methods(
    as_json: Annotated[bool, typer.Option("--json", help="print as JSON")] = False,
) -> None:
    """List every method with its parameters, defaults and paper."""
    from entrorl.objective import available_methods

    infos = available_methods()
    if as_json:
        sys.stdout.write(json.dumps([info.__dict__ for info in infos], indent=1, default=str) + "\n")
        return
    table = Table(title="entrorl methods")
    for column in ("method", "description", "parameters", "advantages", "paper"):
        table.add_column(column, overflow="fold")
    for info in infos:
        params = ", ".join(f"{key}={value}" for key, value in info.params.items() if value is not None)
        table.add_row(info.name, info.description, params, info.advantage_estimator, info.paper)
    Console().print(table)


@app.command()
def lab(
    preset: Annotated[str, typer.Option(help="default (about 20 minutes on two cores) or quick (a few minutes)")] = "default",
    methods: Annotated[Optional[list[str]], typer.Option("--methods", help="methods to run (repeatable); default: the preset's matrix")] = None,
    out: Annotated[Optional[Path], typer.Option(help="run directory; an existing one is resumed")] = None,
    workers: Annotated[Optional[int], typer.Option(help="parallel processes (default: the preset's, 2)")] = None,
) -> None:
    """The entropy laboratory: train the built-in tiny model with every method side by side, then write a report."""
    from entrorl.lab.runner import run_lab

    names = [name for item in (methods or []) for name in item.split(",") if name.strip()]
    try:
        run_dir = run_lab(preset, methods=names or None, out=out, workers=workers, console=console)
    except ValueError as error:
        _fail(str(error))
    console.print(f"[green]report[/green]: {run_dir / 'report.html'}  ({run_dir / 'report.md'})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
