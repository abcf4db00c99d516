"""Other systems than Linux, simulated on it: Windows (no ``fcntl``, no ``os.kill(pid, 0)`` question, drive letters in
paths) and macOS (no sandbox for code, ``mps`` instead of CUDA). Apple's GPUs without float64 are simulated in
``tests/test_simulated_device.py``."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch


def test_without_fcntl_as_on_windows_the_trainer_and_the_rewards_import(tmp_path):
    script = textwrap.dedent("""
        import sys
        sys.modules["fcntl"] = None  # as on Windows: importing it fails
        import entrorl.integrations.trl, entrorl.lab, entrorl.rewards, entrorl.trainer
        from entrorl.rewards import get_reward
        print(float(get_reward("math")("1+1=", "\\\\boxed{2}", "2")))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "1.0"


@pytest.mark.parametrize("system", ["darwin", "win32"])
def test_the_code_reward_says_it_needs_linux_when_built_elsewhere(system, monkeypatch):
    from entrorl.rewards import get_reward
    from entrorl.rewards.sandbox import SandboxCase, SandboxError, run_in_sandbox

    monkeypatch.setattr(sys, "platform", system)
    with pytest.raises(ValueError, match=f"Linux only.*{system}"):
        get_reward("code")
    with pytest.raises(SandboxError, match="Linux only"):
        run_in_sandbox("print(1)", [SandboxCase("assert", "pass")])


def test_an_apple_gpu_that_torch_cannot_use_is_refused_when_the_config_is_read(monkeypatch, tiny_model_dir, tmp_path):
    from entrorl.trainer.config import ConfigError, load_config, resolve_device

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'mps'.*no Apple GPU"):
        resolve_device("mps")
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    with pytest.raises(ConfigError, match="model.device"):
        load_config({"model": {"path": str(tiny_model_dir), "device": "mps"}, "data": {"train": str(train)}})
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")


def test_a_run_directory_that_cannot_be_locked_as_on_windows_is_warned_about(tmp_path, monkeypatch, caplog):
    """Without flock a second run in the same directory cannot be refused: it is said once per directory."""
    from entrorl.trainer import checkpoint

    monkeypatch.setattr(checkpoint, "fcntl", None)
    monkeypatch.setattr(checkpoint, "_UNLOCKABLE_DIRECTORIES", set())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with caplog.at_level(logging.WARNING, logger=checkpoint.logger.name):
        assert checkpoint.lock_run_directory(run_dir) is None
        assert checkpoint.lock_run_directory(run_dir) is None
    said = [record.getMessage() for record in caplog.records if "cannot lock" in record.getMessage()]
    assert len(said) == 1 and "no flock" in said[0] and "two runs there would not be kept apart" in said[0]


def test_on_windows_no_signal_is_sent_to_ask_whether_a_writer_runs(tmp_path, monkeypatch):
    """There ``os.kill(pid, 0)`` sends CTRL_C_EVENT to the process: a temporary file of another process id is kept as
    if its writer ran, and no signal is sent."""
    from entrorl.trainer import checkpoint

    sent = []
    monkeypatch.setattr(os, "kill", lambda *arguments: sent.append(arguments))
    monkeypatch.setattr(sys, "platform", "win32")
    stale = tmp_path / f".metrics.jsonl.tmp-{os.getpid() + 1}"
    assert checkpoint.written_by_another_live_process(stale)
    assert not checkpoint.written_by_another_live_process(tmp_path / f".metrics.jsonl.tmp-{os.getpid()}")
    assert sent == []


@pytest.mark.parametrize("spec", ["C:\\Users\\me\\my_reward.py:score", "/home/me/my_reward.py:score"])
def test_a_reward_given_by_its_file_with_a_drive_letter_gets_the_import_path_hint(spec):
    from entrorl.rewards import get_reward

    with pytest.raises(ValueError, match="name the module by its import path, not by its file") as refused:
        get_reward(spec)
    assert "module 'C'" not in str(refused.value)


def test_a_checkpoint_keeps_an_apple_gpus_generator(monkeypatch):
    """Sampling on an Apple GPU draws from its generator: a checkpoint saves its state and a resume puts it back
    (a stand-in generator here)."""
    from entrorl.trainer.checkpoint import capture_rng_state, restore_rng_state

    generator = {"state": 123}
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda device="mps": torch.tensor([generator["state"]]))
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state, device="mps": generator.update(state=int(state[0])))
    saved = capture_rng_state()
    generator["state"] = 7  # drawn from since, or seeded afresh by a new process
    restore_rng_state(saved)
    assert generator["state"] == 123
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    restore_rng_state(saved)  # a checkpoint of a Mac resumed elsewhere: nothing to put it in
    assert "mps" not in capture_rng_state()
