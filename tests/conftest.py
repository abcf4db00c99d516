"""Shared fixtures: a tiny Qwen2 model with a character tokenizer, built and saved by the tests themselves."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_not_ignored():
    """The tests of Ctrl-C expect Python's own handler, which a process started in the background by a shell (``cmd &``,
    ``nohup``) does not have: it starts with SIGINT ignored, which the trainer rightly leaves ignored."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(autouse=True)
def stop_signal_handlers_restored():
    """Each test leaves Ctrl-C and SIGTERM as it found them: one that fails midway through an interrupted run, or runs
    a laboratory worker's code in the test process, must not leave them ignored for the tests after it."""
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    yield
    for number, handler in before.items():
        if signal.getsignal(number) is not handler:
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-init Qwen2 (2 layers, hidden 32) and a character tokenizer, saved with save_pretrained."""
    from entrorl.lab.tiny_model import save_tiny_model

    directory = tmp_path_factory.mktemp("tiny-model")
    return save_tiny_model(directory, seed=0, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="session")
def arithmetic_files(tmp_path_factory) -> tuple[Path, Path]:
    """Train and eval prompt files of one-digit sums (answers are single digits or two digits)."""
    directory = tmp_path_factory.mktemp("arithmetic")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(40):
        a, b = torch.randint(0, 10, (2,), generator=generator).tolist()
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    train, held_out = directory / "train.jsonl", directory / "eval.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows[:32]))
    held_out.write_text("".join(json.dumps(row) + "\n" for row in rows[32:]))
    return train, held_out
