"""Shared fixtures: a tiny Qwen2 model with a character tokenizer, built and saved by the tests themselves."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
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
    """Each test leaves Ctrl-C, SIGTERM and SIGXCPU as it found them: one that fails midway through an interrupted run,
    or runs a laboratory worker's code in the test process, must not leave them ignored for the tests after it."""
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM, signal.SIGXCPU)}
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


NOBODY = 65534


@pytest.fixture(scope="session")
def as_an_ordinary_user():
    """``run(script)``: run a Python script as an ordinary user (this one when not root, else ``nobody``), in a folder
    every user may enter, with this environment's packages: with this interpreter when that user can execute it, else
    with the system's ``python3`` of the same version given them through a ``.pth`` file (an interpreter under root's
    home is not executable by others). Skips the test where neither runs."""
    import site
    import sysconfig

    shared = Path(tempfile.mkdtemp(prefix="entrorl-ordinary-user-"))
    os.chmod(shared, 0o755)
    environment = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(shared), "OMP_NUM_THREADS": "1"}
    identity = dict(user=NOBODY, group=NOBODY, extra_groups=[]) if os.geteuid() == 0 else {}

    def runs(python: str) -> bool:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            return subprocess.run([python, "-c", "import entrorl.rewards.sandbox"], cwd="/", env=environment,
                                  capture_output=True, timeout=120, **identity).returncode == 0
        return False

    python = sys.executable
    if not runs(python):
        system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
        version = system and subprocess.run([system, "-c", "import sys; print(sys.version_info[:2])"],
                                            capture_output=True, text=True).stdout.strip()
        if version == str(tuple(sys.version_info[:2])):
            subprocess.run([system, "-m", "venv", "--without-pip", str(shared / "venv")], check=True, capture_output=True)
            python = str(shared / "venv" / "bin" / "python")
            purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     capture_output=True, text=True, check=True).stdout.strip()
            import entrorl

            folders = dict.fromkeys([sysconfig.get_paths()["purelib"], *site.getsitepackages()])
            Path(purelib, "this_environment.pth").write_text(
                "".join(f"import site; site.addsitedir({folder!r})\n" for folder in folders)
                + str(Path(entrorl.__file__).resolve().parents[1]) + "\n")
        if not runs(python):
            shutil.rmtree(shared, ignore_errors=True)
            pytest.skip("no interpreter with these packages that an ordinary user can run")

    def run(script: str) -> subprocess.CompletedProcess:
        path = shared / f"script{len(list(shared.glob('script*')))}.py"
        path.write_text(textwrap.dedent(script))
        os.chmod(path, 0o644)
        return subprocess.run([python, str(path)], env=environment, capture_output=True, text=True, timeout=300,
                              cwd=str(shared), **identity)

    run.folder = shared  # where files the user reads can go (a test's tmp_path is root's alone)
    yield run
    shutil.rmtree(shared, ignore_errors=True)
