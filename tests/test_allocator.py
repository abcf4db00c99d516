"""Keeping freed CPU memory for reuse: a training-like loop stops page-faulting fresh memory, and the trainer
applies the setting only when its config asks for it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from entrorl.trainer import allocator

FAULTS_OF_A_TRAINING_LOOP = textwrap.dedent("""
    import resource, sys, torch
    torch.set_num_threads(1)
    if sys.argv[1] == "retain":
        from entrorl.trainer.allocator import retain_freed_memory
        assert retain_freed_memory()
    torch.manual_seed(0)
    x = torch.randn(64, 40, 64, requires_grad=True)
    up, down = torch.randn(256, 64, requires_grad=True), torch.randn(64, 256, requires_grad=True)

    def step():  # activations and gradients of a few hundred KiB to a few MiB, allocated and freed every step
        h = x
        for _ in range(4):
            h = h + torch.nn.functional.linear(torch.nn.functional.silu(torch.nn.functional.linear(h, up)), down)
        h.square().mean().backward()

    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", FAULTS_OF_A_TRAINING_LOOP, mode], capture_output=True, text=True,
                          timeout=120, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_stops_the_page_faults_of_every_step():
    system, retained = page_faults("system"), page_faults("retain")
    # each of the 20 steps touches fresh pages for its activations with the defaults, almost none once retained
    assert retained * 4 < system, (system, retained)


def test_bad_thresholds_are_refused():
    with pytest.raises(ValueError, match="mmap_threshold"):
        allocator.retain_freed_memory(mmap_threshold=allocator.MMAP_THRESHOLD_MAX + 1)
    with pytest.raises(ValueError, match="trim_threshold"):
        allocator.retain_freed_memory(trim_threshold=0)


@pytest.mark.parametrize(("retain", "applied"), [(True, True), (False, False), (None, True)])  # None: on the CPU, yes
def test_trainer_applies_the_setting_only_when_asked(tmp_path, tiny_model_dir, arithmetic_files, monkeypatch, retain, applied):
    from entrorl.trainer import Trainer, load_config, loop

    calls = []
    monkeypatch.setattr(loop, "retain_freed_memory", lambda: calls.append(True) or True)
    train, _ = arithmetic_files
    config = load_config({"model": {"path": str(tiny_model_dir), "device": "cpu"}, "data": {"train": str(train)},
                          "reward": {"name": "exact_match"}, "rollout": {"max_new_tokens": 6},
                          "retain_freed_memory": retain,
                          "logging": {"progress": False}})
    Trainer(config, run_dir=tmp_path / "run")
    assert calls == ([True] if applied else [])
